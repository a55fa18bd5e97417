//! `govsql migrate`: the SQL substrate, the catalog seed and (with
//! `--demo`) the demo schema, applied over the target's own transport as
//! `admin_db_user`. The SQL files are embedded, so it works from any
//! directory.
//!
//! Two kinds of files, as in Flyway and sqlx:
//! - **Versioned** (`sql/migrations/NNN_*.sql`): schema changes. Each runs
//!   once, in its own transaction, recorded with its checksum in
//!   `dot_schema_migrations`. A released one is never edited: a database
//!   whose recorded checksum differs from the embedded file is refused
//!   (GV011, [`MigrateError::Changed`]) before anything is applied.
//! - **Repeatable** (`sql/functions/*.sql`): function bodies, all
//!   `CREATE OR REPLACE`. After the versioned ones, each file whose
//!   checksum differs from the one recorded in `dot_schema_functions` is
//!   applied again, whole; then `90_grants.sql` (owners and grants). They
//!   run in one transaction, so a database never keeps half a set.
//!
//! The whole run holds a session advisory lock, so two migrates of one
//! database take turns. A second run changes nothing.
use sha2::{Digest, Sha256};

use crate::catalog::Catalog;
use crate::psql::{control_rows, FinishedScript, PsqlResult, Script, Sections};
use crate::transport::{run_script, Executor};

/// One embedded migration and its rollback.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// The version recorded in dot_schema_migrations.
    pub version: &'static str,
    /// The forward SQL.
    pub sql: &'static str,
    /// The rollback SQL.
    pub rollback: &'static str,
}

/// The substrate migrations, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: "001_gates",
        sql: include_str!("../sql/migrations/001_gates.sql"),
        rollback: include_str!("../sql/rollback/001_gates.sql"),
    },
    Migration {
        version: "002_catalog",
        sql: include_str!("../sql/migrations/002_catalog.sql"),
        rollback: include_str!("../sql/rollback/002_catalog.sql"),
    },
    Migration {
        version: "003_ledger",
        sql: include_str!("../sql/migrations/003_ledger.sql"),
        rollback: include_str!("../sql/rollback/003_ledger.sql"),
    },
    Migration {
        version: "004_views",
        sql: include_str!("../sql/migrations/004_views.sql"),
        rollback: include_str!("../sql/rollback/004_views.sql"),
    },
    Migration {
        version: "005_dispatcher",
        sql: include_str!("../sql/migrations/005_dispatcher.sql"),
        rollback: include_str!("../sql/rollback/005_dispatcher.sql"),
    },
    Migration {
        version: "006_exposure_preflight",
        sql: include_str!("../sql/migrations/006_exposure_preflight.sql"),
        rollback: include_str!("../sql/rollback/006_exposure_preflight.sql"),
    },
    Migration {
        version: "007_refuse_settles_first",
        sql: include_str!("../sql/migrations/007_refuse_settles_first.sql"),
        rollback: include_str!("../sql/rollback/007_refuse_settles_first.sql"),
    },
    Migration {
        version: "008_keys_per_actor",
        sql: include_str!("../sql/migrations/008_keys_per_actor.sql"),
        rollback: include_str!("../sql/rollback/008_keys_per_actor.sql"),
    },
    Migration {
        version: "009_limits",
        sql: include_str!("../sql/migrations/009_limits.sql"),
        rollback: include_str!("../sql/rollback/009_limits.sql"),
    },
];

/// One repeatable file of function bodies.
#[derive(Debug, Clone, Copy)]
pub struct Repeatable {
    /// Its name in dot_schema_functions (the file's stem).
    pub name: &'static str,
    /// The SQL (`CREATE OR REPLACE` only).
    pub sql: &'static str,
}

/// The repeatable function files, in order; [`GRANTS`] follows them.
pub const FUNCTIONS: &[Repeatable] = &[
    Repeatable {
        name: "10_params",
        sql: include_str!("../sql/functions/10_params.sql"),
    },
    Repeatable {
        name: "20_ledger_rows",
        sql: include_str!("../sql/functions/20_ledger_rows.sql"),
    },
    Repeatable {
        name: "30_dispatch",
        sql: include_str!("../sql/functions/30_dispatch.sql"),
    },
    Repeatable {
        name: "40_settle",
        sql: include_str!("../sql/functions/40_settle.sql"),
    },
    Repeatable {
        name: "50_catalog",
        sql: include_str!("../sql/functions/50_catalog.sql"),
    },
    Repeatable {
        name: "60_reads",
        sql: include_str!("../sql/functions/60_reads.sql"),
    },
    Repeatable {
        name: "70_calls",
        sql: include_str!("../sql/functions/70_calls.sql"),
    },
];

/// Owners and grants of the repeatable functions: applied after them
/// whenever one of them was.
pub const GRANTS: &str = include_str!("../sql/functions/90_grants.sql");

/// The rollback of the repeatable functions (run before the versioned
/// rollbacks).
const FUNCTIONS_ROLLBACK: &str = include_str!("../sql/rollback/functions.sql");

/// The SQLSTATE the migrate script raises when a recorded migration's
/// checksum differs from the embedded file's.
pub const CHANGED_SQLSTATE: &str = crate::sqlstate::MIGRATION_CHANGED;

/// The demo IU Core schema (`--demo`).
pub const DEMO: &[Migration] = &[
    Migration {
        version: "demo_001_iu_core",
        sql: include_str!("../sql/demo/001_iu_core.sql"),
        rollback: include_str!("../sql/rollback/demo_001_iu_core.sql"),
    },
    Migration {
        version: "demo_002_least_privilege",
        sql: include_str!("../sql/demo/002_least_privilege.sql"),
        rollback: include_str!("../sql/rollback/demo_002_least_privilege.sql"),
    },
    Migration {
        version: "demo_003_diag_notify",
        sql: include_str!("../sql/demo/003_diag_notify.sql"),
        rollback: include_str!("../sql/rollback/demo_003_diag_notify.sql"),
    },
    Migration {
        version: "demo_004_diag_rows",
        sql: include_str!("../sql/demo/004_diag_rows.sql"),
        rollback: include_str!("../sql/rollback/demo_004_diag_rows.sql"),
    },
];

/// A migrate or rollback that did not complete.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The runtime role name is not a plain identifier.
    #[error("db_user {0:?} must be a plain lowercase identifier to be created by migrate")]
    RoleName(String),
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] crate::transport::TransportError),
    /// A migration recorded on the database differs from this build's
    /// file of the same version: nothing was applied.
    #[error(
        "the database recorded {} with a different checksum than this govsql's file{}: a released migration is never edited, so this database was migrated by another build of govsql. Nothing was applied. Migrate it with the govsql release that applied it, or, on a database you can rebuild, `govsql migrate --rollback` then migrate again",
        .0.join(", "),
        if .0.len() == 1 { "" } else { "s" }
    )]
    Changed(Vec<String>),
    /// psql stopped on an error.
    #[error("migration stopped with SQLSTATE {state} (nothing of the failing step was kept)")]
    Sql {
        /// The SQLSTATE.
        state: String,
    },
    /// psql failed otherwise.
    #[error("{0}")]
    Psql(String),
}

/// What a migrate run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrateReport {
    /// Versions applied by this run.
    pub applied: Vec<String>,
    /// Versions found already applied.
    pub present: Vec<String>,
    /// Repeatable function files applied by this run (new or changed).
    pub functions: Vec<String>,
    /// Commands whose target functions do not resolve with the argument
    /// types their statements use: marked unavailable (refused with
    /// `target_missing`).
    pub unavailable: Vec<String>,
    /// Functions the runtime role can execute besides the dispatcher's
    /// entries (any schema but pg_catalog and information_schema).
    pub excess: Vec<String>,
    /// What the runtime role carries that a key holder could have set
    /// (a password).
    pub role_findings: Vec<String>,
}

/// What the runtime role may execute: the dispatcher's entries and the
/// preflight, as an SQL list.
fn entry_functions() -> String {
    crate::grammar::runtime_functions()
        .map(crate::grammar::word_literal)
        .collect::<Vec<_>>()
        .join(", ")
}

fn checksum(sql: &str) -> String {
    hex::encode(Sha256::digest(sql.as_bytes()))
}

fn check_role(role: &str) -> Result<(), MigrateError> {
    let ok = role.len() <= 63
        && role
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && role
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(MigrateError::RoleName(role.to_string()))
    }
}

/// The migrate script: each pending migration in its own transaction, then
/// the catalog seed, then a report of what is recorded.
pub fn migrate_script(
    catalog: &Catalog,
    runtime_role: &str,
    demo: bool,
) -> Result<FinishedScript, MigrateError> {
    check_role(runtime_role)?;
    let mut s = Script::new("govsql:migrate", 0);
    s.meta(&format!("\\set runtime_role {runtime_role}"));
    // The keyed params digest's secret: used only if 005 runs now.
    let secret: [u8; 32] = rand::random();
    s.meta(&format!("\\set secret {}", hex::encode(secret)));
    s.sql("SET client_min_messages = warning");
    // One migrate at a time per database, for the whole run (a session
    // lock: released when psql ends, whatever happened).
    s.sql("SELECT pg_advisory_lock(hashtextextended('govsql:migrate', 0))");
    s.sql(
        "CREATE TABLE IF NOT EXISTS public.dot_schema_migrations (version text PRIMARY KEY, checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())",
    );
    s.sql(
        "CREATE TABLE IF NOT EXISTS public.dot_schema_functions (name text PRIMARY KEY, checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())",
    );
    let all: Vec<&Migration> = MIGRATIONS
        .iter()
        .chain(if demo { DEMO } else { &[] })
        .collect();
    // A recorded migration whose file changed: stop before applying anything.
    let embedded = all
        .iter()
        .map(|m| {
            format!(
                "({}, {})",
                crate::grammar::word_literal(m.version),
                crate::grammar::word_literal(&checksum(m.sql))
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    s.sql(&format!(
        "DO $govsql$ BEGIN IF EXISTS (SELECT 1 FROM public.dot_schema_migrations m JOIN (VALUES {embedded}) AS e (version, checksum) USING (version) WHERE m.checksum <> e.checksum) THEN RAISE EXCEPTION USING ERRCODE = '{CHANGED_SQLSTATE}', MESSAGE = 'a recorded migration differs from its file'; END IF; END $govsql$"
    ));
    s.section();
    for m in all {
        s.meta(&format!(
            "SELECT NOT EXISTS (SELECT 1 FROM public.dot_schema_migrations WHERE version = {}) AS govsql_need \\gset",
            crate::grammar::word_literal(m.version)
        ));
        s.meta("\\if :govsql_need");
        s.sql("BEGIN");
        s.meta(m.sql);
        s.sql(&format!(
            "INSERT INTO public.dot_schema_migrations (version, checksum) VALUES ({}, {})",
            crate::grammar::word_literal(m.version),
            crate::grammar::word_literal(&checksum(m.sql))
        ));
        s.sql("COMMIT");
        s.meta(&format!("\\echo applied {}", m.version));
        s.meta("\\endif");
    }
    // The repeatable function files that are new or changed, then the
    // grants, in one transaction.
    s.meta("\\set govsql_changed false");
    s.sql("BEGIN");
    for f in FUNCTIONS {
        let sum = crate::grammar::word_literal(&checksum(f.sql));
        let name = crate::grammar::word_literal(f.name);
        s.meta(&format!(
            "SELECT NOT EXISTS (SELECT 1 FROM public.dot_schema_functions WHERE name = {name} AND checksum = {sum}) AS govsql_need \\gset"
        ));
        s.meta("\\if :govsql_need");
        s.meta(f.sql);
        s.sql(&format!(
            "INSERT INTO public.dot_schema_functions (name, checksum) VALUES ({name}, {sum}) ON CONFLICT (name) DO UPDATE SET checksum = EXCLUDED.checksum, applied_at = now()"
        ));
        s.meta("\\set govsql_changed true");
        s.meta(&format!("\\echo functions {}", f.name));
        s.meta("\\endif");
    }
    s.meta("\\if :govsql_changed");
    s.meta(GRANTS);
    s.meta("\\endif");
    s.sql("COMMIT");
    s.meta(&catalog.seed_sql());
    s.section();
    s.sql("SELECT unnest(public.fn_dot_iu_catalog_resolve(:'runtime_role'))");
    s.section();
    s.sql("SELECT version, checksum FROM public.dot_schema_migrations ORDER BY version");
    s.section();
    s.sql(&format!(
        "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND has_function_privilege(:'runtime_role', p.oid, 'EXECUTE') AND NOT (n.nspname = 'public' AND p.proname IN ({})) ORDER BY 1",
        entry_functions()
    ));
    // What a key holder could have left on the role: a password (a login
    // over TCP wherever pg_hba has a password line for all users), or
    // defaults (read only by a superuser: pg_authid).
    s.section();
    s.meta("SELECT rolsuper AS govsql_need FROM pg_roles WHERE rolname = current_user \\gset");
    s.meta("\\if :govsql_need");
    s.sql("SELECT 'has a password' FROM pg_authid WHERE rolname = :'runtime_role' AND rolpassword IS NOT NULL");
    s.meta("\\endif");
    Ok(s.finish())
}

/// The rollback script: every rollback in reverse order (the demo's first),
/// then the bookkeeping table. The ledger's rollback refuses to drop rows.
pub fn rollback_script() -> FinishedScript {
    let mut s = Script::new("govsql:rollback", 0);
    s.sql("SET client_min_messages = warning");
    s.sql("BEGIN");
    for m in DEMO.iter().rev() {
        s.meta(m.rollback);
    }
    s.meta(FUNCTIONS_ROLLBACK);
    for m in MIGRATIONS.iter().rev() {
        s.meta(m.rollback);
    }
    s.sql("DROP TABLE IF EXISTS public.dot_schema_migrations");
    s.sql("COMMIT");
    s.section();
    s.finish()
}

/// Runs `migrate` on a target as the admin role.
pub async fn migrate(
    exec: &dyn Executor,
    catalog: &Catalog,
    runtime_role: &str,
    demo: bool,
) -> Result<MigrateReport, MigrateError> {
    let script = migrate_script(catalog, runtime_role, demo)?;
    let secs = match run_admin(exec, &script).await {
        Err(MigrateError::Sql { state }) if state == CHANGED_SQLSTATE => {
            return Err(MigrateError::Changed(changed(exec, demo).await?))
        }
        other => other?,
    };
    let echoed = String::from_utf8_lossy(secs.get(0).unwrap_or_default()).into_owned();
    let applied: Vec<String> = echoed
        .lines()
        .filter_map(|l| l.strip_prefix("applied ").map(str::to_string))
        .collect();
    let functions: Vec<String> = echoed
        .lines()
        .filter_map(|l| l.strip_prefix("functions ").map(str::to_string))
        .collect();
    let unavailable = control_rows(1, secs.get(1).unwrap_or_default(), 1)
        .map_err(|e| MigrateError::Psql(e.to_string()))?
        .into_iter()
        .filter_map(|mut r| r.pop())
        .collect();
    let recorded = control_rows(2, secs.get(2).unwrap_or_default(), 2)
        .map_err(|e| MigrateError::Psql(e.to_string()))?;
    let excess = control_rows(3, secs.get(3).unwrap_or_default(), 1)
        .map_err(|e| MigrateError::Psql(e.to_string()))?
        .into_iter()
        .filter_map(|mut r| r.pop())
        .collect();
    let role_findings = control_rows(4, secs.get(4).unwrap_or_default(), 1)
        .map_err(|e| MigrateError::Psql(e.to_string()))?
        .into_iter()
        .filter_map(|mut r| r.pop())
        .collect();
    let present = MIGRATIONS
        .iter()
        .chain(if demo { DEMO } else { &[] })
        .filter(|m| recorded.iter().any(|r| r[0] == m.version))
        .filter(|m| !applied.iter().any(|a| a == m.version))
        .map(|m| m.version.to_string())
        .collect();
    Ok(MigrateReport {
        applied,
        present,
        functions,
        unavailable,
        excess,
        role_findings,
    })
}

/// The versions whose recorded checksum differs from the embedded file
/// (read after the migrate script refused with GV011).
async fn changed(exec: &dyn Executor, demo: bool) -> Result<Vec<String>, MigrateError> {
    let mut s = Script::new("govsql:migrate", 0);
    s.section();
    s.sql("SELECT version, checksum FROM public.dot_schema_migrations ORDER BY version");
    let secs = run_admin(exec, &s.finish()).await?;
    let recorded = control_rows(0, secs.get(0).unwrap_or_default(), 2)
        .map_err(|e| MigrateError::Psql(e.to_string()))?;
    Ok(MIGRATIONS
        .iter()
        .chain(if demo { DEMO } else { &[] })
        .filter(|m| {
            recorded
                .iter()
                .any(|r| r[0] == m.version && r[1] != checksum(m.sql))
        })
        .map(|m| m.version.to_string())
        .collect())
}

/// Rolls everything back on a target as the admin role.
pub async fn rollback(exec: &dyn Executor) -> Result<(), MigrateError> {
    run_admin(exec, &rollback_script()).await.map(|_| ())
}

async fn run_admin(exec: &dyn Executor, script: &FinishedScript) -> Result<Sections, MigrateError> {
    let deadline = std::time::Duration::from_secs(600);
    match run_script(exec, script, "govsql:migrate", deadline).await {
        PsqlResult::Complete(secs) => Ok(secs),
        PsqlResult::SqlError { state, .. } => Err(MigrateError::Sql { state }),
        other => Err(MigrateError::Psql(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::job::{ErrorClass, RunStatus};

    /// Every script `migrate` sends passes the admin key's grammar at the
    /// database host's remote-gate: the embedded migrations, the demo, the
    /// shipped catalog's seed, and the rollback.
    #[test]
    fn every_migrate_script_passes_the_admin_grammar() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let catalog = Catalog::load(&root.join("config/catalog.toml")).unwrap();
        for demo in [false, true] {
            let s = migrate_script(&catalog, "govsql_runtime", demo).unwrap();
            if let Err(e) = crate::grammar::check_admin_script(s.text.as_bytes()) {
                let line = s.text.lines().nth(e.line as usize - 1).unwrap_or("");
                panic!("demo={demo}: {e}: {line}");
            }
        }
        crate::grammar::check_admin_script(rollback_script().text.as_bytes()).unwrap();
        for m in MIGRATIONS.iter().chain(DEMO) {
            crate::grammar::check_admin_script(m.sql.as_bytes())
                .unwrap_or_else(|e| panic!("{}: {e}", m.version));
        }
        for f in FUNCTIONS {
            crate::grammar::check_admin_script(f.sql.as_bytes())
                .unwrap_or_else(|e| panic!("{}: {e}", f.name));
        }
    }

    /// Every SQL text govsql embeds: versioned migrations and their
    /// rollbacks, the repeatable functions, and the migrate script's own.
    fn all_sql() -> String {
        let mut all = String::new();
        for m in MIGRATIONS.iter().chain(DEMO) {
            all.push_str(m.sql);
            all.push_str(m.rollback);
        }
        for f in FUNCTIONS {
            all.push_str(f.sql);
        }
        all.push_str(GRANTS);
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let catalog = crate::catalog::Catalog::load(&root.join("config/catalog.toml")).unwrap();
        all.push_str(
            &crate::migrate::migrate_script(&catalog, "govsql_runtime", true)
                .unwrap()
                .text,
        );
        all
    }

    /// The single-quoted words after each occurrence of `anchor`, up to
    /// the end of its statement or list (`)` or `;`).
    fn words_after(sql: &str, anchor: &str, stop: char) -> Vec<String> {
        let mut out = Vec::new();
        for (at, _) in sql.match_indices(anchor) {
            let rest = &sql[at + anchor.len()..];
            let end = rest.find(stop).unwrap_or(rest.len());
            let mut parts = rest[..end].split('\'');
            parts.next();
            while let (Some(word), _) = (parts.next(), parts.next()) {
                out.push(word.to_string());
            }
        }
        out
    }

    #[test]
    fn every_gv_code_the_sql_raises_is_named_here_and_nothing_else() {
        let raised: BTreeSet<String> = all_sql()
            .split("ERRCODE = '")
            .skip(1)
            .map(|rest| rest[..5].to_string())
            .filter(|c| c.starts_with("GV"))
            .collect();
        let named: BTreeSet<String> = crate::sqlstate::ALL.iter().map(|c| c.to_string()).collect();
        assert_eq!(raised, named, "raised in the SQL vs named in sqlstate.rs");
        assert_eq!(
            crate::grammar::PREFLIGHT_SQLSTATE,
            crate::sqlstate::LOG_EXPOSURE
        );
        assert_eq!(
            crate::grammar::BACKEND_ALIVE_SQLSTATE,
            crate::sqlstate::BACKEND_ALIVE
        );
    }

    #[test]
    fn every_class_word_in_the_sql_is_an_error_class_of_the_right_outcome() {
        let funcs: String = FUNCTIONS.iter().map(|f| f.sql).collect();
        // The classes the dispatcher writes itself, and its reasons (an
        // apply's first reason is its class).
        let mut written = words_after(&funcs, "v_class := ", ';');
        written.extend(words_after(&funcs, "array_append(v_reasons, ", ')'));
        written.retain(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
        for mode in ["apply", "verify", "plan"] {
            written.retain(|w| w != mode);
        }
        assert!(written.len() >= 10, "{written:?}");
        for w in &written {
            let class = ErrorClass::parse(w).unwrap_or_else(|| panic!("{w}: no ErrorClass"));
            assert_eq!(class.as_str(), w, "{w} is read as another word");
        }
        // What the refuse and fail entries accept.
        let refusals = words_after(&funcs, "p_class NOT IN (", ')');
        let failures = words_after(&funcs, "(p_class NOT IN (", ')');
        assert!(refusals.len() > failures.len() && failures.len() >= 5);
        for w in &failures {
            let class = ErrorClass::parse(w).unwrap_or_else(|| panic!("{w}: no ErrorClass"));
            assert_eq!(class.status(), RunStatus::Failed, "{w}");
        }
        for w in refusals.iter().filter(|w| !failures.contains(w)) {
            let class = ErrorClass::parse(w).unwrap_or_else(|| panic!("{w}: no ErrorClass"));
            assert_eq!(class.status(), RunStatus::Refused, "{w}");
        }
    }

    #[test]
    fn every_run_status_in_the_sql_is_a_run_status() {
        let sql = all_sql();
        let mut words = words_after(&sql, "run_status IN (", ')');
        words.extend(words_after(&sql, "v_status := CASE", ';'));
        words.retain(|w| {
            !w.is_empty()
                && w.bytes().all(|b| b.is_ascii_lowercase())
                && !["apply", "plan", "verify"].contains(&w.as_str())
        });
        let seen: BTreeSet<&str> = words.iter().map(String::as_str).collect();
        assert!(seen.len() >= 4, "{seen:?}");
        for w in seen {
            let status = RunStatus::parse(w).unwrap_or_else(|| panic!("{w}: no RunStatus"));
            assert_eq!(status.as_str(), w);
        }
    }
}

//! `govsql migrate`: the SQL substrate, the catalog seed and (with
//! `--demo`) the demo schema, applied over the target's own transport as
//! `admin_db_user`. The SQL files are embedded, so it works from any
//! directory. Each migration runs once, in its own transaction, recorded in
//! `dot_schema_migrations`; a second run changes nothing.

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
];

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
    /// Versions whose recorded checksum differs from the embedded file.
    pub changed: Vec<String>,
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
    s.sql(
        "CREATE TABLE IF NOT EXISTS public.dot_schema_migrations (version text PRIMARY KEY, checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())",
    );
    s.section();
    let all = MIGRATIONS.iter().chain(if demo { DEMO } else { &[] });
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
    for m in DEMO.iter().rev().chain(MIGRATIONS.iter().rev()) {
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
    let secs = run_admin(exec, &script).await?;
    let applied: Vec<String> = String::from_utf8_lossy(secs.get(0).unwrap_or_default())
        .lines()
        .filter_map(|l| l.strip_prefix("applied ").map(str::to_string))
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
    let mut report = MigrateReport {
        role_findings,
        applied: applied.clone(),
        unavailable,
        excess,
        ..MigrateReport::default()
    };
    for m in MIGRATIONS.iter().chain(if demo { DEMO } else { &[] }) {
        if let Some(row) = recorded.iter().find(|r| r[0] == m.version) {
            if !applied.iter().any(|a| a == m.version) {
                report.present.push(m.version.to_string());
            }
            if row[1] != checksum(m.sql) {
                report.changed.push(m.version.to_string());
            }
        }
    }
    Ok(report)
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
    use super::*;

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
    }
}

//! Migrations across releases: a database at the previous release's
//! migrations (tests/fixtures/previous-release.sha256) upgrades to this build's
//! function bodies; a released migration that changed is refused; two
//! migrates of one database take turns.

use std::path::Path;
use std::process::Command;

use govsql::migrate::{migrate, MigrateError, FUNCTIONS, MIGRATIONS};
use govsql::runtime::{Mode, RunStatus};
use sha2::{Digest, Sha256};

use crate::harness::*;

/// Migrates `db` as the previous release's `govsql migrate` did (without
/// the demo): each migration it shipped (tests/fixtures/
/// previous-release.sha256: its versions and their sha256) once, in its
/// own transaction, with the runtime role and a fresh secret, recorded
/// with its checksum. This build's files of those versions must be the
/// released bytes (a released migration is never edited).
fn migrate_as_previous_release(db: &TestDb) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest =
        std::fs::read_to_string(root.join("tests/fixtures/previous-release.sha256")).unwrap();
    let pg = pg();
    db.sql("CREATE TABLE public.dot_schema_migrations (version text PRIMARY KEY, checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())");
    let mut versions = Vec::new();
    for line in manifest.lines() {
        let (released_sum, file) = line.split_once("  ").unwrap();
        let f = root.join("sql/migrations").join(file);
        let version = f.file_stem().unwrap().to_str().unwrap().to_string();
        let sql = std::fs::read_to_string(&f).unwrap();
        let secret = hex::encode(rand::random::<[u8; 32]>());
        let out = Command::new(&pg.psql)
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-1", "-h"])
            .arg(&pg.dir)
            .args(["-p", &pg.port.to_string(), "-U", "postgres", "-d", &db.name])
            .args(["-v", &format!("runtime_role={RUNTIME_ROLE}")])
            .args(["-v", &format!("secret={secret}")])
            .arg("-f")
            .arg(&f)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{version}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let sum = hex::encode(Sha256::digest(sql.as_bytes()));
        assert_eq!(
            sum, released_sum,
            "{version} was edited after its release: add a new migration instead"
        );
        db.sql(&format!(
            "INSERT INTO public.dot_schema_migrations (version, checksum) VALUES ('{version}', '{sum}')"
        ));
        versions.push(version);
    }
    versions
}

/// Every govsql function of a database: name, owner, grants and an md5 of
/// its whole definition, one per line.
fn functions_of(db: &TestDb) -> String {
    db.sql(
        "SELECT string_agg(format('%s %s %s %s', p.oid::regprocedure, pg_get_userbyid(p.proowner), coalesce(p.proacl::text, '-'), md5(pg_get_functiondef(p.oid))), E'\\n' ORDER BY p.oid::regprocedure::text) FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace AND p.proname LIKE 'fn\\_dot\\_iu\\_%'",
    )
}

#[tokio::test]
async fn a_database_at_the_previous_release_upgrades_to_this_builds_functions() {
    let old = unmigrated_db();
    let released = migrate_as_previous_release(&old);
    let before = functions_of(&old);
    let report = migrate(&old.admin_executor(), &old.catalog, RUNTIME_ROLE, true)
        .await
        .expect("the upgrade");
    let newer: Vec<&str> = MIGRATIONS
        .iter()
        .map(|m| m.version)
        .filter(|v| !released.iter().any(|r| r == v))
        .collect();
    assert!(
        newer.iter().all(|v| report.applied.iter().any(|a| a == v)),
        "{report:?}"
    );
    assert_eq!(report.present, released, "{report:?}");
    assert_eq!(
        report.functions,
        FUNCTIONS.iter().map(|f| f.name).collect::<Vec<_>>(),
        "every function file is applied to a database that had none recorded"
    );
    // Its functions are now exactly a fresh database's: bodies, owners,
    // grants.
    let upgraded = functions_of(&old);
    assert_ne!(before, upgraded, "the upgrade changed no function body");
    let fresh = test_db().await;
    assert_eq!(upgraded, functions_of(&fresh));
    // And it runs jobs.
    old.open_all();
    let o = run(&old.runtime(), "dot_iu_healthcheck", Mode::Apply, &[]).await;
    assert_eq!(o.status, RunStatus::Applied, "{o:?}");
    // A second run changes nothing.
    let again = migrate(&old.admin_executor(), &old.catalog, RUNTIME_ROLE, true)
        .await
        .unwrap();
    assert!(
        again.applied.is_empty() && again.functions.is_empty(),
        "{again:?}"
    );
}

#[tokio::test]
async fn a_function_file_that_changed_is_applied_again_with_its_grants() {
    let db = test_db().await;
    // As if this build's 40_settle differed from the one the database has:
    // its bodies are replaced, and the grants still hold.
    db.sql("UPDATE dot_schema_functions SET checksum = 'older' WHERE name = '40_settle'");
    db.sql("REVOKE EXECUTE ON FUNCTION fn_dot_iu_refuse(text, text, jsonb, text, text, text, jsonb) FROM govsql_runtime");
    let report = migrate(&db.admin_executor(), &db.catalog, RUNTIME_ROLE, true)
        .await
        .unwrap();
    assert_eq!(report.functions, ["40_settle"], "{report:?}");
    assert!(report.applied.is_empty(), "{report:?}");
    assert_eq!(
        db.sql("SELECT has_function_privilege('govsql_runtime', 'fn_dot_iu_refuse(text, text, jsonb, text, text, text, jsonb)', 'EXECUTE')"),
        "t"
    );
}

#[tokio::test]
async fn a_released_migration_that_changed_is_refused_and_nothing_is_applied() {
    let db = test_db().await;
    db.sql("UPDATE dot_schema_migrations SET checksum = 'edited' WHERE version = '005_dispatcher'");
    db.sql("DELETE FROM dot_schema_functions WHERE name = '30_dispatch'");
    db.sql("DELETE FROM dot_schema_migrations WHERE version = 'demo_003_diag_notify'");
    let err = migrate(&db.admin_executor(), &db.catalog, RUNTIME_ROLE, true)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, MigrateError::Changed(v) if v == &["005_dispatcher"]),
        "{err:?}"
    );
    // Nothing was applied: neither the pending migration nor the function
    // file.
    assert_eq!(
        db.count("dot_schema_migrations WHERE version = 'demo_003_diag_notify'"),
        0
    );
    assert_eq!(
        db.count("dot_schema_functions WHERE name = '30_dispatch'"),
        0
    );
    // The CLI names it and says what to do.
    let out = db.govsql(&["migrate", "--demo"]);
    assert_ne!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("005_dispatcher")
            && text.contains("never edited")
            && text.contains("--rollback"),
        "{text}"
    );
}

#[tokio::test]
async fn two_migrates_of_one_database_take_turns() {
    let db = unmigrated_db();
    let (one, two) = (db.admin_executor(), db.admin_executor());
    let (a, b) = tokio::join!(
        migrate(&one, &db.catalog, RUNTIME_ROLE, true),
        migrate(&two, &db.catalog, RUNTIME_ROLE, true)
    );
    let (a, b) = (a.expect("first"), b.expect("second"));
    let mut applied = [a.applied.clone(), b.applied.clone()].concat();
    applied.sort();
    let mut all: Vec<String> = MIGRATIONS
        .iter()
        .chain(govsql::migrate::DEMO)
        .map(|m| m.version.to_string())
        .collect();
    all.sort();
    assert_eq!(applied, all, "each migration applied once: {a:?} {b:?}");
    assert_eq!(
        a.functions.len() + b.functions.len(),
        FUNCTIONS.len(),
        "{a:?} {b:?}"
    );
}

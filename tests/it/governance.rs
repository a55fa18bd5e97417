//! Governance enforced by PostgreSQL itself, tried as someone who holds
//! the daemon's key would: psql as the runtime role, directly, against the
//! real server. The runtime role can run the dispatcher and nothing else;
//! the dispatcher refuses what govsql refuses, with the ledger row DESIGN.md
//! says; no value reaches the server log.

use govsql::runtime::{Mode, RunStatus};

use crate::harness::*;

/// Runs SQL as the runtime role; (success, stdout, stderr).
fn as_runtime(db: &TestDb, sql: &str) -> (bool, String, String) {
    let o = pg().psql_as(RUNTIME_ROLE, &db.name, sql);
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).trim().to_string(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// One dispatcher call as the runtime role; its `run` record as JSON.
fn dispatch(db: &TestDb, mode: &str, command: &str, params: &str, key: &str) -> serde_json::Value {
    let digest = db.sql("SELECT digest FROM dot_iu_catalog_state");
    let sql = format!(
        "SELECT value FROM fn_dot_iu_dispatch('{mode}', '{command}', $p${params}$p$::jsonb, '{key}', 'mallory', '{digest}', false, 16777216, '{{}}') WHERE kind = 'run'"
    );
    let (ok, out, err) = as_runtime(db, &sql);
    assert!(ok, "{sql}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[tokio::test]
async fn the_runtime_role_can_run_the_dispatcher_and_nothing_else() {
    let db = test_db().await;
    db.open_all();
    // Every governed function, called with arguments of its own types.
    let functions = db.sql(
        "SELECT p.proname || '(' || coalesce((SELECT string_agg('NULL::' || format_type(t, NULL), ', ') FROM unnest(p.proargtypes) AS t), '') || ')' \
         FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace AND p.proname LIKE 'fn\\_iu\\_%' ORDER BY 1",
    );
    let calls: Vec<&str> = functions.lines().collect();
    assert!(calls.len() >= 18, "{calls:?}");
    for call in &calls {
        let (ok, _, err) = as_runtime(&db, &format!("SELECT public.{call}"));
        assert!(!ok && err.contains("permission denied"), "{call}: {err}");
    }
    // The ledger's writer, the ledger, the gates, the catalog, the secret.
    for sql in [
        "SELECT fn_dot_iu_command_log('dot_iu_healthcheck','apply','applied','x',md5('x'),NULL,'{}')",
        "SELECT fn_dot_iu_params_digest('dot_iu_healthcheck', '{}')",
        "SELECT count(*) FROM dot_iu_command_run",
        "INSERT INTO dot_iu_command_run (command_name, run_mode, run_status, actor, params_digest, gate_snapshot, evidence) VALUES ('dot_iu_healthcheck','apply','applied','x',md5('x'),'{}','{}')",
        "UPDATE dot_config SET value = 'true'",
        "SELECT * FROM dot_iu_secret",
        "UPDATE dot_iu_command_catalog SET statements = '{}'",
    ] {
        let (ok, _, err) = as_runtime(&db, sql);
        assert!(!ok && err.contains("permission denied"), "{sql}: {err}");
    }
    // self-test's view of the same: no excess privilege.
    let (ok, out, err) = as_runtime(
        &db,
        "SELECT value FROM fn_dot_iu_status() WHERE kind = 'privilege'",
    );
    assert!(ok, "{err}");
    assert_eq!(out, "", "excess privileges: {out}");
    assert_eq!(db.count("dot_iu_command_run"), 0);
}

#[tokio::test]
async fn the_dispatcher_refuses_what_govsql_refuses_and_records_it() {
    let db = test_db().await;
    db.open_all();
    let create = "dot_iu_create_collection";
    for (params, why) in [
        (r#"{"title": 42}"#, "must be given as a string"),
        (r#"{"nosuch": "x"}"#, "does not declare"),
        (r#"{}"#, "missing required param title"),
        (
            &format!(r#"{{"title": "{}"}}"#, "x".repeat(201)),
            "over its length limit",
        ),
    ] {
        let run = dispatch(&db, "apply", create, params, "k-bad");
        assert_eq!(run["status"], "refused", "{params}: {run}");
        assert_eq!(run["class"], "bad_params");
        assert!(run["reasons"][0].as_str().unwrap().contains(why), "{run}");
    }
    let add = dispatch(
        &db,
        "apply",
        "dot_iu_add_piece",
        r#"{"collection_id": "not-a-uuid", "body": "x"}"#,
        "k-uuid",
    );
    assert_eq!(add["class"], "bad_params");
    // A shut gate: refused, nothing run.
    db.gate("iu_core.composer_enabled", false);
    let shut = dispatch(&db, "apply", create, r#"{"title": "t"}"#, "k-gate");
    assert_eq!(shut["class"], "gate_closed", "{shut}");
    assert_eq!(shut["closed_gates"][0], "iu_core.composer_enabled");
    db.gate("iu_core.composer_enabled", true);
    // A key used once; the same key with other params: a conflict.
    let first = dispatch(&db, "apply", create, r#"{"title": "one"}"#, "k-1");
    assert_eq!(first["status"], "applied", "{first}");
    let again = dispatch(&db, "apply", create, r#"{"title": "one"}"#, "k-1");
    assert_eq!(again["status"], "applied");
    assert_eq!(again["replayed"], true);
    assert_eq!(again["run_id"], first["run_id"]);
    let other = dispatch(&db, "apply", create, r#"{"title": "two"}"#, "k-1");
    assert_eq!(other["class"], "idempotency_conflict", "{other}");
    // verify of a mutating command is an unsafe plan.
    let v = dispatch(&db, "verify", create, r#"{"title": "x"}"#, "k-v");
    assert_eq!(v["class"], "unsafe_plan");
    // Only the one real apply ran; every call has its row.
    assert_eq!(db.count("iu_collection"), 1);
    assert_eq!(
        db.count("dot_iu_command_run WHERE actor = 'mallory' AND run_status = 'refused'"),
        8
    );
    assert_eq!(
        db.count("dot_iu_command_run WHERE actor = 'mallory' AND run_status = 'applied'"),
        1
    );
    // A caller cannot bend the entries: an unknown command cannot be
    // logged, the refuse entry writes refused rows only.
    let (ok, _, err) = as_runtime(
        &db,
        "SELECT * FROM fn_dot_iu_refuse('apply', 'dot_iu_create_collection', '{}', 'k', 'x', 'applied', '{}')",
    );
    assert!(!ok && err.contains("not a refusal class"), "{err}");
    // The one-object form refuses the same, and a field it does not know
    // (a daemon newer than the database's functions) or a call that is
    // not an object, writing nothing.
    let (ok, _, err) = as_runtime(
        &db,
        r#"SELECT * FROM fn_dot_iu_refuse('{"mode": "apply", "command": "dot_iu_create_collection", "params": {}, "key": "k", "actor": "x", "class": "applied", "client": {}}'::jsonb)"#,
    );
    assert!(!ok && err.contains("not a refusal class"), "{err}");
    let before = db.count("dot_iu_command_run");
    for call in [
        r#"'{"mode": "plan", "command": "dot_iu_create_collection", "params": {"title": "t"}, "key": "k2", "actor": "x", "catalog_digest": "", "allow_log_exposure": false, "max_result_bytes": 1000, "client": {}, "max_rows": 1}'"#,
        "'[]'",
    ] {
        let (ok, _, err) = as_runtime(
            &db,
            &format!("SELECT * FROM fn_dot_iu_dispatch({call}::jsonb)"),
        );
        assert!(
            !ok && err.contains("not one object of the fields this database knows"),
            "{call}: {err}"
        );
    }
    assert_eq!(db.count("dot_iu_command_run"), before);
}

#[tokio::test]
async fn a_write_then_raise_commits_nothing_and_an_unexpected_status_rolls_back() {
    let db = test_db().await;
    db.open_all();
    let rt = db.runtime();
    let o = run(&rt, "dot_iu_diag_write_then_fail", Mode::Apply, &[]).await;
    assert_eq!(o.status, RunStatus::Failed, "{o:?}");
    assert!(o.run_id.is_some());
    assert_eq!(db.count("iu_diag_probe"), 0);
    // Soft-deleting a piece that does not exist answers not_found: failed.
    let o = run(
        &rt,
        "dot_iu_delete_piece_soft",
        Mode::Apply,
        &[("piece_id", "00000000-0000-0000-0000-00000000beef")],
    )
    .await;
    assert_eq!(o.status, RunStatus::Failed, "{o:?}");
    assert_eq!(o.class(), Some("unexpected_status"));
    assert_eq!(o.exit_code().code(), 4);
    assert_eq!(
        db.sql(&format!(
            "SELECT run_status || ' ' || (evidence->>'error_class') || ' ' || (evidence->>'answered_status') FROM dot_iu_command_run WHERE run_id = {}",
            o.run_id.unwrap()
        )),
        "failed unexpected_status not_found"
    );
}

#[tokio::test]
async fn no_value_reaches_the_server_log_even_when_it_logs_every_statement() {
    let db = test_db().await;
    db.open_all();
    let log = pg().dir.join("log");
    let canary = "CANARY-srvlog-7c1d";
    let uuid_canary = "cafecafe-0000-4000-8000-00000000c0de";
    // The server logs every statement; the runtime role's own settings
    // must win.
    db.sql("ALTER SYSTEM SET log_statement = 'all'");
    db.sql("SELECT pg_reload_conf()");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let rt = db.runtime();
    let ok = run(
        &rt,
        "dot_iu_create_collection",
        Mode::Apply,
        &[("title", canary)],
    )
    .await;
    assert_eq!(ok.status, RunStatus::Applied, "{ok:?}");
    // A governed function that fails quoting its argument (a foreign key
    // violation names the missing key).
    let payload = format!("{{\"note\": \"{canary}\"}}");
    let fk = run(
        &rt,
        "dot_iu_add_unit",
        Mode::Apply,
        &[
            ("piece_id", uuid_canary),
            ("kind", canary),
            ("payload", &payload),
        ],
    )
    .await;
    assert_eq!(fk.status, RunStatus::Failed, "{fk:?}");
    assert_eq!(fk.class(), Some("23503"));
    let v = run(
        &rt,
        "dot_iu_collection_validate",
        Mode::Verify,
        &[("collection_id", uuid_canary)],
    )
    .await;
    assert_eq!(v.status, RunStatus::Failed, "{v:?}");
    // Control: a statement the admin runs with the canary is logged.
    db.sql("SELECT 'CANARY-control-admin'");
    std::thread::sleep(std::time::Duration::from_millis(300));
    db.sql("ALTER SYSTEM RESET log_statement");
    db.sql("SELECT pg_reload_conf()");
    let text = String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned();
    assert!(
        text.contains("CANARY-control-admin"),
        "the server log is captured"
    );
    assert_eq!(
        text.matches(canary).count(),
        0,
        "the canary is in the server log"
    );
    assert_eq!(
        text.matches(uuid_canary).count(),
        0,
        "the uuid canary is in the server log"
    );
    assert!(!db.ledger_text().contains(canary));
}

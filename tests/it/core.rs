//! The governed runtime against a real PostgreSQL: the seed's durable
//! proof, and one test per guarantee, each able to fail.

use std::sync::Arc;

use govsql::runtime::{Mode, RunStatus};
use govsql::transport::{BoxFuture, Executor, ScriptOutput, ScriptRequest, TransportError};

use crate::harness::*;

#[tokio::test]
async fn seed_durable_proof_p1_to_p4_through_the_cli() {
    let db = test_db().await;
    db.switch(true);
    let p1 = db.govsql(&["plan", "dot_iu_healthcheck", "--direct", "--json"]);
    assert_eq!(p1.status.code(), Some(0));
    assert_eq!(json_of(&p1)["status"], "planned");
    db.gate("iu_core.operator_runtime_enabled", true);
    let p2 = db.govsql(&["apply", "dot_iu_healthcheck", "--direct", "--json"]);
    assert_eq!(p2.status.code(), Some(0), "{}", stdout(&p2));
    assert_eq!(json_of(&p2)["status"], "applied");
    let p3 = db.govsql(&["verify", "dot_iu_healthcheck", "--direct", "--json"]);
    assert_eq!(p3.status.code(), Some(0));
    assert_eq!(json_of(&p3)["status"], "verified");
    db.gate("iu_core.operator_runtime_enabled", false);
    let p4 = db.govsql(&[
        "apply",
        "dot_iu_add_piece",
        "--direct",
        "--json",
        "--param",
        "collection_id=00000000-0000-0000-0000-000000000001",
        "--param",
        "body=x",
    ]);
    assert_eq!(p4.status.code(), Some(3));
    let p4 = json_of(&p4);
    assert_eq!(p4["status"], "refused");
    assert_eq!(p4["error_class"], "gate_closed");
    assert_eq!(
        p4["closed_gates"],
        serde_json::json!([
            "iu_core.composer_enabled",
            "iu_core.operator_runtime_enabled"
        ])
    );

    assert_seed_figures(&db);
    // Every row says how long its run took.
    assert_eq!(
        db.count("dot_iu_command_run WHERE (evidence->>'duration_ms')::bigint >= 0"),
        4
    );
}

#[tokio::test]
async fn plan_never_executes_command_sql() {
    let db = test_db().await;
    db.open_all();
    let rt = db.runtime();
    let o = run(
        &rt,
        "dot_iu_create_collection",
        Mode::Plan,
        &[("title", "t")],
    )
    .await;
    assert_eq!(o.status, RunStatus::Planned, "{o:?}");
    let o = run(&rt, "dot_iu_diag_write_then_fail", Mode::Plan, &[]).await;
    assert_eq!(o.status, RunStatus::Planned, "{o:?}");
    assert!(o.result.is_none());
    assert_eq!(db.count("iu_collection"), 0);
    assert_eq!(db.count("iu_diag_probe"), 0);
    // The same apply does write: the check above can fail.
    let o = run(
        &rt,
        "dot_iu_create_collection",
        Mode::Apply,
        &[("title", "t")],
    )
    .await;
    assert_eq!(o.status, RunStatus::Applied, "{o:?}");
    assert_eq!(db.count("iu_collection"), 1);
}

#[tokio::test]
async fn every_shut_gate_refuses_before_any_command_sql() {
    let db = test_db().await;
    db.switch(true);
    let rt = db.runtime();
    let any = "00000000-0000-0000-0000-000000000001";
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (
            "dot_iu_create_collection",
            &[("title", "x")],
            "iu_core.composer_enabled",
        ),
        (
            "dot_iu_add_piece",
            &[("collection_id", any), ("body", "b")],
            "iu_core.composer_enabled",
        ),
        (
            "dot_iu_diag_write_then_fail",
            &[],
            "iu_core.composer_enabled",
        ),
        (
            "dot_iu_archive_collection",
            &[("collection_id", any)],
            "iu_core.structure_ops_enabled",
        ),
        (
            "dot_iu_delete_piece_soft",
            &[("piece_id", any)],
            "iu_core.structure_ops_enabled",
        ),
        (
            "dot_iu_publish_collection",
            &[("collection_id", any)],
            "iu_core.lifecycle_enabled",
        ),
    ];
    for (cmd, params, gate) in cases {
        // Everything open except the command's own gate.
        db.sql("UPDATE dot_config SET value = 'true'");
        db.gate(gate, false);
        let o = run(&rt, cmd, Mode::Apply, params).await;
        assert_eq!(o.status, RunStatus::Refused, "{cmd}: {o:?}");
        assert_eq!(o.closed_gates, vec![gate.to_string()], "{cmd}");
        // Only the runtime gate shut.
        db.sql("UPDATE dot_config SET value = 'true'");
        db.gate("iu_core.operator_runtime_enabled", false);
        let o = run(&rt, cmd, Mode::Apply, params).await;
        assert_eq!(o.class(), Some("gate_closed"), "{cmd}: {o:?}");
    }
    assert_eq!(db.count("iu_collection"), 0);
    assert_eq!(db.count("iu_diag_probe"), 0);
    assert_eq!(
        db.count("dot_iu_command_run WHERE run_status = 'refused'"),
        2 * cases.len() as i64
    );
    // The local switch refuses too, and is audited.
    db.sql("UPDATE dot_config SET value = 'true'");
    db.switch(false);
    let o = run(
        &rt,
        "dot_iu_create_collection",
        Mode::Apply,
        &[("title", "x")],
    )
    .await;
    assert_eq!(o.class(), Some("kill_switch"));
    assert!(o.run_id.is_some());
    assert_eq!(db.count("iu_collection"), 0);
}

/// Delegates to the local executor, but runs a hook before an apply's
/// dispatcher call, or breaks it (once).
struct Intercept {
    inner: govsql::transport::local::LocalExecutor,
    before_apply: Box<dyn Fn() + Send + Sync>,
    /// Break the next apply call (once).
    break_apply: std::sync::atomic::AtomicBool,
}

impl Executor for Intercept {
    fn run(&self, req: ScriptRequest) -> BoxFuture<'_, Result<ScriptOutput, TransportError>> {
        let is_apply =
            req.text.contains("fn_dot_iu_dispatch(") && req.text.contains(r#""mode":"apply""#);
        if is_apply {
            (self.before_apply)();
            if self
                .break_apply
                .swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                return Box::pin(async { Err(TransportError::Lost("injected fault".into())) });
            }
        }
        self.inner.run(req)
    }
    fn kind(&self) -> &'static str {
        "local"
    }
}

#[tokio::test]
async fn gate_shut_between_snapshot_and_apply_is_refused_inside_the_transaction() {
    let db = test_db().await;
    db.open_all();
    let name = db.name.clone();
    let exec = Intercept {
        inner: db.executor(),
        before_apply: Box::new(move || {
            pg().admin(
                &name,
                "UPDATE dot_config SET value = 'false' WHERE key = 'iu_core.composer_enabled'",
            );
        }),
        break_apply: false.into(),
    };
    let rt = db.runtime_with(Arc::new(exec));
    let o = run(
        &rt,
        "dot_iu_create_collection",
        Mode::Apply,
        &[("title", "x")],
    )
    .await;
    assert_eq!(o.status, RunStatus::Refused, "{o:?}");
    assert_eq!(o.class(), Some("gate_closed"));
    assert_eq!(o.closed_gates, vec!["iu_core.composer_enabled".to_string()]);
    assert_eq!(db.count("iu_collection"), 0);
}

#[tokio::test]
async fn executor_fault_mid_apply_is_settled_by_running_it_again_once() {
    // The transport breaks on the apply call: its outcome is unknown. The
    // same path runs again (the key's lock waits for any orphan), and the
    // job is applied exactly once.
    let db = test_db().await;
    db.open_all();
    let exec = Arc::new(Intercept {
        inner: db.executor(),
        before_apply: Box::new(|| {}),
        break_apply: true.into(),
    });
    let rt = db.runtime_with(exec.clone());
    let o = run(
        &rt,
        "dot_iu_create_collection",
        Mode::Apply,
        &[("title", "x")],
    )
    .await;
    assert_eq!(o.status, RunStatus::Applied, "{o:?}");
    assert!(o.run_id.is_some());
    assert!(
        !exec.break_apply.load(std::sync::atomic::Ordering::SeqCst),
        "the fault was injected"
    );
    assert_eq!(db.count("iu_collection"), 1);
    assert_eq!(db.count("dot_iu_command_run"), 1);
}

#[tokio::test]
async fn unknown_command_is_refused_locally_without_a_ledger_row() {
    let db = test_db().await;
    let out = db.govsql(&["apply", "dot_no_such", "--direct", "--json"]);
    assert_eq!(out.status.code(), Some(3));
    let j = json_of(&out);
    assert_eq!(j["error_class"], "unknown_command");
    assert!(j["message"].as_str().unwrap().contains("catalog list"));
    assert_eq!(db.count("dot_iu_command_run"), 0);
    // The runtime role cannot write the ledger itself; the dispatcher
    // refuses an uncatalogued name (it cannot be logged).
    let o = pg().psql_as(
        RUNTIME_ROLE,
        &db.name,
        "SELECT fn_dot_iu_command_log('dot_no_such','plan','planned','x','49da86d02e2dd734daabca2afc78ff92',NULL,'{}')",
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("permission denied"));
    let o = pg().psql_as(
        RUNTIME_ROLE,
        &db.name,
        "SELECT * FROM fn_dot_iu_dispatch('plan','dot_no_such','{}','k','x','',false,1000,'{}')",
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not in the catalog"));
    assert_eq!(db.count("dot_iu_command_run"), 0);
}

#[tokio::test]
async fn unsafe_catalog_statement_is_refused_at_load() {
    let text = std::fs::read_to_string(catalog_path()).unwrap().replace(
        "SELECT public.fn_iu_collection_healthcheck()\"]",
        "SELECT public.fn_iu_collection_healthcheck(); DELETE FROM iu_piece\"]",
    );
    let err = govsql::catalog::Catalog::from_toml(&text)
        .unwrap_err()
        .to_string();
    assert!(err.contains("guard"), "{err}");
}

#[tokio::test]
async fn idempotent_rerun_inserts_no_row_and_returns_the_same_run_id() {
    let db = test_db().await;
    db.open_all();
    let rt = db.runtime();
    let mut j = job(
        "dot_iu_create_collection",
        Mode::Apply,
        &[("title", "once")],
    );
    j.idempotency_key = "op-42".into();
    let first = rt.run(&j).await;
    assert_eq!(first.status, RunStatus::Applied, "{first:?}");
    let rows_before = db.count("dot_iu_command_run");
    j.job_id = govsql::job::JobId::new();
    let second = rt.run(&j).await;
    assert_eq!(second.status, RunStatus::Applied);
    assert_eq!(second.run_id, first.run_id);
    assert!(second.result.is_none(), "a replay returns no result");
    assert_eq!(db.count("dot_iu_command_run"), rows_before);
    assert_eq!(db.count("iu_collection"), 1);
    // Same key, other params: refused as a conflict, nothing runs.
    let mut other = job(
        "dot_iu_create_collection",
        Mode::Apply,
        &[("title", "other")],
    );
    other.idempotency_key = "op-42".into();
    let o = rt.run(&other).await;
    assert_eq!(o.status, RunStatus::Refused);
    assert_eq!(o.class(), Some("idempotency_conflict"));
    assert_eq!(db.count("iu_collection"), 1);
    // The same holds for plan rows.
    let mut p = job("dot_iu_healthcheck", Mode::Plan, &[]);
    p.idempotency_key = "plan-1".into();
    let a = rt.run(&p).await;
    let b = rt.run(&p).await;
    assert_eq!(a.run_id, b.run_id);
    assert_eq!(
        db.count("dot_iu_command_run WHERE idempotency_key = 'plan-1'"),
        1
    );
}

#[tokio::test]
async fn a_function_that_writes_then_raises_commits_nothing_and_is_failed() {
    let db = test_db().await;
    db.open_all();
    let rt = db.runtime();
    let o = run(&rt, "dot_iu_diag_write_then_fail", Mode::Apply, &[]).await;
    assert_eq!(o.status, RunStatus::Failed, "{o:?}");
    assert_eq!(o.class(), Some("IU500"));
    assert_eq!(db.count("iu_diag_probe"), 0);
    assert_eq!(
        db.sql("SELECT run_status, evidence->>'error_class' FROM dot_iu_command_run"),
        "failed|IU500"
    );
}

#[tokio::test]
async fn runtime_role_cannot_touch_the_ledger_or_gates_directly() {
    let db = test_db().await;
    db.open_all();
    run(&db.runtime(), "dot_iu_healthcheck", Mode::Apply, &[]).await;
    for sql in [
        "UPDATE dot_iu_command_run SET run_status = 'applied'",
        "DELETE FROM dot_iu_command_run",
        "SELECT * FROM dot_iu_command_run",
        "INSERT INTO dot_iu_command_run (command_name) VALUES ('x')",
        "UPDATE dot_config SET value = 'true'",
        "SELECT * FROM iu_piece",
        "TRUNCATE dot_iu_command_run",
    ] {
        let out = pg().psql_as(RUNTIME_ROLE, &db.name, sql);
        assert!(!out.status.success(), "{sql} should be refused");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("permission denied"),
            "{sql}"
        );
    }
    // Even the owner cannot rewrite history.
    let out = pg().psql_as(
        "postgres",
        &db.name,
        "UPDATE dot_iu_command_run SET actor = 'x'",
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("append-only"));
    assert_eq!(db.count("dot_iu_command_run"), 1);
}

#[tokio::test]
async fn verify_runs_read_only_and_reports_failed_checks() {
    // A catalog that mis-declares a writing function as read-only: the
    // READ ONLY transaction still stops the write.
    let text = std::fs::read_to_string(catalog_path()).unwrap().replace(
        "fn_iu_collection_create = \"iu_core.composer_enabled\"",
        "fn_iu_collection_create = \"\"",
    );
    let text = text.replacen(
        "name = \"dot_iu_create_collection\"\ncategory = \"composer\"\ndescription = \"Create a collection.\"\nmutating = true\n",
        "name = \"dot_iu_create_collection\"\ncategory = \"composer\"\ndescription = \"Create a collection.\"\nmutating = false\n",
        1,
    );
    let db = test_db_with(&text, 10).await;
    db.open_all();
    let rt = db.runtime();
    let o = run(
        &rt,
        "dot_iu_create_collection",
        Mode::Verify,
        &[("title", "x")],
    )
    .await;
    assert_eq!(o.status, RunStatus::Failed, "{o:?}");
    assert_eq!(o.class(), Some("25006"));
    assert_eq!(db.count("iu_collection"), 0);
    // A check whose status is not ok: failed, verification_failed.
    let o = run(
        &rt,
        "dot_iu_collection_validate",
        Mode::Verify,
        &[("collection_id", "00000000-0000-0000-0000-000000000009")],
    )
    .await;
    assert_eq!(o.status, RunStatus::Failed);
    assert_eq!(o.class(), Some("verification_failed"));
    assert_eq!(result_json(&o)["status"], "not_found");
    assert_eq!(
        db.sql("SELECT evidence->>'error_class' FROM dot_iu_command_run WHERE run_mode = 'verify' AND run_status = 'failed' AND evidence->>'error_class' = 'verification_failed'"),
        "verification_failed"
    );
    // Verify refuses a command declared mutating.
    let o = run(
        &rt,
        "dot_iu_add_piece",
        Mode::Verify,
        &[
            ("collection_id", "00000000-0000-0000-0000-000000000009"),
            ("body", "b"),
        ],
    )
    .await;
    assert_eq!(o.status, RunStatus::Refused);
    assert_eq!(o.class(), Some("unsafe_plan"));
}

#[tokio::test]
async fn catalog_drift_refuses_apply() {
    let db = test_db().await;
    db.open_all();
    db.sql("UPDATE dot_iu_catalog_state SET digest = 'sha256:other'");
    let o = run(
        &db.runtime(),
        "dot_iu_create_collection",
        Mode::Apply,
        &[("title", "x")],
    )
    .await;
    assert_eq!(o.status, RunStatus::Refused);
    assert_eq!(o.class(), Some("catalog_drift"));
    assert_eq!(db.count("iu_collection"), 0);
}

#[tokio::test]
async fn approval_required_command_is_refused_in_direct_mode() {
    let db = test_db().await;
    db.open_all();
    let o = run(
        &db.runtime(),
        "dot_iu_purge_piece",
        Mode::Apply,
        &[("piece_id", "00000000-0000-0000-0000-000000000009")],
    )
    .await;
    assert_eq!(o.status, RunStatus::Refused);
    assert_eq!(o.class(), Some("approval_missing"));
    assert!(o.run_id.is_some());
}

#[tokio::test]
async fn no_param_value_reaches_ledger_evidence_logs_or_errors() {
    let db = test_db().await;
    db.open_all();
    let canary = "CANARY-f00d-4e11";
    let coll = db.govsql(&[
        "apply",
        "dot_iu_create_collection",
        "--direct",
        "--json",
        "--param",
        &format!("title={canary}"),
    ]);
    let coll_json = json_of(&coll);
    let id = result_json_value(&coll_json)["collection_id"]
        .as_str()
        .unwrap()
        .to_string();
    let outputs = [
        coll,
        db.govsql(&[
            "apply",
            "dot_iu_add_piece",
            "--direct",
            "--json",
            "--param",
            &format!("collection_id={id}"),
            "--param",
            &format!("body={canary}"),
        ]),
        db.govsql(&[
            "plan",
            "dot_iu_add_piece",
            "--direct",
            "--param",
            &format!("collection_id={id}"),
            "--param",
            &format!("body={canary}"),
        ]),
        // Refusals: bad type, unknown param, over length, NUL-free but bad uuid.
        db.govsql(&[
            "apply",
            "dot_iu_add_piece",
            "--direct",
            "--param",
            &format!("collection_id={canary}"),
            "--param",
            "body=x",
        ]),
        db.govsql(&[
            "apply",
            "dot_iu_add_piece",
            "--direct",
            "--param",
            &format!("nosuch={canary}"),
        ]),
        db.govsql(&[
            "apply",
            "dot_iu_create_collection",
            "--direct",
            "--param",
            &format!("title={}", canary.repeat(20)),
        ]),
        db.govsql(&[
            "verify",
            "--direct",
            "--param",
            &format!("collection_id={canary}"),
        ]),
    ];
    for (i, o) in outputs.iter().enumerate() {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !err.contains(canary),
            "stderr of call {i} leaks the value: {err}"
        );
        assert!(
            err.contains("DEBUG") || err.contains("INFO") || err.contains("WARN") || i >= 3,
            "logging is on: {err}"
        );
        if i >= 2 {
            assert!(
                !stdout(o).contains(canary),
                "stdout of call {i} leaks: {}",
                stdout(o)
            );
        }
    }
    // The submitter's own result may show its data; the ledger never does.
    let ledger = db.ledger_text();
    assert!(db.count("dot_iu_command_run") >= 7);
    assert!(!ledger.contains(canary), "ledger leaks: {ledger}");
    // The digest is keyed by the database's secret (DESIGN.md's format):
    // the Rust computation with the secret matches the ledger, and without
    // it a value cannot be guessed from the ledger.
    let secret = db.sql("SELECT secret FROM dot_iu_secret");
    assert_eq!(secret.len(), 64);
    let pairs = [("title".to_string(), canary.to_string())];
    let keyed = govsql::params::keyed_digest(&secret, "dot_iu_create_collection", &pairs);
    assert!(ledger.contains(&keyed), "{keyed} not in {ledger}");
    let unkeyed = govsql::params::keyed_digest("", "dot_iu_create_collection", &pairs);
    assert!(!ledger.contains(&unkeyed));
    assert_eq!(
        db.sql(&format!(
            "SELECT fn_dot_iu_params_digest('dot_iu_create_collection', '{{\"title\": \"{canary}\"}}')"
        )),
        keyed
    );
}

fn result_json_value(j: &serde_json::Value) -> serde_json::Value {
    serde_json::from_str(j["result"][0][0].as_str().unwrap()).unwrap()
}

#[tokio::test]
async fn migrate_is_idempotent_and_rollback_is_clean() {
    let db = test_db().await;
    let exec = db.admin_executor();
    let again = govsql::migrate::migrate(&exec, &db.catalog, RUNTIME_ROLE, true)
        .await
        .unwrap();
    assert!(again.applied.is_empty(), "{again:?}");
    assert!(again.functions.is_empty(), "{again:?}");
    let all = govsql::migrate::MIGRATIONS.len() + govsql::migrate::DEMO.len();
    assert_eq!(again.present.len(), all);
    let updated = db.sql("SELECT count(*) FROM dot_iu_command_catalog WHERE updated_at > now() - interval '0 seconds'");
    assert_eq!(updated, "0", "a second seed changes nothing");
    // Rollback drops everything; then the migration re-applies.
    govsql::migrate::rollback(&exec).await.unwrap();
    assert_eq!(
        db.sql("SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public'"),
        "0"
    );
    assert_eq!(db.sql("SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public'"), "0");
    let back = govsql::migrate::migrate(&exec, &db.catalog, RUNTIME_ROLE, true)
        .await
        .unwrap();
    assert_eq!(back.applied.len(), all);
    // With ledger rows, the rollback refuses and keeps everything.
    db.open_all();
    run(&db.runtime(), "dot_iu_healthcheck", Mode::Plan, &[]).await;
    let err = govsql::migrate::rollback(&exec)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("GV008"), "{err}");
    assert_eq!(db.count("dot_iu_command_run"), 1);
}

#[tokio::test]
async fn catalog_check_confirms_targets_and_digest() {
    let db = test_db().await;
    let ok = db.govsql(&["catalog", "check"]);
    assert_eq!(ok.status.code(), Some(0), "{}", stdout(&ok));
    let n = db.catalog.commands().len();
    assert!(
        stdout(&ok).contains(&format!("{n} of {n}")),
        "{}",
        stdout(&ok)
    );
    db.sql("DROP FUNCTION fn_iu_purge_piece(uuid)");
    let bad = db.govsql(&["catalog", "check"]);
    assert_eq!(bad.status.code(), Some(4));
    assert!(
        stdout(&bad).contains("unavailable (refused with target_missing): dot_iu_purge_piece"),
        "{}",
        stdout(&bad)
    );
}

#[tokio::test]
async fn retired_commands_are_kept_not_deleted() {
    let db = test_db().await;
    let text = std::fs::read_to_string(catalog_path()).unwrap();
    let start = text
        .find("[[command]]\nname = \"dot_iu_healthcheck_block\"")
        .unwrap();
    let end = start + text[start..].find("\n\n").unwrap();
    let smaller = format!("{}{}", &text[..start], &text[end + 2..]);
    let cat = govsql::catalog::Catalog::from_toml(&smaller).unwrap();
    govsql::migrate::migrate(&db.admin_executor(), &cat, RUNTIME_ROLE, true)
        .await
        .unwrap();
    assert_eq!(db.sql("SELECT retired FROM dot_iu_command_catalog WHERE command_name = 'dot_iu_healthcheck_block'"), "t");
    assert_eq!(
        db.sql("SELECT digest FROM dot_iu_catalog_state"),
        cat.digest()
    );
}

#[tokio::test]
async fn a_database_that_went_away_fails_clearly_and_nothing_runs() {
    let db = test_db().await;
    db.open_all();
    // The database disappears under the target.
    let text = std::fs::read_to_string(&db.config_path).unwrap().replace(
        &format!("db_name = \"{}\"", db.name),
        "db_name = \"gone_away\"",
    );
    std::fs::write(&db.config_path, text).unwrap();
    for args in [
        &["verify", "--direct", "--json"][..],
        &[
            "apply",
            "dot_iu_create_collection",
            "--param",
            "title=x",
            "--direct",
            "--json",
        ],
    ] {
        let out = db.govsql(args);
        assert_eq!(out.status.code(), Some(4), "{args:?}");
        let j = json_of(&out);
        assert_eq!(j["status"], "failed");
        assert_eq!(j["error_class"], "db_unavailable");
        assert!(j["run_id"].is_null());
        let msg = j["message"].as_str().unwrap();
        assert!(
            msg.contains("database gone_away does not exist on that server: check db_name"),
            "{msg}"
        );
        // psql's own line is there too.
        assert!(msg.contains("FATAL"), "{msg}");
    }
    assert_eq!(db.count("iu_collection"), 0);
}

#[tokio::test]
async fn a_target_psql_cannot_reach_is_told_its_cause() {
    let db = test_db().await;
    let original = std::fs::read_to_string(&db.config_path).unwrap();
    let port = format!("db_port = {}", pg().port);
    for (from, to, want) in [
        (
            port.as_str(),
            "db_port = 1",
            "nothing accepts connections at db_host/db_port",
        ),
        (
            "db_user = \"govsql_runtime\"",
            "db_user = \"ghost\"",
            "role ghost does not exist on that server",
        ),
        (
            "psql = \"",
            "psql = \"/nonexistent/bin/psql\"\n# was: \"",
            "cannot start /nonexistent/bin/psql",
        ),
    ] {
        assert!(original.contains(from), "{from} not in the config");
        std::fs::write(&db.config_path, original.replacen(from, to, 1)).unwrap();
        let out = db.govsql(&["verify", "--direct", "--json"]);
        let j = json_of(&out);
        assert_eq!(j["status"], "failed", "{j}");
        let msg = j["message"].as_str().unwrap();
        assert!(msg.contains(want), "{to}: {msg}");
    }
}

#[tokio::test]
async fn the_apply_switch_can_be_scoped_and_a_failed_apply_disarms_it() {
    let db = test_db().await;
    db.sql("UPDATE dot_config SET value = 'true'");
    let apply = |title: &str| {
        let out = db.govsql(&[
            "apply",
            "dot_iu_create_collection",
            "--direct",
            "--json",
            "--param",
            &format!("title={title}"),
        ]);
        json_of(&out)
    };
    // --once: exactly one apply passes, whatever comes after.
    let on = db.govsql(&["switch", "on", "--once"]);
    assert!(stdout(&on).contains("next apply only"), "{}", stdout(&on));
    assert_eq!(apply("first")["status"], "applied");
    let second = apply("second");
    assert_eq!(second["error_class"], "kill_switch", "{second}");
    assert!(stdout(&db.govsql(&["switch", "status"])).contains("off"));
    // --for: on for a while, and it says until when.
    let on = db.govsql(&["switch", "on", "--for", "1h"]);
    assert!(stdout(&on).contains("s more"), "{}", stdout(&on));
    assert_eq!(apply("third")["status"], "applied");
    assert_eq!(apply("fourth")["status"], "applied");
    let bad = db.govsql(&["switch", "on", "--for", "soon"]);
    assert_eq!(bad.status.code(), Some(2));
    // disarm_on_failure: a failed apply turns the switch off.
    let text = std::fs::read_to_string(&db.config_path).unwrap();
    std::fs::write(
        &db.config_path,
        text.replacen("[daemon]\n", "[daemon]\ndisarm_on_failure = true\n", 1),
    )
    .unwrap();
    let failed =
        json_of(&db.govsql(&["apply", "dot_iu_diag_write_then_fail", "--direct", "--json"]));
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(stdout(&db.govsql(&["switch", "status"])).contains("off"));
    assert_eq!(apply("fifth")["error_class"], "kill_switch");
    // A switch file that cannot be read: unreadable (never "off"), and
    // applies are refused.
    let file = db.config.daemon.state_dir.join(govsql::switch::SWITCH_FILE);
    std::fs::remove_file(&file).unwrap();
    std::fs::create_dir(&file).unwrap();
    let status = stdout(&db.govsql(&["switch", "status"]));
    assert!(status.contains("unreadable:"), "{status}");
    assert_eq!(apply("sixth")["error_class"], "kill_switch");
    assert_eq!(db.count("iu_collection"), 3);
}

#[tokio::test]
async fn migrate_names_targets_that_do_not_resolve_and_can_mark_them_unavailable() {
    let db = test_db().await;
    // A second, empty database on the same cluster, migrated without the
    // demo schema: no governed function exists there.
    let bare = format!("{}_bare", db.name);
    pg().admin("postgres", &format!("CREATE DATABASE {bare}"));
    let text = std::fs::read_to_string(&db.config_path).unwrap().replace(
        &format!("db_name = \"{}\"", db.name),
        &format!("db_name = \"{bare}\""),
    );
    std::fs::write(&db.config_path, text).unwrap();
    let out = db.govsql(&["migrate"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("do not resolve")
            && err.contains("dot_iu_healthcheck")
            && err.contains("--allow-missing"),
        "{err}"
    );
    let out = db.govsql(&["migrate", "--allow-missing"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Such a command is refused with target_missing, never a 42883 failure.
    pg().admin(&bare, "UPDATE dot_config SET value = 'true'");
    db.switch(true);
    let j = json_of(&db.govsql(&["apply", "dot_iu_healthcheck", "--direct", "--json"]));
    assert_eq!(j["status"], "refused", "{j}");
    assert_eq!(j["error_class"], "target_missing");
    let j = json_of(&db.govsql(&["verify", "--direct", "--json"]));
    assert_eq!(j["error_class"], "target_missing", "{j}");
    let check = db.govsql(&["catalog", "check"]);
    assert_eq!(check.status.code(), Some(4));
    assert!(
        stdout(&check).contains("unavailable (refused with target_missing): dot_iu_healthcheck")
    );
}

#[tokio::test]
async fn self_test_fails_when_the_runtime_role_can_do_more() {
    let db = test_db().await;
    let ok = db.govsql(&["self-test"]);
    let text = stdout(&ok);
    assert_eq!(ok.status.code(), Some(0), "{text}");
    assert!(
        text.contains("may call the dispatcher and nothing else"),
        "{text}"
    );
    assert!(
        text.contains("no statement, parameter or error statement"),
        "{text}"
    );
    // The same target as a superuser: self-test says so and fails.
    let cfg = std::fs::read_to_string(&db.config_path).unwrap().replace(
        &format!("db_user = \"{RUNTIME_ROLE}\""),
        "db_user = \"postgres\"",
    );
    std::fs::write(&db.config_path, cfg).unwrap();
    let bad = db.govsql(&["self-test"]);
    let text = stdout(&bad);
    assert_eq!(bad.status.code(), Some(4), "{text}");
    assert!(text.contains("is a superuser"), "{text}");
}

#[tokio::test]
async fn a_result_over_max_result_bytes_fails_whole_and_the_terminal_sees_no_escapes() {
    let db = test_db().await;
    db.open_all();
    let text = std::fs::read_to_string(&db.config_path).unwrap();
    std::fs::write(&db.config_path, format!("{text}max_result_bytes = 4000\n")).unwrap();
    let big = json_of(&db.govsql(&[
        "apply",
        "dot_iu_diag_blob",
        "--param",
        "bytes=5000",
        "--direct",
        "--json",
    ]));
    assert_eq!(big["status"], "failed", "{big}");
    assert_eq!(big["error_class"], "result_too_large");
    assert!(
        big["result"].is_null() && big["run_id"].is_number(),
        "{big}"
    );
    let small = json_of(&db.govsql(&[
        "apply",
        "dot_iu_diag_blob",
        "--param",
        "bytes=100",
        "--direct",
        "--json",
    ]));
    assert_eq!(small["status"], "applied", "{small}");
    // A value holding a terminal escape is shown escaped, never raw.
    let echo = db.govsql(&[
        "apply",
        "dot_iu_diag_echo",
        "--param",
        "value=\u{1b}[2Jboom\rX",
        "--direct",
    ]);
    let out = stdout(&echo);
    assert!(!out.contains('\u{1b}') && !out.contains('\r'), "{out:?}");
    assert!(out.contains("\\u{1b}[2Jboom\\rX"), "{out}");
}

#[tokio::test]
async fn each_statement_runs_once_per_job() {
    // The dispatcher wraps a statement to read its status; a flattened
    // wrapper ran a STABLE function once per mention (three times).
    let db = test_db().await;
    pg().admin(
        "postgres",
        &format!("ALTER DATABASE {} SET track_functions = 'all'", db.name),
    );
    let rt = db.runtime_with(std::sync::Arc::new(db.executor_with_mode(false)));
    let o = run(&rt, "dot_iu_healthcheck", Mode::Verify, &[]).await;
    assert_eq!(o.status, RunStatus::Verified, "{o:?}");
    let calls = || {
        pg().admin(
            &db.name,
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions WHERE funcname = 'fn_iu_collection_healthcheck'",
        )
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while calls() == "0" && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(calls(), "1", "the job's one statement ran more than once");
}

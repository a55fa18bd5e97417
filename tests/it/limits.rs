//! Limits an apply meets inside its own transaction: the command's row cap
//! (`max_rows`, counted by PostgreSQL's transaction statistics) and freeze
//! windows (`govsql freeze`), checked just before the commit.

use std::time::Duration;

use govsql::runtime::{Mode, RunStatus};

use crate::harness::*;

/// `dot_iu_diag_touch_rows` (max_rows 10): inserts `rows` probe rows.
async fn touch_rows(rt: &govsql::runtime::Runtime, mode: Mode, rows: u32) -> govsql::job::Outcome {
    run(
        rt,
        "dot_iu_diag_touch_rows",
        mode,
        &[("rows", &rows.to_string()), ("sleep_ms", "0")],
    )
    .await
}

#[tokio::test]
async fn an_apply_over_its_row_cap_is_rolled_back_and_fails_row_cap() {
    let db = test_db().await;
    db.open_all();
    let rt = db.runtime();
    let over = touch_rows(&rt, Mode::Apply, 11).await;
    assert_eq!(over.status, RunStatus::Failed, "{over:?}");
    assert_eq!(over.class(), Some("row_cap"), "{over:?}");
    assert_eq!(over.exit_code().code(), 4);
    assert!(over.message.contains("max_rows (10)"), "{}", over.message);
    assert_eq!(db.count("iu_diag_probe"), 0, "nothing of it committed");
    let e = db.evidence(over.run_id.unwrap());
    assert_eq!(e["error_class"], "row_cap");
    assert_eq!(e["max_rows"], 10);
    assert_eq!(e["rows_changed"], 11, "{e}");
    assert_eq!(
        e["rows_by_table"]["public.iu_diag_probe"]["inserted"], 11,
        "{e}"
    );

    let at = touch_rows(&rt, Mode::Apply, 10).await;
    assert_eq!(at.status, RunStatus::Applied, "{at:?}");
    assert_eq!(db.count("iu_diag_probe"), 10);
    let e = db.evidence(at.run_id.unwrap());
    assert_eq!(e["rows_changed"], 10, "{e}");
    assert_eq!(
        e["rows_by_table"],
        serde_json::json!({"public.iu_diag_probe": {"inserted": 10, "updated": 0, "deleted": 0}})
    );
}

#[tokio::test]
async fn every_apply_counts_its_rows_per_table_in_evidence() {
    let db = test_db().await;
    db.open_all();
    let rt = db.runtime();
    // A shipped command: its counts are the rows it left.
    let o = run(
        &rt,
        "dot_iu_create_collection",
        Mode::Apply,
        &[("title", "counted")],
    )
    .await;
    assert_eq!(o.status, RunStatus::Applied, "{o:?}");
    let e = db.evidence(o.run_id.unwrap());
    let by_table = e["rows_by_table"].as_object().unwrap();
    let total: i64 = by_table
        .values()
        .map(|t| {
            ["inserted", "updated", "deleted"]
                .iter()
                .map(|k| t[k].as_i64().unwrap())
                .sum::<i64>()
        })
        .sum();
    assert_eq!(e["rows_changed"].as_i64(), Some(total), "{e}");
    assert_eq!(
        by_table["public.iu_collection"]["inserted"], 1,
        "one collection row: {e}"
    );
    assert_eq!(e["max_rows"], serde_json::Value::Null);

    // Rows a governed function inserted in a subtransaction it rolled back
    // are counted too (PostgreSQL counts rows touched): the count is never
    // below what commits, so a cap can only stop more, never let more by.
    let o = run(
        &rt,
        "dot_iu_diag_touch_rows_undone",
        Mode::Apply,
        &[("rows", "4"), ("undone", "3")],
    )
    .await;
    assert_eq!(o.status, RunStatus::Applied, "{o:?}");
    assert_eq!(db.count("iu_diag_probe"), 4);
    let e = db.evidence(o.run_id.unwrap());
    assert_eq!(
        e["rows_by_table"]["public.iu_diag_probe"]["inserted"], 7,
        "{e}"
    );

    // plan shows the cap.
    let p = touch_rows(&rt, Mode::Plan, 1).await;
    assert_eq!(p.status, RunStatus::Planned, "{p:?}");
    assert!(p.message.contains("at most 10 row(s)"), "{}", p.message);
    assert_eq!(db.evidence(p.run_id.unwrap())["max_rows"], 10);
}

/// Runs the CLI; panics unless it exits 0; its stdout.
fn govsql_ok(db: &TestDb, args: &[&str]) -> String {
    let o = db.govsql(args);
    assert!(
        o.status.success(),
        "govsql {args:?}: {}{}",
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    stdout(&o)
}

#[tokio::test]
async fn a_freeze_window_refuses_the_applies_it_covers_until_it_is_removed() {
    let db = test_db().await;
    db.open_all();
    db.switch(true);
    let rt = db.runtime();
    let added: serde_json::Value = serde_json::from_str(&govsql_ok(
        &db,
        &[
            "freeze",
            "add",
            "--from",
            "now",
            "--until",
            "+1h",
            "--category",
            "composer",
            "--reason",
            "year-end close",
            "--json",
        ],
    ))
    .unwrap();
    let id = added["id"].as_i64().unwrap();
    assert_eq!(added["active"], true, "{added}");
    assert_eq!(added["scope"], serde_json::json!({"category": "composer"}));

    let o = run(
        &rt,
        "dot_iu_create_collection",
        Mode::Apply,
        &[("title", "t")],
    )
    .await;
    assert_eq!(o.status, RunStatus::Refused, "{o:?}");
    assert_eq!(o.class(), Some("frozen"));
    assert_eq!(o.exit_code().code(), 3);
    assert_eq!(db.count("iu_collection"), 0);
    let e = db.evidence(o.run_id.unwrap());
    assert_eq!(e["freeze_ids"], serde_json::json!([id]), "{e}");
    // plan says so; another category is not covered.
    let p = run(
        &rt,
        "dot_iu_create_collection",
        Mode::Plan,
        &[("title", "t")],
    )
    .await;
    assert!(p.message.contains("freeze window"), "{}", p.message);
    let collection = db.sql("SELECT collection_id FROM iu_collection LIMIT 1");
    assert!(collection.is_empty());

    // Neither the runtime role nor anyone but the admin can write a window.
    for sql in [
        "INSERT INTO dot_iu_freeze (starts_at, ends_at, reason, created_by) VALUES (now(), now() + interval '1 h', 'x', 'x')",
        "UPDATE dot_iu_freeze SET removed_at = now(), removed_by = 'mallory'",
        "SELECT count(*) FROM dot_iu_freeze",
    ] {
        let out = pg().psql_as(RUNTIME_ROLE, &db.name, sql);
        assert!(!out.status.success(), "the runtime role ran {sql}");
    }

    let list = govsql_ok(&db, &["freeze", "list"]);
    assert!(
        list.contains("ACTIVE") && list.contains("year-end close"),
        "{list}"
    );
    let removed = govsql_ok(
        &db,
        &[
            "freeze",
            "remove",
            &id.to_string(),
            "--reason",
            "close done",
        ],
    );
    assert!(removed.contains("close done"), "{removed}");
    let again = db.govsql(&["freeze", "remove", &id.to_string(), "--reason", "twice"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("no live freeze window"),
        "{again:?}"
    );
    let all: serde_json::Value =
        serde_json::from_str(&govsql_ok(&db, &["freeze", "list", "--all", "--json"])).unwrap();
    assert_eq!(all[0]["removed_reason"], "close done", "{all}");
    assert_eq!(all[0]["removed_by"], all[0]["created_by"]);

    let o = run(
        &rt,
        "dot_iu_create_collection",
        Mode::Apply,
        &[("title", "t")],
    )
    .await;
    assert_eq!(o.status, RunStatus::Applied, "{o:?}");

    // Bad input says what to give, and adds nothing.
    let bad = db.govsql(&[
        "freeze", "add", "--from", "tomorrow", "--until", "+1h", "--reason", "r",
    ]);
    assert_eq!(bad.status.code(), Some(2), "a usage error");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("RFC 3339"),
        "{bad:?}"
    );
    let bad = db.govsql(&[
        "freeze", "add", "--from", "+2h", "--until", "+1h", "--reason", "r",
    ]);
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("end after it starts"),
        "{bad:?}"
    );
    assert_eq!(db.count("dot_iu_freeze"), 1);
}

/// An apply that started before a window and would commit inside it is
/// refused at its commit: its statements ran, and nothing of them stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_that_would_commit_inside_a_window_that_began_while_it_ran_is_refused() {
    let db = test_db().await;
    db.open_all();
    db.switch(true);
    let rt = std::sync::Arc::new(db.runtime());
    let j = job(
        "dot_iu_diag_touch_rows",
        Mode::Apply,
        &[("rows", "3"), ("sleep_ms", "3000")],
    );
    let tag = format!("govsql:{}", j.job_id);
    let running = {
        let (rt, j) = (rt.clone(), j.clone());
        tokio::spawn(async move { rt.run(&j).await })
    };
    // Its statements are running (asleep in the function) before any
    // window exists; then one is added that starts a second later.
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(20),
        || {
            db.sql(&format!(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{tag}' AND wait_event = 'PgSleep'"
            )) == "1"
        },
        || "the apply never reached its function".into(),
    );
    govsql_ok(
        &db,
        &[
            "freeze",
            "add",
            "--from",
            "+1s",
            "--until",
            "+1h",
            "--command",
            "dot_iu_diag_touch_rows",
            "--reason",
            "maintenance",
        ],
    );
    let o = running.await.unwrap();
    assert_eq!(o.status, RunStatus::Refused, "{o:?}");
    assert_eq!(o.class(), Some("frozen"), "{o:?}");
    assert_eq!(db.count("iu_diag_probe"), 0, "nothing committed");
    let e = db.evidence(o.run_id.unwrap());
    assert!(
        e["duration_ms"].as_i64().unwrap() >= 2900,
        "refused at its commit, after its statements ran: {e}"
    );
    // Another command is not covered.
    let other = rt
        .run(&job(
            "dot_iu_create_collection",
            Mode::Apply,
            &[("title", "t")],
        ))
        .await;
    assert_eq!(other.status, RunStatus::Applied, "{other:?}");
}

/// PostgreSQL keeps a backend's table counters pending for up to a second
/// across transactions (its "transaction" statistics are not reset per
/// transaction while the backend is busy): in session mode, applies that
/// follow each other in one psql session must each count only their own
/// rows.
#[tokio::test]
async fn applies_back_to_back_in_one_session_each_count_only_their_own_rows() {
    let db = test_db().await;
    db.open_all();
    let rt = db.runtime();
    for n in 1..=4 {
        let o = touch_rows(&rt, Mode::Apply, 3).await;
        assert_eq!(o.status, RunStatus::Applied, "apply {n}: {o:?}");
        let e = db.evidence(o.run_id.unwrap());
        assert_eq!(
            e["rows_by_table"],
            serde_json::json!({"public.iu_diag_probe": {"inserted": 3, "updated": 0, "deleted": 0}}),
            "apply {n}"
        );
        assert_eq!(e["rows_changed"], 3, "apply {n}: {e}");
    }
    assert_eq!(db.count("iu_diag_probe"), 12);
}

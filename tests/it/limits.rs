//! Limits an apply meets inside its own transaction: the command's row cap
//! (`max_rows`, counted by PostgreSQL's transaction statistics) and freeze
//! windows (`govsql freeze`), checked just before the commit.

use govsql::runtime::{Mode, RunStatus};

use crate::harness::*;

/// One ledger row's evidence.
fn evidence(db: &TestDb, run_id: i64) -> serde_json::Value {
    serde_json::from_str(&db.sql(&format!(
        "SELECT evidence FROM dot_iu_command_run WHERE run_id = {run_id}"
    )))
    .unwrap()
}

#[tokio::test]
async fn an_apply_over_its_row_cap_is_rolled_back_and_fails_row_cap() {
    let db = test_db().await;
    db.open_all();
    let rt = db.runtime();
    let over = run(
        &rt,
        "dot_iu_diag_touch_rows",
        Mode::Apply,
        &[("rows", "11"), ("sleep_ms", "0")],
    )
    .await;
    assert_eq!(over.status, RunStatus::Failed, "{over:?}");
    assert_eq!(over.class(), Some("row_cap"), "{over:?}");
    assert_eq!(over.exit_code().code(), 4);
    assert!(over.message.contains("max_rows (10)"), "{}", over.message);
    assert_eq!(db.count("iu_diag_probe"), 0, "nothing of it committed");
    let e = evidence(&db, over.run_id.unwrap());
    assert_eq!(e["error_class"], "row_cap");
    assert_eq!(e["max_rows"], 10);
    assert_eq!(e["rows_changed"], 11, "{e}");
    assert_eq!(
        e["rows_by_table"]["public.iu_diag_probe"]["inserted"], 11,
        "{e}"
    );

    let at = run(
        &rt,
        "dot_iu_diag_touch_rows",
        Mode::Apply,
        &[("rows", "10"), ("sleep_ms", "0")],
    )
    .await;
    assert_eq!(at.status, RunStatus::Applied, "{at:?}");
    assert_eq!(db.count("iu_diag_probe"), 10);
    let e = evidence(&db, at.run_id.unwrap());
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
    let e = evidence(&db, o.run_id.unwrap());
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
    let e = evidence(&db, o.run_id.unwrap());
    assert_eq!(
        e["rows_by_table"]["public.iu_diag_probe"]["inserted"], 7,
        "{e}"
    );

    // plan shows the cap.
    let p = run(
        &rt,
        "dot_iu_diag_touch_rows",
        Mode::Plan,
        &[("rows", "1"), ("sleep_ms", "0")],
    )
    .await;
    assert_eq!(p.status, RunStatus::Planned, "{p:?}");
    assert!(p.message.contains("at most 10 row(s)"), "{}", p.message);
    assert_eq!(evidence(&db, p.run_id.unwrap())["max_rows"], 10);
}

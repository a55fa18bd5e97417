//! No value reaches a server-side store: with a server setting that would
//! keep a statement's text (the server log, pg_stat_statements,
//! auto_explain, debug_print_*), every mode is refused `log_exposure`
//! before the statement carrying the value is sent.

use govsql::runtime::{Mode, RunStatus};

use crate::harness::*;

/// Whether the server log or pg_stat_statements holds `canary`.
fn stored(db: &TestDb, canary: &str) -> bool {
    let log = std::fs::read(pg().dir.join("log")).unwrap_or_default();
    let in_log = String::from_utf8_lossy(&log).contains(canary);
    let in_stats = db.sql(&format!(
        "SELECT count(*) FROM pg_stat_statements WHERE query LIKE '%{canary}%'"
    )) != "0";
    in_log || in_stats
}

#[tokio::test]
async fn a_setting_that_would_store_a_value_refuses_before_the_value_is_sent() {
    let db = test_db().await;
    db.open_all();
    db.switch(true);
    db.sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements");
    let set = |setting: &str, value: &str| {
        db.sql(&format!(
            "ALTER ROLE {RUNTIME_ROLE} IN DATABASE {} SET {setting} = '{value}'",
            db.name
        ));
    };
    let reset = || {
        db.sql(&format!(
            "ALTER ROLE {RUNTIME_ROLE} IN DATABASE {} RESET ALL",
            db.name
        ));
    };
    let pid = std::process::id();

    // The control: allowed to expose, a per-database log_statement keeps
    // the value in the server log (so the check below can fail).
    set("log_statement", "all");
    let canary = format!("exposure-control-{pid}");
    let rt = db
        .runtime_with(db.configured_executor())
        .allow_log_exposure(true);
    let o = run(
        &rt,
        "dot_iu_create_collection",
        Mode::Apply,
        &[("title", &canary)],
    )
    .await;
    assert_eq!(o.status, RunStatus::Applied, "{o:?}");
    assert!(stored(&db, &canary), "the control's value was not logged");
    reset();

    let cases: &[&[(&str, &str)]] = &[
        &[("log_statement", "all")],
        &[("log_min_duration_statement", "0")],
        &[("debug_print_parse", "on")],
        &[("log_transaction_sample_rate", "1")],
        &[
            ("auto_explain.log_min_duration", "0"),
            ("auto_explain.log_analyze", "on"),
        ],
        &[
            ("pg_stat_statements.track", "top"),
            ("pg_stat_statements.track_utility", "on"),
        ],
        &[("pgaudit.log", "all")],
    ];
    for (i, settings) in cases.iter().enumerate() {
        for (k, v) in settings.iter() {
            set(k, v);
        }
        for mode in [Mode::Apply, Mode::Plan] {
            let canary = format!("exposure-{i}-{}-{pid}", mode.as_str());
            // A new executor: a role setting applies to new sessions.
            let rt = db.runtime_with(db.configured_executor());
            let o = run(&rt, "dot_iu_create_collection", mode, &[("title", &canary)]).await;
            assert_eq!(o.status, RunStatus::Refused, "{settings:?} {mode:?}: {o:?}");
            assert_eq!(o.class(), Some("log_exposure"), "{settings:?}: {o:?}");
            assert!(
                o.message.contains("before any value was sent"),
                "{}",
                o.message
            );
            assert!(
                !stored(&db, &canary),
                "{settings:?} {mode:?}: the value was stored"
            );
        }
        let rt = db.runtime_with(db.configured_executor());
        let o = run(&rt, "dot_iu_healthcheck", Mode::Verify, &[]).await;
        assert_eq!(
            o.class(),
            Some("log_exposure"),
            "verify under {settings:?}: {o:?}"
        );
        reset();
    }
    assert_eq!(
        db.sql(&format!(
            "SELECT count(*) FROM iu_collection WHERE title LIKE 'exposure-%-{pid}' AND title <> 'exposure-control-{pid}'"
        )),
        "0",
        "a refused job created nothing"
    );

    // With the settings back, the same job runs.
    let rt = db.runtime_with(db.configured_executor());
    let o = run(
        &rt,
        "dot_iu_create_collection",
        Mode::Apply,
        &[("title", "after")],
    )
    .await;
    assert_eq!(o.status, RunStatus::Applied, "{o:?}");
}

//! Session mode: warm psql sessions, one job after another, against a
//! real PostgreSQL. Nothing of one job reaches the next; a failure ends
//! only its own job (and its session); a session that does not keep to its
//! framing is never reused. Each test first proves it is looking at ONE
//! session (the same backend), so that it can fail.

use std::sync::Arc;
use std::time::Duration;

use govsql::psql::{copy_rows, PsqlResult, Row, Script};
use govsql::runtime::{Mode, RunStatus};
use govsql::transport::local::LocalExecutor;
use govsql::transport::{run_script, Executor, ScriptRequest};

use crate::harness::*;

/// Runs a script; the COPY rows of each section.
async fn sections(exec: &dyn Executor, script: Script) -> Result<Vec<Vec<Row>>, String> {
    let finished = script.finish();
    match run_script(
        exec,
        &finished,
        "govsql:session-test",
        Duration::from_secs(20),
    )
    .await
    {
        PsqlResult::Complete(secs) => Ok((0..finished.sections)
            .map(|n| copy_rows(n, secs.get(n).unwrap_or_default()).unwrap_or_default())
            .collect()),
        other => Err(other.to_string()),
    }
}

/// The backend a job runs on.
async fn backend(exec: &dyn Executor) -> String {
    let mut s = Script::new("govsql:session-test", 10_000);
    s.section();
    s.sql("COPY (SELECT pg_backend_pid()) TO STDOUT");
    let rows = sections(exec, s).await.expect("the pid job completes");
    rows[0][0][0].clone().unwrap()
}

fn one(exec: &LocalExecutor) -> usize {
    exec.runner().pool().expect("session mode").idle_count()
}

#[tokio::test]
async fn a_job_leaves_nothing_behind_for_the_next_job_on_the_same_session() {
    let db = test_db().await;
    let exec = db.session_executor("max_channels = 1");
    // Job A leaves a session GUC, a temp table, a prepared statement, an
    // advisory lock, a role-level setting and a psql variable behind.
    let mut a = Script::new("govsql:leak-a", 10_000);
    a.meta("\\set govsql_leak yes");
    a.sql("SELECT 1 WHERE set_config('govsql.leak', 'a', false) IS NULL");
    a.sql("SET search_path = pg_temp");
    a.sql("CREATE TEMP TABLE leak (x int)");
    a.sql("PREPARE leak AS SELECT 1");
    a.sql("SELECT 1 WHERE pg_advisory_lock(4242)::text IS NULL");
    a.sql("SET default_transaction_read_only = on");
    a.section();
    a.sql("COPY (SELECT pg_backend_pid()) TO STDOUT");
    let rows = sections(&exec, a).await.expect("job A completes");
    let pid_a = rows[0][0][0].clone().unwrap();

    let mut b = Script::new("govsql:leak-b", 10_000);
    b.section();
    b.sql(
        "COPY (SELECT pg_backend_pid(), coalesce(current_setting('govsql.leak', true), ''), \
         to_regclass('pg_temp.leak') IS NULL, \
         (SELECT count(*) FROM pg_prepared_statements), \
         (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()), \
         current_setting('search_path'), current_setting('default_transaction_read_only')) TO STDOUT",
    );
    b.section();
    b.meta("\\echo :{?govsql_leak}");
    let rows = sections(&exec, b).await.expect("job B completes");
    let seen: Vec<String> = rows[0][0].iter().map(|f| f.clone().unwrap()).collect();
    assert_eq!(seen[0], pid_a, "both jobs ran on one session (one backend)");
    assert_eq!(seen[1], "", "a session GUC reached the next job");
    assert_eq!(seen[2], "t", "a temp table reached the next job");
    assert_eq!(seen[3], "0", "a prepared statement reached the next job");
    assert_eq!(seen[4], "0", "an advisory lock reached the next job");
    assert_eq!(
        seen[5], "\"$user\", public",
        "search_path reached the next job"
    );
    assert_eq!(
        seen[6], "off",
        "default_transaction_read_only reached the next job"
    );
    // The psql variable: `\echo :{?name}` prints FALSE once it is unset.
    assert_eq!(
        rows[1][0][0].as_deref(),
        Some("FALSE"),
        "a psql variable reached the next job"
    );
    assert_eq!(one(&exec), 1);
}

#[tokio::test]
async fn a_verify_that_fails_after_one_that_passed_is_failed() {
    let db = test_db().await;
    db.open_all();
    db.switch(true);
    let exec = Arc::new(db.session_executor("max_channels = 1"));
    let rt = db.runtime_with(exec.clone());
    let created = run(
        &rt,
        "dot_iu_create_collection",
        Mode::Apply,
        &[("title", "kept")],
    )
    .await;
    assert_eq!(created.status, RunStatus::Applied, "{created:?}");
    let id = db.sql("SELECT collection_id FROM iu_collection");
    let ok = run(
        &rt,
        "dot_iu_collection_validate",
        Mode::Verify,
        &[("collection_id", &id)],
    )
    .await;
    assert_eq!(ok.status, RunStatus::Verified, "{ok:?}");
    let bad = run(
        &rt,
        "dot_iu_collection_validate",
        Mode::Verify,
        &[("collection_id", "00000000-0000-0000-0000-000000000009")],
    )
    .await;
    assert_eq!(bad.status, RunStatus::Failed, "{bad:?}");
    assert_eq!(bad.class(), Some("verification_failed"));
    assert_eq!(one(&exec), 1, "all three jobs ran on one warm session");
}

#[tokio::test]
async fn an_sql_error_ends_its_session_and_the_next_job_gets_a_fresh_one() {
    let db = test_db().await;
    let exec = db.session_executor("max_channels = 1");
    let pid = backend(&exec).await;
    assert_eq!(backend(&exec).await, pid, "a warm session is reused");
    let mut bad = Script::new("govsql:bad", 10_000);
    bad.section();
    bad.sql("SELECT 1/0");
    let err = sections(&exec, bad).await.unwrap_err();
    assert!(err.contains("22012"), "{err}");
    let fresh = backend(&exec).await;
    assert_ne!(fresh, pid, "the failed job's session was reused");
    assert_eq!(backend(&exec).await, fresh);
}

#[tokio::test]
async fn a_timeout_cancels_its_backend_and_replaces_its_session() {
    let db = test_db_with(&std::fs::read_to_string(catalog_path()).unwrap(), 2).await;
    let exec = Arc::new(db.session_executor("max_channels = 1\njob_timeout_s = 2"));
    let rt = db.runtime_with(exec.clone());
    let pid = backend(exec.as_ref()).await;
    let o = run(&rt, "dot_iu_diag_sleep", Mode::Verify, &[("seconds", "30")]).await;
    assert_eq!(o.class(), Some("timeout"), "{o:?}");
    // The sleeping backend is gone, and the next job runs on a new one.
    assert_eq!(
        pg().admin(
            &db.name,
            &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}")
        ),
        "0"
    );
    let next = backend(exec.as_ref()).await;
    assert_ne!(next, pid);
    let o = run(&rt, "dot_iu_healthcheck", Mode::Verify, &[]).await;
    assert_eq!(o.status, RunStatus::Verified, "{o:?}");
}

#[tokio::test]
async fn output_that_breaks_the_framing_ends_the_session() {
    let db = test_db().await;
    let exec = db.session_executor("max_channels = 1");
    let pid = backend(&exec).await;
    // A script that prints after its end marker: the bytes between the
    // end and the ready marker do not match, so the session is not reused.
    let mut s = Script::new("govsql:noisy", 10_000);
    s.section();
    s.sql("COPY (SELECT 1) TO STDOUT");
    let f = s.finish();
    let req = ScriptRequest {
        text: format!("{}\\echo stray\n", f.text),
        nonce: f.nonce.clone(),
        tag: "govsql:noisy".into(),
        read: false,
    };
    let out = exec.run(req).await.unwrap();
    assert!(matches!(
        PsqlResult::read(&out, &f),
        PsqlResult::Complete(_)
    ));
    let next = backend(&exec).await;
    assert_ne!(
        next, pid,
        "a session whose output broke its framing was reused"
    );
}

#[tokio::test]
async fn a_session_whose_backend_died_while_idle_is_replaced_without_failing_the_job() {
    let db = test_db().await;
    let exec = db.session_executor("max_channels = 1");
    let pid = backend(&exec).await;
    pg().admin(
        &db.name,
        &format!("SELECT pg_terminate_backend({pid}, 5000)"),
    );
    let next = backend(&exec).await;
    assert_ne!(next, pid);
}

#[tokio::test]
async fn sessions_are_recycled_after_max_jobs_and_closed_when_idle() {
    let db = test_db().await;
    let exec = db.session_executor("max_channels = 1\nsession_max_jobs = 2\nsession_idle_s = 1");
    let first = backend(&exec).await;
    assert_eq!(backend(&exec).await, first);
    let third = backend(&exec).await;
    assert_ne!(third, first, "a session outlived session_max_jobs");
    assert_eq!(one(&exec), 1);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(one(&exec), 0, "an idle session outlived session_idle_s");
    let count = || {
        pg().admin(
            &db.name,
            &format!(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = '{RUNTIME_ROLE}' AND datname = '{}'",
                db.name
            ),
        )
    };
    for _ in 0..50 {
        if count() == "0" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(count(), "0", "the idle session's backend is still there");
}

#[tokio::test]
async fn per_job_mode_starts_one_psql_per_job() {
    let db = test_db().await;
    let toml_exec = db.session_executor("max_channels = 1");
    let pid = backend(&toml_exec).await;
    assert_eq!(backend(&toml_exec).await, pid);
    let per_job = db.executor_with_mode(false);
    let a = backend(&per_job).await;
    let b = backend(&per_job).await;
    assert_ne!(a, b, "per-job mode reused a backend");
    assert!(per_job.runner().pool().is_none());
}

/// Session mode switched itself off for the daemon's whole life after
/// three sessions died idle (a server's ChannelTimeout, a killed psql):
/// a normal event. It pauses, says so in its stats, and comes back.
#[tokio::test]
async fn session_mode_pauses_when_sessions_keep_dying_and_comes_back() {
    use govsql::transport::Executor;
    std::env::set_var("GOVSQL_TEST_SESSION_PAUSE_MS", "3000");
    let db = test_db().await;
    let exec = std::sync::Arc::new(db.session_executor(""));
    let rt = db.runtime_with(exec.clone());
    let verify = || run(&rt, "dot_iu_healthcheck", Mode::Verify, &[]);
    let pattern = format!("psql .*-d {}$", db.name);
    let kill_sessions = || {
        let _ = std::process::Command::new("pkill")
            .args(["-KILL", "-f", &pattern])
            .status();
        // Gone, and time for the pool to have read its end (a loaded
        // machine delivers it late).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::process::Command::new("pgrep")
            .args(["-f", &pattern])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            assert!(std::time::Instant::now() < deadline, "psql did not die");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    // (A job that meets a session as it is killed may fail: the daemon
    // retries those; what matters here is the pool's state.)
    // (A kill that lands while the pool is between reads may not count:
    // the sessions keep dying until the pool pauses, ten at most.)
    for _ in 0..10 {
        let _ = verify().await;
        if exec.stats().sessions_paused {
            break;
        }
        kill_sessions();
    }
    assert!(
        exec.stats().sessions_paused,
        "sessions that keep dying pause session mode"
    );
    // Paused: one psql per job.
    let before = exec.stats().psql_started;
    for _ in 0..3 {
        assert_eq!(verify().await.status, RunStatus::Verified);
    }
    assert_eq!(exec.stats().psql_started - before, 3);
    // The pause ends: sessions again (one psql for several jobs).
    tokio::time::sleep(std::time::Duration::from_millis(3300)).await;
    let before = exec.stats().psql_started;
    for _ in 0..5 {
        assert_eq!(verify().await.status, RunStatus::Verified);
    }
    assert!(!exec.stats().sessions_paused);
    assert!(
        exec.stats().psql_started - before <= 1,
        "session mode came back: {} psql for 5 jobs",
        exec.stats().psql_started - before
    );
}

/// Under a `govsql log` flood another user's verify went from 10 ms to
/// 26 ms (2.5x, scripts/abuse): each read started its own psql, remote
/// gate and backend. In session mode reads have their own warm session on
/// the read channel: six reads start one psql, and never take a job's.
#[tokio::test]
async fn reads_share_one_warm_session_of_their_own() {
    let db = test_db().await;
    let exec = db.session_executor("max_channels = 1");
    let pid = backend(&exec).await;
    let before = exec.stats().psql_started;
    for _ in 0..6 {
        let rows = govsql::runtime::read_ledger(
            &exec,
            &govsql::protocol::LogFilter::default(),
            5,
            Duration::from_secs(10),
        )
        .await
        .expect("the read completes");
        assert!(rows.len() <= 5);
    }
    assert_eq!(
        exec.stats().psql_started - before,
        1,
        "six reads in session mode"
    );
    assert_eq!(backend(&exec).await, pid, "a read took the job's session");
}

//! Truth at the limits: a job that may have run is settled by its key
//! before anything local may refuse it, and never stops waiting for its
//! target; an apply is `failed` only when nothing ran or the database
//! proved nothing committed.

use std::time::{Duration, Instant};

use govsql::runtime::{Mode, RunStatus};
use serde_json::{json, Value};

use crate::daemon::{configure, open_db, wait_terminal, DaemonProc, OPEN_ACCESS};
use crate::harness::*;

/// An apply whose key already applied (an orphaned transaction of an
/// earlier attempt committed) met the local kill switch — or an approval
/// expiry, or a cancel — before the ledger and ended `refused` although
/// applied. The refusal entry now settles by key first.
#[tokio::test]
async fn a_local_refusal_of_a_key_that_already_applied_reports_the_original_run() {
    let db = test_db().await;
    db.open_all();
    db.switch(true);
    let rt = db.runtime();
    let mut first = job(
        "dot_iu_create_collection",
        Mode::Apply,
        &[("title", "once")],
    );
    first.idempotency_key = "settle-first-1".into();
    let o = rt.run(&first).await;
    assert_eq!(o.status, RunStatus::Applied, "{o:?}");
    let run_id = o.run_id;
    // The kill switch is turned off in an emergency; the job runs again
    // (a retry after a crash) with the same key.
    db.switch(false);
    let mut again = job(
        "dot_iu_create_collection",
        Mode::Apply,
        &[("title", "once")],
    );
    again.idempotency_key = "settle-first-1".into();
    let o = rt.run(&again).await;
    assert_eq!(
        o.status,
        RunStatus::Applied,
        "settled by its key, not refused: {o:?}"
    );
    assert_eq!(o.run_id, run_id, "the original run");
    assert!(o.message.contains("was applied"), "{}", o.message);
    // Other params under the key, or a fresh key: refused by the switch.
    let mut other = job(
        "dot_iu_create_collection",
        Mode::Apply,
        &[("title", "other")],
    );
    other.idempotency_key = "settle-first-1".into();
    assert_eq!(rt.run(&other).await.class(), Some("kill_switch"));
    let fresh = job(
        "dot_iu_create_collection",
        Mode::Apply,
        &[("title", "fresh")],
    );
    assert_eq!(rt.run(&fresh).await.class(), Some("kill_switch"));
    assert_eq!(db.count("iu_collection"), 1);
}

fn state(d: &DaemonProc, id: &str) -> Value {
    d.request(json!({"v": 1, "op": "status", "job_id": id}))["job"].clone()
}

/// An apply cut off mid-flight (the daemon killed while its transaction
/// waited on a lock; the orphaned transaction then committed), whose
/// target then stayed unreachable longer than max_target_wait_s, ended
/// `failed / target_unreachable` ("nothing ran"). It must stay unsettled
/// until the ledger answers, then end applied, once.
#[tokio::test]
async fn an_apply_in_doubt_outlasts_max_target_wait_and_is_settled_by_its_key() {
    let db = open_db().await;
    let text = std::fs::read_to_string(&db.config_path).unwrap();
    std::fs::write(
        &db.config_path,
        text.replacen(
            "[targets.main]\n",
            "[targets.main]\nmax_target_wait_s = 2\n",
            1,
        ),
    )
    .unwrap();
    db.open_all();
    db.switch(true);
    let lock = TableLock::take(&db.name, "iu_collection");
    let d = DaemonProc::start(&db);
    let r = d.request(json!({
        "v": 1, "op": "submit", "command": "dot_iu_create_collection", "mode": "apply",
        "params": [["title", "in-doubt"]], "idempotency_key": "doubt-1"
    }));
    let id = r["job"]["job_id"].as_str().unwrap().to_string();
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || state(&d, &id)["state"] == "running",
        || "the job never ran".to_string(),
    );
    // Its transaction now waits for the lock; the daemon dies (SIGKILL).
    std::thread::sleep(Duration::from_millis(700));
    drop(d);
    pg().admin(
        "postgres",
        &format!("ALTER DATABASE {} ALLOW_CONNECTIONS false", db.name),
    );
    // The orphaned transaction gets its lock and commits.
    lock.release();
    std::thread::sleep(Duration::from_millis(500));
    // The daemon comes back; the target refuses connections for longer
    // than max_target_wait_s.
    let d = DaemonProc::start(&db);
    std::thread::sleep(Duration::from_secs(5));
    // Between its tries (a probe each second) it is unsettled; while a try
    // waits for the target it is running. Never terminal.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut j = state(&d, &id);
    while j["state"] != "unsettled" {
        assert_eq!(
            j["state"], "running",
            "an apply that may have run gave up on its target: {j}"
        );
        assert!(
            Instant::now() < deadline,
            "never unsettled between its tries: {j}"
        );
        std::thread::sleep(Duration::from_millis(20));
        j = state(&d, &id);
    }
    pg().admin(
        "postgres",
        &format!("ALTER DATABASE {} ALLOW_CONNECTIONS true", db.name),
    );
    let done = wait_terminal(&d, &id);
    assert_eq!(done["state"], "applied", "{done}");
    assert_eq!(db.count("iu_collection WHERE title = 'in-doubt'"), 1);
    assert_eq!(
        db.count("dot_iu_command_run WHERE idempotency_key = 'doubt-1' AND run_status = 'applied'"),
        1
    );
}

/// A backend frozen (SIGSTOP) past the job's deadline, inside the apply's
/// transaction: the cancel is not proven to have worked, and the ledger
/// cannot answer while the frozen backend holds the key's lock. The job
/// ended `failed / timeout` ("could not write the ledger row"); it must be
/// unsettled, and settled by its key once the backend is gone.
#[tokio::test]
async fn an_apply_whose_backend_is_frozen_past_its_deadline_is_unsettled_not_failed() {
    let db = test_db_with(&std::fs::read_to_string(catalog_path()).unwrap(), 2).await;
    db.open_all();
    db.switch(true);
    let lock = TableLock::take(&db.name, "iu_collection");
    let mut j = job(
        "dot_iu_create_collection",
        Mode::Apply,
        &[("title", "frozen")],
    );
    j.idempotency_key = "frozen-1".into();
    let tag = format!("govsql:{}", j.job_id);
    let rt = std::sync::Arc::new(db.runtime());
    let running = {
        let (rt, j) = (rt.clone(), j.clone());
        tokio::spawn(async move { rt.run(&j).await })
    };
    // Its backend waits for the table lock, holding the key's lock: freeze it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let pid: i32 = loop {
        let pid = db.sql(&format!(
            "SELECT pid FROM pg_stat_activity WHERE application_name = '{tag}' AND wait_event_type = 'Lock'"
        ));
        if let Ok(pid) = pid.trim().parse() {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "the apply's backend never waited"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let backend = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(backend, nix::sys::signal::Signal::SIGSTOP).unwrap();
    lock.release();
    let o = running.await.unwrap();
    nix::sys::signal::kill(backend, nix::sys::signal::Signal::SIGCONT).unwrap();
    // Not over: the daemon keeps it `unsettled` (never `failed`).
    assert_eq!(
        o.pending,
        Some(govsql::job::Pending::Unsettled),
        "reported failed while it may commit: {o:?}"
    );
    assert!(!o.message.contains("was cancelled"), "{}", o.message);
    // Settled by its key once the backend is gone: applied exactly once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let o = rt.run(&j).await;
    assert_eq!(o.status, RunStatus::Applied, "{o:?}");
    assert_eq!(db.count("iu_collection WHERE title = 'frozen'"), 1);
    assert_eq!(
        db.count(
            "dot_iu_command_run WHERE idempotency_key = 'frozen-1' AND run_status = 'applied'"
        ),
        1
    );
}

/// Sets a key of `[targets.main]` in a daemon test's config (`key = v`).
fn set_target_key(db: &TestDb, line: &str) {
    let key = line.split('=').next().unwrap().trim();
    let text: String = std::fs::read_to_string(&db.config_path)
        .unwrap()
        .lines()
        .filter(|l| l.split('=').next().map(str::trim) != Some(key))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(
        &db.config_path,
        text.replacen("[targets.main]\n", &format!("[targets.main]\n{line}\n"), 1),
    )
    .unwrap();
}

fn submit_apply(d: &DaemonProc, title: &str) -> String {
    let r = d.request(json!({
        "v": 1, "op": "submit", "command": "dot_iu_create_collection", "mode": "apply",
        "params": [["title", title]], "idempotency_key": title
    }));
    r["job"]["job_id"].as_str().expect("a job id").to_string()
}

/// Start-up recovery raced the first claims: a job claimed before the
/// recovery ran was put back by it and claimed again while its first run
/// was still in flight (the same job twice at once in one daemon). The
/// workers now claim only after the recovery.
#[tokio::test]
async fn a_job_claimed_at_start_is_not_put_back_and_run_beside_itself() {
    let db = open_db().await;
    set_target_key(&db, "max_channels = 1");
    db.open_all();
    db.switch(true);
    let lock = TableLock::take(&db.name, "iu_collection");
    let d = DaemonProc::start(&db);
    let first = submit_apply(&d, "race-first");
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || state(&d, &first)["state"] == "running",
        || "the first job never ran".to_string(),
    );
    // The second waits in the queue behind the first; the daemon dies.
    let second = submit_apply(&d, "race-second");
    drop(d);
    // Restarted with room for both, and a slow recovery.
    set_target_key(&db, "max_channels = 3");
    let delay = std::path::Path::new("1500");
    let d = DaemonProc::start_with(&db, &[("GOVSQL_TEST_RECOVER_DELAY_MS", delay)]);
    let tag = format!("govsql:{second}");
    let backends = || {
        db.sql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{tag}'"
        ))
        .trim()
        .parse::<i64>()
        .unwrap()
    };
    let (mut most, until) = (0, Instant::now() + Duration::from_secs(5));
    while Instant::now() < until {
        most = most.max(backends());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(most, 1, "the second job ran {most} times at once");
    lock.release();
    for (id, title) in [(&first, "race-first"), (&second, "race-second")] {
        let done = wait_terminal(&d, id);
        assert_eq!(done["state"], "applied", "{done}");
        assert_eq!(
            db.count(&format!("iu_collection WHERE title = '{title}'")),
            1
        );
    }
    let finished = d
        .log_text()
        .lines()
        .filter(|l| l.contains("job finished") && l.contains(second.as_str()))
        .count();
    assert_eq!(finished, 1, "{}", d.log_text());
}

/// Jobs that waited through an outage slept out a backoff of up to 30 s
/// after the target came back, while newer jobs overtook them. The target
/// is probed with its oldest waiting job every second, and the first job
/// that reaches the database wakes the others.
#[tokio::test]
async fn jobs_that_waited_through_an_outage_go_as_soon_as_the_target_answers() {
    let db = open_db().await;
    set_target_key(&db, "max_target_wait_s = 600");
    db.open_all();
    db.switch(true);
    let allow = |yes: bool| {
        pg().admin(
            "postgres",
            &format!("ALTER DATABASE {} ALLOW_CONNECTIONS {yes}", db.name),
        );
    };
    allow(false);
    let d = DaemonProc::start(&db);
    let ids: Vec<String> = (0..3)
        .map(|i| submit_apply(&d, &format!("outage-{i}")))
        .collect();
    // Long enough for their backoff to grow past what the test allows.
    std::thread::sleep(Duration::from_secs(9));
    for id in &ids {
        assert_eq!(state(&d, id)["state"], "queued", "{}", d.log_text());
    }
    allow(true);
    let back = Instant::now();
    for id in &ids {
        let done = wait_terminal(&d, id);
        assert_eq!(done["state"], "applied", "{done}");
    }
    let took = back.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "the waiting jobs ended {took:?} after the target came back"
    );
}

/// A timed-out job whose failure row could not be written (the fail
/// entry's own call was cut off at its deadline) ended with no ledger row
/// at all. It now owes the row, written once the target answers, once.
#[tokio::test]
async fn a_timed_out_job_whose_row_was_cut_off_gets_it_once_the_target_answers() {
    let mut db = test_db_with(&std::fs::read_to_string(catalog_path()).unwrap(), 2).await;
    configure(&mut db, OPEN_ACCESS, "");
    db.open_all();
    let ledger = TableLock::take(&db.name, "dot_iu_command_run");
    let d = DaemonProc::start(&db);
    let r = d.request(json!({
        "v": 1, "op": "submit", "command": "dot_iu_healthcheck", "mode": "verify",
        "params": [], "idempotency_key": "owed-timeout-1"
    }));
    let id = r["job"]["job_id"].as_str().unwrap().to_string();
    let done = wait_terminal(&d, &id);
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["outcome"]["error_class"], "timeout", "{done}");
    let message = done["outcome"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("written once the target answers"),
        "{message}"
    );
    ledger.release();
    let rows = || {
        db.count(&format!(
            "dot_iu_command_run WHERE idempotency_key = 'owed-timeout-1' AND run_status = 'failed' AND evidence->>'job_id' = '{id}'"
        ))
    };
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(200),
        || rows() != 0,
        || format!("the owed row was never written: {}", d.log_text()),
    );
    assert_eq!(
        db.count(
            "dot_iu_command_run WHERE idempotency_key = 'owed-timeout-1' AND evidence->>'error_class' = 'timeout'"
        ),
        1
    );
    // Sent again (a second payment, a retry), the fail entry keeps one row
    // per job: it returns the one it has.
    let client = json!({"job_id": id}).to_string();
    let again = |class: &str| {
        db.sql(&format!(
            "SET ROLE govsql_runtime; SELECT kind, value FROM public.fn_dot_iu_fail('verify', 'dot_iu_healthcheck', '[]', 'owed-timeout-1', 'root', '{class}', '{client}')"
        ))
    };
    let answer = again("timeout");
    assert!(answer.contains("\"replayed\": true"), "{answer}");
    assert_eq!(rows(), 1);
}

/// A timed-out apply was settled `failed` by the fail entry while a
/// backend of it was still there (frozen with its call unread, it could
/// take the key's lock after the failure row and commit). The fail entry
/// now refuses (GV010) while a backend carries the job's tag, and the
/// job stays unsettled.
#[tokio::test]
async fn the_fail_entry_does_not_settle_a_timeout_while_a_backend_of_the_job_is_there() {
    use std::io::{BufRead, Write};
    let db = test_db().await;
    let job_id = "6b000000-00000001";
    let mut other = pg().session(&db.name);
    let stdin = other.stdin.as_mut().unwrap();
    writeln!(
        stdin,
        "SELECT set_config('application_name', 'govsql:{job_id}', false);\nSELECT 'tagged';"
    )
    .unwrap();
    stdin.flush().unwrap();
    let mut reader = std::io::BufReader::new(other.stdout.as_mut().unwrap());
    let mut line = String::new();
    while line.trim() != "tagged" {
        line.clear();
        reader.read_line(&mut line).unwrap();
    }
    let client = json!({"job_id": job_id}).to_string();
    let fail = || {
        pg().psql_as(
            "postgres",
            &db.name,
            &format!(
                "SET ROLE govsql_runtime; SELECT kind FROM public.fn_dot_iu_fail('apply', 'dot_iu_create_collection', '{{\"title\": \"t\"}}', 'alive-1', 'root', 'timeout', '{client}')"
            ),
        )
    };
    let out = fail();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("still there"),
        "{err}"
    );
    assert_eq!(
        db.count("dot_iu_command_run WHERE idempotency_key = 'alive-1'"),
        0
    );
    // Once that backend is gone, the fail entry writes the row.
    let _ = other.kill();
    let _ = other.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = fail();
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        db.count("dot_iu_command_run WHERE idempotency_key = 'alive-1' AND run_status = 'failed'"),
        1
    );
}

/// A warm session's backend frozen (SIGSTOP) while idle: the next apply's
/// first statement sits unread and the session's name is not yet the
/// job's, so the deadline's cancel finds no backend and the fail entry
/// settles it. That is sound only because psql sends the job's call after
/// the preamble (which names the session) has answered: the call never
/// reaches a backend the cancel cannot find. This guards that order (the
/// drill's review feared a call left unread in a frozen backend, committed
/// after the job was reported failed).
#[tokio::test]
async fn an_apply_sent_to_a_frozen_idle_session_is_not_failed_then_committed() {
    let db = test_db_with(&std::fs::read_to_string(catalog_path()).unwrap(), 2).await;
    db.open_all();
    db.switch(true);
    let exec = std::sync::Arc::new(db.session_executor("max_channels = 1"));
    let rt = db.runtime_with(exec);
    let warm = run(&rt, "dot_iu_healthcheck", Mode::Verify, &[]).await;
    assert_eq!(warm.status, RunStatus::Verified, "{warm:?}");
    let pid: i32 = db
        .sql(&format!(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND usename = '{RUNTIME_ROLE}' AND state = 'idle'"
        ))
        .trim()
        .parse()
        .expect("the warm session's backend");
    let backend = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(backend, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let mut j = job(
        "dot_iu_create_collection",
        Mode::Apply,
        &[("title", "unread")],
    );
    j.idempotency_key = "unread-1".into();
    let o = rt.run(&j).await;
    nix::sys::signal::kill(backend, nix::sys::signal::Signal::SIGCONT).unwrap();
    // Whatever the frozen backend does once it runs again, the key holds.
    std::thread::sleep(Duration::from_secs(2));
    let applied = db.count("iu_collection WHERE title = 'unread'");
    assert!(applied <= 1, "applied {applied} times");
    assert!(
        !(o.status == RunStatus::Failed && applied == 1 && o.pending.is_none()),
        "reported failed, then committed: {o:?}"
    );
    if o.status == RunStatus::Applied {
        assert_eq!(applied, 1);
    }
}

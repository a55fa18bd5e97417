//! Faults the daemon survives as a process: SIGKILL mid-run, two daemons
//! on one target, a full state disk, a target that is down, a batch
//! across a daemon restart.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::daemon::*;
use crate::harness::*;
use crate::sshd::{self, keys, USER};

#[tokio::test]
async fn crash_with_sigkill_mid_run_applies_each_job_exactly_once() {
    let s = sshd::shared();
    // Two channels, and the applies held on a lock while they are
    // submitted (below), so that the kill lands mid-run.
    let toml = s
        .target_toml(USER, &keys().ed25519)
        .replace("max_channels = 8", "max_channels = 2");
    let mut db = ssh_db(&toml, 60).await;
    configure(&mut db, OPEN_ACCESS, "");
    db.open_all();
    let mut d = DaemonProc::start(&db);
    // The applies wait on a lock while they are submitted, so that the
    // kill lands mid-run however fast the jobs are (session mode runs
    // hundreds a second).
    let mut locker = pg().session(&db.name);
    let mut lock_in = locker.stdin.take().unwrap();
    let mut lock_out = BufReader::new(locker.stdout.take().unwrap());
    writeln!(
        lock_in,
        "BEGIN; LOCK TABLE iu_collection IN EXCLUSIVE MODE; SELECT 'locked';"
    )
    .unwrap();
    let mut line = String::new();
    lock_out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "locked");
    let n = 300;
    let mut ids = Vec::new();
    for i in 0..n {
        let r = d.request(json!({
            "v": 1, "op": "submit", "command": "dot_iu_create_collection", "mode": "apply",
            "params": [["title", format!("crash-{i}")]], "idempotency_key": format!("crash-{i}")
        }));
        ids.push(r["job"]["job_id"].as_str().unwrap().to_string());
    }
    writeln!(lock_in, "COMMIT;").unwrap();
    drop(lock_in);
    // Kill it while jobs are running.
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(10),
        || db.count("dot_iu_command_run WHERE run_status = 'applied'") >= 3,
        || "jobs did not start".to_string(),
    );
    d.signal(nix::sys::signal::Signal::SIGKILL);
    d.wait_exit(Duration::from_secs(10));
    let at_kill = db.count("dot_iu_command_run WHERE run_status = 'applied'");
    assert!(
        at_kill < n as i64,
        "the kill came too late to test anything ({at_kill})"
    );
    let d = DaemonProc::start(&db);
    for id in &ids {
        let job = wait_terminal(&d, id);
        assert_eq!(job["state"], "applied", "{job}");
    }
    assert_eq!(
        db.count("dot_iu_command_run WHERE run_status = 'applied'"),
        n as i64
    );
    assert_eq!(
        db.sql("SELECT count(*) FROM (SELECT idempotency_key FROM dot_iu_command_run WHERE run_status = 'applied' GROUP BY 1 HAVING count(*) = 1) k"),
        n.to_string()
    );
    assert_eq!(
        db.sql("SELECT count(DISTINCT title) FROM iu_collection"),
        n.to_string()
    );
    assert_eq!(db.count("iu_collection"), n as i64, "no job ran twice");
    let _ = locker.wait();
    eprintln!("crash test: {at_kill} of {n} applied at SIGKILL; {n} of {n} applied exactly once after restart");
}

#[tokio::test]
async fn two_daemons_on_one_target_apply_each_key_once() {
    // An HA pair (or one daemon per ops host): two state dirs, one target,
    // the same idempotency keys submitted to both. The ledger arbitrates.
    let db = open_db().await;
    db.open_all();
    let second = db.dir.path().join("govsql2.toml");
    std::fs::write(
        &second,
        std::fs::read_to_string(&db.config_path)
            .unwrap()
            .replace("state_dir = \"state\"", "state_dir = \"state2\"")
            .replace("socket = \"govsql.sock\"", "socket = \"govsql2.sock\""),
    )
    .unwrap();
    govsql::switch::ApplySwitch::new(&db.dir.path().join("state2"))
        .set(true)
        .unwrap();
    let d1 = DaemonProc::start(&db);
    let d2 = DaemonProc::start_config(&db, &second, &db.dir.path().join("govsql2.sock"), &[]);
    let n = 40;
    let mut jobs = Vec::new();
    for i in 0..n {
        for d in [&d1, &d2] {
            let r = d.request(json!({
                "v": 1, "op": "submit", "command": "dot_iu_create_collection", "mode": "apply",
                "params": [["title", format!("ha-{i}")]], "idempotency_key": format!("ha-{i}")
            }));
            jobs.push((d, r["job"]["job_id"].as_str().unwrap().to_string()));
        }
    }
    for (d, id) in &jobs {
        let job = wait_terminal(d, id);
        assert_eq!(job["state"], "applied", "{job}");
    }
    assert_eq!(db.count("iu_collection"), n);
    assert_eq!(
        db.count("dot_iu_command_run WHERE run_mode = 'apply' AND run_status = 'applied'"),
        n
    );
}

/// A small tmpfs mounted at a path for the life of the guard.
struct Tmpfs(PathBuf);
impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=700"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a tmpfs (the disk-full drill needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }
}
impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test]
async fn a_full_state_disk_refuses_submits_clearly_and_nothing_stays_running() {
    let db = open_db().await;
    db.open_all();
    let state = db.config.daemon.state_dir.clone();
    let _disk = Tmpfs::mount(&state, "2m");
    db.switch(true);
    // The daemon starts and serves status even on a full disk.
    let filler = state.join("filler");
    let fill = || {
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=64k"])
            .arg(format!("of={}", filler.display()))
            .output();
    };
    let d = DaemonProc::start(&db);
    let first = submit(&d, "dot_iu_healthcheck", "verify", json!([]), true);
    assert_eq!(first["job"]["state"], "verified", "{first}");
    // A job running when the disk fills and the daemon is killed.
    let slow = submit(
        &d,
        "dot_iu_diag_sleep",
        "verify",
        json!([["seconds", "1"]]),
        false,
    );
    let slow_id = slow["job"]["job_id"].clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.request(json!({"v": 1, "op": "status", "job_id": slow_id}))["job"]["state"] != "running"
    {
        assert!(Instant::now() < deadline, "the job never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    fill();
    let refused = submit(&d, "dot_iu_healthcheck", "verify", json!([]), false);
    assert_eq!(refused["error"]["kind"], "unavailable", "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot write to disk"),
        "{refused}"
    );
    let health = d.cli(None, &["health"]);
    assert!(String::from_utf8_lossy(&health.stdout).contains("daemon pid"));
    // Killed and started again on the full disk: it comes up.
    drop(d);
    let d = DaemonProc::start(&db);
    let st = d.request(json!({"v": 1, "op": "status", "job_id": first["job"]["job_id"]}));
    assert_eq!(st["job"]["state"], "verified", "{st}");
    // Space again: submits work, the job that was running is settled, and
    // nothing was left running.
    std::fs::remove_file(&filler).unwrap();
    let settled = d.request(json!({"v": 1, "op": "wait", "job_id": slow_id, "timeout_s": 60}));
    assert_eq!(settled["job"]["state"], "verified", "{settled}");
    let again = submit(&d, "dot_iu_healthcheck", "verify", json!([]), true);
    assert_eq!(again["job"]["state"], "verified", "{again}");
    let counts = d.request(json!({"v": 1, "op": "health"}))["health"]["jobs"].clone();
    assert!(counts.get("running").is_none(), "{counts}");
    drop(d);
}

#[tokio::test]
async fn jobs_wait_for_a_target_that_is_down_and_unsettled_applies_are_settled() {
    let s = sshd::Sshd::start();
    let mut db = ssh_db(&s.target_toml(USER, &keys().ed25519), 10).await;
    configure(&mut db, OPEN_ACCESS, "");
    db.open_all();
    let d = DaemonProc::start(&db);

    // The target is down: a job in which nothing ran waits, then runs.
    s.stop();
    let j = submit(&d, "dot_iu_healthcheck", "verify", json!([]), false);
    let id = j["job"]["job_id"].as_str().unwrap().to_string();
    // Longer than one round of SSH connect backoff: the job goes back to
    // the queue (nothing ran) instead of failing.
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(200),
        || d.log_text().contains("job not over yet"),
        || d.log_text(),
    );
    let st = job_state(&d, &id);
    assert!(st == "queued" || st == "running", "{st}: {}", d.log_text());
    // Health tells the truth: the target is down, and says why.
    let health = d.cli(None, &["health"]);
    assert_eq!(health.status.code(), Some(4));
    let text = String::from_utf8_lossy(&health.stdout).into_owned();
    assert!(
        text.contains("UNREACHABLE") && text.contains("target_unreachable"),
        "{text}"
    );
    // A refusal decided while the target is down (a cancel) waits too:
    // its ledger row is written once the target is back.
    let waiting = submit(
        &d,
        "dot_iu_purge_piece",
        "apply",
        json!([["piece_id", "00000000-0000-0000-0000-00000000dead"]]),
        false,
    );
    let cancel_id = waiting["job"]["job_id"].as_str().unwrap().to_string();
    assert_eq!(waiting["job"]["state"], "awaiting_approval", "{waiting}");
    let cancelled = d.cli(None, &["cancel", &cancel_id]);
    assert_eq!(cancelled.status.code(), Some(0));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !d
        .log_text()
        .lines()
        .any(|l| l.contains("job not over yet") && l.contains(&cancel_id))
    {
        assert!(Instant::now() < deadline, "{}", d.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    s.launch();
    let done = wait_terminal(&d, &id);
    assert_eq!(done["state"], "verified", "{done}");
    let done = wait_terminal(&d, &cancel_id);
    assert_eq!(done["state"], "cancelled", "{done}");
    assert!(
        done["outcome"]["run_id"].is_number(),
        "the refusal has its row: {done}"
    );
    let health = d.cli(None, &["health"]);
    assert_eq!(
        health.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&health.stdout)
    );

    // An apply cut off mid-run while the target stays down: unsettled,
    // never reported failed; settled by its key once the target is back.
    // Its transaction is held on a table lock, so sshd is stopped while it
    // surely runs (no race with a loaded machine).
    let lock = TableLock::take(&db.name, "iu_collection");
    let j = submit(
        &d,
        "dot_iu_create_collection",
        "apply",
        json!([["title", "cut-off"]]),
        false,
    );
    let id = j["job"]["job_id"].as_str().unwrap().to_string();
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(50),
        || {
            db.sql("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND application_name LIKE 'govsql:%' AND datname = current_database()") != "0"
        },
        || "the apply never started".to_string(),
    );
    s.stop();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = job_state(&d, &id);
        assert_ne!(st, "failed", "{}", d.log_text());
        if st == "unsettled" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never unsettled: {st}\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A client waiting with a timeout is told it is still unsettled (5).
    let out = d.cli(None, &["status", &id, "--json"]);
    assert_eq!(out.status.code(), Some(0));
    // The orphaned transaction gets its lock and commits; then the target
    // is back and the job is settled by its key: applied once.
    lock.release();
    s.launch();
    let done = wait_terminal(&d, &id);
    assert_eq!(done["state"], "applied", "{done}");
    assert_eq!(
        db.count("dot_iu_command_run WHERE run_mode = 'apply' AND run_status = 'applied'"),
        1
    );
    assert_eq!(db.count("iu_collection WHERE title = 'cut-off'"), 1);
    s.stop();
}

#[tokio::test]
async fn a_job_that_gave_up_on_its_target_gets_its_ledger_row_once_the_target_is_back() {
    let s = sshd::Sshd::start();
    let toml = format!(
        "{}max_target_wait_s = 2\n",
        s.target_toml(USER, &keys().ed25519)
    );
    let mut db = ssh_db(&toml, 10).await;
    configure(&mut db, OPEN_ACCESS, "");
    let d = DaemonProc::start(&db);
    s.stop();
    let j = submit(&d, "dot_iu_healthcheck", "verify", json!([]), false);
    let id = j["job"]["job_id"].as_str().unwrap().to_string();
    let done = wait_terminal(&d, &id);
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["outcome"]["error_class"], "target_unreachable");
    assert!(done["outcome"]["run_id"].is_null());
    assert!(done["outcome"]["message"]
        .as_str()
        .unwrap()
        .contains("written once the target answers"));
    s.launch();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = d.request(json!({"v": 1, "op": "status", "job_id": id}));
        if st["job"]["outcome"]["run_id"].is_number() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the owed row was never written: {st}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        db.sql(&format!(
            "SELECT run_status || ' ' || (evidence->>'error_class') || ' ' || (evidence->>'submitted_at' IS NOT NULL) FROM dot_iu_command_run WHERE evidence->>'job_id' = '{id}'"
        )),
        "failed target_unreachable true"
    );
    s.stop();
}

#[tokio::test]
async fn a_batch_keeps_waiting_across_a_daemon_restart() {
    let db = open_db().await;
    let mut d = DaemonProc::start(&db);
    let file = db.dir.path().join("slow.jsonl");
    std::fs::write(
        &file,
        "{\"command\":\"dot_iu_diag_sleep\",\"mode\":\"verify\",\"params\":{\"seconds\":\"2\"}}\n\
         {\"command\":\"dot_iu_diag_sleep\",\"mode\":\"verify\",\"params\":{\"seconds\":\"2\"}}\n\
         {\"command\":\"dot_iu_healthcheck\",\"mode\":\"verify\"}\n",
    )
    .unwrap();
    let batch = Command::new(env!("CARGO_BIN_EXE_govsql"))
        .args(["batch", "--json"])
        .arg(&file)
        .env("GOVSQL_CONFIG", &db.config_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once the jobs are in the queue, the daemon goes away and comes back.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let h = d.request(json!({"v": 1, "op": "health"}));
        let n: i64 = h["health"]["jobs"]
            .as_object()
            .map(|m| m.values().filter_map(Value::as_i64).sum())
            .unwrap_or(0);
        if n >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "the batch did not submit");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Killed outright: the batch's connection breaks mid-wait; the jobs
    // that were running are run again after the restart.
    d.signal(nix::sys::signal::Signal::SIGKILL);
    d.wait_exit(Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(700));
    let _d = DaemonProc::start(&db);
    let out = batch.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["summary"], json!({"verified": 3}), "{j}");
    assert!(
        err.contains("reconnecting"),
        "the wait never lost the daemon: {err}"
    );
}

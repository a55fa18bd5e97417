//! No param value outside its job's own execution: not in the daemon's
//! log, the queue file, any file of the state dir, the command line, or a
//! result kept past its submitter.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::daemon::*;
use crate::harness::*;
use crate::sshd::{self, keys, USER};

#[tokio::test]
async fn no_param_value_in_the_daemon_log_or_the_queue_file() {
    let db = open_db().await;
    db.open_all();
    let d = DaemonProc::start(&db);
    let canary = "CANARY-d43m0n-77";
    let coll = submit(
        &d,
        "dot_iu_create_collection",
        "apply",
        json!([["title", canary]]),
        true,
    );
    assert_eq!(coll["job"]["state"], "applied", "{coll}");
    let id: Value =
        serde_json::from_str(coll["job"]["outcome"]["result"][0][0].as_str().unwrap()).unwrap();
    let cid = id["collection_id"].as_str().unwrap();
    for (mode, params) in [
        ("apply", json!([["collection_id", cid], ["body", canary]])),
        ("plan", json!([["collection_id", cid], ["body", canary]])),
        ("apply", json!([["collection_id", canary], ["body", "x"]])),
        ("apply", json!([["nosuch", canary]])),
    ] {
        let r = submit(&d, "dot_iu_add_piece", mode, params, true);
        assert!(
            !r.to_string().contains(canary) || mode == "apply" && r["job"]["state"] == "applied",
            "{r}"
        );
    }
    let r = submit(
        &d,
        "dot_no_such_command",
        "apply",
        json!([["x", canary]]),
        true,
    );
    // Refused before anything is stored or held.
    assert_eq!(r["error"]["kind"], "unknown_command", "{r}");
    assert!(r["job"].is_null());
    let r = d.raw(format!("{{\"v\":1,\"op\":\"submit\",\"command\":\"x\",\"mode\":\"apply\",\"params\":[[\"a\",\"{canary}\",3]]}}\n").as_bytes());
    assert!(!r.unwrap().to_string().contains(canary));
    let log = d.log_text();
    assert!(log.contains("job finished"), "the log has job lines: {log}");
    assert!(!log.contains(canary), "the daemon log leaks a value");
    assert!(!db.ledger_text().contains(canary));
    // The queue checkpoints its WAL once idle (at most a second after a
    // job ends): then no file of it holds the value.
    let holds_canary = || {
        ["queue.db", "queue.db-wal"].iter().any(|f| {
            std::fs::read(db.config.daemon.state_dir.join(f))
                .map(|bytes| String::from_utf8_lossy(&bytes).contains(canary))
                .unwrap_or(false)
        })
    };
    wait_until(
        Duration::from_secs(3),
        Duration::from_millis(50),
        || !holds_canary(),
        || "the queue keeps a value after its jobs ended".to_string(),
    );
    let mode = std::fs::metadata(db.config.daemon.state_dir.join("queue.db"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test]
async fn after_many_jobs_no_value_is_left_in_any_file_of_the_state_dir() {
    let db = open_db().await;
    db.open_all();
    let d = DaemonProc::start(&db);
    let coll = "00000000-0000-0000-0000-0000000000c1";
    let n = 400;
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let body = format!("QCANARY{i:05}-").repeat(150);
        let j = submit(
            &d,
            "dot_iu_add_piece",
            "plan",
            json!([["collection_id", coll], ["body", body]]),
            false,
        );
        ids.push(j["job"]["job_id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        assert_eq!(wait_terminal(&d, id)["state"], "planned");
    }
    let state_dir = db.config.daemon.state_dir.clone();
    let leaks = || -> usize {
        std::fs::read_dir(&state_dir)
            .unwrap()
            .flatten()
            .map(|e| {
                let bytes = std::fs::read(e.path()).unwrap_or_default();
                bytes.windows(7).filter(|w| w == b"QCANARY").count()
            })
            .sum()
    };
    // Once the daemon is idle, the pages that held the values are scrubbed.
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || leaks() == 0,
        || format!("{} value fragments left in state_dir", leaks()),
    );
    // And after a kill -9 and a restart, nothing comes back.
    d.signal(nix::sys::signal::Signal::SIGKILL);
    drop(d);
    let d = DaemonProc::start(&db);
    assert_eq!(leaks(), 0);
    drop(d);
}

#[tokio::test]
async fn values_stay_off_the_command_line_and_a_job_can_be_waited_for_again() {
    // Through the real daemon over SSH.
    let s = sshd::shared();
    let mut db = ssh_db(&s.target_toml(USER, &keys().ed25519), 30).await;
    configure(&mut db, OPEN_ACCESS, "");
    db.open_all();
    let d = DaemonProc::start(&db);
    // A collection, then a 1 MiB body read from a file, through the daemon.
    let coll = json_of(&d.cli(
        None,
        &[
            "apply",
            "dot_iu_create_collection",
            "--param",
            "title=files",
            "--wait",
            "--json",
        ],
    ));
    let cid: Value = serde_json::from_str(coll["result"][0][0].as_str().unwrap()).unwrap();
    let cid = cid["collection_id"].as_str().unwrap().to_string();
    let body = db.dir.path().join("body.txt");
    let big = "\\\"'$$~|~\u{e9}\n".repeat(1024 * 1024 / 16);
    std::fs::write(&body, &big).unwrap();
    let add = d.cli(
        None,
        &[
            "apply",
            "dot_iu_add_piece",
            "--param",
            &format!("collection_id={cid}"),
            "--param",
            &format!("body=@{}", body.display()),
            "--wait",
            "--json",
        ],
    );
    let add = json_of(&add);
    assert_eq!(add["status"], "applied", "{add}");
    assert_eq!(
        db.sql("SELECT octet_length(body) FROM iu_piece"),
        big.len().to_string()
    );
    // All params as one JSON object on stdin.
    let mut child = Command::new(env!("CARGO_BIN_EXE_govsql"))
        .args([
            "verify",
            "dot_iu_collection_validate",
            "--params-json",
            "-",
            "--wait",
            "--json",
        ])
        .env("GOVSQL_CONFIG", &db.config_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{{\"collection_id\": \"{cid}\"}}").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(json_of(&out)["status"], "verified");
    // A missing file names the file, never a value.
    let missing = d.cli(
        None,
        &[
            "apply",
            "dot_iu_create_collection",
            "--param",
            "title=@/nonexistent/x",
        ],
    );
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/x"));
    // wait re-attaches; --timeout ends the wait with 5 while the job goes on.
    let slow = json_of(&d.cli(
        None,
        &[
            "verify",
            "dot_iu_diag_sleep",
            "--param",
            "seconds=2",
            "--json",
        ],
    ));
    let id = slow["job_id"].as_str().unwrap().to_string();
    let early = d.cli(None, &["wait", &id, "--timeout", "1"]);
    assert_eq!(
        early.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&early.stderr)
    );
    let done = d.cli(None, &["wait", &id, "--json"]);
    assert_eq!(done.status.code(), Some(0));
    assert_eq!(json_of(&done)["status"], "verified");
    // A client whose config cannot be read fails; it never falls back to a
    // default daemon.
    let out = Command::new(env!("CARGO_BIN_EXE_govsql"))
        .args(["jobs"])
        .env("GOVSQL_CONFIG", "/nonexistent/govsql.toml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("cannot read config /nonexistent/govsql.toml"));
}

#[tokio::test]
async fn a_result_is_kept_for_its_submitter_for_result_ttl_then_erased() {
    let mut db = test_db().await;
    configure(&mut db, OPEN_ACCESS, "result_ttl_s = 5\n");
    let mut d = DaemonProc::start(&db);
    let out = d.cli(None, &["verify", "--json"]);
    let id = serde_json::from_slice::<Value>(&out.stdout).unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(wait_terminal(&d, &id)["state"], "verified");
    // A restart forgets everything in memory: the result comes from the
    // queue, to its submitter.
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(30)), Some(0));
    let d = DaemonProc::start(&db);
    let status = |who: Option<&str>| -> Value {
        let out = d.cli(who, &["status", &id, "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    let mine = status(None);
    assert!(mine["result"].to_string().contains("orphans"), "{mine}");
    // Another user never sees it.
    let other = status(Some(OTHER));
    assert!(!other.to_string().contains("orphans"), "{other}");
    // Past result_ttl_s it is erased, and the file keeps no trace.
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(200),
        || status(None)["result"].is_null(),
        || "the result outlived result_ttl_s".to_string(),
    );
    let queue = db.config.daemon.state_dir.join("queue.db");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let bytes = std::fs::read(&queue).unwrap_or_default();
        let wal =
            std::fs::read(db.config.daemon.state_dir.join("queue.db-wal")).unwrap_or_default();
        if !bytes
            .windows(7)
            .chain(wal.windows(7))
            .any(|w| w == b"orphans")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the erased result is still in the queue files"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

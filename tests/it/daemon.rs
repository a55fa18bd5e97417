//! The daemon as a real process: socket protocol, peer credentials with a
//! second real unix user, approvals, crash recovery with SIGKILL, signals,
//! logs without values.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::*;
use crate::sshd::{self, keys, USER};

/// A second real unix user (created by the SSH harness).
pub(crate) const OTHER: &str = "govsqlt_dash";

/// A `govsql daemon` child process with its log file.
pub(crate) struct DaemonProc {
    child: Option<Child>,
    log: PathBuf,
    config: PathBuf,
    socket: PathBuf,
}

impl DaemonProc {
    pub(crate) fn start(db: &TestDb) -> DaemonProc {
        DaemonProc::start_with(db, &[])
    }

    pub(crate) fn start_with(db: &TestDb, envs: &[(&str, &Path)]) -> DaemonProc {
        DaemonProc::start_config(db, &db.config_path, &db.config.daemon.socket, envs)
    }

    /// A daemon of another config (e.g. a second daemon on the same target).
    fn start_config(
        db: &TestDb,
        config: &Path,
        socket: &Path,
        envs: &[(&str, &Path)],
    ) -> DaemonProc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_govsql"));
        cmd.envs(envs.iter().map(|(k, v)| (*k, v.as_os_str())));
        DaemonProc::spawn(db, cmd, config, socket)
    }

    /// Starts `cmd` (the govsql binary, maybe confined) as the daemon of
    /// `config` and waits until its socket answers.
    pub(crate) fn spawn(db: &TestDb, mut cmd: Command, config: &Path, socket: &Path) -> DaemonProc {
        let log = db.dir.path().join(format!(
            "daemon-{}.log",
            Instant::now().elapsed().as_nanos()
        ));
        let log = if log.exists() {
            db.dir.path().join("daemon-2.log")
        } else {
            log
        };
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = cmd
            .arg("daemon")
            .env("GOVSQL_CONFIG", config)
            .env("GOVSQL_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap();
        let d = DaemonProc {
            child: Some(child),
            log,
            config: config.to_path_buf(),
            socket: socket.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if UnixStream::connect(&d.socket).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not start: {}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(crate) fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub(crate) fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return st.code();
            }
            assert!(Instant::now() < deadline, "daemon did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs the CLI (which must exit 0) and parses its stdout as JSON.
    fn cli_json(&self, as_user: Option<&str>, args: &[&str]) -> Value {
        let out = self.cli(as_user, args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Runs the CLI against this daemon, optionally as another user.
    pub(crate) fn cli(&self, as_user: Option<&str>, args: &[&str]) -> std::process::Output {
        let mut c = match as_user {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--"]).arg(test_bin());
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_govsql")),
        };
        c.args(args)
            .env("GOVSQL_CONFIG", &self.config)
            .output()
            .unwrap()
    }

    /// One raw request line; the reply as JSON.
    fn raw(&self, line: &[u8]) -> Option<Value> {
        let mut s = UnixStream::connect(&self.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s.write_all(line).unwrap();
        let mut r = BufReader::new(s);
        let mut out = String::new();
        r.read_line(&mut out).ok()?;
        if out.is_empty() {
            None
        } else {
            Some(serde_json::from_str(&out).unwrap())
        }
    }

    pub(crate) fn request(&self, v: Value) -> Value {
        let mut line = serde_json::to_vec(&v).unwrap();
        line.push(b'\n');
        self.raw(&line).expect("a reply")
    }
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Rewrites the test config with an [access] table and extra [daemon] keys,
/// and opens the directory to the second user.
pub(crate) fn configure(db: &mut TestDb, access: &str, daemon_extra: &str) {
    let text = std::fs::read_to_string(&db.config_path).unwrap();
    let text = text.replacen(
        "[daemon]\n",
        &format!("[daemon]\nsocket_mode = \"0666\"\n{daemon_extra}"),
        1,
    );
    let text = text.replacen(
        "[targets.main]",
        &format!("[access]\n{access}\n[targets.main]"),
        1,
    );
    std::fs::write(&db.config_path, text).unwrap();
    db.config = govsql::config::Config::load(&db.config_path).unwrap();
    std::fs::set_permissions(db.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for f in ["govsql.toml", "catalog.toml"] {
        std::fs::set_permissions(
            db.dir.path().join(f),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
    }
    sshd::ensure_users();
}

pub(crate) const OPEN_ACCESS: &str =
    "plan = [\"*\"]\napply = [\"*\"]\nverify = [\"*\"]\napprove = [\"*\"]\n";

pub(crate) fn submit(
    d: &DaemonProc,
    command: &str,
    mode: &str,
    params: Value,
    wait: bool,
) -> Value {
    d.request(json!({"v": 1, "op": "submit", "command": command, "mode": mode, "params": params, "wait": wait}))
}

pub(crate) fn wait_terminal(d: &DaemonProc, job_id: &str) -> Value {
    let r = d.request(json!({"v": 1, "op": "wait", "job_id": job_id, "timeout_s": 120}));
    assert_eq!(r["ok"], true, "{r}");
    r["job"].clone()
}

#[tokio::test]
async fn seed_proof_through_the_daemon_over_ssh() {
    let s = sshd::shared();
    let mut db = ssh_db(&s.target_toml(USER, &keys().ed25519), 20).await;
    configure(&mut db, OPEN_ACCESS, "");
    db.switch(true);
    let d = DaemonProc::start(&db);
    let run = |args: &[&str]| {
        let out = d.cli(None, args);
        let j: Value = json_of(&out);
        (out.status.code(), j)
    };
    let (code, p1) = run(&["plan", "dot_iu_healthcheck", "--wait", "--json"]);
    assert_eq!((code, p1["status"].as_str()), (Some(0), Some("planned")));
    db.gate("iu_core.operator_runtime_enabled", true);
    let (code, p2) = run(&["apply", "dot_iu_healthcheck", "--wait", "--json"]);
    assert_eq!(
        (code, p2["status"].as_str()),
        (Some(0), Some("applied")),
        "{p2}"
    );
    assert_eq!(p2["evidence"]["transport"], "ssh");
    assert!(p2["result"].is_array(), "the submitter sees the result");
    let (code, p3) = run(&["verify", "--wait", "--json"]);
    assert_eq!((code, p3["status"].as_str()), (Some(0), Some("verified")));
    db.gate("iu_core.operator_runtime_enabled", false);
    let (code, p4) = run(&[
        "apply",
        "dot_iu_add_piece",
        "--param",
        "collection_id=00000000-0000-0000-0000-000000000001",
        "--param",
        "body=x",
        "--wait",
        "--json",
    ]);
    assert_eq!((code, p4["status"].as_str()), (Some(3), Some("refused")));
    assert_seed_figures(&db);
    // Without --wait: queued, exit 0, then status shows the outcome, with
    // its result to its submitter (kept for result_ttl_s).
    let out = d.cli(None, &["verify", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let j: Value = json_of(&out);
    let id = j["job_id"].as_str().unwrap().to_string();
    let done = wait_terminal(&d, &id);
    assert_eq!(done["state"], "verified");
    let st = d.cli(None, &["status", &id, "--json"]);
    let st = json_of(&st);
    assert_eq!(st["status"], "verified");
    assert!(st["result"].to_string().contains("orphans"), "{st}");
    let h = d.cli(None, &["health", "--json"]);
    let h = json_of(&h);
    assert_eq!(h["workers_alive"], true);
    assert!(h["targets"][0].as_str().unwrap().contains("ssh"));
}

#[tokio::test]
async fn malformed_requests_get_clear_errors_and_the_daemon_keeps_serving() {
    let mut db = test_db().await;
    configure(&mut db, OPEN_ACCESS, "");
    let d = DaemonProc::start(&db);
    let long = {
        let mut v = vec![b'{'; 1024 * 1024 + 10];
        v.push(b'\n');
        v
    };
    let cases: Vec<Vec<u8>> = vec![
        b"\n{}\n".to_vec(),
        b"hello\n".to_vec(),
        b"{\n".to_vec(),
        b"[]\n".to_vec(),
        b"null\n".to_vec(),
        b"42\n".to_vec(),
        b"\"string\"\n".to_vec(),
        b"\xff\xfe\xfd\n".to_vec(),
        b"{\"v\":1}\n".to_vec(),
        b"{\"op\":\"health\"}\n".to_vec(),
        b"{\"v\":2,\"op\":\"health\"}\n".to_vec(),
        b"{\"v\":\"1\",\"op\":\"health\"}\n".to_vec(),
        b"{\"v\":1,\"op\":\"nuke\"}\n".to_vec(),
        b"{\"v\":1,\"op\":\"submit\"}\n".to_vec(),
        b"{\"v\":1,\"op\":\"submit\",\"command\":\"dot_iu_healthcheck\"}\n".to_vec(),
        b"{\"v\":1,\"op\":\"submit\",\"command\":\"dot_iu_healthcheck\",\"mode\":\"destroy\"}\n".to_vec(),
        b"{\"v\":1,\"op\":\"submit\",\"command\":\"dot_iu_healthcheck\",\"mode\":\"plan\",\"actor\":\"postgres\"}\n".to_vec(),
        b"{\"v\":1,\"op\":\"submit\",\"command\":\"dot_iu_healthcheck\",\"mode\":\"plan\",\"params\":\"x\"}\n".to_vec(),
        b"{\"v\":1,\"op\":\"submit\",\"command\":\"dot_iu_healthcheck\",\"mode\":\"plan\",\"params\":[[1,2]]}\n".to_vec(),
        b"{\"v\":1,\"op\":\"submit\",\"command\":\"dot_iu_healthcheck\",\"mode\":\"plan\",\"target\":\"nowhere\"}\n".to_vec(),
        b"{\"v\":1,\"op\":\"status\"}\n".to_vec(),
        b"{\"v\":1,\"op\":\"status\",\"job_id\":\"nope\"}\n".to_vec(),
        b"{\"v\":1,\"op\":\"status\",\"job_id\":7}\n".to_vec(),
        b"{\"v\":1,\"op\":\"wait\",\"job_id\":\"nope\"}\n".to_vec(),
        b"{\"v\":1,\"op\":\"approve\",\"job_id\":\"nope\"}\n".to_vec(),
        b"{\"v\":1,\"op\":\"cancel\",\"job_id\":\"nope\"}\n".to_vec(),
        b"{\"v\":1,\"op\":\"list\",\"limit\":-1}\n".to_vec(),
        b"{\"v\":1,\"op\":\"health\",\"x\":1}\n".to_vec(),
        b"{\"v\":1,\"op\":\"health\"}{\"v\":1}\n".to_vec(),
        b"{\"v\":1,\"op\":\"health\"\0}\n".to_vec(),
        b"{\"v\":1e999,\"op\":\"health\"}\n".to_vec(),
        long,
    ];
    assert!(cases.len() >= 30);
    for (i, case) in cases.iter().enumerate() {
        match d.raw(case) {
            Some(reply) => {
                assert_eq!(reply["ok"], false, "case {i} should fail: {reply}");
                let msg = reply["error"]["message"].as_str().unwrap();
                assert!(!msg.is_empty(), "case {i}");
            }
            None => assert_eq!(
                i,
                cases.len() - 1,
                "only the over-long line may be closed without a reply"
            ),
        }
    }
    // A silent client is closed within the bound, and others are served meanwhile.
    let mut silent = UnixStream::connect(&d.socket).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let h = d.request(json!({"v": 1, "op": "health"}));
    assert_eq!(h["ok"], true);
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let n = silent.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without a reply");
    assert!(started.elapsed() < Duration::from_secs(15));
    let h = d.request(json!({"v": 1, "op": "health"}));
    assert_eq!(h["ok"], true, "still serving");
}

#[tokio::test]
async fn peer_credentials_decide_and_name_the_actor() {
    let mut db = test_db().await;
    configure(
        &mut db,
        &format!(
            "plan = [\"@{}\"]\napply = [\"root\"]\nverify = [\"{OTHER}\", \"root\"]\napprove = [\"root\"]\n",
            sshd::OPS_GROUP
        ),
        "",
    );
    db.open_all();
    let d = DaemonProc::start(&db);
    // The other user may verify: the ledger names that user.
    let out = d.cli(Some(OTHER), &["verify", "--wait", "--json"]);
    let j: Value = json_of(&out);
    assert_eq!(j["status"], "verified", "{j}");
    let run_id = j["run_id"].as_i64().unwrap();
    assert_eq!(
        db.sql(&format!(
            "SELECT actor FROM dot_iu_command_run WHERE run_id = {run_id}"
        )),
        OTHER
    );
    // But not apply: refused, audited with its name, and told which list.
    let out = d.cli(
        Some(OTHER),
        &[
            "apply",
            "dot_iu_create_collection",
            "--param",
            "title=x",
            "--wait",
            "--json",
        ],
    );
    assert_eq!(out.status.code(), Some(3));
    let j: Value = json_of(&out);
    assert_eq!(j["error_class"], "not_allowed");
    assert!(j["message"].as_str().unwrap().contains("apply list"), "{j}");
    assert_eq!(
        db.sql(&format!(
            "SELECT actor, run_status FROM dot_iu_command_run WHERE run_id = {}",
            j["run_id"]
        )),
        format!("{OTHER}|refused")
    );
    assert_eq!(db.count("iu_collection"), 0);
    // @group entries match supplementary groups: the other user may plan
    // through its group; root, not in it, may not.
    let out = d.cli(
        Some(OTHER),
        &["plan", "dot_iu_healthcheck", "--wait", "--json"],
    );
    let j: Value = json_of(&out);
    assert_eq!(j["status"], "planned", "{j}");
    let out = d.cli(None, &["plan", "dot_iu_healthcheck", "--wait", "--json"]);
    let j: Value = json_of(&out);
    assert_eq!(j["error_class"], "not_allowed", "{j}");
    // Root may apply; the ledger says root.
    let out = d.cli(
        None,
        &[
            "apply",
            "dot_iu_create_collection",
            "--param",
            "title=x",
            "--wait",
            "--json",
        ],
    );
    let j: Value = json_of(&out);
    assert_eq!(j["status"], "applied", "{j}");
    assert_eq!(
        db.sql(&format!(
            "SELECT actor FROM dot_iu_command_run WHERE run_id = {}",
            j["run_id"]
        )),
        "root"
    );
}

#[tokio::test]
async fn approvals_need_a_different_user_and_expire() {
    let mut db = test_db().await;
    configure(
        &mut db,
        &format!("plan = [\"*\"]\napply = [\"*\"]\nverify = [\"*\"]\napprove = [\"root\", \"{OTHER}\"]\n"),
        "approval_ttl_s = 3\n",
    );
    db.open_all();
    let d = DaemonProc::start(&db);
    let piece = "00000000-0000-0000-0000-00000000000a";
    db.sql(&format!(
        "INSERT INTO iu_collection (collection_id, title) VALUES ('00000000-0000-0000-0000-0000000000c0', 'c'); \
         INSERT INTO iu_piece (piece_id, collection_id, body, deleted_at) VALUES ('{piece}', '00000000-0000-0000-0000-0000000000c0', 'b', now())"
    ));
    let j = submit(
        &d,
        "dot_iu_purge_piece",
        "apply",
        json!([["piece_id", piece]]),
        false,
    );
    let id = j["job"]["job_id"].as_str().unwrap().to_string();
    assert_eq!(j["job"]["state"], "awaiting_approval");
    // Nothing runs while it waits.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(db.count("dot_iu_command_run"), 0);
    // The submitter cannot approve its own job.
    let own = d.cli(None, &["approve", &id]);
    assert_eq!(own.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&own.stderr).contains("different user"));
    // Another approver can.
    let other = d.cli(Some(OTHER), &["approve", &id]);
    assert_eq!(
        other.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&other.stderr)
    );
    let done = wait_terminal(&d, &id);
    assert_eq!(done["state"], "applied", "{done}");
    assert_eq!(done["approved_by"], OTHER);
    assert_eq!(
        db.sql(&format!(
            "SELECT evidence->>'approved_by' FROM dot_iu_command_run WHERE run_id = {}",
            done["outcome"]["run_id"]
        )),
        OTHER
    );
    // An approval that comes too late is refused as expired, and audited.
    let j = submit(
        &d,
        "dot_iu_purge_piece",
        "apply",
        json!([["piece_id", piece]]),
        false,
    );
    let late = j["job"]["job_id"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(4500));
    let out = d.cli(Some(OTHER), &["approve", &late]);
    assert_ne!(out.status.code(), Some(0));
    let done = wait_terminal(&d, &late);
    assert_eq!(done["state"], "refused");
    assert_eq!(done["outcome"]["error_class"], "approval_expired");
    assert!(done["outcome"]["run_id"].is_i64());
    // Cancel: a waiting job ends cancelled, audited as refused (cancelled).
    let j = submit(
        &d,
        "dot_iu_purge_piece",
        "apply",
        json!([["piece_id", piece]]),
        false,
    );
    let c = j["job"]["job_id"].as_str().unwrap().to_string();
    let out = d.cli(None, &["cancel", &c]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It prints the state the job reached, not the `queued` it passes.
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.starts_with("cancelled"), "{said}");
    let done = wait_terminal(&d, &c);
    assert_eq!(done["state"], "cancelled");
    assert_eq!(done["outcome"]["error_class"], "cancelled");
}

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
    let deadline = Instant::now() + Duration::from_secs(60);
    while db.count("dot_iu_command_run WHERE run_status = 'applied'") < 3 {
        assert!(Instant::now() < deadline, "jobs did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
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
async fn no_param_value_in_the_daemon_log_or_the_queue_file() {
    let mut db = test_db().await;
    configure(&mut db, OPEN_ACCESS, "");
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
    let deadline = Instant::now() + Duration::from_secs(3);
    while holds_canary() {
        assert!(
            Instant::now() < deadline,
            "the queue keeps a value after its jobs ended"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mode = std::fs::metadata(db.config.daemon.state_dir.join("queue.db"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test]
async fn lifecycle_lock_sigterm_drain_and_sighup_reload() {
    let mut db = test_db().await;
    configure(&mut db, OPEN_ACCESS, "");
    db.open_all();
    // systemd's notify socket: READY, WATCHDOG heartbeats, STOPPING.
    let notify_path = db.dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut d = DaemonProc::start_with(
        &db,
        &[
            ("NOTIFY_SOCKET", notify_path.as_path()),
            ("WATCHDOG_USEC", Path::new("400000")),
        ],
    );
    // Drained all along, as systemd does: a datagram socket queues only
    // a few messages (net.unix.max_dgram_qlen) and the daemon never blocks.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let reader = {
        let seen = seen.clone();
        let notify = notify.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok(n) = notify.recv(&mut buf) {
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        })
    };
    let has = |what: &str| seen.lock().unwrap().iter().any(|m| m == what);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(has("READY=1") && has("WATCHDOG=1")) {
        assert!(Instant::now() < deadline, "no READY and WATCHDOG");
        std::thread::sleep(Duration::from_millis(20));
    }
    // self-test sees the running daemon and the database.
    let st = d.cli(None, &["self-test"]);
    assert_eq!(
        st.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&st.stdout)
    );
    // A second daemon on the same state directory says who holds it.
    let second = Command::new(env!("CARGO_BIN_EXE_govsql"))
        .arg("daemon")
        .env("GOVSQL_CONFIG", &db.config_path)
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains(&format!("pid {}", d.pid())), "{err}");
    // SIGHUP with a broken catalog keeps the old one.
    let digest = |d: &DaemonProc| {
        d.request(json!({"v": 1, "op": "health"}))["health"]["catalog_digest"].clone()
    };
    let before = digest(&d);
    let cat = db.dir.path().join("catalog.toml");
    let good = std::fs::read_to_string(&cat).unwrap();
    std::fs::write(&cat, "this is not a catalog").unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.log_text().contains("catalog reload refused") {
        assert!(Instant::now() < deadline, "no reload attempt logged");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(digest(&d), before);
    // `systemctl status` shows the refusal while it stands...
    let last_status = || {
        seen.lock()
            .unwrap()
            .iter()
            .rev()
            .find_map(|m| {
                m.lines()
                    .find(|l| l.starts_with("STATUS="))
                    .map(str::to_string)
            })
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !last_status().contains("catalog reload refused") {
        assert!(Instant::now() < deadline, "STATUS: {}", last_status());
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = submit(&d, "dot_iu_healthcheck", "verify", json!([]), true);
    assert_eq!(r["job"]["state"], "verified");
    // A valid change is picked up.
    std::fs::write(&cat, good.replace("Whole-database health", "Health")).unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while digest(&d) == before {
        assert!(
            Instant::now() < deadline,
            "a valid catalog was not picked up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // ...and a good reload replaces it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while last_status().contains("refused") {
        assert!(Instant::now() < deadline, "STATUS: {}", last_status());
        std::thread::sleep(Duration::from_millis(50));
    }
    // SIGTERM lets a running job finish, then exits 0.
    let r = submit(
        &d,
        "dot_iu_diag_sleep",
        "verify",
        json!([["seconds", "2"]]),
        false,
    );
    let id = r["job"]["job_id"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(500));
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(d.wait_exit(Duration::from_secs(30)), Some(0));
    assert!(!Path::new(&db.config.daemon.socket).exists());
    // The reader ends at its read timeout once the daemon is gone.
    reader.join().unwrap();
    assert!(has("STOPPING=1"), "STOPPING=1 was sent");
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .any(|m| m.starts_with("STATUS=queued")),
        "a STATUS= line for systemctl status"
    );
    assert_eq!(db.count("dot_iu_command_run WHERE run_mode = 'verify' AND run_status = 'verified' AND evidence->>'job_id' = '{id}'".replace("{id}", &id).as_str()), 1);
}

#[tokio::test]
async fn batch_checks_first_reports_per_line_and_summarises_over_ssh() {
    let s = sshd::shared();
    let mut db = ssh_db(&s.target_toml(USER, &keys().ed25519), 30).await;
    configure(&mut db, OPEN_ACCESS, "");
    db.open_all();
    let d = DaemonProc::start(&db);
    let file = db.dir.path().join("jobs.jsonl");
    let mut lines = String::new();
    for i in 0..5 {
        lines.push_str(&format!("{{\"command\":\"dot_iu_create_collection\",\"mode\":\"apply\",\"params\":{{\"title\":\"b{i}\"}}}}\n"));
    }
    lines.push_str("{\"command\":\"dot_iu_healthcheck\",\"mode\":\"verify\"}\n");
    lines.push_str("{\"command\":\"dot_iu_add_piece\",\"mode\":\"apply\",\"params\":{\"collection_id\":\"nope\",\"body\":\"x\"}}\n");
    std::fs::write(&file, &lines).unwrap();
    let path = file.to_str().unwrap();

    // --check: every line checked by the daemon, nothing queued.
    let out = d.cli(None, &["batch", "--check", path]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("line 1 "), "{text}");
    assert!(
        text.contains("line 7 ") && text.contains("rejected"),
        "{text}"
    );
    assert!(
        text.contains("collection_id"),
        "the bad param is named: {text}"
    );
    assert!(!text.contains("nope"), "a param value was printed: {text}");
    assert!(
        text.contains("batch of 7 lines checked, nothing submitted: checked 6, rejected 1"),
        "{text}"
    );
    assert_eq!(out.status.code(), Some(2));
    let h = d.request(json!({"v": 1, "op": "health"}));
    assert_eq!(h["health"]["jobs"], json!({}), "--check queued a job");

    // A line that is not JSON: nothing is submitted at all.
    let broken = db.dir.path().join("broken.jsonl");
    std::fs::write(&broken, format!("{lines}not json\n")).unwrap();
    let out = d.cli(None, &["batch", broken.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(":8: not a job line"), "{err}");
    assert_eq!(
        d.request(json!({"v": 1, "op": "health"}))["health"]["jobs"],
        json!({})
    );

    // The real run: per-line report of what did not succeed, the summary
    // counts lines, the exit code is the worst outcome's.
    let out = d.cli(None, &["batch", path]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("batch of 7 lines: applied 5, refused 1, verified 1"),
        "{text}"
    );
    assert!(
        text.contains("line 7 ") && text.contains("bad_params"),
        "{text}"
    );
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(db.count("iu_collection"), 5);
    // A body of the catalog's maximum size (1 MiB) goes through batch and
    // the socket end to end.
    let coll = db.sql("SELECT collection_id FROM iu_collection LIMIT 1");
    let big = db.dir.path().join("big.jsonl");
    let body = "b".repeat(1_048_576);
    std::fs::write(
        &big,
        format!("{{\"command\":\"dot_iu_add_piece\",\"mode\":\"apply\",\"params\":{{\"collection_id\":\"{coll}\",\"body\":\"{body}\"}}}}\n"),
    )
    .unwrap();
    let out = d.cli(None, &["batch", big.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("batch of 1 line: applied 1"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        db.sql("SELECT max(octet_length(body)) FROM iu_piece"),
        "1048576"
    );
    // --json: one object, a line per job with its id and status.
    let two = db.dir.path().join("two.jsonl");
    std::fs::write(&two, "{\"command\":\"dot_iu_healthcheck\",\"mode\":\"verify\"}\n\n{\"command\":\"dot_iu_healthcheck\",\"mode\":\"verify\"}\n").unwrap();
    let out = d.cli(None, &["batch", "--json", two.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0));
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["summary"], json!({"verified": 2}));
    assert_eq!(j["lines"][0]["line"], 1);
    assert_eq!(j["lines"][1]["line"], 3);
    assert!(j["lines"][1]["job_id"].is_string());
    assert_eq!(j["lines"][1]["status"], "verified");
}

#[tokio::test]
async fn a_wait_that_arrives_after_delivery_but_before_the_record_is_answered() {
    // The worker hands the outcome to waiters, then writes the queue row;
    // a wait arriving in between used to find `running` and sleep for an
    // hour (a 10 000-job batch hung on it). The hook widens the window.
    let mut db = test_db().await;
    configure(&mut db, OPEN_ACCESS, "");
    let d = DaemonProc::start_with(&db, &[("GOVSQL_TEST_RECORD_DELAY_MS", Path::new("3000"))]);
    let r = submit(&d, "dot_iu_healthcheck", "verify", json!([]), false);
    let id = r["job"]["job_id"].as_str().unwrap().to_string();
    // The job runs in milliseconds; its record waits 3 s.
    let deadline = Instant::now() + Duration::from_secs(2);
    while db.count("dot_iu_command_run") == 0 {
        assert!(Instant::now() < deadline, "the job did not run");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(job_state(&d, &id), "running", "the window is open");
    let started = Instant::now();
    let r = d.request(json!({"v": 1, "op": "wait", "job_id": id, "timeout_s": 10}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["job"]["state"], "verified");
    assert!(started.elapsed() < Duration::from_secs(2), "the wait slept");
}

fn job_state(d: &DaemonProc, id: &str) -> String {
    let r = d.request(json!({"v": 1, "op": "status", "job_id": id}));
    r["job"]["state"].as_str().unwrap_or("?").to_string()
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
    let deadline = Instant::now() + Duration::from_secs(30);
    while !d.log_text().contains("job not over yet") {
        assert!(Instant::now() < deadline, "{}", d.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
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
    let deadline = Instant::now() + Duration::from_secs(20);
    while db.sql("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND application_name LIKE 'govsql:%' AND datname = current_database()") == "0" {
        assert!(Instant::now() < deadline, "the apply never started");
        std::thread::sleep(Duration::from_millis(50));
    }
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
async fn users_see_their_own_jobs_and_none_can_hog_the_socket() {
    let mut db = test_db().await;
    configure(
        &mut db,
        OPEN_ACCESS
            .replace("approve = [\"*\"]", "approve = []")
            .as_str(),
        "",
    );
    db.open_all();
    let d = DaemonProc::start(&db);
    let mine = submit(&d, "dot_iu_healthcheck", "verify", json!([]), true);
    let id = mine["job"]["job_id"].as_str().unwrap().to_string();
    assert_eq!(mine["job"]["state"], "verified", "{mine}");
    // Another user cannot see it, not even whether it exists.
    let status = d.cli(Some(OTHER), &["status", &id]);
    assert_eq!(status.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&status.stderr).contains("no job"));
    let other = d.cli(Some(OTHER), &["verify", "--json"]);
    assert_eq!(
        other.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&other.stderr)
    );
    let theirs = json_of(&other)["job_id"].as_str().unwrap().to_string();
    let listed =
        String::from_utf8_lossy(&d.cli(Some(OTHER), &["jobs", "--json"]).stdout).into_owned();
    assert!(
        listed.contains(&theirs) && !listed.contains(&id),
        "{listed}"
    );
    // root sees every job.
    let all = String::from_utf8_lossy(&d.cli(None, &["jobs", "--json"]).stdout).into_owned();
    assert!(all.contains(&theirs) && all.contains(&id), "{all}");
    // Lists come in pages, newest first.
    let page = |n: u32| {
        d.request(json!({"v": 1, "op": "list", "limit": 1, "page": n}))["jobs"][0]["job_id"].clone()
    };
    let (p0, p1) = (page(0), page(1));
    assert!(p0.is_string() && p1.is_string() && p0 != p1, "{p0} {p1}");
    assert_eq!(p0, theirs.as_str());
    // An unknown command is refused at once, in every subcommand's way.
    let unknown = d.cli(None, &["apply", "dot_no_such"]);
    assert_eq!(unknown.status.code(), Some(3));
    // One user holding many idle connections locks out no one else.
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(UnixStream::connect(&d.socket).unwrap());
    }
    std::thread::sleep(Duration::from_millis(300));
    // The next one is told at once, before it asks anything.
    let mut extra = String::new();
    let s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = BufReader::new(s).read_line(&mut extra);
    assert!(extra.contains("connections open already"), "{extra}");
    let health = d.cli(Some(OTHER), &["health"]);
    assert_eq!(
        health.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&health.stderr)
    );
    drop(held);
    // Waits on ids that do not exist, and lists asking for far too much,
    // hold no memory once answered.
    let rss_kb = || -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", d.pid()))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    };
    std::thread::sleep(Duration::from_millis(500));
    let before = rss_kb();
    for i in 0..2000u32 {
        let r = d.request(json!({"v": 1, "op": "wait", "job_id": format!("{i:064x}")}));
        assert_eq!(r["error"]["kind"], "not_found", "{r}");
    }
    let huge = format!(
        "{{\"v\":1,\"op\":\"wait\",\"job_id\":\"{}\"}}\n",
        "a".repeat(1 << 20)
    );
    assert_eq!(
        d.raw(huge.as_bytes()).unwrap()["error"]["kind"],
        "bad_request"
    );
    for _ in 0..20 {
        let r = d.request(json!({"v": 1, "op": "list", "limit": 10000}));
        assert!(r["jobs"].as_array().unwrap().len() <= 1000);
    }
    let after = rss_kb();
    eprintln!(
        "daemon RSS: {before} kB before 2000 unknown-id waits and 20 oversized lists, {after} kB after"
    );
    assert!(after < before + 20 * 1024, "{before} kB -> {after} kB");
}

#[tokio::test]
async fn after_many_jobs_no_value_is_left_in_any_file_of_the_state_dir() {
    let mut db = test_db().await;
    configure(&mut db, OPEN_ACCESS, "");
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
    let deadline = Instant::now() + Duration::from_secs(10);
    while leaks() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} value fragments left in state_dir",
            leaks()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // And after a kill -9 and a restart, nothing comes back.
    d.signal(nix::sys::signal::Signal::SIGKILL);
    drop(d);
    let d = DaemonProc::start(&db);
    assert_eq!(leaks(), 0);
    drop(d);
}

#[tokio::test]
async fn two_daemons_on_one_target_apply_each_key_once() {
    // An HA pair (or one daemon per ops host): two state dirs, one target,
    // the same idempotency keys submitted to both. The ledger arbitrates.
    let mut db = test_db().await;
    configure(&mut db, OPEN_ACCESS, "");
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

/// A second daemon with another state_dir but the same socket (the lock
/// covers only state_dir) used to bind over a live daemon's socket and
/// delete it on exit. It must refuse to start, naming the path, and leave
/// the live daemon's socket answering.
#[tokio::test]
async fn a_daemon_never_replaces_a_socket_that_answers() {
    let mut db = test_db().await;
    configure(&mut db, OPEN_ACCESS, "");
    let second = db.dir.path().join("govsql2.toml");
    std::fs::write(
        &second,
        std::fs::read_to_string(&db.config_path)
            .unwrap()
            .replace("state_dir = \"state\"", "state_dir = \"state2\""),
    )
    .unwrap();
    let d1 = DaemonProc::start(&db);
    let mut second_daemon = Command::new(env!("CARGO_BIN_EXE_govsql"))
        .arg("daemon")
        .env("GOVSQL_CONFIG", &second)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while second_daemon.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = second_daemon.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = second_daemon.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second daemon started: {err}");
    assert!(
        err.contains("another govsql daemon answers on") && err.contains("govsql.sock"),
        "{err}"
    );
    let health = d1.request(json!({"v": 1, "op": "health"}));
    assert_eq!(
        health["ok"], true,
        "the live daemon's socket still answers: {health}"
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
    let mut db = test_db().await;
    configure(&mut db, OPEN_ACCESS, "");
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

/// Parses Prometheus text with the `prometheus_client` package's parser;
/// returns `name{label="v",…} value` per sample, labels sorted.
fn parse_prometheus(text: &str) -> std::collections::BTreeMap<String, f64> {
    let script = r#"
import sys, json
from prometheus_client.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        labels = ",".join('%s="%s"' % (k, v) for k, v in sorted(s.labels.items()))
        out["%s{%s}" % (s.name, labels)] = s.value
print(json.dumps(out))
"#;
    // Debian's python3 (python3-prometheus-client), not a user's pyenv.
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused the text: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_count_what_happened() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut db = test_db().await;
    configure(
        &mut db,
        OPEN_ACCESS,
        &format!("metrics_listen = \"127.0.0.1:{port}\"\n"),
    );
    let d = DaemonProc::start(&db);
    let r = submit(&d, "dot_iu_healthcheck", "verify", json!([]), true);
    assert_eq!(r["job"]["state"], "verified", "{r}");
    // The switch is off: a refusal with its class.
    let r = submit(
        &d,
        "dot_iu_add_piece",
        "apply",
        json!([
            ["collection_id", "00000000-0000-0000-0000-000000000001"],
            ["body", "x"]
        ]),
        true,
    );
    assert_eq!(r["job"]["state"], "refused", "{r}");
    let out = d.cli(None, &["metrics"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let m = parse_prometheus(&text);
    let get = |k: &str| {
        *m.get(k)
            .unwrap_or_else(|| panic!("no sample {k} in\n{text}"))
    };
    assert_eq!(
        get(r#"govsql_jobs_total{mode="verify",state="verified"}"#),
        1.0
    );
    assert_eq!(
        get(r#"govsql_jobs_total{mode="apply",state="refused"}"#),
        1.0
    );
    assert_eq!(
        get(r#"govsql_job_errors_total{class="kill_switch",mode="apply"}"#),
        1.0
    );
    assert_eq!(
        get(r#"govsql_job_duration_seconds_count{mode="verify"}"#),
        1.0
    );
    assert_eq!(
        get(r#"govsql_job_duration_seconds_bucket{le="+Inf",mode="verify"}"#),
        1.0
    );
    assert_eq!(
        get(r#"govsql_target_reachable{target="main",transport="local"}"#),
        1.0
    );
    assert!(
        get(r#"govsql_target_last_success_timestamp_seconds{target="main",transport="local"}"#)
            > 1.7e9
    );
    assert_eq!(get("govsql_unsettled_jobs{}"), 0.0);
    assert!(get("govsql_start_time_seconds{}") > 1.7e9);
    assert!(m.keys().any(|k| k.starts_with("govsql_build_info{commit=")));
    assert!(get(r#"govsql_psql_started_total{target="main",transport="local"}"#) >= 1.0);
    // No param value in any sample.
    assert!(!text.contains("00000000-0000-0000-0000-000000000001"));
    // The same over the loopback HTTP listener; anything else is 404.
    let http = |path: &str| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    };
    let reply = http("/metrics");
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    assert!(reply.contains("Content-Type: text/plain; version=0.0.4"));
    let body = reply.split_once("\r\n\r\n").unwrap().1;
    let m2 = parse_prometheus(body);
    assert_eq!(
        m2[r#"govsql_jobs_total{mode="verify",state="verified"}"#],
        1.0
    );
    assert!(http("/").starts_with("HTTP/1.1 404"));
}

#[tokio::test]
async fn sighup_reloads_the_config_and_refuses_what_needs_a_restart() {
    let mut db = test_db().await;
    configure(&mut db, OPEN_ACCESS, "");
    let d = DaemonProc::start(&db);
    let r = submit(&d, "dot_iu_healthcheck", "verify", json!([]), true);
    assert_eq!(r["job"]["state"], "verified", "{r}");
    let text = std::fs::read_to_string(&db.config_path).unwrap();
    let wait_log = |d: &DaemonProc, what: &str, times: usize| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while d.log_text().matches(what).count() < times {
            assert!(
                Instant::now() < deadline,
                "no {what:?} in the log: {}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // [access] reloads live: nobody may verify any more.
    let closed = text.replacen("verify = [\"*\"]", "verify = []", 1);
    assert_ne!(closed, text);
    std::fs::write(&db.config_path, &closed).unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    wait_log(&d, "config reloaded", 1);
    let r = submit(&d, "dot_iu_healthcheck", "verify", json!([]), true);
    assert_eq!(r["job"]["state"], "refused", "{r}");
    assert_eq!(r["job"]["outcome"]["error_class"], "not_allowed", "{r}");
    // A change that needs a restart is refused whole, naming the key; the
    // running config (verify closed) stays.
    let moved = text.replacen(
        "socket = ",
        "socket = \"/tmp/elsewhere.sock\"\nx_old_socket = ",
        1,
    );
    let moved = moved.replacen("\nx_old_socket = ", "\n# ", 1);
    std::fs::write(&db.config_path, &moved).unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    wait_log(&d, "config reload refused", 1);
    assert!(d
        .log_text()
        .contains("[daemon] socket changed, which needs a restart"));
    let r = submit(&d, "dot_iu_healthcheck", "verify", json!([]), true);
    assert_eq!(r["job"]["state"], "refused", "{r}");
    // A config that does not parse is refused too.
    std::fs::write(&db.config_path, "this is not toml [").unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    wait_log(&d, "config reload refused", 2);
    // And the original comes back.
    std::fs::write(&db.config_path, &text).unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    wait_log(&d, "config reloaded", 2);
    let r = submit(&d, "dot_iu_healthcheck", "verify", json!([]), true);
    assert_eq!(r["job"]["state"], "verified", "{r}");
}

#[tokio::test]
async fn a_user_who_may_not_open_the_socket_is_told_which_group_to_join() {
    let mut db = test_db().await;
    configure(&mut db, OPEN_ACCESS, "");
    let text = std::fs::read_to_string(&db.config_path).unwrap().replacen(
        "socket_mode = \"0666\"",
        "socket_mode = \"0660\"",
        1,
    );
    std::fs::write(&db.config_path, text).unwrap();
    let d = DaemonProc::start(&db);
    let out = d.cli(Some("nobody"), &["health"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("not allowed to talk to the govsql daemon"),
        "{err}"
    );
    assert!(err.contains("belongs to group root"), "{err}");
    assert!(err.contains("usermod -aG root nobody"), "{err}");
    assert!(!err.contains("--direct"), "{err}");
    // A config that is not TOML is an error, never the default socket.
    let bad = db.dir.path().join("bad.toml");
    std::fs::write(&bad, "[daemon\nsocket = 1").unwrap();
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_govsql"))
        .args(["health", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot use config") && err.contains("line 1"),
        "{err}"
    );
}

#[tokio::test]
async fn a_waiting_submit_names_its_job_at_once_and_says_when_it_needs_approval() {
    let mut db = test_db().await;
    configure(&mut db, OPEN_ACCESS, "");
    db.open_all();
    let d = DaemonProc::start(&db);
    // A command that needs approval: the id and who must act, then the
    // wait ends at --timeout (exit 5) and the job stays.
    let started = Instant::now();
    let out = d.cli(
        None,
        &[
            "apply",
            "dot_iu_purge_piece",
            "--param",
            "piece_id=00000000-0000-0000-0000-000000000001",
            "--wait",
            "--timeout",
            "2",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(
        err.contains("is awaiting approval by another member of the approve list"),
        "{err}"
    );
    let id = err
        .split_whitespace()
        .find(|w| {
            w.len() > 10 && w.contains('-') && w.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
        })
        .expect("the job id is printed")
        .to_string();
    assert_eq!(job_state(&d, &id), "awaiting_approval");
    // A job that runs at once still hands its result to the --wait.
    let out = d.cli(None, &["verify", "dot_iu_healthcheck", "--wait", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["status"], "verified", "{j}");
    assert!(j["result"].to_string().contains("collections"), "{j}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("submitted; waiting"));
}

#[tokio::test]
async fn jobs_filter_by_state_mode_command_and_since_and_show_times_and_targets() {
    let mut db = test_db().await;
    configure(&mut db, OPEN_ACCESS, "");
    let d = DaemonProc::start(&db);
    for _ in 0..2 {
        let r = submit(&d, "dot_iu_healthcheck", "verify", json!([]), true);
        assert_eq!(r["job"]["state"], "verified");
    }
    let r = submit(
        &d,
        "dot_iu_create_collection",
        "apply",
        json!([["title", "t"]]),
        true,
    );
    assert_eq!(r["job"]["state"], "refused", "{r}");
    let list = |args: &[&str]| -> Vec<Value> {
        let all: Vec<&str> = ["jobs", "--json"].iter().chain(args).copied().collect();
        serde_json::from_value(d.cli_json(None, &all)).unwrap()
    };
    assert_eq!(list(&[]).len(), 3);
    assert_eq!(list(&["--mode", "apply"]).len(), 1);
    assert_eq!(list(&["--state", "verified"]).len(), 2);
    assert_eq!(
        list(&[
            "--command",
            "dot_iu_create_collection",
            "--state",
            "refused"
        ])
        .len(),
        1
    );
    assert_eq!(list(&["--target", "main", "--since", "1h"]).len(), 3);
    assert_eq!(list(&["--since", "2999-01-01"]).len(), 0);
    assert_eq!(list(&["--limit", "2", "--page", "1"]).len(), 1);
    let out = d.cli(None, &["jobs"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("JOB") && text.contains("SUBMITTED (UTC)") && text.contains("TARGET"),
        "{text}"
    );
    assert!(text.contains(" main "), "{text}");
    for bad in [
        ["--state", "nope"],
        ["--since", "tomorrow"],
        ["--mode", "run"],
    ] {
        let out = d.cli(None, &["jobs", bad[0], bad[1]]);
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
    }
}

#[tokio::test]
async fn log_reads_the_ledger_through_the_daemon_over_ssh_with_filters() {
    let s = sshd::shared();
    let mut db = ssh_db(&s.target_toml(USER, &keys().ed25519), 30).await;
    configure(&mut db, OPEN_ACCESS, "");
    let d = DaemonProc::start(&db);
    for _ in 0..2 {
        assert_eq!(
            submit(&d, "dot_iu_healthcheck", "verify", json!([]), true)["job"]["state"],
            "verified"
        );
    }
    // The switch is off: refused (kill_switch), by root.
    let r = submit(
        &d,
        "dot_iu_create_collection",
        "apply",
        json!([["title", "secret-title"]]),
        true,
    );
    assert_eq!(r["job"]["state"], "refused");
    // Another user's plan.
    let out = d.cli(Some(OTHER), &["plan", "dot_iu_healthcheck", "--wait"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = |user: Option<&str>, args: &[&str]| -> Vec<Value> {
        let all: Vec<&str> = ["log", "--json"].iter().chain(args).copied().collect();
        serde_json::from_value(d.cli_json(user, &all)).unwrap()
    };
    let all = log(None, &[]);
    assert_eq!(all.len(), 4, "{all:?}");
    assert_eq!(all.len() as i64, db.count("dot_iu_command_run"));
    // Newest first, with the columns the issue names.
    assert_eq!(all[0]["mode"], "plan");
    assert!(all[0]["run_id"].as_i64() > all[1]["run_id"].as_i64());
    for k in ["at", "command", "status", "actor", "duration_ms", "target"] {
        assert!(!all[1][k].is_null(), "{k} in {}", all[1]);
    }
    let refused = log(None, &["--status", "refused"]);
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0]["error_class"], "kill_switch");
    assert_eq!(log(None, &["--no-verify"]).len(), 2);
    assert_eq!(log(None, &["--mode", "verify", "--limit", "1"]).len(), 1);
    assert_eq!(
        log(None, &["--command", "dot_iu_create_collection"]).len(),
        1
    );
    assert_eq!(log(None, &["--since", "2999-01-01"]).len(), 0);
    assert_eq!(log(None, &["--since", "1h"]).len(), 4);
    // A non-admin sees only their own rows.
    let own = log(Some(OTHER), &[]);
    assert_eq!(own.len(), 1, "{own:?}");
    assert_eq!(own[0]["actor"], OTHER);
    // The table form, and no value anywhere.
    let out = d.cli(None, &["log"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("TIME (UTC)"), "{text}");
    assert!(text.contains("kill_switch"), "{text}");
    assert!(!text.contains("secret-title"));
}

#[tokio::test]
async fn approvers_list_show_and_reject_with_a_reason_in_the_ledger_over_ssh() {
    let s = sshd::shared();
    let mut db = ssh_db(&s.target_toml(USER, &keys().ed25519), 30).await;
    configure(&mut db, OPEN_ACCESS, "");
    db.open_all();
    let d = DaemonProc::start(&db);
    let piece = "0000000a-bbbb-4ccc-8ddd-00000000e1e1";
    let r = submit(
        &d,
        "dot_iu_purge_piece",
        "apply",
        json!([["piece_id", piece]]),
        false,
    );
    assert_eq!(r["job"]["state"], "awaiting_approval", "{r}");
    let id = r["job"]["job_id"].as_str().unwrap().to_string();
    // The approver's list.
    let out = d.cli(Some(OTHER), &["approvals", "--json"]);
    let pending: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        pending.iter().any(|j| j["job_id"] == id.as_str()),
        "{pending:?}"
    );
    // What it will run, values included, to the approver only.
    let out = d.cli(Some(OTHER), &["show", &id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("apply dot_iu_purge_piece on main"), "{text}");
    assert!(
        text.contains("statement: SELECT public.fn_iu_purge_piece({{piece_id}})"),
        "{text}"
    );
    assert!(
        text.contains(&format!("param piece_id = {piece}")),
        "{text}"
    );
    // Reject needs a reason; with one, the job ends refused (rejected) and
    // the reason is in its ledger row.
    let out = d.cli(Some(OTHER), &["reject", &id, "--reason", " "]);
    assert_eq!(out.status.code(), Some(2));
    let out = d.cli(
        Some(OTHER),
        &["reject", &id, "--reason", "not during the freeze"],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done = wait_terminal(&d, &id);
    assert_eq!(done["state"], "refused", "{done}");
    assert_eq!(done["outcome"]["error_class"], "rejected");
    assert_eq!(
        db.sql("SELECT evidence->>'reason' FROM dot_iu_command_run WHERE evidence->>'error_class' = 'rejected'"),
        format!("rejected by {OTHER}: not during the freeze")
    );
    // After the end, the params are gone: show tells the submitter so;
    // the approver no longer sees the job at all.
    let out = d.cli(None, &["show", &id]);
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("erased"));
    let out = d.cli(Some(OTHER), &["show", &id]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no job"));
    // The value never reached the daemon's log.
    assert!(!d.log_text().contains(piece));
    // An approval's reason goes into the ledger too.
    let r = submit(
        &d,
        "dot_iu_purge_piece",
        "apply",
        json!([["piece_id", piece]]),
        false,
    );
    let id2 = r["job"]["job_id"].as_str().unwrap().to_string();
    let out = d.cli(Some(OTHER), &["approve", &id2, "--reason", "ticket OPS-42"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done = wait_terminal(&d, &id2);
    assert!(done["outcome"]["run_id"].is_i64(), "{done}");
    assert_eq!(
        db.sql(&format!(
            "SELECT evidence->>'reason' FROM dot_iu_command_run WHERE evidence->>'job_id' = '{id2}'"
        )),
        format!("approved by {OTHER}: ticket OPS-42")
    );
}

#[tokio::test]
async fn a_job_has_one_json_shape_wherever_it_is_printed() {
    let mut db = test_db().await;
    configure(&mut db, OPEN_ACCESS, "");
    let d = DaemonProc::start(&db);
    let json_of_cli = |args: &[&str]| d.cli_json(None, args);
    let waited = json_of_cli(&["verify", "--wait", "--json"]);
    let id = waited["job_id"].as_str().unwrap().to_string();
    let shapes = [
        waited.clone(),
        json_of_cli(&["status", &id, "--json"]),
        json_of_cli(&["wait", &id, "--json"]),
        json_of_cli(&["jobs", "--json"])[0].clone(),
        json_of_cli(&["verify", "--direct", "--json"]),
        json_of_cli(&["plan", "dot_iu_healthcheck", "--json"]),
    ];
    let keys = |v: &Value| -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    for s in &shapes {
        assert_eq!(keys(s), keys(&shapes[0]), "{s}");
        assert!(s["status"].is_string(), "{s}");
    }
    assert_eq!(shapes[0]["status"], "verified");
    assert_eq!(shapes[1]["status"], "verified");
    assert_eq!(shapes[3]["status"], "verified");
    assert_eq!(shapes[4]["status"], "verified");
    // Submitted without --wait: queued or already further along.
    assert!(shapes[5]["job_id"].is_string());
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
    let deadline = Instant::now() + Duration::from_secs(30);
    while !status(None)["result"].is_null() {
        assert!(
            Instant::now() < deadline,
            "the result outlived result_ttl_s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
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

#[tokio::test]
async fn a_batch_keeps_waiting_across_a_daemon_restart() {
    let mut db = test_db().await;
    configure(&mut db, OPEN_ACCESS, "");
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

/// Job ids show in `ps`: another user's `wait`, `show` or `cancel` on your
/// job id is answered "not found" (as for an id that does not exist) and
/// never touches your own wait.
#[tokio::test]
async fn another_users_wait_show_or_cancel_never_touches_your_job() {
    let mut db = test_db().await;
    configure(
        &mut db,
        "plan = [\"*\"]\napply = [\"*\"]\nverify = [\"*\"]\napprove = [\"root\"]\n",
        "",
    );
    let d = DaemonProc::start(&db);
    let r = submit(
        &d,
        "dot_iu_diag_sleep",
        "verify",
        json!([["seconds", "3"]]),
        false,
    );
    let id = r["job"]["job_id"].as_str().unwrap().to_string();
    let waiting = {
        let socket = d.socket.clone();
        let id = id.clone();
        std::thread::spawn(move || {
            let mut s = UnixStream::connect(&socket).unwrap();
            let line = format!(
                "{}\n",
                json!({"v": 1, "op": "wait", "job_id": id, "timeout_s": 30})
            );
            s.write_all(line.as_bytes()).unwrap();
            let mut reply = String::new();
            BufReader::new(s).read_line(&mut reply).unwrap();
            serde_json::from_str::<Value>(&reply).unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let ghost = "6b000000-00000000";
    for args in [
        vec!["wait", id.as_str(), "--timeout", "0"],
        vec!["show", id.as_str()],
        vec!["cancel", id.as_str()],
    ] {
        let out = d.cli(Some(OTHER), &args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_ne!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(err.contains("no job"), "{args:?}: {err}");
        // The same answer as for an id that does not exist.
        let mut ghost_args = args.clone();
        ghost_args[1] = ghost;
        let ghost_out = d.cli(Some(OTHER), &ghost_args);
        assert_eq!(out.status.code(), ghost_out.status.code(), "{args:?}");
    }
    let reply = waiting.join().unwrap();
    assert_eq!(reply["ok"], true, "the owner's wait was ended: {reply}");
    assert_eq!(reply["job"]["state"], "verified", "{reply}");
}

//! The daemon as a process, for the tests of the daemon's features
//! (socket, approvals, faults, secrets, operate, abuse, settle, …):
//! `DaemonProc` (a `govsql daemon` child with its log, raw socket requests
//! and the CLI), a config with an [access] table and a second real unix
//! user, and the submit and wait helpers.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::*;
use crate::sshd::{self};

/// A second real unix user (created by the SSH harness).
pub(crate) const OTHER: &str = "govsqlt_dash";

/// A `govsql daemon` child process with its log file.
pub(crate) struct DaemonProc {
    pub(crate) child: Option<Child>,
    pub(crate) log: PathBuf,
    pub(crate) config: PathBuf,
    pub(crate) socket: PathBuf,
}

impl DaemonProc {
    pub(crate) fn start(db: &TestDb) -> DaemonProc {
        DaemonProc::start_with(db, &[])
    }

    pub(crate) fn start_with(db: &TestDb, envs: &[(&str, &Path)]) -> DaemonProc {
        DaemonProc::start_config(db, &db.config_path, &db.config.daemon.socket, envs)
    }

    /// A daemon of another config (e.g. a second daemon on the same target).
    pub(crate) fn start_config(
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

    pub(crate) fn wait_exit(&mut self, within: Duration) -> Option<i32> {
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
    pub(crate) fn cli_json(&self, as_user: Option<&str>, args: &[&str]) -> Value {
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
    pub(crate) fn raw(&self, line: &[u8]) -> Option<Value> {
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

/// A migrated database whose config lets every user do everything (the
/// daemon tests' usual start; a test narrows [access] itself).
pub(crate) async fn open_db() -> TestDb {
    Scenario::new().db().await
}

pub(crate) const OPEN_ACCESS: &str =
    "plan = [\"*\"]\napply = [\"*\"]\nverify = [\"*\"]\napprove = [\"*\"]\n";

/// A daemon test's world said in one expression: which catalog, who may
/// do what, the daemon's extra settings, whether the gates are open and
/// the switch on; then the migrated database and, with [`start`], its
/// daemon. `Scenario::new().approvers(&[OTHER]).ready().start().await`.
///
/// [`start`]: Scenario::start
pub(crate) struct Scenario {
    catalog: Option<String>,
    access: String,
    daemon: String,
    target: String,
    ready: bool,
}

impl Scenario {
    /// The test catalog, every user allowed everything, gates shut.
    pub(crate) fn new() -> Scenario {
        Scenario {
            catalog: None,
            access: OPEN_ACCESS.into(),
            daemon: String::new(),
            target: String::new(),
            ready: false,
        }
    }

    /// Another catalog's text.
    pub(crate) fn catalog(mut self, text: String) -> Scenario {
        self.catalog = Some(text);
        self
    }

    /// Everyone may plan, apply and verify; only `users` may approve.
    pub(crate) fn approvers(mut self, users: &[&str]) -> Scenario {
        self.access =
            format!("plan = [\"*\"]\napply = [\"*\"]\nverify = [\"*\"]\napprove = {users:?}\n");
        self
    }

    /// More `[daemon]` settings (TOML lines).
    pub(crate) fn daemon(mut self, lines: &str) -> Scenario {
        self.daemon.push_str(lines);
        self
    }

    /// More settings of the target `main` (TOML lines).
    pub(crate) fn target(mut self, lines: &str) -> Scenario {
        self.target.push_str(lines);
        self
    }

    /// Every gate open and the apply switch on.
    pub(crate) fn ready(mut self) -> Scenario {
        self.ready = true;
        self
    }

    /// The migrated, configured database, no daemon yet.
    pub(crate) async fn db(self) -> TestDb {
        let mut db = match &self.catalog {
            Some(text) => test_db_with(text, 10).await,
            None => test_db().await,
        };
        configure(&mut db, &self.access, &self.daemon);
        if !self.target.is_empty() {
            let text = std::fs::read_to_string(&db.config_path).unwrap();
            let text = text.replacen(
                "[targets.main]\n",
                &format!("[targets.main]\n{}", self.target),
                1,
            );
            std::fs::write(&db.config_path, text).unwrap();
            db.config = govsql::config::Config::load(&db.config_path).unwrap();
        }
        if self.ready {
            db.open_all();
            db.switch(true);
        }
        db
    }

    /// The database and its running daemon.
    pub(crate) async fn start(self) -> (TestDb, DaemonProc) {
        let db = self.db().await;
        let d = DaemonProc::start(&db);
        (db, d)
    }
}

/// Moves a queued job's clock back by `secs` (when it was submitted and
/// approved), as if that much time had passed, so a test of a TTL given
/// in seconds does not wait it out. Written to the daemon's own queue
/// file while the daemon runs (SQLite in WAL mode takes a second writer).
pub(crate) fn age_job(db: &TestDb, job_id: &str, secs: i64) {
    let queue = rusqlite::Connection::open(db.config.daemon.state_dir.join("queue.db")).unwrap();
    queue.busy_timeout(Duration::from_secs(10)).unwrap();
    let n = queue
        .execute(
            "UPDATE jobs SET submitted_at = submitted_at - ?1, approved_at = approved_at - ?1 WHERE job_id = ?2",
            rusqlite::params![secs, job_id],
        )
        .unwrap();
    assert_eq!(n, 1, "no queued job {job_id}");
}

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

pub(crate) fn job_state(d: &DaemonProc, id: &str) -> String {
    let r = d.request(json!({"v": 1, "op": "status", "job_id": id}));
    r["job"]["state"].as_str().unwrap_or("?").to_string()
}

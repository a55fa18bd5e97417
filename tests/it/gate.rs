//! `govsql remote-gate` through a real sshd: in `authorized_keys` as
//! `command="…",restrict`, a key opens only the governed door. govsql's
//! own jobs work under every login shell; `id`, psql as postgres, another
//! database, extra arguments and shell metacharacters run nothing; the
//! admin line works only for the key given `--admin-user`.

use std::path::{Path, PathBuf};
use std::process::Command;

use govsql::psql::DbRole;
use govsql::runtime::{Mode, RunStatus};

use crate::harness::*;
use crate::sshd::{keys, Sshd, SHELL_USERS, USER};

/// The built binary, where the test users can run it.
fn installed_binary() -> PathBuf {
    test_bin()
}

fn public_key(key: &Path) -> String {
    std::fs::read_to_string(format!("{}.pub", key.display()))
        .unwrap()
        .trim()
        .to_string()
}

/// Runs `command` over SSH with the OpenSSH client, `stdin` as its
/// input; (exit code, stderr, stdout).
fn ssh_run(
    port: u16,
    known_hosts: &Path,
    user: &str,
    key: &Path,
    command: &str,
    stdin: &[u8],
) -> (Option<i32>, String, String) {
    use std::io::Write;
    let mut child = Command::new("ssh")
        .args(["-p", &port.to_string(), "-i"])
        .arg(key)
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "LogLevel=ERROR",
            "-o",
        ])
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .arg(format!("{user}@127.0.0.1"))
        .arg(command)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    let _ = writer.join();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Runs `command` over SSH to a test sshd with no input; (exit code,
/// stderr).
fn ssh(s: &Sshd, user: &str, key: &Path, command: &str) -> (Option<i32>, String) {
    let (code, err, _) = ssh_run(s.port, &s.known_hosts, user, key, command, b"");
    (code, err)
}

#[tokio::test]
async fn remote_gate_lets_a_key_open_only_the_governed_door() {
    let s = Sshd::start();
    let bin = installed_binary();
    let db = ssh_db(&s.target_toml(USER, &keys().ed25519), 10).await;
    db.open_all();
    let pg = pg();
    let gate = format!(
        "{} remote-gate --psql {} --db-host {} --db-port {} --db-name {} --db-user {RUNTIME_ROLE}",
        bin.display(),
        pg.psql.display(),
        pg.dir.display(),
        pg.port,
        db.name
    );
    // The ed25519 key: jobs only. The RSA key: migrate too.
    let authorized = format!(
        "command=\"{gate}\",restrict {}\ncommand=\"{gate} --admin-user postgres\",restrict {}\n",
        public_key(&keys().ed25519),
        public_key(&keys().rsa)
    );
    for (user, _) in SHELL_USERS {
        std::fs::write(s.dir.join("authorized_keys").join(user), &authorized).unwrap();
    }

    // govsql's own jobs pass the gate under every login shell.
    for (user, _) in SHELL_USERS {
        let toml = format!(
            "{}{}",
            s.target_toml(user, &keys().ed25519),
            db_target_keys(&db)
        );
        let target: govsql::config::TargetConfig = toml::from_str(&toml).unwrap();
        let exec = govsql::transport::for_target(&target, DbRole::Runtime).unwrap();
        let rt = db.runtime_with(exec);
        let o = run(&rt, "dot_iu_healthcheck", Mode::Verify, &[]).await;
        assert_eq!(o.status, RunStatus::Verified, "{user}: {o:?}");
        let o = run(
            &rt,
            "dot_iu_create_collection",
            Mode::Apply,
            &[("title", user)],
        )
        .await;
        assert_eq!(o.status, RunStatus::Applied, "{user}: {o:?}");
    }

    // Anything else runs nothing.
    let marker = PathBuf::from(format!("/tmp/govsql-gate-marker-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let own = govsql::psql::command_line(&govsql::psql::command_words(
        &db.config.target(None).unwrap().1.clone(),
        DbRole::Runtime,
    ));
    let as_postgres = own.replace(&format!("-U {RUNTIME_ROLE}"), "-U postgres");
    let other_db = own.replace(&format!("-d {}", db.name), "-d postgres");
    let attacks = [
        "id".to_string(),
        as_postgres,
        other_db,
        format!("{own} -c 'select 1'"),
        format!("{own}; touch {}", marker.display()),
        format!("touch {} #{own}", marker.display()),
        format!("$(touch {})", marker.display()),
    ];
    for (user, _) in SHELL_USERS {
        for attack in &attacks {
            let (code, err) = ssh(&s, user, &keys().ed25519, attack);
            assert_ne!(code, Some(0), "{user}: {attack} ran: {err}");
            assert!(
                err.contains("remote-gate: refused"),
                "{user}: {attack}: {err}"
            );
        }
    }
    assert!(!marker.exists(), "a shell metacharacter ran a command");

    // migrate: with the admin key it works; the jobs' key cannot.
    let admin = |key: &Path| {
        let toml = format!(
            "{}{}admin_identity_file = \"{}\"\n",
            s.target_toml(USER, &keys().ed25519),
            db_target_keys(&db),
            key.display()
        );
        let target: govsql::config::TargetConfig = toml::from_str(&toml).unwrap();
        govsql::transport::for_target(&target, DbRole::Admin).unwrap()
    };
    let report =
        govsql::migrate::migrate(admin(&keys().rsa).as_ref(), &db.catalog, RUNTIME_ROLE, true)
            .await
            .unwrap();
    assert!(report.applied.is_empty(), "{report:?}");
    let refused = govsql::migrate::migrate(
        admin(&keys().ed25519).as_ref(),
        &db.catalog,
        RUNTIME_ROLE,
        true,
    )
    .await;
    assert!(refused.is_err(), "the jobs' key ran the admin line");
    assert_eq!(db.count("iu_collection"), SHELL_USERS.len() as i64);
    s.stop();
}

/// The database keys of a test database's target, as TOML lines.
fn db_target_keys(db: &TestDb) -> String {
    let t = db.config.target(None).unwrap().1;
    format!(
        "psql = \"{}\"\ndb_host = \"{}\"\ndb_port = {}\ndb_name = \"{}\"\ndb_user = \"{}\"\nadmin_db_user = \"postgres\"\n",
        t.psql,
        t.db_host.as_deref().unwrap_or(""),
        t.db_port,
        t.db_name,
        t.db_user
    )
}

/// Runs `command` over SSH to a test sshd with `stdin` as its input;
/// (exit code, stderr).
fn ssh_stdin(
    s: &Sshd,
    user: &str,
    key: &Path,
    command: &str,
    stdin: &[u8],
) -> (Option<i32>, String) {
    let (code, err, _) = ssh_run(s.port, &s.known_hosts, user, key, command, stdin);
    (code, err)
}

/// Renders a door in one position.
type Render = fn(&str) -> String;

/// A case of the corpus: its name and its bytes.
type Case = (String, Vec<u8>);

/// The hostile-stdin corpus: every psql meta-command that reaches the
/// operating system, in every position psql accepts one. `{M}` is a marker
/// file that exists only if something ran or wrote.
fn hostile_corpus() -> Vec<Case> {
    let doors = [
        "\\! touch {M}",
        "\\o | touch {M}\nSELECT 1;",
        "\\o {M}\nSELECT 1;",
        "\\g | touch {M}",
        "\\g {M}",
        "\\set x `touch {M}`",
        "\\echo `touch {M}`",
        "\\setenv X `touch {M}`",
        "\\copy (SELECT 1) TO PROGRAM 'touch {M}'",
        "\\copy (SELECT 1) TO '{M}'",
        "\\copy pg_class FROM '/etc/passwd'",
        "\\lo_export 1 '{M}'",
        "\\lo_import /etc/passwd",
        "\\w {M}",
        "\\i /etc/passwd",
        "\\ir /etc/passwd",
        "\\cd /tmp",
        "\\connect postgres",
        "\\c - postgres",
        "\\set cmd 'touch {M}'\n\\! :cmd",
        "SELECT 'touch {M}' AS c \\gset\n\\! :c",
        "SELECT '\\! touch {M}' \\gexec",
        "\\pset pager on\n\\setenv PAGER 'touch {M}'\nSELECT 1;",
    ];
    let positions: [(&str, Render); 10] = [
        ("own line", |d| format!("{d}\n")),
        ("after SQL on the line", |d| format!("SELECT 1 {d}\n")),
        ("after \\;", |d| format!("SELECT 1 \\; {d}\n")),
        ("inside an E'' string", |d| format!("SELECT E'\\\\' {d}\n")),
        ("after standard_conforming_strings off", |d| {
            format!("SET standard_conforming_strings = off;\nSELECT 'a\\' {d}\n")
        }),
        ("after an unterminated quote", |d| {
            format!("SELECT 'x\n{d}\n")
        }),
        ("after an unterminated dollar quote", |d| {
            format!("SELECT $a$ x\n{d}\n")
        }),
        ("with CR line ends", |d| {
            format!("SELECT 1;\r\n{}\r\n", d.replace('\n', "\r\n"))
        }),
        ("after a NUL byte", |d| format!("SELECT 1;\0\n{d}\n")),
        ("after a 1 MiB line", |d| {
            format!("SELECT '{}';\n{d}\n", "x".repeat(1 << 20))
        }),
    ];
    let mut cases = Vec::new();
    for d in doors {
        for (where_, render) in &positions {
            cases.push((format!("{d:?} {where_}"), render(d).into_bytes()));
        }
    }
    cases
}

/// Listens on /dev/log (when nothing else does) to read the gate's
/// system-log lines, draining it all the time (a full queue would block
/// every sender).
struct SysLog {
    lines: Option<std::sync::Arc<std::sync::Mutex<Vec<String>>>>,
}

impl SysLog {
    fn listen() -> SysLog {
        let path = Path::new("/dev/log");
        if path.exists() {
            return SysLog { lines: None };
        }
        let Ok(sock) = std::os::unix::net::UnixDatagram::bind(path) else {
            return SysLog { lines: None };
        };
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = sock.recv(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        });
        SysLog { lines: Some(lines) }
    }

    fn lines(&self) -> Option<Vec<String>> {
        Some(self.lines.as_ref()?.lock().unwrap().clone())
    }
}

impl Drop for SysLog {
    fn drop(&mut self) {
        if self.lines.is_some() {
            let _ = std::fs::remove_file("/dev/log");
        }
    }
}

/// A valid govsql job script (the status entry), as the runtime writes it.
fn valid_script() -> String {
    let mut s = govsql::psql::Script::new("govsql:gate-test", 10_000);
    s.section();
    s.sql(&govsql::grammar::entry_call(
        govsql::grammar::Entry::Status,
        None,
    ));
    s.finish().text
}

#[tokio::test]
async fn remote_gate_walls_stop_every_door_psql_opens_from_stdin() {
    let s = Sshd::start();
    let bin = installed_binary();
    let db = ssh_db(&s.target_toml(USER, &keys().ed25519), 10).await;
    db.open_all();
    let pg = pg();
    let marks = tempfile::Builder::new()
        .prefix("govsql-gate-marks-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(
        marks.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .unwrap();
    let gate = |extra: &str| {
        format!(
            "{} remote-gate --psql {} --db-host {} --db-port {} --db-name {} --db-user {RUNTIME_ROLE}{extra}",
            bin.display(),
            pg.psql.display(),
            pg.dir.display(),
            pg.port,
            db.name
        )
    };
    let own = govsql::psql::command_line(&govsql::psql::command_words(
        db.config.target(None).unwrap().1,
        DbRole::Runtime,
    ));
    let authorize = |extra: &str| {
        let line = format!(
            "command=\"{}\",restrict {}\n",
            gate(extra),
            public_key(&keys().ed25519)
        );
        for (user, _) in SHELL_USERS {
            std::fs::write(s.dir.join("authorized_keys").join(user), &line).unwrap();
        }
    };
    let target = |user: &str| -> govsql::config::TargetConfig {
        toml::from_str(&format!(
            "{}{}",
            s.target_toml(user, &keys().ed25519),
            db_target_keys(&db)
        ))
        .unwrap()
    };
    let mut n = 0;
    let mut marker = || {
        n += 1;
        marks.path().join(format!("m{n}"))
    };

    // The control: with both walls down, the marker mechanism works (a
    // door really opens), so the cases below can fail.
    authorize(" --test-no-grammar --test-no-kernel-wall");
    for door in ["\\! touch {M}\n", "\\o {M}\nSELECT 1;\n"] {
        let m = marker();
        let text = door.replace("{M}", &m.to_string_lossy());
        let _ = ssh_stdin(&s, USER, &keys().ed25519, &own, text.as_bytes());
        assert!(
            m.exists(),
            "control: {door:?} did not open with both walls down"
        );
    }

    // The kernel wall alone stops a shell and a file write.
    authorize(" --test-no-grammar");
    for door in [
        "\\! touch {M}\n",
        "\\o {M}\nSELECT 1;\n",
        "\\o | touch {M}\nSELECT 1;\n",
        "\\copy (SELECT 1) TO '{M}'\n",
    ] {
        let m = marker();
        let text = door.replace("{M}", &m.to_string_lossy());
        let _ = ssh_stdin(&s, USER, &keys().ed25519, &own, text.as_bytes());
        assert!(!m.exists(), "the kernel wall alone let {door:?} through");
    }

    // The grammar alone refuses every door, before psql reads it; then
    // both walls (the product) refuse every case of the corpus, each in a
    // fresh channel, alone or after a valid job in the same channel,
    // under every login shell (four channels at a time).
    let syslog = SysLog::listen();
    let corpus = hostile_corpus();
    let doors_alone: Vec<Case> = corpus.iter().step_by(10).cloned().collect();
    for (extra, cases) in [(" --test-no-kernel-wall", &doors_alone), ("", &corpus)] {
        authorize(extra);
        let cases: Vec<(usize, &Case, PathBuf)> = cases
            .iter()
            .enumerate()
            .map(|(i, c)| (i, c, marker()))
            .collect();
        std::thread::scope(|scope| {
            for lane in cases.chunks(cases.len().div_ceil(4)) {
                let (s, own) = (&s, &own);
                scope.spawn(move || {
                    for (i, (name, payload), m) in lane {
                        let user = SHELL_USERS[i % SHELL_USERS.len()].0;
                        let mut input = if i % 2 == 1 {
                            valid_script().into_bytes()
                        } else {
                            Vec::new()
                        };
                        input.extend_from_slice(
                            &String::from_utf8_lossy(payload)
                                .replace("{M}", &m.to_string_lossy())
                                .into_bytes(),
                        );
                        let (code, err) = ssh_stdin(s, user, &keys().ed25519, own, &input);
                        assert!(
                            !m.exists(),
                            "{extra} {user}: {name}: something ran or wrote"
                        );
                        assert_eq!(
                            code,
                            Some(govsql::grammar::REFUSED_EXIT),
                            "{extra} {user}: {name}: not refused: {err}"
                        );
                        assert!(
                            err.contains(govsql::grammar::REFUSAL_PREFIX),
                            "{name}: {err}"
                        );
                    }
                });
            }
        });
    }
    if let Some(lines) = syslog.lines() {
        let refusals: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains("refused the script for role govsql_runtime"))
            .collect();
        assert!(!refusals.is_empty(), "no refusal reached the system log");
        for l in refusals {
            assert!(l.contains("md5 of the refused line"), "{l}");
            assert!(!l.contains("touch"), "the log carries refused bytes: {l}");
        }
    }

    // A valid govsql job on the same target works right after.
    for (user, _) in SHELL_USERS {
        let exec = govsql::transport::for_target(&target(user), DbRole::Runtime).unwrap();
        let rt = db.runtime_with(exec);
        let o = run(&rt, "dot_iu_healthcheck", Mode::Verify, &[]).await;
        assert_eq!(o.status, RunStatus::Verified, "{user}: {o:?}");
    }
    s.stop();
}

/// Hands scripts to `inner` with a line outside the grammar slipped into
/// each dispatcher call's unit (a daemon and gate that disagree).
struct Tamper {
    inner: std::sync::Arc<dyn govsql::transport::Executor>,
    marker: PathBuf,
}

impl govsql::transport::Executor for Tamper {
    fn run(
        &self,
        mut req: govsql::transport::ScriptRequest,
    ) -> govsql::transport::BoxFuture<
        '_,
        Result<govsql::transport::ScriptOutput, govsql::transport::TransportError>,
    > {
        if req.text.contains("fn_dot_iu_dispatch(") {
            req.text = req.text.replacen(
                "COPY (SELECT kind",
                &format!("\\! touch {}\nCOPY (SELECT kind", self.marker.display()),
                1,
            );
        }
        self.inner.run(req)
    }
    fn kind(&self) -> &'static str {
        "ssh"
    }
}

#[tokio::test]
async fn a_script_the_gate_refuses_fails_remote_gate_and_nothing_ran() {
    let s = Sshd::start();
    let bin = installed_binary();
    let db = ssh_db(&s.target_toml(USER, &keys().ed25519), 10).await;
    db.open_all();
    db.switch(true);
    let pg = pg();
    let line = format!(
        "command=\"{} remote-gate --psql {} --db-host {} --db-port {} --db-name {} --db-user {RUNTIME_ROLE}\",restrict {}\n",
        bin.display(),
        pg.psql.display(),
        pg.dir.display(),
        pg.port,
        db.name,
        public_key(&keys().ed25519)
    );
    std::fs::write(s.dir.join("authorized_keys").join(USER), &line).unwrap();
    let target: govsql::config::TargetConfig = toml::from_str(&format!(
        "{}{}session_mode = {}\n",
        s.target_toml(USER, &keys().ed25519),
        db_target_keys(&db),
        session_mode()
    ))
    .unwrap();
    let ssh = govsql::transport::for_target(&target, DbRole::Runtime).unwrap();

    // Behind the gate, a job works and the daemon learns the gate's format.
    let rt = db.runtime_with(ssh.clone());
    let o = run(&rt, "dot_iu_healthcheck", Mode::Verify, &[]).await;
    assert_eq!(o.status, RunStatus::Verified, "{o:?}");
    assert_eq!(ssh.stats().gate_format, Some(govsql::grammar::VERSION));

    // A script the gate refuses: failed remote_gate, never unsettled or
    // internal, and nothing of it ran.
    let marker = std::env::temp_dir().join(format!("govsql-tamper-{}", std::process::id()));
    let tamper = std::sync::Arc::new(Tamper {
        inner: ssh.clone(),
        marker: marker.clone(),
    });
    let rt = db.runtime_with(tamper);
    let before = db.count("iu_collection");
    let o = run(
        &rt,
        "dot_iu_create_collection",
        Mode::Apply,
        &[("title", "tampered")],
    )
    .await;
    assert_eq!(o.status, RunStatus::Failed, "{o:?}");
    assert_eq!(o.class(), Some("remote_gate"), "{o:?}");
    assert!(o.pending.is_none(), "not left unsettled: {o:?}");
    assert!(o.message.contains("remote-gate"), "{}", o.message);
    assert_eq!(db.count("iu_collection"), before, "nothing ran");
    assert!(!marker.exists());

    // The next good job on the same target works.
    let rt = db.runtime_with(ssh);
    let o = run(
        &rt,
        "dot_iu_create_collection",
        Mode::Apply,
        &[("title", "ok")],
    )
    .await;
    assert_eq!(o.status, RunStatus::Applied, "{o:?}");
    s.stop();
}

/// A Dropbear sshd on loopback whose every login runs `command` (its
/// `-c`, which sets SSH_ORIGINAL_COMMAND as OpenSSH's `command=` does),
/// for one user whose home holds the authorized key. Stopped on drop.
struct Dropbear {
    child: std::process::Child,
    port: u16,
    known_hosts: PathBuf,
    _dir: tempfile::TempDir,
}

const DROPBEAR_USER: &str = "govsqlt_dropbear";

impl Dropbear {
    fn start(command: &str) -> Dropbear {
        let dir = tempfile::Builder::new()
            .prefix("govsql-dropbear-")
            .tempdir()
            .unwrap();
        let home = dir.path().join("home");
        std::fs::create_dir_all(home.join(".ssh")).unwrap();
        for d in [dir.path(), home.as_path()] {
            std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
        }
        let exists = Command::new("id")
            .arg(DROPBEAR_USER)
            .output()
            .unwrap()
            .status
            .success();
        let st = if exists {
            Command::new("usermod")
                .args(["-d"])
                .arg(&home)
                .arg(DROPBEAR_USER)
                .status()
        } else {
            Command::new("useradd")
                .args(["-M", "-s", "/bin/bash", "-p", "*", "-d"])
                .arg(&home)
                .arg(DROPBEAR_USER)
                .status()
        };
        assert!(st.unwrap().success());
        std::fs::write(
            home.join(".ssh/authorized_keys"),
            format!("{}\n", public_key(&keys().ed25519)),
        )
        .unwrap();
        let user = nix::unistd::User::from_name(DROPBEAR_USER)
            .unwrap()
            .unwrap();
        for p in [
            home.clone(),
            home.join(".ssh"),
            home.join(".ssh/authorized_keys"),
        ] {
            nix::unistd::chown(&p, Some(user.uid), Some(user.gid)).unwrap();
        }
        let hostkey = dir.path().join("hostkey");
        let out = Command::new("dropbearkey")
            .args(["-t", "ed25519", "-f"])
            .arg(&hostkey)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "dropbearkey (scripts/test installs dropbear-bin)"
        );
        let port = free_port();
        let child = Command::new("/usr/sbin/dropbear")
            .args([
                "-F",
                "-E",
                "-s",
                "-m",
                "-p",
                &format!("127.0.0.1:{port}"),
                "-r",
            ])
            .arg(&hostkey)
            .args(["-c", command])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "dropbear did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let scan = Command::new("ssh-keyscan")
            .args(["-p", &port.to_string(), "-t", "ed25519", "127.0.0.1"])
            .output()
            .unwrap();
        let known_hosts = dir.path().join("known_hosts");
        std::fs::write(&known_hosts, scan.stdout).unwrap();
        Dropbear {
            child,
            port,
            known_hosts,
            _dir: dir,
        }
    }
}

impl Drop for Dropbear {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn remote_gate_holds_behind_dropbear_too() {
    let bin = installed_binary();
    let db = test_db().await;
    db.open_all();
    let pg = pg();
    let gate = format!(
        "{} remote-gate --psql {} --db-host {} --db-port {} --db-name {} --db-user {RUNTIME_ROLE}",
        bin.display(),
        pg.psql.display(),
        pg.dir.display(),
        pg.port,
        db.name
    );
    let own = govsql::psql::command_line(&govsql::psql::command_words(
        db.config.target(None).unwrap().1,
        DbRole::Runtime,
    ));
    let d = Dropbear::start(&gate);
    let ssh_to = |stdin: &[u8]| -> (Option<i32>, String) {
        let (code, err, out) = ssh_run(
            d.port,
            &d.known_hosts,
            DROPBEAR_USER,
            &keys().ed25519,
            &own,
            stdin,
        );
        (code, err + &out)
    };
    // A valid govsql script passes and answers.
    let (code, out) = ssh_to(valid_script().as_bytes());
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("GOVSQL-GATE:format="), "{out}");
    // Every door of the corpus, in its first positions, is refused.
    let marks = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        marks.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .unwrap();
    for (i, (name, payload)) in hostile_corpus()
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 10 < 3)
    {
        let m = marks.path().join(format!("m{i}"));
        let input = String::from_utf8_lossy(payload).replace("{M}", &m.to_string_lossy());
        let (code, out) = ssh_to(input.as_bytes());
        assert!(!m.exists(), "dropbear: {name}: something ran or wrote");
        assert_eq!(
            code,
            Some(govsql::grammar::REFUSED_EXIT),
            "dropbear: {name}: {out}"
        );
    }
}

/// psql ending on its own behind the gate (here: a database that does not
/// exist) ends the gate too, at once: in session mode the channel sends no
/// EOF, and a gate still waiting on it made every such job run into its
/// deadline (the demo's "no pg_hba line" case took 30 s, then `timeout`).
#[tokio::test]
async fn a_psql_that_cannot_connect_behind_the_gate_fails_at_once_naming_why() {
    let s = Sshd::start();
    let bin = installed_binary();
    let db = ssh_db(&s.target_toml(USER, &keys().ed25519), 20).await;
    let pg = pg();
    let line = format!(
        "command=\"{} remote-gate --psql {} --db-host {} --db-port {} --db-name no_such_db --db-user {RUNTIME_ROLE}\",restrict {}\n",
        bin.display(),
        pg.psql.display(),
        pg.dir.display(),
        pg.port,
        public_key(&keys().ed25519)
    );
    std::fs::write(s.dir.join("authorized_keys").join(USER), &line).unwrap();
    let toml = format!(
        "{}{}session_mode = {}\n",
        s.target_toml(USER, &keys().ed25519),
        db_target_keys(&db).replace(
            &format!("db_name = \"{}\"", db.name),
            "db_name = \"no_such_db\""
        ),
        session_mode()
    );
    let target: govsql::config::TargetConfig = toml::from_str(&toml).unwrap();
    let rt = db.runtime_with(govsql::transport::for_target(&target, DbRole::Runtime).unwrap());
    let started = std::time::Instant::now();
    let o = run(&rt, "dot_iu_healthcheck", Mode::Verify, &[]).await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "{:?}: {o:?}",
        started.elapsed()
    );
    assert_eq!(o.class(), Some("db_unavailable"), "{o:?}");
    assert!(
        o.message.contains("no_such_db does not exist"),
        "{}",
        o.message
    );
}

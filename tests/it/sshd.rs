//! A real OpenSSH sshd for the tests, on 127.0.0.1 and a free port, with
//! its own host key and config in a temporary directory, and real test
//! users whose login shells differ (bash, dash, zsh, busybox sh). Needs
//! root (to create the users and let sshd switch to them). sshd runs in
//! the foreground (`-D`) as the harness's child, so it is stopped by the
//! pid the harness spawned (with every session process under it) when
//! its test ends or fails, and the shared one at exit; its directory goes
//! with it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::harness::{at_exit, free_port, is_root, pg, remove_at_exit};

/// Test users and their login shells.
pub const SHELL_USERS: &[(&str, &str)] = &[
    ("govsqlt_bash", "/bin/bash"),
    ("govsqlt_dash", "/bin/dash"),
    ("govsqlt_zsh", "/usr/bin/zsh"),
    ("govsqlt_busybox", "/usr/local/lib/govsql-test/sh"),
];

/// A user only the kill drills log in as (so killing its processes cannot
/// touch another test's jobs).
pub const VICTIM: (&str, &str) = ("govsqlt_victim", "/bin/bash");

/// A user whose login shell is nologin (the natural copy of a system
/// service user), for the message that names it.
pub const NOLOGIN: (&str, &str) = ("govsqlt_nologin", "/usr/sbin/nologin");

fn all_users() -> impl Iterator<Item = &'static (&'static str, &'static str)> {
    SHELL_USERS
        .iter()
        .chain(std::iter::once(&VICTIM))
        .chain(std::iter::once(&NOLOGIN))
}

/// The user most tests log in as.
pub const USER: &str = "govsqlt_bash";

/// A running sshd.
pub struct Sshd {
    /// Its directory: config, keys, log, pid file.
    pub dir: PathBuf,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// A known_hosts file with its host key.
    pub known_hosts: PathBuf,
    /// Its host key's SHA256 fingerprint.
    pub fingerprint: String,
    /// The listener, in the foreground; None while stopped.
    listener: Mutex<Option<Child>>,
}

/// Client keys, shared by every sshd of the process.
pub struct Keys {
    /// Authorized ed25519 key.
    pub ed25519: PathBuf,
    /// Authorized RSA key.
    pub rsa: PathBuf,
    /// Authorized, passphrase-protected ed25519 key.
    pub encrypted: PathBuf,
    /// The passphrase file of `encrypted`.
    pub passphrase_file: PathBuf,
    /// A key that is not authorized.
    pub stranger: PathBuf,
}

static KEYS: OnceLock<Keys> = OnceLock::new();
static SHARED: OnceLock<Sshd> = OnceLock::new();

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn keygen(path: &Path, kind: &str, passphrase: &str) {
    let mut c = Command::new("ssh-keygen");
    c.args([
        "-q",
        "-t",
        kind,
        "-N",
        passphrase,
        "-C",
        "govsql-test",
        "-f",
    ])
    .arg(path);
    if kind == "rsa" {
        c.args(["-b", "2048"]);
    }
    sh(&mut c);
}

/// The client keys (created once per process).
pub fn keys() -> &'static Keys {
    KEYS.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("govsql-keys-")
            .tempdir()
            .unwrap()
            .keep();
        remove_at_exit(&dir);
        let k = Keys {
            ed25519: dir.join("id_ed25519"),
            rsa: dir.join("id_rsa"),
            encrypted: dir.join("id_encrypted"),
            passphrase_file: dir.join("passphrase"),
            stranger: dir.join("id_stranger"),
        };
        keygen(&k.ed25519, "ed25519", "");
        keygen(&k.rsa, "rsa", "");
        keygen(&k.encrypted, "ed25519", "correct horse");
        std::fs::write(&k.passphrase_file, "correct horse\n").unwrap();
        keygen(&k.stranger, "ed25519", "");
        ensure_users();
        k
    })
}

/// Creates the shell users if missing (root only).
pub fn ensure_users() {
    assert!(
        is_root(),
        "the SSH tests create real unix users: run scripts/test as root (or with sudo)"
    );
    std::fs::create_dir_all("/usr/local/lib/govsql-test").unwrap();
    let busybox_sh = Path::new("/usr/local/lib/govsql-test/sh");
    if !busybox_sh.exists() {
        std::os::unix::fs::symlink("/usr/bin/busybox", busybox_sh).unwrap();
    }
    for (user, shell) in all_users() {
        let exists = Command::new("id")
            .arg(user)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !exists {
            let out = Command::new("useradd")
                .args(["-M", "-d", "/", "-s", shell, "-p", "*", user])
                .output()
                .unwrap();
            // A parallel test process may have created it meanwhile.
            let again = Command::new("id")
                .arg(user)
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            assert!(
                out.status.success() || again,
                "useradd {user}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    // A supplementary group (not anyone's primary gid), for @group access lists.
    let has_group = Command::new("getent")
        .args(["group", OPS_GROUP])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !has_group {
        let _ = Command::new("groupadd").arg(OPS_GROUP).output();
    }
    let _ = Command::new("usermod")
        .args(["-a", "-G", OPS_GROUP, "govsqlt_dash"])
        .output();
}

/// A supplementary group of `govsqlt_dash`.
pub const OPS_GROUP: &str = "govsqlt_ops";

/// The sshd shared by the tests of this process (stopped at exit).
pub fn shared() -> &'static Sshd {
    SHARED.get_or_init(|| {
        let s = Sshd::start();
        at_exit(|| {
            if let Some(s) = SHARED.get() {
                s.stop();
                let _ = std::fs::remove_dir_all(&s.dir);
            }
        });
        s
    })
}

impl Sshd {
    /// Starts a dedicated sshd.
    pub fn start() -> Sshd {
        let keys = keys();
        let _ = pg();
        let dir = tempfile::Builder::new()
            .prefix("govsql-sshd-")
            .tempdir()
            .unwrap()
            .keep();
        keygen(&dir.join("host_ed25519"), "ed25519", "");
        let auth_dir = dir.join("authorized_keys");
        std::fs::create_dir_all(&auth_dir).unwrap();
        let mut authorized = String::new();
        for k in [&keys.ed25519, &keys.rsa, &keys.encrypted] {
            authorized.push_str(
                &std::fs::read_to_string(k.with_extension("pub")).unwrap_or_else(|_| {
                    std::fs::read_to_string(format!("{}.pub", k.display())).unwrap()
                }),
            );
        }
        for (user, _) in all_users() {
            std::fs::write(auth_dir.join(user), &authorized).unwrap();
        }
        let port = free_port();
        let users: Vec<&str> = all_users().map(|(u, _)| *u).collect();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_ed25519\nPidFile {d}/sshd.pid\n\
             AuthorizedKeysFile {d}/authorized_keys/%u\nStrictModes no\nUsePAM no\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
             MaxSessions 16\nMaxStartups 100\nLogLevel VERBOSE\nAllowUsers {users}\nPrintMotd no\n",
            d = dir.display(),
            users = users.join(" ")
        );
        std::fs::write(dir.join("sshd_config"), config).unwrap();
        let host_pub = std::fs::read_to_string(dir.join("host_ed25519.pub")).unwrap();
        let mut parts = host_pub.split_whitespace();
        let (algo, b64) = (parts.next().unwrap(), parts.next().unwrap());
        let known_hosts = dir.join("known_hosts");
        std::fs::write(&known_hosts, format!("[127.0.0.1]:{port} {algo} {b64}\n")).unwrap();
        let fp_line = sh(Command::new("ssh-keygen")
            .arg("-lf")
            .arg(dir.join("host_ed25519.pub")));
        let fingerprint = fp_line.split_whitespace().nth(1).unwrap().to_string();
        let s = Sshd {
            dir,
            port,
            known_hosts,
            fingerprint,
            listener: Mutex::new(None),
        };
        s.launch();
        s
    }

    /// (Re)starts the daemon on its port and waits until it listens.
    pub fn launch(&self) {
        std::fs::create_dir_all("/run/sshd").unwrap();
        let mut listener = self.listener.lock().unwrap_or_else(|p| p.into_inner());
        assert!(listener.is_none(), "sshd is already running");
        let child = Command::new("/usr/sbin/sshd")
            .arg("-D")
            .arg("-f")
            .arg(self.dir.join("sshd_config"))
            .arg("-E")
            .arg(self.dir.join("sshd.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start /usr/sbin/sshd");
        *listener = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            let exited = listener.as_mut().map(|c| c.try_wait());
            assert!(
                matches!(exited, Some(Ok(None))) && Instant::now() < deadline,
                "sshd did not start listening: {}",
                std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the listener and every session it serves.
    pub fn stop(&self) {
        let Some(mut child) = self
            .listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        let pid = child.id() as i32;
        // Its per-connection processes and everything they started (an
        // orphaned session process would keep serving), then the listener.
        for p in descendants(pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = child.kill();
        let _ = child.wait();
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The `[targets.main]` keys for this sshd, as `user` with `identity`.
    pub fn target_toml(&self, user: &str, identity: &Path) -> String {
        format!(
            "transport = \"ssh\"\nssh_host = \"127.0.0.1\"\nssh_port = {port}\nssh_user = \"{user}\"\n\
             identity_file = \"{id}\"\nknown_hosts = \"{kh}\"\nmax_channels = 8\nkeepalive_interval_s = 2\nkeepalive_max = 3\n",
            port = self.port,
            id = identity.display(),
            kh = self.known_hosts.display(),
        )
    }
}

impl Drop for Sshd {
    /// A dedicated sshd ends with its test, passed or failed.
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Every descendant of `root`, read from /proc.
fn descendants(root: i32) -> Vec<i32> {
    let mut parent_of = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // The fields after the command name (which may hold spaces).
        let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
            continue;
        };
        if let Some(ppid) = rest
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<i32>().ok())
        {
            parent_of.push((pid, ppid));
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (child, _) in parent_of.iter().filter(|(_, pp)| *pp == p) {
            out.push(*child);
            frontier.push(*child);
        }
    }
    out
}

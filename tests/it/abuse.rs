//! Hostile clients on the daemon's socket: one user's connection churn,
//! held connections or oversized requests never lock another user out.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::daemon::{configure, DaemonProc, Scenario, OPEN_ACCESS, OTHER};
use crate::harness::*;

/// One user's flood: `hold` idle connections, and `threads` threads that
/// connect and close as fast as they can, for `secs` seconds (as `user`).
fn flood(
    user: &str,
    socket: &std::path::Path,
    hold: usize,
    threads: usize,
    secs: u64,
) -> std::process::Child {
    let script = format!(
        r#"
import socket, threading, time
path, end = {socket:?}, time.time() + {secs}
held = []
for _ in range({hold}):
    try:
        s = socket.socket(socket.AF_UNIX); s.setblocking(False); s.connect(path); held.append(s)
    except OSError:
        pass
def churn():
    while time.time() < end:
        try:
            s = socket.socket(socket.AF_UNIX); s.setblocking(False); s.connect(path); s.close()
        except OSError:
            pass
ts = [threading.Thread(target=churn) for _ in range({threads})]
for t in ts: t.start()
for t in ts: t.join()
"#
    );
    Command::new("runuser")
        .args(["-u", user, "--", "python3", "-c", &script])
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

/// A churn flood from one uid (40 held connections, 6 threads of
/// connect+close) made another user's `govsql health` fail 17 of 18 times
/// with EAGAIN: a global permit was taken before accept and held through
/// NSS look-ups, before the per-uid check, and the client did not retry.
#[tokio::test]
async fn one_users_connection_churn_does_not_lock_another_out() {
    let (db, d) = Scenario::new().start().await;
    let socket = db.config.daemon.socket.clone();
    let mut attacker = flood(OTHER, &socket, 40, 6, 12);
    std::thread::sleep(Duration::from_secs(1));
    let (mut failed, mut took) = (Vec::new(), Vec::new());
    for _ in 0..15 {
        let t = Instant::now();
        let out = d.cli(None, &["health", "--json"]);
        took.push(t.elapsed());
        if out.status.code() != Some(0) {
            failed.push(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = attacker.kill();
    let _ = attacker.wait();
    assert!(
        failed.is_empty(),
        "{} of 15 health calls failed: {failed:?}",
        failed.len()
    );
    // Generous bounds: the whole suite shares two cores with the flood
    // (one call took over 3 s there); the p99 target is measured in
    // scripts/abuse.
    took.sort();
    assert!(
        took[took.len() / 2] < Duration::from_secs(1)
            && took[took.len() - 1] < Duration::from_secs(8),
        "health calls under another user's churn (sorted): {took:?}"
    );
}

/// Under a churn flood another user's health took 120-350 ms at p99: a
/// new connection waited in tokio's 1 024-deep accept queue behind the
/// flood's. The queue is now 64 deep, and the client's connect blocks in
/// the kernel (woken when the daemon accepts) instead of retrying EAGAIN.
/// Checked with the daemon stopped: about 65 connects queue (the
/// backlog plus one), and a `govsql health` made while it is full gets
/// its answer once the daemon runs again.
#[tokio::test]
async fn the_accept_queue_is_short_and_a_client_waits_for_room_in_it() {
    use nix::sys::signal::Signal;
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let (db, d) = Scenario::new().start().await;
    let addr = UnixAddr::new(&db.config.daemon.socket).unwrap();
    d.signal(Signal::SIGSTOP);
    // Every thread of it stopped (a loaded machine delivers late), so no
    // accept runs while the queue is counted.
    let stopped = || {
        std::fs::read_dir(format!("/proc/{}/task", d.pid()))
            .unwrap()
            .flatten()
            .all(|t| {
                let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
                stat.rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('T') || rest.starts_with('t'))
            })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stopped() {
        assert!(Instant::now() < deadline, "the daemon did not stop");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut queued = Vec::new();
    let refused = loop {
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        match connect(fd.as_raw_fd(), &addr) {
            Ok(()) if queued.len() < 5000 => queued.push(fd),
            Ok(()) => break None,
            Err(e) => break Some(e),
        }
    };
    let depth = queued.len();
    let out = std::thread::scope(|s| {
        // Another user (root's own queued connections count against
        // root's share of 32 while the daemon drains them).
        let health = s.spawn(|| d.cli(Some(OTHER), &["health", "--json"]));
        std::thread::sleep(Duration::from_millis(500));
        drop(queued);
        d.signal(Signal::SIGCONT);
        health.join().unwrap()
    });
    assert_eq!(refused, Some(nix::errno::Errno::EAGAIN));
    assert!(
        (1..=70).contains(&depth),
        "{depth} connections queued while the daemon was stopped (want about 65, the backlog of 64 and the kernel's off-by-one or two)"
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "a health made while the backlog was full: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The daemon's peak resident memory (VmHWM), in KiB.
fn peak_rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A 4 MiB JSON array per request was parsed whole before any check: 32
/// connections of one uid took the daemon to ~345 MiB. The shape is
/// checked while streaming (depth, value count) and large lines are read
/// a few at a time.
#[tokio::test]
async fn a_flood_of_huge_requests_is_refused_without_the_memory_it_asks_for() {
    use std::io::{BufRead, BufReader, Write};
    let db = test_db().await;
    let d = DaemonProc::start(&db);
    let before = peak_rss_kib(d.pid());
    let mut line =
        br#"{"v":1,"op":"submit","command":"dot_iu_healthcheck","mode":"verify","params":["#
            .to_vec();
    while line.len() < 4 * 1024 * 1024 - 64 {
        line.extend_from_slice(b"0,");
    }
    line.extend_from_slice(b"0]}\n");
    let line = std::sync::Arc::new(line);
    let socket = db.config.daemon.socket.clone();
    let senders: Vec<_> = (0..32)
        .map(|_| {
            let (line, socket) = (line.clone(), socket.clone());
            std::thread::spawn(move || {
                let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                let _ = s.write_all(&line);
                let mut reply = String::new();
                let _ = BufReader::new(s).read_line(&mut reply);
                reply
            })
        })
        .collect();
    for t in senders {
        let reply = t.join().unwrap();
        assert!(reply.contains("bad_request"), "{reply}");
    }
    let grew_mib = (peak_rss_kib(d.pid()) - before) / 1024;
    eprintln!("peak RSS grew by {grew_mib} MiB");
    assert!(
        grew_mib < 120,
        "the daemon's peak RSS grew by {grew_mib} MiB"
    );
    let out = d.cli(None, &["health", "--json"]);
    assert_eq!(out.status.code(), Some(0));
}

/// Idempotency keys were global: another apply user replaying your key
/// learned, from replay versus conflict, whether a guessed value matched
/// your run. A key is its actor's: any other actor is refused
/// `idempotency_conflict`, whatever the params.
#[tokio::test]
async fn another_users_key_is_a_conflict_whatever_the_params() {
    let (db, d) = Scenario::new().ready().start().await;
    let apply = |user: Option<&str>, title: &str| {
        let out = d.cli(
            user,
            &[
                "apply",
                "dot_iu_create_collection",
                "--param",
                &format!("title={title}"),
                "--idempotency-key",
                "mine-1",
                "--wait",
                "--json",
            ],
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)))
    };
    let first = apply(None, "secret-guess");
    assert_eq!(first["status"], "applied", "{first}");
    // The owner's replay: the original run, nothing run again.
    let again = apply(None, "secret-guess");
    assert_eq!(again["run_id"], first["run_id"], "{again}");
    // Another actor: a conflict, the same for a right and a wrong guess.
    for guess in ["secret-guess", "wrong-guess"] {
        let other = apply(Some(OTHER), guess);
        assert_eq!(other["status"], "refused", "{other}");
        assert_eq!(other["error_class"], "idempotency_conflict", "{other}");
        assert_ne!(other["run_id"], first["run_id"]);
    }
    assert_eq!(db.count("iu_collection"), 1);
}

/// An apply whose own function LISTENs and NOTIFYs got the notification
/// printed amid its output: the answer was malformed, and the user was
/// told "already applied … not run again" for its own first run.
#[tokio::test]
async fn a_notification_from_the_jobs_own_function_is_not_in_its_answer() {
    let db = test_db().await;
    db.open_all();
    db.switch(true);
    let rt = db.runtime();
    for _ in 0..2 {
        let o = run(&rt, "dot_iu_diag_notify", govsql::runtime::Mode::Apply, &[]).await;
        assert_eq!(o.status, govsql::runtime::RunStatus::Applied, "{o:?}");
        assert!(o.message.starts_with("applied "), "{}", o.message);
    }
}

/// The metrics listener spawned a task per TCP connection with no cap:
/// 1 100 held connections took the daemon to its file limit, and then
/// the socket's users were refused too. Connections past the cap are
/// closed on accept.
#[tokio::test]
async fn held_metrics_connections_do_not_take_the_daemons_files() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard.min(8192), hard).unwrap();
    let port = free_port();
    let (_db, d) = Scenario::new()
        .daemon(&format!("metrics_listen = \"127.0.0.1:{port}\"\n"))
        .start()
        .await;
    let held: Vec<_> = (0..1100)
        .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let fds = std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
        .unwrap()
        .count();
    let out = d.cli(None, &["health", "--json"]);
    drop(held);
    assert!(fds < 300, "the daemon holds {fds} files");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Once they are gone, scrapes work.
    std::thread::sleep(Duration::from_millis(200));
    let out = d.cli(None, &["metrics"]);
    assert_eq!(out.status.code(), Some(0));
}

/// `govsql log` ran on the target's job channels: a flood of reads from
/// one user took another user's jobs from 0.1 s to 6-8 s. A read runs on
/// the target's own read channel (never a job's slot or warm session), at
/// most two at once per user. Here every job slot is held by a job that
/// waits on a lock, and `log` still answers.
#[tokio::test]
async fn log_answers_while_every_job_slot_is_busy() {
    let s = crate::sshd::shared();
    let toml = s
        .target_toml(crate::sshd::USER, &crate::sshd::keys().ed25519)
        .replace("max_channels = 8", "max_channels = 1");
    let mut db = ssh_db(&toml, 20).await;
    configure(&mut db, OPEN_ACCESS, "");
    db.open_all();
    db.switch(true);
    let d = DaemonProc::start(&db);
    let first = d.cli(None, &["verify", "--wait", "--json"]);
    assert_eq!(first.status.code(), Some(0));
    let lock = TableLock::take(&db.name, "iu_collection");
    let held = d.request(serde_json::json!({
        "v": 1, "op": "submit", "command": "dot_iu_create_collection", "mode": "apply",
        "params": [["title", "held"]]
    }));
    let id = held["job"]["job_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.request(serde_json::json!({"v": 1, "op": "status", "job_id": id}))["job"]["state"]
        != "running"
    {
        assert!(Instant::now() < deadline, "the held job never ran");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let out = d.cli(None, &["log", "--json", "--limit", "5"]);
    let took = t.elapsed();
    lock.release();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(took < Duration::from_secs(5), "log took {took:?}");
}

/// A job awaiting approval whose command a SIGHUP removed from the catalog
/// ended `refused unknown_command` with no ledger row, although the
/// database still knew the command. Its refusal is now written.
#[tokio::test]
async fn a_job_whose_command_left_the_catalog_still_gets_its_ledger_row() {
    let (db, d) = Scenario::new().start().await;
    let r = d.request(serde_json::json!({
        "v": 1, "op": "submit", "command": "dot_iu_purge_piece", "mode": "apply",
        "params": [["piece_id", "00000000-0000-0000-0000-000000000001"]]
    }));
    assert_eq!(r["job"]["state"], "awaiting_approval", "{r}");
    let id = r["job"]["job_id"].as_str().unwrap().to_string();
    let cat = db.dir.path().join("catalog.toml");
    let text = std::fs::read_to_string(&cat).unwrap();
    std::fs::write(
        &cat,
        text.replace(
            "name = \"dot_iu_purge_piece\"",
            "name = \"dot_iu_purge_piece_v2\"",
        ),
    )
    .unwrap();
    let digest = || {
        d.request(serde_json::json!({"v": 1, "op": "health"}))["health"]["catalog_digest"].clone()
    };
    let before = digest();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || digest() != before,
        || "the new catalog was not picked up".to_string(),
    );
    let out = d.cli(Some(OTHER), &["approve", &id]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done = crate::daemon::wait_terminal(&d, &id);
    assert_eq!(done["state"], "refused", "{done}");
    assert_eq!(done["outcome"]["error_class"], "unknown_command", "{done}");
    assert_eq!(
        db.count(&format!(
            "dot_iu_command_run WHERE run_status = 'refused' AND evidence->>'job_id' = '{id}' AND evidence->>'error_class' = 'unknown_command'"
        )),
        1,
        "{done}"
    );
}

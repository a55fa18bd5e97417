//! The socket as clients meet it: malformed requests, peer credentials
//! with a second real unix user, who sees which jobs, the socket's group,
//! one socket per daemon, one job shape, waits that race delivery.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::daemon::*;
use crate::harness::*;
use crate::sshd::{self};

#[tokio::test]
async fn malformed_requests_get_clear_errors_and_the_daemon_keeps_serving() {
    let (_db, d) = Scenario::new().start().await;
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
async fn a_user_who_may_not_open_the_socket_is_told_which_group_to_join() {
    let db = open_db().await;
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

/// A socket directory the daemon creates gets `socket_group` too: with
/// it left in root's group (mode 0750), the group the socket was given
/// could not reach the socket.
#[tokio::test]
async fn the_socket_group_can_reach_a_socket_in_a_directory_the_daemon_created() {
    let db = open_db().await;
    let text = std::fs::read_to_string(&db.config_path)
        .unwrap()
        .replacen(
            "socket_mode = \"0666\"",
            "socket_mode = \"0660\"\nsocket_group = \"govsqlt_dash\"",
            1,
        )
        .replacen(
            "socket = \"govsql.sock\"",
            "socket = \"run/govsql/govsql.sock\"",
            1,
        );
    std::fs::write(&db.config_path, text).unwrap();
    let socket = db.dir.path().join("run/govsql/govsql.sock");
    let d = DaemonProc::start_config(&db, &db.config_path, &socket, &[]);
    let out = d.cli(Some(OTHER), &["health"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = std::fs::metadata(socket.parent().unwrap()).unwrap();
    assert_eq!(dir.permissions().mode() & 0o777, 0o750);
}

/// A second daemon with another state_dir but the same socket (the lock
/// covers only state_dir) used to bind over a live daemon's socket and
/// delete it on exit. It must refuse to start, naming the path, and leave
/// the live daemon's socket answering.
#[tokio::test]
async fn a_daemon_never_replaces_a_socket_that_answers() {
    let db = open_db().await;
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

#[tokio::test]
async fn a_waiting_submit_names_its_job_at_once_and_says_when_it_needs_approval() {
    let db = open_db().await;
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
async fn a_job_has_one_json_shape_wherever_it_is_printed() {
    let (_db, d) = Scenario::new().start().await;
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
async fn a_wait_that_arrives_after_delivery_but_before_the_record_is_answered() {
    // The worker hands the outcome to waiters, then writes the queue row;
    // a wait arriving in between used to find `running` and sleep for an
    // hour (a 10 000-job batch hung on it). The hook widens the window.
    let db = open_db().await;
    let d = DaemonProc::start_with(&db, &[("GOVSQL_TEST_RECORD_DELAY_MS", Path::new("3000"))]);
    let r = submit(&d, "dot_iu_healthcheck", "verify", json!([]), false);
    let id = r["job"]["job_id"].as_str().unwrap().to_string();
    // The job runs in milliseconds; its record waits 3 s.
    wait_until(
        Duration::from_secs(2),
        Duration::from_millis(20),
        || db.count("dot_iu_command_run") != 0,
        || "the job did not run".to_string(),
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(job_state(&d, &id), "running", "the window is open");
    let started = Instant::now();
    let r = d.request(json!({"v": 1, "op": "wait", "job_id": id, "timeout_s": 10}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["job"]["state"], "verified");
    assert!(started.elapsed() < Duration::from_secs(2), "the wait slept");
}

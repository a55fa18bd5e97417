//! Operating the daemon: the seed's proof over SSH, lifecycle and
//! signals, reloads, batches, metrics, and the jobs and log listings.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::daemon::*;
use crate::harness::*;
use crate::sshd::{self, keys, USER};

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
async fn lifecycle_lock_sigterm_drain_and_sighup_reload() {
    let db = open_db().await;
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
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || has("READY=1") && has("WATCHDOG=1"),
        || "no READY and WATCHDOG".to_string(),
    );
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
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || d.log_text().contains("catalog reload refused"),
        || "no reload attempt logged".to_string(),
    );
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
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || last_status().contains("catalog reload refused"),
        || format!("STATUS: {}", last_status()),
    );
    let r = submit(&d, "dot_iu_healthcheck", "verify", json!([]), true);
    assert_eq!(r["job"]["state"], "verified");
    // A valid change is picked up.
    std::fs::write(&cat, good.replace("Whole-database health", "Health")).unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || digest(&d) != before,
        || "a valid catalog was not picked up".to_string(),
    );
    // ...and a good reload replaces it.
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || !last_status().contains("refused"),
        || format!("STATUS: {}", last_status()),
    );
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
async fn sighup_reloads_the_config_and_refuses_what_needs_a_restart() {
    let (db, d) = Scenario::new().start().await;
    let r = submit(&d, "dot_iu_healthcheck", "verify", json!([]), true);
    assert_eq!(r["job"]["state"], "verified", "{r}");
    let text = std::fs::read_to_string(&db.config_path).unwrap();
    let wait_log = |d: &DaemonProc, what: &str, times: usize| {
        wait_until(
            Duration::from_secs(10),
            Duration::from_millis(50),
            || d.log_text().matches(what).count() >= times,
            || format!("no {what:?} in the log: {}", d.log_text()),
        );
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
    let (_db, d) = Scenario::new()
        .daemon(&format!("metrics_listen = \"127.0.0.1:{port}\"\n"))
        .start()
        .await;
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
async fn jobs_filter_by_state_mode_command_and_since_and_show_times_and_targets() {
    let (_db, d) = Scenario::new().start().await;
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

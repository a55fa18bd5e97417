//! The SSH transport against a real OpenSSH sshd on loopback: the seed's
//! proof over SSH, concurrency, host keys, authentication, every login
//! shell, large results, timeouts and a server that goes away.

use std::sync::Arc;
use std::time::Duration;

use govsql::runtime::{Mode, RunStatus};

use crate::harness::*;
use crate::sshd::{self, keys, Sshd, SHELL_USERS, USER};

async fn db_as(user: &str, identity: &std::path::Path, timeout_s: u64) -> TestDb {
    let s = sshd::shared();
    ssh_db(&s.target_toml(user, identity), timeout_s).await
}

async fn bash_db() -> TestDb {
    db_as(USER, &keys().ed25519, 10).await
}

#[tokio::test]
async fn seed_durable_proof_over_ssh() {
    let db = bash_db().await;
    db.switch(true);
    let expect = |args: &[&str], status: &str, code: i32| {
        let out = db.govsql(args);
        let j = json_of(&out);
        assert_eq!(j["status"], status, "{args:?}: {j}");
        assert_eq!(out.status.code(), Some(code));
        assert_eq!(j["evidence"]["transport"], "ssh");
        j
    };
    let p1 = expect(
        &["plan", "dot_iu_healthcheck", "--direct", "--json"],
        "planned",
        0,
    );
    assert_eq!(
        p1["evidence"]["host_key"],
        sshd::shared().fingerprint.as_str()
    );
    db.gate("iu_core.operator_runtime_enabled", true);
    expect(
        &["apply", "dot_iu_healthcheck", "--direct", "--json"],
        "applied",
        0,
    );
    expect(
        &["verify", "dot_iu_healthcheck", "--direct", "--json"],
        "verified",
        0,
    );
    db.gate("iu_core.operator_runtime_enabled", false);
    expect(
        &[
            "apply",
            "dot_iu_add_piece",
            "--direct",
            "--json",
            "--param",
            "collection_id=00000000-0000-0000-0000-000000000001",
            "--param",
            "body=x",
        ],
        "refused",
        3,
    );
    assert_seed_figures(&db);
    // The ledger's evidence carries the fingerprint used.
    assert_eq!(
        db.sql("SELECT DISTINCT evidence->>'host_key' FROM dot_iu_command_run"),
        sshd::shared().fingerprint
    );
}

#[tokio::test]
async fn fifty_jobs_over_eight_channels_all_correct() {
    let db = bash_db().await;
    db.open_all();
    let rt = Arc::new(db.runtime());
    let mut tasks = Vec::new();
    for i in 0..50 {
        let rt = rt.clone();
        tasks.push(tokio::spawn(async move {
            let title = format!("collection-{i}");
            let o = run(
                &rt,
                "dot_iu_create_collection",
                Mode::Apply,
                &[("title", &title)],
            )
            .await;
            (title, o)
        }));
    }
    let mut ids = std::collections::BTreeSet::new();
    for t in tasks {
        let (title, o) = t.await.unwrap();
        assert_eq!(o.status, RunStatus::Applied, "{title}: {o:?}");
        let id = result_json(&o)["collection_id"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(
            db.sql(&format!(
                "SELECT title FROM iu_collection WHERE collection_id = '{id}'"
            )),
            title
        );
        ids.insert(o.run_id.unwrap());
    }
    assert_eq!(ids.len(), 50);
    assert_eq!(db.count("iu_collection"), 50);
    assert_eq!(
        db.count("dot_iu_command_run WHERE run_status = 'applied'"),
        50
    );
}

#[tokio::test]
async fn unknown_or_changed_host_key_is_refused_before_anything_runs() {
    let s = sshd::shared();
    let db = bash_db().await;
    db.open_all();
    // A known_hosts that names another key for this host and port.
    let other = Sshd::start();
    let changed = db.dir.path().join("known_hosts_changed");
    std::fs::write(
        &changed,
        std::fs::read_to_string(&other.known_hosts)
            .unwrap()
            .replace(&other.port.to_string(), &s.port.to_string()),
    )
    .unwrap();
    other.stop();
    let empty = db.dir.path().join("known_hosts_empty");
    std::fs::write(&empty, "").unwrap();
    let cases = [
        (
            format!("known_hosts = \"{}\"", changed.display()),
            "DIFFERS",
        ),
        (
            format!("known_hosts = \"{}\"", empty.display()),
            "is not in",
        ),
        (
            "host_key = \"SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\"".to_string(),
            "pins",
        ),
    ];
    for (policy, needle) in cases {
        let toml = s.target_toml(USER, &keys().ed25519).replace(
            &format!("known_hosts = \"{}\"", s.known_hosts.display()),
            &policy,
        );
        let bad = ssh_db(&toml, 10).await;
        bad.open_all();
        let o = run(
            &bad.runtime(),
            "dot_iu_create_collection",
            Mode::Apply,
            &[("title", "x")],
        )
        .await;
        assert_eq!(o.status, RunStatus::Failed, "{o:?}");
        assert_eq!(o.class(), Some("host_key"));
        assert!(o.run_id.is_none());
        assert!(o.message.contains(needle), "{}", o.message);
        assert!(
            o.message.contains(&s.fingerprint),
            "names the offered key: {}",
            o.message
        );
        assert_eq!(bad.count("dot_iu_command_run"), 0);
        assert_eq!(bad.count("iu_collection"), 0);
    }
    // Hashed known_hosts entries are understood.
    let hashed = db.dir.path().join("known_hosts_hashed");
    std::fs::copy(&s.known_hosts, &hashed).unwrap();
    let st = std::process::Command::new("ssh-keygen")
        .arg("-H")
        .arg("-f")
        .arg(&hashed)
        .output()
        .unwrap();
    assert!(st.status.success());
    assert!(std::fs::read_to_string(&hashed).unwrap().starts_with("|1|"));
    let toml = s.target_toml(USER, &keys().ed25519).replace(
        &s.known_hosts.display().to_string(),
        &hashed.display().to_string(),
    );
    let ok = ssh_db(&toml, 10).await;
    let o = run(&ok.runtime(), "dot_iu_healthcheck", Mode::Verify, &[]).await;
    assert_eq!(o.status, RunStatus::Verified, "{o:?}");
    // And a pinned fingerprint.
    let toml = s.target_toml(USER, &keys().ed25519).replace(
        &format!("known_hosts = \"{}\"", s.known_hosts.display()),
        &format!("host_key = \"{}\"", s.fingerprint),
    );
    let pinned = ssh_db(&toml, 10).await;
    let o = run(&pinned.runtime(), "dot_iu_healthcheck", Mode::Verify, &[]).await;
    assert_eq!(o.status, RunStatus::Verified, "{o:?}");
}

#[tokio::test]
async fn wrong_key_is_refused_and_says_what_was_tried() {
    let db = db_as(USER, &keys().stranger, 10).await;
    let o = run(&db.runtime(), "dot_iu_healthcheck", Mode::Verify, &[]).await;
    assert_eq!(o.status, RunStatus::Failed);
    assert_eq!(o.class(), Some("ssh_auth"));
    assert!(
        o.message.contains("authentication") && o.message.contains("publickey"),
        "{}",
        o.message
    );
    assert_eq!(db.count("dot_iu_command_run"), 0);
}

#[tokio::test]
async fn rsa_and_encrypted_keys_and_the_agent_authenticate() {
    let k = keys();
    let rsa = db_as(USER, &k.rsa, 10).await;
    let o = run(&rsa.runtime(), "dot_iu_healthcheck", Mode::Verify, &[]).await;
    assert_eq!(o.status, RunStatus::Verified, "rsa: {o:?}");

    let s = sshd::shared();
    let toml = format!(
        "{}identity_passphrase_file = \"{}\"\n",
        s.target_toml(USER, &k.encrypted),
        k.passphrase_file.display()
    );
    let enc = ssh_db(&toml, 10).await;
    let o = run(&enc.runtime(), "dot_iu_healthcheck", Mode::Verify, &[]).await;
    assert_eq!(o.status, RunStatus::Verified, "encrypted: {o:?}");

    // ssh-agent: no identity_file; the key comes from SSH_AUTH_SOCK.
    let agent_dir = tempfile::tempdir().unwrap();
    let sock = agent_dir.path().join("agent.sock");
    let agent = std::process::Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&sock)
        .spawn()
        .unwrap();
    let mut agent = scopeguard(agent);
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let add = std::process::Command::new("ssh-add")
        .arg(&k.ed25519)
        .env("SSH_AUTH_SOCK", &sock)
        .output()
        .unwrap();
    assert!(
        add.status.success(),
        "{}",
        String::from_utf8_lossy(&add.stderr)
    );
    let toml = s.target_toml(USER, &k.ed25519).replace(
        &format!("identity_file = \"{}\"\n", k.ed25519.display()),
        "",
    );
    let via_agent = ssh_db(&toml, 10).await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_govsql"))
        .args(["verify", "--direct", "--json"])
        .env("GOVSQL_CONFIG", &via_agent.config_path)
        .env("SSH_AUTH_SOCK", &sock)
        .output()
        .unwrap();
    assert_eq!(json_of(&out)["status"], "verified");
    let _ = agent.0.kill();
}

struct Guard(std::process::Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
fn scopeguard(c: std::process::Child) -> Guard {
    Guard(c)
}

#[tokio::test]
async fn hostile_values_round_trip_under_every_login_shell() {
    for (user, shell) in SHELL_USERS {
        let db = db_as(user, &keys().ed25519, 20).await;
        db.open_all();
        let marker = db.dir.path().join(format!("injected-{user}"));
        let rt = db.runtime();
        crate::values::round_trip_all(&rt, &db, &marker).await;
        let o = run(&rt, "dot_iu_healthcheck", Mode::Verify, &[]).await;
        assert_eq!(o.status, RunStatus::Verified, "{shell}");
    }
}

#[tokio::test]
async fn ten_megabyte_result_parses_exactly_over_ssh() {
    // Its JSON text is ~17 MB: over the 16 MiB default, so this target
    // allows 64 MiB.
    let s = sshd::shared();
    let toml = format!(
        "{}max_result_bytes = 67108864\n",
        s.target_toml(USER, &keys().ed25519)
    );
    let db = ssh_db(&toml, 10).await;
    db.open_all();
    let rt = db.runtime();
    let bytes = 10 * 1024 * 1024;
    let o = run(
        &rt,
        "dot_iu_diag_blob",
        Mode::Apply,
        &[("bytes", &bytes.to_string())],
    )
    .await;
    assert_eq!(
        o.status,
        RunStatus::Applied,
        "{:?} {}",
        o.error_class,
        o.message
    );
    let blob = result_json(&o)["blob"].as_str().unwrap().to_string();
    assert_eq!(blob.chars().count(), bytes);
    let unit = "a\t~|~\\\n\"\u{e9}\r";
    assert!(blob.starts_with(&unit.repeat(3)));
    let o = run(&rt, "dot_iu_diag_blob", Mode::Verify, &[("bytes", "0")]).await;
    assert_eq!(result_json(&o)["blob"], "");
}

#[tokio::test]
async fn deadline_cancels_the_backend_over_ssh() {
    let db = db_as(USER, &keys().ed25519, 2).await;
    db.open_all();
    let rt = db.runtime();
    let o = run(&rt, "dot_iu_diag_sleep", Mode::Apply, &[("seconds", "30")]).await;
    assert_eq!(o.status, RunStatus::Failed, "{o:?}");
    assert_eq!(o.class(), Some("timeout"));
    assert_eq!(
        db.sql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'govsql:{}'",
            o.job_id
        )),
        "0"
    );
    // The session still serves the next job.
    let o = run(&rt, "dot_iu_healthcheck", Mode::Verify, &[]).await;
    assert_eq!(o.status, RunStatus::Verified, "{o:?}");
}

#[tokio::test]
async fn sshd_stopped_mid_run_fails_jobs_as_unreachable_then_recovers() {
    let own = Sshd::start();
    let db = ssh_db(&own.target_toml(USER, &keys().ed25519), 20).await;
    db.open_all();
    let rt = Arc::new(db.runtime());
    let o = run(&rt, "dot_iu_healthcheck", Mode::Verify, &[]).await;
    assert_eq!(o.status, RunStatus::Verified);
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let rt = rt.clone();
        tasks.push(tokio::spawn(async move {
            run(&rt, "dot_iu_diag_sleep", Mode::Verify, &[("seconds", "5")]).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    own.stop();
    for t in tasks {
        let o = t.await.unwrap();
        assert_eq!(o.status, RunStatus::Failed, "{o:?}");
        assert_eq!(o.class(), Some("target_unreachable"), "{o:?}");
    }
    // While it is down: a clear transport failure, quickly enough.
    let o = run(&rt, "dot_iu_healthcheck", Mode::Verify, &[]).await;
    assert_eq!(o.class(), Some("target_unreachable"));
    own.launch();
    let o = run(&rt, "dot_iu_healthcheck", Mode::Verify, &[]).await;
    assert_eq!(o.status, RunStatus::Verified, "recovered: {o:?}");
    own.stop();
}

#[tokio::test]
async fn migrate_over_ssh_is_idempotent() {
    let s = sshd::shared();
    let pg = pg();
    let name = format!("t{}_sshmig", std::process::id());
    pg.admin("postgres", &format!("CREATE DATABASE {name}"));
    let toml = format!(
        "{}psql = \"{}\"\ndb_host = \"{}\"\ndb_port = {}\ndb_name = \"{name}\"\ndb_user = \"{RUNTIME_ROLE}\"\n",
        s.target_toml(USER, &keys().ed25519),
        pg.psql.display(),
        pg.dir.display(),
        pg.port
    );
    let target: govsql::config::TargetConfig = toml::from_str(&toml).unwrap();
    let exec = govsql::transport::for_target(&target, govsql::psql::DbRole::Admin).unwrap();
    let catalog = govsql::catalog::Catalog::load(&catalog_path()).unwrap();
    let first = govsql::migrate::migrate(exec.as_ref(), &catalog, RUNTIME_ROLE, true)
        .await
        .unwrap();
    let all = govsql::migrate::MIGRATIONS.len() + govsql::migrate::DEMO.len();
    assert_eq!(first.applied.len(), all, "{first:?}");
    let second = govsql::migrate::migrate(exec.as_ref(), &catalog, RUNTIME_ROLE, true)
        .await
        .unwrap();
    assert!(second.applied.is_empty(), "{second:?}");
    assert_eq!(
        pg.admin(&name, "SELECT count(*) FROM dot_iu_command_catalog"),
        catalog.commands().len().to_string()
    );
}

#[tokio::test]
async fn remote_psql_killed_mid_apply_is_settled_by_running_it_again_once() {
    // Its own user, so killing "its" psql cannot touch other tests' jobs.
    let user = sshd::VICTIM.0;
    let db = db_as(user, &keys().ed25519, 30).await;
    db.open_all();
    let rt = Arc::new(db.runtime());
    let task = {
        let rt = rt.clone();
        tokio::spawn(async move {
            run(&rt, "dot_iu_diag_sleep", Mode::Apply, &[("seconds", "3")]).await
        })
    };
    // Wait until the job's backend runs, then kill the remote psql.
    let mut seen = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if db.sql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%fn_dot_iu_dispatch(%' AND application_name LIKE 'govsql:%' AND datname = current_database()") != "0" {
            seen = true;
            break;
        }
    }
    assert!(seen, "the job never started");
    let killed = std::process::Command::new("pkill")
        .args(["-KILL", "-u", user, "-x", "psql"])
        .status()
        .unwrap();
    assert!(killed.success());
    // Outcome unknown: the orphan is cancelled, the job runs again through
    // the same path, and the ledger holds one applied run.
    let o = task.await.unwrap();
    assert_eq!(o.status, RunStatus::Applied, "{o:?}");
    assert_eq!(
        db.count("dot_iu_command_run WHERE run_status = 'applied'"),
        1
    );
    assert_eq!(db.count("dot_iu_command_run"), 1);
}

#[tokio::test]
async fn null_is_told_from_empty_and_from_the_null_marker_over_ssh() {
    let db = bash_db().await;
    db.open_all();
    let rt = db.runtime();
    let echo = |params: Vec<(&'static str, &'static str)>| {
        let rt = &rt;
        async move {
            let o = run(rt, "dot_iu_diag_echo", Mode::Apply, &params).await;
            assert_eq!(o.status, RunStatus::Applied, "{o:?}");
            o.result.unwrap()
        }
    };
    assert_eq!(echo(vec![]).await, vec![vec![None]]);
    assert_eq!(
        echo(vec![("value", "")]).await,
        vec![vec![Some(String::new())]]
    );
    assert_eq!(
        echo(vec![("value", "\\N")]).await,
        vec![vec![Some("\\N".to_string())]]
    );
    assert_eq!(
        echo(vec![("value", "NULL")]).await,
        vec![vec![Some("NULL".to_string())]]
    );
    let tricky = "a\tb\nc\\d~|~e\u{10ffff}'\"";
    assert_eq!(
        echo(vec![("value", tricky)]).await,
        vec![vec![Some(tricky.to_string())]]
    );
}

#[tokio::test]
async fn timeouts_never_wedge_the_channel_slots() {
    // Two channel slots; three jobs that each pass their deadline. Every
    // slot must come back however the channel ended (regression: a slot
    // was held until a Close that russh 0.65 never delivers, so after
    // max_channels timeouts every later job timed out too).
    let s = sshd::shared();
    let toml = s
        .target_toml(USER, &keys().ed25519)
        .replace("max_channels = 8", "max_channels = 2");
    let db = ssh_db(&toml, 2).await;
    db.open_all();
    let rt = db.runtime();
    for _ in 0..3 {
        let o = run(&rt, "dot_iu_diag_sleep", Mode::Verify, &[("seconds", "30")]).await;
        assert_eq!(o.class(), Some("timeout"), "{o:?}");
    }
    let started = std::time::Instant::now();
    let o = run(&rt, "dot_iu_healthcheck", Mode::Verify, &[]).await;
    assert_eq!(o.status, RunStatus::Verified, "{o:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_login_user_with_a_nologin_shell_is_named_as_the_cause() {
    // The natural copy of a system service user: nologin prints its notice
    // instead of running psql; the error says so and how to fix it.
    let db = db_as(sshd::NOLOGIN.0, &keys().ed25519, 20).await;
    let out = db.govsql(&["verify", "--direct", "--json"]);
    let j = json_of(&out);
    assert_eq!(j["status"], "failed", "{j}");
    let msg = j["message"].as_str().unwrap();
    assert!(msg.contains("has no login shell (nologin)"), "{msg}");
    assert!(msg.contains("usermod -s /bin/bash"), "{msg}");
}

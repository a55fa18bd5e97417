//! Rollouts over a real fleet: twelve targets, each its own database
//! (migrated with --demo) spread over four PostgreSQL clusters, all
//! reached over SSH through one sshd. Halt and resume, a canary that
//! fails, a daemon killed mid-rollout; each target's own ledger is the
//! judge of "applied exactly once".

use std::process::Output;
use std::time::Duration;

use serde_json::Value;

use crate::daemon::*;
use crate::harness::*;
use crate::sshd::{self, keys, USER};

/// One target of a fleet: its cluster and database.
pub(crate) struct FleetTarget {
    pub(crate) name: String,
    pub(crate) pg: &'static Pg,
    pub(crate) db: String,
}

impl FleetTarget {
    /// The rollout under `key` (which is also the collection's title)
    /// applied on this target exactly once: one applied ledger row under
    /// its child key, one collection.
    pub(crate) fn assert_applied_once(&self, key: &str) {
        assert_eq!(
            self.rows("applied", &format!("{key}@")),
            1,
            "{} applied exactly once",
            self.name
        );
        assert_eq!(
            self.sql(&format!(
                "SELECT count(*) FROM iu_collection WHERE title = '{key}'"
            )),
            "1",
            "{}",
            self.name
        );
    }

    /// Admin SQL on this target's database.
    pub(crate) fn sql(&self, sql: &str) -> String {
        self.pg.admin(&self.db, sql)
    }

    /// Ledger rows of this target with this status under keys starting
    /// with `key`.
    pub(crate) fn rows(&self, status: &str, key: &str) -> i64 {
        self.sql(&format!(
            "SELECT count(*) FROM dot_iu_command_run WHERE run_status = '{status}' AND idempotency_key LIKE '{key}%'"
        ))
        .parse()
        .unwrap()
    }
}

/// A fleet: the daemon's config lists the targets `t01`… in order; the
/// `base` database (the harness's own) holds the config and state dir.
pub(crate) struct Fleet {
    pub(crate) base: TestDb,
    pub(crate) targets: Vec<FleetTarget>,
}

impl Fleet {
    /// One target per entry of `placement` (the index of its cluster in
    /// `clusters`), with `per_target` extra TOML lines for target i.
    pub(crate) async fn build(
        clusters: &[&'static Pg],
        placement: &[usize],
        per_target: impl Fn(usize) -> String,
    ) -> Fleet {
        Fleet::build_with("", clusters, placement, per_target).await
    }

    /// [`Fleet::build`] with more `[daemon]` settings (TOML lines).
    pub(crate) async fn build_with(
        daemon: &str,
        clusters: &[&'static Pg],
        placement: &[usize],
        per_target: impl Fn(usize) -> String,
    ) -> Fleet {
        let base = Scenario::new().daemon(daemon).ready().db().await;
        let s = sshd::shared();
        let ssh = s.target_toml(USER, &keys().ed25519);
        let mut targets = Vec::new();
        let mut toml = String::new();
        for (i, c) in placement.iter().enumerate() {
            let pg = clusters[*c];
            let name = format!("t{:02}", i + 1);
            let db = format!("{}_{name}", base.name);
            pg.admin("postgres", &format!("CREATE DATABASE {db}"));
            let keys = format!(
                "psql = \"{psql}\"\ndb_host = \"{host}\"\ndb_port = {port}\ndb_name = \"{db}\"\ndb_user = \"{RUNTIME_ROLE}\"\nadmin_db_user = \"postgres\"\n",
                psql = pg.psql.display(),
                host = pg.dir.display(),
                port = pg.port,
            );
            let local = format!("transport = \"local\"\n{keys}");
            let admin = govsql::transport::local::LocalExecutor::new(
                &toml::from_str(&local).unwrap(),
                govsql::psql::DbRole::Admin,
            );
            govsql::migrate::migrate(&admin, &base.catalog, RUNTIME_ROLE, true)
                .await
                .expect("migrate --demo");
            pg.admin(&db, "UPDATE dot_config SET value = 'true'");
            toml.push_str(&format!(
                "\n[targets.{name}]\n{ssh}{keys}session_mode = {}\njob_timeout_s = 30\n{}\n",
                session_mode(),
                per_target(i)
            ));
            targets.push(FleetTarget { name, pg, db });
        }
        // The fleet replaces `main`.
        let text = std::fs::read_to_string(&base.config_path).unwrap();
        let head = &text[..text.find("[targets.main]").unwrap()];
        std::fs::write(&base.config_path, format!("{head}{toml}")).unwrap();
        let mut base = base;
        base.config = govsql::config::Config::load(&base.config_path).unwrap();
        Fleet { base, targets }
    }

    pub(crate) fn target(&self, name: &str) -> &FleetTarget {
        self.targets.iter().find(|t| t.name == name).unwrap()
    }
}

/// `govsql apply dot_iu_create_collection --param title=KEY --targets S
/// --idempotency-key KEY` and `more` flags: a rollout whose key is also
/// the title of the collection it creates on each target.
fn create_everywhere(d: &DaemonProc, key: &str, targets: &str, more: &[&str]) -> Output {
    let title = format!("title={key}");
    let mut args = vec![
        "apply",
        "dot_iu_create_collection",
        "--param",
        &title,
        "--targets",
        targets,
        "--idempotency-key",
        key,
    ];
    args.extend_from_slice(more);
    d.cli(None, &args)
}

/// The stdout of a CLI run that must exit 0, as JSON.
fn json_of_ok(out: Output) -> Value {
    let (code, v) = json_out(&out);
    assert_eq!(code, Some(0), "{v}");
    v
}

/// `govsql verify --targets all --max-concurrency C --wait`: a fleet
/// healthcheck in which all `n` targets verified.
fn verify_all(d: &DaemonProc, concurrency: &str, n: usize) {
    let out = d.cli(
        None,
        &[
            "verify",
            "--targets",
            "all",
            "--max-concurrency",
            concurrency,
            "--wait",
        ],
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{table}");
    assert!(table.contains(&format!("verified {n}")), "{table}");
}

/// The CLI's stdout as JSON, whatever its exit code (returned too).
fn json_out(out: &Output) -> (Option<i32>, Value) {
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), v)
}

/// Each target's state in a rollout's JSON, by name.
fn states(r: &Value) -> Vec<(String, String)> {
    r["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["target"].as_str().unwrap().to_string(),
                t["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn state_of(r: &Value, target: &str) -> String {
    states(r)
        .into_iter()
        .find(|(t, _)| t == target)
        .map(|(_, s)| s)
        .unwrap()
}

/// A rollout with two broken targets (t03's cluster stopped, t04's gate
/// shut) halts once failures exceed max-errors: the canary and what ran
/// applied once each, the rest skipped with no row; fixed, a resume
/// completes it and no target applies twice. Then a second rollout whose
/// second canary fails starts nothing else.
#[tokio::test]
async fn a_rollout_halts_on_failures_and_a_resume_applies_each_target_once() {
    // t03 is alone on the fourth cluster, and gives up at once when its
    // database is down (max_target_wait_s = 0).
    let dead = extra_cluster();
    let clusters = [pg(), extra_cluster(), extra_cluster(), dead];
    let placement: Vec<usize> = (0..12).map(|i| if i == 2 { 3 } else { i % 3 }).collect();
    let fleet = Fleet::build(&clusters, &placement, |i| match i {
        2 => "max_target_wait_s = 0\n".into(),
        _ => String::new(),
    })
    .await;
    let d = DaemonProc::start(&fleet.base);

    dead.stop();
    fleet
        .target("t04")
        .sql("UPDATE dot_config SET value = 'false' WHERE key = 'iu_core.composer_enabled'");
    let out = create_everywhere(
        &d,
        "fleet-1",
        "all",
        &[
            "--canary",
            "1",
            "--max-concurrency",
            "4",
            "--max-errors",
            "1",
            "--wait",
            "--json",
        ],
    );
    let (code, r) = json_out(&out);
    eprintln!("halted rollout: {r}");
    assert_eq!(code, Some(4), "halted exits 4: {r}");
    assert_eq!(r["state"], "halted");
    assert_eq!(state_of(&r, "t01"), "applied", "the canary");
    assert_eq!(state_of(&r, "t03"), "failed");
    assert_eq!(state_of(&r, "t04"), "refused");
    let skipped: Vec<String> = states(&r)
        .into_iter()
        .filter(|(_, s)| s == "skipped")
        .map(|(t, _)| t)
        .collect();
    assert!(
        skipped.len() >= 3,
        "the halt skipped what had not started: {r}"
    );
    for t in fleet.targets.iter().filter(|t| t.name != "t03") {
        let applied = t.rows("applied", "fleet-1@");
        match state_of(&r, &t.name).as_str() {
            "applied" => assert_eq!(applied, 1, "{}", t.name),
            "skipped" => assert_eq!(
                t.sql("SELECT count(*) FROM dot_iu_command_run"),
                "0",
                "a skipped target ran nothing: {}",
                t.name
            ),
            _ => assert_eq!(applied, 0, "{}", t.name),
        }
    }
    // Every applied row names the rollout in its evidence.
    let rid = r["rollout_id"].as_str().unwrap().to_string();
    let ev = fleet
        .target("t01")
        .sql("SELECT evidence->>'rollout_id' FROM dot_iu_command_run WHERE run_status = 'applied'");
    assert_eq!(ev, rid);

    // The table says the same for a person.
    let out = d.cli(None, &["rollout", "status", &rid]);
    let table = String::from_utf8_lossy(&out.stdout);
    eprintln!("halted rollout, as `rollout status` prints it:\n{table}");
    assert!(
        table.contains("halted") && table.contains("TARGET") && table.contains("gate_closed"),
        "{table}"
    );
    let listed = d.cli_json(None, &["rollouts", "--json"]);
    assert_eq!(listed[0]["rollout_id"], rid.as_str());

    // Fixed: the cluster is back, the gate open. The resume runs only
    // what did not succeed.
    dead.launch();
    fleet
        .target("t04")
        .sql("UPDATE dot_config SET value = 'true'");
    let out = d.cli(None, &["rollout", "resume", &rid, "--wait", "--json"]);
    let (code, r) = json_out(&out);
    eprintln!("resumed rollout: {r}");
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(r["state"], "done");
    assert_eq!(r["pass"], 2);
    for t in &fleet.targets {
        t.assert_applied_once("fleet-1");
    }
    let out = d.cli(None, &["rollout", "status", &rid]);
    eprintln!(
        "resumed rollout, as `rollout status` prints it:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // A done rollout resumes no more.
    let out = d.cli(None, &["rollout", "resume", &rid]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("only a halted or partial rollout resumes")
    );
    // Submitted again under its key: the same rollout answers, nothing
    // runs again.
    let again = json_of_ok(create_everywhere(&d, "fleet-1", "all", &["--json"]));
    assert_eq!(again["rollout_id"], rid.as_str());
    assert_eq!(again["state"], "done");
    // The same key over other targets is a conflict, not a new rollout.
    let out = create_everywhere(&d, "fleet-1", "t01,t02", &[]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("belongs to rollout {rid}")),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A canary that fails: nothing else starts.
    fleet
        .target("t02")
        .sql("UPDATE dot_config SET value = 'false' WHERE key = 'iu_core.composer_enabled'");
    let out = create_everywhere(
        &d,
        "fleet-2",
        "all",
        &[
            "--canary",
            "2",
            "--max-concurrency",
            "8",
            "--max-errors",
            "5",
            "--wait",
            "--json",
        ],
    );
    let (code, r) = json_out(&out);
    assert_eq!(code, Some(4), "{r}");
    assert_eq!(r["state"], "halted");
    assert_eq!(state_of(&r, "t01"), "applied");
    assert_eq!(state_of(&r, "t02"), "refused");
    for t in &fleet.targets[2..] {
        assert_eq!(state_of(&r, &t.name), "skipped", "{r}");
    }
    for t in &fleet.targets[2..] {
        assert_eq!(
            t.sql("SELECT count(*) FROM dot_iu_command_run WHERE idempotency_key LIKE 'fleet-2@%'"),
            "0",
            "{}",
            t.name
        );
    }
    // Cancelled for good: its values are erased and it resumes no more.
    let rid2 = r["rollout_id"].as_str().unwrap().to_string();
    let out = d.cli(None, &["rollout", "cancel", &rid2, "--json"]);
    let (code, r) = json_out(&out);
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(r["state"], "cancelled");
    let queue =
        rusqlite::Connection::open(fleet.base.config.daemon.state_dir.join("queue.db")).unwrap();
    queue.busy_timeout(Duration::from_secs(10)).unwrap();
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            queue
                .query_row(
                    "SELECT params IS NULL FROM rollouts WHERE rollout_id = ?1",
                    [&rid2],
                    |r| r.get::<_, bool>(0),
                )
                .unwrap()
        },
        || "the cancelled rollout kept its values".to_string(),
    );
    let out = d.cli(None, &["rollout", "resume", &rid2]);
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("values erased"));
    // Submitted again under its key (the values given again): a new pass
    // over what it did not run; t01, applied already, is not run again.
    fleet
        .target("t02")
        .sql("UPDATE dot_config SET value = 'true'");
    let out = create_everywhere(
        &d,
        "fleet-2",
        "all",
        &["--max-concurrency", "8", "--wait", "--json"],
    );
    let (code, r) = json_out(&out);
    assert_eq!(code, Some(0), "{r}");
    assert_eq!(r["rollout_id"], rid2.as_str());
    assert_eq!(r["pass"], 2);
    for t in &fleet.targets {
        t.assert_applied_once("fleet-2");
    }
}

/// A rollout of 12 with the daemon killed (SIGKILL) in its middle, one
/// child held on a lock at that moment: the restarted daemon goes on
/// from where it stood, the held child is settled by its key, every
/// target ends applied exactly once and nothing stays running.
#[tokio::test]
async fn a_rollout_survives_a_sigkill_and_applies_each_target_once() {
    let clusters = [pg(), extra_cluster(), extra_cluster()];
    let placement: Vec<usize> = (0..12).map(|i| i % 3).collect();
    let fleet = Fleet::build(&clusters, &placement, |_| String::new()).await;
    let mut d = DaemonProc::start(&fleet.base);
    // t05's child waits on a lock while the others go on.
    let t05 = fleet.target("t05");
    let lock = TableLock::take_on(t05.pg, &t05.db, "iu_collection");
    let r = json_of_ok(create_everywhere(
        &d,
        "crash-roll",
        "all",
        &["--max-concurrency", "2", "--json"],
    ));
    let rid = r["rollout_id"].as_str().unwrap().to_string();
    let applied = || {
        fleet
            .targets
            .iter()
            .filter(|t| t.rows("applied", "crash-roll@") == 1)
            .count()
    };
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(20),
        || applied() >= 6,
        || "the rollout did not get going".to_string(),
    );
    d.signal(nix::sys::signal::Signal::SIGKILL);
    d.wait_exit(Duration::from_secs(10));
    let at_kill = applied();
    assert!(at_kill < 12, "the kill came too late ({at_kill} applied)");
    // The held apply commits after the daemon is gone: only its key can
    // tell the restarted daemon.
    lock.release();
    let d = DaemonProc::start(&fleet.base);
    let status = || json_out(&d.cli(None, &["rollout", "status", &rid, "--json"])).1;
    wait_until(
        Duration::from_secs(120),
        Duration::from_millis(200),
        || {
            let r = status();
            r["state"] == "done" && r.get("finished_at").is_some()
        },
        || format!("the rollout did not finish after the restart: {}", status()),
    );
    let r = status();
    for t in &fleet.targets {
        t.assert_applied_once("crash-roll");
        assert_eq!(state_of(&r, &t.name), "applied");
    }
    let jobs = d.cli_json(None, &["jobs", "--json", "--limit", "200"]);
    let stuck: Vec<&Value> = jobs
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| {
            !["applied", "refused", "failed", "cancelled"]
                .contains(&j["status"].as_str().or(j["state"].as_str()).unwrap_or(""))
        })
        .collect();
    assert!(stuck.is_empty(), "nothing stuck: {stuck:?}");
    // Each child names its rollout.
    assert!(jobs
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["command"] == "dot_iu_create_collection")
        .all(|j| j["rollout_id"] == rid.as_str()));
    // Health and metrics count rollouts by state.
    let h = d.cli_json(None, &["health", "--json"]);
    assert_eq!(h["rollouts"]["done"], 1, "{h}");
    assert!(h.get("oldest_running_rollout_s").is_none(), "{h}");
    let m = String::from_utf8_lossy(&d.cli(None, &["metrics"]).stdout).to_string();
    assert!(
        m.contains("govsql_rollouts{state=\"done\"} 1")
            && m.contains("govsql_rollouts{state=\"running\"} 0")
            && m.contains("govsql_rollout_oldest_running_seconds 0"),
        "{m}"
    );
    // A fleet healthcheck: one rollout of verify jobs, one table.
    verify_all(&d, "6", 12);
    eprintln!("rollout kill -9: {at_kill} of 12 targets applied at SIGKILL; 12 of 12 applied exactly once after restart");
}

/// A requires_approval command rolled out to 5 targets waits for one
/// approval by another user, who sees the command, its values and the
/// exact targets; approved, every target applies it once with that
/// approval in its own ledger. A rejected rollout leaves a refused row
/// (rejected) on each target and runs nothing.
#[tokio::test]
async fn a_rollout_that_needs_approval_is_approved_once_for_all_its_targets() {
    let fleet = Fleet::build(&[pg()], &[0; 5], |_| String::new()).await;
    let piece = "00000000-0000-0000-0000-0000000000a7";
    for t in &fleet.targets {
        t.sql(&format!(
            "INSERT INTO iu_collection (collection_id, title) VALUES ('00000000-0000-0000-0000-0000000000c7', 'c'); \
             INSERT INTO iu_piece (piece_id, collection_id, body, deleted_at) VALUES ('{piece}', '00000000-0000-0000-0000-0000000000c7', 'b', now())"
        ));
    }
    let d = DaemonProc::start(&fleet.base);
    let purge = |key: &str, more: &[&str]| {
        let piece_id = format!("piece_id={piece}");
        let mut args = vec![
            "apply",
            "dot_iu_purge_piece",
            "--param",
            &piece_id,
            "--targets",
            "all",
            "--max-concurrency",
            "5",
            "--idempotency-key",
            key,
            "--json",
        ];
        args.extend_from_slice(more);
        d.cli(None, &args)
    };
    let submit = |key: &str| json_of_ok(purge(key, &[]));
    let r = submit("purge-a7");
    assert_eq!(r["state"], "awaiting_approval", "{r}");
    let rid = r["rollout_id"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(1500));
    for t in &fleet.targets {
        assert_eq!(t.sql("SELECT count(*) FROM dot_iu_command_run"), "0");
    }
    // The approver sees the command, its value and the exact targets.
    let out = d.cli(Some(OTHER), &["show", &rid]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("dot_iu_purge_piece")
            && text.contains(&format!("piece_id = {piece}"))
            && text.contains("t01, t02, t03, t04, t05"),
        "{text}"
    );
    let shown = d.cli_json(Some(OTHER), &["show", &rid, "--json"]);
    assert_eq!(
        shown["targets"],
        serde_json::json!(["t01", "t02", "t03", "t04", "t05"])
    );
    let listed = d.cli(Some(OTHER), &["approvals"]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&rid));
    // Not by its submitter; once by another user.
    let own = d.cli(None, &["approve", &rid]);
    assert_eq!(own.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&own.stderr).contains("different user"));
    let ok = d.cli(Some(OTHER), &["approve", &rid, "--reason", "OPS-7"]);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let status = || json_out(&d.cli(None, &["rollout", "status", &rid, "--json"])).1;
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(200),
        || status()["state"] == "done",
        || format!("the approved rollout did not finish: {}", status()),
    );
    assert_eq!(status()["approved_by"], OTHER);
    // Approved and done, it is its submitter's again: another user sees
    // neither it nor its status.
    let theirs = d.cli_json(Some(OTHER), &["rollouts", "--json"]);
    assert_eq!(theirs, serde_json::json!([]));
    let out = d.cli(Some(OTHER), &["rollout", "status", &rid]);
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("no rollout {rid}")));
    for t in &fleet.targets {
        assert_eq!(t.rows("applied", "purge-a7@"), 1, "{}", t.name);
        assert_eq!(
            t.sql("SELECT evidence->>'approved_by' FROM dot_iu_command_run WHERE run_status = 'applied'"),
            OTHER
        );
    }
    // A rejection: each target records it, nothing runs.
    let r = submit("purge-b7");
    let rid = r["rollout_id"].as_str().unwrap().to_string();
    // A wait that ends first exits 5; the rollout goes on waiting.
    let out = purge("purge-b7", &["--wait", "--timeout", "1"]);
    let (code, waited) = json_out(&out);
    assert_eq!(code, Some(5), "{waited}");
    assert_eq!(waited["rollout_id"], rid.as_str());
    assert_eq!(waited["state"], "awaiting_approval");
    // Cancelled while it waits: each target records it, nothing runs.
    let c = submit("purge-c7");
    let cid = c["rollout_id"].as_str().unwrap().to_string();
    let out = d.cli(None, &["rollout", "cancel", &cid]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(200),
        || {
            fleet
                .targets
                .iter()
                .all(|t| t.rows("refused", "purge-c7@") == 1)
        },
        || "a cancelled waiting rollout left no refused row on each target".to_string(),
    );
    let no = d.cli(Some(OTHER), &["reject", &rid, "--reason", "not today"]);
    assert_eq!(no.status.code(), Some(0));
    wait_until(
        Duration::from_secs(60),
        Duration::from_millis(200),
        || {
            let r = json_out(&d.cli(None, &["rollout", "status", &rid, "--json"])).1;
            r["state"] == "cancelled" && r.get("finished_at").is_some()
        },
        || "the rejected rollout did not end".to_string(),
    );
    for t in &fleet.targets {
        assert_eq!(t.rows("refused", "purge-b7@"), 1, "{}", t.name);
        assert_eq!(t.rows("applied", "purge-b7@"), 0, "{}", t.name);
    }
}

/// The daemon's established TCP connections to `port` on loopback (its
/// sockets matched against the kernel's table).
fn connections_to(pid: i32, port: u16) -> usize {
    let mut inodes = std::collections::HashSet::new();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 9 && f[3] == "01" && f[2].ends_with(&format!(":{port:04X}")) {
            inodes.insert(f[9].to_string());
        }
    }
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter(|l| {
                    let l = l.to_string_lossy();
                    l.strip_prefix("socket:[")
                        .and_then(|r| r.strip_suffix(']'))
                        .is_some_and(|i| inodes.contains(i))
                })
                .count()
        })
        .unwrap_or(0)
}

/// Twelve targets under `max_ssh_connections = 4`: a fan-out over all of
/// them never holds more than 4 connections open (idle ones close for the
/// next target), every target answers, and the gauge says the same.
#[tokio::test]
async fn a_fan_out_stays_under_max_ssh_connections() {
    let fleet = Fleet::build_with("max_ssh_connections = 4\n", &[pg()], &[0; 12], |_| {
        String::new()
    })
    .await;
    let d = DaemonProc::start(&fleet.base);
    let port = sshd::shared().port;
    let pid = d.pid();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut most = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                most = most.max(connections_to(pid, port));
                std::thread::sleep(Duration::from_millis(2));
            }
            most
        })
    };
    for _ in 0..2 {
        verify_all(&d, "8", 12);
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let most = sampler.join().unwrap();
    assert!(most >= 1, "the sampler saw no connection at all");
    assert!(most <= 4, "{most} SSH connections were open at once");
    let m = String::from_utf8_lossy(&d.cli(None, &["metrics"]).stdout).to_string();
    let open: usize = m
        .lines()
        .find_map(|l| l.strip_prefix("govsql_ssh_connections_open "))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!((1..=4).contains(&open), "{m}");
    assert!(m.contains("govsql_ssh_connections_max 4"), "{m}");
    eprintln!("max_ssh_connections = 4: at most {most} open during two fan-outs over 12 targets");
}

/// sshd killed (with every session) while all six children of a rollout
/// wait inside their transactions, the locks released while it is down,
/// then sshd back: the children whose outcome became unknown are settled
/// by their keys, the rollout ends done, and no target applied twice.
#[tokio::test]
async fn a_rollout_outlives_an_sshd_restart_with_its_children_in_doubt() {
    let fleet = Fleet::build(&[pg()], &[0; 6], |_| String::new()).await;
    let d = DaemonProc::start(&fleet.base);
    let locks: Vec<TableLock> = fleet
        .targets
        .iter()
        .map(|t| TableLock::take_on(t.pg, &t.db, "iu_collection"))
        .collect();
    let r = json_of_ok(create_everywhere(
        &d,
        "ssh-cut",
        "all",
        &["--max-concurrency", "6", "--json"],
    ));
    let rid = r["rollout_id"].as_str().unwrap().to_string();
    let waiting = || {
        fleet
            .targets
            .iter()
            .filter(|t| {
                t.sql("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'")
                    != "0"
            })
            .count()
    };
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(20),
        || waiting() == 6,
        || format!("{} of 6 children wait on their lock", waiting()),
    );
    let s = sshd::shared();
    s.stop();
    for l in locks {
        l.release();
    }
    std::thread::sleep(Duration::from_millis(500));
    s.launch();
    let status = || json_out(&d.cli(None, &["rollout", "status", &rid, "--json"])).1;
    wait_until(
        Duration::from_secs(120),
        Duration::from_millis(200),
        || status()["state"] == "done" && status().get("finished_at").is_some(),
        || {
            format!(
                "the rollout did not finish after sshd came back: {}",
                status()
            )
        },
    );
    for t in &fleet.targets {
        t.assert_applied_once("ssh-cut");
    }
    // The cut really left children in doubt (settled by key, not re-run).
    let in_doubt = d.log_text().matches("apply outcome unknown").count();
    assert!(
        in_doubt >= 1,
        "no child was in doubt: the cut came too late"
    );
    eprintln!("sshd cut under a rollout: {in_doubt} of 6 children in doubt, settled by key; 6 of 6 applied exactly once");
}

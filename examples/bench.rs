//! The govsql benchmark (run by `scripts/bench`, which starts the servers
//! and the daemon): throughput and latency of governed verify jobs
//! (dot_iu_healthcheck) and apply jobs (dot_iu_add_piece, each with its
//! ledger row) through the daemon over SSH, in session mode (target
//! `main`) and per-job mode (target `perjob`), at concurrency 1 and 8,
//! against baselines measured in the same run on the same servers (bare
//! psql run locally per job, the same governed job with local psql per job
//! and no daemon, OpenSSH `ssh host psql` with a fresh connection per job,
//! OpenSSH with ControlMaster); then a 10 000-line `govsql batch` of
//! applies end to end, the daemon's submit rate and its peak RSS with
//! 10 000 jobs queued. Medians of several rounds; ratios against the
//! baselines.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use govsql::client::Client;
use govsql::job::{Job, JobState, Params};
use govsql::protocol::{Reply, Request, Submit};
use govsql::runtime::Mode;

#[derive(Parser, Debug, Clone)]
struct Args {
    /// The daemon's socket.
    #[arg(long)]
    socket: PathBuf,
    /// The daemon's pid (for its RSS).
    #[arg(long)]
    daemon_pid: u32,
    /// The real psql binary.
    #[arg(long)]
    psql: String,
    /// PostgreSQL socket directory.
    #[arg(long)]
    pg_host: String,
    /// PostgreSQL port.
    #[arg(long)]
    pg_port: u16,
    /// Database.
    #[arg(long, default_value = "iu_core")]
    db: String,
    /// Runtime role.
    #[arg(long, default_value = "govsql_runtime")]
    db_user: String,
    /// The role of the bare-psql baselines: the runtime role may call
    /// nothing but the dispatcher, so the baselines run the governed
    /// function as the admin role.
    #[arg(long, default_value = "postgres")]
    baseline_user: String,
    /// sshd port.
    #[arg(long)]
    ssh_port: u16,
    /// SSH user.
    #[arg(long)]
    ssh_user: String,
    /// SSH key.
    #[arg(long)]
    ssh_key: PathBuf,
    /// known_hosts file.
    #[arg(long)]
    known_hosts: PathBuf,
    /// Scratch directory (ControlMaster socket).
    #[arg(long)]
    work: PathBuf,
    /// Rounds per measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The catalog (for the in-process runtime baseline).
    #[arg(long)]
    catalog: PathBuf,
    /// Jobs queued for the RSS measurement.
    #[arg(long, default_value_t = 10_000)]
    queued: usize,
    /// Lines of the `govsql batch` measurement.
    #[arg(long, default_value_t = 10_000)]
    batch: usize,
    /// The govsql binary (for `govsql batch`).
    #[arg(long)]
    govsql: PathBuf,
    /// The collection the apply jobs add pieces to.
    #[arg(long)]
    collection: String,
}

/// What a job does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Work {
    /// dot_iu_healthcheck, verify.
    Verify,
    /// dot_iu_add_piece, apply.
    Apply,
}

impl Work {
    fn label(self) -> &'static str {
        match self {
            Work::Verify => "verify",
            Work::Apply => "apply",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    LocalPsql,
    SshFresh,
    SshControlMaster,
    RuntimeLocal,
    DaemonPerJob,
    Daemon,
    /// Session mode behind the database host's remote-gate (its grammar
    /// filter and Landlock wall).
    DaemonGated,
}

impl Method {
    fn label(self) -> &'static str {
        match self {
            Method::LocalPsql => "bare psql locally, per job",
            Method::SshFresh => "OpenSSH, new connection per job",
            Method::SshControlMaster => "OpenSSH ControlMaster, per job",
            Method::RuntimeLocal => "governed job, local psql per job, no daemon",
            Method::DaemonPerJob => "govsql daemon over SSH, per-job mode",
            Method::Daemon => "govsql daemon over SSH, session mode",
            Method::DaemonGated => "govsql daemon over SSH, session mode, behind remote-gate",
        }
    }

    fn jobs(self, concurrency: usize) -> usize {
        let base = match self {
            Method::SshFresh => 30,
            Method::Daemon | Method::DaemonGated => 1000,
            _ => 150,
        };
        if concurrency > 1 {
            base * 2
        } else {
            base
        }
    }
}

fn query(a: &Args, w: Work) -> String {
    match w {
        Work::Verify => "SELECT public.fn_iu_collection_healthcheck()".into(),
        Work::Apply => format!(
            "SELECT public.fn_iu_add_piece('{}'::uuid, 'bench piece')",
            a.collection
        ),
    }
}

fn psql_words(a: &Args, w: Work) -> Vec<String> {
    [
        a.psql.as_str(),
        "-X",
        "-w",
        "-q",
        "-A",
        "-t",
        "-h",
        &a.pg_host,
        "-p",
        &a.pg_port.to_string(),
        "-U",
        &a.baseline_user,
        "-d",
        &a.db,
        "-c",
        &query(a, w),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn ssh_base(a: &Args, control: bool, work: Work) -> Vec<String> {
    let mut w: Vec<String> = [
        "ssh",
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    w.push(format!("UserKnownHostsFile={}", a.known_hosts.display()));
    w.extend([
        "-i".to_string(),
        a.ssh_key.display().to_string(),
        "-p".into(),
        a.ssh_port.to_string(),
    ]);
    if control {
        w.extend([
            "-o".to_string(),
            "ControlMaster=auto".into(),
            "-o".into(),
            format!("ControlPath={}/cm-%r@%h:%p", a.work.display()),
            "-o".into(),
            "ControlPersist=300".into(),
        ]);
    }
    w.push(format!("{}@127.0.0.1", a.ssh_user));
    let remote: Vec<String> = psql_words(a, work)
        .iter()
        .map(|s| shell_escape::unix::escape(s.as_str().into()).into_owned())
        .collect();
    w.push(remote.join(" "));
    w
}

async fn run_process(words: &[String]) -> bool {
    tokio::process::Command::new(&words[0])
        .args(&words[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .map(|s| s.success())
        .unwrap_or(false)
}

fn local_runtime(a: &Args) -> govsql::runtime::Runtime {
    let toml = format!(
        "transport = \"local\"\nsession_mode = false\npsql = \"{}\"\ndb_host = \"{}\"\ndb_port = {}\ndb_name = \"{}\"\ndb_user = \"{}\"\n",
        a.psql, a.pg_host, a.pg_port, a.db, a.db_user
    );
    let target: govsql::config::TargetConfig = toml::from_str(&toml).expect("local target");
    let catalog = govsql::catalog::Catalog::load(&a.catalog).expect("catalog");
    govsql::runtime::Runtime::new(
        Arc::new(catalog),
        Arc::new(govsql::transport::local::LocalExecutor::new(
            &target,
            govsql::psql::DbRole::Runtime,
        )),
        "bench-local",
        govsql::switch::ApplySwitch::new(&a.work.join("state")),
        Duration::from_secs(60),
    )
}

/// A job's command, mode and params.
fn job_parts(a: &Args, w: Work) -> (String, Mode, Params) {
    match w {
        Work::Verify => ("dot_iu_healthcheck".into(), Mode::Verify, Params::default()),
        Work::Apply => (
            "dot_iu_add_piece".into(),
            Mode::Apply,
            Params(
                [
                    ("collection_id".to_string(), a.collection.clone()),
                    ("body".to_string(), "bench piece".to_string()),
                ]
                .into_iter()
                .collect(),
            ),
        ),
    }
}

fn done(w: Work) -> JobState {
    match w {
        Work::Verify => JobState::Verified,
        Work::Apply => JobState::Applied,
    }
}

async fn runtime_job(a: &Args, rt: &govsql::runtime::Runtime, w: Work) -> bool {
    let (command, mode, params) = job_parts(a, w);
    let job = Job::new(
        command,
        mode,
        "bench-local".into(),
        params,
        None,
        "bench".into(),
        0,
    );
    rt.run(&job).await.state() == done(w)
}

/// A verify of dot_iu_healthcheck, answered at once or when it ends.
fn healthcheck(wait: bool) -> Request {
    Request::Submit(Submit {
        command: "dot_iu_healthcheck".into(),
        mode: Mode::Verify,
        params: Params::default(),
        target: None,
        idempotency_key: None,
        plan_digest: None,
        wait,
        timeout_s: wait.then_some(120),
        targets: None,
        strategy: None,
    })
}

async fn daemon_job(a: &Args, client: &mut Client, w: Work, target: &str) -> bool {
    let (command, mode, params) = job_parts(a, w);
    let req = Request::Submit(Submit {
        command,
        mode,
        params,
        target: Some(target.to_string()),
        idempotency_key: None,
        plan_digest: None,
        wait: true,
        timeout_s: Some(120),
        targets: None,
        strategy: None,
    });
    match client.call(&req).await {
        Ok(Reply::Job(j)) => j.state == done(w),
        Ok(_) => false,
        Err(_) => false,
    }
}

/// One round: `jobs` jobs by `concurrency` workers. Returns (jobs/s,
/// latencies in ms, failures).
async fn round(
    a: &Args,
    w: Work,
    m: Method,
    concurrency: usize,
    jobs: usize,
) -> (f64, Vec<f64>, usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let a = a.clone();
        let next = next.clone();
        let failures = failures.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let target = match m {
                Method::Daemon => "main",
                Method::DaemonGated => "gated",
                _ => "perjob",
            };
            let mut client = if matches!(
                m,
                Method::Daemon | Method::DaemonPerJob | Method::DaemonGated
            ) {
                Some(Client::connect(&a.socket).await.expect("daemon socket"))
            } else {
                None
            };
            let runtime = (m == Method::RuntimeLocal).then(|| local_runtime(&a));
            let words = match m {
                Method::LocalPsql => psql_words(&a, w),
                Method::SshFresh => ssh_base(&a, false, w),
                Method::SshControlMaster => ssh_base(&a, true, w),
                Method::RuntimeLocal
                | Method::Daemon
                | Method::DaemonPerJob
                | Method::DaemonGated => Vec::new(),
            };
            while next.fetch_add(1, Ordering::SeqCst) < jobs {
                let t = Instant::now();
                let ok = match (client.as_mut(), runtime.as_ref()) {
                    (Some(c), _) => daemon_job(&a, c, w, target).await,
                    (None, Some(rt)) => runtime_job(&a, rt, w).await,
                    (None, None) => run_process(&words).await,
                };
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                if !ok {
                    failures.fetch_add(1, Ordering::SeqCst);
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    let rate = jobs as f64 / started.elapsed().as_secs_f64();
    (rate, all, failures.load(Ordering::SeqCst))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    percentile(&v, 0.5)
}

struct Row {
    work: Work,
    method: Method,
    concurrency: usize,
    rate: f64,
    p50: f64,
    p95: f64,
    failures: usize,
}

fn rss_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

/// Measures one workload by one method at one concurrency (median of the
/// rounds; latency percentiles over every job of every round).
async fn measure(a: &Args, w: Work, m: Method, concurrency: usize) -> Row {
    let mut rates = Vec::new();
    let mut lats = Vec::new();
    let mut failures = 0;
    for _ in 0..a.rounds {
        let (rate, lat, f) = round(a, w, m, concurrency, m.jobs(concurrency)).await;
        rates.push(rate);
        lats.extend(lat);
        failures += f;
    }
    lats.sort_by(|x, y| x.total_cmp(y));
    let row = Row {
        work: w,
        method: m,
        concurrency,
        rate: median(rates),
        p50: percentile(&lats, 0.5),
        p95: percentile(&lats, 0.95),
        failures,
    };
    eprintln!(
        "measured {:<6} {:<44} c={} {:>7.1} jobs/s p50 {:>6.2} ms p95 {:>6.2} ms failures {}",
        w.label(),
        m.label(),
        concurrency,
        row.rate,
        row.p50,
        row.p95,
        row.failures
    );
    row
}

/// A `govsql batch` of `n` applies, end to end (submit all, wait for
/// each): seconds, and the CLI's summary line.
async fn batch(a: &Args) -> (f64, String) {
    let file = a.work.join("batch.jsonl");
    let line = format!(
        "{{\"command\": \"dot_iu_add_piece\", \"mode\": \"apply\", \"params\": {{\"collection_id\": \"{}\", \"body\": \"batch piece\"}}}}\n",
        a.collection
    );
    std::fs::write(&file, line.repeat(a.batch)).expect("batch file");
    let started = Instant::now();
    let out = tokio::process::Command::new(&a.govsql)
        .arg("batch")
        .arg(&file)
        .output()
        .await
        .expect("govsql batch");
    let secs = started.elapsed().as_secs_f64();
    let summary = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (secs, summary)
}

#[tokio::main]
async fn main() {
    let a = Args::parse();
    // Warm up: the ControlMaster connection, the daemon's SSH session.
    run_process(&ssh_base(&a, true, Work::Verify)).await;
    let mut c = Client::connect(&a.socket).await.expect("daemon socket");
    for _ in 0..5 {
        daemon_job(&a, &mut c, Work::Verify, "main").await;
        daemon_job(&a, &mut c, Work::Verify, "perjob").await;
        daemon_job(&a, &mut c, Work::Verify, "gated").await;
    }
    let mut rows = Vec::new();
    for w in [Work::Verify, Work::Apply] {
        for concurrency in [1usize, 8] {
            for m in [
                Method::LocalPsql,
                Method::SshFresh,
                Method::SshControlMaster,
                Method::RuntimeLocal,
                Method::DaemonPerJob,
                Method::Daemon,
                Method::DaemonGated,
            ] {
                if w == Work::Apply && m == Method::SshFresh {
                    continue;
                }
                rows.push(measure(&a, w, m, concurrency).await);
            }
        }
    }

    let (batch_secs, batch_summary) = batch(&a).await;
    eprintln!(
        "measured batch of {} applies: {batch_secs:.1} s ({batch_summary})",
        a.batch
    );

    // Submit rate and RSS with many jobs queued.
    let before_hwm = rss_kb(a.daemon_pid, "VmHWM:");
    let submitted = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let socket = a.socket.clone();
        let submitted = submitted.clone();
        let total = a.queued;
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(&socket).await.expect("socket");
            while submitted.fetch_add(1, Ordering::SeqCst) < total {
                let _ = c.call(&healthcheck(false)).await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let submit_rate = a.queued as f64 / started.elapsed().as_secs_f64();
    let mut health = Client::connect(&a.socket).await.expect("socket");
    let h = health
        .call(&Request::Health {})
        .await
        .ok()
        .and_then(|r| match r {
            Reply::Health(h) => Some(h),
            _ => None,
        });
    let queued = h
        .as_ref()
        .and_then(|h| h.jobs.get(&JobState::Queued).copied())
        .unwrap_or(0);
    let hwm = rss_kb(a.daemon_pid, "VmHWM:");
    let rss = rss_kb(a.daemon_pid, "VmRSS:");

    let get = |w: Work, m: Method, c: usize| {
        rows.iter()
            .find(|r| r.work == w && r.method == m && r.concurrency == c)
    };
    let rate = |w: Work, m: Method, c: usize| get(w, m, c).map(|r| r.rate).unwrap_or(f64::NAN);
    println!();
    println!(
        "| work | method | concurrency | jobs/s (median of {}) | p50 ms | p95 ms | failures |",
        a.rounds
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.1} | {:.2} | {:.2} | {} |",
            r.work.label(),
            r.method.label(),
            r.concurrency,
            r.rate,
            r.p50,
            r.p95,
            r.failures
        );
    }
    println!();
    println!("| ratio (daemon jobs/s ÷ baseline) | mode | c=1 | c=8 |");
    println!("|---|---|---|---|");
    for w in [Work::Verify, Work::Apply] {
        for (daemon, mode) in [
            (Method::Daemon, "session"),
            (Method::DaemonPerJob, "per-job"),
        ] {
            for m in [
                Method::LocalPsql,
                Method::SshFresh,
                Method::SshControlMaster,
                Method::RuntimeLocal,
            ] {
                if get(w, m, 1).is_none() {
                    continue;
                }
                println!(
                    "| {} vs {} | {mode} | {:.2}× | {:.2}× |",
                    w.label(),
                    m.label(),
                    rate(w, daemon, 1) / rate(w, m, 1),
                    rate(w, daemon, 8) / rate(w, m, 8)
                );
            }
        }
    }
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!();
    println!("| remote-gate's cost (session mode; gated jobs/s ÷ ungated, same run) | c=1 | c=8 | target |");
    println!("|---|---|---|---|");
    for w in [Work::Verify, Work::Apply] {
        let r1 = rate(w, Method::DaemonGated, 1) / rate(w, Method::Daemon, 1);
        let r8 = rate(w, Method::DaemonGated, 8) / rate(w, Method::Daemon, 8);
        println!(
            "| {} | {r1:.3}× | {r8:.3}× | ≥ 0.95× ({}) |",
            w.label(),
            verdict(r1 >= 0.95 && r8 >= 0.95)
        );
    }
    let v8 = rate(Work::Verify, Method::Daemon, 8);
    let v_ratio = v8 / rate(Work::Verify, Method::LocalPsql, 8);
    let a_ratio = rate(Work::Apply, Method::Daemon, 8) / rate(Work::Apply, Method::LocalPsql, 8);
    let p50 = get(Work::Verify, Method::Daemon, 1)
        .map(|r| r.p50)
        .unwrap_or(f64::NAN);
    let hwm_mb = hwm as f64 / 1024.0;
    println!();
    println!("| target (session mode) | measured | target | |");
    println!("|---|---|---|---|");
    println!(
        "| verify c=8 ÷ bare local psql per job | {v_ratio:.1}× | ≥ 10× | {} |",
        verdict(v_ratio >= 10.0)
    );
    println!(
        "| verify c=8 | {v8:.0} jobs/s | ≥ 1000 | {} |",
        verdict(v8 >= 1000.0)
    );
    println!(
        "| apply c=8 ÷ bare local psql per job | {a_ratio:.1}× | ≥ 5× | {} |",
        verdict(a_ratio >= 5.0)
    );
    println!(
        "| batch of {} applies, end to end | {batch_secs:.1} s ({batch_summary}) | ≤ 20 s | {} |",
        a.batch,
        verdict(batch_secs <= 20.0)
    );
    println!(
        "| verify c=1 p50 latency (loopback) | {p50:.2} ms | ≤ 2 ms | {} |",
        verdict(p50 <= 2.0)
    );
    println!(
        "| submit rate ({} submits, 8 connections) | {submit_rate:.0}/s | ≥ 2000/s | {} |",
        a.queued,
        verdict(submit_rate >= 2000.0)
    );
    println!(
        "| daemon peak RSS (VmHWM; 8 warm sessions, {} submitted, {queued} still queued at the reading; before the submits {:.1} MB; now {:.1} MB) | {hwm_mb:.1} MB | ≤ 30 MB | {} |",
        a.queued,
        before_hwm as f64 / 1024.0,
        rss as f64 / 1024.0,
        verdict(hwm_mb <= 30.0)
    );
}

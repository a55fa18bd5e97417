//! The govsql benchmark (run by `scripts/bench`, which starts the servers
//! and the daemon): throughput and latency of verify jobs through the
//! daemon over SSH at concurrency 1 and 8, against three baselines measured
//! in the same run on the same servers (psql run locally per job, OpenSSH
//! `ssh host psql` with a fresh connection per job, OpenSSH with
//! ControlMaster), then the daemon's submit rate and peak RSS with 10 000
//! jobs queued. Medians of several rounds; ratios against the baselines.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use govsql::client::Client;
use govsql::job::{Job, JobState, Params};
use govsql::protocol::{Request, PROTOCOL_VERSION};
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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    LocalPsql,
    SshFresh,
    SshControlMaster,
    RuntimeLocal,
    Daemon,
}

impl Method {
    fn label(self) -> &'static str {
        match self {
            Method::LocalPsql => "psql locally, per job",
            Method::SshFresh => "OpenSSH, new connection per job",
            Method::SshControlMaster => "OpenSSH ControlMaster",
            Method::RuntimeLocal => "same governed job, local psql, no daemon",
            Method::Daemon => "govsql daemon over SSH (russh)",
        }
    }

    fn jobs(self, concurrency: usize) -> usize {
        let base = match self {
            Method::SshFresh => 30,
            _ => 150,
        };
        if concurrency > 1 {
            base * 2
        } else {
            base
        }
    }
}

const QUERY: &str = "SELECT public.fn_iu_collection_healthcheck()";

fn psql_words(a: &Args) -> Vec<String> {
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
        QUERY,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn ssh_base(a: &Args, control: bool) -> Vec<String> {
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
    let remote: Vec<String> = psql_words(a)
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
        "transport = \"local\"\npsql = \"{}\"\ndb_host = \"{}\"\ndb_port = {}\ndb_name = \"{}\"\ndb_user = \"{}\"\n",
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
        govsql::switch::ApplySwitch::new(&a.work),
        Duration::from_secs(60),
    )
}

async fn runtime_job(rt: &govsql::runtime::Runtime) -> bool {
    let job = Job::new(
        "dot_iu_healthcheck".into(),
        Mode::Verify,
        "bench-local".into(),
        Params::default(),
        None,
        "bench".into(),
        0,
    );
    rt.run(&job).await.status == govsql::runtime::RunStatus::Verified
}

/// A verify of dot_iu_healthcheck, answered at once or when it ends.
fn healthcheck(wait: bool) -> Request {
    Request::Submit {
        v: PROTOCOL_VERSION,
        command: "dot_iu_healthcheck".into(),
        mode: Mode::Verify,
        params: Params::default(),
        target: None,
        idempotency_key: None,
        wait,
        timeout_s: wait.then_some(120),
    }
}

async fn daemon_job(client: &mut Client) -> bool {
    match client.call(&healthcheck(true)).await {
        Ok(r) => r
            .job
            .map(|j| j.state == JobState::Verified)
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// One round: `jobs` jobs by `concurrency` workers. Returns (jobs/s,
/// latencies in ms, failures).
async fn round(a: &Args, m: Method, concurrency: usize, jobs: usize) -> (f64, Vec<f64>, usize) {
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
            let mut client = if m == Method::Daemon {
                Some(Client::connect(&a.socket).await.expect("daemon socket"))
            } else {
                None
            };
            let runtime = (m == Method::RuntimeLocal).then(|| local_runtime(&a));
            let words = match m {
                Method::LocalPsql => psql_words(&a),
                Method::SshFresh => ssh_base(&a, false),
                Method::SshControlMaster => ssh_base(&a, true),
                Method::RuntimeLocal | Method::Daemon => Vec::new(),
            };
            while next.fetch_add(1, Ordering::SeqCst) < jobs {
                let t = Instant::now();
                let ok = match (client.as_mut(), runtime.as_ref()) {
                    (Some(c), _) => daemon_job(c).await,
                    (None, Some(rt)) => runtime_job(rt).await,
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

#[tokio::main]
async fn main() {
    let a = Args::parse();
    // Warm up: the ControlMaster connection, the daemon's SSH session.
    run_process(&ssh_base(&a, true)).await;
    let mut c = Client::connect(&a.socket).await.expect("daemon socket");
    for _ in 0..5 {
        daemon_job(&mut c).await;
    }
    let mut rows = Vec::new();
    for concurrency in [1usize, 8] {
        for m in [
            Method::LocalPsql,
            Method::SshFresh,
            Method::SshControlMaster,
            Method::RuntimeLocal,
            Method::Daemon,
        ] {
            let mut rates = Vec::new();
            let mut lats = Vec::new();
            let mut failures = 0;
            for _ in 0..a.rounds {
                let (rate, lat, f) = round(&a, m, concurrency, m.jobs(concurrency)).await;
                rates.push(rate);
                lats.extend(lat);
                failures += f;
            }
            lats.sort_by(|x, y| x.total_cmp(y));
            let row = Row {
                method: m,
                concurrency,
                rate: median(rates),
                p50: percentile(&lats, 0.5),
                p95: percentile(&lats, 0.95),
                failures,
            };
            eprintln!(
                "measured {:<34} c={} {:>7.1} jobs/s p50 {:>6.1} ms p95 {:>6.1} ms failures {}",
                m.label(),
                concurrency,
                row.rate,
                row.p50,
                row.p95,
                row.failures
            );
            rows.push(row);
        }
    }

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
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut health = Client::connect(&a.socket).await.expect("socket");
    let h = health
        .call(&Request::Health {
            v: PROTOCOL_VERSION,
        })
        .await
        .ok()
        .and_then(|r| r.health);
    let queued = h
        .as_ref()
        .and_then(|h| h.jobs.get(&JobState::Queued).copied())
        .unwrap_or(0);
    let hwm = rss_kb(a.daemon_pid, "VmHWM:");
    let rss = rss_kb(a.daemon_pid, "VmRSS:");

    let get = |m: Method, c: usize| {
        rows.iter()
            .find(|r| r.method == m && r.concurrency == c)
            .map(|r| r.rate)
            .unwrap_or(f64::NAN)
    };
    println!();
    println!(
        "| method | concurrency | jobs/s (median of {}) | p50 ms | p95 ms | failures |",
        a.rounds
    );
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {} |",
            r.method.label(),
            r.concurrency,
            r.rate,
            r.p50,
            r.p95,
            r.failures
        );
    }
    println!();
    println!("| ratio (daemon jobs/s ÷ baseline) | c=1 | c=8 | target |");
    println!("|---|---|---|---|");
    for (m, target) in [
        (Method::LocalPsql, "≥ 0.9×"),
        (Method::SshFresh, "≥ 10×"),
        (Method::SshControlMaster, "≥ 1.5×"),
        (Method::RuntimeLocal, "(transport + daemon cost)"),
    ] {
        println!(
            "| vs {} | {:.2}× | {:.2}× | {target} |",
            m.label(),
            get(Method::Daemon, 1) / get(m, 1),
            get(Method::Daemon, 8) / get(m, 8)
        );
    }
    println!();
    println!("| daemon memory and submits | value | target |");
    println!("|---|---|---|");
    println!(
        "| submit rate ({} submits, 8 connections) | {:.0} submits/s | ≥ 2000/s |",
        a.queued, submit_rate
    );
    println!("| jobs still queued at the reading | {queued} | |");
    println!("| daemon RSS now | {:.1} MB | |", rss as f64 / 1024.0);
    println!(
        "| daemon peak RSS (VmHWM) | {:.1} MB (before the submits: {:.1} MB) | ≤ 30 MB |",
        hwm as f64 / 1024.0,
        before_hwm as f64 / 1024.0
    );
}

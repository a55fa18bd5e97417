//! The fleet part of the benchmark (run by `scripts/bench-fleet`, which
//! starts the clusters, one sshd and a daemon whose config lists the
//! targets): one verify rollout (dot_iu_healthcheck) over every target,
//! cold (the daemon just started: no SSH session open) and then warm,
//! at `--max-concurrency 16`. Reports the total time (submit to the
//! last target's end), the per-target p50/p95 (each child's duration as
//! its evidence says), the daemon's peak RSS and the most SSH connections
//! it held open at once (its sockets to the sshd port, sampled from
//! /proc every 2 ms). Medians over the warm rounds.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use govsql::client::Client;
use govsql::job::{Mode, Params};
use govsql::protocol::{Reply, Request, RolloutRef, Submit};
use govsql::rollout::{Limit, Rollout, Strategy, TargetState};

#[derive(Parser, Debug)]
struct Args {
    /// The daemon's socket.
    #[arg(long)]
    socket: PathBuf,
    /// The daemon's pid (RSS, connections).
    #[arg(long)]
    daemon_pid: u32,
    /// The sshd port (the daemon's connections to it are counted).
    #[arg(long)]
    ssh_port: u16,
    /// Targets at once.
    #[arg(long, default_value_t = 16)]
    concurrency: u32,
    /// Warm rounds (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// What this run is, for the table.
    #[arg(long)]
    label: String,
    /// The config's max_ssh_connections (for the table).
    #[arg(long)]
    cap: usize,
    /// The warm fan-out's target time in seconds, if this run has one.
    #[arg(long)]
    warm_target_s: Option<f64>,
}

/// One fan-out's figures.
struct FanOut {
    total: Duration,
    p50_ms: u64,
    p95_ms: u64,
    targets: usize,
    most_open: usize,
}

/// The daemon's established TCP connections to `port` (its sockets
/// matched against the kernel's table).
fn connections(pid: u32, port: u16) -> usize {
    let suffix = format!(":{port:04X}");
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let inodes: HashSet<&str> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 9 && f[3] == "01" && f[2].ends_with(&suffix)).then(|| f[9])
        })
        .collect();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter(|l| {
                    l.to_string_lossy()
                        .strip_prefix("socket:[")
                        .and_then(|r| r.strip_suffix(']'))
                        .is_some_and(|i| inodes.contains(i))
                })
                .count()
        })
        .unwrap_or(0)
}

/// The daemon's peak RSS in KiB (VmHWM).
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn fan_out(a: &Args, client: &mut Client) -> anyhow::Result<FanOut> {
    let stop = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, most, pid, port) = (stop.clone(), most.clone(), a.daemon_pid, a.ssh_port);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                most.fetch_max(connections(pid, port), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let started = Instant::now();
    let submit = Request::Submit(Submit {
        command: "dot_iu_healthcheck".into(),
        mode: Mode::Verify,
        params: Params::default(),
        target: None,
        idempotency_key: None,
        plan_digest: None,
        wait: false,
        timeout_s: None,
        targets: Some("all".into()),
        strategy: Some(Strategy {
            canary: 0,
            max_concurrency: Limit::Count(a.concurrency),
            max_errors: Limit::Percent(100),
        }),
    });
    let Reply::Rollout(r) = client.call(&submit).await? else {
        anyhow::bail!("the daemon did not take the rollout");
    };
    let ask = Request::RolloutStatus(RolloutRef {
        rollout_id: r.rollout_id.clone(),
    });
    let done: Rollout = loop {
        match client.call(&ask).await? {
            Reply::Rollout(r) if r.is_over() => break *r,
            Reply::Rollout(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            other => anyhow::bail!("unexpected reply: {other:?}"),
        }
    };
    let total = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let bad: Vec<String> = done
        .targets
        .iter()
        .filter(|t| t.state != TargetState::Job(govsql::job::JobState::Verified))
        .map(|t| format!("{} {}", t.target, t.state))
        .collect();
    if !bad.is_empty() {
        anyhow::bail!("not every target verified: {}", bad.join(", "));
    }
    let mut ms: Vec<u64> = done.targets.iter().filter_map(|t| t.duration_ms).collect();
    ms.sort_unstable();
    Ok(FanOut {
        total,
        p50_ms: percentile(&ms, 0.5),
        p95_ms: percentile(&ms, 0.95),
        targets: done.targets.len(),
        most_open: most.load(Ordering::Relaxed),
    })
}

fn row(label: &str, what: &str, f: &FanOut) {
    println!(
        "| {label} | {what} | {} | {:.2} | {} | {} | {} |",
        f.targets,
        f.total.as_secs_f64(),
        f.p50_ms,
        f.p95_ms,
        f.most_open
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let mut client = Client::connect(&a.socket).await?;
    println!(
        "\n{} (max_ssh_connections = {}, --max-concurrency {})\n",
        a.label, a.cap, a.concurrency
    );
    println!("| run | fan-out | targets | total s | per-target p50 ms | p95 ms | most SSH connections open |");
    println!("|---|---|---|---|---|---|---|");
    let cold = fan_out(&a, &mut client).await?;
    row(&a.label, "cold", &cold);
    let mut warm = Vec::new();
    for _ in 0..a.rounds {
        let f = fan_out(&a, &mut client).await?;
        row(&a.label, "warm", &f);
        warm.push(f);
    }
    warm.sort_by_key(|f| f.total);
    let median = &warm[warm.len() / 2];
    row(&a.label, "warm (median)", median);
    let rss_mib = peak_rss_kib(a.daemon_pid) as f64 / 1024.0;
    let most = warm
        .iter()
        .map(|f| f.most_open)
        .chain([cold.most_open])
        .max()
        .unwrap_or(0);
    println!("\npeak RSS of the daemon: {rss_mib:.1} MiB; most SSH connections open at once: {most} (cap {})", a.cap);
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    if let Some(t) = a.warm_target_s {
        println!(
            "target: warm fan-out over {} targets <= {t} s: {:.2} s, {}",
            median.targets,
            median.total.as_secs_f64(),
            verdict(median.total.as_secs_f64() <= t)
        );
    }
    println!(
        "target: daemon RSS <= 64 MiB: {rss_mib:.1} MiB, {}",
        verdict(rss_mib <= 64.0)
    );
    println!(
        "target: connections <= max_ssh_connections: {most} <= {}, {}",
        a.cap,
        verdict(most <= a.cap)
    );
    Ok(())
}

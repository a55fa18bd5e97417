//! Metrics in the Prometheus text exposition format: what the daemon did
//! since it started (jobs by mode and final state, refusals and failures by
//! class, job durations per mode), what it holds now (queue depth by state,
//! unsettled jobs, warm sessions), and each target's transport (SSH session
//! up, connects, failures, channel-open failures, last success and last
//! error), plus start time and build info. Served by `govsql metrics`
//! (through the socket) and, when `metrics_listen` is set, on a loopback
//! HTTP port. No label ever carries a param value: labels are modes,
//! states, classes, target names and the build's version.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::job::{JobState, Mode, Outcome};
use crate::transport::TransportStats;

/// Upper bounds of the job-duration histogram, in seconds.
const BUCKETS: [f64; 13] = [
    0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0, 120.0,
];

/// One mode's duration histogram.
#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        for (i, le) in BUCKETS.iter().enumerate() {
            if secs <= *le {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += secs;
    }
}

/// The counters the daemon keeps.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    jobs: BTreeMap<(Mode, JobState), u64>,
    errors: BTreeMap<(Mode, String), u64>,
    durations: BTreeMap<Mode, Histogram>,
}

/// Everything else a scrape shows, gathered by the daemon.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Jobs in the queue by state.
    pub queue: BTreeMap<JobState, i64>,
    /// Seconds since the oldest unsettled apply was submitted.
    pub oldest_unsettled_s: Option<i64>,
    /// Per target: name, transport kind, its stats, last success, last
    /// error (time, class), reachable.
    pub targets: Vec<TargetSnapshot>,
    /// Unix time the daemon started.
    pub started_at: i64,
    /// Rollouts by state, their open targets by state, the oldest
    /// running one's submit time.
    pub rollouts: super::rollouts::RolloutCounts,
    /// SSH connections open now, and the cap.
    pub ssh_connections: (usize, usize),
}

/// One target at scrape time.
#[derive(Debug, Default)]
pub struct TargetSnapshot {
    /// The target's name.
    pub name: String,
    /// ssh or local.
    pub transport: String,
    /// Its transport's counters.
    pub stats: TransportStats,
    /// Whether its latest job reached the database.
    pub reachable: bool,
    /// When a job last reached the database.
    pub last_ok_at: Option<i64>,
    /// When a job last could not, and its class.
    pub last_error: Option<(i64, String)>,
}

impl Metrics {
    /// Counts a job that ended.
    pub fn job_ended(&self, mode: Mode, outcome: &Outcome, took: Duration) {
        let mut c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *c.jobs.entry((mode, outcome.state())).or_default() += 1;
        if let Some(class) = &outcome.error_class {
            *c.errors
                .entry((mode, class.as_str().to_string()))
                .or_default() += 1;
        }
        c.durations
            .entry(mode)
            .or_default()
            .observe(took.as_secs_f64());
    }

    /// The text exposition of the counters and the snapshot.
    pub fn render(&self, snap: &Snapshot) -> String {
        let c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::with_capacity(4096);
        family(
            &mut out,
            "govsql_build_info",
            "gauge",
            "The running build: version and git commit.",
        );
        let _ = writeln!(
            out,
            "govsql_build_info{{version=\"{}\",commit=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION"),
            env!("GOVSQL_COMMIT")
        );
        family(
            &mut out,
            "govsql_start_time_seconds",
            "gauge",
            "Unix time the daemon started.",
        );
        let _ = writeln!(out, "govsql_start_time_seconds {}", snap.started_at);

        family(
            &mut out,
            "govsql_jobs_total",
            "counter",
            "Jobs that ended since the daemon started, by mode and final state.",
        );
        for ((mode, state), n) in &c.jobs {
            let _ = writeln!(
                out,
                "govsql_jobs_total{{mode=\"{}\",state=\"{}\"}} {n}",
                mode.as_str(),
                state.as_str()
            );
        }
        family(
            &mut out,
            "govsql_job_errors_total",
            "counter",
            "Refused and failed jobs since the daemon started, by mode and error class.",
        );
        for ((mode, class), n) in &c.errors {
            let _ = writeln!(
                out,
                "govsql_job_errors_total{{mode=\"{}\",class=\"{}\"}} {n}",
                mode.as_str(),
                label(class)
            );
        }
        family(
            &mut out,
            "govsql_job_duration_seconds",
            "histogram",
            "How long jobs ran in the daemon (claim to end), by mode.",
        );
        for (mode, h) in &c.durations {
            let m = mode.as_str();
            for (i, le) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "govsql_job_duration_seconds_bucket{{mode=\"{m}\",le=\"{le}\"}} {}",
                    h.counts[i]
                );
            }
            let _ = writeln!(
                out,
                "govsql_job_duration_seconds_bucket{{mode=\"{m}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "govsql_job_duration_seconds_sum{{mode=\"{m}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "govsql_job_duration_seconds_count{{mode=\"{m}\"}} {}",
                h.count
            );
        }
        drop(c);

        family(
            &mut out,
            "govsql_queue_jobs",
            "gauge",
            "Jobs in the durable queue now, by state.",
        );
        for (state, n) in &snap.queue {
            let _ = writeln!(out, "govsql_queue_jobs{{state=\"{}\"}} {n}", state.as_str());
        }
        family(
            &mut out,
            "govsql_unsettled_jobs",
            "gauge",
            "Applies whose outcome is not known yet (settled by idempotency key).",
        );
        let _ = writeln!(
            out,
            "govsql_unsettled_jobs {}",
            snap.queue.get(&JobState::Unsettled).copied().unwrap_or(0)
        );
        family(
            &mut out,
            "govsql_unsettled_oldest_seconds",
            "gauge",
            "Age of the oldest unsettled apply (0: none). It waits for the ledger without bound.",
        );
        let _ = writeln!(
            out,
            "govsql_unsettled_oldest_seconds {}",
            snap.oldest_unsettled_s.unwrap_or(0)
        );

        family(
            &mut out,
            "govsql_rollouts",
            "gauge",
            "Rollouts in the queue now, by state.",
        );
        for state in crate::rollout::RolloutState::ALL {
            let n = snap.rollouts.by_state.get(&state).copied().unwrap_or(0);
            let _ = writeln!(out, "govsql_rollouts{{state=\"{}\"}} {n}", state.as_str());
        }
        family(
            &mut out,
            "govsql_rollout_targets",
            "gauge",
            "Targets of the rollouts not finished yet, by state (pending, skipped, or the child's job state).",
        );
        for (state, n) in &snap.rollouts.targets {
            let _ = writeln!(
                out,
                "govsql_rollout_targets{{state=\"{}\"}} {n}",
                label(state)
            );
        }
        family(
            &mut out,
            "govsql_rollout_oldest_running_seconds",
            "gauge",
            "Age of the oldest running rollout (0: none).",
        );
        let _ = writeln!(
            out,
            "govsql_rollout_oldest_running_seconds {}",
            snap.rollouts
                .oldest_running
                .map(|at| (crate::time::unix_now() - at).max(0))
                .unwrap_or(0)
        );

        family(
            &mut out,
            "govsql_ssh_connections_open",
            "gauge",
            "SSH connections open now, across all targets.",
        );
        let _ = writeln!(
            out,
            "govsql_ssh_connections_open {}",
            snap.ssh_connections.0
        );
        family(
            &mut out,
            "govsql_ssh_connections_max",
            "gauge",
            "The cap on open SSH connections ([daemon] max_ssh_connections).",
        );
        let _ = writeln!(out, "govsql_ssh_connections_max {}", snap.ssh_connections.1);

        let targets = &snap.targets;
        let per_target =
            |out: &mut String,
             name: &str,
             kind: &str,
             help: &str,
             value: &dyn Fn(&TargetSnapshot) -> Option<String>| {
                family(out, name, kind, help);
                for t in targets {
                    if let Some(v) = value(t) {
                        let _ = writeln!(
                            out,
                            "{name}{{target=\"{}\",transport=\"{}\"}} {v}",
                            label(&t.name),
                            t.transport
                        );
                    }
                }
            };
        per_target(
            &mut out,
            "govsql_target_reachable",
            "gauge",
            "1 when the target's latest job reached its database.",
            &|t| Some(u8::from(t.reachable).to_string()),
        );
        per_target(
            &mut out,
            "govsql_target_last_success_timestamp_seconds",
            "gauge",
            "Unix time a job last reached the target's database.",
            &|t| t.last_ok_at.map(|v| v.to_string()),
        );
        per_target(
            &mut out,
            "govsql_target_last_error_timestamp_seconds",
            "gauge",
            "Unix time a job last could not reach the target's database.",
            &|t| t.last_error.as_ref().map(|(at, _)| at.to_string()),
        );
        per_target(
            &mut out,
            "govsql_ssh_session_up",
            "gauge",
            "1 while the target's SSH session is established.",
            &|t| (t.transport == "ssh").then(|| u8::from(t.stats.session_up).to_string()),
        );
        per_target(
            &mut out,
            "govsql_ssh_connects_total",
            "counter",
            "SSH sessions established (a reconnect counts again).",
            &|t| (t.transport == "ssh").then(|| t.stats.connects.to_string()),
        );
        per_target(
            &mut out,
            "govsql_ssh_connect_failures_total",
            "counter",
            "SSH connection attempts that failed.",
            &|t| (t.transport == "ssh").then(|| t.stats.connect_failures.to_string()),
        );
        per_target(
            &mut out,
            "govsql_ssh_channel_open_failures_total",
            "counter",
            "SSH channel opens the server refused (retried with backoff).",
            &|t| (t.transport == "ssh").then(|| t.stats.channel_open_failures.to_string()),
        );
        per_target(
            &mut out,
            "govsql_psql_sessions_warm",
            "gauge",
            "Warm psql sessions idle in the target's pool (session mode).",
            &|t| Some(t.stats.warm_sessions.to_string()),
        );
        per_target(
            &mut out,
            "govsql_psql_started_total",
            "counter",
            "psql processes started on the target (sessions, or one per job).",
            &|t| Some(t.stats.psql_started.to_string()),
        );
        per_target(
            &mut out,
            "govsql_psql_sessions_paused",
            "gauge",
            "1 while session mode is paused on the target (resets kept failing; it is tried again with backoff).",
            &|t| Some(u8::from(t.stats.sessions_paused).to_string()),
        );
        per_target(
            &mut out,
            "govsql_remote_gate_format",
            "gauge",
            "The script format the target's remote-gate announced (absent: no gate seen).",
            &|t| t.stats.gate_format.map(|v| v.to_string()),
        );
        out
    }
}

/// A family's HELP and TYPE lines.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value: escaped as the exposition format asks.
fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Scrapes served at once; more connections are closed on accept.
pub const MAX_SCRAPES: usize = 16;

/// Serves `GET /metrics` on a loopback listener until shutdown. Anything
/// else gets 404; a request is read for at most 5 s and 8 KiB, at most
/// [`MAX_SCRAPES`] at once.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send>>
        + Send
        + Sync
        + 'static,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let render = std::sync::Arc::new(render);
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    loop {
        let (mut stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(cause = %e, "metrics listener accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        // Over the cap, a connection is closed at once: held connections
        // cannot take the daemon's file descriptors.
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut buf = vec![0u8; 8192];
            let mut n = 0;
            let head = tokio::time::timeout(Duration::from_secs(5), async {
                while n < buf.len() {
                    let r = stream.read(&mut buf[n..]).await?;
                    if r == 0 {
                        break;
                    }
                    n += r;
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(head, Ok(Ok(()))) {
                return;
            }
            let line = buf[..n].split(|&b| b == b'\n').next().unwrap_or_default();
            let ok = line.starts_with(b"GET /metrics ") || line.starts_with(b"GET /metrics?");
            let reply = if ok {
                let body = render().await;
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_string()
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                let _ = stream.write_all(reply.as_bytes()).await;
                let _ = stream.shutdown().await;
            })
            .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_counts_cumulatively() {
        let mut h = Histogram::default();
        h.observe(0.003);
        h.observe(0.2);
        assert_eq!(h.counts[0], 0);
        assert_eq!(h.counts[1], 1);
        assert_eq!(h.counts[6], 2);
        assert_eq!(h.count, 2);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}

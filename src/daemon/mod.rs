//! `govsql daemon`: the long-running agent. It takes jobs from local users
//! over a Unix socket, keeps them in a durable SQLite queue, runs them
//! through the governed runtime on their targets, and answers clients.
//!
//! Lifecycle: one daemon per state directory (lock file), crash recovery
//! at start (running jobs are re-run through the same path; the ledger
//! settles them), sd_notify READY and WATCHDOG, SIGHUP reloads the config
//! and the catalog (keeping the running ones when the new ones are invalid
//! or need a restart). Every task is tracked
//! (mini-redis' shape): SIGTERM cancels one token, the listener stops,
//! in-flight jobs drain (bounded), then the daemon exits 0.
//!
//! Rooms: this file holds the shared state ([`Daemon`]) and what it
//! answers from it (health, ledger reads, metrics text); `lifecycle` the
//! start, recovery, signals, heartbeat and reload; `target` a target's
//! slot and probe; `waiters` who waits for which job and delivery; `uid`
//! each uid's share; `server` the socket; `handle` one handler per
//! request; `queue` the SQLite queue; `worker` the per-target workers;
//! `rollouts` the rollouts' tables and their scheduler.

pub mod fscheck;
mod handle;
mod lifecycle;
pub mod metrics;
pub mod notify;
pub mod peer;
pub mod queue;
pub mod rollouts;
pub mod server;
mod target;
mod uid;
mod waiters;
pub mod worker;

pub use lifecycle::run;
pub use target::{TargetRecord, TargetSlot, PROBE_EVERY};
pub use uid::{PerUid, UidSlot};
use waiters::Waiting;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::catalog::Catalog;
use crate::config::Config;
use crate::protocol;
use crate::psql::DbRole;
use crate::runtime::Runtime;
use crate::switch::ApplySwitch;
use crate::time::unix_now;

/// A daemon that could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Another daemon holds the state directory.
    #[error(
        "another govsql daemon (pid {pid}) holds {path}; stop it first, or use another state_dir"
    )]
    Locked {
        /// The lock file.
        path: PathBuf,
        /// The pid written in it.
        pid: String,
    },
    /// A live daemon answers on the configured socket.
    #[error(
        "another govsql daemon answers on {0}; stop it first, or give this one another socket"
    )]
    SocketInUse(PathBuf),
    /// Some I/O on the state directory or socket failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The config or catalog is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The catalog is invalid.
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
    /// The queue could not be opened.
    #[error(transparent)]
    Queue(#[from] queue::QueueError),
    /// A target's executor could not be built.
    #[error("target {0}: {1}")]
    Target(String, crate::transport::TransportError),
    /// The state or socket directory is not the daemon's own.
    #[error(transparent)]
    NotPrivate(#[from] fscheck::NotPrivate),
    /// The metrics listener could not bind.
    #[error("cannot listen for metrics on {0}: {1} (metrics_listen in [daemon])")]
    Metrics(String, std::io::Error),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

/// The daemon's shared state.
pub struct Daemon {
    /// The config in force (replaced by a reload).
    config: RwLock<Arc<Config>>,
    /// Where it was read from (SIGHUP reads it again).
    config_path: PathBuf,
    queue: queue::Queue,
    catalog: RwLock<Arc<Catalog>>,
    targets: indexmap::IndexMap<String, TargetSlot>,
    waiting: Mutex<Waiting>,
    started: Instant,
    /// Unix time of the start, for metrics.
    started_at: i64,
    /// What jobs did since the start.
    pub metrics: metrics::Metrics,
    heartbeat_at: AtomicU64,
    /// Why the last reload was refused, shown after the counts in the
    /// heartbeat's STATUS= line until a good reload clears it.
    reload_refused: std::sync::Mutex<Option<String>>,
    /// Cancelled once, at SIGTERM; every task watches it.
    shutdown: CancellationToken,
    /// Cancelled once the jobs of the last run are back in the queue: no
    /// worker claims before (a job it claimed would be put back and run a
    /// second time beside itself).
    recovered: CancellationToken,
    /// Every connection and job task, so shutdown can wait for them.
    tasks: TaskTracker,
    /// Open connections per uid.
    connections: Arc<PerUid>,
    /// `govsql log` reads running per uid.
    reads: Arc<PerUid>,
    /// Users and groups of recent peers.
    pub peers: peer::PeerCache,
    /// Wakes the rollout scheduler (a child ended, a rollout changed).
    rollouts: Notify,
    /// The cap on open SSH connections across the targets.
    ssh_cap: Arc<crate::transport::cap::ConnectionCap>,
}

impl Daemon {
    /// The runtime of a target.
    pub fn runtime(&self, target: &str) -> Option<Arc<Runtime>> {
        self.targets.get(target).map(TargetSlot::runtime)
    }

    /// The catalog in use.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The config.
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The queue.
    pub fn queue(&self) -> &queue::Queue {
        &self.queue
    }

    /// Waits until the jobs of the last run are back in the queue (false:
    /// the daemon is shutting down first).
    pub async fn recovered(&self) -> bool {
        tokio::select! {
            _ = self.recovered.cancelled() => true,
            _ = self.shutdown.cancelled() => false,
        }
    }

    /// The target answers again after jobs that could not reach it: its
    /// waiting jobs go at once, oldest first (not after their backoff).
    pub async fn target_back(&self, target: &str) {
        match self.queue.wake_waiting(target).await {
            Ok(n) => {
                tracing::info!(target = %target, waiting = n, "target answers again; its waiting jobs go now")
            }
            Err(e) => {
                tracing::error!(target = %target, cause = %e, "cannot wake the target's waiting jobs")
            }
        }
        self.wake(target);
    }

    /// The names of the targets this daemon serves.
    pub fn target_names(&self) -> std::collections::HashSet<String> {
        self.targets.keys().cloned().collect()
    }

    /// Wakes the rollout scheduler: a child ended, or a rollout was
    /// submitted, resumed or cancelled.
    pub fn rollouts_changed(&self) {
        self.rollouts.notify_one();
    }

    /// Wakes the worker of a target.
    pub fn wake(&self, target: &str) {
        if let Some(t) = self.targets.get(target) {
            t.wake.notify_one();
        }
    }

    /// A connection slot for `uid`, unless it has too many open.
    pub fn connection_slot(&self, uid: u32) -> Option<UidSlot> {
        self.connections.take(uid)
    }

    /// A `govsql log` read of a uid (at most [`server::MAX_READS_PER_UID`]
    /// at once), or None.
    pub fn read_slot(&self, uid: u32) -> Option<UidSlot> {
        self.reads.take(uid)
    }

    /// Whether shutdown began.
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// The token every task watches for shutdown.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// The tracker every connection and job task is spawned on.
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// Whether every target's worker loop went round in the last 10 s
    /// (each loop wakes at least once a second).
    fn workers_alive(&self, now: u64) -> bool {
        self.targets
            .values()
            .all(|t| now.saturating_sub(t.alive_at.load(Ordering::SeqCst)) < 10)
    }

    /// The health op's answer; a queue that cannot be read is an error,
    /// never "zero jobs".
    pub async fn health(&self) -> Result<protocol::Health, queue::QueueError> {
        let now = unix_now() as u64;
        let config = self.config();
        let alive = self.workers_alive(now);
        let counts = self.queue.counts().await?;
        let rollouts = self
            .queue
            .custom(queue::Access::Read, rollouts::counts)
            .await?;
        let switch = ApplySwitch::new(&config.daemon.state_dir);
        let apply_switch = tokio::task::spawn_blocking(move || switch.is_on())
            .await
            .unwrap_or(false);
        Ok(protocol::Health {
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs(),
            jobs: counts.by_state,
            workers_alive: alive,
            last_heartbeat_s: now.saturating_sub(self.heartbeat_at.load(Ordering::SeqCst)),
            apply_switch,
            catalog_digest: self.catalog().digest().to_string(),
            targets: self
                .targets
                .iter()
                .map(|(n, t)| format!("{n} ({})", t.executor.kind()))
                .collect(),
            target_health: self
                .targets
                .iter()
                .map(|(n, t)| {
                    let r = t.record.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    protocol::TargetHealth {
                        name: n.clone(),
                        tags: config
                            .targets
                            .get(n)
                            .map(|c| c.tags.clone())
                            .unwrap_or_default(),
                        transport: t.executor.kind().to_string(),
                        reachable: r.reachable(),
                        last_ok_at: r.last_ok_at,
                        last_error_at: r.last_error.as_ref().map(|(at, _)| *at),
                        last_error_class: r.last_error.map(|(_, c)| c),
                        gate_format: t.executor.stats().gate_format,
                        sessions_paused: t.executor.stats().sessions_paused,
                    }
                })
                .collect(),
            oldest_unsettled_s: counts
                .oldest_unsettled
                .map(|at| (now as i64 - at).max(0) as u64),
            rollouts: rollouts.by_state,
            rollout_targets: rollouts.targets,
            oldest_running_rollout_s: rollouts
                .oldest_running
                .map(|at| (now as i64 - at).max(0) as u64),
        })
    }

    /// The ledger rows of a target through its transport (`govsql log`).
    pub async fn ledger(
        &self,
        target: &str,
        filter: &protocol::LogFilter,
        limit: u32,
    ) -> Result<Vec<protocol::LogEntry>, String> {
        let slot = self
            .targets
            .get(target)
            .ok_or_else(|| format!("no target {target}"))?;
        let timeout = self
            .config()
            .target(Some(target))
            .map(|(_, t)| t.job_timeout())
            .unwrap_or(Duration::from_secs(60));
        crate::runtime::read_ledger(slot.executor.as_ref(), filter, limit, timeout).await
    }

    /// The metrics scrape: counters since the start, the queue by state,
    /// each target's transport. A queue that cannot be read leaves its
    /// gauges out (the scrape still answers).
    pub async fn metrics_text(&self) -> String {
        let queue = match self.queue.counts().await {
            Ok(q) => q,
            Err(e) => {
                tracing::warn!(cause = %e, "metrics: cannot read the queue");
                queue::QueueCounts::default()
            }
        };
        let targets = self
            .targets
            .iter()
            .map(|(n, t)| {
                let r = t.record.lock().unwrap_or_else(|p| p.into_inner()).clone();
                metrics::TargetSnapshot {
                    name: n.clone(),
                    transport: t.executor.kind().to_string(),
                    stats: t.executor.stats(),
                    reachable: r.reachable(),
                    last_ok_at: r.last_ok_at,
                    last_error: r.last_error,
                }
            })
            .collect();
        let rollouts = self
            .queue
            .custom(queue::Access::Read, rollouts::counts)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(cause = %e, "metrics: cannot read the rollouts");
                rollouts::RolloutCounts::default()
            });
        self.metrics.render(&metrics::Snapshot {
            oldest_unsettled_s: queue.oldest_unsettled.map(|at| (unix_now() - at).max(0)),
            queue: queue.by_state,
            targets,
            started_at: self.started_at,
            rollouts,
            ssh_connections: (self.ssh_cap.open(), self.ssh_cap.limit()),
        })
    }
}

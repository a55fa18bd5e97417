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

pub mod fscheck;
pub mod metrics;
pub mod notify;
pub mod peer;
pub mod queue;
pub mod server;
pub mod worker;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use std::os::unix::fs::OpenOptionsExt;

use nix::fcntl::{Flock, FlockArg};
use tokio::sync::{oneshot, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::catalog::Catalog;
use crate::config::Config;
use crate::job::{JobId, Outcome};
use crate::protocol;
use crate::psql::DbRole;
use crate::runtime::Runtime;
use crate::switch::ApplySwitch;
use crate::time::unix_now;
use crate::transport::Executor;

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

/// One target: its executor (kept across catalog reloads), its runtime,
/// its concurrency and its wake-up signal.
pub struct TargetSlot {
    executor: Arc<dyn Executor>,
    runtime: RwLock<Arc<Runtime>>,
    permits: Arc<Semaphore>,
    wake: Notify,
    alive_at: AtomicU64,
    /// How its recent jobs went, for health.
    record: Mutex<TargetRecord>,
    /// The probe of a target that is down: one job at a time (the
    /// permit's holder), at most every [`PROBE_EVERY`] (when the last
    /// began).
    probe: Arc<Semaphore>,
    probe_began: Mutex<Option<Instant>>,
}

/// How often a target that is down is tried (with its oldest waiting job)
/// while its jobs sleep out their backoff.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// When a target's jobs last reached the database, and last did not.
#[derive(Debug, Default, Clone)]
pub struct TargetRecord {
    last_ok_at: Option<i64>,
    last_error: Option<(i64, String)>,
    /// Its last job that reached neither SSH nor the database came after
    /// its last job that did: its waiting jobs sleep, and a probe runs.
    down: bool,
}

impl TargetRecord {
    fn reachable(&self) -> bool {
        match (&self.last_error, self.last_ok_at) {
            (None, _) => true,
            (Some((err_at, _)), Some(ok_at)) => ok_at >= *err_at,
            (Some(_), None) => false,
        }
    }
}

impl TargetSlot {
    /// Notes how a job on this target went. True when the target is back:
    /// this job reached the database after jobs that could not.
    pub fn note(&self, outcome: &Outcome) -> bool {
        use crate::job::ErrorClass as C;
        let now = unix_now();
        let mut r = self.record.lock().unwrap_or_else(|p| p.into_inner());
        if outcome.pending == Some(crate::job::Pending::NothingRan) {
            r.down = true;
        }
        match &outcome.error_class {
            Some(
                c
                @ (C::TargetUnreachable | C::DbUnavailable | C::HostKey | C::SshAuth | C::Timeout),
            ) if outcome.run_id.is_none() => {
                r.last_error = Some((now, c.as_str().to_string()));
                false
            }
            _ => {
                r.last_ok_at = Some(now);
                std::mem::replace(&mut r.down, false)
            }
        }
    }

    /// A probe of this target when one is due: it is down, no probe is
    /// running, and the last began [`PROBE_EVERY`] ago. The probe lasts
    /// as long as the permit.
    fn begin_probe(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if !self.record.lock().unwrap_or_else(|p| p.into_inner()).down {
            return None;
        }
        let mut began = self.probe_began.lock().unwrap_or_else(|p| p.into_inner());
        if began.is_some_and(|at| at.elapsed() < PROBE_EVERY) {
            return None;
        }
        let permit = self.probe.clone().try_acquire_owned().ok()?;
        *began = Some(Instant::now());
        Some(permit)
    }

    fn runtime(&self) -> Arc<Runtime> {
        self.runtime
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Who waits for which job, and the outcomes handed out: kept until the
/// queue has the job's end (a wait that arrives in between gets its
/// outcome here, not a `running` row that will never wake it), then for
/// [`RESULT_GRACE`] more, so that a client that submits and then waits, or
/// re-attaches at once, still gets the result (which the queue never
/// stores). Bounded by [`RESULT_BUDGET`] bytes of results.
#[derive(Default)]
struct Waiting {
    waiters: HashMap<JobId, Vec<oneshot::Sender<Outcome>>>,
    delivered: HashMap<JobId, Outcome>,
    /// Recorded outcomes, oldest first, with when they were recorded.
    expiry: std::collections::VecDeque<(Instant, JobId)>,
    /// Bytes of result rows held in `delivered`.
    bytes: usize,
}

/// How long a recorded job's outcome (result included) stays in memory.
const RESULT_GRACE: Duration = Duration::from_secs(60);
/// The most result bytes held for late waiters.
const RESULT_BUDGET: usize = 64 << 20;

fn result_bytes(o: &Outcome) -> usize {
    o.result
        .iter()
        .flatten()
        .flatten()
        .map(|f| f.as_ref().map_or(0, String::len))
        .sum()
}

impl Waiting {
    /// Drops recorded outcomes past their grace, or over the budget.
    fn expire(&mut self) {
        while let Some((at, id)) = self.expiry.front() {
            if at.elapsed() < RESULT_GRACE && self.bytes <= RESULT_BUDGET {
                break;
            }
            if let Some(o) = self.delivered.remove(id) {
                self.bytes -= result_bytes(&o);
            }
            self.expiry.pop_front();
        }
    }
}

/// The daemon's shared state.
pub struct Daemon {
    /// The config in force (replaced by a reload).
    config: RwLock<Arc<Config>>,
    /// Where it was read from (SIGHUP reads it again).
    config_path: PathBuf,
    queue: queue::Queue,
    catalog: RwLock<Arc<Catalog>>,
    targets: BTreeMap<String, TargetSlot>,
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
}

/// A count per uid with a limit: each uid's share of something.
pub struct PerUid {
    counts: Mutex<HashMap<u32, usize>>,
    limit: usize,
}

impl PerUid {
    /// A share of `limit` per uid.
    pub fn new(limit: usize) -> Arc<PerUid> {
        Arc::new(PerUid {
            counts: Mutex::new(HashMap::new()),
            limit,
        })
    }

    /// One more for `uid`, or None when it holds its share already.
    pub fn take(self: &Arc<Self>, uid: u32) -> Option<UidSlot> {
        let mut map = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(uid).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(UidSlot {
            of: self.clone(),
            uid,
        })
    }
}

/// One unit of a uid's share; given back when dropped.
pub struct UidSlot {
    of: Arc<PerUid>,
    uid: u32,
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut map = self.of.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.uid);
            }
        }
    }
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

    /// Wakes the worker of a target.
    pub fn wake(&self, target: &str) {
        if let Some(t) = self.targets.get(target) {
            t.wake.notify_one();
        }
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a waiter for a job's outcome. A job whose outcome was
    /// already handed out (its queue row not yet written) answers at once.
    pub fn add_waiter(&self, job_id: &JobId) -> oneshot::Receiver<Outcome> {
        let (tx, rx) = oneshot::channel();
        let mut w = self.waiting();
        match w.delivered.get(job_id) {
            Some(outcome) => {
                let _ = tx.send(outcome.clone());
            }
            None => {
                let list = w.waiters.entry(job_id.clone()).or_default();
                // Waits that ended (their receiver is gone) leave no trace.
                list.retain(|t| !t.is_closed());
                list.push(tx);
            }
        }
        rx
    }

    /// Drops the waiters of a job whose wait ended (their receiver is
    /// gone); every other request's wait on the same job stays.
    pub fn prune_waiters(&self, job_id: &JobId) {
        let mut w = self.waiting();
        if let Some(list) = w.waiters.get_mut(job_id) {
            list.retain(|t| !t.is_closed());
            if list.is_empty() {
                w.waiters.remove(job_id);
            }
        }
    }

    /// Hands a finished job's outcome (result included) to its waiters,
    /// and keeps it for later waiters (see [`Waiting`]).
    pub fn deliver(&self, outcome: &Outcome) {
        let waiters = {
            let mut w = self.waiting();
            w.bytes += result_bytes(outcome);
            if let Some(old) = w.delivered.insert(outcome.job_id.clone(), outcome.clone()) {
                w.bytes -= result_bytes(&old);
            }
            w.expire();
            w.waiters.remove(&outcome.job_id)
        };
        for w in waiters.into_iter().flatten() {
            let _ = w.send(outcome.clone());
        }
    }

    /// The job's end is in the queue: its outcome stays for late waiters
    /// for [`RESULT_GRACE`] only.
    pub fn recorded(&self, job_id: &JobId) {
        let mut w = self.waiting();
        w.expiry.push_back((Instant::now(), job_id.clone()));
        w.expire();
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
        let alive = self.workers_alive(now);
        let counts = self.queue.counts().await?;
        let switch = ApplySwitch::new(&self.config().daemon.state_dir);
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
        })
    }

    /// The ledger rows of a target through its transport (`govsql log`):
    /// one script calling `fn_dot_iu_ledger`.
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
        let mut f = serde_json::to_value(filter).map_err(|e| e.to_string())?;
        if let Some(since) = filter.since {
            f["since"] = serde_json::json!(crate::time::utc_text(since).replace('Z', "+00"));
        }
        let timeout = self
            .config()
            .target(Some(target))
            .map(|(_, t)| t.job_timeout())
            .unwrap_or(Duration::from_secs(60));
        let mut s = crate::psql::Script::new("govsql:log", timeout.as_millis() as u64 + 2000);
        s.section();
        s.sql(&crate::grammar::entry_call(
            crate::grammar::Entry::Ledger,
            &[
                crate::grammar::Arg::Json(&f),
                crate::grammar::Arg::Int(i64::from(limit)),
            ],
        ));
        let script = s.finish();
        match crate::transport::run_read_script(
            slot.executor.as_ref(),
            &script,
            "govsql:log",
            timeout,
        )
        .await
        {
            crate::psql::PsqlResult::Complete(secs) => {
                let rows = crate::psql::copy_rows(0, secs.get(0).unwrap_or_default())
                    .map_err(|e| e.to_string())?;
                rows.into_iter()
                    .filter(|r| r.first().and_then(|k| k.as_deref()) == Some("entry"))
                    .map(|r| {
                        let v = r.get(1).and_then(|v| v.as_deref()).unwrap_or("{}");
                        serde_json::from_str(v).map_err(|e| format!("unexpected ledger row: {e}"))
                    })
                    .collect()
            }
            crate::psql::PsqlResult::SqlError { state, .. } if state == "42883" => {
                Err("the database has no fn_dot_iu_ledger yet: run `govsql migrate`".into())
            }
            other => Err(other.to_string()),
        }
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
        self.metrics.render(&metrics::Snapshot {
            oldest_unsettled_s: queue.oldest_unsettled.map(|at| (unix_now() - at).max(0)),
            queue: queue.by_state,
            targets,
            started_at: self.started_at,
        })
    }

    /// SIGHUP (`systemctl reload`): reads the config again, then the
    /// catalog. A config that does not load, or that changes what only a
    /// restart can change, is refused and the running one kept; the refusal
    /// is logged as an error and shown in `systemctl status`.
    async fn reload(&self) {
        notify::notify("RELOADING=1");
        let path = self.config_path.clone();
        let loaded = tokio::task::spawn_blocking(move || Config::load(&path)).await;
        let refused = match loaded {
            Ok(Ok(new)) => {
                let keys = self.config().restart_needed(&new);
                if keys.is_empty() {
                    *self.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
                    tracing::info!(path = %self.config_path.display(), "config reloaded");
                    None
                } else {
                    Some(format!(
                        "{} changed, which needs a restart (systemctl restart govsql)",
                        keys.join(", ")
                    ))
                }
            }
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(e.to_string()),
        };
        if let Some(why) = &refused {
            tracing::error!(cause = %why, "config reload refused; the running config is kept");
        }
        let catalog_refused = self.reload_catalog().await;
        // The refusal stays in `systemctl status` until a good reload
        // replaces it.
        let note = match (refused, catalog_refused) {
            (Some(why), _) => Some(format!("config reload refused: {why}")),
            (None, Some(why)) => Some(format!("catalog reload refused: {why}")),
            (None, None) => None,
        };
        let status = note
            .clone()
            .unwrap_or_else(|| "config and catalog reloaded".into());
        *self
            .reload_refused
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = note;
        notify::notify(&format!("STATUS={status}\nREADY=1"));
    }

    /// Reads the catalog again; the reason it was refused, if it was.
    async fn reload_catalog(&self) -> Option<String> {
        let config = self.config();
        let path = config.daemon.catalog.clone();
        let loaded = tokio::task::spawn_blocking(move || Catalog::load(&path)).await;
        let loaded = match loaded {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(cause = %e, "catalog reload failed");
                return Some(e.to_string());
            }
        };
        match loaded {
            Ok(new) => {
                let new = Arc::new(new);
                for (name, t) in &self.targets {
                    let (_, cfg) = match config.target(Some(name)) {
                        Ok(x) => x,
                        Err(_) => continue,
                    };
                    let rt = Runtime::for_target(
                        new.clone(),
                        t.executor.clone(),
                        name,
                        cfg,
                        &config.daemon,
                    );
                    *t.runtime.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(rt);
                }
                tracing::info!(
                    digest = new.digest(),
                    commands = new.commands().len(),
                    "catalog reloaded"
                );
                *self.catalog.write().unwrap_or_else(|p| p.into_inner()) = new;
                None
            }
            Err(e) => {
                tracing::error!(cause = %e, "catalog reload refused; keeping the catalog in use");
                Some(e.to_string())
            }
        }
    }
}

/// Takes the state directory's lock, or says who holds it.
fn lock_state_dir(state_dir: &Path) -> Result<Flock<File>, DaemonError> {
    let io = |what, source| DaemonError::Io {
        what,
        path: state_dir.to_path_buf(),
        source,
    };
    if !state_dir.exists() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|e| io("cannot create state_dir", e))?;
    }
    let path = state_dir.join("govsql.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| io("cannot open lock file in", e))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(mut lock) => {
            lock.set_len(0)
                .map_err(|e| io("cannot write lock file in", e))?;
            lock.rewind()
                .map_err(|e| io("cannot write lock file in", e))?;
            writeln!(lock, "{}", std::process::id())
                .map_err(|e| io("cannot write lock file in", e))?;
            Ok(lock)
        }
        Err((mut file, _)) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            Err(DaemonError::Locked {
                path,
                pid: pid.trim().to_string(),
            })
        }
    }
}

/// Runs the daemon until SIGTERM (or SIGINT). Returns once drained.
pub async fn run(config: Config, config_path: PathBuf) -> Result<(), DaemonError> {
    // Installed first: a daemon that could not be stopped cleanly must not
    // start at all.
    let signals = Signals::install().map_err(DaemonError::Signals)?;
    fscheck::check_private(&config.daemon.state_dir)?;
    if let Some(dir) = config.daemon.socket.parent() {
        fscheck::check_private(dir)?;
    }
    let _lock = lock_state_dir(&config.daemon.state_dir)?;
    let catalog = Arc::new(Catalog::load(&config.daemon.catalog)?);
    let queue = queue::Queue::open(&config.daemon.state_dir.join("queue.db"))?;
    // On a full disk the daemon still starts and serves status; the jobs
    // that were running are put back as soon as the queue can write, and
    // the workers claim only after that.
    let recovered = CancellationToken::new();
    tokio::spawn(recover(queue.clone(), recovered.clone()));
    let mut targets = BTreeMap::new();
    for (name, t) in &config.targets {
        let executor = crate::transport::for_target(t, DbRole::Runtime)
            .map_err(|e| DaemonError::Target(name.clone(), e))?;
        let runtime =
            Runtime::for_target(catalog.clone(), executor.clone(), name, t, &config.daemon);
        targets.insert(
            name.clone(),
            TargetSlot {
                executor,
                runtime: RwLock::new(Arc::new(runtime)),
                permits: Arc::new(Semaphore::new(t.max_channels)),
                wake: Notify::new(),
                alive_at: AtomicU64::new(unix_now() as u64),
                record: Mutex::new(TargetRecord::default()),
                probe: Arc::new(Semaphore::new(1)),
                probe_began: Mutex::new(None),
            },
        );
    }
    let (listener, bound) = server::bind(&config.daemon)?;
    let metrics_listener = match &config.daemon.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr.as_str())
                .await
                .map_err(|e| DaemonError::Metrics(addr.clone(), e))?,
        ),
        None => None,
    };
    let daemon = Arc::new(Daemon {
        config: RwLock::new(Arc::new(config)),
        config_path,
        queue,
        catalog: RwLock::new(catalog),
        targets,
        waiting: Mutex::new(Waiting::default()),
        started: Instant::now(),
        started_at: unix_now(),
        metrics: metrics::Metrics::default(),
        heartbeat_at: AtomicU64::new(unix_now() as u64),
        reload_refused: std::sync::Mutex::new(None),
        shutdown: CancellationToken::new(),
        recovered,
        tasks: TaskTracker::new(),
        connections: PerUid::new(server::MAX_CONNECTIONS_PER_UID),
        reads: PerUid::new(server::MAX_READS_PER_UID),
        peers: peer::PeerCache::default(),
    });
    // The loops run until shutdown; they are not drained, only stopped.
    let mut loops = tokio::task::JoinSet::new();
    for name in daemon.targets.keys() {
        loops.spawn(worker::run_target(daemon.clone(), name.clone()));
    }
    loops.spawn(worker::sweep_approvals(daemon.clone()));
    loops.spawn(heartbeat(daemon.clone()));
    loops.spawn(server::serve(listener, daemon.clone()));
    if let Some(listener) = metrics_listener {
        let d = daemon.clone();
        let render = move || {
            let d = d.clone();
            Box::pin(async move { d.metrics_text().await })
                as std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send>>
        };
        loops.spawn(metrics::serve(listener, render, daemon.shutdown.clone()));
    }
    notify::notify("READY=1");
    tracing::info!(
        socket = %daemon.config().daemon.socket.display(),
        targets = daemon.targets.len(),
        catalog = daemon.catalog().digest(),
        "govsql daemon ready"
    );
    signals.wait(&daemon).await;

    // Shutdown: one token reaches every task; the listener stops, running
    // jobs drain (bounded), connections get their last replies.
    notify::notify("STOPPING=1");
    daemon.shutdown.cancel();
    bound.remove_if_ours();
    daemon.tasks.close();
    if tokio::time::timeout(DRAIN_LIMIT, daemon.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            running = daemon.tasks.len(),
            "tasks still running after the drain limit; exiting (their jobs are settled at the next start)"
        );
    }
    loops.shutdown().await;
    for t in daemon.targets.values() {
        t.executor.close().await;
    }
    tracing::info!("govsql daemon stopped");
    Ok(())
}

/// Puts the jobs that were running at the last stop back in the queue, to
/// be settled through the same path; retried until the queue can write.
/// `done` is cancelled once they are back (the workers wait for it).
async fn recover(queue: queue::Queue, done: CancellationToken) {
    let _done = done.drop_guard();
    if let Some(ms) = std::env::var("GOVSQL_TEST_RECOVER_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        // A test widens the window between the start and the recovery.
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let mut wait = Duration::from_millis(500);
    loop {
        match queue.recover().await {
            Ok(0) => return,
            Ok(n) => {
                tracing::warn!(
                    jobs = n,
                    "jobs were running at the last stop; re-running them through the ledger to settle them"
                );
                return;
            }
            Err(e) => {
                tracing::error!(cause = %e, "cannot put the jobs of the last run back in the queue; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// How long SIGTERM waits for in-flight jobs.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);

/// The signals the daemon acts on, installed before anything starts.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        if std::env::var_os("GOVSQL_TEST_FAIL_SIGNALS").is_some() {
            return Err(std::io::Error::other(
                "refused by GOVSQL_TEST_FAIL_SIGNALS (a test of this very path)",
            ));
        }
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Waits for SIGTERM or SIGINT; reloads the catalog on SIGHUP.
    async fn wait(mut self, daemon: &Daemon) {
        loop {
            tokio::select! {
                _ = self.term.recv() => { tracing::info!("SIGTERM: draining"); return; }
                _ = self.int.recv() => { tracing::info!("SIGINT: draining"); return; }
                _ = self.hup.recv() => daemon.reload().await,
            }
        }
    }
}

/// Sends WATCHDOG=1 while every worker loop is alive.
async fn heartbeat(daemon: Arc<Daemon>) {
    let every = notify::watchdog_interval().unwrap_or(Duration::from_secs(5));
    let mut last_status = String::new();
    loop {
        let now = unix_now() as u64;
        if daemon.workers_alive(now) {
            notify::notify("WATCHDOG=1");
            daemon.heartbeat_at.store(now, Ordering::SeqCst);
            if let Ok(h) = daemon.health().await {
                let count = |s: crate::job::JobState| h.jobs.get(&s).copied().unwrap_or(0);
                let down = h.target_health.iter().filter(|t| !t.reachable).count();
                let status = format!(
                    "STATUS=queued {}, running {}, unsettled {}, awaiting approval {}; targets up {}, down {}",
                    count(crate::job::JobState::Queued),
                    count(crate::job::JobState::Running),
                    count(crate::job::JobState::Unsettled),
                    count(crate::job::JobState::AwaitingApproval),
                    h.target_health.len() - down,
                    down
                );
                let status = match &*daemon
                    .reload_refused
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                {
                    Some(why) => format!("{status}; {why}"),
                    None => status,
                };
                // Only when it changes: the notify socket is not a log.
                if status != last_status {
                    notify::notify(&status);
                    last_status = status;
                }
            }
        } else {
            tracing::error!("a worker stopped answering; withholding the watchdog heartbeat");
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = daemon.shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::PerUid;

    #[test]
    fn each_uid_has_its_own_share_given_back_on_drop() {
        let reads = PerUid::new(2);
        let a1 = reads.take(1000).unwrap();
        let _a2 = reads.take(1000).unwrap();
        assert!(reads.take(1000).is_none(), "over its share");
        let _b = reads.take(1001).expect("another uid is not affected");
        drop(a1);
        assert!(reads.take(1000).is_some(), "given back");
    }
}

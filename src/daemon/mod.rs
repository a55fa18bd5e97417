//! `govsql daemon`: the long-running agent. It takes jobs from local users
//! over a Unix socket, keeps them in a durable SQLite queue, runs them
//! through the governed runtime on their targets, and answers clients.
//!
//! Lifecycle: one daemon per state directory (lock file), crash recovery
//! at start (running jobs are re-run through the same path; the ledger
//! settles them), sd_notify READY and WATCHDOG, SIGHUP reloads the catalog
//! (keeping the old one if the new one is invalid), SIGTERM stops
//! accepting, lets running jobs finish (bounded) and exits 0.

pub mod notify;
pub mod peer;
pub mod protocol;
pub mod queue;
pub mod server;
pub mod worker;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use tokio::sync::{oneshot, watch, Notify, Semaphore};

use crate::catalog::Catalog;
use crate::config::Config;
use crate::runtime::{Outcome, Runtime};
use crate::switch::ApplySwitch;
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
    Target(String, String),
}

/// What a waiter receives when its job ends.
pub struct Finished {
    /// The job's terminal state (a run status, or cancelled).
    pub state: String,
    /// The outcome, result included.
    pub outcome: Outcome,
}

/// One target: its executor (kept across catalog reloads), its runtime,
/// its concurrency and its wake-up signal.
pub struct TargetSlot {
    executor: Arc<dyn Executor>,
    runtime: RwLock<Arc<Runtime>>,
    permits: Arc<Semaphore>,
    max: usize,
    wake: Notify,
    alive_at: AtomicU64,
}

/// The daemon's shared state.
pub struct Daemon {
    config: Config,
    queue: queue::Queue,
    catalog: RwLock<Arc<Catalog>>,
    targets: BTreeMap<String, TargetSlot>,
    waiters: Mutex<HashMap<String, Vec<oneshot::Sender<Finished>>>>,
    started: Instant,
    heartbeat_at: AtomicU64,
    shutting_down: AtomicBool,
    shutdown_tx: watch::Sender<bool>,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Daemon {
    /// The runtime of a target.
    pub fn runtime(&self, target: &str) -> Option<Arc<Runtime>> {
        self.targets
            .get(target)
            .map(|t| t.runtime.read().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// The catalog in use.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The config.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The queue.
    pub fn queue(&self) -> &queue::Queue {
        &self.queue
    }

    /// Wakes the worker of a target.
    pub fn wake(&self, target: &str) {
        if let Some(t) = self.targets.get(target) {
            t.wake.notify_one();
        }
    }

    /// Registers a waiter for a job's outcome.
    pub fn add_waiter(&self, job_id: &str) -> oneshot::Receiver<Finished> {
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(job_id.to_string())
            .or_default()
            .push(tx);
        rx
    }

    /// Drops the waiters of a job (a wait that ended another way).
    pub fn forget_waiters(&self, job_id: &str) {
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(job_id);
    }

    /// Hands a finished job's terminal state and outcome (result included)
    /// to its waiters.
    pub fn deliver(&self, state: &str, outcome: &Outcome) {
        let waiters = self
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&outcome.job_id);
        for w in waiters.into_iter().flatten() {
            let _ = w.send(Finished {
                state: state.to_string(),
                outcome: outcome.clone(),
            });
        }
    }

    /// Whether shutdown began.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// A receiver that turns true at shutdown.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown_tx.subscribe()
    }

    /// Whether every target's worker loop went round in the last 10 s
    /// (each loop wakes at least once a second).
    fn workers_alive(&self, now: u64) -> bool {
        self.targets
            .values()
            .all(|t| now.saturating_sub(t.alive_at.load(Ordering::SeqCst)) < 10)
    }

    /// The health op's answer.
    pub async fn health(&self) -> protocol::Health {
        let now = unix_now();
        let alive = self.workers_alive(now);
        protocol::Health {
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs(),
            jobs: self.queue.counts().await.unwrap_or_default(),
            workers_alive: alive,
            last_heartbeat_s: now.saturating_sub(self.heartbeat_at.load(Ordering::SeqCst)),
            apply_switch: ApplySwitch::new(&self.config.daemon.state_dir).is_on(),
            catalog_digest: self.catalog().digest().to_string(),
            targets: self
                .targets
                .iter()
                .map(|(n, t)| format!("{n} ({})", t.executor.kind()))
                .collect(),
        }
    }

    fn reload_catalog(&self) {
        match Catalog::load(&self.config.daemon.catalog) {
            Ok(new) => {
                let new = Arc::new(new);
                for (name, t) in &self.targets {
                    let (_, cfg) = match self.config.target(Some(name)) {
                        Ok(x) => x,
                        Err(_) => continue,
                    };
                    let rt = Runtime::new(
                        new.clone(),
                        t.executor.clone(),
                        name,
                        ApplySwitch::new(&self.config.daemon.state_dir),
                        cfg.job_timeout(),
                    );
                    *t.runtime.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(rt);
                }
                tracing::info!(
                    digest = new.digest(),
                    commands = new.commands().len(),
                    "catalog reloaded"
                );
                *self.catalog.write().unwrap_or_else(|p| p.into_inner()) = new;
            }
            Err(e) => {
                tracing::error!(cause = %e, "catalog reload refused; keeping the catalog in use")
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
pub async fn run(config: Config) -> Result<(), DaemonError> {
    let _lock = lock_state_dir(&config.daemon.state_dir)?;
    let catalog = Arc::new(Catalog::load(&config.daemon.catalog)?);
    let queue = queue::Queue::open(&config.daemon.state_dir.join("queue.db"))?;
    let recovered = queue.recover().await?;
    if recovered > 0 {
        tracing::warn!(
            jobs = recovered,
            "jobs were running at the last stop; re-running them through the ledger to settle them"
        );
    }
    let mut targets = BTreeMap::new();
    for (name, t) in &config.targets {
        let executor = crate::cli::executor_for(t, false)
            .map_err(|e| DaemonError::Target(name.clone(), e.to_string()))?;
        let runtime = Runtime::new(
            catalog.clone(),
            executor.clone(),
            name,
            ApplySwitch::new(&config.daemon.state_dir),
            t.job_timeout(),
        );
        targets.insert(
            name.clone(),
            TargetSlot {
                executor,
                runtime: RwLock::new(Arc::new(runtime)),
                permits: Arc::new(Semaphore::new(t.max_channels)),
                max: t.max_channels,
                wake: Notify::new(),
                alive_at: AtomicU64::new(unix_now()),
            },
        );
    }
    let listener = server::bind(&config.daemon)?;
    let (shutdown_tx, _) = watch::channel(false);
    let daemon = Arc::new(Daemon {
        config,
        queue,
        catalog: RwLock::new(catalog),
        targets,
        waiters: Mutex::new(HashMap::new()),
        started: Instant::now(),
        heartbeat_at: AtomicU64::new(unix_now()),
        shutting_down: AtomicBool::new(false),
        shutdown_tx,
    });
    let mut tasks = Vec::new();
    for name in daemon.targets.keys() {
        tasks.push(tokio::spawn(worker::run_target(
            daemon.clone(),
            name.clone(),
        )));
    }
    tasks.push(tokio::spawn(worker::sweep_approvals(daemon.clone())));
    tasks.push(tokio::spawn(heartbeat(daemon.clone())));
    let server = tokio::spawn(server::serve(listener, daemon.clone()));
    notify::notify("READY=1");
    tracing::info!(
        socket = %daemon.config.daemon.socket.display(),
        targets = daemon.targets.len(),
        catalog = daemon.catalog().digest(),
        "govsql daemon ready"
    );
    signals(&daemon).await;

    // Shutdown: stop accepting, let running jobs finish (bounded).
    notify::notify("STOPPING=1");
    daemon.shutting_down.store(true, Ordering::SeqCst);
    let _ = daemon.shutdown_tx.send(true);
    let _ = server.await;
    let _ = std::fs::remove_file(&daemon.config.daemon.socket);
    let drain = async {
        for t in daemon.targets.values() {
            let _ = t.permits.acquire_many(t.max as u32).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(60), drain)
        .await
        .is_err()
    {
        tracing::warn!(
            "jobs still running after 60 s; exiting (they are settled at the next start)"
        );
    }
    for t in tasks {
        t.abort();
    }
    tracing::info!("govsql daemon stopped");
    Ok(())
}

/// Waits for SIGTERM or SIGINT; reloads the catalog on SIGHUP.
async fn signals(daemon: &Daemon) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: draining"); return; }
            _ = int.recv() => { tracing::info!("SIGINT: draining"); return; }
            _ = hup.recv() => daemon.reload_catalog(),
        }
    }
}

/// Sends WATCHDOG=1 while every worker loop is alive.
async fn heartbeat(daemon: Arc<Daemon>) {
    let every = notify::watchdog_interval().unwrap_or(Duration::from_secs(5));
    loop {
        let now = unix_now();
        if daemon.workers_alive(now) {
            notify::notify("WATCHDOG=1");
            daemon.heartbeat_at.store(now, Ordering::SeqCst);
        } else {
            tracing::error!("a worker stopped answering; withholding the watchdog heartbeat");
        }
        tokio::time::sleep(every).await;
    }
}

//! The daemon's life: the state directory's lock, start (recovery first,
//! then the workers), signals (SIGHUP reloads, SIGTERM drains), the
//! watchdog heartbeat, and the reload of the config and the catalog.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;

use nix::fcntl::{Flock, FlockArg};

use super::*;

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
    let mut targets = indexmap::IndexMap::new();
    let cap = crate::transport::cap::ConnectionCap::new(config.daemon.max_ssh_connections);
    for (name, t) in &config.targets {
        let executor = crate::transport::for_target_capped(t, DbRole::Runtime, &cap)
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
        rollouts: tokio::sync::Notify::new(),
        ssh_cap: cap,
    });
    // The loops run until shutdown; they are not drained, only stopped.
    let mut loops = tokio::task::JoinSet::new();
    for name in daemon.targets.keys() {
        loops.spawn(worker::run_target(daemon.clone(), name.clone()));
    }
    loops.spawn(worker::sweep_approvals(daemon.clone()));
    loops.spawn(worker::pin_waiting(daemon.clone()));
    loops.spawn(super::rollouts::run(daemon.clone()));
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

impl Daemon {
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

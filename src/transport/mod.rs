//! Transports: how a psql script reaches the database. One trait, several
//! executors: SSH (the product's main path), local (psql on this host) and,
//! in unit tests, a fake. The runtime only sees [`Executor`].
//!
//! Deadlines are enforced here, once for every executor: past the job's
//! deadline its run is dropped (the local child is killed, the SSH channel
//! closed) and the backend tagged with the job's `application_name` is
//! terminated through a second, short script.
//!
//! A daemon's SSH executors share one [`cap::ConnectionCap`]: at most
//! `max_ssh_connections` connections open, idle ones closed first.

pub mod cap;
pub mod local;
pub mod session;
pub mod ssh;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{TargetConfig, TransportKind};
use crate::job::ErrorClass;
use crate::psql::{DbRole, FinishedScript, PsqlResult, Script};
pub use crate::psql::{Exit, ScriptOutput};
pub use session::OutputLimits;
use session::{run_once, Launch, Pool, SessionSettings};

/// A boxed, sendable future (the trait is used as `dyn Executor`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One script to run.
#[derive(Debug, Clone)]
pub struct ScriptRequest {
    /// The script for psql's stdin.
    pub text: String,
    /// The nonce of its markers (session mode reads up to its end marker).
    pub nonce: String,
    /// The `application_name` the script sets (for cancellation).
    pub tag: String,
    /// A read for an operator (`govsql log`): it runs in its own psql on
    /// the target's read channel, never in a job's slot or warm session.
    pub read: bool,
}

impl ScriptRequest {
    /// The request for a finished script.
    pub fn new(script: &FinishedScript, tag: &str) -> ScriptRequest {
        ScriptRequest {
            text: script.text.clone(),
            nonce: script.nonce.clone(),
            tag: tag.to_string(),
            read: false,
        }
    }
}

/// How an executor runs scripts: one psql per script, or warm sessions
/// (session mode, the runtime role's default).
pub struct Runner {
    launch: Arc<dyn Launch>,
    pool: Option<Arc<Pool>>,
    /// Warm sessions for operators' reads (`govsql log`), on the read
    /// channel, in session mode: a read is then one query on a psql
    /// already connected, not a psql, a gate and a backend started for it.
    read_pool: Option<Arc<Pool>>,
    read_launch: ReadLaunch,
    started: Arc<AtomicU64>,
    /// How much output one run may hold.
    limits: OutputLimits,
}

/// Counts the processes a launcher starts.
struct Counted {
    inner: Arc<dyn Launch>,
    started: Arc<AtomicU64>,
}

impl Launch for Counted {
    fn launch(&self) -> BoxFuture<'_, Result<session::Process, TransportError>> {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.inner.launch()
    }

    fn launch_read(&self) -> BoxFuture<'_, Result<session::Process, TransportError>> {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.inner.launch_read()
    }
}

/// A launcher whose every psql is a read's (the read channel): the read
/// pool's sessions.
struct ReadLaunch(Arc<Counted>);

impl Launch for ReadLaunch {
    fn launch(&self) -> BoxFuture<'_, Result<session::Process, TransportError>> {
        self.0.launch_read()
    }
}

/// Warm read sessions per target: as many as SSH's read channels.
const READ_SESSIONS: usize = ssh::READ_CHANNELS;

impl Runner {
    /// A runner for a target and role: session mode when the target has
    /// it on and the role is the runtime's (migrate runs its own psql).
    pub fn new(launch: Arc<dyn Launch>, target: &TargetConfig, role: DbRole) -> Runner {
        let sessions = target.session_mode && role == DbRole::Runtime;
        let settings = |max_sessions| SessionSettings {
            max_sessions,
            idle: Duration::from_secs(target.session_idle_s.max(1)),
            max_jobs: target.session_max_jobs.max(1),
        };
        let pool = sessions.then(|| Pool::new(settings(target.max_channels)));
        let read_pool = sessions.then(|| Pool::new(settings(READ_SESSIONS)));
        let started = Arc::new(AtomicU64::new(0));
        let launch = Arc::new(Counted {
            inner: launch,
            started: started.clone(),
        });
        Runner {
            read_launch: ReadLaunch(launch.clone()),
            launch,
            pool,
            read_pool,
            started,
            limits: OutputLimits::for_results(target.max_result_bytes),
        }
    }

    /// Warm sessions idle now, and psql processes started so far.
    pub fn counts(&self) -> (u64, u64) {
        let warm = self.pool.as_ref().map_or(0, |p| p.idle_count() as u64);
        (warm, self.started())
    }

    /// Whether session mode is paused now.
    pub fn sessions_paused(&self) -> bool {
        self.pool.as_ref().is_some_and(|p| p.paused())
    }

    fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// Runs one script (a read on the read channel: in its own psql, or in
    /// session mode in the warm read session).
    pub async fn run(&self, req: ScriptRequest) -> Result<ScriptOutput, TransportError> {
        let (pool, launch): (Option<&Pool>, &dyn Launch) = if req.read {
            (self.read_pool.as_deref(), &self.read_launch)
        } else {
            (self.pool.as_deref(), self.launch.as_ref())
        };
        match pool {
            Some(pool) => pool.run(launch, &req, self.limits.clone()).await,
            None => {
                run_once(
                    launch.launch().await?,
                    req.text.as_bytes(),
                    self.limits.clone(),
                )
                .await
            }
        }
    }

    /// The warm sessions' pool, in session mode.
    pub fn pool(&self) -> Option<&Pool> {
        self.pool.as_deref()
    }

    /// Closes the warm sessions.
    pub async fn close(&self) {
        for pool in [&self.pool, &self.read_pool].into_iter().flatten() {
            pool.close().await;
        }
    }
}

/// A transport failure: either nothing was sent (the target could not be
/// reached) or the run's outcome is unknown.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    /// The deadline passed; what the cancel found of its backend.
    #[error("job deadline of {} s passed; {}", .0.as_secs_f64(), .1)]
    Timeout(Duration, Cancelled),
    /// The target could not be reached; nothing was sent.
    #[error("target unreachable: {0}")]
    Unreachable(String),
    /// The connection broke while the script ran: outcome unknown.
    #[error("connection lost while the job ran: {0}")]
    Lost(String),
    /// The server's host key is unknown or changed.
    #[error("host key refused: {0}")]
    HostKey(String),
    /// Authentication failed (not retried).
    #[error("{0}")]
    Auth(String),
    /// The database host's remote-gate would refuse the script (its
    /// format is too old): nothing was sent.
    #[error("{0}")]
    RemoteGate(String),
    /// The run wrote more than its output limits: it was stopped, its
    /// outcome is unknown.
    #[error("{0}")]
    OutputTooLarge(String),
}

impl TransportError {
    /// The error class recorded in evidence and the job's state.
    pub fn class(&self) -> ErrorClass {
        match self {
            TransportError::Timeout(..) => ErrorClass::Timeout,
            TransportError::Unreachable(_) | TransportError::Lost(_) => {
                ErrorClass::TargetUnreachable
            }
            TransportError::HostKey(_) => ErrorClass::HostKey,
            TransportError::Auth(_) => ErrorClass::SshAuth,
            TransportError::RemoteGate(_) => ErrorClass::RemoteGate,
            TransportError::OutputTooLarge(_) => ErrorClass::ResultTooLarge,
        }
    }

    /// Whether the script certainly never reached the database.
    pub fn nothing_ran(&self) -> bool {
        matches!(
            self,
            TransportError::Unreachable(_)
                | TransportError::HostKey(_)
                | TransportError::Auth(_)
                | TransportError::RemoteGate(_)
        )
    }
}

/// The executor of a target, bound to the database role its scripts run
/// as (SSH targets also pick that role's SSH identity). The identity key
/// is read and decrypted here, once.
pub fn for_target(
    target: &TargetConfig,
    role: DbRole,
) -> Result<Arc<dyn Executor>, TransportError> {
    Ok(match target.transport {
        TransportKind::Local => Arc::new(local::LocalExecutor::new(target, role)),
        TransportKind::Ssh => Arc::new(ssh::SshExecutor::new(target, role)?),
    })
}

/// [`for_target`] for a daemon: an SSH target's connection counts
/// against the daemon's cap on open connections.
pub fn for_target_capped(
    target: &TargetConfig,
    role: DbRole,
    cap: &Arc<cap::ConnectionCap>,
) -> Result<Arc<dyn Executor>, TransportError> {
    Ok(match target.transport {
        TransportKind::Local => Arc::new(local::LocalExecutor::new(target, role)),
        TransportKind::Ssh => ssh::SshExecutor::with_cap(target, role, cap)?,
    })
}

/// What a transport has done since it was built, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// Whether an SSH session is up now (SSH only).
    pub session_up: bool,
    /// SSH sessions established.
    pub connects: u64,
    /// SSH connection attempts that failed.
    pub connect_failures: u64,
    /// Channel opens the server refused.
    pub channel_open_failures: u64,
    /// Warm psql sessions idle in the pool (session mode).
    pub warm_sessions: u64,
    /// psql processes started (sessions or per-job runs).
    pub psql_started: u64,
    /// The script format the database host's remote-gate announced (SSH
    /// behind a gate only).
    pub gate_format: Option<u32>,
    /// Session mode is paused (resets kept failing; it is tried again).
    pub sessions_paused: bool,
}

/// Runs psql scripts on one target.
pub trait Executor: Send + Sync {
    /// Runs one script to completion (no deadline: see [`run_with_deadline`]).
    fn run(&self, req: ScriptRequest) -> BoxFuture<'_, Result<ScriptOutput, TransportError>>;
    /// Makes sure the target can be reached (the SSH session is up and its
    /// host key checked) before a job builds its evidence.
    fn ready(&self) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async { Ok(()) })
    }
    /// `local`, `ssh` or `fake`, for evidence.
    fn kind(&self) -> &'static str;
    /// The server key fingerprint in use, for evidence (SSH only).
    fn host_key_fingerprint(&self) -> Option<String> {
        None
    }
    /// Ends the executor's sessions cleanly (SSH: disconnect) at shutdown.
    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
    /// What it has done since it was built.
    fn stats(&self) -> TransportStats {
        TransportStats::default()
    }
}

/// Runs a finished script under a deadline and reads psql's answer: the
/// one path from a script to a [`PsqlResult`], for every caller.
pub async fn run_script(
    exec: &dyn Executor,
    script: &FinishedScript,
    tag: &str,
    deadline: Duration,
) -> PsqlResult {
    run_request(exec, ScriptRequest::new(script, tag), script, deadline).await
}

/// [`run_script`] for an operator's read (`govsql log`): its own psql on
/// the target's read channel, never a job's slot.
pub async fn run_read_script(
    exec: &dyn Executor,
    script: &FinishedScript,
    tag: &str,
    deadline: Duration,
) -> PsqlResult {
    let mut req = ScriptRequest::new(script, tag);
    req.read = true;
    run_request(exec, req, script, deadline).await
}

async fn run_request(
    exec: &dyn Executor,
    req: ScriptRequest,
    script: &FinishedScript,
    deadline: Duration,
) -> PsqlResult {
    match run_with_deadline(exec, req, deadline).await {
        Ok(out) => PsqlResult::read(&out, script),
        Err(TransportError::RemoteGate(m)) => PsqlResult::GateRefused(m),
        Err(e) if e.nothing_ran() => PsqlResult::NotStarted {
            class: e.class(),
            message: e.to_string(),
        },
        Err(e) => PsqlResult::CutOff {
            class: e.class(),
            message: e.to_string(),
        },
    }
}

/// Runs a script under a deadline. Past it, the run is dropped and the
/// job's backend terminated by its `application_name` tag.
pub async fn run_with_deadline(
    exec: &dyn Executor,
    req: ScriptRequest,
    deadline: Duration,
) -> Result<ScriptOutput, TransportError> {
    let tag = req.tag.clone();
    match tokio::time::timeout(deadline, exec.run(req)).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(tag = %tag, deadline_s = deadline.as_secs_f64(), "job deadline passed; cancelling its backend");
            let cancelled = match cancel_tagged(exec, &tag).await {
                Ok(found) => Cancelled::Found(found),
                Err(e) => {
                    tracing::error!(tag = %tag, cause = %e, "could not cancel the backend of a timed-out job");
                    Cancelled::NotReached
                }
            };
            Err(TransportError::Timeout(deadline, cancelled))
        }
    }
}

/// What the cancel of a timed-out job found. Never a proof that its
/// backend is gone: a backend frozen inside its COMMIT may still commit
/// (the ledger, under the job's key, settles that).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancelled {
    /// This many backends carried the job's tag and were told to stop.
    Found(u64),
    /// The cancel itself did not get through.
    NotReached,
}

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cancelled::Found(0) => {
                f.write_str("no backend of it was running (it had not started, or had ended)")
            }
            Cancelled::Found(1) => f.write_str("its backend was told to stop"),
            Cancelled::Found(n) => write!(f, "its {n} backends were told to stop"),
            Cancelled::NotReached => f.write_str(
                "its backend could not be told to stop (the cancel did not get through)",
            ),
        }
    }
}

/// Terminates every backend whose application_name is `tag` (waiting up
/// to 5 s for each to go); returns how many carried the tag.
pub async fn cancel_tagged(exec: &dyn Executor, tag: &str) -> Result<u64, TransportError> {
    let mut script = Script::new(&format!("{tag}:cancel"), 10_000);
    script.section();
    script.sql(&crate::grammar::cancel_statement(tag));
    let script = script.finish();
    let req = ScriptRequest::new(&script, &format!("{tag}:cancel"));
    let out = tokio::time::timeout(Duration::from_secs(15), exec.run(req))
        .await
        .map_err(|_| TransportError::Lost("the cancel script timed out".into()))??;
    let lost = |why: String| TransportError::Lost(format!("the cancel script {why}"));
    match PsqlResult::read(&out, &script) {
        PsqlResult::Complete(secs) => {
            let rows = crate::psql::control_rows(0, secs.get(0).unwrap_or_default(), 1)
                .map_err(|e| lost(format!("answered {e}")))?;
            rows.first()
                .and_then(|r| r[0].parse().ok())
                .ok_or_else(|| lost("answered no count".into()))
        }
        other => Err(lost(format!("ended with {other}"))),
    }
}

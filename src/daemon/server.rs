//! The socket: bind with the configured mode and group, accept with a
//! connection limit, read one bounded line at a time (a silent client is
//! closed after a timeout), and dispatch each request to its handler.

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

use super::peer::{denial, Peer};
use super::{Daemon, DaemonError};
use crate::config::DaemonConfig;
use crate::job::{ErrorClass, Job, JobId, JobState, Mode, Outcome, Params, Refusal};
use crate::protocol::{parse_request, Reply, ReplyKind, Request, MAX_LINE};
use crate::time::unix_now;

/// The most jobs one list reply carries.
pub const MAX_LIST: u32 = 1000;

/// How long a connection may stay silent before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent connections.
const MAX_CONNECTIONS: usize = 512;
/// Concurrent connections of one uid, so no user can lock others out.
pub const MAX_CONNECTIONS_PER_UID: usize = 32;
/// Concurrent `govsql log` reads of one uid (they share one read channel
/// per target, never the jobs' slots).
pub const MAX_READS_PER_UID: usize = 2;

/// The socket this daemon bound: removed at exit only while it is still
/// this daemon's file (another daemon may have bound the path since).
#[derive(Debug)]
pub struct BoundSocket {
    path: std::path::PathBuf,
    dev: u64,
    ino: u64,
}

impl BoundSocket {
    /// Removes the socket file if it is still the one this daemon bound.
    pub fn remove_if_ours(&self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => {
                let _ = std::fs::remove_file(&self.path);
            }
            Ok(_) => tracing::warn!(
                socket = %self.path.display(),
                "the socket path is another daemon's now; left in place"
            ),
            Err(_) => {}
        }
    }
}

/// Binds the socket with the configured mode and group. A socket file
/// that answers belongs to a live daemon (of another state_dir, which the
/// lock does not cover): refused, never replaced. One that does not answer
/// is stale and replaced.
pub fn bind(cfg: &DaemonConfig) -> Result<(UnixListener, BoundSocket), DaemonError> {
    let io = |what, source| DaemonError::Io {
        what,
        path: cfg.socket.clone(),
        source,
    };
    if let Some(dir) = cfg.socket.parent() {
        if !dir.exists() {
            // 0750 whatever the umask.
            std::fs::create_dir_all(dir)
                .and_then(|_| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750)))
                .map_err(|e| io("cannot create the socket directory of", e))?;
        }
    }
    if std::os::unix::net::UnixStream::connect(&cfg.socket).is_ok() {
        return Err(DaemonError::SocketInUse(cfg.socket.clone()));
    }
    match std::fs::remove_file(&cfg.socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("cannot remove the stale socket", e)),
    }
    let listener = UnixListener::bind(&cfg.socket).map_err(|e| io("cannot listen on", e))?;
    let mode = cfg
        .socket_mode()
        .map_err(|m| io("invalid socket_mode for", std::io::Error::other(m)))?;
    std::fs::set_permissions(&cfg.socket, std::fs::Permissions::from_mode(mode))
        .map_err(|e| io("cannot chmod", e))?;
    if let Some(group) = &cfg.socket_group {
        let gid = nix::unistd::Group::from_name(group)
            .ok()
            .flatten()
            .ok_or_else(|| {
                io(
                    "socket_group does not exist for",
                    std::io::Error::other(group.clone()),
                )
            })?
            .gid;
        set_group(&cfg.socket, group, gid)?;
    }
    let meta = std::fs::symlink_metadata(&cfg.socket).map_err(|e| io("cannot examine", e))?;
    let bound = BoundSocket {
        path: cfg.socket.clone(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    Ok((listener, bound))
}

/// Gives the socket its group, calling chown only when the group is not
/// already right: under systemd `Group=` makes it so, and the unit's
/// `SystemCallFilter=~@privileged` forbids every chown. A chown that is
/// needed and refused says what to change.
fn set_group(socket: &Path, group: &str, gid: nix::unistd::Gid) -> Result<(), DaemonError> {
    let io = |what, source| DaemonError::Io {
        what,
        path: socket.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(socket).map_err(|e| io("cannot examine", e))?;
    if meta.gid() == gid.as_raw() {
        return Ok(());
    }
    nix::unistd::chown(socket, None, Some(gid)).map_err(|e| {
        io(
            "cannot chgrp",
            std::io::Error::other(format!(
                "to socket_group {group}: {e}; run the daemon with {group} as its group (systemd: Group={group}; the unit's SystemCallFilter forbids chown) or make its user a member of {group}"
            )),
        )
    })
}

/// Accepts connections until shutdown; each runs as a tracked task.
/// Fairness: the accept loop never waits for a permit. The peer's uid
/// (SO_PEERCRED, one syscall) is checked against its own share first; a
/// connection over its uid's share, or over the daemon's total, gets a
/// one-line answer at once and is closed. Only then does the connection
/// task look the user up (NSS may block), so one user's churn neither
/// fills the accept backlog nor the look-ups of others.
pub async fn serve(listener: UnixListener, daemon: Arc<Daemon>) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let shutdown = daemon.shutdown_token().clone();
    let mut backoff = Duration::from_millis(10);
    let mut rates = AcceptRates::default();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff = Duration::from_millis(10);
                stream
            }
            Err(e) => {
                tracing::error!(cause = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let cred = match getsockopt(&stream, PeerCredentials) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(cause = %e, "cannot read the peer's credentials; closing");
                continue;
            }
        };
        if !rates.admit(cred.uid()) {
            turn_away(
                &stream,
                &format!(
                    "uid {} opens more than {ACCEPT_RATE} connections a second; slow down and try again",
                    cred.uid()
                ),
            );
            continue;
        }
        let Some(slot) = daemon.connection_slot(cred.uid()) else {
            turn_away(
                &stream,
                &format!(
                    "uid {} has {MAX_CONNECTIONS_PER_UID} connections open already; close some and try again",
                    cred.uid()
                ),
            );
            continue;
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            turn_away(
                &stream,
                &format!("the daemon has {MAX_CONNECTIONS} connections open; try again shortly"),
            );
            continue;
        };
        let d = daemon.clone();
        daemon.tasks().spawn(async move {
            connection(d, stream, cred.uid(), cred.gid()).await;
            drop(slot);
            drop(permit);
        });
    }
}

/// New connections a second one uid may open (a burst of as many): far
/// above any client's use (a cron job, a loop of `govsql status`), far
/// below a churn flood's tens of thousands.
pub const ACCEPT_RATE: f64 = 2000.0;

/// Each uid's share of the accept loop: a token bucket of
/// [`ACCEPT_RATE`] new connections a second. A uid past it is turned away
/// at accept, before its connection costs a task or a look-up.
#[derive(Default)]
struct AcceptRates {
    buckets: HashMap<u32, (f64, std::time::Instant)>,
}

impl AcceptRates {
    fn admit(&mut self, uid: u32) -> bool {
        let now = std::time::Instant::now();
        if self.buckets.len() > 4096 {
            // Full buckets carry no state: forget them.
            self.buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * ACCEPT_RATE < ACCEPT_RATE
            });
        }
        let (tokens, at) = self.buckets.entry(uid).or_insert((ACCEPT_RATE, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * ACCEPT_RATE).min(ACCEPT_RATE);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Answers a connection that gets no slot with one `unavailable` line,
/// without waiting (a fresh socket's buffer takes it), and closes it.
fn turn_away(stream: &UnixStream, why: &str) {
    let mut bytes = serde_json::to_vec(&Reply::error(ReplyKind::Unavailable, why))
        .unwrap_or_else(|_| b"{\"v\":1,\"ok\":false}".to_vec());
    bytes.push(b'\n');
    let _ = stream.try_write(&bytes);
}

enum Line {
    Data(Vec<u8>),
    TooLong,
    Eof,
}

/// Request lines longer than this need one of [`LARGE_REQUESTS`]'
/// permits to grow further: a flood of 4 MiB lines is read and parsed a
/// few at a time, never all at once.
const SMALL_LINE: usize = 64 * 1024;
/// How many large request lines are read and parsed at once.
static LARGE_REQUESTS: Semaphore = Semaphore::const_new(4);

async fn read_line_limited<R: AsyncBufRead + Unpin>(
    r: &mut R,
    max: usize,
    large: &mut Option<tokio::sync::SemaphorePermit<'static>>,
) -> std::io::Result<Line> {
    let mut buf = Vec::new();
    loop {
        if buf.len() > SMALL_LINE && large.is_none() {
            *large = Some(
                LARGE_REQUESTS
                    .acquire()
                    .await
                    .map_err(std::io::Error::other)?,
            );
        }
        let avail = r.fill_buf().await?;
        if avail.is_empty() {
            return Ok(if buf.is_empty() {
                Line::Eof
            } else {
                Line::Data(buf)
            });
        }
        if let Some(i) = avail.iter().position(|&b| b == b'\n') {
            buf.extend_from_slice(&avail[..i]);
            r.consume(i + 1);
            return Ok(if buf.len() > max {
                Line::TooLong
            } else {
                Line::Data(buf)
            });
        }
        let n = avail.len();
        buf.extend_from_slice(avail);
        r.consume(n);
        if buf.len() > max {
            return Ok(Line::TooLong);
        }
    }
}

async fn connection(daemon: Arc<Daemon>, stream: UnixStream, uid: u32, gid: u32) {
    // The user and group look-ups (NSS: files, LDAP, sssd…) may block;
    // a uid's answer is kept a few seconds.
    let Some(peer) = daemon.peers.get(uid, gid).await else {
        return;
    };
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let shutdown = daemon.shutdown_token().clone();
    loop {
        let mut large = None;
        let read = tokio::select! {
            r = tokio::time::timeout(IDLE_TIMEOUT, read_line_limited(&mut rd, MAX_LINE, &mut large)) => r,
            _ = shutdown.cancelled() => return,
        };
        let line = match read {
            Err(_) => {
                tracing::debug!(user = %peer.user, "client silent; closing");
                return;
            }
            Ok(Err(_)) | Ok(Ok(Line::Eof)) => return,
            Ok(Ok(Line::TooLong)) => {
                let reply = Reply::error(
                    ReplyKind::TooLong,
                    format!("request line over {MAX_LINE} bytes; closing"),
                );
                let _ = write_reply(&mut wr, &reply).await;
                return;
            }
            Ok(Ok(Line::Data(bytes))) => bytes,
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let parsed = parse_request(&line);
        drop(line);
        drop(large);
        let reply = match parsed {
            Ok(req) => dispatch(&daemon, &peer, req).await,
            Err(reply) => *reply,
        };
        if write_reply(&mut wr, &reply).await.is_err() {
            return;
        }
    }
}

async fn write_reply(
    wr: &mut tokio::net::unix::OwnedWriteHalf,
    reply: &Reply,
) -> std::io::Result<()> {
    let mut bytes =
        serde_json::to_vec(reply).unwrap_or_else(|_| {
            br#"{"v":1,"ok":false,"error":{"kind":"internal","message":"the daemon could not write its reply; see its log"}}"#.to_vec()
        });
    bytes.push(b'\n');
    wr.write_all(&bytes).await
}

async fn dispatch(daemon: &Daemon, peer: &Peer, req: Request) -> Reply {
    match req {
        Request::Submit {
            command,
            mode,
            params,
            target,
            idempotency_key,
            wait,
            timeout_s,
            check,
            ..
        } => {
            let job = match new_job(daemon, peer, command, mode, params, target, idempotency_key) {
                Ok(job) => job,
                Err(reply) => return *reply,
            };
            if check {
                return check_job(daemon, job);
            }
            // Registered before the job can run, so its result cannot slip by.
            let rx = wait.then(|| daemon.add_waiter(&job.job_id));
            let job_id = job.job_id.clone();
            match (rx, submit(daemon, peer, job).await) {
                (Some(rx), Ok(job)) if !job.state.is_terminal() => {
                    let reply = await_outcome(peer, job, rx, timeout_s).await;
                    daemon.prune_waiters(&job_id);
                    reply
                }
                (rx, reply) => {
                    if rx.is_some() {
                        drop(rx);
                        daemon.prune_waiters(&job_id);
                    }
                    match reply {
                        Ok(job) => Reply::job(job),
                        Err(reply) => *reply,
                    }
                }
            }
        }
        Request::Status { job_id, .. } => match daemon.queue().get(&job_id).await {
            Ok(Some(j)) if peer.may_see(&daemon.config().access, &j) => {
                Reply::job(for_peer(peer, j))
            }
            Ok(_) => not_found(&job_id),
            Err(e) => internal(e),
        },
        Request::Wait {
            job_id, timeout_s, ..
        } => wait(daemon, peer, &job_id, timeout_s).await,
        Request::List {
            limit,
            page,
            filter,
            ..
        } => {
            let config = daemon.config();
            let access = &config.access;
            let everyone = peer.uid == 0 || peer.admitted_by(&access.admin);
            let limit = limit.unwrap_or(100).clamp(1, MAX_LIST);
            let offset = u64::from(page.unwrap_or(0)) * u64::from(limit);
            let only = (!everyone).then_some(peer.uid);
            match daemon.queue().list(limit, offset, only, filter).await {
                Ok(jobs) => Reply::Jobs(
                    jobs.into_iter()
                        .filter(|j| peer.may_see(access, j))
                        .map(|mut j| {
                            // Lists never carry results.
                            if let Some(o) = j.outcome.as_mut() {
                                o.result = None;
                            }
                            j
                        })
                        .collect(),
                ),
                Err(e) => internal(e),
            }
        }
        Request::Approve { job_id, reason, .. } => approve(daemon, peer, &job_id, reason).await,
        Request::Reject { job_id, reason, .. } => reject(daemon, peer, &job_id, &reason).await,
        Request::Show { job_id, .. } => show(daemon, peer, &job_id).await,
        Request::Cancel { job_id, .. } => cancel(daemon, peer, &job_id).await,
        Request::Log {
            target,
            mut filter,
            limit,
            ..
        } => {
            let config = daemon.config();
            let target = match config.target(target.as_deref()) {
                Ok((name, _)) => name.to_string(),
                Err(e) => return Reply::error(ReplyKind::UnknownTarget, e.to_string()),
            };
            // Admins read the whole ledger; anyone else their own rows.
            if !(peer.uid == 0 || peer.admitted_by(&config.access.admin)) {
                filter.actor = Some(peer.user.clone());
            }
            let limit = limit.unwrap_or(50).clamp(1, 1000);
            let Some(_read) = daemon.read_slot(peer.uid) else {
                return Reply::error(
                    ReplyKind::Unavailable,
                    format!("user {} has {MAX_READS_PER_UID} `govsql log` reads running already; wait for them and try again", peer.user),
                );
            };
            match daemon.ledger(&target, &filter, limit).await {
                Ok(rows) => Reply::Log(rows),
                Err(e) => Reply::error(
                    ReplyKind::Unavailable,
                    format!("cannot read the ledger of target {target}: {e}"),
                ),
            }
        }
        Request::Metrics { .. } => Reply::Metrics(daemon.metrics_text().await),
        Request::Health { .. } => match daemon.health().await {
            Ok(h) => Reply::Health(Box::new(h)),
            Err(e) => internal(e),
        },
    }
}

fn not_found(job_id: &JobId) -> Reply {
    Reply::error(
        ReplyKind::NotFound,
        format!("no job {job_id}; `govsql jobs` lists recent jobs"),
    )
}

fn internal(e: impl std::fmt::Display) -> Reply {
    tracing::error!(cause = %e, "request failed");
    Reply::error(
        ReplyKind::Internal,
        format!("the daemon could not do that: {e}"),
    )
}

/// The job a submit asks for: its target resolved, and a refusal preset
/// when the command is unknown or the peer may not run this mode (the
/// worker records it in the ledger).
fn new_job(
    daemon: &Daemon,
    peer: &Peer,
    command: String,
    mode: Mode,
    params: Params,
    target: Option<String>,
    idempotency_key: Option<String>,
) -> Result<Job, Box<Reply>> {
    if daemon.is_shutting_down() {
        return Err(Box::new(Reply::error(
            ReplyKind::Unavailable,
            "the daemon is shutting down; submit again once it is back",
        )));
    }
    if let Some(k) = idempotency_key.as_deref() {
        if !crate::job::valid_identifier(k) {
            return Err(Box::new(Reply::error(
                ReplyKind::BadRequest,
                "idempotency keys are 1-128 characters of A-Z a-z 0-9 . _ : @ -",
            )));
        }
    }
    let target = match daemon.config().target(target.as_deref()) {
        Ok((name, _)) => name.to_string(),
        Err(e) => {
            return Err(Box::new(Reply::error(
                ReplyKind::UnknownTarget,
                e.to_string(),
            )))
        }
    };
    let mut job = Job::new(
        command,
        mode,
        target,
        params,
        idempotency_key,
        peer.user.clone(),
        peer.uid,
    );
    match daemon.catalog().get(&job.command) {
        // Refused before anything is stored: it cannot be logged anyway.
        Err(e) => {
            return Err(Box::new(Reply::error(
                ReplyKind::UnknownCommand,
                e.to_string(),
            )))
        }
        Ok(cmd) => {
            if let Some(why) = denial(&daemon.config().access, peer, mode) {
                job.preset = Some(Refusal {
                    class: ErrorClass::NotAllowed,
                    message: why,
                });
            } else if cmd.requires_approval && mode == Mode::Apply {
                job.state = JobState::AwaitingApproval;
            }
        }
    }
    Ok(job)
}

/// A submit that only checks: the params against the command's specs too
/// (the worker would refuse them with bad_params); nothing is stored.
fn check_job(daemon: &Daemon, job: Job) -> Reply {
    if let Ok(cmd) = daemon.catalog().get(&job.command) {
        if let Err(e) = crate::params::validate(&cmd.name, &cmd.params, job.param_pairs()) {
            return Reply::error(ReplyKind::BadRequest, e.to_string());
        }
    }
    Reply::job(job)
}

async fn submit(daemon: &Daemon, peer: &Peer, job: Job) -> Result<Job, Box<Reply>> {
    match daemon.queue().submit(job).await {
        Ok(job) => {
            tracing::info!(job_id = %job.job_id, command = %job.command, mode = job.mode.as_str(), user = %peer.user, state = %job.state, "job submitted");
            daemon.wake(&job.target);
            Ok(job)
        }
        Err(e @ super::queue::QueueError::Commit(_)) => {
            tracing::error!(cause = %e, "submit refused: the queue cannot write");
            Err(Box::new(Reply::error(
                ReplyKind::Unavailable,
                format!("submits are refused while {e}; status and wait still work"),
            )))
        }
        Err(e) => Err(Box::new(internal(e))),
    }
}

/// Waits for a job. Only this request's own wait is registered and
/// removed: another user's wait on the same id (ids show in `ps`) never
/// touches it.
async fn wait(daemon: &Daemon, peer: &Peer, job_id: &JobId, timeout_s: Option<u64>) -> Reply {
    // Register first, then look: a job finishing in between still reaches us.
    let rx = daemon.add_waiter(job_id);
    let config = daemon.config();
    let access = &config.access;
    let mut rx = rx;
    match daemon.queue().get(job_id).await {
        Ok(Some(j)) if peer.may_see(access, &j) => {
            if !j.state.is_terminal() {
                let reply = await_outcome(peer, j, rx, timeout_s).await;
                daemon.prune_waiters(job_id);
                return reply;
            }
            // Ended: with its result when it ended moments ago (the queue
            // never stores results).
            match rx.try_recv() {
                Ok(outcome) => with_outcome(peer, j, outcome),
                Err(_) => {
                    drop(rx);
                    daemon.prune_waiters(job_id);
                    Reply::job(for_peer(peer, j))
                }
            }
        }
        other => {
            drop(rx);
            daemon.prune_waiters(job_id);
            match other {
                Ok(_) => not_found(job_id),
                Err(e) => internal(e),
            }
        }
    }
}

/// A stored job as a peer may see it: its result (kept for
/// `result_ttl_s`) only for its submitter.
fn for_peer(peer: &Peer, mut job: Job) -> Job {
    if peer.uid != job.actor_uid {
        if let Some(o) = job.outcome.as_mut() {
            o.result = None;
        }
    }
    job
}

/// A job with its outcome; the result goes to its submitter only.
fn with_outcome(peer: &Peer, mut job: Job, mut outcome: Outcome) -> Reply {
    if peer.uid != job.actor_uid {
        outcome.result = None;
    }
    job.state = outcome.state();
    job.finished_at = job.finished_at.or(Some(unix_now()));
    // An approval given while this wait was open is in the evidence.
    if let Some(by) = outcome.evidence["approved_by"].as_str() {
        job.approved_by = Some(by.to_string());
    }
    job.outcome = Some(outcome);
    Reply::job(job)
}

/// Waits for a registered job's outcome; the result goes to its submitter
/// only.
async fn await_outcome(
    peer: &Peer,
    job: Job,
    rx: tokio::sync::oneshot::Receiver<Outcome>,
    timeout_s: Option<u64>,
) -> Reply {
    let limit = Duration::from_secs(timeout_s.unwrap_or(3600).min(86_400));
    match tokio::time::timeout(limit, rx).await {
        Ok(Ok(outcome)) => with_outcome(peer, job, outcome),
        Ok(Err(_)) => Reply::error(
            ReplyKind::Internal,
            "the job's worker went away; ask `govsql status` later",
        ),
        Err(_) => Reply::error(
            ReplyKind::Timeout,
            format!(
                "job {} is still {}; wait again or check `govsql status`",
                job.job_id, job.state
            ),
        ),
    }
}

/// An approver's words: control characters out, at most 200 characters;
/// None when nothing is left.
fn reason_text(reason: &str) -> Option<String> {
    let r: String = reason
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    (!r.trim().is_empty()).then_some(r)
}

/// The job an approver acts on: the peer must be in the approve list and
/// the job awaiting approval.
async fn awaiting_for_approver(daemon: &Daemon, peer: &Peer, job_id: &JobId) -> Result<Job, Reply> {
    if !peer.admitted_by(&daemon.config().access.approve) {
        return Err(Reply::error(
            ReplyKind::Denied,
            format!(
                "user {} is not in the [access] approve list of the daemon's config",
                peer.user
            ),
        ));
    }
    let row = match daemon.queue().get(job_id).await {
        Ok(Some(r)) if peer.may_see(&daemon.config().access, &r) => r,
        Ok(_) => return Err(not_found(job_id)),
        Err(e) => return Err(internal(e)),
    };
    if row.state != JobState::AwaitingApproval {
        return Err(Reply::error(
            ReplyKind::Conflict,
            format!("job {job_id} is {}, not awaiting approval", row.state),
        ));
    }
    Ok(row)
}

async fn approve(daemon: &Daemon, peer: &Peer, job_id: &JobId, reason: Option<String>) -> Reply {
    let reason = reason.as_deref().and_then(reason_text);
    let cfg = daemon.config();
    let row = match awaiting_for_approver(daemon, peer, job_id).await {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    if row.actor_uid == peer.uid {
        return Reply::error(
            ReplyKind::Denied,
            "a job must be approved by a different user than the one who submitted it",
        );
    }
    if unix_now() - row.submitted_at > cfg.daemon.approval_ttl_s as i64 {
        let msg = "the approval came after approval_ttl_s; submit the job again";
        let _ = daemon
            .queue()
            .preset_refusal(job_id, ErrorClass::ApprovalExpired, msg)
            .await;
        daemon.wake(&row.target);
        return Reply::error(ReplyKind::Expired, msg);
    }
    let reason = reason.map(|r| format!("approved by {}: {r}", peer.user));
    match daemon.queue().approve(job_id, &peer.user, reason).await {
        Ok(row) => {
            tracing::info!(job_id = %job_id, approver = %peer.user, "job approved");
            daemon.wake(&row.target);
            Reply::job(row)
        }
        Err(e) => Reply::error(ReplyKind::Conflict, e.to_string()),
    }
}

/// Rejects a job that waits for approval: it ends refused (`rejected`),
/// the reason in its ledger row's evidence.
async fn reject(daemon: &Daemon, peer: &Peer, job_id: &JobId, reason: &str) -> Reply {
    let Some(reason) = reason_text(reason) else {
        return Reply::error(ReplyKind::BadRequest, "a rejection needs a --reason");
    };
    let row = match awaiting_for_approver(daemon, peer, job_id).await {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    let msg = format!("rejected by {}: {reason}", peer.user);
    match daemon
        .queue()
        .preset_refusal(job_id, ErrorClass::Rejected, &msg)
        .await
    {
        Ok(0) => Reply::error(
            ReplyKind::Conflict,
            format!("job {job_id} is no longer awaiting approval"),
        ),
        Ok(_) => {
            daemon.wake(&row.target);
            tracing::info!(job_id = %job_id, approver = %peer.user, "job rejected");
            match daemon.queue().get(job_id).await {
                Ok(Some(r)) => Reply::job(r),
                _ => Reply::Done,
            }
        }
        Err(e) => internal(e),
    }
}

/// What a job will run, values included (never logged): for its
/// submitter, root, or an approver of a job awaiting that approver's
/// approval (not one they submitted). Anyone else is told the job is not
/// found, whether it exists or not.
async fn show(daemon: &Daemon, peer: &Peer, job_id: &JobId) -> Reply {
    let cfg = daemon.config();
    let row = match daemon.queue().get(job_id).await {
        Ok(Some(r)) => r,
        Ok(None) => return not_found(job_id),
        Err(e) => return internal(e),
    };
    let approving = row.state == JobState::AwaitingApproval
        && row.actor_uid != peer.uid
        && peer.admitted_by(&cfg.access.approve);
    if row.actor_uid != peer.uid && peer.uid != 0 && !approving {
        return not_found(job_id);
    }
    if row.state.is_terminal() {
        return Reply::error(
            ReplyKind::Conflict,
            format!(
                "job {job_id} is {}; its params were erased when it ended",
                row.state
            ),
        );
    }
    let (description, statements) = match daemon.catalog().get(&row.command) {
        Ok(c) => (c.description.clone(), c.statements.clone()),
        Err(e) => return Reply::error(ReplyKind::UnknownCommand, e.to_string()),
    };
    tracing::info!(job_id = %job_id, user = %peer.user, "job shown");
    Reply::Show(Box::new(crate::protocol::ShowJob {
        job_id: row.job_id.clone(),
        state: row.state,
        actor: row.actor.clone(),
        command: row.command.clone(),
        mode: row.mode,
        target: row.target.clone(),
        description,
        statements,
        params: row.param_pairs().to_vec(),
    }))
}

async fn cancel(daemon: &Daemon, peer: &Peer, job_id: &JobId) -> Reply {
    let row = match daemon.queue().get(job_id).await {
        Ok(Some(r)) => r,
        Ok(None) => return not_found(job_id),
        Err(e) => return internal(e),
    };
    let cfg = daemon.config();
    let owner_or_admin =
        row.actor_uid == peer.uid || peer.uid == 0 || peer.admitted_by(&cfg.access.admin);
    if !owner_or_admin {
        // Who may not see it is not told it exists.
        if !peer.may_see(&cfg.access, &row) {
            return not_found(job_id);
        }
        return Reply::error(
            ReplyKind::Denied,
            "only the submitter, root or an [access] admin may cancel a job (an approver rejects it: `govsql reject JOB --reason …`)",
        );
    }
    let msg = format!("cancelled by {}", peer.user);
    match daemon
        .queue()
        .preset_refusal(job_id, ErrorClass::Cancelled, &msg)
        .await
    {
        Ok(0) => Reply::error(
            ReplyKind::Conflict,
            format!(
                "job {job_id} is {}; only queued or waiting jobs can be cancelled",
                row.state
            ),
        ),
        Ok(_) => {
            daemon.wake(&row.target);
            tracing::info!(job_id = %job_id, user = %peer.user, "job cancelled");
            match daemon.queue().get(job_id).await {
                Ok(Some(r)) => Reply::job(r),
                _ => Reply::Done,
            }
        }
        Err(e) => internal(e),
    }
}

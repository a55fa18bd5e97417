//! The socket: bind with the configured mode and group, accept with a
//! connection limit, read one bounded line at a time (a silent client is
//! closed after a timeout), and dispatch each request to its handler.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use super::peer::{denial, Peer};
use super::protocol::{parse_request, Reply, Request, MAX_LINE};
use super::queue::{JobRow, NewJob};
use super::{unix_now, Daemon, DaemonError, Finished};
use crate::config::DaemonConfig;
use crate::params;
use crate::runtime::Mode;

/// How long a connection may stay silent before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent connections.
const MAX_CONNECTIONS: usize = 512;

/// Binds the socket (replacing a stale file: the lock proves no other
/// daemon owns it) with the configured mode and group.
pub fn bind(cfg: &DaemonConfig) -> Result<UnixListener, DaemonError> {
    let io = |what, source| DaemonError::Io {
        what,
        path: cfg.socket.clone(),
        source,
    };
    if let Some(dir) = cfg.socket.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io("cannot create the socket directory of", e))?;
    }
    match std::fs::remove_file(&cfg.socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("cannot remove the stale socket", e)),
    }
    let listener = UnixListener::bind(&cfg.socket).map_err(|e| io("cannot listen on", e))?;
    let mode = cfg
        .socket_mode
        .as_deref()
        .map(|m| u32::from_str_radix(m.trim_start_matches("0o"), 8))
        .transpose()
        .map_err(|_| {
            io(
                "socket_mode is not octal for",
                std::io::Error::other("bad mode"),
            )
        })?
        .unwrap_or(0o660);
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
        nix::unistd::chown(&cfg.socket, None, Some(gid))
            .map_err(|e| io("cannot chgrp", e.into()))?;
    }
    Ok(listener)
}

/// Accepts connections until shutdown.
pub async fn serve(listener: UnixListener, daemon: Arc<Daemon>) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut shutdown = daemon.shutdown_signal();
    let mut backoff = Duration::from_millis(10);
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = shutdown.changed() => return,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                backoff = Duration::from_millis(10);
                let d = daemon.clone();
                tokio::spawn(async move {
                    connection(d, stream).await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::error!(cause = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

enum Line {
    Data(Vec<u8>),
    TooLong,
    Eof,
}

async fn read_line_limited<R: AsyncBufRead + Unpin>(
    r: &mut R,
    max: usize,
) -> std::io::Result<Line> {
    let mut buf = Vec::new();
    loop {
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

async fn connection(daemon: Arc<Daemon>, stream: UnixStream) {
    let peer = match Peer::of(&stream) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(cause = %e, "cannot read the peer's credentials; closing");
            return;
        }
    };
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    loop {
        let line =
            match tokio::time::timeout(IDLE_TIMEOUT, read_line_limited(&mut rd, MAX_LINE)).await {
                Err(_) => {
                    tracing::debug!(user = %peer.user, "client silent; closing");
                    return;
                }
                Ok(Err(_)) | Ok(Ok(Line::Eof)) => return,
                Ok(Ok(Line::TooLong)) => {
                    let reply = Reply::error(
                        "too_long",
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
        let reply = match parse_request(&line) {
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
        serde_json::to_vec(reply).unwrap_or_else(|_| b"{\"v\":1,\"ok\":false}".to_vec());
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
            ..
        } => {
            let job_id = crate::cli::new_job_id();
            // Registered before the job can run, so its result cannot slip by.
            let rx = wait.then(|| daemon.add_waiter(&job_id));
            let reply = submit(
                daemon,
                peer,
                job_id.clone(),
                command,
                mode,
                params,
                target,
                idempotency_key,
            )
            .await;
            match (rx, reply) {
                (Some(rx), Ok(row)) if !row.is_terminal() => {
                    await_outcome(peer, row, rx, timeout_s).await
                }
                (rx, reply) => {
                    if rx.is_some() {
                        daemon.forget_waiters(&job_id);
                    }
                    match reply {
                        Ok(row) => Reply::job(row.view()),
                        Err(reply) => *reply,
                    }
                }
            }
        }
        Request::Status { job_id, .. } => match daemon.queue().get(&job_id).await {
            Ok(Some(j)) => Reply::job(j.view()),
            Ok(None) => not_found(&job_id),
            Err(e) => internal(e),
        },
        Request::Wait {
            job_id, timeout_s, ..
        } => wait(daemon, peer, &job_id, timeout_s).await,
        Request::List { limit, .. } => {
            match daemon.queue().list(limit.unwrap_or(100).min(10_000)).await {
                Ok(rows) => Reply {
                    jobs: Some(rows.iter().map(|r| r.view()).collect()),
                    ..Reply::ok()
                },
                Err(e) => internal(e),
            }
        }
        Request::Approve { job_id, .. } => approve(daemon, peer, &job_id).await,
        Request::Cancel { job_id, .. } => cancel(daemon, peer, &job_id).await,
        Request::Health { .. } => Reply {
            health: Some(daemon.health().await),
            ..Reply::ok()
        },
    }
}

fn not_found(job_id: &str) -> Reply {
    Reply::error(
        "not_found",
        format!("no job {job_id:?}; `govsql jobs` lists recent jobs"),
    )
}

fn internal(e: impl std::fmt::Display) -> Reply {
    tracing::error!(cause = %e, "request failed");
    Reply::error("internal", format!("the daemon could not do that: {e}"))
}

#[allow(clippy::too_many_arguments)]
async fn submit(
    daemon: &Daemon,
    peer: &Peer,
    job_id: String,
    command: String,
    mode: Mode,
    params: Vec<(String, String)>,
    target: Option<String>,
    idempotency_key: Option<String>,
) -> Result<JobRow, Box<Reply>> {
    if daemon.is_shutting_down() {
        return Err(Box::new(Reply::error(
            "unavailable",
            "the daemon is shutting down; submit again once it is back",
        )));
    }
    let target = match daemon.config().target(target.as_deref()) {
        Ok((name, _)) => name.to_string(),
        Err(e) => return Err(Box::new(Reply::error("bad_request", e.to_string()))),
    };
    let catalog = daemon.catalog();
    let mut state = "queued";
    let mut preset = None;
    match catalog.get(&command) {
        Err(e) => preset = Some(("unknown_command".to_string(), e.to_string())),
        Ok(cmd) => {
            if let Some(why) = denial(&daemon.config().access, peer, mode) {
                preset = Some(("peer_not_allowed".to_string(), why));
            } else if cmd.requires_approval && mode == Mode::Apply {
                state = "awaiting_approval";
            }
        }
    }
    let job = NewJob {
        params_digest: params::digest(&command, &params),
        idempotency_key: idempotency_key.unwrap_or_else(|| format!("job:{job_id}")),
        job_id,
        command,
        mode,
        target: target.clone(),
        params,
        actor: peer.user.clone(),
        actor_uid: peer.uid,
        state,
        preset_refusal: preset,
    };
    match daemon.queue().submit(job).await {
        Ok(row) => {
            tracing::info!(job_id = %row.job_id, command = %row.command, mode = row.mode.as_str(), user = %peer.user, state = %row.state, "job submitted");
            daemon.wake(&target);
            Ok(row)
        }
        Err(e) => Err(Box::new(internal(e))),
    }
}

async fn wait(daemon: &Daemon, peer: &Peer, job_id: &str, timeout_s: Option<u64>) -> Reply {
    // Register first, then look: a job finishing in between still reaches us.
    let rx = daemon.add_waiter(job_id);
    let row = match daemon.queue().get(job_id).await {
        Ok(Some(r)) => r,
        Ok(None) => return not_found(job_id),
        Err(e) => return internal(e),
    };
    if row.is_terminal() {
        daemon.forget_waiters(job_id);
        return Reply::job(row.view());
    }
    await_outcome(peer, row, rx, timeout_s).await
}

/// Waits for a registered job's outcome; the result goes to its submitter
/// only.
async fn await_outcome(
    peer: &Peer,
    row: JobRow,
    rx: tokio::sync::oneshot::Receiver<Finished>,
    timeout_s: Option<u64>,
) -> Reply {
    let job_id = row.job_id.as_str();
    let limit = Duration::from_secs(timeout_s.unwrap_or(3600).min(86_400));
    match tokio::time::timeout(limit, rx).await {
        Ok(Ok(Finished { state, mut outcome })) => {
            // Results go to the submitter only.
            if peer.uid != row.actor_uid {
                outcome.result = None;
            }
            let mut view = row.view();
            view.state = state;
            view.finished_at = Some(unix_now() as i64);
            // An approval given while this wait was open is in the evidence.
            if let Some(by) = outcome.evidence["approved_by"].as_str() {
                view.approved_by = Some(by.to_string());
            }
            view.outcome = Some(outcome);
            Reply::job(view)
        }
        Ok(Err(_)) => Reply::error(
            "internal",
            "the job's worker went away; ask `govsql status` later",
        ),
        Err(_) => Reply::error(
            "timeout",
            format!(
                "job {job_id} is still {}; wait again or check `govsql status`",
                row.state
            ),
        ),
    }
}

async fn approve(daemon: &Daemon, peer: &Peer, job_id: &str) -> Reply {
    let cfg = daemon.config();
    if !peer.admitted_by(&cfg.access.approve) {
        return Reply::error(
            "denied",
            format!(
                "user {} is not in the [access] approve list of the daemon's config",
                peer.user
            ),
        );
    }
    let row = match daemon.queue().get(job_id).await {
        Ok(Some(r)) => r,
        Ok(None) => return not_found(job_id),
        Err(e) => return internal(e),
    };
    if row.state != "awaiting_approval" {
        return Reply::error(
            "conflict",
            format!("job {job_id} is {}, not awaiting approval", row.state),
        );
    }
    if row.actor_uid == peer.uid {
        return Reply::error(
            "denied",
            "a job must be approved by a different user than the one who submitted it",
        );
    }
    if unix_now() as i64 - row.submitted_at > cfg.daemon.approval_ttl_s as i64 {
        let msg = "the approval came after approval_ttl_s; submit the job again";
        let _ = daemon
            .queue()
            .preset_refusal(job_id, "approval_expired", msg)
            .await;
        daemon.wake(&row.target);
        return Reply::error("expired", msg);
    }
    match daemon.queue().approve(job_id, &peer.user).await {
        Ok(row) => {
            tracing::info!(job_id = %job_id, approver = %peer.user, "job approved");
            daemon.wake(&row.target);
            Reply::job(row.view())
        }
        Err(e) => Reply::error("conflict", e.to_string()),
    }
}

async fn cancel(daemon: &Daemon, peer: &Peer, job_id: &str) -> Reply {
    let row = match daemon.queue().get(job_id).await {
        Ok(Some(r)) => r,
        Ok(None) => return not_found(job_id),
        Err(e) => return internal(e),
    };
    let cfg = daemon.config();
    if row.actor_uid != peer.uid && peer.uid != 0 && !peer.admitted_by(&cfg.access.approve) {
        return Reply::error(
            "denied",
            "only the submitter, an approver or root may cancel a job",
        );
    }
    let msg = format!("cancelled by {}", peer.user);
    match daemon
        .queue()
        .preset_refusal(job_id, "cancelled", &msg)
        .await
    {
        Ok(0) => Reply::error(
            "conflict",
            format!(
                "job {job_id} is {}; only queued or waiting jobs can be cancelled",
                row.state
            ),
        ),
        Ok(_) => {
            daemon.wake(&row.target);
            tracing::info!(job_id = %job_id, user = %peer.user, "job cancelled");
            match daemon.queue().get(job_id).await {
                Ok(Some(r)) => Reply::job(r.view()),
                _ => Reply::ok(),
            }
        }
        Err(e) => internal(e),
    }
}

//! `status` and `wait`: a job as its peer may see it, and its outcome
//! once it ends (the result for its submitter only).

use std::time::Duration;

use super::super::peer::Peer;
use super::super::Daemon;
use super::{internal, not_found};
use crate::job::{Job, JobId, Outcome};
use crate::protocol::{Reply, ReplyKind};
use crate::time::unix_now;

/// A job's state.
pub(super) async fn status(daemon: &Daemon, peer: &Peer, job_id: &JobId) -> Reply {
    match daemon.queue().get(job_id).await {
        Ok(Some(j)) if peer.may_see(&daemon.config().access, &j) => Reply::job(for_peer(peer, j)),
        Ok(_) => not_found(job_id),
        Err(e) => internal(e),
    }
}

/// Waits for a job. Only this request's own wait is registered and
/// removed: another user's wait on the same id (ids show in `ps`) never
/// touches it.
pub(super) async fn wait(
    daemon: &Daemon,
    peer: &Peer,
    job_id: &JobId,
    timeout_s: Option<u64>,
) -> Reply {
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
    if let Some(by) = &outcome.evidence.client.approved_by {
        job.approved_by = Some(by.clone());
    }
    job.outcome = Some(outcome);
    Reply::job(job)
}

/// Waits for a registered job's outcome; the result goes to its submitter
/// only.
pub(super) async fn await_outcome(
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

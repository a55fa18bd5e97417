//! `submit` and `check`: the job a request names (target resolved, a
//! refusal preset when the peer may not run it), queued or only checked.

use super::super::peer::{denial, Peer};
use super::super::Daemon;
use super::internal;
use crate::job::{ErrorClass, Job, JobState, Mode, Refusal};
use crate::protocol::{JobSpec, Reply, ReplyKind, Submit};

/// Queues a job; with `wait`, answers once it ended (or the wait timed
/// out: the job goes on).
pub(super) async fn submit(daemon: &Daemon, peer: &Peer, r: Submit) -> Reply {
    if r.targets.is_some() {
        return super::rollout::submit(daemon, peer, r).await;
    }
    if r.strategy.is_some() {
        return Reply::error(
            ReplyKind::BadRequest,
            "--canary, --max-concurrency and --max-errors shape a rollout: give --targets too",
        );
    }
    let (wait, timeout_s) = (r.wait, r.timeout_s);
    let job = match new_job(daemon, peer, r.spec()) {
        Ok(job) => job,
        Err(reply) => return *reply,
    };
    // Registered before the job can run, so its result cannot slip by.
    let rx = wait.then(|| daemon.add_waiter(&job.job_id));
    let job_id = job.job_id.clone();
    let queued = match queue(daemon, peer, job).await {
        // A job that waits for approval is pinned to the plan it would
        // run now: that plan is what its approvers approve.
        Ok(job) if job.state == JobState::AwaitingApproval && job.plan_digest.is_none() => {
            Ok(super::approve::pin(daemon, job).await.unwrap_or_else(|(job, why)| {
                tracing::warn!(job_id = %job.job_id, cause = %why, "the plan of a job awaiting approval could not be pinned yet; approve pins it");
                job
            }))
        }
        other => other,
    };
    match (rx, queued) {
        (Some(rx), Ok(job)) if !job.state.is_terminal() => {
            let reply = super::wait::await_outcome(peer, job, rx, timeout_s).await;
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

/// Checks a job without queuing it: the params against the command's
/// specs too (the worker would refuse them with bad_params); nothing is
/// stored.
pub(super) fn check(daemon: &Daemon, peer: &Peer, spec: JobSpec) -> Reply {
    let job = match new_job(daemon, peer, spec) {
        Ok(job) => job,
        Err(reply) => return *reply,
    };
    if let Ok(cmd) = daemon.catalog().get(&job.command) {
        if let Err(e) = crate::params::validate(&cmd.name, &cmd.params, job.param_pairs()) {
            return Reply::error(ReplyKind::BadRequest, e.to_string());
        }
    }
    Reply::job(job)
}

/// The job a submit asks for: its target resolved, and a refusal preset
/// when the command is unknown or the peer may not run this mode (the
/// worker records it in the ledger).
pub(super) fn new_job(daemon: &Daemon, peer: &Peer, spec: JobSpec) -> Result<Job, Box<Reply>> {
    let JobSpec {
        command,
        mode,
        params,
        target,
        idempotency_key,
        plan_digest,
    } = spec;
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
    if let Some(d) = plan_digest.as_deref() {
        if mode != Mode::Apply || !crate::job::valid_plan_digest(d) {
            return Err(Box::new(Reply::error(
                ReplyKind::BadRequest,
                "--plan takes the 64-hex plan digest `govsql plan` printed, and only for apply",
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
    job.plan_digest = plan_digest;
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

async fn queue(daemon: &Daemon, peer: &Peer, job: Job) -> Result<Job, Box<Reply>> {
    match daemon.queue().submit(job).await {
        Ok(job) => {
            tracing::info!(job_id = %job.job_id, command = %job.command, mode = job.mode.as_str(), user = %peer.user, state = %job.state, "job submitted");
            daemon.wake(&job.target);
            Ok(job)
        }
        Err(e @ super::super::queue::QueueError::Commit(_)) => {
            tracing::error!(cause = %e, "submit refused: the queue cannot write");
            Err(Box::new(Reply::error(
                ReplyKind::Unavailable,
                format!("submits are refused while {e}; status and wait still work"),
            )))
        }
        Err(e) => Err(Box::new(internal(e))),
    }
}

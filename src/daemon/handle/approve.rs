//! `approve` and `reject`: an approver (in the approve list, not the
//! submitter) acts on a job that awaits approval.

use super::super::peer::Peer;
use super::super::Daemon;
use super::{internal, not_found};
use crate::job::{Approval, ErrorClass, Job, JobId, JobState};
use crate::protocol::{Reply, ReplyKind};
use crate::time::unix_now;

/// An approver's words: control characters out, at most 200 characters;
/// None when nothing is left.
pub(super) fn reason_text(reason: &str) -> Option<String> {
    let r: String = reason
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    (!r.trim().is_empty()).then_some(r)
}

/// How long pinning a job's plan may take before the submit answers
/// without it (approve pins it then).
const PIN_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Pins a job awaiting approval to the plan it would run now, and stores
/// the pin; the job as stored, or the job unchanged and why not.
pub(super) async fn pin(daemon: &Daemon, job: Job) -> Result<Job, (Job, String)> {
    let Some(rt) = daemon.runtime(&job.target) else {
        return Err((job, "its target is not configured".into()));
    };
    let pinned = match tokio::time::timeout(PIN_WITHIN, rt.pin(&job)).await {
        Ok(Ok(p)) => p,
        Ok(Err(why)) => return Err((job, why)),
        Err(_) => {
            return Err((
                job,
                format!("the target did not answer within {PIN_WITHIN:?}"),
            ))
        }
    };
    match daemon
        .queue()
        .pin(&job.job_id, &pinned.digest, &pinned.covers)
        .await
    {
        Ok(1) => match daemon.queue().get(&job.job_id).await {
            Ok(Some(j)) => Ok(j),
            _ => Err((job, "the pinned job could not be read back".into())),
        },
        Ok(_) => Err((job, "it no longer awaits approval".into())),
        Err(e) => Err((job, e.to_string())),
    }
}

/// Denied unless the peer is in the approve list.
pub(super) fn must_approve(daemon: &Daemon, peer: &Peer) -> Result<(), Reply> {
    if peer.admitted_by(&daemon.config().access.approve) {
        return Ok(());
    }
    Err(Reply::error(
        ReplyKind::Denied,
        format!(
            "user {} is not in the [access] approve list of the daemon's config",
            peer.user
        ),
    ))
}

/// The job an approver acts on: the peer must be in the approve list and
/// the job awaiting approval.
async fn awaiting_for_approver(daemon: &Daemon, peer: &Peer, job_id: &JobId) -> Result<Job, Reply> {
    must_approve(daemon, peer)?;
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

pub(super) async fn approve(
    daemon: &Daemon,
    peer: &Peer,
    job_id: &JobId,
    reason: Option<String>,
    plan: Option<String>,
) -> Reply {
    let reason = reason.as_deref().and_then(reason_text);
    let cfg = daemon.config();
    let mut row = match awaiting_for_approver(daemon, peer, job_id).await {
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
    // An approval approves a plan: the one the job was pinned to at
    // submit, or, when that could not be done then, the one it would run
    // now. An approver who names the plan they saw gets exactly that one.
    if row.mode == crate::job::Mode::Apply && row.plan_digest.is_none() {
        row = match pin(daemon, row).await {
            Ok(r) => r,
            Err((_, why)) => {
                return Reply::error(
                    ReplyKind::Unavailable,
                    format!("job {job_id} cannot be approved before its plan is pinned, and pinning it failed: {why}; try again"),
                )
            }
        };
    }
    if let Some(seen) = plan.as_deref() {
        if row.plan_digest.as_deref() != Some(seen) {
            return Reply::error(
                ReplyKind::Conflict,
                format!(
                    "job {job_id} is pinned to plan {}, not {seen}: run `govsql show {job_id}` again and approve what it shows",
                    row.plan_digest.as_deref().unwrap_or("(none)")
                ),
            );
        }
    }
    let needed = daemon
        .catalog()
        .get(&row.command)
        .map_or(1, |c| c.approvals_needed().max(1));
    let approval = Approval {
        by: peer.user.clone(),
        at: crate::time::utc_text(unix_now()),
        reason,
    };
    match daemon.queue().approve(job_id, approval, needed).await {
        Ok(row) => {
            tracing::info!(job_id = %job_id, approver = %peer.user, approvals = row.approvals.len(), needed, "job approved");
            daemon.wake(&row.target);
            Reply::job(row)
        }
        Err(e) => Reply::error(ReplyKind::Conflict, e.to_string()),
    }
}

/// Rejects a job that waits for approval: it ends refused (`rejected`),
/// the reason in its ledger row's evidence.
pub(super) async fn reject(daemon: &Daemon, peer: &Peer, job_id: &JobId, reason: &str) -> Reply {
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

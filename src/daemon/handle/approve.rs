//! `approve` and `reject`: an approver (in the approve list, not the
//! submitter) acts on a job that awaits approval.

use super::super::peer::Peer;
use super::super::Daemon;
use super::{internal, not_found};
use crate::job::{ErrorClass, Job, JobId, JobState};
use crate::protocol::{Reply, ReplyKind};
use crate::time::unix_now;

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

pub(super) async fn approve(
    daemon: &Daemon,
    peer: &Peer,
    job_id: &JobId,
    reason: Option<String>,
) -> Reply {
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

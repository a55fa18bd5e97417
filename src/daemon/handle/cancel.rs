//! `cancel`: the submitter, root or an admin ends a queued or waiting job
//! (it is refused `cancelled` in the ledger by its worker).

use super::super::peer::Peer;
use super::super::Daemon;
use super::{internal, not_found};
use crate::job::{ErrorClass, JobId};
use crate::protocol::{Reply, ReplyKind};

pub(super) async fn cancel(daemon: &Daemon, peer: &Peer, job_id: &JobId) -> Reply {
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

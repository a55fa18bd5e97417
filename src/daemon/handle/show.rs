//! `show`: what a job will run, param values included, for its submitter
//! or an approver before approving. Never logged.

use super::super::peer::Peer;
use super::super::Daemon;
use super::{internal, not_found};
use crate::job::{JobId, JobState};
use crate::protocol::{Reply, ReplyKind};

/// What a job will run, values included (never logged): for its
/// submitter, root, or an approver of a job awaiting that approver's
/// approval (not one they submitted). Anyone else is told the job is not
/// found, whether it exists or not.
pub(super) async fn show(daemon: &Daemon, peer: &Peer, job_id: &JobId) -> Reply {
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
    let (description, statements, needed) = match daemon.catalog().get(&row.command) {
        Ok(c) => (
            c.description.clone(),
            c.statements.clone(),
            if row.mode == crate::job::Mode::Apply {
                c.approvals_needed()
            } else {
                0
            },
        ),
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
        targets: Vec::new(),
        description,
        statements,
        params: row.param_pairs().to_vec(),
        plan_digest: row.plan_digest.clone(),
        plan_covers: row.plan_covers.clone(),
        approvals: row.approvals.clone(),
        approvals_required: needed,
    }))
}

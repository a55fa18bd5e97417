//! One handler per request. The socket (`server.rs`) reads a bounded line,
//! parses it into a [`Request`] and calls [`handle`]; its one exhaustive
//! match names each request's handler, one file each (a pair that shares
//! its checks shares a file: submit and check, status and wait, approve
//! and reject; a rollout's approve, reject and show go to `rollout`).
//! No handler touches the socket.

mod approve;
mod cancel;
mod list;
mod log;
mod rollout;
mod show;
mod submit;
mod wait;

use super::peer::Peer;
use super::Daemon;
use crate::job::JobId;
use crate::protocol::{Reply, ReplyKind, Request};
use crate::rollout::is_rollout_id;

/// Answers one request of a peer.
pub(super) async fn handle(daemon: &Daemon, peer: &Peer, req: Request) -> Reply {
    match req {
        Request::Submit(r) => submit::submit(daemon, peer, r).await,
        Request::Check(r) => submit::check(daemon, peer, r),
        Request::Status(r) => wait::status(daemon, peer, &r.job_id).await,
        Request::Wait(r) => wait::wait(daemon, peer, &r.job_id, r.timeout_s).await,
        Request::List(r) => list::list(daemon, peer, r).await,
        Request::Approve(r) if is_rollout_id(&r.job_id) => {
            rollout::approve(daemon, peer, &r.job_id, r.reason, r.plan).await
        }
        Request::Reject(r) if is_rollout_id(&r.job_id) => {
            rollout::reject(daemon, peer, &r.job_id, &r.reason).await
        }
        Request::Show(r) if is_rollout_id(&r.job_id) => {
            rollout::show(daemon, peer, &r.job_id).await
        }
        Request::Approve(r) => approve::approve(daemon, peer, &r.job_id, r.reason, r.plan).await,
        Request::Reject(r) => approve::reject(daemon, peer, &r.job_id, &r.reason).await,
        Request::Show(r) => show::show(daemon, peer, &r.job_id).await,
        Request::Cancel(r) => cancel::cancel(daemon, peer, &r.job_id).await,
        Request::Log(r) => log::log(daemon, peer, r).await,
        Request::Rollouts(r) => rollout::list(daemon, peer, r.limit).await,
        Request::RolloutStatus(r) => rollout::status(daemon, peer, &r.rollout_id).await,
        Request::RolloutResume(r) => rollout::change(daemon, peer, &r.rollout_id, true).await,
        Request::RolloutCancel(r) => rollout::change(daemon, peer, &r.rollout_id, false).await,
        Request::Metrics {} => Reply::Metrics(daemon.metrics_text().await),
        Request::Health {} => match daemon.health().await {
            Ok(h) => Reply::Health(Box::new(h)),
            Err(e) => internal(e),
        },
    }
}

pub(super) fn not_found(job_id: &JobId) -> Reply {
    Reply::error(
        ReplyKind::NotFound,
        format!("no job {job_id}; `govsql jobs` lists recent jobs"),
    )
}

pub(super) fn internal(e: impl std::fmt::Display) -> Reply {
    tracing::error!(cause = %e, "request failed");
    Reply::error(
        ReplyKind::Internal,
        format!("the daemon could not do that: {e}"),
    )
}

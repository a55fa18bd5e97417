//! `list` (and `approvals`): a page of the jobs a peer may see, newest
//! first, never with results.

use super::super::peer::Peer;
use super::super::server::MAX_LIST;
use super::super::Daemon;
use super::internal;
use crate::protocol::{ListJobs, Reply};

/// A page of jobs.
pub(super) async fn list(daemon: &Daemon, peer: &Peer, r: ListJobs) -> Reply {
    let ListJobs {
        limit,
        page,
        filter,
    } = r;
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

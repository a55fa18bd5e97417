//! `log`: a target's ledger through the daemon, on the target's read
//! lane (admins read it all; anyone else their own rows).

use super::super::peer::Peer;
use super::super::server::MAX_READS_PER_UID;
use super::super::Daemon;
use crate::protocol::{ReadLog, Reply, ReplyKind};

/// Ledger rows, newest first.
pub(super) async fn log(daemon: &Daemon, peer: &Peer, r: ReadLog) -> Reply {
    let ReadLog {
        target,
        mut filter,
        limit,
    } = r;
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

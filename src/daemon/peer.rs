//! Who is on the other end of the socket, and what they may do. The uid
//! and gid come from SO_PEERCRED; `@group` entries match the peer's
//! supplementary groups too (getgrouplist). The actor written to the
//! ledger is this user, never a name the client sends. Look-ups are kept
//! for [`PEER_TTL`].

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::unistd::{getgrouplist, Gid, Group, Uid, User};

use crate::config::AccessConfig;
use crate::job::Mode;

/// How long a uid's look-up answer is kept: a user added to or removed
/// from a group is seen within this time.
pub const PEER_TTL: Duration = Duration::from_secs(5);

/// Peers looked up recently, by (uid, gid): a user's connection churn
/// costs one NSS look-up every [`PEER_TTL`], not one per connection.
#[derive(Default)]
pub struct PeerCache {
    seen: Mutex<HashMap<(u32, u32), (Peer, Instant)>>,
}

impl PeerCache {
    /// The peer of these ids, looked up off the async runtime when not
    /// known or older than [`PEER_TTL`]. None when the look-up task failed.
    pub async fn get(&self, uid: u32, gid: u32) -> Option<Peer> {
        {
            let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((peer, at)) = seen.get(&(uid, gid)) {
                if at.elapsed() < PEER_TTL {
                    return Some(peer.clone());
                }
            }
        }
        let peer = tokio::task::spawn_blocking(move || Peer::from_ids(uid, gid))
            .await
            .ok()?;
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() > 4096 {
            seen.retain(|_, (_, at)| at.elapsed() < PEER_TTL);
        }
        seen.insert((uid, gid), (peer.clone(), Instant::now()));
        Some(peer)
    }
}

/// The peer of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its uid.
    pub uid: u32,
    /// Its user name (or `uid<N>` when it has none).
    pub user: String,
    /// Names of its primary and supplementary groups.
    pub groups: Vec<String>,
}

impl Peer {
    /// The peer with this uid and primary gid.
    pub fn from_ids(uid: u32, gid: u32) -> Peer {
        let user = User::from_uid(Uid::from_raw(uid)).ok().flatten();
        let name = user
            .as_ref()
            .map(|u| u.name.clone())
            .unwrap_or_else(|| format!("uid{uid}"));
        let mut gids = vec![Gid::from_raw(gid)];
        if let Some(u) = &user {
            if let Ok(cname) = CString::new(u.name.clone()) {
                if let Ok(list) = getgrouplist(&cname, Gid::from_raw(gid)) {
                    gids.extend(list);
                }
            }
        }
        let mut groups: Vec<String> = gids
            .into_iter()
            .filter_map(|g| Group::from_gid(g).ok().flatten().map(|g| g.name))
            .collect();
        groups.sort();
        groups.dedup();
        Peer {
            uid,
            user: name,
            groups,
        }
    }

    /// Whether an access list admits this peer.
    pub fn admitted_by(&self, list: &[String]) -> bool {
        list.iter().any(|entry| {
            entry == "*"
                || entry == &self.user
                || entry
                    .strip_prefix('@')
                    .is_some_and(|g| self.groups.iter().any(|mine| mine == g))
        })
    }
}

impl Peer {
    /// Whether this peer may see `job`: its own, every job for root and
    /// `[access] admin`, and jobs waiting for approval for approvers.
    pub fn may_see(&self, access: &AccessConfig, job: &crate::job::Job) -> bool {
        self.uid == 0
            || job.actor_uid == self.uid
            || self.admitted_by(&access.admin)
            || (job.state == crate::job::JobState::AwaitingApproval
                && self.admitted_by(&access.approve))
    }
}

/// Which `[access]` list governs a mode.
pub fn list_for(access: &AccessConfig, mode: Mode) -> (&'static str, &[String]) {
    match mode {
        Mode::Plan => ("plan", &access.plan),
        Mode::Apply => ("apply", &access.apply),
        Mode::Verify => ("verify", &access.verify),
    }
}

/// Why `peer` may not submit `mode`, or None if it may.
pub fn denial(access: &AccessConfig, peer: &Peer, mode: Mode) -> Option<String> {
    let (name, list) = list_for(access, mode);
    if peer.admitted_by(list) {
        None
    } else {
        Some(format!(
            "user {} is not in the [access] {name} list of the daemon's config (add the user or one of its groups as @group)",
            peer.user
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_match_users_groups_and_star() {
        let p = Peer {
            uid: 1000,
            user: "alice".into(),
            groups: vec!["ops".into(), "wheel".into()],
        };
        assert!(p.admitted_by(&["alice".into()]));
        assert!(p.admitted_by(&["@ops".into()]));
        assert!(p.admitted_by(&["*".into()]));
        assert!(!p.admitted_by(&["bob".into(), "@dba".into()]));
        assert!(!p.admitted_by(&[]));
        let access = AccessConfig {
            apply: vec!["@dba".into()],
            ..AccessConfig::default()
        };
        let why = denial(&access, &p, Mode::Apply).unwrap();
        assert!(why.contains("alice") && why.contains("apply"), "{why}");
    }

    #[test]
    fn root_resolves_with_its_groups() {
        let p = Peer::from_ids(0, 0);
        assert_eq!(p.user, "root");
        assert!(p.groups.contains(&"root".to_string()));
    }
}

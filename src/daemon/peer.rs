//! Who is on the other end of the socket, and what they may do. The uid
//! and gid come from SO_PEERCRED; `@group` entries match the peer's
//! supplementary groups too (getgrouplist). The actor written to the
//! ledger is this user, never a name the client sends.

use std::ffi::CString;

use nix::unistd::{getgrouplist, Gid, Group, Uid, User};

use crate::config::AccessConfig;
use crate::job::Mode;

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

//! The local apply switch (kill switch): a file in the state directory,
//! default off, re-read at every apply job. `govsql switch on [--for DUR |
//! --once] | off | status`.
//!
//! Scoped, as the seed's first-run package asks: `--for 30m` turns itself
//! off when the time is up, `--once` lets exactly one apply through
//! (whatever its outcome) and the daemon's `disarm_on_failure` turns it
//! off at any failed apply. Every change is logged with who and why, and
//! written with fsync and rename (never through a symlink), owned by the
//! state directory's owner (the daemon's service user) even when root
//! writes it. Reading fails closed: a missing or unexpected file means off,
//! and a file that cannot be read refuses applies too but is reported as
//! "unreadable: …", never as "off", so nobody is told to turn on a switch
//! that is already on.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::time::unix_now;

/// The switch file's name inside the state directory.
pub const SWITCH_FILE: &str = "apply_switch";

/// A switch error.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    /// The switch file could not be written.
    #[error(
        "cannot write the apply switch {path}: {source} (switch needs write access to state_dir: run it as root or as the daemon's service user)"
    )]
    Write {
        /// The switch file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// How long the switch stays on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Until turned off.
    Open,
    /// Until this unix time.
    Until(i64),
    /// For the next apply only.
    Once,
}

/// What the switch file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Off (or expired).
    Off,
    /// On, with its scope.
    On(Scope),
    /// The file could not be read (why, with its path): applies are
    /// refused, and the refusal says so.
    Unreadable(String),
}

impl State {
    /// Whether an apply may pass now.
    pub fn allows_apply(&self) -> bool {
        matches!(self, State::On(_))
    }

    /// One line for `switch status`, health and self-test.
    pub fn describe(&self) -> String {
        match self {
            State::Off => "off (applies are refused)".into(),
            State::On(Scope::Open) => "on".into(),
            State::On(Scope::Until(t)) => {
                format!("on for {} s more (until unix time {t})", t - unix_now())
            }
            State::On(Scope::Once) => "on for the next apply only".into(),
            State::Unreadable(why) => format!("unreadable: {why}; applies are refused"),
        }
    }
}

/// Serializes the read-and-consume of a `--once` switch in this process,
/// so two concurrent applies cannot both pass it.
static CONSUME: Mutex<()> = Mutex::new(());

/// The local apply switch of one state directory.
#[derive(Debug, Clone)]
pub struct ApplySwitch {
    path: PathBuf,
}

impl ApplySwitch {
    /// The switch of `state_dir`.
    pub fn new(state_dir: &Path) -> ApplySwitch {
        ApplySwitch {
            path: state_dir.join(SWITCH_FILE),
        }
    }

    /// What the file says now (an expired `--for` reads as off).
    pub fn state(&self) -> State {
        let text = match read_no_follow(&self.path) {
            Ok((_, owner)) if !self.owner_can_read(owner) => {
                return State::Unreadable(format!(
                    "{} is owned by uid {owner}, not by the state directory's owner, so the daemon cannot read it (write it again with `govsql switch on|off`)",
                    self.path.display()
                ))
            }
            Ok((t, _)) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return State::Off,
            Err(e) => {
                return State::Unreadable(format!(
                    "{}: {e} (write it again with `govsql switch on|off` as root or the daemon's service user: it is then owned by the state directory's owner)",
                    self.path.display()
                ))
            }
        };
        let mut lines = text.lines();
        if lines.next().map(str::trim) != Some("on") {
            return State::Off;
        }
        let mut scope = Scope::Open;
        for line in lines {
            match line.split_once(' ') {
                Some(("until", t)) => match t.trim().parse::<i64>() {
                    Ok(t) if t > unix_now() => scope = Scope::Until(t),
                    _ => return State::Off,
                },
                None if line.trim() == "once" => scope = Scope::Once,
                _ => {}
            }
        }
        State::On(scope)
    }

    /// Whether the daemon (the state directory's owner) can read a switch
    /// file owned by `owner`: root reads any file, so root checks for the
    /// daemon; anyone else just read it.
    fn owner_can_read(&self, owner: u32) -> bool {
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::geteuid().is_root() {
            return true;
        }
        let dir_owner = self
            .path
            .parent()
            .and_then(|d| std::fs::metadata(d).ok())
            .map_or(0, |m| m.uid());
        dir_owner == 0 || dir_owner == owner
    }

    /// Whether applies are allowed. Fails closed.
    pub fn is_on(&self) -> bool {
        self.state().allows_apply()
    }

    /// Lets one apply through if the switch allows it; a `--once` switch
    /// is turned off in the same step, so exactly one apply passes it.
    pub fn admit_apply(&self, job: &str) -> bool {
        let _guard = CONSUME.lock().unwrap_or_else(|p| p.into_inner());
        match self.state() {
            State::On(Scope::Once) => {
                if let Err(e) = self.write(State::Off, "govsql", &format!("used once by job {job}"))
                {
                    tracing::error!(cause = %e, "cannot turn the once-only apply switch off; refusing");
                    return false;
                }
                true
            }
            s => s.allows_apply(),
        }
    }

    /// Turns the switch on (with a scope) or off, logging who and why.
    pub fn set(&self, on: bool) -> Result<(), SwitchError> {
        let state = if on {
            State::On(Scope::Open)
        } else {
            State::Off
        };
        self.write(state, &crate::job::effective_user(), "set by hand")
    }

    /// Turns the switch on for a while.
    pub fn set_for(&self, how_long: Duration, who: &str) -> Result<(), SwitchError> {
        let until = unix_now() + how_long.as_secs().max(1) as i64;
        self.write(State::On(Scope::Until(until)), who, "on for a while")
    }

    /// Writes a state (fsync, then rename over the old file).
    pub fn write(&self, state: State, who: &str, why: &str) -> Result<(), SwitchError> {
        let err = |source| SwitchError::Write {
            path: self.path.clone(),
            source,
        };
        let body = match &state {
            State::On(Scope::Open) => "on\n".to_string(),
            State::On(Scope::Until(t)) => format!("on\nuntil {t}\n"),
            State::On(Scope::Once) => "on\nonce\n".to_string(),
            State::Off | State::Unreadable(_) => "off\n".to_string(),
        };
        let body = format!("{body}by {who}\nat {}\n", unix_now());
        if let Some(dir) = self.path.parent() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(err)?;
        }
        let tmp = self.path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(err)?;
        give_to_dir_owner(&f, self.path.parent()).map_err(err)?;
        f.write_all(body.as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, &self.path).map_err(err)?;
        if let Some(dir) = self.path.parent() {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        tracing::warn!(switch = %state.describe(), by = who, why, "apply switch changed");
        Ok(())
    }
}

impl ApplySwitch {
    /// The refusal of an apply when the switch file cannot be read (the
    /// daemon presets it on the job, so the ledger and the operator read
    /// "unreadable", not "off"); None when the file reads as on or off.
    pub fn unreadable_refusal(&self) -> Option<crate::job::Refusal> {
        match self.state() {
            State::Unreadable(why) => Some(crate::job::Refusal {
                class: crate::job::ErrorClass::KillSwitch,
                message: format!("the local apply switch is unreadable: {why}"),
            }),
            _ => None,
        }
    }
}

/// Run as root, gives a new switch file to the owner of its directory
/// (the daemon's service user under systemd, who must read it); run as
/// anyone else, the file is already the writer's, who owns the directory.
fn give_to_dir_owner(f: &std::fs::File, dir: Option<&Path>) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let Some(dir) = dir else { return Ok(()) };
    let meta = std::fs::metadata(dir)?;
    if meta.uid() == 0 && meta.gid() == 0 {
        return Ok(());
    }
    std::os::unix::fs::fchown(f, Some(meta.uid()), Some(meta.gid()))
}

/// Reads a file without following a symlink at its last component.
/// Answers its text and its owner's uid.
fn read_no_follow(path: &Path) -> std::io::Result<(String, u32)> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)?;
    let owner = f.metadata()?.uid();
    let mut s = String::new();
    f.take(4096).read_to_string(&mut s)?;
    Ok((s, owner))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_defaults_off_and_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let s = ApplySwitch::new(dir.path());
        assert!(!s.is_on());
        s.set(true).unwrap();
        assert!(s.is_on());
        std::fs::write(dir.path().join(SWITCH_FILE), "yes").unwrap();
        assert!(!s.is_on());
        s.set(false).unwrap();
        assert!(!s.is_on());
    }

    #[test]
    fn scoped_switches_end_by_themselves() {
        let dir = tempfile::tempdir().unwrap();
        let s = ApplySwitch::new(dir.path());
        s.set_for(Duration::from_secs(60), "tester").unwrap();
        assert!(matches!(s.state(), State::On(Scope::Until(_))));
        assert!(s.admit_apply("a") && s.admit_apply("b"));
        // An expired window reads as off.
        std::fs::write(dir.path().join(SWITCH_FILE), "on\nuntil 1\n").unwrap();
        assert_eq!(s.state(), State::Off);
        // Once: exactly one apply passes.
        s.write(State::On(Scope::Once), "tester", "test").unwrap();
        assert!(s.admit_apply("first"));
        assert!(!s.admit_apply("second"));
        assert_eq!(s.state(), State::Off);
    }

    #[test]
    fn a_symlinked_switch_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "on\n").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join(SWITCH_FILE)).unwrap();
        let s = ApplySwitch::new(dir.path());
        assert!(matches!(s.state(), State::Unreadable(_)));
        assert!(s.state().describe().starts_with("unreadable: "));
        let refusal = s.unreadable_refusal().expect("a refusal");
        assert!(refusal
            .message
            .starts_with("the local apply switch is unreadable: "));
        assert!(!s.is_on());
    }

    #[test]
    fn a_switch_written_by_root_belongs_to_the_state_dirs_owner() {
        use std::os::unix::fs::MetadataExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (scripts/test runs as root)");
            return;
        }
        let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::chown(
            dir.path(),
            Some(nobody.uid.as_raw()),
            Some(nobody.gid.as_raw()),
        )
        .unwrap();
        let s = ApplySwitch::new(dir.path());
        s.set(true).unwrap();
        let meta = std::fs::metadata(dir.path().join(SWITCH_FILE)).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid()),
            (nobody.uid.as_raw(), nobody.gid.as_raw())
        );
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert!(s.is_on());
        // A file root left behind (an older govsql) is reported as what it
        // is to the daemon: unreadable, not on.
        std::fs::remove_file(dir.path().join(SWITCH_FILE)).unwrap();
        std::fs::write(dir.path().join(SWITCH_FILE), "on\n").unwrap();
        let state = s.state();
        assert!(matches!(state, State::Unreadable(_)), "{state:?}");
        assert!(state
            .describe()
            .contains("not by the state directory's owner"));
    }
}

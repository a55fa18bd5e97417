//! `self-test` run by root checks what the daemon's service user can do:
//! the daemon runs as the owner of its state directory (`User=` of the
//! unit), so root re-runs the checks as that user, with its groups, and
//! sees what the daemon would see (a config it cannot read, a state
//! directory or switch file that is not its own, a key it cannot open).

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;

use nix::unistd::{Uid, User};

use crate::job::ExitCode;

/// The user the checks must run as instead of root: the owner of the
/// state directory when it is not root. None when not run as root, or
/// when the state directory does not exist yet or belongs to root.
pub(super) fn service_user(state_dir: &Path) -> Option<User> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let meta = std::fs::metadata(state_dir).ok()?;
    if meta.uid() == 0 {
        return None;
    }
    User::from_uid(Uid::from_raw(meta.uid())).ok().flatten()
}

/// Runs `govsql self-test` again as `user` (its primary and supplementary
/// groups too, from `/` as its working directory) and answers its exit
/// status.
pub(super) fn self_test_as(user: &User, config_path: &Path) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe()?;
    let config = std::path::absolute(config_path)?;
    out!(
        "--   self-test as the daemon's service user {} (uid {}, the owner of the state directory), as the daemon would run",
        user.name,
        user.uid
    );
    let name = std::ffi::CString::new(user.name.clone())?;
    let (uid, gid) = (user.uid, user.gid);
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--config")
        .arg(&config)
        .arg("self-test")
        .current_dir("/");
    // SAFETY: only async-signal-safe calls (initgroups, setgid, setuid)
    // between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::initgroups(&name, gid)?;
            nix::unistd::setgid(gid)?;
            nix::unistd::setuid(uid)?;
            Ok(())
        });
    }
    let status = cmd.status()?;
    Ok(match status.code() {
        Some(0) => ExitCode::Ok,
        Some(2) => ExitCode::Usage,
        Some(3) => ExitCode::Refused,
        Some(4) => ExitCode::Failed,
        Some(5) => ExitCode::Pending,
        _ => ExitCode::Error,
    })
}

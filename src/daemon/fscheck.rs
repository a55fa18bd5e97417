//! The daemon's directories must be its own: the state directory (queue,
//! lock, switch) and the socket's directory, and every file in them, owned
//! by the service user, not writable by group or others, and not a
//! symlink. Otherwise another local user could read queued values or
//! forge jobs, so the daemon refuses to start and says why; `self-test`
//! runs the same check.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Why a directory or file is not private enough.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {problem}; fix it (chown to the service user, chmod go-w, no symlinks) and start again")]
pub struct NotPrivate {
    /// The offending path.
    pub path: PathBuf,
    /// What is wrong with it.
    pub problem: String,
}

/// Checks `dir` (if it exists) and the files directly in it. Sockets may
/// be group-writable (that is how `socket_mode` grants access).
pub fn check_private(dir: &Path) -> Result<(), NotPrivate> {
    let euid = nix::unistd::geteuid().as_raw();
    let bad = |path: &Path, problem: String| NotPrivate {
        path: path.to_path_buf(),
        problem,
    };
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(bad(dir, format!("cannot be examined: {e}"))),
    };
    check_one(&meta, euid, true).map_err(|p| bad(dir, p))?;
    let entries = std::fs::read_dir(dir).map_err(|e| bad(dir, format!("cannot be read: {e}")))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.file_type().is_socket() {
            continue;
        }
        check_one(&meta, euid, false).map_err(|p| bad(&path, p))?;
    }
    Ok(())
}

fn check_one(meta: &std::fs::Metadata, euid: u32, is_dir: bool) -> Result<(), String> {
    if meta.file_type().is_symlink() {
        return Err("is a symlink".into());
    }
    if is_dir && !meta.is_dir() {
        return Err("is not a directory".into());
    }
    if meta.uid() != euid {
        return Err(format!(
            "is owned by uid {}, not by the daemon's user (uid {euid})",
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "is writable by group or others (mode {:04o})",
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn open_modes_and_symlinks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(d.join("queue.db"), b"x").unwrap();
        std::fs::set_permissions(d.join("queue.db"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        check_private(d).unwrap();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(check_private(d)
            .unwrap_err()
            .to_string()
            .contains("writable by group or others"));
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.join("apply_switch")).unwrap();
        assert!(check_private(d)
            .unwrap_err()
            .to_string()
            .contains("symlink"));
        assert!(check_private(&d.join("missing")).is_ok());
    }
}

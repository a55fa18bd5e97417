//! The local apply switch (kill switch): a file in the state directory,
//! default off, re-read at every apply job. `govsql switch on|off|status`.

use std::path::{Path, PathBuf};

/// The switch file's name inside the state directory.
pub const SWITCH_FILE: &str = "apply_switch";

/// A switch error.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    /// The switch file could not be written.
    #[error(
        "cannot write the apply switch {path}: {source} (switch needs write access to state_dir)"
    )]
    Write {
        /// The switch file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

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

    /// Whether applies are allowed. Fails closed: a missing, unreadable or
    /// unexpected file means off.
    pub fn is_on(&self) -> bool {
        std::fs::read_to_string(&self.path)
            .map(|s| s.trim() == "on")
            .unwrap_or(false)
    }

    /// Turns the switch on or off (written atomically).
    pub fn set(&self, on: bool) -> Result<(), SwitchError> {
        let err = |source| SwitchError::Write {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, if on { "on\n" } else { "off\n" }).map_err(err)?;
        std::fs::rename(&tmp, &self.path).map_err(err)?;
        Ok(())
    }
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
}

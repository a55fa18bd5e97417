//! `govsql remote-gate`: the database host's side of the governed door.
//! Placed in `authorized_keys` as `command="govsql remote-gate …",restrict`,
//! it runs for every SSH command of that key. It accepts only the exact
//! psql command lines govsql builds for this target (runtime role; the
//! admin role only when `--admin-user` is given, for a separate key) and
//! execs psql without a shell; anything else runs nothing, exits 1 with a
//! message on stderr, and leaves a line in the system log.

use std::os::unix::process::CommandExt;

use super::*;
use crate::psql::{command_line, PsqlLine};

/// The flags of `remote-gate`, as DESIGN.md gives them.
#[derive(Debug, Args)]
pub struct GateArgs {
    /// The psql binary (the real one, not a wrapper).
    #[arg(long)]
    psql: String,
    /// psql's -h (a socket directory or host).
    #[arg(long)]
    db_host: Option<String>,
    /// psql's -p.
    #[arg(long)]
    db_port: u16,
    /// psql's -d.
    #[arg(long)]
    db_name: String,
    /// The runtime role (psql's -U for jobs).
    #[arg(long)]
    db_user: String,
    /// Also accept the admin role's line (for migrate's own key only).
    #[arg(long)]
    admin_user: Option<String>,
    /// psql runs through `docker exec -i CONTAINER`.
    #[arg(long)]
    container: Option<String>,
}

impl GateArgs {
    /// The command lines this key may run, with their words.
    fn allowed(&self) -> Vec<(String, Vec<String>)> {
        let line = |user: &str| PsqlLine {
            psql: self.psql.clone(),
            container: self.container.clone().filter(|c| !c.is_empty()),
            db_host: self.db_host.clone(),
            db_port: self.db_port,
            db_name: self.db_name.clone(),
            db_user: user.to_string(),
        };
        std::iter::once(&self.db_user)
            .chain(self.admin_user.as_ref())
            .map(|u| {
                let words = line(u).words();
                (command_line(&words), words)
            })
            .collect()
    }
}

/// Runs the gate: execs psql for an accepted command, or refuses.
pub(super) fn remote_gate(a: &GateArgs) -> ExitCode {
    let asked = std::env::var("SSH_ORIGINAL_COMMAND").unwrap_or_default();
    let Some((_, words)) = a.allowed().into_iter().find(|(line, _)| *line == asked) else {
        let shown: String = asked
            .chars()
            .take(120)
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        let msg = format!(
            "remote-gate: refused a command that is not govsql's psql line for this key ({} bytes: {shown})",
            asked.len()
        );
        syslog(&msg);
        eprintln!("govsql {msg}; nothing was run");
        return ExitCode::Refused;
    };
    let err = std::process::Command::new(&words[0])
        .args(&words[1..])
        .exec();
    let msg = format!("remote-gate: cannot run {}: {err}", words[0]);
    syslog(&msg);
    eprintln!("govsql {msg}");
    ExitCode::Error
}

/// One line in the system log (auth facility), best effort.
fn syslog(msg: &str) {
    let (Ok(ident), Ok(text)) = (
        std::ffi::CString::new("govsql-remote-gate"),
        std::ffi::CString::new(msg.replace('\0', "?")),
    ) else {
        return;
    };
    // SAFETY: plain libc calls with NUL-terminated strings that outlive
    // them; the format string is a constant "%s".
    unsafe {
        nix::libc::openlog(ident.as_ptr(), nix::libc::LOG_PID, nix::libc::LOG_AUTH);
        nix::libc::syslog(nix::libc::LOG_WARNING, c"%s".as_ptr(), text.as_ptr());
        nix::libc::closelog();
    }
}

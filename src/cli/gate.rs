//! `govsql remote-gate`: the database host's side of the governed door.
//! Placed in `authorized_keys` as `command="govsql remote-gate …",restrict`,
//! it runs for every SSH command of that key. It accepts only the exact
//! psql command lines govsql builds for this target (runtime role; the
//! admin role only when `--admin-user` is given, for a separate key); then
//! [`crate::gate`] runs psql behind its two walls (the script grammar and
//! the kernel's Landlock). Anything else runs nothing, exits 1 with a
//! message on stderr, and leaves a line in the system log.

use super::*;
use crate::gate::{syslog, Door, Grammar};
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
    /// Print which walls are up on this host (grammar, Landlock,
    /// no_new_privs), proving them, and exit.
    #[arg(long)]
    check: bool,
    /// Test builds only: pass stdin unchecked (proves the kernel wall
    /// alone).
    #[cfg(debug_assertions)]
    #[arg(long, hide = true)]
    test_no_grammar: bool,
    /// Test builds only: no kernel wall (proves the grammar alone).
    #[cfg(debug_assertions)]
    #[arg(long, hide = true)]
    test_no_kernel_wall: bool,
}

impl GateArgs {
    /// The command lines this key may run, with their words and role.
    fn allowed(&self) -> Vec<(String, Vec<String>, Grammar, String)> {
        let line = |user: &str| PsqlLine {
            psql: self.psql.clone(),
            container: self.container.clone().filter(|c| !c.is_empty()),
            db_host: self.db_host.clone(),
            db_port: self.db_port,
            db_name: self.db_name.clone(),
            db_user: user.to_string(),
        };
        std::iter::once((&self.db_user, Grammar::Runtime))
            .chain(self.admin_user.as_ref().map(|a| (a, Grammar::Admin)))
            .map(|(u, g)| {
                let words = line(u).words();
                (command_line(&words), words, g, u.clone())
            })
            .collect()
    }

    fn door(&self, words: Vec<String>, grammar: Grammar, role: String) -> Door {
        Door {
            words,
            grammar,
            role,
            socket_dir: self
                .db_host
                .as_deref()
                .filter(|h| h.starts_with('/'))
                .map(std::path::PathBuf::from),
        }
    }

    #[cfg(debug_assertions)]
    fn test_walls(&self) -> (bool, bool) {
        (!self.test_no_grammar, !self.test_no_kernel_wall)
    }

    #[cfg(not(debug_assertions))]
    fn test_walls(&self) -> (bool, bool) {
        (true, true)
    }
}

/// `--check`: the walls this host puts up, proven in this process.
fn check(a: &GateArgs) -> ExitCode {
    let (_, words, grammar, role) = a.allowed().remove(0);
    let (walls, proofs) = crate::gate::check_walls(&a.door(words, grammar, role));
    out!(
        "grammar: on (script format {}; runtime role: the closed set of govsql's script lines{})",
        crate::grammar::VERSION,
        if a.admin_user.is_some() {
            "; admin role: SQL lexed conservatively plus meta-commands that never reach the OS"
        } else {
            ""
        }
    );
    out!(
        "landlock: {} (kernel ABI {})",
        walls.landlock,
        walls
            .landlock_abi
            .map(|v| v.to_string())
            .unwrap_or_else(|| "none".into())
    );
    out!(
        "no_new_privs: {}",
        if walls.no_new_privs { "on" } else { "OFF" }
    );
    for p in &proofs {
        out!("  {p}");
    }
    let proven = walls.landlock.starts_with("fully")
        && walls.no_new_privs
        && proofs
            .iter()
            .all(|p| !p.starts_with("NOT") && !p.starts_with("DOES"));
    if proven {
        ExitCode::Ok
    } else {
        ExitCode::Failed
    }
}

/// Runs the gate: psql behind the walls for an accepted command, or a
/// refusal.
pub(super) fn remote_gate(a: &GateArgs) -> ExitCode {
    if a.check {
        return check(a);
    }
    let asked = std::env::var("SSH_ORIGINAL_COMMAND").unwrap_or_default();
    let Some((_, words, grammar, role)) = a.allowed().into_iter().find(|(line, ..)| *line == asked)
    else {
        let shown: String = asked
            .chars()
            .take(120)
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        let msg = format!(
            "remote-gate: refused a command that is not govsql's psql line for this key ({} bytes: {shown})",
            asked.len()
        );
        syslog(nix::libc::LOG_WARNING, &msg);
        eprintln!("govsql {msg}; nothing was run");
        return ExitCode::Refused;
    };
    let (check_grammar, kernel_wall) = a.test_walls();
    crate::gate::serve(&a.door(words, grammar, role), check_grammar, kernel_wall)
}

//! `govsql remote-gate`'s engine, on the database host: a filter between
//! the SSH channel and psql, never a launcher that hands the channel over.
//!
//! Two walls, each meant to hold on its own:
//!
//! 1. **What psql is given.** psql is spawned here (no shell, the exact
//!    words of the accepted command line) with stdin a pipe. The channel's
//!    bytes reach that pipe only after the [`crate::grammar`] checker
//!    accepted them: for the runtime role, unit by unit (a job's script, a
//!    session's reset), so session mode keeps its speed; for the admin
//!    role, the whole script before any of it. Anything else stops psql
//!    before it read the refused unit, leaves a system-log line (auth
//!    facility) naming the role and an md5 of the refused line, never the
//!    bytes, and exits [`crate::grammar::REFUSED_EXIT`].
//! 2. **What psql can do.** Where the kernel has Landlock, the gate and
//!    its psql run under no_new_privs and a ruleset that lets them execute
//!    only psql (and its ELF interpreter), write or create no file, and
//!    read only where psql needs to: the system's libraries and `/etc`,
//!    `/dev`, and the socket directory.
//!
//! The gate announces its script format on stdout before psql starts
//! ([`crate::grammar::hello_line`]).

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::grammar::{self, RuntimeChecker};

/// Which grammar stdin is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grammar {
    /// The daemon's key: the runtime role's closed set of lines.
    Runtime,
    /// migrate's key: SQL lexed conservatively plus an allow-list.
    Admin,
}

/// What the kernel wall came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Walls {
    /// The Landlock ABI the kernel offers, if any.
    pub landlock_abi: Option<i32>,
    /// Whether the ruleset is enforced ("fully", "partially", or why not).
    pub landlock: String,
    /// Whether no_new_privs is set.
    pub no_new_privs: bool,
}

/// What the gate needs to run psql for one accepted command line.
#[derive(Debug, Clone)]
pub struct Door {
    /// psql's words (the first is the program).
    pub words: Vec<String>,
    /// The grammar stdin is held to.
    pub grammar: Grammar,
    /// The role the line connects as (for the system log).
    pub role: String,
    /// psql's `-h`, when it is a socket directory.
    pub socket_dir: Option<PathBuf>,
}

/// The Landlock ABI the running kernel offers (the crate's own probe).
fn landlock_abi() -> Option<i32> {
    // SAFETY: landlock_create_ruleset(NULL, 0, VERSION) only queries.
    let v = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32, // LANDLOCK_CREATE_RULESET_VERSION
        )
    };
    (v > 0).then_some(v as i32)
}

/// The ELF interpreter a binary names (PT_INTERP), for the execute rule:
/// the kernel opens it for execution too.
fn elf_interpreter(binary: &Path) -> Option<PathBuf> {
    let data = std::fs::read(binary).ok()?;
    if data.get(..4)? != b"\x7fELF" || data.get(4)? != &2 || data.get(5)? != &1 {
        return None; // only 64-bit little-endian is read
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(data.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(data.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(data.get(o..o + 8)?.try_into().ok()?));
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    (0..phnum).find_map(|i| {
        let ph = phoff + i * phentsize;
        if u32_at(ph)? != 3 {
            return None; // not PT_INTERP
        }
        let off = usize::try_from(u64_at(ph + 8)?).ok()?;
        let size = usize::try_from(u64_at(ph + 32)?).ok()?;
        let raw = data.get(off..off + size)?;
        let raw = raw.strip_suffix(b"\0").unwrap_or(raw);
        Some(PathBuf::from(std::str::from_utf8(raw).ok()?))
    })
}

/// Puts this process (and what it spawns) behind the kernel wall: execute
/// only `program` (and its interpreter), write nothing, read only system
/// paths and `socket_dir`. Best effort: a kernel without Landlock leaves
/// the first wall alone, and the returned [`Walls`] says so.
pub fn raise_kernel_wall(program: &Path, socket_dir: Option<&Path>) -> Walls {
    use landlock::{
        path_beneath_rules, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr,
        RulesetStatus, ABI,
    };
    let abi = ABI::V5;
    let program = std::fs::canonicalize(program).unwrap_or_else(|_| program.to_path_buf());
    let mut exec: Vec<PathBuf> = vec![program.clone()];
    if let Some(interp) = elf_interpreter(&program) {
        if let Ok(real) = std::fs::canonicalize(&interp) {
            exec.push(real);
        }
        exec.push(interp);
    }
    let mut read: Vec<PathBuf> = [
        "/usr", "/etc", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/dev",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    read.extend(socket_dir.map(Path::to_path_buf));
    let read_access = AccessFs::ReadFile | AccessFs::ReadDir;
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.create())
        .and_then(|r| r.add_rules(path_beneath_rules(&read, read_access)))
        .and_then(|r| {
            r.add_rules(path_beneath_rules(
                &exec,
                AccessFs::Execute | AccessFs::ReadFile,
            ))
        })
        .and_then(|r| r.restrict_self());
    let no_new_privs = no_new_privs();
    let landlock = match status {
        Ok(s) => match s.ruleset {
            RulesetStatus::FullyEnforced => "fully enforced".to_string(),
            RulesetStatus::PartiallyEnforced => "partially enforced (an older kernel ABI)".into(),
            RulesetStatus::NotEnforced => "NOT enforced (the kernel has no Landlock)".into(),
        },
        Err(e) => format!("NOT enforced ({e})"),
    };
    Walls {
        landlock_abi: landlock_abi(),
        landlock,
        no_new_privs,
    }
}

/// Whether no_new_privs is set on this process.
fn no_new_privs() -> bool {
    // SAFETY: PR_GET_NO_NEW_PRIVS only reads a flag.
    unsafe { nix::libc::prctl(nix::libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1 }
}

/// One line in the system log (auth facility), best effort.
pub fn syslog(priority: nix::libc::c_int, msg: &str) {
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
        nix::libc::syslog(priority, c"%s".as_ptr(), text.as_ptr());
        nix::libc::closelog();
    }
}

/// How the filter ended.
enum Ended {
    /// stdin ended (or psql stopped reading): psql's own exit follows.
    Eof,
    /// A unit broke the grammar: it never reached psql.
    Refused(grammar::Refusal),
}

/// Runs psql for an accepted line behind the walls; never returns. A
/// refused unit never reaches psql: the units before it run, then psql
/// meets the end of its input and the gate exits
/// [`grammar::REFUSED_EXIT`].
/// `check_grammar` and `kernel_wall` are false only in test builds that
/// prove each wall alone.
pub fn serve(door: &Door, check_grammar: bool, kernel_wall: bool) -> ! {
    if kernel_wall {
        let walls = raise_kernel_wall(Path::new(&door.words[0]), door.socket_dir.as_deref());
        if !walls.landlock.starts_with("fully") {
            syslog(
                nix::libc::LOG_NOTICE,
                &format!(
                    "remote-gate: Landlock {} on this kernel; psql runs behind the script grammar only",
                    walls.landlock
                ),
            );
        }
    }
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(grammar::hello_line().as_bytes());
    let _ = out.flush();
    drop(out);
    let mut cmd = Command::new(&door.words[0]);
    cmd.args(&door.words[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    // SAFETY: prctl is async-signal-safe; psql ends if the gate dies.
    unsafe {
        cmd.pre_exec(|| {
            nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGTERM, 0, 0, 0);
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("remote-gate: cannot run {}: {e}", door.words[0]);
            syslog(nix::libc::LOG_WARNING, &msg);
            eprintln!("govsql {msg}");
            std::process::exit(127);
        }
    };
    let mut psql_in = child.stdin.take().expect("stdin is piped");
    // psql may end on its own (a refused login, ON_ERROR_STOP) while the
    // channel stays open (session mode sends no EOF): the gate ends with
    // it, whatever the filter is waiting for. A refusal is noted first so
    // the gate's own exit code wins.
    static REFUSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    std::thread::spawn(move || {
        let status = child.wait();
        if REFUSED.load(std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(grammar::REFUSED_EXIT);
        }
        exit_like(status)
    });
    let ended = filter(
        &mut std::io::stdin().lock(),
        &mut psql_in,
        door.grammar,
        check_grammar,
    );
    if let Ended::Refused(refusal) = &ended {
        let digest = &refusal.digest;
        REFUSED.store(true, std::sync::atomic::Ordering::SeqCst);
        let msg = format!(
            "remote-gate: refused the script for role {}: {refusal} (md5 of the refused line {digest}); psql ended before that unit",
            door.role
        );
        syslog(nix::libc::LOG_WARNING, &msg);
        eprintln!(
            "{}: {refusal}; nothing of that unit ran. The database host's remote-gate speaks script format {}: if this daemon's differs, upgrade govsql on the host that runs older",
            grammar::REFUSAL_PREFIX,
            grammar::VERSION
        );
    }
    // psql meets the end of its input (it never reads a refused unit);
    // the watcher exits the gate once psql has ended.
    drop(psql_in);
    loop {
        std::thread::park();
    }
}

/// Exits as psql did: its code, or the same signal (so sshd reports it
/// as psql's).
fn exit_like(status: std::io::Result<std::process::ExitStatus>) -> ! {
    if let Ok(s) = status {
        if let Some(code) = s.code() {
            std::process::exit(code);
        }
        if let Some(sig) = std::os::unix::process::ExitStatusExt::signal(&s) {
            // SAFETY: resetting a handler and raising a signal.
            unsafe {
                nix::libc::signal(sig, nix::libc::SIG_DFL);
                nix::libc::raise(sig);
            }
        }
    }
    std::process::exit(1)
}

/// Copies the channel into psql through the grammar.
fn filter(input: &mut impl Read, psql: &mut impl Write, grammar: Grammar, check: bool) -> Ended {
    let mut buf = vec![0u8; 256 * 1024];
    let mut runtime = RuntimeChecker::default();
    let mut admin: Vec<u8> = Vec::new();
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let data = &buf[..n];
        if !check {
            if psql.write_all(data).and_then(|_| psql.flush()).is_err() {
                return Ended::Eof;
            }
            continue;
        }
        match grammar {
            Grammar::Runtime => {
                if let Err(r) = runtime.feed(data) {
                    // Units that ended before the refused line passed:
                    // psql runs them, then meets the end of its input.
                    let _ = psql.write_all(&runtime.take_ready());
                    return Ended::Refused(r);
                }
                let ready = runtime.take_ready();
                if !ready.is_empty() && psql.write_all(&ready).and_then(|_| psql.flush()).is_err() {
                    // psql stopped reading (ON_ERROR_STOP): its exit follows.
                    return Ended::Eof;
                }
            }
            Grammar::Admin => {
                admin.extend_from_slice(data);
                if admin.len() > grammar::MAX_UNIT_BYTES {
                    return Ended::Refused(grammar::Refusal::new(
                        0,
                        "an admin script longer than the gate holds",
                        &admin,
                    ));
                }
            }
        }
    }
    if !check {
        return Ended::Eof;
    }
    match grammar {
        Grammar::Runtime => {
            if let Err(r) = runtime.finish() {
                return Ended::Refused(r);
            }
            let _ = psql.write_all(&runtime.take_ready());
        }
        Grammar::Admin => {
            if let Err(r) = grammar::check_admin_script(&admin) {
                return Ended::Refused(r);
            }
            let _ = psql.write_all(&admin);
        }
    }
    let _ = psql.flush();
    Ended::Eof
}

/// `--check`: raises the walls in this process and proves them: psql
/// runs, a shell does not, no file can be created.
pub fn check_walls(door: &Door) -> (Walls, Vec<String>) {
    let walls = raise_kernel_wall(Path::new(&door.words[0]), door.socket_dir.as_deref());
    let mut proofs = Vec::new();
    // Pipes, not /dev/null: the wall lets nothing be opened for writing.
    let psql_runs = Command::new(&door.words[0])
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    proofs.push(format!(
        "{}: {} --version",
        if psql_runs { "runs" } else { "DOES NOT RUN" },
        door.words[0]
    ));
    let shell = Command::new("/bin/sh").args(["-c", "true"]).output();
    proofs.push(match shell {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            "refused: /bin/sh cannot be executed".into()
        }
        Err(e) => format!("refused ({e}): /bin/sh"),
        Ok(_) => "NOT refused: /bin/sh runs".into(),
    });
    let probe = std::env::temp_dir().join(format!("govsql-gate-check-{}", std::process::id()));
    proofs.push(match std::fs::File::create(&probe) {
        Err(_) => format!("refused: no file can be created ({})", probe.display()),
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            format!("NOT refused: {} could be created", probe.display())
        }
    });
    (walls, proofs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interpreter_of_a_dynamic_binary_is_found() {
        let exe = std::env::current_exe().unwrap();
        let interp = elf_interpreter(&exe).expect("a test binary is dynamically linked");
        assert!(interp.to_string_lossy().contains("ld-linux"), "{interp:?}");
        assert_eq!(elf_interpreter(Path::new("/etc/passwd")), None);
    }

    #[test]
    fn the_filter_passes_units_and_stops_at_a_refused_one() {
        let nonce = "0123456789abcdef";
        let good = format!(
            "{}{}{};\n{}",
            grammar::preamble("govsql:j", 1000, true),
            grammar::marker(nonce, "0"),
            grammar::entry_call(grammar::Entry::Status, None),
            grammar::marker(nonce, "end")
        );
        let mut out = Vec::new();
        let text = format!("{good}{}\\! id\n", grammar::preamble("govsql:k", 1, false));
        let ended = filter(&mut text.as_bytes(), &mut out, Grammar::Runtime, true);
        assert!(matches!(ended, Ended::Refused(..)));
        assert_eq!(
            out,
            good.as_bytes(),
            "only the whole good unit reached psql"
        );
        let mut out = Vec::new();
        let ended = filter(
            &mut "SELECT 1;\n\\! id\n".as_bytes(),
            &mut out,
            Grammar::Admin,
            true,
        );
        assert!(matches!(ended, Ended::Refused(..)));
        assert!(
            out.is_empty(),
            "no part of a refused admin script reaches psql"
        );
    }
}

//! psql: the command line govsql runs, the scripts it sends on stdin, and
//! the parser for what comes back.
//!
//! The command line is built from words, each quoted with `shell-escape`,
//! and carries no value. A script is framed by `\echo GOVSQL:<nonce>:<n>`
//! markers written only by this module; the per-job random nonce means no
//! stored value can forge a marker. Two output formats, two parsers:
//! control rows (`~|~` fields, NUL-terminated records, known column count)
//! and command results (`COPY … TO STDOUT` text format: exact, `\N` for
//! NULL). Anything that does not fit is an error, never a guess.

use std::borrow::Cow;

use rand::Rng;

use crate::config::TargetConfig;
pub use crate::job::Row;
use crate::job::{is_sqlstate, ErrorClass};

/// psql's field separator for control rows.
pub const FIELD_SEP: &str = "~|~";

/// Which database role a script runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbRole {
    /// The runtime role: governed functions and the ledger only.
    Runtime,
    /// The admin role: `govsql migrate` only.
    Admin,
}

/// What a psql command line is made of: the binary (and container), the
/// database it connects to, and the role it connects as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PsqlLine {
    /// The psql binary on the database host.
    pub psql: String,
    /// Non-empty: run psql through `docker exec -i CONTAINER`.
    pub container: Option<String>,
    /// `-h`: a socket directory or host name.
    pub db_host: Option<String>,
    /// `-p`.
    pub db_port: u16,
    /// `-d`.
    pub db_name: String,
    /// `-U`.
    pub db_user: String,
}

impl PsqlLine {
    /// The line of a target for a role.
    pub fn of(target: &TargetConfig, role: DbRole) -> PsqlLine {
        PsqlLine {
            psql: target.psql.clone(),
            container: target.container.clone().filter(|c| !c.is_empty()),
            db_host: target.db_host.clone(),
            db_port: target.db_port,
            db_name: target.db_name.clone(),
            db_user: match role {
                DbRole::Runtime => target.db_user.clone(),
                DbRole::Admin => target.admin_db_user.clone(),
            },
        }
    }

    /// The words of the remote command, unquoted:
    /// `[docker exec -i C] psql -X -w -q -v ON_ERROR_STOP=1 -A -t -0 -F ~|~ -h H -p P -U U -d D`.
    pub fn words(&self) -> Vec<String> {
        let mut w: Vec<String> = Vec::with_capacity(24);
        if let Some(c) = self.container.as_deref().filter(|c| !c.is_empty()) {
            w.extend(["docker", "exec", "-i", c].map(String::from));
        }
        w.push(self.psql.clone());
        w.extend(
            [
                "-X",
                "-w",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-A",
                "-t",
                "-0",
                "-F",
                FIELD_SEP,
            ]
            .map(String::from),
        );
        if let Some(h) = &self.db_host {
            w.push("-h".into());
            w.push(h.clone());
        }
        w.push("-p".into());
        w.push(self.db_port.to_string());
        w.push("-U".into());
        w.push(self.db_user.clone());
        w.push("-d".into());
        w.push(self.db_name.clone());
        w
    }
}

/// The words of a target's psql command for a role (see [`PsqlLine`]).
pub fn command_words(target: &TargetConfig, role: DbRole) -> Vec<String> {
    PsqlLine::of(target, role).words()
}

/// The words joined into ONE shell string, each quoted for any POSIX shell.
pub fn command_line(words: &[String]) -> String {
    words
        .iter()
        .map(|w| shell_escape::unix::escape(Cow::Borrowed(w.as_str())).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A psql script under construction, framed by nonce markers.
#[derive(Debug)]
pub struct Script {
    nonce: String,
    text: String,
    sections: usize,
}

impl Script {
    /// A new script: error text reduced to SQLSTATEs (PostgreSQL messages
    /// quote input values), standard_conforming_strings on before any
    /// literal, the session tagged with `application_name` so a timed-out
    /// job's backend can be found, and a server-side statement timeout.
    pub fn new(application_name: &str, statement_timeout_ms: u64) -> Script {
        Script::build(application_name, statement_timeout_ms, false)
    }

    /// A new script whose preamble (a statement with no value) first
    /// checks that no value could reach a server-side store: psql stops
    /// there (SQLSTATE GV009) before any later statement is sent.
    pub fn with_preflight(application_name: &str, statement_timeout_ms: u64) -> Script {
        Script::build(application_name, statement_timeout_ms, true)
    }

    fn build(application_name: &str, statement_timeout_ms: u64, preflight: bool) -> Script {
        let nonce: String = {
            let mut rng = rand::thread_rng();
            (0..16)
                .map(|_| char::from(b"0123456789abcdef"[rng.gen_range(0..16)]))
                .collect()
        };
        let mut text = String::with_capacity(1024);
        text.push_str(&crate::grammar::preamble(
            application_name,
            statement_timeout_ms,
            preflight,
        ));
        Script {
            nonce,
            text,
            sections: 0,
        }
    }

    /// Starts the next section; returns its number (0, 1, …).
    pub fn section(&mut self) -> usize {
        let n = self.sections;
        self.text
            .push_str(&crate::grammar::marker(&self.nonce, &n.to_string()));
        self.sections += 1;
        n
    }

    /// Appends one SQL statement (the `;` is added).
    pub fn sql(&mut self, statement: &str) {
        self.text.push_str(statement);
        self.text.push_str(";\n");
    }

    /// Appends a psql meta-command line (runtime framing only).
    pub fn meta(&mut self, line: &str) {
        self.text.push_str(line);
        self.text.push('\n');
    }

    /// Closes the script with the end marker; returns its text.
    pub fn finish(mut self) -> FinishedScript {
        self.text
            .push_str(&crate::grammar::marker(&self.nonce, "end"));
        FinishedScript {
            nonce: self.nonce,
            text: self.text,
            sections: self.sections,
        }
    }
}

/// A complete script, ready for stdin.
#[derive(Debug, Clone)]
pub struct FinishedScript {
    /// The per-job nonce of its markers.
    pub nonce: String,
    /// The script text.
    pub text: String,
    /// How many sections it declares.
    pub sections: usize,
}

/// A string literal for trusted catalog text (NUL refused at catalog
/// load); every script sets standard_conforming_strings first.
pub fn quote_trusted(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A `text[]` literal of trusted catalog text.
pub fn text_array(items: &[String]) -> String {
    let inner: Vec<String> = items.iter().map(|s| quote_trusted(s)).collect();
    format!("ARRAY[{}]::text[]", inner.join(", "))
}

/// Output that does not have the shape the script promised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutputError {
    /// A control record with the wrong number of fields.
    #[error("section {section}: expected {expected} fields per record, found {found}")]
    FieldCount {
        /// The section.
        section: usize,
        /// Columns promised.
        expected: usize,
        /// Columns found.
        found: usize,
    },
    /// A control section that does not end with a NUL.
    #[error("section {0}: output does not end with a record terminator")]
    Unterminated(usize),
    /// A COPY row with a bad escape or not ending in a newline.
    #[error("section {0}: malformed COPY output")]
    Copy(usize),
    /// Output that is not UTF-8.
    #[error("section {0}: output is not UTF-8")]
    Utf8(usize),
    /// Markers out of order or missing.
    #[error("output markers are out of order or missing (expected section {expected})")]
    Markers {
        /// The section expected next.
        expected: usize,
    },
}

/// psql's stdout cut into the script's sections.
#[derive(Debug, Clone, Default)]
pub struct Sections {
    /// The bytes of each section seen, in order.
    pub parts: Vec<Vec<u8>>,
    /// Whether the end marker was seen (the whole script ran).
    pub complete: bool,
}

impl Sections {
    /// Splits stdout at the nonce's markers. Bytes before the first marker
    /// (login-shell noise) are ignored; markers must come in order.
    pub fn split(stdout: &[u8], nonce: &str) -> Result<Sections, OutputError> {
        let prefix = format!("GOVSQL:{nonce}:");
        let mut out = Sections::default();
        let mut pos = 0usize;
        let mut current: Option<usize> = None;
        let mut body_start = 0usize;
        while let Some(found) = find(&stdout[pos..], prefix.as_bytes()) {
            let at = pos + found;
            let at_line_start = at == 0 || matches!(stdout[at - 1], b'\n' | b'\0');
            let rest = &stdout[at + prefix.len()..];
            let nl = rest.iter().position(|&b| b == b'\n');
            let (Some(nl), true) = (nl, at_line_start) else {
                pos = at + 1;
                continue;
            };
            let label = &rest[..nl];
            if let Some(n) = current {
                out.parts.push(stdout[body_start..at].to_vec());
                debug_assert_eq!(out.parts.len(), n + 1);
            }
            let expected = out.parts.len();
            if label == b"end" {
                out.complete = true;
                return Ok(out);
            }
            if label != expected.to_string().as_bytes() {
                return Err(OutputError::Markers { expected });
            }
            current = Some(expected);
            body_start = at + prefix.len() + nl + 1;
            pos = body_start;
        }
        if current.is_some() {
            out.parts.push(stdout[body_start..].to_vec());
        }
        Ok(out)
    }

    /// The section `n`, if the script got that far.
    pub fn get(&self, n: usize) -> Option<&[u8]> {
        self.parts.get(n).map(Vec::as_slice)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Control rows: NUL-terminated records of exactly `cols` `~|~` fields.
pub fn control_rows(
    section: usize,
    bytes: &[u8],
    cols: usize,
) -> Result<Vec<Vec<String>>, OutputError> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let text = std::str::from_utf8(bytes).map_err(|_| OutputError::Utf8(section))?;
    let body = text
        .strip_suffix('\0')
        .ok_or(OutputError::Unterminated(section))?;
    body.split('\0')
        .map(|rec| {
            let fields: Vec<String> = rec.split(FIELD_SEP).map(str::to_string).collect();
            if fields.len() == cols {
                Ok(fields)
            } else {
                Err(OutputError::FieldCount {
                    section,
                    expected: cols,
                    found: fields.len(),
                })
            }
        })
        .collect()
}

/// COPY text-format rows: one per line, tab-separated, `\N` is NULL,
/// backslash escapes decoded exactly.
pub fn copy_rows(section: usize, bytes: &[u8]) -> Result<Vec<Row>, OutputError> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let body = bytes
        .strip_suffix(b"\n")
        .ok_or(OutputError::Copy(section))?;
    body.split(|&b| b == b'\n')
        .map(|line| {
            line.split(|&b| b == b'\t')
                .map(|f| copy_field(section, f))
                .collect()
        })
        .collect()
}

fn copy_field(section: usize, f: &[u8]) -> Result<Option<String>, OutputError> {
    if f == b"\\N" {
        return Ok(None);
    }
    let bad = || OutputError::Copy(section);
    let mut out = Vec::with_capacity(f.len());
    let mut i = 0;
    while i < f.len() {
        if f[i] != b'\\' {
            out.push(f[i]);
            i += 1;
            continue;
        }
        let c = *f.get(i + 1).ok_or_else(bad)?;
        i += 2;
        match c {
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut v = u32::from(c - b'0');
                let mut k = 0;
                while k < 2 && i < f.len() && (b'0'..=b'7').contains(&f[i]) {
                    v = v * 8 + u32::from(f[i] - b'0');
                    i += 1;
                    k += 1;
                }
                out.push(u8::try_from(v).map_err(|_| bad())?);
            }
            b'x' => {
                let mut v = 0u32;
                let mut k = 0;
                while k < 2 && i < f.len() && f[i].is_ascii_hexdigit() {
                    v = v * 16 + char::from(f[i]).to_digit(16).unwrap_or(0);
                    i += 1;
                    k += 1;
                }
                if k == 0 {
                    return Err(bad());
                }
                out.push(v as u8);
            }
            other => out.push(other),
        }
    }
    String::from_utf8(out)
        .map(Some)
        .map_err(|_| OutputError::Utf8(section))
}

/// The SQLSTATE of the error that stopped the script (psql prints
/// `…ERROR:  XXXXX` under `VERBOSITY sqlstate`).
pub fn sqlstate(stderr: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(stderr);
    let mut found = None;
    for line in text.lines() {
        let Some(idx) = line.find("ERROR:  ") else {
            continue;
        };
        let code = line[idx + 8..].trim();
        if is_sqlstate(code) {
            found = Some(code.to_string());
        }
    }
    found
}

/// How the remote psql ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// An exit status (psql: 0 ok, 3 SQL error under ON_ERROR_STOP).
    Code(i32),
    /// Killed by a signal (SSH sends exit-signal instead of a status).
    Signal(String),
    /// The channel closed without telling.
    Unknown,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit {c}"),
            Exit::Signal(s) => write!(f, "signal {s}"),
            Exit::Unknown => f.write_str("no exit status"),
        }
    }
}

/// What psql wrote and how it ended.
#[derive(Debug, Clone)]
pub struct ScriptOutput {
    /// stdout: markers, control rows, COPY rows.
    pub stdout: Vec<u8>,
    /// stderr: SQLSTATEs (never copied into the ledger or logs).
    pub stderr: Vec<u8>,
    /// The exit.
    pub exit: Exit,
}

/// What one run of a script came to: the ONE reading of psql's answer
/// (exit, stdout framing, stderr SQLSTATE, transport failure) that plan,
/// apply, verify, migrate and the catalog check all match on.
#[derive(Debug)]
pub enum PsqlResult {
    /// The script ran to its end marker and psql exited 0.
    Complete(Sections),
    /// An SQL error stopped the script (ON_ERROR_STOP): its SQLSTATE, and
    /// how many sections had begun.
    SqlError {
        /// The SQLSTATE psql printed.
        state: String,
        /// Sections begun before the error.
        reached: usize,
    },
    /// Nothing reached the database: the target or psql's connection
    /// failed before the script's first marker.
    NotStarted {
        /// target_unreachable, host_key, ssh_auth or db_unavailable.
        class: ErrorClass,
        /// What happened, in words an operator can act on (psql's own
        /// connection error included: it never carries a param value).
        message: String,
    },
    /// The run started and ended without an answer: outcome unknown.
    CutOff {
        /// timeout or target_unreachable.
        class: ErrorClass,
        /// What happened.
        message: String,
    },
    /// Output that does not have the script's shape.
    Malformed(String),
    /// The database host's remote-gate refused the script: the refused
    /// part never reached psql.
    GateRefused(String),
}

impl PsqlResult {
    /// Reads what psql wrote and how it ended, against the script it ran
    /// (a transport that failed is read by `transport::run_script`).
    pub fn read(out: &ScriptOutput, script: &FinishedScript) -> PsqlResult {
        if out.exit == Exit::Code(crate::grammar::REFUSED_EXIT) {
            let text = String::from_utf8_lossy(&out.stderr);
            if let Some(line) = text
                .lines()
                .find(|l| l.starts_with(crate::grammar::REFUSAL_PREFIX))
            {
                return PsqlResult::GateRefused(line.chars().take(400).collect());
            }
        }
        let secs = match Sections::split(&out.stdout, &script.nonce) {
            Ok(secs) => secs,
            Err(e) => return PsqlResult::Malformed(e.to_string()),
        };
        if let (Exit::Code(3), Some(state)) = (&out.exit, sqlstate(&out.stderr)) {
            return PsqlResult::SqlError {
                state,
                reached: secs.parts.len(),
            };
        }
        if out.exit == Exit::Code(0) && secs.complete {
            return if secs.parts.len() == script.sections {
                PsqlResult::Complete(secs)
            } else {
                PsqlResult::Malformed(format!(
                    "expected {} sections, found {}",
                    script.sections,
                    secs.parts.len()
                ))
            };
        }
        if secs.parts.is_empty() && matches!(out.exit, Exit::Code(_)) {
            return PsqlResult::NotStarted {
                class: ErrorClass::DbUnavailable,
                message: not_started(out),
            };
        }
        PsqlResult::CutOff {
            class: ErrorClass::TargetUnreachable,
            message: match &out.exit {
                Exit::Code(c) => format!("psql stopped before the end of its script (exit {c})"),
                Exit::Signal(sig) => format!("the remote psql was killed ({sig})"),
                Exit::Unknown => "the channel closed without an exit status".to_string(),
            },
        }
    }
}

impl std::fmt::Display for PsqlResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PsqlResult::Complete(_) => f.write_str("completed"),
            PsqlResult::SqlError { state, .. } => write!(f, "SQLSTATE {state}"),
            PsqlResult::NotStarted { message, .. } | PsqlResult::CutOff { message, .. } => {
                f.write_str(message)
            }
            PsqlResult::Malformed(m) => write!(f, "unexpected psql output: {m}"),
            PsqlResult::GateRefused(m) => f.write_str(m),
        }
    }
}

/// Why psql ended before its first marker: the cause, in words an admin
/// can act on, then psql's own last stderr line (a connection error: no
/// script was read yet, so no value is in it).
fn not_started(out: &ScriptOutput) -> String {
    let text = String::from_utf8_lossy(&out.stderr);
    let last = text
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .map(|l| {
            l.chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .take(300)
                .collect::<String>()
        });
    let code = match out.exit {
        Exit::Code(c) => c,
        _ => -1,
    };
    let cause = diagnose(code, &text, &String::from_utf8_lossy(&out.stdout));
    match last {
        Some(line) => format!("{cause} (psql exit {code}: {line})"),
        None => format!("{cause} (psql exit {code})"),
    }
}

/// The cause of a psql that never started its script, read from its exit
/// code and its (or the login shell's) own words.
pub fn diagnose(code: i32, stderr: &str, stdout: &str) -> String {
    let quoted = |marker: &str| -> Option<String> {
        let i = stderr.find(marker)? + marker.len();
        let rest = &stderr[i..];
        let end = rest.find('"')?;
        Some(rest[..end].chars().take(64).collect())
    };
    if stdout.contains("account is currently not available") {
        return "the SSH login user has no login shell (nologin): give it a real shell (usermod -s /bin/bash USER) and keep it safe with `restrict` and `command=\"govsql remote-gate …\"` in authorized_keys".into();
    }
    if code == 127 || code == 126 || (stderr.contains("not found") && stderr.contains("psql")) {
        return "psql was not found or is not executable at the configured `psql` path on the database host (on Debian: /usr/lib/postgresql/15/bin/psql)".into();
    }
    if stderr.contains("Peer authentication failed") {
        let role = quoted("for user \"").unwrap_or_else(|| "db_user".into());
        return format!(
            "PostgreSQL refused peer login as role {role}: the SSH login user must be mapped to {role} (pg_ident.conf, and a pg_hba.conf line `local DB {role} peer map=govsql` placed ABOVE the `local all all` lines), then reload PostgreSQL"
        );
    }
    if stderr.contains("no pg_hba.conf entry") {
        return "no pg_hba.conf line admits this role to this database: add one ABOVE the `local all all` lines and reload PostgreSQL".into();
    }
    if stderr.contains("no password supplied") || stderr.contains("password authentication failed")
    {
        return "PostgreSQL asked for a password, and govsql never sends one (-w): use peer authentication for this role in pg_hba.conf".into();
    }
    if stderr.contains("authentication failed") {
        let role = quoted("for user \"").unwrap_or_else(|| "db_user".into());
        return format!("PostgreSQL refused the login as role {role}: check its pg_hba.conf line and authentication method");
    }
    if let Some(db) = quoted("database \"").filter(|_| stderr.contains("does not exist")) {
        return format!("database {db} does not exist on that server: check db_name (and db_port: another cluster?)");
    }
    if let Some(role) = quoted("role \"").filter(|_| stderr.contains("does not exist")) {
        return format!("role {role} does not exist on that server: check db_user, or run `govsql migrate`, which creates the runtime role");
    }
    if stderr.contains("Connection refused")
        || stderr.contains("No such file or directory")
        || stderr.contains("could not connect")
    {
        return "nothing accepts connections at db_host/db_port: is PostgreSQL running there, and are db_host (socket directory) and db_port right?".into();
    }
    "psql could not reach the database; check db_host, db_port, db_name, db_user and pg_hba.conf"
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> TargetConfig {
        toml::from_str(
            r#"transport = "ssh"
ssh_host = "db"
ssh_user = "u"
host_key = "SHA256:x"
container = "pg 1"
psql = "/usr/lib/postgresql/15/bin/psql"
db_host = "/var/run/postgresql"
db_name = "iu_core"
db_user = "govsql_runtime""#,
        )
        .unwrap()
    }

    #[test]
    fn command_line_is_one_string_with_the_separator_quoted() {
        let line = command_line(&command_words(&target(), DbRole::Runtime));
        assert_eq!(
            line,
            "docker exec -i 'pg 1' /usr/lib/postgresql/15/bin/psql -X -w -q -v ON_ERROR_STOP=1 -A -t -0 -F '~|~' -h /var/run/postgresql -p 5432 -U govsql_runtime -d iu_core"
        );
        let admin = command_line(&command_words(&target(), DbRole::Admin));
        assert!(admin.contains("-U postgres"));
    }

    #[test]
    fn sections_split_on_the_nonce_only_and_ignore_leading_noise() {
        let out = b"motd GOVSQL:abc:0\nnoise\nGOVSQL:abc:0\na~|~b\0GOVSQL:zzz:1\n\0GOVSQL:abc:1\nrow\nGOVSQL:abc:end\n";
        let s = Sections::split(out, "abc").unwrap();
        assert!(s.complete);
        assert_eq!(s.get(0).unwrap(), b"a~|~b\0GOVSQL:zzz:1\n\0");
        assert_eq!(s.get(1).unwrap(), b"row\n");
    }

    #[test]
    fn sections_out_of_order_are_an_error_and_incomplete_is_reported() {
        assert!(Sections::split(b"GOVSQL:n:1\n", "n").is_err());
        let s = Sections::split(b"GOVSQL:n:0\nx\0GOVSQL:n:1\n", "n").unwrap();
        assert!(!s.complete);
        assert_eq!(s.parts.len(), 2);
    }

    #[test]
    fn control_rows_check_the_field_count() {
        assert_eq!(
            control_rows(0, b"a~|~b\0c~|~\0", 2).unwrap(),
            vec![vec!["a", "b"], vec!["c", ""]]
        );
        assert!(matches!(
            control_rows(0, b"a~|~b~|~c\0", 2),
            Err(OutputError::FieldCount { found: 3, .. })
        ));
        assert!(matches!(
            control_rows(0, b"a~|~b", 2),
            Err(OutputError::Unterminated(0))
        ));
        assert!(control_rows(0, b"", 2).unwrap().is_empty());
    }

    #[test]
    fn copy_rows_decode_escapes_and_tell_null_from_empty() {
        let rows = copy_rows(0, b"1\t\\N\t\ta\\tb\\nc\\\\\\101\\x42\n").unwrap();
        assert_eq!(
            rows,
            vec![vec![
                Some("1".into()),
                None,
                Some(String::new()),
                Some("a\tb\nc\\AB".into())
            ]]
        );
        assert!(copy_rows(0, b"no newline").is_err());
        assert!(copy_rows(0, b"bad\\\n").is_err());
    }

    #[test]
    fn a_psql_that_never_started_is_given_its_cause() {
        let cases = [
            (2, "psql: error: connection to server on socket \"/run/postgresql/.s.PGSQL.5432\" failed: FATAL:  Peer authentication failed for user \"govsql_runtime\"", "", "peer login as role govsql_runtime"),
            (2, "psql: error: connection to server on socket \"/x/.s.PGSQL.5432\" failed: FATAL:  no pg_hba.conf entry for host \"[local]\", user \"u\", database \"d\"", "", "ABOVE the `local all all`"),
            (2, "psql: error: connection to server on socket \"/x/.s.PGSQL.1\" failed: FATAL:  database \"nope\" does not exist", "", "database nope does not exist"),
            (2, "psql: error: connection to server on socket \"/x/.s.PGSQL.1\" failed: FATAL:  role \"ghost\" does not exist", "", "role ghost does not exist"),
            (2, "psql: error: connection to server on socket \"/x/.s.PGSQL.9\" failed: No such file or directory\n\tIs the server running locally and accepting connections on that socket?", "", "nothing accepts connections"),
            (2, "psql: error: connection to server on socket \"/x\" failed: fe_sendauth: no password supplied", "", "never sends one"),
            (127, "sh: 1: /opt/psql: not found", "", "psql was not found"),
            (1, "", "This account is currently not available.\n", "no login shell"),
            (2, "something else", "", "could not reach the database"),
        ];
        for (code, stderr, stdout, want) in cases {
            let got = diagnose(code, stderr, stdout);
            assert!(got.contains(want), "{stderr:?}: {got}");
        }
    }

    #[test]
    fn sqlstate_is_read_from_psql_stderr() {
        assert_eq!(
            sqlstate(b"psql:<stdin>:9: ERROR:  GV001\n").as_deref(),
            Some("GV001")
        );
        assert_eq!(
            sqlstate(b"NOTICE:  x\nERROR:  25006\n").as_deref(),
            Some("25006")
        );
        assert_eq!(sqlstate(b"psql: error: connection refused"), None);
    }
}

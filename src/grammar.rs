//! The grammar of what govsql writes to psql's stdin: one module for the
//! two sides of the database host's door.
//!
//! psql executes meta-commands read from stdin, and several reach the
//! operating system (`\!`, `\o |cmd`, backticks, `\copy … program`,
//! `\w`, `\i`, …). So the scripts the runtime sends are built only from the
//! line builders here, and `govsql remote-gate` passes to psql only what
//! the checkers here accept. Both sides use the same constants, so the
//! daemon cannot emit a line the gate refuses (a test renders every
//! catalog command through both).
//!
//! * The **runtime grammar** (the daemon's key) is a closed set of lines:
//!   the per-job preamble, `\echo GOVSQL:<nonce>:<label>` markers, one
//!   dispatcher entry call per section (`COPY (SELECT kind, value FROM
//!   public.fn_dot_iu_<entry>(…)) TO STDOUT;`, whose only values are
//!   dollar-quoted JSON literals whose tag does not occur in them), the
//!   cancel statement, the session reset and `\unset` of the runtime's own
//!   variables. Every accepted line leaves psql's lexer where it started,
//!   so lines are checked one by one, in linear time.
//! * The **admin grammar** (the key given `--admin-user`, for `migrate`)
//!   is SQL lexed conservatively — anything the lexer cannot classify is
//!   refused: `E''` and `U&''` strings, a backslash in a literal, comment or
//!   quoted identifier, psql variables outside [`ADMIN_VARIABLES`], a
//!   meta-command outside an allow-list whose members never reach the
//!   operating system (`\gexec`, `\gset`, `\if :var`, `\endif`, `\echo`
//!   of plain words, `\set`/`\unset` of allowed names).
//!
//! [`VERSION`] changes whenever the set of accepted scripts changes; the
//! gate announces it before psql starts ([`hello_line`]).

use std::fmt::Write as _;

/// The script format this build emits and its gate accepts.
pub const VERSION: u32 = 1;

/// The oldest gate format whose grammar accepts every script this build
/// emits.
pub const MIN_GATE_VERSION: u32 = 1;

/// What the gate prints on stdout before psql starts (bytes before the
/// first marker are ignored by the output parser).
const HELLO_PREFIX: &str = "GOVSQL-GATE:format=";

/// The line the gate prints before psql starts.
pub fn hello_line() -> String {
    format!("{HELLO_PREFIX}{VERSION}\n")
}

/// The gate's format announced in a run's stdout (in the bytes before the
/// first marker), if a gate announced one.
pub fn announced_version(stdout: &[u8]) -> Option<u32> {
    let head = &stdout[..stdout.len().min(256)];
    let at = memchr::memmem::find(head, HELLO_PREFIX.as_bytes())?;
    let rest = &head[at + HELLO_PREFIX.len()..];
    let end = rest.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// The first byte of stderr the gate writes when it refuses (the daemon
/// reads a refusal from it and [`REFUSED_EXIT`]).
pub const REFUSAL_PREFIX: &str = "govsql remote-gate: refused";

/// The gate's exit code after a refusal (psql uses 0 to 3).
pub const REFUSED_EXIT: i32 = 86;

/// The psql variables the runtime's scripts set (and a session unsets).
pub const RUNTIME_VARIABLES: [(&str, &str); 2] =
    [("VERBOSITY", "sqlstate"), ("SHOW_CONTEXT", "never")];

/// The psql variables the admin grammar lets `migrate` set and use.
pub const ADMIN_VARIABLES: [&str; 5] = [
    "runtime_role",
    "secret",
    "govsql_need",
    "govsql_ignored",
    "govsql_changed",
];

/// The dispatcher entries the runtime role may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Plan, apply or verify a command.
    Dispatch,
    /// Record a refusal the daemon found.
    Refuse,
    /// Record a failure the daemon saw (and settle an apply).
    Fail,
    /// Read the ledger (`govsql log`).
    Ledger,
    /// The substrate's status (self-test, health).
    Status,
    /// What an apply would be pinned to now (a job awaiting approval).
    Pin,
}

/// The function the preamble calls before any value is sent.
pub const PREFLIGHT_FUNCTION: &str = "fn_dot_iu_preflight";

/// Every function the runtime role may execute: the entries, and the
/// preflight the preamble calls.
pub fn runtime_functions() -> impl Iterator<Item = &'static str> {
    Entry::ALL
        .iter()
        .map(|e| e.function())
        .chain(std::iter::once(PREFLIGHT_FUNCTION))
}

impl Entry {
    const ALL: [Entry; 6] = [
        Entry::Dispatch,
        Entry::Refuse,
        Entry::Fail,
        Entry::Ledger,
        Entry::Status,
        Entry::Pin,
    ];

    /// The function's name.
    pub fn function(self) -> &'static str {
        match self {
            Entry::Dispatch => "fn_dot_iu_dispatch",
            Entry::Refuse => "fn_dot_iu_refuse",
            Entry::Fail => "fn_dot_iu_fail",
            Entry::Ledger => "fn_dot_iu_ledger",
            Entry::Status => "fn_dot_iu_status",
            Entry::Pin => "fn_dot_iu_pin",
        }
    }
}

/// Whether a byte may stand inside a plain literal.
fn plain_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-_.:@+/=".contains(&b)
}

/// A plain literal of a runtime-owned word.
///
/// # Panics
/// When the word holds a byte outside the plain set: such words are
/// checked where they enter (identifiers, catalog names).
pub fn word_literal(s: &str) -> String {
    assert!(
        s.bytes().all(plain_byte),
        "a plain literal is for runtime-owned words only"
    );
    format!("'{s}'")
}

/// A JSON value as a dollar-quoted jsonb literal. serde_json writes no
/// control byte (it escapes them), so the literal is one line.
pub fn json_literal(v: &serde_json::Value) -> String {
    dollar_quoted(&v.to_string(), "jsonb")
}

/// `$tag$value$tag$::ty` with a random tag that does not occur in the
/// value (so neither can the closing delimiter).
pub fn dollar_quoted(value: &str, ty: &str) -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    loop {
        let tag: String = std::iter::once('q')
            .chain((0..9).map(|_| {
                let n = rng.gen_range(0..36u8);
                char::from(if n < 10 { b'0' + n } else { b'a' + n - 10 })
            }))
            .collect();
        if !value.contains(&tag) {
            return format!("${tag}${value}${tag}$::{ty}");
        }
    }
}

/// The one statement of an entry call: its arguments as one jsonb
/// literal (`src/runtime/calls.rs` builds them), or none (the status).
/// The checker also accepts the positional arguments an earlier release
/// sends (plain words, jsonb literals, integers, booleans), so a gate
/// upgraded first still serves an older daemon.
pub fn entry_call(entry: Entry, call: Option<&serde_json::Value>) -> String {
    let mut s = String::with_capacity(96);
    let _ = write!(
        s,
        "COPY (SELECT kind, value FROM public.{}(",
        entry.function()
    );
    if let Some(call) = call {
        s.push_str(&json_literal(call));
    }
    s.push_str(")) TO STDOUT");
    s
}

/// The per-job preamble: psql's own encoding set to UTF-8 (its lexer
/// reads multibyte text by the client encoding, which a role default could
/// make one where a trailing byte looks like `$`), error text reduced to
/// SQLSTATEs, then ONE statement that sets every session setting the
/// dispatcher relies on (never trusting role defaults), the session's
/// `application_name` (how a timed-out job's backend is found) and the
/// server-side statement timeout, and prints nothing. With `preflight`,
/// the same statement — which holds no value — calls
/// `fn_dot_iu_preflight()`, which stops the script (GV009) before any
/// statement carrying a value is sent when a value could reach the server
/// log or a statistics store.
pub fn preamble(application_name: &str, statement_timeout_ms: u64, preflight: bool) -> String {
    let mut s = String::with_capacity(512);
    s.push_str(ENCODING_LINE);
    s.push('\n');
    for (name, value) in RUNTIME_VARIABLES {
        let _ = writeln!(s, "\\set {name} {value}");
    }
    let _ = writeln!(
        s,
        "{PREAMBLE_HEAD}{}{PREAMBLE_MID}{statement_timeout_ms}{}",
        word_literal(application_name),
        if preflight {
            PREAMBLE_TAIL_PREFLIGHT
        } else {
            PREAMBLE_TAIL
        }
    );
    s
}

const ENCODING_LINE: &str = "\\encoding UTF8";
const PREAMBLE_HEAD: &str = "SELECT 1 WHERE (set_config('standard_conforming_strings', 'on', false) || set_config('default_transaction_read_only', 'off', false) || set_config('default_transaction_isolation', 'read committed', false) || set_config('lock_timeout', '0', false) || set_config('idle_in_transaction_session_timeout', '0', false) || set_config('application_name', ";
const PREAMBLE_MID: &str = ", false) || set_config('statement_timeout', '";
const PREAMBLE_TAIL: &str = "', false)) IS NULL;";
const PREAMBLE_TAIL_PREFLIGHT: &str = "', false)) IS NULL OR public.fn_dot_iu_preflight() IS NULL;";

#[test]
fn the_preamble_calls_the_preflight_by_its_name() {
    assert!(PREAMBLE_TAIL_PREFLIGHT.contains(&format!("public.{PREFLIGHT_FUNCTION}()")));
}

/// The SQLSTATE the preflight raises when a value could be exposed.
pub const PREFLIGHT_SQLSTATE: &str = crate::sqlstate::LOG_EXPOSURE;
/// The SQLSTATE of the fail entry when a timed-out job still has a
/// backend (frozen, its call maybe unread): the job stays unsettled.
pub const BACKEND_ALIVE_SQLSTATE: &str = crate::sqlstate::BACKEND_ALIVE;

/// A framing marker line: `\echo GOVSQL:<nonce>:<label>`.
pub fn marker(nonce: &str, label: &str) -> String {
    format!("\\echo GOVSQL:{nonce}:{label}\n")
}

/// Terminates every other backend tagged `tag` (a timed-out job's).
pub fn cancel_statement(tag: &str) -> String {
    format!("{CANCEL_HEAD}{}{CANCEL_TAIL}", word_literal(tag))
}

const CANCEL_HEAD: &str =
    "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity WHERE application_name = ";
const CANCEL_TAIL: &str = " AND pid <> pg_backend_pid()";

/// The reset after each job in session mode, as ONE round trip: what
/// `DISCARD ALL` does except `DISCARD PLANS` (cached plans hold no job's
/// data; dropping them made every job re-plan the dispatcher, measured
/// 2.4k → 1.2k jobs/s here). The first statement fails (ending the
/// session) if the job left a transaction open: only a statement that
/// starts its own transaction has equal statement and transaction times.
pub const RESET_SQL: &str = "SELECT 1 WHERE 1 / (statement_timestamp() = transaction_timestamp())::int = 0 \\; CLOSE ALL \\; SET SESSION AUTHORIZATION DEFAULT \\; RESET ALL \\; DEALLOCATE ALL \\; UNLISTEN * \\; SELECT 1 WHERE pg_advisory_unlock_all()::text IS NULL \\; DISCARD TEMP \\; DISCARD SEQUENCES;";

/// Why a script (or a line of it) is outside the grammar. It names the
/// line, the rule and an md5 of the refused line, never its bytes (they
/// may hold a value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {rule}")]
pub struct Refusal {
    /// The 1-based line number in the stream.
    pub line: u64,
    /// Which rule the line broke.
    pub rule: &'static str,
    /// md5 hex of the refused line (for the system log).
    pub digest: String,
}

impl Refusal {
    pub fn new(line: u64, rule: &'static str, bytes: &[u8]) -> Refusal {
        use md5::{Digest, Md5};
        Refusal {
            line,
            rule,
            digest: hex::encode(Md5::digest(bytes)),
        }
    }
}

/// What an accepted runtime line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineKind {
    /// `\set`/`\unset` of a runtime variable, the preamble statement, the
    /// reset, an entry call or the cancel statement.
    Statement,
    /// A section marker (`\echo GOVSQL:<nonce>:<n>`).
    Section,
    /// The end of a job's script (`:end`) or of a session's reset
    /// (`:ready`): a unit psql may run.
    UnitEnd,
}

/// Checks one runtime line (without its `\n`).
pub fn check_runtime_line(line: &[u8]) -> Result<LineKind, &'static str> {
    if line.is_empty() {
        return Err("an empty line");
    }
    if line[0] == b'\\' {
        return meta_line(line);
    }
    if line == RESET_SQL.as_bytes() {
        return Ok(LineKind::Statement);
    }
    if let Some(rest) = line.strip_prefix(PREAMBLE_HEAD.as_bytes()) {
        let rest =
            plain_literal(rest).ok_or("a preamble whose application_name is not a plain word")?;
        let rest = rest
            .strip_prefix(PREAMBLE_MID.as_bytes())
            .ok_or("a malformed preamble")?;
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let tail = &rest[digits..];
        let tail_ok =
            tail == PREAMBLE_TAIL.as_bytes() || tail == PREAMBLE_TAIL_PREFLIGHT.as_bytes();
        return match digits {
            1..=12 if tail_ok => Ok(LineKind::Statement),
            _ => Err("a malformed preamble"),
        };
    }
    if let Some(rest) = line.strip_prefix(CANCEL_HEAD.as_bytes()) {
        let rest = plain_literal(rest).ok_or("a cancel whose tag is not a plain word")?;
        return match rest.strip_prefix(CANCEL_TAIL.as_bytes()) {
            Some(b";") => Ok(LineKind::Statement),
            _ => Err("a malformed cancel statement"),
        };
    }
    if let Some(rest) = line.strip_prefix(b"COPY (SELECT kind, value FROM public.") {
        return entry_line(rest);
    }
    Err("a line that is not one of the runtime's statements")
}

/// A meta-command line of the runtime grammar.
fn meta_line(line: &[u8]) -> Result<LineKind, &'static str> {
    if line == ENCODING_LINE.as_bytes() {
        return Ok(LineKind::Statement);
    }
    // `\set NAME VALUE` / `\unset NAME` of the runtime's own variables,
    // compared without building the lines (this runs for every line).
    let set = line.strip_prefix(b"\\set ").and_then(|r| {
        let (name, value) = r.split_at(r.iter().position(|&b| b == b' ')?);
        Some((name, Some(&value[1..])))
    });
    let var = set.or_else(|| line.strip_prefix(b"\\unset ").map(|name| (name, None)));
    if let Some((name, value)) = var {
        let known = RUNTIME_VARIABLES
            .iter()
            .any(|(n, v)| n.as_bytes() == name && value.map_or(true, |val| v.as_bytes() == val));
        return if known {
            Ok(LineKind::Statement)
        } else {
            Err("a variable outside the runtime's own")
        };
    }
    let rest = line
        .strip_prefix(b"\\echo GOVSQL:")
        .ok_or("a meta-command outside the runtime's framing")?;
    let (nonce, label) = rest.split_at(rest.len().min(16));
    let label = label.strip_prefix(b":").ok_or("a malformed marker")?;
    let nonce_ok = nonce.len() == 16
        && nonce
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b));
    if !nonce_ok {
        return Err("a marker whose nonce is not 16 hex digits");
    }
    match label {
        b"end" | b"ready" => Ok(LineKind::UnitEnd),
        l if (1..=6).contains(&l.len()) && l.iter().all(u8::is_ascii_digit) => {
            Ok(LineKind::Section)
        }
        _ => Err("a marker with an unknown label"),
    }
}

/// `'word'` at the start of `s`: the rest after it.
fn plain_literal(s: &[u8]) -> Option<&[u8]> {
    let body = s.strip_prefix(b"'")?;
    let n = body.iter().take_while(|&&b| plain_byte(b)).count();
    body[n..].strip_prefix(b"'")
}

/// `fn_dot_iu_<entry>(args)) TO STDOUT;`
fn entry_line(rest: &[u8]) -> Result<LineKind, &'static str> {
    let entry = Entry::ALL
        .iter()
        .find(|e| {
            rest.starts_with(e.function().as_bytes()) && rest.get(e.function().len()) == Some(&b'(')
        })
        .ok_or("a call of a function that is not a dispatcher entry")?;
    let mut rest = &rest[entry.function().len() + 1..];
    if let Some(r) = rest.strip_prefix(b")") {
        rest = r;
    } else {
        loop {
            rest = argument(rest)?;
            if let Some(r) = rest.strip_prefix(b", ") {
                rest = r;
            } else if let Some(r) = rest.strip_prefix(b")") {
                rest = r;
                break;
            } else {
                return Err("a malformed argument list");
            }
        }
    }
    if rest == b") TO STDOUT;" {
        Ok(LineKind::Statement)
    } else {
        Err("an entry call that does not end as the runtime ends it")
    }
}

/// One argument: a plain literal, a dollar-quoted jsonb literal, an
/// integer or a boolean. The rest after it.
fn argument(s: &[u8]) -> Result<&[u8], &'static str> {
    if s.first() == Some(&b'\'') {
        return plain_literal(s).ok_or("a quoted argument that is not a plain word");
    }
    if s.first() == Some(&b'$') {
        let tag_len = s[1..]
            .iter()
            .take_while(|b| b.is_ascii_alphanumeric() || **b == b'_')
            .count();
        let tag_ok = (1..=32).contains(&tag_len) && !s[1].is_ascii_digit();
        if !tag_ok || s.get(1 + tag_len) != Some(&b'$') {
            return Err("a dollar quote with a malformed tag");
        }
        let delim = &s[..tag_len + 2];
        let body = &s[delim.len()..];
        // psql ends the quote at the first delimiter, as we do.
        let end = memchr::memmem::find(body, delim).ok_or("an unterminated dollar quote")?;
        if body[..end].iter().any(|&b| b < 0x20 || b == 0x7f) {
            return Err("a control byte inside a dollar quote");
        }
        return body[end + delim.len()..]
            .strip_prefix(b"::jsonb")
            .ok_or("a dollar-quoted argument that is not jsonb");
    }
    for word in [&b"true"[..], b"false"] {
        if let Some(r) = s.strip_prefix(word) {
            return Ok(r);
        }
    }
    let sign = usize::from(s.first() == Some(&b'-'));
    let digits = s[sign..].iter().take_while(|b| b.is_ascii_digit()).count();
    if (1..=19).contains(&digits) {
        Ok(&s[sign + digits..])
    } else {
        Err("an argument that is not a word, jsonb, integer or boolean")
    }
}

/// Checks a whole runtime script (as the gate does, line by line).
pub fn check_runtime_script(text: &[u8]) -> Result<(), Refusal> {
    let mut checker = RuntimeChecker::default();
    checker.feed(text)?;
    checker.finish()
}

/// The runtime grammar over a stream: lines are checked as they complete
/// and held until a unit ends (`:end` or `:ready`), so no part of a job
/// that breaks the grammar ever reaches psql.
#[derive(Debug, Default)]
pub struct RuntimeChecker {
    /// Bytes of the line not yet complete.
    partial: Vec<u8>,
    /// Accepted lines of the unit not yet ended.
    held: Vec<u8>,
    /// Units that ended, ready for psql.
    ready: Vec<u8>,
    /// Lines seen.
    lines: u64,
}

/// The longest unit the gate holds (a 1 MiB body escaped as JSON is at
/// most 6 MiB; two JSON arguments and the rest fit well under this).
pub const MAX_UNIT_BYTES: usize = 64 << 20;

impl RuntimeChecker {
    /// Feeds bytes from the channel; accepted units become [`Self::take_ready`].
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), Refusal> {
        while let Some(nl) = memchr::memchr(b'\n', data) {
            self.lines += 1;
            if !self.partial.is_empty() {
                self.partial.extend_from_slice(&data[..nl]);
            }
            let line: &[u8] = if self.partial.is_empty() {
                &data[..nl]
            } else {
                &self.partial
            };
            let kind =
                check_runtime_line(line).map_err(|rule| Refusal::new(self.lines, rule, line))?;
            if self.partial.is_empty() {
                self.held.extend_from_slice(&data[..=nl]);
            } else {
                self.held.append(&mut self.partial);
                self.held.push(b'\n');
            }
            if kind == LineKind::UnitEnd {
                self.ready.append(&mut self.held);
            }
            data = &data[nl + 1..];
        }
        self.partial.extend_from_slice(data);
        if self.partial.len() + self.held.len() > MAX_UNIT_BYTES {
            return Err(Refusal::new(
                self.lines + 1,
                "a unit longer than the gate holds",
                &self.partial,
            ));
        }
        Ok(())
    }

    /// The accepted units, for psql.
    pub fn take_ready(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.ready)
    }

    /// At the end of the stream: accepted lines still held (a script the
    /// runtime always ends with a marker), or a refusal for a line left
    /// incomplete.
    pub fn finish(&mut self) -> Result<(), Refusal> {
        if !self.partial.is_empty() {
            return Err(Refusal::new(
                self.lines + 1,
                "a last line without its newline",
                &self.partial,
            ));
        }
        self.ready.append(&mut self.held);
        Ok(())
    }
}

/// Checks a whole admin script (`migrate`): SQL lexed conservatively and
/// the allowed meta-commands.
pub fn check_admin_script(text: &[u8]) -> Result<(), Refusal> {
    AdminLexer::new(text).run()
}

/// The conservative lexer of the admin grammar.
struct AdminLexer<'a> {
    s: &'a [u8],
    i: usize,
    line: u64,
}

impl<'a> AdminLexer<'a> {
    fn new(s: &'a [u8]) -> Self {
        AdminLexer { s, i: 0, line: 1 }
    }

    /// A refusal of the current line (its digest covers the whole line).
    fn refuse(&self, rule: &'static str) -> Refusal {
        let start = self.s[..self.i]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |p| p + 1);
        let end = memchr::memchr(b'\n', &self.s[self.i..]).map_or(self.s.len(), |p| self.i + p);
        Refusal::new(self.line, rule, &self.s[start..end])
    }

    fn peek(&self, k: usize) -> Option<u8> {
        self.s.get(self.i + k).copied()
    }

    /// Advances over `n` bytes, counting lines.
    fn skip(&mut self, n: usize) {
        let end = (self.i + n).min(self.s.len());
        self.line += self.s[self.i..end].iter().filter(|&&b| b == b'\n').count() as u64;
        self.i = end;
    }

    fn run(mut self) -> Result<(), Refusal> {
        if std::str::from_utf8(self.s).is_err() {
            return Err(self.refuse("bytes that are not UTF-8"));
        }
        while let Some(b) = self.peek(0) {
            // A quote right after a word (or `U&`) is a prefixed string.
            let prev_ident =
                self.i > 0 && (ident_byte(self.s[self.i - 1]) || self.s[self.i - 1] == b'&');
            match b {
                0 => return Err(self.refuse("a NUL byte")),
                b'\r' => return Err(self.refuse("a carriage return")),
                b'-' if self.peek(1) == Some(b'-') => {
                    let end =
                        memchr::memchr(b'\n', &self.s[self.i..]).unwrap_or(self.s.len() - self.i);
                    if self.s[self.i..self.i + end].contains(&b'\\') {
                        return Err(self.refuse("a backslash in a comment"));
                    }
                    self.skip(end);
                }
                b'/' if self.peek(1) == Some(b'*') => self.block_comment()?,
                b'\'' if prev_ident => {
                    return Err(self.refuse("a prefixed string (E'', U&'', B'', X'', N'')"))
                }
                b'\'' => self.quoted(b'\'')?,
                b'"' if prev_ident => return Err(self.refuse("a prefixed identifier (U&\"\")")),
                b'"' => self.quoted(b'"')?,
                b'$' if !(self.i > 0 && ident_byte(self.s[self.i - 1])) => self.dollar()?,
                b':' => self.colon()?,
                // `\;` and `\:` put the character into the query buffer.
                b'\\' if matches!(self.peek(1), Some(b';' | b':')) => self.skip(2),
                b'\\' => self.meta()?,
                b'`' => return Err(self.refuse("a backtick outside a literal")),
                _ => self.skip(1),
            }
        }
        Ok(())
    }

    /// `/* … */`, nested as PostgreSQL nests them.
    fn block_comment(&mut self) -> Result<(), Refusal> {
        let mut depth = 0usize;
        loop {
            match (self.peek(0), self.peek(1)) {
                (Some(b'/'), Some(b'*')) => {
                    depth += 1;
                    self.skip(2);
                }
                (Some(b'*'), Some(b'/')) => {
                    depth -= 1;
                    self.skip(2);
                    if depth == 0 {
                        return Ok(());
                    }
                }
                (Some(b'\\'), _) => return Err(self.refuse("a backslash in a comment")),
                (Some(_), _) => self.skip(1),
                (None, _) => return Err(self.refuse("an unterminated comment")),
            }
        }
    }

    /// `'…'` or `"…"` (doubling the quote escapes it); no backslash, so
    /// the lexing is the same whatever `standard_conforming_strings` is.
    fn quoted(&mut self, q: u8) -> Result<(), Refusal> {
        self.skip(1);
        loop {
            match self.peek(0) {
                Some(c) if c == q && self.peek(1) == Some(q) => self.skip(2),
                Some(c) if c == q => {
                    self.skip(1);
                    return Ok(());
                }
                Some(b'\\') => return Err(self.refuse("a backslash in a quoted literal")),
                Some(0) => return Err(self.refuse("a NUL byte")),
                Some(_) => self.skip(1),
                None => return Err(self.refuse("an unterminated quote")),
            }
        }
    }

    /// `$tag$ … $tag$` (opaque to psql), or a `$n` parameter.
    fn dollar(&mut self) -> Result<(), Refusal> {
        let rest = &self.s[self.i + 1..];
        if rest.first().is_some_and(u8::is_ascii_digit) {
            self.skip(1);
            return Ok(());
        }
        let tag_len = rest
            .iter()
            .take_while(|b| b.is_ascii_alphanumeric() || **b == b'_' || **b >= 0x80)
            .count();
        if rest.get(tag_len) != Some(&b'$') {
            return Err(self.refuse("a dollar sign that starts no dollar quote"));
        }
        let delim_len = tag_len + 2;
        let delim = &self.s[self.i..self.i + delim_len];
        let body = &self.s[self.i + delim_len..];
        let end = memchr::memmem::find(body, delim)
            .ok_or_else(|| self.refuse("an unterminated dollar quote"))?;
        if body[..end].contains(&0) {
            return Err(self.refuse("a NUL byte"));
        }
        self.skip(delim_len + end + delim_len);
        Ok(())
    }

    /// `::`, `:=`, or a psql variable (allowed names only).
    fn colon(&mut self) -> Result<(), Refusal> {
        match self.peek(1) {
            Some(b':') | Some(b'=') => {
                self.skip(2);
                Ok(())
            }
            Some(q @ (b'\'' | b'"')) => {
                let name = self.name_at(self.i + 2);
                if !ADMIN_VARIABLES.contains(&name) || self.peek(2 + name.len()) != Some(q) {
                    return Err(self.refuse("a psql variable outside the allow-list"));
                }
                self.skip(3 + name.len());
                Ok(())
            }
            Some(b'{') => Err(self.refuse("a psql variable test outside the allow-list")),
            Some(c) if ident_byte(c) => {
                let name = self.name_at(self.i + 1);
                if !ADMIN_VARIABLES.contains(&name) {
                    return Err(self.refuse("a psql variable outside the allow-list"));
                }
                self.skip(1 + name.len());
                Ok(())
            }
            _ => {
                self.skip(1);
                Ok(())
            }
        }
    }

    fn name_at(&self, at: usize) -> &'a str {
        let s: &'a [u8] = self.s;
        let rest = s.get(at..).unwrap_or_default();
        let n = rest.iter().take_while(|&&b| ident_byte(b)).count();
        std::str::from_utf8(&rest[..n]).unwrap_or("")
    }

    /// A meta-command: its arguments run to the end of the line (or to
    /// the next backslash, which would start another: refused).
    fn meta(&mut self) -> Result<(), Refusal> {
        let end = memchr::memchr(b'\n', &self.s[self.i..]).unwrap_or(self.s.len() - self.i);
        let line = std::str::from_utf8(&self.s[self.i..self.i + end]).unwrap_or("");
        let mut words = line.split(' ').filter(|w| !w.is_empty());
        let cmd = words.next().unwrap_or("");
        let args: Vec<&str> = words.collect();
        let plain = |w: &str| {
            !w.is_empty()
                && w.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-/".contains(&b))
        };
        let ok = match cmd {
            "\\gexec" | "\\gset" | "\\endif" | "\\else" => args.is_empty(),
            "\\encoding" => args == ["UTF8"],
            "\\if" => {
                matches!(args.as_slice(), [v] if v.strip_prefix(':').is_some_and(|n| ADMIN_VARIABLES.contains(&n)))
            }
            "\\echo" => args.iter().all(|w| {
                // Framing markers carry `:`; a `:` followed by a name
                // would interpolate, so only hex nonces and labels pass.
                w.split(':').all(|part| part.is_empty() || plain(part))
                    && (!w.contains(':') || w.starts_with("GOVSQL:"))
            }),
            "\\set" => match args.as_slice() {
                [name, value] => {
                    (ADMIN_VARIABLES.contains(name)
                        || RUNTIME_VARIABLES.iter().any(|(n, _)| n == name))
                        && plain(value)
                }
                _ => false,
            },
            "\\unset" => {
                matches!(args.as_slice(), [name] if ADMIN_VARIABLES.contains(name) || RUNTIME_VARIABLES.iter().any(|(n, _)| n == name))
            }
            _ => false,
        };
        if !ok {
            return Err(self.refuse("a meta-command outside the admin allow-list"));
        }
        self.skip(end);
        Ok(())
    }
}

/// A byte psql's lexer takes into an identifier (or a variable name).
fn ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(entry_args: &str) -> String {
        let nonce = "0123456789abcdef";
        format!(
            "{}{}{entry_args};\n{}",
            preamble("govsql:job-1", 62000, true),
            marker(nonce, "0"),
            marker(nonce, "end")
        )
    }

    #[test]
    fn the_builders_output_passes_the_checker() {
        let v =
            serde_json::json!({"params": {"title": "a'b $$ \\! id\n`x` :foo $q1$ ~|~ \u{10FFFF}"}});
        let call = entry_call(Entry::Dispatch, Some(&v));
        check_runtime_script(script(&call).as_bytes()).unwrap();
        // An earlier release's positional call still passes.
        let positional = format!(
            "COPY (SELECT kind, value FROM public.fn_dot_iu_dispatch('apply', 'dot_iu_add_piece', {}, 'job:1', 'alice', false, 16777216)) TO STDOUT",
            json_literal(&v)
        );
        check_runtime_script(script(&positional).as_bytes()).unwrap();
        let status = entry_call(Entry::Status, None);
        check_runtime_script(script(&status).as_bytes()).unwrap();
        let cancel = format!(
            "{}{};\n{}",
            preamble("govsql:j:cancel", 10000, false),
            cancel_statement("govsql:j"),
            marker("0123456789abcdef", "end")
        );
        check_runtime_script(cancel.as_bytes()).unwrap();
        let reset = format!(
            "{RESET_SQL}\n\\unset VERBOSITY\n\\unset SHOW_CONTEXT\n{}",
            marker("0123456789abcdef", "ready")
        );
        check_runtime_script(reset.as_bytes()).unwrap();
    }

    #[test]
    fn meta_commands_and_foreign_sql_are_refused() {
        let ok = script(&entry_call(Entry::Status, None));
        for bad in [
            "\\! id\n",
            "\\o | id\n",
            "\\o /tmp/x\n",
            "\\set x `id`\n",
            "\\copy (select 1) to program 'id'\n",
            "\\i /etc/passwd\n",
            "\\c postgres\n",
            "\\setenv PAGER id\n",
            "\\echo GOVSQL:0123456789abcdef:end \\! id\n",
            "\\echo `id`\n",
            "SELECT 1;\n",
            "SELECT 1 \\! id\n",
            "COPY (SELECT kind, value FROM public.fn_dot_iu_status()) TO STDOUT; \\! id\n",
            "COPY (SELECT kind, value FROM public.fn_dot_iu_status()) TO PROGRAM 'id';\n",
            "COPY (SELECT kind, value FROM public.fn_iu_diag_sleep(1)) TO STDOUT;\n",
            "COPY (SELECT kind, value FROM public.fn_dot_iu_ledger($q$x$q$::jsonb \\! id, 1)) TO STDOUT;\n",
            "COPY (SELECT kind, value FROM public.fn_dot_iu_ledger($q$x\n",
            "COPY (SELECT kind, value FROM public.fn_dot_iu_ledger($q$a\rb$q$::jsonb, 1)) TO STDOUT;\n",
            "COPY (SELECT kind, value FROM public.fn_dot_iu_ledger(E'\\\\', 1)) TO STDOUT;\n",
            "COPY (SELECT kind, value FROM public.fn_dot_iu_ledger('a\\', 1)) TO STDOUT;\n",
            "COPY (SELECT kind, value FROM public.fn_dot_iu_ledger(:'x', 1)) TO STDOUT;\n",
            "\0\n",
            "\n",
        ] {
            let text = format!("{ok}{bad}");
            let err = check_runtime_script(text.as_bytes());
            assert!(err.is_err(), "accepted: {bad:?}");
        }
        assert!(check_runtime_script(b"\\echo GOVSQL:0123456789abcdef:end").is_err());
    }

    #[test]
    fn a_refused_line_holds_back_its_whole_unit() {
        let nonce = "0123456789abcdef";
        let mut c = RuntimeChecker::default();
        let good = script(&entry_call(Entry::Status, None));
        c.feed(good.as_bytes()).unwrap();
        assert_eq!(c.take_ready(), good.as_bytes());
        c.feed(preamble("govsql:j", 1, false).as_bytes()).unwrap();
        c.feed(marker(nonce, "0").as_bytes()).unwrap();
        assert!(c.take_ready().is_empty(), "held until the unit ends");
        assert!(c.feed(b"\\! id\n").is_err());
        assert!(c.take_ready().is_empty());
    }

    #[test]
    fn the_hello_line_announces_the_version() {
        let out = format!("motd\n{}GOVSQL:abc:0\n", hello_line());
        assert_eq!(announced_version(out.as_bytes()), Some(VERSION));
        assert_eq!(announced_version(b"GOVSQL:abc:0\n"), None);
    }

    #[test]
    fn the_admin_grammar_takes_sql_and_refuses_the_doors() {
        let ok = "SET client_min_messages = warning;\n\\set runtime_role govsql_runtime\n-- a comment\nCREATE FUNCTION f() RETURNS text LANGUAGE plpgsql AS $fn$ BEGIN RETURN E'a\\tb' || ':x'; END $fn$;\nGRANT EXECUTE ON FUNCTION f() TO :\"runtime_role\";\nSELECT format('%I', :'runtime_role') \\gexec\nSELECT NOT EXISTS (SELECT 1) AS govsql_need \\gset\n\\if :govsql_need\nSELECT 1::int, a[1], f(x := 1) /* c /* n */ */;\n\\echo applied 001_gates\n\\endif\n\\echo GOVSQL:0123456789abcdef:0\n";
        check_admin_script(ok.as_bytes()).unwrap();
        for bad in [
            "\\! id\n",
            "\\o /tmp/x\n",
            "\\set x `id`\n",
            "\\set PROMPT1 x\n",
            "SELECT 1 \\g | id\n",
            "SELECT 1 \\gset \\! id\n",
            "SELECT E'\\\\';\n",
            "SELECT e'x';\n",
            "SELECT U&'x';\n",
            "SELECT 'a\\';\n",
            "SELECT :foo;\n",
            "SELECT :'foo';\n",
            "SELECT :{?foo};\n",
            "\\echo `id`\n",
            "\\echo :x\n",
            "\\copy t from program 'id'\n",
            "\\lo_import /etc/passwd\n",
            "\\w /tmp/x\n",
            "\\ir x\n",
            "\\cd /\n",
            "\\connect postgres\n",
            "SELECT 'unterminated\n",
            "SELECT $a$ unterminated\n",
            "-- \\! id\n",
            "/* \\! id */\n",
            "SELECT 1;\r\n",
            "SELECT \0;\n",
            "`id`\n",
            "\\if :foo\n",
        ] {
            assert!(
                check_admin_script(bad.as_bytes()).is_err(),
                "accepted: {bad:?}"
            );
        }
    }
}

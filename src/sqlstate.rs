//! The SQLSTATEs govsql's own SQL raises (class `GV`), named once. The
//! SQL files raise them by code; the tests of `migrate` tie every code
//! raised in the embedded SQL to this list (and every word the SQL writes
//! as an error class or a run status to the Rust enums).

/// A gate is shut (the first release's gate assert).
pub const GATE_CLOSED: &str = "GV001";
/// The key was already applied (the first release's apply begin).
pub const ALREADY_APPLIED: &str = "GV002";
/// The key was used with other params (the first release's entries).
pub const KEY_CONFLICT: &str = "GV003";
/// The catalog digest differs (the first release's apply begin).
pub const CATALOG_DRIFT: &str = "GV004";
/// The command is not in the database's catalog (or is retired): the
/// entry cannot log it.
pub const NOT_IN_CATALOG: &str = "GV005";
/// A malformed entry call: a mode, actor, key or class the entry does
/// not take.
pub const MALFORMED_CALL: &str = "GV006";
/// The ledger is append-only (an UPDATE, DELETE or TRUNCATE).
pub const LEDGER_APPEND_ONLY: &str = "GV007";
/// The rollback met ledger rows: it keeps everything.
pub const LEDGER_HAS_ROWS: &str = "GV008";
/// The per-job preflight: a value could reach a server-side store.
pub const LOG_EXPOSURE: &str = "GV009";
/// The fail entry: a backend of the timed-out job is still there, so the
/// job is not settled yet.
pub const BACKEND_ALIVE: &str = "GV010";
/// migrate: a recorded migration differs from this build's file.
pub const MIGRATION_CHANGED: &str = "GV011";
/// Inside the dispatcher: the end of verify's read-only checks (caught
/// there, never seen by a caller).
pub const END_OF_CHECKS: &str = "GV090";
/// Inside the dispatcher: a status the command does not expect (caught
/// there: `unexpected_status`).
pub const UNEXPECTED_STATUS: &str = "GV091";
/// Inside the dispatcher: a result over its limit (caught there:
/// `result_too_large`).
pub const RESULT_TOO_LARGE: &str = "GV092";
/// Inside the dispatcher: more rows changed than the command's max_rows
/// (caught there: `row_cap`).
pub const ROW_CAP: &str = "GV093";
/// Inside the dispatcher: a freeze window covers the command at commit
/// (caught there: `frozen`).
pub const FROZEN: &str = "GV094";

/// Every code above.
pub const ALL: [&str; 16] = [
    GATE_CLOSED,
    ALREADY_APPLIED,
    KEY_CONFLICT,
    CATALOG_DRIFT,
    NOT_IN_CATALOG,
    MALFORMED_CALL,
    LEDGER_APPEND_ONLY,
    LEDGER_HAS_ROWS,
    LOG_EXPOSURE,
    BACKEND_ALIVE,
    MIGRATION_CHANGED,
    END_OF_CHECKS,
    UNEXPECTED_STATUS,
    RESULT_TOO_LARGE,
    ROW_CAP,
    FROZEN,
];

//! Freeze windows: spans of time in which no apply of the commands they
//! cover may commit (DESIGN.md, "Approvals bound to what runs"). They live
//! in the target's `dot_iu_freeze` table (migration 009), are written only
//! through the admin identity (`govsql freeze add|remove`, like
//! `migrate`), never deleted (a removal is recorded with who and why), and
//! read by the dispatcher just before each apply commits
//! (`sql/functions/30_dispatch.sql`).
//!
//! Adding or removing a window takes the exclusive side of the advisory
//! lock whose shared side every apply holds from that last check to its
//! commit: a window added while an apply runs is either seen by it, or
//! committed after it.

use serde::Serialize;

use crate::psql::{control_rows, PsqlResult, Script};
use crate::transport::{run_script, Executor};

/// The advisory lock key text shared with the dispatcher.
const LOCK: &str = "SELECT pg_advisory_xact_lock(hashtextextended('govsql:freeze', 0))";

/// When a window starts or ends, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum When {
    /// The database's clock when the window is added, plus this much.
    In(std::time::Duration),
    /// An RFC 3339 time with its offset (`2026-12-24T18:00:00Z`).
    At(String),
}

impl When {
    /// `now`, `+DUR` (`+30m`, `+1500ms`) or an RFC 3339 time with an
    /// explicit offset; anything else is an error that says what to give.
    pub fn parse(text: &str) -> Result<When, FreezeError> {
        if text == "now" {
            return Ok(When::In(std::time::Duration::ZERO));
        }
        if let Some(d) = text.strip_prefix('+') {
            return crate::time::parse_duration(d)
                .map(When::In)
                .ok_or_else(|| FreezeError::Time(text.to_string()));
        }
        if rfc3339(text) {
            return Ok(When::At(text.to_string()));
        }
        Err(FreezeError::Time(text.to_string()))
    }

    fn json(&self) -> serde_json::Value {
        match self {
            When::In(d) => serde_json::json!({ "in_ms": d.as_millis() as u64 }),
            When::At(t) => serde_json::json!({ "at": t }),
        }
    }
}

/// `YYYY-MM-DDTHH:MM[:SS[.frac]]` then `Z` or `±HH:MM` (a space may stand
/// for the `T`).
fn rfc3339(t: &str) -> bool {
    let b = t.as_bytes();
    let digits = |r: std::ops::Range<usize>| {
        b.get(r.clone())
            .is_some_and(|s| s.iter().all(u8::is_ascii_digit))
    };
    if b.len() < 17
        || !(digits(0..4) && b[4] == b'-' && digits(5..7) && b[7] == b'-' && digits(8..10))
        || !matches!(b[10], b'T' | b' ')
        || !(digits(11..13) && b[13] == b':' && digits(14..16))
    {
        return false;
    }
    let mut rest = &t[16..];
    if let Some(r) = rest.strip_prefix(':') {
        if r.len() < 2 || !r.as_bytes()[..2].iter().all(u8::is_ascii_digit) {
            return false;
        }
        rest = &r[2..];
        if let Some(r) = rest.strip_prefix('.') {
            let n = r.bytes().take_while(u8::is_ascii_digit).count();
            if !(1..=6).contains(&n) {
                return false;
            }
            rest = &r[n..];
        }
    }
    rest == "Z"
        || (rest.len() == 6
            && matches!(rest.as_bytes()[0], b'+' | b'-')
            && rest.as_bytes()[3] == b':'
            && [1, 2, 4, 5]
                .iter()
                .all(|&i| rest.as_bytes()[i].is_ascii_digit()))
}

/// What a window covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Every command.
    All,
    /// One command, by name.
    Command(String),
    /// Every command of a category.
    Category(String),
}

/// A new window, as `freeze add` gives it.
#[derive(Debug, Clone)]
pub struct NewWindow {
    /// When it starts.
    pub from: When,
    /// When it ends.
    pub until: When,
    /// What it covers.
    pub scope: Scope,
    /// Why (recorded; 1–500 characters, no control character).
    pub reason: String,
}

/// A window as the database holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Window {
    /// Its id (`freeze remove ID`).
    pub id: i64,
    /// Start, RFC 3339 UTC.
    pub starts_at: String,
    /// End (exclusive), RFC 3339 UTC.
    pub ends_at: String,
    /// What it covers.
    pub scope: Scope,
    /// Why.
    pub reason: String,
    /// Who added it.
    pub created_by: String,
    /// When it was removed, if it was.
    pub removed_at: Option<String>,
    /// Who removed it.
    pub removed_by: Option<String>,
    /// Why it was removed.
    pub removed_reason: Option<String>,
    /// Whether it covers the database's clock now.
    pub active: bool,
}

/// A freeze command that did not complete.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    /// A time that is neither `now`, `+DUR` nor RFC 3339.
    #[error("{0:?} is not a time: give `now`, `+DUR` (+30m, +2h, +1d) or an RFC 3339 time with its offset (2026-12-24T18:00:00Z)")]
    Time(String),
    /// The reason is empty, too long or holds a control character.
    #[error("--reason must be 1-500 characters without control characters (it is recorded with the window)")]
    Reason,
    /// A command or category name that cannot be one.
    #[error("{0:?} is not a command or category name (a-z, 0-9, _ and -)")]
    Name(String),
    /// The window ends before it starts.
    #[error("the window must end after it starts (--until after --from)")]
    Order,
    /// The database refused (SQLSTATE).
    #[error("the database refused it with SQLSTATE {0}{hint}", hint = if .0 == "42P01" { ": the target has no freeze table yet, run `govsql migrate`" } else { "" })]
    Sql(String),
    /// No live window has this id.
    #[error("no live freeze window has id {0} (`govsql freeze list --all` shows removed ones)")]
    NoSuchWindow(i64),
    /// psql failed otherwise.
    #[error("{0}")]
    Psql(String),
}

fn check_reason(reason: &str) -> Result<(), FreezeError> {
    let n = reason.chars().count();
    if (1..=500).contains(&n) && !reason.chars().any(char::is_control) {
        Ok(())
    } else {
        Err(FreezeError::Reason)
    }
}

fn check_name(name: &str) -> Result<(), FreezeError> {
    let ok = (1..=63).contains(&name.len())
        && name.as_bytes()[0].is_ascii_lowercase()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(FreezeError::Name(name.to_string()))
    }
}

/// The time expression of a `When` carried in the one jsonb argument `j`
/// under `key`.
fn when_sql(key: &str) -> String {
    format!(
        "coalesce((j->'{key}'->>'at')::timestamptz, clock_timestamp() + (j->'{key}'->>'in_ms')::bigint * interval '1 millisecond')"
    )
}

const UTC: &str = "'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'";

/// Runs a script whose section `rows` holds window rows; returns them.
async fn run(exec: &dyn Executor, script: Script, rows: usize) -> Result<Vec<Window>, FreezeError> {
    let script = script.finish();
    let deadline = std::time::Duration::from_secs(60);
    match run_script(exec, &script, "govsql:freeze", deadline).await {
        PsqlResult::Complete(secs) => control_rows(rows, secs.get(rows).unwrap_or_default(), 11)
            .map_err(|e| FreezeError::Psql(e.to_string()))?
            .into_iter()
            .map(window)
            .collect(),
        PsqlResult::SqlError { state, .. } if state == "23514" => Err(FreezeError::Order),
        PsqlResult::SqlError { state, .. } => Err(FreezeError::Sql(state)),
        other => Err(FreezeError::Psql(other.to_string())),
    }
}

/// One row per window, in the order `window` reads them.
fn select_windows(filter: &str) -> String {
    format!(
        "SELECT freeze_id, to_char(starts_at AT TIME ZONE 'UTC', {UTC}), to_char(ends_at AT TIME ZONE 'UTC', {UTC}), coalesce(command_name, ''), coalesce(category, ''), reason, created_by, coalesce(to_char(removed_at AT TIME ZONE 'UTC', {UTC}), ''), coalesce(removed_by, ''), coalesce(removed_reason, ''), (removed_at IS NULL AND starts_at <= clock_timestamp() AND clock_timestamp() < ends_at) FROM public.dot_iu_freeze WHERE {filter} ORDER BY freeze_id"
    )
}

fn window(r: Vec<String>) -> Result<Window, FreezeError> {
    let opt = |s: &String| (!s.is_empty()).then(|| s.clone());
    let scope = match (r[3].as_str(), r[4].as_str()) {
        ("", "") => Scope::All,
        (c, "") => Scope::Command(c.to_string()),
        (_, k) => Scope::Category(k.to_string()),
    };
    Ok(Window {
        id: r[0]
            .parse()
            .map_err(|_| FreezeError::Psql("a freeze row of an unexpected shape".into()))?,
        starts_at: r[1].clone(),
        ends_at: r[2].clone(),
        scope,
        reason: r[5].clone(),
        created_by: r[6].clone(),
        removed_at: opt(&r[7]),
        removed_by: opt(&r[8]),
        removed_reason: opt(&r[9]),
        active: r[10] == "t",
    })
}

/// The script of `add`, and the section of its row.
fn add_script(w: &NewWindow, actor: &str) -> Result<(Script, usize), FreezeError> {
    check_reason(&w.reason)?;
    let (command, category) = match &w.scope {
        Scope::All => (None, None),
        Scope::Command(c) => (Some(c), None),
        Scope::Category(k) => (None, Some(k)),
    };
    for n in command.iter().chain(category.iter()) {
        check_name(n)?;
    }
    if let (When::In(a), When::In(b)) = (&w.from, &w.until) {
        if b <= a {
            return Err(FreezeError::Order);
        }
    }
    let args = crate::grammar::json_literal(&serde_json::json!({
        "from": w.from.json(), "until": w.until.json(), "command": command,
        "category": category, "reason": w.reason, "actor": actor,
    }));
    let mut s = Script::new("govsql:freeze", 60_000);
    s.sql("BEGIN");
    s.sql(LOCK);
    s.sql(&format!(
        "INSERT INTO public.dot_iu_freeze (starts_at, ends_at, command_name, category, reason, created_by) SELECT {}, {}, j->>'command', j->>'category', j->>'reason', j->>'actor' FROM (SELECT {args} AS j) a",
        when_sql("from"),
        when_sql("until"),
    ));
    let rows = s.section();
    s.sql(&select_windows(
        "freeze_id = currval(pg_get_serial_sequence('public.dot_iu_freeze', 'freeze_id'))",
    ));
    s.sql("COMMIT");
    Ok((s, rows))
}

/// Adds a window as `actor`; returns it as recorded.
pub async fn add(exec: &dyn Executor, w: &NewWindow, actor: &str) -> Result<Window, FreezeError> {
    let (s, rows) = add_script(w, actor)?;
    run(exec, s, rows)
        .await?
        .pop()
        .ok_or_else(|| FreezeError::Psql("the new window was not read back".into()))
}

/// The windows: live ones (not removed, not ended), or `all`.
pub async fn list(exec: &dyn Executor, all: bool) -> Result<Vec<Window>, FreezeError> {
    let mut s = Script::new("govsql:freeze", 60_000);
    let rows = s.section();
    s.sql(&select_windows(if all {
        "true"
    } else {
        "removed_at IS NULL AND ends_at > clock_timestamp()"
    }));
    run(exec, s, rows).await
}

/// The script of `remove`, and the section of its row.
fn remove_script(id: i64, actor: &str, reason: &str) -> Result<(Script, usize), FreezeError> {
    check_reason(reason)?;
    let args = crate::grammar::json_literal(
        &serde_json::json!({ "id": id, "actor": actor, "reason": reason }),
    );
    let mut s = Script::new("govsql:freeze", 60_000);
    s.sql("BEGIN");
    s.sql(LOCK);
    s.sql(&format!(
        "UPDATE public.dot_iu_freeze f SET removed_at = clock_timestamp(), removed_by = a.j->>'actor', removed_reason = a.j->>'reason' FROM (SELECT {args} AS j) a WHERE f.freeze_id = (a.j->>'id')::bigint AND f.removed_at IS NULL"
    ));
    let rows = s.section();
    s.sql(&select_windows(&format!(
        "freeze_id = {id} AND removed_at IS NOT NULL AND removed_at >= now()"
    )));
    s.sql("COMMIT");
    Ok((s, rows))
}

/// Removes a live window as `actor`, with why; returns it as recorded.
pub async fn remove(
    exec: &dyn Executor,
    id: i64,
    actor: &str,
    reason: &str,
) -> Result<Window, FreezeError> {
    let (s, rows) = remove_script(id, actor, reason)?;
    run(exec, s, rows)
        .await?
        .pop()
        .ok_or(FreezeError::NoSuchWindow(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_or_say_what_to_give() {
        assert_eq!(
            When::parse("+30m").unwrap(),
            When::In(std::time::Duration::from_secs(1800))
        );
        assert_eq!(
            When::parse("now").unwrap(),
            When::In(std::time::Duration::ZERO)
        );
        for ok in [
            "2026-12-24T18:00:00Z",
            "2026-12-24 18:00Z",
            "2026-12-24T18:00:00.125+01:00",
        ] {
            assert_eq!(When::parse(ok).unwrap(), When::At(ok.into()), "{ok}");
        }
        for bad in [
            "2026-12-24",
            "2026-12-24T18:00:00",
            "tomorrow",
            "+5x",
            "2026-12-24T18:00:00Z'; DROP",
        ] {
            let e = When::parse(bad).unwrap_err().to_string();
            assert!(e.contains("RFC 3339"), "{bad}: {e}");
        }
    }

    /// The scripts pass the admin key's grammar at the database host's
    /// remote-gate, whatever the reason holds.
    #[test]
    fn every_freeze_script_passes_the_admin_grammar() {
        let w = NewWindow {
            from: When::parse("+1s").unwrap(),
            until: When::At("2030-01-01T00:00:00Z".into()),
            scope: Scope::Category("structure-op".into()),
            reason: "it's $$ -- \\ ; \\gexec ~|~ é".into(),
        };
        let (add, _) = add_script(&w, "alice").unwrap();
        let (rm, _) = remove_script(7, "bob", &w.reason).unwrap();
        let mut list = Script::new("govsql:freeze", 60_000);
        list.section();
        list.sql(&select_windows("true"));
        for s in [add, rm, list] {
            let text = s.finish().text;
            crate::grammar::check_admin_script(text.as_bytes())
                .unwrap_or_else(|e| panic!("{e:?}: {text}"));
        }
    }

    #[test]
    fn names_and_reasons_are_checked() {
        assert!(check_name("dot_iu_purge_piece").is_ok());
        assert!(check_name("structure-op").is_ok());
        assert!(check_name("Bad Name").is_err());
        assert!(check_reason("release freeze").is_ok());
        assert!(check_reason("").is_err());
        assert!(check_reason("a\nb").is_err());
    }
}

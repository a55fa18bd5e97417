//! Rollouts in the queue: their tables, the statements that create,
//! read, resume and cancel them, and the scheduler loop that starts their
//! children (DESIGN.md "Fleets and rollouts").
//!
//! A rollout is one row in `rollouts` (its command, its params while it
//! may still start children, its strategy, state and pass) and one row
//! per target in `rollout_targets` (in order: pending, skipped,
//! not_started, or its child job's state, with the child's id). Children
//! are ordinary jobs, created lazily by [`tick`]: the scheduling decision
//! ([`crate::rollout::next_step`]), the child's insert and its target's
//! update are one queue transaction, so a crash never leaves a target
//! started twice or a child without its target. A child's idempotency key
//! is derived from the rollout's key and the target
//! ([`crate::rollout::child_key`]): a child started again after any crash
//! or by a resume is answered by the dispatcher with its original run.
//!
//! The rollout's params stay in the queue (0600, secure_delete) while it
//! may start children: until it is done or cancelled (a halted or partial
//! rollout can be resumed; `rollout cancel` ends it for good and erases
//! them).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use super::queue::{self, Access};
use super::Daemon;
use crate::job::{Approval, ErrorClass, Job, JobId, Mode, Params, Refusal};
use crate::rollout::{child_key, next_step, Rollout, RolloutState, RolloutTarget, TargetState};
use crate::time::unix_now;

/// The rollout tables (created with the queue).
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS rollouts (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout_id      TEXT NOT NULL UNIQUE,
    rollout_key     TEXT NOT NULL UNIQUE,
    command         TEXT NOT NULL,
    mode            TEXT NOT NULL,
    params          TEXT,
    actor           TEXT NOT NULL,
    actor_uid       INTEGER NOT NULL,
    preset_class    TEXT,
    preset_message  TEXT,
    canary          INTEGER NOT NULL,
    max_concurrency INTEGER NOT NULL,
    max_errors      INTEGER NOT NULL,
    state           TEXT NOT NULL,
    pass            INTEGER NOT NULL DEFAULT 1,
    submitted_at    INTEGER NOT NULL,
    finished_at     INTEGER,
    approved_by     TEXT,
    approved_at     INTEGER,
    approvals       TEXT,
    approve_reason  TEXT
);
CREATE TABLE IF NOT EXISTS rollout_targets (
    rollout_id  TEXT NOT NULL,
    ord         INTEGER NOT NULL,
    target      TEXT NOT NULL,
    state       TEXT NOT NULL,
    job_id      TEXT,
    error_class TEXT,
    run_id      INTEGER,
    started_at  INTEGER,
    finished_at INTEGER,
    PRIMARY KEY (rollout_id, ord)
);
CREATE INDEX IF NOT EXISTS rollouts_open ON rollouts (seq) WHERE finished_at IS NULL;
CREATE INDEX IF NOT EXISTS jobs_rollout ON jobs (rollout_id) WHERE rollout_id IS NOT NULL;
";

/// A rollout to create: its first child's job (command, params, actor,
/// preset refusal), its targets in order and its resolved strategy.
pub struct NewRollout {
    /// The job every child copies (its target is replaced).
    pub template: Job,
    /// The rollout key (`--idempotency-key` or `rollout:<id>`).
    pub key: String,
    /// The targets, in order.
    pub targets: Vec<String>,
    /// Canaries.
    pub canary: u32,
    /// Resolved concurrency.
    pub max_concurrency: u32,
    /// Resolved error budget.
    pub max_errors: u32,
    /// running, or awaiting_approval.
    pub state: RolloutState,
}

/// What a create found.
pub enum Created {
    /// A new rollout.
    New(Rollout),
    /// A rollout with this key exists already: it is answered as it is.
    Existing(Rollout),
    /// A cancelled rollout with this key (its values erased) was taken up
    /// again with the values given now: a new pass over the targets it
    /// did not run (the same child keys: a target that applied answers
    /// with its original run, or refuses other values as a conflict).
    Reopened(Rollout),
}

const ROLLOUT_COLUMNS: &str = "rollout_id, command, mode, actor, actor_uid, rollout_key, state, canary, max_concurrency, max_errors, pass, submitted_at, finished_at, approved_by, approvals";

fn bad(col: usize, what: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        col,
        rusqlite::types::Type::Text,
        format!("unknown {what} in the queue's rollouts (written by a newer govsql?)").into(),
    )
}

fn row_to_rollout(r: &rusqlite::Row<'_>) -> rusqlite::Result<Rollout> {
    let id: String = r.get(0)?;
    let mode: String = r.get(2)?;
    let state: String = r.get(6)?;
    Ok(Rollout {
        rollout_id: JobId::parse(&id).ok_or_else(|| bad(0, "rollout id"))?,
        command: r.get(1)?,
        mode: Mode::parse(&mode).ok_or_else(|| bad(2, "mode"))?,
        actor: r.get(3)?,
        actor_uid: r.get(4)?,
        idempotency_key: r.get(5)?,
        state: RolloutState::parse(&state).ok_or_else(|| bad(6, "state"))?,
        canary: r.get(7)?,
        max_concurrency: r.get(8)?,
        max_errors: r.get(9)?,
        pass: r.get(10)?,
        submitted_at: r.get(11)?,
        finished_at: r.get(12)?,
        approved_by: r.get(13)?,
        approvals: r
            .get::<_, Option<String>>(14)?
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default(),
        targets: Vec::new(),
    })
}

/// The targets of a rollout, in order; a started child shows its job's
/// live state (the row keeps the last one seen, for when the job is
/// pruned).
fn targets_of(conn: &Connection, id: &str) -> rusqlite::Result<Vec<RolloutTarget>> {
    let mut st = conn.prepare_cached(
        "SELECT t.target, coalesce(j.state, t.state), t.job_id,
                coalesce(json_extract(j.outcome, '$.error_class'), t.error_class),
                coalesce(json_extract(j.outcome, '$.run_id'), t.run_id),
                t.started_at, coalesce(j.finished_at, t.finished_at),
                json_extract(j.outcome, '$.evidence.duration_ms')
           FROM rollout_targets t LEFT JOIN jobs j ON j.job_id = t.job_id
          WHERE t.rollout_id = ?1 ORDER BY t.ord",
    )?;
    let rows = st
        .query_map([id], |r| {
            let state: String = r.get(1)?;
            let job: Option<String> = r.get(2)?;
            Ok(RolloutTarget {
                target: r.get(0)?,
                state: TargetState::try_from(state).map_err(|_| bad(1, "target state"))?,
                job_id: job.and_then(|j| JobId::parse(&j)),
                error_class: r.get(3)?,
                run_id: r.get(4)?,
                started_at: r.get(5)?,
                finished_at: r.get(6)?,
                duration_ms: r.get::<_, Option<i64>>(7)?.map(|d| d.max(0) as u64),
            })
        })?
        .collect();
    rows
}

/// One rollout with its targets.
pub fn get(conn: &Connection, id: &JobId) -> rusqlite::Result<Option<Rollout>> {
    let r = conn
        .prepare_cached(&format!(
            "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE rollout_id = ?1"
        ))?
        .query_row([id.as_str()], row_to_rollout)
        .optional()?;
    match r {
        Some(mut r) => {
            r.targets = targets_of(conn, id.as_str())?;
            Ok(Some(r))
        }
        None => Ok(None),
    }
}

/// The newest rollouts (of one uid, when given, plus those awaiting
/// approval), with their targets.
pub fn list(conn: &Connection, limit: u32, uid: Option<u32>) -> rusqlite::Result<Vec<Rollout>> {
    let mut st = conn.prepare_cached(&format!(
        "SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE (?2 IS NULL OR actor_uid = ?2 OR state = 'awaiting_approval') ORDER BY seq DESC LIMIT ?1"
    ))?;
    let mut out: Vec<Rollout> = st
        .query_map(params![limit, uid], row_to_rollout)?
        .collect::<rusqlite::Result<_>>()?;
    for r in &mut out {
        r.targets = targets_of(conn, r.rollout_id.as_str())?;
    }
    Ok(out)
}

/// Creates a rollout (its targets pending), or answers the one that
/// already has its key.
pub fn create(conn: &Connection, new: &NewRollout, id: &JobId) -> rusqlite::Result<Created> {
    let existing: Option<String> = conn
        .prepare_cached("SELECT rollout_id FROM rollouts WHERE rollout_key = ?1")?
        .query_row([&new.key], |r| r.get(0))
        .optional()?;
    let t = &new.template;
    let params = serde_json::to_string(t.params.as_ref().unwrap_or(&Params::default()))
        .unwrap_or_else(|_| "{}".into());
    let (class, message) = t
        .preset
        .as_ref()
        .map(|p| (p.class.as_str().to_string(), p.message.clone()))
        .unzip();
    if let Some(other) = existing.and_then(|e| JobId::parse(&e)) {
        let r = get(conn, &other)?.ok_or(rusqlite::Error::QueryReturnedNoRows)?;
        let erased: bool = conn
            .prepare_cached("SELECT params IS NULL FROM rollouts WHERE rollout_id = ?1")?
            .query_row([other.as_str()], |row| row.get(0))?;
        let listed: Vec<&str> = r.targets.iter().map(|t| t.target.as_str()).collect();
        let same = r.command == t.command
            && r.mode == t.mode
            && r.actor_uid == t.actor_uid
            && listed == new.targets;
        if !(same && r.state == RolloutState::Cancelled && r.is_over() && erased) {
            return Ok(Created::Existing(r));
        }
        conn.prepare_cached(
            "UPDATE rollout_targets SET state = 'pending', job_id = NULL, error_class = NULL, run_id = NULL, started_at = NULL, finished_at = NULL
              WHERE rollout_id = ?1 AND state NOT IN ('planned', 'applied', 'verified')",
        )?
        .execute([other.as_str()])?;
        conn.prepare_cached(
            "UPDATE rollouts SET params = ?2, preset_class = ?3, preset_message = ?4, state = ?5, pass = pass + 1, finished_at = NULL,
                    approved_by = NULL, approved_at = NULL, approvals = NULL, approve_reason = NULL,
                    canary = ?6, max_concurrency = ?7, max_errors = ?8 WHERE rollout_id = ?1",
        )?
        .execute(params![
            other.as_str(),
            params,
            class,
            message,
            new.state.as_str(),
            new.canary,
            new.max_concurrency,
            new.max_errors
        ])?;
        return get(conn, &other)?
            .map(Created::Reopened)
            .ok_or(rusqlite::Error::QueryReturnedNoRows);
    }
    conn.prepare_cached(
        "INSERT INTO rollouts (rollout_id, rollout_key, command, mode, params, actor, actor_uid, preset_class, preset_message, canary, max_concurrency, max_errors, state, submitted_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
    )?
    .execute(params![
        id.as_str(),
        new.key,
        t.command,
        t.mode.as_str(),
        params,
        t.actor,
        t.actor_uid,
        class,
        message,
        new.canary,
        new.max_concurrency,
        new.max_errors,
        new.state.as_str(),
        unix_now()
    ])?;
    let mut ins = conn.prepare_cached(
        "INSERT INTO rollout_targets (rollout_id, ord, target, state) VALUES (?1, ?2, ?3, 'pending')",
    )?;
    for (i, target) in new.targets.iter().enumerate() {
        ins.execute(params![id.as_str(), i as i64, target])?;
    }
    get(conn, id)?
        .map(Created::New)
        .ok_or(rusqlite::Error::QueryReturnedNoRows)
}

/// The template of a rollout's children.
struct Template {
    rollout_id: JobId,
    key: String,
    command: String,
    mode: Mode,
    params: Option<Params>,
    actor: String,
    actor_uid: u32,
    preset: Option<Refusal>,
    /// The rollout's approval, copied to every child: (approved_by,
    /// approvals as stored, approve_reason).
    approval: Option<(String, Option<String>, Option<String>)>,
}

fn template(conn: &Connection, id: &str) -> rusqlite::Result<Template> {
    conn.prepare_cached(
        "SELECT rollout_id, rollout_key, command, mode, params, actor, actor_uid, preset_class, preset_message, approved_by, approvals, approve_reason FROM rollouts WHERE rollout_id = ?1",
    )?
    .query_row([id], |r| {
        let id: String = r.get(0)?;
        let mode: String = r.get(3)?;
        let params: Option<String> = r.get(4)?;
        let class: Option<String> = r.get(7)?;
        let preset = match class {
            Some(c) => Some(Refusal {
                class: ErrorClass::parse(&c).ok_or_else(|| bad(7, "error class"))?,
                message: r.get::<_, Option<String>>(8)?.unwrap_or_default(),
            }),
            None => None,
        };
        Ok(Template {
            rollout_id: JobId::parse(&id).ok_or_else(|| bad(0, "rollout id"))?,
            key: r.get(1)?,
            command: r.get(2)?,
            mode: Mode::parse(&mode).ok_or_else(|| bad(3, "mode"))?,
            params: params.and_then(|p| serde_json::from_str(&p).ok()),
            actor: r.get(5)?,
            actor_uid: r.get(6)?,
            preset,
            approval: r
                .get::<_, Option<String>>(9)?
                .map(|by| Ok::<_, rusqlite::Error>((by, r.get(10)?, r.get(11)?)))
                .transpose()?,
        })
    })
}

/// What a scheduler round did.
#[derive(Debug, Default)]
pub struct Round {
    /// Targets with a new child (their workers are woken).
    pub wake: Vec<String>,
    /// Whether params were erased (the queue is scrubbed after).
    pub erased: bool,
    /// Rollouts whose state changed: (id, new state).
    pub changed: Vec<(JobId, RolloutState)>,
}

/// One scheduler round over every open rollout: each child's state is
/// copied from its job, then [`next_step`] decides; a halt skips the
/// pending targets; new children are inserted with their targets marked,
/// in this one transaction. A rollout in a final state with no child
/// left running gets its `finished_at` (and, done or cancelled, loses its
/// params).
pub fn tick(
    conn: &Connection,
    approval_before: i64,
    known: &HashSet<String>,
) -> rusqlite::Result<Round> {
    let mut round = Round::default();
    // A rollout whose approval never came within approval_ttl_s: each
    // target's child is refused (a ledger row each).
    let expired: Vec<String> = conn
        .prepare_cached("SELECT rollout_id FROM rollouts WHERE state = 'awaiting_approval' AND submitted_at < ?1")?
        .query_map([approval_before], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for id in expired.iter().filter_map(|i| JobId::parse(i)) {
        let why = Refusal {
            class: ErrorClass::ApprovalExpired,
            message: "no approval came within approval_ttl_s; submit it again".into(),
        };
        match refuse_all(conn, &id, &why, known) {
            Ok((_, wake)) => {
                round.wake.extend(wake);
                round.changed.push((id, RolloutState::Cancelled));
            }
            Err(ChangeError::Sqlite(e)) => return Err(e),
            Err(_) => {}
        }
    }
    let open: Vec<String> = conn
        .prepare_cached("SELECT rollout_id FROM rollouts WHERE finished_at IS NULL AND state <> 'awaiting_approval' ORDER BY seq")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for id in open {
        tick_one(conn, &id, known, &mut round)?;
    }
    Ok(round)
}

fn tick_one(
    conn: &Connection,
    id: &str,
    known: &HashSet<String>,
    round: &mut Round,
) -> rusqlite::Result<()> {
    // The children's last known states, kept beside the job rows.
    conn.prepare_cached(
        "UPDATE rollout_targets SET
            state = (SELECT j.state FROM jobs j WHERE j.job_id = rollout_targets.job_id),
            error_class = (SELECT json_extract(j.outcome, '$.error_class') FROM jobs j WHERE j.job_id = rollout_targets.job_id),
            run_id = (SELECT json_extract(j.outcome, '$.run_id') FROM jobs j WHERE j.job_id = rollout_targets.job_id),
            finished_at = (SELECT j.finished_at FROM jobs j WHERE j.job_id = rollout_targets.job_id)
          WHERE rollout_id = ?1 AND job_id IS NOT NULL
            AND state NOT IN ('planned', 'applied', 'verified', 'refused', 'failed', 'cancelled')
            AND EXISTS (SELECT 1 FROM jobs j WHERE j.job_id = rollout_targets.job_id)",
    )?
    .execute([id])?;
    let Some(r) = get(conn, &JobId::parse(id).ok_or_else(|| bad(0, "rollout id"))?)? else {
        return Ok(());
    };
    let states: Vec<TargetState> = r.targets.iter().map(|t| t.state).collect();
    let step = next_step(r.state, r.canary, r.max_concurrency, r.max_errors, &states);
    let mut state = r.state;
    if let Some(new) = step.state {
        if new == RolloutState::Halted {
            conn.prepare_cached(
                "UPDATE rollout_targets SET state = 'skipped' WHERE rollout_id = ?1 AND state = 'pending'",
            )?
            .execute([id])?;
        }
        conn.prepare_cached("UPDATE rollouts SET state = ?2 WHERE rollout_id = ?1")?
            .execute(params![id, new.as_str()])?;
        round.changed.push((r.rollout_id.clone(), new));
        state = new;
    }
    let mut running = states.iter().any(|s| s.running());
    if !step.start.is_empty() {
        let t = template(conn, id)?;
        for i in step.start {
            let target = &r.targets[i].target;
            if start_child(conn, &t, i, target, None, known)? {
                round.wake.push(target.clone());
                running = true;
            }
        }
    }
    if state.is_final() && !running {
        let erase = matches!(state, RolloutState::Done | RolloutState::Cancelled);
        conn.prepare_cached(
            "UPDATE rollouts SET finished_at = ?2, params = CASE WHEN ?3 THEN NULL ELSE params END WHERE rollout_id = ?1",
        )?
        .execute(params![id, unix_now(), erase])?;
        round.erased |= erase;
    }
    Ok(())
}

/// Inserts the child of target `ord` (refused with `refusal` when given,
/// else as the rollout's template says) and marks the target started. A
/// child of an approved rollout carries its approvals (the dispatcher
/// counts them), approved when it is created. A target no longer in the
/// daemon's config (removed, then restarted) gets no child: it ends
/// failed (`target_removed`), a failure of the rollout; false then.
fn start_child(
    conn: &Connection,
    t: &Template,
    ord: usize,
    target: &str,
    refusal: Option<&Refusal>,
    known: &HashSet<String>,
) -> rusqlite::Result<bool> {
    if !known.contains(target) {
        conn.prepare_cached(
            "UPDATE rollout_targets SET state = 'failed', error_class = 'target_removed', started_at = ?3, finished_at = ?3 WHERE rollout_id = ?1 AND ord = ?2",
        )?
        .execute(params![t.rollout_id.as_str(), ord as i64, unix_now()])?;
        return Ok(false);
    }
    let Some(params) = t.params.clone() else {
        // Erased values never start a child (a resume refuses first).
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "rollout {} has no values left to start {target} with",
            t.rollout_id
        )));
    };
    let mut job = Job::new(
        t.command.clone(),
        t.mode,
        target.to_string(),
        params,
        Some(child_key(&t.key, target)),
        t.actor.clone(),
        t.actor_uid,
    );
    job.rollout_id = Some(t.rollout_id.clone());
    job.preset = refusal.cloned().or_else(|| t.preset.clone());
    let job = queue::insert(conn, &job)?;
    if let Some((by, approvals, reason)) = &t.approval {
        conn.prepare_cached(
            "UPDATE jobs SET approved_by = ?2, approved_at = ?3, approvals = ?4, approve_reason = ?5 WHERE job_id = ?1",
        )?
        .execute(params![job.job_id.as_str(), by, unix_now(), approvals, reason])?;
    }
    conn.prepare_cached(
        "UPDATE rollout_targets SET state = ?3, job_id = ?4, started_at = ?5, error_class = NULL, run_id = NULL, finished_at = NULL WHERE rollout_id = ?1 AND ord = ?2",
    )?
    .execute(params![
        t.rollout_id.as_str(),
        ord as i64,
        job.state.as_str(),
        job.job_id.as_str(),
        unix_now()
    ])?;
    Ok(true)
}

/// Why a resume or cancel does not apply.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// No such rollout.
    #[error("no rollout {0}; `govsql rollouts` lists them")]
    NotFound(JobId),
    /// Not in a state this change applies to.
    #[error("{0}")]
    State(String),
    /// The queue said no.
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
}

/// A new pass over the targets not ended planned, applied or verified
/// (their children are started again under the same keys: one that did
/// apply is answered with its original run).
pub fn resume(conn: &Connection, id: &JobId) -> Result<Rollout, ChangeError> {
    let r = get(conn, id)?.ok_or_else(|| ChangeError::NotFound(id.clone()))?;
    match r.state {
        RolloutState::Halted | RolloutState::Partial | RolloutState::Cancelled => {}
        other => {
            return Err(ChangeError::State(format!(
                "rollout {id} is {other}; only a halted or partial rollout resumes (a cancelled one: submit it again under its key)"
            )))
        }
    }
    if r.finished_at.is_none() {
        return Err(ChangeError::State(format!(
            "children of rollout {id} still run; resume once they ended (`govsql rollout status {id}`)"
        )));
    }
    let has_values: bool = conn
        .prepare_cached("SELECT params IS NOT NULL FROM rollouts WHERE rollout_id = ?1")?
        .query_row([id.as_str()], |r| r.get(0))?;
    if !has_values {
        return Err(ChangeError::State(format!(
            "rollout {id} was cancelled and its values erased; submit it again with the same --targets and --idempotency-key {}: a new pass runs the targets it did not reach",
            r.idempotency_key
        )));
    }
    conn.prepare_cached(
        "UPDATE rollout_targets SET state = 'pending', job_id = NULL, error_class = NULL, run_id = NULL, started_at = NULL, finished_at = NULL
          WHERE rollout_id = ?1 AND state NOT IN ('planned', 'applied', 'verified')",
    )?
    .execute([id.as_str()])?;
    conn.prepare_cached(
        "UPDATE rollouts SET state = 'running', pass = pass + 1, finished_at = NULL WHERE rollout_id = ?1",
    )?
    .execute([id.as_str()])?;
    get(conn, id)?.ok_or_else(|| ChangeError::NotFound(id.clone()))
}

/// Cancels a rollout: nothing more starts, its queued children are
/// refused `cancelled` by their workers, running ones finish. A halted or
/// partial rollout is ended for good (its values erased); one awaiting
/// approval leaves a refused (cancelled) row on each target. Returns the
/// rollout and the targets whose queued children were cancelled.
pub fn cancel(
    conn: &Connection,
    id: &JobId,
    by: &str,
    known: &HashSet<String>,
) -> Result<(Rollout, Vec<String>), ChangeError> {
    let r = get(conn, id)?.ok_or_else(|| ChangeError::NotFound(id.clone()))?;
    if matches!(r.state, RolloutState::Done | RolloutState::Cancelled) {
        return Err(ChangeError::State(format!(
            "rollout {id} is {} already",
            r.state
        )));
    }
    if r.state == RolloutState::AwaitingApproval {
        // Like a job cancelled while it waits: each target records it.
        let why = Refusal {
            class: ErrorClass::Cancelled,
            message: format!("rollout cancelled by {by}"),
        };
        return refuse_all(conn, id, &why, known);
    }
    conn.prepare_cached(
        "UPDATE rollout_targets SET state = 'not_started' WHERE rollout_id = ?1 AND state = 'pending'",
    )?
    .execute([id.as_str()])?;
    let mut wake = Vec::new();
    {
        let mut st = conn.prepare_cached(
            "UPDATE jobs SET state = 'queued', preset_class = ?2, preset_message = ?3
              WHERE rollout_id = ?1 AND state IN ('queued', 'awaiting_approval') RETURNING target",
        )?;
        let rows = st.query_map(
            params![
                id.as_str(),
                ErrorClass::Cancelled.as_str(),
                format!("rollout cancelled by {by}")
            ],
            |r| r.get::<_, String>(0),
        )?;
        for t in rows {
            wake.push(t?);
        }
    }
    conn.prepare_cached(
        "UPDATE rollouts SET state = 'cancelled', finished_at = NULL WHERE rollout_id = ?1",
    )?
    .execute([id.as_str()])?;
    let r = get(conn, id)?.ok_or_else(|| ChangeError::NotFound(id.clone()))?;
    Ok((r, wake))
}

/// Adds an approval to a rollout awaiting approval; with `needed` of
/// them it runs (its children carry the approvals).
pub fn approve(
    conn: &Connection,
    id: &JobId,
    approval: Approval,
    needed: u8,
) -> Result<Rollout, ChangeError> {
    let mut r = get(conn, id)?.ok_or_else(|| ChangeError::NotFound(id.clone()))?;
    if r.state != RolloutState::AwaitingApproval {
        return Err(ChangeError::State(format!(
            "rollout {id} is {}, not awaiting approval",
            r.state
        )));
    }
    if r.approvals.iter().any(|a| a.by == approval.by) {
        return Err(ChangeError::State(format!(
            "{} has already approved rollout {id}",
            approval.by
        )));
    }
    let reason = approval
        .reason
        .as_ref()
        .map(|why| format!("approved by {}: {why}", approval.by));
    r.approvals.push(approval);
    let list = serde_json::to_string(&r.approvals).unwrap_or_else(|_| "[]".into());
    if r.approvals.len() >= usize::from(needed.max(1)) {
        let names: Vec<&str> = r.approvals.iter().map(|a| a.by.as_str()).collect();
        conn.prepare_cached(
            "UPDATE rollouts SET state = 'running', approved_by = ?2, approved_at = ?3, approve_reason = ?4, approvals = ?5 WHERE rollout_id = ?1",
        )?
        .execute(params![id.as_str(), names.join(","), unix_now(), reason, list])?;
    } else {
        conn.prepare_cached("UPDATE rollouts SET approvals = ?2 WHERE rollout_id = ?1")?
            .execute(params![id.as_str(), list])?;
    }
    get(conn, id)?.ok_or_else(|| ChangeError::NotFound(id.clone()))
}

/// Ends a rollout awaiting approval refused (rejected, or its approval
/// expired): every target's child is created refused `why`, so each
/// target's ledger records it; the rollout is cancelled. Returns it and
/// the targets to wake.
pub fn refuse_all(
    conn: &Connection,
    id: &JobId,
    why: &Refusal,
    known: &HashSet<String>,
) -> Result<(Rollout, Vec<String>), ChangeError> {
    let r = get(conn, id)?.ok_or_else(|| ChangeError::NotFound(id.clone()))?;
    if r.state != RolloutState::AwaitingApproval {
        return Err(ChangeError::State(format!(
            "rollout {id} is {}, not awaiting approval",
            r.state
        )));
    }
    let t = template(conn, id.as_str())?;
    let mut wake = Vec::new();
    for (i, target) in r.targets.iter().enumerate() {
        if target.state == TargetState::Pending
            && start_child(conn, &t, i, &target.target, Some(why), known)?
        {
            wake.push(target.target.clone());
        }
    }
    conn.prepare_cached("UPDATE rollouts SET state = 'cancelled' WHERE rollout_id = ?1")?
        .execute([id.as_str()])?;
    let r = get(conn, id)?.ok_or_else(|| ChangeError::NotFound(id.clone()))?;
    Ok((r, wake))
}

/// A rollout awaiting approval with its values, for `show` (never logged).
pub fn shown(conn: &Connection, id: &JobId) -> rusqlite::Result<Option<(Rollout, Params)>> {
    let Some(r) = get(conn, id)? else {
        return Ok(None);
    };
    let t = template(conn, id.as_str())?;
    Ok(Some((r, t.params.unwrap_or_default())))
}

/// Deletes the rollouts that finished before `before` (retention_days),
/// with their targets.
pub fn prune(conn: &Connection, before: i64) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "DELETE FROM rollout_targets WHERE rollout_id IN (SELECT rollout_id FROM rollouts WHERE finished_at < ?1)",
    )?
    .execute([before])?;
    conn.prepare_cached("DELETE FROM rollouts WHERE finished_at < ?1")?
        .execute([before])
}

/// Rollouts per state, their targets per state, and when the oldest
/// running rollout was submitted: for health and metrics.
#[derive(Debug, Default, Clone)]
pub struct RolloutCounts {
    /// Rollouts per state.
    pub by_state: std::collections::BTreeMap<RolloutState, i64>,
    /// Targets of open rollouts per state (pending, skipped, a job state).
    pub targets: std::collections::BTreeMap<String, i64>,
    /// When the oldest running rollout was submitted (unix seconds).
    pub oldest_running: Option<i64>,
}

/// See [`RolloutCounts`].
pub fn counts(conn: &Connection) -> rusqlite::Result<RolloutCounts> {
    let mut out = RolloutCounts::default();
    let mut st = conn
        .prepare_cached("SELECT state, count(*), min(submitted_at) FROM rollouts GROUP BY state")?;
    let mut rows = st.query([])?;
    while let Some(r) = rows.next()? {
        let s: String = r.get(0)?;
        let state = RolloutState::parse(&s).ok_or_else(|| bad(0, "state"))?;
        if state == RolloutState::Running {
            out.oldest_running = r.get(2)?;
        }
        out.by_state.insert(state, r.get(1)?);
    }
    let mut st = conn.prepare_cached(
        "SELECT coalesce(j.state, t.state), count(*) FROM rollout_targets t
           JOIN rollouts r ON r.rollout_id = t.rollout_id AND r.finished_at IS NULL
           LEFT JOIN jobs j ON j.job_id = t.job_id GROUP BY 1",
    )?;
    let mut rows = st.query([])?;
    while let Some(r) = rows.next()? {
        out.targets.insert(r.get(0)?, r.get(1)?);
    }
    Ok(out)
}

/// The scheduler loop: a round whenever a child ended or a rollout was
/// submitted, resumed or cancelled ([`Daemon::rollouts_changed`]), and
/// at least once a second; it starts nothing once shutdown began.
pub async fn run(daemon: Arc<Daemon>) {
    if !daemon.recovered().await {
        return;
    }
    let shutdown = daemon.shutdown_token().clone();
    let known = Arc::new(daemon.target_names());
    loop {
        let before = unix_now() - daemon.config().daemon.approval_ttl_s as i64;
        let known = known.clone();
        match daemon
            .queue()
            .custom(Access::Write, move |c| tick(c, before, &known))
            .await
        {
            Ok(round) => {
                for (id, state) in &round.changed {
                    tracing::info!(rollout_id = %id, state = %state, "rollout state");
                }
                for t in &round.wake {
                    daemon.wake(t);
                }
                if round.erased {
                    // The erased values leave the disk (checkpoint, scrub).
                    let _ = daemon.queue().custom(Access::Erase, |_| Ok(())).await;
                }
            }
            Err(e) => tracing::error!(cause = %e, "rollout scheduler: cannot read the queue"),
        }
        tokio::select! {
            _ = daemon.rollouts.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Params;

    fn new_rollout(targets: &[&str], max_concurrency: u32) -> NewRollout {
        NewRollout {
            template: Job::new(
                "dot_iu_add_piece".into(),
                Mode::Apply,
                targets[0].into(),
                Params(vec![("body".into(), "CANARY-r1".into())]),
                None,
                "alice".into(),
                1000,
            ),
            key: "k1".into(),
            targets: targets.iter().map(|t| t.to_string()).collect(),
            canary: 0,
            max_concurrency,
            max_errors: 0,
            state: RolloutState::Running,
        }
    }

    fn known(names: &[&str]) -> HashSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    fn conn() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        queue::prepare(&c).unwrap();
        c
    }

    #[test]
    fn a_round_starts_children_under_derived_keys_and_the_same_key_finds_the_rollout() {
        let c = conn();
        let id = JobId::new();
        let new = new_rollout(&["a", "b", "c"], 2);
        assert!(matches!(create(&c, &new, &id).unwrap(), Created::New(_)));
        let round = tick(&c, 0, &known(&["a", "b", "c", "d"])).unwrap();
        assert_eq!(round.wake, ["a", "b"]);
        // A second round starts nothing more while two run.
        assert!(tick(&c, 0, &known(&["a", "b", "c", "d"]))
            .unwrap()
            .wake
            .is_empty());
        let keys: Vec<String> = c
            .prepare("SELECT idempotency_key FROM jobs ORDER BY seq")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(keys, ["k1@a", "k1@b"]);
        // One ends: the third starts.
        c.execute(
            "UPDATE jobs SET state = 'applied', params = NULL, finished_at = 1 WHERE target = 'a'",
            [],
        )
        .unwrap();
        assert_eq!(
            tick(&c, 0, &known(&["a", "b", "c", "d"])).unwrap().wake,
            ["c"]
        );
        match create(&c, &new, &JobId::new()).unwrap() {
            Created::Existing(r) => assert_eq!(r.rollout_id, id),
            Created::New(_) | Created::Reopened(_) => {
                panic!("the same key made a second rollout")
            }
        }
        // All end: done, its values erased.
        c.execute(
            "UPDATE jobs SET state = 'applied', params = NULL, finished_at = 2",
            [],
        )
        .unwrap();
        let round = tick(&c, 0, &known(&["a", "b", "c", "d"])).unwrap();
        assert_eq!(round.changed, [(id.clone(), RolloutState::Done)]);
        assert!(round.erased);
        let r = get(&c, &id).unwrap().unwrap();
        assert!(r.is_over());
        let params: Option<String> = c
            .query_row("SELECT params FROM rollouts", [], |r| r.get(0))
            .unwrap();
        assert_eq!(params, None);
    }

    #[test]
    fn a_halt_skips_the_rest_and_a_resume_runs_only_what_did_not_succeed() {
        let c = conn();
        let id = JobId::new();
        assert!(matches!(
            create(&c, &new_rollout(&["a", "b", "c", "d"], 2), &id).unwrap(),
            Created::New(_)
        ));
        tick(&c, 0, &known(&["a", "b", "c", "d"])).unwrap();
        c.execute(
            "UPDATE jobs SET state = 'applied', finished_at = 1 WHERE target = 'a'",
            [],
        )
        .unwrap();
        c.execute(
            "UPDATE jobs SET state = 'failed', finished_at = 1 WHERE target = 'b'",
            [],
        )
        .unwrap();
        let round = tick(&c, 0, &known(&["a", "b", "c", "d"])).unwrap();
        assert_eq!(round.changed, [(id.clone(), RolloutState::Halted)]);
        let r = get(&c, &id).unwrap().unwrap();
        let states: Vec<&str> = r.targets.iter().map(|t| t.state.as_str()).collect();
        assert_eq!(states, ["applied", "failed", "skipped", "skipped"]);
        assert!(r.is_over() && !round.erased);
        let r = resume(&c, &id).unwrap();
        assert_eq!(r.pass, 2);
        let round = tick(&c, 0, &known(&["a", "b", "c", "d"])).unwrap();
        assert_eq!(round.wake, ["b", "c"]);
        // b's new child has the same key as the first.
        let n: i64 = c
            .query_row(
                "SELECT count(*) FROM jobs WHERE idempotency_key = 'k1@b'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 2);
        assert!(matches!(resume(&c, &id), Err(ChangeError::State(_))));
        let (r, _) = cancel(&c, &id, "bob", &known(&["a", "b", "c", "d"])).unwrap();
        assert_eq!(r.state, RolloutState::Cancelled);
        assert_eq!(r.targets[3].state, TargetState::Cancelled);
    }

    #[test]
    fn a_target_gone_from_the_config_fails_without_a_child_and_halts_the_rollout() {
        let c = conn();
        let id = JobId::new();
        assert!(matches!(
            create(&c, &new_rollout(&["gone", "a"], 1), &id).unwrap(),
            Created::New(_)
        ));
        let round = tick(&c, 0, &known(&["a"])).unwrap();
        assert!(round.wake.is_empty());
        let round = tick(&c, 0, &known(&["a"])).unwrap();
        assert_eq!(round.changed, [(id.clone(), RolloutState::Halted)]);
        let r = get(&c, &id).unwrap().unwrap();
        assert_eq!(r.targets[0].state.as_str(), "failed");
        assert_eq!(r.targets[0].error_class.as_deref(), Some("target_removed"));
        assert_eq!(r.targets[1].state, TargetState::Skipped);
        let jobs: i64 = c
            .query_row("SELECT count(*) FROM jobs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(jobs, 0);
    }
}

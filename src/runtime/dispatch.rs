//! The database's entries, called once per job: the script that calls
//! one (`COPY (SELECT kind, value FROM public.<entry>(…)) TO STDOUT`, so
//! result values come back exact), and the reading of its answer: the
//! command's result rows, then one `run` row (JSON).
//!
//! The params travel as the entry's one jsonb argument, a dollar-quoted
//! literal with a random tag; inside the database they are bound to the
//! stored statements, never spliced into SQL text.
//!
//! This module is the one door to the entries: the job's (dispatch,
//! refuse, fail) and the reads ([`read_ledger`] for `govsql log`,
//! [`read_status`] for `catalog check` and `self-test`). Nothing else
//! builds an entry call.

use serde::Deserialize;
use serde_json::{json, Value};

use super::calls;
use super::*;
use crate::grammar::{entry_call, Entry as GrammarEntry};
use crate::psql::copy_rows;

/// The `run` row every entry ends with.
#[derive(Debug, Deserialize)]
pub(super) struct RunRow {
    run_id: i64,
    status: RunStatus,
    class: Option<String>,
    #[serde(default)]
    pub(super) closed_gates: Vec<String>,
    #[serde(default)]
    pub(super) reasons: Vec<Option<String>>,
    #[serde(default)]
    replayed: bool,
    params_digest: String,
    /// plan: the plan digest the database computed.
    #[serde(default)]
    plan_digest: Option<String>,
}

impl RunRow {
    pub(super) fn log_row(&self) -> LogRow {
        LogRow {
            run_id: self.run_id,
            status: self.status,
            digest: self.params_digest.clone(),
            replayed: self.replayed,
            plan_digest: self.plan_digest.clone(),
        }
    }

    pub(super) fn class(&self) -> Option<ErrorClass> {
        self.class.as_deref().and_then(ErrorClass::parse)
    }
}

/// An entry's whole answer.
pub(super) struct Answer {
    /// The command's result values, one field per row.
    pub(super) rows: Vec<Row>,
    /// The ledger row.
    pub(super) run: RunRow,
}

/// The entries of the database's dispatcher family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Entry {
    /// Plan, apply or verify a command.
    Dispatch,
    /// Record a refusal the daemon found.
    Refuse,
    /// Record a failure the daemon saw (and settle an apply).
    Fail,
}

impl Runtime {
    /// The job's params as one JSON object (values as strings).
    pub(super) fn params_json(ctx: &Ctx<'_>) -> Value {
        let map: serde_json::Map<String, Value> = ctx
            .job
            .param_pairs()
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        Value::Object(map)
    }

    /// Facts only the daemon knows, for the ledger's evidence.
    pub(super) fn client_facts(&self, ctx: &Ctx<'_>) -> ClientFacts {
        let reason = match ctx.job.preset.as_ref() {
            // A rejection's reason (the approver's words, capped) is evidence.
            Some(r) if r.class == ErrorClass::Rejected => Some(&r.message),
            _ => ctx.job.approve_reason.as_ref(),
        };
        ClientFacts {
            job_id: Some(ctx.job.job_id.to_string()),
            transport: Some(self.executor.kind().to_string()),
            target: Some(self.target.clone()),
            duration_ms: Some(ctx.started.elapsed().as_millis() as u64),
            host_key: self.executor.host_key_fingerprint(),
            rollout_id: ctx.job.rollout_id.as_ref().map(|r| r.to_string()),
            approved_by: ctx.job.approved_by.clone(),
            reason: reason.map(|r| r.chars().take(200).collect()),
            // The job's own times (a row written late says when it happened).
            submitted_at: Some(ctx.job.submitted_at.to_string()),
            ended_at: ctx.job.finished_at.map(|at| at.to_string()),
            plan_digest: ctx.job.plan_digest.clone(),
            plan_covers: ctx.job.plan_covers.clone(),
            approvals: (!ctx.job.approvals.is_empty()).then(|| ctx.job.approvals.clone()),
        }
    }

    /// The one statement of an entry call (built by the grammar the
    /// database host's remote-gate checks).
    fn entry_sql(&self, ctx: &Ctx<'_>, entry: Entry, class: Option<&ErrorClass>) -> String {
        let params = Self::params_json(ctx);
        let client = self.client_facts(ctx);
        let (mode, command, key, actor) = (
            ctx.job.mode.as_str(),
            ctx.cmd.name.as_str(),
            ctx.key(),
            ctx.job.actor.as_str(),
        );
        let record = |entry| calls::Record {
            entry,
            mode,
            command,
            params: &params,
            key,
            actor,
            class: class.map(ErrorClass::as_str).unwrap_or("internal"),
            client: &client,
        };
        match entry {
            Entry::Dispatch => calls::statement(&calls::Dispatch {
                mode,
                command,
                params: &params,
                key,
                actor,
                catalog_digest: self.catalog.digest(),
                allow_log_exposure: self.allow_log_exposure,
                max_result_bytes: i64::try_from(self.max_result_bytes).unwrap_or(i64::MAX),
                client: &client,
            }),
            Entry::Refuse => calls::statement(&record(GrammarEntry::Refuse)),
            Entry::Fail => calls::statement(&record(GrammarEntry::Fail)),
        }
    }

    /// Calls an entry; its answer, or psql's result when there is none.
    pub(super) async fn call(
        &self,
        ctx: &Ctx<'_>,
        entry: Entry,
        class: Option<&ErrorClass>,
    ) -> Result<Answer, PsqlResult> {
        let mut s = self.script(ctx);
        s.section();
        s.sql(&self.entry_sql(ctx, entry, class));
        match self.exec(ctx, &s.finish()).await {
            PsqlResult::Complete(secs) => read_answer(secs.get(0).unwrap_or_default())
                .and_then(|a| fits(entry, ctx.job.mode, &a.run).map(|_| a))
                .map_err(PsqlResult::Malformed),
            other => Err(other),
        }
    }

    /// A plan, apply or verify through the dispatcher, read into a
    /// verdict (plan words its own message from the answer).
    pub(super) async fn dispatch(&self, ctx: &Ctx<'_>) -> Verdict {
        match self.call(ctx, Entry::Dispatch, None).await {
            Ok(answer) => written(ctx, answer),
            Err(result) => self.no_answer(ctx, result),
        }
    }

    /// What to do when a dispatch gave no answer.
    pub(super) fn no_answer(&self, ctx: &Ctx<'_>, result: PsqlResult) -> Verdict {
        let apply = ctx.job.mode == Mode::Apply;
        match result {
            // The database's catalog does not know the command: it cannot
            // be logged there.
            PsqlResult::SqlError { state, .. } if state == crate::sqlstate::NOT_IN_CATALOG => Verdict::Unlogged {
                class: ErrorClass::CatalogDrift,
                message: format!(
                    "the database's catalog does not know {}; run `govsql migrate` (catalog drift)",
                    ctx.cmd.name
                ),
            },
            // The preflight stopped the script before the statement that
            // carries the values was sent; a row cannot be written without
            // sending them.
            PsqlResult::SqlError { state, .. } if state == crate::grammar::PREFLIGHT_SQLSTATE => {
                Verdict::Unlogged {
                    class: ErrorClass::LogExposure,
                    message: "refused before any value was sent: a value could reach the server log or a statistics store (a log_*, debug_print_* or sampling setting of the runtime role is overridden, or pg_stat_statements, auto_explain or pgaudit would keep it); `govsql self-test` names which. Fix the settings (`govsql migrate` sets the role's), or set allow_server_log_exposure = true on the target. No ledger row could be written without sending the values".into(),
                }
            }
            // The call failed as a whole: nothing of it committed.
            PsqlResult::SqlError { state, .. } => {
                let class = match ErrorClass::from_sqlstate(&state) {
                    ErrorClass::Sql(s) if s.starts_with("GV") => ErrorClass::Internal,
                    c => c,
                };
                let message = if class == ErrorClass::Timeout {
                    "the job passed its statement timeout; its transaction was rolled back".into()
                } else {
                    format!("the governed call failed with SQLSTATE {state}; nothing was committed")
                };
                Verdict::record(class, message)
            }
            PsqlResult::NotStarted { class, message } => Verdict::NotStarted { class, message },
            // The gate refused the script before psql read it: nothing
            // ran, and the gate would refuse the ledger write as well.
            PsqlResult::GateRefused(m) => Verdict::Unlogged {
                class: ErrorClass::RemoteGate,
                message: format!("{m}; nothing ran and no ledger row could be written"),
            },
            PsqlResult::CutOff { class, message } if apply => Verdict::Unknown { class, message },
            PsqlResult::CutOff { class, message } => Verdict::record(class, message),
            PsqlResult::Malformed(m) if apply => Verdict::Unknown {
                class: ErrorClass::Internal,
                message: format!("unexpected psql output: {m}"),
            },
            PsqlResult::Malformed(m) => {
                Verdict::record(ErrorClass::Internal, format!("unexpected psql output: {m}"))
            }
            PsqlResult::Complete(_) => Verdict::record(
                ErrorClass::Internal,
                "a complete answer was read as a failure",
            ),
        }
    }
}

/// The verdict of a dispatcher's answer (the ledger row is written).
pub(super) fn written(ctx: &Ctx<'_>, answer: Answer) -> Verdict {
    let run = &answer.run;
    let class = run.class();
    let row = run.log_row();
    let message = match (row.status, &class) {
        (RunStatus::Applied, _) if row.replayed => format!(
            "already applied under idempotency key {}; not run again",
            ctx.key()
        ),
        (RunStatus::Verified, _) if row.replayed => format!(
            "already verified under idempotency key {}; not run again",
            ctx.key()
        ),
        (RunStatus::Applied, _) => format!("applied {} in one transaction", ctx.cmd.name),
        (RunStatus::Verified, _) => format!("verified: {} check(s) ok", answer.rows.len()),
        (RunStatus::Planned, _) => "planned".to_string(),
        (_, Some(c)) => class_message(ctx, c, run),
        (status, None) => format!("{status}"),
    };
    // The rows the command returned: for a run that succeeded, and for a
    // verify whose checks answered (so the submitter sees why).
    let has_rows = !row.replayed
        && (matches!(row.status, RunStatus::Applied | RunStatus::Verified)
            || class == Some(ErrorClass::VerificationFailed));
    let rows = has_rows.then_some(answer.rows);
    Verdict::Written {
        closed: run.closed_gates.clone(),
        row,
        class,
        rows,
        message,
    }
}

/// Why the database refused or failed a job, in words.
fn class_message(ctx: &Ctx<'_>, class: &ErrorClass, run: &RunRow) -> String {
    match class {
        ErrorClass::GateClosed => format!("refused: closed gates: {}", run.closed_gates.join(", ")),
        ErrorClass::CatalogDrift => "the database holds another catalog than this govsql (drift); run `govsql migrate` or fix the configured catalog".into(),
        ErrorClass::TargetMissing => format!(
            "a target function of {} does not resolve in the database; install it and run `govsql migrate`",
            ctx.cmd.name
        ),
        ErrorClass::IdempotencyConflict => format!(
            "idempotency key {} was already used with other params",
            ctx.key()
        ),
        ErrorClass::LogExposure => "a param value could reach the server log (a log_* setting of the runtime role is overridden, or pgaudit/auto_explain logs); fix the settings, or set allow_server_log_exposure = true on the target".into(),
        ErrorClass::BadParams => {
            let why = run.reasons.iter().flatten().next().cloned().unwrap_or_default();
            format!("refused by the database: {why}")
        }
        ErrorClass::UnsafePlan => format!(
            "{} changes data; verify runs read-only commands only",
            ctx.cmd.name
        ),
        ErrorClass::VerificationFailed => "verification failed: a check's status is not ok".into(),
        ErrorClass::UnexpectedStatus => format!(
            "a function of {} answered a status it does not expect (expected {}); rolled back",
            ctx.cmd.name,
            ctx.cmd.expected_statuses().join(", ")
        ),
        ErrorClass::ResultTooLarge => {
            "the result was over the target's max_result_bytes; rolled back, nothing returned"
                .into()
        }
        ErrorClass::PlanDrift => format!(
            "the pinned plan no longer matches what would run (moved: {}); nothing ran. Plan again, and have the new plan approved",
            run.reasons.iter().flatten().cloned().collect::<Vec<_>>().join(", ")
        ),
        ErrorClass::ApprovalMissing if !run.reasons.is_empty() => format!(
            "refused: {}; an approval approves a plan once. Plan again, and have the new plan approved",
            run.reasons.iter().flatten().cloned().collect::<Vec<_>>().join(", ")
        ),
        ErrorClass::RowCap => format!(
            "the apply changed more rows than {}'s max_rows ({}); rolled back, nothing committed (the counts per table are in the ledger's evidence)",
            ctx.cmd.name,
            ctx.cmd.max_rows.map_or_else(|| "?".to_string(), |n| n.to_string())
        ),
        ErrorClass::Frozen => format!(
            "a freeze window covers {} now (`govsql freeze list` shows it); nothing committed",
            ctx.cmd.name
        ),
        ErrorClass::Sql(state) => format!(
            "the command's SQL failed with SQLSTATE {state}; nothing was committed"
        ),
        other => format!("{other}"),
    }
}

/// Whether the database's `run` row can be the answer to this entry for
/// this mode: a forged or confused answer (a verify reported `applied`, a
/// refusal entry reporting a success, an unknown class word, a run id that
/// is not one) is malformed, never believed.
fn fits(entry: Entry, mode: Mode, run: &RunRow) -> Result<(), String> {
    let success = match mode {
        Mode::Plan => RunStatus::Planned,
        Mode::Apply => RunStatus::Applied,
        Mode::Verify => RunStatus::Verified,
    };
    let bad = |why: &str| {
        Err(format!(
            "the database's answer does not fit a {mode} job: {why}"
        ))
    };
    if run.run_id <= 0 {
        return bad("its run id is not a ledger row's");
    }
    let class = match run.class.as_deref() {
        None => None,
        Some(word) => match ErrorClass::parse(word) {
            Some(c) => Some(c),
            None => return bad("its error class is not a known class"),
        },
    };
    let status_ok = match entry {
        Entry::Dispatch => {
            run.status == success
                || run.status == RunStatus::Refused
                || (run.status == RunStatus::Failed && mode != Mode::Plan)
        }
        // Both settle by key first: a success under the key is replayed.
        Entry::Refuse => {
            (run.replayed && run.status == success)
                || (!run.replayed && run.status == RunStatus::Refused)
        }
        // A replayed failure is the row this job already has (its owed
        // row, written once however often it is sent).
        Entry::Fail => {
            (run.replayed && run.status == success)
                || run.status
                    == if mode == Mode::Plan {
                        RunStatus::Refused
                    } else {
                        RunStatus::Failed
                    }
        }
    };
    if !status_ok {
        return bad(&format!("status {}", run.status));
    }
    if run.replayed && run.status != success && entry != Entry::Fail {
        return bad("a replayed run that did not succeed");
    }
    match (run.status == success, class) {
        (true, Some(_)) => bad("a success with an error class"),
        (false, None) => bad("a refusal or failure without a class"),
        _ => Ok(()),
    }
}

/// Reads an entry's COPY output: `row` values, then one `run` row.
fn read_answer(bytes: &[u8]) -> Result<Answer, String> {
    let records = copy_rows(0, bytes).map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    let mut run = None;
    for rec in records {
        let [Some(kind), value] = rec.as_slice() else {
            return Err("an answer record without its kind".into());
        };
        match (kind.as_str(), &run) {
            ("row", None) => rows.push(vec![value.clone()]),
            ("run", None) => {
                let text = value.as_deref().ok_or("a run record without its value")?;
                run = Some(
                    serde_json::from_str::<RunRow>(text)
                        .map_err(|_| "a run record that is not the promised JSON".to_string())?,
                );
            }
            _ => return Err("records after the run record, or of an unknown kind".into()),
        }
    }
    let run = run.ok_or("no run record")?;
    Ok(Answer { rows, run })
}

/// The ledger rows `fn_dot_iu_ledger` answers for a filter (`govsql log`),
/// newest first, read on the target's read lane.
pub async fn read_ledger(
    exec: &dyn Executor,
    filter: &crate::protocol::LogFilter,
    limit: u32,
    timeout: Duration,
) -> Result<Vec<crate::protocol::LogEntry>, String> {
    let mut f = serde_json::to_value(filter).map_err(|e| e.to_string())?;
    if let Some(since) = filter.since {
        f["since"] = json!(crate::time::utc_text(since).replace('Z', "+00"));
    }
    let mut s = Script::new("govsql:log", timeout.as_millis() as u64 + 2000);
    s.section();
    s.sql(&calls::statement(&calls::Ledger { filter: &f, limit }));
    let script = s.finish();
    match crate::transport::run_read_script(exec, &script, "govsql:log", timeout).await {
        PsqlResult::Complete(secs) => copy_rows(0, secs.get(0).unwrap_or_default())
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|r| r.first().and_then(|k| k.as_deref()) == Some("entry"))
            .map(|r| {
                let v = r.get(1).and_then(|v| v.as_deref()).unwrap_or("{}");
                serde_json::from_str(v).map_err(|e| format!("unexpected ledger row: {e}"))
            })
            .collect(),
        PsqlResult::SqlError { state, .. } if state == "42883" => {
            Err("the database has no fn_dot_iu_ledger yet: run `govsql migrate`".into())
        }
        other => Err(other.to_string()),
    }
}

/// The rows `fn_dot_iu_status()` answers, `(kind, value)`: the catalog
/// digest, unavailable commands, log exposure, the runtime role's excess
/// privileges and settings.
pub async fn read_status(exec: &dyn Executor) -> Result<Vec<(String, String)>, String> {
    let mut s = Script::new("govsql:status", 30_000);
    s.section();
    s.sql(&entry_call(GrammarEntry::Status, None));
    let script = s.finish();
    let deadline = Duration::from_secs(60);
    let secs = match run_script(exec, &script, "govsql:status", deadline).await {
        PsqlResult::Complete(secs) => secs,
        PsqlResult::SqlError { state, .. } => {
            return Err(format!(
                "the status call failed with SQLSTATE {state}; has `govsql migrate` been run on this target?"
            ))
        }
        other => return Err(format!("the status call could not run: {other}")),
    };
    Ok(copy_rows(0, secs.get(0).unwrap_or_default())
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|mut r| {
            let v = r.pop().flatten().unwrap_or_default();
            (r.pop().flatten().unwrap_or_default(), v)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_row(json: &str) -> RunRow {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn an_answer_that_does_not_fit_the_job_is_not_believed() {
        let applied =
            run_row(r#"{"run_id": 7, "status": "applied", "class": null, "params_digest": "d"}"#);
        assert!(fits(Entry::Dispatch, Mode::Apply, &applied).is_ok());
        // A forged answer: a verify reported applied (run 999999 or not).
        let err = fits(Entry::Dispatch, Mode::Verify, &applied).unwrap_err();
        assert!(err.contains("does not fit a verify job"), "{err}");
        assert!(fits(Entry::Refuse, Mode::Apply, &applied).is_err());
        let replayed = run_row(
            r#"{"run_id": 7, "status": "applied", "class": null, "replayed": true, "params_digest": "d"}"#,
        );
        assert!(fits(Entry::Refuse, Mode::Apply, &replayed).is_ok());
        assert!(fits(Entry::Refuse, Mode::Verify, &replayed).is_err());
        let bad_id =
            run_row(r#"{"run_id": 0, "status": "applied", "class": null, "params_digest": "d"}"#);
        assert!(fits(Entry::Dispatch, Mode::Apply, &bad_id).is_err());
        let unknown = run_row(
            r#"{"run_id": 3, "status": "refused", "class": "nonsense", "params_digest": "d"}"#,
        );
        assert!(fits(Entry::Refuse, Mode::Apply, &unknown).is_err());
        let refused = run_row(
            r#"{"run_id": 3, "status": "refused", "class": "kill_switch", "params_digest": "d"}"#,
        );
        assert!(fits(Entry::Refuse, Mode::Apply, &refused).is_ok());
        let no_class =
            run_row(r#"{"run_id": 3, "status": "failed", "class": null, "params_digest": "d"}"#);
        assert!(fits(Entry::Dispatch, Mode::Apply, &no_class).is_err());
        let settled = run_row(
            r#"{"run_id": 9, "status": "applied", "class": null, "replayed": true, "params_digest": "d"}"#,
        );
        assert!(fits(Entry::Fail, Mode::Apply, &settled).is_ok());
        let verify_failed = run_row(
            r#"{"run_id": 4, "status": "failed", "class": "verification_failed", "params_digest": "d"}"#,
        );
        assert!(fits(Entry::Dispatch, Mode::Verify, &verify_failed).is_ok());
        assert!(fits(Entry::Dispatch, Mode::Plan, &verify_failed).is_err());
    }

    #[test]
    fn an_answer_is_rows_then_one_run_record() {
        let out = b"row\t{\"status\": \"ok\"}\nrow\t\\N\nrun\t{\"run_id\": 7, \"status\": \"applied\", \"class\": null, \"closed_gates\": [], \"reasons\": [], \"replayed\": false, \"params_digest\": \"d\"}\n";
        let a = read_answer(out).unwrap();
        assert_eq!(
            a.rows,
            vec![vec![Some("{\"status\": \"ok\"}".into())], vec![None]]
        );
        assert_eq!(a.run.run_id, 7);
        assert_eq!(a.run.status, RunStatus::Applied);
        for bad in [
            &b""[..],
            b"row\tx\n",
            b"run\t{}\n",
            b"run\t{\"run_id\": 1, \"status\": \"applied\", \"class\": null, \"params_digest\": \"d\"}\nrow\tx\n",
            b"what\tx\n",
        ] {
            assert!(read_answer(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}

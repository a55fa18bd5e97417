//! The governed runtime: plan, apply and verify over an [`Executor`].
//!
//! Order of checks for every job: catalog → params → guard → (apply:
//! approval → local switch → live gate snapshot and catalog digest) → run.
//! Every outcome of a known command writes exactly one ledger row through
//! `fn_dot_iu_command_log`; an unknown command is refused locally. Apply
//! runs its statements, a gate re-assert and its `applied` row in ONE
//! transaction; any other error rolls back and a second call writes the
//! `failed` row. An apply whose outcome is unknown (transport lost,
//! timeout) is settled from the ledger by idempotency key before it is
//! reported, never assumed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::catalog::{Catalog, Command};
use crate::guard::StatementKind;
use crate::params::{self, ParamType};
use crate::psql::{self, control_rows, copy_rows, DbRole, FinishedScript, Row, Script, Sections};
use crate::switch::ApplySwitch;
use crate::transport::{
    run_with_deadline, Executor, Exit, ScriptOutput, ScriptRequest, TransportError,
};

/// plan, apply or verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Resolve and audit; never runs the command's SQL.
    Plan,
    /// Run it, gated and atomic with its ledger row.
    Apply,
    /// Read-only checks.
    Verify,
}

impl Mode {
    /// The ledger's word.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Plan => "plan",
            Mode::Apply => "apply",
            Mode::Verify => "verify",
        }
    }
}

/// A run's terminal status, as the ledger spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// plan succeeded.
    Planned,
    /// apply committed.
    Applied,
    /// verify checks all ok.
    Verified,
    /// a precondition failed before any command SQL ran.
    Refused,
    /// the SQL ran and errored, timed out, or the transport broke.
    Failed,
}

impl RunStatus {
    /// The ledger's word.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Planned => "planned",
            RunStatus::Applied => "applied",
            RunStatus::Verified => "verified",
            RunStatus::Refused => "refused",
            RunStatus::Failed => "failed",
        }
    }

    /// The CLI exit code of DESIGN.md.
    pub fn exit_code(self) -> i32 {
        match self {
            RunStatus::Planned | RunStatus::Applied | RunStatus::Verified => 0,
            RunStatus::Refused => 3,
            RunStatus::Failed => 4,
        }
    }

    fn parse(s: &str) -> Option<RunStatus> {
        Some(match s {
            "planned" => RunStatus::Planned,
            "applied" => RunStatus::Applied,
            "verified" => RunStatus::Verified,
            "refused" => RunStatus::Refused,
            "failed" => RunStatus::Failed,
            _ => return None,
        })
    }
}

/// One job for the runtime.
#[derive(Clone)]
pub struct JobSpec {
    /// The job's id (queue id, or a fresh one for `--direct`).
    pub job_id: String,
    /// The catalog command.
    pub command: String,
    /// plan, apply or verify.
    pub mode: Mode,
    /// Raw `NAME=VALUE` params.
    pub params: Vec<(String, String)>,
    /// The caller's idempotency key; `job:<job_id>` when absent.
    pub idempotency_key: Option<String>,
    /// The unix user the ledger records.
    pub actor: String,
    /// Who approved it, when a required approval was given (never for
    /// `--direct`).
    pub approved_by: Option<String>,
}

impl std::fmt::Debug for JobSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.params.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("JobSpec")
            .field("job_id", &self.job_id)
            .field("command", &self.command)
            .field("mode", &self.mode)
            .field("param_names", &names)
            .field("idempotency_key", &self.idempotency_key)
            .field("actor", &self.actor)
            .finish()
    }
}

/// What happened to a job: the `--json` object of DESIGN.md.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Outcome {
    /// The job.
    pub job_id: String,
    /// The command.
    pub command: String,
    /// The mode.
    pub mode: Mode,
    /// The terminal status.
    pub status: RunStatus,
    /// The ledger row (None when no row could be written).
    pub run_id: Option<i64>,
    /// md5 params digest.
    pub params_digest: String,
    /// Shut gates that refused or would refuse an apply.
    pub closed_gates: Vec<String>,
    /// SQLSTATE or a fixed class name.
    pub error_class: Option<String>,
    /// Structural facts only.
    pub evidence: Value,
    /// The rows the command returned (to the submitter only).
    pub result: Option<Vec<Row>>,
    /// Why, in words (never a value).
    pub message: String,
}

/// Runs governed jobs against one target.
pub struct Runtime {
    catalog: Arc<Catalog>,
    executor: Arc<dyn Executor>,
    target: String,
    switch: ApplySwitch,
    job_timeout: Duration,
}

/// Everything a job carries through its phases.
struct Ctx<'a> {
    job: &'a JobSpec,
    cmd: &'a Command,
    digest: String,
    key: String,
    started: Instant,
}

/// A ledger write that could not happen, and why.
enum LedgerFault {
    Transport(TransportError),
    Sql(String),
    Output(String),
}

impl LedgerFault {
    fn describe(&self) -> String {
        match self {
            LedgerFault::Transport(e) => e.to_string(),
            LedgerFault::Sql(state) => format!("the ledger call failed with SQLSTATE {state}"),
            LedgerFault::Output(m) => format!("unexpected psql output: {m}"),
        }
    }
}

/// Errors of a run script, classified.
enum RunFault {
    /// The script ran and stopped on an SQL error.
    Sql(String),
    /// psql ended without finishing and without an SQLSTATE (connection
    /// lost, killed) or the transport broke: outcome unknown.
    Unknown(TransportError),
    /// psql ended before running anything (no marker printed): the
    /// database could not be reached, so nothing ran.
    NotStarted(TransportError),
    /// The output did not have the promised shape.
    Output(String),
}

/// Why psql stopped short, in words an operator can act on.
fn unfinished(exit: &Exit) -> TransportError {
    TransportError::Broken(match exit {
        Exit::Code(2) => "psql could not reach the database or lost its connection (exit 2); is PostgreSQL up and db_host/db_port/db_name right?".to_string(),
        Exit::Code(c) => format!("psql stopped before finishing (exit {c})"),
        Exit::Signal(sig) => format!("the remote psql was killed ({sig})"),
        Exit::Unknown => "the channel closed without an exit status".to_string(),
    })
}

impl Runtime {
    /// A runtime for one target.
    pub fn new(
        catalog: Arc<Catalog>,
        executor: Arc<dyn Executor>,
        target: &str,
        switch: ApplySwitch,
        job_timeout: Duration,
    ) -> Runtime {
        Runtime {
            catalog,
            executor,
            target: target.to_string(),
            switch,
            job_timeout,
        }
    }

    /// The catalog in use.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// Resolves a job's command, digest and key; a job that cannot reach
    /// the ledger (unknown command, malformed key) is refused here.
    fn context<'a>(&'a self, job: &'a JobSpec) -> Result<Ctx<'a>, Box<Outcome>> {
        let digest = params::digest(&job.command, &job.params);
        let cmd = self.catalog.get(&job.command).map_err(|e| {
            Box::new(local_refusal(
                job,
                &digest,
                "unknown_command",
                &e.to_string(),
            ))
        })?;
        let key = job
            .idempotency_key
            .clone()
            .unwrap_or_else(|| format!("job:{}", job.job_id));
        if !valid_key(&key) || !valid_key(&job.actor) {
            let msg = "idempotency key and actor must be 1-128 characters of A-Z a-z 0-9 . _ : @ -";
            return Err(Box::new(local_refusal(job, &digest, "bad_request", msg)));
        }
        Ok(Ctx {
            job,
            cmd,
            digest,
            key,
            started: Instant::now(),
        })
    }

    /// Runs one job to its terminal outcome. Never panics on bad input;
    /// every failure is an [`Outcome`].
    pub async fn run(&self, job: &JobSpec) -> Outcome {
        let started = Instant::now();
        let outcome = match self.context(job) {
            Ok(ctx) => self.run_known(&ctx).await,
            Err(refused) => *refused,
        };
        log_outcome(job, &outcome, started);
        outcome
    }

    /// Refuses a job for a reason decided outside the runtime (peer not
    /// allowed, approval expired, cancelled), with its ledger row.
    pub async fn refuse(&self, job: &JobSpec, class: &str, message: &str) -> Outcome {
        let started = Instant::now();
        let outcome = match self.context(job) {
            Ok(ctx) => {
                self.record(&ctx, RunStatus::Refused, Some(class), &[], message)
                    .await
            }
            Err(refused) => *refused,
        };
        log_outcome(job, &outcome, started);
        outcome
    }

    async fn run_known(&self, ctx: &Ctx<'_>) -> Outcome {
        let (job, cmd) = (ctx.job, ctx.cmd);
        if job.mode == Mode::Verify && cmd.mutating {
            let msg = format!(
                "{} changes data; verify runs read-only commands only",
                cmd.name
            );
            return self
                .record(ctx, RunStatus::Refused, Some("unsafe_plan"), &[], &msg)
                .await;
        }
        let valid = match params::validate(&cmd.name, &cmd.params, &job.params) {
            Ok(v) => v,
            Err(e) => {
                return self
                    .record(
                        ctx,
                        RunStatus::Refused,
                        Some("bad_params"),
                        &[],
                        &e.to_string(),
                    )
                    .await
            }
        };
        let mut statements = Vec::with_capacity(cmd.statements.len());
        for (tpl, kind) in cmd.statements.iter().zip(&cmd.kinds) {
            let rendered = params::render_template(tpl, &cmd.params, &valid)
                .map_err(|e| e.to_string())
                .and_then(|sql| {
                    crate::guard::check_statement(&sql, &cmd.targets)
                        .map(|_| sql)
                        .map_err(|e| e.to_string())
                });
            match rendered {
                Ok(sql) => statements.push((sql, *kind)),
                Err(why) => {
                    let msg = format!("unsafe plan: {why}");
                    return self
                        .record(ctx, RunStatus::Refused, Some("unsafe_plan"), &[], &msg)
                        .await;
                }
            }
        }
        if let Err(e) = self.executor.ready().await {
            return self.unreachable(ctx, e);
        }
        match job.mode {
            Mode::Plan => self.plan(ctx).await,
            Mode::Apply => self.apply(ctx, &statements).await,
            Mode::Verify => self.verify(ctx, &statements).await,
        }
    }

    // ---- plan ---------------------------------------------------------------

    async fn plan(&self, ctx: &Ctx<'_>) -> Outcome {
        let gates = ctx.cmd.apply_gates();
        let mut s = self.script(ctx);
        s.section();
        s.sql("SELECT gate_key, gate_value FROM public.fn_dot_iu_gate_snapshot()");
        s.section();
        let evidence = self.evidence(ctx, None, &[], None);
        let ev_sql = format!(
            "{} || jsonb_build_object('closed_gates', to_jsonb(public.fn_dot_iu_closed_gates({})))",
            jsonb_lit(&evidence),
            text_array(&gates)
        );
        s.sql(&self.log_call(ctx, "'planned'", &ev_sql));
        let script = s.finish();
        let out = match self.exec(ctx, &script, DbRole::Runtime).await {
            Ok(out) => out,
            Err(e) => return self.unreachable(ctx, e),
        };
        let parsed = Sections::split(&out.stdout, &script.nonce)
            .map_err(|e| e.to_string())
            .and_then(|secs| {
                let snapshot = control_rows(0, secs.get(0).unwrap_or_default(), 2)
                    .map_err(|e| e.to_string())?;
                let log = parse_log_row(&secs, 1)?;
                Ok((snapshot, log, secs.complete))
            });
        match (&out.exit, parsed) {
            (Exit::Code(0), Ok((snapshot, (run_id, status, _), true))) => {
                let closed = closed_in_snapshot(&gates, &snapshot);
                let mut ev = evidence;
                ev["closed_gates"] = json!(closed);
                let msg = if closed.is_empty() {
                    format!(
                        "planned: apply would run {} statement(s); every gate is open",
                        ctx.cmd.statements.len()
                    )
                } else {
                    format!(
                        "planned: apply would be refused now, closed gates: {}",
                        closed.join(", ")
                    )
                };
                self.outcome(ctx, status, Some(run_id), closed, None, ev, None, msg)
            }
            (_, _) => self.after_error(ctx, &out, "plan").await,
        }
    }

    // ---- apply --------------------------------------------------------------

    async fn apply(&self, ctx: &Ctx<'_>, statements: &[(String, StatementKind)]) -> Outcome {
        if ctx.cmd.requires_approval && ctx.job.approved_by.is_none() {
            let msg = format!(
                "{} requires approval by a second person; submit it to the daemon and have an approver run `govsql approve JOB`",
                ctx.cmd.name
            );
            return self
                .record(ctx, RunStatus::Refused, Some("approval_missing"), &[], &msg)
                .await;
        }
        if !self.switch.is_on() {
            let msg =
                "the local apply switch is off; an operator turns it on with `govsql switch on`";
            return self
                .record(ctx, RunStatus::Refused, Some("kill_switch"), &[], msg)
                .await;
        }
        let gates = ctx.cmd.apply_gates();
        // Live gate snapshot and catalog digest, read at this job.
        match self.preflight(ctx).await {
            Ok((snapshot, db_digest)) => {
                let closed = closed_in_snapshot(&gates, &snapshot);
                if !closed.is_empty() {
                    let msg = format!("refused: closed gates: {}", closed.join(", "));
                    return self
                        .record(ctx, RunStatus::Refused, Some("gate_closed"), &closed, &msg)
                        .await;
                }
                if db_digest != self.catalog.digest() {
                    let msg = "the database holds another catalog than this govsql (drift); run `govsql migrate` or fix the configured catalog";
                    return self
                        .record(ctx, RunStatus::Refused, Some("catalog_drift"), &[], msg)
                        .await;
                }
            }
            Err(LedgerFault::Transport(e)) => return self.unreachable(ctx, e),
            Err(other) => {
                let msg = format!("preflight failed: {}", other.describe());
                let class = match &other {
                    LedgerFault::Sql(state) => state.clone(),
                    _ => "output".to_string(),
                };
                return self
                    .record(ctx, RunStatus::Failed, Some(&class), &[], &msg)
                    .await;
            }
        }
        let script = self.apply_script(ctx, statements, &gates);
        let result = self.exec(ctx, &script, DbRole::Runtime).await;
        match classify(result, &script, statements.len() + 2) {
            Ok((secs, rows)) => match parse_log_row(&secs, statements.len() + 1) {
                Ok((run_id, status, _)) => {
                    let ev = self.evidence(ctx, None, &[], Some(rows.len()));
                    let msg = format!("applied {} in one transaction", ctx.cmd.name);
                    self.outcome(
                        ctx,
                        status,
                        Some(run_id),
                        Vec::new(),
                        None,
                        ev,
                        Some(rows),
                        msg,
                    )
                }
                Err(m) => self.settle_unknown(ctx, TransportError::Broken(m)).await,
            },
            Err(RunFault::Sql(state)) => self.apply_sql_error(ctx, &gates, &state).await,
            Err(RunFault::Unknown(e)) => self.settle_unknown(ctx, e).await,
            Err(RunFault::NotStarted(e)) => {
                let msg = format!("{e}; nothing ran");
                self.record(ctx, RunStatus::Failed, Some(e.class()), &[], &msg)
                    .await
            }
            Err(RunFault::Output(m)) => self.settle_unknown(ctx, TransportError::Broken(m)).await,
        }
    }

    fn apply_script(
        &self,
        ctx: &Ctx<'_>,
        statements: &[(String, StatementKind)],
        gates: &[String],
    ) -> FinishedScript {
        let mut s = self.script(ctx);
        s.section();
        s.sql("BEGIN");
        s.sql(&format!(
            "SELECT public.fn_dot_iu_apply_begin({}, {}, {}, {})",
            psql::quote_plain(&ctx.key),
            psql::quote_plain(&ctx.digest),
            text_array(gates),
            text_lit(self.catalog.digest())
        ));
        for (sql, kind) in statements {
            s.section();
            match kind {
                StatementKind::Select => s.sql(&format!("COPY ({sql}) TO STDOUT")),
                StatementKind::Do => s.sql(sql),
            }
        }
        s.section();
        let evidence = self.evidence(ctx, None, &[], None);
        let ev_sql = format!(
            "{} || jsonb_build_object('duration_ms', {} + round(extract(epoch FROM clock_timestamp() - now()) * 1000)::bigint)",
            jsonb_lit(&evidence),
            ctx.started.elapsed().as_millis()
        );
        s.sql(&self.log_call(ctx, "'applied'", &ev_sql));
        s.sql("COMMIT");
        s.finish()
    }

    async fn apply_sql_error(&self, ctx: &Ctx<'_>, gates: &[String], state: &str) -> Outcome {
        match state {
            "GV001" => {
                let closed = match self.preflight(ctx).await {
                    Ok((snapshot, _)) => closed_in_snapshot(gates, &snapshot),
                    Err(_) => Vec::new(),
                };
                let msg = format!(
                    "refused inside the apply transaction: a gate was shut ({})",
                    closed.join(", ")
                );
                self.record(ctx, RunStatus::Refused, Some("gate_closed"), &closed, &msg)
                    .await
            }
            "GV002" => self.replay_applied(ctx).await,
            "GV003" => {
                let msg = format!(
                    "idempotency key {} was already used with other params",
                    ctx.key
                );
                self.record(
                    ctx,
                    RunStatus::Refused,
                    Some("idempotency_conflict"),
                    &[],
                    &msg,
                )
                .await
            }
            "GV004" => {
                let msg = "catalog drift found inside the apply transaction; run `govsql migrate`";
                self.record(ctx, RunStatus::Refused, Some("catalog_drift"), &[], msg)
                    .await
            }
            other => {
                let msg = format!(
                    "the command's SQL failed with SQLSTATE {other}; nothing was committed"
                );
                self.record(ctx, RunStatus::Failed, Some(sql_class(other)), &[], &msg)
                    .await
            }
        }
    }

    /// The key was applied before: report the original run.
    async fn replay_applied(&self, ctx: &Ctx<'_>) -> Outcome {
        let ev = self.evidence(ctx, None, &[], None);
        match self.write_log(ctx, "applied", &ev).await {
            Ok((run_id, status, _)) => {
                let msg = format!(
                    "already applied under idempotency key {}; not run again",
                    ctx.key
                );
                self.outcome(ctx, status, Some(run_id), Vec::new(), None, ev, None, msg)
            }
            Err(f) => self.unsettled(ctx, f.describe()),
        }
    }

    /// An apply whose outcome is unknown: stop any orphan of it, then ask
    /// the ledger (under the key's advisory lock) whether it committed.
    async fn settle_unknown(&self, ctx: &Ctx<'_>, cause: TransportError) -> Outcome {
        let class = cause.class();
        tracing::warn!(job_id = %ctx.job.job_id, class, "apply outcome unknown; settling by idempotency key");
        if !matches!(cause, TransportError::Timeout(_)) {
            let tag = self.tag(ctx);
            let _ = crate::transport::cancel_tagged(self.executor.as_ref(), &tag, DbRole::Runtime)
                .await;
        }
        let mut s = self.script(ctx);
        s.section();
        s.sql("BEGIN");
        s.sql(&format!(
            "SELECT public.fn_dot_iu_apply_begin({}, {}, ARRAY[]::text[], '')",
            psql::quote_plain(&ctx.key),
            psql::quote_plain(&ctx.digest)
        ));
        s.sql("ROLLBACK");
        let script = s.finish();
        match self.exec(ctx, &script, DbRole::Runtime).await {
            Ok(out) if psql::sqlstate(&out.stderr).as_deref() == Some("GV002") => {
                self.replay_applied(ctx).await
            }
            Ok(out) if matches!(out.exit, Exit::Code(0 | 3)) => {
                let msg =
                    format!("{cause}; the ledger shows it was not applied, nothing was committed");
                self.record(ctx, RunStatus::Failed, Some(class), &[], &msg)
                    .await
            }
            Ok(_) => self.unsettled(ctx, cause.to_string()),
            Err(e) => self.unsettled(ctx, format!("{cause}; then {e}")),
        }
    }

    /// The outcome could not be settled: say so, and how to settle it.
    fn unsettled(&self, ctx: &Ctx<'_>, why: String) -> Outcome {
        let msg = format!(
            "{why}; the outcome is unknown: re-submit with --idempotency-key {} to settle it (it never runs twice)",
            ctx.key
        );
        let ev = self.evidence(ctx, Some("transport"), &[], None);
        self.outcome(
            ctx,
            RunStatus::Failed,
            None,
            Vec::new(),
            Some("transport".into()),
            ev,
            None,
            msg,
        )
    }

    // ---- verify -------------------------------------------------------------

    async fn verify(&self, ctx: &Ctx<'_>, statements: &[(String, StatementKind)]) -> Outcome {
        let mut s = self.script(ctx);
        s.section();
        s.sql("BEGIN READ ONLY");
        let mut checks = Vec::new();
        for (i, (sql, kind)) in statements.iter().enumerate() {
            match kind {
                StatementKind::Select => {
                    s.meta(&format!(
                        "SELECT (s.r)::text AS govsql_v{i}, coalesce(jsonb_typeof(s.r) = 'object' AND (s.r ->> 'status') = 'ok', false) AS govsql_ok{i} FROM ({sql}) AS s(r) \\gset"
                    ));
                    checks.push(i);
                }
                StatementKind::Do => s.sql(sql),
            }
        }
        s.sql("COMMIT");
        s.section();
        for i in &checks {
            s.sql(&format!("COPY (SELECT :'govsql_v{i}') TO STDOUT"));
        }
        s.section();
        let all_ok = if checks.is_empty() {
            "true".to_string()
        } else {
            checks
                .iter()
                .map(|i| format!(":'govsql_ok{i}' = 't'"))
                .collect::<Vec<_>>()
                .join(" AND ")
        };
        let evidence = self.evidence(ctx, None, &[], Some(checks.len()));
        let ev_sql = format!(
            "{} || CASE WHEN {all_ok} THEN '{{}}'::jsonb ELSE '{{\"error_class\": \"verification_failed\"}}'::jsonb END || jsonb_build_object('duration_ms', {} + round(extract(epoch FROM clock_timestamp() - (SELECT backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid())) * 1000)::bigint)",
            jsonb_lit(&evidence),
            ctx.started.elapsed().as_millis()
        );
        let status_sql = format!("CASE WHEN {all_ok} THEN 'verified' ELSE 'failed' END");
        s.sql(&self.log_call(ctx, &status_sql, &ev_sql));
        let script = s.finish();
        let result = self.exec(ctx, &script, DbRole::Runtime).await;
        match classify(result, &script, 3) {
            Ok((secs, rows)) => match parse_log_row(&secs, 2) {
                Ok((run_id, status, _)) => {
                    let failed = status == RunStatus::Failed;
                    let class = failed.then(|| "verification_failed".to_string());
                    let mut ev = evidence;
                    if failed {
                        ev["error_class"] = json!("verification_failed");
                    }
                    let msg = if failed {
                        "verification failed: a check's status is not ok".to_string()
                    } else {
                        format!("verified: {} check(s) ok", checks.len())
                    };
                    self.outcome(
                        ctx,
                        status,
                        Some(run_id),
                        Vec::new(),
                        class,
                        ev,
                        Some(rows),
                        msg,
                    )
                }
                Err(m) => self.record_failed(ctx, "output", &m).await,
            },
            Err(RunFault::Sql(state)) if state == "GV003" => {
                let msg = format!(
                    "idempotency key {} was already used with other params",
                    ctx.key
                );
                self.record(
                    ctx,
                    RunStatus::Refused,
                    Some("idempotency_conflict"),
                    &[],
                    &msg,
                )
                .await
            }
            Err(RunFault::Sql(state)) => {
                let msg = format!("the check failed with SQLSTATE {state}");
                self.record(ctx, RunStatus::Failed, Some(sql_class(&state)), &[], &msg)
                    .await
            }
            Err(RunFault::Unknown(e) | RunFault::NotStarted(e)) => {
                let msg = e.to_string();
                self.record(ctx, RunStatus::Failed, Some(e.class()), &[], &msg)
                    .await
            }
            Err(RunFault::Output(m)) => self.record_failed(ctx, "output", &m).await,
        }
    }

    async fn record_failed(&self, ctx: &Ctx<'_>, class: &str, why: &str) -> Outcome {
        let msg = format!("unexpected psql output: {why}");
        self.record(ctx, RunStatus::Failed, Some(class), &[], &msg)
            .await
    }

    // ---- shared pieces ------------------------------------------------------

    fn tag(&self, ctx: &Ctx<'_>) -> String {
        let id: String = ctx
            .job
            .job_id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(40)
            .collect();
        format!("govsql:{id}")
    }

    fn script(&self, ctx: &Ctx<'_>) -> Script {
        // The server-side second guard, a little past the job's deadline so
        // the deadline (which also cancels the backend) normally fires first.
        let ms = (self.job_timeout.as_millis() + 2000).min(u128::from(u32::MAX)) as u64;
        Script::new(&self.tag(ctx), ms)
    }

    async fn exec(
        &self,
        ctx: &Ctx<'_>,
        script: &FinishedScript,
        role: DbRole,
    ) -> Result<ScriptOutput, TransportError> {
        let req = ScriptRequest {
            text: script.text.clone(),
            role,
            tag: self.tag(ctx),
        };
        run_with_deadline(self.executor.as_ref(), req, self.job_timeout).await
    }

    /// The live gate snapshot and the database's catalog digest.
    async fn preflight(&self, ctx: &Ctx<'_>) -> Result<(Vec<Vec<String>>, String), LedgerFault> {
        let mut s = self.script(ctx);
        s.section();
        s.sql("SELECT gate_key, gate_value FROM public.fn_dot_iu_gate_snapshot()");
        s.section();
        s.sql("SELECT public.fn_dot_iu_catalog_digest()");
        let script = s.finish();
        let out = self
            .exec(ctx, &script, DbRole::Runtime)
            .await
            .map_err(LedgerFault::Transport)?;
        let secs = finished(&out, &script)?;
        let snapshot = control_rows(0, secs.get(0).unwrap_or_default(), 2)
            .map_err(|e| LedgerFault::Output(e.to_string()))?;
        let digest = control_rows(1, secs.get(1).unwrap_or_default(), 1)
            .map_err(|e| LedgerFault::Output(e.to_string()))?;
        let digest = digest
            .into_iter()
            .next()
            .and_then(|mut r| r.pop())
            .unwrap_or_default();
        Ok((snapshot, digest))
    }

    fn log_call(&self, ctx: &Ctx<'_>, status_sql: &str, evidence_sql: &str) -> String {
        format!(
            "SELECT run_id, run_status, replayed FROM public.fn_dot_iu_command_log({}, {}, {status_sql}, {}, {}, {}, {evidence_sql})",
            psql::quote_plain(&ctx.cmd.name),
            psql::quote_plain(ctx.job.mode.as_str()),
            psql::quote_plain(&ctx.job.actor),
            psql::quote_plain(&ctx.digest),
            psql::quote_plain(&ctx.key),
        )
    }

    /// Writes one ledger row in its own psql call.
    async fn write_log(
        &self,
        ctx: &Ctx<'_>,
        status: &str,
        evidence: &Value,
    ) -> Result<(i64, RunStatus, bool), LedgerFault> {
        let mut s = self.script(ctx);
        s.section();
        s.sql(&self.log_call(ctx, &psql::quote_plain(status), &jsonb_lit(evidence)));
        let script = s.finish();
        let out = self
            .exec(ctx, &script, DbRole::Runtime)
            .await
            .map_err(LedgerFault::Transport)?;
        let secs = finished(&out, &script)?;
        parse_log_row(&secs, 0).map_err(LedgerFault::Output)
    }

    /// Records a refused or failed outcome in the ledger and returns it.
    async fn record(
        &self,
        ctx: &Ctx<'_>,
        status: RunStatus,
        class: Option<&str>,
        closed: &[String],
        msg: &str,
    ) -> Outcome {
        let ev = self.evidence(ctx, class, closed, None);
        match self.write_log(ctx, status.as_str(), &ev).await {
            Ok((run_id, written, _)) => self.outcome(
                ctx,
                written,
                Some(run_id),
                closed.to_vec(),
                class.map(String::from),
                ev,
                None,
                msg.to_string(),
            ),
            Err(f) => self.no_ledger(ctx, status, class, closed, ev, &f),
        }
    }

    fn no_ledger(
        &self,
        ctx: &Ctx<'_>,
        status: RunStatus,
        class: Option<&str>,
        closed: &[String],
        ev: Value,
        f: &LedgerFault,
    ) -> Outcome {
        tracing::error!(job_id = %ctx.job.job_id, cause = %f.describe(), "could not write the ledger row");
        let msg = format!("could not write the ledger row: {}", f.describe());
        let (status, class) = match f {
            LedgerFault::Transport(e) => (RunStatus::Failed, e.class().to_string()),
            _ => (status, class.unwrap_or("ledger").to_string()),
        };
        self.outcome(
            ctx,
            status,
            None,
            closed.to_vec(),
            Some(class),
            ev,
            None,
            msg,
        )
    }

    /// A plan or verify that errored after reaching the database.
    async fn after_error(&self, ctx: &Ctx<'_>, out: &ScriptOutput, what: &str) -> Outcome {
        match psql::sqlstate(&out.stderr) {
            Some(state) if state == "GV003" => {
                let msg = format!(
                    "idempotency key {} was already used with other params",
                    ctx.key
                );
                self.record(
                    ctx,
                    RunStatus::Refused,
                    Some("idempotency_conflict"),
                    &[],
                    &msg,
                )
                .await
            }
            Some(state) => {
                let msg = format!("{what} failed with SQLSTATE {state}");
                let status = if ctx.job.mode == Mode::Plan {
                    RunStatus::Refused
                } else {
                    RunStatus::Failed
                };
                self.record(ctx, status, Some(&state), &[], &msg).await
            }
            None => self.unreachable(ctx, unfinished(&out.exit)),
        }
    }

    /// The target could not be reached: no ledger row is possible.
    fn unreachable(&self, ctx: &Ctx<'_>, e: TransportError) -> Outcome {
        tracing::error!(job_id = %ctx.job.job_id, class = e.class(), cause = %e, "target unreachable");
        let ev = self.evidence(ctx, Some(e.class()), &[], None);
        let msg = format!("{e}; nothing ran and no ledger row could be written");
        self.outcome(
            ctx,
            RunStatus::Failed,
            None,
            Vec::new(),
            Some(e.class().into()),
            ev,
            None,
            msg,
        )
    }

    fn evidence(
        &self,
        ctx: &Ctx<'_>,
        class: Option<&str>,
        closed: &[String],
        rows: Option<usize>,
    ) -> Value {
        let mut ev = json!({
            "mode": ctx.job.mode.as_str(),
            "job_id": ctx.job.job_id,
            "statement_count": ctx.cmd.statements.len(),
            "closed_gates": closed,
            "error_class": class,
            "duration_ms": ctx.started.elapsed().as_millis() as u64,
            "transport": self.executor.kind(),
            "target": self.target,
            "catalog_digest": self.catalog.digest(),
        });
        if let Some(n) = rows {
            ev["row_count"] = json!(n);
        }
        if let Some(fp) = self.executor.host_key_fingerprint() {
            ev["host_key"] = json!(fp);
        }
        if let Some(by) = &ctx.job.approved_by {
            ev["approved_by"] = json!(by);
        }
        ev
    }

    #[allow(clippy::too_many_arguments)]
    fn outcome(
        &self,
        ctx: &Ctx<'_>,
        status: RunStatus,
        run_id: Option<i64>,
        closed_gates: Vec<String>,
        error_class: Option<String>,
        evidence: Value,
        result: Option<Vec<Row>>,
        message: String,
    ) -> Outcome {
        let mut evidence = evidence;
        if evidence.is_object() {
            evidence["duration_ms"] = json!(ctx.started.elapsed().as_millis() as u64);
        }
        Outcome {
            job_id: ctx.job.job_id.clone(),
            command: ctx.cmd.name.clone(),
            mode: ctx.job.mode,
            status,
            run_id,
            params_digest: ctx.digest.clone(),
            closed_gates,
            error_class,
            evidence,
            result,
            message,
        }
    }
}

/// The one log line of every job: ids, command, mode, status, duration;
/// never a value.
fn log_outcome(job: &JobSpec, outcome: &Outcome, started: Instant) {
    tracing::info!(
        job_id = %job.job_id,
        command = %job.command,
        mode = job.mode.as_str(),
        status = outcome.status.as_str(),
        run_id = ?outcome.run_id,
        error_class = ?outcome.error_class,
        duration_ms = started.elapsed().as_millis() as u64,
        "job finished"
    );
}

/// A refusal that cannot reach the ledger (unknown command, bad request).
fn local_refusal(job: &JobSpec, digest: &str, class: &str, msg: &str) -> Outcome {
    tracing::warn!(job_id = %job.job_id, command = %job.command, class, "refused locally");
    Outcome {
        job_id: job.job_id.clone(),
        command: job.command.clone(),
        mode: job.mode,
        status: RunStatus::Refused,
        run_id: None,
        params_digest: digest.to_string(),
        closed_gates: Vec::new(),
        error_class: Some(class.to_string()),
        evidence: json!({ "mode": job.mode.as_str(), "error_class": class }),
        result: None,
        message: msg.to_string(),
    }
}

/// The error class of an SQLSTATE: the statement_timeout guard's
/// cancellation (57014) is a timeout; anything else is the SQLSTATE itself.
fn sql_class(state: &str) -> &str {
    if state == "57014" {
        "timeout"
    } else {
        state
    }
}

fn valid_key(k: &str) -> bool {
    (1..=128).contains(&k.len())
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b))
}

/// A completed script's sections, or why it is not complete.
fn finished(out: &ScriptOutput, script: &FinishedScript) -> Result<Sections, LedgerFault> {
    if let Some(state) = psql::sqlstate(&out.stderr) {
        return Err(LedgerFault::Sql(state));
    }
    let secs = Sections::split(&out.stdout, &script.nonce)
        .map_err(|e| LedgerFault::Output(e.to_string()))?;
    match (&out.exit, secs.complete) {
        (Exit::Code(0), true) => Ok(secs),
        (exit, _) => Err(LedgerFault::Transport(unfinished(exit))),
    }
}

/// Classifies a run script's result: complete output and its COPY rows
/// (sections 1..n-1), an SQL error, or an unknown outcome.
fn classify(
    result: Result<ScriptOutput, TransportError>,
    script: &FinishedScript,
    sections: usize,
) -> Result<(Sections, Vec<Row>), RunFault> {
    let out = result.map_err(RunFault::Unknown)?;
    if let (Exit::Code(3), Some(state)) = (&out.exit, psql::sqlstate(&out.stderr)) {
        return Err(RunFault::Sql(state));
    }
    let secs =
        Sections::split(&out.stdout, &script.nonce).map_err(|e| RunFault::Output(e.to_string()))?;
    if out.exit != Exit::Code(0) || !secs.complete {
        if secs.parts.is_empty() && matches!(out.exit, Exit::Code(_)) {
            return Err(RunFault::NotStarted(unfinished(&out.exit)));
        }
        return Err(RunFault::Unknown(unfinished(&out.exit)));
    }
    if secs.parts.len() != sections {
        return Err(RunFault::Output(format!(
            "expected {sections} sections, found {}",
            secs.parts.len()
        )));
    }
    let mut rows = Vec::new();
    for n in 1..sections - 1 {
        rows.extend(
            copy_rows(n, secs.get(n).unwrap_or_default())
                .map_err(|e| RunFault::Output(e.to_string()))?,
        );
    }
    Ok((secs, rows))
}

/// The (run_id, run_status, replayed) row of a log call in section `n`.
fn parse_log_row(secs: &Sections, n: usize) -> Result<(i64, RunStatus, bool), String> {
    let rows = control_rows(n, secs.get(n).unwrap_or_default(), 3).map_err(|e| e.to_string())?;
    let [row] = rows.as_slice() else {
        return Err(format!(
            "expected one ledger row in section {n}, found {}",
            rows.len()
        ));
    };
    let run_id = row[0]
        .parse::<i64>()
        .map_err(|_| "run_id is not a number".to_string())?;
    let status = RunStatus::parse(&row[1]).ok_or_else(|| "unknown run_status".to_string())?;
    Ok((run_id, status, row[2] == "t"))
}

fn closed_in_snapshot(gates: &[String], snapshot: &[Vec<String>]) -> Vec<String> {
    gates
        .iter()
        .filter(|g| !snapshot.iter().any(|row| &row[0] == *g && row[1] == "true"))
        .cloned()
        .collect()
}

fn text_lit(s: &str) -> String {
    params::render_literal(ParamType::Text, s)
}

fn jsonb_lit(v: &Value) -> String {
    params::render_literal(ParamType::Jsonb, &v.to_string())
}

fn text_array(items: &[String]) -> String {
    let inner: Vec<String> = items.iter().map(|s| psql::quote_plain(s)).collect();
    format!("ARRAY[{}]::text[]", inner.join(", "))
}

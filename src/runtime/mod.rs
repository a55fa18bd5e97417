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
//!
//! One file per phase: [`plan`], [`apply`], [`verify`]; [`ledger`] holds
//! what they share (running a script, writing the ledger row, evidence).

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

mod apply;
mod ledger;
mod plan;
mod verify;

use ledger::{
    classify, closed_in_snapshot, gate_rows, jsonb_lit, local_refusal, log_outcome, parse_log_row,
    sql_class, text_array, text_lit, valid_key,
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
}

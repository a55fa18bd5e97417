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
//! One file per phase: [`plan`], [`apply`], [`verify`]. Each phase returns
//! a [`Verdict`]; [`ledger`] holds the ONE place that turns a verdict into
//! the ledger row and the job's [`Outcome`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::catalog::{Catalog, Command};
use crate::guard::StatementKind;
use crate::job::{valid_identifier, ErrorClass, Job, Row};
use crate::params;
use crate::psql::{FinishedScript, PsqlResult, Script};
use crate::switch::ApplySwitch;
use crate::transport::{run_script, Executor};

pub use crate::job::{Mode, Outcome, RunStatus};

mod apply;
mod ledger;
mod plan;
mod verify;

/// The ledger row the database wrote: `(run_id, run_status, replayed)`.
#[derive(Debug, Clone, Copy)]
struct LogRow {
    run_id: i64,
    status: RunStatus,
}

/// What a phase decided. [`Runtime::conclude`] is the one place that turns
/// it into the ledger row and the outcome.
enum Verdict {
    /// The database wrote the job's row itself (in the job's own call).
    Written {
        /// The row.
        row: LogRow,
        /// The class of a failed verify.
        class: Option<ErrorClass>,
        /// Gates that would refuse an apply (plan).
        closed: Vec<String>,
        /// The command's rows, for the submitter.
        rows: Option<Vec<Row>>,
        /// Why, in words.
        message: String,
    },
    /// A refusal or failure to record now, in its own ledger call.
    Record {
        /// Why, as a class (its status follows from it and the mode).
        class: ErrorClass,
        /// The shut gates, for gate_closed.
        closed: Vec<String>,
        /// Why, in words.
        message: String,
    },
    /// Nothing reached the database: no row can be written now.
    NotStarted {
        /// target_unreachable, host_key, ssh_auth or db_unavailable.
        class: ErrorClass,
        /// Why, in words.
        message: String,
    },
    /// An apply whose outcome could not be settled now: no row, no guess.
    Unsettled {
        /// Why it is unknown, as a class.
        class: ErrorClass,
        /// Why, and how to settle it.
        message: String,
    },
    /// An apply whose outcome is unknown: settle it by idempotency key.
    Unknown {
        /// Why it is unknown, as a class.
        class: ErrorClass,
        /// Why, in words.
        message: String,
    },
}

impl Verdict {
    fn record(class: ErrorClass, message: impl Into<String>) -> Verdict {
        Verdict::Record {
            class,
            closed: Vec::new(),
            message: message.into(),
        }
    }
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
    job: &'a Job,
    cmd: &'a Command,
    started: Instant,
}

impl Ctx<'_> {
    fn key(&self) -> &str {
        &self.job.idempotency_key
    }
}

impl Runtime {
    /// A runtime for one target (its executor runs as the runtime role).
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

    /// The catalog this runtime checks jobs against.
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// Runs one job to its terminal outcome: a refusal preset on the job
    /// (access, approval, cancel) is recorded instead of running it. Never
    /// panics on bad input; every failure is an [`Outcome`].
    pub async fn run(&self, job: &Job) -> Outcome {
        let started = Instant::now();
        let outcome = match self.context(job) {
            Ok(ctx) => {
                let verdict = match &job.preset {
                    Some(r) => Verdict::record(r.class.clone(), r.message.clone()),
                    None => self.decide(&ctx).await,
                };
                self.conclude(&ctx, verdict).await
            }
            Err(refused) => *refused,
        };
        ledger::log_outcome(job, &outcome, started);
        outcome
    }

    /// Resolves a job's command; a job that cannot reach the ledger
    /// (unknown command, malformed key or actor) is refused here.
    fn context<'a>(&'a self, job: &'a Job) -> Result<Ctx<'a>, Box<Outcome>> {
        let cmd = self.catalog.get(&job.command).map_err(|e| {
            Box::new(ledger::local_refusal(
                job,
                ErrorClass::UnknownCommand,
                &e.to_string(),
            ))
        })?;
        if !valid_identifier(&job.idempotency_key) || !valid_identifier(&job.actor) {
            let msg = "idempotency key and actor must be 1-128 characters of A-Z a-z 0-9 . _ : @ -";
            return Err(Box::new(ledger::local_refusal(
                job,
                ErrorClass::BadParams,
                msg,
            )));
        }
        Ok(Ctx {
            job,
            cmd,
            started: Instant::now(),
        })
    }

    /// The checks every mode shares, then the mode's own phase.
    async fn decide(&self, ctx: &Ctx<'_>) -> Verdict {
        let (job, cmd) = (ctx.job, ctx.cmd);
        if job.mode == Mode::Verify && cmd.mutating {
            let msg = format!(
                "{} changes data; verify runs read-only commands only",
                cmd.name
            );
            return Verdict::record(ErrorClass::UnsafePlan, msg);
        }
        let valid = match params::validate(&cmd.name, &cmd.params, job.param_pairs()) {
            Ok(v) => v,
            Err(e) => return Verdict::record(ErrorClass::BadParams, e.to_string()),
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
                    return Verdict::record(ErrorClass::UnsafePlan, format!("unsafe plan: {why}"))
                }
            }
        }
        if let Err(e) = self.executor.ready().await {
            return Verdict::NotStarted {
                class: e.class(),
                message: e.to_string(),
            };
        }
        match job.mode {
            Mode::Plan => self.plan(ctx).await,
            Mode::Apply => self.apply(ctx, &statements).await,
            Mode::Verify => self.verify(ctx, &statements).await,
        }
    }

    /// The `application_name` of a job's sessions (for cancellation).
    fn tag(&self, ctx: &Ctx<'_>) -> String {
        format!("govsql:{}", ctx.job.job_id)
    }

    /// A new script for this job.
    fn script(&self, ctx: &Ctx<'_>) -> Script {
        // The server-side second guard, a little past the job's deadline so
        // the deadline (which also cancels the backend) normally fires first.
        let ms = (self.job_timeout.as_millis() + 2000).min(u128::from(u32::MAX)) as u64;
        Script::new(&self.tag(ctx), ms)
    }

    /// Runs a script under the job's deadline and reads psql's answer.
    async fn exec(&self, ctx: &Ctx<'_>, script: &FinishedScript) -> PsqlResult {
        run_script(
            self.executor.as_ref(),
            script,
            &self.tag(ctx),
            self.job_timeout,
        )
        .await
    }
}

/// A statement of a command, rendered and guarded, with its kind.
type Statement = (String, StatementKind);

//! The governed runtime: plan, apply and verify over an [`Executor`].
//!
//! Governance is enforced twice. Here, before anything is sent: catalog →
//! params → (apply: approval → local switch). Then by PostgreSQL itself:
//! each job is ONE call of the database's dispatcher
//! (`fn_dot_iu_dispatch`), which looks the command up in the database's
//! catalog, checks the params, takes the idempotency lock, checks gates
//! (FOR SHARE), runs the stored statements with the params bound, checks
//! expected statuses, and writes the ledger row, all in one transaction.
//! Refusals the daemon finds are recorded through `fn_dot_iu_refuse`,
//! failures it sees (a timeout, a lost target) through `fn_dot_iu_fail`,
//! which also settles an apply that committed after all. An unknown
//! command is refused locally (it cannot be logged).
//!
//! Files: [`dispatch`] (the call and the reading of its answer), [`plan`]
//! (what plan tells), [`pin`] (the plan a job awaiting approval is pinned
//! to), [`apply`] (local checks and settlement), [`ledger`]
//! (the ONE place a [`Verdict`] becomes the ledger row and the job's
//! [`Outcome`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::catalog::{Catalog, Command};
use crate::job::{valid_identifier, ClientFacts, ErrorClass, Evidence, Job, Row};
use crate::params;
use crate::psql::{FinishedScript, PsqlResult, Script};
use crate::switch::ApplySwitch;
use crate::transport::{run_script, Executor};

pub use crate::job::{Mode, Outcome, RunStatus};
pub use dispatch::{read_ledger, read_status};
pub use pin::Pin;

mod apply;
mod calls;
mod dispatch;
mod ledger;
mod pin;
mod plan;

/// The ledger row the database wrote (or the original run it returned).
#[derive(Debug, Clone)]
struct LogRow {
    run_id: i64,
    status: RunStatus,
    /// The keyed params digest the database computed.
    digest: String,
    /// Whether this is an earlier run returned for the same key.
    replayed: bool,
    /// plan: its plan digest.
    plan_digest: Option<String>,
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
    /// A refusal or failure to record now, through the refuse or fail
    /// entry.
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
    /// The database refused to log the job at all (its catalog does not
    /// know the command): refused, without a row.
    Unlogged {
        /// Why, as a class.
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
    allow_log_exposure: bool,
    disarm_on_failure: bool,
    max_result_bytes: u64,
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
            allow_log_exposure: false,
            disarm_on_failure: false,
            max_result_bytes: crate::config::DEFAULT_MAX_RESULT_BYTES,
        }
    }

    /// The runtime of a configured target: its job timeout, result limit
    /// and log exposure setting, the daemon's switch and disarm rule. The
    /// daemon (at start and at each reload) and `--direct` build theirs
    /// here.
    pub fn for_target(
        catalog: Arc<Catalog>,
        executor: Arc<dyn Executor>,
        name: &str,
        target: &crate::config::TargetConfig,
        daemon: &crate::config::DaemonConfig,
    ) -> Runtime {
        Runtime::new(
            catalog,
            executor,
            name,
            ApplySwitch::new(&daemon.state_dir),
            target.job_timeout(),
        )
        .allow_log_exposure(target.allow_server_log_exposure)
        .max_result_bytes(target.max_result_bytes)
        .disarm_on_failure(daemon.disarm_on_failure)
    }

    /// Results over this many bytes fail the job (`result_too_large`).
    pub fn max_result_bytes(mut self, bytes: u64) -> Runtime {
        self.max_result_bytes = bytes;
        self
    }

    /// Turns the local apply switch off at any failed apply.
    pub fn disarm_on_failure(mut self, disarm: bool) -> Runtime {
        self.disarm_on_failure = disarm;
        self
    }

    /// Lets applies run although a value could reach the server log
    /// (the target's `allow_server_log_exposure`).
    pub fn allow_log_exposure(mut self, allow: bool) -> Runtime {
        self.allow_log_exposure = allow;
        self
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
                let outcome = self.conclude(&ctx, verdict).await;
                if self.disarm_on_failure
                    && job.mode == Mode::Apply
                    && outcome.status == RunStatus::Failed
                {
                    self.disarm(job).await;
                }
                outcome
            }
            // A job whose command left the catalog (a reload while it
            // waited for approval): the database may still know it.
            Err(refused) if refused.error_class == Some(ErrorClass::UnknownCommand) => {
                self.refuse_unknown(job, *refused).await
            }
            Err(refused) => *refused,
        };
        ledger::log_outcome(job, &outcome, started);
        outcome
    }

    /// Writes the ledger row a job owes (it gave up waiting for its target):
    /// a failed row of its class through the fail entry, with the job's own
    /// times in evidence. The run id, or None while the target still does
    /// not answer.
    pub async fn record_owed(&self, job: &Job, class: ErrorClass) -> Option<i64> {
        let ctx = self.context(job).ok()?;
        let answer = self
            .call(&ctx, dispatch::Entry::Fail, Some(&class))
            .await
            .ok()?;
        Some(answer.run.log_row().run_id)
    }

    /// The seed's STOP condition: a failed apply re-arms the kill switch.
    async fn disarm(&self, job: &Job) {
        let switch = self.switch.clone();
        let why = format!("apply job {} failed (disarm_on_failure)", job.job_id);
        let res = tokio::task::spawn_blocking(move || {
            switch.write(crate::switch::State::Off, "govsql", &why)
        })
        .await;
        if !matches!(res, Ok(Ok(()))) {
            tracing::error!(job_id = %job.job_id, "could not turn the apply switch off after a failed apply");
        }
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

    /// The checks the daemon makes before anything is sent, then the
    /// mode's one dispatcher call.
    async fn decide(&self, ctx: &Ctx<'_>) -> Verdict {
        let (job, cmd) = (ctx.job, ctx.cmd);
        if job.mode == Mode::Verify && cmd.mutating {
            let msg = format!(
                "{} changes data; verify runs read-only commands only",
                cmd.name
            );
            return Verdict::record(ErrorClass::UnsafePlan, msg);
        }
        if let Err(e) = params::validate(&cmd.name, &cmd.params, job.param_pairs()) {
            return Verdict::record(ErrorClass::BadParams, e.to_string());
        }
        if let Err(e) = self.executor.ready().await {
            return Verdict::NotStarted {
                class: e.class(),
                message: e.to_string(),
            };
        }
        match job.mode {
            Mode::Plan => self.plan(ctx).await,
            Mode::Apply => self.apply(ctx).await,
            Mode::Verify => self.dispatch(ctx).await,
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
        if self.allow_log_exposure {
            Script::new(&self.tag(ctx), ms)
        } else {
            Script::with_preflight(&self.tag(ctx), ms)
        }
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

//! The ledger side of every job: [`Runtime::conclude`], the ONE place a
//! [`Verdict`] becomes the ledger row and the job's [`Outcome`]; the
//! client's copy of the evidence; and the one tracing line per job.

use crate::job::Pending;

use super::*;

impl Runtime {
    /// Turns a verdict into the job's outcome, writing its ledger row when
    /// the database did not (and settling an apply whose outcome is
    /// unknown).
    pub(super) async fn conclude(&self, ctx: &Ctx<'_>, verdict: Verdict) -> Outcome {
        match verdict {
            Verdict::Written {
                row,
                class,
                closed,
                rows,
                message,
            } => {
                let mut ev =
                    self.evidence(ctx, class.as_ref(), &closed, rows.as_ref().map(Vec::len));
                if let Some(d) = &row.plan_digest {
                    ev.other.insert("plan_digest".into(), d.clone().into());
                }
                Outcome {
                    closed_gates: closed,
                    result: rows,
                    ..self.outcome(ctx, Some(&row), row.status, class, ev, message)
                }
            }
            Verdict::Record {
                class,
                closed,
                message,
            } => self.record(ctx, class, closed, message).await,
            Verdict::NotStarted { class, message } => {
                tracing::error!(job_id = %ctx.job.job_id, class = %class, cause = %message, "target unreachable");
                let msg = format!("{message}; nothing ran and no ledger row could be written");
                let pending = Some(Pending::NothingRan);
                self.without_row(ctx, RunStatus::Failed, class, msg, pending)
            }
            Verdict::Unlogged { class, message } => {
                self.without_row(ctx, class.status(), class, message, None)
            }
            Verdict::Unsettled { class, message } => {
                tracing::error!(job_id = %ctx.job.job_id, class = %class, "apply outcome still unknown");
                let pending = Some(Pending::Unsettled);
                self.without_row(ctx, RunStatus::Failed, class, message, pending)
            }
            Verdict::Unknown { class, message } => {
                let settled = self.settle(ctx, &class, &message).await;
                Box::pin(self.conclude(ctx, settled)).await
            }
        }
    }

    /// An outcome for which no ledger row exists (yet).
    fn without_row(
        &self,
        ctx: &Ctx<'_>,
        status: RunStatus,
        class: ErrorClass,
        message: String,
        pending: Option<Pending>,
    ) -> Outcome {
        let ev = self.evidence(ctx, Some(&class), &[], None);
        Outcome {
            pending,
            ..self.outcome(ctx, None, status, Some(class), ev, message)
        }
    }

    /// Records a refusal or failure through the refuse or fail entry; the
    /// original run when the fail entry finds the apply committed after all.
    async fn record(
        &self,
        ctx: &Ctx<'_>,
        class: ErrorClass,
        closed: Vec<String>,
        message: String,
    ) -> Outcome {
        let status = match ctx.job.mode {
            Mode::Plan => RunStatus::Refused,
            _ => class.status(),
        };
        let ev = self.evidence(ctx, Some(&class), &closed, None);
        match self.write_log(ctx, &class).await {
            // An apply that committed after all (settlement).
            Ok(row) if row.replayed && row.status.is_success() => {
                let msg = format!(
                    "{message}; the ledger shows it was applied (run {}): not run again",
                    row.run_id
                );
                let ev = self.evidence(ctx, None, &[], None);
                self.outcome(ctx, Some(&row), row.status, None, ev, msg)
            }
            Ok(row) => {
                let st = row.status;
                Outcome {
                    closed_gates: closed,
                    ..self.outcome(ctx, Some(&row), st, Some(class), ev, message)
                }
            }
            Err(fault) => {
                let why = fault.to_string();
                tracing::error!(job_id = %ctx.job.job_id, cause = %why, "could not write the ledger row");
                // Nothing reached the database: the job waits for its
                // target and is tried again. A job that ran (it timed
                // out), or whose write was cut off (it may not have
                // committed), ends now and owes its row: the daemon
                // writes it once the target answers (the fail entry keeps
                // one row per job).
                let ran = class == ErrorClass::Timeout;
                let (status, class, pending) = match fault {
                    PsqlResult::NotStarted { class: c, .. } if !ran => {
                        (RunStatus::Failed, c, Some(Pending::NothingRan))
                    }
                    PsqlResult::NotStarted { class: c, .. }
                    | PsqlResult::CutOff { class: c, .. } => {
                        let class = if ran { class } else { c };
                        (RunStatus::Failed, class, Some(Pending::RowOwed))
                    }
                    _ => (status, class, None),
                };
                let owed = if pending == Some(Pending::RowOwed) {
                    "; it is written once the target answers"
                } else {
                    ""
                };
                let msg = format!("{message}; could not write the ledger row: {why}{owed}");
                Outcome {
                    closed_gates: closed,
                    pending,
                    ..self.outcome(ctx, None, status, Some(class), ev, msg)
                }
            }
        }
    }

    /// A job whose command this catalog does not know (it left with a
    /// reload while the job waited): its refusal is written through the
    /// refuse entry when the database still knows the command, so the
    /// invocation has its ledger row; otherwise it stays a local refusal.
    pub(super) async fn refuse_unknown(&self, job: &Job, refused: Outcome) -> Outcome {
        if !valid_identifier(&job.idempotency_key) || !valid_identifier(&job.actor) {
            return refused;
        }
        let cmd = crate::catalog::Command {
            name: job.command.clone(),
            ..Default::default()
        };
        let ctx = Ctx {
            job,
            cmd: &cmd,
            started: Instant::now(),
        };
        let class = ErrorClass::UnknownCommand;
        match self.write_log(&ctx, &class).await {
            Ok(row) if !row.replayed => {
                let ev = self.evidence(&ctx, Some(&class), &[], None);
                let message = format!(
                    "{}; refused (the database still knows the command: its ledger row is written)",
                    refused.message
                );
                self.outcome(&ctx, Some(&row), row.status, Some(class), ev, message)
            }
            _ => refused,
        }
    }

    /// Records a refusal (refuse entry) or a failure (fail entry, which
    /// returns the original run of an apply that committed after all).
    async fn write_log(&self, ctx: &Ctx<'_>, class: &ErrorClass) -> Result<LogRow, PsqlResult> {
        let entry = match class.status() {
            RunStatus::Refused => dispatch::Entry::Refuse,
            _ => dispatch::Entry::Fail,
        };
        let answer = self.call(ctx, entry, Some(class)).await?;
        Ok(answer.run.log_row())
    }

    /// Structural facts about a job: never a value.
    pub(super) fn evidence(
        &self,
        ctx: &Ctx<'_>,
        class: Option<&ErrorClass>,
        closed: &[String],
        rows: Option<usize>,
    ) -> Evidence {
        // The daemon's own facts (the same the database is given), then
        // the structural ones the database records beside them.
        Evidence {
            client: self.client_facts(ctx),
            mode: Some(ctx.job.mode.as_str().to_string()),
            statement_count: Some(ctx.cmd.statements.len()),
            closed_gates: Some(closed.to_vec()),
            error_class: Some(class.map(|c| c.as_str().to_string())),
            catalog_digest: Some(self.catalog.digest().to_string()),
            row_count: rows,
            other: serde_json::Map::new(),
        }
    }

    /// A job's outcome: its ledger row (if any), status, class, evidence
    /// and message; no closed gates, no result rows, nothing pending (the
    /// callers that have them set those fields).
    fn outcome(
        &self,
        ctx: &Ctx<'_>,
        row: Option<&LogRow>,
        status: RunStatus,
        error_class: Option<ErrorClass>,
        evidence: Evidence,
        message: String,
    ) -> Outcome {
        let mut evidence = evidence;
        evidence.client.duration_ms = Some(ctx.started.elapsed().as_millis() as u64);
        Outcome {
            job_id: ctx.job.job_id.clone(),
            command: ctx.cmd.name.clone(),
            mode: ctx.job.mode,
            status,
            run_id: row.map(|r| r.run_id),
            params_digest: row.map(|r| r.digest.clone()).unwrap_or_default(),
            closed_gates: Vec::new(),
            error_class,
            evidence,
            result: None,
            message,
            pending: None,
        }
    }
}

/// The one log line of every job: ids, command, mode, status, duration;
/// never a value.
pub(super) fn log_outcome(job: &Job, outcome: &Outcome, started: Instant) {
    tracing::info!(
        job_id = %job.job_id,
        command = %job.command,
        mode = job.mode.as_str(),
        status = outcome.status.as_str(),
        run_id = outcome.run_id.unwrap_or(0),
        error_class = outcome.class().unwrap_or(""),
        duration_ms = started.elapsed().as_millis() as u64,
        "job finished"
    );
}

/// A refusal that cannot reach the ledger (unknown command, bad request).
pub(super) fn local_refusal(job: &Job, class: ErrorClass, msg: &str) -> Outcome {
    tracing::warn!(job_id = %job.job_id, command = %job.command, class = %class, "refused locally");
    Outcome::without_run(job, class, msg.to_string())
}

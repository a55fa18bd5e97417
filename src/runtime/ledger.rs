//! The ledger side of every phase: [`Runtime::conclude`], the ONE place a
//! phase's [`Verdict`] becomes the ledger row and the job's [`Outcome`];
//! the ledger call itself; the live gate snapshot; evidence; and the one
//! tracing line per job.

use serde_json::{json, Value};

use super::*;
use crate::psql::{control_rows, quote_plain, Sections};

impl Runtime {
    /// Turns a verdict into the job's outcome, writing its ledger row when
    /// the phase did not (and settling an apply whose outcome is unknown).
    pub(super) async fn conclude(&self, ctx: &Ctx<'_>, verdict: Verdict) -> Outcome {
        match verdict {
            Verdict::Written {
                row,
                class,
                closed,
                rows,
                message,
            } => {
                let ev = self.evidence(ctx, class.as_ref(), &closed, rows.as_ref().map(Vec::len));
                self.outcome(
                    ctx,
                    row.status,
                    Some(row.run_id),
                    class,
                    closed,
                    ev,
                    rows,
                    message,
                )
            }
            Verdict::Record {
                class,
                closed,
                message,
            } => {
                let status = match ctx.job.mode {
                    Mode::Plan => RunStatus::Refused,
                    _ => class.status(),
                };
                let ev = self.evidence(ctx, Some(&class), &closed, None);
                match self.write_log(ctx, status, &ev).await {
                    Ok(row) => self.outcome(
                        ctx,
                        row.status,
                        Some(row.run_id),
                        Some(class),
                        closed,
                        ev,
                        None,
                        message,
                    ),
                    Err(fault) => {
                        let why = fault.to_string();
                        tracing::error!(job_id = %ctx.job.job_id, cause = %why, "could not write the ledger row");
                        let (status, class) = match fault {
                            PsqlResult::NotStarted { class, .. }
                            | PsqlResult::CutOff { class, .. } => (RunStatus::Failed, class),
                            _ => (status, class),
                        };
                        let msg = format!("{message}; could not write the ledger row: {why}");
                        self.outcome(ctx, status, None, Some(class), closed, ev, None, msg)
                    }
                }
            }
            Verdict::NotStarted { class, message } => {
                tracing::error!(job_id = %ctx.job.job_id, class = %class, cause = %message, "target unreachable");
                let ev = self.evidence(ctx, Some(&class), &[], None);
                let msg = format!("{message}; nothing ran and no ledger row could be written");
                let status = RunStatus::Failed;
                self.outcome(ctx, status, None, Some(class), Vec::new(), ev, None, msg)
            }
            Verdict::Unsettled { class, message } => {
                tracing::error!(job_id = %ctx.job.job_id, class = %class, "apply outcome still unknown");
                let ev = self.evidence(ctx, Some(&class), &[], None);
                let status = RunStatus::Failed;
                self.outcome(
                    ctx,
                    status,
                    None,
                    Some(class),
                    Vec::new(),
                    ev,
                    None,
                    message,
                )
            }
            Verdict::Unknown { class, message } => {
                let settled = self.settle(ctx, &class, &message).await;
                Box::pin(self.conclude(ctx, settled)).await
            }
        }
    }

    /// The call that writes one ledger row and returns it.
    pub(super) fn log_call(&self, ctx: &Ctx<'_>, status_sql: &str, evidence_sql: &str) -> String {
        format!(
            "SELECT run_id, run_status, replayed FROM public.fn_dot_iu_command_log({}, {}, {status_sql}, {}, {}, {}, {evidence_sql})",
            quote_plain(&ctx.cmd.name),
            quote_plain(ctx.job.mode.as_str()),
            quote_plain(&ctx.job.actor),
            quote_plain(&ctx.job.params_digest),
            quote_plain(ctx.key()),
        )
    }

    /// Writes one ledger row in its own psql call; the failed read of
    /// psql's answer otherwise.
    pub(super) async fn write_log(
        &self,
        ctx: &Ctx<'_>,
        status: RunStatus,
        evidence: &Value,
    ) -> Result<LogRow, PsqlResult> {
        let mut s = self.script(ctx);
        s.section();
        s.sql(&self.log_call(
            ctx,
            &quote_plain(status.as_str()),
            &crate::psql::jsonb_literal(evidence),
        ));
        match self.exec(ctx, &s.finish()).await {
            PsqlResult::Complete(secs) => parse_log_row(&secs, 0).map_err(PsqlResult::Malformed),
            other => Err(other),
        }
    }

    /// The live gate snapshot (`(key, value)` rows) and the database's
    /// catalog digest.
    pub(super) async fn preflight(
        &self,
        ctx: &Ctx<'_>,
    ) -> Result<(Vec<Vec<String>>, String), PsqlResult> {
        let mut s = self.script(ctx);
        s.section();
        s.sql("SELECT gate_key, gate_value FROM public.fn_dot_iu_gate_snapshot()");
        s.section();
        s.sql("SELECT public.fn_dot_iu_catalog_digest()");
        let secs = match self.exec(ctx, &s.finish()).await {
            PsqlResult::Complete(secs) => secs,
            other => return Err(other),
        };
        let read = || -> Result<_, crate::psql::OutputError> {
            let snapshot = control_rows(0, secs.get(0).unwrap_or_default(), 2)?;
            let digest = control_rows(1, secs.get(1).unwrap_or_default(), 1)?
                .into_iter()
                .next()
                .and_then(|mut r| r.pop())
                .unwrap_or_default();
            Ok((snapshot, digest))
        };
        read().map_err(|e| PsqlResult::Malformed(e.to_string()))
    }

    /// Structural facts about a job: never a value.
    pub(super) fn evidence(
        &self,
        ctx: &Ctx<'_>,
        class: Option<&ErrorClass>,
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
        error_class: Option<ErrorClass>,
        closed_gates: Vec<String>,
        evidence: Value,
        result: Option<Vec<Row>>,
        message: String,
    ) -> Outcome {
        let mut evidence = evidence;
        evidence["duration_ms"] = json!(ctx.started.elapsed().as_millis() as u64);
        Outcome {
            job_id: ctx.job.job_id.clone(),
            command: ctx.cmd.name.clone(),
            mode: ctx.job.mode,
            status,
            run_id,
            params_digest: ctx.job.params_digest.clone(),
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
    Outcome {
        job_id: job.job_id.clone(),
        command: job.command.clone(),
        mode: job.mode,
        status: RunStatus::Refused,
        run_id: None,
        params_digest: job.params_digest.clone(),
        closed_gates: Vec::new(),
        evidence: json!({ "mode": job.mode.as_str(), "error_class": class }),
        error_class: Some(class),
        result: None,
        message: msg.to_string(),
    }
}

/// The (run_id, run_status, replayed) row of a log call in section `n`.
pub(super) fn parse_log_row(secs: &Sections, n: usize) -> Result<LogRow, String> {
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
    Ok(LogRow { run_id, status })
}

/// The gates of `gates` that the snapshot does not show open.
pub(super) fn closed_in_snapshot(gates: &[String], snapshot: &[Vec<String>]) -> Vec<String> {
    gates
        .iter()
        .filter(|g| !snapshot.iter().any(|row| &row[0] == *g && row[1] == "true"))
        .cloned()
        .collect()
}

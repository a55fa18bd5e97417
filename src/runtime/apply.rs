//! apply: approval, local switch, live gates and catalog digest, then the
//! statements, the gate re-assert and the `applied` row in ONE transaction;
//! an unknown outcome is settled from the ledger by idempotency key.

use super::*;
use crate::psql::{copy_rows, jsonb_literal, quote_plain, text_array, Sections};
use ledger::{closed_in_snapshot, parse_log_row};

impl Runtime {
    pub(super) async fn apply(&self, ctx: &Ctx<'_>, statements: &[Statement]) -> Verdict {
        if ctx.cmd.requires_approval && ctx.job.approved_by.is_none() {
            let msg = format!(
                "{} requires approval by a second person; submit it to the daemon and have an approver run `govsql approve JOB`",
                ctx.cmd.name
            );
            return Verdict::record(ErrorClass::ApprovalMissing, msg);
        }
        let switch = self.switch.clone();
        let on = tokio::task::spawn_blocking(move || switch.is_on())
            .await
            .unwrap_or(false);
        if !on {
            let msg = "the local apply switch is off; root or the daemon's service user turns it on with `govsql switch on`";
            return Verdict::record(ErrorClass::KillSwitch, msg);
        }
        let gates = ctx.cmd.apply_gates();
        // Live gate snapshot and catalog digest, read at this job.
        match self.preflight(ctx).await {
            Ok((snapshot, db_digest)) => {
                let closed = closed_in_snapshot(&gates, &snapshot);
                if !closed.is_empty() {
                    return Verdict::Record {
                        class: ErrorClass::GateClosed,
                        message: format!("refused: closed gates: {}", closed.join(", ")),
                        closed,
                    };
                }
                if db_digest != self.catalog.digest() {
                    return Verdict::record(ErrorClass::CatalogDrift, DRIFT);
                }
            }
            Err(PsqlResult::NotStarted { class, message }) => {
                return Verdict::NotStarted { class, message }
            }
            Err(other) => {
                let class = match &other {
                    PsqlResult::SqlError { state, .. } => ErrorClass::from_sqlstate(state),
                    PsqlResult::CutOff { class, .. } => class.clone(),
                    _ => ErrorClass::Internal,
                };
                return Verdict::record(class, format!("preflight failed: {other}"));
            }
        }
        let script = self.apply_script(ctx, statements, &gates);
        match self.exec(ctx, &script).await {
            PsqlResult::Complete(secs) => match applied(&secs, statements.len()) {
                Ok((row, rows)) => Verdict::Written {
                    row,
                    class: None,
                    closed: Vec::new(),
                    rows: Some(rows),
                    message: format!("applied {} in one transaction", ctx.cmd.name),
                },
                Err(m) => Verdict::Unknown {
                    class: ErrorClass::Internal,
                    message: format!("unexpected psql output: {m}"),
                },
            },
            PsqlResult::SqlError { state, .. } => self.apply_sql_error(ctx, &gates, &state).await,
            PsqlResult::NotStarted { class, message } => Verdict::NotStarted { class, message },
            PsqlResult::CutOff { class, message } => Verdict::Unknown { class, message },
            PsqlResult::Malformed(m) => Verdict::Unknown {
                class: ErrorClass::Internal,
                message: format!("unexpected psql output: {m}"),
            },
        }
    }

    fn apply_script(
        &self,
        ctx: &Ctx<'_>,
        statements: &[Statement],
        gates: &[String],
    ) -> FinishedScript {
        let mut s = self.script(ctx);
        s.section();
        s.sql("BEGIN");
        s.sql(&format!(
            "SELECT public.fn_dot_iu_apply_begin({}, {}, {}, {})",
            quote_plain(ctx.key()),
            quote_plain(&ctx.job.params_digest),
            text_array(gates),
            quote_plain(self.catalog.digest())
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
            jsonb_literal(&evidence),
            ctx.started.elapsed().as_millis()
        );
        s.sql(&self.log_call(ctx, "'applied'", &ev_sql));
        s.sql("COMMIT");
        s.finish()
    }

    async fn apply_sql_error(&self, ctx: &Ctx<'_>, gates: &[String], state: &str) -> Verdict {
        match state {
            "GV001" => {
                let closed = match self.preflight(ctx).await {
                    Ok((snapshot, _)) => closed_in_snapshot(gates, &snapshot),
                    Err(_) => Vec::new(),
                };
                Verdict::Record {
                    class: ErrorClass::GateClosed,
                    message: format!(
                        "refused inside the apply transaction: a gate was shut ({})",
                        closed.join(", ")
                    ),
                    closed,
                }
            }
            "GV002" => self.replay_applied(ctx).await,
            "GV003" => Verdict::record(
                ErrorClass::IdempotencyConflict,
                format!(
                    "idempotency key {} was already used with other params",
                    ctx.key()
                ),
            ),
            "GV004" => Verdict::record(ErrorClass::CatalogDrift, DRIFT),
            other => Verdict::record(
                ErrorClass::from_sqlstate(other),
                format!("the command's SQL failed with SQLSTATE {other}; nothing was committed"),
            ),
        }
    }

    /// The key was applied before: the original run (the log function
    /// returns it and inserts nothing).
    async fn replay_applied(&self, ctx: &Ctx<'_>) -> Verdict {
        let ev = self.evidence(ctx, None, &[], None);
        match self.write_log(ctx, RunStatus::Applied, &ev).await {
            Ok(row) => Verdict::Written {
                row,
                class: None,
                closed: Vec::new(),
                rows: None,
                message: format!(
                    "already applied under idempotency key {}; not run again",
                    ctx.key()
                ),
            },
            Err(fault) => Verdict::Unknown {
                class: ErrorClass::TargetUnreachable,
                message: fault.to_string(),
            },
        }
    }

    /// An apply whose outcome is unknown: stop any orphan of it, then ask
    /// the ledger (under the key's advisory lock) whether it committed.
    /// The answer is a verdict that never is [`Verdict::Unknown`].
    pub(super) async fn settle(&self, ctx: &Ctx<'_>, class: &ErrorClass, cause: &str) -> Verdict {
        tracing::warn!(job_id = %ctx.job.job_id, class = %class, "apply outcome unknown; settling by idempotency key");
        if *class != ErrorClass::Timeout {
            let _ = crate::transport::cancel_tagged(self.executor.as_ref(), &self.tag(ctx)).await;
        }
        let mut s = self.script(ctx);
        s.section();
        s.sql("BEGIN");
        s.sql(&format!(
            "SELECT public.fn_dot_iu_apply_begin({}, {}, ARRAY[]::text[], '')",
            quote_plain(ctx.key()),
            quote_plain(&ctx.job.params_digest)
        ));
        s.sql("ROLLBACK");
        match self.exec(ctx, &s.finish()).await {
            PsqlResult::SqlError { state, .. } if state == "GV002" => {
                match self.replay_applied(ctx).await {
                    Verdict::Unknown { message, .. } => unsettled(ctx, class, &message),
                    written => written,
                }
            }
            // Any other answer of the begin call means no applied row exists
            // while we hold the key's lock: nothing was committed.
            PsqlResult::SqlError { .. } | PsqlResult::Complete(_) => Verdict::record(
                class.clone(),
                format!("{cause}; the ledger shows it was not applied, nothing was committed"),
            ),
            other => unsettled(ctx, class, &format!("{cause}; then {other}")),
        }
    }
}

const DRIFT: &str = "the database holds another catalog than this govsql (drift); run `govsql migrate` or fix the configured catalog";

/// The applied row and the COPY rows of a complete apply script: sections
/// 1..=n hold the statements' rows, n+1 the log row.
fn applied(secs: &Sections, statements: usize) -> Result<(LogRow, Vec<Row>), String> {
    let mut rows = Vec::new();
    for n in 1..=statements {
        rows.extend(copy_rows(n, secs.get(n).unwrap_or_default()).map_err(|e| e.to_string())?);
    }
    Ok((parse_log_row(secs, statements + 1)?, rows))
}

/// The outcome could not be settled now: say so, and how to settle it.
fn unsettled(ctx: &Ctx<'_>, class: &ErrorClass, why: &str) -> Verdict {
    Verdict::Unsettled {
        class: class.clone(),
        message: format!(
            "{why}; the outcome is unknown: re-submit with --idempotency-key {} to settle it (it never runs twice)",
            ctx.key()
        ),
    }
}

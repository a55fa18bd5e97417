//! apply: approval, local switch, live gates and catalog digest, then the
//! statements, the gate re-assert and the `applied` row in ONE transaction;
//! an unknown outcome is settled from the ledger by idempotency key.

use super::*;

impl Runtime {
    pub(super) async fn apply(
        &self,
        ctx: &Ctx<'_>,
        statements: &[(String, StatementKind)],
    ) -> Outcome {
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

    pub(super) fn apply_script(
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

    pub(super) async fn apply_sql_error(
        &self,
        ctx: &Ctx<'_>,
        gates: &[String],
        state: &str,
    ) -> Outcome {
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
            "GV003" => self.refuse_conflict(ctx).await,
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
    pub(super) async fn replay_applied(&self, ctx: &Ctx<'_>) -> Outcome {
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
    pub(super) async fn settle_unknown(&self, ctx: &Ctx<'_>, cause: TransportError) -> Outcome {
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
    pub(super) fn unsettled(&self, ctx: &Ctx<'_>, why: String) -> Outcome {
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
}

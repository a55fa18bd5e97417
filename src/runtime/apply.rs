//! apply: the daemon's own checks (approval, the local switch), then one
//! dispatcher call that runs the statements, the gate check and the
//! `applied` row in ONE transaction. An unknown outcome is settled by
//! idempotency key through the same path, never assumed.

use super::*;

impl Runtime {
    pub(super) async fn apply(&self, ctx: &Ctx<'_>) -> Verdict {
        let needed = usize::from(ctx.cmd.approvals_needed());
        if needed > 0 {
            // Distinct approvers, never the submitter (a job queued by an
            // earlier release carries only approved_by).
            let mut by: Vec<&str> = ctx.job.approvals.iter().map(|a| a.by.as_str()).collect();
            if by.is_empty() {
                by.extend(ctx.job.approved_by.as_deref());
            }
            by.retain(|b| *b != ctx.job.actor);
            by.sort_unstable();
            by.dedup();
            if by.len() < needed {
                let msg = format!(
                    "{} requires approval by {needed} other person(s) ({} so far); submit it to the daemon and have approvers run `govsql approve JOB`",
                    ctx.cmd.name,
                    by.len()
                );
                return Verdict::record(ErrorClass::ApprovalMissing, msg);
            }
        }
        let switch = self.switch.clone();
        let job = ctx.job.job_id.to_string();
        let admitted = tokio::task::spawn_blocking(move || switch.admit_apply(&job))
            .await
            .unwrap_or(false);
        if !admitted {
            let msg = "the local apply switch is off; root or the daemon's service user turns it on with `govsql switch on [--for 30m | --once]`";
            return Verdict::record(ErrorClass::KillSwitch, msg);
        }
        self.dispatch(ctx).await
    }

    /// The local apply switch, read off the async runtime (a file read).
    pub(super) async fn switch_on(&self) -> bool {
        let switch = self.switch.clone();
        tokio::task::spawn_blocking(move || switch.is_on())
            .await
            .unwrap_or(false)
    }

    /// An apply whose outcome is unknown. A timeout (a cancel was sent to
    /// its backend, which is not proven gone: a backend frozen inside its
    /// COMMIT still commits): the fail entry, under the key's lock — which
    /// waits for that backend — reports the original run if it committed
    /// and records the failure otherwise; when it cannot answer, the job
    /// is unsettled, never failed. A lost connection: any orphan is
    /// cancelled, then the job is run again through the same path; the
    /// key's lock waits for the orphan, and the dispatcher returns the
    /// original run if it committed. The answer is never
    /// [`Verdict::Unknown`].
    pub(super) async fn settle(&self, ctx: &Ctx<'_>, class: &ErrorClass, cause: &str) -> Verdict {
        tracing::warn!(job_id = %ctx.job.job_id, class = %class, "apply outcome unknown; settling by idempotency key");
        if *class == ErrorClass::Timeout {
            return match self.call(ctx, dispatch::Entry::Fail, Some(class)).await {
                Ok(answer) => {
                    let row = answer.run.log_row();
                    let (replayed, run_id) = (row.replayed, row.run_id);
                    let mut verdict = dispatch::written(ctx, answer);
                    if let Verdict::Written { message, .. } = &mut verdict {
                        *message = if replayed {
                            format!("{cause}; the ledger shows it was applied (run {run_id}): not run again")
                        } else {
                            format!("{cause}; under its key the ledger proves nothing committed")
                        };
                    }
                    verdict
                }
                Err(PsqlResult::SqlError { state, .. })
                    if state == crate::grammar::BACKEND_ALIVE_SQLSTATE =>
                {
                    Verdict::Unsettled {
                        class: class.clone(),
                        message: format!(
                            "{cause}; a backend of it is still there (frozen or slow to die), so the ledger cannot prove it will not commit; it stays unsettled and is settled by its key (--idempotency-key {}) once that backend is gone",
                            ctx.key()
                        ),
                    }
                }
                Err(other) => Verdict::Unsettled {
                    class: class.clone(),
                    message: format!(
                        "{cause}; the ledger could not yet say whether it committed ({other}); it stays unsettled and is settled by its key (--idempotency-key {}) as soon as the target answers",
                        ctx.key()
                    ),
                },
            };
        }
        let _ = crate::transport::cancel_tagged(self.executor.as_ref(), &self.tag(ctx)).await;
        match self.call(ctx, dispatch::Entry::Dispatch, None).await {
            Ok(answer) => dispatch::written(ctx, answer),
            Err(PsqlResult::SqlError { state, .. }) => Verdict::record(
                ErrorClass::from_sqlstate(&state),
                format!("{cause}; run again, it failed with SQLSTATE {state}; nothing was committed"),
            ),
            Err(other) => Verdict::Unsettled {
                class: class.clone(),
                message: format!(
                    "{cause}; then {other}; the outcome is unknown: re-submit with --idempotency-key {} to settle it (it never runs twice)",
                    ctx.key()
                ),
            },
        }
    }
}

//! plan: one dispatcher call that writes the `planned` row and never runs
//! the command's SQL; then the whole truth of what an apply would meet
//! now: the database's reasons (each shut gate, drift, an unavailable
//! target, a key already used) and the daemon's own (local switch,
//! approval), with the statements as written in the catalog (placeholders,
//! never values).

use super::*;

impl Runtime {
    pub(super) async fn plan(&self, ctx: &Ctx<'_>) -> Verdict {
        let answer = match self.call(ctx, dispatch::Entry::Dispatch, None).await {
            Ok(a) => a,
            Err(result) => return self.no_answer(ctx, result),
        };
        if answer.run.class().is_some() || answer.run.log_row().status != RunStatus::Planned {
            return dispatch::written(ctx, answer);
        }
        let mut blockers: Vec<String> = Vec::new();
        if !answer.run.closed_gates.is_empty() {
            blockers.push(format!(
                "closed gates: {}",
                answer.run.closed_gates.join(", ")
            ));
        }
        for reason in answer.run.reasons.iter().flatten() {
            match reason.as_str() {
                "gate_closed" => {}
                "catalog_drift" => {
                    blockers.push("the database holds another catalog (drift)".into())
                }
                "target_missing" => blockers.push("a target function does not resolve".into()),
                "log_exposure" => blockers.push("a value could reach the server log".into()),
                "idempotency_conflict" => {
                    blockers.push("the idempotency key was applied with other params".into())
                }
                "frozen" => {
                    blockers.push("a freeze window covers it now (`govsql freeze list`)".into())
                }
                other => blockers.push(other.to_string()),
            }
        }
        if !self.switch_on().await {
            blockers.push("the local apply switch is off".into());
        }
        if ctx.cmd.requires_approval {
            blockers.push("it needs a second person's approval".into());
        }
        let statements = ctx.cmd.statements.join("; ");
        let cap = ctx
            .cmd
            .max_rows
            .map(|n| format!(" changing at most {n} row(s)"))
            .unwrap_or_default();
        let message = if blockers.is_empty() {
            format!(
                "planned: apply would run {} statement(s) [{statements}]{cap}; every gate is open and nothing stops it now",
                ctx.cmd.statements.len()
            )
        } else {
            format!(
                "planned: apply would run {} statement(s) [{statements}]{cap}, but would be refused now: {}",
                ctx.cmd.statements.len(),
                blockers.join("; ")
            )
        };
        let row = answer.run.log_row();
        let message = match &row.plan_digest {
            Some(d) => format!(
                "{message}. Plan digest {d}: pin an apply to this plan with `govsql apply {} --plan {d}` (same params); it is refused if anything it covers moves",
                ctx.cmd.name
            ),
            None => message,
        };
        Verdict::Written {
            row,
            class: None,
            closed: answer.run.closed_gates,
            rows: None,
            message,
        }
    }
}

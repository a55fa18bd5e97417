//! plan: resolve, read the live gate snapshot, write a `planned` row; never
//! runs the command's SQL.

use super::*;
use crate::psql::{control_rows, jsonb_literal, text_array};
use ledger::{closed_in_snapshot, parse_log_row};

impl Runtime {
    pub(super) async fn plan(&self, ctx: &Ctx<'_>) -> Verdict {
        let gates = ctx.cmd.apply_gates();
        let mut s = self.script(ctx);
        s.section();
        s.sql("SELECT gate_key, gate_value FROM public.fn_dot_iu_gate_snapshot()");
        s.section();
        let evidence = self.evidence(ctx, None, &[], None);
        let ev_sql = format!(
            "{} || jsonb_build_object('closed_gates', to_jsonb(public.fn_dot_iu_closed_gates({})))",
            jsonb_literal(&evidence),
            text_array(&gates)
        );
        s.sql(&self.log_call(ctx, "'planned'", &ev_sql));
        let secs = match self.exec(ctx, &s.finish()).await {
            PsqlResult::Complete(secs) => secs,
            other => return after_error(other),
        };
        let read = control_rows(0, secs.get(0).unwrap_or_default(), 2)
            .map_err(|e| e.to_string())
            .and_then(|snapshot| Ok((snapshot, parse_log_row(&secs, 1)?)));
        let (snapshot, row) = match read {
            Ok(x) => x,
            Err(m) => {
                return Verdict::record(
                    ErrorClass::Internal,
                    format!("unexpected psql output: {m}"),
                )
            }
        };
        let closed = closed_in_snapshot(&gates, &snapshot);
        let message = if closed.is_empty() {
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
        Verdict::Written {
            row,
            class: None,
            closed,
            rows: None,
            message,
        }
    }
}

/// A plan or verify whose script did not complete.
pub(super) fn after_error(result: PsqlResult) -> Verdict {
    match result {
        PsqlResult::SqlError { state, .. } if state == "GV003" => Verdict::record(
            ErrorClass::IdempotencyConflict,
            "the idempotency key was already used with other params",
        ),
        PsqlResult::SqlError { state, .. } => {
            let msg = format!("the script failed with SQLSTATE {state}");
            Verdict::record(ErrorClass::from_sqlstate(&state), msg)
        }
        PsqlResult::NotStarted { class, message } => Verdict::NotStarted { class, message },
        PsqlResult::CutOff { class, message } => Verdict::record(class, message),
        PsqlResult::Malformed(m) => {
            Verdict::record(ErrorClass::Internal, format!("unexpected psql output: {m}"))
        }
        PsqlResult::Complete(_) => Verdict::record(
            ErrorClass::Internal,
            "a complete script was read as an error",
        ),
    }
}

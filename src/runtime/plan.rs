//! plan: resolve, read the live gate snapshot, write a `planned` row; never
//! runs the command's SQL.

use super::*;

impl Runtime {
    pub(super) async fn plan(&self, ctx: &Ctx<'_>) -> Outcome {
        let gates = ctx.cmd.apply_gates();
        let mut s = self.script(ctx);
        s.section();
        s.sql("SELECT gate_key, gate_value FROM public.fn_dot_iu_gate_snapshot()");
        s.section();
        let evidence = self.evidence(ctx, None, &[], None);
        let ev_sql = format!(
            "{} || jsonb_build_object('closed_gates', to_jsonb(public.fn_dot_iu_closed_gates({})))",
            jsonb_lit(&evidence),
            text_array(&gates)
        );
        s.sql(&self.log_call(ctx, "'planned'", &ev_sql));
        let script = s.finish();
        let out = match self.exec(ctx, &script, DbRole::Runtime).await {
            Ok(out) => out,
            Err(e) => return self.unreachable(ctx, e),
        };
        let parsed = Sections::split(&out.stdout, &script.nonce)
            .map_err(|e| e.to_string())
            .and_then(|secs| {
                let snapshot = gate_rows(&secs, 0)?;
                let log = parse_log_row(&secs, 1)?;
                Ok((snapshot, log, secs.complete))
            });
        match (&out.exit, parsed) {
            (Exit::Code(0), Ok((snapshot, (run_id, status, _), true))) => {
                let closed = closed_in_snapshot(&gates, &snapshot);
                let mut ev = evidence;
                ev["closed_gates"] = json!(closed);
                let msg = if closed.is_empty() {
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
                self.outcome(ctx, status, Some(run_id), closed, None, ev, None, msg)
            }
            (_, _) => self.after_error(ctx, &out, "plan").await,
        }
    }
}

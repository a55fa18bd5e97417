//! verify: read-only checks inside `BEGIN READ ONLY`, their ledger row
//! written right after in the same psql call.

use super::*;

impl Runtime {
    pub(super) async fn verify(
        &self,
        ctx: &Ctx<'_>,
        statements: &[(String, StatementKind)],
    ) -> Outcome {
        let mut s = self.script(ctx);
        s.section();
        s.sql("BEGIN READ ONLY");
        // When the checks began, for the duration in the ledger row.
        s.meta("SELECT now() AS govsql_t0 \\gset");
        let mut checks = Vec::new();
        for (i, (sql, kind)) in statements.iter().enumerate() {
            match kind {
                StatementKind::Select => {
                    s.meta(&format!(
                        "SELECT (s.r)::text AS govsql_v{i}, coalesce(jsonb_typeof(s.r) = 'object' AND (s.r ->> 'status') = 'ok', false) AS govsql_ok{i} FROM ({sql}) AS s(r) \\gset"
                    ));
                    checks.push(i);
                }
                StatementKind::Do => s.sql(sql),
            }
        }
        s.sql("COMMIT");
        s.section();
        for i in &checks {
            s.sql(&format!("COPY (SELECT :'govsql_v{i}') TO STDOUT"));
        }
        s.section();
        let all_ok = if checks.is_empty() {
            "true".to_string()
        } else {
            checks
                .iter()
                .map(|i| format!(":'govsql_ok{i}' = 't'"))
                .collect::<Vec<_>>()
                .join(" AND ")
        };
        let evidence = self.evidence(ctx, None, &[], Some(checks.len()));
        let ev_sql = format!(
            "{} || CASE WHEN {all_ok} THEN '{{}}'::jsonb ELSE '{{\"error_class\": \"verification_failed\"}}'::jsonb END || jsonb_build_object('duration_ms', {} + round(extract(epoch FROM clock_timestamp() - :'govsql_t0'::timestamptz) * 1000)::bigint)",
            jsonb_lit(&evidence),
            ctx.started.elapsed().as_millis()
        );
        let status_sql = format!("CASE WHEN {all_ok} THEN 'verified' ELSE 'failed' END");
        s.sql(&self.log_call(ctx, &status_sql, &ev_sql));
        let script = s.finish();
        let result = self.exec(ctx, &script, DbRole::Runtime).await;
        match classify(result, &script, 3) {
            Ok((secs, rows)) => match parse_log_row(&secs, 2) {
                Ok((run_id, status, _)) => {
                    let failed = status == RunStatus::Failed;
                    let class = failed.then(|| "verification_failed".to_string());
                    let mut ev = evidence;
                    if failed {
                        ev["error_class"] = json!("verification_failed");
                    }
                    let msg = if failed {
                        "verification failed: a check's status is not ok".to_string()
                    } else {
                        format!("verified: {} check(s) ok", checks.len())
                    };
                    self.outcome(
                        ctx,
                        status,
                        Some(run_id),
                        Vec::new(),
                        class,
                        ev,
                        Some(rows),
                        msg,
                    )
                }
                Err(m) => self.record_failed(ctx, "output", &m).await,
            },
            Err(RunFault::Sql(state)) if state == "GV003" => self.refuse_conflict(ctx).await,
            Err(RunFault::Sql(state)) => {
                let msg = format!("the check failed with SQLSTATE {state}");
                self.record(ctx, RunStatus::Failed, Some(sql_class(&state)), &[], &msg)
                    .await
            }
            Err(RunFault::Unknown(e) | RunFault::NotStarted(e)) => {
                let msg = e.to_string();
                self.record(ctx, RunStatus::Failed, Some(e.class()), &[], &msg)
                    .await
            }
            Err(RunFault::Output(m)) => self.record_failed(ctx, "output", &m).await,
        }
    }

    pub(super) async fn record_failed(&self, ctx: &Ctx<'_>, class: &str, why: &str) -> Outcome {
        let msg = format!("unexpected psql output: {why}");
        self.record(ctx, RunStatus::Failed, Some(class), &[], &msg)
            .await
    }
}

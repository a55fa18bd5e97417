//! verify: read-only checks inside `BEGIN READ ONLY`, their ledger row
//! written right after in the same psql call.

use super::*;
use crate::psql::{copy_rows, jsonb_literal};
use ledger::parse_log_row;

impl Runtime {
    pub(super) async fn verify(&self, ctx: &Ctx<'_>, statements: &[Statement]) -> Verdict {
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
            jsonb_literal(&evidence),
            ctx.started.elapsed().as_millis()
        );
        let status_sql = format!("CASE WHEN {all_ok} THEN 'verified' ELSE 'failed' END");
        s.sql(&self.log_call(ctx, &status_sql, &ev_sql));
        let secs = match self.exec(ctx, &s.finish()).await {
            PsqlResult::Complete(secs) => secs,
            other => return super::plan::after_error(other),
        };
        let read = copy_rows(1, secs.get(1).unwrap_or_default())
            .map_err(|e| e.to_string())
            .and_then(|rows| Ok((rows, parse_log_row(&secs, 2)?)));
        let (rows, row) = match read {
            Ok(x) => x,
            Err(m) => {
                return Verdict::record(
                    ErrorClass::Internal,
                    format!("unexpected psql output: {m}"),
                )
            }
        };
        let failed = row.status == RunStatus::Failed;
        Verdict::Written {
            row,
            class: failed.then_some(ErrorClass::VerificationFailed),
            closed: Vec::new(),
            rows: Some(rows),
            message: if failed {
                "verification failed: a check's status is not ok".to_string()
            } else {
                format!("verified: {} check(s) ok", checks.len())
            },
        }
    }
}

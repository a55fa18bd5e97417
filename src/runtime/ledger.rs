//! What the phases share: running a script under the job's deadline, the
//! live gate snapshot, the ledger call and its row, evidence, outcomes, and
//! the classification of psql's output.

use super::*;

impl Runtime {
    /// The key was used before with other params: refused, audited.
    pub(super) async fn refuse_conflict(&self, ctx: &Ctx<'_>) -> Outcome {
        let msg = format!(
            "idempotency key {} was already used with other params",
            ctx.key
        );
        self.record(
            ctx,
            RunStatus::Refused,
            Some("idempotency_conflict"),
            &[],
            &msg,
        )
        .await
    }

    pub(super) fn tag(&self, ctx: &Ctx<'_>) -> String {
        let id: String = ctx
            .job
            .job_id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(40)
            .collect();
        format!("govsql:{id}")
    }

    pub(super) fn script(&self, ctx: &Ctx<'_>) -> Script {
        // The server-side second guard, a little past the job's deadline so
        // the deadline (which also cancels the backend) normally fires first.
        let ms = (self.job_timeout.as_millis() + 2000).min(u128::from(u32::MAX)) as u64;
        Script::new(&self.tag(ctx), ms)
    }

    pub(super) async fn exec(
        &self,
        ctx: &Ctx<'_>,
        script: &FinishedScript,
        role: DbRole,
    ) -> Result<ScriptOutput, TransportError> {
        let req = ScriptRequest {
            text: script.text.clone(),
            role,
            tag: self.tag(ctx),
        };
        run_with_deadline(self.executor.as_ref(), req, self.job_timeout).await
    }

    /// Runs a runtime-owned script to its end; its sections, or why not.
    async fn exec_control(
        &self,
        ctx: &Ctx<'_>,
        script: &FinishedScript,
    ) -> Result<Sections, LedgerFault> {
        let out = self
            .exec(ctx, script, DbRole::Runtime)
            .await
            .map_err(LedgerFault::Transport)?;
        finished(&out, script)
    }

    /// The live gate snapshot and the database's catalog digest.
    pub(super) async fn preflight(
        &self,
        ctx: &Ctx<'_>,
    ) -> Result<(Vec<Vec<String>>, String), LedgerFault> {
        let mut s = self.script(ctx);
        s.section();
        s.sql("SELECT gate_key, gate_value FROM public.fn_dot_iu_gate_snapshot()");
        s.section();
        s.sql("SELECT public.fn_dot_iu_catalog_digest()");
        let secs = self.exec_control(ctx, &s.finish()).await?;
        let snapshot = gate_rows(&secs, 0).map_err(LedgerFault::Output)?;
        let digest = control_rows(1, secs.get(1).unwrap_or_default(), 1)
            .map_err(|e| LedgerFault::Output(e.to_string()))?;
        let digest = digest
            .into_iter()
            .next()
            .and_then(|mut r| r.pop())
            .unwrap_or_default();
        Ok((snapshot, digest))
    }

    pub(super) fn log_call(&self, ctx: &Ctx<'_>, status_sql: &str, evidence_sql: &str) -> String {
        format!(
            "SELECT run_id, run_status, replayed FROM public.fn_dot_iu_command_log({}, {}, {status_sql}, {}, {}, {}, {evidence_sql})",
            psql::quote_plain(&ctx.cmd.name),
            psql::quote_plain(ctx.job.mode.as_str()),
            psql::quote_plain(&ctx.job.actor),
            psql::quote_plain(&ctx.digest),
            psql::quote_plain(&ctx.key),
        )
    }

    /// Writes one ledger row in its own psql call.
    pub(super) async fn write_log(
        &self,
        ctx: &Ctx<'_>,
        status: &str,
        evidence: &Value,
    ) -> Result<(i64, RunStatus, bool), LedgerFault> {
        let mut s = self.script(ctx);
        s.section();
        s.sql(&self.log_call(ctx, &psql::quote_plain(status), &jsonb_lit(evidence)));
        let secs = self.exec_control(ctx, &s.finish()).await?;
        parse_log_row(&secs, 0).map_err(LedgerFault::Output)
    }

    /// Records a refused or failed outcome in the ledger and returns it.
    pub(super) async fn record(
        &self,
        ctx: &Ctx<'_>,
        status: RunStatus,
        class: Option<&str>,
        closed: &[String],
        msg: &str,
    ) -> Outcome {
        let ev = self.evidence(ctx, class, closed, None);
        match self.write_log(ctx, status.as_str(), &ev).await {
            Ok((run_id, written, _)) => self.outcome(
                ctx,
                written,
                Some(run_id),
                closed.to_vec(),
                class.map(String::from),
                ev,
                None,
                msg.to_string(),
            ),
            Err(f) => self.no_ledger(ctx, status, class, closed, ev, &f),
        }
    }

    pub(super) fn no_ledger(
        &self,
        ctx: &Ctx<'_>,
        status: RunStatus,
        class: Option<&str>,
        closed: &[String],
        ev: Value,
        f: &LedgerFault,
    ) -> Outcome {
        tracing::error!(job_id = %ctx.job.job_id, cause = %f.describe(), "could not write the ledger row");
        let msg = format!("could not write the ledger row: {}", f.describe());
        let (status, class) = match f {
            LedgerFault::Transport(e) => (RunStatus::Failed, e.class().to_string()),
            _ => (status, class.unwrap_or("ledger").to_string()),
        };
        self.outcome(
            ctx,
            status,
            None,
            closed.to_vec(),
            Some(class),
            ev,
            None,
            msg,
        )
    }

    /// A plan or verify that errored after reaching the database.
    pub(super) async fn after_error(
        &self,
        ctx: &Ctx<'_>,
        out: &ScriptOutput,
        what: &str,
    ) -> Outcome {
        match psql::sqlstate(&out.stderr) {
            Some(state) if state == "GV003" => self.refuse_conflict(ctx).await,
            Some(state) => {
                let msg = format!("{what} failed with SQLSTATE {state}");
                let status = if ctx.job.mode == Mode::Plan {
                    RunStatus::Refused
                } else {
                    RunStatus::Failed
                };
                self.record(ctx, status, Some(sql_class(&state)), &[], &msg)
                    .await
            }
            None => self.unreachable(ctx, unfinished(&out.exit)),
        }
    }

    /// The target could not be reached: no ledger row is possible.
    pub(super) fn unreachable(&self, ctx: &Ctx<'_>, e: TransportError) -> Outcome {
        tracing::error!(job_id = %ctx.job.job_id, class = e.class(), cause = %e, "target unreachable");
        let ev = self.evidence(ctx, Some(e.class()), &[], None);
        let msg = format!("{e}; nothing ran and no ledger row could be written");
        self.outcome(
            ctx,
            RunStatus::Failed,
            None,
            Vec::new(),
            Some(e.class().into()),
            ev,
            None,
            msg,
        )
    }

    pub(super) fn evidence(
        &self,
        ctx: &Ctx<'_>,
        class: Option<&str>,
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
    pub(super) fn outcome(
        &self,
        ctx: &Ctx<'_>,
        status: RunStatus,
        run_id: Option<i64>,
        closed_gates: Vec<String>,
        error_class: Option<String>,
        evidence: Value,
        result: Option<Vec<Row>>,
        message: String,
    ) -> Outcome {
        let mut evidence = evidence;
        if evidence.is_object() {
            evidence["duration_ms"] = json!(ctx.started.elapsed().as_millis() as u64);
        }
        Outcome {
            job_id: ctx.job.job_id.clone(),
            command: ctx.cmd.name.clone(),
            mode: ctx.job.mode,
            status,
            run_id,
            params_digest: ctx.digest.clone(),
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
pub(super) fn log_outcome(job: &JobSpec, outcome: &Outcome, started: Instant) {
    tracing::info!(
        job_id = %job.job_id,
        command = %job.command,
        mode = job.mode.as_str(),
        status = outcome.status.as_str(),
        run_id = ?outcome.run_id,
        error_class = ?outcome.error_class,
        duration_ms = started.elapsed().as_millis() as u64,
        "job finished"
    );
}

/// A refusal that cannot reach the ledger (unknown command, bad request).
pub(super) fn local_refusal(job: &JobSpec, digest: &str, class: &str, msg: &str) -> Outcome {
    tracing::warn!(job_id = %job.job_id, command = %job.command, class, "refused locally");
    Outcome {
        job_id: job.job_id.clone(),
        command: job.command.clone(),
        mode: job.mode,
        status: RunStatus::Refused,
        run_id: None,
        params_digest: digest.to_string(),
        closed_gates: Vec::new(),
        error_class: Some(class.to_string()),
        evidence: json!({ "mode": job.mode.as_str(), "error_class": class }),
        result: None,
        message: msg.to_string(),
    }
}

/// The error class of an SQLSTATE: the statement_timeout guard's
/// cancellation (57014) is a timeout; anything else is the SQLSTATE itself.
pub(super) fn sql_class(state: &str) -> &str {
    if state == "57014" {
        "timeout"
    } else {
        state
    }
}

pub(super) fn valid_key(k: &str) -> bool {
    (1..=128).contains(&k.len())
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b))
}

/// A completed script's sections, or why it is not complete.
pub(super) fn finished(
    out: &ScriptOutput,
    script: &FinishedScript,
) -> Result<Sections, LedgerFault> {
    if let Some(state) = psql::sqlstate(&out.stderr) {
        return Err(LedgerFault::Sql(state));
    }
    let secs = Sections::split(&out.stdout, &script.nonce)
        .map_err(|e| LedgerFault::Output(e.to_string()))?;
    match (&out.exit, secs.complete) {
        (Exit::Code(0), true) => Ok(secs),
        (exit, _) => Err(LedgerFault::Transport(unfinished(exit))),
    }
}

/// Classifies a run script's result: complete output and its COPY rows
/// (sections 1..n-1), an SQL error, or an unknown outcome.
pub(super) fn classify(
    result: Result<ScriptOutput, TransportError>,
    script: &FinishedScript,
    sections: usize,
) -> Result<(Sections, Vec<Row>), RunFault> {
    let out = result.map_err(RunFault::Unknown)?;
    if let (Exit::Code(3), Some(state)) = (&out.exit, psql::sqlstate(&out.stderr)) {
        return Err(RunFault::Sql(state));
    }
    let secs =
        Sections::split(&out.stdout, &script.nonce).map_err(|e| RunFault::Output(e.to_string()))?;
    if out.exit != Exit::Code(0) || !secs.complete {
        if secs.parts.is_empty() && matches!(out.exit, Exit::Code(_)) {
            return Err(RunFault::NotStarted(unfinished(&out.exit)));
        }
        return Err(RunFault::Unknown(unfinished(&out.exit)));
    }
    if secs.parts.len() != sections {
        return Err(RunFault::Output(format!(
            "expected {sections} sections, found {}",
            secs.parts.len()
        )));
    }
    let mut rows = Vec::new();
    for n in 1..sections - 1 {
        rows.extend(
            copy_rows(n, secs.get(n).unwrap_or_default())
                .map_err(|e| RunFault::Output(e.to_string()))?,
        );
    }
    Ok((secs, rows))
}

/// The `(gate_key, gate_value)` rows of a gate snapshot in section `n`.
pub(super) fn gate_rows(secs: &Sections, n: usize) -> Result<Vec<Vec<String>>, String> {
    control_rows(n, secs.get(n).unwrap_or_default(), 2).map_err(|e| e.to_string())
}

/// The (run_id, run_status, replayed) row of a log call in section `n`.
pub(super) fn parse_log_row(secs: &Sections, n: usize) -> Result<(i64, RunStatus, bool), String> {
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
    Ok((run_id, status, row[2] == "t"))
}

pub(super) fn closed_in_snapshot(gates: &[String], snapshot: &[Vec<String>]) -> Vec<String> {
    gates
        .iter()
        .filter(|g| !snapshot.iter().any(|row| &row[0] == *g && row[1] == "true"))
        .cloned()
        .collect()
}

pub(super) fn text_lit(s: &str) -> String {
    params::render_literal(ParamType::Text, s)
}

pub(super) fn jsonb_lit(v: &Value) -> String {
    params::render_literal(ParamType::Jsonb, &v.to_string())
}

pub(super) fn text_array(items: &[String]) -> String {
    let inner: Vec<String> = items.iter().map(|s| psql::quote_plain(s)).collect();
    format!("ARRAY[{}]::text[]", inner.join(", "))
}

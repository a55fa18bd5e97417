//! plan / apply / verify with `--direct`: the job runs in this process
//! under the same governance, and the helpers every job needs (actor,
//! printing an outcome).

use super::*;

pub(super) async fn job(
    config_path: &Path,
    mode: Mode,
    command: Option<String>,
    a: CommonJobArgs,
) -> anyhow::Result<ExitCode> {
    let pairs = match job_params(&a) {
        Ok(p) => p,
        Err(msg) => {
            eprintln!("govsql: {msg}");
            return Ok(ExitCode::Usage);
        }
    };
    let command = match command {
        Some(c) => c,
        None if pairs.iter().any(|(k, _)| k == "collection_id") => {
            "dot_iu_collection_validate".to_string()
        }
        None => "dot_iu_healthcheck".to_string(),
    };
    if !a.direct {
        return submit_to_daemon(config_path, mode, command, pairs, a).await;
    }
    let (config, catalog) = load(config_path)?;
    let (target_name, target) = match config.target(a.target.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("govsql: {e}");
            return Ok(ExitCode::Usage);
        }
    };
    let runtime = Runtime::for_target(
        Arc::new(catalog),
        for_target(target, DbRole::Runtime)?,
        target_name,
        target,
        &config.daemon,
    );
    let mut job = Job::new(
        command,
        mode,
        target_name.to_string(),
        Params(pairs),
        a.idempotency_key,
        crate::job::effective_user(),
        nix::unistd::Uid::effective().as_raw(),
    );
    if let Some(d) = a.plan.as_deref() {
        if mode != Mode::Apply || !crate::job::valid_plan_digest(d) {
            eprintln!("govsql: --plan takes the 64-hex plan digest `govsql plan` printed, and only for apply");
            return Ok(ExitCode::Usage);
        }
    }
    job.plan_digest = a.plan;
    if mode == Mode::Apply {
        // An unreadable switch is refused as such, never as "off".
        job.preset = ApplySwitch::new(&config.daemon.state_dir).unreadable_refusal();
    }
    let outcome = runtime.run(&job).await;
    print_outcome(&outcome, a.json);
    Ok(outcome.exit_code())
}

/// The params of a job from `--param NAME=VALUE`, `--param NAME=@FILE` and
/// `--params-json -`; the error names the param or file, never a value.
fn job_params(a: &CommonJobArgs) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::with_capacity(a.params.len());
    for p in &a.params {
        let (name, value) = params::parse_assignment(p).map_err(|e| e.to_string())?;
        let value = match value.strip_prefix('@') {
            Some(file) => std::fs::read_to_string(file).map_err(|e| {
                format!("--param {name}=@{file}: cannot read the value from {file}: {e}")
            })?,
            None => value,
        };
        pairs.push((name, value));
    }
    match a.params_json.as_deref() {
        None => {}
        Some("-") => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .map_err(|e| format!("--params-json -: cannot read stdin: {e}"))?;
            let doc: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                format!(
                    "--params-json -: stdin is not one JSON object (line {}, column {})",
                    e.line(),
                    e.column()
                )
            })?;
            let obj = doc
                .as_object()
                .ok_or("--params-json -: stdin must hold one JSON object of name: value")?;
            for (name, v) in obj {
                let value = match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Number(_) | serde_json::Value::Bool(_) => v.to_string(),
                    _ => {
                        return Err(format!(
                            "--params-json -: param {name:?} must be a string, number or boolean"
                        ))
                    }
                };
                pairs.push((name.clone(), value));
            }
        }
        Some(other) => return Err(format!("--params-json takes - (stdin), not {other:?}")),
    }
    Ok(pairs)
}

/// Prints an outcome as one JSON object or as lines for a person.
/// THE one JSON shape of a job, wherever it is printed (submit, wait,
/// status, jobs, --direct): `job_id, command, mode, target, actor, status,
/// submitted_at, finished_at, approved_by, approvals, plan_digest, rollout_id,
/// run_id, params_digest,
/// error_class, closed_gates, message, evidence, result`. `status` is the
/// job's state word (queued … applied, refused, cancelled, unsettled; the
/// run's status for --direct); fields a job does not have yet are null.
pub fn job_json(o: Option<&Outcome>, j: Option<&crate::job::Job>) -> serde_json::Value {
    let status = match (j, o) {
        (Some(j), _) => j.state.as_str(),
        (None, Some(o)) => o.status.as_str(),
        (None, None) => "unknown",
    };
    serde_json::json!({
        "job_id": j.map(|j| j.job_id.as_str()).or(o.map(|o| o.job_id.as_str())),
        "command": j.map(|j| j.command.as_str()).or(o.map(|o| o.command.as_str())),
        "mode": j.map(|j| j.mode).or(o.map(|o| o.mode)),
        "target": j.map(|j| j.target.as_str()).or(o.and_then(|o| o.evidence.client.target.as_deref())),
        "actor": j.map(|j| j.actor.as_str()),
        "status": status,
        "submitted_at": j.map(|j| j.submitted_at),
        "finished_at": j.and_then(|j| j.finished_at),
        "approved_by": j.and_then(|j| j.approved_by.as_deref()),
        "approvals": j.map(|j| j.approvals.clone()).unwrap_or_default(),
        "plan_digest": j.and_then(|j| j.plan_digest.as_deref()),
        "rollout_id": j
            .and_then(|j| j.rollout_id.as_ref().map(|r| r.as_str()))
            .or(o.and_then(|o| o.evidence.client.rollout_id.as_deref())),
        "run_id": o.and_then(|o| o.run_id),
        "params_digest": o.map(|o| o.params_digest.as_str()).or(j.map(|j| j.params_digest.as_str())),
        "error_class": o.and_then(|o| o.error_class.as_ref()).map(|c| c.as_str()),
        "closed_gates": o.map(|o| o.closed_gates.clone()).unwrap_or_default(),
        "message": o.map(|o| o.message.as_str()),
        "evidence": o.map(|o| o.evidence.clone()),
        "result": o.and_then(|o| o.result.clone()),
    })
}

pub fn print_outcome(o: &Outcome, json: bool) {
    if json {
        out!("{}", job_json(Some(o), None));
        return;
    }
    let run = o
        .run_id
        .map(|r| format!("run {r}"))
        .unwrap_or_else(|| "no ledger row".into());
    // In the journal (a healthcheck unit's stdout), why a job did not
    // pass is a warning (refused) or an error (failed), not info.
    let p = match o.exit_code() {
        ExitCode::Ok => "",
        _ if !crate::logging::stdout_is_journal() => "",
        ExitCode::Refused => "<4>",
        _ => "<3>",
    };
    out!(
        "{p}{}  {} {}  ({run}, job {})",
        o.status,
        o.mode,
        o.command,
        o.job_id
    );
    out!("{p}  {}", printable(&o.message));
    if let Some(class) = &o.error_class {
        out!("{p}  error class: {class}");
    }
    if !o.closed_gates.is_empty() {
        out!("  closed gates: {}", o.closed_gates.join(", "));
    }
    for row in o.result.iter().flatten() {
        let cells: Vec<std::borrow::Cow<'_, str>> = row
            .iter()
            .map(|c| printable(c.as_deref().unwrap_or("NULL")))
            .collect();
        out!("  result: {}", cells.join(" | "));
    }
}

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
    let mut pairs = Vec::with_capacity(a.params.len());
    for p in &a.params {
        match params::parse_assignment(p) {
            Ok(kv) => pairs.push(kv),
            Err(e) => {
                eprintln!("govsql: {e}");
                return Ok(ExitCode::Usage);
            }
        }
    }
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
    let runtime = Runtime::new(
        Arc::new(catalog),
        for_target(target, DbRole::Runtime)?,
        target_name,
        ApplySwitch::new(&config.daemon.state_dir),
        target.job_timeout(),
    )
    .allow_log_exposure(target.allow_server_log_exposure)
    .max_result_bytes(target.max_result_bytes)
    .disarm_on_failure(config.daemon.disarm_on_failure);
    let job = Job::new(
        command,
        mode,
        target_name.to_string(),
        Params(pairs),
        a.idempotency_key,
        crate::job::effective_user(),
        nix::unistd::Uid::effective().as_raw(),
    );
    let outcome = runtime.run(&job).await;
    print_outcome(&outcome, a.json);
    Ok(outcome.exit_code())
}

/// Prints an outcome as one JSON object or as lines for a person.
pub fn print_outcome(o: &Outcome, json: bool) {
    if json {
        out!(
            "{}",
            serde_json::to_string(o).unwrap_or_else(|_| "{}".into())
        );
        return;
    }
    let run = o
        .run_id
        .map(|r| format!("run {r}"))
        .unwrap_or_else(|| "no ledger row".into());
    out!(
        "{}  {} {}  ({run}, job {})",
        o.status,
        o.mode,
        o.command,
        o.job_id
    );
    out!("  {}", printable(&o.message));
    if let Some(class) = &o.error_class {
        out!("  error class: {class}");
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

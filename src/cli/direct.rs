//! plan / apply / verify with `--direct`: the job runs in this process
//! under the same governance, and the helpers every job needs (executor,
//! actor, job id, printing an outcome).

use super::*;

/// Builds the executor of a target (`admin`: migrate's SSH identity).
pub fn executor_for(target: &TargetConfig, admin: bool) -> anyhow::Result<Arc<dyn Executor>> {
    Ok(match target.transport {
        TransportKind::Local => Arc::new(LocalExecutor::new(target)),
        TransportKind::Ssh => Arc::new(SshExecutor::new(target, admin)?),
    })
}

/// The effective user's name (the actor of `--direct` jobs).
pub fn effective_user() -> String {
    let uid = nix::unistd::Uid::effective();
    nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| format!("uid{uid}"))
}

/// A fresh job id.
pub fn new_job_id() -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{ts:x}-{:08x}", rng.gen::<u32>())
}

pub(super) async fn job(
    config_path: &Path,
    mode: Mode,
    command: Option<String>,
    a: CommonJobArgs,
) -> anyhow::Result<i32> {
    let mut pairs = Vec::with_capacity(a.params.len());
    for p in &a.params {
        match params::parse_assignment(p) {
            Ok(kv) => pairs.push(kv),
            Err(e) => {
                eprintln!("govsql: {e}");
                return Ok(EXIT_USAGE);
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
    let (target_name, target) = config.target(a.target.as_deref())?;
    let runtime = Runtime::new(
        Arc::new(catalog),
        executor_for(target, false)?,
        target_name,
        ApplySwitch::new(&config.daemon.state_dir),
        target.job_timeout(),
    );
    let spec = JobSpec {
        job_id: new_job_id(),
        command,
        mode,
        params: pairs,
        idempotency_key: a.idempotency_key,
        actor: effective_user(),
        approved_by: None,
    };
    let outcome = runtime.run(&spec).await;
    print_outcome(&outcome, a.json);
    Ok(outcome.status.exit_code())
}

/// Prints an outcome as one JSON object or as lines for a person.
pub fn print_outcome(o: &Outcome, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string(o).unwrap_or_else(|_| "{}".into())
        );
        return;
    }
    let run = o
        .run_id
        .map(|r| format!("run {r}"))
        .unwrap_or_else(|| "no ledger row".into());
    println!(
        "{}  {} {}  ({run}, job {})",
        o.status.as_str(),
        o.mode.as_str(),
        o.command,
        o.job_id
    );
    println!("  {}", o.message);
    if let Some(class) = &o.error_class {
        println!("  error class: {class}");
    }
    if !o.closed_gates.is_empty() {
        println!("  closed gates: {}", o.closed_gates.join(", "));
    }
    for row in o.result.iter().flatten() {
        let cells: Vec<&str> = row.iter().map(|c| c.as_deref().unwrap_or("NULL")).collect();
        println!("  result: {}", cells.join(" | "));
    }
}

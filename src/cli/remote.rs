//! The daemon's client side: submit (and wait), status, jobs, approve,
//! cancel, health; exit codes for the daemon's replies.

use super::*;

/// Prints a daemon's error reply; its exit code.
pub(super) fn print_reply_error(reply: &Reply) -> ExitCode {
    match reply {
        Reply::Error(e) => {
            eprintln!("govsql: {}", e.message);
            e.kind.exit_code()
        }
        _ => {
            eprintln!("govsql: the daemon answered with something else than this request asks for; is the client up to date?");
            ExitCode::Error
        }
    }
}

pub(super) async fn call(config_path: &Path, req: &Request) -> anyhow::Result<Reply> {
    let socket = client::socket_from_config(config_path)?;
    let mut c = Client::connect(&socket).await?;
    Ok(c.call(req).await?)
}

pub(super) async fn submit_to_daemon(
    config_path: &Path,
    mode: Mode,
    command: String,
    params: Vec<(String, String)>,
    a: CommonJobArgs,
) -> anyhow::Result<ExitCode> {
    if let Some(targets) = a.targets {
        let strategy = match super::rollout::strategy(
            a.canary,
            a.max_concurrency.as_deref(),
            a.max_errors.as_deref(),
        ) {
            Ok(s) => s,
            Err(msg) => {
                eprintln!("govsql: {msg}");
                return Ok(ExitCode::Usage);
            }
        };
        let submit = Submit {
            command,
            mode,
            params: Params(params),
            target: None,
            idempotency_key: a.idempotency_key,
            plan_digest: None,
            wait: false,
            timeout_s: None,
            targets: Some(targets),
            strategy: Some(strategy),
        };
        return super::rollout::submit(config_path, submit, a.wait, a.timeout, a.json).await;
    }
    // Submitted first, so the job id is known at once; a --wait then
    // waits for it on the same connection.
    let req = Request::Submit(Submit {
        command,
        mode,
        params: Params(params),
        target: a.target,
        idempotency_key: a.idempotency_key,
        plan_digest: a.plan,
        wait: false,
        timeout_s: None,
        targets: None,
        strategy: None,
    });
    let socket = client::socket_from_config(config_path)?;
    let mut c = Client::connect(&socket).await?;
    let reply = c.call(&req).await?;
    let Reply::Job(job) = &reply else {
        return Ok(print_reply_error(&reply));
    };
    if !a.wait || job.state.is_terminal() {
        return Ok(print_job(job, a.json));
    }
    let id = job.job_id.clone();
    if job.state == JobState::AwaitingApproval {
        eprintln!(
            "govsql: job {id} is awaiting approval by another member of the approve list (`govsql approve {id}`); waiting"
        );
    } else {
        eprintln!("govsql: job {id} submitted; waiting (Ctrl-C stops waiting, not the job)");
    }
    let wait = Request::Wait(WaitFor {
        job_id: id.clone(),
        timeout_s: a.timeout,
    });
    let reply = tokio::select! {
        r = c.call(&wait) => r?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("govsql: stopped waiting; job {id} goes on: `govsql wait {id}` waits for it again, `govsql status {id}` shows it");
            return Ok(ExitCode::Pending);
        }
    };
    match &reply {
        Reply::Job(job) => Ok(print_job(job, a.json)),
        _ => Ok(print_reply_error(&reply)),
    }
}

/// Prints a job; returns the exit code its state implies (a job not yet
/// ended that was only submitted is a success).
pub(super) fn print_job(job: &Job, json: bool) -> ExitCode {
    if let Some(o) = &job.outcome {
        if json {
            out!("{}", super::direct::job_json(Some(o), Some(job)));
        } else {
            print_outcome(o, false);
            if let Some(by) = &job.approved_by {
                out!("  approved by: {by}");
            }
        }
        return o.exit_code();
    }
    if json {
        out!("{}", super::direct::job_json(None, Some(job)));
    } else {
        out!("{}", job_line(job));
        if job.state == JobState::AwaitingApproval {
            if let Some(d) = &job.plan_digest {
                out!("  pinned to plan {d}");
            }
            if !job.approvals.is_empty() {
                let by: Vec<&str> = job.approvals.iter().map(|a| a.by.as_str()).collect();
                out!("  approved so far by: {}", by.join(", "));
            }
            out!(
                "  needs approval: another user in the approve list runs `govsql show {0}`, then `govsql approve {0}`",
                job.job_id
            );
        } else {
            out!("  `govsql status {}` shows its outcome", job.job_id);
        }
    }
    ExitCode::Ok
}

/// A job id from the command line, or a usage error.
pub(super) fn job_id_arg(s: &str) -> Result<crate::job::JobId, ExitCode> {
    crate::job::JobId::parse(s).ok_or_else(|| {
        eprintln!("govsql: {s:?} is not a job id (`govsql jobs` lists them)");
        ExitCode::Usage
    })
}

pub(super) async fn status_cmd(
    config_path: &Path,
    job_id: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let job_id = match job_id_arg(job_id) {
        Ok(id) => id,
        Err(code) => return Ok(code),
    };
    let reply = call(config_path, &Request::Status(JobRef { job_id })).await?;
    match &reply {
        Reply::Job(job) => Ok(print_job(job, json)),
        _ => Ok(print_reply_error(&reply)),
    }
}

/// `govsql wait JOB`: re-attach to a job until it ends (or `--timeout`
/// ends the wait: exit 5, the job goes on).
pub(super) async fn wait_cmd(
    config_path: &Path,
    job_id: &str,
    timeout: Option<u64>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let job_id = match job_id_arg(job_id) {
        Ok(id) => id,
        Err(code) => return Ok(code),
    };
    let req = Request::Wait(WaitFor {
        job_id,
        timeout_s: timeout,
    });
    let reply = call(config_path, &req).await?;
    match &reply {
        Reply::Job(job) => {
            let code = print_job(job, json);
            Ok(if job.state.is_terminal() {
                code
            } else {
                job.state.exit_code()
            })
        }
        _ => Ok(print_reply_error(&reply)),
    }
}

/// Approve, cancel or reject, then print the state the job really
/// reached: a cancelled or rejected job is followed (up to 10 s) until the
/// worker has ended it, so the line never says `queued` for a job that is
/// about to end.
pub(super) async fn simple_job_op(
    config_path: &Path,
    req: Request,
    follow: bool,
) -> anyhow::Result<ExitCode> {
    let socket = client::socket_from_config(config_path)?;
    let mut c = Client::connect(&socket).await?;
    let reply = c.call(&req).await?;
    if let Reply::Rollout(r) = &reply {
        // A rollout's approval or rejection: one line for all its targets.
        out!(
            "{}  rollout {}  {} {} over {} targets{}",
            r.state,
            r.rollout_id,
            r.mode,
            r.command,
            r.targets.len(),
            r.approved_by
                .as_deref()
                .map(|b| format!("  approved by {b}"))
                .unwrap_or_default()
        );
        return Ok(ExitCode::Ok);
    }
    let Reply::Job(job) = &reply else {
        return Ok(print_reply_error(&reply));
    };
    if !follow || job.state.is_terminal() {
        out!("{}", job_line(job));
        return Ok(ExitCode::Ok);
    }
    let waited = c
        .call(&Request::Wait(WaitFor {
            job_id: job.job_id.clone(),
            timeout_s: Some(10),
        }))
        .await?;
    match &waited {
        Reply::Job(done) => out!("{}", job_line(done)),
        _ => out!("{}  (it ends once its worker takes it)", job_line(job)),
    }
    Ok(ExitCode::Ok)
}

/// `--mode`, or a usage error.
pub(super) fn mode_arg(mode: Option<String>) -> Result<Option<Mode>, ExitCode> {
    match mode.as_deref().map(|m| (m, Mode::parse(m))) {
        None => Ok(None),
        Some((_, Some(m))) => Ok(Some(m)),
        Some((m, None)) => {
            eprintln!("govsql: --mode {m:?} is not plan, apply or verify");
            Err(ExitCode::Usage)
        }
    }
}

/// `--since` (a duration ago or a UTC date) as a Unix time, or a usage
/// error.
pub(super) fn since_arg(since: Option<String>) -> Result<Option<i64>, ExitCode> {
    match since.as_deref() {
        None => Ok(None),
        Some(s) => match crate::time::parse_since(s, crate::time::unix_now()) {
            Some(t) => Ok(Some(t)),
            None => {
                eprintln!("govsql: --since {s:?} is neither a duration (30m, 1h, 2d) nor a date (2026-11-01)");
                Err(ExitCode::Usage)
            }
        },
    }
}

/// The filter of `jobs` from its flags, or a usage error.
pub(super) fn list_filter(
    state: Option<String>,
    mode: Option<String>,
    command: Option<String>,
    actor: Option<String>,
    target: Option<String>,
    since: Option<String>,
) -> Result<crate::protocol::ListFilter, ExitCode> {
    let usage = |what: String| {
        eprintln!("govsql: {what}");
        ExitCode::Usage
    };
    let state = match state.as_deref().map(|s| (s, JobState::parse(s))) {
        None => None,
        Some((_, Some(st))) => Some(st),
        Some((s, None)) => return Err(usage(format!("--state {s:?} is not a job state (queued, running, awaiting_approval, planned, applied, verified, refused, failed, cancelled, unsettled)"))),
    };
    let mode = mode_arg(mode)?;
    let since = since_arg(since)?;
    Ok(crate::protocol::ListFilter {
        state,
        mode,
        command,
        actor,
        target,
        since,
    })
}

pub(super) async fn jobs_cmd(
    config_path: &Path,
    limit: u32,
    page: u32,
    filter: crate::protocol::ListFilter,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let reply = call(
        config_path,
        &Request::List(ListJobs {
            limit: Some(limit),
            page: Some(page),
            filter,
        }),
    )
    .await?;
    let Reply::Jobs(jobs) = &reply else {
        return Ok(print_reply_error(&reply));
    };
    if json {
        let all: Vec<serde_json::Value> = jobs
            .iter()
            .map(|j| super::direct::job_json(j.outcome.as_ref(), Some(j)))
            .collect();
        out!("{}", serde_json::Value::Array(all));
        return Ok(ExitCode::Ok);
    }
    out!(
        "{:<20} {:<20} {:>7} {:<10} {:<18} {:<7} {:<32} {:<12} RUN",
        "JOB",
        "SUBMITTED (UTC)",
        "TOOK",
        "TARGET",
        "STATE",
        "MODE",
        "COMMAND",
        "ACTOR"
    );
    for j in jobs {
        let run = j
            .outcome
            .as_ref()
            .and_then(|o| o.run_id)
            .map(|r| r.to_string())
            .unwrap_or_default();
        let took = j
            .finished_at
            .map(|f| format!("{}s", (f - j.submitted_at).max(0)))
            .unwrap_or_else(|| "-".into());
        out!(
            "{:<20} {:<20} {:>7} {:<10} {:<18} {:<7} {:<32} {:<12} {run}",
            j.job_id.as_str(),
            crate::time::utc_text(j.submitted_at),
            took,
            j.target,
            j.state.as_str(),
            j.mode.as_str(),
            j.command,
            j.actor
        );
    }
    Ok(ExitCode::Ok)
}

/// `govsql show JOB`: what the job will run, values included (to the
/// terminal of its submitter or an approver; never logged).
pub(super) async fn show_cmd(
    config_path: &Path,
    job_id: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let job_id = match job_id_arg(job_id) {
        Ok(id) => id,
        Err(code) => return Ok(code),
    };
    let reply = call(config_path, &Request::Show(JobRef { job_id })).await?;
    let Reply::Show(s) = &reply else {
        return Ok(print_reply_error(&reply));
    };
    if json {
        out!("{}", serde_json::to_string(s)?);
        return Ok(ExitCode::Ok);
    }
    if s.targets.is_empty() {
        out!("job {}  {}  ({})", s.job_id, s.state, s.actor);
        out!(
            "{} {} on {}: {}",
            s.mode,
            s.command,
            s.target,
            s.description
        );
    } else {
        out!("rollout {}  {}  ({})", s.job_id, s.state, s.actor);
        out!(
            "{} {} on {} targets: {}",
            s.mode,
            s.command,
            s.targets.len(),
            s.description
        );
        out!(
            "  targets (one approval covers exactly these): {}",
            s.targets.join(", ")
        );
    }
    for st in &s.statements {
        out!("  statement: {}", super::printable(st));
    }
    for (k, v) in &s.params {
        out!("  param {k} = {}", super::printable(v));
    }
    match &s.plan_digest {
        Some(d) => {
            out!("plan {d}: an approval approves this plan, once; if anything it covers moves before the apply, the apply is refused (plan_drift)");
            if let Some(c) = &s.plan_covers {
                print_covers(c);
            }
        }
        None if s.mode == Mode::Apply => {
            out!("plan: not pinned yet (approve pins the plan it would run then)")
        }
        None => {}
    }
    if s.approvals_required > 0 {
        out!(
            "approvals: {} of {} (distinct approvers, never the submitter)",
            s.approvals.len(),
            s.approvals_required
        );
        for a in &s.approvals {
            out!(
                "  approved by {} at {}{}",
                a.by,
                a.at,
                a.reason
                    .as_deref()
                    .map(|r| format!(": {}", super::printable(r)))
                    .unwrap_or_default()
            );
        }
    }
    Ok(ExitCode::Ok)
}

/// What a pinned plan covers, a line each (never a value: the params are
/// a keyed digest).
fn print_covers(c: &serde_json::Value) {
    let text = |k: &str| c[k].as_str().unwrap_or("").to_string();
    out!(
        "  covers: target {}, command {}",
        text("target"),
        text("command")
    );
    out!("  params digest {}", text("params_digest"));
    out!("  catalog {}", text("catalog_digest"));
    if let Some(fns) = c["functions"].as_object() {
        for (sig, md5) in fns {
            out!(
                "  function {sig} (definition md5 {})",
                md5.as_str().unwrap_or("")
            );
        }
    }
    let gates: Vec<&str> = c["gates"]
        .as_array()
        .map(|g| g.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    out!("  gates {}", gates.join(", "));
    out!(
        "  max_rows {}",
        c["max_rows"]
            .as_i64()
            .map_or_else(|| "none".to_string(), |n| n.to_string())
    );
}

/// `govsql log`: the target's ledger through the daemon.
pub(super) async fn log_cmd(
    config_path: &Path,
    target: Option<String>,
    filter: crate::protocol::LogFilter,
    limit: u32,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let reply = call(
        config_path,
        &Request::Log(ReadLog {
            target,
            filter,
            limit: Some(limit),
        }),
    )
    .await?;
    let Reply::Log(rows) = &reply else {
        return Ok(print_reply_error(&reply));
    };
    if json {
        out!("{}", serde_json::to_string(rows)?);
        return Ok(ExitCode::Ok);
    }
    out!(
        "{:<20} {:>7} {:<32} {:<7} {:<9} {:<12} {:<20} {:>8}",
        "TIME (UTC)",
        "RUN",
        "COMMAND",
        "MODE",
        "STATUS",
        "ACTOR",
        "CLASS",
        "TOOK"
    );
    for r in rows {
        out!(
            "{:<20} {:>7} {:<32} {:<7} {:<9} {:<12} {:<20} {:>8}",
            r.at,
            r.run_id,
            r.command,
            r.mode,
            r.status,
            super::printable(&r.actor),
            r.error_class.as_deref().unwrap_or("-"),
            r.duration_ms
                .map(|d| format!("{d}ms"))
                .unwrap_or_else(|| "-".into())
        );
        // What a plan recorded or an apply was pinned to, and who approved.
        if r.plan_digest.is_some() || r.approvers.is_some() {
            out!(
                "{:<28} plan {}  approved by {}",
                "",
                r.plan_digest
                    .as_deref()
                    .map_or("-", |d| &d[..d.len().min(16)]),
                r.approvers.as_deref().map_or("-".into(), super::printable)
            );
        }
    }
    Ok(ExitCode::Ok)
}

/// `govsql metrics`: the daemon's metrics, as served.
pub(super) async fn metrics_cmd(config_path: &Path) -> anyhow::Result<ExitCode> {
    let reply = call(config_path, &Request::Metrics {}).await?;
    match &reply {
        Reply::Metrics(text) => {
            out_raw!("{text}");
            Ok(ExitCode::Ok)
        }
        _ => Ok(print_reply_error(&reply)),
    }
}

pub(super) async fn health_cmd(config_path: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let reply = call(config_path, &Request::Health {}).await?;
    let Reply::Health(h) = &reply else {
        return Ok(print_reply_error(&reply));
    };
    if json {
        out!("{}", serde_json::to_string(h)?);
    } else {
        out!(
            "daemon pid {} up {} s, workers {}",
            h.pid,
            h.uptime_s,
            if h.workers_alive {
                "alive"
            } else {
                "NOT ANSWERING"
            }
        );
        out!(
            "last watchdog heartbeat {} s ago; apply switch {}",
            h.last_heartbeat_s,
            if h.apply_switch { "on" } else { "off" }
        );
        out!("catalog {}", h.catalog_digest);
        out!("targets: {}", h.targets.join(", "));
        for t in &h.target_health {
            let since = |at: Option<i64>| {
                at.map(|a| format!("{} s ago", crate::time::unix_now() - a))
                    .unwrap_or_else(|| "never".into())
            };
            let mut gate = t
                .gate_format
                .map(|v| format!(", remote-gate format {v}"))
                .unwrap_or_default();
            if t.sessions_paused {
                gate.push_str(", psql sessions PAUSED (resets fail; one psql per job, retried)");
            }
            out!(
                "  {} ({}{gate}): {}; last success {}; last error {}{}",
                t.name,
                t.transport,
                if t.reachable {
                    "reachable"
                } else {
                    "UNREACHABLE"
                },
                since(t.last_ok_at),
                since(t.last_error_at),
                t.last_error_class
                    .as_deref()
                    .map(|c| format!(" ({c})"))
                    .unwrap_or_default()
            );
        }
        let jobs: Vec<String> = h.jobs.iter().map(|(k, v)| format!("{k} {v}")).collect();
        out!(
            "jobs: {}",
            if jobs.is_empty() {
                "none".to_string()
            } else {
                jobs.join(", ")
            }
        );
        if let Some(age) = h.oldest_unsettled_s {
            out!(
                "oldest unsettled apply: submitted {age} s ago (settled by its key once its target answers; `govsql jobs --state unsettled`)"
            );
        }
        if !h.rollouts.is_empty() {
            let by: Vec<String> = h.rollouts.iter().map(|(k, v)| format!("{k} {v}")).collect();
            out!(
                "rollouts: {}{}",
                by.join(", "),
                h.oldest_running_rollout_s
                    .map(|a| format!("; the oldest running was submitted {a} s ago"))
                    .unwrap_or_default()
            );
        }
    }
    let targets_ok = h.target_health.iter().all(|t| t.reachable);
    Ok(if h.workers_alive && targets_ok {
        ExitCode::Ok
    } else {
        ExitCode::Failed
    })
}

/// `STATE  MODE COMMAND  (job ID)`: the one-line form of a job.
fn job_line(job: &Job) -> String {
    format!(
        "{}  {} {}  (job {})",
        job.state, job.mode, job.command, job.job_id
    )
}

/// `govsql targets`: what a `--targets` selector picks, in the config's
/// order, with each target's tags and health. A selector
/// that cannot be read, or names a target or tag that is not there, is a
/// usage error that lists what there is.
pub(super) async fn targets_cmd(
    config_path: &Path,
    selector: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let selector = match selector.parse::<crate::fleet::Selector>() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("govsql: {e}");
            return Ok(ExitCode::Usage);
        }
    };
    let reply = call(config_path, &Request::Health {}).await?;
    let Reply::Health(h) = &reply else {
        return Ok(print_reply_error(&reply));
    };
    let all: Vec<(&str, &[String])> = h
        .target_health
        .iter()
        .map(|t| (t.name.as_str(), t.tags.as_slice()))
        .collect();
    let picked = match selector.pick(&all) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("govsql: {e}");
            return Ok(ExitCode::Usage);
        }
    };
    let rows: Vec<&crate::protocol::TargetHealth> = h
        .target_health
        .iter()
        .filter(|t| picked.contains(&t.name.as_str()))
        .collect();
    if json {
        out!("{}", serde_json::to_string(&rows)?);
        return Ok(ExitCode::Ok);
    }
    let ago = |at: Option<i64>| {
        at.map(|a| format!("{} s ago", crate::time::unix_now() - a))
            .unwrap_or_else(|| "never".into())
    };
    out!(
        "{:<20} {:<24} {:<9} {:<11} {:<14} LAST ERROR",
        "TARGET",
        "TAGS",
        "TRANSPORT",
        "REACHABLE",
        "LAST SUCCESS"
    );
    for t in rows {
        out!(
            "{:<20} {:<24} {:<9} {:<11} {:<14} {}{}",
            t.name,
            if t.tags.is_empty() {
                "-".to_string()
            } else {
                t.tags.join(",")
            },
            t.transport,
            if t.reachable { "yes" } else { "NO" },
            ago(t.last_ok_at),
            ago(t.last_error_at),
            t.last_error_class
                .as_deref()
                .map(|c| format!(" ({c})"))
                .unwrap_or_default()
        );
    }
    Ok(ExitCode::Ok)
}

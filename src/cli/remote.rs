//! The daemon's client side: submit (and wait), status, jobs, approve,
//! cancel, health; exit codes for the daemon's replies.

use super::*;

/// Exit code of a daemon reply that is an error.
pub(super) fn reply_error_code(reply: &Reply) -> i32 {
    match reply.error.as_ref().map(|e| e.kind.as_str()) {
        Some("bad_request") | Some("version") | Some("too_long") => EXIT_USAGE,
        Some("denied") | Some("expired") => 3,
        _ => EXIT_ERROR,
    }
}

pub(super) fn print_reply_error(reply: &Reply) -> i32 {
    if let Some(e) = &reply.error {
        eprintln!("govsql: {} ({})", e.message, e.kind);
    }
    reply_error_code(reply)
}

pub(super) async fn call(config_path: &Path, req: &Request) -> anyhow::Result<Reply> {
    let socket = client::socket_from_config(config_path);
    let mut c = Client::connect(&socket).await?;
    Ok(c.call(req).await?)
}

pub(super) async fn submit_to_daemon(
    config_path: &Path,
    mode: Mode,
    command: String,
    params: Vec<(String, String)>,
    a: CommonJobArgs,
) -> anyhow::Result<i32> {
    let req = Request::Submit {
        v: PROTOCOL_VERSION,
        command,
        mode,
        params,
        target: a.target,
        idempotency_key: a.idempotency_key,
        wait: a.wait,
        timeout_s: None,
    };
    let reply = call(config_path, &req).await?;
    let Some(job) = reply.job.as_ref().filter(|_| reply.ok) else {
        return Ok(print_reply_error(&reply));
    };
    Ok(print_job(job, a.json))
}

/// Prints a job; returns the exit code its state implies.
pub(super) fn print_job(job: &JobView, json: bool) -> i32 {
    if let Some(o) = &job.outcome {
        if json {
            print_outcome(o, true);
        } else {
            print_outcome(o, false);
            if let Some(by) = &job.approved_by {
                println!("  approved by: {by}");
            }
        }
        return if job.state == "cancelled" {
            3
        } else {
            o.status.exit_code()
        };
    }
    if json {
        println!(
            "{}",
            serde_json::json!({
                "job_id": job.job_id, "command": job.command, "mode": job.mode, "status": job.state,
                "run_id": null, "params_digest": job.params_digest, "closed_gates": [], "error_class": null,
                "evidence": null, "result": null
            })
        );
    } else {
        println!("{}", job_line(job));
        if job.state == "awaiting_approval" {
            println!(
                "  needs approval: another user in the approve list runs `govsql approve {}`",
                job.job_id
            );
        } else {
            println!("  `govsql status {}` shows its outcome", job.job_id);
        }
    }
    0
}

pub(super) async fn status_cmd(
    config_path: &Path,
    job_id: &str,
    json: bool,
) -> anyhow::Result<i32> {
    let reply = call(
        config_path,
        &Request::Status {
            v: PROTOCOL_VERSION,
            job_id: job_id.to_string(),
        },
    )
    .await?;
    match reply.job.as_ref().filter(|_| reply.ok) {
        Some(job) => Ok(print_job(job, json)),
        None => Ok(print_reply_error(&reply)),
    }
}

pub(super) async fn simple_job_op(config_path: &Path, req: Request) -> anyhow::Result<i32> {
    let reply = call(config_path, &req).await?;
    match reply.job.as_ref().filter(|_| reply.ok) {
        Some(job) => {
            println!("{}", job_line(job));
            Ok(0)
        }
        None => Ok(print_reply_error(&reply)),
    }
}

pub(super) async fn jobs_cmd(config_path: &Path, limit: u32, json: bool) -> anyhow::Result<i32> {
    let reply = call(
        config_path,
        &Request::List {
            v: PROTOCOL_VERSION,
            limit: Some(limit),
        },
    )
    .await?;
    let Some(jobs) = reply.jobs.as_ref().filter(|_| reply.ok) else {
        return Ok(print_reply_error(&reply));
    };
    if json {
        println!("{}", serde_json::to_string(jobs)?);
        return Ok(0);
    }
    println!(
        "{:<20} {:<18} {:<7} {:<32} {:<12} RUN",
        "JOB", "STATE", "MODE", "COMMAND", "ACTOR"
    );
    for j in jobs {
        let run = j
            .outcome
            .as_ref()
            .and_then(|o| o.run_id)
            .map(|r| r.to_string())
            .unwrap_or_default();
        println!(
            "{:<20} {:<18} {:<7} {:<32} {:<12} {run}",
            j.job_id,
            j.state,
            j.mode.as_str(),
            j.command,
            j.actor
        );
    }
    Ok(0)
}

pub(super) async fn health_cmd(config_path: &Path, json: bool) -> anyhow::Result<i32> {
    let reply = call(
        config_path,
        &Request::Health {
            v: PROTOCOL_VERSION,
        },
    )
    .await?;
    let Some(h) = reply.health.as_ref().filter(|_| reply.ok) else {
        return Ok(print_reply_error(&reply));
    };
    if json {
        println!("{}", serde_json::to_string(h)?);
    } else {
        println!(
            "daemon pid {} up {} s, workers {}",
            h.pid,
            h.uptime_s,
            if h.workers_alive {
                "alive"
            } else {
                "NOT ANSWERING"
            }
        );
        println!(
            "last watchdog heartbeat {} s ago; apply switch {}",
            h.last_heartbeat_s,
            if h.apply_switch { "on" } else { "off" }
        );
        println!("catalog {}", h.catalog_digest);
        println!("targets: {}", h.targets.join(", "));
        let jobs: Vec<String> = h.jobs.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!(
            "jobs: {}",
            if jobs.is_empty() {
                "none".to_string()
            } else {
                jobs.join(", ")
            }
        );
    }
    Ok(if h.workers_alive { 0 } else { 4 })
}

/// `STATE  MODE COMMAND  (job ID)`: the one-line form of a job.
fn job_line(job: &JobView) -> String {
    format!(
        "{}  {} {}  (job {})",
        job.state,
        job.mode.as_str(),
        job.command,
        job.job_id
    )
}

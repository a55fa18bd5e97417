//! `govsql batch FILE.jsonl`: many jobs from one file. Each line:
//! `{"command": …, "mode": "plan|apply|verify", "params": {"name": "value",
//! …}, "target": …, "idempotency_key": …}`.
//!
//! Every line is read and parsed before anything is sent. `--check` asks
//! the daemon to check each line (command, target, access, params) and
//! submits nothing. A real run submits every line over one connection,
//! then waits for each job, reconnecting if the daemon restarts (the jobs
//! are in its durable queue), and reports per line: line number, job id,
//! status, error class and message; `--json` prints the same as one JSON
//! object. The exit code is the worst outcome's.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::client::Client;
use crate::job::{ExitCode, JobId, Mode, Params};
use crate::protocol::{JobSpec, Reply, Request, Submit, WaitFor};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    command: String,
    mode: Mode,
    #[serde(default)]
    params: BTreeMap<String, String>,
    #[serde(default)]
    target: Option<String>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

/// What became of one line.
#[derive(Debug, Serialize)]
struct LineReport {
    /// The line number in the file (1-based).
    line: usize,
    /// The job, once submitted.
    job_id: Option<JobId>,
    /// The job's final state, `checked` (with --check), or `rejected` when
    /// it never became a job.
    status: String,
    /// The error class of a refused or failed job.
    error_class: Option<String>,
    /// Why, in words (never a param value).
    message: Option<String>,
    #[serde(skip)]
    code: ExitCode,
}

/// How long a wait keeps reconnecting to a daemon that went away.
const RECONNECT_FOR: Duration = Duration::from_secs(120);

/// Runs a batch (or checks it); the exit code is the worst outcome's.
pub async fn run(socket: &Path, file: &Path, check: bool, json: bool) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
    let mut lines = Vec::new();
    let mut bad = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        // serde's message could quote a value; name the line and column only.
        match serde_json::from_str::<Line>(raw) {
            Ok(l) => lines.push((n + 1, l)),
            Err(e) => bad.push(format!(
                "{}:{}: not a job line (column {}); expected {{\"command\", \"mode\", \"params\"}}",
                file.display(),
                n + 1,
                e.column()
            )),
        }
    }
    if !bad.is_empty() {
        for b in &bad {
            eprintln!("govsql: {b}");
        }
        eprintln!(
            "govsql: {} of {} lines are not job lines; nothing was submitted",
            bad.len(),
            bad.len() + lines.len()
        );
        return Ok(ExitCode::Usage);
    }
    let mut client = Client::connect(socket).await?;
    let bar = progress(lines.len() as u64 * if check { 1 } else { 2 }, json);
    let mut reports = Vec::with_capacity(lines.len());
    for (n, l) in lines {
        let spec = JobSpec {
            command: l.command,
            mode: l.mode,
            params: Params(l.params.into_iter().collect()),
            target: l.target,
            idempotency_key: l.idempotency_key,
            plan_digest: None,
        };
        let req = if check {
            Request::Check(spec)
        } else {
            Request::Submit(Submit::from(spec))
        };
        let reply = client.call(&req).await?;
        reports.push(submitted(n, &reply, check));
        bar.inc(1);
    }
    if !check {
        bar.set_message("waiting");
        for r in reports.iter_mut() {
            let Some(id) = r.job_id.clone() else {
                continue;
            };
            let reply = wait_for(socket, &mut client, &id).await?;
            finished(r, &reply);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(report(&reports, check, json))
}

fn progress(len: u64, json: bool) -> indicatif::ProgressBar {
    if json || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(len);
    b.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b
}

/// The report of a line after its submit (or check).
fn submitted(line: usize, reply: &Reply, check: bool) -> LineReport {
    match reply {
        Reply::Job(job) => {
            let refusal = job.preset.as_ref();
            LineReport {
                line,
                job_id: (!check).then(|| job.job_id.clone()),
                status: match (check, refusal) {
                    (true, Some(_)) => "refused".into(),
                    (true, None) => "checked".into(),
                    (false, _) => job.state.as_str().to_string(),
                },
                error_class: refusal.map(|r| r.class.as_str().to_string()),
                message: refusal.map(|r| r.message.clone()),
                code: match (check, refusal) {
                    (true, Some(_)) => ExitCode::Refused,
                    _ => ExitCode::Ok,
                },
            }
        }
        Reply::Error(e) => LineReport {
            line,
            job_id: None,
            status: "rejected".into(),
            error_class: None,
            message: Some(e.message.clone()),
            code: e.kind.exit_code(),
        },
        _ => LineReport {
            line,
            job_id: None,
            status: "rejected".into(),
            error_class: None,
            message: Some("an unexpected reply; is the client up to date?".into()),
            code: ExitCode::Error,
        },
    }
}

/// Waits for one job, reconnecting while the daemon restarts.
async fn wait_for(socket: &Path, client: &mut Client, id: &JobId) -> anyhow::Result<Reply> {
    let req = Request::Wait(WaitFor {
        job_id: id.clone(),
        timeout_s: None,
    });
    let started = Instant::now();
    loop {
        match client.call(&req).await {
            Ok(reply) => return Ok(reply),
            Err(e) if started.elapsed() < RECONNECT_FOR => {
                tracing::warn!(cause = %e, "lost the daemon while waiting; reconnecting");
                tokio::time::sleep(Duration::from_millis(500)).await;
                if let Ok(c) = Client::connect(socket).await {
                    *client = c;
                }
            }
            Err(e) => {
                return Err(anyhow::anyhow!(
                    "{e}; the jobs are in the daemon's queue: `govsql wait JOB` for each, or `govsql jobs`"
                ))
            }
        }
    }
}

/// The report of a line after its job ended.
fn finished(r: &mut LineReport, reply: &Reply) {
    match reply {
        Reply::Job(job) => {
            r.status = job.state.as_str().to_string();
            r.code = job.state.exit_code();
            if let Some(o) = &job.outcome {
                r.error_class = o.error_class.as_ref().map(|c| c.as_str().to_string());
                if r.error_class.is_some() {
                    r.message = Some(o.message.clone());
                }
            }
        }
        Reply::Error(e) => {
            r.status = "unknown".into();
            r.message = Some(e.message.clone());
            r.code = e.kind.exit_code();
        }
        _ => {
            r.status = "unknown".into();
            r.code = ExitCode::Error;
        }
    }
}

/// Prints the per-line report and the summary; the worst exit code.
fn report(reports: &[LineReport], check: bool, json: bool) -> ExitCode {
    let mut summary: BTreeMap<&str, usize> = BTreeMap::new();
    for r in reports {
        *summary.entry(r.status.as_str()).or_default() += 1;
    }
    let worst = reports.iter().map(|r| r.code).fold(ExitCode::Ok, worse);
    if json {
        let v = serde_json::json!({
            "lines": reports,
            "summary": summary,
            "checked_only": check,
        });
        out!("{v}");
        return worst;
    }
    for r in reports.iter().filter(|r| r.code != ExitCode::Ok || check) {
        out!(
            "line {:<6} {:<20} {:<18} {}{}",
            r.line,
            r.job_id.as_ref().map(|j| j.as_str()).unwrap_or("-"),
            r.status,
            r.error_class
                .as_deref()
                .map(|c| format!("{c}: "))
                .unwrap_or_default(),
            super::printable(r.message.as_deref().unwrap_or(""))
        );
    }
    let parts: Vec<String> = summary.iter().map(|(k, v)| format!("{k} {v}")).collect();
    out!(
        "batch of {} line{}{}: {}",
        reports.len(),
        if reports.len() == 1 { "" } else { "s" },
        if check {
            " checked, nothing submitted"
        } else {
            ""
        },
        parts.join(", ")
    );
    worst
}

/// The worse of two exit codes: failed over refused over pending over
/// error over success.
fn worse(a: ExitCode, b: ExitCode) -> ExitCode {
    let rank = |c: ExitCode| match c {
        ExitCode::Ok => 0,
        ExitCode::Error | ExitCode::Usage => 1,
        ExitCode::Pending => 2,
        ExitCode::Refused => 3,
        ExitCode::Failed => 4,
    };
    if rank(b) > rank(a) {
        b
    } else {
        a
    }
}

//! `govsql batch FILE.jsonl`: submits many jobs over one connection, waits
//! for each, shows a progress bar on a terminal and ends with a summary by
//! status. Each line: `{"command": …, "mode": "plan|apply|verify",
//! "params": {"name": "value", …}, "target": …, "idempotency_key": …}`.

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal};
use std::path::Path;

use serde::Deserialize;

use crate::client::Client;
use crate::job::{ExitCode, Mode, Params};
use crate::protocol::{Request, PROTOCOL_VERSION};

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

/// Runs a batch; the exit code is the worst outcome's.
pub async fn run(socket: &Path, file: &Path) -> anyhow::Result<ExitCode> {
    let reader = std::io::BufReader::new(
        std::fs::File::open(file)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?,
    );
    let mut jobs = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        // serde's message could quote a value; name the line only.
        let parsed: Line = serde_json::from_str(&line).map_err(|e| {
            anyhow::anyhow!(
                "{}:{}: not a job line (column {}); expected {{\"command\", \"mode\", \"params\"}}",
                file.display(),
                n + 1,
                e.column()
            )
        })?;
        jobs.push(parsed);
    }
    let mut client = Client::connect(socket).await?;
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(jobs.len() as u64 * 2);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_message("submitting");
    let mut ids = Vec::with_capacity(jobs.len());
    let mut summary: BTreeMap<String, usize> = BTreeMap::new();
    for j in jobs {
        let reply = client
            .call(&Request::Submit {
                v: PROTOCOL_VERSION,
                command: j.command,
                mode: j.mode,
                params: Params(j.params.into_iter().collect()),
                target: j.target,
                idempotency_key: j.idempotency_key,
                wait: false,
                timeout_s: None,
            })
            .await?;
        match reply.job {
            Some(job) if reply.ok => ids.push(job.job_id),
            _ => *summary.entry("rejected".into()).or_default() += 1,
        }
        bar.inc(1);
    }
    bar.set_message("waiting");
    let mut worst = ExitCode::Ok;
    for id in &ids {
        let reply = client
            .call(&Request::Wait {
                v: PROTOCOL_VERSION,
                job_id: id.clone(),
                timeout_s: None,
            })
            .await?;
        let (state, code) = match reply.job.as_ref() {
            Some(j) => (j.state.as_str(), j.state.exit_code()),
            None => ("unknown", ExitCode::Error),
        };
        worst = worse(worst, code);
        *summary.entry(state.to_string()).or_default() += 1;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let parts: Vec<String> = summary.iter().map(|(k, v)| format!("{k} {v}")).collect();
    out!("batch of {} jobs: {}", ids.len(), parts.join(", "));
    if summary.contains_key("rejected") {
        worst = worse(worst, ExitCode::Error);
    }
    Ok(worst)
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

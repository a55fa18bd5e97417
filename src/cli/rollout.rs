//! Rollouts from the command line: `plan|apply|verify --targets S`
//! (submit, and with `--wait` a progress bar then the per-target table),
//! `govsql rollouts`, and `govsql rollout status|resume|cancel ID`.
//! Exit codes follow DESIGN.md: 0 done; 3 every child refused; 4 halted,
//! partial or cancelled; 5 still running when the wait ended.

use std::time::Duration;

use super::remote::{call, print_reply_error};
use super::*;
use crate::job::JobId;
use crate::protocol::{ListRollouts, RolloutRef};
use crate::rollout::{Limit, Rollout, Strategy};

/// `govsql rollout …`
#[derive(Debug, Subcommand)]
pub enum RolloutAction {
    /// A rollout per target: state, error class, run id, times.
    Status {
        /// The rollout.
        rollout_id: String,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// A new pass over the targets not ended applied, verified or planned
    /// (an applied target is never run again).
    Resume {
        /// The rollout.
        rollout_id: String,
        /// Wait until it is over (progress bar, then the table).
        #[arg(long)]
        wait: bool,
        /// With --wait: give up waiting after this many seconds (exit 5).
        #[arg(long, requires = "wait")]
        timeout: Option<u64>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a rollout: nothing more starts; queued children are refused
    /// `cancelled`, running ones finish.
    Cancel {
        /// The rollout.
        rollout_id: String,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

/// The strategy flags of a job submitted with `--targets`.
pub(super) fn strategy(
    canary: Option<u32>,
    max_concurrency: Option<&str>,
    max_errors: Option<&str>,
) -> Result<Strategy, String> {
    let limit = |flag: &str, v: Option<&str>, default: Limit| -> Result<Limit, String> {
        v.map_or(Ok(default), |t| {
            t.parse::<Limit>().map_err(|e| format!("--{flag}: {e}"))
        })
    };
    let d = Strategy::default();
    Ok(Strategy {
        canary: canary.unwrap_or(d.canary),
        max_concurrency: limit("max-concurrency", max_concurrency, d.max_concurrency)?,
        max_errors: limit("max-errors", max_errors, d.max_errors)?,
    })
}

/// Submits a rollout (`submit` names `targets` and the strategy); with
/// `wait`, follows it to its end.
pub(super) async fn submit(
    config_path: &Path,
    submit: Submit,
    wait: bool,
    timeout: Option<u64>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let reply = call(config_path, &Request::Submit(submit)).await?;
    let Reply::Rollout(r) = reply else {
        return Ok(print_reply_error(&reply));
    };
    follow(config_path, *r, wait, timeout, json).await
}

/// Prints a rollout at once, or follows it to its end with `wait`.
async fn follow(
    config_path: &Path,
    r: Rollout,
    wait: bool,
    timeout: Option<u64>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    if !wait || r.is_over() {
        print(&r, json);
        return Ok(if wait { r.exit_code() } else { ExitCode::Ok });
    }
    let id = r.rollout_id.clone();
    if r.state == crate::rollout::RolloutState::AwaitingApproval {
        eprintln!("govsql: rollout {id} over {} targets is awaiting approval (`govsql approve {id}`); waiting", r.targets.len());
    } else {
        eprintln!(
            "govsql: rollout {id} over {} targets submitted; waiting (Ctrl-C stops waiting, not the rollout)",
            r.targets.len()
        );
    }
    let bar = indicatif::ProgressBar::new(r.targets.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} targets ended  {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let deadline = timeout.map(|t| tokio::time::Instant::now() + Duration::from_secs(t));
    let socket = client::socket_from_config(config_path)?;
    let mut c = Client::connect(&socket).await?;
    let ask = Request::RolloutStatus(RolloutRef {
        rollout_id: id.clone(),
    });
    let mut last = r;
    loop {
        bar.set_position(ended(&last) as u64);
        bar.set_message(tally(&last));
        if last.is_over() {
            break;
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            bar.abandon();
            eprintln!("govsql: rollout {id} is still {}; it goes on: `govsql rollout status {id}` shows it", last.state);
            print(&last, json);
            return Ok(ExitCode::Pending);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            _ = tokio::signal::ctrl_c() => {
                bar.abandon();
                eprintln!("govsql: stopped waiting; rollout {id} goes on: `govsql rollout status {id}` shows it");
                return Ok(ExitCode::Pending);
            }
        }
        match c.call(&ask).await? {
            Reply::Rollout(r) => last = *r,
            other => {
                bar.abandon();
                return Ok(print_reply_error(&other));
            }
        }
    }
    bar.finish_and_clear();
    print(&last, json);
    Ok(last.exit_code())
}

/// Targets whose part is over (ended, skipped or never started).
fn ended(r: &Rollout) -> usize {
    r.targets
        .iter()
        .filter(|t| !t.state.running() && t.state != crate::rollout::TargetState::Pending)
        .count()
}

/// `applied 3 · failed 1 · skipped 7`.
fn tally(r: &Rollout) -> String {
    r.tally()
        .into_iter()
        .map(|(s, n)| format!("{s} {n}"))
        .collect::<Vec<_>>()
        .join(" · ")
}

/// Prints a rollout as one JSON object, or its header and per-target table.
fn print(r: &Rollout, json: bool) {
    if json {
        out!(
            "{}",
            serde_json::to_string(r).unwrap_or_else(|_| "{}".into())
        );
        return;
    }
    out!(
        "rollout {}  {} {}  {}  pass {}  (canary {}, max-concurrency {}, max-errors {}){}",
        r.rollout_id,
        r.mode,
        r.command,
        r.state,
        r.pass,
        r.canary,
        r.max_concurrency,
        r.max_errors,
        r.approved_by
            .as_ref()
            .map(|b| format!("  approved by {b}"))
            .unwrap_or_default()
    );
    let width = r
        .targets
        .iter()
        .map(|t| t.target.len())
        .max()
        .unwrap_or(6)
        .max(6);
    out!(
        "{:width$}  {:<17}  {:<20}  {:>8}  {:<20}  {:>6}  JOB",
        "TARGET",
        "STATE",
        "CLASS",
        "RUN",
        "STARTED",
        "TOOK"
    );
    for t in &r.targets {
        let took = match (t.duration_ms, t.started_at, t.finished_at) {
            (Some(ms), _, _) => format!("{:.1}s", ms as f64 / 1000.0),
            (None, Some(s), Some(f)) => format!("{}s", (f - s).max(0)),
            _ => "-".into(),
        };
        out!(
            "{:width$}  {:<17}  {:<20}  {:>8}  {:<20}  {:>6}  {}",
            t.target,
            t.state.as_str(),
            t.error_class.as_deref().unwrap_or("-"),
            t.run_id
                .map(|r| r.to_string())
                .unwrap_or_else(|| "-".into()),
            t.started_at
                .map(crate::time::utc_text)
                .unwrap_or_else(|| "-".into()),
            took,
            t.job_id
                .as_ref()
                .map(|j| j.to_string())
                .unwrap_or_else(|| "-".into())
        );
    }
    out!("{}", tally(r));
}

fn rollout_id_arg(s: &str) -> Result<JobId, ExitCode> {
    JobId::parse(s).ok_or_else(|| {
        eprintln!("govsql: {s:?} is not a rollout id (`govsql rollouts` lists them)");
        ExitCode::Usage
    })
}

/// `govsql rollout status|resume|cancel ID`.
pub(super) async fn rollout_cmd(
    config_path: &Path,
    action: RolloutAction,
) -> anyhow::Result<ExitCode> {
    let by_id = |s: &str| rollout_id_arg(s).map(|rollout_id| RolloutRef { rollout_id });
    let made = match action {
        RolloutAction::Status { rollout_id, json } => {
            by_id(&rollout_id).map(|r| (Request::RolloutStatus(r), false, None, json))
        }
        RolloutAction::Resume {
            rollout_id,
            wait,
            timeout,
            json,
        } => by_id(&rollout_id).map(|r| (Request::RolloutResume(r), wait, timeout, json)),
        RolloutAction::Cancel { rollout_id, json } => {
            by_id(&rollout_id).map(|r| (Request::RolloutCancel(r), false, None, json))
        }
    };
    let (req, wait, timeout, json) = match made {
        Ok(m) => m,
        Err(code) => return Ok(code),
    };
    let status = matches!(req, Request::RolloutStatus(_));
    let reply = call(config_path, &req).await?;
    let Reply::Rollout(r) = reply else {
        return Ok(print_reply_error(&reply));
    };
    if status {
        print(&r, json);
        // A status of a rollout still going is a success, like `status`.
        return Ok(if r.is_over() {
            r.exit_code()
        } else {
            ExitCode::Ok
        });
    }
    follow(config_path, *r, wait, timeout, json).await
}

/// `govsql rollouts`: the newest rollouts, one line each.
pub(super) async fn rollouts_cmd(
    config_path: &Path,
    limit: u32,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let reply = call(
        config_path,
        &Request::Rollouts(ListRollouts { limit: Some(limit) }),
    )
    .await?;
    let Reply::Rollouts(list) = reply else {
        return Ok(print_reply_error(&reply));
    };
    if json {
        out!(
            "{}",
            serde_json::to_string(&list).unwrap_or_else(|_| "[]".into())
        );
        return Ok(ExitCode::Ok);
    }
    out!(
        "{:<24}  {:<17}  {:<6}  {:<28}  {:>7}  {:<20}  TARGETS",
        "ROLLOUT",
        "STATE",
        "MODE",
        "COMMAND",
        "TARGETS",
        "SUBMITTED"
    );
    for r in &list {
        out!(
            "{:<24}  {:<17}  {:<6}  {:<28}  {:>7}  {:<20}  {}",
            r.rollout_id.to_string(),
            r.state.as_str(),
            r.mode.as_str(),
            r.command,
            r.targets.len(),
            crate::time::utc_text(r.submitted_at),
            tally(r)
        );
    }
    Ok(ExitCode::Ok)
}

/// The rollouts awaiting approval, after `govsql approvals`' jobs: one
/// line each (`govsql show ROLLOUT` shows its values and targets).
pub(super) async fn awaiting_cmd(config_path: &Path) -> anyhow::Result<ExitCode> {
    let reply = call(
        config_path,
        &Request::Rollouts(ListRollouts { limit: Some(200) }),
    )
    .await?;
    let Reply::Rollouts(list) = reply else {
        return Ok(print_reply_error(&reply));
    };
    for r in list
        .iter()
        .filter(|r| r.state == crate::rollout::RolloutState::AwaitingApproval)
    {
        out!(
            "rollout {}  awaiting_approval  {} {} over {} targets by {}  (govsql show {})",
            r.rollout_id,
            r.mode,
            r.command,
            r.targets.len(),
            r.actor,
            r.rollout_id
        );
    }
    Ok(ExitCode::Ok)
}

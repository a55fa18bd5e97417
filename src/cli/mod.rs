//! The command line: argument parsing (clap) and the subcommands that run
//! in this process. Exit codes come from [`ExitCode`], decided in one
//! place: 0 planned/applied/verified, 1 error, 2 usage, 3 refused,
//! 4 failed, 5 still pending.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

use crate::catalog::Catalog;
use crate::client::{self, Client};
use crate::config::Config;
use crate::job::{ExitCode, Job, JobState, Mode, Outcome, Params};
use crate::params;
use crate::protocol::{
    Approve, JobRef, ListJobs, ReadLog, Reject, Reply, Request, Submit, WaitFor,
};
use crate::psql::DbRole;
use crate::runtime::Runtime;
use crate::switch::ApplySwitch;
use crate::transport::{for_target, Executor};

/// Prints one line to stdout; a reader that went away (`govsql jobs |
/// head -1`) ends the process quietly with status 0 instead of a panic.
macro_rules! out {
    ($($arg:tt)*) => { $crate::cli::emit(format_args!($($arg)*), true) };
}
/// [`out!`] without the newline.
macro_rules! out_raw {
    ($($arg:tt)*) => { $crate::cli::emit(format_args!($($arg)*), false) };
}

mod admin;
mod batch;
mod direct;
mod freeze;
mod gate;
mod remote;
mod rollout;
mod service_user;

pub use admin::catalog_check;
pub use direct::print_outcome;

use admin::{catalog_cmd, config_cmd, migrate_cmd, reversal, self_test, switch_cmd};
use direct::job;
use remote::{health_cmd, jobs_cmd, metrics_cmd, simple_job_op, status_cmd, submit_to_daemon};

/// Text for a terminal: control characters (escape sequences, carriage
/// returns, newlines inside a value) are shown escaped, never sent raw.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Writes to stdout for [`out!`]; see there.
pub fn emit(args: std::fmt::Arguments<'_>, newline: bool) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let written = stdout.write_fmt(args).and_then(|_| {
        if newline {
            stdout.write_all(b"\n")
        } else {
            Ok(())
        }
    });
    if let Err(e) = written {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(ExitCode::Ok.code());
        }
        eprintln!("govsql: cannot write to stdout: {e}");
        std::process::exit(ExitCode::Error.code());
    }
}

/// The exit codes, for `--help` (the README has the same table).
pub const EXIT_CODES: &str = "Exit codes:
  0  planned, applied, verified, or queued without --wait
  1  error: daemon unreachable, config unreadable, internal
  2  usage: unknown flag, malformed --param, unknown target, bad job id
  3  refused (an unknown command too, in every subcommand)
  4  failed
  5  still pending when a --timeout ended the wait (the job goes on)
A rollout (--targets) exits 0 when done, 3 when every target was refused,
4 when halted, partial or cancelled, 5 when the wait ended first.";

/// The version with the commit it was built from.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("GOVSQL_COMMIT"), ")");

/// govsql: a governed remote psql executor.
#[derive(Debug, Parser)]
#[command(name = "govsql", version = VERSION, about, long_about = None, after_help = EXIT_CODES)]
pub struct Cli {
    /// Config file (else $GOVSQL_CONFIG, else /etc/govsql/govsql.toml).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// The subcommand.
    #[command(subcommand)]
    pub command: Cmd,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Resolve and audit a command; never runs its SQL.
    Plan(JobArgs),
    /// Run a command, gated, atomic with its ledger row.
    Apply(JobArgs),
    /// Run read-only checks (default: dot_iu_healthcheck; with
    /// --param collection_id=…: dot_iu_collection_validate).
    Verify(VerifyArgs),
    /// Print a command's rollback note and inverse command; runs nothing.
    Reversal {
        /// The command.
        command: String,
    },
    /// The catalog: list, seed-sql, check.
    Catalog {
        /// What to do.
        #[command(subcommand)]
        action: CatalogAction,
    },
    /// Apply the SQL substrate and catalog seed to a target (as admin).
    Migrate {
        /// The target (default: the config's default).
        #[arg(long)]
        target: Option<String>,
        /// Also install the demo IU Core schema.
        #[arg(long)]
        demo: bool,
        /// Succeed although some commands' target functions do not resolve
        /// (those commands are refused with target_missing).
        #[arg(long)]
        allow_missing: bool,
        /// Roll everything back instead (refused while the ledger has rows).
        #[arg(long, conflicts_with = "demo")]
        rollback: bool,
    },
    /// Freeze windows on a target (as admin): add, list, remove.
    Freeze {
        /// What to do.
        #[command(subcommand)]
        action: freeze::FreezeAction,
    },
    /// The local apply switch (kill switch): on, off, status.
    Switch {
        /// on, off or status.
        #[arg(value_parser = ["on", "off", "status"])]
        state: String,
        /// With `on`: turn itself off after this long (30m, 2h, 1d).
        #[arg(long = "for", value_name = "DUR", conflicts_with = "once")]
        for_: Option<String>,
        /// With `on`: let exactly one apply through, then turn off.
        #[arg(long)]
        once: bool,
    },
    /// Run the daemon (socket, durable queue, workers).
    Daemon,
    /// On the database host, from authorized_keys: run only govsql's own
    /// psql command lines for this target; refuse anything else.
    RemoteGate(gate::GateArgs),
    /// Check a config file and its catalog offline.
    Config {
        /// What to do.
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Check this installation: config, catalog, state directory, every
    /// target (host key, login, runtime role, catalog digest), the daemon.
    SelfTest,
    /// Wait until a job ends (re-attach); --timeout ends the wait (exit 5)
    /// while the job goes on.
    Wait {
        /// The job.
        job_id: String,
        /// Give up waiting after this many seconds.
        #[arg(long)]
        timeout: Option<u64>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// A job's state and outcome.
    Status {
        /// The job.
        job_id: String,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Recent jobs.
    Jobs {
        /// At most this many (a page).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Which page, newest first (0 is the first).
        #[arg(long, default_value_t = 0)]
        page: u32,
        /// Only jobs in this state (queued, running, awaiting_approval, applied, refused, …).
        #[arg(long)]
        state: Option<String>,
        /// Only plan, apply or verify jobs.
        #[arg(long)]
        mode: Option<String>,
        /// Only this catalog command.
        #[arg(long)]
        command: Option<String>,
        /// Only this user's jobs.
        #[arg(long)]
        actor: Option<String>,
        /// Only this target's jobs.
        #[arg(long)]
        target: Option<String>,
        /// Only jobs submitted since: a duration ago (30m, 1h, 2d) or a UTC date (2026-11-01).
        #[arg(long)]
        since: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Approve a job that waits for approval (by a different user).
    Approve {
        /// The job.
        job_id: String,
        /// Why (optional, at most 200 characters; it goes into the ledger).
        #[arg(long)]
        reason: Option<String>,
        /// The plan digest `govsql show` showed: refused if the job is
        /// pinned to another plan.
        #[arg(long, value_name = "DIGEST")]
        plan: Option<String>,
    },
    /// Cancel a queued or waiting job.
    Cancel {
        /// The job.
        job_id: String,
    },
    /// The daemon's health.
    Health {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The targets a selector picks, with their tags and health.
    Targets {
        /// Target names, tag:NAME and all, comma-separated.
        #[arg(long, default_value = "all")]
        targets: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The ledger from the target, through the daemon (no psql on the database host needed).
    Log {
        /// Only this catalog command.
        #[arg(long)]
        command: Option<String>,
        /// Only runs with this status (planned, applied, verified, refused, failed).
        #[arg(long)]
        status: Option<String>,
        /// Only plan, apply or verify runs.
        #[arg(long)]
        mode: Option<String>,
        /// Only this actor's runs (non-admins always see only their own).
        #[arg(long)]
        actor: Option<String>,
        /// Only runs since: a duration ago (30m, 1h, 2d) or a UTC date (2026-11-01).
        #[arg(long)]
        since: Option<String>,
        /// The target (default: the config's default).
        #[arg(long)]
        target: Option<String>,
        /// At most this many rows, newest first.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Leave verify runs (the healthcheck timer's) out.
        #[arg(long)]
        no_verify: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Jobs and rollouts waiting for approval (those you may approve or
    /// reject; `rollouts --json` lists rollouts as JSON).
    Approvals {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// What a job will run, param values included (its submitter, an approver or root).
    Show {
        /// The job.
        job_id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Reject a job that waits for approval; the reason goes into the ledger.
    Reject {
        /// The job.
        job_id: String,
        /// Why (at most 200 characters).
        #[arg(long)]
        reason: String,
    },
    /// Print the daemon's metrics (Prometheus text format; for node_exporter's textfile collector).
    Metrics,
    /// Recent rollouts (jobs submitted with --targets), newest first.
    Rollouts {
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// One rollout: status (per target), resume, cancel.
    Rollout {
        /// What to do.
        #[command(subcommand)]
        action: rollout::RolloutAction,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the man pages (govsql.1 and one per subcommand) into a directory.
    Man {
        /// Where to write them.
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
    },
    /// Submit many jobs from a JSON-lines file, wait for them, summarise.
    Batch {
        /// One job per line: {"command": …, "mode": …, "params": {…}, "target"?, "idempotency_key"?}.
        file: PathBuf,
        /// Check every line with the daemon (command, target, access, params); submit nothing.
        #[arg(long)]
        check: bool,
        /// Print the per-line report and the summary as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

/// `govsql config …`
#[derive(Debug, Subcommand)]
pub enum ConfigAction {
    /// Validate the config (and its catalog) and print what it found.
    Check,
}

/// `govsql catalog …`
#[derive(Debug, Subcommand)]
pub enum CatalogAction {
    /// List the commands.
    List,
    /// Print the SQL that seeds the catalog table.
    SeedSql,
    /// Check a live database: targets resolve, digest matches.
    Check {
        /// The target (default: the config's default).
        #[arg(long)]
        target: Option<String>,
    },
}

/// Arguments shared by plan and apply.
#[derive(Debug, Args)]
pub struct JobArgs {
    /// The catalog command.
    pub command: String,
    #[command(flatten)]
    common: CommonJobArgs,
}

/// Arguments of verify (the command is optional).
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The catalog command (default: healthcheck or collection validate).
    pub command: Option<String>,
    #[command(flatten)]
    common: CommonJobArgs,
}

#[derive(Debug, Args)]
struct CommonJobArgs {
    /// A param, NAME=VALUE, or NAME=@FILE to read the value from a file
    /// (keeps secrets out of `ps`); repeatable.
    #[arg(long = "param", value_name = "NAME=VALUE")]
    params: Vec<String>,
    /// Read all params as one JSON object from stdin (`-`).
    #[arg(long, value_name = "-")]
    params_json: Option<String>,
    /// The target (default: the config's default).
    #[arg(long, conflicts_with = "targets")]
    target: Option<String>,
    /// A rollout over the targets this selector picks: target names,
    /// tag:NAME and all, comma-separated (config order).
    #[arg(long, value_name = "SELECTOR", conflicts_with_all = ["direct", "plan"])]
    targets: Option<String>,
    /// With --targets: the first N targets run first, one at a time; the
    /// rest start only if all of them succeeded (default 0).
    #[arg(long, value_name = "N", requires = "targets")]
    canary: Option<u32>,
    /// With --targets: at most this many targets at once, N or P% (default 1).
    #[arg(long, value_name = "N|P%", requires = "targets")]
    max_concurrency: Option<String>,
    /// With --targets: failures tolerated before the rollout halts, N or
    /// P% (default 0: the first failure halts).
    #[arg(long, value_name = "N|P%", requires = "targets")]
    max_errors: Option<String>,
    /// Idempotency key: the same key never runs twice (with --targets:
    /// each target's child runs under KEY@target).
    #[arg(long)]
    idempotency_key: Option<String>,
    /// apply: pin it to this plan digest (from `govsql plan`): it is
    /// refused (plan_drift) if what would run differs, and its approval
    /// approves exactly that plan, once.
    #[arg(long, value_name = "DIGEST")]
    plan: Option<String>,
    /// Wait for the outcome (the daemon's jobs).
    #[arg(long)]
    wait: bool,
    /// With --wait: give up waiting after this many seconds (exit 5; the
    /// job goes on, `govsql wait JOB` re-attaches).
    #[arg(long, requires = "wait")]
    timeout: Option<u64>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Run in this process against the target, without a daemon.
    #[arg(long)]
    direct: bool,
}

/// Runs the CLI; returns the process exit code.
pub fn main_with(cli: Cli) -> i32 {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("govsql: cannot start the async runtime: {e}");
            return ExitCode::Error.code();
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(code) => code.code(),
        Err(e) => {
            crate::logging::fatal(e);
            ExitCode::Error.code()
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let config_path = Config::resolve_path(cli.config.as_deref());
    match cli.command {
        Cmd::Plan(a) => job(&config_path, Mode::Plan, Some(a.command), a.common).await,
        Cmd::Apply(a) => job(&config_path, Mode::Apply, Some(a.command), a.common).await,
        Cmd::Verify(a) => job(&config_path, Mode::Verify, a.command, a.common).await,
        Cmd::Reversal { command } => reversal(&config_path, &command),
        Cmd::Catalog { action } => catalog_cmd(&config_path, action).await,
        Cmd::Migrate {
            target,
            demo,
            allow_missing,
            rollback,
        } => {
            migrate_cmd(
                &config_path,
                target.as_deref(),
                demo,
                allow_missing,
                rollback,
            )
            .await
        }
        Cmd::Freeze { action } => freeze::freeze_cmd(&config_path, action).await,
        Cmd::Switch { state, for_, once } => {
            switch_cmd(&config_path, &state, for_.as_deref(), once)
        }
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "govsql", &mut std::io::stdout());
            Ok(ExitCode::Ok)
        }
        Cmd::Man { out_dir } => {
            std::fs::create_dir_all(&out_dir)?;
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::generate_to(cmd, &out_dir)?;
            Ok(ExitCode::Ok)
        }
        Cmd::Daemon => {
            let config = Config::load(&config_path)?;
            crate::daemon::run(config, config_path.clone()).await?;
            Ok(ExitCode::Ok)
        }
        Cmd::Config {
            action: ConfigAction::Check,
        } => config_cmd(&config_path),
        Cmd::RemoteGate(a) => Ok(gate::remote_gate(&a)),
        Cmd::SelfTest => self_test(&config_path).await,
        Cmd::Status { job_id, json } => status_cmd(&config_path, &job_id, json).await,
        Cmd::Wait {
            job_id,
            timeout,
            json,
        } => remote::wait_cmd(&config_path, &job_id, timeout, json).await,
        Cmd::Jobs {
            limit,
            page,
            state,
            mode,
            command,
            actor,
            target,
            since,
            json,
        } => {
            let filter = match remote::list_filter(state, mode, command, actor, target, since) {
                Ok(f) => f,
                Err(code) => return Ok(code),
            };
            jobs_cmd(&config_path, limit, page, filter, json).await
        }
        Cmd::Approve {
            job_id,
            reason,
            plan,
        } => match remote::job_id_arg(&job_id) {
            Ok(job_id) => {
                let req = Request::Approve(Approve {
                    job_id,
                    reason,
                    plan,
                });
                simple_job_op(&config_path, req, false).await
            }
            Err(code) => Ok(code),
        },
        Cmd::Cancel { job_id } => match remote::job_id_arg(&job_id) {
            Ok(job_id) => {
                let req = Request::Cancel(JobRef { job_id });
                simple_job_op(&config_path, req, true).await
            }
            Err(code) => Ok(code),
        },
        Cmd::Health { json } => health_cmd(&config_path, json).await,
        Cmd::Targets { targets, json } => remote::targets_cmd(&config_path, &targets, json).await,
        Cmd::Metrics => metrics_cmd(&config_path).await,
        Cmd::Rollouts { limit, json } => rollout::rollouts_cmd(&config_path, limit, json).await,
        Cmd::Rollout { action } => rollout::rollout_cmd(&config_path, action).await,
        Cmd::Approvals { json } => {
            let filter = crate::protocol::ListFilter {
                state: Some(crate::job::JobState::AwaitingApproval),
                ..Default::default()
            };
            let code = jobs_cmd(&config_path, 1000, 0, filter, json).await?;
            if json || code != ExitCode::Ok {
                return Ok(code);
            }
            rollout::awaiting_cmd(&config_path).await
        }
        Cmd::Show { job_id, json } => remote::show_cmd(&config_path, &job_id, json).await,
        Cmd::Reject { job_id, reason } => match remote::job_id_arg(&job_id) {
            Ok(job_id) => {
                let req = Request::Reject(Reject { job_id, reason });
                simple_job_op(&config_path, req, true).await
            }
            Err(code) => Ok(code),
        },
        Cmd::Log {
            command,
            status,
            mode,
            actor,
            since,
            target,
            limit,
            no_verify,
            json,
        } => {
            let (mode, since) = match (remote::mode_arg(mode), remote::since_arg(since)) {
                (Ok(m), Ok(s)) => (m, s),
                (Err(code), _) | (_, Err(code)) => return Ok(code),
            };
            let filter = crate::protocol::LogFilter {
                command,
                status,
                mode,
                actor,
                since,
                no_verify,
            };
            remote::log_cmd(&config_path, target, filter, limit, json).await
        }
        Cmd::Batch { file, check, json } => {
            batch::run(
                &client::socket_from_config(&config_path)?,
                &file,
                check,
                json,
            )
            .await
        }
    }
}

fn load(config_path: &Path) -> anyhow::Result<(Config, Catalog)> {
    let config = Config::load(config_path)?;
    let catalog = Catalog::load(&config.daemon.catalog)?;
    Ok((config, catalog))
}

/// Logs to stderr (journald keeps it); `GOVSQL_LOG` sets the filter.
/// The daemon logs every job at `info`; one-shot commands only warnings.
pub fn init_tracing(cli: &Cli) {
    let default = if matches!(cli.command, Cmd::Daemon) {
        "info"
    } else {
        "warn"
    };
    crate::logging::init(default);
}

//! The command line: argument parsing (clap) and the subcommands that run
//! in this process. Exit codes, in one place: 0 planned/applied/verified,
//! 1 error, 2 usage, 3 refused, 4 failed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

use crate::catalog::Catalog;
use crate::client::{self, Client};
use crate::config::{Config, TargetConfig, TransportKind};
use crate::daemon::protocol::{JobView, Reply, Request, PROTOCOL_VERSION};
use crate::params;
use crate::psql::{self, control_rows, DbRole, Script, Sections};
use crate::runtime::{JobSpec, Mode, Outcome, Runtime};
use crate::switch::ApplySwitch;
use crate::transport::local::LocalExecutor;
use crate::transport::ssh::SshExecutor;
use crate::transport::{run_with_deadline, Executor, Exit, ScriptRequest};

/// Exit code for errors (config, daemon unreachable, internal).
pub const EXIT_ERROR: i32 = 1;
/// Exit code for usage errors.
pub const EXIT_USAGE: i32 = 2;

/// govsql: a governed remote psql executor.
#[derive(Debug, Parser)]
#[command(name = "govsql", version, about, long_about = None)]
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
        /// Roll everything back instead (refused while the ledger has rows).
        #[arg(long, conflicts_with = "demo")]
        rollback: bool,
    },
    /// The local apply switch (kill switch): on, off, status.
    Switch {
        /// on, off or status.
        #[arg(value_parser = ["on", "off", "status"])]
        state: String,
    },
    /// Run the daemon (socket, durable queue, workers).
    Daemon,
    /// Check this installation: config, catalog, state directory, every
    /// target (host key, login, runtime role, catalog digest), the daemon.
    SelfTest,
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
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Approve a job that waits for approval (by a different user).
    Approve {
        /// The job.
        job_id: String,
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
    /// Submit many jobs from a JSON-lines file, wait for them, summarise.
    Batch {
        /// One job per line: {"command": …, "mode": …, "params": {…}, "target"?, "idempotency_key"?}.
        file: PathBuf,
    },
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
    /// A param, NAME=VALUE (repeatable).
    #[arg(long = "param", value_name = "NAME=VALUE")]
    params: Vec<String>,
    /// The target (default: the config's default).
    #[arg(long)]
    target: Option<String>,
    /// Idempotency key: the same key never runs twice.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Wait for the outcome (the daemon's jobs).
    #[arg(long)]
    wait: bool,
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
            return EXIT_ERROR;
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("govsql: {e:#}");
            EXIT_ERROR
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<i32> {
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
            rollback,
        } => migrate_cmd(&config_path, target.as_deref(), demo, rollback).await,
        Cmd::Switch { state } => switch_cmd(&config_path, &state),
        Cmd::Daemon => {
            let config = Config::load(&config_path)?;
            crate::daemon::run(config).await?;
            Ok(0)
        }
        Cmd::SelfTest => self_test(&config_path).await,
        Cmd::Status { job_id, json } => status_cmd(&config_path, &job_id, json).await,
        Cmd::Jobs { limit, json } => jobs_cmd(&config_path, limit, json).await,
        Cmd::Approve { job_id } => {
            simple_job_op(
                &config_path,
                Request::Approve {
                    v: PROTOCOL_VERSION,
                    job_id,
                },
            )
            .await
        }
        Cmd::Cancel { job_id } => {
            simple_job_op(
                &config_path,
                Request::Cancel {
                    v: PROTOCOL_VERSION,
                    job_id,
                },
            )
            .await
        }
        Cmd::Health { json } => health_cmd(&config_path, json).await,
        Cmd::Batch { file } => {
            crate::batch::run(&client::socket_from_config(&config_path), &file).await
        }
    }
}

fn load(config_path: &Path) -> anyhow::Result<(Config, Catalog)> {
    let config = Config::load(config_path)?;
    let catalog = Catalog::load(&config.daemon.catalog)?;
    Ok((config, catalog))
}

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

async fn job(
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

fn reversal(config_path: &Path, command: &str) -> anyhow::Result<i32> {
    let (_, catalog) = load(config_path)?;
    let cmd = match catalog.get(command) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("govsql: {e}");
            return Ok(EXIT_USAGE);
        }
    };
    println!("command:       {}", cmd.name);
    println!(
        "reversible:    {}",
        if cmd.reversible { "yes" } else { "no" }
    );
    println!(
        "inverse:       {}",
        cmd.inverse.as_deref().unwrap_or("(none)")
    );
    println!(
        "rollback note: {}",
        if cmd.rollback_note.is_empty() {
            "(none)"
        } else {
            &cmd.rollback_note
        }
    );
    println!("(nothing was run)");
    Ok(0)
}

async fn catalog_cmd(config_path: &Path, action: CatalogAction) -> anyhow::Result<i32> {
    let (config, catalog) = load(config_path)?;
    match action {
        CatalogAction::List => {
            println!(
                "{:<34} {:<13} {:<8} {:<10} {:<8} GATES",
                "COMMAND", "CATEGORY", "MUTATES", "REVERSIBLE", "APPROVAL"
            );
            for c in catalog.commands() {
                println!(
                    "{:<34} {:<13} {:<8} {:<10} {:<8} {}",
                    c.name,
                    c.category,
                    yes_no(c.mutating),
                    yes_no(c.reversible),
                    yes_no(c.requires_approval),
                    c.apply_gates().join(",")
                );
            }
            println!(
                "{} commands, digest {}",
                catalog.commands().len(),
                catalog.digest()
            );
            Ok(0)
        }
        CatalogAction::SeedSql => {
            print!("{}", catalog.seed_sql());
            Ok(0)
        }
        CatalogAction::Check { target } => {
            let (_, t) = config.target(target.as_deref())?;
            let exec = executor_for(t, false)?;
            catalog_check(exec.as_ref(), &catalog).await
        }
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// `catalog check`: every target resolves in pg_proc and is executable by
/// the runtime role; the database holds the same catalog digest.
pub async fn catalog_check(exec: &dyn Executor, catalog: &Catalog) -> anyhow::Result<i32> {
    let mut s = Script::new("govsql:catalog-check", 30_000);
    s.section();
    let targets: Vec<String> = catalog
        .all_targets()
        .iter()
        .map(|t| psql::quote_plain(t))
        .collect();
    s.sql(&format!(
        "SELECT t, coalesce((SELECT bool_or(has_function_privilege(p.oid, 'EXECUTE')) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public' AND p.proname = t), false) FROM unnest(ARRAY[{}]::text[]) AS t",
        targets.join(", ")
    ));
    s.section();
    s.sql("SELECT public.fn_dot_iu_catalog_digest()");
    let script = s.finish();
    let req = ScriptRequest {
        text: script.text.clone(),
        role: DbRole::Runtime,
        tag: "govsql:catalog-check".into(),
    };
    let out = run_with_deadline(exec, req, std::time::Duration::from_secs(60)).await?;
    if out.exit != Exit::Code(0) {
        anyhow::bail!(
            "catalog check could not run (SQLSTATE {}); has `govsql migrate` been run on this target?",
            psql::sqlstate(&out.stderr).unwrap_or_else(|| "none".into())
        );
    }
    let secs = Sections::split(&out.stdout, &script.nonce)?;
    let rows = control_rows(0, secs.get(0).unwrap_or_default(), 2)?;
    let digest = control_rows(1, secs.get(1).unwrap_or_default(), 1)?;
    let db_digest = digest.first().map(|r| r[0].as_str()).unwrap_or("");
    let missing: Vec<&str> = rows
        .iter()
        .filter(|r| r[1] != "t")
        .map(|r| r[0].as_str())
        .collect();
    println!(
        "targets: {} of {} resolve and are executable",
        rows.len() - missing.len(),
        rows.len()
    );
    for m in &missing {
        println!("  missing or not executable by the runtime role: public.{m}");
    }
    let same = db_digest == catalog.digest();
    println!(
        "catalog digest: {}",
        if same {
            "matches the database"
        } else {
            "DIFFERS from the database (run `govsql migrate`)"
        }
    );
    Ok(if missing.is_empty() && same { 0 } else { 4 })
}

async fn migrate_cmd(
    config_path: &Path,
    target: Option<&str>,
    demo: bool,
    rollback: bool,
) -> anyhow::Result<i32> {
    let (config, catalog) = load(config_path)?;
    let (name, t) = config.target(target)?;
    let exec = executor_for(t, true)?;
    if rollback {
        crate::migrate::rollback(exec.as_ref()).await?;
        println!("rolled back every govsql object on target {name}");
        return Ok(0);
    }
    let report = crate::migrate::migrate(exec.as_ref(), &catalog, &t.db_user, demo).await?;
    println!(
        "migrated target {name}: applied [{}], already present [{}]; catalog of {} commands seeded ({})",
        report.applied.join(", "),
        report.present.join(", "),
        catalog.commands().len(),
        catalog.digest()
    );
    if !report.changed.is_empty() {
        eprintln!(
            "govsql: warning: migrations applied from a different file version: {}",
            report.changed.join(", ")
        );
    }
    Ok(0)
}

fn switch_cmd(config_path: &Path, state: &str) -> anyhow::Result<i32> {
    let config = Config::load(config_path)?;
    let switch = ApplySwitch::new(&config.daemon.state_dir);
    match state {
        "on" => switch.set(true)?,
        "off" => switch.set(false)?,
        _ => {}
    }
    println!(
        "apply switch: {}",
        if switch.is_on() { "on" } else { "off" }
    );
    Ok(0)
}

/// Logs to stderr (journald keeps it); `GOVSQL_LOG` sets the filter.
/// The daemon logs every job at `info`; one-shot commands only warnings.
pub fn init_tracing(cli: &Cli) {
    use std::io::IsTerminal;
    let default = if matches!(cli.command, Cmd::Daemon) {
        "info"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("GOVSQL_LOG")
        .unwrap_or_else(|_| default.into());
    // Plain text (no colour codes) when journald or a file takes stderr.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Exit code of a daemon reply that is an error.
fn reply_error_code(reply: &Reply) -> i32 {
    match reply.error.as_ref().map(|e| e.kind.as_str()) {
        Some("bad_request") | Some("version") | Some("too_long") => EXIT_USAGE,
        Some("denied") | Some("expired") => 3,
        _ => EXIT_ERROR,
    }
}

fn print_reply_error(reply: &Reply) -> i32 {
    if let Some(e) = &reply.error {
        eprintln!("govsql: {} ({})", e.message, e.kind);
    }
    reply_error_code(reply)
}

async fn call(config_path: &Path, req: &Request) -> anyhow::Result<Reply> {
    let socket = client::socket_from_config(config_path);
    let mut c = Client::connect(&socket).await?;
    Ok(c.call(req).await?)
}

async fn submit_to_daemon(
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
fn print_job(job: &JobView, json: bool) -> i32 {
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
        println!(
            "{}  {} {}  (job {})",
            job.state,
            job.mode.as_str(),
            job.command,
            job.job_id
        );
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

async fn status_cmd(config_path: &Path, job_id: &str, json: bool) -> anyhow::Result<i32> {
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

async fn simple_job_op(config_path: &Path, req: Request) -> anyhow::Result<i32> {
    let reply = call(config_path, &req).await?;
    match reply.job.as_ref().filter(|_| reply.ok) {
        Some(job) => {
            println!(
                "{}  {} {}  (job {})",
                job.state,
                job.mode.as_str(),
                job.command,
                job.job_id
            );
            Ok(0)
        }
        None => Ok(print_reply_error(&reply)),
    }
}

async fn jobs_cmd(config_path: &Path, limit: u32, json: bool) -> anyhow::Result<i32> {
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

async fn health_cmd(config_path: &Path, json: bool) -> anyhow::Result<i32> {
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

async fn self_test(config_path: &Path) -> anyhow::Result<i32> {
    let mut failed = 0;
    let mut check = |ok: bool, what: &str, detail: String| {
        println!("{} {what}: {detail}", if ok { "ok  " } else { "FAIL" });
        if !ok {
            failed += 1;
        }
    };
    let config = match Config::load(config_path) {
        Ok(c) => {
            check(true, "config", config_path.display().to_string());
            c
        }
        Err(e) => {
            check(false, "config", e.to_string());
            return Ok(4);
        }
    };
    let catalog = match Catalog::load(&config.daemon.catalog) {
        Ok(c) => {
            check(
                true,
                "catalog",
                format!("{} commands, {}", c.commands().len(), c.digest()),
            );
            c
        }
        Err(e) => {
            check(false, "catalog", e.to_string());
            return Ok(4);
        }
    };
    let probe = config.daemon.state_dir.join(".self-test");
    let writable = std::fs::create_dir_all(&config.daemon.state_dir)
        .and_then(|_| std::fs::write(&probe, b"ok"))
        .and_then(|_| std::fs::remove_file(&probe));
    check(
        writable.is_ok(),
        "state_dir",
        match &writable {
            Ok(()) => format!("{} is writable", config.daemon.state_dir.display()),
            Err(e) => format!("{}: {e}", config.daemon.state_dir.display()),
        },
    );
    let switch = ApplySwitch::new(&config.daemon.state_dir).is_on();
    check(
        true,
        "apply switch",
        if switch {
            "on".into()
        } else {
            "off (applies are refused)".into()
        },
    );
    for (name, t) in &config.targets {
        let exec = match executor_for(t, false) {
            Ok(e) => e,
            Err(e) => {
                check(false, &format!("target {name}"), e.to_string());
                continue;
            }
        };
        match exec.ready().await {
            Ok(()) => check(
                true,
                &format!("target {name} reachable"),
                exec.host_key_fingerprint()
                    .map(|f| format!("{} host key {f}", exec.kind()))
                    .unwrap_or_else(|| exec.kind().to_string()),
            ),
            Err(e) => {
                check(false, &format!("target {name} reachable"), e.to_string());
                continue;
            }
        }
        match catalog_check(exec.as_ref(), &catalog).await {
            Ok(0) => check(
                true,
                &format!("target {name} catalog"),
                "targets resolve, digest matches".into(),
            ),
            Ok(_) => check(
                false,
                &format!("target {name} catalog"),
                "see the lines above".into(),
            ),
            Err(e) => check(false, &format!("target {name} catalog"), format!("{e:#}")),
        }
    }
    let socket = &config.daemon.socket;
    match Client::connect(socket).await {
        Ok(mut c) => match c
            .call(&Request::Health {
                v: PROTOCOL_VERSION,
            })
            .await
        {
            Ok(r) if r.ok => check(
                r.health.as_ref().is_some_and(|h| h.workers_alive),
                "daemon",
                format!("answers on {}", socket.display()),
            ),
            Ok(r) => check(false, "daemon", format!("{:?}", r.error)),
            Err(e) => check(false, "daemon", e.to_string()),
        },
        Err(_) => println!(
            "--   daemon: not running at {} (fine for --direct use)",
            socket.display()
        ),
    }
    Ok(if failed == 0 { 0 } else { 4 })
}

//! Administration that talks to a target or the local state directly:
//! reversal, catalog list / seed-sql / check, migrate, the apply switch,
//! config check, self-test.

use super::*;

pub(super) fn reversal(config_path: &Path, command: &str) -> anyhow::Result<ExitCode> {
    let (_, catalog) = load(config_path)?;
    let cmd = match catalog.get(command) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("govsql: {e}");
            return Ok(ExitCode::Refused);
        }
    };
    out!("command:       {}", cmd.name);
    out!(
        "reversible:    {}",
        if cmd.reversible { "yes" } else { "no" }
    );
    out!(
        "inverse:       {}",
        cmd.inverse.as_deref().unwrap_or("(none)")
    );
    out!(
        "rollback note: {}",
        if cmd.rollback_note.is_empty() {
            "(none)"
        } else {
            &cmd.rollback_note
        }
    );
    out!("(nothing was run)");
    Ok(ExitCode::Ok)
}

/// `govsql config check`: the config and its catalog, offline.
pub(super) fn config_cmd(config_path: &Path) -> anyhow::Result<ExitCode> {
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("govsql: {e}");
            return Ok(ExitCode::Error);
        }
    };
    out!("config {}: valid", config_path.display());
    out!("  socket    {}", config.daemon.socket.display());
    out!("  state_dir {}", config.daemon.state_dir.display());
    for (name, t) in &config.targets {
        let place = match t.transport {
            crate::config::TransportKind::Ssh => format!(
                "ssh {}@{}:{}",
                t.ssh_user.as_deref().unwrap_or(""),
                t.ssh_host.as_deref().unwrap_or(""),
                t.ssh_port
            ),
            crate::config::TransportKind::Local => "local".to_string(),
        };
        out!(
            "  target {name}: {place}, database {} as {}, {} channel(s), job timeout {} s",
            t.db_name,
            t.db_user,
            t.max_channels,
            t.job_timeout_s
        );
    }
    match Catalog::load(&config.daemon.catalog) {
        Ok(c) => {
            out!(
                "catalog {}: valid, {} commands, digest {}",
                config.daemon.catalog.display(),
                c.commands().len(),
                c.digest()
            );
            Ok(ExitCode::Ok)
        }
        Err(e) => {
            eprintln!("govsql: {e}");
            Ok(ExitCode::Error)
        }
    }
}

pub(super) async fn catalog_cmd(
    config_path: &Path,
    action: CatalogAction,
) -> anyhow::Result<ExitCode> {
    let (config, catalog) = load(config_path)?;
    match action {
        CatalogAction::List => {
            out!(
                "{:<34} {:<13} {:<8} {:<10} {:<8} GATES",
                "COMMAND",
                "CATEGORY",
                "MUTATES",
                "REVERSIBLE",
                "APPROVAL"
            );
            for c in catalog.commands() {
                out!(
                    "{:<34} {:<13} {:<8} {:<10} {:<8} {}",
                    c.name,
                    c.category,
                    yes_no(c.mutating),
                    yes_no(c.reversible),
                    yes_no(c.requires_approval),
                    c.apply_gates().join(",")
                );
            }
            out!(
                "{} commands, digest {}",
                catalog.commands().len(),
                catalog.digest()
            );
            Ok(ExitCode::Ok)
        }
        CatalogAction::SeedSql => {
            out_raw!("{}", catalog.seed_sql());
            Ok(ExitCode::Ok)
        }
        CatalogAction::Check { target } => {
            let (_, t) = config.target(target.as_deref())?;
            let exec = for_target(t, DbRole::Runtime)?;
            catalog_check(exec.as_ref(), &catalog).await
        }
    }
}

pub(super) fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// `catalog check`: asks the database, as the runtime role, for its
/// catalog digest and the commands whose targets do not resolve
/// (`fn_dot_iu_status`); the database must hold this catalog.
pub async fn catalog_check(exec: &dyn Executor, catalog: &Catalog) -> anyhow::Result<ExitCode> {
    let status = db_status(exec).await?;
    let unavailable: Vec<&str> = status
        .iter()
        .filter(|(k, _)| k == "unavailable")
        .map(|(_, v)| v.as_str())
        .collect();
    let db_digest = status
        .iter()
        .find(|(k, _)| k == "digest")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    let total = catalog.commands().len();
    out!(
        "commands: {} of {total} have every target function resolved",
        total - unavailable.len()
    );
    for m in &unavailable {
        out!("  unavailable (refused with target_missing): {m}");
    }
    let same = db_digest == catalog.digest();
    out!(
        "catalog digest: {}",
        if same {
            "matches the database"
        } else {
            "DIFFERS from the database (run `govsql migrate`)"
        }
    );
    Ok(if unavailable.is_empty() && same {
        ExitCode::Ok
    } else {
        ExitCode::Failed
    })
}

/// The database's `fn_dot_iu_status()` rows, `(kind, value)`.
pub(super) async fn db_status(exec: &dyn Executor) -> anyhow::Result<Vec<(String, String)>> {
    crate::runtime::read_status(exec)
        .await
        .map_err(anyhow::Error::msg)
}

pub(super) async fn migrate_cmd(
    config_path: &Path,
    target: Option<&str>,
    demo: bool,
    allow_missing: bool,
    rollback: bool,
) -> anyhow::Result<ExitCode> {
    let (config, catalog) = load(config_path)?;
    let (name, t) = config.target(target)?;
    let exec = for_target(t, DbRole::Admin)?;
    if rollback {
        crate::migrate::rollback(exec.as_ref()).await?;
        out!("rolled back every govsql object on target {name}");
        return Ok(ExitCode::Ok);
    }
    let report = crate::migrate::migrate(exec.as_ref(), &catalog, &t.db_user, demo).await?;
    out!(
        "migrated target {name}: applied [{}], already present [{}]; functions (re)applied [{}]; catalog of {} commands seeded ({})",
        report.applied.join(", "),
        report.present.join(", "),
        report.functions.join(", "),
        catalog.commands().len(),
        catalog.digest()
    );
    if !report.role_findings.is_empty() {
        eprintln!(
            "govsql: warning: the runtime role {} {}: a password lets it log in over TCP wherever pg_hba.conf has a password line for all users (add `host all {} 0.0.0.0/0 reject` and `::/0` lines above them, and `ALTER ROLE {} PASSWORD NULL`)",
            t.db_user,
            report.role_findings.join(", "),
            t.db_user,
            t.db_user
        );
    }
    if !report.excess.is_empty() {
        eprintln!(
            "govsql: warning: the runtime role {} can execute more than the dispatcher's entries: {} (revoke EXECUTE on them from it, and from PUBLIC; a stolen daemon key could call them directly)",
            t.db_user,
            report.excess.join(", ")
        );
    }
    if !report.unavailable.is_empty() {
        let list = report.unavailable.join(", ");
        if allow_missing {
            eprintln!(
                "govsql: warning: these commands are unavailable (their target functions do not resolve) and are refused with target_missing: {list}"
            );
        } else {
            eprintln!(
                "govsql: the target functions of these commands do not resolve with the argument types their statements use: {list}; install them and migrate again, or pass --allow-missing to mark them unavailable"
            );
            return Ok(ExitCode::Error);
        }
    }
    Ok(ExitCode::Ok)
}

pub(super) fn switch_cmd(
    config_path: &Path,
    state: &str,
    for_: Option<&str>,
    once: bool,
) -> anyhow::Result<ExitCode> {
    use crate::switch::{Scope, State};
    let config = Config::load(config_path)?;
    let switch = ApplySwitch::new(&config.daemon.state_dir);
    if state != "on" && (for_.is_some() || once) {
        eprintln!("govsql: --for and --once go with `switch on`");
        return Ok(ExitCode::Usage);
    }
    let who = crate::job::effective_user();
    match (state, for_, once) {
        ("on", Some(d), _) => match crate::time::parse_duration(d) {
            Some(how_long) => switch.set_for(how_long, &who)?,
            None => {
                eprintln!("govsql: --for {d:?} is not a duration like 30m, 2h or 1d");
                return Ok(ExitCode::Usage);
            }
        },
        ("on", None, true) => switch.write(State::On(Scope::Once), &who, "on for one apply")?,
        ("on", None, false) => switch.write(State::On(Scope::Open), &who, "on by hand")?,
        ("off", _, _) => switch.write(State::Off, &who, "off by hand")?,
        _ => {}
    }
    out!("apply switch: {}", switch.state().describe());
    Ok(ExitCode::Ok)
}

/// self-test's report: one line per check, and how many failed.
#[derive(Default)]
struct Report {
    failed: usize,
}

impl Report {
    fn check(&mut self, ok: bool, what: &str, detail: impl std::fmt::Display) {
        out!("{} {what}: {detail}", if ok { "ok  " } else { "FAIL" });
        if !ok {
            self.failed += 1;
        }
    }

    fn exit_code(&self) -> ExitCode {
        if self.failed == 0 {
            ExitCode::Ok
        } else {
            ExitCode::Failed
        }
    }
}

pub(super) async fn self_test(config_path: &Path) -> anyhow::Result<ExitCode> {
    let mut report = Report::default();
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            report.check(false, "config", e);
            return Ok(report.exit_code());
        }
    };
    if let Some(user) = service_user::service_user(&config.daemon.state_dir) {
        return service_user::self_test_as(&user, config_path);
    }
    report.check(true, "config", config_path.display());
    let catalog = match Catalog::load(&config.daemon.catalog) {
        Ok(c) => c,
        Err(e) => {
            report.check(false, "catalog", e);
            return Ok(report.exit_code());
        }
    };
    report.check(
        true,
        "catalog",
        format!(
            "{} commands, {}",
            catalog.commands().len(),
            catalog.digest()
        ),
    );
    check_state_dir(&mut report, &config);
    for (name, t) in &config.targets {
        check_target(&mut report, name, t, &catalog).await;
    }
    check_daemon(&mut report, &config.daemon.socket).await;
    Ok(report.exit_code())
}

fn check_state_dir(report: &mut Report, config: &Config) {
    let dir = &config.daemon.state_dir;
    let socket_dir = config.daemon.socket.parent();
    for d in std::iter::once(dir.as_path()).chain(socket_dir) {
        match crate::daemon::fscheck::check_private(d) {
            Ok(()) => report.check(true, "private", format!("{} and its files", d.display())),
            Err(e) => report.check(false, "private", e),
        }
    }
    let probe = dir.join(".self-test");
    let writable = std::fs::create_dir_all(dir)
        .and_then(|_| std::fs::write(&probe, b"ok"))
        .and_then(|_| std::fs::remove_file(&probe));
    match &writable {
        Ok(()) => report.check(true, "state_dir", format!("{} is writable", dir.display())),
        Err(e) => report.check(false, "state_dir", format!("{}: {e}", dir.display())),
    }
    let state = ApplySwitch::new(dir).state();
    report.check(
        !matches!(state, crate::switch::State::Unreadable(_)),
        "apply switch",
        state.describe(),
    );
}

async fn check_target(
    report: &mut Report,
    name: &str,
    t: &crate::config::TargetConfig,
    catalog: &Catalog,
) {
    let exec = match for_target(t, DbRole::Runtime) {
        Ok(e) => e,
        Err(e) => return report.check(false, &format!("target {name}"), e),
    };
    match exec.ready().await {
        Ok(()) => report.check(
            true,
            &format!("target {name} reachable"),
            exec.host_key_fingerprint()
                .map(|f| format!("{} host key {f}", exec.kind()))
                .unwrap_or_else(|| exec.kind().to_string()),
        ),
        Err(e) => return report.check(false, &format!("target {name} reachable"), e),
    }
    let what = format!("target {name} catalog");
    match catalog_check(exec.as_ref(), catalog).await {
        Ok(ExitCode::Ok) => report.check(true, &what, "targets resolve, digest matches"),
        Ok(_) => report.check(false, &what, "see the lines above"),
        Err(e) => return report.check(false, &what, format!("{e:#}")),
    }
    let Ok(status) = db_status(exec.as_ref()).await else {
        return;
    };
    let words = |kind: &str| -> Vec<&str> {
        status
            .iter()
            .filter(|(k, _)| k == kind)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let excess = words("privilege");
    report.check(
        excess.is_empty(),
        &format!("target {name} runtime role"),
        if excess.is_empty() {
            format!("{} may call the dispatcher and nothing else", t.db_user)
        } else {
            format!("{} {}", t.db_user, excess.join("; "))
        },
    );
    let defaults = words("role_setting");
    report.check(
        defaults.is_empty(),
        &format!("target {name} runtime role defaults"),
        if defaults.is_empty() {
            "none beyond the ones migrate sets".to_string()
        } else {
            format!(
                "{} has defaults set: {} (a role can set its own; the dispatcher sets what it relies on, but find out who set these)",
                t.db_user,
                defaults.join(", ")
            )
        },
    );
    let exposure = words("log_exposure");
    report.check(
        exposure.is_empty() || t.allow_server_log_exposure,
        &format!("target {name} server log"),
        if exposure.is_empty() {
            "no statement, parameter or error statement of the runtime role is logged".to_string()
        } else {
            format!(
                "a value could be logged through: {} (applies are refused with log_exposure)",
                exposure.join(", ")
            )
        },
    );
}

async fn check_daemon(report: &mut Report, socket: &Path) {
    let Ok(mut c) = Client::connect(socket).await else {
        out!(
            "--   daemon: not running at {} (fine for --direct use)",
            socket.display()
        );
        return;
    };
    let health = Request::Health {};
    match c.call(&health).await {
        Ok(Reply::Health(h)) => report.check(
            h.workers_alive,
            "daemon",
            format!("answers on {}", socket.display()),
        ),
        Ok(r) => report.check(
            false,
            "daemon",
            r.as_error()
                .map(|e| e.message.clone())
                .unwrap_or_else(|| "an unexpected reply; is the client up to date?".into()),
        ),
        Err(e) => report.check(false, "daemon", e),
    }
}

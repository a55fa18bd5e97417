//! `govsql freeze add|list|remove`: freeze windows on a target, written
//! through the admin identity like `migrate` (the runtime role and the
//! daemon's key can neither add nor lift one). See [`crate::freeze`].

use super::*;
use crate::freeze::{self, NewWindow, Scope, When, Window};

/// `govsql freeze …`
#[derive(Debug, Subcommand)]
pub enum FreezeAction {
    /// Add a window: no apply of what it covers may commit inside it.
    Add {
        /// Its start: `now`, `+DUR` (+30m, +2h) or an RFC 3339 time.
        #[arg(long = "from", value_name = "TIME")]
        from: String,
        /// Its end (exclusive), as --from.
        #[arg(long, value_name = "TIME")]
        until: String,
        /// Cover only this command (default: every command).
        #[arg(long, conflicts_with = "category")]
        command: Option<String>,
        /// Cover only the commands of this category.
        #[arg(long)]
        category: Option<String>,
        /// Why (recorded with the window).
        #[arg(long)]
        reason: String,
        /// The target (default: the config's default).
        #[arg(long)]
        target: Option<String>,
        /// Print the window as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The windows not removed and not over (with --all: every one).
    List {
        /// Removed and past windows too.
        #[arg(long)]
        all: bool,
        /// The target (default: the config's default).
        #[arg(long)]
        target: Option<String>,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Lift a window before its end (recorded with who and why).
    Remove {
        /// The window's id (`freeze list`).
        id: i64,
        /// Why (recorded with the removal).
        #[arg(long)]
        reason: String,
        /// The target (default: the config's default).
        #[arg(long)]
        target: Option<String>,
    },
}

fn show(w: &Window) {
    let scope = match &w.scope {
        Scope::All => "every command".to_string(),
        Scope::Command(c) => format!("command {c}"),
        Scope::Category(k) => format!("category {k}"),
    };
    let state = match (&w.removed_at, w.active) {
        (Some(at), _) => format!(
            "removed {at} by {} ({})",
            w.removed_by.as_deref().unwrap_or("?"),
            printable(w.removed_reason.as_deref().unwrap_or(""))
        ),
        (None, true) => "ACTIVE".to_string(),
        (None, false) => "scheduled or over".to_string(),
    };
    out!(
        "{:>4}  {} .. {}  {scope}  [{state}]  by {}: {}",
        w.id,
        w.starts_at,
        w.ends_at,
        w.created_by,
        printable(&w.reason)
    );
}

/// Runs one `freeze` action against a target as its admin role.
pub(super) async fn freeze_cmd(
    config_path: &Path,
    action: FreezeAction,
) -> anyhow::Result<ExitCode> {
    let (config, _) = load(config_path)?;
    let target = match &action {
        FreezeAction::Add { target, .. }
        | FreezeAction::List { target, .. }
        | FreezeAction::Remove { target, .. } => target.clone(),
    };
    let (name, t) = config.target(target.as_deref())?;
    let exec = for_target(t, DbRole::Admin)?;
    let who = crate::job::effective_user();
    match action {
        FreezeAction::Add {
            from,
            until,
            command,
            category,
            reason,
            json,
            ..
        } => {
            let scope = match (command, category) {
                (Some(c), _) => Scope::Command(c),
                (None, Some(k)) => Scope::Category(k),
                (None, None) => Scope::All,
            };
            // A time that is not one is a usage error (exit 2), like any
            // malformed flag.
            let (from, until) = match (When::parse(&from), When::parse(&until)) {
                (Ok(f), Ok(u)) => (f, u),
                (Err(e), _) | (_, Err(e)) => {
                    eprintln!("govsql: {e}");
                    return Ok(ExitCode::Usage);
                }
            };
            let w = NewWindow {
                from,
                until,
                scope,
                reason,
            };
            let added = freeze::add(exec.as_ref(), &w, &who).await?;
            if json {
                out!("{}", serde_json::to_string(&added)?);
            } else {
                out!("added freeze window {} on target {name}:", added.id);
                show(&added);
            }
        }
        FreezeAction::List { all, json, .. } => {
            let windows = freeze::list(exec.as_ref(), all).await?;
            if json {
                out!("{}", serde_json::to_string(&windows)?);
            } else if windows.is_empty() {
                out!("no freeze window on target {name}");
            } else {
                for w in &windows {
                    show(w);
                }
            }
        }
        FreezeAction::Remove { id, reason, .. } => {
            let w = freeze::remove(exec.as_ref(), id, &who, &reason).await?;
            out!("removed freeze window {} on target {name}:", w.id);
            show(&w);
        }
    }
    Ok(ExitCode::Ok)
}

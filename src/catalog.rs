//! The command catalog: the one source of truth for what govsql may run.
//!
//! `config/catalog.toml` declares each command's category, flags, typed
//! params, statement templates and target functions, plus the
//! `gate_by_function` map from which every command's gates are derived.
//! Loading checks the whole file (every template renders and passes the
//! guard), so a bad catalog is refused at start-up, not at 3 a.m. The
//! catalog's digest is stored in the database at seed time; apply refuses
//! when the two differ (drift).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::guard::{self, StatementKind};
use crate::params::{self, ParamSpec};
use crate::psql::{quote_trusted, text_array};

/// The runtime gate every apply needs, whatever its targets.
pub const RUNTIME_GATE: &str = "iu_core.operator_runtime_enabled";

/// A catalog that cannot be used, or a command it does not know.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The file could not be read.
    #[error("cannot read catalog {path}: {source}")]
    Read {
        /// The catalog file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for the catalog schema.
    #[error("invalid catalog: {0}")]
    Parse(String),
    /// The file parsed but breaks a rule.
    #[error("invalid catalog: command {command}: {message}")]
    Invalid {
        /// The command at fault ("(catalog)" for file-wide rules).
        command: String,
        /// What is wrong.
        message: String,
    },
    /// A command name that is not in the catalog.
    #[error("unknown command {0:?}; `govsql catalog list` shows the commands")]
    UnknownCommand(String),
}

/// The catalog file as written.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    gate_by_function: BTreeMap<String, String>,
    command: Vec<Command>,
}

/// One governed command.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    /// `dot_*` name used on the CLI and in the ledger.
    pub name: String,
    /// health, composer, structure-op, lifecycle…
    pub category: String,
    /// One line for `catalog list`.
    pub description: String,
    /// Whether applying it changes data.
    #[serde(default)]
    pub mutating: bool,
    /// Whether an inverse command undoes it.
    #[serde(default)]
    pub reversible: bool,
    /// The command that undoes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inverse: Option<String>,
    /// How to undo it, for `govsql reversal`.
    #[serde(default)]
    pub rollback_note: String,
    /// Whether a second person must approve it.
    #[serde(default)]
    pub requires_approval: bool,
    /// How many distinct approvers (none the submitter) it needs: 1 by
    /// default, up to 9; only with `requires_approval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approvals_required: Option<u8>,
    /// The `public.fn_*` functions (bare names) its statements may call.
    pub targets: Vec<String>,
    /// The statement templates, run in order.
    pub statements: Vec<String>,
    /// The typed params.
    #[serde(default)]
    pub params: Vec<ParamSpec>,
    /// The `status` words its functions answer on success (required for
    /// mutating commands; `["ok"]` when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expect_status: Vec<String>,
    /// The most rows one apply may change (inserted, updated or deleted,
    /// counted inside the applying transaction); over it the apply rolls
    /// back and fails `row_cap`. Mutating commands only; none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rows: Option<u64>,
    /// The statements compiled for the dispatcher (filled at load).
    #[serde(skip)]
    pub compiled: Vec<String>,
    /// Gates derived from the targets (filled at load).
    #[serde(skip)]
    pub gates: Vec<String>,
    /// SELECT or DO, per statement (filled at load).
    #[serde(skip)]
    pub kinds: Vec<StatementKind>,
}

impl Command {
    /// How many distinct approvers an apply needs (0: none).
    pub fn approvals_needed(&self) -> u8 {
        if self.requires_approval {
            self.approvals_required.unwrap_or(1)
        } else {
            0
        }
    }

    /// The statuses an answer may carry: `expect_status`, or `["ok"]`.
    pub fn expected_statuses(&self) -> Vec<String> {
        if self.expect_status.is_empty() {
            vec!["ok".to_string()]
        } else {
            self.expect_status.clone()
        }
    }

    /// Gates an apply of this command needs: the runtime gate plus the
    /// gate of every target function.
    pub fn apply_gates(&self) -> Vec<String> {
        let mut all: BTreeSet<String> = self.gates.iter().cloned().collect();
        all.insert(RUNTIME_GATE.to_string());
        all.into_iter().collect()
    }
}

/// A loaded, checked catalog.
#[derive(Debug, Clone)]
pub struct Catalog {
    file: CatalogFile,
    by_name: BTreeMap<String, usize>,
    digest: String,
}

impl Catalog {
    /// Reads and checks a catalog file.
    pub fn load(path: &Path) -> Result<Catalog, CatalogError> {
        let text = std::fs::read_to_string(path).map_err(|source| CatalogError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Catalog::from_toml(&text)
    }

    /// Parses and checks catalog TOML.
    pub fn from_toml(text: &str) -> Result<Catalog, CatalogError> {
        let mut file: CatalogFile =
            toml::from_str(text).map_err(|e| CatalogError::Parse(e.message().to_string()))?;
        let digest = {
            let canonical =
                serde_json::to_vec(&file).map_err(|e| CatalogError::Parse(e.to_string()))?;
            format!("sha256:{}", hex::encode(Sha256::digest(&canonical)))
        };
        let mut by_name = BTreeMap::new();
        for (i, cmd) in file.command.iter_mut().enumerate() {
            check_command(cmd, &file.gate_by_function)?;
            if by_name.insert(cmd.name.clone(), i).is_some() {
                return Err(invalid(&cmd.name, "defined twice"));
            }
        }
        for cmd in &file.command {
            if let Some(inv) = &cmd.inverse {
                if !by_name.contains_key(inv) {
                    return Err(invalid(
                        &cmd.name,
                        &format!("inverse {inv} is not in the catalog"),
                    ));
                }
            }
        }
        Ok(Catalog {
            file,
            by_name,
            digest,
        })
    }

    /// The command called `name`.
    pub fn get(&self, name: &str) -> Result<&Command, CatalogError> {
        self.by_name
            .get(name)
            .map(|&i| &self.file.command[i])
            .ok_or_else(|| CatalogError::UnknownCommand(name.to_string()))
    }

    /// Every command, in file order.
    pub fn commands(&self) -> &[Command] {
        &self.file.command
    }

    /// `sha256:<hex>` of the catalog's canonical form.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Every gate any command can need, the runtime gate included.
    pub fn all_gates(&self) -> Vec<String> {
        let mut g: BTreeSet<String> = self
            .file
            .gate_by_function
            .values()
            .filter(|v| !v.is_empty())
            .cloned()
            .collect();
        g.insert(RUNTIME_GATE.to_string());
        g.into_iter().collect()
    }

    /// Every distinct target function.
    pub fn all_targets(&self) -> Vec<String> {
        let set: BTreeSet<&String> = self
            .file
            .command
            .iter()
            .flat_map(|c| c.targets.iter())
            .collect();
        set.into_iter().cloned().collect()
    }

    /// The SQL that seeds `dot_iu_command_catalog`, the catalog digest and
    /// the catalog's gates (shut). Idempotent: a second run changes
    /// nothing; a command no longer in the file is retired, never deleted.
    pub fn seed_sql(&self) -> String {
        let mut s = String::new();
        s.push_str(
            "-- Generated by `govsql catalog seed-sql` from config/catalog.toml; do not edit.\n",
        );
        s.push_str("SET standard_conforming_strings = on;\nBEGIN;\n");
        for gate in self.all_gates() {
            let _ = writeln!(
                s,
                "INSERT INTO public.dot_config (key, value) VALUES ({}, 'false') ON CONFLICT (key) DO NOTHING;",
                quote_trusted(&gate)
            );
        }
        for c in &self.file.command {
            let _ = writeln!(
                s,
                "INSERT INTO public.dot_iu_command_catalog AS c (command_name, category, description, mutating, reversible, inverse_command, rollback_note, requires_approval, target_functions, required_gates, statements, statement_kinds, param_specs, expect_status, max_rows, approvals_required, retired)\n  VALUES ({}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}::jsonb, {}, {}, {}, false)\n  ON CONFLICT (command_name) DO UPDATE SET category = EXCLUDED.category, description = EXCLUDED.description, mutating = EXCLUDED.mutating, reversible = EXCLUDED.reversible, inverse_command = EXCLUDED.inverse_command, rollback_note = EXCLUDED.rollback_note, requires_approval = EXCLUDED.requires_approval, target_functions = EXCLUDED.target_functions, required_gates = EXCLUDED.required_gates, statements = EXCLUDED.statements, statement_kinds = EXCLUDED.statement_kinds, param_specs = EXCLUDED.param_specs, expect_status = EXCLUDED.expect_status, max_rows = EXCLUDED.max_rows, approvals_required = EXCLUDED.approvals_required, retired = false, updated_at = now()\n  WHERE (c.category, c.description, c.mutating, c.reversible, c.inverse_command, c.rollback_note, c.requires_approval, c.target_functions, c.required_gates, c.statements, c.statement_kinds, c.param_specs, c.expect_status, c.max_rows, c.approvals_required, c.retired)\n    IS DISTINCT FROM (EXCLUDED.category, EXCLUDED.description, EXCLUDED.mutating, EXCLUDED.reversible, EXCLUDED.inverse_command, EXCLUDED.rollback_note, EXCLUDED.requires_approval, EXCLUDED.target_functions, EXCLUDED.required_gates, EXCLUDED.statements, EXCLUDED.statement_kinds, EXCLUDED.param_specs, EXCLUDED.expect_status, EXCLUDED.max_rows, EXCLUDED.approvals_required, false);",
                quote_trusted(&c.name),
                quote_trusted(&c.category),
                quote_trusted(&c.description),
                c.mutating,
                c.reversible,
                c.inverse.as_deref().map(quote_trusted).unwrap_or_else(|| "NULL".into()),
                quote_trusted(&c.rollback_note),
                c.requires_approval,
                text_array(&c.targets),
                text_array(&c.apply_gates()),
                text_array(&c.compiled),
                text_array(&c.kinds.iter().map(|k| k.word().to_string()).collect::<Vec<_>>()),
                quote_trusted(&serde_json::to_string(&c.params).unwrap_or_else(|_| "[]".into())),
                text_array(&c.expected_statuses()),
                c.max_rows
                    .map(|n| format!("{n}::bigint"))
                    .unwrap_or_else(|| "NULL::bigint".into()),
                c.approvals_needed().max(1),
            );
        }
        let names: Vec<String> = self
            .file
            .command
            .iter()
            .map(|c| quote_trusted(&c.name))
            .collect();
        let _ = writeln!(
            s,
            "UPDATE public.dot_iu_command_catalog SET retired = true, updated_at = now()\n  WHERE NOT retired AND command_name NOT IN ({});",
            names.join(", ")
        );
        let _ = writeln!(
            s,
            "INSERT INTO public.dot_iu_catalog_state AS s (singleton, digest) VALUES (true, {})\n  ON CONFLICT (singleton) DO UPDATE SET digest = EXCLUDED.digest, seeded_at = now() WHERE s.digest IS DISTINCT FROM EXCLUDED.digest;",
            quote_trusted(&self.digest)
        );
        s.push_str("COMMIT;\n");
        s
    }
}

fn invalid(command: &str, message: &str) -> CatalogError {
    CatalogError::Invalid {
        command: command.to_string(),
        message: message.to_string(),
    }
}

/// expect_status is required for mutating commands and made of status
/// words; no target is a govsql substrate function.
fn check_answers_and_targets(cmd: &Command) -> Result<(), String> {
    if cmd.mutating && cmd.expect_status.is_empty() {
        return Err(
            "a mutating command must list expect_status, the statuses its functions answer on success"
                .into(),
        );
    }
    if let Some(s) = cmd.expect_status.iter().find(|s| {
        s.is_empty() || s.len() > 32 || !s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
    }) {
        return Err(format!(
            "expect_status {s:?} must be 1-32 characters of a-z and _"
        ));
    }
    match cmd.approvals_required {
        Some(_) if !cmd.requires_approval => {
            return Err("approvals_required needs requires_approval = true".into())
        }
        Some(n) if !(1..=9).contains(&n) => return Err("approvals_required must be 1 to 9".into()),
        _ => {}
    }
    if cmd.max_rows.is_some() && !cmd.mutating {
        return Err(
            "max_rows caps the rows an apply changes: only a mutating command may set it".into(),
        );
    }
    if cmd.max_rows.is_some_and(|n| n > i64::MAX as u64) {
        return Err("max_rows must fit a bigint".into());
    }
    if let Some(t) = cmd.targets.iter().find(|t| t.starts_with("fn_dot_iu_")) {
        return Err(format!(
            "target {t} is a govsql substrate function; commands may only call governed functions"
        ));
    }
    Ok(())
}

/// Guards every statement (rendered with sample values), records its
/// kind and its compiled form; returns the param names the statements use.
fn check_statements(cmd: &mut Command) -> Result<BTreeSet<String>, String> {
    let samples: Vec<(String, String)> = cmd
        .params
        .iter()
        .map(|p| (p.name.clone(), p.ty.sample().to_string()))
        .collect();
    let valid = params::validate(&cmd.name, &cmd.params, &samples).map_err(|e| e.to_string())?;
    let mut used = BTreeSet::new();
    cmd.kinds.clear();
    cmd.compiled.clear();
    for tpl in &cmd.statements {
        let names = params::template_placeholders(tpl).map_err(|e| e.to_string())?;
        used.extend(names.iter().cloned());
        let sql = params::render_template(tpl, &cmd.params, &valid).map_err(|e| e.to_string())?;
        let kind = guard::check_statement(&sql, &cmd.targets)
            .map_err(|e| format!("statement refused by the guard: {e}"))?;
        if kind == StatementKind::Do && !names.is_empty() {
            return Err(
                "DO statements take no params (a value could close the DO body's quote)".into(),
            );
        }
        // The guard checked the text with each placeholder as one literal;
        // the database runs it compiled, where a placeholder inside a
        // literal or comment would become other tokens.
        guard::check_placeholders(tpl, &names)
            .map_err(|e| format!("statement refused by the guard: {e}"))?;
        cmd.kinds.push(kind);
        cmd.compiled
            .push(params::compile_template(tpl, &cmd.params).map_err(|e| e.to_string())?);
    }
    Ok(used)
}

fn check_command(
    cmd: &mut Command,
    gate_by_function: &BTreeMap<String, String>,
) -> Result<(), CatalogError> {
    let name = cmd.name.clone();
    let bad = |m: &str| invalid(&name, m);
    let ident = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    if !name.starts_with("dot_") || !ident(&name) {
        return Err(bad(
            "names are dot_ followed by a-z, 0-9 and _ (at most 63 bytes)",
        ));
    }
    let texts = [&cmd.category, &cmd.description, &cmd.rollback_note];
    if texts.iter().any(|t| t.contains('\0')) || cmd.category.is_empty() {
        return Err(bad("category must be set, and no text may hold a NUL byte"));
    }
    if cmd.reversible != cmd.inverse.is_some() {
        return Err(bad(
            "reversible = true needs an inverse, and an inverse needs reversible = true",
        ));
    }
    if cmd.statements.is_empty() || cmd.targets.is_empty() {
        return Err(bad("needs at least one statement and one target"));
    }
    check_answers_and_targets(cmd).map_err(|m| bad(&m))?;
    let mut seen = BTreeSet::new();
    for p in &cmd.params {
        if !ident(&p.name) || !seen.insert(p.name.clone()) {
            return Err(bad(&format!(
                "param {:?} is not a unique a-z0-9_ name",
                p.name
            )));
        }
    }
    let mut gates = BTreeSet::new();
    for t in &cmd.targets {
        if !t.starts_with("fn_") || !ident(t) {
            return Err(bad(&format!(
                "target {t:?} must be a public.fn_* function name"
            )));
        }
        let gate = gate_by_function.get(t).ok_or_else(|| {
            bad(&format!(
                "target {t} is missing from [gate_by_function] (use \"\" for a read-only function)"
            ))
        })?;
        if gate.is_empty() {
            if cmd.mutating {
                return Err(bad(&format!(
                    "mutating command, but target {t} has no gate"
                )));
            }
        } else if !gate
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.')
        {
            return Err(bad(&format!(
                "gate {gate:?} must be made of a-z, 0-9, _ and ."
            )));
        } else {
            gates.insert(gate.clone());
        }
    }
    cmd.gates = gates.into_iter().collect();
    let used = check_statements(cmd).map_err(|m| bad(&m))?;
    if let Some(p) = cmd.params.iter().find(|p| !used.contains(&p.name)) {
        return Err(bad(&format!(
            "param {} is declared but no statement uses it",
            p.name
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINI: &str = r#"
[gate_by_function]
fn_a = ""
fn_b = "g.b"

[[command]]
name = "dot_a"
category = "health"
description = "read"
targets = ["fn_a"]
statements = ["SELECT public.fn_a({{x}})"]
params = [{ name = "x", type = "uuid" }]

[[command]]
name = "dot_b"
category = "composer"
description = "write"
mutating = true
expect_status = ["created"]
targets = ["fn_b"]
statements = ["SELECT public.fn_b()"]
"#;

    #[test]
    fn gates_are_derived_from_targets() {
        let c = Catalog::from_toml(MINI).unwrap();
        assert_eq!(
            c.get("dot_b").unwrap().apply_gates(),
            vec!["g.b".to_string(), RUNTIME_GATE.to_string()]
        );
        assert_eq!(
            c.get("dot_a").unwrap().apply_gates(),
            vec![RUNTIME_GATE.to_string()]
        );
        assert!(c.digest().starts_with("sha256:"));
    }

    #[test]
    fn unknown_command_is_named() {
        let c = Catalog::from_toml(MINI).unwrap();
        assert!(c
            .get("dot_zzz")
            .unwrap_err()
            .to_string()
            .contains("dot_zzz"));
    }

    fn refused(text: &str, needle: &str) {
        let err = Catalog::from_toml(text).unwrap_err().to_string();
        assert!(err.contains(needle), "{err}");
    }

    /// A placeholder inside a literal passed the guard (it rendered as one
    /// literal) but compiled into a LIKE expression the guard forbids.
    #[test]
    fn a_placeholder_must_be_a_whole_token() {
        for inside in [
            "public.fn_a('<{{x}}>')",
            "public.fn_a(1 /* {{x}} */) -- x",
            "public.fn_a(1) -- {{x}}",
            "public.fn_a($d${{x}}$d$)",
        ] {
            refused(
                &MINI.replace("public.fn_a({{x}})", inside),
                "placeholder must be a whole token",
            );
        }
        Catalog::from_toml(&MINI.replace("public.fn_a({{x}})", "public.fn_a( {{x}} )")).unwrap();
    }

    #[test]
    fn bad_catalogs_are_refused_with_a_reason() {
        refused(
            &MINI.replace("targets = [\"fn_b\"]", "targets = [\"fn_c\"]"),
            "missing from [gate_by_function]",
        );
        refused(
            &MINI.replace("fn_b = \"g.b\"", "fn_b = \"\""),
            "has no gate",
        );
        refused(
            &MINI.replace("SELECT public.fn_b()", "DELETE FROM t"),
            "guard",
        );
        refused(
            &MINI.replace("SELECT public.fn_b()", "SELECT public.fn_a()"),
            "not a target",
        );
        refused(
            &MINI.replace("public.fn_a({{x}})", "public.fn_a()"),
            "no statement uses it",
        );
        refused(
            &MINI.replace("public.fn_a({{x}})", "public.fn_a({{y}})"),
            "undeclared",
        );
        refused(
            &MINI.replace("mutating = true", "mutating = true\nreversible = true"),
            "inverse",
        );
        refused(&format!("{MINI}\nbogus = 1\n"), "bogus");
        refused(
            &MINI.replace("expect_status = [\"created\"]\n", ""),
            "must list expect_status",
        );
        refused(
            &MINI.replace("[\"created\"]", "[\"Not OK\"]"),
            "expect_status",
        );
        refused(
            &MINI
                .replace(
                    "fn_b = \"g.b\"",
                    "fn_b = \"g.b\"\nfn_dot_iu_command_log = \"g.b\"",
                )
                .replace(
                    "targets = [\"fn_b\"]",
                    "targets = [\"fn_b\", \"fn_dot_iu_command_log\"]",
                ),
            "substrate function",
        );
        refused(
            &MINI.replace(
                "SELECT public.fn_a({{x}})",
                "DO $$ BEGIN PERFORM public.fn_a({{x}}); END $$",
            ),
            "DO statements take no params",
        );
    }

    #[test]
    fn seed_sql_lists_every_command_and_the_digest() {
        let c = Catalog::from_toml(MINI).unwrap();
        let sql = c.seed_sql();
        assert!(sql.contains("'dot_a'") && sql.contains("'dot_b'"));
        assert!(sql.contains(c.digest()));
        assert!(sql.contains("('g.b', 'false') ON CONFLICT (key) DO NOTHING"));
    }
}

//! The guard: governed SQL only, checked structurally by PostgreSQL's own
//! parser (`pg_query`) before anything is sent anywhere.
//!
//! A rendered statement passes only when it is ONE `SELECT` or `DO` whose
//! every function call is a `public.fn_*` target of its command. The check
//! is an allowlist over the parse tree: any node kind not listed (a table
//! reference, a sub-query, a CTE, DML, a `WHERE`, a locking clause…) is
//! refused. DO bodies are parsed as PL/pgSQL and every embedded expression
//! goes through the same check; dynamic `EXECUTE` is refused.

use serde_json::Value;

/// What kind of governed statement passed the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatementKind {
    /// A `SELECT` of target functions (returns rows).
    Select,
    /// A `DO` block (returns nothing).
    Do,
}

impl StatementKind {
    /// The word stored in the database catalog.
    pub fn word(self) -> &'static str {
        match self {
            StatementKind::Select => "select",
            StatementKind::Do => "do",
        }
    }
}

/// Why a statement is an unsafe plan. Messages name node kinds and
/// function names from the template, never literal values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    /// PostgreSQL's parser rejected it.
    #[error("statement does not parse as SQL")]
    Unparsable,
    /// Zero or several statements in one template.
    #[error("a template must be exactly one statement, found {0}")]
    StatementCount(usize),
    /// A statement kind other than SELECT or DO.
    #[error("only SELECT or DO may run, found {0}")]
    StatementKind(String),
    /// A syntax element outside the allowlist.
    #[error("{0} is not allowed in a governed statement")]
    Forbidden(String),
    /// A function that is not a target of the command.
    #[error(
        "function {0} is not a target of this command (only its public.fn_* targets may be called)"
    )]
    Function(String),
    /// A cast to a type outside the allowlist.
    #[error("cast to type {0} is not allowed")]
    Type(String),
    /// A statement that calls no target at all.
    #[error("a governed statement must call one of the command's target functions")]
    NoCall,
    /// `EXECUTE` of a dynamic string inside a DO body.
    #[error("dynamic EXECUTE in a DO body is not allowed")]
    DynamicExecute,
    /// A PL/pgSQL statement kind outside the allowlist.
    #[error("PL/pgSQL statement {0} is not allowed in a governed DO body")]
    PlpgsqlStatement(String),
}

/// Node kinds a governed SELECT may contain.
const ALLOWED_NODES: &[&str] = &[
    "SelectStmt",
    "ResTarget",
    "FuncCall",
    "AConst",
    "TypeCast",
    "TypeName",
    "String",
    "Integer",
    "Float",
    "Boolean",
    "RangeFunction",
    "Alias",
    "List",
    "NamedArgExpr",
    "ColumnRef",
    "AStar",
];

/// Types a literal may be cast to (the param types and their aliases).
const ALLOWED_TYPES: &[&str] = &[
    "text", "bigint", "int8", "uuid", "boolean", "bool", "jsonb", "integer", "int4",
];

/// SelectStmt fields that must be absent or empty.
const EMPTY_SELECT_FIELDS: &[&str] = &[
    "into_clause",
    "with_clause",
    "where_clause",
    "group_clause",
    "having_clause",
    "window_clause",
    "values_lists",
    "sort_clause",
    "limit_offset",
    "limit_count",
    "locking_clause",
    "distinct_clause",
    "larg",
    "rarg",
];

/// PL/pgSQL statement kinds a DO body may use.
const ALLOWED_PLPGSQL: &[&str] = &[
    "PLpgSQL_stmt_block",
    "PLpgSQL_stmt_perform",
    "PLpgSQL_stmt_if",
    "PLpgSQL_stmt_return",
    "PLpgSQL_stmt_raise",
];

/// Checks one rendered statement against the command's target functions
/// (bare names such as `fn_iu_add_piece`).
pub fn check_statement(sql: &str, targets: &[String]) -> Result<StatementKind, GuardError> {
    let parsed = pg_query::parse(sql, pg_query::ParserOptions::DEFAULT)
        .map_err(|_| GuardError::Unparsable)?;
    let stmts = &parsed.protobuf.stmts;
    if stmts.len() != 1 {
        return Err(GuardError::StatementCount(stmts.len()));
    }
    let tree = serde_json::to_value(&parsed.protobuf).map_err(|_| GuardError::Unparsable)?;
    let stmt = &tree["stmts"][0]["stmt"];
    let (kind, _) = single_entry(&stmt["node"]).ok_or(GuardError::Unparsable)?;
    match kind {
        "SelectStmt" => {
            let calls = check_select_tree(stmt, targets)?;
            if calls == 0 {
                return Err(GuardError::NoCall);
            }
            Ok(StatementKind::Select)
        }
        "DoStmt" => {
            check_do(&stmt["node"], targets)?;
            Ok(StatementKind::Do)
        }
        other => Err(GuardError::StatementKind(other.to_string())),
    }
}

/// The (key, value) of a one-entry JSON object: how prost serializes a
/// oneof such as `Node.node`.
fn single_entry(v: &Value) -> Option<(&str, &Value)> {
    let obj = v.as_object()?;
    if obj.len() != 1 {
        return None;
    }
    obj.iter().next().map(|(k, v)| (k.as_str(), v))
}

/// Walks a SELECT parse tree; returns how many target calls it makes.
fn check_select_tree(v: &Value, targets: &[String]) -> Result<usize, GuardError> {
    let mut calls = 0;
    walk(v, targets, &mut calls)?;
    Ok(calls)
}

fn walk(v: &Value, targets: &[String], calls: &mut usize) -> Result<(), GuardError> {
    match v {
        Value::Array(items) => items.iter().try_for_each(|i| walk(i, targets, calls)),
        Value::Object(obj) => {
            for (key, child) in obj {
                if key == "node" {
                    if let Some((kind, body)) = single_entry(child) {
                        check_node(kind, body, targets, calls)?;
                    }
                }
                walk(child, targets, calls)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn check_node(
    kind: &str,
    body: &Value,
    targets: &[String],
    calls: &mut usize,
) -> Result<(), GuardError> {
    if !ALLOWED_NODES.contains(&kind) {
        return Err(GuardError::Forbidden(kind.to_string()));
    }
    match kind {
        "SelectStmt" => {
            for field in EMPTY_SELECT_FIELDS {
                if !is_empty(&body[*field]) {
                    return Err(GuardError::Forbidden(format!("SELECT with {field}")));
                }
            }
            if body["op"].as_str().is_some_and(|op| op != "SetopNone")
                || body["op"].as_i64().is_some_and(|op| op > 1)
            {
                return Err(GuardError::Forbidden("a set operation".into()));
            }
        }
        "FuncCall" => {
            if !is_empty(&body["over"])
                || body["agg_star"] == Value::Bool(true)
                || body["agg_distinct"] == Value::Bool(true)
            {
                return Err(GuardError::Forbidden("an aggregate or window call".into()));
            }
            let name = dotted_name(&body["funcname"]);
            let allowed = name
                .strip_prefix("public.")
                .is_some_and(|f| f.starts_with("fn_") && targets.iter().any(|t| t == f));
            if !allowed {
                return Err(GuardError::Function(name));
            }
            *calls += 1;
        }
        "ColumnRef" => {
            // Only `SELECT * FROM public.fn_x()`: a bare star, no column.
            let fields = body["fields"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            if !matches!(fields, [one] if one["node"].get("AStar").is_some()) {
                return Err(GuardError::Forbidden("a column reference".into()));
            }
        }
        "TypeCast" => {
            let ty = dotted_name(&body["type_name"]["names"]);
            let bare = ty.strip_prefix("pg_catalog.").unwrap_or(&ty);
            let is_array = !is_empty(&body["type_name"]["array_bounds"]);
            if !ALLOWED_TYPES.contains(&bare) || is_array {
                return Err(GuardError::Type(ty));
            }
        }
        _ => {}
    }
    Ok(())
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// Joins a list of String nodes: `public.fn_x`.
fn dotted_name(list: &Value) -> String {
    list.as_array()
        .map(|parts| {
            parts
                .iter()
                .filter_map(|p| p["node"]["String"]["sval"].as_str())
                .collect::<Vec<_>>()
                .join(".")
        })
        .unwrap_or_default()
}

/// A DO block: plpgsql only, and every embedded expression is a governed
/// SELECT.
fn check_do(stmt: &Value, targets: &[String]) -> Result<(), GuardError> {
    let args = stmt["DoStmt"]["args"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for arg in &args {
        let def = &arg["node"]["DefElem"];
        if def["defname"] == "language" {
            let lang = def["arg"]["node"]["String"]["sval"].as_str().unwrap_or("");
            if !lang.eq_ignore_ascii_case("plpgsql") {
                return Err(GuardError::Forbidden(format!("DO in language {lang}")));
            }
        }
    }
    let body = args
        .iter()
        .find(|a| a["node"]["DefElem"]["defname"] == "as")
        .and_then(|a| a["node"]["DefElem"]["arg"]["node"]["String"]["sval"].as_str())
        .ok_or(GuardError::Unparsable)?;
    // parse_plpgsql wants a function definition; wrap the body in one.
    let tag = unique_tag(body);
    let wrapped = format!(
        "CREATE FUNCTION govsql_guard_do() RETURNS void LANGUAGE plpgsql AS ${tag}${body}${tag}$"
    );
    let tree = pg_query::parse_plpgsql(&wrapped).map_err(|_| GuardError::Unparsable)?;
    let mut calls = 0;
    walk_plpgsql(&tree, targets, &mut calls)?;
    if calls == 0 {
        return Err(GuardError::NoCall);
    }
    Ok(())
}

fn unique_tag(body: &str) -> String {
    let mut tag = String::from("govsqlguard");
    while body.contains(&tag) {
        tag.push('x');
    }
    tag
}

fn walk_plpgsql(v: &Value, targets: &[String], calls: &mut usize) -> Result<(), GuardError> {
    match v {
        Value::Array(items) => items
            .iter()
            .try_for_each(|i| walk_plpgsql(i, targets, calls)),
        Value::Object(obj) => {
            for (key, child) in obj {
                if key.starts_with("PLpgSQL_stmt_") && !ALLOWED_PLPGSQL.contains(&key.as_str()) {
                    return Err(if key.contains("dyn") {
                        GuardError::DynamicExecute
                    } else {
                        GuardError::PlpgsqlStatement(
                            key.trim_start_matches("PLpgSQL_stmt_").to_string(),
                        )
                    });
                }
                if key == "PLpgSQL_expr" {
                    let query = child["query"].as_str().ok_or(GuardError::Unparsable)?;
                    *calls += check_embedded(query, targets)?;
                    continue;
                }
                walk_plpgsql(child, targets, calls)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// An expression or query inside a DO body: PERFORM and SQL arrive as
/// `SELECT …`, bare expressions (IF conditions, RAISE args) are wrapped.
fn check_embedded(query: &str, targets: &[String]) -> Result<usize, GuardError> {
    let parsed = pg_query::parse(query, pg_query::ParserOptions::DEFAULT)
        .or_else(|_| pg_query::parse(&format!("SELECT {query}"), pg_query::ParserOptions::DEFAULT));
    let parsed = parsed.map_err(|_| GuardError::Unparsable)?;
    if parsed.protobuf.stmts.len() != 1 {
        return Err(GuardError::StatementCount(parsed.protobuf.stmts.len()));
    }
    let tree = serde_json::to_value(&parsed.protobuf).map_err(|_| GuardError::Unparsable)?;
    let stmt = &tree["stmts"][0]["stmt"];
    match single_entry(&stmt["node"]) {
        Some(("SelectStmt", _)) => check_select_tree(stmt, targets),
        Some((other, _)) => Err(GuardError::StatementKind(other.to_string())),
        None => Err(GuardError::Unparsable),
    }
}

/// Checks that every `{{name}}` of a template stands as a whole token of
/// its own: never inside a string literal, a quoted identifier or a
/// comment, where it would render as part of one token but compile into
/// several (`'<{{x}}>'` compiles to `'<($1->>'x')::text>'`).
pub fn check_placeholders(template: &str, names: &[String]) -> Result<(), GuardError> {
    const SENTINEL: &str = "$govsqlph$0$govsqlph$";
    let mut text = template.to_string();
    for n in names {
        text = text.replace(&format!("{{{{{n}}}}}"), SENTINEL);
    }
    let tokens = pg_query::scan_tokens(&text).map_err(|_| GuardError::Unparsable)?;
    let mut from = 0;
    while let Some(at) = text[from..].find(SENTINEL) {
        let (start, end) = (from + at, from + at + SENTINEL.len());
        let whole = tokens
            .iter()
            .any(|t| t.start as usize == start && t.end as usize == end);
        if !whole {
            return Err(GuardError::Forbidden(
                "a placeholder inside a literal, quoted identifier or comment (a placeholder must be a whole token)".into(),
            ));
        }
        from = end;
    }
    Ok(())
}

//! Typed command params: validation against the catalog, the md5
//! `params_digest`, and rendering into SQL as dollar-quoted literals.
//!
//! A param value is the most dangerous thing govsql handles: it came from a
//! user and travels through a remote shell, psql's lexer and PostgreSQL's
//! parser. It never goes on a command line; in the script it is a
//! dollar-quoted literal whose random tag does not occur in the value, cast
//! to the declared type. NUL bytes are refused (psql would cut the line).
//! Error messages name the param, never its value.

use std::collections::BTreeMap;
use std::fmt;

use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

/// Upper bound for any single value, whatever the catalog says.
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;

/// The declared type of a param.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    /// text, with an optional max length in bytes.
    Text,
    /// a signed 64-bit integer.
    Bigint,
    /// a UUID in its canonical 8-4-4-4-12 hex form.
    Uuid,
    /// `true` or `false`.
    Boolean,
    /// a JSON document.
    Jsonb,
}

impl ParamType {
    /// The SQL type name the literal is cast to.
    pub fn sql_type(self) -> &'static str {
        match self {
            ParamType::Text => "text",
            ParamType::Bigint => "bigint",
            ParamType::Uuid => "uuid",
            ParamType::Boolean => "boolean",
            ParamType::Jsonb => "jsonb",
        }
    }

    /// A valid value of this type (used to guard-check templates).
    pub fn sample(self) -> &'static str {
        match self {
            ParamType::Text => "sample",
            ParamType::Bigint => "1",
            ParamType::Uuid => "00000000-0000-0000-0000-000000000000",
            ParamType::Boolean => "true",
            ParamType::Jsonb => "{}",
        }
    }
}

/// One declared param of a catalog command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    /// The param's name, as used in `--param NAME=VALUE` and `{{NAME}}`.
    pub name: String,
    /// The declared type.
    #[serde(rename = "type")]
    pub ty: ParamType,
    /// Whether the param must be given.
    #[serde(default = "yes")]
    pub required: bool,
    /// Max length in bytes (text and jsonb).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_len: Option<usize>,
}

fn yes() -> bool {
    true
}

/// Why params were refused. Names the param, never the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    /// A param the command does not declare.
    #[error("unknown param {name:?} for {command}; it takes: {declared}")]
    Unknown {
        /// The command.
        command: String,
        /// The offending name.
        name: String,
        /// The declared names.
        declared: String,
    },
    /// A required param is absent.
    #[error("missing required param {name:?} ({ty}); pass --param {name}=…")]
    Missing {
        /// The param.
        name: String,
        /// Its type.
        ty: &'static str,
    },
    /// A param given twice.
    #[error("param {name:?} given more than once")]
    Duplicate {
        /// The param.
        name: String,
    },
    /// The value does not parse as the declared type.
    #[error("param {name:?} is not a valid {ty}{hint}")]
    WrongType {
        /// The param.
        name: String,
        /// The declared type.
        ty: &'static str,
        /// What a valid value looks like.
        hint: &'static str,
    },
    /// The value is longer than allowed.
    #[error("param {name:?} is {len} bytes, over its limit of {max}")]
    TooLong {
        /// The param.
        name: String,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The value holds a NUL byte.
    #[error("param {name:?} contains a NUL byte, which is never accepted")]
    NulByte {
        /// The param.
        name: String,
    },
    /// A param name that is not a plain identifier.
    #[error("param name must be NAME=VALUE with NAME made of a-z, 0-9 and _")]
    BadName,
}

/// Params that passed validation: the raw values, keyed by name.
///
/// `Debug` shows names only, so a value cannot leak into a log line through
/// `{:?}`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ValidParams {
    values: BTreeMap<String, (ParamType, String)>,
}

impl fmt::Debug for ValidParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.values.keys()).finish()
    }
}

impl ValidParams {
    /// The raw value of a param (for rendering only).
    pub fn get(&self, name: &str) -> Option<(ParamType, &str)> {
        self.values.get(name).map(|(t, v)| (*t, v.as_str()))
    }
}

/// Checks `given` against the command's declared params.
pub fn validate(
    command: &str,
    specs: &[ParamSpec],
    given: &[(String, String)],
) -> Result<ValidParams, ParamError> {
    let mut values = BTreeMap::new();
    for (name, value) in given {
        let spec = specs
            .iter()
            .find(|s| &s.name == name)
            .ok_or_else(|| ParamError::Unknown {
                command: command.to_string(),
                name: name.clone(),
                declared: if specs.is_empty() {
                    "no params".to_string()
                } else {
                    specs
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            })?;
        check_value(spec, value)?;
        if values
            .insert(name.clone(), (spec.ty, value.clone()))
            .is_some()
        {
            return Err(ParamError::Duplicate { name: name.clone() });
        }
    }
    if let Some(spec) = specs
        .iter()
        .find(|s| s.required && !values.contains_key(&s.name))
    {
        return Err(ParamError::Missing {
            name: spec.name.clone(),
            ty: spec.ty.sql_type(),
        });
    }
    Ok(ValidParams { values })
}

fn check_value(spec: &ParamSpec, value: &str) -> Result<(), ParamError> {
    let name = || spec.name.clone();
    if value.as_bytes().contains(&0) {
        return Err(ParamError::NulByte { name: name() });
    }
    let max = spec.max_len.unwrap_or(MAX_VALUE_BYTES).min(MAX_VALUE_BYTES);
    if value.len() > max {
        return Err(ParamError::TooLong {
            name: name(),
            len: value.len(),
            max,
        });
    }
    let wrong = |hint| ParamError::WrongType {
        name: name(),
        ty: spec.ty.sql_type(),
        hint,
    };
    match spec.ty {
        ParamType::Text => Ok(()),
        ParamType::Bigint => {
            let digits = value.strip_prefix('-').unwrap_or(value);
            if digits.is_empty()
                || !digits.bytes().all(|b| b.is_ascii_digit())
                || value.parse::<i64>().is_err()
            {
                return Err(wrong(
                    " (a whole number between -9223372036854775808 and 9223372036854775807)",
                ));
            }
            Ok(())
        }
        ParamType::Uuid => {
            if is_uuid(value) {
                Ok(())
            } else {
                Err(wrong(" (like 123e4567-e89b-12d3-a456-426614174000)"))
            }
        }
        ParamType::Boolean => match value {
            "true" | "false" => Ok(()),
            _ => Err(wrong(" (true or false)")),
        },
        ParamType::Jsonb => serde_json::from_str::<serde_json::Value>(value)
            .map(|_| ())
            .map_err(|_| wrong(" (a JSON document)")),
    }
}

fn is_uuid(v: &str) -> bool {
    let b = v.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Parses `NAME=VALUE` as given to `--param`. The value may hold anything,
/// `=` included.
pub fn parse_assignment(arg: &str) -> Result<(String, String), ParamError> {
    let (name, value) = arg.split_once('=').ok_or(ParamError::BadName)?;
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(ParamError::BadName);
    }
    Ok((name.to_string(), value.to_string()))
}

/// The keyed params digest of DESIGN.md, as the database computes it
/// (`fn_dot_iu_params_digest`): md5 hex of the per-database secret followed
/// by the compact JSON `[command, [[key, value], …]]`, keys sorted bytewise,
/// values as text, non-ASCII written as itself. The runtime never computes
/// it (it has no secret); admins and tests do, to check a ledger row.
pub fn keyed_digest(secret: &str, command: &str, given: &[(String, String)]) -> String {
    let mut pairs: Vec<(&str, &str)> = given
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    pairs.sort_by(|a, b| {
        a.0.as_bytes()
            .cmp(b.0.as_bytes())
            .then(a.1.as_bytes().cmp(b.1.as_bytes()))
    });
    let doc = serde_json::json!([command, pairs]);
    let mut bytes = secret.as_bytes().to_vec();
    bytes.extend(serde_json::to_vec(&doc).expect("a JSON array of strings always serializes"));
    hex::encode(Md5::digest(&bytes))
}

/// Renders a value as `$tag$value$tag$::type` with a random tag that does
/// not occur in the value.
pub fn render_literal(ty: ParamType, value: &str) -> String {
    crate::grammar::dollar_quoted(value, ty.sql_type())
}

/// Renders a statement template: each `{{name}}` becomes the param's
/// literal, or `NULL::type` for an optional param that was not given.
pub fn render_template(
    template: &str,
    specs: &[ParamSpec],
    params: &ValidParams,
) -> Result<String, TemplateError> {
    substitute(template, specs, |spec| match params.get(&spec.name) {
        Some((ty, value)) => render_literal(ty, value),
        None => format!("NULL::{}", spec.ty.sql_type()),
    })
}

/// Compiles a template for the database's dispatcher: each `{{name}}`
/// becomes `($1->>'name')::type`, a typed read of the one jsonb argument,
/// so values are bound at run time and never spliced into SQL text. An
/// absent optional param reads as NULL, as in [`render_template`].
pub fn compile_template(template: &str, specs: &[ParamSpec]) -> Result<String, TemplateError> {
    // Names are checked a-z0-9_ at catalog load: safe inside quotes.
    substitute(template, specs, |spec| {
        format!("($1->>'{}')::{}", spec.name, spec.ty.sql_type())
    })
}

/// Replaces each `{{name}}` of a template with `with(its spec)`.
fn substitute(
    template: &str,
    specs: &[ParamSpec],
    with: impl Fn(&ParamSpec) -> String,
) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or(TemplateError::Unclosed)?;
        let name = &after[..end];
        let spec = specs
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| TemplateError::Undeclared(name.to_string()))?;
        out.push_str(&with(spec));
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The placeholder names a template references.
pub fn template_placeholders(template: &str) -> Result<Vec<String>, TemplateError> {
    let mut names = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or(TemplateError::Unclosed)?;
        names.push(after[..end].to_string());
        rest = &after[end + 2..];
    }
    Ok(names)
}

/// A statement template that cannot be rendered (a catalog error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// `{{` without `}}`.
    #[error("a {{{{ placeholder is not closed")]
    Unclosed,
    /// `{{name}}` for a param the command does not declare.
    #[error("placeholder {{{{{0}}}}} names an undeclared param")]
    Undeclared(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, ty: ParamType) -> ParamSpec {
        ParamSpec {
            name: name.into(),
            ty,
            required: true,
            max_len: None,
        }
    }

    fn kv(k: &str, v: &str) -> (String, String) {
        (k.to_string(), v.to_string())
    }

    fn digest(command: &str, given: &[(String, String)]) -> String {
        keyed_digest("", command, given)
    }

    #[test]
    fn a_keyed_digest_prefixes_the_secret() {
        let unkeyed = digest("dot_iu_healthcheck", &[]);
        let keyed = keyed_digest("ab", "dot_iu_healthcheck", &[]);
        assert_ne!(keyed, unkeyed);
        // md5("ab" + '["dot_iu_healthcheck",[]]')
        assert_eq!(keyed.len(), 32);
    }

    #[test]
    fn digest_test_vectors_match_python_json_dumps() {
        // python3: hashlib.md5(json.dumps(x, separators=(",", ":"),
        //          ensure_ascii=False).encode()).hexdigest()
        assert_eq!(
            digest("dot_iu_healthcheck", &[]),
            "49da86d02e2dd734daabca2afc78ff92"
        );
        let add_piece = "e1b20c3eeb1129ffaef91d97bbfb9e89";
        let id = kv("collection_id", "11111111-2222-3333-4444-555555555555");
        let body = kv("body", "h\u{e9}llo \"x\"\n");
        assert_eq!(
            digest("dot_iu_add_piece", &[id.clone(), body.clone()]),
            add_piece
        );
        // The order the pairs were given in does not matter.
        assert_eq!(digest("dot_iu_add_piece", &[body, id]), add_piece);
        // Control characters escaped as \u0001, U+2028 and DEL written raw.
        assert_eq!(
            digest(
                "dot_iu_create_collection",
                &[kv("title", "a\u{2028}b/<>&\u{7f}\u{1}")]
            ),
            "41e87f0382a51d9029ddd88dbd7a0c0f"
        );
    }

    #[test]
    fn validation_names_the_param_never_the_value() {
        let specs = [
            spec("collection_id", ParamType::Uuid),
            spec("n", ParamType::Bigint),
        ];
        let canary = "CANARY-7731";
        for given in [
            vec![kv("collection_id", canary), kv("n", "1")],
            vec![
                kv("collection_id", "00000000-0000-0000-0000-000000000000"),
                kv("n", canary),
            ],
            vec![kv("zzz", canary)],
        ] {
            let err = validate("cmd", &specs, &given).unwrap_err().to_string();
            assert!(!err.contains(canary), "{err}");
        }
        let err = validate("cmd", &specs, &[kv("n", "1")]).unwrap_err();
        assert!(matches!(err, ParamError::Missing { ref name, .. } if name == "collection_id"));
    }

    #[test]
    fn nul_and_length_and_types_are_checked() {
        let mut t = spec("body", ParamType::Text);
        t.max_len = Some(4);
        assert!(matches!(
            validate("c", std::slice::from_ref(&t), &[kv("body", "a\0b")]),
            Err(ParamError::NulByte { .. })
        ));
        assert!(matches!(
            validate("c", std::slice::from_ref(&t), &[kv("body", "abcde")]),
            Err(ParamError::TooLong { .. })
        ));
        assert!(validate("c", &[t], &[kv("body", "abcd")]).is_ok());
        let b = spec("b", ParamType::Boolean);
        assert!(validate("c", std::slice::from_ref(&b), &[kv("b", "yes")]).is_err());
        assert!(validate("c", &[b], &[kv("b", "false")]).is_ok());
        let n = spec("n", ParamType::Bigint);
        for bad in ["", "-", "+1", " 1", "1e3", "9223372036854775808"] {
            assert!(
                validate("c", std::slice::from_ref(&n), &[kv("n", bad)]).is_err(),
                "{bad:?}"
            );
        }
        assert!(validate("c", &[n], &[kv("n", "-9223372036854775808")]).is_ok());
        let j = spec("j", ParamType::Jsonb);
        assert!(validate("c", std::slice::from_ref(&j), &[kv("j", "{")]).is_err());
        assert!(validate("c", &[j], &[kv("j", "{\"a\":[1]}")]).is_ok());
        let u = spec("u", ParamType::Uuid);
        assert!(validate(
            "c",
            std::slice::from_ref(&u),
            &[kv("u", "123e4567-e89b-12d3-a456-42661417400")]
        )
        .is_err());
        assert!(validate(
            "c",
            std::slice::from_ref(&u),
            &[kv("u", "123e4567-e89b-12d3-a456-426614174000")]
        )
        .is_ok());
        assert!(matches!(
            validate(
                "c",
                &[u],
                &[
                    kv("u", "123e4567-e89b-12d3-a456-426614174000"),
                    kv("u", "123e4567-e89b-12d3-a456-426614174000")
                ]
            ),
            Err(ParamError::Duplicate { .. })
        ));
    }

    #[test]
    fn literal_tag_never_occurs_in_value_and_round_trips_through_the_parser() {
        for value in [
            "",
            "$$",
            "$q$",
            "a$",
            "'; DROP TABLE x; --",
            "\n\\! touch /tmp/x\n",
            "$qabc",
            "h\u{e9}llo \u{202e}",
        ] {
            let lit = render_literal(ParamType::Text, value);
            let open_end = lit[1..].find('$').unwrap() + 2;
            let tag = &lit[..open_end];
            let body_and_close = &lit[open_end..];
            let close = body_and_close.find(tag).unwrap();
            assert_eq!(&body_and_close[..close], value);
            let parsed =
                pg_query::parse(&format!("SELECT {lit}"), pg_query::ParserOptions::DEFAULT)
                    .unwrap();
            assert_eq!(parsed.protobuf.stmts.len(), 1);
        }
    }

    #[test]
    fn template_renders_placeholders_and_nulls_for_absent_optionals() {
        let mut opt = spec("b", ParamType::Bigint);
        opt.required = false;
        let specs = [spec("a", ParamType::Uuid), opt];
        let p = validate(
            "c",
            &specs,
            &[kv("a", "00000000-0000-0000-0000-000000000000")],
        )
        .unwrap();
        let sql = render_template("SELECT public.fn_x({{a}}, {{b}})", &specs, &p).unwrap();
        assert!(sql.contains("::uuid"));
        assert!(sql.ends_with("NULL::bigint)"));
        assert_eq!(
            render_template("SELECT public.fn_x({{zz}})", &specs, &p),
            Err(TemplateError::Undeclared("zz".into()))
        );
    }

    #[test]
    fn debug_of_valid_params_shows_names_only() {
        let specs = [spec("body", ParamType::Text)];
        let p = validate("c", &specs, &[kv("body", "CANARY-1")]).unwrap();
        let dbg = format!("{p:?}");
        assert!(dbg.contains("body") && !dbg.contains("CANARY"));
    }

    #[test]
    fn assignment_splits_on_first_equals() {
        assert_eq!(parse_assignment("body=a=b").unwrap(), kv("body", "a=b"));
        assert!(parse_assignment("novalue").is_err());
        assert!(parse_assignment("Bad-Name=x").is_err());
    }
}

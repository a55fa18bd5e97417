//! Fleets: targets carry tags (`tags = ["prod", "eu"]`), and a selector
//! (`--targets`) picks some of them: a comma-separated union of target
//! names, `tag:NAME` and `all`, each target once, in the order the
//! targets are given (config order). `govsql targets` lists what a
//! selector picks with each target's health; rollouts over a selection
//! follow DESIGN.md "Fleets and rollouts".

use std::str::FromStr;

/// The longest tag.
const MAX_TAG: usize = 64;

/// Whether a word may be a tag: 1-64 of `a-z A-Z 0-9 _ -`.
pub fn valid_tag(t: &str) -> bool {
    (1..=MAX_TAG).contains(&t.len())
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// One term of a selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    All,
    Name(String),
    Tag(String),
}

/// A parsed `--targets` selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    terms: Vec<Term>,
}

/// A selector that cannot be read or picks nothing it names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// Nothing to select.
    #[error("an empty --targets selector: give target names, tag:NAME or all, comma-separated")]
    Empty,
    /// A term that is neither a name, `tag:NAME` nor `all`.
    #[error("`{0}` in --targets is not a target name, tag:NAME or all (names and tags are 1-64 of a-z A-Z 0-9 _ -)")]
    Malformed(String),
    /// A name no target has.
    #[error("--targets names {name}, which is not a target; the targets are: {known}")]
    UnknownTarget {
        /// The name.
        name: String,
        /// The targets there are.
        known: String,
    },
    /// A tag no target carries.
    #[error("no target carries tag {tag}; the tags in use are: {known}")]
    UnknownTag {
        /// The tag.
        tag: String,
        /// The tags there are.
        known: String,
    },
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Selector, SelectorError> {
        let terms = s
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| match t.strip_prefix("tag:") {
                Some(tag) if valid_tag(tag) => Ok(Term::Tag(tag.to_string())),
                Some(_) => Err(SelectorError::Malformed(t.to_string())),
                None if t == "all" => Ok(Term::All),
                None if valid_tag(t) => Ok(Term::Name(t.to_string())),
                None => Err(SelectorError::Malformed(t.to_string())),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if terms.is_empty() {
            return Err(SelectorError::Empty);
        }
        Ok(Selector { terms })
    }
}

impl Selector {
    /// The targets it picks from `targets` (name, tags), in their order,
    /// each once. A name that is not a target, or a tag that no target
    /// carries, is an error that lists what there is.
    pub fn pick<'a>(
        &self,
        targets: &[(&'a str, &[String])],
    ) -> Result<Vec<&'a str>, SelectorError> {
        let joined = |mut v: Vec<&str>| {
            v.sort_unstable();
            v.dedup();
            if v.is_empty() {
                "(none)".to_string()
            } else {
                v.join(", ")
            }
        };
        for term in &self.terms {
            match term {
                Term::Name(n) if !targets.iter().any(|(name, _)| name == n) => {
                    return Err(SelectorError::UnknownTarget {
                        name: n.clone(),
                        known: joined(targets.iter().map(|(n, _)| *n).collect()),
                    })
                }
                Term::Tag(t) if !targets.iter().any(|(_, tags)| tags.contains(t)) => {
                    return Err(SelectorError::UnknownTag {
                        tag: t.clone(),
                        known: joined(
                            targets
                                .iter()
                                .flat_map(|(_, tags)| tags.iter().map(String::as_str))
                                .collect(),
                        ),
                    })
                }
                _ => {}
            }
        }
        Ok(targets
            .iter()
            .filter(|(name, tags)| {
                self.terms.iter().any(|term| match term {
                    Term::All => true,
                    Term::Name(n) => n == name,
                    Term::Tag(t) => tags.contains(t),
                })
            })
            .map(|(name, _)| *name)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet() -> Vec<(&'static str, Vec<String>)> {
        let tags = |t: &[&str]| t.iter().map(|s| s.to_string()).collect();
        vec![
            ("eu1", tags(&["prod", "eu"])),
            ("us1", tags(&["prod", "us"])),
            ("eu-staging", tags(&["staging", "eu"])),
            ("lab", tags(&[])),
        ]
    }

    fn pick(s: &str) -> Result<Vec<&'static str>, SelectorError> {
        let f = fleet();
        let view: Vec<(&str, &[String])> = f.iter().map(|(n, t)| (*n, t.as_slice())).collect();
        s.parse::<Selector>()?.pick(&view)
    }

    #[test]
    fn a_selector_is_a_union_in_target_order_each_once() {
        assert_eq!(pick("all").unwrap(), ["eu1", "us1", "eu-staging", "lab"]);
        assert_eq!(pick("tag:eu").unwrap(), ["eu1", "eu-staging"]);
        assert_eq!(pick("lab, tag:prod").unwrap(), ["eu1", "us1", "lab"]);
        assert_eq!(pick("eu1,tag:eu,eu1").unwrap(), ["eu1", "eu-staging"]);
        assert_eq!(pick("tag:prod,all").unwrap().len(), 4);
    }

    #[test]
    fn a_bad_selector_says_what_there_is() {
        assert_eq!(pick(""), Err(SelectorError::Empty));
        assert_eq!(pick(" , "), Err(SelectorError::Empty));
        assert!(matches!(pick("tag:"), Err(SelectorError::Malformed(_))));
        assert!(matches!(pick("a b"), Err(SelectorError::Malformed(_))));
        assert!(matches!(pick("x;rm"), Err(SelectorError::Malformed(_))));
        let e = pick("eu2").unwrap_err().to_string();
        assert!(
            e.contains("eu2") && e.contains("eu-staging, eu1, lab, us1"),
            "{e}"
        );
        let e = pick("tag:asia").unwrap_err().to_string();
        assert!(
            e.contains("asia") && e.contains("eu, prod, staging, us"),
            "{e}"
        );
        assert!(valid_tag("prod-eu_1") && !valid_tag("") && !valid_tag(&"a".repeat(65)));
    }
}

//! The arguments of every entry call: one serde struct per entry, sent as
//! ONE jsonb object (`fn_dot_iu_<entry>(p_call jsonb)`,
//! `sql/functions/70_calls.sql`, which refuses a field it does not know).
//! A new argument is a new field here and there, never a new signature.
//! [`statement`] is the only way from a call to its SQL text.

use serde::Serialize;
use serde_json::Value;

use crate::grammar::{entry_call, Entry};
use crate::job::ClientFacts;

/// One entry's arguments, and which entry takes them.
pub(super) trait Call: Serialize {
    /// The entry.
    fn entry(&self) -> Entry;
}

/// plan, apply or verify through the dispatcher.
#[derive(Debug, Serialize)]
pub(super) struct Dispatch<'a> {
    pub mode: &'a str,
    pub command: &'a str,
    /// The job's values: the only field that holds any.
    pub params: &'a Value,
    pub key: &'a str,
    pub actor: &'a str,
    pub catalog_digest: &'a str,
    pub allow_log_exposure: bool,
    pub max_result_bytes: i64,
    pub client: &'a ClientFacts,
}

impl Call for Dispatch<'_> {
    fn entry(&self) -> Entry {
        Entry::Dispatch
    }
}

/// A refusal or a failure the daemon records (settled by key first).
#[derive(Debug, Serialize)]
pub(super) struct Record<'a> {
    /// Which entry: refuse or fail (not sent).
    #[serde(skip)]
    pub entry: Entry,
    pub mode: &'a str,
    pub command: &'a str,
    pub params: &'a Value,
    pub key: &'a str,
    pub actor: &'a str,
    pub class: &'a str,
    pub client: &'a ClientFacts,
}

impl Call for Record<'_> {
    fn entry(&self) -> Entry {
        self.entry
    }
}

/// The plan a job would be pinned to now.
#[derive(Debug, Serialize)]
pub(super) struct Pin<'a> {
    pub command: &'a str,
    pub params: &'a Value,
    pub client: &'a ClientFacts,
}

impl Call for Pin<'_> {
    fn entry(&self) -> Entry {
        Entry::Pin
    }
}

/// `govsql log`: ledger rows for a filter.
#[derive(Debug, Serialize)]
pub(super) struct Ledger<'a> {
    pub filter: &'a Value,
    pub limit: u32,
}

impl Call for Ledger<'_> {
    fn entry(&self) -> Entry {
        Entry::Ledger
    }
}

/// The one statement of a call: its struct as one jsonb literal.
pub(super) fn statement(call: &impl Call) -> String {
    // Plain data (strings, numbers, JSON values): serializing cannot fail.
    let object = serde_json::to_value(call).unwrap_or(Value::Null);
    entry_call(call.entry(), Some(&object))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields each struct sends are exactly the ones its SQL entry
    /// unpacks (70_calls.sql's field lists): a field added on one side
    /// only fails here, not on a database at 3 a.m.
    #[test]
    fn each_call_sends_the_fields_its_entry_knows() {
        let sql = include_str!("../../sql/functions/70_calls.sql");
        let known = |entry: &str| -> Vec<String> {
            let at = sql
                .find(&format!("FUNCTION public.{entry}(p_call jsonb)"))
                .unwrap_or_else(|| panic!("{entry} has no one-object form"));
            let list = &sql[at..];
            let list = &list[list.find("ARRAY[").unwrap() + 6..];
            let list = &list[..list.find(']').unwrap()];
            let mut v: Vec<String> = list
                .split(',')
                .map(|w| w.trim().trim_matches('\'').to_string())
                .collect();
            v.sort();
            v
        };
        let sent = |call: &dyn erased::Fields| {
            let mut v = call.fields();
            v.sort();
            v
        };
        let (params, client) = (serde_json::json!({}), ClientFacts::default());
        let d = Dispatch {
            mode: "apply",
            command: "c",
            params: &params,
            key: "k",
            actor: "a",
            catalog_digest: "d",
            allow_log_exposure: false,
            max_result_bytes: 1,
            client: &client,
        };
        assert_eq!(sent(&d), known("fn_dot_iu_dispatch"));
        for entry in [Entry::Refuse, Entry::Fail] {
            let r = Record {
                entry,
                mode: "apply",
                command: "c",
                params: &params,
                key: "k",
                actor: "a",
                class: "timeout",
                client: &client,
            };
            assert_eq!(sent(&r), known(entry.function()));
        }
        let p = Pin {
            command: "c",
            params: &params,
            client: &client,
        };
        assert_eq!(sent(&p), known("fn_dot_iu_pin"));
        let l = Ledger {
            filter: &params,
            limit: 5,
        };
        assert_eq!(sent(&l), known("fn_dot_iu_ledger"));
        // And the statement is one jsonb literal the grammar accepts.
        let stmt = statement(&d);
        assert!(stmt.starts_with("COPY (SELECT kind, value FROM public.fn_dot_iu_dispatch($q"));
        assert!(stmt.ends_with("$::jsonb)) TO STDOUT"), "{stmt}");
    }

    mod erased {
        /// A call's top-level field names, as sent.
        pub trait Fields {
            fn fields(&self) -> Vec<String>;
        }
        impl<T: super::Call> Fields for T {
            fn fields(&self) -> Vec<String> {
                match serde_json::to_value(self).unwrap() {
                    serde_json::Value::Object(m) => m.keys().cloned().collect(),
                    other => panic!("a call that is not an object: {other}"),
                }
            }
        }
    }
}

//! One grammar, two users: every script the runtime emits — every catalog
//! command in every mode, with hostile and random values, as a per-job
//! script and as a session's input — passes the checker the database
//! host's remote-gate runs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use govsql::params::ParamType;
use govsql::runtime::Mode;
use govsql::transport::{BoxFuture, Executor, ScriptOutput, ScriptRequest, TransportError};
use proptest::prelude::*;

use crate::harness::*;

/// Checks every script against the gate's runtime grammar, then hands it
/// to `inner` (or fails it as unreachable when there is none).
struct Checking {
    inner: Option<Arc<dyn Executor>>,
    seen: AtomicUsize,
}

impl Checking {
    fn check(req: &ScriptRequest) {
        if let Err(e) = govsql::grammar::check_runtime_script(req.text.as_bytes()) {
            panic!("the gate would refuse a per-job script ({}): {e}", req.tag);
        }
        let session = govsql::transport::session::session_input(req)
            .expect("runtime scripts run in sessions");
        if let Err(e) = govsql::grammar::check_runtime_script(session.as_bytes()) {
            panic!("the gate would refuse a session's input ({}): {e}", req.tag);
        }
    }
}

impl Executor for Checking {
    fn run(&self, req: ScriptRequest) -> BoxFuture<'_, Result<ScriptOutput, TransportError>> {
        Self::check(&req);
        self.seen.fetch_add(1, Ordering::Relaxed);
        match &self.inner {
            Some(inner) => inner.run(req),
            None => Box::pin(async { Err(TransportError::Unreachable("fake".into())) }),
        }
    }
    fn kind(&self) -> &'static str {
        "local"
    }
}

/// A value of a param's type built from a text seed.
fn value_of(ty: ParamType, seed: &str) -> String {
    match ty {
        ParamType::Text => seed.to_string(),
        ParamType::Bigint => "0".into(),
        ParamType::Uuid => "00000000-0000-4000-8000-000000000000".into(),
        ParamType::Boolean => "true".into(),
        ParamType::Jsonb => serde_json::json!({ "v": seed }).to_string(),
    }
}

#[tokio::test]
async fn every_command_in_every_mode_with_hostile_values_passes_the_gate_grammar() {
    let db = test_db().await;
    db.open_all();
    db.switch(true);
    let checking = Arc::new(Checking {
        inner: Some(db.configured_executor()),
        seen: AtomicUsize::new(0),
    });
    let rt = db.runtime_with(checking.clone());
    let values: Vec<String> = crate::values::hostile_values()
        .into_iter()
        .map(|v| v.replace("@F@", "/nonexistent/x"))
        .collect();
    let mut jobs = 0;
    for cmd in db.catalog.commands() {
        for mode in [Mode::Plan, Mode::Apply, Mode::Verify] {
            for v in values.iter().step_by(3) {
                let params: Vec<(String, String)> = cmd
                    .params
                    .iter()
                    .map(|p| (p.name.clone(), value_of(p.ty, v)))
                    .collect();
                let pairs: Vec<(&str, &str)> = params
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let _ = run(&rt, &cmd.name, mode, &pairs).await;
                jobs += 1;
            }
        }
    }
    // The cancel and ledger scripts, too.
    let exec = db.configured_executor();
    let checked = Checking {
        inner: Some(exec),
        seen: AtomicUsize::new(0),
    };
    govsql::transport::cancel_tagged(&checked, "govsql:job-x")
        .await
        .unwrap();
    assert!(
        checking.seen.load(Ordering::Relaxed) >= jobs,
        "every job sent a script"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn random_values_render_only_scripts_the_gate_accepts(seed in any::<String>()) {
        let rt_async = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let catalog = govsql::catalog::Catalog::load(&catalog_path()).unwrap();
        let state = tempfile::tempdir().unwrap();
        let checking = Arc::new(Checking { inner: None, seen: AtomicUsize::new(0) });
        let rt = govsql::runtime::Runtime::new(
            Arc::new(catalog.clone()),
            checking.clone(),
            "main",
            govsql::switch::ApplySwitch::new(state.path()),
            std::time::Duration::from_secs(5),
        );
        for cmd in catalog.commands() {
            for mode in [Mode::Plan, Mode::Apply, Mode::Verify] {
                let params: Vec<(String, String)> = cmd
                    .params
                    .iter()
                    .map(|p| (p.name.clone(), value_of(p.ty, &seed)))
                    .collect();
                let pairs: Vec<(&str, &str)> =
                    params.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                rt_async.block_on(run(&rt, &cmd.name, mode, &pairs));
            }
        }
    }
}

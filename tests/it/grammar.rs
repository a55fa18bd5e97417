//! One grammar, two users: every script the runtime emits — every catalog
//! command in every mode, with hostile and random values, as a per-job
//! script and as a session's input — passes the checker the database
//! host's remote-gate runs.

use std::process::Command;
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

/// Mutates `base` at random (insert, replace or delete a byte drawn from
/// psql's dangerous alphabet), `n` times.
fn mutate(base: &[u8], rng: &mut rand::rngs::StdRng, n: usize) -> Vec<u8> {
    use rand::Rng;
    const ALPHABET: &[u8] = b"\\!`'\"$:;|/\n\r\0 ogiwcx0aq-{}()";
    let mut v = base.to_vec();
    for _ in 0..n {
        let at = rng.gen_range(0..=v.len());
        let b = ALPHABET[rng.gen_range(0..ALPHABET.len())];
        match rng.gen_range(0..3) {
            0 => v.insert(at, b),
            1 if at < v.len() => v[at] = b,
            _ if at < v.len() => {
                v.remove(at);
            }
            _ => v.push(b),
        }
    }
    v
}

/// A differential fuzz: mutations of valid scripts go through the checker;
/// every input it accepts, run through the real psql (as the gate would,
/// but with no kernel wall), starts no other program and opens no file for
/// writing (strace sees every execve and open).
#[test]
fn whatever_the_checker_accepts_starts_nothing_and_writes_nothing() {
    use rand::SeedableRng;
    let pg = pg();
    let db = format!("fuzz{}", std::process::id());
    pg.admin("postgres", &format!("CREATE DATABASE {db}"));
    let status = {
        let mut s = govsql::psql::Script::new("govsql:fuzz", 10_000);
        s.section();
        s.sql(&govsql::grammar::entry_call(
            govsql::grammar::Entry::Ledger,
            Some(&serde_json::json!({"filter": {"actor": "a'b\\c $x$"}, "limit": 5})),
        ));
        s.finish().text
    };
    let cancel = {
        let mut s = govsql::psql::Script::with_preflight("govsql:fuzz", 10_000);
        s.sql(&govsql::grammar::cancel_statement("govsql:fuzz-job"));
        s.finish().text
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x9e0_5a1);
    let mut accepted: Vec<Vec<u8>> = Vec::new();
    let mut tried = 0;
    while tried < 20_000 && accepted.len() < 40 {
        tried += 1;
        let base = if tried % 2 == 0 { &status } else { &cancel };
        let m = mutate(base.as_bytes(), &mut rng, 1 + tried % 3);
        if m != base.as_bytes()
            && govsql::grammar::check_runtime_script(&m).is_ok()
            && !accepted.contains(&m)
        {
            accepted.push(m);
        }
    }
    assert!(
        !accepted.is_empty(),
        "no mutation was accepted: the fuzz tested nothing"
    );
    // The control: a door the checker refuses, run the same way, is seen
    // (so the assertions below can fail).
    let control = b"\\! true\n\\o out.txt\nSELECT 1;\n".to_vec();
    assert!(govsql::grammar::check_runtime_script(&control).is_err());
    accepted.insert(0, control);
    // govsql's own psql line, as the gate runs it (as the admin here).
    let words = govsql::psql::PsqlLine {
        psql: pg.psql.display().to_string(),
        container: None,
        db_host: Some(pg.dir.display().to_string()),
        db_port: pg.port,
        db_name: db.clone(),
        db_user: "postgres".into(),
    }
    .words();
    let work = tempfile::tempdir().unwrap();
    for (i, input) in accepted.iter().enumerate() {
        let trace = work.path().join(format!("trace{i}"));
        let mut child = Command::new("strace")
            .args(["-f", "-qq", "-e", "trace=execve,open,openat,creat", "-o"])
            .arg(&trace)
            .args(&words)
            .current_dir(work.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("strace (scripts/test installs it)");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            let _ = stdin.write_all(input);
        }
        let _ = child.wait();
        let trace = std::fs::read_to_string(&trace).unwrap();
        if i == 0 {
            assert!(trace.matches("execve(").count() > 1, "control: {trace}");
            assert!(trace.contains("out.txt"), "control: {trace}");
            continue;
        }
        let execs = trace.lines().filter(|l| l.contains("execve(")).count();
        assert_eq!(execs, 1, "an accepted input started a program:\n{trace}");
        let writes: Vec<&str> = trace
            .lines()
            .filter(|l| {
                (l.contains("open") || l.contains("creat("))
                    && (l.contains("O_WRONLY")
                        || l.contains("O_RDWR")
                        || l.contains("O_CREAT")
                        || l.contains("creat("))
            })
            .collect();
        assert!(
            writes.is_empty(),
            "an accepted input opened a file for writing: {writes:?}"
        );
    }
    pg.admin("postgres", &format!("DROP DATABASE {db}"));
    eprintln!(
        "fuzz: {tried} mutations, {} accepted, each run through psql",
        accepted.len()
    );
}

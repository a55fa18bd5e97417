//! Approvals bound to what runs: plan digests (what a plan covers, pinned
//! into the apply and checked by the dispatcher inside the applying
//! transaction, used once), plans pinned at submit for approvers, and
//! commands that need several approvers.

use std::time::Duration;

use govsql::job::Job;
use govsql::runtime::{Mode, RunStatus};
use serde_json::json;

use crate::daemon::*;
use crate::harness::*;

/// `dot_iu_create_collection`'s function replaced by one that answers
/// the same status and deletes every collection: what a plan must catch.
const REPLACED_CREATE: &str =
    "CREATE OR REPLACE FUNCTION public.fn_iu_collection_create(p_title text) RETURNS jsonb
     LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
     BEGIN
         DELETE FROM public.iu_collection;
         RETURN jsonb_build_object('status', 'created');
     END $$";

/// A plan's digest, as its outcome carries it.
fn plan_digest(o: &govsql::job::Outcome) -> String {
    o.evidence.other["plan_digest"]
        .as_str()
        .unwrap_or_else(|| panic!("no plan digest: {o:?}"))
        .to_string()
}

fn pinned(command: &str, params: &[(&str, &str)], digest: &str) -> Job {
    let mut j = job(command, Mode::Apply, params);
    j.plan_digest = Some(digest.to_string());
    j
}

#[tokio::test]
async fn an_apply_pinned_to_a_plan_runs_once_and_is_refused_when_a_function_moved() {
    let db = test_db().await;
    db.open_all();
    let rt = db.runtime();
    let title = [("title", "pinned")];
    let plan = run(&rt, "dot_iu_create_collection", Mode::Plan, &title).await;
    assert_eq!(plan.status, RunStatus::Planned, "{plan:?}");
    let d = plan_digest(&plan);
    assert_eq!(d.len(), 64);
    assert!(
        plan.message.contains(&format!("--plan {d}")),
        "{}",
        plan.message
    );
    // What it covers is recorded with it: function definitions by md5,
    // never a value.
    let covers = db.evidence(plan.run_id.unwrap())["plan_covers"].clone();
    assert_eq!(covers["command"], "dot_iu_create_collection");
    assert_eq!(covers["target"], "main");
    assert!(
        covers["functions"]["fn_iu_collection_create(text)"]
            .as_str()
            .is_some_and(|m| m.len() == 32),
        "{covers}"
    );
    assert!(!covers.to_string().contains("pinned"), "a value: {covers}");
    // A plan digest is a function of what it covers: planning again
    // gives the same one.
    let again = run(&rt, "dot_iu_create_collection", Mode::Plan, &title).await;
    assert_eq!(plan_digest(&again), d);

    // Pinned and unchanged: applied, the digest in its evidence.
    let o = rt
        .run(&pinned("dot_iu_create_collection", &title, &d))
        .await;
    assert_eq!(o.status, RunStatus::Applied, "{o:?}");
    assert_eq!(db.evidence(o.run_id.unwrap())["plan_digest"], d.as_str());
    // The same plan again (another job, another key): used, refused.
    let replay = rt
        .run(&pinned("dot_iu_create_collection", &title, &d))
        .await;
    assert_eq!(replay.status, RunStatus::Refused, "{replay:?}");
    assert_eq!(replay.class(), Some("approval_missing"));
    assert!(
        replay
            .message
            .contains(&format!("applied by run {}", o.run_id.unwrap())),
        "{}",
        replay.message
    );
    assert_eq!(db.count("iu_collection"), 1);

    // Other params than the plan's: drift, naming the params.
    let other = rt
        .run(&pinned("dot_iu_create_collection", &[("title", "x")], &d))
        .await;
    assert_eq!(other.class(), Some("plan_drift"), "{other:?}");
    assert!(other.message.contains("params_digest"), "{}", other.message);

    // Plan, then the function's body is replaced: refused, naming it.
    let title = [("title", "second")];
    let d2 = plan_digest(&run(&rt, "dot_iu_create_collection", Mode::Plan, &title).await);
    db.sql(REPLACED_CREATE);
    let drift = rt
        .run(&pinned("dot_iu_create_collection", &title, &d2))
        .await;
    assert_eq!(drift.status, RunStatus::Refused, "{drift:?}");
    assert_eq!(drift.class(), Some("plan_drift"));
    assert_eq!(drift.exit_code().code(), 3);
    assert!(
        drift
            .message
            .contains("moved: function fn_iu_collection_create(text)"),
        "{}",
        drift.message
    );
    assert_eq!(db.count("iu_collection"), 1, "nothing ran");
    assert_eq!(
        db.evidence(drift.run_id.unwrap())["plan_moved"],
        json!(["function fn_iu_collection_create(text)"])
    );

    // A digest no plan has: refused.
    let unknown = rt
        .run(&pinned("dot_iu_create_collection", &title, &"0".repeat(64)))
        .await;
    assert_eq!(unknown.class(), Some("plan_drift"), "{unknown:?}");
    assert!(
        unknown.message.contains("no plan has this digest"),
        "{}",
        unknown.message
    );
}

/// Waits for a job that must end refused `plan_drift` naming `moved`
/// (nothing ran); its ledger evidence, which carries the pinned digest.
fn refused_for_drift(
    d: &DaemonProc,
    db: &TestDb,
    id: &str,
    moved: &str,
    digest: &str,
) -> serde_json::Value {
    let done = wait_terminal(d, id);
    assert_eq!(done["state"], "refused", "{done}");
    assert_eq!(done["outcome"]["error_class"], "plan_drift", "{done}");
    let msg = done["outcome"]["message"].as_str().unwrap();
    assert!(msg.contains(&format!("moved: {moved}")), "{msg}");
    let e = db.evidence(done["outcome"]["run_id"].as_i64().unwrap());
    assert_eq!(e["plan_digest"], digest, "{e}");
    e
}

/// A soft-deleted piece that `dot_iu_purge_piece` (requires approval) can
/// purge; its id.
fn purgeable(db: &TestDb, n: u32) -> String {
    let piece = format!("00000000-0000-0000-0000-0000000000{n:02x}");
    db.sql(&format!(
        "INSERT INTO iu_collection (collection_id, title) VALUES ('00000000-0000-0000-0000-0000000001{n:02x}', 'c') ON CONFLICT DO NOTHING; \
         INSERT INTO iu_piece (piece_id, collection_id, body, deleted_at) VALUES ('{piece}', '00000000-0000-0000-0000-0000000001{n:02x}', 'b', now())"
    ));
    piece
}

/// Submits `dot_iu_purge_piece` (requires approval) for a piece; the reply.
fn submit_purge(d: &DaemonProc, piece: &str) -> serde_json::Value {
    submit(
        d,
        "dot_iu_purge_piece",
        "apply",
        json!([["piece_id", piece]]),
        false,
    )
}

/// The job id of a submit's reply.
fn job_id(reply: &serde_json::Value) -> String {
    reply["job"]["job_id"].as_str().unwrap().to_string()
}

/// The test catalog with `dot_iu_purge_piece` needing two approvers.
fn two_approvals_catalog() -> String {
    std::fs::read_to_string(catalog_path()).unwrap().replacen(
        "requires_approval = true\n",
        "requires_approval = true\napprovals_required = 2\n",
        1,
    )
}

/// Runs the CLI as a user; (exit code, stdout, stderr).
fn cli(d: &DaemonProc, user: Option<&str>, args: &[&str]) -> (Option<i32>, String, String) {
    let o = d.cli(user, args);
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[tokio::test]
async fn an_approval_approves_the_plan_pinned_at_submit_and_a_replaced_function_refuses_it() {
    let (db, d) = Scenario::new().approvers(&[OTHER]).ready().start().await;
    let piece = purgeable(&db, 1);
    let j = submit_purge(&d, &piece);
    assert_eq!(j["job"]["state"], "awaiting_approval", "{j}");
    let id = job_id(&j);
    let digest = j["job"]["plan_digest"]
        .as_str()
        .unwrap_or_else(|| panic!("not pinned: {j}"))
        .to_string();
    // The approver sees the plan and what it covers.
    let (code, shown, err) = cli(&d, Some(OTHER), &["show", &id]);
    assert_eq!(code, Some(0), "{err}");
    assert!(shown.contains(&format!("plan {digest}")), "{shown}");
    assert!(
        shown.contains("function fn_iu_purge_piece(uuid) (definition md5 "),
        "{shown}"
    );
    assert!(shown.contains("approvals: 0 of 1"), "{shown}");
    // An approval of another plan than the job's is refused.
    let (code, _, err) = cli(
        &d,
        Some(OTHER),
        &["approve", &id, "--plan", &"a".repeat(64)],
    );
    assert_ne!(code, Some(0));
    assert!(err.contains("pinned to plan"), "{err}");
    // Between the approval and the apply, the function's body changes.
    db.sql(
        "CREATE OR REPLACE FUNCTION public.fn_iu_purge_piece(p_piece_id uuid) RETURNS jsonb
         LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
         BEGIN
             DELETE FROM public.iu_piece;
             RETURN jsonb_build_object('status', 'purged');
         END $$",
    );
    let (code, _, err) = cli(
        &d,
        Some(OTHER),
        &["approve", &id, "--plan", &digest, "--reason", "CHG-7"],
    );
    assert_eq!(code, Some(0), "{err}");
    let e = refused_for_drift(&d, &db, &id, "function fn_iu_purge_piece(uuid)", &digest);
    assert_eq!(db.count("iu_piece"), 1, "nothing ran");
    assert_eq!(e["approvals"][0]["by"], OTHER, "{e}");
    assert_eq!(e["approvals"][0]["reason"], "CHG-7", "{e}");

    // Submitted again, it is pinned to the plan as it is now, and runs.
    let j = submit_purge(&d, &piece);
    let id = job_id(&j);
    let digest2 = j["job"]["plan_digest"].as_str().unwrap().to_string();
    assert_ne!(digest2, digest);
    let (code, _, err) = cli(&d, Some(OTHER), &["approve", &id]);
    assert_eq!(code, Some(0), "{err}");
    let done = wait_terminal(&d, &id);
    assert_eq!(done["state"], "applied", "{done}");
    assert_eq!(db.count("iu_piece"), 0);
    assert_eq!(
        db.evidence(done["outcome"]["run_id"].as_i64().unwrap())["plan_digest"],
        digest2.as_str()
    );
    // `log` shows the plan an apply was pinned to and who approved it.
    let log = d.cli_json(None, &["log", "--mode", "apply", "--limit", "1", "--json"]);
    assert_eq!(log[0]["plan_digest"], digest2.as_str(), "{log}");
    assert_eq!(log[0]["approvers"], OTHER, "{log}");
    let (_, text, _) = cli(&d, None, &["log", "--mode", "apply", "--limit", "1"]);
    assert!(
        text.contains(&format!("plan {}  approved by {OTHER}", &digest2[..16])),
        "{text}"
    );
}

#[tokio::test]
async fn a_catalog_reloaded_after_the_approval_refuses_the_apply() {
    let (db, d) = Scenario::new().approvers(&[OTHER]).ready().start().await;
    let piece = purgeable(&db, 2);
    let j = submit_purge(&d, &piece);
    let id = job_id(&j);
    // The command changes in the catalog; the database and the daemon
    // both take the new catalog (no catalog_drift), after the pin.
    let cat = db.dir.path().join("catalog.toml");
    let text = std::fs::read_to_string(&cat).unwrap();
    std::fs::write(
        &cat,
        text.replace(
            "Remove a soft-deleted piece for good.",
            "Remove a soft-deleted piece for good (now also for archived collections).",
        ),
    )
    .unwrap();
    let out = db.govsql(&["migrate", "--demo"]);
    assert!(out.status.success(), "{out:?}");
    let health = || d.request(json!({"v": 1, "op": "health"}))["health"]["catalog_digest"].clone();
    let before = health();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || health() != before,
        || "the new catalog was not picked up".into(),
    );
    let digest = j["job"]["plan_digest"].as_str().unwrap().to_string();
    let (code, _, err) = cli(&d, Some(OTHER), &["approve", &id]);
    assert_eq!(code, Some(0), "{err}");
    refused_for_drift(&d, &db, &id, "catalog_digest", &digest);
    assert_eq!(db.count("iu_piece"), 1);
}

#[tokio::test]
async fn a_command_needing_two_approvals_waits_for_two_other_people() {
    let third = crate::sshd::SHELL_USERS[0].0;
    let (db, d) = Scenario::new()
        .catalog(two_approvals_catalog())
        .approvers(&["root", OTHER, third])
        .ready()
        .start()
        .await;
    let piece = purgeable(&db, 3);
    let j = submit_purge(&d, &piece);
    let id = job_id(&j);
    // The submitter (root) is never one of them.
    let (code, _, err) = cli(&d, None, &["approve", &id]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("different user"), "{err}");
    // One approval: still waiting, nothing ran.
    let (code, out, err) = cli(&d, Some(OTHER), &["approve", &id, "--reason", "first"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("awaiting_approval"), "{out}");
    assert_eq!(job_state(&d, &id), "awaiting_approval");
    // The same approver again is not a second approval.
    let (code, _, err) = cli(&d, Some(OTHER), &["approve", &id]);
    assert_ne!(code, Some(0));
    assert!(err.contains("already approved"), "{err}");
    let (_, shown, _) = cli(&d, Some(third), &["show", &id]);
    assert!(shown.contains("approvals: 1 of 2"), "{shown}");
    assert_eq!(db.count("dot_iu_command_run WHERE run_mode = 'apply'"), 0);
    // A second person: it runs, both approvals in its evidence.
    let (code, _, err) = cli(&d, Some(third), &["approve", &id, "--reason", "second"]);
    assert_eq!(code, Some(0), "{err}");
    let done = wait_terminal(&d, &id);
    assert_eq!(done["state"], "applied", "{done}");
    let e = db.evidence(done["outcome"]["run_id"].as_i64().unwrap());
    let by: Vec<&str> = e["approvals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["by"].as_str().unwrap())
        .collect();
    assert_eq!(by, [OTHER, third], "{e}");
    assert_eq!(e["approvals"][1]["reason"], "second");
}

/// The database counts approvals too: a caller holding the daemon's key
/// who asserts one approver where two are needed, or the submitter as
/// its own approver, is refused.
#[tokio::test]
async fn the_dispatcher_refuses_an_apply_with_fewer_approvers_than_the_command_needs() {
    let text = two_approvals_catalog();
    let db = test_db_with(&text, 10).await;
    db.open_all();
    let piece = purgeable(&db, 4);
    let catalog = db.sql("SELECT digest FROM dot_iu_catalog_state");
    let call = |client: &str| {
        let sql = format!(
            "SELECT value FROM fn_dot_iu_dispatch('apply', 'dot_iu_purge_piece', '{{\"piece_id\": \"{piece}\"}}', 'k{}', 'mallory', '{catalog}', false, 1000, '{client}') WHERE kind = 'run'",
            client.len()
        );
        let o = pg().psql_as(RUNTIME_ROLE, &db.name, &sql);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    for (client, reason) in [
        (
            r#"{"approvals": [{"by": "bob", "at": "x"}]}"#,
            "1 of 2 approvals",
        ),
        (
            r#"{"approvals": [{"by": "bob", "at": "x"}, {"by": "mallory", "at": "x"}]}"#,
            "1 of 2 approvals",
        ),
        (
            r#"{"approvals": [{"by": "bob", "at": "x"}, {"by": "bob", "at": "y"}]}"#,
            "1 of 2 approvals",
        ),
        (r#"{"approved_by": "mallory"}"#, "0 of 2 approvals"),
    ] {
        let run = call(client);
        assert_eq!(run["status"], "refused", "{client}: {run}");
        assert_eq!(run["class"], "approval_missing", "{client}: {run}");
        assert_eq!(run["reasons"][0], reason, "{client}: {run}");
    }
    assert_eq!(db.count("iu_piece"), 1);
    let run = call(r#"{"approvals": [{"by": "bob", "at": "x"}, {"by": "carol", "at": "x"}]}"#);
    assert_eq!(run["status"], "applied", "{run}");
}

/// A plan pinned at submit binds its job. The pin sent no job id, so two
/// jobs with the same values pinned one digest: once the first applied,
/// the second was refused "the plan was applied by run N". Now each job
/// pins its own plan, and one job's plan does not let another run.
#[tokio::test]
async fn two_jobs_with_the_same_values_pin_two_plans() {
    let db = test_db().await;
    db.open_all();
    db.switch(true);
    let rt = db.runtime();
    let params = [("title", "same")];
    let a = job("dot_iu_create_collection", Mode::Apply, &params);
    let b = job("dot_iu_create_collection", Mode::Apply, &params);
    let pa = rt.pin(&a).await.unwrap();
    let pb = rt.pin(&b).await.unwrap();
    assert_ne!(pa.digest, pb.digest, "two jobs, one plan");
    assert_eq!(pa.covers["job_id"], json!(a.job_id.to_string()));
    let with = |mut j: Job, p: &govsql::runtime::Pin| {
        j.plan_digest = Some(p.digest.clone());
        j.plan_covers = Some(p.covers.clone());
        j
    };
    let o = rt.run(&with(b.clone(), &pa)).await;
    assert_eq!(o.status, RunStatus::Refused, "{o:?}");
    assert_eq!(o.class(), Some("plan_drift"), "{o:?}");
    assert!(o.message.contains("job_id"), "{}", o.message);
    for (j, p) in [(a, &pa), (b, &pb)] {
        let o = rt.run(&with(j, p)).await;
        assert_eq!(o.status, RunStatus::Applied, "{o:?}");
    }
    assert_eq!(db.count("iu_collection"), 2);
    // Many at once, in one round trip: each its own pin, or why not.
    let long = "x".repeat(300);
    let jobs = [
        job("dot_iu_create_collection", Mode::Apply, &params),
        job("dot_iu_create_collection", Mode::Apply, &[("title", &long)]),
        job("dot_iu_create_collection", Mode::Apply, &params),
    ];
    let pins = rt.pin_many(&jobs).await.unwrap();
    assert_eq!(pins.len(), 3);
    let (first, third) = (pins[0].as_ref().unwrap(), pins[2].as_ref().unwrap());
    assert_ne!(first.digest, third.digest);
    assert_eq!(third.covers["job_id"], json!(jobs[2].job_id.to_string()));
    let why = pins[1].as_ref().unwrap_err();
    assert!(!why.contains(&long), "a value in an error: {why}");
}

/// A job without approval gets the same pinning between its submit and
/// its run when it waits: with the target's one channel busy, an apply
/// still queued a second after its submit is pinned (on the read
/// channel); the target function's body is replaced while it waits, and
/// it is refused `plan_drift` naming the function, nothing run. An apply
/// that starts at once is not pinned.
#[tokio::test]
async fn an_apply_that_waits_for_a_channel_is_pinned() {
    let (db, d) = Scenario::new()
        .target("max_channels = 1\n")
        .ready()
        .start()
        .await;
    let create = |title: &str| {
        submit(
            &d,
            "dot_iu_create_collection",
            "apply",
            json!([["title", title]]),
            false,
        )
    };
    let status = |id: &str| d.request(json!({"v": 1, "op": "status", "job_id": id}))["job"].clone();
    // The channel is free: it applies at once, never pinned.
    let at_once = create("at once");
    let done = wait_terminal(&d, &job_id(&at_once));
    assert_eq!(done["state"], "applied", "{done}");
    assert!(done["plan_digest"].is_null(), "{done}");
    // The channel is held by a verify that sleeps.
    let sleeper = submit(
        &d,
        "dot_iu_diag_sleep",
        "verify",
        json!([["seconds", "9"]]),
        false,
    );
    let sleeper = job_id(&sleeper);
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || job_state(&d, &sleeper) == "running",
        || "the sleeper never ran".into(),
    );
    let id = job_id(&create("waits"));
    wait_until(
        Duration::from_secs(7),
        Duration::from_millis(50),
        || status(&id)["plan_digest"].is_string(),
        || format!("a waiting apply was not pinned: {}", status(&id)),
    );
    let digest = status(&id)["plan_digest"].as_str().unwrap().to_string();
    assert_eq!(job_state(&d, &id), "queued");
    db.sql(REPLACED_CREATE);
    refused_for_drift(
        &d,
        &db,
        &id,
        "function fn_iu_collection_create(text)",
        &digest,
    );
    assert_eq!(db.count("iu_collection"), 1, "nothing ran");
}

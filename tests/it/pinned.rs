//! Approvals bound to what runs: plan digests (what a plan covers, pinned
//! into the apply and checked by the dispatcher inside the applying
//! transaction), used once.

use govsql::job::Job;
use govsql::runtime::{Mode, RunStatus};

use crate::harness::*;

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
    let covers: serde_json::Value = serde_json::from_str(&db.sql(&format!(
        "SELECT evidence->'plan_covers' FROM dot_iu_command_run WHERE run_id = {}",
        plan.run_id.unwrap()
    )))
    .unwrap();
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
    assert_eq!(
        db.sql(&format!(
            "SELECT evidence->>'plan_digest' FROM dot_iu_command_run WHERE run_id = {}",
            o.run_id.unwrap()
        )),
        d
    );
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
    db.sql(
        "CREATE OR REPLACE FUNCTION public.fn_iu_collection_create(p_title text) RETURNS jsonb
         LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
         BEGIN
             DELETE FROM public.iu_collection;
             RETURN jsonb_build_object('status', 'created');
         END $$",
    );
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
    let moved = db.sql(&format!(
        "SELECT evidence->'plan_moved' FROM dot_iu_command_run WHERE run_id = {}",
        drift.run_id.unwrap()
    ));
    assert_eq!(moved, r#"["function fn_iu_collection_create(text)"]"#);

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

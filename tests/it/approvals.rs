//! Approvals through the daemon: a different user approves, approvals
//! expire, approvers list, show and reject with a reason, and another
//! user's wait, show or cancel never touches your job.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::{json, Value};

use crate::daemon::*;
use crate::harness::*;
use crate::sshd::{self, keys, USER};

#[tokio::test]
async fn approvals_need_a_different_user_and_expire() {
    let (db, d) = Scenario::new()
        .approvers(&["root", OTHER])
        .daemon("approval_ttl_s = 60\n")
        .start()
        .await;
    db.open_all();
    let piece = "00000000-0000-0000-0000-00000000000a";
    db.sql(&format!(
        "INSERT INTO iu_collection (collection_id, title) VALUES ('00000000-0000-0000-0000-0000000000c0', 'c'); \
         INSERT INTO iu_piece (piece_id, collection_id, body, deleted_at) VALUES ('{piece}', '00000000-0000-0000-0000-0000000000c0', 'b', now())"
    ));
    let j = submit(
        &d,
        "dot_iu_purge_piece",
        "apply",
        json!([["piece_id", piece]]),
        false,
    );
    let id = j["job"]["job_id"].as_str().unwrap().to_string();
    assert_eq!(j["job"]["state"], "awaiting_approval");
    // Nothing runs while it waits.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(db.count("dot_iu_command_run"), 0);
    // The submitter cannot approve its own job.
    let own = d.cli(None, &["approve", &id]);
    assert_eq!(own.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&own.stderr).contains("different user"));
    // Another approver can.
    let other = d.cli(Some(OTHER), &["approve", &id]);
    assert_eq!(
        other.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&other.stderr)
    );
    let done = wait_terminal(&d, &id);
    assert_eq!(done["state"], "applied", "{done}");
    assert_eq!(done["approved_by"], OTHER);
    assert_eq!(
        db.sql(&format!(
            "SELECT evidence->>'approved_by' FROM dot_iu_command_run WHERE run_id = {}",
            done["outcome"]["run_id"]
        )),
        OTHER
    );
    // An approval that comes too late is refused as expired, and audited.
    let j = submit(
        &d,
        "dot_iu_purge_piece",
        "apply",
        json!([["piece_id", piece]]),
        false,
    );
    let late = j["job"]["job_id"].as_str().unwrap().to_string();
    age_job(&db, &late, 120);
    let out = d.cli(Some(OTHER), &["approve", &late]);
    assert_ne!(out.status.code(), Some(0));
    let done = wait_terminal(&d, &late);
    assert_eq!(done["state"], "refused");
    assert_eq!(done["outcome"]["error_class"], "approval_expired");
    assert!(done["outcome"]["run_id"].is_i64());
    // Cancel: a waiting job ends cancelled, audited as refused (cancelled).
    let j = submit(
        &d,
        "dot_iu_purge_piece",
        "apply",
        json!([["piece_id", piece]]),
        false,
    );
    let c = j["job"]["job_id"].as_str().unwrap().to_string();
    let out = d.cli(None, &["cancel", &c]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It prints the state the job reached, not the `queued` it passes.
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.starts_with("cancelled"), "{said}");
    let done = wait_terminal(&d, &c);
    assert_eq!(done["state"], "cancelled");
    assert_eq!(done["outcome"]["error_class"], "cancelled");
}

#[tokio::test]
async fn approvers_list_show_and_reject_with_a_reason_in_the_ledger_over_ssh() {
    let s = sshd::shared();
    let mut db = ssh_db(&s.target_toml(USER, &keys().ed25519), 30).await;
    configure(&mut db, OPEN_ACCESS, "");
    db.open_all();
    let d = DaemonProc::start(&db);
    let piece = "0000000a-bbbb-4ccc-8ddd-00000000e1e1";
    let r = submit(
        &d,
        "dot_iu_purge_piece",
        "apply",
        json!([["piece_id", piece]]),
        false,
    );
    assert_eq!(r["job"]["state"], "awaiting_approval", "{r}");
    let id = r["job"]["job_id"].as_str().unwrap().to_string();
    // The approver's list.
    let out = d.cli(Some(OTHER), &["approvals", "--json"]);
    let pending: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        pending.iter().any(|j| j["job_id"] == id.as_str()),
        "{pending:?}"
    );
    // What it will run, values included, to the approver only.
    let out = d.cli(Some(OTHER), &["show", &id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("apply dot_iu_purge_piece on main"), "{text}");
    assert!(
        text.contains("statement: SELECT public.fn_iu_purge_piece({{piece_id}})"),
        "{text}"
    );
    assert!(
        text.contains(&format!("param piece_id = {piece}")),
        "{text}"
    );
    // Reject needs a reason; with one, the job ends refused (rejected) and
    // the reason is in its ledger row.
    let out = d.cli(Some(OTHER), &["reject", &id, "--reason", " "]);
    assert_eq!(out.status.code(), Some(2));
    let out = d.cli(
        Some(OTHER),
        &["reject", &id, "--reason", "not during the freeze"],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done = wait_terminal(&d, &id);
    assert_eq!(done["state"], "refused", "{done}");
    assert_eq!(done["outcome"]["error_class"], "rejected");
    assert_eq!(
        db.sql("SELECT evidence->>'reason' FROM dot_iu_command_run WHERE evidence->>'error_class' = 'rejected'"),
        format!("rejected by {OTHER}: not during the freeze")
    );
    // After the end, the params are gone: show tells the submitter so;
    // the approver no longer sees the job at all.
    let out = d.cli(None, &["show", &id]);
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("erased"));
    let out = d.cli(Some(OTHER), &["show", &id]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no job"));
    // The value never reached the daemon's log.
    assert!(!d.log_text().contains(piece));
    // An approval's reason goes into the ledger too.
    let r = submit(
        &d,
        "dot_iu_purge_piece",
        "apply",
        json!([["piece_id", piece]]),
        false,
    );
    let id2 = r["job"]["job_id"].as_str().unwrap().to_string();
    let out = d.cli(Some(OTHER), &["approve", &id2, "--reason", "ticket OPS-42"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done = wait_terminal(&d, &id2);
    assert!(done["outcome"]["run_id"].is_i64(), "{done}");
    assert_eq!(
        db.sql(&format!(
            "SELECT evidence->>'reason' FROM dot_iu_command_run WHERE evidence->>'job_id' = '{id2}'"
        )),
        format!("approved by {OTHER}: ticket OPS-42")
    );
}

/// Job ids show in `ps`: another user's `wait`, `show` or `cancel` on your
/// job id is answered "not found" (as for an id that does not exist) and
/// never touches your own wait.
#[tokio::test]
async fn another_users_wait_show_or_cancel_never_touches_your_job() {
    let (_db, d) = Scenario::new().approvers(&["root"]).start().await;
    let r = submit(
        &d,
        "dot_iu_diag_sleep",
        "verify",
        json!([["seconds", "3"]]),
        false,
    );
    let id = r["job"]["job_id"].as_str().unwrap().to_string();
    let waiting = {
        let socket = d.socket.clone();
        let id = id.clone();
        std::thread::spawn(move || {
            let mut s = UnixStream::connect(&socket).unwrap();
            let line = format!(
                "{}\n",
                json!({"v": 1, "op": "wait", "job_id": id, "timeout_s": 30})
            );
            s.write_all(line.as_bytes()).unwrap();
            let mut reply = String::new();
            BufReader::new(s).read_line(&mut reply).unwrap();
            serde_json::from_str::<Value>(&reply).unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let ghost = "6b000000-00000000";
    for args in [
        vec!["wait", id.as_str(), "--timeout", "0"],
        vec!["show", id.as_str()],
        vec!["cancel", id.as_str()],
    ] {
        let out = d.cli(Some(OTHER), &args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_ne!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(err.contains("no job"), "{args:?}: {err}");
        // The same answer as for an id that does not exist.
        let mut ghost_args = args.clone();
        ghost_args[1] = ghost;
        let ghost_out = d.cli(Some(OTHER), &ghost_args);
        assert_eq!(out.status.code(), ghost_out.status.code(), "{args:?}");
    }
    let reply = waiting.join().unwrap();
    assert_eq!(reply["ok"], true, "the owner's wait was ended: {reply}");
    assert_eq!(reply["job"]["state"], "verified", "{reply}");
}

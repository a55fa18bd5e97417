//! Hostile param values travel byte-exact into the database and back, and
//! nothing else runs; the naive quoting we replaced is shown to fail.

use std::path::Path;

use govsql::runtime::{Mode, RunStatus, Runtime};

use crate::harness::*;

/// Values that broke, or could break, a quoting scheme somewhere. `@F@`
/// is replaced by the path of a file a successful injection would create.
pub fn hostile_values() -> Vec<String> {
    let mut v: Vec<String> = [
        "",
        " ",
        "'",
        "''",
        "'''",
        "\\",
        "\\\\",
        "a\\",
        "\\'",
        "'; DROP TABLE iu_piece; --",
        "\n\\! touch @F@\n",
        "x\\\n\\! touch @F@",
        "\\! touch @F@",
        "\n\\o @F@\n",
        "\n\\copy iu_piece to '@F@'\n",
        "\n\\set ON_ERROR_STOP 0\n",
        "$$",
        "$$; SELECT 1; $$",
        "$q$",
        "$tag$ \\! touch @F@ $tag$",
        "$q0123456789$",
        ";",
        "--",
        "/*",
        "*/",
        "/* \\! touch @F@ */",
        ":name",
        ":'name'",
        ":\"name\"",
        ":{?name}",
        "~|~",
        "a~|~b~|~c",
        "GOVSQL:0000:1",
        "\nGOVSQL:0000:end\n",
        "\t",
        "a\tb\nc\rd",
        "\\N",
        "NULL",
        "\u{1}\u{2}\u{7f}\u{1b}[31m",
        "h\u{e9}llo w\u{f6}rld",
        "\u{202e}right-to-left\u{202c}",
        "\u{200f}\u{61c}rtl marks",
        "\u{feff}bom",
        "\u{10ffff}",
        "\u{1f600} emoji",
        "\u{2028}\u{2029}",
        "`touch @F@`",
        "$(touch @F@)",
        "\"; touch @F@; \"",
        "E'\\x41'",
        "U&'\\0041'",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push("x".repeat(100_000));
    v.push("'\\$\n".repeat(20_000));
    v
}

async fn collection(rt: &Runtime) -> String {
    let o = run(
        rt,
        "dot_iu_create_collection",
        Mode::Apply,
        &[("title", "hostile")],
    )
    .await;
    assert_eq!(o.status, RunStatus::Applied, "{o:?}");
    result_json(&o)["collection_id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Adds each value as a piece body, reads it back, compares bytes, and
/// checks that no injected file exists.
pub async fn round_trip_all(rt: &Runtime, db: &TestDb, marker: &Path) {
    let coll = collection(rt).await;
    let values = hostile_values();
    assert!(values.len() >= 40);
    for (i, raw) in values.iter().enumerate() {
        let value = raw.replace("@F@", &marker.display().to_string());
        let add = run(
            rt,
            "dot_iu_add_piece",
            Mode::Apply,
            &[("collection_id", &coll), ("body", &value)],
        )
        .await;
        assert_eq!(add.status, RunStatus::Applied, "value #{i}: {add:?}");
        let piece = result_json(&add)["piece_id"].as_str().unwrap().to_string();
        let get = run(
            rt,
            "dot_iu_piece_get",
            Mode::Verify,
            &[("piece_id", &piece)],
        )
        .await;
        assert_eq!(get.status, RunStatus::Verified, "value #{i}: {get:?}");
        assert_eq!(
            result_json(&get)["body"].as_str(),
            Some(value.as_str()),
            "value #{i} changed in transit"
        );
        assert!(!marker.exists(), "value #{i} ran an injected command");
    }
    assert_eq!(db.count("iu_piece"), values.len() as i64);
}

#[tokio::test]
async fn hostile_values_round_trip_byte_exact_over_local_psql() {
    let db = test_db().await;
    db.open_all();
    let marker = db.dir.path().join("injected");
    round_trip_all(&db.runtime(), &db, &marker).await;
}

#[tokio::test]
async fn values_stay_inert_with_standard_conforming_strings_off() {
    let db = test_db().await;
    db.open_all();
    db.sql(&format!(
        "ALTER DATABASE {} SET standard_conforming_strings = off",
        db.name
    ));
    let marker = db.dir.path().join("injected-scs");
    let rt = db.runtime();
    let coll = collection(&rt).await;
    let value = format!("a\\' \n\\! touch {}\n", marker.display());
    let add = run(
        &rt,
        "dot_iu_add_piece",
        Mode::Apply,
        &[("collection_id", &coll), ("body", &value)],
    )
    .await;
    assert_eq!(add.status, RunStatus::Applied, "{add:?}");
    let piece = result_json(&add)["piece_id"].as_str().unwrap().to_string();
    let get = run(
        &rt,
        "dot_iu_piece_get",
        Mode::Verify,
        &[("piece_id", &piece)],
    )
    .await;
    assert_eq!(result_json(&get)["body"].as_str(), Some(value.as_str()));
    assert!(!marker.exists());

    // Control: the quote-doubling we replaced does run the \! under the
    // same server setting, so this test can tell safe from unsafe.
    let naive = format!(
        "SET standard_conforming_strings = off;\nSELECT '{}';\n",
        value.replace('\'', "''")
    );
    let _ = std::process::Command::new(&pg().psql)
        .args(["-X", "-q", "-h"])
        .arg(&pg().dir)
        .args([
            "-p",
            &pg().port.to_string(),
            "-U",
            RUNTIME_ROLE,
            "-d",
            &db.name,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(naive.as_bytes())?;
            c.wait()
        });
    assert!(
        marker.exists(),
        "the naive control should have been injectable"
    );
}

#[tokio::test]
async fn nul_byte_is_refused_and_audited_before_anything_runs() {
    let db = test_db().await;
    db.open_all();
    let rt = db.runtime();
    let coll = collection(&rt).await;
    let o = run(
        &rt,
        "dot_iu_add_piece",
        Mode::Apply,
        &[("collection_id", &coll), ("body", "a\0\n\\! touch /tmp/x")],
    )
    .await;
    assert_eq!(o.status, RunStatus::Refused);
    assert_eq!(o.class(), Some("bad_params"));
    assert!(
        o.message.contains("NUL") && o.message.contains("body"),
        "{}",
        o.message
    );
    assert_eq!(db.count("iu_piece"), 0);
}

#[tokio::test]
async fn large_result_and_null_versus_empty_parse_exactly() {
    let db = test_db().await;
    db.open_all();
    let rt = db.runtime();
    let coll = collection(&rt).await;
    // 1 MiB body, the largest the schema accepts.
    let big = "\u{e9}\t\\\n".repeat(1024 * 1024 / 5);
    let add = run(
        &rt,
        "dot_iu_add_piece",
        Mode::Apply,
        &[("collection_id", &coll), ("body", &big)],
    )
    .await;
    assert_eq!(add.status, RunStatus::Applied, "{:?}", add.error_class);
    let piece = result_json(&add)["piece_id"].as_str().unwrap().to_string();
    let get = run(
        &rt,
        "dot_iu_piece_get",
        Mode::Apply,
        &[("piece_id", &piece)],
    )
    .await;
    assert_eq!(result_json(&get)["body"].as_str(), Some(big.as_str()));
}

#[tokio::test]
async fn timed_out_job_leaves_no_backend_and_fails_with_class_timeout() {
    let text = std::fs::read_to_string(catalog_path()).unwrap();
    let db = test_db_with(&text, 2).await;
    db.open_all();
    let rt = db.runtime();
    let started = std::time::Instant::now();
    let o = run(&rt, "dot_iu_diag_sleep", Mode::Apply, &[("seconds", "30")]).await;
    assert_eq!(o.status, RunStatus::Failed, "{o:?}");
    assert_eq!(o.class(), Some("timeout"));
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    // Its backend is terminated (pg_terminate_backend waits up to 5 s for
    // it; on a loaded machine it may take a moment more to leave the view).
    let tag = format!("govsql:{}", o.job_id);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while db.sql(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{tag}'"
    )) != "0"
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the job's backend survived its deadline"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(db.count("dot_iu_command_run WHERE run_status = 'failed' AND evidence->>'error_class' = 'timeout'"), 1);
}

//! Fleets: targets with tags, `--targets` selectors and `govsql targets`
//! (what a selector picks, with each target's health), against a daemon
//! serving several targets.

use crate::daemon::*;
use crate::harness::*;

/// A daemon whose config has `main` (tags prod, eu) and two more targets
/// on the same database: `us1` (prod, us) and `lab` (no tags).
async fn three_targets() -> (TestDb, DaemonProc) {
    let db = Scenario::new()
        .target("tags = [\"prod\", \"eu\"]\n")
        .db()
        .await;
    let text = std::fs::read_to_string(&db.config_path).unwrap();
    let main = &text[text.find("[targets.main]\n").unwrap()..];
    let body = main.trim_start_matches("[targets.main]\n");
    let body = body.replace("tags = [\"prod\", \"eu\"]\n", "");
    std::fs::write(
        &db.config_path,
        format!("{text}\n[targets.us1]\ntags = [\"prod\", \"us\"]\n{body}\n[targets.lab]\n{body}",),
    )
    .unwrap();
    let mut db = db;
    db.config = govsql::config::Config::load(&db.config_path).unwrap();
    let d = DaemonProc::start(&db);
    (db, d)
}

#[tokio::test]
async fn targets_lists_what_a_selector_picks_with_tags_and_health() {
    let (_db, d) = three_targets().await;
    let names = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_string())
            .collect()
    };
    // The config's order, not the names' (a rollout goes in this order).
    let all = d.cli_json(None, &["targets", "--json"]);
    assert_eq!(names(&all), ["main", "us1", "lab"], "{all}");
    assert_eq!(all[0]["tags"], serde_json::json!(["prod", "eu"]));
    assert_eq!(all[0]["reachable"], true);
    let prod = d.cli_json(None, &["targets", "--targets", "tag:prod", "--json"]);
    assert_eq!(names(&prod), ["main", "us1"]);
    let union = d.cli_json(None, &["targets", "--targets", "lab,tag:eu", "--json"]);
    assert_eq!(names(&union), ["main", "lab"]);
    // The table says the same in words.
    let out = d.cli(None, &["targets", "--targets", "tag:us"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("TARGET"), "{text}");
    assert!(
        text.contains("us1") && text.contains("prod,us") && !text.contains("lab"),
        "{text}"
    );
    // A selector naming what is not there is a usage error listing what is.
    for (sel, says) in [
        ("tag:asia", "the tags in use are: eu, prod, us"),
        ("eu2", "the targets are: lab, main, us1"),
        ("a;b", "is not a target name, tag:NAME or all"),
    ] {
        let out = d.cli(None, &["targets", "--targets", sel]);
        assert_eq!(out.status.code(), Some(2), "{sel}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{sel}: {err}");
    }
}

/// A tag or a target name that a selector could not name is refused when
/// the config is loaded, saying which.
#[tokio::test]
async fn a_config_with_a_tag_a_selector_cannot_name_is_refused() {
    let db = test_db().await;
    let text = std::fs::read_to_string(&db.config_path).unwrap();
    for (edit, says) in [
        (
            text.replace("[targets.main]\n", "[targets.main]\ntags = [\"eu west\"]\n"),
            "tag \"eu west\" is not 1-64 of",
        ),
        (
            text.replace("[targets.main]\n", "[targets.all]\n"),
            "a target name is 1-64 of a-z A-Z 0-9 _ - and not `all`",
        ),
    ] {
        let path = db.dir.path().join("bad.toml");
        std::fs::write(&path, edit).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_govsql"))
            .args(["config", "check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert_ne!(out.status.code(), Some(0));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err}");
    }
}

//! The binary at its edges, offline (no database needed): a reader that
//! closes the pipe, configs that must be refused when they load, a daemon
//! that cannot install its signal handlers, exit codes of bad job ids.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::harness::catalog_path;

/// A local-transport config in `dir` with `extra` appended to its target.
fn config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("govsql.toml");
    std::fs::write(
        &path,
        format!(
            "[daemon]\nsocket = \"{}\"\nstate_dir = \"{}\"\ncatalog = \"{}\"\n[targets.main]\ntransport = \"local\"\ndb_name = \"iu_core\"\ndb_user = \"govsql_runtime\"\n{extra}\n",
            dir.join("govsql.sock").display(),
            dir.join("state").display(),
            catalog_path().display()
        ),
    )
    .unwrap();
    path
}

fn govsql(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_govsql"))
        .args(args)
        .env("GOVSQL_CONFIG", config)
        .env_remove("GOVSQL_TEST_FAIL_SIGNALS")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_closed_pipe_ends_the_output_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "");
    for args in [&["catalog", "list"][..], &["catalog", "seed-sql"]] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_govsql"))
            .args(args)
            .env("GOVSQL_CONFIG", &cfg)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The reader goes away before the first line is written.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn a_huge_max_channels_is_refused_by_config_check_and_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "max_channels = 4611686018427387904");
    let check = govsql(&cfg, &["config", "check"]);
    assert_eq!(check.status.code(), Some(1), "{}", stderr(&check));
    assert!(
        stderr(&check).contains("max_channels"),
        "{}",
        stderr(&check)
    );
    let daemon = govsql(&cfg, &["daemon"]);
    assert_eq!(daemon.status.code(), Some(1), "{}", stderr(&daemon));
    assert!(stderr(&daemon).contains("max_channels"));
    assert!(!stderr(&daemon).contains("panicked"));
    // The same config with a sane value passes and says what it found.
    let good = config(dir.path(), "max_channels = 4");
    let ok = govsql(&good, &["config", "check"]);
    assert_eq!(ok.status.code(), Some(0), "{}", stderr(&ok));
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(
        text.contains("4 channel(s)") && text.contains("commands"),
        "{text}"
    );
}

#[test]
fn unknown_config_keys_are_named_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "max_channel = 4");
    let out = govsql(&cfg, &["config", "check"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("max_channel") && err.contains("line 9"),
        "{err}"
    );
}

#[test]
fn a_daemon_that_cannot_install_signal_handlers_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "");
    let out = Command::new(env!("CARGO_BIN_EXE_govsql"))
        .arg("daemon")
        .env("GOVSQL_CONFIG", &cfg)
        .env("GOVSQL_TEST_FAIL_SIGNALS", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("cannot install signal handlers"));
    // Nothing was started: no socket, no lock.
    assert!(!dir.path().join("govsql.sock").exists());
    assert!(!dir.path().join("state/govsql.lock").exists());
}

#[test]
fn exit_codes_are_decided_in_one_place() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "");
    // A malformed job id is a usage error, before any daemon is asked.
    let out = govsql(&cfg, &["status", "NOT-AN-ID!"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // An unknown command is refused (3) in reversal as everywhere.
    let out = govsql(&cfg, &["reversal", "no_such_command"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    // An unknown target is a usage error.
    let out = govsql(&cfg, &["verify", "--direct", "--target", "nope"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    // No Debug formatting in what a user reads.
    let err = stderr(&out);
    assert!(!err.contains("Some(") && !err.contains("Code("), "{err}");
}

#[test]
fn a_daemon_refuses_a_state_dir_others_can_write_or_a_symlinked_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = govsql(&cfg, &["daemon"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("writable by group or others") && err.contains("state"),
        "{err}"
    );
    assert!(!dir.path().join("govsql.sock").exists());
    // A symlinked lock file (it would be written through as root).
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    let elsewhere = dir.path().join("elsewhere");
    std::fs::write(&elsewhere, "keep me").unwrap();
    std::os::unix::fs::symlink(&elsewhere, state.join("govsql.lock")).unwrap();
    let out = govsql(&cfg, &["daemon"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("symlink"), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "keep me");
    // self-test says the same.
    let st = govsql(&cfg, &["self-test"]);
    assert_eq!(st.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&st.stdout).contains("symlink"));
}

#[test]
fn under_the_journal_lines_carry_their_priority_and_no_timestamp() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "");
    let log = dir.path().join("journal.log");
    let meta = std::fs::File::create(&log).unwrap().metadata().unwrap();
    let run = |journal: bool, args: &[&str], envs: &[(&str, &str)]| {
        let file = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        let mut c = Command::new(env!("CARGO_BIN_EXE_govsql"));
        c.args(args)
            .env("GOVSQL_CONFIG", &cfg)
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(file);
        if journal {
            c.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
        } else {
            c.env("JOURNAL_STREAM", "1:1");
        }
        let code = c.status().unwrap().code();
        let text = std::fs::read_to_string(&log).unwrap();
        std::fs::write(&log, "").unwrap();
        (code, text)
    };
    let check = |text: &str| {
        for l in text.lines() {
            assert!(
                l.len() > 3
                    && l.starts_with('<')
                    && l[1..2].parse::<u8>().is_ok()
                    && &l[2..3] == ">",
                "a line without its priority: {l}"
            );
            assert!(
                !l[3..].starts_with("20"),
                "a line with its own timestamp: {l}"
            );
            assert!(!l.contains('\u{1b}'), "ANSI codes: {l}");
        }
    };
    // A tracing warning (the switch changed) and a fatal error.
    let (code, text) = run(true, &["switch", "on"], &[]);
    assert_eq!(code, Some(0), "{text}");
    check(&text);
    assert!(
        text.lines()
            .any(|l| l.starts_with("<4>") && l.contains("apply switch changed")),
        "{text}"
    );
    let (code, text) = run(true, &["daemon"], &[("GOVSQL_TEST_FAIL_SIGNALS", "1")]);
    assert_eq!(code, Some(1));
    check(&text);
    assert!(text
        .lines()
        .any(|l| l.starts_with("<3>") && l.contains("cannot install signal handlers")));
    // A JOURNAL_STREAM that names another stream is not the journal.
    let (_, text) = run(false, &["switch", "off"], &[]);
    assert!(text.lines().all(|l| !l.starts_with('<')), "{text}");
    assert!(text.lines().any(|l| l.starts_with("20")), "{text}");
}

#[test]
fn every_exit_code_is_in_help_and_in_the_readme() {
    let out = Command::new(env!("CARGO_BIN_EXE_govsql"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    for code in [
        govsql::job::ExitCode::Ok,
        govsql::job::ExitCode::Error,
        govsql::job::ExitCode::Usage,
        govsql::job::ExitCode::Refused,
        govsql::job::ExitCode::Failed,
        govsql::job::ExitCode::Pending,
    ] {
        let c = code.code();
        assert!(
            help.contains(&format!("\n  {c}  ")),
            "--help lacks exit code {c}:\n{help}"
        );
        assert!(
            readme.contains(&format!("\n| {c} | ")),
            "the README lacks exit code {c}"
        );
    }
}

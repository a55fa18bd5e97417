//! The daemon and the CLI as the packaged systemd units run them, without
//! systemd: under a seccomp filter that forbids chown as the unit's
//! `SystemCallFilter=~@privileged` does, and run by root for a state
//! directory that belongs to the service user.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::daemon::{configure, open_db, submit, DaemonProc, OPEN_ACCESS};
use crate::harness::*;
use crate::sshd::USER;

/// Makes `cmd`'s process and its children get EPERM from every chown
/// call, as a unit with `SystemCallFilter=~@privileged` and
/// `SystemCallErrorNumber=EPERM` does (x86_64 numbers; other
/// architectures are let through).
fn forbid_chown(cmd: &mut Command) {
    use nix::libc;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const CHOWNS: [u32; 4] = [92, 93, 94, 260]; // chown, fchown, lchown, fchownat
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const ALLOW: u32 = 0x7fff_0000;
    const ERRNO: u32 = 0x0005_0000;
    let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    let mut filter = vec![
        op(LD_W_ABS, 0, 0, 4), // seccomp_data.arch
        op(JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        op(RET_K, 0, 0, ALLOW),
        op(LD_W_ABS, 0, 0, 0), // seccomp_data.nr
    ];
    for nr in CHOWNS {
        filter.push(op(JEQ_K, 0, 1, nr));
        filter.push(op(RET_K, 0, 0, ERRNO | libc::EPERM as u32));
    }
    filter.push(op(RET_K, 0, 0, ALLOW));
    // SAFETY: prctl with a filter that lives until exec (the kernel copies
    // it); nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(libc::PR_SET_SECCOMP, 2, &prog as *const libc::sock_fprog) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The name of this process's primary group.
fn own_group() -> String {
    nix::unistd::Group::from_gid(nix::unistd::getegid())
        .unwrap()
        .unwrap()
        .name
}

#[tokio::test]
async fn the_daemon_starts_where_chown_is_forbidden_when_its_socket_group_is_already_right() {
    let mut db = test_db().await;
    configure(
        &mut db,
        OPEN_ACCESS,
        &format!("socket_group = \"{}\"\n", own_group()),
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_govsql"));
    forbid_chown(&mut cmd);
    let d = DaemonProc::spawn(&db, cmd, &db.config_path, &db.config.daemon.socket);
    let r = submit(&d, "dot_iu_healthcheck", "verify", json!([]), true);
    assert_eq!(r["job"]["state"], "verified", "{r}");
    assert!(!d.log_text().contains("chgrp"), "{}", d.log_text());
}

#[tokio::test]
async fn a_socket_group_the_daemon_cannot_give_is_a_clear_error() {
    let mut db = test_db().await;
    crate::sshd::ensure_users();
    configure(
        &mut db,
        OPEN_ACCESS,
        &format!("socket_group = \"{}\"\n", crate::sshd::OPS_GROUP),
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_govsql"));
    forbid_chown(&mut cmd);
    let out = cmd
        .arg("daemon")
        .env("GOVSQL_CONFIG", &db.config_path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot chgrp"), "{err}");
    assert!(
        err.contains(&format!("Group={}", crate::sshd::OPS_GROUP)),
        "{err}"
    );
}

#[tokio::test]
async fn an_unreadable_switch_refuses_applies_as_unreadable_never_as_off() {
    let db = open_db().await;
    db.open_all();
    let d = DaemonProc::start(&db);
    // A switch file that cannot be read (here a directory in its place:
    // EISDIR; under systemd, a root-owned 0600 file: EACCES).
    let switch = db.config.daemon.state_dir.join(govsql::switch::SWITCH_FILE);
    std::fs::remove_file(&switch).unwrap();
    std::fs::create_dir(&switch).unwrap();
    let r = submit(&d, "dot_iu_healthcheck", "apply", json!([]), true);
    assert_eq!(r["job"]["state"], "refused", "{r}");
    let outcome = &r["job"]["outcome"];
    assert_eq!(outcome["error_class"], "kill_switch", "{r}");
    let msg = outcome["message"].as_str().unwrap();
    assert!(msg.contains("switch is unreadable: "), "{msg}");
    assert!(!msg.contains("is off"), "{msg}");
    let status = d.cli(None, &["switch", "status"]);
    let text = stdout(&status);
    assert!(text.contains("apply switch: unreadable: "), "{text}");
    std::fs::remove_dir(&switch).unwrap();
}

#[tokio::test]
async fn self_test_by_root_checks_as_the_owner_of_the_state_dir_and_root_switches_for_it() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let db = open_db().await;
    let user = nix::unistd::User::from_name(USER).unwrap().unwrap();
    let state = &db.config.daemon.state_dir;
    std::fs::create_dir_all(state).unwrap();
    std::os::unix::fs::chown(state, Some(user.uid.as_raw()), Some(user.gid.as_raw())).unwrap();
    std::fs::set_permissions(state, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    // `switch on` as root, as the README says: the file is the daemon's.
    let on = db.govsql(&["switch", "on", "--for", "30m"]);
    assert!(on.status.success(), "{on:?}");
    let meta = std::fs::metadata(state.join(govsql::switch::SWITCH_FILE)).unwrap();
    assert_eq!(meta.uid(), user.uid.as_raw());
    let started = Instant::now();
    let out = Command::new(test_bin())
        .args(["self-test", "--config"])
        .arg(&db.config_path)
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(
        text.contains(&format!("self-test as the daemon's service user {USER}")),
        "{text}"
    );
    assert!(
        text.contains(&format!("ok   private: {}", state.display())),
        "{text}"
    );
    assert!(text.contains("ok   apply switch: on for "), "{text}");
    assert!(
        !text.contains(&format!("FAIL private: {}:", state.display())),
        "{text}"
    );
}

//! `govsql remote-gate` through a real sshd: in `authorized_keys` as
//! `command="…",restrict`, a key opens only the governed door. govsql's
//! own jobs work under every login shell; `id`, psql as postgres, another
//! database, extra arguments and shell metacharacters run nothing; the
//! admin line works only for the key given `--admin-user`.

use std::path::{Path, PathBuf};
use std::process::Command;

use govsql::psql::DbRole;
use govsql::runtime::{Mode, RunStatus};

use crate::harness::*;
use crate::sshd::{keys, Sshd, SHELL_USERS, USER};

/// The built binary, where the test users can run it.
fn installed_binary() -> PathBuf {
    test_bin()
}

fn public_key(key: &Path) -> String {
    std::fs::read_to_string(format!("{}.pub", key.display()))
        .unwrap()
        .trim()
        .to_string()
}

/// Runs `command` over SSH with the OpenSSH client; (exit code, stderr).
fn ssh(s: &Sshd, user: &str, key: &Path, command: &str) -> (Option<i32>, String) {
    let out = Command::new("ssh")
        .args(["-p", &s.port.to_string(), "-i"])
        .arg(key)
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "LogLevel=ERROR",
            "-o",
        ])
        .arg(format!("UserKnownHostsFile={}", s.known_hosts.display()))
        .arg(format!("{user}@127.0.0.1"))
        .arg(command)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn remote_gate_lets_a_key_open_only_the_governed_door() {
    let s = Sshd::start();
    let bin = installed_binary();
    let db = ssh_db(&s.target_toml(USER, &keys().ed25519), 10).await;
    db.open_all();
    let pg = pg();
    let gate = format!(
        "{} remote-gate --psql {} --db-host {} --db-port {} --db-name {} --db-user {RUNTIME_ROLE}",
        bin.display(),
        pg.psql.display(),
        pg.dir.display(),
        pg.port,
        db.name
    );
    // The ed25519 key: jobs only. The RSA key: migrate too.
    let authorized = format!(
        "command=\"{gate}\",restrict {}\ncommand=\"{gate} --admin-user postgres\",restrict {}\n",
        public_key(&keys().ed25519),
        public_key(&keys().rsa)
    );
    for (user, _) in SHELL_USERS {
        std::fs::write(s.dir.join("authorized_keys").join(user), &authorized).unwrap();
    }

    // govsql's own jobs pass the gate under every login shell.
    for (user, _) in SHELL_USERS {
        let toml = format!(
            "{}{}",
            s.target_toml(user, &keys().ed25519),
            db_target_keys(&db)
        );
        let target: govsql::config::TargetConfig = toml::from_str(&toml).unwrap();
        let exec = govsql::transport::for_target(&target, DbRole::Runtime).unwrap();
        let rt = db.runtime_with(exec);
        let o = run(&rt, "dot_iu_healthcheck", Mode::Verify, &[]).await;
        assert_eq!(o.status, RunStatus::Verified, "{user}: {o:?}");
        let o = run(
            &rt,
            "dot_iu_create_collection",
            Mode::Apply,
            &[("title", user)],
        )
        .await;
        assert_eq!(o.status, RunStatus::Applied, "{user}: {o:?}");
    }

    // Anything else runs nothing.
    let marker = PathBuf::from(format!("/tmp/govsql-gate-marker-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let own = govsql::psql::command_line(&govsql::psql::command_words(
        &db.config.target(None).unwrap().1.clone(),
        DbRole::Runtime,
    ));
    let as_postgres = own.replace(&format!("-U {RUNTIME_ROLE}"), "-U postgres");
    let other_db = own.replace(&format!("-d {}", db.name), "-d postgres");
    let attacks = [
        "id".to_string(),
        as_postgres,
        other_db,
        format!("{own} -c 'select 1'"),
        format!("{own}; touch {}", marker.display()),
        format!("touch {} #{own}", marker.display()),
        format!("$(touch {})", marker.display()),
    ];
    for (user, _) in SHELL_USERS {
        for attack in &attacks {
            let (code, err) = ssh(&s, user, &keys().ed25519, attack);
            assert_ne!(code, Some(0), "{user}: {attack} ran: {err}");
            assert!(
                err.contains("remote-gate: refused"),
                "{user}: {attack}: {err}"
            );
        }
    }
    assert!(!marker.exists(), "a shell metacharacter ran a command");

    // migrate: with the admin key it works; the jobs' key cannot.
    let admin = |key: &Path| {
        let toml = format!(
            "{}{}admin_identity_file = \"{}\"\n",
            s.target_toml(USER, &keys().ed25519),
            db_target_keys(&db),
            key.display()
        );
        let target: govsql::config::TargetConfig = toml::from_str(&toml).unwrap();
        govsql::transport::for_target(&target, DbRole::Admin).unwrap()
    };
    let report =
        govsql::migrate::migrate(admin(&keys().rsa).as_ref(), &db.catalog, RUNTIME_ROLE, true)
            .await
            .unwrap();
    assert!(report.applied.is_empty(), "{report:?}");
    let refused = govsql::migrate::migrate(
        admin(&keys().ed25519).as_ref(),
        &db.catalog,
        RUNTIME_ROLE,
        true,
    )
    .await;
    assert!(refused.is_err(), "the jobs' key ran the admin line");
    assert_eq!(db.count("iu_collection"), SHELL_USERS.len() as i64);
    s.stop();
    let _ = std::fs::remove_file(&bin);
}

/// The database keys of a test database's target, as TOML lines.
fn db_target_keys(db: &TestDb) -> String {
    let t = db.config.target(None).unwrap().1;
    format!(
        "psql = \"{}\"\ndb_host = \"{}\"\ndb_port = {}\ndb_name = \"{}\"\ndb_user = \"{}\"\nadmin_db_user = \"postgres\"\n",
        t.psql,
        t.db_host.as_deref().unwrap_or(""),
        t.db_port,
        t.db_name,
        t.db_user
    )
}

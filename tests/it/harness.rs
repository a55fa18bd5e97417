//! The test harness: one real PostgreSQL cluster per test process, started
//! on a private unix socket in a temporary directory (as the `postgres`
//! user when run as root), stopped at exit by the pid of the process the
//! harness spawned, whatever the tests' outcome; every directory the
//! harness keeps beyond one test is removed then too. Each test gets its
//! own database, migrated with the demo schema, and its own config and
//! state directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use govsql::catalog::Catalog;
use govsql::config::Config;
use govsql::job::{Job, Params};
use govsql::psql::DbRole;
use govsql::runtime::{Mode, Outcome, Runtime};
use govsql::switch::ApplySwitch;
use govsql::transport::local::LocalExecutor;
use govsql::transport::Executor;

/// The runtime role every test database grants to.
pub const RUNTIME_ROLE: &str = "govsql_runtime";

/// The shipped catalog.
pub fn catalog_path() -> PathBuf {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let shipped = std::fs::read_to_string(shipped_catalog_path()).unwrap();
        let diag = std::fs::read_to_string(root.join("tests/diag-commands.toml")).unwrap();
        let (gates, commands) = diag
            .split_once("# [[command]]s")
            .expect("tests/diag-commands.toml: gates, then commands");
        let gates: String = gates
            .lines()
            .filter(|l| l.starts_with("fn_"))
            .map(|l| format!("{l}\n"))
            .collect();
        let text = shipped.replacen(
            "[gate_by_function]\n",
            &format!("[gate_by_function]\n{gates}"),
            1,
        );
        let text = format!("{text}\n{commands}");
        let path =
            std::env::temp_dir().join(format!("govsql-test-catalog-{}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        remove_at_exit(&path);
        path
    })
    .clone()
}

/// The catalog the package ships (no test-only commands).
pub fn shipped_catalog_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/catalog.toml")
}

/// The PostgreSQL binaries (Debian layout, newest version).
pub fn pg_bindir() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server is not installed: run scripts/test, which installs it")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    dirs.sort();
    dirs.pop().expect("no /usr/lib/postgresql/*/bin/initdb")
}

/// A running test cluster.
pub struct Pg {
    /// The cluster's directory (data, socket, log).
    pub dir: PathBuf,
    /// The port (the socket is `dir/.s.PGSQL.port`).
    pub port: u16,
    /// psql, the real binary.
    pub psql: PathBuf,
    /// The postmaster, spawned in the foreground: stopped by its own pid.
    postmaster: Mutex<Option<Child>>,
}

static PG: OnceLock<Pg> = OnceLock::new();
static DB_SEQ: AtomicUsize = AtomicUsize::new(0);

/// What the harness undoes at exit, last registered first.
type Cleanup = Box<dyn FnOnce() + Send>;
static CLEANUPS: Mutex<Vec<Cleanup>> = Mutex::new(Vec::new());

extern "C" fn run_cleanups() {
    let cleanups = std::mem::take(&mut *CLEANUPS.lock().unwrap_or_else(|p| p.into_inner()));
    for c in cleanups.into_iter().rev() {
        c();
    }
}

extern "C" {
    #[link_name = "atexit"]
    fn libc_atexit(f: extern "C" fn()) -> i32;
}

/// Runs `f` when the test process exits (after every test, whatever
/// their outcome), after the cleanups registered later.
pub fn at_exit(f: impl FnOnce() + Send + 'static) {
    static REGISTERED: std::sync::Once = std::sync::Once::new();
    // SAFETY: registering a plain extern "C" fn with atexit, once.
    REGISTERED.call_once(|| unsafe {
        libc_atexit(run_cleanups);
    });
    CLEANUPS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Box::new(f));
}

/// Removes a file or directory tree the harness made when the test
/// process exits.
pub fn remove_at_exit(path: &Path) {
    let path = path.to_path_buf();
    at_exit(move || {
        let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
    });
}

/// Stops a server the harness spawned in the foreground: `signal`, then
/// SIGKILL if it has not exited within 10 s, then reaps it.
pub fn stop_child(child: &mut Child, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, signal);
    let deadline = Instant::now() + Duration::from_secs(10);
    while matches!(child.try_wait(), Ok(None)) {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.wait();
}

/// Whether this process runs as root (PostgreSQL then runs as `postgres`).
pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Runs a command as the `postgres` user when root.
fn as_pg_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// The govsql binary at a path every user can execute (the SSH test
/// users run it as `remote-gate`, `runuser` runs the CLI as them): the
/// build's own when every directory above it lets others through, else a
/// copy in a world-readable directory (a clone under /root, mode 0700 on
/// Debian), removed at exit.
pub fn test_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let built = PathBuf::from(env!("CARGO_BIN_EXE_govsql"));
        let reachable = built.ancestors().skip(1).all(|d| {
            std::fs::metadata(d)
                .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o001 != 0)
                .unwrap_or(false)
        });
        if reachable || !is_root() {
            return built;
        }
        let dir =
            Path::new("/usr/local/lib/govsql-test").join(format!("bin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let copy = dir.join("govsql");
        std::fs::copy(&built, &copy).unwrap();
        std::fs::set_permissions(&copy, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        remove_at_exit(&dir);
        copy
    })
    .clone()
}

/// The cluster of this test process, started on first use.
pub fn pg() -> &'static Pg {
    PG.get_or_init(|| {
        let pg = Pg::start();
        at_exit(stop_cluster);
        pg
    })
}

/// Another cluster for this test process (a fleet spreads its databases
/// over several), stopped at exit.
pub fn extra_cluster() -> &'static Pg {
    let pg: &'static Pg = Box::leak(Box::new(Pg::start()));
    at_exit(move || pg.stop());
    pg
}

/// Stops the cluster of this test process.
fn stop_cluster() {
    if let Some(pg) = PG.get() {
        pg.stop();
    }
}

impl Pg {
    /// A new cluster (initdb, then its postmaster on a free port) with
    /// the runtime role.
    fn start() -> Pg {
        let bindir = pg_bindir();
        let dir = tempfile::Builder::new()
            .prefix("govsql-pg-")
            .tempdir()
            .unwrap()
            .keep();
        remove_at_exit(&dir);
        // The SSH test users connect through the socket in this directory.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let pg_user = nix::unistd::User::from_name("postgres")
            .unwrap()
            .expect("the postgres user exists");
        if is_root() {
            nix::unistd::chown(&dir, Some(pg_user.uid), Some(pg_user.gid)).unwrap();
        }
        let out = as_pg_user(&bindir.join("initdb"))
            .arg("-D")
            .arg(dir.join("data"))
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pg = Pg {
            dir,
            port: free_port(),
            psql: bindir.join("psql"),
            postmaster: Mutex::new(None),
        };
        pg.launch();
        pg.admin(
            "postgres",
            &format!("CREATE ROLE {RUNTIME_ROLE} LOGIN NOINHERIT"),
        );
        pg
    }

    /// Starts (again) the postmaster on its port and waits until it
    /// answers.
    pub fn launch(&self) {
        let bindir = pg_bindir();
        let pg_user = nix::unistd::User::from_name("postgres")
            .unwrap()
            .expect("the postgres user exists");
        let (dir, port) = (&self.dir, self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("log"))
            .unwrap();
        // The postmaster itself, in the foreground (no pg_ctl, no
        // daemonizing): its pid is the child's, known before it writes any
        // pid file.
        let mut cmd = Command::new(bindir.join("postgres"));
        cmd.arg("-D")
            .arg(dir.join("data"))
            .args(["-p", &port.to_string(), "-k"])
            .arg(dir)
            .args([
                "-c",
                "listen_addresses=",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "max_connections=200",
                "-c",
                "shared_preload_libraries=pg_stat_statements,auto_explain",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if is_root() {
            use std::os::unix::process::CommandExt;
            cmd.uid(pg_user.uid.as_raw()).gid(pg_user.gid.as_raw());
        }
        let child = cmd.spawn().expect("start postgres");
        {
            let mut slot = self.postmaster.lock().unwrap_or_else(|p| p.into_inner());
            assert!(slot.is_none(), "the cluster is running already");
            *slot = Some(child);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self
            .psql_as("postgres", "postgres", "SELECT 1")
            .status
            .success()
        {
            let exited = self
                .postmaster
                .lock()
                .unwrap()
                .as_mut()
                .map(|c| c.try_wait());
            assert!(
                matches!(exited, Some(Ok(None))) && Instant::now() < deadline,
                "postgres did not start: {}",
                std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the postmaster (SIGQUIT: immediate shutdown, its backends
    /// too); [`Pg::launch`] starts it again.
    pub fn stop(&self) {
        if let Some(mut child) = self
            .postmaster
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            stop_child(&mut child, nix::sys::signal::Signal::SIGQUIT);
        }
    }

    /// Runs SQL as the superuser on `db`; returns unaligned, tuples-only
    /// output. Panics on error.
    pub fn admin(&self, db: &str, sql: &str) -> String {
        let out = self.psql_as("postgres", db, sql);
        assert!(
            out.status.success(),
            "admin SQL failed: {sql}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .trim_end()
            .to_string()
    }

    /// Runs SQL as `user` on `db` (does not panic).
    /// A psql session as the admin, kept open: its stdin takes statements
    /// (e.g. a transaction that holds a lock until COMMIT is written).
    pub fn session(&self, db: &str) -> std::process::Child {
        Command::new(&self.psql)
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.dir)
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", db])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    pub fn psql_as(&self, user: &str, db: &str, sql: &str) -> Output {
        Command::new(&self.psql)
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                user,
                "-d",
                db,
                "-c",
                sql,
            ])
            .output()
            .unwrap()
    }
}

/// A test database with its own config and state directory.
pub struct TestDb {
    /// The database name.
    pub name: String,
    /// Holds the config file and state directory.
    pub dir: tempfile::TempDir,
    /// The config file.
    pub config_path: PathBuf,
    /// The parsed config.
    pub config: Config,
    /// The shipped catalog.
    pub catalog: Arc<Catalog>,
}

/// A fresh, migrated database (demo schema included).
pub async fn test_db() -> TestDb {
    test_db_with(&std::fs::read_to_string(catalog_path()).unwrap(), 10).await
}

/// A fresh database with a given catalog text and job timeout.
pub async fn test_db_with(catalog_text: &str, job_timeout_s: u64) -> TestDb {
    build_db(catalog_text, job_timeout_s, "transport = \"local\"\n").await
}

/// A fresh database whose target is reached over SSH.
pub async fn ssh_db(transport_toml: &str, job_timeout_s: u64) -> TestDb {
    let text = std::fs::read_to_string(catalog_path()).unwrap();
    build_db(&text, job_timeout_s, transport_toml).await
}

/// Whether the suite runs in session mode (the default) or per-job mode
/// (`GOVSQL_TEST_SESSION_MODE=false`): both must pass.
pub fn session_mode() -> bool {
    std::env::var("GOVSQL_TEST_SESSION_MODE").map_or(true, |v| v != "false")
}

fn db_keys(name: &str) -> String {
    format!("{}session_mode = {}\n", db_keys_base(name), session_mode())
}

fn db_keys_base(name: &str) -> String {
    let pg = pg();
    format!(
        "psql = \"{psql}\"\ndb_host = \"{host}\"\ndb_port = {port}\ndb_name = \"{name}\"\ndb_user = \"{RUNTIME_ROLE}\"\nadmin_db_user = \"postgres\"\n",
        psql = pg.psql.display(),
        host = pg.dir.display(),
        port = pg.port,
    )
}

async fn build_db(catalog_text: &str, job_timeout_s: u64, transport_toml: &str) -> TestDb {
    let db = unmigrated_db_with(catalog_text, job_timeout_s, transport_toml);
    govsql::migrate::migrate(&db.admin_executor(), &db.catalog, RUNTIME_ROLE, true)
        .await
        .expect("migrate --demo");
    db
}

/// A fresh, empty database (nothing migrated) with the shipped catalog and
/// its own config.
pub fn unmigrated_db() -> TestDb {
    let text = std::fs::read_to_string(catalog_path()).unwrap();
    unmigrated_db_with(&text, 10, "transport = \"local\"\n")
}

fn unmigrated_db_with(catalog_text: &str, job_timeout_s: u64, transport_toml: &str) -> TestDb {
    let pg = pg();
    let n = DB_SEQ.fetch_add(1, Ordering::SeqCst);
    let name = format!("t{}_{n}", std::process::id());
    pg.admin("postgres", &format!("CREATE DATABASE {name}"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("catalog.toml"), catalog_text).unwrap();
    let config_path = dir.path().join("govsql.toml");
    std::fs::write(
        &config_path,
        format!(
            "[daemon]\nstate_dir = \"state\"\ncatalog = \"catalog.toml\"\nsocket = \"govsql.sock\"\n\n[targets.main]\n{transport_toml}{db}job_timeout_s = {job_timeout_s}\n",
            db = db_keys(&name)
        ),
    )
    .unwrap();
    let config = Config::load(&config_path).unwrap();
    let catalog = Arc::new(Catalog::from_toml(catalog_text).unwrap());
    TestDb {
        name,
        dir,
        config_path,
        config,
        catalog,
    }
}

impl TestDb {
    /// A local executor of this database as the runtime role (whatever
    /// the config's transport).
    pub fn executor(&self) -> LocalExecutor {
        self.local(DbRole::Runtime)
    }

    /// A local executor of this database as the admin role (migrate).
    pub fn admin_executor(&self) -> LocalExecutor {
        self.local(DbRole::Admin)
    }

    fn local(&self, role: DbRole) -> LocalExecutor {
        let toml = format!("transport = \"local\"\n{}", db_keys(&self.name));
        LocalExecutor::new(&toml::from_str(&toml).unwrap(), role)
    }

    /// A local executor of this database as the runtime role, in session
    /// mode whatever the suite's mode, with extra target keys.
    pub fn session_executor(&self, extra: &str) -> LocalExecutor {
        let toml = format!(
            "transport = \"local\"\nsession_mode = true\n{extra}\n{}",
            db_keys_base(&self.name)
        );
        LocalExecutor::new(&toml::from_str(&toml).unwrap(), DbRole::Runtime)
    }

    /// A local executor of this database as the runtime role, in the
    /// given mode.
    pub fn executor_with_mode(&self, session: bool) -> LocalExecutor {
        let toml = format!(
            "transport = \"local\"\nsession_mode = {session}\n{}",
            db_keys_base(&self.name)
        );
        LocalExecutor::new(&toml::from_str(&toml).unwrap(), DbRole::Runtime)
    }

    /// The executor the config names (local or SSH).
    pub fn configured_executor(&self) -> Arc<dyn Executor> {
        govsql::transport::for_target(self.config.target(None).unwrap().1, DbRole::Runtime).unwrap()
    }

    /// A runtime over the configured transport.
    pub fn runtime(&self) -> Runtime {
        self.runtime_with(self.configured_executor())
    }

    /// A runtime over a given executor.
    pub fn runtime_with(&self, exec: Arc<dyn Executor>) -> Runtime {
        let (_, t) = self.config.target(None).unwrap();
        Runtime::new(
            self.catalog.clone(),
            exec,
            "main",
            ApplySwitch::new(&self.config.daemon.state_dir),
            Duration::from_secs(t.job_timeout_s),
        )
        .max_result_bytes(t.max_result_bytes)
    }

    /// Admin SQL on this database.
    pub fn sql(&self, sql: &str) -> String {
        pg().admin(&self.name, sql)
    }

    /// Opens or shuts a gate (as the admin).
    pub fn gate(&self, key: &str, open: bool) {
        self.sql(&format!(
            "UPDATE dot_config SET value = '{open}' WHERE key = '{key}'"
        ));
    }

    /// Opens every gate and the local switch.
    pub fn open_all(&self) {
        self.sql("UPDATE dot_config SET value = 'true'");
        self.switch(true);
    }

    /// Sets the local apply switch.
    pub fn switch(&self, on: bool) {
        ApplySwitch::new(&self.config.daemon.state_dir)
            .set(on)
            .unwrap();
    }

    /// Runs the built binary with this database's config.
    pub fn govsql(&self, args: &[&str]) -> Output {
        Command::new(test_bin())
            .args(args)
            .env("GOVSQL_CONFIG", &self.config_path)
            .env("GOVSQL_LOG", "debug")
            .output()
            .unwrap()
    }

    /// Ledger rows as text, one per line (for canary searches).
    pub fn ledger_text(&self) -> String {
        self.sql("SELECT r::text FROM dot_iu_command_run r ORDER BY run_id")
    }

    /// A count query.
    pub fn count(&self, from_where: &str) -> i64 {
        self.sql(&format!("SELECT count(*) FROM {from_where}"))
            .parse()
            .unwrap()
    }

    /// One ledger row's evidence.
    pub fn evidence(&self, run_id: i64) -> serde_json::Value {
        let text = self.sql(&format!(
            "SELECT evidence FROM dot_iu_command_run WHERE run_id = {run_id}"
        ));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("run {run_id}: {e}: {text}"))
    }
}

/// A job with fresh id and the test actor.
pub fn job(command: &str, mode: Mode, params: &[(&str, &str)]) -> Job {
    let params = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Job::new(
        command.to_string(),
        mode,
        "main".into(),
        Params(params),
        None,
        "tester".into(),
        0,
    )
}

/// Runs a job and returns its outcome.
pub async fn run(rt: &Runtime, command: &str, mode: Mode, params: &[(&str, &str)]) -> Outcome {
    rt.run(&job(command, mode, params)).await
}

/// The single string of a one-row, one-column jsonb result, parsed.
pub fn result_json(o: &Outcome) -> serde_json::Value {
    let rows = o.result.as_ref().expect("a result");
    assert_eq!(rows.len(), 1, "one row expected: {o:?}");
    serde_json::from_str(rows[0][0].as_deref().expect("not null")).unwrap()
}

/// A process's stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A process's stdout parsed as one JSON object (panics with both streams).
pub fn json_of(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {} / {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

/// The registry and health figures the seed's P1-P4 proof must leave.
pub fn assert_seed_figures(db: &TestDb) {
    assert_eq!(
        db.sql("SELECT command_name, total_runs, applied_runs, refused_runs, failed_runs, last_status FROM v_dot_iu_command_registry WHERE total_runs > 0 ORDER BY command_name"),
        "dot_iu_add_piece|1|0|1|0|refused\ndot_iu_healthcheck|3|1|0|0|verified"
    );
    assert_eq!(
        db.sql("SELECT total_runs, apply_runs, applied_runs, refused_runs, failed_runs, distinct_commands, catalog_size FROM v_dot_iu_command_run_health"),
        format!("4|2|1|1|0|2|{}", db.catalog.commands().len())
    );
}

/// A transaction of the admin that holds `ACCESS EXCLUSIVE` on a table of
/// a test database until [`TableLock::release`] commits it: a governed
/// job that touches the table waits inside its own transaction (so a test
/// can cut it off, freeze it or kill its daemon while it surely runs).
pub struct TableLock {
    session: std::process::Child,
}

impl TableLock {
    /// Takes the lock (returns once it is held).
    pub fn take(db: &str, table: &str) -> TableLock {
        TableLock::take_on(pg(), db, table)
    }

    /// Takes the lock on a database of another cluster.
    pub fn take_on(cluster: &Pg, db: &str, table: &str) -> TableLock {
        use std::io::{BufRead, Write};
        let mut session = cluster.session(db);
        let stdin = session.stdin.as_mut().unwrap();
        writeln!(
            stdin,
            "BEGIN;\nLOCK TABLE {table} IN ACCESS EXCLUSIVE MODE;\nSELECT 'locked';"
        )
        .unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(session.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "locked");
        TableLock { session }
    }

    /// Commits: whatever waited on the lock goes on.
    pub fn release(mut self) {
        use std::io::Write;
        let stdin = self.session.stdin.as_mut().unwrap();
        let _ = stdin.write_all(b"COMMIT;\n\\q\n");
        let _ = stdin.flush();
        let _ = self.session.wait();
    }
}

/// Polls `done` every `every` until it holds; past `within`, panics with
/// `what()` (the state that was not reached, in words). Tests wait for a
/// state this way, never for a fixed time.
pub fn wait_until(
    within: Duration,
    every: Duration,
    mut done: impl FnMut() -> bool,
    what: impl Fn() -> String,
) {
    let deadline = std::time::Instant::now() + within;
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{}", what());
        std::thread::sleep(every);
    }
}

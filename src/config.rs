//! The daemon's TOML configuration: the `[daemon]`, `[access]` and
//! `[targets.*]` tables of DESIGN.md. Unknown keys are an error, so a typo
//! in a config file never silently changes behaviour. Relative paths are
//! resolved against the config file's directory.

use indexmap::IndexMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the config lives when neither `--config` nor `GOVSQL_CONFIG` says.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/govsql/govsql.toml";

/// A configuration error; each says which file and what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config {path}: {message}")]
    Parse {
        /// The file that was parsed.
        path: PathBuf,
        /// What the TOML parser said (keys and positions, no values).
        message: String,
    },
    /// The file parsed but does not make sense.
    #[error("invalid config {path}: {message}")]
    Invalid {
        /// The file that was checked.
        path: PathBuf,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A target was asked for that the config does not define.
    #[error("no target named {name:?} in the config (known: {known})")]
    UnknownTarget {
        /// The requested target.
        name: String,
        /// The targets the config has.
        known: String,
    },
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The `[daemon]` table.
    pub daemon: DaemonConfig,
    /// The `[access]` table: who may plan, apply, verify and approve.
    #[serde(default)]
    pub access: AccessConfig,
    /// The `[targets.NAME]` tables, in the config's order (a fleet's
    /// order: `--targets` selections keep it).
    #[serde(default)]
    pub targets: IndexMap<String, TargetConfig>,
}

/// The `[daemon]` table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// The Unix socket the daemon listens on and clients connect to.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Queue, lock file and the local apply switch live here.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The command catalog (TOML).
    #[serde(default = "default_catalog")]
    pub catalog: PathBuf,
    /// How long an approval stays valid.
    #[serde(default = "default_approval_ttl")]
    pub approval_ttl_s: u64,
    /// The target used when a job names none.
    #[serde(default)]
    pub default_target: Option<String>,
    /// Octal mode of the socket file.
    #[serde(default)]
    pub socket_mode: Option<String>,
    /// Group that owns the socket file.
    #[serde(default)]
    pub socket_group: Option<String>,
    /// Turn the local apply switch off at any failed apply (the seed's
    /// STOP condition: re-arm the kill switch).
    #[serde(default)]
    pub disarm_on_failure: bool,
    /// Terminal jobs are pruned from the queue after this many days.
    #[serde(default = "default_retention_days")]
    pub retention_days: u64,
    /// How long a job's result stays in the queue for its submitter
    /// (`status JOB`, `wait JOB`); 0 keeps none. Erased (and the pages
    /// scrubbed) when it expires.
    #[serde(default = "default_result_ttl")]
    pub result_ttl_s: u64,
    /// Serve the metrics over HTTP on this loopback address (off when
    /// unset), e.g. "127.0.0.1:9187".
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// Open SSH connections across all targets at most (idle ones close
    /// first when another target needs one); each target's
    /// `max_channels` still holds.
    #[serde(default = "default_max_ssh_connections")]
    pub max_ssh_connections: usize,
}

/// The `[access]` table. Entries are unix user names, `@group`, or `*`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    /// May submit plan jobs.
    #[serde(default)]
    pub plan: Vec<String>,
    /// May submit apply jobs.
    #[serde(default)]
    pub apply: Vec<String>,
    /// May submit verify jobs.
    #[serde(default)]
    pub verify: Vec<String>,
    /// May approve jobs that need approval.
    #[serde(default)]
    pub approve: Vec<String>,
    /// May see every job (others see their own, approvers the ones
    /// waiting for approval); root always may.
    #[serde(default)]
    pub admin: Vec<String>,
}

/// How a target is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// psql over one persistent SSH session.
    Ssh,
    /// psql spawned on this host.
    Local,
}

/// One `[targets.NAME]` table: a PostgreSQL database and how to reach it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// SSH or local.
    pub transport: TransportKind,
    /// Tags a `--targets tag:NAME` selector picks it by
    /// ([`crate::fleet`]).
    #[serde(default)]
    pub tags: Vec<String>,
    /// SSH server host name or address.
    #[serde(default)]
    pub ssh_host: Option<String>,
    /// SSH server port.
    #[serde(default = "default_ssh_port")]
    pub ssh_port: u16,
    /// SSH user.
    #[serde(default)]
    pub ssh_user: Option<String>,
    /// Private key file; without it, ssh-agent through SSH_AUTH_SOCK.
    #[serde(default)]
    pub identity_file: Option<PathBuf>,
    /// File holding the identity's passphrase.
    #[serde(default)]
    pub identity_passphrase_file: Option<PathBuf>,
    /// OpenSSH known_hosts file the server key must match.
    #[serde(default)]
    pub known_hosts: Option<PathBuf>,
    /// Or a pinned `SHA256:…` fingerprint.
    #[serde(default)]
    pub host_key: Option<String>,
    /// Non-empty: run psql through `docker exec -i CONTAINER`.
    #[serde(default)]
    pub container: Option<String>,
    /// The psql binary on the database host.
    #[serde(default = "default_psql")]
    pub psql: String,
    /// `-h` for psql: a socket directory or host name.
    #[serde(default)]
    pub db_host: Option<String>,
    /// `-p` for psql.
    #[serde(default = "default_db_port")]
    pub db_port: u16,
    /// `-d` for psql.
    pub db_name: String,
    /// The runtime role (`-U` for jobs).
    pub db_user: String,
    /// The admin role, used by `govsql migrate` only.
    #[serde(default = "default_admin_db_user")]
    pub admin_db_user: String,
    /// Concurrent jobs (SSH channels) on this target.
    #[serde(default = "default_max_channels")]
    pub max_channels: usize,
    /// Per-job deadline.
    #[serde(default = "default_job_timeout")]
    pub job_timeout_s: u64,
    /// SSH keepalive interval.
    #[serde(default = "default_keepalive_interval")]
    pub keepalive_interval_s: u64,
    /// Missed keepalives before the session counts as dead.
    #[serde(default = "default_keepalive_max")]
    pub keepalive_max: usize,
    /// SSH user for `migrate` (defaults to ssh_user).
    #[serde(default)]
    pub admin_ssh_user: Option<String>,
    /// SSH identity for `migrate` (defaults to identity_file).
    #[serde(default)]
    pub admin_identity_file: Option<PathBuf>,
    /// The largest result a job may return; over it the job fails with
    /// `result_too_large` (rolled back, nothing truncated).
    #[serde(default = "default_max_result_bytes")]
    pub max_result_bytes: u64,
    /// How long a job in which nothing ran waits for its target (retried
    /// with backoff) before it fails.
    #[serde(default = "default_max_target_wait")]
    pub max_target_wait_s: u64,
    /// Let applies run although a param value could reach the server log
    /// (default false: such applies are refused with `log_exposure`).
    #[serde(default)]
    pub allow_server_log_exposure: bool,
    /// Session mode (default on): each channel keeps one psql running and
    /// jobs are streamed to it one after another; off, one psql per job.
    #[serde(default = "default_true")]
    pub session_mode: bool,
    /// A warm session unused this long is closed.
    #[serde(default = "default_session_idle")]
    pub session_idle_s: u64,
    /// A session is replaced after this many jobs.
    #[serde(default = "default_session_max_jobs")]
    pub session_max_jobs: u64,
}

fn default_socket() -> PathBuf {
    PathBuf::from("/run/govsql/govsql.sock")
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/govsql")
}
fn default_catalog() -> PathBuf {
    PathBuf::from("catalog.toml")
}
fn default_approval_ttl() -> u64 {
    86_400
}
fn default_ssh_port() -> u16 {
    22
}
fn default_psql() -> String {
    "psql".to_string()
}
fn default_db_port() -> u16 {
    5432
}
fn default_admin_db_user() -> String {
    "postgres".to_string()
}
fn default_result_ttl() -> u64 {
    3600
}
fn default_true() -> bool {
    true
}
fn default_session_idle() -> u64 {
    300
}
fn default_session_max_jobs() -> u64 {
    10_000
}
fn default_max_channels() -> usize {
    7
}
fn default_job_timeout() -> u64 {
    60
}
/// The default `max_result_bytes`: 16 MiB.
pub const DEFAULT_MAX_RESULT_BYTES: u64 = 16 * 1024 * 1024;
fn default_max_result_bytes() -> u64 {
    DEFAULT_MAX_RESULT_BYTES
}
fn default_retention_days() -> u64 {
    30
}
fn default_max_ssh_connections() -> usize {
    64
}
fn default_max_target_wait() -> u64 {
    600
}
fn default_keepalive_interval() -> u64 {
    15
}
fn default_keepalive_max() -> usize {
    3
}

impl Config {
    /// The config path: `--config`, else `GOVSQL_CONFIG`, else the default.
    pub fn resolve_path(explicit: Option<&Path>) -> PathBuf {
        if let Some(p) = explicit {
            return p.to_path_buf();
        }
        match std::env::var_os("GOVSQL_CONFIG") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => PathBuf::from(DEFAULT_CONFIG_PATH),
        }
    }

    /// Reads, parses and checks a config file.
    /// What in `new` a running daemon cannot take without a restart: the
    /// socket, state directory, socket mode and group, metrics listener,
    /// the set of targets and how each is reached. Access lists, approval
    /// and retention settings, the catalog and each target's job timeout,
    /// result limit, target wait and log-exposure setting reload live.
    pub fn restart_needed(&self, new: &Config) -> Vec<String> {
        let (a, b) = (&self.daemon, &new.daemon);
        let mut keys: Vec<String> = [
            ("socket", a.socket != b.socket),
            ("state_dir", a.state_dir != b.state_dir),
            ("socket_mode", a.socket_mode != b.socket_mode),
            ("socket_group", a.socket_group != b.socket_group),
            ("metrics_listen", a.metrics_listen != b.metrics_listen),
            (
                "max_ssh_connections",
                a.max_ssh_connections != b.max_ssh_connections,
            ),
        ]
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(k, _)| format!("[daemon] {k}"))
        .collect();
        let names = |c: &Config| c.targets.keys().cloned().collect::<Vec<_>>();
        if names(self) != names(new) {
            keys.push("the set of [targets]".into());
            return keys;
        }
        for (name, old) in &self.targets {
            let mut tuned = new.targets[name].clone();
            tuned.job_timeout_s = old.job_timeout_s;
            tuned.max_result_bytes = old.max_result_bytes;
            tuned.max_target_wait_s = old.max_target_wait_s;
            tuned.allow_server_log_exposure = old.allow_server_log_exposure;
            if tuned != *old {
                keys.push(format!("[targets.{name}] connection settings"));
            }
        }
        keys
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config: Config = toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
            ConfigError::Parse {
                path: path.to_path_buf(),
                message: match line {
                    Some(n) => format!("line {n}: {}", e.message()),
                    None => e.message().to_string(),
                },
            }
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_relative(base);
        config.check().map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(config)
    }

    fn resolve_relative(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.daemon.socket);
        fix(&mut self.daemon.state_dir);
        fix(&mut self.daemon.catalog);
        for t in self.targets.values_mut() {
            for p in [
                &mut t.identity_file,
                &mut t.identity_passphrase_file,
                &mut t.known_hosts,
                &mut t.admin_identity_file,
            ]
            .into_iter()
            .flatten()
            {
                fix(p);
            }
        }
    }

    fn check(&self) -> Result<(), String> {
        self.daemon.check()?;
        if self.targets.is_empty() {
            return Err("no [targets.NAME] table: define at least one target".into());
        }
        if let Some(d) = &self.daemon.default_target {
            if !self.targets.contains_key(d) {
                return Err(format!("default_target {d:?} is not a defined target"));
            }
        }
        for (name, t) in &self.targets {
            if !crate::fleet::valid_tag(name) || name == "all" {
                return Err(format!(
                    "[targets.{name}]: a target name is 1-64 of a-z A-Z 0-9 _ - and not `all` (a --targets selector names it)"
                ));
            }
            t.check().map_err(|m| format!("[targets.{name}]: {m}"))?;
        }
        Ok(())
    }

    /// The target a job runs on: the named one, else the default.
    pub fn target(&self, name: Option<&str>) -> Result<(&str, &TargetConfig), ConfigError> {
        let wanted = match name.or(self.daemon.default_target.as_deref()) {
            Some(n) => n,
            None if self.targets.len() == 1 => {
                self.targets.keys().next().map(String::as_str).unwrap_or("")
            }
            None => {
                return Err(ConfigError::UnknownTarget {
                    name: "(none given, and no default_target)".into(),
                    known: self.known_targets(),
                })
            }
        };
        self.targets
            .get_key_value(wanted)
            .map(|(k, v)| (k.as_str(), v))
            .ok_or_else(|| ConfigError::UnknownTarget {
                name: wanted.to_string(),
                known: self.known_targets(),
            })
    }

    fn known_targets(&self) -> String {
        self.targets.keys().cloned().collect::<Vec<_>>().join(", ")
    }
}

impl DaemonConfig {
    fn check(&self) -> Result<(), String> {
        if self.approval_ttl_s == 0 {
            return Err("[daemon] approval_ttl_s must be at least 1".into());
        }
        if self.max_ssh_connections == 0 {
            return Err("[daemon] max_ssh_connections must be at least 1".into());
        }
        self.socket_mode()?;
        if let Some(addr) = &self.metrics_listen {
            let parsed: std::net::SocketAddr = addr.parse().map_err(|_| {
                format!("[daemon] metrics_listen {addr:?} is not an address:port such as \"127.0.0.1:9187\"")
            })?;
            if !parsed.ip().is_loopback() {
                return Err(format!(
                    "[daemon] metrics_listen {addr:?} is not a loopback address; the metrics are served on loopback only (scrape them through node_exporter's textfile collector from other hosts)"
                ));
            }
        }
        Ok(())
    }

    /// The socket file's mode: `socket_mode` as octal (`"0660"`, `"0o660"`),
    /// default 0660.
    pub fn socket_mode(&self) -> Result<u32, String> {
        let Some(text) = self.socket_mode.as_deref() else {
            return Ok(0o660);
        };
        u32::from_str_radix(text.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                format!("[daemon] socket_mode {text:?} is not an octal file mode such as \"0660\"")
            })
    }
}

/// The most channels (concurrent jobs) one target may have.
pub const MAX_CHANNELS: usize = 64;

impl TargetConfig {
    fn check(&self) -> Result<(), String> {
        if let Some(t) = self.tags.iter().find(|t| !crate::fleet::valid_tag(t)) {
            return Err(format!("tag {t:?} is not 1-64 of a-z A-Z 0-9 _ -"));
        }
        if !(1..=MAX_CHANNELS).contains(&self.max_channels) {
            return Err(format!(
                "max_channels must be between 1 and {MAX_CHANNELS} (and at most the server's MaxSessions - 3)"
            ));
        }
        for (key, value) in [
            ("job_timeout_s", self.job_timeout_s),
            ("keepalive_interval_s", self.keepalive_interval_s),
            ("keepalive_max", self.keepalive_max as u64),
            ("session_idle_s", self.session_idle_s),
            ("session_max_jobs", self.session_max_jobs),
        ] {
            if value == 0 {
                return Err(format!("{key} must be at least 1"));
            }
        }
        match self.transport {
            TransportKind::Local => {
                let ssh_only = [
                    ("ssh_host", self.ssh_host.is_some()),
                    ("ssh_user", self.ssh_user.is_some()),
                    ("identity_file", self.identity_file.is_some()),
                    ("known_hosts", self.known_hosts.is_some()),
                    ("host_key", self.host_key.is_some()),
                    (
                        "container",
                        self.container.as_deref().is_some_and(|c| !c.is_empty()),
                    ),
                ];
                if let Some((key, _)) = ssh_only.iter().find(|(_, set)| *set) {
                    return Err(format!(
                        "{key} is an SSH setting; remove it for transport = \"local\""
                    ));
                }
            }
            TransportKind::Ssh => {
                if self.ssh_host.is_none() || self.ssh_user.is_none() {
                    return Err("transport = \"ssh\" needs ssh_host and ssh_user".into());
                }
                if self.known_hosts.is_none() && self.host_key.is_none() {
                    return Err(
                        "transport = \"ssh\" needs known_hosts or a pinned host_key = \"SHA256:…\"; there is no accept-anything mode"
                            .into(),
                    );
                }
            }
        }
        Ok(())
    }

    /// The per-job deadline.
    pub fn job_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.job_timeout_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("govsql.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path)
    }

    const LOCAL: &str = r#"
[daemon]
state_dir = "state"
[targets.main]
transport = "local"
db_name = "iu_core"
db_user = "govsql_runtime"
"#;

    #[test]
    fn minimal_local_config_loads_with_defaults_and_relative_paths() {
        let c = parse(LOCAL).unwrap();
        let (name, t) = c.target(None).unwrap();
        assert_eq!(name, "main");
        assert_eq!(t.max_channels, 7);
        assert_eq!(t.job_timeout_s, 60);
        assert!(c.daemon.state_dir.is_absolute());
        assert!(c.daemon.catalog.ends_with("catalog.toml"));
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/govsql.toml");
        let c = Config::load(&path).unwrap();
        let (_, t) = c.target(None).unwrap();
        assert_eq!(t.transport, TransportKind::Ssh);
        assert!(t.max_channels <= 7);
    }

    #[test]
    fn unknown_key_is_an_error_named_with_its_line() {
        let err = parse(&format!("{LOCAL}\nfrobnicate = 1\n")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("frobnicate") && msg.contains("line 9"),
            "{msg}"
        );
    }

    #[test]
    fn out_of_range_settings_are_refused_when_the_config_loads() {
        for (extra, key) in [
            ("max_channels = 4611686018427387904", "max_channels"),
            ("max_channels = 0", "max_channels"),
            ("max_channels = 65", "max_channels"),
            ("job_timeout_s = 0", "job_timeout_s"),
            ("keepalive_max = 0", "keepalive_max"),
        ] {
            let err = parse(&format!("{LOCAL}{extra}\n")).unwrap_err().to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
        let text = LOCAL.replace("[daemon]\n", "[daemon]\nsocket_mode = \"0999\"\n");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("socket_mode"), "{err}");
        for bad in ["0.0.0.0:9187", "localhost", "10.0.0.1:1"] {
            let text = LOCAL.replace(
                "[daemon]\n",
                &format!("[daemon]\nmetrics_listen = \"{bad}\"\n"),
            );
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains("metrics_listen"), "{err}");
        }
        let ok = LOCAL.replace("[daemon]\n", "[daemon]\nsocket_mode = \"0o640\"\n");
        assert_eq!(parse(&ok).unwrap().daemon.socket_mode(), Ok(0o640));
    }

    #[test]
    fn ssh_key_on_local_target_is_an_error() {
        let err = parse(&format!("{LOCAL}ssh_host = \"db1\"\n")).unwrap_err();
        assert!(err.to_string().contains("ssh_host"), "{err}");
    }

    #[test]
    fn ssh_target_without_host_key_policy_is_refused() {
        let text = r#"
[daemon]
[targets.main]
transport = "ssh"
ssh_host = "db1"
ssh_user = "govsql"
db_name = "iu_core"
db_user = "govsql_runtime"
"#;
        let err = parse(text).unwrap_err();
        assert!(err.to_string().contains("known_hosts"), "{err}");
    }

    #[test]
    fn unknown_target_names_the_known_ones() {
        let c = parse(LOCAL).unwrap();
        let err = c.target(Some("other")).unwrap_err();
        assert!(err.to_string().contains("main"), "{err}");
    }
}

//! The SSH executor: one persistent russh session per target; each channel
//! runs the psql command line as ONE shell-quoted string, with scripts on
//! its stdin: one job then EOF (per-job mode), or job after job (session
//! mode, see [`super::session`]).
//!
//! Host keys fail closed: the server key must match the known_hosts file
//! (hashed entries and `[host]:port` included) or the pinned fingerprint,
//! checked before authentication; an unknown or changed key is refused with
//! the fingerprint offered and where to pin it. A dead session is noticed
//! (keepalive, closed handle) and re-established with exponential backoff
//! and jitter; a refused channel open (sshd frees session slots late) is
//! retried the same way. Every channel is drained to its close, even when
//! the job that opened it was abandoned at its deadline.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use rand::Rng;
use russh::client::{self, Handle};
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::ChannelMsg;
use tokio::sync::{mpsc, oneshot, Mutex, Semaphore};

use super::cap::{self, ConnectionCap};
use super::session::{Event, Input, Launch, Process};
use super::{BoxFuture, Executor, Exit, Runner, ScriptOutput, ScriptRequest, TransportError};
use crate::config::TargetConfig;
use crate::psql::{command_line, command_words, DbRole};

/// How the server's host key is trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyPolicy {
    /// The key must match an entry of this OpenSSH known_hosts file.
    KnownHosts(PathBuf),
    /// The key's SHA256 fingerprint must be exactly this.
    Pinned(String),
}

/// How the client authenticates.
#[derive(Clone)]
pub enum Identity {
    /// A private key, read and decrypted once when the executor is built.
    Key {
        /// The key file it came from (for messages).
        path: PathBuf,
        /// The decrypted key.
        key: Arc<PrivateKey>,
    },
    /// ssh-agent through SSH_AUTH_SOCK.
    Agent,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Key { path, .. } => write!(f, "Key({})", path.display()),
            Identity::Agent => f.write_str("Agent"),
        }
    }
}

/// Everything needed to open a session.
#[derive(Debug, Clone)]
pub struct SshSettings {
    /// Server host.
    pub host: String,
    /// Server port.
    pub port: u16,
    /// SSH user.
    pub user: String,
    /// Key file or agent.
    pub identity: Identity,
    /// Host key trust.
    pub host_key: HostKeyPolicy,
    /// Keepalive interval.
    pub keepalive_interval: Duration,
    /// Missed keepalives before the session is dead.
    pub keepalive_max: usize,
}

impl SshSettings {
    /// Settings of a target for a database role (the admin role uses
    /// migrate's own user and identity when they are set); a key file is
    /// read and decrypted here.
    pub fn from_target(t: &TargetConfig, role: DbRole) -> Result<SshSettings, TransportError> {
        let admin = role == DbRole::Admin;
        let missing =
            |k: &str| TransportError::Unreachable(format!("{k} is not set for this SSH target"));
        let user = if admin {
            t.admin_ssh_user.clone().or_else(|| t.ssh_user.clone())
        } else {
            t.ssh_user.clone()
        };
        let key = if admin {
            t.admin_identity_file
                .clone()
                .or_else(|| t.identity_file.clone())
        } else {
            t.identity_file.clone()
        };
        let user = user.ok_or_else(|| missing("ssh_user"))?;
        let host = t.ssh_host.clone().ok_or_else(|| missing("ssh_host"))?;
        let identity = match key {
            Some(path) => {
                let passphrase = read_passphrase(t.identity_passphrase_file.as_deref())?;
                let key = russh::keys::load_secret_key(&path, passphrase.as_deref()).map_err(|e| {
                    TransportError::Auth(format!(
                        "SSH authentication as {user} on {host}:{} cannot start: cannot load the key {}: {e} (is identity_passphrase_file or GOVSQL_SSH_PASSPHRASE right?)",
                        t.ssh_port,
                        path.display()
                    ))
                })?;
                Identity::Key {
                    path,
                    key: Arc::new(key),
                }
            }
            None => Identity::Agent,
        };
        let host_key = match (&t.host_key, &t.known_hosts) {
            (Some(fp), _) => HostKeyPolicy::Pinned(fp.clone()),
            (None, Some(path)) => HostKeyPolicy::KnownHosts(path.clone()),
            (None, None) => return Err(missing("known_hosts or host_key")),
        };
        Ok(SshSettings {
            host,
            port: t.ssh_port,
            user,
            identity,
            host_key,
            keepalive_interval: Duration::from_secs(t.keepalive_interval_s.max(1)),
            keepalive_max: t.keepalive_max.max(1),
        })
    }
}

/// What the host-key check saw (the handler runs inside russh).
#[derive(Debug, Clone, Default)]
struct HostKeySeen {
    fingerprint: Option<String>,
    refusal: Option<String>,
}

/// The russh client handler: the host-key check.
struct Client {
    settings: Arc<SshSettings>,
    seen: Arc<StdMutex<HostKeySeen>>,
}

impl client::Handler for Client {
    type Error = russh::Error;

    // The server may not open channels toward govsql: agent, X11,
    // forwarding and session requests are refused (dropping the reply
    // rejects), so a hostile server cannot make the client hold them.
    async fn server_channel_open_agent_forward(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_channel("agent forwarding", reply);
        Ok(())
    }

    async fn server_channel_open_session(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_channel("session", reply);
        Ok(())
    }

    async fn server_channel_open_x11(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_channel("X11", reply);
        Ok(())
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _connected_address: &str,
        _connected_port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_channel("forwarded tcpip", reply);
        Ok(())
    }

    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_channel("forwarded streamlocal", reply);
        Ok(())
    }

    async fn server_channel_open_direct_tcpip(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _host_to_connect: &str,
        _port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_channel("direct tcpip", reply);
        Ok(())
    }

    async fn server_channel_open_direct_streamlocal(
        &mut self,
        _channel: russh::Channel<client::Msg>,
        _socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_channel("direct streamlocal", reply);
        Ok(())
    }

    async fn check_server_key(
        &mut self,
        offered: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let s = &self.settings;
        let verdict: Result<String, String> = match offered {
            PublicKeyOrCertificate::Certificate(_) => {
                Err("the server offered a certificate; govsql trusts plain host keys only".into())
            }
            PublicKeyOrCertificate::PublicKey { key, .. } => {
                let fp = key.fingerprint(HashAlg::Sha256).to_string();
                let where_ = format!("{}:{}", s.host, s.port);
                match &s.host_key {
                    HostKeyPolicy::Pinned(pin) if *pin == fp => Ok(fp),
                    HostKeyPolicy::Pinned(pin) => Err(format!(
                        "{where_} offered host key {fp}, but host_key pins {pin}; if the server's key really changed, set host_key = \"{fp}\""
                    )),
                    HostKeyPolicy::KnownHosts(path) => match russh::keys::check_known_hosts_path(&s.host, s.port, key, path) {
                        Ok(true) => Ok(fp),
                        Ok(false) => Err(format!(
                            "{where_} offered host key {fp}, which is not in {}; if it is the right key, add it (ssh-keyscan -p {} {} >> {}) or pin host_key = \"{fp}\"",
                            path.display(),
                            s.port,
                            s.host,
                            path.display()
                        )),
                        Err(russh::keys::Error::KeyChanged { line }) => Err(format!(
                            "{where_} offered host key {fp}, which DIFFERS from line {line} of {}: possible man-in-the-middle; nothing was sent",
                            path.display()
                        )),
                        Err(e) => Err(format!("cannot check {}: {e}", path.display())),
                    },
                }
            }
        };
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        match verdict {
            Ok(fp) => {
                seen.fingerprint = Some(fp);
                seen.refusal = None;
                Ok(true)
            }
            Err(why) => {
                seen.refusal = Some(why);
                Ok(false)
            }
        }
    }
}

/// Rejects a channel the server tried to open (dropping the handle sends
/// the rejection).
fn refuse_channel(kind: &str, reply: client::ChannelOpenHandle) {
    tracing::warn!(
        kind,
        "the SSH server tried to open a channel toward govsql; refused"
    );
    drop(reply);
}

/// A live session and the fingerprint it was accepted with.
struct Live {
    handle: Arc<Handle<Client>>,
    /// Its place under the daemon's connection cap, given back with it.
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Reconnect bookkeeping.
#[derive(Default)]
struct SessionSlot {
    live: Option<Live>,
    failures: u32,
}

/// The SSH executor of one target: its link (the session, channels) and
/// how scripts run over it (per job or warm sessions).
pub struct SshExecutor {
    link: Arc<SshLink>,
    runner: Runner,
    /// The script format the host's remote-gate announced (0: none seen).
    gate_format: std::sync::atomic::AtomicU32,
}

/// One target's SSH session and its channel slots.
struct SshLink {
    up: AtomicBool,
    connects: AtomicU64,
    connect_failures: AtomicU64,
    channel_open_failures: AtomicU64,
    settings: Arc<SshSettings>,
    config: Arc<client::Config>,
    cmd: String,
    slot: Mutex<SessionSlot>,
    channels: Arc<Semaphore>,
    /// The channels for operators' reads (`govsql log`), beside the jobs'.
    reads: Arc<Semaphore>,
    seen: Arc<StdMutex<HostKeySeen>>,
    /// The daemon's cap on open connections, if any.
    cap: Option<Arc<ConnectionCap>>,
    /// Held (shared) by every job and read while it runs; the cap closes
    /// the connection only when it can take it alone.
    usage: tokio::sync::RwLock<()>,
    /// When a job or read last used the connection ([`cap::now_ms`]).
    last_used: AtomicU64,
}

const MAX_ATTEMPTS: u32 = 6;

/// Channels for operators' reads per target, beside `max_channels`.
pub const READ_CHANNELS: usize = 1;

/// How long an abandoned channel waits for the server's Close before its
/// slot is given back anyway.
const CLOSE_GRACE: Duration = Duration::from_millis(500);

impl SshExecutor {
    /// An executor for `target` whose scripts run as `role`.
    pub fn new(target: &TargetConfig, role: DbRole) -> Result<SshExecutor, TransportError> {
        let link = Arc::new(SshLink::new(target, role)?);
        Ok(SshExecutor {
            runner: Runner::new(link.clone(), target, role),
            link,
            gate_format: std::sync::atomic::AtomicU32::new(0),
        })
    }

    /// An executor whose connection counts against the daemon's `cap`
    /// (closed while idle when another target needs the room).
    pub fn with_cap(
        target: &TargetConfig,
        role: DbRole,
        cap: &Arc<ConnectionCap>,
    ) -> Result<Arc<SshExecutor>, TransportError> {
        let mut link = SshLink::new(target, role)?;
        link.cap = Some(cap.clone());
        let link = Arc::new(link);
        let exec = Arc::new(SshExecutor {
            runner: Runner::new(link.clone(), target, role),
            link,
            gate_format: std::sync::atomic::AtomicU32::new(0),
        });
        let weak: std::sync::Weak<dyn cap::Idle> = Arc::downgrade(&exec) as _;
        cap.register(weak);
        Ok(exec)
    }

    /// Notes a use of the connection (the cap closes the one used
    /// longest ago first).
    fn touch(&self) {
        self.link.last_used.store(cap::now_ms(), Ordering::Relaxed);
    }

    /// How scripts are run (session mode's pool, for tests).
    pub fn runner(&self) -> &Runner {
        &self.runner
    }
}

impl SshLink {
    fn new(target: &TargetConfig, role: DbRole) -> Result<SshLink, TransportError> {
        let settings = Arc::new(SshSettings::from_target(target, role)?);
        let config = client::Config {
            nodelay: true,
            inactivity_timeout: None,
            keepalive_interval: Some(settings.keepalive_interval),
            keepalive_max: settings.keepalive_max,
            ..Default::default()
        };
        Ok(SshLink {
            up: AtomicBool::new(false),
            connects: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            channel_open_failures: AtomicU64::new(0),
            settings,
            config: Arc::new(config),
            cmd: command_line(&command_words(target, role)),
            slot: Mutex::new(SessionSlot::default()),
            channels: Arc::new(Semaphore::new(target.max_channels)),
            reads: Arc::new(Semaphore::new(READ_CHANNELS)),
            seen: Arc::new(StdMutex::new(HostKeySeen::default())),
            cap: None,
            usage: tokio::sync::RwLock::new(()),
            last_used: AtomicU64::new(0),
        })
    }

    /// The current session, connecting (with backoff) if there is none or
    /// it died.
    async fn session(&self) -> Result<Arc<Handle<Client>>, TransportError> {
        let mut slot = self.slot.lock().await;
        if let Some(live) = &slot.live {
            if !live.handle.is_closed() {
                return Ok(live.handle.clone());
            }
            tracing::warn!(host = %self.settings.host, "SSH session is closed; reconnecting");
            self.up.store(false, Ordering::Relaxed);
            slot.live = None;
        }
        // A place under the daemon's cap first (an idle connection of
        // another target may close for it).
        let mut permit = match &self.cap {
            Some(cap) => Some(cap.acquire().await),
            None => None,
        };
        loop {
            match self.connect().await {
                Ok(handle) => {
                    self.connects.fetch_add(1, Ordering::Relaxed);
                    self.up.store(true, Ordering::Relaxed);
                    slot.failures = 0;
                    let handle = Arc::new(handle);
                    slot.live = Some(Live {
                        handle: handle.clone(),
                        _permit: permit.take(),
                    });
                    return Ok(handle);
                }
                Err(e @ (TransportError::HostKey(_) | TransportError::Auth(_))) => {
                    self.connect_failures.fetch_add(1, Ordering::Relaxed);
                    return Err(e);
                }
                Err(e) => {
                    self.connect_failures.fetch_add(1, Ordering::Relaxed);
                    slot.failures += 1;
                    if slot.failures >= MAX_ATTEMPTS {
                        slot.failures = MAX_ATTEMPTS - 1;
                        return Err(e);
                    }
                    let wait = backoff(slot.failures);
                    tracing::warn!(host = %self.settings.host, cause = %e, wait_ms = wait.as_millis() as u64, "SSH connect failed; backing off");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn connect(&self) -> Result<Handle<Client>, TransportError> {
        let s = &self.settings;
        let client = Client {
            settings: s.clone(),
            seen: self.seen.clone(),
        };
        let addr = (s.host.as_str(), s.port);
        let mut handle = match client::connect(self.config.clone(), addr, client).await {
            Ok(h) => h,
            Err(e) => {
                let refusal = self
                    .seen
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .refusal
                    .take();
                return Err(match refusal {
                    Some(why) => TransportError::HostKey(why),
                    None => TransportError::Unreachable(format!(
                        "cannot connect to {}:{}: {e}",
                        s.host, s.port
                    )),
                });
            }
        };
        self.authenticate(&mut handle).await?;
        tracing::info!(host = %s.host, port = s.port, user = %s.user, "SSH session established");
        Ok(handle)
    }

    async fn authenticate(&self, handle: &mut Handle<Client>) -> Result<(), TransportError> {
        let s = &self.settings;
        let fail = |tried: &str, detail: String| {
            TransportError::Auth(format!(
                "SSH authentication as {} on {}:{} failed; tried {tried}: {detail}",
                s.user, s.host, s.port
            ))
        };
        match &s.identity {
            Identity::Key { path, key } => {
                let hash = if key.algorithm().is_rsa() {
                    handle
                        .best_supported_rsa_hash()
                        .await
                        .ok()
                        .flatten()
                        .flatten()
                        .or(Some(HashAlg::Sha256))
                } else {
                    None
                };
                let algo = key.algorithm().to_string();
                let res = handle
                    .authenticate_publickey(&s.user, PrivateKeyWithHashAlg::new(key.clone(), hash))
                    .await
                    .map_err(|e| {
                        TransportError::Unreachable(format!("SSH authentication broke: {e}"))
                    })?;
                if res.success() {
                    Ok(())
                } else {
                    Err(fail(
                        &format!("publickey {algo} ({})", path.display()),
                        "the server refused the key".into(),
                    ))
                }
            }
            Identity::Agent => {
                let mut agent = russh::keys::agent::client::AgentClient::connect_env()
                    .await
                    .map_err(|e| {
                        fail(
                            "ssh-agent",
                            format!("cannot reach the agent through SSH_AUTH_SOCK: {e}"),
                        )
                    })?;
                let ids = agent
                    .request_identities()
                    .await
                    .map_err(|e| fail("ssh-agent", format!("agent did not list keys: {e}")))?;
                let mut tried = 0;
                for id in ids {
                    let russh::keys::agent::AgentIdentity::PublicKey { key, .. } = id else {
                        continue;
                    };
                    tried += 1;
                    let hash = if key.algorithm().is_rsa() {
                        Some(HashAlg::Sha256)
                    } else {
                        None
                    };
                    if let Ok(r) = handle
                        .authenticate_publickey_with(&s.user, key, hash, &mut agent)
                        .await
                    {
                        if r.success() {
                            return Ok(());
                        }
                    }
                }
                Err(fail(
                    "ssh-agent",
                    format!("none of its {tried} key(s) was accepted"),
                ))
            }
        }
    }

    /// Opens a channel, retrying a refused open and a dead session.
    async fn open_channel(&self) -> Result<russh::Channel<client::Msg>, TransportError> {
        let mut attempt = 0;
        loop {
            let handle = self.session().await?;
            match handle.channel_open_session().await {
                Ok(ch) => return Ok(ch),
                Err(e) => {
                    self.channel_open_failures.fetch_add(1, Ordering::Relaxed);
                    attempt += 1;
                    if attempt >= MAX_ATTEMPTS {
                        return Err(TransportError::Unreachable(format!(
                            "cannot open an SSH channel: {e}"
                        )));
                    }
                    if handle.is_closed() {
                        let mut slot = self.slot.lock().await;
                        if slot
                            .live
                            .as_ref()
                            .is_some_and(|l| Arc::ptr_eq(&l.handle, &handle))
                        {
                            self.up.store(false, Ordering::Relaxed);
                            slot.live = None;
                        }
                    }
                    tracing::debug!(cause = %e, attempt, "channel open refused; retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                }
            }
        }
    }

    /// Opens a channel running the psql command: a slot of `budget`
    /// first (held until the channel is gone), then the channel, then exec.
    async fn start(&self, budget: &Arc<Semaphore>) -> Result<Process, TransportError> {
        let permit = budget
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| TransportError::Unreachable("executor closed".into()))?;
        let channel = self.open_channel().await?;
        channel
            .exec(true, self.cmd.clone().into_bytes())
            .await
            .map_err(|e| TransportError::Unreachable(format!("SSH channel exec failed: {e}")))?;
        let (rd, wr) = channel.split();
        let wr = Arc::new(wr);
        let (tx, rx) = mpsc::channel(64);
        let (stop_tx, stop_rx) = oneshot::channel();
        // The channel is drained in its own task to its close, even when
        // the job that opened it was abandoned at its deadline.
        tokio::spawn(drive_channel(rd, wr.clone(), tx, stop_rx, permit));
        Ok(Process {
            input: Box::new(ChannelInput(wr)),
            events: rx,
            stop: stop_tx,
        })
    }
}

impl Launch for SshLink {
    fn launch(&self) -> BoxFuture<'_, Result<Process, TransportError>> {
        Box::pin(self.start(&self.channels))
    }

    fn launch_read(&self) -> BoxFuture<'_, Result<Process, TransportError>> {
        Box::pin(self.start(&self.reads))
    }
}

type WriteHalf = russh::ChannelWriteHalf<client::Msg>;

/// A channel's stdin; `finish` sends EOF.
struct ChannelInput(Arc<WriteHalf>);

impl Input for ChannelInput {
    fn write<'a>(&'a mut self, data: &'a [u8]) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move { self.0.data(data).await.map_err(|e| e.to_string()) })
    }

    fn finish(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ = self.0.eof().await;
        })
    }
}

/// Forwards a channel's messages as events until its close. When the stop
/// handle is dropped (a job abandoned, a session ended) the channel is
/// closed; the server's Close may never reach us (russh 0.65), so after a
/// grace the channel and its slot are let go on our own deadline.
async fn drive_channel(
    mut rd: russh::ChannelReadHalf,
    wr: Arc<WriteHalf>,
    tx: mpsc::Sender<Event>,
    mut stop: oneshot::Receiver<()>,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    let mut abandoned = false;
    let close_grace = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(close_grace);
    loop {
        let msg = tokio::select! {
            m = rd.wait() => m,
            _ = &mut stop, if !abandoned => {
                abandoned = true;
                let _ = wr.close().await;
                close_grace.as_mut().reset(tokio::time::Instant::now() + CLOSE_GRACE);
                continue;
            }
            _ = &mut close_grace, if abandoned => {
                tracing::debug!("no Close for an abandoned channel; releasing its slot");
                break;
            }
        };
        let event = match msg {
            Some(ChannelMsg::Data { data }) => Event::Out(data.to_vec()),
            Some(ChannelMsg::ExtendedData { data, ext: 1 }) => Event::Err(data.to_vec()),
            Some(ChannelMsg::ExitStatus { exit_status }) => {
                Event::Exit(Exit::Code(exit_status as i32))
            }
            Some(ChannelMsg::ExitSignal { signal_name, .. }) => {
                Event::Exit(Exit::Signal(match signal_name {
                    russh::Sig::Custom(name) => format!("SIG{name}"),
                    known => format!("SIG{known:?}"),
                }))
            }
            Some(ChannelMsg::Failure) => Event::Refused,
            Some(ChannelMsg::Close) | None => break,
            Some(_) => continue,
        };
        if abandoned {
            continue;
        }
        let gone = tokio::select! {
            r = tx.send(event) => r.is_err(),
            _ = &mut stop => true,
        };
        if gone {
            abandoned = true;
            let _ = wr.close().await;
            close_grace
                .as_mut()
                .reset(tokio::time::Instant::now() + CLOSE_GRACE);
        }
    }
}

fn read_passphrase(file: Option<&std::path::Path>) -> Result<Option<String>, TransportError> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|e| {
            TransportError::Auth(format!(
                "cannot read identity_passphrase_file {}: {e}",
                path.display()
            ))
        })?;
        return Ok(Some(text.trim_end_matches(['\n', '\r']).to_string()));
    }
    Ok(std::env::var("GOVSQL_SSH_PASSPHRASE").ok())
}

/// Exponential backoff with jitter: 100 ms · 2^n, capped at 5 s, ±50 %.
fn backoff(attempt: u32) -> Duration {
    let base = 100u64.saturating_mul(1 << attempt.min(6)).min(5_000);
    let jitter = rand::thread_rng().gen_range(base / 2..=base + base / 2);
    Duration::from_millis(jitter)
}

impl Executor for SshExecutor {
    fn run(&self, req: ScriptRequest) -> BoxFuture<'_, Result<ScriptOutput, TransportError>> {
        Box::pin(async move {
            let known = self.gate_format.load(Ordering::Relaxed);
            if let Some(m) = gate_too_old(known, crate::grammar::MIN_GATE_VERSION) {
                return Err(TransportError::RemoteGate(m));
            }
            let _in_use = self.link.usage.read().await;
            self.touch();
            let out = self.runner.run(req).await;
            self.touch();
            let out = out?;
            if let Some(v) = crate::grammar::announced_version(&out.stdout) {
                if v != known {
                    tracing::info!(
                        format = v,
                        "the database host's remote-gate announced its script format"
                    );
                }
                self.gate_format.store(v, Ordering::Relaxed);
            }
            Ok(out)
        })
    }

    fn ready(&self) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async {
            let _in_use = self.link.usage.read().await;
            self.touch();
            self.link.session().await.map(|_| ())
        })
    }

    fn kind(&self) -> &'static str {
        "ssh"
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {
            self.runner.close().await;
            let live = self.link.slot.lock().await.live.take();
            self.link.up.store(false, Ordering::Relaxed);
            if let Some(live) = live {
                let _ = live
                    .handle
                    .disconnect(russh::Disconnect::ByApplication, "govsql stopping", "en")
                    .await;
                // Its place under the cap is given back only once the
                // connection is gone (its socket closed), not when the
                // goodbye was merely sent.
                let gone_by = tokio::time::Instant::now() + Duration::from_secs(2);
                while !live.handle.is_closed() && tokio::time::Instant::now() < gone_by {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        })
    }

    fn stats(&self) -> super::TransportStats {
        let (warm_sessions, psql_started) = self.runner.counts();
        let session_up = self.link.up.load(Ordering::Relaxed);
        super::TransportStats {
            session_up,
            connects: self.link.connects.load(Ordering::Relaxed),
            connect_failures: self.link.connect_failures.load(Ordering::Relaxed),
            channel_open_failures: self.link.channel_open_failures.load(Ordering::Relaxed),
            warm_sessions,
            psql_started,
            gate_format: Some(self.gate_format.load(Ordering::Relaxed)).filter(|&v| v > 0),
            sessions_paused: self.runner.sessions_paused(),
        }
    }

    fn host_key_fingerprint(&self) -> Option<String> {
        self.link
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fingerprint
            .clone()
    }
}

impl cap::Idle for SshExecutor {
    fn is_up(&self) -> bool {
        self.link.up.load(Ordering::Relaxed)
    }

    fn last_used(&self) -> u64 {
        self.link.last_used.load(Ordering::Relaxed)
    }

    fn close_if_idle(&self) -> BoxFuture<'_, bool> {
        Box::pin(async {
            // No job or read holds it: none can start until it is closed
            // (they wait, then connect again).
            let Ok(_alone) = self.link.usage.try_write() else {
                return false;
            };
            if !self.link.up.load(Ordering::Relaxed) {
                return false;
            }
            tracing::debug!(host = %self.link.settings.host, "closing an idle SSH connection: another target needs its place under max_ssh_connections");
            self.close().await;
            true
        })
    }
}

/// Why a gate of script format `known` (0: none seen, so no gate or an
/// unknown one) would refuse this daemon's scripts, if it would.
fn gate_too_old(known: u32, needed: u32) -> Option<String> {
    (known > 0 && known < needed).then(|| {
        format!(
            "the database host's remote-gate speaks script format {known}; this daemon needs {needed}; upgrade govsql on the database host (nothing was sent)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gate_too_old_is_named_before_anything_is_sent() {
        assert_eq!(gate_too_old(0, 2), None, "no gate seen: nothing to refuse");
        assert_eq!(gate_too_old(2, 2), None);
        assert_eq!(gate_too_old(3, 2), None);
        let m = gate_too_old(1, 2).unwrap();
        assert!(
            m.contains(
                "speaks script format 1; this daemon needs 2; upgrade govsql on the database host"
            ),
            "{m}"
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) <= Duration::from_millis(300));
        assert!(backoff(10) <= Duration::from_millis(7_500));
        assert!(backoff(10) >= Duration::from_millis(2_500));
    }
}

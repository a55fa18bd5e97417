//! The socket: bind with the configured mode and group, accept with a
//! connection limit, read one bounded line at a time (a silent client is
//! closed after a timeout), and hand each request to its handler
//! (`handle/`).

use std::collections::HashMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

use super::{Daemon, DaemonError};
use crate::config::DaemonConfig;
use crate::protocol::{parse_request, Reply, ReplyKind, MAX_LINE};

/// The most jobs one list reply carries.
pub const MAX_LIST: u32 = 1000;

/// How long a connection may stay silent before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent connections.
const MAX_CONNECTIONS: usize = 512;
/// Concurrent connections of one uid, so no user can lock others out.
pub const MAX_CONNECTIONS_PER_UID: usize = 32;
/// Concurrent `govsql log` reads of one uid (they share one read channel
/// per target, never the jobs' slots).
pub const MAX_READS_PER_UID: usize = 2;

/// The socket this daemon bound: removed at exit only while it is still
/// this daemon's file (another daemon may have bound the path since).
#[derive(Debug)]
pub struct BoundSocket {
    path: std::path::PathBuf,
    dev: u64,
    ino: u64,
}

impl BoundSocket {
    /// Removes the socket file if it is still the one this daemon bound.
    pub fn remove_if_ours(&self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => {
                let _ = std::fs::remove_file(&self.path);
            }
            Ok(_) => tracing::warn!(
                socket = %self.path.display(),
                "the socket path is another daemon's now; left in place"
            ),
            Err(_) => {}
        }
    }
}

/// Binds the socket with the configured mode and group. A socket file
/// that answers belongs to a live daemon (of another state_dir, which the
/// lock does not cover): refused, never replaced. One that does not answer
/// is stale and replaced.
pub fn bind(cfg: &DaemonConfig) -> Result<(UnixListener, BoundSocket), DaemonError> {
    let io = |what, source| DaemonError::Io {
        what,
        path: cfg.socket.clone(),
        source,
    };
    let mut created_dir = None;
    if let Some(dir) = cfg.socket.parent() {
        if !dir.exists() {
            created_dir = Some(dir);
            // 0750 whatever the umask.
            std::fs::create_dir_all(dir)
                .and_then(|_| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750)))
                .map_err(|e| io("cannot create the socket directory of", e))?;
        }
    }
    if std::os::unix::net::UnixStream::connect(&cfg.socket).is_ok() {
        return Err(DaemonError::SocketInUse(cfg.socket.clone()));
    }
    match std::fs::remove_file(&cfg.socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("cannot remove the stale socket", e)),
    }
    let listener = listen(&cfg.socket).map_err(|e| io("cannot listen on", e))?;
    let mode = cfg
        .socket_mode()
        .map_err(|m| io("invalid socket_mode for", std::io::Error::other(m)))?;
    std::fs::set_permissions(&cfg.socket, std::fs::Permissions::from_mode(mode))
        .map_err(|e| io("cannot chmod", e))?;
    if let Some(group) = &cfg.socket_group {
        let gid = nix::unistd::Group::from_name(group)
            .ok()
            .flatten()
            .ok_or_else(|| {
                io(
                    "socket_group does not exist for",
                    std::io::Error::other(group.clone()),
                )
            })?
            .gid;
        set_group(&cfg.socket, group, gid)?;
        // A directory it made itself is the group's way in (0750).
        if let Some(dir) = created_dir {
            set_group(dir, group, gid)?;
        }
    }
    let meta = std::fs::symlink_metadata(&cfg.socket).map_err(|e| io("cannot examine", e))?;
    let bound = BoundSocket {
        path: cfg.socket.clone(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    Ok((listener, bound))
}

/// The accept backlog. A connection waits in it, behind every one queued
/// before it, until the accept loop reaches it: a short queue bounds that
/// wait (64 at the loop's tens of thousands a second is a few ms). When
/// it is full a client's blocking connect sleeps until the loop takes one
/// (the kernel wakes it then), which is how a well-behaved client gets in
/// past one user's connect flood (govsql's client connects that way).
const BACKLOG: i32 = 64;

/// Binds and listens with [`BACKLOG`] (tokio's bind would queue 1024).
fn listen(path: &Path) -> std::io::Result<UnixListener> {
    use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    socket::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &UnixAddr::new(path)?)?;
    socket::listen(&fd, Backlog::new(BACKLOG)?)?;
    UnixListener::from_std(std::os::unix::net::UnixListener::from(fd))
}

/// Gives the socket (or the directory it made for it) its group, calling chown only when the group is not
/// already right: under systemd `Group=` makes it so, and the unit's
/// `SystemCallFilter=~@privileged` forbids every chown. A chown that is
/// needed and refused says what to change.
fn set_group(socket: &Path, group: &str, gid: nix::unistd::Gid) -> Result<(), DaemonError> {
    let io = |what, source| DaemonError::Io {
        what,
        path: socket.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(socket).map_err(|e| io("cannot examine", e))?;
    if meta.gid() == gid.as_raw() {
        return Ok(());
    }
    nix::unistd::chown(socket, None, Some(gid)).map_err(|e| {
        io(
            "cannot chgrp",
            std::io::Error::other(format!(
                "to socket_group {group}: {e}; run the daemon with {group} as its group (systemd: Group={group}; the unit's SystemCallFilter forbids chown) or make its user a member of {group}"
            )),
        )
    })
}

/// Accepts connections until shutdown; each runs as a tracked task.
/// Fairness: the accept loop never waits for a permit. The peer's uid
/// (SO_PEERCRED, one syscall) is checked against its own share first; a
/// connection over its uid's share, or over the daemon's total, gets a
/// one-line answer at once and is closed. Only then does the connection
/// task look the user up (NSS may block), so one user's churn neither
/// fills the accept backlog nor the look-ups of others.
pub async fn serve(listener: UnixListener, daemon: Arc<Daemon>) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let shutdown = daemon.shutdown_token().clone();
    let mut backoff = Duration::from_millis(10);
    let mut rates = AcceptRates::default();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff = Duration::from_millis(10);
                stream
            }
            Err(e) => {
                tracing::error!(cause = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let cred = match getsockopt(&stream, PeerCredentials) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(cause = %e, "cannot read the peer's credentials; closing");
                continue;
            }
        };
        if !rates.admit(cred.uid()) {
            turn_away(
                &stream,
                &format!(
                    "uid {} opens more than {ACCEPT_RATE} connections a second; slow down and try again",
                    cred.uid()
                ),
            );
            continue;
        }
        let Some(slot) = daemon.connection_slot(cred.uid()) else {
            turn_away(
                &stream,
                &format!(
                    "uid {} has {MAX_CONNECTIONS_PER_UID} connections open already; close some and try again",
                    cred.uid()
                ),
            );
            continue;
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            turn_away(
                &stream,
                &format!("the daemon has {MAX_CONNECTIONS} connections open; try again shortly"),
            );
            continue;
        };
        let d = daemon.clone();
        daemon.tasks().spawn(async move {
            connection(d, stream, cred.uid(), cred.gid()).await;
            drop(slot);
            drop(permit);
        });
    }
}

/// New connections a second one uid may open (a burst of as many): far
/// above any client's use (a cron job, a loop of `govsql status`), far
/// below a churn flood's tens of thousands.
pub const ACCEPT_RATE: f64 = 2000.0;

/// Each uid's share of the accept loop: a token bucket of
/// [`ACCEPT_RATE`] new connections a second. A uid past it is turned away
/// at accept, before its connection costs a task or a look-up.
#[derive(Default)]
struct AcceptRates {
    buckets: HashMap<u32, (f64, std::time::Instant)>,
}

impl AcceptRates {
    fn admit(&mut self, uid: u32) -> bool {
        let now = std::time::Instant::now();
        if self.buckets.len() > 4096 {
            // Full buckets carry no state: forget them.
            self.buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * ACCEPT_RATE < ACCEPT_RATE
            });
        }
        let (tokens, at) = self.buckets.entry(uid).or_insert((ACCEPT_RATE, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * ACCEPT_RATE).min(ACCEPT_RATE);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Answers a connection that gets no slot with one `unavailable` line,
/// without waiting (a fresh socket's buffer takes it), and closes it.
fn turn_away(stream: &UnixStream, why: &str) {
    let mut bytes = serde_json::to_vec(&Reply::error(ReplyKind::Unavailable, why))
        .unwrap_or_else(|_| b"{\"v\":1,\"ok\":false}".to_vec());
    bytes.push(b'\n');
    let _ = stream.try_write(&bytes);
}

enum Line {
    Data(Vec<u8>),
    TooLong,
    Eof,
}

/// Request lines longer than this need one of [`LARGE_REQUESTS`]'
/// permits to grow further: a flood of 4 MiB lines is read and parsed a
/// few at a time, never all at once.
const SMALL_LINE: usize = 64 * 1024;
/// How many large request lines are read and parsed at once.
static LARGE_REQUESTS: Semaphore = Semaphore::const_new(4);

async fn read_line_limited<R: AsyncBufRead + Unpin>(
    r: &mut R,
    max: usize,
    large: &mut Option<tokio::sync::SemaphorePermit<'static>>,
) -> std::io::Result<Line> {
    let mut buf = Vec::new();
    loop {
        if buf.len() > SMALL_LINE && large.is_none() {
            *large = Some(
                LARGE_REQUESTS
                    .acquire()
                    .await
                    .map_err(std::io::Error::other)?,
            );
        }
        let avail = r.fill_buf().await?;
        if avail.is_empty() {
            return Ok(if buf.is_empty() {
                Line::Eof
            } else {
                Line::Data(buf)
            });
        }
        if let Some(i) = avail.iter().position(|&b| b == b'\n') {
            buf.extend_from_slice(&avail[..i]);
            r.consume(i + 1);
            return Ok(if buf.len() > max {
                Line::TooLong
            } else {
                Line::Data(buf)
            });
        }
        let n = avail.len();
        buf.extend_from_slice(avail);
        r.consume(n);
        if buf.len() > max {
            return Ok(Line::TooLong);
        }
    }
}

async fn connection(daemon: Arc<Daemon>, stream: UnixStream, uid: u32, gid: u32) {
    // The user and group look-ups (NSS: files, LDAP, sssd…) may block;
    // a uid's answer is kept a few seconds.
    let Some(peer) = daemon.peers.get(uid, gid).await else {
        return;
    };
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let shutdown = daemon.shutdown_token().clone();
    loop {
        let mut large = None;
        let read = tokio::select! {
            r = tokio::time::timeout(IDLE_TIMEOUT, read_line_limited(&mut rd, MAX_LINE, &mut large)) => r,
            _ = shutdown.cancelled() => return,
        };
        let line = match read {
            Err(_) => {
                tracing::debug!(user = %peer.user, "client silent; closing");
                return;
            }
            Ok(Err(_)) | Ok(Ok(Line::Eof)) => return,
            Ok(Ok(Line::TooLong)) => {
                let reply = Reply::error(
                    ReplyKind::TooLong,
                    format!("request line over {MAX_LINE} bytes; closing"),
                );
                let _ = write_reply(&mut wr, &reply).await;
                return;
            }
            Ok(Ok(Line::Data(bytes))) => bytes,
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let parsed = parse_request(&line);
        drop(line);
        drop(large);
        let reply = match parsed {
            Ok(req) => super::handle::handle(&daemon, &peer, req).await,
            Err(reply) => *reply,
        };
        if write_reply(&mut wr, &reply).await.is_err() {
            return;
        }
    }
}

async fn write_reply(
    wr: &mut tokio::net::unix::OwnedWriteHalf,
    reply: &Reply,
) -> std::io::Result<()> {
    let mut bytes =
        serde_json::to_vec(reply).unwrap_or_else(|_| {
            br#"{"v":1,"ok":false,"error":{"kind":"internal","message":"the daemon could not write its reply; see its log"}}"#.to_vec()
        });
    bytes.push(b'\n');
    wr.write_all(&bytes).await
}

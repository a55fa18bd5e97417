//! The CLI's side of the socket. The client reads only `[daemon].socket`
//! from the config, so an operator needs no access to keys or the catalog.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::protocol::{Reply, Request, MAX_LINE};

/// The socket when the config does not say.
pub const DEFAULT_SOCKET: &str = "/run/govsql/govsql.sock";

/// A client failure.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon is not there.
    #[error("cannot reach the govsql daemon at {socket}: {source}; is `govsql daemon` running (systemctl status govsql)? Or run the job in this process with --direct")]
    Unreachable {
        /// The socket path.
        socket: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The socket exists but this user may not open it.
    #[error("not allowed to talk to the govsql daemon at {socket}: {hint}")]
    Denied {
        /// The socket path.
        socket: PathBuf,
        /// Which group to join.
        hint: String,
    },
    /// The config naming the socket is not valid TOML: never a silent
    /// default either.
    #[error("cannot use config {path}: {message}; fix it or pass another with --config FILE")]
    ConfigParse {
        /// The config file.
        path: PathBuf,
        /// What is wrong (line number included).
        message: String,
    },
    /// The config naming the socket cannot be read: never a silent
    /// default (a staging config must not reach the production daemon).
    #[error("cannot read config {path}: {source}; pass --config FILE or set GOVSQL_CONFIG to a config you can read")]
    Config {
        /// The config file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The connection broke or the reply was not understood.
    #[error("the daemon's reply was not understood ({0}); is the client up to date?")]
    Protocol(String),
}

/// The socket named by the config file (only `[daemon].socket` is read;
/// a config without one means the default socket). A config that cannot
/// be read is an error.
pub fn socket_from_config(config_path: &Path) -> Result<PathBuf, ClientError> {
    let text = std::fs::read_to_string(config_path).map_err(|source| ClientError::Config {
        path: config_path.to_path_buf(),
        source,
    })?;
    let value = toml::from_str::<toml::Value>(&text).map_err(|e| ClientError::ConfigParse {
        path: config_path.to_path_buf(),
        message: match e.span() {
            Some(span) => format!(
                "line {}: {}",
                text[..span.start.min(text.len())].matches('\n').count() + 1,
                e.message()
            ),
            None => e.message().to_string(),
        },
    })?;
    let socket = value
        .get("daemon")
        .and_then(|d| d.get("socket"))
        .and_then(|s| s.as_str())
        .map(PathBuf::from);
    Ok(match socket {
        Some(p) if p.is_relative() => config_path.parent().unwrap_or(Path::new(".")).join(p),
        Some(p) => p,
        None => PathBuf::from(DEFAULT_SOCKET),
    })
}

/// Which group a user must join to open the socket: the group of the
/// socket file, or of its directory when the file cannot be seen.
fn join_hint(socket: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let gid = std::fs::metadata(socket)
        .or_else(|_| std::fs::metadata(socket.parent().unwrap_or(Path::new("/"))))
        .map(|m| m.gid())
        .ok();
    let group = gid.and_then(|g| {
        nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(g))
            .ok()
            .flatten()
            .map(|g| g.name)
    });
    let user = nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| "YOUR_USER".into());
    match group {
        Some(g) => format!(
            "the socket belongs to group {g}; ask an admin to add you (usermod -aG {g} {user}), then log in again"
        ),
        None => "ask an admin to add you to the socket's group (govsql by default), then log in again".into(),
    }
}

/// How long [`Client::connect`] retries a busy socket (EAGAIN).
const CONNECT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// A blocking connect that waits at most [`CONNECT_PATIENCE`] for room
/// in the accept backlog (a unix socket's connect timeout is its send
/// timeout), then made non-blocking for tokio.
fn blocking_connect(path: &Path) -> std::io::Result<std::os::unix::net::UnixStream> {
    use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let patience = nix::sys::time::TimeVal::new(CONNECT_PATIENCE.as_secs() as _, 0);
    socket::setsockopt(&fd, sockopt::SendTimeout, &patience)?;
    socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &UnixAddr::new(path)?)?;
    let stream = std::os::unix::net::UnixStream::from(fd);
    stream.set_nonblocking(true)?;
    Ok(stream)
}

/// A connection to the daemon.
pub struct Client {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Client {
    /// Connects to the socket. A full accept backlog (the daemon is busy,
    /// or another user floods it with connections) is waited out in the
    /// kernel for up to [`CONNECT_PATIENCE`]: a blocking connect sleeps
    /// until the daemon accepts one and is woken then, ahead of a flood
    /// that retries EAGAIN in a loop (a retry with backoff lost that race
    /// nearly every time: p99 53 ms against 21 ms under scripts/abuse's
    /// churn).
    pub async fn connect(socket: &Path) -> Result<Client, ClientError> {
        let path = socket.to_path_buf();
        let connected = tokio::task::spawn_blocking(move || blocking_connect(&path))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            .and_then(UnixStream::from_std);
        let stream = connected.map_err(|source| {
            if source.kind() == std::io::ErrorKind::PermissionDenied {
                ClientError::Denied {
                    socket: socket.to_path_buf(),
                    hint: join_hint(socket),
                }
            } else {
                ClientError::Unreachable {
                    socket: socket.to_path_buf(),
                    source,
                }
            }
        })?;
        let (r, w) = stream.into_split();
        Ok(Client {
            reader: BufReader::new(r),
            writer: w,
        })
    }

    /// Sends one request and reads its reply.
    pub async fn call(&mut self, req: &Request) -> Result<Reply, ClientError> {
        let mut line = serde_json::to_vec(&crate::protocol::Envelope::of(req))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let mut buf = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64 * 64)
            .read_until(b'\n', &mut buf)
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        if n == 0 {
            return Err(ClientError::Protocol(
                "the daemon closed the connection".into(),
            ));
        }
        serde_json::from_slice(&buf).map_err(|e| ClientError::Protocol(e.to_string()))
    }
}

use tokio::io::AsyncReadExt as _;

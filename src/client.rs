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
    let socket = toml::from_str::<toml::Value>(&text)
        .ok()
        .and_then(|v| v.get("daemon")?.get("socket")?.as_str().map(PathBuf::from));
    Ok(match socket {
        Some(p) if p.is_relative() => config_path.parent().unwrap_or(Path::new(".")).join(p),
        Some(p) => p,
        None => PathBuf::from(DEFAULT_SOCKET),
    })
}

/// A connection to the daemon.
pub struct Client {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Client {
    /// Connects to the socket.
    pub async fn connect(socket: &Path) -> Result<Client, ClientError> {
        let stream =
            UnixStream::connect(socket)
                .await
                .map_err(|source| ClientError::Unreachable {
                    socket: socket.to_path_buf(),
                    source,
                })?;
        let (r, w) = stream.into_split();
        Ok(Client {
            reader: BufReader::new(r),
            writer: w,
        })
    }

    /// Sends one request and reads its reply.
    pub async fn call(&mut self, req: &Request) -> Result<Reply, ClientError> {
        let mut line = serde_json::to_vec(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
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

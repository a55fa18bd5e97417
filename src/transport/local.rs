//! The local executor: spawns psql on this host with exactly the command
//! line of DESIGN.md (minus ssh), the script on stdin.

use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::{BoxFuture, Executor, Exit, ScriptOutput, ScriptRequest, TransportError};
use crate::config::TargetConfig;
use crate::psql::{command_words, DbRole};

/// Runs psql locally for a `transport = "local"` target.
#[derive(Debug, Clone)]
pub struct LocalExecutor {
    words: Vec<String>,
}

impl LocalExecutor {
    /// An executor for one target, running its scripts as `role`.
    pub fn new(target: &TargetConfig, role: DbRole) -> LocalExecutor {
        LocalExecutor {
            words: command_words(target, role),
        }
    }

    async fn run_psql(&self, req: ScriptRequest) -> Result<ScriptOutput, TransportError> {
        let words = &self.words;
        let mut child = Command::new(&words[0])
            .args(&words[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| TransportError::Unreachable(format!("cannot start {}: {e}", words[0])))?;
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| TransportError::Unreachable("psql stdin unavailable".into()))?;
        let text = req.text.into_bytes();
        // Write stdin while stdout and stderr are drained, so a large
        // script or result cannot deadlock on a full pipe.
        let writer = async move {
            let r = stdin.write_all(&text).await;
            drop(stdin);
            r
        };
        let (written, output) = tokio::join!(writer, child.wait_with_output());
        let output =
            output.map_err(|e| TransportError::Lost(format!("psql did not finish: {e}")))?;
        if let Err(e) = written {
            // psql may exit before reading all of stdin (ON_ERROR_STOP); that
            // is a normal end, reported through its exit status.
            tracing::debug!(cause = %e, "psql closed stdin early");
        }
        let exit = match output.status.code() {
            Some(c) => Exit::Code(c),
            None => {
                use std::os::unix::process::ExitStatusExt;
                output
                    .status
                    .signal()
                    .map(|s| Exit::Signal(format!("signal {s}")))
                    .unwrap_or(Exit::Unknown)
            }
        };
        Ok(ScriptOutput {
            stdout: output.stdout,
            stderr: output.stderr,
            exit,
        })
    }
}

impl Executor for LocalExecutor {
    fn run(&self, req: ScriptRequest) -> BoxFuture<'_, Result<ScriptOutput, TransportError>> {
        Box::pin(self.run_psql(req))
    }

    fn kind(&self) -> &'static str {
        "local"
    }
}

//! The local executor: spawns psql on this host with exactly the command
//! line of DESIGN.md (minus ssh), the script on stdin; one psql per job or,
//! in session mode, warm psql sessions.

use std::process::Stdio;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, oneshot};

use super::session::{Event, Input, Launch, Process};
use super::{BoxFuture, Executor, Exit, Runner, ScriptOutput, ScriptRequest, TransportError};
use crate::config::TargetConfig;
use crate::psql::{command_words, DbRole};

/// Runs psql locally for a `transport = "local"` target.
pub struct LocalExecutor {
    runner: Runner,
}

impl LocalExecutor {
    /// An executor for one target, running its scripts as `role`.
    pub fn new(target: &TargetConfig, role: DbRole) -> LocalExecutor {
        let launch = Arc::new(LocalLaunch {
            words: command_words(target, role),
        });
        LocalExecutor {
            runner: Runner::new(launch, target, role),
        }
    }

    /// How scripts are run (session mode's pool, for tests).
    pub fn runner(&self) -> &Runner {
        &self.runner
    }
}

/// Starts local psql children.
struct LocalLaunch {
    words: Vec<String>,
}

impl Launch for LocalLaunch {
    fn launch(&self) -> BoxFuture<'_, Result<Process, TransportError>> {
        Box::pin(async move {
            let words = &self.words;
            let mut child = Command::new(&words[0])
                .args(&words[1..])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| {
                    TransportError::Unreachable(format!("cannot start {}: {e}", words[0]))
                })?;
            let stdin = child
                .stdin
                .take()
                .ok_or_else(|| TransportError::Unreachable("psql stdin unavailable".into()))?;
            let (tx, rx) = mpsc::channel(64);
            let (stop_tx, stop_rx) = oneshot::channel();
            tokio::spawn(drive_child(child, tx, stop_rx));
            Ok(Process {
                input: Box::new(ChildInput(Some(stdin))),
                events: rx,
                stop: stop_tx,
            })
        })
    }
}

/// A child's stdin; `finish` closes it.
struct ChildInput(Option<ChildStdin>);

impl Input for ChildInput {
    fn write<'a>(&'a mut self, data: &'a [u8]) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            match self.0.as_mut() {
                Some(stdin) => stdin.write_all(data).await.map_err(|e| e.to_string()),
                None => Err("stdin is closed".into()),
            }
        })
    }

    fn finish(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.0.take();
        })
    }
}

/// Forwards a child's stdout and stderr as events, then its exit; kills
/// it when the stop handle is dropped or nobody listens any more.
async fn drive_child(mut child: Child, tx: mpsc::Sender<Event>, mut stop: oneshot::Receiver<()>) {
    let (Some(mut out), Some(mut err)) = (child.stdout.take(), child.stderr.take()) else {
        let _ = child.start_kill();
        return;
    };
    let (mut out_open, mut err_open, mut stopped) = (true, true, false);
    let mut obuf = vec![0u8; 64 * 1024];
    let mut ebuf = vec![0u8; 8 * 1024];
    while out_open || err_open {
        let event = tokio::select! {
            r = out.read(&mut obuf), if out_open => match r {
                Ok(n) if n > 0 => Some(Event::Out(obuf[..n].to_vec())),
                _ => { out_open = false; None }
            },
            r = err.read(&mut ebuf), if err_open => match r {
                Ok(n) if n > 0 => Some(Event::Err(ebuf[..n].to_vec())),
                _ => { err_open = false; None }
            },
            _ = &mut stop, if !stopped => {
                stopped = true;
                let _ = child.start_kill();
                None
            }
        };
        if let (Some(ev), false) = (event, stopped) {
            let gone = tokio::select! {
                r = tx.send(ev) => r.is_err(),
                _ = &mut stop => true,
            };
            if gone {
                stopped = true;
                let _ = child.start_kill();
            }
        }
    }
    let exit = match child.wait().await {
        Ok(status) => match status.code() {
            Some(c) => Exit::Code(c),
            None => {
                use std::os::unix::process::ExitStatusExt;
                status
                    .signal()
                    .map(|s| Exit::Signal(format!("signal {s}")))
                    .unwrap_or(Exit::Unknown)
            }
        },
        Err(_) => Exit::Unknown,
    };
    let _ = tx.send(Event::Exit(exit)).await;
}

impl Executor for LocalExecutor {
    fn run(&self, req: ScriptRequest) -> BoxFuture<'_, Result<ScriptOutput, TransportError>> {
        Box::pin(self.runner.run(req))
    }

    fn kind(&self) -> &'static str {
        "local"
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.runner.close())
    }

    fn stats(&self) -> super::TransportStats {
        let (warm_sessions, psql_started) = self.runner.counts();
        super::TransportStats {
            warm_sessions,
            psql_started,
            sessions_paused: self.runner.sessions_paused(),
            ..Default::default()
        }
    }
}

//! Running psql: one process (a local child or an SSH channel) seen as an
//! input and a stream of events, run either once per job (the script, then
//! EOF) or as a session that takes jobs one after another.
//!
//! Session mode: each job's script is written to the session's stdin and
//! read up to its own `GOVSQL:<nonce>:end` marker. After that marker the
//! session resets itself, on the database (the session state `DISCARD ALL`
//! clears, minus the plan cache, in one round trip, failing if a
//! transaction were left open) and in psql (every variable the script
//! `\set` is unset), then prints `GOVSQL:<nonce>:ready`. A session goes
//! back to the pool only after that marker arrived exactly; any other
//! output, a dead process, a job that did not reach its end marker or one
//! dropped at its deadline ends the session. Sessions are recycled after
//! `session_max_jobs` jobs and closed after `session_idle_s` unused.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex as StdMutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Semaphore};

use super::{BoxFuture, Exit, ScriptOutput, ScriptRequest, TransportError};

/// What a running psql reports.
#[derive(Debug)]
pub enum Event {
    /// Bytes on stdout.
    Out(Vec<u8>),
    /// Bytes on stderr.
    Err(Vec<u8>),
    /// How it ended.
    Exit(Exit),
    /// The server refused to run the command (SSH exec failure).
    Refused,
}

/// The stdin of a running psql.
pub trait Input: Send {
    /// Writes bytes.
    fn write<'a>(&'a mut self, data: &'a [u8]) -> BoxFuture<'a, Result<(), String>>;
    /// Sends EOF: psql ends after the statements it has.
    fn finish(&mut self) -> BoxFuture<'_, ()>;
}

/// One running psql: its stdin, its events (the stream ends when the
/// process and its channel are gone), and a stop handle: dropping it kills
/// the process (local) or closes the channel (SSH).
pub struct Process {
    /// stdin.
    pub input: Box<dyn Input>,
    /// stdout, stderr and the exit, in arrival order.
    pub events: mpsc::Receiver<Event>,
    /// Dropped (or sent): the process is stopped.
    pub stop: oneshot::Sender<()>,
}

/// Starts psql processes for one target and role.
pub trait Launch: Send + Sync + 'static {
    /// Starts one psql running the target's command line.
    fn launch(&self) -> BoxFuture<'_, Result<Process, TransportError>>;

    /// Starts one psql for an operator's read, on its own budget where
    /// the transport has one (SSH: the read channel).
    fn launch_read(&self) -> BoxFuture<'_, Result<Process, TransportError>> {
        self.launch()
    }
}

/// How much output one run may hold, and the budget it shares with the
/// other runs of its target: a hostile or broken host that answers
/// without end must not grow the daemon's memory, nor take other
/// targets' room.
#[derive(Debug, Clone)]
pub struct OutputLimits {
    /// stdout bytes (results are capped at `max_result_bytes` by the
    /// dispatcher; COPY's escaping at most doubles them, plus framing).
    pub stdout: usize,
    /// stderr bytes (psql writes SQLSTATEs and its connection errors).
    pub stderr: usize,
    /// Output bytes held by all runs of the target at once, in
    /// [`BUDGET_CHUNK`]s (none: unbounded). A run that cannot get more
    /// is stopped, like one over its own limit.
    pub budget: Option<Arc<tokio::sync::Semaphore>>,
}

/// The least output budget of a target: however many of its channels
/// answer without end, the daemon buffers at most this much of them (or
/// one run's limits, when those are larger).
pub const TARGET_OUTPUT_BUDGET: usize = 64 << 20;
/// The budget's unit.
pub const BUDGET_CHUNK: usize = 1 << 20;

impl OutputLimits {
    /// The limits of a target whose results are capped at
    /// `max_result_bytes`, with the target's own output budget.
    pub fn for_results(max_result_bytes: u64) -> OutputLimits {
        let results = usize::try_from(max_result_bytes).unwrap_or(usize::MAX);
        let stdout = results.saturating_mul(2).saturating_add(256 << 10);
        let stderr = 64 << 10;
        let budget = TARGET_OUTPUT_BUDGET
            .max(stdout.saturating_add(stderr))
            .div_ceil(BUDGET_CHUNK)
            .min(tokio::sync::Semaphore::MAX_PERMITS);
        OutputLimits {
            stdout,
            stderr,
            budget: Some(Arc::new(tokio::sync::Semaphore::new(budget))),
        }
    }
}

impl Default for OutputLimits {
    fn default() -> Self {
        OutputLimits::for_results(crate::config::DEFAULT_MAX_RESULT_BYTES)
    }
}

/// Room for `more` bytes in `buf`, whose limit is `cap`. Small outputs
/// grow as usual; past one budget chunk the buffer is reserved once to
/// its limit (pages not yet written are not resident), so a large output
/// is never copied by growth: a doubling, copying buffer held up to three
/// times its bytes, beyond the budget.
fn grow_exact(buf: &mut Vec<u8>, more: usize, cap: usize) {
    let need = buf.len() + more;
    if need <= buf.capacity() {
        return;
    }
    if need <= BUDGET_CHUNK {
        buf.reserve(more);
    } else {
        buf.reserve_exact(cap.max(need) - buf.len());
    }
}

/// What was read of one job.
#[derive(Default)]
struct Reading {
    limits: OutputLimits,
    /// Which stream passed its limit (the run was stopped there).
    over: Option<&'static str>,
    /// This run's share of its target's output budget, and its size in
    /// bytes.
    budget: Option<tokio::sync::OwnedSemaphorePermit>,
    budget_bytes: usize,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: Option<Exit>,
    refused: bool,
    /// Whether the stream ended (the process is gone).
    ended: bool,
}

impl Reading {
    fn new(limits: OutputLimits) -> Reading {
        Reading {
            limits,
            ..Reading::default()
        }
    }

    /// Takes one event; past a stream's limit the bytes are dropped and
    /// `over` names the stream (the caller stops the run).
    fn take(&mut self, event: Event) {
        match event {
            Event::Out(b) => {
                if self.stdout.len() + b.len() > self.limits.stdout {
                    self.over = Some("stdout");
                } else if !self.reserve(b.len()) {
                    self.over = Some("budget");
                } else {
                    grow_exact(&mut self.stdout, b.len(), self.limits.stdout);
                    self.stdout.extend_from_slice(&b);
                }
            }
            Event::Err(b) => {
                if self.stderr.len() + b.len() > self.limits.stderr {
                    self.over = Some("stderr");
                } else if !self.reserve(b.len()) {
                    self.over = Some("budget");
                } else {
                    grow_exact(&mut self.stderr, b.len(), self.limits.stderr);
                    self.stderr.extend_from_slice(&b);
                }
            }
            Event::Exit(e) => self.exit = Some(e),
            Event::Refused => self.refused = true,
        }
    }

    /// Room for `more` bytes in the target's output budget, taken in
    /// [`BUDGET_CHUNK`]s without waiting; false when the budget is in use.
    fn reserve(&mut self, more: usize) -> bool {
        let need = self.stdout.len() + self.stderr.len() + more;
        if need <= self.budget_bytes {
            return true;
        }
        let Some(budget) = self.limits.budget.clone() else {
            return true;
        };
        let chunks = (need - self.budget_bytes).div_ceil(BUDGET_CHUNK);
        let Ok(permit) = budget.try_acquire_many_owned(chunks as u32) else {
            return false;
        };
        match &mut self.budget {
            Some(held) => held.merge(permit),
            None => self.budget = Some(permit),
        }
        self.budget_bytes += chunks * BUDGET_CHUNK;
        true
    }

    /// The error of a run stopped at a limit.
    fn too_large(&self) -> Option<TransportError> {
        if self.over == Some("budget") {
            return Some(TransportError::OutputTooLarge(
                "the target's output budget (what the daemon holds of all its running jobs' output) is in use; this run was stopped and its channel closed (a host answering without end, or many large results at once)".into(),
            ));
        }
        self.over.map(|stream| {
            let limit = if stream == "stdout" {
                self.limits.stdout
            } else {
                self.limits.stderr
            };
            TransportError::OutputTooLarge(format!(
                "the target's psql wrote more than {limit} bytes on {stream}; the channel was closed (a host answering without end, or a result over max_result_bytes)"
            ))
        })
    }

    /// The output of a process that ended (or of a job that reached its
    /// end marker, with `exit` set to 0 by the caller).
    fn into_output(self, written: Result<(), String>) -> Result<ScriptOutput, TransportError> {
        if let Some(e) = self.too_large() {
            return Err(e);
        }
        if self.refused && self.exit.is_none() {
            return Err(TransportError::Unreachable(
                "the server refused to run the command".into(),
            ));
        }
        if let Err(e) = written {
            // psql may stop reading early (ON_ERROR_STOP); only a run that
            // never ended is a transport failure.
            if self.exit.is_none() {
                return Err(TransportError::Lost(format!(
                    "writing the script failed: {e}"
                )));
            }
        }
        Ok(ScriptOutput {
            stdout: self.stdout,
            stderr: self.stderr,
            exit: self.exit.unwrap_or(Exit::Unknown),
        })
    }
}

/// Writes and reads at once. A reader stopped at an output limit does not
/// wait for a writer the peer may never let finish.
async fn drive<R>(
    writer: impl std::future::Future<Output = Result<(), String>>,
    reader: impl std::future::Future<Output = R>,
    stopped: impl Fn(&R) -> bool,
) -> (Result<(), String>, R) {
    let mut writer = std::pin::pin!(writer);
    let mut reader = std::pin::pin!(reader);
    let mut written = None;
    loop {
        tokio::select! {
            w = &mut writer, if written.is_none() => written = Some(w),
            r = &mut reader => {
                let w = match written {
                    Some(w) => w,
                    None if stopped(&r) => Err("stopped at the output limit".to_string()),
                    None => writer.await,
                };
                return (w, r);
            }
        }
    }
}

/// Per-job mode: the script, EOF, and everything psql writes until it is
/// gone.
pub async fn run_once(
    process: Process,
    text: &[u8],
    limits: OutputLimits,
) -> Result<ScriptOutput, TransportError> {
    let Process {
        mut input,
        mut events,
        stop,
    } = process;
    let writer = async {
        let r = input.write(text).await;
        input.finish().await;
        r
    };
    let reader = async {
        let mut reading = Reading::new(limits);
        while let Some(ev) = events.recv().await {
            reading.take(ev);
            if reading.over.is_some() {
                break;
            }
        }
        reading
    };
    let (written, reading) = drive(writer, reader, |r| r.over.is_some()).await;
    drop(stop);
    reading.into_output(written)
}

/// The psql variables a script sets with `\set` (the session unsets them
/// after the job), or `None` when it uses `\gset`, whose names cannot be
/// known from the text: such a script runs in its own psql.
fn script_vars(text: &str) -> Option<Vec<String>> {
    let mut vars = Vec::new();
    for line in text.lines() {
        if line.contains("\\gset") {
            return None;
        }
        if let Some(rest) = line.trim_start().strip_prefix("\\set ") {
            let name = rest.split_whitespace().next().unwrap_or("");
            if !name.is_empty()
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !vars.iter().any(|v| v == name)
            {
                vars.push(name.to_string());
            }
        }
    }
    Some(vars)
}

/// What a session writes to its psql for a job: the script, then the
/// reset and the ready marker (`None`: the script runs in its own psql).
pub fn session_input(req: &ScriptRequest) -> Option<String> {
    script_vars(&req.text).map(|vars| session_text(req, &vars))
}

/// A job's script followed by the session's reset and ready marker.
fn session_text(req: &ScriptRequest, vars: &[String]) -> String {
    let mut text = String::with_capacity(req.text.len() + crate::grammar::RESET_SQL.len() + 64);
    text.push_str(&req.text);
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(crate::grammar::RESET_SQL);
    text.push('\n');
    for v in vars {
        text.push_str("\\unset ");
        text.push_str(v);
        text.push('\n');
    }
    text.push_str(&crate::grammar::marker(&req.nonce, "ready"));
    text
}

/// Where `GOVSQL:<nonce>:<label>\n` starts a line in `buf` (searching
/// from `from`): the end of that marker line.
fn marker_end(buf: &[u8], from: usize, nonce: &str, label: &str) -> Option<usize> {
    let marker = format!("GOVSQL:{nonce}:{label}\n");
    let m = marker.as_bytes();
    let mut pos = from;
    while pos + m.len() <= buf.len() {
        let found = buf[pos..].windows(m.len()).position(|w| w == m)?;
        let at = pos + found;
        if at == 0 || matches!(buf[at - 1], b'\n' | b'\0') {
            return Some(at + m.len());
        }
        pos = at + 1;
    }
    None
}

/// How long a session may take to print its ready marker after a job.
const READY_WAIT: Duration = Duration::from_secs(10);

/// One psql taking jobs one after another.
struct Session {
    process: Process,
    /// Jobs run on it.
    jobs: u64,
    /// When it last finished a job.
    last_used: Instant,
    /// The nonce whose ready marker is still to be read.
    owed: Option<String>,
    /// stdout already read past the last job's end marker.
    spill: Vec<u8>,
}

/// How a job on a session ended.
enum SessionRun {
    /// The job reached its end marker; the session may be reused.
    Done(ScriptOutput),
    /// psql (or its channel) ended during the job.
    Ended(ScriptOutput),
    /// The job's output passed its limit: the session was stopped.
    TooLarge(TransportError),
}

impl Session {
    fn new(process: Process) -> Session {
        Session {
            process,
            jobs: 0,
            last_used: Instant::now(),
            owed: None,
            spill: Vec::new(),
        }
    }

    /// Reads the last job's ready marker; false when the session is not
    /// fit for another job (it ended, or wrote anything else).
    async fn settle(&mut self) -> bool {
        if let Some(nonce) = self.owed.take() {
            let expected = format!("GOVSQL:{nonce}:ready\n").into_bytes();
            let mut buf = std::mem::take(&mut self.spill);
            let deadline = tokio::time::Instant::now() + READY_WAIT;
            while buf != expected {
                if !expected.starts_with(&buf) {
                    tracing::warn!(
                        bytes = buf.len(),
                        "a psql session wrote something else than its ready marker; ending it"
                    );
                    return false;
                }
                match tokio::time::timeout_at(deadline, self.process.events.recv()).await {
                    Ok(Some(Event::Out(b))) => buf.extend_from_slice(&b),
                    Ok(Some(Event::Err(b))) => {
                        tracing::debug!(bytes = b.len(), "psql session stderr between jobs")
                    }
                    Ok(Some(Event::Exit(e))) => {
                        tracing::warn!(exit = %e, "a psql session ended during its reset; replacing it");
                        return false;
                    }
                    Ok(Some(Event::Refused)) | Ok(None) => return false,
                    Err(_) => {
                        tracing::warn!(
                            "a psql session did not finish its reset in time; replacing it"
                        );
                        return false;
                    }
                }
            }
        }
        // Anything that arrived while it was idle (an exit, a closed
        // channel, stray bytes) means it is gone or not to be trusted.
        matches!(
            self.process.events.try_recv(),
            Err(mpsc::error::TryRecvError::Empty) | Ok(Event::Err(_))
        )
    }

    /// Runs one job: writes its script (with the reset after it) and reads
    /// up to its end marker.
    async fn run(
        &mut self,
        req: &ScriptRequest,
        vars: &[String],
        limits: OutputLimits,
    ) -> SessionRun {
        let text = session_text(req, vars);
        let Process { input, events, .. } = &mut self.process;
        let writer = input.write(text.as_bytes());
        let reader = async {
            let mut reading = Reading::new(limits);
            let mut end = None;
            while end.is_none() && reading.over.is_none() {
                match events.recv().await {
                    Some(Event::Out(b)) => {
                        let from = reading.stdout.len().saturating_sub(req.nonce.len() + 16);
                        reading.take(Event::Out(b));
                        end = marker_end(&reading.stdout, from, &req.nonce, "end");
                    }
                    Some(ev) => reading.take(ev),
                    None => {
                        reading.ended = true;
                        break;
                    }
                }
            }
            (reading, end)
        };
        let (written, (mut reading, end)) = drive(writer, reader, |r| r.0.over.is_some()).await;
        if let Some(e) = reading.too_large() {
            return SessionRun::TooLarge(e);
        }
        match end {
            Some(end) if written.is_ok() => {
                self.spill = reading.stdout.split_off(end);
                self.owed = Some(req.nonce.clone());
                self.jobs += 1;
                self.last_used = Instant::now();
                SessionRun::Done(ScriptOutput {
                    stdout: reading.stdout,
                    stderr: reading.stderr,
                    exit: Exit::Code(0),
                })
            }
            _ => {
                // The job did not reach its end: psql is ending. Read what
                // is left (its SQLSTATE, its exit) to the end of the stream.
                if !reading.ended {
                    let rest = tokio::time::timeout(READY_WAIT, async {
                        while let Some(ev) = events.recv().await {
                            reading.take(ev);
                            if reading.over.is_some() {
                                break;
                            }
                        }
                    })
                    .await;
                    if rest.is_err() {
                        tracing::warn!("a psql session neither finished its job nor ended");
                    }
                }
                SessionRun::Ended(match reading.into_output(written) {
                    Ok(out) => out,
                    Err(e) => ScriptOutput {
                        stdout: Vec::new(),
                        stderr: e.to_string().into_bytes(),
                        exit: Exit::Unknown,
                    },
                })
            }
        }
    }

    /// Ends the session cleanly: EOF, then a short wait for psql to go.
    async fn close(mut self) {
        self.process.input.finish().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while self.process.events.recv().await.is_some() {}
        })
        .await;
    }
}

/// Session-mode settings of a target.
#[derive(Debug, Clone, Copy)]
pub struct SessionSettings {
    /// Concurrent jobs (one session each).
    pub max_sessions: usize,
    /// A session unused this long is closed.
    pub idle: Duration,
    /// A session is recycled after this many jobs.
    pub max_jobs: u64,
}

/// Resets that failed on fresh sessions before the pool falls back to
/// per-job mode.
const RESET_FAILURES_BEFORE_FALLBACK: u32 = 3;

/// The warm sessions of one target and role.
pub struct Pool {
    settings: SessionSettings,
    idle: StdMutex<Vec<Session>>,
    slots: Semaphore,
    /// Consecutive sessions whose very first reset failed.
    reset_failures: AtomicU32,
    /// While session mode is given up (resets fail): when it is tried
    /// again, and how long the next pause is. Idle sessions killed by the
    /// server (ChannelTimeout, a killed psql) are normal, so the pause
    /// ends and session mode comes back.
    fallback: StdMutex<Fallback>,
}

/// The pause of session mode after resets kept failing.
#[derive(Debug, Default)]
struct Fallback {
    /// Session mode is tried again after this instant.
    until: Option<Instant>,
    /// The next pause (doubles, at most [`FALLBACK_MAX`]).
    next: Duration,
}

/// The first pause of session mode after resets kept failing.
const FALLBACK_FIRST: Duration = Duration::from_secs(30);
/// The longest pause.
const FALLBACK_MAX: Duration = Duration::from_secs(600);

/// The first pause: [`FALLBACK_FIRST`], or `GOVSQL_TEST_SESSION_PAUSE_MS`
/// in a test build (read once).
fn first_pause() -> Duration {
    static PAUSE: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *PAUSE.get_or_init(|| {
        let test = cfg!(debug_assertions)
            .then(|| std::env::var("GOVSQL_TEST_SESSION_PAUSE_MS").ok())
            .flatten()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis);
        test.unwrap_or(FALLBACK_FIRST)
    })
}

impl Pool {
    /// A pool; its reaper closes idle sessions (when a runtime is there).
    pub fn new(settings: SessionSettings) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            settings,
            idle: StdMutex::new(Vec::new()),
            slots: Semaphore::new(settings.max_sessions.max(1)),
            reset_failures: AtomicU32::new(0),
            fallback: StdMutex::new(Fallback::default()),
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(reap(Arc::downgrade(&pool)));
        }
        pool
    }

    /// Whether session mode was given up on this target (resets fail).
    /// While paused, jobs run one psql each; when the pause ends, session
    /// mode is tried again (three more failed resets pause it longer).
    fn fell_back(&self) -> bool {
        if self.reset_failures.load(Ordering::Relaxed) < RESET_FAILURES_BEFORE_FALLBACK {
            return false;
        }
        let mut f = self.fallback.lock().unwrap_or_else(|p| p.into_inner());
        match f.until {
            Some(until) if Instant::now() < until => true,
            _ => {
                // The pause is over: try sessions again.
                f.until = None;
                self.reset_failures.store(0, Ordering::Relaxed);
                tracing::info!("trying psql sessions again on this target");
                false
            }
        }
    }

    /// Whether session mode is paused now (for health and metrics).
    pub fn paused(&self) -> bool {
        let f = self.fallback.lock().unwrap_or_else(|p| p.into_inner());
        f.until.is_some_and(|u| Instant::now() < u)
    }

    /// Pauses session mode, for longer each time it is paused again.
    fn pause(&self) {
        let mut f = self.fallback.lock().unwrap_or_else(|p| p.into_inner());
        let pause = if f.next.is_zero() {
            first_pause()
        } else {
            f.next
        };
        f.until = Some(Instant::now() + pause);
        f.next = (pause * 2).min(FALLBACK_MAX);
        tracing::error!(
            pause_s = pause.as_secs(),
            "psql sessions on this target cannot reset between jobs; one psql per job until they are tried again (set session_mode = false to make it explicit)"
        );
    }

    /// Runs one script on a warm session (starting one if none is idle).
    pub async fn run(
        &self,
        launch: &dyn Launch,
        req: &ScriptRequest,
        limits: OutputLimits,
    ) -> Result<ScriptOutput, TransportError> {
        let vars = match script_vars(&req.text) {
            Some(v) if !self.fell_back() && !req.nonce.is_empty() => v,
            _ => return run_once(launch.launch().await?, req.text.as_bytes(), limits).await,
        };
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| TransportError::Unreachable("executor closed".into()))?;
        let mut retried = false;
        loop {
            let (mut session, reused) = match self.take().await {
                Some(s) => (s, true),
                None => (Session::new(launch.launch().await?), false),
            };
            let first_reuse = reused && session.jobs == 1;
            match session.run(req, &vars, limits.clone()).await {
                // Dropped: its process is stopped.
                SessionRun::TooLarge(e) => return Err(e),
                SessionRun::Done(out) => {
                    if first_reuse {
                        self.note_first_reuse(true);
                    }
                    self.give_back(session).await;
                    return Ok(out);
                }
                SessionRun::Ended(out) => {
                    // A warm session whose psql had already lost its server
                    // (a restart, an idle backend ended) fails the job's
                    // first statement, the per-job settings, and exits: no
                    // marker of the job was printed, nothing governed ran.
                    // Run it once more on a fresh session.
                    let started = crate::psql::Sections::split(&out.stdout, &req.nonce)
                        .map_or(true, |secs| secs.complete || !secs.parts.is_empty());
                    if first_reuse && !started {
                        self.note_first_reuse(false);
                    }
                    if reused && !retried && !started && matches!(out.exit, Exit::Code(_)) {
                        tracing::info!(
                            "a warm psql session had ended; running the job on a fresh one"
                        );
                        retried = true;
                        continue;
                    }
                    return Ok(out);
                }
            }
        }
    }

    /// An idle session that is still fit, warmest first.
    async fn take(&self) -> Option<Session> {
        loop {
            let session = self.lock().pop()?;
            let mut session = session;
            if session.last_used.elapsed() >= self.settings.idle {
                tokio::spawn(session.close());
                continue;
            }
            let first_reset = session.jobs == 1;
            if session.settle().await {
                return Some(session);
            }
            if first_reset {
                self.note_first_reuse(false);
            }
        }
    }

    /// How a session's first reuse went (its first reset, then its second
    /// job's start): three failures in a row pause session mode; a
    /// success ends the count and the next pause starts short again. A
    /// session whose psql died idle may pass its reset check before its
    /// end is read (a loaded machine), so a second job that meets a dead
    /// psql counts too.
    fn note_first_reuse(&self, ok: bool) {
        if ok {
            self.reset_failures.store(0, Ordering::Relaxed);
            self.fallback.lock().unwrap_or_else(|p| p.into_inner()).next = Duration::ZERO;
            return;
        }
        let n = self.reset_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n == RESET_FAILURES_BEFORE_FALLBACK {
            self.pause();
        }
    }

    async fn give_back(&self, session: Session) {
        if session.jobs >= self.settings.max_jobs {
            tokio::spawn(session.close());
            return;
        }
        self.lock().push(session);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Session>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes every idle session (at shutdown), waiting for each.
    pub async fn close(&self) {
        let sessions: Vec<Session> = std::mem::take(&mut *self.lock());
        for s in sessions {
            s.close().await;
        }
    }

    /// Idle sessions (for tests and health).
    pub fn idle_count(&self) -> usize {
        self.lock().len()
    }
}

/// Closes sessions idle past `session_idle_s`, until the pool is gone.
async fn reap(pool: Weak<Pool>) {
    let tick = match pool.upgrade() {
        Some(p) => (p.settings.idle / 4).clamp(Duration::from_millis(200), Duration::from_secs(30)),
        None => return,
    };
    loop {
        tokio::time::sleep(tick).await;
        let Some(pool) = pool.upgrade() else { return };
        let expired: Vec<Session> = {
            let mut idle = pool.lock();
            let (old, keep): (Vec<Session>, Vec<Session>) = idle
                .drain(..)
                .partition(|s| s.last_used.elapsed() >= pool.settings.idle);
            *idle = keep;
            old
        };
        drop(pool);
        for s in expired {
            tracing::debug!("closing an idle psql session");
            s.close().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_set_by_a_script_are_found_and_gset_is_flagged() {
        assert_eq!(
            script_vars("\\set VERBOSITY sqlstate\nSELECT 1;\n  \\set x_1 'a b'\n\\set x_1 2\n"),
            Some(vec!["VERBOSITY".to_string(), "x_1".to_string()])
        );
        assert_eq!(script_vars("SELECT 1 AS a \\gset\n"), None);
        // A name psql would not take is never echoed into the reset.
        assert_eq!(script_vars("\\set a;b 1\n"), Some(vec![]));
    }

    #[test]
    fn markers_are_found_only_at_a_line_start() {
        let buf = b"xGOVSQL:n:end\nGOVSQL:n:0\nrow\n\0GOVSQL:n:end\nrest";
        let end = marker_end(buf, 0, "n", "end").unwrap();
        assert_eq!(&buf[end..], b"rest");
        assert_eq!(marker_end(b"GOVSQL:n:end", 0, "n", "end"), None);
        assert_eq!(marker_end(b"GOVSQL:m:end\n", 0, "n", "end"), None);
    }

    #[test]
    fn the_reset_follows_the_script_and_unsets_its_variables() {
        let req = ScriptRequest {
            text: "SELECT 1;".into(),
            nonce: "abc".into(),
            tag: "t".into(),
            read: false,
        };
        let text = session_text(&req, &["v".to_string()]);
        assert!(text.starts_with("SELECT 1;\nSELECT 1 WHERE 1 / "));
        assert!(text.ends_with("\\unset v\n\\echo GOVSQL:abc:ready\n"));
    }
}

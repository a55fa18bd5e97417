//! The socket protocol: one JSON object per line, request and reply, each
//! with a protocol version. Typed requests and replies; the daemon answers
//! every line, malformed ones included, with a reply that says what to do.

use serde::{Deserialize, Serialize};

use crate::job::{Job, JobId, JobState, Mode, Params};
use crate::rollout::{Rollout, Strategy};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The longest request line accepted: a 1 MiB value fits, JSON-escaped.
pub const MAX_LINE: usize = 4 * 1024 * 1024;

/// A request line as it is written: the protocol version, then one
/// request (its `op` and fields, flattened into the same object).
#[derive(Debug, Serialize)]
pub struct Envelope<'a> {
    /// Protocol version.
    pub v: u32,
    /// The request.
    #[serde(flatten)]
    pub request: &'a Request,
}

impl<'a> Envelope<'a> {
    /// A request in this build's protocol version.
    pub fn of(request: &'a Request) -> Envelope<'a> {
        Envelope {
            v: PROTOCOL_VERSION,
            request,
        }
    }
}

/// A client request: one struct per operation, named by `op` on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Queue a job.
    Submit(Submit),
    /// Only check a job (command, target, access, params): nothing is
    /// queued; the reply's job is what would have been submitted.
    Check(JobSpec),
    /// A job's state.
    Status(JobRef),
    /// Wait until a job is terminal (or the wait times out).
    Wait(WaitFor),
    /// Recent jobs.
    List(ListJobs),
    /// Approve a job that waits for approval.
    Approve(Approve),
    /// Reject a job that waits for approval (an approver; the reason goes
    /// into the ledger's evidence, at most 200 characters).
    Reject(Reject),
    /// What a job will run, param values included: for an approver (or
    /// the submitter) before approving. Never logged.
    Show(JobRef),
    /// Cancel a queued or waiting job.
    Cancel(JobRef),
    /// The daemon's health.
    Health {},
    /// The ledger of a target, newest first (`govsql log`).
    Log(ReadLog),
    /// The metrics, in the Prometheus text exposition format.
    Metrics {},
    /// Recent rollouts (`govsql rollouts`).
    Rollouts(ListRollouts),
    /// One rollout, per target (`govsql rollout status`).
    RolloutStatus(RolloutRef),
    /// A new pass over a halted, partial or cancelled rollout's targets
    /// that did not succeed.
    RolloutResume(RolloutRef),
    /// Cancel a rollout: nothing more starts.
    RolloutCancel(RolloutRef),
}

/// One rollout, by id.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutRef {
    /// The rollout.
    pub rollout_id: JobId,
}

/// A page of recent rollouts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListRollouts {
    /// At most this many (default 20, at most 200).
    #[serde(default)]
    pub limit: Option<u32>,
}

/// A job to check: what a submit names.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// The catalog command.
    pub command: String,
    /// plan, apply or verify.
    pub mode: Mode,
    /// `[name, value]` pairs.
    #[serde(default)]
    pub params: Params,
    /// The target (default: the config's default).
    #[serde(default)]
    pub target: Option<String>,
    /// The idempotency key (default: `job:<job_id>`).
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// apply: the plan digest it is pinned to (`--plan`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_digest: Option<String>,
}

/// A job to queue (a [`JobSpec`]'s fields, and whether to wait).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Submit {
    /// The catalog command.
    pub command: String,
    /// plan, apply or verify.
    pub mode: Mode,
    /// `[name, value]` pairs.
    #[serde(default)]
    pub params: Params,
    /// The target (default: the config's default).
    #[serde(default)]
    pub target: Option<String>,
    /// The idempotency key (default: `job:<job_id>`).
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// apply: the plan digest it is pinned to (`--plan`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_digest: Option<String>,
    /// Answer only once the job is terminal (result included).
    #[serde(default)]
    pub wait: bool,
    /// With `wait`: give up waiting after this long (the job goes on).
    #[serde(default)]
    pub timeout_s: Option<u64>,
    /// A selector (`--targets`): the job becomes a rollout over the
    /// targets it picks (not with `target`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<String>,
    /// A rollout's strategy (only with `targets`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<Strategy>,
}

impl From<JobSpec> for Submit {
    /// A submit of the job, answered at once.
    fn from(j: JobSpec) -> Submit {
        Submit {
            command: j.command,
            mode: j.mode,
            params: j.params,
            target: j.target,
            idempotency_key: j.idempotency_key,
            plan_digest: j.plan_digest,
            wait: false,
            timeout_s: None,
            targets: None,
            strategy: None,
        }
    }
}

impl Submit {
    /// The job it names.
    pub fn spec(self) -> JobSpec {
        JobSpec {
            command: self.command,
            mode: self.mode,
            params: self.params,
            target: self.target,
            idempotency_key: self.idempotency_key,
            plan_digest: self.plan_digest,
        }
    }
}

/// One job, by id.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRef {
    /// The job.
    pub job_id: JobId,
}

/// A wait for one job.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitFor {
    /// The job.
    pub job_id: JobId,
    /// Give up after this long (default 3600 s).
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

/// A page of recent jobs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListJobs {
    /// At most this many (default 100, at most 1000).
    #[serde(default)]
    pub limit: Option<u32>,
    /// Which page of `limit` jobs, newest first (default 0).
    #[serde(default)]
    pub page: Option<u32>,
    /// Only the jobs that match.
    #[serde(default)]
    pub filter: ListFilter,
}

/// An approval.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approve {
    /// The job.
    pub job_id: JobId,
    /// Why (optional, at most 200 characters; into the ledger).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The plan digest the approver saw (`show`): the approval is refused
    /// if the job is pinned to another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
}

/// A rejection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reject {
    /// The job.
    pub job_id: JobId,
    /// Why.
    pub reason: String,
}

/// A read of a target's ledger.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadLog {
    /// The target (default: the config's default).
    #[serde(default)]
    pub target: Option<String>,
    /// Which rows.
    #[serde(default)]
    pub filter: LogFilter,
    /// At most this many (default 50, at most 1000).
    #[serde(default)]
    pub limit: Option<u32>,
}

/// Which ledger rows `log` shows (every field optional; all must match).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogFilter {
    /// The catalog command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// planned, applied, verified, refused or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// plan, apply or verify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// The actor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Written at or after this Unix time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<i64>,
    /// Leave verify runs (healthchecks) out.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_verify: bool,
}

/// One ledger row, as `log` shows it (no value: the ledger has none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// The run id.
    pub run_id: i64,
    /// When it was written (UTC text).
    pub at: String,
    /// When it was written (Unix time).
    pub at_unix: i64,
    /// The catalog command.
    pub command: String,
    /// plan, apply or verify.
    pub mode: String,
    /// The run's status.
    pub status: String,
    /// Who submitted it.
    pub actor: String,
    /// The error class of a refused or failed run.
    pub error_class: Option<String>,
    /// How long the job took.
    pub duration_ms: Option<i64>,
    /// The daemon's job id (absent for --direct runs of old versions).
    pub job_id: Option<String>,
    /// The target it ran on.
    pub target: Option<String>,
    /// The plan digest it recorded (plan) or was pinned to (apply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_digest: Option<String>,
    /// Who approved it, comma-separated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approvers: Option<String>,
}

/// Which jobs a list shows (every field optional; all must match).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListFilter {
    /// The job's state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<JobState>,
    /// plan, apply or verify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// The catalog command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// The submitting user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// The target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Submitted at or after this Unix time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<i64>,
}

/// The daemon's health.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Health {
    /// Daemon pid.
    pub pid: u32,
    /// Seconds since start.
    pub uptime_s: u64,
    /// Jobs per state.
    pub jobs: std::collections::BTreeMap<JobState, i64>,
    /// Whether every worker answered its last heartbeat.
    pub workers_alive: bool,
    /// Seconds since the last watchdog heartbeat.
    pub last_heartbeat_s: u64,
    /// The local apply switch.
    pub apply_switch: bool,
    /// The catalog digest in use.
    pub catalog_digest: String,
    /// Targets and their transports.
    pub targets: Vec<String>,
    /// Each target's reachability, as its recent jobs found it.
    #[serde(default)]
    pub target_health: Vec<TargetHealth>,
    /// Seconds since the oldest unsettled apply was submitted (none:
    /// absent). An unsettled job waits for its ledger without bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_unsettled_s: Option<u64>,
    /// Rollouts per state.
    #[serde(default)]
    pub rollouts: std::collections::BTreeMap<crate::rollout::RolloutState, i64>,
    /// Targets of the rollouts not finished yet, per state.
    #[serde(default)]
    pub rollout_targets: std::collections::BTreeMap<String, i64>,
    /// Seconds since the oldest running rollout was submitted (none:
    /// absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_running_rollout_s: Option<u64>,
}

/// How a target's recent jobs went.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TargetHealth {
    /// The target.
    pub name: String,
    /// Its tags (`--targets tag:NAME`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// ssh or local.
    pub transport: String,
    /// False when its latest job could not reach the database.
    pub reachable: bool,
    /// When a job last reached the database (unix seconds).
    pub last_ok_at: Option<i64>,
    /// When a job last could not (unix seconds).
    pub last_error_at: Option<i64>,
    /// That job's error class.
    pub last_error_class: Option<String>,
    /// The script format its remote-gate announced (none seen: absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate_format: Option<u32>,
    /// Session mode is paused on it (resets kept failing; retried with
    /// backoff).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sessions_paused: bool,
}

/// A reply: exactly one answer, or an error. On the wire it is one JSON
/// object with the version, `ok`, and the one field its answer names
/// (`job`, `jobs`, `health`, `metrics`, `log`, `show`, `rollout`, `rollouts` or `error`); a line
/// with more than one, or an error that is not one, is an unexpected
/// message.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "WireReply")]
pub enum Reply {
    /// A success with nothing attached (a rejection whose job row is gone).
    Done,
    /// submit, check, status, wait, approve, reject, cancel: the job.
    Job(Box<Job>),
    /// list, approvals: the jobs.
    Jobs(Vec<Job>),
    /// health.
    Health(Box<Health>),
    /// metrics: the text exposition.
    Metrics(String),
    /// log: the ledger rows.
    Log(Vec<LogEntry>),
    /// show: what the job will run.
    Show(Box<ShowJob>),
    /// A submit with targets, rollout status, resume, cancel: the rollout.
    Rollout(Box<Rollout>),
    /// rollouts: the rollouts.
    Rollouts(Vec<Rollout>),
    /// The request failed: what went wrong and what to do.
    Error(ReplyError),
}

/// A reply as it is read from the socket.
#[derive(Debug, Deserialize)]
struct WireReply {
    v: u32,
    ok: bool,
    #[serde(default)]
    error: Option<ReplyError>,
    #[serde(default)]
    job: Option<Box<Job>>,
    #[serde(default)]
    jobs: Option<Vec<Job>>,
    #[serde(default)]
    health: Option<Box<Health>>,
    #[serde(default)]
    metrics: Option<String>,
    #[serde(default)]
    log: Option<Vec<LogEntry>>,
    #[serde(default)]
    show: Option<Box<ShowJob>>,
    #[serde(default)]
    rollout: Option<Box<Rollout>>,
    #[serde(default)]
    rollouts: Option<Vec<Rollout>>,
}

/// A reply as it is written to the socket (borrowed: a job's result is
/// never copied to be sent).
#[derive(Default, Serialize)]
struct WireOut<'a> {
    v: u32,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a ReplyError>,
    #[serde(skip_serializing_if = "Option::is_none")]
    job: Option<&'a Job>,
    #[serde(skip_serializing_if = "Option::is_none")]
    jobs: Option<&'a [Job]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    health: Option<&'a Health>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    log: Option<&'a [LogEntry]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    show: Option<&'a ShowJob>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rollout: Option<&'a Rollout>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rollouts: Option<&'a [Rollout]>,
}

impl Serialize for Reply {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let ok = WireOut {
            v: PROTOCOL_VERSION,
            ok: true,
            ..WireOut::default()
        };
        match self {
            Reply::Done => ok,
            Reply::Job(job) => WireOut {
                job: Some(job),
                ..ok
            },
            Reply::Jobs(jobs) => WireOut {
                jobs: Some(jobs),
                ..ok
            },
            Reply::Health(h) => WireOut {
                health: Some(h),
                ..ok
            },
            Reply::Metrics(text) => WireOut {
                metrics: Some(text),
                ..ok
            },
            Reply::Log(rows) => WireOut {
                log: Some(rows),
                ..ok
            },
            Reply::Show(show) => WireOut {
                show: Some(show),
                ..ok
            },
            Reply::Rollout(r) => WireOut {
                rollout: Some(r),
                ..ok
            },
            Reply::Rollouts(r) => WireOut {
                rollouts: Some(r),
                ..ok
            },
            Reply::Error(e) => WireOut {
                ok: false,
                error: Some(e),
                ..ok
            },
        }
        .serialize(s)
    }
}

impl TryFrom<WireReply> for Reply {
    type Error = String;
    fn try_from(w: WireReply) -> Result<Reply, String> {
        const UNEXPECTED: &str = "unexpected message from the daemon; is the client up to date?";
        if w.v != PROTOCOL_VERSION {
            return Err(format!(
                "the daemon speaks protocol version {} and this client {PROTOCOL_VERSION}; is the client up to date?",
                w.v
            ));
        }
        let answers = [
            w.job.is_some(),
            w.jobs.is_some(),
            w.health.is_some(),
            w.metrics.is_some(),
            w.log.is_some(),
            w.show.is_some(),
            w.rollout.is_some(),
            w.rollouts.is_some(),
        ]
        .into_iter()
        .filter(|&a| a)
        .count();
        match (w.ok, w.error) {
            (false, Some(e)) if answers == 0 => Ok(Reply::Error(e)),
            (true, None) if answers <= 1 => Ok(if let Some(j) = w.job {
                Reply::Job(j)
            } else if let Some(j) = w.jobs {
                Reply::Jobs(j)
            } else if let Some(h) = w.health {
                Reply::Health(h)
            } else if let Some(m) = w.metrics {
                Reply::Metrics(m)
            } else if let Some(l) = w.log {
                Reply::Log(l)
            } else if let Some(s) = w.show {
                Reply::Show(s)
            } else if let Some(r) = w.rollout {
                Reply::Rollout(r)
            } else if let Some(r) = w.rollouts {
                Reply::Rollouts(r)
            } else {
                Reply::Done
            }),
            _ => Err(UNEXPECTED.to_string()),
        }
    }
}

/// What a job will run, for its approver.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShowJob {
    /// The job.
    pub job_id: JobId,
    /// Its state.
    pub state: JobState,
    /// Who submitted it.
    pub actor: String,
    /// The catalog command.
    pub command: String,
    /// plan, apply or verify.
    pub mode: Mode,
    /// The target (a rollout: its first).
    pub target: String,
    /// A rollout's targets, in order: what one approval covers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
    /// The command's description.
    pub description: String,
    /// Its statements, with `{{name}}` placeholders.
    pub statements: Vec<String>,
    /// The param values it was submitted with, `[name, value]`.
    pub params: Vec<(String, String)>,
    /// The plan digest it is pinned to: what an approval approves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_digest: Option<String>,
    /// What that plan covers (when the daemon pinned it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_covers: Option<serde_json::Value>,
    /// Its approvals so far.
    #[serde(default)]
    pub approvals: Vec<crate::job::Approval>,
    /// How many distinct approvers it needs (0: none).
    #[serde(default)]
    pub approvals_required: u8,
}

/// What kind of failure a reply reports.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReplyKind {
    /// The request is malformed.
    BadRequest,
    /// The client speaks another protocol version.
    Version,
    /// The request line is over [`MAX_LINE`].
    TooLong,
    /// The peer may not do this.
    Denied,
    /// No such job (or not one the peer may see).
    NotFound,
    /// The job is not in a state that allows this.
    Conflict,
    /// Not a catalog command.
    UnknownCommand,
    /// The named target does not exist.
    UnknownTarget,
    /// The approval came too late.
    Expired,
    /// The daemon cannot take this now (shutting down, queue full).
    Unavailable,
    /// A wait ended before the job did.
    Timeout,
    /// A bug or an I/O failure in the daemon.
    Internal,
}

impl ReplyKind {
    /// The exit code of a client that got this error.
    pub fn exit_code(self) -> crate::job::ExitCode {
        use crate::job::ExitCode;
        match self {
            ReplyKind::BadRequest
            | ReplyKind::Version
            | ReplyKind::TooLong
            | ReplyKind::UnknownTarget => ExitCode::Usage,
            ReplyKind::Denied | ReplyKind::Expired | ReplyKind::UnknownCommand => ExitCode::Refused,
            ReplyKind::Timeout => ExitCode::Pending,
            ReplyKind::NotFound
            | ReplyKind::Conflict
            | ReplyKind::Unavailable
            | ReplyKind::Internal => ExitCode::Error,
        }
    }
}

/// Why a request failed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplyError {
    /// What kind of failure.
    pub kind: ReplyKind,
    /// What to do about it.
    pub message: String,
}

impl Reply {
    /// A success carrying a job.
    pub fn job(job: Job) -> Reply {
        Reply::Job(Box::new(job))
    }

    /// A failure.
    pub fn error(kind: ReplyKind, message: impl Into<String>) -> Reply {
        Reply::Error(ReplyError {
            kind,
            message: message.into(),
        })
    }

    /// The error, if it is one.
    pub fn as_error(&self) -> Option<&ReplyError> {
        match self {
            Reply::Error(e) => Some(e),
            _ => None,
        }
    }
}

/// The deepest nesting a request may have (a param pair is at depth 3).
pub const MAX_DEPTH: usize = 8;
/// The most JSON values a request may hold (params included).
pub const MAX_ITEMS: usize = 1024;

/// A streaming check of a request's shape before anything is allocated
/// for it: nesting at most [`MAX_DEPTH`], at most [`MAX_ITEMS`] values (a
/// 4 MiB array of zeros would otherwise become two million values).
fn check_shape(line: &[u8]) -> Result<(), String> {
    let (mut depth, mut items, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in line {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(format!("request nested deeper than {MAX_DEPTH} levels"));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b',' => {
                items += 1;
                if items > MAX_ITEMS {
                    return Err(format!("request holds more than {MAX_ITEMS} values"));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Parses one request line; the error is the reply to send.
pub fn parse_request(line: &[u8]) -> Result<Request, Box<Reply>> {
    let bad = |msg: String| Box::new(Reply::error(ReplyKind::BadRequest, msg));
    check_shape(line).map_err(|why| bad(format!("{why}; send one flat request per line")))?;
    let text = std::str::from_utf8(line).map_err(|_| bad("request is not UTF-8".into()))?;
    let mut value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        bad(format!(
            "request is not one JSON object per line: {}",
            redact_quoted(&e.to_string())
        ))
    })?;
    let v = value.get("v").and_then(|v| v.as_u64());
    if v != Some(u64::from(PROTOCOL_VERSION)) {
        return Err(Box::new(Reply::error(
            ReplyKind::Version,
            format!("protocol version {PROTOCOL_VERSION} expected (field \"v\"); is the client up to date?"),
        )));
    }
    if let Some(fields) = value.as_object_mut() {
        fields.remove("v");
    }
    serde_json::from_value(value).map_err(|e| {
        bad(format!(
            "unexpected message ({}); is the client up to date?",
            redact_quoted(&e.to_string())
        ))
    })
}

/// serde quotes offending values between backticks; a param value must
/// never be echoed, so every quoted part is dropped.
fn redact_quoted(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut inside = false;
    for c in msg.chars() {
        if c == '`' {
            if !inside {
                out.push('…');
            }
            inside = !inside;
        } else if !inside {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_or_huge_requests_are_refused_before_parsing() {
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        let e = parse_request(deep.as_bytes()).unwrap_err();
        assert!(e.as_error().unwrap().message.contains("nested"));
        let wide = format!(
            r#"{{"v":1,"op":"health","x":[{}0]}}"#,
            "0,".repeat(MAX_ITEMS)
        );
        let e = parse_request(wide.as_bytes()).unwrap_err();
        assert!(e.as_error().unwrap().message.contains("values"));
        // Brackets and commas inside strings are text, not structure.
        let text = format!(
            r#"{{"v":1,"op":"submit","command":"dot_iu_create_collection","mode":"apply","params":[["title","{}\"{}"]]}}"#,
            "[,".repeat(MAX_ITEMS),
            "{".repeat(MAX_DEPTH + 1)
        );
        parse_request(text.as_bytes()).unwrap();
    }

    #[test]
    fn requests_round_trip_and_bad_ones_get_reasons() {
        let r = parse_request(
            br#"{"v":1,"op":"submit","command":"dot_iu_healthcheck","mode":"verify"}"#,
        )
        .unwrap();
        assert!(matches!(
            r,
            Request::Submit(Submit {
                mode: Mode::Verify,
                ..
            })
        ));
        // A check is its own request; a submit that asks for a check is an
        // older client's.
        let c = br#"{"v":1,"op":"check","command":"dot_iu_healthcheck","mode":"verify"}"#;
        assert!(matches!(parse_request(c).unwrap(), Request::Check(_)));
        let old =
            br#"{"v":1,"op":"submit","command":"dot_iu_healthcheck","mode":"verify","check":true}"#;
        let msg = parse_request(old)
            .unwrap_err()
            .as_error()
            .unwrap()
            .message
            .clone();
        assert!(msg.contains("is the client up to date?"), "{msg}");
        // The envelope writes what the daemon reads.
        let req = Request::Wait(WaitFor {
            job_id: JobId::parse("abc-1").unwrap(),
            timeout_s: Some(5),
        });
        let line = serde_json::to_vec(&Envelope::of(&req)).unwrap();
        assert!(
            matches!(parse_request(&line).unwrap(), Request::Wait(w) if w.timeout_s == Some(5))
        );
        let line = serde_json::to_vec(&Envelope::of(&Request::Health {})).unwrap();
        assert_eq!(line, br#"{"v":1,"op":"health"}"#);
        for (line, kind) in [
            (&b"not json"[..], ReplyKind::BadRequest),
            (br#"{"v":2,"op":"health"}"#, ReplyKind::Version),
            (br#"{"op":"health"}"#, ReplyKind::Version),
            (br#"{"v":1,"op":"explode"}"#, ReplyKind::BadRequest),
            (br#"{"v":1,"op":"status"}"#, ReplyKind::BadRequest),
            (
                br#"{"v":1,"op":"status","job_id":"NOT AN ID"}"#,
                ReplyKind::BadRequest,
            ),
            (br#"{"v":1,"op":"health","extra":1}"#, ReplyKind::BadRequest),
            (b"\xff\xfe", ReplyKind::BadRequest),
        ] {
            let err = parse_request(line).unwrap_err();
            assert_eq!(
                err.as_error().unwrap().kind,
                kind,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn a_wrong_field_value_is_not_echoed() {
        for line in [
            &br#"{"v":1,"op":"submit","command":"x","mode":"CANARY-123"}"#[..],
            br#"{"v":1,"op":"submit","command":"x","mode":"plan","params":[["a",987654321]]}"#,
            br#"{"v":1,"op":"submit","command":"x","mode":"plan","params":[["a","CANARY-123","x"]]}"#,
        ] {
            let msg = parse_request(line).unwrap_err().as_error().unwrap().message.clone();
            assert!(!msg.contains("CANARY") && !msg.contains("987654321"), "{msg}");
        }
    }

    #[test]
    fn a_reply_is_one_answer_on_the_wire_and_anything_else_is_unexpected() {
        let e = serde_json::to_string(&Reply::error(ReplyKind::NotFound, "no such job")).unwrap();
        assert_eq!(
            e,
            r#"{"v":1,"ok":false,"error":{"kind":"not_found","message":"no such job"}}"#
        );
        assert!(matches!(
            serde_json::from_str::<Reply>(&e).unwrap(),
            Reply::Error(ReplyError {
                kind: ReplyKind::NotFound,
                ..
            })
        ));
        let m = serde_json::to_string(&Reply::Metrics("x 1\n".into())).unwrap();
        assert_eq!(m, r#"{"v":1,"ok":true,"metrics":"x 1\n"}"#);
        assert!(
            matches!(serde_json::from_str::<Reply>(&m).unwrap(), Reply::Metrics(t) if t == "x 1\n")
        );
        assert!(matches!(
            serde_json::from_str::<Reply>(r#"{"v":1,"ok":true}"#).unwrap(),
            Reply::Done
        ));
        for bad in [
            r#"{"v":1,"ok":true,"metrics":"a","log":[]}"#,
            r#"{"v":1,"ok":false}"#,
            r#"{"v":1,"ok":false,"metrics":"a","error":{"kind":"internal","message":"m"}}"#,
            r#"{"v":2,"ok":true}"#,
        ] {
            let err = serde_json::from_str::<Reply>(bad).unwrap_err().to_string();
            assert!(err.contains("is the client up to date?"), "{bad}: {err}");
        }
    }
}

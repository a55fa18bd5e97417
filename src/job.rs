//! A job's vocabulary as types: its id, mode, state, run status, error
//! class and the process exit code an outcome maps to. The words these
//! serialize to are the ledger's and the wire's; nothing else in the crate
//! compares a state or a class as a string.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The effective user's name (the actor of `--direct` jobs, the "who" of
/// a switch change); `uid<N>` when it has none.
pub fn effective_user() -> String {
    let uid = nix::unistd::Uid::effective();
    nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| format!("uid{uid}"))
}

/// One approval of a job: who, when (UTC), and why if they said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// The approver's user name.
    pub by: String,
    /// When (`YYYY-MM-DD HH:MM:SSZ`).
    pub at: String,
    /// Their words (at most 200 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Whether `s` is a plan digest: 64 lowercase hex characters (sha256).
pub fn valid_plan_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A job's id: `<hex seconds>-<8 hex random>`, at most 64 characters of
/// `[0-9a-z-]` when it comes from a client, so an unknown id is refused
/// before anything is looked up or held.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JobId(String);

impl TryFrom<String> for JobId {
    type Error = &'static str;
    fn try_from(s: String) -> Result<JobId, Self::Error> {
        JobId::parse(&s).ok_or("not a job id (1-64 characters of a-z 0-9 -)")
    }
}

impl From<JobId> for String {
    fn from(id: JobId) -> String {
        id.0
    }
}

impl JobId {
    /// The longest id a client may send.
    pub const MAX_LEN: usize = 64;

    /// A fresh id.
    pub fn new() -> JobId {
        use rand::Rng;
        JobId(format!(
            "{:x}-{:08x}",
            crate::time::unix_now(),
            rand::thread_rng().gen::<u32>()
        ))
    }

    /// An id from outside (a client, a stored row): only the id alphabet.
    pub fn parse(s: &str) -> Option<JobId> {
        let ok = (1..=Self::MAX_LEN).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        ok.then(|| JobId(s.to_string()))
    }

    /// The id's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for JobId {
    fn default() -> Self {
        JobId::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `s` is a runtime-owned identifier (idempotency key, actor):
/// 1-128 characters of `A-Z a-z 0-9 . _ : @ -`. Such values may be written
/// into SQL as plain literals.
pub fn valid_identifier(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b))
}

/// plan, apply or verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Resolve and audit; never runs the command's SQL.
    Plan,
    /// Run it, gated and atomic with its ledger row.
    Apply,
    /// Read-only checks.
    Verify,
}

impl Mode {
    /// The ledger's word.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Plan => "plan",
            Mode::Apply => "apply",
            Mode::Verify => "verify",
        }
    }

    /// The ledger's word back (a stored row with another word is an error).
    pub fn parse(s: &str) -> Option<Mode> {
        Some(match s {
            "plan" => Mode::Plan,
            "apply" => Mode::Apply,
            "verify" => Mode::Verify,
            _ => return None,
        })
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A run's terminal status, as the ledger spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// plan succeeded.
    Planned,
    /// apply committed.
    Applied,
    /// verify checks all ok.
    Verified,
    /// a precondition failed before any command SQL ran.
    Refused,
    /// the SQL ran and errored, or the job could not run within its limits.
    Failed,
}

impl RunStatus {
    /// The ledger's word.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Planned => "planned",
            RunStatus::Applied => "applied",
            RunStatus::Verified => "verified",
            RunStatus::Refused => "refused",
            RunStatus::Failed => "failed",
        }
    }

    /// The ledger's word back.
    pub fn parse(s: &str) -> Option<RunStatus> {
        Some(match s {
            "planned" => RunStatus::Planned,
            "applied" => RunStatus::Applied,
            "verified" => RunStatus::Verified,
            "refused" => RunStatus::Refused,
            "failed" => RunStatus::Failed,
            _ => return None,
        })
    }

    /// Planned, applied or verified: the key is used up.
    pub fn is_success(self) -> bool {
        matches!(
            self,
            RunStatus::Planned | RunStatus::Applied | RunStatus::Verified
        )
    }

    /// The process exit code of a job that ended so.
    pub fn exit_code(self) -> ExitCode {
        match self {
            RunStatus::Planned | RunStatus::Applied | RunStatus::Verified => ExitCode::Ok,
            RunStatus::Refused => ExitCode::Refused,
            RunStatus::Failed => ExitCode::Failed,
        }
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A job's state in the daemon: waiting, running, unsettled, or one
/// terminal state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a worker.
    Queued,
    /// Waiting for a second person's approval.
    AwaitingApproval,
    /// A worker runs it.
    Running,
    /// An apply whose outcome is not known yet; settled by idempotency key.
    Unsettled,
    /// Terminal: plan succeeded.
    Planned,
    /// Terminal: apply committed.
    Applied,
    /// Terminal: verify checks all ok.
    Verified,
    /// Terminal: refused.
    Refused,
    /// Terminal: failed.
    Failed,
    /// Terminal: cancelled before it ran (its ledger row says refused).
    Cancelled,
}

impl JobState {
    /// Every state, for counts and filters.
    pub const ALL: [JobState; 10] = [
        JobState::Queued,
        JobState::AwaitingApproval,
        JobState::Running,
        JobState::Unsettled,
        JobState::Planned,
        JobState::Applied,
        JobState::Verified,
        JobState::Refused,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// The word stored in the queue and sent on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::AwaitingApproval => "awaiting_approval",
            JobState::Running => "running",
            JobState::Unsettled => "unsettled",
            JobState::Planned => "planned",
            JobState::Applied => "applied",
            JobState::Verified => "verified",
            JobState::Refused => "refused",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// The word back.
    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether the job has ended.
    pub fn is_terminal(self) -> bool {
        !matches!(
            self,
            JobState::Queued | JobState::AwaitingApproval | JobState::Running | JobState::Unsettled
        )
    }

    /// The state a job ends in with this outcome.
    pub fn from_outcome(status: RunStatus, class: Option<&ErrorClass>) -> JobState {
        match (status, class) {
            (RunStatus::Refused, Some(ErrorClass::Cancelled)) => JobState::Cancelled,
            (RunStatus::Planned, _) => JobState::Planned,
            (RunStatus::Applied, _) => JobState::Applied,
            (RunStatus::Verified, _) => JobState::Verified,
            (RunStatus::Refused, _) => JobState::Refused,
            (RunStatus::Failed, _) => JobState::Failed,
        }
    }

    /// The exit code of a client that stopped looking at a job in this
    /// state (terminal states use the outcome's code).
    pub fn exit_code(self) -> ExitCode {
        match self {
            JobState::Planned | JobState::Applied | JobState::Verified => ExitCode::Ok,
            JobState::Refused | JobState::Cancelled => ExitCode::Refused,
            JobState::Failed => ExitCode::Failed,
            JobState::Queued
            | JobState::AwaitingApproval
            | JobState::Running
            | JobState::Unsettled => ExitCode::Pending,
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a job was refused or failed: the fixed set of DESIGN.md, or the
/// SQLSTATE the command's SQL raised.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Not a catalog command.
    UnknownCommand,
    /// A param is missing, unknown, mistyped or too long.
    BadParams,
    /// A statement is not governed SQL.
    UnsafePlan,
    /// The submitter may not run this mode.
    NotAllowed,
    /// The command needs an approval it does not have.
    ApprovalMissing,
    /// The approval (or the wait for it) is older than approval_ttl_s.
    ApprovalExpired,
    /// An approver rejected it.
    Rejected,
    /// Cancelled before it ran.
    Cancelled,
    /// The local apply switch is off.
    KillSwitch,
    /// A database gate is shut.
    GateClosed,
    /// The database holds another catalog.
    CatalogDrift,
    /// A target function of the command does not resolve.
    TargetMissing,
    /// The idempotency key was used with other params.
    IdempotencyConflict,
    /// A value could reach the server log.
    LogExposure,
    /// The command's SQL raised this SQLSTATE; nothing committed.
    Sql(String),
    /// A function answered a status the command does not expect.
    UnexpectedStatus,
    /// verify: a check answered not ok.
    VerificationFailed,
    /// Past the job's deadline; its backend was told to stop.
    Timeout,
    /// The result exceeded max_result_bytes.
    ResultTooLarge,
    /// The SSH target could not be reached (or the session was lost).
    TargetUnreachable,
    /// The server's host key is unknown or changed.
    HostKey,
    /// SSH authentication failed.
    SshAuth,
    /// psql could not reach PostgreSQL.
    DbUnavailable,
    /// The database host's remote-gate refused the script: nothing ran.
    RemoteGate,
    /// The apply changed more rows than the command's `max_rows`; rolled
    /// back.
    RowCap,
    /// A freeze window covers the command at commit; rolled back.
    Frozen,
    /// The approved plan no longer matches what would run.
    PlanDrift,
    /// A bug; the message says what.
    Internal,
}

impl ErrorClass {
    const WORDS: [(&'static str, ErrorClass); 27] = [
        ("unknown_command", ErrorClass::UnknownCommand),
        ("bad_params", ErrorClass::BadParams),
        ("unsafe_plan", ErrorClass::UnsafePlan),
        ("not_allowed", ErrorClass::NotAllowed),
        ("approval_missing", ErrorClass::ApprovalMissing),
        ("approval_expired", ErrorClass::ApprovalExpired),
        ("rejected", ErrorClass::Rejected),
        ("cancelled", ErrorClass::Cancelled),
        ("kill_switch", ErrorClass::KillSwitch),
        ("gate_closed", ErrorClass::GateClosed),
        ("catalog_drift", ErrorClass::CatalogDrift),
        ("target_missing", ErrorClass::TargetMissing),
        ("idempotency_conflict", ErrorClass::IdempotencyConflict),
        ("log_exposure", ErrorClass::LogExposure),
        ("unexpected_status", ErrorClass::UnexpectedStatus),
        ("verification_failed", ErrorClass::VerificationFailed),
        ("timeout", ErrorClass::Timeout),
        ("result_too_large", ErrorClass::ResultTooLarge),
        ("target_unreachable", ErrorClass::TargetUnreachable),
        ("host_key", ErrorClass::HostKey),
        ("ssh_auth", ErrorClass::SshAuth),
        ("db_unavailable", ErrorClass::DbUnavailable),
        ("remote_gate", ErrorClass::RemoteGate),
        ("row_cap", ErrorClass::RowCap),
        ("frozen", ErrorClass::Frozen),
        ("plan_drift", ErrorClass::PlanDrift),
        ("internal", ErrorClass::Internal),
    ];

    /// The word on the wire and in the ledger.
    pub fn as_str(&self) -> &str {
        if let ErrorClass::Sql(state) = self {
            return state;
        }
        Self::WORDS
            .iter()
            .find(|(_, c)| c == self)
            .map(|(w, _)| *w)
            .unwrap_or("internal")
    }

    /// The class of a word; a 5-character SQLSTATE is [`ErrorClass::Sql`].
    /// Words of queues written by earlier releases are read as their
    /// successors.
    pub fn parse(s: &str) -> Option<ErrorClass> {
        if let Some((_, c)) = Self::WORDS.iter().find(|(w, _)| *w == s) {
            return Some(c.clone());
        }
        Some(match s {
            "peer_not_allowed" => ErrorClass::NotAllowed,
            "bad_request" => ErrorClass::BadParams,
            "transport" => ErrorClass::TargetUnreachable,
            "output" | "ledger" => ErrorClass::Internal,
            _ if is_sqlstate(s) => ErrorClass::from_sqlstate(s),
            _ => return None,
        })
    }

    /// The class of an SQLSTATE the command's SQL raised: the
    /// statement_timeout guard (57014) is a timeout.
    pub fn from_sqlstate(state: &str) -> ErrorClass {
        if state == "57014" {
            ErrorClass::Timeout
        } else {
            ErrorClass::Sql(state.to_string())
        }
    }

    /// The outcome this class belongs to.
    pub fn status(&self) -> RunStatus {
        match self {
            ErrorClass::UnknownCommand
            | ErrorClass::BadParams
            | ErrorClass::UnsafePlan
            | ErrorClass::NotAllowed
            | ErrorClass::ApprovalMissing
            | ErrorClass::ApprovalExpired
            | ErrorClass::Rejected
            | ErrorClass::Cancelled
            | ErrorClass::KillSwitch
            | ErrorClass::GateClosed
            | ErrorClass::CatalogDrift
            | ErrorClass::TargetMissing
            | ErrorClass::IdempotencyConflict
            | ErrorClass::LogExposure
            | ErrorClass::Frozen
            | ErrorClass::PlanDrift => RunStatus::Refused,
            ErrorClass::Sql(_)
            | ErrorClass::UnexpectedStatus
            | ErrorClass::VerificationFailed
            | ErrorClass::Timeout
            | ErrorClass::ResultTooLarge
            | ErrorClass::TargetUnreachable
            | ErrorClass::HostKey
            | ErrorClass::SshAuth
            | ErrorClass::DbUnavailable
            | ErrorClass::RemoteGate
            | ErrorClass::RowCap
            | ErrorClass::Internal => RunStatus::Failed,
        }
    }
}

/// Whether `s` looks like an SQLSTATE: 5 characters of `0-9 A-Z`.
pub fn is_sqlstate(s: &str) -> bool {
    s.len() == 5
        && s.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorClass {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorClass {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let word = String::deserialize(d)?;
        ErrorClass::parse(&word).ok_or_else(|| {
            serde::de::Error::custom("unknown error class (is the client up to date?)")
        })
    }
}

/// The process exit codes of DESIGN.md, decided here only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    /// planned, applied, verified, or queued without --wait.
    Ok = 0,
    /// daemon unreachable, config unreadable, internal.
    Error = 1,
    /// unknown subcommand or flag, malformed `--param`, unknown target.
    Usage = 2,
    /// refused (an unknown command too, in every subcommand).
    Refused = 3,
    /// failed.
    Failed = 4,
    /// still unsettled or still waiting when `--timeout` ended the wait.
    Pending = 5,
}

impl ExitCode {
    /// The process exit status.
    pub fn code(self) -> i32 {
        self as i32
    }
}

/// A job's raw params, `[name, value]` pairs in the order given. Its
/// `Debug` shows the names only: values never reach a log line.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Params(pub Vec<(String, String)>);

impl fmt::Debug for Params {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(k, _)| k))
            .finish()
    }
}

impl Params {
    /// The pairs.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.0
    }
}

/// One result row: fields as text, NULL as `None`.
pub type Row = Vec<Option<String>>;

/// A refusal decided outside the runtime (access, approval, cancel): the
/// worker records it through the ledger instead of running the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Why, as a class.
    pub class: ErrorClass,
    /// Why, in words (never a value).
    pub message: String,
}

/// A job: what the queue stores, what a worker runs, what a client sees
/// (without its params, which are never serialized).
#[derive(Clone, Serialize, Deserialize)]
pub struct Job {
    /// The job.
    pub job_id: JobId,
    /// The catalog command.
    pub command: String,
    /// plan, apply or verify.
    pub mode: Mode,
    /// The target.
    pub target: String,
    /// Raw params while the job is not terminal; None after.
    #[serde(skip)]
    pub params: Option<Params>,
    /// The keyed md5 params digest, as the database computed it (empty
    /// until the job's ledger row is written).
    pub params_digest: String,
    /// The idempotency key (`job:<job_id>` when the submitter gave none).
    pub idempotency_key: String,
    /// The unix user who submitted it: the ledger's actor.
    pub actor: String,
    /// The submitter's uid (who gets the result).
    #[serde(skip)]
    pub actor_uid: u32,
    /// Where the job is.
    pub state: JobState,
    /// A refusal decided at submit, approval or cancel.
    #[serde(skip)]
    pub preset: Option<Refusal>,
    /// Who approved it.
    pub approved_by: Option<String>,
    /// When it was approved (unix seconds).
    #[serde(skip)]
    pub approved_at: Option<i64>,
    /// The approver's reason, if given (at most 200 characters; into the
    /// ledger's evidence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approve_reason: Option<String>,
    /// The plan digest it is pinned to (`apply --plan DIGEST`, or by the
    /// daemon at submit when it needs approval): what its approvers
    /// approve, checked by the dispatcher at the apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_digest: Option<String>,
    /// What that plan covers (target, command, params digest, catalog
    /// digest, function definitions' md5, gates, max_rows), when the
    /// daemon pinned it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_covers: Option<serde_json::Value>,
    /// Its approvals so far, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvals: Vec<Approval>,
    /// When it was submitted (unix seconds).
    pub submitted_at: i64,
    /// When it ended (unix seconds).
    pub finished_at: Option<i64>,
    /// The outcome, once terminal (`result` only for its submitter).
    pub outcome: Option<Outcome>,
    /// The rollout it is a child of (`--targets`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_id: Option<JobId>,
    /// When it was first sent back to the queue, if it was (a job in which
    /// nothing ran waits up to `max_target_wait_s` from then).
    #[serde(skip)]
    pub first_try_at: Option<i64>,
    /// Whether it may have run already (claimed from `unsettled`): it is
    /// settled by its key before anything local may refuse it, and it
    /// never stops waiting for its target.
    #[serde(skip)]
    pub in_doubt: bool,
}

impl fmt::Debug for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Job")
            .field("job_id", &self.job_id)
            .field("command", &self.command)
            .field("mode", &self.mode)
            .field("state", &self.state)
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

impl Job {
    /// A new job, queued (or waiting for approval), with its default
    /// idempotency key.
    pub fn new(
        command: String,
        mode: Mode,
        target: String,
        params: Params,
        idempotency_key: Option<String>,
        actor: String,
        actor_uid: u32,
    ) -> Job {
        let job_id = JobId::new();
        Job {
            params_digest: String::new(),
            idempotency_key: idempotency_key.unwrap_or_else(|| format!("job:{job_id}")),
            job_id,
            command,
            mode,
            target,
            params: Some(params),
            actor,
            actor_uid,
            state: JobState::Queued,
            preset: None,
            approved_by: None,
            approved_at: None,
            approve_reason: None,
            plan_digest: None,
            plan_covers: None,
            approvals: Vec::new(),
            submitted_at: crate::time::unix_now(),
            finished_at: None,
            outcome: None,
            first_try_at: None,
            rollout_id: None,
            in_doubt: false,
        }
    }

    /// The job's params (empty once erased).
    pub fn param_pairs(&self) -> &[(String, String)] {
        self.params.as_ref().map(Params::pairs).unwrap_or_default()
    }
}

/// What happened to a job: the `--json` object of DESIGN.md.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Outcome {
    /// The job.
    pub job_id: JobId,
    /// The command.
    pub command: String,
    /// The mode.
    pub mode: Mode,
    /// The terminal status.
    pub status: RunStatus,
    /// The ledger row (None when no row could be written).
    pub run_id: Option<i64>,
    /// md5 params digest.
    pub params_digest: String,
    /// Shut gates that refused or would refuse an apply.
    pub closed_gates: Vec<String>,
    /// Why it was refused or failed.
    pub error_class: Option<ErrorClass>,
    /// Structural facts only.
    #[serde(default)]
    pub evidence: Evidence,
    /// The rows the command returned (to the submitter only).
    pub result: Option<Vec<Row>>,
    /// Why, in words (never a value).
    pub message: String,
    /// Set when the outcome is not final: the daemon keeps the job and
    /// tries again (never sent, never stored).
    #[serde(skip)]
    pub pending: Option<Pending>,
}

/// The facts the daemon gives the database with every entry call (its
/// `client` argument), each a short scalar. Never a value.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ClientFacts {
    /// The daemon's job id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// ssh or local.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// The target's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Time spent on the job so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// The rollout the job is a child of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_id: Option<String>,
    /// The database host's key fingerprint (SSH).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_key: Option<String>,
    /// Who approved it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<String>,
    /// The approver's or rejecter's words (at most 200 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The plan digest an apply is pinned to (`apply --plan`, or pinned
    /// at submit): the dispatcher refuses it when what would run no
    /// longer matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_digest: Option<String>,
    /// What that plan covers, when the daemon pinned it (the dispatcher
    /// names what moved against it); never recorded as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_covers: Option<serde_json::Value>,
    /// Every approval: who, when, why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approvals: Option<Vec<Approval>>,
    /// When the job was submitted (Unix seconds, as text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_at: Option<String>,
    /// When it ended (Unix seconds, as text), for a row written late.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
}

/// What an outcome records beside its status: the [`ClientFacts`] and the
/// structural facts of the run. Never a value. Keys an older release
/// stored are kept as they were.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Evidence {
    /// The daemon's facts.
    #[serde(flatten)]
    pub client: ClientFacts,
    /// plan, apply or verify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// How many statements the command has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub statement_count: Option<usize>,
    /// The shut gates met.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_gates: Option<Vec<String>>,
    /// The class of a refusal or failure (null: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_class: Option<Option<String>>,
    /// The catalog digest in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catalog_digest: Option<String>,
    /// How many rows the command answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row_count: Option<usize>,
    /// Anything else a stored outcome carries.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// Why an outcome is not final yet.
///
/// The rule (DESIGN.md, "Outcomes and error classes"): an apply ends
/// `failed` only when nothing was sent ([`Pending::NothingRan`], and the
/// job never ran before: a job that may have run is in doubt and waits as
/// [`Pending::Unsettled`]) or when the database proved nothing committed
/// (a SQL error of the call, or the fail entry under the key's lock with
/// no backend of the job left). Everything else is `Unsettled`, settled by
/// its idempotency key however long the target takes, and a local refusal
/// (switch, approval expiry, cancel) of a job that may have run is written
/// through the refuse entry, which settles by key first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending {
    /// Nothing reached the database: the job waits for its target.
    NothingRan,
    /// An apply whose outcome is unknown: settled by idempotency key.
    Unsettled,
    /// The outcome is final (a timed-out job), but its ledger row could
    /// not be confirmed: the daemon writes it once the target answers.
    RowOwed,
}

impl Outcome {
    /// The outcome of a job that ends without reaching the ledger (an
    /// unknown command, a malformed key, a bug): its status follows from
    /// the class.
    pub fn without_run(job: &Job, class: ErrorClass, message: String) -> Outcome {
        Outcome {
            job_id: job.job_id.clone(),
            command: job.command.clone(),
            mode: job.mode,
            status: class.status(),
            run_id: None,
            params_digest: job.params_digest.clone(),
            closed_gates: Vec::new(),
            evidence: Evidence {
                mode: Some(job.mode.as_str().to_string()),
                error_class: Some(Some(class.as_str().to_string())),
                ..Evidence::default()
            },
            error_class: Some(class),
            result: None,
            message,
            pending: None,
        }
    }

    /// The error class's word, if any.
    pub fn class(&self) -> Option<&str> {
        self.error_class.as_ref().map(ErrorClass::as_str)
    }

    /// The job state this outcome ends in.
    pub fn state(&self) -> JobState {
        if self.pending == Some(Pending::Unsettled) {
            return JobState::Unsettled;
        }
        JobState::from_outcome(self.status, self.error_class.as_ref())
    }

    /// The process exit code (5 for an apply still unsettled).
    pub fn exit_code(&self) -> ExitCode {
        self.state().exit_code()
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn error_classes_round_trip_through_their_words() {
        for (word, class) in ErrorClass::WORDS.iter() {
            assert_eq!(class.as_str(), *word);
            assert_eq!(ErrorClass::parse(word).as_ref(), Some(class));
        }
        assert_eq!(
            ErrorClass::parse("IU500"),
            Some(ErrorClass::Sql("IU500".into()))
        );
        assert_eq!(ErrorClass::parse("57014"), Some(ErrorClass::Timeout));
        assert_eq!(
            ErrorClass::parse("transport"),
            Some(ErrorClass::TargetUnreachable)
        );
        assert_eq!(ErrorClass::parse("nonsense"), None);
        let json = serde_json::to_string(&ErrorClass::Sql("23505".into())).unwrap();
        assert_eq!(json, "\"23505\"");
        assert!(serde_json::from_str::<ErrorClass>("\"bogus\"").is_err());
    }

    #[test]
    fn states_round_trip_and_know_which_are_terminal() {
        for st in JobState::ALL {
            assert_eq!(JobState::parse(st.as_str()), Some(st));
            let json = serde_json::to_string(&st).unwrap();
            assert_eq!(json, format!("\"{}\"", st.as_str()));
        }
        assert!(!JobState::Unsettled.is_terminal());
        assert!(JobState::Cancelled.is_terminal());
        assert_eq!(
            JobState::from_outcome(RunStatus::Refused, Some(&ErrorClass::Cancelled)),
            JobState::Cancelled
        );
        assert_eq!(JobState::Unsettled.exit_code(), ExitCode::Pending);
    }

    #[test]
    fn job_ids_from_outside_are_checked() {
        let id = JobId::new();
        assert_eq!(JobId::parse(id.as_str()), Some(id));
        assert!(JobId::parse("").is_none());
        assert!(JobId::parse(&"a".repeat(65)).is_none());
        assert!(JobId::parse("abc'; DROP").is_none());
    }

    #[test]
    fn every_class_has_its_outcome() {
        assert_eq!(ErrorClass::GateClosed.status(), RunStatus::Refused);
        assert_eq!(ErrorClass::Sql("IU500".into()).status(), RunStatus::Failed);
        assert_eq!(ErrorClass::DbUnavailable.status(), RunStatus::Failed);
    }
}

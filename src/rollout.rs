//! Rollouts: one governed command over many targets (DESIGN.md "Fleets
//! and rollouts"). This module holds what the daemon and the CLI share:
//! the strategy (`--canary`, `--max-concurrency`, `--max-errors`), the
//! states of a rollout and of its targets, the key each child runs under,
//! and the one scheduling rule ([`next_step`]) the daemon applies,
//! pure so it is tested here without a queue.
//!
//! The rule: canaries (the first N targets) run one at a time, first;
//! the rest start only when every canary succeeded, at most
//! `max_concurrency` at once. A failure is a child that ended refused,
//! failed or cancelled; when failures exceed `max_errors` (default 0: the
//! first failure halts) or a canary fails, the rollout halts: running
//! children finish, the not-started ones are skipped.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::job::{ExitCode, JobId, JobState, Mode};

/// A count of targets, or a percentage of them (`4`, `25%`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Limit {
    /// This many.
    Count(u32),
    /// This percentage of the targets (1-100).
    Percent(u8),
}

/// A limit that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a count or a percentage: give N (0-100000) or P% (1-100), e.g. 4 or 25%")]
pub struct BadLimit(String);

impl FromStr for Limit {
    type Err = BadLimit;
    fn from_str(s: &str) -> Result<Limit, BadLimit> {
        let bad = || BadLimit(s.chars().take(32).collect());
        let t = s.trim();
        match t.strip_suffix('%') {
            Some(p) => match p.parse::<u8>() {
                Ok(p) if (1..=100).contains(&p) => Ok(Limit::Percent(p)),
                _ => Err(bad()),
            },
            None => match t.parse::<u32>() {
                Ok(n) if n <= 100_000 => Ok(Limit::Count(n)),
                _ => Err(bad()),
            },
        }
    }
}

impl TryFrom<String> for Limit {
    type Error = BadLimit;
    fn try_from(s: String) -> Result<Limit, BadLimit> {
        s.parse()
    }
}

impl From<Limit> for String {
    fn from(l: Limit) -> String {
        l.to_string()
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Count(n) => write!(f, "{n}"),
            Limit::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Limit {
    /// The count over `n` targets: a percentage rounds up (at least 1)
    /// for a concurrency, down for an error budget.
    pub fn resolve(self, n: usize, round_up: bool) -> u32 {
        match self {
            Limit::Count(c) => c,
            Limit::Percent(p) => {
                let scaled = n as u64 * u64::from(p);
                let v = if round_up {
                    scaled.div_ceil(100).max(1)
                } else {
                    scaled / 100
                };
                v.min(u64::from(u32::MAX)) as u32
            }
        }
    }
}

/// How a rollout goes: canaries first, then at most `max_concurrency`
/// targets at once, halting once failures exceed `max_errors`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Strategy {
    /// The first N targets run first, one at a time (default 0).
    #[serde(default)]
    pub canary: u32,
    /// At most this many targets at once (default 1).
    #[serde(default = "one")]
    pub max_concurrency: Limit,
    /// Failures tolerated before the rollout halts (default 0).
    #[serde(default = "zero")]
    pub max_errors: Limit,
}

fn one() -> Limit {
    Limit::Count(1)
}

fn zero() -> Limit {
    Limit::Count(0)
}

impl Default for Strategy {
    fn default() -> Strategy {
        Strategy {
            canary: 0,
            max_concurrency: one(),
            max_errors: zero(),
        }
    }
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Children are being started or run.
    Running,
    /// Waiting for its one approval.
    AwaitingApproval,
    /// Every child ended planned, applied or verified.
    Done,
    /// Failures exceeded max-errors (or a canary failed): nothing more starts.
    Halted,
    /// Every target ran; some failed, within max-errors.
    Partial,
    /// Cancelled: nothing more starts.
    Cancelled,
}

impl RolloutState {
    /// Every state, for counts.
    pub const ALL: [RolloutState; 6] = [
        RolloutState::Running,
        RolloutState::AwaitingApproval,
        RolloutState::Done,
        RolloutState::Halted,
        RolloutState::Partial,
        RolloutState::Cancelled,
    ];

    /// The stored and printed word.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::AwaitingApproval => "awaiting_approval",
            RolloutState::Done => "done",
            RolloutState::Halted => "halted",
            RolloutState::Partial => "partial",
            RolloutState::Cancelled => "cancelled",
        }
    }

    /// The word back.
    pub fn parse(s: &str) -> Option<RolloutState> {
        RolloutState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether nothing more starts (a resume may start a new pass of a
    /// halted, partial or cancelled one).
    pub fn is_final(self) -> bool {
        !matches!(self, RolloutState::Running | RolloutState::AwaitingApproval)
    }
}

impl fmt::Display for RolloutState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where one target of a rollout is: not started, skipped or cancelled
/// before it started, or its child job's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum TargetState {
    /// Not started yet.
    Pending,
    /// Never started: the rollout halted first.
    Skipped,
    /// Never started: the rollout was cancelled first.
    Cancelled,
    /// Its child job, in this state.
    Job(JobState),
}

impl TargetState {
    /// The printed word (a child's job state, or pending/skipped/cancelled).
    pub fn as_str(self) -> &'static str {
        match self {
            TargetState::Pending => "pending",
            TargetState::Skipped => "skipped",
            TargetState::Cancelled => "not_started",
            TargetState::Job(s) => s.as_str(),
        }
    }

    /// Ended planned, applied or verified.
    pub fn succeeded(self) -> bool {
        matches!(
            self,
            TargetState::Job(JobState::Planned | JobState::Applied | JobState::Verified)
        )
    }

    /// Ended refused, failed or cancelled (a failure of the rollout).
    pub fn failed(self) -> bool {
        matches!(
            self,
            TargetState::Job(JobState::Refused | JobState::Failed | JobState::Cancelled)
        )
    }

    /// A child that has not ended.
    pub fn running(self) -> bool {
        matches!(self, TargetState::Job(s) if !s.is_terminal())
    }
}

impl TryFrom<String> for TargetState {
    type Error = String;
    fn try_from(s: String) -> Result<TargetState, String> {
        Ok(match s.as_str() {
            "pending" => TargetState::Pending,
            "skipped" => TargetState::Skipped,
            "not_started" => TargetState::Cancelled,
            other => TargetState::Job(
                JobState::parse(other).ok_or_else(|| format!("unknown target state {other}"))?,
            ),
        })
    }
}

impl From<TargetState> for String {
    fn from(s: TargetState) -> String {
        s.as_str().to_string()
    }
}

impl fmt::Display for TargetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One target of a rollout, as `rollout status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutTarget {
    /// The target.
    pub target: String,
    /// Where it is.
    pub state: TargetState,
    /// Its child job (this pass's), once started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<JobId>,
    /// The error class of a refused or failed child.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_class: Option<String>,
    /// The child's ledger row on its target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<i64>,
    /// When its child was started (unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<i64>,
    /// When its child ended (unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<i64>,
    /// How long its child's run took, as its evidence says (while the
    /// child's job is kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

/// A rollout, as `rollouts` and `rollout status` show it (no value: its
/// params are never sent back).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// Its id.
    pub rollout_id: JobId,
    /// The catalog command.
    pub command: String,
    /// plan, apply or verify.
    pub mode: Mode,
    /// Who submitted it.
    pub actor: String,
    /// The submitter's uid (who may see and cancel it).
    #[serde(skip)]
    pub actor_uid: u32,
    /// The rollout key its children's keys derive from.
    pub idempotency_key: String,
    /// Where it is.
    pub state: RolloutState,
    /// Canaries (the first targets, one at a time).
    pub canary: u32,
    /// At most this many targets at once (resolved over its targets).
    pub max_concurrency: u32,
    /// Failures tolerated (resolved over its targets).
    pub max_errors: u32,
    /// Which pass (1, then one more per resume).
    pub pass: u32,
    /// When it was submitted (unix seconds).
    pub submitted_at: i64,
    /// When its last child of the pass ended in a final state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<i64>,
    /// Who approved it (a requires_approval command).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<String>,
    /// Its approvals so far (one set for every target).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvals: Vec<crate::job::Approval>,
    /// Its targets, in order.
    pub targets: Vec<RolloutTarget>,
}

impl Rollout {
    /// Whether it is over: a final state and no child still running.
    pub fn is_over(&self) -> bool {
        self.state.is_final() && self.finished_at.is_some()
    }

    /// How many targets are in each printed state.
    pub fn tally(&self) -> std::collections::BTreeMap<&'static str, usize> {
        let mut m = std::collections::BTreeMap::new();
        for t in &self.targets {
            *m.entry(t.state.as_str()).or_insert(0) += 1;
        }
        m
    }

    /// The exit code of DESIGN.md: 0 done; 3 every child refused; 4
    /// halted or partial (and cancelled); 5 not over.
    pub fn exit_code(&self) -> ExitCode {
        if !self.is_over() {
            return ExitCode::Pending;
        }
        let all_refused = !self.targets.is_empty()
            && self
                .targets
                .iter()
                .all(|t| t.state == TargetState::Job(JobState::Refused));
        match self.state {
            RolloutState::Done => ExitCode::Ok,
            _ if all_refused => ExitCode::Refused,
            _ => ExitCode::Failed,
        }
    }
}

/// Whether an id names a rollout (`r…`; a job id starts with a hex digit).
pub fn is_rollout_id(id: &JobId) -> bool {
    id.as_str().starts_with('r')
}

/// The idempotency key of a rollout's child on `target`: `KEY@target`
/// (within the key alphabet: target names are 1-64 of a-z A-Z 0-9 _ -);
/// a key too long for that is replaced by the first 32 hex of its sha256.
pub fn child_key(rollout_key: &str, target: &str) -> String {
    let key = format!("{rollout_key}@{target}");
    if key.len() <= 128 {
        return key;
    }
    let digest = sha2::Sha256::digest(rollout_key.as_bytes());
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("{hex}@{target}")
}

/// What the scheduler does next with a running rollout.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Step {
    /// Start these targets (indexes in the rollout's order).
    pub start: Vec<usize>,
    /// The rollout's new state, if it changes (halted: the pending
    /// targets are skipped).
    pub state: Option<RolloutState>,
}

/// The scheduling rule over a running rollout's targets (in order):
/// see the module doc. A rollout in another state gets no step.
pub fn next_step(
    state: RolloutState,
    canary: u32,
    max_concurrency: u32,
    max_errors: u32,
    targets: &[TargetState],
) -> Step {
    if state != RolloutState::Running {
        return Step::default();
    }
    let failures = targets.iter().filter(|t| t.failed()).count() as u64;
    let running = targets.iter().filter(|t| t.running()).count();
    let canaries = &targets[..(canary as usize).min(targets.len())];
    if failures > u64::from(max_errors) || canaries.iter().any(|t| t.failed()) {
        return Step {
            start: Vec::new(),
            state: Some(RolloutState::Halted),
        };
    }
    let pending: Vec<usize> = targets
        .iter()
        .enumerate()
        .filter(|(_, t)| **t == TargetState::Pending)
        .map(|(i, _)| i)
        .collect();
    if pending.is_empty() {
        if running > 0 {
            return Step::default();
        }
        let state = if failures == 0 && targets.iter().all(|t| t.succeeded()) {
            RolloutState::Done
        } else {
            RolloutState::Partial
        };
        return Step {
            start: Vec::new(),
            state: Some(state),
        };
    }
    // Canaries: one at a time, and nothing else until all succeeded.
    if !canaries.iter().all(|t| t.succeeded()) {
        if running > 0 {
            return Step::default();
        }
        let next = canaries
            .iter()
            .position(|t| *t == TargetState::Pending)
            .into_iter()
            .collect();
        return Step {
            start: next,
            state: None,
        };
    }
    let room = (max_concurrency.max(1) as usize).saturating_sub(running);
    Step {
        start: pending.into_iter().take(room).collect(),
        state: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: TargetState = TargetState::Pending;
    const R: TargetState = TargetState::Job(JobState::Running);
    const Q: TargetState = TargetState::Job(JobState::Queued);
    const A: TargetState = TargetState::Job(JobState::Applied);
    const F: TargetState = TargetState::Job(JobState::Failed);
    const X: TargetState = TargetState::Job(JobState::Refused);

    fn step(c: u32, mc: u32, me: u32, t: &[TargetState]) -> Step {
        next_step(RolloutState::Running, c, mc, me, t)
    }

    #[test]
    fn limits_read_counts_and_percentages() {
        assert_eq!("4".parse(), Ok(Limit::Count(4)));
        assert_eq!(" 25% ".parse(), Ok(Limit::Percent(25)));
        for bad in ["", "-1", "0%", "101%", "x", "4.5", "1000000"] {
            assert!(bad.parse::<Limit>().is_err(), "{bad}");
        }
        assert_eq!(Limit::Percent(25).resolve(10, true), 3);
        assert_eq!(Limit::Percent(25).resolve(10, false), 2);
        assert_eq!(Limit::Percent(1).resolve(10, true), 1);
        assert_eq!(Limit::Percent(1).resolve(10, false), 0);
        assert_eq!(Limit::Count(7).resolve(3, true), 7);
        let s: Strategy = serde_json::from_str(r#"{"max_concurrency": "50%"}"#).unwrap();
        assert_eq!(s.max_concurrency, Limit::Percent(50));
        assert_eq!(s.max_errors, Limit::Count(0));
    }

    #[test]
    fn canaries_run_one_at_a_time_before_the_rest() {
        assert_eq!(step(2, 4, 0, &[P, P, P, P]).start, [0]);
        assert_eq!(step(2, 4, 0, &[R, P, P, P]).start, Vec::<usize>::new());
        assert_eq!(step(2, 4, 0, &[A, P, P, P]).start, [1]);
        assert_eq!(step(2, 4, 0, &[A, A, P, P]).start, [2, 3]);
        // A canary that fails halts, whatever the error budget.
        assert_eq!(step(1, 4, 5, &[F, P, P]).state, Some(RolloutState::Halted));
    }

    #[test]
    fn concurrency_is_capped_and_failures_beyond_the_budget_halt() {
        assert_eq!(step(0, 2, 0, &[P, P, P]).start, [0, 1]);
        assert_eq!(step(0, 2, 0, &[R, Q, P]).start, Vec::<usize>::new());
        assert_eq!(step(0, 2, 0, &[A, R, P]).start, [2]);
        // Within the budget it goes on; beyond it, it halts.
        assert_eq!(step(0, 2, 1, &[F, R, P]).start, [2]);
        assert_eq!(step(0, 2, 1, &[F, X, P]).state, Some(RolloutState::Halted));
        assert_eq!(step(0, 2, 0, &[X, R, P]).state, Some(RolloutState::Halted));
    }

    #[test]
    fn the_end_is_done_or_partial_once_nothing_runs() {
        assert_eq!(step(0, 2, 1, &[A, R]).state, None);
        assert_eq!(step(0, 2, 1, &[A, A]).state, Some(RolloutState::Done));
        assert_eq!(step(0, 2, 1, &[A, F]).state, Some(RolloutState::Partial));
        assert_eq!(
            next_step(RolloutState::Halted, 0, 2, 0, &[P]),
            Step::default()
        );
    }

    #[test]
    fn child_keys_stay_within_the_key_alphabet_and_length() {
        assert_eq!(child_key("rollout:r-1", "eu1"), "rollout:r-1@eu1");
        let long = "k".repeat(128);
        let k = child_key(&long, &"t".repeat(64));
        assert!(crate::job::valid_identifier(&k) && k.len() <= 128, "{k}");
        assert_ne!(child_key(&long, "a"), child_key(&"j".repeat(128), "a"));
        assert!(crate::job::valid_identifier(&child_key(
            &"x".repeat(60),
            "eu-1_b"
        )));
    }

    #[test]
    fn exit_codes_follow_the_design() {
        let mut r = Rollout {
            rollout_id: JobId::new(),
            command: "c".into(),
            mode: Mode::Apply,
            actor: "a".into(),
            actor_uid: 0,
            idempotency_key: "k".into(),
            state: RolloutState::Running,
            canary: 0,
            max_concurrency: 1,
            max_errors: 0,
            pass: 1,
            submitted_at: 0,
            finished_at: None,
            approved_by: None,
            approvals: Vec::new(),
            targets: vec![RolloutTarget {
                target: "t".into(),
                state: X,
                job_id: None,
                error_class: None,
                run_id: None,
                started_at: None,
                finished_at: None,
                duration_ms: None,
            }],
        };
        assert_eq!(r.exit_code(), ExitCode::Pending);
        r.state = RolloutState::Halted;
        r.finished_at = Some(1);
        assert_eq!(r.exit_code(), ExitCode::Refused);
        r.targets[0].state = F;
        assert_eq!(r.exit_code(), ExitCode::Failed);
        r.state = RolloutState::Done;
        assert_eq!(r.exit_code(), ExitCode::Ok);
    }
}

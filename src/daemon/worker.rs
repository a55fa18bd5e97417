//! Workers: per target, claim queued jobs in submission order (up to the
//! target's concurrency), run each through the governed runtime as a
//! tracked task, record the terminal state (erasing the params) and hand
//! the outcome to the waiters. A job task that panics is caught and its
//! job settled, never left `running`. Also: the sweeper that expires stale
//! approvals.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::Daemon;
use crate::job::{ErrorClass, Job, JobState, Mode, Outcome, Pending, Refusal};
use crate::switch::ApplySwitch;
use crate::time::unix_now;

/// The worker loop of one target. It claims only once the jobs of the
/// last run are back in the queue. While the target is down, its waiting
/// jobs sleep out their backoff and the oldest of them is tried every
/// [`super::PROBE_EVERY`] (a probe); the first job that reaches the
/// database wakes them all.
pub async fn run_target(daemon: Arc<Daemon>, target: String) {
    let Some(slot) = daemon.targets.get(&target) else {
        return;
    };
    if !daemon.recovered().await {
        return;
    }
    let shutdown = daemon.shutdown_token().clone();
    loop {
        slot.alive_at.store(unix_now() as u64, Ordering::SeqCst);
        if shutdown.is_cancelled() {
            return;
        }
        let permit = tokio::select! {
            p = slot.permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
            _ = shutdown.cancelled() => return,
        };
        let probe = slot.begin_probe();
        match daemon.queue.claim_next(&target, probe.is_some()).await {
            Ok(Some(job)) => {
                let d = daemon.clone();
                daemon.tasks().spawn(async move {
                    run_job(&d, job).await;
                    drop((permit, probe));
                });
            }
            Ok(None) => {
                drop((permit, probe));
                tokio::select! {
                    _ = slot.wake.notified() => {}
                    _ = tokio::time::sleep(super::PROBE_EVERY) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
            Err(e) => {
                drop((permit, probe));
                tracing::error!(target = %target, cause = %e, "cannot read the queue");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Runs one claimed job to its terminal state.
pub async fn run_job(daemon: &Daemon, mut job: Job) {
    let started = std::time::Instant::now();
    let Some(rt) = daemon.runtime(&job.target) else {
        tracing::error!(job_id = %job.job_id, target = %job.target, "job names a target that no longer exists");
        return;
    };
    let ttl = daemon.config().daemon.approval_ttl_s as i64;
    if job.preset.is_none() && job.approved_at.is_some_and(|at| unix_now() - at > ttl) {
        job.preset = Some(Refusal {
            class: ErrorClass::ApprovalExpired,
            message: "the approval is older than approval_ttl_s; approve it again".into(),
        });
    }
    if job.preset.is_none() && job.mode == Mode::Apply {
        // A switch file the daemon cannot read refuses the apply as
        // "unreadable", never as "off" (which would send the operator to
        // turn on a switch that may be on).
        let switch = ApplySwitch::new(&daemon.config().daemon.state_dir);
        job.preset = tokio::task::spawn_blocking(move || switch.unreadable_refusal())
            .await
            .unwrap_or(None);
    }
    let task = {
        let job = job.clone();
        supervise(async move { rt.run(&job).await })
    };
    let mut outcome = task.await.unwrap_or_else(|panic| panicked(&job, &panic));
    if daemon
        .targets
        .get(&job.target)
        .is_some_and(|slot| slot.note(&outcome))
    {
        daemon.target_back(&job.target).await;
    }
    let mut row_owed = false;
    if let Some(pending) = outcome.pending {
        match keep_trying(daemon, &job, pending, &mut outcome).await {
            Next::Requeued => return,
            Next::End { row_owed: owed } => row_owed = owed,
        }
    }
    // The waiters get the outcome at once; its record in the queue is
    // retried until it can be written (a full disk), so no job stays
    // `running` while the daemon lives. A job that gave up waiting for its
    // target keeps its params until its ledger row is written.
    daemon
        .metrics
        .job_ended(job.mode, &outcome, started.elapsed());
    daemon.deliver(&outcome);
    if let Some(ms) = test_record_delay() {
        // A test widens the window between delivery and the queue's record.
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let mut wait = Duration::from_millis(200);
    let result_ttl = daemon.config().daemon.result_ttl_s;
    while let Err(e) = daemon.queue.finish(&outcome, row_owed, result_ttl).await {
        tracing::error!(job_id = %job.job_id, cause = %e, "cannot record the job's end in the queue; retrying");
        if daemon.is_shutting_down() {
            // Settled through the ledger at the next start.
            return;
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(10));
    }
    daemon.recorded(&job.job_id);
    if job.rollout_id.is_some() {
        daemon.rollouts_changed();
    }
}

/// `GOVSQL_TEST_RECORD_DELAY_MS`, read once (not on every job).
fn test_record_delay() -> Option<u64> {
    static DELAY: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        std::env::var("GOVSQL_TEST_RECORD_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
    })
}

/// What happens to a job that is not over.
enum Next {
    /// It went back to the queue.
    Requeued,
    /// It ends now with its outcome (made final); its ledger row may be
    /// owed (nothing reached the database in time).
    End {
        /// The row is to be written once the target answers.
        row_owed: bool,
    },
}

/// A job that is not over: nothing ran (it waits for its target, up to
/// `max_target_wait_s`) or an apply is unsettled (settled by its key for
/// as long as it takes).
async fn keep_trying(daemon: &Daemon, job: &Job, pending: Pending, outcome: &mut Outcome) -> Next {
    let max_wait = daemon
        .config()
        .target(Some(&job.target))
        .map(|(_, t)| t.max_target_wait_s as i64)
        .unwrap_or(600);
    let state = match pending {
        // The outcome is final; its row is written once the target answers.
        Pending::RowOwed => {
            outcome.pending = None;
            return Next::End { row_owed: true };
        }
        Pending::Unsettled => JobState::Unsettled,
        // A job that may have run (an earlier attempt was cut off) never
        // stops waiting: only the ledger, under its key, may end it.
        Pending::NothingRan if job.in_doubt => JobState::Unsettled,
        Pending::NothingRan => {
            let first = job.first_try_at.unwrap_or_else(unix_now);
            if unix_now() - first >= max_wait {
                outcome.pending = None;
                outcome.message = format!(
                    "{}; gave up after waiting {max_wait} s (max_target_wait_s) for the target; its ledger row is written once the target answers",
                    outcome.message
                );
                return Next::End { row_owed: true };
            }
            JobState::Queued
        }
    };
    match daemon.queue.retry(&job.job_id, state).await {
        Ok(attempts) => {
            tracing::warn!(
                job_id = %job.job_id,
                state = %state,
                attempts,
                class = outcome.class().unwrap_or(""),
                "job not over yet; it will be tried again"
            );
            Next::Requeued
        }
        Err(e) => {
            tracing::error!(job_id = %job.job_id, cause = %e, "cannot put the job back in the queue");
            outcome.pending = None;
            Next::End { row_owed: false }
        }
    }
}

/// Runs a job's future as its own task so that a panic in it (a bug) is
/// caught and reported instead of leaving the job `running`.
pub async fn supervise<F>(job: F) -> Result<Outcome, String>
where
    F: Future<Output = Outcome> + Send + 'static,
{
    tokio::spawn(job).await.map_err(|e| {
        if e.is_panic() {
            let p = e.into_panic();
            p.downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into())
        } else {
            "the job task was cancelled".into()
        }
    })
}

/// The outcome of a job whose task panicked: failed with class
/// `internal`; an apply is said to need settling by its key.
fn panicked(job: &Job, panic: &str) -> Outcome {
    tracing::error!(job_id = %job.job_id, cause = %panic, "a job task panicked");
    let settle = if job.mode == Mode::Apply {
        format!(
            "; if it may have run, re-submit with --idempotency-key {} to settle it (it never runs twice)",
            job.idempotency_key
        )
    } else {
        String::new()
    };
    Outcome::without_run(
        job,
        ErrorClass::Internal,
        format!("a bug stopped this job (panic in its task){settle}; please report it"),
    )
}

/// Writes the ledger rows owed by jobs that gave up waiting for their
/// target (or whose row was cut off), once it answers (with the job's own
/// times in evidence); then their params are erased. Target by target: a
/// target that does not answer holds back only its own rows.
async fn pay_owed_rows(daemon: &Daemon) {
    for target in daemon.targets.keys() {
        let owed = match daemon.queue.owed(target, 20).await {
            Ok(jobs) => jobs,
            Err(e) => return tracing::error!(cause = %e, "cannot read the owed ledger rows"),
        };
        let Some(rt) = daemon.runtime(target) else {
            continue;
        };
        for job in owed {
            let Some(mut outcome) = job.outcome.clone() else {
                continue;
            };
            let class = outcome
                .error_class
                .clone()
                .unwrap_or(ErrorClass::TargetUnreachable);
            let Some(run_id) = rt.record_owed(&job, class).await else {
                break; // this target still does not answer
            };
            outcome.run_id = Some(run_id);
            if let Err(e) = daemon.queue.finish(&outcome, false, 0).await {
                tracing::error!(job_id = %job.job_id, cause = %e, "cannot note the owed row as written");
            } else {
                tracing::info!(job_id = %job.job_id, run_id, "owed ledger row written");
            }
        }
    }
}

/// How long an apply waits in the queue before it is pinned.
pub const PIN_AFTER_S: i64 = 1;
/// Applies pinned in one script (one round trip).
const PIN_BATCH: usize = 64;

/// Pins the applies that wait: an apply still queued [`PIN_AFTER_S`] after
/// its submit (its target's channels are busy, or it waits behind others)
/// is pinned to the plan it would run now, so whatever that plan covers
/// (a function's definition, the catalog, the gates, `max_rows`) cannot
/// move while it keeps waiting: the dispatcher refuses it `plan_drift`.
/// An apply that starts within that second is not pinned, and costs
/// nothing; nor is one whose target is down (nothing can be read there)
/// until the target answers. Pins are reads on the target's read channel,
/// never a job's slot; a worker that claims the job first wins (the pin
/// is then dropped: the job started).
pub async fn pin_waiting(daemon: Arc<Daemon>) {
    let shutdown = daemon.shutdown_token().clone();
    // Jobs a pin was tried for (failed ones are not retried every second).
    let mut tried: std::collections::HashSet<crate::job::JobId> = Default::default();
    // A round that pinned a full batch somewhere goes on at once (a long
    // queue is pinned as fast as one read session answers).
    let mut more = false;
    loop {
        if !more {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.cancelled() => return,
            }
        }
        more = false;
        let mut seen = std::collections::HashSet::new();
        for (name, slot) in &daemon.targets {
            let reachable = slot
                .record
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .reachable();
            // A target with a free channel has no apply waiting for one
            // (its worker claims at once); one that is down cannot be read.
            if !reachable || slot.permits.available_permits() > 0 {
                continue;
            }
            let jobs = match daemon
                .queue
                // Past the ones whose pin failed (they stay unpinned).
                .unpinned_waiting(name, unix_now() - PIN_AFTER_S, PIN_BATCH + tried.len())
                .await
            {
                Ok(jobs) => jobs,
                Err(e) => {
                    tracing::error!(target = %name, cause = %e, "cannot read the queue for waiting applies");
                    continue;
                }
            };
            let jobs: Vec<Job> = jobs
                .into_iter()
                .filter(|job| {
                    seen.insert(job.job_id.clone());
                    tried.insert(job.job_id.clone())
                })
                .take(PIN_BATCH)
                .collect();
            if jobs.is_empty() || shutdown.is_cancelled() {
                continue;
            }
            // One round trip for all of them.
            let pinned =
                tokio::time::timeout(Duration::from_secs(10), slot.runtime().pin_many(&jobs)).await;
            let pins = match pinned {
                Ok(Ok(pins)) => {
                    more |= jobs.len() == PIN_BATCH;
                    pins
                }
                failed => {
                    // Tried again at the next round.
                    for job in &jobs {
                        tried.remove(&job.job_id);
                    }
                    let cause = match failed {
                        Ok(Err(why)) => why,
                        _ => "no answer within 10 s".into(),
                    };
                    tracing::info!(target = %name, jobs = jobs.len(), cause = %cause, "waiting applies could not be pinned yet");
                    continue;
                }
            };
            let mut stored = Vec::with_capacity(jobs.len());
            for (job, pin) in jobs.iter().zip(&pins) {
                match pin {
                    Ok(pin) => stored.push((job.job_id.clone(), pin.digest.clone(), &pin.covers)),
                    Err(why) => {
                        tracing::info!(job_id = %job.job_id, cause = %why, "a waiting apply could not be pinned; it runs as the dispatcher finds it")
                    }
                }
            }
            if let Err(e) = daemon.queue.pin_many(stored).await {
                tracing::error!(target = %name, cause = %e, "cannot store waiting applies' pins");
            }
        }
        tried.retain(|id| seen.contains(id));
    }
}

/// Refuses (and audits) jobs whose approval never came within the TTL,
/// writes owed ledger rows, and prunes terminal jobs older than
/// `retention_days`.
pub async fn sweep_approvals(daemon: Arc<Daemon>) {
    let mut pruned_at = 0;
    loop {
        pay_owed_rows(&daemon).await;
        let now = unix_now();
        if now - pruned_at >= 60 {
            pruned_at = now;
            let before = now - (daemon.config().daemon.retention_days as i64) * 86_400;
            match daemon.queue.prune(before).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(jobs = n, "pruned terminal jobs past retention_days"),
                Err(e) => tracing::error!(cause = %e, "queue prune failed"),
            }
            match daemon
                .queue
                .custom(super::queue::Access::Write, move |c| {
                    super::rollouts::prune(c, before)
                })
                .await
            {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(rollouts = n, "pruned finished rollouts past retention_days")
                }
                Err(e) => tracing::error!(cause = %e, "rollout prune failed"),
            }
        }
        match daemon.queue.expire_results().await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(jobs = n, "erased results past result_ttl_s"),
            Err(e) => tracing::error!(cause = %e, "cannot erase expired results"),
        }
        let ttl = daemon.config().daemon.approval_ttl_s as i64;
        let before = unix_now() - ttl;
        match daemon.queue.expired_approvals(before).await {
            Ok(ids) => {
                for id in ids {
                    let msg = "no approval came within approval_ttl_s; submit it again";
                    if let Ok(Some(job)) = daemon.queue.get(&id).await {
                        if daemon
                            .queue
                            .preset_refusal(&id, ErrorClass::ApprovalExpired, msg)
                            .await
                            .is_ok()
                        {
                            daemon.wake(&job.target);
                        }
                    }
                }
            }
            Err(e) => tracing::error!(cause = %e, "approval sweep failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = daemon.shutdown_token().cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{JobState, Params, RunStatus};

    fn job(mode: Mode) -> Job {
        Job::new(
            "dot_iu_add_piece".into(),
            mode,
            "main".into(),
            Params(vec![("body".into(), "CANARY-panic".into())]),
            Some("key-1".into()),
            "alice".into(),
            1000,
        )
    }

    #[tokio::test]
    async fn a_panic_in_a_job_task_settles_the_job_as_failed_internal() {
        let j = job(Mode::Apply);
        let err = supervise(async { panic!("boom in the runtime") })
            .await
            .unwrap_err();
        assert!(err.contains("boom"), "{err}");
        let o = panicked(&j, &err);
        assert_eq!(o.status, RunStatus::Failed);
        assert_eq!(o.error_class, Some(ErrorClass::Internal));
        assert_eq!(o.state(), JobState::Failed);
        assert!(
            o.message.contains("--idempotency-key key-1"),
            "{}",
            o.message
        );
        assert!(!o.message.contains("CANARY"));
        // A job that does not panic passes through untouched.
        let fine = panicked(&job(Mode::Verify), "x");
        let passed = supervise(async move { fine }).await.unwrap();
        assert_eq!(passed.mode, Mode::Verify);
        assert!(!passed.message.contains("idempotency"));
    }
}

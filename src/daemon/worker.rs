//! Workers: per target, claim queued jobs in submission order (up to the
//! target's concurrency), run each through the governed runtime, record
//! the terminal state (erasing the params) and hand the outcome to the
//! waiters. Also: the sweeper that expires stale approvals.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::queue::JobRow;
use super::{unix_now, Daemon};
use crate::runtime::{JobSpec, Outcome};

/// The worker loop of one target.
pub async fn run_target(daemon: Arc<Daemon>, target: String) {
    let Some(slot) = daemon.targets.get(&target) else {
        return;
    };
    let mut shutdown = daemon.shutdown_signal();
    loop {
        slot.alive_at.store(unix_now(), Ordering::SeqCst);
        if daemon.is_shutting_down() {
            return;
        }
        let permit = tokio::select! {
            p = slot.permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
            _ = shutdown.changed() => return,
        };
        match daemon.queue.claim_next(&target).await {
            Ok(Some(job)) => {
                let d = daemon.clone();
                tokio::spawn(async move {
                    run_job(&d, job).await;
                    drop(permit);
                });
            }
            Ok(None) => {
                drop(permit);
                tokio::select! {
                    _ = slot.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.changed() => return,
                }
            }
            Err(e) => {
                drop(permit);
                tracing::error!(target = %target, cause = %e, "cannot read the queue");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Runs one claimed job to its terminal state.
pub async fn run_job(daemon: &Daemon, job: JobRow) {
    let Some(rt) = daemon.runtime(&job.target) else {
        tracing::error!(job_id = %job.job_id, target = %job.target, "job names a target that no longer exists");
        return;
    };
    let spec = JobSpec {
        job_id: job.job_id.clone(),
        command: job.command.clone(),
        mode: job.mode,
        params: job.params.clone().unwrap_or_default(),
        idempotency_key: Some(job.idempotency_key.clone()),
        actor: job.actor.clone(),
        approved_by: job.approved_by.clone(),
    };
    let ttl = daemon.config.daemon.approval_ttl_s as i64;
    let expired = job
        .approved_at
        .is_some_and(|at| unix_now() as i64 - at > ttl);
    let (outcome, state): (Outcome, String) = match &job.preset_refusal {
        Some((class, message)) => {
            let o = rt.refuse(&spec, class, message).await;
            let state = if class == "cancelled" {
                "cancelled".to_string()
            } else {
                o.status.as_str().to_string()
            };
            (o, state)
        }
        None if expired => {
            let o = rt
                .refuse(
                    &spec,
                    "approval_expired",
                    "the approval is older than approval_ttl_s; approve it again",
                )
                .await;
            let s = o.status.as_str().to_string();
            (o, s)
        }
        None => {
            let o = rt.run(&spec).await;
            let s = o.status.as_str().to_string();
            (o, s)
        }
    };
    if let Err(e) = daemon.queue.finish(&job.job_id, &state, &outcome).await {
        // The job stays `running` in the queue and is settled at the next
        // start; the waiters still get the outcome.
        tracing::error!(job_id = %job.job_id, cause = %e, "cannot record the job's end in the queue");
    }
    daemon.deliver(&state, &outcome);
}

/// Refuses (and audits) jobs whose approval never came within the TTL.
pub async fn sweep_approvals(daemon: Arc<Daemon>) {
    loop {
        let ttl = daemon.config.daemon.approval_ttl_s as i64;
        let before = unix_now() as i64 - ttl;
        match daemon.queue.expired_approvals(before).await {
            Ok(ids) => {
                for id in ids {
                    let msg = "no approval came within approval_ttl_s; submit it again";
                    if let Ok(Some(job)) = daemon.queue.get(&id).await {
                        if daemon
                            .queue
                            .preset_refusal(&id, "approval_expired", msg)
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
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

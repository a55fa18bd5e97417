//! Rollouts: a submit with `targets` (the rollout is created, its
//! children are started by the scheduler), `rollouts`, `rollout_status`,
//! `rollout_resume` and `rollout_cancel`. Who may see a rollout: its
//! submitter, root, an admin, and an approver while it awaits approval;
//! who may resume or cancel it: its submitter, root or an admin. A
//! requires_approval command rolled out is approved once for the whole
//! rollout (`approve`, `reject`, `show` by rollout id): the approval
//! covers the command, its values and the exact target list, and every
//! child carries it.

use std::time::Duration;

use super::super::peer::Peer;
use super::super::queue::{Access, QueueError};
use super::super::rollouts::{self, ChangeError, Created, NewRollout};
use super::super::Daemon;
use super::internal;
use crate::fleet::Selector;
use crate::job::{Approval, ErrorClass, JobId, JobState, Refusal};
use crate::protocol::{JobSpec, Reply, ReplyKind, Submit};
use crate::rollout::{Rollout, RolloutState};

/// Creates a rollout over the targets `r.targets` picks (or answers the
/// one its key names); with `wait`, answers once it is over.
pub(super) async fn submit(daemon: &Daemon, peer: &Peer, r: Submit) -> Reply {
    let bad = |m: &str| Reply::error(ReplyKind::BadRequest, m);
    if r.target.is_some() {
        return bad("give --target (one job) or --targets (a rollout), not both");
    }
    if r.plan_digest.is_some() {
        return bad("--plan pins one target's plan; a rollout plans each target itself: drop --plan (a requires_approval command is approved once for the whole rollout)");
    }
    let selector: Selector = match r.targets.as_deref().unwrap_or_default().parse() {
        Ok(s) => s,
        Err(e) => return Reply::error(ReplyKind::UnknownTarget, e.to_string()),
    };
    let config = daemon.config();
    let view: Vec<(&str, &[String])> = config
        .targets
        .iter()
        .map(|(n, t)| (n.as_str(), t.tags.as_slice()))
        .collect();
    let picked: Vec<String> = match selector.pick(&view) {
        Ok(p) if !p.is_empty() => p.into_iter().map(str::to_string).collect(),
        Ok(_) => return Reply::error(ReplyKind::UnknownTarget, "--targets picks no target"),
        Err(e) => return Reply::error(ReplyKind::UnknownTarget, e.to_string()),
    };
    if let Some(k) = r.idempotency_key.as_deref() {
        if !crate::job::valid_identifier(k) {
            return bad("idempotency keys are 1-128 characters of A-Z a-z 0-9 . _ : @ -");
        }
    }
    let strategy = r.strategy.unwrap_or_default();
    let n = picked.len();
    // The first child's job is the template: the same checks as one job
    // (command, access, approval).
    let spec = JobSpec {
        command: r.command,
        mode: r.mode,
        params: r.params,
        target: Some(picked[0].clone()),
        idempotency_key: None,
        plan_digest: None,
    };
    let template = match super::submit::new_job(daemon, peer, spec) {
        Ok(j) => j,
        Err(reply) => return *reply,
    };
    let id = match JobId::parse(&format!("r{}", JobId::new())) {
        Some(id) => id,
        None => return internal("a rollout id outside the id alphabet"),
    };
    let new = NewRollout {
        state: if template.state == JobState::AwaitingApproval {
            RolloutState::AwaitingApproval
        } else {
            RolloutState::Running
        },
        key: r
            .idempotency_key
            .clone()
            .unwrap_or_else(|| format!("rollout:{id}")),
        canary: strategy.canary.min(n as u32),
        max_concurrency: strategy.max_concurrency.resolve(n, true).max(1),
        max_errors: strategy.max_errors.resolve(n, false),
        targets: picked,
        template,
    };
    let (command, mode, uid, targets) = (
        new.template.command.clone(),
        new.template.mode,
        new.template.actor_uid,
        new.targets.clone(),
    );
    let rollout = match daemon
        .queue()
        .custom(Access::Write, move |c| rollouts::create(c, &new, &id))
        .await
    {
        Ok(Created::New(ro)) => {
            tracing::info!(rollout_id = %ro.rollout_id, command = %ro.command, mode = ro.mode.as_str(), user = %peer.user, targets = ro.targets.len(), state = %ro.state, "rollout submitted");
            daemon.rollouts_changed();
            ro
        }
        Ok(Created::Reopened(ro)) => {
            tracing::info!(rollout_id = %ro.rollout_id, user = %peer.user, pass = ro.pass, state = %ro.state, "cancelled rollout submitted again under its key: a new pass");
            daemon.rollouts_changed();
            ro
        }
        Ok(Created::Existing(ro)) => {
            let listed: Vec<&str> = ro.targets.iter().map(|t| t.target.as_str()).collect();
            if ro.command != command || ro.mode != mode || ro.actor_uid != uid || listed != targets
            {
                return Reply::error(
                    ReplyKind::Conflict,
                    format!(
                        "idempotency key {} belongs to rollout {} ({} {} over {} targets by {}); use another key, or `govsql rollout status {}`",
                        ro.idempotency_key, ro.rollout_id, ro.mode, ro.command, ro.targets.len(), ro.actor, ro.rollout_id
                    ),
                );
            }
            ro
        }
        Err(e @ QueueError::Commit(_)) => {
            return Reply::error(
                ReplyKind::Unavailable,
                format!("submits are refused while {e}; status and wait still work"),
            )
        }
        Err(e) => return internal(e),
    };
    if !r.wait || rollout.is_over() {
        return Reply::Rollout(Box::new(rollout));
    }
    let limit = Duration::from_secs(r.timeout_s.unwrap_or(3600).min(86_400));
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let id = rollout.rollout_id.clone();
        match daemon
            .queue()
            .custom(Access::Read, move |c| rollouts::get(c, &id))
            .await
        {
            Ok(Some(ro)) if ro.is_over() => return Reply::Rollout(Box::new(ro)),
            Ok(Some(ro)) if tokio::time::Instant::now() >= deadline => {
                return Reply::error(
                    ReplyKind::Timeout,
                    format!(
                        "rollout {} is still {}; `govsql rollout status {}` shows it",
                        ro.rollout_id, ro.state, ro.rollout_id
                    ),
                )
            }
            Ok(Some(_)) => {}
            Ok(None) => return not_found(&rollout.rollout_id),
            Err(e) => return internal(e),
        }
    }
}

fn not_found(id: &JobId) -> Reply {
    Reply::error(
        ReplyKind::NotFound,
        format!("no rollout {id}; `govsql rollouts` lists recent rollouts"),
    )
}

/// Whether `peer` may see `r`.
fn may_see(daemon: &Daemon, peer: &Peer, r: &Rollout) -> bool {
    let access = &daemon.config().access;
    may_change(daemon, peer, r)
        || (r.state == RolloutState::AwaitingApproval && peer.admitted_by(&access.approve))
}

/// Whether `peer` may resume or cancel `r`.
fn may_change(daemon: &Daemon, peer: &Peer, r: &Rollout) -> bool {
    peer.uid == 0 || peer.uid == r.actor_uid || peer.admitted_by(&daemon.config().access.admin)
}

async fn load(daemon: &Daemon, peer: &Peer, id: &JobId) -> Result<Rollout, Reply> {
    let wanted = id.clone();
    match daemon
        .queue()
        .custom(Access::Read, move |c| rollouts::get(c, &wanted))
        .await
    {
        Ok(Some(r)) if may_see(daemon, peer, &r) => Ok(r),
        Ok(_) => Err(not_found(id)),
        Err(e) => Err(internal(e)),
    }
}

/// One rollout, per target.
pub(super) async fn status(daemon: &Daemon, peer: &Peer, id: &JobId) -> Reply {
    match load(daemon, peer, id).await {
        Ok(r) => Reply::Rollout(Box::new(r)),
        Err(reply) => reply,
    }
}

/// The newest rollouts the peer may see.
pub(super) async fn list(daemon: &Daemon, peer: &Peer, limit: Option<u32>) -> Reply {
    let limit = limit.unwrap_or(20).clamp(1, 200);
    let all = peer.uid == 0 || peer.admitted_by(&daemon.config().access.admin);
    let uid = (!all).then_some(peer.uid);
    match daemon
        .queue()
        .custom(Access::Read, move |c| rollouts::list(c, limit, uid))
        .await
    {
        Ok(mut v) => {
            // Awaiting approval: only an approver sees another's.
            v.retain(|r| may_see(daemon, peer, r));
            Reply::Rollouts(v)
        }
        Err(e) => internal(e),
    }
}

/// Resumes or cancels a rollout.
pub(super) async fn change(daemon: &Daemon, peer: &Peer, id: &JobId, resume: bool) -> Reply {
    let r = match load(daemon, peer, id).await {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    if !may_change(daemon, peer, &r) {
        return Reply::error(
            ReplyKind::Denied,
            "only the submitter, root or an [access] admin may resume or cancel a rollout",
        );
    }
    let (wanted, by, known) = (id.clone(), peer.user.clone(), daemon.target_names());
    let result = if resume {
        daemon
            .queue()
            .custom(Access::Write, move |c| {
                Ok(rollouts::resume(c, &wanted).map(|r| (r, Vec::new())))
            })
            .await
    } else {
        daemon
            .queue()
            .custom(Access::Write, move |c| {
                Ok(rollouts::cancel(c, &wanted, &by, &known))
            })
            .await
    };
    let what = if resume { "resumed" } else { "cancelled" };
    changed(daemon, peer, id, what, result)
}

/// The reply to a change of a rollout (approve, reject, resume, cancel):
/// the targets it queued children on are woken, the scheduler too.
fn changed(
    daemon: &Daemon,
    peer: &Peer,
    id: &JobId,
    what: &str,
    result: Result<Result<(Rollout, Vec<String>), ChangeError>, QueueError>,
) -> Reply {
    match result {
        Ok(Ok((r, wake))) => {
            tracing::info!(rollout_id = %id, user = %peer.user, pass = r.pass, state = %r.state, "rollout {what}");
            for t in &wake {
                daemon.wake(t);
            }
            daemon.rollouts_changed();
            Reply::Rollout(Box::new(r))
        }
        Ok(Err(ChangeError::NotFound(_))) => not_found(id),
        Ok(Err(ChangeError::State(m))) => Reply::error(ReplyKind::Conflict, m),
        Ok(Err(ChangeError::Sqlite(e))) => internal(e),
        Err(e) => internal(e),
    }
}

/// The rollout an approver acts on: the peer in the approve list, not
/// its submitter, the rollout awaiting approval.
async fn awaiting_for_approver(daemon: &Daemon, peer: &Peer, id: &JobId) -> Result<Rollout, Reply> {
    super::approve::must_approve(daemon, peer)?;
    let r = load(daemon, peer, id).await?;
    if r.state != RolloutState::AwaitingApproval {
        return Err(Reply::error(
            ReplyKind::Conflict,
            format!("rollout {id} is {}, not awaiting approval", r.state),
        ));
    }
    if r.actor_uid == peer.uid {
        return Err(Reply::error(
            ReplyKind::Denied,
            "a rollout must be approved by a different user than the one who submitted it",
        ));
    }
    Ok(r)
}

/// One approval for every target of a rollout.
pub(super) async fn approve(
    daemon: &Daemon,
    peer: &Peer,
    id: &JobId,
    reason: Option<String>,
    plan: Option<String>,
) -> Reply {
    if plan.is_some() {
        return Reply::error(
            ReplyKind::BadRequest,
            "--plan names one job's plan; a rollout is approved for its command, values and targets (`govsql show ROLLOUT`): drop --plan",
        );
    }
    let r = match awaiting_for_approver(daemon, peer, id).await {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    let ttl = daemon.config().daemon.approval_ttl_s as i64;
    if crate::time::unix_now() - r.submitted_at > ttl {
        return Reply::error(
            ReplyKind::Expired,
            "the approval came after approval_ttl_s; submit the rollout again",
        );
    }
    let needed = daemon
        .catalog()
        .get(&r.command)
        .map_or(1, |c| c.approvals_needed().max(1));
    let approval = Approval {
        by: peer.user.clone(),
        at: crate::time::utc_text(crate::time::unix_now()),
        reason: reason.as_deref().and_then(super::approve::reason_text),
    };
    let wanted = id.clone();
    let result = daemon
        .queue()
        .custom(Access::Write, move |c| {
            Ok(rollouts::approve(c, &wanted, approval, needed).map(|r| (r, Vec::new())))
        })
        .await;
    changed(daemon, peer, id, "approved", result)
}

/// Rejects a rollout awaiting approval: every target's child is refused
/// `rejected` (a ledger row each, the reason in its evidence).
pub(super) async fn reject(daemon: &Daemon, peer: &Peer, id: &JobId, reason: &str) -> Reply {
    let Some(reason) = super::approve::reason_text(reason) else {
        return Reply::error(ReplyKind::BadRequest, "a rejection needs a --reason");
    };
    if let Err(reply) = awaiting_for_approver(daemon, peer, id).await {
        return reply;
    }
    let why = Refusal {
        class: ErrorClass::Rejected,
        message: format!("rejected by {}: {reason}", peer.user),
    };
    let (wanted, known) = (id.clone(), daemon.target_names());
    let result = daemon
        .queue()
        .custom(Access::Write, move |c| {
            Ok(rollouts::refuse_all(c, &wanted, &why, &known))
        })
        .await;
    changed(daemon, peer, id, "rejected", result)
}

/// What a rollout will run, values included (never logged), and the
/// exact targets one approval covers: for its submitter, root, or an
/// approver while it awaits approval.
pub(super) async fn show(daemon: &Daemon, peer: &Peer, id: &JobId) -> Reply {
    let wanted = id.clone();
    let (r, params) = match daemon
        .queue()
        .custom(Access::Read, move |c| rollouts::shown(c, &wanted))
        .await
    {
        Ok(Some(found)) => found,
        Ok(None) => return not_found(id),
        Err(e) => return internal(e),
    };
    let approving = r.state == RolloutState::AwaitingApproval
        && r.actor_uid != peer.uid
        && peer.admitted_by(&daemon.config().access.approve);
    if r.actor_uid != peer.uid && peer.uid != 0 && !approving {
        return not_found(id);
    }
    if r.state == RolloutState::Done || (r.state == RolloutState::Cancelled && r.is_over()) {
        return Reply::error(
            ReplyKind::Conflict,
            format!(
                "rollout {id} is {}; its values were erased when it ended",
                r.state
            ),
        );
    }
    let catalog = daemon.catalog();
    let cmd = match catalog.get(&r.command) {
        Ok(c) => c,
        Err(e) => return Reply::error(ReplyKind::UnknownCommand, e.to_string()),
    };
    tracing::info!(rollout_id = %id, user = %peer.user, "rollout shown");
    let targets: Vec<String> = r.targets.iter().map(|t| t.target.clone()).collect();
    Reply::Show(Box::new(crate::protocol::ShowJob {
        job_id: r.rollout_id.clone(),
        state: match r.state {
            RolloutState::AwaitingApproval => JobState::AwaitingApproval,
            RolloutState::Running => JobState::Running,
            _ => JobState::Queued,
        },
        actor: r.actor.clone(),
        command: r.command.clone(),
        mode: r.mode,
        target: targets.first().cloned().unwrap_or_default(),
        targets,
        description: cmd.description.clone(),
        statements: cmd.statements.clone(),
        params: params.pairs().to_vec(),
        plan_digest: None,
        plan_covers: None,
        approvals: r.approvals.clone(),
        approvals_required: if r.mode == crate::job::Mode::Apply {
            cmd.approvals_needed()
        } else {
            0
        },
    }))
}

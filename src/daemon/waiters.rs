//! Waiters and delivery: who waits for which job, and each finished
//! job's outcome handed to them, kept a while for late waiters.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::Daemon;
use crate::job::{JobId, Outcome};

/// Who waits for which job, and the outcomes handed out: kept until the
/// queue has the job's end (a wait that arrives in between gets its
/// outcome here, not a `running` row that will never wake it), then for
/// [`RESULT_GRACE`] more, so that a client that submits and then waits, or
/// re-attaches at once, still gets the result (which the queue never
/// stores). Bounded by [`RESULT_BUDGET`] bytes of results.
#[derive(Default)]
pub(super) struct Waiting {
    waiters: HashMap<JobId, Vec<oneshot::Sender<Outcome>>>,
    delivered: HashMap<JobId, Outcome>,
    /// Recorded outcomes, oldest first, with when they were recorded.
    expiry: std::collections::VecDeque<(Instant, JobId)>,
    /// Bytes of result rows held in `delivered`.
    bytes: usize,
}

/// How long a recorded job's outcome (result included) stays in memory.
const RESULT_GRACE: Duration = Duration::from_secs(60);
/// The most result bytes held for late waiters.
const RESULT_BUDGET: usize = 64 << 20;

fn result_bytes(o: &Outcome) -> usize {
    o.result
        .iter()
        .flatten()
        .flatten()
        .map(|f| f.as_ref().map_or(0, String::len))
        .sum()
}

impl Waiting {
    fn add(&mut self, job_id: &JobId) -> oneshot::Receiver<Outcome> {
        let (tx, rx) = oneshot::channel();
        match self.delivered.get(job_id) {
            Some(outcome) => {
                let _ = tx.send(outcome.clone());
            }
            None => {
                let list = self.waiters.entry(job_id.clone()).or_default();
                // Waits that ended (their receiver is gone) leave no trace.
                list.retain(|t| !t.is_closed());
                list.push(tx);
            }
        }
        rx
    }

    fn prune(&mut self, job_id: &JobId) {
        if let Some(list) = self.waiters.get_mut(job_id) {
            list.retain(|t| !t.is_closed());
            if list.is_empty() {
                self.waiters.remove(job_id);
            }
        }
    }

    /// Drops recorded outcomes past their grace, or over the budget.
    fn expire(&mut self) {
        while let Some((at, id)) = self.expiry.front() {
            if at.elapsed() < RESULT_GRACE && self.bytes <= RESULT_BUDGET {
                break;
            }
            if let Some(o) = self.delivered.remove(id) {
                self.bytes -= result_bytes(&o);
            }
            self.expiry.pop_front();
        }
    }
}

impl Daemon {
    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a waiter for a job's outcome. A job whose outcome was
    /// already handed out (its queue row not yet written) answers at once.
    pub fn add_waiter(&self, job_id: &JobId) -> oneshot::Receiver<Outcome> {
        self.waiting().add(job_id)
    }

    /// Drops the waiters of a job whose wait ended (their receiver is
    /// gone); every other request's wait on the same job stays.
    pub fn prune_waiters(&self, job_id: &JobId) {
        self.waiting().prune(job_id)
    }

    /// Hands a finished job's outcome (result included) to its waiters,
    /// and keeps it for later waiters (see [`Waiting`]).
    pub fn deliver(&self, outcome: &Outcome) {
        let waiters = {
            let mut w = self.waiting();
            w.bytes += result_bytes(outcome);
            if let Some(old) = w.delivered.insert(outcome.job_id.clone(), outcome.clone()) {
                w.bytes -= result_bytes(&old);
            }
            w.expire();
            w.waiters.remove(&outcome.job_id)
        };
        for w in waiters.into_iter().flatten() {
            let _ = w.send(outcome.clone());
        }
    }

    /// The job's end is in the queue: its outcome stays for late waiters
    /// for [`RESULT_GRACE`] only.
    pub fn recorded(&self, job_id: &JobId) {
        let mut w = self.waiting();
        w.expiry.push_back((Instant::now(), job_id.clone()));
        w.expire();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `wait` with timeout 0 on one's own waiting job left one waiter per
    /// request (300 000 requests: +48 MiB). A wait that ended leaves none,
    /// and pruning one wait never drops another's.
    #[test]
    fn waits_that_ended_leave_no_waiter_and_others_stay() {
        let mut w = Waiting::default();
        let id = JobId::new();
        for _ in 0..1000 {
            drop(w.add(&id));
            w.prune(&id);
        }
        assert!(w.waiters.is_empty());
        let mine = w.add(&id);
        let theirs = w.add(&id);
        drop(theirs);
        w.prune(&id);
        assert_eq!(w.waiters[&id].len(), 1);
        assert!(!w.waiters[&id][0].is_closed());
        drop(mine);
        w.prune(&id);
        assert!(w.waiters.is_empty());
    }
}

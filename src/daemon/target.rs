//! A target as the daemon holds it: its executor (kept across catalog
//! reloads), its runtime, its slots, its wake-up signal, how its recent
//! jobs went, and the probe that finds it back when it was down.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore};

use crate::job::Outcome;
use crate::runtime::Runtime;
use crate::time::unix_now;
use crate::transport::Executor;

/// One target: its executor (kept across catalog reloads), its runtime,
/// its concurrency and its wake-up signal.
pub struct TargetSlot {
    pub(super) executor: Arc<dyn Executor>,
    pub(super) runtime: RwLock<Arc<Runtime>>,
    pub(super) permits: Arc<Semaphore>,
    pub(super) wake: Notify,
    pub(super) alive_at: AtomicU64,
    /// How its recent jobs went, for health.
    pub(super) record: Mutex<TargetRecord>,
    /// The probe of a target that is down: one job at a time (the
    /// permit's holder), at most every [`PROBE_EVERY`] (when the last
    /// began).
    pub(super) probe: Arc<Semaphore>,
    pub(super) probe_began: Mutex<Option<Instant>>,
}

/// How often a target that is down is tried (with its oldest waiting job)
/// while its jobs sleep out their backoff.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// When a target's jobs last reached the database, and last did not.
#[derive(Debug, Default, Clone)]
pub struct TargetRecord {
    pub(super) last_ok_at: Option<i64>,
    pub(super) last_error: Option<(i64, String)>,
    /// Its last job that reached neither SSH nor the database came after
    /// its last job that did: its waiting jobs sleep, and a probe runs.
    pub(super) down: bool,
}

impl TargetRecord {
    pub(super) fn reachable(&self) -> bool {
        match (&self.last_error, self.last_ok_at) {
            (None, _) => true,
            (Some((err_at, _)), Some(ok_at)) => ok_at >= *err_at,
            (Some(_), None) => false,
        }
    }
}

impl TargetSlot {
    /// Notes how a job on this target went. True when the target is back:
    /// this job reached the database after jobs that could not.
    pub fn note(&self, outcome: &Outcome) -> bool {
        use crate::job::ErrorClass as C;
        let now = unix_now();
        let mut r = self.record.lock().unwrap_or_else(|p| p.into_inner());
        if outcome.pending == Some(crate::job::Pending::NothingRan) {
            r.down = true;
        }
        match &outcome.error_class {
            Some(
                c
                @ (C::TargetUnreachable | C::DbUnavailable | C::HostKey | C::SshAuth | C::Timeout),
            ) if outcome.run_id.is_none() => {
                r.last_error = Some((now, c.as_str().to_string()));
                false
            }
            _ => {
                r.last_ok_at = Some(now);
                std::mem::replace(&mut r.down, false)
            }
        }
    }

    /// A probe of this target when one is due: it is down, no probe is
    /// running, and the last began [`PROBE_EVERY`] ago. The probe lasts
    /// as long as the permit.
    pub(super) fn begin_probe(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if !self.record.lock().unwrap_or_else(|p| p.into_inner()).down {
            return None;
        }
        let mut began = self.probe_began.lock().unwrap_or_else(|p| p.into_inner());
        if began.is_some_and(|at| at.elapsed() < PROBE_EVERY) {
            return None;
        }
        let permit = self.probe.clone().try_acquire_owned().ok()?;
        *began = Some(Instant::now());
        Some(permit)
    }

    pub(super) fn runtime(&self) -> Arc<Runtime> {
        self.runtime
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

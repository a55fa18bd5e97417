//! The cap on open SSH connections across all the targets of one daemon
//! (`[daemon] max_ssh_connections`, default 64): a fleet of 500 targets
//! does not mean 500 open connections. Each live SSH session holds one
//! permit; a target that must connect while none is free closes an idle
//! connection first, the one used longest ago. A connection with a job
//! or a read on it is never closed for another target: the target that
//! waits gets the next connection that goes idle.

use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::BoxFuture;

/// A connection the cap may close when it is idle.
pub(super) trait Idle: Send + Sync {
    /// Whether a session is open now.
    fn is_up(&self) -> bool;
    /// When it was last used ([`now_ms`]).
    fn last_used(&self) -> u64;
    /// Closes it if nothing uses it; whether it did.
    fn close_if_idle(&self) -> BoxFuture<'_, bool>;
}

/// Milliseconds since the first call in this process (monotonic).
pub(super) fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// The shared cap of one daemon.
pub struct ConnectionCap {
    limit: usize,
    permits: Arc<Semaphore>,
    members: Mutex<Vec<Weak<dyn Idle>>>,
}

impl std::fmt::Debug for ConnectionCap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionCap")
            .field("limit", &self.limit)
            .field("open", &self.open())
            .finish()
    }
}

/// How often a target waiting for a connection looks for one gone idle.
const LOOK_AGAIN: Duration = Duration::from_millis(50);

impl ConnectionCap {
    /// A cap of `limit` open connections (at least 1).
    pub fn new(limit: usize) -> Arc<ConnectionCap> {
        Arc::new(ConnectionCap {
            limit: limit.max(1),
            permits: Arc::new(Semaphore::new(limit.max(1))),
            members: Mutex::new(Vec::new()),
        })
    }

    /// The cap.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.limit - self.permits.available_permits()
    }

    /// A connection the cap may close.
    pub(super) fn register(&self, member: Weak<dyn Idle>) {
        let mut m = self.members.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|w| w.strong_count() > 0);
        m.push(member);
    }

    /// A permit to open one connection: a free one, else one an idle
    /// connection gives back when the cap closes it (the one used longest
    /// ago first), else the first to come free.
    pub(super) async fn acquire(&self) -> OwnedSemaphorePermit {
        loop {
            if let Ok(p) = self.permits.clone().try_acquire_owned() {
                return p;
            }
            let mut up: Vec<Arc<dyn Idle>> = self
                .members
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter_map(Weak::upgrade)
                .filter(|m| m.is_up())
                .collect();
            up.sort_by_key(|m| m.last_used());
            let mut closed = false;
            for m in up {
                if m.close_if_idle().await {
                    closed = true;
                    break;
                }
            }
            if closed {
                continue;
            }
            tokio::select! {
                p = self.permits.clone().acquire_owned() => {
                    if let Ok(p) = p {
                        return p;
                    }
                }
                _ = tokio::time::sleep(LOOK_AGAIN) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    struct Conn {
        up: AtomicBool,
        busy: AtomicBool,
        used: AtomicU64,
        permit: Mutex<Option<OwnedSemaphorePermit>>,
    }

    impl Idle for Conn {
        fn is_up(&self) -> bool {
            self.up.load(Ordering::SeqCst)
        }
        fn last_used(&self) -> u64 {
            self.used.load(Ordering::SeqCst)
        }
        fn close_if_idle(&self) -> BoxFuture<'_, bool> {
            Box::pin(async move {
                if self.busy.load(Ordering::SeqCst) {
                    return false;
                }
                self.up.store(false, Ordering::SeqCst);
                self.permit.lock().unwrap().take();
                true
            })
        }
    }

    fn conn(used: u64, busy: bool) -> Arc<Conn> {
        Arc::new(Conn {
            up: AtomicBool::new(false),
            busy: AtomicBool::new(busy),
            used: AtomicU64::new(used),
            permit: Mutex::new(None),
        })
    }

    async fn connect(cap: &ConnectionCap, c: &Arc<Conn>) {
        let p = cap.acquire().await;
        *c.permit.lock().unwrap() = Some(p);
        c.up.store(true, Ordering::SeqCst);
    }

    #[tokio::test]
    async fn the_idle_connection_used_longest_ago_closes_first_and_a_busy_one_never() {
        let cap = ConnectionCap::new(2);
        let (a, b, c) = (conn(10, true), conn(20, false), conn(30, false));
        for m in [&a, &b, &c] {
            let weak: Weak<dyn Idle> = Arc::downgrade(m) as Weak<dyn Idle>;
            cap.register(weak);
        }
        connect(&cap, &a).await;
        connect(&cap, &b).await;
        assert_eq!(cap.open(), 2);
        // a is older but busy: b closes.
        connect(&cap, &c).await;
        assert!(a.is_up() && !b.is_up() && c.is_up());
        assert_eq!(cap.open(), 2);
        // Everything busy: the next waits until one goes idle.
        c.busy.store(true, Ordering::SeqCst);
        let waiter = {
            let cap = cap.clone();
            let b = b.clone();
            tokio::spawn(async move { connect(&cap, &b).await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiter.is_finished(), "a busy connection was closed");
        a.busy.store(false, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the idle connection was not given")
            .unwrap();
        assert!(!a.is_up() && b.is_up() && c.is_up());
    }
}

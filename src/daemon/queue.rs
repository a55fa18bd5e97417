//! The durable job queue: SQLite (WAL, synchronous FULL, secure_delete,
//! file mode 0600) owned by one writer thread. Requests arriving together
//! are committed in one transaction (group commit), so durability costs
//! one fsync per batch, not per job.
//!
//! A job's raw params live here only while it is queued or running; when
//! it becomes terminal they are erased (and the WAL checkpointed with
//! TRUNCATE so the bytes leave the disk); its digest stays.

use std::collections::BTreeMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;

use crate::job::{Approval, ErrorClass, Job, JobId, JobState, Mode, Outcome, Refusal};
use crate::protocol::ListFilter;
use crate::time::unix_now as now;

/// A queue failure.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// SQLite said no.
    #[error("queue database {path}: {source}")]
    Sqlite {
        /// The queue file.
        path: PathBuf,
        /// The SQLite error.
        source: rusqlite::Error,
    },
    /// The file could not be created with mode 0600.
    #[error("cannot create the queue file {path}: {source}")]
    Create {
        /// The queue file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The writer thread is gone.
    #[error("the queue writer stopped")]
    Closed,
    /// A state transition that does not apply.
    #[error("{0}")]
    State(String),
    /// The queue could not commit (a full disk, an I/O error).
    #[error("the queue cannot write to disk ({0}); free space in state_dir")]
    Commit(String),
}

type Reply<T> = oneshot::Sender<Result<T, QueueError>>;

/// The deferred reply of one op, sent once the batch's commit is known.
type Deferred = Box<dyn FnOnce(Option<&rusqlite::Error>)>;

/// Another module's statements (the rollouts'), run on the writer thread
/// in the batch's transaction; given the error instead when that
/// transaction cannot start.
type Custom = Box<dyn FnOnce(Result<&Connection, QueueError>, &Path) -> Deferred + Send>;

/// What a [`Custom`] op does to the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads only.
    Read,
    /// Writes (durably: synchronous FULL).
    Write,
    /// Writes and erases values (the WAL is checkpointed and the file
    /// scrubbed after it, as after a job's end).
    Erase,
}

enum Op {
    Submit(Box<Job>, Reply<Job>),
    Get(JobId, Reply<Option<Job>>),
    List(u32, u64, Option<u32>, Box<ListFilter>, Reply<Vec<Job>>),
    ClaimNext(String, bool, Reply<Option<Job>>),
    WakeWaiting(String, Reply<usize>),
    Finish(
        JobId,
        JobState,
        Box<(Outcome, Option<(String, i64)>)>,
        bool,
        Reply<()>,
    ),
    ExpireResults(i64, Reply<usize>),
    Owed(String, u32, Reply<Vec<Job>>),
    Retry(JobId, JobState, Reply<u32>),
    Prune(i64, Reply<usize>),
    Approve(JobId, Box<Approval>, u8, Reply<Job>),
    Pin(Vec<(JobId, String, String)>, Reply<usize>),
    Preset(JobId, Refusal, Reply<usize>),
    Recover(Reply<usize>),
    Counts(Reply<QueueCounts>),
    Expired(i64, Reply<Vec<JobId>>),
    Unpinned(String, i64, usize, Reply<Vec<Job>>),
    Custom(Access, Custom),
}

impl Op {
    /// Whether the op only reads (it changes no row).
    fn is_read(&self) -> bool {
        matches!(
            self,
            Op::Get(..)
                | Op::List(..)
                | Op::Owed(..)
                | Op::Counts(..)
                | Op::Expired(..)
                | Op::Unpinned(..)
                | Op::Custom(Access::Read, _)
        )
    }

    /// Answers the op with an error, without running it.
    fn fail(self, e: QueueError) {
        fn send<T>(r: Reply<T>, e: QueueError) {
            let _ = r.send(Err(e));
        }
        match self {
            Op::Submit(_, r) | Op::Approve(_, _, _, r) => send(r, e),
            Op::Get(_, r) => send(r, e),
            Op::List(_, _, _, _, r) | Op::Owed(_, _, r) | Op::Unpinned(_, _, _, r) => send(r, e),
            Op::ClaimNext(_, _, r) => send(r, e),
            Op::WakeWaiting(_, r)
            | Op::ExpireResults(_, r)
            | Op::Prune(_, r)
            | Op::Pin(_, r)
            | Op::Preset(_, _, r)
            | Op::Recover(r) => send(r, e),
            Op::Finish(_, _, _, _, r) => send(r, e),
            Op::Retry(_, _, r) => send(r, e),
            Op::Counts(r) => send(r, e),
            Op::Expired(_, r) => send(r, e),
            Op::Custom(_, run) => run(Err(e), Path::new(""))(None),
        }
    }
}

/// A handle to the queue's writer thread.
#[derive(Clone)]
pub struct Queue {
    tx: mpsc::Sender<Op>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id          TEXT NOT NULL UNIQUE,
    command         TEXT NOT NULL,
    mode            TEXT NOT NULL,
    target          TEXT NOT NULL,
    params          TEXT,
    params_digest   TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    actor           TEXT NOT NULL,
    actor_uid       INTEGER NOT NULL,
    state           TEXT NOT NULL,
    preset_class    TEXT,
    preset_message  TEXT,
    approved_by     TEXT,
    approved_at     INTEGER,
    submitted_at    INTEGER NOT NULL,
    started_at      INTEGER,
    finished_at     INTEGER,
    outcome         TEXT
);
CREATE INDEX IF NOT EXISTS jobs_runnable ON jobs (target, state, seq);
";

/// Columns added after the first release: (name, declaration). A queue of
/// an earlier release gets them when it is opened.
const ADDED_COLUMNS: &[(&str, &str)] = &[
    ("not_before", "INTEGER"),
    ("first_try_at", "INTEGER"),
    ("attempts", "INTEGER NOT NULL DEFAULT 0"),
    ("row_owed", "INTEGER NOT NULL DEFAULT 0"),
    ("result", "TEXT"),
    ("result_until", "INTEGER"),
    ("approve_reason", "TEXT"),
    ("plan_digest", "TEXT"),
    ("plan_covers", "TEXT"),
    ("approvals", "TEXT"),
    ("rollout_id", "TEXT"),
];

/// Creates the queue's tables, or brings those of an earlier release up
/// to date (added columns, indexes, the rollout tables).
pub(super) fn prepare(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA)?;
    for (name, decl) in ADDED_COLUMNS {
        let present: bool = conn.query_row(
            "SELECT count(*) > 0 FROM pragma_table_info('jobs') WHERE name = ?1",
            [name],
            |r| r.get(0),
        )?;
        if !present {
            conn.execute_batch(&format!("ALTER TABLE jobs ADD COLUMN {name} {decl}"))?;
        }
    }
    // The sweeper looks for owed ledger rows every few seconds.
    conn.execute_batch("CREATE INDEX IF NOT EXISTS jobs_owed ON jobs (seq) WHERE row_owed = 1")?;
    conn.execute_batch(super::rollouts::SCHEMA)
}

impl Queue {
    /// Opens (creating with mode 0600) the queue at `path` and starts its
    /// writer thread.
    pub fn open(path: &Path) -> Result<Queue, QueueError> {
        let sq = |source| QueueError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(path)
            .map_err(|source| QueueError::Create {
                path: path.to_path_buf(),
                source,
            })?;
        let conn = Connection::open(path).map_err(sq)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sq)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sq)?;
        conn.pragma_update(None, "secure_delete", "ON")
            .map_err(sq)?;
        prepare(&conn).map_err(sq)?;
        let (tx, rx) = mpsc::channel();
        let owned = path.to_path_buf();
        std::thread::Builder::new()
            .name("govsql-queue".into())
            .spawn(move || writer(conn, owned, rx))
            .map_err(|source| QueueError::Create {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Queue { tx })
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Op) -> Result<T, QueueError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).map_err(|_| QueueError::Closed)?;
        rx.await.map_err(|_| QueueError::Closed)?
    }

    /// Runs another module's statements on the writer thread, in the
    /// batch's transaction (committed with it unless `access` is Read).
    pub async fn custom<T: Send + 'static>(
        &self,
        access: Access,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, QueueError> {
        self.call(move |reply| {
            Op::Custom(
                access,
                Box::new(move |conn, path| match conn {
                    Ok(c) => respond(reply, f(c), path),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        Box::new(|_| {})
                    }
                }),
            )
        })
        .await
    }

    /// Inserts a job.
    pub async fn submit(&self, job: Job) -> Result<Job, QueueError> {
        self.call(|r| Op::Submit(Box::new(job), r)).await
    }

    /// One job.
    pub async fn get(&self, job_id: &JobId) -> Result<Option<Job>, QueueError> {
        self.call(|r| Op::Get(job_id.clone(), r)).await
    }

    /// The newest jobs, `limit` of them after skipping `offset` (of one
    /// submitter's uid, when given, plus every job waiting for approval).
    pub async fn list(
        &self,
        limit: u32,
        offset: u64,
        uid: Option<u32>,
        filter: ListFilter,
    ) -> Result<Vec<Job>, QueueError> {
        self.call(|r| Op::List(limit, offset, uid, Box::new(filter), r))
            .await
    }

    /// Moves the oldest claimable job of `target` (queued or unsettled,
    /// its backoff over) to running and returns it. A probe of a target
    /// that is down (`ignore_backoff`) takes the oldest waiting job even
    /// while its backoff runs: the first to go when the target is back.
    pub async fn claim_next(
        &self,
        target: &str,
        ignore_backoff: bool,
    ) -> Result<Option<Job>, QueueError> {
        self.call(|r| Op::ClaimNext(target.to_string(), ignore_backoff, r))
            .await
    }

    /// The target answers again: its waiting jobs (queued or unsettled)
    /// may be claimed at once, oldest first. Returns how many waited.
    pub async fn wake_waiting(&self, target: &str) -> Result<usize, QueueError> {
        self.call(|r| Op::WakeWaiting(target.to_string(), r)).await
    }

    /// Records a job's terminal state (from its outcome) and erases the
    /// params, unless its ledger row is owed (`row_owed`: nothing reached
    /// the database; the params are kept until the row is written).
    pub async fn finish(
        &self,
        outcome: &Outcome,
        row_owed: bool,
        result_ttl_s: u64,
    ) -> Result<(), QueueError> {
        let mut stored = outcome.clone();
        let result = stored
            .result
            .take()
            .filter(|_| result_ttl_s > 0)
            .and_then(|r| serde_json::to_string(&r).ok())
            .map(|text| (text, now() + result_ttl_s as i64));
        let id = outcome.job_id.clone();
        self.call(|r| Op::Finish(id, outcome.state(), Box::new((stored, result)), row_owed, r))
            .await
    }

    /// Erases the results past their `result_ttl_s`; how many.
    pub async fn expire_results(&self) -> Result<usize, QueueError> {
        self.call(|r| Op::ExpireResults(now(), r)).await
    }

    /// Terminal jobs of `target` whose ledger row is still owed, oldest
    /// first.
    pub async fn owed(&self, target: &str, limit: u32) -> Result<Vec<Job>, QueueError> {
        self.call(|r| Op::Owed(target.to_string(), limit, r)).await
    }

    /// A job that is not over yet (nothing ran, or an apply unsettled)
    /// goes back to `state` (queued or unsettled), claimable again after a
    /// backoff of 2^attempts seconds (at most 30); its params are kept.
    /// Returns how many attempts it has had.
    pub async fn retry(&self, job_id: &JobId, state: JobState) -> Result<u32, QueueError> {
        self.call(|r| Op::Retry(job_id.clone(), state, r)).await
    }

    /// Deletes terminal jobs that ended before `before` (unix seconds).
    pub async fn prune(&self, before: i64) -> Result<usize, QueueError> {
        self.call(|r| Op::Prune(before, r)).await
    }

    /// awaiting_approval → queued, approved by `by`.
    pub async fn approve(
        &self,
        job_id: &JobId,
        approval: Approval,
        needed: u8,
    ) -> Result<Job, QueueError> {
        self.call(|r| Op::Approve(job_id.clone(), Box::new(approval), needed, r))
            .await
    }

    /// Pins a job awaiting approval, or a waiting apply that has no plan
    /// yet, to a plan (its digest and what it covers); returns 0 when it
    /// is neither any more (a worker claimed it first).
    pub async fn pin(
        &self,
        job_id: &JobId,
        digest: &str,
        covers: &serde_json::Value,
    ) -> Result<usize, QueueError> {
        self.pin_many(vec![(job_id.clone(), digest.to_string(), covers)])
            .await
    }

    /// [`Queue::pin`] for several jobs in one transaction (one sync of
    /// the queue file, not one per job); how many were pinned.
    pub async fn pin_many(
        &self,
        pins: Vec<(JobId, String, &serde_json::Value)>,
    ) -> Result<usize, QueueError> {
        let pins = pins
            .into_iter()
            .map(|(id, digest, covers)| (id, digest, covers.to_string()))
            .collect();
        self.call(|r| Op::Pin(pins, r)).await
    }

    /// Sets a refusal the worker will audit, and queues the job; returns
    /// 0 when the job was no longer queued or waiting.
    pub async fn preset_refusal(
        &self,
        job_id: &JobId,
        class: ErrorClass,
        message: &str,
    ) -> Result<usize, QueueError> {
        let refusal = Refusal {
            class,
            message: message.to_string(),
        };
        self.call(|r| Op::Preset(job_id.clone(), refusal, r)).await
    }

    /// After a crash: every running job goes back to the queue, in order,
    /// to be settled through the same path (the ledger decides); a running
    /// apply comes back `unsettled` (it may have committed).
    pub async fn recover(&self) -> Result<usize, QueueError> {
        self.call(Op::Recover).await
    }

    /// Jobs per state.
    pub async fn counts(&self) -> Result<QueueCounts, QueueError> {
        self.call(Op::Counts).await
    }

    /// awaiting_approval jobs submitted before `before` (unix seconds).
    pub async fn expired_approvals(&self, before: i64) -> Result<Vec<JobId>, QueueError> {
        self.call(|r| Op::Expired(before, r)).await
    }

    /// Applies of a target queued since `before` or earlier with no plan
    /// pinned (no approval, no `--plan`, no refusal preset), oldest first,
    /// at most `limit`.
    pub async fn unpinned_waiting(
        &self,
        target: &str,
        before: i64,
        limit: usize,
    ) -> Result<Vec<Job>, QueueError> {
        let target = target.to_string();
        self.call(|r| Op::Unpinned(target, before, limit, r)).await
    }
}

pub(super) const COLUMNS: &str = "seq, job_id, command, mode, target, params, params_digest, idempotency_key, actor, actor_uid, state, preset_class, preset_message, approved_by, approved_at, submitted_at, finished_at, outcome, first_try_at, result, result_until, approve_reason, plan_digest, plan_covers, approvals, rollout_id";

/// A column whose stored word this build does not know: an error, never
/// a silent default.
fn bad_word(col: usize, what: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        col,
        rusqlite::types::Type::Text,
        format!("unknown {what} in the queue (written by a newer govsql?)").into(),
    )
}

pub(super) fn row_to_job(r: &rusqlite::Row<'_>) -> rusqlite::Result<Job> {
    let word = |col: usize, what: &str| -> rusqlite::Result<String> {
        r.get::<_, String>(col).map_err(|_| bad_word(col, what))
    };
    let job_id = JobId::parse(&word(1, "job id")?).ok_or_else(|| bad_word(1, "job id"))?;
    let mode = Mode::parse(&word(3, "mode")?).ok_or_else(|| bad_word(3, "mode"))?;
    let state = JobState::parse(&word(10, "state")?).ok_or_else(|| bad_word(10, "state"))?;
    let params: Option<String> = r.get(5)?;
    let outcome: Option<String> = r.get(17)?;
    let class: Option<String> = r.get(11)?;
    let message: Option<String> = r.get(12)?;
    let preset = match class {
        Some(c) => Some(Refusal {
            class: ErrorClass::parse(&c).ok_or_else(|| bad_word(11, "error class"))?,
            message: message.unwrap_or_default(),
        }),
        None => None,
    };
    Ok(Job {
        job_id,
        command: r.get(2)?,
        mode,
        target: r.get(4)?,
        params: params.and_then(|p| serde_json::from_str(&p).ok()),
        params_digest: r.get(6)?,
        idempotency_key: r.get(7)?,
        actor: r.get(8)?,
        actor_uid: r.get(9)?,
        state,
        preset,
        approved_by: r.get(13)?,
        approved_at: r.get(14)?,
        approve_reason: r.get(21)?,
        plan_digest: r.get(22)?,
        plan_covers: r
            .get::<_, Option<String>>(23)?
            .and_then(|t| serde_json::from_str(&t).ok()),
        approvals: r
            .get::<_, Option<String>>(24)?
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default(),
        submitted_at: r.get(15)?,
        finished_at: r.get(16)?,
        outcome: outcome
            .and_then(|o| serde_json::from_str::<Outcome>(&o).ok())
            .map(|mut o| {
                // The result, for its submitter, until it expires.
                let until: Option<i64> = r.get(20).ok().flatten();
                if until.is_some_and(|u| u > now()) {
                    let text: Option<String> = r.get(19).ok().flatten();
                    o.result = text.and_then(|t| serde_json::from_str(&t).ok());
                }
                o
            }),
        first_try_at: r.get(18)?,
        rollout_id: r
            .get::<_, Option<String>>(25)?
            .and_then(|t| JobId::parse(&t)),
        in_doubt: false,
    })
}

/// Runs a statement through the connection's statement cache (the queue
/// runs the same few statements for every job; parsing them each time was
/// most of the writer thread's work).
fn exec(conn: &Connection, sql: &str, p: impl rusqlite::Params) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(p)
}

/// One row of a cached statement.
fn one_row<T>(
    conn: &Connection,
    sql: &str,
    p: impl rusqlite::Params,
    f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    conn.prepare_cached(sql)?.query_row(p, f)
}

fn get_job(conn: &Connection, job_id: &JobId) -> rusqlite::Result<Option<Job>> {
    one_row(
        conn,
        &format!("SELECT {COLUMNS} FROM jobs WHERE job_id = ?1"),
        [job_id.as_str()],
        row_to_job,
    )
    .optional()
}

/// How long the writer waits for more work before it checkpoints the WAL
/// after params were erased, and the longest it defers that checkpoint.
const CHECKPOINT_IDLE: std::time::Duration = std::time::Duration::from_millis(50);
const CHECKPOINT_MAX_DELAY: std::time::Duration = std::time::Duration::from_secs(1);
/// How long a failed scrub waits before it is tried again.
const SCRUB_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

/// The writer thread: drains every pending op into one transaction.
///
/// Batches that only claim, finish or read skip the fsync (synchronous
/// NORMAL; WAL mode keeps the file consistent either way). A process crash
/// loses none of them (the commit is in the OS already); a power loss may
/// lose the last ones: a lost claim leaves the job queued, which recovery
/// treats exactly like running, and a lost finish leaves it running, so
/// recovery runs it again under its idempotency key and the dispatcher
/// answers with the original run (never a second one). That fsync was half
/// of a warm job's latency. Submits, retries, approvals and cancels are
/// durable (FULL): a job accepted is never lost. After params are erased, the WAL is checkpointed with
/// TRUNCATE as soon as the writer is idle, and at least once a second.
fn writer(mut conn: Connection, path: PathBuf, rx: mpsc::Receiver<Op>) {
    let mut erased_since: Option<std::time::Instant> = None;
    let mut scrub = false;
    // After a failed scrub (a full disk), the next try waits a while.
    let mut scrub_not_before = std::time::Instant::now();
    let mut full = true;
    loop {
        let wait = if erased_since.is_some() {
            CHECKPOINT_IDLE
        } else {
            scrub_not_before
                .saturating_duration_since(std::time::Instant::now())
                .max(CHECKPOINT_IDLE)
        };
        let (first, idle) = if erased_since.is_some_and(|t| t.elapsed() >= CHECKPOINT_MAX_DELAY) {
            (None, false)
        } else if erased_since.is_some() || scrub {
            match rx.recv_timeout(wait) {
                Ok(op) => (Some(op), false),
                Err(mpsc::RecvTimeoutError::Timeout) => (None, true),
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        } else {
            match rx.recv() {
                Ok(op) => (Some(op), false),
                Err(_) => return,
            }
        };
        let Some(first) = first else {
            // Idle: VACUUM rewrites every page, so no erased value stays in
            // the unallocated part of a page (secure_delete does not reach
            // it); then the WAL is emptied.
            if idle && scrub && std::time::Instant::now() >= scrub_not_before {
                match conn.execute_batch("VACUUM") {
                    Ok(()) => scrub = false,
                    Err(e) => {
                        scrub_not_before = std::time::Instant::now() + SCRUB_RETRY;
                        tracing::warn!(cause = %e, retry_s = SCRUB_RETRY.as_secs(), "queue scrub (VACUUM) failed; tried again later");
                    }
                }
            }
            if let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)") {
                tracing::warn!(cause = %e, "queue checkpoint failed");
            }
            erased_since = None;
            continue;
        };
        let mut batch = vec![first];
        while batch.len() < 512 {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let durable = batch.iter().any(|op| {
            !matches!(
                op,
                Op::ClaimNext(..)
                    | Op::WakeWaiting(..)
                    | Op::Finish(..)
                    | Op::ExpireResults(..)
                    | Op::Owed(..)
                    | Op::Get(..)
                    | Op::List(..)
                    | Op::Counts(..)
                    | Op::Expired(..)
                    | Op::Unpinned(..)
                    | Op::Custom(Access::Read, _)
            )
        });
        if durable != full {
            let level = if durable { "FULL" } else { "NORMAL" };
            if let Err(e) = conn.pragma_update(None, "synchronous", level) {
                tracing::error!(cause = %e, "cannot set the queue's synchronous level");
            }
            full = durable;
        }
        if batch.iter().any(|op| {
            matches!(
                op,
                Op::Finish(..)
                    | Op::Prune(..)
                    | Op::ExpireResults(..)
                    | Op::Custom(Access::Erase, _)
            )
        }) {
            scrub = true;
            erased_since.get_or_insert_with(std::time::Instant::now);
        }
        // Writes commit first; the reads then run in their own
        // transaction, so they see every write of the batch (a read asked
        // after a write sees it) and keep their answer when the writes
        // could not commit (a full disk).
        let (reads, writes): (Vec<Op>, Vec<Op>) = batch.into_iter().partition(Op::is_read);
        for (ops, what) in [(writes, "write"), (reads, "read")] {
            if ops.is_empty() {
                continue;
            }
            let tx = match conn.transaction() {
                Ok(tx) => tx,
                Err(e) => {
                    tracing::error!(cause = %e, what, "queue transaction failed to start");
                    let msg = e.to_string();
                    for op in ops {
                        op.fail(QueueError::Commit(msg.clone()));
                    }
                    continue;
                }
            };
            let replies: Vec<Deferred> = ops.into_iter().map(|op| apply(&tx, op, &path)).collect();
            let committed = if what == "read" {
                // Nothing to keep: a read's answer never waits on the disk.
                drop(tx);
                Ok(())
            } else {
                tx.commit()
            };
            if let Err(e) = &committed {
                tracing::error!(cause = %e, "queue commit failed");
            }
            for reply in replies {
                reply(committed.as_ref().err());
            }
        }
    }
}

/// The reply of one op, sent once the batch's commit is known.
fn respond<T: Send + 'static>(
    reply: Reply<T>,
    result: rusqlite::Result<T>,
    path: &Path,
) -> Deferred {
    let path = path.to_path_buf();
    Box::new(move |commit_err| {
        let out = match (result, commit_err) {
            (Ok(v), None) => Ok(v),
            (Err(e), _) => Err(QueueError::Sqlite { path, source: e }),
            (Ok(_), Some(e)) => Err(QueueError::Commit(e.to_string())),
        };
        let _ = reply.send(out);
    })
}

/// Runs one op inside the batch's transaction; returns the reply to send
/// once the commit is known.
fn apply(tx: &rusqlite::Transaction<'_>, op: Op, path: &Path) -> Deferred {
    match op {
        Op::Submit(job, reply) => respond(reply, insert(tx, &job), path),
        Op::Get(id, reply) => respond(reply, get_job(tx, &id), path),
        Op::List(limit, offset, uid, filter, reply) => {
            respond(reply, list(tx, limit, offset, uid, &filter), path)
        }
        Op::ClaimNext(target, probe, reply) => respond(reply, claim(tx, &target, probe), path),
        Op::WakeWaiting(target, reply) => {
            let r = exec(
                tx,
                "UPDATE jobs SET not_before = NULL WHERE target = ?1 AND state IN ('queued', 'unsettled') AND not_before IS NOT NULL",
                [target],
            );
            respond(reply, r, path)
        }
        Op::Finish(id, state, stored, owed, reply) => {
            let (outcome, result) = *stored;
            let json = serde_json::to_string(&outcome).unwrap_or_else(|_| "{}".into());
            let (text, until) = result.unzip();
            let r = exec(tx,
                    "UPDATE jobs SET state = ?2, params = CASE WHEN ?6 THEN params END, preset_message = CASE WHEN ?6 THEN preset_message END, outcome = ?3, finished_at = coalesce(finished_at, ?4), params_digest = ?5, row_owed = ?6, result = ?7, result_until = ?8 WHERE job_id = ?1",
                    params![id.as_str(), state.as_str(), json, now(), outcome.params_digest, owed, text, until],
                )
                .map(|_| ());
            respond(reply, r, path)
        }
        Op::ExpireResults(at, reply) => {
            let r = exec(
                tx,
                "UPDATE jobs SET result = NULL, result_until = NULL WHERE result_until IS NOT NULL AND result_until <= ?1",
                [at],
            );
            respond(reply, r, path)
        }
        Op::Owed(target, limit, reply) => {
            let r = (|| {
                let mut st = tx.prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM jobs WHERE row_owed = 1 AND target = ?2 ORDER BY seq LIMIT ?1"
                ))?;
                let rows = st.query_map(params![limit, target], row_to_job)?.collect();
                rows
            })();
            respond(reply, r, path)
        }
        Op::Retry(id, state, reply) => {
            let r = exec(tx,
                    "UPDATE jobs SET state = ?2, not_before = ?3 + min(30, 1 << min(attempts, 5)), first_try_at = coalesce(first_try_at, ?3), attempts = attempts + 1 WHERE job_id = ?1",
                    params![id.as_str(), state.as_str(), now()],
                )
                .and_then(|_| {
                    one_row(tx,
                        "SELECT attempts FROM jobs WHERE job_id = ?1",
                        [id.as_str()],
                        |r| r.get::<_, u32>(0),
                    )
                });
            respond(reply, r, path)
        }
        Op::Prune(before, reply) => {
            let r = exec(
                tx,
                "DELETE FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?1",
                [before],
            );
            respond(reply, r, path)
        }
        Op::Approve(id, approval, needed, reply) => match get_job(tx, &id) {
            Ok(Some(j)) if j.approvals.iter().any(|a| a.by == approval.by) => {
                let msg = format!("{} has already approved job {id}", approval.by);
                Box::new(move |_| {
                    let _ = reply.send(Err(QueueError::State(msg)));
                })
            }
            Ok(Some(j)) if j.state == JobState::AwaitingApproval => {
                respond(reply, approve(tx, j, *approval, needed), path)
            }
            Ok(Some(j)) => {
                let msg = format!("job {id} is {}, not awaiting approval", j.state);
                Box::new(move |_| {
                    let _ = reply.send(Err(QueueError::State(msg)));
                })
            }
            Ok(None) => {
                let msg = format!("no job {id}");
                Box::new(move |_| {
                    let _ = reply.send(Err(QueueError::State(msg)));
                })
            }
            Err(e) => respond(reply, Err(e), path),
        },
        Op::Pin(pins, reply) => {
            let sql = format!(
                "UPDATE jobs SET plan_digest = ?2, plan_covers = ?3 WHERE job_id = ?1 AND (state = 'awaiting_approval' OR ({WAITING_UNPINNED}))"
            );
            let r = pins.iter().try_fold(0, |n, (id, digest, covers)| {
                Ok(n + exec(tx, &sql, params![id.as_str(), digest, covers])?)
            });
            respond(reply, r, path)
        }
        Op::Preset(id, refusal, reply) => {
            let r = exec(tx,
                "UPDATE jobs SET state = 'queued', preset_class = ?2, preset_message = ?3 WHERE job_id = ?1 AND state IN ('queued', 'awaiting_approval')",
                params![id.as_str(), refusal.class.as_str(), refusal.message],
            );
            respond(reply, r, path)
        }
        Op::Recover(reply) => {
            let r = exec(
                tx,
                // An apply that was running may have committed: it is
                // settled by its key before anything else may end it.
                "UPDATE jobs SET state = CASE WHEN mode = 'apply' THEN 'unsettled' ELSE 'queued' END WHERE state = 'running'",
                [],
            );
            respond(reply, r, path)
        }
        Op::Counts(reply) => respond(reply, counts(tx), path),
        Op::Expired(before, reply) => respond(reply, expired(tx, before), path),
        Op::Unpinned(target, before, limit, reply) => {
            respond(reply, unpinned(tx, &target, before, limit), path)
        }
        Op::Custom(_, run) => run(Ok(tx), path),
    }
}

pub(super) fn insert(tx: &Connection, job: &Job) -> rusqlite::Result<Job> {
    let params = serde_json::to_string(&job.params).unwrap_or_else(|_| "[]".into());
    let (class, message) = job
        .preset
        .as_ref()
        .map(|p| (p.class.as_str().to_string(), p.message.clone()))
        .unzip();
    exec(tx,
        "INSERT INTO jobs (job_id, command, mode, target, params, params_digest, idempotency_key, actor, actor_uid, state, preset_class, preset_message, submitted_at, plan_digest, plan_covers, rollout_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
        params![
            job.job_id.as_str(),
            job.command,
            job.mode.as_str(),
            job.target,
            params,
            job.params_digest,
            job.idempotency_key,
            job.actor,
            job.actor_uid,
            job.state.as_str(),
            class,
            message,
            job.submitted_at,
            job.plan_digest,
            job.plan_covers.as_ref().map(|c| c.to_string()),
            job.rollout_id.as_ref().map(JobId::as_str)
        ],
    )?;
    get_job(tx, &job.job_id)?.ok_or(rusqlite::Error::QueryReturnedNoRows)
}

fn list(
    tx: &Connection,
    limit: u32,
    offset: u64,
    uid: Option<u32>,
    f: &ListFilter,
) -> rusqlite::Result<Vec<Job>> {
    let mut st = tx.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM jobs WHERE (?2 IS NULL OR actor_uid = ?2 OR state = 'awaiting_approval') \
         AND (?4 IS NULL OR state = ?4) AND (?5 IS NULL OR mode = ?5) AND (?6 IS NULL OR command = ?6) \
         AND (?7 IS NULL OR actor = ?7) AND (?8 IS NULL OR target = ?8) AND (?9 IS NULL OR submitted_at >= ?9) \
         ORDER BY seq DESC LIMIT ?1 OFFSET ?3"
    ))?;
    let rows = st
        .query_map(
            params![
                limit,
                uid,
                offset as i64,
                f.state.map(|s| s.as_str()),
                f.mode.map(|m| m.as_str()),
                f.command,
                f.actor,
                f.target,
                f.since
            ],
            row_to_job,
        )?
        .collect();
    rows
}

fn claim(tx: &Connection, target: &str, probe: bool) -> rusqlite::Result<Option<Job>> {
    let job = one_row(tx,
            &format!("SELECT {COLUMNS} FROM jobs WHERE target = ?1 AND state IN ('queued', 'unsettled') AND (?3 OR coalesce(not_before, 0) <= ?2) ORDER BY seq LIMIT 1"),
            params![target, now(), probe],
            row_to_job,
        )
        .optional()?;
    let Some(mut j) = job else {
        return Ok(None);
    };
    let at = now();
    exec(
        tx,
        // A job waits for its target from its first try (max_target_wait_s),
        // not from the end of that try (a connect's backoff took seconds).
        "UPDATE jobs SET state = 'running', started_at = ?2, first_try_at = coalesce(first_try_at, ?2) WHERE job_id = ?1",
        params![j.job_id.as_str(), at],
    )?;
    j.first_try_at = Some(j.first_try_at.unwrap_or(at));
    j.in_doubt = j.state == JobState::Unsettled;
    j.state = JobState::Running;
    Ok(Some(j))
}

/// Adds an approval; with `needed` of them the job is queued, its
/// approvers named in `approved_by` and the last reason kept.
fn approve(tx: &Connection, mut job: Job, approval: Approval, needed: u8) -> rusqlite::Result<Job> {
    let reason = approval
        .reason
        .as_ref()
        .map(|r| format!("approved by {}: {r}", approval.by));
    job.approvals.push(approval);
    let list = serde_json::to_string(&job.approvals).unwrap_or_else(|_| "[]".into());
    if job.approvals.len() >= usize::from(needed.max(1)) {
        let names: Vec<&str> = job.approvals.iter().map(|a| a.by.as_str()).collect();
        exec(
            tx,
            "UPDATE jobs SET state = 'queued', approved_by = ?2, approved_at = ?3, approve_reason = ?4, approvals = ?5 WHERE job_id = ?1",
            params![job.job_id.as_str(), names.join(","), now(), reason, list],
        )?;
    } else {
        exec(
            tx,
            "UPDATE jobs SET approvals = ?2 WHERE job_id = ?1",
            params![job.job_id.as_str(), list],
        )?;
    }
    get_job(tx, &job.job_id)?.ok_or(rusqlite::Error::QueryReturnedNoRows)
}

/// Jobs per state, and when the oldest unsettled one was submitted: one
/// scan for health, metrics and the heartbeat.
#[derive(Debug, Default, Clone)]
pub struct QueueCounts {
    /// Jobs per state.
    pub by_state: BTreeMap<JobState, i64>,
    /// When the oldest unsettled job was submitted (unix seconds).
    pub oldest_unsettled: Option<i64>,
}

fn counts(tx: &Connection) -> rusqlite::Result<QueueCounts> {
    let mut st =
        tx.prepare_cached("SELECT state, count(*), min(submitted_at) FROM jobs GROUP BY state")?;
    let mut out = QueueCounts::default();
    let mut rows = st.query([])?;
    while let Some(r) = rows.next()? {
        let state = r.get::<_, String>(0)?;
        let state = JobState::parse(&state).ok_or_else(|| bad_word(0, "state"))?;
        if state == JobState::Unsettled {
            out.oldest_unsettled = r.get(2)?;
        }
        out.by_state.insert(state, r.get(1)?);
    }
    Ok(out)
}

fn expired(tx: &Connection, before: i64) -> rusqlite::Result<Vec<JobId>> {
    let mut st = tx.prepare_cached(
        "SELECT job_id FROM jobs WHERE state = 'awaiting_approval' AND submitted_at < ?1",
    )?;
    let rows = st
        .query_map([before], |r| {
            let id = r.get::<_, String>(0)?;
            JobId::parse(&id).ok_or_else(|| bad_word(0, "job id"))
        })?
        .collect();
    rows
}

/// A queued apply with no plan pinned yet (no approval, no `--plan`, no
/// refusal preset): what the pin loop pins.
const WAITING_UNPINNED: &str =
    "state = 'queued' AND mode = 'apply' AND plan_digest IS NULL AND preset_class IS NULL";

fn unpinned(
    tx: &Connection,
    target: &str,
    before: i64,
    limit: usize,
) -> rusqlite::Result<Vec<Job>> {
    let mut st = tx.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM jobs WHERE target = ?1 AND {WAITING_UNPINNED} AND submitted_at <= ?2 ORDER BY seq LIMIT ?3"
    ))?;
    let rows = st
        .query_map(params![target, before, limit as i64], row_to_job)?
        .collect();
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str) -> Job {
        let mut j = Job::new(
            "dot_iu_add_piece".into(),
            Mode::Apply,
            "main".into(),
            crate::job::Params(vec![("body".into(), "CANARY-q1".into())]),
            None,
            "alice".into(),
            1000,
        );
        j.job_id = JobId::parse(id).unwrap();
        j
    }

    fn id(s: &str) -> JobId {
        JobId::parse(s).unwrap()
    }

    #[tokio::test]
    async fn jobs_run_in_order_and_params_are_erased_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        let q = Queue::open(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        for id in ["a", "b", "c"] {
            q.submit(job(id)).await.unwrap();
        }
        let first = q.claim_next("main", false).await.unwrap().unwrap();
        assert_eq!(first.job_id, id("a"));
        assert_eq!(first.param_pairs()[0].1, "CANARY-q1");
        assert_eq!(
            q.claim_next("main", false).await.unwrap().unwrap().job_id,
            id("b")
        );
        assert!(q.claim_next("other", false).await.unwrap().is_none());
        // A crash: running jobs go back to the queue, in order.
        assert_eq!(q.recover().await.unwrap(), 2);
        let again = q.claim_next("main", false).await.unwrap().unwrap();
        assert_eq!(again.job_id, id("a"));
        let outcome: Outcome = serde_json::from_value(serde_json::json!({
            "job_id": "a", "command": "dot_iu_add_piece", "mode": "apply", "status": "applied",
            "run_id": 1, "params_digest": "d", "closed_gates": [], "error_class": null,
            "evidence": {}, "result": [["CANARY-result"]], "message": "m"
        }))
        .unwrap();
        q.finish(&outcome, false, 0).await.unwrap();
        let done = q.get(&id("a")).await.unwrap().unwrap();
        assert!(done.params.is_none());
        assert_eq!(done.state, JobState::Applied);
        assert!(done.outcome.as_ref().unwrap().result.is_none());
        drop(q);
        std::thread::sleep(std::time::Duration::from_millis(100));
        // Only the still-queued jobs hold the canary value; "a" does not.
        let conn = Connection::open(&path).unwrap();
        let n: i64 = conn
            .query_row(
                "SELECT count(*) FROM jobs WHERE params LIKE '%CANARY-q1%'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 2);
        let raw = std::fs::read(&path).unwrap();
        assert!(!String::from_utf8_lossy(&raw).contains("CANARY-result"));
    }

    #[tokio::test]
    async fn a_probe_takes_the_oldest_waiting_job_and_a_wake_ends_every_backoff() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(&dir.path().join("queue.db")).unwrap();
        for id in ["a", "b", "c"] {
            q.submit(job(id)).await.unwrap();
        }
        for id in ["a", "b"] {
            q.claim_next("main", false).await.unwrap().unwrap();
            q.retry(&super::tests::id(id), JobState::Queued)
                .await
                .unwrap();
        }
        // a and b sleep out their backoff (1 s after a first try: a
        // loaded machine can take longer than that to get here, so it is
        // made a minute); c has not been tried.
        rusqlite::Connection::open(dir.path().join("queue.db"))
            .unwrap()
            .execute(
                "UPDATE jobs SET not_before = not_before + 60 WHERE attempts > 0",
                [],
            )
            .unwrap();
        assert_eq!(
            q.claim_next("main", false).await.unwrap().unwrap().job_id,
            id("c")
        );
        assert!(q.claim_next("main", false).await.unwrap().is_none());
        // A probe takes the oldest even while it backs off.
        assert_eq!(
            q.claim_next("main", true).await.unwrap().unwrap().job_id,
            id("a")
        );
        q.retry(&id("a"), JobState::Unsettled).await.unwrap();
        assert_eq!(q.wake_waiting("other").await.unwrap(), 0);
        assert_eq!(q.wake_waiting("main").await.unwrap(), 2);
        assert_eq!(
            q.claim_next("main", false).await.unwrap().unwrap().job_id,
            id("a")
        );
        assert_eq!(
            q.claim_next("main", false).await.unwrap().unwrap().job_id,
            id("b")
        );
        assert_eq!(q.counts().await.unwrap().oldest_unsettled, None);
    }

    #[tokio::test]
    async fn owed_rows_are_read_per_target() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(&dir.path().join("queue.db")).unwrap();
        for (name, target) in [("a", "bad"), ("b", "bad"), ("c", "main")] {
            let mut j = job(name);
            j.target = target.into();
            q.submit(j).await.unwrap();
            q.claim_next(target, false).await.unwrap().unwrap();
            let outcome: Outcome = serde_json::from_value(serde_json::json!({
                "job_id": name, "command": "dot_iu_add_piece", "mode": "apply", "status": "failed",
                "run_id": null, "params_digest": "d", "closed_gates": [], "error_class": "target_unreachable",
                "evidence": {}, "result": null, "message": "m"
            }))
            .unwrap();
            q.finish(&outcome, true, 0).await.unwrap();
        }
        let ids = |jobs: Vec<Job>| jobs.into_iter().map(|j| j.job_id).collect::<Vec<_>>();
        assert_eq!(
            ids(q.owed("bad", 20).await.unwrap()),
            vec![id("a"), id("b")]
        );
        // A target that does not answer holds back only its own rows.
        assert_eq!(ids(q.owed("main", 20).await.unwrap()), vec![id("c")]);
    }

    #[tokio::test]
    async fn approval_moves_a_waiting_job_to_the_queue_once() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(&dir.path().join("queue.db")).unwrap();
        let mut j = job("w");
        j.state = JobState::AwaitingApproval;
        q.submit(j).await.unwrap();
        assert!(q.claim_next("main", false).await.unwrap().is_none());
        let by = |who: &str| Approval {
            by: who.into(),
            at: "2026-12-03 00:00:00Z".into(),
            reason: None,
        };
        let approved = q.approve(&id("w"), by("bob"), 1).await.unwrap();
        assert_eq!(approved.approved_by.as_deref(), Some("bob"));
        assert!(q.approve(&id("w"), by("carol"), 1).await.is_err());
        assert_eq!(
            q.claim_next("main", false).await.unwrap().unwrap().job_id,
            id("w")
        );
    }

    #[tokio::test]
    async fn a_job_needing_two_approvals_waits_for_two_distinct_approvers() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(&dir.path().join("queue.db")).unwrap();
        let mut j = job("w");
        j.state = JobState::AwaitingApproval;
        q.submit(j).await.unwrap();
        let by = |who: &str, why: Option<&str>| Approval {
            by: who.into(),
            at: "2026-12-03 00:00:00Z".into(),
            reason: why.map(Into::into),
        };
        let one = q.approve(&id("w"), by("bob", Some("ok")), 2).await.unwrap();
        assert_eq!(one.state, JobState::AwaitingApproval);
        assert_eq!(one.approved_by, None);
        assert!(q.claim_next("main", false).await.unwrap().is_none());
        // The same approver twice is not two approvals.
        assert!(q.approve(&id("w"), by("bob", None), 2).await.is_err());
        let two = q.approve(&id("w"), by("carol", None), 2).await.unwrap();
        assert_eq!(two.state, JobState::Queued);
        assert_eq!(two.approved_by.as_deref(), Some("bob,carol"));
        assert_eq!(two.approvals.len(), 2);
        assert_eq!(two.approvals[0].reason.as_deref(), Some("ok"));
    }

    #[tokio::test]
    async fn erased_values_leave_every_file_once_idle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        let q = Queue::open(&path).unwrap();
        // Submits, claims and finishes interleaved, values of varied
        // length, as a busy daemon does them.
        let n = 3000;
        let mut finished = 0;
        for i in 0..n {
            let mut j = job(&format!("j{i}"));
            let pad = "x".repeat((i * 37) % 180);
            j.params = Some(crate::job::Params(vec![(
                "title".into(),
                format!("ZCANARY{i:05}{pad}"),
            )]));
            q.submit(j).await.unwrap();
            if i % 3 == 2 {
                for _ in 0..2 {
                    let claimed = q.claim_next("main", false).await.unwrap().unwrap();
                    let outcome: Outcome = serde_json::from_value(serde_json::json!({
                        "job_id": claimed.job_id, "command": "dot_iu_add_piece", "mode": "apply",
                        "status": "applied", "run_id": finished, "params_digest": "d", "closed_gates": [],
                        "error_class": null, "evidence": {}, "result": null, "message": "m"
                    }))
                    .unwrap();
                    q.finish(&outcome, false, 0).await.unwrap();
                    finished += 1;
                }
            }
        }
        while let Some(claimed) = q.claim_next("main", false).await.unwrap() {
            let outcome: Outcome = serde_json::from_value(serde_json::json!({
                "job_id": claimed.job_id, "command": "dot_iu_add_piece", "mode": "apply",
                "status": "applied", "run_id": 1, "params_digest": "d", "closed_gates": [],
                "error_class": null, "evidence": {}, "result": null, "message": "m"
            }))
            .unwrap();
            q.finish(&outcome, false, 0).await.unwrap();
        }
        let leaks = || -> usize {
            std::fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .map(|e| {
                    let bytes = std::fs::read(e.path()).unwrap_or_default();
                    bytes.windows(7).filter(|w| w == b"ZCANARY").count()
                })
                .sum()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while leaks() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "{} values left in the queue files",
                leaks()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    #[tokio::test]
    async fn terminal_jobs_past_retention_are_pruned_and_the_file_shrinks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        let q = Queue::open(&path).unwrap();
        for i in 0..2000 {
            let mut j = job(&format!("p{i}"));
            j.params = Some(crate::job::Params(vec![("title".into(), "x".repeat(200))]));
            q.submit(j).await.unwrap();
            let claimed = q.claim_next("main", false).await.unwrap().unwrap();
            let outcome: Outcome = serde_json::from_value(serde_json::json!({
                "job_id": claimed.job_id, "command": "dot_iu_add_piece", "mode": "apply",
                "status": "applied", "run_id": i, "params_digest": "d", "closed_gates": [],
                "error_class": null, "evidence": {"k": "v".repeat(300)}, "result": null, "message": "m"
            }))
            .unwrap();
            q.finish(&outcome, false, 0).await.unwrap();
        }
        // Every job ended 40 days ago but one, which is still queued.
        q.submit(job("keep")).await.unwrap();
        let conn = Connection::open(&path).unwrap();
        conn.execute(
            "UPDATE jobs SET finished_at = ?1 WHERE finished_at IS NOT NULL",
            [now() - 40 * 86_400],
        )
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let before = std::fs::metadata(&path).unwrap().len();
        assert_eq!(q.prune(now() - 30 * 86_400).await.unwrap(), 2000);
        assert_eq!(
            q.list(10, 0, None, Default::default()).await.unwrap().len(),
            1
        );
        // Once idle the file is rewritten without the pruned pages.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let after = std::fs::metadata(&path).unwrap().len();
            if after * 4 < before {
                eprintln!(
                    "queue file: {before} bytes with 2000 terminal jobs, {after} after pruning"
                );
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{before} -> {after}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

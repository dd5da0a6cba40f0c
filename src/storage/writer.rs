//! The event writer: one thread, one connection, group commit.
//!
//! Every append goes through one channel to the thread `duet-db-writer`. It
//! takes what is queued (up to `batch_max` events; after waiting at most
//! `batch_linger` for more, by default not at all) and commits it in one
//! transaction, so that one fsync acks many sessions. No artificial delay
//! is needed: while one commit runs, the next group forms in the channel.
//!
//! Why one thread and not the pool: SQLite has one writer at a time anyway,
//! and on PostgreSQL one transaction per group beats one per message. The
//! order of a session's batches is the channel's order, which is the order
//! of the `append` calls (the send happens in the call, not in the future).
//!
//! Failures: a group that fails for a connection reason fails every batch
//! in it with `Unavailable`, and the connection is dropped and reopened
//! with backoff (while backing off, appends fail at once). A group that
//! fails otherwise (a duplicate client key, a seq that does not follow) is
//! retried batch by batch, so one bad batch does not fail its neighbours; a
//! session's later batches in the group fail with its first failure, so no
//! gap is ever committed. The thread never panics on a database error, and a
//! panic elsewhere fails the group (`Internal`) instead of ending the thread.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use duet_actors::error::StoreError;
use duet_actors::ports::AppendBatch;
use tokio::sync::oneshot;

use super::append::{commit_group, commit_plain_group_pg, validate, SeqCache};
use super::checkpoint::{self, WalCheckpoints};
use super::conn::ConnManager;
use super::{DbConn, StorageError};

/// Batches that may wait for the writer before appends are refused as
/// `Unavailable` (a database far slower than the load, not a burst).
const MAX_QUEUED_BATCHES: usize = 100_000;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

const UNAVAILABLE: StoreError = StoreError::Unavailable { what: "database" };

pub(super) type Ack = oneshot::Receiver<Result<(), StoreError>>;

struct Job {
    batch: AppendBatch,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// How the writer forms groups.
#[derive(Clone, Copy, Debug)]
pub(super) struct GroupLimits {
    pub batch_max: usize,
    pub batch_linger: Duration,
}

/// What the writer has done, for metrics and tests.
#[derive(Debug, Default)]
pub(super) struct WriterCounters {
    /// Batches waiting in the channel.
    pub queued: AtomicUsize,
    /// Transactions committed (one per group, or per batch in a fallback).
    pub commits: AtomicU64,
    /// Batches committed.
    pub batches: AtomicU64,
    /// Microseconds the thread spent on groups (statements and commit, no
    /// queueing): against the callers' append time, this splits a commit
    /// from the hand-offs between threads.
    pub busy_micros: AtomicU64,
}

/// The sending side; the thread ends when every handle is dropped, after
/// committing what was queued.
pub(super) struct WriterHandle {
    txs: Vec<Sender<Job>>,
    counters: Arc<WriterCounters>,
}

impl WriterHandle {
    /// Starts `writers` threads, each with its own queue and connection. A
    /// session always goes to the same writer (by a hash of its id), so its
    /// batches keep their order; different sessions commit in parallel
    /// (PostgreSQL flushes concurrent commits with one WAL write), so a
    /// message waits for about one commit, not for the one in progress plus
    /// its own.
    pub(super) fn spawn(
        manager: ConnManager,
        limits: GroupLimits,
        writers: usize,
        wal: Option<Arc<WalCheckpoints>>,
    ) -> std::io::Result<WriterHandle> {
        let counters = Arc::new(WriterCounters::default());
        let mut txs = Vec::new();
        for i in 0..writers.max(1) {
            let (tx, rx) = mpsc::channel();
            txs.push(tx);
            let writer = Writer {
                manager: manager.clone(),
                limits: GroupLimits {
                    batch_max: limits.batch_max.max(1),
                    ..limits
                },
                counters: counters.clone(),
                conn: None,
                backoff: FIRST_BACKOFF,
                retry_at: None,
                carry: None,
                seqs: SeqCache::default(),
                wal: wal.clone(),
            };
            std::thread::Builder::new()
                .name(format!("duet-db-writer-{i}"))
                .spawn(move || writer.run(rx))?;
        }
        Ok(WriterHandle { txs, counters })
    }

    /// Queues a batch now; the receiver resolves when it is committed (or
    /// failed). Dropping the receiver does not cancel the write.
    pub(super) fn submit(&self, batch: AppendBatch) -> Result<Ack, StoreError> {
        let queued = &self.counters.queued;
        if queued.load(Ordering::Relaxed) >= MAX_QUEUED_BATCHES {
            tracing::warn!("event writer queue full");
            return Err(UNAVAILABLE);
        }
        let (done, ack) = oneshot::channel();
        queued.fetch_add(1, Ordering::Relaxed);
        let tx = &self.txs[writer_of(&batch.session_id, self.txs.len())];
        if tx.send(Job { batch, done }).is_err() {
            queued.fetch_sub(1, Ordering::Relaxed);
            tracing::error!("event writer thread is gone");
            return Err(StoreError::Internal);
        }
        Ok(ack)
    }

    pub(super) fn counters(&self) -> &WriterCounters {
        &self.counters
    }
}

/// The writer a session's batches go to (FNV-1a of its id).
fn writer_of(session_id: &str, writers: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in session_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % writers.max(1) as u64) as usize
}

struct Writer {
    manager: ConnManager,
    limits: GroupLimits,
    counters: Arc<WriterCounters>,
    conn: Option<DbConn>,
    backoff: Duration,
    /// While set and in the future, do not try to connect: fail at once.
    retry_at: Option<Instant>,
    /// A job taken from the channel that did not fit the previous group.
    carry: Option<Job>,
    /// Where each session's log stands, as far as this writer knows.
    seqs: SeqCache,
    /// SQLite: the checkpoint steps this writer finishes between groups.
    wal: Option<Arc<WalCheckpoints>>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Job>) {
        loop {
            let first = match self.carry.take() {
                Some(job) => job,
                None => match rx.recv() {
                    Ok(job) => job,
                    Err(_) => break,
                },
            };
            let jobs = self.gather(first, &rx);
            self.counters
                .queued
                .fetch_sub(jobs.len(), Ordering::Relaxed);
            let batches: Vec<&AppendBatch> = jobs.iter().map(|j| &j.batch).collect();
            let started = Instant::now();
            let outcome = catch_unwind(AssertUnwindSafe(|| self.process(&batches)));
            let busy = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.counters.busy_micros.fetch_add(busy, Ordering::Relaxed);
            let results = match outcome {
                Ok(results) => results,
                Err(_) => {
                    tracing::error!(
                        batches = batches.len(),
                        "event writer panicked; group failed"
                    );
                    self.conn = None;
                    vec![Err(StoreError::Internal); batches.len()]
                }
            };
            drop(batches);
            for (job, result) in jobs.into_iter().zip(results) {
                // The caller may have stopped waiting; the outcome stands.
                let _ = job.done.send(result);
            }
            // After the acks, before the next group: nothing is appended
            // while it runs, so the WAL can restart.
            if let Some(wal) = &self.wal {
                checkpoint::finish(wal, self.conn.as_mut());
            }
        }
        tracing::debug!("event writer stopped");
    }

    /// The first job plus whatever else is queued, up to `batch_max` events
    /// (a batch without events counts as one), waiting at most `batch_linger`.
    fn gather(&mut self, first: Job, rx: &Receiver<Job>) -> Vec<Job> {
        let weight = |j: &Job| j.batch.events.len().max(1);
        let deadline = Instant::now() + self.limits.batch_linger;
        let mut total = weight(&first);
        let mut jobs = vec![first];
        while total < self.limits.batch_max {
            let next = match rx.try_recv() {
                Ok(job) => job,
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => match deadline.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => match rx.recv_timeout(left) {
                        Ok(job) => job,
                        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                    },
                    _ => break,
                },
            };
            if total + weight(&next) > self.limits.batch_max {
                self.carry = Some(next);
                break;
            }
            total += weight(&next);
            jobs.push(next);
        }
        jobs
    }

    /// One result per batch, in order.
    fn process(&mut self, batches: &[&AppendBatch]) -> Vec<Result<(), StoreError>> {
        // Taken out so that the connection (also in `self`) can be borrowed.
        let mut seqs = std::mem::take(&mut self.seqs);
        let results = self.process_with(batches, &mut seqs);
        self.seqs = seqs;
        results
    }

    fn process_with(&mut self, batches: &[&AppendBatch], seqs: &mut SeqCache) -> Vec<Result<(), StoreError>> {
        let mut results: Vec<Result<(), StoreError>> = batches
            .iter()
            .map(|b| {
                validate(b).map_err(|why| {
                    tracing::error!(session_id = %b.session_id, why, "invalid append batch");
                    StoreError::Internal
                })
            })
            .collect();
        let valid: Vec<usize> = (0..batches.len()).filter(|&i| results[i].is_ok()).collect();
        if valid.is_empty() {
            return results;
        }
        let group: Vec<&AppendBatch> = valid.iter().map(|&i| batches[i]).collect();
        let Some(conn) = self.connection() else {
            for &i in &valid {
                results[i] = Err(UNAVAILABLE);
            }
            return results;
        };
        // Plain PostgreSQL groups answer per batch; the general path stores
        // all or nothing.
        let outcome = match commit_plain_group_pg(conn, &group, seqs) {
            Some(plain) => plain,
            None => commit_group(conn, &group, seqs).map(|()| vec![true; group.len()]),
        }
        .map_err(StorageError::from);
        match outcome {
            Ok(stored) => {
                self.committed(stored.iter().filter(|s| **s).count());
                for (k, ok) in stored.into_iter().enumerate() {
                    if !ok {
                        tracing::warn!(session_id = %group[k].session_id, "append refused: seq does not continue the stored log");
                        results[valid[k]] = Err(StoreError::Conflict("seq does not continue the stored log".to_owned()));
                    }
                }
            }
            Err(e) if group.len() == 1 || matches!(e, StorageError::Unavailable(_)) => {
                self.after_failure(&e);
                let e = StoreError::from(e);
                for &i in &valid {
                    results[i] = Err(e.clone());
                }
            }
            // One batch refused the group (a unique key): find it.
            Err(_) => {
                for (k, r) in self.one_by_one(&group, seqs).into_iter().enumerate() {
                    results[valid[k]] = r;
                }
            }
        }
        results
    }

    /// The fallback after a group failed for one of its batches: each batch
    /// in its own transaction. A session whose batch failed gets the same
    /// error for its later batches (committing them would leave a gap).
    fn one_by_one(&mut self, group: &[&AppendBatch], seqs: &mut SeqCache) -> Vec<Result<(), StoreError>> {
        let mut failed: HashMap<&str, StoreError> = HashMap::new();
        let mut results = Vec::with_capacity(group.len());
        for batch in group {
            let id = batch.session_id.as_ref();
            if let Some(e) = failed.get(id) {
                results.push(Err(e.clone()));
                continue;
            }
            let outcome = match self.connection() {
                Some(conn) => {
                    commit_group(conn, std::slice::from_ref(batch), seqs).map_err(StorageError::from)
                }
                None => Err(StorageError::Unavailable("no connection".to_owned())),
            };
            if let Err(e) = outcome {
                self.after_failure(&e);
                let e = StoreError::from(e);
                failed.insert(id, e.clone());
                results.push(Err(e));
            } else {
                self.committed(1);
                results.push(Ok(()));
            }
        }
        results
    }

    /// The writer's connection, opened if needed; `None` while the database
    /// cannot be reached (each attempt is bounded by the connect timeout).
    fn connection(&mut self) -> Option<&mut DbConn> {
        if self.conn.is_none() {
            if self.retry_at.is_some_and(|at| Instant::now() < at) {
                return None;
            }
            match self.manager.open() {
                Ok(conn) => {
                    if self.retry_at.take().is_some() {
                        tracing::info!("event writer reconnected to the database");
                    }
                    self.backoff = FIRST_BACKOFF;
                    self.conn = Some(conn);
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = self.backoff.as_millis() as u64, "event writer cannot connect");
                    self.retry_at = Some(Instant::now() + self.backoff);
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                    return None;
                }
            }
        }
        self.conn.as_mut()
    }

    fn committed(&self, batches: usize) {
        self.counters.commits.fetch_add(1, Ordering::Relaxed);
        self.counters
            .batches
            .fetch_add(batches as u64, Ordering::Relaxed);
    }

    /// Drops the connection when the failure may have broken it.
    fn after_failure(&mut self, e: &StorageError) {
        let broken = match self.conn.as_mut() {
            Some(conn) => {
                matches!(e, StorageError::Unavailable(_))
                    || diesel::r2d2::R2D2Connection::is_broken(conn)
            }
            None => false,
        };
        if broken {
            self.conn = None;
        }
    }
}

//! The event writers: group commit, one main writer and helpers.
//!
//! Every append goes into one queue. The main writer thread takes what is
//! queued (up to `batch_max` events; after waiting at most `batch_linger`
//! for more, by default not at all) and commits it in one transaction, so
//! that one fsync acks many sessions. No artificial delay is needed: while
//! one commit runs, the next group forms in the queue.
//!
//! Helpers (PostgreSQL: `DUET_DB_WRITERS` − 1 more threads, each with its
//! own connection) take a group only while the main writer's commit has
//! run for [`GroupLimits::help_after`]: on a disk whose commits are quick,
//! one writer makes the biggest groups (the fewest commits, the least
//! database CPU: measured 35–40 % more messages per CPU-second than three
//! writers always sharing the work); where a commit is slow, the helpers
//! commit beside it and PostgreSQL flushes their commits with one WAL write,
//! so a message does not wait for the commit in progress plus its own.
//!
//! Order: a session's batches are taken in queue order, which is the order
//! of the `append` calls (the push happens in the call, not in the future),
//! and never while another writer has a batch of that session in flight, so
//! a session's batches commit one after the other whichever thread takes
//! them. The last seq of each session travels with it ([`SeqCache`] entries
//! move into the taking writer and back).
//!
//! Failures: a group that fails for a connection reason fails every batch
//! in it with `Unavailable`, and the connection is dropped and reopened
//! with backoff (while backing off, appends fail at once). A group that
//! fails otherwise (a duplicate client key, a seq that does not follow) is
//! retried batch by batch, so one bad batch does not fail its neighbours; a
//! session's later batches in the group fail with its first failure, so no
//! gap is ever committed. The threads never panic on a database error, and a
//! panic elsewhere fails the group (`Internal`) instead of ending the thread.

use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use duet_actors::error::StoreError;
use duet_actors::ports::AppendBatch;
use tokio::sync::oneshot;

use super::append::{commit_group, commit_plain_group_pg, validate, warm_up, SeqCache};
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

/// How the writers form groups.
#[derive(Clone, Copy, Debug)]
pub(super) struct GroupLimits {
    pub batch_max: usize,
    pub batch_linger: Duration,
    /// How long the main writer's commit runs before helpers take groups.
    pub help_after: Duration,
}

/// What the writers have done, for metrics and tests.
#[derive(Debug, Default)]
pub(super) struct WriterCounters {
    /// Batches waiting in the queue.
    pub queued: AtomicUsize,
    /// Transactions committed (one per group, or per batch in a fallback).
    pub commits: AtomicU64,
    /// Of those, the helpers' transactions.
    pub helper_commits: AtomicU64,
    /// Batches committed.
    pub batches: AtomicU64,
    /// Microseconds the threads spent on groups (statements and commit, no
    /// queueing): against the callers' append time, this splits a commit
    /// from the hand-offs between threads.
    pub busy_micros: AtomicU64,
}

/// The queue and who works on what, behind one lock.
#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// Sessions with a batch in a group being committed.
    in_flight: HashSet<Arc<str>>,
    /// Where each session's log stands, while no writer holds it.
    seqs: SeqCache,
    /// Since when the main writer's current group runs; `None` while it
    /// waits for work.
    main_busy_since: Option<Instant>,
    /// Who waits on the condvars (a notify with no waiter is a syscall
    /// saved on every append).
    main_waiting: bool,
    helpers_waiting: usize,
    /// The handle is gone: commit what is queued, then stop.
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    /// The main writer waits here for work.
    main: Condvar,
    /// Helpers wait here until the main writer is slow.
    helpers: Condvar,
    limits: GroupLimits,
    counters: Arc<WriterCounters>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding the lock cannot leave the queue half
        // changed (each change is one call), so a poisoned lock is used on.
        self.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether a helper should take a group now.
    fn help_wanted(&self, q: &Queue) -> bool {
        !q.jobs.is_empty() && q.main_busy_since.is_some_and(|t| t.elapsed() >= self.limits.help_after)
    }
}

/// The sending side; the threads end when it is dropped, after committing
/// what was queued.
pub(super) struct WriterHandle {
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// How long dropping the handle waits for the writers to commit what is
/// queued and close their connections.
const STOP_WAIT: Duration = Duration::from_secs(2);

impl WriterHandle {
    /// Starts the main writer and `writers - 1` helpers, each with its own
    /// connection.
    pub(super) fn spawn(
        manager: ConnManager,
        limits: GroupLimits,
        writers: usize,
        wal: Option<Arc<WalCheckpoints>>,
    ) -> std::io::Result<WriterHandle> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            main: Condvar::new(),
            helpers: Condvar::new(),
            limits: GroupLimits { batch_max: limits.batch_max.max(1), ..limits },
            counters: Arc::new(WriterCounters::default()),
        });
        let mut threads = Vec::with_capacity(writers.max(1));
        for i in 0..writers.max(1) {
            let writer = Writer {
                manager: manager.clone(),
                shared: shared.clone(),
                main: i == 0,
                conn: None,
                backoff: FIRST_BACKOFF,
                retry_at: None,
                wal: if i == 0 { wal.clone() } else { None },
            };
            let name = if i == 0 { "duet-db-writer".to_owned() } else { format!("duet-db-helper-{i}") };
            threads.push(std::thread::Builder::new().name(name).spawn(move || writer.run())?);
        }
        Ok(WriterHandle { shared, threads })
    }

    /// Queues a batch now; the receiver resolves when it is committed (or
    /// failed). Dropping the receiver does not cancel the write.
    pub(super) fn submit(&self, batch: AppendBatch) -> Result<Ack, StoreError> {
        let queued = &self.shared.counters.queued;
        if queued.load(Ordering::Relaxed) >= MAX_QUEUED_BATCHES {
            tracing::warn!("event writer queue full");
            return Err(UNAVAILABLE);
        }
        let (done, ack) = oneshot::channel();
        queued.fetch_add(1, Ordering::Relaxed);
        let mut q = self.shared.lock();
        q.jobs.push_back(Job { batch, done });
        let wake_main = q.main_waiting;
        let wake_helper = q.helpers_waiting > 0 && self.shared.help_wanted(&q);
        drop(q);
        if wake_main {
            self.shared.main.notify_one();
        }
        if wake_helper {
            self.shared.helpers.notify_one();
        }
        Ok(ack)
    }

    pub(super) fn counters(&self) -> &WriterCounters {
        &self.shared.counters
    }
}

impl Drop for WriterHandle {
    /// The writers commit what is queued, then stop. Waiting for them (at
    /// most [`STOP_WAIT`]) lets their connections close with a goodbye: a
    /// process that exits right after (the CLI, a stopped server) would
    /// otherwise reset them mid-session, which PostgreSQL logs as an error.
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.main.notify_all();
        self.shared.helpers.notify_all();
        let until = Instant::now() + STOP_WAIT;
        while self.threads.iter().any(|t| !t.is_finished()) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// A group being formed or committed: its jobs, the sessions it holds
/// (no other writer takes their batches meanwhile) and their seq entries.
#[derive(Default)]
struct Group {
    jobs: Vec<Job>,
    held: HashSet<Arc<str>>,
    seqs: SeqCache,
}

/// Takes from the queue, in order, the jobs of sessions no other writer
/// holds, up to `room` events (a batch without events counts as one), and
/// marks their sessions as held by `group`. Answers how many events it
/// took. The queue keeps its buffer: skipped jobs are rotated to the back,
/// in their order.
fn take(q: &mut Queue, room: usize, group: &mut Group) -> usize {
    let weight = |j: &Job| j.batch.events.len().max(1);
    let mut taken = 0;
    let mut full = false;
    for _ in 0..q.jobs.len() {
        let Some(job) = q.jobs.pop_front() else { break };
        let id = &job.batch.session_id;
        let held_elsewhere = q.in_flight.contains(id) && !group.held.contains(id);
        // A group holds at least one job, whatever its size.
        full = full || !(taken + weight(&job) <= room || (taken == 0 && group.jobs.is_empty()));
        // Once full, nothing after may overtake what stays behind.
        if held_elsewhere || full {
            q.jobs.push_back(job);
            continue;
        }
        if group.held.insert(id.clone()) {
            q.in_flight.insert(id.clone());
            group.seqs.adopt(id, &mut q.seqs);
        }
        taken += weight(&job);
        group.jobs.push(job);
    }
    taken
}

struct Writer {
    manager: ConnManager,
    shared: Arc<Shared>,
    /// The main writer takes any work; a helper only while it is wanted.
    main: bool,
    conn: Option<DbConn>,
    backoff: Duration,
    /// While set and in the future, do not try to connect: fail at once.
    retry_at: Option<Instant>,
    /// SQLite: the checkpoint steps the main writer finishes between groups.
    wal: Option<Arc<WalCheckpoints>>,
}

impl Writer {
    fn run(mut self) {
        let shared = self.shared.clone();
        // Connected and warm before the first group, not while it waits.
        let _ = self.connection();
        while let Some(Group { jobs, held, mut seqs }) = self.next_group() {
            shared.counters.queued.fetch_sub(jobs.len(), Ordering::Relaxed);
            let batches: Vec<&AppendBatch> = jobs.iter().map(|j| &j.batch).collect();
            let started = Instant::now();
            let outcome = catch_unwind(AssertUnwindSafe(|| self.process(&batches, &mut seqs)));
            let busy = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            shared.counters.busy_micros.fetch_add(busy, Ordering::Relaxed);
            let results = match outcome {
                Ok(results) => results,
                Err(_) => {
                    tracing::error!(batches = batches.len(), "event writer panicked; group failed");
                    self.conn = None;
                    // What was stored is unknown: storage is asked again.
                    seqs.forget(&batches);
                    vec![Err(StoreError::Internal); batches.len()]
                }
            };
            drop(batches);
            // Release the sessions before the acks: a session's next batch,
            // sent as soon as its ack arrives, is then free to be taken.
            self.release(held, seqs);
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
        tracing::debug!(main = self.main, "event writer stopped");
    }

    /// Waits for a group to commit. `None` once the handle is gone and the
    /// queue is empty.
    fn next_group(&mut self) -> Option<Group> {
        let shared = &*self.shared;
        let limits = shared.limits;
        let mut q = shared.lock();
        let mut group = Group::default();
        let mut total = loop {
            if self.main || shared.help_wanted(&q) {
                let taken = take(&mut q, limits.batch_max, &mut group);
                if !group.jobs.is_empty() {
                    break taken;
                }
            }
            if q.closed && q.jobs.is_empty() {
                return None;
            }
            q = self.wait(q, None);
        };
        // Lingering: wait a little for more, then commit what there is.
        let deadline = Instant::now() + limits.batch_linger;
        while total < limits.batch_max {
            let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else { break };
            q = self.wait(q, Some(left));
            total += take(&mut q, limits.batch_max - total, &mut group);
            if q.closed {
                break;
            }
        }
        if self.main {
            q.main_busy_since = Some(Instant::now());
        }
        Some(group)
    }

    /// Sleeps on this writer's condvar (at most `timeout`), saying so.
    fn wait<'a>(&self, mut q: MutexGuard<'a, Queue>, timeout: Option<Duration>) -> MutexGuard<'a, Queue> {
        let shared = &*self.shared;
        let cv = if self.main {
            q.main_waiting = true;
            &shared.main
        } else {
            q.helpers_waiting += 1;
            &shared.helpers
        };
        let mut q = match timeout {
            Some(t) => cv.wait_timeout(q, t).unwrap_or_else(|poisoned| poisoned.into_inner()).0,
            None => cv.wait(q).unwrap_or_else(|poisoned| poisoned.into_inner()),
        };
        if self.main {
            q.main_waiting = false;
        } else {
            q.helpers_waiting -= 1;
        }
        q
    }

    /// The group is done: its sessions are free, their seqs go back, and
    /// whoever can take what waited for them is woken.
    fn release(&self, sessions: HashSet<Arc<str>>, mut seqs: SeqCache) {
        let shared = &*self.shared;
        let mut q = shared.lock();
        for id in &sessions {
            q.in_flight.remove(id);
            q.seqs.adopt(id, &mut seqs);
        }
        if self.main {
            q.main_busy_since = None;
        }
        let wake_main = !q.jobs.is_empty() && q.main_waiting;
        drop(q);
        if wake_main {
            shared.main.notify_one();
        }
    }

    /// One result per batch, in order.
    fn process(&mut self, batches: &[&AppendBatch], seqs: &mut SeqCache) -> Vec<Result<(), StoreError>> {
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
            let started = Instant::now();
            let opened = self.manager.open().map_err(|e| e.to_string()).and_then(|mut conn| {
                warm_up(&mut conn).map_err(|e| e.to_string())?;
                Ok(conn)
            });
            match opened {
                Ok(conn) => {
                    let ms = started.elapsed().as_secs_f64() * 1000.0;
                    if self.retry_at.take().is_some() {
                        tracing::info!(main = self.main, connect_ms = ms, "event writer reconnected to the database");
                    } else {
                        tracing::debug!(main = self.main, connect_ms = ms, "event writer connected");
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
        let counters = &self.shared.counters;
        counters.commits.fetch_add(1, Ordering::Relaxed);
        if !self.main {
            counters.helper_commits.fetch_add(1, Ordering::Relaxed);
        }
        counters.batches.fetch_add(batches as u64, Ordering::Relaxed);
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

//! The small traits through which actors reach the outside world.
//!
//! Actors hold them as `Arc<dyn …>`. `src/storage` implements [`EventStore`]
//! with diesel; [`crate::queue::MemoryQueue`] implements [`QueueStore`] in
//! process (a Redis implementation fills the same trait for a cluster, so
//! nothing above it changes). Every method returns a boxed future so that
//! network-backed implementations fit; in-process ones return ready futures.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::domain::{AgentInfo, EndReason, Event, Mode, SessionId, Seq};
use crate::error::StoreError;

pub type PortFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>>;

/// The row that describes a session, written with its first event.
#[derive(Clone, Debug)]
pub struct SessionRecord {
    pub id: SessionId,
    pub topic: Arc<str>,
    pub mode: Mode,
    pub customer_name: Arc<str>,
    pub resume_token_hash: Arc<str>,
    pub created_at_ms: i64,
}

/// Where a session stands, as the sessions table records it.
#[derive(Clone, Debug, PartialEq)]
pub enum SessionStatus {
    /// In its topic's queue since `queued_at_ms` (the queue is ordered by it;
    /// a customer put back at the head gets a time before everyone else's).
    Waiting { queued_at_ms: i64 },
    Active { agent: AgentInfo, assigned_at_ms: i64 },
    Ended { reason: EndReason, at_ms: i64 },
}

/// A change of the sessions row, committed in the same transaction as the
/// events of its batch (so the row never disagrees with the log).
#[derive(Clone, Debug)]
pub enum SessionChange {
    Create(SessionRecord, SessionStatus),
    Status(SessionStatus),
}

/// An event to store, with the idempotency key of the client message that
/// caused it (`customer:7`, `agent:alice:7`), if any.
#[derive(Clone, Debug)]
pub struct NewEvent {
    pub event: Arc<Event>,
    pub client_key: Option<Arc<str>>,
}

/// Events of one session, stored in one transaction together with a change of
/// its row. The store may commit many batches (of many sessions) together.
#[derive(Clone, Debug)]
pub struct AppendBatch {
    pub session_id: SessionId,
    pub events: Vec<NewEvent>,
    pub change: Option<SessionChange>,
}

/// All a node needs to bring a session back to life on any node.
#[derive(Clone, Debug)]
pub struct SessionSnapshot {
    pub record: SessionRecord,
    pub status: SessionStatus,
    pub last_seq: Seq,
    /// Every idempotency key of the session with the seq it was acked with.
    pub client_keys: Vec<(Arc<str>, Seq)>,
}

/// The durable, ordered event log of every session.
///
/// Guarantees the actors rely on: when `append` resolves `Ok`, the batch is
/// committed (survives a kill of the process); batches of one session
/// resolve in the order they were given; a failed batch stored nothing.
pub trait EventStore: Send + Sync + 'static {
    fn append(&self, batch: AppendBatch) -> PortFuture<()>;
    fn load_session(&self, id: &SessionId) -> PortFuture<Option<SessionSnapshot>>;
    /// Events with `seq > after`, oldest first, at most `limit`.
    fn events_after(&self, id: &SessionId, after: Seq, limit: u32) -> PortFuture<Vec<Arc<Event>>>;
    /// The `limit` events just before `before`, oldest first.
    fn events_before(&self, id: &SessionId, before: Seq, limit: u32) -> PortFuture<Vec<Arc<Event>>>;
    /// Every session that has not ended, for recovery at start.
    fn open_sessions(&self) -> PortFuture<Vec<SessionSnapshot>>;
}

/// One customer waiting in a topic's queue.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueEntry {
    pub session_id: SessionId,
    pub topic: Arc<str>,
    pub name: Arc<str>,
    pub queued_at_ms: i64,
}

/// The waiting customers of one topic, head first.
#[derive(Clone, Debug, Default)]
pub struct TopicQueue {
    pub topic: Arc<str>,
    pub waiting: Vec<QueueEntry>,
}

/// The outcome of taking one given customer.
#[derive(Clone, Debug, PartialEq)]
pub enum TakeOutcome {
    Taken(QueueEntry),
    /// It is not (or no longer) in that queue: somebody else took it, or it left.
    NotWaiting,
}

/// The outcome of taking the next customer of a topic.
#[derive(Clone, Debug, PartialEq)]
pub enum TakeNext {
    Taken(QueueEntry),
    /// Nobody waits, and the last one was taken after (or just before)
    /// this take was asked for: it lost a race (`conflict`).
    JustTaken,
    /// Nobody waits (`not_found`).
    Empty,
}

/// A take asked for at most this long after the topic's last take still
/// lost a race to it: frames of two agents pressing "take" together are
/// read some milliseconds apart on a loaded machine. A take asked later
/// found the queue empty.
pub const TAKE_RACE_SLACK_MS: i64 = 100;

/// FIFO queues per topic. Every operation is atomic: two takers never both
/// get the same entry, whichever node they are on.
pub trait QueueStore: Send + Sync + 'static {
    /// Appends at the tail; answers the entry's 1-based position and the
    /// queue's length after it.
    fn push_back(&self, entry: QueueEntry) -> PortFuture<(usize, usize)>;
    /// Puts an entry back at the head (its agent was lost); answers the
    /// queue's length after it.
    fn push_front(&self, entry: QueueEntry) -> PortFuture<usize>;
    /// The head of the queue; `asked_at_ms` (wall clock, when the agent's
    /// request arrived) tells a lost race from an empty queue.
    fn take_next(&self, topic: &str, asked_at_ms: i64) -> PortFuture<TakeNext>;
    fn take(&self, topic: &str, session_id: &SessionId) -> PortFuture<TakeOutcome>;
    /// Removes an entry; answers whether it was there.
    fn remove(&self, topic: &str, session_id: &SessionId) -> PortFuture<bool>;
    fn snapshot(&self) -> PortFuture<Vec<TopicQueue>>;
    fn topic_snapshot(&self, topic: &str) -> PortFuture<TopicQueue>;
}

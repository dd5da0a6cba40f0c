//! The in-process [`QueueStore`]: FIFO queues per topic behind one mutex.
//!
//! Used by a single node (no `REDIS_URL`). Every operation holds the lock for
//! its whole read-modify-write, which is what makes `take` exactly-once. A
//! parking_lot mutex, not an actor: the critical sections are a few hundred
//! nanoseconds and never await.

use std::collections::{HashMap, VecDeque};
use std::future::ready;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::domain::{now_ms, SessionId};
use crate::ports::{PortFuture, QueueEntry, QueueStore, TakeNext, TakeOutcome, TopicQueue, TAKE_RACE_SLACK_MS};

/// Topics kept while empty (so `/metrics` shows their zero) before the
/// empty ones are dropped: clients name topics, and a client naming a new
/// one per join must not grow the node without bound.
const EMPTY_TOPICS_KEPT: usize = 256;

#[derive(Default)]
pub struct MemoryQueue {
    queues: Mutex<Queues>,
}

#[derive(Default)]
struct Queues {
    waiting: HashMap<Arc<str>, VecDeque<QueueEntry>>,
    /// When each topic last had a customer taken (ms, wall clock): a take
    /// that finds the topic empty compares its own instant with it.
    last_taken_ms: HashMap<Arc<str>, i64>,
    /// Prune when this many topics are known (grows with the topics that
    /// have customers, so pruning stays rare whatever their number).
    prune_at: usize,
}

impl Queues {
    /// The queue of `topic`, made if new (then perhaps pruning empty ones).
    fn topic(&mut self, topic: &Arc<str>) -> &mut VecDeque<QueueEntry> {
        if !self.waiting.contains_key(topic) && self.waiting.len() >= self.prune_at.max(EMPTY_TOPICS_KEPT) {
            self.prune();
        }
        self.waiting.entry(topic.clone()).or_default()
    }

    /// Drops empty topics, and take instants too old to decide a race (with
    /// room for a take that was read a while before it reached the queue).
    fn prune(&mut self) {
        self.waiting.retain(|_, q| !q.is_empty());
        let recent = now_ms() - 10 * TAKE_RACE_SLACK_MS;
        self.last_taken_ms.retain(|_, t| *t >= recent);
        self.prune_at = 2 * self.waiting.len();
    }

    /// Takes `session_id` out of `topic`'s queue, if it waits there.
    fn remove(&mut self, topic: &str, session_id: &SessionId) -> Option<QueueEntry> {
        let q = self.waiting.get_mut(topic)?;
        let i = q.iter().position(|e| &e.session_id == session_id)?;
        q.remove(i)
    }

    /// An agent took `e`: noted for the takes that find its topic empty.
    fn taken(&mut self, e: QueueEntry) -> QueueEntry {
        self.last_taken_ms.insert(e.topic.clone(), now_ms());
        e
    }
}

impl MemoryQueue {
    pub fn new() -> MemoryQueue {
        MemoryQueue::default()
    }
}

fn done<T: Send + 'static>(v: T) -> PortFuture<T> {
    Box::pin(ready(Ok(v)))
}

impl QueueStore for MemoryQueue {
    fn push_back(&self, entry: QueueEntry) -> PortFuture<(usize, usize)> {
        let mut queues = self.queues.lock();
        let q = queues.topic(&entry.topic);
        // Idempotent: a session already waiting keeps its place.
        if let Some(i) = q.iter().position(|e| e.session_id == entry.session_id) {
            return done((i + 1, q.len()));
        }
        q.push_back(entry);
        done((q.len(), q.len()))
    }

    fn push_front(&self, entry: QueueEntry) -> PortFuture<usize> {
        let mut queues = self.queues.lock();
        let q = queues.topic(&entry.topic);
        q.retain(|e| e.session_id != entry.session_id);
        q.push_front(entry);
        done(q.len())
    }

    fn take_next(&self, topic: &str, asked_at_ms: i64) -> PortFuture<TakeNext> {
        let mut queues = self.queues.lock();
        done(match queues.waiting.get_mut(topic).and_then(VecDeque::pop_front) {
            Some(e) => TakeNext::Taken(queues.taken(e)),
            None if queues.last_taken_ms.get(topic).is_some_and(|&t| asked_at_ms <= t + TAKE_RACE_SLACK_MS) => TakeNext::JustTaken,
            None => TakeNext::Empty,
        })
    }

    fn take(&self, topic: &str, session_id: &SessionId) -> PortFuture<TakeOutcome> {
        let mut queues = self.queues.lock();
        done(match queues.remove(topic, session_id) {
            Some(e) => TakeOutcome::Taken(queues.taken(e)),
            None => TakeOutcome::NotWaiting,
        })
    }

    fn remove(&self, topic: &str, session_id: &SessionId) -> PortFuture<bool> {
        done(self.queues.lock().remove(topic, session_id).is_some())
    }

    fn snapshot(&self) -> PortFuture<Vec<TopicQueue>> {
        let queues = self.queues.lock();
        let mut all: Vec<TopicQueue> = queues
            .waiting
            .iter()
            .map(|(t, q)| TopicQueue { topic: t.clone(), waiting: q.iter().cloned().collect() })
            .collect();
        all.sort_by(|a, b| a.topic.cmp(&b.topic));
        done(all)
    }

    fn topic_snapshot(&self, topic: &str) -> PortFuture<TopicQueue> {
        let queues = self.queues.lock();
        let waiting = queues.waiting.get(topic).map(|q| q.iter().cloned().collect()).unwrap_or_default();
        done(TopicQueue { topic: Arc::from(topic), waiting })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str) -> QueueEntry {
        QueueEntry {
            session_id: Arc::from(id),
            topic: Arc::from("support"),
            name: Arc::from(id),
            queued_at_ms: 0,
        }
    }

    fn block<T>(f: PortFuture<T>) -> T {
        futures_util::FutureExt::now_or_never(f)
            .expect("in-process futures are ready")
            .expect("in-process queue never fails")
    }

    #[test]
    fn fifo_with_head_reinsert() {
        let q = MemoryQueue::new();
        assert_eq!(block(q.push_back(entry("a"))), (1, 1));
        assert_eq!(block(q.push_back(entry("b"))), (2, 2));
        assert_eq!(block(q.push_back(entry("a"))), (1, 2), "re-join keeps the place");
        let asked = now_ms();
        let TakeNext::Taken(a) = block(q.take_next("support", asked)) else { panic!("a waits") };
        assert_eq!(&*a.session_id, "a");
        assert_eq!(block(q.push_front(a)), 2);
        let taken = |q: &MemoryQueue| match block(q.take_next("support", asked)) {
            TakeNext::Taken(e) => e.session_id.to_string(),
            other => panic!("expected a customer, got {other:?}"),
        };
        assert_eq!(taken(&q), "a");
        assert_eq!(taken(&q), "b");
        assert_eq!(block(q.take_next("support", asked)), TakeNext::JustTaken, "asked before b was taken: a lost race");
        assert_eq!(block(q.take_next("sales", asked)), TakeNext::Empty, "nobody was ever there");
    }

    #[test]
    fn empty_topics_do_not_pile_up() {
        let q = MemoryQueue::new();
        block(q.push_back(entry("waits")));
        for i in 0..10 * EMPTY_TOPICS_KEPT {
            let mut e = entry(&format!("s{i}"));
            e.topic = Arc::from(format!("topic-{i}"));
            block(q.push_back(e.clone()));
            assert!(block(q.remove(&e.topic, &e.session_id)));
        }
        let known = q.queues.lock().waiting.len();
        assert!(known <= EMPTY_TOPICS_KEPT + 1, "{known} topics kept");
        let all = block(q.snapshot());
        assert!(all.iter().any(|t| &*t.topic == "support" && t.waiting.len() == 1), "a waiting customer is never dropped");
    }

    #[test]
    fn an_empty_topic_is_a_lost_race_only_for_a_take_asked_before_the_last_one() {
        let q = MemoryQueue::new();
        block(q.push_back(entry("a")));
        let id: SessionId = Arc::from("a");
        let asked = now_ms();
        assert!(matches!(block(q.take("support", &id)), TakeOutcome::Taken(_)));
        assert_eq!(block(q.take_next("support", asked)), TakeNext::JustTaken, "a given take counts too");
        let later = now_ms() + TAKE_RACE_SLACK_MS + 1;
        assert_eq!(block(q.take_next("support", later)), TakeNext::Empty, "asked after the last take");
    }

    #[test]
    fn a_given_session_is_taken_once() {
        let q = MemoryQueue::new();
        block(q.push_back(entry("a")));
        let id: SessionId = Arc::from("a");
        assert!(matches!(block(q.take("support", &id)), TakeOutcome::Taken(_)));
        assert_eq!(block(q.take("support", &id)), TakeOutcome::NotWaiting);
        assert!(!block(q.remove("support", &id)));
    }
}

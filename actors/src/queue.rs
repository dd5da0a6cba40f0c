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

use crate::domain::SessionId;
use crate::ports::{PortFuture, QueueEntry, QueueStore, TakeOutcome, TopicQueue};

#[derive(Default)]
pub struct MemoryQueue {
    topics: Mutex<HashMap<Arc<str>, VecDeque<QueueEntry>>>,
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
        let mut topics = self.topics.lock();
        let q = topics.entry(entry.topic.clone()).or_default();
        // Idempotent: a session already waiting keeps its place.
        if let Some(i) = q.iter().position(|e| e.session_id == entry.session_id) {
            return done((i + 1, q.len()));
        }
        q.push_back(entry);
        done((q.len(), q.len()))
    }

    fn push_front(&self, entry: QueueEntry) -> PortFuture<usize> {
        let mut topics = self.topics.lock();
        let q = topics.entry(entry.topic.clone()).or_default();
        q.retain(|e| e.session_id != entry.session_id);
        q.push_front(entry);
        done(q.len())
    }

    fn take_next(&self, topic: &str) -> PortFuture<Option<QueueEntry>> {
        let mut topics = self.topics.lock();
        done(topics.get_mut(topic).and_then(VecDeque::pop_front))
    }

    fn take(&self, topic: &str, session_id: &SessionId) -> PortFuture<TakeOutcome> {
        let mut topics = self.topics.lock();
        let taken = topics.get_mut(topic).and_then(|q| {
            let i = q.iter().position(|e| &e.session_id == session_id)?;
            q.remove(i)
        });
        done(match taken {
            Some(e) => TakeOutcome::Taken(e),
            None => TakeOutcome::NotWaiting,
        })
    }

    fn remove(&self, topic: &str, session_id: &SessionId) -> PortFuture<bool> {
        let mut topics = self.topics.lock();
        let removed = topics
            .get_mut(topic)
            .and_then(|q| {
                let i = q.iter().position(|e| &e.session_id == session_id)?;
                q.remove(i)
            })
            .is_some();
        done(removed)
    }

    fn snapshot(&self) -> PortFuture<Vec<TopicQueue>> {
        let topics = self.topics.lock();
        let mut all: Vec<TopicQueue> = topics
            .iter()
            .map(|(t, q)| TopicQueue { topic: t.clone(), waiting: q.iter().cloned().collect() })
            .collect();
        all.sort_by(|a, b| a.topic.cmp(&b.topic));
        done(all)
    }

    fn topic_snapshot(&self, topic: &str) -> PortFuture<TopicQueue> {
        let topics = self.topics.lock();
        let waiting = topics.get(topic).map(|q| q.iter().cloned().collect()).unwrap_or_default();
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
        let a = block(q.take_next("support")).expect("a waits");
        assert_eq!(&*a.session_id, "a");
        assert_eq!(block(q.push_front(a)), 2);
        assert_eq!(&*block(q.take_next("support")).expect("a again").session_id, "a");
        assert_eq!(&*block(q.take_next("support")).expect("b").session_id, "b");
        assert!(block(q.take_next("support")).is_none());
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

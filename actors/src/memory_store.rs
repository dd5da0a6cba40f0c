//! An in-process [`EventStore`]: the event log in a mutex, for the actor
//! layer's own tests (and any embedding that wants no database).
//!
//! It keeps the guarantees the SQL store gives: a batch is all or nothing,
//! a seq or a client key is stored once per session, and a batch must
//! continue its session's log. `fail_next` makes the next appends fail as
//! an outage would, so failure paths are tested against the real contract.

use std::collections::HashMap;
use std::future::ready;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::domain::{Event, EventBody, SessionId, Seq};
use crate::error::StoreError;
use crate::ports::{AppendBatch, EventStore, PortFuture, SessionChange, SessionSnapshot, SessionStatus};

#[derive(Default)]
struct Stored {
    snapshot: Option<SessionSnapshot>,
    events: Vec<Arc<Event>>,
}

#[derive(Default)]
pub struct MemoryEventStore {
    sessions: Mutex<HashMap<SessionId, Stored>>,
    failures: AtomicUsize,
}

impl MemoryEventStore {
    pub fn new() -> MemoryEventStore {
        MemoryEventStore::default()
    }

    /// The next `n` appends fail with `Unavailable` and store nothing.
    pub fn fail_next(&self, n: usize) {
        self.failures.store(n, Ordering::SeqCst);
    }

    /// Every stored event of a session, in order.
    pub fn events(&self, id: &SessionId) -> Vec<Arc<Event>> {
        self.sessions.lock().get(id).map(|s| s.events.clone()).unwrap_or_default()
    }

    fn apply(&self, batch: AppendBatch) -> Result<(), StoreError> {
        let taken = self.failures.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if taken.is_ok() {
            return Err(StoreError::Unavailable { what: "memory store (failure injected)" });
        }
        let mut all = self.sessions.lock();
        let stored = all.entry(batch.session_id.clone()).or_default();
        let mut snap = match (&batch.change, &stored.snapshot) {
            (Some(SessionChange::Create(record, status)), None) => SessionSnapshot {
                record: record.clone(),
                status: status.clone(),
                last_seq: 0,
                client_keys: Vec::new(),
            },
            (Some(SessionChange::Create(..)), Some(_)) => return Err(StoreError::Conflict("session exists".into())),
            (_, Some(s)) => s.clone(),
            (_, None) => return Err(StoreError::Conflict("no such session".into())),
        };
        for e in &batch.events {
            if e.event.seq != snap.last_seq + 1 {
                return Err(StoreError::Conflict(format!("seq {} after {}", e.event.seq, snap.last_seq)));
            }
            if let Some(k) = &e.client_key {
                if snap.client_keys.iter().any(|(key, _)| key == k) {
                    return Err(StoreError::Conflict(format!("key {k} stored twice")));
                }
                snap.client_keys.push((k.clone(), e.event.seq));
            }
            snap.last_seq = e.event.seq;
        }
        if let Some(SessionChange::Status(s)) = &batch.change {
            snap.status = s.clone();
        }
        stored.events.extend(batch.events.into_iter().map(|e| without_token(e.event)));
        stored.snapshot = Some(snap);
        Ok(())
    }
}

/// Like the SQL store: the resume token goes out live once and is never
/// kept, so no replay (a resume, an agent's `take`) can show it.
fn without_token(event: Arc<Event>) -> Arc<Event> {
    if !matches!(event.body, EventBody::Session { resume_token: Some(_), .. }) {
        return event;
    }
    let mut kept = (*event).clone();
    if let EventBody::Session { resume_token, .. } = &mut kept.body {
        *resume_token = None;
    }
    Arc::new(kept)
}

fn done<T: Send + 'static>(v: Result<T, StoreError>) -> PortFuture<T> {
    Box::pin(ready(v))
}

impl EventStore for MemoryEventStore {
    fn append(&self, batch: AppendBatch) -> PortFuture<()> {
        done(self.apply(batch))
    }

    fn load_session(&self, id: &SessionId) -> PortFuture<Option<SessionSnapshot>> {
        done(Ok(self.sessions.lock().get(id).and_then(|s| s.snapshot.clone())))
    }

    fn events_after(&self, id: &SessionId, after: Seq, limit: u32) -> PortFuture<Vec<Arc<Event>>> {
        let all = self.events(id);
        done(Ok(all.into_iter().filter(|e| e.seq > after).take(limit as usize).collect()))
    }

    fn events_before(&self, id: &SessionId, before: Seq, limit: u32) -> PortFuture<Vec<Arc<Event>>> {
        let older: Vec<_> = self.events(id).into_iter().filter(|e| e.seq < before).collect();
        let skip = older.len().saturating_sub(limit as usize);
        done(Ok(older.into_iter().skip(skip).collect()))
    }

    fn open_sessions(&self) -> PortFuture<Vec<SessionSnapshot>> {
        let open = self
            .sessions
            .lock()
            .values()
            .filter_map(|s| s.snapshot.clone())
            .filter(|s| !matches!(s.status, SessionStatus::Ended { .. }))
            .collect();
        done(Ok(open))
    }
}

//! What actors send towards a client connection, and the handle they send it
//! through.
//!
//! The socket itself lives in `src/ws` (it owns the TCP stream, and the
//! actors crate knows no actix-web). Each connection has one writer that
//! drains a bounded channel in order, so frames leave in the order the actors
//! produced them. A full channel means the client stopped reading: the
//! connection is told to close and the client resumes later; nothing is
//! skipped, and the other sessions of the node are not slowed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use std::collections::VecDeque;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::domain::{CallStats, ClientRef, Event, Party, SessionId, Seq};
use crate::error::ActorError;
use crate::views::Dashboard;

/// One frame-to-be, in domain terms; `src/protocol` encodes it.
#[derive(Clone, Debug)]
pub enum Outbound {
    Event(Arc<Event>),
    Ack {
        client_ref: ClientRef,
        seq: Option<Seq>,
        session_id: Option<SessionId>,
    },
    Error {
        client_ref: Option<ClientRef>,
        error: ActorError,
    },
    Queue {
        session_id: SessionId,
        position: usize,
        waiting: usize,
        eta_s: u64,
    },
    Typing {
        session_id: SessionId,
        from: Party,
        on: bool,
    },
    Stats {
        session_id: SessionId,
        stats: CallStats,
    },
    Resumed {
        session_id: SessionId,
    },
    Dashboard(Arc<Dashboard>),
    /// The connection no longer speaks for this session (it ended, or the
    /// client resumed it on another connection).
    Detached {
        session_id: SessionId,
    },
    /// A resume of this session was refused; the connection keeps whatever
    /// session it had.
    ResumeRefused {
        session_id: SessionId,
    },
    /// Close the socket with this code and reason.
    Close {
        code: u16,
        reason: &'static str,
    },
}

/// Close code sent to a connection whose session was resumed elsewhere.
pub const CLOSE_SUPERSEDED: u16 = 4001;
/// Close code for a client that stopped reading (its buffer filled up).
pub const CLOSE_SLOW_CONSUMER: u16 = 1013;

/// A cheap, cloneable handle to one client connection.
#[derive(Clone, Debug)]
pub struct ConnHandle {
    pub conn_id: u64,
    shared: Arc<Shared>,
}

/// The queue between the actors and one socket. A `VecDeque` behind a
/// mutex rather than a channel: it allocates nothing until the first frame
/// and shrinks back after a burst, so ten thousand idle sockets cost
/// almost nothing here (a channel preallocates a block of slots each).
#[derive(Debug)]
struct Shared {
    frames: Mutex<VecDeque<Outbound>>,
    capacity: usize,
    /// Frames are waiting, or the connection was killed.
    ready: Notify,
    /// Room was made (for `push_wait`).
    room: Notify,
    /// The connection was killed (for the socket loop).
    kill_notify: Notify,
    killed: AtomicBool,
    /// The socket's loop is gone; pushes are refused.
    closed: AtomicBool,
}

impl Shared {
    fn gone(&self) -> bool {
        self.killed.load(Ordering::Acquire) || self.closed.load(Ordering::Acquire)
    }

    fn kill(&self) {
        self.killed.store(true, Ordering::Release);
        self.kill_notify.notify_waiters();
        self.room.notify_waiters();
    }
}

/// The connection's side of a [`ConnHandle`].
pub struct ConnInbox {
    shared: Arc<Shared>,
    pub kill: KillSignal,
}

impl ConnInbox {
    /// The next frame, in the order they were pushed. Never resolves while
    /// the queue is empty (the socket loop ends for other reasons).
    pub async fn recv(&mut self) -> Option<Outbound> {
        loop {
            let notified = self.shared.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(f) = pop(&self.shared) {
                return Some(f);
            }
            notified.await;
        }
    }

    /// The next frame if one is queued, without waiting (the socket drains
    /// a burst this way and writes it with one call).
    pub fn try_recv(&mut self) -> Option<Outbound> {
        pop(&self.shared)
    }
}

fn pop(shared: &Shared) -> Option<Outbound> {
    let mut q = shared.frames.lock();
    let f = q.pop_front()?;
    if q.is_empty() {
        // Most sockets are idle most of the time: hold no slots then (the
        // next burst allocates again, which costs less than keeping them).
        *q = VecDeque::new();
    }
    drop(q);
    shared.room.notify_one();
    Some(f)
}

impl Drop for ConnInbox {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.room.notify_waiters();
        self.shared.frames.lock().clear();
    }
}

/// Fired when an actor decided the connection must go (slow consumer).
#[derive(Clone, Debug)]
pub struct KillSignal(Arc<Shared>);

impl KillSignal {
    pub fn is_killed(&self) -> bool {
        self.0.killed.load(Ordering::Acquire)
    }

    /// Resolves once the signal fired.
    pub async fn killed(&self) {
        loop {
            let notified = self.0.kill_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_killed() {
                return;
            }
            notified.await;
        }
    }
}

impl ConnHandle {
    /// A handle and its inbox with room for `capacity` frames.
    pub fn channel(conn_id: u64, capacity: usize) -> (ConnHandle, ConnInbox) {
        let shared = Arc::new(Shared {
            frames: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            ready: Notify::new(),
            room: Notify::new(),
            kill_notify: Notify::new(),
            killed: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        });
        (
            ConnHandle { conn_id, shared: shared.clone() },
            ConnInbox { shared: shared.clone(), kill: KillSignal(shared) },
        )
    }

    /// Queues a frame. Returns false when the connection is gone or was
    /// killed for being too slow (the frame is then not delivered; the client
    /// gets it by resuming).
    pub fn push(&self, frame: Outbound) -> bool {
        if self.shared.gone() {
            return false;
        }
        let mut q = self.shared.frames.lock();
        if q.len() >= self.shared.capacity {
            drop(q);
            tracing::warn!(conn_id = self.conn_id, "client is not reading; closing it");
            self.shared.kill();
            return false;
        }
        q.push_back(frame);
        drop(q);
        self.shared.ready.notify_one();
        true
    }

    /// Waits for room, then queues (used by replay, which may outrun the
    /// bound but must not drop anything).
    pub async fn push_wait(&self, frame: Outbound) -> bool {
        loop {
            let notified = self.shared.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.shared.gone() {
                return false;
            }
            {
                let mut q = self.shared.frames.lock();
                if q.len() < self.shared.capacity {
                    q.push_back(frame);
                    drop(q);
                    self.shared.ready.notify_one();
                    return true;
                }
            }
            notified.await;
        }
    }

    pub fn is_open(&self) -> bool {
        !self.shared.gone()
    }

    pub fn same(&self, other: &ConnHandle) -> bool {
        self.conn_id == other.conn_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_channel_kills_the_connection() {
        let (h, inbox) = ConnHandle::channel(1, 2);
        let pong = || Outbound::Close { code: 1000, reason: "x" };
        assert!(h.push(pong()));
        assert!(h.push(pong()));
        assert!(!h.push(pong()), "third frame overflows");
        inbox.kill.killed().await;
        assert!(!h.is_open());
        assert!(!h.push(pong()), "a killed connection takes nothing");
    }

    #[tokio::test]
    async fn frames_arrive_in_order_and_replay_waits_for_room() {
        let (h, mut inbox) = ConnHandle::channel(1, 2);
        let frame = |code| Outbound::Close { code, reason: "x" };
        let writer = tokio::spawn({
            let h = h.clone();
            async move {
                for code in 0..100u16 {
                    assert!(h.push_wait(frame(code)).await);
                }
            }
        });
        for code in 0..100u16 {
            match inbox.recv().await {
                Some(Outbound::Close { code: c, .. }) => assert_eq!(c, code),
                other => panic!("unexpected {other:?}"),
            }
        }
        writer.await.expect("writer finished");
        drop(inbox);
        assert!(!h.push(frame(1)), "a closed connection takes nothing");
    }
}

//! What actors send towards a client connection, and the handle they send it
//! through.
//!
//! The socket itself lives in `src/ws` (it is an actix-ws session, and the
//! actors crate knows no actix-web). Each connection has one writer that
//! drains a bounded channel in order, so frames leave in the order the actors
//! produced them. A full channel means the client stopped reading: the
//! connection is told to close and the client resumes later; nothing is
//! skipped, and the other sessions of the node are not slowed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, Notify};

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
    tx: mpsc::Sender<Outbound>,
    kill: Arc<Kill>,
}

#[derive(Debug, Default)]
struct Kill {
    fired: AtomicBool,
    notify: Notify,
}

/// The connection's side of a [`ConnHandle`].
pub struct ConnInbox {
    pub rx: mpsc::Receiver<Outbound>,
    pub kill: KillSignal,
}

/// Fired when an actor decided the connection must go (slow consumer).
#[derive(Clone, Debug)]
pub struct KillSignal(Arc<Kill>);

impl KillSignal {
    pub fn is_killed(&self) -> bool {
        self.0.fired.load(Ordering::Acquire)
    }

    /// Resolves once the signal fired.
    pub async fn killed(&self) {
        loop {
            let notified = self.0.notify.notified();
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
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let kill = Arc::new(Kill::default());
        (ConnHandle { conn_id, tx, kill: kill.clone() }, ConnInbox { rx, kill: KillSignal(kill) })
    }

    /// Queues a frame. Returns false when the connection is gone or was
    /// killed for being too slow (the frame is then not delivered; the client
    /// gets it by resuming).
    pub fn push(&self, frame: Outbound) -> bool {
        if self.kill.fired.load(Ordering::Acquire) {
            return false;
        }
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(conn_id = self.conn_id, "client is not reading; closing it");
                self.kill.fired.store(true, Ordering::Release);
                self.kill.notify.notify_waiters();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Waits for room, then queues (used by replay, which may outrun the
    /// channel's bound but must not drop anything).
    pub async fn push_wait(&self, frame: Outbound) -> bool {
        if self.kill.fired.load(Ordering::Acquire) {
            return false;
        }
        self.tx.send(frame).await.is_ok()
    }

    pub fn is_open(&self) -> bool {
        !self.tx.is_closed() && !self.kill.fired.load(Ordering::Acquire)
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
}

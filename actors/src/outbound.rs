//! What actors send towards a client connection, and the handle they send it
//! through.
//!
//! The socket itself lives in `src/ws` (it owns the TCP stream, and the
//! actors crate knows no actix-web). Each connection has one writer that
//! drains a bounded channel in order, so frames leave in the order the actors
//! produced them. A full channel means the client stopped reading: the
//! connection is told to close and the client resumes later; nothing is
//! skipped, and the other sessions of the node are not slowed.
//!
//! A connection may also have a [`DirectWrite`]: a live event pushed while
//! nothing is queued and the socket's loop is asleep is then written by the
//! pushing thread itself, so the loop's thread is not woken for it (a
//! relayed message otherwise wakes the agent's worker, a context switch on
//! the hot path). Order holds because a direct write happens under the
//! queue's lock, only when the queue is empty and the loop is not writing.

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
    /// A direct write got part of a frame out; the socket's loop writes
    /// the rest (kept by the writer) before what is queued behind this.
    WrittenInPart,
    /// Close the socket with this code and reason.
    Close {
        code: u16,
        reason: &'static str,
    },
}

/// Close code sent to a connection whose session was resumed elsewhere.
pub const CLOSE_SUPERSEDED: u16 = 4001;
/// Close code for a socket whose session's (or agent's) actor died: the
/// client reconnects and resumes; storage holds the session.
pub const CLOSE_RESTARTING: u16 = 1011;
/// Close code for a client that stopped reading (its buffer filled up).
pub const CLOSE_SLOW_CONSUMER: u16 = 1013;
/// How long a replay waits for a client to make room before closing it.
pub const REPLAY_STALL: std::time::Duration = std::time::Duration::from_secs(30);

/// What a [`DirectWrite`] did with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direct {
    /// The whole frame is on the wire.
    Written,
    /// Part of it is on the wire; the writer keeps the rest for the
    /// socket's loop, which writes it before anything else (the queue gets
    /// [`Outbound::WrittenInPart`] to wake it).
    Partial,
    /// Nothing was written (no room in the kernel, or the socket is going):
    /// the frame is queued as usual.
    Refused,
}

/// Writes a frame to the client from the pushing thread (`src/ws`
/// implements it for agent sockets). Called with the connection's queue
/// locked, only while the queue is empty and the socket's loop is idle.
pub trait DirectWrite: Send + Sync + std::fmt::Debug {
    fn try_write(&self, frame: &Outbound) -> Direct;
}

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
    frames: Mutex<Frames>,
    capacity: usize,
    direct: Option<Arc<dyn DirectWrite>>,
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

#[derive(Debug, Default)]
struct Frames {
    queue: VecDeque<Outbound>,
    /// The socket's loop is awake and may be writing: no direct write now.
    loop_busy: bool,
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

    /// The loop woke up and may write: direct writes stop until [`idle`].
    ///
    /// [`idle`]: ConnInbox::idle
    pub fn busy(&self) {
        self.shared.frames.lock().loop_busy = true;
    }

    /// The loop has written everything and is about to wait: direct writes
    /// may go ahead, unless frames are still queued (the loop takes those
    /// first, and stays busy).
    pub fn idle(&self) {
        let mut f = self.shared.frames.lock();
        if f.queue.is_empty() {
            f.loop_busy = false;
        }
    }
}

fn pop(shared: &Shared) -> Option<Outbound> {
    let mut q = shared.frames.lock();
    let f = q.queue.pop_front()?;
    // Taking a frame makes the loop the writer: a direct write may not
    // overtake the frame it is about to write.
    q.loop_busy = true;
    if q.queue.is_empty() {
        // Most sockets are idle most of the time: hold no slots then (the
        // next burst allocates again, which costs less than keeping them).
        q.queue = VecDeque::new();
    }
    drop(q);
    shared.room.notify_one();
    Some(f)
}

impl Drop for ConnInbox {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.room.notify_waiters();
        let mut f = self.shared.frames.lock();
        f.queue.clear();
        // Never idle again: no direct write after the loop is gone.
        f.loop_busy = true;
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
        Self::with_direct(conn_id, capacity, None)
    }

    /// The same, with a way to write live events from the pushing thread.
    pub fn with_direct(conn_id: u64, capacity: usize, direct: Option<Arc<dyn DirectWrite>>) -> (ConnHandle, ConnInbox) {
        let shared = Arc::new(Shared {
            // Busy until the loop first waits: nothing is written around
            // what it sends first (hello).
            frames: Mutex::new(Frames { queue: VecDeque::new(), loop_busy: true }),
            capacity: capacity.max(1),
            direct,
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
        if q.queue.len() >= self.shared.capacity {
            drop(q);
            tracing::warn!(conn_id = self.conn_id, "client is not reading; closing it");
            self.shared.kill();
            return false;
        }
        if let (Some(direct), Outbound::Event(_)) = (&self.shared.direct, &frame) {
            if q.queue.is_empty() && !q.loop_busy {
                match direct.try_write(&frame) {
                    Direct::Written => return true,
                    Direct::Partial => {
                        // The loop writes the rest; everything queues behind
                        // the marker that wakes it.
                        q.loop_busy = true;
                        q.queue.push_back(Outbound::WrittenInPart);
                        drop(q);
                        self.shared.ready.notify_one();
                        return true;
                    }
                    Direct::Refused => {}
                }
            }
        }
        q.queue.push_back(frame);
        drop(q);
        self.shared.ready.notify_one();
        true
    }

    /// Waits for room, then queues (used by replay, which may outrun the
    /// bound but must not drop anything). A client that makes no room for
    /// [`REPLAY_STALL`] is closed as a slow consumer (it resumes later):
    /// the session's actor holds its mailbox during a replay, so a peer
    /// that stopped reading must not hold it for good.
    pub async fn push_wait(&self, frame: Outbound) -> bool {
        self.push_wait_within(frame, REPLAY_STALL).await
    }

    async fn push_wait_within(&self, frame: Outbound, stall: std::time::Duration) -> bool {
        loop {
            let notified = self.shared.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.shared.gone() {
                return false;
            }
            {
                let mut q = self.shared.frames.lock();
                if q.queue.len() < self.shared.capacity {
                    q.queue.push_back(frame);
                    drop(q);
                    self.shared.ready.notify_one();
                    return true;
                }
            }
            if tokio::time::timeout(stall, notified).await.is_err() {
                tracing::warn!(conn_id = self.conn_id, "client took nothing of a replay for {stall:?}; closing it");
                self.shared.kill();
                return false;
            }
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
    async fn a_replay_to_a_client_that_reads_nothing_gives_up_and_kills_it() {
        let (h, inbox) = ConnHandle::channel(1, 1);
        let frame = || Outbound::Close { code: 1000, reason: "x" };
        assert!(h.push(frame()));
        let started = std::time::Instant::now();
        assert!(!h.push_wait_within(frame(), std::time::Duration::from_millis(50)).await, "no room ever came");
        assert!(started.elapsed() >= std::time::Duration::from_millis(50));
        inbox.kill.killed().await;
        assert!(!h.is_open());
    }

    /// Records what it wrote; answers as told.
    #[derive(Debug, Default)]
    struct FakeWire {
        written: Mutex<Vec<Seq>>,
        answer: Mutex<VecDeque<Direct>>,
    }

    impl DirectWrite for FakeWire {
        fn try_write(&self, frame: &Outbound) -> Direct {
            let answer = self.answer.lock().pop_front().unwrap_or(Direct::Written);
            if answer != Direct::Refused {
                if let Outbound::Event(e) = frame {
                    self.written.lock().push(e.seq);
                }
            }
            answer
        }
    }

    fn event(seq: Seq) -> Outbound {
        use crate::domain::{EventBody, Party};
        Outbound::Event(Arc::new(Event {
            session_id: SessionId::from("s"),
            seq,
            at_ms: 0,
            body: EventBody::Message { from: Party::Customer, text: Arc::from("hi"), msg_id: Arc::from("m") },
        }))
    }

    fn seq_of(f: Option<Outbound>) -> Option<Seq> {
        match f {
            Some(Outbound::Event(e)) => Some(e.seq),
            _ => None,
        }
    }

    #[test]
    fn live_events_go_direct_only_while_the_loop_is_idle_and_nothing_is_queued() {
        let wire = Arc::new(FakeWire::default());
        let (h, mut inbox) = ConnHandle::with_direct(1, 8, Some(wire.clone()));
        // Before the loop first waits (it is sending hello): queued.
        assert!(h.push(event(1)));
        inbox.idle();
        assert_eq!(seq_of(inbox.try_recv()), Some(1), "a queued frame keeps the loop busy");
        assert!(h.push(event(2)));
        assert!(wire.written.lock().is_empty(), "the loop is writing seq 1: seq 2 waits behind it");
        assert_eq!(seq_of(inbox.try_recv()), Some(2));
        inbox.idle();
        assert!(h.push(event(3)));
        assert!(h.push(Outbound::Close { code: 1000, reason: "x" }), "not an event: queued");
        assert!(h.push(event(4)), "behind a queued frame: queued");
        assert_eq!(*wire.written.lock(), vec![3]);
        assert!(matches!(inbox.try_recv(), Some(Outbound::Close { .. })));
        assert_eq!(seq_of(inbox.try_recv()), Some(4));
        inbox.idle();
        // No room in the kernel: queued, in order.
        wire.answer.lock().push_back(Direct::Refused);
        assert!(h.push(event(5)));
        assert!(h.push(event(6)));
        assert_eq!(seq_of(inbox.try_recv()), Some(5));
        assert_eq!(seq_of(inbox.try_recv()), Some(6));
        inbox.idle();
        // Half written: the loop finishes it, and the rest queues meanwhile.
        wire.answer.lock().push_back(Direct::Partial);
        assert!(h.push(event(7)));
        assert!(h.push(event(8)));
        assert_eq!(*wire.written.lock(), vec![3, 7]);
        assert!(matches!(inbox.try_recv(), Some(Outbound::WrittenInPart)), "the marker wakes the loop first");
        assert_eq!(seq_of(inbox.try_recv()), Some(8));
        inbox.idle();
        inbox.busy();
        assert!(h.push(event(9)), "a loop woken for input writes: queued");
        assert_eq!(seq_of(inbox.try_recv()), Some(9));
        inbox.idle();
        drop(inbox);
        assert!(!h.push(event(10)), "a closed connection takes nothing");
        assert_eq!(*wire.written.lock(), vec![3, 7]);
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

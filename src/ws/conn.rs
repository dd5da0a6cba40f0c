//! The loop that owns one WebSocket: it reads frames, writes what the actors
//! queued for it (in order), pings, and drops dead or flooding peers.
//!
//! One task per socket, no per-frame futures: frames leave in the order the
//! actors queued them. What a frame means is up to the [`Role`] (customer or
//! agent); this loop only knows transport rules (PROTOCOL.md, Transport).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_http::ws::{CloseCode, CloseReason};
use duet_actors::domain::ClientRef;
use duet_actors::error::ActorError;
use duet_actors::outbound::{ConnInbox, KillSignal, Outbound, CLOSE_SLOW_CONSUMER};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use std::num::NonZeroU32;
use tracing::{debug, info};

use crate::metrics::Metrics;
use super::socket::{Incoming, ReadError, WsSocket};
use crate::protocol::encode;

/// What the loop does with a frame, decided by the socket's role.
pub trait Role {
    /// `customer` or `agent`, for logs and metrics.
    const NAME: &'static str;
    /// The connection's id, for logs (customer sockets have no span: at ten
    /// thousand idle sockets a span each costs half a KiB apiece).
    fn conn_id(&self) -> u64;
    /// A text frame. Immediate answers (errors, pong) go into `out`.
    fn on_text(&mut self, text: &str, out: &mut Vec<String>) -> impl std::future::Future<Output = ()>;
    /// A binary frame (audio; refused until the voice pipeline exists).
    fn on_binary(&mut self, len: usize, out: &mut Vec<String>);
    /// Sees every queued frame before it is written (to track attachment).
    fn observe(&mut self, frame: &Outbound);
    /// The socket is gone.
    fn closed(self);
    /// The ref of a frame that could not be handled, if it is readable.
    fn ref_of(text: &str) -> Option<ClientRef>;
    /// What a direct write into this socket left unwritten (agent sockets,
    /// `src/ws/direct.rs`): the loop writes it before anything else.
    fn take_direct_rest(&self) -> Option<bytes::BytesMut> {
        None
    }
}

static CONN_IDS: AtomicU64 = AtomicU64::new(1);

pub fn next_conn_id() -> u64 {
    CONN_IDS.fetch_add(1, Ordering::Relaxed)
}

/// Per-connection flood limit. PROTOCOL.md's floor is 50 msg/s sustained
/// with bursts of 200; the limit sits half as high again (75/s, bursts of
/// 300), so a client at the floor plus its join, pings and a timer's jitter
/// is never refused. A client over it gets `rate_limited`, and one that
/// keeps going for this many frames in a row is closed.
const FLOOD_CLOSE_AFTER: u32 = 400;
const FLOOD_PER_S: u32 = 75;
const FLOOD_BURST: u32 = 300;

pub struct Limits {
    pub heartbeat: Duration,
    pub rate_limits: bool,
}

fn frame_limiter() -> DefaultDirectRateLimiter {
    let per_s = NonZeroU32::new(FLOOD_PER_S).expect("a constant above zero");
    let burst = NonZeroU32::new(FLOOD_BURST).expect("a constant above zero");
    RateLimiter::direct(Quota::per_second(per_s).allow_burst(burst))
}

/// What handling one client message decided.
enum Step {
    Go,
    /// End the connection, with this close frame (none: the peer is gone).
    Close(Option<CloseReason>),
}

fn reason(code: CloseCode, text: &str) -> Option<CloseReason> {
    Some(CloseReason { code, description: Some(text.to_owned()) })
}

/// The close frame for a client that stopped reading, counted.
fn slow_consumer(metrics: &Metrics) -> Option<CloseReason> {
    metrics.slow_consumers.inc();
    reason(CloseCode::from(CLOSE_SLOW_CONSUMER), "too slow; resume")
}

/// Most frames taken from the inbox for one write: a replay of thousands
/// goes out in slices, so a ping or a client frame is never held up long.
const BURST_FRAMES: usize = 64;

/// Runs until the socket closes; then tells the role.
///
/// This future is what every idle socket costs (it is the spawned task), so
/// it holds only the loop's state: everything rare (a resume) is boxed.
///
/// A plain fn returning an `async move` block rather than an `async fn`: the
/// block uses its captures in place, where an `async fn` would keep a second
/// copy of every argument in the future (rust-lang/rust#62958).
pub fn run<R: Role>(ws: WsSocket, inbox: ConnInbox, role: R, limits: Limits, metrics: Arc<Metrics>) -> impl std::future::Future<Output = ()> {
    let mut ws = ws;
    let mut inbox = inbox;
    let mut role = role;
    async move {
        // The loop returns busy (it starts busy and marks itself on every
        // wake-up), with any rest of a direct write taken: from here only
        // this task writes, and closing the role ends direct writes and
        // gives the stream back.
        let close = run_loop(&mut ws, &mut inbox, &mut role, &limits, &metrics).await;
        role.closed();
        // A write that failed because the actors killed the socket meanwhile.
        let close = close.or_else(|| if inbox.kill.is_killed() { slow_consumer(&metrics) } else { None });
        if let Some(reason) = close {
            // Best effort: a peer that stopped reading may never take it.
            let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(Some(reason))).await;
        }
    }
}

/// The loop itself; returns the close frame to send, if any.
async fn run_loop<R: Role>(ws: &mut WsSocket, inbox: &mut ConnInbox, role: &mut R, limits: &Limits, metrics: &Metrics) -> Option<CloseReason> {
    let mut ping = tokio::time::interval(limits.heartbeat);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await; // the first tick is immediate
    let mut last_pong = Instant::now();
    let mut flood = Flood { limiter: limits.rate_limits.then(frame_limiter), count: 0 };
    let mut out: Vec<String> = Vec::new();
    let kill = inbox.kill.clone();
    let close: Option<CloseReason> = 'conn: loop {
        // Everything already read is handled before waiting again.
        loop {
            match ws.buffered() {
                Ok(None) => break,
                Ok(Some(msg)) => {
                    if let Step::Close(r) = on_message(msg, ws, role, &mut out, &mut flood, &mut last_pong, metrics).await {
                        break 'conn r;
                    }
                }
                Err(e) => {
                    if e == ReadError::TooLarge {
                        metrics.frames_rejected.inc();
                    }
                    debug!(conn_id = role.conn_id(), role = R::NAME, error = ?e, "websocket input refused");
                    break 'conn e.close_reason();
                }
            }
        }
        if ws.has_queued() && !flush(ws, &kill).await {
            break None;
        }
        // Asleep from here: a direct writer may send live events meanwhile.
        inbox.idle();
        let wake = tokio::select! {
            biased;
            _ = kill.killed() => Wake::Killed,
            frame = inbox.recv() => Wake::Frame(frame),
            r = ws.readable() => Wake::Readable(r),
            _ = ping.tick() => Wake::Tick,
        };
        // Awake: this task writes, and first whatever a direct write left
        // (its marker in the queue woke the loop, or will be skipped).
        inbox.busy();
        if let Some(rest) = role.take_direct_rest() {
            ws.queue_raw(&rest);
        }
        match wake {
            Wake::Killed => {
                info!(conn_id = role.conn_id(), role = R::NAME, "closing a connection that stopped reading");
                break slow_consumer(metrics);
            }
            Wake::Frame(frame) => {
                let Some(first) = frame else { break None };
                // Take the burst the actors queued: one write for all of it.
                let mut next = Some(first);
                let mut taken = 0;
                while let Some(frame) = next.take() {
                    role.observe(&frame);
                    match &frame {
                        Outbound::Close { code, reason: text } => break 'conn reason(CloseCode::from(*code), text),
                        other => {
                            if let Some(text) = encode::encode(other) {
                                ws.queue_text(text);
                            }
                        }
                    }
                    taken += 1;
                    if taken < BURST_FRAMES {
                        next = inbox.try_recv();
                    }
                }
            }
            Wake::Readable(r) => {
                if r.is_err() {
                    break None;
                }
                if let Err(e) = ws.read_available() {
                    break e.close_reason();
                }
            }
            Wake::Tick => {
                if last_pong.elapsed() > limits.heartbeat * 2 + limits.heartbeat / 2 {
                    info!(conn_id = role.conn_id(), role = R::NAME, "no pong for two heartbeats; dropping the connection");
                    metrics.heartbeat_drops.inc();
                    break reason(CloseCode::Away, "heartbeat timeout");
                }
                ws.queue_ping();
            }
        }
    };
    close
}

/// Why the loop woke up.
enum Wake {
    Killed,
    Frame(Option<Outbound>),
    Readable(std::io::Result<()>),
    Tick,
}

struct Flood {
    limiter: Option<DefaultDirectRateLimiter>,
    /// Frames refused in a row.
    count: u32,
}

/// One whole message from the client.
async fn on_message<R: Role>(
    msg: Incoming,
    ws: &mut WsSocket,
    role: &mut R,
    out: &mut Vec<String>,
    flood: &mut Flood,
    last_pong: &mut Instant,
    metrics: &Metrics,
) -> Step {
    match msg {
        Incoming::Pong => *last_pong = Instant::now(),
        Incoming::Ping(b) => ws.queue_pong(b),
        // Echo the client's code (RFC 6455 5.5.1), then end.
        Incoming::Close(r) => return Step::Close(Some(r.unwrap_or_else(|| CloseCode::Normal.into()))),
        Incoming::Text(_) | Incoming::Binary(_) => {
            if let Some(l) = &flood.limiter {
                if l.check().is_err() {
                    flood.count += 1;
                    metrics.frames_rejected.inc();
                    if flood.count > FLOOD_CLOSE_AFTER {
                        return Step::Close(reason(CloseCode::Policy, "rate limit"));
                    }
                    let r = match &msg {
                        Incoming::Text(t) => R::ref_of(t),
                        _ => None,
                    };
                    let e = ActorError::RateLimited { message: "slow down: too many messages", retry_after_ms: 1000 };
                    ws.queue_text(encode::error_frame(r.as_ref(), &e));
                    return Step::Go;
                }
                flood.count = 0;
            }
            metrics.frames_in.inc();
            match msg {
                Incoming::Text(t) => role.on_text(&t, out).await,
                Incoming::Binary(b) => role.on_binary(b.len(), out),
                _ => {}
            }
            for text in out.drain(..) {
                ws.queue_text(text);
            }
        }
    }
    Step::Go
}

/// Writes what is queued, giving up when the actors decided this client is
/// too slow (so a stuck write never pins the loop).
async fn flush(ws: &mut WsSocket, kill: &KillSignal) -> bool {
    tokio::select! {
        biased;
        _ = kill.killed() => false,
        r = ws.flush() => r.is_ok(),
    }
}

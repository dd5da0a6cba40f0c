//! The loop that owns one WebSocket: it reads frames, writes what the actors
//! queued for it (in order), pings, and drops dead or flooding peers.
//!
//! One task per socket, no per-frame futures: frames leave in the order the
//! actors queued them. What a frame means is up to the [`Role`] (customer or
//! agent); this loop only knows transport rules (PROTOCOL.md, Transport).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use actix_ws::{AggregatedMessage, AggregatedMessageStream, CloseCode, CloseReason, ProtocolError, Session};
use duet_actors::domain::ClientRef;
use duet_actors::error::ActorError;
use duet_actors::outbound::{ConnInbox, KillSignal, Outbound, CLOSE_SLOW_CONSUMER};
use futures_util::StreamExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use std::num::NonZeroU32;
use tracing::{debug, info};

use crate::metrics::Metrics;
use crate::protocol::encode;

/// What the loop does with a frame, decided by the socket's role.
pub trait Role {
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
}

static CONN_IDS: AtomicU64 = AtomicU64::new(1);

pub fn next_conn_id() -> u64 {
    CONN_IDS.fetch_add(1, Ordering::Relaxed)
}

/// Per-connection flood limit: PROTOCOL.md's floor is 50 msg/s sustained
/// with bursts of 200; a client over it gets `rate_limited`, and one that
/// keeps going for this many frames in a row is closed.
const FLOOD_CLOSE_AFTER: u32 = 400;

pub struct Limits {
    pub heartbeat: Duration,
    pub rate_limits: bool,
}

fn frame_limiter() -> DefaultDirectRateLimiter {
    let per_s = NonZeroU32::new(50).expect("50 is not zero");
    let burst = NonZeroU32::new(200).expect("200 is not zero");
    RateLimiter::direct(Quota::per_second(per_s).allow_burst(burst))
}

/// Runs until the socket closes; then tells the role.
pub async fn run<R: Role>(mut session: Session, mut stream: AggregatedMessageStream, inbox: ConnInbox, mut role: R, limits: Limits, metrics: &Metrics) {
    let mut ping = tokio::time::interval(limits.heartbeat);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await; // the first tick is immediate
    let mut last_pong = Instant::now();
    let limiter = limits.rate_limits.then(frame_limiter);
    let mut flood = 0u32;
    let mut out: Vec<String> = Vec::new();
    let mut inbox = inbox;
    let kill = inbox.kill.clone();
    let close: Option<CloseReason> = loop {
        tokio::select! {
            biased;
            _ = kill.killed() => {
                info!("closing a connection that stopped reading");
                metrics.slow_consumers.inc();
                break Some(CloseReason { code: CloseCode::from(CLOSE_SLOW_CONSUMER), description: Some("too slow; resume".into()) });
            }
            frame = inbox.recv() => {
                let Some(frame) = frame else { break None };
                role.observe(&frame);
                match &frame {
                    Outbound::Close { code, reason } => {
                        break Some(CloseReason { code: CloseCode::from(*code), description: Some((*reason).into()) });
                    }
                    other => {
                        if let Some(text) = encode::encode(other) {
                            if !write(&mut session, &kill, text).await { break None; }
                        }
                    }
                }
            }
            msg = stream.next() => {
                match msg {
                    None => break None,
                    Some(Err(ProtocolError::Overflow)) => {
                        metrics.frames_rejected.inc();
                        break Some(CloseReason { code: CloseCode::Size, description: Some("message too large".into()) });
                    }
                    Some(Err(e)) => {
                        debug!(error = %e, "websocket protocol error");
                        break Some(CloseReason { code: CloseCode::Protocol, description: None });
                    }
                    Some(Ok(AggregatedMessage::Pong(_))) => last_pong = Instant::now(),
                    Some(Ok(AggregatedMessage::Ping(b))) => {
                        if session.pong(&b).await.is_err() { break None; }
                    }
                    Some(Ok(AggregatedMessage::Close(_))) => break None,
                    Some(Ok(m @ (AggregatedMessage::Text(_) | AggregatedMessage::Binary(_)))) => {
                        if let Some(l) = &limiter {
                            if l.check().is_err() {
                                flood += 1;
                                metrics.frames_rejected.inc();
                                if flood > FLOOD_CLOSE_AFTER {
                                    break Some(CloseReason { code: CloseCode::Policy, description: Some("rate limit".into()) });
                                }
                                let r = match &m { AggregatedMessage::Text(t) => R::ref_of(t), _ => None };
                                let e = ActorError::RateLimited { message: "slow down: too many messages", retry_after_ms: 1000 };
                                if !write(&mut session, &kill, encode::error_frame(r.as_ref(), &e)).await { break None; }
                                continue;
                            }
                            flood = 0;
                        }
                        metrics.frames_in.inc();
                        match m {
                            AggregatedMessage::Text(t) => role.on_text(&t, &mut out).await,
                            AggregatedMessage::Binary(b) => role.on_binary(b.len(), &mut out),
                            _ => {}
                        }
                        let mut gone = false;
                        for text in out.drain(..) {
                            if !write(&mut session, &kill, text).await { gone = true; break; }
                        }
                        if gone { break None; }
                    }
                }
            }
            _ = ping.tick() => {
                if last_pong.elapsed() > limits.heartbeat * 2 + limits.heartbeat / 2 {
                    info!("no pong for two heartbeats; dropping the connection");
                    metrics.heartbeat_drops.inc();
                    break Some(CloseReason { code: CloseCode::Away, description: Some("heartbeat timeout".into()) });
                }
                if session.ping(b"").await.is_err() { break None; }
            }
        }
    };
    role.closed();
    let close = close.or_else(|| {
        kill.is_killed().then(|| {
            metrics.slow_consumers.inc();
            CloseReason { code: CloseCode::from(CLOSE_SLOW_CONSUMER), description: Some("too slow; resume".into()) }
        })
    });
    if let Some(reason) = close {
        // Best effort: a peer that stopped reading may never take it.
        let _ = tokio::time::timeout(Duration::from_secs(1), session.close(Some(reason))).await;
    }
}

/// Writes one text frame, giving up when the actors decided this client is
/// too slow (so a stuck write never pins the loop).
async fn write(session: &mut Session, kill: &KillSignal, text: String) -> bool {
    tokio::select! {
        biased;
        _ = kill.killed() => false,
        r = session.text(text) => r.is_ok(),
    }
}

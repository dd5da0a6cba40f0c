//! The relay run's bookkeeping: what was sent when, what arrived where, and how late.
//!
//! Everything is indexed by `customer * total + k` in flat arrays of atomics, written by
//! the sender tasks and read by the reader tasks of any connection, so an agent can check
//! any message, also one misrouted to it, without a lock on the hot path. The observers
//! here are installed on each connection at connect time and run on its reader task.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::time::Instant;

use crate::client::{Frame, Observer, SAY_REF_BASE};
use crate::stats::Tally;

/// Shared bookkeeping of the measured run, indexed by `customer * total + k`.
pub(super) struct Probe {
    t0: Instant,
    pairs: usize,
    /// Messages per customer, warm-up included.
    pub(super) total: usize,
    /// Messages per customer that are warm-up (`k < warm` do not count).
    warm: usize,
    /// Send instant of each message (just before the write), ns since `t0` plus one
    /// (0 = not sent).
    send_ns: Vec<AtomicU64>,
    /// How late each send was against its schedule, in µs.
    lag_us: Vec<AtomicU32>,
    got: Vec<AtomicBool>,
    /// Highest `k` an agent has seen per customer (−1: none).
    last_k: Vec<AtomicI64>,
    /// Each customer's session, set once setup is done.
    sessions: OnceLock<Vec<Option<String>>>,
    sent_win: AtomicU64,
    recv_win: AtomicU64,
    recv_warm: AtomicU64,
    acked_win: AtomicU64,
    errors_n: AtomicU64,
    dup: AtomicU64,
    reordered: AtomicU64,
    reordered_k: AtomicU64,
    missing_seq: AtomicU64,
    misrouted: AtomicU64,
    foreign: AtomicU64,
    errors: Mutex<Tally>,
    /// `t0` on the wall clock (Unix seconds), to line slow messages up with server logs.
    t0_unix: f64,
    /// Messages slower than this (ms, after the warm-up) are listed; 0: none.
    slow_ms: f64,
    /// (send instant in Unix seconds, latency ms) of the slow messages, at most [`MAX_SLOW`].
    slow: Mutex<Vec<(f64, f64)>>,
}

/// The slow-message list stops here, so a stalled server cannot fill the memory.
const MAX_SLOW: usize = 10_000;

impl Probe {
    pub(super) fn new(pairs: usize, total: usize, warm: usize) -> Probe {
        let n = pairs * total;
        Probe {
            t0: Instant::now(),
            pairs,
            total,
            warm,
            send_ns: (0..n).map(|_| AtomicU64::new(0)).collect(),
            lag_us: (0..n).map(|_| AtomicU32::new(0)).collect(),
            got: (0..n).map(|_| AtomicBool::new(false)).collect(),
            last_k: (0..pairs).map(|_| AtomicI64::new(-1)).collect(),
            sessions: OnceLock::new(),
            sent_win: AtomicU64::new(0),
            recv_win: AtomicU64::new(0),
            recv_warm: AtomicU64::new(0),
            acked_win: AtomicU64::new(0),
            errors_n: AtomicU64::new(0),
            dup: AtomicU64::new(0),
            reordered: AtomicU64::new(0),
            reordered_k: AtomicU64::new(0),
            missing_seq: AtomicU64::new(0),
            misrouted: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
            errors: Mutex::new(Tally::default()),
            t0_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            slow_ms: 0.0,
            slow: Mutex::default(),
        }
    }
    /// Lists every measured message slower than `ms` (see [`Probe::take_slow`]).
    pub(super) fn with_slow_log(mut self, ms: f64) -> Probe {
        self.slow_ms = ms;
        self
    }
    /// The slow messages so far, in arrival order: (send instant, Unix s; latency, ms).
    pub(super) fn take_slow(&self) -> Vec<(f64, f64)> {
        std::mem::take(&mut *self.slow.lock().unwrap_or_else(|e| e.into_inner()))
    }
    fn note_if_slow(&self, idx: usize, ms: f64) {
        if self.slow_ms <= 0.0 || ms < self.slow_ms {
            return;
        }
        let sent_s = (self.send_ns[idx].load(Ordering::Acquire).saturating_sub(1)) as f64 / 1e9;
        let mut slow = self.slow.lock().unwrap_or_else(|e| e.into_inner());
        if slow.len() < MAX_SLOW {
            slow.push((self.t0_unix + sent_s, ms));
        }
    }
    /// Records that message `k` of customer `i` is written now, `lag` after its
    /// schedule; returns whether it counts (sent after the warm-up).
    pub(super) fn record_send(
        &self,
        i: usize,
        k: usize,
        now: Instant,
        lag: std::time::Duration,
    ) -> bool {
        let idx = i * self.total + k;
        self.lag_us[idx].store(
            lag.as_micros().min(u128::from(u32::MAX)) as u32,
            Ordering::Relaxed,
        );
        let ns = now.saturating_duration_since(self.t0).as_nanos() as u64;
        self.send_ns[idx].store(ns + 1, Ordering::Release);
        let counts = k >= self.warm;
        if counts {
            self.sent_win.fetch_add(1, Ordering::Relaxed);
        }
        counts
    }

    /// Sets each customer's session (once, after setup) for the misrouting check.
    pub(super) fn set_sessions(&self, sessions: Vec<Option<String>>) {
        let _ = self.sessions.set(sessions);
    }

    /// Whether everything counted that was sent has arrived and been answered.
    pub(super) fn settled(&self) -> bool {
        let c = self.counts();
        c.received >= c.sent && c.acked + c.errors >= c.sent
    }

    /// The counters now.
    pub(super) fn counts(&self) -> Counts {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counts {
            sent: l(&self.sent_win),
            received: l(&self.recv_win),
            acked: l(&self.acked_win),
            errors: l(&self.errors_n),
            warmup_received: l(&self.recv_warm),
            duplicates: l(&self.dup),
            reordered: l(&self.reordered),
            reordered_k: l(&self.reordered_k),
            missing_seq: l(&self.missing_seq),
            misrouted: l(&self.misrouted),
            foreign: l(&self.foreign),
        }
    }

    /// Errors answered to sends, tallied by code.
    pub(super) fn errors(&self) -> Tally {
        self.errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(super) fn error(&self, code: &str) {
        self.errors_n.fetch_add(1, Ordering::Relaxed);
        self.errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(code);
    }
    fn ms_since_send(&self, idx: usize, at: Instant) -> Option<f64> {
        let s = self.send_ns[idx].load(Ordering::Acquire);
        if s == 0 {
            return None;
        }
        let now = at.saturating_duration_since(self.t0).as_nanos() as f64;
        Some((now - (s - 1) as f64) / 1e6)
    }
    fn lag_ms(&self, idx: usize) -> f64 {
        f64::from(self.lag_us[idx].load(Ordering::Relaxed)) / 1000.0
    }
}

/// The counters of a run (messages after the warm-up unless named otherwise).
#[derive(Debug, Clone, Copy)]
pub(super) struct Counts {
    pub sent: u64,
    pub received: u64,
    pub acked: u64,
    /// `error` answers to `say`, and failed writes.
    pub errors: u64,
    pub warmup_received: u64,
    pub duplicates: u64,
    /// A `seq` not above the last one this agent saw in that session.
    pub reordered: u64,
    /// A message number `k` below the highest seen for that customer.
    pub reordered_k: u64,
    pub missing_seq: u64,
    /// Arrived at an agent that does not serve its session, or with another session_id.
    pub misrouted: u64,
    /// `from: customer` messages that are not ours or were never sent.
    pub foreign: u64,
}

/// Parses `i:k:padding`.
pub fn parse_text(text: &str) -> Option<(usize, usize)> {
    let mut it = text.splitn(3, ':');
    let i = it.next()?.parse().ok()?;
    let k = it.next()?.parse().ok()?;
    it.next()?;
    Some((i, k))
}

/// The customer side: say acks and errors.
pub(super) struct CustomerObs {
    i: usize,
    probe: Arc<Probe>,
    ack_ms: Mutex<Vec<f64>>,
}

impl CustomerObs {
    pub(super) fn new(i: usize, probe: Arc<Probe>) -> CustomerObs {
        CustomerObs {
            i,
            probe,
            ack_ms: Mutex::default(),
        }
    }
    /// Ack latencies (ms) so far, moved out.
    pub(super) fn take_acks(&self) -> Vec<f64> {
        std::mem::take(&mut *self.ack_ms.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Observer for CustomerObs {
    fn on_reply(&self, reference: u64, f: &Frame<'_>, at: Instant) {
        let Some(k) = reference.checked_sub(SAY_REF_BASE).map(|k| k as usize) else {
            return;
        };
        let p = &self.probe;
        if k >= p.total {
            return;
        }
        if f.ty.as_str() == "ack" {
            if k >= p.warm {
                if let Some(ms) = p.ms_since_send(self.i * p.total + k, at) {
                    p.acked_win.fetch_add(1, Ordering::Relaxed);
                    self.ack_ms
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(ms);
                }
            }
        } else {
            p.error(&format!("say:{}", f.code().unwrap_or("error")));
        }
    }
}

/// The agent side: `message` events from customers.
pub(super) struct AgentObs {
    probe: Arc<Probe>,
    served: OnceLock<String>,
    inner: Mutex<AgentInner>,
}

impl AgentObs {
    pub(super) fn new(probe: Arc<Probe>) -> AgentObs {
        AgentObs {
            probe,
            served: OnceLock::new(),
            inner: Mutex::default(),
        }
    }
    /// Records the session this agent serves; false if it already had one.
    pub(super) fn serve(&self, session_id: String) -> bool {
        self.served.set(session_id).is_ok()
    }
    /// (latency from send, latency from schedule) samples in ms so far, moved out.
    pub(super) fn take_latencies(&self) -> (Vec<f64>, Vec<f64>) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        (
            std::mem::take(&mut inner.latency_ms),
            std::mem::take(&mut inner.from_schedule_ms),
        )
    }
}

#[derive(Default)]
struct AgentInner {
    latency_ms: Vec<f64>,
    from_schedule_ms: Vec<f64>,
    last_seq: HashMap<String, u64>,
}

impl Observer for AgentObs {
    fn on_event(&self, f: &Frame<'_>, at: Instant) {
        if f.ty.as_str() != "message" || f.from() != Some("customer") {
            return;
        }
        let p = &self.probe;
        let Some((i, k)) = f
            .text()
            .and_then(parse_text)
            .filter(|&(i, k)| i < p.pairs && k < p.total)
        else {
            p.foreign.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let idx = i * p.total + k;
        let Some(ms) = p.ms_since_send(idx, at) else {
            p.foreign.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if p.got[idx].swap(true, Ordering::AcqRel) {
            p.dup.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if p.last_k[i].fetch_max(k as i64, Ordering::AcqRel) > k as i64 {
            p.reordered_k.fetch_add(1, Ordering::Relaxed);
        }
        let sid = f.session_id();
        let expected = p.sessions.get().and_then(|s| s[i].as_deref());
        if sid.is_none() || sid != self.served.get().map(String::as_str) || sid != expected {
            p.misrouted.fetch_add(1, Ordering::Relaxed);
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match (sid, f.seq) {
            (Some(sid), Some(seq)) => match inner.last_seq.get_mut(sid) {
                Some(last) if seq <= *last => {
                    p.reordered.fetch_add(1, Ordering::Relaxed);
                }
                Some(last) => *last = seq,
                None => {
                    inner.last_seq.insert(sid.to_string(), seq);
                }
            },
            _ => {
                p.missing_seq.fetch_add(1, Ordering::Relaxed);
            }
        }
        if k >= p.warm {
            p.note_if_slow(idx, ms);
            inner.latency_ms.push(ms);
            inner.from_schedule_ms.push(ms + p.lag_ms(idx));
            p.recv_win.fetch_add(1, Ordering::Relaxed);
        } else {
            p.recv_warm.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The `say` frame for message `k` of customer `i`, from a template: the text is
/// `i:k:` padded with `x` to `size` characters (at least one), the ref `SAY_REF_BASE + k`.
pub fn say_frame(i: usize, k: usize, size: usize, pad: &str) -> String {
    let head = format!("{i}:{k}:");
    let fill = size.saturating_sub(head.len()).clamp(1, pad.len());
    let mut s = String::with_capacity(48 + head.len() + fill);
    s.push_str(r#"{"type":"say","text":""#);
    s.push_str(&head);
    s.push_str(&pad[..fill]);
    s.push_str(r#"","ref":"#);
    s.push_str(&(SAY_REF_BASE + k as u64).to_string());
    s.push('}');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::time::Duration;

    #[test]
    fn frames_and_texts_round_trip() {
        let pad = "x".repeat(100);
        let f = say_frame(12, 345, 20, &pad);
        let v: Value = serde_json::from_str(&f).expect("valid JSON");
        assert_eq!(v["type"], "say");
        assert_eq!(v["ref"], SAY_REF_BASE + 345);
        let text = v["text"].as_str().expect("text");
        assert_eq!(text.len(), 20);
        assert_eq!(parse_text(text), Some((12, 345)));
        // a size shorter than the head still pads one character (text must be non-empty
        // after the head, and the parser needs the third field)
        let short = say_frame(1, 2, 1, &pad);
        let v: Value = serde_json::from_str(&short).expect("valid JSON");
        assert_eq!(v["text"], "1:2:x");
        assert_eq!(parse_text("1:2"), None);
        assert_eq!(parse_text("a:2:x"), None);
    }

    fn frame(t: &str) -> Frame<'_> {
        serde_json::from_str(t).expect("valid frame")
    }

    #[test]
    fn slow_messages_after_the_warm_up_are_listed_with_their_send_time() {
        let p = Arc::new(Probe::new(1, 3, 1).with_slow_log(2.0));
        p.set_sessions(vec![Some("s-a".into())]);
        let agent = AgentObs::new(p.clone());
        assert!(agent.serve("s-a".into()));
        let t = p.t0;
        for k in 0..3 {
            p.record_send(0, k, t + Duration::from_millis(10 * k as u64), Duration::ZERO);
        }
        let msg = |k: usize| {
            format!(r#"{{"type":"message","from":"customer","text":"0:{k}:x","session_id":"s-a","seq":{}}}"#, k + 2)
        };
        agent.on_event(&frame(&msg(0)), t + Duration::from_millis(5)); // slow, but warm-up
        agent.on_event(&frame(&msg(1)), t + Duration::from_millis(11)); // 1 ms: quick
        agent.on_event(&frame(&msg(2)), t + Duration::from_millis(25)); // 5 ms: slow
        let slow = p.take_slow();
        assert_eq!(slow.len(), 1);
        let (sent, ms) = slow[0];
        assert!((sent - (p.t0_unix + 0.020)).abs() < 1e-6, "{sent} vs {}", p.t0_unix);
        assert!((ms - 5.0).abs() < 1e-6, "{ms}");
    }

    #[test]
    fn agent_counts_latency_dups_order_and_routing() {
        let p = Arc::new(Probe::new(2, 4, 1));
        p.set_sessions(vec![Some("s-a".into()), Some("s-b".into())]);
        let agent = AgentObs::new(p.clone());
        assert!(agent.serve("s-a".into()));
        assert!(!agent.serve("s-b".into()));
        let t = p.t0;
        for k in 0..4 {
            assert_eq!(p.record_send(0, k, t, Duration::from_micros(500)), k >= 1);
        }
        p.record_send(1, 1, t, Duration::ZERO);
        let at = t + Duration::from_millis(3);
        let msg = |k: usize, seq: u64, sid: &str| {
            format!(
                r#"{{"type":"message","from":"customer","text":"0:{k}:x","session_id":"{sid}","seq":{seq}}}"#
            )
        };
        agent.on_event(&frame(&msg(0, 2, "s-a")), at); // warm-up: not in the samples
        agent.on_event(&frame(&msg(2, 4, "s-a")), at);
        agent.on_event(&frame(&msg(1, 3, "s-a")), at); // k and seq go backwards
        agent.on_event(&frame(&msg(1, 3, "s-a")), at); // duplicate
        agent.on_event(&frame(&msg(3, 5, "s-b")), at); // wrong session
        agent.on_event(
            &frame(
                r#"{"type":"message","from":"customer","text":"1:0:x","session_id":"s-b","seq":9}"#,
            ),
            at,
        ); // never sent
        agent.on_event(
            &frame(
                r#"{"type":"message","from":"customer","text":"hello","session_id":"s-a","seq":9}"#,
            ),
            at,
        );
        agent.on_event(
            &frame(
                r#"{"type":"message","from":"agent","text":"0:3:x","session_id":"s-a","seq":9}"#,
            ),
            at,
        ); // not from a customer
        let c = p.counts();
        assert_eq!((c.sent, c.received, c.warmup_received), (4, 3, 1));
        assert_eq!(
            (
                c.duplicates,
                c.reordered,
                c.reordered_k,
                c.misrouted,
                c.foreign
            ),
            (1, 1, 1, 1, 2)
        );
        let (lat, sched) = agent.take_latencies();
        assert_eq!(lat, vec![3.0, 3.0, 3.0]);
        assert_eq!(sched, vec![3.5, 3.5, 3.5]);
    }

    #[test]
    fn customer_counts_acks_and_errors() {
        let p = Arc::new(Probe::new(1, 3, 1));
        let c = CustomerObs::new(0, p.clone());
        let t = p.t0;
        for k in 0..3 {
            p.record_send(0, k, t, Duration::ZERO);
        }
        let at = t + Duration::from_millis(2);
        c.on_reply(
            SAY_REF_BASE,
            &frame(r#"{"type":"ack","ref":100,"seq":2}"#),
            at,
        ); // warm-up
        c.on_reply(
            SAY_REF_BASE + 1,
            &frame(r#"{"type":"ack","ref":101,"seq":3}"#),
            at,
        );
        c.on_reply(
            SAY_REF_BASE + 2,
            &frame(r#"{"type":"error","ref":102,"code":"rate_limited"}"#),
            at,
        );
        c.on_reply(7, &frame(r#"{"type":"ack","ref":7}"#), at); // a setup ref: ignored
        let n = p.counts();
        assert_eq!((n.acked, n.errors), (1, 1));
        assert!(!p.settled(), "two counted sends, nothing received");
        assert_eq!(c.take_acks(), vec![2.0]);
        assert_eq!(
            serde_json::to_string(&p.errors()).expect("json"),
            r#"{"say:rate_limited":1}"#
        );
    }
}

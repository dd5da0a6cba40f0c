//! `relay`: P customer+agent pairs in live sessions; every customer says `--rate`
//! messages a second for `--warmup + --seconds`, and the agents receive them.
//!
//! This answers "how fast, how correctly and at what CPU cost does duet carry a
//! conversation": the latency from a customer's send to its agent's receipt, the
//! customer's ack latency (duet acks after storing), loss, duplicates, reordering,
//! misrouting, and delivered messages per server CPU-second (with and without the
//! database's processes).
//!
//! Why it is built this way:
//! - **Open loop.** Each customer sends on a fixed schedule (phases spread evenly over the
//!   period, `MissedTickBehavior::Burst`), so a slow server cannot slow the senders down
//!   and hide its own slowness. `latency_ms` runs from the instant just before the frame is
//!   written (as the Node load generator measures; a write that blocks on a full socket is
//!   inside it). `latency_from_schedule_ms` runs from the *scheduled* instant instead, so it
//!   also holds the load generator's own lateness (timer granularity ≈ 1 ms, a busy
//!   runtime): with no coordinated omission at all, it is the figure to trust when
//!   `client.send_lag_ms` (actual − scheduled) is large.
//! - **One clock.** Senders and receivers are in this process; latency is `Instant`
//!   (monotonic) receipt minus send, looked up by the message text `i:k:padding`.
//! - **Warm-up.** Only messages numbered `k >= rate * warmup` count; the CPU window starts
//!   when the warm-up ends and stops after the drain.
//! - **Cheap sends.** The frame is built from a per-customer template with no JSON
//!   serializer, and handed to the socket as one owned string.
//! - Bookkeeping is lock-free atomics indexed by `(customer, k)`, so an agent task can
//!   check any message, also one misrouted to it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{bail, Result};
use serde_json::{json, Value};
use tokio::time::{interval_at, sleep, sleep_until, Instant, MissedTickBehavior};

use crate::client::{Conn, ConnectOpts, Endpoint, Frame, Observer, SAY_REF_BASE};
use crate::pool::pool;
use crate::procfs;
use crate::report::{log, opt};
use crate::stats::{round, summarize, Tally};

/// Which database processes to add to the CPU figure.
#[derive(Debug, Clone)]
pub enum DbPids {
    None,
    List(Vec<u32>),
    /// Every process whose `comm` starts with `postgres`, found at the window's start and
    /// again at its end (backends that appear during the window count from zero).
    AutoPostgres,
}

/// Options of one relay run.
pub struct RelayOpts {
    /// Customers use the first, agents the last (two URLs: every message crosses nodes).
    pub endpoints: Vec<Endpoint>,
    pub tokens: Vec<String>,
    pub pairs: usize,
    pub rate: f64,
    pub seconds: f64,
    pub warmup: f64,
    pub drain: f64,
    pub size: usize,
    pub topic: String,
    pub concurrency: usize,
    pub pids: Vec<u32>,
    pub db_pids: DbPids,
    pub connect_timeout: Duration,
    pub join_timeout: Duration,
    pub local_addrs: Vec<IpAddr>,
}

const START_DELAY: Duration = Duration::from_millis(200);

/// Shared bookkeeping of the measured run, indexed by `customer * total + k`.
struct Probe {
    t0: Instant,
    pairs: usize,
    total: usize,
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
}

impl Probe {
    fn new(pairs: usize, total: usize, warm: usize) -> Probe {
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
        }
    }
    fn error(&self, code: &str) {
        self.errors_n.fetch_add(1, Ordering::Relaxed);
        self.errors.lock().unwrap_or_else(|e| e.into_inner()).add(code);
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

/// Parses `i:k:padding`.
pub fn parse_text(text: &str) -> Option<(usize, usize)> {
    let mut it = text.splitn(3, ':');
    let i = it.next()?.parse().ok()?;
    let k = it.next()?.parse().ok()?;
    it.next()?;
    Some((i, k))
}

/// The customer side: say acks and errors.
struct CustomerObs {
    i: usize,
    probe: Arc<Probe>,
    ack_ms: Mutex<Vec<f64>>,
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
                    self.ack_ms.lock().unwrap_or_else(|e| e.into_inner()).push(ms);
                }
            }
        } else {
            p.error(&format!("say:{}", f.code().unwrap_or("error")));
        }
    }
}

/// The agent side: `message` events from customers.
struct AgentObs {
    probe: Arc<Probe>,
    served: OnceLock<String>,
    inner: Mutex<AgentInner>,
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
        let Some((i, k)) = f.text().and_then(parse_text).filter(|&(i, k)| i < p.pairs && k < p.total) else {
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

struct CpuMark {
    server: Option<procfs::Snapshot>,
    db: std::collections::BTreeMap<u32, f64>,
    own: f64,
    machine: Option<(f64, f64)>,
    procs: HashMap<u32, (String, f64)>,
    at: Instant,
}

fn db_list(d: &DbPids, tck: f64) -> Vec<u32> {
    match d {
        DbPids::None => Vec::new(),
        DbPids::List(v) => v.clone(),
        DbPids::AutoPostgres => procfs::pids_with_comm_prefix("postgres", tck),
    }
}

fn mark(o: &RelayOpts, tck: f64) -> Result<CpuMark> {
    Ok(CpuMark {
        server: if o.pids.is_empty() { None } else { Some(procfs::snapshot(&o.pids, tck)?) },
        db: procfs::cpu_of_existing(&db_list(&o.db_pids, tck), tck),
        own: procfs::self_cpu_seconds(),
        machine: procfs::machine_cpu(tck),
        procs: procfs::all_procs(tck),
        at: Instant::now(),
    })
}

/// Runs the scenario; returns the result object and the table rows.
pub async fn run(o: RelayOpts) -> Result<(Value, Vec<(String, String)>)> {
    let tck = procfs::clk_tck();
    let p_n = o.pairs;
    if o.tokens.len() < p_n {
        bail!("--pairs {p_n} needs {p_n} agent tokens, the tokens file has {}", o.tokens.len());
    }
    let warm_n = (o.rate * o.warmup).round() as usize;
    let total_n = warm_n + (o.rate * o.seconds).round() as usize;
    if p_n.saturating_mul(total_n) > 20_000_000 {
        bail!("pairs × rate × (warmup + seconds) = {} messages: more than 20 million to track", p_n * total_n);
    }
    let probe = Arc::new(Probe::new(p_n, total_n, warm_n));
    let cust_ep = o.endpoints[0].clone();
    let agent_ep = o.endpoints[o.endpoints.len() - 1].clone();
    let opts_for = |i: usize| ConnectOpts {
        timeout: o.connect_timeout,
        local_addr: if o.local_addrs.is_empty() { None } else { Some(o.local_addrs[i % o.local_addrs.len()]) },
    };
    let t_setup = Instant::now();
    let overflows_before = procfs::listen_overflows();
    let mut setup_errors = Tally::default();

    // 1. agents connect and become available
    let agent_obs: Vec<Arc<AgentObs>> = (0..p_n)
        .map(|_| Arc::new(AgentObs { probe: probe.clone(), served: OnceLock::new(), inner: Mutex::default() }))
        .collect();
    let agents = {
        let (obs, toks, ep) = (agent_obs.clone(), o.tokens.clone(), agent_ep.clone());
        let opts: Vec<ConnectOpts> = (0..p_n).map(opts_for).collect();
        let jt = o.join_timeout;
        pool(p_n, o.concurrency, move |i| {
            let (ob, tok, ep, op) = (obs[i].clone(), toks[i].clone(), ep.clone(), opts[i].clone());
            async move {
                let mut a = Conn::agent(&ep, &tok, &op, ob).await.map_err(|f| format!("agent:{}", f.code))?;
                a.request(json!({"type": "available"}), 1, jt).await.map_err(|f| format!("available:{}", f.code))?;
                Ok::<Conn, String>(a)
            }
        })
        .await?
    };
    let mut agents: Vec<Option<Conn>> = agents
        .into_iter()
        .map(|r| r.map_err(|e| setup_errors.add(e)).ok())
        .collect();

    // 2. customers connect and join one queue
    let cust_obs: Vec<Arc<CustomerObs>> = (0..p_n)
        .map(|i| Arc::new(CustomerObs { i, probe: probe.clone(), ack_ms: Mutex::default() }))
        .collect();
    let customers = {
        let (obs, ep, topic) = (cust_obs.clone(), cust_ep.clone(), o.topic.clone());
        let opts: Vec<ConnectOpts> = (0..p_n).map(|i| opts_for(p_n + i)).collect();
        let jt = o.join_timeout;
        pool(p_n, o.concurrency, move |i| {
            let (ob, ep, op, topic) = (obs[i].clone(), ep.clone(), opts[i].clone(), topic.clone());
            async move {
                let mut c = Conn::customer(&ep, &op, ob).await.map_err(|f| format!("customer:{}", f.code))?;
                c.join(&format!("c-{i}"), &topic, jt).await.map_err(|f| format!("join:{}", f.code))?;
                Ok::<Conn, String>(c)
            }
        })
        .await?
    };
    let mut customers: Vec<Option<Conn>> = customers
        .into_iter()
        .map(|r| r.map_err(|e| setup_errors.add(e)).ok())
        .collect();
    let agents_ready = agents.iter().flatten().count();
    let customers_joined = customers.iter().flatten().count();
    log(format!("relay: {agents_ready} agents available, {customers_joined} customers waiting on topic {}", o.topic));

    // 3. every agent takes the next customer (all joins are done, so each take should win)
    let taken: Vec<(Option<Conn>, Option<String>, Vec<String>)> = {
        let slots: Vec<Arc<tokio::sync::Mutex<Option<Conn>>>> =
            agents.drain(..).map(|a| Arc::new(tokio::sync::Mutex::new(a))).collect();
        let (s2, topic, jt) = (slots.clone(), o.topic.clone(), o.join_timeout);
        let res = pool(p_n, o.concurrency, move |i| {
            let (slot, topic) = (s2[i].clone(), topic.clone());
            async move {
                let mut guard = slot.lock().await;
                let mut errs = Vec::new();
                let Some(a) = guard.as_mut() else { return (None, errs) };
                for attempt in 0..3u64 {
                    match a.take(&topic, 2 + attempt, jt).await {
                        Ok(sid) => return (Some(sid), errs),
                        Err(f) => {
                            errs.push(format!("take:{}", f.code));
                            if f.code != "conflict" && f.code != "not_found" {
                                break;
                            }
                            sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                (None, errs)
            }
        })
        .await?;
        let mut out = Vec::new();
        for (slot, (sid, errs)) in slots.into_iter().zip(res) {
            let conn = Arc::try_unwrap(slot).ok().and_then(|m| m.into_inner());
            out.push((conn, sid, errs));
        }
        out
    };
    let mut agent_of_session: HashMap<String, usize> = HashMap::new();
    for (i, (conn, sid, errs)) in taken.into_iter().enumerate() {
        for e in errs {
            setup_errors.add(e);
        }
        if let Some(sid) = sid {
            if agent_obs[i].served.set(sid.clone()).is_err() {
                setup_errors.add("take:twice");
            }
            agent_of_session.insert(sid, i);
        }
        agents.push(conn);
    }
    let n_taken = agent_of_session.len();
    if n_taken == 0 {
        bail!("relay: no agent took a customer; setup errors: {setup_errors}");
    }

    // 4. every customer hears `assigned`
    let mut assigned = 0usize;
    let mut sessions: Vec<Option<String>> = vec![None; p_n];
    let assign_deadline = Instant::now() + Duration::from_secs(15);
    for (i, c) in customers.iter_mut().enumerate() {
        let Some(c) = c.as_mut() else { continue };
        let left = assign_deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        match c.wait_assigned(left).await {
            Ok(_) => assigned += 1,
            Err(f) => setup_errors.add(format!("assigned:{}", f.code)),
        }
        sessions[i] = c.state().session_id;
    }
    let active: Vec<usize> = (0..p_n)
        .filter(|&i| customers[i].is_some() && sessions[i].as_ref().is_some_and(|s| agent_of_session.contains_key(s)))
        .collect();
    let setup_s = t_setup.elapsed().as_secs_f64();
    let listen_overflows = match (overflows_before, procfs::listen_overflows()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    log(format!(
        "relay: {n_taken} taken, {assigned} assigned, {} active pairs (setup {setup_s:.1} s; errors {setup_errors})",
        active.len()
    ));
    if active.is_empty() {
        bail!("relay: no active pair; setup errors: {setup_errors}");
    }
    let _ = probe.sessions.set(sessions);

    // 5. the measured run: one sender task per active customer
    let period = Duration::from_secs_f64(1.0 / o.rate);
    let t_start = Instant::now() + START_DELAY;
    let warm_end = t_start + Duration::from_secs_f64(o.warmup);
    let pad: Arc<str> = "x".repeat(o.size.max(1)).into();
    let mut senders = Vec::new();
    for (idx, &i) in active.iter().enumerate() {
        let Some(mut c) = customers[i].take() else { continue };
        let phase = period.mul_f64(idx as f64 / active.len() as f64);
        let (probe, pad, size) = (probe.clone(), pad.clone(), o.size);
        senders.push(tokio::spawn(async move {
            let mut tick = interval_at(t_start + phase, period);
            tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
            let mut lag_ms = Vec::with_capacity(probe.total);
            for k in 0..probe.total {
                let scheduled = tick.tick().await;
                let frame = say_frame(i, k, size, &pad);
                let now = Instant::now();
                let idx = i * probe.total + k;
                let lag = now.saturating_duration_since(scheduled);
                probe.lag_us[idx].store(lag.as_micros().min(u32::MAX as u128) as u32, Ordering::Relaxed);
                let ns = now.saturating_duration_since(probe.t0).as_nanos() as u64;
                probe.send_ns[idx].store(ns + 1, Ordering::Release);
                if k >= probe.warm {
                    probe.sent_win.fetch_add(1, Ordering::Relaxed);
                    lag_ms.push(lag.as_secs_f64() * 1000.0);
                }
                if let Err(f) = c.send_text(frame).await {
                    probe.error(&format!("send:{}", f.code));
                    break;
                }
            }
            (c, lag_ms)
        }));
    }
    sleep_until(warm_end).await;
    let start = mark(&o, tck)?;
    log(format!("relay: warm-up over, measuring {} s ({} msg/s offered)", o.seconds, active.len() as f64 * o.rate));

    let mut lag_ms = Vec::new();
    let mut back = Vec::new();
    for s in senders {
        let (c, lags) = s.await?;
        lag_ms.extend(lags);
        back.push(c);
    }
    let send_end = Instant::now();
    let drain_until = send_end + Duration::from_secs_f64(o.drain);
    loop {
        let sent = probe.sent_win.load(Ordering::Relaxed);
        let settled = probe.recv_win.load(Ordering::Relaxed) >= sent
            && probe.acked_win.load(Ordering::Relaxed) + probe.errors_n.load(Ordering::Relaxed) >= sent;
        if settled || Instant::now() >= drain_until {
            break;
        }
        sleep(Duration::from_millis(20)).await;
    }
    let end = mark(&o, tck)?;
    let window_s = end.at.saturating_duration_since(start.at).as_secs_f64();

    // 6. teardown (after the measurement): agents end their sessions, everyone closes
    for (sid, &ai) in &agent_of_session {
        if let Some(a) = agents[ai].as_mut() {
            let _ = a.request(json!({"type": "end", "session_id": sid}), 10, Duration::from_secs(5)).await;
        }
    }
    for c in back.iter_mut().chain(customers.iter_mut().flatten()).chain(agents.iter_mut().flatten()) {
        c.close().await;
    }

    // figures
    let sent = probe.sent_win.load(Ordering::Relaxed);
    let received = probe.recv_win.load(Ordering::Relaxed);
    let acked = probe.acked_win.load(Ordering::Relaxed);
    let mut lat: Vec<f64> = Vec::new();
    let mut lat_sched: Vec<f64> = Vec::new();
    for a in &agent_obs {
        let mut inner = a.inner.lock().unwrap_or_else(|e| e.into_inner());
        lat.append(&mut inner.latency_ms);
        lat_sched.append(&mut inner.from_schedule_ms);
    }
    let mut ack: Vec<f64> = Vec::new();
    for c in &cust_obs {
        ack.append(&mut c.ack_ms.lock().unwrap_or_else(|e| e.into_inner()));
    }
    let latency = summarize(&mut lat);
    let latency_sched = summarize(&mut lat_sched);
    let ack_s = summarize(&mut ack);
    let lag = summarize(&mut lag_ms);
    let errors = probe.errors.lock().unwrap_or_else(|e| e.into_inner()).clone();

    let server_cpu = match (&start.server, &end.server) {
        (Some(a), Some(b)) => Some(b.cpu - a.cpu),
        _ => None,
    };
    let per_pid: serde_json::Map<String, Value> = match (&start.server, &end.server) {
        (Some(a), Some(b)) => b
            .per
            .iter()
            .map(|(pid, (_, c))| (pid.to_string(), json!(round(c - a.per.get(pid).map_or(0.0, |x| x.1), 3))))
            .collect(),
        _ => serde_json::Map::new(),
    };
    let db_cpu: Option<f64> = match &o.db_pids {
        DbPids::None => None,
        DbPids::List(_) => Some(end.db.iter().map(|(pid, c)| c - start.db.get(pid).copied().unwrap_or(*c)).sum()),
        DbPids::AutoPostgres => Some(end.db.iter().map(|(pid, c)| c - start.db.get(pid).copied().unwrap_or(0.0)).sum()),
    };
    let msgs_per = |cpu: f64| (cpu > 0.0).then(|| (received as f64 / cpu).round());
    let msgs_per_cpu_s = server_cpu.and_then(msgs_per);
    let msgs_per_cpu_s_with_db = match (server_cpu, db_cpu) {
        (Some(s), Some(d)) => msgs_per(s + d),
        _ => None,
    };
    let own_cpu = end.own - start.own;
    let pct = |cpu: f64| if window_s > 0.0 { round(cpu / window_s * 100.0, 1) } else { 0.0 };
    let mut exclude = o.pids.clone();
    exclude.extend(end.db.keys());
    exclude.push(std::process::id());
    let (others, top) = procfs::others_cpu(&start.procs, &end.procs, &exclude);
    let machine = match (start.machine, end.machine) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => json!({
            "busy_cpu_s": round(b1 - b0, 3),
            "busy_pct_of_all_cores": round((b1 - b0) / (t1 - t0) * 100.0, 1),
            "others_cpu_s": round(others, 2),
            "others_pct_of_one_core": pct(others),
            "others_top": top.iter().map(|(pid, comm, c)| json!({"pid": pid, "comm": comm, "cpu_s": round(*c, 2)})).collect::<Vec<_>>(),
        }),
        _ => Value::Null,
    };
    let delivered_per_s = if window_s > 0.0 { (received as f64 / window_s).round() } else { 0.0 };
    let lag_json = json!({"p50": lag.p50, "p99": lag.p99, "max": lag.max});

    let result = json!({
        "cross_node": o.endpoints.len() > 1,
        "topic": o.topic,
        "setup": {
            "agents_ready": agents_ready,
            "customers_joined": customers_joined,
            "taken": n_taken,
            "assigned": assigned,
            "active_pairs": active.len(),
            "errors": setup_errors,
            "setup_s": round(setup_s, 3),
            "listen_overflows": listen_overflows,
        },
        "target_msgs_per_s": active.len() as f64 * o.rate,
        "window_s": round(window_s, 3),
        "send_phase_s": round(send_end.saturating_duration_since(start.at).as_secs_f64(), 3),
        "sent": sent,
        "acked": acked,
        "received": received,
        "lost": sent as i64 - received as i64,
        "errors": errors,
        "duplicates": probe.dup.load(Ordering::Relaxed),
        "reordered": probe.reordered.load(Ordering::Relaxed),
        "reordered_k": probe.reordered_k.load(Ordering::Relaxed),
        "missing_seq": probe.missing_seq.load(Ordering::Relaxed),
        "misrouted": probe.misrouted.load(Ordering::Relaxed),
        "foreign": probe.foreign.load(Ordering::Relaxed),
        "warmup_received": probe.recv_warm.load(Ordering::Relaxed),
        "delivered_per_s": delivered_per_s,
        "latency_ms": latency,
        "latency_from_schedule_ms": latency_sched,
        "ack_ms": ack_s,
        "msgs_per_cpu_s": msgs_per_cpu_s,
        "msgs_per_cpu_s_with_db": msgs_per_cpu_s_with_db,
        "server": server_cpu.map(|c| json!({
            "cpu_s": round(c, 3),
            "cpu_s_per_pid": per_pid,
            "cpu_util_pct": pct(c),
            "msgs_per_cpu_s": msgs_per_cpu_s,
            "rss_end": end.server.as_ref().map(|s| s.rss),
        })),
        "db": db_cpu.map(|c| json!({
            "pids": end.db.keys().collect::<Vec<_>>(),
            "cpu_s": round(c, 3),
            "cpu_util_pct": pct(c),
            "msgs_per_cpu_s_with_db": msgs_per_cpu_s_with_db,
        })),
        "machine": machine,
        "client": {
            "cpu_s": round(own_cpu, 3),
            "cpu_util_pct": pct(own_cpu),
            "send_lag_ms": lag_json,
            // the field name render.js reads; for this load generator it is the send lag
            "event_loop_lag_ms": lag_json,
            "rss": procfs::self_rss(),
        },
        "clk_tck": tck,
    });

    let l = &latency;
    let rows = vec![
        ("cross-node".into(), if o.endpoints.len() > 1 { "yes (customers on url 1, agents on url 2)".into() } else { "no (one node)".to_string() }),
        ("active pairs".into(), format!("{} (setup {setup_s:.1} s, errors {setup_errors})", active.len())),
        ("target rate".into(), format!("{} msg/s", active.len() as f64 * o.rate)),
        ("sent / received / lost".into(), format!("{sent} / {received} / {}", sent as i64 - received as i64)),
        ("acked / errors".into(), format!("{acked} / {errors}")),
        (
            "dup / reordered (seq, k) / misrouted / foreign".into(),
            format!(
                "{} / {}, {} / {} / {}",
                result["duplicates"], result["reordered"], result["reordered_k"], result["misrouted"], result["foreign"]
            ),
        ),
        ("delivered".into(), format!("{delivered_per_s} msg/s over {window_s:.2} s")),
        (
            "latency send→agent ms p50/p90/p99/p99.9/max".into(),
            format!("{} / {} / {} / {} / {}", opt(l.p50), opt(l.p90), opt(l.p99), opt(l.p999), opt(l.max)),
        ),
        (
            "  from schedule (incl. loadgen lag)".into(),
            format!(
                "{} / {} / {} / {} / {}",
                opt(latency_sched.p50),
                opt(latency_sched.p90),
                opt(latency_sched.p99),
                opt(latency_sched.p999),
                opt(latency_sched.max)
            ),
        ),
        ("ack latency ms p50/p99/max".into(), format!("{} / {} / {}", opt(ack_s.p50), opt(ack_s.p99), opt(ack_s.max))),
        (
            "server CPU".into(),
            match server_cpu {
                Some(c) => format!("{c:.3} s ({} % of one core) {}", pct(c), Value::Object(per_pid.clone())),
                None => "- (no --pids)".into(),
            },
        ),
        ("delivered msgs per server CPU-s".into(), opt(msgs_per_cpu_s)),
        (
            "db CPU / msgs per CPU-s with db".into(),
            match db_cpu {
                Some(c) => format!("{c:.3} s ({} pids) / {}", end.db.len(), opt(msgs_per_cpu_s_with_db)),
                None => "- (no --db-pids)".into(),
            },
        ),
        (
            "machine".into(),
            format!("busy {} % of all cores; other processes {:.2} CPU-s", opt(machine.get("busy_pct_of_all_cores")), others),
        ),
        (
            "load generator".into(),
            format!("CPU {own_cpu:.3} s ({} %), send lag p99 {} ms, max {} ms", pct(own_cpu), opt(lag.p99), opt(lag.max)),
        ),
    ];
    Ok((result, rows))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}

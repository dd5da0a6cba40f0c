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
//! - Bookkeeping ([`probe`]) is lock-free atomics indexed by `(customer, k)`, so an agent
//!   task can check any message, also one misrouted to it.

mod probe;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use serde_json::{json, Value};
use tokio::time::{interval_at, sleep, sleep_until, Instant, MissedTickBehavior};

use crate::client::{hello_json, Conn, ConnectOpts, Endpoint};
use crate::pool::pool;
use crate::procfs;
use crate::report::{log, opt};
use crate::stats::{round, summarize, Summary, Tally};
use probe::{say_frame, AgentObs, CustomerObs, Probe};

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
    /// List messages slower than this many ms, with their send time (0: none).
    pub slow_ms: f64,
}

impl RelayOpts {
    fn connect_opts(&self, i: usize) -> ConnectOpts {
        let local_addr =
            (!self.local_addrs.is_empty()).then(|| self.local_addrs[i % self.local_addrs.len()]);
        ConnectOpts {
            timeout: self.connect_timeout,
            local_addr,
        }
    }
}

/// The first send is this far after setup, so every sender task is waiting by then.
const START_DELAY: Duration = Duration::from_millis(200);
/// How long customers get, together, to hear `assigned` after the takes.
const ASSIGN_WAIT: Duration = Duration::from_secs(15);

/// The connections after setup, and how setup went.
struct Pairs {
    agents: Vec<Option<Conn>>,
    customers: Vec<Option<Conn>>,
    agent_obs: Vec<Arc<AgentObs>>,
    cust_obs: Vec<Arc<CustomerObs>>,
    /// session id → index of the agent serving it
    agent_of_session: HashMap<String, usize>,
    /// customers whose session an agent took and that heard `assigned`
    active: Vec<usize>,
    setup: Value,
    errors: Tally,
}

/// Agents connect to `/admin/ws` and send `available`.
async fn connect_agents(
    o: &RelayOpts,
    obs: &[Arc<AgentObs>],
    errors: &mut Tally,
) -> Result<Vec<Option<Conn>>> {
    let ep = o.endpoints[o.endpoints.len() - 1].clone();
    let jobs: Vec<_> = (0..o.pairs)
        .map(|i| (obs[i].clone(), o.tokens[i].clone(), o.connect_opts(i)))
        .collect();
    let jt = o.join_timeout;
    let res = pool(o.pairs, o.concurrency, move |i| {
        let (ob, tok, op) = jobs[i].clone();
        let ep = ep.clone();
        async move {
            let mut a = Conn::agent(&ep, &tok, &op, ob)
                .await
                .map_err(|f| format!("agent:{}", f.code))?;
            a.request(json!({"type": "available"}), 1, jt)
                .await
                .map_err(|f| format!("available:{}", f.code))?;
            Ok::<Conn, String>(a)
        }
    })
    .await?;
    Ok(res
        .into_iter()
        .map(|r| r.map_err(|e| errors.add(e)).ok())
        .collect())
}

/// Customers connect to `/ws` and join the run's topic.
async fn join_customers(
    o: &RelayOpts,
    obs: &[Arc<CustomerObs>],
    errors: &mut Tally,
) -> Result<Vec<Option<Conn>>> {
    let ep = o.endpoints[0].clone();
    let jobs: Vec<_> = (0..o.pairs)
        .map(|i| (obs[i].clone(), o.connect_opts(o.pairs + i)))
        .collect();
    let (topic, jt) = (o.topic.clone(), o.join_timeout);
    let res = pool(o.pairs, o.concurrency, move |i| {
        let (ob, op) = jobs[i].clone();
        let (ep, topic) = (ep.clone(), topic.clone());
        async move {
            let mut c = Conn::customer(&ep, &op, ob)
                .await
                .map_err(|f| format!("customer:{}", f.code))?;
            c.join(&format!("c-{i}"), &topic, jt)
                .await
                .map_err(|f| format!("join:{}", f.code))?;
            Ok::<Conn, String>(c)
        }
    })
    .await?;
    Ok(res
        .into_iter()
        .map(|r| r.map_err(|e| errors.add(e)).ok())
        .collect())
}

/// Every agent takes the next customer (all joins are done, so each take should win;
/// `conflict`/`not_found` are retried twice). Returns the agents and the sessions taken.
async fn take_all(
    o: &RelayOpts,
    agents: Vec<Option<Conn>>,
    errors: &mut Tally,
) -> Result<(Vec<Option<Conn>>, Vec<Option<String>>)> {
    let slots: Vec<Arc<tokio::sync::Mutex<Option<Conn>>>> = agents
        .into_iter()
        .map(|a| Arc::new(tokio::sync::Mutex::new(a)))
        .collect();
    let (jobs, topic, jt) = (slots.clone(), o.topic.clone(), o.join_timeout);
    let res = pool(o.pairs, o.concurrency, move |i| {
        let (slot, topic) = (jobs[i].clone(), topic.clone());
        async move {
            let mut guard = slot.lock().await;
            let mut errs = Vec::new();
            let Some(a) = guard.as_mut() else {
                return (None, errs);
            };
            for attempt in 0..3u64 {
                match a.take(&topic, 2 + attempt, jt).await {
                    Ok(sid) => return (Some(sid), errs),
                    Err(f) => {
                        let retry = f.code == "conflict" || f.code == "not_found";
                        errs.push(format!("take:{}", f.code));
                        if !retry {
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
    let mut sessions = Vec::new();
    for (sid, errs) in res {
        for e in errs {
            errors.add(e);
        }
        sessions.push(sid);
    }
    // the pool's jobs are done and dropped: each slot has one owner again
    let agents = slots
        .into_iter()
        .map(|s| Arc::try_unwrap(s).ok().and_then(|m| m.into_inner()))
        .collect();
    Ok((agents, sessions))
}

/// Connects and pairs everyone: agents available, customers waiting, takes, `assigned`.
async fn setup(o: &RelayOpts, probe: &Arc<Probe>) -> Result<Pairs> {
    let t0 = Instant::now();
    let overflows_before = procfs::listen_overflows();
    let mut errors = Tally::default();
    let agent_obs: Vec<Arc<AgentObs>> = (0..o.pairs)
        .map(|_| Arc::new(AgentObs::new(probe.clone())))
        .collect();
    let cust_obs: Vec<Arc<CustomerObs>> = (0..o.pairs)
        .map(|i| Arc::new(CustomerObs::new(i, probe.clone())))
        .collect();

    let agents = connect_agents(o, &agent_obs, &mut errors).await?;
    let mut customers = join_customers(o, &cust_obs, &mut errors).await?;
    let agents_ready = agents.iter().flatten().count();
    let customers_joined = customers.iter().flatten().count();
    log(format!(
        "relay: {agents_ready} agents available, {customers_joined} customers waiting on topic {}",
        o.topic
    ));

    let (agents, taken) = take_all(o, agents, &mut errors).await?;
    let mut agent_of_session = HashMap::new();
    for (i, sid) in taken.into_iter().enumerate() {
        if let Some(sid) = sid {
            if !agent_obs[i].serve(sid.clone()) {
                errors.add("take:twice");
            }
            if agent_of_session.insert(sid, i).is_some() {
                errors.add("take:same_session_twice");
            }
        }
    }
    if agent_of_session.is_empty() {
        bail!("relay: no agent took a customer; setup errors: {errors}");
    }

    let mut assigned = 0usize;
    let mut sessions: Vec<Option<String>> = vec![None; o.pairs];
    let deadline = Instant::now() + ASSIGN_WAIT;
    for (i, c) in customers.iter_mut().enumerate() {
        let Some(c) = c.as_mut() else { continue };
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        match c.wait_assigned(left).await {
            Ok(_) => assigned += 1,
            Err(f) => errors.add(format!("assigned:{}", f.code)),
        }
        sessions[i] = c.state().session_id;
    }
    let active: Vec<usize> = (0..o.pairs)
        .filter(|&i| {
            customers[i].is_some()
                && sessions[i]
                    .as_ref()
                    .is_some_and(|s| agent_of_session.contains_key(s))
        })
        .collect();
    let setup_s = t0.elapsed().as_secs_f64();
    let listen_overflows = match (overflows_before, procfs::listen_overflows()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    log(format!(
        "relay: {} taken, {assigned} assigned, {} active pairs (setup {setup_s:.1} s; errors {errors})",
        agent_of_session.len(),
        active.len()
    ));
    if active.is_empty() {
        bail!("relay: no active pair; setup errors: {errors}");
    }
    probe.set_sessions(sessions);
    let server_hello = customers
        .iter()
        .flatten()
        .next()
        .map_or(Value::Null, |c| hello_json(&c.state()));
    let setup = json!({
        "agents_ready": agents_ready,
        "customers_joined": customers_joined,
        "taken": agent_of_session.len(),
        "assigned": assigned,
        "active_pairs": active.len(),
        "errors": errors,
        "setup_s": round(setup_s, 3),
        "listen_overflows": listen_overflows,
        "server_hello": server_hello,
    });
    Ok(Pairs {
        agents,
        customers,
        agent_obs,
        cust_obs,
        agent_of_session,
        active,
        setup,
        errors,
    })
}

/// CPU (and the machine's other processes) at one edge of the measuring window.
struct CpuMark {
    server: Option<procfs::Snapshot>,
    db: BTreeMap<u32, f64>,
    own: f64,
    machine: Option<(f64, f64)>,
    procs: HashMap<u32, (String, f64)>,
    at: Instant,
}

impl CpuMark {
    fn now(o: &RelayOpts, tck: f64) -> Result<CpuMark> {
        let db_pids = match &o.db_pids {
            DbPids::None => Vec::new(),
            DbPids::List(v) => v.clone(),
            DbPids::AutoPostgres => procfs::pids_with_comm_prefix("postgres", tck),
        };
        Ok(CpuMark {
            server: if o.pids.is_empty() {
                None
            } else {
                Some(procfs::snapshot(&o.pids, tck)?)
            },
            db: procfs::cpu_of_existing(&db_pids, tck),
            own: procfs::self_cpu_seconds(),
            machine: procfs::machine_cpu(tck),
            procs: procfs::all_procs(tck),
            at: Instant::now(),
        })
    }
}

/// What the measured phase leaves behind.
struct Measured {
    start: CpuMark,
    end: CpuMark,
    send_end: Instant,
    /// actual − scheduled send instant of each counted message, ms
    lag_ms: Vec<f64>,
    /// the active customers' connections, back from their sender tasks
    senders: Vec<Conn>,
}

/// The open-loop send phase: one sender task per active customer, then the drain.
async fn measure(
    o: &RelayOpts,
    probe: &Arc<Probe>,
    pairs: &mut Pairs,
    tck: f64,
) -> Result<Measured> {
    let period = Duration::from_secs_f64(1.0 / o.rate);
    let t_start = Instant::now() + START_DELAY;
    let warm_end = t_start + Duration::from_secs_f64(o.warmup);
    let pad: Arc<str> = "x".repeat(o.size.max(1)).into();
    let n_active = pairs.active.len();
    let mut tasks = Vec::new();
    for (slot, &i) in pairs.active.iter().enumerate() {
        let Some(mut c) = pairs.customers[i].take() else {
            continue;
        };
        let phase = period.mul_f64(slot as f64 / n_active as f64);
        let (probe, pad, size) = (probe.clone(), pad.clone(), o.size);
        tasks.push(tokio::spawn(async move {
            let mut tick = interval_at(t_start + phase, period);
            tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
            let mut lag_ms = Vec::with_capacity(probe.total);
            for k in 0..probe.total {
                let scheduled = tick.tick().await;
                let frame = say_frame(i, k, size, &pad);
                let now = Instant::now();
                let lag = now.saturating_duration_since(scheduled);
                if probe.record_send(i, k, now, lag) {
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
    let start = CpuMark::now(o, tck)?;
    log(format!(
        "relay: warm-up over, measuring {} s ({} msg/s offered)",
        o.seconds,
        n_active as f64 * o.rate
    ));

    let mut lag_ms = Vec::new();
    let mut senders = Vec::new();
    for t in tasks {
        let (c, lags) = t.await?;
        lag_ms.extend(lags);
        senders.push(c);
    }
    let send_end = Instant::now();
    let drain_until = send_end + Duration::from_secs_f64(o.drain);
    while !probe.settled() && Instant::now() < drain_until {
        sleep(Duration::from_millis(20)).await;
    }
    let end = CpuMark::now(o, tck)?;
    Ok(Measured {
        start,
        end,
        send_end,
        lag_ms,
        senders,
    })
}

/// After the measurement: agents end their sessions, everyone closes.
async fn teardown(pairs: &mut Pairs, senders: &mut [Conn]) {
    for (sid, &ai) in &pairs.agent_of_session {
        if let Some(a) = pairs.agents[ai].as_mut() {
            let _ = a
                .request(
                    json!({"type": "end", "session_id": sid}),
                    10,
                    Duration::from_secs(5),
                )
                .await;
        }
    }
    for c in senders
        .iter_mut()
        .chain(pairs.customers.iter_mut().flatten())
        .chain(pairs.agents.iter_mut().flatten())
    {
        c.close().await;
    }
}

fn fmt_summary(s: &Summary) -> String {
    format!(
        "{} / {} / {} / {} / {}",
        opt(s.p50),
        opt(s.p90),
        opt(s.p99),
        opt(s.p999),
        opt(s.max)
    )
}

/// Turns the run into the result object and the table rows.
fn figures(
    o: &RelayOpts,
    probe: &Probe,
    pairs: &Pairs,
    m: &mut Measured,
    tck: f64,
) -> (Value, Vec<(String, String)>) {
    let (start, end) = (&m.start, &m.end);
    let window_s = end.at.saturating_duration_since(start.at).as_secs_f64();
    let c = probe.counts();
    let (mut lat, mut lat_sched, mut ack) = (Vec::new(), Vec::new(), Vec::new());
    for a in &pairs.agent_obs {
        let (mut l, mut s) = a.take_latencies();
        lat.append(&mut l);
        lat_sched.append(&mut s);
    }
    for cu in &pairs.cust_obs {
        ack.append(&mut cu.take_acks());
    }
    let latency = summarize(&mut lat);
    let latency_sched = summarize(&mut lat_sched);
    let ack_s = summarize(&mut ack);
    let lag = summarize(&mut m.lag_ms);
    let errors = probe.errors();

    let server_cpu = match (&start.server, &end.server) {
        (Some(a), Some(b)) => Some(b.cpu - a.cpu),
        _ => None,
    };
    let per_pid: serde_json::Map<String, Value> = match (&start.server, &end.server) {
        (Some(a), Some(b)) => b
            .per
            .iter()
            .map(|(pid, (_, cpu))| {
                (
                    pid.to_string(),
                    json!(round(cpu - a.per.get(pid).map_or(0.0, |x| x.1), 3)),
                )
            })
            .collect(),
        _ => serde_json::Map::new(),
    };
    // a listed PID that appears only at the end contributes nothing; an auto-found one
    // that appears during the window (a new backend) counts from zero
    let db_cpu: Option<f64> = match &o.db_pids {
        DbPids::None => None,
        DbPids::List(_) => Some(
            end.db
                .iter()
                .map(|(pid, cpu)| cpu - start.db.get(pid).copied().unwrap_or(*cpu))
                .sum(),
        ),
        DbPids::AutoPostgres => Some(
            end.db
                .iter()
                .map(|(pid, cpu)| cpu - start.db.get(pid).copied().unwrap_or(0.0))
                .sum(),
        ),
    };
    let received = c.received;
    let msgs_per = |cpu: f64| (cpu > 0.0).then(|| (received as f64 / cpu).round());
    let msgs_per_cpu_s = server_cpu.and_then(msgs_per);
    let msgs_per_cpu_s_with_db = match (server_cpu, db_cpu) {
        (Some(s), Some(d)) => msgs_per(s + d),
        _ => None,
    };
    let own_cpu = end.own - start.own;
    let pct = |cpu: f64| {
        if window_s > 0.0 {
            round(cpu / window_s * 100.0, 1)
        } else {
            0.0
        }
    };
    let mut exclude = o.pids.clone();
    exclude.extend(end.db.keys().copied());
    exclude.push(std::process::id());
    let (others, top) = procfs::others_cpu(&start.procs, &end.procs, &exclude);
    let machine = match (start.machine, end.machine) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => json!({
            "busy_cpu_s": round(b1 - b0, 3),
            "busy_pct_of_all_cores": round((b1 - b0) / (t1 - t0) * 100.0, 1),
            "others_cpu_s": round(others, 2),
            "others_pct_of_one_core": pct(others),
            "others_top": top.iter().map(|(pid, comm, cpu)| json!({"pid": pid, "comm": comm, "cpu_s": round(*cpu, 2)})).collect::<Vec<_>>(),
        }),
        _ => Value::Null,
    };
    let delivered_per_s = if window_s > 0.0 {
        (received as f64 / window_s).round()
    } else {
        0.0
    };
    let lag_json = json!({"p50": lag.p50, "p99": lag.p99, "max": lag.max});
    let offered = pairs.active.len() as f64 * o.rate;
    let lost = c.sent as i64 - c.received as i64;

    let result = json!({
        "cross_node": o.endpoints.len() > 1,
        "topic": o.topic,
        "setup": pairs.setup,
        "server_hello": pairs.setup["server_hello"],
        "target_msgs_per_s": offered,
        "window_s": round(window_s, 3),
        "send_phase_s": round(m.send_end.saturating_duration_since(start.at).as_secs_f64(), 3),
        "sent": c.sent,
        "acked": c.acked,
        "received": c.received,
        "lost": lost,
        "errors": errors,
        "duplicates": c.duplicates,
        "reordered": c.reordered,
        "reordered_k": c.reordered_k,
        "missing_seq": c.missing_seq,
        "misrouted": c.misrouted,
        "foreign": c.foreign,
        "warmup_received": c.warmup_received,
        "delivered_per_s": delivered_per_s,
        "latency_ms": latency,
        "latency_from_schedule_ms": latency_sched,
        "ack_ms": ack_s,
        "slow": (o.slow_ms > 0.0).then(|| {
            let mut slow = probe.take_slow();
            slow.sort_by(|a, b| a.0.total_cmp(&b.0));
            slow.iter().map(|&(t, ms)| json!([round(t, 4), round(ms, 3)])).collect::<Vec<_>>()
        }),
        "msgs_per_cpu_s": msgs_per_cpu_s,
        "msgs_per_cpu_s_with_db": msgs_per_cpu_s_with_db,
        "server": server_cpu.map(|cpu| json!({
            "cpu_s": round(cpu, 3),
            "cpu_s_per_pid": per_pid,
            "cpu_util_pct": pct(cpu),
            "msgs_per_cpu_s": msgs_per_cpu_s,
            "rss_end": end.server.as_ref().map(|s| s.rss),
        })),
        "db": db_cpu.map(|cpu| json!({
            "pids": end.db.keys().collect::<Vec<_>>(),
            "cpu_s": round(cpu, 3),
            "cpu_util_pct": pct(cpu),
            "msgs_per_cpu_s_with_db": msgs_per_cpu_s_with_db,
        })),
        "machine": machine,
        "client": {
            "cpu_s": round(own_cpu, 3),
            "cpu_util_pct": pct(own_cpu),
            "send_lag_ms": lag_json,
            // the field render.js reads; for this load generator it is the send lag
            "event_loop_lag_ms": lag_json,
            "rss": procfs::self_rss(),
        },
        "clk_tck": tck,
    });

    let cross = if o.endpoints.len() > 1 {
        "yes (customers on url 1, agents on url 2)"
    } else {
        "no (one node)"
    };
    let setup_s = pairs.setup["setup_s"].as_f64().unwrap_or(0.0);
    let rows: Vec<(&str, String)> = vec![
        ("cross-node", cross.to_string()),
        (
            "active pairs",
            format!(
                "{} (setup {setup_s:.1} s, errors {})",
                pairs.active.len(),
                pairs.errors
            ),
        ),
        ("target rate", format!("{offered} msg/s")),
        (
            "sent / received / lost",
            format!("{} / {} / {lost}", c.sent, c.received),
        ),
        ("acked / errors", format!("{} / {errors}", c.acked)),
        (
            "dup / reordered (seq, k) / misrouted / foreign",
            format!(
                "{} / {}, {} / {} / {}",
                c.duplicates, c.reordered, c.reordered_k, c.misrouted, c.foreign
            ),
        ),
        (
            "delivered",
            format!("{delivered_per_s} msg/s over {window_s:.2} s"),
        ),
        (
            "latency send→agent ms p50/p90/p99/p99.9/max",
            fmt_summary(&latency),
        ),
        (
            "  from schedule (incl. loadgen lag)",
            fmt_summary(&latency_sched),
        ),
        (
            "ack latency ms p50/p99/max",
            format!(
                "{} / {} / {}",
                opt(ack_s.p50),
                opt(ack_s.p99),
                opt(ack_s.max)
            ),
        ),
        (
            "server CPU",
            match server_cpu {
                Some(cpu) => format!(
                    "{cpu:.3} s ({} % of one core) {}",
                    pct(cpu),
                    Value::Object(per_pid)
                ),
                None => "- (no --pids)".into(),
            },
        ),
        ("delivered msgs per server CPU-s", opt(msgs_per_cpu_s)),
        (
            "db CPU / msgs per CPU-s with db",
            match db_cpu {
                Some(cpu) => format!(
                    "{cpu:.3} s ({} pids) / {}",
                    end.db.len(),
                    opt(msgs_per_cpu_s_with_db)
                ),
                None => "- (no --db-pids)".into(),
            },
        ),
        (
            "machine",
            format!(
                "busy {} % of all cores; other processes {others:.2} CPU-s",
                opt(machine.get("busy_pct_of_all_cores"))
            ),
        ),
        (
            "load generator",
            format!(
                "CPU {own_cpu:.3} s ({} %), send lag p99 {} ms, max {} ms",
                pct(own_cpu),
                opt(lag.p99),
                opt(lag.max)
            ),
        ),
    ];
    (
        result,
        rows.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
    )
}

/// Runs the scenario; returns the result object and the table rows.
pub async fn run(o: RelayOpts) -> Result<(Value, Vec<(String, String)>)> {
    let tck = procfs::clk_tck();
    if o.tokens.len() < o.pairs {
        bail!(
            "--pairs {} needs {} agent tokens, the tokens file has {}",
            o.pairs,
            o.pairs,
            o.tokens.len()
        );
    }
    let warm_n = (o.rate * o.warmup).round() as usize;
    let total_n = warm_n + (o.rate * o.seconds).round() as usize;
    let tracked = o.pairs.saturating_mul(total_n);
    if tracked > 20_000_000 {
        bail!(
            "pairs × rate × (warmup + seconds) = {tracked} messages: more than 20 million to track"
        );
    }
    let probe = Arc::new(Probe::new(o.pairs, total_n, warm_n).with_slow_log(o.slow_ms));
    let mut pairs = setup(&o, &probe).await?;
    let mut m = measure(&o, &probe, &mut pairs, tck).await?;
    let out = figures(&o, &probe, &pairs, &mut m, tck);
    teardown(&mut pairs, &mut m.senders).await;
    Ok(out)
}

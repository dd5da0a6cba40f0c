//! `idle`: N customers connect, join one queue and wait.
//!
//! This answers "what does a waiting customer cost the server": resident memory per
//! waiting customer (server VmRSS after the hold minus before, over the customers that
//! joined), how fast customers are admitted (joins per second at `--concurrency`
//! operations in flight), and the server CPU that admission took. A short pre-warm
//! (customers that connect, join and leave) runs first so the baseline already contains
//! code paths, pools and allocator arenas that the first customers would otherwise pay
//! for. RSS wanders (allocators, lazy frees), so each read is the median of three reads
//! 500 ms apart. `positions_ok` checks FIFO admission: a fresh queue must hand out the
//! positions 1..N exactly once each.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use serde_json::{json, Value};
use tokio::time::{sleep, Instant};

use crate::client::{hello_json, Conn, ConnectOpts, Endpoint, Quiet};
use crate::pool::pool;
use crate::procfs::{self, Snapshot};
use crate::report::{kib, log, mib, opt};
use crate::stats::{round, Tally};

/// Options of one idle run.
pub struct IdleOpts {
    pub endpoints: Vec<Endpoint>,
    pub n: usize,
    pub concurrency: usize,
    pub hold: Duration,
    /// The queue the customers join (a fresh one, so positions start at 1).
    pub topic: String,
    pub prewarm: usize,
    pub pids: Vec<u32>,
    pub connect_timeout: Duration,
    pub join_timeout: Duration,
    pub local_addrs: Vec<IpAddr>,
}

struct Steady {
    rss: u64,
    samples: Vec<u64>,
    cpu: f64,
}

/// Median RSS of `k` snapshots `gap` apart (and the CPU of the last one).
async fn steady(pids: &[u32], tck: f64, k: usize, gap: Duration) -> Result<Steady> {
    let mut samples = Vec::with_capacity(k);
    let mut last = Snapshot::default();
    for i in 0..k {
        if i > 0 {
            sleep(gap).await;
        }
        last = procfs::snapshot(pids, tck)?;
        samples.push(last.rss);
    }
    let mut sorted = samples.clone();
    sorted.sort_unstable();
    Ok(Steady {
        rss: sorted[sorted.len() / 2],
        samples,
        cpu: last.cpu,
    })
}

struct Outcome {
    conn: Option<Conn>,
    position: Option<u64>,
    joined: bool,
    failure: Option<String>,
}

/// Connects and joins one customer.
async fn one(
    ep: Endpoint,
    opts: ConnectOpts,
    name: String,
    topic: String,
    join_timeout: Duration,
) -> Outcome {
    let mut c = match Conn::customer(&ep, &opts, Arc::new(Quiet)).await {
        Ok(c) => c,
        Err(f) => {
            return Outcome {
                conn: None,
                position: None,
                joined: false,
                failure: Some(format!("connect:{}", f.code)),
            }
        }
    };
    match c.join(&name, &topic, join_timeout).await {
        Ok(s) => Outcome {
            conn: Some(c),
            position: s.position,
            joined: true,
            failure: None,
        },
        Err(f) => Outcome {
            conn: Some(c),
            position: None,
            joined: false,
            failure: Some(format!("join:{}", f.code)),
        },
    }
}

/// Whether the positions handed out are exactly 1..=n, each once (all present).
pub fn positions_ok(positions: &[Option<u64>]) -> bool {
    let mut p: Vec<u64> = match positions.iter().copied().collect::<Option<Vec<u64>>>() {
        Some(p) => p,
        None => return false,
    };
    p.sort_unstable();
    p.iter().enumerate().all(|(i, &v)| v == i as u64 + 1)
}

/// Runs the scenario; returns the result object and the table rows.
pub async fn run(o: IdleOpts) -> Result<(Value, Vec<(String, String)>)> {
    let tck = procfs::clk_tck();
    let o = Arc::new(o);
    let opts_for = {
        let o = o.clone();
        move |i: usize| ConnectOpts {
            timeout: o.connect_timeout,
            local_addr: if o.local_addrs.is_empty() {
                None
            } else {
                Some(o.local_addrs[i % o.local_addrs.len()])
            },
        }
    };
    let opts_for = Arc::new(opts_for);

    if o.prewarm > 0 {
        log(format!(
            "idle: pre-warm with {} customers (topic {}-warm)",
            o.prewarm, o.topic
        ));
        let (o2, of) = (o.clone(), opts_for.clone());
        let warm = pool(o.prewarm, o.concurrency, move |i| {
            let ep = o2.endpoints[i % o2.endpoints.len()].clone();
            one(
                ep,
                of(i),
                format!("warm-{i}"),
                format!("{}-warm", o2.topic),
                o2.join_timeout,
            )
        })
        .await?;
        let warm_ok = warm.iter().filter(|w| w.joined).count();
        for mut w in warm {
            if let Some(c) = w.conn.as_mut() {
                c.close().await;
            }
        }
        log(format!(
            "idle: pre-warm {warm_ok}/{} joined; closed, waiting 3 s",
            o.prewarm
        ));
        sleep(Duration::from_secs(3)).await;
    }

    let has_pids = !o.pids.is_empty();
    let before = if has_pids {
        Some(steady(&o.pids, tck, 3, Duration::from_millis(500)).await?)
    } else {
        None
    };

    let overflows_before = procfs::listen_overflows();
    let connected = Arc::new(AtomicUsize::new(0));
    let joined_n = Arc::new(AtomicUsize::new(0));
    let failed_n = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let progress = {
        let (c, j, f) = (connected.clone(), joined_n.clone(), failed_n.clone());
        tokio::spawn(async move {
            loop {
                sleep(Duration::from_secs(2)).await;
                log(format!(
                    "idle: {} connected, {} joined, {} failed ({:.1} s)",
                    c.load(Ordering::Relaxed),
                    j.load(Ordering::Relaxed),
                    f.load(Ordering::Relaxed),
                    t0.elapsed().as_secs_f64()
                ));
            }
        })
    };
    log(format!(
        "idle: opening {} customers on topic {} ({} in flight)",
        o.n, o.topic, o.concurrency
    ));
    let outcomes = {
        let (o2, of) = (o.clone(), opts_for.clone());
        let (c, j, f) = (connected.clone(), joined_n.clone(), failed_n.clone());
        pool(o.n, o.concurrency, move |i| {
            let ep = o2.endpoints[i % o2.endpoints.len()].clone();
            let fut = one(
                ep,
                of(i),
                format!("c-{i}"),
                o2.topic.clone(),
                o2.join_timeout,
            );
            let (c, j, f) = (c.clone(), j.clone(), f.clone());
            async move {
                let out = fut.await;
                if out.conn.is_some() {
                    c.fetch_add(1, Ordering::Relaxed);
                }
                if out.joined {
                    j.fetch_add(1, Ordering::Relaxed);
                } else {
                    f.fetch_add(1, Ordering::Relaxed);
                }
                out
            }
        })
        .await?
    };
    progress.abort();
    let open_s = t0.elapsed().as_secs_f64();
    let listen_overflows = match (overflows_before, procfs::listen_overflows()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    let after_open = if has_pids {
        Some(procfs::snapshot(&o.pids, tck)?)
    } else {
        None
    };

    let mut failures = Tally::default();
    let mut positions = Vec::new();
    let mut conns = Vec::new();
    for out in outcomes {
        if let Some(f) = out.failure {
            failures.add(f);
        }
        if out.joined {
            positions.push(out.position);
        }
        if let Some(c) = out.conn {
            conns.push(c);
        }
    }
    let joined = positions.len();
    let connected = connected.load(Ordering::Relaxed);
    let queue_missing = positions.iter().filter(|p| p.is_none()).count();
    let pos_ok = joined > 0 && positions_ok(&positions);
    log(format!("idle: open phase {open_s:.1} s: {connected} connected, {joined} joined, failures {failures}"));

    // hold: heartbeats run meanwhile (the reader tasks answer pings); RSS every 5 s
    let mut hold_samples = Vec::new();
    if !o.hold.is_zero() {
        log(format!("idle: holding {} s", o.hold.as_secs_f64()));
        let end = Instant::now() + o.hold;
        while Instant::now() < end {
            sleep((end - Instant::now()).min(Duration::from_secs(5))).await;
            if has_pids {
                hold_samples.push(procfs::snapshot(&o.pids, tck)?.rss);
            }
        }
    }
    let after = if has_pids {
        Some(steady(&o.pids, tck, 3, Duration::from_millis(500)).await?)
    } else {
        None
    };
    let still_open = conns.iter().filter(|c| !c.is_closed()).count();
    let server_hello = conns
        .first()
        .map_or(Value::Null, |c| hello_json(&c.state()));
    let client_rss = procfs::self_rss();

    log("idle: closing");
    for chunk in conns.chunks_mut(1000) {
        for c in chunk.iter_mut() {
            c.close().await;
        }
        sleep(Duration::from_millis(50)).await;
    }
    drop(conns);
    let after_close = if has_pids {
        sleep(Duration::from_secs(3)).await;
        Some(procfs::snapshot(&o.pids, tck)?)
    } else {
        None
    };

    let per = |rss: u64, base: u64| {
        (joined > 0).then(|| ((rss as f64 - base as f64) / joined as f64).round())
    };
    let (rss_per, server) = match (&before, &after, &after_open) {
        (Some(b), Some(a), Some(ao)) => {
            let rss_per = per(a.rss, b.rss);
            let hold_range = match (hold_samples.iter().min(), hold_samples.iter().max()) {
                (Some(&lo), Some(&hi)) if joined > 0 => json!([per(lo, b.rss), per(hi, b.rss)]),
                _ => Value::Null,
            };
            let cpu_open = ao.cpu - b.cpu;
            let server = json!({
                "rss_before": b.rss,
                "rss_samples_before": b.samples,
                "rss_after_open": ao.rss,
                "rss_after_hold": a.rss,
                "rss_samples_after": a.samples,
                "rss_hold_min": hold_samples.iter().min(),
                "rss_hold_max": hold_samples.iter().max(),
                "rss_per_conn_bytes_hold_range": hold_range,
                "rss_delta": a.rss as i64 - b.rss as i64,
                "rss_per_conn_bytes": rss_per,
                "rss_after_close": after_close.as_ref().map(|s| s.rss),
                "cpu_open_s": round(cpu_open, 3),
                "cpu_ms_per_join": (joined > 0).then(|| round(cpu_open * 1000.0 / joined as f64, 3)),
                "cpu_idle_hold_s": round(a.cpu - ao.cpu, 3),
                "clk_tck": tck,
            });
            (rss_per, server)
        }
        _ => (None, Value::Null),
    };

    let joins_per_s = if open_s > 0.0 {
        round(joined as f64 / open_s, 1)
    } else {
        0.0
    };
    let cpu_adm = server.get("cpu_open_s").cloned().unwrap_or(Value::Null);
    let result = json!({
        "requested": o.n,
        "server_hello": server_hello,
        "topic": o.topic,
        "connected": connected,
        "joined": joined,
        "join_acks": joined,
        "failed": o.n - joined,
        "failures": failures,
        "positions_ok": pos_ok,
        "queue_missing": queue_missing,
        "still_open_at_end": still_open,
        "open_s": round(open_s, 2),
        "listen_overflows": listen_overflows,
        "joins_per_s": joins_per_s,
        "rss_per_customer_bytes": rss_per,
        "server_cpu_admission_s": cpu_adm,
        "server": server,
        "client_rss": client_rss,
    });

    let s = &result["server"];
    let f = |k: &str| s.get(k).and_then(Value::as_f64);
    let rows = vec![
        (
            "customers requested / connected / joined".into(),
            format!("{} / {connected} / {joined}", o.n),
        ),
        ("failures".into(), failures.to_string()),
        ("still open at end of hold".into(), still_open.to_string()),
        (
            "open phase".into(),
            format!("{:.2} s ({joins_per_s} joins/s)", open_s),
        ),
        (
            "listen queue overflows (machine-wide)".into(),
            opt(listen_overflows),
        ),
        (
            "queue positions 1..n".into(),
            if pos_ok {
                "ok".into()
            } else {
                format!("WRONG ({queue_missing} without a queue event)")
            },
        ),
        ("server RSS before".into(), mib(f("rss_before"))),
        ("server RSS after hold".into(), mib(f("rss_after_hold"))),
        ("server RSS per waiting customer".into(), kib(rss_per)),
        (
            "server CPU for admission".into(),
            format!(
                "{} s ({} ms per join)",
                opt(f("cpu_open_s")),
                opt(f("cpu_ms_per_join"))
            ),
        ),
        (
            "server CPU while idle (hold)".into(),
            format!("{} s", opt(f("cpu_idle_hold_s"))),
        ),
        ("server RSS after close".into(), mib(f("rss_after_close"))),
        (
            "load generator RSS".into(),
            mib(client_rss.map(|v| v as f64)),
        ),
    ];
    Ok((result, rows))
}

#[cfg(test)]
mod tests {
    use super::positions_ok;

    #[test]
    fn positions() {
        assert!(positions_ok(&[Some(2), Some(1), Some(3)]));
        assert!(!positions_ok(&[Some(1), Some(1), Some(3)]));
        assert!(!positions_ok(&[Some(1), None]));
        assert!(!positions_ok(&[Some(2), Some(3)]));
        assert!(positions_ok(&[]));
    }
}

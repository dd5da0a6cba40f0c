//! `duet-loadgen`: drives a duet server over its wire protocol (`shared/PROTOCOL.md`) and
//! reports what it costs and how it behaves.
//!
//! - `idle`: N customers connect, join and wait — server memory per waiting customer,
//!   admission rate and admission CPU ([`idle`]).
//! - `relay`: P customer+agent pairs talk at a fixed rate — latency, acks, loss, order,
//!   routing and messages per server CPU-second ([`relay`]).
//! - `conversation`: a one-pair smoke test of join, take, say both ways and end.
//!
//! The figures match the Node load generator in `shared/peers/loadgen` (same scenarios,
//! same JSON envelope), but this one is independent Rust on a multi-threaded tokio runtime,
//! so a run can be checked against the other. This file only parses the command line,
//! checks it, and hands over; it prints a human table on stderr and one JSON line on
//! stdout ([`report`]).

mod client;
mod conversation;
mod idle;
mod pool;
mod procfs;
mod relay;
mod report;
mod stats;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

use crate::client::Endpoint;

#[derive(Parser)]
#[command(
    name = "duet-loadgen",
    version,
    about = "Load generator for duet (PROTOCOL.md v1)"
)]
struct Cli {
    /// No progress lines on stderr (the table and the JSON line are still printed).
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// N customers connect, join one fresh queue and wait: RSS per customer, admission.
    Idle(IdleArgs),
    /// P customer+agent pairs, customers say --rate msg/s: latency, loss, CPU per message.
    Relay(RelayArgs),
    /// Smoke test: one customer, one agent: join, take, say both ways, end.
    Conversation(ConversationArgs),
}

#[derive(Args)]
struct Common {
    /// duet base URL; relay: two comma-separated URLs put customers on the first node and
    /// agents on the second (every message crosses nodes); idle spreads over all.
    #[arg(long, default_value = "http://127.0.0.1:8080", value_delimiter = ',')]
    url: Vec<String>,
    /// Server processes whose RSS and CPU are read from /proc (comma list).
    #[arg(long, value_delimiter = ',')]
    pids: Vec<u32>,
    /// Free text stored in the JSON line (`name/1`, `name/2` for repeats).
    #[arg(long)]
    label: Option<String>,
    /// Also append the JSON line to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Connection and setup operations in flight.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Seconds for the upgrade (and hello) of one connection.
    #[arg(long, default_value_t = 20.0)]
    connect_timeout: f64,
    /// Seconds for a join, available or take answer.
    #[arg(long, default_value_t = 20.0)]
    join_timeout: f64,
    /// Loopback source addresses to spread connections over (127.x.y.z), comma list; one
    /// source address gives at most ~28k connections to one server port.
    #[arg(long, value_delimiter = ',')]
    local_addrs: Vec<IpAddr>,
    /// Allow a non-loopback target (only on machines you own).
    #[arg(long)]
    allow_remote: bool,
    /// Use --topic as given; by default a run id is appended so every run has a fresh
    /// queue (positions start at 1, no customers of an earlier run in the way).
    #[arg(long)]
    fixed_topic: bool,
}

#[derive(Args)]
struct IdleArgs {
    #[command(flatten)]
    common: Common,
    /// Customers to open.
    #[arg(long, default_value_t = 10_000)]
    n: usize,
    /// Seconds to hold the customers before the second RSS read.
    #[arg(long, default_value_t = 10.0)]
    hold: f64,
    /// Queue topic (a run id is appended unless --fixed-topic).
    #[arg(long, default_value = "idle")]
    topic: String,
    /// Customers that connect, join and leave before the baseline is read.
    #[arg(long, default_value_t = 200)]
    prewarm: usize,
}

#[derive(Args)]
struct RelayArgs {
    #[command(flatten)]
    common: Common,
    /// Admin bearer tokens, one per line (one agent per token; # comments and blank
    /// lines are skipped).
    #[arg(long)]
    tokens_file: PathBuf,
    /// Customer+agent pairs.
    #[arg(long, default_value_t = 200)]
    pairs: usize,
    /// Messages per second per customer.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 30.0)]
    seconds: f64,
    /// Seconds of sending before the measurement starts.
    #[arg(long, default_value_t = 5.0)]
    warmup: f64,
    /// Seconds to wait, after the last send, for messages and acks in flight.
    #[arg(long, default_value_t = 5.0)]
    drain: f64,
    /// Database processes to add to the CPU figure: a comma list of PIDs, or
    /// `auto-postgres` for every process whose name starts with `postgres`.
    #[arg(long)]
    db_pids: Option<String>,
    /// Message text length in characters.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Queue topic (a run id is appended unless --fixed-topic).
    #[arg(long, default_value = "relay")]
    topic: String,
    /// List every measured message slower than this many ms in the JSON line (`slow`:
    /// send instant in Unix seconds, latency), to line stalls up with server logs.
    #[arg(long, default_value_t = 0.0)]
    slow_ms: f64,
}

#[derive(Args)]
struct ConversationArgs {
    /// duet base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// An admin bearer token for the agent.
    #[arg(long)]
    token: String,
    /// Queue topic (a run id is appended).
    #[arg(long, default_value = "smoke")]
    topic: String,
    /// Seconds allowed for each step.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Allow a non-loopback target.
    #[arg(long)]
    allow_remote: bool,
}

fn secs(name: &str, v: f64, min: f64, max: f64) -> Result<Duration> {
    if !(v.is_finite() && v >= min && v <= max) {
        bail!("--{name} {v}: must be between {min} and {max}");
    }
    Ok(Duration::from_secs_f64(v))
}

fn run_id() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("{:x}{:x}", ms % (1 << 40), std::process::id() % 4096)
}

fn topic(base: &str, fixed: bool) -> Result<String> {
    // duet accepts topics of at most 64 letters, digits, `-`, `_` or `.`; the run id
    // (14) and the pre-warm suffix (5) come on top
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if base.is_empty() || base.len() > 40 || !base.chars().all(ok_char) {
        bail!("--topic: 1 to 40 letters, digits, `-`, `_` or `.`");
    }
    Ok(if fixed {
        base.to_string()
    } else {
        format!("{base}-{}", run_id())
    })
}

async fn endpoints(urls: &[String], allow_remote: bool) -> Result<Vec<Endpoint>> {
    let mut v = Vec::new();
    for u in urls.iter().filter(|u| !u.trim().is_empty()) {
        v.push(Endpoint::parse(u.trim(), allow_remote).await?);
    }
    if v.is_empty() {
        bail!("--url: at least one URL");
    }
    Ok(v)
}

fn check_pids(flag: &str, pids: &[u32]) -> Result<()> {
    for &p in pids {
        if !procfs::alive(p) {
            bail!("{flag}: no process {p}");
        }
    }
    Ok(())
}

fn read_tokens(path: &PathBuf) -> Result<Vec<String>> {
    let txt = std::fs::read_to_string(path)
        .with_context(|| format!("reading --tokens-file {}", path.display()))?;
    Ok(txt
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect())
}

fn parse_db_pids(v: Option<&str>) -> Result<relay::DbPids> {
    Ok(match v.map(str::trim) {
        None | Some("") => relay::DbPids::None,
        Some("auto-postgres") => relay::DbPids::AutoPostgres,
        Some(list) => {
            let pids = list
                .split(',')
                .map(|s| {
                    s.trim()
                        .parse::<u32>()
                        .with_context(|| format!("--db-pids: {s:?} is not a PID"))
                })
                .collect::<Result<Vec<_>>>()?;
            check_pids("--db-pids", &pids)?;
            relay::DbPids::List(pids)
        }
    })
}

/// `duet`, unless the server introduced itself as the load generator's test stub: a
/// stub run must never pass for a duet figure in a table.
fn target_of(result: &Value) -> &'static str {
    if result["server_hello"]["node"] == STUB_NODE {
        "fake-duet-stub"
    } else {
        "duet"
    }
}

/// The `hello.node` of `fake_duet`.
const STUB_NODE: &str = "fake-duet-stub";

fn envelope(
    scenario: &str,
    c: &Common,
    params: Value,
    load_before: Option<[f64; 3]>,
    nofile: u64,
    result: Value,
) -> Value {
    json!({
        "kind": "duet-loadgen/1",
        "tool": concat!("duet-loadgen-rs/", env!("CARGO_PKG_VERSION")),
        "started": report::now_rfc3339(),
        "target": target_of(&result),
        "scenario": scenario,
        "label": c.label,
        "urls": c.url,
        "pids": c.pids,
        "local_addrs": c.local_addrs,
        "params": params,
        "machine": {
            "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "mem_total_bytes": procfs::mem_total(),
            "loadavg_before": load_before,
            "loadavg_after": procfs::loadavg(),
            "clk_tck": procfs::clk_tck(),
            "nofile_limit": nofile,
        },
        "result": result,
    })
}

async fn run(cli: Cli) -> Result<()> {
    report::set_quiet(cli.quiet);
    let nofile = procfs::raise_nofile().unwrap_or_else(|e| {
        report::log(format!("could not raise RLIMIT_NOFILE: {e:#}"));
        0
    });
    let load_before = procfs::loadavg();
    match cli.cmd {
        Cmd::Idle(a) => {
            let c = &a.common;
            check_pids("--pids", &c.pids)?;
            if a.n == 0 || a.n > 1_000_000 {
                bail!("--n: 1 to 1000000");
            }
            let o = idle::IdleOpts {
                endpoints: endpoints(&c.url, c.allow_remote).await?,
                n: a.n,
                concurrency: c.concurrency.max(1),
                hold: secs("hold", a.hold, 0.0, 86_400.0)?,
                topic: topic(&a.topic, c.fixed_topic)?,
                prewarm: a.prewarm,
                pids: c.pids.clone(),
                connect_timeout: secs("connect-timeout", c.connect_timeout, 0.1, 600.0)?,
                join_timeout: secs("join-timeout", c.join_timeout, 0.1, 600.0)?,
                local_addrs: c.local_addrs.clone(),
            };
            let params = json!({"n": a.n, "hold_s": a.hold, "prewarm": a.prewarm, "concurrency": o.concurrency, "topic": o.topic, "settle_s": 0});
            let (result, rows) = idle::run(o).await?;
            let title = format!(
                "idle — duet {}{}",
                c.url.join(" "),
                c.label
                    .as_ref()
                    .map(|l| format!(" ({l})"))
                    .unwrap_or_default()
            );
            report::table(&title, &rows);
            report::emit(
                &envelope("idle", c, params, load_before, nofile, result),
                c.out.as_deref(),
            )
        }
        Cmd::Relay(a) => {
            let c = &a.common;
            check_pids("--pids", &c.pids)?;
            if a.pairs == 0 || a.pairs > 100_000 {
                bail!("--pairs: 1 to 100000");
            }
            if !(a.rate.is_finite() && a.rate > 0.0 && a.rate <= 1000.0) {
                bail!("--rate: more than 0, at most 1000 messages per second");
            }
            if !(8..=4000).contains(&a.size) {
                bail!("--size: 8 to 4000 characters (PROTOCOL.md: text is 1–4000)");
            }
            let eps = endpoints(&c.url, c.allow_remote).await?;
            if eps.len() > 2 {
                bail!("--url: relay takes one URL, or two (customers on the first, agents on the second)");
            }
            let o = relay::RelayOpts {
                endpoints: eps,
                tokens: read_tokens(&a.tokens_file)?,
                pairs: a.pairs,
                rate: a.rate,
                seconds: secs("seconds", a.seconds, 0.1, 86_400.0)?.as_secs_f64(),
                warmup: secs("warmup", a.warmup, 0.0, 3600.0)?.as_secs_f64(),
                drain: secs("drain", a.drain, 0.0, 3600.0)?.as_secs_f64(),
                size: a.size,
                topic: topic(&a.topic, c.fixed_topic)?,
                concurrency: c.concurrency.max(1),
                pids: c.pids.clone(),
                db_pids: parse_db_pids(a.db_pids.as_deref())?,
                connect_timeout: secs("connect-timeout", c.connect_timeout, 0.1, 600.0)?,
                join_timeout: secs("join-timeout", c.join_timeout, 0.1, 600.0)?,
                local_addrs: c.local_addrs.clone(),
                slow_ms: a.slow_ms,
            };
            let params = json!({
                "pairs": a.pairs, "rate": a.rate, "seconds": a.seconds, "warmup_s": a.warmup,
                "drain_s": a.drain, "size": a.size, "topic": o.topic, "db_pids": a.db_pids,
                "concurrency": o.concurrency,
            });
            let (result, rows) = relay::run(o).await?;
            let title = format!(
                "relay — duet {}{}",
                c.url.join(" "),
                c.label
                    .as_ref()
                    .map(|l| format!(" ({l})"))
                    .unwrap_or_default()
            );
            report::table(&title, &rows);
            report::emit(
                &envelope("relay", c, params, load_before, nofile, result),
                c.out.as_deref(),
            )
        }
        Cmd::Conversation(a) => {
            let ep = Endpoint::parse(&a.url, a.allow_remote).await?;
            let within = secs("timeout", a.timeout, 0.1, 600.0)?;
            match conversation::run(ep, a.token, topic(&a.topic, false)?, within).await {
                Ok(line) => {
                    println!("{line}");
                    Ok(())
                }
                Err(e) => {
                    println!("error: {e:#}");
                    std::process::exit(1);
                }
            }
        }
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("duet-loadgen: {e:#}");
        std::process::exit(1);
    }
}

//! =====================================================================================
//!  TEST STUB — NOT duet. For testing `duet-loadgen` itself, before duet runs.
//!  Its figures mean nothing: never benchmark it, never quote a number measured on it.
//! =====================================================================================
//!
//! A small in-memory WebSocket server that speaks the subset of `shared/PROTOCOL.md` the
//! load generator uses, so the load generator's protocol client, scenarios and
//! bookkeeping can be checked end to end:
//!
//! - `GET /ws` (customers): `hello` on connect; `join {name, topic, ref}` → `session`
//!   (seq 1) + `queue` + `ack {ref, seq}`; `say {text, ref}` → `message` event (with
//!   `session_id` and `seq`) to the agent + `ack {ref, seq}` to the sender; `leave`;
//!   `ping` → `pong`. A customer that disconnects leaves its queue (no resume here).
//! - `GET /admin/ws` (agents, `Authorization: Bearer <token>`, else HTTP 401):
//!   a minimal `dashboard` on connect; `available`/`away` → `ack`; `take {topic}` →
//!   `assigned` to customer and agent + `ack {ref, seq, session_id}`; `say {session_id}`
//!   (`forbidden` for a session it does not serve); `end {session_id}` → `ended` to both.
//! - A request with a foreign `Origin` gets HTTP 403; no `Origin` is allowed.
//! - The server pings every `--heartbeat-s` seconds (it does not drop silent clients).
//!
//! Variants the contract allows, to exercise the client's tolerance: `--ack-first` answers
//! `join` with the ack before `session`/`queue`; `--take-ack-without-session-id` sends the
//! take ack with only `seq`, and `assigned` after it.
//!
//! Fault injection (`--drop-every`, `--dup-every`, `--reorder-every`,
//! `--misroute-every`) breaks every Nth customer message on purpose, to check that the load
//! generator counts what it must count.
//!
//! Several `--bind` addresses share one state: they stand in for two nodes so the load
//! generator's cross-node path (`--url A,B`) can be exercised.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser, Clone)]
#[command(
    name = "fake_duet",
    about = "TEST STUB speaking a PROTOCOL.md subset; not duet, never benchmark it"
)]
struct Opts {
    /// Comma list of host:port to listen on (they share one state).
    #[arg(long, default_value = "127.0.0.1:18080", value_delimiter = ',')]
    bind: Vec<SocketAddr>,
    /// Accepted admin bearer tokens (comma list); with neither this nor --tokens-file,
    /// any non-empty token is accepted.
    #[arg(long, value_delimiter = ',')]
    tokens: Vec<String>,
    /// Accepted admin bearer tokens, one per line.
    #[arg(long)]
    tokens_file: Option<PathBuf>,
    /// Answer `join` with the ack before `session` and `queue`.
    #[arg(long)]
    ack_first: bool,
    /// Send the take ack without `session_id`, and `assigned` after it.
    #[arg(long)]
    take_ack_without_session_id: bool,
    /// Server ping interval in seconds.
    #[arg(long, default_value_t = 25)]
    heartbeat_s: u64,
    /// Fault injection: do not deliver every Nth customer message to the agent (still
    /// acked), to check that the load generator counts it as lost.
    #[arg(long, default_value_t = 0)]
    drop_every: u64,
    /// Fault injection: deliver every Nth customer message twice.
    #[arg(long, default_value_t = 0)]
    dup_every: u64,
    /// Fault injection: hold every Nth customer message back and deliver it after the
    /// session's next one (a reordering).
    #[arg(long, default_value_t = 0)]
    reorder_every: u64,
    /// Fault injection: deliver every Nth customer message to another session's agent.
    #[arg(long, default_value_t = 0)]
    misroute_every: u64,
    /// Allowed Origin values (comma list); a request without Origin is always allowed.
    #[arg(long, value_delimiter = ',')]
    allowed_origins: Vec<String>,
}

type Tx = mpsc::UnboundedSender<Message>;

struct Session {
    id: String,
    customer: Option<Tx>,
    agent: Option<(u64, Tx)>,
    seq: u64,
    ended: bool,
    /// a message held back by --reorder-every
    held: Option<Value>,
}

#[derive(Default)]
struct State {
    sessions: HashMap<String, Session>,
    queues: HashMap<String, VecDeque<String>>,
    /// agent connection id → the session it serves
    serving: HashMap<u64, String>,
}

struct Hub {
    opts: Opts,
    tokens: Option<HashSet<String>>,
    state: Mutex<State>,
    next_id: AtomicU64,
    /// Open WebSockets and pongs received, printed every 5 s when they change (so a test
    /// can see that the client answers pings).
    open: AtomicU64,
    pongs: AtomicU64,
    /// customer messages so far (for the fault injection)
    says: AtomicU64,
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, State> {
        // the state stays consistent between statements; a panicked task is not a reason
        // to stop the stub
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn send(tx: &Tx, v: &Value) {
    let _ = tx.send(Message::text(v.to_string()));
}

fn now_rfc3339() -> String {
    let s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, tod) = (s.div_euclid(86_400), s.rem_euclid(86_400));
    let z = days + 719_468;
    let (era, doe) = (z.div_euclid(146_097), z.rem_euclid(146_097));
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        tod / 3600,
        tod % 3600 / 60,
        tod % 60
    )
}

struct Fail(&'static str, String);

fn str_field<'a>(m: &'a Value, k: &str, lo: usize, hi: usize) -> Result<&'a str, Fail> {
    match m.get(k).and_then(Value::as_str) {
        Some(s) if (lo..=hi).contains(&s.chars().count()) => Ok(s),
        _ => Err(Fail(
            "bad_request",
            format!("field '{k}' must be a string of {lo}-{hi} characters"),
        )),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Role {
    Customer,
    Agent,
}

struct ConnCtx {
    id: u64,
    role: Role,
    tx: Tx,
    /// customer: its current session
    session: Option<String>,
}

fn reject(status: StatusCode, why: &str) -> ErrorResponse {
    let mut r = ErrorResponse::new(Some(format!(
        r#"{{"error":{{"code":"{why}","message":"{why}"}}}}"#
    )));
    *r.status_mut() = status;
    r
}

// the handshake callback's error type is fixed by tungstenite
#[allow(clippy::result_large_err)]
async fn serve(hub: Arc<Hub>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut role = None;
    let cb = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        if let Some(origin) = req.headers().get("origin") {
            let ok = origin
                .to_str()
                .is_ok_and(|o| hub.opts.allowed_origins.iter().any(|a| a == o));
            if !ok {
                return Err(reject(StatusCode::FORBIDDEN, "forbidden"));
            }
        }
        match req.uri().path() {
            "/ws" => role = Some(Role::Customer),
            "/admin/ws" => {
                let token = req
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .unwrap_or("");
                let ok = !token.is_empty() && hub.tokens.as_ref().is_none_or(|t| t.contains(token));
                if !ok {
                    return Err(reject(StatusCode::UNAUTHORIZED, "unauthorized"));
                }
                role = Some(Role::Agent);
            }
            _ => return Err(reject(StatusCode::NOT_FOUND, "not_found")),
        }
        Ok(resp)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, cb).await else {
        return;
    };
    let Some(role) = role else { return };
    let (mut sink, mut source) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    let heartbeat = Duration::from_secs(hub.opts.heartbeat_s.max(1));
    let writer = tokio::spawn(async move {
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => if sink.send(m).await.is_err() { break },
                    None => break,
                },
                _ = ping.tick() => if sink.send(Message::Ping(Default::default())).await.is_err() { break },
            }
        }
        let _ = sink.close().await;
    });
    let mut ctx = ConnCtx {
        id: hub.next_id.fetch_add(1, Ordering::Relaxed),
        role,
        tx,
        session: None,
    };
    match role {
        Role::Customer => send(
            &ctx.tx,
            &json!({"type": "hello", "protocol": 1, "node": "fake-duet-stub", "heartbeat_s": hub.opts.heartbeat_s, "max_message_bytes": 65536}),
        ),
        Role::Agent => send(
            &ctx.tx,
            &json!({"type": "dashboard", "queues": [], "sessions": [], "agents": [], "nodes": []}),
        ),
    }
    hub.open.fetch_add(1, Ordering::Relaxed);
    while let Some(Ok(msg)) = source.next().await {
        let text = match msg {
            Message::Text(t) => t,
            Message::Close(_) => break,
            Message::Pong(_) => {
                hub.pongs.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            _ => continue,
        };
        let m: Value = match serde_json::from_str(text.as_str()) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                send(
                    &ctx.tx,
                    &json!({"type": "error", "code": "bad_request", "message": "not a JSON object"}),
                );
                continue;
            }
        };
        let reference = m.get("ref").cloned();
        let outcome = match role {
            Role::Customer => customer_op(&hub, &mut ctx, &m),
            Role::Agent => agent_op(&hub, &mut ctx, &m),
        };
        if let Err(Fail(code, message)) = outcome {
            let mut e = json!({"type": "error", "code": code, "message": message});
            if let Some(r) = reference {
                e["ref"] = r;
            }
            send(&ctx.tx, &e);
        }
    }
    hub.open.fetch_sub(1, Ordering::Relaxed);
    disconnect(&hub, &ctx);
    drop(ctx);
    let _ = writer.await;
}

/// Appends an event to a session's stream and returns it (the caller sends it).
fn event(s: &mut Session, ty: &str, mut fields: Value) -> Value {
    s.seq += 1;
    fields["type"] = json!(ty);
    fields["seq"] = json!(s.seq);
    fields["session_id"] = json!(s.id);
    fields
}

fn ack(ctx: &ConnCtx, m: &Value, extra: Value) {
    if let Some(r) = m.get("ref") {
        let mut a = extra;
        a["type"] = json!("ack");
        a["ref"] = r.clone();
        send(&ctx.tx, &a);
    }
}

fn customer_op(hub: &Hub, ctx: &mut ConnCtx, m: &Value) -> Result<(), Fail> {
    match m.get("type").and_then(Value::as_str).unwrap_or("") {
        "ping" => send(&ctx.tx, &json!({"type": "pong"})),
        "join" => {
            let name = str_field(m, "name", 1, 80)?;
            let topic = str_field(m, "topic", 1, 100)?.to_string();
            let _ = name;
            let mut st = hub.lock();
            if let Some(sid) = &ctx.session {
                if st.sessions.get(sid).is_some_and(|s| !s.ended) {
                    return Err(Fail(
                        "conflict",
                        "this connection already has a session".into(),
                    ));
                }
            }
            let n = hub.next_id.fetch_add(1, Ordering::Relaxed);
            let id = format!("s-{n:08}");
            let mut s = Session {
                id: id.clone(),
                customer: Some(ctx.tx.clone()),
                agent: None,
                seq: 0,
                ended: false,
                held: None,
            };
            let ev = event(
                &mut s,
                "session",
                json!({"resume_token": format!("rt-{n:08}"), "topic": topic, "mode": "human"}),
            );
            st.sessions.insert(id.clone(), s);
            let q = st.queues.entry(topic).or_default();
            q.push_back(id.clone());
            let pos = q.len() as u64;
            drop(st);
            ctx.session = Some(id);
            let queue =
                json!({"type": "queue", "position": pos, "waiting": pos, "eta_s": pos * 60});
            if hub.opts.ack_first {
                ack(ctx, m, json!({"seq": 1}));
                send(&ctx.tx, &ev);
                send(&ctx.tx, &queue);
            } else {
                send(&ctx.tx, &ev);
                send(&ctx.tx, &queue);
                ack(ctx, m, json!({"seq": 1}));
            }
        }
        "say" => {
            let text = str_field(m, "text", 1, 4000)?;
            let sid = ctx
                .session
                .clone()
                .ok_or(Fail("not_found", "no session on this connection".into()))?;
            let mut st = hub.lock();
            let n = hub.says.fetch_add(1, Ordering::Relaxed) + 1;
            let nth = |every: u64| every > 0 && n.is_multiple_of(every);
            let o = &hub.opts;
            let wrong_agent = if nth(o.misroute_every) {
                st.sessions
                    .values()
                    .filter(|x| x.id != sid)
                    .find_map(|x| x.agent.as_ref().map(|a| a.1.clone()))
            } else {
                None
            };
            let s = st
                .sessions
                .get_mut(&sid)
                .filter(|s| !s.ended)
                .ok_or(Fail("not_found", "session ended".into()))?;
            let ev = event(
                s,
                "message",
                json!({"from": "customer", "text": text, "at": now_rfc3339(), "msg_id": format!("m-{}", s.seq)}),
            );
            if let Some(wrong) = wrong_agent {
                send(&wrong, &ev);
            } else if let Some((_, atx)) = &s.agent {
                if nth(o.reorder_every) && s.held.is_none() {
                    s.held = Some(ev);
                } else if !nth(o.drop_every) {
                    send(atx, &ev);
                    if nth(o.dup_every) {
                        send(atx, &ev);
                    }
                    if let Some(h) = s.held.take() {
                        send(atx, &h);
                    }
                }
            }
            let seq = s.seq;
            drop(st);
            ack(ctx, m, json!({"seq": seq}));
        }
        "typing" => {}
        "leave" => {
            let sid = ctx
                .session
                .clone()
                .ok_or(Fail("not_found", "no session on this connection".into()))?;
            let seq = end_session(hub, &sid, "customer_left")
                .ok_or(Fail("not_found", "session ended".into()))?;
            ack(ctx, m, json!({"seq": seq}));
        }
        other => return Err(Fail("bad_request", format!("unknown type '{other}'"))),
    }
    Ok(())
}

/// Ends a session: `ended` to both sides; returns its seq.
fn end_session(hub: &Hub, sid: &str, reason: &str) -> Option<u64> {
    let mut st = hub.lock();
    let s = st.sessions.get_mut(sid).filter(|s| !s.ended)?;
    s.ended = true;
    let ev = event(s, "ended", json!({"reason": reason}));
    if let Some(c) = &s.customer {
        send(c, &ev);
    }
    let agent = s.agent.take();
    if let Some((_, atx)) = &agent {
        send(atx, &ev);
    }
    let seq = s.seq;
    if let Some((aid, _)) = agent {
        st.serving.remove(&aid);
    }
    for q in st.queues.values_mut() {
        q.retain(|x| x != sid);
    }
    Some(seq)
}

fn agent_op(hub: &Hub, ctx: &mut ConnCtx, m: &Value) -> Result<(), Fail> {
    match m.get("type").and_then(Value::as_str).unwrap_or("") {
        "ping" => send(&ctx.tx, &json!({"type": "pong"})),
        "available" | "away" => ack(ctx, m, json!({})),
        "take" => {
            let topic = str_field(m, "topic", 1, 100)?;
            let mut st = hub.lock();
            if st.serving.contains_key(&ctx.id) {
                return Err(Fail(
                    "conflict",
                    "this agent already serves a session".into(),
                ));
            }
            let sid = loop {
                let Some(sid) = st.queues.get_mut(topic).and_then(VecDeque::pop_front) else {
                    return Err(Fail("not_found", "the queue is empty".into()));
                };
                if st
                    .sessions
                    .get(&sid)
                    .is_some_and(|s| !s.ended && s.customer.is_some())
                {
                    break sid;
                }
            };
            st.serving.insert(ctx.id, sid.clone());
            let s = st
                .sessions
                .get_mut(&sid)
                .ok_or(Fail("internal", "session vanished".into()))?;
            s.agent = Some((ctx.id, ctx.tx.clone()));
            let ev = event(
                s,
                "assigned",
                json!({"agent": {"id": format!("a-{}", ctx.id), "name": "fake agent", "kind": "human"}}),
            );
            let seq = s.seq;
            let customer = s.customer.clone();
            drop(st);
            let deliver = || {
                if let Some(c) = &customer {
                    send(c, &ev);
                }
                send(&ctx.tx, &ev);
            };
            if hub.opts.take_ack_without_session_id {
                ack(ctx, m, json!({"seq": seq}));
                deliver();
            } else {
                deliver();
                ack(ctx, m, json!({"seq": seq, "session_id": sid}));
            }
        }
        "say" => {
            let text = str_field(m, "text", 1, 4000)?;
            let sid = str_field(m, "session_id", 1, 200)?;
            let mut st = hub.lock();
            if st.serving.get(&ctx.id).map(String::as_str) != Some(sid) {
                return Err(Fail("forbidden", "not a session this agent serves".into()));
            }
            let s = st
                .sessions
                .get_mut(sid)
                .filter(|s| !s.ended)
                .ok_or(Fail("not_found", "session ended".into()))?;
            let ev = event(
                s,
                "message",
                json!({"from": "agent", "text": text, "at": now_rfc3339(), "msg_id": format!("m-{}", s.seq)}),
            );
            if let Some(c) = &s.customer {
                send(c, &ev);
            }
            let seq = s.seq;
            drop(st);
            ack(ctx, m, json!({"seq": seq}));
        }
        "end" => {
            let sid = str_field(m, "session_id", 1, 200)?;
            if hub.lock().serving.get(&ctx.id).map(String::as_str) != Some(sid) {
                return Err(Fail("forbidden", "not a session this agent serves".into()));
            }
            let seq = end_session(hub, sid, "agent_ended")
                .ok_or(Fail("not_found", "session ended".into()))?;
            ack(ctx, m, json!({"seq": seq}));
        }
        other => return Err(Fail("bad_request", format!("unknown type '{other}'"))),
    }
    Ok(())
}

fn disconnect(hub: &Hub, ctx: &ConnCtx) {
    let mut st = hub.lock();
    match ctx.role {
        Role::Customer => {
            if let Some(sid) = &ctx.session {
                if let Some(s) = st.sessions.get_mut(sid) {
                    s.customer = None;
                }
                for q in st.queues.values_mut() {
                    q.retain(|x| x != sid);
                }
            }
        }
        Role::Agent => {
            if let Some(sid) = st.serving.remove(&ctx.id) {
                if let Some(s) = st.sessions.get_mut(&sid) {
                    s.agent = None;
                }
            }
        }
    }
}

/// One descriptor per connection: lift the soft open-file limit to the hard one.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointers to an rlimit; raising soft up to hard is always permitted.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let opts = Opts::parse();
    raise_nofile();
    let mut tokens: Option<HashSet<String>> = None;
    if !opts.tokens.is_empty() {
        tokens
            .get_or_insert_with(HashSet::new)
            .extend(opts.tokens.iter().cloned());
    }
    if let Some(p) = &opts.tokens_file {
        let txt = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        tokens.get_or_insert_with(HashSet::new).extend(
            txt.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string),
        );
    }
    let hub = Arc::new(Hub {
        opts: opts.clone(),
        tokens,
        state: Mutex::default(),
        next_id: AtomicU64::new(1),
        open: AtomicU64::new(0),
        pongs: AtomicU64::new(0),
        says: AtomicU64::new(0),
    });
    {
        let hub = hub.clone();
        tokio::spawn(async move {
            let mut last = (0, 0);
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let now = (
                    hub.open.load(Ordering::Relaxed),
                    hub.pongs.load(Ordering::Relaxed),
                );
                if now != last {
                    eprintln!(
                        "fake_duet: {} open WebSockets, {} pongs received",
                        now.0, now.1
                    );
                    last = now;
                }
            }
        });
    }
    let mut listeners = Vec::new();
    for addr in &opts.bind {
        // tokio's `TcpListener::bind` listens with a backlog of 128: a burst of 200
        // connects would overflow it and cost SYN retransmits of a second
        let sock = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }?;
        sock.set_reuseaddr(true)?;
        sock.bind(*addr)
            .with_context(|| format!("binding {addr}"))?;
        let l = sock.listen(4096)?;
        // the real address (with `:0` the kernel picks the port; tests read this line)
        let local = l.local_addr()?;
        eprintln!(
            "fake_duet (TEST STUB, not duet; never benchmark it): listening on {local} pid {}",
            std::process::id()
        );
        listeners.push(l);
    }
    let mut tasks = Vec::new();
    for l in listeners {
        let hub = hub.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                match l.accept().await {
                    Ok((s, _)) => {
                        tokio::spawn(serve(hub.clone(), s));
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning
                        eprintln!("fake_duet: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    Ok(())
}

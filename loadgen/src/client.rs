//! The client side of duet's wire protocol, version 1 (`shared/PROTOCOL.md`).
//!
//! One place knows the wire format so that the scenarios speak in terms of `join`, `take`
//! and `say`. What it does, and why:
//!
//! - Customers use `GET /ws`, agents `GET /admin/ws` with `Authorization: Bearer <token>`.
//!   No `Origin` header is sent (a non-browser client, which the contract allows) and no
//!   permessage-deflate is offered (tungstenite is built without it), so the server does
//!   the work a real non-browser client causes and nothing more. `TCP_NODELAY` is set:
//!   latency figures must not contain Nagle delays of the load generator.
//! - Every connection has one reader task. It answers server pings (tungstenite queues the
//!   pong and flushes it on the next read), drops `dashboard` frames after counting them
//!   (agents would otherwise leave them in the socket buffer and look like slow consumers),
//!   keeps a small [`ConnState`] (hello, session, queue position, assignment) in a `watch`
//!   channel for the setup steps to wait on, and resolves requests by `ref`.
//! - Frames on the hot path (`message` events at agents, `say` acks at customers) are not
//!   copied into the state: they go straight to an [`Observer`] the scenario installs at
//!   connect time, parsed once into a borrowing [`Frame`].
//! - What the contract leaves open is tolerated: `queue` before or after the join `ack`; a
//!   `take` ack with or without `session_id` (then the session is the one of the first
//!   session-stream event that reaches the agent, e.g. `assigned`); `hello` or `dashboard`
//!   on `/admin/ws`.
//! - Refs: 1–99 are setup requests (the join is ref 1, see [`JOIN_REF`]); a `say` numbered
//!   `k` carries ref [`SAY_REF_BASE`]` + k`. The contract makes `session_id` + `ref`
//!   idempotent, so no `say` may share a ref with an earlier request of its session.
//!
//! Failures are [`Failure`]s with a short `code` (`timeout`, `closed`, `refused`,
//! `unauthorized`, or the server's error code such as `rate_limited`), so a run can report
//! them tallied by code.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// The `ref` of a customer's `join`.
pub const JOIN_REF: u64 = 1;
/// `say` number `k` carries ref `SAY_REF_BASE + k`; refs below it are setup requests.
pub const SAY_REF_BASE: u64 = 100;

type Ws = WebSocketStream<TcpStream>;

/// Why an operation failed, with a short code for tallies.
#[derive(Debug, Clone)]
pub struct Failure {
    /// `timeout`, `closed`, `refused`, `unauthorized`, `forbidden`, `http_NNN`, `io`, …, or
    /// the `code` of the server's `error` answer.
    pub code: String,
    /// Human detail (the server's `message`, the I/O error, what was awaited).
    pub detail: String,
}

impl Failure {
    pub fn new(code: impl Into<String>, detail: impl Into<String>) -> Self {
        Failure {
            code: code.into(),
            detail: detail.into(),
        }
    }
    fn timeout(what: &str) -> Self {
        Failure::new("timeout", format!("no {what} in time"))
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.detail)
    }
}

impl std::error::Error for Failure {}

/// Where a duet node listens, resolved once (no DNS per connection).
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `ws://host:port`, without a path.
    pub base: String,
    /// The resolved address the TCP connections go to.
    pub addr: SocketAddr,
}

impl Endpoint {
    /// Parses `http://host:port` (or `ws://`); a path is ignored. TLS is not built in, so
    /// `https`/`wss` are refused. Unless `allow_remote`, only loopback targets are accepted:
    /// a load generator must not be pointed at someone else's machine by a typo.
    pub async fn parse(url: &str, allow_remote: bool) -> anyhow::Result<Endpoint> {
        let rest = if let Some(r) = url.strip_prefix("http://") {
            r
        } else if let Some(r) = url.strip_prefix("ws://") {
            r
        } else {
            anyhow::bail!("{url}: only http:// or ws:// URLs (no TLS in the load generator)");
        };
        let authority = rest.split('/').next().unwrap_or_default();
        if authority.is_empty() {
            anyhow::bail!("{url}: no host");
        }
        let (host, port) = split_host_port(authority)
            .ok_or_else(|| anyhow::anyhow!("{url}: cannot read host and port"))?;
        let addr = tokio::net::lookup_host((host.trim_matches(['[', ']']), port))
            .await?
            .next()
            .ok_or_else(|| anyhow::anyhow!("{url}: host does not resolve"))?;
        if !allow_remote && !addr.ip().is_loopback() {
            anyhow::bail!(
                "{url}: refusing a non-loopback target (use --allow-remote on machines you own)"
            );
        }
        let base = match addr {
            SocketAddr::V4(a) => format!("ws://{a}"),
            SocketAddr::V6(a) => format!("ws://[{}]:{}", a.ip(), a.port()),
        };
        Ok(Endpoint { base, addr })
    }
}

fn split_host_port(authority: &str) -> Option<(&str, u16)> {
    if let Some(end) = authority.find(']') {
        // [v6]:port
        let host = &authority[..=end];
        let port = match authority[end + 1..].strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None => 80,
        };
        return Some((host, port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h, p.parse().ok()?)),
        None => Some((authority, 80)),
    }
}

/// A string field that borrows from the frame when it has no escapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Str<'a>(pub Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(
                self,
                v: &'de str,
            ) -> Result<Self::Value, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

impl Str<'_> {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One server frame, with the top-level fields any scenario looks at; others are skipped.
#[derive(Debug, Deserialize)]
pub struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    pub ty: Str<'a>,
    /// A string or an integer the client chose; this client only uses integers.
    #[serde(rename = "ref", default)]
    pub reference: Option<Value>,
    #[serde(default)]
    pub seq: Option<u64>,
    #[serde(default, borrow)]
    pub session_id: Option<Str<'a>>,
    #[serde(default, borrow)]
    pub resume_token: Option<Str<'a>>,
    #[serde(default, borrow)]
    pub code: Option<Str<'a>>,
    #[serde(default, borrow)]
    pub message: Option<Str<'a>>,
    #[serde(default)]
    pub retry_after_ms: Option<u64>,
    #[serde(default, borrow)]
    pub from: Option<Str<'a>>,
    #[serde(default, borrow)]
    pub text: Option<Str<'a>>,
    #[serde(default)]
    pub position: Option<u64>,
    #[serde(default)]
    pub waiting: Option<u64>,
    /// `hello`: the node's name and protocol version.
    #[serde(default, borrow)]
    pub node: Option<Str<'a>>,
    #[serde(default)]
    pub protocol: Option<u64>,
}

impl Frame<'_> {
    fn str_of<'s>(v: &'s Option<Str<'_>>) -> Option<&'s str> {
        v.as_ref().map(Str::as_str)
    }
    pub fn session_id(&self) -> Option<&str> {
        Self::str_of(&self.session_id)
    }
    pub fn from(&self) -> Option<&str> {
        Self::str_of(&self.from)
    }
    pub fn text(&self) -> Option<&str> {
        Self::str_of(&self.text)
    }
    pub fn code(&self) -> Option<&str> {
        Self::str_of(&self.code)
    }
    /// The integer `ref`, if any.
    pub fn ref_u64(&self) -> Option<u64> {
        self.reference.as_ref().and_then(Value::as_u64)
    }
}

/// Hot-path hooks a scenario installs on a connection; both run on its reader task, so
/// they must be quick and must not block.
pub trait Observer: Send + Sync + 'static {
    /// Every frame that is not an `ack`/`error` answering a pending request, nor a
    /// `dashboard`, nor `hello`.
    fn on_event(&self, _frame: &Frame<'_>, _at: Instant) {}
    /// An `ack` or `error` whose integer `ref` has no pending request (e.g. `say` acks).
    fn on_reply(&self, _reference: u64, _frame: &Frame<'_>, _at: Instant) {}
}

/// What a server said about itself in `hello`, for the JSON line (`server_hello`).
pub fn hello_json(s: &ConnState) -> serde_json::Value {
    json!({"node": s.hello_node, "protocol": s.hello_protocol})
}

/// An observer that ignores everything.
pub struct Quiet;
impl Observer for Quiet {}

/// What the reader task has seen that setup steps wait on.
#[derive(Debug, Clone, Default)]
pub struct ConnState {
    pub hello: bool,
    /// `node` and `protocol` of `hello` (the stub calls itself `fake-duet-stub`).
    pub hello_node: Option<String>,
    pub hello_protocol: Option<u64>,
    /// Customer: from `session`.
    pub session_id: Option<String>,
    pub resume_token: Option<String>,
    /// Customer: from the latest `queue`.
    pub position: Option<u64>,
    pub waiting: Option<u64>,
    /// Customer: the session of the `assigned` event.
    pub assigned: Option<String>,
    /// Distinct `session_id`s of events carrying a `seq`, in order of first appearance
    /// (an agent learns the session it serves from these when the take ack omits it).
    pub stream_sessions: Vec<String>,
    pub ended: bool,
    pub dashboards: u64,
    /// Frames that were not JSON objects with a string `type`.
    pub unparsed: u64,
    /// `Some(reason)` once the reader stopped (server closed, I/O error).
    pub closed: Option<String>,
}

/// A successful answer (`ack`) to a request.
#[derive(Debug, Clone, Default)]
pub struct Ack {
    pub seq: Option<u64>,
    pub session_id: Option<String>,
}

type Reply = Result<Ack, Failure>;
type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>>;

fn lock(p: &Pending) -> MutexGuard<'_, HashMap<u64, oneshot::Sender<Reply>>> {
    // a panic while holding this lock cannot leave the map inconsistent: use it anyway
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// How to open a connection.
#[derive(Debug, Clone)]
pub struct ConnectOpts {
    /// Upgrade (and, for customers, `hello`) must complete within this.
    pub timeout: Duration,
    /// Source address to bind (spreads connections over 127.x addresses).
    pub local_addr: Option<IpAddr>,
}

/// One open WebSocket: the write half here, the read half in its reader task.
pub struct Conn {
    sink: SplitSink<Ws, Message>,
    state: watch::Receiver<ConnState>,
    pending: Pending,
}

fn ws_config() -> WebSocketConfig {
    // small read buffer: thousands of idle customers must not cost the load generator
    // 128 KiB each (tungstenite zero-fills it); large frames (dashboards) still work, the
    // buffer grows
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .max_message_size(Some(16 << 20))
        .max_frame_size(Some(16 << 20))
}

fn io_code(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind as K;
    match (e.raw_os_error(), e.kind()) {
        (Some(libc::EMFILE), _) | (Some(libc::ENFILE), _) => "too_many_open_files",
        (Some(libc::EADDRNOTAVAIL), _) => "no_local_port",
        (_, K::ConnectionRefused) => "refused",
        (_, K::ConnectionReset) => "reset",
        (_, K::TimedOut) => "timeout",
        _ => "io",
    }
}

fn ws_failure(e: WsError) -> Failure {
    match e {
        WsError::Http(resp) => {
            let code = match resp.status().as_u16() {
                401 => "unauthorized".to_string(),
                403 => "forbidden".to_string(),
                s => format!("http_{s}"),
            };
            Failure::new(code, format!("upgrade refused: HTTP {}", resp.status()))
        }
        WsError::Io(io) => Failure::new(io_code(&io), io.to_string()),
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            Failure::new("closed", "connection closed")
        }
        other => Failure::new("ws_error", other.to_string()),
    }
}

impl Conn {
    /// Opens `path` on `ep`; `bearer` adds `Authorization: Bearer …`. Returns once the
    /// upgrade succeeded (it does not wait for `hello`).
    pub async fn open(
        ep: &Endpoint,
        path: &str,
        bearer: Option<&str>,
        opts: &ConnectOpts,
        observer: Arc<dyn Observer>,
    ) -> Result<Conn, Failure> {
        timeout(
            opts.timeout,
            Self::open_inner(ep, path, bearer, opts, observer),
        )
        .await
        .map_err(|_| Failure::timeout("upgrade"))?
    }

    async fn open_inner(
        ep: &Endpoint,
        path: &str,
        bearer: Option<&str>,
        opts: &ConnectOpts,
        observer: Arc<dyn Observer>,
    ) -> Result<Conn, Failure> {
        let sock = match ep.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(|e| Failure::new(io_code(&e), e.to_string()))?;
        if let Some(ip) = opts.local_addr {
            sock.bind(SocketAddr::new(ip, 0))
                .map_err(|e| Failure::new(io_code(&e), e.to_string()))?;
        }
        let tcp = sock
            .connect(ep.addr)
            .await
            .map_err(|e| Failure::new(io_code(&e), e.to_string()))?;
        tcp.set_nodelay(true)
            .map_err(|e| Failure::new(io_code(&e), e.to_string()))?;

        let url = format!("{}{}", ep.base, path);
        let mut req = url.as_str().into_client_request().map_err(ws_failure)?;
        if let Some(token) = bearer {
            let v = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| Failure::new("bad_token", "token is not a valid header value"))?;
            req.headers_mut().insert("authorization", v);
        }
        let (ws, _resp) = tokio_tungstenite::client_async_with_config(req, tcp, Some(ws_config()))
            .await
            .map_err(ws_failure)?;
        let (sink, stream) = ws.split();
        let (tx, rx) = watch::channel(ConnState::default());
        let pending: Pending = Arc::default();
        tokio::spawn(read_loop(stream, tx, pending.clone(), observer));
        Ok(Conn {
            sink,
            state: rx,
            pending,
        })
    }

    /// A customer: opens `/ws` and waits for `hello`.
    pub async fn customer(
        ep: &Endpoint,
        opts: &ConnectOpts,
        observer: Arc<dyn Observer>,
    ) -> Result<Conn, Failure> {
        let started = Instant::now();
        let mut c = Self::open(ep, "/ws", None, opts, observer).await?;
        let left = opts.timeout.saturating_sub(started.elapsed());
        c.wait(left, "hello", |s| s.hello).await?;
        Ok(c)
    }

    /// An agent: opens `/admin/ws` with the bearer token (`hello` is not required there).
    pub async fn agent(
        ep: &Endpoint,
        token: &str,
        opts: &ConnectOpts,
        observer: Arc<dyn Observer>,
    ) -> Result<Conn, Failure> {
        Self::open(ep, "/admin/ws", Some(token), opts, observer).await
    }

    /// A copy of what the reader has seen so far.
    pub fn state(&self) -> ConnState {
        self.state.borrow().clone()
    }

    /// Whether the reader stopped (server closed or I/O error).
    pub fn is_closed(&self) -> bool {
        self.state.borrow().closed.is_some()
    }

    /// Waits until `pred` holds for the state; fails on timeout or when the connection
    /// closes first.
    pub async fn wait(
        &mut self,
        within: Duration,
        what: &str,
        pred: impl Fn(&ConnState) -> bool,
    ) -> Result<ConnState, Failure> {
        let res = timeout(
            within,
            self.state.wait_for(|s| pred(s) || s.closed.is_some()),
        )
        .await;
        match res {
            Err(_) => Err(Failure::timeout(what)),
            Ok(Err(_)) => Err(Failure::new(
                "closed",
                format!("reader gone while waiting for {what}"),
            )),
            Ok(Ok(s)) => {
                if pred(&s) {
                    Ok(s.clone())
                } else {
                    let why = s.closed.clone().unwrap_or_default();
                    Err(Failure::new(
                        "closed",
                        format!("{why} (waiting for {what})"),
                    ))
                }
            }
        }
    }

    /// Sends a frame already serialized (the hot path: no JSON work here).
    pub async fn send_text(&mut self, text: String) -> Result<(), Failure> {
        self.sink
            .send(Message::text(text))
            .await
            .map_err(ws_failure)
    }

    /// Sends `msg` with `ref` = `reference` and waits for its `ack` (an `error` answer is a
    /// [`Failure`] with the server's code).
    pub async fn request(
        &mut self,
        mut msg: Value,
        reference: u64,
        within: Duration,
    ) -> Result<Ack, Failure> {
        let what = msg
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("request")
            .to_string();
        if let Some(obj) = msg.as_object_mut() {
            obj.insert("ref".into(), json!(reference));
        }
        let (tx, rx) = oneshot::channel();
        // registered before sending: the answer may be read before `send` returns
        lock(&self.pending).insert(reference, tx);
        if let Err(e) = self.send_text(msg.to_string()).await {
            lock(&self.pending).remove(&reference);
            return Err(e);
        }
        match timeout(within, rx).await {
            Err(_) => {
                lock(&self.pending).remove(&reference);
                Err(Failure::timeout(&format!("answer to {what}")))
            }
            Ok(Err(_)) => Err(Failure::new(
                "closed",
                format!("closed before the answer to {what}"),
            )),
            Ok(Ok(r)) => r,
        }
    }

    /// Customer `join`: resolves once the ack, `session` and `queue` are in. `queue` may
    /// come after the ack: it gets one more second, then `position` stays `None`.
    pub async fn join(
        &mut self,
        name: &str,
        topic: &str,
        within: Duration,
    ) -> Result<ConnState, Failure> {
        let msg = json!({"type": "join", "name": name, "topic": topic});
        self.request(msg, JOIN_REF, within).await?;
        let grace = Duration::from_secs(1);
        match self
            .wait(grace, "session and queue after the join ack", |s| {
                s.session_id.is_some() && s.position.is_some()
            })
            .await
        {
            Ok(s) => Ok(s),
            Err(f) => {
                let s = self.state();
                if s.session_id.is_some() && s.closed.is_none() {
                    Ok(s) // no `queue`: reported as a missing position
                } else if s.session_id.is_none() && f.code == "timeout" {
                    Err(Failure::new(
                        "no_session",
                        "join acked but no `session` event",
                    ))
                } else {
                    Err(f)
                }
            }
        }
    }

    /// Customer: waits for `assigned`; returns its session.
    pub async fn wait_assigned(&mut self, within: Duration) -> Result<String, Failure> {
        let s = self
            .wait(within, "assigned", |s| s.assigned.is_some())
            .await?;
        s.assigned
            .ok_or_else(|| Failure::new("internal", "assigned vanished"))
    }

    /// Agent `take {topic}`: the served session is the ack's `session_id` if present, else
    /// the first new session-stream session that reaches this agent (e.g. `assigned`).
    pub async fn take(
        &mut self,
        topic: &str,
        reference: u64,
        within: Duration,
    ) -> Result<String, Failure> {
        let known = self.state.borrow().stream_sessions.len();
        let ack = self
            .request(json!({"type": "take", "topic": topic}), reference, within)
            .await?;
        if let Some(sid) = ack.session_id {
            return Ok(sid);
        }
        let s = self
            .wait(within, "a session-stream event after the take ack", |s| {
                s.stream_sessions.len() > known
            })
            .await?;
        s.stream_sessions
            .get(known)
            .cloned()
            .ok_or_else(|| Failure::new("internal", "stream session vanished"))
    }

    /// Sends a Close frame (best effort, bounded); the reader ends when the server answers.
    pub async fn close(&mut self) {
        let _ = timeout(Duration::from_secs(2), self.sink.close()).await;
    }
}

async fn read_loop(
    mut stream: SplitStream<Ws>,
    state: watch::Sender<ConnState>,
    pending: Pending,
    observer: Arc<dyn Observer>,
) {
    let mut seen_sessions: HashSet<String> = HashSet::new();
    let reason = loop {
        let msg = match stream.next().await {
            None => break "closed".to_string(),
            Some(Err(e)) => break format!("{}", ws_failure(e)),
            Some(Ok(m)) => m,
        };
        let at = Instant::now();
        let text = match msg {
            Message::Text(t) => t,
            Message::Close(c) => {
                break format!(
                    "closed by server: {}",
                    c.map(|f| f.code.to_string()).unwrap_or_default()
                )
            }
            // binary (audio) is not used by these scenarios; pings are answered by tungstenite
            _ => continue,
        };
        let frame: Frame<'_> = match serde_json::from_str(text.as_str()) {
            Ok(f) => f,
            Err(_) => {
                state.send_modify(|s| s.unparsed += 1);
                continue;
            }
        };
        handle(
            &frame,
            at,
            &state,
            &pending,
            observer.as_ref(),
            &mut seen_sessions,
        );
    };
    // dropping the pending senders wakes every waiting request with `closed`
    lock(&pending).clear();
    state.send_modify(|s| s.closed = Some(reason));
}

fn handle(
    f: &Frame<'_>,
    at: Instant,
    state: &watch::Sender<ConnState>,
    pending: &Pending,
    observer: &dyn Observer,
    seen: &mut HashSet<String>,
) {
    if let (Some(_), Some(sid)) = (f.seq, f.session_id()) {
        if !seen.contains(sid) {
            seen.insert(sid.to_string());
            state.send_modify(|s| s.stream_sessions.push(sid.to_string()));
        }
    }
    match f.ty.as_str() {
        "hello" => {
            state.send_modify(|s| {
                s.hello = true;
                s.hello_node = f.node.as_ref().map(|n| n.as_str().to_string());
                s.hello_protocol = f.protocol;
            });
            return;
        }
        "dashboard" => {
            state.send_modify(|s| s.dashboards += 1);
            return;
        }
        "ack" | "error" => {
            if let Some(r) = f.ref_u64() {
                let waiter = lock(pending).remove(&r);
                match waiter {
                    Some(tx) => {
                        let reply = if f.ty.as_str() == "ack" {
                            Ok(Ack {
                                seq: f.seq,
                                session_id: f.session_id().map(str::to_string),
                            })
                        } else {
                            let mut detail = f
                                .message
                                .as_ref()
                                .map(|m| m.as_str().to_string())
                                .unwrap_or_default();
                            if let Some(ms) = f.retry_after_ms {
                                detail.push_str(&format!(" (retry_after_ms {ms})"));
                            }
                            Err(Failure::new(f.code().unwrap_or("error"), detail))
                        };
                        let _ = tx.send(reply);
                    }
                    None => observer.on_reply(r, f, at),
                }
                return;
            }
        }
        "session" => state.send_modify(|s| {
            s.session_id = f.session_id().map(str::to_string);
            s.resume_token = f.resume_token.as_ref().map(|t| t.as_str().to_string());
        }),
        "queue" => state.send_modify(|s| {
            s.position = f.position;
            s.waiting = f.waiting;
        }),
        "assigned" => state.send_modify(|s| {
            s.assigned = f
                .session_id()
                .map(str::to_string)
                .or_else(|| s.session_id.clone());
        }),
        "ended" => state.send_modify(|s| s.ended = true),
        _ => {}
    }
    observer.on_event(f, at);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_borrows_and_reads_fields() {
        let t = r#"{"type":"message","seq":7,"session_id":"s-1","from":"customer","text":"3:14:xx","at":"2025-01-01T00:00:00Z","msg_id":"m"}"#;
        let f: Frame<'_> = serde_json::from_str(t).expect("valid frame");
        assert_eq!(f.ty.as_str(), "message");
        assert!(matches!(f.text, Some(Str(Cow::Borrowed(_)))));
        assert_eq!(
            (f.seq, f.session_id(), f.from(), f.text()),
            (Some(7), Some("s-1"), Some("customer"), Some("3:14:xx"))
        );
        let e: Frame<'_> = serde_json::from_str(r#"{"type":"error","ref":7,"code":"rate_limited","message":"slow \"down\"","retry_after_ms":1200}"#)
            .expect("valid frame");
        assert_eq!(
            (e.ref_u64(), e.code(), e.retry_after_ms),
            (Some(7), Some("rate_limited"), Some(1200))
        );
        assert_eq!(e.message.expect("message").as_str(), "slow \"down\"");
        let s: Frame<'_> =
            serde_json::from_str(r#"{"type":"ack","ref":"abc"}"#).expect("valid frame");
        assert_eq!(s.ref_u64(), None);
    }

    #[test]
    fn host_port() {
        assert_eq!(split_host_port("127.0.0.1:8080"), Some(("127.0.0.1", 8080)));
        assert_eq!(split_host_port("localhost"), Some(("localhost", 80)));
        assert_eq!(split_host_port("[::1]:9"), Some(("[::1]", 9)));
        assert_eq!(split_host_port("h:x"), None);
    }
}

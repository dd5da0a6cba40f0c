//! WebSocket upgrades: `/ws` for customers, `/admin/ws` for agents.
//!
//! actix-http hands every `Upgrade: websocket` request to [`upgrade`] with
//! the TCP stream (its HTTP/1 dispatcher and buffers are dropped then; see
//! `socket.rs` for why). Origin, limits and (for agents) the admin session
//! are checked before the handshake, so a refused client gets a plain HTTP
//! status and no socket.

pub mod admin_session;
pub mod agent;
pub mod conn;
pub mod customer;
pub mod direct;
pub mod socket;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use actix_codec::Framed;
use actix_http::body::BodySize;
use actix_http::header::HeaderMap;
use actix_http::{h1, ws as ws_proto, ConnectionType, Request, RequestHead};
use actix_web::ResponseError;
use duet_actors::outbound::ConnHandle;
use duet_actors::registry::AgentConnect;
use futures_util::SinkExt;
use tokio::net::TcpStream;

use crate::app::AppState;
use crate::auth;
use crate::http::client_ip::client_ip;
use crate::http::error::HttpError;
use crate::metrics::RoleLabel;
use socket::{FrameReader, WsSocket};

/// PROTOCOL.md: no `Origin` (a non-browser client) passes; one listed in
/// `DUET_ALLOWED_ORIGINS` passes; so does duet's own origin (the demo and
/// admin pages it serves: the `Origin`'s host is the request's `Host`, which
/// a foreign page cannot choose). Anything else is foreign: 403.
pub fn origin_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let Some(origin) = headers.get(actix_http::header::ORIGIN) else { return true };
    let Ok(origin) = origin.to_str() else { return false };
    if allowed.iter().any(|a| a.eq_ignore_ascii_case(origin)) {
        return true;
    }
    let host = headers.get(actix_http::header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
    matches!((origin_host, host), (Some(o), Some(h)) if !h.is_empty() && o.eq_ignore_ascii_case(h))
}

fn hello(state: &AppState) -> String {
    format!(
        r#"{{"type":"hello","protocol":1,"node":{},"heartbeat_s":{},"max_message_bytes":{}}}"#,
        serde_json::Value::from(state.config.node_id.as_str()),
        state.config.heartbeat.as_secs(),
        state.config.max_message_bytes
    )
}

/// Which socket a path opens.
#[derive(Clone, Copy)]
enum Route {
    Customer,
    Agent,
}

/// The upgrade service: answers the handshake (or the refusal) and starts
/// the connection's task. Never fails: every refusal is an HTTP answer.
pub async fn upgrade(req: Request, framed: Framed<TcpStream, h1::Codec>, state: Arc<AppState>) {
    let head = req.head();
    let route = match head.uri.path() {
        "/ws" => Route::Customer,
        "/admin/ws" => Route::Agent,
        _ => return refuse(framed, HttpError::NotFound("no such route")).await,
    };
    if let Err(e) = ws_proto::verify_handshake(head) {
        return refuse(framed, HttpError::BadRequest(format!("not a WebSocket handshake: {e}"))).await;
    }
    let ip = match precheck(head, &state) {
        Ok(ip) => ip,
        Err(e) => return refuse(framed, e).await,
    };
    let agent = match route {
        Route::Customer => None,
        Route::Agent => match auth::require_admin(&head.headers, &state.config, &state.db).await {
            Ok((admin, token_hash)) => Some((auth::agent_info(&admin), token_hash)),
            Err(e) => {
                state.metrics.upgrades_refused.inc();
                return refuse(framed, e).await;
            }
        },
    };
    let Some(ws) = handshake(head, framed, state.config.max_message_bytes).await else { return };
    match agent {
        None => customer_conn(ws, ip, state),
        Some((info, token_hash)) => {
            actix_web::rt::spawn(agent_conn(ws, info, token_hash, state));
        }
    }
}

fn precheck(head: &RequestHead, state: &AppState) -> Result<IpAddr, HttpError> {
    if !origin_allowed(&head.headers, &state.config.allowed_origins) {
        state.metrics.upgrades_refused.inc();
        return Err(HttpError::Forbidden("origin not allowed"));
    }
    let ip = client_ip(head.peer_addr.map(|a: SocketAddr| a.ip()), &head.headers, &state.config.trusted_proxies);
    state.limits.upgrade(ip).map_err(|e| {
        state.metrics.upgrades_refused.inc();
        HttpError::from(e)
    })?;
    Ok(ip)
}

/// Sends `101 Switching Protocols` and takes the stream over; `None` when
/// the client is already gone.
async fn handshake(head: &RequestHead, mut framed: Framed<TcpStream, h1::Codec>, max: usize) -> Option<WsSocket> {
    let res = ws_proto::handshake_response(head).finish().drop_body();
    framed.send((res, BodySize::None).into()).await.ok()?;
    let parts = framed.into_parts();
    // Latency over bytes: each frame is a whole message.
    let _ = parts.io.set_nodelay(true);
    // Whatever the client sent right behind its request is already frames.
    Some(WsSocket::new(parts.io, FrameReader::with_leftover(max, parts.read_buf)))
}

/// Answers the upgrade request with the error's status and JSON body and
/// closes the connection.
async fn refuse(mut framed: Framed<TcpStream, h1::Codec>, e: HttpError) {
    let res: actix_http::Response<_> = e.error_response().into();
    let (mut res, body) = res.into_parts();
    let Ok(body) = actix_web::body::to_bytes(body).await else { return };
    res.head_mut().set_connection_type(ConnectionType::Close);
    // RFC 6455 4.4: a refused handshake names the version duet speaks.
    res.headers_mut().insert(
        actix_http::header::SEC_WEBSOCKET_VERSION,
        actix_http::header::HeaderValue::from_static("13"),
    );
    let len = body.len() as u64;
    let _ = framed.send((res.drop_body(), BodySize::Sized(len)).into()).await;
    let _ = framed.send(h1::Message::Chunk(Some(body))).await;
    let _ = framed.send(h1::Message::Chunk(None)).await;
}

fn limits(state: &AppState) -> conn::Limits {
    conn::Limits { heartbeat: state.config.heartbeat, rate_limits: state.config.rate_limits }
}

/// A socket's place in the node's connection table (closed all at once on
/// shutdown) and in the connections gauge, for as long as it is held.
pub struct Registration {
    state: Arc<AppState>,
    conn_id: u64,
    role: &'static str,
}

impl Registration {
    fn new(state: &Arc<AppState>, handle: &ConnHandle, role: &'static str) -> Registration {
        state.conns.lock().insert(handle.conn_id, handle.clone());
        let label = RoleLabel { role };
        state.metrics.connections.get_or_create(&label).inc();
        state.metrics.connections_total.get_or_create(&label).inc();
        Registration { state: state.clone(), conn_id: handle.conn_id, role }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.state.conns.lock().remove(&self.conn_id);
        self.state.metrics.connections.get_or_create(&RoleLabel { role: self.role }).dec();
    }
}

/// Starts a customer's socket task. Everything is set up here, so the task
/// is the socket loop alone (its size is what an idle customer costs).
fn customer_conn(mut ws: WsSocket, ip: IpAddr, state: Arc<AppState>) {
    let conn_id = conn::next_conn_id();
    let (handle, inbox) = ConnHandle::channel(conn_id, state.config.outbox_frames);
    ws.queue_text(hello(&state));
    let registration = Registration::new(&state, &handle, "customer");
    tracing::debug!(conn_id, %ip, "customer connected");
    let role = customer::CustomerRole::new(state.clone(), handle, ip, registration);
    let task = conn::run(ws, inbox, role, limits(&state), state.metrics.clone());
    tracing::trace!(bytes = std::mem::size_of_val(&task), "customer connection task size");
    actix_web::rt::spawn(task);
}

async fn agent_conn(ws: WsSocket, info: duet_actors::domain::AgentInfo, token_hash: String, state: Arc<AppState>) {
    let conn_id = conn::next_conn_id();
    // Agents get the relayed messages: written from the session's thread
    // when their loop is asleep (src/ws/direct.rs says why).
    let (mut ws, stream) = ws.into_shared();
    let direct = Arc::new(direct::DirectSocket::new(stream, state.metrics.frames_direct.clone()));
    let (handle, inbox) =
        ConnHandle::with_direct(conn_id, state.config.outbox_frames, Some(direct.clone()));
    let span = tracing::info_span!("conn", conn_id, role = "agent", agent_id = %info.id);
    let registration = Registration::new(&state, &handle, "agent");
    let session_watch = admin_session::AdminSessionWatch::start(&state, &handle, token_hash);
    let body = async move {
        ws.queue_text(hello(&state));
        if let Ok(addr) = state.deps.registry.send(AgentConnect { info, conn: handle.clone() }).await {
            let role = agent::AgentRole {
                app: state.clone(),
                handle,
                agent: addr,
                direct,
                _registration: registration,
                _session_watch: session_watch,
            };
            conn::run(ws, inbox, role, limits(&state), state.metrics.clone()).await;
        }
    };
    tracing::Instrument::instrument(body, span).await;
}

//! WebSocket upgrades: `/ws` for customers, `/admin/ws` for agents.
//!
//! Origin, limits and (for agents) the admin session are checked before the
//! upgrade, so a refused client gets a plain HTTP status and no socket.

pub mod agent;
pub mod conn;
pub mod customer;

use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use duet_actors::outbound::ConnHandle;
use duet_actors::registry::AgentConnect;

use crate::app::AppState;
use crate::auth;
use crate::http::client_ip::client_ip;
use crate::http::error::HttpError;
use crate::metrics::RoleLabel;

/// PROTOCOL.md: no `Origin` (a non-browser client) passes; a foreign one is 403.
pub fn origin_allowed(req: &HttpRequest, allowed: &[String]) -> bool {
    match req.headers().get(actix_web::http::header::ORIGIN) {
        None => true,
        Some(o) => o.to_str().map(|o| allowed.iter().any(|a| a.eq_ignore_ascii_case(o))).unwrap_or(false),
    }
}

fn hello(state: &AppState) -> String {
    format!(
        r#"{{"type":"hello","protocol":1,"node":{},"heartbeat_s":{},"max_message_bytes":{}}}"#,
        serde_json::Value::from(state.config.node_id.as_str()),
        state.config.heartbeat.as_secs(),
        state.config.max_message_bytes
    )
}

fn precheck(req: &HttpRequest, state: &AppState) -> Result<std::net::IpAddr, HttpError> {
    if !origin_allowed(req, &state.config.allowed_origins) {
        state.metrics.upgrades_refused.inc();
        return Err(HttpError::Forbidden("origin not allowed"));
    }
    let ip = client_ip(req, &state.config.trusted_proxies);
    state.limits.upgrade(ip).map_err(|e| {
        state.metrics.upgrades_refused.inc();
        HttpError::from(e)
    })?;
    Ok(ip)
}

fn limits(state: &AppState) -> conn::Limits {
    conn::Limits { heartbeat: state.config.heartbeat, rate_limits: state.config.rate_limits }
}

fn open_stream(
    req: &HttpRequest,
    body: web::Payload,
    state: &AppState,
) -> Result<(HttpResponse, actix_ws::Session, actix_ws::AggregatedMessageStream), actix_web::Error> {
    let (res, session, stream) = actix_ws::handle(req, body)?;
    let max = state.config.max_message_bytes;
    let stream = stream.max_frame_size(max).aggregate_continuations().max_continuation_size(max);
    Ok((res, session, stream))
}

pub async fn customer(req: HttpRequest, body: web::Payload, state: web::Data<AppState>) -> Result<HttpResponse, actix_web::Error> {
    let ip = precheck(&req, &state)?;
    let (res, mut session, stream) = open_stream(&req, body, &state)?;
    let state: Arc<AppState> = state.into_inner();
    let conn_id = conn::next_conn_id();
    let (handle, inbox) = ConnHandle::channel(conn_id, state.config.outbox_frames);
    let span = tracing::info_span!("conn", conn_id, role = "customer", node = %state.config.node_id);
    let fut = tracing::Instrument::instrument(
        async move {
            state.conns.lock().insert(conn_id, handle.clone());
            let label = RoleLabel { role: "customer" };
            state.metrics.connections.get_or_create(&label).inc();
            state.metrics.connections_total.get_or_create(&label).inc();
            if session.text(hello(&state)).await.is_ok() {
                let role = customer::CustomerRole::new(state.clone(), handle, ip);
                conn::run(session, stream, inbox, role, limits(&state), &state.metrics).await;
            }
            state.conns.lock().remove(&conn_id);
            state.metrics.connections.get_or_create(&label).dec();
        },
        span,
    );
    tracing::debug!(bytes = std::mem::size_of_val(&fut), "customer connection task size");
    actix_web::rt::spawn(fut);
    Ok(res)
}

pub async fn agent(req: HttpRequest, body: web::Payload, state: web::Data<AppState>) -> Result<HttpResponse, actix_web::Error> {
    precheck(&req, &state)?;
    let (admin, _) = auth::require_admin(&req, &state.config, &state.db).await.inspect_err(|_| { state.metrics.upgrades_refused.inc(); })?;
    let (res, mut session, stream) = open_stream(&req, body, &state)?;
    let state: Arc<AppState> = state.into_inner();
    let conn_id = conn::next_conn_id();
    let (handle, inbox) = ConnHandle::channel(conn_id, state.config.outbox_frames);
    let info = auth::agent_info(&admin);
    let span = tracing::info_span!("conn", conn_id, role = "agent", agent_id = %info.id, node = %state.config.node_id);
    actix_web::rt::spawn(tracing::Instrument::instrument(
        async move {
            state.conns.lock().insert(conn_id, handle.clone());
            let label = RoleLabel { role: "agent" };
            state.metrics.connections.get_or_create(&label).inc();
            state.metrics.connections_total.get_or_create(&label).inc();
            if session.text(hello(&state)).await.is_ok() {
                if let Ok(addr) = state.deps.registry.send(AgentConnect { info, conn: handle.clone() }).await {
                    let role = agent::AgentRole { app: state.clone(), handle, agent: addr };
                    conn::run(session, stream, inbox, role, limits(&state), &state.metrics).await;
                }
            }
            state.conns.lock().remove(&conn_id);
            state.metrics.connections.get_or_create(&label).dec();
        },
        span,
    ));
    Ok(res)
}

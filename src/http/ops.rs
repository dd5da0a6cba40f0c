//! `/health`, `/ready`, `/metrics`: what operators and load balancers poll.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use duet_actors::registry::GetStats;
use serde_json::json;
use subtle::ConstantTimeEq;

use super::error::HttpError;
use crate::app::AppState;

/// Alive: the process answers. Never touches a dependency.
pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok", "node": state.config.node_id, "version": env!("CARGO_PKG_VERSION")}))
}

/// Ready to take customers: the database answers now (and coordination is
/// in-process, or Redis answers).
pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    let db_ok = state.db.ping().await.is_ok();
    let redis = if state.config.redis_url.is_some() { "unsupported" } else { "in-process" };
    let queue = if state.config.queue_enabled { "enabled" } else { "disabled" };
    let body = json!({
        "status": if db_ok { "ready" } else { "unavailable" },
        "db": if db_ok { "ok" } else { "down" },
        "db_backend": state.db.backend().as_str(),
        "redis": redis,
        "queue": queue,
        "node": state.config.node_id,
    });
    if db_ok {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().insert_header((header::RETRY_AFTER, "1")).json(body)
    }
}

pub async fn metrics(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, HttpError> {
    if let Some(token) = &state.config.metrics_token {
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let ok: bool = presented.as_bytes().ct_eq(token.expose().as_bytes()).into();
        if !ok {
            return Err(HttpError::Unauthorized("metrics need the bearer token"));
        }
    }
    let stats = state.deps.registry.send(GetStats).await.map_err(|_| HttpError::Internal)?;
    let body = state.metrics.render(&stats, &state.db.stats());
    // OpenMetrics to a scraper that asks for it (Prometheus does), the
    // classic text format to everyone else (curl, older tools).
    let openmetrics = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    Ok(if openmetrics {
        HttpResponse::Ok().content_type("application/openmetrics-text; version=1.0.0; charset=utf-8").body(body)
    } else {
        HttpResponse::Ok().content_type("text/plain; version=0.0.4; charset=utf-8").body(crate::metrics::to_prometheus_text(&body))
    })
}

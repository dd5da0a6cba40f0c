//! HTTP routes (PROTOCOL.md, HTTP) and the headers every answer carries.

pub mod admin;
pub mod client_ip;
pub mod error;
pub mod events;
pub mod ops;
pub mod pages;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderValue};
use actix_web::middleware::{from_fn, DefaultHeaders, Next};
use actix_web::{web, HttpResponse};
use tracing::Instrument;

use crate::app::AppState;
use error::HttpError;

/// Bodies are JSON objects of at most 64 KiB.
pub const BODY_LIMIT: usize = 64 * 1024;

/// Strict CSP: no inline script or style anywhere.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self' ws: wss:; media-src 'self' blob:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'";

/// What is wrong with a JSON body, in the client's terms: serde's own
/// message names duet's Rust types ("expected struct OtpVerify"), which is
/// internal detail (PROTOCOL.md: none in bodies).
fn json_problem(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            format!("the body is not valid JSON: line {}, column {}", e.line(), e.column())
        }
        Category::Data => {
            let text = e.to_string();
            match text.strip_prefix("missing field `").and_then(|rest| rest.split_once('`')) {
                Some((field, _)) => format!("missing field {field}"),
                None => "the body must be an object with this endpoint's fields".to_owned(),
            }
        }
    }
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    // Bodies are read as JSON whatever their Content-Type says (scripts
    // often send none, or curl's form type). Safe: the only cookie-authed
    // POST (logout) has a SameSite=Strict cookie, so no other site's form
    // can make one.
    let json = web::JsonConfig::default().limit(BODY_LIMIT).content_type_required(false).error_handler(|err, _req| {
        let e = match &err {
            actix_web::error::JsonPayloadError::Overflow { .. } | actix_web::error::JsonPayloadError::OverflowKnownLength { .. } => HttpError::TooLarge,
            actix_web::error::JsonPayloadError::Deserialize(e) => HttpError::BadRequest(json_problem(e)),
            _ => HttpError::BadRequest("the body could not be read".to_owned()),
        };
        actix_web::Error::from(e)
    });
    // serde_urlencoded's and the path's messages name the parameter and the
    // problem; actix's wrappers around them add only their own type names.
    let query = web::QueryConfig::default().error_handler(|err, _req| {
        let detail = match &err {
            actix_web::error::QueryPayloadError::Deserialize(e) => e.to_string(),
            _ => "unreadable".to_owned(),
        };
        HttpError::BadRequest(format!("invalid query: {detail}")).into()
    });
    let path = web::PathConfig::default().error_handler(|err, _req| {
        let detail = match &err {
            actix_web::error::PathError::Deserialize(e) => e.to_string(),
            _ => "unreadable".to_owned(),
        };
        HttpError::BadRequest(format!("invalid path: {detail}")).into()
    });
    cfg.app_data(json).app_data(query).app_data(path).service(
        web::scope("")
            .wrap(
                DefaultHeaders::new()
                    .add((header::CONTENT_SECURITY_POLICY, CSP))
                    .add((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
                    .add((header::X_FRAME_OPTIONS, "DENY"))
                    .add((header::REFERRER_POLICY, "no-referrer"))
                    .add(("Cross-Origin-Opener-Policy", "same-origin"))
                    .add(("Permissions-Policy", "camera=(), geolocation=(), microphone=(self)")),
            )
            .wrap(from_fn(cors))
            .wrap(from_fn(request_span))
            .route("/health", web::get().to(ops::health))
            .route("/ready", web::get().to(ops::ready))
            .route("/metrics", web::get().to(ops::metrics))
            // Upgrades never get here (src/ws takes them); a plain GET does.
            .route("/ws", web::get().to(not_an_upgrade))
            .route("/admin/ws", web::get().to(not_an_upgrade))
            .route("/admin/otp/request", web::post().to(admin::otp_request))
            .route("/admin/otp/verify", web::post().to(admin::otp_verify))
            .route("/admin/logout", web::post().to(admin::logout))
            .route("/api/queues", web::get().to(admin::queues))
            .route("/api/sessions/{id}/events", web::get().to(events::list))
            .route("/admin", web::get().to(pages::admin))
            .route("/", web::get().to(pages::demo))
            .route("/static/{file}", web::get().to(pages::asset))
            .default_service(web::to(|| async { Err::<HttpResponse, _>(HttpError::NotFound("no such route")) })),
    );
}

/// Every request runs in a span with its request id (the client's
/// `X-Request-Id` when it sends a sane one, else a fresh one), which the
/// answer carries back: what the handler logs (logins, audit, failures) can
/// be tied to the request a user reports.
async fn request_span(req: ServiceRequest, next: Next<impl MessageBody + 'static>) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let span = tracing::info_span!("http", request_id = %id, method = %req.method(), path = %req.path());
    let started = std::time::Instant::now();
    let mut res = next.call(req).instrument(span.clone()).await?;
    let (status, ms) = (res.status().as_u16(), started.elapsed().as_secs_f64() * 1e3);
    span.in_scope(|| {
        if status >= 500 {
            tracing::warn!(status, ms, "request failed");
        } else {
            tracing::debug!(status, ms, "request");
        }
    });
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert(header::HeaderName::from_static(REQUEST_ID), v);
    }
    Ok(res)
}

const REQUEST_ID: &str = "x-request-id";

async fn not_an_upgrade() -> Result<HttpResponse, HttpError> {
    Err(HttpError::BadRequest("this path takes a WebSocket upgrade (Connection: Upgrade, Upgrade: websocket)".to_owned()))
}

/// CORS for the origins in `DUET_ALLOWED_ORIGINS` only; a preflight from one
/// of them is answered here.
async fn cors(req: ServiceRequest, next: Next<impl MessageBody + 'static>) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let origin = req.headers().get(header::ORIGIN).cloned();
    let allowed = match (&origin, req.app_data::<web::Data<AppState>>()) {
        (Some(o), Some(state)) => o
            .to_str()
            .map(|o| state.config.allowed_origins.iter().any(|a| a.eq_ignore_ascii_case(o)))
            .unwrap_or(false),
        _ => false,
    };
    if allowed && req.method() == actix_web::http::Method::OPTIONS {
        let mut res = HttpResponse::NoContent();
        if let Some(o) = &origin {
            res.insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, o.clone()));
        }
        res.insert_header((header::ACCESS_CONTROL_ALLOW_METHODS, "GET, POST, OPTIONS"))
            .insert_header((header::ACCESS_CONTROL_ALLOW_HEADERS, "authorization, content-type"))
            .insert_header((header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true"))
            .insert_header((header::ACCESS_CONTROL_MAX_AGE, "600"))
            .insert_header((header::VARY, "Origin"));
        return Ok(req.into_response(res.finish()).map_into_right_body());
    }
    let mut res = next.call(req).await?;
    if allowed {
        if let Some(o) = origin {
            let h = res.headers_mut();
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o);
            h.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
            h.insert(header::VARY, HeaderValue::from_static("Origin"));
        }
    }
    Ok(res.map_into_left_body())
}

#[cfg(test)]
mod tests {
    use super::json_problem;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Internal {
        admin_id: String,
        code: String,
    }

    fn problem(body: &str) -> String {
        json_problem(&serde_json::from_str::<Internal>(body).expect_err("invalid"))
    }

    #[test]
    fn json_problems_name_no_rust_type() {
        assert_eq!(problem(r#"{"admin_id":"a"}"#), "missing field code");
        assert_eq!(problem("{\"admin_id\":"), "the body is not valid JSON: line 1, column 12");
        for body in ["[1]", "\"str\"", "7", r#"{"admin_id":1,"code":"x"}"#] {
            let p = problem(body);
            assert!(!p.contains("Internal") && !p.contains("struct"), "{body}: {p}");
            assert!(p.contains("must be an object"), "{body}: {p}");
        }
    }
}

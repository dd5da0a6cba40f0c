//! Admin login by one-time code, logout, and the dashboard over HTTP.

use actix_web::cookie::{time::Duration as CookieDuration, Cookie, SameSite};
use actix_web::{web, HttpRequest, HttpResponse};
use duet_actors::domain::now_ms;
use duet_actors::registry::GetDashboard;
use serde::Deserialize;
use serde_json::json;

use super::client_ip::request_ip;
use super::error::HttpError;
use crate::app::AppState;
use crate::auth;
use crate::protocol::encode::DashboardFrame;
use crate::protocol::event_json::rfc3339_ms;
use crate::storage::OtpOutcome;

#[derive(Deserialize)]
pub struct OtpRequest {
    admin_id: serde_json::Value,
}

#[derive(Deserialize)]
pub struct OtpVerify {
    admin_id: serde_json::Value,
    code: serde_json::Value,
}

fn admin_id(v: &serde_json::Value) -> Result<String, HttpError> {
    match v.as_str() {
        Some(s) if !s.is_empty() && s.chars().count() <= 64 && !s.chars().any(char::is_control) => Ok(s.to_owned()),
        _ => Err(HttpError::BadRequest("`admin_id` must be a string of 1 to 64 characters".to_owned())),
    }
}

/// 202 whether or not the admin exists (no enumeration); a code is sent
/// only to a known, enabled admin.
pub async fn otp_request(req: HttpRequest, body: web::Json<OtpRequest>, state: web::Data<AppState>) -> Result<HttpResponse, HttpError> {
    let id = admin_id(&body.admin_id)?;
    state.limits.otp_request(request_ip(&req, &state.config.trusted_proxies), &id)?;
    state.metrics.otp_requests.inc();
    if let Some(admin) = state.db.get_admin(&id).await?.filter(|a| !a.disabled) {
        let code = auth::new_code();
        let expires = now_ms() + state.config.otp_ttl.as_millis() as i64;
        state.db.store_otp(&admin.id, &duet_actors::domain::hash_secret(&code), expires).await?;
        state.notifier.send_code(&admin, &code, &rfc3339_ms(expires));
        let _ = state.db.audit(&admin.id, "otp_requested", "").await;
    }
    Ok(HttpResponse::Accepted().json(json!({"status": "sent"})))
}

pub async fn otp_verify(req: HttpRequest, body: web::Json<OtpVerify>, state: web::Data<AppState>) -> Result<HttpResponse, HttpError> {
    let id = admin_id(&body.admin_id)?;
    let code = match body.code.as_str() {
        Some(c) if (4..=12).contains(&c.len()) && c.chars().all(|d| d.is_ascii_digit()) => c.to_owned(),
        _ => return Err(HttpError::BadRequest("`code` must be a string of digits".to_owned())),
    };
    state.limits.otp_verify(request_ip(&req, &state.config.trusted_proxies))?;
    match auth::check_code(&state.db, &id, &code).await? {
        OtpOutcome::Ok => {}
        OtpOutcome::Wrong | OtpOutcome::Expired => {
            state.metrics.otp_failures.inc();
            let _ = state.db.audit(&id, "otp_failed", "").await;
            return Err(HttpError::Unauthorized("wrong or expired code"));
        }
        OtpOutcome::Locked { until_ms } => {
            state.metrics.otp_failures.inc();
            let _ = state.db.audit(&id, "otp_locked", "").await;
            return Err(HttpError::RateLimited {
                message: "too many wrong codes; this admin is locked for a while",
                retry_after_ms: (until_ms - now_ms()).max(1000) as u64,
            });
        }
    }
    let (token, expires_at_ms) = auth::mint_login(&state.db, &state.config, &id).await?;
    let _ = state.db.audit(&id, "login", "otp").await;
    let cookie = Cookie::build(state.config.cookie_name(), token.clone())
        .path("/")
        .http_only(true)
        .secure(state.config.is_production())
        .same_site(SameSite::Strict)
        .max_age(CookieDuration::seconds(state.config.admin_max_ttl.as_secs() as i64))
        .finish();
    Ok(HttpResponse::Ok().cookie(cookie).json(json!({"token": token, "expires_at": rfc3339_ms(expires_at_ms)})))
}

pub async fn logout(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, HttpError> {
    let (admin, hash) = auth::require_admin(req.headers(), &state.config, &state.db).await?;
    state.db.revoke_admin_session(&hash, now_ms()).await?;
    let closed = crate::ws::admin_session::close_signed_out(&state, &hash);
    let _ = state.db.audit(&admin.id, "logout", &format!("sockets closed: {closed}")).await;
    let mut gone = Cookie::build(state.config.cookie_name(), "").path("/").http_only(true).secure(state.config.is_production()).finish();
    gone.make_removal();
    Ok(HttpResponse::NoContent().cookie(gone).finish())
}

pub async fn queues(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, HttpError> {
    auth::require_admin(req.headers(), &state.config, &state.db).await?;
    let d = state.deps.registry.send(GetDashboard).await.map_err(|_| HttpError::Internal)?;
    Ok(HttpResponse::Ok().json(DashboardFrame::new("dashboard", &d)))
}

//! Admin identity: one-time codes, login tokens, and resolving a request
//! (HTTP or WebSocket upgrade alike) to a signed-in admin.
//!
//! Tokens and codes are random; only their SHA-256 is stored, so a leaked
//! database logs nobody in. Revocation is a row update, which every node
//! sees at its next lookup.

use std::sync::Arc;

use actix_web::cookie::Cookie;
use actix_web::http::header::{self, HeaderMap};
use duet_actors::domain::{hash_secret, now_ms, AgentInfo, AgentKind};
use rand::Rng;

use crate::config::Config;
use crate::http::error::HttpError;
use crate::storage::{AdminRow, Database, OtpOutcome, OtpPolicy};

/// A fresh login token: 256 random bits, hex.
pub fn new_token() -> String {
    let mut b = [0u8; 32];
    rand::rng().fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A one-time code: 8 random digits.
pub fn new_code() -> String {
    format!("{:08}", rand::rng().random_range(0..100_000_000u32))
}

/// The token a request presents: `Authorization: Bearer …` first, then the
/// session cookie.
pub fn presented_token(headers: &HeaderMap, cfg: &Config) -> Option<String> {
    if let Some(v) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        if let Some(t) = v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")) {
            let t = t.trim();
            if !t.is_empty() {
                return Some(t.to_owned());
            }
        }
    }
    let name = cfg.cookie_name();
    headers
        .get_all(header::COOKIE)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| Cookie::parse(pair.trim()).ok())
        .find(|c| c.name() == name)
        .map(|c| c.value().to_owned())
        .filter(|v| !v.is_empty())
}

/// The signed-in admin behind a request, or `unauthorized`.
pub async fn require_admin(headers: &HeaderMap, cfg: &Config, db: &Database) -> Result<(AdminRow, String), HttpError> {
    let token = presented_token(headers, cfg).ok_or(HttpError::Unauthorized("sign in first"))?;
    let hash = hash_secret(&token);
    match db.admin_session(&hash, now_ms()).await? {
        Some((admin, _)) => Ok((admin, hash)),
        None => Err(HttpError::Unauthorized("the session is invalid or has expired")),
    }
}

pub fn agent_info(admin: &AdminRow) -> AgentInfo {
    AgentInfo { id: Arc::from(admin.id.as_str()), name: Arc::from(admin.name.as_str()), kind: AgentKind::Human }
}

/// Where one-time codes go.
pub trait Notifier: Send + Sync {
    /// Hands the code (valid until `expires_at`, RFC 3339) over for
    /// delivery. It returns at once whatever becomes of it (the answer takes
    /// the same time for known and unknown admins); a notifier logs and
    /// counts what it could not deliver.
    fn send_code(&self, admin: &AdminRow, code: &str, expires_at: &str);
}

/// Development only (refused in production by `Config::validate`): the code
/// is written to the log, as one event with `admin_id` and `code`, so a
/// person or test on the same machine can sign in.
pub struct LogNotifier;

impl Notifier for LogNotifier {
    fn send_code(&self, admin: &AdminRow, code: &str, _expires_at: &str) {
        tracing::info!(admin_id = %admin.id, code = %code, "one-time code (development: no notifier configured)");
    }
}

/// Mints a login for an admin (the CLI's `duet admin token`, and OTP verify).
pub fn mint_login_sync(db: &Database, cfg: &Config, admin_id: &str) -> Result<(String, i64), crate::storage::StorageError> {
    let token = new_token();
    let row = db.create_admin_session_sync(
        admin_id,
        &hash_secret(&token),
        now_ms(),
        cfg.admin_idle_ttl.as_millis() as i64,
        cfg.admin_max_ttl.as_millis() as i64,
    )?;
    Ok((token, row.expires_at_ms))
}

pub async fn mint_login(db: &Database, cfg: &Config, admin_id: &str) -> Result<(String, i64), HttpError> {
    let token = new_token();
    let row = db
        .create_admin_session(
            admin_id,
            &hash_secret(&token),
            now_ms(),
            cfg.admin_idle_ttl.as_millis() as i64,
            cfg.admin_max_ttl.as_millis() as i64,
        )
        .await?;
    Ok((token, row.expires_at_ms))
}

/// Checks a presented code with the lockout policy of PROTOCOL.md.
pub async fn check_code(db: &Database, admin_id: &str, code: &str) -> Result<OtpOutcome, HttpError> {
    Ok(db.verify_otp(admin_id, code, now_ms(), OtpPolicy::default()).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_codes_have_their_shape() {
        let t = new_token();
        assert_eq!(t.len(), 64);
        assert_ne!(t, new_token());
        let c = new_code();
        assert_eq!(c.len(), 8);
        assert!(c.chars().all(|d| d.is_ascii_digit()));
    }
}

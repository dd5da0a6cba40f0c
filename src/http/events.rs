//! `GET /api/sessions/{id}/events`: a session's history with `after` /
//! `before` cursors, for admins or the session's own resume token.

use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use duet_actors::domain::secret_matches;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::error::HttpError;
use crate::app::AppState;
use crate::auth;
use crate::protocol::event_json::encode_event;

pub const PAGE_MAX: u32 = 200;
pub const PAGE_DEFAULT: u32 = 50;

#[derive(Deserialize)]
pub struct Cursor {
    after: Option<String>,
    before: Option<String>,
    limit: Option<String>,
}

fn number(name: &str, v: &Option<String>) -> Result<Option<i64>, HttpError> {
    match v {
        None => Ok(None),
        Some(s) => s
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .map(Some)
            .ok_or_else(|| HttpError::BadRequest(format!("`{name}` must be a non-negative integer"))),
    }
}

/// Admin, or the session's resume token as a bearer token.
async fn authorize(req: &HttpRequest, state: &AppState, id: &Arc<str>) -> Result<(), HttpError> {
    if auth::require_admin(req.headers(), &state.config, &state.db).await.is_ok() {
        return Ok(());
    }
    let token = auth::presented_token(req.headers(), &state.config).ok_or(HttpError::Unauthorized("sign in or present the session's resume token"))?;
    let snap = state.deps.store.load_session(id).await.map_err(|_| HttpError::Unavailable { message: "the database is unavailable", retry_after_ms: 1000 })?;
    match snap {
        Some(s) if secret_matches(&token, &s.record.resume_token_hash) => Ok(()),
        _ => Err(HttpError::Unauthorized("sign in or present the session's resume token")),
    }
}

pub async fn list(req: HttpRequest, path: web::Path<String>, q: web::Query<Cursor>, state: web::Data<AppState>) -> Result<HttpResponse, HttpError> {
    let id: Arc<str> = Arc::from(path.into_inner());
    if id.is_empty() || id.len() > 64 {
        return Err(HttpError::BadRequest("invalid session id".to_owned()));
    }
    let after = number("after", &q.after)?;
    let before = number("before", &q.before)?;
    let limit = number("limit", &q.limit)?.unwrap_or(i64::from(PAGE_DEFAULT));
    if limit < 1 {
        return Err(HttpError::BadRequest("`limit` must be at least 1".to_owned()));
    }
    // Larger asks get the largest page (with `next_after` when more exist).
    let limit = limit.min(i64::from(PAGE_MAX)) as u32;
    if after.is_some() && before.is_some() {
        return Err(HttpError::BadRequest("give `after` or `before`, not both".to_owned()));
    }
    authorize(&req, &state, &id).await?;
    let store = &state.deps.store;
    let unavailable = |_| HttpError::Unavailable { message: "the database is unavailable", retry_after_ms: 1000 };
    let (events, next_after) = match before {
        Some(b) => (store.events_before(&id, b, limit).await.map_err(unavailable)?, None),
        None => {
            // One more than asked tells whether a next page exists.
            let mut ev = store.events_after(&id, after.unwrap_or(0), limit + 1).await.map_err(unavailable)?;
            let more = ev.len() > limit as usize;
            ev.truncate(limit as usize);
            let next = if more { ev.last().map(|e| e.seq) } else { None };
            (ev, next)
        }
    };
    if events.is_empty() && after.unwrap_or(0) == 0 && before.is_none() {
        let exists = store.load_session(&id).await.map_err(unavailable)?.is_some();
        if !exists {
            return Err(HttpError::NotFound("no such session"));
        }
    }
    let raw: Vec<Box<RawValue>> = events.iter().filter_map(|e| RawValue::from_string(encode_event(e)).ok()).collect();
    let body = match next_after {
        Some(n) => serde_json::json!({"events": raw, "next_after": n}),
        None => serde_json::json!({"events": raw}),
    };
    Ok(HttpResponse::Ok().json(body))
}

//! HTTP errors: one enum, mapped once to a status, a protocol code and the
//! JSON body `{"error":{"code","message"}}`. Causes are logged, never sent.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use duet_actors::error::ActorError;
use serde::Serialize;

use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0}")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(&'static str),
    #[error("request body too large")]
    TooLarge,
    #[error("{message}")]
    RateLimited { message: &'static str, retry_after_ms: u64 },
    #[error("{message}")]
    Unavailable { message: &'static str, retry_after_ms: u64 },
    #[error("internal error")]
    Internal,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'static str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
}

impl HttpError {
    /// Status and protocol code of each variant.
    pub fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            HttpError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            HttpError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            HttpError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            HttpError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            HttpError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            HttpError::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            HttpError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            HttpError::Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            HttpError::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    fn retry_after_ms(&self) -> Option<u64> {
        match self {
            HttpError::RateLimited { retry_after_ms, .. } | HttpError::Unavailable { retry_after_ms, .. } => Some(*retry_after_ms),
            _ => None,
        }
    }
}

impl ResponseError for HttpError {
    fn status_code(&self) -> StatusCode {
        self.parts().0
    }

    fn error_response(&self) -> HttpResponse {
        let (status, code) = self.parts();
        let message = self.to_string();
        let retry = self.retry_after_ms();
        let mut res = HttpResponse::build(status);
        if let Some(ms) = retry {
            res.insert_header((header::RETRY_AFTER, ms.div_ceil(1000).max(1).to_string()));
        }
        res.json(Body { error: Inner { code, message: &message, retry_after_ms: retry } })
    }
}

impl From<StorageError> for HttpError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Unavailable(_) => HttpError::Unavailable { message: "the database is unavailable", retry_after_ms: 1000 },
            StorageError::NotFound => HttpError::NotFound("not found"),
            StorageError::Conflict(_) => HttpError::Conflict("conflict"),
            StorageError::Internal(cause) => {
                tracing::error!(error = %cause, "storage failed");
                HttpError::Internal
            }
        }
    }
}

impl From<ActorError> for HttpError {
    fn from(e: ActorError) -> Self {
        match e {
            ActorError::BadRequest(m) => HttpError::BadRequest(m),
            ActorError::Unauthorized(m) => HttpError::Unauthorized(m),
            ActorError::Forbidden(m) => HttpError::Forbidden(m),
            ActorError::NotFound(m) => HttpError::NotFound(m),
            ActorError::Conflict(m) => HttpError::Conflict(m),
            ActorError::RateLimited { message, retry_after_ms } => HttpError::RateLimited { message, retry_after_ms },
            ActorError::Unavailable { message, retry_after_ms } => HttpError::Unavailable { message, retry_after_ms },
            ActorError::Internal => HttpError::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::body::MessageBody;

    #[test]
    fn each_variant_has_status_code_and_json() {
        let cases = [
            (HttpError::BadRequest("b".into()), 400, "bad_request"),
            (HttpError::Unauthorized("u"), 401, "unauthorized"),
            (HttpError::Forbidden("f"), 403, "forbidden"),
            (HttpError::NotFound("n"), 404, "not_found"),
            (HttpError::Conflict("c"), 409, "conflict"),
            (HttpError::TooLarge, 413, "too_large"),
            (HttpError::RateLimited { message: "r", retry_after_ms: 1500 }, 429, "rate_limited"),
            (HttpError::Unavailable { message: "x", retry_after_ms: 1000 }, 503, "unavailable"),
            (HttpError::Internal, 500, "internal"),
        ];
        for (e, status, code) in cases {
            let res = e.error_response();
            assert_eq!(res.status().as_u16(), status);
            if status == 429 || status == 503 {
                assert!(res.headers().contains_key(header::RETRY_AFTER), "{code} has Retry-After");
            }
            let body = res.into_body().try_into_bytes().expect("bytes");
            let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
            assert_eq!(v["error"]["code"], code);
        }
    }

    #[test]
    fn internal_causes_stay_inside() {
        let e: HttpError = StorageError::Internal("secret table xyz".into()).into();
        let body = e.error_response().into_body().try_into_bytes().expect("bytes");
        assert!(!String::from_utf8_lossy(&body).contains("xyz"));
    }
}

//! Errors of the actor layer.
//!
//! `StoreError` is what a port (storage, queue, coordination) may answer; it
//! never carries a diesel or redis type, only what the actors need to decide.
//! `ActorError` is what a client request ends in; `src/protocol` maps each
//! variant once to a protocol code (and `src/http` to a status).

use thiserror::Error;

/// What a storage or coordination port answers when it cannot do its job.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The dependency is down or too slow; the caller may retry later.
    #[error("{what} is unavailable")]
    Unavailable { what: &'static str },
    /// A uniqueness rule was hit (a seq or a ref stored twice).
    #[error("conflict: {0}")]
    Conflict(String),
    /// Anything else; the cause was logged where it happened.
    #[error("storage failed")]
    Internal,
}

/// The answer to a client request that did not succeed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ActorError {
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
    #[error("{message}")]
    Unavailable {
        message: &'static str,
        retry_after_ms: u64,
    },
    #[error("{message}")]
    RateLimited {
        message: &'static str,
        retry_after_ms: u64,
    },
    #[error("internal error")]
    Internal,
}

/// How long a client should wait before retrying after a dependency failed.
pub const RETRY_AFTER_MS: u64 = 1000;

impl From<StoreError> for ActorError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable { .. } => ActorError::Unavailable {
                message: "storage is temporarily unavailable",
                retry_after_ms: RETRY_AFTER_MS,
            },
            StoreError::Conflict(_) | StoreError::Internal => ActorError::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_outage_becomes_unavailable_with_retry() {
        let e: ActorError = StoreError::Unavailable { what: "database" }.into();
        assert!(matches!(e, ActorError::Unavailable { retry_after_ms, .. } if retry_after_ms > 0));
        let e: ActorError = StoreError::Internal.into();
        assert_eq!(e, ActorError::Internal);
    }
}

//! [`StorageError`]: what the storage layer answers, and the one place that
//! sorts diesel and pool errors into it.
//!
//! The sorting decides what a client sees: `Unavailable` (the database is
//! down, locked or the connection broke; retry later) versus `Conflict` (a
//! uniqueness rule: a ref or seq stored twice) versus `Internal` (a bug or a
//! row duet did not write). The cause is logged here, where it happens;
//! [`duet_actors::error::StoreError`] carries no text to clients.

use diesel::result::{DatabaseErrorKind, Error as DieselError};
use duet_actors::error::StoreError;

/// The error of every storage operation.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Cannot reach the database, or it is too busy (pool timeout, refused
    /// or broken connection, SQLite lock wait exceeded). Retrying may work.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The row asked for does not exist.
    #[error("not found")]
    NotFound,
    /// A uniqueness or ordering rule refused the write; nothing was stored.
    #[error("conflict: {0}")]
    Conflict(String),
    /// Anything else; logged where it was made.
    #[error("storage failed: {0}")]
    Internal(String),
}

impl StorageError {
    /// A pool or connection failure (the database cannot be reached).
    pub(crate) fn unavailable(cause: impl std::fmt::Display) -> StorageError {
        let cause = cause.to_string();
        tracing::warn!(error = %cause, "database unavailable");
        StorageError::Unavailable(cause)
    }

    pub(crate) fn internal(cause: impl std::fmt::Display) -> StorageError {
        let cause = cause.to_string();
        tracing::error!(error = %cause, "storage failed");
        StorageError::Internal(cause)
    }
}

/// SQLite reports lock waits that outlasted `busy_timeout` as generic errors;
/// these messages are its `SQLITE_BUSY`/`SQLITE_LOCKED` texts.
fn is_sqlite_busy(message: &str) -> bool {
    message.contains("database is locked") || message.contains("database table is locked")
}

impl From<DieselError> for StorageError {
    fn from(e: DieselError) -> Self {
        match &e {
            DieselError::NotFound => StorageError::NotFound,
            DieselError::DatabaseError(kind, info) => match kind {
                // An event for a session row that does not exist.
                DatabaseErrorKind::ForeignKeyViolation => StorageError::Conflict(info.message().to_owned()),
                DatabaseErrorKind::UniqueViolation => {
                    tracing::debug!(error = %e, "unique violation");
                    StorageError::Conflict(info.message().to_owned())
                }
                DatabaseErrorKind::ClosedConnection
                | DatabaseErrorKind::UnableToSendCommand
                | DatabaseErrorKind::SerializationFailure
                | DatabaseErrorKind::ReadOnlyTransaction => StorageError::unavailable(&e),
                DatabaseErrorKind::Unknown if is_sqlite_busy(info.message()) => {
                    StorageError::unavailable(&e)
                }
                _ => StorageError::internal(&e),
            },
            DieselError::BrokenTransactionManager => StorageError::unavailable(&e),
            _ => StorageError::internal(&e),
        }
    }
}

impl From<diesel::r2d2::PoolError> for StorageError {
    fn from(e: diesel::r2d2::PoolError) -> Self {
        StorageError::unavailable(format!("no database connection: {e}"))
    }
}

impl From<StorageError> for StoreError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Unavailable(_) => StoreError::Unavailable { what: "database" },
            StorageError::Conflict(m) => StoreError::Conflict(m),
            StorageError::NotFound | StorageError::Internal(_) => StoreError::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_variant_maps_to_one_store_error() {
        let cases = [
            (
                StorageError::Unavailable("x".into()),
                StoreError::Unavailable { what: "database" },
            ),
            (
                StorageError::Conflict("dup".into()),
                StoreError::Conflict("dup".into()),
            ),
            (StorageError::NotFound, StoreError::Internal),
            (StorageError::Internal("x".into()), StoreError::Internal),
        ];
        for (from, to) in cases {
            assert_eq!(StoreError::from(from), to);
        }
    }

    #[test]
    fn diesel_errors_are_sorted() {
        let unique = DieselError::DatabaseError(
            DatabaseErrorKind::UniqueViolation,
            Box::new("dup".to_owned()),
        );
        assert!(matches!(
            StorageError::from(unique),
            StorageError::Conflict(_)
        ));
        let closed = DieselError::DatabaseError(
            DatabaseErrorKind::ClosedConnection,
            Box::new("gone".to_owned()),
        );
        assert!(matches!(
            StorageError::from(closed),
            StorageError::Unavailable(_)
        ));
        let busy = DieselError::DatabaseError(
            DatabaseErrorKind::Unknown,
            Box::new("database is locked".to_owned()),
        );
        assert!(matches!(
            StorageError::from(busy),
            StorageError::Unavailable(_)
        ));
        let other = DieselError::DatabaseError(
            DatabaseErrorKind::CheckViolation,
            Box::new("bad".to_owned()),
        );
        assert!(matches!(
            StorageError::from(other),
            StorageError::Internal(_)
        ));
        assert!(matches!(
            StorageError::from(DieselError::NotFound),
            StorageError::NotFound
        ));
    }
}

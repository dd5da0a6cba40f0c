//! [`DbConn`]: one connection type for PostgreSQL and SQLite.
//!
//! `#[derive(diesel::MultiConnection)]` gives one code path and one
//! `schema.rs` for both backends. The derive expands to a module that
//! glob-imports this one, so this file imports as little as possible.
//! SQL that only one backend speaks (upserts, locks, transaction modes) goes
//! in a `match` on the variant; [`per_backend!`] writes that match when the
//! same query text fits both.

use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::result::Error;
use diesel::{PgConnection, SqliteConnection};

/// A connection to whichever database `DATABASE_URL` names.
#[derive(diesel::MultiConnection)]
pub enum DbConn {
    Pg(PgConnection),
    Sqlite(SqliteConnection),
}

/// Runs the same expression on the inner connection of either variant, for
/// queries the derived backend cannot express (e.g. `ON CONFLICT`), whose
/// text is nonetheless the same for both.
macro_rules! per_backend {
    ($conn:expr, $c:ident => $body:expr) => {
        match $conn {
            $crate::storage::DbConn::Pg($c) => $body,
            $crate::storage::DbConn::Sqlite($c) => $body,
        }
    };
}
pub(crate) use per_backend;

impl DbConn {
    /// Runs `f` in a transaction meant for writing, committed when it answers
    /// `Ok` and rolled back otherwise.
    ///
    /// On SQLite it begins with `BEGIN IMMEDIATE`: the write lock is taken
    /// up front, where `busy_timeout` waits for it, instead of at the first
    /// write of a deferred transaction, where two readers turning writers
    /// deadlock and one gets "database is locked" at once (diesel#2365).
    /// On PostgreSQL it is a plain `BEGIN` (read committed).
    pub fn write_transaction<T, E, F>(&mut self, f: F) -> Result<T, E>
    where
        F: FnOnce(&mut DbConn) -> Result<T, E>,
        E: From<Error>,
    {
        match self {
            DbConn::Pg(c) => AnsiTransactionManager::begin_transaction(c)?,
            DbConn::Sqlite(c) => {
                AnsiTransactionManager::begin_transaction_sql(c, "BEGIN IMMEDIATE")?
            }
        }
        match f(self) {
            Ok(value) => {
                <DbConn as TransactionManager<DbConn>>::commit_transaction(self)?;
                Ok(value)
            }
            Err(user_error) => {
                match <DbConn as TransactionManager<DbConn>>::rollback_transaction(self) {
                    // A broken manager means the connection is gone; the
                    // original error says more.
                    Ok(()) | Err(Error::BrokenTransactionManager) => Err(user_error),
                    Err(rollback_error) => Err(rollback_error.into()),
                }
            }
        }
    }

    /// Runs `f` in a transaction that sees one snapshot of the database for
    /// all its statements: `REPEATABLE READ, READ ONLY` on PostgreSQL (read
    /// committed would give each statement its own), a deferred read
    /// transaction on SQLite (WAL readers keep the snapshot of their first
    /// read until they end).
    pub fn snapshot<T, F>(&mut self, f: F) -> Result<T, Error>
    where
        F: FnOnce(&mut DbConn) -> Result<T, Error>,
    {
        diesel::Connection::transaction(self, |c| {
            if let DbConn::Pg(pg) = c {
                pg.batch_execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")?;
            }
            f(c)
        })
    }
}

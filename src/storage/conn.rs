//! Opening connections: which backend, with which settings, and migrations.
//!
//! The backend is chosen by the URL's scheme, here and nowhere else:
//! `postgres://` or `postgresql://` is PostgreSQL, anything else is a SQLite
//! file path. (The derived `DbConn::establish` would try PostgreSQL and then
//! SQLite, and SQLite accepts any string as a file name, so a mistyped
//! PostgreSQL URL would silently become a local file.) [`ConnManager`] is
//! the r2d2 manager of the pool and also opens the event writer's own
//! connection, so every connection gets the same settings:
//!
//! - SQLite: `PRAGMA busy_timeout` alone and first (it does not cover the
//!   batch it is sent in), then `foreign_keys=ON` and the `synchronous`
//!   level of [`SqliteSync`] (`DUET_SQLITE_SYNC`). Events are acked after
//!   their commit either way; the level says what a commit waits for. NORMAL
//!   (the default) survives the death of the process; the checkpointer
//!   fsyncs the WAL every 500 ms; FULL also survives a power
//!   loss, at one fsync per group commit, which on a virtual disk costs more
//!   than the rest of a message's path (BENCHMARKS.md). WAL itself is set
//!   once per database file, by [`prepare`], before the pool opens.
//! - PostgreSQL: `synchronous_commit = on` explicitly (a server or role
//!   default of `off` would let acked events vanish in a crash), and libpq
//!   timeouts in the URL so that an unreachable server fails a connect
//!   within about `connect_timeout` instead of hanging.

use std::path::Path;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::r2d2::{self, ManageConnection, R2D2Connection};
use diesel::{Connection, PgConnection, SqliteConnection};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use super::{Backend, DbConn, StorageError};

const PG_MIGRATIONS: EmbeddedMigrations = embed_migrations!("schema/postgres");
const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("schema/sqlite");

/// How long a SQLite connection waits for another's write lock.
const SQLITE_BUSY_TIMEOUT_MS: u32 = 5000;

/// Serializes `duet migrate` and node starts that migrate one PostgreSQL
/// database at the same time (an arbitrary constant, "duet" in ASCII).
const PG_MIGRATION_LOCK: i64 = 0x6475_6574;

/// How a SQLite commit reaches the disk (`DUET_SQLITE_SYNC`), in WAL mode.
/// Both keep the file consistent after any crash; they differ in what a
/// power loss (or a kernel crash) may take back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SqliteSync {
    /// `synchronous=NORMAL`: a commit is written to the WAL but not
    /// fsynced; the checkpointer fsyncs the WAL every
    /// [`super::checkpoint::CHECKPOINT_EVERY`]. An acked event survives the
    /// death of the process (kill -9, a panic, OOM); a power loss can take
    /// back the events acked since that last fsync (about half a second).
    #[default]
    Normal,
    /// `synchronous=FULL`: every commit fsyncs the WAL before its ack, so an
    /// acked event also survives a power loss; one fsync per group commit.
    Full,
}

impl std::str::FromStr for SqliteSync {
    type Err = ();

    /// Reads `normal` or `full` (any case).
    fn from_str(v: &str) -> Result<SqliteSync, ()> {
        match v.to_ascii_lowercase().as_str() {
            "normal" => Ok(SqliteSync::Normal),
            "full" => Ok(SqliteSync::Full),
            _ => Err(()),
        }
    }
}

impl SqliteSync {
    fn pragma(self) -> &'static str {
        match self {
            SqliteSync::Normal => "NORMAL",
            SqliteSync::Full => "FULL",
        }
    }
}

/// Where the connections go. `Debug` never shows a PostgreSQL URL: it may
/// hold a password.
#[derive(Clone)]
pub(crate) enum Target {
    Postgres { url: String },
    Sqlite { path: String },
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Postgres { .. } => f.write_str("Postgres(…)"),
            Target::Sqlite { path } => f.debug_tuple("Sqlite").field(path).finish(),
        }
    }
}

impl Target {
    /// Reads `DATABASE_URL`. A `sqlite://` prefix is accepted and dropped.
    pub(crate) fn parse(url: &str, connect_timeout: Duration) -> Target {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let secs = connect_timeout.as_secs_f64().ceil().max(1.0) as u64;
            let url = with_default_params(
                url,
                &[
                    ("connect_timeout", secs.to_string()),
                    // Bounds a write to a server that vanished without a
                    // reset (a partition): unacknowledged data for 10 s.
                    ("tcp_user_timeout", "10000".to_owned()),
                    ("keepalives_idle", "10".to_owned()),
                    ("keepalives_interval", "5".to_owned()),
                    ("keepalives_count", "3".to_owned()),
                ],
            );
            Target::Postgres { url }
        } else {
            let path = url.strip_prefix("sqlite://").unwrap_or(url);
            Target::Sqlite {
                path: path.to_owned(),
            }
        }
    }

    pub(crate) fn backend(&self) -> Backend {
        match self {
            Target::Postgres { .. } => Backend::Postgres,
            Target::Sqlite { .. } => Backend::Sqlite,
        }
    }
}

/// Adds `key=value` query parameters the URL does not set already.
fn with_default_params(url: &str, params: &[(&str, String)]) -> String {
    let mut out = url.to_owned();
    for (key, value) in params {
        let present = url
            .split_once('?')
            .is_some_and(|(_, q)| q.split('&').any(|kv| kv.split('=').next() == Some(key)));
        if !present {
            out.push(if out.contains('?') { '&' } else { '?' });
            out.push_str(key);
            out.push('=');
            out.push_str(value);
        }
    }
    out
}

/// The r2d2 manager: opens [`DbConn`]s of the [`Target`]'s backend with
/// duet's per-connection settings.
#[derive(Clone, Debug)]
pub(crate) struct ConnManager {
    target: Target,
    sqlite_sync: SqliteSync,
    sqlite_cache_kib: u32,
}

impl ConnManager {
    pub(crate) fn new(target: Target, sqlite_sync: SqliteSync, sqlite_cache_kib: u32) -> ConnManager {
        ConnManager { target, sqlite_sync, sqlite_cache_kib }
    }

    pub(crate) fn backend(&self) -> Backend {
        self.target.backend()
    }

    pub(crate) fn sqlite_sync(&self) -> SqliteSync {
        self.sqlite_sync
    }

    /// The database file, for SQLite.
    pub(crate) fn sqlite_path(&self) -> Option<&str> {
        match &self.target {
            Target::Sqlite { path } => Some(path),
            Target::Postgres { .. } => None,
        }
    }

    /// Opens one configured connection.
    pub(crate) fn open(&self) -> Result<DbConn, r2d2::Error> {
        match &self.target {
            Target::Postgres { url } => {
                let mut c = PgConnection::establish(url).map_err(r2d2::Error::ConnectionError)?;
                // Generic plans: duet's statements are prepared once and their
                // best plan does not depend on the values (id lookups, arrays
                // of one group); replanning each execution cost more than the
                // write itself.
                c.batch_execute("SET synchronous_commit = on; SET plan_cache_mode = force_generic_plan")
                    .map_err(r2d2::Error::QueryError)?;
                Ok(DbConn::Pg(c))
            }
            Target::Sqlite { path } => {
                let mut c =
                    SqliteConnection::establish(path).map_err(r2d2::Error::ConnectionError)?;
                c.batch_execute(&format!("PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}"))
                    .map_err(r2d2::Error::QueryError)?;
                // No checkpoint inside a commit: `storage::checkpoint` runs
                // them beside the writer and between its groups, so no ack
                // waits for a whole checkpoint; the WAL is cut back to a
                // bound when it restarts after a burst.
                c.batch_execute(&format!(
                    "PRAGMA foreign_keys = ON; PRAGMA synchronous = {}; PRAGMA wal_autocheckpoint = 0; \
                     PRAGMA journal_size_limit = {}; PRAGMA cache_size = -{}",
                    self.sqlite_sync.pragma(),
                    super::checkpoint::WAL_SIZE_LIMIT_BYTES,
                    self.sqlite_cache_kib
                ))
                .map_err(r2d2::Error::QueryError)?;
                Ok(DbConn::Sqlite(c))
            }
        }
    }
}

impl ManageConnection for ConnManager {
    type Connection = DbConn;
    type Error = r2d2::Error;

    fn connect(&self) -> Result<DbConn, r2d2::Error> {
        self.open()
    }

    fn is_valid(&self, conn: &mut DbConn) -> Result<(), r2d2::Error> {
        conn.ping().map_err(r2d2::Error::QueryError)
    }

    fn has_broken(&self, conn: &mut DbConn) -> bool {
        std::thread::panicking() || conn.is_broken()
    }
}

/// Everything that must happen once per database before the pool opens:
/// the SQLite file's folder exists, WAL is on (it is a property of the
/// file, and switching it needs no other connection open), and the
/// migrations of the backend have run. Answers how many migrations ran.
pub(crate) fn prepare(manager: &ConnManager) -> Result<usize, StorageError> {
    if let Target::Sqlite { path } = &manager.target {
        create_parent_dir(path)?;
    }
    let mut conn = manager.open().map_err(StorageError::unavailable)?;
    if let DbConn::Sqlite(c) = &mut conn {
        c.batch_execute("PRAGMA journal_mode = WAL")?;
    }
    migrate(&mut conn)
}

fn create_parent_dir(path: &str) -> Result<(), StorageError> {
    // `:memory:` and `file:` URIs name no folder to create.
    if path.starts_with(':') || path.starts_with("file:") {
        return Ok(());
    }
    match Path::new(path).parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::create_dir_all(dir)
            .map_err(|e| StorageError::internal(format!("cannot create {}: {e}", dir.display()))),
        _ => Ok(()),
    }
}

/// Runs the pending migrations of the connection's backend. On PostgreSQL a
/// session advisory lock keeps two nodes from migrating at once.
fn migrate(conn: &mut DbConn) -> Result<usize, StorageError> {
    let failed = |e: Box<dyn std::error::Error + Send + Sync>| {
        StorageError::internal(format!("migration failed: {e}"))
    };
    match conn {
        DbConn::Pg(c) => {
            c.batch_execute(&format!("SELECT pg_advisory_lock({PG_MIGRATION_LOCK})"))?;
            let ran = c
                .run_pending_migrations(PG_MIGRATIONS)
                .map(|v| v.len())
                .map_err(failed);
            let unlocked =
                c.batch_execute(&format!("SELECT pg_advisory_unlock({PG_MIGRATION_LOCK})"));
            let ran = ran?;
            unlocked?;
            Ok(ran)
        }
        DbConn::Sqlite(c) => c
            .run_pending_migrations(SQLITE_MIGRATIONS)
            .map(|v| v.len())
            .map_err(failed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheme_picks_the_backend() {
        let t = Duration::from_secs(2);
        assert_eq!(
            Target::parse("postgres://u@h/db", t).backend(),
            Backend::Postgres
        );
        assert_eq!(
            Target::parse("postgresql://u@h/db", t).backend(),
            Backend::Postgres
        );
        assert_eq!(
            Target::parse("./data/duet.db", t).backend(),
            Backend::Sqlite
        );
        assert_eq!(Target::parse("postgres.db", t).backend(), Backend::Sqlite);
        match Target::parse("sqlite:///tmp/x.db", t) {
            Target::Sqlite { path } => assert_eq!(path, "/tmp/x.db"),
            other => panic!("not sqlite: {other:?}"),
        }
    }

    #[test]
    fn pg_timeouts_are_added_unless_set() {
        let url = match Target::parse(
            "postgres://u:pw@h/db?connect_timeout=9",
            Duration::from_millis(1500),
        ) {
            Target::Postgres { url } => url,
            other => panic!("not pg: {other:?}"),
        };
        assert!(url.starts_with("postgres://u:pw@h/db?connect_timeout=9&tcp_user_timeout=10000"));
        assert_eq!(url.matches("connect_timeout=").count(), 1);
        let url = with_default_params("postgres://h/db", &[("connect_timeout", "2".to_owned())]);
        assert_eq!(url, "postgres://h/db?connect_timeout=2");
        assert!(!format!(
            "{:?}",
            Target::parse("postgres://u:pw@h/db", Duration::from_secs(1))
        )
        .contains("pw"));
    }
}

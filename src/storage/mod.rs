//! Storage: duet's SQL database, PostgreSQL in production or a SQLite file
//! as the embedded default, behind one diesel code path.
//!
//! What lives here and why:
//! - `db_conn`: [`DbConn`], the `MultiConnection` enum over both backends
//!   (one `schema.rs`, ids as UUID text, JSON as text, instants as BIGINT ms).
//! - `conn`: picking the backend by URL scheme, per-connection settings
//!   (durability first: acks follow commits), embedded migrations.
//! - `writer` + `append`: the event log's group commit on one thread.
//! - `events`: the actors' `EventStore` (appends via the writer, reads via
//!   the pool).
//! - `admins`: admins, their login codes and sessions, the audit log.
//!
//! Diesel blocks, so nothing here runs a query on an async thread: async
//! callers go through [`Database::run`] (tokio's blocking pool, carrying the
//! caller's tracing span), the CLI through [`Database::run_sync`].

mod admins;
mod append;
mod checkpoint;
mod conn;
mod db_conn;
mod error;
mod events;
mod rows;
mod writer;

#[cfg(test)]
mod tests;

#[path = "../../schema/schema.rs"]
#[rustfmt::skip]
pub mod schema;

use std::sync::Arc;
use std::time::Duration;

use diesel::r2d2;
use diesel::RunQueryDsl;
use duet_actors::ports::EventStore;

pub use admins::{AdminRow, OtpOutcome, OtpPolicy};
pub use conn::SqliteSync;
pub use db_conn::DbConn;
pub use error::StorageError;

use conn::{ConnManager, Target};
use events::SqlEventStore;
use writer::{GroupLimits, WriterHandle};

type Pool = r2d2::Pool<ConnManager>;

/// SQLite serializes writers and WAL readers need few connections; more
/// would only queue on the file lock.
const SQLITE_MAX_POOL: u32 = 4;
/// The budget of [`Database::ping`] (used by `/ready`).
const PING_TIMEOUT: Duration = Duration::from_secs(1);

/// Which database a [`Database`] talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Postgres => "postgres",
            Backend::Sqlite => "sqlite",
        }
    }
}

/// Tuning of the pool and the event writer.
#[derive(Clone, Debug)]
pub struct DbOptions {
    /// Pool connections (capped at 4 for SQLite).
    pub pool_size: u32,
    /// Bound on opening a connection and on waiting for a pooled one.
    pub connect_timeout: Duration,
    /// Most events the writer commits in one transaction.
    pub batch_max: usize,
    /// How long the writer waits for more batches before committing; zero
    /// takes what is queued right now.
    pub batch_linger: Duration,
    /// Writer threads (each with its own connection) for PostgreSQL: the
    /// main one and helpers; SQLite always has one (it has one writer at a
    /// time anyway).
    pub pg_writers: usize,
    /// How long the main writer's commit runs before a helper commits the
    /// next group beside it (see `writer`).
    pub help_after: Duration,
    /// What a SQLite commit waits for before its ack.
    pub sqlite_sync: SqliteSync,
    /// Page cache of each SQLite connection, KiB (`PRAGMA cache_size`).
    pub sqlite_cache_kib: u32,
}

/// SQLite's own default page cache (2 000 KiB per connection). Enough for
/// the idle waiting customers' pages; a node with some hundreds of active
/// conversations touches two index leaves per conversation per commit and
/// does better with more (BENCHMARKS.md: 16 MiB, 200 pairs at 10 000 msg/s).
pub const SQLITE_CACHE_KIB_DEFAULT: u32 = 2000;

impl Default for DbOptions {
    fn default() -> Self {
        DbOptions {
            pool_size: 8,
            connect_timeout: Duration::from_secs(2),
            batch_max: 1000,
            batch_linger: Duration::ZERO,
            pg_writers: 3,
            help_after: Duration::from_millis(1),
            sqlite_sync: SqliteSync::default(),
            sqlite_cache_kib: SQLITE_CACHE_KIB_DEFAULT,
        }
    }
}

/// Figures for metrics, read when scraped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DbStats {
    pub pool_connections: u32,
    pub pool_idle: u32,
    pub pool_max: u32,
    /// Append batches waiting for the writer thread.
    pub writer_queue: usize,
    /// Transactions the writer committed, and the batches in them (their
    /// ratio is the grouping achieved).
    pub writer_commits: u64,
    pub writer_batches: u64,
    /// Of the commits, those of helper writers (PostgreSQL, slow commits).
    pub writer_helper_commits: u64,
    /// Microseconds the writers spent in the database (a total).
    pub writer_busy_micros: u64,
    /// SQLite: WAL checkpoints the writer finished between groups, and the
    /// microseconds they took (a pause of the writer each).
    pub wal_checkpoints: u64,
    pub wal_checkpoint_micros: u64,
    /// SQLite at `synchronous=NORMAL`: the checkpointer's fsyncs of the WAL.
    pub wal_syncs: u64,
}

/// The database: a pool for queries, and the event writer. Cheap to clone;
/// the writer thread ends when the last clone (and event store) is dropped.
#[derive(Clone)]
pub struct Database {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    backend: Backend,
    opts: DbOptions,
    events: Arc<SqlEventStore>,
    /// SQLite's checkpoint steps (their figures).
    wal: Option<Arc<checkpoint::WalCheckpoints>>,
    _alive: Arc<()>,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Database")
            .field("backend", &self.inner.backend)
            .finish_non_exhaustive()
    }
}

/// Sends the pool's background connection errors to tracing (r2d2 would
/// use the `log` crate).
#[derive(Debug)]
struct LogPoolErrors;

impl r2d2::HandleError<r2d2::Error> for LogPoolErrors {
    fn handle_error(&self, error: r2d2::Error) {
        tracing::warn!(error = %error, "database pool could not open a connection");
    }
}

impl Database {
    /// Connects, runs the pending migrations, opens the pool and starts the
    /// writer thread. Blocking: call it before the runtime starts, from the
    /// CLI, or inside `spawn_blocking`. Fails with `Unavailable` within about
    /// `connect_timeout` when the database cannot be reached.
    pub fn open(url: &str, opts: DbOptions) -> Result<Database, StorageError> {
        let manager = ConnManager::new(Target::parse(url, opts.connect_timeout), opts.sqlite_sync, opts.sqlite_cache_kib);
        let backend = manager.backend();
        let ran = conn::prepare(&manager)?;
        if ran > 0 {
            tracing::info!(
                backend = backend.as_str(),
                migrations = ran,
                "database migrated"
            );
        }
        let size = match backend {
            Backend::Postgres => opts.pool_size.max(1),
            Backend::Sqlite => opts.pool_size.clamp(1, SQLITE_MAX_POOL),
        };
        let pool = r2d2::Pool::builder()
            .max_size(size)
            .min_idle(Some(0))
            .connection_timeout(opts.connect_timeout)
            .error_handler(Box::new(LogPoolErrors))
            .build(manager.clone())
            .map_err(StorageError::unavailable)?;
        let limits = GroupLimits {
            batch_max: opts.batch_max,
            batch_linger: opts.batch_linger,
            help_after: opts.help_after,
        };
        let writers = match backend {
            Backend::Postgres => opts.pg_writers,
            Backend::Sqlite => 1,
        };
        let wal = (backend == Backend::Sqlite).then(|| Arc::new(checkpoint::WalCheckpoints::default()));
        let writer = WriterHandle::spawn(manager.clone(), limits, writers, wal.clone())
            .map_err(|e| StorageError::internal(format!("cannot start the event writer: {e}")))?;
        // The checkpointer runs while any clone of this `Database` lives.
        let alive = Arc::new(());
        if let Some(wal) = &wal {
            checkpoint::spawn_checkpointer(manager, Arc::downgrade(&alive), wal.clone())?;
        }
        let events = Arc::new(SqlEventStore::new(
            pool.clone(),
            opts.connect_timeout,
            writer,
        ));
        Ok(Database {
            inner: Arc::new(Inner {
                pool,
                backend,
                opts,
                events,
                wal,
                _alive: alive,
            }),
        })
    }

    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    /// Runs `f` on a pooled connection on tokio's blocking threads, inside
    /// the caller's tracing span. Waits at most `connect_timeout` for a
    /// connection (then `Unavailable`). Cancelling the future does not stop
    /// `f` once started. Writes of more than one statement belong in
    /// [`DbConn::write_transaction`].
    pub async fn run<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&mut DbConn) -> Result<T, diesel::result::Error> + Send + 'static,
    {
        blocking(self.inner.pool.clone(), self.inner.opts.connect_timeout, f).await
    }

    /// [`Database::run`] on the calling thread, for the CLI (no runtime).
    pub fn run_sync<T, F>(&self, f: F) -> Result<T, StorageError>
    where
        F: FnOnce(&mut DbConn) -> Result<T, diesel::result::Error>,
    {
        with_conn(&self.inner.pool, self.inner.opts.connect_timeout, f)
    }

    /// `SELECT 1` on a pooled connection, answered within about a second
    /// whatever the database does (for `/ready`).
    pub async fn ping(&self) -> Result<(), StorageError> {
        let pool = self.inner.pool.clone();
        let wait = PING_TIMEOUT.min(self.inner.opts.connect_timeout);
        let query = blocking(pool, wait, |c| {
            diesel::sql_query("SELECT 1").execute(c).map(drop)
        });
        match tokio::time::timeout(PING_TIMEOUT + Duration::from_millis(200), query).await {
            Ok(result) => result,
            Err(_) => Err(StorageError::Unavailable("ping timed out".to_owned())),
        }
    }

    /// The event log, for the actors.
    pub fn event_store(&self) -> Arc<dyn EventStore> {
        self.inner.events.clone()
    }

    /// Pool and writer figures (cheap; for gauges read at scrape time).
    #[allow(dead_code, reason = "for the /metrics gauges; tests read it meanwhile")]
    pub fn stats(&self) -> DbStats {
        use std::sync::atomic::Ordering::Relaxed;
        let state = self.inner.pool.state();
        let writer = self.inner.events.writer();
        DbStats {
            pool_connections: state.connections,
            pool_idle: state.idle_connections,
            pool_max: self.inner.pool.max_size(),
            writer_queue: writer.queued.load(Relaxed),
            writer_commits: writer.commits.load(Relaxed),
            writer_batches: writer.batches.load(Relaxed),
            writer_helper_commits: writer.helper_commits.load(Relaxed),
            writer_busy_micros: writer.busy_micros.load(Relaxed),
            wal_checkpoints: self.inner.wal.as_ref().map_or(0, |w| w.finished.load(Relaxed)),
            wal_checkpoint_micros: self.inner.wal.as_ref().map_or(0, |w| w.finish_micros.load(Relaxed)),
            wal_syncs: self.inner.wal.as_ref().map_or(0, |w| w.wal_syncs.load(Relaxed)),
        }
    }
}

/// Checks out a connection (waiting at most `timeout`) and runs `f` on it.
fn with_conn<T, F>(pool: &Pool, timeout: Duration, f: F) -> Result<T, StorageError>
where
    F: FnOnce(&mut DbConn) -> Result<T, diesel::result::Error>,
{
    let mut conn = pool.get_timeout(timeout)?;
    f(&mut conn).map_err(StorageError::from)
}

/// [`with_conn`] on tokio's blocking pool, in the caller's span.
async fn blocking<T, F>(pool: Pool, timeout: Duration, f: F) -> Result<T, StorageError>
where
    T: Send + 'static,
    F: FnOnce(&mut DbConn) -> Result<T, diesel::result::Error> + Send + 'static,
{
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(|| with_conn(&pool, timeout, f)))
        .await
        .map_err(|e| StorageError::internal(format!("database task failed: {e}")))?
}

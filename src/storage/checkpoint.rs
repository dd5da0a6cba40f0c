//! SQLite's WAL checkpoints, in two steps, so that the WAL stays bounded
//! under continuous load and no commit waits for a whole checkpoint.
//!
//! A PASSIVE checkpoint copies the WAL's frames into the database file but
//! can only bring the WAL back to its start ("restart") when no frame was
//! appended while it ran, and the next write transaction then begins with
//! every frame backfilled. Under steady writes that never happens: a
//! checkpointer beside the writer always lags a few commits behind, and the
//! WAL grew by ~25 MB a second at 2 000 msg/s (524 MB after 20 s for a
//! 14 MB database), each commit extending the file (a block allocation and
//! an inode write in its fsync). Measured (BENCHMARKS.md): the WAL stays
//! at ~15 MB at 2 000 msg/s, the writer pauses ~2 ms per round (~7 ms at
//! 10 000 msg/s), p50 0.66 → 0.51 ms and 20 % more messages per CPU-s.
//! 500 ms is the measured best: every 100 ms paid the fixed cost (two
//! fsyncs) five times as often (p99 4.5–5.5 ms against 2.0–2.5); every
//! second doubled the rest and the WAL (p99 at 10 000 msg/s 33 ms).
//!
//! So: the thread `duet-db-checkpoint` does the bulk of the copying every
//! [`CHECKPOINT_EVERY`] with its own connection, beside the writer
//! (passes until one is short, see [`converge`]); whenever the WAL holds
//! frames it then raises [`WalCheckpoints::finish_wanted`]. The writer,
//! between two groups (it is the only writer, so nothing is appended
//! meanwhile), runs the short rest ([`finish`]): the few pages written since,
//! and the fsync of the database file. Its next transaction then restarts
//! the WAL and overwrites the blocks already allocated.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use diesel::sql_types::Integer;
use diesel::{QueryableByName, RunQueryDsl, SqliteConnection};

use super::conn::{ConnManager, SqliteSync};
use super::{DbConn, StorageError};

/// How often the checkpointer copies the WAL into the database.
pub(super) const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// The WAL file is cut back to this size when it restarts, after a burst
/// made it larger (PRAGMA journal_size_limit). Above what the writes of one
/// [`CHECKPOINT_EVERY`] need (about 60 MB at 10 000 msg/s: each commit
/// writes whole pages of the table and both indexes), so that it is not cut
/// and regrown each time.
pub(super) const WAL_SIZE_LIMIT_BYTES: u64 = 128 * 1024 * 1024;

/// Shared by the checkpointer thread and the writer.
#[derive(Debug, Default)]
pub(super) struct WalCheckpoints {
    /// The checkpointer's pass is done and the WAL holds frames (the
    /// writer has appended since the pass began): the writer should finish
    /// the checkpoint between two groups.
    finish_wanted: AtomicBool,
    /// Checkpoints the writer finished, for metrics and tests.
    pub finished: AtomicU64,
    /// Microseconds the writer spent finishing them.
    pub finish_micros: AtomicU64,
    /// The checkpointer's own fsyncs of the WAL (`synchronous=NORMAL` only).
    pub wal_syncs: AtomicU64,
}

/// The row `PRAGMA wal_checkpoint` answers.
#[derive(QueryableByName)]
struct CheckpointRow {
    /// 1 when the checkpoint could not run to the end (a lock was held).
    #[diesel(sql_type = Integer)]
    busy: i32,
    /// Frames in the WAL.
    #[diesel(sql_type = Integer)]
    log: i32,
    /// Frames of it now in the database file.
    #[diesel(sql_type = Integer)]
    checkpointed: i32,
}

fn passive_checkpoint(c: &mut SqliteConnection) -> Result<CheckpointRow, diesel::result::Error> {
    diesel::sql_query("PRAGMA wal_checkpoint(PASSIVE)").get_result(c)
}

/// A pass that took longer than this left the writer's appends of that
/// time to copy; another pass copies them, so that the writer's own step
/// (a pause of every commit behind it) has only a few pages left.
const SHORT_PASS: Duration = Duration::from_millis(2);
const MAX_PASSES: usize = 4;

/// Passes until one is short (each copies what was appended during the one
/// before), at most [`MAX_PASSES`].
fn converge(c: &mut SqliteConnection) -> Result<CheckpointRow, diesel::result::Error> {
    let mut passes = 0;
    loop {
        let started = Instant::now();
        let row = passive_checkpoint(c)?;
        passes += 1;
        if row.log == 0 || started.elapsed() < SHORT_PASS || passes == MAX_PASSES {
            return Ok(row);
        }
    }
}

/// Starts the checkpointer thread; it runs while `alive` can be upgraded.
pub(super) fn spawn_checkpointer(manager: ConnManager, alive: Weak<()>, shared: Arc<WalCheckpoints>) -> Result<(), StorageError> {
    std::thread::Builder::new()
        .name("duet-db-checkpoint".to_owned())
        .spawn(move || {
            let mut conn = None;
            let mut db_file = None;
            let mut wal_file = None;
            while alive.upgrade().is_some() {
                std::thread::sleep(CHECKPOINT_EVERY);
                if conn.is_none() {
                    conn = manager.open().ok();
                }
                let Some(DbConn::Sqlite(c)) = conn.as_mut() else {
                    conn = None;
                    continue;
                };
                match converge(c) {
                    // An empty WAL: nothing to restart.
                    Ok(row) if row.log == 0 => {}
                    // All copied or not, the writer has appended since (the
                    // row counts the frames there were when the pass began).
                    Ok(_) => {
                        sync_copied_pages(&manager, &mut db_file);
                        shared.finish_wanted.store(true, Ordering::Release);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "WAL checkpoint failed");
                        conn = None;
                    }
                }
                if manager.sqlite_sync() == SqliteSync::Normal && sync_wal(&manager, &mut wal_file) {
                    shared.wal_syncs.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .map(|_| ())
        .map_err(|e| StorageError::internal(format!("cannot start the checkpointer: {e}")))
}

/// Makes the pages the passes copied durable, here rather than in the
/// writer's step. SQLite fsyncs the database file only in a pass that
/// copies the whole WAL, which beside a busy writer is never the
/// checkpointer's but the writer's: that fsync then wrote every page the
/// round had copied (megabytes at 2 000 msg/s), 2–11 ms on a virtio disk
/// during which no commit ran (measured: p99 9–12 ms at 2 000 msg/s).
/// A failure is logged; the writer's step still syncs what is left.
fn sync_copied_pages(manager: &ConnManager, db_file: &mut Option<std::fs::File>) {
    if let Some(path) = manager.sqlite_path() {
        sync_data(path, db_file, "the database file");
    }
}

/// At `synchronous=NORMAL`, makes every commit so far durable, once per
/// round whatever the pass did: SQLite fsyncs the WAL only in a pass that
/// can copy something, and a reader holding an old snapshot would keep
/// that from happening while commits pile up unsynced. This bounds what a
/// power loss can take back to about one [`CHECKPOINT_EVERY`].
fn sync_wal(manager: &ConnManager, wal_file: &mut Option<std::fs::File>) -> bool {
    manager.sqlite_path().is_some_and(|path| sync_data(&format!("{path}-wal"), wal_file, "the WAL"))
}

/// fdatasync of `path` through a handle kept open in `slot` (any handle
/// flushes the file's pages). A failure is logged and the handle reopened
/// next time.
fn sync_data(path: &str, slot: &mut Option<std::fs::File>, what: &str) -> bool {
    if slot.is_none() {
        *slot = std::fs::File::open(path)
            .map_err(|e| tracing::warn!(error = %e, "cannot open {what} to sync it"))
            .ok();
    }
    let Some(f) = slot.as_ref() else { return false };
    match f.sync_data() {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "syncing {what} failed");
            *slot = None;
            false
        }
    }
}

/// The writer's part, called between two groups: when the checkpointer
/// asked for it, copy what is left so that the next write transaction
/// restarts the WAL. A failure is logged and left to the next round.
pub(super) fn finish(shared: &WalCheckpoints, conn: Option<&mut DbConn>) {
    let Some(DbConn::Sqlite(c)) = conn else { return };
    if !shared.finish_wanted.swap(false, Ordering::AcqRel) {
        return;
    }
    let started = Instant::now();
    match passive_checkpoint(c) {
        Ok(row) => {
            if row.busy != 0 || row.checkpointed < row.log {
                // A reader holds an older snapshot: the next round tries again.
                tracing::debug!(log = row.log, checkpointed = row.checkpointed, "WAL checkpoint left frames");
            }
            shared.finished.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => tracing::warn!(error = %e, "WAL checkpoint by the writer failed"),
    }
    let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    shared.finish_micros.fetch_add(micros, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::connection::SimpleConnection;
    use diesel::Connection;

    fn wal_bytes(db: &std::path::Path) -> u64 {
        let mut wal = db.as_os_str().to_owned();
        wal.push("-wal");
        std::fs::metadata(wal).map(|m| m.len()).unwrap_or(0)
    }

    /// The property the two steps exist for. A reader's snapshot keeps
    /// the checkpointer's pass one step behind the writer, as concurrent
    /// commits do in production: without the writer's step the WAL only
    /// grows; with it the WAL restarts and stays the size of one round.
    #[test]
    fn the_wal_restarts_under_steady_writes_once_the_writer_finishes_the_checkpoint() {
        let (url, _cleanup) = super::super::tests::support::TestDb::unopened(super::super::Backend::Sqlite);
        let path = std::path::PathBuf::from(&url);
        std::fs::create_dir_all(path.parent().expect("a folder")).expect("folder");
        let open = || {
            let mut c = SqliteConnection::establish(&url).expect("open");
            c.batch_execute("PRAGMA journal_mode = WAL; PRAGMA synchronous = OFF; PRAGMA wal_autocheckpoint = 0")
                .expect("pragmas");
            c
        };
        let mut writer = DbConn::Sqlite(open());
        let (mut side, mut reader) = (open(), open());
        let DbConn::Sqlite(w) = &mut writer else { unreachable!() };
        w.batch_execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT NOT NULL)").expect("table");
        let insert = format!("INSERT INTO t (body) VALUES ('{}')", "x".repeat(3000));
        let shared = WalCheckpoints::default();
        let mut rounds = |n: usize, writer_finishes: bool| {
            for _ in 0..n {
                reader.batch_execute("BEGIN; SELECT count(*) FROM t;").expect("reader snapshot");
                let DbConn::Sqlite(w) = &mut writer else { unreachable!() };
                for _ in 0..20 {
                    w.batch_execute(&insert).expect("insert");
                }
                let row = passive_checkpoint(&mut side).expect("checkpointer pass");
                assert!(row.checkpointed < row.log, "the reader keeps the pass behind");
                shared.finish_wanted.store(true, Ordering::Release);
                reader.batch_execute("COMMIT").expect("reader done");
                if writer_finishes {
                    finish(&shared, Some(&mut writer));
                }
            }
        };
        rounds(5, false);
        let grown = wal_bytes(&path);
        rounds(5, false);
        assert!(wal_bytes(&path) > grown, "without the writer's step the WAL only grows");
        rounds(1, true);
        let settled = wal_bytes(&path);
        rounds(20, true);
        assert_eq!(wal_bytes(&path), settled, "the WAL restarted in place instead of growing");
        assert_eq!(shared.finished.load(Ordering::Relaxed), 21);
    }
}

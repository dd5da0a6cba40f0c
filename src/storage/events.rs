//! [`SqlEventStore`]: the actors' [`EventStore`] on the database.
//!
//! Appends go to the group-commit writer (`writer.rs`); reads go through
//! the r2d2 pool on tokio's blocking threads, never on the event loop.
//! Events come back ordered by seq.

use std::collections::HashMap;
use std::sync::Arc;

use diesel::prelude::*;
use duet_actors::domain::{Event, Seq, SessionId};
use duet_actors::error::StoreError;
use duet_actors::ports::{AppendBatch, EventStore, PortFuture, SessionSnapshot};

use super::rows::{decode_events, EventRow, SessionRow, ENDED};
use super::schema::{events, sessions};
use super::writer::WriterHandle;
use super::{blocking, DbConn, Pool};

pub(crate) struct SqlEventStore {
    pool: Pool,
    get_timeout: std::time::Duration,
    writer: WriterHandle,
}

impl SqlEventStore {
    pub(super) fn new(
        pool: Pool,
        get_timeout: std::time::Duration,
        writer: WriterHandle,
    ) -> SqlEventStore {
        SqlEventStore {
            pool,
            get_timeout,
            writer,
        }
    }

    pub(super) fn writer(&self) -> &super::writer::WriterCounters {
        self.writer.counters()
    }

    fn read<T, F>(&self, f: F) -> PortFuture<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut DbConn) -> QueryResult<T> + Send + 'static,
    {
        let pool = self.pool.clone();
        let timeout = self.get_timeout;
        Box::pin(async move { blocking(pool, timeout, f).await.map_err(StoreError::from) })
    }
}

impl EventStore for SqlEventStore {
    /// Resolves `Ok` once the batch is committed. `Unavailable` means it was
    /// not stored, except in one case no database client can rule out: the
    /// connection broke while COMMIT was in flight. `load_session` tells.
    fn append(&self, batch: AppendBatch) -> PortFuture<()> {
        // Queued here, in the call, so that calls keep their order.
        let ack = self.writer.submit(batch);
        Box::pin(async move {
            match ack {
                Ok(ack) => ack.await.unwrap_or(Err(StoreError::Internal)),
                Err(e) => Err(e),
            }
        })
    }

    fn load_session(&self, id: &SessionId) -> PortFuture<Option<SessionSnapshot>> {
        let id = id.clone();
        self.read(move |c| c.snapshot(|c| load_session(c, &id)))
    }

    fn events_after(&self, id: &SessionId, after: Seq, limit: u32) -> PortFuture<Vec<Arc<Event>>> {
        let id = id.clone();
        self.read(move |c| {
            let rows = events::table
                .filter(events::session_id.eq(id.as_ref()))
                .filter(events::seq.gt(after))
                .order(events::seq.asc())
                .limit(i64::from(limit))
                .select(EventRow::as_select())
                .load(c)?;
            Ok(decode_events(&id, rows))
        })
    }

    fn events_before(
        &self,
        id: &SessionId,
        before: Seq,
        limit: u32,
    ) -> PortFuture<Vec<Arc<Event>>> {
        let id = id.clone();
        self.read(move |c| {
            let mut rows = events::table
                .filter(events::session_id.eq(id.as_ref()))
                .filter(events::seq.lt(before))
                .order(events::seq.desc())
                .limit(i64::from(limit))
                .select(EventRow::as_select())
                .load(c)?;
            rows.reverse();
            Ok(decode_events(&id, rows))
        })
    }

    fn open_sessions(&self) -> PortFuture<Vec<SessionSnapshot>> {
        self.read(|c| c.snapshot(open_sessions))
    }
}

fn bad_row(e: String) -> diesel::result::Error {
    diesel::result::Error::DeserializationError(e.into())
}

fn load_session(c: &mut DbConn, id: &str) -> QueryResult<Option<SessionSnapshot>> {
    let Some(row) = sessions::table
        .find(id)
        .select(SessionRow::as_select())
        .first(c)
        .optional()?
    else {
        return Ok(None);
    };
    let keys: Vec<(String, i64)> = events::table
        .filter(events::session_id.eq(id))
        .filter(events::client_key.is_not_null())
        .order(events::seq.asc())
        .select((events::client_key.assume_not_null(), events::seq))
        .load(c)?;
    let keys = keys.into_iter().map(|(k, s)| (Arc::from(k), s)).collect();
    let last_seq = last_seq(c, id)?;
    row.into_snapshot(last_seq, keys).map(Some).map_err(bad_row)
}

/// The highest stored seq of a session (0 without events), from the
/// primary key.
/// [`last_seq`] of a session that exists; `None` for an unknown session.
pub(super) fn last_seq_if_exists(c: &mut DbConn, id: &str) -> QueryResult<Option<Seq>> {
    let known: bool = diesel::select(diesel::dsl::exists(sessions::table.filter(sessions::id.eq(id)))).get_result(c)?;
    if known {
        last_seq(c, id).map(Some)
    } else {
        Ok(None)
    }
}

pub(super) fn last_seq(c: &mut DbConn, id: &str) -> QueryResult<Seq> {
    use diesel::dsl::max;
    Ok(events::table.filter(events::session_id.eq(id)).select(max(events::seq)).first::<Option<i64>>(c)?.unwrap_or(0))
}

/// Every session not ended, with its keys, in two queries (not one per
/// session: this runs at start, for every open session at once).
fn open_sessions(c: &mut DbConn) -> QueryResult<Vec<SessionSnapshot>> {
    let rows: Vec<SessionRow> = sessions::table
        .filter(sessions::status.ne(ENDED))
        .order(sessions::created_at_ms.asc())
        .select(SessionRow::as_select())
        .load(c)?;
    let keyed: Vec<(String, String, i64)> = events::table
        .inner_join(sessions::table)
        .filter(sessions::status.ne(ENDED))
        .filter(events::client_key.is_not_null())
        .order((events::session_id.asc(), events::seq.asc()))
        .select((
            events::session_id,
            events::client_key.assume_not_null(),
            events::seq,
        ))
        .load(c)?;
    let mut keys: HashMap<String, Vec<(Arc<str>, Seq)>> = HashMap::new();
    for (session, key, seq) in keyed {
        keys.entry(session).or_default().push((Arc::from(key), seq));
    }
    let lasts: Vec<(String, Option<i64>)> = events::table
        .inner_join(sessions::table)
        .filter(sessions::status.ne(ENDED))
        .group_by(events::session_id)
        .select((events::session_id, diesel::dsl::max(events::seq)))
        .load(c)?;
    let mut lasts: HashMap<String, i64> = lasts.into_iter().map(|(s, m)| (s, m.unwrap_or(0))).collect();
    Ok(rows
        .into_iter()
        .filter_map(|row| {
            let id = row.id().to_owned();
            let session_keys = keys.remove(&id).unwrap_or_default();
            let last_seq = lasts.remove(&id).unwrap_or(0);
            row.into_snapshot(last_seq, session_keys)
                .map_err(|why| tracing::warn!(session_id = %id, why, "skipping a session row that does not decode"))
                .ok()
        })
        .collect())
}

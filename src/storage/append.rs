//! The SQL of an append: many [`AppendBatch`]es in one transaction.
//!
//! For each batch, in the order given: its `Create` inserts the session row;
//! its events must continue the session's `last_seq` exactly (checked by an
//! `UPDATE … WHERE last_seq = first - 1`, so seqs stay without gaps and a
//! stale writer of the same session cannot interleave); its `Status` change
//! updates the status columns. Then all events of all batches go in as
//! multi-row INSERTs. Any failure rolls back the whole transaction.

use diesel::prelude::*;
use duet_actors::ports::{AppendBatch, SessionChange, SessionStatus};

use super::rows::{NewEventRow, NewSessionRow, ACTIVE, ENDED, WAITING};
use super::schema::{events, sessions};
use super::{DbConn, StorageError};

/// Event rows per INSERT: 6 binds each, so 30 000 binds, under SQLite's
/// 32 766 (and PostgreSQL's 65 535) bind-parameter limit.
const EVENT_ROWS_PER_INSERT: usize = 5000;

/// Why a group transaction failed.
#[derive(Debug)]
pub(super) enum AppendError {
    Db(diesel::result::Error),
    /// The batch does not continue the session's stored seq, or its session
    /// row does not exist.
    Sequence {
        session_id: String,
        detail: &'static str,
    },
}

impl From<diesel::result::Error> for AppendError {
    fn from(e: diesel::result::Error) -> Self {
        AppendError::Db(e)
    }
}

impl From<AppendError> for StorageError {
    fn from(e: AppendError) -> Self {
        match e {
            AppendError::Db(e) => StorageError::from(e),
            AppendError::Sequence { session_id, detail } => {
                tracing::warn!(session_id = %session_id, detail, "append refused");
                StorageError::Conflict(format!("session {session_id}: {detail}"))
            }
        }
    }
}

/// Checks what needs no database: events belong to the batch's session and
/// their seqs run on by one. A batch failing this is a caller bug.
pub(super) fn validate(batch: &AppendBatch) -> Result<(), String> {
    if let Some(SessionChange::Create(record, _)) = &batch.change {
        if record.id != batch.session_id {
            return Err("created record has another session id".to_owned());
        }
    }
    let mut expected = batch.events.first().map(|e| e.event.seq);
    if expected.is_some_and(|s| s < 1) {
        return Err("seq below 1".to_owned());
    }
    for e in &batch.events {
        if e.event.session_id != batch.session_id {
            return Err(format!("event seq {} of another session", e.event.seq));
        }
        if Some(e.event.seq) != expected {
            return Err(format!("seq {} out of order", e.event.seq));
        }
        expected = expected.map(|s| s + 1);
    }
    Ok(())
}

/// Commits the batches together, or nothing of them.
pub(super) fn commit_group(conn: &mut DbConn, batches: &[&AppendBatch]) -> Result<(), AppendError> {
    conn.write_transaction(|c| {
        // Creations first: a batch that creates its session also carries its
        // first events, whose seq check needs the row.
        for batch in batches {
            create_session_row(c, batch)?;
        }
        advance_seqs(c, batches)?;
        for batch in batches {
            apply_status(c, batch)?;
        }
        let rows: Vec<NewEventRow<'_>> = batches
            .iter()
            .flat_map(|b| b.events.iter().map(move |e| NewEventRow::new(b, e)))
            .collect();
        match c {
            // One statement text for any number of rows (arrays, not a
            // VALUES list), so PostgreSQL plans it once per connection.
            DbConn::Pg(pg) => insert_events_pg(pg, &rows)?,
            // The derived backend has no multi-row INSERT for SQLite, while
            // SQLite's own connection has one.
            DbConn::Sqlite(lite) => {
                for chunk in rows.chunks(EVENT_ROWS_PER_INSERT) {
                    diesel::insert_into(events::table).values(chunk).execute(lite)?;
                }
            }
        }
        Ok(())
    })
}

fn insert_events_pg(pg: &mut diesel::PgConnection, rows: &[NewEventRow<'_>]) -> QueryResult<()> {
    use diesel::sql_types::{Array, BigInt, Nullable, Text};
    if rows.is_empty() {
        return Ok(());
    }
    let inserted = diesel::sql_query(
        "INSERT INTO events (session_id, seq, kind, body, at_ms, client_key) \
         SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::bigint[], $6::text[])",
    )
    .bind::<Array<Text>, _>(rows.iter().map(|r| r.session_id).collect::<Vec<_>>())
    .bind::<Array<BigInt>, _>(rows.iter().map(|r| r.seq).collect::<Vec<_>>())
    .bind::<Array<Text>, _>(rows.iter().map(|r| r.kind).collect::<Vec<_>>())
    .bind::<Array<Text>, _>(rows.iter().map(|r| r.body.as_str()).collect::<Vec<_>>())
    .bind::<Array<BigInt>, _>(rows.iter().map(|r| r.at_ms).collect::<Vec<_>>())
    .bind::<Array<Nullable<Text>>, _>(rows.iter().map(|r| r.client_key).collect::<Vec<_>>())
    .execute(pg)?;
    if inserted != rows.len() {
        return Err(diesel::result::Error::RollbackTransaction);
    }
    Ok(())
}

fn refused(batch: &AppendBatch, detail: &'static str) -> AppendError {
    AppendError::Sequence { session_id: batch.session_id.to_string(), detail }
}

fn create_session_row(c: &mut DbConn, batch: &AppendBatch) -> Result<(), AppendError> {
    if let Some(SessionChange::Create(record, status)) = &batch.change {
        diesel::insert_into(sessions::table)
            .values(NewSessionRow::new(record, status))
            .execute(c)?;
    }
    Ok(())
}

/// Moves each session's `last_seq` to its batch's last event, if and only if
/// the batch starts right after the stored one. On PostgreSQL one statement
/// checks a whole group (a round trip per session would dominate the
/// commit); SQLite is in-process, so a statement per session costs little.
/// Any refusal fails the group; the writer then retries batch by batch to
/// find the one at fault.
fn advance_seqs(c: &mut DbConn, batches: &[&AppendBatch]) -> Result<(), AppendError> {
    let moves: Vec<(&AppendBatch, i64, i64)> = batches
        .iter()
        .filter_map(|b| Some((*b, b.events.first()?.event.seq - 1, b.events.last()?.event.seq)))
        .collect();
    match c {
        DbConn::Pg(pg) if !moves.is_empty() => {
            use diesel::sql_types::{Array, BigInt, Text};
            // Several batches of one session in a group must chain; then the
            // session moves once, from the first batch's start to the last's end.
            let mut at: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
            let mut merged: Vec<(&AppendBatch, i64, i64)> = Vec::with_capacity(moves.len());
            for (b, prev, last) in moves {
                match at.get(b.session_id.as_ref()) {
                    Some(&i) if merged[i].2 == prev => merged[i].2 = last,
                    Some(_) => return Err(refused(b, "batches of one session do not follow each other")),
                    None => {
                        at.insert(b.session_id.as_ref(), merged.len());
                        merged.push((b, prev, last));
                    }
                }
            }
            let moves = merged;
            let moved = diesel::sql_query(
                "UPDATE sessions AS s SET last_seq = v.last \
                 FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS v(id, prev, last) \
                 WHERE s.id = v.id AND s.last_seq = v.prev",
            )
            .bind::<Array<Text>, _>(moves.iter().map(|(b, _, _)| b.session_id.as_ref()).collect::<Vec<_>>())
            .bind::<Array<BigInt>, _>(moves.iter().map(|(_, prev, _)| *prev).collect::<Vec<_>>())
            .bind::<Array<BigInt>, _>(moves.iter().map(|(_, _, last)| *last).collect::<Vec<_>>())
            .execute(pg)?;
            if moved != moves.len() {
                return Err(refused(moves[0].0, "a batch of the group does not continue its stored log"));
            }
        }
        _ => {
            for (b, prev, last) in moves {
                let moved = diesel::update(sessions::table)
                    .filter(sessions::id.eq(b.session_id.as_ref()))
                    .filter(sessions::last_seq.eq(prev))
                    .set(sessions::last_seq.eq(last))
                    .execute(c)?;
                if moved != 1 {
                    return Err(refused(b, "seq does not continue the stored log (or no such session)"));
                }
            }
        }
    }
    Ok(())
}

fn apply_status(c: &mut DbConn, batch: &AppendBatch) -> Result<(), AppendError> {
    if let Some(SessionChange::Status(status)) = &batch.change {
        if update_status(c, batch.session_id.as_ref(), status)? != 1 {
            return Err(refused(batch, "status change for a session that is not stored"));
        }
    }
    Ok(())
}

/// Writes the columns of the new status. Going back to waiting clears the
/// agent; the other moves keep earlier columns for history (wait times).
fn update_status(c: &mut DbConn, id: &str, status: &SessionStatus) -> QueryResult<usize> {
    let row = sessions::table.filter(sessions::id.eq(id));
    match status {
        SessionStatus::Waiting { queued_at_ms } => diesel::update(row)
            .set((
                sessions::status.eq(WAITING),
                sessions::queued_at_ms.eq(Some(*queued_at_ms)),
                sessions::agent_id.eq(None::<&str>),
                sessions::agent_name.eq(None::<&str>),
                sessions::agent_kind.eq(None::<&str>),
                sessions::assigned_at_ms.eq(None::<i64>),
            ))
            .execute(c),
        SessionStatus::Active {
            agent,
            assigned_at_ms,
        } => diesel::update(row)
            .set((
                sessions::status.eq(ACTIVE),
                sessions::agent_id.eq(Some(agent.id.as_ref())),
                sessions::agent_name.eq(Some(agent.name.as_ref())),
                sessions::agent_kind.eq(Some(agent.kind.as_str())),
                sessions::assigned_at_ms.eq(Some(*assigned_at_ms)),
            ))
            .execute(c),
        SessionStatus::Ended { reason, at_ms } => diesel::update(row)
            .set((
                sessions::status.eq(ENDED),
                sessions::ended_reason.eq(Some(reason.as_str())),
                sessions::ended_at_ms.eq(Some(*at_ms)),
            ))
            .execute(c),
    }
}

#[derive(QueryableByName)]
struct MovedSession {
    #[diesel(sql_type = diesel::sql_types::Text)]
    id: String,
}

/// The hot-path statement as a query type of its own: a static query id
/// lets diesel prepare it once per connection (a `sql_query` is parsed and
/// planned on every call, and planning this one cost more than the write).
struct PlainAppend<'a> {
    ids: Vec<&'a str>,
    prevs: Vec<i64>,
    lasts: Vec<i64>,
    ev_sessions: Vec<&'a str>,
    ev_seqs: Vec<i64>,
    ev_kinds: Vec<&'a str>,
    ev_bodies: Vec<&'a str>,
    ev_at: Vec<i64>,
    ev_keys: Vec<Option<&'a str>>,
}

struct PlainAppendId;

impl diesel::query_builder::QueryId for PlainAppend<'_> {
    type QueryId = PlainAppendId;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl diesel::query_builder::Query for PlainAppend<'_> {
    type SqlType = diesel::sql_types::Untyped;
}

impl<'a> RunQueryDsl<diesel::PgConnection> for PlainAppend<'a> {}

impl diesel::query_builder::QueryFragment<diesel::pg::Pg> for PlainAppend<'_> {
    fn walk_ast<'b>(&'b self, mut out: diesel::query_builder::AstPass<'_, 'b, diesel::pg::Pg>) -> QueryResult<()> {
        use diesel::sql_types::{Array, BigInt, Nullable, Text};
        out.push_sql("WITH moved AS (UPDATE sessions AS s SET last_seq = v.last FROM unnest(");
        out.push_bind_param::<Array<Text>, _>(&self.ids)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<BigInt>, _>(&self.prevs)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<BigInt>, _>(&self.lasts)?;
        out.push_sql(
            ") AS v(id, prev, last) WHERE s.id = v.id AND s.last_seq = v.prev RETURNING s.id), \
             stored AS (INSERT INTO events (session_id, seq, kind, body, at_ms, client_key) \
             SELECT e.* FROM unnest(",
        );
        out.push_bind_param::<Array<Text>, _>(&self.ev_sessions)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<BigInt>, _>(&self.ev_seqs)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.ev_kinds)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.ev_bodies)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<BigInt>, _>(&self.ev_at)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<Text>>, _>(&self.ev_keys)?;
        out.push_sql(
            ") AS e(session_id, seq, kind, body, at_ms, client_key) \
             WHERE e.session_id IN (SELECT id FROM moved) RETURNING 1) \
             SELECT id FROM moved",
        );
        Ok(())
    }
}

/// The hot path on PostgreSQL: a group of plain appends (no session row
/// created or changed) as ONE statement in autocommit, so one round trip and
/// one commit store the whole group. The seq check and the insert are one
/// data-modifying CTE: only events of sessions whose `last_seq` moved are
/// inserted, so each batch stands or falls on its own. Answers, per batch,
/// whether it was stored; `None` when the group needs the general path.
pub(super) fn commit_plain_group_pg(conn: &mut DbConn, batches: &[&AppendBatch]) -> Option<Result<Vec<bool>, AppendError>> {
    let DbConn::Pg(pg) = conn else { return None };
    if batches.iter().any(|b| b.change.is_some() || b.events.is_empty()) {
        return None;
    }
    let mut seen = std::collections::HashSet::new();
    if !batches.iter().all(|b| seen.insert(b.session_id.as_ref())) {
        return None; // two batches of one session: the general path chains them
    }
    let rows: Vec<NewEventRow<'_>> = batches
        .iter()
        .flat_map(|b| b.events.iter().map(move |e| NewEventRow::new(b, e)))
        .collect();
    let query = PlainAppend {
        ids: batches.iter().map(|b| b.session_id.as_ref()).collect(),
        prevs: batches.iter().map(|b| b.events[0].event.seq - 1).collect(),
        lasts: batches.iter().filter_map(|b| b.events.last().map(|e| e.event.seq)).collect(),
        ev_sessions: rows.iter().map(|r| r.session_id).collect(),
        ev_seqs: rows.iter().map(|r| r.seq).collect(),
        ev_kinds: rows.iter().map(|r| r.kind).collect(),
        ev_bodies: rows.iter().map(|r| r.body.as_str()).collect(),
        ev_at: rows.iter().map(|r| r.at_ms).collect(),
        ev_keys: rows.iter().map(|r| r.client_key).collect(),
    };
    let moved = query.load::<MovedSession>(pg);
    Some(match moved {
        Ok(moved) => {
            let moved: std::collections::HashSet<String> = moved.into_iter().map(|m| m.id).collect();
            Ok(batches.iter().map(|b| moved.contains(b.session_id.as_ref())).collect())
        }
        Err(e) => Err(AppendError::Db(e)),
    })
}

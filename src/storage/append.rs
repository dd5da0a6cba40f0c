//! The SQL of an append: many [`AppendBatch`]es in one transaction.
//!
//! Seqs: each batch must continue its session's log exactly. The writer
//! knows the last seq of every session it wrote ([`SeqCache`], read once
//! from the primary key when it first sees a session), so the check costs
//! no statement and no session row is rewritten per message; the primary
//! key `(session_id, seq)` still refuses a seq stored twice, by anyone.
//!
//! A group: `Create`s insert session rows, `Status` changes update them,
//! then all events go in as one multi-row INSERT; all or nothing. A group of
//! plain appends on PostgreSQL is a single prepared INSERT in autocommit
//! ([`commit_plain_group_pg`]): one round trip, one commit.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use diesel::prelude::*;
use duet_actors::ports::{AppendBatch, SessionChange, SessionStatus};

use super::rows::{NewEventRow, NewSessionRow, ACTIVE, ENDED, WAITING};
use super::schema::{events, sessions};
use super::{DbConn, StorageError};

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

/// The last seq each session of a group reaches once the group is stored.
type Reached = HashMap<Arc<str>, i64>;

/// The last stored seq of each session this writer has written, so that
/// continuing a log needs no query. An entry is dropped when its session
/// ends, and whenever a write of it failed (then storage is asked again).
#[derive(Default)]
pub(super) struct SeqCache {
    last: HashMap<Arc<str>, i64>,
}

impl SeqCache {
    /// The session's last stored seq; `None` when the session does not
    /// exist (the events table has no foreign key: this is the check).
    fn stored(&mut self, c: &mut DbConn, batch: &AppendBatch) -> QueryResult<Option<i64>> {
        if matches!(batch.change, Some(SessionChange::Create(..))) {
            return Ok(Some(0));
        }
        if let Some(&last) = self.last.get(batch.session_id.as_ref()) {
            return Ok(Some(last));
        }
        let last = super::events::last_seq_if_exists(c, &batch.session_id)?;
        if let Some(last) = last {
            self.last.insert(batch.session_id.clone(), last);
        }
        Ok(last)
    }

    /// Which batches continue their logs (a session's batches in a group
    /// must also follow each other), and the last seq each session reaches.
    fn check(&mut self, c: &mut DbConn, batches: &[&AppendBatch]) -> QueryResult<(Vec<bool>, Reached)> {
        let mut reached: HashMap<Arc<str>, i64> = HashMap::new();
        let mut broken: HashSet<&str> = HashSet::new();
        let mut ok = Vec::with_capacity(batches.len());
        for b in batches {
            let (Some(first), Some(last)) = (b.events.first(), b.events.last()) else {
                ok.push(!broken.contains(b.session_id.as_ref()));
                continue;
            };
            let prev = match reached.get(&b.session_id) {
                Some(&p) => Some(p),
                None => self.stored(c, b)?,
            };
            let fits = !broken.contains(b.session_id.as_ref()) && prev.is_some_and(|p| first.event.seq == p + 1);
            if fits {
                reached.insert(b.session_id.clone(), last.event.seq);
            } else {
                broken.insert(b.session_id.as_ref());
            }
            ok.push(fits);
        }
        Ok((ok, reached))
    }

    /// After a commit: remember where each session is; forget ended ones.
    fn committed(&mut self, batches: &[&AppendBatch], reached: Reached) {
        self.last.extend(reached);
        for b in batches {
            if matches!(b.change, Some(SessionChange::Status(SessionStatus::Ended { .. }))) {
                self.last.remove(b.session_id.as_ref());
            }
        }
    }

    /// Moves the entry of `id` from `from` into this cache (none there:
    /// none here either); a session's entry travels with the writer that
    /// holds the session.
    pub(super) fn adopt(&mut self, id: &Arc<str>, from: &mut SeqCache) {
        match from.last.remove(id) {
            Some(last) => self.last.insert(id.clone(), last),
            None => self.last.remove(id),
        };
    }

    /// After a failure: what was stored is unknown, so ask storage next time.
    pub(super) fn forget(&mut self, batches: &[&AppendBatch]) {
        for b in batches {
            self.last.remove(b.session_id.as_ref());
        }
    }
}

/// Commits the batches together, or nothing of them. Any batch that does
/// not continue its log fails the group (the writer then retries batch by
/// batch to find the one at fault).
pub(super) fn commit_group(conn: &mut DbConn, batches: &[&AppendBatch], seqs: &mut SeqCache) -> Result<(), AppendError> {
    let res = conn.write_transaction(|c| {
        for batch in batches {
            create_session_row(c, batch)?;
        }
        let (ok, reached) = seqs.check(c, batches)?;
        if let Some(i) = ok.iter().position(|fits| !fits) {
            return Err(refused(batches[i], "seq does not continue the stored log"));
        }
        for batch in batches {
            apply_status(c, batch)?;
        }
        insert_events(c, &event_rows(batches.iter().copied()))?;
        Ok(((), reached))
    });
    settle(seqs, batches, res)
}

/// The rows of these batches' events, in order.
fn event_rows<'a>(batches: impl Iterator<Item = &'a AppendBatch>) -> Vec<NewEventRow<'a>> {
    batches.flat_map(|b| b.events.iter().map(move |e| NewEventRow::new(b, e))).collect()
}

/// The seq cache follows the outcome: where the sessions now stand after a
/// commit, "ask storage" after a failure.
fn settle<T>(seqs: &mut SeqCache, batches: &[&AppendBatch], res: Result<(T, Reached), AppendError>) -> Result<T, AppendError> {
    match res {
        Ok((value, reached)) => {
            seqs.committed(batches, reached);
            Ok(value)
        }
        Err(e) => {
            seqs.forget(batches);
            Err(e)
        }
    }
}

fn insert_events(c: &mut DbConn, rows: &[NewEventRow<'_>]) -> Result<(), AppendError> {
    if rows.is_empty() {
        return Ok(());
    }
    match c {
        // One prepared statement for any number of rows (arrays, not a
        // VALUES list), so PostgreSQL plans it once per connection.
        DbConn::Pg(pg) => {
            let inserted = InsertEventsPg::new(rows).execute(pg)?;
            if inserted != rows.len() {
                return Err(AppendError::Db(diesel::result::Error::RollbackTransaction));
            }
        }
        // One row per INSERT: diesel prepares a one-row INSERT once per
        // connection, while a multi-row one (its SQL depends on the count)
        // is parsed and planned again for every group, and needs a
        // statement journal besides; SQLite runs in-process, so rows cost
        // no round trip. Measured: parsing was 3 % of the writer's CPU, the
        // statement journal another 3 %.
        DbConn::Sqlite(lite) => {
            for row in rows {
                diesel::insert_into(events::table).values(row).execute(lite)?;
            }
        }
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

/// The events INSERT on PostgreSQL as a query type of its own: a static
/// query id lets diesel prepare it once per connection (a `sql_query` is
/// parsed and planned on every call, which cost more than the write).
struct InsertEventsPg<'a> {
    sessions: Vec<&'a str>,
    seqs: Vec<i64>,
    kinds: Vec<&'a str>,
    bodies: Vec<&'a str>,
    at: Vec<i64>,
    keys: Vec<Option<&'a str>>,
}

impl<'a> InsertEventsPg<'a> {
    fn new(rows: &'a [NewEventRow<'a>]) -> InsertEventsPg<'a> {
        InsertEventsPg {
            sessions: rows.iter().map(|r| r.session_id).collect(),
            seqs: rows.iter().map(|r| r.seq).collect(),
            kinds: rows.iter().map(|r| r.kind).collect(),
            bodies: rows.iter().map(|r| r.body.as_str()).collect(),
            at: rows.iter().map(|r| r.at_ms).collect(),
            keys: rows.iter().map(|r| r.client_key).collect(),
        }
    }
}

struct InsertEventsPgId;

impl diesel::query_builder::QueryId for InsertEventsPg<'_> {
    type QueryId = InsertEventsPgId;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl RunQueryDsl<diesel::PgConnection> for InsertEventsPg<'_> {}

impl diesel::query_builder::QueryFragment<diesel::pg::Pg> for InsertEventsPg<'_> {
    fn walk_ast<'b>(&'b self, mut out: diesel::query_builder::AstPass<'_, 'b, diesel::pg::Pg>) -> QueryResult<()> {
        use diesel::sql_types::{Array, BigInt, Nullable, Text};
        out.push_sql("INSERT INTO events (session_id, seq, kind, body, at_ms, client_key) SELECT * FROM unnest(");
        out.push_bind_param::<Array<Text>, _>(&self.sessions)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<BigInt>, _>(&self.seqs)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.kinds)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Text>, _>(&self.bodies)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<BigInt>, _>(&self.at)?;
        out.push_sql(", ");
        out.push_bind_param::<Array<Nullable<Text>>, _>(&self.keys)?;
        out.push_sql(")");
        Ok(())
    }
}

/// How the event writers' connections show in PostgreSQL's `pg_stat_activity`.
pub(super) const WRITER_APPLICATION_NAME: &str = "duet-writer";

/// Prepares, on a fresh PostgreSQL connection, the statements a group runs
/// (the events INSERT, with no rows, and the seq lookup of a session the
/// writer has not seen), so that the backend has planned them and loaded
/// the tables' catalog entries before a message waits on it. A helper
/// connects beside a slow commit, and its first group used to pay the
/// backend's cold start on top (tens of ms under load; BENCHMARKS.md).
/// SQLite runs in-process and prepares in microseconds: nothing to do.
pub(super) fn warm_up(conn: &mut DbConn) -> QueryResult<()> {
    use diesel::connection::SimpleConnection;
    let DbConn::Pg(pg) = conn else { return Ok(()) };
    // Named in pg_stat_activity, apart from the read pool's connections.
    pg.batch_execute(&format!("SET application_name = '{WRITER_APPLICATION_NAME}'"))?;
    InsertEventsPg::new(&[]).execute(pg)?;
    super::events::last_seq_if_exists(conn, "")?;
    Ok(())
}

/// The hot path on PostgreSQL: a group of plain appends (no session row
/// created or changed) as ONE prepared INSERT in autocommit: one round trip,
/// one commit for the whole group. Batches that do not continue their logs
/// are left out and answered `false`. `None` when the group needs the
/// general path.
pub(super) fn commit_plain_group_pg(
    conn: &mut DbConn,
    batches: &[&AppendBatch],
    seqs: &mut SeqCache,
) -> Option<Result<Vec<bool>, AppendError>> {
    if !matches!(conn, DbConn::Pg(_)) || batches.iter().any(|b| b.change.is_some()) {
        return None;
    }
    let (ok, reached) = match seqs.check(conn, batches) {
        Ok(checked) => checked,
        Err(e) => return Some(Err(AppendError::Db(e))),
    };
    let rows = event_rows(batches.iter().zip(&ok).filter(|(_, fits)| **fits).map(|(b, _)| *b));
    let res = insert_events(conn, &rows).map(|()| (ok, reached));
    Some(settle(seqs, batches, res))
}

//! Rows of `sessions` and `events`, and their translation to and from the
//! actors' types. The event body goes through `protocol::event_json`, the
//! one codec of event JSON, so a replayed event is the frame sent live.

use std::sync::Arc;

use diesel::prelude::*;
use duet_actors::domain::{AgentInfo, AgentKind, EndReason, Event, Mode, Seq, SessionId};
use duet_actors::ports::{AppendBatch, NewEvent, SessionRecord, SessionSnapshot, SessionStatus};

use super::schema::{events, sessions};
use crate::protocol::event_json::{decode_body, encode_body};

pub(super) const WAITING: &str = "waiting";
pub(super) const ACTIVE: &str = "active";
pub(super) const ENDED: &str = "ended";

/// The columns that say where a session stands; the others stay `None`.
#[derive(Default)]
pub(super) struct StatusColumns<'a> {
    pub status: &'static str,
    pub queued_at_ms: Option<i64>,
    pub agent_id: Option<&'a str>,
    pub agent_name: Option<&'a str>,
    pub agent_kind: Option<&'static str>,
    pub assigned_at_ms: Option<i64>,
    pub ended_reason: Option<&'static str>,
    pub ended_at_ms: Option<i64>,
}

impl<'a> StatusColumns<'a> {
    pub(super) fn of(status: &'a SessionStatus) -> StatusColumns<'a> {
        match status {
            SessionStatus::Waiting { queued_at_ms } => StatusColumns {
                status: WAITING,
                queued_at_ms: Some(*queued_at_ms),
                ..Default::default()
            },
            SessionStatus::Active {
                agent,
                assigned_at_ms,
            } => StatusColumns {
                status: ACTIVE,
                agent_id: Some(&agent.id),
                agent_name: Some(&agent.name),
                agent_kind: Some(agent.kind.as_str()),
                assigned_at_ms: Some(*assigned_at_ms),
                ..Default::default()
            },
            SessionStatus::Ended { reason, at_ms } => StatusColumns {
                status: ENDED,
                ended_reason: Some(reason.as_str()),
                ended_at_ms: Some(*at_ms),
                ..Default::default()
            },
        }
    }
}

/// A new `sessions` row.
#[derive(Insertable)]
#[diesel(table_name = sessions, treat_none_as_default_value = false)]
pub(super) struct NewSessionRow<'a> {
    id: &'a str,
    topic: &'a str,
    mode: &'static str,
    customer_name: &'a str,
    resume_token_hash: &'a str,
    created_at_ms: i64,
    status: &'static str,
    queued_at_ms: Option<i64>,
    agent_id: Option<&'a str>,
    agent_name: Option<&'a str>,
    agent_kind: Option<&'static str>,
    assigned_at_ms: Option<i64>,
    ended_reason: Option<&'static str>,
    ended_at_ms: Option<i64>,
}

impl<'a> NewSessionRow<'a> {
    pub(super) fn new(r: &'a SessionRecord, status: &'a SessionStatus) -> NewSessionRow<'a> {
        let s = StatusColumns::of(status);
        NewSessionRow {
            id: &r.id,
            topic: &r.topic,
            mode: r.mode.as_str(),
            customer_name: &r.customer_name,
            resume_token_hash: &r.resume_token_hash,
            created_at_ms: r.created_at_ms,
            status: s.status,
            queued_at_ms: s.queued_at_ms,
            agent_id: s.agent_id,
            agent_name: s.agent_name,
            agent_kind: s.agent_kind,
            assigned_at_ms: s.assigned_at_ms,
            ended_reason: s.ended_reason,
            ended_at_ms: s.ended_at_ms,
        }
    }
}

/// A new `events` row. NULL client keys are bound as NULL (not DEFAULT) so
/// that every row has the same shape and a chunk is one multi-row INSERT.
#[derive(Insertable)]
#[diesel(table_name = events, treat_none_as_default_value = false)]
pub(super) struct NewEventRow<'a> {
    pub(super) session_id: &'a str,
    pub(super) seq: i64,
    pub(super) kind: &'static str,
    pub(super) body: String,
    pub(super) at_ms: i64,
    pub(super) client_key: Option<&'a str>,
}

impl<'a> NewEventRow<'a> {
    pub(super) fn new(batch: &'a AppendBatch, e: &'a NewEvent) -> NewEventRow<'a> {
        NewEventRow {
            session_id: &batch.session_id,
            seq: e.event.seq,
            kind: e.event.body.type_name(),
            body: encode_body(&e.event.body),
            at_ms: e.event.at_ms,
            client_key: e.client_key.as_deref(),
        }
    }
}

/// A stored `sessions` row.
#[derive(Queryable, Selectable)]
#[diesel(table_name = sessions)]
pub(super) struct SessionRow {
    id: String,
    topic: String,
    mode: String,
    customer_name: String,
    resume_token_hash: String,
    created_at_ms: i64,
    status: String,
    queued_at_ms: Option<i64>,
    agent_id: Option<String>,
    agent_name: Option<String>,
    agent_kind: Option<String>,
    assigned_at_ms: Option<i64>,
    ended_reason: Option<String>,
    ended_at_ms: Option<i64>,
}

impl SessionRow {
    pub(super) fn id(&self) -> &str {
        &self.id
    }

    /// The snapshot the actors resume from, or why this row is not one duet
    /// could have written.
    pub(super) fn into_snapshot(
        self,
        last_seq: Seq,
        client_keys: Vec<(Arc<str>, Seq)>,
    ) -> Result<SessionSnapshot, String> {
        let status = self.status()?;
        let mode =
            Mode::parse(&self.mode).ok_or_else(|| format!("unknown mode {:?}", self.mode))?;
        Ok(SessionSnapshot {
            record: SessionRecord {
                id: Arc::from(self.id),
                topic: Arc::from(self.topic),
                mode,
                customer_name: Arc::from(self.customer_name),
                resume_token_hash: Arc::from(self.resume_token_hash),
                created_at_ms: self.created_at_ms,
            },
            status,
            last_seq,
            client_keys,
        })
    }

    fn status(&self) -> Result<SessionStatus, String> {
        match self.status.as_str() {
            WAITING => Ok(SessionStatus::Waiting {
                queued_at_ms: self.queued_at_ms.unwrap_or(self.created_at_ms),
            }),
            ACTIVE => match (&self.agent_id, &self.agent_name) {
                (Some(id), Some(name)) => Ok(SessionStatus::Active {
                    agent: AgentInfo {
                        id: Arc::from(id.as_str()),
                        name: Arc::from(name.as_str()),
                        kind: if self.agent_kind.as_deref() == Some("ai") {
                            AgentKind::Ai
                        } else {
                            AgentKind::Human
                        },
                    },
                    assigned_at_ms: self.assigned_at_ms.unwrap_or(self.created_at_ms),
                }),
                _ => Err("active session without agent".to_owned()),
            },
            ENDED => {
                let reason = self.ended_reason.as_deref().unwrap_or_default();
                Ok(SessionStatus::Ended {
                    reason: EndReason::parse(reason)
                        .ok_or_else(|| format!("unknown end reason {reason:?}"))?,
                    at_ms: self.ended_at_ms.unwrap_or(self.created_at_ms),
                })
            }
            other => Err(format!("unknown status {other:?}")),
        }
    }
}

/// A stored `events` row, without its session id (the query names it).
#[derive(Queryable, Selectable)]
#[diesel(table_name = events)]
pub(super) struct EventRow {
    seq: i64,
    kind: String,
    body: String,
    at_ms: i64,
}

/// Turns rows into events, oldest first as given; a row `decode_body`
/// refuses is skipped and logged, never fatal to the page.
pub(super) fn decode_events(session_id: &SessionId, rows: Vec<EventRow>) -> Vec<Arc<Event>> {
    rows.into_iter()
        .filter_map(|r| match decode_body(&r.kind, &r.body) {
            Some(body) => Some(Arc::new(Event { session_id: session_id.clone(), seq: r.seq, at_ms: r.at_ms, body })),
            None => {
                tracing::warn!(session_id = %session_id, seq = r.seq, kind = %r.kind, "skipping an event row that does not decode");
                None
            }
        })
        .collect()
}

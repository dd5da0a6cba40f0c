//! Domain frames → JSON text, and the one mapping from actor errors to
//! protocol error codes.

use duet_actors::domain::ClientRef;
use duet_actors::error::ActorError;
use duet_actors::outbound::Outbound;
use duet_actors::views::Dashboard;
use serde::Serialize;
use serde_json::value::RawValue;

use super::event_json::{encode_event, rfc3339_ms};

/// The protocol `code` of an error, its client-facing message and, for
/// `rate_limited` and `unavailable`, when to retry.
pub fn error_parts(e: &ActorError) -> (&'static str, String, Option<u64>) {
    match e {
        ActorError::BadRequest(m) => ("bad_request", m.clone(), None),
        ActorError::Unauthorized(m) => ("unauthorized", (*m).to_owned(), None),
        ActorError::Forbidden(m) => ("forbidden", (*m).to_owned(), None),
        ActorError::NotFound(m) => ("not_found", (*m).to_owned(), None),
        ActorError::Conflict(m) => ("conflict", (*m).to_owned(), None),
        ActorError::Unavailable { message, retry_after_ms } => ("unavailable", (*message).to_owned(), Some(*retry_after_ms)),
        ActorError::RateLimited { message, retry_after_ms } => ("rate_limited", (*message).to_owned(), Some(*retry_after_ms)),
        ActorError::Internal => ("internal", "internal error".to_owned(), None),
    }
}

fn raw_ref(r: &ClientRef) -> Option<&RawValue> {
    serde_json::from_str::<&RawValue>(&r.0).ok()
}

#[derive(Serialize)]
struct ErrorFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    client_ref: Option<&'a RawValue>,
    code: &'static str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
}

/// An `error` frame.
pub fn error_frame(client_ref: Option<&ClientRef>, e: &ActorError) -> String {
    let (code, message, retry_after_ms) = error_parts(e);
    let frame = ErrorFrame { kind: "error", client_ref: client_ref.and_then(raw_ref), code, message: &message, retry_after_ms };
    serde_json::to_string(&frame).unwrap_or_else(|_| r#"{"type":"error","code":"internal","message":"internal error"}"#.to_owned())
}

#[derive(Serialize)]
struct AckFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "ref")]
    client_ref: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    session_id: Option<&'a str>,
}

#[derive(Serialize)]
struct QueueFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    session_id: &'a str,
    position: usize,
    waiting: usize,
    eta_s: u64,
}

#[derive(Serialize)]
struct TypingFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    session_id: &'a str,
    from: &'static str,
    on: bool,
}

#[derive(Serialize)]
struct StatsFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    session_id: &'a str,
    rtt_ms: f64,
    loss_pct: f64,
    jitter_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    audio_only: Option<bool>,
}

#[derive(Serialize)]
struct ResumedFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    session_id: &'a str,
}

/// The JSON text of a frame, or `None` for frames that are instructions to
/// the connection itself (`Detached`, `Close`).
pub fn encode(frame: &Outbound) -> Option<String> {
    let json = match frame {
        Outbound::Event(e) => return Some(encode_event(e)),
        Outbound::Ack { client_ref, seq, session_id } => serde_json::to_string(&AckFrame {
            kind: "ack",
            client_ref: raw_ref(client_ref),
            seq: *seq,
            session_id: session_id.as_deref(),
        }),
        Outbound::Error { client_ref, error } => return Some(error_frame(client_ref.as_ref(), error)),
        Outbound::Queue { session_id, position, waiting, eta_s } => serde_json::to_string(&QueueFrame {
            kind: "queue",
            session_id,
            position: *position,
            waiting: *waiting,
            eta_s: *eta_s,
        }),
        Outbound::Typing { session_id, from, on } => {
            serde_json::to_string(&TypingFrame { kind: "typing", session_id, from: from.as_str(), on: *on })
        }
        Outbound::Stats { session_id, stats } => serde_json::to_string(&StatsFrame {
            kind: "stats",
            session_id,
            rtt_ms: stats.rtt_ms,
            loss_pct: stats.loss_pct,
            jitter_ms: stats.jitter_ms,
            audio_only: stats.audio_only,
        }),
        Outbound::Resumed { session_id } => serde_json::to_string(&ResumedFrame { kind: "resumed", session_id }),
        Outbound::Dashboard(d) => serde_json::to_string(&DashboardFrame::new("dashboard", d)),
        Outbound::Detached { .. } | Outbound::ResumeRefused { .. } | Outbound::Close { .. } | Outbound::WrittenInPart => return None,
    };
    json.ok()
}

/// The answer to a `ping`: `pong`, then, when the ping had a `ref`, its one
/// `ack` (the contract: every message with a `ref` gets exactly one answer
/// with that ref, an `ack` or an `error`; `pong` is the ping's result, like
/// `resumed` before a resume's ack).
pub fn ping_answer(client_ref: Option<&ClientRef>, out: &mut Vec<String>) {
    out.push(r#"{"type":"pong"}"#.to_owned());
    if let Some(r) = client_ref {
        out.extend(encode(&Outbound::Ack { client_ref: r.clone(), seq: None, session_id: None }));
    }
}

#[derive(Serialize)]
struct WaitingJson<'a> {
    session_id: &'a str,
    name: &'a str,
    waiting_s: u64,
    position: usize,
}

#[derive(Serialize)]
struct QueueJson<'a> {
    topic: &'a str,
    waiting: Vec<WaitingJson<'a>>,
    waiting_count: usize,
    eta_s: u64,
    longest_wait_s: u64,
}

#[derive(Serialize)]
struct StatsJson {
    rtt_ms: f64,
    loss_pct: f64,
    jitter_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    audio_only: Option<bool>,
}

#[derive(Serialize)]
struct SessionJson<'a> {
    session_id: &'a str,
    customer: &'a str,
    agent: Option<&'a str>,
    topic: &'a str,
    mode: &'static str,
    started_at: String,
    node: &'a str,
    stats: Option<StatsJson>,
}

#[derive(Serialize)]
struct AgentJson<'a> {
    id: &'a str,
    name: &'a str,
    status: &'static str,
    session_id: Option<&'a str>,
    node: &'a str,
}

#[derive(Serialize)]
struct NodeJson<'a> {
    id: &'a str,
    sessions: usize,
    last_seen_s: u64,
}

/// The `dashboard` object (also the body of `GET /api/queues`).
#[derive(Serialize)]
pub struct DashboardFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    queues: Vec<QueueJson<'a>>,
    sessions: Vec<SessionJson<'a>>,
    agents: Vec<AgentJson<'a>>,
    nodes: Vec<NodeJson<'a>>,
}

impl<'a> DashboardFrame<'a> {
    pub fn new(kind: &'static str, d: &'a Dashboard) -> DashboardFrame<'a> {
        DashboardFrame {
            kind,
            queues: d
                .queues
                .iter()
                .map(|q| QueueJson {
                    topic: &q.topic,
                    waiting_count: q.waiting.len().max(q.waiting.last().map(|w| w.position).unwrap_or(0)),
                    waiting: q
                        .waiting
                        .iter()
                        .map(|w| WaitingJson { session_id: &w.session_id, name: &w.name, waiting_s: w.waiting_s, position: w.position })
                        .collect(),
                    eta_s: q.eta_s,
                    longest_wait_s: q.longest_wait_s,
                })
                .collect(),
            sessions: d
                .sessions
                .iter()
                .map(|s| SessionJson {
                    session_id: &s.session_id,
                    customer: &s.customer,
                    agent: s.agent.as_deref(),
                    topic: &s.topic,
                    mode: s.mode.as_str(),
                    started_at: rfc3339_ms(s.started_at_ms),
                    node: &s.node,
                    stats: s.stats.map(|st| StatsJson {
                        rtt_ms: st.rtt_ms,
                        loss_pct: st.loss_pct,
                        jitter_ms: st.jitter_ms,
                        audio_only: st.audio_only,
                    }),
                })
                .collect(),
            agents: d
                .agents
                .iter()
                .map(|a| AgentJson {
                    id: &a.id,
                    name: &a.name,
                    status: a.status.as_str(),
                    session_id: a.session_id.as_deref(),
                    node: &a.node,
                })
                .collect(),
            nodes: d.nodes.iter().map(|n| NodeJson { id: &n.id, sessions: n.sessions, last_seen_s: n.last_seen_s }).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn every_error_variant_has_its_code() {
        let cases = [
            (ActorError::BadRequest("x".into()), "bad_request", false),
            (ActorError::Unauthorized("x"), "unauthorized", false),
            (ActorError::Forbidden("x"), "forbidden", false),
            (ActorError::NotFound("x"), "not_found", false),
            (ActorError::Conflict("x"), "conflict", false),
            (ActorError::Unavailable { message: "x", retry_after_ms: 5 }, "unavailable", true),
            (ActorError::RateLimited { message: "x", retry_after_ms: 5 }, "rate_limited", true),
            (ActorError::Internal, "internal", false),
        ];
        for (e, code, retry) in cases {
            let v: serde_json::Value = serde_json::from_str(&error_frame(Some(&ClientRef(Arc::from("7"))), &e)).expect("json");
            assert_eq!(v["type"], "error");
            assert_eq!(v["code"], code);
            assert_eq!(v["ref"], 7);
            assert_eq!(v.get("retry_after_ms").is_some(), retry, "{code}");
        }
    }

    #[test]
    fn ack_echoes_the_ref_exactly() {
        let a = encode(&Outbound::Ack { client_ref: ClientRef(Arc::from("\"r-1\"")), seq: Some(42), session_id: None })
            .expect("ack encodes");
        assert_eq!(a, r#"{"type":"ack","ref":"r-1","seq":42}"#);
        let mut out = Vec::new();
        ping_answer(Some(&ClientRef(Arc::from("3"))), &mut out);
        assert_eq!(out, [r#"{"type":"pong"}"#, r#"{"type":"ack","ref":3}"#]);
        out.clear();
        ping_answer(None, &mut out);
        assert_eq!(out, [r#"{"type":"pong"}"#]);
    }
}

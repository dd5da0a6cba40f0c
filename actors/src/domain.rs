//! The nouns of duet: ids, parties, modes, agents, stored events.
//!
//! These types are what the actors talk in. They know nothing of JSON or SQL:
//! `src/protocol` turns them into wire frames and `src/storage` into rows.
//! Ids are `Arc<str>` because one id is shared by many messages and maps.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A session's id: a UUID v4 in text form (the database keeps it as text).
pub type SessionId = Arc<str>;
/// An admin's (agent's) id as given by the operator (`duet admin add <id>`).
pub type AgentId = Arc<str>;
/// A per-session event number: 1, 2, 3, … without gaps.
pub type Seq = i64;

/// Milliseconds since the Unix epoch; every instant duet stores is one of these.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A fresh session id.
pub fn new_session_id() -> SessionId {
    Arc::from(uuid::Uuid::new_v4().to_string())
}

/// How the customer wants to be served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    Human,
    Ai,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Human => "human",
            Mode::Ai => "ai",
        }
    }
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "human" => Some(Mode::Human),
            "ai" => Some(Mode::Ai),
            _ => None,
        }
    }
}

/// Who said or did something in a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Party {
    Customer,
    Agent,
    Ai,
    System,
}

impl Party {
    pub fn as_str(self) -> &'static str {
        match self {
            Party::Customer => "customer",
            Party::Agent => "agent",
            Party::Ai => "ai",
            Party::System => "system",
        }
    }
    pub fn parse(s: &str) -> Option<Party> {
        match s {
            "customer" => Some(Party::Customer),
            "agent" => Some(Party::Agent),
            "ai" => Some(Party::Ai),
            "system" => Some(Party::System),
            _ => None,
        }
    }
}

/// Whether the serving side is a person or the AI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentKind {
    Human,
    Ai,
}

impl AgentKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentKind::Human => "human",
            AgentKind::Ai => "ai",
        }
    }
}

/// The serving side of a session as the customer sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentInfo {
    pub id: AgentId,
    pub name: Arc<str>,
    pub kind: AgentKind,
}

/// A JSON value the actors carry without looking inside (the `data` of an
/// `rtc` message). `src/protocol` checked that it is a JSON object and writes
/// it back verbatim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpaqueJson(pub Arc<str>);

/// The `ref` a client put on a message, in its canonical JSON form (`7` or
/// `"a"`), so it can be echoed exactly and used as an idempotency key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClientRef(pub Arc<str>);

/// The WebRTC signaling kinds the relay accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RtcKind {
    Offer,
    Answer,
    Ice,
    Restart,
}

impl RtcKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RtcKind::Offer => "offer",
            RtcKind::Answer => "answer",
            RtcKind::Ice => "ice",
            RtcKind::Restart => "restart",
        }
    }
    pub fn parse(s: &str) -> Option<RtcKind> {
        match s {
            "offer" => Some(RtcKind::Offer),
            "answer" => Some(RtcKind::Answer),
            "ice" => Some(RtcKind::Ice),
            "restart" => Some(RtcKind::Restart),
            _ => None,
        }
    }
}

/// Call-quality figures a client reports; relayed, never stored.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CallStats {
    pub rtt_ms: f64,
    pub loss_pct: f64,
    pub jitter_ms: f64,
    pub audio_only: Option<bool>,
}

/// Why a session ended (the `reason` of `ended`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    CustomerLeft,
    AgentEnded,
    Timeout,
    AgentLost,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::CustomerLeft => "customer_left",
            EndReason::AgentEnded => "agent_ended",
            EndReason::Timeout => "timeout",
            EndReason::AgentLost => "agent_lost",
        }
    }
    pub fn parse(s: &str) -> Option<EndReason> {
        match s {
            "customer_left" => Some(EndReason::CustomerLeft),
            "agent_ended" => Some(EndReason::AgentEnded),
            "timeout" => Some(EndReason::Timeout),
            "agent_lost" => Some(EndReason::AgentLost),
            _ => None,
        }
    }
}

/// What happened, for each kind of stored (sequenced) event.
#[derive(Clone, Debug, PartialEq)]
pub enum EventBody {
    /// seq 1 of every session. The resume token is only in the live frame
    /// sent to the customer; the stored copy carries `None`.
    Session {
        resume_token: Option<Arc<str>>,
        topic: Arc<str>,
        mode: Mode,
    },
    Assigned {
        agent: AgentInfo,
    },
    Message {
        from: Party,
        text: Arc<str>,
        msg_id: Arc<str>,
    },
    Rtc {
        kind: RtcKind,
        data: OpaqueJson,
        from: Party,
    },
    Ended {
        reason: EndReason,
    },
}

impl EventBody {
    /// The wire `type` of this event, also the `kind` column in storage.
    pub fn type_name(&self) -> &'static str {
        match self {
            EventBody::Session { .. } => "session",
            EventBody::Assigned { .. } => "assigned",
            EventBody::Message { .. } => "message",
            EventBody::Rtc { .. } => "rtc",
            EventBody::Ended { .. } => "ended",
        }
    }
}

/// One entry of a session's ordered log.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub session_id: SessionId,
    pub seq: Seq,
    pub at_ms: i64,
    pub body: EventBody,
}

/// The secret a customer presents to resume its session. Only its SHA-256
/// is stored; it stays valid for the whole life of the session.
#[derive(Clone)]
pub struct ResumeToken(pub Arc<str>);

impl ResumeToken {
    /// 256 random bits, hex encoded.
    pub fn generate() -> ResumeToken {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        ResumeToken(Arc::from(hex(&bytes)))
    }

    pub fn hash(&self) -> String {
        hash_secret(&self.0)
    }
}

impl std::fmt::Debug for ResumeToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResumeToken(…)")
    }
}

/// SHA-256 of a secret, hex encoded: what duet stores instead of the secret.
pub fn hash_secret(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

/// Compares a presented secret with a stored hash in constant time.
pub fn secret_matches(presented: &str, stored_hash: &str) -> bool {
    let presented = hash_secret(presented);
    presented.as_bytes().ct_eq(stored_hash.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_token_matches_only_its_hash() {
        let t = ResumeToken::generate();
        assert_eq!(t.0.len(), 64);
        let h = t.hash();
        assert!(secret_matches(&t.0, &h));
        assert!(!secret_matches("nope", &h));
        assert!(!secret_matches(&ResumeToken::generate().0, &h));
    }

    #[test]
    fn names_round_trip() {
        for m in [Mode::Human, Mode::Ai] {
            assert_eq!(Mode::parse(m.as_str()), Some(m));
        }
        for p in [Party::Customer, Party::Agent, Party::Ai, Party::System] {
            assert_eq!(Party::parse(p.as_str()), Some(p));
        }
        for k in [RtcKind::Offer, RtcKind::Answer, RtcKind::Ice, RtcKind::Restart] {
            assert_eq!(RtcKind::parse(k.as_str()), Some(k));
        }
        for r in [EndReason::CustomerLeft, EndReason::AgentEnded, EndReason::Timeout, EndReason::AgentLost] {
            assert_eq!(EndReason::parse(r.as_str()), Some(r));
        }
    }
}

//! The dashboard picture agents and admins see, in domain terms.
//!
//! Built by the registry from what it knows of its node; `src/protocol`
//! encodes it as the `dashboard` message and `GET /api/queues`.

use std::sync::Arc;

use crate::domain::{AgentId, CallStats, Mode, SessionId};

#[derive(Clone, Debug, Default)]
pub struct Dashboard {
    pub queues: Vec<QueueView>,
    pub sessions: Vec<SessionView>,
    pub agents: Vec<AgentView>,
    pub nodes: Vec<NodeView>,
}

#[derive(Clone, Debug)]
pub struct QueueView {
    pub topic: Arc<str>,
    pub waiting: Vec<WaitingView>,
    pub eta_s: u64,
    pub longest_wait_s: u64,
}

#[derive(Clone, Debug)]
pub struct WaitingView {
    pub session_id: SessionId,
    pub name: Arc<str>,
    pub waiting_s: u64,
    pub position: usize,
}

#[derive(Clone, Debug)]
pub struct SessionView {
    pub session_id: SessionId,
    pub customer: Arc<str>,
    pub agent: Option<Arc<str>>,
    /// Who serves it; not on the wire, it lets the registry show that agent
    /// busy in the same snapshot (the agent's own report comes a hop later).
    pub agent_id: Option<AgentId>,
    pub topic: Arc<str>,
    pub mode: Mode,
    pub started_at_ms: i64,
    pub node: Arc<str>,
    pub stats: Option<CallStats>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentStatus {
    Available,
    Away,
    Busy,
    /// Disconnected, within the grace period to resume.
    Offline,
}

impl AgentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentStatus::Available => "available",
            AgentStatus::Away => "away",
            AgentStatus::Busy => "busy",
            AgentStatus::Offline => "offline",
        }
    }
}

#[derive(Clone, Debug)]
pub struct AgentView {
    pub id: AgentId,
    pub name: Arc<str>,
    pub status: AgentStatus,
    pub session_id: Option<SessionId>,
    pub node: Arc<str>,
}

#[derive(Clone, Debug)]
pub struct NodeView {
    pub id: Arc<str>,
    pub sessions: usize,
    pub last_seen_s: u64,
}

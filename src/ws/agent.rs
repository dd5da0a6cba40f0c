//! `/admin/ws`: an agent's (or admin's) socket, already authenticated.
//!
//! The socket belongs to the agent's `AgentActor` (kept by the registry
//! across reconnects); frames are decoded here and forwarded to it.

use std::sync::Arc;

use actix::Addr;
use duet_actors::agent::{AgentConnClosed, AgentRequest, FromAgentConn};
use duet_actors::domain::{now_ms, ClientRef};
use duet_actors::error::ActorError;
use duet_actors::outbound::{ConnHandle, Outbound, CLOSE_RESTARTING};
use duet_actors::AgentActor;

use super::conn::Role;
use crate::app::AppState;
use crate::protocol::decode::{self, AgentFrame};
use crate::protocol::encode;

pub struct AgentRole {
    /// Kept for what agent sockets will need from the node (limits, metrics).
    #[allow(dead_code)]
    pub app: Arc<AppState>,
    pub handle: ConnHandle,
    pub agent: Addr<AgentActor>,
    /// Writes relayed events from the sessions' threads.
    pub direct: Arc<super::direct::DirectSocket>,
    /// Held for the life of the socket.
    pub _registration: super::Registration,
    /// Closes the socket when its admin session ends.
    pub _session_watch: super::admin_session::AdminSessionWatch,
}

impl Role for AgentRole {
    const NAME: &'static str = "agent";

    fn conn_id(&self) -> u64 {
        self.handle.conn_id
    }

    async fn on_text(&mut self, text: &str, out: &mut Vec<String>) {
        match decode::agent_frame(text) {
            Err(e) => out.push(encode::error_frame(e.client_ref.as_ref(), &ActorError::BadRequest(e.message))),
            Ok(AgentFrame::Ping { client_ref }) => encode::ping_answer(client_ref.as_ref(), out),
            Ok(AgentFrame::Request(req)) => {
                if !self.agent.connected() {
                    let r = request_ref(&req);
                    if r.is_some() {
                        out.push(encode::error_frame(r.as_ref(), &ActorError::Unavailable {
                            message: "agent state restarting; reconnect",
                            retry_after_ms: 100,
                        }));
                    }
                    self.handle.push(Outbound::Close { code: CLOSE_RESTARTING, reason: "agent state restarting; reconnect" });
                    return;
                }
                self.agent.do_send(FromAgentConn { conn: self.handle.clone(), req, received_at_ms: now_ms() });
            }
        }
    }

    fn on_binary(&mut self, _len: usize, out: &mut Vec<String>) {
        out.push(encode::error_frame(None, &ActorError::BadRequest("agents send no binary frames".to_owned())));
    }

    fn observe(&mut self, _frame: &Outbound) {}

    fn closed(self) {
        self.direct.close();
        self.agent.do_send(AgentConnClosed { conn_id: self.handle.conn_id });
    }

    fn ref_of(text: &str) -> Option<ClientRef> {
        decode::ref_only(text)
    }

    fn take_direct_rest(&self) -> Option<bytes::BytesMut> {
        self.direct.take_rest()
    }
}

fn request_ref(req: &AgentRequest) -> Option<ClientRef> {
    match req {
        AgentRequest::Available { client_ref }
        | AgentRequest::Away { client_ref }
        | AgentRequest::Take { client_ref, .. }
        | AgentRequest::Resume { client_ref, .. } => client_ref.clone(),
        AgentRequest::InSession { cmd, .. } => cmd.client_ref(),
    }
}

//! `/ws`: a customer's (or candidate's) socket.
//!
//! The socket is attached to at most one session at a time. `join` opens a
//! new `SessionActor` on this worker thread; `resume` asks the registry for
//! the session's actor (restoring it from storage if this node does not have
//! it) and attaches. Everything else goes to the attached session.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Addr;
use duet_actors::domain::{ClientRef, EventBody, Mode, SessionId};
use duet_actors::error::{ActorError, RETRY_AFTER_MS};
use duet_actors::outbound::{ConnHandle, Outbound, CLOSE_RESTARTING};
use duet_actors::registry::FindSession;
use duet_actors::session::{AttachCustomer, CustomerCmd, CustomerDetached, FromCustomer, SessionActor};

use super::conn::Role;
use crate::app::AppState;
use crate::protocol::decode::{self, CustomerFrame};
use crate::protocol::encode;

pub struct CustomerRole {
    pub app: Arc<AppState>,
    pub handle: ConnHandle,
    pub ip: std::net::IpAddr,
    session: Option<(SessionId, Addr<SessionActor>)>,
    /// A resume sent to a session that has not accepted it yet; the socket
    /// keeps its current session until it does.
    resuming: Option<(SessionId, Addr<SessionActor>)>,
    /// Send instants of refs in flight, for the relay latency histogram.
    sent: VecDeque<(ClientRef, Instant)>,
    _registration: super::Registration,
}

const SENT_TRACKED: usize = 256;

impl CustomerRole {
    pub fn new(app: Arc<AppState>, handle: ConnHandle, ip: std::net::IpAddr, registration: super::Registration) -> CustomerRole {
        CustomerRole { app, handle, ip, session: None, resuming: None, sent: VecDeque::new(), _registration: registration }
    }

    fn err(out: &mut Vec<String>, r: Option<&ClientRef>, e: ActorError) {
        out.push(encode::error_frame(r, &e));
    }

    fn join(&mut self, frame: CustomerFrame, out: &mut Vec<String>) {
        let CustomerFrame::Join { join, client_ref, .. } = frame else { return };
        let r = client_ref.as_ref();
        if !self.app.config.queue_enabled {
            return Self::err(out, r, ActorError::Unavailable {
                message: "support is temporarily unavailable: queueing is switched off",
                retry_after_ms: 60_000,
            });
        }
        if self.session.as_ref().is_some_and(|(_, a)| a.connected()) {
            return Self::err(out, r, ActorError::Conflict("this connection is already in a session; leave it first"));
        }
        if join.mode == Mode::Ai && self.app.config.providers.llm.is_none() {
            return Self::err(out, r, ActorError::Unavailable {
                message: "AI sessions are unavailable: no language model is configured (DUET_LLM_URL)",
                retry_after_ms: 60_000,
            });
        }
        if let Err(e) = self.app.limits.join(self.ip) {
            return Self::err(out, r, e);
        }
        if self.app.db_down() {
            return Self::err(out, r, ActorError::Unavailable {
                message: "support is temporarily unavailable",
                retry_after_ms: RETRY_AFTER_MS,
            });
        }
        let (id, addr) = SessionActor::open(self.app.deps.clone(), join, self.handle.clone(), client_ref);
        self.session = Some((id, addr));
    }

    async fn resume(&mut self, frame: CustomerFrame, out: &mut Vec<String>) {
        let CustomerFrame::Resume { session_id, resume_token, last_seq, client_ref } = frame else { return };
        let found = tokio::time::timeout(
            Duration::from_secs(5),
            self.app.deps.registry.send(FindSession { id: session_id.clone() }),
        )
        .await;
        let addr = match found {
            Ok(Ok(Some(addr))) => addr,
            Ok(Ok(None)) => return Self::err(out, client_ref.as_ref(), ActorError::NotFound("unknown, expired or ended session")),
            _ => {
                return Self::err(out, client_ref.as_ref(), ActorError::Unavailable {
                    message: "could not reach the session; try again",
                    retry_after_ms: RETRY_AFTER_MS,
                })
            }
        };
        addr.do_send(AttachCustomer { conn: self.handle.clone(), resume_token, last_seq, client_ref });
        self.resuming = Some((session_id, addr));
    }

    fn in_session(&mut self, cmd: CustomerCmd, out: &mut Vec<String>) {
        let r = cmd.client_ref();
        // A client may send right after `resume` without waiting for
        // `resumed` (re-sending what was not acked): those frames go to the
        // session being resumed, whose mailbox holds them behind the attach
        // and its replay, so they are handled in the order sent (and refused
        // there if the resume is).
        match self.resuming.as_ref().or(self.session.as_ref()) {
            Some((_, addr)) if addr.connected() => {
                if let (CustomerCmd::Say { .. }, Some(r)) = (&cmd, &r) {
                    if self.sent.len() == SENT_TRACKED {
                        self.sent.pop_front();
                    }
                    self.sent.push_back((r.clone(), Instant::now()));
                }
                addr.do_send(FromCustomer { conn: self.handle.clone(), cmd });
            }
            Some(_) => {
                // The session's actor died (a bug, caught by the runtime).
                // Storage holds its truth: the client resumes and carries on.
                tracing::error!(conn_id = self.handle.conn_id, "session actor is gone; asking the client to resume");
                self.session = None;
                self.resuming = None;
                if r.is_some() {
                    Self::err(out, r.as_ref(), ActorError::Unavailable { message: "session restarting; resume", retry_after_ms: 100 });
                }
                self.handle.push(Outbound::Close { code: CLOSE_RESTARTING, reason: "session restarting; resume" });
            }
            None => {
                if r.is_some() {
                    Self::err(out, r.as_ref(), ActorError::NotFound("no session on this connection; join or resume first"));
                }
            }
        }
    }
}

impl Role for CustomerRole {
    const NAME: &'static str = "customer";

    fn conn_id(&self) -> u64 {
        self.handle.conn_id
    }

    async fn on_text(&mut self, text: &str, out: &mut Vec<String>) {
        match decode::customer_frame(text) {
            Err(e) => out.push(encode::error_frame(e.client_ref.as_ref(), &ActorError::BadRequest(e.message))),
            Ok(f @ CustomerFrame::Join { .. }) => self.join(f, out),
            // Boxed: the only frame that waits (for the registry), and its
            // future would otherwise make every idle socket's task larger.
            Ok(f @ CustomerFrame::Resume { .. }) => Box::pin(self.resume(f, out)).await,
            Ok(CustomerFrame::InSession(cmd)) => self.in_session(cmd, out),
            Ok(CustomerFrame::Ping { client_ref }) => encode::ping_answer(client_ref.as_ref(), out),
        }
    }

    fn on_binary(&mut self, _len: usize, out: &mut Vec<String>) {
        Self::err(out, None, ActorError::BadRequest("binary frames carry audio, which needs an AI session with voice".to_owned()));
    }

    fn observe(&mut self, frame: &Outbound) {
        match frame {
            Outbound::Detached { session_id } if self.session.as_ref().is_some_and(|(s, _)| s == session_id) => {
                self.session = None;
            }
            // The client may `join` again as soon as it reads `ended`: the
            // socket lets go of the session here, before that frame leaves,
            // not when `Detached` (pushed just after it) comes through.
            Outbound::Event(e)
                if matches!(e.body, EventBody::Ended { .. }) && self.session.as_ref().is_some_and(|(s, _)| *s == e.session_id) =>
            {
                self.session = None;
            }
            Outbound::Resumed { session_id } => {
                if let Some((id, addr)) = self.resuming.take_if(|(s, _)| s == session_id) {
                    if let Some((old, old_addr)) = self.session.take() {
                        if old != id {
                            old_addr.do_send(CustomerDetached { conn_id: self.handle.conn_id });
                        }
                    }
                    self.session = Some((id, addr));
                }
            }
            Outbound::ResumeRefused { session_id } => {
                self.resuming.take_if(|(s, _)| s == session_id);
            }
            Outbound::Ack { client_ref, .. } => {
                if let Some(i) = self.sent.iter().position(|(r, _)| r == client_ref) {
                    if let Some((_, at)) = self.sent.remove(i) {
                        self.app.metrics.relay_seconds.observe(at.elapsed().as_secs_f64());
                    }
                }
            }
            _ => {}
        }
    }

    fn closed(self) {
        if let Some((_, addr)) = self.session {
            addr.do_send(CustomerDetached { conn_id: self.handle.conn_id });
        }
    }

    fn ref_of(text: &str) -> Option<ClientRef> {
        decode::ref_only(text)
    }
}

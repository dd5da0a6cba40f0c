//! `AgentActor`: one per signed-in agent on this node.
//!
//! It outlives the agent's socket by the grace period, so a reconnecting
//! agent keeps the customer it serves. It serves one customer at a time and
//! handles one request at a time (`ctx.wait`), so a `say` sent right after a
//! `take` always finds the session taken.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::oneshot;
use tracing::info;

use crate::domain::{AgentInfo, ClientRef, SessionId, Seq};
use crate::error::ActorError;
use crate::outbound::{ConnHandle, Outbound, CLOSE_RESTARTING, CLOSE_SUPERSEDED};
use crate::registry::{AgentChanged, AgentGone, FindSession, TakeFromQueue};
use crate::session::{AgentCmd, AgentDetached, AgentLost, AgentResume, Assign, AttachAgent, FromAgent, SessionActor};
use crate::settings::Deps;
use crate::views::{AgentStatus, AgentView, Dashboard};

/// How many ended sessions an agent remembers for `not_found` answers.
const ENDED_REMEMBERED: usize = 16;

/// Dashboards to one socket are at least this far apart, the one sent on
/// connect included: PROTOCOL.md allows at most 4 per second, and 10 ms
/// over a quarter second keeps any one-second window, even one closed at
/// both ends, at four.
const DASHBOARD_MIN_GAP: Duration = Duration::from_millis(260);

/// Paces the dashboards of one agent's socket: the newest picture is sent
/// at once when the last one left long enough ago, else once the gap is
/// over (pictures in between are replaced, never queued).
struct DashboardPacer {
    sent_at: tokio::time::Instant,
    pending: Option<Arc<Dashboard>>,
    timer: Option<SpawnHandle>,
}

impl DashboardPacer {
    /// For a socket the registry just sent the whole picture.
    fn new() -> DashboardPacer {
        DashboardPacer { sent_at: tokio::time::Instant::now(), pending: None, timer: None }
    }

    /// Another socket was attached and the registry sent it the picture.
    fn connected(&mut self) {
        self.sent_at = tokio::time::Instant::now();
        self.pending = None;
    }

    /// How long the newest picture must wait; zero: send it now.
    fn wait(&self) -> Duration {
        DASHBOARD_MIN_GAP.saturating_sub(self.sent_at.elapsed())
    }

    fn send(&mut self, conn: &ConnHandle, dashboard: Arc<Dashboard>) {
        conn.push(Outbound::Dashboard(dashboard));
        self.sent_at = tokio::time::Instant::now();
    }
}

/// Whom `take` asks for.
#[derive(Clone, Debug)]
pub enum TakeTarget {
    NextIn(Arc<str>),
    Session(SessionId),
}

/// What an agent's connection forwards to its actor.
#[derive(Debug)]
pub enum AgentRequest {
    Available { client_ref: Option<ClientRef> },
    Away { client_ref: Option<ClientRef> },
    Take { target: TakeTarget, client_ref: Option<ClientRef> },
    InSession { session_id: SessionId, cmd: AgentCmd },
    Resume { session_id: SessionId, last_seq: Seq, client_ref: Option<ClientRef> },
}

pub struct AgentActor {
    deps: Deps,
    info: AgentInfo,
    conn: Option<ConnHandle>,
    away: bool,
    serving: Option<(SessionId, Addr<SessionActor>)>,
    /// The last sessions this agent served that have ended, newest last:
    /// a message for one of them is `not_found` (PROTOCOL.md: after `ended`
    /// messages for the session get `not_found`), not `forbidden`.
    ended: VecDeque<SessionId>,
    grace: Option<SpawnHandle>,
    dashboards: DashboardPacer,
    span: tracing::Span,
}

impl AgentActor {
    pub fn new(deps: Deps, info: AgentInfo, conn: ConnHandle) -> AgentActor {
        let span = tracing::info_span!("agent", agent_id = %info.id, node = %deps.settings.node_id);
        AgentActor {
            deps,
            info,
            conn: Some(conn),
            away: true,
            serving: None,
            ended: VecDeque::new(),
            grace: None,
            dashboards: DashboardPacer::new(),
            span,
        }
    }

    fn status(&self) -> AgentStatus {
        if self.conn.is_none() {
            AgentStatus::Offline
        } else if self.serving.is_some() {
            AgentStatus::Busy
        } else if self.away {
            AgentStatus::Away
        } else {
            AgentStatus::Available
        }
    }

    /// Sends the pending dashboard now, or once the pacing gap is over.
    fn push_dashboard(&mut self, ctx: &mut Context<Self>) {
        let Some(conn) = &self.conn else { return };
        if self.dashboards.pending.is_none() || self.dashboards.timer.is_some() {
            return;
        }
        let wait = self.dashboards.wait();
        if wait.is_zero() {
            if let Some(d) = self.dashboards.pending.take() {
                self.dashboards.send(conn, d);
            }
            return;
        }
        self.dashboards.timer = Some(ctx.run_later(wait, |act, ctx| {
            act.dashboards.timer = None;
            act.push_dashboard(ctx);
        }));
    }

    fn report(&self, ctx: &mut Context<Self>) {
        self.deps.registry.do_send(AgentChanged {
            addr: ctx.address(),
            view: AgentView {
                id: self.info.id.clone(),
                name: self.info.name.clone(),
                status: self.status(),
                session_id: self.serving.as_ref().map(|(s, _)| s.clone()),
                node: self.deps.settings.node_id.clone(),
            },
        });
    }

    fn reply(&self, conn: &ConnHandle, client_ref: Option<ClientRef>, res: Result<(Option<Seq>, Option<SessionId>), ActorError>) {
        let frame = match (res, client_ref) {
            (Ok((seq, session_id)), Some(client_ref)) => Outbound::Ack { client_ref, seq, session_id },
            (Ok(_), None) => return,
            (Err(error), client_ref) => Outbound::Error { client_ref, error },
        };
        conn.push(frame);
    }

    fn take(&mut self, conn: ConnHandle, target: TakeTarget, client_ref: Option<ClientRef>, asked_at_ms: i64, ctx: &mut Context<Self>) {
        if self.serving.is_some() {
            self.reply(&conn, client_ref, Err(ActorError::Conflict("you already serve a customer; end that session first")));
            return;
        }
        let registry = self.deps.registry.clone();
        let me = ctx.address();
        let info = self.info.clone();
        let live = conn.clone();
        let take_ref = client_ref.clone();
        let fut = async move {
            let (sid, session) = registry
                .send(TakeFromQueue { target, asked_at_ms })
                .await
                .map_err(|_| ActorError::Internal)??;
            let seq = session
                .send(Assign { agent: info, agent_addr: me, conn: live, client_ref: take_ref })
                .await
                .map_err(|_| ActorError::NotFound("the session is gone"))??;
            Ok::<_, ActorError>((sid, session, seq))
        };
        ctx.wait(fut.into_actor(self).map(move |res, act, ctx| {
            let _g = act.span.clone().entered();
            match res {
                Ok((sid, session, seq)) => {
                    info!(session_id = %sid, seq, "took a customer");
                    // The session acked the take itself, after the
                    // history and before live events.
                    act.serving = Some((sid.clone(), session));
                    act.report(ctx);
                }
                Err(e) => act.reply(&conn, client_ref, Err(e)),
            }
        }));
    }

    fn resume(&mut self, conn: ConnHandle, session_id: SessionId, last_seq: Seq, client_ref: Option<ClientRef>, ctx: &mut Context<Self>) {
        if let Some((current, _)) = &self.serving {
            if *current != session_id {
                self.reply(&conn, client_ref, Err(ActorError::Forbidden("you serve another session")));
                return;
            }
        }
        let registry = self.deps.registry.clone();
        let me = ctx.address();
        let agent_id = self.info.id.clone();
        let sid = session_id.clone();
        let replay_conn = conn.clone();
        let cref = client_ref.clone();
        let fut = async move {
            let session = registry
                .send(FindSession { id: sid })
                .await
                .map_err(|_| ActorError::Internal)?
                .ok_or(ActorError::NotFound("no such session, or it has ended"))?;
            let (done, answer) = oneshot::channel();
            session.do_send(AttachAgent { agent_id, agent_addr: me, conn: replay_conn, last_seq, client_ref: cref, done });
            match answer.await.map_err(|_| ActorError::NotFound("the session is gone"))? {
                AgentResume::Attached => Ok(Some(session)),
                AgentResume::Refused(e) => Err(e),
                // Answered already (ack, then an error without a ref).
                AgentResume::ReplayFailed => Ok(None),
            }
        };
        ctx.wait(fut.into_actor(self).map(move |res, act, ctx| match res {
            Ok(Some(session)) => {
                act.serving = Some((session_id, session));
                act.cancel_grace(ctx);
                act.report(ctx);
            }
            Ok(None) => {}
            Err(e) => act.reply(&conn, client_ref, Err(e)),
        }));
    }

    /// Starts the grace period of a lost connection, unless one runs: a
    /// serving agent's deadline is kept across a reconnect until it resumes
    /// the session (a reconnect alone delivers nothing to it).
    fn start_grace(&mut self, ctx: &mut Context<Self>) {
        if self.grace.is_some() {
            return;
        }
        self.grace = Some(ctx.run_later(self.deps.settings.agent_grace, |act, ctx| {
            let _g = act.span.clone().entered();
            act.grace = None;
            if let Some((session_id, session)) = act.serving.take() {
                info!(session_id = %session_id, "agent did not resume its session within the grace period");
                session.do_send(AgentLost { agent_id: act.info.id.clone() });
            }
            if act.conn.is_none() {
                info!("agent did not come back within the grace period");
                ctx.stop();
            } else {
                act.report(ctx);
            }
        }));
    }

    fn cancel_grace(&mut self, ctx: &mut Context<Self>) {
        if let Some(h) = self.grace.take() {
            ctx.cancel_future(h);
        }
    }
}

impl Actor for AgentActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.report(ctx);
    }

    fn stopped(&mut self, ctx: &mut Context<Self>) {
        self.deps.registry.do_send(AgentGone { id: self.info.id.clone(), addr: ctx.address() });
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct FromAgentConn {
    pub conn: ConnHandle,
    pub req: AgentRequest,
    /// When the socket read the frame (ms, wall clock): a `take` that finds
    /// the queue empty lost a race only if it was asked before the last take.
    pub received_at_ms: i64,
}

impl Handler<FromAgentConn> for AgentActor {
    type Result = ();

    fn handle(&mut self, msg: FromAgentConn, ctx: &mut Context<Self>) {
        let _g = self.span.clone().entered();
        let FromAgentConn { conn, req, received_at_ms } = msg;
        if !self.conn.as_ref().is_some_and(|c| c.same(&conn)) {
            // A superseded connection's late frames carry no authority.
            return;
        }
        match req {
            AgentRequest::Available { client_ref } => {
                self.away = false;
                self.reply(&conn, client_ref, Ok((None, None)));
                self.report(ctx);
            }
            AgentRequest::Away { client_ref } => {
                self.away = true;
                self.reply(&conn, client_ref, Ok((None, None)));
                self.report(ctx);
            }
            AgentRequest::Take { target, client_ref } => self.take(conn, target, client_ref, received_at_ms, ctx),
            AgentRequest::Resume { session_id, last_seq, client_ref } => {
                self.resume(conn, session_id, last_seq, client_ref, ctx)
            }
            AgentRequest::InSession { session_id, cmd } => match &self.serving {
                Some((sid, session)) if *sid == session_id => {
                    if session.connected() {
                        session.do_send(FromAgent { agent_id: self.info.id.clone(), conn, cmd });
                    } else {
                        // The session's actor died (a bug the runtime caught);
                        // storage holds it, and a resume restores it.
                        if let Some(client_ref) = cmd.client_ref() {
                            self.reply(&conn, Some(client_ref), Err(ActorError::Unavailable { message: "session restarting; resume", retry_after_ms: 100 }));
                        }
                        conn.push(Outbound::Close { code: CLOSE_RESTARTING, reason: "session restarting; resume" });
                    }
                }
                _ => {
                    let client_ref = cmd.client_ref();
                    if client_ref.is_some() {
                        let error = if self.ended.contains(&session_id) {
                            ActorError::NotFound("the session has ended")
                        } else {
                            ActorError::Forbidden("you do not serve this session")
                        };
                        self.reply(&conn, client_ref, Err(error));
                    }
                }
            },
        }
    }
}

/// A (new) socket of this agent.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachAgentConn {
    pub conn: ConnHandle,
}

impl Handler<AttachAgentConn> for AgentActor {
    type Result = ();

    fn handle(&mut self, msg: AttachAgentConn, ctx: &mut Context<Self>) {
        if self.serving.is_none() {
            self.cancel_grace(ctx);
        }
        if let Some(old) = self.conn.replace(msg.conn) {
            old.push(Outbound::Close { code: CLOSE_SUPERSEDED, reason: "signed in on another connection" });
        }
        self.dashboards.connected();
        if let Some((_, session)) = &self.serving {
            // Live events resume once the agent sends `resume`, which it
            // must within the grace period (kept from a lost connection, or
            // started now for one that is replaced).
            session.do_send(AgentDetached { agent_id: self.info.id.clone() });
            self.start_grace(ctx);
        }
        self.report(ctx);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct AgentConnClosed {
    pub conn_id: u64,
}

impl Handler<AgentConnClosed> for AgentActor {
    type Result = ();

    fn handle(&mut self, msg: AgentConnClosed, ctx: &mut Context<Self>) {
        if self.conn.as_ref().is_none_or(|c| c.conn_id != msg.conn_id) {
            return;
        }
        self.conn = None;
        if let Some((_, session)) = &self.serving {
            session.do_send(AgentDetached { agent_id: self.info.id.clone() });
        }
        self.start_grace(ctx);
        self.report(ctx);
    }
}

/// The session this agent served has ended.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ServedSessionEnded {
    pub session_id: SessionId,
}

impl Handler<ServedSessionEnded> for AgentActor {
    type Result = ();

    fn handle(&mut self, msg: ServedSessionEnded, ctx: &mut Context<Self>) {
        if self.serving.as_ref().is_some_and(|(s, _)| *s == msg.session_id) {
            self.serving = None;
            self.report(ctx);
        }
        if !self.ended.contains(&msg.session_id) {
            if self.ended.len() == ENDED_REMEMBERED {
                self.ended.pop_front();
            }
            self.ended.push_back(msg.session_id);
        }
    }
}

/// The current dashboard, for this agent's socket.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PushDashboard(pub Arc<Dashboard>);

impl Handler<PushDashboard> for AgentActor {
    type Result = ();

    fn handle(&mut self, msg: PushDashboard, ctx: &mut Context<Self>) {
        self.dashboards.pending = Some(msg.0);
        self.push_dashboard(ctx);
    }
}

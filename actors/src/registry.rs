//! `RegistryActor`: one per node; knows every session and agent actor of it.
//!
//! It finds (or brings back from storage) the actor of a session, hands
//! customers from the queue to agents, recovers open sessions at start, and
//! pushes queue positions and the dashboard, coalesced to at most one push
//! per `push_interval` (the protocol allows 4 per second). It keeps no state
//! that storage or the queue do not also hold: a restarted node rebuilds it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::agent::{AgentActor, AttachAgentConn, PushDashboard, TakeTarget};
use crate::domain::{now_ms, AgentId, AgentInfo, SessionId};
use crate::eta::EtaModel;
use crate::error::ActorError;
use crate::outbound::{ConnHandle, Outbound};
use crate::ports::{QueueStore, SessionSnapshot, SessionStatus, TakeNext, TakeOutcome, TopicQueue};
use crate::session::{HasEnded, QueuePosition, SessionActor};
use crate::settings::{Deps, Settings};
use crate::views::{AgentStatus, AgentView, Dashboard, NodeView, QueueView, SessionView, WaitingView};

/// The dashboard lists at most this many waiting customers per topic (the
/// counts stay exact); a long queue must not make every push megabytes.
pub const DASHBOARD_WAITING_CAP: usize = 200;

struct SessionEntry {
    addr: Addr<SessionActor>,
    topic: Arc<str>,
    view: Option<SessionView>,
}

struct AgentEntry {
    addr: Addr<AgentActor>,
    view: AgentView,
}

/// A node's figures, read at scrape time by `/metrics`.
#[derive(Clone, Debug, Default)]
pub struct NodeStats {
    pub live_sessions: usize,
    pub served_sessions: usize,
    pub agents: usize,
    pub agents_available: usize,
    /// (topic, waiting, longest wait in seconds)
    pub queues: Vec<(Arc<str>, usize, u64)>,
}

pub struct RegistryActor {
    store: Arc<dyn crate::ports::EventStore>,
    queue: Arc<dyn QueueStore>,
    settings: Arc<Settings>,
    sessions: HashMap<SessionId, SessionEntry>,
    agents: HashMap<AgentId, AgentEntry>,
    restoring: HashMap<SessionId, Vec<oneshot::Sender<Option<Addr<SessionActor>>>>>,
    dirty_topics: HashSet<Arc<str>>,
    dashboard_dirty: bool,
    /// The estimated waits, shared with every session through [`Deps`].
    eta: Arc<EtaModel>,
    last_queues: Vec<TopicQueue>,
    dashboard: Arc<Dashboard>,
    pushing: bool,
    /// Built once the actor has its address; handed to every actor it starts.
    deps: Option<Deps>,
}

impl RegistryActor {
    pub fn new(store: Arc<dyn crate::ports::EventStore>, queue: Arc<dyn QueueStore>, settings: Arc<Settings>) -> RegistryActor {
        RegistryActor {
            eta: Arc::new(EtaModel::new(settings.initial_handle_time)),
            store,
            queue,
            settings,
            sessions: HashMap::new(),
            agents: HashMap::new(),
            restoring: HashMap::new(),
            dirty_topics: HashSet::new(),
            dashboard_dirty: true,
            last_queues: Vec::new(),
            dashboard: Arc::new(Dashboard::default()),
            pushing: false,
            deps: None,
        }
    }

    fn deps(&mut self, ctx: &Context<Self>) -> Deps {
        let (store, queue, settings, eta) = (&self.store, &self.queue, &self.settings, &self.eta);
        self.deps
            .get_or_insert_with(|| Deps::new(store.clone(), queue.clone(), ctx.address(), settings.clone(), eta.clone()))
            .clone()
    }

    /// Counts the agents taking customers for the estimate; when that
    /// changed, every waiting customer's `eta_s` moved and is pushed again.
    fn agents_changed(&mut self) {
        self.dashboard_dirty = true;
        let taking = self
            .agents
            .values()
            .filter(|a| matches!(a.view.status, AgentStatus::Available | AgentStatus::Busy))
            .count();
        if self.eta.set_agents(taking) {
            self.dirty_topics.extend(self.last_queues.iter().map(|q| q.topic.clone()));
        }
    }

    /// A live session's actor, or the one brought back from storage.
    fn find(&mut self, id: SessionId, ctx: &mut Context<Self>) -> oneshot::Receiver<Option<Addr<SessionActor>>> {
        let (tx, rx) = oneshot::channel();
        if let Some(e) = self.sessions.get(&id) {
            if e.addr.connected() {
                let _ = tx.send(Some(e.addr.clone()));
                return rx;
            }
            // It crashed: storage holds the truth, bring it back.
            warn!(session_id = %id, "session actor died; restoring it from storage");
            self.sessions.remove(&id);
        }
        if let Some(waiters) = self.restoring.get_mut(&id) {
            waiters.push(tx);
            return rx;
        }
        self.restoring.insert(id.clone(), vec![tx]);
        let store = self.store.clone();
        let sid = id.clone();
        let fut = async move { store.load_session(&sid).await };
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            let addr = match res {
                Ok(Some(snap)) => {
                    // A session registered meanwhile (a join cannot, but be sure).
                    match act.sessions.get(&id).filter(|e| e.addr.connected()) {
                        Some(e) => Some(e.addr.clone()),
                        None => {
                            let topic = snap.record.topic.clone();
                            let restored = SessionActor::restore(act.deps(ctx), snap);
                            if let Some(a) = &restored {
                                act.sessions.insert(id.clone(), SessionEntry { addr: a.clone(), topic, view: None });
                            }
                            restored
                        }
                    }
                }
                Ok(None) => None,
                Err(e) => {
                    warn!(session_id = %id, error = %e, "could not load session");
                    None
                }
            };
            for w in act.restoring.remove(&id).unwrap_or_default() {
                let _ = w.send(addr.clone());
            }
        }));
        rx
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        if self.pushing || (self.dirty_topics.is_empty() && !self.dashboard_dirty) {
            return;
        }
        self.pushing = true;
        let dirty: Vec<Arc<str>> = self.dirty_topics.drain().collect();
        let queue = self.queue.clone();
        ctx.spawn(async move { queue.snapshot().await }.into_actor(self).map(move |res, act, _ctx| {
            act.pushing = false;
            let queues = match res {
                Ok(q) => q,
                Err(e) => {
                    warn!(error = %e, "queue snapshot failed");
                    act.dirty_topics.extend(dirty);
                    return;
                }
            };
            for tq in queues.iter().filter(|q| dirty.contains(&q.topic)) {
                let waiting = tq.waiting.len();
                for (i, e) in tq.waiting.iter().enumerate() {
                    if let Some(s) = act.sessions.get(&e.session_id) {
                        s.addr.do_send(QueuePosition { position: i + 1, waiting, eta_s: act.eta.eta_s(&tq.topic, i + 1) });
                    }
                }
            }
            act.last_queues = queues;
            act.dashboard = Arc::new(act.build_dashboard());
            act.dashboard_dirty = false;
            for a in act.agents.values() {
                a.addr.do_send(PushDashboard(act.dashboard.clone()));
            }
        }));
    }

    fn build_dashboard(&self) -> Dashboard {
        let now = now_ms();
        let since = |q: i64| if q < 0 { -q } else { q };
        let queues = self
            .last_queues
            .iter()
            .filter(|q| !q.waiting.is_empty())
            .map(|q| {
                let longest = q.waiting.iter().map(|e| (now - since(e.queued_at_ms)).max(0) / 1000).max().unwrap_or(0) as u64;
                QueueView {
                    topic: q.topic.clone(),
                    eta_s: self.eta.eta_s(&q.topic, q.waiting.len() + 1),
                    longest_wait_s: longest,
                    waiting: q
                        .waiting
                        .iter()
                        .take(DASHBOARD_WAITING_CAP)
                        .enumerate()
                        .map(|(i, e)| WaitingView {
                            session_id: e.session_id.clone(),
                            name: e.name.clone(),
                            waiting_s: ((now - since(e.queued_at_ms)).max(0) / 1000) as u64,
                            position: i + 1,
                        })
                        .collect(),
                }
            })
            .collect();
        let mut sessions: Vec<SessionView> = self.sessions.values().filter_map(|s| s.view.clone()).collect();
        sessions.sort_by_key(|s| s.started_at_ms);
        let mut agents: Vec<AgentView> = self.agents.values().map(|a| a.view.clone()).collect();
        agents.sort_by(|a, b| a.id.cmp(&b.id));
        mark_serving_agents_busy(&sessions, &mut agents);
        Dashboard {
            queues,
            sessions,
            agents,
            nodes: vec![NodeView { id: self.settings.node_id.clone(), sessions: self.sessions.len(), last_seen_s: 0 }],
        }
    }
}

/// A session reports its agent before the agent reports itself busy (its
/// report comes one hop later): the sessions are the truth, so one snapshot
/// never shows an agent available (or away) while it serves. An offline
/// agent stays offline: serving does not bring its socket back. `agents`
/// is sorted by id.
fn mark_serving_agents_busy(sessions: &[SessionView], agents: &mut [AgentView]) {
    for s in sessions {
        let Some(id) = &s.agent_id else { continue };
        let Ok(i) = agents.binary_search_by(|a| a.id.cmp(id)) else { continue };
        let a = &mut agents[i];
        if a.status != AgentStatus::Offline {
            a.status = AgentStatus::Busy;
            a.session_id = Some(s.session_id.clone());
        }
    }
}

impl Actor for RegistryActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(usize::MAX >> 1);
        ctx.run_interval(self.settings.push_interval, |act, ctx| act.tick(ctx));
    }
}

// ---- messages --------------------------------------------------------------

#[derive(Message)]
#[rtype(result = "()")]
pub struct RegisterSession {
    pub id: SessionId,
    pub topic: Arc<str>,
    pub addr: Addr<SessionActor>,
    pub view: Option<SessionView>,
}

impl Handler<RegisterSession> for RegistryActor {
    type Result = ();

    fn handle(&mut self, msg: RegisterSession, _ctx: &mut Context<Self>) {
        self.sessions.insert(msg.id, SessionEntry { addr: msg.addr, topic: msg.topic, view: msg.view });
        self.dashboard_dirty = true;
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct SessionGone {
    pub id: SessionId,
    pub addr: Addr<SessionActor>,
}

impl Handler<SessionGone> for RegistryActor {
    type Result = ();

    fn handle(&mut self, msg: SessionGone, _ctx: &mut Context<Self>) {
        if self.sessions.get(&msg.id).is_some_and(|e| e.addr == msg.addr) {
            self.sessions.remove(&msg.id);
            self.dashboard_dirty = true;
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct SessionFinished {
    pub id: SessionId,
    pub topic: Arc<str>,
    /// From assignment to end; `None` when nobody served it.
    pub handle_ms: Option<i64>,
}

impl Handler<SessionFinished> for RegistryActor {
    type Result = ();

    fn handle(&mut self, msg: SessionFinished, _ctx: &mut Context<Self>) {
        if let Some(ms) = msg.handle_ms {
            self.eta.handled(&msg.topic, ms);
        }
        if let Some(e) = self.sessions.get_mut(&msg.id) {
            e.view = None;
        }
        self.dirty_topics.insert(msg.topic);
        self.dashboard_dirty = true;
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct TopicChanged {
    pub topic: Arc<str>,
}

impl Handler<TopicChanged> for RegistryActor {
    type Result = ();

    fn handle(&mut self, msg: TopicChanged, _ctx: &mut Context<Self>) {
        self.dirty_topics.insert(msg.topic);
        self.dashboard_dirty = true;
    }
}

/// An agent's socket opened; answers the agent's actor (new or kept from
/// before a reconnect).
#[derive(Message)]
#[rtype(result = "Addr<AgentActor>")]
pub struct AgentConnect {
    pub info: AgentInfo,
    pub conn: ConnHandle,
}

impl Handler<AgentConnect> for RegistryActor {
    type Result = Addr<AgentActor>;

    fn handle(&mut self, msg: AgentConnect, ctx: &mut Context<Self>) -> Addr<AgentActor> {
        self.dashboard_dirty = true;
        let conn = msg.conn.clone();
        let addr = match self.agents.get(&msg.info.id).filter(|a| a.addr.connected()) {
            Some(a) => {
                a.addr.do_send(AttachAgentConn { conn: msg.conn });
                a.addr.clone()
            }
            None => {
                let view = AgentView {
                    id: msg.info.id.clone(),
                    name: msg.info.name.clone(),
                    status: AgentStatus::Away,
                    session_id: None,
                    node: self.settings.node_id.clone(),
                };
                let addr = AgentActor::new(self.deps(ctx), msg.info, msg.conn).start();
                self.agents.insert(view.id.clone(), AgentEntry { addr: addr.clone(), view });
                addr
            }
        };
        // The whole picture at once, this agent included (the cached one may
        // predate the first push).
        self.dashboard = Arc::new(self.build_dashboard());
        conn.push(Outbound::Dashboard(self.dashboard.clone()));
        addr
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct AgentChanged {
    pub addr: Addr<AgentActor>,
    pub view: AgentView,
}

impl Handler<AgentChanged> for RegistryActor {
    type Result = ();

    fn handle(&mut self, msg: AgentChanged, _ctx: &mut Context<Self>) {
        self.agents.insert(msg.view.id.clone(), AgentEntry { addr: msg.addr, view: msg.view });
        self.agents_changed();
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct AgentGone {
    pub id: AgentId,
    pub addr: Addr<AgentActor>,
}

impl Handler<AgentGone> for RegistryActor {
    type Result = ();

    fn handle(&mut self, msg: AgentGone, _ctx: &mut Context<Self>) {
        if self.agents.get(&msg.id).is_some_and(|a| a.addr == msg.addr) {
            self.agents.remove(&msg.id);
            self.agents_changed();
        }
    }
}

/// The answer to taking a session that has ended.
const TAKE_ENDED: ActorError = ActorError::NotFound("that session has ended");

fn has_ended(s: &SessionSnapshot) -> bool {
    matches!(s.status, SessionStatus::Ended { .. })
}

/// Takes a customer out of the queue for an agent. Exactly one taker wins a
/// given customer; the queue store's atomic take decides.
#[derive(Message)]
#[rtype(result = "Result<(SessionId, Addr<SessionActor>), ActorError>")]
pub struct TakeFromQueue {
    pub target: TakeTarget,
    /// When the agent asked (ms, wall clock): a race lost or an empty queue.
    pub asked_at_ms: i64,
}

impl Handler<TakeFromQueue> for RegistryActor {
    type Result = ResponseActFuture<Self, Result<(SessionId, Addr<SessionActor>), ActorError>>;

    fn handle(&mut self, msg: TakeFromQueue, _ctx: &mut Context<Self>) -> Self::Result {
        let queue = self.queue.clone();
        let store = self.store.clone();
        let (known_topic, live) = match &msg.target {
            TakeTarget::Session(id) => match self.sessions.get(id) {
                Some(e) => (Some(e.topic.clone()), Some(e.addr.clone())),
                None => (None, None),
            },
            TakeTarget::NextIn(_) => (None, None),
        };
        let fut = async move {
            match msg.target {
                TakeTarget::NextIn(topic) => match queue.take_next(&topic, msg.asked_at_ms).await? {
                    TakeNext::Taken(e) => Ok(Ok(e.session_id)),
                    TakeNext::JustTaken => Ok(Err(ActorError::Conflict("another agent has taken the last customer waiting"))),
                    TakeNext::Empty => Ok(Err(ActorError::NotFound("nobody is waiting in that topic"))),
                },
                TakeTarget::Session(id) => {
                    let topic = match known_topic {
                        Some(t) => t,
                        None => match store.load_session(&id).await? {
                            Some(s) if has_ended(&s) => return Ok(Err(TAKE_ENDED)),
                            Some(s) => s.record.topic,
                            None => return Ok(Err(ActorError::NotFound("no such session"))),
                        },
                    };
                    match queue.take(&topic, &id).await? {
                        TakeOutcome::Taken(e) => Ok(Ok(e.session_id)),
                        // Not waiting: taken by another agent, unless it
                        // ended (it lingers in the registry a while).
                        // Its live actor knows best: a `leave` it handled
                        // has taken the customer out of the queue before
                        // `ended` is stored.
                        TakeOutcome::NotWaiting => {
                            let ended = match live.filter(|a| a.connected()) {
                                Some(addr) => addr.send(HasEnded).await.unwrap_or(false),
                                None => false,
                            };
                            if ended {
                                return Ok(Err(TAKE_ENDED));
                            }
                            match store.load_session(&id).await? {
                                Some(s) if has_ended(&s) => Ok(Err(TAKE_ENDED)),
                                _ => Ok(Err(ActorError::Conflict("another agent has taken this customer"))),
                            }
                        }
                    }
                }
            }
        };
        Box::pin(fut.into_actor(self).then(|res: Result<Result<SessionId, ActorError>, crate::error::StoreError>, act, ctx| {
            let found = match res {
                Ok(Ok(id)) => Ok((id.clone(), act.find(id, ctx))),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(ActorError::from(e)),
            };
            async move {
                let (id, rx) = found?;
                match rx.await {
                    Ok(Some(addr)) => Ok((id, addr)),
                    _ => Err(ActorError::NotFound("the session is gone")),
                }
            }
            .into_actor(act)
            .map(|res, act, _| {
                act.dashboard_dirty = true;
                if let Ok((id, _)) = &res {
                    if let Some(t) = act.sessions.get(id).map(|e| e.topic.clone()) {
                        act.dirty_topics.insert(t);
                    }
                }
                // Any topic may have moved; be safe and refresh all.
                for q in &act.last_queues {
                    act.dirty_topics.insert(q.topic.clone());
                }
                res
            })
        }))
    }
}

/// The ports and settings every actor of this node shares, for the code
/// that starts sessions and agents (the upgrade routes).
#[derive(Message)]
#[rtype(result = "Deps")]
pub struct NodeDeps;

impl Handler<NodeDeps> for RegistryActor {
    type Result = MessageResult<NodeDeps>;

    fn handle(&mut self, _: NodeDeps, ctx: &mut Context<Self>) -> MessageResult<NodeDeps> {
        MessageResult(self.deps(ctx))
    }
}

/// The actor of a session (live, or restored from storage); `None` when the
/// session does not exist or has ended.
#[derive(Message)]
#[rtype(result = "Option<Addr<SessionActor>>")]
pub struct FindSession {
    pub id: SessionId,
}

impl Handler<FindSession> for RegistryActor {
    type Result = ResponseFuture<Option<Addr<SessionActor>>>;

    fn handle(&mut self, msg: FindSession, ctx: &mut Context<Self>) -> Self::Result {
        let rx = self.find(msg.id, ctx);
        Box::pin(async move { rx.await.ok().flatten() })
    }
}

#[derive(Message)]
#[rtype(result = "Arc<Dashboard>")]
pub struct GetDashboard;

impl Handler<GetDashboard> for RegistryActor {
    type Result = ResponseActFuture<Self, Arc<Dashboard>>;

    fn handle(&mut self, _: GetDashboard, _ctx: &mut Context<Self>) -> Self::Result {
        let queue = self.queue.clone();
        Box::pin(async move { queue.snapshot().await }.into_actor(self).map(|res, act, _| {
            if let Ok(q) = res {
                act.last_queues = q;
            }
            act.dashboard = Arc::new(act.build_dashboard());
            act.dashboard.clone()
        }))
    }
}

#[derive(Message)]
#[rtype(result = "NodeStats")]
pub struct GetStats;

impl Handler<GetStats> for RegistryActor {
    type Result = MessageResult<GetStats>;

    fn handle(&mut self, _: GetStats, _ctx: &mut Context<Self>) -> Self::Result {
        let now = now_ms();
        MessageResult(NodeStats {
            live_sessions: self.sessions.len(),
            served_sessions: self.sessions.values().filter(|s| s.view.is_some()).count(),
            agents: self.agents.len(),
            agents_available: self.agents.values().filter(|a| a.view.status == AgentStatus::Available).count(),
            queues: self
                .last_queues
                .iter()
                .map(|q| {
                    let longest = q
                        .waiting
                        .iter()
                        .map(|e| (now - e.queued_at_ms.abs()).max(0) / 1000)
                        .max()
                        .unwrap_or(0) as u64;
                    (q.topic.clone(), q.waiting.len(), longest)
                })
                .collect(),
        })
    }
}

/// At start: every open session from storage is brought back, and the
/// waiting ones re-enter their queues in their old order.
#[derive(Message)]
#[rtype(result = "Result<usize, ActorError>")]
pub struct Recover;

impl Handler<Recover> for RegistryActor {
    type Result = ResponseActFuture<Self, Result<usize, ActorError>>;

    fn handle(&mut self, _: Recover, _ctx: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        let queue = self.queue.clone();
        let fut = async move {
            let mut open = store.open_sessions().await?;
            open.sort_by_key(|s| match s.status {
                SessionStatus::Waiting { queued_at_ms } => queued_at_ms,
                _ => i64::MAX,
            });
            for s in &open {
                if let SessionStatus::Waiting { queued_at_ms } = s.status {
                    queue
                        .push_back(crate::ports::QueueEntry {
                            session_id: s.record.id.clone(),
                            topic: s.record.topic.clone(),
                            name: s.record.customer_name.clone(),
                            queued_at_ms,
                        })
                        .await?;
                }
            }
            Ok::<_, crate::error::StoreError>(open)
        };
        Box::pin(fut.into_actor(self).map(|res, act, ctx| {
            let open = res?;
            let n = open.len();
            for snap in open {
                let id = snap.record.id.clone();
                let topic = snap.record.topic.clone();
                if let Some(addr) = SessionActor::restore(act.deps(ctx), snap) {
                    act.sessions.insert(id, SessionEntry { addr, topic: topic.clone(), view: None });
                    act.dirty_topics.insert(topic);
                }
            }
            if n > 0 {
                info!(sessions = n, "recovered open sessions from storage");
            }
            Ok(n)
        }))
    }
}

/// Ports and settings for actors started outside the registry (a session
/// opened by a customer's connection).
#[derive(Message)]
#[rtype(result = "Deps")]
pub struct GetDeps;

impl Handler<GetDeps> for RegistryActor {
    type Result = MessageResult<GetDeps>;

    fn handle(&mut self, _: GetDeps, ctx: &mut Context<Self>) -> Self::Result {
        MessageResult(self.deps(ctx))
    }
}

#[cfg(test)]
mod dashboard_tests {
    use super::*;

    fn agent(id: &str, status: AgentStatus) -> AgentView {
        AgentView { id: Arc::from(id), name: Arc::from(id), status, session_id: None, node: Arc::from("n") }
    }

    #[test]
    fn an_agent_whose_session_is_reported_first_is_shown_busy() {
        let session = SessionView {
            session_id: Arc::from("s1"),
            customer: Arc::from("Guest"),
            agent: Some(Arc::from("a")),
            agent_id: Some(Arc::from("a")),
            topic: Arc::from("support"),
            mode: crate::domain::Mode::Human,
            started_at_ms: 0,
            node: Arc::from("n"),
            stats: None,
        };
        let mut gone = session.clone();
        (gone.session_id, gone.agent_id) = (Arc::from("s2"), Some(Arc::from("c")));
        let mut agents = vec![agent("a", AgentStatus::Available), agent("b", AgentStatus::Available), agent("c", AgentStatus::Offline)];
        mark_serving_agents_busy(&[session, gone], &mut agents);
        assert_eq!((agents[0].status, agents[0].session_id.as_deref()), (AgentStatus::Busy, Some("s1")));
        assert_eq!((agents[1].status, agents[1].session_id.as_deref()), (AgentStatus::Available, None));
        assert_eq!(agents[2].status, AgentStatus::Offline);
    }
}

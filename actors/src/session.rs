//! `SessionActor`: the single owner and sequencer of one session.
//!
//! Every event of a session is numbered here and nowhere else, so `seq` has
//! no gaps: the actor allocates the next number, hands the event to the
//! [`EventStore`](crate::ports::EventStore), and only after the commit does it
//! relay the event and ack the client. At most one batch per session is in
//! flight; what arrives meanwhile waits in `pending` and goes in the next
//! batch (the store groups batches of many sessions into one commit). If a
//! batch fails, its numbers are given back and every client waiting on it or
//! after it gets `unavailable` — nothing acked is lost, and nothing unacked is
//! stored.
//!
//! The actor outlives connections: the customer's and the agent's sockets
//! attach and detach, and a resume replays from storage what the socket
//! missed. It stops once the session ended (after a short linger) or when it
//! is restored on another node.

use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::agent::{AgentActor, ServedSessionEnded};
use crate::domain::{
    now_ms, secret_matches, AgentId, AgentInfo, CallStats, ClientRef, EndReason, Event, EventBody,
    Mode, OpaqueJson, Party, ResumeToken, RtcKind, SessionId, Seq,
};
use crate::error::ActorError;
use crate::outbound::{ConnHandle, Outbound, CLOSE_RESTARTING, CLOSE_SUPERSEDED};
use crate::ports::{
    AppendBatch, NewEvent, QueueEntry, SessionChange, SessionRecord, SessionSnapshot, SessionStatus,
};
use crate::registry::{RegisterSession, SessionFinished, SessionGone, TopicChanged};
use crate::settings::Deps;
use crate::views::SessionView;

/// What a customer asks for in `join`.
#[derive(Clone, Debug)]
pub struct JoinRequest {
    pub name: Arc<str>,
    pub topic: Arc<str>,
    pub mode: Mode,
}

/// Where the conversation stands.
#[derive(Clone, Debug, PartialEq)]
enum Phase {
    Waiting { queued_at_ms: i64 },
    Active { agent: AgentInfo },
    Ended,
}

/// Who gets told when an event is committed.
enum Reply {
    /// Ack `client_ref` on this connection (with the session id when asked).
    Ack { conn: ConnHandle, client_ref: ClientRef, with_session: bool },
    /// Answer an actor that waits for the seq (take → assigned).
    Seq(oneshot::Sender<Result<Seq, ActorError>>),
}

/// What else to do once an event is committed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AfterCommit {
    Nothing,
    EnterQueue,
    ReturnToQueueHead,
    Finish,
    /// `assigned`: the taking agent gets the log so far, then its answer.
    ShowHistory,
}

struct Pending {
    event: Arc<Event>,
    key: Option<Arc<str>>,
    change: Option<SessionChange>,
    replies: Vec<Reply>,
    after: AfterCommit,
    /// The phase before this event changed it, restored if it is not stored.
    revert: Option<Phase>,
}

/// The agent side of a conversation.
struct AgentLink {
    info: AgentInfo,
    addr: Option<Addr<AgentActor>>,
    /// Live events go here once the agent took or resumed the session.
    conn: Option<ConnHandle>,
    /// The socket (and `ref`) of a `take` in flight: once `assigned` is
    /// stored it gets the session so far (what the customer wrote while
    /// waiting, what an earlier agent said), then the take's ack, then
    /// live events.
    taking: Option<(ConnHandle, Option<ClientRef>)>,
}

pub struct SessionActor {
    deps: Deps,
    record: SessionRecord,
    phase: Phase,
    /// Highest seq handed out (committed or in flight).
    last_allocated: Seq,
    /// Highest seq known to be stored.
    last_committed: Seq,
    /// Idempotency keys (`customer:<ref>`, `agent:<id>:<ref>`) → their seq.
    keys: HashMap<Arc<str>, Seq>,
    pending: Vec<Pending>,
    in_flight: Vec<Pending>,
    customer: Option<ConnHandle>,
    /// Boxed, like the other fields a waiting customer does not use: this
    /// struct is part of what each of ten thousand idle sessions costs.
    agent: Option<Box<AgentLink>>,
    /// Set only on the actor that created the session: the token goes into
    /// the live `session` event and nowhere else.
    fresh_token: Option<ResumeToken>,
    customer_timer: Option<SpawnHandle>,
    agent_timer: Option<SpawnHandle>,
    last_queue: Option<(usize, usize, u64)>,
    /// A batch failed: until storage is read again, this actor does not know
    /// whether that batch was stored (a connection lost during COMMIT), so
    /// it numbers nothing new.
    stale: bool,
    resyncing: bool,
    /// The customer's connection refused a frame (closed or too slow); the
    /// grace period starts once the current batch is delivered.
    customer_lost: bool,
    /// Set by a handler that changes the phase just before it appends the
    /// event that records the change.
    phase_before: Option<Box<Phase>>,
    stats: Option<Box<CallStats>>,
    started_at_ms: i64,
    span: tracing::Span,
}

impl SessionActor {
    /// Starts a brand-new session for `conn` on the current arbiter. The
    /// client gets `session`, `queue` and the join ack once seq 1 is stored.
    pub fn open(deps: Deps, join: JoinRequest, conn: ConnHandle, join_ref: Option<ClientRef>) -> (SessionId, Addr<SessionActor>) {
        let token = ResumeToken::generate();
        let now = now_ms();
        let record = SessionRecord {
            id: crate::domain::new_session_id(),
            topic: join.topic,
            mode: join.mode,
            customer_name: join.name,
            resume_token_hash: Arc::from(token.hash()),
            created_at_ms: now,
        };
        let mut actor = SessionActor::new(deps, record, Phase::Waiting { queued_at_ms: now }, 0, Vec::new());
        actor.customer = Some(conn.clone());
        actor.fresh_token = Some(token);
        let id = actor.record.id.clone();
        let addr = SessionActor::create(move |ctx| {
            let body = EventBody::Session {
                resume_token: actor.fresh_token.as_ref().map(|t| t.0.clone()),
                topic: actor.record.topic.clone(),
                mode: actor.record.mode,
            };
            let change = SessionChange::Create(actor.record.clone(), SessionStatus::Waiting { queued_at_ms: now });
            let replies = match join_ref {
                Some(r) => vec![Reply::Ack { conn, client_ref: r, with_session: true }],
                None => Vec::new(),
            };
            actor.append(body, None, Some(change), replies, AfterCommit::EnterQueue, ctx);
            actor
        });
        (id, addr)
    }

    /// Brings a stored, not yet ended session back to life on this node.
    pub fn restore(deps: Deps, snap: SessionSnapshot) -> Option<Addr<SessionActor>> {
        let phase = match snap.status {
            SessionStatus::Waiting { queued_at_ms } => Phase::Waiting { queued_at_ms },
            SessionStatus::Active { agent, .. } => Phase::Active { agent },
            SessionStatus::Ended { .. } => return None,
        };
        let mut actor = SessionActor::new(deps, snap.record, phase, snap.last_seq, snap.client_keys);
        if let Phase::Active { agent } = &actor.phase {
            actor.agent = Some(Box::new(AgentLink { info: agent.clone(), addr: None, conn: None, taking: None }));
        }
        Some(actor.start())
    }

    fn new(deps: Deps, record: SessionRecord, phase: Phase, last_seq: Seq, keys: Vec<(Arc<str>, Seq)>) -> SessionActor {
        let span = tracing::info_span!("session", session_id = %record.id, node = %deps.settings.node_id);
        SessionActor {
            started_at_ms: record.created_at_ms,
            deps,
            record,
            phase,
            last_allocated: last_seq,
            last_committed: last_seq,
            keys: keys.into_iter().collect(),
            pending: Vec::new(),
            in_flight: Vec::new(),
            customer: None,
            agent: None,
            fresh_token: None,
            customer_timer: None,
            agent_timer: None,
            last_queue: None,
            phase_before: None,
            customer_lost: false,
            stale: false,
            resyncing: false,
            stats: None,
            span,
        }
    }

    /// Whether `agent_id` serves this session; if not, the refusal:
    /// `not_found` once it ended, `forbidden` while someone else (or no one)
    /// serves it.
    fn served_by(&self, agent_id: &AgentId) -> Result<(), ActorError> {
        match &self.phase {
            Phase::Active { agent } if agent.id == *agent_id => Ok(()),
            Phase::Ended => Err(ActorError::NotFound("the session has ended")),
            _ => Err(ActorError::Forbidden("you do not serve this session")),
        }
    }

    fn queue_entry(&self, queued_at_ms: i64) -> QueueEntry {
        QueueEntry {
            session_id: self.record.id.clone(),
            topic: self.record.topic.clone(),
            name: self.record.customer_name.clone(),
            queued_at_ms,
        }
    }

    /// The dashboard line of this session (sessions being served only).
    fn view(&self) -> Option<SessionView> {
        let Phase::Active { agent } = &self.phase else { return None };
        Some(SessionView {
            session_id: self.record.id.clone(),
            customer: self.record.customer_name.clone(),
            agent: Some(agent.name.clone()),
            agent_id: Some(agent.id.clone()),
            topic: self.record.topic.clone(),
            mode: self.record.mode,
            started_at_ms: self.started_at_ms,
            node: self.deps.settings.node_id.clone(),
            stats: self.stats.as_deref().copied(),
        })
    }

    fn report(&self, ctx: &mut Context<Self>) {
        self.deps.registry.do_send(RegisterSession {
            id: self.record.id.clone(),
            topic: self.record.topic.clone(),
            addr: ctx.address(),
            view: self.view(),
        });
    }

    // ---- appending -------------------------------------------------------

    /// Numbers an event and queues it for storage. Replies go out after the
    /// commit. A key seen before answers with its old seq instead.
    fn append(
        &mut self,
        body: EventBody,
        key: Option<Arc<str>>,
        change: Option<SessionChange>,
        mut replies: Vec<Reply>,
        after: AfterCommit,
        ctx: &mut Context<Self>,
    ) {
        if self.stale {
            if let Some(phase) = self.phase_before.take() {
                self.revert_to(*phase, ctx);
            }
            let err = ActorError::from(crate::error::StoreError::Unavailable { what: "database" });
            for r in replies {
                self.answer(r, Err(err.clone()));
            }
            self.resync(ctx);
            return;
        }
        if let Some(k) = &key {
            if let Some(&seq) = self.keys.get(k) {
                if seq <= self.last_committed {
                    for r in replies {
                        self.answer(r, Ok(seq));
                    }
                } else if let Some(p) = self
                    .in_flight
                    .iter_mut()
                    .chain(self.pending.iter_mut())
                    .find(|p| p.event.seq == seq)
                {
                    // Same ref again while the first copy is being stored:
                    // answer both once it is.
                    p.replies.append(&mut replies);
                }
                return;
            }
        }
        self.last_allocated += 1;
        let event = Arc::new(Event {
            session_id: self.record.id.clone(),
            seq: self.last_allocated,
            at_ms: now_ms(),
            body,
        });
        if let Some(k) = &key {
            self.keys.insert(k.clone(), event.seq);
        }
        let revert = self.phase_before.take().map(|p| *p);
        self.pending.push(Pending { event, key, change, replies, after, revert });
        self.flush(ctx);
    }

    fn flush(&mut self, ctx: &mut Context<Self>) {
        if !self.in_flight.is_empty() || self.pending.is_empty() {
            return;
        }
        self.in_flight = std::mem::take(&mut self.pending);
        let mut change = None;
        let events = self
            .in_flight
            .iter()
            .map(|p| {
                if let Some(c) = &p.change {
                    change = Some(merge_change(change.take(), c.clone()));
                }
                NewEvent { event: p.event.clone(), client_key: p.key.clone() }
            })
            .collect();
        let batch = AppendBatch { session_id: self.record.id.clone(), events, change };
        let fut = self.deps.store.append(batch);
        ctx.spawn(fut.into_actor(self).map(|res, act, ctx| act.committed(res, ctx)));
    }

    fn committed(&mut self, res: Result<(), crate::error::StoreError>, ctx: &mut Context<Self>) {
        let _g = self.span.clone().entered();
        let batch = std::mem::take(&mut self.in_flight);
        match res {
            Ok(()) => {
                // The seq of `assigned` in this batch, and the take's reply.
                let mut assigned: Option<(Seq, Vec<Reply>)> = None;
                for p in batch {
                    self.last_committed = p.event.seq;
                    if p.after == AfterCommit::Finish {
                        // The agent is free before it can read `ended` or
                        // its `end` ack: a `take` sent at once must not find
                        // it still serving this session.
                        self.release_agent();
                    }
                    self.deliver(&p.event);
                    match p.after {
                        // `queue` comes right after `session`, before the ack.
                        AfterCommit::EnterQueue | AfterCommit::ReturnToQueueHead => {
                            self.enter_queue(p.after == AfterCommit::ReturnToQueueHead, p.replies, p.event.seq, ctx);
                        }
                        AfterCommit::Finish => {
                            for r in p.replies {
                                self.answer(r, Ok(p.event.seq));
                            }
                            self.finish(ctx);
                        }
                        AfterCommit::Nothing => {
                            for r in p.replies {
                                self.answer(r, Ok(p.event.seq));
                            }
                        }
                        AfterCommit::ShowHistory => assigned = Some((p.event.seq, p.replies)),
                    }
                }
                // Only the batch that stored `assigned`, and after all of
                // it: the replay covers what it stored.
                if let Some((seq, replies)) = assigned {
                    match self.agent.as_mut().and_then(|l| l.taking.take()) {
                        Some((conn, client_ref)) => self.show_history(conn, client_ref, seq, replies, ctx),
                        None => {
                            for r in replies {
                                self.answer(r, Ok(seq));
                            }
                        }
                    }
                }
                if self.customer_lost {
                    self.customer_lost = false;
                    self.customer_gone(ctx);
                }
                self.flush(ctx);
            }
            Err(e) => {
                warn!(error = %e, "storing events failed; answering unavailable");
                let err = ActorError::from(e);
                let failed: Vec<Pending> = batch.into_iter().chain(std::mem::take(&mut self.pending)).collect();
                self.last_allocated = self.last_committed;
                if let Some(phase) = failed.iter().find_map(|p| p.revert.clone()) {
                    self.revert_to(phase, ctx);
                }
                self.stale = true;
                for p in failed {
                    if let Some(k) = &p.key {
                        self.keys.remove(k);
                    }
                    for r in p.replies {
                        self.answer(r, Err(err.clone()));
                    }
                    if p.event.seq == 1 {
                        // The session itself was never stored: it does not exist.
                        if let Some(c) = self.customer.take() {
                            c.push(Outbound::Detached { session_id: self.record.id.clone() });
                        }
                        ctx.stop();
                    }
                }
                self.resync(ctx);
            }
        }
    }

    /// Reads the session back from storage after a failed batch: its last
    /// seq and keys. If the failed batch was in fact stored (its answer was
    /// lost), its events are delivered now; their refs are acked with the
    /// stored seq when the client sends them again.
    fn resync(&mut self, ctx: &mut Context<Self>) {
        if self.resyncing || self.last_committed == 0 {
            return;
        }
        self.resyncing = true;
        let store = self.deps.store.clone();
        let id = self.record.id.clone();
        let known = self.last_committed;
        let page = self.deps.settings.replay_page;
        let fut = async move {
            let snap = store.load_session(&id).await?;
            let missed = match &snap {
                Some(s) if s.last_seq > known => store.events_after(&id, known, page).await?,
                _ => Vec::new(),
            };
            Ok::<_, crate::error::StoreError>((snap, missed))
        };
        ctx.wait(fut.into_actor(self).map(|res, act, ctx| {
            act.resyncing = false;
            let _g = act.span.clone().entered();
            match res {
                Ok((Some(snap), missed)) => {
                    if snap.last_seq > act.last_committed {
                        warn!(stored = snap.last_seq, believed = act.last_committed, "a batch reported as failed was stored; catching up");
                        let ends = matches!(snap.status, SessionStatus::Ended { .. }) && act.phase != Phase::Ended;
                        if ends {
                            act.release_agent();
                        }
                        for e in &missed {
                            act.deliver(e);
                        }
                        act.phase = match snap.status {
                            SessionStatus::Waiting { queued_at_ms } => Phase::Waiting { queued_at_ms },
                            SessionStatus::Active { agent, .. } => Phase::Active { agent },
                            SessionStatus::Ended { .. } => Phase::Ended,
                        };
                        if ends {
                            // The stored `ended` stands: wind down as after its commit.
                            act.finish(ctx);
                        }
                    }
                    act.last_committed = snap.last_seq;
                    act.last_allocated = snap.last_seq;
                    act.keys = snap.client_keys.into_iter().collect();
                    act.stale = false;
                    // `assigned` was stored though its take was answered
                    // with an error (and the customer put back in line): no
                    // agent serves it, so it goes back to the head of the
                    // queue in the log too, or nobody could take it again.
                    if let (Phase::Active { agent }, None) = (&act.phase, &act.agent) {
                        let id = agent.id.clone();
                        act.agent_lost(&id, ctx);
                    }
                }
                Ok((None, _)) => act.stale = false,
                Err(_) => {} // Still down: the next append tries again.
            }
        }));
    }

    /// Undoes a phase change whose event could not be stored. A customer
    /// whose assignment failed goes back to the head of the queue.
    fn revert_to(&mut self, phase: Phase, ctx: &mut Context<Self>) {
        let was_active = matches!(self.phase, Phase::Active { .. });
        self.phase = phase;
        if let (true, Phase::Waiting { queued_at_ms }) = (was_active, &self.phase) {
            self.agent = None;
            let entry = self.queue_entry(*queued_at_ms);
            let queue = self.deps.queue.clone();
            ctx.wait(async move { queue.push_front(entry).await }.into_actor(self).map(|_, act, _| {
                act.deps.registry.do_send(TopicChanged { topic: act.record.topic.clone() });
            }));
        }
        self.report(ctx);
    }

    fn answer(&self, reply: Reply, res: Result<Seq, ActorError>) {
        match reply {
            Reply::Ack { conn, client_ref, with_session } => {
                let frame = match res {
                    Ok(seq) => Outbound::Ack {
                        client_ref,
                        seq: Some(seq),
                        session_id: with_session.then(|| self.record.id.clone()),
                    },
                    Err(error) => Outbound::Error { client_ref: Some(client_ref), error },
                };
                conn.push(frame);
            }
            Reply::Seq(tx) => {
                let _ = tx.send(res);
            }
        }
    }

    /// Sends a committed event to the sides it concerns. The sender of a
    /// message or rtc does not get its own copy live (it has the ack); it
    /// is in the stream for replay either way.
    fn deliver(&mut self, event: &Arc<Event>) {
        let (to_customer, to_agent) = match &event.body {
            EventBody::Session { .. } => (true, false),
            EventBody::Message { from, .. } | EventBody::Rtc { from, .. } => match from {
                Party::Customer => (false, true),
                Party::Agent | Party::Ai => (true, false),
                Party::System => (true, true),
            },
            EventBody::Assigned { .. } | EventBody::Ended { .. } => (true, true),
        };
        if to_customer {
            if let Some(c) = &self.customer {
                if !c.push(Outbound::Event(event.clone())) {
                    // Too slow or gone: it resumes, or its grace runs out.
                    self.customer_lost = true;
                }
            }
        }
        if to_agent {
            if let Some(link) = &mut self.agent {
                if let Some(c) = &link.conn {
                    if !c.push(Outbound::Event(event.clone())) {
                        link.conn = None;
                    }
                }
            }
        }
        if let EventBody::Session { resume_token: Some(_), .. } = &event.body {
            self.fresh_token = None;
        }
    }

    /// Puts the customer into its topic's queue (at the head when its agent
    /// was lost), sends the first `queue`, then the replies.
    fn enter_queue(&mut self, head: bool, replies: Vec<Reply>, seq: Seq, ctx: &mut Context<Self>) {
        let Phase::Waiting { queued_at_ms } = self.phase else {
            for r in replies {
                self.answer(r, Ok(seq));
            }
            return;
        };
        let entry = self.queue_entry(queued_at_ms);
        let queue = self.deps.queue.clone();
        let fut = async move {
            if head {
                queue.push_front(entry).await.map(|waiting| (1, waiting))
            } else {
                queue.push_back(entry).await
            }
        };
        // `wait`: the first `queue` frame goes out before anything that
        // happens to the session next.
        ctx.wait(fut.into_actor(self).map(move |res, act, _ctx| {
            match res {
                Ok((position, waiting)) => {
                    act.deps.registry.do_send(TopicChanged { topic: act.record.topic.clone() });
                    let eta_s = act.deps.eta.eta_s(&act.record.topic, position);
                    act.push_queue(position, waiting, eta_s);
                }
                Err(e) => warn!(error = %e, "could not enter the queue"),
            }
            for r in replies {
                act.answer(r, Ok(seq));
            }
        }));
        self.report(ctx);
    }

    fn push_queue(&mut self, position: usize, waiting: usize, eta_s: u64) {
        let now = (position, waiting, eta_s);
        if self.last_queue == Some(now) {
            return;
        }
        if let Some(c) = &self.customer {
            if c.push(Outbound::Queue { session_id: self.record.id.clone(), position, waiting, eta_s }) {
                self.last_queue = Some(now);
            }
        }
    }

    // ---- the end -----------------------------------------------------------

    /// Ends the session with `reason` (stored as `ended`).
    fn end(&mut self, reason: EndReason, replies: Vec<Reply>, ctx: &mut Context<Self>) {
        if self.phase == Phase::Ended {
            return;
        }
        if let Phase::Waiting { .. } = self.phase {
            let queue = self.deps.queue.clone();
            let (topic, id) = (self.record.topic.clone(), self.record.id.clone());
            ctx.wait(
                async move { queue.remove(&topic, &id).await }
                    .into_actor(self)
                    .map(|_, act, _| act.deps.registry.do_send(TopicChanged { topic: act.record.topic.clone() })),
            );
        }
        self.phase_before = Some(Box::new(std::mem::replace(&mut self.phase, Phase::Ended)));
        let change = SessionChange::Status(SessionStatus::Ended { reason, at_ms: now_ms() });
        self.append(EventBody::Ended { reason }, None, Some(change), replies, AfterCommit::Finish, ctx);
    }

    /// Tells the serving agent's actor that this session has ended.
    fn release_agent(&self) {
        if let Some(addr) = self.agent.as_ref().and_then(|l| l.addr.as_ref()) {
            addr.do_send(ServedSessionEnded { session_id: self.record.id.clone() });
        }
    }

    fn finish(&mut self, ctx: &mut Context<Self>) {
        info!("session ended");
        // Handle time counts from the assignment (`started_at_ms` is reset then).
        let handle_ms = self.agent.as_ref().map(|_| now_ms() - self.started_at_ms);
        self.deps.registry.do_send(SessionFinished {
            id: self.record.id.clone(),
            topic: self.record.topic.clone(),
            handle_ms,
        });
        if let Some(c) = &self.customer {
            c.push(Outbound::Detached { session_id: self.record.id.clone() });
        }
        for t in [self.customer_timer.take(), self.agent_timer.take()].into_iter().flatten() {
            ctx.cancel_future(t);
        }
        ctx.run_later(self.deps.settings.ended_linger, |_, ctx| ctx.stop());
    }

    // ---- connections -------------------------------------------------------

    fn customer_gone(&mut self, ctx: &mut Context<Self>) {
        self.customer = None;
        if self.phase == Phase::Ended || self.customer_timer.is_some() {
            return;
        }
        let grace = self.deps.settings.customer_grace;
        self.customer_timer = Some(ctx.run_later(grace, |act, ctx| {
            act.customer_timer = None;
            if act.customer.is_none() {
                let _g = act.span.clone().entered();
                info!("customer did not come back; ending the session");
                act.end(EndReason::Timeout, Vec::new(), ctx);
            }
        }));
    }

    fn start_agent_grace(&mut self, ctx: &mut Context<Self>) {
        if self.agent_timer.is_some() {
            return;
        }
        let grace = self.deps.settings.agent_grace;
        self.agent_timer = Some(ctx.run_later(grace, |act, ctx| {
            act.agent_timer = None;
            let lost = act.agent.as_ref().map(|l| l.conn.is_none() && l.addr.as_ref().is_none_or(|a| !a.connected()));
            if lost == Some(true) {
                let id = act.agent.as_ref().map(|l| l.info.id.clone());
                if let Some(id) = id {
                    act.agent_lost(&id, ctx);
                }
            }
        }));
    }

    /// The agent is gone for good: the customer goes back to the head.
    fn agent_lost(&mut self, agent_id: &AgentId, ctx: &mut Context<Self>) {
        let Phase::Active { agent } = &self.phase else { return };
        if &agent.id != agent_id {
            return;
        }
        let _g = self.span.clone().entered();
        info!(agent_id = %agent_id, "agent lost; customer goes back to the head of the queue");
        self.agent = None;
        // Negative times sort before every real one: the most recently
        // returned customer is the very first.
        let queued_at_ms = -now_ms();
        self.phase = Phase::Waiting { queued_at_ms };
        self.last_queue = None;
        let text: Arc<str> = Arc::from("Your agent was disconnected. You are first in line again.");
        let msg_id = self.msg_id(self.last_allocated + 1);
        let change = SessionChange::Status(SessionStatus::Waiting { queued_at_ms });
        self.append(
            EventBody::Message { from: Party::System, text, msg_id },
            None,
            Some(change),
            Vec::new(),
            AfterCommit::ReturnToQueueHead,
            ctx,
        );
    }

    /// Ephemeral frames are not stored: their ack carries no seq.
    fn ack_ephemeral(&self, conn: &ConnHandle, client_ref: Option<ClientRef>) {
        if let Some(client_ref) = client_ref {
            conn.push(Outbound::Ack { client_ref, seq: None, session_id: None });
        }
    }

    fn msg_id(&self, seq: Seq) -> Arc<str> {
        Arc::from(format!("{}-{}", self.record.id, seq))
    }

    /// The agent that took the session reads it from the start, `assigned`
    /// last, then gets the `take` ack, then live events. If the log cannot
    /// be read it is told (an error without `ref`) and may `resume` with
    /// `last_seq` 0; it serves the session either way.
    fn show_history(
        &mut self,
        conn: ConnHandle,
        client_ref: Option<ClientRef>,
        assigned_seq: Seq,
        replies: Vec<Reply>,
        ctx: &mut Context<Self>,
    ) {
        self.replay(conn.clone(), 0, move |act, _ctx, res| {
            if let Err(error) = res {
                warn!(error = %error, "could not show the session to the agent that took it");
                conn.push(Outbound::Error { client_ref: None, error });
            }
            // The ack before the socket is live: an event committed during
            // the replay is delivered after it.
            if let Some(client_ref) = client_ref {
                conn.push(Outbound::Ack { client_ref, seq: Some(assigned_seq), session_id: Some(act.record.id.clone()) });
            }
            if let Some(link) = &mut act.agent {
                link.conn = Some(conn);
            }
            for r in replies {
                act.answer(r, Ok(assigned_seq));
            }
        }, ctx);
    }

    /// Replays events after `last_seq` to `conn`, page by page, holding the
    /// actor (`ctx.wait`) so no live event overtakes the replay. Then
    /// `then` runs (it attaches the connection for live events).
    fn replay(
        &mut self,
        conn: ConnHandle,
        last_seq: Seq,
        then: impl FnOnce(&mut SessionActor, &mut Context<Self>, Result<(), ActorError>) + 'static,
        ctx: &mut Context<Self>,
    ) {
        let store = self.deps.store.clone();
        let id = self.record.id.clone();
        let upto = self.last_committed;
        if last_seq > upto {
            // The client saw events the store no longer has: a store that
            // lost its last commits (SQLite at `synchronous=NORMAL` after a
            // power loss), or a client that invents seqs.
            warn!(last_seq, stored = upto, "a resume claims events beyond the stored log");
        }
        let page = self.deps.settings.replay_page;
        let fut = async move {
            let mut after = last_seq.max(0);
            while after < upto {
                let events = store.events_after(&id, after, page).await?;
                let Some(last) = events.last().map(|e| e.seq) else { break };
                for e in events {
                    if e.seq > upto {
                        break;
                    }
                    // Every replayed event is checked: this session, next seq.
                    if e.session_id != id || e.seq <= after {
                        warn!(seq = e.seq, "skipping a replayed event that is not next in this session");
                        continue;
                    }
                    after = e.seq;
                    if !conn.push_wait(Outbound::Event(e)).await {
                        return Ok(());
                    }
                }
                if last >= upto {
                    break;
                }
            }
            Ok::<(), crate::error::StoreError>(())
        };
        ctx.wait(fut.into_actor(self).map(move |res, act, ctx| then(act, ctx, res.map_err(ActorError::from))));
    }
}

/// Within one batch, the latest status wins, and a creation stays a creation.
fn merge_change(prev: Option<SessionChange>, next: SessionChange) -> SessionChange {
    match (prev, next) {
        (Some(SessionChange::Create(rec, _)), SessionChange::Status(s)) => SessionChange::Create(rec, s),
        (_, next) => next,
    }
}

impl Actor for SessionActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Replay may wait for a slow client; the mailbox must not be the
        // limit meanwhile.
        ctx.set_mailbox_capacity(1024);
        self.report(ctx);
        if self.agent.is_some() && self.phase != Phase::Ended {
            // Restored with an agent that has yet to come back.
            self.start_agent_grace(ctx);
        }
        if self.customer.is_none() {
            self.customer_gone(ctx);
        }
    }

    fn stopped(&mut self, ctx: &mut Context<Self>) {
        if std::thread::panicking() {
            self.tell_sockets_to_resume();
        }
        self.deps.registry.do_send(SessionGone { id: self.record.id.clone(), addr: ctx.address() });
    }
}

impl SessionActor {
    /// A handler panicked: actix stops the actor while the runtime unwinds
    /// (dropping its context polls it to `stopped`, inside the runtime's
    /// `catch_unwind`, hence `panicking()`). Its sockets are told at once to
    /// resume: storage holds the session's truth, and the registry restores
    /// it on the resume. Without this, a quiet client would wait on a dead
    /// actor until it next sent something.
    fn tell_sockets_to_resume(&self) {
        let restarting = || Outbound::Close { code: CLOSE_RESTARTING, reason: "session restarting; resume" };
        let agent_conns = self.agent.iter().flat_map(|l| l.conn.iter().chain(l.taking.iter().map(|(c, _)| c)));
        for conn in self.customer.iter().chain(agent_conns) {
            conn.push(restarting());
        }
    }
}

// ---- messages ----------------------------------------------------------------

/// What a customer's connection forwards to its session.
#[derive(Debug)]
pub enum CustomerCmd {
    Say { text: Arc<str>, client_ref: Option<ClientRef> },
    Typing { on: bool, client_ref: Option<ClientRef> },
    Rtc { kind: RtcKind, data: OpaqueJson, client_ref: Option<ClientRef> },
    Stats { stats: CallStats, client_ref: Option<ClientRef> },
    Leave { client_ref: Option<ClientRef> },
}

impl CustomerCmd {
    pub fn client_ref(&self) -> Option<ClientRef> {
        match self {
            CustomerCmd::Say { client_ref, .. }
            | CustomerCmd::Rtc { client_ref, .. }
            | CustomerCmd::Leave { client_ref }
            | CustomerCmd::Typing { client_ref, .. }
            | CustomerCmd::Stats { client_ref, .. } => client_ref.clone(),
        }
    }
}

impl AgentCmd {
    pub fn client_ref(&self) -> Option<ClientRef> {
        match self {
            AgentCmd::Say { client_ref, .. }
            | AgentCmd::Rtc { client_ref, .. }
            | AgentCmd::End { client_ref }
            | AgentCmd::Typing { client_ref, .. } => client_ref.clone(),
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct FromCustomer {
    pub conn: ConnHandle,
    pub cmd: CustomerCmd,
}

fn ack_reply(conn: &ConnHandle, r: Option<ClientRef>) -> Vec<Reply> {
    r.map(|client_ref| vec![Reply::Ack { conn: conn.clone(), client_ref, with_session: false }])
        .unwrap_or_default()
}

fn refuse(conn: &ConnHandle, r: Option<ClientRef>, error: ActorError) {
    conn.push(Outbound::Error { client_ref: r, error });
}

fn key_of(prefix: &str, r: &Option<ClientRef>) -> Option<Arc<str>> {
    r.as_ref().map(|r| Arc::from(format!("{prefix}:{}", r.0)))
}

impl Handler<FromCustomer> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: FromCustomer, ctx: &mut Context<Self>) {
        let _g = self.span.clone().entered();
        let FromCustomer { conn, cmd } = msg;
        if !self.customer.as_ref().is_some_and(|c| c.same(&conn)) {
            if let Some(r) = cmd.client_ref() {
                refuse(&conn, Some(r), ActorError::NotFound("this connection is not attached to the session"));
            }
            return;
        }
        if self.phase == Phase::Ended {
            if let Some(r) = cmd.client_ref() {
                refuse(&conn, Some(r), ActorError::NotFound("the session has ended"));
            }
            return;
        }
        match cmd {
            CustomerCmd::Say { text, client_ref } => {
                let key = key_of("customer", &client_ref);
                let msg_id = self.msg_id(self.last_allocated + 1);
                let replies = ack_reply(&conn, client_ref);
                self.append(EventBody::Message { from: Party::Customer, text, msg_id }, key, None, replies, AfterCommit::Nothing, ctx);
            }
            CustomerCmd::Rtc { kind, data, client_ref } => {
                if !matches!(self.phase, Phase::Active { .. }) {
                    refuse(&conn, client_ref, ActorError::Conflict("no agent is serving this session yet"));
                    return;
                }
                let key = key_of("customer", &client_ref);
                let replies = ack_reply(&conn, client_ref);
                self.append(EventBody::Rtc { kind, data, from: Party::Customer }, key, None, replies, AfterCommit::Nothing, ctx);
            }
            CustomerCmd::Typing { on, client_ref } => {
                if let Some(c) = self.agent.as_ref().and_then(|l| l.conn.as_ref()) {
                    c.push(Outbound::Typing { session_id: self.record.id.clone(), from: Party::Customer, on });
                }
                self.ack_ephemeral(&conn, client_ref);
            }
            CustomerCmd::Stats { stats, client_ref } => {
                self.stats = Some(Box::new(stats));
                if let Some(c) = self.agent.as_ref().and_then(|l| l.conn.as_ref()) {
                    c.push(Outbound::Stats { session_id: self.record.id.clone(), stats });
                }
                self.report(ctx);
                self.ack_ephemeral(&conn, client_ref);
            }
            CustomerCmd::Leave { client_ref } => {
                let replies = ack_reply(&conn, client_ref);
                self.end(EndReason::CustomerLeft, replies, ctx);
            }
        }
    }
}

/// A customer connection asks to continue this session.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachCustomer {
    pub conn: ConnHandle,
    pub resume_token: Arc<str>,
    pub last_seq: Seq,
    pub client_ref: Option<ClientRef>,
}

impl Handler<AttachCustomer> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: AttachCustomer, ctx: &mut Context<Self>) {
        let _g = self.span.clone().entered();
        let refusal = if !secret_matches(&msg.resume_token, &self.record.resume_token_hash) {
            Some(ActorError::Unauthorized("wrong resume token"))
        } else if self.phase == Phase::Ended {
            Some(ActorError::NotFound("the session has ended"))
        } else {
            None
        };
        if let Some(e) = refusal {
            // The marker first: the socket lets go of this resume before the
            // client reads the refusal, so what it sends on reading it goes
            // to its own session (the other order raced, under load).
            msg.conn.push(Outbound::ResumeRefused { session_id: self.record.id.clone() });
            refuse(&msg.conn, msg.client_ref, e);
            return;
        }
        if let Some(old) = self.customer.take() {
            if !old.same(&msg.conn) {
                old.push(Outbound::Detached { session_id: self.record.id.clone() });
                old.push(Outbound::Close { code: CLOSE_SUPERSEDED, reason: "session resumed elsewhere" });
            }
        }
        if let Some(t) = self.customer_timer.take() {
            ctx.cancel_future(t);
        }
        let conn = msg.conn.clone();
        conn.push(Outbound::Resumed { session_id: self.record.id.clone() });
        if let Some(r) = msg.client_ref.clone() {
            conn.push(Outbound::Ack { client_ref: r, seq: None, session_id: Some(self.record.id.clone()) });
        }
        self.replay(conn.clone(), msg.last_seq, move |act, ctx, res| {
            if let Err(error) = res {
                conn.push(Outbound::Error { client_ref: None, error });
                conn.push(Outbound::Detached { session_id: act.record.id.clone() });
                act.customer_gone(ctx);
                return;
            }
            act.customer = Some(conn);
            act.last_queue = None;
            if let Phase::Waiting { .. } = act.phase {
                // The current position, right after the replay.
                act.deps.registry.do_send(TopicChanged { topic: act.record.topic.clone() });
            }
        }, ctx);
    }
}

/// The customer's connection closed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CustomerDetached {
    pub conn_id: u64,
}

impl Handler<CustomerDetached> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: CustomerDetached, ctx: &mut Context<Self>) {
        if self.customer.as_ref().is_some_and(|c| c.conn_id == msg.conn_id) {
            self.customer_gone(ctx);
        }
    }
}

/// The registry's periodic word on where this customer stands.
#[derive(Message)]
#[rtype(result = "()")]
pub struct QueuePosition {
    pub position: usize,
    pub waiting: usize,
    pub eta_s: u64,
}

impl Handler<QueuePosition> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: QueuePosition, _ctx: &mut Context<Self>) {
        if let Phase::Waiting { .. } = self.phase {
            self.push_queue(msg.position, msg.waiting, msg.eta_s);
        }
    }
}

/// An agent took this customer out of the queue; the answer is the seq of
/// `assigned` once stored.
#[derive(Message)]
#[rtype(result = "Result<Seq, ActorError>")]
pub struct Assign {
    pub agent: AgentInfo,
    pub agent_addr: Addr<AgentActor>,
    /// The agent's socket and the take's `ref`: on success the session
    /// sends the ack itself, between the history and the live events.
    pub conn: ConnHandle,
    pub client_ref: Option<ClientRef>,
}

impl Handler<Assign> for SessionActor {
    type Result = ResponseFuture<Result<Seq, ActorError>>;

    fn handle(&mut self, msg: Assign, ctx: &mut Context<Self>) -> Self::Result {
        let _g = self.span.clone().entered();
        if !matches!(self.phase, Phase::Waiting { .. }) {
            let e = if self.phase == Phase::Ended {
                ActorError::NotFound("the session has ended")
            } else {
                ActorError::Conflict("another agent has taken this customer")
            };
            return Box::pin(async move { Err(e) });
        }
        let (tx, rx) = oneshot::channel();
        info!(agent_id = %msg.agent.id, "assigned");
        self.phase_before = Some(Box::new(std::mem::replace(&mut self.phase, Phase::Active { agent: msg.agent.clone() })));
        self.started_at_ms = now_ms();
        self.agent = Some(Box::new(AgentLink {
            info: msg.agent.clone(),
            addr: Some(msg.agent_addr),
            conn: None,
            taking: Some((msg.conn, msg.client_ref)),
        }));
        if let Some(t) = self.agent_timer.take() {
            ctx.cancel_future(t);
        }
        let change = SessionChange::Status(SessionStatus::Active { agent: msg.agent.clone(), assigned_at_ms: now_ms() });
        self.append(EventBody::Assigned { agent: msg.agent }, None, Some(change), vec![Reply::Seq(tx)], AfterCommit::ShowHistory, ctx);
        self.report(ctx);
        Box::pin(async move { rx.await.unwrap_or(Err(ActorError::Internal)) })
    }
}

/// What an agent does in the session it serves.
#[derive(Debug)]
pub enum AgentCmd {
    Say { text: Arc<str>, client_ref: Option<ClientRef> },
    Typing { on: bool, client_ref: Option<ClientRef> },
    Rtc { kind: RtcKind, data: OpaqueJson, client_ref: Option<ClientRef> },
    End { client_ref: Option<ClientRef> },
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct FromAgent {
    pub agent_id: AgentId,
    pub conn: ConnHandle,
    pub cmd: AgentCmd,
}

impl Handler<FromAgent> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: FromAgent, ctx: &mut Context<Self>) {
        let _g = self.span.clone().entered();
        let FromAgent { agent_id, conn, cmd } = msg;
        let client_ref = match &cmd {
            AgentCmd::Say { client_ref, .. }
            | AgentCmd::Rtc { client_ref, .. }
            | AgentCmd::End { client_ref }
            | AgentCmd::Typing { client_ref, .. } => client_ref.clone(),
        };
        if let Err(e) = self.served_by(&agent_id) {
            if client_ref.is_some() {
                refuse(&conn, client_ref, e);
            }
            return;
        }
        let prefix = format!("agent:{agent_id}");
        match cmd {
            AgentCmd::Say { text, client_ref } => {
                let key = key_of(&prefix, &client_ref);
                let msg_id = self.msg_id(self.last_allocated + 1);
                let replies = ack_reply(&conn, client_ref);
                self.append(EventBody::Message { from: Party::Agent, text, msg_id }, key, None, replies, AfterCommit::Nothing, ctx);
            }
            AgentCmd::Rtc { kind, data, client_ref } => {
                let key = key_of(&prefix, &client_ref);
                let replies = ack_reply(&conn, client_ref);
                self.append(EventBody::Rtc { kind, data, from: Party::Agent }, key, None, replies, AfterCommit::Nothing, ctx);
            }
            AgentCmd::Typing { on, client_ref } => {
                if let Some(c) = &self.customer {
                    c.push(Outbound::Typing { session_id: self.record.id.clone(), from: Party::Agent, on });
                }
                self.ack_ephemeral(&conn, client_ref);
            }
            AgentCmd::End { client_ref } => {
                let replies = ack_reply(&conn, client_ref);
                self.end(EndReason::AgentEnded, replies, ctx);
            }
        }
    }
}

/// The serving agent reconnected and asks for the events it missed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachAgent {
    pub agent_id: AgentId,
    pub agent_addr: Addr<AgentActor>,
    pub conn: ConnHandle,
    pub last_seq: Seq,
    pub client_ref: Option<ClientRef>,
    /// Told how the resume went, so the agent actor knows what it serves.
    pub done: oneshot::Sender<AgentResume>,
}

/// How an agent's resume went.
#[derive(Debug)]
pub enum AgentResume {
    /// Replayed; live events follow.
    Attached,
    /// Refused before anything was sent: the agent's `ref` is answered
    /// with this error.
    Refused(ActorError),
    /// `resumed` and the ack went out, then the replay failed: the client
    /// got the error without a `ref` (its ref has had its one answer) and
    /// resumes again.
    ReplayFailed,
}

impl Handler<AttachAgent> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: AttachAgent, ctx: &mut Context<Self>) {
        let _g = self.span.clone().entered();
        if let Err(e) = self.served_by(&msg.agent_id) {
            let _ = msg.done.send(AgentResume::Refused(e));
            return;
        }
        if let Some(t) = self.agent_timer.take() {
            ctx.cancel_future(t);
        }
        if let Some(link) = &mut self.agent {
            link.addr = Some(msg.agent_addr);
            link.conn = None;
            link.taking = None;
        }
        let conn = msg.conn.clone();
        conn.push(Outbound::Resumed { session_id: self.record.id.clone() });
        if let Some(r) = msg.client_ref.clone() {
            conn.push(Outbound::Ack { client_ref: r, seq: None, session_id: Some(self.record.id.clone()) });
        }
        let done = msg.done;
        self.replay(conn.clone(), msg.last_seq, move |act, _ctx, res| {
            let outcome = match res {
                Ok(()) => {
                    if let Some(link) = &mut act.agent {
                        link.conn = Some(conn);
                    }
                    AgentResume::Attached
                }
                Err(error) => {
                    conn.push(Outbound::Error { client_ref: None, error });
                    AgentResume::ReplayFailed
                }
            };
            let _ = done.send(outcome);
        }, ctx);
        self.report(ctx);
    }
}

/// The serving agent's connection closed; it has the grace period to resume.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AgentDetached {
    pub agent_id: AgentId,
}

impl Handler<AgentDetached> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: AgentDetached, _ctx: &mut Context<Self>) {
        if let Some(link) = &mut self.agent {
            if link.info.id == msg.agent_id {
                link.conn = None;
                link.taking = None;
            }
        }
    }
}

/// The serving agent did not come back within its grace period.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AgentLost {
    pub agent_id: AgentId,
}

impl Handler<AgentLost> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: AgentLost, ctx: &mut Context<Self>) {
        self.agent_lost(&msg.agent_id, ctx);
    }
}

/// Whether the session has ended, or is ending: asked after a `take` found
/// the customer no longer waiting, it is answered after any `leave` that
/// reached the session first (the phase changes before `ended` is stored).
#[derive(Message)]
#[rtype(result = "bool")]
pub struct HasEnded;

impl Handler<HasEnded> for SessionActor {
    type Result = bool;

    fn handle(&mut self, _: HasEnded, _ctx: &mut Context<Self>) -> bool {
        self.phase == Phase::Ended
    }
}

/// Asks who serves this session (used by an agent resuming after a restart).
#[derive(Message)]
#[rtype(result = "Option<AgentId>")]
pub struct ServingAgent;

impl Handler<ServingAgent> for SessionActor {
    type Result = Option<AgentId>;

    fn handle(&mut self, _: ServingAgent, _ctx: &mut Context<Self>) -> Option<AgentId> {
        match &self.phase {
            Phase::Active { agent } => Some(agent.id.clone()),
            _ => None,
        }
    }
}

/// Test-only: makes the actor's handler panic, to prove supervision.
#[cfg(test)]
#[derive(Message)]
#[rtype(result = "()")]
pub struct Crash;

#[cfg(test)]
impl Handler<Crash> for SessionActor {
    type Result = ();

    #[allow(clippy::panic)]
    fn handle(&mut self, _: Crash, _ctx: &mut Context<Self>) {
        panic!("crash requested for session {}", self.record.id);
    }
}

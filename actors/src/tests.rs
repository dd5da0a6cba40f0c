//! The actors against the in-process ports: numbering, idempotency, failed
//! batches, and supervision (one session's panic leaves the others alone).

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use crate::domain::{ClientRef, Mode};
use crate::error::ActorError;
use crate::memory_store::MemoryEventStore;
use crate::outbound::{ConnHandle, ConnInbox, Outbound};
use crate::queue::MemoryQueue;
use crate::ports::EventStore;
use crate::registry::{FindSession, NodeDeps};
use crate::session::{Crash, CustomerCmd, FromCustomer, JoinRequest, SessionActor};
use crate::settings::{Deps, Settings};
use crate::RegistryActor;

async fn deps(store: Arc<dyn EventStore>) -> Deps {
    let settings = Arc::new(Settings::default());
    let queue = Arc::new(MemoryQueue::new());
    let registry = RegistryActor::new(store, queue, settings).start();
    registry.send(NodeDeps).await.expect("registry answers")
}

fn cref(n: u32) -> ClientRef {
    ClientRef(Arc::from(n.to_string()))
}

async fn next(inbox: &mut ConnInbox) -> Outbound {
    tokio::time::timeout(Duration::from_secs(5), inbox.recv())
        .await
        .ok()
        .flatten()
        .expect("a frame within 5 s")
}

/// The answer to `r` (ack seq, or the error), skipping other frames.
async fn answer(inbox: &mut ConnInbox, r: u32) -> Result<Option<i64>, ActorError> {
    let want = cref(r);
    loop {
        match next(inbox).await {
            Outbound::Ack { client_ref, seq, .. } if client_ref == want => return Ok(seq),
            Outbound::Error { client_ref: Some(c), error } if c == want => return Err(error),
            _ => {}
        }
    }
}

async fn joined(deps: &Deps, conn_id: u64) -> (Addr<SessionActor>, ConnHandle, ConnInbox, crate::domain::SessionId) {
    let (conn, mut inbox) = ConnHandle::channel(conn_id, 64);
    let join = JoinRequest { name: Arc::from("Bob"), topic: Arc::from("support"), mode: Mode::Human };
    let (id, addr) = SessionActor::open(deps.clone(), join, conn.clone(), Some(cref(1)));
    assert_eq!(answer(&mut inbox, 1).await, Ok(Some(1)));
    (addr, conn, inbox, id)
}

fn say(conn: &ConnHandle, r: u32) -> FromCustomer {
    FromCustomer { conn: conn.clone(), cmd: CustomerCmd::Say { text: Arc::from("hi"), client_ref: Some(cref(r)) } }
}

#[actix::test]
async fn seqs_have_no_gaps_and_refs_are_stored_once() {
    let store = Arc::new(MemoryEventStore::new());
    let deps = deps(store.clone()).await;
    let (addr, conn, mut inbox, id) = joined(&deps, 1).await;
    addr.do_send(say(&conn, 2));
    addr.do_send(say(&conn, 3));
    addr.do_send(say(&conn, 2));
    // The re-sent ref 2 arrives while the first copy is being stored: both
    // are answered when it is, with the same seq.
    let mut acks = Vec::new();
    while acks.len() < 3 {
        if let Outbound::Ack { client_ref, seq, .. } = next(&mut inbox).await {
            acks.push((client_ref.0.to_string(), seq));
        }
    }
    acks.sort();
    let s = |r: &str, q: i64| (r.to_owned(), Some(q));
    assert_eq!(acks, vec![s("2", 2), s("2", 2), s("3", 3)], "a re-sent ref keeps its seq");
    let seqs: Vec<i64> = store.events(&id).iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3]);
}

#[actix::test]
async fn a_failed_batch_is_refused_and_its_seq_reused_without_a_gap() {
    let store = Arc::new(MemoryEventStore::new());
    let deps = deps(store.clone()).await;
    let (addr, conn, mut inbox, id) = joined(&deps, 1).await;
    store.fail_next(1);
    addr.do_send(say(&conn, 2));
    assert!(matches!(answer(&mut inbox, 2).await, Err(ActorError::Unavailable { .. })));
    addr.do_send(say(&conn, 2));
    assert_eq!(answer(&mut inbox, 2).await, Ok(Some(2)), "the retry is stored, at the next seq");
    let seqs: Vec<i64> = store.events(&id).iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![1, 2]);
}

#[actix::test]
async fn a_panicking_session_leaves_the_others_alone_and_comes_back_from_storage() {
    let store = Arc::new(MemoryEventStore::new());
    let deps = deps(store.clone()).await;
    let (crashing, _c1, _i1, crashed_id) = joined(&deps, 1).await;
    let (other, conn, mut inbox, _) = joined(&deps, 2).await;
    crashing.do_send(Crash);
    for _ in 0..100 {
        if !crashing.connected() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!crashing.connected(), "the crashed actor is gone");
    other.do_send(say(&conn, 2));
    assert_eq!(answer(&mut inbox, 2).await, Ok(Some(2)), "the other session carries on");
    let restored = deps.registry.send(FindSession { id: crashed_id }).await.expect("registry answers");
    assert!(restored.is_some_and(|a| a.connected()), "the crashed session is restored from storage");
}

/// Waits (bounded) until a socket is told to close; returns the code.
async fn close_code(inbox: &mut ConnInbox) -> u16 {
    loop {
        if let Outbound::Close { code, .. } = next(inbox).await {
            return code;
        }
    }
}

/// A served session whose actor panics: both sockets are told at once to
/// resume (1011) instead of waiting on a dead actor; a frame the agent sent
/// meanwhile gets `unavailable`, not silence; both resume the restored
/// session and the conversation carries on without a gap.
#[actix::test]
async fn a_served_session_that_panics_is_resumed_by_both_sides() {
    use crate::agent::{AgentActor, AgentRequest, AttachAgentConn, FromAgentConn, TakeTarget};
    use crate::domain::{now_ms, AgentInfo, AgentKind, EventBody};
    use crate::session::{AgentCmd, AttachCustomer};

    let store = Arc::new(MemoryEventStore::new());
    let deps = deps(store.clone()).await;
    let (conn, mut inbox) = ConnHandle::channel(1, 64);
    let join = JoinRequest { name: Arc::from("Bob"), topic: Arc::from("support"), mode: Mode::Human };
    let (id, addr) = SessionActor::open(deps.clone(), join, conn.clone(), Some(cref(1)));
    let mut token = None;
    while token.is_none() {
        if let Outbound::Event(e) = next(&mut inbox).await {
            if let EventBody::Session { resume_token, .. } = &e.body {
                token = resume_token.clone();
            }
        }
    }
    assert_eq!(answer(&mut inbox, 1).await, Ok(Some(1)));

    let info = AgentInfo { id: Arc::from("a1"), name: Arc::from("A"), kind: AgentKind::Human };
    let (agent_conn, mut agent_inbox) = ConnHandle::channel(2, 64);
    let agent = AgentActor::new(deps.clone(), info, agent_conn.clone()).start();
    let request = |conn: &ConnHandle, req| FromAgentConn { conn: conn.clone(), req, received_at_ms: now_ms() };
    let take = AgentRequest::Take { target: TakeTarget::Session(id.clone()), client_ref: Some(cref(7)) };
    agent.do_send(request(&agent_conn, take));
    assert_eq!(answer(&mut agent_inbox, 7).await, Ok(Some(2)), "taken: assigned is seq 2");

    addr.do_send(Crash);
    assert_eq!(close_code(&mut inbox).await, 1011, "the customer is told to resume");
    assert_eq!(close_code(&mut agent_inbox).await, 1011, "the agent is told to resume");
    let lost_say = AgentRequest::InSession { session_id: id.clone(), cmd: AgentCmd::Say { text: Arc::from("lost?"), client_ref: Some(cref(8)) } };
    agent.do_send(request(&agent_conn, lost_say));
    assert!(matches!(answer(&mut agent_inbox, 8).await, Err(ActorError::Unavailable { .. })), "a frame for the dead session is answered");

    // The agent reconnects and resumes: the session comes back from storage.
    let (agent_conn, mut agent_inbox) = ConnHandle::channel(3, 64);
    agent.do_send(AttachAgentConn { conn: agent_conn.clone() });
    let resume = AgentRequest::Resume { session_id: id.clone(), last_seq: 2, client_ref: Some(cref(9)) };
    agent.do_send(request(&agent_conn, resume));
    assert_eq!(answer(&mut agent_inbox, 9).await, Ok(None), "the agent's resume is acked");

    // So does the customer; its next message reaches the agent at seq 3.
    let restored = deps.registry.send(FindSession { id: id.clone() }).await.expect("registry answers").expect("restored");
    let (conn, mut inbox) = ConnHandle::channel(4, 64);
    let resume_token = Arc::from(token.expect("live session event carries the token").as_ref());
    restored.do_send(AttachCustomer { conn: conn.clone(), resume_token, last_seq: 2, client_ref: Some(cref(10)) });
    assert_eq!(answer(&mut inbox, 10).await, Ok(None));
    restored.do_send(say(&conn, 11));
    assert_eq!(answer(&mut inbox, 11).await, Ok(Some(3)));
    loop {
        if let Outbound::Event(e) = next(&mut agent_inbox).await {
            if e.seq == 3 {
                assert_eq!(e.body.type_name(), "message");
                break;
            }
            assert!(e.seq < 3, "nothing after the message: {}", e.seq);
        }
    }
}

/// `take`: the taking agent's socket gets the stored session, `assigned`
/// last, then the ack, then live events; a take whose `assigned` is not
/// stored shows nothing of the session.
mod take_history {
    use super::*;
    use crate::agent::AgentActor;
    use crate::domain::{AgentInfo, AgentKind, Event, EventBody, SessionId, Seq};
    use crate::ports::{AppendBatch, EventStore, PortFuture, SessionSnapshot};
    use crate::session::Assign;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// How batches holding `assigned` fail: refused while `refuse` is set;
    /// or, once, stored and then reported failed (a connection lost during
    /// COMMIT) when `lie_once` is set.
    struct AssignFaults {
        inner: Arc<MemoryEventStore>,
        refuse: AtomicBool,
        lie_once: AtomicBool,
    }

    impl AssignFaults {
        fn new(refuse: bool, lie_once: bool) -> Arc<AssignFaults> {
            Arc::new(AssignFaults {
                inner: Arc::new(MemoryEventStore::new()),
                refuse: AtomicBool::new(refuse),
                lie_once: AtomicBool::new(lie_once),
            })
        }
    }

    impl EventStore for AssignFaults {
        fn append(&self, batch: AppendBatch) -> PortFuture<()> {
            let has = batch.events.iter().any(|e| matches!(e.event.body, EventBody::Assigned { .. }));
            if has && self.refuse.load(Ordering::SeqCst) {
                return Box::pin(std::future::ready(Err(crate::error::StoreError::Unavailable { what: "test" })));
            }
            let stored = self.inner.append(batch);
            if has && self.lie_once.swap(false, Ordering::SeqCst) {
                return Box::pin(async move {
                    let _ = stored.await;
                    Err(crate::error::StoreError::Unavailable { what: "test" })
                });
            }
            stored
        }
        fn load_session(&self, id: &SessionId) -> PortFuture<Option<SessionSnapshot>> {
            self.inner.load_session(id)
        }
        fn events_after(&self, id: &SessionId, after: Seq, limit: u32) -> PortFuture<Vec<Arc<Event>>> {
            self.inner.events_after(id, after, limit)
        }
        fn events_before(&self, id: &SessionId, before: Seq, limit: u32) -> PortFuture<Vec<Arc<Event>>> {
            self.inner.events_before(id, before, limit)
        }
        fn open_sessions(&self) -> PortFuture<Vec<SessionSnapshot>> {
            self.inner.open_sessions()
        }
    }

    /// The take was answered with an error but `assigned` is in the log:
    /// the customer goes back in line in the log too and can be taken.
    #[actix::test]
    async fn an_assignment_stored_but_reported_failed_leaves_the_customer_takeable() {
        let store = AssignFaults::new(false, true);
        let deps = deps(store.clone()).await;
        let (addr, _conn, mut customer_inbox, _id) = joined(&deps, 1).await;
        let (agent_addr, agent_conn, _agent_inbox, info) = agent(&deps);
        let first = addr.send(Assign { agent: info.clone(), agent_addr: agent_addr.clone(), conn: agent_conn.clone(), client_ref: None }).await;
        assert!(first.expect("answer").is_err());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let again = addr.send(Assign { agent: info, agent_addr, conn: agent_conn, client_ref: None }).await;
        let seq = again.expect("answer").expect("taken after the resync");
        // The log: session, assigned (stored), a system notice, assigned.
        assert_eq!(seq, 4);
        let mut kinds = Vec::new();
        while let Some(f) = customer_inbox.try_recv() {
            if let Outbound::Event(e) = f {
                kinds.push(format!("{}:{}", e.seq, e.body.type_name()));
            }
        }
        assert_eq!(kinds, ["2:assigned", "3:message", "4:assigned"], "{kinds:?}");
    }

    fn agent(deps: &Deps) -> (Addr<AgentActor>, ConnHandle, ConnInbox, AgentInfo) {
        let info = AgentInfo { id: Arc::from("a1"), name: Arc::from("A"), kind: AgentKind::Human };
        let (conn, inbox) = ConnHandle::channel(99, 64);
        let addr = AgentActor::new(deps.clone(), info.clone(), conn.clone()).start();
        (addr, conn, inbox, info)
    }

    /// What reached a socket, dashboards left out, as short labels.
    fn drain(inbox: &mut ConnInbox) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(f) = inbox.try_recv() {
            out.push(match f {
                Outbound::Event(e) => {
                    let token = matches!(&e.body, EventBody::Session { resume_token: Some(_), .. });
                    format!("event{}:{}{}", e.seq, e.body.type_name(), if token { "+TOKEN" } else { "" })
                }
                Outbound::Ack { seq, .. } => format!("ack{seq:?}"),
                Outbound::Error { error, .. } => format!("error:{error:?}"),
                Outbound::Dashboard(_) => continue,
                other => format!("{other:?}"),
            });
        }
        out
    }

    #[actix::test]
    async fn a_customer_message_stored_during_the_take_comes_after_the_ack() {
        let deps = deps(Arc::new(MemoryEventStore::new())).await;
        let (addr, conn, _inbox, _id) = joined(&deps, 1).await;
        let (agent_addr, agent_conn, mut agent_inbox, info) = agent(&deps);
        let taken = addr.send(Assign { agent: info, agent_addr, conn: agent_conn, client_ref: Some(cref(9)) });
        addr.do_send(say(&conn, 2)); // stored while `assigned` is, or right after
        assert_eq!(taken.await.expect("answer").expect("taken"), 2);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let got = drain(&mut agent_inbox);
        assert_eq!(got, ["event1:session", "event2:assigned", "ackSome(2)", "event3:message"], "{got:?}");
    }

    #[actix::test]
    async fn a_take_whose_assigned_is_not_stored_shows_nothing() {
        let store = AssignFaults::new(true, false);
        let deps = deps(store.clone()).await;
        let (addr, conn, _inbox, _id) = joined(&deps, 1).await;
        let (agent_addr, agent_conn, mut agent_inbox, info) = agent(&deps);
        addr.do_send(say(&conn, 2)); // in flight when Assign arrives
        let res = addr.send(Assign { agent: info.clone(), agent_addr: agent_addr.clone(), conn: agent_conn.clone(), client_ref: Some(cref(9)) }).await;
        assert!(res.expect("answer").is_err());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let got = drain(&mut agent_inbox);
        assert!(got.iter().all(|f| !f.starts_with("event") && !f.starts_with("ack")), "a failed take showed the session: {got:?}");

        // Storage back: the next take shows it once, from seq 1.
        store.refuse.store(false, Ordering::SeqCst);
        let mut seq = None;
        for _ in 0..50 {
            let res = addr.send(Assign { agent: info.clone(), agent_addr: agent_addr.clone(), conn: agent_conn.clone(), client_ref: Some(cref(10)) }).await;
            if let Ok(Ok(s)) = res {
                seq = Some(s);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let seq = seq.expect("taken once storage is back");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let got: Vec<String> = drain(&mut agent_inbox).into_iter().filter(|f| !f.starts_with("error")).collect();
        let mut want: Vec<String> = vec!["event1:session".into(), "event2:message".into()];
        want.push(format!("event{seq}:assigned"));
        want.push(format!("ackSome({seq})"));
        assert_eq!(got, want, "{got:?}");
    }
}

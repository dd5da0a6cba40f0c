//! Resuming after a disconnect (PROTOCOL.md, "The session stream"): exact
//! replay after `last_seq`, no gaps, no duplicates, then live; idempotent
//! re-sends; refusals; a waiting customer's place; an agent's grace period.
//!
//! Refs here are strings unique per test: a new `Client` numbers its refs
//! from 1 again, and a ref reused across connections is (rightly) answered
//! as the re-send of the old message.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{eventually, join, Backend, Client, Joined, Options, TestApp, DEADLINE};

// ---- helpers shared with durability.rs ---------------------------------------

/// A frame of the session stream (it has a `seq` and is not an answer).
pub(crate) fn is_event(v: &Value) -> bool {
    v.get("seq").is_some_and(Value::is_i64) && v["type"] != "ack" && v["type"] != "error"
}

pub(crate) fn seq_of(v: &Value) -> i64 {
    v["seq"].as_i64().unwrap_or_else(|| panic!("no seq in {v}"))
}

/// Sends `v` with the given ref and waits for its answer (`ack` or `error`).
pub(crate) async fn send_with_ref(c: &mut Client, mut v: Value, r: &str) -> Value {
    v["ref"] = json!(r);
    c.send(v).await;
    c.reply(json!(r)).await
}

/// A customer's `say`, which must be acked; returns the seq.
pub(crate) async fn say(c: &mut Client, text: &str, r: &str) -> i64 {
    let a = send_with_ref(c, json!({"type":"say","text":text}), r).await;
    assert_eq!(a["type"], "ack", "say {text:?}: {a}");
    seq_of(&a)
}

/// An agent's `say` in `sid`, which must be acked; returns the seq.
pub(crate) async fn agent_say(c: &mut Client, sid: &str, text: &str, r: &str) -> i64 {
    let a = send_with_ref(c, json!({"type":"say","session_id":sid,"text":text}), r).await;
    assert_eq!(a["type"], "ack", "agent say {text:?}: {a}");
    seq_of(&a)
}

/// The next `message` with this text (others stay buffered).
pub(crate) async fn message(c: &mut Client, text: &str) -> Value {
    let m = c.wait_for(&format!("message {text:?}"), |v| v["type"] == "message" && v["text"] == text).await;
    assert!(m["msg_id"].is_string() && m["at"].is_string(), "{m}");
    m
}

/// Reads frames in order until the stream event with seq `upto`; returns
/// the stream events read (in arrival order). Other frames (`queue`,
/// `dashboard`, answers) are kept in the client's buffer, in order.
pub(crate) async fn events_until(c: &mut Client, upto: i64) -> Vec<Value> {
    let mut events = Vec::new();
    let mut others = Vec::new();
    let until = Instant::now() + DEADLINE;
    loop {
        let left = until.checked_duration_since(Instant::now()).unwrap_or_default();
        let v = match c.buffered.pop_front() {
            Some(v) => v,
            None => match c.read(left).await {
                Some(v) => v,
                None => panic!("waiting for seq {upto}: got events {events:?}, others {others:?}; closed {:?}", c.closed),
            },
        };
        if is_event(&v) {
            let s = seq_of(&v);
            events.push(v);
            if s >= upto {
                break;
            }
        } else {
            others.push(v);
        }
    }
    for v in others.into_iter().rev() {
        c.buffered.push_front(v);
    }
    events
}

/// Every stored event of a session, through the events API (all pages).
pub(crate) async fn all_events(app: &TestApp, sid: &str, token: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let r = app.get(&format!("/api/sessions/{sid}/events?after={after}&limit=200"), Some(token)).await;
        assert_eq!(r.status(), 200, "events of {sid}");
        let body: Value = r.json().await.unwrap();
        out.extend(body["events"].as_array().unwrap().iter().cloned());
        match body["next_after"].as_i64() {
            Some(n) => after = n,
            None => return out,
        }
    }
}

/// The log is 1..n without gaps, of this session, with unique `msg_id`s.
pub(crate) fn assert_contiguous(sid: &str, events: &[Value]) {
    let seqs: Vec<i64> = events.iter().map(seq_of).collect();
    let want: Vec<i64> = (1..=events.len() as i64).collect();
    assert_eq!(seqs, want, "seqs 1..n, no gaps, no duplicates");
    let mut ids: Vec<&str> = events.iter().filter(|e| e["type"] == "message").map(|e| e["msg_id"].as_str().unwrap()).collect();
    let n = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n, "msg_ids are unique");
    for e in events {
        assert_eq!(e["session_id"], sid, "{e}");
    }
}

/// How often a message with `text` is in the log.
pub(crate) fn count_text(events: &[Value], text: &str) -> usize {
    events.iter().filter(|e| e["type"] == "message" && e["text"] == text).count()
}

/// What identifies a stream event, to compare a replay with the log.
pub(crate) fn key(e: &Value) -> Value {
    json!([e["type"], e["seq"], e["session_id"], e["from"], e["text"], e["msg_id"], e["kind"], e["data"], e["reason"]])
}

pub(crate) fn keys(events: &[Value]) -> Vec<Value> {
    events.iter().map(key).collect()
}

/// Opens `/ws` and resumes: the first frame is `resumed`, then the ack of
/// the resume's ref. The replay follows (not read here).
pub(crate) async fn resume(app: &TestApp, sid: &str, token: &str, last_seq: i64, r: &str) -> Client {
    let mut c = app.customer().await;
    c.send(json!({"type":"resume","session_id":sid,"resume_token":token,"last_seq":last_seq,"ref":r})).await;
    let first = c.recv().await;
    assert_eq!(first["type"], "resumed", "first answer to resume: {first}");
    assert_eq!(first["session_id"], sid, "{first}");
    let second = c.recv().await;
    assert_eq!((second["type"].as_str(), &second["ref"]), (Some("ack"), &json!(r)), "then the ack of the resume: {second}");
    c
}

/// Agent resume on a fresh `/admin/ws` connection: `resumed`, then its ack
/// (dashboards may come in between).
pub(crate) async fn agent_resume(app: &TestApp, token: &str, sid: &str, last_seq: i64, r: &str) -> Client {
    let mut a = app.agent_with_token(token).await;
    a.send(json!({"type":"resume","session_id":sid,"last_seq":last_seq,"ref":r})).await;
    let mut seen = Vec::new();
    loop {
        let v = a.recv().await;
        if v["type"] == "dashboard" {
            continue;
        }
        seen.push(v.clone());
        if v["type"] == "resumed" {
            assert_eq!(v["session_id"], sid, "{v}");
            break;
        }
        panic!("agent resume: expected `resumed` first, got {seen:?}");
    }
    loop {
        let v = a.recv().await;
        if v["type"] == "dashboard" {
            continue;
        }
        assert_eq!((v["type"].as_str(), &v["ref"]), (Some("ack"), &json!(r)), "then the ack of the resume: {v}");
        break;
    }
    a
}

/// An agent serving a customer of `support`.
pub(crate) struct Served {
    pub agent: Client,
    pub agent_token: String,
    pub cust: Joined,
    /// Seq of `assigned`.
    pub assigned: i64,
}

pub(crate) async fn served(app: &TestApp, agent_id: &str, name: &str) -> Served {
    let agent_token = app.admin_token(agent_id);
    let mut agent = app.agent_with_token(&agent_token).await;
    assert_eq!(agent.request(json!({"type":"available"})).await["type"], "ack");
    let mut cust = join(app, name, "support").await;
    let take = agent.request(json!({"type":"take","topic":"support"})).await;
    assert_eq!(take["type"], "ack", "{take}");
    assert_eq!(take["session_id"], cust.session_id.as_str(), "{take}");
    let assigned = cust.client.wait_type("assigned").await;
    assert_eq!(assigned["seq"], take["seq"]);
    agent.wait_type("assigned").await;
    Served { agent, agent_token, cust, assigned: seq_of(&assigned) }
}

fn grace(secs: u64) -> Options {
    Options { backend: Backend::Sqlite, env: vec![("DUET_AGENT_GRACE_S", secs.to_string())] }
}

// ---- the main resume test, on both backends ------------------------------------

async fn disconnect_and_resume(backend: Backend) {
    let app = TestApp::spawn_on(backend).await;
    let Served { mut agent, cust, assigned, .. } = served(&app, "ann", "Bob").await;
    let Joined { client: mut c0, session_id: sid, resume_token: token, .. } = cust;
    assert_eq!(assigned, 2);

    let s = say(&mut c0, "c1", "c1").await;
    assert_eq!(s, 3);
    assert_eq!(seq_of(&message(&mut agent, "c1").await), 3);
    let s = agent_say(&mut agent, &sid, "a1", "a1").await;
    assert_eq!(s, 4);
    assert_eq!(seq_of(&message(&mut c0, "a1").await), 4);
    let seen = 4; // the highest seq the customer has seen

    // The customer's network goes; the agent carries on.
    c0.drop_connection();
    for (i, text) in ["a2", "a3", "a4"].iter().enumerate() {
        assert_eq!(agent_say(&mut agent, &sid, text, text).await, seen + 1 + i as i64);
    }
    // A resume cut off halfway: sent, then the connection drops at once.
    let mut cut = app.customer().await;
    cut.send(json!({"type":"resume","session_id":sid,"resume_token":token,"last_seq":seen,"ref":"cut"})).await;
    cut.drop_connection();
    assert_eq!(agent_say(&mut agent, &sid, "a5", "a5").await, 8);

    let stored = all_events(&app, &sid, &token).await;
    assert_contiguous(&sid, &stored);
    assert_eq!(stored.len(), 8);
    let missed = &stored[seen as usize..];

    // Resume: exactly the events after `seen`, in order, then nothing old.
    let mut c1 = resume(&app, &sid, &token, seen, "r1").await;
    let replay = events_until(&mut c1, 8).await;
    assert_eq!(keys(&replay), keys(missed), "exact replay after last_seq {seen}");
    let texts: Vec<&str> = replay.iter().map(|e| e["text"].as_str().unwrap_or("")).collect();
    assert_eq!(texts, ["a2", "a3", "a4", "a5"]);
    c1.assert_none(Duration::from_millis(400), is_event).await;

    // Resume again (the first resumed socket still open): the same replay.
    let mut c2 = resume(&app, &sid, &token, seen, "r2").await;
    let replay2 = events_until(&mut c2, 8).await;
    assert_eq!(keys(&replay2), keys(missed), "the second resume replays the same");

    // Then live, on the newest connection only.
    assert_eq!(agent_say(&mut agent, &sid, "a6", "a6").await, 9);
    let live = events_until(&mut c2, 9).await;
    assert_eq!(live.len(), 1, "only the new event: {live:?}");
    assert_eq!((live[0]["text"].as_str(), seq_of(&live[0])), (Some("a6"), 9));
    c1.assert_none(Duration::from_millis(300), |v| v["type"] == "message" && v["text"] == "a6").await;
    assert_eq!(say(&mut c2, "c2", "c2").await, 10);
    let m = message(&mut agent, "c2").await;
    assert_eq!((seq_of(&m), m["from"].as_str()), (10, Some("customer")));

    // A resume from 0 replays the whole log, and no token comes back.
    let mut c3 = resume(&app, &sid, &token, 0, "r3").await;
    let whole = events_until(&mut c3, 10).await;
    let stored = all_events(&app, &sid, &token).await;
    assert_contiguous(&sid, &stored);
    assert_eq!(keys(&whole), keys(&stored));
    assert_eq!(whole[0]["type"], "session");
    assert!(whole[0].get("resume_token").is_none_or(Value::is_null), "a replayed session event has no token: {}", whole[0]);
    c3.assert_none(Duration::from_millis(300), is_event).await;
}

#[tokio::test]
async fn disconnect_and_resume_on_sqlite() {
    disconnect_and_resume(Backend::Sqlite).await;
}

#[tokio::test]
async fn disconnect_and_resume_on_postgres() {
    disconnect_and_resume(Backend::Postgres).await;
}

// ---- idempotent re-sends ---------------------------------------------------------

#[tokio::test]
async fn resent_refs_after_resume_are_acked_with_their_seq_and_stored_once() {
    let app = TestApp::spawn().await;
    let Served { mut agent, cust, .. } = served(&app, "ann", "Bob").await;
    let Joined { client: mut c0, session_id: sid, resume_token: token, .. } = cust;

    let s1 = say(&mut c0, "x-1", "k1").await;
    // Sent, and the connection is gone before the answer could be read.
    c0.send(json!({"type":"say","text":"x-2","ref":"k2"})).await;
    c0.drop_connection();

    let mut c1 = resume(&app, &sid, &token, s1, "r1").await;
    assert_eq!(say(&mut c1, "x-1", "k1").await, s1, "an acked ref keeps its seq");
    let s2 = say(&mut c1, "x-2", "k2").await;
    assert_eq!(say(&mut c1, "x-1", "k1").await, s1, "and again");
    let s3 = say(&mut c1, "x-3", "k3").await;
    assert_eq!(s3, s2.max(s1) + 1, "a new ref takes the next seq");
    // The same ref twice in a row, the second before the first is answered.
    c1.send(json!({"type":"say","text":"x-4","ref":"k4"})).await;
    c1.send(json!({"type":"say","text":"x-4","ref":"k4"})).await;
    let a = c1.reply(json!("k4")).await;
    let b = c1.reply(json!("k4")).await;
    assert_eq!((a["type"].as_str(), b["type"].as_str()), (Some("ack"), Some("ack")), "{a} {b}");
    assert_eq!(a["seq"], b["seq"]);
    assert_eq!(seq_of(&a), s3 + 1);

    let stored = all_events(&app, &sid, &token).await;
    assert_contiguous(&sid, &stored);
    for (text, seq) in [("x-1", s1), ("x-2", s2), ("x-3", s3), ("x-4", s3 + 1)] {
        assert_eq!(count_text(&stored, text), 1, "{text} is stored once: {stored:?}");
        assert_eq!(stored[seq as usize - 1]["text"], text);
    }
    assert_eq!(stored.len() as i64, s3 + 1);
    // The agent got each message once.
    agent.assert_none(Duration::from_millis(300), |_| false).await;
    let got: Vec<&Value> = agent.buffered.iter().filter(|v| v["type"] == "message").collect();
    let texts: Vec<&str> = got.iter().map(|v| v["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["x-1", "x-2", "x-3", "x-4"], "live to the agent once each");
}

/// A client that re-sends right after `resume`, without waiting for
/// `resumed`, is served in the order it sent: `resumed`, the replay, then
/// the acks (the acked ref with its old seq, the new one next). A frame
/// pipelined behind a refused resume is refused too, not taken elsewhere.
#[tokio::test]
async fn frames_sent_right_behind_a_resume_are_handled_after_it() {
    let app = TestApp::spawn().await;
    let Served { cust, .. } = served(&app, "pip", "Pipe").await;
    let Joined { client: mut c0, session_id: sid, resume_token: token, .. } = cust;
    let s1 = say(&mut c0, "p-1", "p1").await;
    c0.drop_connection();

    let mut c1 = app.customer().await;
    c1.send_all(&[
        json!({"type":"resume","session_id":sid,"resume_token":token,"last_seq":0,"ref":"r"}),
        json!({"type":"say","text":"p-1","ref":"p1"}),
        json!({"type":"say","text":"p-2","ref":"p2"}),
    ])
    .await;
    let mut order = Vec::new();
    while !order.iter().any(|v: &Value| v["ref"] == "p2") {
        let v = c1.recv().await;
        if v["type"] != "dashboard" && v["type"] != "queue" {
            order.push(v);
        }
    }
    let kinds: Vec<String> = order.iter().map(|v| format!("{}{}", v["type"].as_str().unwrap_or("?"), v["ref"].as_str().map(|r| format!(":{r}")).unwrap_or_default())).collect();
    assert_eq!(kinds.first().map(String::as_str), Some("resumed"), "{kinds:?}");
    let acks: Vec<&Value> = order.iter().filter(|v| v["ref"] == "p1" || v["ref"] == "p2").collect();
    assert!(acks.iter().all(|a| a["type"] == "ack"), "{kinds:?} {acks:?}");
    assert_eq!(seq_of(acks[0]), s1, "the acked ref keeps its seq");
    assert_eq!(seq_of(acks[1]), s1 + 1, "the new one is next");
    let replayed = order.iter().filter(|v| v["seq"].is_i64() && v["type"] != "ack").count() as i64;
    let before_acks = order.iter().position(|v| v["ref"] == "p1").expect("p1 answered");
    assert_eq!(replayed, s1, "seqs 1..={s1} replayed once: {kinds:?}");
    assert!(order[..before_acks].iter().filter(|v| v["seq"].is_i64() && v["type"] != "ack").count() as i64 == s1, "the replay comes before the acks: {kinds:?}");

    // Behind a wrong token: the say is refused, nothing is stored.
    let mut thief = app.customer().await;
    thief
        .send_all(&[
            json!({"type":"resume","session_id":sid,"resume_token":"wrong","last_seq":0,"ref":"t"}),
            json!({"type":"say","text":"stolen","ref":"t2"}),
        ])
        .await;
    assert_eq!(thief.reply(json!("t")).await["code"], "unauthorized");
    assert_eq!(thief.reply(json!("t2")).await["type"], "error");
    let stored = all_events(&app, &sid, &token).await;
    assert_contiguous(&sid, &stored);
    assert_eq!((count_text(&stored, "p-1"), count_text(&stored, "p-2"), count_text(&stored, "stolen")), (1, 1, 0));
}

// ---- refusals ----------------------------------------------------------------------

#[tokio::test]
async fn resume_refusals_wrong_token_unknown_and_ended() {
    let app = TestApp::spawn().await;
    let Served { mut agent, cust, .. } = served(&app, "ann", "Bob").await;
    let Joined { client: mut c0, session_id: sid, resume_token: token, .. } = cust;

    // Wrong token: unauthorized, nothing replayed, the real customer undisturbed.
    let mut thief = app.customer().await;
    let e = send_with_ref(&mut thief, json!({"type":"resume","session_id":sid,"resume_token":"not-the-token","last_seq":0}), "w").await;
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("unauthorized")), "{e}");
    thief.assert_none(Duration::from_millis(300), |v| v["type"] == "resumed" || is_event(v)).await;
    let r = thief.request(json!({"type":"say","text":"hijack"})).await;
    assert_eq!(r["type"], "error", "a refused resume attaches nothing: {r}");
    let s = agent_say(&mut agent, &sid, "still yours", "a1").await;
    assert_eq!(seq_of(&message(&mut c0, "still yours").await), s);
    // Another session's token is just as wrong.
    let other = join(&app, "Cy", "support").await;
    let e = send_with_ref(&mut thief, json!({"type":"resume","session_id":sid,"resume_token":other.resume_token,"last_seq":0}), "w2").await;
    assert_eq!(e["code"], "unauthorized", "{e}");

    // Unknown session.
    let mut c = app.customer().await;
    let e = send_with_ref(&mut c, json!({"type":"resume","session_id":"no-such-session","resume_token":token,"last_seq":0}), "u").await;
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("not_found")), "{e}");

    // Ended (the customer left): not_found, with the right token.
    let left = send_with_ref(&mut c0, json!({"type":"leave"}), "bye").await;
    assert_eq!(left["type"], "ack", "{left}");
    c0.wait_type("ended").await;
    let mut c = app.customer().await;
    let e = send_with_ref(&mut c, json!({"type":"resume","session_id":sid,"resume_token":token,"last_seq":0}), "e").await;
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("not_found")), "{e}");
    c.assert_none(Duration::from_millis(300), |v| v["type"] == "resumed" || is_event(v)).await;

    // Ended by the agent: not_found as well.
    let take = agent.request(json!({"type":"take","topic":"support"})).await;
    assert_eq!(take["session_id"], other.session_id.as_str(), "{take}");
    let end = agent.request(json!({"type":"end","session_id":other.session_id})).await;
    assert_eq!(end["type"], "ack", "{end}");
    let mut c = app.customer().await;
    let e = send_with_ref(&mut c, json!({"type":"resume","session_id":other.session_id,"resume_token":other.resume_token,"last_seq":0}), "e2").await;
    assert_eq!(e["code"], "not_found", "{e}");
}

/// A refused resume leaves the socket free: the client may `join` anew on it.
async fn join_after_refused_resume(app: &TestApp, what: &str, sid: &str, token: &str, code: &str) {
    let mut c = app.customer().await;
    let e = send_with_ref(&mut c, json!({"type":"resume","session_id":sid,"resume_token":token,"last_seq":0}), "r").await;
    assert_eq!(e["code"], code, "{what}: {e}");
    let j = send_with_ref(&mut c, json!({"type":"join","name":"Bob","topic":"support"}), "j").await;
    assert_eq!(j["type"], "ack", "{what}: join after a refused resume on the same socket: {j}");
    let s = c.wait_type("session").await;
    assert_ne!(s["session_id"], sid, "a new session");
}

#[tokio::test]
async fn join_on_the_socket_after_an_unknown_session_resume() {
    let app = TestApp::spawn().await;
    join_after_refused_resume(&app, "unknown", "no-such-session", "x", "not_found").await;
}

// (A refused resume of an *ended* session leaving the socket unable to
// `join` is covered in protocol_edges.rs.)

#[tokio::test]
async fn join_on_the_socket_after_a_wrong_token_resume() {
    let app = TestApp::spawn().await;
    let other = join(&app, "Cy", "support").await;
    join_after_refused_resume(&app, "wrong token", &other.session_id, "not-the-token", "unauthorized").await;
}

/// A refused resume changes nothing: the socket stays in its own session.
#[tokio::test]
async fn refused_resume_of_another_session_keeps_the_socket_in_its_own() {
    let app = TestApp::spawn().await;
    let Served { mut agent, cust, .. } = served(&app, "ann", "Bob").await;
    let Joined { client: mut c, session_id: sid, .. } = cust;
    let other = join(&app, "Cy", "support").await;
    let e = send_with_ref(&mut c, json!({"type":"resume","session_id":other.session_id,"resume_token":"wrong","last_seq":0}), "r").await;
    assert_eq!(e["code"], "unauthorized", "{e}");
    let a = send_with_ref(&mut c, json!({"type":"say","text":"still here"}), "s1").await;
    assert_eq!(a["type"], "ack", "the socket's own session still takes its messages: {a}");
    message(&mut agent, "still here").await;
    agent_say(&mut agent, &sid, "and you get mine", "a1").await;
    message(&mut c, "and you get mine").await;
}

// ---- a waiting customer ------------------------------------------------------------

#[tokio::test]
async fn waiting_customer_resumes_in_its_place() {
    let app = TestApp::spawn().await;
    let admin = app.admin_token("root");
    let mut a = join(&app, "A", "support").await;
    let b = join(&app, "B", "support").await;
    let mut c = join(&app, "C", "support").await;
    assert_eq!((a.position, b.position, c.position), (1, 2, 3));
    let Joined { client: b0, session_id: bid, resume_token: btoken, .. } = b;
    b0.drop_connection();

    // After `resumed` (nothing to replay past seq 1) comes the current place.
    let mut b1 = resume(&app, &bid, &btoken, 1, "r1").await;
    let q = b1.wait_type("queue").await;
    assert!(b1.buffered.iter().all(|v| !is_event(v)), "nothing replayed: {:?}", b1.buffered);
    assert_eq!((q["position"].as_u64(), q["waiting"].as_u64()), (Some(2), Some(3)), "{q}");
    assert!(q["eta_s"].is_u64(), "{q}");

    let order = |d: &Value| -> Vec<String> {
        d["queues"][0]["waiting"].as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap().to_owned()).collect()
    };
    let dash: Value = app.get("/api/queues", Some(&admin)).await.json().await.unwrap();
    assert_eq!(order(&dash), ["A", "B", "C"], "{dash}");

    // From 0: the `session` event is replayed, without the token, then `queue`.
    drop(b1);
    let mut b2 = resume(&app, &bid, &btoken, 0, "r2").await;
    let replay = events_until(&mut b2, 1).await;
    assert_eq!(replay[0]["type"], "session", "{replay:?}");
    assert!(replay[0].get("resume_token").is_none_or(Value::is_null), "{}", replay[0]);
    let q = b2.wait_type("queue").await;
    assert_eq!(q["position"], 2, "{q}");

    // The queue moves on with B in it.
    let mut agent = app.agent("ann").await;
    assert_eq!(agent.request(json!({"type":"available"})).await["type"], "ack");
    let t = agent.request(json!({"type":"take","topic":"support"})).await;
    assert_eq!(t["session_id"], a.session_id.as_str(), "{t}");
    a.client.wait_type("assigned").await;
    b2.wait_for("B at 1", |v| v["type"] == "queue" && v["position"] == 1).await;
    c.client.wait_for("C at 2", |v| v["type"] == "queue" && v["position"] == 2).await;
    let end = agent.request(json!({"type":"end","session_id":a.session_id})).await;
    assert_eq!(end["type"], "ack", "{end}");
    let t = agent.request(json!({"type":"take","topic":"support"})).await;
    assert_eq!(t["session_id"], bid.as_str(), "{t}");
    let assigned = b2.wait_type("assigned").await;
    assert_eq!(assigned["agent"]["id"], "ann");
}

// ---- agents ------------------------------------------------------------------------

#[tokio::test]
async fn agent_reconnects_within_grace_and_gets_what_it_missed() {
    let app = TestApp::spawn_with(grace(2)).await;
    let Served { agent: mut a0, agent_token, cust, .. } = served(&app, "ann", "Bob").await;
    let Joined { client: mut c, session_id: sid, resume_token: token, .. } = cust;

    assert_eq!(say(&mut c, "c1", "c1").await, 3);
    assert_eq!(seq_of(&message(&mut a0, "c1").await), 3);
    let s = agent_say(&mut a0, &sid, "a1", "ak1").await;
    assert_eq!(s, 4);
    message(&mut c, "a1").await;
    let agent_seen = 4;

    a0.drop_connection();
    let dropped = Instant::now();
    let m1 = say(&mut c, "c2", "c2").await;
    let m2 = say(&mut c, "c3", "c3").await;
    assert_eq!((m1, m2), (5, 6));

    let mut a1 = agent_resume(&app, &agent_token, &sid, agent_seen, "ar").await;
    let replay = events_until(&mut a1, 6).await;
    let stored = all_events(&app, &sid, &token).await;
    assert_eq!(keys(&replay), keys(&stored[4..6]), "exactly what the agent missed");
    assert!(replay.iter().all(|e| e["from"] == "customer"), "{replay:?}");

    // Live again, both ways; the agent's old ref is still its old message.
    assert_eq!(say(&mut c, "c4", "c4").await, 7);
    let live = events_until(&mut a1, 7).await;
    assert_eq!(keys(&live), vec![key(&all_events(&app, &sid, &token).await[6])]);
    assert_eq!(agent_say(&mut a1, &sid, "a1", "ak1").await, 4, "a re-sent agent ref keeps its seq");
    assert_eq!(agent_say(&mut a1, &sid, "a2", "ak2").await, 8);
    assert_eq!(seq_of(&message(&mut c, "a2").await), 8);

    // The grace period passes: the customer is not sent back to the queue.
    let past_grace = Duration::from_secs(2) + Duration::from_millis(1500);
    let left = past_grace.saturating_sub(dropped.elapsed());
    c.assert_none(left, |v| v["type"] == "queue" || v["from"] == "system" || v["type"] == "ended").await;
    assert_eq!(agent_say(&mut a1, &sid, "a3", "ak3").await, 9);
    assert_eq!(seq_of(&message(&mut c, "a3").await), 9);
    assert!(c.buffered.iter().all(|v| v["text"] != "a1"), "no duplicate of a1: {:?}", c.buffered);

    let stored = all_events(&app, &sid, &token).await;
    assert_contiguous(&sid, &stored);
    assert_eq!(count_text(&stored, "a1"), 1);
    assert_eq!(stored.len(), 9);
}

#[tokio::test]
async fn agent_lost_after_grace_puts_customer_back_at_the_head() {
    let app = TestApp::spawn_with(grace(2)).await;
    let Served { agent: a0, cust, .. } = served(&app, "ann", "Bob").await;
    let Joined { client: mut x, session_id: xid, resume_token: xtoken, .. } = cust;
    let mut y = join(&app, "Yan", "support").await;
    assert_eq!(y.position, 1);

    a0.drop_connection();
    let dropped = Instant::now();
    // Nothing within the grace period...
    x.assert_none(Duration::from_millis(1200), |v| v["type"] == "queue" || v["type"] == "message").await;
    // ...then a system notice in the stream, then the head of the queue.
    let mut order = Vec::new();
    let queue = loop {
        let v = x.recv().await;
        order.push(v["type"].as_str().unwrap_or("").to_owned());
        if v["type"] == "queue" {
            break v;
        }
        if v["type"] == "message" {
            assert_eq!(v["from"], "system", "{v}");
            assert!(v["text"].as_str().is_some_and(|t| !t.is_empty()) && v["msg_id"].is_string(), "{v}");
            assert_eq!(seq_of(&v), 3, "the notice is the next event: {v}");
        }
    };
    assert!(dropped.elapsed() >= Duration::from_millis(1500), "not before the grace period: {:?}", dropped.elapsed());
    assert_eq!(order.first().map(String::as_str), Some("message"), "the notice comes first: {order:?}");
    assert_eq!(queue["position"], 1, "back at the head: {queue}");
    y.client.wait_for("Yan moves to 2", |v| v["type"] == "queue" && v["position"] == 2).await;

    // The next agent gets Bob, not Yan, who joined earlier.
    let mut b = app.agent("bea").await;
    assert_eq!(b.request(json!({"type":"available"})).await["type"], "ack");
    let t = b.request(json!({"type":"take","topic":"support"})).await;
    assert_eq!(t["session_id"], xid.as_str(), "{t}");
    let assigned = x.wait_type("assigned").await;
    assert_eq!(assigned["agent"]["id"], "bea");
    let stored = all_events(&app, &xid, &xtoken).await;
    assert_contiguous(&xid, &stored);
    let types: Vec<&str> = stored.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["session", "assigned", "message", "assigned"], "{stored:?}");
    assert_eq!(stored[2]["from"], "system");
}

/// "No resume within DUET_AGENT_GRACE_S": an agent that signs in again but
/// does not resume its session receives nothing of it, so the grace period
/// runs on; whether its old socket was lost first or is replaced by the new
/// one. Then the customer is back at the head of the queue, and the agent's
/// new socket is free to take again.
#[tokio::test]
async fn an_agent_that_reconnects_without_resuming_loses_its_customer_after_the_grace() {
    let app = TestApp::spawn_with(grace(1)).await;
    for lost_first in [true, false] {
        let agent_id = if lost_first { "ann" } else { "bea" };
        let Served { agent: a0, agent_token, cust, .. } = served(&app, agent_id, "Bob").await;
        let Joined { client: mut x, session_id: xid, .. } = cust;
        let mut a0 = if lost_first {
            a0.drop_connection();
            None
        } else {
            Some(a0)
        };
        let mut a1 = app.agent_with_token(&agent_token).await;
        if let Some(old) = a0.as_mut() {
            assert_eq!(old.wait_closed(Duration::from_secs(5)).await, Some(4001), "the old socket is replaced");
        }
        let queue = x.wait_type("queue").await;
        assert_eq!(queue["position"], 1, "back at the head ({agent_id}): {queue}");
        let e = send_with_ref(&mut a1, json!({"type":"say","session_id":xid,"text":"still here?"}), "late").await;
        assert_eq!(e["code"], "forbidden", "no longer served by {agent_id}: {e}");
        assert_eq!(a1.request(json!({"type":"available"})).await["type"], "ack");
        let t = a1.request(json!({"type":"take","topic":"support"})).await;
        assert_eq!(t["session_id"], xid.as_str(), "the agent may take again: {t}");
        let e = send_with_ref(&mut a1, json!({"type":"end","session_id":xid}), "end").await;
        assert_eq!(e["type"], "ack", "{e}");
    }
}

/// `queue.waiting` is the queue's length (PROTOCOL.md). A customer put back
/// at the head while another waits must never be told that one waits.
#[tokio::test]
async fn agent_lost_queue_frame_counts_everyone_waiting() {
    let app = TestApp::spawn_with(grace(1)).await;
    let Served { agent: a0, cust, .. } = served(&app, "ann", "Bob").await;
    let Joined { client: mut x, .. } = cust;
    let _y = join(&app, "Yan", "support").await;
    a0.drop_connection();
    let q = x.wait_type("queue").await;
    assert_eq!((q["position"].as_u64(), q["waiting"].as_u64()), (Some(1), Some(2)), "{q}");
    // Every later update says the same.
    let until = Instant::now() + Duration::from_millis(800);
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        if let Some(v) = x.read(left).await {
            if v["type"] == "queue" {
                assert_eq!(v["waiting"], 2, "{v}");
            }
        }
    }
}

#[tokio::test]
async fn agent_resume_is_refused_for_a_session_it_does_not_serve() {
    let app = TestApp::spawn().await;
    let Served { cust, .. } = served(&app, "ann", "Bob").await;
    let other = app.admin_token("bea");
    let mut b = app.agent_with_token(&other).await;
    let e = send_with_ref(&mut b, json!({"type":"resume","session_id":cust.session_id,"last_seq":0}), "r").await;
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("forbidden")), "{e}");
    b.assert_none(Duration::from_millis(300), |v| v["type"] == "resumed" || is_event(v)).await;
    let e = send_with_ref(&mut b, json!({"type":"resume","session_id":"no-such-session","last_seq":0}), "r2").await;
    assert_eq!(e["code"], "not_found", "{e}");
}

/// Polls `/ready` until it is 200.
pub(crate) async fn wait_ready(app: &TestApp) {
    eventually("ready", || async move {
        let r = app.get("/ready", None).await;
        (r.status() == 200).then_some(())
    })
    .await;
}

//! Agents racing for customers: never two agents for one customer
//! (PROTOCOL.md, `take`), and an agent acts only in the session it serves.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{join, Backend, Client, TestApp};

const ROUNDS: usize = 50;

/// `join` on an open socket (the previous session there has ended): the new
/// session id, after `session` (seq 1), `queue` and the ack.
async fn join_on(c: &mut Client, name: &str, topic: &str) -> String {
    c.buffered.clear();
    let r = c.send_ref(json!({"type":"join","name":name,"topic":topic})).await;
    let s = c.wait_type("session").await;
    assert_eq!(s["seq"], 1, "{s}");
    let sid = s["session_id"].as_str().expect("session_id").to_owned();
    // Once `queue` arrived the customer is in the queue.
    c.wait_for("queue", |v| v["type"] == "queue" && v["session_id"] == sid.as_str()).await;
    let ack = c.reply(json!(r)).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["session_id"], sid.as_str());
    sid
}

fn about(v: &Value, sid: &str) -> bool {
    v["type"] != "dashboard" && v["session_id"] == sid
}

/// Two agents race with `take` built by `take(sid)`, for one waiting
/// customer, round after round on one app; the loser gets `loser_code`.
async fn race(backend: Backend, by_session: bool, loser_code: &str) {
    let app = TestApp::spawn_on(backend).await;
    let ids = ["racer-a", "racer-b"];
    let mut agents = [app.agent(ids[0]).await, app.agent(ids[1]).await];
    for a in agents.iter_mut() {
        assert_eq!(a.request(json!({"type":"available"})).await["type"], "ack");
    }
    let mut customer = app.customer().await;
    let mut wins = [0usize; 2];
    for round in 0..ROUNDS {
        let sid = join_on(&mut customer, &format!("Customer {round}"), "race").await;
        let take = if by_session { json!({"type":"take","session_id":sid}) } else { json!({"type":"take","topic":"race"}) };
        // Both takes leave back-to-back; who sends first alternates.
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut refs = [0u64; 2];
        for &i in &order {
            refs[i] = agents[i].send_ref(take.clone()).await;
        }
        let mut replies = Vec::new();
        for i in 0..2 {
            replies.push(agents[i].reply(json!(refs[i])).await);
        }
        let acks: Vec<usize> = (0..2).filter(|&i| replies[i]["type"] == "ack").collect();
        assert_eq!(acks.len(), 1, "round {round}: exactly one take succeeds: {replies:?}");
        let (w, l) = (acks[0], 1 - acks[0]);
        wins[w] += 1;
        assert_eq!(replies[w]["session_id"], sid.as_str(), "round {round}: {}", replies[w]);
        assert_eq!(replies[l]["type"], "error", "round {round}: {}", replies[l]);
        assert_eq!(replies[l]["code"], loser_code, "round {round}: {}", replies[l]);

        // The winner serves it: they talk, then the winner ends it.
        let hi = agents[w].request(json!({"type":"say","session_id":sid,"text":format!("round {round}")})).await;
        assert_eq!(hi["type"], "ack", "round {round}: {hi}");
        let m = customer.wait_type("message").await;
        assert_eq!(m["seq"], hi["seq"]);
        let end = agents[w].request(json!({"type":"end","session_id":sid})).await;
        assert_eq!(end["type"], "ack", "round {round}: {end}");
        let ended = customer.wait_type("ended").await;
        assert_eq!(ended["reason"], "agent_ended");
        agents[w].wait_for("ended", |v| v["type"] == "ended" && v["session_id"] == sid.as_str()).await;

        // The customer saw exactly one `assigned`, naming the winner.
        let assigned: Vec<&Value> = customer.buffered.iter().filter(|v| v["type"] == "assigned").collect();
        assert_eq!(assigned.len(), 1, "round {round}: {assigned:?}");
        assert_eq!(assigned[0]["agent"]["id"], ids[w], "round {round}: {}", assigned[0]);
        assert_eq!(assigned[0]["seq"], replies[w]["seq"], "round {round}: the take ack carries the seq of `assigned`");
        // The loser got nothing of this session.
        let leaked: Vec<&Value> = agents[l].buffered.iter().filter(|v| about(v, &sid)).collect();
        assert!(leaked.is_empty(), "round {round}: the losing agent got {leaked:?}");
        // Each stored event reached the winner once, in order, from seq 1.
        let seqs: Vec<u64> = agents[w].buffered.iter().filter(|v| about(v, &sid)).filter_map(|v| v["seq"].as_u64()).collect();
        assert!(seqs.iter().enumerate().all(|(i, s)| *s == i as u64 + 1), "round {round}: the winner's seqs {seqs:?}");
        for a in agents.iter_mut() {
            a.buffered.retain(|v| v["type"] != "dashboard");
            // The winner read the session from its start (`session`), then
            // `assigned`, then `ended`.
            assert!(a.buffered.iter().all(|v| ["session", "assigned", "ended"].contains(&v["type"].as_str().unwrap_or(""))), "round {round}: {:?}", a.buffered);
            a.buffered.clear();
        }
    }
    eprintln!("{ROUNDS} rounds: {} won {}, {} won {}", ids[0], wins[0], ids[1], wins[1]);
}

/// The loser asked while the customer was still waiting: `conflict`, as
/// for a given session (an empty queue asked later is `not_found`, below).
#[tokio::test]
async fn two_agents_racing_for_the_next_in_line_one_wins_the_other_is_conflict() {
    race(Backend::Sqlite, false, "conflict").await;
}

#[tokio::test]
async fn two_agents_racing_for_one_session_one_wins_the_other_is_conflict() {
    race(Backend::Postgres, true, "conflict").await;
}

#[tokio::test]
async fn an_agent_serving_a_customer_cannot_take_another() {
    let app = TestApp::spawn().await;
    let mut ann = app.agent("busy-ann").await;
    let mut bob = app.agent("busy-bob").await;
    let mut first = join(&app, "First", "support").await;
    let mut second = join(&app, "Second", "support").await;
    let t = ann.request(json!({"type":"take","topic":"support"})).await;
    assert_eq!(t["session_id"], first.session_id.as_str(), "{t}");
    first.client.wait_type("assigned").await;

    let e = ann.request(json!({"type":"take","topic":"support"})).await;
    assert_eq!(e["code"], "conflict", "take next while serving: {e}");
    let e = ann.request(json!({"type":"take","session_id":second.session_id})).await;
    assert_eq!(e["code"], "conflict", "take a given customer while serving: {e}");
    // Ann still serves the first customer.
    let hi = ann.request(json!({"type":"say","session_id":first.session_id,"text":"still yours"})).await;
    assert_eq!(hi["type"], "ack", "{hi}");
    first.client.wait_for("message", |v| v["type"] == "message" && v["text"] == "still yours").await;
    // The second customer is still waiting, untouched.
    second.client.assert_none(Duration::from_millis(300), |v| v["type"] == "assigned").await;
    let t = bob.request(json!({"type":"take","session_id":second.session_id})).await;
    assert_eq!(t["type"], "ack", "{t}");
    let assigned = second.client.wait_type("assigned").await;
    assert_eq!(assigned["agent"]["id"], "busy-bob");
    second.client.assert_none(Duration::from_millis(300), |v| v["type"] == "assigned").await;

    // Nobody waits now, and some sessions do not exist.
    let mut cy = app.agent("busy-cy").await;
    let e = cy.request(json!({"type":"take","topic":"support"})).await;
    assert_eq!(e["code"], "not_found", "empty queue: {e}");
    let e = cy.request(json!({"type":"take","session_id":"no-such-session"})).await;
    assert_eq!(e["code"], "not_found", "unknown session: {e}");
    let e = cy.request(json!({"type":"take","session_id":first.session_id})).await;
    assert_eq!(e["code"], "conflict", "a customer being served: {e}");

    // Once Ann ends, she may take again.
    let end = ann.request(json!({"type":"end","session_id":first.session_id})).await;
    assert_eq!(end["type"], "ack", "{end}");
    // The ended session is `not_found` for its agent and for a taker, at
    // once (it still lingers in the node's memory then).
    for frame in [
        json!({"type":"say","session_id":first.session_id,"text":"too late"}),
        json!({"type":"rtc","session_id":first.session_id,"kind":"offer","data":{"sdp":"x"}}),
        json!({"type":"end","session_id":first.session_id}),
    ] {
        let e = ann.request(frame.clone()).await;
        assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("not_found")), "{frame} → {e}");
    }
    let e = cy.request(json!({"type":"take","session_id":first.session_id})).await;
    assert_eq!(e["code"], "not_found", "take an ended session: {e}");
    let third = join(&app, "Third", "support").await;
    let t = ann.request(json!({"type":"take","topic":"support"})).await;
    assert_eq!(t["session_id"], third.session_id.as_str(), "{t}");
}

#[tokio::test]
async fn an_agent_cannot_act_in_a_session_it_does_not_serve() {
    let app = TestApp::spawn().await;
    let mut ann = app.agent("own-ann").await;
    let mut bob = app.agent("own-bob").await;
    let mut idle = app.agent("own-idle").await;
    let mut one = join(&app, "One", "support").await;
    let mut two = join(&app, "Two", "support").await;
    assert_eq!(ann.request(json!({"type":"take","session_id":one.session_id})).await["type"], "ack");
    assert_eq!(bob.request(json!({"type":"take","session_id":two.session_id})).await["type"], "ack");
    one.client.wait_type("assigned").await;
    two.client.wait_type("assigned").await;

    let foreign = two.session_id.clone();
    for (who, agent) in [("ann", &mut ann), ("idle", &mut idle)] {
        for frame in [
            json!({"type":"say","session_id":foreign,"text":"not yours"}),
            json!({"type":"rtc","session_id":foreign,"kind":"offer","data":{"sdp":"x"}}),
            json!({"type":"end","session_id":foreign}),
        ] {
            let e = agent.request(frame.clone()).await;
            assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("forbidden")), "{who}: {frame} → {e}");
        }
        agent.send(json!({"type":"typing","session_id":foreign,"on":true})).await;
    }
    // Nothing of it reached the customer; Bob still serves it.
    two.client
        .assert_none(Duration::from_millis(300), |v| ["message", "rtc", "ended", "typing"].contains(&v["type"].as_str().unwrap_or("")))
        .await;
    let ok = bob.request(json!({"type":"say","session_id":foreign,"text":"I am yours"})).await;
    assert_eq!(ok["type"], "ack", "{ok}");
    let m = two.client.wait_type("message").await;
    assert_eq!((m["text"].as_str(), m["seq"].as_i64()), (Some("I am yours"), ok["seq"].as_i64()));
    // And Ann's own session is unaffected.
    let mine = ann.request(json!({"type":"say","session_id":one.session_id,"text":"mine"})).await;
    assert_eq!(mine["type"], "ack", "{mine}");
    one.client.wait_for("message", |v| v["type"] == "message" && v["text"] == "mine").await;
}

/// An agent is free the moment it reads `ended`, whoever ended the
/// session: a `take` sent at once gets the next customer, round after round.
#[tokio::test]
async fn an_agent_that_reads_ended_takes_the_next_customer_at_once() {
    let app = TestApp::spawn().await;
    let mut agent = app.agent("quick-ann").await;
    assert_eq!(agent.request(json!({"type":"available"})).await["type"], "ack");
    let mut served = join(&app, "First", "quick").await;
    assert_eq!(agent.request(json!({"type":"take","topic":"quick"})).await["type"], "ack");
    for round in 0..20 {
        let next = join(&app, &format!("Next {round}"), "quick").await;
        let sid = served.session_id.clone();
        // Odd rounds the customer leaves, even rounds the agent ends.
        if round % 2 == 1 {
            assert_eq!(served.client.request(json!({"type":"leave"})).await["type"], "ack");
            agent.wait_for("ended", |v| v["type"] == "ended" && v["session_id"] == sid.as_str()).await;
        } else {
            assert_eq!(agent.request(json!({"type":"end","session_id":sid})).await["type"], "ack");
        }
        let t = agent.request(json!({"type":"take","topic":"quick"})).await;
        assert_eq!((t["type"].as_str(), t["session_id"].as_str()), (Some("ack"), Some(next.session_id.as_str())), "round {round}: {t}");
        agent.buffered.clear();
        served = next;
    }
}

/// A customer's `leave` and an agent's `take` of that session, sent
/// together: either the take wins (`ack`, and `assigned` is in the stream)
/// or the session ended first and the take is `not_found`, never
/// `conflict`, which says another agent got the customer. Round after
/// round, on PostgreSQL (whose slower commit leaves `ended` unstored
/// longest).
#[tokio::test]
async fn a_take_racing_the_customers_leave_is_won_or_not_found() {
    let app = TestApp::spawn_on(Backend::Postgres).await;
    let mut agent = app.agent("leave-racer").await;
    assert_eq!(agent.request(json!({"type":"available"})).await["type"], "ack");
    let mut customer = app.customer().await;
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    for round in 0..20 {
        let sid = join_on(&mut customer, &format!("Leaver {round}"), "leaving").await;
        let leave = customer.send_ref(json!({"type":"leave"})).await;
        let take = agent.send_ref(json!({"type":"take","session_id":sid})).await;
        let taken = agent.reply(json!(take)).await;
        let left = customer.reply(json!(leave)).await;
        assert_eq!(left["type"], "ack", "round {round}: the customer may always leave: {left}");
        let outcome = if taken["type"] == "ack" { "taken".to_owned() } else { taken["code"].as_str().unwrap_or("?").to_owned() };
        assert!(outcome == "taken" || outcome == "not_found", "round {round}: {taken}");
        *outcomes.entry(outcome).or_default() += 1;
        customer.wait_for("ended", |v| v["type"] == "ended" && v["session_id"] == sid.as_str()).await;
        if taken["type"] == "ack" {
            // The agent served it until the customer left: free again.
            agent.wait_for("ended", |v| v["type"] == "ended" && v["session_id"] == sid.as_str()).await;
        }
    }
    eprintln!("take racing leave: {outcomes:?}");
}

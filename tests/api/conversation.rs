//! A whole conversation, on SQLite and on PostgreSQL.

use serde_json::json;

use crate::protocol_edges::metric;
use crate::support::{eventually, join, Backend, TestApp};

async fn whole_conversation(backend: Backend) {
    let app = TestApp::spawn_on(backend).await;
    let mut agent = app.agent("ann").await;
    let dash = agent.wait_type("dashboard").await;
    assert!(dash["queues"].is_array() && dash["agents"].is_array(), "{dash}");
    assert_eq!(agent.request(json!({"type":"available"})).await["type"], "ack");

    let mut first = join(&app, "Bob", "support").await;
    let mut second = join(&app, "Cy", "support").await;
    assert_eq!(first.position, 1);
    assert_eq!(second.position, 2);

    let take = agent.request(json!({"type":"take","topic":"support"})).await;
    assert_eq!(take["type"], "ack", "{take}");
    assert_eq!(take["session_id"], first.session_id.as_str());
    let assigned = first.client.wait_type("assigned").await;
    assert_eq!(assigned["agent"]["id"], "ann");
    assert_eq!(assigned["agent"]["kind"], "human");
    assert_eq!(assigned["seq"], take["seq"]);
    let agent_assigned = agent.wait_type("assigned").await;
    assert_eq!(agent_assigned["session_id"], first.session_id.as_str());

    // The second customer moves up to position 1.
    let q = second.client.wait_for("position 1", |v| v["type"] == "queue" && v["position"] == 1).await;
    assert_eq!(q["waiting"], 1);

    // Chat both ways, acked with consecutive seqs.
    let a = first.client.request(json!({"type":"say","text":"hello, I need help"})).await;
    assert_eq!(a["type"], "ack", "{a}");
    let m = agent.wait_type("message").await;
    assert_eq!(m["from"], "customer");
    assert_eq!(m["text"], "hello, I need help");
    assert_eq!(m["seq"], a["seq"]);
    assert_eq!(m["session_id"], first.session_id.as_str());
    assert!(m["msg_id"].is_string() && m["at"].is_string(), "{m}");

    let b = agent.request(json!({"type":"say","session_id":first.session_id,"text":"hi Bob"})).await;
    assert_eq!(b["seq"].as_i64(), a["seq"].as_i64().map(|s| s + 1));
    let m = first.client.wait_type("message").await;
    assert_eq!((m["from"].as_str(), m["text"].as_str()), (Some("agent"), Some("hi Bob")));

    // Typing is relayed, not stored.
    first.client.send(json!({"type":"typing","on":true})).await;
    let t = agent.wait_type("typing").await;
    assert_eq!((t["from"].as_str(), t["on"].as_bool()), (Some("customer"), Some(true)));
    assert!(t.get("seq").is_none());
    agent.send(json!({"type":"typing","session_id":first.session_id,"on":true})).await;
    let t = first.client.wait_type("typing").await;
    assert_eq!((t["from"].as_str(), t["on"].as_bool()), (Some("agent"), Some(true)));
    assert!(t.get("seq").is_none());

    // WebRTC signaling is relayed in order and acked.
    for (i, kind) in ["offer", "ice", "ice", "restart"].iter().enumerate() {
        let r = first.client.request(json!({"type":"rtc","kind":kind,"data":{"n":i}})).await;
        assert_eq!(r["type"], "ack", "{r}");
    }
    for (i, kind) in ["offer", "ice", "ice", "restart"].iter().enumerate() {
        let e = agent.wait_type("rtc").await;
        assert_eq!((e["kind"].as_str(), e["data"]["n"].as_u64(), e["from"].as_str()), (Some(*kind), Some(i as u64), Some("customer")));
    }
    let r = agent.request(json!({"type":"rtc","session_id":first.session_id,"kind":"answer","data":{"sdp":"x"}})).await;
    assert_eq!(r["type"], "ack");
    let e = first.client.wait_type("rtc").await;
    assert_eq!((e["kind"].as_str(), e["data"]["sdp"].as_str()), (Some("answer"), Some("x")));

    // Call quality goes to the agent.
    first.client.send(json!({"type":"stats","rtt_ms":80,"loss_pct":0.5,"jitter_ms":3})).await;
    let s = agent.wait_type("stats").await;
    assert_eq!(s["rtt_ms"], 80.0);

    // The agent ends; both get `ended`; the agent is free again.
    let end = agent.request(json!({"type":"end","session_id":first.session_id})).await;
    assert_eq!(end["type"], "ack", "{end}");
    let ended = first.client.wait_type("ended").await;
    assert_eq!(ended["reason"], "agent_ended");
    agent.wait_type("ended").await;
    let late = first.client.request(json!({"type":"say","text":"still there?"})).await;
    assert_eq!(late["code"], "not_found", "{late}");
    let next = agent.request(json!({"type":"take","topic":"support"})).await;
    assert_eq!(next["session_id"], second.session_id.as_str(), "{next}");

    // History with cursors, as the customer (its resume token) sees it.
    let page = app.get(&format!("/api/sessions/{}/events?after=0&limit=3", first.session_id), Some(&first.resume_token)).await;
    assert_eq!(page.status(), 200);
    let body: serde_json::Value = page.json().await.unwrap();
    let seqs: Vec<i64> = body["events"].as_array().unwrap().iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    assert_eq!(body["next_after"], 3);
    assert!(body["events"][0].get("resume_token").is_none(), "tokens are never stored");
    let all: serde_json::Value = app.get(&format!("/api/sessions/{}/events?limit=200", first.session_id), Some(&first.resume_token)).await.json().await.unwrap();
    let n = all["events"].as_array().unwrap().len() as i64;
    assert!(all.get("next_after").is_none());
    for (i, e) in all["events"].as_array().unwrap().iter().enumerate() {
        assert_eq!(e["seq"].as_i64(), Some(i as i64 + 1), "no gaps");
    }
    let back: serde_json::Value = app.get(&format!("/api/sessions/{}/events?before={n}&limit=2", first.session_id), Some(&first.resume_token)).await.json().await.unwrap();
    let seqs: Vec<i64> = back["events"].as_array().unwrap().iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, vec![n - 2, n - 1]);
    assert_eq!(app.get(&format!("/api/sessions/{}/events", first.session_id), Some("wrong")).await.status(), 401);
    assert_eq!(app.get(&format!("/api/sessions/{}/events", first.session_id), None).await.status(), 401);
}

#[tokio::test]
async fn whole_conversation_on_sqlite() {
    whole_conversation(Backend::Sqlite).await;
}

#[tokio::test]
async fn whole_conversation_on_postgres() {
    whole_conversation(Backend::Postgres).await;
}

/// The events API's pages: 50 events by default, at most 200 however many
/// are asked for (with `next_after` while more exist), `limit=0` refused.
#[tokio::test]
async fn event_pages_default_to_50_and_hold_at_most_200() {
    let app = TestApp::spawn().await;
    let mut c = join(&app, "Pages", "support").await;
    for i in 0..259 {
        let a = c.client.request(json!({"type":"say","text":format!("line {i}")})).await;
        assert_eq!(a["type"], "ack", "{a}");
    }
    // seq 1 is `session`, then 259 messages: 260 events.
    let page = |q: String| {
        let (app, sid, token) = (&app, c.session_id.clone(), c.resume_token.clone());
        async move {
            let r = app.get(&format!("/api/sessions/{sid}/events?{q}"), Some(&token)).await;
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap();
            let seqs: Vec<i64> = body["events"].as_array().map(|a| a.iter().map(|e| e["seq"].as_i64().unwrap()).collect()).unwrap_or_default();
            (status, seqs, body)
        }
    };
    let (s, seqs, body) = page(String::new()).await;
    assert_eq!((s, seqs, body["next_after"].as_i64()), (200, (1..=50).collect(), Some(50)), "default page");
    let (s, seqs, body) = page("limit=1000".into()).await;
    assert_eq!((s, seqs, body["next_after"].as_i64()), (200, (1..=200).collect(), Some(200)), "a page holds at most 200");
    let (s, seqs, body) = page("after=200&limit=1000".into()).await;
    assert_eq!((s, seqs, body.get("next_after")), (200, (201..=260).collect(), None), "the last page");
    let (s, seqs, _) = page("before=100".into()).await;
    assert_eq!((s, seqs), (200, (50..=99).collect()), "50 just before");
    let (s, _, body) = page("limit=0".into()).await;
    assert_eq!((s, body["error"]["code"].as_str()), (400, Some("bad_request")), "{body}");
}

/// The agent that takes a customer reads the session from its start: what
/// the customer wrote while waiting (it used to reach nobody live), then
/// `assigned`, then the take's ack, then live events; seqs run from 1
/// without a gap. A second agent, after the first ended its link by
/// disconnecting for good, also reads what the first one said.
#[tokio::test]
async fn the_taking_agent_reads_what_the_customer_wrote_while_waiting() {
    let app = TestApp::spawn_with(crate::support::Options {
        env: vec![("DUET_AGENT_GRACE_S", "1".to_owned())],
        ..Default::default()
    })
    .await;
    let mut customer = join(&app, "Dee", "history").await;
    let said = customer.client.request(json!({"type":"say","text":"my order #12 is missing"})).await;
    assert_eq!(said["seq"], 2, "{said}");

    let mut first = app.agent("first").await;
    assert_eq!(first.request(json!({"type":"available"})).await["type"], "ack");
    let r = first.send_ref(json!({"type":"take","topic":"history"})).await;
    let mut stream = Vec::new();
    let ack = loop {
        let v = first.recv().await;
        if v["ref"] == r {
            break v;
        }
        if v.get("seq").is_some() {
            stream.push(v);
        }
    };
    assert_eq!(ack["type"], "ack", "{ack}");
    let kinds: Vec<&str> = stream.iter().map(|v| v["type"].as_str().unwrap_or("")).collect();
    assert_eq!(kinds, ["session", "message", "assigned"], "{stream:?}");
    assert!(stream.iter().enumerate().all(|(i, v)| v["seq"] == i as u64 + 1 && v["session_id"] == customer.session_id.as_str()), "{stream:?}");
    assert!(stream[0].get("resume_token").is_none(), "the customer's token never reaches an agent: {}", stream[0]);
    assert_eq!(stream[1]["text"], "my order #12 is missing");
    assert_eq!(ack["seq"], 3);
    // Then live, from the next seq.
    customer.client.request(json!({"type":"say","text":"hello?"})).await;
    let live = first.wait_type("message").await;
    assert_eq!((live["seq"].as_u64(), live["text"].as_str()), (Some(4), Some("hello?")), "{live}");
    let hi = first.request(json!({"type":"say","session_id":customer.session_id,"text":"looking into it"})).await;
    assert_eq!(hi["seq"], 5);

    // The first agent is lost for good; the customer waits again.
    first.drop_connection();
    customer.client.wait_for("queue again", |v| v["type"] == "queue").await;
    let mut second = app.agent("second").await;
    assert_eq!(second.request(json!({"type":"available"})).await["type"], "ack");
    let r = second.send_ref(json!({"type":"take","session_id":customer.session_id})).await;
    let mut stream = Vec::new();
    loop {
        let v = second.recv().await;
        if v["ref"] == r {
            assert_eq!(v["type"], "ack", "{v}");
            break;
        }
        if v.get("seq").is_some() {
            stream.push(v);
        }
    }
    assert!(stream.iter().enumerate().all(|(i, v)| v["seq"] == i as u64 + 1), "{stream:?}");
    assert!(stream.iter().any(|v| v["text"] == "looking into it"), "{stream:?}");
    assert_eq!(stream.last().map(|v| (v["type"].clone(), v["agent"]["id"].clone())), Some((json!("assigned"), json!("second"))));
}

/// `eta_s` is position × handle time ÷ agents taking customers (180 s until
/// a session of the topic ended): the first `queue`, the answer to `join`,
/// already says so, and an agent going away moves every waiting customer's
/// estimate at once.
#[tokio::test]
async fn eta_follows_the_position_and_the_agents_taking_customers() {
    let app = TestApp::spawn().await;
    let mut ann = app.agent("ann").await;
    assert_eq!(ann.request(json!({"type":"available"})).await["type"], "ack");
    let mut bea = app.agent("bea").await;
    assert_eq!(bea.request(json!({"type":"available"})).await["type"], "ack");
    // Both count once ann's dashboard shows them available.
    ann.wait_for("two agents available", |v| {
        v["type"] == "dashboard" && v["agents"].as_array().is_some_and(|a| a.iter().filter(|a| a["status"] == "available").count() == 2)
    })
    .await;

    let mut first = app.customer().await;
    first.send(json!({"type":"join","name":"Bob","topic":"support"})).await;
    assert_eq!(first.wait_type("queue").await["eta_s"], 90, "1 × 180 s ÷ 2 agents");
    let mut second = app.customer().await;
    second.send(json!({"type":"join","name":"Cy","topic":"support"})).await;
    assert_eq!(second.wait_type("queue").await["eta_s"], 180, "2 × 180 s ÷ 2 agents");

    assert_eq!(bea.request(json!({"type":"away"})).await["type"], "ack");
    // (Earlier frames may tell the first customer that a second waits.)
    let q = first.wait_for("one agent left", |v| v["type"] == "queue" && v["eta_s"] != 90).await;
    assert_eq!((q["position"].as_u64(), q["waiting"].as_u64(), q["eta_s"].as_u64()), (Some(1), Some(2), Some(180)), "{q}");
    let q = second.wait_for("one agent left", |v| v["type"] == "queue" && v["eta_s"] != 180).await;
    assert_eq!((q["position"].as_u64(), q["eta_s"].as_u64()), (Some(2), Some(360)), "{q}");
}

/// `/metrics` follows a conversation: connections, live and served
/// sessions, agents, queue length per topic, events stored and the relay
/// histogram.
#[tokio::test]
async fn metrics_follow_a_conversation() {
    let app = TestApp::spawn().await;
    let at_least = |name: &'static str, want: f64| {
        let app = &app;
        async move {
            eventually(&format!("{name} >= {want}"), || async move {
                let v = metric(app, name).await;
                (v >= want).then_some(v)
            })
            .await
        }
    };
    let mut agent = app.agent("metrics-ann").await;
    assert_eq!(agent.request(json!({"type":"available"})).await["type"], "ack");
    let mut first = join(&app, "Bob", "metered").await;
    let _second = join(&app, "Cy", "metered").await;
    at_least("duet_connections{role=\"customer\"}", 2.0).await;
    at_least("duet_connections{role=\"agent\"}", 1.0).await;
    at_least("duet_sessions_live", 2.0).await;
    at_least("duet_agents_available", 1.0).await;
    at_least("duet_queue_waiting{topic=\"metered\"}", 2.0).await;

    assert_eq!(agent.request(json!({"type":"take","topic":"metered"})).await["type"], "ack");
    first.client.wait_type("assigned").await;
    for i in 0..3 {
        let a = first.client.request(json!({"type":"say","text":format!("hello {i}")})).await;
        assert_eq!(a["type"], "ack", "{a}");
    }
    at_least("duet_sessions_served", 1.0).await;
    at_least("duet_relay_seconds_count", 3.0).await;
    // Two sessions, one assigned, three messages.
    at_least("duet_events_stored_total", 6.0).await;
    eventually("one left waiting", || async {
        (metric(&app, "duet_queue_waiting{topic=\"metered\"}").await == 1.0).then_some(())
    })
    .await;
}

//! The dashboard: on connect, on change, coalesced to at most 4 per second,
//! with the names the customers gave and the serving agent's name.

use std::cell::Cell;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{join, TestApp};

#[tokio::test]
async fn dashboard_is_pushed_on_change_at_most_four_times_a_second() {
    let app = TestApp::spawn().await;
    let mut agent = app.agent("dash").await;
    let first = agent.wait_type("dashboard").await;
    assert!(first["nodes"].as_array().is_some_and(|n| !n.is_empty()), "{first}");

    // 30 customers join as fast as they can, each a change.
    let started = Instant::now();
    // The agent's frames are read while the customers join, not after:
    // dashboards left in the socket during the joins would all be read at
    // one instant and look pushed at once.
    let joined: Cell<Option<Instant>> = Cell::new(None);
    let joining = async {
        let mut customers = Vec::new();
        for i in 0..30 {
            customers.push(join(&app, &format!("Guest {i}"), "support").await);
        }
        joined.set(Some(Instant::now()));
        customers
    };
    // Every dashboard until two seconds after the last join.
    let counting = async {
        let mut dashboards = Vec::new();
        loop {
            let until = joined.get().map_or_else(|| Instant::now() + Duration::from_millis(50), |t| t + Duration::from_secs(2));
            let Some(left) = until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else {
                break;
            };
            if let Some(v) = agent.read(left).await {
                if v["type"] == "dashboard" {
                    dashboards.push((Instant::now(), v));
                }
            }
        }
        dashboards
    };
    let (customers, dashboards) = tokio::join!(joining, counting);
    let window = started.elapsed().as_secs_f64();
    let allowed = (window * 4.0).ceil() as usize + 1;
    assert!(!dashboards.is_empty(), "changes were pushed");
    assert!(dashboards.len() <= allowed, "{} dashboards in {window:.2} s (at most {allowed})", dashboards.len());
    // At most 4 per second: any 5 in a row span a second at the server (4
    // intervals of 250 ms). Arrival times jitter on a loaded machine (one
    // push delayed, the next on time), so a single gap proves nothing; a
    // span of five, with 150 ms of slack, does.
    for five in dashboards.windows(5) {
        let span = five[4].0.duration_since(five[0].0);
        assert!(span >= Duration::from_millis(850), "five dashboards within {span:?}");
    }
    let last = &dashboards.last().expect("one at least").1;
    let q = last["queues"].as_array().and_then(|q| q.iter().find(|q| q["topic"] == "support")).expect("the support queue");
    let waiting = q["waiting"].as_array().expect("waiting list");
    assert_eq!(waiting.len(), 30, "{q}");
    assert_eq!(waiting[0]["name"], "Guest 0");
    assert_eq!(waiting[0]["position"], 1);

    // Taking one shows who talks to whom.
    assert_eq!(agent.request(json!({"type":"available"})).await["type"], "ack");
    let take = agent.request(json!({"type":"take","topic":"support"})).await;
    assert_eq!(take["type"], "ack", "{take}");
    let served = agent
        .wait_for("a dashboard with the session", |v| {
            v["type"] == "dashboard" && v["sessions"].as_array().is_some_and(|s| !s.is_empty())
        })
        .await;
    let s = &served["sessions"][0];
    assert_eq!((s["customer"].as_str(), s["agent"].as_str()), (Some("Guest 0"), Some("Agent dash")), "{s}");
    assert_eq!(s["session_id"], customers[0].session_id.as_str());
    let me = served["agents"].as_array().and_then(|a| a.iter().find(|a| a["id"] == "dash")).expect("the agent");
    assert_eq!(me["status"], "busy");
}

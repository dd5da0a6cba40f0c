//! What survives: a SIGKILL mid-conversation (every acked event is stored
//! exactly once; clients resume and carry on; the queue keeps its order),
//! and a database outage (refused with `unavailable`, never acked, nothing
//! refused stored; back to normal once the database is).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::resume::{
    agent_resume, agent_say, all_events, assert_contiguous, count_text, events_until, is_event, keys, message, resume, say,
    send_with_ref, seq_of, served, wait_ready, Served,
};
use crate::support::{eventually, join, Backend, Joined, Options, TestApp, TestDb, DEADLINE};

// ---- SIGKILL and restart ---------------------------------------------------------

async fn kill_and_restart(backend: Backend, mut env: Vec<(&'static str, String)>) {
    env.push(("DUET_AGENT_GRACE_S", "60".to_owned()));
    let mut app = TestApp::spawn_with(Options { backend, env }).await;
    let admin = app.admin_token("root");
    let Served { mut agent, agent_token, cust, .. } = served(&app, "ann", "Bob").await;
    let Joined { client: mut c, session_id: sid, resume_token: token, .. } = cust;
    let w1 = join(&app, "W1", "support").await;
    let w2 = join(&app, "W2", "support").await;
    assert_eq!((w1.position, w2.position), (1, 2));
    let gone = join(&app, "Gone", "support").await;
    let Joined { client: mut g, session_id: gid, resume_token: gtoken, .. } = gone;
    assert_eq!(send_with_ref(&mut g, json!({"type":"leave"}), "bye").await["type"], "ack");

    // A conversation, every step acked.
    let mut acked: Vec<(String, i64)> = Vec::new();
    let mut agent_seen = 0;
    let mut cust_seen = 0;
    for i in 0..5 {
        let t = format!("c{i}");
        let s = say(&mut c, &t, &t).await;
        acked.push((t.clone(), s));
        agent_seen = agent_seen.max(seq_of(&message(&mut agent, &t).await));
        let t = format!("a{i}");
        let s = agent_say(&mut agent, &sid, &t, &t).await;
        acked.push((t.clone(), s));
        agent_seen = agent_seen.max(s);
        cust_seen = cust_seen.max(seq_of(&message(&mut c, &t).await));
    }
    let r = send_with_ref(&mut c, json!({"type":"rtc","kind":"offer","data":{"sdp":"v=0"}}), "rtc-1").await;
    assert_eq!(r["type"], "ack", "{r}");
    acked.push(("rtc-1".to_owned(), seq_of(&r)));
    // A burst still in flight when the node dies: what was acked must stay.
    for i in 0..20 {
        c.send(json!({"type":"say","text":format!("b{i}"),"ref":format!("b{i}")})).await;
    }
    let until = Instant::now() + Duration::from_millis(15);
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        match c.read(left).await {
            Some(v) if v["type"] == "ack" => acked.push((v["ref"].as_str().unwrap().to_owned(), seq_of(&v))),
            Some(v) => assert_ne!(v["type"], "error", "{v}"),
            None => break,
        }
    }
    let highest_acked = acked.iter().map(|(_, s)| *s).max().unwrap();
    let burst_acked = acked.iter().filter(|(w, _)| w.starts_with('b')).count();
    eprintln!("{backend:?}: {burst_acked} of 20 burst messages acked before SIGKILL");
    cust_seen = cust_seen.max(highest_acked);

    app.kill();
    drop((c, agent, g));
    app.start().await;

    // Every acked event is there, once, at its seq; no gaps.
    let stored = all_events(&app, &sid, &admin).await;
    assert_contiguous(&sid, &stored);
    assert!(stored.len() as i64 >= highest_acked, "{} events, acked up to {highest_acked}", stored.len());
    for (what, s) in &acked {
        let e = &stored[*s as usize - 1];
        if what.starts_with("rtc") {
            assert_eq!((e["type"].as_str(), e["kind"].as_str()), (Some("rtc"), Some("offer")), "{e}");
        } else {
            assert_eq!(e["text"], what.as_str(), "acked {what} at {s}: {e}");
            assert_eq!(count_text(&stored, what), 1, "{what} once");
        }
    }
    let stored_n = stored.len() as i64;

    // The customer resumes and gets exactly what it has not seen.
    let mut c = resume(&app, &sid, &token, cust_seen, "r1").await;
    if stored_n > cust_seen {
        let replay = events_until(&mut c, stored_n).await;
        assert_eq!(keys(&replay), keys(&stored[cust_seen as usize..]));
    }
    c.assert_none(Duration::from_millis(300), is_event).await;
    // Re-sending the whole burst: stored ones keep their seq, none twice.
    let mut burst_seqs = Vec::new();
    for i in 0..20 {
        let t = format!("b{i}");
        let s = say(&mut c, &t, &t).await;
        if let Some((_, before)) = acked.iter().find(|(w, _)| *w == t) {
            assert_eq!(s, *before, "{t} was acked with {before} before the crash");
        }
        if let Some(e) = stored.iter().find(|e| e["text"] == t.as_str()) {
            assert_eq!(s, seq_of(e), "{t} was stored at {} before the crash", seq_of(e));
        }
        burst_seqs.push(s);
    }
    let stored = all_events(&app, &sid, &admin).await;
    assert_contiguous(&sid, &stored);
    for i in 0..20 {
        let t = format!("b{i}");
        assert_eq!(count_text(&stored, &t), 1, "{t} once: {stored:?}");
        assert_eq!(stored[burst_seqs[i] as usize - 1]["text"], t.as_str());
    }
    let n = stored.len() as i64;

    // The agent signs in again (its token survived) and resumes.
    let mut agent = agent_resume(&app, &agent_token, &sid, agent_seen, "ar").await;
    let replay = events_until(&mut agent, n).await;
    assert_eq!(keys(&replay), keys(&stored[agent_seen as usize..]), "the agent's replay after the restart");
    // And both carry on.
    assert_eq!(say(&mut c, "after restart", "after-1").await, n + 1);
    assert_eq!(seq_of(&message(&mut agent, "after restart").await), n + 1);
    assert_eq!(agent_say(&mut agent, &sid, "welcome back", "after-a1").await, n + 2);
    assert_eq!(seq_of(&message(&mut c, "welcome back").await), n + 2);

    // The waiting customers kept their order; an ended session stays ended.
    let mut w1c = resume(&app, &w1.session_id, &w1.resume_token, 1, "rw1").await;
    let q = w1c.wait_type("queue").await;
    assert_eq!((q["position"].as_u64(), q["waiting"].as_u64()), (Some(1), Some(2)), "W1: {q}");
    let mut w2c = resume(&app, &w2.session_id, &w2.resume_token, 1, "rw2").await;
    let q = w2c.wait_type("queue").await;
    assert_eq!((q["position"].as_u64(), q["waiting"].as_u64()), (Some(2), Some(2)), "W2: {q}");
    let w3 = join(&app, "W3", "support").await;
    assert_eq!(w3.position, 3);
    let mut g = app.customer().await;
    let e = send_with_ref(&mut g, json!({"type":"resume","session_id":gid,"resume_token":gtoken,"last_seq":0}), "rg").await;
    assert_eq!(e["code"], "not_found", "{e}");
    let dash: Value = app.get("/api/queues", Some(&admin)).await.json().await.unwrap();
    let names: Vec<&str> = dash["queues"][0]["waiting"].as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["W1", "W2", "W3"], "{dash}");
    let mut bea = app.agent("bea").await;
    assert_eq!(bea.request(json!({"type":"available"})).await["type"], "ack");
    let t = bea.request(json!({"type":"take","topic":"support"})).await;
    assert_eq!(t["session_id"], w1.session_id.as_str(), "{t}");
    w1c.wait_type("assigned").await;
    w2c.wait_for("W2 at 1", |v| v["type"] == "queue" && v["position"] == 1).await;
}

/// SQLite at its default `synchronous=NORMAL`: commits are not fsynced,
/// and a killed process still loses none of them (they are in the page cache).
#[tokio::test]
async fn kill_and_restart_on_sqlite() {
    kill_and_restart(Backend::Sqlite, vec![]).await;
}

#[tokio::test]
async fn kill_and_restart_on_sqlite_with_full_sync() {
    kill_and_restart(Backend::Sqlite, vec![("DUET_SQLITE_SYNC", "full".to_owned())]).await;
}

#[tokio::test]
async fn kill_and_restart_on_postgres() {
    kill_and_restart(Backend::Postgres, vec![]).await;
}

// ---- database outage (PostgreSQL behind a proxy that can be cut) ----------------

/// A TCP proxy in front of PostgreSQL, on its own runtime (so a test thread
/// blocked in a CLI call never stalls it). `cut` drops every live
/// connection and refuses new ones (each is closed as soon as accepted);
/// `restore` forwards again.
struct PgProxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    generation: watch::Sender<u64>,
    rt: Option<tokio::runtime::Runtime>,
}

impl PgProxy {
    fn start(upstream: String) -> PgProxy {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let (generation, gen_rx) = watch::channel(0u64);
        let is_cut = cut.clone();
        rt.spawn(async move {
            let listener = TcpListener::from_std(std_listener).unwrap();
            loop {
                let Ok((inbound, _)) = listener.accept().await else { continue };
                if is_cut.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let upstream = upstream.clone();
                let mut gen_rx = gen_rx.clone();
                gen_rx.mark_unchanged();
                tokio::spawn(async move {
                    let mut inbound = inbound;
                    let Ok(mut outbound) = TcpStream::connect(&upstream).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = gen_rx.changed() => {}
                    }
                });
            }
        });
        PgProxy { addr, cut, generation, rt: Some(rt) }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// `postgres://user@host:port/db` → (`host:port`, the same URL via `proxy`).
fn via_proxy(url: &str, proxy: SocketAddr) -> (String, String) {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (authority, path) = rest.split_once('/').unwrap();
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (format!("{u}@"), h),
        None => (String::new(), authority),
    };
    let hostport = if hostport.contains(':') { hostport.to_owned() } else { format!("{hostport}:5432") };
    (hostport, format!("{scheme}://{user}{proxy}/{path}"))
}

async fn ready(app: &TestApp) -> (u16, Option<String>, Value) {
    let r = app.get("/ready", None).await;
    let status = r.status().as_u16();
    let retry = r.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
    (status, retry, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn database_outage_on_postgres() {
    let db = TestDb::new(Backend::Postgres);
    let upstream = via_proxy(&db.url, "127.0.0.1:1".parse().unwrap()).0;
    let proxy = PgProxy::start(upstream);
    let (_, proxied) = via_proxy(&db.url, proxy.addr);
    // The app's own TestDb only gives it a folder and a log: DATABASE_URL
    // points at `db` through the proxy.
    let app = TestApp::spawn_with(Options {
        backend: Backend::Sqlite,
        env: vec![("DATABASE_URL", proxied), ("DUET_DB_TIMEOUT_MS", "1000".to_owned())],
    })
    .await;
    let (status, _, body) = ready(&app).await;
    assert_eq!((status, body["db"].as_str()), (200, Some("ok")), "{body}");
    assert_eq!(body["db_backend"], "postgres", "{body}");

    let Served { mut agent, cust, .. } = served(&app, "ann", "Bob").await;
    let Joined { client: mut c, session_id: sid, resume_token: token, .. } = cust;
    let mut last = say(&mut c, "before", "before").await;
    message(&mut agent, "before").await;
    last = last.max(agent_say(&mut agent, &sid, "before-a", "before-a").await);
    message(&mut c, "before-a").await;

    proxy.cut();
    let cut_at = Instant::now();
    let body = eventually("/ready says the database is down", || {
        let app = &app;
        async move {
            let (status, retry, body) = ready(app).await;
            (status == 503).then_some((retry, body))
        }
    })
    .await;
    assert!(body.1["db"].is_string() && body.1["db"] != "ok", "503 names the db: {}", body.1);
    assert!(body.0.is_some(), "503 with Retry-After");

    // Refused, never acked.
    for i in 0..3 {
        let t = format!("refused-{i}");
        let e = send_with_ref(&mut c, json!({"type":"say","text":t}), &t).await;
        assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("unavailable")), "{e}");
        assert!(e["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{e}");
    }
    let e = send_with_ref(&mut agent, json!({"type":"say","session_id":sid,"text":"refused-agent"}), "refused-agent").await;
    assert_eq!(e["code"], "unavailable", "{e}");
    let mut newcomer = app.customer().await;
    let e = send_with_ref(&mut newcomer, json!({"type":"join","name":"New","topic":"support"}), "j1").await;
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("unavailable")), "{e}");
    assert!(e["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{e}");
    newcomer.assert_none(Duration::from_millis(300), |v| v["type"] == "session" || v["type"] == "queue").await;
    c.assert_none(Duration::from_millis(200), |v| v["type"] == "ack").await;
    let h = app.get("/health", None).await;
    assert_eq!(h.status(), 200, "alive through the outage");
    assert!(cut_at.elapsed() < Duration::from_secs(20));

    proxy.restore();
    eventually("/ready is back", || {
        let app = &app;
        async move {
            let (status, _, body) = ready(app).await;
            (status == 200 && body["db"] == "ok").then_some(())
        }
    })
    .await;
    // A fresh say is acked again (retrying, as `retry_after_ms` asks, while
    // the writer reconnects), with the very next seq.
    let until = Instant::now() + DEADLINE;
    let mut refused_after = Vec::new();
    let acked = loop {
        let t = format!("after-{}", refused_after.len());
        let a = send_with_ref(&mut c, json!({"type":"say","text":t}), &t).await;
        if a["type"] == "ack" {
            break (t, seq_of(&a));
        }
        assert_eq!(a["code"], "unavailable", "{a}");
        assert!(Instant::now() < until, "no say acked within {DEADLINE:?} of the database coming back");
        refused_after.push(t);
        tokio::time::sleep(Duration::from_millis(a["retry_after_ms"].as_u64().unwrap_or(100).min(500))).await;
    };
    eprintln!("after the outage: {} say(s) refused while the writer reconnected", refused_after.len());
    assert_eq!(acked.1, last + 1, "no seq was used up by refused messages");
    message(&mut agent, &acked.0).await;
    let mut nc = app.customer().await;
    let until = Instant::now() + DEADLINE;
    let mut k = 0;
    loop {
        k += 1;
        let j = send_with_ref(&mut nc, json!({"type":"join","name":"New","topic":"support"}), &format!("j{k}")).await;
        if j["type"] == "ack" {
            break;
        }
        assert_eq!(j["code"], "unavailable", "{j}");
        assert!(Instant::now() < until, "join refused after the database came back: {j}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    nc.wait_type("session").await;

    let stored = all_events(&app, &sid, &token).await;
    assert_contiguous(&sid, &stored);
    for e in &stored {
        let text = e["text"].as_str().unwrap_or("");
        assert!(!text.starts_with("refused") && !refused_after.iter().any(|r| r == text), "a refused message was stored: {e}");
    }
    assert_eq!(count_text(&stored, &acked.0), 1);
    assert_eq!(stored.len() as i64, acked.1);
    wait_ready(&app).await;
    drop(app);
    drop(db);
}

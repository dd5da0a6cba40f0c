//! Test support: start the real `duet` binary on a free port with its own
//! database, and talk to it like a client (PROTOCOL.md) over real sockets.
//!
//! Every test gets a fresh SQLite file or a fresh PostgreSQL database (on
//! the server at `DUET_TEST_DATABASE_URL`), so tests run in parallel.
//! Waiting is always polling with a deadline, never a bare sleep.

#![allow(dead_code, clippy::unwrap_used, clippy::panic)]

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const BIN: &str = env!("CARGO_BIN_EXE_duet");
/// How long any single expectation may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

static SEQ: AtomicU64 = AtomicU64::new(0);

fn unique(prefix: &str) -> String {
    format!("{prefix}_{}_{}_{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed), rand_suffix())
}

fn rand_suffix() -> u32 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    t % 1_000_000
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn both() -> [Backend; 2] {
        [Backend::Sqlite, Backend::Postgres]
    }
}

/// The PostgreSQL server tests use (a database per test is created on it).
pub fn pg_server_url() -> String {
    std::env::var("DUET_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn psql(url: &str, sql: &str) {
    let out = Command::new("psql").arg(url).arg("-v").arg("ON_ERROR_STOP=1").arg("-q").arg("-c").arg(sql).output().expect("psql runs");
    assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A fresh, empty database; dropped (PostgreSQL) or deleted with its folder.
pub struct TestDb {
    pub url: String,
    pg_name: Option<String>,
    dir: PathBuf,
}

impl TestDb {
    pub fn new(backend: Backend) -> TestDb {
        let dir = std::env::temp_dir().join(unique("duet-test"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        match backend {
            Backend::Sqlite => TestDb { url: dir.join("duet.db").display().to_string(), pg_name: None, dir },
            Backend::Postgres => {
                let server = pg_server_url();
                let name = unique("duet_t");
                psql(&server, &format!("CREATE DATABASE {name}"));
                let base = server.rsplit_once('/').map(|(b, _)| b.to_owned()).unwrap_or(server);
                TestDb { url: format!("{base}/{name}"), pg_name: Some(name), dir }
            }
        }
    }
}

impl TestDb {
    /// Runs the binary's command line against this database, with nothing
    /// else in its environment but `extra`.
    pub fn cli(&self, args: &[&str], extra: &[(&str, &str)]) -> std::process::Output {
        let mut c = Command::new(BIN);
        c.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default()).env("DATABASE_URL", &self.url).current_dir(&self.dir);
        c.envs(extra.iter().copied()).args(args).output().expect("duet cli runs")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(name) = &self.pg_name {
            let server = pg_server_url();
            let _ = Command::new("psql")
                .arg(&server)
                .arg("-q")
                .arg("-c")
                .arg(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// A running duet process.
pub struct TestApp {
    pub port: u16,
    pub base: String,
    pub db: TestDb,
    pub env: Vec<(String, String)>,
    child: Option<Child>,
    pub log: PathBuf,
    pub http: reqwest::Client,
}

pub struct Options {
    pub backend: Backend,
    pub env: Vec<(&'static str, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Options { backend: Backend::Sqlite, env: Vec::new() }
    }
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        TestApp::spawn_with(Options::default()).await
    }

    pub async fn spawn_on(backend: Backend) -> TestApp {
        TestApp::spawn_with(Options { backend, ..Options::default() }).await
    }

    pub async fn spawn_with(opts: Options) -> TestApp {
        let db = TestDb::new(opts.backend);
        let port = free_port();
        let mut env = vec![
            ("DUET_BIND".to_owned(), format!("127.0.0.1:{port}")),
            ("DATABASE_URL".to_owned(), db.url.clone()),
            ("DUET_NODE_ID".to_owned(), format!("test-{port}")),
            ("DUET_LOG_FORMAT".to_owned(), "json".to_owned()),
            ("RUST_LOG".to_owned(), "info".to_owned()),
        ];
        for (k, v) in opts.env {
            env.retain(|(ek, _)| ek != k);
            env.push((k.to_owned(), v));
        }
        let log = db.dir.join("duet.log");
        let mut app = TestApp {
            port,
            base: format!("http://127.0.0.1:{port}"),
            db,
            env,
            child: None,
            log,
            http: reqwest::Client::builder().timeout(DEADLINE).build().expect("http client"),
        };
        app.start().await;
        app
    }

    fn command(&self) -> Command {
        let mut c = Command::new(BIN);
        c.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default()).current_dir(&self.db.dir);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Starts (or restarts) the process and waits for `/health`.
    pub async fn start(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log file");
        let child = self
            .command()
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("duet starts");
        self.child = Some(child);
        let started = Instant::now();
        loop {
            if let Ok(r) = self.http.get(format!("{}/health", self.base)).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("duet exited with {status} at start:\n{}", self.logs());
                }
            }
            assert!(started.elapsed() < DEADLINE, "duet did not become healthy:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGKILL, no goodbye.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for the exit.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs the binary's CLI against this app's database.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        self.command().args(args).output().expect("duet cli runs")
    }

    /// Adds an admin and mints a bearer token with the CLI.
    pub fn admin_token(&self, id: &str) -> String {
        let add = self.cli(&["admin", "add", id, "--name", &format!("Agent {id}")]);
        assert!(add.status.success(), "admin add: {}", String::from_utf8_lossy(&add.stderr));
        let out = self.cli(&["admin", "token", id]);
        assert!(out.status.success(), "admin token: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf8").trim().to_owned()
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{path}", self.port)
    }

    /// A customer connected to `/ws`, past `hello`.
    pub async fn customer(&self) -> Client {
        let mut c = Client::connect(&self.ws_url("/ws"), &[]).await.expect("customer connects");
        let hello = c.recv().await;
        assert_eq!(hello["type"], "hello", "{hello}");
        c
    }

    /// An agent (a fresh admin identity) connected to `/admin/ws`.
    pub async fn agent(&self, id: &str) -> Client {
        let token = self.admin_token(id);
        self.agent_with_token(&token).await
    }

    pub async fn agent_with_token(&self, token: &str) -> Client {
        let auth = format!("Bearer {token}");
        let mut c = Client::connect(&self.ws_url("/admin/ws"), &[("Authorization", auth.as_str())]).await.expect("agent connects");
        let hello = c.recv().await;
        assert_eq!(hello["type"], "hello", "{hello}");
        c
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut r = self.http.get(format!("{}{path}", self.base));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send().await.expect("http get")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- duet log ----\n{}", self.logs());
        }
    }
}

/// A WebSocket client speaking PROTOCOL.md, with its own buffer so tests
/// can wait for one kind of frame while others keep arriving.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub buffered: VecDeque<Value>,
    next_ref: u64,
    /// Answer pings automatically (set false to play a dead peer).
    pub auto_pong: bool,
    pub closed: Option<Option<u16>>,
}

impl Client {
    pub async fn connect(url: &str, headers: &[(&str, &str)]) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        let mut req = url.into_client_request()?;
        for (k, v) in headers {
            req.headers_mut().insert(
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                v.parse().expect("header value"),
            );
        }
        let (ws, _) = tokio_tungstenite::connect_async(req).await?;
        Ok(Client { ws, buffered: VecDeque::new(), next_ref: 1, auto_pong: true, closed: None })
    }

    pub async fn send_raw(&mut self, text: &str) {
        self.ws.send(Message::Text(text.into())).await.expect("send");
    }

    pub async fn send_binary(&mut self, data: Vec<u8>) {
        self.ws.send(Message::Binary(data.into())).await.expect("send binary");
    }

    pub async fn send(&mut self, v: Value) {
        self.send_raw(&v.to_string()).await;
    }

    /// Sends several frames with one flush, so they arrive together (as a
    /// client that pipelines would send them).
    pub async fn send_all(&mut self, vs: &[Value]) {
        for v in vs {
            self.ws.feed(Message::Text(v.to_string().into())).await.expect("feed");
        }
        self.ws.flush().await.expect("flush");
    }

    /// Sends `v` with a fresh integer `ref`, returns the ref.
    pub async fn send_ref(&mut self, mut v: Value) -> u64 {
        let r = self.next_ref;
        self.next_ref += 1;
        v["ref"] = json!(r);
        self.send(v).await;
        r
    }

    /// Sends with a fresh ref and waits for its `ack` or `error`.
    pub async fn request(&mut self, v: Value) -> Value {
        let r = self.send_ref(v).await;
        self.reply(json!(r)).await
    }

    /// The next frame from the server (or panics after the deadline).
    pub async fn recv(&mut self) -> Value {
        if let Some(v) = self.buffered.pop_front() {
            return v;
        }
        match self.read(DEADLINE).await {
            Some(v) => v,
            None => panic!("no frame within {DEADLINE:?} (closed: {:?})", self.closed),
        }
    }

    /// Reads one JSON frame from the socket, answering pings; `None` on
    /// timeout or close.
    pub async fn read(&mut self, within: Duration) -> Option<Value> {
        let until = Instant::now() + within;
        loop {
            let left = until.checked_duration_since(Instant::now())?;
            let msg = match tokio::time::timeout(left, self.ws.next()).await {
                Err(_) => return None,
                Ok(None) => {
                    self.closed.get_or_insert(None);
                    return None;
                }
                Ok(Some(Err(_))) => {
                    self.closed.get_or_insert(None);
                    return None;
                }
                Ok(Some(Ok(m))) => m,
            };
            match msg {
                Message::Text(t) => return Some(serde_json::from_str(&t).expect("server sends JSON")),
                Message::Ping(p) if self.auto_pong => {
                    let _ = self.ws.send(Message::Pong(p)).await;
                }
                Message::Close(f) => {
                    self.closed = Some(f.map(|f| u16::from(f.code)));
                    return None;
                }
                _ => {}
            }
        }
    }

    /// Waits for the first frame matching `pred`; others stay buffered.
    pub async fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.buffered.iter().position(&pred) {
            return self.buffered.remove(i).expect("index is valid");
        }
        let until = Instant::now() + DEADLINE;
        loop {
            let left = until.checked_duration_since(Instant::now()).unwrap_or_default();
            match self.read(left).await {
                Some(v) if pred(&v) => return v,
                Some(v) => self.buffered.push_back(v),
                None => panic!("waiting for {what}: nothing matched within {DEADLINE:?}; closed {:?}; got {:?}", self.closed, self.buffered),
            }
        }
    }

    pub async fn wait_type(&mut self, t: &str) -> Value {
        self.wait_for(t, |v| v["type"] == t).await
    }

    /// The `ack` or `error` answering `r`.
    pub async fn reply(&mut self, r: Value) -> Value {
        self.wait_for(&format!("reply to ref {r}"), |v| (v["type"] == "ack" || v["type"] == "error") && v["ref"] == r).await
    }

    /// Nothing matching `pred` arrives within `within` (frames read are kept).
    pub async fn assert_none(&mut self, within: Duration, pred: impl Fn(&Value) -> bool) {
        assert!(!self.buffered.iter().any(&pred), "unexpected frame in buffer: {:?}", self.buffered);
        let until = Instant::now() + within;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match self.read(left).await {
                Some(v) => {
                    assert!(!pred(&v), "unexpected frame {v}");
                    self.buffered.push_back(v);
                }
                None => break,
            }
        }
    }

    /// Waits for the server to close the socket; returns the close code.
    pub async fn wait_closed(&mut self, within: Duration) -> Option<u16> {
        let until = Instant::now() + within;
        while self.closed.is_none() {
            let left = until.checked_duration_since(Instant::now())?;
            if let Some(v) = self.read(left).await {
                self.buffered.push_back(v);
            }
        }
        self.closed.flatten()
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }

    /// Drops the TCP connection without a close frame (a network loss).
    pub fn drop_connection(self) {
        drop(self);
    }
}

/// A customer that joined `topic`: its client, session id and resume token.
pub struct Joined {
    pub client: Client,
    pub session_id: String,
    pub resume_token: String,
    pub position: u64,
}

pub async fn join(app: &TestApp, name: &str, topic: &str) -> Joined {
    let mut c = app.customer().await;
    let r = c.send_ref(json!({"type":"join","name":name,"topic":topic})).await;
    let session = c.wait_type("session").await;
    assert_eq!(session["seq"], 1, "{session}");
    let queue = c.wait_type("queue").await;
    let ack = c.reply(json!(r)).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    Joined {
        session_id: session["session_id"].as_str().expect("session_id").to_owned(),
        resume_token: session["resume_token"].as_str().expect("resume_token").to_owned(),
        position: queue["position"].as_u64().expect("position"),
        client: c,
    }
}

/// Polls `f` until it returns `Some`, or fails after the deadline.
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < until, "{what}: not within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A webhook receiver on loopback, answering as a chat service's incoming
/// webhook (or Telegram's Bot API) does: it records every JSON body posted
/// to it, with its path, and answers each request with the next of the
/// given statuses, then 200.
pub struct WebhookSink {
    /// `http://127.0.0.1:PORT`
    pub base: String,
    /// A hook's URL under `base`.
    pub url: String,
    received: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl WebhookSink {
    pub async fn start(statuses: &[u16]) -> WebhookSink {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let url = format!("{base}/hooks/duet-codes");
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let statuses = std::sync::Arc::new(std::sync::Mutex::new(VecDeque::from(statuses.to_vec())));
        let rec = received.clone();
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(serve_webhook(sock, rec.clone(), statuses.clone()));
            }
        });
        WebhookSink { base, url, received, task }
    }

    /// The bodies posted, each with its request path as `"_path"`.
    pub fn received(&self) -> Vec<Value> {
        self.received.lock().unwrap().clone()
    }

    /// Waits (with the deadline) until `n` bodies were posted.
    pub async fn wait_for(&self, n: usize) -> Vec<Value> {
        eventually(&format!("{n} webhook posts"), || async move {
            let got = self.received();
            (got.len() >= n).then_some(got)
        })
        .await
    }
}

impl Drop for WebhookSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One connection of the sink: HTTP/1.1 requests with a Content-Length.
async fn serve_webhook(
    mut sock: TcpStream,
    received: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
    statuses: std::sync::Arc<std::sync::Mutex<VecDeque<u16>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let len = head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse::<usize>().ok()).unwrap_or(0);
        while buf.len() < head_end + len {
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let path = String::from_utf8_lossy(&buf[..head_end]).split_whitespace().nth(1).unwrap_or("").to_owned();
        let body: Vec<u8> = buf.drain(..head_end + len).skip(head_end).collect();
        if let Ok(mut v) = serde_json::from_slice::<Value>(&body) {
            v["_path"] = json!(path);
            received.lock().unwrap().push(v);
        }
        let status = statuses.lock().unwrap().pop_front().unwrap_or(200);
        let answer = format!("HTTP/1.1 {status} Whatever\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok");
        if sock.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
    }
}

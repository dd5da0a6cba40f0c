//! End to end: the built `duet-loadgen` binary against the `fake_duet` TEST STUB (not
//! duet: its figures mean nothing), at small scale.
//!
//! What this proves is the load generator's side: it speaks the protocol subset, tolerates
//! the orderings the contract allows, reports one JSON line, and counts loss, duplicates,
//! reordering and misrouting exactly when the stub injects them. Each test starts its own
//! stub on a kernel-chosen port and stops it (by its own child handle) when done.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

struct Stub {
    child: Child,
    urls: Vec<String>,
}

impl Stub {
    /// Starts the stub on `binds` listen addresses (127.0.0.1:0 each) with extra flags.
    fn start(binds: usize, extra: &[&str]) -> Stub {
        let bind = vec!["127.0.0.1:0"; binds].join(",");
        let mut child = Command::new(env!("CARGO_BIN_EXE_fake_duet"))
            .args(["--bind", &bind])
            .args(extra)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("the stub binary is built with the tests");
        let stderr = child.stderr.take().expect("stderr is piped");
        let mut lines = BufReader::new(stderr).lines();
        let mut urls = Vec::new();
        while urls.len() < binds {
            let line = lines
                .next()
                .expect("stub printed its addresses")
                .expect("utf-8 stderr");
            if let Some(rest) = line.split("listening on ").nth(1) {
                let addr = rest.split_whitespace().next().expect("an address follows");
                urls.push(format!("http://{addr}"));
            }
        }
        // keep draining stderr so the stub never blocks on a full pipe
        std::thread::spawn(move || for _ in lines {});
        Stub { child, urls }
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tokens_file(name: &str, n: usize) -> PathBuf {
    let p = std::env::temp_dir().join(format!(
        "duet-loadgen-e2e-{}-{name}.txt",
        std::process::id()
    ));
    let body: String = (0..n).map(|i| format!("token-{i}\n")).collect();
    std::fs::write(&p, format!("# one agent per line\n\n{body}")).expect("temp dir is writable");
    p
}

/// Runs the load generator; returns (success, the JSON line's `result`, stdout, stderr).
fn loadgen(args: &[&str]) -> (bool, Value, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_duet-loadgen"))
        .args(args)
        .arg("--quiet")
        .output()
        .expect("the load generator binary is built with the tests");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let result = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str::<Value>(l).ok())
        .map(|v| v["result"].clone())
        .unwrap_or(Value::Null);
    (out.status.success(), result, stdout, stderr)
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} is a count in {v}"))
}

#[test]
fn conversation_smoke_and_wrong_token() {
    let stub = Stub::start(1, &["--tokens", "good"]);
    let (ok, _, out, err) = loadgen(&["conversation", "--url", &stub.urls[0], "--token", "good"]);
    assert!(ok, "{out}{err}");
    assert!(out.starts_with("ok:"), "{out}");
    let (ok, _, out, _) = loadgen(&["conversation", "--url", &stub.urls[0], "--token", "bad"]);
    assert!(!ok);
    assert!(out.contains("unauthorized"), "{out}");
}

#[test]
fn idle_small() {
    let stub = Stub::start(1, &["--heartbeat-s", "1"]);
    let pid = stub.child.id().to_string();
    let (ok, r, out, err) = loadgen(&[
        "idle",
        "--url",
        &stub.urls[0],
        "--n",
        "300",
        "--hold",
        "1.5",
        "--prewarm",
        "20",
        "--pids",
        &pid,
    ]);
    assert!(ok, "{out}{err}");
    assert_eq!(u(&r, "joined"), 300, "{r}");
    assert_eq!(u(&r, "still_open_at_end"), 300, "{r}");
    assert_eq!(r["positions_ok"], true, "{r}");
    assert!(r["rss_per_customer_bytes"].is_number(), "{r}");
    assert!(r["server"]["cpu_open_s"].is_number(), "{r}");
    assert_eq!(r["failures"], serde_json::json!({}));
    // a stub run must not pass for a duet figure
    let line: Value = serde_json::from_str(out.lines().last().expect("a JSON line")).expect("JSON");
    assert_eq!(line["target"], "fake-duet-stub", "{line}");
    assert_eq!(line["kind"], "duet-loadgen/1");
}

#[test]
fn idle_counts_refused_connections() {
    // A port nobody listens on and nobody else can take while the test
    // runs: bound, never listening (freeing a port let a parallel test's
    // server take it, and its connections were reset, not refused).
    let held = tokio::net::TcpSocket::new_v4().expect("a socket");
    held.bind("127.0.0.1:0".parse().expect("an address")).expect("a free port");
    let port = held.local_addr().expect("its address").port();
    let url = format!("http://127.0.0.1:{port}");
    let (ok, r, out, err) = loadgen(&[
        "idle",
        "--url",
        &url,
        "--n",
        "5",
        "--hold",
        "0",
        "--prewarm",
        "0",
    ]);
    assert!(ok, "{out}{err}");
    assert_eq!(u(&r, "joined"), 0);
    assert_eq!(r["failures"]["connect:refused"], 5, "{r}");
    drop(held);
}

fn relay_ok(r: &Value) {
    assert_eq!(u(&r["setup"], "active_pairs"), 10, "{r}");
    let sent = u(r, "sent");
    assert!(sent > 0);
    assert_eq!(u(r, "received"), sent, "{r}");
    assert_eq!(u(r, "acked"), sent, "{r}");
    for k in [
        "duplicates",
        "reordered",
        "reordered_k",
        "misrouted",
        "foreign",
        "missing_seq",
    ] {
        assert_eq!(u(r, k), 0, "{k} in {r}");
    }
    assert_eq!(r["lost"], 0);
    assert_eq!(u(&r["latency_ms"], "count"), sent);
}

#[test]
fn relay_two_urls() {
    let stub = Stub::start(2, &[]);
    let tokens = tokens_file("two-urls", 10);
    let pid = stub.child.id().to_string();
    let url = format!("{},{}", stub.urls[0], stub.urls[1]);
    let (ok, r, out, err) = loadgen(&[
        "relay",
        "--url",
        &url,
        "--tokens-file",
        tokens.to_str().expect("utf-8 path"),
        "--pairs",
        "10",
        "--rate",
        "10",
        "--seconds",
        "2",
        "--warmup",
        "0.5",
        "--drain",
        "1",
        "--pids",
        &pid,
        "--db-pids",
        &pid,
    ]);
    assert!(ok, "{out}{err}");
    relay_ok(&r);
    assert_eq!(r["cross_node"], true);
    assert_eq!(u(&r, "sent"), 200);
    assert!(
        r["msgs_per_cpu_s"].is_number() || r["server"]["cpu_s"] == 0.0,
        "{r}"
    );
    assert!(r["db"]["cpu_s"].is_number(), "{r}");
}

#[test]
fn relay_tolerates_ack_first_and_take_ack_without_session_id() {
    let stub = Stub::start(1, &["--ack-first", "--take-ack-without-session-id"]);
    let tokens = tokens_file("variants", 10);
    let (ok, r, out, err) = loadgen(&[
        "relay",
        "--url",
        &stub.urls[0],
        "--tokens-file",
        tokens.to_str().expect("utf-8 path"),
        "--pairs",
        "10",
        "--rate",
        "10",
        "--seconds",
        "1.5",
        "--warmup",
        "0.5",
        "--drain",
        "1",
    ]);
    assert!(ok, "{out}{err}");
    relay_ok(&r);
}

#[test]
fn relay_counts_injected_faults() {
    // 10 pairs × 10 msg/s × 3 s = 300 messages, no warm-up so every one counts
    let stub = Stub::start(
        1,
        &[
            "--drop-every",
            "50",
            "--dup-every",
            "60",
            "--misroute-every",
            "70",
        ],
    );
    let tokens = tokens_file("faults", 10);
    let (ok, r, out, err) = loadgen(&[
        "relay",
        "--url",
        &stub.urls[0],
        "--tokens-file",
        tokens.to_str().expect("utf-8 path"),
        "--pairs",
        "10",
        "--rate",
        "10",
        "--seconds",
        "3",
        "--warmup",
        "0",
        "--drain",
        "0.5",
    ]);
    assert!(ok, "{out}{err}");
    assert_eq!(u(&r, "sent"), 300, "{r}");
    // drops: 50, 100, …, 300 (6); 350 would be past the end
    assert_eq!(u(&r, "lost"), 6, "{r}");
    // dups at 60, 120, 180, 240 (300 is a drop, which wins)
    assert_eq!(u(&r, "duplicates"), 4, "{r}");
    // misroutes at 70, 140, 210, 280
    assert_eq!(u(&r, "misrouted"), 4, "{r}");
    assert_eq!(u(&r, "acked"), 300, "{r}");
}

#[test]
fn relay_needs_a_token_per_pair() {
    let stub = Stub::start(1, &[]);
    let tokens = tokens_file("short", 2);
    let (ok, _, _, err) = loadgen(&[
        "relay",
        "--url",
        &stub.urls[0],
        "--tokens-file",
        tokens.to_str().expect("utf-8 path"),
        "--pairs",
        "3",
    ]);
    assert!(!ok);
    assert!(err.contains("needs 3 agent tokens"), "{err}");
}

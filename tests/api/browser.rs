//! The demo page in a real headless Chromium, driven over WebDriver: the
//! page duet serves opens its socket (a browser always sends `Origin`),
//! joins, and shows its place in the queue; the join is real (the queue API
//! sees the customer).
//!
//! Chromium and its driver come from Debian (`scripts/services.sh
//! --chromium`, which `scripts/test.sh` runs); `DUET_TEST_CHROMIUM` and
//! `DUET_TEST_CHROMEDRIVER` name other binaries.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::TestApp;

fn binary(var: &str, default: &str) -> String {
    let bin = std::env::var(var).unwrap_or_else(|_| default.to_owned());
    assert!(std::path::Path::new(&bin).exists(), "{bin} is missing: run scripts/services.sh --chromium (scripts/test.sh does)");
    bin
}

/// A chromedriver on a free port, and one headless browser session in it.
struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
    profile: std::path::PathBuf,
}

impl Browser {
    async fn start() -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port");
        let driver = Command::new(binary("DUET_TEST_CHROMEDRIVER", "/usr/bin/chromedriver"))
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while http.get(format!("{base}/status")).send().await.is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not answer");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let profile = std::env::temp_dir().join(format!("duet-chromium-{}-{port}", std::process::id()));
        // The probe's flags: without the background-networking ones Chromium
        // keeps calling out of this closed machine.
        let args = [
            "--headless=new".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            format!("--user-data-dir={}", profile.display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
            "binary": binary("DUET_TEST_CHROMIUM", "/usr/bin/chromium"), "args": args }}}});
        let r: Value = http.post(format!("{base}/session")).json(&caps).send().await.expect("new session").json().await.expect("json");
        let session = r["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no WebDriver session: {r}")).to_owned();
        Browser { driver, base, session, http, profile }
    }

    async fn command(&self, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}/{path}", self.base, self.session);
        let r: Value = self.http.post(url).json(&body).send().await.expect("webdriver").json().await.expect("json");
        r["value"].clone()
    }

    async fn open(&self, url: &str) {
        self.command("url", json!({"url": url})).await;
    }

    /// Evaluates `script` in the page until `pred` holds (or fails after 10 s).
    async fn wait_for(&self, script: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = self.command("execute/sync", json!({"script": script, "args": []})).await;
            if pred(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "{script} never held; last value {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Browser {
    /// Ends the browser session (the driver quits Chromium).
    async fn close(self) {
        let _ = self.http.delete(format!("{}/session/{}", self.base, self.session)).send().await;
    }
}

/// One blocking HTTP request to the driver, for `Drop` (no runtime there).
/// Never signal a process group from a test: `kill -KILL -PID` through the
/// procps binary took down every process of the machine here.
fn blocking_request(base: &str, method: &str, path: &str) {
    let Some(addr) = base.strip_prefix("http://") else { return };
    let Ok(mut s) = std::net::TcpStream::connect(addr) else { return };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Quits Chromium if `close` was not reached (a failed test), then
        // the driver itself; both are no-ops once done.
        blocking_request(&self.base, "DELETE", &format!("/session/{}", self.session));
        blocking_request(&self.base, "GET", "/shutdown");
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

#[tokio::test]
async fn the_demo_page_joins_the_queue_from_a_browser() {
    let app = TestApp::spawn().await;
    let browser = Browser::start().await;
    browser.open(&format!("http://127.0.0.1:{}/?name=Browser%20Ann&topic=browser&join", app.port)).await;
    let status = browser
        .wait_for("return document.getElementById('status').textContent", |v| v.as_str().is_some_and(|s| s.starts_with("In queue")))
        .await;
    assert!(status.as_str().is_some_and(|s| s.starts_with("In queue: position 1 of 1")), "{status}");
    let log = browser.wait_for("return document.getElementById('log').textContent", |v| v.is_string()).await;
    assert!(log.as_str().is_some_and(|l| l.contains("· session ")), "the session event reached the page: {log}");

    // The join is real: the customer waits in the topic's queue.
    let token = app.admin_token("browser-admin");
    let queues: Value = app.get("/api/queues", Some(&token)).await.json().await.expect("json");
    let topic = queues["queues"].as_array().and_then(|q| q.iter().find(|t| t["topic"] == "browser")).cloned();
    let waiting = topic.as_ref().and_then(|t| t["waiting"].as_array()).cloned().unwrap_or_default();
    assert_eq!(waiting.len(), 1, "{queues}");
    assert_eq!(waiting[0]["name"], "Browser Ann");
    browser.close().await;
}

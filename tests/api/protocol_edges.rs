//! The edges of the wire contract (PROTOCOL.md): bad input of every kind,
//! transport limits (frame size, binary frames, Origin, admin auth),
//! heartbeats, rate limits, slow consumers, and the switches that refuse
//! service (`DUET_QUEUE_ENABLED`, no language model).
//!
//! Some tests need a peer that misbehaves below the WebSocket library (never
//! answers pings, stops reading with a tiny receive buffer); [`RawWs`] is a
//! minimal hand-rolled client for those.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite;

use crate::support::{join, Client, Options, TestApp, DEADLINE};

// ---- helpers ---------------------------------------------------------------

fn app_env(env: &[(&'static str, &str)]) -> Options {
    Options { env: env.iter().map(|(k, v)| (*k, (*v).to_owned())).collect(), ..Options::default() }
}

fn is_answer(v: &Value) -> bool {
    v["type"] == "ack" || v["type"] == "error"
}

/// A valid `ping` still gets its `pong`: the socket is open and serving.
pub async fn still_open(c: &mut Client) {
    let r = c.send_ref(json!({"type":"ping"})).await;
    let pong = c.wait_type("pong").await;
    assert!(pong.get("ref").is_none(), "the ref's one answer is the ack: {pong}");
    let ack = c.wait_for("the ping's ack", |v| v["ref"] == json!(r)).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert!(c.closed.is_none(), "socket closed: {:?}", c.closed);
}

/// The value of a Prometheus sample (0 when absent).
pub async fn metric(app: &TestApp, name: &str) -> f64 {
    let body = app.get("/metrics", None).await.text().await.expect("metrics body");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            if k == name {
                v.split_whitespace().next()?.parse().ok()
            } else {
                None
            }
        })
        .unwrap_or(0.0)
}

/// The HTTP status of a refused upgrade (panics if the upgrade succeeded).
fn refused_status(r: Result<Client, tungstenite::Error>, what: &str) -> u16 {
    match r {
        Err(tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("{what}: expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("{what}: expected an HTTP refusal, the upgrade succeeded"),
    }
}

/// One frame read by [`RawWs`].
#[allow(dead_code)]
#[derive(Debug)]
pub enum RawFrame {
    Text(String),
    Binary(usize),
    Ping,
    Pong,
    Close(Option<u16>),
    Other(u8),
}

#[derive(Debug)]
pub enum RawRead {
    Frame(RawFrame),
    Timeout,
    /// The TCP connection ended (FIN or reset).
    Eof,
}

/// A bare WebSocket client over one TCP socket: it writes only what it is
/// told to (it never answers pings) and reads only when asked (so it can
/// play a peer that stopped reading).
pub struct RawWs {
    stream: TcpStream,
    buf: Vec<u8>,
    pub status: u16,
    pub head: String,
}

impl RawWs {
    pub async fn connect(port: u16, path: &str, headers: &[(&str, &str)], recv_buffer: Option<u32>) -> RawWs {
        let socket = TcpSocket::new_v4().expect("tcp socket");
        if let Some(n) = recv_buffer {
            socket.set_recv_buffer_size(n).expect("SO_RCVBUF");
        }
        let mut stream = socket.connect(SocketAddr::from(([127, 0, 0, 1], port))).await.expect("tcp connect");
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await.expect("write upgrade request");
        let until = Instant::now() + DEADLINE;
        let mut buf = Vec::new();
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout_at(until.into(), stream.read(&mut chunk))
                .await
                .expect("upgrade answered in time")
                .expect("read upgrade answer");
            assert!(n > 0, "connection closed during the upgrade");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("an HTTP status line");
        buf.drain(..end);
        RawWs { stream, buf, status, head }
    }

    async fn fill(&mut self, n: usize, until: Instant) -> Result<(), RawRead> {
        let mut chunk = vec![0u8; 64 * 1024];
        while self.buf.len() < n {
            match tokio::time::timeout_at(until.into(), self.stream.read(&mut chunk)).await {
                Err(_) => return Err(RawRead::Timeout),
                Ok(Ok(0)) | Ok(Err(_)) => return Err(RawRead::Eof),
                Ok(Ok(k)) => self.buf.extend_from_slice(&chunk[..k]),
            }
        }
        Ok(())
    }

    /// Reads one frame (a partial frame stays buffered across timeouts).
    pub async fn read(&mut self, within: Duration) -> RawRead {
        let until = Instant::now() + within;
        if let Err(e) = self.fill(2, until).await {
            return e;
        }
        let (hlen, len) = match self.buf[1] & 0x7f {
            126 => {
                if let Err(e) = self.fill(4, until).await {
                    return e;
                }
                (4, u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize)
            }
            127 => {
                if let Err(e) = self.fill(10, until).await {
                    return e;
                }
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.buf[2..10]);
                (10, u64::from_be_bytes(b) as usize)
            }
            n => (2, n as usize),
        };
        if let Err(e) = self.fill(hlen + len, until).await {
            return e;
        }
        let opcode = self.buf[0] & 0x0f;
        let payload: Vec<u8> = self.buf.drain(..hlen + len).skip(hlen).collect();
        RawRead::Frame(match opcode {
            0x1 => RawFrame::Text(String::from_utf8(payload).expect("utf-8 text frame")),
            0x2 => RawFrame::Binary(payload.len()),
            0x8 => RawFrame::Close((payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]))),
            0x9 => RawFrame::Ping,
            0xA => RawFrame::Pong,
            o => RawFrame::Other(o),
        })
    }

    /// The next JSON text frame matching `pred` (others are dropped).
    pub async fn wait_json(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let until = Instant::now() + DEADLINE;
        loop {
            let left = until.checked_duration_since(Instant::now()).unwrap_or_default();
            match self.read(left).await {
                RawRead::Frame(RawFrame::Text(t)) => {
                    let v: Value = serde_json::from_str(&t).expect("server sends JSON");
                    if pred(&v) {
                        return v;
                    }
                }
                RawRead::Frame(_) => {}
                other => panic!("raw client waiting for {what}: {other:?}"),
            }
        }
    }

    async fn send_frame(&mut self, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
        let mask = [0x37u8, 0xfa, 0x21, 0x3d];
        let mut f = vec![0x80 | opcode];
        let n = payload.len();
        if n < 126 {
            f.push(0x80 | n as u8);
        } else if n < 65536 {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&f).await
    }

    pub async fn send_text(&mut self, text: &str) {
        self.send_frame(0x1, text.as_bytes()).await.expect("raw send");
    }

    /// Reads (without answering anything) until the server closes: the close
    /// code if a close frame came, `None` if the TCP connection just ended.
    /// Panics if the socket is still open after `within`.
    pub async fn wait_closed(&mut self, within: Duration) -> (Option<u16>, Vec<Value>) {
        let until = Instant::now() + within;
        let mut texts = Vec::new();
        loop {
            let left = until.checked_duration_since(Instant::now()).unwrap_or_default();
            match self.read(left).await {
                RawRead::Frame(RawFrame::Close(code)) => return (code, texts),
                RawRead::Frame(RawFrame::Text(t)) => texts.push(serde_json::from_str(&t).expect("server sends JSON")),
                RawRead::Frame(_) => {}
                RawRead::Eof => return (None, texts),
                RawRead::Timeout => panic!("the server did not close the socket within {within:?} ({} text frames read)", texts.len()),
            }
        }
    }
}

/// A frame `{"type":"ping","ref":r,"pad":"xx…"}` of exactly `len` bytes.
fn padded_ping(r: u64, len: usize) -> String {
    let base = format!(r#"{{"type":"ping","ref":{r},"pad":""}}"#);
    assert!(len >= base.len());
    format!(r#"{{"type":"ping","ref":{r},"pad":"{}"}}"#, "x".repeat(len - base.len()))
}

// ---- bad input -------------------------------------------------------------

/// One bad frame: its text (with `{R}` where the ref goes), whether it can
/// carry a ref, and a word the error message must contain.
struct Bad {
    frame: String,
    has_ref: bool,
    names: &'static str,
}

fn bad(frame: impl Into<String>, names: &'static str) -> Bad {
    Bad { frame: frame.into(), has_ref: true, names }
}

fn bad_no_ref(frame: impl Into<String>, names: &'static str) -> Bad {
    Bad { frame: frame.into(), has_ref: false, names }
}

fn customer_bad_inputs() -> Vec<Bad> {
    let n81_ascii = "a".repeat(81);
    let n81_two_byte = "é".repeat(81);
    let n81_four_byte = "😀".repeat(81);
    let t4001 = "a".repeat(4001);
    let t4001_two_byte = "é".repeat(4001);
    vec![
        bad_no_ref("not json", "JSON"),
        bad_no_ref("[1,2,3]", "JSON"),
        bad_no_ref(r#""a string""#, "JSON"),
        bad_no_ref("42", "JSON"),
        bad(r#"{"ref":{R}}"#, "type"),
        bad(r#"{"type":"fly","ref":{R}}"#, "type"),
        bad(r#"{"type":"JOIN","name":"Ann","topic":"support","ref":{R}}"#, "type"),
        // join
        bad(r#"{"type":"join","topic":"support","ref":{R}}"#, "name"),
        bad(r#"{"type":"join","name":"","topic":"support","ref":{R}}"#, "name"),
        bad(format!(r#"{{"type":"join","name":"{n81_ascii}","topic":"support","ref":{{R}}}}"#), "name"),
        bad(format!(r#"{{"type":"join","name":"{n81_two_byte}","topic":"support","ref":{{R}}}}"#), "name"),
        bad(format!(r#"{{"type":"join","name":"{n81_four_byte}","topic":"support","ref":{{R}}}}"#), "name"),
        bad(r#"{"type":"join","name":5,"topic":"support","ref":{R}}"#, "name"),
        bad(r#"{"type":"join","name":"Ann","ref":{R}}"#, "topic"),
        bad(r#"{"type":"join","name":"Ann","topic":"","ref":{R}}"#, "topic"),
        bad(r#"{"type":"join","name":"Ann","topic":"no spaces","ref":{R}}"#, "topic"),
        bad(r#"{"type":"join","name":"Ann","topic":"a/b","ref":{R}}"#, "topic"),
        bad(r#"{"type":"join","name":"Ann","topic":7,"ref":{R}}"#, "topic"),
        bad(r#"{"type":"join","name":"Ann","topic":"support","mode":"robot","ref":{R}}"#, "mode"),
        bad(r#"{"type":"join","name":"Ann","topic":"support","mode":1,"ref":{R}}"#, "mode"),
        bad(r#"{"type":"join","name":"Ann","topic":"support","audio":{"sample_rate":100},"ref":{R}}"#, "sample_rate"),
        // say
        bad(r#"{"type":"say","ref":{R}}"#, "text"),
        bad(r#"{"type":"say","text":"","ref":{R}}"#, "text"),
        bad(format!(r#"{{"type":"say","text":"{t4001}","ref":{{R}}}}"#), "text"),
        bad(format!(r#"{{"type":"say","text":"{t4001_two_byte}","ref":{{R}}}}"#), "text"),
        bad(r#"{"type":"say","text":5,"ref":{R}}"#, "text"),
        bad(r#"{"type":"say","text":["hi"],"ref":{R}}"#, "text"),
        bad(r#"{"type":"say","text":null,"ref":{R}}"#, "text"),
        // typing
        bad(r#"{"type":"typing","on":"yes","ref":{R}}"#, "on"),
        bad(r#"{"type":"typing","on":1,"ref":{R}}"#, "on"),
        bad(r#"{"type":"typing","ref":{R}}"#, "on"),
        // rtc
        bad(r#"{"type":"rtc","kind":"bogus","data":{},"ref":{R}}"#, "kind"),
        bad(r#"{"type":"rtc","kind":3,"data":{},"ref":{R}}"#, "kind"),
        bad(r#"{"type":"rtc","data":{},"ref":{R}}"#, "kind"),
        bad(r#"{"type":"rtc","kind":"offer","data":[1],"ref":{R}}"#, "data"),
        bad(r#"{"type":"rtc","kind":"offer","data":"v=0","ref":{R}}"#, "data"),
        bad(r#"{"type":"rtc","kind":"offer","data":null,"ref":{R}}"#, "data"),
        bad(r#"{"type":"rtc","kind":"offer","ref":{R}}"#, "data"),
        // stats
        bad(r#"{"type":"stats","rtt_ms":-1,"loss_pct":0,"jitter_ms":1,"ref":{R}}"#, "rtt_ms"),
        bad(r#"{"type":"stats","rtt_ms":"fast","loss_pct":0,"jitter_ms":1,"ref":{R}}"#, "rtt_ms"),
        bad(r#"{"type":"stats","loss_pct":0,"jitter_ms":1,"ref":{R}}"#, "rtt_ms"),
        bad(r#"{"type":"stats","rtt_ms":10,"loss_pct":101,"jitter_ms":1,"ref":{R}}"#, "loss_pct"),
        bad(r#"{"type":"stats","rtt_ms":10,"loss_pct":-0.5,"jitter_ms":1,"ref":{R}}"#, "loss_pct"),
        bad(r#"{"type":"stats","rtt_ms":10,"loss_pct":0,"ref":{R}}"#, "jitter_ms"),
        bad(r#"{"type":"stats","rtt_ms":10,"loss_pct":0,"jitter_ms":true,"ref":{R}}"#, "jitter_ms"),
        bad(r#"{"type":"stats","rtt_ms":10,"loss_pct":0,"jitter_ms":1,"audio_only":"yes","ref":{R}}"#, "audio_only"),
        // resume
        bad(r#"{"type":"resume","session_id":"s1","resume_token":"t","last_seq":-1,"ref":{R}}"#, "last_seq"),
        bad(r#"{"type":"resume","session_id":"s1","resume_token":"t","last_seq":"3","ref":{R}}"#, "last_seq"),
        bad(r#"{"type":"resume","session_id":"s1","resume_token":"t","last_seq":1.5,"ref":{R}}"#, "last_seq"),
        bad(r#"{"type":"resume","session_id":"s1","resume_token":"t","ref":{R}}"#, "last_seq"),
        bad(r#"{"type":"resume","resume_token":"t","last_seq":0,"ref":{R}}"#, "session_id"),
        bad(r#"{"type":"resume","session_id":"s1","last_seq":0,"ref":{R}}"#, "resume_token"),
    ]
}

fn agent_bad_inputs() -> Vec<Bad> {
    let t4001 = "a".repeat(4001);
    vec![
        bad_no_ref("not json", "JSON"),
        bad_no_ref("[]", "JSON"),
        bad(r#"{"ref":{R}}"#, "type"),
        bad(r#"{"type":"dance","ref":{R}}"#, "type"),
        bad(r#"{"type":"take","ref":{R}}"#, "topic"),
        bad(r#"{"type":"take","topic":"bad topic","ref":{R}}"#, "topic"),
        bad(r#"{"type":"take","session_id":5,"ref":{R}}"#, "session_id"),
        bad(r#"{"type":"take","session_id":"","ref":{R}}"#, "session_id"),
        bad(r#"{"type":"say","text":"hi","ref":{R}}"#, "session_id"),
        bad(r#"{"type":"say","session_id":"s1","text":"","ref":{R}}"#, "text"),
        bad(format!(r#"{{"type":"say","session_id":"s1","text":"{t4001}","ref":{{R}}}}"#), "text"),
        bad(r#"{"type":"say","session_id":"s1","text":false,"ref":{R}}"#, "text"),
        bad(r#"{"type":"typing","session_id":"s1","on":"x","ref":{R}}"#, "on"),
        bad(r#"{"type":"rtc","session_id":"s1","kind":"bogus","data":{},"ref":{R}}"#, "kind"),
        bad(r#"{"type":"rtc","session_id":"s1","kind":"answer","data":[],"ref":{R}}"#, "data"),
        bad(r#"{"type":"end","ref":{R}}"#, "session_id"),
        bad(r#"{"type":"resume","session_id":"s1","last_seq":-1,"ref":{R}}"#, "last_seq"),
    ]
}

/// Sends every bad frame; each gets `bad_request` naming the field, with its
/// `ref`, exactly once; the socket stays open throughout.
async fn check_bad_inputs(c: &mut Client, cases: Vec<Bad>) {
    let mut refs: Vec<Value> = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        // Integer and string refs alternate; both must come back verbatim.
        let r = if i % 3 == 2 { json!(format!("bad-{i}")) } else { json!(1000 + i) };
        let text = case.frame.replace("{R}", &r.to_string());
        c.send_raw(&text).await;
        let shown: String = text.chars().take(100).collect();
        let e = if case.has_ref {
            refs.push(r.clone());
            c.reply(r.clone()).await
        } else {
            c.wait_for("an error without ref", |v| v["type"] == "error" && v.get("ref").is_none()).await
        };
        assert_eq!(e["type"], "error", "{shown} → {e}");
        assert_eq!(e["code"], "bad_request", "{shown} → {e}");
        let message = e["message"].as_str().unwrap_or_default();
        assert!(
            message.to_lowercase().contains(&case.names.to_lowercase()),
            "{shown}: the message should name `{}`: {e}",
            case.names
        );
        still_open(c).await;
    }
    // Exactly one answer per ref: no second one, neither already buffered
    // nor arriving late; and no stray error without a ref either.
    c.assert_none(Duration::from_millis(300), |v| {
        (is_answer(v) && refs.contains(&v["ref"])) || (v["type"] == "error" && v.get("ref").is_none())
    })
    .await;
    still_open(c).await;
}

#[tokio::test]
async fn every_bad_customer_input_is_a_bad_request_naming_the_field() {
    let app = TestApp::spawn().await;
    let mut c = app.customer().await;
    check_bad_inputs(&mut c, customer_bad_inputs()).await;

    // Valid frames pass the decoder: without a session they are `not_found`
    // (a 4000-character text of 2-byte characters is valid).
    let long = "é".repeat(4000);
    for frame in [
        json!({"type":"say","text":long}),
        json!({"type":"rtc","kind":"offer","data":{"sdp":"v=0"}}),
        json!({"type":"leave"}),
    ] {
        let e = c.request(frame.clone()).await;
        assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("not_found")), "{e}");
    }

    // 80 code points of a 2-byte character are a valid name.
    let ok = "é".repeat(80);
    let r = c.send_ref(json!({"type":"join","name":ok,"topic":"support"})).await;
    let session = c.wait_type("session").await;
    assert_eq!(session["seq"], 1);
    let ack = c.reply(json!(r)).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["session_id"], session["session_id"]);
    still_open(&mut c).await;

    // 80 code points of a 4-byte character (320 bytes) too.
    let mut d = app.customer().await;
    let r = d.send_ref(json!({"type":"join","name":"😀".repeat(80),"topic":"support"})).await;
    let ack = d.reply(json!(r)).await;
    assert_eq!(ack["type"], "ack", "{ack}");
}

#[tokio::test]
async fn every_bad_agent_input_is_a_bad_request_naming_the_field() {
    let app = TestApp::spawn().await;
    let mut a = app.agent("bad-ann").await;
    check_bad_inputs(&mut a, agent_bad_inputs()).await;
}

/// PROTOCOL.md: every client message with a `ref` gets exactly one answer
/// with it — also when the `type` field itself has the wrong JSON type.
#[tokio::test]
async fn a_non_string_type_is_a_bad_request_with_the_ref() {
    let app = TestApp::spawn().await;
    let mut c = app.customer().await;
    for (i, frame) in [r#"{"type":5,"ref":R}"#, r#"{"type":null,"ref":R}"#, r#"{"type":["say"],"ref":R}"#].iter().enumerate() {
        let r = 70 + i as u64;
        c.send_raw(&frame.replace('R', &r.to_string())).await;
        let e = c.wait_type("error").await;
        assert_eq!(e["ref"], json!(r), "{frame}: the answer must carry the ref: {e}");
        assert_eq!(e["code"], "bad_request", "{e}");
        assert!(e["message"].as_str().unwrap_or_default().contains("type"), "the message should name `type`: {e}");
    }
    still_open(&mut c).await;
}

/// PROTOCOL.md: "Every client message that has a `ref` gets exactly one
/// answer with the same `ref`: either `ack` or `error`" — ephemeral ones too.
#[tokio::test]
async fn ephemeral_messages_with_a_ref_get_one_answer() {
    let app = TestApp::spawn().await;
    let mut agent = app.agent("eph-ann").await;
    let mut cust = join(&app, "Eph", "support").await;
    let take = agent.request(json!({"type":"take","topic":"support"})).await;
    assert_eq!(take["type"], "ack", "{take}");
    cust.client.wait_type("assigned").await;
    for frame in [json!({"type":"typing","on":true}), json!({"type":"stats","rtt_ms":10,"loss_pct":0,"jitter_ms":1})] {
        let r = cust.client.send_ref(frame.clone()).await;
        let a = cust.client.read_reply_within(json!(r), Duration::from_secs(3)).await;
        assert!(a.is_some(), "{frame} with ref {r}: no answer");
    }
    let r = agent.send_ref(json!({"type":"typing","session_id":cust.session_id,"on":true})).await;
    assert!(agent.read_reply_within(json!(r), Duration::from_secs(3)).await.is_some(), "agent typing with ref {r}: no answer");
}

trait ReplyWithin {
    async fn read_reply_within(&mut self, r: Value, within: Duration) -> Option<Value>;
}

impl ReplyWithin for Client {
    /// The answer to `r`, or `None` when none came within `within`.
    async fn read_reply_within(&mut self, r: Value, within: Duration) -> Option<Value> {
        let pred = |v: &Value| is_answer(v) && v["ref"] == r;
        if let Some(i) = self.buffered.iter().position(pred) {
            return self.buffered.remove(i);
        }
        let until = Instant::now() + within;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match self.read(left).await {
                Some(v) if pred(&v) => return Some(v),
                Some(v) => self.buffered.push_back(v),
                None => break,
            }
        }
        None
    }
}

// ---- transport ---------------------------------------------------------------

#[tokio::test]
async fn an_oversized_frame_closes_with_1009() {
    let app = TestApp::spawn_with(app_env(&[("DUET_MAX_MESSAGE_BYTES", "8192")])).await;
    let mut c = Client::connect(&app.ws_url("/ws"), &[]).await.expect("connects");
    let hello = c.recv().await;
    assert_eq!(hello["max_message_bytes"], 8192, "{hello}");
    // Exactly at the limit: fine.
    c.send_raw(&padded_ping(1, 8192)).await;
    c.wait_type("pong").await;
    c.wait_for("the ping's ack", |v| v["type"] == "ack" && v["ref"] == 1).await;
    // One byte over: the socket is closed with 1009.
    c.send_raw(&padded_ping(2, 8193)).await;
    assert_eq!(c.wait_closed(DEADLINE).await, Some(1009));
    assert!(!c.buffered.iter().any(|v| v["type"] == "pong"), "the oversized frame was not handled: {:?}", c.buffered);

    // The same on /admin/ws.
    let mut a = app.agent("big-ann").await;
    a.send_raw(&padded_ping(3, 8192)).await;
    a.wait_type("pong").await;
    a.wait_for("the ping's ack", |v| v["type"] == "ack" && v["ref"] == 3).await;
    a.send_raw(&padded_ping(4, 20_000)).await;
    assert_eq!(a.wait_closed(DEADLINE).await, Some(1009));
}

#[tokio::test]
async fn a_binary_frame_gets_an_error_and_the_socket_stays() {
    let app = TestApp::spawn().await;
    let mut c = app.customer().await;
    c.send_binary(vec![0u8; 640]).await;
    let e = c.wait_type("error").await;
    assert_eq!(e["code"], "bad_request", "{e}");
    still_open(&mut c).await;
    // In a human session too.
    let mut j = join(&app, "Bin", "support").await;
    j.client.send_binary(vec![1u8; 320]).await;
    let e = j.client.wait_type("error").await;
    assert_eq!(e["code"], "bad_request", "{e}");
    still_open(&mut j.client).await;
    let say = j.client.request(json!({"type":"say","text":"still here"})).await;
    assert_eq!(say["type"], "ack", "{say}");

    let mut a = app.agent("bin-ann").await;
    a.send_binary(vec![0u8; 10]).await;
    let e = a.wait_type("error").await;
    assert_eq!(e["code"], "bad_request", "{e}");
    still_open(&mut a).await;
}

#[tokio::test]
async fn a_foreign_origin_is_refused_with_403_and_no_origin_is_allowed() {
    let app = TestApp::spawn_with(app_env(&[("DUET_ALLOWED_ORIGINS", "http://good.example")])).await;
    let token = app.admin_token("origin-ann");
    let auth = format!("Bearer {token}");
    for origin in ["http://evil.example", "http://good.example.evil.example", "https://good.example", "null"] {
        let r = Client::connect(&app.ws_url("/ws"), &[("Origin", origin)]).await;
        assert_eq!(refused_status(r, &format!("/ws from {origin}")), 403, "/ws from {origin}");
        let r = Client::connect(&app.ws_url("/admin/ws"), &[("Origin", origin), ("Authorization", &auth)]).await;
        assert_eq!(refused_status(r, &format!("/admin/ws from {origin}")), 403, "/admin/ws from {origin}");
    }
    // The allowed origin, duet's own (its demo and admin pages), and no
    // Origin at all (a non-browser client).
    let own = format!("http://127.0.0.1:{}", app.port);
    for headers in [vec![("Origin", "http://good.example")], vec![("Origin", own.as_str())], vec![]] {
        let mut c = Client::connect(&app.ws_url("/ws"), &headers).await.expect("allowed on /ws");
        assert_eq!(c.recv().await["type"], "hello");
        still_open(&mut c).await;
        let mut h = headers.clone();
        h.push(("Authorization", &auth));
        let mut a = Client::connect(&app.ws_url("/admin/ws"), &h).await.expect("allowed on /admin/ws");
        assert_eq!(a.recv().await["type"], "hello");
        still_open(&mut a).await;
    }
}

#[tokio::test]
async fn admin_ws_without_a_valid_session_is_401() {
    let app = TestApp::spawn().await;
    let token = app.admin_token("auth-ann");
    let url = app.ws_url("/admin/ws");
    assert_eq!(refused_status(Client::connect(&url, &[]).await, "no token"), 401);
    assert_eq!(refused_status(Client::connect(&url, &[("Authorization", "Bearer wrong-token")]).await, "wrong token"), 401);
    let almost = format!("Bearer {}x", token);
    assert_eq!(refused_status(Client::connect(&url, &[("Authorization", &almost)]).await, "token + x"), 401);
    assert_eq!(refused_status(Client::connect(&url, &[("Authorization", "Bearer ")]).await, "empty token"), 401);
    assert_eq!(refused_status(Client::connect(&url, &[("Cookie", "duet_session=wrong-token")]).await, "bad cookie"), 401);
    // The right token in either form works.
    let auth = format!("Bearer {token}");
    let mut a = Client::connect(&url, &[("Authorization", &auth)]).await.expect("bearer works");
    assert_eq!(a.recv().await["type"], "hello");
    let cookie = format!("duet_session={token}");
    let mut b = Client::connect(&url, &[("Cookie", &cookie)]).await.expect("cookie works");
    assert_eq!(b.recv().await["type"], "hello");
}

#[tokio::test]
async fn heartbeat_drops_a_silent_client_and_keeps_a_live_one() {
    let app = TestApp::spawn_with(app_env(&[("DUET_HEARTBEAT_S", "1")])).await;
    let mut live = Client::connect(&app.ws_url("/ws"), &[]).await.expect("connects");
    let hello = live.recv().await;
    assert_eq!(hello["heartbeat_s"], 1, "{hello}");
    // Never answers a ping (the raw client writes nothing by itself).
    let mut silent = RawWs::connect(app.port, "/ws", &[], None).await;
    assert_eq!(silent.status, 101, "{}", silent.head);
    // Sends application pings, but never a pong frame: that is not a pong.
    let mut chatty = RawWs::connect(app.port, "/ws", &[], None).await;
    assert_eq!(chatty.status, 101, "{}", chatty.head);
    let started = Instant::now();

    let silent_run = async {
        let mut pings = 0;
        loop {
            let left = (started + Duration::from_secs(8)).checked_duration_since(Instant::now()).unwrap_or_default();
            match silent.read(left).await {
                RawRead::Frame(RawFrame::Ping) => pings += 1,
                RawRead::Frame(RawFrame::Close(code)) => return (code, pings, started.elapsed()),
                RawRead::Frame(_) => {}
                RawRead::Eof => return (None, pings, started.elapsed()),
                RawRead::Timeout => panic!("a client that never answers pings was not dropped within 8 s ({pings} pings)"),
            }
        }
    };
    let chatty_run = async {
        let mut pongs = 0;
        let mut n = 0u64;
        loop {
            assert!(started.elapsed() < Duration::from_secs(8), "a client that only sends JSON pings was not dropped within 8 s");
            n += 1;
            if chatty.send_frame(0x1, format!(r#"{{"type":"ping","ref":{n}}}"#).as_bytes()).await.is_err() {
                return (None, pongs, started.elapsed());
            }
            let until = Instant::now() + Duration::from_millis(300);
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                match chatty.read(left).await {
                    RawRead::Frame(RawFrame::Text(t)) if t.contains("\"pong\"") => pongs += 1,
                    RawRead::Frame(RawFrame::Close(code)) => return (code, pongs, started.elapsed()),
                    RawRead::Eof => return (None, pongs, started.elapsed()),
                    RawRead::Timeout => break,
                    RawRead::Frame(_) => {}
                }
            }
        }
    };
    let live_run = async {
        // Reads (and so answers pings) for well past two intervals.
        live.assert_none(Duration::from_millis(4500), |_| true).await;
        assert!(live.closed.is_none(), "the live client was dropped: {:?}", live.closed);
        still_open(&mut live).await;
    };
    let ((code, pings, after), (ccode, pongs, cafter), ()) = tokio::join!(silent_run, chatty_run, live_run);
    assert!(pings >= 2, "the server pings every second ({pings} pings before the drop)");
    assert_eq!(code, Some(1001), "dropped after {after:?}");
    assert!(after >= Duration::from_millis(1900), "dropped too early: {after:?}");
    assert!(after <= Duration::from_secs(6), "dropped too late: {after:?}");
    assert!(pongs >= 2, "JSON pings were answered meanwhile ({pongs})");
    assert_eq!(ccode, Some(1001), "JSON pings are no pong frames; dropped after {cafter:?}");
    assert!(metric(&app, "duet_heartbeat_drops_total").await >= 2.0);
}

// ---- rate limits -------------------------------------------------------------

/// Sends `n` pings as fast as possible and collects the one answer of each.
async fn flood_pings(c: &mut Client, n: u64) -> HashMap<u64, Value> {
    for i in 0..n {
        c.send(json!({"type":"ping","ref":i})).await;
    }
    let mut answers: HashMap<u64, Value> = HashMap::new();
    let until = Instant::now() + DEADLINE;
    while (answers.len() as u64) < n {
        let left = until.checked_duration_since(Instant::now()).unwrap_or_default();
        let Some(v) = c.read(left).await else {
            panic!("only {} of {n} pings answered (closed: {:?})", answers.len(), c.closed);
        };
        if let Some(r) = v["ref"].as_u64() {
            if is_answer(&v) {
                assert!(answers.insert(r, v.clone()).is_none(), "ref {r} answered twice: {v}");
            }
        }
    }
    // No second answer for any of them.
    c.assert_none(Duration::from_millis(300), |v| v["ref"].as_u64().is_some_and(|r| r < n)).await;
    answers
}

#[tokio::test]
async fn a_flood_is_rate_limited_above_the_floor() {
    let app = TestApp::spawn().await;
    let mut c = app.customer().await;
    let answers = flood_pings(&mut c, 400).await;
    // The floor: a burst of 200 never bites.
    for i in 0..200 {
        assert_eq!(answers[&i]["type"], "ack", "frame {i} of the first 200: {}", answers[&i]);
    }
    let limited: Vec<&Value> = answers.values().filter(|v| v["type"] == "error").collect();
    assert!(!limited.is_empty(), "400 frames at once were all served");
    for e in &limited {
        assert_eq!(e["code"], "rate_limited", "{e}");
        assert!(e["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{e}");
    }
    // Not closed, and served again once the client slows down.
    assert!(c.closed.is_none());
    let until = Instant::now() + DEADLINE;
    loop {
        let r = c.send_ref(json!({"type":"ping"})).await;
        let v = c.wait_for("the answer", |v| v["ref"] == json!(r)).await;
        if v["type"] == "ack" {
            break;
        }
        assert_eq!(v["code"], "rate_limited", "{v}");
        assert!(Instant::now() < until, "not served again within {DEADLINE:?}");
        // Pace the retries as the server asked (polling with a deadline).
        let _ = c.read(Duration::from_millis(100)).await.map(|v| c.buffered.push_back(v));
    }
}

/// A flood that goes on is closed with 1008, and the client reads every
/// answer it was due and the close frame itself: the server drains what the
/// client still sends after closing, so no reset makes the client's kernel
/// drop them (it did: 1006 and none of the answers, now and then).
#[tokio::test]
async fn a_flood_that_goes_on_is_closed_and_the_client_reads_everything_first() {
    let app = TestApp::spawn().await;
    for round in 0..3 {
        let mut c = app.customer().await;
        let n = 20_000u64;
        let pings: Vec<Value> = (0..n).map(|i| json!({"type":"ping","ref":i})).collect();
        c.send_all(&pings).await;
        let code = c.wait_closed(DEADLINE).await;
        assert_eq!(code, Some(1008), "round {round}: closed with a close frame");
        let answered: Vec<u64> = c.buffered.iter().filter(|v| is_answer(v)).filter_map(|v| v["ref"].as_u64()).collect();
        assert!(answered.len() >= 600, "round {round}: {} answers before the close", answered.len());
        let expected: Vec<u64> = (0..answered.len() as u64).collect();
        assert_eq!(answered, expected, "round {round}: one answer per frame, in order, up to the close");
        let kinds: Vec<&Value> = c.buffered.iter().filter(|v| is_answer(v)).map(|v| &v["type"]).take(200).collect();
        assert!(kinds.iter().all(|t| *t == "ack"), "round {round}: the floor's burst is served");
    }
}

#[tokio::test]
async fn rate_limits_off_lets_a_flood_through() {
    let app = TestApp::spawn_with(app_env(&[("DUET_RATE_LIMITS", "off")])).await;
    let mut c = app.customer().await;
    let answers = flood_pings(&mut c, 1000).await;
    let limited: Vec<&Value> = answers.values().filter(|v| v["type"] != "ack").collect();
    assert!(limited.is_empty(), "with DUET_RATE_LIMITS=off: {limited:?}");
    still_open(&mut c).await;
}

// ---- slow consumers ----------------------------------------------------------

/// A customer on a raw socket with a tiny receive buffer, joined to `topic`
/// and taken by `agent`. Returns (socket, session_id, resume_token, seq of
/// `assigned`).
async fn slow_customer(app: &TestApp, agent: &mut Client, topic: &str) -> (RawWs, String, String, i64) {
    let mut slow = RawWs::connect(app.port, "/ws", &[], Some(4096)).await;
    assert_eq!(slow.status, 101, "{}", slow.head);
    slow.wait_json("hello", |v| v["type"] == "hello").await;
    slow.send_text(&json!({"type":"join","name":"Slow","topic":topic,"ref":1}).to_string()).await;
    let session = slow.wait_json("session", |v| v["type"] == "session").await;
    slow.wait_json("queue", |v| v["type"] == "queue").await;
    let take = agent.request(json!({"type":"take","topic":topic})).await;
    assert_eq!(take["type"], "ack", "{take}");
    let assigned = slow.wait_json("assigned", |v| v["type"] == "assigned").await;
    (
        slow,
        session["session_id"].as_str().expect("session_id").to_owned(),
        session["resume_token"].as_str().expect("resume_token").to_owned(),
        assigned["seq"].as_i64().expect("seq"),
    )
}

fn big_text(i: usize) -> String {
    let head = format!("{i:05} ");
    format!("{head}{}", "x".repeat(4000 - head.len()))
}

/// Agent says in windows of 8 until the slow customer is cut off (or 3000
/// were sent); `between` runs every 200. Returns the acked seqs in order.
async fn flood_until_killed(app: &TestApp, agent: &mut Client, sid: &str, mut between: impl AsyncFnMut()) -> Vec<i64> {
    let mut seqs = Vec::new();
    while seqs.len() < 3000 {
        let mut refs = Vec::new();
        for _ in 0..8 {
            refs.push(agent.send_ref(json!({"type":"say","session_id":sid,"text":big_text(seqs.len() + refs.len())})).await);
        }
        for r in refs {
            let a = agent.reply(json!(r)).await;
            assert_eq!(a["type"], "ack", "say {r}: {a}");
            seqs.push(a["seq"].as_i64().expect("seq"));
        }
        if seqs.len() % 200 == 0 {
            between().await;
            if metric(app, "duet_slow_consumers_total").await >= 1.0 {
                return seqs;
            }
        }
    }
    panic!("3000 messages of 4000 characters to a customer that never reads did not cut it off");
}

#[tokio::test]
async fn a_slow_consumer_is_cut_off_and_the_node_keeps_serving() {
    let app = TestApp::spawn_with(app_env(&[("DUET_RATE_LIMITS", "off"), ("DUET_OUTBOX_FRAMES", "16")])).await;
    let mut agent = app.agent("slow-ann").await;
    let (mut slow, sid, token, assigned_seq) = slow_customer(&app, &mut agent, "slow").await;

    // A second conversation on the same node.
    let mut agent2 = app.agent("fast-bob").await;
    let mut fast = join(&app, "Fast", "fast").await;
    let t = agent2.request(json!({"type":"take","topic":"fast"})).await;
    assert_eq!(t["type"], "ack", "{t}");
    fast.client.wait_type("assigned").await;
    let mut rounds = 0;
    let mut round_trip = async || {
        rounds += 1;
        let text = format!("are you there? {rounds}");
        let started = Instant::now();
        let a = agent2.request(json!({"type":"say","session_id":fast.session_id,"text":text})).await;
        assert_eq!(a["type"], "ack", "{a}");
        let m = fast.client.wait_for("the agent's message", |v| v["type"] == "message" && v["text"] == text.as_str()).await;
        assert_eq!(m["seq"], a["seq"]);
        let back = fast.client.request(json!({"type":"say","text":format!("yes {rounds}")})).await;
        assert_eq!(back["type"], "ack", "{back}");
        agent2.wait_for("the customer's message", |v| v["type"] == "message" && v["seq"] == back["seq"]).await;
        assert!(started.elapsed() < Duration::from_secs(2), "the other conversation stalled: {:?}", started.elapsed());
    };

    // The slow customer never reads again while the agent talks.
    let seqs = flood_until_killed(&app, &mut agent, &sid, &mut round_trip).await;
    eprintln!("cut off after {} messages of 4000 characters", seqs.len());
    round_trip().await;
    // Its session goes on: more says are stored and acked.
    let more = agent.request(json!({"type":"say","session_id":sid,"text":"after the cut"})).await;
    assert_eq!(more["type"], "ack", "{more}");
    let last = more["seq"].as_i64().expect("seq");
    for w in seqs.windows(2) {
        assert_eq!(w[1], w[0] + 1, "acked seqs have no gaps");
    }
    assert_eq!(seqs[0], assigned_seq + 1);
    assert_eq!(last, seqs[seqs.len() - 1] + 1);

    // The cut-off socket: what it still gets is in order, then it is closed.
    let (code, texts) = slow.wait_closed(DEADLINE).await;
    eprintln!("the cut-off socket got {} more text frames, then close {code:?}", texts.len());
    assert!(code.is_none() || code == Some(1013), "close code {code:?}");
    let mut expect = assigned_seq + 1;
    for v in texts.iter().filter(|v| v["type"] == "message") {
        assert_eq!(v["seq"].as_i64(), Some(expect), "in order, no gaps");
        expect += 1;
    }
    assert!(expect <= last, "the cut-off socket cannot have got everything");

    // Resuming on a new socket replays everything it missed, in order.
    let mut back = app.customer().await;
    let r = back.send_ref(json!({"type":"resume","session_id":sid,"resume_token":token,"last_seq":assigned_seq})).await;
    back.wait_type("resumed").await;
    let ack = back.reply(json!(r)).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    for (i, seq) in seqs.iter().enumerate() {
        let m = back.wait_type("message").await;
        assert_eq!(m["seq"].as_i64(), Some(*seq), "{}", m["text"].as_str().unwrap_or_default().chars().take(20).collect::<String>());
        assert_eq!(m["text"], big_text(i).as_str());
    }
    let m = back.wait_type("message").await;
    assert_eq!((m["seq"].as_i64(), m["text"].as_str()), (Some(last), Some("after the cut")));
    // And live again.
    let live = agent.request(json!({"type":"say","session_id":sid,"text":"welcome back"})).await;
    let m = back.wait_type("message").await;
    assert_eq!((m["seq"].as_i64(), m["text"].as_str()), (live["seq"].as_i64(), Some("welcome back")));
    round_trip().await;
}

#[tokio::test]
async fn a_customer_who_does_not_come_back_times_out() {
    let app = TestApp::spawn_with(app_env(&[("DUET_CUSTOMER_GRACE_S", "1")])).await;
    let mut agent = app.agent("grace-ann").await;
    let cust = join(&app, "Gone", "support").await;
    let t = agent.request(json!({"type":"take","topic":"support"})).await;
    assert_eq!(t["type"], "ack", "{t}");
    cust.client.drop_connection();
    let ended = agent.wait_for("ended", |v| v["type"] == "ended" && v["session_id"] == cust.session_id.as_str()).await;
    assert_eq!(ended["reason"], "timeout", "{ended}");
}

#[tokio::test]
async fn a_slow_consumer_that_never_resumes_times_out() {
    let app = TestApp::spawn_with(app_env(&[
        ("DUET_RATE_LIMITS", "off"),
        ("DUET_OUTBOX_FRAMES", "16"),
        ("DUET_CUSTOMER_GRACE_S", "1"),
    ]))
    .await;
    let mut agent = app.agent("ghost-ann").await;
    let (slow, sid, _token, _) = slow_customer(&app, &mut agent, "slow").await;
    flood_until_killed(&app, &mut agent, &sid, async || {}).await;
    drop(slow);
    let ended = agent.wait_for("ended", |v| v["type"] == "ended" && v["session_id"] == sid.as_str()).await;
    assert_eq!(ended["reason"], "timeout", "{ended}");
}

// ---- switches that refuse service ------------------------------------------

#[tokio::test]
async fn queue_disabled_join_is_unavailable() {
    let app = TestApp::spawn_with(app_env(&[("DUET_QUEUE_ENABLED", "false")])).await;
    let mut c = app.customer().await;
    let e = c.request(json!({"type":"join","name":"Ann","topic":"support"})).await;
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("unavailable")), "{e}");
    assert!(e["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{e}");
    c.assert_none(Duration::from_millis(300), |v| v["type"] == "session" || v["type"] == "queue").await;
    still_open(&mut c).await;
}

#[tokio::test]
async fn ai_join_without_a_language_model_is_unavailable() {
    let app = TestApp::spawn().await;
    let mut c = app.customer().await;
    let e = c.request(json!({"type":"join","name":"Ann","topic":"interview","mode":"ai"})).await;
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("unavailable")), "{e}");
    assert!(e["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{e}");
    let message = e["message"].as_str().unwrap_or_default();
    assert!(message.contains("DUET_LLM_URL") || message.to_lowercase().contains("language model"), "names what is missing: {e}");
    c.assert_none(Duration::from_millis(300), |v| v["type"] == "session").await;
    // The rest of duet works, on the same socket.
    let r = c.send_ref(json!({"type":"join","name":"Ann","topic":"interview"})).await;
    let s = c.wait_type("session").await;
    assert_eq!((s["seq"].as_i64(), s["mode"].as_str()), (Some(1), Some("human")), "{s}");
    assert_eq!(c.reply(json!(r)).await["type"], "ack");
}

// ---- after the end -----------------------------------------------------------

/// `join` on an open socket: (session_id, resume_token), checking seq 1, the
/// queue frame and the ack.
async fn join_on(c: &mut Client, name: &str, topic: &str) -> (String, String) {
    let r = c.send_ref(json!({"type":"join","name":name,"topic":topic})).await;
    let s = c.wait_type("session").await;
    assert_eq!(s["seq"], 1, "{s}");
    let sid = s["session_id"].as_str().expect("session_id").to_owned();
    let q = c.wait_for("queue", |v| v["type"] == "queue" && v["session_id"] == sid.as_str()).await;
    assert_eq!(q["position"], 1, "{q}");
    let ack = c.reply(json!(r)).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["session_id"], sid.as_str());
    (sid, s["resume_token"].as_str().expect("resume_token").to_owned())
}

#[tokio::test]
async fn after_ended_the_socket_stays_and_the_customer_can_join_again() {
    let app = TestApp::spawn().await;
    let mut agent = app.agent("again-ann").await;
    let mut c = app.customer().await;

    // 1. The customer leaves the queue.
    let (first, _) = join_on(&mut c, "Eve", "support").await;
    let leave = c.request(json!({"type":"leave"})).await;
    assert_eq!(leave["type"], "ack", "{leave}");
    let ended = c.wait_type("ended").await;
    assert_eq!((ended["reason"].as_str(), ended["seq"].as_i64()), (Some("customer_left"), leave["seq"].as_i64()), "{ended}");
    still_open(&mut c).await;
    for frame in [json!({"type":"say","text":"hello?"}), json!({"type":"leave"})] {
        let e = c.request(frame).await;
        assert_eq!(e["code"], "not_found", "{e}");
    }

    // 2. Joins again on the same socket: a new session, seq 1 again.
    let (second, _) = join_on(&mut c, "Eve", "support").await;
    assert_ne!(second, first);
    let take = agent.request(json!({"type":"take","topic":"support"})).await;
    assert_eq!(take["session_id"], second.as_str(), "{take}");
    c.wait_type("assigned").await;
    let hi = c.request(json!({"type":"say","text":"hi again"})).await;
    assert_eq!(hi["type"], "ack", "{hi}");
    agent.wait_for("message", |v| v["type"] == "message" && v["seq"] == hi["seq"]).await;

    // 3. The agent ends it; the customer stays, and joins a third time.
    let end = agent.request(json!({"type":"end","session_id":second})).await;
    assert_eq!(end["type"], "ack", "{end}");
    let ended = c.wait_type("ended").await;
    assert_eq!(ended["reason"], "agent_ended");
    let e = c.request(json!({"type":"rtc","kind":"offer","data":{}})).await;
    assert_eq!(e["code"], "not_found", "{e}");
    still_open(&mut c).await;
    let (third, _) = join_on(&mut c, "Eve", "support").await;
    assert!(third != first && third != second);
    let take = agent.request(json!({"type":"take","topic":"support"})).await;
    assert_eq!(take["session_id"], third.as_str(), "{take}");
    let assigned = c.wait_type("assigned").await;
    assert_eq!((assigned["session_id"].as_str(), assigned["seq"].as_i64()), (Some(third.as_str()), Some(2)), "{assigned}");
}

/// PROTOCOL.md: resuming an ended session is `not_found`, "then the client
/// may `join` anew" — on the same socket, right away.
#[tokio::test]
async fn a_refused_resume_of_an_ended_session_leaves_the_socket_free_to_join() {
    let app = TestApp::spawn().await;
    let mut old = app.customer().await;
    let (sid, token) = join_on(&mut old, "Eve", "support").await;
    let leave = old.request(json!({"type":"leave"})).await;
    assert_eq!(leave["type"], "ack", "{leave}");
    old.wait_type("ended").await;
    for mut c in [old, app.customer().await] {
        let e = c.request(json!({"type":"resume","session_id":sid,"resume_token":token,"last_seq":0})).await;
        assert_eq!(e["code"], "not_found", "an ended session cannot be resumed: {e}");
        let r = c.send_ref(json!({"type":"join","name":"Eve","topic":"support"})).await;
        let answer = c.reply(json!(r)).await;
        assert_eq!(answer["type"], "ack", "join after the refused resume: {answer}");
        let s = c.wait_type("session").await;
        assert_ne!(s["session_id"], sid.as_str());
    }
}

#[tokio::test]
async fn upgrades_elsewhere_are_404_and_a_plain_get_of_ws_is_400() {
    let app = TestApp::spawn().await;
    let raw = RawWs::connect(app.port, "/nowhere", &[], None).await;
    assert_eq!(raw.status, 404, "{}", raw.head);
    // RFC 6455 4.4: a refused handshake names the version the server speaks.
    assert!(raw.head.to_ascii_lowercase().contains("sec-websocket-version: 13"), "{}", raw.head);
    let plain = app.get("/ws", None).await;
    assert_eq!(plain.status(), 400);
    let body: Value = plain.json().await.expect("json");
    assert_eq!(body["error"]["code"], "bad_request", "{body}");
}

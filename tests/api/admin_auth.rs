//! Admin sign-in by one-time code (read from the development log), lockout,
//! logout, and the HTTP rules around it: JSON errors, body limits, the
//! metrics token, admin-only routes and security headers.

use serde_json::{json, Value};

use crate::protocol_edges::metric;
use crate::support::{eventually, join, Client, Options, TestApp, WebhookSink};

async fn post(app: &TestApp, path: &str, body: &Value) -> reqwest::Response {
    app.http.post(format!("{}{path}", app.base)).json(body).send().await.expect("http post")
}

async fn post_raw(app: &TestApp, path: &str, body: String, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut r = app.http.post(format!("{}{path}", app.base)).header("content-type", "application/json").body(body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send().await.expect("http post")
}

/// Status, `Retry-After`, and the JSON body (which must be JSON).
async fn answer(r: reqwest::Response) -> (u16, Option<String>, Value) {
    let status = r.status().as_u16();
    let retry = r.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|_| panic!("status {status}: body is not JSON: {text:?}"));
    (status, retry, body)
}

/// `{"error":{"code","message"}}` with this code.
fn assert_error(body: &Value, code: &str) {
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
}

/// The one-time codes the log shows for `admin_id`, oldest first: the two
/// keys of a JSON line, or `admin_id=alice code=48213907` in a text line,
/// as PROTOCOL.md words it (read literally: no escape codes in between).
fn logged_codes(app: &TestApp, admin_id: &str) -> Vec<String> {
    let text_key = format!("admin_id={admin_id} code=");
    app.logs()
        .lines()
        .filter_map(|l| match serde_json::from_str::<Value>(l) {
            Ok(v) => (v["admin_id"] == admin_id).then(|| v["code"].as_str().map(str::to_owned)).flatten(),
            Err(_) => l.split_once(&text_key).map(|(_, rest)| rest.chars().take_while(char::is_ascii_digit).collect()),
        })
        .collect()
}

/// Requests a code (202) and reads the new one from the log.
async fn request_code(app: &TestApp, admin_id: &str) -> String {
    let before = logged_codes(app, admin_id).len();
    let (status, _, body) = answer(post(app, "/admin/otp/request", &json!({"admin_id":admin_id})).await).await;
    assert_eq!(status, 202, "{body}");
    let code = eventually(&format!("a code for {admin_id} in the log"), || async move {
        let codes = logged_codes(app, admin_id);
        (codes.len() > before).then(|| codes.last().cloned()).flatten()
    })
    .await;
    assert!(code.len() >= 6 && code.chars().all(|c| c.is_ascii_digit()), "{code}");
    code
}

async fn verify(app: &TestApp, admin_id: &str, code: &str) -> (u16, Option<String>, Value) {
    answer(post(app, "/admin/otp/verify", &json!({"admin_id":admin_id,"code":code})).await).await
}

/// A different code of the same shape.
fn wrong(code: &str, n: u32) -> String {
    let mut digits: Vec<u32> = code.chars().map(|c| c.to_digit(10).unwrap()).collect();
    let last = digits.len() - 1;
    digits[last] = (digits[last] + 1 + n % 9) % 10;
    digits.iter().map(|d| char::from_digit(*d, 10).unwrap()).collect()
}

fn add_admin(app: &TestApp, id: &str) {
    let out = app.cli(&["admin", "add", id, "--name", &format!("Admin {id}")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Seconds since the epoch of an RFC 3339 time (`2025-01-02T03:04:05.678Z`,
/// or with a `+hh:mm` offset).
fn rfc3339_secs(s: &str) -> i64 {
    let num = |a: usize, b: usize| -> i64 { s.get(a..b).and_then(|x| x.parse().ok()).unwrap_or_else(|| panic!("not RFC 3339: {s}")) };
    assert!(s.len() >= 20 && &s[4..5] == "-" && &s[7..8] == "-" && &s[10..11] == "T" && &s[13..14] == ":", "not RFC 3339: {s}");
    let (y, m, d) = (num(0, 4), num(5, 7), num(8, 10));
    let secs = num(11, 13) * 3600 + num(14, 16) * 60 + num(17, 19);
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.find(|c: char| !c.is_ascii_digit()).unwrap_or(frac.len());
        assert!(n > 0, "{s}");
        rest = &frac[n..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) => {
            let v: i64 = o[1..3].parse::<i64>().unwrap() * 3600 + o[4..6].parse::<i64>().unwrap() * 60;
            if o.starts_with('-') { -v } else { v }
        }
        _ => panic!("not RFC 3339: {s}"),
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86400 + secs - offset
}

fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// The `duet_session` cookie's value from a response's `Set-Cookie`s.
fn session_cookie(headers: &reqwest::header::HeaderMap) -> (String, String) {
    let raw = headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("duet_session="))
        .unwrap_or_else(|| panic!("no duet_session cookie in {headers:?}"))
        .to_owned();
    let value = raw["duet_session=".len()..].split(';').next().unwrap().to_owned();
    (value, raw)
}

async fn admin_ws(app: &TestApp, headers: &[(&str, &str)]) -> Result<Client, u16> {
    match Client::connect(&app.ws_url("/admin/ws"), headers).await {
        Ok(mut c) => {
            let hello = c.recv().await;
            assert_eq!(hello["type"], "hello", "{hello}");
            Ok(c)
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("admin ws: {e}"),
    }
}

async fn queues_status(app: &TestApp, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut r = app.http.get(format!("{}/api/queues", app.base));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let (s, _, b) = answer(r.send().await.unwrap()).await;
    (s, b)
}

/// The default development log is text: a person or a test on the machine
/// reads the code from it as written, and logs in with it.
#[tokio::test]
async fn a_code_in_the_text_log_reads_as_admin_id_and_code() {
    let app = TestApp::spawn_with(Options { env: vec![("DUET_LOG_FORMAT", "text".into())], ..Options::default() }).await;
    add_admin(&app, "carol");
    let code = request_code(&app, "carol").await;
    assert!(!app.logs().contains('\u{1b}'), "no terminal escape codes in a piped log");
    let (status, _, body) = verify(&app, "carol", &code).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn otp_login_single_use_cookie_and_logout() {
    let app = TestApp::spawn().await;
    add_admin(&app, "alice");
    let code = request_code(&app, "alice").await;

    let (status, _, body) = verify(&app, "alice", &wrong(&code, 0)).await;
    assert_eq!(status, 401, "{body}");
    assert_error(&body, "unauthorized");

    let r = post(&app, "/admin/otp/verify", &json!({"admin_id":"alice","code":code})).await;
    assert_eq!(r.status(), 200);
    let (cookie, raw_cookie) = session_cookie(r.headers());
    let body: Value = r.json().await.unwrap();
    let token = body["token"].as_str().expect("token").to_owned();
    assert_eq!(cookie, token, "the cookie carries the session");
    let lower = raw_cookie.to_ascii_lowercase();
    assert!(lower.contains("httponly") && lower.contains("path=/"), "{raw_cookie}");
    let expires = rfc3339_secs(body["expires_at"].as_str().expect("expires_at"));
    assert!(expires > now_secs() + 60 && expires < now_secs() + 90 * 86400, "{body}");

    // Single use: the same code again is refused.
    let (status, _, body) = verify(&app, "alice", &code).await;
    assert_eq!(status, 401, "a used code: {body}");
    assert_error(&body, "unauthorized");

    // The token is an admin session: HTTP and the agents' socket.
    let bearer = format!("Bearer {token}");
    let (status, dash) = queues_status(&app, &[("authorization", &bearer)]).await;
    assert_eq!(status, 200, "{dash}");
    for k in ["queues", "sessions", "agents", "nodes"] {
        assert!(dash[k].is_array(), "dashboard has {k}: {dash}");
    }
    let cookie_header = format!("duet_session={cookie}");
    let mut ws = admin_ws(&app, &[("Cookie", &cookie_header)]).await.expect("cookie upgrade");
    ws.wait_for("a dashboard listing alice", |d| {
        d["type"] == "dashboard" && d["agents"].as_array().is_some_and(|a| a.iter().any(|a| a["id"] == "alice"))
    })
    .await;
    assert_eq!(ws.request(json!({"type":"available"})).await["type"], "ack");
    drop(ws);
    admin_ws(&app, &[("Authorization", &bearer)]).await.expect("bearer upgrade");
    assert_eq!(admin_ws(&app, &[]).await.err(), Some(401), "no session, no upgrade");
    assert_eq!(admin_ws(&app, &[("Authorization", "Bearer nope")]).await.err(), Some(401));

    // Logout with the bearer revokes it everywhere.
    let r = app.http.post(format!("{}/admin/logout", app.base)).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let (status, body) = queues_status(&app, &[("authorization", &bearer)]).await;
    assert_eq!(status, 401, "{body}");
    assert_error(&body, "unauthorized");
    assert_eq!(queues_status(&app, &[("cookie", &cookie_header)]).await.0, 401, "the same session by cookie");
    assert_eq!(admin_ws(&app, &[("Authorization", &bearer)]).await.err(), Some(401));
    assert_eq!(admin_ws(&app, &[("Cookie", &cookie_header)]).await.err(), Some(401));
    let r = app.http.post(format!("{}/admin/logout", app.base)).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 401, "a revoked token cannot log out again");

    // A second login, logged out by its cookie alone.
    let code = request_code(&app, "alice").await;
    let r = post(&app, "/admin/otp/verify", &json!({"admin_id":"alice","code":code})).await;
    assert_eq!(r.status(), 200);
    let (cookie, _) = session_cookie(r.headers());
    let cookie_header = format!("duet_session={cookie}");
    assert_eq!(queues_status(&app, &[("cookie", &cookie_header)]).await.0, 200);
    let r = app.http.post(format!("{}/admin/logout", app.base)).header("cookie", &cookie_header).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let cleared = r.headers().get_all("set-cookie").iter().filter_map(|v| v.to_str().ok()).any(|c| c.starts_with("duet_session="));
    assert!(cleared, "logout clears the cookie");
    assert_eq!(queues_status(&app, &[("cookie", &cookie_header)]).await.0, 401);
    assert_eq!(admin_ws(&app, &[("Cookie", &cookie_header)]).await.err(), Some(401));
    let by_bearer = format!("Bearer {cookie}");
    assert_eq!(queues_status(&app, &[("authorization", &by_bearer)]).await.0, 401);
}

#[tokio::test]
async fn five_wrong_codes_lock_the_admin_even_for_the_right_code() {
    let app = TestApp::spawn().await;
    add_admin(&app, "bob");
    let code = request_code(&app, "bob").await;
    for i in 0..5 {
        let (status, retry, body) = verify(&app, "bob", &wrong(&code, i)).await;
        if i < 4 {
            assert_eq!(status, 401, "wrong code {i}: {body}");
            assert_error(&body, "unauthorized");
        } else {
            assert!(status == 401 || status == 429, "wrong code {i}: {status} {body}");
            if status == 429 {
                assert!(retry.is_some());
            }
        }
    }
    let (status, retry, body) = verify(&app, "bob", &code).await;
    assert_eq!(status, 429, "locked: even the right code is refused: {body}");
    assert_error(&body, "rate_limited");
    let retry: u64 = retry.expect("Retry-After").parse().expect("Retry-After in seconds");
    assert!(retry >= 14 * 60, "locked for at least 15 minutes, Retry-After {retry}");
    // A fresh code does not unlock it either.
    let fresh = request_code(&app, "bob").await;
    let (status, _, body) = verify(&app, "bob", &fresh).await;
    assert_eq!(status, 429, "{body}");
    // Another admin is not affected.
    add_admin(&app, "carol");
    let code = request_code(&app, "carol").await;
    assert_eq!(verify(&app, "carol", &code).await.0, 200);
}

#[tokio::test]
async fn unknown_admins_are_answered_like_known_ones() {
    let app = TestApp::spawn().await;
    add_admin(&app, "dave");
    let known = answer(post(&app, "/admin/otp/request", &json!({"admin_id":"dave"})).await).await;
    let unknown = answer(post(&app, "/admin/otp/request", &json!({"admin_id":"nobody"})).await).await;
    assert_eq!(known.0, 202);
    assert_eq!((unknown.0, &unknown.2), (known.0, &known.2), "request: the same answer");
    let code = eventually("dave's code", || {
        let app = &app;
        async move { logged_codes(app, "dave").pop() }
    })
    .await;
    assert!(logged_codes(&app, "nobody").is_empty(), "no code for an unknown id");

    let w = wrong(&code, 3);
    let known = verify(&app, "dave", &w).await;
    let unknown = verify(&app, "nobody", &w).await;
    assert_eq!(known.0, 401, "{:?}", known.2);
    assert_eq!((unknown.0, &unknown.2), (known.0, &known.2), "wrong code: the same answer");
    for bad in [json!("12ab"), json!(""), json!(12345678), json!(null)] {
        let k = answer(post(&app, "/admin/otp/verify", &json!({"admin_id":"dave","code":bad})).await).await;
        let u = answer(post(&app, "/admin/otp/verify", &json!({"admin_id":"nobody","code":bad})).await).await;
        assert_eq!(k.0, 400, "malformed code {bad}: {:?}", k.2);
        assert_error(&k.2, "bad_request");
        assert_eq!((u.0, &u.2), (k.0, &k.2), "malformed code {bad}: the same answer");
    }
    let k = answer(post(&app, "/admin/otp/verify", &json!({"admin_id":"dave"})).await).await;
    let u = answer(post(&app, "/admin/otp/verify", &json!({"admin_id":"nobody"})).await).await;
    assert_eq!(k.0, 400, "missing code: {:?}", k.2);
    assert_error(&k.2, "bad_request");
    // (The message may point at a column, which moves with the id's length.)
    assert_eq!((u.0, &u.2["error"]["code"]), (k.0, &k.2["error"]["code"]));
    // Lockout applies the same way: four more wrong codes each.
    for i in 0..4 {
        let known = verify(&app, "dave", &wrong(&code, 4 + i)).await;
        let unknown = verify(&app, "nobody", &wrong(&code, 4 + i)).await;
        assert_eq!((known.0, &known.2), (unknown.0, &unknown.2), "wrong code {i}");
    }
    let known = verify(&app, "dave", &code).await;
    let unknown = verify(&app, "nobody", &code).await;
    assert_eq!(known.0, 429, "{:?}", known.2);
    assert_error(&known.2, "rate_limited");
    // (`retry_after_ms` counts down between the two calls.)
    let outline = |a: &(u16, Option<String>, Value)| (a.0, a.1.is_some(), a.2["error"]["code"].clone(), a.2["error"]["message"].clone());
    assert_eq!(outline(&unknown), outline(&known), "locked alike");
}

#[tokio::test]
async fn request_bodies_json_errors_and_limits() {
    let app = TestApp::spawn().await;
    // Over 64 KiB: 413 with the JSON error shape.
    let big = json!({"admin_id":"x","pad":"a".repeat(70 * 1024)}).to_string();
    let (status, _, body) = answer(post_raw(&app, "/admin/otp/request", big, &[]).await).await;
    assert_eq!(status, 413, "{body}");
    assert_error(&body, "too_large");
    // Just under the limit is not refused for its size.
    let fits = json!({"admin_id":"x","pad":"a".repeat(60 * 1024)}).to_string();
    let (status, _, body) = answer(post_raw(&app, "/admin/otp/request", fits, &[]).await).await;
    assert_eq!(status, 202, "{body}");
    // Malformed JSON, and JSON of the wrong shape: 400.
    for bad in ["{not json", "[1,2]", "\"x\"", ""] {
        for path in ["/admin/otp/request", "/admin/otp/verify"] {
            let (status, _, body) = answer(post_raw(&app, path, bad.to_owned(), &[]).await).await;
            assert_eq!(status, 400, "{path} {bad:?}: {body}");
            assert_error(&body, "bad_request");
        }
    }
    // A body is read as JSON whatever its Content-Type says (none, curl's).
    let body = json!({"admin_id":"x"}).to_string();
    let r = app.http.post(format!("{}/admin/otp/request", app.base)).body(body.clone()).send().await.expect("post");
    assert_eq!(r.status(), 202, "without Content-Type");
    let form = app.http.post(format!("{}/admin/otp/request", app.base)).header("content-type", "application/x-www-form-urlencoded").body(body);
    assert_eq!(form.send().await.expect("post").status(), 202, "curl -d's type");
    // Unknown route: JSON 404.
    let (status, _, body) = answer(app.get("/no/such/route", None).await).await;
    assert_eq!(status, 404);
    assert_error(&body, "not_found");
    // Ready, with the database named.
    let (status, _, body) = answer(app.get("/ready", None).await).await;
    assert_eq!((status, body["db"].as_str()), (200, Some("ok")), "{body}");
}

#[tokio::test]
async fn api_queues_needs_an_admin() {
    let app = TestApp::spawn().await;
    let customer = join(&app, "Bob", "support").await;
    for headers in [
        vec![],
        vec![("authorization", "Bearer nope".to_owned())],
        vec![("authorization", format!("Bearer {}", customer.resume_token))],
        vec![("cookie", "duet_session=nope".to_owned())],
    ] {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, body) = queues_status(&app, &h).await;
        assert_eq!(status, 401, "{headers:?}: {body}");
        assert_error(&body, "unauthorized");
        assert!(body.get("queues").is_none());
    }
    let token = app.admin_token("root");
    let (status, dash) = queues_status(&app, &[("authorization", &format!("Bearer {token}"))]).await;
    assert_eq!(status, 200, "{dash}");
    assert_eq!(dash["queues"][0]["waiting"][0]["session_id"], customer.session_id.as_str(), "{dash}");
}

#[tokio::test]
async fn metrics_are_open_without_a_token() {
    let app = TestApp::spawn().await;
    let r = app.get("/metrics", None).await;
    assert_eq!(r.status(), 200);
    let kind = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    assert!(kind.starts_with("text/plain") && kind.contains("version=0.0.4"), "Prometheus text format: {kind}");
    let text = r.text().await.unwrap();
    assert!(text.contains("# TYPE duet_events_stored_total counter") && !text.contains("# EOF"), "Prometheus text: {text:.300}");
    // A scraper that asks for OpenMetrics gets it.
    let r = app.http.get(format!("{}/metrics", app.base)).header("accept", "application/openmetrics-text; version=1.0.0").send().await.unwrap();
    let kind = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
    assert!(r.text().await.unwrap().trim_end().ends_with("# EOF"));
}

#[tokio::test]
async fn metrics_token_is_required_when_set() {
    let app = TestApp::spawn_with(Options { env: vec![("DUET_METRICS_TOKEN", "s3cret-metrics".to_owned())], ..Options::default() }).await;
    for token in [None, Some("wrong"), Some("s3cret-metric"), Some("s3cret-metrics-and-more")] {
        let (status, _, body) = answer(app.get("/metrics", token).await).await;
        assert_eq!(status, 401, "{token:?}: {body}");
        assert_error(&body, "unauthorized");
    }
    // An admin session is not the metrics token.
    let admin = app.admin_token("root");
    assert_eq!(app.get("/metrics", Some(&admin)).await.status(), 401);
    let r = app.get("/metrics", Some("s3cret-metrics")).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.contains("# TYPE") || text.contains("# HELP"), "{text:.200}");
}

#[tokio::test]
async fn security_headers_on_pages() {
    let app = TestApp::spawn().await;
    for path in ["/", "/admin"] {
        let r = app.get(path, None).await;
        assert_eq!(r.status(), 200, "{path}");
        let h = r.headers();
        let csp = h.get("content-security-policy").and_then(|v| v.to_str().ok()).unwrap_or_else(|| panic!("{path}: no CSP"));
        assert!(!csp.contains("unsafe-inline"), "{path}: {csp}");
        assert!(!csp.contains("unsafe-eval"), "{path}: {csp}");
        assert!(csp.contains("default-src") || csp.contains("script-src"), "{path}: {csp}");
        assert_eq!(h.get("x-content-type-options").and_then(|v| v.to_str().ok()), Some("nosniff"), "{path}");
        let ct = h.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
        assert!(ct.starts_with("text/html"), "{path}: {ct}");
        let html = r.text().await.unwrap();
        assert!(!html.contains("<script>") && !html.contains("onclick="), "{path}: no inline script");
    }
}

/// A production node with the notifier variables `notifier`, and the admin
/// `prod-admin` added with `admin_args`.
async fn production_app(notifier: &[(&'static str, String)], admin_args: &[&str]) -> TestApp {
    let mut env = vec![("DUET_ENV", "production".to_owned()), ("DUET_ALLOWED_ORIGINS", "https://app.example".to_owned())];
    env.extend(notifier.iter().cloned());
    let app = TestApp::spawn_with(Options { env, ..Options::default() }).await;
    let out = app.cli(&[&["admin", "add", "prod-admin", "--name", "Prod Admin"], admin_args].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    app
}

/// Production delivers codes through `DUET_NOTIFY_WEBHOOK_URL` (a first
/// answer of 503 is retried) and never logs them; an unknown admin gets the
/// same 202 and nothing is posted; the delivered code signs in, with the
/// `__Host-` cookie.
#[tokio::test]
async fn production_delivers_codes_through_the_webhook_and_never_logs_them() {
    let sink = WebhookSink::start(&[503]).await;
    let app = production_app(&[("DUET_NOTIFY_WEBHOOK_URL", sink.url.clone())], &[]).await;
    for id in ["nobody-here", "prod-admin"] {
        let (status, _, body) = answer(post(&app, "/admin/otp/request", &json!({ "admin_id": id })).await).await;
        assert_eq!(status, 202, "{id}: {body}");
    }
    let posts = sink.wait_for(2).await;
    assert!(posts.iter().all(|p| p["admin_id"] == "prod-admin" && p["event"] == "admin_code"), "{posts:?}");
    let code = posts[1]["code"].as_str().expect("code").to_owned();
    assert_eq!(posts[0]["code"], code.as_str(), "the retry posts the same code");
    assert!(posts[1]["text"].as_str().is_some_and(|t| t.contains(&code)), "{posts:?}");
    let expires = rfc3339_secs(posts[1]["expires_at"].as_str().expect("expires_at"));
    assert!((expires - now_secs() - 300).abs() <= 5, "the code's TTL: {posts:?}");
    assert!(logged_codes(&app, "prod-admin").is_empty(), "no code in the log: {}", app.logs());
    assert!(!app.logs().contains(&code), "the code is nowhere in the log");

    let r = post(&app, "/admin/otp/verify", &json!({"admin_id":"prod-admin","code":code})).await;
    assert_eq!(r.status(), 200);
    let cookie = r.headers().get_all("set-cookie").iter().filter_map(|v| v.to_str().ok()).find(|c| c.starts_with("__Host-duet_session="));
    assert!(cookie.is_some_and(|c| c.contains("Secure") && c.contains("Path=/")), "{:?}", r.headers());
    assert_eq!(sink.received().len(), 2, "nothing more was posted");
}

/// Production with Telegram: the code goes to the admin's chat through the
/// Bot API's `sendMessage` (a loopback server answering for Telegram; a
/// first 429 is retried), and signs in; an admin without a chat gets the
/// same 202, nothing is sent, and the failure is counted.
#[tokio::test]
async fn production_delivers_codes_through_telegram() {
    let telegram = WebhookSink::start(&[429]).await;
    let env = [("DUET_TELEGRAM_BOT_TOKEN", "123456:TEST-token".to_owned()), ("DUET_TELEGRAM_API_URL", telegram.base.clone())];
    let app = production_app(&env, &["--telegram", "-100200300"]).await;
    add_admin(&app, "no-chat");
    for id in ["no-chat", "prod-admin"] {
        let (status, _, body) = answer(post(&app, "/admin/otp/request", &json!({ "admin_id": id })).await).await;
        assert_eq!(status, 202, "{id}: {body}");
    }
    let posts = telegram.wait_for(2).await;
    for p in &posts {
        assert_eq!(p["_path"], "/bot123456:TEST-token/sendMessage", "{p}");
        assert_eq!(p["chat_id"], "-100200300", "{p}");
    }
    let text = posts[1]["text"].as_str().expect("text");
    let code: String = text.split_whitespace().find(|w| w.len() >= 6 && w.chars().all(|c| c.is_ascii_digit())).expect("a code").to_owned();
    assert_eq!(posts[0]["text"], text, "the retry sends the same message");
    assert!(!app.logs().contains(&code), "the code is nowhere in the log");
    assert!(!app.logs().contains("TEST-token"), "nor the bot token");
    let (status, _, body) = verify(&app, "prod-admin", &code).await;
    assert_eq!(status, 200, "{body}");
    eventually("the admin without a chat is counted", || async {
        (metric(&app, "duet_notify_failures_total").await >= 1.0).then_some(())
    })
    .await;
    assert_eq!(telegram.received().len(), 2, "nothing was sent for the admin without a chat");
}

/// The per-admin floor (3 code requests a minute) holds, and a team
/// signing in from one address is not refused: twenty admins request and
/// verify a code each within seconds, then one asks a fourth time.
#[tokio::test]
async fn a_team_behind_one_address_signs_in_and_the_per_admin_floor_holds() {
    let app = TestApp::spawn().await;
    for i in 0..20 {
        let id = format!("team-{i}");
        add_admin(&app, &id);
        let code = request_code(&app, &id).await;
        let (status, _, body) = verify(&app, &id, &code).await;
        assert_eq!(status, 200, "admin {i} of 20 from one address: {body}");
    }
    for n in 2..=3 {
        let (status, _, body) = answer(post(&app, "/admin/otp/request", &json!({"admin_id":"team-0"})).await).await;
        assert_eq!(status, 202, "request {n} of 3 in a minute: {body}");
    }
    let (status, retry, body) = answer(post(&app, "/admin/otp/request", &json!({"admin_id":"team-0"})).await).await;
    assert_eq!(status, 429, "a fourth request within the minute: {body}");
    assert_error(&body, "rate_limited");
    assert!(retry.is_some(), "429 carries Retry-After");
}

/// Every answer names its request: a fresh id, or the client's own.
#[tokio::test]
async fn answers_carry_a_request_id() {
    let app = TestApp::spawn().await;
    let id_of = |r: &reqwest::Response| r.headers().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let a = app.get("/health", None).await;
    let b = app.get("/no-such-page", None).await;
    let (a, b) = (id_of(&a).expect("an id"), id_of(&b).expect("an id on errors too"));
    assert!(a.len() >= 16 && a != b, "{a} {b}");
    let r = app.http.get(format!("{}/ready", app.base)).header("x-request-id", "trace-7f3a").send().await.unwrap();
    assert_eq!(id_of(&r).as_deref(), Some("trace-7f3a"), "the client's id is kept");
    let r = app.http.get(format!("{}/ready", app.base)).header("x-request-id", "a b").send().await.unwrap();
    assert_ne!(id_of(&r).as_deref(), Some("a b"), "an id with a space is replaced");
}

/// A logout closes the sockets its session opened, at once (1008), and no
/// other: the same admin's other login and another admin keep theirs.
#[tokio::test]
async fn logout_closes_the_sockets_of_its_session() {
    let app = TestApp::spawn().await;
    let (alice1, alice2) = (app.admin_token("alice"), app.admin_token("alice"));
    let bob = app.admin_token("bob");
    let mut ws1 = app.agent_with_token(&alice1).await;
    ws1.wait_type("dashboard").await;
    let mut bob_ws = app.agent_with_token(&bob).await;
    bob_ws.wait_type("dashboard").await;

    let r = app.http.post(format!("{}/admin/logout", app.base)).bearer_auth(&alice1).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(ws1.wait_closed(std::time::Duration::from_secs(2)).await, Some(1008), "the signed-out socket closes");
    assert_eq!(bob_ws.request(json!({"type":"available","ref":1})).await["type"], "ack", "another admin's socket stays");

    // Alice's second login still opens a socket, which stays.
    let mut ws2 = app.agent_with_token(&alice2).await;
    ws2.wait_type("dashboard").await;
    assert_eq!(ws2.request(json!({"type":"available","ref":2})).await["type"], "ack");
}

/// A login ended elsewhere (here `duet admin disable`, a separate process
/// as another node would be) closes the open socket at the next check.
#[tokio::test]
async fn a_disabled_admin_is_signed_out_of_open_sockets() {
    let app = TestApp::spawn_with(Options { env: vec![("DUET_ADMIN_RECHECK_S", "1".to_owned())], ..Options::default() }).await;
    let alice = app.admin_token("alice");
    let mut ws = app.agent_with_token(&alice).await;
    ws.wait_type("dashboard").await;
    // Checks that find the session valid leave the socket open.
    ws.assert_none(std::time::Duration::from_millis(2500), |v| v["type"] == "never").await;
    assert_eq!(ws.request(json!({"type":"available","ref":1})).await["type"], "ack");

    let out = app.cli(&["admin", "disable", "alice"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(ws.wait_closed(std::time::Duration::from_secs(4)).await, Some(1008));
    assert_eq!(admin_ws(&app, &[("Authorization", &format!("Bearer {alice}"))]).await.err(), Some(401));
    assert!(!app.cli(&["admin", "disable", "nobody"]).status.success(), "an unknown admin is an error");

    // Added again, alice may sign in anew.
    assert!(app.cli(&["admin", "add", "alice", "--name", "Alice"]).status.success());
    let mut again = app.agent_with_token(&app.admin_token("alice")).await;
    again.wait_type("dashboard").await;
}

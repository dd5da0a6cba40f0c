//! Delivery of one-time codes through a webhook (`DUET_NOTIFY_WEBHOOK_URL`).
//!
//! Each code is one `POST` of a JSON object:
//! `{"text": "…", "event": "admin_code", "admin_id", "name", "code", "expires_at"}`.
//! `text` is a sentence for people, which makes the hook an incoming webhook
//! of Slack, Mattermost, Rocket.Chat or Google Chat as it is; the other
//! fields are for a program.
//!
//! Delivery runs beside the request, so `POST /admin/otp/request` answers
//! 202 without waiting on the hook (and in the same time for known and
//! unknown admins). A delivery is tried up to [`ATTEMPTS`] times, each
//! bounded by [`ATTEMPT_TIMEOUT`], with a growing pause between tries; a
//! 2xx answer is a delivery, a 4xx other than 408/429 is final. What fails
//! for good is logged (never the code, never the URL, which often carries
//! its secret) and counted in `duet_notify_failures_total`. The retries
//! live in this process: the durable job queue on Redis takes them over
//! with cluster coordination.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use serde_json::json;

use crate::auth::Notifier;
use crate::storage::AdminRow;

/// Tries per code.
pub const ATTEMPTS: u32 = 3;
/// Bound on one try: connect, send and the answer.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// The pause before the second try; each later pause is four times longer.
const FIRST_PAUSE: Duration = Duration::from_millis(500);

pub struct WebhookNotifier {
    url: Arc<str>,
    client: reqwest::Client,
    failures: Counter,
}

impl WebhookNotifier {
    pub fn new(url: &str, failures: Counter) -> Result<WebhookNotifier, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(ATTEMPT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("duet/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(WebhookNotifier { url: Arc::from(url), client, failures })
    }
}

/// What one try came to.
enum Outcome {
    Delivered,
    Retry(String),
    Refused(String),
}

async fn attempt(client: &reqwest::Client, url: &str, body: &serde_json::Value) -> Outcome {
    match client.post(url).json(body).send().await {
        Ok(r) if r.status().is_success() => Outcome::Delivered,
        Ok(r) => {
            let s = r.status();
            let why = format!("the webhook answered {}", s.as_u16());
            if s.is_client_error() && s != reqwest::StatusCode::REQUEST_TIMEOUT && s != reqwest::StatusCode::TOO_MANY_REQUESTS {
                Outcome::Refused(why)
            } else {
                Outcome::Retry(why)
            }
        }
        // reqwest's error text can hold the URL: only its kind is told.
        Err(e) if e.is_timeout() => Outcome::Retry("the webhook did not answer in time".to_owned()),
        Err(e) if e.is_connect() => Outcome::Retry("could not connect to the webhook".to_owned()),
        Err(_) => Outcome::Retry("the webhook request failed".to_owned()),
    }
}

impl Notifier for WebhookNotifier {
    fn send_code(&self, admin: &AdminRow, code: &str, expires_at: &str) -> bool {
        let body = json!({
            "text": format!("duet: your sign-in code is {code} (for {}, valid until {expires_at})", admin.name),
            "event": "admin_code",
            "admin_id": admin.id,
            "name": admin.name,
            "code": code,
            "expires_at": expires_at,
        });
        let (client, url, failures) = (self.client.clone(), Arc::clone(&self.url), self.failures.clone());
        let admin_id = admin.id.clone();
        tokio::spawn(async move {
            let mut pause = FIRST_PAUSE;
            for n in 1..=ATTEMPTS {
                let why = match attempt(&client, &url, &body).await {
                    Outcome::Delivered => {
                        tracing::info!(admin_id = %admin_id, attempt = n, "one-time code delivered to the webhook");
                        return;
                    }
                    Outcome::Refused(why) => {
                        tracing::error!(admin_id = %admin_id, attempt = n, reason = %why, "one-time code refused by the webhook; not retried");
                        failures.inc();
                        return;
                    }
                    Outcome::Retry(why) => why,
                };
                if n == ATTEMPTS {
                    tracing::error!(admin_id = %admin_id, attempts = n, reason = %why, "one-time code not delivered");
                    failures.inc();
                    return;
                }
                tracing::warn!(admin_id = %admin_id, attempt = n, reason = %why, "one-time code delivery failed; retrying");
                tokio::time::sleep(pause).await;
                pause *= 4;
            }
        });
        true
    }
}

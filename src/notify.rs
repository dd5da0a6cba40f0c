//! Delivery of one-time codes over HTTP: a webhook
//! (`DUET_NOTIFY_WEBHOOK_URL`) and Telegram (`DUET_TELEGRAM_BOT_TOKEN`),
//! each used when configured.
//!
//! - Webhook: one `POST` of a JSON object per code,
//!   `{"text": "…", "event": "admin_code", "admin_id", "name", "code", "expires_at"}`.
//!   `text` is a sentence for people, which makes the hook an incoming
//!   webhook of Slack, Mattermost, Rocket.Chat or Google Chat as it is; the
//!   other fields are for a program.
//! - Telegram: the Bot API's `sendMessage` to the admin's chat
//!   (`duet admin add <id> --telegram <chat id>`); an admin without a chat
//!   gets no Telegram message, which is logged.
//!
//! Delivery runs beside the request, so `POST /admin/otp/request` answers
//! 202 without waiting (and in the same time for known and unknown admins).
//! Each delivery is tried up to [`ATTEMPTS`] times, each bounded by
//! [`ATTEMPT_TIMEOUT`], with a growing pause between tries; a 2xx answer is
//! a delivery, a 4xx other than 408/429 is final. What fails for good is
//! logged (never the code, never a URL: the webhook's and Telegram's carry
//! their secrets) and counted in `duet_notify_failures_total`. The retries
//! live in this process: the durable job queue on Redis takes them over
//! with cluster coordination.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use serde_json::json;

use crate::auth::Notifier;
use crate::config::Telegram;
use crate::storage::AdminRow;

/// Tries per delivery.
pub const ATTEMPTS: u32 = 3;
/// Bound on one try: connect, send and the answer.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// The pause before the second try; each later pause is four times longer.
const FIRST_PAUSE: Duration = Duration::from_millis(500);

pub struct HttpNotifier {
    client: reqwest::Client,
    webhook: Option<Arc<str>>,
    /// Telegram's `sendMessage` URL (it holds the bot token).
    telegram: Option<Arc<str>>,
    failures: Counter,
}

impl HttpNotifier {
    pub fn new(webhook: Option<&str>, telegram: Option<&Telegram>, failures: Counter) -> Result<HttpNotifier, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(ATTEMPT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("duet/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(HttpNotifier {
            client,
            webhook: webhook.map(Arc::from),
            telegram: telegram.map(|t| Arc::from(format!("{}/bot{}/sendMessage", t.api_url, t.token.expose()))),
            failures,
        })
    }
}

/// One code on its way through one channel.
struct Delivery {
    channel: &'static str,
    url: Arc<str>,
    body: serde_json::Value,
    admin_id: String,
}

/// What one try came to.
enum Outcome {
    Delivered,
    Retry(String),
    Refused(String),
}

async fn attempt(client: &reqwest::Client, d: &Delivery) -> Outcome {
    match client.post(&*d.url).json(&d.body).send().await {
        Ok(r) if r.status().is_success() => Outcome::Delivered,
        Ok(r) => {
            let s = r.status();
            let why = format!("answered {}", s.as_u16());
            if s.is_client_error() && s != reqwest::StatusCode::REQUEST_TIMEOUT && s != reqwest::StatusCode::TOO_MANY_REQUESTS {
                Outcome::Refused(why)
            } else {
                Outcome::Retry(why)
            }
        }
        // reqwest's error text can hold the URL: only its kind is told.
        Err(e) if e.is_timeout() => Outcome::Retry("no answer in time".to_owned()),
        Err(e) if e.is_connect() => Outcome::Retry("could not connect".to_owned()),
        Err(_) => Outcome::Retry("the request failed".to_owned()),
    }
}

/// Tries `d` until it is delivered, refused, or out of attempts.
async fn deliver(client: reqwest::Client, d: Delivery, failures: Counter) {
    let (channel, admin_id) = (d.channel, d.admin_id.as_str());
    let mut pause = FIRST_PAUSE;
    for n in 1..=ATTEMPTS {
        let why = match attempt(&client, &d).await {
            Outcome::Delivered => {
                tracing::info!(admin_id, channel, attempt = n, "one-time code delivered");
                return;
            }
            Outcome::Refused(why) => {
                tracing::error!(admin_id, channel, attempt = n, reason = %why, "one-time code refused; not retried");
                failures.inc();
                return;
            }
            Outcome::Retry(why) => why,
        };
        if n == ATTEMPTS {
            tracing::error!(admin_id, channel, attempts = n, reason = %why, "one-time code not delivered");
            failures.inc();
            return;
        }
        tracing::warn!(admin_id, channel, attempt = n, reason = %why, "one-time code delivery failed; retrying");
        tokio::time::sleep(pause).await;
        pause *= 4;
    }
}

impl Notifier for HttpNotifier {
    fn send_code(&self, admin: &AdminRow, code: &str, expires_at: &str) {
        let text = format!("duet: your sign-in code is {code} (for {}, valid until {expires_at})", admin.name);
        let mut deliveries = Vec::with_capacity(2);
        if let Some(url) = &self.webhook {
            let body = json!({
                "text": text,
                "event": "admin_code",
                "admin_id": admin.id,
                "name": admin.name,
                "code": code,
                "expires_at": expires_at,
            });
            deliveries.push(Delivery { channel: "webhook", url: url.clone(), body, admin_id: admin.id.clone() });
        }
        if let Some(url) = &self.telegram {
            match &admin.telegram_chat_id {
                Some(chat) => {
                    let body = json!({ "chat_id": chat, "text": text });
                    deliveries.push(Delivery { channel: "telegram", url: url.clone(), body, admin_id: admin.id.clone() });
                }
                None => {
                    tracing::error!(admin_id = %admin.id, "no Telegram chat for this admin: `duet admin add <id> --telegram <chat id>`");
                    if self.webhook.is_none() {
                        self.failures.inc();
                    }
                }
            }
        }
        for d in deliveries {
            tokio::spawn(deliver(self.client.clone(), d, self.failures.clone()));
        }
    }
}

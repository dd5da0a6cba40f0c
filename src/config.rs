//! Configuration: read from the environment once at start, validated, then
//! passed down as one typed value. Nothing else in duet reads `env::var`.
//!
//! `validate` collects every problem before failing, so an operator fixes
//! them in one go; each message names the variable and what is wrong.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use thiserror::Error;

use crate::storage::SqliteSync;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Env {
    Development,
    Production,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// A secret that never shows in `Debug` or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A trusted proxy: one address or a CIDR block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let bits = u32::from(self.prefix.min(32));
                let mask = if bits == 0 { 0 } else { u32::MAX << (32 - bits) };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let bits = u32::from(self.prefix.min(128));
                let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }

    fn parse(s: &str) -> Option<IpNet> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max)?,
            None => max,
        };
        Some(IpNet { addr, prefix })
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub bind: SocketAddr,
    pub node_id: String,
    pub env: Env,
    pub database_url: String,
    pub redis_url: Option<Secret>,
    /// Where one-time codes are posted (`DUET_NOTIFY_WEBHOOK_URL`).
    pub notify_webhook: Option<Secret>,
    /// The bot that sends one-time codes through Telegram.
    pub telegram: Option<Telegram>,
    pub allowed_origins: Vec<String>,
    pub trusted_proxies: Vec<IpNet>,
    pub max_message_bytes: usize,
    pub heartbeat: Duration,
    pub queue_enabled: bool,
    pub metrics_token: Option<Secret>,
    pub rate_limits: bool,
    pub agent_grace: Duration,
    pub customer_grace: Duration,
    /// Concurrent AI sessions per node (for the voice pipeline).
    #[allow(dead_code)]
    pub ai_capacity: usize,
    /// AI providers, one per stage; the voice pipeline uses them.
    pub providers: Providers,
    /// `DUET_CONFIG`: checked readable at start; its providers and scripts
    /// come with the voice pipeline.
    #[allow(dead_code)]
    pub config_file: Option<std::path::PathBuf>,
    pub outbox_frames: usize,
    pub db_pool_size: u32,
    /// PostgreSQL writer threads (SQLite always has one).
    pub db_writers: usize,
    pub db_timeout: Duration,
    /// What a SQLite commit waits for before its ack (`DUET_SQLITE_SYNC`).
    pub sqlite_sync: SqliteSync,
    /// Page cache per SQLite connection, KiB (`DUET_SQLITE_CACHE_KIB`).
    pub sqlite_cache_kib: u32,
    pub admin_idle_ttl: Duration,
    pub admin_max_ttl: Duration,
    /// How often an open `/admin/ws` socket checks that its admin session
    /// is still valid (revoked on another node, expired, admin disabled).
    pub admin_recheck: Duration,
    pub otp_ttl: Duration,
    pub log_format: LogFormat,
    /// `RUST_LOG`: which log events are written (tracing's filter syntax).
    pub log_filter: String,
    pub workers: usize,
}

/// One OpenAI-compatible provider stage: `DUET_<STAGE>_URL` (a base URL
/// ending in `/v1`), `_MODEL`, `_API_KEY`, and for speech `_VOICE`. Read
/// and checked now; the voice pipeline (a later issue) calls them, until
/// then only the language model's presence is used (`join` with `mode: ai`).
#[allow(dead_code)]
#[derive(Clone, Debug)]
pub struct Provider {
    pub url: String,
    pub model: Option<String>,
    pub api_key: Option<Secret>,
    pub voice: Option<String>,
}

/// The primary provider of each stage; `None` where the URL is unset.
#[allow(dead_code)]
#[derive(Clone, Debug, Default)]
pub struct Providers {
    pub stt: Option<Provider>,
    pub llm: Option<Provider>,
    pub tts: Option<Provider>,
}

/// The Telegram bot of `DUET_TELEGRAM_BOT_TOKEN`, and the Bot API it calls
/// (`DUET_TELEGRAM_API_URL`, default Telegram's own).
#[derive(Clone, Debug)]
pub struct Telegram {
    pub token: Secret,
    pub api_url: String,
}

/// What is logged when `RUST_LOG` is unset: duet's events, and only the
/// HTTP server's warnings.
const DEFAULT_LOG_FILTER: &str = "info,actix_server=warn,actix_web=warn";

#[derive(Debug, Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigError(pub Vec<String>);

/// An `http://` or `https://` URL with a host.
fn is_http_url(url: &str) -> bool {
    let host = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"));
    host.is_some_and(|h| !h.is_empty() && !h.starts_with('/'))
}

/// Reads variables from a map, collecting problems instead of stopping at
/// the first.
struct Reader<'a> {
    vars: &'a HashMap<String, String>,
    problems: Vec<String>,
}

impl Reader<'_> {
    /// `DUET_<stage>_URL` and its companions; a companion without the URL,
    /// or a URL that is not an http(s) base URL ending in `/v1`, is a
    /// problem (PROTOCOL.md: "OpenAI-compatible base URL ending in /v1").
    fn provider(&mut self, stage: &str, with_voice: bool) -> Option<Provider> {
        let var = |what: &str| format!("DUET_{stage}_{what}");
        let mut companions = vec!["MODEL", "API_KEY"];
        if with_voice {
            companions.push("VOICE");
        }
        let Some(url) = self.raw(&var("URL")).map(str::to_owned) else {
            for c in companions {
                if self.raw(&var(c)).is_some() {
                    self.problems.push(format!("{} is set but {} is not", var(c), var("URL")));
                }
            }
            return None;
        };
        let base = url.trim_end_matches('/');
        if !is_http_url(base) || !base.ends_with("/v1") {
            self.problems.push(format!("{}={url:?} must be an http(s) base URL ending in /v1 (e.g. https://api.openai.com/v1)", var("URL")));
        }
        Some(Provider {
            url: base.to_owned(),
            model: self.raw(&var("MODEL")).map(str::to_owned),
            api_key: self.raw(&var("API_KEY")).map(|k| Secret(k.to_owned())),
            voice: if with_voice { self.raw(&var("VOICE")).map(str::to_owned) } else { None },
        })
    }

    fn raw(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(|s| s.trim()).filter(|s| !s.is_empty())
    }

    fn string(&self, name: &str, default: &str) -> String {
        self.raw(name).unwrap_or(default).to_owned()
    }

    fn parse<T: std::str::FromStr>(&mut self, name: &str, default: T, what: &str) -> T {
        match self.raw(name) {
            None => default,
            Some(v) => match v.parse() {
                Ok(x) => x,
                Err(_) => {
                    self.problems.push(format!("{name}={v:?} is not {what}"));
                    default
                }
            },
        }
    }

    fn bool(&mut self, name: &str, default: bool) -> bool {
        match self.raw(name).map(str::to_ascii_lowercase).as_deref() {
            None => default,
            Some("true" | "1" | "yes" | "on") => true,
            Some("false" | "0" | "no" | "off") => false,
            Some(v) => {
                self.problems.push(format!("{name}={v:?} must be true or false (or on/off)"));
                default
            }
        }
    }

    /// A number in `range`; out of it is a problem naming the variable.
    fn ranged<T>(&mut self, name: &str, default: T, what: &str, range: std::ops::RangeInclusive<T>) -> T
    where
        T: std::str::FromStr + PartialOrd + Copy + std::fmt::Display,
    {
        let v = self.parse(name, default, what);
        if !range.contains(&v) {
            self.problems.push(format!("{name}={v} must be between {} and {}", range.start(), range.end()));
            return default;
        }
        v
    }

    fn secs(&mut self, name: &str, default: u64, min: u64, max: u64) -> Duration {
        Duration::from_secs(self.ranged(name, default, "a whole number of seconds", min..=max))
    }

    fn list(&self, name: &str) -> Vec<String> {
        self.raw(name)
            .map(|v| v.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect())
            .unwrap_or_default()
    }
}

fn default_node_id() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "node".to_owned())
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        let vars: HashMap<String, String> = std::env::vars().collect();
        Config::from_vars(&vars)
    }

    /// Reads and validates a set of variables (tests pass their own).
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let mut r = Reader { vars, problems: Vec::new() };
        let env = match r.raw("DUET_ENV").map(str::to_ascii_lowercase).as_deref() {
            None | Some("development" | "dev") => Env::Development,
            Some("production" | "prod") => Env::Production,
            Some(v) => {
                r.problems.push(format!("DUET_ENV={v:?} must be development or production"));
                Env::Development
            }
        };
        let bind = r.parse("DUET_BIND", SocketAddr::from(([127, 0, 0, 1], 8080)), "a socket address like 127.0.0.1:8080");
        let node_id = r.raw("DUET_NODE_ID").map(str::to_owned).unwrap_or_else(default_node_id);
        if node_id.len() > 64 || !node_id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            r.problems.push(format!("DUET_NODE_ID={node_id:?} must be up to 64 letters, digits, '-', '_' or '.'"));
        }
        let database_url = r.string("DATABASE_URL", "./data/duet.db");
        let redis_url = r.raw("REDIS_URL").map(|s| Secret(s.to_owned()));
        if let Some(u) = &redis_url {
            if !(u.0.starts_with("redis://") || u.0.starts_with("rediss://")) {
                r.problems.push("REDIS_URL must start with redis:// or rediss://".to_owned());
            }
        }
        let allowed_origins = r.list("DUET_ALLOWED_ORIGINS");
        for o in &allowed_origins {
            if !(o.starts_with("http://") || o.starts_with("https://")) || o.ends_with('/') {
                r.problems.push(format!("DUET_ALLOWED_ORIGINS entry {o:?} must look like https://example.com (scheme, host, optional port, no path)"));
            }
        }
        let mut trusted_proxies = Vec::new();
        for p in r.list("DUET_TRUSTED_PROXIES") {
            match IpNet::parse(&p) {
                Some(n) => trusted_proxies.push(n),
                None => r.problems.push(format!("DUET_TRUSTED_PROXIES entry {p:?} is not an IP address or CIDR block")),
            }
        }
        let max_message_bytes: usize = r.ranged("DUET_MAX_MESSAGE_BYTES", 65536, "a number of bytes", 256..=16 * 1024 * 1024);
        let heartbeat = r.secs("DUET_HEARTBEAT_S", 25, 1, 3600);
        let queue_enabled = r.bool("DUET_QUEUE_ENABLED", true);
        let metrics_token = r.raw("DUET_METRICS_TOKEN").map(|s| Secret(s.to_owned()));
        let rate_limits = r.bool("DUET_RATE_LIMITS", true);
        let agent_grace = r.secs("DUET_AGENT_GRACE_S", 20, 1, 86400);
        let customer_grace = r.secs("DUET_CUSTOMER_GRACE_S", 300, 1, 7 * 86400);
        let ai_capacity: usize = r.ranged("DUET_AI_CAPACITY", 50, "a number of sessions", 0..=100_000);
        let providers = Providers {
            stt: r.provider("STT", false),
            llm: r.provider("LLM", false),
            tts: r.provider("TTS", true),
        };
        let config_file = r.raw("DUET_CONFIG").map(std::path::PathBuf::from);
        if let Some(path) = &config_file {
            if let Err(e) = std::fs::read_to_string(path) {
                r.problems.push(format!("DUET_CONFIG={}: cannot read it ({e})", path.display()));
            }
        }
        let outbox_frames: usize = r.ranged("DUET_OUTBOX_FRAMES", 1024, "a number of frames", 16..=1_000_000);
        let default_pool = if database_url.starts_with("postgres") { 8 } else { 4 };
        let db_pool_size: u32 = r.ranged("DUET_DB_POOL_SIZE", default_pool, "a number of connections", 1..=256);
        let db_writers: usize = r.ranged("DUET_DB_WRITERS", 3usize, "a number of writer threads", 1..=16);
        let db_timeout = Duration::from_millis(r.ranged("DUET_DB_TIMEOUT_MS", 2000u64, "a number of milliseconds", 100..=60_000));
        let sqlite_sync = r.parse("DUET_SQLITE_SYNC", SqliteSync::default(), "normal or full");
        let sqlite_cache_kib: u32 = r.ranged("DUET_SQLITE_CACHE_KIB", crate::storage::SQLITE_CACHE_KIB_DEFAULT, "a number of KiB", 100..=4 * 1024 * 1024);
        let admin_idle_ttl = r.secs("DUET_ADMIN_IDLE_S", 1800, 60, 30 * 86400);
        let admin_max_ttl = r.secs("DUET_ADMIN_MAX_S", 12 * 3600, 60, 90 * 86400);
        let admin_recheck = r.secs("DUET_ADMIN_RECHECK_S", 15, 1, 3600);
        let otp_ttl = r.secs("DUET_OTP_TTL_S", 300, 30, 3600);
        let log_format = match r.raw("DUET_LOG_FORMAT").map(str::to_ascii_lowercase).as_deref() {
            None => if env == Env::Production { LogFormat::Json } else { LogFormat::Text },
            Some("json") => LogFormat::Json,
            Some("text") => LogFormat::Text,
            Some(v) => {
                r.problems.push(format!("DUET_LOG_FORMAT={v:?} must be json or text"));
                LogFormat::Text
            }
        };
        let log_filter = r.raw("RUST_LOG").unwrap_or(DEFAULT_LOG_FILTER).to_owned();
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log_filter) {
            r.problems.push(format!("RUST_LOG={log_filter:?} is not a log filter ({e})"));
        }
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).min(256);
        let workers: usize = r.ranged("DUET_WORKERS", cpus, "a number of threads", 1..=256);
        let notify_webhook = r.raw("DUET_NOTIFY_WEBHOOK_URL").map(|s| Secret(s.to_owned()));
        if notify_webhook.as_ref().is_some_and(|u| !is_http_url(u.expose())) {
            // Not echoed: a webhook URL often carries its secret.
            r.problems.push("DUET_NOTIFY_WEBHOOK_URL must be an http(s) URL".to_owned());
        }
        let telegram_api = r.string("DUET_TELEGRAM_API_URL", "https://api.telegram.org").trim_end_matches('/').to_owned();
        if !is_http_url(&telegram_api) {
            r.problems.push(format!("DUET_TELEGRAM_API_URL={telegram_api:?} must be an http(s) URL"));
        }
        let telegram = r.raw("DUET_TELEGRAM_BOT_TOKEN").map(|t| Telegram { token: Secret(t.to_owned()), api_url: telegram_api });
        if telegram.as_ref().is_some_and(|t| t.token.expose().contains(['/', '?', '#', ' '])) {
            r.problems.push("DUET_TELEGRAM_BOT_TOKEN is not a bot token (like 123456:ABC-DEF…)".to_owned());
        }
        if env == Env::Production {
            let notifier = telegram.is_some() || notify_webhook.is_some();
            if !notifier {
                r.problems.push(
                    "production needs a notifier for one-time codes: set DUET_TELEGRAM_BOT_TOKEN or DUET_NOTIFY_WEBHOOK_URL (codes are never logged in production)".to_owned(),
                );
            }
            if allowed_origins.is_empty() {
                r.problems.push("production needs DUET_ALLOWED_ORIGINS (the origins of your web apps)".to_owned());
            }
        }
        if !r.problems.is_empty() {
            return Err(ConfigError(r.problems));
        }
        Ok(Config {
            bind,
            node_id,
            env,
            database_url,
            redis_url,
            notify_webhook,
            telegram,
            allowed_origins,
            trusted_proxies,
            max_message_bytes,
            heartbeat,
            queue_enabled,
            metrics_token,
            rate_limits,
            agent_grace,
            customer_grace,
            ai_capacity,
            providers,
            config_file,
            outbox_frames,
            db_pool_size,
            db_writers,
            db_timeout,
            sqlite_sync,
            sqlite_cache_kib,
            admin_idle_ttl,
            admin_max_ttl,
            admin_recheck,
            otp_ttl,
            log_format,
            log_filter,
            workers,
        })
    }

    pub fn is_production(&self) -> bool {
        self.env == Env::Production
    }

    /// The admin session cookie's name (`__Host-` in production: HTTPS only,
    /// no Domain, Path=/).
    pub fn cookie_name(&self) -> &'static str {
        if self.is_production() {
            "__Host-duet_session"
        } else {
            "duet_session"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn defaults_need_nothing() {
        let c = Config::from_vars(&HashMap::new()).expect("defaults are valid");
        assert_eq!(c.bind.to_string(), "127.0.0.1:8080");
        assert_eq!(c.database_url, "./data/duet.db");
        assert_eq!(c.max_message_bytes, 65536);
        assert_eq!(c.heartbeat, Duration::from_secs(25));
        assert!(c.queue_enabled && c.rate_limits && c.redis_url.is_none());
        assert_eq!(c.env, Env::Development);
        assert_eq!(c.sqlite_sync, SqliteSync::default());
    }

    #[test]
    fn sqlite_sync_reads_both_levels() {
        for (v, want) in [("full", SqliteSync::Full), ("NORMAL", SqliteSync::Normal)] {
            let c = Config::from_vars(&vars(&[("DUET_SQLITE_SYNC", v)])).expect("valid");
            assert_eq!(c.sqlite_sync, want, "{v}");
        }
    }

    #[test]
    fn every_problem_is_named() {
        let e = Config::from_vars(&vars(&[
            ("DUET_BIND", "nope"),
            ("DUET_HEARTBEAT_S", "0"),
            ("DUET_QUEUE_ENABLED", "maybe"),
            ("DUET_TRUSTED_PROXIES", "10.0.0.0/33"),
            ("DUET_SQLITE_SYNC", "sometimes"),
            ("DUET_SQLITE_CACHE_KIB", "5"),
            ("DUET_DB_TIMEOUT_MS", "5"),
            ("DUET_WORKERS", "0"),
            ("DUET_AI_CAPACITY", "-1"),
            ("DUET_NOTIFY_WEBHOOK_URL", "hooks.example.com/secret-path"),
            ("RUST_LOG", "duet=loud"),
            ("DUET_TELEGRAM_API_URL", "ftp://bots.example"),
        ]))
        .expect_err("invalid");
        let all = e.to_string();
        assert!(!all.contains("secret-path"), "a webhook URL is not echoed: {all}");
        for name in [
            "DUET_BIND",
            "DUET_HEARTBEAT_S",
            "DUET_QUEUE_ENABLED",
            "DUET_TRUSTED_PROXIES",
            "DUET_SQLITE_SYNC",
            "DUET_SQLITE_CACHE_KIB",
            "DUET_DB_TIMEOUT_MS",
            "DUET_WORKERS",
            "DUET_AI_CAPACITY",
            "DUET_NOTIFY_WEBHOOK_URL",
            "RUST_LOG",
            "DUET_TELEGRAM_API_URL",
        ] {
            assert!(all.contains(name), "{name} missing from {all}");
        }
    }

    #[test]
    fn providers_are_base_urls_ending_in_v1() {
        let c = Config::from_vars(&vars(&[
            ("DUET_LLM_URL", "http://127.0.0.1:9000/v1/"),
            ("DUET_LLM_MODEL", "small"),
            ("DUET_LLM_API_KEY", "sk-secret"),
            ("DUET_TTS_URL", "https://api.example.com/v1"),
            ("DUET_TTS_VOICE", "alloy"),
        ]))
        .expect("valid");
        let llm = c.providers.llm.as_ref().expect("llm");
        assert_eq!((llm.url.as_str(), llm.model.as_deref()), ("http://127.0.0.1:9000/v1", Some("small")));
        assert_eq!(c.providers.tts.as_ref().and_then(|t| t.voice.as_deref()), Some("alloy"));
        assert!(c.providers.stt.is_none());
        assert!(!format!("{c:?}").contains("sk-secret"));
        for (k, v) in [
            ("DUET_LLM_URL", "http://127.0.0.1:9000"),
            ("DUET_STT_URL", "ftp://x/v1"),
            ("DUET_TTS_URL", "https:///v1"),
            ("DUET_STT_MODEL", "whisper"),
            ("DUET_CONFIG", "/nonexistent/duet.toml"),
        ] {
            let e = Config::from_vars(&vars(&[(k, v)])).expect_err(k);
            assert!(e.to_string().contains(k), "{k}={v}: {e}");
        }
    }

    #[test]
    fn production_refuses_the_log_fallback() {
        let e = Config::from_vars(&vars(&[("DUET_ENV", "production")])).expect_err("no notifier");
        assert!(e.to_string().contains("DUET_TELEGRAM_BOT_TOKEN"));
    }

    #[test]
    fn secrets_do_not_print() {
        let c = Config::from_vars(&vars(&[("DUET_METRICS_TOKEN", "hunter2")])).expect("valid");
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn cidr_matching() {
        let n = IpNet::parse("10.1.0.0/16").expect("cidr");
        assert!(n.contains("10.1.2.3".parse().expect("ip")));
        assert!(!n.contains("10.2.0.1".parse().expect("ip")));
        let one = IpNet::parse("127.0.0.1").expect("ip");
        assert!(one.contains("127.0.0.1".parse().expect("ip")));
        assert!(IpNet::parse("::1/128").expect("v6").contains("::1".parse().expect("ip")));
    }
}

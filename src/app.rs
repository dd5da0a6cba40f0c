//! Wiring: builds the node from its configuration (database, ports, actors,
//! limits, metrics) and runs the HTTP server until it is told to stop.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Addr};
use actix_codec::Framed;
use actix_http::{h1, HttpService, Request};
use actix_service::{fn_service, map_config, ServiceFactoryExt as _};
use actix_web::dev::AppConfig;
use actix_web::{web, App};
use duet_actors::error::ActorError;
use duet_actors::ports::{AppendBatch, EventStore, PortFuture, SessionSnapshot};
use duet_actors::queue::MemoryQueue;
use duet_actors::registry::{NodeDeps, Recover};
use duet_actors::settings::{Deps, Settings};
use duet_actors::RegistryActor;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::auth::{LogNotifier, Notifier};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::notify::HttpNotifier;
use crate::storage::{Database, DbOptions};

/// Everything a request handler or socket needs, shared by all workers.
pub struct AppState {
    pub config: Config,
    pub db: Database,
    pub deps: Deps,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub notifier: Box<dyn Notifier>,
    /// Every open socket, so a shutdown can tell each one to reconnect.
    pub conns: parking_lot::Mutex<std::collections::HashMap<u64, duet_actors::outbound::ConnHandle>>,
    /// Each open `/admin/ws` socket by conn id, with its admin session's
    /// token hash, so a logout closes the sockets it signed in.
    pub admin_conns: parking_lot::Mutex<std::collections::HashMap<u64, (Arc<str>, duet_actors::outbound::ConnHandle)>>,
    db_ok: AtomicBool,
}

impl AppState {
    /// The last background check found the database down.
    pub fn db_down(&self) -> bool {
        !self.db_ok.load(Ordering::Relaxed)
    }
}

/// Per-IP and per-admin limits that hold on this node (governor). The
/// floors are PROTOCOL.md's: 200 upgrades and 200 joins per 10 s per IP, 3
/// code requests per minute per admin id. The per-IP limits sit half as
/// high again (300 per 10 s), so that a client at the floor (and its agents
/// behind the same address) never meets them. Codes per IP have no floor;
/// 300 requests and verifies a minute let a whole office behind one NAT
/// sign in, and the per-admin lockout is what stops guessing.
pub struct Limits {
    enabled: bool,
    upgrades: DefaultKeyedRateLimiter<IpAddr>,
    joins: DefaultKeyedRateLimiter<IpAddr>,
    otp_per_admin: DefaultKeyedRateLimiter<String>,
    otp_per_ip: DefaultKeyedRateLimiter<IpAddr>,
}

fn per_10s(n: u32) -> Quota {
    let burst = NonZeroU32::new(n).expect("limit is not zero");
    Quota::with_period(Duration::from_secs(10) / n).expect("period is not zero").allow_burst(burst)
}

fn limited(retry: Duration) -> ActorError {
    ActorError::RateLimited { message: "too many requests; slow down", retry_after_ms: retry.as_millis().max(1) as u64 }
}

impl Limits {
    fn new(enabled: bool) -> Limits {
        Limits {
            enabled,
            upgrades: RateLimiter::keyed(per_10s(300)),
            joins: RateLimiter::keyed(per_10s(300)),
            otp_per_admin: RateLimiter::keyed(Quota::per_minute(NonZeroU32::new(3).expect("3 is not zero"))),
            otp_per_ip: RateLimiter::keyed(Quota::per_minute(NonZeroU32::new(300).expect("300 is not zero"))),
        }
    }

    fn check<K: std::hash::Hash + Eq + Clone>(&self, l: &DefaultKeyedRateLimiter<K>, key: &K) -> Result<(), ActorError> {
        if !self.enabled {
            return Ok(());
        }
        l.check_key(key).map_err(|not_until| {
            limited(not_until.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default())))
        })
    }

    pub fn upgrade(&self, ip: IpAddr) -> Result<(), ActorError> {
        self.check(&self.upgrades, &ip)
    }

    pub fn join(&self, ip: IpAddr) -> Result<(), ActorError> {
        self.check(&self.joins, &ip)
    }

    pub fn otp_request(&self, ip: IpAddr, admin_id: &str) -> Result<(), ActorError> {
        self.check(&self.otp_per_ip, &ip)?;
        self.check(&self.otp_per_admin, &admin_id.to_owned())
    }

    pub fn otp_verify(&self, ip: IpAddr) -> Result<(), ActorError> {
        self.check(&self.otp_per_ip, &ip)
    }

    fn forget_idle(&self) {
        self.upgrades.retain_recent();
        self.joins.retain_recent();
        self.otp_per_admin.retain_recent();
        self.otp_per_ip.retain_recent();
    }
}

/// Counts and times what the actors store, without the actors knowing.
struct MeteredStore {
    inner: Arc<dyn EventStore>,
    metrics: Arc<Metrics>,
}

impl EventStore for MeteredStore {
    fn append(&self, batch: AppendBatch) -> PortFuture<()> {
        let n = batch.events.len() as u64;
        let fut = self.inner.append(batch);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let started = Instant::now();
            let res = fut.await;
            metrics.store_commit_seconds.observe(started.elapsed().as_secs_f64());
            match &res {
                Ok(()) => {
                    metrics.events_stored.inc_by(n);
                    metrics.store_batches.inc();
                    metrics.store_batch_events.observe(n as f64);
                }
                Err(_) => {
                    metrics.store_failures.inc();
                }
            }
            res
        })
    }
    fn load_session(&self, id: &duet_actors::domain::SessionId) -> PortFuture<Option<SessionSnapshot>> {
        self.inner.load_session(id)
    }
    fn events_after(&self, id: &duet_actors::domain::SessionId, after: i64, limit: u32) -> PortFuture<Vec<Arc<duet_actors::domain::Event>>> {
        self.inner.events_after(id, after, limit)
    }
    fn events_before(&self, id: &duet_actors::domain::SessionId, before: i64, limit: u32) -> PortFuture<Vec<Arc<duet_actors::domain::Event>>> {
        self.inner.events_before(id, before, limit)
    }
    fn open_sessions(&self) -> PortFuture<Vec<SessionSnapshot>> {
        self.inner.open_sessions()
    }
}

/// Opens the database with the configured pool and timeouts.
pub fn open_database(config: &Config) -> Result<Database, crate::storage::StorageError> {
    Database::open(
        &config.database_url,
        DbOptions { pool_size: config.db_pool_size, connect_timeout: config.db_timeout, pg_writers: config.db_writers, sqlite_sync: config.sqlite_sync, sqlite_cache_kib: config.sqlite_cache_kib, ..DbOptions::default() },
    )
}

fn settings(config: &Config) -> Settings {
    Settings {
        node_id: Arc::from(config.node_id.as_str()),
        agent_grace: config.agent_grace,
        customer_grace: config.customer_grace,
        ..Settings::default()
    }
}

/// Why a node could not start, or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("could not recover open sessions from the database: {0}")]
    Recover(ActorError),
    #[error("the registry actor did not answer: {0}")]
    Registry(#[from] actix::MailboxError),
    #[error("could not listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("could not build the notifiers' HTTP client: {0}")]
    Notifier(reqwest::Error),
    #[error("the HTTP server failed: {0}")]
    Server(#[from] std::io::Error),
}

/// Starts the node's actors on the current actix system.
pub async fn build_state(config: Config, db: Database) -> Result<Arc<AppState>, StartError> {
    let metrics = Arc::new(Metrics::new());
    let store: Arc<dyn EventStore> = Arc::new(MeteredStore { inner: db.event_store(), metrics: metrics.clone() });
    let queue = Arc::new(MemoryQueue::new());
    let settings = Arc::new(settings(&config));
    let registry: Addr<RegistryActor> = RegistryActor::new(store.clone(), queue.clone(), settings.clone()).start();
    let recovered = registry.send(Recover).await?.map_err(StartError::Recover)?;
    tracing::info!(sessions = recovered, "recovery done");
    let deps = registry.send(NodeDeps).await?;
    let limits = Limits::new(config.rate_limits);
    let notifier: Box<dyn Notifier> = if config.notify_webhook.is_some() || config.telegram.is_some() {
        let webhook = config.notify_webhook.as_ref().map(|u| u.expose());
        Box::new(HttpNotifier::new(webhook, config.telegram.as_ref(), metrics.notify_failures.clone()).map_err(StartError::Notifier)?)
    } else {
        // Development only: production without a notifier is refused at start.
        Box::new(LogNotifier)
    };
    let state = Arc::new(AppState {
        config,
        db,
        deps,
        metrics,
        limits,
        notifier,
        conns: parking_lot::Mutex::new(std::collections::HashMap::new()),
        admin_conns: parking_lot::Mutex::new(std::collections::HashMap::new()),
        db_ok: AtomicBool::new(true),
    });
    spawn_housekeeping(state.clone());
    Ok(state)
}

/// Checks the database every second (for `/ready` and fast `unavailable`)
/// and forgets idle rate-limit keys.
fn spawn_housekeeping(state: Arc<AppState>) {
    actix_web::rt::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut n = 0u64;
        let mut was_ok = true;
        loop {
            tick.tick().await;
            let ok = state.db.ping().await.is_ok();
            state.db_ok.store(ok, Ordering::Relaxed);
            state.metrics.db_up.set(i64::from(ok));
            if ok != was_ok {
                if ok {
                    tracing::info!("database is back");
                } else {
                    tracing::error!("database is unreachable; answering unavailable until it is back");
                }
                was_ok = ok;
            }
            n += 1;
            if n.is_multiple_of(60) {
                state.limits.forget_idle();
            }
        }
    });
}

/// The listening socket, bound here (not by actix) so the address is known
/// before the server runs, even for port 0.
fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Binds and runs the HTTP server; returns when it stopped.
///
/// Not `actix_web::HttpServer`: that one offers no hook for upgrades, so a
/// WebSocket would stay inside the HTTP/1 dispatcher and keep its buffers
/// for life. Built from the same parts (actix-server, actix-http's
/// `HttpService`, the actix-web `App`), plus the `upgrade` service that
/// takes WebSocket streams over (src/ws/socket.rs says why).
pub async fn serve(state: Arc<AppState>) -> Result<(), StartError> {
    let addr = state.config.bind;
    let listener = listen(addr).map_err(|source| StartError::Listen { addr, source })?;
    let shown = listener.local_addr()?;
    let data = web::Data::from(state.clone());
    let factory_state = state.clone();
    let server = actix_server::Server::build()
        .workers(state.config.workers)
        .backlog(4096)
        .max_concurrent_connections(100_000)
        .shutdown_timeout(5)
        .disable_signals()
        .listen("duet-http", listener, move || {
            let upgrade_state = factory_state.clone();
            let app = App::new().app_data(data.clone()).configure(crate::http::configure);
            HttpService::build()
                .local_addr(shown)
                .upgrade(fn_service(move |(req, framed): (Request, Framed<actix_web::rt::net::TcpStream, h1::Codec>)| {
                    let state = upgrade_state.clone();
                    async move {
                        crate::ws::upgrade(req, framed, state).await;
                        Ok::<(), std::convert::Infallible>(())
                    }
                }))
                .finish(map_config(
                    actix_service::IntoServiceFactory::into_factory(app).map_err(|e: actix_web::Error| e.error_response()),
                    |_| AppConfig::default(),
                ))
                .tcp()
        })?;
    let base = format!("http://{shown}");
    tracing::info!(node = %state.config.node_id, bind = %shown, "duet is listening");
    println!("duet {} listening on {base} — demo client {base}/  admin panel {base}/admin  health {base}/health  metrics {base}/metrics", env!("CARGO_PKG_VERSION"));
    let server = server.run();
    let handle = server.handle();
    actix_web::rt::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: no new sockets; telling clients to reconnect elsewhere");
        let conns: Vec<_> = state.conns.lock().values().cloned().collect();
        for c in &conns {
            // 1012 "service restart": clients reconnect (through nginx, to
            // another node) and resume; nothing acked is lost, it is stored.
            c.push(duet_actors::outbound::Outbound::Close { code: 1012, reason: "server restarting; reconnect and resume" });
        }
        handle.stop(true).await;
    });
    server.await?;
    tracing::info!("stopped");
    Ok(())
}

/// SIGTERM or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

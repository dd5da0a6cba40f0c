//! Prometheus metrics. Counters are bumped where things happen; gauges that
//! mirror state (queue lengths, sessions) are read from the registry actor
//! at scrape time, so they can never drift. Labels are topics and stages,
//! never session ids.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use duet_actors::registry::NodeStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct TopicLabel {
    pub topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct RoleLabel {
    pub role: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub connections: Family<RoleLabel, Gauge>,
    pub connections_total: Family<RoleLabel, Counter>,
    pub frames_in: Counter,
    pub frames_rejected: Counter,
    pub frames_direct: Counter,
    pub heartbeat_drops: Counter,
    pub slow_consumers: Counter,
    pub upgrades_refused: Counter,
    pub events_stored: Counter,
    pub store_batches: Counter,
    pub store_failures: Counter,
    pub store_batch_events: Histogram,
    pub store_commit_seconds: Histogram,
    /// From a customer's `say` being read to its ack being written out
    /// (after the commit; the relay to the agent is queued just before the
    /// ack): duet's own share of message latency.
    pub relay_seconds: Histogram,
    pub queue_waiting: Family<TopicLabel, Gauge>,
    pub queue_longest_wait: Family<TopicLabel, Gauge>,
    pub sessions_live: Gauge,
    pub sessions_served: Gauge,
    pub agents: Gauge,
    pub agents_available: Gauge,
    pub db_up: Gauge,
    pub db_pool_connections: Gauge,
    pub db_pool_idle: Gauge,
    pub db_writer_queue: Gauge,
    /// Group commits and the batches in them, totals read from the writer
    /// (their ratio is the grouping achieved).
    pub db_commits: Gauge,
    pub db_writer_busy: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub db_batches: Gauge,
    pub db_helper_commits: Gauge,
    pub db_wal_checkpoints: Gauge,
    pub db_wal_checkpoint: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub db_wal_syncs: Gauge,
    pub otp_requests: Counter,
    pub otp_failures: Counter,
    /// One-time codes the notifier gave up on.
    pub notify_failures: Counter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("duet");
        let m = Metrics {
            connections: Family::default(),
            connections_total: Family::default(),
            frames_in: Counter::default(),
            frames_rejected: Counter::default(),
            frames_direct: Counter::default(),
            heartbeat_drops: Counter::default(),
            slow_consumers: Counter::default(),
            upgrades_refused: Counter::default(),
            events_stored: Counter::default(),
            store_batches: Counter::default(),
            store_failures: Counter::default(),
            store_batch_events: Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0]),
            store_commit_seconds: Histogram::new(latency_buckets()),
            relay_seconds: Histogram::new(latency_buckets()),
            queue_waiting: Family::default(),
            queue_longest_wait: Family::default(),
            sessions_live: Gauge::default(),
            sessions_served: Gauge::default(),
            agents: Gauge::default(),
            agents_available: Gauge::default(),
            db_up: Gauge::default(),
            db_pool_connections: Gauge::default(),
            db_pool_idle: Gauge::default(),
            db_writer_queue: Gauge::default(),
            db_commits: Gauge::default(),
            db_writer_busy: Gauge::default(),
            db_batches: Gauge::default(),
            db_helper_commits: Gauge::default(),
            db_wal_checkpoints: Gauge::default(),
            db_wal_checkpoint: Gauge::default(),
            db_wal_syncs: Gauge::default(),
            otp_requests: Counter::default(),
            notify_failures: Counter::default(),
            otp_failures: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("connections", "Open WebSocket connections", m.connections.clone());
        registry.register("connections_opened", "WebSocket connections opened", m.connections_total.clone());
        registry.register("frames_in", "Client frames received", m.frames_in.clone());
        registry.register("frames_rejected", "Client frames refused (rate limit, size)", m.frames_rejected.clone());
        registry.register(
            "frames_direct",
            "Live events written into an agent's socket by the session's thread (the socket's own thread not woken)",
            m.frames_direct.clone(),
        );
        registry.register("heartbeat_drops", "Connections dropped for missing pongs", m.heartbeat_drops.clone());
        registry.register("slow_consumers", "Connections closed because they stopped reading", m.slow_consumers.clone());
        registry.register("upgrades_refused", "WebSocket upgrades refused (origin, auth, limits)", m.upgrades_refused.clone());
        registry.register("events_stored", "Session events committed to the database", m.events_stored.clone());
        registry.register("store_batches", "Session batches stored", m.store_batches.clone());
        registry.register("store_failures", "Group commits that failed", m.store_failures.clone());
        registry.register("store_batch_events", "Events per session batch", m.store_batch_events.clone());
        registry.register("store_commit_seconds", "From a batch handed to storage to its commit", m.store_commit_seconds.clone());
        registry.register("relay_seconds", "Customer say read to its ack written, stored and relayed in between", m.relay_seconds.clone());
        registry.register("queue_waiting", "Customers waiting, per topic", m.queue_waiting.clone());
        registry.register("queue_longest_wait_seconds", "Longest current wait, per topic", m.queue_longest_wait.clone());
        registry.register("sessions_live", "Session actors on this node", m.sessions_live.clone());
        registry.register("sessions_served", "Sessions being served by an agent on this node", m.sessions_served.clone());
        registry.register("agents", "Agents signed in on this node", m.agents.clone());
        registry.register("agents_available", "Agents available for customers on this node", m.agents_available.clone());
        registry.register("db_up", "1 when the database answered the last check", m.db_up.clone());
        registry.register("db_pool_connections", "Open connections of the read pool", m.db_pool_connections.clone());
        registry.register("db_pool_idle", "Idle connections of the read pool", m.db_pool_idle.clone());
        registry.register("db_writer_queue", "Append batches waiting for a writer", m.db_writer_queue.clone());
        registry.register("db_group_commits", "Group commits so far (a total)", m.db_commits.clone());
        registry.register(
            "db_writer_busy_seconds",
            "Seconds the event writers spent in the database so far (a total; per group commit, the commit without the hand-offs that store_commit_seconds includes)",
            m.db_writer_busy.clone(),
        );
        registry.register("db_group_batches", "Session batches in those commits (a total)", m.db_batches.clone());
        registry.register(
            "db_helper_commits",
            "Group commits by helper writers, beside a main writer whose commit ran long (a total)",
            m.db_helper_commits.clone(),
        );
        registry.register(
            "db_wal_syncs",
            "SQLite at synchronous=NORMAL: fsyncs of the WAL by the checkpointer, once per round (a total)",
            m.db_wal_syncs.clone(),
        );
        registry.register(
            "db_wal_checkpoints",
            "SQLite: WAL checkpoints the writer finished between group commits (a total)",
            m.db_wal_checkpoints.clone(),
        );
        registry.register(
            "db_wal_checkpoint_seconds",
            "SQLite: seconds the writer spent finishing them (a total; the writer pauses meanwhile)",
            m.db_wal_checkpoint.clone(),
        );
        registry.register("otp_requests", "One-time codes requested", m.otp_requests.clone());
        registry.register("notify_failures", "One-time codes the notifier could not deliver", m.notify_failures.clone());
        registry.register("otp_failures", "One-time codes refused", m.otp_failures.clone());
        Metrics { registry, ..m }
    }

    /// Copies the registry's figures into the gauges, then renders the text
    /// format.
    pub fn render(&self, stats: &NodeStats, db: &crate::storage::DbStats) -> String {
        self.db_pool_connections.set(i64::from(db.pool_connections));
        self.db_pool_idle.set(i64::from(db.pool_idle));
        self.db_writer_queue.set(db.writer_queue as i64);
        self.db_commits.set(db.writer_commits as i64);
        self.db_writer_busy.set(db.writer_busy_micros as f64 / 1e6);
        self.db_batches.set(db.writer_batches as i64);
        self.db_helper_commits.set(db.writer_helper_commits as i64);
        self.db_wal_checkpoints.set(db.wal_checkpoints as i64);
        self.db_wal_checkpoint.set(db.wal_checkpoint_micros as f64 / 1e6);
        self.db_wal_syncs.set(db.wal_syncs as i64);
        self.sessions_live.set(stats.live_sessions as i64);
        self.sessions_served.set(stats.served_sessions as i64);
        self.agents.set(stats.agents as i64);
        self.agents_available.set(stats.agents_available as i64);
        self.queue_waiting.clear();
        self.queue_longest_wait.clear();
        for (topic, waiting, longest) in &stats.queues {
            let l = TopicLabel { topic: topic.to_string() };
            self.queue_waiting.get_or_create(&l).set(*waiting as i64);
            self.queue_longest_wait.get_or_create(&l).set(*longest as i64);
        }
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The OpenMetrics text `render` writes, as Prometheus's classic text
/// format (`text/plain; version=0.0.4`) for scrapers that do not ask for
/// OpenMetrics: a counter's `# HELP`/`# TYPE` name its `_total` samples,
/// and there is no `# UNIT` or `# EOF` line. Everything else is the same.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "].into_iter().find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) { "_total" } else { "" };
                out.extend([prefix, name, suffix, " ", tail]);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn latency_buckets() -> Vec<f64> {
    vec![0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn renders_text_format_with_topics() {
        let m = Metrics::new();
        m.events_stored.inc();
        let stats = NodeStats { queues: vec![(Arc::from("support"), 3, 12)], ..Default::default() };
        let text = m.render(&stats, &crate::storage::DbStats::default());
        assert!(text.contains("duet_events_stored_total 1"), "{text}");
        assert!(text.contains("duet_queue_waiting{topic=\"support\"} 3"), "{text}");
        assert!(text.trim_end().ends_with("# EOF"));
    }
}

#[cfg(test)]
mod text_format_tests {
    use super::to_prometheus_text;

    #[test]
    fn counters_are_named_by_their_samples_and_openmetrics_lines_go() {
        let om = "# HELP duet_frames_in Client frames received.\n# TYPE duet_frames_in counter\nduet_frames_in_total 3\n\
                  # HELP duet_active Live sessions.\n# TYPE duet_active gauge\nduet_active 2\n# UNIT duet_active sessions\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP duet_frames_in_total Client frames received.\n# TYPE duet_frames_in_total counter\nduet_frames_in_total 3\n\
             # HELP duet_active Live sessions.\n# TYPE duet_active gauge\nduet_active 2\n"
        );
    }
}

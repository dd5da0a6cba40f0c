//! [`EtaModel`]: the estimated wait (`eta_s`) that `queue` frames carry,
//! computed in one place for the session's first frame (the answer to
//! `join`) and the registry's later ones, so the two never disagree.
//!
//! `eta_s = position × handle time ÷ agents taking customers`, where the
//! handle time is an exponential moving average per topic (from assignment
//! to end, weight 0.2 for the newest session; `initial` until a session of
//! the topic ended), and the agents are those available or serving (away
//! and disconnected agents take no one; at least one is assumed, so the
//! estimate stays finite while nobody is signed in).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

/// Weight of the newest session in the moving average.
const NEWEST_WEIGHT: f64 = 0.2;

#[derive(Debug)]
pub struct EtaModel {
    initial_s: f64,
    /// Moving average of handle time per topic, in seconds. Only topics an
    /// agent served are here (agents are signed in), not every topic a
    /// client named.
    handle_s: Mutex<HashMap<Arc<str>, f64>>,
    agents: AtomicUsize,
}

impl EtaModel {
    pub fn new(initial: Duration) -> EtaModel {
        EtaModel { initial_s: initial.as_secs_f64(), handle_s: Mutex::new(HashMap::new()), agents: AtomicUsize::new(0) }
    }

    /// Seconds until the customer at `position` (1 = next) is likely taken.
    pub fn eta_s(&self, topic: &str, position: usize) -> u64 {
        let per = self.handle_s.lock().get(topic).copied().unwrap_or(self.initial_s);
        let agents = self.agents.load(Ordering::Relaxed).max(1) as f64;
        (position as f64 * per / agents).ceil() as u64
    }

    /// A session of `topic` that an agent served ended after `handle_ms`.
    pub fn handled(&self, topic: &Arc<str>, handle_ms: i64) {
        let s = (handle_ms.max(0) as f64) / 1000.0;
        let mut all = self.handle_s.lock();
        let avg = all.entry(topic.clone()).or_insert(self.initial_s);
        *avg = (1.0 - NEWEST_WEIGHT) * *avg + NEWEST_WEIGHT * s;
    }

    /// How many agents take customers now; true when that changed (every
    /// waiting customer's estimate moved).
    pub fn set_agents(&self, n: usize) -> bool {
        self.agents.swap(n, Ordering::Relaxed) != n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_times_handle_time_over_agents() {
        let eta = EtaModel::new(Duration::from_secs(180));
        assert_eq!(eta.eta_s("support", 1), 180, "nobody signed in: one agent assumed");
        assert_eq!(eta.eta_s("support", 3), 540);
        assert!(eta.set_agents(2));
        assert!(!eta.set_agents(2), "no change");
        assert_eq!(eta.eta_s("support", 3), 270);
        let topic: Arc<str> = Arc::from("support");
        eta.handled(&topic, 80_000);
        // 0.8 × 180 + 0.2 × 80 = 160 s per customer, two agents.
        assert_eq!(eta.eta_s("support", 1), 80);
        assert_eq!(eta.eta_s("sales", 1), 90, "other topics keep the initial time");
    }
}

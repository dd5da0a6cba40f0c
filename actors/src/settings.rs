//! What the actors are told at start, and the ports they are given.

use std::sync::Arc;
use std::time::Duration;

use actix::Addr;

use crate::eta::EtaModel;
use crate::ports::{EventStore, QueueStore};
use crate::registry::RegistryActor;

/// Tunables of the actor layer (filled from `src/config`).
#[derive(Clone, Debug)]
pub struct Settings {
    pub node_id: Arc<str>,
    /// How long a disconnected agent may take to resume before its customer
    /// goes back to the head of the queue.
    pub agent_grace: Duration,
    /// How long a session whose customer disconnected is kept (in the queue
    /// or in its conversation) before it ends with `timeout`.
    pub customer_grace: Duration,
    /// How long an ended session's actor lingers to answer late messages
    /// with `not_found` instead of silence.
    pub ended_linger: Duration,
    /// Events per storage read while replaying.
    pub replay_page: u32,
    /// The dashboard and queue positions are pushed at most this often.
    pub push_interval: Duration,
    /// Handle time assumed for the ETA before any session of a topic ended.
    pub initial_handle_time: Duration,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            node_id: Arc::from("node"),
            agent_grace: Duration::from_secs(20),
            customer_grace: Duration::from_secs(120),
            ended_linger: Duration::from_secs(10),
            replay_page: 200,
            push_interval: Duration::from_millis(250),
            initial_handle_time: Duration::from_secs(180),
        }
    }
}

/// Ports and settings every session and agent actor receives. Shared: a
/// clone is one reference count (every session holds one, so its size is
/// per-customer memory).
#[derive(Clone)]
pub struct Deps(Arc<DepsInner>);

pub struct DepsInner {
    pub store: Arc<dyn EventStore>,
    pub queue: Arc<dyn QueueStore>,
    pub registry: Addr<RegistryActor>,
    pub settings: Arc<Settings>,
    pub eta: Arc<EtaModel>,
}

impl Deps {
    /// Built by the node's registry (its `NodeDeps` hands them out), so
    /// every actor shares its one [`EtaModel`].
    pub(crate) fn new(
        store: Arc<dyn EventStore>,
        queue: Arc<dyn QueueStore>,
        registry: Addr<RegistryActor>,
        settings: Arc<Settings>,
        eta: Arc<EtaModel>,
    ) -> Deps {
        Deps(Arc::new(DepsInner { store, queue, registry, settings, eta }))
    }
}

impl std::ops::Deref for Deps {
    type Target = DepsInner;

    fn deref(&self) -> &DepsInner {
        &self.0
    }
}

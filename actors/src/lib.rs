//! duet's actors: the session, agent and registry actors, the in-process
//! queue, and the small traits through which they reach storage and
//! coordination.
//!
//! Map of the crate:
//! - [`domain`]: ids, parties, events — the nouns.
//! - [`ports`]: `EventStore`, `QueueStore` — what the actors need from the
//!   outside, implemented in `src/` (diesel) or here in process.
//! - [`session::SessionActor`]: one per session; the only place a session's
//!   events are numbered; acks after the store committed.
//! - [`agent::AgentActor`]: one per signed-in agent; serves one customer.
//! - [`registry::RegistryActor`]: one per node; finds, restores and recovers
//!   sessions, hands out customers, pushes queue positions and the dashboard.
//! - [`eta::EtaModel`]: the estimated wait in `queue` frames, one formula.
//! - [`outbound`]: the bounded, ordered path from an actor to a socket.
//! - [`memory_store::MemoryEventStore`]: the event log in process (tests,
//!   embeddings without a database).
//!
//! This crate knows no JSON, SQL, Redis or HTTP; `cargo tree` in CI keeps it so.

pub mod agent;
pub mod domain;
pub mod error;
pub mod eta;
pub mod memory_store;
pub mod outbound;
pub mod ports;
pub mod queue;
pub mod registry;
pub mod session;
pub mod settings;
pub mod views;

#[cfg(test)]
mod tests;

pub use agent::AgentActor;
pub use registry::RegistryActor;
pub use session::SessionActor;

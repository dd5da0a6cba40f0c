//! Storage tests, run on SQLite and on PostgreSQL (see `support`).

mod admins;
mod events;
mod outage;
pub(super) mod support;

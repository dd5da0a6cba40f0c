//! Integration tests: the real `duet` binary on a free port, real sockets,
//! real SQLite and PostgreSQL. One test binary (fast to link); shared
//! helpers live in `tests/support`.

#![allow(clippy::unwrap_used, clippy::panic)]

#[path = "../support/mod.rs"]
mod support;

mod conversation;
mod dashboard;
mod protocol_edges;
mod races;
mod resume;
mod durability;
mod admin_auth;
mod browser;
mod cli;

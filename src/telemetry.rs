//! Logging: JSON lines in production (and on request), text in development;
//! the level from `RUST_LOG`, read by the config (default `info`). Installed once, in `main`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// `filter` was checked by the config (`RUST_LOG`); were it not valid,
/// only warnings would be logged.
pub fn init(format: LogFormat, filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let res = match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).with_span_list(false).try_init(),
        // Colour only on a terminal: a piped log must read `admin_id=alice
        // code=48213907` literally (PROTOCOL.md), not with escape codes
        // between each field's name and its `=`.
        LogFormat::Text => builder.with_target(false).with_ansi(std::io::stderr().is_terminal()).try_init(),
    };
    // A second init (tests) keeps the first subscriber.
    let _ = res;
}

//! How a run reports: progress lines and a human table on stderr, and exactly one JSON
//! line on stdout (appended to `--out FILE` as well).
//!
//! stdout carries nothing but that line so scripts can pipe it (`| tail -1 | jq`); the
//! line's envelope (`kind: "duet-loadgen/1"`, `scenario`, `label`, `urls`, `params`,
//! `result`) matches the Node load generator in `shared/peers/loadgen`, so its
//! `render.js` tables runs of both side by side.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde_json::Value;

static QUIET: AtomicBool = AtomicBool::new(false);
static START: OnceLock<Instant> = OnceLock::new();

/// Silences progress lines (the table and the JSON line are still printed).
pub fn set_quiet(q: bool) {
    QUIET.store(q, Ordering::Relaxed);
    START.get_or_init(Instant::now);
}

/// One progress line on stderr, stamped with the seconds since start.
pub fn log(msg: impl std::fmt::Display) {
    if QUIET.load(Ordering::Relaxed) {
        return;
    }
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("[duet-loadgen {t:7.1}s] {msg}");
}

/// The human table, on stderr.
pub fn table(title: &str, rows: &[(String, String)]) {
    let w = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0);
    let mut s = format!("{title}\n{}\n", "-".repeat(title.chars().count().min(100)));
    for (k, v) in rows {
        s.push_str(&format!("{k:<w$}  {v}\n"));
    }
    eprint!("{s}");
}

/// Prints the JSON line on stdout and appends it to `out`.
pub fn emit(line: &Value, out: Option<&Path>) -> anyhow::Result<()> {
    let text = line.to_string();
    println!("{text}");
    if let Some(path) = out {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening --out {}", path.display()))?;
        writeln!(f, "{text}").with_context(|| format!("writing --out {}", path.display()))?;
    }
    Ok(())
}

/// Now as RFC 3339 UTC with milliseconds (`2025-01-31T12:00:00.123Z`).
pub fn now_rfc3339() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(d.as_secs() as i64, d.subsec_millis())
}

fn rfc3339(secs: i64, millis: u32) -> String {
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // civil-from-days (Howard Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        tod / 3600,
        tod % 3600 / 60,
        tod % 60
    )
}

/// Formats bytes as MiB with one decimal, `-` for none.
pub fn mib(b: Option<f64>) -> String {
    b.map_or("-".into(), |b| format!("{:.1} MiB", b / 1_048_576.0))
}

/// Formats bytes as KiB with one decimal, `-` for none.
pub fn kib(b: Option<f64>) -> String {
    b.map_or("-".into(), |b| format!("{:.1} KiB", b / 1024.0))
}

/// Formats an optional number, `-` for none.
pub fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400 + 3_723, 5), "2000-02-29T01:02:03.005Z");
        assert_eq!(rfc3339(1_735_689_599, 999), "2024-12-31T23:59:59.999Z");
    }
}

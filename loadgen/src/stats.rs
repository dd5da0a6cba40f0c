//! Exact summaries of latency samples, and tallies of labelled failures.
//!
//! A run keeps every sample (a few hundred thousand `f64` at most), so the percentiles are
//! exact nearest-rank values of the sorted samples rather than histogram estimates: the
//! p99.9 of a 30-second run is a real message's latency, and two load generators that
//! receive the same samples report the same figures. Nearest rank: the p-th percentile of
//! n sorted samples is the sample at 1-based rank ⌈p·n⌉ (so p100 is the maximum).

use std::collections::BTreeMap;

use serde::Serialize;

/// Latency summary in milliseconds (rounded to 3 decimals); all `None` without samples.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Summary {
    pub count: usize,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub p999: Option<f64>,
    pub max: Option<f64>,
    pub mean: Option<f64>,
}

/// Nearest-rank percentile `q` (0 < q ≤ 1) of samples already sorted ascending.
pub fn percentile_sorted(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len();
    let rank = (q * n as f64).ceil() as usize; // 1-based
    let idx = rank.clamp(1, n) - 1;
    Some(sorted[idx])
}

/// Rounds to `d` decimals (for output only).
pub fn round(x: f64, d: i32) -> f64 {
    let m = 10f64.powi(d);
    (x * m).round() / m
}

/// Sorts the samples in place and summarises them.
pub fn summarize(samples: &mut [f64]) -> Summary {
    if samples.is_empty() {
        return Summary::default();
    }
    samples.sort_unstable_by(f64::total_cmp);
    let sum: f64 = samples.iter().sum();
    let at = |q| percentile_sorted(samples, q).map(|v| round(v, 3));
    Summary {
        count: samples.len(),
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
        p999: at(0.999),
        max: samples.last().map(|v| round(*v, 3)),
        mean: Some(round(sum / samples.len() as f64, 3)),
    }
}

/// Counts of labelled things (error codes, failure reasons), serialized as a JSON object.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(transparent)]
pub struct Tally(BTreeMap<String, u64>);

impl Tally {
    pub fn add(&mut self, key: impl Into<String>) {
        *self.0.entry(key.into()).or_insert(0) += 1;
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        let parts: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        f.write_str(&parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_on_1_to_1000() {
        let mut v: Vec<f64> = (1..=1000).rev().map(f64::from).collect();
        let s = summarize(&mut v);
        assert_eq!(s.count, 1000);
        assert_eq!(s.p50, Some(500.0));
        assert_eq!(s.p90, Some(900.0));
        assert_eq!(s.p99, Some(990.0));
        assert_eq!(s.p999, Some(999.0));
        assert_eq!(s.max, Some(1000.0));
        assert_eq!(s.mean, Some(500.5));
    }

    #[test]
    fn small_sets() {
        assert_eq!(percentile_sorted(&[], 0.5), None);
        assert_eq!(percentile_sorted(&[7.0], 0.5), Some(7.0));
        assert_eq!(percentile_sorted(&[7.0], 0.999), Some(7.0));
        // n = 10: p50 is rank 5, p90 rank 9, p99 and p99.9 rank 10
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile_sorted(&v, 0.5), Some(5.0));
        assert_eq!(percentile_sorted(&v, 0.9), Some(9.0));
        assert_eq!(percentile_sorted(&v, 0.99), Some(10.0));
        assert_eq!(percentile_sorted(&v, 1.0), Some(10.0));
        // ranks never fall below 1
        assert_eq!(percentile_sorted(&v, 0.0), Some(1.0));
        // n = 3: p50 is rank ⌈1.5⌉ = 2
        assert_eq!(percentile_sorted(&[1.0, 2.0, 3.0], 0.5), Some(2.0));
    }

    #[test]
    fn empty_summary_is_all_none() {
        let s = summarize(&mut []);
        assert_eq!(s, Summary::default());
        assert!(s.p50.is_none() && s.max.is_none());
    }

    #[test]
    fn sorts_unsorted_input_and_rounds() {
        let mut v = vec![3.33333, 1.11111, 2.22222];
        let s = summarize(&mut v);
        assert_eq!(v, vec![1.11111, 2.22222, 3.33333]);
        assert_eq!(s.p50, Some(2.222));
        assert_eq!(s.max, Some(3.333));
    }

    #[test]
    fn tally_counts() {
        let mut t = Tally::default();
        t.add("join:timeout");
        t.add("join:timeout");
        t.add("connect:refused");
        assert_eq!(
            serde_json::to_string(&t).expect("serializable"),
            r#"{"connect:refused":1,"join:timeout":2}"#
        );
        assert_eq!(t.to_string(), "connect:refused: 1, join:timeout: 2");
        assert_eq!(Tally::default().to_string(), "none");
    }
}

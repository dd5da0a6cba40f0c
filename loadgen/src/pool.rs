//! A bounded pool for setup work: run `n` jobs with at most `limit` in flight.
//!
//! Opening thousands of connections at once would measure the kernel's accept backlog
//! and the load generator's own scheduling, not the server's admission; a fixed number of
//! workers (`--concurrency`) pulling the next index keeps a steady, known pressure. The
//! workers are separate tokio tasks, so they run on every thread of the runtime.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Runs `f(0) … f(n-1)`, at most `limit` at a time; the results come back in index order.
pub async fn pool<F, Fut, T>(n: usize, limit: usize, f: F) -> anyhow::Result<Vec<T>>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let f = Arc::new(f);
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..limit.clamp(1, n.max(1)) {
        let f = f.clone();
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break done;
                }
                done.push((i, f(i).await));
            }
        }));
    }
    let mut slots: Vec<Option<T>> = (0..n).map(|_| None).collect();
    for w in workers {
        for (i, v) in w.await? {
            slots[i] = Some(v);
        }
    }
    slots
        .into_iter()
        .map(|s| s.ok_or_else(|| anyhow::anyhow!("a pool job did not run")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_all_in_order_bounded() {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (a, b) = (in_flight.clone(), peak.clone());
        let out = pool(50, 4, move |i| {
            let (a, b) = (a.clone(), b.clone());
            async move {
                let now = a.fetch_add(1, Ordering::SeqCst) + 1;
                b.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                a.fetch_sub(1, Ordering::SeqCst);
                i * 2
            }
        })
        .await
        .expect("no panics");
        assert_eq!(out, (0..50).map(|i| i * 2).collect::<Vec<_>>());
        assert!(peak.load(Ordering::SeqCst) <= 4);
        assert!(pool(0, 4, |i| async move { i })
            .await
            .expect("empty")
            .is_empty());
    }
}

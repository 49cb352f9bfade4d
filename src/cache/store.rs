//! The in-memory store of terminal runs: the only module that touches moka.
//!
//! Entries are weighed by the bytes they hold (body plus id), so `max_size` bounds memory rather
//! than entry count. Everything a hit needs is computed once at store time and shared behind an
//! `Arc`, so a hit is a lookup and a reference-count increment, nothing parsed or formatted.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use moka::future::Cache;
use moka::notification::RemovalCause;

use crate::metrics::{CacheMetrics, EvictionCause};
use crate::run_id::RunId;
use crate::run_status::RunStatus;

/// A stored terminal run, ready to be sent.
#[derive(Debug)]
pub struct CachedRun {
    /// The upstream body, byte for byte.
    pub body: Bytes,
    /// The upstream `content-type`.
    pub content_type: HeaderValue,
    /// The run's status, for the run-status metric on every hit.
    pub status: RunStatus,
}

/// Bytes an entry is charged against `max_size`: its body and its id.
fn weight(id: &RunId, run: &Arc<CachedRun>) -> u32 {
    u32::try_from(run.body.len() + id.as_str().len()).unwrap_or(u32::MAX)
}

/// A size-bounded, time-bounded map from run id to terminal run.
#[derive(Clone)]
pub struct RunStore {
    runs: Cache<RunId, Arc<CachedRun>>,
}

impl RunStore {
    /// `max_bytes` bounds the summed weights; every entry lives at most `ttl`. Evictions are
    /// counted in `metrics`.
    pub fn new(max_bytes: u64, ttl: Duration, metrics: CacheMetrics) -> Self {
        let runs = Cache::builder()
            .name("terminal-runs")
            .max_capacity(max_bytes)
            .weigher(weight)
            .time_to_live(ttl)
            .eviction_listener(move |_id, _run, cause| {
                let cause = match cause {
                    RemovalCause::Size => EvictionCause::Size,
                    RemovalCause::Expired => EvictionCause::Expired,
                    RemovalCause::Explicit => EvictionCause::Explicit,
                    // Overwritten by a fresher copy of the same run: nothing left the cache.
                    RemovalCause::Replaced => return,
                };
                metrics.evicted(cause);
            })
            .build();
        Self { runs }
    }

    pub async fn get(&self, id: &str) -> Option<Arc<CachedRun>> {
        self.runs.get(id).await
    }

    /// Stores `run` and applies any eviction it causes before returning, so the size bound holds
    /// as soon as the insert is done rather than at the next housekeeping tick.
    pub async fn insert(&self, id: RunId, run: Arc<CachedRun>) {
        self.runs.insert(id, run).await;
        self.runs.run_pending_tasks().await;
    }

    /// Runs held and their summed weight, after applying pending housekeeping (expiry included).
    pub async fn occupancy(&self) -> (u64, u64) {
        self.runs.run_pending_tasks().await;
        (self.runs.entry_count(), self.runs.weighted_size())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::response::APPLICATION_JSON;
    use crate::run_status::RunStatuses;

    fn store(max_bytes: u64) -> RunStore {
        let statuses = RunStatuses::new(&["COMPLETED"]);
        let metrics = Metrics::new(prometheus::Registry::new(), &statuses).expect("metrics");
        RunStore::new(max_bytes, Duration::from_secs(60), metrics.cache)
    }

    fn run_of(bytes: usize) -> Arc<CachedRun> {
        Arc::new(CachedRun {
            body: Bytes::from(vec![b'x'; bytes]),
            content_type: APPLICATION_JSON,
            status: RunStatuses::new(&["COMPLETED"]).classify("COMPLETED"),
        })
    }

    #[tokio::test]
    async fn weight_never_exceeds_the_bound() {
        let store = store(10 * 1024);
        for index in 0..100 {
            let id = RunId::parse(&format!("run_{index}")).expect("valid id");
            store.insert(id, run_of(1000)).await;
            let (_, bytes) = store.occupancy().await;
            assert!(bytes <= 10 * 1024, "after {index}: {bytes}");
        }
        let (entries, _) = store.occupancy().await;
        assert!((1..=10).contains(&entries), "{entries}");
    }

    #[tokio::test]
    async fn lookups_borrow_the_id() {
        let store = store(1 << 20);
        store
            .insert(RunId::parse("abc").expect("valid id"), run_of(10))
            .await;
        assert_eq!(store.get("abc").await.expect("stored").body.len(), 10);
        assert!(store.get("abd").await.is_none());
    }
}

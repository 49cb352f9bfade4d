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

use crate::run_id::RunId;

/// A stored terminal run, ready to be sent.
#[derive(Debug)]
pub struct CachedRun {
    /// The upstream body, byte for byte.
    pub body: Bytes,
    /// The upstream `content-type`.
    pub content_type: HeaderValue,
}

/// Bytes an entry is charged against `max_size`.
fn weight(id: &RunId, run: &Arc<CachedRun>) -> u32 {
    let bytes = run.body.len() + id.as_str().len() + run.content_type.len();
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// A size-bounded, time-bounded map from run id to terminal run.
#[derive(Clone)]
pub struct RunStore {
    runs: Cache<RunId, Arc<CachedRun>>,
}

impl RunStore {
    /// `max_bytes` bounds the summed weights; every entry lives at most `ttl`.
    pub fn new(max_bytes: u64, ttl: Duration) -> Self {
        let runs = Cache::builder()
            .name("terminal-runs")
            .max_capacity(max_bytes)
            .weigher(weight)
            .time_to_live(ttl)
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

    /// Runs held right now (after pending housekeeping).
    pub fn entry_count(&self) -> u64 {
        self.runs.entry_count()
    }

    /// Sum of the weights held right now.
    pub fn weighted_size(&self) -> u64 {
        self.runs.weighted_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::response::APPLICATION_JSON;

    fn run_of(bytes: usize) -> Arc<CachedRun> {
        Arc::new(CachedRun {
            body: Bytes::from(vec![b'x'; bytes]),
            content_type: APPLICATION_JSON,
        })
    }

    #[tokio::test]
    async fn weight_never_exceeds_the_bound() {
        let store = RunStore::new(10 * 1024, Duration::from_secs(60));
        for index in 0..100 {
            let id = RunId::parse(&format!("run_{index}")).expect("valid id");
            store.insert(id, run_of(1000)).await;
            assert!(
                store.weighted_size() <= 10 * 1024,
                "after {index}: {}",
                store.weighted_size()
            );
        }
        assert!(store.entry_count() <= 10);
        assert!(store.entry_count() >= 1);
    }

    #[tokio::test]
    async fn lookups_borrow_the_id() {
        let store = RunStore::new(1 << 20, Duration::from_secs(60));
        store
            .insert(RunId::parse("abc").expect("valid id"), run_of(10))
            .await;
        assert_eq!(store.get("abc").await.expect("stored").body.len(), 10);
        assert!(store.get("abd").await.is_none());
    }
}

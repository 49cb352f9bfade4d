//! The in-memory store of answers that cannot change: the only module that touches moka.
//!
//! It holds terminal runs for `cache.ttl` and, when `cache.not_found_ttl` is set, upstream 404s for
//! that (short) time; each entry carries its own lifetime. Entries are weighed by the bytes they
//! hold (body plus id), so `max_size` bounds memory rather than entry count. Everything a hit needs
//! (headers, validator, status label) is computed once at store time and shared behind an `Arc`,
//! so a hit is a lookup and a reference-count increment, nothing parsed or formatted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use moka::Expiry;
use moka::future::Cache;
use moka::notification::RemovalCause;

use crate::etag::strong_etag;
use crate::metrics::{CacheMetrics, EvictionCause};
use crate::response::NO_STORE;
use crate::run_id::RunId;
use crate::run_status::RunStatus;

/// A stored answer, ready to be sent.
#[derive(Debug)]
pub struct CachedRun {
    /// 200 for a terminal run, 404 for a remembered absence.
    pub status: StatusCode,
    /// The upstream body, byte for byte.
    pub body: Bytes,
    /// The upstream `content-type`.
    pub content_type: HeaderValue,
    /// What clients are told about caching it.
    pub cache_control: HeaderValue,
    /// Strong validator, for runs only.
    pub etag: Option<HeaderValue>,
    /// The run's status, for the run-status metric on every hit; none for a 404.
    pub run_status: Option<RunStatus>,
    /// How long the entry stays.
    ttl: Duration,
}

impl CachedRun {
    /// A terminal run, kept for `ttl`; its ETag is computed here, once.
    pub fn terminal(
        body: Bytes,
        content_type: HeaderValue,
        run_status: RunStatus,
        cache_control: HeaderValue,
        ttl: Duration,
    ) -> Self {
        Self {
            status: StatusCode::OK,
            etag: Some(strong_etag(&body)),
            body,
            content_type,
            cache_control,
            run_status: Some(run_status),
            ttl,
        }
    }

    /// Upstream's 404 for a run, kept for `ttl`, never cached by clients.
    pub fn not_found(body: Bytes, content_type: HeaderValue, ttl: Duration) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            body,
            content_type,
            cache_control: NO_STORE,
            etag: None,
            run_status: None,
            ttl,
        }
    }
}

/// Bytes an entry is charged against `max_size`: its body and its id.
fn weight(id: &RunId, run: &Arc<CachedRun>) -> u32 {
    u32::try_from(run.body.len() + id.as_str().len()).unwrap_or(u32::MAX)
}

/// Each entry expires after its own `ttl`, counted from when it was stored.
struct PerEntryTtl;

impl Expiry<RunId, Arc<CachedRun>> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _id: &RunId,
        run: &Arc<CachedRun>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(run.ttl)
    }

    fn expire_after_update(
        &self,
        _id: &RunId,
        run: &Arc<CachedRun>,
        _updated_at: Instant,
        _remaining: Option<Duration>,
    ) -> Option<Duration> {
        Some(run.ttl)
    }
}

/// A size-bounded map from run id to stored answer.
#[derive(Clone)]
pub struct RunStore {
    runs: Cache<RunId, Arc<CachedRun>>,
}

impl RunStore {
    /// `max_bytes` bounds the summed weights. Evictions are counted in `metrics`.
    pub fn new(max_bytes: u64, metrics: CacheMetrics) -> Self {
        let runs = Cache::builder()
            .name("runs")
            .max_capacity(max_bytes)
            .weigher(weight)
            .expire_after(PerEntryTtl)
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
        RunStore::new(max_bytes, metrics.cache)
    }

    fn run_of(bytes: usize) -> Arc<CachedRun> {
        let status = RunStatuses::new(&["COMPLETED"]).classify("COMPLETED");
        let body = Bytes::from(vec![b'x'; bytes]);
        Arc::new(CachedRun::terminal(
            body,
            APPLICATION_JSON,
            status,
            NO_STORE,
            Duration::from_secs(60),
        ))
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

#[cfg(test)]
mod expiry_tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::response::APPLICATION_JSON;
    use crate::run_status::RunStatuses;

    #[tokio::test]
    async fn each_entry_keeps_its_own_lifetime() {
        let statuses = RunStatuses::new(&["COMPLETED"]);
        let metrics = Metrics::new(prometheus::Registry::new(), &statuses).expect("metrics");
        let store = RunStore::new(1 << 20, metrics.cache);
        let long = CachedRun::terminal(
            Bytes::from_static(b"{}"),
            APPLICATION_JSON,
            statuses.classify("COMPLETED"),
            NO_STORE,
            Duration::from_secs(3600),
        );
        let short = CachedRun::not_found(
            Bytes::from_static(b"{}"),
            APPLICATION_JSON,
            Duration::from_millis(1),
        );
        store
            .insert(RunId::parse("long").expect("id"), Arc::new(long))
            .await;
        store
            .insert(RunId::parse("short").expect("id"), Arc::new(short))
            .await;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while store.get("short").await.is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the short entry never expired"
            );
            tokio::task::yield_now().await;
        }
        assert!(store.get("long").await.is_some());
    }
}

//! The in-memory store of answers that cannot change: the only module that touches moka.
//!
//! It holds terminal runs for `cache.ttl` and, when `cache.not_found_ttl` is set, upstream 404s for
//! that (short) time. Entries are weighed by the bytes they hold (body plus id), so `max_size`
//! bounds memory rather than entry count. Everything a hit needs (body, validator, status label)
//! is prepared once at store time, so a hit is a lookup and a few reference-count increments,
//! nothing parsed or formatted.
//!
//! Entries are kept small, since a cache of small runs is mostly per-entry overhead: the body is
//! copied into an allocation of its own size (an upstream body arrives as a slice of the
//! connection's read buffer, and keeping that slice would pin the whole buffer, 8 KiB or more, for
//! the entry's lifetime), `application/json` is a static header value and any other content type
//! is boxed, and the caching headers are derived from the entry's kind when it is served.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use moka::Expiry;
use moka::future::Cache;
use moka::notification::RemovalCause;

use crate::etag::strong_etag;
use crate::metrics::{CacheMetrics, EvictionCause};
use crate::response::APPLICATION_JSON;
use crate::run_id::RunId;
use crate::run_status::RunStatus;

/// A stored answer, ready to be sent. Cheap to clone: shared bytes and small values.
#[derive(Debug, Clone)]
pub struct CachedRun {
    /// The upstream body, byte for byte.
    pub body: Bytes,
    /// Strong validator, for runs only.
    pub etag: Option<HeaderValue>,
    /// The upstream `content-type` when it is not `application/json`.
    other_content_type: Option<Box<HeaderValue>>,
    kind: Kind,
}

/// What an entry stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A run that has ended, in this status.
    Terminal(RunStatus),
    /// Upstream said 404.
    NotFound,
}

impl CachedRun {
    /// A terminal run; its ETag is computed here, once.
    pub fn terminal(body: Bytes, content_type: HeaderValue, run_status: RunStatus) -> Self {
        Self {
            etag: Some(strong_etag(&body)),
            body: Bytes::copy_from_slice(&body),
            other_content_type: other_content_type(content_type),
            kind: Kind::Terminal(run_status),
        }
    }

    /// Upstream's 404 for a run.
    pub fn not_found(body: Bytes, content_type: HeaderValue) -> Self {
        Self {
            body: Bytes::copy_from_slice(&body),
            etag: None,
            other_content_type: other_content_type(content_type),
            kind: Kind::NotFound,
        }
    }

    /// The HTTP status to answer with.
    pub fn status(&self) -> StatusCode {
        match self.kind {
            Kind::Terminal(_) => StatusCode::OK,
            Kind::NotFound => StatusCode::NOT_FOUND,
        }
    }

    /// The run's status, for the run-status metric on every hit; none for a 404.
    pub fn run_status(&self) -> Option<RunStatus> {
        match self.kind {
            Kind::Terminal(status) => Some(status),
            Kind::NotFound => None,
        }
    }

    /// The upstream `content-type`.
    pub fn content_type(&self) -> HeaderValue {
        self.other_content_type
            .as_deref()
            .cloned()
            .unwrap_or(APPLICATION_JSON)
    }

    /// Whether clients may cache it too (terminal runs) or must not (404s).
    pub fn is_terminal(&self) -> bool {
        matches!(self.kind, Kind::Terminal(_))
    }
}

/// `None` for `application/json` (by far the most common; served from a static value), otherwise
/// a copy in memory of its own.
fn other_content_type(value: HeaderValue) -> Option<Box<HeaderValue>> {
    (value != APPLICATION_JSON).then(|| {
        Box::new(HeaderValue::from_bytes(value.as_bytes()).expect("a copy of a valid header value is valid"))
    })
}

/// Bytes an entry is charged against `max_size`: its body and its id.
fn weight(id: &RunId, run: &CachedRun) -> u32 {
    u32::try_from(run.body.len() + id.as_str().len()).unwrap_or(u32::MAX)
}

/// Terminal runs live `ttl`, remembered 404s `not_found_ttl`, counted from when they were stored.
struct Lifetimes {
    ttl: Duration,
    not_found_ttl: Duration,
}

impl Lifetimes {
    fn of(&self, run: &CachedRun) -> Duration {
        if run.is_terminal() {
            self.ttl
        } else {
            self.not_found_ttl
        }
    }
}

impl Expiry<RunId, CachedRun> for Lifetimes {
    fn expire_after_create(&self, _id: &RunId, run: &CachedRun, _created_at: Instant) -> Option<Duration> {
        Some(self.of(run))
    }

    fn expire_after_update(
        &self,
        _id: &RunId,
        run: &CachedRun,
        _updated_at: Instant,
        _remaining: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.of(run))
    }
}

/// A size-bounded map from run id to stored answer.
#[derive(Clone)]
pub struct RunStore {
    runs: Cache<RunId, CachedRun>,
}

impl RunStore {
    /// `max_bytes` bounds the summed weights; terminal runs live `ttl`, 404s `not_found_ttl`.
    /// Evictions are counted in `metrics`.
    pub fn new(max_bytes: u64, ttl: Duration, not_found_ttl: Duration, metrics: CacheMetrics) -> Self {
        let runs = Cache::builder()
            .name("runs")
            .max_capacity(max_bytes)
            .weigher(weight)
            .expire_after(Lifetimes { ttl, not_found_ttl })
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

    pub async fn get(&self, id: &str) -> Option<CachedRun> {
        self.runs.get(id).await
    }

    /// Stores `run` and applies any eviction it causes before returning, so the size bound holds
    /// as soon as the insert is done rather than at the next housekeeping tick.
    pub async fn insert(&self, id: RunId, run: CachedRun) {
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
    use crate::run_status::RunStatuses;

    const HOUR: Duration = Duration::from_secs(3600);

    fn store(max_bytes: u64, not_found_ttl: Duration) -> RunStore {
        let statuses = RunStatuses::new(&["COMPLETED"]);
        let metrics = Metrics::new(prometheus::Registry::new(), &statuses).expect("metrics");
        RunStore::new(max_bytes, HOUR, not_found_ttl, metrics.cache)
    }

    fn completed() -> RunStatus {
        RunStatuses::new(&["COMPLETED"]).classify("COMPLETED")
    }

    fn run_of(bytes: usize) -> CachedRun {
        CachedRun::terminal(Bytes::from(vec![b'x'; bytes]), APPLICATION_JSON, completed())
    }

    #[tokio::test]
    async fn weight_never_exceeds_the_bound() {
        let store = store(10 * 1024, HOUR);
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
        let store = store(1 << 20, HOUR);
        store
            .insert(RunId::parse("abc").expect("valid id"), run_of(10))
            .await;
        assert_eq!(store.get("abc").await.expect("stored").body.len(), 10);
        assert!(store.get("abd").await.is_none());
    }

    #[test]
    fn a_stored_body_does_not_pin_the_buffer_it_was_read_into() {
        let read_buffer = Bytes::from(vec![b'x'; 16 * 1024]);
        let body = read_buffer.slice(100..1124);
        let content_type = HeaderValue::from_maybe_shared(read_buffer.slice(0..16)).expect("header");
        let run = CachedRun::terminal(body.clone(), content_type.clone(), completed());
        assert_eq!(run.body, body);
        assert_ne!(
            run.body.as_ptr(),
            body.as_ptr(),
            "the entry holds a copy of its own size"
        );
        assert_eq!(run.etag, Some(strong_etag(&body)));
        assert_eq!(run.content_type(), content_type);
        assert_ne!(run.content_type().as_bytes().as_ptr(), read_buffer.as_ptr());
        assert_eq!(run_of(1).content_type(), APPLICATION_JSON);
    }

    #[test]
    fn entries_know_what_they_stand_for() {
        let run = run_of(3);
        assert_eq!(
            (run.status(), run.run_status(), run.is_terminal()),
            (StatusCode::OK, Some(completed()), true)
        );
        let missing = CachedRun::not_found(Bytes::from_static(b"{}"), APPLICATION_JSON);
        assert_eq!(
            (missing.status(), missing.run_status(), missing.etag),
            (StatusCode::NOT_FOUND, None, None)
        );
    }

    #[tokio::test]
    async fn remembered_404s_expire_on_their_own_clock() {
        let store = store(1 << 20, Duration::from_millis(1));
        store.insert(RunId::parse("long").expect("id"), run_of(2)).await;
        let missing = CachedRun::not_found(Bytes::from_static(b"{}"), APPLICATION_JSON);
        store.insert(RunId::parse("short").expect("id"), missing).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while store.get("short").await.is_some() {
            assert!(std::time::Instant::now() < deadline, "the 404 never expired");
            tokio::task::yield_now().await;
        }
        assert!(store.get("long").await.is_some());
    }
}

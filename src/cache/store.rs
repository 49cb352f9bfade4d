//! The in-memory store of answers that cannot change: the only module that touches moka.
//!
//! It holds terminal runs for `cache.ttl` and, when `cache.not_found_ttl` is set, upstream 404s for
//! that (short) time. Entries are weighed by the bytes they hold (body plus id), so `max_size`
//! bounds memory rather than entry count. Everything a hit needs (body, validator, status label)
//! is prepared once at store time, so a hit is a lookup and a few reference-count increments,
//! nothing parsed or formatted beyond re-checking the stored 34-byte ETag as a header value.
//!
//! Entries are kept small, since a cache of small runs is mostly per-entry overhead:
//! - the ETag and the body are copied, end to end, into one allocation of exactly their size from
//!   the system allocator (see `exact_copy`); an upstream body arrives as a slice of the
//!   connection's read buffer, and keeping that slice would pin the whole buffer, 8 KiB or more;
//! - the content type joins them in that allocation unless it is `application/json` (nearly
//!   always), which is served from a static value;
//! - the caching headers are derived from the entry's kind when it is served.

use std::alloc::System;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use moka::Expiry;
use moka::future::Cache;
use moka::notification::RemovalCause;
use moka::ops::compute::{CompResult, Op};

use super::metrics::{CacheMetrics, EvictionCause};
use super::purge::Scope;
use crate::cache::etag::{STRONG_ETAG_LEN, strong_etag};
use crate::edge::response::APPLICATION_JSON;
use crate::run::id::RunId;
use crate::run::status::RunStatus;

/// A stored answer, ready to be sent. Cheap to clone: one shared allocation and small values.
#[derive(Debug, Clone)]
pub struct CachedRun {
    /// The strong ETag (runs only), the content type unless it is `application/json`, then the
    /// upstream body byte for byte.
    stored: Bytes,
    /// Length of the content type in `stored`; 0 for `application/json`.
    content_type_len: u32,
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
    pub fn terminal(body: &[u8], content_type: HeaderValue, run_status: RunStatus) -> Self {
        Self::new(Kind::Terminal(run_status), &strong_etag(body), content_type, body)
    }

    /// Upstream's 404 for a run.
    pub fn not_found(body: &[u8], content_type: HeaderValue) -> Self {
        Self::new(Kind::NotFound, &[], content_type, body)
    }

    fn new(kind: Kind, etag: &[u8], content_type: HeaderValue, body: &[u8]) -> Self {
        let content_type = if content_type == APPLICATION_JSON {
            &[][..]
        } else {
            content_type.as_bytes()
        };
        let content_type_len = u32::try_from(content_type.len()).expect("header values are far shorter");
        Self {
            stored: exact_copy(&[etag, content_type, body]),
            content_type_len,
            kind,
        }
    }

    fn etag_len(&self) -> usize {
        match self.kind {
            Kind::Terminal(_) => STRONG_ETAG_LEN,
            Kind::NotFound => 0,
        }
    }

    fn body_start(&self) -> usize {
        self.etag_len() + self.content_type_len as usize
    }

    /// The upstream body, byte for byte (shared, not copied).
    pub fn body(&self) -> Bytes {
        self.stored.slice(self.body_start()..)
    }

    /// The body's length, without touching its reference count.
    pub fn body_len(&self) -> usize {
        self.stored.len() - self.body_start()
    }

    /// The strong validator, for runs only.
    pub fn etag(&self) -> Option<HeaderValue> {
        (self.etag_len() > 0).then(|| self.header_value(0..self.etag_len()))
    }

    /// The upstream `content-type`.
    pub fn content_type(&self) -> HeaderValue {
        if self.content_type_len == 0 {
            APPLICATION_JSON
        } else {
            self.header_value(self.etag_len()..self.body_start())
        }
    }

    /// A header value stored at `range`, shared rather than copied.
    fn header_value(&self, range: std::ops::Range<usize>) -> HeaderValue {
        HeaderValue::from_maybe_shared(self.stored.slice(range)).expect("stored from a valid header value")
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

    /// Whether clients may cache it too (terminal runs) or must not (404s).
    pub fn is_terminal(&self) -> bool {
        matches!(self.kind, Kind::Terminal(_))
    }
}

/// `parts`, end to end, in one allocation of exactly their summed size from the system allocator.
///
/// The global allocator (mimalloc, chosen for the request path's short-lived buffers) rounds every
/// request up to a size class, four per doubling: a 1,063-byte body would take 1,280 bytes, a fifth
/// of it wasted for as long as the run stays cached. glibc's malloc carves blocks at 16-byte
/// granularity, and since nothing but cached bodies lives there, its free lists stay dense as runs
/// come and go (`benches/memory.sh` measures both).
fn exact_copy(parts: &[&[u8]]) -> Bytes {
    let len = parts.iter().map(|part| part.len()).sum();
    let mut copy = allocator_api2::vec::Vec::with_capacity_in(len, System);
    for part in parts {
        copy.extend_from_slice(part);
    }
    Bytes::from_owner(copy.into_boxed_slice())
}

/// Bytes an entry is charged against `max_size`: its body and its id.
fn weight(id: &RunId, run: &CachedRun) -> u32 {
    u32::try_from(run.body_len() + id.as_str().len()).unwrap_or(u32::MAX)
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
    runs: Cache<RunId, CachedRun, foldhash::fast::RandomState>,
    /// `cache.max_size`: an answer weighing more is never admitted.
    max_bytes: u64,
    /// Tests only: a purge says it has looked at the entry (first), then waits for a go-ahead
    /// (second) before removing it.
    #[cfg(test)]
    purge_pause: Option<std::sync::Arc<(tokio::sync::Semaphore, tokio::sync::Semaphore)>>,
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
            // Seeded per process, so ids cannot be picked to collide without the seed, and every
            // id in here cost an upstream call. SipHash (the default) cost more than the lookup.
            .build_with_hasher(foldhash::fast::RandomState::default());
        Self {
            runs,
            max_bytes,
            #[cfg(test)]
            purge_pause: None,
        }
    }

    /// Whether an answer of `body_len` bytes for `id` can be stored at all: one that weighs more
    /// than the whole cache would be evicted as soon as it was inserted.
    pub fn can_hold(&self, id: &RunId, body_len: usize) -> bool {
        (body_len as u64).saturating_add(id.as_str().len() as u64) <= self.max_bytes
    }

    pub async fn get(&self, id: &str) -> Option<CachedRun> {
        self.runs.get(id).await
    }

    /// Stores `run` and applies any eviction it causes before returning, so the size bound holds
    /// as soon as the insert is done rather than at the next housekeeping tick. Returns whether the
    /// run is held: a full cache declines a newcomer asked for less often than what it would evict
    /// (moka's TinyLFU admission).
    ///
    /// Written through the entry's lock, as [`RunStore::purge`] reads and removes under it, so a
    /// 404 purge cannot remove an ended run stored between its look and its removal.
    pub async fn insert(&self, id: RunId, run: CachedRun) -> bool {
        let key = id.clone();
        self.runs
            .entry(id)
            .and_upsert_with(|_| std::future::ready(run))
            .await;
        self.runs.run_pending_tasks().await;
        self.runs.contains_key(&key)
    }

    /// Drops `id`'s entry if it is a remembered 404 (counted as an explicit eviction): a run event
    /// says the run exists. An ended run is kept.
    pub async fn forget_not_found(&self, id: &RunId) {
        self.purge(id, Scope::NotFound).await;
    }

    /// Removes `id`'s entry on an operator's request, counted as an explicit eviction: whatever
    /// it holds for [`Scope::Run`], only a remembered 404 for [`Scope::NotFound`] (an ended run
    /// is kept). Returns whether an entry was removed. The entry is looked at and removed under
    /// its lock, in one step.
    pub async fn purge(&self, id: &RunId, scope: Scope) -> bool {
        let outcome = self
            .runs
            .entry_by_ref(id)
            .and_compute_with(|held| async move {
                let in_scope = held.is_some_and(|held| scope == Scope::Run || !held.value().is_terminal());
                #[cfg(test)]
                self.paused_in_purge().await;
                if in_scope { Op::Remove } else { Op::Nop }
            })
            .await;
        matches!(outcome, CompResult::Removed(_))
    }

    #[cfg(test)]
    async fn paused_in_purge(&self) {
        if let Some(pause) = &self.purge_pause {
            pause.0.add_permits(1);
            let _ = pause.1.acquire().await.map(|permit| permit.forget());
        }
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
    use crate::ops::metrics::Metrics;
    use crate::run::status::RunStatuses;

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
        CachedRun::terminal(&vec![b'x'; bytes], APPLICATION_JSON, completed())
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
        assert_eq!(store.get("abc").await.expect("stored").body().len(), 10);
        assert!(store.get("abd").await.is_none());
    }

    // The next two check a memory layout, not behaviour. They guard measured wins that no
    // behavioural test can see: `benches/memory.sh` holds 100,000 cached 1 KB runs at 1.43 × their
    // bytes above idle RSS; an entry pinning the 16 KiB buffer its body was read into, or keeping
    // its ETag and body in separate allocations, would multiply that (see docs/performance.md).
    #[test]
    fn a_stored_body_does_not_pin_the_buffer_it_was_read_into() {
        let read_buffer = Bytes::from(vec![b'x'; 16 * 1024]);
        let body = read_buffer.slice(100..1124);
        let content_type = HeaderValue::from_maybe_shared(read_buffer.slice(0..16)).expect("header");
        let run = CachedRun::terminal(&body, content_type.clone(), completed());
        assert_eq!(run.body(), body);
        assert_eq!(run.body_len(), body.len());
        let outside = read_buffer.as_ptr_range();
        assert!(!outside.contains(&run.body().as_ptr()), "the entry holds a copy");
        assert_eq!(run.content_type(), content_type);
        assert!(!outside.contains(&run.content_type().as_bytes().as_ptr()));
        assert_eq!(run_of(1).content_type(), APPLICATION_JSON);
    }

    #[test]
    fn the_etag_and_the_body_share_one_allocation_of_their_size() {
        let run = CachedRun::terminal(b"{\"status\":\"COMPLETED\"}", APPLICATION_JSON, completed());
        let etag = run.etag().expect("runs have a validator");
        assert_eq!(etag.as_bytes(), strong_etag(b"{\"status\":\"COMPLETED\"}"));
        assert_eq!(run.body(), &b"{\"status\":\"COMPLETED\"}"[..]);
        // The body starts right where the tag ends, and a clone shares both.
        let tag_end = etag.as_bytes().as_ptr_range().end;
        assert_eq!(run.body().as_ptr(), tag_end);
        assert_eq!(run.clone().body().as_ptr(), tag_end);
    }

    #[test]
    fn entries_know_what_they_stand_for() {
        let run = run_of(3);
        assert_eq!(
            (run.status(), run.run_status(), run.is_terminal()),
            (StatusCode::OK, Some(completed()), true)
        );
        let missing = CachedRun::not_found(b"{}", APPLICATION_JSON);
        assert_eq!(
            (
                missing.status(),
                missing.run_status(),
                missing.etag(),
                missing.body()
            ),
            (StatusCode::NOT_FOUND, None, None, Bytes::from_static(b"{}"))
        );
    }

    #[tokio::test]
    async fn a_404_purge_never_removes_an_ended_run_stored_while_it_looks() {
        let mut store = store(1 << 20, HOUR);
        let pause = std::sync::Arc::new((tokio::sync::Semaphore::new(0), tokio::sync::Semaphore::new(0)));
        store.purge_pause = Some(std::sync::Arc::clone(&pause));
        let id = RunId::parse("later").expect("id");
        store
            .insert(id.clone(), CachedRun::not_found(b"{}", APPLICATION_JSON))
            .await;
        let purge = tokio::spawn({
            let (store, id) = (store.clone(), id.clone());
            async move { store.purge(&id, Scope::NotFound).await }
        });
        // The purge has seen the 404; the run ends, and is stored, before the purge goes on.
        pause.0.acquire().await.expect("open").forget();
        let insert = tokio::spawn({
            let (store, id) = (store.clone(), id.clone());
            async move { store.insert(id, run_of(5)).await }
        });
        // No signal says the insert is blocked on the entry: let it go as far as it can.
        for _ in 0..1000 {
            tokio::task::yield_now().await;
        }
        pause.1.add_permits(1);
        assert!(purge.await.expect("purge"), "the 404 it saw is removed");
        assert!(insert.await.expect("insert"));
        let held = store.get("later").await.expect("the ended run is kept");
        assert!(held.is_terminal());
    }

    #[tokio::test]
    async fn remembered_404s_expire_on_their_own_clock() {
        let store = store(1 << 20, Duration::from_millis(1));
        store.insert(RunId::parse("long").expect("id"), run_of(2)).await;
        let missing = CachedRun::not_found(b"{}", APPLICATION_JSON);
        store.insert(RunId::parse("short").expect("id"), missing).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while store.get("short").await.is_some() {
            assert!(std::time::Instant::now() < deadline, "the 404 never expired");
            tokio::task::yield_now().await;
        }
        assert!(store.get("long").await.is_some());
    }
}

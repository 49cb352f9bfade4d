//! Prometheus metrics: every series the gateway exports, registered into an injected registry.
//!
//! The names below are a contract with dashboards and alerts. On the hot path nothing is looked up
//! by label: handles for bounded label sets (cache outcome, run status, upstream failure kind) are
//! resolved at start-up, and handles keyed by HTTP status are resolved on first use into a
//! lock-free slot per code. Updating a metric is then an atomic add. Every label value comes from a
//! closed set (a `u16` status code, an enum, the run-status table), so no upstream or client input
//! can grow the number of series.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::StatusCode;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::edge::response::CacheOutcome;
use crate::run::status::{RunStatus, RunStatuses};
use crate::serve::connection::CloseReason;
use crate::upstream::UpstreamError;

/// Prefix of every series.
pub const NAMESPACE: &str = "plextera_gateway";
/// The exposition format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Client-side latency buckets (seconds): from a 25 µs hit to a 10 s upstream timeout.
const REQUEST_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Upstream latency buckets (seconds): a nearby upstream answers in a millisecond, the internet in
/// tens to hundreds, a struggling one in seconds.
const UPSTREAM_BUCKETS: &[f64] = &[
    0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
];

/// Every outcome, in `CacheOutcome::index` order.
const OUTCOMES: [CacheOutcome; 5] = [
    CacheOutcome::Hit,
    CacheOutcome::Miss,
    CacheOutcome::Pass,
    CacheOutcome::Coalesced,
    CacheOutcome::Error,
];

/// How an upstream call ended, for the `outcome` label of the upstream latency histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamOutcome {
    /// A complete response with this status.
    Answered(StatusCode),
    /// No complete response.
    Failed(UpstreamError),
}

/// All of the gateway's metrics. Cheap to clone; clones update the same series.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub requests: RequestMetrics,
    pub upstream: UpstreamMetrics,
    pub runs: RunStatusMetrics,
    pub cache: CacheMetrics,
    pub budget: BudgetMetrics,
    pub shared: SharedCacheMetrics,
    pub connections: ConnectionMetrics,
    /// `plextera_gateway_coalesced_requests_total`.
    pub coalesced_requests: IntCounter,
    /// `plextera_gateway_coalesced_waiters`.
    pub coalesced_waiters: IntGauge,
}

impl Metrics {
    /// Registers every series into `registry`, plus the process collector (RSS, CPU, open fds).
    pub fn new(registry: Registry, statuses: &RunStatuses) -> prometheus::Result<Self> {
        let coalesced_requests = IntCounter::with_opts(opts(
            "coalesced_requests_total",
            "Client requests that shared another request's upstream call instead of making their own.",
        ))?;
        registry.register(Box::new(coalesced_requests.clone()))?;
        let coalesced_waiters = IntGauge::with_opts(opts(
            "coalesced_waiters",
            "Client requests waiting right now on another request's upstream call.",
        ))?;
        registry.register(Box::new(coalesced_waiters.clone()))?;
        let build_info = IntGaugeVec::new(
            opts(
                "build_info",
                "Always 1; the version label says which build is running.",
            ),
            &["version"],
        )?;
        registry.register(Box::new(build_info.clone()))?;
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Self {
            requests: RequestMetrics::new(&registry)?,
            upstream: UpstreamMetrics::new(&registry)?,
            runs: RunStatusMetrics::new(&registry, statuses)?,
            cache: CacheMetrics::new(&registry)?,
            budget: BudgetMetrics::new(&registry)?,
            shared: SharedCacheMetrics::new(&registry)?,
            connections: ConnectionMetrics::new(&registry)?,
            coalesced_requests,
            coalesced_waiters,
            registry,
        })
    }

    /// The text exposition of every registered series.
    pub fn render(&self) -> Vec<u8> {
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut text)
            .expect("encoding gathered metrics into a Vec cannot fail");
        text
    }
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help).namespace(NAMESPACE)
}

fn histogram_opts(name: &str, help: &str, buckets: &[f64]) -> HistogramOpts {
    HistogramOpts::new(name, help)
        .namespace(NAMESPACE)
        .buckets(buckets.to_vec())
}

/// Counters keyed by HTTP status code, resolved once per code and then read without locking.
#[derive(Clone)]
struct CounterByCode {
    family: IntCounterVec,
    /// Label values that come before `code`.
    prefix: Vec<&'static str>,
    slots: Arc<[OnceLock<IntCounter>]>,
}

impl CounterByCode {
    fn new(family: IntCounterVec, prefix: Vec<&'static str>) -> Self {
        let slots = (0..1000).map(|_| OnceLock::new()).collect();
        Self {
            family,
            prefix,
            slots,
        }
    }

    fn get(&self, code: StatusCode) -> &IntCounter {
        let slot = &self.slots[usize::from(code.as_u16())];
        slot.get_or_init(|| {
            let mut labels = self.prefix.clone();
            labels.push(code.as_str());
            self.family.with_label_values(&labels)
        })
    }
}

/// `plextera_gateway_requests_total` and `plextera_gateway_request_duration_seconds`.
/// One `Arc` inside, so the per-request clone is a single reference-count increment.
#[derive(Clone)]
pub struct RequestMetrics(Arc<RequestTables>);

struct RequestTables {
    /// One by-code counter table per outcome, in `CacheOutcome::index` order.
    answered: Vec<CounterByCode>,
    /// Latency per outcome, in `CacheOutcome::index` order.
    duration: Vec<Histogram>,
}

impl RequestMetrics {
    fn new(registry: &Registry) -> prometheus::Result<Self> {
        let total = IntCounterVec::new(
            opts(
                "requests_total",
                "Client requests answered, by cache outcome and HTTP status.",
            ),
            &["cache", "code"],
        )?;
        registry.register(Box::new(total.clone()))?;
        let duration = HistogramVec::new(
            histogram_opts(
                "request_duration_seconds",
                "Time from a client request's head being read to its response head being ready, by cache outcome.",
                REQUEST_BUCKETS,
            ),
            &["cache"],
        )?;
        registry.register(Box::new(duration.clone()))?;
        Ok(Self(Arc::new(RequestTables {
            answered: OUTCOMES
                .iter()
                .map(|outcome| CounterByCode::new(total.clone(), vec![outcome.as_str()]))
                .collect(),
            duration: OUTCOMES
                .iter()
                .map(|outcome| duration.with_label_values(&[outcome.as_str()]))
                .collect(),
        })))
    }

    /// Records one answered client request.
    pub fn observe(&self, outcome: CacheOutcome, code: StatusCode, elapsed: Duration) {
        let index = outcome.index();
        self.0.answered[index].get(code).inc();
        self.0.duration[index].observe(elapsed.as_secs_f64());
    }
}

/// `plextera_gateway_upstream_requests_total`, `plextera_gateway_upstream_request_duration_seconds`
/// and `plextera_gateway_upstream_retries_total`.
#[derive(Clone)]
pub struct UpstreamMetrics {
    answered: CounterByCode,
    /// Failures by kind, in `failure_label` order.
    failed: Arc<[IntCounter]>,
    /// Latency by outcome: 1xx..5xx, then failures in `failure_label` order.
    duration: Arc<[Histogram]>,
    /// `plextera_gateway_upstream_retries_total`.
    pub retries: IntCounter,
}

const UPSTREAM_FAILURES: [UpstreamError; 4] = [
    UpstreamError::Timeout,
    UpstreamError::Connect,
    UpstreamError::Broken,
    UpstreamError::BodyTooLarge,
];
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn failure_label(error: UpstreamError) -> &'static str {
    match error {
        UpstreamError::Timeout => "timeout",
        UpstreamError::Connect => "connect",
        UpstreamError::Broken => "reset",
        UpstreamError::BodyTooLarge => "too_large",
    }
}

fn failure_index(error: UpstreamError) -> usize {
    match error {
        UpstreamError::Timeout => 0,
        UpstreamError::Connect => 1,
        UpstreamError::Broken => 2,
        UpstreamError::BodyTooLarge => 3,
    }
}

impl UpstreamMetrics {
    fn new(registry: &Registry) -> prometheus::Result<Self> {
        let total = IntCounterVec::new(
            opts(
                "upstream_requests_total",
                "Calls made upstream, by HTTP status, or timeout/connect/reset/too_large when no complete answer came.",
            ),
            &["code"],
        )?;
        registry.register(Box::new(total.clone()))?;
        let duration = HistogramVec::new(
            histogram_opts(
                "upstream_request_duration_seconds",
                "Upstream call latency, request sent to body read, by outcome (status class or failure kind).",
                UPSTREAM_BUCKETS,
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(duration.clone()))?;
        let retries = IntCounter::with_opts(opts(
            "upstream_retries_total",
            "Requests sent upstream a second time, on a fresh connection, because the kept-alive connection they went out on closed without an answer.",
        ))?;
        registry.register(Box::new(retries.clone()))?;
        let outcome_labels = STATUS_CLASSES
            .iter()
            .copied()
            .chain(UPSTREAM_FAILURES.iter().map(|error| failure_label(*error)));
        Ok(Self {
            answered: CounterByCode::new(total.clone(), Vec::new()),
            failed: UPSTREAM_FAILURES
                .iter()
                .map(|error| total.with_label_values(&[failure_label(*error)]))
                .collect(),
            duration: outcome_labels
                .map(|label| duration.with_label_values(&[label]))
                .collect(),
            retries,
        })
    }

    /// Records one upstream call.
    pub fn observe(&self, outcome: UpstreamOutcome, elapsed: Duration) {
        let duration_index = match outcome {
            UpstreamOutcome::Answered(status) => {
                self.answered.get(status).inc();
                usize::from(status.as_u16() / 100).saturating_sub(1).min(4)
            }
            UpstreamOutcome::Failed(error) => {
                self.failed[failure_index(error)].inc();
                STATUS_CLASSES.len() + failure_index(error)
            }
        };
        self.duration[duration_index].observe(elapsed.as_secs_f64());
    }
}

/// `plextera_gateway_run_status_total`.
#[derive(Clone)]
pub struct RunStatusMetrics {
    /// Indexed by `RunStatus::index`.
    served: Arc<[IntCounter]>,
}

impl RunStatusMetrics {
    fn new(registry: &Registry, statuses: &RunStatuses) -> prometheus::Result<Self> {
        let total = IntCounterVec::new(
            opts(
                "run_status_total",
                "Runs served to clients (200 answers), by run status; unknown statuses count as other.",
            ),
            &["status"],
        )?;
        registry.register(Box::new(total.clone()))?;
        Ok(Self {
            served: statuses
                .all()
                .map(|status| total.with_label_values(&[statuses.label(status)]))
                .collect(),
        })
    }

    pub fn served(&self, status: RunStatus) {
        if let Some(counter) = self.served.get(status.index()) {
            counter.inc();
        }
    }
}

/// Why an entry left the cache, for `plextera_gateway_cache_evictions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictionCause {
    /// Pushed out to keep the cache within `max_size`.
    Size,
    /// Older than the ttl.
    Expired,
    /// Removed on purpose.
    Explicit,
}

/// Cache occupancy and evictions.
#[derive(Clone)]
pub struct CacheMetrics {
    entries: IntGauge,
    size_bytes: IntGauge,
    max_size_bytes: IntGauge,
    /// In `EvictionCause` declaration order.
    evictions: Arc<[IntCounter; 3]>,
}

impl CacheMetrics {
    fn new(registry: &Registry) -> prometheus::Result<Self> {
        let entries = IntGauge::with_opts(opts("cache_entries", "Runs held in the cache."))?;
        registry.register(Box::new(entries.clone()))?;
        let size_bytes = IntGauge::with_opts(opts(
            "cache_size_bytes",
            "Bytes held in the cache (bodies plus ids: the sum bounded by cache.max_size).",
        ))?;
        registry.register(Box::new(size_bytes.clone()))?;
        let max_size_bytes = IntGauge::with_opts(opts(
            "cache_max_size_bytes",
            "The configured bound on cache_size_bytes (cache.max_size).",
        ))?;
        registry.register(Box::new(max_size_bytes.clone()))?;
        let evictions = IntCounterVec::new(
            opts(
                "cache_evictions_total",
                "Runs removed from the cache, by cause (size, expired, explicit).",
            ),
            &["cause"],
        )?;
        registry.register(Box::new(evictions.clone()))?;
        let cause = |label: &str| evictions.with_label_values(&[label]);
        Ok(Self {
            entries,
            size_bytes,
            max_size_bytes,
            evictions: Arc::new([cause("size"), cause("expired"), cause("explicit")]),
        })
    }

    /// Sets the occupancy gauges (called just before a scrape).
    pub fn set_occupancy(&self, entries: u64, size_bytes: u64) {
        self.entries.set(i64::try_from(entries).unwrap_or(i64::MAX));
        self.size_bytes.set(i64::try_from(size_bytes).unwrap_or(i64::MAX));
    }

    /// Publishes the configured bound.
    pub fn set_max_size(&self, bytes: u64) {
        self.max_size_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    pub fn evicted(&self, cause: EvictionCause) {
        self.evictions[cause as usize].inc();
    }
}

/// Why the budget kept a call from going upstream, for `plextera_gateway_upstream_budget_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// `max_requests_per_second` or `max_concurrent_requests` spent past `queue_timeout`.
    Exhausted,
    /// Upstream's 429 cooldown still running.
    Cooldown,
}

/// Client connections on the public port: how many are open, and why the gateway closed some.
#[derive(Clone)]
pub struct ConnectionMetrics {
    open: IntGauge,
    /// In `CloseReason::ALL` order.
    closed: Arc<[IntCounter; CloseReason::ALL.len()]>,
}

impl ConnectionMetrics {
    fn new(registry: &Registry) -> prometheus::Result<Self> {
        let open = IntGauge::with_opts(opts(
            "client_connections",
            "Client connections open on the public port.",
        ))?;
        registry.register(Box::new(open.clone()))?;
        let closed = IntCounterVec::new(
            opts(
                "client_connections_closed_total",
                "Client connections the gateway closed on its own account: idle (no request head within header_read_timeout), write_timeout (an answer stalled), resets (too many cancelled requests), shed (idle, closed to make room).",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(closed.clone()))?;
        Ok(Self {
            open,
            closed: Arc::new(CloseReason::ALL.map(|reason| closed.with_label_values(&[reason.as_str()]))),
        })
    }

    pub fn opened(&self) {
        self.open.inc();
    }

    pub fn ended(&self) {
        self.open.dec();
    }

    /// Counts a close for `reason`; a listener's drain is not counted.
    pub fn closed(&self, reason: CloseReason) {
        if let Some(index) = CloseReason::ALL.iter().position(|known| *known == reason) {
            self.closed[index].inc();
        }
    }
}

/// The upstream budget: refusals and the shared cooldown.
#[derive(Clone)]
pub struct BudgetMetrics {
    cooldown_seconds: Gauge,
    /// In `RefusalReason` declaration order.
    refusals: Arc<[IntCounter; 2]>,
}

impl BudgetMetrics {
    fn new(registry: &Registry) -> prometheus::Result<Self> {
        let cooldown_seconds = Gauge::with_opts(opts(
            "upstream_cooldown_seconds",
            "Time left before upstream calls resume after an upstream 429 (0 when none).",
        ))?;
        registry.register(Box::new(cooldown_seconds.clone()))?;
        let refusals = IntCounterVec::new(
            opts(
                "upstream_budget_refusals_total",
                "Upstream calls not made because the budget was spent (exhausted) or upstream asked to wait (cooldown).",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(refusals.clone()))?;
        let reason = |label: &str| refusals.with_label_values(&[label]);
        Ok(Self {
            cooldown_seconds,
            refusals: Arc::new([reason("exhausted"), reason("cooldown")]),
        })
    }

    /// Sets the cooldown gauge (called just before a scrape).
    pub fn set_cooldown(&self, remaining: Duration) {
        self.cooldown_seconds.set(remaining.as_secs_f64());
    }

    pub fn refused(&self, reason: RefusalReason) {
        self.refusals[reason as usize].inc();
    }
}

/// A shared-tier operation, for the latency histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedOp {
    Get,
    Set,
    Lock,
}

/// How a wait for another replica's fetch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedWait {
    /// The other replica stored the run: served from Redis.
    Filled,
    /// It did not (run still going, failed, or took too long): this replica fetched it.
    FellBack,
}

/// The Redis tier (`[cache.shared]`); all zero when it is not configured.
#[derive(Clone)]
pub struct SharedCacheMetrics {
    pub hits: IntCounter,
    pub misses: IntCounter,
    pub writes: IntCounter,
    pub errors: IntCounter,
    /// Values that were not ours or were damaged: treated as misses and overwritten.
    pub corrupt: IntCounter,
    pub circuit_open: IntGauge,
    duration: Arc<[Histogram; 3]>,
    waits: Arc<[IntCounter; 2]>,
}

impl SharedCacheMetrics {
    fn new(registry: &Registry) -> prometheus::Result<Self> {
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let counter = IntCounter::with_opts(opts(name, help))?;
            registry.register(Box::new(counter.clone()))?;
            Ok(counter)
        };
        let circuit_open = IntGauge::with_opts(opts(
            "shared_cache_circuit_open",
            "1 while the gateway has stopped calling Redis after repeated failures.",
        ))?;
        registry.register(Box::new(circuit_open.clone()))?;
        let duration = HistogramVec::new(
            histogram_opts(
                "shared_cache_duration_seconds",
                "Redis call latency, by operation (get, set, lock).",
                UPSTREAM_BUCKETS,
            ),
            &["op"],
        )?;
        registry.register(Box::new(duration.clone()))?;
        let waits = IntCounterVec::new(
            opts(
                "shared_cache_waits_total",
                "Waits for another replica fetching the same run, by result (filled, fell_back).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(waits.clone()))?;
        Ok(Self {
            hits: counter(
                "shared_cache_hits_total",
                "Runs found in Redis (and copied into memory).",
            )?,
            misses: counter(
                "shared_cache_misses_total",
                "Runs looked up in Redis and not found.",
            )?,
            writes: counter("shared_cache_writes_total", "Ended runs written to Redis.")?,
            errors: counter(
                "shared_cache_errors_total",
                "Redis calls that failed or timed out; the gateway carried on without Redis.",
            )?,
            corrupt: counter(
                "shared_cache_corrupt_total",
                "Values in Redis that were damaged or not the gateway's: treated as misses and overwritten.",
            )?,
            circuit_open,
            duration: Arc::new([
                duration.with_label_values(&["get"]),
                duration.with_label_values(&["set"]),
                duration.with_label_values(&["lock"]),
            ]),
            waits: Arc::new([
                waits.with_label_values(&["filled"]),
                waits.with_label_values(&["fell_back"]),
            ]),
        })
    }

    pub fn observe(&self, op: SharedOp, elapsed: Duration) {
        self.duration[op as usize].observe(elapsed.as_secs_f64());
    }

    pub fn waited(&self, result: SharedWait) {
        self.waits[result as usize].inc();
    }
}

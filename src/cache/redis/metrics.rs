//! The Redis tier's series (`plextera_gateway_shared_cache_*`); all zero when `[cache.shared]` is
//! not configured.

use std::time::Duration;

use prometheus::{Histogram, IntCounter, IntGauge, Registry};

use crate::ops::metrics::family::{ByLabel, Label, counters, histograms, opts, register};
use crate::upstream::metrics::UPSTREAM_BUCKETS;

/// A Redis operation, for the latency histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisOp {
    Get,
    Set,
    Lock,
    /// Watcher leases: taking, renewing, releasing.
    Lease,
    /// Wake-ups published to the other replicas.
    Publish,
    /// Webhook event ids marked seen for the fleet.
    Event,
    /// Runs deleted by an operator's purge.
    Purge,
}

impl Label for RedisOp {
    const ALL: &'static [Self] = &[
        Self::Get,
        Self::Set,
        Self::Lock,
        Self::Lease,
        Self::Publish,
        Self::Event,
        Self::Purge,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Get => "get",
            Self::Set => "set",
            Self::Lock => "lock",
            Self::Lease => "lease",
            Self::Publish => "publish",
            Self::Event => "event",
            Self::Purge => "purge",
        }
    }
}

/// How a wait for another replica's fetch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisWait {
    /// The other replica stored the run: served from Redis.
    Filled,
    /// It did not (run still going, failed, or took too long): this replica fetched it.
    FellBack,
}

impl Label for RedisWait {
    const ALL: &'static [Self] = &[Self::Filled, Self::FellBack];

    fn label(self) -> &'static str {
        match self {
            Self::Filled => "filled",
            Self::FellBack => "fell_back",
        }
    }
}

#[derive(Clone)]
pub struct RedisMetrics {
    pub hits: IntCounter,
    pub misses: IntCounter,
    pub writes: IntCounter,
    pub errors: IntCounter,
    /// Values that were not ours or were damaged: treated as misses and overwritten.
    pub corrupt: IntCounter,
    pub circuit_open: IntGauge,
    duration: ByLabel<RedisOp, Histogram>,
    waits: ByLabel<RedisWait, IntCounter>,
}

impl RedisMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let counter = |name: &str, help: &str| register(registry, IntCounter::with_opts(opts(name, help))?);
        let duration = histograms(
            registry,
            "shared_cache_duration_seconds",
            "Redis call latency, by operation (get, set, lock; lease and publish for watchers shared across replicas; event for webhook event ids; purge for runs an operator purged).",
            UPSTREAM_BUCKETS,
            &["op"],
        )?;
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
            circuit_open: register(
                registry,
                IntGauge::with_opts(opts(
                    "shared_cache_circuit_open",
                    "1 while the gateway has stopped calling Redis after repeated failures.",
                ))?,
            )?,
            duration: ByLabel::new(|label| duration.with_label_values(&[label])),
            waits: counters(
                registry,
                opts(
                    "shared_cache_waits_total",
                    "Waits for another replica fetching the same run, by result (filled, fell_back).",
                ),
                "result",
            )?,
        })
    }

    pub fn observe(&self, op: RedisOp, elapsed: Duration) {
        if let Some(histogram) = self.duration.get(op) {
            histogram.observe(elapsed.as_secs_f64());
        }
    }

    pub fn waited(&self, result: RedisWait) {
        if let Some(counter) = self.waits.get(result) {
            counter.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::metrics::family::tests::labels_are_distinct_and_valid;

    #[test]
    fn labels_of_ops_and_waits_are_distinct_and_valid() {
        labels_are_distinct_and_valid::<RedisOp>();
        labels_are_distinct_and_valid::<RedisWait>();
    }
}

//! The memory store's series: occupancy, its bound, and evictions by cause.

use prometheus::{IntCounter, IntGauge, Registry};

use crate::ops::metrics::family::{ByLabel, Label, counters, opts, register};

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

impl Label for EvictionCause {
    const ALL: &'static [Self] = &[Self::Size, Self::Expired, Self::Explicit];

    fn label(self) -> &'static str {
        match self {
            Self::Size => "size",
            Self::Expired => "expired",
            Self::Explicit => "explicit",
        }
    }
}

/// Cache occupancy and evictions.
#[derive(Clone)]
pub struct CacheMetrics {
    entries: IntGauge,
    size_bytes: IntGauge,
    max_size_bytes: IntGauge,
    evictions: ByLabel<EvictionCause, IntCounter>,
}

impl CacheMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let gauge = |name: &str, help: &str| register(registry, IntGauge::with_opts(opts(name, help))?);
        Ok(Self {
            entries: gauge("cache_entries", "Runs held in the cache.")?,
            size_bytes: gauge(
                "cache_size_bytes",
                "Bytes held in the cache (bodies plus ids: the sum bounded by cache.max_size).",
            )?,
            max_size_bytes: gauge(
                "cache_max_size_bytes",
                "The configured bound on cache_size_bytes (cache.max_size).",
            )?,
            evictions: counters(
                registry,
                opts(
                    "cache_evictions_total",
                    "Runs removed from the cache, by cause (size, expired, explicit).",
                ),
                "cause",
            )?,
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
        if let Some(counter) = self.evictions.get(cause) {
            counter.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_and_valid() {
        crate::ops::metrics::family::tests::labels_are_distinct_and_valid::<EvictionCause>();
    }
}

//! How a response was produced: from the cache, from upstream, shared, or the gateway's own error.
//! One value names the `x-cache` header, the `cache` metric label and the access log's `cache`
//! field.

use http::HeaderValue;

use crate::ops::metrics::family::Label;

/// How a response was produced. The same value names the `x-cache` header, the `cache` metric
/// label and the access log's `cache` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Served from memory; upstream was not contacted.
    Hit,
    /// Fetched from upstream and stored for later requests.
    Miss,
    /// Fetched from upstream and deliberately not stored (a run still going, an upstream error, …).
    Pass,
    /// Shared another request's upstream call; keeps that response's `x-cache` (MISS or PASS).
    Coalesced,
    /// The gateway answered with its own error (bad input, upstream unreachable, …).
    Error,
}

impl CacheOutcome {
    /// The `x-cache` value this outcome sets, if it sets one: gateway errors say what happened in
    /// their body, and coalesced answers keep the shared response's value.
    pub fn header_value(self) -> Option<HeaderValue> {
        match self {
            Self::Hit => Some(HeaderValue::from_static("HIT")),
            Self::Miss => Some(HeaderValue::from_static("MISS")),
            Self::Pass => Some(HeaderValue::from_static("PASS")),
            Self::Coalesced | Self::Error => None,
        }
    }

    /// Lower-case name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Pass => "pass",
            Self::Coalesced => "coalesced",
            Self::Error => "error",
        }
    }
}

impl Label for CacheOutcome {
    const ALL: &'static [Self] = &[Self::Hit, Self::Miss, Self::Pass, Self::Coalesced, Self::Error];

    fn label(self) -> &'static str {
        self.as_str()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_and_valid() {
        crate::ops::metrics::family::tests::labels_are_distinct_and_valid::<CacheOutcome>();
    }
}

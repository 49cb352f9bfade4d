//! The upstream calls' series: `plextera_gateway_upstream_requests_total`,
//! `plextera_gateway_upstream_request_duration_seconds` and
//! `plextera_gateway_upstream_retries_total`.

use std::time::Duration;

use http::StatusCode;
use prometheus::{Histogram, IntCounter, IntCounterVec, Registry};

use super::UpstreamError;
use crate::ops::metrics::family::{ByCode, ByLabel, Label, histograms, opts, register};

/// Upstream latency buckets (seconds): a nearby upstream answers in a millisecond, the internet in
/// tens to hundreds, a struggling one in seconds. The Redis tier's calls use them too.
pub const UPSTREAM_BUCKETS: &[f64] = &[
    0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
];

/// How an upstream call ended, for the `outcome` label of the upstream latency histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamOutcome {
    /// A complete response with this status.
    Answered(StatusCode),
    /// No complete response.
    Failed(UpstreamError),
}

impl Label for UpstreamError {
    const ALL: &'static [Self] = &[Self::Timeout, Self::Connect, Self::Broken, Self::BodyTooLarge];

    fn label(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Connect => "connect",
            Self::Broken => "reset",
            Self::BodyTooLarge => "too_large",
        }
    }
}

/// The `outcome` label of a call that was answered: its status class.
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

#[derive(Clone)]
pub struct UpstreamMetrics {
    answered: ByCode,
    failed: ByLabel<UpstreamError, IntCounter>,
    /// Latency of answered calls by status class, `1xx` first.
    answered_duration: [Histogram; 5],
    failed_duration: ByLabel<UpstreamError, Histogram>,
    /// `plextera_gateway_upstream_retries_total`.
    pub retries: IntCounter,
}

impl UpstreamMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let total = register(
            registry,
            IntCounterVec::new(
                opts(
                    "upstream_requests_total",
                    "Calls made upstream, by HTTP status, or timeout/connect/reset/too_large when no complete answer came.",
                ),
                &["code"],
            )?,
        )?;
        let duration = histograms(
            registry,
            "upstream_request_duration_seconds",
            "Upstream call latency, request sent to body read, by outcome (status class or failure kind).",
            UPSTREAM_BUCKETS,
            &["outcome"],
        )?;
        let retries = register(
            registry,
            IntCounter::with_opts(opts(
                "upstream_retries_total",
                "Requests sent upstream a second time, on a fresh connection, because the kept-alive connection they went out on closed without an answer.",
            ))?,
        )?;
        Ok(Self {
            answered: ByCode::new(total.clone(), Vec::new()),
            failed: ByLabel::new(|label| total.with_label_values(&[label])),
            answered_duration: STATUS_CLASSES.map(|class| duration.with_label_values(&[class])),
            failed_duration: ByLabel::new(|label| duration.with_label_values(&[label])),
            retries,
        })
    }

    /// Records one upstream call.
    pub fn observe(&self, outcome: UpstreamOutcome, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        match outcome {
            UpstreamOutcome::Answered(status) => {
                self.answered.get(status).inc();
                let class = usize::from(status.as_u16() / 100).saturating_sub(1).min(4);
                self.answered_duration[class].observe(seconds);
            }
            UpstreamOutcome::Failed(error) => {
                if let Some(failed) = self.failed.get(error) {
                    failed.inc();
                }
                if let Some(duration) = self.failed_duration.get(error) {
                    duration.observe(seconds);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_and_valid() {
        crate::ops::metrics::family::tests::labels_are_distinct_and_valid::<UpstreamError>();
    }
}

//! The upstream calls' series: `plextera_gateway_upstream_requests_total`,
//! `plextera_gateway_upstream_request_duration_seconds`, `plextera_gateway_upstream_retries_total`
//! and the pool's `plextera_gateway_upstream_connections`.
//!
//! The counter and the histogram share one `outcome` label, with the same values from the same
//! function ([`outcome_label`]): the status class (`1xx`…`5xx`) of a complete answer, or the
//! failure kind (`timeout`, `connect`, `reset`, `too_large`). So `sum by (outcome)` of the counter
//! is the histogram's `_count`, and the two join. The counter's `code` is the HTTP status, or
//! `none` when no complete answer came.

use std::time::Duration;

use http::StatusCode;
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};

use super::UpstreamError;
use super::pool::Connections;
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

/// The `code` label of a call that got no complete answer.
const NO_CODE: &str = "none";

/// The index in [`STATUS_CLASSES`] of `status`'s class (a status above 599 counts as `5xx`).
fn class_index(status: StatusCode) -> usize {
    usize::from(status.as_u16() / 100).saturating_sub(1).min(4)
}

/// The `outcome` label of a call, shared by the counter and the histogram.
pub fn outcome_label(outcome: UpstreamOutcome) -> &'static str {
    match outcome {
        UpstreamOutcome::Answered(status) => STATUS_CLASSES[class_index(status)],
        UpstreamOutcome::Failed(error) => error.label(),
    }
}

#[derive(Clone)]
pub struct UpstreamMetrics {
    /// Answered calls by `(outcome, code)`: the code's class, then the code.
    answered: ByCode,
    /// Calls with no complete answer, by `(outcome, "none")`.
    failed: ByLabel<UpstreamError, IntCounter>,
    /// Latency of answered calls by status class, `1xx` first.
    answered_duration: [Histogram; 5],
    failed_duration: ByLabel<UpstreamError, Histogram>,
    /// `plextera_gateway_upstream_retries_total`.
    pub retries: IntCounter,
    /// `plextera_gateway_upstream_connections{state="idle"}` and `{state="busy"}`.
    connections_idle: IntGauge,
    connections_busy: IntGauge,
}

impl UpstreamMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let total = register(
            registry,
            IntCounterVec::new(
                opts(
                    "upstream_requests_total",
                    "Calls made upstream, by outcome (status class 1xx..5xx, or timeout/connect/reset/too_large: the histogram's outcome) and code (the HTTP status, or none when no complete answer came).",
                ),
                &["outcome", "code"],
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
        let connections = register(
            registry,
            IntGaugeVec::new(
                opts(
                    "upstream_connections",
                    "Upstream connections in the pool, by state: busy (an HTTP/1.1 connection taken by a call, or the HTTP/2 connection with calls on it) or idle (kept alive for the next call). The HTTP/2 connection counts as one.",
                ),
                &["state"],
            )?,
        )?;
        Ok(Self {
            answered: ByCode::classed(total.clone(), |code| STATUS_CLASSES[class_index(code)]),
            failed: ByLabel::new(|label| total.with_label_values(&[label, NO_CODE])),
            answered_duration: STATUS_CLASSES.map(|class| duration.with_label_values(&[class])),
            failed_duration: ByLabel::new(|label| duration.with_label_values(&[label])),
            retries,
            connections_idle: connections.with_label_values(&["idle"]),
            connections_busy: connections.with_label_values(&["busy"]),
        })
    }

    /// Sets the pool gauges (called just before a scrape).
    pub fn set_connections(&self, connections: Connections) {
        self.connections_idle
            .set(i64::try_from(connections.idle).unwrap_or(i64::MAX));
        self.connections_busy
            .set(i64::try_from(connections.busy).unwrap_or(i64::MAX));
    }

    /// Records one upstream call.
    pub fn observe(&self, outcome: UpstreamOutcome, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        match outcome {
            UpstreamOutcome::Answered(status) => {
                self.answered.get(status).inc();
                self.answered_duration[class_index(status)].observe(seconds);
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

    #[test]
    fn the_counter_and_the_histogram_label_an_outcome_alike() {
        let registry = Registry::new();
        let metrics = UpstreamMetrics::new(&registry).expect("registers");
        let outcomes = [
            UpstreamOutcome::Answered(StatusCode::CONTINUE),
            UpstreamOutcome::Answered(StatusCode::OK),
            UpstreamOutcome::Answered(StatusCode::NOT_MODIFIED),
            UpstreamOutcome::Answered(StatusCode::NOT_FOUND),
            UpstreamOutcome::Answered(StatusCode::SERVICE_UNAVAILABLE),
            UpstreamOutcome::Answered(StatusCode::from_u16(799).expect("a status")),
            UpstreamOutcome::Failed(UpstreamError::Timeout),
            UpstreamOutcome::Failed(UpstreamError::Connect),
            UpstreamOutcome::Failed(UpstreamError::Broken),
            UpstreamOutcome::Failed(UpstreamError::BodyTooLarge),
        ];
        for outcome in outcomes {
            metrics.observe(outcome, Duration::from_millis(1));
        }
        let mut counted = std::collections::BTreeMap::<String, u64>::new();
        let mut timed = std::collections::BTreeMap::<String, u64>::new();
        for family in registry.gather() {
            let name = family.name();
            if name != "plextera_gateway_upstream_requests_total"
                && name != "plextera_gateway_upstream_request_duration_seconds"
            {
                continue;
            }
            for metric in family.get_metric() {
                let label = |name: &str| {
                    metric
                        .get_label()
                        .iter()
                        .find(|pair| pair.name() == name)
                        .map(|pair| pair.value().to_owned())
                };
                let outcome = label("outcome").expect("an outcome label");
                match family.name() {
                    "plextera_gateway_upstream_requests_total" => {
                        let code = label("code").expect("a code label");
                        let expected = if code == "none" {
                            outcome.clone()
                        } else {
                            outcome_label(UpstreamOutcome::Answered(
                                StatusCode::from_u16(code.parse().expect("digits")).expect("a status"),
                            ))
                            .to_owned()
                        };
                        assert_eq!(outcome, expected, "code {code}");
                        *counted.entry(outcome).or_default() += metric.get_counter().get_value() as u64;
                    }
                    "plextera_gateway_upstream_request_duration_seconds" => {
                        *timed.entry(outcome).or_default() += metric.get_histogram().get_sample_count();
                    }
                    _ => {}
                }
            }
        }
        assert_eq!(counted, timed);
        assert_eq!(counted.len(), 9, "{counted:?}");
        assert_eq!(counted["5xx"], 2, "599 and above count as 5xx in both");
    }
}

//! The series of held clients and watchers: `held_requests{kind}`, `held_requests_limit`,
//! `watched_runs` and `held_answers_total{outcome}`.

use prometheus::{IntCounter, IntGauge, IntGaugeVec, Registry};

use crate::ops::metrics::family::{ByLabel, Label, counters, opts, register};

/// How a client is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldKind {
    LongPoll,
    Sse,
}

impl Label for HeldKind {
    const ALL: &'static [Self] = &[Self::LongPoll, Self::Sse];

    fn label(self) -> &'static str {
        match self {
            Self::LongPoll => "long_poll",
            Self::Sse => "sse",
        }
    }
}

/// How a held long-poll was answered, or what an event stream sent: a new version (`changed`, one
/// per frame on a stream), the ended run (`ended`), its wait or stream duration ran out
/// (`timeout`), the gateway shut down (`shutdown`), or the watch stopped on an error (`error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldOutcome {
    Changed,
    Ended,
    Timeout,
    Shutdown,
    Error,
}

impl Label for HeldOutcome {
    const ALL: &'static [Self] = &[
        Self::Changed,
        Self::Ended,
        Self::Timeout,
        Self::Shutdown,
        Self::Error,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Changed => "changed",
            Self::Ended => "ended",
            Self::Timeout => "timeout",
            Self::Shutdown => "shutdown",
            Self::Error => "error",
        }
    }
}

/// Held clients and watchers. Cheap to clone.
#[derive(Clone)]
pub struct WatchMetrics {
    held: ByLabel<HeldKind, IntGauge>,
    limit: IntGauge,
    watched_runs: IntGauge,
    answers: ByLabel<HeldOutcome, IntCounter>,
}

impl WatchMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let held = register(
            registry,
            IntGaugeVec::new(
                opts(
                    "held_requests",
                    "Clients held right now on a run still going, by kind: long_poll (waiting for a new version) or sse (an open event stream).",
                ),
                &["kind"],
            )?,
        )?;
        Ok(Self {
            held: ByLabel::new(|label| held.with_label_values(&[label])),
            limit: register(
                registry,
                IntGauge::with_opts(opts(
                    "held_requests_limit",
                    "watch.max_held: most clients held at once; beyond, 503 TOO_MANY_WAITERS.",
                ))?,
            )?,
            watched_runs: register(
                registry,
                IntGauge::with_opts(opts(
                    "watched_runs",
                    "Runs with a watcher right now: one upstream poller per run that clients wait on.",
                ))?,
            )?,
            answers: counters(
                registry,
                opts(
                    "held_answers_total",
                    "Held clients answered, by outcome: changed (a new version; one per frame on a stream), ended, timeout (the wait or the stream's duration ran out), shutdown, error.",
                ),
                "outcome",
            )?,
        })
    }

    pub fn held(&self, kind: HeldKind) -> Option<&IntGauge> {
        self.held.get(kind)
    }

    /// Records `watch.max_held`.
    pub fn set_limit(&self, max_held: usize) {
        self.limit.set(i64::try_from(max_held).unwrap_or(i64::MAX));
    }

    pub fn watched_runs(&self) -> &IntGauge {
        &self.watched_runs
    }

    pub fn answered(&self, outcome: HeldOutcome) {
        if let Some(counter) = self.answers.get(outcome) {
            counter.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_and_valid() {
        crate::ops::metrics::family::tests::labels_are_distinct_and_valid::<HeldKind>();
        crate::ops::metrics::family::tests::labels_are_distinct_and_valid::<HeldOutcome>();
    }
}

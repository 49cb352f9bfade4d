//! The budget's series: refusals by reason and the shared cooldown.

use std::time::Duration;

use prometheus::{Gauge, IntCounter, Registry};

use crate::ops::metrics::family::{ByLabel, Label, counters, opts, register};

/// Why the budget kept a call from going upstream, for
/// `plextera_gateway_upstream_budget_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// `max_requests_per_second` or `max_concurrent_requests` spent past `queue_timeout`.
    Exhausted,
    /// Upstream's 429 cooldown still running.
    Cooldown,
}

impl Label for RefusalReason {
    const ALL: &'static [Self] = &[Self::Exhausted, Self::Cooldown];

    fn label(self) -> &'static str {
        match self {
            Self::Exhausted => "exhausted",
            Self::Cooldown => "cooldown",
        }
    }
}

/// The upstream budget: refusals and the shared cooldown.
#[derive(Clone)]
pub struct BudgetMetrics {
    cooldown_seconds: Gauge,
    refusals: ByLabel<RefusalReason, IntCounter>,
}

impl BudgetMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        Ok(Self {
            cooldown_seconds: register(
                registry,
                Gauge::with_opts(opts(
                    "upstream_cooldown_seconds",
                    "Time left before upstream calls resume after an upstream 429 (0 when none).",
                ))?,
            )?,
            refusals: counters(
                registry,
                opts(
                    "upstream_budget_refusals_total",
                    "Upstream calls not made because the budget was spent (exhausted) or upstream asked to wait (cooldown).",
                ),
                "reason",
            )?,
        })
    }

    /// Sets the cooldown gauge (called just before a scrape).
    pub fn set_cooldown(&self, remaining: Duration) {
        self.cooldown_seconds.set(remaining.as_secs_f64());
    }

    pub fn refused(&self, reason: RefusalReason) {
        if let Some(counter) = self.refusals.get(reason) {
            counter.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_and_valid() {
        crate::ops::metrics::family::tests::labels_are_distinct_and_valid::<RefusalReason>();
    }
}

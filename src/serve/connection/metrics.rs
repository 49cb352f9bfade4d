//! Client connections on the public port: how many are open, and why the gateway closed some.

use prometheus::{IntCounter, IntGauge, Registry};

use super::CloseReason;
use crate::ops::metrics::family::{ByLabel, counters, opts, register};

#[derive(Clone)]
pub struct ConnectionMetrics {
    open: IntGauge,
    closed: ByLabel<CloseReason, IntCounter>,
}

impl ConnectionMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        Ok(Self {
            open: register(
                registry,
                IntGauge::with_opts(opts(
                    "client_connections",
                    "Client connections open on the public port.",
                ))?,
            )?,
            closed: counters(
                registry,
                opts(
                    "client_connections_closed_total",
                    "Client connections the gateway closed on its own account: idle (no request head within header_read_timeout), write_timeout (an answer stalled), resets (too many cancelled requests), shed (idle, closed to make room).",
                ),
                "reason",
            )?,
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
        if let Some(counter) = self.closed.get(reason) {
            counter.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_and_valid() {
        crate::ops::metrics::family::tests::labels_are_distinct_and_valid::<CloseReason>();
    }
}

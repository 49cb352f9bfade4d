//! The series of webhook ingest: `webhook_events_total{type, outcome}` and
//! `webhook_confirmations_total{result}`.
//!
//! `type` is bounded as the status label is: the two run event types by name, every other type
//! `other` (before a signature is verified the type comes from the unsigned
//! `X-Plextera-Event-Type` header, read the same bounded way).

use prometheus::Registry;

use super::event::EventType;
use crate::ops::metrics::family::{Grid, Label, counter_grid, grid_get, opts};
use crate::watch::events::{Call, Confirmation};

/// What became of one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventOutcome {
    /// Verified, first delivery, acted on.
    Accepted,
    /// Verified, an event id seen before: acknowledged, nothing done.
    Duplicate,
    /// Refused: no signature, a malformed one, or none that matches a secret.
    InvalidSignature,
    /// Refused: signed, but the timestamp is outside `webhook.tolerance`.
    Stale,
    /// Verified, a type the gateway does not act on, or a run event naming no usable run id:
    /// acknowledged.
    Ignored,
    /// Refused: the body is over `webhook.max_body_size`.
    TooLarge,
    /// Refused: not an event (not JSON, no id, a run event without a run id), or the body did
    /// not arrive in time.
    BadRequest,
    /// Refused for now (503): too many deliveries being read or confirmed; Plextera delivers it
    /// again.
    Busy,
}

impl Label for EventOutcome {
    const ALL: &'static [Self] = &[
        Self::Accepted,
        Self::Duplicate,
        Self::InvalidSignature,
        Self::Stale,
        Self::Ignored,
        Self::TooLarge,
        Self::BadRequest,
        Self::Busy,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Duplicate => "duplicate",
            Self::InvalidSignature => "invalid_signature",
            Self::Stale => "stale",
            Self::Ignored => "ignored",
            Self::TooLarge => "too_large",
            Self::BadRequest => "bad_request",
            Self::Busy => "busy",
        }
    }
}

impl Label for EventType {
    const ALL: &'static [Self] = &[Self::RunCompleted, Self::RunFailed, Self::Other];

    fn label(self) -> &'static str {
        self.name()
    }
}

impl Label for Call {
    const ALL: &'static [Self] = &[Self::Led, Self::Shared, Self::None];

    fn label(self) -> &'static str {
        Call::label(self)
    }
}

impl Label for Confirmation {
    const ALL: &'static [Self] = &[Self::Ended, Self::Going, Self::Stopped, Self::Failed];

    fn label(self) -> &'static str {
        Confirmation::label(self)
    }
}

/// Webhook deliveries and confirming calls. Cheap to clone.
#[derive(Clone)]
pub struct WebhookMetrics {
    /// One counter per (type, outcome), resolved at start-up.
    events: Grid<EventType, EventOutcome>,
    /// One counter per (result, call), resolved at start-up.
    confirmations: Grid<Confirmation, Call>,
}

impl WebhookMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        Ok(Self {
            events: counter_grid(
                registry,
                opts(
                    "webhook_events_total",
                    "Webhook deliveries, by event type (workflow.run.completed, workflow.run.failed, other) and outcome: accepted, duplicate (an event id seen before), invalid_signature, stale (timestamp outside webhook.tolerance), ignored (a type not acted on, or no usable run id), too_large, bad_request, busy (503: too many deliveries being read or confirmed).",
                ),
                ["type", "outcome"],
                |_, _| true,
            )?,
            confirmations: counter_grid(
                registry,
                opts(
                    "webhook_confirmations_total",
                    "Run events confirmed with upstream, by what the confirmation found (result: ended, stored and held clients answered; going, upstream still shows the run going; stopped, 404 or the key refused; failed, 5xx, timeout, 429 or the budget) and whether it was an upstream call of its own (call: led; shared, joined one in flight; none, the run was in the cache or the budget refused).",
                ),
                ["result", "call"],
                // With no call of its own the run was in the cache (ended, or a remembered 404)
                // or the budget refused (failed): never seen going.
                |confirmation, call| !(confirmation == Confirmation::Going && call == Call::None),
            )?,
        })
    }

    pub fn event(&self, kind: EventType, outcome: EventOutcome) {
        if let Some(counter) = grid_get(&self.events, kind, outcome) {
            counter.inc();
        }
    }

    pub fn confirmed(&self, confirmation: Confirmation, call: Call) {
        if let Some(counter) = grid_get(&self.confirmations, confirmation, call) {
            counter.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_and_valid() {
        crate::ops::metrics::family::tests::labels_are_distinct_and_valid::<EventOutcome>();
        crate::ops::metrics::family::tests::labels_are_distinct_and_valid::<Confirmation>();
        crate::ops::metrics::family::tests::labels_are_distinct_and_valid::<Call>();
        // Event types keep Plextera's dotted names: still distinct, and bounded.
        let types: Vec<&str> = EventType::ALL.iter().map(|kind| Label::label(*kind)).collect();
        assert_eq!(types, ["workflow.run.completed", "workflow.run.failed", "other"]);
    }

    #[test]
    fn every_type_and_outcome_is_exported_from_the_start() {
        let registry = Registry::new();
        let metrics = WebhookMetrics::new(&registry).expect("registers");
        metrics.event(EventType::RunFailed, EventOutcome::Stale);
        let families = registry.gather();
        let events = families
            .iter()
            .find(|family| family.name() == "plextera_gateway_webhook_events_total")
            .expect("exported");
        assert_eq!(events.get_metric().len(), 3 * 8);
        let confirmations = families
            .iter()
            .find(|family| family.name() == "plextera_gateway_webhook_confirmations_total")
            .expect("exported");
        assert_eq!(
            confirmations.get_metric().len(),
            4 * 3 - 1,
            "every pair but going with no call of its own, which cannot happen"
        );
        metrics.confirmed(Confirmation::Going, Call::None);
        metrics.confirmed(Confirmation::Going, Call::Led);
    }
}

//! The series of watchers shared across replicas: leases held, takeovers, wake-ups published and
//! received, and watchers that polled on their own because Redis could not coordinate.

use prometheus::{IntCounter, IntGauge, Registry};

use crate::ops::metrics::family::{opts, register};

/// Fleet coordination. Cheap to clone.
#[derive(Clone)]
pub struct FleetMetrics {
    pub leases_held: IntGauge,
    pub lease_takeovers: IntCounter,
    pub published: IntCounter,
    pub received: IntCounter,
    pub fallbacks: IntCounter,
    pub catch_ups: IntCounter,
    pub subscribed: IntGauge,
}

impl FleetMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let gauge = |name: &str, help: &str| register(registry, IntGauge::with_opts(opts(name, help))?);
        let counter = |name: &str, help: &str| register(registry, IntCounter::with_opts(opts(name, help))?);
        Ok(Self {
            leases_held: gauge(
                "fleet_leases_held",
                "Runs this replica polls for the whole fleet right now (it holds their watcher lease in Redis).",
            )?,
            lease_takeovers: counter(
                "fleet_lease_takeovers_total",
                "Watcher leases this replica took after another replica had held them (its holder stopped, died or was cut off).",
            )?,
            published: counter(
                "fleet_wakeups_published_total",
                "Wake-ups this replica published to the others: new versions, ends, stops, and run events to expect.",
            )?,
            received: counter(
                "fleet_wakeups_received_total",
                "Wake-ups from other replicas that reached a run watched here.",
            )?,
            fallbacks: counter(
                "fleet_fallbacks_total",
                "Polls a watcher made on its own because Redis could not coordinate (unreachable, slow, or the subscription down): more upstream calls, never a wrong answer.",
            )?,
            catch_ups: counter(
                "fleet_catch_ups_total",
                "Polls a following replica made because the lease holder had announced a state it had not received (a lost wake-up).",
            )?,
            subscribed: gauge(
                "fleet_subscribed",
                "1 while this replica receives the other replicas' wake-ups (its Redis subscription is up).",
            )?,
        })
    }
}

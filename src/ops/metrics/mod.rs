//! Prometheus metrics: every series the gateway exports, registered into one registry.
//!
//! The names are a contract with dashboards and alerts (`docs/metrics.md`). Each concern owns
//! its series beside the code that updates them and the enum that labels them: requests in
//! [`crate::edge::request_metrics`], upstream calls in [`crate::upstream::metrics`], the budget in
//! [`crate::upstream::budget_metrics`], the memory store in [`crate::cache::metrics`], the Redis
//! tier in [`crate::cache::redis::metrics`], client connections in
//! [`crate::serve::connection::metrics`], held clients in [`crate::watch::metrics`], webhook
//! deliveries in [`crate::webhook::metrics`], secrets re-read from files in
//! [`crate::ops::secret_files`], span export in [`crate::ops::span_export`] (registered by
//! [`crate::ops::spans::Spans::registered`], only when spans are exported). They are built from [`family`]'s blocks; [`Metrics`]
//! gathers them, with the few series that belong to no one concern, for wiring and `/metrics`.

pub mod family;

use std::sync::Arc;

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry, TextEncoder};

use self::family::{opts, register};
use crate::cache::metrics::CacheMetrics;
use crate::cache::redis::RedisMetrics;
use crate::edge::request_metrics::RequestMetrics;
use crate::ops::secret_files::SecretReloadMetrics;
use crate::run::status::{RunStatus, RunStatuses};
use crate::serve::connection::metrics::ConnectionMetrics;
use crate::upstream::budget_metrics::BudgetMetrics;
use crate::upstream::metrics::UpstreamMetrics;
use crate::watch::fleet::metrics::FleetMetrics;
use crate::watch::metrics::WatchMetrics;
use crate::webhook::metrics::WebhookMetrics;

pub use self::family::NAMESPACE;

/// The exposition format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// All of the gateway's metrics. Cheap to clone; clones update the same series.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub requests: RequestMetrics,
    pub upstream: UpstreamMetrics,
    pub runs: RunStatusMetrics,
    pub cache: CacheMetrics,
    pub budget: BudgetMetrics,
    pub redis: RedisMetrics,
    pub connections: ConnectionMetrics,
    pub watch: WatchMetrics,
    pub fleet: FleetMetrics,
    pub webhook: WebhookMetrics,
    pub secrets: SecretReloadMetrics,
    /// `plextera_gateway_coalesced_requests_total`.
    pub coalesced_requests: IntCounter,
    /// `plextera_gateway_coalesced_waiters`.
    pub coalesced_waiters: IntGauge,
}

impl Metrics {
    /// Registers every series into `registry`, plus the process collector (RSS, CPU, open fds).
    pub fn new(registry: Registry, statuses: &RunStatuses) -> prometheus::Result<Self> {
        let coalesced_requests = register(
            &registry,
            IntCounter::with_opts(opts(
                "coalesced_requests_total",
                "Client requests that shared another request's upstream call instead of making their own.",
            ))?,
        )?;
        let coalesced_waiters = register(
            &registry,
            IntGauge::with_opts(opts(
                "coalesced_waiters",
                "Client requests waiting right now on another request's upstream call.",
            ))?,
        )?;
        let build_info = register(
            &registry,
            IntGaugeVec::new(
                opts(
                    "build_info",
                    "Always 1; the version label says which build is running.",
                ),
                &["version"],
            )?,
        )?;
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Self {
            requests: RequestMetrics::new(&registry)?,
            upstream: UpstreamMetrics::new(&registry)?,
            runs: RunStatusMetrics::new(&registry, statuses)?,
            cache: CacheMetrics::new(&registry)?,
            budget: BudgetMetrics::new(&registry)?,
            redis: RedisMetrics::new(&registry)?,
            connections: ConnectionMetrics::new(&registry)?,
            watch: WatchMetrics::new(&registry)?,
            fleet: FleetMetrics::new(&registry)?,
            webhook: WebhookMetrics::new(&registry)?,
            secrets: SecretReloadMetrics::new(&registry)?,
            coalesced_requests,
            coalesced_waiters,
            registry,
        })
    }

    /// The text exposition of every registered series.
    pub fn render(&self) -> Vec<u8> {
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut text)
            .expect("encoding gathered metrics into a Vec cannot fail");
        text
    }
}

/// `plextera_gateway_run_status_total`: its labels are the configured run-status table's.
#[derive(Clone)]
pub struct RunStatusMetrics {
    /// Indexed by `RunStatus::index`.
    served: Arc<[IntCounter]>,
}

impl RunStatusMetrics {
    fn new(registry: &Registry, statuses: &RunStatuses) -> prometheus::Result<Self> {
        let total = register(
            registry,
            IntCounterVec::new(
                opts(
                    "run_status_total",
                    "Runs served to clients (200 answers), by run status; unknown statuses count as other.",
                ),
                &["status"],
            )?,
        )?;
        Ok(Self {
            served: statuses
                .all()
                .map(|status| total.with_label_values(&[statuses.label(status)]))
                .collect(),
        })
    }

    pub fn served(&self, status: RunStatus) {
        if let Some(counter) = self.served.get(status.index()) {
            counter.inc();
        }
    }
}

//! Wiring: everything the gateway serves with, built from a config, with no socket involved.
//!
//! [`App::new`] creates the metrics registry, the upstream client, the budget, the store and the
//! proxy, and checks everything that can fail on configuration. The server binds ports around it;
//! benchmarks and tests can drive [`App::public_service`] directly.

use std::convert::Infallible;
use std::net::SocketAddr;

use http::{Request, Response};
use tower::Service;

use crate::cache::Policy;
use crate::cache::RunStore;
use crate::cache::redis::RedisTier;
use crate::cache::tiers::Tiers;
use crate::config::secrets::Secrets;
use crate::config::{Config, ConfigError};
use crate::edge;
use crate::edge::access_log::{AccessLog, RequestLogLayer};
use crate::edge::client_auth::ClientTokens;
use crate::edge::response::Body;
use crate::ops::metrics::Metrics;
use crate::ops::spans::{Spans, SpansError};
use crate::proxy::RunService;
use crate::run::status::RunStatuses;
use crate::serve::admin::{AdminState, Readiness};
use crate::serve::connection::WorkSlots;
use crate::upstream::Upstream;
use crate::upstream::budget::Budget;
use crate::upstream::credentials::KeyRotation;
use crate::upstream::fetcher::Fetcher;
use crate::watch::Watches;
use crate::watch::fleet::Fleet;
use crate::webhook::Webhooks;
use secrecy::ExposeSecret;
use tower_http::cors::CorsLayer;

/// The gateway's parts, ready to be served.
pub struct App {
    pub runs: RunService,
    /// Held clients and run watchers, in front of `runs`.
    pub watches: Watches,
    /// What the admin port reads: readiness, metrics, the store, the budget.
    pub admin: AdminState,
    /// CORS for the configured origins, built once; `None` when none are configured.
    pub cors: Option<CorsLayer>,
    /// Accepted client tokens, when client authentication is on.
    pub client_tokens: Option<ClientTokens>,
    /// Replaces the upstream key without a restart.
    pub key_rotation: KeyRotation,
    /// The webhook route, when `[webhook] listen` is set.
    pub webhooks: Option<Webhooks>,
    /// The Redis tier, when `[cache.shared]` is set (its password can be rotated).
    pub redis: Option<RedisTier>,
    /// Starts the requests' and upstream calls' spans (and exports them, when configured).
    pub spans: Spans,
    /// Which requests get an access log line.
    pub access_log: AccessLog,
}

impl App {
    pub fn new(config: &Config, secrets: &Secrets) -> Result<Self, AppError> {
        let statuses = RunStatuses::new(&config.cache.terminal_statuses);
        let registry = prometheus::Registry::new();
        let metrics = Metrics::new(registry.clone(), &statuses)?;
        metrics.cache.set_max_size(config.cache.max_size.as_u64());
        let spans = Spans::registered(&config.telemetry, &registry)?;
        let upstream = Upstream::new(
            &config.upstream,
            &secrets.api_key,
            metrics.upstream.clone(),
            spans.clone(),
        )?;
        let key_rotation = upstream.key_rotation();
        let upstream_connections = upstream.occupancy();
        let store = RunStore::new(
            config.cache.max_size.as_u64(),
            config.cache.ttl,
            config.cache.not_found_ttl,
            metrics.cache.clone(),
        );
        let budget = Budget::new(&config.upstream);
        let redis = match &config.cache.shared {
            Some(shared) => Some(RedisTier::new(
                shared,
                secrets
                    .redis_password
                    .as_ref()
                    .map(|password| password.expose_secret().to_owned()),
                config.cache.ttl,
                config.upstream.request_timeout,
                metrics.redis.clone(),
                statuses.clone(),
            )?),
            None => None,
        };
        let fleet = redis
            .clone()
            .map(|redis| Fleet::new(redis, metrics.fleet.clone()));
        let runs = RunService::new(
            Tiers::new(store.clone(), redis.clone()),
            Fetcher::new(upstream, budget.clone(), metrics.budget.clone()),
            Policy::new(statuses, config.cache.not_found_ttl),
            metrics.clone(),
            config.cache.ttl,
        );
        let watches = Watches::new(
            runs.clone(),
            budget.clone(),
            config.watch.clone(),
            config.upstream.max_requests_per_second,
            config.webhook.listen.map(|_| config.webhook.safety_poll_interval),
            fleet,
            metrics.watch.clone(),
        );
        let webhooks = match &secrets.webhook_secrets {
            Some(signing) if config.webhook.listen.is_some() => {
                let signing: Vec<&[u8]> = signing
                    .iter()
                    .map(|secret| secret.expose_secret().as_bytes())
                    .collect();
                Some(Webhooks::new(
                    &config.webhook,
                    &signing,
                    watches.clone(),
                    metrics.webhook.clone(),
                ))
            }
            _ if config.webhook.listen.is_some() => return Err(ConfigError::WebhookSecretsMissing.into()),
            _ => None,
        };
        Ok(Self {
            runs,
            watches: watches.clone(),
            admin: AdminState {
                readiness: Readiness::default(),
                metrics,
                store,
                budget,
                upstream_connections,
                watches,
            },
            cors: edge::cors_layer(&config.server.cors_allowed_origins),
            client_tokens: secrets.client_tokens.clone(),
            key_rotation,
            webhooks,
            redis,
            spans,
            access_log: AccessLog::new(&config.telemetry),
        })
    }

    /// The public port's service stack (see [`edge`]) for one client connection, whose upstream
    /// work slots are `work` and whose address is `peer`; `None` to drive it without a server.
    pub fn public_service<B: Send + 'static>(
        &self,
        work: Option<WorkSlots>,
        peer: Option<SocketAddr>,
    ) -> impl Service<Request<B>, Response = Response<Body>, Error = Infallible, Future: Send + 'static>
    + Clone
    + Send
    + Sync
    + 'static
    + use<B> {
        edge::public_service(
            RequestLogLayer::new(self.spans.clone(), self.access_log, peer),
            self.watches.clone(),
            self.admin.metrics.requests.clone(),
            self.cors.clone(),
            self.client_tokens.clone(),
            work,
        )
    }
}

/// Why the parts could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

impl From<SpansError> for AppError {
    fn from(error: SpansError) -> Self {
        match error {
            SpansError::Config(error) => Self::Config(error),
            SpansError::Metrics(error) => Self::Metrics(error),
        }
    }
}

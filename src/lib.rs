//! plextera-gateway: a caching reverse proxy in front of Plextera's Get-run endpoint.
//!
//! Frontends poll `GET /api/public/v1/workflow-runs/{runId}` here instead of at Plextera. The
//! gateway injects the server-side API key on the way up (so no frontend holds it), keeps runs that
//! have ended in a size-bounded memory cache (a finished run never changes), passes runs that are
//! still going straight through, never stale, and spends as few upstream calls as it can: one call
//! per run however many clients ask at once, within a rate and concurrency budget, and none at all
//! while upstream has asked it to back off.
//!
//! Layout, one concern per module:
//! - [`config`]: the TOML file, defaults, validation, key lookup;
//! - [`secret`]: the key wrapper that never prints;
//! - [`app`]: the parts wired from a config; [`server`]: listeners, connections, graceful drain;
//!   [`connection`]: each client connection's bounds (idle, stalled writes, resets, upstream work);
//!   [`admin`]: `/healthz`, `/readyz`, `/metrics`;
//! - [`stack`]: the public tower stack, outermost first: [`request_log`] (request id, span, access
//!   log) → [`framing`] (a request with a body closes its connection; HEAD answers carry none) →
//!   CORS → [`request_metrics`] → [`client_auth`] (optional) → [`routes`] (validation into
//!   a [`routes::RunRequest`]) →
//!   [`proxy`] (cache; else one shared upstream call per run via [`coalesce`], within the
//!   [`budget`]; then the store decision);
//! - [`run_id`], [`run_status`]: the validated id and the bounded status table;
//! - [`cache`]: policy, status sniffing, the moka store; [`etag`]: validators and 304s;
//! - [`metrics`]: every Prometheus series;
//! - [`upstream`]: what is sent upstream and read back, the key scrubbed from it in any spelling
//!   ([`key_echo`]); [`upstream_pool`]: kept-alive connections
//!   to the one upstream origin; [`error`]/[`response`]: what clients get;
//! - [`telemetry`]: log output; [`demo`]: the simulated upstream behind `--demo`;
//!   [`health_check`]: `--health-check`, for container images without a shell.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod budget;
pub mod cache;
pub mod client_auth;
pub mod coalesce;
pub mod config;
pub mod connection;
pub mod demo;
pub mod error;
pub mod etag;
pub mod framing;
pub mod health_check;
pub mod key_echo;
pub mod metrics;
pub mod proxy;
pub mod request_log;
pub mod request_metrics;
pub mod response;
pub mod routes;
pub mod run_id;
pub mod run_status;
pub mod secret;
pub mod server;
pub mod shared_cache;
pub mod stack;
pub mod telemetry;
pub mod upstream;
pub mod upstream_pool;

pub use app::App;
pub use config::Config;
pub use secret::{ApiKey, Secrets};
pub use server::{Gateway, StartError};

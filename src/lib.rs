//! plextera-gateway: a caching reverse proxy in front of Plextera's Get-run endpoint.
//!
//! Frontends poll `GET /api/public/v1/workflow-runs/{runId}` here instead of at Plextera. The
//! gateway injects the server-side API key on the way up (so no frontend holds it), keeps runs that
//! have ended in a size-bounded memory cache (a finished run never changes), passes runs that are
//! still going straight through, never stale, and spends as few upstream calls as it can: one call
//! per run however many clients ask at once, within a rate and concurrency budget, and none at all
//! while upstream has asked it to back off.
//!
//! The folders follow a request from the socket to Plextera and back:
//! - [`serve`]: listeners, each connection's bounds, graceful drain, the admin port;
//! - [`edge`]: the client-facing tower layers (access log, framing, CORS, metrics, client tokens,
//!   routing) and the answers clients get;
//! - [`proxy`]: the miss path as one sequence: hit → join or lead one call → tiers → fetch →
//!   decide → fill → render;
//! - [`cache`]: the store policy, the memory store, the Redis tier, the single flight, validators;
//! - [`upstream`]: the client, its connection pool, the budget, the credentials and the scrubbing
//!   of echoed keys;
//! - [`watch`]: push instead of poll: long-polls and event streams held on a run, served by one
//!   upstream watcher per run;
//! - [`webhook`]: Plextera's signed run events on a port of their own, each confirmed with one
//!   upstream call that ends every wait on its run;
//! - [`run`]: a run's id and status; [`config`]: the TOML file; [`ops`]: metrics, logs, health;
//! - [`app`]: the parts wired from a config; [`preflight`]: the checks start-up and
//!   `--check-config` share beyond the config's own; [`demo`]: the simulated upstream behind `--demo`.
#![forbid(unsafe_code)]

pub mod app;
pub mod cache;
pub mod config;
pub mod demo;
pub mod edge;
pub mod ops;
pub mod preflight;
pub mod proxy;
pub mod run;
pub mod serve;
pub mod upstream;
pub mod watch;
pub mod webhook;

pub use app::App;
pub use config::Config;
pub use config::secrets::Secrets;
pub use serve::{Gateway, StartError};
pub use upstream::credentials::ApiKey;

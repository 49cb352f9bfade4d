//! Operating the gateway: Prometheus [`metrics`], log output ([`telemetry`]) and the
//! `--health-check` client ([`health_check`]).

pub mod health_check;
pub mod metrics;
pub mod telemetry;

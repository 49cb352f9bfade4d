//! Operating the gateway: Prometheus [`metrics`], log output ([`telemetry`]), the
//! `--health-check` client ([`health_check`]), secrets re-read from their files
//! ([`secret_files`]) and systemd's readiness notifications ([`systemd`]).

pub mod health_check;
pub mod metrics;
pub mod secret_files;
pub mod systemd;
pub mod telemetry;

//! Operating the gateway: Prometheus [`metrics`], log output ([`telemetry`]), W3C trace context
//! ([`trace_context`]) and the spans exported over OTLP ([`spans`], [`span_export`]), the `--health-check`
//! client ([`health_check`]), secrets re-read from their files ([`secret_files`]) and
//! systemd's readiness notifications ([`systemd`]).

pub mod health_check;
pub mod metrics;
pub mod secret_files;
pub mod span_export;
pub mod spans;
pub mod systemd;
pub mod telemetry;
pub mod trace_context;

//! Operating the gateway: Prometheus [`metrics`], log output ([`telemetry`]), W3C trace context
//! ([`trace_context`]) and the spans exported over OTLP ([`spans`]), and the `--health-check`
//! client ([`health_check`]).

pub mod health_check;
pub mod metrics;
pub mod spans;
pub mod telemetry;
pub mod trace_context;

//! The gateway's spans: one server span per client request and one client span per upstream
//! call, with their W3C ids always ([`crate::ops::trace_context`]), exported over OTLP/HTTP
//! (protobuf) when `[telemetry] otlp_endpoint` is set.
//!
//! Without an endpoint nothing is recorded: ids are drawn here, a trace a client started keeps its
//! sampled flag, and one started here is sampled at `sample_ratio`. With one, the OpenTelemetry SDK
//! draws the ids and decides by the same rule (parent-based, then the ratio), and
//! [`crate::ops::span_export`] exports them off the request path: a bounded queue whose overflow
//! is dropped and counted, never a slower request. A client's `tracestate` travels in the
//! exported spans' context as it does upstream. [`Spans::shutdown`] flushes for at most a bound.
//!
//! Status follows OpenTelemetry's HTTP semantic conventions: a server span is an error for a 5xx
//! answer, a client span for any 4xx or 5xx answer and for a call that got no answer. Attributes
//! hold no header value: never the key, never a client token, never a cookie; the path is bounded
//! like the access log's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt, TraceFlags, TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use prometheus::Registry;

use crate::config::{ConfigError, TelemetryConfig};
use crate::ops::span_export::{self, SpanExportMetrics};
use crate::ops::trace_context::{RemoteParent, SpanContext, SpanId, TraceId};

/// The service name spans are exported under.
const SERVICE_NAME: &str = "plextera-gateway";

/// Starts spans. Cheap to clone.
#[derive(Clone)]
pub struct Spans {
    /// `None` when nothing is exported.
    export: Option<Arc<Export>>,
    sample_ratio: f64,
}

struct Export {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl std::fmt::Debug for Spans {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Spans")
            .field("exporting", &self.export.is_some())
            .field("sample_ratio", &self.sample_ratio)
            .finish()
    }
}

impl Default for Spans {
    fn default() -> Self {
        Self {
            export: None,
            sample_ratio: 1.0,
        }
    }
}

/// Why spans could not be set up as configured.
#[derive(Debug, thiserror::Error)]
pub enum SpansError {
    /// `telemetry.ca_file` cannot be read or holds no certificate.
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// What a server span says about the request when it starts.
pub struct ServerStart<'a> {
    /// The method, already bounded; written out only when exporting.
    pub method: &'a dyn std::fmt::Display,
    /// The route template, when the path is the runs path.
    pub route: Option<&'static str>,
    /// The path, already bounded; written out only when exporting.
    pub path: &'a dyn std::fmt::Display,
    pub protocol: &'static str,
    pub client: Option<SocketAddr>,
}

/// What a server span says about the response when it ends.
pub struct ServerEnd<'a> {
    pub status: u16,
    pub cache: &'a str,
    /// The gateway's error code, when it answered with one.
    pub error: Option<&'static str>,
}

/// A client request's span: its ids, and the exported span when exporting.
pub struct ServerSpan {
    pub context: SpanContext,
    /// Boxed: without export, a request's future stays small.
    exported: Option<Box<opentelemetry_sdk::trace::Span>>,
}

/// An upstream call's span.
pub struct ClientSpan {
    pub context: SpanContext,
    /// Boxed: without export, a request's future stays small.
    exported: Option<Box<opentelemetry_sdk::trace::Span>>,
}

/// Where spans are posted under the collector's base URL: `<otlp_endpoint>/v1/traces`. Also
/// parsed by `--check-config` ([`crate::preflight`]).
pub(crate) fn traces_url(endpoint: &str) -> String {
    format!("{}/v1/traces", endpoint.trim_end_matches('/'))
}

impl Spans {
    /// Spans as `[telemetry]` says: exported when `otlp_endpoint` is set, their export counted in
    /// series registered nowhere (see [`Spans::registered`]). Call within the Tokio runtime:
    /// exports are sent on it; outside one, or with a `ca_file` that cannot be read, an error is
    /// logged and nothing is exported.
    pub fn new(config: &TelemetryConfig) -> Self {
        Self::with_metrics(config, || SpanExportMetrics::new(&Registry::new())).unwrap_or_else(|error| {
            tracing::error!(%error, "spans are not exported");
            Self::unexported(config)
        })
    }

    /// As [`Spans::new`], with the export's series (`plextera_gateway_spans_*`) registered into
    /// `registry` when, and only when, spans are exported, and a bad `ca_file` an error.
    pub fn registered(config: &TelemetryConfig, registry: &Registry) -> Result<Self, SpansError> {
        Self::with_metrics(config, || SpanExportMetrics::new(registry))
    }

    fn unexported(config: &TelemetryConfig) -> Self {
        Self {
            export: None,
            sample_ratio: config.sample_ratio,
        }
    }

    fn with_metrics(
        config: &TelemetryConfig,
        metrics: impl FnOnce() -> prometheus::Result<SpanExportMetrics>,
    ) -> Result<Self, SpansError> {
        let unexported = Self::unexported(config);
        let Some(endpoint) = &config.otlp_endpoint else {
            return Ok(unexported);
        };
        let tls = crate::upstream::tls::tls_config_for("telemetry.ca_file", config.ca_file.as_deref())?;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(
                "telemetry.otlp_endpoint: spans are not exported: the gateway was built outside a Tokio runtime"
            );
            return Ok(unexported);
        };
        let traces_url = traces_url(endpoint);
        let processor = match span_export::processor(traces_url, runtime, tls, metrics()?) {
            Ok(processor) => processor,
            Err(error) => {
                // The config check accepted the URL; should the SDK not, spans are not exported.
                tracing::error!(%error, "telemetry.otlp_endpoint: cannot export spans to it");
                return Ok(unexported);
            }
        };
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sample_ratio,
            ))))
            .with_resource(
                opentelemetry_sdk::Resource::builder_empty()
                    .with_service_name(SERVICE_NAME)
                    .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                    .build(),
            )
            .build();
        let tracer = provider.tracer(SERVICE_NAME);
        Ok(Self {
            export: Some(Arc::new(Export { provider, tracer })),
            sample_ratio: config.sample_ratio,
        })
    }

    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.export.is_some()
    }

    /// The span of a client request, continuing `parent` when the client sent a valid one.
    pub fn server(&self, parent: Option<&RemoteParent>, start: &ServerStart<'_>) -> ServerSpan {
        let state = parent.and_then(|parent| parent.state.clone());
        let Some(export) = &self.export else {
            let trace_id = parent.map_or_else(TraceId::random, |parent| parent.trace_id);
            let sampled =
                parent.map_or_else(|| trace_id.sampled_at(self.sample_ratio), |parent| parent.sampled);
            return ServerSpan {
                context: SpanContext {
                    trace_id,
                    span_id: SpanId::random(),
                    sampled,
                    state,
                },
                exported: None,
            };
        };
        let method = start.method.to_string();
        let name = match start.route {
            Some(route) => format!("{method} {route}"),
            None => method.clone(),
        };
        let mut attributes = vec![
            KeyValue::new("http.request.method", method),
            KeyValue::new("url.path", start.path.to_string()),
            KeyValue::new("network.protocol.version", start.protocol),
        ];
        if let Some(route) = start.route {
            attributes.push(KeyValue::new("http.route", route));
        }
        if let Some(client) = start.client {
            attributes.push(KeyValue::new("client.address", client.ip().to_string()));
            attributes.push(KeyValue::new("client.port", i64::from(client.port())));
        }
        let builder = export
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_attributes(attributes);
        let context = parent_context(
            parent.map(|parent| {
                (
                    parent.trace_id,
                    parent.span_id,
                    parent.sampled,
                    parent.state.as_ref(),
                )
            }),
            true,
        );
        let span = export.tracer.build_with_context(builder, &context);
        ServerSpan {
            context: from_otel(span.span_context(), state),
            exported: Some(Box::new(span)),
        }
    }

    /// The span of an upstream call: a child of `parent` (the request's span), or the root of a
    /// trace of its own for a call no client asked for (`None`).
    pub fn client(&self, parent: Option<&SpanContext>, server: &str, port: u16) -> ClientSpan {
        let state = parent.and_then(|parent| parent.state.clone());
        let Some(export) = &self.export else {
            let (trace_id, sampled) = match parent {
                Some(parent) => (parent.trace_id, parent.sampled),
                None => {
                    let trace_id = TraceId::random();
                    (trace_id, trace_id.sampled_at(self.sample_ratio))
                }
            };
            return ClientSpan {
                context: SpanContext {
                    trace_id,
                    span_id: SpanId::random(),
                    sampled,
                    state,
                },
                exported: None,
            };
        };
        let builder = export
            .tracer
            .span_builder("GET")
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("http.request.method", "GET"),
                KeyValue::new("server.address", server.to_owned()),
                KeyValue::new("server.port", i64::from(port)),
            ]);
        let context = parent_context(
            parent.map(|parent| {
                (
                    parent.trace_id,
                    parent.span_id,
                    parent.sampled,
                    parent.state.as_ref(),
                )
            }),
            false,
        );
        let span = export.tracer.build_with_context(builder, &context);
        ClientSpan {
            context: from_otel(span.span_context(), state),
            exported: Some(Box::new(span)),
        }
    }

    /// Exports what is queued and stops exporting, waiting at most `bound`.
    pub async fn shutdown(&self, bound: Duration) {
        let Some(export) = self.export.clone() else {
            return;
        };
        // Blocking (it waits for the export thread), and that thread's exports run on this
        // runtime: off the runtime's workers.
        let flushed = tokio::task::spawn_blocking(move || export.provider.shutdown_with_timeout(bound)).await;
        match flushed {
            Ok(Ok(())) => tracing::debug!("spans exported"),
            Ok(Err(error)) => tracing::warn!(%error, "not every span could be exported at shutdown"),
            Err(error) => tracing::warn!(%error, "the span export did not finish"),
        }
    }
}

impl ServerSpan {
    /// Ends the span with the response's outcome.
    pub fn end(self, end: &ServerEnd<'_>) {
        let Some(mut span) = self.exported else {
            return;
        };
        span.set_attribute(KeyValue::new("http.response.status_code", i64::from(end.status)));
        span.set_attribute(KeyValue::new("plextera.cache", end.cache.to_owned()));
        if let Some(code) = end.error {
            span.set_attribute(KeyValue::new("error.type", code));
        }
        if end.status >= 500 {
            span.set_status(Status::error(end.error.unwrap_or("server error")));
        }
        span.end();
    }
}

impl ClientSpan {
    /// Ends the span: `status` when upstream answered, else `error` (`timeout`, `connect`, …).
    pub fn end(self, status: Option<u16>, error: Option<&'static str>) {
        let Some(mut span) = self.exported else {
            return;
        };
        if let Some(status) = status {
            span.set_attribute(KeyValue::new("http.response.status_code", i64::from(status)));
            if status >= 400 {
                // A client span's call failed for any 4xx or 5xx answer (a server span's only
                // for a 5xx: a 4xx there is the client's mistake).
                span.set_attribute(KeyValue::new("error.type", status.to_string()));
                span.set_status(Status::error(status.to_string()));
            }
        }
        if let Some(error) = error {
            span.set_attribute(KeyValue::new("error.type", error));
            span.set_status(Status::error(error));
        }
        span.end();
    }
}

/// The SDK context a new span starts in: its parent's ids, flags and `tracestate` (`remote`: the
/// client's span, not one of ours), or none for the root of a trace.
fn parent_context(
    parent: Option<(TraceId, SpanId, bool, Option<&http::HeaderValue>)>,
    remote: bool,
) -> Context {
    match parent {
        Some((trace_id, span_id, sampled, state)) => {
            Context::new().with_remote_span_context(otel_context(trace_id, span_id, sampled, remote, state))
        }
        None => Context::new(),
    }
}

fn otel_context(
    trace_id: TraceId,
    span_id: SpanId,
    sampled: bool,
    remote: bool,
    state: Option<&http::HeaderValue>,
) -> opentelemetry::trace::SpanContext {
    opentelemetry::trace::SpanContext::new(
        opentelemetry::trace::TraceId::from_bytes(trace_id.0),
        opentelemetry::trace::SpanId::from_bytes(span_id.0),
        if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        },
        remote,
        trace_state(state),
    )
}

/// A `tracestate` as the SDK holds it: the client's, already checked against the W3C grammar
/// ([`crate::ops::trace_context`]), or none.
fn trace_state(state: Option<&http::HeaderValue>) -> TraceState {
    state
        .and_then(|state| state.to_str().ok())
        .and_then(|state| state.parse().ok())
        .unwrap_or_default()
}

fn from_otel(context: &opentelemetry::trace::SpanContext, state: Option<http::HeaderValue>) -> SpanContext {
    SpanContext {
        trace_id: TraceId(context.trace_id().to_bytes()),
        span_id: SpanId(context.span_id().to_bytes()),
        sampled: context.is_sampled(),
        state,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exporting_config() -> TelemetryConfig {
        TelemetryConfig {
            // Nothing listens there: nothing is sent within these tests anyway.
            otlp_endpoint: Some("http://127.0.0.1:9".to_owned()),
            ..TelemetryConfig::default()
        }
    }

    fn start() -> ServerStart<'static> {
        ServerStart {
            method: &"GET",
            route: None,
            path: &"/",
            protocol: "1.1",
            client: None,
        }
    }

    #[test]
    fn outside_a_runtime_nothing_is_exported_and_nothing_panics() {
        let spans = Spans::new(&exporting_config());
        assert!(!spans.exporting());
        let server = spans.server(None, &start());
        let client = spans.client(Some(&server.context), "upstream", 443);
        assert_eq!(client.context.trace_id, server.context.trace_id);
        client.end(Some(200), None);
        server.end(&ServerEnd {
            status: 200,
            cache: "pass",
            error: None,
        });
    }

    #[tokio::test]
    async fn within_a_runtime_spans_are_exported_and_their_series_registered() {
        let registry = Registry::new();
        let spans = Spans::registered(&exporting_config(), &registry).expect("registers");
        assert!(spans.exporting());
        let names: Vec<String> = registry
            .gather()
            .iter()
            .map(|family| family.name().to_owned())
            .collect();
        assert!(
            names.contains(&"plextera_gateway_spans_dropped_total".to_owned()),
            "{names:?}"
        );
        assert!(
            names.contains(&"plextera_gateway_spans_exported_total".to_owned()),
            "{names:?}"
        );
        spans.shutdown(Duration::from_millis(100)).await;

        let bad_ca = TelemetryConfig {
            ca_file: Some("/nonexistent/collector-ca.pem".into()),
            ..exporting_config()
        };
        let error = Spans::registered(&bad_ca, &Registry::new())
            .expect_err("a ca_file that cannot be read is refused");
        assert!(
            matches!(&error, SpansError::Config(_)) && error.to_string().contains("telemetry.ca_file"),
            "{error}"
        );
        assert!(!Spans::new(&bad_ca).exporting(), "logged, not exported");

        let quiet = Registry::new();
        let unexported = Spans::registered(&TelemetryConfig::default(), &quiet).expect("registers");
        assert!(!unexported.exporting());
        assert!(quiet.gather().is_empty(), "no span series without export");
    }
}

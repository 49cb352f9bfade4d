//! The gateway's spans: one server span per client request and one client span per upstream
//! call, with their W3C ids always ([`crate::ops::trace_context`]), exported over OTLP/HTTP
//! (protobuf) when `[telemetry] otlp_endpoint` is set.
//!
//! Without an endpoint nothing is recorded: ids are drawn here, a trace a client started keeps its
//! sampled flag, and one started here is sampled at `sample_ratio`. With one, the OpenTelemetry SDK
//! draws the ids and decides by the same rule (parent-based, then the ratio), and a batch processor
//! exports on a thread of its own: its queue is bounded ([`MAX_QUEUE`]; a span that finds it full
//! is dropped, so the request path never waits on the collector), each export has a deadline, the
//! exporter never retries, and [`Spans::shutdown`] flushes for at most a bound.
//!
//! Attributes follow OpenTelemetry's HTTP semantic conventions and hold no header value: never the
//! key, never a client token, never a cookie; the path is bounded like the access log's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt, TraceFlags, TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider,
};

use crate::config::TelemetryConfig;
use crate::ops::trace_context::{RemoteParent, SpanContext, SpanId, TraceId};

/// Most finished spans waiting for export; beyond, new ones are dropped.
pub const MAX_QUEUE: usize = 2048;
/// Most spans in one export request.
const MAX_BATCH: usize = 512;
/// How often queued spans are exported.
const EXPORT_INTERVAL: Duration = Duration::from_secs(2);
/// Longest one export may take, connect to answer.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest collector answer read.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
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

impl Spans {
    /// Spans as `[telemetry]` says: exported when `otlp_endpoint` is set. Call within the Tokio
    /// runtime: exports are sent on it.
    pub fn new(config: &TelemetryConfig) -> Self {
        let Some(endpoint) = &config.otlp_endpoint else {
            return Self {
                export: None,
                sample_ratio: config.sample_ratio,
            };
        };
        let traces_url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
        let client = ExportClient::new(tokio::runtime::Handle::current());
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(traces_url)
            .with_timeout(EXPORT_TIMEOUT)
            .with_http_client(client)
            .with_retry_policy(opentelemetry_otlp::RetryPolicy::disabled())
            .build();
        let exporter = match exporter {
            Ok(exporter) => exporter,
            Err(error) => {
                // The config check accepted the URL; should the SDK not, spans are not exported.
                tracing::error!(%error, "telemetry.otlp_endpoint: cannot export spans to it");
                return Self {
                    export: None,
                    sample_ratio: config.sample_ratio,
                };
            }
        };
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_max_queue_size(MAX_QUEUE)
                    .with_max_export_batch_size(MAX_BATCH)
                    .with_scheduled_delay(EXPORT_INTERVAL)
                    .build(),
            )
            .build();
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
        Self {
            export: Some(Arc::new(Export { provider, tracer })),
            sample_ratio: config.sample_ratio,
        }
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
        let context = match parent {
            Some(parent) => Context::new().with_remote_span_context(otel_context(
                parent.trace_id,
                parent.span_id,
                parent.sampled,
                true,
            )),
            None => Context::new(),
        };
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
        let context = match parent {
            Some(parent) => Context::new().with_remote_span_context(otel_context(
                parent.trace_id,
                parent.span_id,
                parent.sampled,
                false,
            )),
            None => Context::new(),
        };
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
                span.set_attribute(KeyValue::new("error.type", status.to_string()));
            }
        }
        if let Some(error) = error {
            span.set_attribute(KeyValue::new("error.type", error));
            span.set_status(Status::error(error));
        }
        span.end();
    }
}

fn otel_context(
    trace_id: TraceId,
    span_id: SpanId,
    sampled: bool,
    remote: bool,
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
        TraceState::default(),
    )
}

fn from_otel(context: &opentelemetry::trace::SpanContext, state: Option<http::HeaderValue>) -> SpanContext {
    SpanContext {
        trace_id: TraceId(context.trace_id().to_bytes()),
        span_id: SpanId(context.span_id().to_bytes()),
        sampled: context.is_sampled(),
        state,
    }
}

/// Sends the exporter's requests on the gateway's runtime (the batch processor's thread has
/// none), each within [`EXPORT_TIMEOUT`], reading at most [`MAX_ANSWER_BYTES`] of the answer.
#[derive(Debug, Clone)]
struct ExportClient {
    runtime: tokio::runtime::Handle,
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Full<Bytes>,
    >,
}

impl ExportClient {
    fn new(runtime: tokio::runtime::Handle) -> Self {
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(EXPORT_TIMEOUT));
        let tls = crate::upstream::tls::tls_config(None).unwrap_or_else(|_| {
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        });
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_max_idle_per_host(1)
            .build(connector);
        Self { runtime, client }
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for ExportClient {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        let exchange = async move {
            let response = client.request(request.map(Full::new)).await?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|error| -> opentelemetry_http::HttpError { error.to_string().into() })?
                .to_bytes();
            Ok::<_, opentelemetry_http::HttpError>(http::Response::from_parts(parts, body))
        };
        let sent = self
            .runtime
            .spawn(async move { tokio::time::timeout(EXPORT_TIMEOUT, exchange).await });
        match sent.await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err("the collector did not answer within the export timeout".into()),
            Err(error) => Err(error.into()),
        }
    }
}

//! The span export pipeline behind [`crate::ops::spans`]: finished spans queued (bounded), sent
//! to the OTLP/HTTP collector by the SDK's batch processor on a thread of its own, and what an
//! operator sees of it when the collector is out of reach.
//!
//! The queue holds at most [`MAX_QUEUE`] spans, counting those waiting and those in an export
//! still running: a span that finds it full is dropped at once (the request that ended it never
//! waits on the collector) and counted as `plextera_gateway_spans_dropped_total{reason="queue_full"}`.
//! An export that fails below HTTP is sent once more on a fresh connection (a collector may close
//! a kept-alive connection just as a batch goes out on it); one that still fails (refused, timed
//! out after [`EXPORT_TIMEOUT`], an error status) is not retried again: its spans count as
//! `reason="export_failed"`, and a warning is logged at most once per
//! [`WARNING_INTERVAL`] while exports fail, with the cause and no header value (the endpoint
//! holds no credentials: the config check refuses them). These series are registered only when
//! export is on: without it none of them could move.
//!
//! Exports are sent on the gateway's Tokio runtime, over rustls with the public web roots
//! (`webpki-roots`) and the CAs in `telemetry.ca_file`, if set.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use opentelemetry::Context;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Span, SpanData, SpanExporter, SpanProcessor,
};
use prometheus::{IntCounter, Registry};

use crate::ops::metrics::family::{ByLabel, Label, counters, opts, register};

/// Most finished spans waiting for export or in an export; beyond, new ones are dropped.
pub const MAX_QUEUE: usize = 2048;
/// Most spans in one export request.
const MAX_BATCH: usize = 512;
/// How often queued spans are exported.
const EXPORT_INTERVAL: Duration = Duration::from_secs(2);
/// Longest one export may take, connect to answer.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest collector answer read.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Least time between two warnings about failing exports.
pub const WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// Why a span was not exported, for `plextera_gateway_spans_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// [`MAX_QUEUE`] spans were already waiting or being exported.
    QueueFull,
    /// The export holding it failed.
    ExportFailed,
}

impl Label for DropReason {
    const ALL: &'static [Self] = &[Self::QueueFull, Self::ExportFailed];

    fn label(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::ExportFailed => "export_failed",
        }
    }
}

/// `plextera_gateway_spans_exported_total` and `plextera_gateway_spans_dropped_total`.
#[derive(Clone)]
pub struct SpanExportMetrics {
    exported: IntCounter,
    dropped: ByLabel<DropReason, IntCounter>,
}

impl SpanExportMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        Ok(Self {
            exported: register(
                registry,
                IntCounter::with_opts(opts("spans_exported_total", "Spans the OTLP collector accepted."))?,
            )?,
            dropped: counters(
                registry,
                opts(
                    "spans_dropped_total",
                    "Spans not exported: the export queue was full, or the export holding them failed.",
                ),
                "reason",
            )?,
        })
    }

    fn dropped(&self, reason: DropReason, spans: usize) {
        if let Some(counter) = self.dropped.get(reason) {
            counter.inc_by(spans as u64);
        }
    }
}

/// The batch processor exporting to `traces_url` on `runtime` over `tls`, bounded, counted into
/// `metrics`.
pub fn processor(
    traces_url: String,
    runtime: tokio::runtime::Handle,
    tls: rustls::ClientConfig,
    metrics: SpanExportMetrics,
) -> Result<impl SpanProcessor + 'static, opentelemetry_otlp::ExporterBuildError> {
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    let client = ExportClient::new(runtime, tls);
    let cause = Arc::clone(&client.last_failure);
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(traces_url)
        .with_timeout(EXPORT_TIMEOUT)
        .with_http_client(client)
        .with_retry_policy(opentelemetry_otlp::RetryPolicy::disabled())
        .build()?;
    let queued = Arc::new(AtomicUsize::new(0));
    let exporter = CountedExporter {
        inner: exporter,
        queued: Arc::clone(&queued),
        metrics: metrics.clone(),
        warnings: Mutex::new(Warnings::default()),
        cause,
    };
    let batches = BatchSpanProcessor::builder(exporter)
        .with_batch_config(
            BatchConfigBuilder::default()
                .with_max_queue_size(MAX_QUEUE)
                .with_max_export_batch_size(MAX_BATCH)
                .with_scheduled_delay(EXPORT_INTERVAL)
                .build(),
        )
        .build();
    Ok(BoundedQueue {
        inner: batches,
        queued,
        metrics,
    })
}

/// Admits a span to the batch processor only while fewer than [`MAX_QUEUE`] are queued or being
/// exported; the SDK's own queue (as long) then never fills, and every drop is counted here.
#[derive(Debug)]
struct BoundedQueue {
    inner: BatchSpanProcessor,
    /// Spans admitted and not yet through an export (shared with [`CountedExporter`]).
    queued: Arc<AtomicUsize>,
    metrics: SpanExportMetrics,
}

impl std::fmt::Debug for SpanExportMetrics {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("SpanExportMetrics")
    }
}

impl SpanProcessor for BoundedQueue {
    fn on_start(&self, span: &mut Span, context: &Context) {
        self.inner.on_start(span, context);
    }

    fn on_end(&self, span: SpanData) {
        let admitted = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                (queued < MAX_QUEUE).then_some(queued + 1)
            })
            .is_ok();
        if admitted {
            self.inner.on_end(span);
        } else {
            self.metrics.dropped(DropReason::QueueFull, 1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OTLP exporter, counting what each export did and warning while exports fail.
#[derive(Debug)]
struct CountedExporter {
    inner: opentelemetry_otlp::SpanExporter,
    queued: Arc<AtomicUsize>,
    metrics: SpanExportMetrics,
    warnings: Mutex<Warnings>,
    /// What the last failed exchange with the collector ran into (the OTLP exporter's own error
    /// says only "network error").
    cause: Arc<Mutex<Option<String>>>,
}

/// When failing exports were last warned about, and the spans they dropped since.
#[derive(Debug, Default)]
struct Warnings {
    last: Option<Instant>,
    dropped_since: usize,
    failing: bool,
}

impl SpanExporter for CountedExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        self.queued.fetch_sub(spans, Ordering::AcqRel);
        match &result {
            Ok(()) => {
                self.metrics.exported.inc_by(spans as u64);
                self.recovered();
            }
            Err(error) => {
                self.metrics.dropped(DropReason::ExportFailed, spans);
                let cause = self.cause.lock().ok().and_then(|mut cause| cause.take());
                self.failed(spans, &error.to_string(), cause.as_deref());
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

impl CountedExporter {
    fn failed(&self, spans: usize, error: &str, cause: Option<&str>) {
        let Ok(mut warnings) = self.warnings.lock() else {
            return;
        };
        warnings.dropped_since += spans;
        if warnings
            .last
            .is_some_and(|last| last.elapsed() < WARNING_INTERVAL)
        {
            return;
        }
        // Only a failure that was warned about gets its recovery logged: both at most once a
        // minute, however often a collector drops a connection.
        warnings.failing = true;
        tracing::warn!(
            error,
            cause = cause.unwrap_or("none given"),
            dropped_spans = warnings.dropped_since,
            "spans cannot be exported to telemetry.otlp_endpoint and are dropped \
             (warned at most once a minute while exports fail)"
        );
        warnings.last = Some(Instant::now());
        warnings.dropped_since = 0;
    }

    fn recovered(&self) {
        let Ok(mut warnings) = self.warnings.lock() else {
            return;
        };
        if warnings.failing {
            tracing::info!("spans are exported to telemetry.otlp_endpoint again");
            warnings.failing = false;
            warnings.dropped_since = 0;
        }
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
    /// The cause of the last failed exchange, for the warning.
    last_failure: Arc<Mutex<Option<String>>>,
}

impl ExportClient {
    fn new(runtime: tokio::runtime::Handle, tls: rustls::ClientConfig) -> Self {
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(EXPORT_TIMEOUT));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_max_idle_per_host(1)
            .build(connector);
        Self {
            runtime,
            client,
            last_failure: Arc::default(),
        }
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
            // Once more on a fresh connection when the exchange failed below HTTP: a collector
            // may close a kept-alive connection just as a batch is sent on it (the upstream client
            // does the same). A batch a collector did take twice is a duplicate, not a loss.
            let (parts, body) = request.into_parts();
            let resend = || {
                let mut again = http::Request::new(Full::new(body.clone()));
                *again.method_mut() = parts.method.clone();
                *again.uri_mut() = parts.uri.clone();
                *again.headers_mut() = parts.headers.clone();
                again
            };
            let response = match client.request(resend()).await {
                Ok(response) => response,
                Err(_) => client.request(resend()).await?,
            };
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
        let answer = match sent.await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err("the collector did not answer within the export timeout".into()),
            Err(error) => Err(error.into()),
        };
        let failure = match &answer {
            Ok(response) if !response.status().is_success() => {
                Some(format!("the collector answered {}", response.status()))
            }
            Ok(_) => None,
            Err(error) => Some(causes(error.as_ref())),
        };
        if let Ok(mut last) = self.last_failure.lock() {
            *last = failure;
        }
        answer
    }
}

/// An error and its sources, `: `-separated (hyper's own message is only the outermost).
fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_reasons_are_distinct_labels() {
        crate::ops::metrics::family::tests::labels_are_distinct_and_valid::<DropReason>();
    }
}

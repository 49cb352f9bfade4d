//! Layer: counts each answered request and its latency by cache outcome and status.
//!
//! It sits inside CORS, right around routing, so it times the gateway's own work on a request and
//! reads the [`CacheOutcome`] that routing, the proxy or the error mapping attached to the
//! response. CORS preflights are answered before this layer and are not counted: they never touch
//! the cache or upstream.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode};
use pin_project_lite::pin_project;
use prometheus::{Histogram, IntCounterVec, Registry};
use tower::{Layer, Service};

use crate::cache::CacheOutcome;
use crate::edge::response::Body;
use crate::ops::metrics::family::{ByCode, ByLabel, histograms, opts, register};

/// Client-side latency buckets (seconds): from a 25 µs hit to a 10 s upstream timeout.
const REQUEST_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0,
];

/// `plextera_gateway_requests_total` and `plextera_gateway_request_duration_seconds`.
/// One `Arc` inside, so the per-request clone is a single reference-count increment.
#[derive(Clone)]
pub struct RequestMetrics(Arc<RequestTables>);

struct RequestTables {
    answered: ByLabel<CacheOutcome, ByCode>,
    duration: ByLabel<CacheOutcome, Histogram>,
}

impl RequestMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let total = register(
            registry,
            IntCounterVec::new(
                opts(
                    "requests_total",
                    "Client requests answered, by cache outcome and HTTP status.",
                ),
                &["cache", "code"],
            )?,
        )?;
        let duration = histograms(
            registry,
            "request_duration_seconds",
            "Time from a client request's head being read to its response head being ready, by cache outcome; held long-polls are not timed.",
            REQUEST_BUCKETS,
            &["cache"],
        )?;
        Ok(Self(Arc::new(RequestTables {
            answered: ByLabel::new(|label| ByCode::new(total.clone(), vec![label])),
            duration: ByLabel::new(|label| duration.with_label_values(&[label])),
        })))
    }

    /// Records one answered client request; `elapsed` is `None` for a held long-poll, whose time
    /// is the client's wait, not the gateway's work.
    pub fn observe(&self, outcome: CacheOutcome, code: StatusCode, elapsed: Option<Duration>) {
        if let Some(answered) = self.0.answered.get(outcome) {
            answered.get(code).inc();
        }
        if let Some(elapsed) = elapsed
            && let Some(duration) = self.0.duration.get(outcome)
        {
            duration.observe(elapsed.as_secs_f64());
        }
    }
}

/// Adds [`RecordMetrics`] around a service.
#[derive(Clone)]
pub struct RecordMetricsLayer {
    metrics: RequestMetrics,
}

impl RecordMetricsLayer {
    pub fn new(metrics: RequestMetrics) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for RecordMetricsLayer {
    type Service = RecordMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RecordMetrics {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct RecordMetrics<S> {
    inner: S,
    metrics: RequestMetrics,
}

impl<S, ReqBody> Service<Request<ReqBody>> for RecordMetrics<S>
where
    S: Service<Request<ReqBody>, Response = Response<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = RecordMetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        RecordMetricsFuture {
            started: Instant::now(),
            inner: self.inner.call(request),
            metrics: self.metrics.clone(),
        }
    }
}

pin_project! {
    /// Records the response once it is ready.
    pub struct RecordMetricsFuture<F> {
        #[pin]
        inner: F,
        metrics: RequestMetrics,
        started: Instant,
    }
}

impl<F, E> Future for RecordMetricsFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        if let Ok(response) = &result {
            let outcome = response.body().outcome().unwrap_or(CacheOutcome::Error);
            let elapsed = (!response.body().held()).then(|| this.started.elapsed());
            this.metrics.observe(outcome, response.status(), elapsed);
        }
        Poll::Ready(result)
    }
}

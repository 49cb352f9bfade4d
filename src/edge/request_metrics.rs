//! Layer: counts each answered request and its latency by cache outcome and status.
//!
//! It sits inside CORS, right around routing, so it times the gateway's own work on a request and
//! reads the [`CacheOutcome`] that routing, the proxy or the error mapping attached to the
//! response. CORS preflights are answered before this layer and are not counted: they never touch
//! the cache or upstream.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::edge::response::{Body, CacheOutcome};
use crate::ops::metrics::RequestMetrics;

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
            this.metrics
                .observe(outcome, response.status(), this.started.elapsed());
        }
        Poll::Ready(result)
    }
}

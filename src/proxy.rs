//! The caching proxy: answers a [`RunRequest`] from memory, or from upstream and maybe stores it.
//!
//! Order per request: look the run up (a hit is answered at once, nothing parsed); otherwise fetch
//! it, map upstream faults to gateway errors, ask the policy whether the answer is a terminal run,
//! store it if so (MISS) and forward it either way (PASS when not stored). Upstream 401/403 mean
//! the gateway's own key is wrong, not the client's request: they become 502 `UPSTREAM_AUTH` and
//! are logged at ERROR. Upstream 1xx/3xx cannot be forwarded meaningfully and become 502 too.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::RETRY_AFTER;
use http::{HeaderValue, Response, StatusCode};
use tower::Service;

use crate::cache::{CachedRun, Decision, RunStore, policy};
use crate::error::GatewayError;
use crate::metrics::RunStatusMetrics;
use crate::response::{APPLICATION_JSON, Body, CacheOutcome, NO_STORE, run_response, terminal_cache_control};
use crate::routes::RunRequest;
use crate::run_status::RunStatuses;
use crate::upstream::{Upstream, UpstreamError, UpstreamResponse};

/// The innermost service of the public stack. Cheap to clone: all state is shared.
#[derive(Clone)]
pub struct RunService {
    shared: Arc<Shared>,
}

struct Shared {
    store: RunStore,
    upstream: Upstream,
    statuses: RunStatuses,
    run_metrics: RunStatusMetrics,
    /// `cache-control` for terminal runs, formatted once.
    terminal_cache_control: HeaderValue,
}

impl RunService {
    pub fn new(
        store: RunStore,
        upstream: Upstream,
        statuses: RunStatuses,
        run_metrics: RunStatusMetrics,
        ttl: std::time::Duration,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                store,
                upstream,
                statuses,
                run_metrics,
                terminal_cache_control: terminal_cache_control(ttl),
            }),
        }
    }
}

impl Service<RunRequest> for RunService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: RunRequest) -> Self::Future {
        let shared = Arc::clone(&self.shared);
        Box::pin(async move { Ok(shared.answer(request).await) })
    }
}

impl Shared {
    async fn answer(&self, request: RunRequest) -> Response<Body> {
        if let Some(run) = self.store.get(request.id.as_str()).await {
            self.run_metrics.served(run.status);
            return run_response(
                StatusCode::OK,
                run.content_type.clone(),
                self.terminal_cache_control.clone(),
                CacheOutcome::Hit,
                run.body.clone(),
            );
        }
        match self.upstream.fetch(&request.id, &request.request_id).await {
            Ok(answer) => {
                let upstream_ms = (answer.elapsed.as_secs_f64() * 10_000.0).round() / 10.0;
                tracing::Span::current().record("upstream_ms", upstream_ms);
                self.forward(request, answer).await
            }
            Err(error) => {
                tracing::warn!(%error, "upstream request failed");
                upstream_failure(error).into_response(Some(&request.request_id))
            }
        }
    }

    async fn forward(&self, request: RunRequest, answer: UpstreamResponse) -> Response<Body> {
        if answer.status == StatusCode::UNAUTHORIZED || answer.status == StatusCode::FORBIDDEN {
            tracing::error!(
                upstream_status = answer.status.as_u16(),
                "upstream refused the gateway's API key: check upstream.api_key_env / api_key_file"
            );
            return GatewayError::UpstreamAuth.into_response(Some(&request.request_id));
        }
        if answer.status.is_informational() || answer.status.is_redirection() {
            tracing::warn!(
                upstream_status = answer.status.as_u16(),
                "unexpected upstream status"
            );
            return GatewayError::UpstreamBadResponse.into_response(Some(&request.request_id));
        }
        let content_type = answer.content_type.unwrap_or(APPLICATION_JSON);
        let verdict = policy::decide(answer.status, &answer.body, &request.id, &self.statuses);
        if answer.status == StatusCode::OK {
            self.run_metrics
                .served(verdict.status.unwrap_or_else(|| self.statuses.other()));
        }
        match verdict.decision {
            Decision::Store(status) => {
                let run = Arc::new(CachedRun {
                    body: answer.body.clone(),
                    content_type: content_type.clone(),
                    status,
                });
                self.store.insert(request.id, run).await;
                run_response(
                    StatusCode::OK,
                    content_type,
                    self.terminal_cache_control.clone(),
                    CacheOutcome::Miss,
                    answer.body,
                )
            }
            Decision::Pass(reason) => {
                tracing::debug!(reason = reason.as_str(), "not stored");
                let mut response = run_response(
                    answer.status,
                    content_type,
                    NO_STORE,
                    CacheOutcome::Pass,
                    answer.body,
                );
                if let Some(retry_after) = answer.retry_after {
                    response.headers_mut().insert(RETRY_AFTER, retry_after);
                }
                response
            }
        }
    }
}

fn upstream_failure(error: UpstreamError) -> GatewayError {
    match error {
        UpstreamError::Timeout => GatewayError::UpstreamTimeout,
        UpstreamError::Connect | UpstreamError::Broken => GatewayError::UpstreamUnavailable,
        UpstreamError::BodyTooLarge => GatewayError::UpstreamBodyTooLarge,
    }
}

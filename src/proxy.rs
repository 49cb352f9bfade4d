//! The caching proxy: answers a [`RunRequest`] from memory, or from upstream and maybe stores it.
//!
//! Per request: look the run up (a hit is answered at once, nothing parsed); otherwise take one of
//! the client connection's work slots (see [`crate::serve::connection`]) and join or lead the single
//! upstream call for that run ([`Coalescer`]); a call led keeps the slot until it ends. The call,
//! in a task of its own so no client's disconnect cancels it: checks the store once more (a call
//! that just ended may have filled it), then the shared Redis tier when there is one (and, if
//! another replica is fetching the run, waits briefly for it), waits for the upstream budget,
//! fetches, maps faults to gateway errors, asks the policy whether the answer is a terminal run,
//! stores it if so and if it fits in the cache at all (one larger than `cache.max_size` would be
//! evicted at once, and one the full cache declines to admit is not kept either: both are a PASS),
//! in memory now and in Redis in the background, and only then lets go of the run id. Everyone who waited gets the same answer.
//!
//! Upstream 401/403 mean the gateway's own key is wrong, not the client's request: they become 502
//! `UPSTREAM_AUTH` and are logged at ERROR. Upstream 1xx/3xx become 502 too, and so does a body
//! sent with a `Content-Encoding` the gateway never asked for (it could not be read for its status
//! or an echoed key, nor forwarded as the JSON it is labelled). An upstream 429 is
//! forwarded and starts the budget's shared cooldown.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, ETAG, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};
use tower::Service;
use tracing::Instrument;

use crate::cache::coalesce::{Coalescer, Role};
use crate::cache::etag;
use crate::cache::redis::{Election, Lookup, SharedCache};
use crate::cache::{CachedRun, Decision, RunStore, policy};
use crate::edge::error::GatewayError;
use crate::edge::response::{
    APPLICATION_JSON, Body, CacheOutcome, NO_STORE, run_response, terminal_cache_control,
};
use crate::edge::routes::RunRequest;
use crate::ops::metrics::{Metrics, RefusalReason};
use crate::run::id::RunId;
use crate::run::status::{RunStatus, RunStatuses};
use crate::upstream::budget::{self, Budget, Refusal};
use crate::upstream::{Upstream, UpstreamError, UpstreamResponse};

/// What one upstream call produced, shared by everyone who waited for it.
#[derive(Clone)]
enum Fetched {
    /// In the store now. `fresh` when this call stored it; otherwise a call that ended just
    /// before this one had.
    Stored { entry: CachedRun, fresh: bool },
    /// Upstream's answer, forwarded and not stored.
    Passed(Arc<Passed>),
    /// No answer to forward.
    Failed(GatewayError),
}

/// An upstream answer that is forwarded but not stored.
struct Passed {
    status: StatusCode,
    content_type: HeaderValue,
    retry_after: Option<HeaderValue>,
    body: Bytes,
    /// Set for 200 answers: the run's status, `other` when the body has none.
    run_status: Option<RunStatus>,
}

/// The settings the proxy works with.
pub struct ProxySettings {
    pub statuses: RunStatuses,
    /// `cache.ttl`: how long terminal runs are kept, and the clients' `max-age`.
    pub ttl: Duration,
    /// `cache.not_found_ttl`: how long a 404 is kept (zero: never).
    pub not_found_ttl: Duration,
}

/// The innermost service of the public stack. Cheap to clone: all state is shared.
#[derive(Clone)]
pub struct RunService {
    shared: Arc<Shared>,
}

struct Shared {
    store: RunStore,
    /// The Redis tier, when `[cache.shared]` is configured.
    shared: Option<SharedCache>,
    upstream: Upstream,
    budget: Budget,
    coalescer: Coalescer<RunId, Fetched>,
    metrics: Metrics,
    settings: ProxySettings,
    /// `cache-control` for terminal runs, formatted once.
    terminal_cache_control: HeaderValue,
}

impl RunService {
    pub fn new(
        store: RunStore,
        shared: Option<SharedCache>,
        upstream: Upstream,
        budget: Budget,
        metrics: Metrics,
        settings: ProxySettings,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                store,
                shared,
                upstream,
                budget,
                coalescer: Coalescer::new(metrics.coalesced_waiters.clone()),
                metrics,
                terminal_cache_control: terminal_cache_control(settings.ttl),
                settings,
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
        Box::pin(async move {
            if let Some(entry) = shared.store.get(request.id.as_str()).await {
                return Ok(shared.stored_response(&entry, CacheOutcome::Hit, &request));
            }
            // Boxed so the (large) miss path's state does not make every hit's future larger.
            Ok(Box::pin(shared.miss(request)).await)
        })
    }
}

impl Shared {
    /// Joins or leads the one upstream call for the run, then answers from what it produced.
    async fn miss(self: Arc<Self>, request: RunRequest) -> Response<Body> {
        // One of the client connection's work slots: a call this request leads keeps it until the
        // call ends, even if the client resets the stream or goes away; joining another's call
        // gives it back at once.
        let work_slot = match &request.work {
            Some(work) => Some(work.acquire().await),
            None => None,
        };
        let call = {
            let shared = Arc::clone(&self);
            let (id, request_id) = (request.id.clone(), request.request_id.clone());
            let span = tracing::Span::current();
            move || {
                async move {
                    let _work_slot = work_slot;
                    shared.fetch(id, request_id).await
                }
                .instrument(span)
            }
        };
        let (fetched, role) = self.coalescer.run(request.id.clone(), call).await;
        let fetched = fetched.unwrap_or_else(|_| {
            tracing::error!("the upstream call for this run panicked");
            Fetched::Failed(GatewayError::Internal)
        });
        let mut response = match fetched {
            Fetched::Stored { entry, fresh } => {
                let outcome = if fresh {
                    CacheOutcome::Miss
                } else {
                    CacheOutcome::Hit
                };
                self.stored_response(&entry, outcome, &request)
            }
            Fetched::Passed(passed) => self.passed_response(&passed),
            Fetched::Failed(error) => error.into_response(Some(&request.request_id)),
        };
        if role == Role::Waiter {
            self.metrics.coalesced_requests.inc();
            response.body_mut().set_outcome(CacheOutcome::Coalesced);
        }
        response
    }

    /// The one upstream call for a run, run by the coalescer in a task of its own.
    async fn fetch(&self, id: RunId, request_id: HeaderValue) -> Fetched {
        if let Some(entry) = self.store.get(id.as_str()).await {
            return Fetched::Stored { entry, fresh: false };
        }
        match &self.shared {
            None => self.fetch_upstream(id, request_id).await,
            // Boxed: the Redis calls' state would otherwise make every call's task larger, and
            // a task's future is copied whole when it is spawned.
            Some(shared) => Box::pin(self.fetch_through_shared(shared, id, request_id)).await,
        }
    }

    /// With the Redis tier: another replica's copy, or its fetch to wait for, or our own.
    async fn fetch_through_shared(
        &self,
        shared: &SharedCache,
        id: RunId,
        request_id: HeaderValue,
    ) -> Fetched {
        if let Lookup::Hit(entry) = shared.get(&id, &self.settings.statuses).await {
            self.store.insert(id, entry.clone()).await;
            return Fetched::Stored { entry, fresh: false };
        }
        let lock = match shared.elect(&id).await {
            Election::Leader(lock) => Some(lock),
            Election::Follower => {
                if let Some(entry) = shared.wait_for(&id, &self.settings.statuses).await {
                    self.store.insert(id, entry.clone()).await;
                    return Fetched::Stored { entry, fresh: false };
                }
                None
            }
            Election::Unavailable => None,
        };
        let fetched = self.fetch_upstream(id.clone(), request_id).await;
        // In the background: the answer does not wait for Redis. The lock is released after the
        // write, so replicas waiting for this run find it rather than fetching it themselves.
        let written = match &fetched {
            Fetched::Stored { entry, fresh: true } => entry
                .run_status()
                .map(|status| (entry.clone(), self.settings.statuses.label(status).to_owned())),
            _ => None,
        };
        if written.is_some() || lock.is_some() {
            let shared = shared.clone();
            tokio::spawn(async move {
                if let Some((entry, status)) = written {
                    shared.put(&id, &entry, &status).await;
                }
                if let Some(lock) = lock {
                    shared.release(lock).await;
                }
            });
        }
        fetched
    }

    /// Within the budget, asks upstream and processes its answer.
    async fn fetch_upstream(&self, id: RunId, request_id: HeaderValue) -> Fetched {
        let admission = match self.budget.admit().await {
            Ok(admission) => admission,
            Err(refusal) => return Fetched::Failed(self.refused(refusal)),
        };
        let answer = self.upstream.fetch(&id, &request_id).await;
        drop(admission);
        match answer {
            Ok(answer) => {
                let upstream_ms = (answer.elapsed.as_secs_f64() * 10_000.0).round() / 10.0;
                tracing::Span::current().record("upstream_ms", upstream_ms);
                self.process(id, answer).await
            }
            // Logged by the upstream client, with the upstream's origin and the cause.
            Err(error) => Fetched::Failed(upstream_failure(error)),
        }
    }

    /// Maps an upstream answer to what clients get, storing it when it may be stored.
    async fn process(&self, id: RunId, answer: UpstreamResponse) -> Fetched {
        if answer.encoded {
            tracing::warn!(
                upstream_status = answer.status.as_u16(),
                "upstream sent an encoded (compressed) body the gateway did not ask for: not forwarded"
            );
            return Fetched::Failed(GatewayError::UpstreamBadResponse);
        }
        match answer.status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                tracing::error!(
                    upstream_status = answer.status.as_u16(),
                    "upstream refused the gateway's API key: check upstream.api_key_env / api_key_file"
                );
                return Fetched::Failed(GatewayError::UpstreamAuth);
            }
            StatusCode::TOO_MANY_REQUESTS => {
                let pause = answer
                    .retry_after
                    .as_ref()
                    .and_then(budget::parse_retry_after)
                    .unwrap_or(budget::DEFAULT_COOLDOWN);
                tracing::warn!(?pause, "upstream rate limit reached: holding upstream calls");
                self.budget.cool_down(pause);
            }
            status if status.is_informational() || status.is_redirection() => {
                tracing::warn!(upstream_status = status.as_u16(), "unexpected upstream status");
                return Fetched::Failed(GatewayError::UpstreamBadResponse);
            }
            _ => {}
        }
        let content_type = answer.content_type.unwrap_or(APPLICATION_JSON);
        let verdict = policy::decide(answer.status, &answer.body, &id, &self.settings.statuses);
        let fits = self.store.can_hold(&id, answer.body.len());
        let entry = match verdict.decision {
            Decision::Store(run_status) if fits => {
                CachedRun::terminal(&answer.body, content_type, run_status)
            }
            Decision::Pass(_)
                if fits
                    && answer.status == StatusCode::NOT_FOUND
                    && !self.settings.not_found_ttl.is_zero() =>
            {
                CachedRun::not_found(&answer.body, content_type)
            }
            decision => {
                let reason = match decision {
                    Decision::Pass(reason) => reason.as_str(),
                    Decision::Store(_) => "larger_than_cache",
                };
                tracing::debug!(reason, "not stored");
                let run_status = (answer.status == StatusCode::OK)
                    .then(|| verdict.status.unwrap_or_else(|| self.settings.statuses.other()));
                return Fetched::Passed(Arc::new(Passed {
                    status: answer.status,
                    content_type,
                    retry_after: answer.retry_after,
                    body: answer.body,
                    run_status,
                }));
            }
        };
        // Boxed: storing is the rare outcome, and moka's insert would otherwise make every
        // upstream call's future larger.
        if Box::pin(self.store.insert(id, entry.clone())).await {
            return Fetched::Stored { entry, fresh: true };
        }
        // The cache, full of runs asked for more often, declined it: nothing was stored.
        tracing::debug!(reason = "not_admitted", "not stored");
        Fetched::Passed(Arc::new(Passed {
            status: entry.status(),
            content_type: entry.content_type(),
            retry_after: None,
            body: entry.body(),
            run_status: entry.run_status(),
        }))
    }

    fn refused(&self, refusal: Refusal) -> GatewayError {
        match refusal {
            Refusal::Exhausted { retry_after } => {
                self.metrics.budget.refused(RefusalReason::Exhausted);
                tracing::warn!(?retry_after, "upstream budget spent: refusing");
                GatewayError::RateLimited {
                    retry_after_secs: budget::retry_after_secs(retry_after),
                }
            }
            Refusal::CoolingDown { retry_after } => {
                self.metrics.budget.refused(RefusalReason::Cooldown);
                GatewayError::UpstreamCoolingDown {
                    retry_after_secs: budget::retry_after_secs(retry_after),
                }
            }
        }
    }

    /// A stored answer, or 304 when the client already holds it.
    fn stored_response(
        &self,
        entry: &CachedRun,
        outcome: CacheOutcome,
        request: &RunRequest,
    ) -> Response<Body> {
        if let Some(run_status) = entry.run_status() {
            self.metrics.runs.served(run_status);
        }
        let etag = entry.etag();
        let not_modified = match (&etag, &request.if_none_match) {
            (Some(etag), Some(if_none_match)) => etag::none_match(if_none_match, etag),
            _ => false,
        };
        let (status, body) = if not_modified {
            (StatusCode::NOT_MODIFIED, Bytes::new())
        } else {
            (entry.status(), entry.body())
        };
        let cache_control = if entry.is_terminal() {
            self.terminal_cache_control.clone()
        } else {
            NO_STORE
        };
        let mut response = run_response(status, entry.content_type(), cache_control, outcome, body);
        if let Some(etag) = etag {
            response.headers_mut().insert(ETAG, etag);
        }
        if not_modified {
            // A 304 carries validators and caching headers, not representation metadata.
            response.headers_mut().remove(CONTENT_TYPE);
        }
        response
    }

    fn passed_response(&self, passed: &Passed) -> Response<Body> {
        if let Some(run_status) = passed.run_status {
            self.metrics.runs.served(run_status);
        }
        let mut response = run_response(
            passed.status,
            passed.content_type.clone(),
            NO_STORE,
            CacheOutcome::Pass,
            passed.body.clone(),
        );
        if let Some(retry_after) = &passed.retry_after {
            response.headers_mut().insert(RETRY_AFTER, retry_after.clone());
        }
        response
    }
}

fn upstream_failure(error: UpstreamError) -> GatewayError {
    match error {
        UpstreamError::Timeout => GatewayError::UpstreamTimeout,
        UpstreamError::Connect | UpstreamError::Broken => GatewayError::UpstreamUnavailable,
        UpstreamError::BodyTooLarge => GatewayError::UpstreamBodyTooLarge,
    }
}

//! The caching proxy: answers a [`RunRequest`] from memory, or from upstream and maybe stores it.
//!
//! The miss path, top to bottom:
//! 1. **hit**: the run is in memory; answered at once, nothing parsed;
//! 2. **join or lead** the one call for the run ([`Coalescer`]), holding one of the client
//!    connection's work slots (see [`crate::serve::connection`]); a call led keeps the slot until
//!    it ends, and runs in a task of its own so no client's disconnect cancels it; a call that
//!    started before the latest purge is not joined (it may bring back what was purged);
//! 3. **tiers**: memory once more, then Redis ([`Tiers::lookup`]);
//! 4. **fetch**: budget, upstream, status semantics ([`Fetcher::fetch`]): one typed answer;
//! 5. **decide**: may it be stored ([`Policy::decide`], including the 404 rule);
//! 6. **fill** the tiers ([`Tiers::fill`]), and only then let go of the run id;
//! 7. **render**: everyone who waited gets the same answer, as a response of its own.
//!
//! [`RunService::resolve`] is steps 2 to 6 on their own, for a caller that needs a run's current
//! answer without being a client request (a run's watcher, [`crate::watch`]); [`RunService::hit`],
//! [`RunService::answer`] and [`RunService::render`] are the other steps, for the held requests
//! built on them.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, ETAG, RETRY_AFTER, VARY};
use http::{HeaderValue, Response, StatusCode};
use tower::Service;
use tracing::Instrument;

use crate::cache::CacheOutcome;
use crate::cache::coalesce::{Coalescer, Role};
use crate::cache::purge::{Purged, Scope, Shared};
use crate::cache::tiers::{Lookup, Tiers};
use crate::cache::{CachedRun, Decision, Policy, etag, version};
use crate::edge::error::GatewayError;
use crate::edge::response::{APPLICATION_JSON, Body, NO_STORE, run_response, terminal_cache_control};
use crate::edge::routes::RunRequest;
use crate::ops::metrics::Metrics;
use crate::ops::trace_context::CallIds;
use crate::run::id::RunId;
use crate::run::status::{RunStatus, RunStatuses};
use crate::serve::connection::WorkSlot;
use crate::upstream::UpstreamResponse;
use crate::upstream::fetcher::Fetcher;

/// `Vary: Accept` on answers clients may keep.
const ACCEPT_VARIES: HeaderValue = HeaderValue::from_static("accept");

/// What the one call for a run produced, shared by everyone who waited for it.
#[derive(Clone)]
pub enum Answer {
    /// In the store now. `fresh` when this call stored it; otherwise a call that ended just
    /// before this one (or another replica) had.
    Cached { entry: CachedRun, fresh: bool },
    /// Upstream's answer, forwarded and not stored.
    Uncached(Arc<Uncached>),
    /// No answer to forward.
    Failed(GatewayError),
}

/// An upstream answer that is forwarded but not stored.
pub struct Uncached {
    pub response: UpstreamResponse,
    /// Set for 200 answers: the run's status, `other` when the body has none.
    pub run_status: Option<RunStatus>,
    /// Set for 200 answers: the run's version, computed once for everyone who waited: weak for a
    /// run still going ([`version::weak_etag`]), strong for one that ended.
    pub etag: Option<HeaderValue>,
}

/// The innermost service of the public stack. Cheap to clone: all state is shared.
#[derive(Clone)]
pub struct RunService {
    proxy: Arc<Proxy>,
}

struct Proxy {
    tiers: Tiers,
    fetcher: Fetcher,
    policy: Policy,
    coalescer: Coalescer<RunId, Answer>,
    metrics: Metrics,
    /// `cache-control` for terminal runs (from `cache.ttl`), formatted once.
    terminal_cache_control: HeaderValue,
    /// Tests only: the call for this run waits for the signal, then panics.
    #[cfg(test)]
    fault: std::sync::OnceLock<(RunId, Arc<tokio::sync::Notify>)>,
}

impl RunService {
    /// `ttl` is `cache.ttl`: how long terminal runs are kept, and the clients' `max-age`.
    pub fn new(tiers: Tiers, fetcher: Fetcher, policy: Policy, metrics: Metrics, ttl: Duration) -> Self {
        Self {
            proxy: Arc::new(Proxy {
                tiers,
                fetcher,
                policy,
                coalescer: Coalescer::new(metrics.coalesced_waiters.clone()),
                metrics,
                terminal_cache_control: terminal_cache_control(ttl),
                #[cfg(test)]
                fault: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Steps 2 to 6 of the miss path: joins the call for `id` in flight, or leads a new one
    /// (tiers, fetch, decide, fill). A call in flight that started before the latest purge is
    /// not joined: it may bring back the answer the purge dropped. `work` is a slot the led call
    /// keeps until it ends.
    pub async fn resolve(&self, id: RunId, ids: CallIds, work: Option<WorkSlot>) -> (Answer, Role) {
        let proxy = Arc::clone(&self.proxy);
        let span = tracing::Span::current();
        let call = {
            let (proxy, id) = (Arc::clone(&proxy), id.clone());
            move || {
                async move {
                    let _work = work;
                    proxy.call(id, ids).await
                }
                .instrument(span)
            }
        };
        let purges = proxy.tiers.purges_now();
        let (answer, role) = proxy.coalescer.run(id, purges, call).await;
        let answer = answer.unwrap_or_else(|_| {
            tracing::error!("the upstream call for this run panicked");
            Answer::Failed(GatewayError::Internal)
        });
        (answer, role)
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
        let service = self.clone();
        Box::pin(async move {
            if let Some(entry) = service.hit(&request.id).await {
                return Ok(service.render_hit(&entry, &request));
            }
            // Boxed so the (large) miss path's state does not make every hit's future larger.
            Ok(Box::pin(service.miss(request)).await)
        })
    }
}

impl RunService {
    async fn miss(self, request: RunRequest) -> Response<Body> {
        let (answer, role) = self.answer(&request).await;
        self.render(answer, role, &request)
    }

    /// Step 1: the run, when memory holds it.
    pub async fn hit(&self, id: &RunId) -> Option<CachedRun> {
        self.proxy.tiers.get(id.as_str()).await
    }

    /// Forgets a remembered 404 for `id`, so the next call asks upstream (a run event says the
    /// run exists).
    pub async fn forget_not_found(&self, id: &RunId) {
        self.proxy.tiers.forget_not_found(id).await;
    }

    /// Drops `id`'s stored answer in `scope` from the tiers (an operator's purge).
    pub async fn purge(&self, id: &RunId, scope: Scope) -> Purged {
        self.proxy.tiers.purge(id, scope).await
    }

    /// Deletes `id` from Redis once more, once the other replicas were told of its purge.
    pub async fn purge_shared_again(&self, id: &RunId) -> Option<Shared> {
        self.proxy.tiers.purge_shared_again(id).await
    }

    /// Drops `id`'s stored answer in `scope` from memory only (another replica purged it and
    /// Redis); whether memory held it.
    pub async fn purge_memory(&self, id: &RunId, scope: Scope) -> bool {
        self.proxy.tiers.purge_memory(id, scope).await
    }

    /// A hit, answered.
    pub fn render_hit(&self, entry: &CachedRun, request: &RunRequest) -> Response<Body> {
        self.proxy.render_cached(entry, CacheOutcome::Hit, request)
    }

    /// Steps 2 to 6 for a client request: its answer, and whether it led the call or joined one.
    pub async fn answer(&self, request: &RunRequest) -> (Answer, Role) {
        // One of the client connection's work slots: a call this request leads keeps it until the
        // call ends, even if the client resets the stream or goes away; joining another's call
        // gives it back at once.
        let work = match &request.work {
            Some(work) => Some(work.acquire().await),
            None => None,
        };
        self.resolve(request.id.clone(), request.ids.clone(), work).await
    }

    /// Step 7: `answer` as a response to `request` (304 when the client holds its version); a
    /// `Waiter`'s answer is marked as shared.
    pub fn render(&self, answer: Answer, role: Role, request: &RunRequest) -> Response<Body> {
        let mut response = self.proxy.render(answer, request);
        if role == Role::Waiter {
            self.proxy.metrics.coalesced_requests.inc();
            response.body_mut().set_outcome(CacheOutcome::Coalesced);
        }
        response
    }

    /// The configured run statuses: which of them mean a run has ended.
    pub fn statuses(&self) -> &RunStatuses {
        self.proxy.policy.statuses()
    }
}

impl Proxy {
    /// The one call for a run, run by the coalescer in a task of its own.
    async fn call(&self, id: RunId, ids: CallIds) -> Answer {
        #[cfg(test)]
        if let Some((faulty, signal)) = self.fault.get()
            && *faulty == id
        {
            signal.notified().await;
            panic!("injected fault");
        }
        let claim = match self.tiers.lookup(&id).await {
            Lookup::Found(entry) => return Answer::Cached { entry, fresh: false },
            Lookup::Missing(claim) => claim,
        };
        let mut response = match self.fetcher.fetch(&id, &ids).await {
            Ok(response) => response,
            Err(error) => {
                self.tiers.fill(&id, claim, None).await;
                return Answer::Failed(error);
            }
        };
        let (entry, run_status) = self.decide(&id, &response);
        // Always handed back, stored or not: it holds the run's Redis fetch lock.
        let stored = self.tiers.fill(&id, claim, entry.as_ref()).await;
        match entry {
            Some(entry) if stored => return Answer::Cached { entry, fresh: true },
            // Storable but not stored (larger than the cache, or declined by a full one): it is
            // forwarded as the run it is, without upstream's `Retry-After`.
            Some(_) => response.retry_after = None,
            None => {}
        }
        let etag = run_status.map(|status| self.version(status, &response.body));
        Answer::Uncached(Arc::new(Uncached {
            response,
            run_status,
            etag,
        }))
    }

    /// What to store of an upstream answer, if anything, and the run status it carries (for 200s:
    /// `other` when the body has none).
    fn decide(&self, id: &RunId, response: &UpstreamResponse) -> (Option<CachedRun>, Option<RunStatus>) {
        let verdict = self.policy.decide(response.status, &response.body, id);
        let content_type = || response.content_type.clone().unwrap_or(APPLICATION_JSON);
        let entry = match verdict.decision {
            Decision::Store(run_status) => {
                Some(CachedRun::terminal(&response.body, content_type(), run_status))
            }
            Decision::RememberNotFound => Some(CachedRun::not_found(&response.body, content_type())),
            Decision::Pass(reason) => {
                tracing::debug!(reason = reason.as_str(), "not stored");
                None
            }
        };
        let run_status = (response.status == StatusCode::OK)
            .then(|| verdict.status.unwrap_or_else(|| self.policy.statuses().other()));
        (entry, run_status)
    }

    fn render(&self, answer: Answer, request: &RunRequest) -> Response<Body> {
        match answer {
            Answer::Cached { entry, fresh } => {
                let outcome = if fresh {
                    CacheOutcome::Miss
                } else {
                    CacheOutcome::Hit
                };
                self.render_cached(&entry, outcome, request)
            }
            Answer::Uncached(uncached) => self.render_uncached(&uncached, request),
            Answer::Failed(error) => error.into_response(Some(&request.ids)),
        }
    }

    /// A stored answer, or 304 when the client already holds it.
    fn render_cached(
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
        if entry.is_terminal() {
            // Kept by browsers, and the same URL answers an event stream for `Accept:
            // text/event-stream`: a cache must not hand one for the other.
            response.headers_mut().insert(VARY, ACCEPT_VARIES);
        }
        if let Some(etag) = etag {
            response.headers_mut().insert(ETAG, etag);
        }
        if not_modified {
            // A 304 carries validators and caching headers, not representation metadata.
            response.headers_mut().remove(CONTENT_TYPE);
        }
        response
    }

    /// A run's version: strong for an ended run (the tag it gets when stored), weak for one still
    /// going (unchanged by a ticking `computedDurationMs`).
    fn version(&self, status: RunStatus, body: &[u8]) -> HeaderValue {
        if self.policy.statuses().is_terminal(status) {
            HeaderValue::from_bytes(&etag::strong_etag(body))
                .expect("hex digits in quotes make a valid header value")
        } else {
            version::weak_etag(body)
        }
    }

    /// An answer passed through, or 304 when the client already holds its version.
    fn render_uncached(&self, uncached: &Uncached, request: &RunRequest) -> Response<Body> {
        if let Some(run_status) = uncached.run_status {
            self.metrics.runs.served(run_status);
        }
        let upstream = &uncached.response;
        let not_modified = match (&uncached.etag, &request.if_none_match) {
            (Some(etag), Some(if_none_match)) => etag::names(if_none_match, etag),
            _ => false,
        };
        let (status, body) = if not_modified {
            (StatusCode::NOT_MODIFIED, Bytes::new())
        } else {
            (upstream.status, upstream.body.clone())
        };
        let mut response = run_response(
            status,
            upstream.content_type.clone().unwrap_or(APPLICATION_JSON),
            NO_STORE,
            CacheOutcome::Pass,
            body,
        );
        if let Some(etag) = &uncached.etag {
            response.headers_mut().insert(ETAG, etag.clone());
        }
        if let Some(retry_after) = &upstream.retry_after {
            response.headers_mut().insert(RETRY_AFTER, retry_after.clone());
        }
        if not_modified {
            response.headers_mut().remove(CONTENT_TYPE);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http::{Request, StatusCode};
    use http_body_util::{BodyExt, Empty};
    use tower::{Service, ServiceExt};

    use super::*;
    use crate::config::Config;
    use crate::upstream::credentials::ApiKey;
    use crate::{App, Secrets};

    /// The gateway's parts, with the call for `faulty` made to panic once `signal` fires.
    fn app_with_fault(faulty: &str, signal: &Arc<tokio::sync::Notify>) -> App {
        let mut config = Config::default();
        // Never called: the faulty run's call panics before it would fetch.
        config.upstream.base_url = "http://127.0.0.1:9".to_owned();
        let key = ApiKey::new("test-key").expect("key");
        let app = App::new(&config, &Secrets::key_only(key)).expect("app");
        let fault = (RunId::parse(faulty).expect("id"), Arc::clone(signal));
        assert!(app.runs.proxy.fault.set(fault).is_ok(), "set once");
        app
    }

    async fn get(
        service: impl Service<Request<Empty<Bytes>>, Response = Response<Body>, Error = Infallible>,
        id: &str,
    ) -> (StatusCode, serde_json::Value) {
        let request = Request::get(format!("/api/public/v1/workflow-runs/{id}"))
            .header(http::header::HOST, "gateway")
            .body(Empty::new())
            .expect("request");
        let response = service.oneshot(request).await.expect("infallible");
        let status = response.status();
        let body = response.into_body().collect().await.expect("body").to_bytes();
        (status, serde_json::from_slice(&body).expect("a JSON body"))
    }

    #[tokio::test]
    async fn a_panicking_call_is_a_500_internal_shared_by_everyone_waiting_on_it() {
        let signal = Arc::new(tokio::sync::Notify::new());
        let app = app_with_fault("run_boom", &signal);
        let requests: Vec<_> = (0..4)
            .map(|_| tokio::spawn(get(app.public_service::<Empty<Bytes>>(None, None), "run_boom")))
            .collect();
        // One leads the call; the other three wait on it.
        let waiters = async {
            while app.admin.metrics.coalesced_waiters.get() < 3 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), waiters)
            .await
            .expect("three requests wait on the leader's call");
        signal.notify_one();
        for request in requests {
            let (status, body) = request.await.expect("the request task");
            assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
            assert_eq!(body["error"]["code"], "INTERNAL", "{body}");
        }
        assert_eq!(
            app.admin.metrics.coalesced_requests.get(),
            3,
            "the waiters shared it"
        );
        assert_eq!(app.admin.metrics.coalesced_waiters.get(), 0);
    }
}

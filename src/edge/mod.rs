//! The client-facing edge: the public port's tower stack, written once, outermost layer first,
//! and what clients get back.
//!
//! [`access_log`] (request id, span, access log) → [`framing`] (a request with a body closes its
//! connection; HEAD answers carry none) → CORS → [`request_metrics`] → [`client_auth`] (optional)
//! → [`routes`] (validation into a [`routes::RunRequest`]) → [`crate::watch`] (held requests) →
//! [`crate::proxy`]. [`error`] and
//! [`response`] shape every answer a client gets.

pub mod access_log;
pub mod client_auth;
pub mod error;
pub mod framing;
pub mod request_metrics;
pub mod response;
pub mod routes;

use std::convert::Infallible;
use std::time::Duration;

use http::header::{AUTHORIZATION, ETAG, HeaderName, IF_NONE_MATCH, RETRY_AFTER};
use http::{HeaderValue, Method, Request, Response};
use tower::{Service, ServiceBuilder};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::edge::access_log::RequestLogLayer;
use crate::edge::client_auth::{ClientAuthLayer, ClientTokens};
use crate::edge::framing::FramingLayer;
use crate::edge::request_metrics::RecordMetricsLayer;
use crate::edge::request_metrics::RequestMetrics;
use crate::edge::response::{Body, X_CACHE, X_REQUEST_ID};
use crate::edge::routes::{LAST_EVENT_ID, RouteLayer};
use crate::ops::trace_context::{TRACEPARENT, TRACESTATE};
use crate::serve::connection::WorkSlots;
use crate::watch::wait::PREFER;
use crate::watch::{PREFERENCE_APPLIED, Watches};

/// How long browsers may reuse a preflight answer.
const CORS_MAX_AGE: Duration = Duration::from_secs(600);

/// Builds the request path for the public port, for one client connection (`work`: its upstream
/// work slots; `request_log`: spans, access log and the peer's address) or, with `None`, for
/// driving the stack without a server.
pub fn public_service<B>(
    request_log: RequestLogLayer,
    runs: Watches,
    metrics: RequestMetrics,
    cors: Option<CorsLayer>,
    client_tokens: Option<ClientTokens>,
    work: Option<WorkSlots>,
) -> impl Service<Request<B>, Response = Response<Body>, Error = Infallible, Future: Send + 'static>
+ Clone
+ Send
+ Sync
+ 'static
where
    B: Send + 'static,
{
    ServiceBuilder::new()
        // Request id, per-request span and the access log line; outermost so every response,
        // preflights and errors included, is logged and carries x-request-id.
        .layer(request_log)
        // A request that frames a body is answered with `Connection: close`, whoever answers it
        // (the body is never read); a HEAD answer is emptied, keeping its Content-Length.
        .layer(FramingLayer)
        // CORS headers and preflight answers, only when origins are configured.
        .option_layer(cors)
        // requests_total and request_duration_seconds, by cache outcome and status.
        .layer(RecordMetricsLayer::new(metrics))
        // Client tokens, when configured: a request without one is answered 401 here.
        .option_layer(client_tokens.map(ClientAuthLayer::new))
        // Method, path, sizes and run id: bad input is answered here and goes no further.
        .layer(RouteLayer::new(work))
        // Long-polls and event streams are held on the run's watcher; every other request goes
        // on to the proxy: cache lookup, then upstream, then the store decision.
        .service(runs)
}

/// CORS for browser frontends, or `None` when no origin is configured (no CORS headers at all).
pub fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow_origin = if origins.iter().any(|origin| origin == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|origin| HeaderValue::from_str(origin).ok()),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow_origin)
            .allow_methods([Method::GET, Method::HEAD])
            .allow_headers([
                X_REQUEST_ID,
                IF_NONE_MATCH,
                AUTHORIZATION,
                PREFER,
                LAST_EVENT_ID,
                TRACEPARENT,
                TRACESTATE,
            ])
            .expose_headers([
                X_CACHE,
                X_REQUEST_ID,
                ETAG,
                RETRY_AFTER,
                PREFERENCE_APPLIED,
                HeaderName::from_static("age"),
            ])
            .max_age(CORS_MAX_AGE),
    )
}

//! Building client responses: the header names the gateway adds, the cache outcome they report, and
//! the body type every response uses.
//!
//! Bodies are always complete in memory (`Full<Bytes>`): upstream bodies are bounded and had to be
//! read whole to decide whether to cache them, so streaming would buy nothing.

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;

/// The body of every response the gateway sends.
pub type Body = Full<Bytes>;

/// `x-cache`: how this response was produced (see [`CacheOutcome`]).
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
/// `x-request-id`: echoed from the client when sane, otherwise generated; also sent upstream.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub(crate) const APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");
pub(crate) const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");

/// How a response was produced. The same value names the `x-cache` header, the `cache` metric
/// label and the access log's `cache` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Served from memory; upstream was not contacted.
    Hit,
    /// Fetched from upstream and stored for later requests.
    Miss,
    /// Fetched from upstream and deliberately not stored (a run still going, an upstream error, …).
    Pass,
    /// Shared another request's upstream call; keeps that response's `x-cache` (MISS or PASS).
    Coalesced,
    /// The gateway answered with its own error (bad input, upstream unreachable, …).
    Error,
}

impl CacheOutcome {
    /// The `x-cache` value this outcome sets, if it sets one: gateway errors say what happened in
    /// their body, and coalesced answers keep the shared response's value.
    pub fn header_value(self) -> Option<HeaderValue> {
        match self {
            Self::Hit => Some(HeaderValue::from_static("HIT")),
            Self::Miss => Some(HeaderValue::from_static("MISS")),
            Self::Pass => Some(HeaderValue::from_static("PASS")),
            Self::Coalesced | Self::Error => None,
        }
    }

    /// Lower-case name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Pass => "pass",
            Self::Coalesced => "coalesced",
            Self::Error => "error",
        }
    }

    /// Position in per-outcome tables (declaration order).
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A run body with its content type, `x-cache` and `cache-control`; the outcome rides along as an
/// extension for the request log.
pub fn run_response(
    status: StatusCode,
    content_type: HeaderValue,
    cache_control: HeaderValue,
    outcome: CacheOutcome,
    body: Bytes,
) -> Response<Body> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, content_type);
    headers.insert(CACHE_CONTROL, cache_control);
    if let Some(value) = outcome.header_value() {
        headers.insert(X_CACHE, value);
    }
    response.extensions_mut().insert(outcome);
    response
}

/// A JSON body the gateway wrote itself (errors, probes): `application/json`, `no-store`.
pub fn json(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, APPLICATION_JSON);
    response.headers_mut().insert(CACHE_CONTROL, NO_STORE);
    response
}

/// `private, max-age=<ttl>, immutable`: a terminal run never changes, so a client may keep it as
/// long as the gateway does and need not revalidate it.
pub fn terminal_cache_control(ttl: std::time::Duration) -> HeaderValue {
    HeaderValue::from_str(&format!("private, max-age={}, immutable", ttl.as_secs()))
        .expect("digits and ASCII punctuation are a valid header value")
}

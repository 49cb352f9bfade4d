//! Building client responses: the header names the gateway adds, the cache outcome they report, and
//! the body type every response uses.
//!
//! Bodies are always complete in memory: upstream bodies are bounded and had to be read whole to
//! decide whether to cache them, so streaming would buy nothing. The body also carries the
//! response's [`CacheOutcome`], so the logging and metrics layers read it without a per-response
//! allocation (response extensions allocate a map on first insert).

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body::{Frame, SizeHint};

use crate::cache::CacheOutcome;

/// The body of every response the gateway sends: complete bytes, and how they were produced.
#[derive(Debug, Default)]
pub struct Body {
    data: Option<Bytes>,
    outcome: Option<CacheOutcome>,
}

impl Body {
    pub fn new(data: Bytes, outcome: Option<CacheOutcome>) -> Self {
        Self {
            data: (!data.is_empty()).then_some(data),
            outcome,
        }
    }

    /// How the response was produced; `None` for responses outside the runs path (CORS
    /// preflights, admin endpoints).
    pub fn outcome(&self) -> Option<CacheOutcome> {
        self.outcome
    }

    pub fn set_outcome(&mut self, outcome: CacheOutcome) {
        self.outcome = Some(outcome);
    }

    /// Takes the data out, leaving the body empty (its outcome stays): for `HEAD` answers.
    pub fn take_data(&mut self) -> Bytes {
        self.data.take().unwrap_or_default()
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.get_mut().data.take().map(|data| Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |data| data.len() as u64))
    }
}

/// `x-cache`: how this response was produced (see [`CacheOutcome`]).
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
/// `x-request-id`: echoed from the client when sane, otherwise generated; also sent upstream.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub const APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");
pub const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");

/// A run body with its content type, `x-cache` and `cache-control`; the outcome rides in the body.
pub fn run_response(
    status: StatusCode,
    content_type: HeaderValue,
    cache_control: HeaderValue,
    outcome: CacheOutcome,
    body: Bytes,
) -> Response<Body> {
    let mut response = Response::new(Body::new(body, Some(outcome)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, content_type);
    headers.insert(CACHE_CONTROL, cache_control);
    if let Some(value) = outcome.header_value() {
        headers.insert(X_CACHE, value);
    }
    response
}

/// A JSON body the gateway wrote itself (errors, probes): `application/json`, `no-store`.
pub fn json(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut response = Response::new(Body::new(body, None));
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

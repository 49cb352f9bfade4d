//! Building client responses: the header names the gateway adds, the cache outcome they report, and
//! the body type every response uses.
//!
//! Bodies are complete in memory, with one exception: upstream bodies are bounded and had to be
//! read whole to decide whether to cache them, so streaming them would buy nothing. The exception
//! is an event stream ([`crate::watch`]), whose frames are written as a run changes. The body also
//! carries the response's [`CacheOutcome`] and whether the client was held, so the logging and
//! metrics layers read them without a per-response allocation (response extensions allocate a
//! map on first insert).

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body::{Frame, SizeHint};

use crate::cache::CacheOutcome;

/// Frames written one after the other as they come (an event stream); ends when it returns `None`.
pub type FrameStream = Pin<Box<dyn Stream<Item = Bytes> + Send>>;

/// The body of every response the gateway sends: complete bytes or a stream of frames, and how
/// they were produced.
#[derive(Default)]
pub struct Body {
    data: Option<Bytes>,
    stream: Option<FrameStream>,
    outcome: Option<CacheOutcome>,
    held: bool,
    /// The gateway's error code, when it answered with an error of its own.
    error: Option<&'static str>,
}

impl std::fmt::Debug for Body {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Body")
            .field("data", &self.data)
            .field("stream", &self.stream.is_some())
            .field("outcome", &self.outcome)
            .field("held", &self.held)
            .field("error", &self.error)
            .finish()
    }
}

impl Body {
    pub fn new(data: Bytes, outcome: Option<CacheOutcome>) -> Self {
        Self {
            data: (!data.is_empty()).then_some(data),
            stream: None,
            outcome,
            held: false,
            error: None,
        }
    }

    /// A body written frame by frame as `stream` yields them.
    pub fn streaming(stream: FrameStream, outcome: CacheOutcome) -> Self {
        Self {
            data: None,
            stream: Some(stream),
            outcome: Some(outcome),
            held: false,
            error: None,
        }
    }

    /// Whether the body is written frame by frame (an event stream).
    pub fn is_stream(&self) -> bool {
        self.stream.is_some()
    }

    /// The gateway's error code (`UPSTREAM_TIMEOUT`, …) when the answer is an error of its own.
    pub fn error(&self) -> Option<&'static str> {
        self.error
    }

    pub fn set_error(&mut self, code: &'static str) {
        self.error = Some(code);
    }

    /// Whether the answer waited for a run to change (a held long-poll): its latency is the
    /// client's wait, not the gateway's work.
    pub fn held(&self) -> bool {
        self.held
    }

    pub fn set_held(&mut self) {
        self.held = true;
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
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(data) = this.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        let Some(stream) = &mut this.stream else {
            return Poll::Ready(None);
        };
        let next = std::task::ready!(stream.as_mut().poll_next(cx));
        if next.is_none() {
            this.stream = None;
        }
        Poll::Ready(next.map(|data| Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.stream.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        if self.stream.is_some() {
            return SizeHint::default();
        }
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

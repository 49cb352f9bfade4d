//! The outermost layer: the request id, the per-request span, and the one log line per request.
//!
//! It runs first so that everything below (routing, cache, upstream) logs inside the request's
//! span and every response, errors included, carries `x-request-id`. A client's `x-request-id` is
//! kept when it is 1–128 characters of `[A-Za-z0-9._:-]`; anything else is replaced by a fresh
//! UUID, so a hostile id can neither forge log structure nor flood the logs. The id is written back
//! into the request headers, where inner layers read it and the upstream request copies it.
//!
//! The span carries `request_id`, `method` (its first 32 bytes) and `path` (its first 256 bytes;
//! for either, its length when it is longer); `run_id` (routing), `upstream_ms` (the
//! proxy) and `cache` (the outcome, at the end) are filled in as they become known, so every event
//! logged while serving the request carries them. The access line itself is at INFO on target
//! `plextera_gateway::access`, so `RUST_LOG` can silence or keep it alone.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tracing::{Instrument, Span, instrument::Instrumented};

use crate::cache::CacheOutcome;
use crate::edge::response::{Body, X_REQUEST_ID};

/// Longest client-supplied request id that is kept.
const MAX_REQUEST_ID_LEN: usize = 128;
/// Most bytes of a request's path written to the log; the rest is summarised by its length.
const MAX_LOGGED_PATH: usize = 256;
/// Most bytes of a request's method written to the log (an extension method may be long).
const MAX_LOGGED_METHOD: usize = 32;

/// Adds [`RequestLog`] around a service.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestLogLayer;

impl<S> Layer<S> for RequestLogLayer {
    type Service = RequestLog<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestLog { inner }
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct RequestLog<S> {
    inner: S,
}

impl<S, ReqBody> Service<Request<ReqBody>> for RequestLog<S>
where
    S: Service<Request<ReqBody>, Response = Response<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = RequestLogFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let request_id = request
            .headers()
            .get(X_REQUEST_ID)
            .filter(|value| is_sane_request_id(value))
            .cloned()
            .unwrap_or_else(new_request_id);
        request.headers_mut().insert(X_REQUEST_ID, request_id.clone());
        let span = tracing::info_span!(
            "request",
            request_id = request_id.to_str().unwrap_or_default(),
            method = %Bounded(request.method().as_str(), MAX_LOGGED_METHOD),
            path = %Bounded(request.uri().path(), MAX_LOGGED_PATH),
            run_id = tracing::field::Empty,
            cache = tracing::field::Empty,
            upstream_ms = tracing::field::Empty,
        );
        // Call inside the span so what the inner layers record (e.g. the run id) lands in it.
        let inner = span.in_scope(|| self.inner.call(request));
        RequestLogFuture {
            inner: inner.instrument(span),
            request_id: Some(request_id),
            started: Instant::now(),
        }
    }
}

pin_project! {
    /// Logs the outcome and adds `x-request-id` once the inner response is ready.
    pub struct RequestLogFuture<F> {
        #[pin]
        inner: Instrumented<F>,
        request_id: Option<HeaderValue>,
        started: Instant,
    }
}

impl<F, E> Future for RequestLogFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let mut result = ready!(this.inner.as_mut().poll(cx));
        if let Ok(response) = &mut result {
            let span: &Span = this.inner.span();
            let _entered = span.enter();
            let cache = response.body().outcome().map_or("none", CacheOutcome::as_str);
            span.record("cache", cache);
            tracing::info!(
                target: "plextera_gateway::access",
                status = response.status().as_u16(),
                duration_us = u64::try_from(this.started.elapsed().as_micros()).unwrap_or(u64::MAX),
                "served"
            );
            if let Some(request_id) = this.request_id.take() {
                response.headers_mut().insert(X_REQUEST_ID, request_id);
            }
        }
        Poll::Ready(result)
    }
}

/// A client's string as logged: whole up to a bound, else its start and its length, so a client
/// cannot make one log line as long as its request head.
struct Bounded<'a>(&'a str, usize);

impl std::fmt::Display for Bounded<'_> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self(text, bound) = *self;
        if text.len() <= bound {
            return formatter.write_str(text);
        }
        // Paths and methods are ASCII (hyper refuses anything else); cutting at a character
        // boundary keeps it safe regardless.
        let cut = (0..=bound)
            .rev()
            .find(|&at| text.is_char_boundary(at))
            .unwrap_or(0);
        let start = text.get(..cut).unwrap_or_default();
        write!(formatter, "{start}… ({} bytes)", text.len())
    }
}

fn is_sane_request_id(value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_REQUEST_ID_LEN
        && bytes
            .iter()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b':'))
}

/// A random UUID. Its bytes are allocated once, shared: the id is cloned into the request, the
/// response and the upstream call.
fn new_request_id() -> HeaderValue {
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
    HeaderValue::from_maybe_shared(Bytes::from_owner(text))
        .expect("a hyphenated UUID is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sane_ids_are_kept_and_others_refused() {
        for id in ["abc", "0f8a-11:22.x_y", &"a".repeat(MAX_REQUEST_ID_LEN)] {
            assert!(
                is_sane_request_id(&HeaderValue::from_str(id).expect("header")),
                "{id}"
            );
        }
        for id in [
            "",
            "a b",
            "a\"b",
            "{\"x\":1}",
            &"a".repeat(MAX_REQUEST_ID_LEN + 1),
        ] {
            assert!(
                !is_sane_request_id(&HeaderValue::from_str(id).expect("header")),
                "{id}"
            );
        }
    }

    #[test]
    fn long_paths_are_logged_by_their_start_and_length() {
        let short = "/api/public/v1/workflow-runs/run_1";
        assert_eq!(Bounded(short, MAX_LOGGED_PATH).to_string(), short);
        assert_eq!(Bounded("é".repeat(3).as_str(), 3).to_string(), "é… (6 bytes)");
        let long = format!("/{}", "a".repeat(20_000));
        let logged = Bounded(&long, MAX_LOGGED_PATH).to_string();
        assert!(logged.len() < MAX_LOGGED_PATH + 32, "{} bytes", logged.len());
        assert!(logged.starts_with(&long[..MAX_LOGGED_PATH]));
        assert!(logged.ends_with("(20001 bytes)"), "{logged}");
    }

    #[test]
    fn generated_ids_are_unique_uuids() {
        let first = new_request_id();
        let second = new_request_id();
        assert_ne!(first, second);
        assert_eq!(first.len(), 36);
        assert!(is_sane_request_id(&first));
    }
}

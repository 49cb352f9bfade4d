//! Routing and request validation: turns an HTTP request into a [`RunRequest`] or a 4xx.
//!
//! This is the edge where strings become types. Whatever passes is a GET or HEAD for one
//! validated [`RunId`], with what the client asks of a hold ([`crate::watch::wait`]); the rest of
//! the query string is dropped here (Get-run takes none, and a client must not be able to spend
//! the rate limit by appending `?x=1`, `?x=2`, …). Nothing refused here ever
//! reaches the cache or upstream. Limits on URI and header size are set below hyper's own, so an
//! oversized request still gets the JSON error shape. Checks run from the most general to the
//! most specific: size (414, 431), Host (400), path (404), method (405), body (400), run id (400),
//! wait (400). A request
//! that frames a body (any `Transfer-Encoding`, or a non-zero `Content-Length`) is never served:
//! Get-run takes none, and framing is how request smuggling starts (its connection is closed by
//! [`crate::edge::framing`], whoever answers it).

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use http::header::HeaderName;
use http::header::{CONTENT_LENGTH, HOST, IF_NONE_MATCH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue, Method, Request, Response, Version};
use tower::{Layer, Service};

use crate::edge::error::{Allowed, GatewayError};
use crate::edge::response::Body;
use crate::ops::trace_context::CallIds;
use crate::run::id::RunId;
use crate::serve::connection::WorkSlots;
use crate::watch::wait::{self, WaitAsk};

/// The runs path prefix, as a literal so the route template below is built from it.
macro_rules! runs_path {
    () => {
        "/api/public/v1/workflow-runs/"
    };
}

/// The only path prefix served on the public port.
pub const RUNS_PATH: &str = runs_path!();
/// The runs path's route template, as spans and access logs name it (OpenTelemetry's
/// `http.route`).
pub const RUNS_ROUTE: &str = concat!(runs_path!(), "{runId}");
/// Longest request target accepted (path and query), in bytes.
pub const MAX_URI_LEN: usize = 2048;
/// Largest header block accepted (names plus values), in bytes.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// A valid request for one run.
#[derive(Debug, Clone)]
pub struct RunRequest {
    pub id: RunId,
    /// The request id and span set by the request-log layer; sent upstream and in error bodies.
    pub ids: CallIds,
    /// The client's `If-None-Match`, answered with 304 when it names the stored run's ETag.
    pub if_none_match: Option<HeaderValue>,
    /// How long the client asked to be held for a change (before the cap), if it asked.
    pub wait: Option<WaitAsk>,
    /// A GET asking for an event stream (`Accept: text/event-stream`).
    pub stream: bool,
    /// The client's `Last-Event-ID`: the version an event stream resumes from.
    pub last_event_id: Option<HeaderValue>,
    /// The client connection's upstream work slots; `None` outside a server (benches).
    pub work: Option<WorkSlots>,
}

/// Adds [`Route`] in front of a `Service<RunRequest>`.
#[derive(Debug, Clone, Default)]
pub struct RouteLayer {
    work: Option<WorkSlots>,
}

impl RouteLayer {
    /// `work`: the slots of the connection this stack serves, handed to every request.
    pub fn new(work: Option<WorkSlots>) -> Self {
        Self { work }
    }
}

impl<S> Layer<S> for RouteLayer {
    type Service = Route<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Route {
            inner,
            work: self.work.clone(),
        }
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct Route<S> {
    inner: S,
    work: Option<WorkSlots>,
}

impl<S, B> Service<Request<B>> for Route<S>
where
    S: Service<RunRequest, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response<Body>, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let ids = request.extensions().get::<CallIds>().cloned();
        match route(&request) {
            Ok((id, wait)) => {
                tracing::Span::current().record("run_id", id.as_str());
                // Outside the request-log layer (benches), ids of its own.
                let ids = ids.unwrap_or_else(|| CallIds::own("request"));
                let headers = request.headers();
                let stream = request.method() == Method::GET && wait::wants_event_stream(headers);
                Either::Right(self.inner.call(RunRequest {
                    id,
                    ids,
                    if_none_match: list(headers, &IF_NONE_MATCH),
                    wait,
                    stream,
                    last_event_id: stream.then(|| headers.get(LAST_EVENT_ID).cloned()).flatten(),
                    work: self.work.clone(),
                }))
            }
            Err(error) => Either::Left(ready(Ok(error.into_response(ids.as_ref())))),
        }
    }
}

/// `Last-Event-ID`: the id of the last event a reconnecting event stream received.
pub const LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");

/// Validates size, path, method, body framing, run id and wait, in that order.
pub fn route<B>(request: &Request<B>) -> Result<(RunId, Option<WaitAsk>), GatewayError> {
    let target_len = request
        .uri()
        .path_and_query()
        .map_or(0, |target| target.as_str().len());
    if target_len > MAX_URI_LEN {
        return Err(GatewayError::UriTooLong);
    }
    if header_bytes(request.headers()) > MAX_HEADER_BYTES {
        return Err(GatewayError::HeadersTooLarge);
    }
    // RFC 9112 §3.2: an HTTP/1.1 request has exactly one Host (HTTP/2 names it in :authority).
    if request.version() == Version::HTTP_11 && request.headers().get_all(HOST).iter().count() != 1 {
        return Err(GatewayError::BadHost);
    }
    let raw_id = request
        .uri()
        .path()
        .strip_prefix(RUNS_PATH)
        .filter(|rest| !rest.contains('/'))
        .ok_or(GatewayError::NotFound)?;
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return Err(GatewayError::MethodNotAllowed {
            allowed: Allowed::Read,
        });
    }
    if has_body_framing(request.headers()) {
        return Err(GatewayError::BodyNotAllowed);
    }
    let id = RunId::parse(raw_id).map_err(|_| GatewayError::InvalidRunId)?;
    let wait =
        wait::wait_ask(request.uri().query(), request.headers()).map_err(|_| GatewayError::InvalidWait)?;
    Ok((id, wait))
}

/// A list-valued header as one value: its lines joined with `, ` (RFC 9110 §5.3), or the one line
/// as it is (no copy in the usual case).
fn list(headers: &HeaderMap, name: &HeaderName) -> Option<HeaderValue> {
    let mut lines = headers.get_all(name).iter();
    let first = lines.next()?;
    let Some(second) = lines.next() else {
        return Some(first.clone());
    };
    let mut joined = first.as_bytes().to_vec();
    for line in std::iter::once(second).chain(lines) {
        joined.extend_from_slice(b", ");
        joined.extend_from_slice(line.as_bytes());
    }
    HeaderValue::from_bytes(&joined).ok()
}

/// GET and HEAD carry no body here, so any framing header is either a mistake or an attempt to
/// make this server and one in front of it disagree on where the next request starts.
pub fn has_body_framing(headers: &HeaderMap) -> bool {
    headers.contains_key(TRANSFER_ENCODING)
        || headers
            .get_all(CONTENT_LENGTH)
            .iter()
            .any(|length| length.as_bytes() != b"0")
}

fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, target: &str) -> Request<()> {
        Request::builder()
            .method(method)
            .uri(target)
            .header(HOST, "gateway")
            .body(())
            .expect("valid request")
    }

    #[test]
    fn an_http11_request_needs_exactly_one_host() {
        let target = "/api/public/v1/workflow-runs/a";
        let mut without = request(Method::GET, target);
        without.headers_mut().remove(HOST);
        assert_eq!(route(&without).err(), Some(GatewayError::BadHost));
        let mut twice = request(Method::GET, target);
        twice
            .headers_mut()
            .append(HOST, HeaderValue::from_static("elsewhere"));
        assert_eq!(route(&twice).err(), Some(GatewayError::BadHost));
        // HTTP/1.0 had no Host; HTTP/2 carries it as :authority.
        for version in [Version::HTTP_10, Version::HTTP_2] {
            let mut other = request(Method::GET, target);
            other.headers_mut().remove(HOST);
            *other.version_mut() = version;
            assert!(route(&other).is_ok(), "{version:?}");
        }
    }

    #[test]
    fn runs_path_yields_the_id_without_the_query() {
        let (id, wait) =
            route(&request(Method::GET, "/api/public/v1/workflow-runs/run_1?x=1")).expect("routed");
        assert_eq!((id.as_str(), wait), ("run_1", None));
        let (id, _) = route(&request(Method::HEAD, "/api/public/v1/workflow-runs/run_1")).expect("routed");
        assert_eq!(id.as_str(), "run_1");
        let (_, wait) = route(&request(
            Method::GET,
            "/api/public/v1/workflow-runs/run_1?wait=2m",
        ))
        .expect("routed");
        assert_eq!(
            wait.map(|ask| ask.wait),
            Some(std::time::Duration::from_secs(120))
        );
        assert_eq!(
            route(&request(
                Method::GET,
                "/api/public/v1/workflow-runs/run_1?wait=-1"
            ))
            .err(),
            Some(GatewayError::InvalidWait)
        );
    }

    #[test]
    fn if_none_match_lines_make_one_list() {
        let mut headers = HeaderMap::new();
        assert_eq!(list(&headers, &IF_NONE_MATCH), None);
        headers.append(IF_NONE_MATCH, HeaderValue::from_static("W/\"a\""));
        assert_eq!(
            list(&headers, &IF_NONE_MATCH),
            Some(HeaderValue::from_static("W/\"a\""))
        );
        headers.append(IF_NONE_MATCH, HeaderValue::from_static("\"b\", \"c\""));
        assert_eq!(
            list(&headers, &IF_NONE_MATCH),
            Some(HeaderValue::from_static("W/\"a\", \"b\", \"c\""))
        );
    }

    #[test]
    fn other_paths_are_not_found() {
        for target in [
            "/",
            "/metrics",
            "/healthz",
            "/api/public/v1/workflow-runs",
            "/api/public/v1/workflow-runs/a/b",
            "/api/public/v1/workflow-runs/a/",
            "//api/public/v1/workflow-runs/a",
            "/api/public/v1/../v1/workflow-runs/a",
            "/api/public/v1/workflow-runs/../../admin",
            "/API/public/v1/workflow-runs/a",
        ] {
            assert_eq!(
                route(&request(Method::GET, target)).err(),
                Some(GatewayError::NotFound),
                "{target}"
            );
        }
    }

    #[test]
    fn other_methods_are_refused() {
        for method in [
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::PATCH,
            Method::OPTIONS,
        ] {
            assert_eq!(
                route(&request(method.clone(), "/api/public/v1/workflow-runs/a")).err(),
                Some(GatewayError::MethodNotAllowed {
                    allowed: Allowed::Read
                }),
                "{method}"
            );
        }
    }

    #[test]
    fn bad_ids_are_invalid() {
        for target in [
            "/api/public/v1/workflow-runs/",
            "/api/public/v1/workflow-runs/..",
            "/api/public/v1/workflow-runs/%2e%2e%2fadmin",
            "/api/public/v1/workflow-runs/a%00",
            "/api/public/v1/workflow-runs/r%D0%B0n",
        ] {
            assert_eq!(
                route(&request(Method::GET, target)).err(),
                Some(GatewayError::InvalidRunId),
                "{target}"
            );
        }
    }

    #[test]
    fn body_framing_is_refused() {
        for (name, value) in [("transfer-encoding", "chunked"), ("content-length", "4")] {
            let mut with_body = request(Method::GET, "/api/public/v1/workflow-runs/a");
            with_body.headers_mut().insert(
                http::HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
            assert_eq!(
                route(&with_body).err(),
                Some(GatewayError::BodyNotAllowed),
                "{name}"
            );
        }
        let mut post = request(Method::POST, "/api/public/v1/workflow-runs/a");
        post.headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from_static("4"));
        assert_eq!(
            route(&post).err(),
            Some(GatewayError::MethodNotAllowed {
                allowed: Allowed::Read
            }),
            "a method that is not allowed is 405 whatever its body"
        );
        let mut empty = request(Method::GET, "/api/public/v1/workflow-runs/a");
        empty
            .headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from_static("0"));
        assert!(route(&empty).is_ok(), "Content-Length: 0 is no body");
    }

    #[test]
    fn oversized_requests_are_refused() {
        let long = format!("/api/public/v1/workflow-runs/a?{}", "x".repeat(MAX_URI_LEN));
        assert_eq!(
            route(&request(Method::GET, &long)).err(),
            Some(GatewayError::UriTooLong)
        );

        let mut big = request(Method::GET, "/api/public/v1/workflow-runs/a");
        for index in 0..20 {
            let value = HeaderValue::from_str(&"v".repeat(1000)).expect("header");
            big.headers_mut().insert(
                http::HeaderName::from_bytes(format!("x-filler-{index}").as_bytes()).expect("name"),
                value,
            );
        }
        assert_eq!(route(&big).err(), Some(GatewayError::HeadersTooLarge));
    }
}

//! The outermost layer: the request id, the trace context, the per-request span, and the one log
//! line per request.
//!
//! It runs first so that everything below (routing, cache, upstream) logs inside the request's
//! span and every response, errors included, carries `x-request-id`. A client's `x-request-id` is
//! kept when it is 1–128 characters of `[A-Za-z0-9._:-]`; anything else is replaced by a fresh
//! UUID, so a hostile id can neither forge log structure nor flood the logs. The id is written back
//! into the request headers, where inner layers read it and the upstream request copies it.
//!
//! The request's server span ([`crate::ops::spans`]) continues the client's `traceparent` when it
//! is valid, or starts a trace; its ids ride in the request's extensions ([`CallIds`]) to the error
//! bodies (`traceId`) and the upstream call (`traceparent`).
//!
//! The tracing span carries `request_id`, `trace_id`, `span_id`, `http.request.method` (its first
//! 32 bytes) and `url.path` (its first 256 bytes; for either, when longer, its start, `…` and its
//! length); `run_id` (routing), `plextera.upstream.duration` (seconds, the proxy) and
//! `plextera.cache` (the outcome, at the end) are filled in as they become known, so every event
//! logged while serving the request carries them. The access line itself is at INFO on target
//! `plextera_gateway::access`, named after OpenTelemetry's HTTP semantic conventions:
//! `http.response.status_code`, `http.server.request.duration` (seconds, to the response head),
//! `http.response.body.size` (when known: not for event streams), `error.type` (the gateway's
//! error code), `client.address`, `client.port`, `network.protocol.version` and
//! `user_agent.original` (bounded like the path). `[telemetry] access_log` chooses which requests
//! get a line ([`AccessLog`]); `RUST_LOG` can silence the target or keep it alone.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::USER_AGENT;
use http::{HeaderValue, Request, Response, Version};
use pin_project_lite::pin_project;
use tower::{Layer, Service};
use tracing::{Instrument, Span, instrument::Instrumented};

use crate::cache::CacheOutcome;
use crate::config::{AccessLogMode, TelemetryConfig};
use crate::edge::response::{Body, X_REQUEST_ID};
use crate::edge::routes::{RUNS_PATH, RUNS_ROUTE};
use crate::ops::spans::{ServerEnd, ServerSpan, ServerStart, Spans};
use crate::ops::trace_context::{CallIds, RemoteParent};

/// Longest client-supplied request id that is kept.
const MAX_REQUEST_ID_LEN: usize = 128;
/// Most bytes of a request's path written to the log; the rest is summarised by its length.
const MAX_LOGGED_PATH: usize = 256;
/// Most bytes of a request's method written to the log (an extension method may be long).
const MAX_LOGGED_METHOD: usize = 32;
/// Most bytes of a client's `User-Agent` written to the log.
const MAX_LOGGED_USER_AGENT: usize = 256;

/// Which requests get an access log line (`[telemetry] access_log`, `slow_request_threshold`).
#[derive(Debug, Clone, Copy)]
pub struct AccessLog {
    pub mode: AccessLogMode,
    pub slow: Duration,
}

impl Default for AccessLog {
    fn default() -> Self {
        Self::new(&TelemetryConfig::default())
    }
}

impl AccessLog {
    pub fn new(config: &TelemetryConfig) -> Self {
        Self {
            mode: config.access_log,
            slow: config.slow_request_threshold,
        }
    }

    /// Whether a request gets a line: always (`all`), never (`off`), or (`errors_or_slow`) when it
    /// is an error (status 5xx or 429, or an error code of the gateway's own) or took `slow` or
    /// longer to answer; a held long-poll or an event stream is never slow (its time is the
    /// client's wait).
    fn wants(&self, status: u16, error: Option<&str>, waited: bool, took: Duration) -> bool {
        match self.mode {
            AccessLogMode::All => true,
            AccessLogMode::Off => false,
            AccessLogMode::ErrorsOrSlow => {
                status >= 500 || status == 429 || error.is_some() || (!waited && took >= self.slow)
            }
        }
    }
}

/// Adds [`RequestLog`] around a service.
#[derive(Debug, Clone, Default)]
pub struct RequestLogLayer {
    spans: Spans,
    access_log: AccessLog,
    /// The client connection's peer address.
    peer: Option<SocketAddr>,
}

impl RequestLogLayer {
    pub fn new(spans: Spans, access_log: AccessLog, peer: Option<SocketAddr>) -> Self {
        Self {
            spans,
            access_log,
            peer,
        }
    }
}

impl<S> Layer<S> for RequestLogLayer {
    type Service = RequestLog<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestLog {
            inner,
            settings: self.clone(),
        }
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct RequestLog<S> {
    inner: S,
    settings: RequestLogLayer,
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
        let started = Instant::now();
        let request_id = request
            .headers()
            .get(X_REQUEST_ID)
            .filter(|value| is_sane_request_id(value))
            .cloned()
            .unwrap_or_else(new_request_id);
        request.headers_mut().insert(X_REQUEST_ID, request_id.clone());
        let method = Bounded(request.method().as_str(), MAX_LOGGED_METHOD);
        let path = Bounded(request.uri().path(), MAX_LOGGED_PATH);
        let protocol = protocol_version(request.version());
        let parent = RemoteParent::from_headers(request.headers());
        let server = self.settings.spans.server(
            parent.as_ref(),
            &ServerStart {
                method: &method,
                route: is_runs_path(request.uri().path()).then_some(RUNS_ROUTE),
                path: &path,
                protocol,
                client: self.settings.peer,
            },
        );
        let span = tracing::info_span!(
            "request",
            request_id = request_id.to_str().unwrap_or_default(),
            trace_id = %server.context.trace_id,
            span_id = %server.context.span_id,
            "http.request.method" = method.text().as_ref(),
            "url.path" = path.text().as_ref(),
            run_id = tracing::field::Empty,
            "plextera.cache" = tracing::field::Empty,
            "plextera.upstream.duration" = tracing::field::Empty,
        );
        request.extensions_mut().insert(CallIds {
            request_id: request_id.clone(),
            span: Some(server.context.clone()),
        });
        let user_agent = request.headers().get(USER_AGENT).cloned();
        // Call inside the span so what the inner layers record (e.g. the run id) lands in it.
        let inner = span.in_scope(|| self.inner.call(request));
        RequestLogFuture {
            inner: inner.instrument(span),
            finish: Some(Finish {
                request_id,
                server,
                user_agent,
                protocol,
                peer: self.settings.peer,
                access_log: self.settings.access_log,
            }),
            started,
        }
    }
}

/// What the access line and the span's end need once the response is ready.
struct Finish {
    request_id: HeaderValue,
    server: ServerSpan,
    user_agent: Option<HeaderValue>,
    protocol: &'static str,
    peer: Option<SocketAddr>,
    access_log: AccessLog,
}

pin_project! {
    /// Logs the outcome, ends the span and adds `x-request-id` once the inner response is ready.
    pub struct RequestLogFuture<F> {
        #[pin]
        inner: Instrumented<F>,
        finish: Option<Finish>,
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
        if let (Ok(response), Some(finish)) = (&mut result, this.finish.take()) {
            let took = this.started.elapsed();
            let span: &Span = this.inner.span();
            let _entered = span.enter();
            let body = response.body();
            let cache = body.outcome().map_or("none", CacheOutcome::as_str);
            let status = response.status().as_u16();
            let error = body.error();
            span.record("plextera.cache", cache);
            let waited = body.held() || body.is_stream();
            if finish.access_log.wants(status, error, waited, took) {
                let size = http_body::Body::size_hint(body).exact();
                let user_agent = finish
                    .user_agent
                    .as_ref()
                    .map(|agent| String::from_utf8_lossy(agent.as_bytes()));
                tracing::event!(
                    target: "plextera_gateway::access",
                    tracing::Level::INFO,
                    "http.response.status_code" = status,
                    "http.server.request.duration" = took.as_secs_f64(),
                    "http.response.body.size" = size,
                    "error.type" = error,
                    "client.address" = finish.peer.map(|peer| tracing::field::display(peer.ip())),
                    "client.port" = finish.peer.map(|peer| peer.port()),
                    "network.protocol.version" = finish.protocol,
                    "user_agent.original" = user_agent
                        .as_deref()
                        .map(|agent| Bounded(agent, MAX_LOGGED_USER_AGENT).text())
                        .as_deref(),
                    "served"
                );
            }
            finish.server.end(&ServerEnd { status, cache, error });
            response.headers_mut().insert(X_REQUEST_ID, finish.request_id);
        }
        Poll::Ready(result)
    }
}

/// `network.protocol.version`: `1.1`, `2`, …
fn protocol_version(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_11 => "1.1",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "other",
    }
}

/// Whether `path` names a run (valid or not, it is the runs route).
fn is_runs_path(path: &str) -> bool {
    path.strip_prefix(RUNS_PATH)
        .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'))
}

/// A client's string as logged: whole up to a bound, else its start and its length, so a client
/// cannot make one log line as long as its request head.
#[derive(Clone, Copy)]
struct Bounded<'a>(&'a str, usize);

impl<'a> Bounded<'a> {
    /// As a string field (copied only when over the bound): the text log format then quotes and
    /// escapes it, so a client's `"` or `key=value` cannot forge fields of the line, and JSON
    /// writes it as a string.
    fn text(self) -> std::borrow::Cow<'a, str> {
        let Self(text, bound) = self;
        if text.len() <= bound {
            std::borrow::Cow::Borrowed(text)
        } else {
            std::borrow::Cow::Owned(self.to_string())
        }
    }
}

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

    /// A `MakeWriter` into a shared buffer, for reading what the text format wrote.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buffer").extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_clients_quotes_and_key_value_pairs_cannot_forge_fields_of_a_text_line() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let _default = tracing::subscriber::set_default(subscriber);
        let inner = tower::service_fn(|_request: Request<()>| async {
            Ok::<_, std::convert::Infallible>(Response::new(Body::new(Bytes::from_static(b"{}"), None)))
        });
        let mut service = RequestLogLayer::default().layer(inner);
        let forged = r#"evil" http.response.status_code=200 fake=1"#;
        let request = Request::get(r#"/api/public/v1/workflow-runs/x"y=1"#.replace('"', "%22"))
            .header(USER_AGENT, forged)
            .body(())
            .expect("request");
        service.call(request).await.expect("answered");
        let output = String::from_utf8(captured.0.lock().expect("buffer").clone()).expect("utf-8");
        let line = output
            .lines()
            .find(|line| line.contains("served"))
            .unwrap_or_else(|| panic!("an access line in {output:?}"));
        assert!(
            line.contains(r#"user_agent.original="evil\" http.response.status_code=200 fake=1""#),
            "the user agent is one quoted, escaped value: {line}"
        );
        assert_eq!(line.matches("http.response.status_code=").count(), 2, "{line}");
        assert!(!line.contains(" fake=1 "), "{line}");
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
    fn errors_or_slow_keeps_errors_and_slow_answers_but_not_held_ones() {
        let quick = Duration::from_millis(5);
        let slow = Duration::from_secs(2);
        let filter = AccessLog {
            mode: AccessLogMode::ErrorsOrSlow,
            slow: Duration::from_secs(1),
        };
        assert!(!filter.wants(200, None, false, quick));
        assert!(
            !filter.wants(404, None, false, quick),
            "upstream's 404, passed on"
        );
        assert!(filter.wants(503, None, false, quick));
        assert!(filter.wants(500, None, false, quick));
        assert!(filter.wants(429, None, false, quick));
        assert!(filter.wants(400, Some("INVALID_RUN_ID"), false, quick));
        assert!(filter.wants(200, None, false, slow));
        assert!(
            !filter.wants(200, None, true, slow),
            "a held long-poll's wait is not slowness"
        );
        assert!(filter.wants(503, Some("TOO_MANY_WAITERS"), true, slow));
        let all = AccessLog {
            mode: AccessLogMode::All,
            ..filter
        };
        assert!(all.wants(200, None, false, quick));
        let off = AccessLog {
            mode: AccessLogMode::Off,
            ..filter
        };
        assert!(!off.wants(503, Some("UPSTREAM_UNAVAILABLE"), false, slow));
    }

    #[test]
    fn the_runs_route_and_protocol_versions_are_named_as_spans_want() {
        assert!(is_runs_path("/api/public/v1/workflow-runs/run_1"));
        assert!(!is_runs_path("/api/public/v1/workflow-runs/"));
        assert!(!is_runs_path("/api/public/v1/workflow-runs/a/b"));
        assert!(!is_runs_path("/metrics"));
        assert_eq!(protocol_version(Version::HTTP_11), "1.1");
        assert_eq!(protocol_version(Version::HTTP_2), "2");
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

//! The upstream side: the request the gateway sends, what comes back, and what can go wrong.
//!
//! The upstream request is built from scratch, never copied from the client's: method GET, the
//! run's URL, the server-side `Authorization: api-key …`, `Accept: application/json`, a
//! `User-Agent` and the request id. So no client credential, cookie, hop-by-hop header or routing
//! header (`Host`, `X-Forwarded-*`, `Forwarded`, `X-Original-URL`, …) can ever travel upstream,
//! and no client header can make two requests for one run differ upstream. Trace context is the
//! one thing continued: each call is a span of its own ([`crate::ops::spans`]), a child of the
//! request's, and sends `traceparent` naming it, with the client's `tracestate` (validated and
//! bounded) unchanged; a call no client asked for starts a trace of its own.
//!
//! Whatever comes back is checked for the key, in any spelling an encoder could give it (raw,
//! JSON-escaped, percent-encoded; see [`crate::upstream::key_echo`]): a body that echoes it (current or,
//! during a rotation, previous) is scrubbed before anyone sees it or it is stored, and a header
//! that holds it is dropped.
//! The key can be rotated at run time ([`KeyRotation`], on SIGHUP).
//!
//! Connections are kept alive in the [`Pool`]; `https` upstreams use rustls with the webpki roots
//! (plus an optional extra CA file) and negotiate HTTP/2 or HTTP/1.1 by ALPN. One deadline,
//! `request_timeout`, covers connect, head and body; bodies are read whole up to `max_body_size`.

pub mod budget;
pub mod budget_metrics;
pub mod credentials;
pub mod fetcher;
pub mod key_echo;
pub mod metrics;
pub mod pool;
pub mod tls;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{
    ACCEPT, AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE, HOST, HeaderValue, RETRY_AFTER, USER_AGENT,
};
use http::uri::PathAndQuery;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper_util::client::legacy::connect::HttpConnector;

use self::credentials::{Credentials, KeyRotation};
use self::metrics::{UpstreamMetrics, UpstreamOutcome};
use self::tls::tls_config;
use crate::config::{ConfigError, UpstreamConfig};
use crate::edge::response::{APPLICATION_JSON, X_REQUEST_ID};
use crate::ops::spans::Spans;
use crate::ops::trace_context::{CallIds, SpanContext};
use crate::run::id::RunId;
use crate::upstream::credentials::ApiKey;
use crate::upstream::pool::{Pool, PoolError, PoolSettings, describe_chain, error_chain};

/// What upstream answered, read whole.
#[derive(Debug)]
pub struct UpstreamResponse {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub retry_after: Option<HeaderValue>,
    /// The body came with a `Content-Encoding` (other than `identity`): compressed, though the
    /// gateway asked for no encoding. It can be neither read (for a status, for the key) nor
    /// forwarded as the JSON it claims to be.
    pub encoded: bool,
    pub body: Bytes,
    /// Time from sending the request to having the whole body.
    pub elapsed: Duration,
}

/// Why no complete answer came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("no complete answer within the request timeout")]
    Timeout,
    #[error("could not connect")]
    Connect,
    #[error("the connection failed before a complete answer")]
    Broken,
    #[error("the body is larger than upstream.max_body_size")]
    BodyTooLarge,
}

/// The pooled client for Plextera's Get-run endpoint.
#[derive(Clone)]
pub struct Upstream {
    pool: Arc<Pool>,
    /// `/<base path>/api/public/v1/workflow-runs/`: requests go out in origin form (the path
    /// only, `Host` alongside), which is what HTTP/1.1 sends; the pool adds scheme and authority
    /// for HTTP/2.
    runs_path_prefix: Arc<str>,
    /// `Host`, formatted once: with origin-form requests it is what names the upstream.
    host: HeaderValue,
    /// `scheme://host[:port]`, for logs.
    origin: Arc<str>,
    credentials: Arc<ArcSwap<Credentials>>,
    user_agent: HeaderValue,
    timeout: Duration,
    max_body_size: usize,
    metrics: UpstreamMetrics,
    /// The calls' spans, named by `server_host` and `server_port`.
    spans: Spans,
    server_host: Arc<str>,
    server_port: u16,
}

impl Upstream {
    pub fn new(
        config: &UpstreamConfig,
        key: &ApiKey,
        metrics: UpstreamMetrics,
        spans: Spans,
    ) -> Result<Self, ConfigError> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.request_timeout));
        let tls = tls_config(config.ca_file.as_deref())?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let runs_url_prefix = config.runs_url_prefix()?;
        let origin: Uri = runs_url_prefix.parse().map_err(|_| {
            ConfigError::Invalid(format!("upstream.base_url {:?} is not a URL", config.base_url))
        })?;
        let server_host: Arc<str> = origin.host().unwrap_or_default().into();
        let server_port = origin.port_u16().unwrap_or(match origin.scheme_str() {
            Some("https") => 443,
            _ => 80,
        });
        Ok(Self {
            spans,
            server_host,
            server_port,
            host: host_header(&origin).ok_or_else(|| {
                ConfigError::Invalid(format!("upstream.base_url {:?} has no host", config.base_url))
            })?,
            runs_path_prefix: origin.path().into(),
            origin: config.origin()?.into(),
            pool: Arc::new(Pool::new(
                connector,
                origin,
                PoolSettings {
                    idle_timeout: config.pool_idle_timeout,
                    max_idle: config.pool_max_idle,
                    max_connection_age: config.pool_max_connection_age,
                    http2_keepalive_interval: config.http2_keepalive_interval,
                    http2_keepalive_timeout: config.http2_keepalive_timeout,
                    connect_timeout: config.request_timeout,
                },
                metrics.retries.clone(),
            )),
            credentials: Arc::new(ArcSwap::from_pointee(Credentials::new(key, None))),
            user_agent: HeaderValue::from_static(concat!("plextera-gateway/", env!("CARGO_PKG_VERSION"))),
            timeout: config.request_timeout,
            max_body_size: usize::try_from(config.max_body_size.as_u64()).unwrap_or(usize::MAX),
            metrics,
        })
    }

    /// Fetches one run, bounded by `request_timeout` as a whole, records the call's metrics, and
    /// logs a failure with the upstream's origin and its cause.
    pub async fn fetch(&self, id: &RunId, ids: &CallIds) -> Result<UpstreamResponse, UpstreamError> {
        let span = self
            .spans
            .client(ids.span.as_ref(), &self.server_host, self.server_port);
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, self.exchange(id, &ids.request_id, &span.context))
            .await
            .unwrap_or_else(|_| {
                Err(Failure {
                    error: UpstreamError::Timeout,
                    cause: "timeout",
                    detail: format!("no complete answer within {:?}", self.timeout),
                })
            });
        let elapsed = started.elapsed();
        let outcome = match &result {
            Ok(response) => UpstreamOutcome::Answered(response.status),
            Err(failure) => UpstreamOutcome::Failed(failure.error),
        };
        self.metrics.observe(outcome, elapsed);
        // A call no client asked for has no request span: its failure line names its own trace.
        let trace_id = span.context.trace_id;
        match &result {
            Ok(response) => span.end(Some(response.status.as_u16()), None),
            Err(failure) => span.end(None, Some(failure.cause)),
        }
        match result {
            Ok(response) => Ok(UpstreamResponse { elapsed, ..response }),
            Err(failure) => {
                // The detail quotes what upstream said (an HTTP/2 GOAWAY's debug data, say), which
                // may echo the key.
                let credentials = self.credentials.load();
                let detail = if credentials.appears_in(failure.detail.as_bytes()) {
                    String::from_utf8_lossy(&credentials.replace_echoes(failure.detail.as_bytes()))
                        .into_owned()
                } else {
                    failure.detail
                };
                tracing::warn!(
                    %trace_id,
                    upstream = %self.origin,
                    cause = failure.cause,
                    error = %detail,
                    "upstream request failed: {}",
                    failure.error
                );
                Err(failure.error)
            }
        }
    }

    async fn exchange(
        &self,
        id: &RunId,
        request_id: &HeaderValue,
        span: &SpanContext,
    ) -> Result<UpstreamResponse, Failure> {
        // Owned for the whole exchange: a rotation mid-request must not change how its answer is
        // scrubbed.
        let credentials = self.credentials.load_full();
        let request = || {
            let mut path = String::with_capacity(self.runs_path_prefix.len() + id.as_str().len());
            path.push_str(&self.runs_path_prefix);
            path.push_str(id.as_str());
            let path = PathAndQuery::try_from(path)
                .expect("a validated base URL's path plus a validated run id is a valid path");
            let mut request = Request::new(Empty::new());
            *request.uri_mut() = Uri::from(path);
            let headers = request.headers_mut();
            headers.insert(HOST, self.host.clone());
            headers.insert(AUTHORIZATION, credentials.authorization.clone());
            headers.insert(ACCEPT, APPLICATION_JSON);
            headers.insert(USER_AGENT, self.user_agent.clone());
            headers.insert(X_REQUEST_ID, request_id.clone());
            span.inject(headers);
            request
        };

        let (response, connection) = self.pool.send(request).await.map_err(|error| match error {
            PoolError::Connect(failure) => Failure {
                error: UpstreamError::Connect,
                cause: failure.cause,
                detail: failure.detail,
            },
            PoolError::Request(error) => Failure::broken(&error),
        })?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, self.max_body_size)
            .collect()
            .await
            .map_err(|error| {
                if error.is::<LengthLimitError>() {
                    Failure {
                        error: UpstreamError::BodyTooLarge,
                        cause: "too_large",
                        detail: format!("the body is larger than {} bytes", self.max_body_size),
                    }
                } else {
                    Failure::broken(error.as_ref())
                }
            })?
            .to_bytes();
        self.pool.put(connection);
        Ok(UpstreamResponse {
            status: parts.status,
            content_type: parts
                .headers
                .get(CONTENT_TYPE)
                .filter(|value| !credentials.appears_in(value.as_bytes()))
                .cloned(),
            retry_after: parts
                .headers
                .get(RETRY_AFTER)
                .filter(|value| !credentials.appears_in(value.as_bytes()))
                .cloned(),
            encoded: parts
                .headers
                .get(CONTENT_ENCODING)
                .is_some_and(|encoding| !encoding.as_bytes().eq_ignore_ascii_case(b"identity")),
            body: credentials.scrub(body),
            elapsed: Duration::ZERO,
        })
    }
}

/// A failed exchange, with what its log line says about it.
struct Failure {
    error: UpstreamError,
    /// A short cause: `dns`, `refused`, `timeout`, `tls`, `reset`, `too_large`, `other`.
    cause: &'static str,
    /// The error chain, or what was exceeded.
    detail: String,
}

impl Failure {
    /// The exchange failed after connecting: `reset` when the connection itself failed (an I/O
    /// error, or it ended before a complete answer), `other` for anything else (an answer hyper
    /// could not parse, an HTTP/2 protocol error).
    fn broken(error: &(dyn std::error::Error + 'static)) -> Self {
        let chain = error_chain(error);
        let connection_failed = chain.iter().any(|error| {
            error.is::<std::io::Error>()
                || error.downcast_ref::<hyper::Error>().is_some_and(|error| {
                    error.is_incomplete_message() || error.is_closed() || error.is_canceled()
                })
        });
        Self {
            error: UpstreamError::Broken,
            cause: if connection_failed { "reset" } else { "other" },
            detail: describe_chain(&chain),
        }
    }
}

/// `host[:port]` of `uri`, the port only when it is not the scheme's default; `None` when `uri`
/// has no host (the config check refuses such a `base_url` first).
fn host_header(uri: &Uri) -> Option<HeaderValue> {
    let host = uri.host()?;
    let default_port = match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    };
    let value = match uri.port_u16() {
        Some(port) if port != default_port => format!("{host}:{port}"),
        _ => host.to_owned(),
    };
    HeaderValue::from_str(&value).ok()
}

impl Upstream {
    /// Reads the pool's connections, for the scrape-time gauges.
    pub fn occupancy(&self) -> pool::PoolOccupancy {
        pool::PoolOccupancy::new(Arc::clone(&self.pool))
    }

    /// A handle that replaces the key this client sends.
    pub fn key_rotation(&self) -> KeyRotation {
        KeyRotation(Arc::clone(&self.credentials))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_header_names_a_port_only_when_it_is_not_the_default() {
        for (origin, expected) in [
            ("https://api.plextera.com", "api.plextera.com"),
            ("https://api.plextera.com:443", "api.plextera.com"),
            ("https://api.plextera.com:8443", "api.plextera.com:8443"),
            ("http://127.0.0.1:80", "127.0.0.1"),
            ("http://127.0.0.1:9000", "127.0.0.1:9000"),
            ("http://[::1]:9000", "[::1]:9000"),
        ] {
            let uri: Uri = format!("{origin}/api/public/v1/workflow-runs/")
                .parse()
                .expect("test URL");
            let host = host_header(&uri).expect("a host");
            assert_eq!(host.to_str().expect("ascii"), expected, "{origin}");
        }
        let path_only: Uri = "/api/public/v1/workflow-runs/".parse().expect("a path");
        assert!(host_header(&path_only).is_none());
    }
}

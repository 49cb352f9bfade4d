//! The errors the gateway answers with itself, and the one mapping from error to HTTP response.
//!
//! Bodies follow Plextera's own error shape, `{"error":{"code","message","requestId","retryable"}}`,
//! so a frontend handles gateway and upstream errors alike; answers to client requests add
//! `traceId`, the W3C trace id the request's log lines and spans carry. Messages are fixed strings: no upstream
//! detail, no header, no key ever reaches a body.

use bytes::Bytes;
use http::header::{ALLOW, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};
use serde::Serialize;

use crate::cache::CacheOutcome;
use crate::edge::response::{Body, json};
use crate::ops::trace_context::CallIds;

/// Everything the gateway can refuse or fail with on its own account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    #[error("no such route: the gateway serves GET /api/public/v1/workflow-runs/{{runId}}")]
    NotFound,
    #[error("method not allowed: use {allowed}")]
    MethodNotAllowed { allowed: Allowed },
    #[error("missing or invalid client token: send Authorization: Bearer <token>")]
    Unauthorized,
    #[error("a Get-run request has no body: Content-Length and Transfer-Encoding are refused")]
    BodyNotAllowed,
    #[error("an HTTP/1.1 request needs exactly one Host header")]
    BadHost,
    #[error("invalid run id: 1 to 128 characters of A-Z, a-z, 0-9, '_' and '-'")]
    InvalidRunId,
    #[error("invalid wait: a number of seconds (30, 0.5) or a duration (500ms, 30s, 2m)")]
    InvalidWait,
    #[error("too many clients are waiting on runs: retry after {retry_after_secs}s")]
    TooManyWaiters { retry_after_secs: u64 },
    #[error("request URI too long")]
    UriTooLong,
    #[error("request headers too large")]
    HeadersTooLarge,
    #[error("the gateway's credentials were refused upstream")]
    UpstreamAuth,
    #[error("upstream unreachable or the connection failed")]
    UpstreamUnavailable,
    #[error("upstream did not answer in time")]
    UpstreamTimeout,
    #[error("upstream response body too large")]
    UpstreamBodyTooLarge,
    #[error("upstream sent a response the gateway cannot forward")]
    UpstreamBadResponse,
    #[error("the gateway's upstream request budget is spent: retry after {retry_after_secs}s")]
    RateLimited { retry_after_secs: u64 },
    #[error("upstream asked the gateway to slow down: retry after {retry_after_secs}s")]
    UpstreamCoolingDown { retry_after_secs: u64 },
    #[error("internal error")]
    Internal,
}

/// The methods a path answers, for a 405's message and its `Allow` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed {
    /// `GET` and `HEAD`: the runs path.
    Read,
    /// `DELETE`: the admin port's purge paths.
    Delete,
}

impl Allowed {
    fn header(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Self::Read => "GET, HEAD",
            Self::Delete => "DELETE",
        })
    }
}

impl std::fmt::Display for Allowed {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            Self::Read => "GET or HEAD",
            Self::Delete => "DELETE",
        })
    }
}

impl GatewayError {
    pub fn status(self) -> StatusCode {
        match self {
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::InvalidRunId | Self::BodyNotAllowed | Self::BadHost | Self::InvalidWait => {
                StatusCode::BAD_REQUEST
            }
            Self::TooManyWaiters { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::UriTooLong => StatusCode::URI_TOO_LONG,
            Self::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::UpstreamAuth
            | Self::UpstreamUnavailable
            | Self::UpstreamBodyTooLarge
            | Self::UpstreamBadResponse => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::RateLimited { .. } | Self::UpstreamCoolingDown { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Stable machine-readable code, in Plextera's upper snake case.
    pub fn code(self) -> &'static str {
        match self {
            Self::NotFound => "NOT_FOUND",
            Self::Unauthorized => "UNAUTHORIZED",
            Self::MethodNotAllowed { .. } => "METHOD_NOT_ALLOWED",
            Self::InvalidRunId => "INVALID_RUN_ID",
            Self::InvalidWait => "INVALID_WAIT",
            Self::TooManyWaiters { .. } => "TOO_MANY_WAITERS",
            Self::BodyNotAllowed | Self::BadHost => "INVALID_REQUEST",
            Self::UriTooLong => "URI_TOO_LONG",
            Self::HeadersTooLarge => "HEADERS_TOO_LARGE",
            Self::UpstreamAuth => "UPSTREAM_AUTH",
            Self::UpstreamUnavailable => "UPSTREAM_UNAVAILABLE",
            Self::UpstreamTimeout => "UPSTREAM_TIMEOUT",
            Self::UpstreamBodyTooLarge => "UPSTREAM_BODY_TOO_LARGE",
            Self::UpstreamBadResponse => "UPSTREAM_BAD_RESPONSE",
            Self::RateLimited { .. } => "GATEWAY_RATE_LIMITED",
            Self::UpstreamCoolingDown { .. } => "UPSTREAM_RATE_LIMITED",
            Self::Internal => "INTERNAL",
        }
    }

    /// Whether the same request may succeed later without the client changing anything.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            Self::UpstreamUnavailable
                | Self::UpstreamTimeout
                | Self::RateLimited { .. }
                | Self::UpstreamCoolingDown { .. }
                | Self::TooManyWaiters { .. }
                | Self::Internal
        )
    }

    /// The JSON error response, `no-store`, with `Allow` on a 405 and `Retry-After` on a 429.
    /// `ids`: the request's, for `requestId` and `traceId`.
    pub fn into_response(self, ids: Option<&CallIds>) -> Response<Body> {
        let request_id = ids.and_then(|ids| ids.request_id.to_str().ok());
        let trace_id = ids
            .and_then(|ids| ids.span.as_ref())
            .map(|span| span.trace_id.to_string());
        let body = envelope(
            self.code(),
            &self.to_string(),
            request_id,
            trace_id.as_deref(),
            self.retryable(),
        );
        let mut response = json(self.status(), body);
        match self {
            Self::MethodNotAllowed { allowed } => {
                response.headers_mut().insert(ALLOW, allowed.header());
            }
            Self::RateLimited { retry_after_secs }
            | Self::UpstreamCoolingDown { retry_after_secs }
            | Self::TooManyWaiters { retry_after_secs } => {
                response
                    .headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from(retry_after_secs));
            }
            _ => {}
        }
        response.body_mut().set_outcome(CacheOutcome::Error);
        response.body_mut().set_error(self.code());
        response
    }
}

/// Serializes Plextera's error envelope.
pub fn error_body(code: &str, message: &str, request_id: Option<&str>, retryable: bool) -> Bytes {
    envelope(code, message, request_id, None, retryable)
}

/// The envelope, with `traceId` when given.
fn envelope(
    code: &str,
    message: &str,
    request_id: Option<&str>,
    trace_id: Option<&str>,
    retryable: bool,
) -> Bytes {
    #[derive(Serialize)]
    struct Envelope<'a> {
        error: Detail<'a>,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Detail<'a> {
        code: &'a str,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        request_id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        trace_id: Option<&'a str>,
        retryable: bool,
    }
    let envelope = Envelope {
        error: Detail {
            code,
            message,
            request_id,
            trace_id,
            retryable,
        },
    };
    Bytes::from(serde_json::to_vec(&envelope).expect("a struct of strings and a bool always serializes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{CACHE_CONTROL, CONTENT_TYPE};
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn error_response_uses_plextera_envelope() {
        let span = crate::ops::trace_context::SpanContext {
            trace_id: crate::ops::trace_context::TraceId([0xab; 16]),
            span_id: crate::ops::trace_context::SpanId([1; 8]),
            sampled: true,
            state: None,
        };
        let ids = CallIds {
            request_id: HeaderValue::from_static("req-1"),
            span: Some(span),
        };
        let response = GatewayError::UpstreamTimeout.into_response(Some(&ids));
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(response.headers()[CACHE_CONTROL], "no-store");
        assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
        let body = response
            .into_body()
            .collect()
            .await
            .expect("full body")
            .to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(json["error"]["code"], "UPSTREAM_TIMEOUT");
        assert_eq!(json["error"]["requestId"], "req-1");
        assert_eq!(json["error"]["traceId"], "ab".repeat(16));
        assert_eq!(json["error"]["retryable"], true);
        assert!(json["error"]["message"].is_string());
    }

    #[test]
    fn rate_limits_say_when_to_retry() {
        for error in [
            GatewayError::RateLimited { retry_after_secs: 3 },
            GatewayError::UpstreamCoolingDown { retry_after_secs: 3 },
        ] {
            let response = error.into_response(None);
            assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(response.headers()[RETRY_AFTER], "3");
            assert!(error.retryable());
        }
    }

    #[test]
    fn method_not_allowed_says_what_is() {
        for (allowed, header) in [(Allowed::Read, "GET, HEAD"), (Allowed::Delete, "DELETE")] {
            let response = GatewayError::MethodNotAllowed { allowed }.into_response(None);
            assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
            assert_eq!(response.headers()[ALLOW], header);
        }
    }
}

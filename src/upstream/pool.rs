//! Kept-alive connections to the one upstream origin.
//!
//! hyper-util's pooled client serves any number of origins: every call hashes the origin to check
//! a connection out and again to put it back, races the checkout against a new connect, and
//! spawns a task to return the connection. The gateway talks to one origin, so a stack of idle
//! HTTP/1.1 connections (the most recently used on top) and, when the upstream negotiates HTTP/2
//! by ALPN, one shared multiplexed connection, are all it needs. Connections come from the same
//! connector as before (TCP, then TLS for `https`).
//!
//! A connection goes back on the stack only after its answer was read whole ([`Pool::put`]); one
//! that failed is dropped, and dropping it closes it. Connections idle longer than the idle
//! timeout are closed when the pool next meets them.
//!
//! An upstream closes idle connections on its own schedule, so a request can meet a stacked
//! connection the upstream has just closed. If the gateway learns of the close before writing,
//! hyper hands the request back and the next connection is tried. If the close crosses the request
//! on the wire, the request was written and the connection ends without an answer: the gateway
//! only sends GETs, which are safe to repeat, so it builds the request again and sends it once more
//! on a fresh connection (as nginx and Go's HTTP client do for a kept-alive connection). A fresh
//! connection that fails is not retried: that upstream is failing, not closing idle connections.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::Uri;
use http::{Request, Response};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use prometheus::IntCounter;
use tower::ServiceExt;

type RequestBody = Empty<Bytes>;

/// Idle HTTP/1.1 connections kept beyond this many are closed.
const MAX_IDLE: usize = 128;

/// Why a request got no response head.
#[derive(Debug)]
pub enum PoolError {
    /// No connection could be made.
    Connect(ConnectFailure),
    /// The connection failed before a response head arrived.
    Request(hyper::Error),
}

/// Why no connection could be made, for the log: a short cause and the whole error chain.
#[derive(Debug)]
pub struct ConnectFailure {
    /// `dns`, `refused`, `timeout`, `tls` or `other`.
    pub cause: &'static str,
    /// Every error in the chain, outermost first, joined by `: `.
    pub detail: String,
}

impl ConnectFailure {
    /// Reads the cause off the connector's error chain (hyper-util's `ConnectError` names DNS
    /// failures; the I/O error says refused or timed out; rustls errors mean TLS).
    fn of(error: &(dyn std::error::Error + 'static)) -> Self {
        let chain = error_chain(error);
        let is_tls = |error: &(dyn std::error::Error + 'static)| error.is::<rustls::Error>();
        let io_kind = chain
            .iter()
            .find_map(|error| error.downcast_ref::<std::io::Error>())
            .map(std::io::Error::kind);
        let cause = if chain
            .iter()
            .any(|error| error.to_string().starts_with("dns error"))
        {
            "dns"
        } else if chain.iter().any(|error| is_tls(*error)) {
            "tls"
        } else if io_kind == Some(std::io::ErrorKind::ConnectionRefused) {
            "refused"
        } else if io_kind == Some(std::io::ErrorKind::TimedOut) {
            "timeout"
        } else {
            "other"
        };
        Self {
            cause,
            detail: describe_chain(&chain),
        }
    }
}

/// `error` and the errors under it. An `io::Error` wrapping another error reports that error's
/// source as its own, skipping the wrapped error itself (hyper-rustls wraps rustls's error in two
/// of them), so the wrapped one is followed instead.
pub fn error_chain<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Vec<&'a (dyn std::error::Error + 'static)> {
    let mut chain = Vec::new();
    let mut next = Some(error);
    while let Some(error) = next {
        chain.push(error);
        next = match error
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
        {
            Some(wrapped) => Some(wrapped as &(dyn std::error::Error + 'static)),
            None => error.source(),
        };
    }
    chain
}

/// The chain's messages joined by `: `, each said once (a wrapping `io::Error` repeats the
/// message of the error it wraps).
pub fn describe_chain(chain: &[&(dyn std::error::Error + 'static)]) -> String {
    let mut messages: Vec<String> = chain.iter().map(ToString::to_string).collect();
    messages.dedup();
    messages.join(": ")
}

/// A connection lent for one exchange; give it back with [`Pool::put`] once the body is read.
pub struct Lease(Option<http1::SendRequest<RequestBody>>);

pub struct Pool {
    connector: HttpsConnector<HttpConnector>,
    origin: Uri,
    idle: Mutex<Vec<IdleConnection>>,
    multiplexed: Mutex<Option<http2::SendRequest<RequestBody>>>,
    idle_timeout: Duration,
    /// Counts requests sent a second time after a kept-alive connection closed under them.
    retries: IntCounter,
}

struct IdleConnection {
    sender: http1::SendRequest<RequestBody>,
    since: Instant,
}

enum Fresh {
    Http1(http1::SendRequest<RequestBody>),
    Http2(http2::SendRequest<RequestBody>),
}

impl Pool {
    /// `origin` is any URL of the upstream: its scheme and authority are what is connected to.
    pub fn new(
        connector: HttpsConnector<HttpConnector>,
        origin: Uri,
        idle_timeout: Duration,
        retries: IntCounter,
    ) -> Self {
        Self {
            connector,
            origin,
            idle: Mutex::default(),
            multiplexed: Mutex::default(),
            idle_timeout,
            retries,
        }
    }

    /// Sends the request `build` makes (a GET in origin form: the path, with `Host` set) on a
    /// pooled or a fresh connection. `build` runs again only when a connection failed under the
    /// request (see the module docs).
    pub async fn send(
        &self,
        build: impl Fn() -> Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Lease), PoolError> {
        if let Some(mut sender) = self.shared_http2() {
            match sender.try_send_request(self.absolute_form(build())).await {
                Ok(response) => return Ok((response, Lease(None))),
                Err(error) if error.message().is_none() => {
                    return Err(PoolError::Request(error.into_error()));
                }
                // Not written: the connection had closed. The request is built anew below, in
                // origin form, for whichever connection comes next.
                Err(_) => self.forget_closed_http2(),
            }
        }
        let mut request = build();
        while let Some(mut sender) = self.checkout().await {
            match sender.try_send_request(request).await {
                Ok(response) => return Ok((response, Lease(Some(sender)))),
                Err(mut error) => match error.take_message() {
                    // Not written: the upstream had closed it. Try the next one, or a fresh one.
                    Some(unsent) => request = unsent,
                    // Written as the upstream closed it: once more, on a fresh connection.
                    None if closed_without_answer(error.error()) => {
                        self.retries.inc();
                        request = build();
                        break;
                    }
                    None => return Err(PoolError::Request(error.into_error())),
                },
            }
        }
        // Boxed: a connect's state (TLS handshake included) is large and rarely needed.
        match Box::pin(self.connect()).await? {
            Fresh::Http1(mut sender) => {
                let response = sender.send_request(request).await.map_err(PoolError::Request)?;
                Ok((response, Lease(Some(sender))))
            }
            Fresh::Http2(mut sender) => {
                let response = sender
                    .send_request(self.absolute_form(request))
                    .await
                    .map_err(PoolError::Request)?;
                Ok((response, Lease(None)))
            }
        }
    }

    /// Takes back a connection whose answer was read whole.
    pub fn put(&self, lease: Lease) {
        let Some(sender) = lease.0 else { return };
        let now = Instant::now();
        let mut idle = self.lock_idle();
        // The oldest are at the bottom: close those idle too long, and any beyond the cap.
        let stale = idle
            .iter()
            .take_while(|connection| now.duration_since(connection.since) >= self.idle_timeout)
            .count()
            .max((idle.len() + 1).saturating_sub(MAX_IDLE));
        idle.drain(..stale);
        idle.push(IdleConnection { sender, since: now });
    }

    /// The most recently used idle connection that is still open, once it is ready for a request.
    async fn checkout(&self) -> Option<http1::SendRequest<RequestBody>> {
        loop {
            let connection = self.lock_idle().pop()?;
            if connection.since.elapsed() >= self.idle_timeout || connection.sender.is_closed() {
                continue;
            }
            let mut sender = connection.sender;
            // Ready at once unless hyper is still finishing the previous exchange's bookkeeping.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    fn shared_http2(&self) -> Option<http2::SendRequest<RequestBody>> {
        let multiplexed = self.lock_multiplexed();
        multiplexed.as_ref().filter(|sender| !sender.is_closed()).cloned()
    }

    /// Drops the shared HTTP/2 connection once it is closed (a newer one made meanwhile stays).
    fn forget_closed_http2(&self) {
        let mut multiplexed = self.lock_multiplexed();
        if multiplexed.as_ref().is_some_and(http2::SendRequest::is_closed) {
            *multiplexed = None;
        }
    }

    async fn connect(&self) -> Result<Fresh, PoolError> {
        let io = self
            .connector
            .clone()
            .oneshot(self.origin.clone())
            .await
            .map_err(|error| PoolError::Connect(ConnectFailure::of(error.as_ref())))?;
        if io.connected().is_negotiated_h2() {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(PoolError::Request)?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "upstream HTTP/2 connection ended");
                }
            });
            *self.lock_multiplexed() = Some(sender.clone());
            Ok(Fresh::Http2(sender))
        } else {
            let (sender, connection) = http1::handshake(io).await.map_err(PoolError::Request)?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "upstream HTTP/1.1 connection ended");
                }
            });
            Ok(Fresh::Http1(sender))
        }
    }

    /// HTTP/2 carries scheme and authority as pseudo-headers: the origin's, with the request's path.
    fn absolute_form(&self, mut request: Request<RequestBody>) -> Request<RequestBody> {
        let mut parts = self.origin.clone().into_parts();
        parts.path_and_query = request.uri().path_and_query().cloned();
        if let Ok(uri) = Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
        request
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<IdleConnection>> {
        self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_multiplexed(&self) -> std::sync::MutexGuard<'_, Option<http2::SendRequest<RequestBody>>> {
        self.multiplexed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The connection ended before any answer: closed (EOF) or reset, rather than a malformed or
/// refused exchange.
fn closed_without_answer(error: &hyper::Error) -> bool {
    if error.is_incomplete_message() {
        return true;
    }
    let io_error =
        std::error::Error::source(error).and_then(|source| source.downcast_ref::<std::io::Error>());
    io_error.is_some_and(|io_error| {
        matches!(
            io_error.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A resolver that never finds anything, as when a host name does not exist.
    #[derive(Clone)]
    struct NoSuchHost;

    impl tower::Service<hyper_util::client::legacy::connect::dns::Name> for NoSuchHost {
        type Response = std::vec::IntoIter<std::net::SocketAddr>;
        type Error = std::io::Error;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _name: hyper_util::client::legacy::connect::dns::Name) -> Self::Future {
            Box::pin(async { Err(std::io::Error::other("no such host")) })
        }
    }

    #[tokio::test]
    async fn a_failed_name_lookup_is_a_dns_cause() {
        let mut connector = HttpConnector::new_with_resolver(NoSuchHost);
        connector.enforce_http(false);
        let uri: Uri = "http://plextera.invalid/".parse().expect("uri");
        let error = connector.oneshot(uri).await.expect_err("no address");
        let failure = ConnectFailure::of(&error);
        assert_eq!(failure.cause, "dns", "{}", failure.detail);
        assert!(failure.detail.contains("no such host"), "{}", failure.detail);
    }

    #[test]
    fn wrapped_io_errors_are_followed_to_what_they_wrap() {
        let tls = rustls::Error::General("bad certificate".to_owned());
        let wrapped = std::io::Error::other(std::io::Error::new(std::io::ErrorKind::InvalidData, tls));
        let failure = ConnectFailure::of(&wrapped);
        assert_eq!(failure.cause, "tls");
        assert_eq!(failure.detail, "unexpected error: bad certificate");
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(ConnectFailure::of(&refused).cause, "refused");
    }
}

//! Why an upstream exchange failed, read off hyper's and the connector's error chains: the cause
//! a log line names (`dns`, `refused`, `timeout`, `tls`, `other`), and whether a connection ended
//! without an answer (the one failure a kept-alive connection is retried for).

/// Why no connection could be made, for the log: a short cause and the whole error chain.
#[derive(Debug, Clone)]
pub struct ConnectFailure {
    /// `dns`, `refused`, `timeout`, `tls` or `other`.
    pub cause: &'static str,
    /// Every error in the chain, outermost first, joined by `: `.
    pub detail: String,
}

impl ConnectFailure {
    /// Reads the cause off the connector's error chain (hyper-util's `ConnectError` names DNS
    /// failures; the I/O error says refused or timed out; rustls errors mean TLS).
    pub fn of(error: &(dyn std::error::Error + 'static)) -> Self {
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

/// The connection ended before any answer: closed (EOF) or reset, rather than a malformed or
/// refused exchange.
pub fn closed_without_answer(error: &hyper::Error) -> bool {
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
    use http::Uri;
    use hyper_util::client::legacy::connect::HttpConnector;
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tower::ServiceExt;

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

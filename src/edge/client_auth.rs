//! Optional client authentication for the gateway itself: `Authorization: Bearer <token>`.
//!
//! Off unless `[server] client_tokens_env` names a variable of comma-separated tokens (or
//! `client_tokens_file` a file of them). When on, every request on the runs path without one of
//! those tokens is answered 401 before routing, cache or upstream see it. Tokens are kept as
//! SHA-256 digests and compared in constant time, so neither the comparison's timing nor a memory
//! dump gives them away. (The client's `Authorization` header is never forwarded upstream either
//! way.) The set is swapped whole when its file is rotated ([`ClientTokens::replace`]): a request
//! is checked against the old set or the new one, never a mix.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use futures_util::future::{Either, Ready, ready};
use http::header::{AUTHORIZATION, HeaderValue, WWW_AUTHENTICATE};
use http::{Request, Response};
use ring::digest::{SHA256, digest};
use subtle::ConstantTimeEq;
use tower::{Layer, Service};

use crate::edge::error::GatewayError;
use crate::edge::response::Body;
use crate::ops::trace_context::CallIds;

/// The accepted client tokens, as digests. Clones share the set, and see its replacement.
#[derive(Clone)]
pub struct ClientTokens {
    digests: Arc<ArcSwap<Vec<[u8; 32]>>>,
}

impl ClientTokens {
    pub fn new<S: AsRef<str>>(tokens: &[S]) -> Self {
        Self {
            digests: Arc::new(ArcSwap::from_pointee(digests(tokens))),
        }
    }

    /// Accepts `tokens` instead of the current set, from the next request on.
    pub fn replace<S: AsRef<str>>(&self, tokens: &[S]) {
        self.digests.store(Arc::new(digests(tokens)));
    }

    /// Whether `authorization` is `Bearer <an accepted token>`. Every digest is compared, so the
    /// time taken does not depend on which token matched, or on how much of one did.
    pub fn accepts(&self, authorization: Option<&HeaderValue>) -> bool {
        let Some(token) = authorization.and_then(|value| bearer_token(value.as_bytes())) else {
            return false;
        };
        let presented = sha256(token);
        let mut matched = subtle::Choice::from(0);
        for digest in self.digests.load().iter() {
            matched |= digest.ct_eq(&presented);
        }
        matched.into()
    }
}

impl std::fmt::Debug for ClientTokens {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "ClientTokens([{} redacted])",
            self.digests.load().len()
        )
    }
}

fn digests<S: AsRef<str>>(tokens: &[S]) -> Vec<[u8; 32]> {
    tokens
        .iter()
        .map(|token| sha256(token.as_ref().as_bytes()))
        .collect()
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

/// The token of `Bearer <token>` (scheme matched case-insensitively, as RFC 9110 says).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then_some(token)
        .filter(|token| !token.is_empty())
}

/// Adds [`ClientAuth`] in front of a service.
#[derive(Clone)]
pub struct ClientAuthLayer {
    tokens: ClientTokens,
}

impl ClientAuthLayer {
    pub fn new(tokens: ClientTokens) -> Self {
        Self { tokens }
    }
}

impl<S> Layer<S> for ClientAuthLayer {
    type Service = ClientAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ClientAuth {
            inner,
            tokens: self.tokens.clone(),
        }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct ClientAuth<S> {
    inner: S,
    tokens: ClientTokens,
}

impl<S, B> Service<Request<B>> for ClientAuth<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response<Body>, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if self.tokens.accepts(request.headers().get(AUTHORIZATION)) {
            return Either::Right(self.inner.call(request));
        }
        let mut response = GatewayError::Unauthorized.into_response(request.extensions().get::<CallIds>());
        response
            .headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        Either::Left(ready(Ok(response)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_listed_bearer_token_is_accepted() {
        let tokens = ClientTokens::new(&["alpha", "bravo"]);
        let accepts = |value: &str| tokens.accepts(Some(&HeaderValue::from_str(value).expect("header")));
        assert!(accepts("Bearer alpha"));
        assert!(accepts("bearer bravo"));
        assert!(accepts("BEARER alpha"));
        for refused in [
            "Bearer alph",
            "Bearer alphaa",
            "Bearer ",
            "Bearer",
            "Basic alpha",
            "alpha",
            "Bearer  alpha",
        ] {
            assert!(!accepts(refused), "{refused:?}");
        }
        assert!(!tokens.accepts(None));
    }

    #[test]
    fn a_replaced_set_is_seen_by_every_clone() {
        let tokens = ClientTokens::new(&["old"]);
        let layer_copy = tokens.clone();
        let accepts = |value: &str| layer_copy.accepts(Some(&HeaderValue::from_str(value).expect("header")));
        assert!(accepts("Bearer old"));
        tokens.replace(&["new"]);
        assert!(accepts("Bearer new"));
        assert!(!accepts("Bearer old"));
    }

    #[test]
    fn debug_never_shows_tokens() {
        assert_eq!(
            format!("{:?}", ClientTokens::new(&["secret-token"])),
            "ClientTokens([1 redacted])"
        );
    }
}

//! A request's body is never read: Get-run takes none. A request that frames one (any
//! `Transfer-Encoding`, or a `Content-Length` other than 0) is refused further in (400 by routing,
//! 405, 401 by client authentication, a CORS preflight answered), and whatever answers it, this
//! layer adds `Connection: close`, so its connection ends after that answer: the unread body, or a
//! request smuggled inside it, is never taken for the next request. (HTTP/2 has no such header,
//! and needs none: its framing cannot be confused.)

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::header::{CONNECTION, HeaderValue};
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::routes::has_body_framing;

/// Adds [`CloseOnBody`] around a service.
#[derive(Debug, Clone, Copy, Default)]
pub struct CloseOnBodyLayer;

impl<S> Layer<S> for CloseOnBodyLayer {
    type Service = CloseOnBody<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CloseOnBody { inner }
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct CloseOnBody<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for CloseOnBody<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = CloseOnBodyFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        CloseOnBodyFuture {
            framed: has_body_framing(request.headers()),
            inner: self.inner.call(request),
        }
    }
}

pin_project! {
    /// Adds `Connection: close` to the answer of a request that framed a body.
    pub struct CloseOnBodyFuture<F> {
        #[pin]
        inner: F,
        framed: bool,
    }
}

impl<F, B, E> Future for CloseOnBodyFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut result = ready!(this.inner.poll(cx));
        if *this.framed
            && let Ok(response) = &mut result
        {
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        Poll::Ready(result)
    }
}

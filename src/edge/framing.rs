//! Message framing the run path never needs, made safe for every answer the gateway gives.
//!
//! A request's body is never read: Get-run takes none. A request that frames one (any
//! `Transfer-Encoding`, or a `Content-Length` other than 0) is refused further in (400 by routing,
//! 405, 401 by client authentication, a CORS preflight answered), and whatever answers it, this
//! layer adds `Connection: close`, so its connection ends after that answer: the unread body, or a
//! request smuggled inside it, is never taken for the next request. (HTTP/2 has no such header,
//! and needs none: its framing cannot be confused.)
//!
//! A `HEAD` answer carries no body, only the `Content-Length` the `GET` would have had. hyper
//! drops the body of a `HEAD` answer over HTTP/1.1 but not over HTTP/2, where sending one is a
//! protocol error; so it is dropped here, for both.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::header::{CONNECTION, CONTENT_LENGTH, HeaderValue};
use http::{Method, Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::edge::response::Body;
use crate::edge::routes::has_body_framing;

/// Adds [`Framing`] around a service.
#[derive(Debug, Clone, Copy, Default)]
pub struct FramingLayer;

impl<S> Layer<S> for FramingLayer {
    type Service = Framing<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Framing { inner }
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct Framing<S> {
    inner: S,
}

impl<S, ReqBody> Service<Request<ReqBody>> for Framing<S>
where
    S: Service<Request<ReqBody>, Response = Response<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = FramingFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        FramingFuture {
            framed: has_body_framing(request.headers()),
            head: request.method() == Method::HEAD,
            inner: self.inner.call(request),
        }
    }
}

pin_project! {
    /// Closes after the answer of a request that framed a body; empties a `HEAD` answer.
    pub struct FramingFuture<F> {
        #[pin]
        inner: F,
        framed: bool,
        head: bool,
    }
}

impl<F, E> Future for FramingFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut result = ready!(this.inner.poll(cx));
        if let Ok(response) = &mut result {
            if *this.framed {
                response
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            if *this.head {
                let length = response.body_mut().take_data().len();
                response
                    .headers_mut()
                    .entry(CONTENT_LENGTH)
                    .or_insert_with(|| HeaderValue::from(length));
            }
        }
        Poll::Ready(result)
    }
}

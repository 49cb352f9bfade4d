//! The per-request side of a [`Connection`]: counts each request from its head to the end of its
//! answer's body, notices a request the client cancelled, and hands bodies over in pieces.
//!
//! [`Track`] wraps a connection's service. A request is "handled" until its response is ready and
//! "sent" until its body has been handed over whole; the response future dropped before it is
//! ready is a cancelled request (an HTTP/2 reset, or the client gone). Bodies go out in pieces of
//! at most [`PIECE`] bytes, so hyper asks for the next piece only when the previous one has found
//! room (socket buffer, HTTP/2 flow-control window): each piece is progress, and an answer that
//! stops being asked for has stalled.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Request, Response, Version};
use http_body::{Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::Service;

use super::Connection;

/// Largest piece of a body handed over at once: one HTTP/2 frame at the default frame size.
pub const PIECE: usize = 16 * 1024;

/// Counts a connection's requests and answers (see the module documentation).
#[derive(Clone)]
pub struct Track<S> {
    inner: S,
    connection: Arc<Connection>,
}

impl<S> Track<S> {
    /// Counts `inner`'s requests and answers on `connection`.
    pub fn new(inner: S, connection: Arc<Connection>) -> Self {
        Self { inner, connection }
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Track<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Response = Response<TrackedBody<ResBody>>;
    type Error = S::Error;
    type Future = TrackFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        self.connection
            .request_started(request.version() == Version::HTTP_2);
        TrackFuture {
            inner: self.inner.call(request),
            handling: Some(Handling(Some(Arc::clone(&self.connection)))),
        }
    }
}

pin_project! {
    /// The inner response future; dropped before it is ready, the request counts as cancelled.
    pub struct TrackFuture<F> {
        #[pin]
        inner: F,
        handling: Option<Handling>,
    }
}

impl<F, B, E> Future for TrackFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<TrackedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let handling = this
            .handling
            .take()
            .expect("a TrackFuture is not polled after it is ready");
        let sending = handling.answered();
        Poll::Ready(result.map(|response| {
            response.map(|body| TrackedBody {
                inner: body,
                rest: Bytes::new(),
                sending,
                pieces: 0,
            })
        }))
    }
}

/// A request whose answer is not ready yet; `None` once it has been answered.
struct Handling(Option<Arc<Connection>>);

impl Handling {
    fn answered(mut self) -> Sending {
        let connection = self.0.take().expect("a request is answered once");
        let answer = connection.answer_started();
        Sending { connection, answer }
    }
}

impl Drop for Handling {
    fn drop(&mut self) {
        if let Some(connection) = &self.0 {
            connection.request_cancelled();
        }
    }
}

/// An answer whose body has not been handed over whole; `answer` keys its progress clock on an
/// HTTP/2 connection.
struct Sending {
    connection: Arc<Connection>,
    answer: Option<usize>,
}

impl Drop for Sending {
    fn drop(&mut self) {
        self.connection.answer_finished(self.answer);
    }
}

pin_project! {
    /// A response body handed over in pieces of at most [`PIECE`] bytes, each one progress.
    /// `rest` is what is left of a data frame larger than a piece.
    pub struct TrackedBody<B> {
        #[pin]
        inner: B,
        rest: Bytes,
        sending: Sending,
        pieces: u64,
    }
}

impl<B> http_body::Body for TrackedBody<B>
where
    B: http_body::Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let mut data = if this.rest.is_empty() {
            match ready!(this.inner.poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                other => return Poll::Ready(other),
            }
        } else {
            std::mem::take(this.rest)
        };
        if data.len() > PIECE {
            *this.rest = data.split_off(PIECE);
        }
        // The first piece goes out as the answer starts, which already counted as progress.
        if *this.pieces > 0 {
            this.sending.connection.answer_progressed(this.sending.answer);
        }
        *this.pieces += 1;
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(rest));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::connection::{CloseReason, Limits};
    use http_body::Body as _;
    use http_body_util::{BodyExt, Full};
    use std::convert::Infallible;
    use std::time::Duration;
    use tokio::sync::Semaphore;
    use tower::ServiceExt;

    const LIMITS: Limits = Limits {
        header_read_timeout: Duration::from_secs(10),
        write_timeout: Duration::from_secs(30),
        max_streams: 4,
    };

    fn connection() -> Arc<Connection> {
        let slots = Arc::new(Semaphore::new(1));
        Connection::new(LIMITS, slots.try_acquire_owned().expect("a free slot"))
    }

    fn echo_service(
        body: Bytes,
    ) -> impl Service<Request<()>, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send> + Clone
    {
        tower::service_fn(move |_request: Request<()>| {
            let body = body.clone();
            async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
        })
    }

    #[tokio::test]
    async fn a_large_body_is_handed_over_in_pieces_whole_and_in_order() {
        let body = Bytes::from((0..PIECE * 3 + 5).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
        let connection = connection();
        let service = Track::new(echo_service(body.clone()), Arc::clone(&connection));
        let response = service.oneshot(Request::new(())).await.expect("infallible");
        let mut body_stream = response.into_body();
        assert_eq!(body_stream.size_hint().exact(), Some(body.len() as u64));
        let mut pieces = Vec::new();
        while let Some(frame) = body_stream.frame().await {
            pieces.push(frame.expect("infallible").into_data().expect("data"));
        }
        assert_eq!(
            pieces.iter().map(Bytes::len).collect::<Vec<_>>(),
            [PIECE, PIECE, PIECE, 5]
        );
        assert_eq!(pieces.concat(), body);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_busy_until_the_body_is_dropped_and_then_held_by_nothing() {
        let connection = connection();
        let service = Track::new(echo_service(Bytes::from_static(b"{}")), Arc::clone(&connection));
        let response = service.oneshot(Request::new(())).await.expect("infallible");
        assert_eq!(connection.idle_for_ms(), None, "busy while the body is unsent");
        drop(response);
        assert_eq!(connection.idle_for_ms(), Some(0), "idle once it is gone");
        assert_eq!(
            Arc::strong_count(&connection),
            1,
            "an answered request keeps no reference"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_response_future_counts_as_a_cancellation() {
        let connection = connection();
        let never = tower::service_fn(|_request: Request<()>| {
            std::future::pending::<Result<Response<Full<Bytes>>, Infallible>>()
        });
        let mut service = Track::new(never, Arc::clone(&connection));
        for _ in 0..=MIN_CANCELS {
            let future = service.call(Request::new(()));
            drop(future);
        }
        assert_eq!(connection.watch().await, CloseReason::Resets);
    }

    const MIN_CANCELS: u64 = super::super::MIN_RESETS_BEFORE_CLOSE;
}

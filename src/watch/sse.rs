//! An event stream (Server-Sent Events) of one run: `Accept: text/event-stream` on the runs path.
//!
//! The stream opens with a `retry:` line (`watch.sse_retry`, in milliseconds as the spec says),
//! then the run's current state as a frame (`id: <version>`, `event: run`, `data: <body>`; a body
//! with line breaks becomes several `data:` lines), then one frame per new version from the run's
//! watcher. The ended run is an `event: end` frame, after which the stream closes; a run that had
//! already ended gets a stream of that one frame. A 404 or the gateway's key refused mid-stream is
//! an `event: error` frame with the JSON error the plain request would get, then close. At the
//! start, the same answers are the plain JSON responses (a stream of errors helps no one).
//!
//! `Last-Event-ID` naming the current version skips the first frame (a reconnect that saw it);
//! naming the ended run's version gets 204, which tells browsers to stop reconnecting. A comment
//! line every `watch.sse_keepalive` keeps proxies from timing the stream out and finds a client
//! that left (the write fails). After `watch.max_stream_duration` (less up to a sixteenth, so
//! streams opened together do not all reconnect together), or when the gateway drains, the stream
//! ends cleanly and the client reconnects with `Last-Event-ID`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderName};
use http::{HeaderValue, Response, StatusCode};
use tokio::sync::watch;
use tokio::time::Instant;

use super::metrics::{HeldKind, HeldOutcome};
use super::snapshot::{Snapshot, State};
use super::{Fresh, Held, Hub, NotNow, jittered_deadline, render};
use crate::cache::CacheOutcome;
use crate::cache::coalesce::Role;
use crate::cache::etag;
use crate::edge::error::GatewayError;
use crate::edge::response::{Body, NO_STORE, X_CACHE};
use crate::edge::routes::RunRequest;
use crate::proxy::Answer;

const TEXT_EVENT_STREAM: HeaderValue = HeaderValue::from_static("text/event-stream");
/// `x-accel-buffering: no`: nginx (and proxies that follow it) pass each frame on at once.
const X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");
/// The comment written every `watch.sse_keepalive`.
const KEEPALIVE: &[u8] = b": keep-alive\n\n";

/// Answers `request` (a GET asking for `text/event-stream`).
pub(super) async fn serve(hub: Arc<Hub>, request: RunRequest) -> Response<Body> {
    // Frames carry the run's body: never a 304 for the client's own If-None-Match.
    let request = RunRequest {
        if_none_match: None,
        ..request
    };
    if let Some(entry) = hub.runs.hit(&request.id).await {
        if !entry.is_terminal() {
            // A remembered 404.
            return hub.runs.render_hit(&entry, &request);
        }
        let state = State::Ended(entry.etag());
        let snapshot = Snapshot::new(Answer::Cached { entry, fresh: false }, state);
        return ended(&hub, &snapshot, &request, CacheOutcome::Hit);
    }
    let current = hub
        .current_or_fetch(&request, request.last_event_id.as_ref())
        .await;
    let (current, fresh) = match current {
        Ok(current) => current,
        Err(NotNow::Full) => return too_many(&request),
        // Upstream is failing for now: a stream that only says when to come back, since any
        // answer but a 200 stream would make a browser give up for good.
        Err(NotNow::Failed(failed)) => return retry_later(&hub, failed.body().outcome()),
    };
    let outcome = stream_outcome(&current, fresh);
    let version = match &current.state {
        State::Stopped => return render(&hub, &current, fresh, &request),
        State::Ended(_) => return ended(&hub, &current, &request, outcome),
        State::Going(version) => version.clone(),
    };
    let mut first = VecDeque::from([prelude(hub.settings.sse_retry).freeze()]);
    if !resumes(&request, &version) {
        first.push_back(shared_frame(&hub, &current, &request, &version));
    }
    if hub.is_shutting_down() {
        let whole: Vec<u8> = first.iter().flat_map(|piece| piece.iter().copied()).collect();
        return stream_response(Body::new(whole.into(), Some(outcome)));
    }
    let held = match hub.hold(&request.id, HeldKind::Sse, &current) {
        Ok(held) => held,
        Err(_) => return too_many(&request),
    };
    let now = Instant::now();
    let live = Live {
        updates: held.updates(),
        shutdown: held.shutdown(),
        hub: Arc::clone(&hub),
        held,
        request,
        last: version,
        first,
        keepalive: hub.settings.sse_keepalive,
        next_keepalive: now,
        closes_at: now + jittered_deadline(hub.settings.max_stream_duration),
        done: false,
    };
    let frames = futures_util::stream::unfold(live, Live::next);
    stream_response(Body::streaming(Box::pin(frames), outcome))
}

/// Why a stream waiting for its next piece woke up.
enum Wake {
    Shutdown,
    Closing,
    Changed,
    KeepAlive,
}

/// An open stream: what it has sent and when it must write next.
struct Live {
    held: Held,
    updates: watch::Receiver<Snapshot>,
    shutdown: watch::Receiver<bool>,
    hub: Arc<Hub>,
    request: RunRequest,
    /// The version of the last `run` frame.
    last: HeaderValue,
    /// What is sent before any change: the `retry:` line, the current state's frame.
    first: VecDeque<Bytes>,
    keepalive: Duration,
    next_keepalive: Instant,
    closes_at: Instant,
    done: bool,
}

impl Live {
    /// The next piece of the stream, or `None` to close it.
    async fn next(mut self) -> Option<(Bytes, Self)> {
        if self.done {
            return None;
        }
        if let Some(first) = self.first.pop_front() {
            return Some(self.written(first));
        }
        loop {
            let wake = tokio::select! {
                biased;
                _ = self.shutdown.wait_for(|draining| *draining) => Wake::Shutdown,
                () = tokio::time::sleep_until(self.closes_at) => Wake::Closing,
                changed = self.updates.changed() => match changed {
                    Ok(()) => Wake::Changed,
                    Err(_) => Wake::Closing,
                },
                () = tokio::time::sleep_until(self.next_keepalive) => Wake::KeepAlive,
            };
            match wake {
                Wake::Shutdown => {
                    self.held.metrics().answered(HeldOutcome::Shutdown);
                    return None;
                }
                Wake::Closing => {
                    self.held.metrics().answered(HeldOutcome::Timeout);
                    return None;
                }
                Wake::KeepAlive => return Some(self.written(Bytes::from_static(KEEPALIVE))),
                Wake::Changed => {
                    let latest = self.updates.borrow_and_update().clone();
                    if let Some(frame) = self.frame_for(&latest) {
                        return Some(self.written(frame));
                    }
                }
            }
        }
    }

    /// The frame a new state makes, if it is new to this stream.
    fn frame_for(&mut self, snapshot: &Snapshot) -> Option<Bytes> {
        let (frame, outcome) = match &snapshot.state {
            State::Going(version) if *version == self.last => return None,
            State::Going(version) => {
                self.last = version.clone();
                let frame = shared_frame(&self.hub, snapshot, &self.request, version);
                (frame, HeldOutcome::Changed)
            }
            State::Ended(version) => {
                self.done = true;
                let frame = match version {
                    Some(version) => shared_frame(&self.hub, snapshot, &self.request, version),
                    None => end_frame(&self.hub, snapshot, &self.request, &self.last),
                };
                (frame, HeldOutcome::Ended)
            }
            State::Stopped => {
                self.done = true;
                // The gateway's JSON error names this client's request id: framed for it alone.
                let error = body(&self.hub, snapshot, &self.request);
                (frame("error", Some(&self.last), &error), HeldOutcome::Error)
            }
        };
        self.held.metrics().answered(outcome);
        Some(frame)
    }

    fn written(mut self, piece: Bytes) -> (Bytes, Self) {
        self.next_keepalive = Instant::now() + self.keepalive;
        (piece, self)
    }
}

/// The frame of a run's state with a version (`run`, or `end` once ended), built once and shared
/// by every stream that sends it.
fn shared_frame(hub: &Hub, snapshot: &Snapshot, request: &RunRequest, version: &HeaderValue) -> Bytes {
    snapshot.frame(|| {
        let event = if snapshot.is_final() { "end" } else { "run" };
        frame(event, Some(version), &body(hub, snapshot, request))
    })
}

/// The `end` frame of an ended run without a version of its own, under the last version sent.
fn end_frame(hub: &Hub, snapshot: &Snapshot, request: &RunRequest, last: &HeaderValue) -> Bytes {
    frame("end", Some(last), &body(hub, snapshot, request))
}

/// 503 `TOO_MANY_WAITERS`: `watch.max_held` clients are held already.
fn too_many(request: &RunRequest) -> Response<Body> {
    GatewayError::TooManyWaiters {
        retry_after_secs: super::FULL_RETRY_AFTER_SECS,
    }
    .into_response(Some(&request.ids))
}

/// Upstream could not be asked for the run right now (5xx, a timeout, a 429 or the budget): a
/// 200 stream of a `retry:` line and a comment, then close, so the browser reconnects after
/// `watch.sse_retry` instead of failing for good as it would on an error status.
fn retry_later(hub: &Hub, outcome: Option<CacheOutcome>) -> Response<Body> {
    let mut stream = prelude(hub.settings.sse_retry);
    stream.put_slice(b": upstream did not answer for this run; reconnect\n\n");
    stream_response(Body::new(
        stream.freeze(),
        Some(outcome.unwrap_or(CacheOutcome::Error)),
    ))
}

/// A run that has ended: 204 when the client's `Last-Event-ID` names it (it has it; browsers stop
/// reconnecting on 204), otherwise a stream of its one `end` frame.
fn ended(hub: &Hub, snapshot: &Snapshot, request: &RunRequest, outcome: CacheOutcome) -> Response<Body> {
    if let Some(version) = snapshot.version()
        && resumes(request, version)
    {
        let mut response = Response::new(Body::new(Bytes::new(), Some(outcome)));
        *response.status_mut() = StatusCode::NO_CONTENT;
        response.headers_mut().insert(CACHE_CONTROL, NO_STORE);
        return response;
    }
    let mut stream = prelude(hub.settings.sse_retry);
    let end = match snapshot.version() {
        Some(version) => shared_frame(hub, snapshot, request, version),
        None => frame("end", None, &body(hub, snapshot, request)),
    };
    stream.extend_from_slice(&end);
    stream_response(Body::new(stream.freeze(), Some(outcome)))
}

/// 200 `text/event-stream`, never stored, never buffered by a proxy in between.
fn stream_response(body: Body) -> Response<Body> {
    let outcome = body.outcome();
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, TEXT_EVENT_STREAM);
    headers.insert(CACHE_CONTROL, NO_STORE);
    headers.insert(X_ACCEL_BUFFERING, HeaderValue::from_static("no"));
    if let Some(value) = outcome.and_then(CacheOutcome::header_value) {
        headers.insert(X_CACHE, value);
    }
    response
}

/// How a stream's first state was produced, for `x-cache` and the request metrics.
fn stream_outcome(current: &Snapshot, fresh: Fresh) -> CacheOutcome {
    match (fresh, &current.answer) {
        (Fresh::FromWatcher | Fresh::Fetched(Role::Waiter), _) => CacheOutcome::Coalesced,
        (Fresh::Fetched(Role::Leader), Answer::Cached { fresh: true, .. }) => CacheOutcome::Miss,
        (Fresh::Fetched(Role::Leader), Answer::Cached { fresh: false, .. }) => CacheOutcome::Hit,
        (Fresh::Fetched(Role::Leader), _) => CacheOutcome::Pass,
    }
}

/// Whether the client's `Last-Event-ID` names `version`: it has seen that frame.
fn resumes(request: &RunRequest, version: &HeaderValue) -> bool {
    request
        .last_event_id
        .as_ref()
        .is_some_and(|last| etag::names(last, version))
}

/// The body a plain request would get for this state (the run, or the JSON error).
fn body(hub: &Hub, snapshot: &Snapshot, request: &RunRequest) -> Bytes {
    hub.runs
        .render(snapshot.answer.clone(), Role::Leader, request)
        .body_mut()
        .take_data()
}

/// `retry: <ms>` and a blank line.
fn prelude(retry: Duration) -> BytesMut {
    let mut out = BytesMut::with_capacity(32);
    out.put_slice(format!("retry: {}\n\n", retry.as_millis()).as_bytes());
    out
}

/// One event: `id:` (when given), `event:`, one `data:` line per line of `data`, a blank line.
pub fn frame(event: &str, id: Option<&HeaderValue>, data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + event.len() + 64);
    if let Some(id) = id {
        out.put_slice(b"id: ");
        out.put_slice(id.as_bytes());
        out.put_u8(b'\n');
    }
    out.put_slice(b"event: ");
    out.put_slice(event.as_bytes());
    out.put_u8(b'\n');
    for line in lines(data) {
        out.put_slice(b"data: ");
        out.put_slice(line);
        out.put_u8(b'\n');
    }
    out.put_u8(b'\n');
    out.freeze()
}

/// `data` split at CRLF, LF and CR, the three line ends of the event-stream format.
fn lines(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(data);
    std::iter::from_fn(move || {
        let text = rest?;
        match text.iter().position(|&byte| byte == b'\n' || byte == b'\r') {
            None => {
                rest = None;
                Some(text)
            }
            Some(end) => {
                let skip = if text[end..].starts_with(b"\r\n") { 2 } else { 1 };
                rest = Some(&text[end + skip..]);
                Some(&text[..end])
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_has_its_id_event_and_one_data_line_per_line() {
        let id = HeaderValue::from_static("W/\"abc\"");
        let framed = frame("run", Some(&id), b"{\"a\":1,\n\"b\":2}\r\n\r{}");
        assert_eq!(
            &framed[..],
            b"id: W/\"abc\"\nevent: run\ndata: {\"a\":1,\ndata: \"b\":2}\ndata: \ndata: {}\n\n"
        );
        assert_eq!(&frame("end", None, b"{}")[..], b"event: end\ndata: {}\n\n");
    }

    #[test]
    fn a_body_without_line_ends_is_one_line() {
        assert_eq!(lines(b"{\"status\":\"QUEUED\"}").count(), 1);
        assert_eq!(lines(b"").collect::<Vec<_>>(), [b"" as &[u8]]);
        assert_eq!(lines(b"a\n").collect::<Vec<_>>(), [b"a" as &[u8], b""]);
    }

    #[test]
    fn the_prelude_gives_the_retry_in_milliseconds() {
        assert_eq!(&prelude(Duration::from_secs(3))[..], b"retry: 3000\n\n");
    }
}

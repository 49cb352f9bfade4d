//! An event-stream client for the push tests: opens `Accept: text/event-stream` on its own
//! HTTP/1.1 connection and hands back the stream's blocks one at a time, as they arrive.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::PATIENCE;

/// One block of the stream (the lines up to a blank line), its fields as the event-stream format
/// reads them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Event {
    pub id: Option<String>,
    pub event: Option<String>,
    /// The `data:` lines, joined with `\n`.
    pub data: Option<String>,
    pub retry: Option<String>,
    /// Comment lines (`: text`), without the colon and the space after it.
    pub comments: Vec<String>,
}

impl Event {
    /// A block of comments only: a keep-alive.
    pub fn is_comment(&self) -> bool {
        self.id.is_none()
            && self.event.is_none()
            && self.data.is_none()
            && self.retry.is_none()
            && !self.comments.is_empty()
    }

    /// The event's type (`run`, `end`, `error`), or "" when it has none.
    pub fn kind(&self) -> &str {
        self.event.as_deref().unwrap_or_default()
    }

    pub fn id(&self) -> &str {
        self.id.as_deref().unwrap_or_default()
    }

    /// `data` read as JSON.
    pub fn json(&self) -> serde_json::Value {
        let data = self
            .data
            .as_deref()
            .unwrap_or_else(|| panic!("no data in {self:?}"));
        serde_json::from_str(data).unwrap_or_else(|error| panic!("data is not JSON ({error}): {data:?}"))
    }

    fn parse(block: &str) -> Self {
        let mut event = Self::default();
        for line in block.split('\n').filter(|line| !line.is_empty()) {
            if let Some(comment) = line.strip_prefix(':') {
                event
                    .comments
                    .push(comment.strip_prefix(' ').unwrap_or(comment).to_owned());
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
            match field {
                "id" => event.id = Some(value),
                "event" => event.event = Some(value),
                "retry" => event.retry = Some(value),
                "data" => {
                    event.data = Some(match event.data.take() {
                        Some(data) => format!("{data}\n{value}"),
                        None => value,
                    });
                }
                other => panic!("unknown field {other:?} in block {block:?}"),
            }
        }
        event
    }
}

/// An open response to a stream request (or whatever the gateway answered instead).
pub struct EventStream {
    pub status: StatusCode,
    pub headers: HeaderMap,
    body: Incoming,
    buffer: Vec<u8>,
    /// Every body byte received so far.
    pub received: Vec<u8>,
    ended: bool,
    connection: JoinHandle<()>,
}

/// Sends `GET path` with `Accept: text/event-stream` (and `headers`) on a new connection to
/// `addr`, and returns once the response head has arrived.
pub async fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> EventStream {
    let tcp = tokio::time::timeout(PATIENCE, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("HTTP/1.1 handshake");
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut request = Request::get(path)
        .header("host", addr.to_string())
        .header("accept", "text/event-stream");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Empty::<Bytes>::new()).expect("request");
    let response = tokio::time::timeout(PATIENCE, sender.send_request(request))
        .await
        .unwrap_or_else(|_| panic!("{path}: no response head in time"))
        .unwrap_or_else(|error| panic!("{path}: {error}"));
    let (parts, body) = response.into_parts();
    EventStream {
        status: parts.status,
        headers: parts.headers,
        body,
        buffer: Vec::new(),
        received: Vec::new(),
        ended: false,
        connection,
    }
}

impl EventStream {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    /// The next block, comments included; `None` once the body has ended cleanly (a body that
    /// ends in error, or mid-block, fails the test).
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|pair| pair == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let block = String::from_utf8(block).expect("utf-8 stream");
                return Some(Event::parse(&block));
            }
            if self.ended {
                assert!(
                    self.buffer.is_empty(),
                    "the stream ended mid-block: {:?}",
                    String::from_utf8_lossy(&self.buffer)
                );
                return None;
            }
            let frame = tokio::time::timeout(PATIENCE, self.body.frame())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "nothing more on the stream in time; so far: {:?}",
                        String::from_utf8_lossy(&self.received)
                    )
                });
            match frame {
                None => self.ended = true,
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        self.buffer.extend_from_slice(data);
                        self.received.extend_from_slice(data);
                    }
                }
                Some(Err(error)) => panic!(
                    "the stream broke ({error}) instead of ending cleanly; so far: {:?}",
                    String::from_utf8_lossy(&self.received)
                ),
            }
        }
    }

    /// The next block that is not a comment (keep-alives are skipped), or `None` at the end.
    pub async fn next_event(&mut self) -> Option<Event> {
        loop {
            match self.next().await {
                Some(event) if event.is_comment() => continue,
                other => return other,
            }
        }
    }

    /// The next block that is not a comment; the stream ending first fails the test.
    pub async fn expect_event(&mut self) -> Event {
        self.next_event().await.unwrap_or_else(|| {
            panic!(
                "the stream ended; it had sent {:?}",
                String::from_utf8_lossy(&self.received)
            )
        })
    }

    /// Waits for the body to end cleanly, with nothing but comments before it.
    pub async fn expect_closed(&mut self) {
        if let Some(event) = self.next_event().await {
            panic!("expected the stream to end, got {event:?}");
        }
    }

    /// The whole body of an answer that is not a stream (a 204, a JSON error).
    pub async fn into_body(mut self) -> Bytes {
        while self.next_raw().await {}
        Bytes::from(std::mem::take(&mut self.received))
    }

    async fn next_raw(&mut self) -> bool {
        let frame = tokio::time::timeout(PATIENCE, self.body.frame())
            .await
            .expect("the body ends in time");
        match frame {
            None => false,
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    self.received.extend_from_slice(data);
                }
                true
            }
            Some(Err(error)) => panic!("the body broke: {error}"),
        }
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        // Closes the connection: the client goes away.
        self.connection.abort();
    }
}

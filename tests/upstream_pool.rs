//! Upstream connections: kept alive and reused, replaced when the upstream closes them, never
//! shared by two exchanges at once; a request that meets a connection the upstream has just closed
//! still gets its answer. Checked against keep-alive upstreams on real sockets that count their
//! connections, one of which closes idle connections when the test says.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use http::header::HOST;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use plextera_gateway::upstream_pool::Pool;
use prometheus::IntCounter;
use support::{TestGateway, run_body, test_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An HTTP/1.1 upstream that answers every run as still PROCESSING (so every request goes
/// upstream) and counts the connections it accepts. With `close_after_answer` it closes each
/// connection right after its answer, without announcing it (no `Connection: close`).
struct CountingUpstream {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
    answered: Arc<AtomicUsize>,
}

impl CountingUpstream {
    async fn start(close_after_answer: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let answered = Arc::new(AtomicUsize::new(0));
        let (accepts, answers) = (Arc::clone(&accepted), Arc::clone(&answered));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                accepts.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, close_after_answer, Arc::clone(&answers)));
            }
        });
        Self {
            addr,
            accepted,
            answered,
        }
    }

    fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn answered(&self) -> usize {
        self.answered.load(Ordering::SeqCst)
    }
}

async fn serve(mut stream: TcpStream, close_after_answer: bool, answered: Arc<AtomicUsize>) {
    let mut buffer = Vec::new();
    loop {
        let Some(head_end) = find_head_end(&buffer) else {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(read) => buffer.extend_from_slice(&chunk[..read]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
        buffer.drain(..head_end);
        let id = head
            .split_whitespace()
            .nth(1)
            .and_then(|path| path.rsplit('/').next())
            .unwrap_or("unknown")
            .to_owned();
        let body = run_body(&id, "PROCESSING", 200);
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        if stream.write_all(answer.as_bytes()).await.is_err() || stream.write_all(&body).await.is_err() {
            return;
        }
        answered.fetch_add(1, Ordering::SeqCst);
        if close_after_answer {
            return;
        }
    }
}

fn find_head_end(buffer: &[u8]) -> Option<usize> {
    buffer
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .map(|start| start + 4)
}

#[tokio::test]
async fn sequential_calls_share_one_kept_alive_connection() {
    let upstream = CountingUpstream::start(false).await;
    let gateway = TestGateway::start_with(test_config(&upstream.base_url())).await;
    for index in 0..20 {
        let response = gateway.get_run(&format!("run_{index}")).await;
        assert_eq!(response.status, StatusCode::OK);
        assert_eq!(response.x_cache(), Some("PASS"));
    }
    assert_eq!(upstream.answered(), 20);
    assert_eq!(
        upstream.accepted(),
        1,
        "every call after the first reused the connection"
    );
}

#[tokio::test]
async fn a_connection_the_upstream_closed_is_replaced_without_failing_a_request() {
    let upstream = CountingUpstream::start(true).await;
    let gateway = TestGateway::start_with(test_config(&upstream.base_url())).await;
    for index in 0..10 {
        let response = gateway.get_run(&format!("run_{index}")).await;
        assert_eq!(response.status, StatusCode::OK, "request {index}");
        assert_eq!(response.json()["id"], format!("run_{index}").as_str());
    }
    assert_eq!((upstream.answered(), upstream.accepted()), (10, 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_use_a_connection_each_and_keep_them_for_later() {
    let upstream = CountingUpstream::start(false).await;
    let gateway = TestGateway::start_with(test_config(&upstream.base_url())).await;
    for round in 0..3 {
        let ids: Vec<String> = (0..10).map(|index| format!("run_{round}_{index}")).collect();
        let responses = join_all(ids.iter().map(|id| gateway.get_run(id))).await;
        for (index, response) in responses.iter().enumerate() {
            assert_eq!(response.status, StatusCode::OK);
            // Each answer is its own run's: no two exchanges ever shared a connection.
            assert_eq!(response.json()["id"], format!("run_{round}_{index}").as_str());
        }
    }
    assert_eq!(upstream.answered(), 30);
    let accepted = upstream.accepted();
    assert!(
        (1..=10).contains(&accepted),
        "{accepted} connections for 3 rounds of 10"
    );
}

/// How a [`ClosingUpstream`] treats the connections that are idle when the test tells it to act.
#[derive(Clone, Copy)]
enum IdleClose {
    /// Close them at once, as an upstream's idle timeout would.
    Now,
    /// Close them the moment their next request arrives, unanswered: the close crossed the request.
    OnNextRequest,
    /// The same, with a reset (RST) instead of an orderly close (FIN).
    ResetOnNextRequest,
}

/// An HTTP/1.1 upstream that keeps each connection open after its answer until the test tells it
/// to close the idle ones, and reports each connection it closed that way.
struct ClosingUpstream {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
    answered: Arc<AtomicUsize>,
    close_idle: Arc<tokio::sync::Notify>,
    closed: tokio::sync::mpsc::UnboundedReceiver<()>,
}

impl ClosingUpstream {
    async fn start(how: IdleClose) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let answered = Arc::new(AtomicUsize::new(0));
        let close_idle = Arc::new(tokio::sync::Notify::new());
        let (closed_tx, closed) = tokio::sync::mpsc::unbounded_channel();
        let (accepts, answers, close) = (
            Arc::clone(&accepted),
            Arc::clone(&answered),
            Arc::clone(&close_idle),
        );
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                accepts.fetch_add(1, Ordering::SeqCst);
                let connection = IdleConnection {
                    how,
                    close_idle: Arc::clone(&close),
                    closed: closed_tx.clone(),
                    answered: Arc::clone(&answers),
                };
                tokio::spawn(connection.serve(stream));
            }
        });
        Self {
            addr,
            accepted,
            answered,
            close_idle,
            closed,
        }
    }

    /// Tells every idle connection to close as `IdleClose` says. With `Now`, returns once one has.
    async fn close_idle_connections(&mut self, how: IdleClose) {
        self.close_idle.notify_waiters();
        if let IdleClose::Now = how {
            self.closed
                .recv()
                .await
                .expect("the upstream closed a connection");
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn answered(&self) -> usize {
        self.answered.load(Ordering::SeqCst)
    }
}

struct IdleConnection {
    how: IdleClose,
    close_idle: Arc<tokio::sync::Notify>,
    closed: tokio::sync::mpsc::UnboundedSender<()>,
    answered: Arc<AtomicUsize>,
}

impl IdleConnection {
    async fn serve(self, mut stream: TcpStream) {
        let mut buffer = Vec::new();
        let mut told_to_close = false;
        loop {
            let told = self.close_idle.notified();
            tokio::pin!(told);
            told.as_mut().enable();
            let head_end = loop {
                if let Some(end) = find_head_end(&buffer) {
                    break end;
                }
                let mut chunk = [0u8; 4096];
                tokio::select! {
                    read = stream.read(&mut chunk) => match read {
                        Ok(0) | Err(_) => return,
                        Ok(read) => buffer.extend_from_slice(&chunk[..read]),
                    },
                    () = &mut told, if buffer.is_empty() && !told_to_close => match self.how {
                        IdleClose::Now => return self.close(stream),
                        IdleClose::OnNextRequest | IdleClose::ResetOnNextRequest => told_to_close = true,
                    },
                }
            };
            if told_to_close {
                return self.close(stream);
            }
            let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
            buffer.drain(..head_end);
            let id = head
                .split_whitespace()
                .nth(1)
                .and_then(|path| path.rsplit('/').next());
            let body = run_body(id.unwrap_or("unknown"), "PROCESSING", 200);
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            if stream.write_all(answer.as_bytes()).await.is_err() || stream.write_all(&body).await.is_err() {
                return;
            }
            self.answered.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn close(&self, stream: TcpStream) {
        if let IdleClose::ResetOnNextRequest = self.how {
            stream.set_zero_linger().expect("SO_LINGER 0");
        }
        drop(stream);
        let _ = self.closed.send(());
    }
}

fn plain_pool(addr: std::net::SocketAddr, retries: &IntCounter) -> Pool {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    let origin = format!("http://{addr}/").parse().expect("origin");
    Pool::new(connector, origin, Duration::from_secs(90), retries.clone())
}

fn get_run(addr: std::net::SocketAddr, id: &str) -> Request<Empty<Bytes>> {
    Request::get(format!("/api/public/v1/workflow-runs/{id}"))
        .header(HOST, addr.to_string())
        .body(Empty::new())
        .expect("request")
}

/// Five rounds: a GET through the pool, its answer read whole, the connection given back, then
/// the upstream closes its idle connections as `how` says.
async fn get_through_closing_connections(how: IdleClose) -> (ClosingUpstream, IntCounter) {
    let mut upstream = ClosingUpstream::start(how).await;
    let retries = IntCounter::new("retries", "retries").expect("counter");
    let pool = plain_pool(upstream.addr, &retries);
    for round in 0..5 {
        let id = format!("run_{round}");
        let (response, lease) = pool
            .send(|| get_run(upstream.addr, &id))
            .await
            .unwrap_or_else(|error| panic!("round {round}: {error:?}"));
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await.expect("body").to_bytes();
        assert!(
            String::from_utf8_lossy(&body).contains(&id),
            "round {round}: its own run"
        );
        pool.put(lease);
        upstream.close_idle_connections(how).await;
    }
    (upstream, retries)
}

/// The upstream closes an idle connection as the gateway reuses it, before the gateway has read
/// the close: hyper hands the unwritten request back and the pool sends it on a new connection.
#[tokio::test]
async fn a_request_not_yet_written_to_a_closed_connection_goes_out_on_a_new_one() {
    let (upstream, retries) = get_through_closing_connections(IdleClose::Now).await;
    assert_eq!((upstream.answered(), upstream.accepted()), (5, 5));
    assert_eq!(retries.get(), 0, "nothing was sent twice");
}

/// The close crosses the request on the wire: the request was written and the connection ends
/// without an answer. A GET is safe to repeat: it is sent once more, on a fresh connection.
#[tokio::test]
async fn a_request_written_as_the_upstream_closed_the_connection_is_sent_once_more() {
    let (upstream, retries) = get_through_closing_connections(IdleClose::OnNextRequest).await;
    assert_eq!(upstream.answered(), 5);
    assert_eq!(
        upstream.accepted(),
        5,
        "one new connection per round after the first"
    );
    assert_eq!(
        retries.get(),
        4,
        "rounds 1 to 4 each met a connection closed under them"
    );
}

#[tokio::test]
async fn a_request_written_as_the_upstream_reset_the_connection_is_sent_once_more() {
    let (upstream, retries) = get_through_closing_connections(IdleClose::ResetOnNextRequest).await;
    assert_eq!((upstream.answered(), upstream.accepted()), (5, 5));
    assert_eq!(retries.get(), 4);
}

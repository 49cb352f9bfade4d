//! The upstream pool driven directly on loopback sockets: each retry branch, its limits
//! (`pool_idle_timeout`, `pool_max_idle`, `pool_max_connection_age`), and the HTTP/2 connection's
//! keep-alive PINGs, idle retirement and the one connect concurrent cold calls share.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use http::header::HOST;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use plextera_gateway::upstream::pool::{Pool, PoolError, PoolSettings};
use prometheus::IntCounter;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use support::run_body;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// Bound on every wait for something the pool should do on its own.
const WITHIN: Duration = Duration::from_secs(5);

/// A loopback server whose connections are served by `serve`, with a count of connections made
/// and a signal for each that ended.
struct Upstream {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    ended: mpsc::UnboundedReceiver<usize>,
}

impl Upstream {
    async fn start<F, Fut>(serve: F) -> Self
    where
        F: Fn(TcpStream, usize) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let (ended_tx, ended) = mpsc::unbounded_channel();
        let counter = Arc::clone(&accepted);
        let serve = Arc::new(serve);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let index = counter.fetch_add(1, Ordering::SeqCst);
                let (serve, ended) = (Arc::clone(&serve), ended_tx.clone());
                tokio::spawn(async move {
                    serve(stream, index).await;
                    let _ = ended.send(index);
                });
            }
        });
        Self {
            addr,
            accepted,
            ended,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Waits until the connection numbered `index` (from 0) has ended.
    async fn wait_ended(&mut self, index: usize) {
        tokio::time::timeout(WITHIN, async {
            while let Some(ended) = self.ended.recv().await {
                if ended == index {
                    return;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("connection {index} still open after {WITHIN:?}"));
    }
}

/// Reads one request head; `false` when the connection ended first.
async fn read_head(stream: &mut TcpStream) -> bool {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return false,
        }
    }
    true
}

/// Serves every request on the connection with a run still going, until the client closes it.
async fn answer_every_request(mut stream: TcpStream) {
    while read_head(&mut stream).await {
        let body = run_body("run_1", "PROCESSING", 0);
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        if stream.write_all(head.as_bytes()).await.is_err() || stream.write_all(&body).await.is_err() {
            return;
        }
    }
}

fn connector(ca_pem: Option<&str>) -> hyper_rustls::HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    let mut roots = rustls::RootCertStore::empty();
    if let Some(pem) = ca_pem {
        let certificate = CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM certificate");
        roots.add(certificate).expect("root");
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http)
}

fn http1_pool(addr: SocketAddr, settings: PoolSettings) -> (Pool, IntCounter) {
    let retries = IntCounter::new("retries", "retries").expect("counter");
    let origin = format!("http://{addr}/").parse().expect("origin");
    (
        Pool::new(connector(None), origin, settings, retries.clone()),
        retries,
    )
}

fn get(host: &str) -> Request<Empty<Bytes>> {
    Request::get("/api/public/v1/workflow-runs/run_1")
        .header(HOST, host)
        .body(Empty::new())
        .expect("request")
}

/// One exchange through the pool, its answer read whole and the connection given back.
async fn exchange(pool: &Pool, host: &str) -> Result<StatusCode, PoolError> {
    let (response, lease) = pool.send(|| get(host)).await?;
    let status = response.status();
    response.into_body().collect().await.expect("body");
    pool.put(lease);
    Ok(status)
}

#[tokio::test]
async fn a_fresh_connection_that_fails_under_a_request_is_not_retried() {
    // Every connection reads the request and closes without an answer.
    let upstream = Upstream::start(|mut stream, _| async move {
        read_head(&mut stream).await;
    })
    .await;
    let (pool, retries) = http1_pool(upstream.addr, PoolSettings::default());
    let error = exchange(&pool, &upstream.addr.to_string())
        .await
        .expect_err("no answer came");
    assert!(matches!(error, PoolError::Request(_)), "{error:?}");
    assert_eq!(retries.get(), 0, "a fresh connection's failure is the upstream's");
    assert_eq!(upstream.accepted(), 1);
}

#[tokio::test]
async fn a_malformed_answer_on_a_kept_connection_is_not_retried() {
    // The first exchange is answered properly, the second with something that is not HTTP.
    let upstream = Upstream::start(|mut stream, _| async move {
        let body = run_body("run_1", "PROCESSING", 0);
        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
        if !read_head(&mut stream).await
            || stream.write_all(head.as_bytes()).await.is_err()
            || stream.write_all(&body).await.is_err()
            || !read_head(&mut stream).await
        {
            return;
        }
        let _ = stream.write_all(b"NOT HTTP AT ALL\r\n\r\n").await;
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest).await;
    })
    .await;
    let (pool, retries) = http1_pool(upstream.addr, PoolSettings::default());
    let host = upstream.addr.to_string();
    assert_eq!(exchange(&pool, &host).await.expect("first"), StatusCode::OK);
    let error = exchange(&pool, &host).await.expect_err("malformed");
    assert!(matches!(error, PoolError::Request(_)), "{error:?}");
    assert_eq!(
        retries.get(),
        0,
        "only a connection that closed under a request is retried"
    );
    assert_eq!(upstream.accepted(), 1, "no second connection was tried");
}

#[tokio::test]
async fn a_connection_idle_past_the_idle_timeout_is_not_reused() {
    let mut upstream = Upstream::start(|stream, _| answer_every_request(stream)).await;
    let settings = PoolSettings {
        idle_timeout: Duration::from_millis(500),
        ..PoolSettings::default()
    };
    let (pool, _) = http1_pool(upstream.addr, settings);
    let host = upstream.addr.to_string();
    exchange(&pool, &host).await.expect("first");
    exchange(&pool, &host).await.expect("reused at once");
    assert_eq!(upstream.accepted(), 1);
    // The timeout is what is under test: let it pass.
    tokio::time::sleep(Duration::from_millis(600)).await;
    exchange(&pool, &host).await.expect("after the idle timeout");
    assert_eq!(upstream.accepted(), 2, "the idle connection was replaced");
    upstream.wait_ended(0).await;
}

#[tokio::test]
async fn a_connection_past_its_maximum_age_takes_no_new_request() {
    let mut upstream = Upstream::start(|stream, _| answer_every_request(stream)).await;
    let settings = PoolSettings {
        max_connection_age: Duration::from_millis(50),
        ..PoolSettings::default()
    };
    let (pool, _) = http1_pool(upstream.addr, settings);
    let host = upstream.addr.to_string();
    exchange(&pool, &host).await.expect("first");
    tokio::time::sleep(Duration::from_millis(80)).await;
    exchange(&pool, &host).await.expect("second");
    assert_eq!(upstream.accepted(), 2, "the old connection was not reused");
    upstream.wait_ended(0).await;
}

#[tokio::test]
async fn idle_connections_beyond_the_maximum_are_closed() {
    let mut upstream = Upstream::start(|stream, _| answer_every_request(stream)).await;
    let settings = PoolSettings {
        max_idle: 1,
        ..PoolSettings::default()
    };
    let (pool, _) = http1_pool(upstream.addr, settings);
    let host = upstream.addr.to_string();
    // Two exchanges at once need two connections; given back, only one is kept.
    let (first, first_lease) = pool.send(|| get(&host)).await.expect("first");
    let (second, second_lease) = pool.send(|| get(&host)).await.expect("second");
    first.into_body().collect().await.expect("body");
    second.into_body().collect().await.expect("body");
    pool.put(first_lease);
    pool.put(second_lease);
    upstream.wait_ended(0).await;
    exchange(&pool, &host).await.expect("on the kept one");
    assert_eq!(upstream.accepted(), 2);
}

/// Serves one connection as an HTTP/2 (by ALPN) upstream over TLS answering every run as still
/// going.
async fn serve_http2(acceptor: &tokio_rustls::TlsAcceptor, stream: TcpStream) {
    let Ok(stream) = acceptor.accept(stream).await else {
        return;
    };
    let service = hyper::service::service_fn(|_request: Request<hyper::body::Incoming>| async {
        Ok::<_, std::convert::Infallible>(Response::new(Full::new(run_body("run_1", "PROCESSING", 0))))
    });
    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// An HTTP/2 (by ALPN) upstream over TLS answering every run as still going.
async fn http2_upstream() -> (Upstream, String) {
    let (acceptor, certificate_pem) = support::tls::localhost_acceptor(&[b"h2"]);
    let upstream = Upstream::start(move |stream, _| {
        let acceptor = acceptor.clone();
        async move {
            serve_http2(&acceptor, stream).await;
        }
    })
    .await;
    (upstream, certificate_pem)
}

fn http2_pool(addr: SocketAddr, ca_pem: &str, settings: PoolSettings) -> Pool {
    let retries = IntCounter::new("retries", "retries").expect("counter");
    let origin = format!("https://localhost:{}/", addr.port())
        .parse()
        .expect("origin");
    Pool::new(connector(Some(ca_pem)), origin, settings, retries)
}

#[tokio::test]
async fn concurrent_cold_calls_share_one_http2_connect() {
    let (upstream, ca_pem) = http2_upstream().await;
    let pool = http2_pool(upstream.addr, &ca_pem, PoolSettings::default());
    let host = format!("localhost:{}", upstream.addr.port());
    let statuses = join_all((0..20).map(|_| exchange(&pool, &host))).await;
    for status in statuses {
        assert_eq!(status.expect("answered"), StatusCode::OK);
    }
    assert_eq!(upstream.accepted(), 1, "one connection, multiplexed");
}

#[tokio::test]
async fn concurrent_cold_calls_share_a_failed_connect() {
    // Accepts and closes at once: the TLS handshake fails.
    let upstream = Upstream::start(|stream, _| async move { drop(stream) }).await;
    let (_, ca_pem) = support::tls::localhost_acceptor(&[b"h2"]);
    let pool = http2_pool(upstream.addr, &ca_pem, PoolSettings::default());
    let host = format!("localhost:{}", upstream.addr.port());
    let results = join_all((0..10).map(|_| exchange(&pool, &host))).await;
    for result in results {
        assert!(matches!(result, Err(PoolError::Connect(_))), "{result:?}");
    }
    assert_eq!(
        upstream.accepted(),
        1,
        "the waiters got the one connect's failure"
    );
}

/// One exchange, then the connection closes on the pool's own account (no request waiting), and
/// the next exchange goes out on a new one.
async fn assert_http2_connection_retired(settings: PoolSettings) {
    let (mut upstream, ca_pem) = http2_upstream().await;
    let pool = http2_pool(upstream.addr, &ca_pem, settings);
    let host = format!("localhost:{}", upstream.addr.port());
    exchange(&pool, &host).await.expect("first");
    upstream.wait_ended(0).await;
    exchange(&pool, &host).await.expect("on a new connection");
    assert_eq!(upstream.accepted(), 2);
}

#[tokio::test]
async fn an_idle_http2_connection_is_retired_after_the_idle_timeout() {
    assert_http2_connection_retired(PoolSettings {
        idle_timeout: Duration::from_millis(100),
        ..PoolSettings::default()
    })
    .await;
}

#[tokio::test]
async fn an_http2_connection_past_its_maximum_age_is_replaced() {
    assert_http2_connection_retired(PoolSettings {
        max_connection_age: Duration::from_millis(100),
        ..PoolSettings::default()
    })
    .await;
}

/// A relay in front of `target` that can stop carrying bytes, as a dead network path does: the
/// bytes are read and dropped, nothing is answered, nothing is closed. It reports each client
/// connection that closed.
async fn black_hole_relay(target: SocketAddr) -> (Upstream, watch::Sender<bool>) {
    let (swallow, swallowing) = watch::channel(false);
    let relay = Upstream::start(move |client, _| {
        let swallowing = swallowing.clone();
        async move {
            let Ok(server) = TcpStream::connect(target).await else {
                return;
            };
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            let upstream_swallowing = swallowing.clone();
            let downstream = tokio::spawn(async move {
                let mut buffer = [0u8; 16 * 1024];
                while let Ok(read) = server_read.read(&mut buffer).await {
                    if read == 0 {
                        return;
                    }
                    let carry = !*upstream_swallowing.borrow();
                    if carry && client_write.write_all(&buffer[..read]).await.is_err() {
                        return;
                    }
                }
            });
            // Ends when the client closes its side: that is the signal the tests wait for.
            let mut buffer = [0u8; 16 * 1024];
            while let Ok(read) = client_read.read(&mut buffer).await {
                if read == 0 {
                    break;
                }
                let carry = !*swallowing.borrow();
                if carry && server_write.write_all(&buffer[..read]).await.is_err() {
                    break;
                }
            }
            downstream.abort();
        }
    })
    .await;
    (relay, swallow)
}

#[tokio::test]
async fn a_silently_dead_http2_connection_is_closed_by_its_keepalive_pings() {
    let (upstream, ca_pem) = http2_upstream().await;
    let (mut relay, swallow) = black_hole_relay(upstream.addr).await;
    let settings = PoolSettings {
        http2_keepalive_interval: Duration::from_millis(100),
        http2_keepalive_timeout: Duration::from_millis(300),
        ..PoolSettings::default()
    };
    let pool = http2_pool(relay.addr, &ca_pem, settings);
    let host = format!("localhost:{}", relay.addr.port());
    exchange(&pool, &host).await.expect("first");
    swallow.send_replace(true);
    // Unanswered PINGs: the pool closes the connection on its own, with no request waiting on it.
    relay.wait_ended(0).await;
    swallow.send_replace(false);
    let status = tokio::time::timeout(WITHIN, exchange(&pool, &host))
        .await
        .expect("answered without waiting on the dead connection");
    assert_eq!(status.expect("answered"), StatusCode::OK);
    assert_eq!(relay.accepted(), 2);
}

#[tokio::test]
async fn a_caller_that_gives_up_does_not_cancel_the_connect_others_wait_for() {
    let (acceptor, ca_pem) = support::tls::localhost_acceptor(&[b"h2"]);
    let (reached_tx, mut reached) = mpsc::unbounded_channel();
    let (open, opened) = watch::channel(false);
    // Holds each connection before the TLS handshake until the test opens the gate.
    let upstream = Upstream::start(move |stream, _| {
        let (acceptor, reached, mut opened) = (acceptor.clone(), reached_tx.clone(), opened.clone());
        async move {
            let _ = reached.send(());
            if opened.wait_for(|open| *open).await.is_err() {
                return;
            }
            serve_http2(&acceptor, stream).await;
        }
    })
    .await;
    let pool = Arc::new(http2_pool(upstream.addr, &ca_pem, PoolSettings::default()));
    let host = format!("localhost:{}", upstream.addr.port());
    let first = tokio::spawn({
        let (pool, host) = (Arc::clone(&pool), host.clone());
        async move { exchange(&pool, &host).await.map_err(|error| format!("{error:?}")) }
    });
    reached
        .recv()
        .await
        .expect("the first caller's connect reached the upstream");
    let second = tokio::spawn({
        let (pool, host) = (Arc::clone(&pool), host.clone());
        async move { exchange(&pool, &host).await.map_err(|error| format!("{error:?}")) }
    });
    // The first caller gives up, as its timeout would make it.
    first.abort();
    assert!(first.await.expect_err("cancelled").is_cancelled());
    open.send_replace(true);
    let status = tokio::time::timeout(WITHIN, second)
        .await
        .expect("answered")
        .expect("the task ran");
    assert_eq!(status.expect("answered"), StatusCode::OK);
    assert_eq!(
        upstream.accepted(),
        1,
        "the connect outlived the caller that started it"
    );
}

#[tokio::test]
async fn a_connect_that_never_completes_gives_up_at_the_connect_timeout() {
    let (acceptor, ca_pem) = support::tls::localhost_acceptor(&[b"h2"]);
    let (open, opened) = watch::channel(false);
    // Accepts TCP, then says nothing until the test opens the gate.
    let upstream = Upstream::start(move |stream, _| {
        let (acceptor, mut opened) = (acceptor.clone(), opened.clone());
        async move {
            if opened.wait_for(|open| *open).await.is_ok() {
                serve_http2(&acceptor, stream).await;
            }
        }
    })
    .await;
    let settings = PoolSettings {
        connect_timeout: Duration::from_millis(200),
        ..PoolSettings::default()
    };
    let pool = http2_pool(upstream.addr, &ca_pem, settings);
    let host = format!("localhost:{}", upstream.addr.port());
    let failed = tokio::time::timeout(WITHIN, exchange(&pool, &host))
        .await
        .expect("the connect gave up on its own");
    match failed {
        Err(PoolError::Connect(failure)) => assert_eq!(failure.cause, "timeout", "{}", failure.detail),
        other => panic!("{other:?}"),
    }
    // The connect let go of its turn: the next call connects.
    open.send_replace(true);
    let status = tokio::time::timeout(WITHIN, exchange(&pool, &host))
        .await
        .expect("answered");
    assert_eq!(status.expect("answered"), StatusCode::OK);
}

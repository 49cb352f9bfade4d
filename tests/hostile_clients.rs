//! Hostile clients: smuggling, oversized and slow heads, too many connections, HTTP/2 abuse.
//! Each is refused cheaply, nothing reaches upstream, and the gateway keeps serving others.

mod support;

use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use support::{MockUpstream, PATIENCE, Reply, TestGateway, raw_exchange, runs_path};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn status_of(response: &str) -> &str {
    response.lines().next().unwrap_or_default()
}

#[tokio::test]
async fn request_smuggling_attempts_are_refused_by_the_http_layer() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    mock.set("run_1", Reply::run("run_1", "COMPLETED"));
    let path = runs_path("run_1");
    let attempts = [
        // Transfer-Encoding and Content-Length together (CL.TE / TE.CL desync). hyper follows
        // Transfer-Encoding as RFC 9112 allows; the gateway refuses any body framing on Get-run.
        format!(
            "GET {path} HTTP/1.1\r\nHost: g\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: g\r\n\r\n"
        ),
        // Two different Content-Lengths.
        format!("GET {path} HTTP/1.1\r\nHost: g\r\nContent-Length: 0\r\nContent-Length: 40\r\n\r\n"),
        // obs-fold: a header continued on the next line.
        format!("GET {path} HTTP/1.1\r\nHost: g\r\nX-Folded: a\r\n b\r\n\r\n"),
        // A transfer coding that is not chunked last.
        format!("GET {path} HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked, identity\r\n\r\n"),
    ];
    for attempt in &attempts {
        let response = raw_exchange(gateway.public, attempt.as_bytes()).await;
        assert!(
            status_of(&response).contains(" 400 "),
            "{attempt:?} got {:?}",
            status_of(&response)
        );
        assert_eq!(
            response.matches("HTTP/1.1 ").count(),
            1,
            "nothing after the refusal was answered"
        );
        let closes = response.to_ascii_lowercase().contains("connection: close");
        assert!(
            closes || !response.contains("INVALID_REQUEST"),
            "a refused body closes the connection"
        );
    }
    assert_eq!(mock.request_count(), 0, "nothing reached upstream");
    assert_eq!(
        gateway.get_run("run_1").await.status,
        StatusCode::OK,
        "still serving"
    );
}

#[tokio::test]
async fn a_head_beyond_the_http_layers_bound_is_refused() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    let huge = format!(
        "GET {} HTTP/1.1\r\nHost: g\r\nX-Big: {}\r\n\r\n",
        runs_path("run_1"),
        "a".repeat(100 * 1024)
    );
    let response = raw_exchange(gateway.public, huge.as_bytes()).await;
    assert!(
        status_of(&response).contains(" 431 "),
        "{:?}",
        status_of(&response)
    );
    assert_eq!(mock.request_count(), 0);
    mock.set("run_1", Reply::run("run_1", "COMPLETED"));
    assert_eq!(gateway.get_run("run_1").await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_slowloris_client_is_cut_off_after_the_header_read_timeout() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| {
        config.server.header_read_timeout = Duration::from_millis(300);
    })
    .await;
    let mut slow = TcpStream::connect(gateway.public).await.expect("connect");
    let started = Instant::now();
    slow.write_all(b"GET /api/public/v1/workflow-runs/run_1 HTTP/1.1\r\nHost: g\r\nX-A: 1\r\n")
        .await
        .expect("write part of a head");
    let mut rest = Vec::new();
    tokio::time::timeout(PATIENCE, slow.read_to_end(&mut rest))
        .await
        .expect("the gateway closed the connection")
        .ok();
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "not before the timeout"
    );
    assert_eq!(mock.request_count(), 0);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_read_timeout() {
    let mock = MockUpstream::start().await;
    mock.set("run_1", Reply::run("run_1", "COMPLETED"));
    let gateway = TestGateway::start(&mock, |config| {
        config.server.header_read_timeout = Duration::from_millis(300);
    })
    .await;
    let mut client = TcpStream::connect(gateway.public).await.expect("connect");
    client
        .write_all(format!("GET {} HTTP/1.1\r\nHost: g\r\n\r\n", runs_path("run_1")).as_bytes())
        .await
        .expect("write");
    let mut everything = Vec::new();
    tokio::time::timeout(PATIENCE, client.read_to_end(&mut everything))
        .await
        .expect("closed once idle")
        .expect("read");
    assert!(
        String::from_utf8_lossy(&everything).starts_with("HTTP/1.1 200"),
        "answered first"
    );
}

#[tokio::test]
async fn connections_beyond_max_connections_wait_their_turn() {
    let mock = MockUpstream::start().await;
    mock.set("run_1", Reply::run("run_1", "COMPLETED"));
    let gateway = TestGateway::start(&mock, |config| {
        config.server.max_connections = NonZeroUsize::new(2).expect("non-zero");
    })
    .await;
    let request = format!("GET {} HTTP/1.1\r\nHost: g\r\n\r\n", runs_path("run_1"));
    // Two clients hold both slots with keep-alive connections.
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut holder = TcpStream::connect(gateway.public).await.expect("connect");
        holder.write_all(request.as_bytes()).await.expect("write");
        let mut buffer = [0u8; 12];
        holder.read_exact(&mut buffer).await.expect("answered");
        assert_eq!(&buffer, b"HTTP/1.1 200");
        holders.push(holder);
    }
    // A third is accepted by the kernel but not served while both slots are taken.
    let mut waiting = TcpStream::connect(gateway.public)
        .await
        .expect("the kernel queues it");
    waiting.write_all(request.as_bytes()).await.expect("write");
    let mut buffer = [0u8; 12];
    let early = tokio::time::timeout(Duration::from_millis(300), waiting.read_exact(&mut buffer)).await;
    assert!(early.is_err(), "served while both slots were held");
    // A slot frees up: the third is served.
    drop(holders.pop());
    tokio::time::timeout(PATIENCE, waiting.read_exact(&mut buffer))
        .await
        .expect("served once a slot freed")
        .expect("read");
    assert_eq!(&buffer, b"HTTP/1.1 200");
}

async fn h2_client(
    addr: std::net::SocketAddr,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    (client, tokio::spawn(connection))
}

#[tokio::test]
async fn http2_advertises_its_stream_limit() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| config.server.http2_max_concurrent_streams = 7).await;
    mock.set("run_1", Reply::run("run_1", "COMPLETED"));
    let tcp = TcpStream::connect(gateway.public).await.expect("connect");
    let (client, mut connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let mut client = client.ready().await.expect("ready");
    // The server's SETTINGS arrive while the first exchange is driven.
    let request = Request::get(format!("http://g{}", runs_path("run_1")))
        .body(())
        .expect("request");
    let (response, _) = client.send_request(request, true).expect("send");
    let response = tokio::select! {
        response = response => response.expect("response"),
        ended = &mut connection => panic!("connection ended early: {ended:?}"),
    };
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(connection.max_concurrent_send_streams(), 7);
}

#[tokio::test]
async fn an_http2_rapid_reset_flood_is_cut_off_and_others_are_served() {
    let mock = MockUpstream::start().await;
    let gate = support::Gate::new();
    mock.set("slow", Reply::run("slow", "PROCESSING").gated(&gate));
    mock.set("run_1", Reply::run("run_1", "COMPLETED"));
    let gateway = TestGateway::start(&mock, |_| {}).await;

    let (mut client, connection) = h2_client(gateway.public).await;
    let mut cut_off = false;
    for _ in 0..10_000 {
        let Ok(ready) = client.ready().await else {
            cut_off = true;
            break;
        };
        client = ready;
        let request = Request::get(format!("http://g{}", runs_path("slow")))
            .body(())
            .expect("request");
        match client.send_request(request, true) {
            Ok((_, mut stream)) => stream.send_reset(h2::Reason::CANCEL),
            Err(_) => {
                cut_off = true;
                break;
            }
        }
        tokio::task::yield_now().await;
    }
    assert!(
        cut_off,
        "the gateway closed the flooding connection before 10,000 resets"
    );
    let ended = tokio::time::timeout(PATIENCE, connection).await;
    assert!(ended.is_ok(), "the flooding connection is gone");
    gate.open();

    let response = gateway.send(Method::GET, &runs_path("run_1"), &[]).await;
    assert_eq!(response.status, StatusCode::OK, "other clients are still served");
}

//! Connections that hold a slot and do nothing useful: silent before protocol detection, idle
//! HTTP/2, clients that stop reading or stop granting window, peers that stop answering PINGs.
//! Each is closed within its bound, and the ports keep serving others meanwhile.

mod support;

use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use support::{
    Gate, MockUpstream, PATIENCE, Reply, TestClient, TestGateway, eventually, run_body, runs_path,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
const H2_EMPTY_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];
/// How many connections of each kind a test holds.
const HELD_PER_KIND: usize = 50;

/// A gateway with room for `max_connections`, whose idle timeout is far beyond the test's
/// patience: only closing an idle connection to make room can let a newcomer in.
async fn crowded_gateway(mock: &MockUpstream, max_connections: usize) -> TestGateway {
    TestGateway::start(mock, |config| {
        config.server.max_connections = NonZeroUsize::new(max_connections).expect("non-zero");
        config.server.header_read_timeout = Duration::from_secs(120);
    })
    .await
}

/// A gateway with a 500 ms `write_timeout`, in front of a mock that answers the ended run `big`
/// with a body of `size` bytes.
async fn big_run_behind_a_short_write_timeout(size: usize) -> (MockUpstream, TestGateway) {
    let mock = MockUpstream::start().await;
    mock.set("big", Reply::ok(run_body("big", "COMPLETED", size)));
    let gateway = TestGateway::start(&mock, |config| {
        config.server.write_timeout = Duration::from_millis(500);
        // An event stream's keep-alive must come before a stalled answer is cut.
        config.watch.sse_keepalive = Duration::from_millis(250);
    })
    .await;
    (mock, gateway)
}

/// An HTTP/2 client whose streams start with no flow-control window, and never get any; its
/// connection is driven by a task of its own.
async fn window_withholding_client(
    gateway: &TestGateway,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = TcpStream::connect(gateway.public).await.expect("connect");
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, Bytes>(tcp)
        .await
        .expect("h2 handshake");
    let connection = tokio::spawn(connection);
    (client.ready().await.expect("ready"), connection)
}

/// Reads until the server closes the connection (EOF or reset) and returns what was read.
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut received))
        .await
        .expect("the gateway closed the connection in time");
    received
}

/// The HTTP/2 frame types in `bytes`, which start at a frame boundary.
fn h2_frame_types(mut bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while bytes.len() >= 9 {
        let length = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        types.push(bytes[3]);
        bytes = &bytes[(9 + length).min(bytes.len())..];
    }
    types
}

async fn closed_by(gateway: &TestGateway, reason: &str) -> f64 {
    gateway.scrape().await.expect(
        "plextera_gateway_client_connections_closed_total",
        &[("reason", reason)],
    )
}

#[tokio::test]
async fn connections_that_never_complete_a_request_head_are_closed_after_the_header_read_timeout() {
    const TIMEOUT: Duration = Duration::from_millis(500);
    let mock = MockUpstream::start().await;
    mock.set("run_1", Reply::run("run_1", "COMPLETED"));
    // Every slot is taken by the held connections: an ordinary request needs one of them gone.
    let gateway = TestGateway::start(&mock, |config| {
        config.server.header_read_timeout = TIMEOUT;
        config.server.max_connections = NonZeroUsize::new(4 * HELD_PER_KIND).expect("non-zero");
    })
    .await;
    let kinds: [(&str, Vec<u8>); 4] = [
        ("nothing", Vec::new()),
        ("10 bytes of the HTTP/2 preface", H2_PREFACE[..10].to_vec()),
        (
            "the HTTP/2 preface and SETTINGS",
            [H2_PREFACE, H2_EMPTY_SETTINGS].concat(),
        ),
        (
            "part of an HTTP/1 head",
            format!("GET {} HTTP/1.1\r\nHost: g\r\n", runs_path("run_1")).into_bytes(),
        ),
    ];
    let opened = Instant::now();
    let mut held = Vec::new();
    for (kind, bytes) in &kinds {
        for _ in 0..HELD_PER_KIND {
            let mut stream = TcpStream::connect(gateway.public).await.expect("connect");
            stream.write_all(bytes).await.expect("write");
            held.push((*kind, stream));
        }
    }
    // While they are held, an ordinary request is answered (on a connection it closes itself, so
    // every idle close counted below is one of the held ones).
    let ordinary = support::raw_exchange(
        gateway.public,
        format!(
            "GET {} HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n",
            runs_path("run_1")
        )
        .as_bytes(),
    )
    .await;
    assert!(ordinary.starts_with("HTTP/1.1 200"), "{ordinary}");

    let mut closed = Vec::new();
    for (kind, stream) in &mut held {
        closed.push((*kind, read_until_closed(stream).await));
    }
    let elapsed = opened.elapsed();
    assert!(elapsed >= TIMEOUT, "closed before the timeout: {elapsed:?}");
    // Within the timeout plus the graceful close's bound, with room for a slow machine.
    assert!(
        elapsed < TIMEOUT + Duration::from_secs(4),
        "closed late: {elapsed:?}"
    );
    for (kind, received) in &closed {
        if *kind == "the HTTP/2 preface and SETTINGS" {
            // An HTTP/2 client is told: SETTINGS, then GOAWAY.
            let types = h2_frame_types(received);
            assert!(types.contains(&0x7), "{kind}: frames {types:?}, no GOAWAY");
        } else {
            assert!(
                !String::from_utf8_lossy(received).contains("200 OK"),
                "{kind}: {received:?}"
            );
        }
    }
    // The watchdog closed every one of them (one early, to make room), and counted it.
    let (idle, shed) = (
        closed_by(&gateway, "idle").await,
        closed_by(&gateway, "shed").await,
    );
    assert!(shed >= 1.0, "the ordinary request made room");
    assert_eq!(
        idle + shed,
        (4 * HELD_PER_KIND) as f64,
        "idle closes: {idle}, shed: {shed}"
    );
    assert_eq!(
        mock.count_for("run_1"),
        1,
        "only the ordinary request went upstream"
    );
}

#[tokio::test]
async fn an_idle_http2_connection_gets_goaway_after_the_header_read_timeout() {
    let mock = MockUpstream::start().await;
    mock.set("run_1", Reply::run("run_1", "COMPLETED"));
    let gateway = TestGateway::start(&mock, |config| {
        config.server.header_read_timeout = Duration::from_millis(300);
    })
    .await;
    let tcp = TcpStream::connect(gateway.public).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let connection = tokio::spawn(connection);
    let mut client = client.ready().await.expect("ready");
    let request = Request::get(format!("http://g{}", runs_path("run_1")))
        .body(())
        .expect("request");
    let sent = Instant::now();
    let (response, _) = client.send_request(request, true).expect("send");
    assert_eq!(response.await.expect("response").status(), StatusCode::OK);
    // Idle from the answer on: the gateway says GOAWAY and the connection ends cleanly.
    let ended = tokio::time::timeout(PATIENCE, connection)
        .await
        .expect("closed in time")
        .expect("connection task");
    assert!(ended.is_ok(), "a graceful close, not an error: {ended:?}");
    assert!(
        sent.elapsed() >= Duration::from_millis(300),
        "closed before the timeout"
    );
    assert!(closed_by(&gateway, "idle").await >= 1.0);
}

#[tokio::test]
async fn a_full_house_of_silent_connections_keeps_no_client_out() {
    let mock = MockUpstream::start().await;
    mock.set("run_1", Reply::run("run_1", "COMPLETED"));
    let gateway = crowded_gateway(&mock, 20).await;
    let mut silent = Vec::new();
    for _ in 0..40 {
        silent.push(TcpStream::connect(gateway.public).await.expect("connect"));
    }
    for _ in 0..5 {
        let client = TestClient::new();
        let response = client
            .send(Method::GET, &gateway.url(&runs_path("run_1")), &[])
            .await;
        assert_eq!(response.status, StatusCode::OK);
    }
    assert!(closed_by(&gateway, "shed").await >= 5.0);
    let open = gateway
        .scrape()
        .await
        .expect("plextera_gateway_client_connections", &[]);
    assert!(open <= 20.0, "{open} connections open, max_connections is 20");
}

#[tokio::test]
async fn the_admin_port_answers_probes_whatever_its_own_or_the_public_ports_connections_do() {
    let mock = MockUpstream::start().await;
    let gateway = crowded_gateway(&mock, 50).await;
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(TcpStream::connect(gateway.public).await.expect("connect"));
        held.push(TcpStream::connect(gateway.admin).await.expect("connect"));
    }
    for path in ["/healthz", "/readyz", "/metrics"] {
        let client = TestClient::new();
        let url = format!("http://{}{path}", gateway.admin);
        let response = client.send(Method::GET, &url, &[]).await;
        assert_eq!(response.status, StatusCode::OK, "{path}");
    }
}

#[tokio::test]
async fn a_client_that_pipelines_and_never_reads_is_cut_after_the_write_timeout() {
    let (_mock, gateway) = big_run_behind_a_short_write_timeout(1024 * 1024).await;
    assert_eq!(
        gateway.get_run("big").await.status,
        StatusCode::OK,
        "cached first"
    );
    // A small receive buffer, so the client's side fills after a few answers on any host.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(16 * 1024).expect("SO_RCVBUF");
    let mut greedy = socket.connect(gateway.public).await.expect("connect");
    let request = format!("GET {} HTTP/1.1\r\nHost: g\r\n\r\n", runs_path("big"));
    // Ten megabytes of answers, far more than the socket buffers hold, never read.
    greedy
        .write_all(request.repeat(10).as_bytes())
        .await
        .expect("write the pipelined requests");
    eventually("the stalled connection is cut", || async {
        closed_by(&gateway, "write_timeout").await == 1.0
    })
    .await;
    // What the client finds: some answers, then the end of the connection.
    let mut received = 0usize;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(PATIENCE, greedy.read(&mut buffer)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(read)) => received += read,
            Err(_) => panic!("the connection stayed open"),
        }
    }
    assert!(received < 10 * 1024 * 1024, "all {received} bytes were sent");
    assert_eq!(
        gateway.get_run("big").await.status,
        StatusCode::OK,
        "still serving"
    );
}

#[tokio::test]
async fn an_http2_client_that_grants_no_window_is_cut_after_the_write_timeout() {
    let (_mock, gateway) = big_run_behind_a_short_write_timeout(256 * 1024).await;
    // A stream window of zero: the gateway may send headers, never data, until the client
    // grants some, which it never does. It keeps reading (and answering PINGs) all along.
    let (mut client, connection) = window_withholding_client(&gateway).await;
    let request = Request::get(format!("http://g{}", runs_path("big")))
        .body(())
        .expect("request");
    let sent = Instant::now();
    let (response, _) = client.send_request(request, true).expect("send");
    let response = response.await.expect("the head arrives");
    assert_eq!(response.status(), StatusCode::OK);
    tokio::time::timeout(PATIENCE, connection)
        .await
        .expect("the starved connection was cut")
        .expect("connection task")
        .ok();
    assert!(
        sent.elapsed() >= Duration::from_millis(500),
        "cut before the write timeout"
    );
    assert_eq!(closed_by(&gateway, "write_timeout").await, 1.0);
}

#[tokio::test]
async fn an_http2_peer_that_stops_answering_pings_is_dropped_mid_request() {
    let mock = MockUpstream::start().await;
    let gate = Gate::new();
    mock.set("slow", Reply::run("slow", "PROCESSING").gated(&gate));
    let gateway = TestGateway::start(&mock, |config| {
        config.server.http2_keepalive_interval = Duration::from_millis(200);
        config.server.http2_keepalive_timeout = Duration::from_millis(200);
    })
    .await;
    let tcp = TcpStream::connect(gateway.public).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let mut connection = std::pin::pin!(connection);
    let mut client = client.ready().await.expect("ready");
    let request = Request::get(format!("http://g{}", runs_path("slow")))
        .body(())
        .expect("request");
    let (_response, _) = client.send_request(request, true).expect("send");
    // Drive the client until its request is upstream, then never poll it again: from then on it
    // reads nothing and answers no PING, like a peer that vanished without a FIN.
    tokio::select! {
        () = mock.wait_for_requests(1) => {}
        ended = &mut connection => panic!("connection ended early: {ended:?}"),
    }
    eventually("the silent peer is dropped", || async {
        gateway
            .scrape()
            .await
            .expect("plextera_gateway_client_connections", &[])
            == 0.0
    })
    .await;
    gate.open();
}

#[tokio::test]
async fn a_starved_http2_answer_is_cut_even_while_other_answers_complete() {
    let (_mock, gateway) = big_run_behind_a_short_write_timeout(256 * 1024).await;
    let etag = gateway
        .get_run("big")
        .await
        .header("etag")
        .expect("an ETag")
        .to_owned();
    // No stream ever gets window, so the first answer's body never moves; meanwhile the client
    // keeps the connection busy with answers that need none (304s have no body).
    let (mut client, mut connection) = window_withholding_client(&gateway).await;
    let get = |if_none_match: Option<&str>| {
        let mut request = Request::get(format!("http://g{}", runs_path("big")));
        if let Some(etag) = if_none_match {
            request = request.header("if-none-match", etag);
        }
        request.body(()).expect("request")
    };
    let sent = Instant::now();
    let (starved, _) = client.send_request(get(None), true).expect("send");
    // Kept: dropping the response would reset the stream.
    let starved = starved.await.expect("the head arrives");
    assert_eq!(starved.status(), StatusCode::OK);
    let cut = loop {
        // The pace is the attack (one cheap answer every 100 ms), not a synchronisation.
        tokio::select! {
            ended = &mut connection => break ended,
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        let Ok(ready) = client.clone().ready().await else {
            continue;
        };
        client = ready;
        if let Ok((revalidated, _)) = client.send_request(get(Some(&etag)), true)
            && let Ok(Ok(response)) = tokio::time::timeout(PATIENCE, revalidated).await
        {
            assert_eq!(response.status(), StatusCode::NOT_MODIFIED);
        }
        assert!(sent.elapsed() < PATIENCE, "the starved answer was never cut");
    };
    cut.expect("connection task").ok();
    assert!(
        sent.elapsed() >= Duration::from_millis(500),
        "cut before the write timeout"
    );
    assert_eq!(closed_by(&gateway, "write_timeout").await, 1.0);
    drop(starved);
}

#[tokio::test]
async fn a_full_house_of_bare_http2_prefaces_makes_room_at_once() {
    const ROOM: usize = 10;
    let mock = MockUpstream::start().await;
    mock.set("run_1", Reply::run("run_1", "COMPLETED"));
    let gateway = crowded_gateway(&mock, ROOM).await;
    // Every slot: a client that sent the preface and SETTINGS, then nothing (it will not answer
    // the PING a graceful GOAWAY waits for).
    let mut held = Vec::new();
    for _ in 0..ROOM {
        let mut stream = TcpStream::connect(gateway.public).await.expect("connect");
        stream
            .write_all(&[H2_PREFACE, H2_EMPTY_SETTINGS].concat())
            .await
            .expect("write");
        held.push(stream);
    }
    eventually("every slot is taken", || async {
        gateway
            .scrape()
            .await
            .expect("plextera_gateway_client_connections", &[])
            == ROOM as f64
    })
    .await;
    // Five newcomers in a row, each keeping its connection: each closes one of the silent ones
    // at once, not after a grace period.
    let started = Instant::now();
    let mut newcomers = Vec::new();
    for _ in 0..5 {
        let client = TestClient::new();
        let response = client
            .send(Method::GET, &gateway.url(&runs_path("run_1")), &[])
            .await;
        assert_eq!(response.status, StatusCode::OK);
        newcomers.push(client);
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "five newcomers took {:?}: a second each means each waited out a grace period",
        started.elapsed()
    );
    assert!(closed_by(&gateway, "shed").await >= 5.0);
}

#[tokio::test]
async fn a_connection_flooding_pings_without_reading_is_closed_when_idle_not_when_writes_time_out() {
    const TIMEOUT: Duration = Duration::from_millis(500);
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| {
        config.server.header_read_timeout = TIMEOUT;
        config.server.write_timeout = Duration::from_secs(60);
    })
    .await;
    let mut flooder = TcpStream::connect(gateway.public).await.expect("connect");
    flooder
        .write_all(&[H2_PREFACE, H2_EMPTY_SETTINGS].concat())
        .await
        .expect("write");
    // PING frames, never reading the acks: the gateway's writes back soon wait on the socket.
    let ping = [0, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
    let burst = ping.repeat(4096);
    let started = Instant::now();
    let closed = loop {
        match tokio::time::timeout(PATIENCE, flooder.write_all(&burst)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => break started.elapsed(),
            Err(_) => panic!("the flooding connection was still open after {PATIENCE:?}"),
        }
    };
    assert!(
        closed < Duration::from_secs(5),
        "closed after {closed:?}: the idle rule, not the 60 s write timeout"
    );
    assert!(closed_by(&gateway, "idle").await >= 1.0);
}

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
    // Each attempt, and whether the gateway itself refuses it (`INVALID_REQUEST`, connection
    // closed) or hyper does before the gateway sees a request (its own bare 400).
    let attempts = [
        // Transfer-Encoding and Content-Length together (CL.TE / TE.CL desync). hyper follows
        // Transfer-Encoding as RFC 9112 allows; the gateway refuses any body framing on Get-run.
        (
            format!(
                "GET {path} HTTP/1.1\r\nHost: g\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: g\r\n\r\n"
            ),
            true,
        ),
        // Two different Content-Lengths.
        (
            format!("GET {path} HTTP/1.1\r\nHost: g\r\nContent-Length: 0\r\nContent-Length: 40\r\n\r\n"),
            false,
        ),
        // obs-fold: a header continued on the next line.
        (
            format!("GET {path} HTTP/1.1\r\nHost: g\r\nX-Folded: a\r\n b\r\n\r\n"),
            false,
        ),
        // A transfer coding that is not chunked last.
        (
            format!("GET {path} HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked, identity\r\n\r\n"),
            false,
        ),
    ];
    for (attempt, by_the_gateway) in &attempts {
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
        assert_eq!(
            response.contains("INVALID_REQUEST"),
            *by_the_gateway,
            "refused by {}: {response}",
            if *by_the_gateway { "the gateway" } else { "hyper" }
        );
        // Either way the connection is closed: hyper closes after a parse error, and the gateway
        // says so when it refuses a body.
        if *by_the_gateway {
            assert!(
                response.to_ascii_lowercase().contains("connection: close"),
                "a refused body closes the connection: {response}"
            );
        }
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
    let asked = Instant::now();
    client
        .write_all(format!("GET {} HTTP/1.1\r\nHost: g\r\n\r\n", runs_path("run_1")).as_bytes())
        .await
        .expect("write");
    let mut everything = Vec::new();
    let mut chunk = [0u8; 4096];
    let answered = loop {
        let read = tokio::time::timeout(PATIENCE, client.read(&mut chunk))
            .await
            .expect("answered")
            .expect("read");
        assert!(read > 0, "closed before the answer");
        everything.extend_from_slice(&chunk[..read]);
        if complete_answer(&everything) {
            break Instant::now();
        }
    };
    tokio::time::timeout(PATIENCE, client.read_to_end(&mut everything))
        .await
        .expect("closed once idle")
        .expect("read");
    assert!(
        String::from_utf8_lossy(&everything).starts_with("HTTP/1.1 200"),
        "answered first"
    );
    // The idle clock starts at the answer: no sooner than 300 ms after the request was sent, and
    // not at some other timeout (the default is 10 s): within the 300 ms plus the 1 s close grace.
    assert!(
        asked.elapsed() >= Duration::from_millis(300),
        "not before the timeout"
    );
    assert!(
        answered.elapsed() < Duration::from_millis(300) + Duration::from_secs(2),
        "closed after {:?}, not at the configured 300 ms",
        answered.elapsed()
    );
}

/// Whether `bytes` hold one whole HTTP/1.1 answer with a `content-length` body.
fn complete_answer(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes);
    let Some(head_end) = text.find("\r\n\r\n") else {
        return false;
    };
    let length = text[..head_end]
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())
                .flatten()
        })
        .unwrap_or(0);
    bytes.len() >= head_end + 4 + length
}

#[tokio::test]
async fn with_every_connection_busy_a_newcomer_waits_until_one_and_its_upstream_work_end() {
    let mock = MockUpstream::start().await;
    let gate = support::Gate::new();
    for id in ["slow_a", "slow_b"] {
        mock.set(id, Reply::run(id, "PROCESSING").gated(&gate));
    }
    mock.set("run_1", Reply::run("run_1", "COMPLETED"));
    let gateway = TestGateway::start(&mock, |config| {
        config.server.max_connections = NonZeroUsize::new(2).expect("non-zero");
    })
    .await;
    // Two clients take both slots, each with a request whose upstream call is held.
    let mut holders = Vec::new();
    for id in ["slow_a", "slow_b"] {
        let mut holder = TcpStream::connect(gateway.public).await.expect("connect");
        holder
            .write_all(format!("GET {} HTTP/1.1\r\nHost: g\r\n\r\n", runs_path(id)).as_bytes())
            .await
            .expect("write");
        holders.push(holder);
    }
    mock.wait_for_requests(2).await;
    // A third is accepted by the kernel but not served while both are busy: nothing is shed.
    let request = format!("GET {} HTTP/1.1\r\nHost: g\r\n\r\n", runs_path("run_1"));
    let mut waiting = TcpStream::connect(gateway.public)
        .await
        .expect("the kernel queues it");
    waiting.write_all(request.as_bytes()).await.expect("write");
    let mut buffer = [0u8; 12];
    let early = tokio::time::timeout(Duration::from_millis(300), waiting.read_exact(&mut buffer)).await;
    assert!(early.is_err(), "served while both slots were busy");
    // A holder goes away, but the upstream call it started still holds its connection's slot.
    drop(holders.pop());
    let early = tokio::time::timeout(Duration::from_millis(300), waiting.read_exact(&mut buffer)).await;
    assert!(
        early.is_err(),
        "served while a gone client's upstream call still ran"
    );
    // The call ends: the slot is free and the third is served.
    gate.open();
    tokio::time::timeout(PATIENCE, waiting.read_exact(&mut buffer))
        .await
        .expect("served once a slot freed")
        .expect("read");
    assert_eq!(&buffer, b"HTTP/1.1 200");
}

#[tokio::test]
async fn with_every_connection_taken_an_idle_one_makes_room() {
    let mock = MockUpstream::start().await;
    mock.set("run_1", Reply::run("run_1", "COMPLETED"));
    let gateway = TestGateway::start(&mock, |config| {
        config.server.max_connections = NonZeroUsize::new(2).expect("non-zero");
        // Far beyond the test's patience: only shedding can free a slot in time.
        config.server.header_read_timeout = Duration::from_secs(120);
    })
    .await;
    let request = format!("GET {} HTTP/1.1\r\nHost: g\r\n\r\n", runs_path("run_1"));
    // Both slots are taken by idle connections: one answered and kept alive, one silent.
    let mut answered = TcpStream::connect(gateway.public).await.expect("connect");
    answered.write_all(request.as_bytes()).await.expect("write");
    let mut buffer = [0u8; 12];
    answered.read_exact(&mut buffer).await.expect("answered");
    let mut silent = TcpStream::connect(gateway.public).await.expect("connect");
    support::eventually("both connections are open", || async {
        gateway
            .scrape()
            .await
            .expect("plextera_gateway_client_connections", &[])
            == 2.0
    })
    .await;
    // A newcomer is served at once: one of the idle connections (the one idle longest, which
    // `connection::idlest` picks) is closed to make room.
    let mut newcomer = TcpStream::connect(gateway.public).await.expect("connect");
    newcomer.write_all(request.as_bytes()).await.expect("write");
    tokio::time::timeout(PATIENCE, newcomer.read_exact(&mut buffer))
        .await
        .expect("served without waiting for an idle timeout")
        .expect("read");
    assert_eq!(&buffer, b"HTTP/1.1 200");
    let (mut from_answered, mut from_silent) = (Vec::new(), Vec::new());
    tokio::time::timeout(PATIENCE, async {
        tokio::select! {
            _ = answered.read_to_end(&mut from_answered) => {}
            _ = silent.read_to_end(&mut from_silent) => {}
        }
    })
    .await
    .expect("an idle connection was closed");
    let scrape = gateway.scrape().await;
    assert_eq!(
        scrape.expect(
            "plextera_gateway_client_connections_closed_total",
            &[("reason", "shed")]
        ),
        1.0
    );
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

/// Open descriptors of process `pid`.
fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the gateway's /proc entry")
        .count()
}

#[tokio::test]
async fn paced_http2_resets_hold_no_more_upstream_calls_than_streams_and_end_in_goaway() {
    const STREAMS: usize = 10;
    const ATTEMPTS: usize = 3_000;
    let mock = MockUpstream::start().await;
    let gate = support::Gate::new();
    for index in 0..ATTEMPTS {
        let id = format!("r{index}");
        mock.set(&id, Reply::run(&id, "PROCESSING").gated(&gate));
    }
    mock.set("run_1", Reply::run("run_1", "COMPLETED"));
    let dir = tempfile::tempdir().expect("temp dir");
    let config = support::write_config(
        dir.path(),
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             http2_max_concurrent_streams = {STREAMS}\n\
             [upstream]\nbase_url = \"{}\"\napi_key_env = \"GW_TEST_KEY\"\n",
            mock.base_url()
        ),
    );
    let gateway =
        support::GatewayProcess::start(&["--config", &config], &[("GW_TEST_KEY", support::TEST_KEY)]);
    let baseline = descriptors(gateway.pid());

    // One connection opens a stream for a new run about once a millisecond and resets it: every
    // stream would be an upstream call, were the calls not bounded by the connection's streams.
    let (mut client, connection) = h2_client(gateway.public).await;
    let (mut sent, mut most_descriptors, mut cut_off) = (0, baseline, false);
    while sent < ATTEMPTS {
        let Ok(ready) = client.ready().await else {
            cut_off = true;
            break;
        };
        client = ready;
        let request = Request::get(format!("http://g{}", runs_path(&format!("r{sent}"))))
            .body(())
            .expect("request");
        let Ok((_, mut stream)) = client.send_request(request, true) else {
            cut_off = true;
            break;
        };
        // The pace is the attack itself (a burst is hyper's own business), not a synchronisation.
        tokio::time::sleep(Duration::from_millis(1)).await;
        stream.send_reset(h2::Reason::CANCEL);
        sent += 1;
        if sent % 10 == 0 {
            most_descriptors = most_descriptors.max(descriptors(gateway.pid()));
        }
    }
    assert!(cut_off, "{sent} streams opened and reset without a GOAWAY");
    let ended = tokio::time::timeout(PATIENCE, connection)
        .await
        .expect("the resetting connection is gone")
        .expect("connection task");
    // Closed with GOAWAY: NO_ERROR by the gateway's reset rule, or, when the gateway is slow to
    // accept streams (a loaded machine), ENHANCE_YOUR_CALM by h2's bound on resets it has not
    // accepted yet. Never by the TCP connection simply dropping.
    let by_reset_rule = match &ended {
        Ok(()) => true,
        Err(error) if error.is_go_away() && error.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) => false,
        Err(error) => panic!("not closed with GOAWAY: {error:?}"),
    };
    assert!(
        mock.request_count() <= STREAMS,
        "{} upstream calls for one connection of {STREAMS} streams",
        mock.request_count()
    );
    assert!(
        most_descriptors <= baseline + 2 * STREAMS + 5,
        "descriptors went from {baseline} to {most_descriptors}"
    );

    gate.open();
    let client = support::TestClient::new();
    let response = client
        .send(
            Method::GET,
            &format!("http://{}{}", gateway.public, runs_path("run_1")),
            &[],
        )
        .await;
    assert_eq!(response.status, StatusCode::OK, "other clients are served");
    let metrics = client
        .send(Method::GET, &format!("http://{}/metrics", gateway.admin), &[])
        .await;
    let scrape = support::prom::Scrape::parse(std::str::from_utf8(&metrics.body).expect("utf-8"));
    assert_eq!(
        scrape.expect(
            "plextera_gateway_client_connections_closed_total",
            &[("reason", "resets")]
        ),
        if by_reset_rule { 1.0 } else { 0.0 }
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_configured_bound_upstream_calls_in_flight_are_bounded_by_the_descriptor_limit() {
    // 1,200 descriptors, 100 connections, 1,024 kept in reserve: 76 upstream calls at once.
    const BOUND: usize = 76;
    const CLIENTS: usize = 90;
    let mock = MockUpstream::start().await;
    let gate = support::Gate::new();
    for index in 0..CLIENTS {
        let id = format!("r{index}");
        mock.set(&id, Reply::run(&id, "PROCESSING").gated(&gate));
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let config = support::write_config(
        dir.path(),
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nmax_connections = 100\n\
             [upstream]\nbase_url = \"{}\"\napi_key_env = \"GW_TEST_KEY\"\nqueue_timeout = \"200ms\"\n",
            mock.base_url()
        ),
    );
    let gateway = support::GatewayProcess::start_under(
        &["prlimit", "--nofile=1200:1200", "--"],
        &["--config", &config],
        &[("GW_TEST_KEY", support::TEST_KEY)],
    );
    assert!(
        gateway.logs().contains("bounded by the open-descriptor limit"),
        "{}",
        gateway.logs()
    );
    // Each client asks for a different run; the upstream holds every answer.
    let url = |index: usize| format!("http://{}{}", gateway.public, runs_path(&format!("r{index}")));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|index| {
            let url = url(index);
            tokio::spawn(async move { support::TestClient::new().send(Method::GET, &url, &[]).await })
        })
        .collect();
    mock.wait_for_requests(BOUND).await;
    // The calls beyond the bound wait for the budget, are refused once its queue_timeout is up,
    // and never reach upstream.
    support::eventually("the calls beyond the bound are refused", || async {
        clients.iter().filter(|client| client.is_finished()).count() == CLIENTS - BOUND
    })
    .await;
    let (refused, held): (Vec<_>, Vec<_>) = clients.into_iter().partition(|client| client.is_finished());
    for client in refused {
        let response = client.await.expect("client");
        assert_eq!(response.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.error_code(), "GATEWAY_RATE_LIMITED");
    }
    gate.open();
    for client in held {
        assert_eq!(client.await.expect("client").status, StatusCode::OK);
    }
    assert_eq!(
        mock.request_count(),
        BOUND,
        "no more calls than the bound ever went upstream"
    );
}

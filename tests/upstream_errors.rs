//! How upstream answers and faults reach the client, and that none of them is ever stored.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::StatusCode;
use support::{Gate, MockUpstream, Reply, TestGateway, refused_addr, run_body};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const UPSTREAM_ERROR: &str =
    r#"{"error":{"code":"X","message":"upstream says no","requestId":"up-1","retryable":true}}"#;

#[tokio::test]
async fn not_found_and_rate_limited_pass_through_with_their_status() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    mock.set("gone", Reply::status(StatusCode::NOT_FOUND, UPSTREAM_ERROR));
    mock.set(
        "busy",
        Reply::status(StatusCode::TOO_MANY_REQUESTS, UPSTREAM_ERROR).with_header("retry-after", "17"),
    );
    for _ in 0..2 {
        let gone = gateway.get_run("gone").await;
        assert_eq!(gone.status, StatusCode::NOT_FOUND);
        assert_eq!(gone.body, UPSTREAM_ERROR.as_bytes());
        assert_eq!(gone.x_cache(), Some("PASS"));
        assert_eq!(gone.header("cache-control"), Some("no-store"));
    }
    assert_eq!(
        mock.count_for("gone"),
        2,
        "404 not stored (negative caching is off by default)"
    );

    // The 429 itself reaches the client as upstream sent it (and starts a cooldown, see budget.rs).
    let busy = gateway.get_run("busy").await;
    assert_eq!(busy.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(busy.body, UPSTREAM_ERROR.as_bytes());
    assert_eq!(busy.header("retry-after"), Some("17"));
    assert_eq!(busy.header("cache-control"), Some("no-store"));
    assert_eq!(busy.x_cache(), Some("PASS"));
}

#[tokio::test]
async fn upstream_auth_failures_become_502_upstream_auth() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    for (id, status) in [
        ("unauthorized", StatusCode::UNAUTHORIZED),
        ("forbidden", StatusCode::FORBIDDEN),
    ] {
        mock.set(id, Reply::status(status, UPSTREAM_ERROR));
        let response = gateway.get_run(id).await;
        assert_eq!(response.status, StatusCode::BAD_GATEWAY, "{id}");
        assert_eq!(response.error_code(), "UPSTREAM_AUTH");
        assert_eq!(response.json()["error"]["retryable"], false);
        assert!(
            !response.everything().contains("upstream says no"),
            "upstream body not forwarded"
        );
        assert_eq!(response.header("cache-control"), Some("no-store"));
    }
}

#[tokio::test]
async fn upstream_server_errors_pass_through_and_are_not_stored() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    for (id, status) in [
        ("e500", StatusCode::INTERNAL_SERVER_ERROR),
        ("e502", StatusCode::BAD_GATEWAY),
        ("e503", StatusCode::SERVICE_UNAVAILABLE),
    ] {
        // Even a terminal-looking body is not stored when the status says error.
        mock.set(id, Reply::status(status, run_body(id, "COMPLETED", 0)));
        for _ in 0..2 {
            let response = gateway.get_run(id).await;
            assert_eq!(response.status, status);
            assert_eq!(response.x_cache(), Some("PASS"));
        }
        assert_eq!(mock.count_for(id), 2, "{id} not stored");
        // Once upstream recovers, the run is fetched and stored normally.
        mock.set(id, Reply::run(id, "COMPLETED"));
        assert_eq!(gateway.get_run(id).await.x_cache(), Some("MISS"));
        assert_eq!(gateway.get_run(id).await.x_cache(), Some("HIT"));
    }
}

#[tokio::test]
async fn redirects_are_not_forwarded() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    mock.set(
        "moved",
        Reply::status(StatusCode::FOUND, "").with_header("location", "https://evil.example/"),
    );
    let response = gateway.get_run("moved").await;
    assert_eq!(response.status, StatusCode::BAD_GATEWAY);
    assert_eq!(response.error_code(), "UPSTREAM_BAD_RESPONSE");
    assert!(response.header("location").is_none());
}

#[tokio::test]
async fn unreachable_upstream_is_a_retryable_502() {
    let addr = refused_addr().await;
    let mut config = support::test_config(&format!("http://{addr}"));
    config.upstream.request_timeout = Duration::from_secs(5);
    let gateway = TestGateway::start_with(config).await;
    let response = gateway.get_run("run_1").await;
    assert_eq!(response.status, StatusCode::BAD_GATEWAY);
    assert_eq!(response.error_code(), "UPSTREAM_UNAVAILABLE");
    assert_eq!(response.json()["error"]["retryable"], true);
    assert!(response.json()["error"]["requestId"].is_string());
    assert!(response.x_cache().is_none());
}

#[tokio::test]
async fn a_connection_closed_without_an_answer_is_a_502_and_the_next_request_retries() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    mock.set("flaky", Reply::Abort);
    let response = gateway.get_run("flaky").await;
    assert_eq!(response.status, StatusCode::BAD_GATEWAY);
    assert_eq!(response.error_code(), "UPSTREAM_UNAVAILABLE");
    assert_eq!(
        mock.request_count(),
        1,
        "a fresh connection that closes without an answer is not retried"
    );

    mock.set("flaky", Reply::run("flaky", "COMPLETED"));
    assert_eq!(gateway.get_run("flaky").await.x_cache(), Some("MISS"));
    assert_eq!(gateway.get_run("flaky").await.x_cache(), Some("HIT"));
}

#[tokio::test]
async fn a_slow_upstream_is_a_504_and_nothing_is_stored() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| {
        config.upstream.request_timeout = Duration::from_millis(200);
    })
    .await;
    let never = Gate::new();
    mock.set("slow", Reply::run("slow", "COMPLETED").gated(&never));
    let response = gateway.get_run("slow").await;
    assert_eq!(response.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(response.error_code(), "UPSTREAM_TIMEOUT");
    assert_eq!(response.json()["error"]["retryable"], true);

    never.open();
    mock.set("slow", Reply::run("slow", "COMPLETED"));
    assert_eq!(
        gateway.get_run("slow").await.x_cache(),
        Some("MISS"),
        "the timed-out answer was not stored"
    );
}

#[tokio::test]
async fn an_oversized_upstream_body_is_a_502_and_not_stored() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| {
        config.upstream.max_body_size = bytesize::ByteSize::kib(4);
    })
    .await;
    mock.set("huge", Reply::ok(run_body("huge", "COMPLETED", 64 * 1024)));
    let response = gateway.get_run("huge").await;
    assert_eq!(response.status, StatusCode::BAD_GATEWAY);
    assert_eq!(response.error_code(), "UPSTREAM_BODY_TOO_LARGE");
    assert_eq!(gateway.get_run("huge").await.status, StatusCode::BAD_GATEWAY);
    assert_eq!(mock.count_for("huge"), 2, "nothing stored");
}

// The other faults (cut bodies, resets, slow drips, refused connections) are in tests/faults.rs;
// that no answer ever holds the key, whatever upstream does, is in tests/process.rs
// (`the_key_appears_in_no_log_line_even_at_trace_level`) and tests/faults.rs.
#[tokio::test]
async fn an_upstream_that_closes_without_answering_is_a_502_and_hits_keep_being_served() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    mock.set("done", Reply::run("done", "COMPLETED"));
    gateway.get_run("done").await;
    mock.set("done", Reply::Abort);
    mock.set("live", Reply::Abort);
    let failed = gateway.get_run("live").await;
    assert_eq!(failed.status, StatusCode::BAD_GATEWAY);
    assert_eq!(failed.error_code(), "UPSTREAM_UNAVAILABLE");
    let hit = gateway.get_run("done").await;
    assert_eq!(hit.status, StatusCode::OK);
    assert_eq!(hit.x_cache(), Some("HIT"));
}

#[tokio::test]
async fn a_compressed_body_nobody_asked_for_is_a_bad_response_never_forwarded_or_stored() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    // Bytes a client would have to decompress to read; the gateway can read neither the run's
    // status nor an echoed key in them.
    let compressed = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03opaque-compressed-bytes".to_vec();
    mock.set(
        "zipped",
        Reply::ok(compressed.clone()).with_header("content-encoding", "gzip"),
    );
    mock.set(
        "plain",
        Reply::run("plain", "COMPLETED").with_header("content-encoding", "identity"),
    );
    for _ in 0..2 {
        let response = gateway.get_run("zipped").await;
        assert_eq!(response.status, StatusCode::BAD_GATEWAY);
        assert_eq!(response.error_code(), "UPSTREAM_BAD_RESPONSE");
        assert!(
            !response.body.windows(8).any(|window| window == &compressed[..8]),
            "forwarded"
        );
    }
    assert_eq!(mock.count_for("zipped"), 2, "never stored");
    assert_eq!(
        gateway.get_run("plain").await.x_cache(),
        Some("MISS"),
        "identity is no encoding"
    );
}

#[tokio::test]
async fn an_upstream_503_reaches_the_client_with_its_retry_after() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    let date = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(120));
    for (id, retry_after) in [("down_seconds", "120"), ("down_date", date.as_str())] {
        mock.set(
            id,
            Reply::status(StatusCode::SERVICE_UNAVAILABLE, UPSTREAM_ERROR)
                .with_header("retry-after", retry_after),
        );
        let response = gateway.get_run(id).await;
        assert_eq!(response.status, StatusCode::SERVICE_UNAVAILABLE, "{id}");
        assert_eq!(
            response.header("retry-after"),
            Some(retry_after),
            "{id}: forwarded as sent"
        );
        assert_eq!(response.body, UPSTREAM_ERROR.as_bytes(), "{id}: upstream's body");
        assert_eq!(response.x_cache(), Some("PASS"));
        assert_eq!(response.header("cache-control"), Some("no-store"));
    }
    // Only a 429 pauses upstream calls (docs/rate-limit.md): the next run still goes upstream.
    mock.set("up", Reply::run("up", "PROCESSING"));
    assert_eq!(gateway.get_run("up").await.status, StatusCode::OK);
    assert_eq!(mock.count_for("up"), 1);
}

#[tokio::test]
async fn other_upstream_4xx_answers_pass_through_with_their_status_and_body() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    for (id, status) in [
        ("bad", StatusCode::BAD_REQUEST),
        ("conflict", StatusCode::CONFLICT),
        ("gone", StatusCode::GONE),
        ("unprocessable", StatusCode::UNPROCESSABLE_ENTITY),
    ] {
        mock.set(id, Reply::status(status, UPSTREAM_ERROR));
        for _ in 0..2 {
            let response = gateway.get_run(id).await;
            assert_eq!(response.status, status, "{id}");
            assert_eq!(
                response.body,
                UPSTREAM_ERROR.as_bytes(),
                "{id}: upstream's body, untouched"
            );
            assert_eq!(response.header("content-type"), Some("application/json"));
            assert_eq!(response.x_cache(), Some("PASS"), "{id}");
            assert_eq!(response.header("cache-control"), Some("no-store"));
        }
        assert_eq!(mock.count_for(id), 2, "{id} not stored");
    }
}

/// An upstream on a raw socket that reads one request head per connection, answers it with
/// exactly `answer`, and closes. Returns its address and how many requests it read.
async fn raw_upstream(answer: &'static [u8]) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let requests = Arc::new(AtomicUsize::new(0));
    let counting = Arc::clone(&requests);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counting = Arc::clone(&counting);
            tokio::spawn(async move {
                let mut head = Vec::new();
                while !head.windows(4).any(|window| window == b"\r\n\r\n") {
                    let mut chunk = [0_u8; 4096];
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(read) => head.extend_from_slice(&chunk[..read]),
                    }
                }
                counting.fetch_add(1, Ordering::SeqCst);
                let _ = stream.write_all(answer).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (addr, requests)
}

/// hyper's client skips interim 1xx answers (100, 102–199) and waits for the final one; the one
/// 1xx it hands over as a final answer is 101 Switching Protocols, so that is how an upstream 1xx
/// reaches the gateway. Nothing of it is forwarded, and no client connection is switched.
#[tokio::test]
async fn an_upstream_1xx_answer_is_a_502_bad_response_never_forwarded() {
    let (addr, requests) = raw_upstream(
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
    )
    .await;
    let gateway = TestGateway::start_with(support::test_config(&format!("http://{addr}"))).await;
    for _ in 0..2 {
        let response = gateway.get_run("switching").await;
        assert_eq!(response.status, StatusCode::BAD_GATEWAY);
        assert_eq!(response.error_code(), "UPSTREAM_BAD_RESPONSE");
        assert_eq!(response.json()["error"]["retryable"], false);
        assert!(response.header("upgrade").is_none(), "not forwarded");
        assert!(response.x_cache().is_none(), "the gateway's own error");
        assert_eq!(response.header("cache-control"), Some("no-store"));
    }
    assert_eq!(requests.load(Ordering::SeqCst), 2, "nothing stored");
}

//! How upstream answers and faults reach the client, and that none of them is ever stored.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::{Gate, MockUpstream, Reply, TEST_KEY, TestGateway, refused_addr, run_body};

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

#[tokio::test]
async fn hits_keep_being_served_while_upstream_is_down() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    mock.set("done", Reply::run("done", "COMPLETED"));
    gateway.get_run("done").await;
    mock.set("done", Reply::Abort);
    mock.set("live", Reply::Abort);
    assert_eq!(gateway.get_run("live").await.status, StatusCode::BAD_GATEWAY);
    let hit = gateway.get_run("done").await;
    assert_eq!(hit.status, StatusCode::OK);
    assert_eq!(hit.x_cache(), Some("HIT"));
}

#[tokio::test]
async fn no_response_ever_contains_the_key() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| {
        config.upstream.request_timeout = Duration::from_millis(200);
    })
    .await;
    let never = Gate::new();
    mock.set("ok", Reply::run("ok", "COMPLETED"));
    mock.set("live", Reply::run("live", "PROCESSING"));
    mock.set("auth", Reply::status(StatusCode::UNAUTHORIZED, UPSTREAM_ERROR));
    mock.set(
        "boom",
        Reply::status(StatusCode::INTERNAL_SERVER_ERROR, UPSTREAM_ERROR),
    );
    mock.set("abort", Reply::Abort);
    mock.set("slow", Reply::run("slow", "COMPLETED").gated(&never));
    for id in [
        "ok", "ok", "live", "auth", "boom", "abort", "slow", "missing", "bad%2Fid",
    ] {
        let response = gateway.get_run(id).await;
        assert!(!response.everything().contains(TEST_KEY), "{id} leaked the key");
    }
    never.open();
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

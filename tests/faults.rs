//! Upstream faults: after each, the gateway still serves what it has and the next request for the
//! run retries cleanly. Nothing from a failed exchange is ever stored.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::raw::{RawUpstream, Script};
use support::{TEST_KEY, TestGateway, run_body, test_config};

/// A gateway in front of a raw upstream that already holds one cached run, `done`.
async fn gateway_with_a_hit(
    raw: &RawUpstream,
    adjust: impl FnOnce(&mut plextera_gateway::Config),
) -> TestGateway {
    let mut config = test_config(&raw.base_url());
    config.upstream.request_timeout = Duration::from_millis(500);
    adjust(&mut config);
    let gateway = TestGateway::start_with(config).await;
    raw.set(
        "done",
        Script::Ok(String::from_utf8(run_body("done", "COMPLETED", 300).to_vec()).expect("utf-8")),
    );
    assert_eq!(gateway.get_run("done").await.x_cache(), Some("MISS"));
    gateway
}

/// The fault answered with `status`/`code`; hits still served; the run retried once it is healthy.
async fn assert_recovers(gateway: &TestGateway, raw: &RawUpstream, status: StatusCode, code: &str) {
    let failed = gateway.get_run("flaky").await;
    assert_eq!(
        failed.status,
        status,
        "{:?}",
        String::from_utf8_lossy(&failed.body)
    );
    assert_eq!(failed.error_code(), code);
    assert!(!failed.everything().contains(TEST_KEY));
    assert_eq!(
        gateway.get_run("done").await.x_cache(),
        Some("HIT"),
        "hits are still served"
    );

    let before = raw.count_for("flaky");
    raw.set(
        "flaky",
        Script::Ok(String::from_utf8(run_body("flaky", "COMPLETED", 100).to_vec()).expect("utf-8")),
    );
    let retried = gateway.get_run("flaky").await;
    assert_eq!(retried.status, StatusCode::OK);
    assert_eq!(
        retried.x_cache(),
        Some("MISS"),
        "nothing from the failed exchange was stored"
    );
    assert_eq!(raw.count_for("flaky"), before + 1);
}

#[tokio::test]
async fn a_body_shorter_than_its_content_length() {
    let raw = RawUpstream::start().await;
    let gateway = gateway_with_a_hit(&raw, |_| {}).await;
    raw.set(
        "flaky",
        Script::Truncated {
            declared: 1000,
            sent: 100,
        },
    );
    assert_recovers(&gateway, &raw, StatusCode::BAD_GATEWAY, "UPSTREAM_UNAVAILABLE").await;
}

#[tokio::test]
async fn a_connection_reset_mid_body() {
    let raw = RawUpstream::start().await;
    let gateway = gateway_with_a_hit(&raw, |_| {}).await;
    raw.set(
        "flaky",
        Script::ResetMidBody {
            declared: 1000,
            sent: 200,
        },
    );
    assert_recovers(&gateway, &raw, StatusCode::BAD_GATEWAY, "UPSTREAM_UNAVAILABLE").await;
}

#[tokio::test]
async fn a_slow_drip_past_the_request_timeout() {
    let raw = RawUpstream::start().await;
    let gateway = gateway_with_a_hit(&raw, |_| {}).await;
    raw.set(
        "flaky",
        Script::Drip {
            every: Duration::from_millis(50),
        },
    );
    let started = std::time::Instant::now();
    assert_recovers(&gateway, &raw, StatusCode::GATEWAY_TIMEOUT, "UPSTREAM_TIMEOUT").await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the timeout bounds the whole exchange"
    );
}

#[tokio::test]
async fn a_body_far_beyond_max_body_size_is_abandoned_early() {
    let raw = RawUpstream::start().await;
    let gateway = gateway_with_a_hit(&raw, |config| {
        config.upstream.max_body_size = bytesize::ByteSize::mib(1);
        config.upstream.request_timeout = Duration::from_secs(5);
    })
    .await;
    raw.set("flaky", Script::Endless);
    let started = std::time::Instant::now();
    assert_recovers(&gateway, &raw, StatusCode::BAD_GATEWAY, "UPSTREAM_BODY_TOO_LARGE").await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "stopped reading at the limit, not at the timeout"
    );
}

#[tokio::test]
async fn a_refused_connection() {
    let raw = RawUpstream::start().await;
    let gateway = gateway_with_a_hit(&raw, |_| {}).await;
    drop(raw); // nothing listens any more
    let failed = gateway.get_run("flaky").await;
    assert_eq!(failed.status, StatusCode::BAD_GATEWAY);
    assert_eq!(failed.error_code(), "UPSTREAM_UNAVAILABLE");
    assert_eq!(gateway.get_run("done").await.x_cache(), Some("HIT"));
}

#[tokio::test]
async fn bodies_that_are_not_runs_are_passed_not_stored() {
    let raw = RawUpstream::start().await;
    let gateway = gateway_with_a_hit(&raw, |_| {}).await;
    for (id, body) in [
        ("garbage", "<html>oops</html>"),
        ("wrong_type", r#"{"id":"wrong_type","status":["COMPLETED"]}"#),
        ("other_run", r#"{"id":"someone_else","status":"COMPLETED"}"#),
    ] {
        raw.set(id, Script::Ok(body.to_owned()));
        for _ in 0..2 {
            let response = gateway.get_run(id).await;
            assert_eq!(response.status, StatusCode::OK);
            assert_eq!(response.x_cache(), Some("PASS"), "{id}");
            assert_eq!(response.body, body.as_bytes());
        }
        assert_eq!(raw.count_for(id), 2, "{id} was not stored");
    }
    assert_eq!(gateway.get_run("done").await.x_cache(), Some("HIT"));
}

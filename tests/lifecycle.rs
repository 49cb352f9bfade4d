//! Readiness and graceful shutdown, in-process.

mod support;

use std::time::Duration;

use http::{Method, StatusCode};
use support::{Gate, MockUpstream, Reply, TestClient, TestGateway, eventually, runs_path};
use tokio::net::TcpStream;

#[tokio::test]
async fn health_and_readiness_live_on_the_admin_port_only() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    let health = gateway.admin_get("/healthz").await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.json()["status"], "ok");
    let ready = gateway.admin_get("/readyz").await;
    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(gateway.admin_get("/nope").await.status, StatusCode::NOT_FOUND);
    let admin = |method: Method, path: &'static str| {
        let url = format!("http://{}{path}", gateway.admin);
        async move { TestClient::new().send(method, &url, &[]).await }
    };
    // A path that is not there is 404 whatever the method; one that is, 405 with what it takes.
    assert_eq!(admin(Method::DELETE, "/nope").await.status, StatusCode::NOT_FOUND);
    let wrong_method = admin(Method::POST, "/healthz").await;
    assert_eq!(wrong_method.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(wrong_method.header("allow"), Some("GET, HEAD"));
    assert_eq!(
        gateway.send(Method::GET, "/healthz", &[]).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        gateway.send(Method::GET, "/readyz", &[]).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(mock.request_count(), 0);
}

/// Waits for `/readyz` to turn 503 (the shutdown has begun).
async fn wait_until_not_ready(gateway: &TestGateway) {
    let admin = gateway.admin;
    eventually("/readyz reports not ready", || async move {
        TestClient::new()
            .try_send(Method::GET, &format!("http://{admin}/readyz"), &[])
            .await
            .is_ok_and(|response| response.status == StatusCode::SERVICE_UNAVAILABLE)
    })
    .await;
}

#[tokio::test]
async fn shutdown_refuses_new_work_and_finishes_what_is_in_flight() {
    let mock = MockUpstream::start().await;
    let mut gateway = TestGateway::start(&mock, |config| {
        config.server.shutdown_grace = Duration::from_secs(10);
    })
    .await;
    let gate = Gate::new();
    mock.set("slow", Reply::run("slow", "COMPLETED").gated(&gate));
    let url = gateway.url(&runs_path("slow"));
    let in_flight = tokio::spawn(async move { TestClient::new().send(Method::GET, &url, &[]).await });
    mock.wait_for_requests(1).await;

    gateway.begin_shutdown();
    wait_until_not_ready(&gateway).await;
    let refused = TcpStream::connect(gateway.public).await;
    assert!(refused.is_err(), "the public port no longer accepts connections");

    gate.open();
    let response = in_flight.await.expect("client task");
    assert_eq!(response.status, StatusCode::OK, "the in-flight request completed");
    assert_eq!(response.json()["id"], "slow");
    gateway.stopped().await;
}

#[tokio::test]
async fn requests_still_running_after_the_grace_period_are_cut() {
    let mock = MockUpstream::start().await;
    let mut gateway = TestGateway::start(&mock, |config| {
        config.server.shutdown_grace = Duration::from_millis(200);
    })
    .await;
    let never = Gate::new();
    mock.set("stuck", Reply::run("stuck", "COMPLETED").gated(&never));
    let url = gateway.url(&runs_path("stuck"));
    let in_flight = tokio::spawn(async move { TestClient::new().try_send(Method::GET, &url, &[]).await });
    mock.wait_for_requests(1).await;

    gateway.begin_shutdown();
    gateway.stopped().await;
    let outcome = in_flight.await.expect("client task");
    assert!(outcome.is_err(), "the stuck request was cut, got {outcome:?}");
    never.open();
}

#[tokio::test]
async fn idle_keep_alive_connections_do_not_hold_up_shutdown() {
    let mock = MockUpstream::start().await;
    let mut gateway = TestGateway::start(&mock, |config| {
        config.server.shutdown_grace = Duration::from_secs(30);
    })
    .await;
    mock.set("run_1", Reply::run("run_1", "COMPLETED"));
    // The test client keeps its connection alive and idle in its pool.
    assert_eq!(gateway.get_run("run_1").await.status, StatusCode::OK);
    gateway.begin_shutdown();
    let started = std::time::Instant::now();
    gateway.stopped().await;
    // Held up, it would wait out the 30 s grace (and `stopped` gives up at 10 s): an idle
    // connection is closed as the drain starts.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "drained in {:?}, without waiting out the grace",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_shutdown_delay_keeps_serving_while_reporting_not_ready() {
    let mock = MockUpstream::start().await;
    let mut gateway = TestGateway::start(&mock, |config| {
        config.server.shutdown_delay = Duration::from_secs(2);
    })
    .await;
    mock.set("run_1", Reply::run("run_1", "COMPLETED"));
    gateway.begin_shutdown();
    wait_until_not_ready(&gateway).await;
    // Not ready, but still serving new connections during the delay.
    let url = gateway.url(&runs_path("run_1"));
    let response = TestClient::new().send(Method::GET, &url, &[]).await;
    assert_eq!(response.status, StatusCode::OK);
    gateway.stopped().await;
    assert!(
        TcpStream::connect(gateway.public).await.is_err(),
        "closed after the delay"
    );
}

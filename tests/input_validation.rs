//! Bad input is answered by the gateway with a JSON error and never reaches upstream.

mod support;

use http::{Method, StatusCode};
use support::{MockUpstream, Reply, TestGateway, raw_exchange, runs_path};

/// Sends each raw request target and returns the status line and body of the answer.
async fn raw_get(gateway: &TestGateway, target: &str) -> (String, String) {
    let request = format!("GET {target} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n");
    let response = raw_exchange(gateway.public, request.as_bytes()).await;
    let status_line = response.lines().next().unwrap_or_default().to_owned();
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status_line, body)
}

#[tokio::test]
async fn hostile_run_ids_are_refused_before_upstream() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    let targets = [
        "..",
        "%2e%2e",
        "%2E%2E%2Fadmin",
        "a%2Fb",
        "%00",
        "run%00",
        "%252e%252e",
        "%c0%ae%c0%ae",
        "%C0%AF",
        "r%D0%B0n_1",
        "%EF%BC%A1",
        "run%20id",
        "run.json",
        "%",
        "%zz",
        &"x".repeat(129),
    ];
    for id in targets {
        let (status, body) = raw_get(&gateway, &runs_path(id)).await;
        assert!(status.contains(" 400 "), "{id}: {status}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{id}: {body}"));
        assert_eq!(json["error"]["code"], "INVALID_RUN_ID", "{id}");
        assert_eq!(json["error"]["retryable"], false);
    }
    assert_eq!(mock.request_count(), 0, "nothing reached upstream");
}

#[tokio::test]
async fn other_paths_are_404_and_never_forwarded() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    for target in [
        "/",
        "/metrics",
        "/healthz",
        "/readyz",
        "/api/public/v1/workflow-runs",
        "/api/public/v1/workflow-runs/a/b",
        "/api/public/v1/workflow-runs/run_1/",
        "/api/public/v1/workflow-runs/../../../etc/passwd",
        "/api/public/v1/../v1/workflow-runs/run_1",
        "//api/public/v1/workflow-runs/run_1",
        "/api/public/v1/workflows/wf_1/runs",
        "/api/public/v1/event-subscriptions",
    ] {
        let (status, body) = raw_get(&gateway, target).await;
        assert!(status.contains(" 404 "), "{target}: {status}");
        assert!(body.contains("\"NOT_FOUND\""), "{target}: {body}");
    }
    assert_eq!(mock.request_count(), 0);
}

#[tokio::test]
async fn only_get_and_head_are_allowed() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    mock.set("run_1", Reply::run("run_1", "COMPLETED"));
    for method in [
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::OPTIONS,
        Method::TRACE,
    ] {
        let response = gateway.send(method.clone(), &runs_path("run_1"), &[]).await;
        assert_eq!(response.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(response.header("allow"), Some("GET, HEAD"));
        assert_eq!(response.error_code(), "METHOD_NOT_ALLOWED");
    }
    assert_eq!(mock.request_count(), 0);
}

#[tokio::test]
async fn oversized_uris_and_headers_get_json_errors() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    let long_target = format!("{}?pad={}", runs_path("run_1"), "x".repeat(4000));
    let (status, body) = raw_get(&gateway, &long_target).await;
    assert!(status.contains(" 414 "), "{status}");
    assert!(body.contains("\"URI_TOO_LONG\""), "{body}");

    let filler = "v".repeat(1000);
    let headers: Vec<(String, &str)> = (0..20)
        .map(|index| (format!("x-filler-{index}"), filler.as_str()))
        .collect();
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(name, value)| (name.as_str(), *value))
        .collect();
    let response = gateway.send(Method::GET, &runs_path("run_1"), &headers).await;
    assert_eq!(response.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(response.error_code(), "HEADERS_TOO_LARGE");
    assert_eq!(mock.request_count(), 0);
}

#[tokio::test]
async fn an_absolute_form_target_cannot_redirect_the_upstream_call() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    mock.set("run_1", Reply::run("run_1", "PROCESSING"));
    let (status, _) = raw_get(&gateway, "http://evil.example/api/public/v1/workflow-runs/run_1").await;
    assert!(status.contains(" 200 "), "{status}");
    let requests = mock.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].headers["host"], mock.addr.to_string().as_str());
}

#[tokio::test]
async fn every_gateway_error_carries_the_request_id() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    let response = gateway
        .send(Method::GET, &runs_path("bad.id"), &[("x-request-id", "trace-me")])
        .await;
    assert_eq!(response.status, StatusCode::BAD_REQUEST);
    assert_eq!(response.header("x-request-id"), Some("trace-me"));
    assert_eq!(response.json()["error"]["requestId"], "trace-me");
    assert_eq!(response.header("cache-control"), Some("no-store"));
}

#[tokio::test]
async fn a_method_that_is_not_allowed_is_405_whatever_its_body_and_the_body_is_not_read() {
    let mock = MockUpstream::start().await;
    mock.set("run_1", Reply::run("run_1", "COMPLETED"));
    let gateway = TestGateway::start(&mock, |_| {}).await;
    let path = runs_path("run_1");
    for request in [
        format!("POST {path} HTTP/1.1\r\nHost: g\r\nContent-Length: 4\r\n\r\nabcd"),
        format!("PUT {path} HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n"),
        // A body that smuggles a second request must not be read as one.
        format!(
            "DELETE {path} HTTP/1.1\r\nHost: g\r\nContent-Length: 40\r\n\r\nGET {path} HTTP/1.1\r\nHost: g\r\n\r\n"
        ),
    ] {
        let response = raw_exchange(gateway.public, request.as_bytes()).await;
        let status_line = response.lines().next().unwrap_or_default();
        assert!(status_line.contains(" 405 "), "{request:?}: {status_line}");
        let lower = response.to_ascii_lowercase();
        assert!(lower.contains("allow: get, head"), "{response}");
        assert!(
            lower.contains("connection: close"),
            "the unread body ends the connection: {response}"
        );
        assert!(response.contains("METHOD_NOT_ALLOWED"), "{response}");
        assert_eq!(
            response.matches("HTTP/1.1 ").count(),
            1,
            "nothing else was answered"
        );
    }
    // A GET that frames a body is still 400 and closes too.
    let request = format!("GET {path} HTTP/1.1\r\nHost: g\r\nContent-Length: 4\r\n\r\nabcd");
    let response = raw_exchange(gateway.public, request.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert!(response.contains("INVALID_REQUEST"), "{response}");
    assert!(
        response.to_ascii_lowercase().contains("connection: close"),
        "{response}"
    );
    assert_eq!(mock.request_count(), 0, "nothing reached upstream");
}

#[tokio::test]
async fn an_http11_request_without_exactly_one_host_is_refused() {
    let mock = MockUpstream::start().await;
    mock.set("run_1", Reply::run("run_1", "COMPLETED"));
    let gateway = TestGateway::start(&mock, |_| {}).await;
    let path = runs_path("run_1");
    for request in [
        format!("GET {path} HTTP/1.1\r\nConnection: close\r\n\r\n"),
        format!("GET {path} HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n"),
    ] {
        let response = raw_exchange(gateway.public, request.as_bytes()).await;
        assert!(response.starts_with("HTTP/1.1 400"), "{request:?}: {response}");
        assert!(response.contains("INVALID_REQUEST"), "{response}");
    }
    // HTTP/1.0 had no Host header.
    let response = raw_exchange(gateway.public, format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).await;
    assert!(response.starts_with("HTTP/1.0 200"), "{response}");
    assert_eq!(
        mock.count_for("run_1"),
        1,
        "only the HTTP/1.0 request went upstream"
    );
}

//! Bad input is answered by the gateway with a JSON error and never reaches upstream.

mod support;

use std::net::SocketAddr;

use http::{Method, StatusCode};
use support::{MockUpstream, PATIENCE, Reply, TestGateway, raw_exchange, runs_path};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

/// Includes the admin port's paths: `/metrics`, `/healthz` and `/readyz` are not on the public one.
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
        // Nothing of the admin port shows through, `/metrics` least of all.
        assert!(!body.contains("plextera_gateway_"), "{target}: {body}");
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
    // A GET that frames a body: `a_get_that_frames_a_body_is_400_and_ends_its_connection`.
    assert_eq!(mock.request_count(), 0, "nothing reached upstream");
}

/// The length of the first complete answer in `bytes` (head and `Content-Length` body), if it is
/// all there.
fn complete_answer_len(bytes: &[u8]) -> Option<usize> {
    let head_end = bytes.windows(4).position(|window| window == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&bytes[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .map(|value| value.trim().parse().expect("a numeric content-length"))
        .unwrap_or_else(|| panic!("the answer declares its length: {head}"));
    (bytes.len() >= head_end + length).then_some(head_end + length)
}

/// How a connection ended after its first answer.
struct AfterAnswer {
    /// The first answer, head and body.
    answer: String,
    /// Every byte received after the first answer.
    rest: String,
    /// The read after the answer ended in EOF (`Ok`), or in an error such as a reset.
    ended: std::io::Result<usize>,
}

/// Writes `request` on a fresh connection and reads one complete answer; then writes `next`, if
/// any, at once, and reads until the server closes the connection (failing after `PATIENCE`).
async fn answer_and_what_follows(addr: SocketAddr, request: &str, next: Option<&str>) -> AfterAnswer {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write request");
    let mut received = Vec::new();
    let answer_len = loop {
        if let Some(length) = complete_answer_len(&received) {
            break length;
        }
        let mut chunk = [0u8; 4096];
        let read = tokio::time::timeout(PATIENCE, stream.read(&mut chunk))
            .await
            .expect("an answer in time")
            .expect("read the answer");
        assert!(
            read > 0,
            "closed before a complete answer: {:?}",
            String::from_utf8_lossy(&received)
        );
        received.extend_from_slice(&chunk[..read]);
    };
    let mut rest = received.split_off(answer_len);
    if let Some(next) = next {
        // After the gateway's close this write may fail, or be answered by a reset: either way,
        // only what is read next matters.
        let _ = stream.write_all(next.as_bytes()).await;
    }
    let ended = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest))
        .await
        .expect("the connection was not closed in time");
    AfterAnswer {
        answer: String::from_utf8_lossy(&received).into_owned(),
        rest: String::from_utf8_lossy(&rest).into_owned(),
        ended,
    }
}

#[tokio::test]
async fn a_get_that_frames_a_body_is_400_and_ends_its_connection() {
    let mock = MockUpstream::start().await;
    mock.set("run_1", Reply::run("run_1", "COMPLETED"));
    let gateway = TestGateway::start(&mock, |_| {}).await;
    let path = runs_path("run_1");
    let second = format!("GET {path} HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n");
    for (framing, request) in [
        (
            "content-length",
            format!("GET {path} HTTP/1.1\r\nHost: g\r\nContent-Length: 4\r\n\r\nabcd"),
        ),
        (
            "chunked",
            format!(
                "GET {path} HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n"
            ),
        ),
    ] {
        // The answer, then a clean end of stream with nothing after it.
        let after = answer_and_what_follows(gateway.public, &request, None).await;
        let answer = &after.answer;
        assert!(answer.starts_with("HTTP/1.1 400 "), "{framing}: {answer}");
        assert!(
            answer.to_ascii_lowercase().contains("\r\nconnection: close\r\n"),
            "{framing}: the answer announces the close: {answer}"
        );
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
        let json: serde_json::Value =
            serde_json::from_str(body).unwrap_or_else(|error| panic!("{framing}: {error}: {body:?}"));
        assert_eq!(json["error"]["code"], "INVALID_REQUEST", "{framing}: {body}");
        assert!(
            after.ended.is_ok(),
            "{framing}: EOF after the answer, got {:?}",
            after.ended
        );
        assert_eq!(after.rest, "", "{framing}: nothing after the answer");

        // A second request written as soon as the answer is read is never answered: the
        // connection ends (EOF, or a reset when the request lands on the closed socket).
        let after = answer_and_what_follows(gateway.public, &request, Some(&second)).await;
        assert!(
            after.answer.starts_with("HTTP/1.1 400 "),
            "{framing}: {}",
            after.answer
        );
        assert_eq!(
            after.rest, "",
            "{framing}: the request after the refused one was answered"
        );
    }
    assert_eq!(mock.request_count(), 0, "nothing reached upstream");

    // The control: with `Content-Length: 0` the same GET is served, the connection stays open,
    // and the second request is answered; so an answer to it above would have been seen.
    let request = format!("GET {path} HTTP/1.1\r\nHost: g\r\nContent-Length: 0\r\n\r\n");
    let after = answer_and_what_follows(gateway.public, &request, Some(&second)).await;
    assert!(after.answer.starts_with("HTTP/1.1 200 "), "{}", after.answer);
    assert!(
        !after.answer.to_ascii_lowercase().contains("connection: close"),
        "{}",
        after.answer
    );
    assert!(after.rest.starts_with("HTTP/1.1 200 "), "{:?}", after.rest);
    assert_eq!(mock.count_for("run_1"), 1, "the second was a hit");
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

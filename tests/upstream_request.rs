//! What travels upstream: the server-side key, the request id, and nothing the client sent.

mod support;

use http::{Method, StatusCode};
use support::{MockUpstream, Reply, TEST_KEY, TestGateway, runs_path};

#[tokio::test]
async fn the_key_is_injected_and_client_headers_are_not_forwarded() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    mock.set("run_1", Reply::run("run_1", "PROCESSING"));
    let hostile = [
        ("authorization", "api-key stolen-frontend-key"),
        ("cookie", "session=abc"),
        ("proxy-authorization", "Basic Zm9vOmJhcg=="),
        ("connection", "keep-alive, x-secret-hop"),
        ("x-secret-hop", "1"),
        ("keep-alive", "timeout=5"),
        ("te", "trailers"),
        ("upgrade", "websocket"),
        ("x-forwarded-for", "10.0.0.1"),
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-proto", "http"),
        ("forwarded", "for=10.0.0.1;host=evil.example"),
        ("x-original-url", "/admin"),
        ("x-rewrite-url", "/admin"),
        ("x-http-method-override", "DELETE"),
        ("x-real-ip", "10.0.0.1"),
        ("accept-encoding", "gzip"),
        ("if-none-match", "\"abc\""),
        ("x-custom", "anything"),
    ];
    let response = gateway.send(Method::GET, &runs_path("run_1"), &hostile).await;
    assert_eq!(response.status, StatusCode::OK);

    let requests = mock.requests();
    assert_eq!(requests.len(), 1);
    let upstream = &requests[0];
    assert_eq!(upstream.method, Method::GET);
    assert_eq!(upstream.target, runs_path("run_1"));
    assert_eq!(
        upstream.headers["authorization"],
        format!("api-key {TEST_KEY}").as_str()
    );
    assert_eq!(upstream.headers.get_all("authorization").iter().count(), 1);
    assert_eq!(upstream.headers["accept"], "application/json");
    assert_eq!(upstream.headers["host"], mock.addr.to_string().as_str());
    assert!(
        upstream.headers["user-agent"]
            .to_str()
            .expect("ascii")
            .starts_with("plextera-gateway/")
    );
    for (name, _) in hostile {
        if name == "authorization" {
            continue;
        }
        assert!(
            upstream.headers.get(name).is_none(),
            "{name} was forwarded upstream"
        );
    }
    let sent: Vec<&str> = upstream.headers.keys().map(|name| name.as_str()).collect();
    let mut sent_sorted = sent.clone();
    sent_sorted.sort_unstable();
    assert_eq!(
        sent_sorted,
        [
            "accept",
            "authorization",
            "host",
            "traceparent",
            "user-agent",
            "x-request-id"
        ],
        "only the gateway's own headers go upstream (traceparent names the gateway's call)"
    );
}

#[tokio::test]
async fn a_sane_request_id_is_echoed_and_sent_upstream() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    mock.set("run_1", Reply::run("run_1", "PROCESSING"));
    let response = gateway
        .send(
            Method::GET,
            &runs_path("run_1"),
            &[("x-request-id", "frontend-req-42")],
        )
        .await;
    assert_eq!(response.header("x-request-id"), Some("frontend-req-42"));
    assert_eq!(mock.requests()[0].headers["x-request-id"], "frontend-req-42");
}

#[tokio::test]
async fn a_missing_or_hostile_request_id_is_replaced_by_a_fresh_one() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    mock.set("run_1", Reply::run("run_1", "PROCESSING"));
    let long = "a".repeat(200);
    let mut issued = Vec::new();
    for headers in [
        vec![],
        vec![("x-request-id", "has spaces \" and quotes")],
        vec![("x-request-id", long.as_str())],
    ] {
        let response = gateway.send(Method::GET, &runs_path("run_1"), &headers).await;
        let id = response.header("x-request-id").expect("request id").to_owned();
        assert_eq!(id.len(), 36, "a UUID: {id}");
        issued.push(id);
    }
    let upstream: Vec<String> = mock
        .requests()
        .iter()
        .map(|request| {
            request.headers["x-request-id"]
                .to_str()
                .expect("ascii")
                .to_owned()
        })
        .collect();
    assert_eq!(upstream, issued, "upstream sees the id the client is given");
    let mut unique = issued.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 3, "each request gets its own id");
}

#[tokio::test]
async fn base_url_path_prefix_is_kept() {
    let mock = MockUpstream::start().await;
    let base = format!("{}/egress/plextera/", mock.base_url());
    let gateway = TestGateway::start(&mock, |config| config.upstream.base_url = base).await;
    gateway.get_run("run_1").await;
    assert_eq!(
        mock.requests()[0].target,
        "/egress/plextera/api/public/v1/workflow-runs/run_1"
    );
}

//! CORS for browser frontends: off by default, answered by the gateway when configured.

mod support;

use http::{Method, StatusCode};
use support::{MockUpstream, Reply, TestGateway, runs_path};

const APP: &str = "https://app.example.com";

#[tokio::test]
async fn without_configured_origins_no_cors_headers_are_sent() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    mock.set("run_1", Reply::run("run_1", "COMPLETED"));
    let response = gateway
        .send(Method::GET, &runs_path("run_1"), &[("origin", APP)])
        .await;
    assert_eq!(response.status, StatusCode::OK);
    assert!(response.header("access-control-allow-origin").is_none());
    let preflight = gateway
        .send(
            Method::OPTIONS,
            &runs_path("run_1"),
            &[("origin", APP), ("access-control-request-method", "GET")],
        )
        .await;
    assert_eq!(preflight.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn allowed_origins_get_cors_headers_and_preflights_are_answered_locally() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| {
        config.server.cors_allowed_origins = vec![APP.to_owned()];
    })
    .await;
    mock.set("run_1", Reply::run("run_1", "COMPLETED"));

    let preflight = gateway
        .send(
            Method::OPTIONS,
            &runs_path("run_1"),
            &[
                ("origin", APP),
                ("access-control-request-method", "GET"),
                ("access-control-request-headers", "x-request-id"),
            ],
        )
        .await;
    assert_eq!(preflight.status, StatusCode::OK);
    assert_eq!(preflight.header("access-control-allow-origin"), Some(APP));
    let methods = preflight
        .header("access-control-allow-methods")
        .expect("allow-methods");
    assert!(methods.contains("GET") && methods.contains("HEAD"), "{methods}");
    let allowed = preflight
        .header("access-control-allow-headers")
        .expect("allow-headers");
    // A browser's tracing SDK adds traceparent and tracestate: they must pass a preflight.
    for header in ["x-request-id", "traceparent", "tracestate"] {
        assert!(allowed.contains(header), "{header}: {allowed}");
    }
    assert!(preflight.header("access-control-max-age").is_some());
    assert!(preflight.header("x-request-id").is_some());
    assert_eq!(mock.request_count(), 0, "preflight answered by the gateway");

    let response = gateway
        .send(Method::GET, &runs_path("run_1"), &[("origin", APP)])
        .await;
    assert_eq!(response.header("access-control-allow-origin"), Some(APP));
    let exposed = response
        .header("access-control-expose-headers")
        .expect("expose-headers");
    assert!(
        exposed.contains("x-cache") && exposed.contains("x-request-id"),
        "{exposed}"
    );
    // Varies by origin (CORS) and, an ended run that clients keep, by Accept (an event stream).
    let vary: Vec<String> = response
        .headers
        .get_all("vary")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .collect();
    assert!(
        vary.iter().any(|name| name == "origin") && vary.iter().any(|name| name == "accept"),
        "{vary:?}"
    );

    let error = gateway
        .send(Method::GET, &runs_path("bad.id"), &[("origin", APP)])
        .await;
    assert_eq!(error.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        error.header("access-control-allow-origin"),
        Some(APP),
        "errors are readable by the app too"
    );
}

#[tokio::test]
async fn other_origins_are_not_allowed() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| {
        config.server.cors_allowed_origins = vec![APP.to_owned()];
    })
    .await;
    mock.set("run_1", Reply::run("run_1", "COMPLETED"));
    let response = gateway
        .send(
            Method::GET,
            &runs_path("run_1"),
            &[("origin", "https://evil.example")],
        )
        .await;
    assert!(response.header("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn the_wildcard_allows_any_origin() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| {
        config.server.cors_allowed_origins = vec!["*".to_owned()];
    })
    .await;
    mock.set("run_1", Reply::run("run_1", "COMPLETED"));
    let response = gateway
        .send(
            Method::GET,
            &runs_path("run_1"),
            &[("origin", "https://anything.example")],
        )
        .await;
    assert_eq!(response.header("access-control-allow-origin"), Some("*"));
}

//! The key goes upstream and nowhere else: not in a body upstream echoes, not in metrics; and
//! client tokens, when configured, guard the gateway itself.

mod support;

use http::{Method, StatusCode};
use plextera_gateway::client_auth::ClientTokens;
use plextera_gateway::{ApiKey, Secrets};
use support::{MockUpstream, Reply, TEST_KEY, TestGateway, runs_path, test_config};

#[tokio::test]
async fn an_upstream_body_that_echoes_the_key_is_scrubbed() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    let echo =
        format!(r#"{{"error":{{"code":"X","message":"bad header: Authorization: api-key {TEST_KEY}"}}}}"#);
    mock.set("gone", Reply::status(StatusCode::NOT_FOUND, echo.clone()));
    mock.set(
        "boom",
        Reply::status(StatusCode::INTERNAL_SERVER_ERROR, echo.clone()),
    );
    mock.set(
        "live",
        Reply::ok(format!(
            r#"{{"id":"live","status":"PROCESSING","note":"{TEST_KEY}"}}"#
        )),
    );
    mock.set(
        "done",
        Reply::ok(format!(
            r#"{{"id":"done","status":"COMPLETED","note":"{TEST_KEY}"}}"#
        )),
    );
    mock.set(
        "limited",
        Reply::status(StatusCode::TOO_MANY_REQUESTS, "{}").with_header("retry-after", TEST_KEY),
    );
    for id in ["gone", "boom", "live", "done", "done", "limited"] {
        let response = gateway.get_run(id).await;
        let everything = response.everything();
        assert!(
            !everything.contains(TEST_KEY),
            "{id} leaked the key: {everything}"
        );
        if id != "limited" {
            assert!(everything.contains("[redacted]"), "{id}: {everything}");
        }
    }
    // The scrubbed terminal run is still valid JSON, served from memory the second time.
    assert_eq!(gateway.get_run("done").await.json()["note"], "[redacted]");
}

#[tokio::test]
async fn metrics_never_hold_the_key() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    mock.set(
        "denied",
        Reply::status(StatusCode::UNAUTHORIZED, format!("bad key {TEST_KEY}")),
    );
    mock.set(TEST_KEY, Reply::run(TEST_KEY, "COMPLETED"));
    gateway.get_run("denied").await;
    gateway.get_run(TEST_KEY).await; // even a run id that happens to be the key
    let scrape = gateway.scrape().await;
    assert!(!scrape.text.contains(TEST_KEY));
}

async fn gateway_with_tokens(
    mock: &MockUpstream,
    configure: impl FnOnce(&mut plextera_gateway::Config),
) -> TestGateway {
    let mut config = test_config(&mock.base_url());
    configure(&mut config);
    let secrets = Secrets {
        api_key: ApiKey::new(TEST_KEY).expect("key"),
        client_tokens: Some(ClientTokens::new(&["frontend-token-1", "frontend-token-2"])),
        redis_password: None,
    };
    TestGateway::start_with_secrets(config, secrets).await
}

#[tokio::test]
async fn client_tokens_guard_the_runs_path() {
    let mock = MockUpstream::start().await;
    mock.set("run_1", Reply::run("run_1", "COMPLETED"));
    let gateway = gateway_with_tokens(&mock, |_| {}).await;
    for headers in [
        vec![],
        vec![("authorization", "Bearer wrong")],
        vec![("authorization", "Basic ZnJvbnRlbmQ=")],
        vec![("authorization", "Bearer frontend-token-")],
    ] {
        let refused = gateway.send(Method::GET, &runs_path("run_1"), &headers).await;
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{headers:?}");
        assert_eq!(refused.error_code(), "UNAUTHORIZED");
        assert_eq!(refused.header("www-authenticate"), Some("Bearer"));
    }
    // Refused before routing: even bad paths and ids get 401, never 404/400.
    assert_eq!(
        gateway.send(Method::GET, "/nope", &[]).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(mock.request_count(), 0, "nothing reached upstream");

    for token in ["frontend-token-1", "frontend-token-2"] {
        let bearer = format!("Bearer {token}");
        let served = gateway
            .send(Method::GET, &runs_path("run_1"), &[("authorization", &bearer)])
            .await;
        assert_eq!(served.status, StatusCode::OK);
    }
    let upstream = &mock.requests()[0];
    assert_eq!(
        upstream.headers["authorization"],
        format!("api-key {TEST_KEY}").as_str(),
        "never the client's"
    );
    let scrape = gateway.scrape().await;
    assert_eq!(
        scrape.expect(
            "plextera_gateway_requests_total",
            &[("cache", "error"), ("code", "401")]
        ),
        5.0
    );
}

#[tokio::test]
async fn cors_preflights_need_no_token() {
    let mock = MockUpstream::start().await;
    let gateway = gateway_with_tokens(&mock, |config| {
        config.server.cors_allowed_origins = vec!["https://app.example.com".to_owned()];
    })
    .await;
    let preflight = gateway
        .send(
            Method::OPTIONS,
            &runs_path("run_1"),
            &[
                ("origin", "https://app.example.com"),
                ("access-control-request-method", "GET"),
                ("access-control-request-headers", "authorization"),
            ],
        )
        .await;
    assert_eq!(preflight.status, StatusCode::OK);
    let allowed = preflight
        .header("access-control-allow-headers")
        .expect("allow-headers");
    assert!(allowed.contains("authorization"), "{allowed}");
}

//! The key goes upstream and nowhere else: not in a body upstream echoes, not in metrics; and
//! client tokens, when configured, guard the gateway itself.

mod support;

use http::{Method, StatusCode};
use percent_encoding::{NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use plextera_gateway::edge::client_auth::ClientTokens;
use plextera_gateway::{ApiKey, Secrets};
use support::{MockUpstream, Reply, TEST_KEY, TestGateway, raw_exchange, runs_path, test_config};

/// Keys with the characters encoders like to escape: `/` and `+` (base64), `"` and `\` (JSON
/// must escape them), `<`, `>` and `&` (Go and .NET escape them).
const AWKWARD_KEYS: [&str; 4] = [
    "sk_live_ab/cd+ef==",
    "k\"quo\\te\"",
    "k<ab>&cd&amp;",
    "a/+\"\\<>&%z",
];

/// How a JSON, URL, HTML or script encoder upstream might write `key`, each written independently
/// of the gateway's code.
fn echoes_of(key: &str) -> Vec<(&'static str, String)> {
    let json = serde_json::to_string(key).expect("a string serialises");
    let json = json[1..json.len() - 1].to_owned();
    let go = json
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026");
    let dotnet = go.replace('+', "\\u002B");
    let php = json.replace('/', "\\/");
    let every_char: String = key.bytes().map(|byte| format!("\\u{byte:04x}")).collect();
    let percent = utf8_percent_encode(key, NON_ALPHANUMERIC).to_string();
    let percent_lower = lower_hex_escapes(&percent);
    let percent_in_json = percent.replace('%', "\\u0025");
    let double_percent = percent.replace('%', "%25");
    // OWASP's HTML escaping: the five named references, and / as &#x2F;.
    let html: String = key
        .chars()
        .map(|c| match c {
            '&' => "&amp;".to_owned(),
            '<' => "&lt;".to_owned(),
            '>' => "&gt;".to_owned(),
            '"' => "&quot;".to_owned(),
            '\'' => "&#x27;".to_owned(),
            '/' => "&#x2F;".to_owned(),
            other => other.to_string(),
        })
        .collect();
    let html_numeric: String = key.bytes().map(|byte| format!("&#{byte};")).collect();
    let script_hex: String = key
        .bytes()
        .map(|byte| match byte.is_ascii_alphanumeric() {
            true => char::from(byte).to_string(),
            false => format!("\\x{byte:02x}"),
        })
        .collect();
    vec![
        ("raw", key.to_owned()),
        ("json", json),
        ("go", go),
        ("dotnet", dotnet),
        ("php", php),
        ("every char", every_char),
        ("percent", percent),
        ("percent lower", percent_lower),
        ("percent in json", percent_in_json),
        ("double percent", double_percent),
        ("html", html),
        ("html numeric", html_numeric),
        ("script hex", script_hex),
    ]
}

/// `%2F` → `%2f`: percent-encoding with lower-case hex digits.
fn lower_hex_escapes(percent: &str) -> String {
    let mut out = String::new();
    let mut chars = percent.chars();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '%' {
            out.extend(chars.by_ref().take(2).map(|digit| digit.to_ascii_lowercase()));
        }
    }
    out
}

/// Every string in a JSON document, decoded, and its percent-decoding.
fn decoded_strings(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::String(text) => {
            out.push(text.clone());
            out.push(percent_decode_str(text).decode_utf8_lossy().into_owned());
        }
        serde_json::Value::Array(items) => items.iter().for_each(|item| decoded_strings(item, out)),
        serde_json::Value::Object(fields) => fields.values().for_each(|item| decoded_strings(item, out)),
        _ => {}
    }
}

#[tokio::test]
async fn keys_that_encoders_escape_are_scrubbed_in_every_spelling_stored_or_passed() {
    for key in AWKWARD_KEYS {
        let mock = MockUpstream::start().await;
        let secrets = Secrets::key_only(ApiKey::new(key).expect("a visible-ASCII key"));
        let gateway = TestGateway::start_with_secrets(test_config(&mock.base_url()), secrets).await;
        let echoes = echoes_of(key);
        let note = echoes
            .iter()
            .map(|(name, echo)| format!("\"{name}\":\"{echo}\""))
            .collect::<Vec<_>>()
            .join(",");
        mock.set(
            "live",
            Reply::ok(format!(r#"{{"id":"live","status":"PROCESSING",{note}}}"#)),
        );
        mock.set(
            "done",
            Reply::ok(format!(r#"{{"id":"done","status":"COMPLETED",{note}}}"#)),
        );
        mock.set(
            "gone",
            Reply::status(StatusCode::NOT_FOUND, format!(r#"{{"error":{{{note}}}}}"#)),
        );
        for (name, echo) in &echoes {
            let id = format!("limited-{}", name.replace(' ', "-"));
            let header_safe = echo.bytes().all(|byte| byte.is_ascii_graphic() || byte == b' ');
            if header_safe {
                mock.set(
                    &id,
                    Reply::status(StatusCode::TOO_MANY_REQUESTS, "{}").with_header("retry-after", echo),
                );
            }
        }
        let mut ids = vec!["live", "done", "done", "gone"];
        let limited: Vec<String> = echoes
            .iter()
            .map(|(name, _)| format!("limited-{}", name.replace(' ', "-")))
            .collect();
        ids.extend(limited.iter().map(String::as_str));
        for id in ids {
            let response = gateway.get_run(id).await;
            let everything = response.everything();
            for (name, echo) in &echoes {
                assert!(
                    !everything.contains(echo.as_str()),
                    "key {key:?}: {id} ({:?}) shows its {name} spelling {echo:?}: {everything}",
                    response.x_cache()
                );
            }
            if let Ok(json) = serde_json::from_slice::<serde_json::Value>(&response.body) {
                let mut strings = Vec::new();
                decoded_strings(&json, &mut strings);
                assert!(
                    strings.iter().all(|text| !text.contains(key)),
                    "key {key:?}: {id} decodes to the key: {strings:?}"
                );
            }
        }
        // The terminal run was stored scrubbed, still JSON, and is served from memory.
        let hit = gateway.get_run("done").await;
        assert_eq!(hit.x_cache(), Some("HIT"));
        assert_eq!(hit.json()["json"], "[redacted]", "key {key:?}");
        assert_eq!(mock.count_for("done"), 1);
    }
}

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
        webhook_secrets: None,
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

#[tokio::test]
async fn a_refused_token_with_a_body_still_closes_the_connection() {
    let mock = MockUpstream::start().await;
    let gateway = gateway_with_tokens(&mock, |_| {}).await;
    let path = runs_path("run_1");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: g\r\nContent-Length: 40\r\n\r\nGET {path} HTTP/1.1\r\nHost: g\r\n\r\n"
    );
    let response = raw_exchange(gateway.public, request.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 401"), "{response}");
    assert!(
        response.to_ascii_lowercase().contains("connection: close"),
        "{response}"
    );
    assert_eq!(
        response.matches("HTTP/1.1 ").count(),
        1,
        "the body was not read as a request"
    );
    assert_eq!(mock.request_count(), 0);
}

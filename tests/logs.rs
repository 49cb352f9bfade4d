//! What the real binary logs: where its config and upstream are, why an upstream could not be
//! reached, bounded request lines, and colour only on a terminal that wants it.

mod support;

use std::io::Read;
use std::process::{Command, Stdio};

use http::{Method, StatusCode};
use support::{
    GatewayProcess, MockUpstream, PATIENCE, TEST_KEY, TestClient, eventually, process_config, refused_addr,
    runs_path, write_config,
};

/// The JSON log lines of `gateway` that carry `message`.
fn lines_saying(gateway: &GatewayProcess, message: &str) -> Vec<serde_json::Value> {
    gateway
        .logs()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| {
            line["message"]
                .as_str()
                .is_some_and(|text| text.starts_with(message))
        })
        .collect()
}

/// Waits until `gateway` has logged a line starting with `message`, and returns it.
async fn logged(gateway: &GatewayProcess, message: &str) -> serde_json::Value {
    eventually(&format!("the gateway logs {message:?}"), || async {
        !lines_saying(gateway, message).is_empty()
    })
    .await;
    lines_saying(gateway, message).remove(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn start_up_names_the_config_file_and_the_upstream() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), &process_config(&mock.base_url(), ""));
    let gateway = GatewayProcess::start(&["--config", &config], &[("GW_TEST_KEY", TEST_KEY)]);
    let line = logged(&gateway, "configuration loaded").await;
    let canonical = std::fs::canonicalize(&config).expect("config path");
    assert_eq!(line["config"], canonical.to_str().expect("utf-8 path"));
    assert_eq!(line["upstream"], mock.base_url());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_upstream_is_logged_by_its_origin_alone() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    // A path prefix is allowed (an egress proxy's); whatever is in it is not logged.
    let base_url = format!("{}/prefix-sk-live-0123", mock.base_url());
    let config = write_config(dir.path(), &process_config(&base_url, ""));
    let gateway = GatewayProcess::start(&["--config", &config], &[("GW_TEST_KEY", TEST_KEY)]);
    let line = logged(&gateway, "configuration loaded").await;
    assert_eq!(line["upstream"], mock.base_url());
    TestClient::new()
        .send(
            Method::GET,
            &format!("http://{}{}", gateway.public, runs_path("run_1")),
            &[],
        )
        .await;
    assert!(!gateway.logs().contains("sk-live-0123"), "{}", gateway.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_refusing_the_key_is_logged_at_error_level() {
    let mock = MockUpstream::start().await;
    mock.set("run_1", support::Reply::status(StatusCode::UNAUTHORIZED, "{}"));
    mock.set("run_2", support::Reply::status(StatusCode::FORBIDDEN, "{}"));
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), &process_config(&mock.base_url(), ""));
    let gateway = GatewayProcess::start(&["--config", &config], &[("GW_TEST_KEY", TEST_KEY)]);
    for (id, status) in [("run_1", 401), ("run_2", 403)] {
        let response = gateway.get_run(id).await;
        assert_eq!(response.error_code(), "UPSTREAM_AUTH");
        eventually("the refusal is logged", || async {
            lines_saying(&gateway, "upstream refused the gateway's API key")
                .iter()
                .any(|line| line["upstream_status"] == status)
        })
        .await;
    }
    let lines = lines_saying(&gateway, "upstream refused the gateway's API key");
    assert_eq!(lines.len(), 2, "{lines:?}");
    for line in lines {
        assert_eq!(line["level"], "ERROR", "an operator must act: {line}");
        assert!(!line.to_string().contains(TEST_KEY));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_upstream_is_logged_with_its_origin_and_the_cause() {
    let refused = refused_addr().await;
    // A plain-HTTP server spoken to in TLS: the handshake fails.
    let plain = MockUpstream::start().await;
    for (base_url, cause) in [
        (format!("http://{refused}"), "refused"),
        (format!("https://{}", plain.addr), "tls"),
    ] {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = write_config(dir.path(), &process_config(&base_url, ""));
        let gateway = GatewayProcess::start(&["--config", &config], &[("GW_TEST_KEY", TEST_KEY)]);
        let response = gateway.get_run("run_1").await;
        assert_eq!(response.status, StatusCode::BAD_GATEWAY, "{base_url}");
        let line = logged(&gateway, "upstream request failed").await;
        assert_eq!(line["upstream"], base_url.as_str(), "{line}");
        assert_eq!(line["cause"], cause, "{line}");
        assert!(
            line["error"].as_str().is_some_and(|error| !error.is_empty()),
            "{line}"
        );
        assert_eq!(
            line["run_id"], "run_1",
            "logged inside the request's span: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_huge_request_target_makes_a_short_log_line() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), &process_config(&mock.base_url(), ""));
    let gateway = GatewayProcess::start(&["--config", &config], &[("GW_TEST_KEY", TEST_KEY)]);
    let huge = format!("/{}", "a".repeat(20 * 1024));
    let response = TestClient::new()
        .send(Method::GET, &format!("http://{}{huge}", gateway.public), &[])
        .await;
    assert_eq!(response.status, StatusCode::URI_TOO_LONG);
    let line = logged(&gateway, "served").await;
    let path = line["url.path"].as_str().expect("a path field");
    assert!(path.len() < 512, "{} bytes of path logged", path.len());
    assert!(path.ends_with(&format!("({} bytes)", huge.len())), "{path}");
    let longest = gateway.logs().lines().map(str::len).max().unwrap_or_default();
    assert!(longest < 2048, "a {longest}-byte log line");
}

/// Runs the binary in text format with stdout on `stdout`, until it logs "gateway ready"; returns
/// what it wrote.
fn text_output_until_ready(
    stdout: Stdio,
    read_from: impl Read + Send + 'static,
    no_color: Option<&str>,
) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), &process_config("http://127.0.0.1:9", ""));
    let mut command = Command::new(env!("CARGO_BIN_EXE_plextera-gateway"));
    command
        .args(["--config", &config])
        .env("GW_TEST_KEY", TEST_KEY)
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::null());
    if let Some(value) = no_color {
        command.env("NO_COLOR", value);
    }
    let mut child = command.spawn().expect("start the gateway binary");
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = read_from;
        let mut output = Vec::new();
        let mut buffer = [0u8; 4096];
        while let Ok(read) = reader.read(&mut buffer) {
            if read == 0 {
                break;
            }
            output.extend_from_slice(&buffer[..read]);
            if String::from_utf8_lossy(&output).contains("gateway ready") {
                break;
            }
        }
        let _ = lines.send(String::from_utf8_lossy(&output).into_owned());
    });
    let output = received.recv_timeout(PATIENCE).expect("the gateway became ready");
    let _ = child.kill();
    let _ = child.wait();
    output
}

/// Output on a pseudo-terminal, as an operator running it by hand sees it.
fn on_a_terminal(no_color: Option<&str>) -> String {
    let pty = nix::pty::openpty(None, None).expect("a pseudo-terminal");
    text_output_until_ready(Stdio::from(pty.slave), std::fs::File::from(pty.master), no_color)
}

#[test]
fn text_logs_are_coloured_only_on_a_terminal_without_no_color() {
    const ESCAPE: char = '\u{1b}';
    let (reader, writer) = std::io::pipe().expect("a pipe");
    let piped = text_output_until_ready(Stdio::from(writer), reader, None);
    assert!(piped.contains("gateway ready"), "{piped}");
    assert!(!piped.contains(ESCAPE), "colour codes in a pipe: {piped:?}");

    let terminal = on_a_terminal(None);
    assert!(terminal.contains(ESCAPE), "no colour on a terminal: {terminal:?}");
    for no_color in ["1", "true"] {
        let terminal = on_a_terminal(Some(no_color));
        assert!(terminal.contains("gateway ready"), "{terminal}");
        assert!(!terminal.contains(ESCAPE), "NO_COLOR={no_color}: {terminal:?}");
    }
}

/// An HTTPS upstream speaking HTTP/2 that answers the first request on each connection with a
/// GOAWAY whose debug data echoes the credentials, as a confused upstream might. Returns its
/// address and its certificate (PEM).
async fn goaway_echoing_upstream(echo: String) -> (std::net::SocketAddr, String) {
    let (acceptor, certificate_pem) = support::tls::localhost_acceptor(&[b"h2"]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let echo = echo.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                // Read until the client's first HEADERS frame (type 1) has arrived, so the GOAWAY
                // answers a request that was sent.
                let mut seen = Vec::new();
                let mut chunk = vec![0u8; 4096];
                while !has_headers_frame(&seen) {
                    match tls.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(read) => seen.extend_from_slice(&chunk[..read]),
                    }
                }
                let debug = format!("bad credentials: {echo}");
                let mut frames = vec![0, 0, 0, 4, 0, 0, 0, 0, 0]; // SETTINGS, empty
                let length = 8 + debug.len();
                frames.extend_from_slice(&[(length >> 16) as u8, (length >> 8) as u8, length as u8]);
                frames.extend_from_slice(&[7, 0, 0, 0, 0, 0]); // GOAWAY on stream 0
                frames.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1]); // last stream 0, PROTOCOL_ERROR
                frames.extend_from_slice(debug.as_bytes());
                let _ = tls.write_all(&frames).await;
                let _ = tls.flush().await;
                let _ = tls.read(&mut chunk).await;
            });
        }
    });
    (addr, certificate_pem)
}

/// Whether `received` (a client's bytes: the HTTP/2 preface, then frames) holds a HEADERS frame.
fn has_headers_frame(received: &[u8]) -> bool {
    let mut frames = received.get(24..).unwrap_or_default();
    while frames.len() >= 9 {
        if frames[3] == 1 {
            return true;
        }
        let length = usize::from(frames[0]) << 16 | usize::from(frames[1]) << 8 | usize::from(frames[2]);
        frames = frames.get(9 + length..).unwrap_or_default();
    }
    false
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_that_echoes_the_key_in_a_goaway_gets_it_redacted_from_every_log_line() {
    let (addr, ca_pem) = goaway_echoing_upstream(format!("api-key {TEST_KEY}")).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).expect("write CA");
    let config = write_config(
        dir.path(),
        &process_config(
            &format!("https://localhost:{}", addr.port()),
            &format!("ca_file = \"{}\"", ca_file.display()),
        ),
    );
    // At trace level h2 logs every frame it receives, the GOAWAY and its debug data included
    // (h2 is held to errors unless RUST_LOG names it).
    let mut gateway = GatewayProcess::start(
        &["--config", &config],
        &[("GW_TEST_KEY", TEST_KEY), ("RUST_LOG", "trace,h2=trace")],
    );
    let response = gateway.get_run("run_1").await;
    assert_eq!(response.status, StatusCode::BAD_GATEWAY);
    let line = logged(&gateway, "upstream request failed").await;
    assert!(
        line["error"]
            .as_str()
            .is_some_and(|error| error.contains("[redacted]")),
        "the GOAWAY's echo is in the log line, redacted: {line}"
    );
    assert_eq!(gateway.terminate().code(), Some(0));
    let logs = gateway.logs();
    assert!(logs.contains("GoAway"), "h2's own trace lines were logged too");
    assert!(!logs.contains(TEST_KEY), "the key is in the logs");
    assert!(!logs.contains(&TEST_KEY[8..]), "part of the key is in the logs");
}

/// Every JSON line `gateway` printed.
fn json_lines(gateway: &GatewayProcess) -> Vec<serde_json::Value> {
    gateway
        .logs()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .collect()
}

/// The access lines `gateway` printed.
fn access_lines(gateway: &GatewayProcess) -> Vec<serde_json::Value> {
    json_lines(gateway)
        .into_iter()
        .filter(|line| line["target"] == "plextera_gateway::access")
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn json_lines_are_flat_and_a_requests_lines_all_carry_its_trace() {
    // An upstream that refuses connections: the request logs a warning, then its access line.
    let refused = refused_addr().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), &process_config(&format!("http://{refused}"), ""));
    let gateway = GatewayProcess::start(&["--config", &config], &[("GW_TEST_KEY", TEST_KEY)]);
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let long_agent = format!("agent/{}", "x".repeat(2000));
    let response = TestClient::new()
        .send(
            Method::GET,
            &format!("http://{}{}", gateway.public, runs_path("run_1")),
            &[
                ("traceparent", &format!("00-{trace_id}-b7ad6b7169203331-01")),
                ("x-request-id", "req-flat"),
                ("user-agent", &long_agent),
            ],
        )
        .await;
    assert_eq!(response.status, StatusCode::BAD_GATEWAY);
    let access = logged(&gateway, "served").await;

    for text in gateway.logs().lines().filter(|text| text.starts_with('{')) {
        let line: serde_json::Value = serde_json::from_str(text).expect("a JSON line");
        for nested in ["fields", "span", "spans"] {
            assert!(line.get(nested).is_none(), "a nested {nested:?}: {line}");
        }
        assert!(
            line.as_object()
                .expect("object")
                .values()
                .all(|value| !value.is_object()),
            "{line}"
        );
        // In this order, first.
        let at = |key: &str| text.find(&format!("\"{key}\":")).expect(key);
        assert_eq!(at("timestamp"), 1, "{text}");
        assert!(
            at("timestamp") < at("level") && at("level") < at("target") && at("target") < at("message"),
            "{text}"
        );
    }
    let request_lines: Vec<serde_json::Value> = json_lines(&gateway)
        .into_iter()
        .filter(|line| line["request_id"] == "req-flat")
        .collect();
    assert!(
        request_lines.len() >= 2,
        "the warning and the access line: {request_lines:?}"
    );
    for line in &request_lines {
        assert_eq!(line["trace_id"], trace_id, "{line}");
        assert_eq!(line["span_id"], access["span_id"], "{line}");
    }
    assert!(
        request_lines
            .iter()
            .any(|line| line["message"] == "upstream request failed: could not connect"),
        "{request_lines:?}"
    );

    assert_eq!(access["http.request.method"], "GET");
    assert_eq!(access["url.path"], runs_path("run_1"));
    assert_eq!(access["http.response.status_code"], 502);
    assert_eq!(access["error.type"], "UPSTREAM_UNAVAILABLE");
    assert_eq!(access["plextera.cache"], "error");
    assert_eq!(access["client.address"], "127.0.0.1");
    assert!(
        access["client.port"].as_u64().is_some_and(|port| port > 0),
        "{access}"
    );
    assert_eq!(access["network.protocol.version"], "1.1");
    assert!(
        access["http.response.body.size"]
            .as_u64()
            .is_some_and(|size| size > 0),
        "{access}"
    );
    let seconds = access["http.server.request.duration"].as_f64().expect("seconds");
    assert!((0.0..30.0).contains(&seconds), "{access}");
    let agent = access["user_agent.original"].as_str().expect("a user agent");
    assert!(agent.len() < 300, "{} bytes of user agent logged", agent.len());
    assert!(
        agent.starts_with("agent/xxx") && agent.ends_with(&format!("({} bytes)", long_agent.len())),
        "{agent}"
    );
    for gone in ["duration_us", "upstream_ms", "status", "method", "path", "cache"] {
        assert!(
            access.get(gone).is_none(),
            "the old field {gone:?} is still there: {access}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_or_slow_logs_only_errors_and_slow_requests() {
    let mock = MockUpstream::start().await;
    mock.set("fast", support::Reply::run("fast", "QUEUED"));
    mock.set(
        "failing",
        support::Reply::status(StatusCode::SERVICE_UNAVAILABLE, "{}"),
    );
    let gate = support::Gate::new();
    mock.set("slow", support::Reply::run("slow", "QUEUED").gated(&gate));
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(
        dir.path(),
        &process_config(
            &mock.base_url(),
            "[telemetry]\naccess_log = \"errors_or_slow\"\nslow_request_threshold = \"300ms\"\n",
        ),
    );
    let gateway = GatewayProcess::start(&["--config", &config], &[("GW_TEST_KEY", TEST_KEY)]);
    let send = |id: &str, request_id: &str| {
        let url = format!("http://{}{}", gateway.public, runs_path(id));
        let request_id = request_id.to_owned();
        async move {
            TestClient::new()
                .send(Method::GET, &url, &[("x-request-id", request_id.as_str())])
                .await
        }
    };
    assert_eq!(send("fast", "fast").await.status, StatusCode::OK);
    assert_eq!(
        send("failing", "failing").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(send("bad%20id", "invalid").await.status, StatusCode::BAD_REQUEST);
    // The slow request: upstream answers only once the threshold has passed.
    let slow = tokio::spawn(send("slow", "slow"));
    mock.wait_for_requests(3).await;
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    gate.open();
    assert_eq!(slow.await.expect("the slow request").status, StatusCode::OK);
    // Sent last: once its line is there, every earlier request's line would be too.
    assert_eq!(send("bad%20id", "last").await.status, StatusCode::BAD_REQUEST);
    eventually("the last request is logged", || async {
        access_lines(&gateway)
            .iter()
            .any(|line| line["request_id"] == "last")
    })
    .await;
    let logged: Vec<String> = access_lines(&gateway)
        .iter()
        .map(|line| line["request_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        logged,
        ["failing", "invalid", "slow", "last"],
        "the fast 200 is not logged"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn access_log_off_writes_no_access_line() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(
        dir.path(),
        &process_config(&mock.base_url(), "[telemetry]\naccess_log = \"off\"\n"),
    );
    let mut gateway = GatewayProcess::start(&["--config", &config], &[("GW_TEST_KEY", TEST_KEY)]);
    let response = gateway.get_run("bad%20id").await;
    assert_eq!(response.status, StatusCode::BAD_REQUEST);
    assert_eq!(gateway.terminate().code(), Some(0));
    assert!(access_lines(&gateway).is_empty(), "{}", gateway.logs());
}

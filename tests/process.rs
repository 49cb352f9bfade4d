//! The real binary: start-up refusals, demo mode, SIGTERM, and logs that never hold the key.

mod support;

use http::{Method, StatusCode};
use support::{
    GatewayProcess, MockUpstream, Reply, TEST_KEY, TestClient, process_config, run_to_exit, runs_path,
    write_config,
};

async fn get(addr: std::net::SocketAddr, path: &str) -> support::TestResponse {
    TestClient::new()
        .send(Method::GET, &format!("http://{addr}{path}"), &[])
        .await
}

#[test]
fn a_missing_key_stops_start_up_naming_where_it_was_looked_for() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), &process_config("http://127.0.0.1:9", ""));
    let (status, _, stderr) = run_to_exit(&["--config", &config], &[]);
    assert_eq!(status.code(), Some(78));
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("upstream.api_key_env"), "{stderr}");
    // The configured name is not repeated: a key pasted there would be printed.
    assert!(!stderr.contains("GW_TEST_KEY"), "{stderr}");
    // With nothing configured, the default variable is named.
    let config = write_config(dir.path(), "[upstream]\nbase_url = \"http://127.0.0.1:9\"\n");
    let (status, _, stderr) = run_to_exit(&["--config", &config], &[]);
    assert_eq!(status.code(), Some(78));
    assert!(stderr.contains("PLEXTERA_API_KEY"), "{stderr}");
}

#[test]
fn a_key_pasted_into_the_config_is_never_printed_at_start_up() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pasted = "sk-live-Q2h/0c+Kz9==";
    for line in [
        format!("api_key_env = \"{pasted}\""),
        format!("api_key = \"{pasted}\""),
        format!("api_key_file = \"{pasted}\""),
        format!("base_url = \"https://user:{pasted}@api.plextera.com\""),
        format!("base_url = \"https://api.plextera.com/?key={pasted}\""),
        format!("base_url = \"{pasted}\""),
    ] {
        let config = write_config(dir.path(), &format!("[upstream]\n{line}\n"));
        // A usable key in the default variable: only the line under test can stop start-up.
        let (status, stdout, stderr) = run_to_exit(&["--config", &config], &[("PLEXTERA_API_KEY", TEST_KEY)]);
        assert_eq!(status.code(), Some(78), "{line}");
        assert_eq!(stderr.lines().count(), 1, "{line}: {stderr}");
        assert!(
            !stderr.contains(pasted) && !stdout.contains(pasted),
            "{line}: {stderr}"
        );
    }
}

#[test]
fn config_problems_stop_start_up_with_one_line_each() {
    let dir = tempfile::tempdir().expect("temp dir");
    let cases = [
        ("[server]\nlisten = \"127.0.0.1:0\"\nlisen = \"typo\"\n", "lisen"),
        (
            "[cache]\nttl = \"forever\"\n",
            "line 2: cache.ttl: \"forever\" is not a duration",
        ),
        ("[cache]\nmax_size = \"huge\"\n", "e.g. max_size = \"256MiB\""),
        (
            "[server]\nlisten = \"localhost:8080\"\n",
            "e.g. listen = \"0.0.0.0:8080\"",
        ),
        ("[upstream]\nbase_url = \"api.plextera.com\"\n", "base_url"),
        ("not toml at all", "line 1"),
    ];
    for (text, expected) in cases {
        let config = write_config(dir.path(), text);
        let (status, _, stderr) = run_to_exit(&["--config", &config], &[("PLEXTERA_API_KEY", TEST_KEY)]);
        assert_eq!(status.code(), Some(78), "{text:?}");
        assert_eq!(stderr.lines().count(), 1, "{text:?}: {stderr}");
        assert!(stderr.contains(expected), "{text:?}: {stderr}");
        assert!(!stderr.contains(TEST_KEY));
    }
    let (status, _, stderr) = run_to_exit(&["--config", "/nonexistent/gateway.toml"], &[]);
    assert_eq!(status.code(), Some(78));
    assert!(stderr.contains("/nonexistent/gateway.toml"), "{stderr}");
}

#[test]
fn an_unreadable_key_file_stops_start_up() {
    let dir = tempfile::tempdir().expect("temp dir");
    let text = "[upstream]\napi_key_file = \"/nonexistent/key\"\n";
    let config = write_config(dir.path(), text);
    let (status, _, stderr) = run_to_exit(&["--config", &config], &[]);
    assert_eq!(status.code(), Some(78));
    assert!(stderr.contains("upstream.api_key_file"), "{stderr}");
    assert!(stderr.contains("No such file"), "{stderr}");
}

#[test]
fn a_port_in_use_stops_start_up_with_the_status_for_a_transient_failure() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let dir = tempfile::tempdir().expect("temp dir");
    let text = format!("[server]\nlisten = \"{addr}\"\nadmin_listen = \"127.0.0.1:0\"\n");
    let config = write_config(dir.path(), &text);
    let (status, _, stderr) = run_to_exit(&["--config", &config], &[("PLEXTERA_API_KEY", TEST_KEY)]);
    // EX_TEMPFAIL, not the config's 78: systemd's RestartPreventExitStatus=78 still restarts.
    assert_eq!(status.code(), Some(75), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(&addr.to_string()), "{stderr}");
    assert!(stderr.contains("server.listen"), "names the key: {stderr}");
    assert!(stderr.contains("e.g. listen = "), "and a valid example: {stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_mode_shows_miss_hit_and_pass_with_no_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(
        dir.path(),
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n",
    );
    let mut gateway = GatewayProcess::start(&["--demo", "--config", &config], &[]);
    let first = get(gateway.public, &runs_path("done-1")).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.x_cache(), Some("MISS"));
    assert_eq!(first.json()["status"], "COMPLETED");
    let second = get(gateway.public, &runs_path("done-1")).await;
    assert_eq!(second.x_cache(), Some("HIT"));
    assert_eq!(second.body, first.body);
    let running = get(gateway.public, &runs_path("run-42")).await;
    assert_eq!(running.x_cache(), Some("PASS"));
    assert_eq!(running.json()["status"], "QUEUED");
    let missing = get(gateway.public, &runs_path("missing-1")).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(gateway.terminate().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_mode_survives_a_sighup() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(
        dir.path(),
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n",
    );
    let mut gateway = GatewayProcess::start(&["--demo", "--config", &config], &[]);
    gateway.send_signal("HUP");
    support::eventually("the SIGHUP is logged", || async {
        gateway.logs().contains("SIGHUP: demo mode")
    })
    .await;
    assert_eq!(
        get(gateway.public, &runs_path("done-1")).await.status,
        StatusCode::OK
    );
    assert_eq!(gateway.terminate().code(), Some(0), "{}", gateway.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_process_opts_out_of_transparent_huge_pages() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), &process_config(&mock.base_url(), ""));
    let gateway = GatewayProcess::start(&["--config", &config], &[("GW_TEST_KEY", TEST_KEY)]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", gateway.pid())).expect("status");
    let thp = status.lines().find_map(|line| line.strip_prefix("THP_enabled:"));
    assert_eq!(thp.map(str::trim), Some("0"), "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let mock = MockUpstream::start().await;
    let gate = support::Gate::new();
    mock.set("slow", Reply::run("slow", "COMPLETED").gated(&gate));
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), &process_config(&mock.base_url(), ""));
    let mut gateway = GatewayProcess::start(&["--config", &config], &[("GW_TEST_KEY", TEST_KEY)]);

    let url = format!("http://{}{}", gateway.public, runs_path("slow"));
    let in_flight = tokio::spawn(async move { TestClient::new().send(Method::GET, &url, &[]).await });
    mock.wait_for_requests(1).await;
    gateway.send_sigterm();
    let readyz = format!("http://{}/readyz", gateway.admin);
    support::eventually("/readyz says 503 once draining starts", || {
        let readyz = readyz.clone();
        async move {
            TestClient::new().send(Method::GET, &readyz, &[]).await.status == StatusCode::SERVICE_UNAVAILABLE
        }
    })
    .await;
    // The gateway is now draining: the request it holds completes once upstream answers.
    gate.open();
    let response = in_flight.await.expect("client task");
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.x_cache(), Some("MISS"));
    assert_eq!(gateway.wait().code(), Some(0));
    assert!(gateway.logs().contains("drained"), "{}", gateway.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_key_appears_in_no_log_line_even_at_trace_level() {
    let mock = MockUpstream::start().await;
    mock.set("done", Reply::run("done", "COMPLETED"));
    mock.set("live", Reply::run("live", "PROCESSING"));
    mock.set(
        "auth",
        Reply::status(StatusCode::UNAUTHORIZED, r#"{"error":{"code":"UNAUTHORIZED"}}"#),
    );
    mock.set("boom", Reply::status(StatusCode::INTERNAL_SERVER_ERROR, "{}"));
    mock.set("abort", Reply::Abort);
    mock.set(
        "echo",
        Reply::status(StatusCode::NOT_FOUND, format!("no such key: api-key {TEST_KEY}")),
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), &process_config(&mock.base_url(), ""));
    let mut gateway = GatewayProcess::start(
        &["--config", &config],
        &[("GW_TEST_KEY", TEST_KEY), ("RUST_LOG", "trace,h2=trace")],
    );
    let client = TestClient::new();
    for id in [
        "done", "done", "live", "auth", "boom", "abort", "missing", "bad%2Fid",
    ] {
        let response = client
            .send(
                Method::GET,
                &format!("http://{}{}", gateway.public, runs_path(id)),
                &[],
            )
            .await;
        assert!(
            !response.everything().contains(TEST_KEY),
            "{id} response leaked the key"
        );
    }
    assert_eq!(gateway.terminate().code(), Some(0));
    let logs = gateway.logs();
    assert!(
        logs.contains("upstream refused the gateway's API key"),
        "auth failure is logged loudly"
    );
    assert!(
        logs.contains("\"plextera.cache\":\"hit\""),
        "access log has the outcome: {logs}"
    );
    assert!(logs.lines().count() > 20, "trace logging was on");
    assert!(!logs.contains(TEST_KEY), "the key leaked into the logs");
    assert!(
        !logs.contains(&TEST_KEY[8..]),
        "part of the key leaked into the logs"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn each_request_logs_one_line_with_its_span_fields() {
    let mock = MockUpstream::start().await;
    mock.set("done", Reply::run("done", "COMPLETED"));
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), &process_config(&mock.base_url(), ""));
    let mut gateway = GatewayProcess::start(&["--config", &config], &[("GW_TEST_KEY", TEST_KEY)]);
    let client = TestClient::new();
    let url = format!("http://{}{}", gateway.public, runs_path("done"));
    for request_id in ["first-call", "second-call"] {
        client
            .send(Method::GET, &url, &[("x-request-id", request_id)])
            .await;
    }
    assert_eq!(gateway.terminate().code(), Some(0));

    let access: Vec<serde_json::Value> = gateway
        .logs()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["target"] == "plextera_gateway::access")
        .collect();
    assert_eq!(access.len(), 2, "one line per request");
    let (miss, hit) = (&access[0], &access[1]);
    for (line, request_id, cache) in [(miss, "first-call", "miss"), (hit, "second-call", "hit")] {
        assert_eq!(line["request_id"], request_id);
        assert_eq!(line["run_id"], "done");
        assert_eq!(line["http.request.method"], "GET");
        assert_eq!(line["url.path"], runs_path("done"));
        assert_eq!(line["plextera.cache"], cache);
        assert_eq!(line["http.response.status_code"], 200);
        assert!(line["http.server.request.duration"].is_f64(), "{line}");
    }
    assert!(
        miss["plextera.upstream.duration"]
            .as_f64()
            .is_some_and(|seconds| seconds >= 0.0),
        "{miss}"
    );
    assert!(
        hit.get("plextera.upstream.duration").is_none(),
        "a hit has no upstream latency: {hit}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn health_check_reports_a_running_gateway_and_fails_without_one() {
    let mock = MockUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut gateway = GatewayProcess::start(
        &[
            "--config",
            &write_config(dir.path(), &process_config(&mock.base_url(), "")),
        ],
        &[("GW_TEST_KEY", TEST_KEY)],
    );
    // The check reads admin_listen from a config: point one at the running gateway's admin port.
    let probe_dir = tempfile::tempdir().expect("temp dir");
    let probe = write_config(
        probe_dir.path(),
        &format!("[server]\nadmin_listen = \"{}\"\n", gateway.admin),
    );
    let (status, _, stderr) = run_to_exit(&["--config", &probe, "--health-check"], &[]);
    assert_eq!(status.code(), Some(0), "{stderr}");

    assert_eq!(gateway.terminate().code(), Some(0));
    let (status, _, stderr) = run_to_exit(&["--config", &probe, "--health-check"], &[]);
    assert_eq!(status.code(), Some(1));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("unhealthy"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_rotates_a_key_file_without_dropping_requests() {
    let mock = MockUpstream::start().await;
    mock.set("live", Reply::run("live", "PROCESSING"));
    let dir = tempfile::tempdir().expect("temp dir");
    let key_file = dir.path().join("api-key");
    std::fs::write(&key_file, "first-key-aaaa\n").expect("write key");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nbase_url = \"{}\"\napi_key_file = \"{}\"\n",
        mock.base_url(),
        key_file.display()
    );
    let mut gateway = GatewayProcess::start(&["--config", &write_config(dir.path(), &text)], &[]);
    let url = format!("http://{}{}", gateway.public, runs_path("live"));
    let client = TestClient::new();
    let last_key = || {
        mock.requests().last().map(|request| {
            request.headers["authorization"]
                .to_str()
                .expect("ascii")
                .to_owned()
        })
    };
    assert_eq!(client.send(Method::GET, &url, &[]).await.status, StatusCode::OK);
    assert_eq!(last_key().as_deref(), Some("api-key first-key-aaaa"));

    std::fs::write(&key_file, "second-key-bbbb\n").expect("rotate key");
    gateway.send_signal("HUP");
    // Every poll succeeds while the new key takes over.
    support::eventually("the rotated key is sent", || async {
        assert_eq!(client.send(Method::GET, &url, &[]).await.status, StatusCode::OK);
        last_key().as_deref() == Some("api-key second-key-bbbb")
    })
    .await;
    // An upstream that still echoes the previous key (requests in flight during a rotation carry
    // it) gets it scrubbed, as it does the current one.
    mock.set(
        "echo",
        Reply::ok(r#"{"id":"echo","status":"PROCESSING","seen":["first-key-aaaa","second-key-bbbb"]}"#),
    );
    let echoed = client
        .send(
            Method::GET,
            &format!("http://{}{}", gateway.public, runs_path("echo")),
            &[],
        )
        .await;
    let body = String::from_utf8_lossy(&echoed.body).into_owned();
    assert!(
        !body.contains("first-key-aaaa") && !body.contains("second-key-bbbb"),
        "{body}"
    );
    assert_eq!(body.matches("[redacted]").count(), 2, "{body}");

    // A key file that cannot be used keeps the current key.
    std::fs::write(&key_file, "").expect("empty the key file");
    gateway.send_signal("HUP");
    support::eventually("the failed reload is logged", || async {
        gateway.logs().contains("secret file not used")
    })
    .await;
    assert_eq!(client.send(Method::GET, &url, &[]).await.status, StatusCode::OK);
    assert_eq!(last_key().as_deref(), Some("api-key second-key-bbbb"));

    assert_eq!(gateway.terminate().code(), Some(0));
    let logs = gateway.logs();
    assert!(logs.contains("secret reloaded"), "{logs}");
    assert!(
        !logs.contains("first-key-aaaa") && !logs.contains("second-key-bbbb"),
        "keys never logged"
    );
}

//! An `https` upstream: certificates are verified, HTTP/2 is negotiated by ALPN, the key still
//! travels only upstream.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode, Version};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{Gate, TEST_KEY, TestGateway, run_body, runs_path, test_config};
use tokio::net::TcpListener;

/// What the TLS mock saw of each request: protocol version and `Authorization`.
type Seen = Arc<Mutex<Vec<(Version, String)>>>;

/// A TLS server for `localhost` with a fresh self-signed certificate; returns its address, the
/// certificate as PEM, and the requests it sees.
async fn tls_upstream() -> (SocketAddr, String, Seen) {
    tls_upstream_with(false, None).await
}

/// As [`tls_upstream`]; with `goaway`, every connection sends GOAWAY after its first answer; with
/// `gate`, every answer waits for the gate to open.
async fn tls_upstream_with(goaway: bool, gate: Option<Gate>) -> (SocketAddr, String, Seen) {
    let (acceptor, certificate_pem) = support::tls::localhost_acceptor(&[b"h2", b"http/1.1"]);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen: Seen = Arc::default();
    let seen_by_server = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let seen = Arc::clone(&seen_by_server);
            let gate = gate.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let answered = Arc::new(tokio::sync::Notify::new());
                let on_answer = Arc::clone(&answered);
                let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    on_answer.notify_one();
                    let authorization = request
                        .headers()
                        .get("authorization")
                        .and_then(|value| value.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    seen.lock()
                        .expect("lock")
                        .push((request.version(), authorization));
                    let id = request
                        .uri()
                        .path()
                        .rsplit('/')
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    let gate = gate.clone();
                    async move {
                        if let Some(gate) = gate {
                            gate.passed().await;
                        }
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(run_body(
                            &id,
                            "COMPLETED",
                            0,
                        ))))
                    }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let connection = builder.serve_connection(TokioIo::new(stream), service);
                tokio::pin!(connection);
                if goaway {
                    tokio::select! {
                        _ = connection.as_mut() => return,
                        () = answered.notified() => connection.as_mut().graceful_shutdown(),
                    }
                }
                let _ = connection.await;
            });
        }
    });
    (addr, certificate_pem, seen)
}

/// A gateway whose upstream is the TLS server at `addr`, trusting `ca_pem` through `ca_file`
/// (the directory holding it lives as long as the second value).
async fn gateway_trusting(addr: SocketAddr, ca_pem: &str) -> (TestGateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).expect("write CA");
    let mut config = test_config(&format!("https://localhost:{}", addr.port()));
    config.upstream.ca_file = Some(ca_file);
    (TestGateway::start_with(config).await, dir)
}

#[tokio::test]
async fn a_trusted_https_upstream_is_reached_over_http2() {
    let (addr, ca_pem, seen) = tls_upstream().await;
    let (gateway, _ca_dir) = gateway_trusting(addr, &ca_pem).await;

    let first = gateway.get_run("run_tls").await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    assert_eq!(first.x_cache(), Some("MISS"));
    assert_eq!(first.body, run_body("run_tls", "COMPLETED", 0));
    assert_eq!(gateway.get_run("run_tls").await.x_cache(), Some("HIT"));

    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0, Version::HTTP_2, "ALPN negotiated HTTP/2");
    assert_eq!(seen[0].1, format!("api-key {TEST_KEY}"));
}

#[tokio::test]
async fn an_untrusted_certificate_is_refused() {
    let (addr, _ca_pem, seen) = tls_upstream().await;
    let gateway = TestGateway::start_with(test_config(&format!("https://localhost:{}", addr.port()))).await;
    let response = gateway.get_run("run_tls").await;
    assert_eq!(response.status, StatusCode::BAD_GATEWAY);
    assert_eq!(response.error_code(), "UPSTREAM_UNAVAILABLE");
    assert!(
        seen.lock().expect("lock").is_empty(),
        "no request was sent over an unverified connection"
    );
}

#[tokio::test]
async fn a_ca_file_without_certificates_is_a_config_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_file = dir.path().join("empty.pem");
    std::fs::write(&ca_file, "not a certificate\n").expect("write");
    let mut config = test_config("https://localhost:1");
    config.upstream.ca_file = Some(ca_file);
    let key = plextera_gateway::ApiKey::new(TEST_KEY).expect("key");
    let error = plextera_gateway::Gateway::bind(&config, &plextera_gateway::Secrets::key_only(key))
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(error.contains("ca_file"), "{error}");
}

#[tokio::test]
async fn an_http2_goaway_is_followed_by_a_fresh_connection() {
    let (addr, ca_pem, seen) = tls_upstream_with(true, None).await;
    let (gateway, _ca_dir) = gateway_trusting(addr, &ca_pem).await;

    // Each upstream connection answers once, then says GOAWAY: every call must still succeed.
    for index in 0..5 {
        let response = gateway.get_run(&format!("run_{index}")).await;
        assert_eq!(response.status, StatusCode::OK, "{:?}", response.body);
        assert_eq!(response.x_cache(), Some("MISS"));
    }
    assert_eq!(
        gateway.get_run("run_0").await.x_cache(),
        Some("HIT"),
        "hits still served"
    );
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 5);
    assert!(seen.iter().all(|(version, _)| *version == Version::HTTP_2));
}

/// The pool's connections by state, from a scrape.
async fn upstream_connections(gateway: &TestGateway) -> (f64, f64) {
    let scrape = gateway.scrape().await;
    let state = |state| scrape.expect("plextera_gateway_upstream_connections", &[("state", state)]);
    (state("idle"), state("busy"))
}

#[tokio::test]
async fn the_http2_connection_counts_as_one_busy_or_idle_connection() {
    let gate = Gate::new();
    let (addr, ca_pem, seen) = tls_upstream_with(false, Some(gate.clone())).await;
    let (gateway, _ca_dir) = gateway_trusting(addr, &ca_pem).await;
    let calls: Vec<_> = (0..3)
        .map(|index| {
            let url = gateway.url(&runs_path(&format!("run_{index}")));
            tokio::spawn(async move {
                support::TestClient::new()
                    .send(http::Method::GET, &url, &[])
                    .await
                    .status
            })
        })
        .collect();
    support::eventually("three calls reach upstream", || async {
        seen.lock().expect("lock").len() == 3
    })
    .await;
    assert_eq!(
        upstream_connections(&gateway).await,
        (0.0, 1.0),
        "three calls on one multiplexed connection"
    );
    gate.open();
    for call in calls {
        assert_eq!(call.await.expect("the request task"), StatusCode::OK);
    }
    support::eventually("the connection is idle", || async {
        upstream_connections(&gateway).await == (1.0, 0.0)
    })
    .await;
    let seen = seen.lock().expect("lock").clone();
    assert!(seen.iter().all(|(version, _)| *version == Version::HTTP_2));
}

//! `/metrics`: exact values after a known sequence of requests, bounded labels, valid exposition.
//! That it is served on the admin port only: `other_paths_are_404_and_never_forwarded` in
//! tests/input_validation.rs.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use support::{Gate, MockUpstream, Reply, TestGateway, eventually, refused_addr, run_body, runs_path};
use tokio::net::TcpStream;

const REQUESTS: &str = "plextera_gateway_requests_total";
const UPSTREAM: &str = "plextera_gateway_upstream_requests_total";
const RUN_STATUS: &str = "plextera_gateway_run_status_total";
const UPSTREAM_COUNT: &str = "plextera_gateway_upstream_request_duration_seconds_count";
const UPSTREAM_CONNECTIONS: &str = "plextera_gateway_upstream_connections";
const CLIENT_CONNECTIONS: &str = "plextera_gateway_client_connections";

#[tokio::test]
async fn counters_match_a_known_sequence_exactly() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    let done = run_body("done", "COMPLETED", 500);
    let failed = run_body("failed", "FAILED", 300);
    mock.set("done", Reply::ok(done.clone()));
    mock.set("failed", Reply::ok(failed.clone()));
    mock.set("live", Reply::run("live", "PROCESSING"));
    mock.set("abort", Reply::Abort);

    for _ in 0..3 {
        gateway.get_run("done").await; // miss, hit, hit
    }
    for _ in 0..2 {
        gateway.get_run("failed").await; // miss, hit
        gateway.get_run("live").await; // pass, pass
    }
    assert_eq!(gateway.get_run("gone").await.status, StatusCode::NOT_FOUND); // pass (404)
    assert_eq!(gateway.get_run("bad.id").await.status, StatusCode::BAD_REQUEST); // error, no upstream
    assert_eq!(gateway.get_run("abort").await.status, StatusCode::BAD_GATEWAY); // error, upstream reset

    let scrape = gateway.scrape().await;
    let expected_requests = [
        (("hit", "200"), 3.0),
        (("miss", "200"), 2.0),
        (("pass", "200"), 2.0),
        (("pass", "404"), 1.0),
        (("error", "400"), 1.0),
        (("error", "502"), 1.0),
    ];
    for ((cache, code), count) in expected_requests {
        assert_eq!(
            scrape.expect(REQUESTS, &[("cache", cache), ("code", code)]),
            count,
            "{cache} {code}"
        );
    }
    assert_eq!(
        scrape.series(REQUESTS).len(),
        expected_requests.len(),
        "no other series"
    );

    let histogram = "plextera_gateway_request_duration_seconds_count";
    for (cache, count) in [
        ("hit", 3.0),
        ("miss", 2.0),
        ("pass", 3.0),
        ("error", 2.0),
        ("coalesced", 0.0),
    ] {
        assert_eq!(scrape.expect(histogram, &[("cache", cache)]), count, "{cache}");
    }

    for ((outcome, code), count) in [
        (("2xx", "200"), 4.0),
        (("4xx", "404"), 1.0),
        (("reset", "none"), 1.0),
        (("timeout", "none"), 0.0),
        (("connect", "none"), 0.0),
        (("too_large", "none"), 0.0),
    ] {
        assert_eq!(
            scrape.expect(UPSTREAM, &[("outcome", outcome), ("code", code)]),
            count,
            "{outcome} {code}"
        );
    }
    // "abort" went out on a kept-alive connection that then closed without an answer: sent once
    // more on a fresh connection (which the mock closed too), and counted as a retry.
    assert_eq!(scrape.expect("plextera_gateway_upstream_retries_total", &[]), 1.0);
    assert_eq!(
        mock.request_count(),
        6 + 1,
        "upstream counters agree with the mock"
    );
    let upstream_histogram = "plextera_gateway_upstream_request_duration_seconds_count";
    assert_eq!(scrape.expect(upstream_histogram, &[("outcome", "2xx")]), 4.0);
    assert_eq!(scrape.expect(upstream_histogram, &[("outcome", "4xx")]), 1.0);
    assert_eq!(scrape.expect(upstream_histogram, &[("outcome", "reset")]), 1.0);

    for (status, count) in [
        ("COMPLETED", 3.0),
        ("FAILED", 2.0),
        ("PROCESSING", 2.0),
        ("QUEUED", 0.0),
        ("CLOSED", 0.0),
        ("other", 0.0),
    ] {
        assert_eq!(
            scrape.expect(RUN_STATUS, &[("status", status)]),
            count,
            "{status}"
        );
    }

    assert_eq!(scrape.expect("plextera_gateway_cache_entries", &[]), 2.0);
    let held = (done.len() + "done".len() + failed.len() + "failed".len()) as f64;
    assert_eq!(scrape.expect("plextera_gateway_cache_size_bytes", &[]), held);
    assert_eq!(
        scrape.expect("plextera_gateway_coalesced_requests_total", &[]),
        0.0
    );
    for cause in ["size", "expired", "explicit"] {
        assert_eq!(
            scrape.expect("plextera_gateway_cache_evictions_total", &[("cause", cause)]),
            0.0
        );
    }
    assert_eq!(
        scrape.expect(
            "plextera_gateway_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
}

#[tokio::test]
async fn types_follow_prometheus_conventions() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    mock.set("done", Reply::run("done", "COMPLETED"));
    gateway.get_run("done").await;
    let scrape = gateway.scrape().await;
    for (family, kind) in [
        ("plextera_gateway_requests_total", "counter"),
        ("plextera_gateway_request_duration_seconds", "histogram"),
        ("plextera_gateway_upstream_requests_total", "counter"),
        ("plextera_gateway_upstream_request_duration_seconds", "histogram"),
        ("plextera_gateway_run_status_total", "counter"),
        ("plextera_gateway_cache_entries", "gauge"),
        ("plextera_gateway_cache_size_bytes", "gauge"),
        ("plextera_gateway_cache_max_size_bytes", "gauge"),
        ("plextera_gateway_cache_evictions_total", "counter"),
        ("plextera_gateway_coalesced_requests_total", "counter"),
        ("plextera_gateway_build_info", "gauge"),
    ] {
        assert_eq!(
            scrape.types.get(family).map(String::as_str),
            Some(kind),
            "{family}"
        );
    }
    // Buckets resolve a tens-of-microseconds hit and a hundreds-of-milliseconds upstream call.
    let bounds: Vec<f64> = scrape
        .label_values("plextera_gateway_request_duration_seconds_bucket", "le")
        .iter()
        .filter_map(|le| le.parse().ok())
        .collect();
    for bound in [25e-6, 50e-6, 100e-6, 1e-3, 10e-3, 0.1, 1.0, 10.0] {
        assert!(
            bounds.iter().any(|le| (le - bound).abs() < 1e-12),
            "missing le={bound} in {bounds:?}"
        );
    }
    // The process collector's series, for memory and descriptor dashboards.
    assert!(
        scrape
            .value("process_resident_memory_bytes", &[])
            .is_some_and(|rss| rss > 0.0)
    );
    assert!(scrape.value("process_open_fds", &[]).is_some_and(|fds| fds > 0.0));
}

#[tokio::test]
async fn the_exposition_is_valid_text_format() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    mock.set("done", Reply::run("done", "COMPLETED"));
    mock.set("live", Reply::run("live", "QUEUED"));
    for id in ["done", "done", "live", "gone", "bad.id"] {
        gateway.get_run(id).await;
    }
    let response = gateway.admin_get("/metrics").await;
    let text = String::from_utf8(response.body.to_vec()).expect("utf-8");
    // An independent parser accepts it...
    let parsed =
        prometheus_parse::Scrape::parse(text.lines().map(|line| Ok(line.to_owned()))).expect("parses");
    assert!(parsed.samples.iter().any(|sample| sample.metric == REQUESTS));
    // ...and the strict one in tests/support checks names, labels, types and histogram structure.
    let scrape = gateway.scrape().await;
    assert!(scrape.samples.len() > 50);
}

#[tokio::test]
async fn unknown_statuses_do_not_grow_the_label_set() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    for index in 0..50 {
        let id = format!("odd_{index}");
        mock.set(&id, Reply::run(&id, &format!("INVENTED_STATUS_{index}")));
        let response = gateway.get_run(&id).await;
        assert_eq!(response.x_cache(), Some("PASS"));
    }
    let scrape = gateway.scrape().await;
    assert_eq!(
        scrape.label_values(RUN_STATUS, "status"),
        ["CLOSED", "COMPLETED", "FAILED", "PROCESSING", "QUEUED", "other"]
    );
    assert_eq!(scrape.expect(RUN_STATUS, &[("status", "other")]), 50.0);
    assert!(!scrape.text.contains("INVENTED_STATUS"));
}

#[tokio::test]
async fn evictions_are_counted_by_cause() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| {
        config.cache.max_size = bytesize::ByteSize::kib(4);
    })
    .await;
    for index in 0..20 {
        let id = format!("run_{index}");
        mock.set(&id, Reply::ok(run_body(&id, "COMPLETED", 1024)));
        gateway.get_run(&id).await;
    }
    let scrape = gateway.scrape().await;
    let entries = scrape.expect("plextera_gateway_cache_entries", &[]);
    let bytes = scrape.expect("plextera_gateway_cache_size_bytes", &[]);
    let evicted = scrape.expect("plextera_gateway_cache_evictions_total", &[("cause", "size")]);
    assert!(bytes <= 4096.0, "size gauge {bytes} within the bound");
    assert!((1.0..=4.0).contains(&entries), "{entries} entries");
    // Every stored run is either still held or was evicted for size (moka may also refuse to
    // admit a newcomer, which removes it at once with the same cause).
    assert_eq!(entries + evicted, 20.0, "entries {entries} + evicted {evicted}");
}

#[tokio::test]
async fn expired_entries_are_counted_and_leave_the_gauges() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| config.cache.ttl = Duration::from_millis(100)).await;
    mock.set("done", Reply::run("done", "COMPLETED"));
    gateway.get_run("done").await;
    support::eventually("the expired entry is evicted", || async {
        let scrape = gateway.scrape().await;
        scrape.expect("plextera_gateway_cache_evictions_total", &[("cause", "expired")]) == 1.0
            && scrape.expect("plextera_gateway_cache_entries", &[]) == 0.0
    })
    .await;
}

/// Checks that every `outcome` of the upstream histogram has the same number of calls in the
/// counter (summed over its codes), and the reverse; returns the counts by outcome.
fn counter_joins_histogram(scrape: &support::prom::Scrape) -> std::collections::BTreeMap<String, f64> {
    let outcomes = scrape.label_values(UPSTREAM_COUNT, "outcome");
    let counted_outcomes = scrape.label_values(UPSTREAM, "outcome");
    assert!(
        counted_outcomes.iter().all(|outcome| outcomes.contains(outcome)),
        "the counter's outcomes {counted_outcomes:?} are the histogram's {outcomes:?}"
    );
    let mut counts = std::collections::BTreeMap::new();
    for outcome in &outcomes {
        // The counter has a series per code seen; the histogram one per outcome from the start.
        let counted: f64 = scrape
            .series(UPSTREAM)
            .iter()
            .filter(|sample| sample.labels.get("outcome") == Some(outcome))
            .map(|sample| sample.value)
            .sum();
        let timed = scrape.expect(UPSTREAM_COUNT, &[("outcome", outcome)]);
        assert_eq!(counted, timed, "{outcome}: counter {counted}, histogram {timed}");
        counts.insert(outcome.clone(), counted);
    }
    counts
}

#[tokio::test]
async fn upstream_calls_by_outcome_join_the_latency_histogram() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| {
        config.upstream.request_timeout = Duration::from_millis(300);
    })
    .await;
    mock.set("live", Reply::run("live", "PROCESSING"));
    mock.set("down", Reply::status(StatusCode::SERVICE_UNAVAILABLE, "{}"));
    let never = Gate::new();
    mock.set("slow", Reply::run("slow", "COMPLETED").gated(&never));
    for _ in 0..3 {
        assert_eq!(gateway.get_run("live").await.status, StatusCode::OK);
    }
    for _ in 0..2 {
        assert_eq!(gateway.get_run("gone").await.status, StatusCode::NOT_FOUND);
        assert_eq!(
            gateway.get_run("down").await.status,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
    assert_eq!(gateway.get_run("slow").await.status, StatusCode::GATEWAY_TIMEOUT);

    let scrape = gateway.scrape().await;
    let counts = counter_joins_histogram(&scrape);
    for (outcome, count) in [
        ("2xx", 3.0),
        ("4xx", 2.0),
        ("5xx", 2.0),
        ("timeout", 1.0),
        ("connect", 0.0),
    ] {
        assert_eq!(counts.get(outcome), Some(&count), "{outcome}: {counts:?}");
    }
    for ((outcome, code), count) in [
        (("2xx", "200"), 3.0),
        (("4xx", "404"), 2.0),
        (("5xx", "503"), 2.0),
        (("timeout", "none"), 1.0),
    ] {
        assert_eq!(
            scrape.expect(UPSTREAM, &[("outcome", outcome), ("code", code)]),
            count,
            "{outcome} {code}"
        );
    }
    assert_eq!(
        scrape.series(UPSTREAM).len(),
        3 + 4,
        "the three codes seen, and one series per failure kind"
    );

    // A connect failure, from a gateway whose upstream refuses connections.
    let refused = refused_addr().await;
    let unreachable = TestGateway::start(&mock, |config| {
        config.upstream.base_url = format!("http://{refused}");
    })
    .await;
    assert_eq!(unreachable.get_run("any").await.status, StatusCode::BAD_GATEWAY);
    let scrape = unreachable.scrape().await;
    let counts = counter_joins_histogram(&scrape);
    assert_eq!(counts.get("connect"), Some(&1.0), "{counts:?}");
    assert_eq!(
        scrape.expect(UPSTREAM, &[("outcome", "connect"), ("code", "none")]),
        1.0
    );
    never.open();
}

/// The pool's connections by state, from a scrape.
async fn upstream_connections(gateway: &TestGateway) -> (f64, f64) {
    let scrape = gateway.scrape().await;
    (
        scrape.expect(UPSTREAM_CONNECTIONS, &[("state", "idle")]),
        scrape.expect(UPSTREAM_CONNECTIONS, &[("state", "busy")]),
    )
}

#[tokio::test]
async fn the_upstream_pool_gauges_count_busy_and_idle_connections() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    assert_eq!(upstream_connections(&gateway).await, (0.0, 0.0), "none yet");
    let gate = Gate::new();
    for index in 0..3 {
        let id = format!("held_{index}");
        mock.set(&id, Reply::run(&id, "PROCESSING").gated(&gate));
    }
    let calls: Vec<_> = (0..3)
        .map(|index| {
            let url = gateway.url(&runs_path(&format!("held_{index}")));
            tokio::spawn(async move {
                support::TestClient::new()
                    .send(http::Method::GET, &url, &[])
                    .await
                    .status
            })
        })
        .collect();
    mock.wait_for_requests(3).await;
    assert_eq!(
        upstream_connections(&gateway).await,
        (0.0, 3.0),
        "three calls waiting for their answers, one connection each"
    );
    gate.open();
    for call in calls {
        assert_eq!(call.await.expect("the request task"), StatusCode::OK);
    }
    // A connection goes back to the pool once its answer is read whole, just before the answer
    // is handed on: by now all three are back.
    assert_eq!(
        upstream_connections(&gateway).await,
        (3.0, 0.0),
        "kept alive for the next calls"
    );
    assert_eq!(gateway.get_run("held_0").await.status, StatusCode::OK);
    assert_eq!(
        upstream_connections(&gateway).await,
        (3.0, 0.0),
        "a kept-alive connection was reused"
    );
}

/// A kept-alive HTTP/1.1 connection to `addr`, with one request answered on it.
async fn open_connection(
    addr: std::net::SocketAddr,
) -> (
    hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    tokio::task::JoinHandle<()>,
) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
            .await
            .expect("handshake");
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = Request::get(runs_path("done"))
        .header(http::header::HOST, "gateway")
        .body(Empty::new())
        .expect("request");
    let response = sender.send_request(request).await.expect("an answer");
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body().collect().await.expect("the body");
    (sender, driver)
}

#[tokio::test]
async fn the_client_connections_gauge_counts_open_connections() {
    let mock = MockUpstream::start().await;
    mock.set("done", Reply::run("done", "COMPLETED"));
    let gateway = TestGateway::start(&mock, |_| {}).await;
    let open_now = || async { gateway.scrape().await.expect(CLIENT_CONNECTIONS, &[]) };
    // The scrapes go to the admin port: they are not counted.
    assert_eq!(open_now().await, 0.0);
    let mut connections = Vec::new();
    for _ in 0..5 {
        connections.push(open_connection(gateway.public).await);
    }
    assert_eq!(open_now().await, 5.0, "five kept-alive connections");
    for (sender, driver) in connections.drain(..3) {
        drop(sender);
        driver.await.expect("the connection ends");
    }
    eventually("three closed connections leave the gauge", || async {
        open_now().await == 2.0
    })
    .await;
    for (sender, driver) in connections {
        drop(sender);
        driver.await.expect("the connection ends");
    }
    eventually("the gauge is back to zero", || async { open_now().await == 0.0 }).await;
}

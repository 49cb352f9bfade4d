//! `/metrics`: exact values after a known sequence of requests, bounded labels, valid exposition.
//! That it is served on the admin port only: `other_paths_are_404_and_never_forwarded` in
//! tests/input_validation.rs.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::{MockUpstream, Reply, TestGateway, run_body};

const REQUESTS: &str = "plextera_gateway_requests_total";
const UPSTREAM: &str = "plextera_gateway_upstream_requests_total";
const RUN_STATUS: &str = "plextera_gateway_run_status_total";

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

    assert_eq!(scrape.expect(UPSTREAM, &[("code", "200")]), 4.0);
    assert_eq!(scrape.expect(UPSTREAM, &[("code", "404")]), 1.0);
    assert_eq!(scrape.expect(UPSTREAM, &[("code", "reset")]), 1.0);
    assert_eq!(scrape.expect(UPSTREAM, &[("code", "timeout")]), 0.0);
    assert_eq!(scrape.expect(UPSTREAM, &[("code", "connect")]), 0.0);
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

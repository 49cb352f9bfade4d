//! Event streams (`Accept: text/event-stream`): a frame per version of a run, `end` when it ends,
//! resumption with `Last-Event-ID`, keep-alives, limits, shutdown, CORS, and SIGTERM on the real
//! process with a long-poll and a stream held.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use support::push::{
    ANSWERS, HELD, MAX_POLL, POLL, WATCHED, completed, fast_watch, is_strong, request_held_upstream, running,
};
use support::sse::{self, EventStream};
use support::{
    GatewayProcess, MockUpstream, PATIENCE, Reply, TEST_KEY, TestClient, TestGateway, eventually,
    process_config, prom, runs_path, write_config,
};

fn text(body: &Bytes) -> &str {
    std::str::from_utf8(body).expect("utf-8 body")
}

/// The run's current version and ETag kind as a plain GET sees them.
async fn etag_of(gateway: &TestGateway, id: &str) -> String {
    let response = gateway.get_run(id).await;
    assert_eq!(response.status, StatusCode::OK);
    response.header("etag").expect("an ETag").to_owned()
}

async fn open_stream(gateway: &TestGateway, id: &str, headers: &[(&str, &str)]) -> EventStream {
    sse::open(gateway.public, &runs_path(id), headers).await
}

/// A stream on a run still going, past its `retry:` block and first `run` frame.
async fn open_running(gateway: &TestGateway, id: &str) -> EventStream {
    let mut stream = open_stream(gateway, id, &[]).await;
    opened(&mut stream).await;
    assert_eq!(stream.expect_event().await.kind(), "run");
    stream
}

/// Checks the stream's head, then reads its `retry:` block.
async fn opened(stream: &mut EventStream) {
    assert_eq!(stream.status, StatusCode::OK);
    assert_eq!(stream.header("content-type"), Some("text/event-stream"));
    assert_eq!(stream.header("cache-control"), Some("no-store"));
    assert_eq!(stream.header("x-accel-buffering"), Some("no"));
    let retry = stream.expect_event().await;
    assert_eq!(
        retry,
        sse::Event {
            retry: Some("3000".to_owned()),
            ..sse::Event::default()
        },
        "the stream opens with watch.sse_retry in ms"
    );
}

async fn metric(gateway: &TestGateway, name: &str, labels: &[(&str, &str)]) -> f64 {
    gateway.scrape().await.expect(name, labels)
}

async fn held_streams(gateway: &TestGateway) -> f64 {
    metric(gateway, HELD, &[("kind", "sse")]).await
}

async fn until_streams(gateway: &TestGateway, count: usize) {
    eventually(&format!("{count} streams are held"), || async {
        held_streams(gateway).await == count as f64
    })
    .await;
}

#[tokio::test]
async fn a_stream_sends_retry_a_frame_per_version_then_end_and_closes() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, fast_watch).await;
    let first = running("run_a", 1, 100);
    mock.set("run_a", Reply::ok(first.clone()));
    let first_version = etag_of(&gateway, "run_a").await;

    let mut stream = open_stream(&gateway, "run_a", &[]).await;
    opened(&mut stream).await;
    let frame = stream.expect_event().await;
    assert_eq!(frame.kind(), "run");
    assert_eq!(frame.id(), first_version, "id is the run's weak version");
    assert_eq!(frame.data.as_deref(), Some(text(&first)));
    assert_eq!(
        String::from_utf8_lossy(&stream.received),
        format!(
            "retry: 3000\n\nid: {first_version}\nevent: run\ndata: {}\n\n",
            text(&first)
        ),
        "the exact bytes of the prelude and the first frame"
    );
    until_streams(&gateway, 1).await;
    assert_eq!(metric(&gateway, WATCHED, &[]).await, 1.0);

    // Only the duration ticks: no frame. Then a new version: one frame.
    mock.set("run_a", Reply::ok(running("run_a", 1, 900)));
    let calls = mock.count_for("run_a");
    eventually("the watcher fetches the ticked body", || async {
        mock.count_for("run_a") >= calls + 2
    })
    .await;
    let second = running("run_a", 2, 1000);
    mock.set("run_a", Reply::ok(second.clone()));
    let frame = stream.expect_event().await;
    assert_eq!(frame.kind(), "run", "{frame:?}");
    assert_eq!(
        frame.data.as_deref(),
        Some(text(&second)),
        "the next version, not the tick"
    );
    assert!(frame.id().starts_with("W/\"") && frame.id() != first_version);
    assert_eq!(frame.id(), etag_of(&gateway, "run_a").await);

    let ended = completed("run_a");
    mock.set("run_a", Reply::ok(ended.clone()));
    let frame = stream.expect_event().await;
    assert_eq!(frame.kind(), "end");
    assert_eq!(frame.data.as_deref(), Some(text(&ended)));
    assert!(
        is_strong(frame.id()),
        "the ended run's strong version: {}",
        frame.id()
    );
    stream.expect_closed().await;

    let stored = gateway.get_run("run_a").await;
    assert_eq!(stored.x_cache(), Some("HIT"));
    assert_eq!(stored.header("etag"), Some(frame.id()));
    let scrape = gateway.scrape().await;
    assert_eq!(scrape.expect(ANSWERS, &[("outcome", "changed")]), 1.0);
    assert_eq!(scrape.expect(ANSWERS, &[("outcome", "ended")]), 1.0);
    assert_eq!(scrape.expect(HELD, &[("kind", "sse")]), 0.0);
    eventually("the watcher stops once the run ended", || async {
        metric(&gateway, WATCHED, &[]).await == 0.0
    })
    .await;
}

#[tokio::test]
async fn an_ended_run_is_a_stream_of_one_end_frame() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, fast_watch).await;
    let body = completed("run_e");
    mock.set("run_e", Reply::ok(body.clone()));
    // Cold (fetched and stored), then warm (from memory): the same one frame.
    let mut ids = Vec::new();
    for x_cache in ["MISS", "HIT"] {
        let mut stream = open_stream(&gateway, "run_e", &[]).await;
        assert_eq!(stream.header("x-cache"), Some(x_cache));
        opened(&mut stream).await;
        let frame = stream.expect_event().await;
        assert_eq!(frame.kind(), "end", "{x_cache}");
        assert_eq!(frame.data.as_deref(), Some(text(&body)));
        ids.push(frame.id().to_owned());
        stream.expect_closed().await;
    }
    assert_eq!(ids[0], ids[1]);
    assert_eq!(ids[0], etag_of(&gateway, "run_e").await, "the run's strong ETag");
    assert!(is_strong(&ids[0]));
    assert_eq!(mock.count_for("run_e"), 1);
    let scrape = gateway.scrape().await;
    assert_eq!(scrape.expect(WATCHED, &[]), 0.0, "nothing to watch");
    assert_eq!(scrape.expect(HELD, &[("kind", "sse")]), 0.0);
}

#[tokio::test]
async fn last_event_id_naming_the_current_version_skips_the_first_frame() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, fast_watch).await;
    mock.set("run_l", Reply::ok(running("run_l", 1, 100)));
    let seen = etag_of(&gateway, "run_l").await;

    let mut stream = open_stream(&gateway, "run_l", &[("last-event-id", &seen)]).await;
    opened(&mut stream).await;
    until_streams(&gateway, 1).await;
    let next = running("run_l", 2, 100);
    mock.set("run_l", Reply::ok(next.clone()));
    let frame = stream.expect_event().await;
    assert_eq!(frame.kind(), "run");
    assert_ne!(frame.id(), seen, "the version the client had was not sent again");
    assert_eq!(frame.data.as_deref(), Some(text(&next)));
    assert_eq!(
        String::from_utf8_lossy(&stream.received)
            .matches("event: run")
            .count(),
        1
    );

    // Another version in the header (an older one) gets the current frame first.
    let mut behind = open_stream(&gateway, "run_l", &[("last-event-id", &seen)]).await;
    opened(&mut behind).await;
    let frame = behind.expect_event().await;
    assert_eq!(frame.data.as_deref(), Some(text(&next)));
}

#[tokio::test]
async fn last_event_id_naming_the_ended_version_is_a_204() {
    let mock = MockUpstream::start().await;
    mock.set("run_n", Reply::ok(completed("run_n")));
    let gateway = TestGateway::start(&mock, fast_watch).await;
    let ended = etag_of(&gateway, "run_n").await;
    // From memory, and on a cold replica that has to ask upstream.
    let cold = TestGateway::start(&mock, fast_watch).await;
    for gateway in [&gateway, &cold] {
        let stream = open_stream(gateway, "run_n", &[("last-event-id", &ended)]).await;
        assert_eq!(stream.status, StatusCode::NO_CONTENT);
        assert_ne!(stream.header("content-type"), Some("text/event-stream"));
        assert!(stream.into_body().await.is_empty());
    }
    assert_eq!(mock.count_for("run_n"), 2, "one call per replica");
}

#[tokio::test]
async fn a_run_not_found_at_the_start_is_a_plain_json_404() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, fast_watch).await;
    let stream = open_stream(&gateway, "nowhere", &[]).await;
    assert_eq!(stream.status, StatusCode::NOT_FOUND);
    assert_eq!(stream.header("content-type"), Some("application/json"));
    let body = stream.into_body().await;
    let json: serde_json::Value = serde_json::from_slice(&body).expect("a JSON body");
    assert_eq!(json["error"]["code"], "NOT_FOUND", "{json}");
    let scrape = gateway.scrape().await;
    assert_eq!(scrape.expect(HELD, &[("kind", "sse")]), 0.0);
    assert_eq!(scrape.expect(WATCHED, &[]), 0.0);
}

#[tokio::test]
async fn an_upstream_failure_at_the_start_is_a_stream_that_asks_to_reconnect() {
    // Browsers give up for good on an error status; a 200 stream that ends makes them come back.
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, fast_watch).await;
    mock.set(
        "flaky",
        Reply::status(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"error":{"code":"UNAVAILABLE"}}"#,
        ),
    );
    let mut stream = open_stream(&gateway, "flaky", &[]).await;
    assert_eq!(stream.status, StatusCode::OK);
    assert_eq!(stream.header("content-type"), Some("text/event-stream"));
    let retry = stream.expect_event().await;
    assert_eq!(retry.retry.as_deref(), Some("3000"));
    let comment = stream.next().await.expect("a comment saying why");
    assert!(comment.is_comment(), "{comment:?}");
    assert!(stream.next().await.is_none(), "then the stream ends");
    let scrape = gateway.scrape().await;
    assert_eq!(scrape.expect(HELD, &[("kind", "sse")]), 0.0, "nobody is held");
    assert_eq!(scrape.expect(WATCHED, &[]), 0.0);

    // Once upstream answers, the reconnect gets the run.
    mock.set("flaky", Reply::ok(running("flaky", 1, 100)));
    let mut stream = open_stream(&gateway, "flaky", &[]).await;
    assert_eq!(stream.expect_event().await.retry.as_deref(), Some("3000"));
    assert_eq!(stream.expect_event().await.kind(), "run");
}

#[tokio::test]
async fn a_404_or_a_refused_key_mid_stream_is_an_error_frame_then_close() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, fast_watch).await;
    for (id, failure, code) in [
        (
            "gone",
            Reply::status(
                StatusCode::NOT_FOUND,
                r#"{"error":{"code":"NOT_FOUND","message":"run deleted"}}"#,
            ),
            "NOT_FOUND",
        ),
        (
            "locked",
            Reply::status(StatusCode::FORBIDDEN, r#"{"error":{"code":"FORBIDDEN"}}"#),
            "UPSTREAM_AUTH",
        ),
    ] {
        mock.set(id, Reply::ok(running(id, 1, 100)));
        let mut stream = open_running(&gateway, id).await;
        mock.set(id, failure);
        let frame = stream.expect_event().await;
        assert_eq!(frame.kind(), "error", "{id}: {frame:?}");
        assert_eq!(frame.json()["error"]["code"], code, "{id}");
        stream.expect_closed().await;
        assert!(!String::from_utf8_lossy(&stream.received).contains(TEST_KEY));
    }
    let scrape = gateway.scrape().await;
    assert_eq!(scrape.expect(ANSWERS, &[("outcome", "error")]), 2.0);
    assert_eq!(scrape.expect(HELD, &[("kind", "sse")]), 0.0);
}

#[tokio::test]
async fn quiet_streams_carry_keep_alive_comments() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| {
        fast_watch(config);
        config.watch.sse_keepalive = Duration::from_millis(100);
    })
    .await;
    mock.set("run_k", Reply::ok(running("run_k", 1, 100)));
    let mut stream = open_running(&gateway, "run_k").await;
    for _ in 0..3 {
        let block = stream.next().await.expect("the stream stays open");
        assert!(block.is_comment(), "only keep-alives on a quiet run: {block:?}");
        assert_eq!(block.comments, ["keep-alive"]);
    }
    assert!(String::from_utf8_lossy(&stream.received).ends_with("\n\n: keep-alive\n\n"));
    // Still a live stream: the next version comes through.
    let next = running("run_k", 2, 100);
    mock.set("run_k", Reply::ok(next.clone()));
    assert_eq!(stream.expect_event().await.data.as_deref(), Some(text(&next)));
}

#[tokio::test]
async fn streams_close_cleanly_after_max_stream_duration() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| {
        fast_watch(config);
        config.watch.max_stream_duration = Duration::from_millis(300);
    })
    .await;
    mock.set("run_d", Reply::ok(running("run_d", 1, 100)));
    let started = Instant::now();
    let mut stream = open_running(&gateway, "run_d").await;
    stream.expect_closed().await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(300 - 300 / 16 - 15),
        "closed after {elapsed:?}, before max_stream_duration less a sixteenth"
    );
    assert!(elapsed < Duration::from_millis(1300), "closed after {elapsed:?}");
    let scrape = gateway.scrape().await;
    assert_eq!(scrape.expect(ANSWERS, &[("outcome", "timeout")]), 1.0);
    assert_eq!(scrape.expect(HELD, &[("kind", "sse")]), 0.0);
}

#[tokio::test]
async fn a_client_dropping_its_stream_is_no_longer_held() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| {
        fast_watch(config);
        config.watch.sse_keepalive = Duration::from_millis(100);
    })
    .await;
    mock.set("run_x", Reply::ok(running("run_x", 1, 100)));
    let stream = open_running(&gateway, "run_x").await;
    until_streams(&gateway, 1).await;
    assert_eq!(metric(&gateway, WATCHED, &[]).await, 1.0);

    drop(stream);
    eventually("the stream that was dropped is released", || async {
        let scrape = gateway.scrape().await;
        scrape.expect(HELD, &[("kind", "sse")]) == 0.0 && scrape.expect(WATCHED, &[]) == 0.0
    })
    .await;
    let calls = mock.count_for("run_x");
    tokio::time::sleep(MAX_POLL * 4).await;
    assert_eq!(mock.count_for("run_x"), calls, "the watcher stopped");
}

#[tokio::test]
async fn shutdown_ends_open_streams_cleanly() {
    let mock = MockUpstream::start().await;
    let mut gateway = TestGateway::start(&mock, |config| {
        fast_watch(config);
        config.server.shutdown_grace = Duration::from_secs(10);
    })
    .await;
    mock.set("run_s", Reply::ok(running("run_s", 1, 100)));
    let mut streams = Vec::new();
    for _ in 0..2 {
        let stream = open_running(&gateway, "run_s").await;
        streams.push(stream);
    }
    until_streams(&gateway, 2).await;
    // A request still in flight keeps the drain (and so the admin port) going while we look.
    let (gate, slow) = request_held_upstream(&gateway, &mock).await;

    gateway.begin_shutdown();
    let started = Instant::now();
    for stream in &mut streams {
        stream.expect_closed().await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "streams ended at once: {:?}",
        started.elapsed()
    );
    let scrape = gateway.scrape().await;
    assert_eq!(scrape.expect(ANSWERS, &[("outcome", "shutdown")]), 2.0);
    assert_eq!(scrape.expect(HELD, &[("kind", "sse")]), 0.0);
    gate.open();
    assert_eq!(slow.await.expect("client task").status, StatusCode::OK);
    gateway.stopped().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_on_one_run_share_one_watcher() {
    const STREAMS: usize = 20;
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, fast_watch).await;
    let first = running("run_m", 1, 100);
    mock.set("run_m", Reply::ok(first.clone()));
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        let mut stream = open_stream(&gateway, "run_m", &[]).await;
        opened(&mut stream).await;
        assert_eq!(stream.expect_event().await.data.as_deref(), Some(text(&first)));
        streams.push(stream);
    }
    until_streams(&gateway, STREAMS).await;
    assert_eq!(metric(&gateway, WATCHED, &[]).await, 1.0);
    let since = Instant::now();
    let calls = mock.count_for("run_m");
    mock.wait_for_requests(mock.request_count() + 3).await;
    let elapsed = since.elapsed();
    let made = mock.count_for("run_m") - calls;
    let bound = (elapsed.as_secs_f64() / POLL.as_secs_f64()).floor() as usize + 2;
    assert!(
        made <= bound,
        "{made} calls in {elapsed:?} for {STREAMS} streams (at most {bound})"
    );
    let ids: Vec<String> = mock
        .requests()
        .iter()
        .filter(|request| request.at >= since)
        .map(|request| {
            request.headers["x-request-id"]
                .to_str()
                .expect("ascii")
                .to_owned()
        })
        .collect();
    assert!(ids.iter().all(|id| id.starts_with("watch-")), "{ids:?}");

    let next = running("run_m", 2, 100);
    mock.set("run_m", Reply::ok(next.clone()));
    for stream in &mut streams {
        let frame = stream.expect_event().await;
        assert_eq!(frame.kind(), "run");
        assert_eq!(frame.data.as_deref(), Some(text(&next)));
    }
    mock.set("run_m", Reply::ok(completed("run_m")));
    for stream in &mut streams {
        assert_eq!(stream.expect_event().await.kind(), "end");
        stream.expect_closed().await;
    }
    let scrape = gateway.scrape().await;
    assert_eq!(
        scrape.expect(ANSWERS, &[("outcome", "changed")]),
        STREAMS as f64,
        "one per frame"
    );
    assert_eq!(scrape.expect(ANSWERS, &[("outcome", "ended")]), STREAMS as f64);
}

#[tokio::test]
async fn max_held_counts_streams_and_long_polls_together() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| {
        fast_watch(config);
        config.watch.max_held = 2;
    })
    .await;
    mock.set("run_h", Reply::ok(running("run_h", 1, 100)));
    let held = etag_of(&gateway, "run_h").await;
    let mut first = open_stream(&gateway, "run_h", &[]).await;
    opened(&mut first).await;
    let poll_url = format!("{}?wait=10", gateway.url(&runs_path("run_h")));
    let long_poll = {
        let held = held.clone();
        tokio::spawn(async move {
            TestClient::new()
                .send(Method::GET, &poll_url, &[("if-none-match", &held)])
                .await
        })
    };
    eventually("a stream and a long-poll are held", || async {
        let scrape = gateway.scrape().await;
        scrape.expect(HELD, &[("kind", "sse")]) == 1.0 && scrape.expect(HELD, &[("kind", "long_poll")]) == 1.0
    })
    .await;

    let refused = open_stream(&gateway, "run_h", &[]).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.header("content-type"), Some("application/json"));
    assert!(refused.header("retry-after").is_some());
    let body = refused.into_body().await;
    let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(json["error"]["code"], "TOO_MANY_WAITERS");
    let refused = gateway
        .send(
            Method::GET,
            &format!("{}?wait=10", runs_path("run_h")),
            &[("if-none-match", &held)],
        )
        .await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.error_code(), "TOO_MANY_WAITERS");

    // The stream closing frees its place.
    drop(first);
    until_streams(&gateway, 0).await;
    let mut again = open_stream(&gateway, "run_h", &[]).await;
    opened(&mut again).await;
    assert_eq!(again.expect_event().await.kind(), "run");
    until_streams(&gateway, 1).await;
    mock.set("run_h", Reply::ok(running("run_h", 2, 100)));
    assert_eq!(long_poll.await.expect("client task").status, StatusCode::OK);
}

#[tokio::test]
async fn cors_allows_the_push_headers_and_exposes_the_etag() {
    const PAGE: &str = "http://page.example";
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| {
        fast_watch(config);
        config.server.cors_allowed_origins = vec![PAGE.to_owned()];
    })
    .await;
    mock.set("run_c", Reply::ok(running("run_c", 1, 100)));

    let preflight = gateway
        .send(
            Method::OPTIONS,
            &runs_path("run_c"),
            &[
                ("origin", PAGE),
                ("access-control-request-method", "GET"),
                (
                    "access-control-request-headers",
                    "last-event-id,prefer,if-none-match",
                ),
            ],
        )
        .await;
    assert_eq!(preflight.status, StatusCode::OK);
    assert_eq!(preflight.header("access-control-allow-origin"), Some(PAGE));
    let allowed = preflight
        .header("access-control-allow-headers")
        .expect("allow-headers")
        .to_ascii_lowercase();
    for header in ["last-event-id", "prefer", "if-none-match"] {
        assert!(allowed.contains(header), "{header} not in {allowed}");
    }
    assert_eq!(mock.request_count(), 0, "preflights never go upstream");

    let response = gateway
        .send(
            Method::GET,
            &runs_path("run_c"),
            &[("origin", PAGE), ("prefer", "wait=5")],
        )
        .await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.header("access-control-allow-origin"), Some(PAGE));
    let exposed = response
        .header("access-control-expose-headers")
        .expect("expose-headers")
        .to_ascii_lowercase();
    for header in ["etag", "preference-applied"] {
        assert!(exposed.contains(header), "{header} not in {exposed}");
    }
    assert!(response.header("etag").is_some());

    let mut events = open_stream(&gateway, "run_c", &[("origin", PAGE)]).await;
    assert_eq!(events.header("access-control-allow-origin"), Some(PAGE));
    opened(&mut events).await;
    assert_eq!(events.expect_event().await.kind(), "run");
}

/// Scrapes a process's admin port.
async fn scrape_process(gateway: &GatewayProcess) -> prom::Scrape {
    let response = TestClient::new()
        .send(Method::GET, &format!("http://{}/metrics", gateway.admin), &[])
        .await;
    assert_eq!(response.status, StatusCode::OK);
    prom::Scrape::parse(std::str::from_utf8(&response.body).expect("utf-8"))
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_answers_a_held_long_poll_ends_a_stream_and_exits_zero() {
    let mock = MockUpstream::start().await;
    mock.set("run_p", Reply::ok(running("run_p", 1, 100)));
    let dir = tempfile::tempdir().expect("temp dir");
    let text = format!(
        "{}[watch]\npoll_interval = \"50ms\"\nmax_poll_interval = \"200ms\"\nsse_keepalive = \"200ms\"\n",
        process_config(&mock.base_url(), "")
    );
    let config = write_config(dir.path(), &text);
    let mut gateway = GatewayProcess::start(&["--config", &config], &[("GW_TEST_KEY", TEST_KEY)]);

    let run_url = format!("http://{}{}", gateway.public, runs_path("run_p"));
    let first = TestClient::new().send(Method::GET, &run_url, &[]).await;
    let held = first.header("etag").expect("ETag").to_owned();
    let poll_url = format!("{run_url}?wait=30");
    let long_poll = {
        let held = held.clone();
        tokio::spawn(async move {
            TestClient::new()
                .send(Method::GET, &poll_url, &[("if-none-match", &held)])
                .await
        })
    };
    let mut stream = sse::open(gateway.public, &runs_path("run_p"), &[]).await;
    opened(&mut stream).await;
    assert_eq!(stream.expect_event().await.id(), held);
    eventually("a long-poll and a stream are held", || async {
        let scrape = scrape_process(&gateway).await;
        scrape.expect(HELD, &[("kind", "long_poll")]) == 1.0 && scrape.expect(HELD, &[("kind", "sse")]) == 1.0
    })
    .await;

    gateway.send_sigterm();
    let started = Instant::now();
    let response = tokio::time::timeout(PATIENCE, long_poll)
        .await
        .expect("the long-poll is answered")
        .expect("client task");
    assert_eq!(response.status, StatusCode::NOT_MODIFIED);
    assert_eq!(response.header("etag"), Some(held.as_str()));
    stream.expect_closed().await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered and closed at once, not at the 30 s wait: {:?}",
        started.elapsed()
    );
    let status = gateway.wait();
    assert_eq!(status.code(), Some(0), "{}", gateway.logs());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "exited within the 5 s grace: {:?}",
        started.elapsed()
    );
    let logs = gateway.logs();
    assert!(logs.contains("drained"), "{logs}");
    assert!(!logs.contains("cutting remaining connections"), "{logs}");
}

#[tokio::test]
async fn the_watcher_backs_off_while_nothing_changes_and_starts_over_on_a_change() {
    const MAX: Duration = Duration::from_millis(400);
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| {
        config.watch.poll_interval = POLL;
        config.watch.max_poll_interval = MAX;
    })
    .await;
    mock.set("run_b", Reply::ok(running("run_b", 1, 100)));
    let mut stream = open_running(&gateway, "run_b").await;
    until_streams(&gateway, 1).await;
    // The stream's own call came before its watcher: every call from here is the watcher's.
    let base = mock.count_for("run_b");
    eventually("the watcher has called eight times", || async {
        mock.count_for("run_b") >= base + 8
    })
    .await;
    let calls: Vec<Instant> = mock.requests().iter().map(|request| request.at).collect();
    let gaps: Vec<Duration> = calls[base..].windows(2).map(|pair| pair[1] - pair[0]).collect();
    // After the k-th unchanged answer the watcher waits poll_interval × 1.5^k (capped), ±10 %.
    for (k, gap) in gaps.iter().enumerate().take(7) {
        let interval = POLL.mul_f64(1.5_f64.powi(k as i32 + 1)).min(MAX);
        let least = interval.mul_f64(0.9).saturating_sub(Duration::from_millis(5));
        assert!(
            *gap >= least,
            "gap {k} was {gap:?}, expected at least {least:?}: {gaps:?}"
        );
    }

    // A change: the interval starts over.
    let changed_at = Instant::now();
    let next = running("run_b", 2, 100);
    mock.set("run_b", Reply::ok(next.clone()));
    assert_eq!(stream.expect_event().await.data.as_deref(), Some(text(&next)));
    let after = mock
        .requests()
        .iter()
        .filter(|request| request.at >= changed_at)
        .count();
    eventually("the watcher calls twice more", || async {
        mock.requests()
            .iter()
            .filter(|request| request.at >= changed_at)
            .count()
            >= after + 2
    })
    .await;
    let calls: Vec<Instant> = mock
        .requests()
        .iter()
        .map(|request| request.at)
        .filter(|at| *at >= changed_at)
        .collect();
    let reset = calls[1] - calls[0];
    assert!(
        reset < Duration::from_millis(250),
        "after a change the watcher polls at poll_interval again, not {MAX:?}: waited {reset:?}"
    );
}

//! Long-polls (`?wait=` / `Prefer: wait=` with `If-None-Match`): held until the run changes, ends
//! or the wait runs out, with one upstream watcher per run whatever the number of clients.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use plextera_gateway::Config;
use support::push::{
    ANSWERS, HELD, MAX_POLL, POLL, WATCHED, completed, fast_watch, is_strong, request_held_upstream, running,
};
use support::{
    Gate, MockUpstream, PATIENCE, Reply, TestClient, TestGateway, TestResponse, eventually, runs_path,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// Slack on "answered no later than its wait": scheduling on two busy cores.
const LATE: Duration = Duration::from_secs(1);
/// Slack on "not before its wait less a sixteenth": timer granularity.
const EARLY: Duration = Duration::from_millis(15);

const UPSTREAM: &str = "plextera_gateway_upstream_requests_total";

fn wait_path(id: &str, wait: &str) -> String {
    format!("{}?wait={wait}", runs_path(id))
}

/// The run's current version, by a plain GET (one upstream call).
async fn version(gateway: &TestGateway, id: &str) -> String {
    let response = gateway.get_run(id).await;
    assert_eq!(response.status, StatusCode::OK, "{:?}", response.body);
    let etag = response.header("etag").expect("a version").to_owned();
    assert!(
        etag.starts_with("W/\""),
        "a run still going has a weak version: {etag}"
    );
    etag
}

/// A long-poll on a connection of its own, in a task of its own; resolves with the response and
/// how long it took.
fn long_poll(
    gateway: &TestGateway,
    id: &str,
    wait: &str,
    if_none_match: &str,
) -> JoinHandle<(TestResponse, Duration)> {
    let url = gateway.url(&wait_path(id, wait));
    let if_none_match = if_none_match.to_owned();
    tokio::spawn(async move {
        let started = Instant::now();
        let response = TestClient::new()
            .send(Method::GET, &url, &[("if-none-match", &if_none_match)])
            .await;
        (response, started.elapsed())
    })
}

/// Awaits a long-poll's task, failing if it takes longer than `PATIENCE`.
async fn answered(client: JoinHandle<(TestResponse, Duration)>) -> (TestResponse, Duration) {
    tokio::time::timeout(PATIENCE, client)
        .await
        .expect("the long-poll was answered in time")
        .expect("client task")
}

/// A long-poll written on a raw connection, for a client that goes away: dropping the stream
/// closes the connection.
async fn raw_long_poll(gateway: &TestGateway, id: &str, wait: &str, if_none_match: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(gateway.public).await.expect("connect");
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: gateway\r\nIf-None-Match: {if_none_match}\r\n\r\n",
        wait_path(id, wait)
    );
    tcp.write_all(request.as_bytes()).await.expect("write request");
    tcp
}

async fn metric(gateway: &TestGateway, name: &str, labels: &[(&str, &str)]) -> f64 {
    gateway.scrape().await.expect(name, labels)
}

async fn held_long_polls(gateway: &TestGateway) -> f64 {
    metric(gateway, HELD, &[("kind", "long_poll")]).await
}

async fn watched_runs(gateway: &TestGateway) -> f64 {
    metric(gateway, WATCHED, &[]).await
}

async fn answers(gateway: &TestGateway, outcome: &str) -> f64 {
    metric(gateway, ANSWERS, &[("outcome", outcome)]).await
}

/// Waits until exactly `count` long-polls are held.
async fn until_held(gateway: &TestGateway, count: usize) {
    eventually(&format!("{count} long-polls are held"), || async {
        held_long_polls(gateway).await == count as f64
    })
    .await;
}

/// Waits until the gateway has made at least one upstream call labelled `code`: an HTTP status
/// (its `code` label), or a failure kind such as `timeout` (its `outcome`; its code is `none`).
async fn until_upstream_answered(gateway: &TestGateway, code: &str) {
    eventually(&format!("upstream answered {code}"), || async {
        gateway
            .scrape()
            .await
            .series(UPSTREAM)
            .iter()
            .filter(|sample| {
                sample.labels.get("code").map(String::as_str) == Some(code)
                    || sample.labels.get("outcome").map(String::as_str) == Some(code)
            })
            .map(|sample| sample.value)
            .sum::<f64>()
            >= 1.0
    })
    .await;
}

/// Checks a wait that ran out: answered no earlier than `wait - wait/16` and not long after `wait`.
fn assert_ran_out(elapsed: Duration, wait: Duration) {
    let earliest = wait - wait / 16 - EARLY;
    assert!(
        elapsed >= earliest,
        "answered after {elapsed:?}, before the earliest deadline {earliest:?}"
    );
    assert!(
        elapsed <= wait + LATE,
        "answered after {elapsed:?}, well after the wait of {wait:?}"
    );
}

#[tokio::test]
async fn a_held_long_poll_is_answered_with_the_new_version() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, fast_watch).await;
    mock.set("run_a", Reply::ok(running("run_a", 1, 100)));
    let first = version(&gateway, "run_a").await;

    let client = long_poll(&gateway, "run_a", "10", &first);
    until_held(&gateway, 1).await;
    assert_eq!(watched_runs(&gateway).await, 1.0);
    assert!(!client.is_finished(), "held while the run has not changed");
    let next = running("run_a", 2, 150);
    mock.set("run_a", Reply::ok(next.clone()));

    let (response, elapsed) = answered(client).await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.body, next, "the new version's body");
    let etag = response.header("etag").expect("an ETag");
    assert!(etag.starts_with("W/\"") && etag != first, "{etag} after {first}");
    assert_eq!(response.header("cache-control"), Some("no-store"));
    assert!(
        elapsed < Duration::from_secs(10),
        "answered on the change, not at the deadline"
    );
    assert_eq!(
        etag,
        version(&gateway, "run_a").await,
        "the version a plain GET gets"
    );

    let scrape = gateway.scrape().await;
    assert_eq!(scrape.expect(ANSWERS, &[("outcome", "changed")]), 1.0);
    assert_eq!(scrape.expect(ANSWERS, &[("outcome", "timeout")]), 0.0);
    assert_eq!(scrape.expect(HELD, &[("kind", "long_poll")]), 0.0);
    eventually("the watcher stops with its last client", || async {
        watched_runs(&gateway).await == 0.0
    })
    .await;
}

#[tokio::test]
async fn a_wait_that_runs_out_is_a_304_with_the_current_version_never_late() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, fast_watch).await;
    mock.set("run_t", Reply::ok(running("run_t", 1, 100)));
    let held = version(&gateway, "run_t").await;
    let calls_before = mock.count_for("run_t");

    // Seconds and a duration with a unit, held at the same time.
    let seconds = long_poll(&gateway, "run_t", "1", &held);
    let millis = long_poll(&gateway, "run_t", "600ms", &held);
    for (client, wait) in [
        (seconds, Duration::from_secs(1)),
        (millis, Duration::from_millis(600)),
    ] {
        let (response, elapsed) = answered(client).await;
        assert_eq!(response.status, StatusCode::NOT_MODIFIED, "{wait:?}");
        assert!(response.body.is_empty());
        assert_eq!(response.header("etag"), Some(held.as_str()));
        assert_eq!(response.header("cache-control"), Some("no-store"));
        assert_ran_out(elapsed, wait);
    }
    assert!(
        mock.count_for("run_t") > calls_before,
        "the watcher asked upstream while they waited"
    );
    assert_eq!(answers(&gateway, "timeout").await, 2.0);
    assert_eq!(answers(&gateway, "changed").await, 0.0);
    assert_eq!(held_long_polls(&gateway).await, 0.0);
}

#[tokio::test]
async fn a_wait_that_runs_out_during_the_first_upstream_call_is_a_304_on_time() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, fast_watch).await;
    // No watcher yet, and the call that would learn the run's version hangs past the wait.
    let gate = Gate::new();
    mock.set("run_slow", Reply::ok(running("run_slow", 1, 100)).gated(&gate));
    let client = long_poll(&gateway, "run_slow", "500ms", "W/\"held\"");
    let (response, elapsed) = answered(client).await;
    gate.open();
    assert_eq!(response.status, StatusCode::NOT_MODIFIED);
    assert_eq!(
        response.header("etag"),
        Some("W/\"held\""),
        "the client's own version"
    );
    assert_ran_out(elapsed, Duration::from_millis(500));
    assert_eq!(answers(&gateway, "timeout").await, 1.0);
}

#[tokio::test]
async fn without_if_none_match_a_long_poll_is_answered_at_once() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, fast_watch).await;
    let body = running("run_n", 1, 100);
    mock.set("run_n", Reply::ok(body.clone()));
    let started = Instant::now();
    let response = gateway.send(Method::GET, &wait_path("run_n", "30"), &[]).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "not held: {:?}",
        started.elapsed()
    );
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.body, body);
    assert!(response.header("etag").is_some_and(|etag| etag.starts_with("W/")));
    assert_eq!(mock.count_for("run_n"), 1);
    let scrape = gateway.scrape().await;
    assert_eq!(scrape.expect(WATCHED, &[]), 0.0, "no watcher started");
    assert_eq!(scrape.expect(HELD, &[("kind", "long_poll")]), 0.0);
}

#[tokio::test]
async fn a_version_the_client_does_not_hold_is_answered_at_once() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, fast_watch).await;
    mock.set("run_s", Reply::ok(running("run_s", 1, 100)));
    let old = version(&gateway, "run_s").await;
    let current = running("run_s", 2, 100);
    mock.set("run_s", Reply::ok(current.clone()));

    for stale in [old.as_str(), "W/\"00000000000000000000000000000000\"", "*"] {
        let started = Instant::now();
        let response = gateway
            .send(
                Method::GET,
                &wait_path("run_s", "30"),
                &[("if-none-match", stale)],
            )
            .await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{stale}: not held, answered after {:?}",
            started.elapsed()
        );
        assert_eq!(response.status, StatusCode::OK, "{stale}");
        assert_eq!(response.body, current, "{stale}");
        assert_ne!(response.header("etag"), Some(old.as_str()));
    }
    assert_eq!(held_long_polls(&gateway).await, 0.0);
    assert_eq!(answers(&gateway, "changed").await, 0.0, "none was held");
}

#[tokio::test]
async fn an_ended_run_is_answered_at_once_from_the_cache() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, fast_watch).await;
    let body = completed("run_e");
    mock.set("run_e", Reply::ok(body.clone()));

    // Cold: fetched, stored, answered whole (the client's version is not this one).
    let started = Instant::now();
    let cold = gateway
        .send(
            Method::GET,
            &wait_path("run_e", "30"),
            &[("if-none-match", "W/\"00000000000000000000000000000000\"")],
        )
        .await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(cold.status, StatusCode::OK);
    assert_eq!(cold.body, body);
    assert_eq!(cold.x_cache(), Some("MISS"));
    let etag = cold.header("etag").expect("ETag").to_owned();
    assert!(is_strong(&etag), "an ended run's version is strong: {etag}");

    // Warm: the client holds it (304) or not (200), both from memory, neither held.
    let started = Instant::now();
    let held = gateway
        .send(
            Method::GET,
            &wait_path("run_e", "30"),
            &[("if-none-match", &etag)],
        )
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "not held: {:?}",
        started.elapsed()
    );
    assert_eq!(held.status, StatusCode::NOT_MODIFIED);
    assert_eq!(held.header("etag"), Some(etag.as_str()));
    assert_eq!(held.x_cache(), Some("HIT"));
    let other = gateway
        .send(
            Method::GET,
            &wait_path("run_e", "30"),
            &[("if-none-match", "\"elsewhere\"")],
        )
        .await;
    assert_eq!(other.status, StatusCode::OK);
    assert_eq!(other.body, body);
    assert_eq!(other.x_cache(), Some("HIT"));

    assert_eq!(mock.count_for("run_e"), 1, "one upstream call in all");
    let scrape = gateway.scrape().await;
    assert_eq!(scrape.expect(WATCHED, &[]), 0.0);
    assert_eq!(scrape.expect(HELD, &[("kind", "long_poll")]), 0.0);
}

#[tokio::test]
async fn a_run_that_ends_while_held_is_answered_ended_and_stored() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, fast_watch).await;
    mock.set("run_f", Reply::ok(running("run_f", 1, 100)));
    let first = version(&gateway, "run_f").await;

    let client = long_poll(&gateway, "run_f", "10", &first);
    until_held(&gateway, 1).await;
    let body = completed("run_f");
    mock.set("run_f", Reply::ok(body.clone()));
    let (response, elapsed) = answered(client).await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.body, body);
    let etag = response.header("etag").expect("ETag").to_owned();
    assert!(is_strong(&etag), "the ended run's strong version: {etag}");
    assert_eq!(
        response.header("cache-control"),
        Some("private, max-age=86400, immutable")
    );
    assert!(elapsed < Duration::from_secs(10));
    assert_eq!(answers(&gateway, "ended").await, 1.0);
    eventually("the watcher stops once the run ended", || async {
        watched_runs(&gateway).await == 0.0
    })
    .await;

    // Stored by the watcher's call: a plain GET is a hit and costs no upstream call.
    let calls = mock.count_for("run_f");
    let plain = gateway.get_run("run_f").await;
    assert_eq!(plain.status, StatusCode::OK);
    assert_eq!(plain.x_cache(), Some("HIT"));
    assert_eq!(plain.body, body);
    assert_eq!(plain.header("etag"), Some(etag.as_str()));
    let revalidated = gateway
        .send(
            Method::GET,
            &wait_path("run_f", "10"),
            &[("if-none-match", &etag)],
        )
        .await;
    assert_eq!(revalidated.status, StatusCode::NOT_MODIFIED);
    assert_eq!(revalidated.x_cache(), Some("HIT"));
    assert_eq!(mock.count_for("run_f"), calls, "no new upstream call");
}

#[tokio::test]
async fn invalid_waits_are_refused_before_anything_goes_upstream() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, fast_watch).await;
    mock.set("run_i", Reply::ok(running("run_i", 1, 100)));
    for wait in ["abc", "-1", "", "1.2.3", "5parsecs", "-5s"] {
        for headers in [&[][..], &[("if-none-match", "W/\"abc\"")][..]] {
            let response = gateway
                .send(Method::GET, &wait_path("run_i", wait), headers)
                .await;
            assert_eq!(response.status, StatusCode::BAD_REQUEST, "wait={wait:?}");
            assert_eq!(response.header("content-type"), Some("application/json"));
            assert_eq!(response.error_code(), "INVALID_WAIT", "wait={wait:?}");
        }
    }
    let bare = gateway
        .send(Method::GET, &format!("{}?wait", runs_path("run_i")), &[])
        .await;
    assert_eq!(bare.status, StatusCode::BAD_REQUEST);
    assert_eq!(bare.error_code(), "INVALID_WAIT");
    assert_eq!(mock.request_count(), 0, "nothing was sent upstream");

    // A Prefer the gateway cannot read is a preference, ignored rather than refused.
    let ignored = gateway
        .send(Method::GET, &runs_path("run_i"), &[("prefer", "wait=soon")])
        .await;
    assert_eq!(ignored.status, StatusCode::OK);
    assert!(ignored.header("preference-applied").is_none());
    assert_eq!(mock.request_count(), 1);
}

#[tokio::test]
async fn prefer_wait_is_applied_and_named_capped_at_max_wait() {
    let mock = MockUpstream::start().await;
    mock.set("run_p", Reply::ok(running("run_p", 1, 100)));

    // Without a version to compare there is nothing to wait for: answered at once, and the
    // preference is not said to be applied.
    let roomy = TestGateway::start(&mock, fast_watch).await;
    let asked = roomy
        .send(Method::GET, &runs_path("run_p"), &[("prefer", "wait=5")])
        .await;
    assert_eq!(asked.status, StatusCode::OK);
    assert!(asked.header("preference-applied").is_none());
    // With one, under the cap: applied as asked (answered at once here: an older version).
    let asked = roomy
        .send(
            Method::GET,
            &runs_path("run_p"),
            &[("prefer", "wait=5"), ("if-none-match", "W/\"older\"")],
        )
        .await;
    assert_eq!(asked.status, StatusCode::OK);
    assert_eq!(asked.header("preference-applied"), Some("wait=5"));
    let plain = roomy.get_run("run_p").await;
    assert!(plain.header("preference-applied").is_none(), "only when asked");

    // Over the cap: held for max_wait only, and told so.
    let capped = TestGateway::start(&mock, |config| {
        fast_watch(config);
        config.watch.max_wait = Duration::from_secs(2);
    })
    .await;
    let held = version(&capped, "run_p").await;
    let url = capped.url(&runs_path("run_p"));
    let preferred = {
        let held = held.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let response = TestClient::new()
                .send(
                    Method::GET,
                    &url,
                    &[("prefer", "wait=999"), ("if-none-match", &held)],
                )
                .await;
            (response, started.elapsed())
        })
    };
    let queried = long_poll(&capped, "run_p", "999", &held);
    for (client, preferred) in [(preferred, true), (queried, false)] {
        let (response, elapsed) = answered(client).await;
        assert_eq!(response.status, StatusCode::NOT_MODIFIED);
        assert_eq!(response.header("etag"), Some(held.as_str()));
        assert_ran_out(elapsed, Duration::from_secs(2));
        assert_eq!(
            response.header("preference-applied"),
            preferred.then_some("wait=2"),
            "named only for Prefer"
        );
    }

    // Zero is no hold at all: the plain answer, a 304 for the version the client holds.
    for (path, headers) in [
        (wait_path("run_p", "0"), vec![("if-none-match", held.as_str())]),
        (
            runs_path("run_p"),
            vec![("prefer", "wait=0"), ("if-none-match", held.as_str())],
        ),
    ] {
        let started = Instant::now();
        let response = capped.send(Method::GET, &path, &headers).await;
        assert!(started.elapsed() < Duration::from_secs(1), "{path}: not held");
        assert_eq!(response.status, StatusCode::NOT_MODIFIED, "{path}");
        assert_eq!(response.x_cache(), Some("PASS"), "{path}: asked upstream");
    }
    assert_eq!(answers(&capped, "timeout").await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_share_one_watcher_and_all_get_the_change() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, fast_watch).await;
    mock.set("run_m", Reply::ok(running("run_m", 1, 100)));
    let held = version(&gateway, "run_m").await;

    let clients: Vec<_> = (0..50)
        .map(|_| long_poll(&gateway, "run_m", "20", &held))
        .collect();
    until_held(&gateway, 50).await;
    let since = Instant::now();
    let calls_before = mock.count_for("run_m");
    assert_eq!(watched_runs(&gateway).await, 1.0, "one watcher for the run");

    // Let the watcher poll a few times while all fifty wait.
    mock.wait_for_requests(mock.request_count() + 4).await;
    let elapsed = since.elapsed();
    let calls = mock.count_for("run_m") - calls_before;
    let bound = (elapsed.as_secs_f64() / POLL.as_secs_f64()).floor() as usize + 2;
    assert!(
        calls <= bound,
        "{calls} upstream calls in {elapsed:?} while fifty clients waited (at most {bound})"
    );
    let watcher_calls = mock
        .requests()
        .iter()
        .filter(|request| request.at >= since)
        .map(|request| {
            request.headers["x-request-id"]
                .to_str()
                .expect("ascii")
                .to_owned()
        })
        .collect::<Vec<_>>();
    assert!(
        watcher_calls.iter().all(|id| id.starts_with("watch-")),
        "only the watcher asks upstream while they wait: {watcher_calls:?}"
    );
    assert_eq!(watched_runs(&gateway).await, 1.0);

    let next = running("run_m", 2, 100);
    mock.set("run_m", Reply::ok(next.clone()));
    let mut versions = Vec::new();
    for client in clients {
        let (response, _) = answered(client).await;
        assert_eq!(response.status, StatusCode::OK);
        assert_eq!(response.body, next);
        versions.push(response.header("etag").expect("ETag").to_owned());
    }
    versions.dedup();
    assert_eq!(versions.len(), 1, "one new version for all: {versions:?}");
    assert_ne!(versions[0], held);
    assert_eq!(answers(&gateway, "changed").await, 50.0);
    eventually("the watcher stops once all are answered", || async {
        watched_runs(&gateway).await == 0.0
    })
    .await;
}

#[tokio::test]
async fn a_client_leaving_mid_wait_stops_the_watcher() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, fast_watch).await;
    mock.set("run_l", Reply::ok(running("run_l", 1, 100)));
    let held = version(&gateway, "run_l").await;

    let client = raw_long_poll(&gateway, "run_l", "30", &held).await;
    until_held(&gateway, 1).await;
    assert_eq!(watched_runs(&gateway).await, 1.0);
    mock.wait_for_requests(mock.request_count() + 2).await;

    drop(client);
    eventually("the client that left is no longer held", || async {
        let scrape = gateway.scrape().await;
        scrape.expect(HELD, &[("kind", "long_poll")]) == 0.0 && scrape.expect(WATCHED, &[]) == 0.0
    })
    .await;
    let calls = mock.count_for("run_l");
    // Several of the watcher's longest intervals: a watcher still running would have called.
    tokio::time::sleep(MAX_POLL * 4).await;
    assert_eq!(
        mock.count_for("run_l"),
        calls,
        "no upstream call after the watcher stopped"
    );
    assert_eq!(answers(&gateway, "timeout").await, 0.0);
}

#[tokio::test]
async fn the_watcher_outlives_its_first_client_while_others_wait() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, fast_watch).await;
    mock.set("run_o", Reply::ok(running("run_o", 1, 100)));
    let held = version(&gateway, "run_o").await;

    let first = raw_long_poll(&gateway, "run_o", "30", &held).await;
    until_held(&gateway, 1).await;
    let second = long_poll(&gateway, "run_o", "10", &held);
    until_held(&gateway, 2).await;
    assert_eq!(watched_runs(&gateway).await, 1.0);

    drop(first);
    until_held(&gateway, 1).await;
    assert_eq!(watched_runs(&gateway).await, 1.0, "the watcher keeps going");
    let calls = mock.count_for("run_o");
    eventually("the watcher still polls", || async {
        mock.count_for("run_o") >= calls + 2
    })
    .await;

    let next = running("run_o", 2, 100);
    mock.set("run_o", Reply::ok(next.clone()));
    let (response, _) = answered(second).await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.body, next);
    assert_ne!(response.header("etag"), Some(held.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_held_over_http2_all_get_the_ended_run() {
    const CLIENTS: usize = 1000;
    const CONNECTIONS: usize = 10;
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, fast_watch).await;
    mock.set("run_k", Reply::ok(running("run_k", 1, 100)));
    let held = version(&gateway, "run_k").await;

    // Ten connections of a hundred streams each (the default per-connection stream limit).
    let mut senders = Vec::new();
    for _ in 0..CONNECTIONS {
        let tcp = TcpStream::connect(gateway.public).await.expect("connect");
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .expect("HTTP/2 handshake");
        tokio::spawn(connection);
        senders.push(sender);
    }
    let uri = format!("http://{}{}", gateway.public, wait_path("run_k", "20"));
    let clients: Vec<JoinHandle<(StatusCode, HeaderMap, Bytes)>> = (0..CLIENTS)
        .map(|index| {
            let mut sender = senders[index % CONNECTIONS].clone();
            let request = Request::get(&uri)
                .header("if-none-match", &held)
                .body(Empty::<Bytes>::new())
                .expect("request");
            tokio::spawn(async move {
                sender.ready().await.expect("connection up");
                let response = sender.send_request(request).await.expect("an answer");
                let (parts, body) = response.into_parts();
                let body = body.collect().await.expect("body").to_bytes();
                (parts.status, parts.headers, body)
            })
        })
        .collect();
    until_held(&gateway, CLIENTS).await;
    assert_eq!(watched_runs(&gateway).await, 1.0);

    let body = completed("run_k");
    mock.set("run_k", Reply::ok(body.clone()));
    let started = Instant::now();
    let mut etags = Vec::new();
    for client in clients {
        let (status, headers, received) = tokio::time::timeout(PATIENCE, client)
            .await
            .expect("answered in time")
            .expect("client task");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(received, body);
        etags.push(headers["etag"].to_str().expect("ascii").to_owned());
    }
    let elapsed = started.elapsed();
    etags.dedup();
    assert_eq!(etags.len(), 1, "{etags:?}");
    assert!(is_strong(&etags[0]), "{}", etags[0]);
    assert!(elapsed < Duration::from_secs(5), "all answered in {elapsed:?}");
    assert!(
        mock.count_for("run_k") < CLIENTS / 5,
        "{} upstream calls for {CLIENTS} clients",
        mock.count_for("run_k")
    );
    let scrape = gateway.scrape().await;
    assert_eq!(scrape.expect(ANSWERS, &[("outcome", "ended")]), CLIENTS as f64);
    assert_eq!(scrape.expect(HELD, &[("kind", "long_poll")]), 0.0);
    assert_eq!(gateway.get_run("run_k").await.x_cache(), Some("HIT"));
}

#[tokio::test]
async fn an_upstream_429_wakes_no_one_and_pauses_the_watcher() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, fast_watch).await;
    mock.set("run_r", Reply::ok(running("run_r", 1, 100)));
    let held = version(&gateway, "run_r").await;

    let client = long_poll(&gateway, "run_r", "8", &held);
    until_held(&gateway, 1).await;
    mock.set(
        "run_r",
        Reply::status(
            StatusCode::TOO_MANY_REQUESTS,
            r#"{"error":{"code":"RATE_LIMITED"}}"#,
        )
        .with_header("retry-after", "1"),
    );
    until_upstream_answered(&gateway, "429").await;
    let changed_at = Instant::now();
    let next = running("run_r", 2, 100);
    mock.set("run_r", Reply::ok(next.clone()));
    assert!(!client.is_finished(), "a 429 wakes no held client");

    let (response, _) = answered(client).await;
    assert_eq!(
        response.status,
        StatusCode::OK,
        "the change, once the pause is over"
    );
    assert_eq!(response.body, next);

    // Around the switch: the last call before it was the 429; the next came only after the
    // cooldown (Retry-After: 1), not at the watcher's interval.
    let requests = mock.requests();
    let last_before = requests
        .iter()
        .filter(|request| request.at < changed_at)
        .map(|request| request.at)
        .max()
        .expect("calls before the switch");
    let first_after = requests
        .iter()
        .filter(|request| request.at >= changed_at)
        .map(|request| request.at)
        .min()
        .expect("a call after the switch");
    let pause = first_after - last_before;
    assert!(
        pause >= Duration::from_millis(950),
        "no upstream call during the cooldown; the next came after {pause:?}"
    );
    let scrape = gateway.scrape().await;
    assert_eq!(
        scrape.expect(
            "plextera_gateway_upstream_budget_refusals_total",
            &[("reason", "cooldown")]
        ),
        0.0,
        "the watcher waited the cooldown out instead of trying and being refused"
    );
    assert_eq!(scrape.expect(ANSWERS, &[("outcome", "error")]), 0.0);
    assert_eq!(scrape.expect(ANSWERS, &[("outcome", "changed")]), 1.0);
}

/// A gateway whose watcher, once a client is held, gets `failure` from upstream (seen as an
/// upstream answer labelled `code`): the held client is answered 304 at its deadline.
async fn a_transient_failure_ends_no_wait(failure: Reply, code: &str, adjust: fn(&mut Config)) {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| {
        fast_watch(config);
        adjust(config);
    })
    .await;
    mock.set("run_x", Reply::ok(running("run_x", 1, 100)));
    let held = version(&gateway, "run_x").await;
    let wait = Duration::from_millis(1500);

    let client = long_poll(&gateway, "run_x", "1500ms", &held);
    until_held(&gateway, 1).await;
    mock.set("run_x", failure);
    until_upstream_answered(&gateway, code).await;
    assert!(!client.is_finished(), "{code}: still held after the failure");

    let (response, elapsed) = answered(client).await;
    assert_eq!(response.status, StatusCode::NOT_MODIFIED, "{code}");
    assert_eq!(response.header("etag"), Some(held.as_str()), "{code}");
    assert_ran_out(elapsed, wait);
    let scrape = gateway.scrape().await;
    assert_eq!(scrape.expect(ANSWERS, &[("outcome", "timeout")]), 1.0, "{code}");
    assert_eq!(scrape.expect(ANSWERS, &[("outcome", "error")]), 0.0, "{code}");
}

#[tokio::test]
async fn transient_upstream_failures_never_end_a_wait() {
    let never = Gate::new();
    tokio::join!(
        a_transient_failure_ends_no_wait(
            Reply::status(StatusCode::INTERNAL_SERVER_ERROR, r#"{"error":{}}"#),
            "500",
            |_| {}
        ),
        a_transient_failure_ends_no_wait(
            Reply::status(StatusCode::SERVICE_UNAVAILABLE, r#"{"error":{}}"#),
            "503",
            |_| {}
        ),
        a_transient_failure_ends_no_wait(
            Reply::status(StatusCode::TOO_MANY_REQUESTS, r#"{"error":{}}"#).with_header("retry-after", "1"),
            "429",
            |_| {}
        ),
        a_transient_failure_ends_no_wait(
            Reply::ok(running("run_x", 2, 100)).gated(&never),
            "timeout",
            |config| config.upstream.request_timeout = Duration::from_millis(300)
        ),
    );
}

#[tokio::test]
async fn a_404_while_held_ends_the_wait_with_the_404() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, fast_watch).await;
    mock.set("run_g", Reply::ok(running("run_g", 1, 100)));
    let held = version(&gateway, "run_g").await;

    let client = long_poll(&gateway, "run_g", "10", &held);
    until_held(&gateway, 1).await;
    mock.set(
        "run_g",
        Reply::status(
            StatusCode::NOT_FOUND,
            r#"{"error":{"code":"NOT_FOUND","message":"run deleted"}}"#,
        ),
    );
    let (response, elapsed) = answered(client).await;
    assert_eq!(response.status, StatusCode::NOT_FOUND);
    assert_eq!(response.error_code(), "NOT_FOUND");
    assert!(response.header("etag").is_none());
    assert!(elapsed < Duration::from_secs(10), "not at the deadline");
    assert_eq!(answers(&gateway, "error").await, 1.0);
    eventually("the watch stops on the 404", || async {
        watched_runs(&gateway).await == 0.0
    })
    .await;
}

#[tokio::test]
async fn a_refused_key_while_held_is_a_502_upstream_auth() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, fast_watch).await;
    mock.set("run_u", Reply::ok(running("run_u", 1, 100)));
    let held = version(&gateway, "run_u").await;

    let client = long_poll(&gateway, "run_u", "10", &held);
    until_held(&gateway, 1).await;
    mock.set(
        "run_u",
        Reply::status(StatusCode::UNAUTHORIZED, r#"{"error":{"code":"UNAUTHORIZED"}}"#),
    );
    let (response, _) = answered(client).await;
    assert_eq!(response.status, StatusCode::BAD_GATEWAY);
    assert_eq!(response.header("content-type"), Some("application/json"));
    assert_eq!(response.error_code(), "UPSTREAM_AUTH");
    assert!(!response.everything().contains(support::TEST_KEY));
    assert_eq!(answers(&gateway, "error").await, 1.0);
    eventually("the watch stops on the refused key", || async {
        watched_runs(&gateway).await == 0.0
    })
    .await;
}

#[tokio::test]
async fn a_ticking_duration_is_not_a_new_version() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, fast_watch).await;
    mock.set("run_d", Reply::ok(running("run_d", 1, 100)));
    let held = version(&gateway, "run_d").await;
    let wait = Duration::from_secs(3);

    let client = long_poll(&gateway, "run_d", "3", &held);
    until_held(&gateway, 1).await;
    for duration_ms in [1_100, 2_100] {
        mock.set("run_d", Reply::ok(running("run_d", 1, duration_ms)));
        // Two calls after the switch: at least one was answered with this body.
        let calls = mock.count_for("run_d");
        eventually("the watcher fetches the ticked body", || async {
            mock.count_for("run_d") >= calls + 2
        })
        .await;
    }
    assert!(!client.is_finished(), "a ticking duration wakes no one");
    let (response, elapsed) = answered(client).await;
    assert_eq!(response.status, StatusCode::NOT_MODIFIED);
    assert_eq!(response.header("etag"), Some(held.as_str()));
    assert_ran_out(elapsed, wait);
    assert_eq!(answers(&gateway, "changed").await, 0.0);
}

#[tokio::test]
async fn past_max_held_clients_get_503_too_many_waiters() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| {
        fast_watch(config);
        config.watch.max_held = 2;
    })
    .await;
    mock.set("run_h", Reply::ok(running("run_h", 1, 100)));
    let held = version(&gateway, "run_h").await;

    let clients = [
        long_poll(&gateway, "run_h", "10", &held),
        long_poll(&gateway, "run_h", "10", &held),
    ];
    until_held(&gateway, 2).await;
    let refused = gateway
        .send(
            Method::GET,
            &wait_path("run_h", "10"),
            &[("if-none-match", &held)],
        )
        .await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.header("content-type"), Some("application/json"));
    assert_eq!(refused.error_code(), "TOO_MANY_WAITERS");
    let retry_after: u64 = refused
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!(retry_after >= 1);
    // A version the watcher has not seen would need a call of its own: none is made for a client
    // that could not then be held.
    let calls = mock.count_for("run_h");
    let unseen = gateway
        .send(
            Method::GET,
            &wait_path("run_h", "10"),
            &[("if-none-match", "W/\"unseen\"")],
        )
        .await;
    assert_eq!(unseen.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(unseen.error_code(), "TOO_MANY_WAITERS");
    assert!(
        mock.count_for("run_h") <= calls + 1,
        "at most the watcher's own poll meanwhile"
    );
    // Requests that are not held are served as ever.
    assert_eq!(gateway.get_run("run_h").await.status, StatusCode::OK);
    let unheld = gateway.send(Method::GET, &wait_path("run_h", "10"), &[]).await;
    assert_eq!(unheld.status, StatusCode::OK);
    assert_eq!(held_long_polls(&gateway).await, 2.0);

    // Once they are answered, their places are free again.
    let next = running("run_h", 2, 100);
    mock.set("run_h", Reply::ok(next.clone()));
    for client in clients {
        let (response, _) = answered(client).await;
        assert_eq!(response.status, StatusCode::OK);
        assert_eq!(response.body, next);
    }
    let current = version(&gateway, "run_h").await;
    let again = long_poll(&gateway, "run_h", "10", &current);
    until_held(&gateway, 1).await;
    mock.set("run_h", Reply::ok(running("run_h", 3, 100)));
    assert_eq!(answered(again).await.0.status, StatusCode::OK);
}

#[tokio::test]
async fn shutdown_answers_held_long_polls_at_once() {
    let mock = MockUpstream::start().await;
    let mut gateway = TestGateway::start(&mock, |config| {
        fast_watch(config);
        config.server.shutdown_grace = Duration::from_secs(10);
    })
    .await;
    mock.set("run_z", Reply::ok(running("run_z", 1, 100)));
    let held = version(&gateway, "run_z").await;
    let clients: Vec<_> = (0..3)
        .map(|_| long_poll(&gateway, "run_z", "30", &held))
        .collect();
    until_held(&gateway, 3).await;
    // A request still in flight keeps the drain (and so the admin port) going while we look.
    let (gate, slow) = request_held_upstream(&gateway, &mock).await;

    gateway.begin_shutdown();
    let started = Instant::now();
    for client in clients {
        let (response, _) = answered(client).await;
        assert_eq!(response.status, StatusCode::NOT_MODIFIED);
        assert_eq!(response.header("etag"), Some(held.as_str()));
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered at once, not at their 30 s deadline: {:?}",
        started.elapsed()
    );
    eventually("the watcher stops on shutdown", || async {
        watched_runs(&gateway).await == 0.0
    })
    .await;
    let scrape = gateway.scrape().await;
    assert_eq!(scrape.expect(ANSWERS, &[("outcome", "shutdown")]), 3.0);
    assert_eq!(scrape.expect(ANSWERS, &[("outcome", "timeout")]), 0.0);
    assert_eq!(scrape.expect(HELD, &[("kind", "long_poll")]), 0.0);

    gate.open();
    assert_eq!(slow.await.expect("client task").status, StatusCode::OK);
    gateway.stopped().await;
}

#[tokio::test]
async fn plain_gets_still_go_upstream_while_a_watcher_runs() {
    let mock = MockUpstream::start().await;
    // A watcher that does not poll during the test: every call counted is a plain GET's.
    let gateway = TestGateway::start(&mock, |config| {
        config.watch.poll_interval = Duration::from_secs(5);
        config.watch.max_poll_interval = Duration::from_secs(10);
    })
    .await;
    mock.set("run_w", Reply::ok(running("run_w", 1, 100)));
    let held = version(&gateway, "run_w").await;
    let client = raw_long_poll(&gateway, "run_w", "30", &held).await;
    until_held(&gateway, 1).await;
    assert_eq!(watched_runs(&gateway).await, 1.0);

    let calls = mock.count_for("run_w");
    for progress in [2, 3] {
        let body = running("run_w", progress, 100);
        mock.set("run_w", Reply::ok(body.clone()));
        let plain = gateway.get_run("run_w").await;
        assert_eq!(plain.status, StatusCode::OK);
        assert_eq!(
            plain.body, body,
            "upstream's current body, not the watcher's snapshot"
        );
        assert_eq!(plain.x_cache(), Some("PASS"));
    }
    assert_eq!(mock.count_for("run_w"), calls + 2, "each plain GET went upstream");
    drop(client);
}

#[tokio::test]
async fn held_requests_read_the_watchers_state_and_only_a_version_it_has_not_seen_costs_a_call() {
    let mock = MockUpstream::start().await;
    // A watcher that does not poll during the test.
    let gateway = TestGateway::start(&mock, |config| {
        config.watch.poll_interval = Duration::from_secs(5);
        config.watch.max_poll_interval = Duration::from_secs(10);
    })
    .await;
    let first = running("run_v", 1, 100);
    mock.set("run_v", Reply::ok(first.clone()));
    let held = version(&gateway, "run_v").await;
    let _client = raw_long_poll(&gateway, "run_v", "30", &held).await;
    until_held(&gateway, 1).await;
    let calls = mock.count_for("run_v");

    // A long-poll for a version the watcher has not seen (older, newer or another replica's):
    // answered at once from a call of its own, never with a state older than the client's.
    let stale = gateway
        .send(
            Method::GET,
            &wait_path("run_v", "10"),
            &[("if-none-match", "W/\"00000000000000000000000000000000\"")],
        )
        .await;
    assert_eq!(stale.status, StatusCode::OK);
    assert_eq!(stale.body, first);
    assert_eq!(stale.header("etag"), Some(held.as_str()));
    assert_eq!(mock.count_for("run_v"), calls + 1, "a call of its own");
    let calls = calls + 1;
    // A client's first long-poll, with no version yet: answered at once with the watcher's state.
    let first_look = gateway.send(Method::GET, &wait_path("run_v", "10"), &[]).await;
    assert_eq!(first_look.status, StatusCode::OK);
    assert_eq!(first_look.body, first);
    assert_eq!(first_look.header("etag"), Some(held.as_str()));
    // A stream with no version of its own: its first frame is the watcher's state.
    let mut stream = support::sse::open(gateway.public, &runs_path("run_v"), &[]).await;
    assert_eq!(stream.status, StatusCode::OK);
    assert_eq!(stream.expect_event().await.retry.as_deref(), Some("3000"));
    let frame = stream.expect_event().await;
    assert_eq!(frame.id(), held);
    assert_eq!(frame.data.as_deref().map(str::as_bytes), Some(&first[..]));
    // Another long-poll on the version it holds: held alongside, on the same watcher.
    let another = long_poll(&gateway, "run_v", "10", &held);
    until_held(&gateway, 2).await;
    assert_eq!(watched_runs(&gateway).await, 1.0);

    assert_eq!(
        mock.count_for("run_v"),
        calls,
        "none of them made an upstream call of its own"
    );
    drop(stream);
    another.abort();
}

#[tokio::test]
async fn the_last_client_leaving_stops_its_watcher_without_another_call() {
    let mock = MockUpstream::start().await;
    // A watcher whose first poll is a second away: the client leaves before it.
    let interval = Duration::from_secs(1);
    let gateway = TestGateway::start(&mock, |config| {
        config.watch.poll_interval = interval;
        config.watch.max_poll_interval = interval;
    })
    .await;
    mock.set("run_q", Reply::ok(running("run_q", 1, 100)));
    let held = version(&gateway, "run_q").await;
    let client = raw_long_poll(&gateway, "run_q", "30", &held).await;
    until_held(&gateway, 1).await;
    assert_eq!(watched_runs(&gateway).await, 1.0);
    let calls = mock.count_for("run_q");

    let left = Instant::now();
    drop(client);
    until_held(&gateway, 0).await;
    eventually("the watcher stops", || async {
        watched_runs(&gateway).await == 0.0
    })
    .await;
    let stopped = left.elapsed();
    // At the latest at its next turn (the interval, +10 % jitter), with scheduling slack.
    assert!(
        stopped <= interval.mul_f64(1.1) + LATE,
        "stopped {stopped:?} after its last client left"
    );
    assert_eq!(
        mock.count_for("run_q"),
        calls,
        "no call for a run no one waits on"
    );
}

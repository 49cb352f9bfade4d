//! Watchers and the upstream budget: with `upstream.max_requests_per_second` set, the watchers of
//! many runs share three quarters of it. Each run's poll interval stretches to (watched runs ÷ ¾
//! of the rate), alike for every run, so the watchers together stay within the rate without
//! queueing past `queue_timeout` (no refusals), leave room for other requests, and starve no run.

mod support;

use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use support::{MockUpstream, Reply, TestClient, TestGateway, eventually, run_body, runs_path};

const RUNS: usize = 8;
const RATE: f64 = 8.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_of_many_runs_share_the_rate_budget_fairly_and_are_never_refused() {
    let mock = MockUpstream::start().await;
    let ids: Vec<String> = (0..RUNS).map(|index| format!("budget_{index}")).collect();
    for id in &ids {
        mock.set(id, Reply::ok(run_body(id, "PROCESSING", 0)));
    }
    let gateway = TestGateway::start(&mock, |config| {
        config.upstream.max_requests_per_second = Some(RATE);
        config.upstream.queue_timeout = Duration::from_secs(1);
        // Left alone, each watcher would poll ten times a second: 80 calls/s against a budget of 8.
        config.watch.poll_interval = Duration::from_millis(100);
        config.watch.max_poll_interval = Duration::from_millis(100);
    })
    .await;

    // Learn each run's version, then hold a long-poll on each with it, one after the other (each
    // start costs a call: the version is checked upstream before the client is held), until every
    // run has a watcher.
    let client = TestClient::new();
    let mut held = Vec::new();
    for (index, id) in ids.iter().enumerate() {
        let first = gateway.get_run(id).await;
        assert_eq!(first.status, StatusCode::OK, "{}", first.everything());
        let etag = first.header("etag").expect("a version").to_owned();
        let url = gateway.url(&format!("{}?wait=60s", runs_path(id)));
        let client = client.clone();
        held.push(tokio::spawn(async move {
            client
                .send(Method::GET, &url, &[("if-none-match", etag.as_str())])
                .await
        }));
        eventually("the long-poll is held", || async {
            gateway
                .scrape()
                .await
                .expect("plextera_gateway_held_requests", &[("kind", "long_poll")])
                == (index + 1) as f64
        })
        .await;
    }
    assert_eq!(
        gateway
            .scrape()
            .await
            .expect("plextera_gateway_watched_runs", &[]),
        RUNS as f64
    );

    let refusals = |scrape: &support::prom::Scrape| {
        scrape.expect(
            "plextera_gateway_upstream_budget_refusals_total",
            &[("reason", "exhausted")],
        )
    };
    let refused_before = refusals(&gateway.scrape().await);
    let before: Vec<usize> = ids.iter().map(|id| mock.count_for(id)).collect();
    let started = Instant::now();
    // The window observed: long enough for every stretched interval (8 runs ÷ 6/s = 1.33 s) to
    // pass about three times.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let polls: Vec<usize> = ids
        .iter()
        .zip(&before)
        .map(|(id, before)| mock.count_for(id) - before)
        .collect();
    let total: usize = polls.iter().sum();

    let refused = refusals(&gateway.scrape().await) - refused_before;
    assert_eq!(
        refused, 0.0,
        "watchers wait their turn instead of being refused: {polls:?}"
    );
    assert!(
        total as f64 <= RATE * 0.75 * elapsed * 1.15 + 2.0,
        "{total} calls in {elapsed:.2}s: the watchers take more than their share of {RATE}/s: {polls:?}"
    );
    let (fewest, most) = (
        polls.iter().min().copied().unwrap_or(0),
        polls.iter().max().copied().unwrap_or(0),
    );
    assert!(fewest >= 2, "every run is polled, none starved: {polls:?}");
    assert!(most - fewest <= 2, "runs share the budget alike: {polls:?}");
    // Without stretching, 80 polls/s would have been wanted; with it, about 6/s.
    assert!(
        total >= 16,
        "the watchers' share is used, not left idle: {polls:?}"
    );
    for request in held {
        request.abort();
    }
}

//! The upstream budget: a rate, a concurrency bound, and upstream's own 429s.

mod support;

use std::num::NonZeroUsize;
use std::time::Duration;

use http::{Method, StatusCode};
use support::{Gate, MockUpstream, Reply, TestClient, TestGateway, eventually, runs_path};

fn get_all(gateway: &TestGateway, ids: &[String]) -> Vec<tokio::task::JoinHandle<support::TestResponse>> {
    ids.iter()
        .map(|id| {
            let url = gateway.url(&runs_path(id));
            tokio::spawn(async move { TestClient::new().send(Method::GET, &url, &[]).await })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_budget_holds_under_a_burst() {
    const RATE: usize = 20;
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| {
        config.upstream.max_requests_per_second = Some(RATE as f64);
        config.upstream.queue_timeout = Duration::from_secs(30);
    })
    .await;
    let ids: Vec<String> = (0..2 * RATE).map(|index| format!("run_{index}")).collect();
    for id in &ids {
        mock.set(id, Reply::run(id, "PROCESSING"));
    }
    for client in get_all(&gateway, &ids) {
        assert_eq!(
            client.await.expect("client").status,
            StatusCode::OK,
            "queued, not refused"
        );
    }
    let mut arrivals: Vec<_> = mock.requests().iter().map(|request| request.at).collect();
    arrivals.sort();
    assert_eq!(arrivals.len(), 2 * RATE);
    // No one-second window holds more than RATE calls (plus the one on its edge).
    for window in arrivals.windows(RATE + 2) {
        let span = window[RATE + 1] - window[0];
        assert!(
            span >= Duration::from_secs(1),
            "{} calls within {span:?}",
            RATE + 2
        );
    }
}

#[tokio::test]
async fn a_spent_budget_answers_429_without_calling_upstream() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| {
        config.upstream.max_requests_per_second = Some(1.0);
        config.upstream.queue_timeout = Duration::from_millis(50);
    })
    .await;
    mock.set("first", Reply::run("first", "PROCESSING"));
    mock.set("second", Reply::run("second", "PROCESSING"));
    assert_eq!(gateway.get_run("first").await.status, StatusCode::OK);
    let refused = gateway.get_run("second").await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.error_code(), "GATEWAY_RATE_LIMITED");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(refused.json()["error"]["retryable"], true);
    assert_eq!(refused.header("cache-control"), Some("no-store"));
    assert_eq!(mock.count_for("second"), 0, "refused before upstream");
    let scrape = gateway.scrape().await;
    assert_eq!(
        scrape.expect(
            "plextera_gateway_upstream_budget_refusals_total",
            &[("reason", "exhausted")]
        ),
        1.0
    );
}

#[tokio::test]
async fn hits_and_coalesced_waiters_spend_no_budget() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| {
        config.upstream.max_requests_per_second = Some(0.01);
        config.upstream.queue_timeout = Duration::from_millis(50);
    })
    .await;
    let gate = Gate::new();
    mock.set("done", Reply::run("done", "COMPLETED").gated(&gate));
    let clients = get_all(&gateway, &vec!["done".to_owned(); 10]);
    mock.wait_for_requests(1).await;
    gateway.wait_for_waiters(9).await;
    gate.open();
    for client in clients {
        assert_eq!(client.await.expect("client").status, StatusCode::OK);
    }
    for _ in 0..50 {
        assert_eq!(gateway.get_run("done").await.x_cache(), Some("HIT"));
    }
    // The one token went to the one upstream call; anything else is refused.
    assert_eq!(
        gateway.get_run("other").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_bound_keeps_extra_calls_from_upstream() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| {
        config.upstream.max_concurrent_requests = NonZeroUsize::new(2);
        config.upstream.queue_timeout = Duration::from_millis(200);
    })
    .await;
    let gate = Gate::new();
    let ids: Vec<String> = (0..5).map(|index| format!("slow_{index}")).collect();
    for id in &ids {
        mock.set(id, Reply::run(id, "PROCESSING").gated(&gate));
    }
    let clients = get_all(&gateway, &ids);
    mock.wait_for_requests(2).await;
    // Three calls wait for a slot, then give up, while upstream still holds the first two.
    eventually("three requests are refused", || async {
        gateway.scrape().await.expect(
            "plextera_gateway_upstream_budget_refusals_total",
            &[("reason", "exhausted")],
        ) == 3.0
    })
    .await;
    assert_eq!(mock.request_count(), 2, "never more than two calls in flight");
    gate.open();
    let (mut served, mut refused) = (0, 0);
    for client in clients {
        match client.await.expect("client").status {
            StatusCode::OK => served += 1,
            StatusCode::TOO_MANY_REQUESTS => refused += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((served, refused), (2, 3));
}

#[tokio::test]
async fn an_upstream_429_holds_every_upstream_call_while_hits_continue() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    mock.set("done", Reply::run("done", "COMPLETED"));
    assert_eq!(gateway.get_run("done").await.x_cache(), Some("MISS"));
    mock.set(
        "busy",
        Reply::status(
            StatusCode::TOO_MANY_REQUESTS,
            r#"{"error":{"code":"RATE_LIMITED"}}"#,
        )
        .with_header("retry-after", "1"),
    );
    mock.set("other", Reply::run("other", "PROCESSING"));

    let busy = gateway.get_run("busy").await;
    assert_eq!(busy.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(busy.header("retry-after"), Some("1"));

    let held = gateway.get_run("other").await;
    assert_eq!(held.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(held.error_code(), "UPSTREAM_RATE_LIMITED");
    assert_eq!(held.header("retry-after"), Some("1"));
    assert_eq!(mock.count_for("other"), 0, "held, not sent");
    assert_eq!(
        gateway.get_run("done").await.x_cache(),
        Some("HIT"),
        "hits are still served"
    );

    let scrape = gateway.scrape().await;
    let cooldown = scrape.expect("plextera_gateway_upstream_cooldown_seconds", &[]);
    assert!(cooldown > 0.0 && cooldown <= 1.0, "cooldown gauge {cooldown}");
    assert_eq!(
        scrape.expect(
            "plextera_gateway_upstream_budget_refusals_total",
            &[("reason", "cooldown")]
        ),
        1.0
    );

    eventually("upstream calls resume after Retry-After", || async {
        gateway.get_run("other").await.status == StatusCode::OK
    })
    .await;
    assert_eq!(mock.count_for("other"), 1, "no call went out during the cooldown");
    assert_eq!(mock.count_for("busy"), 1);
    assert_eq!(
        gateway
            .scrape()
            .await
            .expect("plextera_gateway_upstream_cooldown_seconds", &[]),
        0.0
    );
}

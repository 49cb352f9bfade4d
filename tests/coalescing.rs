//! Single flight: concurrent requests for one run share one upstream call.

mod support;

use http::{Method, StatusCode};
use support::{Gate, MockUpstream, Reply, TestClient, TestGateway, run_body, runs_path};
use tokio::task::JoinHandle;

/// Starts `count` concurrent GETs for a run, each on its own connection.
fn spawn_gets(gateway: &TestGateway, id: &str, count: usize) -> Vec<JoinHandle<support::TestResponse>> {
    (0..count)
        .map(|_| {
            let url = gateway.url(&runs_path(id));
            tokio::spawn(async move { TestClient::new().send(Method::GET, &url, &[]).await })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_cold_requests_for_a_terminal_run_make_one_upstream_call() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    let gate = Gate::new();
    let body = run_body("slow", "COMPLETED", 2048);
    mock.set("slow", Reply::ok(body.clone()).gated(&gate));

    let clients = spawn_gets(&gateway, "slow", 100);
    mock.wait_for_requests(1).await;
    gateway.wait_for_waiters(99).await;
    gate.open();
    for client in clients {
        let response = client.await.expect("client task");
        assert_eq!(response.status, StatusCode::OK);
        assert_eq!(response.body, body, "every client gets the same bytes");
        assert_eq!(response.x_cache(), Some("MISS"));
    }
    assert_eq!(mock.count_for("slow"), 1, "exactly one upstream call");
    assert_eq!(gateway.get_run("slow").await.x_cache(), Some("HIT"));

    let scrape = gateway.scrape().await;
    assert_eq!(
        scrape.expect("plextera_gateway_coalesced_requests_total", &[]),
        99.0
    );
    let requests = "plextera_gateway_requests_total";
    assert_eq!(
        scrape.expect(requests, &[("cache", "coalesced"), ("code", "200")]),
        99.0
    );
    assert_eq!(
        scrape.expect(requests, &[("cache", "miss"), ("code", "200")]),
        1.0
    );
    assert_eq!(scrape.expect("plextera_gateway_coalesced_waiters", &[]), 0.0);
    assert_eq!(
        scrape.expect("plextera_gateway_run_status_total", &[("status", "COMPLETED")]),
        101.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_polls_of_a_running_run_share_one_call_and_nothing_is_reused_after() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    let gate = Gate::new();
    mock.set("live", Reply::run("live", "PROCESSING").gated(&gate));

    let clients = spawn_gets(&gateway, "live", 50);
    mock.wait_for_requests(1).await;
    gateway.wait_for_waiters(49).await;
    gate.open();
    for client in clients {
        let response = client.await.expect("client task");
        assert_eq!(response.status, StatusCode::OK);
        assert_eq!(response.json()["status"], "PROCESSING");
        assert_eq!(response.x_cache(), Some("PASS"));
        assert_eq!(response.header("cache-control"), Some("no-store"));
    }
    assert_eq!(mock.count_for("live"), 1);

    // The call has ended: the next poll is a fresh call, never the old answer.
    mock.set("live", Reply::run("live", "COMPLETED"));
    let next = gateway.get_run("live").await;
    assert_eq!(next.json()["status"], "COMPLETED");
    assert_eq!(mock.count_for("live"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_going_away_does_not_cancel_the_call_for_the_others() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    let gate = Gate::new();
    mock.set("slow", Reply::run("slow", "COMPLETED").gated(&gate));

    let leader = spawn_gets(&gateway, "slow", 1).remove(0);
    mock.wait_for_requests(1).await;
    let waiters = spawn_gets(&gateway, "slow", 10);
    gateway.wait_for_waiters(10).await;
    leader.abort(); // drops the leader's connection mid-flight
    assert!(leader.await.is_err_and(|error| error.is_cancelled()));
    gate.open();
    for waiter in waiters {
        let response = waiter.await.expect("waiter task");
        assert_eq!(response.status, StatusCode::OK);
        assert_eq!(response.json()["id"], "slow");
    }
    assert_eq!(mock.count_for("slow"), 1);
    assert_eq!(
        gateway.get_run("slow").await.x_cache(),
        Some("HIT"),
        "the shared call still stored the run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_fetched_with_every_client_gone_is_still_stored() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    let gate = Gate::new();
    mock.set("slow", Reply::run("slow", "COMPLETED").gated(&gate));
    let only = spawn_gets(&gateway, "slow", 1).remove(0);
    mock.wait_for_requests(1).await;
    only.abort();
    let _ = only.await;
    gate.open();
    support::eventually("the abandoned call stores the run", || async {
        gateway
            .scrape()
            .await
            .expect("plextera_gateway_cache_entries", &[])
            == 1.0
    })
    .await;
    assert_eq!(gateway.get_run("slow").await.x_cache(), Some("HIT"));
    assert_eq!(mock.count_for("slow"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_call_fails_all_its_waiters_and_the_next_request_tries_again() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    let gate = Gate::new();
    mock.set("flaky", Reply::Abort.gated(&gate));

    let clients = spawn_gets(&gateway, "flaky", 20);
    mock.wait_for_requests(1).await;
    gateway.wait_for_waiters(19).await;
    gate.open();
    for client in clients {
        let response = client.await.expect("client task");
        assert_eq!(response.status, StatusCode::BAD_GATEWAY);
        assert_eq!(response.error_code(), "UPSTREAM_UNAVAILABLE");
        assert!(response.json()["error"]["requestId"].is_string());
    }
    assert_eq!(mock.count_for("flaky"), 1);

    mock.set("flaky", Reply::run("flaky", "COMPLETED"));
    assert_eq!(
        gateway.get_run("flaky").await.x_cache(),
        Some("MISS"),
        "the failure was not reused"
    );
    assert_eq!(mock.count_for("flaky"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_runs_are_never_coalesced() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    let gate = Gate::new();
    for id in ["a", "b", "c"] {
        mock.set(id, Reply::run(id, "PROCESSING").gated(&gate));
    }
    let clients: Vec<_> = ["a", "b", "c"]
        .iter()
        .flat_map(|id| spawn_gets(&gateway, id, 2))
        .collect();
    mock.wait_for_requests(3).await;
    gateway.wait_for_waiters(3).await;
    gate.open();
    let mut ids: Vec<String> = Vec::new();
    for client in clients {
        ids.push(
            client.await.expect("client").json()["id"]
                .as_str()
                .expect("id")
                .to_owned(),
        );
    }
    assert_eq!(ids, ["a", "a", "b", "b", "c", "c"]);
    assert_eq!(mock.request_count(), 3);
}

//! The admin port's purge: `DELETE /cache/runs/{runId}` and `DELETE /cache/not-found/{runId}`,
//! on one replica and across two sharing a private `redis-server`.

mod support;

use std::time::Duration;

use http::{Method, StatusCode};
use redis::AsyncCommands;
use support::redis_server::RedisServer;
use support::{Gate, MockUpstream, Reply, TestClient, TestGateway, TestResponse, eventually, run_body};

const PREFIX: &str = "purge-test:";
const EXPLICIT: &str = "plextera_gateway_cache_evictions_total";

async fn purge(gateway: &TestGateway, path: &str) -> TestResponse {
    admin(gateway, Method::DELETE, path).await
}

async fn admin(gateway: &TestGateway, method: Method, path: &str) -> TestResponse {
    TestClient::new()
        .send(method, &format!("http://{}{path}", gateway.admin), &[])
        .await
}

async fn explicit_evictions(gateway: &TestGateway) -> f64 {
    gateway.scrape().await.expect(EXPLICIT, &[("cause", "explicit")])
}

async fn replica(mock: &MockUpstream, redis: &RedisServer) -> TestGateway {
    let shared = redis.shared_config(PREFIX);
    let replica = TestGateway::start(mock, move |config| {
        config.cache.shared = Some(shared);
        config.cache.not_found_ttl = Duration::from_secs(3600);
    })
    .await;
    // Purges reach a replica through its subscription, which starts with the gateway.
    eventually("the replica is subscribed to the fleet's channel", || async {
        replica
            .scrape()
            .await
            .expect("plextera_gateway_fleet_subscribed", &[])
            == 1.0
    })
    .await;
    replica
}

async fn stored_value(redis: &RedisServer, id: &str) -> Option<Vec<u8>> {
    redis
        .client()
        .await
        .get(format!("{PREFIX}run:{id}"))
        .await
        .expect("GET")
}

#[tokio::test]
async fn a_purge_drops_an_ended_run_from_both_replicas_and_from_redis() {
    let redis = RedisServer::start(&[]);
    let mock = MockUpstream::start().await;
    let wrong = run_body("done", "COMPLETED", 300);
    mock.set("done", Reply::ok(wrong.clone()));
    let a = replica(&mock, &redis).await;
    let b = replica(&mock, &redis).await;
    assert_eq!(a.get_run("done").await.x_cache(), Some("MISS"));
    eventually("the run is in Redis", || async {
        stored_value(&redis, "done").await.is_some()
    })
    .await;
    for replica in [&a, &b, &a, &b] {
        let response = replica.get_run("done").await;
        assert_eq!(response.x_cache(), Some("HIT"));
        assert_eq!(response.body, wrong);
    }
    assert_eq!(mock.count_for("done"), 1);

    // Plextera corrects the run; the operator purges it on one replica.
    let corrected = run_body("done", "FAILED", 400);
    mock.set("done", Reply::ok(corrected.clone()));
    let response = purge(&a, "/cache/runs/done").await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.header("content-type"), Some("application/json"));
    assert_eq!(
        response.json(),
        serde_json::json!({
            "runId": "done",
            "scope": "run",
            "removed": {"memory": true, "shared": true},
            "replicasTold": true,
        })
    );
    assert_eq!(stored_value(&redis, "done").await, None, "gone from Redis");
    let scrape = a.scrape().await;
    assert_eq!(scrape.expect(EXPLICIT, &[("cause", "explicit")]), 1.0);
    assert_eq!(
        scrape.expect(
            "plextera_gateway_shared_cache_duration_seconds_count",
            &[("op", "purge")]
        ),
        2.0,
        "deleted before the other replicas were told, and once more after"
    );
    eventually("the other replica dropped its copy too", || async {
        explicit_evictions(&b).await == 1.0
    })
    .await;

    // Neither replica serves the old copy: B asks upstream again, A finds B's fresh copy.
    let from_b = b.get_run("done").await;
    assert_eq!(from_b.x_cache(), Some("MISS"));
    assert_eq!(from_b.body, corrected);
    let from_a = a.get_run("done").await;
    assert_eq!(from_a.body, corrected);
    assert_eq!(from_a.x_cache(), Some("HIT"), "through Redis");
    assert_eq!(mock.count_for("done"), 2, "one more upstream call, fleet-wide");

    // Purged again where nothing is left to purge: said so, still a success.
    b.get_run("done").await;
    let again = purge(&a, "/cache/runs/done").await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.json()["removed"]["shared"], true);
    let nothing = purge(&a, "/cache/runs/never_stored").await;
    assert_eq!(nothing.status, StatusCode::OK);
    assert_eq!(
        nothing.json()["removed"],
        serde_json::json!({"memory": false, "shared": false})
    );
}

#[tokio::test]
async fn a_not_found_purge_drops_a_remembered_404_on_both_replicas() {
    let redis = RedisServer::start(&[]);
    let mock = MockUpstream::start().await;
    let a = replica(&mock, &redis).await;
    let b = replica(&mock, &redis).await;
    for replica in [&a, &b, &a, &b] {
        assert_eq!(replica.get_run("later").await.status, StatusCode::NOT_FOUND);
    }
    assert_eq!(mock.count_for("later"), 2, "each replica remembers its own 404");
    // The run appears upstream (created in another region, say).
    mock.set("later", Reply::run("later", "COMPLETED"));
    let response = purge(&a, "/cache/not-found/later").await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(
        response.json(),
        serde_json::json!({
            "runId": "later",
            "scope": "not_found",
            "removed": {"memory": true, "shared": null},
            "replicasTold": true,
        })
    );
    eventually("the other replica forgot its 404 too", || async {
        explicit_evictions(&b).await == 1.0
    })
    .await;
    assert_eq!(explicit_evictions(&a).await, 1.0);
    assert_eq!(a.get_run("later").await.status, StatusCode::OK);
    assert_eq!(b.get_run("later").await.status, StatusCode::OK);
    assert_eq!(mock.count_for("later"), 3, "fetched again, once for the fleet");
}

#[tokio::test]
async fn without_redis_a_purge_drops_the_memory_copy_and_only_what_it_names() {
    let mock = MockUpstream::start().await;
    mock.set("done", Reply::run("done", "COMPLETED"));
    let gateway = TestGateway::start(&mock, |config| {
        config.cache.not_found_ttl = Duration::from_secs(3600);
    })
    .await;
    gateway.get_run("done").await;
    assert_eq!(gateway.get_run("done").await.x_cache(), Some("HIT"));

    // A 404 purge leaves an ended run alone.
    let kept = purge(&gateway, "/cache/not-found/done").await;
    assert_eq!(kept.status, StatusCode::OK);
    assert_eq!(
        kept.json(),
        serde_json::json!({
            "runId": "done",
            "scope": "not_found",
            "removed": {"memory": false, "shared": null},
            "replicasTold": null,
        })
    );
    assert_eq!(gateway.get_run("done").await.x_cache(), Some("HIT"));
    assert_eq!(explicit_evictions(&gateway).await, 0.0);

    let response = purge(&gateway, "/cache/runs/done").await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(
        response.json(),
        serde_json::json!({
            "runId": "done",
            "scope": "run",
            "removed": {"memory": true, "shared": null},
            "replicasTold": null,
        })
    );
    assert_eq!(explicit_evictions(&gateway).await, 1.0);
    assert_eq!(gateway.get_run("done").await.x_cache(), Some("MISS"));
    assert_eq!(mock.count_for("done"), 2);

    // A remembered 404 goes with either path.
    gateway.get_run("gone").await;
    let response = purge(&gateway, "/cache/runs/gone").await;
    assert_eq!(response.json()["removed"]["memory"], true);
    gateway.get_run("gone").await;
    assert_eq!(mock.count_for("gone"), 2);
}

#[tokio::test]
async fn a_call_in_flight_during_a_purge_does_not_store_what_it_brings_back() {
    let mock = MockUpstream::start().await;
    let gate = Gate::new();
    let stale = run_body("done", "COMPLETED", 200);
    mock.set("done", Reply::ok(stale.clone()).gated(&gate));
    let gateway = TestGateway::start(&mock, |_| {}).await;
    let url = gateway.url(&support::runs_path("done"));
    let in_flight = tokio::spawn(async move { TestClient::new().send(Method::GET, &url, &[]).await });
    mock.wait_for_requests(1).await;
    let response = purge(&gateway, "/cache/runs/done").await;
    assert_eq!(response.json()["removed"]["memory"], false, "not stored yet");
    gate.open();
    let answered = in_flight.await.expect("the request task");
    assert_eq!(answered.body, stale, "answered all the same");
    assert_eq!(answered.x_cache(), Some("PASS"), "but not stored");
    let corrected = run_body("done", "FAILED", 200);
    mock.set("done", Reply::ok(corrected.clone()));
    let next = gateway.get_run("done").await;
    assert_eq!(next.x_cache(), Some("MISS"));
    assert_eq!(next.body, corrected);
}

#[tokio::test]
async fn a_request_after_a_purge_does_not_join_the_call_from_before_it() {
    let mock = MockUpstream::start().await;
    let gate = Gate::new();
    let stale = run_body("done", "COMPLETED", 200);
    mock.set("done", Reply::ok(stale.clone()).gated(&gate));
    let gateway = TestGateway::start(&mock, |_| {}).await;
    let url = gateway.url(&support::runs_path("done"));
    let before = tokio::spawn(async move { TestClient::new().send(Method::GET, &url, &[]).await });
    mock.wait_for_requests(1).await;
    assert_eq!(purge(&gateway, "/cache/runs/done").await.status, StatusCode::OK);

    // Plextera answers the corrected run now; the call from before the purge is still held.
    let corrected = run_body("done", "FAILED", 200);
    mock.set("done", Reply::ok(corrected.clone()));
    let after = tokio::time::timeout(Duration::from_secs(10), gateway.get_run("done"))
        .await
        .expect("the request after the purge does not wait on the call from before it");
    assert_eq!(after.body, corrected);
    assert_eq!(after.x_cache(), Some("MISS"), "its own call, stored");
    assert_eq!(mock.count_for("done"), 2);

    gate.open();
    let answered = before.await.expect("the request task");
    assert_eq!(answered.body, stale, "it asked before the purge");
    assert_eq!(answered.x_cache(), Some("PASS"));
    let next = gateway.get_run("done").await;
    assert_eq!(next.x_cache(), Some("HIT"));
    assert_eq!(next.body, corrected);
    assert_eq!(mock.count_for("done"), 2);
}

#[tokio::test]
async fn purge_paths_take_delete_and_a_valid_run_id() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    for path in [
        "/cache/runs/bad.id",
        "/cache/runs/",
        "/cache/runs/a/b",
        "/cache/not-found/%2e%2e",
        &format!("/cache/runs/{}", "x".repeat(129)),
    ] {
        let response = purge(&gateway, path).await;
        assert_eq!(response.status, StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(response.error_code(), "INVALID_RUN_ID", "{path}");
    }
    for method in [Method::GET, Method::POST, Method::PUT, Method::HEAD] {
        for path in ["/cache/runs/done", "/cache/not-found/done"] {
            let response = admin(&gateway, method.clone(), path).await;
            assert_eq!(response.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            assert_eq!(response.header("allow"), Some("DELETE"), "{method} {path}");
        }
    }
    let response = admin(&gateway, Method::DELETE, "/metrics").await;
    assert_eq!(response.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(response.header("allow"), Some("GET, HEAD"));
    // Purges live on the admin port only.
    let public = gateway.send(Method::DELETE, "/cache/runs/done", &[]).await;
    assert_ne!(public.status, StatusCode::OK);
    assert_eq!(mock.request_count(), 0, "nothing went upstream");
}

#[tokio::test]
async fn with_redis_down_the_memory_copy_is_purged_and_the_answer_says_redis_was_not() {
    let mut redis = RedisServer::start(&[]);
    let mock = MockUpstream::start().await;
    mock.set("done", Reply::run("done", "COMPLETED"));
    let gateway = replica(&mock, &redis).await;
    gateway.get_run("done").await;
    eventually("the run is in Redis", || async {
        stored_value(&redis, "done").await.is_some()
    })
    .await;
    assert_eq!(gateway.get_run("done").await.x_cache(), Some("HIT"));
    redis.kill();
    let response = purge(&gateway, "/cache/runs/done").await;
    assert_eq!(response.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.error_code(), "SHARED_CACHE_UNAVAILABLE");
    let body = response.json();
    assert_eq!(
        body["removed"],
        serde_json::json!({"memory": true, "shared": false})
    );
    assert_eq!(body["error"]["retryable"], true);
    assert_eq!(explicit_evictions(&gateway).await, 1.0);
    assert_eq!(
        gateway.get_run("done").await.x_cache(),
        Some("MISS"),
        "fetched again"
    );
    assert_eq!(mock.count_for("done"), 2);
}

/// A long-poll holding `if_none_match`, waiting up to `wait`.
async fn long_poll(gateway: &TestGateway, id: &str, wait: &str, if_none_match: &str) -> TestResponse {
    gateway
        .send(
            Method::GET,
            &format!("{}?wait={wait}", support::runs_path(id)),
            &[("if-none-match", if_none_match)],
        )
        .await
}

#[tokio::test]
async fn a_purge_drops_the_watch_of_an_ended_run_so_waiting_clients_are_not_given_the_old_answer() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| {
        // The watcher sleeps through the whole test: whatever it knows came from elsewhere.
        config.watch.poll_interval = Duration::from_secs(60);
        config.watch.max_poll_interval = Duration::from_secs(60);
    })
    .await;
    mock.set("run", Reply::ok(support::push::running("run", 1, 100)));
    let going = gateway.get_run("run").await;
    let version = going.header("etag").expect("a version").to_owned();
    // A client held on the run starts its watch; its wait runs out with nothing new.
    let held = long_poll(&gateway, "run", "200ms", &version).await;
    assert_eq!(held.status, StatusCode::NOT_MODIFIED);

    // The run ends (wrongly). A client holding a version the watch has not seen fetches it, and
    // the watch learns the end from that call.
    let wrong = run_body("run", "COMPLETED", 100);
    mock.set("run", Reply::ok(wrong.clone()));
    assert_eq!(long_poll(&gateway, "run", "5s", "W/\"other\"").await.body, wrong);
    assert_eq!(
        gateway
            .scrape()
            .await
            .expect("plextera_gateway_watched_runs", &[]),
        1.0,
        "the ended run's watch is still there, its watcher asleep"
    );

    let response = purge(&gateway, "/cache/runs/run").await;
    assert_eq!(response.json()["removed"]["memory"], true);
    assert_eq!(
        gateway
            .scrape()
            .await
            .expect("plextera_gateway_watched_runs", &[]),
        0.0,
        "the ended run's watch went with the purge"
    );
    let corrected = run_body("run", "FAILED", 100);
    mock.set("run", Reply::ok(corrected.clone()));
    let next = long_poll(&gateway, "run", "5s", "W/\"other\"").await;
    assert_eq!(next.body, corrected, "not the purged answer the watch held");
    assert_eq!(mock.count_for("run"), 4);
}

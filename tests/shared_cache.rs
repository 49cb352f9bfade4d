//! The shared Redis tier, against a real `redis-server` started for each test.

mod support;

use std::time::Duration;

use http::{Method, StatusCode};
use plextera_gateway::config::SharedCacheConfig;
use redis::AsyncCommands;
use support::redis_server::RedisServer;
use support::{
    Gate, GatewayProcess, MockUpstream, Reply, TEST_KEY, TestClient, TestGateway, eventually, run_body,
    runs_path, write_config,
};

const PREFIX: &str = "test-gw:";

fn shared(redis: &RedisServer) -> SharedCacheConfig {
    redis.shared_config(PREFIX)
}

async fn replica(mock: &MockUpstream, redis: &RedisServer) -> TestGateway {
    let shared = shared(redis);
    TestGateway::start(mock, move |config| config.cache.shared = Some(shared)).await
}

async fn stored_value(redis: &RedisServer, id: &str) -> Option<Vec<u8>> {
    redis
        .client()
        .await
        .get(format!("{PREFIX}run:{id}"))
        .await
        .expect("GET")
}

async fn wait_until_stored(redis: &RedisServer, id: &str) {
    eventually(&format!("{id} is written to Redis"), || async {
        stored_value(redis, id)
            .await
            .is_some_and(|value| value.starts_with(b"PXGW"))
    })
    .await;
}

#[tokio::test]
async fn a_second_replica_serves_a_run_the_first_fetched() {
    let redis = RedisServer::start(&[]);
    let mock = MockUpstream::start().await;
    let body = run_body("done", "COMPLETED", 800);
    mock.set("done", Reply::ok(body.clone()));
    let first = replica(&mock, &redis).await;
    let second = replica(&mock, &redis).await;

    assert_eq!(first.get_run("done").await.x_cache(), Some("MISS"));
    wait_until_stored(&redis, "done").await;
    let shared_hit = second.get_run("done").await;
    assert_eq!(shared_hit.status, StatusCode::OK);
    assert_eq!(shared_hit.x_cache(), Some("HIT"));
    assert_eq!(shared_hit.body, body, "byte-identical through Redis");
    assert_eq!(
        shared_hit.header("etag"),
        first.get_run("done").await.header("etag")
    );
    assert_eq!(
        mock.count_for("done"),
        1,
        "upstream was called once for both replicas"
    );
    // The shared hit filled the second replica's memory.
    assert_eq!(second.get_run("done").await.x_cache(), Some("HIT"));
    let scrape = second.scrape().await;
    assert_eq!(
        scrape.expect("plextera_gateway_shared_cache_hits_total", &[]),
        1.0
    );
    assert_eq!(
        scrape.expect("plextera_gateway_shared_cache_errors_total", &[]),
        0.0
    );
}

#[tokio::test]
async fn runs_still_going_are_never_written() {
    let redis = RedisServer::start(&[]);
    let mock = MockUpstream::start().await;
    mock.set("live", Reply::run("live", "PROCESSING"));
    mock.set("gone", Reply::status(StatusCode::NOT_FOUND, "{}"));
    let shared = shared(&redis);
    // A lock left behind would live request_timeout + 1 s: far longer than `eventually` waits.
    let gateway = TestGateway::start(&mock, move |config| {
        config.cache.shared = Some(shared);
        config.upstream.request_timeout = Duration::from_secs(60);
    })
    .await;
    for _ in 0..3 {
        gateway.get_run("live").await;
        gateway.get_run("gone").await;
    }
    // The fetch locks are released in the background once each call is done, stored or not.
    eventually("the fetch locks are released", || async {
        let mut client = redis.client().await;
        let locks: Vec<String> = client.keys(format!("{PREFIX}lock:*")).await.expect("KEYS");
        locks.is_empty()
    })
    .await;
    let mut client = redis.client().await;
    let runs: Vec<String> = client.keys(format!("{PREFIX}run:*")).await.expect("KEYS");
    assert!(runs.is_empty(), "{runs:?}");
    assert_eq!(
        mock.count_for("live"),
        3,
        "every poll of a running run goes upstream"
    );
}

#[tokio::test]
async fn a_corrupt_or_foreign_value_is_a_miss_and_is_overwritten() {
    let redis = RedisServer::start(&[]);
    let mock = MockUpstream::start().await;
    mock.set("done", Reply::run("done", "COMPLETED"));
    let gateway = replica(&mock, &redis).await;
    let mut client = redis.client().await;
    let key = format!("{PREFIX}run:done");
    let _: () = client
        .set(&key, b"{\"id\":\"done\",\"status\":\"COMPLETED\"}".as_slice())
        .await
        .expect("SET");

    let response = gateway.get_run("done").await;
    assert_eq!(
        response.x_cache(),
        Some("MISS"),
        "the foreign value was not served"
    );
    assert_eq!(mock.count_for("done"), 1);
    wait_until_stored(&redis, "done").await;
    assert_eq!(
        gateway
            .scrape()
            .await
            .expect("plextera_gateway_shared_cache_corrupt_total", &[]),
        1.0
    );

    // A damaged envelope (one body byte flipped) is refused too.
    let mut damaged = stored_value(&redis, "done").await.expect("stored");
    *damaged.last_mut().expect("body") ^= 0x20;
    let _: () = client.set(&key, damaged).await.expect("SET");
    let other = replica(&mock, &redis).await;
    assert_eq!(other.get_run("done").await.x_cache(), Some("MISS"));
    assert_eq!(mock.count_for("done"), 2);
}

#[tokio::test]
async fn redis_going_away_never_fails_a_request_and_shared_hits_resume_when_it_returns() {
    let mut redis = RedisServer::start(&[]);
    let mock = MockUpstream::start().await;
    for index in 0..20 {
        let id = format!("run_{index}");
        mock.set(&id, Reply::run(&id, "COMPLETED"));
    }
    mock.set("live", Reply::run("live", "PROCESSING"));
    // A short pause, so the test waits for the breaker's own rule rather than for the clock.
    let shared = SharedCacheConfig {
        circuit_open_for: Duration::from_millis(300),
        ..shared(&redis)
    };
    let gateway = TestGateway::start(&mock, move |config| config.cache.shared = Some(shared)).await;
    assert_eq!(gateway.get_run("run_0").await.status, StatusCode::OK);

    redis.kill();
    for index in 0..20 {
        let id = format!("run_{index}");
        for _ in 0..2 {
            let response = gateway.get_run(&id).await;
            assert_eq!(response.status, StatusCode::OK, "{id} while Redis is down");
        }
        assert_eq!(gateway.get_run("live").await.status, StatusCode::OK);
    }
    let scrape = gateway.scrape().await;
    assert!(scrape.expect("plextera_gateway_shared_cache_errors_total", &[]) > 0.0);
    assert_eq!(
        scrape.expect("plextera_gateway_shared_cache_circuit_open", &[]),
        1.0,
        "it stopped trying"
    );

    redis.restart();
    // Once the circuit lets calls through again, newly fetched runs are written and shared again.
    let attempt = std::sync::atomic::AtomicUsize::new(0);
    let mut shared_id = String::new();
    eventually("a run fetched now reaches Redis", || {
        let id = format!(
            "fresh_{}",
            attempt.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        mock.set(&id, Reply::run(&id, "COMPLETED"));
        shared_id.clone_from(&id);
        let (gateway, redis) = (&gateway, &redis);
        async move {
            assert_eq!(gateway.get_run(&id).await.status, StatusCode::OK);
            // The write happens in the background: give it a moment before trying a new run.
            for _ in 0..20 {
                if stored_value(redis, &id).await.is_some() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            false
        }
    })
    .await;
    let other = replica(&mock, &redis).await;
    let calls = mock.count_for(&shared_id);
    assert_eq!(other.get_run(&shared_id).await.x_cache(), Some("HIT"));
    assert_eq!(mock.count_for(&shared_id), calls, "served from Redis");
}

#[tokio::test]
async fn redis_never_holds_the_key() {
    let redis = RedisServer::start(&[]);
    let mock = MockUpstream::start().await;
    mock.set("done", Reply::run("done", "COMPLETED"));
    mock.set("failed", Reply::run("failed", "FAILED"));
    mock.set("live", Reply::run("live", "PROCESSING"));
    // An ended run whose body echoes the key: scrubbed before it is stored anywhere.
    mock.set(
        "echo",
        Reply::ok(format!(
            r#"{{"id":"echo","status":"COMPLETED","note":"{TEST_KEY}"}}"#
        )),
    );
    let gateway = replica(&mock, &redis).await;
    for id in ["done", "failed", "live", "echo", "missing"] {
        gateway.get_run(id).await;
    }
    for id in ["done", "failed", "echo"] {
        wait_until_stored(&redis, id).await;
    }
    let mut client = redis.client().await;
    let keys: Vec<Vec<u8>> = client.keys("*").await.expect("KEYS");
    assert!(keys.len() >= 3, "the ended runs are in Redis: {keys:?}");
    for key in keys {
        assert!(!contains(&key, TEST_KEY.as_bytes()), "a key name holds it");
        let value: Vec<u8> = client.get(&key).await.expect("GET");
        assert!(
            !contains(&value, TEST_KEY.as_bytes()),
            "{} holds the key",
            String::from_utf8_lossy(&key)
        );
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

#[tokio::test]
async fn a_password_from_the_environment_is_used() {
    let redis = RedisServer::start(&["--requirepass", "s3cret-redis"]);
    let mock = MockUpstream::start().await;
    mock.set("done", Reply::run("done", "COMPLETED"));
    let mut config = support::test_config(&mock.base_url());
    config.cache.shared = Some(SharedCacheConfig {
        password_env: Some("REDIS_PASSWORD".to_owned()),
        ..shared(&redis)
    });
    let secrets = plextera_gateway::Secrets::load(&config, |name| match name {
        "PLEXTERA_API_KEY" => Some(TEST_KEY.to_owned()),
        "REDIS_PASSWORD" => Some("s3cret-redis".to_owned()),
        _ => None,
    })
    .expect("secrets");
    let gateway = TestGateway::start_with_secrets(config, secrets).await;
    gateway.get_run("done").await;
    let client =
        redis::Client::open(format!("redis://:s3cret-redis@127.0.0.1:{}/0", redis.port)).expect("client");
    let mut connection = client.get_multiplexed_async_connection().await.expect("connect");
    eventually("the run is written with the password", || {
        let mut connection = connection.clone();
        async move {
            let value: Option<Vec<u8>> = connection.get(format!("{PREFIX}run:done")).await.expect("GET");
            value.is_some()
        }
    })
    .await;
    let _: () = connection.del(format!("{PREFIX}run:done")).await.expect("DEL");
    assert_eq!(
        gateway
            .scrape()
            .await
            .expect("plextera_gateway_shared_cache_errors_total", &[]),
        0.0
    );
}

/// Three gateway processes, 20 concurrent cold requests each for one slow ended run: the replicas
/// elect one fetcher through Redis, and upstream is called once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_under_a_cold_herd_call_upstream_once() {
    let redis = RedisServer::start(&[]);
    let mock = MockUpstream::start().await;
    let gate = Gate::new();
    let body = run_body("herd", "COMPLETED", 1000);
    mock.set("herd", Reply::ok(body.clone()).gated(&gate));
    let dir = tempfile::tempdir().expect("temp dir");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nbase_url = \"{}\"\napi_key_env = \"GW_TEST_KEY\"\n\
         [cache.shared]\nurl = \"{}\"\ntimeout = \"500ms\"\nkey_prefix = \"{PREFIX}\"\nlock_wait = \"10s\"\n",
        mock.base_url(),
        redis.url()
    );
    let config = write_config(dir.path(), &text);
    let replicas: Vec<GatewayProcess> = (0..3)
        .map(|_| GatewayProcess::start(&["--config", &config], &[("GW_TEST_KEY", TEST_KEY)]))
        .collect();

    let mut clients = Vec::new();
    for replica in &replicas {
        for _ in 0..20 {
            let url = format!("http://{}{}", replica.public, runs_path("herd"));
            clients.push(tokio::spawn(async move {
                TestClient::new().send(Method::GET, &url, &[]).await
            }));
        }
    }
    // Hold upstream until every replica has 19 local waiters and has tried the Redis lock.
    for replica in &replicas {
        let admin = replica.admin;
        eventually("each replica has its herd queued", || async move {
            let response = TestClient::new()
                .send(Method::GET, &format!("http://{admin}/metrics"), &[])
                .await;
            let scrape = support::prom::Scrape::parse(std::str::from_utf8(&response.body).expect("utf-8"));
            scrape.expect("plextera_gateway_coalesced_waiters", &[]) == 19.0
                && scrape
                    .value(
                        "plextera_gateway_shared_cache_duration_seconds_count",
                        &[("op", "lock")],
                    )
                    .is_some_and(|count| count >= 1.0)
        })
        .await;
    }
    gate.open();
    for client in clients {
        let response = client.await.expect("client");
        assert_eq!(response.status, StatusCode::OK);
        assert_eq!(response.body, body);
    }
    assert_eq!(
        mock.count_for("herd"),
        1,
        "one upstream call for 60 requests on 3 replicas"
    );
}

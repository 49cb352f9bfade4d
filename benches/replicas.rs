//! Upstream calls for K replicas serving M ended runs, with and without the shared Redis tier
//! (`[cache.shared]`). Needs `redis-server` on the PATH. `cargo bench --bench replicas`
//! (env: REPLICAS, RUNS).
//!
//! Three phases, each counted separately: a load balancer spreads one request per run to every
//! replica; a cold herd asks every replica for new runs all at once (10 requests per replica and
//! run); a rolling restart replaces every replica (empty memory) and asks again for the first runs.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use futures_util::future::join_all;
use http::Method;
use plextera_gateway::config::SharedCacheConfig;
use support::redis_server::RedisServer;
use support::{MockUpstream, Reply, TestClient, TestGateway, env_number, run_body, runs_path};

#[tokio::main]
async fn main() {
    let replicas = env_number("REPLICAS", 3);
    let runs = env_number("RUNS", 100);
    println!("{replicas} replicas, {runs} ended runs per phase");
    println!(
        "{:<44} {:>14} {:>14}",
        "upstream calls", "memory only", "with Redis"
    );
    let without = measure(replicas, runs, None).await;
    let redis = RedisServer::start(&[]);
    let with = measure(replicas, runs, Some(&redis)).await;
    for ((phase, alone), (_, shared)) in without.iter().zip(&with) {
        println!("{phase:<44} {alone:>14} {shared:>14}");
    }
    let total = |phases: &[(&str, usize)]| phases.iter().map(|(_, calls)| calls).sum::<usize>();
    println!("{:<44} {:>14} {:>14}", "total", total(&without), total(&with));
}

async fn start_replicas(mock: &MockUpstream, count: usize, redis: Option<&RedisServer>) -> Vec<TestGateway> {
    let mut replicas = Vec::new();
    for _ in 0..count {
        let shared = redis.map(|redis| SharedCacheConfig {
            url: redis.url(),
            password_env: None,
            ttl: None,
            timeout: Duration::from_millis(100),
            key_prefix: "bench:".to_owned(),
            lock_wait: Duration::from_secs(2),
            circuit_open_for: plextera_gateway::config::default_circuit_open_for(),
        });
        replicas.push(TestGateway::start(mock, move |config| config.cache.shared = shared).await);
    }
    replicas
}

async fn measure(replicas: usize, runs: usize, redis: Option<&RedisServer>) -> Vec<(&'static str, usize)> {
    let mock = MockUpstream::start().await;
    for phase in ["spread", "herd"] {
        for index in 0..runs {
            let id = format!("{phase}-{index}");
            mock.set(&id, Reply::ok(run_body(&id, "COMPLETED", 1000)));
        }
    }
    let mut phases = Vec::new();
    let gateways = start_replicas(&mock, replicas, redis).await;
    let client = TestClient::new();

    let before = mock.request_count();
    spread(&client, &gateways, runs).await;
    phases.push((
        "load balancer: every run once on every replica",
        mock.request_count() - before,
    ));

    let before = mock.request_count();
    for index in 0..runs {
        let id = format!("herd-{index}");
        let requests = gateways.iter().flat_map(|gateway| {
            let url = gateway.url(&runs_path(&id));
            (0..10).map(move |_| {
                let url = url.clone();
                async move { TestClient::new().send(Method::GET, &url, &[]).await }
            })
        });
        join_all(requests).await;
    }
    phases.push((
        "cold herd: 10 requests per replica at once",
        mock.request_count() - before,
    ));

    // Let the background writes to Redis land before the replicas go away.
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(gateways);
    let restarted = start_replicas(&mock, replicas, redis).await;
    let before = mock.request_count();
    spread(&client, &restarted, runs).await;
    phases.push((
        "rolling restart: every run again, new replicas",
        mock.request_count() - before,
    ));
    phases
}

/// One request for each `spread-N` run on every replica, in turn, as a load balancer would send.
async fn spread(client: &TestClient, gateways: &[TestGateway], runs: usize) {
    for index in 0..runs {
        for gateway in gateways {
            let url = gateway.url(&runs_path(&format!("spread-{index}")));
            client.send(Method::GET, &url, &[]).await;
        }
    }
}

//! How many upstream calls does the gateway save? K frontends poll the same M runs until each run
//! ends, once straight at a simulated upstream and once through the gateway; the upstream counts
//! the calls it answered in each case.
//!
//! Run: `cargo bench --bench upstream_savings` (env: FRONTENDS, RUNS, POLL_MS, RUN_MS, LATENCY_MS,
//! REVISITS, SPREAD_MS). Frontends open one after another, spread evenly over SPREAD_MS (default:
//! one poll interval; 0 opens them all at once, as after a deploy); each polls
//! all runs at once every POLL_MS and stops polling a run once it sees it ended, as a dashboard
//! does. With REVISITS=n each frontend then loads every (ended) run n more times, as a user who
//! comes back to the page.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::join_all;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use plextera_gateway::demo::{DEMO_API_KEY, DemoOptions, DemoUpstream};
use plextera_gateway::{ApiKey, Config, Gateway};
use support::env_number;

struct Scenario {
    frontends: usize,
    runs: usize,
    poll: Duration,
    revisits: u64,
    /// Frontends open spread evenly over this time.
    spread: Duration,
    demo: DemoOptions,
}

#[tokio::main]
async fn main() {
    let run_ms = env_number("RUN_MS", 3000);
    let poll_ms = env_number("POLL_MS", 500);
    let scenario = Scenario {
        frontends: env_number("FRONTENDS", 20) as usize,
        runs: env_number("RUNS", 50) as usize,
        poll: Duration::from_millis(poll_ms),
        revisits: env_number("REVISITS", 0),
        spread: Duration::from_millis(env_number("SPREAD_MS", poll_ms)),
        demo: DemoOptions {
            queued_for: Duration::from_millis(run_ms / 3),
            finishes_after: Duration::from_millis(run_ms),
            latency: Duration::from_millis(env_number("LATENCY_MS", 40)),
        },
    };
    println!(
        "{} frontends open over {:?} and poll the same {} runs every {:?} until they end, then revisit \
         them {} times; runs end after {:?}; upstream answers in {:?}",
        scenario.frontends,
        scenario.spread,
        scenario.runs,
        scenario.poll,
        scenario.revisits,
        scenario.demo.finishes_after,
        scenario.demo.latency
    );
    let (direct_polls, direct_calls) = simulate(&scenario, false).await;
    let (gateway_polls, gateway_calls) = simulate(&scenario, true).await;
    println!("{:<22} {:>14} {:>14}", "", "client polls", "upstream calls");
    println!("{:<22} {:>14} {:>14}", "direct", direct_polls, direct_calls);
    println!(
        "{:<22} {:>14} {:>14}",
        "through the gateway", gateway_polls, gateway_calls
    );
    let saved = 1.0 - gateway_calls as f64 / direct_calls.max(1) as f64;
    println!("upstream calls saved: {:.1} %", saved * 100.0);
}

/// Returns (client polls, upstream calls).
async fn simulate(scenario: &Scenario, through_gateway: bool) -> (u64, u64) {
    let upstream = DemoUpstream::start(scenario.demo).await.expect("demo upstream");
    let base = if through_gateway {
        let mut config = Config::default();
        config.server.listen = "127.0.0.1:0".parse().expect("addr");
        config.server.admin_listen = "127.0.0.1:0".parse().expect("addr");
        config.upstream.base_url = format!("http://{}", upstream.addr);
        let key = ApiKey::new(DEMO_API_KEY).expect("key");
        let gateway = Gateway::bind(&config, &plextera_gateway::Secrets::key_only(key))
            .await
            .expect("gateway");
        let addr = gateway.public_addr();
        tokio::spawn(gateway.serve(std::future::pending()));
        format!("http://{addr}")
    } else {
        format!("http://{}", upstream.addr)
    };
    // Run ids unique to this simulation, so both start from runs nobody has seen.
    let prefix = if through_gateway { "gw" } else { "direct" };
    let frontends: Vec<_> = (0..scenario.frontends)
        .map(|frontend| {
            let base = base.clone();
            let ids: Vec<String> = (0..scenario.runs)
                .map(|run| format!("{prefix}-run-{run}"))
                .collect();
            let (poll, revisits) = (scenario.poll, scenario.revisits);
            let opens_after = scenario
                .spread
                .mul_f64(frontend as f64 / scenario.frontends as f64);
            tokio::spawn(async move { frontend_polls(base, ids, poll, opens_after, revisits).await })
        })
        .collect();
    let mut polls = 0;
    for frontend in frontends {
        polls += frontend.await.expect("frontend");
    }
    (polls, upstream.requests_answered())
}

/// One frontend: polls every run (all at once, as a browser does) until it ends; returns how many
/// polls it made.
async fn frontend_polls(
    base: String,
    ids: Vec<String>,
    poll: Duration,
    opens_after: Duration,
    revisits: u64,
) -> u64 {
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    tokio::time::sleep(opens_after).await;
    let mut polls = 0;
    let mut next = Instant::now();
    let mut running = ids.clone();
    while !running.is_empty() {
        polls += running.len() as u64;
        let ended = join_all(running.iter().map(|id| has_ended(&client, &base, id))).await;
        running = running
            .into_iter()
            .zip(ended)
            .filter(|(_, ended)| !ended)
            .map(|(id, _)| id)
            .collect();
        next += poll;
        tokio::time::sleep_until(next.into()).await;
    }
    for _ in 0..revisits {
        polls += ids.len() as u64;
        join_all(ids.iter().map(|id| has_ended(&client, &base, id))).await;
    }
    polls
}

async fn has_ended(client: &Client<HttpConnector, Empty<Bytes>>, base: &str, id: &str) -> bool {
    let request = http::Request::get(format!("{base}/api/public/v1/workflow-runs/{id}"))
        .header("authorization", format!("api-key {DEMO_API_KEY}"))
        .body(Empty::new())
        .expect("request");
    let Ok(response) = client.request(request).await else {
        return false;
    };
    let body = response
        .into_body()
        .collect()
        .await
        .map(|body| body.to_bytes())
        .unwrap_or_default();
    let run: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    matches!(run["status"].as_str(), Some("COMPLETED" | "FAILED" | "CLOSED"))
}

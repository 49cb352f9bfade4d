//! Replicas sharing the Redis tier (`[cache.shared]`): upstream calls for ended runs, push across
//! replicas (issue 19), and a replica killed mid-run. Needs `redis-server` on the PATH.
//!
//! Run: `cargo bench --bench replicas` (about a minute). Env: PARTS (`ended,push,failover`:
//! any of them), REPLICAS (3).
//!
//! 1. `ended`: upstream calls for REPLICAS replicas serving RUNS (100) ended runs, memory only and
//!    with Redis, in three phases counted separately: a load balancer spreads one request per run
//!    to every replica; a cold herd asks every replica for new runs all at once (10 requests per
//!    replica and run); a rolling restart replaces every replica (empty memory) and asks again for
//!    the first runs.
//!
//! 2. `push`: CLIENTS (300) held clients spread evenly over PUSH_RUNS (10) runs and over the
//!    replicas (in-process), for 1 replica and for REPLICAS replicas, each memory only and with one
//!    private `redis-server` shared by the replicas. Clients alternate by kind within every run
//!    and replica (KINDS, `long-poll,sse`): a long-poll is `GET ?wait=30s` again and again, with
//!    `If-None-Match` of the last `ETag` from its second request on; a stream is `Accept:
//!    text/event-stream` read to its `event: end`. Clients open spread over SPREAD_MS (1000). The
//!    upstream is a simulated one: every run starts as the clients open, has a new version every
//!    STEP_MS (1300) and ends at RUN_MS (6000); each answer takes LATENCY_MS (40). `watch.poll_interval`
//!    is INTERVAL_MS (1000). It listens on one port per replica, so every call names its replica,
//!    and the gateway's `x-request-id` tells a watcher's poll (`watch-…`) from a call a client led
//!    (a first request with no watcher to answer it) or a fleet refetch (`fleet-…`). Printed per
//!    setup: upstream calls per run (all, then per replica, then the watchers' polls alone); the
//!    longest time two replicas' watchers polled the same run at once ("double-polled": each
//!    replica's polls of a run joined into stretches where one follows another within 2.5 ×
//!    INTERVAL_MS, and the longest overlap of two replicas' stretches, over runs); Redis commands
//!    per watched run and second over the window (clients opening → last end seen + 0.3 s), from
//!    `INFO commandstats` before and after on a connection of the bench's own (its `INFO`s left
//!    out; like `total_commands_processed`, it counts the commands run inside the gateway's Lua
//!    scripts: each lease renewal, fenced publish and release is an `EVALSHA` plus a `GET` and a
//!    `PEXPIRE` / `PUBLISH` / `DEL`); the fleet's wake-ups published / received and polls made
//!    alone (`fleet_fallbacks_total`), summed over replicas; run end upstream → seen, p50 / max
//!    over clients; clients that missed the end / answers that were not one. Below the table, per
//!    Redis setup: the commands executed by command, the calls the gateways made by `op` (their
//!    `shared_cache_duration_seconds` counts: round trips, scripts counted once), and the
//!    `SUBSCRIBE`s (one per replica while every subscription holds). Target: with Redis, calls per
//!    run within a few of a single replica's, watchers' polls the same; memory only, about
//!    REPLICAS times as many.
//!
//! 3. `failover`: three replicas as real processes (the release binary) sharing a private
//!    `redis-server`, CLIENTS clients spread over them and over PUSH_RUNS runs as above (both
//!    kinds), runs lasting FAILOVER_RUN_MS (20000) with a new version every STEP_MS. At
//!    KILL_AFTER_MS (5000) after the runs start, the replica holding the most watcher leases
//!    (`plextera_gateway_fleet_leases_held` on each admin port) is sent SIGKILL. Its clients see
//!    their connection break and go on at the next replica: a long-poll re-issued with the
//!    `If-None-Match` it holds, a stream reopened with `Last-Event-ID` (at once: a browser would
//!    wait `retry:` first). Printed: leases per replica at the kill; for the moved clients, kill →
//!    a survivor answered (a stream's head; a long-poll's answer, which comes with the next new
//!    version) and kill → next new version, p50 / max; the same for the clients that stayed;
//!    clients that saw their run end (moved and stayed); for the runs the killed replica polled,
//!    its last poll → a survivor's first (the lease running out: the holder's interval + 2 s, then
//!    a follower's turn); leases taken over; and the longest double-polled span as above, which
//!    must stay under the lease TTL (INTERVAL_MS + `fleet::LEASE_MARGIN`).

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::join_all;
use http::header::{ACCEPT, CONTENT_TYPE, ETAG, IF_NONE_MATCH};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use plextera_gateway::config::SharedCacheConfig;
use plextera_gateway::watch::fleet::LEASE_MARGIN;
use support::redis_server::RedisServer;
use support::{
    GatewayProcess, MockUpstream, Reply, TEST_KEY, TestClient, TestGateway, env_number,
    raise_descriptor_limit, run_body, runs_path, test_config,
};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// A long-poll's wait.
const WAIT: &str = "30s";
/// Pause after an answer that is not one, or once every replica failed in a row.
const RETRY_AFTER: Duration = Duration::from_millis(100);
/// A client still watching this long after its run ended has failed.
const PATIENCE_AFTER_END: Duration = Duration::from_secs(30);

#[tokio::main]
async fn main() {
    raise_descriptor_limit();
    let parts = std::env::var("PARTS").unwrap_or_else(|_| "ended,push,failover".to_owned());
    let settings = Settings::from_env();
    for part in parts.split(',') {
        match part.trim() {
            "ended" => ended_part().await,
            "push" => push_part(&settings).await,
            "failover" => failover_part(&settings).await,
            other => panic!("PARTS: unknown part {other:?} (ended, push, failover)"),
        }
        println!();
    }
}

// ---------------------------------------------------------------------------------------------
// Part 1: ended runs
// ---------------------------------------------------------------------------------------------

async fn ended_part() {
    let replicas = env_number("REPLICAS", 3);
    let runs = env_number("RUNS", 100);
    println!("== ended: {replicas} replicas, {runs} ended runs per phase");
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

fn shared_config(redis: &RedisServer, key_prefix: &str) -> SharedCacheConfig {
    SharedCacheConfig {
        timeout: Duration::from_millis(100),
        lock_wait: Duration::from_secs(2),
        ..redis.shared_config(key_prefix)
    }
}

async fn start_replicas(mock: &MockUpstream, count: usize, redis: Option<&RedisServer>) -> Vec<TestGateway> {
    let mut replicas = Vec::new();
    for _ in 0..count {
        let shared = redis.map(|redis| shared_config(redis, "bench:"));
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

// ---------------------------------------------------------------------------------------------
// Settings of parts 2 and 3
// ---------------------------------------------------------------------------------------------

struct Settings {
    replicas: usize,
    clients: usize,
    runs: usize,
    kinds: Vec<Kind>,
    interval: Duration,
    spread: Duration,
    timing: Timing,
    failover_lasts: Duration,
    kill_after: Duration,
}

impl Settings {
    fn from_env() -> Self {
        let kinds = std::env::var("KINDS").unwrap_or_else(|_| "long-poll,sse".to_owned());
        Self {
            replicas: env_number("REPLICAS", 3_usize).max(1),
            clients: env_number("CLIENTS", 300),
            runs: env_number("PUSH_RUNS", 10_usize).max(1),
            kinds: kinds
                .split(',')
                .map(|kind| Kind::parse(kind).unwrap_or_else(|| panic!("KINDS: cannot read {kind:?}")))
                .collect(),
            interval: Duration::from_millis(env_number("INTERVAL_MS", 1000)),
            spread: Duration::from_millis(env_number("SPREAD_MS", 1000)),
            timing: Timing {
                step: Duration::from_millis(env_number("STEP_MS", 1300).max(1)),
                lasts: Duration::from_millis(env_number("RUN_MS", 6000)),
                latency: Duration::from_millis(env_number("LATENCY_MS", 40)),
            },
            failover_lasts: Duration::from_millis(env_number("FAILOVER_RUN_MS", 20_000)),
            kill_after: Duration::from_millis(env_number("KILL_AFTER_MS", 5000)),
        }
    }

    /// Client `client`'s run, home replica (of `replicas`) and kind: every run gets the same
    /// number of clients on every replica, the kinds alternating.
    fn place(&self, client: usize, replicas: usize) -> (usize, usize, Kind) {
        let run = client % self.runs;
        let slot = client / self.runs;
        let kind = self.kinds[(slot / replicas) % self.kinds.len()];
        (run, slot % replicas, kind)
    }

    /// Two polls of a run by one replica this close together are one stretch of polling.
    fn stretch_gap(&self) -> Duration {
        self.interval.mul_f64(2.5)
    }
}

// ---------------------------------------------------------------------------------------------
// Part 2: push across replicas
// ---------------------------------------------------------------------------------------------

/// One setup of the push part: how many replicas, whether they share Redis.
struct Setup {
    replicas: usize,
    redis: bool,
}

struct PushRow {
    calls_per_run: f64,
    per_replica: Vec<f64>,
    watcher_calls_per_run: f64,
    double_polled: Duration,
    redis: Option<RedisLoad>,
    published: f64,
    received: f64,
    fallbacks: f64,
    seen_p50: Duration,
    seen_max: Duration,
    missed: usize,
    failures: u64,
}

struct RedisLoad {
    /// Commands Redis executed (those run inside the gateway's scripts included).
    per_run_second: f64,
    by_command: BTreeMap<String, u64>,
    /// Calls the gateways made, by `op` (`shared_cache_duration_seconds`), summed over replicas.
    gateway_calls: BTreeMap<String, f64>,
    window: Duration,
}

async fn push_part(settings: &Settings) {
    let timing = settings.timing;
    println!(
        "== push: {} held clients ({}) spread evenly over {} runs and the replicas; runs change every {:?} and \
         end at {:?}; upstream answers in {:?}; watch.poll_interval {:?}; clients open over {:?}",
        settings.clients,
        kinds_text(&settings.kinds),
        settings.runs,
        timing.step,
        timing.lasts,
        timing.latency,
        settings.interval,
        settings.spread,
    );
    println!(
        "{:<24} {:>9} {:>16} {:>9} {:>8} {:>9} {:>11} {:>9} {:>12} {:>7}",
        "setup",
        "upstream",
        "by replica",
        "watchers'",
        "double-",
        "Redis",
        "wake-ups",
        "polled",
        "end→seen",
        "missed/"
    );
    println!(
        "{:<24} {:>9} {:>16} {:>9} {:>8} {:>9} {:>11} {:>9} {:>12} {:>7}",
        "",
        "calls/run",
        "",
        "polls/run",
        "polled s",
        "cmd/run/s",
        "pub / recv",
        "alone",
        "p50/max ms",
        "fails"
    );
    let redis = RedisServer::start(&[]);
    let mut setups = vec![
        Setup {
            replicas: 1,
            redis: false,
        },
        Setup {
            replicas: 1,
            redis: true,
        },
    ];
    if settings.replicas > 1 {
        setups.push(Setup {
            replicas: settings.replicas,
            redis: true,
        });
        setups.push(Setup {
            replicas: settings.replicas,
            redis: false,
        });
    }
    let mut breakdowns = Vec::new();
    for (index, setup) in setups.iter().enumerate() {
        let shared = setup.redis.then_some(&redis);
        let row = push_setup(settings, setup.replicas, shared, &format!("push{index}")).await;
        let name = format!(
            "{} replica{}, {}",
            setup.replicas,
            if setup.replicas == 1 { "" } else { "s" },
            if setup.redis { "Redis" } else { "memory only" }
        );
        let per_replica: Vec<String> = row
            .per_replica
            .iter()
            .map(|calls| format!("{calls:.1}"))
            .collect();
        println!(
            "{:<24} {:>9.1} {:>16} {:>9.1} {:>8.1} {:>9} {:>11} {:>9} {:>12} {:>7}",
            name,
            row.calls_per_run,
            per_replica.join(" + "),
            row.watcher_calls_per_run,
            row.double_polled.as_secs_f64(),
            row.redis
                .as_ref()
                .map_or_else(|| "-".to_owned(), |load| format!("{:.1}", load.per_run_second)),
            if setup.redis {
                format!("{:.0} / {:.0}", row.published, row.received)
            } else {
                "-".to_owned()
            },
            if setup.redis {
                format!("{:.0}", row.fallbacks)
            } else {
                "-".to_owned()
            },
            format!("{:.0} / {:.0}", millis(row.seen_p50), millis(row.seen_max)),
            format!("{}/{}", row.missed, row.failures),
        );
        if let Some(load) = row.redis {
            breakdowns.push((name, load));
        }
    }
    for (name, load) in breakdowns {
        let seconds = load.window.as_secs_f64() * settings.runs as f64;
        let executed: Vec<String> = load
            .by_command
            .iter()
            .map(|(command, calls)| format!("{command} {:.2}", *calls as f64 / seconds))
            .collect();
        let sent: Vec<String> = load
            .gateway_calls
            .iter()
            .map(|(op, calls)| format!("{op} {:.2}", calls / seconds))
            .collect();
        println!(
            "Redis, {name}, per watched run and second over {:.1} s: commands executed {:.1} ({}); \
             calls the gateways made {:.1} ({}), besides their subscriptions' PINGs; SUBSCRIBEs: {}",
            load.window.as_secs_f64(),
            load.per_run_second,
            executed.join(", "),
            load.gateway_calls.values().sum::<f64>() / seconds,
            sent.join(", "),
            load.by_command.get("subscribe").copied().unwrap_or(0),
        );
    }
}

/// `replicas` in-process gateways (sharing `redis` when given, under `prefix`), the clients, and
/// what it cost.
async fn push_setup(
    settings: &Settings,
    replicas: usize,
    redis: Option<&RedisServer>,
    prefix: &str,
) -> PushRow {
    let timing = settings.timing;
    let upstream = Upstream::start(replicas, timing).await;
    let mut gateways = Vec::new();
    for replica in 0..replicas {
        let mut config = test_config(&upstream.base_url(replica));
        config.watch.poll_interval = settings.interval;
        config.cache.shared = redis.map(|redis| shared_config(redis, &format!("{prefix}:")));
        gateways.push(TestGateway::start_with(config).await);
    }
    let ids: Vec<String> = (0..settings.runs)
        .map(|run| format!("{prefix}-run-{run}"))
        .collect();
    let mut counter = match redis {
        Some(redis) => Some(CommandCounter::connect(redis).await),
        None => None,
    };
    let before = match &mut counter {
        Some(counter) => counter.read().await,
        None => BTreeMap::new(),
    };

    let started = upstream.start_runs(&ids);
    let ended = started + timing.lasts;
    let give_up = ended + PATIENCE_AFTER_END;
    let mut tasks = Vec::with_capacity(settings.clients);
    for client in 0..settings.clients {
        let (run, home, kind) = settings.place(client, replicas);
        let plan = Plan {
            urls: vec![gateways[home].url(&runs_path(&ids[run]))],
            kind,
            opens_at: started + settings.spread.mul_f64(client as f64 / settings.clients as f64),
            give_up,
        };
        tasks.push(tokio::spawn(watch_run(plan)));
    }
    let mut seen = Vec::new();
    let mut missed = 0;
    let mut failures = 0;
    for task in tasks {
        let watched = task.await.expect("client task");
        failures += watched.failures;
        match watched.end {
            Some(at) => seen.push(at.saturating_duration_since(ended)),
            None => missed += 1,
        }
    }
    // The watchers' last calls, and their leases given back.
    tokio::time::sleep(timing.latency * 2 + Duration::from_millis(200)).await;
    let window = started.elapsed();
    let mut redis_load = match &mut counter {
        Some(counter) => {
            let after = counter.read().await;
            let by_command: BTreeMap<String, u64> = after
                .iter()
                .filter(|(command, _)| command.as_str() != "info")
                .map(|(command, calls)| {
                    let earlier = before.get(command).copied().unwrap_or(0);
                    (command.clone(), calls - earlier)
                })
                .filter(|(_, calls)| *calls > 0)
                .collect();
            let total: u64 = by_command.values().sum();
            Some(RedisLoad {
                per_run_second: total as f64 / settings.runs as f64 / window.as_secs_f64(),
                by_command,
                gateway_calls: BTreeMap::new(),
                window,
            })
        }
        None => None,
    };
    let mut published = 0.0;
    let mut received = 0.0;
    let mut fallbacks = 0.0;
    let mut gateway_calls: BTreeMap<String, f64> = BTreeMap::new();
    for gateway in &gateways {
        let scrape = gateway.scrape().await;
        for sample in scrape.series("plextera_gateway_shared_cache_duration_seconds_count") {
            if let Some(op) = sample.labels.get("op") {
                *gateway_calls.entry(op.clone()).or_default() += sample.value;
            }
        }
        published += scrape
            .value("plextera_gateway_fleet_wakeups_published_total", &[])
            .unwrap_or(0.0);
        received += scrape
            .value("plextera_gateway_fleet_wakeups_received_total", &[])
            .unwrap_or(0.0);
        fallbacks += scrape
            .value("plextera_gateway_fleet_fallbacks_total", &[])
            .unwrap_or(0.0);
    }
    if let Some(load) = &mut redis_load {
        gateway_calls.retain(|_, calls| *calls > 0.0);
        load.gateway_calls = gateway_calls;
    }
    let calls = upstream.calls();
    let runs = settings.runs as f64;
    let per_replica = (0..replicas)
        .map(|replica| calls.iter().filter(|call| call.replica == replica).count() as f64 / runs)
        .collect();
    let watcher_calls = calls.iter().filter(|call| call.by_watcher()).count();
    let double_polled = ids
        .iter()
        .map(|id| double_polled(&calls, id, settings.stretch_gap()))
        .max()
        .unwrap_or_default();
    seen.sort_unstable();
    PushRow {
        calls_per_run: calls.len() as f64 / runs,
        per_replica,
        watcher_calls_per_run: watcher_calls as f64 / runs,
        double_polled,
        redis: redis_load,
        published,
        received,
        fallbacks,
        seen_p50: seen.get(seen.len() / 2).copied().unwrap_or_default(),
        seen_max: seen.last().copied().unwrap_or_default(),
        missed,
        failures,
    }
}

/// Counts the commands a Redis server processed, by command (`INFO commandstats`), on one
/// connection of its own (so its own commands are the `INFO`s alone).
struct CommandCounter(redis::aio::MultiplexedConnection);

impl CommandCounter {
    async fn connect(redis: &RedisServer) -> Self {
        Self(redis.client().await)
    }

    async fn read(&mut self) -> BTreeMap<String, u64> {
        let text: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut self.0)
            .await
            .expect("INFO commandstats");
        text.lines()
            .filter_map(|line| {
                let (command, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = stats
                    .split(',')
                    .find_map(|field| field.strip_prefix("calls="))?
                    .parse()
                    .ok()?;
                Some((command.to_owned(), calls))
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Part 3: a replica killed mid-run
// ---------------------------------------------------------------------------------------------

async fn failover_part(settings: &Settings) {
    const REPLICAS: usize = 3;
    let timing = Timing {
        lasts: settings.failover_lasts,
        ..settings.timing
    };
    println!(
        "== failover: {REPLICAS} replicas (processes) sharing Redis, {} clients ({}) over {} runs that change every \
         {:?} and end at {:?}; the replica holding the most leases is killed (SIGKILL) {:?} after the runs start; \
         watch.poll_interval {:?}, so a lease lives the holder's interval + {LEASE_MARGIN:?}",
        settings.clients,
        kinds_text(&settings.kinds),
        settings.runs,
        timing.step,
        timing.lasts,
        settings.kill_after,
        settings.interval,
    );
    let redis = RedisServer::start(&[]);
    let upstream = Upstream::start(REPLICAS, timing).await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut replicas = Vec::new();
    for replica in 0..REPLICAS {
        let path = dir.path().join(format!("replica-{replica}.toml"));
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n\
             [upstream]\nbase_url = \"{}\"\napi_key_env = \"GW_TEST_KEY\"\n\
             [watch]\npoll_interval = \"{}ms\"\n\
             [cache.shared]\nurl = \"{}\"\ntimeout = \"100ms\"\nkey_prefix = \"failover:\"\n",
            upstream.base_url(replica),
            settings.interval.as_millis(),
            redis.url()
        );
        std::fs::write(&path, text).expect("write a replica's config");
        let path = path.to_str().expect("a UTF-8 path").to_owned();
        let process = tokio::task::spawn_blocking(move || {
            GatewayProcess::start(&["--config", &path], &[("GW_TEST_KEY", TEST_KEY)])
        })
        .await
        .expect("start a replica");
        replicas.push(process);
    }
    let ids: Vec<String> = (0..settings.runs)
        .map(|run| format!("failover-run-{run}"))
        .collect();
    let started = upstream.start_runs(&ids);
    let give_up = started + timing.lasts + PATIENCE_AFTER_END;
    let mut tasks = Vec::with_capacity(settings.clients);
    let mut homes = Vec::with_capacity(settings.clients);
    for client in 0..settings.clients {
        let (run, home, kind) = settings.place(client, REPLICAS);
        // Its replica first, then the next ones, as a load balancer would send it on.
        let urls = (0..REPLICAS)
            .map(|step| {
                let replica = &replicas[(home + step) % REPLICAS];
                format!("http://{}{}", replica.public, runs_path(&ids[run]))
            })
            .collect();
        let plan = Plan {
            urls,
            kind,
            opens_at: started + settings.spread.mul_f64(client as f64 / settings.clients as f64),
            give_up,
        };
        homes.push((home, kind));
        tasks.push(tokio::spawn(watch_run(plan)));
    }

    tokio::time::sleep_until((started + settings.kill_after).into()).await;
    let admin = TestClient::new();
    let mut leases = Vec::new();
    for replica in &replicas {
        let scrape = scrape(&admin, replica.admin).await;
        leases.push(
            scrape
                .value("plextera_gateway_fleet_leases_held", &[])
                .unwrap_or(0.0) as u64,
        );
    }
    let victim = (0..REPLICAS).max_by_key(|replica| leases[*replica]).unwrap_or(0);
    replicas[victim].send_signal("KILL");
    let killed_at = Instant::now();

    let mut watched = Vec::with_capacity(tasks.len());
    for task in tasks {
        watched.push(task.await.expect("client task"));
    }
    tokio::time::sleep(timing.latency * 2 + Duration::from_millis(200)).await;
    let mut takeovers = 0.0;
    let mut fallbacks = 0.0;
    for (replica, process) in replicas.iter().enumerate() {
        if replica == victim {
            continue;
        }
        let scrape = scrape(&admin, process.admin).await;
        takeovers += scrape
            .value("plextera_gateway_fleet_lease_takeovers_total", &[])
            .unwrap_or(0.0);
        fallbacks += scrape
            .value("plextera_gateway_fleet_fallbacks_total", &[])
            .unwrap_or(0.0);
    }

    println!(
        "leases held at the kill: {} (replica {victim} killed, {} of its clients moved)",
        leases
            .iter()
            .enumerate()
            .map(|(replica, held)| format!("replica {replica}: {held}"))
            .collect::<Vec<_>>()
            .join(", "),
        homes.iter().filter(|(home, _)| *home == victim).count()
    );
    println!(
        "{:<22} {:>8} {:>18} {:>18} {:>12}",
        "clients", "count", "kill→answered ms", "kill→new version", "saw the end"
    );
    println!(
        "{:<22} {:>8} {:>18} {:>18} {:>12}",
        "", "", "p50 / max", "p50 / max ms", ""
    );
    for moved in [true, false] {
        for &kind in &settings.kinds {
            let group: Vec<&Watched> = watched
                .iter()
                .zip(&homes)
                .filter(|(_, (home, client_kind))| (*home == victim) == moved && *client_kind == kind)
                .map(|(watched, _)| watched)
                .collect();
            if group.is_empty() {
                continue;
            }
            // A client that stayed was never cut off.
            let answered = if moved {
                let answered: Vec<Duration> = group
                    .iter()
                    .filter_map(|watched| watched.answered_again)
                    .map(|at| at.saturating_duration_since(killed_at))
                    .collect();
                p50_max(&answered, group.len())
            } else {
                "-".to_owned()
            };
            let news: Vec<Duration> = group
                .iter()
                .filter_map(|watched| {
                    let next = watched.news.iter().copied().find(|at| *at > killed_at);
                    next.or(watched.end.filter(|at| *at > killed_at))
                        .map(|at| at.saturating_duration_since(killed_at))
                })
                .collect();
            let ends = group.iter().filter(|watched| watched.end.is_some()).count();
            println!(
                "{:<22} {:>8} {:>18} {:>18} {:>12}",
                format!("{} {}", if moved { "moved" } else { "stayed" }, kind.name()),
                group.len(),
                answered,
                p50_max(&news, group.len()),
                format!("{ends}/{}", group.len()),
            );
        }
    }

    let calls = upstream.calls();
    let gaps: Vec<Duration> = ids
        .iter()
        .filter_map(|id| takeover_gap(&calls, id, victim, killed_at))
        .collect();
    let double = ids
        .iter()
        .map(|id| double_polled(&calls, id, settings.stretch_gap()))
        .max()
        .unwrap_or_default();
    let ttl = settings.interval + LEASE_MARGIN;
    println!(
        "runs the killed replica polled: {}; its last poll → a survivor's first: {} ms (lease TTL = the holder's \
         interval + {LEASE_MARGIN:?} ≈ {:.1} s, then up to one follower turn); leases taken over: {takeovers:.0}; \
         polls made alone (Redis could not coordinate): {fallbacks:.0}",
        gaps.len(),
        p50_max(&gaps, gaps.len()),
        ttl.as_secs_f64(),
    );
    println!(
        "upstream calls per run: {:.1} (watchers' polls {:.1}); longest double-polled span: {:.1} s ({} the lease TTL, \
         {:.1} s)",
        calls.len() as f64 / settings.runs as f64,
        calls.iter().filter(|call| call.by_watcher()).count() as f64 / settings.runs as f64,
        double.as_secs_f64(),
        if double <= ttl { "within" } else { "LONGER THAN" },
        ttl.as_secs_f64(),
    );
    drop(replicas);
}

async fn scrape(client: &TestClient, admin: SocketAddr) -> support::prom::Scrape {
    let response = client
        .send(Method::GET, &format!("http://{admin}/metrics"), &[])
        .await;
    support::prom::Scrape::parse(std::str::from_utf8(&response.body).expect("a UTF-8 exposition"))
}

/// For a run the killed replica polled last before `killed_at`: the time from that poll to the
/// first watcher poll by another replica after it.
fn takeover_gap(calls: &[Call], id: &str, victim: usize, killed_at: Instant) -> Option<Duration> {
    let polls: Vec<&Call> = calls
        .iter()
        .filter(|call| call.run == id && call.by_watcher())
        .collect();
    let last = polls.iter().rev().find(|call| call.at <= killed_at)?;
    if last.replica != victim {
        return None;
    }
    let next = polls
        .iter()
        .find(|call| call.at > killed_at && call.replica != victim)?;
    Some(next.at.saturating_duration_since(last.at))
}

/// The longest span during which two replicas' watchers both polled run `id`: each replica's
/// polls joined into stretches (one poll following another within `gap`), and the longest
/// overlap of two replicas' stretches.
fn double_polled(calls: &[Call], id: &str, gap: Duration) -> Duration {
    let mut by_replica: BTreeMap<usize, Vec<Instant>> = BTreeMap::new();
    for call in calls.iter().filter(|call| call.run == id && call.by_watcher()) {
        by_replica.entry(call.replica).or_default().push(call.at);
    }
    let stretches: Vec<Vec<(Instant, Instant)>> = by_replica
        .into_values()
        .map(|mut times| {
            times.sort_unstable();
            let mut stretches: Vec<(Instant, Instant)> = Vec::new();
            for at in times {
                match stretches.last_mut() {
                    Some((_, end)) if at.saturating_duration_since(*end) <= gap => *end = at,
                    _ => stretches.push((at, at)),
                }
            }
            stretches
        })
        .collect();
    let mut longest = Duration::ZERO;
    for (index, first) in stretches.iter().enumerate() {
        for second in &stretches[index + 1..] {
            for (start_a, end_a) in first {
                for (start_b, end_b) in second {
                    let start = (*start_a).max(*start_b);
                    let end = (*end_a).min(*end_b);
                    longest = longest.max(end.saturating_duration_since(start));
                }
            }
        }
    }
    longest
}

// ---------------------------------------------------------------------------------------------
// The simulated upstream
// ---------------------------------------------------------------------------------------------

/// How the simulated runs move on.
#[derive(Debug, Clone, Copy)]
struct Timing {
    /// A new version this often...
    step: Duration,
    /// ...until the run ends, this long after it started.
    lasts: Duration,
    /// Time taken by every answer.
    latency: Duration,
}

/// One upstream call as the simulated upstream received it.
#[derive(Debug, Clone)]
struct Call {
    run: String,
    /// Which replica made it (the port it came to).
    replica: usize,
    /// The gateway's `x-request-id`: `watch-…` for a watcher's poll.
    request_id: String,
    at: Instant,
}

impl Call {
    fn by_watcher(&self) -> bool {
        self.request_id.starts_with("watch-")
    }
}

#[derive(Default)]
struct Schedule {
    /// When each run started; other ids are 404.
    starts: Mutex<HashMap<String, Instant>>,
    calls: Mutex<Vec<Call>>,
}

/// Runs that move on in time, served on one port per replica so that every call names the replica
/// that made it.
struct Upstream {
    addrs: Vec<SocketAddr>,
    schedule: Arc<Schedule>,
    tasks: Vec<JoinHandle<()>>,
}

impl Upstream {
    async fn start(replicas: usize, timing: Timing) -> Self {
        let schedule = Arc::new(Schedule::default());
        let mut addrs = Vec::new();
        let mut tasks = Vec::new();
        for replica in 0..replicas {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the upstream");
            addrs.push(listener.local_addr().expect("the upstream's address"));
            tasks.push(tokio::spawn(serve_upstream(
                listener,
                replica,
                timing,
                Arc::clone(&schedule),
            )));
        }
        Self {
            addrs,
            schedule,
            tasks,
        }
    }

    fn base_url(&self, replica: usize) -> String {
        format!("http://{}", self.addrs[replica])
    }

    /// Starts the runs' clocks now; returns when.
    fn start_runs(&self, ids: &[String]) -> Instant {
        let now = Instant::now();
        let mut starts = self.schedule.starts.lock().expect("upstream lock");
        for id in ids {
            starts.insert(id.clone(), now);
        }
        now
    }

    fn calls(&self) -> Vec<Call> {
        self.schedule.calls.lock().expect("upstream lock").clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn serve_upstream(listener: TcpListener, replica: usize, timing: Timing, schedule: Arc<Schedule>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let schedule = Arc::clone(&schedule);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                let schedule = Arc::clone(&schedule);
                async move { Ok::<_, Infallible>(answer_upstream(&request, replica, timing, &schedule).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer_upstream(
    request: &Request<hyper::body::Incoming>,
    replica: usize,
    timing: Timing,
    schedule: &Schedule,
) -> Response<Full<Bytes>> {
    let now = Instant::now();
    let id = request
        .uri()
        .path()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let start = schedule.starts.lock().expect("upstream lock").get(&id).copied();
    schedule.calls.lock().expect("upstream lock").push(Call {
        run: id.clone(),
        replica,
        request_id,
        at: now,
    });
    tokio::time::sleep(timing.latency).await;
    let (status, body) = match start {
        None => (
            StatusCode::NOT_FOUND,
            Bytes::from_static(
                br#"{"error":{"code":"NOT_FOUND","message":"run not found","retryable":false}}"#,
            ),
        ),
        Some(start) => {
            let elapsed = now.saturating_duration_since(start);
            let body = if elapsed >= timing.lasts {
                support::push::completed(&id)
            } else {
                let step = (elapsed.as_millis() / timing.step.as_millis()) as u32;
                support::push::running(&id, step, elapsed.as_millis() as u64)
            };
            (StatusCode::OK, body)
        }
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    LongPoll,
    Sse,
}

impl Kind {
    fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "long-poll" | "longpoll" => Some(Self::LongPoll),
            "sse" => Some(Self::Sse),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::LongPoll => "long-poll",
            Self::Sse => "sse",
        }
    }
}

fn kinds_text(kinds: &[Kind]) -> String {
    let names: Vec<&str> = kinds.iter().map(|kind| kind.name()).collect();
    names.join(" and ")
}

/// What one client does: watch a run at `urls[0]`, going on at the next URL when a connection
/// breaks.
struct Plan {
    urls: Vec<String>,
    kind: Kind,
    opens_at: Instant,
    give_up: Instant,
}

/// What one client saw.
#[derive(Debug, Default)]
struct Watched {
    failures: u64,
    /// When each new version reached it.
    news: Vec<Instant>,
    /// When it learnt that the run had ended.
    end: Option<Instant>,
    /// The first broken connection, and the first answer after it (from another replica).
    broke: Option<Instant>,
    answered_again: Option<Instant>,
}

impl Watched {
    fn answered(&mut self) {
        if self.broke.is_some() && self.answered_again.is_none() {
            self.answered_again = Some(Instant::now());
        }
    }
}

/// Which replica a client asks now: the next one after a broken connection.
struct Targets {
    urls: Vec<String>,
    at: usize,
    failed_in_a_row: usize,
}

impl Targets {
    fn url(&self) -> &str {
        &self.urls[self.at]
    }

    /// The connection broke or could not be made: on to the next replica (after a pause once
    /// every one failed in a row).
    async fn failed(&mut self, watched: &mut Watched) {
        watched.failures += 1;
        watched.broke.get_or_insert_with(Instant::now);
        self.at = (self.at + 1) % self.urls.len();
        self.failed_in_a_row += 1;
        if self.failed_in_a_row >= self.urls.len() {
            self.failed_in_a_row = 0;
            tokio::time::sleep(RETRY_AFTER).await;
        }
    }

    fn answered(&mut self, watched: &mut Watched) {
        self.failed_in_a_row = 0;
        watched.answered();
    }
}

async fn watch_run(plan: Plan) -> Watched {
    tokio::time::sleep_until(plan.opens_at.into()).await;
    let http: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let mut watched = Watched::default();
    let mut targets = Targets {
        urls: plan.urls,
        at: 0,
        failed_in_a_row: 0,
    };
    let watching = async {
        match plan.kind {
            Kind::LongPoll => long_poll(&http, &mut targets, &mut watched).await,
            Kind::Sse => stream(&http, &mut targets, &mut watched).await,
        }
    };
    let _ = tokio::time::timeout_at(plan.give_up.into(), watching).await;
    watched
}

/// `?wait=` again and again, with `If-None-Match` of the last `ETag` once it has one, until the
/// run has ended.
async fn long_poll(http: &HttpClient, targets: &mut Targets, watched: &mut Watched) {
    let mut version: Option<HeaderValue> = None;
    loop {
        let url = format!("{}?wait={WAIT}", targets.url());
        let mut request = Request::get(url);
        if let Some(version) = &version {
            request = request.header(IF_NONE_MATCH, version.clone());
        }
        let request = request.body(Empty::new()).expect("a request");
        let answer = match http.request(request).await {
            Ok(response) => {
                let (parts, body) = response.into_parts();
                body.collect().await.map(|body| (parts, body.to_bytes()))
            }
            Err(_) => {
                targets.failed(watched).await;
                continue;
            }
        };
        let Ok((parts, body)) = answer else {
            targets.failed(watched).await;
            continue;
        };
        targets.answered(watched);
        match parts.status {
            StatusCode::OK => {
                let etag = parts.headers.get(ETAG).cloned();
                if has_ended(etag.as_ref(), &body) {
                    watched.end = Some(Instant::now());
                    return;
                }
                if etag != version {
                    watched.news.push(Instant::now());
                }
                version = etag;
            }
            StatusCode::NOT_MODIFIED => {}
            _ => {
                watched.failures += 1;
                tokio::time::sleep(RETRY_AFTER).await;
            }
        }
    }
}

/// A strong `ETag` (only ended runs have one) or an ended status.
fn has_ended(etag: Option<&HeaderValue>, body: &[u8]) -> bool {
    if etag.is_some_and(|etag| !etag.as_bytes().starts_with(b"W/")) {
        return true;
    }
    let status = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|run| run["status"].as_str().map(str::to_owned));
    matches!(status.as_deref(), Some("COMPLETED" | "FAILED" | "CLOSED"))
}

/// An event stream read until its `end` frame: opened again with `Last-Event-ID` when it closes
/// before, at the next replica when it broke.
async fn stream(http: &HttpClient, targets: &mut Targets, watched: &mut Watched) {
    let mut last_id: Option<String> = None;
    loop {
        let mut request = Request::get(targets.url()).header(ACCEPT, "text/event-stream");
        if let Some(id) = &last_id {
            request = request.header("last-event-id", id.as_str());
        }
        let request = request.body(Empty::new()).expect("a request");
        let Ok(response) = http.request(request).await else {
            targets.failed(watched).await;
            continue;
        };
        targets.answered(watched);
        match response.status() {
            // Last-Event-ID named the ended run's version.
            StatusCode::NO_CONTENT => {
                watched.end = Some(Instant::now());
                return;
            }
            StatusCode::OK => {}
            _ => {
                watched.failures += 1;
                tokio::time::sleep(RETRY_AFTER).await;
                continue;
            }
        }
        let mut body = response.into_body();
        let mut read = Vec::new();
        let broke = loop {
            match body.frame().await {
                None => break false,
                Some(Err(_)) => break true,
                Some(Ok(frame)) => {
                    let Some(data) = frame.data_ref() else { continue };
                    read.extend_from_slice(data);
                    while let Some(end) = memchr::memmem::find(&read, b"\n\n") {
                        let block: Vec<u8> = read.drain(..end + 2).collect();
                        let (id, event) = fields(&block);
                        match event.as_deref() {
                            Some("end") => {
                                watched.end = Some(Instant::now());
                                return;
                            }
                            // A new version (a reconnect may repeat the one it has).
                            Some("run") if id.is_some() && id != last_id => {
                                watched.news.push(Instant::now());
                                last_id = id;
                            }
                            Some("run") | None => {}
                            Some(_) => watched.failures += 1,
                        }
                    }
                }
            }
        };
        if broke {
            targets.failed(watched).await;
        }
    }
}

/// The `id:` and `event:` of one block of an event stream.
fn fields(block: &[u8]) -> (Option<String>, Option<String>) {
    let text = String::from_utf8_lossy(block);
    let mut id = None;
    let mut event = None;
    for line in text.lines() {
        if let Some(value) = line.strip_prefix("id: ") {
            id = Some(value.to_owned());
        } else if let Some(value) = line.strip_prefix("event: ") {
            event = Some(value.to_owned());
        }
    }
    (id, event)
}

/// `p50 / max` in milliseconds of `durations`, with how many of `out_of` had none.
fn p50_max(durations: &[Duration], out_of: usize) -> String {
    let mut sorted = durations.to_vec();
    sorted.sort_unstable();
    let (Some(p50), Some(max)) = (sorted.get(sorted.len() / 2), sorted.last()) else {
        return "-".to_owned();
    };
    let missing = out_of.saturating_sub(sorted.len());
    let text = format!("{:.0} / {:.0}", millis(*p50), millis(*max));
    if missing > 0 {
        format!("{text} ({missing} none)")
    } else {
        text
    }
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

//! Waiting clients across replicas (issue 19): with `[cache.shared]`, one watcher per run for the
//! whole fleet.
//!
//! Several gateways (replicas) share a private `redis-server` and one mock upstream; clients are
//! held on the same run on every replica (long-polls that come back with each version they are
//! given, and event streams). Checked: a replica stays subscribed to the fleet's wake-ups; one
//! replica polls for all of them (upstream calls and `fleet_leases_held`) while every client still
//! sees every version and the end; the holder's wake-ups reach the other replicas' clients within
//! moments; a webhook event posted to one replica answers clients held on another, and its
//! redelivery to the others is a duplicate; a holder that dies (SIGKILL) or drains is taken over
//! once its lease lapses (or at once when given back), never with two replicas polling for long;
//! Redis killed or frozen makes every replica poll on its own (never a stuck or wrong answer)
//! until it is back; a holder whose lease was taken from it publishes nothing, and when it takes
//! the lease back the others still learn the version they missed.
//!
//! Watchers here never back off (`max_poll_interval` = `poll_interval`), so a rate of upstream
//! calls says how many replicas poll.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use plextera_gateway::cache::version::weak_etag;
use plextera_gateway::config::SharedCacheConfig;
use plextera_gateway::watch::fleet::LEASE_MARGIN;
use plextera_gateway::webhook::signature::{SIGNATURE_HEADER, sign};
use plextera_gateway::{ApiKey, Config, Secrets};
use secrecy::SecretString;
use support::push::{HELD, WATCHED, completed, is_strong, running};
use support::redis_server::RedisServer;
use support::{
    BodyClient, GatewayProcess, MockUpstream, PATIENCE, Reply, TEST_KEY, TestClient, TestGateway, eventually,
    process_config, prom, runs_path, test_config, write_config,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The replicas' key prefix in Redis.
const PREFIX: &str = "fleet-test:";
/// The run every test watches.
const RUN: &str = "run_fleet";
/// How long long-polls ask to be held (under `PATIENCE`, which bounds every request).
const HOLD_SECS: u32 = 8;

const LEASES: &str = "plextera_gateway_fleet_leases_held";
const TAKEOVERS: &str = "plextera_gateway_fleet_lease_takeovers_total";
const PUBLISHED: &str = "plextera_gateway_fleet_wakeups_published_total";
const RECEIVED: &str = "plextera_gateway_fleet_wakeups_received_total";
const FALLBACKS: &str = "plextera_gateway_fleet_fallbacks_total";
const SUBSCRIBED: &str = "plextera_gateway_fleet_subscribed";
const REDIS_CALLS: &str = "plextera_gateway_shared_cache_duration_seconds_count";

// ---------------------------------------------------------------------------------------------
// Replicas
// ---------------------------------------------------------------------------------------------

fn shared(redis: &RedisServer) -> SharedCacheConfig {
    SharedCacheConfig {
        lock_wait: Duration::from_secs(1),
        // Short, so a test waits for the breaker's rule rather than for the clock.
        circuit_open_for: Duration::from_millis(300),
        ..redis.shared_config(PREFIX)
    }
}

/// A replica's config: Redis shared, watchers polling every `poll` without backing off.
fn replica_config(mock: &MockUpstream, redis: &RedisServer, poll: Duration) -> Config {
    let mut config = test_config(&mock.base_url());
    config.cache.shared = Some(shared(redis));
    config.watch.poll_interval = poll;
    config.watch.max_poll_interval = poll;
    config.watch.sse_keepalive = Duration::from_millis(500);
    config
}

/// `count` replicas on one Redis and one upstream.
async fn start_replicas(
    count: usize,
    mock: &MockUpstream,
    redis: &RedisServer,
    poll: Duration,
) -> Vec<TestGateway> {
    let mut replicas = Vec::new();
    for _ in 0..count {
        replicas.push(TestGateway::start_with(replica_config(mock, redis, poll)).await);
    }
    replicas
}

fn admins(replicas: &[TestGateway]) -> Vec<SocketAddr> {
    replicas.iter().map(|replica| replica.admin).collect()
}

/// The run at version `k` (what `k` changes is its progress).
fn body(k: u32) -> Bytes {
    running(RUN, k, 1000 + 10 * u64::from(k))
}

/// Version `k`'s `ETag`, as every replica computes it.
fn version(k: u32) -> String {
    weak_etag(&body(k)).to_str().expect("ASCII").to_owned()
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

/// `/metrics` on an admin port (an in-process replica's or a process's).
async fn scrape(admin: SocketAddr) -> prom::Scrape {
    let response = TestClient::new()
        .send(Method::GET, &format!("http://{admin}/metrics"), &[])
        .await;
    assert_eq!(response.status, StatusCode::OK);
    prom::Scrape::parse(std::str::from_utf8(&response.body).expect("utf-8 exposition"))
}

async fn metric(admin: SocketAddr, name: &str) -> f64 {
    scrape(admin).await.expect(name, &[])
}

/// `name` on every replica, in order.
async fn each(admins: &[SocketAddr], name: &str) -> Vec<f64> {
    let mut values = Vec::new();
    for admin in admins {
        values.push(metric(*admin, name).await);
    }
    values
}

/// `name` summed over the replicas.
async fn total(admins: &[SocketAddr], name: &str) -> f64 {
    each(admins, name).await.iter().sum()
}

async fn until_total(admins: &[SocketAddr], name: &str, value: f64) {
    eventually(&format!("{name} sums to {value} over the replicas"), || async {
        total(admins, name).await == value
    })
    .await;
}

/// Waits until `name` is `value` on every replica.
async fn until_each(admins: &[SocketAddr], name: &str, value: f64) {
    eventually(&format!("{name} is {value} on every replica"), || async {
        each(admins, name).await.iter().all(|each| *each == value)
    })
    .await;
}

/// Waits until `name` has moved past `before` (per replica) on every replica.
async fn until_each_moved(admins: &[SocketAddr], name: &str, before: &[f64]) {
    eventually(&format!("{name} moves on every replica"), || async {
        each(admins, name)
            .await
            .iter()
            .zip(before)
            .all(|(now, before)| now > before)
    })
    .await;
}

/// The replica holding the run's lease, once exactly one does.
async fn holder(admins: &[SocketAddr]) -> usize {
    until_total(admins, LEASES, 1.0).await;
    let leases = each(admins, LEASES).await;
    leases
        .iter()
        .position(|held| *held == 1.0)
        .unwrap_or_else(|| panic!("no single holder: {leases:?}"))
}

/// Lease calls (take, renew, release) a replica made: one per watcher turn.
async fn lease_calls(admin: SocketAddr) -> f64 {
    scrape(admin)
        .await
        .value(REDIS_CALLS, &[("op", "lease")])
        .unwrap_or(0.0)
}

/// Waits until a replica has made a lease call since it had made `before`: a watcher turn.
async fn until_turn(admin: SocketAddr, before: f64) {
    eventually("the replica's watcher has a turn", || async {
        lease_calls(admin).await > before
    })
    .await;
}

/// Waits until a replica holds exactly these numbers of long-polls and streams.
async fn until_held(admin: SocketAddr, long_polls: usize, streams: usize) {
    eventually(
        &format!("{long_polls} long-polls and {streams} streams are held on {admin}"),
        || async {
            let scrape = scrape(admin).await;
            scrape.expect(HELD, &[("kind", "long_poll")]) == long_polls as f64
                && scrape.expect(HELD, &[("kind", "sse")]) == streams as f64
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Upstream calls
// ---------------------------------------------------------------------------------------------

/// Upstream calls for the run the mock received since `from`.
fn calls_since(mock: &MockUpstream, from: Instant) -> usize {
    let path = runs_path(RUN);
    mock.requests()
        .iter()
        .filter(|request| request.target == path && request.at >= from)
        .count()
}

/// The most calls one watcher polling every `poll` makes in `window` (each of its sleeps is at
/// most a tenth short).
fn one_watcher(window: Duration, poll: Duration) -> usize {
    (window.as_secs_f64() / (poll.as_secs_f64() * 0.9)).floor() as usize + 1
}

/// Upstream calls for the run over the next `window` (a rate: this is a measurement, not a sync).
async fn calls_over(mock: &MockUpstream, window: Duration) -> usize {
    let from = Instant::now();
    tokio::time::sleep(window).await;
    calls_since(mock, from)
}

/// Checks that one replica polls the run: over `window`, no more calls than one watcher makes.
async fn assert_one_poller(mock: &MockUpstream, window: Duration, poll: Duration, when: &str) {
    let calls = calls_over(mock, window).await;
    let most = one_watcher(window, poll);
    eprintln!("{when}: {calls} calls in {window:?} (one watcher: at most {most})");
    assert!(
        calls <= most,
        "{when}: {calls} upstream calls in {window:?}; one watcher polling every {poll:?} makes at most {most}"
    );
}

// ---------------------------------------------------------------------------------------------
// Held clients
// ---------------------------------------------------------------------------------------------

/// One thing a held client was given: a version of the run, or its end.
#[derive(Debug, Clone)]
struct Got {
    at: Instant,
    version: String,
    body: Bytes,
    end: bool,
}

/// Everything a held client was given so far.
#[derive(Debug, Clone, Default)]
struct Given {
    got: Vec<Got>,
    /// Why it stopped before the end (its replica went away, an unexpected answer).
    gone: Option<String>,
}

/// A client held on the run on one replica, in a task of its own.
struct Client {
    name: String,
    given: watch::Receiver<Given>,
    task: JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A long-poll client holding version `known`: each time it is given a new version it comes back
/// with it, until the end or `answers` versions.
fn long_poll(replica: SocketAddr, known: &str, answers: usize, name: &str) -> Client {
    let (given, receiver) = watch::channel(Given::default());
    let url = format!("http://{replica}{}?wait={HOLD_SECS}", runs_path(RUN));
    let mut known = known.to_owned();
    let task = tokio::spawn(async move {
        let client = TestClient::new();
        let mut left = answers;
        while left > 0 {
            let response = match client
                .try_send(Method::GET, &url, &[("if-none-match", &known)])
                .await
            {
                Ok(response) => response,
                Err(error) => return given.send_modify(|given| given.gone = Some(error)),
            };
            match response.status {
                // The wait ran out (or the replica drains): hold again.
                StatusCode::NOT_MODIFIED => {}
                StatusCode::OK => {
                    let version = response.header("etag").expect("a version").to_owned();
                    let end = is_strong(&version);
                    given.send_modify(|given| {
                        given.got.push(Got {
                            at: Instant::now(),
                            version: version.clone(),
                            body: response.body.clone(),
                            end,
                        });
                    });
                    if end {
                        return;
                    }
                    known = version;
                    left -= 1;
                }
                status => {
                    let body = String::from_utf8_lossy(&response.body).into_owned();
                    return given.send_modify(|given| given.gone = Some(format!("{status}: {body}")));
                }
            }
        }
    });
    Client {
        name: name.to_owned(),
        given: receiver,
        task,
    }
}

/// An event-stream client on the run, from its first frame to its `end`.
fn stream(replica: SocketAddr, name: &str) -> Client {
    let (given, receiver) = watch::channel(Given::default());
    let task = tokio::spawn(async move {
        let mut stream = support::sse::open(replica, &runs_path(RUN), &[]).await;
        if stream.status != StatusCode::OK {
            let status = stream.status;
            let body = stream.into_body().await;
            let body = String::from_utf8_lossy(&body).into_owned();
            return given.send_modify(|given| given.gone = Some(format!("{status}: {body}")));
        }
        loop {
            let Some(event) = stream.next_event().await else {
                return given.send_modify(|given| given.gone = Some("closed before the end".to_owned()));
            };
            let end = match event.kind() {
                // The `retry:` block.
                "" => continue,
                "run" => false,
                "end" => true,
                other => {
                    return given
                        .send_modify(|given| given.gone = Some(format!("a {other} frame: {event:?}")));
                }
            };
            given.send_modify(|given| {
                given.got.push(Got {
                    at: Instant::now(),
                    version: event.id().to_owned(),
                    body: Bytes::from(event.data.clone().unwrap_or_default()),
                    end,
                });
            });
            if end {
                return stream.expect_closed().await;
            }
        }
    });
    Client {
        name: name.to_owned(),
        given: receiver,
        task,
    }
}

impl Client {
    /// Waits until `done` holds for what it was given; fails if it stops first or `PATIENCE`
    /// passes.
    async fn until(&self, what: &str, mut done: impl FnMut(&Given) -> bool) -> Given {
        let mut given = self.given.clone();
        let waited = tokio::time::timeout(
            PATIENCE,
            given.wait_for(|given| done(given) || given.gone.is_some()),
        )
        .await;
        match waited {
            Err(_) => panic!(
                "{}: not {what} in time; it was given {:?}",
                self.name,
                self.versions()
            ),
            Ok(Err(_)) => panic!(
                "{}: its task failed before {what}; it was given {:?}",
                self.name,
                self.versions()
            ),
            Ok(Ok(given)) => {
                let given = given.clone();
                assert!(
                    done(&given),
                    "{}: stopped before {what} ({:?}); it was given {:?}",
                    self.name,
                    given.gone,
                    self.versions()
                );
                given
            }
        }
    }

    /// Waits until it was given `version`, and returns when.
    async fn saw(&self, version: &str) -> Instant {
        let given = self
            .until(&format!("given {version}"), |given| {
                given.got.iter().any(|got| got.version == version)
            })
            .await;
        given
            .got
            .iter()
            .find(|got| got.version == version)
            .expect("found")
            .at
    }

    /// Waits until it was given the end, and returns when.
    async fn ended(&self) -> Instant {
        let given = self
            .until("given the end", |given| given.got.iter().any(|got| got.end))
            .await;
        given.got.iter().find(|got| got.end).expect("found").at
    }

    fn has_seen(&self, version: &str) -> bool {
        self.given.borrow().got.iter().any(|got| got.version == version)
    }

    fn versions(&self) -> Vec<String> {
        self.given
            .borrow()
            .got
            .iter()
            .map(|got| {
                if got.end {
                    format!("end {}", got.version)
                } else {
                    got.version.clone()
                }
            })
            .collect()
    }

    /// Checks it was given exactly versions `ks`, each with its body, then the end.
    fn assert_given(&self, ks: &[u32]) {
        let got = self.given.borrow().got.clone();
        let expected: Vec<String> = ks.iter().map(|k| version(*k)).collect();
        let versions: Vec<String> = got
            .iter()
            .filter(|got| !got.end)
            .map(|got| got.version.clone())
            .collect();
        assert_eq!(versions, expected, "{}: the versions it was given", self.name);
        for (got, k) in got.iter().zip(ks) {
            assert_eq!(got.body, body(*k), "{}: version {k}'s body", self.name);
        }
        let last = got.last().expect("given something");
        assert!(
            last.end,
            "{}: the end comes last: {:?}",
            self.name,
            self.versions()
        );
        assert!(
            is_strong(&last.version),
            "{}: the end's version {}",
            self.name,
            last.version
        );
        assert_eq!(last.body, completed(RUN), "{}: the ended run's body", self.name);
    }
}

/// A client on a replica that was given a state at `at`: how long after `reference`.
fn lag(at: Instant, reference: Instant) -> Duration {
    at.saturating_duration_since(reference)
}

// ---------------------------------------------------------------------------------------------
// 0. The subscription
// ---------------------------------------------------------------------------------------------

/// A replica watching a run keeps its subscription to the fleet's wake-ups turn after turn, past
/// the subscription's PINGs (one a second): its watcher coordinates through Redis instead of
/// polling on its own. Everything else here rests on this.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_watching_a_run_stays_subscribed_to_the_fleets_wake_ups() {
    const POLL: Duration = Duration::from_millis(100);
    let redis = RedisServer::start(&[]);
    let mock = MockUpstream::start().await;
    mock.set(RUN, Reply::ok(body(1)));
    let replica = TestGateway::start_with(replica_config(&mock, &redis, POLL)).await;
    let _client = long_poll(replica.public, &version(1), usize::MAX, "long-poll");
    until_held(replica.admin, 1, 0).await;
    // A watcher turn either goes through the lease or polls on its own (a fallback).
    let turns = || async { lease_calls(replica.admin).await + metric(replica.admin, FALLBACKS).await };
    eventually("the watcher's first turn", || async { turns().await >= 1.0 }).await;
    let fallbacks = metric(replica.admin, FALLBACKS).await;
    eventually("25 more turns, over two PINGs", || async {
        turns().await >= 26.0
    })
    .await;
    let scrape = scrape(replica.admin).await;
    assert_eq!(
        scrape.expect(FALLBACKS, &[]) - fallbacks,
        0.0,
        "turns that polled on their own because the subscription was down"
    );
    assert_eq!(scrape.expect(SUBSCRIBED, &[]), 1.0, "subscribed to the wake-ups");
    assert_eq!(scrape.expect(LEASES, &[]), 1.0, "it holds the run's lease");
}

// ---------------------------------------------------------------------------------------------
// 1. One watcher per run for the fleet
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_polls_a_run_for_the_whole_fleet_and_every_client_sees_every_version() {
    const POLL: Duration = Duration::from_millis(150);
    let redis = RedisServer::start(&[]);
    let mock = MockUpstream::start().await;
    mock.set(RUN, Reply::ok(body(1)));
    let replicas = start_replicas(3, &mock, &redis, POLL).await;
    let admins = admins(&replicas);

    // Two long-polls and a stream on each replica (each replica's first client fetches the run).
    let mut long_polls = Vec::new();
    for (index, replica) in replicas.iter().enumerate() {
        for n in 0..2 {
            let name = format!("long-poll {n} on replica {index}");
            long_polls.push(long_poll(replica.public, &version(1), usize::MAX, &name));
        }
    }
    for admin in &admins {
        until_held(*admin, 2, 0).await;
    }
    let streams: Vec<Client> = replicas
        .iter()
        .enumerate()
        .map(|(index, replica)| stream(replica.public, &format!("stream on replica {index}")))
        .collect();
    for admin in &admins {
        until_held(*admin, 2, 1).await;
    }
    for client in &streams {
        client.saw(&version(1)).await;
    }
    let start = Instant::now();
    until_total(&admins, LEASES, 1.0).await;
    let fallbacks = total(&admins, FALLBACKS).await;

    for k in 2..=4 {
        mock.set(RUN, Reply::ok(body(k)));
        for client in long_polls.iter().chain(&streams) {
            client.saw(&version(k)).await;
        }
        assert_eq!(
            each(&admins, LEASES).await.iter().sum::<f64>(),
            1.0,
            "one replica holds the run's lease while it is watched"
        );
        for admin in &admins {
            until_held(*admin, 2, 1).await;
        }
    }
    mock.set(RUN, Reply::ok(completed(RUN)));
    for client in long_polls.iter().chain(&streams) {
        client.ended().await;
    }
    let elapsed = start.elapsed();
    let calls = calls_since(&mock, start);
    let one = one_watcher(elapsed, POLL);
    eprintln!("3 replicas, 9 clients: {calls} upstream calls in {elapsed:?} (one watcher: at most {one})");
    assert!(
        calls <= one + 2,
        "{calls} upstream calls in {elapsed:?} for 3 replicas; one watcher polling every {POLL:?} makes at most {one}"
    );

    for client in &long_polls {
        client.assert_given(&[2, 3, 4]);
    }
    for client in &streams {
        client.assert_given(&[1, 2, 3, 4]);
    }
    // The holder published each new version and the end once (and perhaps what it found as it took
    // the lease); the two others received them all.
    let published = total(&admins, PUBLISHED).await;
    let received = total(&admins, RECEIVED).await;
    assert!((4.0..=5.0).contains(&published), "{published} wake-ups published");
    assert!(
        received >= 8.0 && received <= 2.0 * published,
        "{received} wake-ups received for {published} published"
    );
    assert_eq!(
        total(&admins, FALLBACKS).await,
        fallbacks,
        "Redis coordinated every turn"
    );
    assert_eq!(each(&admins, SUBSCRIBED).await, vec![1.0; 3]);
    // The lease is given back once the run ended.
    until_total(&admins, LEASES, 0.0).await;
    eventually("the lease key is gone", || async { !lease_exists(&redis).await }).await;
}

// ---------------------------------------------------------------------------------------------
// 2. Wake-ups reach the other replicas within moments
// ---------------------------------------------------------------------------------------------

/// How long after the holder's clients the other replicas' clients may be answered. Measured: a
/// few milliseconds. A follower polling on its own every half second would lag by up to 500 ms.
const WAKE_UP: Duration = Duration::from_millis(150);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_the_holder_sees_reaches_the_other_replicas_clients_within_moments() {
    const POLL: Duration = Duration::from_millis(500);
    let redis = RedisServer::start(&[]);
    let mock = MockUpstream::start().await;
    mock.set(RUN, Reply::ok(body(1)));
    let replicas = start_replicas(3, &mock, &redis, POLL).await;
    let admins = admins(&replicas);
    let mut clients: Vec<(usize, Client)> = Vec::new();
    for (index, replica) in replicas.iter().enumerate() {
        let name = format!("long-poll on replica {index}");
        clients.push((index, long_poll(replica.public, &version(1), usize::MAX, &name)));
        until_held(replica.admin, 1, 0).await;
        clients.push((
            index,
            stream(replica.public, &format!("stream on replica {index}")),
        ));
        until_held(replica.admin, 1, 1).await;
    }
    let holder = holder(&admins).await;
    let received = each(&admins, RECEIVED).await;
    let published = each(&admins, PUBLISHED).await;

    let mut worst = Duration::ZERO;
    for k in 2..=5 {
        let end = k == 5;
        mock.set(RUN, Reply::ok(if end { completed(RUN) } else { body(k) }));
        let mut answered = Vec::new();
        for (index, client) in &clients {
            let at = if end {
                client.ended().await
            } else {
                client.saw(&version(k)).await
            };
            answered.push((*index, at));
        }
        let first_at_holder = answered
            .iter()
            .filter(|(index, _)| *index == holder)
            .map(|(_, at)| *at)
            .min()
            .expect("clients on the holder");
        let lags: Vec<Duration> = answered
            .iter()
            .filter(|(index, _)| *index != holder)
            .map(|(_, at)| lag(*at, first_at_holder))
            .collect();
        let slowest = lags.iter().max().copied().unwrap_or_default();
        eprintln!("change {k}: the other replicas' clients answered {lags:?} after the holder's");
        worst = worst.max(slowest);
        if !end {
            for admin in &admins {
                until_held(*admin, 1, 1).await;
            }
        }
    }
    assert!(
        worst <= WAKE_UP,
        "the other replicas' clients were answered up to {worst:?} after the holder's (at most {WAKE_UP:?})"
    );
    // Each new version and the end, published by the holder only (perhaps with what it found as
    // it took the lease) and received by each of the others.
    let received_now = each(&admins, RECEIVED).await;
    let published_now = each(&admins, PUBLISHED).await;
    let by_holder = published_now[holder] - published[holder];
    assert!(
        (4.0..=5.0).contains(&by_holder),
        "{by_holder} wake-ups published by the holder"
    );
    for index in (0..admins.len()).filter(|index| *index != holder) {
        assert_eq!(
            published_now[index] - published[index],
            0.0,
            "wake-ups published by follower {index}"
        );
        assert_eq!(
            received_now[index] - received[index],
            by_holder,
            "wake-ups received by follower {index}"
        );
    }
    assert_eq!(received_now[holder], received[holder], "the holder skips its own");
}

// ---------------------------------------------------------------------------------------------
// 3. Webhook events across replicas
// ---------------------------------------------------------------------------------------------

const SECRET: &str = "whsec_fleet";
const WEBHOOK_PATH: &str = "/webhooks/plextera";
const EVENTS: &str = "plextera_gateway_webhook_events_total";
/// How soon after an event's `202` on one replica a client held on another is answered.
const PROMPT: Duration = Duration::from_millis(250);

/// A replica with the webhook listener and the fleet's signing secret; its watchers make no call
/// during the test, so only an event explains an answer.
async fn webhook_replica(mock: &MockUpstream, redis: &RedisServer) -> TestGateway {
    let mut config = replica_config(mock, redis, Duration::from_secs(30));
    config.watch.max_poll_interval = Duration::from_secs(60);
    config.webhook.listen = Some("127.0.0.1:0".parse().expect("an address"));
    config.webhook.secrets_env = Some("PLEXTERA_WEBHOOK_SECRETS".to_owned());
    config.webhook.safety_poll_interval = Duration::from_secs(60);
    let secrets = Secrets {
        webhook_secrets: Some(vec![SecretString::from(SECRET)]),
        ..Secrets::key_only(ApiKey::new(TEST_KEY).expect("the test key"))
    };
    TestGateway::start_with_secrets(config, secrets).await
}

/// Posts a signed `workflow.run.completed` event for the run to a replica's webhook port.
async fn post_completed(replica: &TestGateway, event_id: &str) -> support::TestResponse {
    let event = Bytes::from(format!(
        r#"{{"eventId":"{event_id}","eventType":"workflow.run.completed","occurredAt":"2026-01-01T00:00:00Z","apiVersion":"v1","data":{{"runId":"{RUN}","status":"COMPLETED"}}}}"#
    ));
    let signature = sign(SECRET.as_bytes(), &event, std::time::SystemTime::now());
    let url = format!(
        "http://{}{WEBHOOK_PATH}",
        replica.webhook.expect("the webhook listener")
    );
    BodyClient::new()
        .post(
            &url,
            &[
                ("content-type", "application/json"),
                ("x-plextera-event-type", "workflow.run.completed"),
                (SIGNATURE_HEADER, &signature),
            ],
            event,
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_posted_to_one_replica_answers_clients_held_on_another_and_is_a_duplicate_on_a_third() {
    let redis = RedisServer::start(&[]);
    let mock = MockUpstream::start().await;
    mock.set(RUN, Reply::ok(body(1)));
    let a = webhook_replica(&mock, &redis).await;
    let b = webhook_replica(&mock, &redis).await;
    let c = webhook_replica(&mock, &redis).await;

    let long_poll_b = long_poll(b.public, &version(1), usize::MAX, "long-poll on B");
    until_held(b.admin, 1, 0).await;
    let stream_b = stream(b.public, "stream on B");
    until_held(b.admin, 1, 1).await;
    until_each(&[b.admin], SUBSCRIBED, 1.0).await;
    mock.set(RUN, Reply::ok(completed(RUN)));
    let calls = mock.count_for(RUN);

    let accepted = post_completed(&a, "evt_fleet_1").await;
    let acknowledged = Instant::now();
    assert_eq!(accepted.status, StatusCode::ACCEPTED, "{:?}", accepted.body);
    let lags = [
        lag(long_poll_b.ended().await, acknowledged),
        lag(stream_b.ended().await, acknowledged),
    ];
    eprintln!("clients on B answered {lags:?} after A acknowledged the event");
    for lag in lags {
        assert!(
            lag <= PROMPT,
            "a client on B was answered {lag:?} after the event (at most {PROMPT:?})"
        );
    }
    long_poll_b.assert_given(&[]);
    stream_b.assert_given(&[1]);
    assert_eq!(
        mock.count_for(RUN),
        calls + 1,
        "A's confirming call, and none for B's clients"
    );
    assert_eq!(
        metric(b.admin, RECEIVED).await,
        1.0,
        "B received A's announcement"
    );

    // Plextera delivers the same event again, to B then to C: done once for the whole fleet.
    for (replica, name) in [(&b, "B"), (&c, "C")] {
        let again = post_completed(replica, "evt_fleet_1").await;
        assert_eq!(again.status, StatusCode::OK, "{name}: {:?}", again.body);
        assert_eq!(
            again.json(),
            serde_json::json!({ "status": "duplicate" }),
            "{name}"
        );
        assert_eq!(
            scrape(replica.admin).await.expect(
                EVENTS,
                &[("type", "workflow.run.completed"), ("outcome", "duplicate")]
            ),
            1.0,
            "{name}"
        );
    }
    assert_eq!(
        mock.count_for(RUN),
        calls + 1,
        "a redelivery makes no upstream call"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Lease takeover
// ---------------------------------------------------------------------------------------------

fn lease_key() -> String {
    format!("{PREFIX}watch:{RUN}")
}

async fn lease_exists(redis: &RedisServer) -> bool {
    let exists: bool = redis::cmd("EXISTS")
        .arg(lease_key())
        .query_async(&mut redis.client().await)
        .await
        .expect("EXISTS");
    exists
}

/// How long the run's lease has left, per Redis.
async fn lease_ttl(redis: &RedisServer) -> Duration {
    let millis: i64 = redis::cmd("PTTL")
        .arg(lease_key())
        .query_async(&mut redis.client().await)
        .await
        .expect("PTTL");
    assert!(millis > 0, "the lease is held with a TTL: PTTL {millis}");
    Duration::from_millis(u64::try_from(millis).expect("positive"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_clients_takes_over_once_the_holder_dies() {
    const POLL: Duration = Duration::from_millis(200);
    let redis = RedisServer::start(&[]);
    let mock = MockUpstream::start().await;
    mock.set(RUN, Reply::ok(body(1)));

    // The holder: the real binary, so it can die without a word.
    let dir = tempfile::tempdir().expect("temp dir");
    let text = format!(
        "{}[cache.shared]\nurl = \"{}\"\ntimeout = \"200ms\"\nkey_prefix = \"{PREFIX}\"\ncircuit_open_for = \"300ms\"\n\
         [watch]\npoll_interval = \"200ms\"\nmax_poll_interval = \"200ms\"\nsse_keepalive = \"500ms\"\n",
        process_config(&mock.base_url(), ""),
        redis.url()
    );
    let config = write_config(dir.path(), &text);
    let mut process = GatewayProcess::start(&["--config", &config], &[("GW_TEST_KEY", TEST_KEY)]);
    let on_process = long_poll(
        process.public,
        &version(1),
        usize::MAX,
        "long-poll on the process",
    );
    until_held(process.admin, 1, 0).await;
    holder(&[process.admin]).await;

    // Two in-process replicas follow, each with a long-poll and a stream.
    let replicas = start_replicas(2, &mock, &redis, POLL).await;
    let admins = admins(&replicas);
    let mut clients = Vec::new();
    for (index, replica) in replicas.iter().enumerate() {
        clients.push(long_poll(
            replica.public,
            &version(1),
            usize::MAX,
            &format!("long-poll on replica {index}"),
        ));
        until_held(replica.admin, 1, 0).await;
        clients.push(stream(replica.public, &format!("stream on replica {index}")));
        until_held(replica.admin, 1, 1).await;
        until_turn(replica.admin, 0.0).await;
    }
    assert_eq!(total(&admins, LEASES).await, 0.0, "they follow the process");
    assert_one_poller(
        &mock,
        Duration::from_millis(1200),
        POLL,
        "while the process holds the lease",
    )
    .await;
    mock.set(RUN, Reply::ok(body(2)));
    on_process.saw(&version(2)).await;
    for client in &clients {
        client.saw(&version(2)).await;
    }
    until_each(&admins, RECEIVED, 1.0).await;

    // The holder dies: its lease lapses after its TTL, and one of the others takes it.
    let ttl = lease_ttl(&redis).await;
    process.send_signal("KILL");
    let killed = Instant::now();
    process.wait();
    drop(on_process);
    assert!(
        ttl <= POLL + LEASE_MARGIN,
        "the lease's TTL is {ttl:?}: at most the holder's interval and the margin"
    );
    until_total(&admins, LEASES, 1.0).await;
    let took = killed.elapsed();
    let calls_while_lapsing = calls_since(&mock, killed);
    eprintln!("taken over {took:?} after the holder died (its lease had {ttl:?} left)");
    assert!(
        took + Duration::from_millis(50) >= ttl,
        "taken after {took:?}, while the dead holder's lease still had {ttl:?} to run"
    );
    assert!(
        took <= ttl + POLL + Duration::from_secs(1),
        "taken {took:?} after the holder died; its lease had {ttl:?} left"
    );
    assert!(
        calls_while_lapsing <= 1,
        "{calls_while_lapsing} calls while the dead holder's lease lapsed: only the new holder's first"
    );
    let leases = each(&admins, LEASES).await;
    let new_holder = leases.iter().position(|held| *held == 1.0).expect("a holder");
    assert!(
        metric(admins[new_holder], TAKEOVERS).await >= 1.0,
        "the new holder counts a takeover"
    );
    assert_one_poller(&mock, Duration::from_millis(1200), POLL, "after the takeover").await;

    // The run goes on and ends: every client left is told.
    mock.set(RUN, Reply::ok(body(3)));
    for client in &clients {
        client.saw(&version(3)).await;
    }
    for admin in &admins {
        until_held(*admin, 1, 1).await;
    }
    mock.set(RUN, Reply::ok(completed(RUN)));
    for client in &clients {
        client.ended().await;
    }
    for (n, client) in clients.iter().enumerate() {
        if n % 2 == 0 {
            client.assert_given(&[2, 3]);
        } else {
            client.assert_given(&[1, 2, 3]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_drains_gives_its_lease_back_and_a_follower_takes_over_at_once() {
    const POLL: Duration = Duration::from_millis(200);
    let redis = RedisServer::start(&[]);
    let mock = MockUpstream::start().await;
    mock.set(RUN, Reply::ok(body(1)));
    let mut replicas = start_replicas(2, &mock, &redis, POLL).await;
    let admins = admins(&replicas);
    let _on_a = long_poll(replicas[0].public, &version(1), usize::MAX, "long-poll on A");
    until_held(admins[0], 1, 0).await;
    assert_eq!(holder(&admins).await, 0);
    let on_b = [
        long_poll(replicas[1].public, &version(1), usize::MAX, "long-poll on B"),
        stream(replicas[1].public, "stream on B"),
    ];
    until_held(admins[1], 1, 1).await;
    until_turn(admins[1], 0.0).await;
    assert_eq!(metric(admins[1], LEASES).await, 0.0, "B follows");

    let draining = Instant::now();
    replicas[0].begin_shutdown();
    replicas[0].stopped().await;
    eventually("B holds the lease", || async {
        metric(admins[1], LEASES).await == 1.0
    })
    .await;
    let took = draining.elapsed();
    eprintln!("taken over {took:?} after the holder began draining");
    assert!(
        took < POLL + Duration::from_secs(1),
        "taken over after {took:?}: the drained holder gave its lease back, nobody waits for it to lapse"
    );
    assert!(metric(admins[1], TAKEOVERS).await >= 1.0);
    assert_one_poller(&mock, Duration::from_millis(1200), POLL, "after the takeover").await;
    mock.set(RUN, Reply::ok(body(2)));
    for client in &on_b {
        client.saw(&version(2)).await;
    }
    until_held(admins[1], 1, 1).await;
    mock.set(RUN, Reply::ok(completed(RUN)));
    for client in &on_b {
        client.ended().await;
    }
    on_b[0].assert_given(&[2]);
    on_b[1].assert_given(&[1, 2]);
}

// ---------------------------------------------------------------------------------------------
// 5. Redis down or frozen
// ---------------------------------------------------------------------------------------------

/// Three replicas, a long-poll and a stream on each, coordinated through Redis.
async fn fleet_with_clients(
    mock: &MockUpstream,
    redis: &RedisServer,
    poll: Duration,
) -> (Vec<TestGateway>, Vec<Client>) {
    mock.set(RUN, Reply::ok(body(1)));
    let replicas = start_replicas(3, mock, redis, poll).await;
    let mut clients = Vec::new();
    for (index, replica) in replicas.iter().enumerate() {
        let name = format!("long-poll on replica {index}");
        clients.push(long_poll(replica.public, &version(1), usize::MAX, &name));
        until_held(replica.admin, 1, 0).await;
        clients.push(stream(replica.public, &format!("stream on replica {index}")));
        until_held(replica.admin, 1, 1).await;
    }
    let admins = admins(&replicas);
    until_each(&admins, SUBSCRIBED, 1.0).await;
    holder(&admins).await;
    (replicas, clients)
}

/// Sets version `k` and waits until every client has it; returns how long that took.
async fn change(mock: &MockUpstream, clients: &[Client], admins: &[SocketAddr], k: u32) -> Duration {
    let changed = Instant::now();
    mock.set(RUN, Reply::ok(body(k)));
    let mut slowest = Duration::ZERO;
    for client in clients {
        slowest = slowest.max(lag(client.saw(&version(k)).await, changed));
    }
    for admin in admins {
        until_held(*admin, 1, 1).await;
    }
    slowest
}

/// Waits until the replicas coordinate again: all subscribed, one lease, in Redis too.
async fn until_coordinated(admins: &[SocketAddr], redis: &RedisServer) {
    until_each(admins, SUBSCRIBED, 1.0).await;
    eventually("one replica holds the run's lease again", || async {
        total(admins, LEASES).await == 1.0 && lease_exists(redis).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_gone_every_replica_polls_on_its_own_and_shares_again_once_it_is_back() {
    const POLL: Duration = Duration::from_millis(150);
    let mut redis = RedisServer::start(&[]);
    let mock = MockUpstream::start().await;
    let (replicas, clients) = fleet_with_clients(&mock, &redis, POLL).await;
    let admins = admins(&replicas);
    assert_one_poller(&mock, Duration::from_millis(1200), POLL, "coordinated").await;

    let fallbacks = each(&admins, FALLBACKS).await;
    redis.kill();
    until_each(&admins, SUBSCRIBED, 0.0).await;
    until_each_moved(&admins, FALLBACKS, &fallbacks).await;
    let window = Duration::from_millis(1200);
    let calls = calls_over(&mock, window).await;
    eprintln!("Redis down: {calls} calls in {window:?}");
    assert!(
        calls > one_watcher(window, POLL),
        "with Redis down each replica polls on its own: {calls} calls in {window:?}"
    );
    let took = change(&mock, &clients, &admins, 2).await;
    eprintln!("Redis down: every client had version 2 within {took:?}");

    redis.restart();
    until_coordinated(&admins, &redis).await;
    let fallbacks = each(&admins, FALLBACKS).await;
    assert_one_poller(&mock, Duration::from_millis(1200), POLL, "Redis back").await;
    assert_eq!(
        each(&admins, FALLBACKS).await,
        fallbacks,
        "no watcher polls on its own once Redis is back"
    );
    assert_eq!(total(&admins, LEASES).await, 1.0);
    change(&mock, &clients, &admins, 3).await;
    mock.set(RUN, Reply::ok(completed(RUN)));
    for client in &clients {
        client.ended().await;
    }
    for (n, client) in clients.iter().enumerate() {
        client.assert_given(if n % 2 == 0 { &[2, 3] } else { &[1, 2, 3] });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_frozen_clients_are_still_answered_and_sharing_resumes_when_it_thaws() {
    const POLL: Duration = Duration::from_millis(150);
    let redis = RedisServer::start(&[]);
    let mock = MockUpstream::start().await;
    let (replicas, clients) = fleet_with_clients(&mock, &redis, POLL).await;
    let admins = admins(&replicas);

    let fallbacks = each(&admins, FALLBACKS).await;
    redis.pause();
    let frozen = Instant::now();
    let took = change(&mock, &clients, &admins, 2).await;
    eprintln!("Redis frozen: every client had version 2 within {took:?}");
    until_each_moved(&admins, FALLBACKS, &fallbacks).await;
    until_each(&admins, SUBSCRIBED, 0.0).await;
    let took = change(&mock, &clients, &admins, 3).await;
    eprintln!("Redis frozen: every client had version 3 within {took:?}");
    eprintln!("Redis thawed after {:?}", frozen.elapsed());

    redis.resume();
    until_coordinated(&admins, &redis).await;
    assert_one_poller(&mock, Duration::from_millis(1200), POLL, "Redis thawed").await;
    mock.set(RUN, Reply::ok(completed(RUN)));
    for client in &clients {
        client.ended().await;
    }
    for (n, client) in clients.iter().enumerate() {
        client.assert_given(if n % 2 == 0 { &[2, 3] } else { &[1, 2, 3] });
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Fencing
// ---------------------------------------------------------------------------------------------

/// Replica A holds the lease (a long-poll on it, taking `a_answers` answers, came first); replica B
/// follows with a long-poll and a stream. Returns A, B and their clients.
async fn holder_and_follower(
    mock: &MockUpstream,
    redis: &RedisServer,
    (poll_a, poll_b): (Duration, Duration),
    a_answers: usize,
) -> (TestGateway, TestGateway, Client, [Client; 2]) {
    mock.set(RUN, Reply::ok(body(1)));
    let a = TestGateway::start_with(replica_config(mock, redis, poll_a)).await;
    let b = TestGateway::start_with(replica_config(mock, redis, poll_b)).await;
    let on_a = long_poll(a.public, &version(1), a_answers, "long-poll on A");
    until_held(a.admin, 1, 0).await;
    assert_eq!(holder(&[a.admin, b.admin]).await, 0);
    let on_b = [
        long_poll(b.public, &version(1), usize::MAX, "long-poll on B"),
        stream(b.public, "stream on B"),
    ];
    until_held(b.admin, 1, 1).await;
    until_each(&[b.admin], SUBSCRIBED, 1.0).await;
    until_turn(b.admin, 0.0).await;
    assert_eq!(metric(b.admin, LEASES).await, 0.0, "B follows");
    (a, b, on_a, on_b)
}

/// Right after one of A's turns (its renewal just done), hands the lease to a replica that does
/// not exist (another token, for `ttl`) and moves the run to version 2: A's next poll sees it.
async fn fence_a_then_change(redis: &RedisServer, mock: &MockUpstream, a: &TestGateway, ttl: Duration) {
    let calls = lease_calls(a.admin).await;
    until_turn(a.admin, calls).await;
    let _: () = redis::cmd("SET")
        .arg(lease_key())
        .arg("another-replica")
        .arg("PX")
        .arg(u64::try_from(ttl.as_millis()).expect("fits"))
        .query_async(&mut redis.client().await)
        .await
        .expect("SET");
    mock.set(RUN, Reply::ok(body(2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_lease_was_taken_publishes_nothing() {
    const POLL: Duration = Duration::from_millis(150);
    const FENCE: Duration = Duration::from_secs(3);
    let redis = RedisServer::start(&[]);
    let mock = MockUpstream::start().await;
    let (a, b, on_a, on_b) = holder_and_follower(&mock, &redis, (POLL, POLL), 1).await;
    let published = metric(a.admin, PUBLISHED).await;
    let received = metric(b.admin, RECEIVED).await;

    fence_a_then_change(&redis, &mock, &a, FENCE).await;
    let fenced = Instant::now();
    // A still polls once (it cannot know before it tries to publish) and answers its own client…
    let seen_on_a = lag(on_a.saw(&version(2)).await, fenced);
    assert!(
        seen_on_a < FENCE,
        "A polled again at its next turn, after {seen_on_a:?}"
    );
    eventually("A lets go of the lease", || async {
        metric(a.admin, LEASES).await == 0.0
    })
    .await;
    // …but its publish was refused: nothing published, nothing received, B's clients still wait.
    assert_eq!(metric(a.admin, PUBLISHED).await, published, "A published nothing");
    assert_eq!(
        metric(b.admin, RECEIVED).await,
        received,
        "B received nothing from A"
    );
    eventually("A's watcher stops with its last client gone", || async {
        metric(a.admin, WATCHED).await == 0.0
    })
    .await;
    // The other token holds the lease until it lapses: nobody polls for the fleet meanwhile.
    let quiet = fenced + FENCE - Duration::from_millis(300);
    tokio::time::sleep_until(tokio::time::Instant::from_std(quiet)).await;
    for client in &on_b {
        assert!(
            !client.has_seen(&version(2)),
            "{}: given version 2 while the lease was fenced",
            client.name
        );
    }
    assert_eq!(metric(b.admin, RECEIVED).await, received);

    // Once it lapses, B takes over, polls, and its clients get version 2.
    for client in &on_b {
        let took = lag(client.saw(&version(2)).await, fenced);
        assert!(
            took + Duration::from_millis(50) >= FENCE && took <= FENCE + POLL + Duration::from_secs(1),
            "{}: given version 2 {took:?} after the fence of {FENCE:?}",
            client.name
        );
    }
    assert_eq!(metric(b.admin, LEASES).await, 1.0);
    assert!(metric(b.admin, TAKEOVERS).await >= 1.0);
    until_held(b.admin, 1, 1).await;
    mock.set(RUN, Reply::ok(completed(RUN)));
    for client in &on_b {
        client.ended().await;
    }
    on_b[0].assert_given(&[2]);
    on_b[1].assert_given(&[1, 2]);
}

/// A holder that lost its lease (its publish of version 2 refused) takes it back before the
/// follower's next turn. The follower's clients must still get version 2, the version upstream
/// has had all along: a new holder must tell the fleet what it knows that the fleet may not.
///
/// A polls faster than B only to make the order of their turns certain; with equal intervals it
/// is whichever turn comes first once the other token is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_only_a_fenced_holder_saw_still_reaches_the_followers_when_it_takes_the_lease_back() {
    const POLL_A: Duration = Duration::from_millis(100);
    const POLL_B: Duration = Duration::from_millis(1000);
    let redis = RedisServer::start(&[]);
    let mock = MockUpstream::start().await;
    let (a, b, on_a, on_b) = holder_and_follower(&mock, &redis, (POLL_A, POLL_B), 1).await;
    // A keeps a client, so it keeps watching once its first one was answered.
    let _stream_a = stream(a.public, "stream on A");
    until_held(a.admin, 1, 1).await;
    let received = metric(b.admin, RECEIVED).await;

    fence_a_then_change(&redis, &mock, &a, Duration::from_secs(30)).await;
    on_a.saw(&version(2)).await;
    eventually("A polled version 2 and let go of the lease", || async {
        metric(a.admin, LEASES).await == 0.0
    })
    .await;
    assert_eq!(
        metric(b.admin, RECEIVED).await,
        received,
        "A's publish was refused"
    );

    // The other token goes right after one of B's turns: A, polling faster, takes the lease back.
    let calls = lease_calls(b.admin).await;
    until_turn(b.admin, calls).await;
    let _: () = redis::cmd("DEL")
        .arg(lease_key())
        .query_async(&mut redis.client().await)
        .await
        .expect("DEL");
    let released = Instant::now();
    holder(&[a.admin, b.admin]).await;
    assert_eq!(
        metric(a.admin, LEASES).await,
        1.0,
        "the scenario: A took the lease back before B's next turn"
    );

    // Upstream has been at version 2 for a while; B's clients must be told within a few of the
    // holder's polls.
    for client in &on_b {
        let given = tokio::time::timeout(POLL_B * 3, client.saw(&version(2))).await;
        assert!(
            given.is_ok(),
            "{}: still not given version 2 {:?} after A took the lease back; it was given {:?}",
            client.name,
            released.elapsed(),
            client.versions()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 7. What the holder announces, lost wake-ups, older news
// ---------------------------------------------------------------------------------------------

const CATCH_UPS: &str = "plextera_gateway_fleet_catch_ups_total";

fn announced_key() -> String {
    format!("{PREFIX}ver:{RUN}")
}

fn wakeup_channel() -> String {
    format!("{PREFIX}wakeups")
}

/// Upstream calls for the run since `from` whose `x-request-id` starts with `who` (`watch-`: a
/// watcher's poll; `fleet-`: a replica fetching a run a wake-up did not carry).
fn calls_by(mock: &MockUpstream, who: &str, from: Instant) -> usize {
    let path = runs_path(RUN);
    mock.requests()
        .iter()
        .filter(|request| {
            request.target == path
                && request.at >= from
                && request
                    .headers
                    .get("x-request-id")
                    .and_then(|id| id.to_str().ok())
                    .is_some_and(|id| id.starts_with(who))
        })
        .count()
}

/// `SET key value PX ttl` on the test Redis.
async fn redis_set(redis: &RedisServer, key: &str, value: &str, ttl: Duration) {
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .arg("PX")
        .arg(u64::try_from(ttl.as_millis()).expect("fits"))
        .query_async(&mut redis.client().await)
        .await
        .expect("SET");
}

/// How many things a client was given so far.
fn given_count(client: &Client) -> usize {
    client.given.borrow().got.len()
}

/// The holder's channel learns version 2 from a client's request (a long-poll holding it), not
/// from its own poll: its next poll then finds nothing new here, yet the fleet has never been told.
/// The holder must announce it (what it polled differs from what it last announced), and the
/// follower's clients get it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_the_holder_learns_from_a_client_reaches_the_other_replicas() {
    // Long, so the order is certain: the client's request comes right after one of A's polls and
    // well before the next.
    const POLL: Duration = Duration::from_secs(1);
    let redis = RedisServer::start(&[]);
    let mock = MockUpstream::start().await;
    let (a, b, on_a, on_b) = holder_and_follower(&mock, &redis, (POLL, POLL), usize::MAX).await;
    let published = metric(a.admin, PUBLISHED).await;
    let received = metric(b.admin, RECEIVED).await;

    // Right after one of A's polls, upstream moves to version 2 and a client on A asks for it.
    let calls = lease_calls(a.admin).await;
    until_turn(a.admin, calls).await;
    let after_poll = lease_calls(a.admin).await;
    mock.set(RUN, Reply::ok(body(2)));
    let plain = TestClient::new()
        .send(
            Method::GET,
            &format!("http://{}{}", a.public, runs_path(RUN)),
            &[],
        )
        .await;
    assert_eq!(plain.status, StatusCode::OK);
    let v2 = plain.header("etag").expect("a version").to_owned();
    assert_eq!(v2, version(2));
    let knows_v2 = long_poll(a.public, &v2, usize::MAX, "long-poll on A holding version 2");
    // A's channel has version 2 now, from that request: its own client is given it at once.
    let learnt = on_a.saw(&v2).await;
    until_held(a.admin, 2, 0).await;
    assert_eq!(
        lease_calls(a.admin).await,
        after_poll,
        "the scenario: A's channel learnt version 2 before A's next poll"
    );
    assert_eq!(
        metric(a.admin, PUBLISHED).await,
        published,
        "nothing announced before A's next poll"
    );
    for client in &on_b {
        assert!(!client.has_seen(&v2), "{}: given version 2 already", client.name);
    }

    // A's next poll finds version 2, not new on A but never announced: B's clients must get it.
    for client in &on_b {
        let took = lag(client.saw(&v2).await, learnt);
        eprintln!(
            "{}: given version 2 {took:?} after A's channel learnt it",
            client.name
        );
    }
    assert_eq!(
        metric(a.admin, PUBLISHED).await,
        published + 1.0,
        "A announced version 2 once"
    );
    assert_eq!(metric(b.admin, RECEIVED).await, received + 1.0);
    assert_eq!(metric(b.admin, CATCH_UPS).await, 0.0, "B had no need to catch up");
    assert!(
        !knows_v2.has_seen(&v2),
        "the client holding version 2 is still held"
    );

    until_held(b.admin, 1, 1).await;
    mock.set(RUN, Reply::ok(completed(RUN)));
    for client in on_b.iter().chain([&on_a, &knows_v2]) {
        client.ended().await;
    }
    on_b[0].assert_given(&[2]);
    on_b[1].assert_given(&[1, 2]);
    on_a.assert_given(&[2]);
    knows_v2.assert_given(&[]);
}

/// The holder announced version 2 and B never received the wake-up (pub/sub delivers at most
/// once). B sees at its next turn that the holder's last announcement is not what it has, polls
/// once by itself, and its clients get version 2. The holder here is a token set in Redis that no
/// replica holds, so every watcher call upstream is B's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_missed_a_wake_up_catches_up_on_its_next_turn() {
    const POLL: Duration = Duration::from_millis(200);
    const HELD_ELSEWHERE: Duration = Duration::from_secs(60);
    let redis = RedisServer::start(&[]);
    let mock = MockUpstream::start().await;
    mock.set(RUN, Reply::ok(body(1)));
    redis_set(&redis, &lease_key(), "another-replica", HELD_ELSEWHERE).await;
    redis_set(&redis, &announced_key(), &version(1), HELD_ELSEWHERE).await;
    let b = TestGateway::start_with(replica_config(&mock, &redis, POLL)).await;
    let on_b = [
        long_poll(b.public, &version(1), usize::MAX, "long-poll on B"),
        stream(b.public, "stream on B"),
    ];
    until_held(b.admin, 1, 1).await;
    until_each(&[b.admin], SUBSCRIBED, 1.0).await;
    // A turn through the lease: B follows (any poll of its own before, while it was not yet
    // subscribed, is over).
    until_turn(b.admin, 0.0).await;
    assert_eq!(metric(b.admin, LEASES).await, 0.0, "B follows");

    // Up to date with the holder's announcement: B makes no call of its own, turn after turn.
    let quiet = Instant::now();
    for _ in 0..3 {
        until_turn(b.admin, lease_calls(b.admin).await).await;
    }
    assert_eq!(calls_by(&mock, "watch-", quiet), 0, "B polled while up to date");
    assert_eq!(metric(b.admin, CATCH_UPS).await, 0.0);

    // Upstream moves to version 2; the holder announced it, and B lost the wake-up.
    mock.set(RUN, Reply::ok(body(2)));
    redis_set(&redis, &announced_key(), &version(2), HELD_ELSEWHERE).await;
    let announced = Instant::now();
    eventually("B catches up", || async {
        metric(b.admin, CATCH_UPS).await >= 1.0
    })
    .await;
    for client in &on_b {
        let took = lag(client.saw(&version(2)).await, announced);
        eprintln!("{}: given version 2 {took:?} after the announcement", client.name);
        assert!(
            took <= POLL + Duration::from_secs(1),
            "{}: given version 2 {took:?} after the announcement (B polls every {POLL:?})",
            client.name
        );
    }
    assert!(
        calls_by(&mock, "watch-", announced) >= 1,
        "B's watcher polled upstream itself"
    );
    // Once: up to date again, it follows without calls.
    until_held(b.admin, 1, 1).await;
    for _ in 0..3 {
        until_turn(b.admin, lease_calls(b.admin).await).await;
    }
    assert_eq!(metric(b.admin, CATCH_UPS).await, 1.0, "one catch-up");
    assert_eq!(calls_by(&mock, "watch-", announced), 1, "one poll of B's own");
    assert_eq!(metric(b.admin, LEASES).await, 0.0, "B still follows");
    assert_eq!(metric(b.admin, RECEIVED).await, 0.0, "no wake-up reached B");

    // The holder announces the end, lost too: B catches up with that as well.
    mock.set(RUN, Reply::ok(completed(RUN)));
    redis_set(&redis, &announced_key(), "ended", HELD_ELSEWHERE).await;
    for client in &on_b {
        client.ended().await;
    }
    on_b[0].assert_given(&[2]);
    on_b[1].assert_given(&[1, 2]);
    assert_eq!(metric(b.admin, CATCH_UPS).await, 2.0);
}

/// A wake-up carrying a version the replica's clients are past (a made-up replica's, well
/// formed) is older news: B counts it, but its clients holding version 2 are not given version 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_version_from_the_fleet_never_sends_clients_back() {
    const POLL: Duration = Duration::from_millis(150);
    let redis = RedisServer::start(&[]);
    let mock = MockUpstream::start().await;
    let (a, b, on_a, on_b) = holder_and_follower(&mock, &redis, (POLL, POLL), 1).await;
    // A keeps a client, so it keeps watching once its first one was answered.
    let _stream_a = stream(a.public, "stream on A");
    until_held(a.admin, 1, 1).await;
    mock.set(RUN, Reply::ok(body(2)));
    on_a.saw(&version(2)).await;
    for client in &on_b {
        client.saw(&version(2)).await;
    }
    // B's long-poll is back, holding version 2.
    until_held(b.admin, 1, 1).await;
    let given: Vec<usize> = on_b.iter().map(given_count).collect();
    let received = metric(b.admin, RECEIVED).await;
    let forged = Instant::now();

    let message = serde_json::json!({
        "from": "a-replica-that-does-not-exist",
        "run": RUN,
        "kind": "going",
        "etag": version(1),
        "content_type": "application/json",
        "body": std::str::from_utf8(&body(1)).expect("UTF-8"),
    })
    .to_string();
    let receivers: i64 = redis::cmd("PUBLISH")
        .arg(wakeup_channel())
        .arg(message)
        .query_async(&mut redis.client().await)
        .await
        .expect("PUBLISH");
    assert_eq!(receivers, 2, "both replicas are subscribed");
    eventually("B receives the wake-up", || async {
        metric(b.admin, RECEIVED).await == received + 1.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (client, before) in on_b.iter().zip(&given) {
        assert_eq!(
            given_count(client),
            *before,
            "{}: given something after the older wake-up: {:?}",
            client.name,
            client.versions()
        );
    }
    until_held(b.admin, 1, 1).await;
    assert_eq!(
        calls_by(&mock, "fleet-", forged),
        0,
        "the wake-up carried its version: B fetched nothing"
    );

    // The run goes on: B's clients are given version 3, then the end.
    mock.set(RUN, Reply::ok(body(3)));
    for client in &on_b {
        client.saw(&version(3)).await;
    }
    until_held(b.admin, 1, 1).await;
    mock.set(RUN, Reply::ok(completed(RUN)));
    for client in &on_b {
        client.ended().await;
    }
    on_b[0].assert_given(&[2, 3]);
    on_b[1].assert_given(&[1, 2, 3]);
}

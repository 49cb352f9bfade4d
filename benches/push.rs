//! Push instead of poll: upstream calls per run when K clients watch the same runs, by plain
//! polling, by long-polling and by event streams (issue 17: "upstream calls per run with K = 1, 10,
//! 100, 1,000 clients long-polling and K streaming: the same for every K (within ±2 calls), about
//! run duration / interval; side by side with plain polling").
//!
//! Run: `cargo bench --bench push` (quick check: `CLIENTS=1,10,100 cargo bench --bench push`).
//!
//! For each K in CLIENTS and each mode in MODES, a fresh simulated upstream
//! ([`plextera_gateway::demo`]: each run QUEUED for RUN_MS/3, then PROCESSING, completing a step
//! every (RUN_MS − RUN_MS/3)/3, then COMPLETED or FAILED at RUN_MS) and a fresh in-process gateway
//! (`watch.poll_interval` = INTERVAL_MS, `watch.max_poll_interval` = MAX_POLL_MS) serve K clients
//! that each watch the same RUNS runs until each has ended. Each run's clock is started by one
//! request straight to the upstream (not counted) just before the clients open, so the moment each
//! run ends upstream is known. The clients open spread evenly over SPREAD_MS (default: one
//! POLL_MS; 0 opens them all at once), each on its own connections:
//!
//! - `poll`: GET every POLL_MS until the run has ended, as a dashboard does;
//! - `long-poll`: `GET ?wait=30s`, with `If-None-Match` of the last `ETag` from the second request
//!   on (the first, with nothing to compare, is answered at once: from the run's watcher when it
//!   has one), again and again, until a 200 with a strong `ETag` or an ended status;
//! - `sse`: `Accept: text/event-stream`, read until the `event: end` frame.
//!
//! Printed per mode and K: client requests; upstream calls per run, all of them, then split into
//! the calls plain requests led (the gateway's `requests_total` with `cache` PASS or MISS: a
//! first request of a long-poll or a stream when the run had no watcher yet) and the rest (the
//! watchers' calls, and those of held requests that found no watcher with a state); watchers
//! started per run (counted from the gateway's `watcher started` debug event); and the time from
//! the run's end upstream to a client seeing it (p50 over all clients and runs; for each run the
//! last of its clients, averaged and worst over runs). Target: upstream calls per run the same for
//! every K (±2) with push, about RUN_MS / INTERVAL_MS (less when the interval backs off while the
//! run does not change), where plain polling grows with K.
//!
//! Env: CLIENTS (1,10,100,1000), MODES (poll,long-poll,sse), RUNS (5), RUN_MS (6000),
//! INTERVAL_MS (1000), MAX_POLL_MS (10000, the default `watch.max_poll_interval`), POLL_MS (1000),
//! SPREAD_MS (POLL_MS), LATENCY_MS (40, the upstream's answer time), H2 (0; 1: clients speak
//! HTTP/2 (h2c), one connection per client instead of one per client and run). With HTTP/1.1,
//! K × RUNS connections are open at once (5,000 at K = 1,000): the bench raises its descriptor
//! limit to the hard limit and warns when that is too low.

#[path = "../tests/support/mod.rs"]
mod support;

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, ETAG, IF_NONE_MATCH};
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use plextera_gateway::demo::{DEMO_API_KEY, DemoOptions, DemoUpstream};
use plextera_gateway::{ApiKey, Secrets};
use support::{TestGateway, env_number, raise_descriptor_limit, runs_path, test_config};
use tokio::time::Instant;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// A long-poll's wait, as the clients ask it.
const WAIT: &str = "30s";
/// Pause after a failed request before the next.
const RETRY_AFTER: Duration = Duration::from_millis(100);
/// A client still watching this long after its run ended has failed.
const PATIENCE_AFTER_END: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Poll,
    LongPoll,
    Sse,
}

impl Mode {
    fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "poll" => Some(Self::Poll),
            "long-poll" | "longpoll" => Some(Self::LongPoll),
            "sse" => Some(Self::Sse),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Poll => "poll",
            Self::LongPoll => "long-poll",
            Self::Sse => "sse",
        }
    }
}

struct Bench {
    clients: Vec<usize>,
    modes: Vec<Mode>,
    runs: usize,
    demo: DemoOptions,
    interval: Duration,
    max_interval: Duration,
    poll: Duration,
    spread: Duration,
    http2: bool,
}

/// What one client saw of one run.
#[derive(Debug, Default)]
struct Watched {
    requests: u64,
    failures: u64,
    /// When it learnt that the run had ended.
    saw_end: Option<Instant>,
}

/// One line of the table.
struct Row {
    client_requests: u64,
    failures: u64,
    upstream_per_run: f64,
    client_led_per_run: f64,
    other_per_run: f64,
    watchers_per_run: f64,
    /// Run end upstream → a client saw it, over every client and run.
    seen_p50: Duration,
    /// For each run, run end upstream → its last client saw it: mean and worst over runs.
    last_mean: Duration,
    last_max: Duration,
    missed: usize,
}

#[tokio::main]
async fn main() {
    let run_ms: u64 = env_number("RUN_MS", 6000);
    let poll_ms: u64 = env_number("POLL_MS", 1000);
    let interval_ms: u64 = env_number("INTERVAL_MS", 1000);
    let bench = Bench {
        clients: list("CLIENTS", "1,10,100,1000", |text| text.trim().parse().ok()),
        modes: list("MODES", "poll,long-poll,sse", Mode::parse),
        runs: env_number("RUNS", 5),
        demo: DemoOptions {
            queued_for: Duration::from_millis(run_ms / 3),
            finishes_after: Duration::from_millis(run_ms),
            latency: Duration::from_millis(env_number("LATENCY_MS", 40)),
        },
        interval: Duration::from_millis(interval_ms),
        max_interval: Duration::from_millis(env_number("MAX_POLL_MS", 10_000).max(interval_ms)),
        poll: Duration::from_millis(poll_ms),
        spread: Duration::from_millis(env_number("SPREAD_MS", poll_ms)),
        http2: env_number("H2", 0) == 1,
    };
    let most = bench.clients.iter().copied().max().unwrap_or(0);
    count_watchers_started();
    let descriptors = raise_descriptor_limit();
    let needed = if bench.http2 { most } else { most * bench.runs } as u64 * 2 + 256;
    if descriptors < needed {
        eprintln!(
            "warning: the open-descriptor limit is {descriptors}; about {needed} are needed for {most} clients \
             (raise `ulimit -Hn`, or set H2=1)"
        );
    }
    println!(
        "K clients watch the same {} runs until each ends; runs last {:?} (QUEUED {:?}, then a new step every \
         {:?}); upstream answers in {:?}; watcher interval {:?} (backing off x1.5 to {:?} while nothing \
         changes); plain polls every {:?}; clients open over {:?}; {}",
        bench.runs,
        bench.demo.finishes_after,
        bench.demo.queued_for,
        (bench.demo.finishes_after - bench.demo.queued_for) / 3,
        bench.demo.latency,
        bench.interval,
        bench.max_interval,
        bench.poll,
        bench.spread,
        if bench.http2 {
            "HTTP/2, one connection per client"
        } else {
            "HTTP/1.1, one connection per client and run"
        }
    );
    println!(
        "expected with push: about run duration / interval = {:.1} watcher calls per run, the same for every K",
        bench.demo.finishes_after.as_secs_f64() / bench.interval.as_secs_f64()
    );
    println!();
    println!(
        "{:<10} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>17} {:>6}",
        "mode",
        "K",
        "client",
        "upstream",
        "led by",
        "watchers",
        "watchers",
        "end→seen",
        "end→last seen",
        "fails"
    );
    println!(
        "{:<10} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>17} {:>6}",
        "", "", "requests", "calls/run", "plain GET", "and holds", "started", "p50 ms", "mean / max ms", ""
    );
    for &clients in &bench.clients {
        for &mode in &bench.modes {
            let row = simulate(&bench, mode, clients).await;
            println!(
                "{:<10} {:>6} {:>9} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.0} {:>17} {:>6}",
                mode.name(),
                clients,
                row.client_requests,
                row.upstream_per_run,
                row.client_led_per_run,
                row.other_per_run,
                row.watchers_per_run,
                millis(row.seen_p50),
                format!("{:.0} / {:.0}", millis(row.last_mean), millis(row.last_max)),
                if row.missed > 0 {
                    format!("{}+{} missed", row.failures, row.missed)
                } else {
                    row.failures.to_string()
                }
            );
        }
    }
}

/// One mode and K on a fresh upstream and gateway.
async fn simulate(bench: &Bench, mode: Mode, clients: usize) -> Row {
    let upstream = DemoUpstream::start(bench.demo).await.expect("demo upstream");
    let upstream_base = format!("http://{}", upstream.addr);
    let mut config = test_config(&upstream_base);
    let connections = clients * bench.runs * 2 + 1000;
    config.server.max_connections = NonZeroUsize::new(connections.max(10_000)).expect("non-zero");
    config.server.http2_max_concurrent_streams = u32::try_from(bench.runs.max(100)).unwrap_or(u32::MAX);
    config.watch.poll_interval = bench.interval;
    config.watch.max_poll_interval = bench.max_interval;
    config.watch.max_held = (clients * bench.runs * 2).max(10_000);
    let key = ApiKey::new(DEMO_API_KEY).expect("demo key");
    let gateway = TestGateway::start_with_secrets(config, Secrets::key_only(key)).await;
    let ids: Vec<String> = (0..bench.runs)
        .map(|run| format!("{}-{clients}-run-{run}", mode.name()))
        .collect();
    // Start each run's clock straight at the upstream: it ends `finishes_after` from the answer.
    let direct: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let mut ends = Vec::new();
    for id in &ids {
        let request = Request::get(format!("{upstream_base}{}", runs_path(id)))
            .header("authorization", format!("api-key {DEMO_API_KEY}"))
            .body(Empty::new())
            .expect("request");
        let response = direct.request(request).await.expect("the upstream answers");
        let _ = response.into_body().collect().await;
        ends.push(Instant::now() + bench.demo.finishes_after);
    }
    let primed = upstream.requests_answered();
    let watchers_before = WATCHERS_STARTED.load(Ordering::Relaxed);

    let mut tasks = Vec::with_capacity(clients * bench.runs);
    for client in 0..clients {
        let http: HttpClient = Client::builder(TokioExecutor::new())
            .http2_only(bench.http2)
            .build_http();
        let opens_after = bench.spread.mul_f64(client as f64 / clients as f64);
        for (run, id) in ids.iter().enumerate() {
            let url = gateway.url(&runs_path(id));
            let http = http.clone();
            let poll = bench.poll;
            let give_up = ends[run] + PATIENCE_AFTER_END;
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(opens_after).await;
                let watching = async {
                    let mut watched = Watched::default();
                    match mode {
                        Mode::Poll => poll_until_ended(&http, &url, poll, &mut watched).await,
                        Mode::LongPoll => long_poll_until_ended(&http, &url, &mut watched).await,
                        Mode::Sse => stream_until_ended(&http, &url, &mut watched).await,
                    }
                    watched
                };
                let watched = tokio::time::timeout_at(give_up, watching).await;
                (run, watched.unwrap_or_default())
            }));
        }
    }
    let mut client_requests = 0;
    let mut failures = 0;
    let mut seen = Vec::new();
    let mut last_per_run = vec![Duration::ZERO; bench.runs];
    let mut missed = 0;
    for task in tasks {
        let (run, watched) = task.await.expect("client task");
        client_requests += watched.requests;
        failures += watched.failures;
        match watched.saw_end {
            Some(at) => {
                let after_end = at.saturating_duration_since(ends[run]);
                seen.push(after_end);
                last_per_run[run] = last_per_run[run].max(after_end);
            }
            None => missed += 1,
        }
    }
    // Watchers stop with their run's end; a last call may still be answering.
    tokio::time::sleep(bench.demo.latency * 2).await;
    let upstream_calls = upstream.requests_answered() - primed;
    let watchers = WATCHERS_STARTED.load(Ordering::Relaxed) - watchers_before;
    let scrape = gateway.scrape().await;
    let client_led: f64 = scrape
        .samples
        .iter()
        .filter(|sample| {
            sample.name == "plextera_gateway_requests_total"
                && matches!(
                    sample.labels.get("cache").map(String::as_str),
                    Some("pass" | "miss")
                )
        })
        .map(|sample| sample.value)
        .sum();
    let runs = bench.runs as f64;
    seen.sort_unstable();
    Row {
        client_requests,
        failures,
        upstream_per_run: upstream_calls as f64 / runs,
        client_led_per_run: client_led / runs,
        other_per_run: (upstream_calls as f64 - client_led) / runs,
        watchers_per_run: watchers as f64 / runs,
        seen_p50: seen.get(seen.len() / 2).copied().unwrap_or_default(),
        last_mean: last_per_run.iter().sum::<Duration>() / u32::try_from(bench.runs).unwrap_or(1),
        last_max: last_per_run.iter().copied().max().unwrap_or_default(),
        missed,
    }
}

/// Plain polling: a GET every `poll` until the run has ended.
async fn poll_until_ended(http: &HttpClient, url: &str, poll: Duration, watched: &mut Watched) {
    let mut next = Instant::now();
    loop {
        watched.requests += 1;
        match get(http, url, None).await {
            Ok(answer) if answer.status == StatusCode::OK => {
                if answer.has_ended() {
                    watched.saw_end = Some(Instant::now());
                    return;
                }
            }
            _ => watched.failures += 1,
        }
        next += poll;
        tokio::time::sleep_until(next).await;
    }
}

/// A long-poll loop: `?wait=` always, with `If-None-Match` of the last `ETag` once it has one (the
/// first answer comes at once: the watcher's state when the run has one), until the run has ended.
async fn long_poll_until_ended(http: &HttpClient, url: &str, watched: &mut Watched) {
    let held_url = format!("{url}?wait={WAIT}");
    let mut version: Option<HeaderValue> = None;
    loop {
        watched.requests += 1;
        let answer = match &version {
            None => get(http, &held_url, None).await,
            Some(version) => get(http, &held_url, Some((IF_NONE_MATCH, version.clone()))).await,
        };
        match answer {
            Ok(answer) if answer.status == StatusCode::OK => {
                if answer.has_ended() {
                    watched.saw_end = Some(Instant::now());
                    return;
                }
                version = answer.etag;
            }
            Ok(answer) if answer.status == StatusCode::NOT_MODIFIED => {}
            _ => {
                watched.failures += 1;
                tokio::time::sleep(RETRY_AFTER).await;
            }
        }
    }
}

/// An event stream read until its `end` frame (opened again if it closes before).
async fn stream_until_ended(http: &HttpClient, url: &str, watched: &mut Watched) {
    loop {
        watched.requests += 1;
        let request = Request::get(url)
            .header(ACCEPT, "text/event-stream")
            .body(Empty::new())
            .expect("request");
        let response = match http.request(request).await {
            Ok(response) if response.status() == StatusCode::OK => response,
            _ => {
                watched.failures += 1;
                tokio::time::sleep(RETRY_AFTER).await;
                continue;
            }
        };
        let mut body = response.into_body();
        let mut read = Vec::new();
        while let Some(Ok(frame)) = body.frame().await {
            let Some(data) = frame.data_ref() else { continue };
            read.extend_from_slice(data);
            if memchr::memmem::find(&read, b"event: end\n").is_some() {
                watched.saw_end = Some(Instant::now());
                return;
            }
            // Keep only the frame still being read.
            if let Some(frame_end) = memchr::memmem::rfind(&read, b"\n\n") {
                read.drain(..frame_end + 2);
            }
        }
        // Closed before the end.
        watched.failures += 1;
    }
}

struct Answer {
    status: StatusCode,
    etag: Option<HeaderValue>,
    run_status: Option<String>,
}

impl Answer {
    /// A strong `ETag` (only ended runs have one) or an ended status.
    fn has_ended(&self) -> bool {
        let strong = self
            .etag
            .as_ref()
            .is_some_and(|etag| !etag.as_bytes().starts_with(b"W/"));
        strong
            || matches!(
                self.run_status.as_deref(),
                Some("COMPLETED" | "FAILED" | "CLOSED")
            )
    }
}

async fn get(
    http: &HttpClient,
    url: &str,
    header: Option<(http::HeaderName, HeaderValue)>,
) -> Result<Answer, String> {
    let mut request = Request::get(url);
    if let Some((name, value)) = header {
        request = request.header(name, value);
    }
    let request = request.body(Empty::new()).map_err(|error| error.to_string())?;
    let response = http.request(request).await.map_err(|error| error.to_string())?;
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|error| error.to_string())?
        .to_bytes();
    let run_status = (parts.status == StatusCode::OK)
        .then(|| serde_json::from_slice::<serde_json::Value>(&body).ok())
        .flatten()
        .and_then(|run| run["status"].as_str().map(str::to_owned));
    Ok(Answer {
        status: parts.status,
        etag: parts.headers.get(ETAG).cloned(),
        run_status,
    })
}

/// Watchers started (the gateway's `watcher started` debug event), counted by [`WatcherStarts`].
static WATCHERS_STARTED: AtomicU64 = AtomicU64::new(0);

/// Installs the one subscriber this process has: it counts watcher starts and logs nothing.
fn count_watchers_started() {
    let only_watchers = tracing_subscriber::filter::Targets::new()
        .with_target("plextera_gateway::watch::watcher", tracing::Level::DEBUG);
    let subscriber = tracing_subscriber::registry().with(WatcherStarts.with_filter(only_watchers));
    tracing::subscriber::set_global_default(subscriber).expect("no other subscriber");
}

/// Counts the events whose message is `watcher started`.
struct WatcherStarts;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for WatcherStarts {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Message(bool);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" && format!("{value:?}") == "watcher started" {
                    self.0 = true;
                }
            }
        }
        let mut message = Message(false);
        event.record(&mut message);
        if message.0 {
            WATCHERS_STARTED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A comma-separated list from the environment, or `default`'s.
fn list<T>(name: &str, default: &str, parse: impl Fn(&str) -> Option<T>) -> Vec<T> {
    let text = std::env::var(name).unwrap_or_else(|_| default.to_owned());
    text.split(',')
        .map(|item| parse(item).unwrap_or_else(|| panic!("{name}: cannot read {item:?}")))
        .collect()
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

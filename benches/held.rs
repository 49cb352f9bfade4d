//! Clients held on one gateway process (issue 17), and the runs they watch (issue 19): resident
//! memory per held client (target ≤ 16 KiB), the time from a run's change upstream until every held
//! client has its answer (target: p99 ≤ one poll interval + 50 ms), and with the clients spread
//! over many runs, what each watched run (its watcher polling upstream) costs in memory, CPU and
//! upstream calls.
//!
//! Run: `cargo bench --bench held` (builds and uses the release binary,
//! `target/release/plextera-gateway`; GATEWAY_BIN=path uses another). Needs an open-descriptor
//! hard limit above CLIENTS + 1,000 for HTTP/1.1 (`ulimit -Hn`): the bench and the gateway each
//! raise their soft limit to it.
//!
//! For each mode in MODES and each count in RUNS, a fresh gateway process in front of a mock
//! upstream in this process (RUNS runs, `held-run-1` …, all PROCESSING at version `step` until the
//! bench changes them, all at once; about 1 KB bodies with a ticking `computedDurationMs`; answers
//! at once, or after LATENCY_MS) and CLIENTS clients spread evenly over the runs (client i on run
//! i mod RUNS; with the default RUNS=1, all on one run), driven from this process's multi-thread
//! tokio runtime (nothing pinned: on a small machine the clients share the CPUs with the gateway,
//! and the table shows what each used):
//!
//! 1. RSS idle: VmRSS of the gateway (`/proc/<pid>/status`) after a few requests.
//! 2. RSS with every client's connection open (1,024 connecting at a time), no request yet.
//! 3. RSS after each client's plain GET (learning the version; GETS_AT_ONCE at a time).
//! 4. RSS held: every client held (a long-poll `?wait=600s` with `If-None-Match`, or an event
//!    stream), counted by the gateway's `held_requests` gauge. Reported: (held − idle) / CLIENTS,
//!    the figure the target is about, and its parts: the open connection (2 − 1), what a
//!    connection keeps after a request (3 − 2: HTTP/1.1 keeps its read and write buffers) and the
//!    hold itself (4 − 3, with RUNS > 1 the watchers too).
//! 5. With STEADY_SECS > 0, two steady windows of that length, every client still held:
//!    - quiet: no run changes. The window starts once the watchers have backed off (×1.5 per
//!      answer that brings nothing new) from INTERVAL_MS to MAX_POLL_MS and made one call at
//!      that, so each run is polled about every MAX_POLL_MS (less up to 10 %);
//!    - changing: every run changes every CHANGE_EVERY_MS (all at the same moment; the watchers'
//!      calls are spread by their own jitter). The window starts MAX_POLL_MS + two changes later
//!      (every watcher is back at INTERVAL_MS by then); a watcher seeing a change polls again
//!      INTERVAL_MS later, one seeing none 1.5 × that later.
//!
//!    Each reports upstream calls per second (counted by the mock) and each run's interval (the
//!    mean time between two of its calls: the watchers, started within a second or two, stay
//!    bunched, so the calls counted depend on where the window falls, e.g. two turns of each
//!    run in 20 s at 9.5 s), the gateway's CPU (user + system, `/proc/<pid>/stat`) per second,
//!    per watched run per second and per call, this process's CPU, and the gateway's RSS at its
//!    end; changing also change → answer p50 / p99 / max (for each change made in the window and
//!    each client, its first answer carrying that version or a later one), how many of those
//!    skipped the version (its watcher made one call for two changes), and the fan-out (the
//!    watcher's call answered → the client's answer).
//! 6. ROUNDS changes, then the end: at a random moment within one poll interval after every client
//!    is held, the mock moves every run to the next version (or ends them); each client records
//!    when its answer (a long-poll's 200, a stream's `run` or `end` frame) has arrived, and a
//!    long-poll client holds again with the new version (at once, or after REHOLD_AFTER_MS).
//!    Reported per change: when the watchers' calls that saw it were answered (their own timing:
//!    within one interval, which the watcher shortens by up to 10 % at random; p50 / max over
//!    the runs when there are several), the fan-out (that answer → each client of the run's
//!    answer: the gateway's work and the clients'), change → answer (what the target is about) as
//!    p50 / p99 / max over clients, and the CPU time the gateway (user + system) and this process
//!    used meanwhile. Over all changes: change → answer p50 / p99 / max. As all of a run's clients
//!    wake on one watcher call, the p99 over many changes is the watcher's delay (p99 just under
//!    one interval) plus the fan-out: a model drawing the one from the watcher's schedule and the
//!    other from the fan-outs measured gives that p99, compared with the target.
//!
//! Targets: per held client ≤ 16 KiB; change → answer p99 ≤ INTERVAL_MS + 50 ms.
//!
//! RUNS may list several counts (`RUNS=1,1000,5000`), each measured in turn with the same CLIENTS;
//! a summary table follows for each mode. When 1 is among them, each other count's RSS above idle
//! is compared with its: the difference per extra run is what a watched run costs beyond its held
//! clients' own cost (same clients, same connections, only spread over more runs). It includes
//! the upstream pool's idle connections (up to `upstream.pool_max_idle`, 128), which the burst of
//! first calls when every client holds at once fills: a fixed cost, which weighs less per run the
//! more runs there are.
//!
//! MODES (default `long-poll-h1,long-poll-h2,sse-h1`): `long-poll-h1` and `sse-h1`, one HTTP/1.1
//! connection per client; `long-poll-h2` and `sse-h2`, STREAMS (100) clients per HTTP/2 (h2c)
//! connection.
//!
//! Env: CLIENTS (10000), RUNS (1; at most CLIENTS), MODES, STREAMS (100), ROUNDS (5), INTERVAL_MS
//! (1000, `watch.poll_interval`), MAX_POLL_MS (INTERVAL_MS: `watch.max_poll_interval`; the
//! default config's 10 s lets a run that has not changed for a while be polled up to that seldom,
//! so a change comes up to that late: not what the target is about), STEADY_SECS (0: no steady
//! windows), CHANGE_EVERY_MS (1300), RATE (none: `upstream.max_requests_per_second`; the watchers
//! together then keep within 3/4 of it, each run polled at most every RUNS / (0.75 × RATE)
//! seconds, and the plain GETs and first holds, sharing the rest, are refused and retried until
//! they get through), LATENCY_MS (0), GETS_AT_ONCE (256), REHOLD_AFTER_MS (0), ACCESS_LOG (0; 1
//! keeps the gateway's access log on, written to a pipe this process reads), GATEWAY_BIN.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{ACCEPT, ETAG, HOST, IF_NONE_MATCH};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{TestClient, env_number, raise_descriptor_limit, runs_path};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};

/// The id of run `run` (from 0): `held-run-1`, `held-run-2` …
fn run_id(run: usize) -> String {
    format!("held-run-{}", run + 1)
}

/// Connections being opened at once: within the gateway's listen backlog (4,096, capped by
/// `net.core.somaxconn`); connections beyond it would be dropped and retried a second later.
const CONNECTING_AT_ONCE: usize = 1024;
/// Plain GETs in flight at once, unless GETS_AT_ONCE says otherwise.
const GETTING_AT_ONCE: usize = 256;
/// Upper bound on any phase; reaching it is a failure.
const PATIENCE: Duration = Duration::from_secs(120);
/// Linux reports CPU times in these units per second (USER_HZ).
const TICKS_PER_SECOND: f64 = 100.0;
/// The watcher's growth of its interval while nothing changes (`src/watch/watcher.rs`).
const BACKOFF: f64 = 1.5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    LongPoll,
    Sse,
}

#[derive(Debug, Clone, Copy)]
struct Mode {
    kind: Kind,
    http2: bool,
}

impl Mode {
    fn parse(text: &str) -> Option<Self> {
        let (kind, http2) = match text.trim() {
            "long-poll-h1" => (Kind::LongPoll, false),
            "long-poll-h2" => (Kind::LongPoll, true),
            "sse-h1" => (Kind::Sse, false),
            "sse-h2" => (Kind::Sse, true),
            _ => return None,
        };
        Some(Self { kind, http2 })
    }

    fn name(self) -> &'static str {
        match (self.kind, self.http2) {
            (Kind::LongPoll, false) => "long-poll over HTTP/1.1",
            (Kind::LongPoll, true) => "long-poll over HTTP/2",
            (Kind::Sse, false) => "event stream over HTTP/1.1",
            (Kind::Sse, true) => "event stream over HTTP/2",
        }
    }

    /// The `held_requests` gauge's label for this kind.
    fn gauge(self) -> &'static str {
        match self.kind {
            Kind::LongPoll => "long_poll",
            Kind::Sse => "sse",
        }
    }
}

struct Bench {
    clients: usize,
    streams: usize,
    rounds: u64,
    interval: Duration,
    max_interval: Duration,
    /// Each steady window's length (zero: none).
    steady: Duration,
    /// How often every run changes in the changing window.
    change_every: Duration,
    /// `upstream.max_requests_per_second`, if any.
    rate: Option<f64>,
    latency: Duration,
    rehold_after: Duration,
    gets_at_once: usize,
    access_log: bool,
    binary: String,
}

fn main() {
    let interval_ms: u64 = env_number("INTERVAL_MS", 1000);
    let modes = std::env::var("MODES").unwrap_or_else(|_| "long-poll-h1,long-poll-h2,sse-h1".to_owned());
    let modes: Vec<Mode> = modes
        .split(',')
        .map(|mode| Mode::parse(mode).unwrap_or_else(|| panic!("MODES: unknown mode {mode:?}")))
        .collect();
    let bench = Bench {
        clients: env_number("CLIENTS", 10_000),
        streams: env_number("STREAMS", 100_usize).max(1),
        rounds: env_number("ROUNDS", 5),
        interval: Duration::from_millis(interval_ms),
        max_interval: Duration::from_millis(env_number("MAX_POLL_MS", interval_ms).max(interval_ms)),
        steady: Duration::from_secs(env_number("STEADY_SECS", 0)),
        change_every: Duration::from_millis(env_number("CHANGE_EVERY_MS", 1300_u64).max(1)),
        rate: std::env::var("RATE").ok().map(|rate| {
            rate.parse::<f64>()
                .ok()
                .filter(|rate| *rate > 0.0)
                .unwrap_or_else(|| panic!("RATE: not a positive number: {rate:?}"))
        }),
        latency: Duration::from_millis(env_number("LATENCY_MS", 0)),
        rehold_after: Duration::from_millis(env_number("REHOLD_AFTER_MS", 0)),
        gets_at_once: env_number("GETS_AT_ONCE", GETTING_AT_ONCE),
        access_log: env_number("ACCESS_LOG", 0) == 1,
        binary: std::env::var("GATEWAY_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_plextera-gateway").to_owned()),
    };
    let run_counts: Vec<usize> = std::env::var("RUNS")
        .unwrap_or_else(|_| "1".to_owned())
        .split(',')
        .map(|runs| match runs.trim().parse() {
            Ok(runs) if runs >= 1 && runs <= bench.clients => runs,
            _ => panic!(
                "RUNS: {runs:?} is not a count from 1 to CLIENTS ({})",
                bench.clients
            ),
        })
        .collect();
    let descriptors = raise_descriptor_limit();
    if descriptors < bench.clients as u64 + 1024 {
        eprintln!(
            "warning: the open-descriptor limit is {descriptors}, below {} clients + 1,024: raise `ulimit -Hn` \
             (HTTP/1.1 modes need one descriptor per client here and in the gateway)",
            bench.clients
        );
    }
    println!(
        "gateway {}; {} clients held, spread over {} run(s); watch.poll_interval {:?}, max_poll_interval {:?}; \
         upstream.max_requests_per_second {}; upstream answers in {:?}; access log {}; {} CPUs shared by the \
         gateway and this load generator",
        bench.binary,
        bench.clients,
        run_counts
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" / "),
        bench.interval,
        bench.max_interval,
        bench.rate.map_or("unset".to_owned(), |rate| rate.to_string()),
        bench.latency,
        if bench.access_log { "on" } else { "off" },
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    for mode in modes {
        let summaries: Vec<Summary> = run_counts
            .iter()
            .map(|&runs| runtime.block_on(measure(&bench, mode, runs)))
            .collect();
        if summaries.len() > 1 {
            summarise(&bench, mode, &summaries);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One mode, one count of runs
// ---------------------------------------------------------------------------------------------

/// What a client reports: the version (`step`) it was answered with, and when.
#[derive(Debug, Clone, Copy)]
struct Seen {
    /// The client's index (its run: `client % runs`).
    client: usize,
    step: u64,
    ended: bool,
    at: Instant,
}

/// Shared by the clients and the bench.
struct Shared {
    /// Clients whose connection is open.
    connected: AtomicUsize,
    /// Turns `true` when the clients are to make their plain GET.
    get: watch::Sender<bool>,
    /// Clients whose plain GET was answered.
    ready: AtomicUsize,
    /// Requests that failed, answers that were not what they should be.
    failures: AtomicUsize,
    /// Long-polls answered 304 (their wait ran out: should not happen).
    timeouts: AtomicUsize,
    /// Turns `true` when the clients are to be held.
    hold: watch::Sender<bool>,
    seen: mpsc::UnboundedSender<Seen>,
}

/// One change's figures.
struct Round {
    label: String,
    /// Change → the watcher's upstream call that saw it was answered, for each run (sorted).
    polls: Vec<Duration>,
    /// That answer → each client's answer.
    fan_out: Vec<Duration>,
    /// Change → each client's answer.
    total: Vec<Duration>,
    /// The gateway's, user and system.
    cpu: (Duration, Duration),
    /// This process's: the clients, the mock.
    own_cpu: Duration,
}

/// One steady window's figures.
struct Window {
    seconds: f64,
    /// Upstream calls answered by the mock in the window.
    calls: usize,
    /// The mean time between two calls for the same run in the window: each run's interval,
    /// whereas `calls` depends on where the window falls while the watchers' calls are bunched
    /// (all started within a second, they drift apart only by their jitter).
    gap: Option<Duration>,
    /// The gateway's CPU time (user + system) in the window.
    cpu: Duration,
    /// This process's.
    own_cpu: Duration,
    /// The gateway's RSS at its end, KiB.
    rss: u64,
    /// Changes made in the window.
    changes: usize,
    /// For each change made in the window and each client: change → its first answer carrying
    /// that version or a later one (sorted).
    latencies: Vec<Duration>,
    /// Of those, the answers carrying a later version.
    skipped: usize,
    /// For each answer carrying a change made in the window: the run's watcher call that brought
    /// its version upstream → the client's answer (sorted).
    fan_out: Vec<Duration>,
}

impl Window {
    fn calls_per_second(&self) -> f64 {
        self.calls as f64 / self.seconds
    }

    /// The gateway's CPU per watched run per second, µs.
    fn cpu_per_run(&self, runs: usize) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.seconds / runs as f64
    }
}

/// What one count of runs gave, for the summary.
struct Summary {
    runs: usize,
    /// RSS idle, after the plain GETs, and all held, KiB.
    idle: u64,
    got: u64,
    held: u64,
    quiet: Option<Window>,
    changing: Option<Window>,
    /// Change → answer over every round (sorted).
    rounds: Vec<Duration>,
}

async fn measure(bench: &Bench, mode: Mode, runs: usize) -> Summary {
    let mock = Mock::start(bench.latency, runs).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, config_text(bench, mode, mock.addr)).expect("write the config");
    let gateway = GatewayProcess::start(&bench.binary, &config, bench.access_log);
    let base = format!("http://{}", gateway.public);
    let connections = if mode.http2 {
        bench.clients.div_ceil(bench.streams)
    } else {
        bench.clients
    };
    println!();
    println!(
        "== {}: {} clients on {} connections, {} (gateway pid {})",
        mode.name(),
        bench.clients,
        connections,
        if runs == 1 {
            "all on one run".to_owned()
        } else {
            format!(
                "spread over {runs} runs ({} per run)",
                spread(bench.clients, runs)
            )
        },
        gateway.pid()
    );

    // 1. Idle, after one request.
    let admin = TestClient::new();
    let first_run = format!("{base}{}", runs_path(&run_id(0)));
    let warm = admin.send(Method::GET, &first_run, &[]).await;
    assert_eq!(warm.status, StatusCode::OK, "the gateway answers the run");
    let mut plain = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        admin.send(Method::GET, &first_run, &[]).await;
        plain.push(format!("{:.1}", millis(started.elapsed())));
    }
    println!(
        "plain GETs through the gateway (one upstream call each): {} ms",
        plain.join(", ")
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_idle = rss_kib(gateway.pid());

    // 2. Every client connected; then after one plain GET each.
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        connected: AtomicUsize::new(0),
        get: watch::Sender::new(false),
        ready: AtomicUsize::new(0),
        failures: AtomicUsize::new(0),
        timeouts: AtomicUsize::new(0),
        hold: watch::Sender::new(false),
        seen: seen_tx,
    });
    let started = Instant::now();
    let clients = open_clients(bench, mode, runs, gateway.public, &shared);
    wait_until("every client is connected", || async {
        shared.connected.load(Ordering::Acquire) >= bench.clients
    })
    .await;
    let connected_in = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_bare = rss_kib(gateway.pid());
    let started = Instant::now();
    shared.get.send_replace(true);
    wait_until("every client made its plain GET", || async {
        shared.ready.load(Ordering::Acquire) >= bench.clients
    })
    .await;
    let got_in = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_connected = rss_kib(gateway.pid());

    // 3. Every client held.
    let held = || held_now(&admin, gateway.admin, mode);
    let started = Instant::now();
    shared.hold.send_replace(true);
    wait_until("every client is held", || async { held().await >= bench.clients }).await;
    let held_in = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_held = rss_kib(gateway.pid());
    let per_client = |kib: u64| kib as f64 / bench.clients as f64;
    println!(
        "all connected in {:.1} s, one plain GET each in {:.1} s, all held in {:.1} s",
        connected_in.as_secs_f64(),
        got_in.as_secs_f64(),
        held_in.as_secs_f64()
    );
    println!(
        "gateway RSS: idle {:.1} MiB; connections open {:.1} MiB; after one GET each {:.1} MiB; all held {:.1} MiB",
        mib(rss_idle),
        mib(rss_bare),
        mib(rss_connected),
        mib(rss_held)
    );
    let per_held = per_client(rss_held.saturating_sub(rss_idle));
    println!(
        "per held client: {per_held:.1} KiB above idle (target <= 16 KiB: {}) = {:.1} KiB its share of an open \
         connection + {:.1} KiB kept after a request + {:.1} KiB the hold{}",
        verdict(per_held <= 16.0),
        per_client(rss_bare.saturating_sub(rss_idle)),
        per_client(rss_connected.saturating_sub(rss_bare)),
        per_client(rss_held.saturating_sub(rss_connected)),
        if runs > 1 {
            " (with RUNS > 1, each run's own state too: see the summary)"
        } else {
            ""
        },
    );

    // 5. Steady windows: no change, then a change every CHANGE_EVERY_MS.
    let mut last_seen = vec![mock.step(); bench.clients];
    let (quiet, changing) = if bench.steady.is_zero() {
        (None, None)
    } else {
        let mut steady = Steady {
            bench,
            runs,
            pid: gateway.pid(),
            mock: &mock,
            seen: &mut seen_rx,
            last_seen: &mut last_seen,
        };
        let quiet = steady.window(None).await;
        let changing = steady.window(Some(bench.change_every)).await;
        (Some(quiet), Some(changing))
    };

    // 6. Changes, then the end.
    println!(
        "{:<7} {:>13} {:>22} {:>26} {:>22} {:>12}",
        "change", "watcher call", "fan-out", "change → answer", "gateway CPU", "bench CPU"
    );
    println!(
        "{:<7} {:>13} {:>22} {:>26} {:>22} {:>12}",
        "",
        if runs == 1 { "after, ms" } else { "p50/max ms" },
        "p50 / p99 / max ms",
        "p50 / p99 / max ms",
        "usr+sys ms (µs/client)",
        "ms"
    );
    let mut rounds = Vec::new();
    let first_step = mock.step() + 1;
    for round in 0..=bench.rounds {
        let ends = round == bench.rounds;
        let step = first_step + round;
        wait_until("every client is held again", || async {
            held().await >= bench.clients
        })
        .await;
        let offset = bench.interval.mul_f64(fastrand::f64());
        tokio::time::sleep(offset).await;
        let (user_before, system_before) = cpu_times(gateway.pid());
        let own_cpu_before = cpu_time(std::process::id());
        let changed_at = Instant::now();
        if ends {
            mock.end();
        } else {
            mock.change(step);
        }
        let mut answers = Vec::with_capacity(bench.clients);
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while answers.len() < bench.clients {
            let seen = tokio::time::timeout_at(deadline, seen_rx.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "change {}: {} of {} clients answered in time; runs whose watcher saw it: {} of {runs}",
                        round + 1,
                        answers.len(),
                        bench.clients,
                        mock.first_answers(step, ends, changed_at)
                            .iter()
                            .flatten()
                            .count(),
                    )
                })
                .expect("clients report");
            if seen.ended == ends && (ends || seen.step == step) {
                answers.push((seen.client, seen.at));
            }
        }
        let (user, system) = cpu_times(gateway.pid());
        let cpu = (
            user.saturating_sub(user_before),
            system.saturating_sub(system_before),
        );
        let own_cpu = cpu_time(std::process::id()).saturating_sub(own_cpu_before);
        let firsts = mock.first_answers(step, ends, changed_at);
        let mut polls: Vec<Duration> = firsts
            .iter()
            .flatten()
            .map(|polled| polled.saturating_duration_since(changed_at))
            .collect();
        let mut total: Vec<Duration> = answers
            .iter()
            .map(|(_, at)| at.duration_since(changed_at))
            .collect();
        let mut fan_out: Vec<Duration> = answers
            .iter()
            .filter_map(|(client, at)| Some(at.saturating_duration_since(firsts[client % runs]?)))
            .collect();
        polls.sort_unstable();
        total.sort_unstable();
        fan_out.sort_unstable();
        let round = Round {
            label: if ends {
                "end".to_owned()
            } else {
                (round + 1).to_string()
            },
            polls,
            fan_out,
            total,
            cpu,
            own_cpu,
        };
        let poll = match (round.polls.first(), round.polls.last()) {
            (Some(&only), _) if runs == 1 => format!("{:.0}", millis(only)),
            (Some(_), Some(&last)) => {
                format!("{:.0}/{:.0}", millis(percentile(&round.polls, 0.5)), millis(last))
            }
            _ => "?".to_owned(),
        };
        println!(
            "{:<7} {:>13} {:>22} {:>26} {:>22} {:>12.0}",
            round.label,
            poll,
            three(&round.fan_out),
            three(&round.total),
            format!(
                "{:.0}+{:.0} ({:.1})",
                millis(round.cpu.0),
                millis(round.cpu.1),
                (round.cpu.0 + round.cpu.1).as_secs_f64() * 1e6 / bench.clients as f64
            ),
            millis(round.own_cpu)
        );
        rounds.push(round);
    }
    for client in clients {
        let _ = client.await;
    }
    let mut all: Vec<Duration> = rounds
        .iter()
        .flat_map(|round| round.total.iter().copied())
        .collect();
    all.sort_unstable();
    let mut fan_outs: Vec<Duration> = rounds
        .iter()
        .flat_map(|round| round.fan_out.iter().copied())
        .collect();
    fan_outs.sort_unstable();
    let target = bench.interval + Duration::from_millis(50);
    let p99 = percentile(&all, 0.99);
    println!(
        "all {} changes: change → answer p50 {:.0} / p99 {:.0} / max {:.0} ms (target p99 <= {:.0} ms: {}); \
         fan-out p50 {:.1} / p99 {:.1} / max {:.1} ms",
        rounds.len(),
        millis(percentile(&all, 0.5)),
        millis(p99),
        millis(all.last().copied().unwrap_or_default()),
        millis(target),
        verdict(p99 <= target),
        millis(percentile(&fan_outs, 0.5)),
        millis(percentile(&fan_outs, 0.99)),
        millis(fan_outs.last().copied().unwrap_or_default()),
    );
    let (watcher_p50, watcher_p99, model_p99) = model(bench.interval, &fan_outs);
    println!(
        "model over many changes: the watcher's call comes p50 {:.0} / p99 {:.0} ms after a change (every {:?} \
         less up to 10 %); with the fan-outs measured, change → answer p99 {:.0} ms (target {:.0} ms: {})",
        millis(watcher_p50),
        millis(watcher_p99),
        bench.interval,
        millis(model_p99),
        millis(target),
        verdict(model_p99 <= target),
    );
    if bench.max_interval > bench.interval {
        println!(
            "(the model takes the watcher at watch.poll_interval; with max_poll_interval {:?}, a change after a \
             quiet spell waits for the backed-off interval instead)",
            bench.max_interval
        );
    }
    if let Some(rate) = bench.rate {
        println!(
            "(with upstream.max_requests_per_second {rate}, each watcher polls at most every {:.1} s: {runs} runs / \
             (0.75 × {rate}), jittered up to 20 % longer)",
            runs as f64 / (0.75 * rate)
        );
    }
    let failures = shared.failures.load(Ordering::Relaxed);
    let timeouts = shared.timeouts.load(Ordering::Relaxed);
    println!(
        "upstream calls: {} (the watchers', the plain GETs' and the warm-up's); failed requests {failures}, \
         long-polls timed out {timeouts}",
        mock.answered()
    );
    let warnings = gateway.stop();
    for line in warnings.iter().take(5) {
        println!("gateway: {line}");
    }
    Summary {
        runs,
        idle: rss_idle,
        got: rss_connected,
        held: rss_held,
        quiet,
        changing,
        rounds: all,
    }
}

/// `clients` spread over `runs`: "2", or "1–2" when they do not divide evenly.
fn spread(clients: usize, runs: usize) -> String {
    let (fewest, most) = (clients / runs, clients.div_ceil(runs));
    if fewest == most {
        fewest.to_string()
    } else {
        format!("{fewest}–{most}")
    }
}

// ---------------------------------------------------------------------------------------------
// Steady windows
// ---------------------------------------------------------------------------------------------

/// What a steady window needs: the gateway, the mock, and the clients' reports with what each
/// client has seen so far.
struct Steady<'a> {
    bench: &'a Bench,
    runs: usize,
    pid: u32,
    mock: &'a Mock,
    seen: &'a mut mpsc::UnboundedReceiver<Seen>,
    /// The latest version each client was answered with.
    last_seen: &'a mut [u64],
}

/// What a steady window is waiting for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Due {
    Start,
    Change,
    End,
}

impl Steady<'_> {
    /// One window: `change_every` `None` leaves the runs alone (quiet), `Some` changes them all
    /// that often (changing). Prints its line.
    async fn window(&mut self, change_every: Option<Duration>) -> Window {
        let bench = self.bench;
        let settle = match change_every {
            None => backed_off_after(bench.interval, bench.max_interval),
            Some(every) => bench.max_interval + every * 2,
        };
        let begun = tokio::time::Instant::now();
        let start = begun + settle;
        let end = start + bench.steady;
        let base = self.mock.step();
        // When the mock moved to version base + 1 + i, and whether that was within the window.
        let mut changes: Vec<(Instant, bool)> = Vec::new();
        let mut next_change = change_every.map(|every| begun + every);
        let mut before = None;
        let mut started_at = Instant::now();
        let mut window = Window {
            seconds: bench.steady.as_secs_f64(),
            calls: 0,
            gap: None,
            cpu: Duration::ZERO,
            own_cpu: Duration::ZERO,
            rss: 0,
            changes: 0,
            latencies: Vec::new(),
            skipped: 0,
            fan_out: Vec::new(),
        };
        let since = Instant::now();
        // The answers carrying a change made in the window: run, version, when.
        let mut answers: Vec<(usize, u64, Instant)> = Vec::new();
        let mut ended = false;
        loop {
            let due = if before.is_none() {
                [(start, Due::Start)]
                    .into_iter()
                    .chain(next_change.map(|at| (at, Due::Change)))
                    .min_by_key(|(at, _)| *at)
            } else if !ended {
                [(end, Due::End)]
                    .into_iter()
                    .chain(next_change.map(|at| (at, Due::Change)))
                    .min_by_key(|(at, _)| *at)
            } else {
                None
            };
            let Some((at, due)) = due else {
                // The window is over: wait until every client has the last change made in it.
                let last = base + changes.len() as u64;
                if self.last_seen.iter().all(|&seen| seen >= last) {
                    break;
                }
                let seen = tokio::time::timeout(PATIENCE, self.seen.recv())
                    .await
                    .expect("every client answered with the window's last change in time")
                    .expect("clients report");
                self.account(seen, base, &changes, &mut window, &mut answers);
                continue;
            };
            tokio::select! {
                biased;
                () = tokio::time::sleep_until(at) => match due {
                    Due::Start => {
                        started_at = Instant::now();
                        before = Some((cpu_time(self.pid), cpu_time(std::process::id()), self.mock.answered()));
                    }
                    Due::Change => {
                        let step = base + changes.len() as u64 + 1;
                        self.mock.change(step);
                        let now = Instant::now();
                        changes.push((now, before.is_some()));
                        next_change = change_every.map(|every| at + every);
                    }
                    Due::End => {
                        let (cpu, own_cpu, calls) = before.expect("the window started");
                        window.cpu = cpu_time(self.pid).saturating_sub(cpu);
                        window.own_cpu = cpu_time(std::process::id()).saturating_sub(own_cpu);
                        window.calls = self.mock.answered() - calls;
                        window.gap = self.mock.mean_gap(started_at);
                        window.rss = rss_kib(self.pid);
                        next_change = None;
                        ended = true;
                    }
                },
                seen = self.seen.recv() => {
                    self.account(seen.expect("clients report"), base, &changes, &mut window, &mut answers);
                }
            }
        }
        window.changes = changes.iter().filter(|(_, within)| *within).count();
        window.latencies.sort_unstable();
        let calls = self.mock.first_calls(since);
        window.fan_out = answers
            .iter()
            .filter_map(|(run, step, at)| Some(at.saturating_duration_since(*calls.get(&(*run, *step))?)))
            .collect();
        window.fan_out.sort_unstable();
        self.print(&window, change_every, settle);
        window
    }

    /// A client's answer with version `seen.step`: for each change it had not seen yet, made in
    /// the window, change → this answer; if there was one, the answer goes to `answers`.
    fn account(
        &mut self,
        seen: Seen,
        base: u64,
        changes: &[(Instant, bool)],
        window: &mut Window,
        answers: &mut Vec<(usize, u64, Instant)>,
    ) {
        if seen.ended || seen.step == u64::MAX {
            return;
        }
        let mut carries_one = false;
        let last = &mut self.last_seen[seen.client];
        for step in (*last + 1).max(base + 1)..=seen.step {
            let Some(&(changed_at, within)) = usize::try_from(step - base - 1)
                .ok()
                .and_then(|index| changes.get(index))
            else {
                continue;
            };
            if within {
                carries_one = true;
                window
                    .latencies
                    .push(seen.at.saturating_duration_since(changed_at));
                if step < seen.step {
                    window.skipped += 1;
                }
            }
        }
        *last = (*last).max(seen.step);
        if carries_one {
            answers.push((seen.client % self.runs, seen.step, seen.at));
        }
    }

    fn print(&self, window: &Window, change_every: Option<Duration>, settle: Duration) {
        let runs = self.runs;
        let what = match change_every {
            None => format!(
                "quiet (no run changes; window from {:.0} s on, once the watchers are at max_poll_interval)",
                settle.as_secs_f64()
            ),
            Some(every) => format!(
                "changing (every run changes every {:.1} s; window from {:.0} s on)",
                every.as_secs_f64(),
                settle.as_secs_f64()
            ),
        };
        println!("steady, {what}, {:.0} s:", window.seconds);
        let calls = window.calls_per_second();
        println!(
            "  upstream {calls:.1} calls/s (each run every {} s: the mean time between its calls); gateway CPU {:.1} ms/s = {:.1} µs per watched run \
             per second ({:.0} µs per call); bench CPU {:.1} ms/s; gateway RSS {:.1} MiB",
            window
                .gap
                .map_or("?".to_owned(), |gap| format!("{:.2}", gap.as_secs_f64())),
            window.cpu.as_secs_f64() * 1e3 / window.seconds,
            window.cpu_per_run(runs),
            window.cpu.as_secs_f64() * 1e6 / window.calls.max(1) as f64,
            window.own_cpu.as_secs_f64() * 1e3 / window.seconds,
            mib(window.rss),
        );
        if change_every.is_some() {
            println!(
                "  {} changes in the window: change → answer p50 / p99 / max {} ms over {} (client, change) pairs, \
                 {:.1} % of them answered with a later version (the watcher made one call for two changes); \
                 fan-out (the watcher's call answered → the client's answer) p50 / p99 / max {} ms",
                window.changes,
                three(&window.latencies),
                window.latencies.len(),
                window.skipped as f64 * 100.0 / window.latencies.len().max(1) as f64,
                three(&window.fan_out),
            );
        }
    }
}

/// How long a watcher polling every `interval` takes to back off to `max_interval` when nothing
/// changes (×1.5 per call), plus one call at that: an upper bound, as each sleep is jittered
/// shorter.
fn backed_off_after(interval: Duration, max_interval: Duration) -> Duration {
    let mut total = Duration::ZERO;
    let mut next = interval;
    while next < max_interval {
        total += next;
        next = next.mul_f64(BACKOFF).min(max_interval);
    }
    total + max_interval
}

/// One mode's table over its counts of runs; with RUNS=1 among them, the RSS each extra run adds.
fn summarise(bench: &Bench, mode: Mode, summaries: &[Summary]) {
    let baseline = summaries.iter().find(|summary| summary.runs == 1);
    // KiB per run beyond the first: `rss` above `from`, less RUNS=1's, per extra run.
    let per_run =
        |summary: &Summary, rss: &dyn Fn(&Summary) -> Option<u64>, from: &dyn Fn(&Summary) -> u64| {
            let above = |summary: &Summary| Some(rss(summary)?.saturating_sub(from(summary)) as f64);
            match baseline {
                Some(one) if summary.runs > 1 => match (above(summary), above(one)) {
                    (Some(many), Some(one)) => format!("{:.1}", (many - one) / (summary.runs - 1) as f64),
                    _ => "?".to_owned(),
                },
                _ => "-".to_owned(),
            }
        };
    let idle = |summary: &Summary| summary.idle;
    let window_rss = |window: &Option<Window>| window.as_ref().map(|window| window.rss);
    let calls = |window: &Option<Window>| {
        window.as_ref().map_or("-".to_owned(), |window| {
            format!("{:.1}", window.calls_per_second())
        })
    };
    let cpu = |window: &Option<Window>, runs: usize| {
        window.as_ref().map_or("-".to_owned(), |window| {
            format!("{:.1}", window.cpu_per_run(runs))
        })
    };
    println!();
    println!(
        "== {}, {} clients: by watched runs. KiB/run: the gateway's RSS above idle (or, for the hold, above \
         the RSS after the plain GETs), less RUNS=1's, per extra run",
        mode.name(),
        bench.clients
    );
    let header = |columns: [&str; 13]| {
        println!(
            "{:>6} {:>8} {:>9} {:>8} {:>8} {:>9} {:>9} {:>8} {:>9} {:>9} {:>8} {:>20} {:>8}",
            columns[0],
            columns[1],
            columns[2],
            columns[3],
            columns[4],
            columns[5],
            columns[6],
            columns[7],
            columns[8],
            columns[9],
            columns[10],
            columns[11],
            columns[12]
        );
    };
    header([
        "runs",
        "clients",
        "held RSS",
        "KiB/run",
        "KiB/run",
        "quiet",
        "quiet",
        "KiB/run",
        "changing",
        "changing",
        "KiB/run",
        "changing: change →",
        "rounds",
    ]);
    header([
        "",
        "per run",
        "-idle MiB",
        "held",
        "the hold",
        "calls/s",
        "µs/run/s",
        "quiet",
        "calls/s",
        "µs/run/s",
        "changing",
        "answer p50/p99/max",
        "p99 ms",
    ]);
    for summary in summaries {
        let runs = summary.runs;
        println!(
            "{:>6} {:>8} {:>9.1} {:>8} {:>8} {:>9} {:>9} {:>8} {:>9} {:>9} {:>8} {:>20} {:>8.0}",
            runs,
            spread(bench.clients, runs),
            mib(summary.held.saturating_sub(summary.idle)),
            per_run(summary, &|summary| Some(summary.held), &idle),
            per_run(summary, &|summary| Some(summary.held), &|summary| summary.got),
            calls(&summary.quiet),
            cpu(&summary.quiet, runs),
            per_run(summary, &|summary| window_rss(&summary.quiet), &idle),
            calls(&summary.changing),
            cpu(&summary.changing, runs),
            per_run(summary, &|summary| window_rss(&summary.changing), &idle),
            summary
                .changing
                .as_ref()
                .map_or("-".to_owned(), |window| three(&window.latencies)),
            millis(percentile(&summary.rounds, 0.99)),
        );
    }
}

/// p50 / p99 / max in milliseconds.
fn three(sorted: &[Duration]) -> String {
    if sorted.is_empty() {
        return "?".to_owned();
    }
    format!(
        "{:.0} / {:.0} / {:.0}",
        millis(percentile(sorted, 0.5)),
        millis(percentile(sorted, 0.99)),
        millis(sorted[sorted.len() - 1])
    )
}

fn percentile(sorted: &[Duration], quantile: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 * quantile).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The watcher's delay after a change at a random moment (its calls every `interval` less up to
/// 10 %, as `src/watch/watcher.rs` schedules them) p50
/// and p99, and the p99 of that delay plus a fan-out drawn from `fan_outs`.
fn model(interval: Duration, fan_outs: &[Duration]) -> (Duration, Duration, Duration) {
    let mut calls = Vec::with_capacity(10_000);
    let mut at = 0.0;
    for _ in 0..10_000 {
        at += interval.as_secs_f64() * (1.0 - 0.1 * fastrand::f64());
        calls.push(at);
    }
    let span = at - interval.as_secs_f64();
    let mut delays = Vec::with_capacity(100_000);
    let mut totals = Vec::with_capacity(100_000);
    for _ in 0..100_000 {
        let change = span * fastrand::f64();
        let next = calls[calls.partition_point(|&call| call < change)];
        let delay = Duration::from_secs_f64(next - change);
        let fan_out = if fan_outs.is_empty() {
            Duration::ZERO
        } else {
            fan_outs[fastrand::usize(..fan_outs.len())]
        };
        delays.push(delay);
        totals.push(delay + fan_out);
    }
    delays.sort_unstable();
    totals.sort_unstable();
    (
        percentile(&delays, 0.5),
        percentile(&delays, 0.99),
        percentile(&totals, 0.99),
    )
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Clients held right now, by the gateway's `held_requests` gauge.
async fn held_now(admin: &TestClient, addr: SocketAddr, mode: Mode) -> usize {
    let response = admin
        .send(Method::GET, &format!("http://{addr}/metrics"), &[])
        .await;
    let text = String::from_utf8_lossy(&response.body);
    let wanted = format!("plextera_gateway_held_requests{{kind=\"{}\"}} ", mode.gauge());
    text.lines()
        .find_map(|line| line.strip_prefix(&wanted))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map_or(0, |value| value as usize)
}

fn config_text(bench: &Bench, mode: Mode, upstream: SocketAddr) -> String {
    let max_connections = bench.clients + 1000;
    let streams = if mode.http2 { bench.streams.max(100) } else { 100 };
    let rate = bench.rate.map_or(String::new(), |rate| {
        format!("max_requests_per_second = {rate:?}\n")
    });
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace = \"1s\"\n\
         max_connections = {max_connections}\n\
         # The clients connect, then are held: none may be closed as idle meanwhile.\n\
         header_read_timeout = \"300s\"\nhttp2_max_concurrent_streams = {streams}\n\
         [upstream]\nbase_url = \"http://{upstream}\"\nrequest_timeout = \"5s\"\n{rate}\
         [watch]\nmax_wait = \"600s\"\npoll_interval = \"{}ms\"\nmax_poll_interval = \"{}ms\"\nmax_held = {}\n",
        bench.interval.as_millis(),
        bench.max_interval.as_millis(),
        bench.clients * 2
    )
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// A client's way to the gateway: its own HTTP/1.1 connection, or a stream on a shared HTTP/2 one.
enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Sender {
    async fn send(&mut self, request: Request<Empty<Bytes>>) -> hyper::Result<Response<Incoming>> {
        match self {
            Self::Http1(sender) => {
                sender.ready().await?;
                sender.send_request(request).await
            }
            Self::Http2(sender) => {
                sender.ready().await?;
                sender.send_request(request).await
            }
        }
    }
}

/// Opens every client (client i on run i mod `runs`): connections, then each client's plain GET,
/// then its hold once told.
fn open_clients(
    bench: &Bench,
    mode: Mode,
    runs: usize,
    gateway: SocketAddr,
    shared: &Arc<Shared>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let connecting = Arc::new(Semaphore::new(CONNECTING_AT_ONCE));
    let getting = Arc::new(Semaphore::new(bench.gets_at_once.max(1)));
    let rehold_after = bench.rehold_after;
    let bench_gets_at_once = bench.gets_at_once.max(1);
    let per_connection = if mode.http2 { bench.streams } else { 1 };
    let mut tasks = Vec::new();
    let mut first = 0;
    while first < bench.clients {
        let clients = per_connection.min(bench.clients - first);
        let targets: Vec<Target> = (first..first + clients)
            .map(|client| Target {
                gateway,
                mode,
                client,
                run: client % runs,
            })
            .collect();
        first += clients;
        let connecting = Arc::clone(&connecting);
        let getting = Arc::clone(&getting);
        let shared = Arc::clone(shared);
        tasks.push(tokio::spawn(async move {
            let permit = connecting.acquire_owned().await.expect("semaphore");
            let senders = match connect(gateway, mode.http2).await {
                Sender::Http2(sender) => (0..clients).map(|_| Sender::Http2(sender.clone())).collect(),
                http1 => vec![http1],
            };
            drop(permit);
            shared.connected.fetch_add(clients, Ordering::AcqRel);
            let _ = shared.get.subscribe().wait_for(|get| *get).await;
            let permits = u32::try_from(clients.min(bench_gets_at_once)).expect("permits");
            let permit = getting.acquire_many_owned(permits).await.expect("semaphore");
            let firsts = futures_util::future::join_all(senders.into_iter().zip(targets).map(
                |(mut sender, target)| {
                    let shared = Arc::clone(&shared);
                    async move {
                        let version = first_get(&mut sender, target, &shared).await;
                        (sender, target, version)
                    }
                },
            ))
            .await;
            drop(permit);
            let held: Vec<_> = firsts
                .into_iter()
                .map(|(sender, target, version)| {
                    tokio::spawn(held_client(
                        sender,
                        version,
                        target,
                        rehold_after,
                        Arc::clone(&shared),
                    ))
                })
                .collect();
            for client in held {
                let _ = client.await;
            }
        }));
    }
    tasks
}

async fn connect(gateway: SocketAddr, http2: bool) -> Sender {
    let deadline = Instant::now() + PATIENCE;
    let stream = loop {
        match TcpStream::connect(gateway).await {
            Ok(stream) => break stream,
            Err(error) => {
                assert!(
                    Instant::now() < deadline,
                    "cannot connect to the gateway: {error}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(stream);
    if http2 {
        let (sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .expect("HTTP/2 handshake");
        tokio::spawn(connection);
        Sender::Http2(sender)
    } else {
        let (sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("HTTP/1.1 handshake");
        tokio::spawn(connection);
        Sender::Http1(sender)
    }
}

/// Where a client sends its requests, and which client it is.
#[derive(Debug, Clone, Copy)]
struct Target {
    gateway: SocketAddr,
    mode: Mode,
    client: usize,
    /// Its run (from 0).
    run: usize,
}

impl Target {
    /// A GET of the client's run (`query` appended), with one more header if given.
    fn request(self, query: &str, extra: Option<(http::HeaderName, HeaderValue)>) -> Request<Empty<Bytes>> {
        let path = runs_path(&run_id(self.run));
        let uri = if self.mode.http2 {
            format!("http://{}{path}{query}", self.gateway)
        } else {
            format!("{path}{query}")
        };
        let mut request = Request::get(uri);
        if !self.mode.http2 {
            request = request.header(HOST, self.gateway.to_string());
        }
        if let Some((name, value)) = extra {
            request = request.header(name, value);
        }
        request.body(Empty::new()).expect("request")
    }
}

/// A client's plain GET: the run's version.
async fn first_get(sender: &mut Sender, target: Target, shared: &Shared) -> HeaderValue {
    loop {
        match get(sender, target.request("", None)).await {
            Some(answer) if answer.status == StatusCode::OK && answer.etag.is_some() => {
                shared.ready.fetch_add(1, Ordering::AcqRel);
                return answer.etag.expect("checked");
            }
            _ => {
                shared.failures.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One client once told to hold: long-polls again and again, or one stream, until the run ends,
/// reporting each new version it is answered with.
async fn held_client(
    mut sender: Sender,
    mut version: HeaderValue,
    target: Target,
    rehold_after: Duration,
    shared: Arc<Shared>,
) {
    let mut hold = shared.hold.subscribe();
    let _ = hold.wait_for(|hold| *hold).await;
    match target.mode.kind {
        Kind::LongPoll => loop {
            let held = target.request("?wait=600s", Some((IF_NONE_MATCH, version.clone())));
            match get(&mut sender, held).await {
                Some(answer) if answer.status == StatusCode::OK => {
                    let _ = shared.seen.send(Seen {
                        client: target.client,
                        step: answer.step,
                        ended: answer.ended,
                        at: answer.at,
                    });
                    if answer.ended {
                        return;
                    }
                    if let Some(etag) = answer.etag {
                        version = etag;
                    }
                    if !rehold_after.is_zero() {
                        tokio::time::sleep(rehold_after).await;
                    }
                }
                Some(answer) if answer.status == StatusCode::NOT_MODIFIED => {
                    shared.timeouts.fetch_add(1, Ordering::Relaxed);
                }
                _ => {
                    shared.failures.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        },
        Kind::Sse => loop {
            let open = target.request("", Some((ACCEPT, HeaderValue::from_static("text/event-stream"))));
            let response = match sender.send(open).await {
                Ok(response) if response.status() == StatusCode::OK => response,
                _ => {
                    shared.failures.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let mut body = response.into_body();
            let mut read: Vec<u8> = Vec::new();
            while let Some(Ok(frame)) = body.frame().await {
                let at = Instant::now();
                let Some(data) = frame.data_ref() else { continue };
                read.extend_from_slice(data);
                while let Some(end) = memchr::memmem::find(&read, b"\n\n") {
                    let event: Vec<u8> = read.drain(..end + 2).collect();
                    let ended = memchr::memmem::find(&event, b"event: end\n").is_some();
                    if ended || memchr::memmem::find(&event, b"event: run\n").is_some() {
                        let _ = shared.seen.send(Seen {
                            client: target.client,
                            step: step_of(&event),
                            ended,
                            at,
                        });
                    }
                    if ended {
                        return;
                    }
                }
            }
            // Closed before the end.
            shared.failures.fetch_add(1, Ordering::Relaxed);
        },
    }
}

struct Answer {
    status: StatusCode,
    etag: Option<HeaderValue>,
    step: u64,
    ended: bool,
    /// When the whole answer had arrived.
    at: Instant,
}

async fn get(sender: &mut Sender, request: Request<Empty<Bytes>>) -> Option<Answer> {
    let response = sender.send(request).await.ok()?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.ok()?.to_bytes();
    let at = Instant::now();
    let etag = parts.headers.get(ETAG).cloned();
    let strong = etag
        .as_ref()
        .is_some_and(|etag| !etag.as_bytes().starts_with(b"W/"));
    let ended = strong || has_ended(&body);
    Some(Answer {
        status: parts.status,
        etag,
        step: step_of(&body),
        ended,
        at,
    })
}

/// The `stepsCompleted` a body (or a frame carrying one) gives: the mock's version.
fn step_of(text: &[u8]) -> u64 {
    const KEY: &[u8] = b"\"stepsCompleted\":";
    let Some(start) = memchr::memmem::find(text, KEY) else {
        return u64::MAX;
    };
    text[start + KEY.len()..]
        .iter()
        .take_while(|byte| byte.is_ascii_digit())
        .fold(0, |step, digit| step * 10 + u64::from(digit - b'0'))
}

// ---------------------------------------------------------------------------------------------
// The mock upstream
// ---------------------------------------------------------------------------------------------

/// RUNS runs, all PROCESSING at version `step` until told otherwise; records when it answered
/// which run with what.
struct Mock {
    addr: SocketAddr,
    state: Arc<MockState>,
}

/// One answer of the mock: when it was ready, for which run, and the version and end it carried.
#[derive(Debug, Clone, Copy)]
struct Answered {
    at: Instant,
    run: usize,
    step: u64,
    ended: bool,
}

struct MockState {
    runs: usize,
    step: AtomicU64,
    ended: AtomicBool,
    born: Instant,
    latency: Duration,
    /// Every answer, in order.
    answers: Mutex<Vec<Answered>>,
}

impl Mock {
    async fn start(latency: Duration, runs: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the mock");
        let addr = listener.local_addr().expect("mock address");
        let state = Arc::new(MockState {
            runs,
            step: AtomicU64::new(0),
            ended: AtomicBool::new(false),
            born: Instant::now(),
            latency,
            answers: Mutex::new(Vec::new()),
        });
        let serving = Arc::clone(&state);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = Arc::clone(&serving);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, Infallible>(state.answer(request.uri().path()).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, state }
    }

    /// The version every run is at.
    fn step(&self) -> u64 {
        self.state.step.load(Ordering::Acquire)
    }

    fn change(&self, step: u64) {
        self.state.step.store(step, Ordering::Release);
    }

    fn end(&self) {
        self.state.ended.store(true, Ordering::Release);
    }

    /// For each run, when the first answer carrying `step` (or the end) after `since` was ready.
    fn first_answers(&self, step: u64, ended: bool, since: Instant) -> Vec<Option<Instant>> {
        let answers = self.state.answers.lock().expect("mock lock");
        let mut firsts = vec![None; self.state.runs];
        let from = answers.partition_point(|answer| answer.at < since);
        for answer in &answers[from..] {
            if answer.ended == ended && (ended || answer.step == step) {
                firsts[answer.run].get_or_insert(answer.at);
            }
        }
        firsts
    }

    /// For each run and version, when it was first answered after `since`.
    fn first_calls(&self, since: Instant) -> HashMap<(usize, u64), Instant> {
        let answers = self.state.answers.lock().expect("mock lock");
        let mut firsts = HashMap::new();
        let from = answers.partition_point(|answer| answer.at < since);
        for answer in &answers[from..] {
            firsts.entry((answer.run, answer.step)).or_insert(answer.at);
        }
        firsts
    }

    /// The mean time between two answers for the same run since `since`.
    fn mean_gap(&self, since: Instant) -> Option<Duration> {
        let answers = self.state.answers.lock().expect("mock lock");
        let mut last: Vec<Option<Instant>> = vec![None; self.state.runs];
        let (mut total, mut gaps) = (Duration::ZERO, 0_u32);
        let from = answers.partition_point(|answer| answer.at < since);
        for answer in &answers[from..] {
            if let Some(before) = last[answer.run].replace(answer.at) {
                total += answer.at - before;
                gaps += 1;
            }
        }
        (gaps > 0).then(|| total / gaps)
    }

    fn answered(&self) -> usize {
        self.state.answers.lock().expect("mock lock").len()
    }
}

impl MockState {
    /// The run `path` names (`…/held-run-<n>`, n from 1 to RUNS), or 404.
    async fn answer(&self, path: &str) -> Response<Full<Bytes>> {
        let run = path
            .rsplit('/')
            .next()
            .and_then(|id| id.strip_prefix("held-run-"))
            .and_then(|number| number.parse::<usize>().ok())
            .filter(|number| (1..=self.runs).contains(number))
            .map(|number| number - 1);
        let Some(run) = run else {
            let mut response = Response::new(Full::new(Bytes::from_static(b"{\"error\":\"not found\"}")));
            *response.status_mut() = StatusCode::NOT_FOUND;
            return response;
        };
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        let ended = self.ended.load(Ordering::Acquire);
        let step = self.step.load(Ordering::Acquire);
        let body = run_body(run, step, ended, self.born.elapsed());
        let mut answers = self.answers.lock().expect("mock lock");
        answers.push(Answered {
            at: Instant::now(),
            run,
            step,
            ended,
        });
        drop(answers);
        let mut response = Response::new(Full::new(body));
        response
            .headers_mut()
            .insert("content-type", HeaderValue::from_static("application/json"));
        response
    }
}

/// Run `run` (from 0), of about 1 KB like Plextera's, at version `step` (its `status` first after its `id`, so a
/// client finds it without parsing the body).
fn run_body(run: usize, step: u64, ended: bool, age: Duration) -> Bytes {
    let id = run_id(run);
    let status = if ended { "COMPLETED" } else { "PROCESSING" };
    let steps: Vec<String> = (0..4)
        .map(|index| {
            let step_status = if ended || index < 2 { "COMPLETED" } else { "PROCESSING" };
            format!(
                r#"{{"id":"step_{index}","name":"Step {index}","type":"extraction","status":"{step_status}","message":null,"output":null,"nestedRuns":{{"count":0,"data":[]}}}}"#
            )
        })
        .collect();
    let completed_at = if ended {
        r#""2025-01-01T00:10:00Z""#
    } else {
        "null"
    };
    let body = format!(
        r#"{{"id":"{id}","status":"{status}","createdAt":"2025-01-01T00:00:00Z","updatedAt":"2025-01-01T00:00:01Z","startedAt":"2025-01-01T00:00:00Z","completedAt":{completed_at},"error":null,"workflow":{{"id":"wf_bench","name":"Held clients (bench)"}},"progress":{{"stepsCompleted":{step},"stepsTotal":1000}},"durationMs":null,"computedDurationMs":{},"steps":[{}]}}"#,
        age.as_millis(),
        steps.join(",")
    );
    Bytes::from(body)
}

/// Whether a body (or a frame carrying one) is the ended run: its first `status` is the run's.
fn has_ended(text: &[u8]) -> bool {
    const KEY: &[u8] = b"\"status\":\"";
    memchr::memmem::find(text, KEY).is_some_and(|start| text[start + KEY.len()..].starts_with(b"COMPLETED"))
}

// ---------------------------------------------------------------------------------------------
// The gateway process
// ---------------------------------------------------------------------------------------------

struct GatewayProcess {
    child: Child,
    public: SocketAddr,
    admin: SocketAddr,
    /// Its warnings and errors.
    warnings: Arc<Mutex<Vec<String>>>,
}

impl GatewayProcess {
    fn start(binary: &str, config: &std::path::Path, access_log: bool) -> Self {
        let filter = if access_log {
            "info"
        } else {
            "info,plextera_gateway::access=off"
        };
        let mut child = Command::new(binary)
            .arg("--config")
            .arg(config)
            .args(["--log-format", "json"])
            .env("PLEXTERA_API_KEY", "bench-key")
            .env("RUST_LOG", filter)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {binary}: {error}"));
        let stdout = child.stdout.take().expect("stdout piped");
        let warnings = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let kept = Arc::clone(&warnings);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if json["message"] == "gateway ready" {
                    let _ = ready_tx.send(json);
                } else if matches!(json["level"].as_str(), Some("WARN" | "ERROR")) {
                    kept.lock().expect("warnings").push(line);
                }
            }
        });
        let ready = ready_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the gateway did not become ready");
        let addr = |field: &str| -> SocketAddr {
            ready[field]
                .as_str()
                .and_then(|text| text.parse().ok())
                .unwrap_or_else(|| panic!("no {field} in {ready}"))
        };
        Self {
            public: addr("public_addr"),
            admin: addr("admin_addr"),
            child,
            warnings,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the gateway (SIGTERM, then SIGKILL after 10 s); returns its warnings.
    fn stop(mut self) -> Vec<String> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::take(&mut *self.warnings.lock().expect("warnings"))
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// VmRSS of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/<pid>/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// User and system CPU time of `pid` so far.
fn cpu_time(pid: u32) -> Duration {
    let (user, system) = cpu_times(pid);
    user + system
}

/// User and system CPU time of `pid` so far, apart.
fn cpu_times(pid: u32) -> (Duration, Duration) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')').expect("a command name") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are the 14th and 15th fields of the line, 12th and 13th after the name.
    let time =
        |field: &str| Duration::from_secs_f64(field.parse::<u64>().unwrap_or(0) as f64 / TICKS_PER_SECOND);
    (time(fields[11]), time(fields[12]))
}

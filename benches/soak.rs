//! Soak: mixed traffic with injected upstream faults against the release binary, for SOAK_SECS
//! (default 600). Every answer is checked; the gateway's RSS and open descriptors are sampled every
//! 10 s. Exits non-zero on any wrong answer, or if RSS or descriptors grow after warm-up.
//!
//! `cargo bench --bench soak` (SOAK_SECS=60 for a short run).

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use support::{
    Gate, GatewayProcess, MockUpstream, Reply, TEST_KEY, TestClient, env_number, run_body, runs_path,
    write_config,
};

const CLIENTS: usize = 32;
/// How far RSS may grow between the end of warm-up and the end of the run.
const RSS_GROWTH_LIMIT_KIB: u64 = 10 * 1024;
const FD_GROWTH_LIMIT: u64 = 20;

/// What a run id answers, and what the client must get.
#[derive(Clone, Copy)]
enum Kind {
    Done,
    Live,
    ServerError,
    Reset,
    Slow,
    Echo,
}

const KINDS: [(Kind, &str, usize, u32); 6] = [
    // kind, id prefix, how many ids, weight
    (Kind::Done, "done", 200, 60),
    (Kind::Live, "live", 200, 25),
    (Kind::ServerError, "err", 20, 5),
    (Kind::Reset, "abort", 20, 4),
    (Kind::Slow, "slow", 10, 2),
    (Kind::Echo, "echo", 10, 4),
];

fn main() {
    let seconds: u64 = env_number("SOAK_SECS", 600);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let healthy = runtime.block_on(soak(Duration::from_secs(seconds)));
    std::process::exit(if healthy { 0 } else { 1 });
}

async fn soak(duration: Duration) -> bool {
    let mock = MockUpstream::start().await;
    let never = Gate::new();
    for (kind, prefix, count, _) in KINDS {
        for index in 0..count {
            let id = format!("{prefix}-{index}");
            let reply = match kind {
                Kind::Done => Reply::ok(run_body(&id, "COMPLETED", 1024)),
                Kind::Live => Reply::ok(run_body(&id, "PROCESSING", 1024)),
                Kind::ServerError => Reply::status(StatusCode::INTERNAL_SERVER_ERROR, "{}"),
                Kind::Reset => Reply::Abort,
                Kind::Slow => Reply::run(&id, "COMPLETED").gated(&never),
                Kind::Echo => Reply::status(StatusCode::NOT_FOUND, format!("unknown key api-key {TEST_KEY}")),
            };
            mock.set(&id, reply);
        }
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(
        dir.path(),
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [upstream]\nbase_url = \"{}\"\napi_key_env = \"GW_TEST_KEY\"\nrequest_timeout = \"300ms\"\n\
             [cache]\nmax_size = \"64KiB\"\n",
            mock.base_url()
        ),
    );
    let mut gateway = GatewayProcess::start(
        &["--config", &config],
        &[
            ("GW_TEST_KEY", TEST_KEY),
            ("RUST_LOG", "error,plextera_gateway::serve=info"),
        ],
    );
    println!(
        "soak: {duration:?}, {CLIENTS} clients, gateway pid {}",
        gateway.pid()
    );

    let answered = Arc::new(AtomicU64::new(0));
    let wrong = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + duration;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (answered, wrong) = (Arc::clone(&answered), Arc::clone(&wrong));
            let base = format!("http://{}", gateway.public);
            tokio::spawn(async move { drive(client as u64, base, deadline, answered, wrong).await })
        })
        .collect();

    let pid = gateway.pid();
    let started = Instant::now();
    let mut samples = Vec::new();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(10).min(deadline.saturating_duration_since(Instant::now())))
            .await;
        let (rss, fds) = (rss_kib(pid), open_fds(pid));
        samples.push((started.elapsed(), rss, fds));
        println!(
            "{:>5} s  RSS {:>7.1} MiB  fds {:>4}  answered {:>9}  wrong {}",
            started.elapsed().as_secs(),
            rss as f64 / 1024.0,
            fds,
            answered.load(Ordering::Relaxed),
            wrong.load(Ordering::Relaxed)
        );
    }
    for client in clients {
        client.await.expect("client");
    }
    never.open();
    let exit = gateway.terminate();

    // Warm-up: the first fifth of the run (the cache fills, pools open).
    let warm = samples
        .iter()
        .find(|(at, _, _)| *at >= duration / 5)
        .copied()
        .unwrap_or(samples[0]);
    let last = *samples.last().expect("samples");
    let rss_growth = last.1.saturating_sub(warm.1);
    let fd_growth = last.2.saturating_sub(warm.2);
    let wrong = wrong.load(Ordering::Relaxed);
    println!(
        "after warm-up: RSS {:+.1} MiB (limit {} MiB), fds {:+} (limit {}); {} answers, {} wrong; exit {:?}",
        rss_growth as f64 / 1024.0,
        RSS_GROWTH_LIMIT_KIB / 1024,
        fd_growth,
        FD_GROWTH_LIMIT,
        answered.load(Ordering::Relaxed),
        wrong,
        exit.code()
    );
    wrong == 0 && rss_growth <= RSS_GROWTH_LIMIT_KIB && fd_growth <= FD_GROWTH_LIMIT && exit.success()
}

async fn drive(seed: u64, base: String, deadline: Instant, answered: Arc<AtomicU64>, wrong: Arc<AtomicU64>) {
    let client = TestClient::new();
    let total: u32 = KINDS.iter().map(|(_, _, _, weight)| weight).sum();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        // xorshift: deterministic, dependency-free choice of the next request.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    while Instant::now() < deadline {
        let mut pick = (next() % u64::from(total)) as u32;
        let (kind, prefix, count, _) = *KINDS
            .iter()
            .find(|(_, _, _, weight)| {
                let found = pick < *weight;
                pick = pick.saturating_sub(*weight);
                found
            })
            .expect("a kind");
        let id = format!("{prefix}-{}", next() % count as u64);
        let url = format!("{base}{}", runs_path(&id));
        let Ok(response) = client.try_send(Method::GET, &url, &[]).await else {
            wrong.fetch_add(1, Ordering::Relaxed);
            eprintln!("{id}: no answer");
            continue;
        };
        let correct = match kind {
            Kind::Done => {
                response.status == StatusCode::OK && response.body == run_body(&id, "COMPLETED", 1024)
            }
            Kind::Live => {
                response.status == StatusCode::OK && response.body == run_body(&id, "PROCESSING", 1024)
            }
            Kind::ServerError => response.status == StatusCode::INTERNAL_SERVER_ERROR,
            Kind::Reset => response.status == StatusCode::BAD_GATEWAY,
            Kind::Slow => response.status == StatusCode::GATEWAY_TIMEOUT,
            Kind::Echo => {
                response.status == StatusCode::NOT_FOUND && !response.everything().contains(TEST_KEY)
            }
        };
        answered.fetch_add(1, Ordering::Relaxed);
        if !correct && wrong.fetch_add(1, Ordering::Relaxed) < 10 {
            eprintln!(
                "{id}: wrong answer {} {:?}",
                response.status,
                String::from_utf8_lossy(&response.body)
            );
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|value| value.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |entries| entries.count() as u64)
}

//! Webhook ingest: events per second the listener verifies on one core (issue 18).
//!
//! Run: `cargo bench --bench webhook` (about a minute). Env: PARTS (`verify,e2e`: either part
//! alone), DURATION_S (5, the measured window of each end-to-end case), WARMUP_S (1),
//! CONNECTIONS (16), SECRETS (1; 2: the gateway holds the previous and the current secret, as
//! while one is rotated, and events are signed with the current one, the second tried).
//!
//! Two parts, on a ~1.5 KB `workflow.run.completed`-like envelope (eventId, eventType,
//! occurredAt, apiVersion, data with runId, workflow and four steps):
//!
//! 1. `verify/*` (criterion): [`Verifier::verify`] alone, per call, signed with the only secret
//!    (`valid/1_secret`), with the second of two (`valid/2_secrets`: rotation, both tried), and a
//!    signature made with a secret the gateway does not hold (`invalid/*`: the cost any unsigned
//!    request imposes, every secret tried). `read_event`: parsing the verified envelope. Its
//!    `thrpt` (elem/s) is verifies per second on one core, with nothing else in the way.
//! 2. End to end, through the real listener: the gateway in-process on a current-thread tokio
//!    runtime (one core; its thread pinned to CPU 1 when the machine has one), the load generator
//!    on another current-thread runtime pinned to CPU 0, CONNECTIONS keep-alive HTTP/1.1
//!    connections each posting one event at a time, every event with its own eventId (so none is a
//!    duplicate), for WARMUP_S unmeasured then DURATION_S measured. Cases:
//!    - `ignored`: events of a type the gateway does not act on, each signed by the generator as it
//!      sends it, on its own core (that HMAC is not the gateway's), answered 200
//!      `{"status":"ignored"}`: read the body, verify, parse, remember the id, answer; no upstream
//!      call is involved;
//!    - `invalid signature`: the same events, each carrying one signature made with a wrong secret
//!      (an attacker computes no HMAC), answered 401: read the body, verify (every secret tried),
//!      refuse.
//!
//! Per case: events answered per second (as expected; any other answer is counted under `wrong`),
//! events per gateway CPU-second (events ÷ the gateway thread's CPU time: what one fully busy core
//! would answer; when the gateway thread is well under 100 % busy, the generator or a neighbour on
//! the machine was the limit and this column is the figure to read), p50 and p99 latency as the
//! generator sees it (send → whole answer, including queueing in both runtimes with CONNECTIONS in
//! flight), and each thread's CPU use over the window.

#[path = "../tests/support/mod.rs"]
mod support;

use std::hint::black_box;
use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use criterion::{Criterion, Throughput};
use http::header::{CONTENT_TYPE, HOST};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use nix::sched::{CpuSet, sched_setaffinity};
use nix::unistd::{Pid, gettid};
use plextera_gateway::webhook::event;
use plextera_gateway::webhook::signature::{Refusal, SIGNATURE_HEADER, Verifier, sign};
use plextera_gateway::{ApiKey, Secrets};
use secrecy::SecretString;
use support::{TEST_KEY, TestGateway, env_number, test_config};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// The secret events are signed with (the only one, or the second of two while rotating).
const CURRENT_SECRET: &str = "whsec_bench_current_7f3a9c1e5b2d4f60";
/// The secret being rotated out, tried first.
const PREVIOUS_SECRET: &str = "whsec_bench_previous_0e8d6b4a2c9f1735";
/// What an attacker signs with: no secret the gateway holds.
const FORGED_SECRET: &str = "whsec_guessed_by_an_attacker_000000";
const TOLERANCE: Duration = Duration::from_secs(300);
const PATH: &str = "/webhooks/plextera";
const RUN_COMPLETED: &str = "workflow.run.completed";
/// A type the gateway acknowledges and does nothing with (no confirming call).
const UNKNOWN_TYPE: &str = "document-insights.extraction.completed";
const IGNORED_ANSWER: &[u8] = br#"{"status":"ignored"}"#;
const GATEWAY_CPU: usize = 1;
const GENERATOR_CPU: usize = 0;

fn main() {
    // `cargo bench` passes `--bench`; without it (`cargo test --benches`) each part runs briefly.
    let benching = std::env::args().any(|arg| arg == "--bench");
    let parts = std::env::var("PARTS").unwrap_or_else(|_| "verify,e2e".to_owned());
    if parts.contains("verify") {
        let mut criterion = Criterion::default()
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3))
            .configure_from_args();
        verify_benches(&mut criterion);
        criterion.final_summary();
    }
    if parts.contains("e2e") {
        end_to_end(&Load::from_env(benching));
    }
}

// ---------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------

/// An event envelope of one type, its `eventId` filled in per event.
struct EventTemplate {
    head: String,
    tail: String,
}

impl EventTemplate {
    fn new(event_type: &str) -> Self {
        const ID: &str = "EVENT_ID";
        let steps: Vec<_> = [
            ("Extract fields", "extraction"),
            ("Classify document", "classification"),
            ("Validate totals", "validation"),
            ("Export to ERP", "integration"),
        ]
        .iter()
        .enumerate()
        .map(|(index, (name, kind))| {
            serde_json::json!({
                "id": format!("step_{index}"), "name": name, "type": kind, "status": "COMPLETED",
                "startedAt": format!("2026-03-02T10:15:0{index}.120Z"),
                "completedAt": format!("2026-03-02T10:15:0{index}.870Z"),
                "durationMs": 750, "attempt": 1, "message": "ok",
                "output": {"fields": {"total": 1234.5, "currency": "EUR", "vendor": "ACME GmbH"}},
            })
        })
        .collect();
        let envelope = serde_json::json!({
            "eventId": ID, "eventType": event_type,
            "occurredAt": "2026-03-02T10:15:06Z", "apiVersion": "v1",
            "data": {
                "runId": "run_01HQ8Z4K7V3M9N2P5R6S8T0W1X", "status": "COMPLETED",
                "workflow": {"id": "wf_invoices", "name": "Invoices", "version": 7},
                "createdAt": "2026-03-02T10:14:58Z", "completedAt": "2026-03-02T10:15:06Z",
                "metadata": {"source": "email", "customerRef": "PO-2026-00412"},
                "steps": steps,
            },
        })
        .to_string();
        let (head, tail) = envelope
            .split_once(ID)
            .expect("the placeholder is in the envelope");
        Self {
            head: head.to_owned(),
            tail: tail.to_owned(),
        }
    }

    fn body(&self, event_id: &str) -> Bytes {
        Bytes::from([self.head.as_str(), event_id, &self.tail].concat())
    }
}

// ---------------------------------------------------------------------------------------------
// Part 1: the verifier alone
// ---------------------------------------------------------------------------------------------

fn verify_benches(c: &mut Criterion) {
    let body = EventTemplate::new(RUN_COMPLETED).body("evt_01HQ8Z4M2B6C8D0E2F4G6H8J0K");
    let now = SystemTime::now();
    let signed = sign(CURRENT_SECRET.as_bytes(), &body, now);
    let forged = sign(FORGED_SECRET.as_bytes(), &body, now);
    let one = Verifier::new(&[CURRENT_SECRET], TOLERANCE);
    let rotating = Verifier::new(&[PREVIOUS_SECRET, CURRENT_SECRET], TOLERANCE);
    let refused = Err(Refusal::InvalidSignature);

    println!("verify: a {} B event body", body.len());
    let mut group = c.benchmark_group("verify");
    group.throughput(Throughput::Elements(1));
    for (name, verifier, header, expected) in [
        ("valid/1_secret", &one, &signed, Ok(())),
        ("valid/2_secrets", &rotating, &signed, Ok(())),
        ("invalid/1_secret", &one, &forged, refused),
        ("invalid/2_secrets", &rotating, &forged, refused),
    ] {
        let header = header.as_bytes();
        assert_eq!(verifier.verify(Some(header), &body, now), expected, "{name}");
        group.bench_function(name, |b| {
            b.iter(|| verifier.verify(black_box(Some(header)), black_box(&body), now))
        });
    }
    group.bench_function("read_event", |b| {
        b.iter(|| event::read(black_box(&body)).expect("an event"))
    });
    group.finish();
}

// ---------------------------------------------------------------------------------------------
// Part 2: end to end
// ---------------------------------------------------------------------------------------------

struct Load {
    connections: usize,
    warmup: Duration,
    duration: Duration,
    /// Secrets the gateway holds (1 or 2).
    secrets: usize,
}

impl Load {
    fn from_env(benching: bool) -> Self {
        let (warmup, duration) = if benching {
            (env_number("WARMUP_S", 1.0), env_number("DURATION_S", 5.0))
        } else {
            (0.1, 0.3)
        };
        Self {
            connections: env_number("CONNECTIONS", 16).max(1),
            warmup: Duration::from_secs_f64(warmup),
            duration: Duration::from_secs_f64(duration),
            secrets: env_number("SECRETS", 1).clamp(1, 2),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Case {
    Ignored,
    InvalidSignature,
}

impl Case {
    const ALL: [Self; 2] = [Self::Ignored, Self::InvalidSignature];

    fn label(self) -> &'static str {
        match self {
            Self::Ignored => "ignored (signed, unknown type)",
            Self::InvalidSignature => "invalid signature",
        }
    }

    /// Whether the gateway answered as it should.
    fn expected(self, status: StatusCode, body: &[u8]) -> bool {
        match self {
            Self::Ignored => status == StatusCode::OK && body == IGNORED_ANSWER,
            Self::InvalidSignature => status == StatusCode::UNAUTHORIZED,
        }
    }
}

/// Builds one connection's deliveries of `case`.
struct Poster {
    case: Case,
    template: EventTemplate,
    host: String,
    /// For `InvalidSignature`: one header made with a wrong secret, sent with every event (an
    /// attacker need compute no HMAC at all; the gateway computes one per secret it holds).
    forged: String,
}

impl Poster {
    fn new(case: Case, addr: SocketAddr) -> Self {
        Self {
            case,
            template: EventTemplate::new(UNKNOWN_TYPE),
            host: addr.to_string(),
            forged: sign(FORGED_SECRET.as_bytes(), b"{}", SystemTime::now()),
        }
    }

    /// The delivery of event `event_id`; a valid one is signed now (on the generator's core).
    fn request(&self, event_id: &str) -> Request<Full<Bytes>> {
        let body = self.template.body(event_id);
        let signature = match self.case {
            Case::Ignored => sign(CURRENT_SECRET.as_bytes(), &body, SystemTime::now()),
            Case::InvalidSignature => self.forged.clone(),
        };
        Request::post(PATH)
            .header(HOST, &self.host)
            .header(CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, signature)
            .header("x-plextera-event-id", event_id)
            .header("x-plextera-event-type", UNKNOWN_TYPE)
            .body(Full::new(body))
            .expect("a valid request")
    }
}

/// One case's figures over the measured window.
struct Measured {
    events: usize,
    wrong: usize,
    latencies: Vec<Duration>,
    wall: Duration,
    gateway_cpu: Duration,
    generator_cpu: Duration,
}

fn end_to_end(load: &Load) {
    let gateway = GatewayThread::start(load.secrets);
    let generator_pinned = pin_to(GENERATOR_CPU);
    let runtime = current_thread_runtime();
    print_preamble(load, gateway.pinned && generator_pinned);
    for case in Case::ALL {
        let measured = runtime.block_on(drive(case, load, &gateway));
        print_row(case, &measured);
    }
}

fn print_preamble(load: &Load, pinned: bool) {
    let body_len = EventTemplate::new(UNKNOWN_TYPE).body("evt_Ignored_0_0").len();
    let placement = if pinned {
        format!("gateway pinned to CPU {GATEWAY_CPU}, generator to CPU {GENERATOR_CPU}")
    } else {
        "NOT pinned (fewer than 2 CPUs allowed?): the two threads share the machine".to_owned()
    };
    println!();
    println!(
        "webhook listener end to end: the gateway on one current-thread runtime, the generator on another; {placement}"
    );
    println!(
        "{} keep-alive HTTP/1.1 connections, one event in flight each, distinct eventIds, {body_len} B bodies; \
         valid events are signed by the generator as it sends them (that HMAC is on its core, not the gateway's), \
         invalid ones carry a fixed forged signature",
        load.connections
    );
    println!(
        "gateway holds {} secret(s){}; {:?} warm-up, then {:?} measured per case",
        load.secrets,
        if load.secrets == 2 {
            " (events signed with the second)"
        } else {
            ""
        },
        load.warmup,
        load.duration
    );
    println!();
    println!(
        "{:<31} {:>9} {:>12} {:>7} {:>7} {:>8} {:>9} {:>6}",
        "case", "events/s", "per gateway", "p50", "p99", "gateway", "generator", "wrong"
    );
    println!(
        "{:<31} {:>9} {:>12} {:>7} {:>7} {:>8} {:>9} {:>6}",
        "", "", "CPU-second", "µs", "µs", "CPU %", "CPU %", ""
    );
}

fn print_row(case: Case, measured: &Measured) {
    let seconds = measured.wall.as_secs_f64();
    let busy = |cpu: Duration| 100.0 * cpu.as_secs_f64() / seconds;
    println!(
        "{:<31} {:>9.0} {:>12.0} {:>7.0} {:>7.0} {:>8.0} {:>9.0} {:>6}",
        case.label(),
        measured.events as f64 / seconds,
        measured.events as f64 / measured.gateway_cpu.as_secs_f64().max(1e-9),
        micros(percentile(&measured.latencies, 0.50)),
        micros(percentile(&measured.latencies, 0.99)),
        busy(measured.gateway_cpu),
        busy(measured.generator_cpu),
        measured.wrong
    );
}

/// The measured window: answers that arrive in it count.
#[derive(Clone, Copy)]
struct Window {
    from: Instant,
    until: Instant,
}

/// Runs `case` through CONNECTIONS connections; samples both threads' CPU time at the window's
/// edges.
async fn drive(case: Case, load: &Load, gateway: &GatewayThread) -> Measured {
    let from = Instant::now() + load.warmup;
    let window = Window {
        from,
        until: from + load.duration,
    };
    let connections: Vec<_> = (0..load.connections)
        .map(|index| tokio::spawn(connection(gateway.addr, case, index, window)))
        .collect();
    tokio::time::sleep_until(window.from.into()).await;
    let (started, gateway_before, generator_before) = (
        Instant::now(),
        gateway.cpu_time(),
        thread_cpu_time("/proc/thread-self/schedstat"),
    );
    tokio::time::sleep_until(window.until.into()).await;
    let (ended, gateway_after, generator_after) = (
        Instant::now(),
        gateway.cpu_time(),
        thread_cpu_time("/proc/thread-self/schedstat"),
    );
    let mut measured = Measured {
        events: 0,
        wrong: 0,
        latencies: Vec::new(),
        wall: ended - started,
        gateway_cpu: gateway_after.saturating_sub(gateway_before),
        generator_cpu: generator_after.saturating_sub(generator_before),
    };
    for connection in connections {
        let log = connection.await.expect("a connection task");
        measured.events += log.latencies.len();
        measured.wrong += log.wrong;
        measured.latencies.extend(log.latencies);
    }
    measured.latencies.sort_unstable();
    measured
}

/// What one connection saw in the window: the latency of each expected answer, and how many
/// answers were not.
#[derive(Default)]
struct ConnectionLog {
    latencies: Vec<Duration>,
    wrong: usize,
}

/// Posts events one after another on one keep-alive connection until the window ends.
async fn connection(addr: SocketAddr, case: Case, index: usize, window: Window) -> ConnectionLog {
    let mut sender = connect(addr).await;
    let poster = Poster::new(case, addr);
    let mut log = ConnectionLog::default();
    for sequence in 0.. {
        let sent = Instant::now();
        if sent >= window.until {
            break;
        }
        let event_id = format!("evt_{case:?}_{index}_{sequence}");
        let request = poster.request(&event_id);
        let ok = exchange(&mut sender, request, case).await;
        let answered = Instant::now();
        if (window.from..window.until).contains(&answered) {
            if ok {
                log.latencies.push(answered - sent);
            } else {
                log.wrong += 1;
            }
        }
    }
    log
}

async fn connect(addr: SocketAddr) -> SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.expect("the webhook port accepts");
    stream.set_nodelay(true).expect("TCP_NODELAY");
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("an HTTP/1.1 connection");
    tokio::spawn(connection);
    sender
}

/// Sends `request` and reads the whole answer; whether it is the one `case` expects.
async fn exchange(sender: &mut SendRequest<Full<Bytes>>, request: Request<Full<Bytes>>, case: Case) -> bool {
    sender.ready().await.expect("the connection stays open");
    let response = sender.send_request(request).await.expect("an answer");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("a whole body")
        .to_bytes();
    case.expected(status, &body)
}

// ---------------------------------------------------------------------------------------------
// The gateway on a core of its own
// ---------------------------------------------------------------------------------------------

/// The gateway serving on a current-thread runtime in a thread of its own, until dropped.
struct GatewayThread {
    addr: SocketAddr,
    /// The thread's id, to read its CPU time.
    tid: i32,
    pinned: bool,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl GatewayThread {
    fn start(secrets: usize) -> Self {
        let (ready, started) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("gateway".to_owned())
            .spawn(move || {
                let pinned = pin_to(GATEWAY_CPU);
                current_thread_runtime().block_on(async move {
                    let gateway = start_gateway(secrets).await;
                    let addr = gateway.webhook.expect("the webhook listener is on");
                    ready
                        .send((addr, gettid().as_raw(), pinned))
                        .expect("the bench waits");
                    let _ = stopped.await;
                    drop(gateway);
                });
            })
            .expect("a gateway thread");
        let (addr, tid, pinned) = started.recv().expect("the gateway starts");
        Self {
            addr,
            tid,
            pinned,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn cpu_time(&self) -> Duration {
        thread_cpu_time(&format!("/proc/self/task/{}/schedstat", self.tid))
    }
}

impl Drop for GatewayThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A gateway with its webhook listener on loopback, holding `secrets` signing secrets. Its
/// upstream is never called: no event in this bench asks for a run.
async fn start_gateway(secrets: usize) -> TestGateway {
    let mut config = test_config("http://127.0.0.1:9");
    config.webhook.listen = Some("127.0.0.1:0".parse().expect("an address"));
    config.webhook.secrets_env = Some("BENCH_WEBHOOK_SECRETS".to_owned());
    config.webhook.tolerance = TOLERANCE;
    let held: &[&str] = if secrets == 2 {
        &[PREVIOUS_SECRET, CURRENT_SECRET]
    } else {
        &[CURRENT_SECRET]
    };
    let mut secrets = Secrets::key_only(ApiKey::new(TEST_KEY).expect("a key"));
    secrets.webhook_secrets = Some(
        held.iter()
            .map(|secret| SecretString::from(secret.to_string()))
            .collect(),
    );
    TestGateway::start_with_secrets(config, secrets).await
}

// ---------------------------------------------------------------------------------------------
// Threads, time and figures
// ---------------------------------------------------------------------------------------------

fn current_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

/// Pins the calling thread to `cpu`; whether it could.
fn pin_to(cpu: usize) -> bool {
    let mut set = CpuSet::new();
    set.set(cpu).is_ok() && sched_setaffinity(Pid::from_raw(0), &set).is_ok()
}

/// A thread's time on a CPU so far, from the first field of its `schedstat` (nanoseconds).
fn thread_cpu_time(schedstat: &str) -> Duration {
    std::fs::read_to_string(schedstat)
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .map_or(Duration::ZERO, Duration::from_nanos)
}

/// The `q` quantile of `sorted`.
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index]
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

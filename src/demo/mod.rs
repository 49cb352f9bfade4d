//! `--demo`: a simulated Plextera Get-run endpoint on loopback, so the gateway can be tried with no
//! key and no network.
//!
//! It behaves like the real endpoint where the gateway cares: it demands `Authorization: api-key
//! demo-key`, answers runs shaped like the reference page, and runs move on in time. A run id seen
//! for the first time starts QUEUED, is PROCESSING after 2 s, completing one of its steps about
//! every second (`progress.stepsCompleted`: a new version each time), and ends after 5 s (FAILED
//! for about one id in five, COMPLETED otherwise). Like the real endpoint, every answer carries a
//! `computedDurationMs` that ticks on every request without being a change. Ids starting `done-` are COMPLETED and `failed-` FAILED
//! from the first request; ids starting `missing-` are 404. Each answer takes about 40 ms, like a
//! call across the internet, so hits and misses look different. Benchmarks start it with other
//! timings ([`DemoOptions`]) and read how many requests it answered.
//!
//! When a run ends it posts a signed event for it to the gateway's webhook listener, once told
//! where that is ([`DemoUpstream::send_events_to`], [`events`]).
//!
//! It also serves the example page, `examples/watch-runs.html`, at `/` and `/watch-runs.html`,
//! without a key and at once: an origin other than the gateway's, as a browser frontend would be
//! ([`page_url`] is the address to open).

use std::collections::HashMap;
use std::convert::Infallible;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::net::TcpListener;

use self::events::EventTarget;
use crate::edge::error::error_body;
use crate::edge::response::{Body, json};
use crate::edge::routes::RUNS_PATH;

pub mod events;

pub use self::events::DEMO_WEBHOOK_SECRET;

/// The key the demo upstream accepts; not a secret.
pub const DEMO_API_KEY: &str = "demo-key";
/// The demo forgets every run once it has seen this many, so it cannot grow without bound.
const MAX_TRACKED_RUNS: usize = 100_000;
/// The example page: watches runs through the gateway with one `EventSource` per run.
pub const EXAMPLE_PAGE: &str = include_str!("../../examples/watch-runs.html");
/// Where the demo upstream serves [`EXAMPLE_PAGE`] (besides `/`).
pub const EXAMPLE_PAGE_PATH: &str = "/watch-runs.html";

/// How the simulated runs behave.
#[derive(Debug, Clone, Copy)]
pub struct DemoOptions {
    /// A new run is QUEUED this long...
    pub queued_for: Duration,
    /// ...then PROCESSING until this long after it was first asked for.
    pub finishes_after: Duration,
    /// Time taken by every answer.
    pub latency: Duration,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            queued_for: Duration::from_secs(2),
            finishes_after: Duration::from_secs(5),
            latency: Duration::from_millis(40),
        }
    }
}

/// A running simulated upstream.
pub struct DemoUpstream {
    pub addr: SocketAddr,
    answered: Arc<AtomicU64>,
    events: Arc<OnceLock<Arc<EventTarget>>>,
}

impl DemoUpstream {
    /// Starts the simulated upstream on `127.0.0.1:0`.
    pub async fn start(options: DemoOptions) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            options,
            runs: Mutex::default(),
            answered: Arc::default(),
            events: Arc::default(),
        });
        let answered = Arc::clone(&state.answered);
        let events = Arc::clone(&state.events);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = Arc::clone(&state);
                let service = hyper::service::service_fn(move |request| answer(request, Arc::clone(&state)));
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self {
            addr,
            answered,
            events,
        })
    }

    /// From now on, posts a signed event to `addr` at `path` (the gateway's webhook listener)
    /// when a run it has seen ends. Set once; later calls change nothing.
    pub fn send_events_to(&self, addr: SocketAddr, path: &str) {
        let _ = self.events.set(Arc::new(EventTarget {
            addr,
            path: path.to_owned(),
        }));
    }

    /// Requests answered so far (any status).
    pub fn requests_answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }
}

/// Starts the simulated upstream with the default timings.
pub async fn spawn() -> std::io::Result<DemoUpstream> {
    DemoUpstream::start(DemoOptions::default()).await
}

/// The origin of the example page served by the demo upstream at `page`: what
/// `server.cors_allowed_origins` must hold for the page to read the gateway's answers.
pub fn page_origin(page: SocketAddr) -> String {
    format!("http://{page}")
}

/// The URL to open for the example page served at `page`, watching runs through the gateway
/// listening on `gateway` (an unspecified address, `0.0.0.0` or `::`, is reached on loopback).
pub fn page_url(page: SocketAddr, gateway: SocketAddr) -> String {
    let mut gateway = gateway;
    if gateway.ip().is_unspecified() {
        gateway.set_ip(match gateway {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    format!("{}/?gateway=http://{gateway}", page_origin(page))
}

struct State {
    options: DemoOptions,
    /// When each run was first asked for.
    runs: Mutex<HashMap<String, (Instant, SystemTime)>>,
    answered: Arc<AtomicU64>,
    /// Where to post the event of a run that ends, once known.
    events: Arc<OnceLock<Arc<EventTarget>>>,
}

async fn answer<B>(request: Request<B>, state: Arc<State>) -> Result<Response<Body>, Infallible> {
    // The example page is not part of the simulated API: no key, no latency, not counted.
    if request.method() == Method::GET && matches!(request.uri().path(), "/" | EXAMPLE_PAGE_PATH) {
        return Ok(example_page());
    }
    tokio::time::sleep(state.options.latency).await;
    state.answered.fetch_add(1, Ordering::Relaxed);
    let expected = format!("api-key {DEMO_API_KEY}");
    if request
        .headers()
        .get(AUTHORIZATION)
        .is_none_or(|value| value != expected.as_str())
    {
        return Ok(json(
            StatusCode::UNAUTHORIZED,
            error_body("UNAUTHORIZED", "missing or invalid API key", None, false),
        ));
    }
    let Some(id) = request.uri().path().strip_prefix(RUNS_PATH) else {
        return Ok(json(
            StatusCode::NOT_FOUND,
            error_body("NOT_FOUND", "no such resource", None, false),
        ));
    };
    if id.starts_with("missing-") {
        return Ok(json(
            StatusCode::NOT_FOUND,
            error_body("NOT_FOUND", "run not found", None, false),
        ));
    }
    let (first_seen, started_at, new) = state.first_seen(id);
    if new {
        state.deliver_at_end(id, first_seen);
    }
    let age = first_seen.elapsed();
    let status = status_of(id, age, &state.options);
    let progress = Progress {
        steps_done: steps_done(status, age, &state.options),
        age,
    };
    Ok(json(
        StatusCode::OK,
        run_body(id, status, started_at, state.options.finishes_after, progress),
    ))
}

fn example_page() -> Response<Body> {
    let mut response = Response::new(Body::new(Bytes::from_static(EXAMPLE_PAGE.as_bytes()), None));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

impl State {
    /// When run `id` was first asked for, and whether that is now.
    fn first_seen(&self, id: &str) -> (Instant, SystemTime, bool) {
        let mut runs = self.runs.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if runs.len() >= MAX_TRACKED_RUNS && !runs.contains_key(id) {
            runs.clear();
        }
        let mut new = false;
        let (first_seen, started_at) = *runs.entry(id.to_owned()).or_insert_with(|| {
            new = true;
            (Instant::now(), SystemTime::now())
        });
        (first_seen, started_at, new)
    }

    /// With an event target set, posts run `id`'s event when it ends (runs that start ended get
    /// none: Plextera sent theirs long ago).
    fn deliver_at_end(&self, id: &str, first_seen: Instant) {
        let Some(target) = self.events.get().cloned() else {
            return;
        };
        if ["done-", "failed-"].iter().any(|prefix| id.starts_with(prefix)) {
            return;
        }
        let ends_at = first_seen + self.options.finishes_after;
        let status = status_of(id, self.options.finishes_after, &self.options);
        let id = id.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep_until(ends_at.into()).await;
            events::deliver(target, id, status).await;
        });
    }
}

/// The simulated life of a run.
fn status_of(id: &str, age: Duration, options: &DemoOptions) -> &'static str {
    if id.starts_with("done-") {
        return "COMPLETED";
    }
    if id.starts_with("failed-") {
        return "FAILED";
    }
    if age < options.queued_for {
        return "QUEUED";
    }
    if age < options.finishes_after {
        return "PROCESSING";
    }
    let mut hasher = DefaultHasher::new();
    id.hash(&mut hasher);
    if hasher.finish().is_multiple_of(5) {
        "FAILED"
    } else {
        "COMPLETED"
    }
}

/// The run's steps, done one after the other while it is PROCESSING.
const STEPS: [(&str, &str, &str); 4] = [
    ("step_ocr", "Read document", "ocr"),
    ("step_classify", "Classify document", "classification"),
    ("step_extract", "Extract fields", "extraction"),
    ("step_validate", "Validate totals", "validation"),
];

/// Where a run is: steps done, and its age (which `computedDurationMs` reports).
#[derive(Debug, Clone, Copy)]
struct Progress {
    steps_done: usize,
    age: Duration,
}

/// Steps done: none while QUEUED, one at the start of PROCESSING and one more for each equal
/// share of its time, all once ended.
fn steps_done(status: &str, age: Duration, options: &DemoOptions) -> usize {
    match status {
        "QUEUED" => 0,
        "PROCESSING" => {
            let processing = options.finishes_after.saturating_sub(options.queued_for);
            let into = age.saturating_sub(options.queued_for);
            let share = processing.as_secs_f64() / (STEPS.len() - 1) as f64;
            let done = if share > 0.0 {
                (into.as_secs_f64() / share) as usize
            } else {
                0
            };
            (1 + done).min(STEPS.len() - 1)
        }
        _ => STEPS.len(),
    }
}

/// How long after its start a run last changed (its `updatedAt`), with the default timings'
/// shape: QUEUED from the start, a step done at each equal share of PROCESSING, ended at `run_time`.
fn last_change(status: &str, steps_done: usize, run_time: Duration) -> Duration {
    let queued_for = DemoOptions::default().queued_for.min(run_time);
    match status {
        "QUEUED" => Duration::ZERO,
        "PROCESSING" => {
            let share = run_time.saturating_sub(queued_for) / (STEPS.len() - 1) as u32;
            queued_for + share * (steps_done.saturating_sub(1)) as u32
        }
        _ => run_time,
    }
}

fn run_body(id: &str, status: &str, started_at: SystemTime, run_time: Duration, progress: Progress) -> Bytes {
    let finished = matches!(status, "COMPLETED" | "FAILED");
    let timestamp = |time: SystemTime| humantime::format_rfc3339_seconds(time).to_string();
    let steps_done = progress.steps_done;
    let last = STEPS.len() - 1;
    let steps: Vec<_> = STEPS
        .iter()
        .enumerate()
        .map(|(index, (step_id, name, kind))| {
            let step_status = if index < steps_done {
                if index == last { status } else { "COMPLETED" }
            } else if index == steps_done && status == "PROCESSING" {
                "PROCESSING"
            } else {
                "QUEUED"
            };
            json!({
                "id": step_id, "name": name, "type": kind, "status": step_status, "message": null,
                "output": (index == last && status == "COMPLETED").then(|| json!({ "total": 1234.5, "currency": "EUR" })),
                "nestedRuns": { "count": 0, "data": [] }
            })
        })
        .collect();
    let body = json!({
        "id": id,
        "status": status,
        "createdAt": timestamp(started_at),
        "updatedAt": timestamp(started_at + last_change(status, progress.steps_done, run_time)),
        "startedAt": timestamp(started_at),
        "completedAt": if finished { Some(timestamp(started_at + run_time)) } else { None },
        "error": (status == "FAILED").then(|| json!({
            "code": "UNSUPPORTED_DOCUMENT",
            "message": "The document could not be processed by Document Insights."
        })),
        "workflow": { "id": "wf_demo_invoices", "name": "Invoice extraction (demo)" },
        "progress": { "stepsCompleted": steps_done, "stepsTotal": STEPS.len() },
        "durationMs": if finished { Some(u64::try_from(run_time.as_millis()).unwrap_or(u64::MAX)) } else { None },
        "computedDurationMs": u64::try_from(progress.age.as_millis()).unwrap_or(u64::MAX),
        "steps": steps
    });
    Bytes::from(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_move_from_queued_to_an_end() {
        let options = DemoOptions::default();
        assert_eq!(status_of("r1", Duration::ZERO, &options), "QUEUED");
        assert_eq!(status_of("r1", Duration::from_secs(3), &options), "PROCESSING");
        assert!(matches!(
            status_of("r1", Duration::from_secs(6), &options),
            "COMPLETED" | "FAILED"
        ));
        assert_eq!(status_of("done-1", Duration::ZERO, &options), "COMPLETED");
        assert_eq!(status_of("failed-1", Duration::ZERO, &options), "FAILED");
    }

    #[test]
    fn processing_runs_complete_their_steps_one_by_one() {
        let options = DemoOptions::default();
        let at = |millis| {
            let age = Duration::from_millis(millis);
            steps_done(status_of("r1", age, &options), age, &options)
        };
        assert_eq!(at(0), 0);
        assert_eq!(at(2_000), 1);
        assert_eq!(at(3_100), 2);
        assert_eq!(at(4_100), 3);
        assert_eq!(at(6_000), STEPS.len());
    }

    fn state() -> Arc<State> {
        Arc::new(State {
            options: DemoOptions {
                latency: Duration::ZERO,
                ..DemoOptions::default()
            },
            runs: Mutex::default(),
            answered: Arc::default(),
            events: Arc::default(),
        })
    }

    #[tokio::test]
    async fn the_example_page_needs_no_key_and_the_api_still_does() {
        for path in ["/", EXAMPLE_PAGE_PATH] {
            let request = Request::get(path).body(()).expect("request");
            let mut response = answer(request, state()).await.expect("infallible");
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            assert_eq!(response.headers()[CONTENT_TYPE], "text/html; charset=utf-8");
            assert_eq!(&response.body_mut().take_data()[..], EXAMPLE_PAGE.as_bytes());
        }
        let state = state();
        let request = Request::get(format!("{RUNS_PATH}run-1"))
            .body(())
            .expect("request");
        let response = answer(request, Arc::clone(&state)).await.expect("infallible");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let request = Request::post("/").body(()).expect("request");
        let response = answer(request, Arc::clone(&state)).await.expect("infallible");
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "only GET serves the page"
        );
        assert_eq!(
            state.answered.load(Ordering::Relaxed),
            2,
            "the page is not an API answer"
        );
    }

    #[test]
    fn the_page_url_names_the_gateway_on_loopback_when_it_listens_everywhere() {
        let page: SocketAddr = "127.0.0.1:4000".parse().expect("addr");
        let at = |gateway: &str| page_url(page, gateway.parse().expect("addr"));
        assert_eq!(page_origin(page), "http://127.0.0.1:4000");
        assert_eq!(
            at("0.0.0.0:8080"),
            "http://127.0.0.1:4000/?gateway=http://127.0.0.1:8080"
        );
        assert_eq!(
            at("[::]:8080"),
            "http://127.0.0.1:4000/?gateway=http://[::1]:8080"
        );
        assert_eq!(
            at("10.0.0.7:80"),
            "http://127.0.0.1:4000/?gateway=http://10.0.0.7:80"
        );
    }

    #[test]
    fn bodies_are_runs_the_gateway_can_sniff() {
        let progress = Progress {
            steps_done: STEPS.len(),
            age: Duration::from_secs(6),
        };
        let body = run_body(
            "r1",
            "COMPLETED",
            SystemTime::now(),
            Duration::from_secs(5),
            progress,
        );
        let head = crate::cache::sniff::sniff_run(&body).expect("a run");
        assert_eq!(head.id.as_deref(), Some("r1"));
        assert_eq!(head.status.as_deref(), Some("COMPLETED"));
    }
}

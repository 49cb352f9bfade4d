//! In-process hot paths, without sockets: the cache hit, status sniffing, the search for an echoed
//! key in every upstream body, and the whole public service stack answering a hit.
//! `cargo bench --bench hot_path`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use plextera_gateway::cache::scan::scan_status;
use plextera_gateway::cache::sniff::sniff_run;
use plextera_gateway::cache::{CacheOutcome, CachedRun, RunStore, policy};
use plextera_gateway::edge::response::{APPLICATION_JSON, run_response, terminal_cache_control};
use plextera_gateway::ops::metrics::Metrics;
use plextera_gateway::run::id::RunId;
use plextera_gateway::run::status::RunStatuses;
use plextera_gateway::serve::connection::track::Track;
use plextera_gateway::serve::connection::{Connection, Limits};
use plextera_gateway::upstream::key_echo::EchoFinder;
use plextera_gateway::{ApiKey, App, Config};
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// A Get-run body of about `size` bytes, `status` second as Plextera sends it.
fn run_body(id: &str, status: &str, size: usize) -> Bytes {
    let step = r#"{"id":"step_1","name":"Extract fields","type":"extraction","status":"COMPLETED","message":"ok","output":{"fields":{"total":1234.5,"currency":"EUR","vendor":"ACME GmbH"}},"nestedRuns":{"count":0,"data":[]}}"#;
    let mut body = format!(
        r#"{{"id":"{id}","status":"{status}","createdAt":"2024-01-15T09:30:00Z","workflow":{{"id":"wf_1","name":"Invoices"}},"steps":["#
    );
    while body.len() + step.len() + 3 < size {
        body.push_str(step);
        body.push(',');
    }
    body.push_str(step);
    body.push_str("]}");
    Bytes::from(body)
}

fn statuses() -> RunStatuses {
    RunStatuses::new(&["COMPLETED", "FAILED", "CLOSED"])
}

fn sniffing(c: &mut Criterion) {
    let mut group = c.benchmark_group("sniff");
    let id = RunId::parse("run_1").expect("id");
    let statuses = statuses();
    for (name, size) in [("1KB", 1024), ("1MB", 1024 * 1024)] {
        for status in ["PROCESSING", "COMPLETED"] {
            let body = run_body("run_1", status, size);
            group.throughput(Throughput::Bytes(body.len() as u64));
            group.bench_with_input(
                BenchmarkId::new(format!("decide/{status}"), name),
                &body,
                |b, body| b.iter(|| policy::decide(StatusCode::OK, black_box(body), &id, &statuses)),
            );
        }
        let body = run_body("run_1", "COMPLETED", size);
        group.bench_with_input(BenchmarkId::new("validating_parse", name), &body, |b, body| {
            b.iter(|| sniff_run(black_box(body)).expect("a run"))
        });
        group.bench_with_input(BenchmarkId::new("quick_scan", name), &body, |b, body| {
            b.iter(|| scan_status(black_box(body)))
        });
        // Every 200 passed through gets its version computed once per upstream call.
        let running = run_body("run_1", "PROCESSING", size);
        group.bench_with_input(BenchmarkId::new("weak_etag", name), &running, |b, body| {
            b.iter(|| plextera_gateway::cache::version::weak_etag(black_box(body)))
        });
    }
    group.finish();
}

/// Every upstream body is searched for the key before anyone sees it: a body with neither `\` nor
/// `%` by substring search, any other by trying each byte that could start a spelling of it.
fn key_echo(c: &mut Criterion) {
    let mut group = c.benchmark_group("key_echo");
    let finder = EchoFinder::new(b"pk_live_5uPerSecretKey0123456789");
    let plain = run_body("run_1", "PROCESSING", 16 * 1024);
    let escaped = Bytes::from(
        String::from_utf8_lossy(&plain).replace(r#""message":"ok""#, r#""message":"said \"ok\" at 100%""#),
    );
    // Worst case: every byte starts a plausible spelling of a key made of escape characters.
    let hostile_finder = EchoFinder::new("\\\\%%%%".repeat(8).as_bytes());
    let hostile = Bytes::from("\\\\%25".repeat(16 * 1024 / 6));
    for (name, finder, body) in [
        ("plain_16KB", &finder, &plain),
        ("with_escapes_16KB", &finder, &escaped),
        ("hostile_16KB", &hostile_finder, &hostile),
    ] {
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(name, |b| b.iter(|| finder.find(black_box(body))));
    }
    group.finish();
}

fn test_config() -> Config {
    let mut config = Config::default();
    config.upstream.base_url = "http://127.0.0.1:9".to_owned(); // never called: every request is a hit
    config
}

fn cache_hit(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let statuses = statuses();
    let metrics = Metrics::new(prometheus::Registry::new(), &statuses).expect("metrics");
    let ttl = Duration::from_secs(86_400);
    let store = RunStore::new(256 << 20, ttl, Duration::ZERO, metrics.cache.clone());
    let cache_control = terminal_cache_control(ttl);
    let completed = statuses.classify("COMPLETED");
    let fill = |store: RunStore| async move {
        for index in 0..1000 {
            let id = format!("done-{index}");
            let run = CachedRun::terminal(&run_body(&id, "COMPLETED", 1024), APPLICATION_JSON, completed);
            store.insert(RunId::parse(&id).expect("id"), run).await;
        }
    };
    runtime.block_on(fill(store.clone()));
    c.bench_function("hit/lookup_and_response", |b| {
        b.to_async(&runtime).iter(|| async {
            let run = store.get(black_box("done-42")).await.expect("stored");
            run_response(
                StatusCode::OK,
                run.content_type(),
                cache_control.clone(),
                CacheOutcome::Hit,
                run.body(),
            )
        })
    });

    let key = ApiKey::new("bench-key").expect("key");
    let app = runtime.block_on(async {
        let app = App::new(&test_config(), &plextera_gateway::Secrets::key_only(key)).expect("app");
        fill(app.admin.store.clone()).await;
        app
    });
    let service = app.public_service::<Empty<Bytes>>(None, None);
    c.bench_function("hit/service_stack", |b| {
        b.to_async(&runtime).iter(|| one_hit(&service))
    });

    // As a server runs it: one connection's stack, its requests and answers tracked, the body
    // handed over and dropped as hyper would.
    let slots = Arc::new(Semaphore::new(1));
    let connection = Connection::new(
        Limits {
            header_read_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(30),
            max_streams: 100,
        },
        slots.try_acquire_owned().expect("a free slot"),
    );
    let service = Track::new(
        app.public_service::<Empty<Bytes>>(Some(connection.work_slots()), None),
        Arc::clone(&connection),
    );
    c.bench_function("hit/connection_stack", |b| {
        b.to_async(&runtime).iter(|| one_hit(&service))
    });
}

/// One request for a stored run through `service`, its body read whole as hyper would send it.
async fn one_hit<S, B>(service: &S) -> Bytes
where
    S: tower::Service<Request<Empty<Bytes>>, Response = http::Response<B>, Error = std::convert::Infallible>
        + Clone,
    B: http_body::Body<Data = Bytes, Error = std::convert::Infallible>,
{
    let request = Request::get("/api/public/v1/workflow-runs/done-42")
        .header(http::header::HOST, "gateway")
        .body(Empty::new())
        .expect("request");
    let response = service.clone().oneshot(request).await.expect("infallible");
    assert_eq!(response.status(), StatusCode::OK);
    response
        .into_body()
        .collect()
        .await
        .expect("infallible")
        .to_bytes()
}

criterion_group!(benches, sniffing, key_echo, cache_hit);
criterion_main!(benches);

//! W3C trace context and OTLP export, through the real binary: a client's trace continued to
//! upstream and into the exported spans, a new trace when none (or an invalid one) came, error
//! bodies naming the trace, and a collector that is down changing nothing for clients.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use support::{
    GatewayProcess, MockUpstream, Reply, TEST_KEY, TestClient, eventually, process_config, refused_addr,
    runs_path, write_config,
};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_ID: &str = "00f067aa0ba902b7";

/// A small OTLP/HTTP receiver: every span POSTed to `/v1/traces` (protobuf), kept.
struct Collector {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
    /// `https://localhost:<port>` when serving TLS.
    tls: bool,
}

impl Collector {
    async fn start() -> Self {
        Self::serve(None).await
    }

    /// Serving TLS with a fresh self-signed certificate for `localhost`; also returns its PEM.
    async fn start_tls() -> (Self, String) {
        let (acceptor, pem) = support::tls::localhost_acceptor(&[b"http/1.1"]);
        (Self::serve(Some(acceptor)).await, pem)
    }

    async fn serve(tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let serves_tls = tls.is_some();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let spans = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&spans);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let kept = Arc::clone(&kept);
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let kept = Arc::clone(&kept);
                    async move {
                        let path_ok =
                            request.method() == Method::POST && request.uri().path() == "/v1/traces";
                        let body = request.into_body().collect().await?.to_bytes();
                        let status = match ExportTraceServiceRequest::decode(body) {
                            Ok(export) if path_ok => {
                                let mut kept = kept.lock().expect("spans");
                                for resource in export.resource_spans {
                                    for scope in resource.scope_spans {
                                        kept.extend(scope.spans);
                                    }
                                }
                                StatusCode::OK
                            }
                            _ => StatusCode::BAD_REQUEST,
                        };
                        let mut response = Response::new(Full::new(Bytes::new()));
                        *response.status_mut() = status;
                        Ok::<_, hyper::Error>(response)
                    }
                });
                let tls = tls.clone();
                tokio::spawn(async move {
                    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match tls {
                        Some(tls) => {
                            if let Ok(stream) = tls.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            spans,
            tls: serves_tls,
        }
    }

    fn endpoint(&self) -> String {
        if self.tls {
            format!("https://localhost:{}", self.addr.port())
        } else {
            format!("http://{}", self.addr)
        }
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().expect("spans").clone()
    }

    /// Waits for a server span of trace `trace_id` and its client child; returns both.
    async fn request_spans(&self, trace_id: &str) -> (Span, Span) {
        let find = || {
            let spans = self.spans();
            let server = spans
                .iter()
                .find(|span| hex(&span.trace_id) == trace_id && span.kind == SpanKind::Server as i32)
                .cloned()?;
            let client = spans
                .iter()
                .find(|span| span.kind == SpanKind::Client as i32 && span.parent_span_id == server.span_id)
                .cloned()?;
            Some((server, client))
        };
        eventually(&format!("the spans of trace {trace_id} are exported"), || async {
            find().is_some()
        })
        .await;
        find().expect("found")
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// A span's attribute as text (strings as they are, numbers in decimal).
fn attribute(span: &Span, key: &str) -> Option<String> {
    let value = span
        .attributes
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()?;
    Some(match value {
        Value::StringValue(text) => text.clone(),
        Value::IntValue(number) => number.to_string(),
        Value::BoolValue(flag) => flag.to_string(),
        Value::DoubleValue(number) => number.to_string(),
        _ => format!("{value:?}"),
    })
}

/// `(trace id, span id, flags)` of a `traceparent` value.
fn traceparent_parts(value: &str) -> (String, String, String) {
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "{value}");
    assert_eq!(parts[0], "00", "{value}");
    (parts[1].to_owned(), parts[2].to_owned(), parts[3].to_owned())
}

fn gateway_with(mock: &MockUpstream, telemetry: &str) -> (GatewayProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(
        dir.path(),
        &process_config(&mock.base_url(), &format!("[telemetry]\n{telemetry}\n")),
    );
    let gateway = GatewayProcess::start(&["--config", &config], &[("GW_TEST_KEY", TEST_KEY)]);
    (gateway, dir)
}

async fn get(gateway: &GatewayProcess, id: &str, headers: &[(&str, &str)]) -> support::TestResponse {
    TestClient::new()
        .send(
            Method::GET,
            &format!("http://{}{}", gateway.public, runs_path(id)),
            headers,
        )
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clients_trace_is_continued_upstream_and_exported_as_server_and_client_spans() {
    let collector = Collector::start().await;
    let mock = MockUpstream::start().await;
    mock.set("run_1", Reply::run("run_1", "QUEUED"));
    let (gateway, _dir) = gateway_with(&mock, &format!("otlp_endpoint = \"{}\"", collector.endpoint()));
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let response = get(
        &gateway,
        "run_1",
        &[
            ("traceparent", &traceparent),
            ("tracestate", "vendor=opaque,other=1"),
            ("user-agent", "trace-test"),
        ],
    )
    .await;
    assert_eq!(response.status, StatusCode::OK);

    let (server, client) = collector.request_spans(TRACE_ID).await;
    assert_eq!(
        hex(&server.parent_span_id),
        PARENT_ID,
        "the server span's parent is the client's span"
    );
    assert_eq!(hex(&client.trace_id), TRACE_ID);
    assert_eq!(server.name, "GET /api/public/v1/workflow-runs/{runId}");
    assert_eq!(attribute(&server, "http.request.method").as_deref(), Some("GET"));
    assert_eq!(
        attribute(&server, "http.route").as_deref(),
        Some("/api/public/v1/workflow-runs/{runId}")
    );
    assert_eq!(attribute(&server, "url.path"), Some(runs_path("run_1")));
    assert_eq!(
        attribute(&server, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        attribute(&server, "network.protocol.version").as_deref(),
        Some("1.1")
    );
    assert_eq!(attribute(&server, "client.address").as_deref(), Some("127.0.0.1"));
    assert_eq!(attribute(&server, "plextera.cache").as_deref(), Some("pass"));
    assert_eq!(attribute(&client, "server.address").as_deref(), Some("127.0.0.1"));
    assert_eq!(
        attribute(&client, "http.response.status_code").as_deref(),
        Some("200")
    );

    // Upstream got the trace, with the client span as the parent, and the tracestate unchanged.
    let upstream = mock.requests().pop().expect("an upstream request");
    let sent = upstream.headers["traceparent"].to_str().expect("ascii");
    let (trace_id, span_id, flags) = traceparent_parts(sent);
    assert_eq!(trace_id, TRACE_ID);
    assert_eq!(
        span_id,
        hex(&client.span_id),
        "upstream's parent is the exported client span"
    );
    assert_eq!(flags, "01");
    assert_eq!(upstream.headers["tracestate"], "vendor=opaque,other=1");
    assert_eq!(upstream.headers.get_all("traceparent").iter().count(), 1);

    // The access log line names the same trace and the server span.
    eventually("the access line is logged", || async {
        gateway.logs().contains("plextera_gateway::access")
    })
    .await;
    let access: serde_json::Value = gateway
        .logs()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|line| line["target"] == "plextera_gateway::access")
        .expect("an access line");
    assert_eq!(access["trace_id"], TRACE_ID, "{access}");
    assert_eq!(access["span_id"], hex(&server.span_id), "{access}");

    // The client's tracestate travels in both spans' context, as it does upstream.
    assert_eq!(server.trace_state, "vendor=opaque,other=1");
    assert_eq!(client.trace_state, "vendor=opaque,other=1");

    // No span holds the key; no attribute holds a header value the client sent but the path.
    for span in collector.spans() {
        let text = format!("{span:?}");
        assert!(!text.contains(TEST_KEY), "the key in a span: {text}");
        let attributes = format!("{:?}", span.attributes);
        assert!(
            !attributes.contains("vendor=opaque") && !attributes.contains("trace-test"),
            "a header value in a span's attributes: {attributes}"
        );
    }
}

/// OpenTelemetry's status code `Error` (`STATUS_CODE_ERROR`).
const STATUS_ERROR: i32 = 2;

fn status_code(span: &Span) -> i32 {
    span.status.as_ref().map_or(0, |status| status.code)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_4xx_fails_the_client_span_but_not_the_server_span() {
    let collector = Collector::start().await;
    let mock = MockUpstream::start().await;
    let (gateway, _dir) = gateway_with(&mock, &format!("otlp_endpoint = \"{}\"", collector.endpoint()));
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    // The mock answers 404 for a run it does not know.
    let response = get(&gateway, "missing", &[("traceparent", &traceparent)]).await;
    assert_eq!(response.status, StatusCode::NOT_FOUND);
    let (server, client) = collector.request_spans(TRACE_ID).await;
    assert_eq!(
        attribute(&client, "http.response.status_code").as_deref(),
        Some("404")
    );
    assert_eq!(attribute(&client, "error.type").as_deref(), Some("404"));
    assert_eq!(
        status_code(&client),
        STATUS_ERROR,
        "a client span's 4xx is an error: {client:?}"
    );
    assert_eq!(
        attribute(&server, "http.response.status_code").as_deref(),
        Some("404")
    );
    assert_ne!(
        status_code(&server),
        STATUS_ERROR,
        "a server span's 4xx is the client's mistake, not an error: {server:?}"
    );
}

async fn scrape(gateway: &GatewayProcess) -> support::prom::Scrape {
    let metrics = format!("http://{}/metrics", gateway.admin);
    let scrape = TestClient::new().send(Method::GET, &metrics, &[]).await;
    support::prom::Scrape::parse(std::str::from_utf8(&scrape.body).expect("utf-8"))
}

const DROPPED: &str = "plextera_gateway_spans_dropped_total";

#[tokio::test(flavor = "multi_thread")]
async fn failed_exports_are_counted_and_warned_about_once_a_minute() {
    let down = refused_addr().await;
    let mock = MockUpstream::start().await;
    mock.set("run_1", Reply::run("run_1", "QUEUED"));
    let (gateway, _dir) = gateway_with(&mock, &format!("otlp_endpoint = \"http://{down}\""));
    let before = scrape(&gateway).await;
    assert_eq!(before.expect(DROPPED, &[("reason", "export_failed")]), 0.0);
    assert_eq!(before.expect(DROPPED, &[("reason", "queue_full")]), 0.0);
    assert_eq!(before.expect("plextera_gateway_spans_exported_total", &[]), 0.0);
    // Two rounds, each exported (and failing) apart: a server and a client span per request.
    for round in 1..=2 {
        for _ in 0..10 {
            let response = get(&gateway, "run_1", &[]).await;
            assert_eq!(response.status, StatusCode::OK);
        }
        eventually(
            &format!("round {round}'s spans are counted as failed"),
            || async {
                scrape(&gateway)
                    .await
                    .expect(DROPPED, &[("reason", "export_failed")])
                    >= f64::from(20 * round)
            },
        )
        .await;
    }
    let logs = gateway.logs();
    let warnings: Vec<&str> = logs
        .lines()
        .filter(|line| line.contains("spans cannot be exported"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning a minute: {warnings:?}");
    assert!(warnings[0].contains("\"WARN\""), "{}", warnings[0]);
    assert!(
        warnings[0].to_lowercase().contains("refused"),
        "the cause is named: {}",
        warnings[0]
    );
    assert!(!warnings[0].contains(TEST_KEY), "{}", warnings[0]);
    assert_eq!(
        scrape(&gateway)
            .await
            .expect("plextera_gateway_spans_exported_total", &[]),
        0.0
    );
}

/// A collector that answers the first export on each connection `200` (keeping the connection,
/// no `Connection: close`) and closes the connection, unanswered, when the next export arrives on
/// it: a kept-alive connection closed just as a batch is sent, as behind an idle-timeout proxy.
/// Returns its address and the count of exports it answered.
async fn closing_collector() -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = taken.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                for answered in [true, false] {
                    let mut received = Vec::new();
                    let mut buffer = [0u8; 16 * 1024];
                    loop {
                        let Ok(read) = stream.read(&mut buffer).await else {
                            return;
                        };
                        if read == 0 {
                            return;
                        }
                        received.extend_from_slice(&buffer[..read]);
                        let Some(end) = received.windows(4).position(|window| window == b"\r\n\r\n") else {
                            continue;
                        };
                        let head = String::from_utf8_lossy(&received[..end]).to_lowercase();
                        let length: usize = head
                            .lines()
                            .find_map(|line| line.strip_prefix("content-length:"))
                            .and_then(|value| value.trim().parse().ok())
                            .unwrap_or(0);
                        if received.len() >= end + 4 + length {
                            break;
                        }
                    }
                    if !answered {
                        return; // closed, unanswered
                    }
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n")
                    .await;
                }
            });
        }
    });
    (address, taken)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_collector_closing_its_connections_loses_no_batch() {
    let (collector, taken) = closing_collector().await;
    let mock = MockUpstream::start().await;
    mock.set("run_1", Reply::run("run_1", "QUEUED"));
    let (gateway, _dir) = gateway_with(&mock, &format!("otlp_endpoint = \"http://{collector}\""));
    // Three rounds, each exported before the next: rounds two and three go out on a kept-alive
    // connection that closes as they arrive.
    for round in 1..=3 {
        for _ in 0..5 {
            assert_eq!(get(&gateway, "run_1", &[]).await.status, StatusCode::OK);
        }
        eventually(&format!("round {round}'s spans are exported"), || async {
            scrape(&gateway)
                .await
                .expect("plextera_gateway_spans_exported_total", &[])
                >= f64::from(10 * round)
        })
        .await;
    }
    assert!(taken.load(std::sync::atomic::Ordering::SeqCst) >= 3);
    let scrape = scrape(&gateway).await;
    assert_eq!(scrape.expect(DROPPED, &[("reason", "export_failed")]), 0.0);
    assert!(
        !gateway.logs().contains("spans cannot be exported"),
        "{}",
        gateway.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_export_queue_drops_spans_and_never_slows_a_request() {
    // Bound but never accepting: connections complete in the kernel, exports never get an answer
    // (each gives up after 5 s), so spans pile up until the queue is full.
    let hanging = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let hanging_addr = hanging.local_addr().expect("addr");
    let mock = MockUpstream::start().await;
    mock.set("run_1", Reply::run("run_1", "QUEUED"));
    let (gateway, _dir) = gateway_with(&mock, &format!("otlp_endpoint = \"http://{hanging_addr}\""));
    let gateway = Arc::new(gateway);
    let full = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = std::time::Instant::now();
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let gateway = Arc::clone(&gateway);
            let full = Arc::clone(&full);
            tokio::spawn(async move {
                let client = TestClient::new();
                let url = format!("http://{}{}", gateway.public, runs_path("run_1"));
                let (mut sent, mut slowest) = (0u32, std::time::Duration::ZERO);
                while !full.load(std::sync::atomic::Ordering::Relaxed) {
                    let asked = std::time::Instant::now();
                    let response = client.send(Method::GET, &url, &[]).await;
                    assert_eq!(response.status, StatusCode::OK);
                    slowest = slowest.max(asked.elapsed());
                    sent += 1;
                }
                (sent, slowest)
            })
        })
        .collect();
    // Two spans a request, and at most one batch of 512 leaving the queue every 5 s.
    let deadline = std::time::Duration::from_secs(60);
    loop {
        let dropped = scrape(&gateway)
            .await
            .expect(DROPPED, &[("reason", "queue_full")]);
        if dropped > 0.0 {
            break;
        }
        assert!(started.elapsed() < deadline, "the queue never filled");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    full.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for worker in workers {
        let (sent, slowest) = worker.await.expect("worker");
        total += sent;
        assert!(
            slowest < std::time::Duration::from_secs(1),
            "a request took {slowest:?} while the export queue was full"
        );
    }
    let spans = total as usize * 2;
    assert!(
        spans > plextera_gateway::ops::span_export::MAX_QUEUE,
        "{total} requests, {spans} spans: more than the queue holds"
    );
    // Still answering at once after the queue filled.
    let asked = std::time::Instant::now();
    assert_eq!(get(&gateway, "run_1", &[]).await.status, StatusCode::OK);
    assert!(asked.elapsed() < std::time::Duration::from_secs(1));
    drop(hanging);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_valid_traceparent_a_new_trace_starts_and_tracestate_is_dropped() {
    let collector = Collector::start().await;
    let mock = MockUpstream::start().await;
    let (gateway, _dir) = gateway_with(&mock, &format!("otlp_endpoint = \"{}\"", collector.endpoint()));
    let cases: [(&str, Option<&str>); 4] = [
        ("none", None),
        (
            "zero_trace",
            Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
        ),
        (
            "upper_hex",
            Some("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),
        ),
        (
            "short",
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902-01"),
        ),
    ];
    let mut traces = Vec::new();
    for (id, traceparent) in cases {
        mock.set(id, Reply::run(id, "QUEUED"));
        let mut headers = vec![("tracestate", "vendor=opaque")];
        if let Some(traceparent) = traceparent {
            headers.push(("traceparent", traceparent));
        }
        assert_eq!(get(&gateway, id, &headers).await.status, StatusCode::OK);
        let upstream = mock
            .requests()
            .into_iter()
            .find(|request| request.target.ends_with(id))
            .expect("the upstream request");
        let (trace_id, span_id, flags) =
            traceparent_parts(upstream.headers["traceparent"].to_str().expect("ascii"));
        assert_ne!(trace_id, TRACE_ID.to_owned(), "{id}");
        assert_ne!(
            trace_id.to_lowercase(),
            TRACE_ID,
            "{id}: the invalid trace was not continued"
        );
        assert_ne!(trace_id, "0".repeat(32), "{id}");
        assert_eq!(flags, "01", "{id}: sampled at the default ratio of 1");
        assert!(
            upstream.headers.get("tracestate").is_none(),
            "{id}: tracestate without a valid traceparent"
        );
        let (server, client) = collector.request_spans(&trace_id).await;
        assert!(
            server.parent_span_id.is_empty(),
            "{id}: a new trace's server span has no parent"
        );
        assert_eq!(hex(&client.span_id), span_id, "{id}");
        traces.push(trace_id);
    }
    traces.sort();
    traces.dedup();
    assert_eq!(traces.len(), 4, "every request its own trace");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_error_body_names_the_requests_trace() {
    let mock = MockUpstream::start().await;
    let (gateway, _dir) = gateway_with(&mock, "");
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-00");
    let response = TestClient::new()
        .send(
            Method::GET,
            &format!("http://{}/api/public/v1/workflow-runs/bad%20id", gateway.public),
            &[("traceparent", &traceparent), ("x-request-id", "req-7")],
        )
        .await;
    assert_eq!(response.status, StatusCode::BAD_REQUEST);
    let body = response.json();
    assert_eq!(body["error"]["traceId"], TRACE_ID, "{body}");
    assert_eq!(body["error"]["requestId"], "req-7", "{body}");
    // Unsampled by the client: the upstream call of another request keeps its own decision.
    mock.set("run_2", Reply::run("run_2", "QUEUED"));
    get(&gateway, "run_2", &[("traceparent", &traceparent)]).await;
    let upstream = mock.requests().pop().expect("an upstream request");
    let (trace_id, _, flags) = traceparent_parts(upstream.headers["traceparent"].to_str().expect("ascii"));
    assert_eq!((trace_id.as_str(), flags.as_str()), (TRACE_ID, "00"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_collector_that_is_down_or_hangs_changes_nothing_for_clients() {
    let down = refused_addr().await;
    // Bound but never accepting: connections complete in the kernel, exports never get an answer.
    let hanging = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let hanging_addr = hanging.local_addr().expect("addr");
    for collector in [down, hanging_addr] {
        let mock = MockUpstream::start().await;
        mock.set("run_1", Reply::run("run_1", "QUEUED"));
        let (mut gateway, _dir) = gateway_with(&mock, &format!("otlp_endpoint = \"http://{collector}\""));
        for _ in 0..20 {
            let response = get(&gateway, "run_1", &[]).await;
            assert_eq!(response.status, StatusCode::OK, "{collector}");
        }
        assert_eq!(mock.request_count(), 20);
        assert!(
            mock.requests()
                .iter()
                .all(|request| request.headers.contains_key("traceparent"))
        );
        // Shutdown exports what is queued, for at most 2 s: less than the 5 s export deadline.
        let stopping = std::time::Instant::now();
        assert_eq!(gateway.terminate().code(), Some(0));
        assert!(
            stopping.elapsed() < std::time::Duration::from_millis(4500),
            "the exit waited {:?} on a collector at {collector}",
            stopping.elapsed()
        );
    }
    drop(hanging);
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_sharing_one_upstream_call_each_log_their_own_trace() {
    let mock = MockUpstream::start().await;
    let gate = support::Gate::new();
    mock.set("run_1", Reply::run("run_1", "QUEUED").gated(&gate));
    let (gateway, _dir) = gateway_with(&mock, "");
    let leader_trace = "11111111111111111111111111111111";
    let follower_trace = "22222222222222222222222222222222";
    let send = |trace: &str, request_id: &str| {
        let url = format!("http://{}{}", gateway.public, runs_path("run_1"));
        let headers = [
            ("traceparent".to_owned(), format!("00-{trace}-{PARENT_ID}-01")),
            ("x-request-id".to_owned(), request_id.to_owned()),
        ];
        async move {
            let headers: Vec<(&str, &str)> = headers
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_str()))
                .collect();
            TestClient::new().send(Method::GET, &url, &headers).await
        }
    };
    let leader = tokio::spawn(send(leader_trace, "leader"));
    mock.wait_for_requests(1).await;
    let follower = tokio::spawn(send(follower_trace, "follower"));
    let metrics = format!("http://{}/metrics", gateway.admin);
    eventually("the follower waits on the leader's call", || async {
        let scrape = TestClient::new().send(Method::GET, &metrics, &[]).await;
        let text = std::str::from_utf8(&scrape.body).expect("utf-8").to_owned();
        support::prom::Scrape::parse(&text).expect("plextera_gateway_coalesced_waiters", &[]) >= 1.0
    })
    .await;
    gate.open();
    assert_eq!(leader.await.expect("leader").status, StatusCode::OK);
    let follower = follower.await.expect("follower");
    assert_eq!(follower.status, StatusCode::OK);
    assert_eq!(mock.request_count(), 1, "one upstream call for both");
    let upstream = mock.requests().pop().expect("the call");
    let (trace_id, _, _) = traceparent_parts(upstream.headers["traceparent"].to_str().expect("ascii"));
    assert_eq!(
        trace_id, leader_trace,
        "the shared call carries the leader's trace"
    );
    eventually("both requests are logged", || async {
        gateway.logs().matches("plextera_gateway::access").count() >= 2
    })
    .await;
    for (request_id, trace) in [("leader", leader_trace), ("follower", follower_trace)] {
        let line: serde_json::Value = gateway
            .logs()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(|line| line["target"] == "plextera_gateway::access" && line["request_id"] == request_id)
            .expect("an access line");
        assert_eq!(line["trace_id"], trace, "{line}");
    }
    let follower_line = gateway
        .logs()
        .lines()
        .find(|line| line.contains("\"request_id\":\"follower\""))
        .map(str::to_owned)
        .expect("the follower's line");
    assert!(
        follower_line.contains("\"plextera.cache\":\"coalesced\""),
        "{follower_line}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watchers_polls_start_traces_of_their_own() {
    let mock = MockUpstream::start().await;
    mock.set("run_1", Reply::run("run_1", "QUEUED"));
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(
        dir.path(),
        &format!(
            "{}[watch]\npoll_interval = \"50ms\"\nmax_poll_interval = \"50ms\"\n",
            process_config(&mock.base_url(), "")
        ),
    );
    let gateway = GatewayProcess::start(&["--config", &config], &[("GW_TEST_KEY", TEST_KEY)]);
    let first = get(&gateway, "run_1", &[]).await;
    let etag = first.header("etag").expect("an etag").to_owned();
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");
    let url = format!("http://{}{}?wait=10s", gateway.public, runs_path("run_1"));
    let held = tokio::spawn(async move {
        TestClient::new()
            .send(
                Method::GET,
                &url,
                &[
                    ("if-none-match", etag.as_str()),
                    ("traceparent", traceparent.as_str()),
                ],
            )
            .await
    });
    let polls = || {
        mock.requests()
            .into_iter()
            .filter(|request| {
                request.headers["x-request-id"]
                    .to_str()
                    .is_ok_and(|id| id.starts_with("watch-"))
            })
            .collect::<Vec<_>>()
    };
    eventually("the watcher polls twice", || async { polls().len() >= 2 }).await;
    mock.set("run_1", Reply::run("run_1", "COMPLETED"));
    assert_eq!(held.await.expect("the held request").status, StatusCode::OK);
    let mut traces: Vec<String> = polls()
        .iter()
        .map(|poll| traceparent_parts(poll.headers["traceparent"].to_str().expect("ascii")).0)
        .collect();
    assert!(
        traces.iter().all(|trace| trace != TRACE_ID),
        "a poll continued a client's trace: {traces:?}"
    );
    let polled = traces.len();
    traces.sort();
    traces.dedup();
    assert_eq!(traces.len(), polled, "each poll a trace of its own");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_https_collector_is_trusted_through_telemetry_ca_file_and_only_so() {
    let (collector, pem) = Collector::start_tls().await;
    let mock = MockUpstream::start().await;
    mock.set("run_1", Reply::run("run_1", "QUEUED"));
    let ca_dir = tempfile::tempdir().expect("temp dir");
    let ca_file = ca_dir.path().join("collector-ca.pem");
    std::fs::write(&ca_file, &pem).expect("write CA");
    let traceparent = format!("00-{TRACE_ID}-{PARENT_ID}-01");

    // Without the CA: the public roots do not vouch for it; the failure is counted and its cause
    // (the certificate) named.
    let (untrusting, _dir) = gateway_with(&mock, &format!("otlp_endpoint = \"{}\"", collector.endpoint()));
    assert_eq!(
        get(&untrusting, "run_1", &[("traceparent", &traceparent)])
            .await
            .status,
        StatusCode::OK
    );
    eventually("the export fails on the certificate", || async {
        scrape(&untrusting)
            .await
            .expect(DROPPED, &[("reason", "export_failed")])
            >= 2.0
    })
    .await;
    let logs = untrusting.logs();
    let warning = logs
        .lines()
        .find(|line| line.contains("spans cannot be exported"))
        .expect("a warning");
    assert!(warning.contains("certificate"), "{warning}");
    assert!(collector.spans().is_empty());
    drop(untrusting);

    let (trusting, _dir) = gateway_with(
        &mock,
        &format!(
            "otlp_endpoint = \"{}\"\nca_file = \"{}\"",
            collector.endpoint(),
            ca_file.display()
        ),
    );
    assert_eq!(
        get(&trusting, "run_1", &[("traceparent", &traceparent)])
            .await
            .status,
        StatusCode::OK
    );
    collector.request_spans(TRACE_ID).await;
    eventually("the export is counted", || async {
        scrape(&trusting)
            .await
            .expect("plextera_gateway_spans_exported_total", &[])
            >= 2.0
    })
    .await;
}

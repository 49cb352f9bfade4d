//! Test support: a scriptable mock upstream, the gateway in-process or as a real process, and an
//! HTTP client. Everything binds 127.0.0.1 on ephemeral ports; nothing waits on a timer for sync.
#![allow(dead_code)]

pub mod prom;
pub mod push;
pub mod raw;
pub mod redis_server;
pub mod sse;
pub mod tls;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use plextera_gateway::{ApiKey, Config, Gateway, Secrets};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// The key the gateway is given in tests; every test that checks leaks greps for it.
pub const TEST_KEY: &str = "pk_test_5uPerSecretKey0123456789";
/// Upper bound on any wait in a test; reaching it is a failure, not a synchronisation.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub fn runs_path(id: &str) -> String {
    format!("/api/public/v1/workflow-runs/{id}")
}

/// A run body like Plextera's, padded to at least `min_len` bytes.
pub fn run_body(id: &str, status: &str, min_len: usize) -> Bytes {
    let head = format!(
        r#"{{"id":"{id}","status":"{status}","workflow":{{"id":"wf_1","name":"Invoices"}},"steps":[{{"id":"s1","status":"QUEUED"}}],"note":""#
    );
    let tail = r#""}"#;
    let padding = min_len.saturating_sub(head.len() + tail.len());
    Bytes::from(format!("{head}{}{tail}", "x".repeat(padding)))
}

// ---------------------------------------------------------------------------------------------
// Mock upstream
// ---------------------------------------------------------------------------------------------

/// What the mock answers for a run id.
#[derive(Clone)]
pub enum Reply {
    /// A complete response.
    Respond {
        status: StatusCode,
        headers: Vec<(&'static str, String)>,
        body: Bytes,
    },
    /// Waits for the gate to open, then answers with the inner reply.
    Gated(Gate, Box<Reply>),
    /// Closes the connection without answering.
    Abort,
}

impl Reply {
    /// A 200 run with the given id and status.
    pub fn run(id: &str, status: &str) -> Self {
        Self::ok(run_body(id, status, 0))
    }

    /// A 200 with this exact body.
    pub fn ok(body: impl Into<Bytes>) -> Self {
        Self::status(StatusCode::OK, body)
    }

    /// Any status with a JSON body.
    pub fn status(status: StatusCode, body: impl Into<Bytes>) -> Self {
        Self::Respond {
            status,
            headers: vec![("content-type", "application/json".to_owned())],
            body: body.into(),
        }
    }

    pub fn with_header(self, name: &'static str, value: &str) -> Self {
        match self {
            Self::Respond {
                status,
                mut headers,
                body,
            } => {
                headers.push((name, value.to_owned()));
                Self::Respond {
                    status,
                    headers,
                    body,
                }
            }
            other => other,
        }
    }

    pub fn gated(self, gate: &Gate) -> Self {
        Self::Gated(gate.clone(), Box::new(self))
    }
}

/// A gate that holds mock answers until opened.
#[derive(Clone)]
pub struct Gate(watch::Sender<bool>);

impl Gate {
    pub fn new() -> Self {
        Self(watch::channel(false).0)
    }

    pub fn open(&self) {
        self.0.send_replace(true);
    }

    /// Resolves once the gate is open.
    pub async fn passed(&self) {
        let mut open = self.0.subscribe();
        let _ = open.wait_for(|open| *open).await;
    }
}

/// One request as the mock received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub target: String,
    pub headers: HeaderMap,
    /// When the request arrived.
    pub at: std::time::Instant,
}

#[derive(Default)]
struct MockState {
    replies: Mutex<HashMap<String, Reply>>,
    requests: Mutex<Vec<Recorded>>,
    /// When set, the only `Authorization` values answered; any other gets a 401.
    accepted_keys: Mutex<Option<Vec<String>>>,
}

/// A real HTTP/1.1 server standing in for Plextera. Unknown ids get a 404.
pub struct MockUpstream {
    pub addr: SocketAddr,
    state: Arc<MockState>,
    arrivals: watch::Sender<usize>,
    task: JoinHandle<()>,
}

impl MockUpstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind mock upstream");
        let addr = listener.local_addr().expect("mock address");
        let state = Arc::new(MockState::default());
        let arrivals = watch::channel(0).0;
        let task = tokio::spawn(serve_mock(listener, Arc::clone(&state), arrivals.clone()));
        Self {
            addr,
            state,
            arrivals,
            task,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sets the reply for a run id (replacing any earlier one).
    pub fn set(&self, id: &str, reply: Reply) {
        self.state
            .replies
            .lock()
            .expect("mock lock")
            .insert(id.to_owned(), reply);
    }

    /// From now on, answers only requests whose API key is one of `keys` (each as in
    /// `Authorization: api-key <key>`); any other gets 401, as Plextera answers a revoked key.
    pub fn accept_only(&self, keys: &[&str]) {
        *self.state.accepted_keys.lock().expect("mock lock") =
            Some(keys.iter().map(|key| format!("api-key {key}")).collect());
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().expect("mock lock").clone()
    }

    pub fn request_count(&self) -> usize {
        self.state.requests.lock().expect("mock lock").len()
    }

    /// Requests received for one run id.
    pub fn count_for(&self, id: &str) -> usize {
        let path = runs_path(id);
        self.requests()
            .iter()
            .filter(|request| request.target == path)
            .count()
    }

    /// Resolves once at least `count` requests have arrived in total.
    pub async fn wait_for_requests(&self, count: usize) {
        let mut arrivals = self.arrivals.subscribe();
        tokio::time::timeout(PATIENCE, arrivals.wait_for(|arrived| *arrived >= count))
            .await
            .expect("mock upstream: requests did not arrive in time")
            .expect("mock upstream stopped");
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_mock(listener: TcpListener, state: Arc<MockState>, arrivals: watch::Sender<usize>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = Arc::clone(&state);
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                let state = Arc::clone(&state);
                let arrivals = arrivals.clone();
                async move { answer_mock(request, &state, &arrivals).await }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer_mock(
    request: Request<hyper::body::Incoming>,
    state: &MockState,
    arrivals: &watch::Sender<usize>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    let target = request
        .uri()
        .path_and_query()
        .map_or_else(String::new, |target| target.as_str().to_owned());
    let id = target.rsplit('/').next().unwrap_or_default().to_owned();
    state.requests.lock().expect("mock lock").push(Recorded {
        method: request.method().clone(),
        target,
        headers: request.headers().clone(),
        at: std::time::Instant::now(),
    });
    arrivals.send_modify(|arrived| *arrived += 1);
    let refused = state
        .accepted_keys
        .lock()
        .expect("mock lock")
        .as_ref()
        .is_some_and(|accepted| {
            let presented = request
                .headers()
                .get("authorization")
                .and_then(|value| value.to_str().ok());
            !accepted.iter().any(|key| Some(key.as_str()) == presented)
        });
    let reply = if refused {
        Some(Reply::status(
            StatusCode::UNAUTHORIZED,
            r#"{"error":{"code":"UNAUTHORIZED","message":"invalid API key","retryable":false}}"#,
        ))
    } else {
        state.replies.lock().expect("mock lock").get(&id).cloned()
    };
    let mut reply = reply.unwrap_or_else(|| {
        Reply::status(
            StatusCode::NOT_FOUND,
            r#"{"error":{"code":"NOT_FOUND","message":"run not found","retryable":false}}"#,
        )
    });
    loop {
        match reply {
            Reply::Gated(gate, inner) => {
                gate.passed().await;
                reply = *inner;
            }
            Reply::Abort => return Err(std::io::Error::other("mock aborts the connection")),
            Reply::Respond {
                status,
                headers,
                body,
            } => {
                let mut response = Response::new(Full::new(body));
                *response.status_mut() = status;
                for (name, value) in headers {
                    response
                        .headers_mut()
                        .insert(name, value.parse().expect("mock header value"));
                }
                return Ok(response);
            }
        }
    }
}

/// A bench knob: the environment variable `name` parsed as a number, or `default` when unset or
/// not a number.
pub fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// An address where nothing listens: connecting to it is refused.
pub async fn refused_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    addr
}

// ---------------------------------------------------------------------------------------------
// The gateway in-process
// ---------------------------------------------------------------------------------------------

/// A config for tests: both ports ephemeral on loopback, upstream at `base_url`.
pub fn test_config(base_url: &str) -> Config {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().expect("addr");
    config.server.admin_listen = "127.0.0.1:0".parse().expect("addr");
    config.upstream.base_url = base_url.to_owned();
    config.upstream.request_timeout = Duration::from_secs(5);
    config
}

/// The gateway library running in this test's runtime.
pub struct TestGateway {
    pub public: SocketAddr,
    pub admin: SocketAddr,
    /// The webhook port, when `[webhook] listen` is set.
    pub webhook: Option<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    client: TestClient,
}

impl TestGateway {
    /// Starts a gateway in front of `mock`, after letting `adjust` change the test config.
    pub async fn start(mock: &MockUpstream, adjust: impl FnOnce(&mut Config)) -> Self {
        let mut config = test_config(&mock.base_url());
        adjust(&mut config);
        Self::start_with(config).await
    }

    pub async fn start_with(config: Config) -> Self {
        let key = ApiKey::new(TEST_KEY).expect("test key");
        Self::start_with_secrets(config, Secrets::key_only(key)).await
    }

    pub async fn start_with_secrets(config: Config, secrets: Secrets) -> Self {
        config.validate().expect("test config is valid");
        let gateway = Gateway::bind(&config, &secrets).await.expect("gateway binds");
        let (public, admin, webhook) = (
            gateway.public_addr(),
            gateway.admin_addr(),
            gateway.webhook_addr(),
        );
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(gateway.serve(async {
            let _ = stop.await;
        }));
        Self {
            public,
            admin,
            webhook,
            shutdown: Some(shutdown),
            task: Some(task),
            client: TestClient::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.public)
    }

    /// GET a run through the public port.
    pub async fn get_run(&self, id: &str) -> TestResponse {
        self.client
            .send(Method::GET, &self.url(&runs_path(id)), &[])
            .await
    }

    pub async fn send(&self, method: Method, path: &str, headers: &[(&str, &str)]) -> TestResponse {
        self.client.send(method, &self.url(path), headers).await
    }

    pub async fn admin_get(&self, path: &str) -> TestResponse {
        self.client
            .send(Method::GET, &format!("http://{}{path}", self.admin), &[])
            .await
    }

    /// Waits until `count` requests are parked on another request's upstream call.
    pub async fn wait_for_waiters(&self, count: u64) {
        eventually(
            &format!("{count} requests wait on a shared upstream call"),
            || async {
                self.scrape()
                    .await
                    .expect("plextera_gateway_coalesced_waiters", &[])
                    == count as f64
            },
        )
        .await;
    }

    /// Scrapes `/metrics` on the admin port and parses it strictly.
    pub async fn scrape(&self) -> prom::Scrape {
        let response = self.admin_get("/metrics").await;
        assert_eq!(response.status, StatusCode::OK);
        assert_eq!(
            response.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        prom::Scrape::parse(std::str::from_utf8(&response.body).expect("utf-8 exposition"))
    }

    /// Starts the graceful shutdown; `stopped` waits for it to end.
    pub fn begin_shutdown(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }

    /// Waits for `serve` to return; panics if it takes longer than `PATIENCE`.
    pub async fn stopped(&mut self) {
        let task = self.task.take().expect("gateway task");
        tokio::time::timeout(PATIENCE, task)
            .await
            .expect("gateway did not stop in time")
            .expect("gateway task panicked");
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------------

/// A complete response.
#[derive(Debug, Clone)]
pub struct TestResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl TestResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    pub fn x_cache(&self) -> Option<&str> {
        self.header("x-cache")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| {
            panic!(
                "body is not JSON ({error}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The `error.code` of a JSON error body.
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error.code in {:?}", String::from_utf8_lossy(&self.body)))
            .to_owned()
    }

    /// Every byte the client saw, for leak checks.
    pub fn everything(&self) -> String {
        let mut text = String::from_utf8_lossy(&self.body).into_owned();
        for (name, value) in &self.headers {
            text.push_str(&format!(
                "\n{name}: {}",
                String::from_utf8_lossy(value.as_bytes())
            ));
        }
        text
    }
}

/// An HTTP/1.1 client with its own connection pool.
#[derive(Clone)]
pub struct TestClient(Client<HttpConnector, Empty<Bytes>>);

impl TestClient {
    pub fn new() -> Self {
        Self(Client::builder(TokioExecutor::new()).build(HttpConnector::new()))
    }

    pub async fn send(&self, method: Method, url: &str, headers: &[(&str, &str)]) -> TestResponse {
        self.try_send(method, url, headers)
            .await
            .unwrap_or_else(|error| panic!("{url}: {error}"))
    }

    pub async fn try_send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<TestResponse, String> {
        let mut request = Request::builder().method(method).uri(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Empty::new()).map_err(|error| error.to_string())?;
        let response = tokio::time::timeout(PATIENCE, self.0.request(request))
            .await
            .map_err(|_| "no response in time".to_owned())?
            .map_err(|error| format!("{error:?}"))?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|error| error.to_string())?
            .to_bytes();
        Ok(TestResponse {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

/// An HTTP/1.1 client for requests with a body (`TestClient` sends none), with its own pool:
/// sequential requests from one `BodyClient` reuse one connection.
#[derive(Clone)]
pub struct BodyClient(Client<HttpConnector, Full<Bytes>>);

impl BodyClient {
    pub fn new() -> Self {
        Self(Client::builder(TokioExecutor::new()).build(HttpConnector::new()))
    }

    /// Sends `body` with a `Content-Length`; fails the test on a transport error.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> TestResponse {
        let mut request = Request::builder().method(method).uri(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(body.into()))
            .unwrap_or_else(|error| panic!("{url}: a request to send: {error}"));
        let response = tokio::time::timeout(PATIENCE, self.0.request(request))
            .await
            .unwrap_or_else(|_| panic!("{url}: no response in time"))
            .unwrap_or_else(|error| panic!("{url}: {error:?}"));
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .unwrap_or_else(|error| panic!("{url}: the body: {error}"))
            .to_bytes();
        TestResponse {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    pub async fn post(&self, url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> TestResponse {
        self.send(Method::POST, url, headers, body).await
    }
}

/// Writes raw bytes on a fresh connection and returns everything read until the server closes.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write request");
    let mut response = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response))
        .await
        .expect("server did not close the connection in time");
    String::from_utf8_lossy(&response).into_owned()
}

/// Raises this process's open-descriptor soft limit to its hard limit; returns the limit in force.
pub fn raise_descriptor_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    }
}

/// Polls `condition` every few milliseconds until it holds; fails after `PATIENCE`.
/// For states with no event to wait on (e.g. a listener having closed).
pub async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The gateway as a real process
// ---------------------------------------------------------------------------------------------

/// The `plextera-gateway` binary running as a child process, JSON logs captured.
pub struct GatewayProcess {
    child: Child,
    pub public: SocketAddr,
    pub admin: SocketAddr,
    /// The webhook port, when `[webhook] listen` is set.
    pub webhook: Option<SocketAddr>,
    logs: Arc<Mutex<Vec<String>>>,
    /// The threads reading stdout and stderr: joined once the process has exited, so every line
    /// it printed is in `logs`.
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl GatewayProcess {
    /// Starts the binary with `args` and `env`, and waits for its "gateway ready" log line.
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_under(&[], args, env)
    }

    /// As [`GatewayProcess::start`], with `dir` as the working directory.
    pub fn start_in(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::launch(&[], Some(dir), args, env)
    }

    /// As [`GatewayProcess::start`], run by the command `wrapper` (e.g. `prlimit --nofile=…`).
    pub fn start_under(wrapper: &[&str], args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::launch(wrapper, None, args, env)
    }

    fn launch(wrapper: &[&str], dir: Option<&Path>, args: &[&str], env: &[(&str, &str)]) -> Self {
        let binary = env!("CARGO_BIN_EXE_plextera-gateway");
        let mut command = match wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut command = Command::new(program);
                command.args(wrapper_args).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        command
            .args(["--log-format", "json"])
            .args(args)
            .env_remove("PLEXTERA_API_KEY")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (name, value) in env {
            command.env(name, value);
        }
        if let Some(dir) = dir {
            command.current_dir(dir);
        }
        let mut child = command.spawn().expect("start the gateway binary");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().expect("stdout piped");
        let stderr = child.stderr.take().expect("stderr piped");
        let readers = vec![
            spawn_line_reader(stdout, Arc::clone(&logs), Some(ready_tx)),
            spawn_line_reader(stderr, Arc::clone(&logs), None),
        ];
        let ready: serde_json::Value = ready_rx.recv_timeout(PATIENCE).unwrap_or_else(|_| {
            panic!(
                "gateway did not become ready; output:\n{}",
                logs.lock().expect("logs").join("\n")
            )
        });
        let addr = |field: &str| -> SocketAddr {
            ready[field]
                .as_str()
                .and_then(|text| text.parse().ok())
                .unwrap_or_else(|| panic!("no {field} in {ready}"))
        };
        Self {
            public: addr("public_addr"),
            admin: addr("admin_addr"),
            webhook: ready["webhook_addr"].as_str().and_then(|text| text.parse().ok()),
            child,
            logs,
            readers,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and returns at once.
    pub fn send_sigterm(&self) {
        self.send_signal("TERM");
    }

    /// Sends a signal by name (`TERM`, `HUP`, …) and returns at once.
    pub fn send_signal(&self, name: &str) {
        let signal: nix::sys::signal::Signal = format!("SIG{name}").parse().expect("a signal name");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("a pid fits i32"));
        nix::sys::signal::kill(pid, signal).unwrap_or_else(|error| panic!("kill -{name}: {error}"));
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.send_sigterm();
        self.wait()
    }

    /// Waits for the exit status; then every line the process printed is in [`Self::logs`].
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the gateway") {
                // The pipes are at their end: the readers finish with the last lines.
                for reader in self.readers.drain(..) {
                    reader.join().expect("a log reader thread");
                }
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "gateway did not exit in time"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// GET a run through the process's public port.
    pub async fn get_run(&self, id: &str) -> TestResponse {
        TestClient::new()
            .send(
                Method::GET,
                &format!("http://{}{}", self.public, runs_path(id)),
                &[],
            )
            .await
    }

    /// The process's `/metrics`, parsed.
    pub async fn scrape(&self) -> prom::Scrape {
        let response = TestClient::new()
            .send(Method::GET, &format!("http://{}/metrics", self.admin), &[])
            .await;
        assert_eq!(response.status, StatusCode::OK);
        prom::Scrape::parse(std::str::from_utf8(&response.body).expect("utf-8 exposition"))
    }

    /// Every line printed so far, stdout and stderr.
    pub fn logs(&self) -> String {
        self.logs.lock().expect("logs").join("\n")
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_line_reader(
    output: impl std::io::Read + Send + 'static,
    logs: Arc<Mutex<Vec<String>>>,
    ready: Option<std::sync::mpsc::Sender<serde_json::Value>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(output).lines() {
            let Ok(line) = line else { break };
            if let Some(ready) = &ready
                && let Ok(json) = serde_json::from_str::<serde_json::Value>(&line)
                && json["message"] == "gateway ready"
            {
                let _ = ready.send(json);
            }
            logs.lock().expect("logs").push(line);
        }
    })
}

/// Runs the binary to completion (for start-up failures) and returns status, stdout and stderr.
pub fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_plextera-gateway"));
    command.args(args).env_remove("PLEXTERA_API_KEY");
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().expect("run the gateway binary");
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Writes a config file into `dir` and returns its path as a string.
pub fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).expect("write config");
    path.to_str().expect("utf-8 path").to_owned()
}

/// A config file body for a process test: ephemeral ports, upstream at `base_url`.
pub fn process_config(base_url: &str, extra_upstream: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n\
         [upstream]\nbase_url = \"{base_url}\"\napi_key_env = \"GW_TEST_KEY\"\n{extra_upstream}\n"
    )
}

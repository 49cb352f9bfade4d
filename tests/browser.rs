//! The example page, `examples/watch-runs.html`, in a real browser: Debian's `chromium`, headless,
//! loads the page from the demo upstream's origin and watches runs through a gateway on another
//! origin with `EventSource`, as a browser frontend would. Every run must reach its end state;
//! with the page's origin not allowed by CORS, none may get past its first state.
//!
//! The test drives chromium over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON
//! messages ended by a NUL byte, commands on the browser's fd 3, answers on its fd 4), so it needs
//! no port to discover and no websocket client. It reads the page's `data-*` attributes (and
//! whether the page closed its `EventSource`s) every 50 ms until the page says every run has
//! ended; past a deadline it fails with the page's state and DOM. Nothing waits on a timer for the
//! runs themselves. Chromium missing is a failure, not a skip: `.ci/run` installs it.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plextera_gateway::config::WatchConfig;
use plextera_gateway::demo::{self, DEMO_API_KEY, DemoOptions, DemoUpstream};
use plextera_gateway::{ApiKey, Secrets};
use serde::Deserialize;
use serde_json::{Value, json};
use support::{GatewayProcess, TestGateway, test_config};

/// How long the page may take to see every run end (they end within 1.5 s of being asked for).
const PAGE_DEADLINE: Duration = Duration::from_secs(20);
/// How long one DevTools command may take.
const COMMAND_DEADLINE: Duration = Duration::from_secs(10);
/// How often the page's state is read while waiting.
const POLL_EVERY: Duration = Duration::from_millis(50);

#[tokio::test(flavor = "multi_thread")]
async fn the_example_page_watches_every_run_to_its_end_across_origins() {
    let upstream = DemoUpstream::start(DemoOptions {
        queued_for: Duration::from_millis(300),
        finishes_after: Duration::from_millis(1500),
        latency: Duration::from_millis(5),
    })
    .await
    .expect("demo upstream");
    let page_origin = demo::page_origin(upstream.addr);
    let allowed = gateway_for(&upstream, vec![page_origin.clone()], |watch| {
        // Streams are cut every ~0.6 s: the browser reconnects (Last-Event-ID) while runs go on.
        watch.max_stream_duration = Duration::from_millis(600);
        watch.sse_retry = Duration::from_millis(100);
    })
    .await;
    // CORS is on, for another origin only: the browser withholds every answer from the page.
    let blocked = gateway_for(&upstream, vec!["https://app.example.com".to_owned()], |_| {}).await;

    // At most six at once: a browser opens six HTTP/1.1 connections to a host, one per stream.
    let ids = ["run-a", "run-b", "run-c", "done-d", "failed-e", "missing-f"];
    let page = format!(
        "{}&runs={}",
        demo::page_url(upstream.addr, allowed.public),
        ids.join(",")
    );
    let blocked_ids = ["run-x", "done-y"];
    let blocked_page = format!(
        "{}&runs={}",
        demo::page_url(upstream.addr, blocked.public),
        blocked_ids.join(",")
    );
    let (watched, withheld) = tokio::task::spawn_blocking(move || {
        let mut browser = Chromium::start();
        let watched = browser.watch_until_all_ended(&page);
        let withheld = browser.watch_until_all_ended(&blocked_page);
        (watched, withheld)
    })
    .await
    .expect("the browser thread");

    let states: Vec<&str> = watched.runs.iter().map(|row| row.state.as_str()).collect();
    assert_eq!(watched.ids(), ids, "{watched:#?}");
    // One request per stream and per reconnect (at least one for each run still going), and the
    // plain GET that explains the 404.
    let requests = requests_answered(&allowed, None).await;
    assert!(
        requests >= (ids.len() + 3 + 1) as f64,
        "{requests} requests: no reconnects?"
    );
    for row in &watched.runs[..3] {
        // Shown live: QUEUED first, PROCESSING while its steps complete, then how it ended, which
        // is what the gateway answers for it now.
        assert!(row.ended, "{row:?}");
        let seen: Vec<&str> = row.seen.split(' ').collect();
        assert_eq!(seen.first(), Some(&"QUEUED"), "{row:?}");
        assert!(seen.contains(&"PROCESSING"), "{row:?}");
        assert!(matches!(row.state.as_str(), "COMPLETED" | "FAILED"), "{row:?}");
        assert_eq!(seen.last(), Some(&row.state.as_str()), "{row:?}");
        let plain = allowed.get_run(&row.id).await;
        assert_eq!(plain.json()["status"], row.state.as_str(), "{row:?}");
    }
    assert_eq!(&states[3..], ["COMPLETED", "FAILED", "error"], "{watched:#?}");
    let missing = &watched.runs[5];
    assert!(
        missing.details.contains("404") && missing.details.contains("NOT_FOUND"),
        "{missing:?}"
    );
    assert!(watched.runs.iter().all(|row| row.ended), "{watched:#?}");
    assert_eq!(
        watched.streams,
        ids.len(),
        "one EventSource per run: {watched:#?}"
    );
    assert_eq!(
        watched.streams_not_closed, 0,
        "none left to reconnect: {watched:#?}"
    );

    // Without CORS for its origin the page shows nothing from the gateway, although the
    // gateway did answer (200s): the browser withheld them.
    assert_eq!(withheld.ids(), blocked_ids, "{withheld:#?}");
    assert_eq!(withheld.streams_not_closed, 0, "{withheld:#?}");
    for row in &withheld.runs {
        assert_eq!(row.seen, "error", "no run state got through: {row:?}");
        assert!(row.details.contains("cors_allowed_origins"), "{row:?}");
    }
    let ok = requests_answered(&blocked, Some("200")).await;
    assert!(ok >= blocked_ids.len() as f64, "{ok} answered 200");
}

/// The real binary in demo mode: the page it logs is served by the demo upstream, points at the
/// gateway, and that gateway allows its origin.
#[tokio::test(flavor = "multi_thread")]
async fn demo_mode_serves_the_page_it_logs_and_allows_its_origin() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n",
    )
    .expect("write config");
    let gateway = GatewayProcess::start(&["--demo", "--config", config.to_str().expect("utf-8 path")], &[]);
    let logs = gateway.logs();
    let logged = regex::Regex::new(r#"example page: (http://[^\s"]+)"#)
        .expect("regex")
        .captures(&logs)
        .unwrap_or_else(|| panic!("no example page URL logged:\n{logs}"))[1]
        .to_owned();
    assert!(
        logged.ends_with(&format!("/?gateway=http://{}", gateway.public)),
        "{logged} names the gateway at {}",
        gateway.public
    );
    let ids = ["done-1", "failed-2", "missing-3"];
    let page = format!("{logged}&runs={}", ids.join(","));
    let watched = tokio::task::spawn_blocking(move || Chromium::start().watch_until_all_ended(&page))
        .await
        .expect("the browser thread");
    assert_eq!(watched.ids(), ids, "{watched:#?}");
    let states: Vec<&str> = watched.runs.iter().map(|row| row.state.as_str()).collect();
    assert_eq!(states, ["COMPLETED", "FAILED", "error"], "{watched:#?}");
    assert_eq!(watched.streams_not_closed, 0, "{watched:#?}");
}

/// A gateway in front of the demo upstream, with these CORS origins and quick watchers.
async fn gateway_for(
    upstream: &DemoUpstream,
    origins: Vec<String>,
    adjust: impl FnOnce(&mut WatchConfig),
) -> TestGateway {
    let mut config = test_config(&format!("http://{}", upstream.addr));
    config.server.cors_allowed_origins = origins;
    config.watch.poll_interval = Duration::from_millis(50);
    config.watch.max_poll_interval = Duration::from_millis(200);
    adjust(&mut config.watch);
    let key = ApiKey::new(DEMO_API_KEY).expect("the demo key");
    TestGateway::start_with_secrets(config, Secrets::key_only(key)).await
}

/// Requests the gateway has answered (with this status code).
async fn requests_answered(gateway: &TestGateway, code: Option<&str>) -> f64 {
    let scrape = gateway.scrape().await;
    scrape
        .series("plextera_gateway_requests_total")
        .iter()
        .filter(|sample| code.is_none_or(|code| sample.labels.get("code").map(String::as_str) == Some(code)))
        .map(|sample| sample.value)
        .sum()
}

/// What the page shows, read from its `data-*` attributes.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PageState {
    href: String,
    all_ended: bool,
    /// `EventSource`s the page opened...
    streams: usize,
    /// ...and of them, those it has not closed (or the browser given up on).
    streams_not_closed: usize,
    runs: Vec<RunRow>,
}

#[derive(Debug, Deserialize)]
struct RunRow {
    id: String,
    state: String,
    /// The states shown, in order, space-separated.
    seen: String,
    ended: bool,
    details: String,
}

impl PageState {
    fn ids(&self) -> Vec<&str> {
        self.runs.iter().map(|row| row.id.as_str()).collect()
    }
}

/// Runs before the page's own script: keeps every `EventSource` the page opens, so the test can
/// see whether the page closed them (a stream the server ended but the page did not close is
/// CONNECTING again: the browser would reconnect).
const TRACK_EVENT_SOURCES: &str = r#"
window.eventSourcesOpened = [];
window.EventSource = class extends EventSource {
  constructor(...args) {
    super(...args);
    window.eventSourcesOpened.push(this);
  }
};
"#;

const READ_PAGE_STATE: &str = r#"(() => ({
  href: location.href,
  allEnded: document.body !== null && document.body.dataset.allEnded === "true",
  streams: (window.eventSourcesOpened || []).length,
  streamsNotClosed: (window.eventSourcesOpened || []).filter((source) => source.readyState !== 2).length,
  runs: [...document.querySelectorAll("tr[data-run]")].map((row) => ({
    id: row.dataset.run,
    state: row.dataset.state,
    seen: row.dataset.seen || "",
    ended: row.dataset.ended === "true",
    details: row.cells[3] ? row.cells[3].textContent : "",
  })),
}))()"#;

/// Headless chromium, driven over the DevTools protocol on a pipe.
struct Chromium {
    child: Child,
    commands: ChildStdin,
    /// Every message chromium sends, parsed; closed when chromium closes its end.
    messages: Receiver<Value>,
    /// What chromium printed (stderr), for failure messages.
    output: Arc<Mutex<String>>,
    /// Exceptions and console messages from pages, for failure messages.
    page_log: Vec<String>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Chromium {
    fn start() -> Self {
        let program = find_chromium();
        let profile = tempfile::tempdir().expect("a temporary profile");
        // The shell gives chromium our pipes as its fds 3 (commands) and 4 (answers), which
        // `--remote-debugging-pipe` uses; its own output all goes to stderr.
        let mut child = Command::new("sh")
            .args(["-c", r#"exec "$@" 3<&0 4>&1 0</dev/null 1>&2"#, "sh"])
            .arg(&program)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--mute-audio",
                "--remote-debugging-pipe",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {program}: {error}"));
        let commands = child.stdin.take().expect("stdin piped");
        let answers = child.stdout.take().expect("stdout piped");
        let stderr = child.stderr.take().expect("stderr piped");
        let (sender, messages) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut answers = BufReader::new(answers);
            let mut message = Vec::new();
            while answers.read_until(0, &mut message).is_ok_and(|read| read > 0) {
                if message.last() == Some(&0) {
                    message.pop();
                }
                let parsed = serde_json::from_slice(&message).expect("DevTools messages are JSON");
                if sender.send(parsed).is_err() {
                    break;
                }
                message.clear();
            }
        });
        let output = Arc::new(Mutex::new(String::new()));
        let collected = Arc::clone(&output);
        std::thread::spawn(move || {
            let mut stderr = stderr;
            let mut chunk = [0; 4096];
            while let Ok(read) = stderr.read(&mut chunk) {
                if read == 0 {
                    break;
                }
                collected
                    .lock()
                    .expect("output lock")
                    .push_str(&String::from_utf8_lossy(&chunk[..read]));
            }
        });
        Self {
            child,
            commands,
            messages,
            output,
            page_log: Vec::new(),
            next_id: 0,
            _profile: profile,
        }
    }

    /// Opens `url` in a new tab and reads its state until every run on it has ended.
    fn watch_until_all_ended(&mut self, url: &str) -> PageState {
        let target = self.call(None, "Target.createTarget", json!({ "url": "about:blank" }));
        let target_id = target["targetId"].as_str().expect("a target id").to_owned();
        let attached = self.call(
            None,
            "Target.attachToTarget",
            json!({ "targetId": target_id, "flatten": true }),
        );
        let session = attached["sessionId"].as_str().expect("a session id").to_owned();
        let page = Some(session.as_str());
        self.call(page, "Page.enable", json!({}));
        self.call(
            page,
            "Page.addScriptToEvaluateOnNewDocument",
            json!({ "source": TRACK_EVENT_SOURCES }),
        );
        self.call(page, "Runtime.enable", json!({}));
        self.call(page, "Page.navigate", json!({ "url": url }));
        let deadline = Instant::now() + PAGE_DEADLINE;
        loop {
            let state: PageState =
                serde_json::from_value(self.evaluate(&session, READ_PAGE_STATE)).expect("the page state");
            if state.href == url && state.all_ended {
                self.call(None, "Target.closeTarget", json!({ "targetId": target_id }));
                return state;
            }
            if Instant::now() >= deadline {
                let dom = self.evaluate(
                    &session,
                    "document.body ? document.body.outerHTML : \"(no body)\"",
                );
                panic!(
                    "not every run on {url} ended within {PAGE_DEADLINE:?}: {state:#?}\nbody:\n{}\npage log:\n{}\nchromium:\n{}",
                    dom.as_str().unwrap_or_default(),
                    self.page_log.join("\n"),
                    self.output.lock().expect("output lock")
                );
            }
            std::thread::sleep(POLL_EVERY);
        }
    }

    /// The value of a JavaScript expression in the page.
    fn evaluate(&mut self, session: &str, expression: &str) -> Value {
        let result = self.call(
            Some(session),
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true }),
        );
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("{expression} threw: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Sends a command (to a page when `session` is given, else to the browser) and returns its
    /// result, noting the page events that arrive meanwhile.
    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut command = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            command["sessionId"] = json!(session);
        }
        let mut bytes = serde_json::to_vec(&command).expect("a command");
        bytes.push(0);
        if let Err(error) = self
            .commands
            .write_all(&bytes)
            .and_then(|()| self.commands.flush())
        {
            self.fail(&format!("cannot send {method}: {error}"));
        }
        let deadline = Instant::now() + COMMAND_DEADLINE;
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            let message = match self.messages.recv_timeout(wait) {
                Ok(message) => message,
                Err(RecvTimeoutError::Timeout) => self.fail(&format!("no answer to {method}")),
                Err(RecvTimeoutError::Disconnected) => self.fail(&format!("chromium exited during {method}")),
            };
            if message["id"] == id {
                if let Some(error) = message.get("error") {
                    self.fail(&format!("{method} failed: {error}"));
                }
                return message["result"].clone();
            }
            match message["method"].as_str() {
                Some("Runtime.exceptionThrown") => self
                    .page_log
                    .push(format!("exception: {}", message["params"]["exceptionDetails"])),
                Some("Runtime.consoleAPICalled") => self
                    .page_log
                    .push(format!("console: {}", message["params"]["args"])),
                _ => {}
            }
        }
    }

    fn fail(&self, problem: &str) -> ! {
        panic!(
            "chromium: {problem}\noutput:\n{}",
            self.output.lock().expect("output lock")
        )
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // Closing the browser cleanly ends its child processes too; kill it if it does not.
        let _ = self
            .commands
            .write_all(b"{\"id\":0,\"method\":\"Browser.close\"}\0");
        let _ = self.commands.flush();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Debian's `chromium` (or `chromium-browser` elsewhere) on the PATH; `CHROMIUM` overrides.
fn find_chromium() -> String {
    if let Ok(program) = std::env::var("CHROMIUM") {
        return program;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["chromium", "chromium-browser"] {
        if std::env::split_paths(&path).any(|dir| dir.join(name).is_file()) {
            return name.to_owned();
        }
    }
    panic!(
        "tests/browser.rs needs a headless browser: install Debian's chromium (apt-get install chromium; .ci/run does) or set CHROMIUM"
    );
}

//! The upstream budget: a rate, a concurrency bound, and upstream's own 429s.

mod support;

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use http::{Method, StatusCode};
use support::{
    Gate, MockUpstream, PATIENCE, Reply, TestClient, TestGateway, eventually, run_body, runs_path,
    test_config,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

fn get_all(gateway: &TestGateway, ids: &[String]) -> Vec<tokio::task::JoinHandle<support::TestResponse>> {
    ids.iter()
        .map(|id| {
            let url = gateway.url(&runs_path(id));
            tokio::spawn(async move { TestClient::new().send(Method::GET, &url, &[]).await })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_budget_holds_under_a_burst() {
    const RATE: usize = 20;
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| {
        config.upstream.max_requests_per_second = Some(RATE as f64);
        config.upstream.queue_timeout = Duration::from_secs(30);
    })
    .await;
    let ids: Vec<String> = (0..2 * RATE).map(|index| format!("run_{index}")).collect();
    for id in &ids {
        mock.set(id, Reply::run(id, "PROCESSING"));
    }
    for client in get_all(&gateway, &ids) {
        assert_eq!(
            client.await.expect("client").status,
            StatusCode::OK,
            "queued, not refused"
        );
    }
    let mut arrivals: Vec<_> = mock.requests().iter().map(|request| request.at).collect();
    arrivals.sort();
    assert_eq!(arrivals.len(), 2 * RATE);
    // No one-second window holds more than RATE calls (plus the one on its edge).
    for window in arrivals.windows(RATE + 2) {
        let span = window[RATE + 1] - window[0];
        assert!(
            span >= Duration::from_secs(1),
            "{} calls within {span:?}",
            RATE + 2
        );
    }
}

#[tokio::test]
async fn a_spent_budget_answers_429_without_calling_upstream() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| {
        config.upstream.max_requests_per_second = Some(1.0);
        config.upstream.queue_timeout = Duration::from_millis(50);
    })
    .await;
    mock.set("first", Reply::run("first", "PROCESSING"));
    mock.set("second", Reply::run("second", "PROCESSING"));
    assert_eq!(gateway.get_run("first").await.status, StatusCode::OK);
    let refused = gateway.get_run("second").await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.error_code(), "GATEWAY_RATE_LIMITED");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(refused.json()["error"]["retryable"], true);
    assert_eq!(refused.header("cache-control"), Some("no-store"));
    assert_eq!(mock.count_for("second"), 0, "refused before upstream");
    let scrape = gateway.scrape().await;
    assert_eq!(
        scrape.expect(
            "plextera_gateway_upstream_budget_refusals_total",
            &[("reason", "exhausted")]
        ),
        1.0
    );
}

#[tokio::test]
async fn hits_and_coalesced_waiters_spend_no_budget() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| {
        config.upstream.max_requests_per_second = Some(0.01);
        config.upstream.queue_timeout = Duration::from_millis(50);
    })
    .await;
    let gate = Gate::new();
    mock.set("done", Reply::run("done", "COMPLETED").gated(&gate));
    let clients = get_all(&gateway, &vec!["done".to_owned(); 10]);
    mock.wait_for_requests(1).await;
    gateway.wait_for_waiters(9).await;
    gate.open();
    for client in clients {
        assert_eq!(client.await.expect("client").status, StatusCode::OK);
    }
    for _ in 0..50 {
        assert_eq!(gateway.get_run("done").await.x_cache(), Some("HIT"));
    }
    // The one token went to the one upstream call; anything else is refused.
    assert_eq!(
        gateway.get_run("other").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrency_bound_keeps_extra_calls_from_upstream() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| {
        config.upstream.max_concurrent_requests = NonZeroUsize::new(2);
        config.upstream.queue_timeout = Duration::from_millis(200);
    })
    .await;
    let gate = Gate::new();
    let ids: Vec<String> = (0..5).map(|index| format!("slow_{index}")).collect();
    for id in &ids {
        mock.set(id, Reply::run(id, "PROCESSING").gated(&gate));
    }
    let clients = get_all(&gateway, &ids);
    mock.wait_for_requests(2).await;
    // Three calls wait for a slot, then give up, while upstream still holds the first two.
    eventually("three requests are refused", || async {
        gateway.scrape().await.expect(
            "plextera_gateway_upstream_budget_refusals_total",
            &[("reason", "exhausted")],
        ) == 3.0
    })
    .await;
    assert_eq!(mock.request_count(), 2, "never more than two calls in flight");
    gate.open();
    let (mut served, mut refused) = (0, 0);
    for client in clients {
        match client.await.expect("client").status {
            StatusCode::OK => served += 1,
            StatusCode::TOO_MANY_REQUESTS => refused += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((served, refused), (2, 3));
}

#[tokio::test]
async fn an_upstream_429_holds_every_upstream_call_while_hits_continue() {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    mock.set("done", Reply::run("done", "COMPLETED"));
    assert_eq!(gateway.get_run("done").await.x_cache(), Some("MISS"));
    mock.set(
        "busy",
        Reply::status(
            StatusCode::TOO_MANY_REQUESTS,
            r#"{"error":{"code":"RATE_LIMITED"}}"#,
        )
        .with_header("retry-after", "1"),
    );
    mock.set("other", Reply::run("other", "PROCESSING"));

    let busy = gateway.get_run("busy").await;
    assert_eq!(busy.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(busy.header("retry-after"), Some("1"));

    let held = gateway.get_run("other").await;
    assert_eq!(held.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(held.error_code(), "UPSTREAM_RATE_LIMITED");
    assert_eq!(held.header("retry-after"), Some("1"));
    assert_eq!(mock.count_for("other"), 0, "held, not sent");
    assert_eq!(
        gateway.get_run("done").await.x_cache(),
        Some("HIT"),
        "hits are still served"
    );

    let scrape = gateway.scrape().await;
    let cooldown = scrape.expect("plextera_gateway_upstream_cooldown_seconds", &[]);
    assert!(cooldown > 0.0 && cooldown <= 1.0, "cooldown gauge {cooldown}");
    assert_eq!(
        scrape.expect(
            "plextera_gateway_upstream_budget_refusals_total",
            &[("reason", "cooldown")]
        ),
        1.0
    );

    eventually("upstream calls resume after Retry-After", || async {
        gateway.get_run("other").await.status == StatusCode::OK
    })
    .await;
    assert_eq!(mock.count_for("other"), 1, "no call went out during the cooldown");
    assert_eq!(mock.count_for("busy"), 1);
    assert_eq!(
        gateway
            .scrape()
            .await
            .expect("plextera_gateway_upstream_cooldown_seconds", &[]),
        0.0
    );
}

// ---------------------------------------------------------------------------------------------
// A resend rides on its first admission
// ---------------------------------------------------------------------------------------------

/// An HTTP/1.1 upstream on a raw socket that answers every run as PROCESSING and keeps its
/// connections alive. Once armed with [`CuttingUpstream::cut_next`], the next request to arrive on
/// a connection that has already been answered is read and then met by a close, unanswered: the
/// close crosses the request on the wire, as when the upstream's idle timeout fires just as the
/// gateway reuses the connection. The gateway then sends the GET once more on a fresh connection.
///
/// While held, that close waits for [`CuttingUpstream::release_cut`], and the answer to any run
/// whose id starts with `held` waits for [`CuttingUpstream::release_held`].
struct CuttingUpstream {
    addr: std::net::SocketAddr,
    state: Arc<CuttingState>,
    task: tokio::task::JoinHandle<()>,
}

struct CuttingState {
    accepted: AtomicUsize,
    /// Requests read so far, answered or not.
    requests: watch::Sender<usize>,
    answered: AtomicUsize,
    cut_next: AtomicBool,
    cut: AtomicUsize,
    cut_released: watch::Sender<bool>,
    held_released: watch::Sender<bool>,
}

impl CuttingUpstream {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(CuttingState {
            accepted: AtomicUsize::new(0),
            requests: watch::channel(0).0,
            answered: AtomicUsize::new(0),
            cut_next: AtomicBool::new(false),
            cut: AtomicUsize::new(0),
            cut_released: watch::channel(true).0,
            held_released: watch::channel(true).0,
        });
        let serving = Arc::clone(&state);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                serving.accepted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve_cutting(stream, Arc::clone(&serving)));
            }
        });
        Self { addr, state, task }
    }

    fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Arms the cut for the next request that arrives on a kept-alive connection.
    fn cut_next(&self) {
        self.state.cut_next.store(true, Ordering::SeqCst);
    }

    /// Holds back the cut and the answers to `held` runs until released.
    fn hold(&self) {
        self.state.cut_released.send_replace(false);
        self.state.held_released.send_replace(false);
    }

    fn release_cut(&self) {
        self.state.cut_released.send_replace(true);
    }

    fn release_held(&self) {
        self.state.held_released.send_replace(true);
    }

    /// Resolves once `count` requests have been read.
    async fn wait_for_requests(&self, count: usize) {
        let mut requests = self.state.requests.subscribe();
        tokio::time::timeout(PATIENCE, requests.wait_for(|read| *read >= count))
            .await
            .expect("requests did not reach the upstream in time")
            .expect("the upstream is still running");
    }

    fn requests(&self) -> usize {
        *self.state.requests.borrow()
    }

    fn accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }

    fn answered(&self) -> usize {
        self.state.answered.load(Ordering::SeqCst)
    }

    /// Requests met by a close instead of an answer.
    fn cut(&self) -> usize {
        self.state.cut.load(Ordering::SeqCst)
    }
}

impl Drop for CuttingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_cutting(mut stream: TcpStream, state: Arc<CuttingState>) {
    let mut buffer = Vec::new();
    let mut answered_here = 0_usize;
    loop {
        let head_end = loop {
            if let Some(start) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
                break start + 4;
            }
            let mut chunk = [0_u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(read) => buffer.extend_from_slice(&chunk[..read]),
            }
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
        buffer.drain(..head_end);
        state.requests.send_modify(|read| *read += 1);
        let id = head
            .split_whitespace()
            .nth(1)
            .and_then(|path| path.rsplit('/').next())
            .unwrap_or("unknown")
            .to_owned();
        let cut = answered_here > 0 && state.cut_next.swap(false, Ordering::SeqCst);
        let gate = if cut {
            Some(&state.cut_released)
        } else if id.starts_with("held") {
            Some(&state.held_released)
        } else {
            None
        };
        if let Some(gate) = gate {
            let _ = gate.subscribe().wait_for(|released| *released).await;
        }
        if cut {
            // The request was read whole, so the close is a FIN, not a reset.
            state.cut.fetch_add(1, Ordering::SeqCst);
            return;
        }
        let body = run_body(&id, "PROCESSING", 0);
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        if stream.write_all(answer.as_bytes()).await.is_err() || stream.write_all(&body).await.is_err() {
            return;
        }
        answered_here += 1;
        state.answered.fetch_add(1, Ordering::SeqCst);
    }
}

/// A gateway in front of `upstream` with its budget set by `adjust`.
async fn gateway_before(
    upstream: &CuttingUpstream,
    adjust: impl FnOnce(&mut plextera_gateway::Config),
) -> TestGateway {
    let mut config = test_config(&upstream.base_url());
    adjust(&mut config);
    TestGateway::start_with(config).await
}

/// Checks that `response`, for `id`, was answered after its call was cut and sent once more on
/// one fresh connection (`accepted_before`: connections the upstream had accepted before), and
/// that the budget refused nothing.
async fn assert_answered_after_one_resend(
    gateway: &TestGateway,
    upstream: &CuttingUpstream,
    response: &support::TestResponse,
    id: &str,
    accepted_before: usize,
) {
    assert_eq!(
        response.status,
        StatusCode::OK,
        "the resent call was not answered: {:?}",
        String::from_utf8_lossy(&response.body)
    );
    assert_eq!(response.json()["id"], id);
    // The premise: the call went out on the kept-alive connection, was cut, and was sent once
    // more on a fresh connection.
    assert_eq!(upstream.cut(), 1, "the call met the cut");
    assert!(
        upstream.accepted() > accepted_before,
        "a fresh connection for the resend"
    );
    let scrape = gateway.scrape().await;
    assert_eq!(
        scrape.expect("plextera_gateway_upstream_retries_total", &[]),
        1.0,
        "sent once more"
    );
    assert_eq!(
        scrape.expect(
            "plextera_gateway_upstream_budget_refusals_total",
            &[("reason", "exhausted")]
        ),
        0.0,
        "the budget refused nothing"
    );
}

#[tokio::test]
async fn a_call_resent_after_its_kept_alive_connection_closed_spends_no_second_token() {
    // One token per 500 ms, and a call waits at most 100 ms for one: a second token for the
    // resend, asked for just after the first was spent, would be refused.
    const PERIOD: Duration = Duration::from_millis(500);
    let upstream = CuttingUpstream::start().await;
    let gateway = gateway_before(&upstream, |config| {
        config.upstream.max_requests_per_second = Some(2.0);
        config.upstream.queue_timeout = Duration::from_millis(100);
    })
    .await;
    // Spends the one token and leaves a kept-alive connection in the pool.
    assert_eq!(gateway.get_run("warm_up").await.status, StatusCode::OK);
    // The token comes back one period later. No event says so: the configured rate is what is
    // waited out.
    tokio::time::sleep(PERIOD + Duration::from_millis(100)).await;
    let accepted_before = upstream.accepted();
    upstream.cut_next();
    let response = gateway.get_run("cut").await;
    assert_answered_after_one_resend(&gateway, &upstream, &response, "cut", accepted_before).await;
    assert_eq!(upstream.answered(), 2, "warm_up, then cut (on its resend)");
}

/// Single-threaded on purpose: the queued call's task, spawned before its second request parks on
/// it, has run up to the budget's queue by the time a scrape shows that request parked.
#[tokio::test]
async fn a_call_resent_after_its_kept_alive_connection_closed_keeps_its_concurrency_slot() {
    // One call in flight at a time. Were the resend to ask for a slot again, it would either wait
    // for the one its own call holds, or (had the call let it go) find it taken by the call queued
    // behind it, which upstream holds past the queue_timeout: refused either way.
    let upstream = CuttingUpstream::start().await;
    let gateway = gateway_before(&upstream, |config| {
        config.upstream.max_concurrent_requests = NonZeroUsize::new(1);
        config.upstream.queue_timeout = Duration::from_secs(1);
    })
    .await;
    assert_eq!(gateway.get_run("warm_up").await.status, StatusCode::OK);
    let accepted_before = upstream.accepted();
    upstream.hold();
    upstream.cut_next();
    let cut = get_all(&gateway, &["cut".to_owned()]);
    upstream.wait_for_requests(2).await;
    // "cut" is on the wire, its close held back. Two requests for "held_next": the second parks
    // on the first's call, which shows that call has started and is queued for the slot.
    let next = get_all(&gateway, &vec!["held_next".to_owned(); 2]);
    gateway.wait_for_waiters(1).await;
    assert_eq!(upstream.requests(), 2, "held_next waits for the one slot");

    // The close goes out; "cut" is sent once more and answered; only then does "held_next" get
    // the slot (and upstream holds its answer until the cut's client has its own).
    upstream.release_cut();
    let response = cut.into_iter().next().expect("one client").await.expect("client");
    assert_answered_after_one_resend(&gateway, &upstream, &response, "cut", accepted_before).await;
    upstream.release_held();
    for client in next {
        assert_eq!(client.await.expect("client").status, StatusCode::OK);
    }
    assert_eq!(upstream.answered(), 3, "warm_up, cut, held_next");
}

// ---------------------------------------------------------------------------------------------
// Waiting in the queue, and refusing at once
// ---------------------------------------------------------------------------------------------

/// Single-threaded on purpose: the queued call's task, spawned before its second request parks on
/// it, has run up to the budget's queue by the time a scrape shows that request parked.
#[tokio::test]
async fn a_call_queued_for_a_concurrency_slot_goes_upstream_as_soon_as_one_frees() {
    const QUEUE_TIMEOUT: Duration = Duration::from_secs(5);
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| {
        config.upstream.max_concurrent_requests = NonZeroUsize::new(1);
        config.upstream.queue_timeout = QUEUE_TIMEOUT;
    })
    .await;
    let gate = Gate::new();
    mock.set("slow", Reply::run("slow", "PROCESSING").gated(&gate));
    mock.set("queued", Reply::run("queued", "PROCESSING"));
    let slow = get_all(&gateway, &["slow".to_owned()]);
    mock.wait_for_requests(1).await;
    // "slow" holds the only slot. Two requests for "queued": the second parks on the first's
    // call, which is how the test knows that call has started (and is queued for the slot).
    let queued = get_all(&gateway, &vec!["queued".to_owned(); 2]);
    gateway.wait_for_waiters(1).await;
    assert_eq!(mock.count_for("queued"), 0, "held back while the slot is taken");
    assert!(
        queued.iter().all(|client| !client.is_finished()),
        "still queued, not refused"
    );

    let opened = std::time::Instant::now();
    gate.open();
    for client in queued {
        let response = client.await.expect("client");
        assert_eq!(
            response.status,
            StatusCode::OK,
            "{:?}",
            String::from_utf8_lossy(&response.body)
        );
        assert_eq!(response.json()["id"], "queued");
    }
    let waited = opened.elapsed();
    assert!(
        waited < QUEUE_TIMEOUT / 2,
        "the queued call took {waited:?} after the slot freed: it should go at once, not near the {QUEUE_TIMEOUT:?} queue_timeout"
    );
    for client in slow {
        assert_eq!(client.await.expect("client").status, StatusCode::OK);
    }
    assert_eq!(mock.count_for("queued"), 1);
    assert_eq!(
        gateway.scrape().await.expect(
            "plextera_gateway_upstream_budget_refusals_total",
            &[("reason", "exhausted")]
        ),
        0.0
    );
}

#[tokio::test]
async fn a_call_whose_wait_would_outlast_the_queue_timeout_is_refused_at_once() {
    // One token per 5 s; a call may wait 2 s. After the first call, the next token is ~5 s away:
    // longer than the call may wait, so it is refused without waiting the 2 s, let alone the 5 s.
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |config| {
        config.upstream.max_requests_per_second = Some(0.2);
        config.upstream.queue_timeout = Duration::from_secs(2);
    })
    .await;
    mock.set("first", Reply::run("first", "PROCESSING"));
    mock.set("second", Reply::run("second", "PROCESSING"));
    assert_eq!(gateway.get_run("first").await.status, StatusCode::OK);

    let asked = std::time::Instant::now();
    let refused = gateway.get_run("second").await;
    let took = asked.elapsed();
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.error_code(), "GATEWAY_RATE_LIMITED");
    assert_eq!(refused.json()["error"]["retryable"], true);
    assert!(
        took < Duration::from_secs(1),
        "refused after {took:?}: not at once (queue_timeout 2 s, next token ~5 s away)"
    );
    let retry_after: u64 = refused
        .header("retry-after")
        .expect("a Retry-After")
        .parse()
        .expect("delta-seconds");
    assert!(
        (4..=5).contains(&retry_after),
        "Retry-After {retry_after}: the time until the next token, rounded up"
    );
    assert_eq!(mock.request_count(), 1, "upstream got only the first call");
}

// ---------------------------------------------------------------------------------------------
// How long an upstream 429 pauses upstream calls
// ---------------------------------------------------------------------------------------------

/// A gateway whose upstream has just answered 429 for "busy", with `retry_after` if given. Returns
/// the gateway, the mock (whose "other" run is answerable) and what the client of "busy" got.
async fn after_an_upstream_429(
    retry_after: Option<&str>,
) -> (TestGateway, MockUpstream, support::TestResponse) {
    let mock = MockUpstream::start().await;
    let gateway = TestGateway::start(&mock, |_| {}).await;
    let busy = Reply::status(
        StatusCode::TOO_MANY_REQUESTS,
        r#"{"error":{"code":"RATE_LIMITED"}}"#,
    );
    mock.set(
        "busy",
        match retry_after {
            Some(value) => busy.with_header("retry-after", value),
            None => busy,
        },
    );
    mock.set("other", Reply::run("other", "PROCESSING"));
    let answer = gateway.get_run("busy").await;
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(answer.x_cache(), Some("PASS"), "upstream's own 429, forwarded");
    (gateway, mock, answer)
}

/// Asks for "other" during the pause: held by the gateway, not sent. Returns its `Retry-After`.
async fn held_during_the_cooldown(gateway: &TestGateway, mock: &MockUpstream) -> u64 {
    let held = gateway.get_run("other").await;
    assert_eq!(
        held.status,
        StatusCode::TOO_MANY_REQUESTS,
        "a call during the pause: {:?}",
        String::from_utf8_lossy(&held.body)
    );
    assert_eq!(held.error_code(), "UPSTREAM_RATE_LIMITED");
    assert_eq!(held.json()["error"]["retryable"], true);
    assert_eq!(mock.count_for("other"), 0, "held, not sent upstream");
    held.header("retry-after")
        .expect("the time left, as Retry-After")
        .parse()
        .expect("delta-seconds")
}

async fn cooldown_gauge(gateway: &TestGateway) -> f64 {
    gateway
        .scrape()
        .await
        .expect("plextera_gateway_upstream_cooldown_seconds", &[])
}

#[tokio::test]
async fn an_upstream_429_without_a_usable_retry_after_pauses_upstream_calls_for_one_second() {
    for retry_after in [None, Some("soon"), Some("")] {
        let (gateway, mock, _) = after_an_upstream_429(retry_after).await;
        assert_eq!(
            held_during_the_cooldown(&gateway, &mock).await,
            1,
            "Retry-After {retry_after:?}"
        );
        let cooldown = cooldown_gauge(&gateway).await;
        assert!(
            cooldown > 0.5 && cooldown <= 1.0,
            "Retry-After {retry_after:?}: cooldown gauge {cooldown}, expected the 1 s default"
        );
    }
}

#[tokio::test]
async fn an_upstream_429_with_an_http_date_pauses_upstream_calls_until_that_date() {
    // HTTP dates have whole seconds: this one is between 2 and 3 s ahead.
    let date = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(3));
    let (gateway, mock, answer) = after_an_upstream_429(Some(&date)).await;
    assert_eq!(
        answer.header("retry-after"),
        Some(date.as_str()),
        "forwarded as sent"
    );
    let cooldown = cooldown_gauge(&gateway).await;
    assert!(
        cooldown > 1.0 && cooldown <= 3.0,
        "cooldown gauge {cooldown} for a date ~3 s ahead (1 s would be the default for an unread date)"
    );
    let left = held_during_the_cooldown(&gateway, &mock).await;
    assert!((2..=3).contains(&left), "Retry-After {left} on a held call");
}

#[tokio::test]
async fn an_upstream_429_pause_is_capped_at_one_hour() {
    let (gateway, mock, answer) = after_an_upstream_429(Some("86400")).await;
    assert_eq!(answer.header("retry-after"), Some("86400"), "forwarded as sent");
    let cooldown = cooldown_gauge(&gateway).await;
    assert!(
        cooldown > 3500.0 && cooldown <= 3600.0,
        "cooldown gauge {cooldown}: Retry-After 86400 is held for at most an hour"
    );
    assert_eq!(held_during_the_cooldown(&gateway, &mock).await, 3600);
}

//! The webhook listener (`[webhook]`): Plextera's signed run events, on a port of their own.
//!
//! A verified run event answers every client held on its run (long-polls and streams) at once,
//! with one confirming upstream call, and primes the cache when nobody waits; an event for a run
//! upstream still shows going makes its watcher poll at `watch.poll_interval` until it ends.
//! Refused without acting: signatures that are forged, over another body, missing, empty, short
//! or oversized; timestamps outside the tolerance; replayed event ids; bodies and heads over their
//! bounds; bodies that are not events; other methods and paths; a flood of forged events while
//! clients are held. Also: rotated secrets, event types not acted on, the metrics, the binary's
//! `sign-webhook`, and `--demo`, whose runs post their own events.
//!
//! Unless a test is about the watcher, watchers poll every 30 s or more, so only an event can
//! explain an answer.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, StatusCode};
use plextera_gateway::webhook::signature::{SIGNATURE_HEADER, sign};
use plextera_gateway::{ApiKey, Config, Secrets};
use secrecy::SecretString;
use support::push::{HELD, completed, is_strong, running};
use support::sse;
use support::{
    BodyClient, Gate, GatewayProcess, MockUpstream, PATIENCE, Reply, TEST_KEY, TestClient, TestGateway,
    TestResponse, eventually, prom, raw_exchange, runs_path, test_config,
};
use tokio::task::JoinHandle;

/// The signing secret the gateway is given, unless a test names others.
const SECRET: &str = "whsec_test_current";
/// `webhook.path`'s default.
const PATH: &str = "/webhooks/plextera";
const EVENTS: &str = "plextera_gateway_webhook_events_total";
const CONFIRMATIONS: &str = "plextera_gateway_webhook_confirmations_total";
const COMPLETED: &str = "workflow.run.completed";
const FAILED: &str = "workflow.run.failed";
/// Every `outcome` of `webhook_events_total`.
const OUTCOMES: [&str; 8] = [
    "accepted",
    "duplicate",
    "invalid_signature",
    "stale",
    "ignored",
    "too_large",
    "bad_request",
    "busy",
];
/// How soon after the event's `202` the clients held on its run are answered.
const PROMPT: Duration = Duration::from_millis(100);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Watchers that make no call during a test, events flowing or not.
fn slow_watch(config: &mut Config) {
    config.watch.poll_interval = Duration::from_secs(30);
    config.watch.max_poll_interval = Duration::from_secs(60);
    config.webhook.safety_poll_interval = Duration::from_secs(60);
}

/// A gateway in front of `mock` with the webhook listener on loopback, signing secrets `secrets`,
/// after `adjust` has changed the config.
async fn start(mock: &MockUpstream, secrets: &[&str], adjust: impl FnOnce(&mut Config)) -> TestGateway {
    let mut config = test_config(&mock.base_url());
    config.webhook.listen = Some("127.0.0.1:0".parse().expect("an address"));
    config.webhook.secrets_env = Some("PLEXTERA_WEBHOOK_SECRETS".to_owned());
    adjust(&mut config);
    let secrets = Secrets {
        webhook_secrets: Some(secrets.iter().map(|secret| SecretString::from(*secret)).collect()),
        ..Secrets::key_only(ApiKey::new(TEST_KEY).expect("the test key"))
    };
    TestGateway::start_with_secrets(config, secrets).await
}

/// A run event as Plextera sends it.
fn event(event_id: &str, event_type: &str, run_id: &str) -> Bytes {
    let status = if event_type == FAILED {
        "FAILED"
    } else {
        "COMPLETED"
    };
    Bytes::from(format!(
        r#"{{"eventId":"{event_id}","eventType":"{event_type}","occurredAt":"2026-01-01T00:00:00Z","apiVersion":"v1","data":{{"runId":"{run_id}","status":"{status}"}}}}"#
    ))
}

fn completed_event(event_id: &str, run_id: &str) -> Bytes {
    event(event_id, COMPLETED, run_id)
}

/// A `workflow.run.completed` event padded (with a field the gateway ignores) to exactly `len` bytes.
fn padded_event(event_id: &str, run_id: &str, len: usize) -> Bytes {
    let bare = completed_event(event_id, run_id);
    let open = std::str::from_utf8(&bare[..bare.len() - 1]).expect("utf-8");
    let padding = len
        .checked_sub(bare.len() + r#","pad":"""#.len())
        .expect("room for the padding");
    let body = format!(r#"{open},"pad":"{}"}}"#, "x".repeat(padding));
    assert_eq!(body.len(), len);
    Bytes::from(body)
}

/// `body`'s signature with `secret`, made now.
fn signed(secret: &str, body: &[u8]) -> String {
    sign(secret.as_bytes(), body, SystemTime::now())
}

/// `body`'s signature with `secret` as of `offset` seconds from now (negative: in the past).
fn signed_at(secret: &str, body: &[u8], offset: i64) -> String {
    let now = SystemTime::now();
    let at = if offset < 0 {
        now - Duration::from_secs(offset.unsigned_abs())
    } else {
        now + Duration::from_secs(offset.unsigned_abs())
    };
    sign(secret.as_bytes(), body, at)
}

/// `t=<t>,v1=<hex>`: HMAC-SHA256 with `secret` over `"<t>.<body>"`, computed here rather than by
/// the gateway's `sign`, and for any `t` written in digits.
fn independent_signature(secret: &[u8], t: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(body);
    let hex: String = ring::hmac::sign(&key, &signed)
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    format!("t={t},v1={hex}")
}

fn hook_url(gateway: &TestGateway, path: &str) -> String {
    let webhook = gateway.webhook.expect("the webhook listener is on");
    format!("http://{webhook}{path}")
}

/// Posts `body` to `url` as Plextera does: JSON, the event type in its (unsigned) header when the
/// body names one, and `signature` (none: no signature header).
async fn deliver_on(client: &BodyClient, url: &str, body: Bytes, signature: Option<&str>) -> TestResponse {
    let event_type = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|event| event["eventType"].as_str().map(str::to_owned));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(event_type) = &event_type {
        headers.push(("x-plextera-event-type", event_type.as_str()));
    }
    if let Some(signature) = signature {
        headers.push((SIGNATURE_HEADER, signature));
    }
    client.post(url, &headers, body).await
}

/// Posts `body` to the gateway's webhook path with `signature`.
async fn deliver(gateway: &TestGateway, body: Bytes, signature: Option<&str>) -> TestResponse {
    deliver_on(&BodyClient::new(), &hook_url(gateway, PATH), body, signature).await
}

/// Posts `body` signed with [`SECRET`] now.
async fn post_event(gateway: &TestGateway, body: Bytes) -> TestResponse {
    let signature = signed(SECRET, &body);
    deliver(gateway, body, Some(&signature)).await
}

/// Checks an acknowledgement: `status` with `{"status": "<outcome>"}`.
#[track_caller]
fn assert_acknowledged(response: &TestResponse, status: StatusCode, outcome: &str) {
    assert_eq!(
        response.status,
        status,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    assert_eq!(response.json(), serde_json::json!({ "status": outcome }));
}

/// Checks a refusal: `status` with a JSON error of `code`.
#[track_caller]
fn assert_refused(response: &TestResponse, status: StatusCode, code: &str, what: &str) {
    assert_eq!(
        response.status,
        status,
        "{what}: {}",
        String::from_utf8_lossy(&response.body)
    );
    assert_eq!(response.error_code(), code, "{what}");
}

/// `webhook_events_total` for one type and outcome.
async fn events(gateway: &TestGateway, event_type: &str, outcome: &str) -> f64 {
    gateway
        .scrape()
        .await
        .expect(EVENTS, &[("type", event_type), ("outcome", outcome)])
}

/// `webhook_events_total` for one outcome, whatever the type.
fn outcome_total(scrape: &prom::Scrape, outcome: &str) -> f64 {
    scrape
        .series(EVENTS)
        .iter()
        .filter(|sample| sample.labels.get("outcome").map(String::as_str) == Some(outcome))
        .map(|sample| sample.value)
        .sum()
}

async fn confirmations(gateway: &TestGateway, result: &str) -> f64 {
    gateway.scrape().await.sum(CONFIRMATIONS, &[("result", result)])
}

/// Confirming calls, whatever they found.
async fn all_confirmations(gateway: &TestGateway) -> f64 {
    gateway
        .scrape()
        .await
        .series(CONFIRMATIONS)
        .iter()
        .map(|sample| sample.value)
        .sum()
}

/// Waits until `count` confirming calls have found `result`.
async fn until_confirmed(gateway: &TestGateway, result: &str, count: usize) {
    eventually(&format!("{count} confirmations found {result}"), || async {
        confirmations(gateway, result).await == count as f64
    })
    .await;
}

/// Waits until exactly these numbers of long-polls and streams are held.
async fn until_held(gateway: &TestGateway, long_polls: usize, streams: usize) {
    eventually(
        &format!("{long_polls} long-polls and {streams} streams are held"),
        || async { held(gateway).await == (long_polls as f64, streams as f64) },
    )
    .await;
}

/// Long-polls and streams held now.
async fn held(gateway: &TestGateway) -> (f64, f64) {
    let scrape = gateway.scrape().await;
    (
        scrape.expect(HELD, &[("kind", "long_poll")]),
        scrape.expect(HELD, &[("kind", "sse")]),
    )
}

/// The run's current (weak) version, by a plain GET.
async fn version(gateway: &TestGateway, id: &str) -> String {
    let response = gateway.get_run(id).await;
    assert_eq!(response.status, StatusCode::OK);
    let etag = response.header("etag").expect("an ETag").to_owned();
    assert!(etag.starts_with("W/\""), "a run going has a weak version: {etag}");
    etag
}

/// A long-poll holding version `held` of run `id` for up to 30 s, in a task of its own; resolves
/// with the answer and when it arrived.
fn hold_long_poll(gateway: &TestGateway, id: &str, held: &str) -> JoinHandle<(TestResponse, Instant)> {
    let url = gateway.url(&format!("{}?wait=30", runs_path(id)));
    let held = held.to_owned();
    tokio::spawn(async move {
        let response = TestClient::new()
            .send(Method::GET, &url, &[("if-none-match", &held)])
            .await;
        (response, Instant::now())
    })
}

/// An event stream on run `id`, read past its `retry:` block and first `run` frame; the task
/// resolves with the next frame and when it arrived.
async fn hold_stream(gateway: &TestGateway, id: &str) -> JoinHandle<(sse::Event, Instant)> {
    let mut stream = sse::open(gateway.public, &runs_path(id), &[]).await;
    assert_eq!(stream.status, StatusCode::OK);
    assert!(stream.expect_event().await.retry.is_some(), "the retry block");
    assert_eq!(stream.expect_event().await.kind(), "run");
    tokio::spawn(async move {
        let frame = stream.expect_event().await;
        (frame, Instant::now())
    })
}

/// Awaits a client's task, failing after [`PATIENCE`].
async fn answered<T>(client: JoinHandle<T>) -> T {
    tokio::time::timeout(PATIENCE, client)
        .await
        .expect("the client was answered in time")
        .expect("the client task")
}

/// The status of a raw HTTP/1.1 response.
fn status_line(response: &str) -> &str {
    response.lines().next().unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Events that act
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_verified_event_answers_every_held_client_at_once_with_one_upstream_call() {
    let mock = MockUpstream::start().await;
    let gateway = start(&mock, &[SECRET], slow_watch).await;
    mock.set("run-1", Reply::ok(running("run-1", 40, 1000)));
    let going = version(&gateway, "run-1").await;
    let long_polls: Vec<_> = (0..3)
        .map(|_| hold_long_poll(&gateway, "run-1", &going))
        .collect();
    let stream = hold_stream(&gateway, "run-1").await;
    until_held(&gateway, 3, 1).await;
    // Upstream now shows the end; with watchers polling every 30 s, only the event can tell.
    let ended = completed("run-1");
    mock.set("run-1", Reply::ok(ended.clone()));
    let calls = mock.count_for("run-1");

    let response = post_event(&gateway, completed_event("evt_1", "run-1")).await;
    let accepted_at = Instant::now();
    assert_acknowledged(&response, StatusCode::ACCEPTED, "accepted");

    let mut ended_etag = None;
    for client in long_polls {
        let (answer, at) = answered(client).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.body, ended, "the ended run");
        let etag = answer.header("etag").expect("an ETag").to_owned();
        assert!(is_strong(&etag), "an ended run's version: {etag}");
        ended_etag = Some(etag);
        let after = at.saturating_duration_since(accepted_at);
        assert!(after <= PROMPT, "a long-poll answered {after:?} after the 202");
    }
    let (frame, at) = answered(stream).await;
    assert_eq!(frame.kind(), "end", "{frame:?}");
    assert_eq!(frame.data.as_deref().map(str::as_bytes), Some(&ended[..]));
    assert_eq!(Some(frame.id()), ended_etag.as_deref());
    let after = at.saturating_duration_since(accepted_at);
    assert!(
        after <= PROMPT,
        "the stream's end frame came {after:?} after the 202"
    );

    assert_eq!(mock.count_for("run-1"), calls + 1, "one confirming call");
    let confirming = mock.requests().pop().expect("the confirming call");
    assert_eq!(confirming.target, runs_path("run-1"));
    assert!(
        confirming
            .headers
            .get("x-request-id")
            .and_then(|id| id.to_str().ok())
            .is_some_and(|id| id.starts_with("webhook-")),
        "the call is the event's confirmation: {:?}",
        confirming.headers
    );
    until_confirmed(&gateway, "ended", 1).await;

    let hit = gateway.get_run("run-1").await;
    assert_eq!(hit.status, StatusCode::OK);
    assert_eq!(hit.x_cache(), Some("HIT"));
    assert_eq!(hit.body, ended);
    assert_eq!(
        mock.count_for("run-1"),
        calls + 1,
        "no call after the confirmation"
    );
    assert_eq!(held(&gateway).await, (0.0, 0.0));
}

#[tokio::test]
async fn an_event_nobody_waits_on_primes_the_cache_with_one_call() {
    let mock = MockUpstream::start().await;
    let gateway = start(&mock, &[SECRET], slow_watch).await;
    let ended = completed("run-9");
    mock.set("run-9", Reply::ok(ended.clone()));

    let response = post_event(&gateway, completed_event("evt_9", "run-9")).await;
    assert_acknowledged(&response, StatusCode::ACCEPTED, "accepted");
    until_confirmed(&gateway, "ended", 1).await;
    assert_eq!(mock.count_for("run-9"), 1);

    let first = gateway.get_run("run-9").await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.x_cache(), Some("HIT"), "the first GET after the event");
    assert_eq!(first.body, ended);
    assert_eq!(mock.count_for("run-9"), 1, "one upstream call in all");
}

#[tokio::test]
async fn an_event_for_a_run_remembered_as_404_asks_upstream_again() {
    let mock = MockUpstream::start().await;
    let gateway = start(&mock, &[SECRET], |config| {
        slow_watch(config);
        config.cache.not_found_ttl = Duration::from_secs(600);
    })
    .await;
    mock.set(
        "run-n",
        Reply::status(StatusCode::NOT_FOUND, r#"{"error":{"code":"NOT_FOUND"}}"#),
    );
    assert_eq!(gateway.get_run("run-n").await.status, StatusCode::NOT_FOUND);
    let remembered = gateway.get_run("run-n").await;
    assert_eq!(
        (remembered.status, remembered.x_cache()),
        (StatusCode::NOT_FOUND, Some("HIT")),
        "the 404 is remembered"
    );
    // Plextera's read path caught up: the run exists and ended, and its event says so.
    let ended = completed("run-n");
    mock.set("run-n", Reply::ok(ended.clone()));
    let response = post_event(&gateway, completed_event("evt_n", "run-n")).await;
    assert_acknowledged(&response, StatusCode::ACCEPTED, "accepted");
    until_confirmed(&gateway, "ended", 1).await;
    assert_eq!(
        mock.count_for("run-n"),
        2,
        "one call for the 404, one to confirm the event"
    );
    let after = gateway.get_run("run-n").await;
    assert_eq!((after.status, after.x_cache()), (StatusCode::OK, Some("HIT")));
    assert_eq!(after.body, ended);
    let scrape = gateway.scrape().await;
    assert_eq!(
        scrape.expect("plextera_gateway_cache_evictions_total", &[("cause", "explicit")]),
        1.0,
        "the forgotten 404 counts as an explicit eviction"
    );
}

/// `watch.poll_interval` for [`quick_watch_slow_safety_net`].
const POLL: Duration = Duration::from_millis(100);

/// Watchers at [`POLL`] on their own, backing off to 5 s, but 60 s apart while events flow.
fn quick_watch_slow_safety_net(config: &mut Config) {
    config.watch.poll_interval = POLL;
    config.watch.max_poll_interval = Duration::from_secs(5);
    config.webhook.safety_poll_interval = Duration::from_secs(60);
}

#[tokio::test]
async fn an_event_for_a_run_still_going_makes_its_watcher_poll_at_poll_interval_until_it_ends() {
    let mock = MockUpstream::start().await;
    let gateway = start(&mock, &[SECRET], quick_watch_slow_safety_net).await;
    // Upstream lags behind the event: the run still shows going.
    mock.set("run-g", Reply::ok(running("run-g", 60, 1000)));
    let going = version(&gateway, "run-g").await;
    let client = hold_long_poll(&gateway, "run-g", &going);
    until_held(&gateway, 1, 0).await;

    let response = post_event(&gateway, completed_event("evt_g", "run-g")).await;
    assert_acknowledged(&response, StatusCode::ACCEPTED, "accepted");
    until_confirmed(&gateway, "going", 1).await;
    assert_eq!(confirmations(&gateway, "ended").await, 0.0);

    // Events flow (the safety interval is 60 s), yet the watcher looks again every poll_interval;
    // the client is not answered with the version it holds.
    let confirmed = mock.count_for("run-g");
    eventually("the watcher polls three more times", || async {
        mock.count_for("run-g") >= confirmed + 3
    })
    .await;
    assert!(!client.is_finished(), "still held: nothing changed");
    assert_eq!(held(&gateway).await, (1.0, 0.0));

    let ended = completed("run-g");
    mock.set("run-g", Reply::ok(ended.clone()));
    let changed_at = Instant::now();
    let (answer, at) = answered(client).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, ended);
    let after = at.saturating_duration_since(changed_at);
    assert!(
        after <= POLL * 5,
        "answered {after:?} after upstream showed the end: not at poll_interval"
    );
}

#[tokio::test]
async fn an_event_sharing_a_call_made_for_a_client_about_to_be_held_still_hurries_its_watcher() {
    let mock = MockUpstream::start().await;
    let gateway = start(&mock, &[SECRET], quick_watch_slow_safety_net).await;
    mock.set("run-j", Reply::ok(running("run-j", 60, 1000)));
    let going = version(&gateway, "run-j").await;
    // The client's hold needs a call first (no watcher yet); upstream is slow to answer it.
    let gate = Gate::new();
    mock.set("run-j", Reply::ok(running("run-j", 60, 1000)).gated(&gate));
    let client = hold_long_poll(&gateway, "run-j", &going);
    mock.wait_for_requests(2).await;
    // The event comes while that call is in flight: its confirmation shares it.
    let response = post_event(&gateway, completed_event("evt_j", "run-j")).await;
    assert_acknowledged(&response, StatusCode::ACCEPTED, "accepted");
    gateway.wait_for_waiters(1).await;
    mock.set("run-j", Reply::ok(completed("run-j")));
    gate.open();
    until_confirmed(&gateway, "going", 1).await;
    assert_eq!(
        gateway
            .scrape()
            .await
            .expect(CONFIRMATIONS, &[("result", "going"), ("call", "shared")]),
        1.0
    );
    // The call said "going", so the client is held and a watcher started for it: that watcher
    // polls at poll_interval (the run is expected to end), not at the 60 s safety interval.
    let (answer, _) = tokio::time::timeout(POLL * 30, client)
        .await
        .expect("the client was answered within a few poll intervals, not after the safety interval")
        .expect("the client task");
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, completed("run-j"));
}

#[tokio::test]
async fn a_second_event_for_an_ended_run_is_answered_from_the_cache() {
    let mock = MockUpstream::start().await;
    let gateway = start(&mock, &[SECRET], slow_watch).await;
    let ended = completed("run-cf");
    mock.set("run-cf", Reply::ok(ended.clone()));
    let response = post_event(&gateway, completed_event("evt_c", "run-cf")).await;
    assert_acknowledged(&response, StatusCode::ACCEPTED, "accepted");
    until_confirmed(&gateway, "ended", 1).await;
    assert_eq!(mock.count_for("run-cf"), 1);

    // A contradicting event (another id): the stored run is what upstream said, and stays.
    mock.set("run-cf", Reply::run("run-cf", "FAILED"));
    let response = post_event(&gateway, event("evt_f", FAILED, "run-cf")).await;
    assert_acknowledged(&response, StatusCode::ACCEPTED, "accepted");
    until_confirmed(&gateway, "ended", 2).await;
    assert_eq!(mock.count_for("run-cf"), 1, "no call for the second event");

    let served = gateway.get_run("run-cf").await;
    assert_eq!(served.x_cache(), Some("HIT"));
    assert_eq!(served.body, ended, "still COMPLETED");
    assert_eq!(served.json()["status"], "COMPLETED");
    assert_eq!(mock.count_for("run-cf"), 1);
}

#[tokio::test]
async fn an_event_type_not_acted_on_is_acknowledged_and_ignored() {
    let mock = MockUpstream::start().await;
    let gateway = start(&mock, &[SECRET], slow_watch).await;
    let body = Bytes::from_static(
        br#"{"eventId":"evt_doc","eventType":"document-insights.extraction.completed","occurredAt":"2026-01-01T00:00:00Z","apiVersion":"v1","data":{"documentId":"doc_1","runId":"run-d"}}"#,
    );
    let response = post_event(&gateway, body).await;
    assert_acknowledged(&response, StatusCode::OK, "ignored");
    // Other types' data may have any shape: still acknowledged, not a 400 Plextera would retry.
    for (id, data) in [
        ("evt_doc2", "[1,2]"),
        ("evt_doc3", r#"{"runId":7}"#),
        ("evt_doc4", r#""text""#),
    ] {
        let body = format!(
            r#"{{"eventId":"{id}","eventType":"document-insights.extraction.failed","data":{data}}}"#
        );
        let response = post_event(&gateway, Bytes::from(body)).await;
        assert_acknowledged(&response, StatusCode::OK, "ignored");
    }
    assert_eq!(events(&gateway, "other", "ignored").await, 4.0);
    assert_eq!(all_confirmations(&gateway).await, 0.0);
    assert_eq!(mock.request_count(), 0, "no upstream call");
}

// ---------------------------------------------------------------------------------------------
// Signatures and timestamps
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn events_without_a_valid_signature_are_refused_and_change_nothing() {
    let mock = MockUpstream::start().await;
    let gateway = start(&mock, &[SECRET], slow_watch).await;
    mock.set("run-s", Reply::ok(running("run-s", 10, 100)));
    let going = version(&gateway, "run-s").await;
    let client = hold_long_poll(&gateway, "run-s", &going);
    until_held(&gateway, 1, 0).await;
    // An event acted on would find the end and answer the client.
    mock.set("run-s", Reply::ok(completed("run-s")));
    let calls = mock.count_for("run-s");

    let body = completed_event("evt_s", "run-s");
    let valid = signed(SECRET, &body);
    let (t, mac) = valid.split_once(",v1=").expect("t= and v1=");
    let forged: [(&str, Option<String>); 6] = [
        ("signed with another secret", Some(signed("whsec_other", &body))),
        (
            "signed over another body",
            Some(signed(SECRET, &completed_event("evt_other", "run-s"))),
        ),
        ("no signature header", None),
        ("an empty v1=", Some(format!("{t},v1="))),
        ("a short v1=", Some(format!("{t},v1={}", &mac[..32]))),
        ("no t=", Some(format!("v1={mac}"))),
    ];
    for (what, signature) in &forged {
        let response = deliver(&gateway, body.clone(), signature.as_deref()).await;
        assert_refused(&response, StatusCode::UNAUTHORIZED, "INVALID_SIGNATURE", what);
    }
    assert_eq!(mock.count_for("run-s"), calls, "no upstream call");
    assert_eq!(held(&gateway).await, (1.0, 0.0), "the client is still held");
    assert!(!client.is_finished());
    assert_eq!(
        events(&gateway, COMPLETED, "invalid_signature").await,
        forged.len() as f64
    );
    assert_eq!(all_confirmations(&gateway).await, 0.0);

    // The same body, signed: acted on (the refusals were the signatures').
    let response = deliver(&gateway, body, Some(&valid)).await;
    assert_acknowledged(&response, StatusCode::ACCEPTED, "accepted");
    let (answer, _) = answered(client).await;
    assert_eq!(answer.body, completed("run-s"));
    assert_eq!(mock.count_for("run-s"), calls + 1);
}

#[tokio::test]
async fn one_valid_v1_among_several_is_enough() {
    let mock = MockUpstream::start().await;
    let gateway = start(&mock, &[SECRET], slow_watch).await;
    mock.set("run-v", Reply::ok(completed("run-v")));
    let body = completed_event("evt_v", "run-v");
    let valid = signed(SECRET, &body);
    let (t, mac) = valid.split_once(",v1=").expect("t= and v1=");
    let forged = signed("whsec_other", &body);
    let (_, bad) = forged.split_once(",v1=").expect("t= and v1=");

    let response = deliver(&gateway, body, Some(&format!("{t},v1={bad},v1={mac}"))).await;
    assert_acknowledged(&response, StatusCode::ACCEPTED, "accepted");
    until_confirmed(&gateway, "ended", 1).await;
    assert_eq!(mock.count_for("run-v"), 1);
}

#[tokio::test]
async fn while_a_secret_is_rotated_events_signed_with_either_are_accepted() {
    let mock = MockUpstream::start().await;
    let gateway = start(&mock, &["whsec_old", "whsec_new"], slow_watch).await;
    for id in ["run-old", "run-new", "run-third"] {
        mock.set(id, Reply::ok(completed(id)));
    }
    for (secret, run) in [("whsec_old", "run-old"), ("whsec_new", "run-new")] {
        let body = completed_event(&format!("evt_{run}"), run);
        let signature = signed(secret, &body);
        let response = deliver(&gateway, body, Some(&signature)).await;
        assert_acknowledged(&response, StatusCode::ACCEPTED, "accepted");
    }
    let body = completed_event("evt_run-third", "run-third");
    let signature = signed("whsec_third", &body);
    let response = deliver(&gateway, body, Some(&signature)).await;
    assert_refused(
        &response,
        StatusCode::UNAUTHORIZED,
        "INVALID_SIGNATURE",
        "a secret not in force",
    );

    until_confirmed(&gateway, "ended", 2).await;
    assert_eq!(mock.count_for("run-old"), 1);
    assert_eq!(mock.count_for("run-new"), 1);
    assert_eq!(mock.count_for("run-third"), 0);
}

#[tokio::test]
async fn timestamps_outside_the_tolerance_either_way_are_stale() {
    const TOLERANCE: i64 = 120;
    let mock = MockUpstream::start().await;
    let gateway = start(&mock, &[SECRET], |config| {
        slow_watch(config);
        config.webhook.tolerance = Duration::from_secs(TOLERANCE.unsigned_abs());
    })
    .await;
    mock.set("run-t", Reply::ok(completed("run-t")));
    let behind = completed_event("evt_behind", "run-t");
    let ahead = completed_event("evt_ahead", "run-t");

    for (body, offset, what) in [
        (&behind, -(TOLERANCE + 60), "too old"),
        (&ahead, TOLERANCE + 60, "too far ahead"),
    ] {
        // A valid MAC for that t: only the clock refuses it.
        let signature = signed_at(SECRET, body, offset);
        let response = deliver(&gateway, body.clone(), Some(&signature)).await;
        assert_refused(&response, StatusCode::UNAUTHORIZED, "STALE_TIMESTAMP", what);
    }
    assert_eq!(events(&gateway, COMPLETED, "stale").await, 2.0);
    assert_eq!(mock.count_for("run-t"), 0);

    // Within the tolerance either way: accepted, the refused deliveries' ids not taken as seen.
    for (body, offset) in [(&behind, -(TOLERANCE - 60)), (&ahead, TOLERANCE - 60)] {
        let signature = signed_at(SECRET, body, offset);
        let response = deliver(&gateway, body.clone(), Some(&signature)).await;
        assert_acknowledged(&response, StatusCode::ACCEPTED, "accepted");
    }
    until_confirmed(&gateway, "ended", 2).await;
    assert_eq!(events(&gateway, COMPLETED, "accepted").await, 2.0);
}

/// A validly signed `t` beyond what the clock can hold (2^63 s or more) is stale: 401
/// `STALE_TIMESTAMP`, counted, not a panic that drops the connection (once a bug).
#[tokio::test]
async fn a_signed_timestamp_beyond_the_clock_s_range_is_stale() {
    let mock = MockUpstream::start().await;
    let gateway = start(&mock, &[SECRET], slow_watch).await;
    mock.set("run-far", Reply::ok(completed("run-far")));
    let webhook = gateway.webhook.expect("the webhook listener");
    let body = completed_event("evt_far", "run-far");
    for t in ["9223372036854775808", "18446744073709551615"] {
        let request = format!(
            "POST {PATH} HTTP/1.1\r\nHost: {webhook}\r\n{SIGNATURE_HEADER}: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            independent_signature(SECRET.as_bytes(), t, &body),
            body.len(),
            std::str::from_utf8(&body).expect("utf-8")
        );
        let response = raw_exchange(webhook, request.as_bytes()).await;
        assert!(
            status_line(&response).starts_with("HTTP/1.1 401 "),
            "t={t}: {response:?}"
        );
        assert!(response.contains("STALE_TIMESTAMP"), "t={t}: {response:?}");
    }
    assert_eq!(events(&gateway, "other", "stale").await, 2.0);
    assert_eq!(mock.count_for("run-far"), 0);
}

// ---------------------------------------------------------------------------------------------
// Replays and malformed deliveries
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_replayed_event_id_is_a_duplicate_and_makes_no_call() {
    let mock = MockUpstream::start().await;
    let gateway = start(&mock, &[SECRET], slow_watch).await;
    // Upstream still shows the run going, so nothing is cached: every confirmation is a call.
    mock.set("run-r", Reply::ok(running("run-r", 90, 5000)));
    let body = completed_event("evt_r", "run-r");
    let signature = signed(SECRET, &body);
    let response = deliver(&gateway, body.clone(), Some(&signature)).await;
    assert_acknowledged(&response, StatusCode::ACCEPTED, "accepted");
    until_confirmed(&gateway, "going", 1).await;
    assert_eq!(mock.count_for("run-r"), 1);

    // The same delivery again, then the same id freshly signed on another body.
    let response = deliver(&gateway, body, Some(&signature)).await;
    assert_acknowledged(&response, StatusCode::OK, "duplicate");
    let response = post_event(&gateway, event("evt_r", FAILED, "run-r")).await;
    assert_acknowledged(&response, StatusCode::OK, "duplicate");

    // Another run's event, confirmed after them: anything they had started would be done too.
    mock.set("run-after", Reply::ok(completed("run-after")));
    let response = post_event(&gateway, completed_event("evt_after", "run-after")).await;
    assert_acknowledged(&response, StatusCode::ACCEPTED, "accepted");
    until_confirmed(&gateway, "ended", 1).await;

    assert_eq!(mock.count_for("run-r"), 1, "no call for the duplicates");
    assert_eq!(confirmations(&gateway, "going").await, 1.0);
    let scrape = gateway.scrape().await;
    assert_eq!(outcome_total(&scrape, "duplicate"), 2.0);
    assert_eq!(
        scrape.expect(EVENTS, &[("type", FAILED), ("outcome", "duplicate")]),
        1.0
    );
}

#[tokio::test]
async fn a_body_over_max_body_size_is_refused_with_or_without_a_length() {
    let mock = MockUpstream::start().await;
    let gateway = start(&mock, &[SECRET], |config| {
        slow_watch(config);
        config.webhook.max_body_size = bytesize::ByteSize::kib(1);
    })
    .await;
    mock.set("run-big", Reply::ok(completed("run-big")));

    // With Content-Length, validly signed.
    let oversized = padded_event("evt_big", "run-big", 2048);
    let response = post_event(&gateway, oversized.clone()).await;
    assert_refused(
        &response,
        StatusCode::PAYLOAD_TOO_LARGE,
        "PAYLOAD_TOO_LARGE",
        "with Content-Length",
    );

    // Chunked: no length to read first.
    let webhook = gateway.webhook.expect("the webhook listener");
    let mut request = format!(
        "POST {PATH} HTTP/1.1\r\nHost: {webhook}\r\nContent-Type: application/json\r\n{SIGNATURE_HEADER}: {}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        signed(SECRET, &oversized)
    )
    .into_bytes();
    for chunk in oversized.chunks(256) {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let response = raw_exchange(webhook, &request).await;
    assert!(
        status_line(&response).starts_with("HTTP/1.1 413 "),
        "{response:?}"
    );
    assert!(response.contains("PAYLOAD_TOO_LARGE"), "{response:?}");

    assert_eq!(
        events(&gateway, "other", "too_large").await,
        1.0,
        "chunked: no type header"
    );
    assert_eq!(events(&gateway, COMPLETED, "too_large").await, 1.0);
    assert_eq!(mock.count_for("run-big"), 0);

    // At the bound exactly: accepted.
    let response = post_event(&gateway, padded_event("evt_fits", "run-big", 1024)).await;
    assert_acknowledged(&response, StatusCode::ACCEPTED, "accepted");
    until_confirmed(&gateway, "ended", 1).await;
}

/// A post with no signature (or a malformed one) is refused on its head alone: its body is never
/// waited for, so unsigned posts cannot hold body buffers.
#[tokio::test]
async fn a_post_without_a_signature_is_refused_before_its_body_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mock = MockUpstream::start().await;
    let gateway = start(&mock, &[SECRET], slow_watch).await;
    let webhook = gateway.webhook.expect("the webhook port");
    for signature in ["", "x-plextera-signature: t=1,v1=abc\r\n"] {
        let mut stream = tokio::net::TcpStream::connect(webhook).await.expect("connect");
        let head = format!(
            "POST {PATH} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n{signature}\r\n"
        );
        stream.write_all(head.as_bytes()).await.expect("write the head");
        // No body follows: the answer must not wait for it (the body timeout is 5 s).
        let mut answer = vec![0; 4096];
        let read = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut answer))
            .await
            .expect("answered on the head alone")
            .expect("read");
        let answer = String::from_utf8_lossy(&answer[..read]);
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
        assert!(answer.contains("INVALID_SIGNATURE"), "{answer}");
    }
    assert_eq!(outcome_total(&gateway.scrape().await, "invalid_signature"), 2.0);
}

#[tokio::test]
async fn oversized_heads_and_signature_headers_are_refused() {
    let mock = MockUpstream::start().await;
    let gateway = start(&mock, &[SECRET], slow_watch).await;
    mock.set("run-h", Reply::ok(completed("run-h")));
    let webhook = gateway.webhook.expect("the webhook listener");
    let body = completed_event("evt_h", "run-h");

    // A 100 KiB header: refused by the HTTP layer before the handler sees it.
    let huge = format!(
        "POST {PATH} HTTP/1.1\r\nHost: {webhook}\r\n{SIGNATURE_HEADER}: {}\r\nX-Padding: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        signed(SECRET, &body),
        "a".repeat(100 * 1024),
        body.len(),
        std::str::from_utf8(&body).expect("utf-8")
    );
    let response = raw_exchange(webhook, huge.as_bytes()).await;
    assert!(
        status_line(&response).contains(" 431 "),
        "{:?}",
        status_line(&response)
    );

    // A 10 KiB signature header, a valid v1= at its end: refused unread.
    let valid = signed(SECRET, &body);
    let (t, mac) = valid.split_once(",v1=").expect("t= and v1=");
    let filler = format!(",v1={}", "0".repeat(64)).repeat(150);
    let long = format!("{t}{filler},v1={mac}");
    assert!(long.len() >= 10 * 1024, "{}", long.len());
    let response = deliver(&gateway, body.clone(), Some(&long)).await;
    assert_refused(
        &response,
        StatusCode::UNAUTHORIZED,
        "INVALID_SIGNATURE",
        "a 10 KiB signature header",
    );

    let scrape = gateway.scrape().await;
    assert_eq!(
        outcome_total(&scrape, "invalid_signature"),
        1.0,
        "the 431 never reached the handler"
    );
    assert_eq!(outcome_total(&scrape, "accepted"), 0.0);
    assert_eq!(mock.request_count(), 0);
    // The id was not taken: the event, signed plainly, is acted on.
    let response = deliver(&gateway, body, Some(&valid)).await;
    assert_acknowledged(&response, StatusCode::ACCEPTED, "accepted");
}

#[tokio::test]
async fn what_is_not_an_event_or_not_a_post_to_the_path_is_refused() {
    let mock = MockUpstream::start().await;
    let gateway = start(&mock, &[SECRET], slow_watch).await;

    let response = post_event(&gateway, Bytes::from_static(b"not json, but signed")).await;
    assert_refused(&response, StatusCode::BAD_REQUEST, "INVALID_EVENT", "not JSON");
    let response = post_event(
        &gateway,
        Bytes::from_static(br#"{"eventType":"workflow.run.completed"}"#),
    )
    .await;
    assert_refused(&response, StatusCode::BAD_REQUEST, "INVALID_EVENT", "no eventId");
    // A signed run event naming no usable run is acknowledged (so Plextera does not redeliver it
    // for days) and does nothing.
    for (id, data) in [
        ("evt_x", "{}"),
        ("evt_y", r#"{"runId":"../admin"}"#),
        ("evt_z", r#"{"runId":7}"#),
    ] {
        let body = format!(r#"{{"eventId":"{id}","eventType":"workflow.run.completed","data":{data}}}"#);
        let response = post_event(&gateway, Bytes::from(body)).await;
        assert_acknowledged(&response, StatusCode::OK, "ignored");
    }

    let client = TestClient::new();
    for method in [Method::GET, Method::PUT, Method::DELETE] {
        let response = client.send(method.clone(), &hook_url(&gateway, PATH), &[]).await;
        assert_refused(
            &response,
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
            method.as_str(),
        );
        assert_eq!(response.header("allow"), Some("POST"), "{method}");
    }
    for path in ["/", "/webhooks/other", "/webhooks/plextera/", &runs_path("run-1")] {
        let body = completed_event("evt_p", "run-1");
        let signature = signed(SECRET, &body);
        let response = deliver_on(
            &BodyClient::new(),
            &hook_url(&gateway, path),
            body,
            Some(&signature),
        )
        .await;
        assert_refused(&response, StatusCode::NOT_FOUND, "NOT_FOUND", path);
    }

    let scrape = gateway.scrape().await;
    assert_eq!(outcome_total(&scrape, "bad_request"), 2.0);
    assert_eq!(outcome_total(&scrape, "ignored"), 3.0);
    assert_eq!(outcome_total(&scrape, "accepted"), 0.0);
    assert_eq!(mock.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_forged_events_changes_nothing_for_held_clients() {
    const FORGED: usize = 2_000;
    const CONNECTIONS: usize = 8;
    let mock = MockUpstream::start().await;
    let gateway = start(&mock, &[SECRET], slow_watch).await;
    mock.set("run-f", Reply::ok(running("run-f", 20, 100)));
    let going = version(&gateway, "run-f").await;
    let long_polls = [
        hold_long_poll(&gateway, "run-f", &going),
        hold_long_poll(&gateway, "run-f", &going),
    ];
    let stream = hold_stream(&gateway, "run-f").await;
    until_held(&gateway, 2, 1).await;
    let ended = completed("run-f");
    mock.set("run-f", Reply::ok(ended.clone()));
    let calls = mock.count_for("run-f");

    let url = hook_url(&gateway, PATH);
    let senders: Vec<_> = (0..CONNECTIONS)
        .map(|connection| {
            let url = url.clone();
            tokio::spawn(async move {
                let client = BodyClient::new();
                for n in 0..FORGED / CONNECTIONS {
                    let body = completed_event(&format!("evt_forged_{connection}_{n}"), "run-f");
                    let signature = signed("whsec_forger", &body);
                    let response = deliver_on(&client, &url, body, Some(&signature)).await;
                    assert_eq!(response.status, StatusCode::UNAUTHORIZED);
                }
            })
        })
        .collect();
    for sender in senders {
        answered(sender).await;
    }

    assert_eq!(
        events(&gateway, COMPLETED, "invalid_signature").await,
        FORGED as f64
    );
    assert_eq!(mock.count_for("run-f"), calls, "no call for forged events");
    assert_eq!(all_confirmations(&gateway).await, 0.0);
    assert_eq!(held(&gateway).await, (2.0, 1.0), "all still held");
    assert!(long_polls.iter().all(|client| !client.is_finished()));

    let response = post_event(&gateway, completed_event("evt_real", "run-f")).await;
    assert_acknowledged(&response, StatusCode::ACCEPTED, "accepted");
    for client in long_polls {
        let (answer, _) = answered(client).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.body, ended);
    }
    let (frame, _) = answered(stream).await;
    assert_eq!(frame.kind(), "end");
    assert_eq!(mock.count_for("run-f"), calls + 1);
}

#[tokio::test]
async fn deliveries_are_counted_by_bounded_type_and_outcome() {
    let mock = MockUpstream::start().await;
    let gateway = start(&mock, &[SECRET], |config| {
        slow_watch(config);
        config.webhook.max_body_size = bytesize::ByteSize::kib(1);
    })
    .await;
    mock.set("run-m1", Reply::ok(completed("run-m1")));
    mock.set("run-m2", Reply::run("run-m2", "FAILED"));
    let url = hook_url(&gateway, PATH);
    let client = BodyClient::new();

    let first = completed_event("evt_m1", "run-m1");
    let first_signature = signed(SECRET, &first);
    let deliveries: Vec<(Bytes, Option<String>, StatusCode)> = vec![
        // accepted, twice (one of each run type), and a duplicate
        (first.clone(), Some(first_signature.clone()), StatusCode::ACCEPTED),
        {
            let body = event("evt_m2", FAILED, "run-m2");
            let signature = signed(SECRET, &body);
            (body, Some(signature), StatusCode::ACCEPTED)
        },
        (first, Some(first_signature), StatusCode::OK),
        // invalid_signature (failed type) and stale (completed type)
        {
            let body = event("evt_m3", FAILED, "run-m2");
            let signature = signed("whsec_other", &body);
            (body, Some(signature), StatusCode::UNAUTHORIZED)
        },
        {
            let body = completed_event("evt_m4", "run-m1");
            let signature = signed_at(SECRET, &body, -3600);
            (body, Some(signature), StatusCode::UNAUTHORIZED)
        },
        // too_large (failed type, by its header)
        {
            let mut body = event("evt_m5", FAILED, "run-m2").to_vec();
            body.extend(std::iter::repeat_n(b' ', 2048));
            let body = Bytes::from(body);
            let signature = signed(SECRET, &body);
            (body, Some(signature), StatusCode::PAYLOAD_TOO_LARGE)
        },
        // bad_request: signed, not JSON, no type header
        {
            let body = Bytes::from_static(b"<xml/>");
            let signature = signed(SECRET, &body);
            (body, Some(signature), StatusCode::BAD_REQUEST)
        },
        // ignored: a type not acted on
        {
            let body =
                Bytes::from_static(br#"{"eventId":"evt_m6","eventType":"workflow.created","data":{}}"#);
            let signature = signed(SECRET, &body);
            (body, Some(signature), StatusCode::OK)
        },
    ];
    for (body, signature, status) in deliveries {
        let response = deliver_on(&client, &url, body.clone(), signature.as_deref()).await;
        assert_eq!(
            response.status,
            status,
            "{}: {}",
            String::from_utf8_lossy(&body),
            String::from_utf8_lossy(&response.body)
        );
    }
    // A forged delivery claiming a type of its own invention: counted as other.
    let response = client
        .post(
            &url,
            &[
                ("x-plextera-event-type", "made.up.type"),
                (SIGNATURE_HEADER, "t=1,v1=00"),
            ],
            "{}",
        )
        .await;
    assert_eq!(response.status, StatusCode::UNAUTHORIZED);
    until_confirmed(&gateway, "ended", 2).await;

    let expected = [
        (COMPLETED, "accepted", 1.0),
        (FAILED, "accepted", 1.0),
        (COMPLETED, "duplicate", 1.0),
        (FAILED, "invalid_signature", 1.0),
        ("other", "invalid_signature", 1.0),
        (COMPLETED, "stale", 1.0),
        (FAILED, "too_large", 1.0),
        ("other", "bad_request", 1.0),
        ("other", "ignored", 1.0),
    ];
    let scrape = gateway.scrape().await;
    for event_type in [COMPLETED, FAILED, "other"] {
        for outcome in OUTCOMES {
            let want = expected
                .iter()
                .find(|(kind, result, _)| *kind == event_type && *result == outcome)
                .map_or(0.0, |(_, _, count)| *count);
            assert_eq!(
                scrape.expect(EVENTS, &[("type", event_type), ("outcome", outcome)]),
                want,
                "{event_type} {outcome}"
            );
        }
    }
    assert_eq!(scrape.label_values(EVENTS, "type"), ["other", COMPLETED, FAILED]);
    assert_eq!(scrape.types.get(EVENTS).map(String::as_str), Some("counter"));
    assert_eq!(scrape.sum(CONFIRMATIONS, &[("result", "ended")]), 2.0);
    for result in ["going", "stopped", "failed"] {
        assert_eq!(scrape.sum(CONFIRMATIONS, &[("result", result)]), 0.0, "{result}");
    }
}

// ---------------------------------------------------------------------------------------------
// The binary
// ---------------------------------------------------------------------------------------------

/// Runs `plextera-gateway sign-webhook` with `args`, `body` on standard input, and the secrets
/// variable set to `secrets` (unset for `None`); returns status, stdout and stderr.
fn sign_webhook(
    args: &[&str],
    secrets: Option<&str>,
    body: &[u8],
) -> (std::process::ExitStatus, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_plextera-gateway"));
    command
        .arg("sign-webhook")
        .args(args)
        .env_remove("PLEXTERA_WEBHOOK_SECRETS")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(secrets) = secrets {
        command.env("PLEXTERA_WEBHOOK_SECRETS", secrets);
    }
    let mut child = command.spawn().expect("start the gateway binary");
    let written = child.stdin.take().expect("stdin piped").write_all(body);
    // Without a secret it exits before reading: the pipe may be closed already.
    if let Err(error) = written
        && error.kind() != std::io::ErrorKind::BrokenPipe
    {
        panic!("write the body to sign-webhook: {error}");
    }
    let output = child.wait_with_output().expect("sign-webhook exits");
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn sign_webhook_prints_the_signature_of_stdin_with_the_first_secret() {
    let body = completed_event("evt_cli", "run-cli");
    let (status, stdout, stderr) = sign_webhook(&["--timestamp", "1700000000"], Some("s1,s2"), &body);
    assert!(status.success(), "{stderr}");
    let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    assert_eq!(stdout.trim_end(), sign(b"s1", &body, at));

    assert_eq!(
        stdout,
        format!("{}\n", independent_signature(b"s1", "1700000000", &body)),
        "HMAC-SHA256 with s1 over \"<t>.<body>\", in lower-case hex"
    );

    let (status, stdout, stderr) = sign_webhook(&["--timestamp", "1700000000"], None, &body);
    assert!(!status.success(), "exits non-zero without a secret");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("PLEXTERA_WEBHOOK_SECRETS"), "{stderr}");
}

/// A `--timestamp` beyond what the clock can hold is refused with a message, not a panic (once a
/// bug: exit 101 and a backtrace).
#[test]
fn sign_webhook_refuses_a_timestamp_beyond_the_clock_s_range() {
    let body = completed_event("evt_cli", "run-cli");
    let (status, stdout, stderr) = sign_webhook(&["--timestamp", "18446744073709551615"], Some("s1"), &body);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.starts_with("plextera-gateway: sign-webhook: --timestamp"),
        "{stderr}"
    );
}

#[tokio::test]
async fn what_sign_webhook_prints_is_accepted_by_the_listener() {
    let mock = MockUpstream::start().await;
    let gateway = start(&mock, &[SECRET], slow_watch).await;
    mock.set("run-cli", Reply::ok(completed("run-cli")));
    let body = completed_event("evt_cli", "run-cli");
    let secrets = format!("{SECRET},whsec_next");
    let (status, stdout, stderr) = sign_webhook(&[], Some(&secrets), &body);
    assert!(status.success(), "{stderr}");
    let response = deliver(&gateway, body, Some(stdout.trim_end())).await;
    assert_acknowledged(&response, StatusCode::ACCEPTED, "accepted");
    until_confirmed(&gateway, "ended", 1).await;
}

/// Scrapes a process's admin port.
async fn scrape_process(gateway: &GatewayProcess) -> prom::Scrape {
    let response = TestClient::new()
        .send(Method::GET, &format!("http://{}/metrics", gateway.admin), &[])
        .await;
    assert_eq!(response.status, StatusCode::OK);
    prom::Scrape::parse(std::str::from_utf8(&response.body).expect("utf-8 exposition"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_demo_mode_a_run_s_end_reaches_a_held_client_through_an_event() {
    let dir = tempfile::tempdir().expect("a temp dir");
    // Watchers poll every 20 s at the soonest: a demo run ends 5 s after it is first asked for,
    // so only the demo's event can end the wait before then.
    let config = support::write_config(
        dir.path(),
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [watch]\npoll_interval = \"20s\"\nmax_poll_interval = \"30s\"\n\
         [webhook]\nlisten = \"127.0.0.1:0\"\nsecrets_env = \"UNUSED_IN_DEMO\"\nsafety_poll_interval = \"30s\"\n",
    );
    let gateway = GatewayProcess::start(&["--demo", "--config", &config], &[]);
    assert!(gateway.webhook.is_some(), "the webhook port is logged as ready");
    let client = TestClient::new();
    let url = format!("http://{}{}", gateway.public, runs_path("webhook-demo-1"));

    let first = client.send(Method::GET, &url, &[]).await;
    let started = Instant::now();
    assert_eq!(first.status, StatusCode::OK, "{}", gateway.logs());
    assert_eq!(first.json()["status"], "QUEUED");
    let etag = first.header("etag").expect("an ETag").to_owned();
    let ended = client
        .send(
            Method::GET,
            &format!("{url}?wait=60"),
            &[("if-none-match", &etag)],
        )
        .await;
    let waited = started.elapsed();
    assert_eq!(ended.status, StatusCode::OK, "{}", gateway.logs());
    assert!(
        matches!(ended.json()["status"].as_str(), Some("COMPLETED" | "FAILED")),
        "the held client got the end: {}",
        ended.json()
    );
    assert!(is_strong(ended.header("etag").expect("an ETag")));
    assert!(
        waited < Duration::from_secs(10),
        "answered {waited:?} after the first request: by the event at 5 s, not a watcher's poll at 20 s"
    );
    let scrape = scrape_process(&gateway).await;
    assert_eq!(outcome_total(&scrape, "accepted"), 1.0);
    assert_eq!(scrape.sum(CONFIRMATIONS, &[("result", "ended")]), 1.0);
    eventually("the confirmation was logged", || async {
        gateway.logs().contains("run event confirmed")
    })
    .await;
    let hit = client.send(Method::GET, &url, &[]).await;
    assert_eq!(hit.x_cache(), Some("HIT"));
    assert_eq!(hit.body, ended.body);
}

/// The real binary, logging at `trace`: the signing secrets appear in no answer, log line or
/// metric, whatever the deliveries (accepted, forged, stale, too large, not an event).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_signing_secrets_appear_in_no_answer_log_or_metric() {
    const OLD: &str = "whsec_process_old_0123456789";
    const NEW: &str = "whsec_process_new_9876543210";
    let mock = MockUpstream::start().await;
    mock.set("run-p", Reply::ok(completed("run-p")));
    let dir = tempfile::tempdir().expect("a temp dir");
    let config = support::write_config(
        dir.path(),
        &format!(
            "{}[webhook]\nlisten = \"127.0.0.1:0\"\nsecrets_env = \"GW_HOOK_SECRETS\"\nmax_body_size = \"4KiB\"\n",
            support::process_config(&mock.base_url(), "")
        ),
    );
    let secrets = format!("{OLD}, {NEW}");
    let gateway = GatewayProcess::start(
        &["--config", &config],
        &[
            ("GW_TEST_KEY", TEST_KEY),
            ("GW_HOOK_SECRETS", &secrets),
            ("RUST_LOG", "trace,h2=trace"),
        ],
    );
    let url = format!("http://{}{PATH}", gateway.webhook.expect("the webhook port"));
    let client = BodyClient::new();
    let body = completed_event("evt_p", "run-p");
    let mut answers = Vec::new();
    for (body, signature) in [
        (body.clone(), signed(NEW, &body)),
        (body.clone(), signed(OLD, &body)),
        (body.clone(), signed("not-a-secret-of-ours", &body)),
        (body.clone(), signed_at(NEW, &body, -3600)),
        (Bytes::from(vec![b'x'; 5000]), signed(NEW, b"x")),
        (Bytes::from_static(b"not json"), signed(NEW, b"not json")),
    ] {
        answers.push(deliver_on(&client, &url, body, Some(&signature)).await);
    }
    let statuses: Vec<u16> = answers.iter().map(|answer| answer.status.as_u16()).collect();
    assert_eq!(statuses, [202, 200, 401, 401, 413, 400]);
    eventually("the event was confirmed", || async {
        scrape_process(&gateway)
            .await
            .sum(CONFIRMATIONS, &[("result", "ended")])
            == 1.0
    })
    .await;
    let metrics = TestClient::new()
        .send(Method::GET, &format!("http://{}/metrics", gateway.admin), &[])
        .await;
    let logs = gateway.logs();
    assert!(logs.contains("run event confirmed"), "trace logs were read");
    for secret in [OLD, NEW] {
        for answer in &answers {
            assert!(!answer.everything().contains(secret), "{}", answer.everything());
        }
        assert!(!String::from_utf8_lossy(&metrics.body).contains(secret));
        assert!(!logs.contains(secret), "a log line holds a signing secret");
        // Nor any long piece of one.
        assert!(
            !logs.contains(&secret[..16]),
            "a log line holds part of a signing secret"
        );
    }
}

//! What the push tests share: watchers that poll fast, run bodies whose versions the tests
//! control, and the names of the held-client series.

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use plextera_gateway::Config;
use tokio::task::JoinHandle;

use super::{Gate, MockUpstream, Reply, TestClient, TestGateway, TestResponse, eventually, runs_path};

/// The watcher's first interval in these tests.
pub const POLL: Duration = Duration::from_millis(50);
/// Its longest interval, once nothing changes for a while.
pub const MAX_POLL: Duration = Duration::from_millis(200);

pub const HELD: &str = "plextera_gateway_held_requests";
pub const WATCHED: &str = "plextera_gateway_watched_runs";
pub const ANSWERS: &str = "plextera_gateway_held_answers_total";

/// Watchers that poll fast, so the tests do not wait on them.
pub fn fast_watch(config: &mut Config) {
    config.watch.poll_interval = POLL;
    config.watch.max_poll_interval = MAX_POLL;
}

/// A run still going: `progress` is what a new version changes, `duration_ms` ticks on its own.
pub fn running(id: &str, progress: u32, duration_ms: u64) -> Bytes {
    Bytes::from(format!(
        r#"{{"id":"{id}","status":"PROCESSING","progress":{progress},"computedDurationMs":{duration_ms},"steps":[{{"id":"s1","status":"RUNNING","progress":{progress},"computedDurationMs":{duration_ms}}}]}}"#
    ))
}

/// The same run, ended.
pub fn completed(id: &str) -> Bytes {
    Bytes::from(format!(
        r#"{{"id":"{id}","status":"COMPLETED","progress":100,"computedDurationMs":9000,"steps":[{{"id":"s1","status":"COMPLETED","progress":100}}]}}"#
    ))
}

/// Whether an `ETag` is strong: an ended run's.
pub fn is_strong(etag: &str) -> bool {
    etag.starts_with('"') && etag.ends_with('"') && etag.len() > 2
}

/// A plain request whose upstream answer waits behind a gate, so a draining gateway keeps running
/// (its admin port too) while a test looks; open the gate to let it finish.
pub async fn request_held_upstream(
    gateway: &TestGateway,
    mock: &MockUpstream,
) -> (Gate, JoinHandle<TestResponse>) {
    let gate = Gate::new();
    mock.set("slow", Reply::run("slow", "COMPLETED").gated(&gate));
    let url = gateway.url(&runs_path("slow"));
    let request = tokio::spawn(async move { TestClient::new().send(Method::GET, &url, &[]).await });
    eventually("the slow request is upstream", || async {
        mock.count_for("slow") == 1
    })
    .await;
    (gate, request)
}

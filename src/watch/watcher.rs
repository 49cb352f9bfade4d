//! The one upstream poller of a watched run.
//!
//! It asks for its run every `watch.poll_interval` while the run changes, ×1.5 longer after each
//! answer that brings nothing new (the same version, or a transient failure), up to
//! `watch.max_poll_interval`, and back to the start on a change. Each call is the proxy's
//! ([`crate::proxy::RunService::resolve`]): a plain request for the run arriving meanwhile shares
//! it, and it spends the budget like any other call. During upstream's 429 cooldown it makes no
//! call at all. With `upstream.max_requests_per_second` set, each watcher's interval is at least
//! `watched runs / rate`, so watchers together stay inside the budget and every run's interval
//! stretches alike when they cannot all be polled at `poll_interval`; each sleep is jittered by
//! ±10 % so watchers started together drift apart instead of calling in bursts.
//!
//! It stops when its run is final (ended, 404, key refused), at once when its last client leaves
//! (the last [`super::Held`] to drop wakes it), or when the gateway drains.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use tracing::Instrument;

use super::snapshot::Snapshot;
use super::{Channel, Hub};
use crate::run::id::RunId;

/// Growth of the interval while nothing changes.
const BACKOFF: f64 = 1.5;

/// Polls `id` until its watch is released (see the module documentation).
pub(super) async fn watch(hub: Arc<Hub>, id: RunId, channel: Arc<Channel>) {
    let span = tracing::info_span!("watch", run_id = id.as_str());
    async move {
        tracing::debug!("watcher started");
        let settings = &hub.settings;
        let mut interval = settings.poll_interval;
        let mut shutdown = hub.shutdown.subscribe();
        let mut delay = jittered(stretched(&hub, interval));
        loop {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = channel.left.notified() => {}
                _ = shutdown.wait_for(|draining| *draining) => {}
            }
            if hub.release_if_done(&id, &channel) {
                break;
            }
            let cooldown = hub.budget.cooldown_remaining();
            if !cooldown.is_zero() {
                // Upstream asked for a pause: no call until it ends (and none refused meanwhile).
                delay = cooldown;
                continue;
            }
            let (answer, _) = hub.runs.resolve(id.clone(), request_id(), None).await;
            let changed = match Snapshot::of(answer, hub.runs.statuses()) {
                Some(snapshot) => channel.publish(snapshot),
                None => false,
            };
            if channel.is_final() {
                hub.release_if_done(&id, &channel);
                break;
            }
            interval = if changed {
                settings.poll_interval
            } else {
                interval.mul_f64(BACKOFF).min(settings.max_poll_interval)
            };
            delay = jittered(stretched(&hub, interval));
        }
        tracing::debug!("watcher stopped");
    }
    .instrument(span)
    .await;
}

/// `interval`, or longer when the budget cannot poll every watched run that often.
fn stretched(hub: &Hub, interval: Duration) -> Duration {
    match hub.rate {
        Some(rate) => {
            let share =
                Duration::try_from_secs_f64(hub.watched_runs() as f64 / rate).unwrap_or(Duration::MAX);
            interval.max(share)
        }
        None => interval,
    }
}

/// `delay` ±10 %.
fn jittered(delay: Duration) -> Duration {
    delay.mul_f64(0.9 + 0.2 * fastrand::f64())
}

/// The `x-request-id` a watcher's call sends upstream: `watch-` and a fresh id.
fn request_id() -> HeaderValue {
    HeaderValue::from_str(&format!("watch-{}", uuid::Uuid::new_v4().simple()))
        .expect("hex digits and a dash are a valid header value")
}

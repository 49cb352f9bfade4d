//! The one upstream poller of a watched run.
//!
//! It asks for its run every `watch.poll_interval` while the run changes, ×1.5 longer after each
//! answer that brings nothing new (the same version, or a transient failure), up to
//! `watch.max_poll_interval`, and back to the start on a change. Each call is the proxy's
//! ([`crate::proxy::RunService::resolve`]): a plain request for the run arriving meanwhile shares
//! it, and it spends the budget like any other call. During upstream's 429 cooldown it makes no
//! call at all. With `upstream.max_requests_per_second` set, each watcher's interval is at least
//! `watched runs / (rate × 3/4)` (jittered upwards), so watchers together stay inside three
//! quarters of the budget (the rest is left for plain requests and for clients starting to wait)
//! and every run's interval stretches alike when they cannot all be polled at `poll_interval`.
//! Every sleep is jittered (up to 10 % shorter, and after a cooldown a whole interval on top) so
//! watchers started together drift apart instead of calling in bursts.
//!
//! While webhook events flow it polls every `webhook.safety_poll_interval` instead (a slow safety
//! net, see [`super::events`]); after a run event whose confirming call still showed the run
//! going, every `watch.poll_interval` until the run ends, without backing off.
//!
//! It stops when its run is final (ended, 404, key refused), when the gateway drains, or at its
//! next turn (within one interval, without a call) when no client is held on the run any more.
//! It does not stop the moment the last client leaves: a long-poll client answered with a new
//! version comes straight back with it, and finds the watcher and its latest answer still there
//! instead of spending a call to start a new one, so one client costs what a thousand do.

use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use super::fleet::{LEASE_MARGIN, Standing};
use super::snapshot::Snapshot;
use super::{Channel, Hub};
use crate::ops::trace_context::CallIds;
use crate::run::id::RunId;

/// Growth of the interval while nothing changes.
const BACKOFF: f64 = 1.5;
/// The share of `upstream.max_requests_per_second` the watchers may use together.
const WATCHERS_SHARE: f64 = 0.75;

/// Polls `id` until its watch is released (see the module documentation).
pub(super) async fn watch(hub: Arc<Hub>, id: RunId, channel: Arc<Channel>) {
    let span = tracing::info_span!("watch", run_id = id.as_str());
    async move {
        tracing::debug!("watcher started");
        // However this task ends (a panic included), its run is no longer watched.
        let _release = Release {
            hub: Arc::clone(&hub),
            id: id.clone(),
            channel: Arc::clone(&channel),
        };
        let settings = &hub.settings;
        let mut interval = next_interval(&hub, &channel, settings.poll_interval, true);
        let mut shutdown = hub.shutdown.subscribe();
        let mut delay = next_delay(&hub, interval);
        let mut standing = Standing::default();
        loop {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = shutdown.wait_for(|draining| *draining) => {}
                () = channel.hurry.notified() => {
                    // A run event, whose confirming call was just made: stop if it found the
                    // end, otherwise look again one poll_interval from now.
                    if hub.release_if_done(&id, &channel) {
                        break;
                    }
                    interval = settings.poll_interval;
                    delay = next_delay(&hub, interval);
                    continue;
                }
            }
            if hub.release_if_done(&id, &channel) {
                break;
            }
            let cooldown = hub.budget.cooldown_remaining();
            if !cooldown.is_zero() {
                // Upstream asked for a pause: no call until it ends (and none refused meanwhile),
                // then not all watchers at once.
                delay = cooldown + next_delay(&hub, interval);
                continue;
            }
            if let Some(fleet) = &hub.fleet
                && !fleet
                    .may_poll(&id, &mut standing, &channel.state_key(), delay)
                    .await
            {
                // Another replica polls this run for the fleet; its news reaches this channel.
                delay = next_delay(&hub, interval);
                continue;
            }
            let (answer, _) = hub.runs.resolve(id.clone(), CallIds::own("watch"), None).await;
            let snapshot = Snapshot::of(answer, hub.runs.statuses());
            let changed = snapshot
                .as_ref()
                .is_some_and(|snapshot| channel.publish(snapshot.clone()));
            let done = channel.is_final();
            if !done {
                interval = next_interval(&hub, &channel, interval, changed);
                delay = next_delay(&hub, interval);
            }
            if let Some(fleet) = &hub.fleet {
                fleet
                    .after_poll(&id, &mut standing, snapshot.as_ref(), delay + LEASE_MARGIN)
                    .await;
            }
            if done {
                break;
            }
        }
        if let Some(fleet) = &hub.fleet {
            fleet.release(&id, &mut standing).await;
        }
        tracing::debug!("watcher stopped");
    }
    .instrument(span)
    .await;
}

/// The interval after one that was `interval` and brought a change or not: back to
/// `watch.poll_interval` on a change, ×1.5 otherwise up to `watch.max_poll_interval`; at least the
/// safety interval while events flow; `watch.poll_interval` flat once a run event is expected to
/// be confirmed.
fn next_interval(hub: &Hub, channel: &Channel, interval: Duration, changed: bool) -> Duration {
    let settings = &hub.settings;
    if channel.expects_end() {
        return settings.poll_interval;
    }
    let own = if changed {
        settings.poll_interval
    } else {
        interval.mul_f64(BACKOFF).min(settings.max_poll_interval)
    };
    match hub.pace.safety_interval() {
        Some(safety) => own.max(safety),
        None => own,
    }
}

/// How long to sleep before the next call: `interval` less up to 10 % (never more, so a change
/// is seen within one interval), and with a rate budget at least the watcher's share of it, plus
/// up to 20 % (jittered upwards, so the watchers together stay within their three quarters).
fn next_delay(hub: &Hub, interval: Duration) -> Duration {
    let delay = interval.mul_f64(1.0 - 0.1 * fastrand::f64());
    match hub.rate {
        Some(rate) => {
            let share = Duration::try_from_secs_f64(hub.watched_runs() as f64 / (rate * WATCHERS_SHARE))
                .unwrap_or(Duration::MAX);
            delay.max(share.mul_f64(1.0 + 0.2 * fastrand::f64()))
        }
        None => delay,
    }
}

/// Removes the run's watch when its watcher ends.
struct Release {
    hub: Arc<Hub>,
    id: RunId,
    channel: Arc<Channel>,
}

impl Drop for Release {
    fn drop(&mut self) {
        self.hub.release(&self.id, &self.channel);
    }
}

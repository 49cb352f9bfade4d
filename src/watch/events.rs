//! How webhook events pace the watchers, and the confirming call a run event triggers.
//!
//! While events flow (a verified event arrived within the last [`FLOWING_FOR`]), a run's end
//! reaches the gateway as an event within moments, so the watchers' polls are only a safety net
//! (there is no event for `CLOSED`, nor for progress): they poll every
//! `webhook.safety_poll_interval` instead of backing off from `watch.poll_interval`. When events
//! stop (a broken subscription, a lost secret), the watchers are back to their own pace within
//! [`FLOWING_FOR`].
//!
//! A run event is never taken at its word: [`Watches::confirm`] asks upstream for the run (through
//! the proxy's single flight and budget, so a call already in flight is shared), which stores an
//! ended run and answers every client held on it. If upstream still shows the run going, its
//! watcher polls at `watch.poll_interval` until the run ends.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::HeaderValue;

use super::Watches;
use super::snapshot::{Snapshot, State};
use crate::run::id::RunId;

/// How long after the last verified event events count as flowing.
pub const FLOWING_FOR: Duration = Duration::from_secs(10 * 60);

/// When the last verified event arrived, and the watchers' interval while events flow.
pub(super) struct Pace {
    /// `webhook.safety_poll_interval`; `None` when the webhook listener is off.
    safety_poll_interval: Option<Duration>,
    last_event: Mutex<Option<Instant>>,
}

impl Pace {
    pub(super) fn new(safety_poll_interval: Option<Duration>) -> Self {
        Self {
            safety_poll_interval,
            last_event: Mutex::new(None),
        }
    }

    fn event_arrived(&self) {
        *self.lock() = Some(Instant::now());
    }

    /// The watchers' interval now, when events flow.
    pub(super) fn safety_interval(&self) -> Option<Duration> {
        let interval = self.safety_poll_interval?;
        let flowing = self.lock().is_some_and(|last| last.elapsed() < FLOWING_FOR);
        flowing.then_some(interval)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.last_event
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// What a confirming call found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmation {
    /// The run ended: stored, and every client held on it answered.
    Ended,
    /// Upstream still shows it going: its watcher, if any, polls at `watch.poll_interval`.
    Going,
    /// Not a run to wait on (404, another 4xx, the key refused): held clients told so.
    Stopped,
    /// Upstream said nothing (5xx, a timeout, 429 or the budget): the watchers carry on.
    Failed,
}

impl Confirmation {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Ended => "ended",
            Self::Going => "going",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
        }
    }
}

impl Watches {
    /// Notes that a verified event arrived: events flow (see the module documentation).
    pub fn event_arrived(&self) {
        self.hub.pace.event_arrived();
    }

    /// Confirms a run event for `id` with one upstream call (or the one in flight), handing what
    /// it finds to every client held on the run.
    pub async fn confirm(&self, id: RunId) -> Confirmation {
        let hub = &self.hub;
        let (answer, _) = hub.runs.resolve(id.clone(), request_id(), None).await;
        let Some(snapshot) = Snapshot::of(answer, hub.runs.statuses()) else {
            hub.hurry(&id);
            return Confirmation::Failed;
        };
        let confirmation = match snapshot.state {
            State::Going(_) => Confirmation::Going,
            State::Ended(_) => Confirmation::Ended,
            State::Stopped => Confirmation::Stopped,
        };
        hub.offer(&id, &snapshot);
        hub.hurry(&id);
        confirmation
    }
}

/// The `x-request-id` a confirming call sends upstream: `webhook-` and a fresh id.
fn request_id() -> HeaderValue {
    HeaderValue::from_str(&format!("webhook-{}", uuid::Uuid::new_v4().simple()))
        .expect("hex digits and a dash are a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_flow_only_once_one_has_arrived_and_only_with_a_listener() {
        let pace = Pace::new(Some(Duration::from_secs(30)));
        assert_eq!(pace.safety_interval(), None, "no event yet");
        pace.event_arrived();
        assert_eq!(pace.safety_interval(), Some(Duration::from_secs(30)));
        *pace.lock() = Instant::now().checked_sub(FLOWING_FOR);
        assert_eq!(pace.safety_interval(), None, "the last event is too old");

        let off = Pace::new(None);
        off.event_arrived();
        assert_eq!(off.safety_interval(), None);
    }
}

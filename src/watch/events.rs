//! How webhook events pace the watchers, and the confirming call a run event triggers.
//!
//! While events flow (a verified run event arrived within the last [`FLOWING_FOR`]), a run's end
//! reaches the gateway as an event within moments, so the watchers' polls are only a safety net
//! (there is no event for `CLOSED`, nor for progress): they poll at least
//! `webhook.safety_poll_interval` apart. When events
//! stop (a broken subscription, a lost secret), the watchers are back to their own pace within
//! [`FLOWING_FOR`].
//!
//! A run event is never taken at its word: [`Watches::confirm`] asks upstream for the run (through
//! the proxy's single flight and budget, so a call already in flight is shared), which stores an
//! ended run and answers every client held on it. If upstream still shows the run going (or says
//! nothing), its watcher polls at `watch.poll_interval` until the run ends; so does a watcher
//! started for it within [`EXPECTING_FOR`] (a client that was being held just as the event came).
//! A remembered 404 for the run is forgotten first: the event says it exists.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use moka::future::Cache;

use super::Watches;
use super::fleet::Fleet;
use super::fleet::message::News;
use super::snapshot::{Snapshot, State};
use crate::cache::coalesce::Role;
use crate::edge::error::GatewayError;
use crate::ops::trace_context::CallIds;
use crate::proxy::Answer;
use crate::run::id::RunId;

/// How long after the last verified run event events count as flowing.
pub const FLOWING_FOR: Duration = Duration::from_secs(10 * 60);
/// How long a run whose event was not confirmed yet is expected to end: a watcher started for it
/// meanwhile polls at `watch.poll_interval`.
pub const EXPECTING_FOR: Duration = Duration::from_secs(5 * 60);
/// Most runs expected to end remembered at once.
const MAX_EXPECTED: u64 = 10_000;

/// When the last verified run event arrived, the watchers' interval while events flow, and the
/// runs expected to end.
pub(super) struct Pace {
    /// `webhook.safety_poll_interval`; `None` when the webhook listener is off.
    safety_poll_interval: Option<Duration>,
    last_event: Mutex<Option<Instant>>,
    /// Runs whose event's confirming call still found them going (or failed), for
    /// [`EXPECTING_FOR`].
    expecting: Cache<RunId, ()>,
}

impl Pace {
    pub(super) fn new(safety_poll_interval: Option<Duration>) -> Self {
        Self {
            safety_poll_interval,
            last_event: Mutex::new(None),
            expecting: Cache::builder()
                .max_capacity(MAX_EXPECTED)
                .time_to_live(EXPECTING_FOR)
                .build(),
        }
    }

    /// Whether an event said `id` ended and no call has confirmed it yet.
    pub(super) fn expects_end(&self, id: &RunId) -> bool {
        self.expecting.contains_key(id)
    }

    /// Notes that an event said `id` ended and no call has confirmed it yet.
    pub(super) async fn expect(&self, id: RunId) {
        self.expecting.insert(id, ()).await;
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

/// Whether a confirming call was an upstream call of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// It led an upstream call.
    Led,
    /// It joined an upstream call already in flight for the run.
    Shared,
    /// No upstream call: the run was in the cache, or the budget refused.
    None,
}

impl Call {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Led => "led",
            Self::Shared => "shared",
            Self::None => "none",
        }
    }

    fn of(answer: &Answer, role: Role) -> Self {
        match (answer, role) {
            (Answer::Cached { fresh: false, .. }, _)
            | (
                Answer::Failed(GatewayError::RateLimited { .. } | GatewayError::UpstreamCoolingDown { .. }),
                _,
            ) => Self::None,
            (_, Role::Waiter) => Self::Shared,
            (_, Role::Leader) => Self::Led,
        }
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
    /// Upstream said nothing (5xx, a timeout, 429 or the budget): its watcher, if any, polls at
    /// `watch.poll_interval` until the run ends.
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
    /// Notes that a verified run event arrived: events flow (see the module documentation).
    pub fn event_arrived(&self) {
        self.hub.pace.event_arrived();
    }

    /// Confirms a run event for `id` with one upstream call (or the one in flight), handing what
    /// it finds to every client held on the run.
    pub async fn confirm(&self, id: RunId) -> (Confirmation, Call) {
        let hub = &self.hub;
        hub.runs.forget_not_found(&id).await;
        let (answer, role) = hub.runs.resolve(id.clone(), CallIds::own("webhook"), None).await;
        let call = Call::of(&answer, role);
        let snapshot = Snapshot::of(answer, hub.runs.statuses());
        let confirmation = match &snapshot {
            None => Confirmation::Failed,
            Some(snapshot) => {
                hub.offer(&id, snapshot);
                match snapshot.state {
                    State::Going(_) => Confirmation::Going,
                    State::Ended(_) => Confirmation::Ended,
                    State::Stopped => Confirmation::Stopped,
                }
            }
        };
        match confirmation {
            Confirmation::Going | Confirmation::Failed => hub.pace.expect(id.clone()).await,
            Confirmation::Ended | Confirmation::Stopped => hub.pace.expecting.invalidate(&id).await,
        }
        hub.hurry(&id);
        // The other replicas' clients, too.
        if let Some(fleet) = &hub.fleet {
            let news = match (&snapshot, confirmation) {
                (Some(snapshot), Confirmation::Ended | Confirmation::Stopped) => Fleet::news(snapshot),
                _ => News::Expect,
            };
            fleet.announce(&id, news).await;
        }
        (confirmation, call)
    }
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

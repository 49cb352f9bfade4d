//! Push instead of poll: clients held on a run still going, and the one upstream watcher per run
//! that serves them.
//!
//! A client may wait for a run to change instead of polling it: a **long-poll** (`?wait=` or
//! `Prefer: wait=` with the `If-None-Match` of the version it holds, [`long_poll`]) or an
//! **event stream** (`Accept: text/event-stream`, [`sse`]). While at least one client is held on
//! a run, exactly one **watcher** (`watcher.rs`) asks upstream for it every `watch.poll_interval`
//! (backing off while nothing changes), through the proxy's single flight and budget
//! ([`RunService::resolve`]), and publishes each new version to every held client at once
//! ([`snapshot`]). Upstream calls per run so depend on how long the run lasts, not on how many
//! clients watch it.
//!
//! [`Watches`] is the service between routing and the proxy: it sends held requests here and
//! every other request straight to [`RunService`] (plain polls are never answered from a
//! watcher's snapshot: a run that is going is never stale). It owns the table of watched runs
//! (one std `Mutex`, held for a few map operations, never across an await), the count of held
//! clients against `watch.max_held`, and the shutdown signal that answers every held client.
//! Webhook events ([`events`]) end waits at once with a confirming call and slow the watchers
//! down to a safety net while they flow.

pub mod events;
pub mod fleet;
pub mod long_poll;
pub mod metrics;
pub mod snapshot;
pub mod sse;
pub mod wait;
mod watcher;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Response};
use tokio::sync::{Notify, watch};
use tower::Service;

use self::events::Pace;
use self::fleet::Fleet;
use self::metrics::{HeldKind, WatchMetrics};
use self::snapshot::Snapshot;
use crate::cache::etag;
use crate::cache::purge::{Purged, Scope, Shared};
use crate::config::WatchConfig;
use crate::edge::error::GatewayError;
use crate::edge::response::Body;
use crate::edge::routes::RunRequest;
use crate::proxy::{Answer, RunService};
use crate::run::id::RunId;
use crate::upstream::budget::Budget;

/// `Preference-Applied` (RFC 7240): names the wait applied to a `Prefer: wait=` request.
pub const PREFERENCE_APPLIED: HeaderName = HeaderName::from_static("preference-applied");
/// `Retry-After` on 503 `TOO_MANY_WAITERS`, in seconds.
const FULL_RETRY_AFTER_SECS: u64 = 1;

/// The held clients and watchers, and the service that routes requests to them. Cheap to clone.
#[derive(Clone)]
pub struct Watches {
    hub: Arc<Hub>,
    /// The proxy, for every request that is not held (the hub's own copy, kept here so a plain
    /// request costs no extra reference count on its way through).
    runs: RunService,
}

struct Hub {
    runs: RunService,
    budget: Budget,
    settings: WatchConfig,
    /// `upstream.max_requests_per_second`: watchers stretch their intervals to share it.
    rate: Option<f64>,
    watched: Mutex<HashMap<RunId, Watched>>,
    /// Clients held now, long-polls and streams together, against `settings.max_held`.
    held: AtomicUsize,
    /// Turns `true` once when the gateway starts draining.
    shutdown: watch::Sender<bool>,
    /// Whether webhook events flow, which slows the watchers down.
    pace: Pace,
    /// With a shared Redis tier: one watcher per run for the whole fleet.
    fleet: Option<Arc<Fleet>>,
    metrics: WatchMetrics,
}

/// A watched run: its watcher's channel and how many clients are held on it.
struct Watched {
    channel: Arc<Channel>,
    clients: usize,
}

/// What a run's watcher shares with the clients held on it.
struct Channel {
    /// The run's latest state, seeded with the state its first client was given.
    snapshot: watch::Sender<Snapshot>,
    /// Set by a run event: the run should end soon, so its watcher polls at `watch.poll_interval`.
    expecting_end: AtomicBool,
    /// Wakes the watcher when a run event arrives (to stop, or to poll sooner).
    hurry: Notify,
    /// The versions the run has had lately, newest last ([`RECENT_VERSIONS`] at most): a state
    /// carrying one of them again is older news (a wake-up from another replica, or a call that
    /// started before a newer answer), not a change, so clients never go back.
    recent: Mutex<std::collections::VecDeque<HeaderValue>>,
}

/// Versions a watch channel remembers so that older news is not published as new.
const RECENT_VERSIONS: usize = 16;

impl Watches {
    /// `safety_poll_interval`: the watchers' interval while webhook events flow (`None`: no
    /// webhook listener).
    pub fn new(
        runs: RunService,
        budget: Budget,
        settings: WatchConfig,
        rate: Option<f64>,
        safety_poll_interval: Option<Duration>,
        fleet: Option<Fleet>,
        metrics: WatchMetrics,
    ) -> Self {
        metrics.set_limit(settings.max_held);
        Self {
            runs: runs.clone(),
            hub: Arc::new(Hub {
                runs,
                budget,
                settings,
                rate,
                watched: Mutex::default(),
                held: AtomicUsize::new(0),
                shutdown: watch::Sender::new(false),
                pace: Pace::new(safety_poll_interval),
                fleet: fleet.map(Arc::new),
                metrics,
            }),
        }
    }

    /// Answers every held client now (long-polls with what they have or the current version,
    /// streams closed cleanly), stops the watchers, and holds no new client: the gateway drains.
    pub fn shut_down(&self) {
        self.hub.shutdown.send_replace(true);
    }

    /// Whether run event `key` (a hash of its id) is seen for the first time in the whole fleet;
    /// `true` without a shared Redis tier, or when Redis cannot say.
    pub async fn first_event_in_fleet(&self, key: u128, kept_for: Duration) -> bool {
        match &self.hub.fleet {
            Some(fleet) => fleet.first_event(key, kept_for).await != Some(false),
            None => true,
        }
    }

    /// Clients held right now.
    pub fn held(&self) -> usize {
        self.hub.held.load(Ordering::Acquire)
    }

    /// With a shared Redis tier, starts receiving the other replicas' news now rather than at the
    /// first watcher, so their purges reach this replica however idle it is. Call once serving.
    pub fn start(&self) {
        if let Some(fleet) = &self.hub.fleet {
            fleet.start(Arc::downgrade(&self.hub));
        }
    }

    /// An operator's purge: drops `id`'s stored answer in `scope` here and in Redis, then tells
    /// the other replicas to drop their memory copy. Clients held on a run still going are
    /// untouched (such a run is never stored); a watch whose run ended or stopped is dropped, so
    /// a client arriving next is not given its answer.
    pub async fn purge(&self, id: &RunId, scope: Scope) -> PurgeReport {
        self.hub.purged(id);
        // Redis first, then the announcement: a replica told of the purge must not find the old
        // copy in Redis and keep it again.
        let mut purged = self.runs.purge(id, scope).await;
        let replicas_told = match &self.hub.fleet {
            Some(fleet) => Some(fleet.announce_purge(id, scope == Scope::NotFound).await),
            None => None,
        };
        // Then Redis once more: a replica writing the run just as it was purged is told now, and
        // its write, if it landed after the first delete, goes with this one.
        if purged.shared.is_some_and(|shared| shared != Shared::Unavailable) {
            purged.shared = match self.runs.purge_shared_again(id).await {
                Some(Shared::Absent) => purged.shared,
                again => again,
            };
        }
        PurgeReport {
            purged,
            replicas_told,
        }
    }
}

/// What an operator's purge did, on this replica and for the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PurgeReport {
    pub purged: Purged,
    /// Whether the other replicas were told (`None`: no shared Redis tier, no other replicas to
    /// tell).
    pub replicas_told: Option<bool>,
}

impl Service<RunRequest> for Watches {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: RunRequest) -> Self::Future {
        if request.stream {
            let hub = Arc::clone(&self.hub);
            return Box::pin(async move { Ok(sse::serve(hub, request).await) });
        }
        let Some(ask) = request.wait else {
            return self.runs.call(request);
        };
        let hub = Arc::clone(&self.hub);
        let wait = ask.wait.min(hub.settings.max_wait);
        let holds_a_version = request.if_none_match.is_some();
        Box::pin(async move {
            let mut response = if wait.is_zero() {
                let mut runs = hub.runs.clone();
                runs.call(request).await?
            } else {
                long_poll::serve(hub, request, wait).await
            };
            // The preference is applied when the request could be held (or asked for no hold).
            if ask.preferred && (wait.is_zero() || holds_a_version) {
                let applied = HeaderValue::from_str(&wait::format_applied(wait))
                    .expect("digits, a dot and '=' are a valid header value");
                response.headers_mut().insert(PREFERENCE_APPLIED, applied);
            }
            Ok(response)
        })
    }
}

impl Hub {
    fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Whether one more client may be held (checked before anything is fetched for it, so a
    /// client that will be refused spends no upstream call).
    fn has_room(&self) -> bool {
        self.held.load(Ordering::Acquire) < self.settings.max_held
    }

    /// The latest state of `id` its watcher has, if it has a watcher.
    fn current(&self, id: &RunId) -> Option<Snapshot> {
        let watched = self.lock();
        Some(watched.get(id)?.channel.snapshot.borrow().clone())
    }

    /// The run's state for a held request whose client holds version `known` (if any): its
    /// watcher's, when that is final, or when the client holds no version or exactly that one;
    /// otherwise (no watcher, or the client has a version the watcher has not seen, perhaps a
    /// newer one from a plain request or another replica) the answer of a call made now, which
    /// the watcher, if any, learns too; no call is made for a client that could not be held.
    async fn current_or_fetch(
        &self,
        request: &RunRequest,
        known: Option<&HeaderValue>,
    ) -> Result<(Snapshot, Fresh), NotNow> {
        if let Some(snapshot) = self.current(&request.id) {
            let usable = snapshot.is_final()
                || known.is_none_or(|known| {
                    snapshot
                        .version()
                        .is_some_and(|version| etag::names(known, version))
                });
            if usable {
                return Ok((snapshot, Fresh::FromWatcher));
            }
        }
        if !self.has_room() {
            return Err(NotNow::Full);
        }
        let (answer, role) = self.runs.answer(request).await;
        match Snapshot::of(answer.clone(), self.runs.statuses()) {
            Some(snapshot) => {
                self.offer(&request.id, &snapshot);
                Ok((snapshot, Fresh::Fetched(role)))
            }
            None => Err(NotNow::Failed(self.runs.render(answer, role, request))),
        }
    }

    /// Whether `id` has a watcher here.
    fn is_watched(&self, id: &RunId) -> bool {
        self.lock().contains_key(id)
    }

    /// A run event said `id` ended, and no call confirmed it yet: its watcher (here, or one
    /// started soon) polls at `watch.poll_interval` until it ends.
    async fn expect_end(&self, id: RunId) {
        self.pace.expect(id.clone()).await;
        self.hurry(&id);
    }

    /// Hands a state learnt outside the watcher to the run's watcher, if it has one.
    fn offer(&self, id: &RunId, snapshot: &Snapshot) {
        let channel = self.lock().get(id).map(|watched| Arc::clone(&watched.channel));
        if let Some(channel) = channel {
            channel.publish(snapshot.clone());
        }
    }

    /// Tells `id`'s watcher, if it has one, that a run event came: it stops if the run is final
    /// now, and otherwise polls at `watch.poll_interval` until the run ends.
    fn hurry(&self, id: &RunId) {
        let channel = self.lock().get(id).map(|watched| Arc::clone(&watched.channel));
        if let Some(channel) = channel {
            channel.expecting_end.store(true, Ordering::Release);
            channel.hurry.notify_one();
        }
    }

    /// Holds one more client on `id`, starting the run's watcher if it has none (`seed`: the state
    /// the client was given). Refused with 503 `TOO_MANY_WAITERS` past `watch.max_held`.
    fn hold(self: &Arc<Self>, id: &RunId, kind: HeldKind, seed: &Snapshot) -> Result<Held, GatewayError> {
        let before = self.held.fetch_add(1, Ordering::AcqRel);
        if before >= self.settings.max_held {
            self.held.fetch_sub(1, Ordering::AcqRel);
            return Err(GatewayError::TooManyWaiters {
                retry_after_secs: FULL_RETRY_AFTER_SECS,
            });
        }
        let channel = {
            let mut watched = self.lock();
            let entry = watched.entry(id.clone()).or_insert_with(|| {
                let channel = Arc::new(Channel {
                    snapshot: watch::Sender::new(seed.clone()),
                    expecting_end: AtomicBool::new(self.pace.expects_end(id)),
                    hurry: Notify::new(),
                    recent: Mutex::new(seed.version().into_iter().cloned().collect()),
                });
                self.metrics.watched_runs().inc();
                if let Some(fleet) = &self.fleet {
                    fleet.start(Arc::downgrade(self));
                }
                tokio::spawn(watcher::watch(Arc::clone(self), id.clone(), Arc::clone(&channel)));
                Watched { channel, clients: 0 }
            });
            entry.clients += 1;
            Arc::clone(&entry.channel)
        };
        if let Some(gauge) = self.metrics.held(kind) {
            gauge.inc();
        }
        Ok(Held {
            hub: Arc::clone(self),
            id: id.clone(),
            channel,
            kind,
        })
    }

    /// Removes `id`'s watch, if it is still this one.
    fn release(&self, id: &RunId, channel: &Arc<Channel>) {
        let mut watched = self.lock();
        if watched
            .get(id)
            .is_some_and(|entry| Arc::ptr_eq(&entry.channel, channel))
        {
            watched.remove(id);
            self.metrics.watched_runs().dec();
        }
    }

    /// Removes `id`'s watch if it has no client left, its run is final, or the gateway is
    /// draining; whether it was removed (or was no longer this watch).
    fn release_if_done(&self, id: &RunId, channel: &Arc<Channel>) -> bool {
        let mut watched = self.lock();
        let Some(entry) = watched
            .get(id)
            .filter(|entry| Arc::ptr_eq(&entry.channel, channel))
        else {
            return true;
        };
        let done = entry.clients == 0 || self.is_shutting_down() || channel.is_final();
        if done {
            watched.remove(id);
            self.metrics.watched_runs().dec();
        }
        done
    }

    /// A purge of `id`: its watch, if its run ended or stopped, is dropped now. Such a watch
    /// otherwise stays until its watcher's next turn (up to `watch.max_poll_interval` when the
    /// final answer came from elsewhere: a client's call, a run event, another replica), and a
    /// client held on the run meanwhile would be given that answer, the one just purged. Clients
    /// it already answered keep what they have; its watcher finds itself released at its turn.
    fn purged(&self, id: &RunId) {
        let mut watched = self.lock();
        if watched.get(id).is_some_and(|entry| entry.channel.is_final()) {
            watched.remove(id);
            self.metrics.watched_runs().dec();
        }
    }

    /// Runs watched right now.
    fn watched_runs(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RunId, Watched>> {
        self.watched
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Why a held request has no state of its run to start from.
enum NotNow {
    /// `watch.max_held` clients are held: no call is made for one more.
    Full,
    /// Upstream's answer says nothing about the run (transient), as the client would get it.
    Failed(Response<Body>),
}

/// Where a held request's first state came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fresh {
    /// The run's watcher: shared, no call made for this request.
    FromWatcher,
    /// A call this request led or joined.
    Fetched(crate::cache::coalesce::Role),
}

impl Channel {
    /// Publishes `snapshot` when it is a new state (a new version, the end, a stop); returns
    /// whether it was.
    fn publish(&self, snapshot: Snapshot) -> bool {
        let mut recent = self
            .recent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.snapshot.send_if_modified(|current| {
            // Nothing follows a final state, and a version seen before is no news.
            let older =
                matches!(&snapshot.state, snapshot::State::Going(version) if recent.contains(version));
            let new = !current.is_final() && current.state != snapshot.state && !older;
            if new {
                if let snapshot::State::Going(version) = &snapshot.state {
                    if recent.len() == RECENT_VERSIONS {
                        recent.pop_front();
                    }
                    recent.push_back(version.clone());
                }
                *current = snapshot;
            }
            new
        })
    }

    fn is_final(&self) -> bool {
        self.snapshot.borrow().is_final()
    }

    /// The latest state as the fleet compares it.
    fn state_key(&self) -> String {
        fleet::state_key(&self.snapshot.borrow())
    }

    fn expects_end(&self) -> bool {
        self.expecting_end.load(Ordering::Acquire)
    }
}

/// One held client: counted against `watch.max_held` and on its run's watch until dropped, which
/// happens when it is answered or the client goes away.
pub struct Held {
    hub: Arc<Hub>,
    id: RunId,
    channel: Arc<Channel>,
    kind: HeldKind,
}

impl Held {
    /// The run's states, from the latest on; the latest counts as unseen, since it may have
    /// changed since the client was given its state.
    fn updates(&self) -> watch::Receiver<Snapshot> {
        let mut updates = self.channel.snapshot.subscribe();
        updates.mark_changed();
        updates
    }

    /// Resolves when the gateway starts draining.
    fn shutdown(&self) -> watch::Receiver<bool> {
        self.hub.shutdown.subscribe()
    }

    fn metrics(&self) -> &WatchMetrics {
        &self.hub.metrics
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        {
            let mut watched = self.hub.lock();
            if let Some(entry) = watched
                .get_mut(&self.id)
                .filter(|entry| Arc::ptr_eq(&entry.channel, &self.channel))
            {
                // With none left, the watcher stops at its next turn, unless a client (often this
                // one, back with the version it was just given) is held on the run by then.
                entry.clients -= 1;
            }
        }
        self.hub.held.fetch_sub(1, Ordering::AcqRel);
        if let Some(gauge) = self.hub.metrics.held(self.kind) {
            gauge.dec();
        }
    }
}

/// `wait` less a random part of up to a sixteenth of it, so clients held together do not all
/// come back at once (Consul's blocking queries do the same).
fn jittered_deadline(wait: Duration) -> Duration {
    wait.saturating_sub((wait / 16).mul_f64(fastrand::f64()))
}

/// Answer to a held request as a response: marked as shared (the watcher's call, not its own)
/// and, for a long-poll, as held (its time is the client's wait).
fn shared(mut response: Response<Body>, held: bool) -> Response<Body> {
    response
        .body_mut()
        .set_outcome(crate::cache::CacheOutcome::Coalesced);
    if held {
        response.body_mut().set_held();
    }
    response
}

/// What `answer` is for `request` when it came from the watcher (`fresh`): a shared answer.
fn render(hub: &Hub, snapshot: &Snapshot, fresh: Fresh, request: &RunRequest) -> Response<Body> {
    let answer: Answer = snapshot.answer.clone();
    match fresh {
        Fresh::Fetched(role) => hub.runs.render(answer, role, request),
        Fresh::FromWatcher => shared(
            hub.runs
                .render(answer, crate::cache::coalesce::Role::Leader, request),
            false,
        ),
    }
}

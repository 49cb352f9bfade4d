//! One watcher per run for the whole fleet, when replicas share Redis (`[cache.shared]`).
//!
//! Without coordination every replica with clients held on a run would poll it. With it, the
//! replica holding the run's watcher **lease** in Redis ([`crate::cache::redis::lease`]) polls;
//! the others follow: each new version, end or stop the holder sees is published on one Redis
//! channel ([`message`]) and reaches every replica's held clients through their own watch
//! channel, as a local watcher's answer would. A follower tries to take the lease at each of its
//! turns, so when the holder stops, dies or is cut off, the lease expires (its TTL is the holder's
//! next interval plus [`LEASE_MARGIN`]) and a replica with clients takes over. A holder that lost
//! its lease can no longer publish (the publish is a compare-and-set on its token).
//!
//! Redis down, slow, or the subscription lost: every replica polls on its own (counted as
//! fallbacks): more upstream calls, never a wrong or stuck answer; shared watching resumes once
//! the subscription is back. Webhook events reach every replica too: an end confirmed on one is
//! published as `ended`, an event not confirmed yet as `expect`.
//!
//! An operator's purge on one replica ([`crate::serve::purge`]) is published as `purged`: every
//! replica that receives it drops the run from its memory, whether or not it watches the run. A
//! replica whose subscription is down at that moment misses it (pub/sub keeps nothing), and keeps
//! its copy until `cache.ttl` (or `cache.not_found_ttl`) expires it. The subscription starts
//! with the gateway ([`crate::watch::Watches::start`]), not at the first watcher, so purges
//! reach idle replicas too.

pub mod message;
pub mod metrics;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use http::{HeaderValue, StatusCode};

use self::message::{Message, News, carried};
use self::metrics::FleetMetrics;
use super::Hub;
use super::snapshot::{Snapshot, State};
use crate::cache::purge::Scope;
use crate::cache::redis::{Lease, RedisTier, Take};
use crate::ops::trace_context::CallIds;
use crate::proxy::{Answer, Uncached};
use crate::run::id::RunId;
use crate::upstream::UpstreamResponse;

/// A lease outlives its holder's next turn by this much. It bounds how long the runs of a holder
/// that died go unpolled (its interval plus this, plus a follower's turn); a poll that outlasts
/// it lets another replica take over, and the old holder, finding its lease gone at its renewal,
/// follows: at worst one turn polled twice.
pub const LEASE_MARGIN: Duration = Duration::from_secs(2);
/// How often the subscription is checked with a PING.
const PING_EVERY: Duration = Duration::from_secs(1);
/// Pause before subscribing again after the subscription failed.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);

/// This replica's part in the fleet.
pub struct Fleet {
    redis: RedisTier,
    /// This replica's name on the channel (its own messages are skipped).
    replica: String,
    /// Whether the subscription is up: without it, followers would wait for news that never
    /// comes, so every watcher polls on its own.
    subscribed: AtomicBool,
    started: AtomicBool,
    metrics: FleetMetrics,
}

/// A watcher's standing in the fleet for its run.
#[derive(Default)]
pub(super) struct Standing {
    lease: Option<Lease>,
    /// Another replica held the lease at this watcher's last turn.
    following: bool,
    /// The state this holder last announced to the fleet ([`state_key`]); `None` since it took
    /// the lease. A polled state that differs is published, whether or not it was new here (this
    /// replica may have learnt it from a client's request, from another holder, or while a
    /// publish failed); receivers ignore a state they have.
    announced: Option<String>,
}

/// A run's state as the fleet compares it: its version while going, else `ended` or `stopped`.
pub(super) fn state_key(snapshot: &Snapshot) -> String {
    match &snapshot.state {
        State::Going(version) => version.to_str().unwrap_or_default().to_owned(),
        State::Ended(_) => "ended".to_owned(),
        State::Stopped => "stopped".to_owned(),
    }
}

impl Fleet {
    pub fn new(redis: RedisTier, metrics: FleetMetrics) -> Self {
        Self {
            redis,
            replica: uuid::Uuid::new_v4().simple().to_string(),
            subscribed: AtomicBool::new(false),
            started: AtomicBool::new(false),
            metrics,
        }
    }

    /// Starts the subscription, once (from inside the runtime: when the gateway starts serving,
    /// or at the first watcher).
    pub(super) fn start(self: &Arc<Self>, hub: Weak<Hub>) {
        if !self.started.swap(true, Ordering::AcqRel) {
            tokio::spawn(Arc::clone(self).subscribe(hub));
        }
    }

    fn coordinates(&self) -> bool {
        self.subscribed.load(Ordering::Acquire) && self.redis.is_available()
    }

    /// Whether the watcher of `id` polls this turn: it holds or takes the lease, Redis cannot
    /// coordinate, or the holder announced a state other than `current` (this replica's): a
    /// wake-up was lost, so it catches up with a poll of its own; `false` while another replica
    /// holds the lease and this one is up to date. `interval`: the watcher's interval.
    pub(super) async fn may_poll(
        &self,
        id: &RunId,
        standing: &mut Standing,
        current: &str,
        interval: Duration,
    ) -> bool {
        if !self.coordinates() {
            self.metrics.fallbacks.inc();
            return true;
        }
        if standing.lease.is_some() {
            return true;
        }
        match self.redis.take_lease(id, interval + LEASE_MARGIN).await {
            Take::Taken(lease) => {
                if standing.following {
                    self.metrics.lease_takeovers.inc();
                    tracing::info!(run_id = id.as_str(), "took over the watcher lease");
                }
                standing.lease = Some(lease);
                standing.following = false;
                standing.announced = None;
                self.metrics.leases_held.inc();
                true
            }
            Take::HeldElsewhere(announced) => {
                standing.following = true;
                let behind = announced.is_some_and(|announced| announced != current);
                if behind {
                    self.metrics.catch_ups.inc();
                    tracing::debug!(
                        run_id = id.as_str(),
                        "behind the holder's last announcement: polling once"
                    );
                }
                behind
            }
            Take::Unknown => {
                self.metrics.fallbacks.inc();
                true
            }
        }
    }

    /// After a poll: tells the other replicas what it found when it is not what this holder last
    /// announced, and keeps the lease for `ttl` more; a lease found lost is dropped (the next turn
    /// follows).
    pub(super) async fn after_poll(
        &self,
        id: &RunId,
        standing: &mut Standing,
        snapshot: Option<&Snapshot>,
        ttl: Duration,
    ) {
        let Some(lease) = &standing.lease else {
            return;
        };
        let news = snapshot
            .map(|snapshot| (state_key(snapshot), snapshot))
            .filter(|(key, _)| standing.announced.as_ref() != Some(key));
        let still_ours = match news {
            Some((key, snapshot)) => {
                let message = self.message(id, Self::news(snapshot)).encode();
                let published = self.redis.publish_as_holder(id, lease, &key, &message).await;
                if published == Some(true) {
                    self.metrics.published.inc();
                    standing.announced = Some(key);
                }
                published != Some(false)
            }
            None => true,
        };
        let renewed = still_ours && self.redis.renew_lease(id, lease, ttl).await != Some(false);
        if !renewed {
            tracing::info!(
                run_id = id.as_str(),
                "lost the watcher lease: another replica polls"
            );
            self.drop_lease(standing);
        }
    }

    /// Gives the lease back when the watcher stops.
    pub(super) async fn release(&self, id: &RunId, standing: &mut Standing) {
        if let Some(lease) = standing.lease.take() {
            self.metrics.leases_held.dec();
            self.redis.release_lease(id, lease).await;
        }
    }

    fn drop_lease(&self, standing: &mut Standing) {
        if standing.lease.take().is_some() {
            self.metrics.leases_held.dec();
        }
    }

    /// Tells every replica that `id`'s stored answer was purged (`not_found_only`: a remembered
    /// 404 only); whether Redis took the message.
    pub(super) async fn announce_purge(&self, id: &RunId, not_found_only: bool) -> bool {
        let published = self
            .redis
            .publish(&self.message(id, News::Purged { not_found_only }).encode())
            .await;
        if published {
            self.metrics.published.inc();
        }
        published
    }

    /// Tells every replica news that needs no lease: a run event's confirmation.
    pub(super) async fn announce(&self, id: &RunId, news: News) {
        if self.redis.publish(&self.message(id, news).encode()).await {
            self.metrics.published.inc();
        }
    }

    /// Whether run event `key` is seen for the first time in the whole fleet (`None`: Redis
    /// could not say).
    pub async fn first_event(&self, key: u128, kept_for: Duration) -> Option<bool> {
        self.redis.first_event(key, kept_for).await
    }

    fn message(&self, id: &RunId, news: News) -> Message {
        Message {
            from: self.replica.clone(),
            run: id.as_str().to_owned(),
            news,
        }
    }

    /// What a snapshot tells the other replicas.
    pub(super) fn news(snapshot: &Snapshot) -> News {
        let (content_type, body) = match &snapshot.answer {
            Answer::Uncached(uncached) => (
                uncached.response.content_type.clone(),
                carried(&uncached.response.body),
            ),
            Answer::Cached { entry, .. } => (Some(entry.content_type()), carried(&entry.body())),
            Answer::Failed(_) => (None, None),
        };
        let content_type = content_type
            .as_ref()
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let text = |version: &HeaderValue| version.to_str().unwrap_or_default().to_owned();
        match &snapshot.state {
            State::Going(version) => News::Going {
                etag: text(version),
                content_type,
                body,
            },
            State::Ended(version) => News::Ended {
                etag: version.as_ref().map(text),
                content_type,
                body,
            },
            State::Stopped => News::Stopped,
        }
    }

    /// Receives the other replicas' wake-ups until the hub is gone, subscribing again whenever
    /// the subscription fails or stops answering its PINGs.
    async fn subscribe(self: Arc<Self>, hub: Weak<Hub>) {
        loop {
            if hub.strong_count() == 0 {
                return;
            }
            if let Err(error) = self.receive(&hub).await {
                // Once per outage, not once per retry.
                if self.subscribed.load(Ordering::Acquire) {
                    tracing::warn!(error = ?error.kind(), "the fleet's Redis subscription failed: watchers poll on their own until it is back");
                } else {
                    tracing::debug!(error = ?error.kind(), "cannot subscribe to the fleet's wake-ups yet");
                }
            }
            self.subscribed.store(false, Ordering::Release);
            self.metrics.subscribed.set(0);
            tokio::time::sleep(RESUBSCRIBE_AFTER).await;
        }
    }

    async fn receive(&self, hub: &Weak<Hub>) -> redis::RedisResult<()> {
        let deadline = self.redis.timeout().max(Duration::from_millis(200)) * 4;
        let pubsub = tokio::time::timeout(deadline, self.redis.client().get_async_pubsub())
            .await
            .map_err(|_| timed_out())??;
        let (mut sink, mut stream) = pubsub.split();
        tokio::time::timeout(deadline, sink.subscribe(self.redis.wakeup_channel()))
            .await
            .map_err(|_| timed_out())??;
        self.subscribed.store(true, Ordering::Release);
        self.metrics.subscribed.set(1);
        tracing::info!("receiving the fleet's wake-ups");
        let mut ping = tokio::time::interval(PING_EVERY);
        loop {
            tokio::select! {
                message = stream.next() => {
                    let Some(message) = message else {
                        return Err(redis::RedisError::from((redis::ErrorKind::Io, "subscription closed")));
                    };
                    let Some(hub) = hub.upgrade() else { return Ok(()) };
                    if let Some(message) = Message::decode(message.get_payload_bytes()) {
                        self.wake(&hub, message);
                    }
                }
                _ = ping.tick() => {
                    if hub.strong_count() == 0 {
                        return Ok(());
                    }
                    tokio::time::timeout(deadline, sink.ping::<redis::Value>())
                        .await
                        .map_err(|_| timed_out())??;
                }
            }
        }
    }

    /// Hands another replica's news about a run to the clients held on it here.
    fn wake(&self, hub: &Arc<Hub>, message: Message) {
        if message.from == self.replica {
            return;
        }
        let Ok(id) = RunId::parse(&message.run) else {
            return;
        };
        if let News::Purged { not_found_only } = message.news {
            let scope = if not_found_only {
                Scope::NotFound
            } else {
                Scope::Run
            };
            hub.purged(&id);
            let hub = Arc::clone(hub);
            tokio::spawn(async move {
                let memory = hub.runs.purge_memory(&id, scope).await;
                tracing::info!(
                    run_id = id.as_str(),
                    scope = scope.as_str(),
                    memory,
                    "purged: another replica asked"
                );
            });
            return;
        }
        if !hub.is_watched(&id) {
            return;
        }
        self.metrics.received.inc();
        match message.news {
            News::Going {
                etag,
                content_type,
                body: Some(body),
            } => match carried_snapshot(Some(&etag), content_type.as_deref(), body, false, hub) {
                Some(snapshot) => hub.offer(&id, &snapshot),
                None => refetch(hub, id),
            },
            News::Ended {
                etag,
                content_type,
                body: Some(body),
            } => match carried_snapshot(etag.as_deref(), content_type.as_deref(), body, true, hub) {
                Some(snapshot) => hub.offer(&id, &snapshot),
                None => refetch(hub, id),
            },
            News::Going { .. } | News::Ended { .. } | News::Stopped => refetch(hub, id),
            News::Purged { .. } => {}
            News::Expect => {
                let hub = Arc::clone(hub);
                tokio::spawn(async move { hub.expect_end(id).await });
            }
        }
    }
}

/// A version carried in a message (`ended`: the run's end), as the snapshot a local poll would
/// have made; `None` when the body does not say what the message does (then the run is fetched).
fn carried_snapshot(
    etag: Option<&str>,
    content_type: Option<&str>,
    body: String,
    ended: bool,
    hub: &Hub,
) -> Option<Snapshot> {
    let version = etag.and_then(|etag| HeaderValue::from_str(etag).ok());
    let body = bytes::Bytes::from(body);
    let status = crate::cache::sniff::sniff_run(&body).ok()?.status?;
    let statuses = hub.runs.statuses();
    let run_status = statuses.classify(&status);
    if statuses.is_terminal(run_status) != ended {
        return None;
    }
    let state = if ended {
        State::Ended(version.clone())
    } else {
        State::Going(version.clone()?)
    };
    let response = UpstreamResponse {
        status: StatusCode::OK,
        content_type: content_type.and_then(|value| HeaderValue::from_str(value).ok()),
        retry_after: None,
        encoded: false,
        body,
        elapsed: Duration::ZERO,
    };
    let answer = Answer::Uncached(Arc::new(Uncached {
        response,
        run_status: Some(run_status),
        etag: version,
    }));
    Some(Snapshot::new(answer, state))
}

/// Learns the run's state here, when a message did not carry it: an ended run from the shared
/// tier (no upstream call), anything else with a call of this replica's own.
fn refetch(hub: &Arc<Hub>, id: RunId) {
    let hub = Arc::clone(hub);
    tokio::spawn(async move {
        let (answer, _) = hub.runs.resolve(id.clone(), CallIds::own("fleet"), None).await;
        if let Some(snapshot) = Snapshot::of(answer, hub.runs.statuses()) {
            hub.offer(&id, &snapshot);
        }
    });
}

fn timed_out() -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, "timed out"))
}

//! Watcher leases and wake-ups: the Redis side of sharing one watcher per run across replicas
//! (see [`crate::watch::fleet`]).
//!
//! A lease is `SET <prefix>watch:<run> <token> NX PX <ttl>`; the token is fresh per holder, and
//! renewing, publishing and releasing are Lua scripts that act only while the key still holds the
//! caller's token (compare-and-set), so a holder that lost its lease (it expired while the holder
//! was paused or cut off, and another replica took it) can neither extend it nor publish: the
//! token is the fence. A publish also records the run's state it announced under
//! `<prefix>ver:<run>`, and a replica that finds the lease held elsewhere reads it in the same
//! script: pub/sub delivers at most once, so a follower that missed a message sees it is behind. Every call goes through the tier's timeout and circuit breaker; `None`
//! means Redis could not say.

use std::time::Duration;

use redis::Script;

use super::{RedisOp, RedisTier};
use crate::run::id::RunId;

/// Proof of holding a run's watcher lease (until it expires).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    token: String,
}

/// How long the last announced state of a run is kept.
const ANNOUNCED_TTL_MS: u64 = 10 * 60 * 1000;

/// What trying to take a lease found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Take {
    /// Taken: this replica polls the run now.
    Taken(Lease),
    /// Another replica holds it; the state it last announced, if any.
    HeldElsewhere(Option<String>),
    /// Redis could not say.
    Unknown,
}

/// The scripts, compiled once (Redis caches them by their SHA).
pub(super) struct LeaseScripts {
    take: Script,
    renew: Script,
    publish: Script,
}

impl Default for LeaseScripts {
    fn default() -> Self {
        Self {
            take: Script::new(
                "if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 else return redis.call('get', KEYS[2]) or 0 end",
            ),
            renew: Script::new(
                "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end",
            ),
            publish: Script::new(
                "if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('publish', ARGV[2], ARGV[3]); redis.call('set', KEYS[2], ARGV[4], 'PX', ARGV[5]); return 1 else return 0 end",
            ),
        }
    }
}

fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl RedisTier {
    fn lease_key(&self, id: &RunId) -> String {
        format!("{}watch:{id}", self.inner.prefix)
    }

    fn announced_key(&self, id: &RunId) -> String {
        format!("{}ver:{id}", self.inner.prefix)
    }

    /// The channel every replica's wake-ups go through.
    pub fn wakeup_channel(&self) -> String {
        format!("{}wakeups", self.inner.prefix)
    }

    /// Takes `id`'s lease for `ttl` if no replica holds it; otherwise reads the state its holder
    /// last announced.
    pub async fn take_lease(&self, id: &RunId, ttl: Duration) -> Take {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let mut invocation = self.inner.lease_scripts.take.key(self.lease_key(id));
        invocation
            .key(self.announced_key(id))
            .arg(&token)
            .arg(millis(ttl));
        match self.invoke::<redis::Value>(RedisOp::Lease, &invocation).await {
            Some(redis::Value::Int(1)) => Take::Taken(Lease { token }),
            Some(redis::Value::BulkString(state)) => {
                Take::HeldElsewhere(Some(String::from_utf8_lossy(&state).into_owned()))
            }
            Some(_) => Take::HeldElsewhere(None),
            None => Take::Unknown,
        }
    }

    /// Extends `lease` to `ttl` from now: `Some(false)` when it is no longer ours.
    pub async fn renew_lease(&self, id: &RunId, lease: &Lease, ttl: Duration) -> Option<bool> {
        let mut invocation = self.inner.lease_scripts.renew.key(self.lease_key(id));
        invocation.arg(&lease.token).arg(millis(ttl));
        let renewed: i64 = self.invoke(RedisOp::Lease, &invocation).await?;
        Some(renewed == 1)
    }

    /// Publishes `message`, announcing `state`, on the wake-up channel, only while `lease` is
    /// still ours: `Some(false)` when it is not (nothing was published).
    pub async fn publish_as_holder(
        &self,
        id: &RunId,
        lease: &Lease,
        state: &str,
        message: &[u8],
    ) -> Option<bool> {
        let mut invocation = self.inner.lease_scripts.publish.key(self.lease_key(id));
        invocation
            .key(self.announced_key(id))
            .arg(&lease.token)
            .arg(self.wakeup_channel())
            .arg(message)
            .arg(state)
            .arg(ANNOUNCED_TTL_MS);
        let published: i64 = self.invoke(RedisOp::Publish, &invocation).await?;
        Some(published == 1)
    }

    /// Publishes `message` on the wake-up channel (for news that needs no lease: an ended run, an
    /// event to expect one); whether Redis took it.
    pub async fn publish(&self, message: &[u8]) -> bool {
        let command = redis::cmd("PUBLISH")
            .arg(self.wakeup_channel())
            .arg(message)
            .clone();
        self.call::<i64>(RedisOp::Publish, &command).await.is_some()
    }

    /// Lets go of `lease`, if it is still ours.
    pub async fn release_lease(&self, id: &RunId, lease: Lease) {
        let mut invocation = self.inner.release.key(self.lease_key(id));
        invocation.arg(&lease.token);
        let _: Option<i64> = self.invoke(RedisOp::Lease, &invocation).await;
    }

    /// Marks event `key` as seen fleet-wide for `kept_for`: `Some(true)` the first time,
    /// `Some(false)` when a replica saw it before, `None` Redis could not say.
    pub async fn first_event(&self, key: u128, kept_for: Duration) -> Option<bool> {
        let command = redis::cmd("SET")
            .arg(format!("{}event:{key:032x}", self.inner.prefix))
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(millis(kept_for))
            .clone();
        let set: Option<String> = self.call(RedisOp::Event, &command).await?;
        Some(set.is_some())
    }

    /// A client for a pub/sub connection of its own (subscriptions take a connection whole),
    /// with the password in use now.
    pub fn client(&self) -> redis::Client {
        self.inner.connections.load().client.clone()
    }
}

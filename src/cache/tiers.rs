//! The cache's tiers in order: memory, then Redis when `[cache.shared]` is configured.
//!
//! Lookups go memory → Redis; a run found in Redis fills memory. A run missing from both is
//! claimed ([`Claim`]): with Redis, replicas that want it at once elect one fetcher through the
//! fetch lock and the others wait briefly for its copy. Filling stores what the policy allows (an
//! ended run, or a 404 when `cache.not_found_ttl` is set) in memory now, and an ended run in Redis
//! in the background (the answer never waits for Redis); the fetch lock is released only after
//! that write, so replicas waiting for the run find it rather than fetching it themselves. Runs
//! still going are never stored anywhere. Every claim must be handed back to [`Tiers::fill`],
//! whatever the fetch gave, even nothing: that is what releases the lock.
//!
//! A purge ([`Tiers::purge`]) drops a run from memory and Redis; a claim made before it stores
//! nothing anywhere, a write a purge crossed is taken back, and a call made before it is not
//! joined by requests that come after it (see [`super::purge`]).

use super::purge::{Purged, Purges, Scope, Shared};
use super::redis::{self, Election, Lock, RedisTier};
use super::{CachedRun, RunStore};
use crate::run::id::RunId;

/// Memory, then Redis. Cheap to clone.
#[derive(Clone)]
pub struct Tiers {
    memory: RunStore,
    redis: Option<RedisTier>,
    purges: Purges,
}

/// What a lookup across the tiers found.
pub enum Lookup {
    Found(CachedRun),
    /// In no tier: the claim says who fills them.
    Missing(Claim),
}

/// The right to fill the tiers for a run none of them holds; with Redis, the run's fetch lock when
/// this replica won it. Hand it back to [`Tiers::fill`] whatever the fetch gave.
pub struct Claim {
    lock: Option<Lock>,
    /// The purge count when the lookup began: a purge since then means nothing is stored.
    purges_at: u64,
}

impl Tiers {
    pub fn new(memory: RunStore, redis: Option<RedisTier>) -> Self {
        Self {
            memory,
            redis,
            purges: Purges::default(),
        }
    }

    /// Drops `id`'s answer in `scope` from memory and, for [`Scope::Run`], from Redis; calls in
    /// flight store nothing for it afterwards.
    pub async fn purge(&self, id: &RunId, scope: Scope) -> Purged {
        self.purges.count();
        let memory = self.memory.purge(id, scope).await;
        let shared = match (&self.redis, scope) {
            (Some(redis), Scope::Run) => Some(Shared::from(redis.delete(id).await)),
            _ => None,
        };
        Purged { memory, shared }
    }

    /// Deletes `id` from Redis once more, after the purge was announced: a replica that wrote it
    /// between the purge's first delete and the announcement heard of the purge too late to take
    /// its write back. `None` without Redis; otherwise as [`Tiers::purge`] reports Redis.
    pub async fn purge_shared_again(&self, id: &RunId) -> Option<Shared> {
        let redis = self.redis.as_ref()?;
        Some(Shared::from(redis.delete(id).await))
    }

    /// Another replica purged `id`: drops it from memory here; whether memory held it.
    pub async fn purge_memory(&self, id: &RunId, scope: Scope) -> bool {
        self.purges.count();
        self.memory.purge(id, scope).await
    }

    /// The purge count now: a call for a run that started at an older count is not to be
    /// joined (see [`crate::cache::coalesce`]).
    pub fn purges_now(&self) -> u64 {
        self.purges.now()
    }

    /// Forgets a remembered 404 for `id` (404s live in memory only).
    pub async fn forget_not_found(&self, id: &RunId) {
        self.memory.forget_not_found(id).await;
    }

    /// The hit path: memory only.
    pub async fn get(&self, id: &str) -> Option<CachedRun> {
        self.memory.get(id).await
    }

    /// For the one call that will fetch a run: memory once more (a call that ended just before
    /// this one may have filled it), then Redis, or another replica's fetch to wait for.
    pub async fn lookup(&self, id: &RunId) -> Lookup {
        let purges_at = self.purges.now();
        if let Some(entry) = self.memory.get(id.as_str()).await {
            return Lookup::Found(entry);
        }
        match &self.redis {
            None => Lookup::Missing(Claim {
                lock: None,
                purges_at,
            }),
            // Boxed: the Redis calls' state would otherwise make every call's task larger, and a
            // task's future is copied whole when it is spawned.
            Some(redis) => Box::pin(self.lookup_redis(redis, id, purges_at)).await,
        }
    }

    async fn lookup_redis(&self, redis: &RedisTier, id: &RunId, purges_at: u64) -> Lookup {
        if let redis::Lookup::Hit(entry) = redis.get(id).await {
            self.remember(id, &entry, purges_at).await;
            return Lookup::Found(entry);
        }
        let lock = match redis.elect(id).await {
            Election::Leader(lock) => Some(lock),
            Election::Follower => {
                if let Some(entry) = redis.wait_for(id).await {
                    self.remember(id, &entry, purges_at).await;
                    return Lookup::Found(entry);
                }
                None
            }
            Election::Unavailable => None,
        };
        Lookup::Missing(Claim { lock, purges_at })
    }

    /// Copies a run found in Redis into memory, unless a purge came since the lookup began (the
    /// copy read may be what it purged): it is still answered, just not kept.
    async fn remember(&self, id: &RunId, entry: &CachedRun, purges_at: u64) {
        if !self.purges.since(purges_at) {
            self.memory.insert(id.clone(), entry.clone()).await;
            self.take_back_if_purged(id, purges_at).await;
        }
    }

    /// After a write to memory: a purge counted meanwhile may have run before the write landed,
    /// so the entry is dropped again. Whether it was.
    async fn take_back_if_purged(&self, id: &RunId, purges_at: u64) -> bool {
        if !self.purges.since(purges_at) {
            return false;
        }
        self.memory.purge(id, Scope::Run).await;
        true
    }

    /// Fills the tiers with what the claimed fetch gave (`None`: nothing to store) and lets go of
    /// the claim. Returns whether memory holds the entry now: one larger than the whole cache
    /// would be evicted at once, and a full cache declines a newcomer asked for less often than
    /// what it would evict; either way nothing is stored, here or in Redis.
    pub async fn fill(&self, id: &RunId, claim: Claim, entry: Option<&CachedRun>) -> bool {
        let stored = match entry {
            Some(entry) => self.store(id, entry, claim.purges_at).await,
            None => false,
        };
        let written = entry.filter(|_| stored).cloned();
        if let Some(redis) = &self.redis
            && (written.is_some() || claim.lock.is_some())
        {
            let (redis, id, purges) = (redis.clone(), id.clone(), self.purges.clone());
            tokio::spawn(async move {
                if let Some(entry) = written
                    && !purges.since(claim.purges_at)
                {
                    redis.put(&id, &entry).await;
                    // A purge counted meanwhile may have deleted the key before this write.
                    if purges.since(claim.purges_at) {
                        redis.delete(&id).await;
                    }
                }
                if let Some(lock) = claim.lock {
                    redis.release(lock).await;
                }
            });
        }
        stored
    }

    async fn store(&self, id: &RunId, entry: &CachedRun, purges_at: u64) -> bool {
        if self.purges.since(purges_at) {
            tracing::debug!(reason = "purged_meanwhile", "not stored");
            return false;
        }
        if !self.memory.can_hold(id, entry.body_len()) {
            tracing::debug!(reason = "larger_than_cache", "not stored");
            return false;
        }
        // Boxed: storing is the rare outcome, and moka's insert would otherwise make every
        // upstream call's future larger.
        let admitted = Box::pin(async {
            let admitted = self.memory.insert(id.clone(), entry.clone()).await;
            if admitted && self.take_back_if_purged(id, purges_at).await {
                tracing::debug!(reason = "purged_meanwhile", "not stored");
                return None;
            }
            Some(admitted)
        })
        .await;
        match admitted {
            Some(true) => true,
            Some(false) => {
                tracing::debug!(reason = "not_admitted", "not stored");
                false
            }
            None => false,
        }
    }
}

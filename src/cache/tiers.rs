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

use super::redis::{self, Election, Lock, RedisTier};
use super::{CachedRun, RunStore};
use crate::run::id::RunId;

/// Memory, then Redis. Cheap to clone.
#[derive(Clone)]
pub struct Tiers {
    memory: RunStore,
    redis: Option<RedisTier>,
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
}

impl Tiers {
    pub fn new(memory: RunStore, redis: Option<RedisTier>) -> Self {
        Self { memory, redis }
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
        if let Some(entry) = self.memory.get(id.as_str()).await {
            return Lookup::Found(entry);
        }
        match &self.redis {
            None => Lookup::Missing(Claim { lock: None }),
            // Boxed: the Redis calls' state would otherwise make every call's task larger, and a
            // task's future is copied whole when it is spawned.
            Some(redis) => Box::pin(self.lookup_redis(redis, id)).await,
        }
    }

    async fn lookup_redis(&self, redis: &RedisTier, id: &RunId) -> Lookup {
        if let redis::Lookup::Hit(entry) = redis.get(id).await {
            self.memory.insert(id.clone(), entry.clone()).await;
            return Lookup::Found(entry);
        }
        let lock = match redis.elect(id).await {
            Election::Leader(lock) => Some(lock),
            Election::Follower => {
                if let Some(entry) = redis.wait_for(id).await {
                    self.memory.insert(id.clone(), entry.clone()).await;
                    return Lookup::Found(entry);
                }
                None
            }
            Election::Unavailable => None,
        };
        Lookup::Missing(Claim { lock })
    }

    /// Fills the tiers with what the claimed fetch gave (`None`: nothing to store) and lets go of
    /// the claim. Returns whether memory holds the entry now: one larger than the whole cache
    /// would be evicted at once, and a full cache declines a newcomer asked for less often than
    /// what it would evict; either way nothing is stored, here or in Redis.
    pub async fn fill(&self, id: &RunId, claim: Claim, entry: Option<&CachedRun>) -> bool {
        let stored = match entry {
            Some(entry) => self.store(id, entry).await,
            None => false,
        };
        let written = entry.filter(|_| stored).cloned();
        if let Some(redis) = &self.redis
            && (written.is_some() || claim.lock.is_some())
        {
            let (redis, id) = (redis.clone(), id.clone());
            tokio::spawn(async move {
                if let Some(entry) = written {
                    redis.put(&id, &entry).await;
                }
                if let Some(lock) = claim.lock {
                    redis.release(lock).await;
                }
            });
        }
        stored
    }

    async fn store(&self, id: &RunId, entry: &CachedRun) -> bool {
        if !self.memory.can_hold(id, entry.body_len()) {
            tracing::debug!(reason = "larger_than_cache", "not stored");
            return false;
        }
        // Boxed: storing is the rare outcome, and moka's insert would otherwise make every
        // upstream call's future larger.
        if Box::pin(self.memory.insert(id.clone(), entry.clone())).await {
            return true;
        }
        tracing::debug!(reason = "not_admitted", "not stored");
        false
    }
}

//! Dropping a stored answer on an operator's request (the admin port's `DELETE /cache/…`): what
//! is dropped ([`Scope`]), what was found ([`Purged`]), and the purge count that keeps a call in
//! flight from storing, after the purge, the answer it got before it ([`Purges`]).
//!
//! A call that started before a purge may bring back the very answer the purge was meant to drop
//! (the run as it was before Plextera corrected it). So every purge on this replica (its own, or
//! one another replica announced) counts once, a claim remembers the count it was made at, and
//! [`crate::cache::tiers::Tiers`] stores nothing, in memory or in Redis, for a claim made before
//! the latest purge; it checks again after each write and takes back what a purge crossed. Nor
//! does a request that arrives after a purge join a call made before it: it leads a call of its
//! own ([`crate::cache::coalesce`], the count as the call's generation), so only the clients that
//! asked before the purge get the answer from before it. The count is one for all runs: purges
//! are rare, and a call in flight at that moment costs one more upstream call at worst.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// What a purge drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The run's stored answer, whatever it is: an ended run (memory and Redis) or a remembered
    /// 404 (memory).
    Run,
    /// A remembered 404 only (memory: 404s are never written to Redis); an ended run is kept.
    NotFound,
}

impl Scope {
    /// As logs and answers name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Run => "run",
            Self::NotFound => "not_found",
        }
    }
}

/// What one purge found and removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Purged {
    /// This replica's memory held an answer in scope, now gone.
    pub memory: bool,
    /// Redis: `None` when it was not asked (no `[cache.shared]`, or a 404 purge: 404s are never
    /// there).
    pub shared: Option<Shared>,
}

/// What the Redis tier said to a purge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shared {
    /// Redis held the run, and no longer does.
    Removed,
    /// Redis did not hold it.
    Absent,
    /// Redis failed, timed out, or its circuit is open: it may still hold the run.
    Unavailable,
}

impl From<Option<bool>> for Shared {
    /// A Redis delete's result: whether it removed the key, `None` when Redis could not be asked.
    fn from(deleted: Option<bool>) -> Self {
        match deleted {
            Some(true) => Self::Removed,
            Some(false) => Self::Absent,
            None => Self::Unavailable,
        }
    }
}

/// Purges counted on this replica. Cheap to clone; clones share the count.
#[derive(Debug, Clone, Default)]
pub struct Purges(Arc<AtomicU64>);

impl Purges {
    /// The count now, for a claim to remember.
    pub fn now(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// Counts a purge, before anything is removed.
    pub fn count(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether a purge was counted since `then`.
    pub fn since(&self, then: u64) -> bool {
        self.now() != then
    }
}

//! The fetch lock: when a run is missing everywhere, replicas that want it at once elect one
//! fetcher with `SET lock NX PX`; the others poll Redis for the value until the fetcher lets go of
//! the lock or `lock_wait` passes, then fetch themselves.

use std::time::Instant;

use super::{Lookup, RedisOp, RedisTier, RedisWait};
use crate::cache::CachedRun;
use crate::run::id::RunId;

/// Pause between looks at Redis while another replica fetches.
const WAIT_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// The outcome of trying to become the one replica that fetches a run.
pub enum Election {
    /// This replica fetches; release the lock when done.
    Leader(Lock),
    /// Another replica holds the lock.
    Follower,
    /// Redis could not say: fetch without coordination.
    Unavailable,
}

/// Proof of holding a run's fetch lock.
pub struct Lock {
    key: String,
    token: String,
}

impl RedisTier {
    fn lock_key(&self, id: &RunId) -> String {
        format!("{}lock:{id}", self.inner.prefix)
    }

    /// Tries to become the replica that fetches `id`.
    pub async fn elect(&self, id: &RunId) -> Election {
        let key = self.lock_key(id);
        let token = uuid::Uuid::new_v4().simple().to_string();
        let ttl_ms = u64::try_from(self.inner.lock_ttl.as_millis()).unwrap_or(u64::MAX);
        let command = redis::cmd("SET")
            .arg(&key)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms)
            .clone();
        match self.call::<Option<String>>(RedisOp::Lock, &command).await {
            Some(Some(_)) => Election::Leader(Lock { key, token }),
            Some(None) => Election::Follower,
            None => Election::Unavailable,
        }
    }

    /// Lets go of a fetch lock (only if it is still ours: it may have expired and been retaken).
    pub async fn release(&self, lock: Lock) {
        let mut invocation = self.inner.release.key(&lock.key);
        invocation.arg(&lock.token);
        if self.inner.breaker.is_open() {
            return;
        }
        let mut redis = self.connection();
        let outcome =
            tokio::time::timeout(self.inner.timeout, invocation.invoke_async::<i64>(&mut redis)).await;
        self.record(matches!(outcome, Ok(Ok(_))));
    }

    /// While another replica fetches `id`: polls Redis for the run until it appears, the other
    /// replica lets go of its lock, or `lock_wait` passes. `None` means "fetch it yourself".
    pub async fn wait_for(&self, id: &RunId) -> Option<CachedRun> {
        let deadline = Instant::now() + self.inner.lock_wait;
        let lock_key = self.lock_key(id);
        while Instant::now() < deadline {
            tokio::time::sleep(WAIT_POLL).await;
            match self.get(id).await {
                Lookup::Hit(run) => {
                    self.inner.metrics.waited(RedisWait::Filled);
                    return Some(run);
                }
                Lookup::Unavailable => break,
                Lookup::Miss => {}
            }
            let exists = redis::cmd("EXISTS").arg(&lock_key).clone();
            match self.call::<bool>(RedisOp::Lock, &exists).await {
                Some(true) => {}
                // The fetcher is done and stored nothing (a run still going, or an error).
                Some(false) | None => break,
            }
        }
        self.inner.metrics.waited(RedisWait::FellBack);
        None
    }
}

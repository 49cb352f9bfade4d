//! The shared tier: Redis behind the in-memory cache, so replicas fetch each finished run once.
//!
//! Lookup order is memory → Redis → upstream. A run found in Redis fills memory; an ended run
//! fetched from upstream is written to Redis in the background (the response never waits for it).
//! Runs still going are never written. When a run is missing everywhere, replicas that want it at
//! once elect one fetcher with `SET lock NX PX`; the others poll Redis for the value until the
//! fetcher lets go of the lock or `lock_wait` passes, then fetch themselves.
//!
//! Redis must never break serving: every call is bounded by `timeout`, a failure counts in
//! `plextera_gateway_shared_cache_errors_total` and reads as "not there", and after repeated
//! failures a circuit breaker stops calling Redis for a while. Values carry a small versioned
//! envelope ([`envelope`]); anything that does not decode is a miss and is overwritten.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, Script};

use crate::cache::CachedRun;
use crate::config::{ConfigError, SharedCacheConfig};
use crate::ops::metrics::{SharedCacheMetrics, SharedOp, SharedWait};
use crate::run::id::RunId;
use crate::run::status::RunStatuses;

/// Consecutive failures that open the circuit.
const FAILURES_TO_OPEN: u32 = 5;
/// How long the circuit stays open before Redis is tried again.
const OPEN_FOR: Duration = Duration::from_secs(5);
/// Pause between looks at Redis while another replica fetches.
const WAIT_POLL: Duration = Duration::from_millis(20);

/// What a lookup found.
pub enum Lookup {
    Hit(CachedRun),
    Miss,
    /// Redis failed, timed out, or the circuit is open.
    Unavailable,
}

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

/// The Redis client, its settings and its circuit breaker. Cheap to clone.
#[derive(Clone)]
pub struct SharedCache {
    inner: std::sync::Arc<Inner>,
}

struct Inner {
    redis: ConnectionManager,
    prefix: String,
    ttl: Duration,
    timeout: Duration,
    lock_wait: Duration,
    /// How long a lock lives if its holder dies without releasing it.
    lock_ttl: Duration,
    release: Script,
    breaker: Breaker,
    metrics: SharedCacheMetrics,
}

impl SharedCache {
    /// Builds the client; it connects lazily, so start-up does not depend on Redis being up.
    pub fn new(
        config: &SharedCacheConfig,
        password: Option<String>,
        default_ttl: Duration,
        upstream_timeout: Duration,
        metrics: SharedCacheMetrics,
    ) -> Result<Self, ConfigError> {
        let invalid = |error: redis::RedisError| {
            ConfigError::Invalid(crate::config::report::about(
                "cache.shared.url",
                format_args!("cannot be used ({:?})", error.kind()),
            ))
        };
        let mut info = config.url.as_str().into_connection_info().map_err(invalid)?;
        if let Some(password) = password {
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let client = redis::Client::open(info).map_err(invalid)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1);
        let redis = ConnectionManager::new_lazy_with_config(client, manager_config).map_err(invalid)?;
        Ok(Self {
            inner: std::sync::Arc::new(Inner {
                redis,
                prefix: config.key_prefix.clone(),
                ttl: config.ttl.unwrap_or(default_ttl),
                timeout: config.timeout,
                lock_wait: config.lock_wait,
                lock_ttl: upstream_timeout + Duration::from_secs(1),
                release: Script::new(
                    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end",
                ),
                breaker: Breaker::default(),
                metrics,
            }),
        })
    }

    fn run_key(&self, id: &RunId) -> String {
        format!("{}run:{id}", self.inner.prefix)
    }

    fn lock_key(&self, id: &RunId) -> String {
        format!("{}lock:{id}", self.inner.prefix)
    }

    /// Looks the run up in Redis.
    pub async fn get(&self, id: &RunId, statuses: &RunStatuses) -> Lookup {
        let key = self.run_key(id);
        let value: Option<Vec<u8>> = match self.call(SharedOp::Get, redis::cmd("GET").arg(&key)).await {
            Some(value) => value,
            None => return Lookup::Unavailable,
        };
        let Some(value) = value else {
            self.inner.metrics.misses.inc();
            return Lookup::Miss;
        };
        match envelope::decode(&value, statuses) {
            Some(run) => {
                self.inner.metrics.hits.inc();
                Lookup::Hit(run)
            }
            None => {
                tracing::warn!(run_id = %id, "a value in Redis is damaged or not ours: treated as a miss");
                self.inner.metrics.corrupt.inc();
                Lookup::Miss
            }
        }
    }

    /// Writes an ended run to Redis, with the tier's ttl.
    pub async fn put(&self, id: &RunId, run: &CachedRun, status_label: &str) {
        let value = envelope::encode(run, status_label);
        let ttl_ms = u64::try_from(self.inner.ttl.as_millis()).unwrap_or(u64::MAX);
        let command = redis::cmd("SET")
            .arg(self.run_key(id))
            .arg(value)
            .arg("PX")
            .arg(ttl_ms)
            .clone();
        if self.call::<()>(SharedOp::Set, &command).await.is_some() {
            self.inner.metrics.writes.inc();
        }
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
        match self.call::<Option<String>>(SharedOp::Lock, &command).await {
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
        let mut redis = self.inner.redis.clone();
        let outcome =
            tokio::time::timeout(self.inner.timeout, invocation.invoke_async::<i64>(&mut redis)).await;
        self.record(matches!(outcome, Ok(Ok(_))));
    }

    /// While another replica fetches `id`: polls Redis for the run until it appears, the other
    /// replica lets go of its lock, or `lock_wait` passes. `None` means "fetch it yourself".
    pub async fn wait_for(&self, id: &RunId, statuses: &RunStatuses) -> Option<CachedRun> {
        let deadline = Instant::now() + self.inner.lock_wait;
        let lock_key = self.lock_key(id);
        while Instant::now() < deadline {
            tokio::time::sleep(WAIT_POLL).await;
            match self.get(id, statuses).await {
                Lookup::Hit(run) => {
                    self.inner.metrics.waited(SharedWait::Filled);
                    return Some(run);
                }
                Lookup::Unavailable => break,
                Lookup::Miss => {}
            }
            let exists = redis::cmd("EXISTS").arg(&lock_key).clone();
            match self.call::<bool>(SharedOp::Lock, &exists).await {
                Some(true) => {}
                // The fetcher is done and stored nothing (a run still going, or an error).
                Some(false) | None => break,
            }
        }
        self.inner.metrics.waited(SharedWait::FellBack);
        None
    }

    /// Runs one command within the timeout and through the breaker; `None` on any failure.
    async fn call<T: redis::FromRedisValue>(&self, op: SharedOp, command: &redis::Cmd) -> Option<T> {
        if self.inner.breaker.is_open() {
            return None;
        }
        let mut redis = self.inner.redis.clone();
        let started = Instant::now();
        let outcome = tokio::time::timeout(self.inner.timeout, command.query_async::<T>(&mut redis)).await;
        self.inner.metrics.observe(op, started.elapsed());
        match outcome {
            Ok(Ok(value)) => {
                self.record(true);
                Some(value)
            }
            Ok(Err(error)) => {
                tracing::debug!(error = %format_args!("{:?}", error.kind()), "Redis call failed");
                self.record(false);
                None
            }
            Err(_) => {
                tracing::debug!("Redis call timed out");
                self.record(false);
                None
            }
        }
    }

    fn record(&self, succeeded: bool) {
        if succeeded {
            self.inner.breaker.success();
        } else {
            self.inner.metrics.errors.inc();
            if self.inner.breaker.failure() {
                tracing::warn!(pause = ?OPEN_FOR, "Redis keeps failing: serving without it for a while");
            }
        }
        self.inner
            .metrics
            .circuit_open
            .set(i64::from(self.inner.breaker.is_open()));
    }
}

/// Opens after `FAILURES_TO_OPEN` consecutive failures, for `OPEN_FOR`; then lets calls through
/// again (the next failure reopens it at once, a success closes it).
#[derive(Default)]
struct Breaker {
    consecutive_failures: AtomicU32,
    open_until: Mutex<Option<Instant>>,
}

impl Breaker {
    fn is_open(&self) -> bool {
        let open_until = self
            .open_until
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        open_until.is_some_and(|until| Instant::now() < until)
    }

    fn success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// Counts a failure; returns whether this one opened the circuit.
    fn failure(&self) -> bool {
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < FAILURES_TO_OPEN {
            return false;
        }
        self.consecutive_failures
            .store(FAILURES_TO_OPEN - 1, Ordering::Relaxed);
        let mut open_until = self
            .open_until
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *open_until = Some(Instant::now() + OPEN_FOR);
        true
    }
}

/// The value format in Redis, versioned so a later release can change it:
///
/// ```text
/// "PXGW" | version: u8 = 1 | stored_at: u64 ms since the epoch, big-endian
///        | SHA-256 of the body: 32 bytes
///        | status: u8 length + bytes | content type: u16 length (big-endian) + bytes | body
/// ```
///
/// A value with another magic or version, a short value, or a body whose hash does not match is
/// refused, as is a status this replica does not consider terminal.
pub mod envelope {
    use std::time::{SystemTime, UNIX_EPOCH};

    use http::HeaderValue;
    use ring::digest::{SHA256, digest};

    use crate::cache::CachedRun;
    use crate::run::status::RunStatuses;

    const MAGIC: &[u8; 4] = b"PXGW";
    const VERSION: u8 = 1;

    pub fn encode(run: &CachedRun, status_label: &str) -> Vec<u8> {
        let content_type = run.content_type();
        let status = &status_label.as_bytes()[..status_label.len().min(255)];
        let content_type = &content_type.as_bytes()[..content_type.len().min(u16::MAX as usize)];
        let stored_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX));
        let body = run.body();
        let mut value = Vec::with_capacity(64 + status.len() + content_type.len() + body.len());
        value.extend_from_slice(MAGIC);
        value.push(VERSION);
        value.extend_from_slice(&stored_at.to_be_bytes());
        value.extend_from_slice(digest(&SHA256, &body).as_ref());
        value.push(status.len() as u8);
        value.extend_from_slice(status);
        value.extend_from_slice(&(content_type.len() as u16).to_be_bytes());
        value.extend_from_slice(content_type);
        value.extend_from_slice(&body);
        value
    }

    pub fn decode(value: &[u8], statuses: &RunStatuses) -> Option<CachedRun> {
        let rest = value.strip_prefix(MAGIC)?;
        let (&version, rest) = rest.split_first()?;
        if version != VERSION {
            return None;
        }
        let (_stored_at, rest) = rest.split_at_checked(8)?;
        let (hash, rest) = rest.split_at_checked(32)?;
        let (&status_len, rest) = rest.split_first()?;
        let (status, rest) = rest.split_at_checked(usize::from(status_len))?;
        let (content_type_len, rest) = rest.split_at_checked(2)?;
        let content_type_len = usize::from(u16::from_be_bytes([content_type_len[0], content_type_len[1]]));
        let (content_type, body) = rest.split_at_checked(content_type_len)?;
        if digest(&SHA256, body).as_ref() != hash {
            return None;
        }
        let status = statuses.classify(std::str::from_utf8(status).ok()?);
        if !statuses.is_terminal(status) {
            return None;
        }
        let content_type = HeaderValue::from_bytes(content_type).ok()?;
        Some(CachedRun::terminal(body, content_type, status))
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::edge::response::APPLICATION_JSON;

        fn statuses() -> RunStatuses {
            RunStatuses::new(&["COMPLETED", "FAILED", "CLOSED"])
        }

        fn run() -> CachedRun {
            CachedRun::terminal(
                br#"{"id":"r1","status":"FAILED"}"#,
                APPLICATION_JSON,
                statuses().classify("FAILED"),
            )
        }

        #[test]
        fn a_run_survives_the_round_trip() {
            let decoded = decode(&encode(&run(), "FAILED"), &statuses()).expect("decodes");
            assert_eq!(decoded.body(), run().body());
            assert_eq!(decoded.etag(), run().etag());
            assert_eq!(decoded.content_type(), APPLICATION_JSON);
            assert_eq!(decoded.run_status(), Some(statuses().classify("FAILED")));
        }

        #[test]
        fn damaged_or_foreign_values_are_refused() {
            let good = encode(&run(), "FAILED");
            let mut flipped = good.clone();
            *flipped.last_mut().expect("body") ^= 1;
            let mut newer = good.clone();
            newer[4] = 2;
            for bad in [
                &b""[..],
                b"PXGW",
                &good[..good.len() / 2],
                &flipped,
                &newer,
                b"{\"id\":\"r1\",\"status\":\"FAILED\"}",
            ] {
                assert!(decode(bad, &statuses()).is_none(), "{bad:?}");
            }
        }

        #[test]
        fn a_status_this_replica_does_not_call_terminal_is_refused() {
            let value = encode(&run(), "FAILED");
            assert!(decode(&value, &RunStatuses::new(&["COMPLETED"])).is_none());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_opens_after_repeated_failures_and_closes_on_success() {
        let breaker = Breaker::default();
        for _ in 0..FAILURES_TO_OPEN - 1 {
            assert!(!breaker.failure());
        }
        assert!(!breaker.is_open());
        assert!(breaker.failure(), "the fifth failure opens it");
        assert!(breaker.is_open());
        breaker.success();
        *breaker.open_until.lock().expect("lock") = None;
        assert!(!breaker.is_open());
        assert!(!breaker.failure(), "a success reset the count");
    }
}

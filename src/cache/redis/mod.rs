//! The Redis tier (`[cache.shared]`): Redis behind the memory store, so replicas fetch each
//! finished run once.
//!
//! This module is the client: reads and writes of runs, each bounded by `timeout`. A failure counts
//! in `plextera_gateway_shared_cache_errors_total` and reads as "not there"; after repeated
//! failures the [`breaker`] stops calling Redis for a while, so Redis never breaks serving. Values
//! carry a small versioned [`envelope`]; anything that does not decode is a miss and is
//! overwritten. When a run is missing everywhere, the fetch [`lock`] elects one replica to fetch
//! it. The order of lookups and fills across memory and Redis is [`crate::cache::tiers`]'s.
//!
//! A rotated password ([`RedisTier::use_password`]) is proven on a connection of its own (a PING)
//! before it replaces the current connection; calls in flight finish on the old one, every call
//! after the swap uses the new one, and so does every pub/sub connection opened from then on (one
//! already subscribed stays authenticated as it was until it reconnects).

pub mod breaker;
pub mod envelope;
pub mod lease;
pub mod lock;
pub mod metrics;

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, Script};

use self::breaker::Breaker;
pub use self::lease::{Lease, Take};
pub use self::lock::{Election, Lock};
pub use self::metrics::{RedisMetrics, RedisOp, RedisWait};
use crate::cache::CachedRun;
use crate::config::{ConfigError, SharedCacheConfig};
use crate::run::id::RunId;
use crate::run::status::RunStatuses;

/// The connection calls share, and the client it came from (for connections of their own, such
/// as pub/sub).
struct Connections {
    manager: ConnectionManager,
    client: redis::Client,
}

impl Connections {
    /// A client for `url` with `password`; the manager connects on first use.
    fn open(
        url: &str,
        password: Option<String>,
        manager_config: &ConnectionManagerConfig,
    ) -> redis::RedisResult<Self> {
        let client = client_for(url, password.as_deref())?;
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())?;
        Ok(Self { manager, client })
    }
}

/// The Redis client for `url` with `password`, no connection made: what the tier opens, and what
/// `--check-config` builds to check `cache.shared.url` ([`crate::preflight`]).
pub(crate) fn client_for(url: &str, password: Option<&str>) -> redis::RedisResult<redis::Client> {
    let mut info = url.into_connection_info()?;
    if let Some(password) = password {
        let settings = info.redis_settings().clone().set_password(password);
        info = info.set_redis_settings(settings);
    }
    redis::Client::open(info)
}

/// Why a rotated Redis password was not taken into use (the current one is kept).
#[derive(Debug, thiserror::Error)]
pub enum PasswordRefused {
    #[error("Redis refused the connection made with it ({0})")]
    Refused(String),
    #[error("no answer from Redis within {0:?}")]
    TimedOut(Duration),
}

/// What a lookup found.
pub enum Lookup {
    Hit(CachedRun),
    Miss,
    /// Redis failed, timed out, or the circuit is open.
    Unavailable,
}

/// The least time a new password's proving PING is given.
const PASSWORD_PROOF_MIN_WAIT: Duration = Duration::from_secs(1);

/// The Redis client, its settings and its circuit breaker. Cheap to clone.
#[derive(Clone)]
pub struct RedisTier {
    inner: Arc<Inner>,
}

struct Inner {
    /// The multiplexed connection and its client; replaced whole when the password is rotated.
    connections: ArcSwap<Connections>,
    /// The URL and settings every connection is made with (the password aside).
    url: String,
    manager_config: ConnectionManagerConfig,
    lease_scripts: lease::LeaseScripts,
    prefix: String,
    ttl: Duration,
    timeout: Duration,
    lock_wait: Duration,
    /// How long a lock lives if its holder dies without releasing it.
    lock_ttl: Duration,
    release: Script,
    breaker: Breaker,
    metrics: RedisMetrics,
    /// The terminal statuses: what a value may hold, and its status label.
    statuses: RunStatuses,
}

impl RedisTier {
    /// Builds the client; it connects lazily, so start-up does not depend on Redis being up.
    pub fn new(
        config: &SharedCacheConfig,
        password: Option<String>,
        default_ttl: Duration,
        upstream_timeout: Duration,
        metrics: RedisMetrics,
        statuses: RunStatuses,
    ) -> Result<Self, ConfigError> {
        let invalid = |error: redis::RedisError| {
            ConfigError::Invalid(crate::config::report::about(
                "cache.shared.url",
                format_args!("cannot be used ({:?})", error.kind()),
            ))
        };
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1);
        let connections = Connections::open(&config.url, password, &manager_config).map_err(invalid)?;
        Ok(Self {
            inner: Arc::new(Inner {
                connections: ArcSwap::from_pointee(connections),
                url: config.url.clone(),
                manager_config,
                lease_scripts: lease::LeaseScripts::default(),
                prefix: config.key_prefix.clone(),
                ttl: config.ttl.unwrap_or(default_ttl),
                timeout: config.timeout,
                lock_wait: config.lock_wait,
                lock_ttl: upstream_timeout + Duration::from_secs(1),
                release: Script::new(
                    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end",
                ),
                breaker: Breaker::new(config.circuit_open_for),
                metrics,
                statuses,
            }),
        })
    }

    /// Connects with `password` and, once Redis has answered a PING on that connection, makes it
    /// the one every call uses from then on. On failure the current connection stays in use.
    pub async fn use_password(&self, password: String) -> Result<(), PasswordRefused> {
        let refused = |error: redis::RedisError| PasswordRefused::Refused(format!("{:?}", error.kind()));
        let connections = Connections::open(&self.inner.url, Some(password), &self.inner.manager_config)
            .map_err(refused)?;
        // A new connection: allow for its handshake (TLS too) beside the call itself.
        let patience = (self.inner.timeout * 4).max(PASSWORD_PROOF_MIN_WAIT);
        let mut manager = connections.manager.clone();
        let ping = redis::cmd("PING");
        match tokio::time::timeout(patience, ping.query_async::<String>(&mut manager)).await {
            Ok(Ok(_)) => {
                self.inner.connections.store(Arc::new(connections));
                Ok(())
            }
            Ok(Err(error)) => Err(refused(error)),
            Err(_) => Err(PasswordRefused::TimedOut(patience)),
        }
    }

    /// The connection calls use now.
    pub(super) fn connection(&self) -> ConnectionManager {
        self.inner.connections.load().manager.clone()
    }

    fn run_key(&self, id: &RunId) -> String {
        format!("{}run:{id}", self.inner.prefix)
    }

    /// Looks the run up in Redis.
    pub async fn get(&self, id: &RunId) -> Lookup {
        let key = self.run_key(id);
        let value: Option<Vec<u8>> = match self.call(RedisOp::Get, redis::cmd("GET").arg(&key)).await {
            Some(value) => value,
            None => return Lookup::Unavailable,
        };
        let Some(value) = value else {
            self.inner.metrics.misses.inc();
            return Lookup::Miss;
        };
        match envelope::decode(&value, &self.inner.statuses) {
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

    /// Writes an ended run to Redis, with the tier's ttl (a run with no status is not written).
    pub async fn put(&self, id: &RunId, run: &CachedRun) {
        let Some(status) = run.run_status() else {
            return;
        };
        let value = envelope::encode(run, self.inner.statuses.label(status));
        let ttl_ms = u64::try_from(self.inner.ttl.as_millis()).unwrap_or(u64::MAX);
        let command = redis::cmd("SET")
            .arg(self.run_key(id))
            .arg(value)
            .arg("PX")
            .arg(ttl_ms)
            .clone();
        if self.call::<()>(RedisOp::Set, &command).await.is_some() {
            self.inner.metrics.writes.inc();
        }
    }

    /// Deletes the run from Redis (a purge): `Some(true)` when Redis held it, `None` when Redis
    /// could not be asked.
    pub async fn delete(&self, id: &RunId) -> Option<bool> {
        let command = redis::cmd("DEL").arg(self.run_key(id)).clone();
        let deleted: i64 = self.call(RedisOp::Purge, &command).await?;
        Some(deleted > 0)
    }

    /// Runs one command within the timeout and through the breaker; `None` on any failure.
    pub(super) async fn call<T: redis::FromRedisValue>(
        &self,
        op: RedisOp,
        command: &redis::Cmd,
    ) -> Option<T> {
        if self.inner.breaker.is_open() {
            return None;
        }
        let mut redis = self.connection();
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

    /// Runs one script within the timeout and through the breaker; `None` on any failure.
    pub(super) async fn invoke<T: redis::FromRedisValue>(
        &self,
        op: RedisOp,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Option<T> {
        if self.inner.breaker.is_open() {
            return None;
        }
        let mut redis = self.connection();
        let started = Instant::now();
        let outcome =
            tokio::time::timeout(self.inner.timeout, invocation.invoke_async::<T>(&mut redis)).await;
        self.inner.metrics.observe(op, started.elapsed());
        let succeeded = matches!(outcome, Ok(Ok(_)));
        self.record(succeeded);
        outcome.ok()?.ok()
    }

    /// Whether Redis is being called (the circuit is closed).
    pub fn is_available(&self) -> bool {
        !self.inner.breaker.is_open()
    }

    /// The bound on every Redis call.
    pub fn timeout(&self) -> std::time::Duration {
        self.inner.timeout
    }

    pub(super) fn record(&self, succeeded: bool) {
        if succeeded {
            self.inner.breaker.success();
        } else {
            self.inner.metrics.errors.inc();
            if self.inner.breaker.failure() {
                tracing::warn!(pause = ?self.inner.breaker.open_for(), "Redis keeps failing: serving without it for a while");
            }
        }
        self.inner
            .metrics
            .circuit_open
            .set(i64::from(self.inner.breaker.is_open()));
    }
}

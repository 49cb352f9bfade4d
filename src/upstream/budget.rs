//! The upstream budget: how many calls may go upstream, how fast, and when none may.
//!
//! Three limits guard the account's rate limit, checked in this order before every upstream call:
//! 1. the **cooldown**: after upstream answered 429, no call goes out until its `Retry-After` has
//!    passed (shared by all runs: the limit is the account's, not a run's);
//! 2. `max_concurrent_requests`: calls in flight at once (a semaphore);
//! 3. `max_requests_per_second`: a token bucket (GCRA, via `governor`) with a burst of one, so calls
//!    are spread evenly and any one-second window holds at most the rate (plus the one at its edge).
//!
//! A call waits for 2 and 3 at most `queue_timeout` in total; if the wait would be longer it is
//! refused at once with how long to wait, which the client gets as `Retry-After`. Only upstream
//! calls pass through here: hits and coalesced waiters never spend budget.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::MonotonicClock;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::UpstreamConfig;

/// Longest cooldown honoured, whatever `Retry-After` says.
pub const MAX_COOLDOWN: Duration = Duration::from_secs(3600);
/// Cooldown after a 429 that carries no usable `Retry-After`.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(1);

type Limiter = RateLimiter<NotKeyed, InMemoryState, MonotonicClock>;

/// Why a call may not go upstream now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The gateway's own limits are spent for longer than `queue_timeout`.
    Exhausted { retry_after: Duration },
    /// Upstream asked for a pause (429) that has not ended.
    CoolingDown { retry_after: Duration },
}

/// Permission for one upstream call; holds a concurrency slot until dropped.
#[derive(Debug)]
pub struct Admission {
    _slot: Option<OwnedSemaphorePermit>,
}

/// The shared budget. Cheap to clone.
#[derive(Clone)]
pub struct Budget {
    rate: Option<Arc<Limiter>>,
    slots: Option<Arc<Semaphore>>,
    queue_timeout: Duration,
    cooldown_until: Arc<Mutex<Option<Instant>>>,
}

impl Budget {
    pub fn new(config: &UpstreamConfig) -> Self {
        let rate = config.max_requests_per_second.and_then(|per_second| {
            Quota::with_period(Duration::from_secs_f64(1.0 / per_second)).map(|quota| {
                Arc::new(RateLimiter::direct_with_clock(
                    quota.allow_burst(NonZeroU32::MIN),
                    MonotonicClock,
                ))
            })
        });
        Self {
            rate,
            slots: config
                .max_concurrent_requests
                .map(|slots| Arc::new(Semaphore::new(slots.get()))),
            queue_timeout: config.queue_timeout,
            cooldown_until: Arc::default(),
        }
    }

    /// Waits (at most `queue_timeout`) until a call may go upstream.
    pub async fn admit(&self) -> Result<Admission, Refusal> {
        self.check_cooldown()?;
        let deadline = tokio::time::Instant::now() + self.queue_timeout;
        let slot = match &self.slots {
            None => None,
            Some(slots) => Some(
                tokio::time::timeout_at(deadline, Arc::clone(slots).acquire_owned())
                    .await
                    .map_err(|_| Refusal::Exhausted {
                        retry_after: Duration::from_secs(1),
                    })?
                    .expect("the budget never closes its semaphore"),
            ),
        };
        if let Some(rate) = &self.rate {
            while let Err(not_until) = rate.check() {
                let wait = not_until.wait_time_from(Instant::now());
                if tokio::time::Instant::now() + wait > deadline {
                    return Err(Refusal::Exhausted { retry_after: wait });
                }
                tokio::time::sleep(wait).await;
            }
        }
        // Upstream may have said 429 while this call was queued.
        self.check_cooldown()?;
        Ok(Admission { _slot: slot })
    }

    /// Starts (or extends) the shared cooldown after an upstream 429.
    pub fn cool_down(&self, retry_after: Duration) {
        let until = Instant::now() + retry_after.min(MAX_COOLDOWN);
        let mut cooldown = self
            .cooldown_until
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if cooldown.is_none_or(|current| current < until) {
            *cooldown = Some(until);
        }
    }

    /// Time left in the cooldown, zero when there is none.
    pub fn cooldown_remaining(&self) -> Duration {
        let cooldown = self
            .cooldown_until
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        cooldown.map_or(Duration::ZERO, |until| {
            until.saturating_duration_since(Instant::now())
        })
    }

    fn check_cooldown(&self) -> Result<(), Refusal> {
        match self.cooldown_remaining() {
            Duration::ZERO => Ok(()),
            retry_after => Err(Refusal::CoolingDown { retry_after }),
        }
    }
}

/// Reads `Retry-After` as delta-seconds or an HTTP date.
pub fn parse_retry_after(value: &http::HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let date = httpdate::parse_http_date(text).ok()?;
    Some(
        date.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Whole seconds for a `Retry-After` header, rounded up and never 0.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    seconds.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn budget(configure: impl FnOnce(&mut UpstreamConfig)) -> Budget {
        let mut config = UpstreamConfig::default();
        configure(&mut config);
        Budget::new(&config)
    }

    #[tokio::test]
    async fn no_limits_admit_everything_at_once() {
        let budget = budget(|_| {});
        for _ in 0..1000 {
            budget.admit().await.expect("admitted");
        }
    }

    #[tokio::test]
    async fn a_spent_rate_refuses_when_the_wait_exceeds_the_queue_timeout() {
        let budget = budget(|config| {
            config.max_requests_per_second = Some(1.0);
            config.queue_timeout = Duration::from_millis(10);
        });
        budget.admit().await.expect("the first call is free");
        match budget.admit().await {
            Err(Refusal::Exhausted { retry_after }) => {
                assert!(retry_after > Duration::from_millis(900) && retry_after <= Duration::from_secs(1));
            }
            other => panic!("expected exhaustion, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn concurrency_slots_are_returned_on_drop() {
        let budget = budget(|config| {
            config.max_concurrent_requests = std::num::NonZeroUsize::new(1);
            config.queue_timeout = Duration::from_millis(10);
        });
        let first = budget.admit().await.expect("a free slot");
        assert!(matches!(budget.admit().await, Err(Refusal::Exhausted { .. })));
        drop(first);
        budget.admit().await.expect("the slot came back");
    }

    #[tokio::test]
    async fn a_cooldown_refuses_until_it_ends_and_only_grows() {
        let budget = budget(|_| {});
        budget.cool_down(Duration::from_secs(30));
        budget.cool_down(Duration::from_secs(5));
        match budget.admit().await {
            Err(Refusal::CoolingDown { retry_after }) => assert!(retry_after > Duration::from_secs(29)),
            other => panic!("expected a cooldown, got {other:?}"),
        }
        budget.cool_down(Duration::from_secs(100_000));
        assert!(budget.cooldown_remaining() <= MAX_COOLDOWN);
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("17")),
            Some(Duration::from_secs(17))
        );
        let in_a_minute = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(60));
        let parsed = parse_retry_after(&HeaderValue::from_str(&in_a_minute).expect("header")).expect("date");
        assert!(parsed > Duration::from_secs(55) && parsed <= Duration::from_secs(60));
        assert_eq!(parse_retry_after(&HeaderValue::from_static("soon")), None);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1500)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
    }
}

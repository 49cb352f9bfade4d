//! The Redis tier's circuit breaker: after repeated failures, stop calling Redis for a while.
//!
//! Redis must never slow serving down: while it is failing, every call would cost the full
//! timeout. The breaker opens after [`FAILURES_TO_OPEN`] consecutive failures, for its pause
//! (`cache.shared.circuit_open_for`);
//! then lets calls through again (the next failure reopens it at once, a success closes it).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Consecutive failures that open the circuit.
pub const FAILURES_TO_OPEN: u32 = 5;

pub struct Breaker {
    open_for: Duration,
    consecutive_failures: AtomicU32,
    open_until: Mutex<Option<Instant>>,
}

impl Breaker {
    /// A closed breaker that stays open for `open_for` once it opens.
    pub fn new(open_for: Duration) -> Self {
        Self {
            open_for,
            consecutive_failures: AtomicU32::new(0),
            open_until: Mutex::new(None),
        }
    }

    /// How long it stays open once it opens.
    pub fn open_for(&self) -> Duration {
        self.open_for
    }

    pub fn is_open(&self) -> bool {
        let open_until = self
            .open_until
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        open_until.is_some_and(|until| Instant::now() < until)
    }

    pub fn success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// Counts a failure; returns whether this one opened the circuit.
    pub fn failure(&self) -> bool {
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
        *open_until = Some(Instant::now() + self.open_for);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_opens_after_repeated_failures_and_lets_calls_through_after_its_pause() {
        let pause = Duration::from_millis(300);
        let breaker = Breaker::new(pause);
        for _ in 0..FAILURES_TO_OPEN - 1 {
            assert!(!breaker.failure());
        }
        assert!(!breaker.is_open());
        assert!(breaker.failure(), "the fifth failure opens it");
        assert!(breaker.is_open());
        // The pause is what is under test: let it pass.
        std::thread::sleep(pause + Duration::from_millis(50));
        assert!(!breaker.is_open(), "closed once its pause has passed");
        assert!(breaker.failure(), "the next failure reopens it at once");
        assert!(breaker.is_open());
        std::thread::sleep(pause + Duration::from_millis(50));
        breaker.success();
        for _ in 0..FAILURES_TO_OPEN - 1 {
            assert!(!breaker.failure(), "a success reset the count");
        }
    }
}

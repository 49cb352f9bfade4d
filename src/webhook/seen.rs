//! Event ids already acted on, so a redelivered event (Plextera may send one more than once, and
//! retries with backoff) is acknowledged and does nothing.
//!
//! Kept at least [`KEPT_FOR`] (Plextera's redeliveries end well before), bounded in entries so a
//! flood of signed events cannot grow it without end: past [`MAX_IDS`], moka evicts the least
//! valuable (an id evicted early could act twice, which a confirming call makes harmless: the ended
//! run is in the cache by then). An id is kept as its 128-bit xxh3 hash, so every entry costs the
//! same whatever the id's length (up to 256 bytes).

use std::time::Duration;

use moka::future::Cache;

/// How long an event id is remembered.
pub const KEPT_FOR: Duration = Duration::from_secs(72 * 3600);
/// Most ids remembered: about 370 bytes each with moka's bookkeeping (measured: 250,000 ids took
/// 88 MiB), so at most about 36 MiB. Plextera sends one event per run end: this holds 72 h of one
/// event every 2.6 s; past that, the oldest go first.
pub const MAX_IDS: u64 = 100_000;

/// What an id is remembered by, here and in the shared Redis tier.
pub fn key(id: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(id.as_bytes())
}

/// The ids seen. Cheap to clone.
#[derive(Clone)]
pub struct SeenEvents {
    ids: Cache<u128, ()>,
}

impl Default for SeenEvents {
    fn default() -> Self {
        Self::new(MAX_IDS, KEPT_FOR)
    }
}

impl SeenEvents {
    pub fn new(max_ids: u64, kept_for: Duration) -> Self {
        Self {
            ids: Cache::builder()
                .max_capacity(max_ids)
                .time_to_live(kept_for)
                .build(),
        }
    }

    /// Records `id`; whether it is the first time (atomically: of two deliveries at once, one is).
    pub async fn first_time(&self, id: &str) -> bool {
        self.ids.entry(key(id)).or_insert(()).await.is_fresh()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_id_is_new_once() {
        let seen = SeenEvents::default();
        assert!(seen.first_time("evt_1").await);
        assert!(!seen.first_time("evt_1").await);
        assert!(seen.first_time("evt_2").await);
    }

    #[tokio::test]
    async fn of_deliveries_at_once_exactly_one_is_first() {
        let seen = SeenEvents::default();
        let deliveries: Vec<_> = (0..32)
            .map(|_| {
                let seen = seen.clone();
                tokio::spawn(async move { seen.first_time("evt_same").await })
            })
            .collect();
        let mut first = 0;
        for delivery in deliveries {
            first += usize::from(delivery.await.expect("task"));
        }
        assert_eq!(first, 1);
    }
}

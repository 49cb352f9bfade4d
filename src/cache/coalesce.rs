//! Single flight: concurrent requests for one key share one piece of work.
//!
//! The first caller for a key (the leader) starts the work as a spawned task; callers that arrive
//! while it runs (waiters) await the same result. Because the work is a task of its own, no
//! caller's disconnect cancels it: the others still get their answer and a terminal run still gets
//! stored. The key leaves the in-flight map when the work ends, inside the task and before anyone
//! is woken, so a later caller never joins finished work: it starts anew, or finds what the work
//! stored. A failed result is shared like any other and is never reused.
//!
//! The result is handed over in one shared cell (`tokio::sync::SetOnce`) that the task fills and
//! everyone waits on: the work costs the task and the cell, nothing per waiter.
//!
//! Work is started at a *generation* the caller names (in the proxy: the purge count), and a
//! caller only joins work started at its own generation or a later one. Work from an older
//! generation may bring back what the change between the two generations was meant to drop (a
//! purged run), so a caller from a newer generation leads work of its own instead and takes the
//! key over; the older work carries on for those who had joined it. Checking costs one integer
//! comparison.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use prometheus::IntGauge;
use tokio::sync::SetOnce;

/// Whether this caller started the work or joined it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Waiter,
}

/// The work's task panicked; nobody got a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the shared work panicked")]
pub struct Panicked;

/// Where the work's result lands, shared by the task and everyone waiting.
type InFlight<V> = Arc<SetOnce<Result<V, Panicked>>>;

/// The work in flight for a key: where its result lands, and the generation it started at.
struct Flight<V> {
    generation: u64,
    result: InFlight<V>,
}

/// Keys in flight. foldhash, seeded per process: a key is only in the map while its work runs.
type InFlightMap<K, V> = HashMap<K, Flight<V>, foldhash::fast::RandomState>;

/// An in-flight map from key to shared work.
pub struct Coalescer<K, V> {
    in_flight: Arc<Mutex<InFlightMap<K, V>>>,
    /// Callers currently waiting on someone else's work.
    waiting: IntGauge,
}

impl<K, V> Coalescer<K, V>
where
    K: Hash + Eq + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// `waiting` is kept at the number of waiters currently parked.
    pub fn new(waiting: IntGauge) -> Self {
        Self {
            in_flight: Arc::default(),
            waiting,
        }
    }

    /// Runs the work `start` makes for `key` unless work for the same key started at
    /// `generation` or later is already in flight, in which case it waits for that work's result
    /// instead. Work in flight from an older generation is not joined: this caller leads new work,
    /// which later callers join. `start` is only called when this caller leads, and its future is
    /// made inside the task: a waiter never holds it, and a large future is not moved around to
    /// get there. A waiter drops `start` (and whatever it captured) as it joins, not when the work
    /// ends.
    pub async fn run<S, F>(&self, key: K, generation: u64, start: S) -> (Result<V, Panicked>, Role)
    where
        S: FnOnce() -> F + Send + 'static,
        F: Future<Output = V> + Send + 'static,
    {
        let mut start = Some(start);
        let (result, role) = {
            let mut in_flight = self.lock();
            match in_flight.get(&key) {
                Some(flight) if flight.generation >= generation => (Arc::clone(&flight.result), Role::Waiter),
                // None in flight, or only work from before `generation`: it keeps running for
                // those who joined it, and its end leaves the new work's key alone.
                _ => {
                    let result = InFlight::default();
                    let start = start.take().expect("taken only here");
                    self.spawn(key.clone(), start, Arc::clone(&result));
                    let flight = Flight {
                        generation,
                        result: Arc::clone(&result),
                    };
                    in_flight.insert(key, flight);
                    (result, Role::Leader)
                }
            }
        };
        // A waiter lets go of the work it would have started, and of what that holds, at once.
        drop(start);
        let _parked = (role == Role::Waiter).then(|| Parked::new(&self.waiting));
        (result.wait().await.clone(), role)
    }

    /// Keys with work in flight.
    pub fn in_flight(&self) -> usize {
        self.lock().len()
    }

    fn spawn<S, F>(&self, key: K, start: S, result: InFlight<V>)
    where
        S: FnOnce() -> F + Send + 'static,
        F: Future<Output = V> + Send + 'static,
    {
        let release = Release {
            in_flight: Arc::clone(&self.in_flight),
            key,
            result,
        };
        tokio::spawn(async move {
            let value = start().await;
            release.finish(value);
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, InFlightMap<K, V>> {
        self.in_flight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Ends the work: removes the key from the in-flight map (unless newer work took it over), then
/// hands out the result. Dropped
/// without [`Release::finish`] (the work panicked, or the runtime is shutting down), it hands out
/// [`Panicked`].
struct Release<K: Hash + Eq, V> {
    in_flight: Arc<Mutex<InFlightMap<K, V>>>,
    key: K,
    result: InFlight<V>,
}

impl<K: Hash + Eq, V> Release<K, V> {
    fn finish(self, value: V) {
        self.remove_key();
        // Only this task sets the result, so it is still empty.
        let _ = self.result.set(Ok(value));
    }

    fn remove_key(&self) {
        let mut in_flight = self
            .in_flight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if in_flight
            .get(&self.key)
            .is_some_and(|flight| Arc::ptr_eq(&flight.result, &self.result))
        {
            in_flight.remove(&self.key);
        }
    }
}

impl<K: Hash + Eq, V> Drop for Release<K, V> {
    fn drop(&mut self) {
        if !self.result.initialized() {
            self.remove_key();
            let _ = self.result.set(Err(Panicked));
        }
    }
}

/// Counts a waiter for as long as it waits (including when its client goes away).
struct Parked<'a>(&'a IntGauge);

impl<'a> Parked<'a> {
    fn new(gauge: &'a IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::oneshot;

    fn coalescer() -> Coalescer<&'static str, usize> {
        Coalescer::new(IntGauge::new("waiting", "test").expect("gauge"))
    }

    /// Leads the work for `"k"` in a task of its own; the work waits for `released`, then ends
    /// with `finish`. Returns once the key is in flight.
    async fn held_leader(
        coalescer: &Arc<Coalescer<&'static str, usize>>,
        released: oneshot::Receiver<()>,
        finish: impl FnOnce() -> usize + Send + 'static,
    ) -> tokio::task::JoinHandle<(Result<usize, Panicked>, Role)> {
        let coalescer_for_leader = Arc::clone(coalescer);
        let leader = tokio::spawn(async move {
            coalescer_for_leader
                .run("k", 0, move || async move {
                    let _ = released.await;
                    finish()
                })
                .await
        });
        while coalescer.in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        leader
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_run_of_the_work() {
        let coalescer = Arc::new(coalescer());
        let runs = Arc::new(AtomicUsize::new(0));
        let (release, released) = oneshot::channel::<()>();
        let leader_runs = Arc::clone(&runs);
        let leader = held_leader(&coalescer, released, move || {
            leader_runs.fetch_add(1, Ordering::SeqCst) + 41
        })
        .await;
        let waiters: Vec<_> = (0..10)
            .map(|_| {
                let (coalescer, runs) = (Arc::clone(&coalescer), Arc::clone(&runs));
                tokio::spawn(async move {
                    coalescer
                        .run("k", 0, move || async move { runs.fetch_add(1, Ordering::SeqCst) })
                        .await
                })
            })
            .collect();
        while coalescer.waiting.get() < 10 {
            tokio::task::yield_now().await;
        }
        release.send(()).expect("leader waiting");
        assert_eq!(leader.await.expect("leader"), (Ok(41), Role::Leader));
        for waiter in waiters {
            assert_eq!(waiter.await.expect("waiter"), (Ok(41), Role::Waiter));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(coalescer.in_flight(), 0);
        assert_eq!(coalescer.waiting.get(), 0);
    }

    #[tokio::test]
    async fn finished_work_is_not_reused() {
        let coalescer = coalescer();
        assert_eq!(coalescer.run("k", 0, || async { 1 }).await, (Ok(1), Role::Leader));
        assert_eq!(coalescer.run("k", 0, || async { 2 }).await, (Ok(2), Role::Leader));
    }

    #[tokio::test]
    async fn work_from_an_older_generation_is_not_joined() {
        let coalescer = Arc::new(coalescer());
        let (release_old, released_old) = oneshot::channel::<()>();
        let old = held_leader(&coalescer, released_old, || 1).await;
        // Generation 1 (after a purge) leads work of its own rather than wait for generation 0's.
        let (release_new, released_new) = oneshot::channel::<()>();
        let (started_tx, started) = oneshot::channel::<()>();
        let new = {
            let coalescer = Arc::clone(&coalescer);
            tokio::spawn(async move {
                coalescer
                    .run("k", 1, move || async move {
                        let _ = started_tx.send(());
                        let _ = released_new.await;
                        2
                    })
                    .await
            })
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), started)
            .await
            .expect("the newer caller starts work of its own")
            .expect("started");
        assert_eq!(coalescer.waiting.get(), 0);
        // The old work ending leaves the key to the new work, which later callers of either
        // generation join.
        release_old.send(()).expect("old work waiting");
        assert_eq!(old.await.expect("old leader"), (Ok(1), Role::Leader));
        assert_eq!(coalescer.in_flight(), 1, "the new work keeps its key");
        let joiners: Vec<_> = [0, 1]
            .into_iter()
            .map(|generation| {
                let coalescer = Arc::clone(&coalescer);
                tokio::spawn(async move { coalescer.run("k", generation, || async { 3 }).await })
            })
            .collect();
        while coalescer.waiting.get() < 2 {
            tokio::task::yield_now().await;
        }
        release_new.send(()).expect("new work waiting");
        assert_eq!(new.await.expect("new leader"), (Ok(2), Role::Leader));
        for joiner in joiners {
            assert_eq!(joiner.await.expect("joiner"), (Ok(2), Role::Waiter));
        }
        assert_eq!(coalescer.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_cancelled_leader_does_not_cancel_the_work() {
        let coalescer = Arc::new(coalescer());
        let (release, released) = oneshot::channel::<()>();
        let (done_tx, done_rx) = oneshot::channel::<()>();
        let leader = held_leader(&coalescer, released, move || {
            let _ = done_tx.send(());
            7
        })
        .await;
        leader.abort();
        let _ = leader.await;
        release.send(()).expect("work still waiting");
        done_rx.await.expect("the work ran to the end");
    }

    #[tokio::test]
    async fn a_panic_is_shared_and_the_key_released() {
        let coalescer = Arc::new(coalescer());
        let (release, released) = oneshot::channel::<()>();
        let leader = held_leader(&coalescer, released, || panic!("boom")).await;
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let coalescer = Arc::clone(&coalescer);
                tokio::spawn(async move { coalescer.run("k", 0, || async { 9 }).await })
            })
            .collect();
        while coalescer.waiting.get() < 3 {
            tokio::task::yield_now().await;
        }
        release.send(()).expect("the work is waiting");
        assert_eq!(leader.await.expect("leader"), (Err(Panicked), Role::Leader));
        for waiter in waiters {
            assert_eq!(
                waiter.await.expect("waiter"),
                (Err(Panicked), Role::Waiter),
                "every waiter shares the panic, none runs its own work"
            );
        }
        assert_eq!(coalescer.in_flight(), 0);
        assert_eq!(coalescer.waiting.get(), 0);
        assert_eq!(coalescer.run("k", 0, || async { 3 }).await.0, Ok(3));
    }

    #[tokio::test]
    async fn a_waiter_lets_go_of_what_its_work_would_have_held_as_it_joins() {
        let coalescer = Arc::new(coalescer());
        let (release, released) = oneshot::channel::<()>();
        let leader = held_leader(&coalescer, released, || 1).await;
        // What the waiter's unused work captured (in the proxy: a connection's work slot).
        let held = Arc::new(());
        let captured = Arc::clone(&held);
        let waiter = {
            let coalescer = Arc::clone(&coalescer);
            tokio::spawn(async move {
                coalescer
                    .run("k", 0, move || async move {
                        drop(captured);
                        2
                    })
                    .await
            })
        };
        while coalescer.waiting.get() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            Arc::strong_count(&held),
            1,
            "released while the leader's work still runs"
        );
        let _ = release.send(());
        assert_eq!(waiter.await.expect("waiter").0, Ok(1));
        assert_eq!(leader.await.expect("leader").0, Ok(1));
    }
}

//! One client connection's bounds: how long it may go without a request, how long an answer may
//! stall, how much upstream work its requests may leave running, and when it has reset too much.
//!
//! hyper bounds one thing by itself, a partial HTTP/1 request head. A connection that sends
//! nothing, or part of the HTTP/2 preface, or the preface and then nothing, or that stops reading
//! its answers, would be held forever, and an HTTP/2 client that resets each stream as it opens
//! it would leave an upstream call running per reset. So every connection gets a [`Connection`]:
//! counters the request path updates with a few atomic operations ([`track`], [`io`]), read by one
//! watchdog ([`Connection::watch`], in the connection's own task) that decides when it must close:
//!
//! - **idle**: no request being handled, no answer being sent and no write waiting on the socket
//!   for `header_read_timeout`, counted from the connection's start or its last answer. Before
//!   protocol detection, mid-head, or after an answer, HTTP/1 and HTTP/2 alike. Closed gracefully
//!   (HTTP/2 clients get GOAWAY), cut if that has not finished within [`CLOSE_GRACE`];
//! - **write timeout**: a write waiting on the socket, or an HTTP/2 answer waiting for flow-control
//!   window, for `write_timeout`: cut at once, since nothing more can be sent on it anyway;
//! - **resets**: more requests cancelled by the client before their answer than
//!   `max(100, http2_max_concurrent_streams)`, and more than half of all its requests (Envoy's
//!   rule for premature resets): closed with GOAWAY;
//! - **shed**: asked by the acceptor when every slot is taken and a new connection arrives; the
//!   longest-idle connection makes room, as nginx closes idle keep-alive connections when it runs
//!   out of them.
//!
//! Upstream work a request started holds one of its connection's [`WorkSlot`]s until the work
//! ends, even after the client reset the stream or closed the connection, so a connection never
//! has more upstream calls in flight than it may have streams, and the connection's own slot
//! (`max_connections`) is given back only when the last of its work has ended.
//!
//! Why one long module: the watchdog's rules read the same counters and decide together (idle and
//! shed both mean "nothing in flight"), so they stay side by side; the per-request bookkeeping
//! ([`track`]), the socket wrapper ([`io`]) and the series ([`metrics`]) are split out.

pub mod io;
pub mod metrics;
pub mod track;

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use slab::Slab;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::ops::metrics::family::Label;

/// How long a graceful close may take (an HTTP/2 client acknowledging GOAWAY, an HTTP/1 answer
/// finishing) before the connection is cut.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Requests a connection may cancel before its share of cancelled requests is looked at.
const MIN_RESETS_BEFORE_CLOSE: u64 = 100;
/// `write_blocked_since` when no write is waiting.
const NOT_BLOCKED: u64 = u64::MAX;

/// What one listener allows each of its connections.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time to complete a request head, from the start and from the last answer.
    pub header_read_timeout: Duration,
    /// Time an answer may make no progress.
    pub write_timeout: Duration,
    /// Concurrent HTTP/2 streams, and upstream calls in flight, per connection.
    pub max_streams: u32,
}

/// Why the gateway closed a connection on its own account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CloseReason {
    /// No request head within `header_read_timeout`.
    Idle = 1,
    /// An answer made no progress for `write_timeout`.
    WriteTimeout,
    /// The client kept cancelling its requests.
    Resets,
    /// Closed while idle to make room for a new connection.
    Shed,
    /// The listener is shutting down; not the connection's doing, and not counted.
    Drain,
}

impl Label for CloseReason {
    /// Every reason the connection's own behaviour causes: a drain is not counted.
    const ALL: &'static [Self] = &[Self::Idle, Self::WriteTimeout, Self::Resets, Self::Shed];

    /// The `reason` label.
    fn label(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::WriteTimeout => "write_timeout",
            Self::Resets => "resets",
            Self::Shed => "shed",
            Self::Drain => "drain",
        }
    }
}

impl CloseReason {
    fn from_u8(value: u8) -> Option<Self> {
        <Self as Label>::ALL
            .iter()
            .copied()
            .chain([Self::Drain])
            .find(|reason| *reason as u8 == value)
    }
}

/// The shared state of one client connection. See the module documentation.
pub struct Connection {
    limits: Limits,
    /// The clock every field below counts milliseconds from.
    born: Instant,
    /// Requests being handled plus answers being sent: zero means idle.
    busy: AtomicUsize,
    /// When a request or an answer last ended (`busy` may have fallen to zero then).
    idle_since: AtomicU64,
    /// HTTP/2 answers being sent, each with when it last began or handed over a piece: each is
    /// timed on its own, so answers that progress cannot cover for one that is starved.
    answers: Mutex<Slab<u64>>,
    /// Since when a write has been waiting on the socket; [`NOT_BLOCKED`] when none is.
    write_blocked_since: AtomicU64,
    /// Set by the first HTTP/2 request: flow-control stalls are HTTP/2's alone.
    http2: AtomicBool,
    /// Requests begun, and those the client cancelled before their answer (the reset rule).
    requests: AtomicU64,
    cancelled: AtomicU64,
    /// A [`CloseReason`] asked for from outside the watchdog (0: none), and its wake-up.
    close_requested: AtomicU8,
    close: Notify,
    /// Upstream work in flight for this connection's requests.
    work: Arc<Semaphore>,
    /// The listener's connection slot, given back when the last reference goes.
    _slot: OwnedSemaphorePermit,
    /// The client's address, for the access log and spans.
    peer: Option<std::net::SocketAddr>,
}

impl Connection {
    /// A connection that just opened, holding `slot` until it and its work are gone.
    pub fn new(limits: Limits, slot: OwnedSemaphorePermit) -> Arc<Self> {
        Self::with_peer(limits, slot, None)
    }

    /// [`Connection::new`], from the client at `peer`.
    pub fn with_peer(
        limits: Limits,
        slot: OwnedSemaphorePermit,
        peer: Option<std::net::SocketAddr>,
    ) -> Arc<Self> {
        Arc::new(Self {
            limits,
            born: Instant::now(),
            busy: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            answers: Mutex::new(Slab::new()),
            write_blocked_since: AtomicU64::new(NOT_BLOCKED),
            http2: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            close_requested: AtomicU8::new(0),
            close: Notify::new(),
            work: Arc::new(Semaphore::new(limits.max_streams as usize)),
            _slot: slot,
            peer,
        })
    }

    /// The client's address, when known.
    pub fn peer(&self) -> Option<std::net::SocketAddr> {
        self.peer
    }

    /// A handle the request path uses to take work slots on this connection.
    pub fn work_slots(self: &Arc<Self>) -> WorkSlots {
        WorkSlots(Arc::clone(self))
    }

    /// Asks the connection to close for `reason`; the first reason asked for is the one kept.
    pub fn request_close(&self, reason: CloseReason) {
        if self
            .close_requested
            .compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.close.notify_one();
        }
    }

    /// Whether nothing is being handled or sent (nor, once it has answered, flushed), and for how
    /// long (ms); `None` when busy or already closing.
    pub fn idle_for_ms(&self) -> Option<u64> {
        let flushing = self.write_blocked_since.load(Ordering::Acquire) != NOT_BLOCKED && self.has_served();
        let idle = self.busy.load(Ordering::SeqCst) == 0
            && !flushing
            && self.close_requested.load(Ordering::Acquire) == 0;
        idle.then(|| {
            self.now_ms()
                .saturating_sub(self.idle_since.load(Ordering::Acquire))
        })
    }

    /// Whether a request has ever been answered or cancelled here.
    pub fn has_served(&self) -> bool {
        self.requests.load(Ordering::Relaxed) > 0
    }

    /// How willing this connection is to make room, when idle: one that never sent a request
    /// first, then the one idle longest. `None` when busy, closing, or when upstream work it
    /// started still holds its slot (closing it would free nothing).
    fn shedding_rank(&self) -> Option<(bool, u64)> {
        let idle_ms = self.idle_for_ms()?;
        let work_in_flight = self.work.available_permits() < self.limits.max_streams as usize;
        (!work_in_flight).then(|| (!self.has_served(), idle_ms))
    }

    /// Resolves when the connection must close, and says why.
    pub async fn watch(&self) -> CloseReason {
        let recheck = self.limits.header_read_timeout.min(self.limits.write_timeout);
        loop {
            let requested = self.close.notified();
            let mut requested = std::pin::pin!(requested);
            requested.as_mut().enable();
            if let Some(reason) = CloseReason::from_u8(self.close_requested.load(Ordering::Acquire)) {
                return reason;
            }
            let now = self.now_ms();
            let next = match self.deadline(now) {
                Deadline::Passed(reason) => return reason,
                Deadline::At(at) => at.min(now.saturating_add(millis(recheck))),
            };
            tokio::select! {
                () = tokio::time::sleep_until(self.born + Duration::from_millis(next)) => {}
                () = requested => {}
            }
        }
    }

    /// The rule that runs out first, and when.
    fn deadline(&self, now: u64) -> Deadline {
        let write_timeout = millis(self.limits.write_timeout);
        let blocked_since = self.write_blocked_since.load(Ordering::Acquire);
        let blocked = blocked_since != NOT_BLOCKED;
        // A write waiting on the socket, and each HTTP/2 answer, must progress within
        // `write_timeout`.
        let stalled = blocked.then(|| blocked_since.saturating_add(write_timeout));
        let starved = self
            .lock_answers()
            .iter()
            .map(|(_, progressed)| progressed.saturating_add(write_timeout))
            .min();
        // Nothing handled or sent: the next request head is due. A waiting write defers that only
        // on a connection that has answered something (it is still flushing an answer); one that
        // never sent a request is only writing protocol chatter (PING and SETTINGS acks).
        let idle = (self.busy.load(Ordering::SeqCst) == 0 && (!blocked || !self.has_served())).then(|| {
            self.idle_since
                .load(Ordering::Acquire)
                .saturating_add(millis(self.limits.header_read_timeout))
        });
        let soonest = [
            stalled.map(|at| (at, CloseReason::WriteTimeout)),
            starved.map(|at| (at, CloseReason::WriteTimeout)),
            idle.map(|at| (at, CloseReason::Idle)),
        ]
        .into_iter()
        .flatten()
        .min_by_key(|(at, _)| *at);
        match soonest {
            Some((at, reason)) if now >= at => Deadline::Passed(reason),
            Some((at, _)) => Deadline::At(at),
            // Handling requests: bounded by the upstream deadlines, not here. Look again later.
            None => Deadline::At(u64::MAX),
        }
    }

    fn now_ms(&self) -> u64 {
        millis(self.born.elapsed())
    }

    fn request_started(&self, http2: bool) {
        if http2 {
            self.http2.store(true, Ordering::Relaxed);
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.busy.fetch_add(1, Ordering::SeqCst);
    }

    /// An answer begins; an HTTP/2 one is timed by its progress from now on, and the key to its
    /// clock is returned. (HTTP/1 answers are timed by the socket: see [`io`].)
    fn answer_started(&self) -> Option<usize> {
        if !self.http2.load(Ordering::Relaxed) {
            return None;
        }
        let now = self.now_ms();
        Some(self.lock_answers().insert(now))
    }

    fn answer_progressed(&self, answer: Option<usize>) {
        if let Some(key) = answer {
            let now = self.now_ms();
            if let Some(progressed) = self.lock_answers().get_mut(key) {
                *progressed = now;
            }
        }
    }

    fn answer_finished(&self, answer: Option<usize>) {
        if let Some(key) = answer {
            self.lock_answers().try_remove(key);
        }
        self.finished();
    }

    fn lock_answers(&self) -> std::sync::MutexGuard<'_, Slab<u64>> {
        self.answers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn request_cancelled(&self) {
        let cancelled = self.cancelled.fetch_add(1, Ordering::Relaxed) + 1;
        let requests = self.requests.load(Ordering::Relaxed);
        let floor = MIN_RESETS_BEFORE_CLOSE.max(u64::from(self.limits.max_streams));
        if cancelled > floor && cancelled.saturating_mul(2) > requests {
            self.request_close(CloseReason::Resets);
        }
        self.finished();
    }

    fn finished(&self) {
        // Stamped before `busy` falls, so whoever sees it at zero also sees when that happened.
        self.idle_since.fetch_max(self.now_ms(), Ordering::AcqRel);
        self.busy.fetch_sub(1, Ordering::SeqCst);
    }

    fn write_blocked(&self) {
        if self.write_blocked_since.load(Ordering::Relaxed) == NOT_BLOCKED {
            self.write_blocked_since.store(self.now_ms(), Ordering::Release);
        }
    }

    fn write_unblocked(&self) {
        if self.write_blocked_since.load(Ordering::Relaxed) != NOT_BLOCKED {
            self.write_blocked_since.store(NOT_BLOCKED, Ordering::Release);
        }
    }
}

/// The connection among `connections` that should make room for a new one: idle, with no
/// upstream work holding its slot, preferring one that never sent a request, then the one idle
/// longest.
pub fn idlest<'a>(connections: impl IntoIterator<Item = &'a Arc<Connection>>) -> Option<&'a Arc<Connection>> {
    connections
        .into_iter()
        .filter_map(|connection| Some((connection.shedding_rank()?, connection)))
        .max_by_key(|(rank, _)| *rank)
        .map(|(_, connection)| connection)
}

enum Deadline {
    Passed(CloseReason),
    /// Milliseconds since the connection was born.
    At(u64),
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Takes work slots on one connection; carried by each request into the proxy.
#[derive(Clone)]
pub struct WorkSlots(Arc<Connection>);

impl WorkSlots {
    /// Waits until the connection has fewer than `max_streams` upstream calls in flight.
    pub async fn acquire(&self) -> WorkSlot {
        let work = Arc::clone(&self.0.work);
        let permit = match Arc::clone(&work).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => work
                .acquire_owned()
                .await
                .expect("a connection's work semaphore is never closed"),
        };
        WorkSlot {
            _permit: permit,
            _connection: Arc::clone(&self.0),
        }
    }
}

impl std::fmt::Debug for WorkSlots {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("WorkSlots")
    }
}

/// One upstream call's claim on its connection: held by the call until it ends.
pub struct WorkSlot {
    _permit: OwnedSemaphorePermit,
    _connection: Arc<Connection>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection(limits: Limits) -> Arc<Connection> {
        let slots = Arc::new(Semaphore::new(1));
        Connection::new(limits, slots.try_acquire_owned().expect("a free slot"))
    }

    const LIMITS: Limits = Limits {
        header_read_timeout: Duration::from_secs(10),
        write_timeout: Duration::from_secs(30),
        max_streams: 4,
    };

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_never_sends_a_request_is_idle_after_the_header_timeout() {
        let connection = connection(LIMITS);
        let started = Instant::now();
        assert_eq!(connection.watch().await, CloseReason::Idle);
        assert_eq!(started.elapsed(), LIMITS.header_read_timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_clock_starts_again_after_each_answer() {
        let connection = connection(LIMITS);
        tokio::time::advance(Duration::from_secs(9)).await;
        connection.request_started(false);
        tokio::time::advance(Duration::from_secs(60)).await;
        let answer = connection.answer_started();
        connection.answer_finished(answer);
        let answered = Instant::now();
        assert_eq!(connection.watch().await, CloseReason::Idle);
        assert_eq!(answered.elapsed(), LIMITS.header_read_timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_never_sent_a_request_is_idle_even_while_its_writes_wait() {
        // A client that floods PINGs and never reads: only acks wait on the socket.
        let connection = connection(LIMITS);
        connection.write_blocked();
        let started = Instant::now();
        assert_eq!(connection.watch().await, CloseReason::Idle);
        assert_eq!(started.elapsed(), LIMITS.header_read_timeout);
        assert!(connection.idle_for_ms().is_some(), "and it may be shed meanwhile");
    }

    #[tokio::test(start_paused = true)]
    async fn an_answered_connection_flushing_its_last_answer_is_not_idle_until_the_write_timeout() {
        let connection = connection(LIMITS);
        connection.request_started(false);
        let answer = connection.answer_started();
        connection.answer_finished(answer);
        connection.write_blocked();
        let blocked = Instant::now();
        assert_eq!(connection.idle_for_ms(), None, "flushing is not idle");
        assert_eq!(connection.watch().await, CloseReason::WriteTimeout);
        assert_eq!(blocked.elapsed(), LIMITS.write_timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn a_blocked_write_times_out_even_while_a_request_is_handled() {
        let connection = connection(LIMITS);
        connection.request_started(false);
        connection.write_blocked();
        let blocked = Instant::now();
        assert_eq!(connection.watch().await, CloseReason::WriteTimeout);
        assert_eq!(blocked.elapsed(), LIMITS.write_timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn an_http2_answer_without_progress_times_out_and_progress_defers_it() {
        let connection = connection(LIMITS);
        connection.request_started(true);
        let answer = connection.answer_started();
        tokio::time::advance(Duration::from_secs(20)).await;
        connection.answer_progressed(answer);
        let progressed = Instant::now();
        assert_eq!(connection.watch().await, CloseReason::WriteTimeout);
        assert_eq!(progressed.elapsed(), LIMITS.write_timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn a_starved_http2_answer_times_out_however_busy_its_connection_is() {
        let connection = connection(LIMITS);
        connection.request_started(true);
        let _starved = connection.answer_started();
        let started = Instant::now();
        let watcher = {
            let connection = Arc::clone(&connection);
            tokio::spawn(async move { connection.watch().await })
        };
        // Other answers start and progress every few seconds: none covers for the starved one.
        for _ in 0..30 {
            tokio::time::advance(Duration::from_secs(2)).await;
            connection.request_started(true);
            let other = connection.answer_started();
            connection.answer_progressed(other);
            connection.answer_finished(other);
            if watcher.is_finished() {
                break;
            }
        }
        assert_eq!(watcher.await.expect("watcher"), CloseReason::WriteTimeout);
        assert!(started.elapsed() <= LIMITS.write_timeout + Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn an_http1_answer_is_timed_by_its_socket_writes_not_by_its_pieces() {
        let connection = connection(LIMITS);
        connection.request_started(false);
        let _answer = connection.answer_started();
        let watch = connection.watch();
        let outcome = tokio::time::timeout(Duration::from_secs(300), watch).await;
        assert!(
            outcome.is_err(),
            "closed while an answer was being sent: {outcome:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cancelling_most_requests_past_the_floor_asks_for_a_close() {
        let connection = connection(LIMITS);
        for _ in 0..MIN_RESETS_BEFORE_CLOSE {
            connection.request_started(true);
            connection.request_cancelled();
        }
        assert_eq!(connection.close_requested.load(Ordering::Acquire), 0, "not yet");
        connection.request_started(true);
        connection.request_cancelled();
        assert_eq!(connection.watch().await, CloseReason::Resets);
    }

    #[tokio::test(start_paused = true)]
    async fn cancellations_among_many_answers_are_tolerated() {
        let connection = connection(LIMITS);
        for _ in 0..300 {
            connection.request_started(true);
            let answer = connection.answer_started();
            connection.answer_finished(answer);
            connection.request_started(true);
            connection.request_cancelled();
        }
        assert_eq!(connection.close_requested.load(Ordering::Acquire), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_requested_close_wakes_the_watchdog_and_the_first_reason_wins() {
        let connection = connection(LIMITS);
        connection.request_started(false);
        let watcher = {
            let connection = Arc::clone(&connection);
            tokio::spawn(async move { connection.watch().await })
        };
        tokio::task::yield_now().await;
        connection.request_close(CloseReason::Shed);
        connection.request_close(CloseReason::Resets);
        assert_eq!(watcher.await.expect("watcher"), CloseReason::Shed);
        assert_eq!(
            connection.idle_for_ms(),
            None,
            "a closing connection is not offered again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_idlest_is_a_silent_one_then_the_one_idle_longest_and_never_a_busy_one() {
        let answered = |connection: &Arc<Connection>| {
            connection.request_started(false);
            let answer = connection.answer_started();
            connection.answer_finished(answer);
        };
        let answered_long_ago = connection(LIMITS);
        answered(&answered_long_ago);
        tokio::time::advance(Duration::from_millis(5)).await;
        let answered_lately = connection(LIMITS);
        answered(&answered_lately);
        let silent = connection(LIMITS);
        tokio::time::advance(Duration::from_millis(5)).await;
        let busy = connection(LIMITS);
        busy.request_started(false);
        let working = connection(LIMITS);
        answered(&working);
        let _upstream_call = working.work_slots().acquire().await;
        let all = [
            Arc::clone(&answered_lately),
            Arc::clone(&silent),
            Arc::clone(&answered_long_ago),
            Arc::clone(&busy),
            Arc::clone(&working),
        ];
        for expected in [&silent, &answered_long_ago, &answered_lately] {
            let picked = idlest(&all).expect("an idle one");
            assert!(Arc::ptr_eq(picked, expected));
            picked.request_close(CloseReason::Shed);
        }
        assert!(
            idlest(&all).is_none(),
            "neither a busy one nor one whose upstream work holds its slot"
        );
    }

    #[tokio::test]
    async fn work_slots_are_bounded_by_the_stream_limit_and_keep_the_connection_slot() {
        let slots = Arc::new(Semaphore::new(1));
        let connection = Connection::new(
            LIMITS,
            Arc::clone(&slots).try_acquire_owned().expect("a free slot"),
        );
        let work = connection.work_slots();
        let mut held = Vec::new();
        for _ in 0..LIMITS.max_streams {
            held.push(work.acquire().await);
        }
        let more = tokio::time::timeout(Duration::from_millis(50), work.acquire()).await;
        assert!(more.is_err(), "a fifth slot was handed out");
        drop(connection);
        drop(work);
        assert_eq!(
            slots.available_permits(),
            0,
            "work in flight keeps the connection's slot"
        );
        held.clear();
        assert_eq!(slots.available_permits(), 1);
    }
}

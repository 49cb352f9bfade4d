//! Kept-alive connections to the one upstream origin.
//!
//! hyper-util's pooled client serves any number of origins: every call hashes the origin to check
//! a connection out and again to put it back, races the checkout against a new connect, and
//! spawns a task to return the connection. The gateway talks to one origin, so a stack of idle
//! HTTP/1.1 connections (the most recently used on top) and, when the upstream negotiates HTTP/2
//! by ALPN, one shared multiplexed connection, are all it needs. Connections come from the same
//! connector as before (TCP, then TLS for `https`).
//!
//! A connection goes back on the stack only after its answer was read whole ([`Pool::put`]); one
//! that failed is dropped, and dropping it closes it. Idle HTTP/1.1 connections past
//! `pool_idle_timeout` (or beyond `pool_max_idle`) are closed when the pool next meets them. The
//! HTTP/2 connection is PINGed every `http2_keepalive_interval`, idle too, so one that died
//! silently is closed within the keep-alive timeout instead of costing a call its whole timeout;
//! its driver task retires it once it has been idle for `pool_idle_timeout`. No connection of
//! either kind takes a new request once it is `pool_max_connection_age` old, so a DNS change is
//! picked up.
//!
//! Concurrent calls that find no connection share one connect while the upstream may speak
//! HTTP/2 (until the first connection says otherwise): they wait for it and multiplex on it,
//! rather than each opening a connection of its own; if it fails, they all get its failure. The
//! connect runs in a task of its own, so a caller that gives up does not cancel it for the others.
//! A retired HTTP/2 connection is replaced by the next call (which pays one handshake).
//!
//! An upstream closes idle connections on its own schedule, so a request can meet a stacked
//! connection the upstream has just closed. If the gateway learns of the close before writing,
//! hyper hands the request back and the next connection is tried. If the close crosses the request
//! on the wire, the request was written and the connection ends without an answer: the gateway
//! only sends GETs, which are safe to repeat, so it builds the request again and sends it once more
//! on a fresh connection (as nginx and Go's HTTP client do for a kept-alive connection). A fresh
//! connection that fails is not retried: that upstream is failing, not closing idle connections.
//!
//! What the pool holds is read at scrape time ([`PoolOccupancy`]): an HTTP/1.1 connection is
//! busy from the moment a call takes it (from the stack, or fresh from a connect) until its answer
//! has been read whole (or it failed and was closed), idle while it waits on the stack (those the
//! upstream already closed, or past `pool_idle_timeout` or `pool_max_connection_age`, are not
//! counted, though they are only dropped when the pool next meets them). The HTTP/2 connection
//! counts as one, busy while at least one call is on it, idle otherwise; a retired one still
//! finishing its last calls is no longer counted. Connects still in progress are not counted.
//!
//! Why one long module: `send`'s branches (shared HTTP/2, stacked HTTP/1.1, retry, shared connect)
//! only make sense read together; the HTTP/2 connection's upkeep (`http2_connection.rs`) and the
//! reading of errors (`failure.rs`) are split out.

use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::Uri;
use http::{Request, Response};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use prometheus::IntCounter;
use tower::ServiceExt;

use self::failure::closed_without_answer;
pub use self::failure::{ConnectFailure, describe_chain, error_chain};
use self::http2_connection::{Multiplexed, UseTimes, drive_http2};

mod failure;
mod http2_connection;

type RequestBody = Empty<Bytes>;

/// The pool's limits: `[upstream]`'s `pool_*` and `http2_keepalive_*` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    /// A connection unused this long is closed.
    pub idle_timeout: Duration,
    /// Idle HTTP/1.1 connections kept beyond this many are closed.
    pub max_idle: usize,
    /// A connection this old takes no new request.
    pub max_connection_age: Duration,
    /// A PING on the HTTP/2 connection this often, idle or not; zero: none.
    pub http2_keepalive_interval: Duration,
    /// A PING unanswered this long closes the HTTP/2 connection.
    pub http2_keepalive_timeout: Duration,
    /// Bound on one connect, TLS and HTTP/2 handshakes included (`upstream.request_timeout`).
    pub connect_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(90),
            max_idle: 128,
            max_connection_age: Duration::from_secs(300),
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Why a request got no response head.
#[derive(Debug)]
pub enum PoolError {
    /// No connection could be made.
    Connect(ConnectFailure),
    /// The connection failed before a response head arrived.
    Request(hyper::Error),
}

/// A connection lent for one exchange; give it back with [`Pool::put`] once the body is read.
/// It counts as busy until then (or until dropped: the connection closes).
pub struct Lease {
    /// The HTTP/1.1 connection; `None` for a call on the shared HTTP/2 connection.
    http1: Option<(http1::SendRequest<RequestBody>, Instant)>,
    _busy: Busy,
}

/// Counts one call on a connection (an HTTP/1.1 connection taken, or a call on the HTTP/2 one)
/// for as long as it lives.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(count))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Upstream connections by state, at one moment (see the module documentation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Connections {
    pub idle: usize,
    pub busy: usize,
}

/// Reads what the pool holds, for the scrape-time gauges. Cheap to clone.
#[derive(Clone)]
pub struct PoolOccupancy(Arc<Pool>);

impl PoolOccupancy {
    pub fn new(pool: Arc<Pool>) -> Self {
        Self(pool)
    }

    /// The pool's connections now.
    pub fn now(&self) -> Connections {
        self.0.connections()
    }
}

pub struct Pool {
    idle: Mutex<Vec<IdleConnection>>,
    dialer: Arc<Dialer>,
    /// Counts requests sent a second time after a kept-alive connection closed under them.
    retries: IntCounter,
}

/// What makes connections, shared with the connect a task runs for concurrent cold calls.
struct Dialer {
    connector: HttpsConnector<HttpConnector>,
    origin: Uri,
    settings: PoolSettings,
    /// The HTTP/2 connection, shared with its driver task (which retires it when idle).
    multiplexed: Arc<Mutex<Option<Multiplexed>>>,
    /// What the upstream speaks, as far as the pool knows: [`UNKNOWN`], [`HTTP1`] or [`HTTP2`].
    protocol: AtomicU8,
    /// HTTP/1.1 connections taken by calls right now.
    http1_busy: Arc<AtomicUsize>,
    /// Held by the one connect that concurrent cold calls share while HTTP/2 is possible.
    turn: Arc<tokio::sync::Mutex<()>>,
    /// Shared connects finished so far, and the failure of the last one if it failed.
    connects: AtomicU64,
    last_failure: Mutex<Option<ConnectFailure>>,
}

const UNKNOWN: u8 = 0;
const HTTP1: u8 = 1;
const HTTP2: u8 = 2;

struct IdleConnection {
    sender: http1::SendRequest<RequestBody>,
    born: Instant,
    since: Instant,
}

enum Fresh {
    Http1(http1::SendRequest<RequestBody>, Instant, Busy),
    Http2(http2::SendRequest<RequestBody>, Busy),
}

impl Pool {
    /// `origin` is any URL of the upstream: its scheme and authority are what is connected to.
    pub fn new(
        connector: HttpsConnector<HttpConnector>,
        origin: Uri,
        settings: PoolSettings,
        retries: IntCounter,
    ) -> Self {
        // HTTP/2 is negotiated by ALPN, so only over TLS.
        let protocol = if origin.scheme_str() == Some("https") {
            UNKNOWN
        } else {
            HTTP1
        };
        Self {
            idle: Mutex::default(),
            dialer: Arc::new(Dialer {
                connector,
                origin,
                settings,
                multiplexed: Arc::default(),
                protocol: AtomicU8::new(protocol),
                http1_busy: Arc::default(),
                turn: Arc::default(),
                connects: AtomicU64::new(0),
                last_failure: Mutex::default(),
            }),
            retries,
        }
    }

    /// Sends the request `build` makes (a GET in origin form: the path, with `Host` set) on a
    /// pooled or a fresh connection. `build` runs again only when a connection failed under the
    /// request (see the module docs).
    pub async fn send(
        &self,
        build: impl Fn() -> Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Lease), PoolError> {
        if let Some((mut sender, busy)) = self.shared_http2() {
            match sender.try_send_request(self.absolute_form(build())).await {
                Ok(response) => {
                    return Ok((
                        response,
                        Lease {
                            http1: None,
                            _busy: busy,
                        },
                    ));
                }
                Err(error) if error.message().is_none() => {
                    return Err(PoolError::Request(error.into_error()));
                }
                // Not written: the connection had closed. The request is built anew below, in
                // origin form, for whichever connection comes next.
                Err(_) => self.forget_closed_http2(),
            }
        }
        let mut request = build();
        while let Some((mut sender, born, busy)) = self.checkout().await {
            match sender.try_send_request(request).await {
                Ok(response) => {
                    return Ok((
                        response,
                        Lease {
                            http1: Some((sender, born)),
                            _busy: busy,
                        },
                    ));
                }
                Err(mut error) => match error.take_message() {
                    // Not written: the upstream had closed it. Try the next one, or a fresh one.
                    Some(unsent) => request = unsent,
                    // Written as the upstream closed it: once more, on a fresh connection.
                    None if closed_without_answer(error.error()) => {
                        self.retries.inc();
                        request = build();
                        break;
                    }
                    None => return Err(PoolError::Request(error.into_error())),
                },
            }
        }
        // Boxed: a connect's state (TLS handshake included) is large and rarely needed.
        let fresh = if self.dialer.protocol.load(Ordering::Relaxed) == HTTP1 {
            Box::pin(self.dialer.connect()).await?
        } else {
            Box::pin(self.connect_shared()).await?
        };
        match fresh {
            Fresh::Http1(mut sender, born, busy) => {
                let response = sender.send_request(request).await.map_err(PoolError::Request)?;
                let lease = Lease {
                    http1: Some((sender, born)),
                    _busy: busy,
                };
                Ok((response, lease))
            }
            Fresh::Http2(mut sender, busy) => {
                let response = sender
                    .send_request(self.absolute_form(request))
                    .await
                    .map_err(PoolError::Request)?;
                let lease = Lease {
                    http1: None,
                    _busy: busy,
                };
                Ok((response, lease))
            }
        }
    }

    /// Takes back a connection whose answer was read whole.
    pub fn put(&self, lease: Lease) {
        let Lease { http1, _busy: busy } = lease;
        // Idle from here: no longer counted as busy, whether it goes on the stack or is closed.
        drop(busy);
        let Some((sender, born)) = http1 else { return };
        let now = Instant::now();
        if now.duration_since(born) >= self.dialer.settings.max_connection_age {
            return;
        }
        let mut idle = self.lock_idle();
        // The oldest are at the bottom: close those idle too long, and any beyond the cap.
        let stale = idle
            .iter()
            .take_while(|connection| {
                now.duration_since(connection.since) >= self.dialer.settings.idle_timeout
            })
            .count()
            .max((idle.len() + 1).saturating_sub(self.dialer.settings.max_idle));
        let stale = stale.min(idle.len());
        idle.drain(..stale);
        if self.dialer.settings.max_idle > 0 {
            idle.push(IdleConnection {
                sender,
                born,
                since: now,
            });
        }
    }

    /// The most recently used idle connection that is still open and young enough, once it is
    /// ready for a request.
    async fn checkout(&self) -> Option<(http1::SendRequest<RequestBody>, Instant, Busy)> {
        loop {
            let (connection, busy) = {
                let mut idle = self.lock_idle();
                // Counted busy as it leaves the stack, under the lock: a scrape sees it once.
                (idle.pop()?, Busy::new(&self.dialer.http1_busy))
            };
            if !self.usable(&connection, Instant::now()) {
                continue;
            }
            let mut sender = connection.sender;
            // Ready at once unless hyper is still finishing the previous exchange's bookkeeping.
            if sender.ready().await.is_ok() {
                return Some((sender, connection.born, busy));
            }
        }
    }

    /// Whether a stacked connection may still take a request.
    fn usable(&self, connection: &IdleConnection, now: Instant) -> bool {
        let settings = &self.dialer.settings;
        now.duration_since(connection.since) < settings.idle_timeout
            && now.duration_since(connection.born) < settings.max_connection_age
            && !connection.sender.is_closed()
    }

    /// The connections the pool holds now (see the module documentation).
    fn connections(&self) -> Connections {
        let now = Instant::now();
        let (stacked, http1_busy) = {
            let idle = self.lock_idle();
            let stacked = idle
                .iter()
                .filter(|connection| self.usable(connection, now))
                .count();
            (stacked, self.dialer.http1_busy.load(Ordering::Acquire))
        };
        let http2 = self.lock_multiplexed().as_ref().and_then(|connection| {
            (!connection.sender.is_closed()).then(|| connection.calls.load(Ordering::Acquire) > 0)
        });
        Connections {
            idle: stacked + usize::from(http2 == Some(false)),
            busy: http1_busy + usize::from(http2 == Some(true)),
        }
    }

    /// The HTTP/2 connection, if there is one still open and not due to retire.
    fn shared_http2(&self) -> Option<(http2::SendRequest<RequestBody>, Busy)> {
        let mut multiplexed = self.lock_multiplexed();
        let usable = multiplexed.as_ref().is_some_and(|connection| {
            !connection.sender.is_closed()
                && Instant::now() < connection.use_times.retires_at(&self.dialer.settings)
        });
        if !usable {
            // Dropped: it closes once the requests still on it end.
            *multiplexed = None;
            return None;
        }
        let connection = multiplexed.as_ref()?;
        connection.use_times.touch();
        Some((connection.sender.clone(), Busy::new(&connection.calls)))
    }

    /// Drops the shared HTTP/2 connection once it is closed (a newer one made meanwhile stays).
    fn forget_closed_http2(&self) {
        let mut multiplexed = self.lock_multiplexed();
        if multiplexed
            .as_ref()
            .is_some_and(|connection| connection.sender.is_closed())
        {
            *multiplexed = None;
        }
    }

    /// A connect shared by concurrent calls while the upstream may speak HTTP/2: the first call
    /// connects, the others wait for its connection (or its failure) instead of connecting too.
    /// The connect runs in a task of its own, holding the turn, so a caller that gives up (its
    /// timeout) does not cancel the connect the others wait for.
    async fn connect_shared(&self) -> Result<Fresh, PoolError> {
        let dialer = &self.dialer;
        let seen = dialer.connects.load(Ordering::Acquire);
        let turn = Arc::clone(&dialer.turn).lock_owned().await;
        if let Some((sender, busy)) = self.shared_http2() {
            return Ok(Fresh::Http2(sender, busy));
        }
        if dialer.connects.load(Ordering::Acquire) != seen {
            let failure = dialer
                .last_failure
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone();
            if let Some(failure) = failure {
                return Err(PoolError::Connect(failure));
            }
            if dialer.protocol.load(Ordering::Relaxed) == HTTP1 {
                // The connect waited for spoke HTTP/1.1: one connection per exchange, in parallel.
                drop(turn);
                return dialer.connect().await;
            }
        }
        let dialer = Arc::clone(dialer);
        let connecting = tokio::spawn(async move {
            let _turn = turn;
            let result = dialer.connect().await;
            let failure = match &result {
                Ok(_) => None,
                Err(PoolError::Connect(failure)) => Some(failure.clone()),
                Err(PoolError::Request(error)) => Some(ConnectFailure::of(error)),
            };
            *dialer
                .last_failure
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = failure;
            dialer.connects.fetch_add(1, Ordering::Release);
            result
        });
        connecting.await.unwrap_or_else(|failed| {
            Err(PoolError::Connect(ConnectFailure {
                cause: "other",
                detail: failed.to_string(),
            }))
        })
    }
}

impl Dialer {
    /// A new connection, within `connect_timeout`: the shared connect runs in a task no caller's
    /// own timeout can cancel, and holds the turn the other callers wait for.
    async fn connect(&self) -> Result<Fresh, PoolError> {
        let timeout = self.settings.connect_timeout;
        tokio::time::timeout(timeout, self.handshake())
            .await
            .unwrap_or_else(|_| {
                Err(PoolError::Connect(ConnectFailure {
                    cause: "timeout",
                    detail: format!("no connection within {timeout:?}"),
                }))
            })
    }

    async fn handshake(&self) -> Result<Fresh, PoolError> {
        let io = self
            .connector
            .clone()
            .oneshot(self.origin.clone())
            .await
            .map_err(|error| PoolError::Connect(ConnectFailure::of(error.as_ref())))?;
        let born = Instant::now();
        if io.connected().is_negotiated_h2() {
            self.protocol.store(HTTP2, Ordering::Relaxed);
            let mut builder = http2::Builder::new(TokioExecutor::new());
            builder.timer(TokioTimer::new());
            if !self.settings.http2_keepalive_interval.is_zero() {
                builder
                    .keep_alive_interval(self.settings.http2_keepalive_interval)
                    .keep_alive_timeout(self.settings.http2_keepalive_timeout)
                    .keep_alive_while_idle(true);
            }
            let (sender, connection) = builder.handshake(io).await.map_err(PoolError::Request)?;
            let use_times = Arc::new(UseTimes {
                born,
                last_used_ms: AtomicU64::new(0),
            });
            let calls = Arc::default();
            let busy = Busy::new(&calls);
            tokio::spawn(drive_http2(
                connection,
                Arc::clone(&use_times),
                Arc::clone(&self.multiplexed),
                self.settings,
            ));
            *self.lock_multiplexed() = Some(Multiplexed {
                sender: sender.clone(),
                use_times,
                calls,
            });
            Ok(Fresh::Http2(sender, busy))
        } else {
            self.protocol.store(HTTP1, Ordering::Relaxed);
            let (sender, connection) = http1::handshake(io).await.map_err(PoolError::Request)?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "upstream HTTP/1.1 connection ended");
                }
            });
            Ok(Fresh::Http1(sender, born, Busy::new(&self.http1_busy)))
        }
    }

    fn lock_multiplexed(&self) -> std::sync::MutexGuard<'_, Option<Multiplexed>> {
        self.multiplexed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Pool {
    /// HTTP/2 carries scheme and authority as pseudo-headers: the origin's, with the request's path.
    fn absolute_form(&self, mut request: Request<RequestBody>) -> Request<RequestBody> {
        let mut parts = self.dialer.origin.clone().into_parts();
        parts.path_and_query = request.uri().path_and_query().cloned();
        if let Ok(uri) = Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
        request
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<IdleConnection>> {
        self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_multiplexed(&self) -> std::sync::MutexGuard<'_, Option<Multiplexed>> {
        self.dialer.lock_multiplexed()
    }
}

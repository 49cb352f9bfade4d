//! Serving: the listeners, each client connection's bounds ([`connection`]), the admin port
//! ([`admin`]), the webhook port (when `[webhook] listen` is set, [`crate::webhook`]) and
//! graceful shutdown.
//!
//! The admin port's purge endpoints are in [`purge`].
//!
//! [`Gateway::bind`] builds the gateway's parts first ([`App`]: everything that can fail on
//! configuration, such as TLS roots) and only then binds both ports, so a bad config never leaves
//! a half-started process.
//! [`Gateway::serve`] accepts until the shutdown future resolves, then: `/readyz` turns 503 (and,
//! for `shutdown_delay`, requests are still accepted while load balancers notice), the public
//! listener closes (new connections are refused), in-flight requests get `shutdown_grace`
//! to finish (HTTP/1 keep-alive connections are closed once idle, HTTP/2 gets GOAWAY), and whatever
//! is left after the grace period is cut, with a warning.
//!
//! Each port serves at most a fixed number of connections at once. Every connection runs in a
//! task of its own beside its [`Connection`] watchdog, which closes it when it goes idle, stalls
//! or keeps resetting streams (see [`crate::serve::connection`]). When every slot is taken and another
//! connection arrives, the longest-idle connection is closed to make room; with none idle, the
//! newcomer waits (and the kernel queues those after it). So connections that send nothing can
//! neither hold the public port nor keep the admin port from answering its probes.
//!
//! Why one long module: binding, the accept loops of both ports, making room when full and the
//! drain are one lifecycle whose steps hand state to each other (the connection table, the drain
//! signal, readiness); each connection's own rules live in [`connection`].

pub mod admin;
pub mod connection;
pub mod purge;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tower::Service;

use crate::app::{App, AppError};
use crate::config::Config;
use crate::config::secrets::Secrets;
use crate::edge::response::Body;
use crate::ops::secret_files::{SecretReloadMetrics, SecretTargets};
use crate::serve::connection::io::WatchedIo;
use crate::serve::connection::metrics::ConnectionMetrics;
use crate::serve::connection::track::Track;
use crate::serve::connection::{CLOSE_GRACE, CloseReason, Connection, Limits, idlest};
use crate::upstream::credentials::KeyRotation;

/// Connections the admin port serves at once (probes and scrapes need few).
const ADMIN_MAX_CONNECTIONS: usize = 64;
/// Connections the webhook port serves at once (Plextera's deliveries; past it, the idlest is
/// closed to make room, as on the public port).
const WEBHOOK_MAX_CONNECTIONS: usize = 256;
/// HTTP/2 streams per webhook connection: deliveries come one at a time, and every stream may
/// post a body.
const WEBHOOK_MAX_STREAMS: u32 = 8;
/// HTTP/2 flow-control windows on the webhook port (per stream, per connection): what a client
/// may send ahead of what is read. hyper's defaults (2 MiB, 5 MiB) would let a post waiting for
/// its turn to be read buffer megabytes per connection; bodies still arrive whole as they are read.
const WEBHOOK_HTTP2_WINDOWS: (u32, u32) = (64 * 1024, 256 * 1024);
/// HTTP/2 streams a client may reset before the server has accepted them, before the connection
/// is closed.
const MAX_PENDING_RESET_STREAMS: usize = 20;
/// hyper's own bound on an HTTP/1 request head; above the gateway's JSON-answered limits.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);
/// How long admin and webhook connections get to finish once the public side has drained.
const SIDE_PORT_GRACE: Duration = Duration::from_secs(1);

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    App(#[from] AppError),
    #[error(
        "cannot listen on {addr} ({key}): {source}; choose a free address, e.g. {}",
        crate::config::report::example(key).unwrap_or_default()
    )]
    Bind {
        /// The config key of the address: `server.listen`, `server.admin_listen` or
        /// `webhook.listen`.
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A gateway with both ports bound, ready to serve.
pub struct Gateway {
    public: TcpListener,
    admin: TcpListener,
    /// Bound when `[webhook] listen` is set.
    webhook: Option<TcpListener>,
    app: App,
    listener: ListenerSettings,
    shutdown_delay: Duration,
    shutdown_grace: Duration,
    /// Called once every port accepts (e.g. to tell systemd the service is ready).
    on_ready: Option<Box<dyn FnOnce() + Send>>,
}

/// How one port serves its connections.
#[derive(Debug, Clone, Copy)]
struct ListenerSettings {
    /// Connections served at once.
    max_connections: usize,
    /// What each connection is allowed.
    limits: Limits,
    /// HTTP/2 PING interval (`None`: no PING) and the deadline for its answer.
    http2_keepalive: Option<(Duration, Duration)>,
    /// HTTP/2 flow-control windows, per stream and per connection (`None`: hyper's).
    http2_windows: Option<(u32, u32)>,
}

impl Gateway {
    /// Builds the gateway's parts ([`App::new`]: everything that can fail on configuration), then
    /// binds both ports.
    pub async fn bind(config: &Config, secrets: &Secrets) -> Result<Self, StartError> {
        let app = App::new(config, secrets)?;
        let public = bind("server.listen", config.server.listen).await?;
        let admin = bind("server.admin_listen", config.server.admin_listen).await?;
        let webhook = match config.webhook.listen {
            Some(addr) => Some(bind("webhook.listen", addr).await?),
            None => None,
        };
        let server = &config.server;
        Ok(Self {
            public,
            admin,
            webhook,
            app,
            listener: ListenerSettings {
                max_connections: server.max_connections.get(),
                limits: Limits {
                    header_read_timeout: server.header_read_timeout,
                    write_timeout: server.write_timeout,
                    max_streams: server.http2_max_concurrent_streams,
                },
                http2_keepalive: (!server.http2_keepalive_interval.is_zero())
                    .then_some((server.http2_keepalive_interval, server.http2_keepalive_timeout)),
                http2_windows: None,
            },
            shutdown_delay: server.shutdown_delay,
            shutdown_grace: server.shutdown_grace,
            on_ready: None,
        })
    }

    /// Has [`Gateway::serve`] call `ready` once every port accepts, right after it logs
    /// "gateway ready".
    pub fn on_ready(&mut self, ready: impl FnOnce() + Send + 'static) {
        self.on_ready = Some(Box::new(ready));
    }

    /// The handles that replace secrets while serving (see `ops::secret_files`).
    pub fn secret_targets(&self) -> SecretTargets {
        SecretTargets {
            key: self.app.key_rotation.clone(),
            client_tokens: self.app.client_tokens.clone(),
            webhooks: self.app.webhooks.clone(),
            redis: self.app.redis.clone(),
        }
    }

    /// The metrics registry's series for secret reloads.
    pub fn secret_reload_metrics(&self) -> SecretReloadMetrics {
        self.app.admin.metrics.secrets.clone()
    }

    pub fn public_addr(&self) -> SocketAddr {
        self.public.local_addr().expect("a bound listener has an address")
    }

    /// Replaces the upstream key while serving (see `upstream::credentials::KeyRotation`).
    pub fn key_rotation(&self) -> KeyRotation {
        self.app.key_rotation.clone()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().expect("a bound listener has an address")
    }

    /// The webhook port's address, when `[webhook] listen` is set.
    pub fn webhook_addr(&self) -> Option<SocketAddr> {
        self.webhook
            .as_ref()
            .map(|listener| listener.local_addr().expect("a bound listener has an address"))
    }

    /// Serves until `shutdown` resolves, then drains as described in the module documentation.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let (public_addr, admin_addr) = (self.public_addr(), self.admin_addr());
        let webhook_addr = self.webhook_addr();
        let admin_state = self.app.admin.clone();
        let readiness = admin_state.readiness.clone();
        let connection_metrics = admin_state.metrics.connections.clone();
        let (stop_side_ports, side_ports_stop) = tokio::sync::watch::channel(false);
        let mut side_ports = JoinSet::new();
        side_ports.spawn(serve_side_port(
            self.admin,
            move |_: &Arc<Connection>| {
                let state = admin_state.clone();
                tower::service_fn(move |request| admin::handle(request, state.clone()))
            },
            ListenerSettings {
                max_connections: ADMIN_MAX_CONNECTIONS,
                ..self.listener
            },
            side_ports_stop.clone(),
        ));
        if let (Some(listener), Some(webhooks)) = (self.webhook, self.app.webhooks.clone()) {
            side_ports.spawn(serve_side_port(
                listener,
                move |_: &Arc<Connection>| {
                    let webhooks = webhooks.clone();
                    tower::service_fn(move |request| webhooks.clone().handle(request))
                },
                ListenerSettings {
                    max_connections: WEBHOOK_MAX_CONNECTIONS,
                    limits: Limits {
                        max_streams: WEBHOOK_MAX_STREAMS,
                        ..self.listener.limits
                    },
                    http2_windows: Some(WEBHOOK_HTTP2_WINDOWS),
                    ..self.listener
                },
                side_ports_stop,
            ));
        }

        let watches = self.app.watches.clone();
        // Purges from other replicas reach this one from now on, watched runs or not.
        watches.start();
        let spans = self.app.spans.clone();
        let app = self.app;
        let public_service = move |connection: &Arc<Connection>| {
            app.public_service::<Incoming>(Some(connection.work_slots()), connection.peer())
        };
        let mut public = Acceptor::new(
            self.public,
            public_service,
            self.listener,
            Some(connection_metrics),
        );
        readiness.set(true);
        match webhook_addr {
            Some(webhook_addr) => {
                tracing::info!(%public_addr, %admin_addr, %webhook_addr, "gateway ready")
            }
            None => tracing::info!(%public_addr, %admin_addr, "gateway ready"),
        }
        if let Some(ready) = self.on_ready {
            ready();
        }
        public.accept_until(shutdown).await;

        readiness.set(false);
        if !self.shutdown_delay.is_zero() {
            // Load balancers route by readiness, which they learn with a delay: keep serving
            // new requests until they have stopped sending any.
            tracing::info!(delay = ?self.shutdown_delay, "shutting down: not ready, still serving");
            public.accept_until(tokio::time::sleep(self.shutdown_delay)).await;
        }
        tracing::info!(grace = ?self.shutdown_grace, held = watches.held(), "shutting down: answering held clients, draining in-flight requests");
        watches.shut_down();
        if public.drain(self.shutdown_grace).await {
            tracing::info!("drained");
        } else {
            tracing::warn!(grace = ?self.shutdown_grace, "shutdown grace elapsed: cutting remaining connections");
        }
        stop_side_ports.send_replace(true);
        while let Some(ended) = side_ports.join_next().await {
            if let Err(error) = ended {
                tracing::error!(%error, "admin or webhook listener task failed");
            }
        }
        // The last spans, exported within a bound (a collector that is down does not hold the
        // exit up).
        spans.shutdown(SPAN_FLUSH_BOUND).await;
    }
}

/// Longest the exit waits for queued spans to be exported.
const SPAN_FLUSH_BOUND: Duration = Duration::from_secs(2);

/// Serves a port beside the public one (admin, webhook) until `stop` turns true, then gives its
/// connections [`SIDE_PORT_GRACE`] to finish.
async fn serve_side_port<M, S>(
    listener: TcpListener,
    make_service: M,
    settings: ListenerSettings,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    M: Fn(&Arc<Connection>) -> S,
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let mut acceptor = Acceptor::new(listener, make_service, settings, None);
    acceptor
        .accept_until(async {
            let _ = stop.wait_for(|stop| *stop).await;
        })
        .await;
    acceptor.drain(SIDE_PORT_GRACE).await;
}

/// Connections the kernel may queue for `accept` (it caps this at `net.core.somaxconn`): room for
/// thousands of clients reconnecting at once, as held event streams do after a restart, where the
/// standard library's 128 would drop them into SYN retries a second or more later.
const ACCEPT_BACKLOG: u32 = 4096;

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    let listen = || {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(ACCEPT_BACKLOG)
    };
    listen().map_err(|source| StartError::Bind { key, addr, source })
}

/// Accepts connections on one listener, serves each in a task, and tracks them for shedding and
/// draining.
struct Acceptor<M> {
    listener: TcpListener,
    /// Makes the service for one connection (the public port's carries the connection's work
    /// slots into the proxy).
    make_service: M,
    http: auto::Builder<TokioExecutor>,
    limits: Limits,
    /// One permit per connection being served (or whose upstream work is still running).
    slots: Arc<Semaphore>,
    /// Accepted while every slot was taken: served as soon as one frees.
    waiting: Option<TcpStream>,
    connections: JoinSet<()>,
    /// The connections being served, by their task, for shedding and draining.
    open: HashMap<tokio::task::Id, Arc<Connection>>,
    metrics: Option<ConnectionMetrics>,
}

impl<M, S> Acceptor<M>
where
    M: Fn(&Arc<Connection>) -> S,
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    fn new(
        listener: TcpListener,
        make_service: M,
        settings: ListenerSettings,
        metrics: Option<ConnectionMetrics>,
    ) -> Self {
        let mut http = auto::Builder::new(TokioExecutor::new());
        // No header timer of hyper's own: the connection's watchdog times a head out (the same
        // `header_read_timeout`), for every protocol alike, and counts it.
        http.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .max_buf_size(MAX_HEAD_BYTES);
        // HTTP/2: bounded streams per connection, a connection that opens and resets streams
        // faster than they are accepted (CVE-2023-44487, "rapid reset") is closed with
        // ENHANCE_YOUR_CALM, and peers that stop answering PINGs are dropped. Paced
        // resets are the connection watchdog's business.
        let mut http2 = http.http2();
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(settings.limits.max_streams)
            .max_pending_accept_reset_streams(MAX_PENDING_RESET_STREAMS)
            .max_header_list_size(MAX_HEAD_BYTES as u32);
        if let Some((interval, timeout)) = settings.http2_keepalive {
            http2.keep_alive_interval(interval).keep_alive_timeout(timeout);
        }
        if let Some((stream, connection)) = settings.http2_windows {
            http2
                .initial_stream_window_size(stream)
                .initial_connection_window_size(connection);
        }
        Self {
            listener,
            make_service,
            http,
            limits: settings.limits,
            slots: Arc::new(Semaphore::new(settings.max_connections)),
            waiting: None,
            connections: JoinSet::new(),
            open: HashMap::new(),
            metrics,
        }
    }

    /// Accepts until `stop` resolves; finished connection tasks are reaped as it goes.
    async fn accept_until(&mut self, stop: impl Future<Output = ()>) {
        let mut stop = std::pin::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return,
                Some(ended) = self.connections.join_next_with_id(), if !self.connections.is_empty() => {
                    let id = match ended {
                        Ok((id, ())) => id,
                        Err(error) => error.id(),
                    };
                    self.open.remove(&id);
                }
                slot = Arc::clone(&self.slots).acquire_owned(), if self.waiting.is_some() => {
                    let slot = slot.expect("the connection semaphore is never closed");
                    if let Some(stream) = self.waiting.take() {
                        self.spawn_connection(stream, slot);
                    }
                }
                accepted = self.listener.accept(), if self.waiting.is_none() => match accepted {
                    Ok((stream, _peer)) => match Arc::clone(&self.slots).try_acquire_owned() {
                        Ok(slot) => self.spawn_connection(stream, slot),
                        Err(_) => {
                            self.shed_idlest();
                            self.waiting = Some(stream);
                        }
                    },
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    }
                },
            }
        }
    }

    /// Asks the connection that has been idle longest, if any is, to close.
    fn shed_idlest(&self) {
        if let Some(connection) = idlest(self.open.values()) {
            connection.request_close(CloseReason::Shed);
        }
    }

    fn spawn_connection(&mut self, stream: TcpStream, slot: OwnedSemaphorePermit) {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
        let peer = stream.peer_addr().ok();
        let connection = Connection::with_peer(self.limits, slot, peer);
        let service = Track::new((self.make_service)(&connection), Arc::clone(&connection));
        let io = TokioIo::new(WatchedIo::new(stream, Arc::clone(&connection)));
        let served = self
            .http
            .serve_connection(io, TowerToHyperService::new(service))
            .into_owned();
        let open = self.metrics.clone().map(OpenConnection::new);
        let watched = Arc::clone(&connection);
        let task = self.connections.spawn(async move {
            let reason = serve_connection(served, &watched).await;
            if let (Some(open), Some(reason)) = (open, reason) {
                open.closed(reason);
            }
        });
        self.open.insert(task.id(), connection);
    }

    /// Stops accepting, asks every connection to finish, waits up to `grace`, then cuts the rest.
    /// Returns whether everything finished in time.
    async fn drain(mut self, grace: Duration) -> bool {
        drop(self.listener);
        drop(self.waiting.take());
        for connection in self.open.values() {
            connection.request_close(CloseReason::Drain);
        }
        let connections = &mut self.connections;
        let drained = tokio::time::timeout(grace, async { while connections.join_next().await.is_some() {} })
            .await
            .is_ok();
        self.connections.shutdown().await;
        drained
    }
}

/// Serves one connection until it ends or its watchdog closes it (the listener draining included).
/// Returns the watchdog's reason when it was the watchdog.
async fn serve_connection<C>(served: C, connection: &Connection) -> Option<CloseReason>
where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    let mut served = std::pin::pin!(served);
    let reason = tokio::select! {
        biased;
        result = served.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%error, "connection ended with an error");
            }
            return None;
        }
        reason = connection.watch() => reason,
    };
    match reason {
        // Nothing more can be written: drop it, which closes the socket.
        CloseReason::WriteTimeout => {}
        // Draining: the listener cuts whatever is left after its grace period.
        CloseReason::Drain => {
            served.as_mut().graceful_shutdown();
            let _ = served.await;
        }
        // Asked to finish (GOAWAY for HTTP/2), then cut if it takes long. One that never sent a
        // request has nothing to finish: one poll writes its GOAWAY, then it is closed.
        CloseReason::Idle | CloseReason::Resets | CloseReason::Shed => {
            served.as_mut().graceful_shutdown();
            let grace = if connection.has_served() {
                CLOSE_GRACE
            } else {
                Duration::ZERO
            };
            let _ = tokio::time::timeout(grace, served).await;
        }
    }
    Some(reason)
}

/// Counts a public connection as open until its task ends, however it ends.
struct OpenConnection(ConnectionMetrics);

impl OpenConnection {
    fn new(metrics: ConnectionMetrics) -> Self {
        metrics.opened();
        Self(metrics)
    }

    fn closed(&self, reason: CloseReason) {
        self.0.closed(reason);
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.ended();
    }
}

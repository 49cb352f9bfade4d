//! Listeners, connections and graceful shutdown.
//!
//! [`Gateway::bind`] builds the gateway's parts first ([`App`]: everything that can fail on
//! configuration, such as TLS roots) and only then binds both ports, so a bad config never leaves
//! a half-started process.
//! [`Gateway::serve`] accepts until the shutdown future resolves, then: `/readyz` turns 503 (and,
//! for `shutdown_delay`, requests are still accepted while load balancers notice), the public
//! listener closes (new connections are refused), in-flight requests get `shutdown_grace`
//! to finish (HTTP/1 keep-alive connections are closed once idle, HTTP/2 gets GOAWAY), and whatever
//! is left after the grace period is cut, with a warning.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::admin;
use crate::app::{App, AppError};
use crate::config::Config;
use crate::response::Body;
use crate::secret::Secrets;
use crate::upstream::KeyRotation;

/// Connections the admin port serves at once (probes and scrapes need few).
const ADMIN_MAX_CONNECTIONS: usize = 64;
/// HTTP/2 streams a client may reset before the server has accepted them, before the connection
/// is closed.
const MAX_PENDING_RESET_STREAMS: usize = 20;
/// hyper's own bound on an HTTP/1 request head; above the gateway's JSON-answered limits.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);
/// How long admin connections get to finish once the public side has drained.
const ADMIN_GRACE: Duration = Duration::from_secs(1);

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    App(#[from] AppError),
    #[error("cannot listen on {addr} ({which}): {source}")]
    Bind {
        which: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A gateway with both ports bound, ready to serve.
pub struct Gateway {
    public: TcpListener,
    admin: TcpListener,
    app: App,
    limits: ConnectionLimits,
    shutdown_delay: Duration,
    shutdown_grace: Duration,
}

impl Gateway {
    /// Builds the gateway's parts ([`App::new`]: everything that can fail on configuration), then
    /// binds both ports.
    pub async fn bind(config: &Config, secrets: &Secrets) -> Result<Self, StartError> {
        let app = App::new(config, secrets)?;
        let public = bind("public", config.server.listen).await?;
        let admin = bind("admin", config.server.admin_listen).await?;
        Ok(Self {
            public,
            admin,
            app,
            limits: ConnectionLimits {
                max_connections: config.server.max_connections.get(),
                header_read_timeout: config.server.header_read_timeout,
                http2_max_concurrent_streams: config.server.http2_max_concurrent_streams,
            },
            shutdown_delay: config.server.shutdown_delay,
            shutdown_grace: config.server.shutdown_grace,
        })
    }

    pub fn public_addr(&self) -> SocketAddr {
        self.public.local_addr().expect("a bound listener has an address")
    }

    /// Replaces the upstream key while serving (see `upstream::KeyRotation`).
    pub fn key_rotation(&self) -> KeyRotation {
        self.app.key_rotation.clone()
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr().expect("a bound listener has an address")
    }

    /// Serves until `shutdown` resolves, then drains as described in the module documentation.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let (public_addr, admin_addr) = (self.public_addr(), self.admin_addr());
        let public_service = TowerToHyperService::new(self.app.public_service());
        let readiness = self.app.admin.readiness.clone();
        let admin_state = self.app.admin;
        let admin_service =
            hyper::service::service_fn(move |request| admin::handle(request, admin_state.clone()));
        let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let admin_task = tokio::spawn(async move {
            let admin_limits = ConnectionLimits {
                max_connections: ADMIN_MAX_CONNECTIONS,
                ..self.limits
            };
            let mut admin = Acceptor::new(self.admin, admin_service, admin_limits);
            admin
                .accept_until(async {
                    let _ = admin_stopped.await;
                })
                .await;
            admin.drain(ADMIN_GRACE).await;
        });

        let mut public = Acceptor::new(self.public, public_service, self.limits);
        readiness.set(true);
        tracing::info!(%public_addr, %admin_addr, "gateway ready");
        public.accept_until(shutdown).await;

        readiness.set(false);
        if !self.shutdown_delay.is_zero() {
            // Load balancers route by readiness, which they learn with a delay: keep serving
            // new requests until they have stopped sending any.
            tracing::info!(delay = ?self.shutdown_delay, "shutting down: not ready, still serving");
            public.accept_until(tokio::time::sleep(self.shutdown_delay)).await;
        }
        tracing::info!(grace = ?self.shutdown_grace, "shutting down: draining in-flight requests");
        if public.drain(self.shutdown_grace).await {
            tracing::info!("drained");
        } else {
            tracing::warn!(grace = ?self.shutdown_grace, "shutdown grace elapsed: cutting remaining connections");
        }
        let _ = stop_admin.send(());
        if let Err(error) = admin_task.await {
            tracing::error!(%error, "admin listener task failed");
        }
    }
}

/// Waits for a free connection slot, then for a connection. While every slot is taken, new
/// connections wait in the kernel's accept queue (and time out there if it stays full).
async fn accept_with_slot(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> (
    OwnedSemaphorePermit,
    std::io::Result<(tokio::net::TcpStream, SocketAddr)>,
) {
    let slot = Arc::clone(slots)
        .acquire_owned()
        .await
        .expect("the connection semaphore is never closed");
    (slot, listener.accept().await)
}

async fn bind(which: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { which, addr, source })
}

/// What one listener allows its clients.
#[derive(Debug, Clone, Copy)]
struct ConnectionLimits {
    /// Connections served at once; more wait in the kernel's accept queue.
    max_connections: usize,
    /// Time to send a request head; also how long a keep-alive connection may idle.
    header_read_timeout: Duration,
    /// Concurrent HTTP/2 streams per connection.
    http2_max_concurrent_streams: u32,
}

/// Accepts connections on one listener and tracks them for draining.
struct Acceptor<S> {
    listener: TcpListener,
    service: S,
    http: auto::Builder<TokioExecutor>,
    graceful: GracefulShutdown,
    connections: JoinSet<()>,
    /// One permit per connection being served.
    slots: Arc<Semaphore>,
}

impl<S> Acceptor<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    fn new(listener: TcpListener, service: S, limits: ConnectionLimits) -> Self {
        let mut http = auto::Builder::new(TokioExecutor::new());
        http.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(MAX_HEAD_BYTES);
        // HTTP/2: bounded streams per connection, and a connection that keeps opening and
        // resetting streams (CVE-2023-44487, "rapid reset") is closed with ENHANCE_YOUR_CALM.
        http.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.http2_max_concurrent_streams)
            .max_pending_accept_reset_streams(MAX_PENDING_RESET_STREAMS)
            .max_header_list_size(MAX_HEAD_BYTES as u32);
        Self {
            listener,
            service,
            http,
            graceful: GracefulShutdown::new(),
            connections: JoinSet::new(),
            slots: Arc::new(Semaphore::new(limits.max_connections)),
        }
    }

    /// Accepts until `stop` resolves; finished connection tasks are reaped as it goes.
    async fn accept_until(&mut self, stop: impl Future<Output = ()>) {
        let mut stop = std::pin::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return,
                Some(_) = self.connections.join_next(), if !self.connections.is_empty() => {}
                (slot, accepted) = accept_with_slot(&self.listener, &self.slots) => match accepted {
                    Ok((stream, _peer)) => self.spawn_connection(stream, slot),
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    }
                },
            }
        }
    }

    fn spawn_connection(&mut self, stream: tokio::net::TcpStream, slot: OwnedSemaphorePermit) {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
        let connection = self
            .http
            .serve_connection(TokioIo::new(stream), self.service.clone())
            .into_owned();
        let connection = self.graceful.watch(connection);
        self.connections.spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(error = %error, "connection ended with an error");
            }
            drop(slot);
        });
    }

    /// Stops accepting, asks every connection to finish, waits up to `grace`, then cuts the rest.
    /// Returns whether everything finished in time.
    async fn drain(self, grace: Duration) -> bool {
        let Self {
            listener,
            graceful,
            mut connections,
            ..
        } = self;
        drop(listener);
        let drained = tokio::time::timeout(grace, graceful.shutdown()).await.is_ok();
        connections.shutdown().await;
        drained
    }
}

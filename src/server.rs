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
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::admin;
use crate::app::{App, AppError};
use crate::config::Config;
use crate::response::Body;
use crate::secret::ApiKey;

/// A client has this long to send its request head before the connection is closed (slowloris).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
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
    shutdown_delay: Duration,
    shutdown_grace: Duration,
}

impl Gateway {
    /// Builds the gateway's parts ([`App::new`]: everything that can fail on configuration), then
    /// binds both ports.
    pub async fn bind(config: &Config, key: &ApiKey) -> Result<Self, StartError> {
        let app = App::new(config, key)?;
        let public = bind("public", config.server.listen).await?;
        let admin = bind("admin", config.server.admin_listen).await?;
        Ok(Self {
            public,
            admin,
            app,
            shutdown_delay: config.server.shutdown_delay,
            shutdown_grace: config.server.shutdown_grace,
        })
    }

    pub fn public_addr(&self) -> SocketAddr {
        self.public.local_addr().expect("a bound listener has an address")
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
            let mut admin = Acceptor::new(self.admin, admin_service);
            admin
                .accept_until(async {
                    let _ = admin_stopped.await;
                })
                .await;
            admin.drain(ADMIN_GRACE).await;
        });

        let mut public = Acceptor::new(self.public, public_service);
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

async fn bind(which: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { which, addr, source })
}

/// Accepts connections on one listener and tracks them for draining.
struct Acceptor<S> {
    listener: TcpListener,
    service: S,
    http: auto::Builder<TokioExecutor>,
    graceful: GracefulShutdown,
    connections: JoinSet<()>,
}

impl<S> Acceptor<S>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    fn new(listener: TcpListener, service: S) -> Self {
        let mut http = auto::Builder::new(TokioExecutor::new());
        http.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .max_buf_size(MAX_HEAD_BYTES);
        http.http2().timer(TokioTimer::new());
        Self {
            listener,
            service,
            http,
            graceful: GracefulShutdown::new(),
            connections: JoinSet::new(),
        }
    }

    /// Accepts until `stop` resolves; finished connection tasks are reaped as it goes.
    async fn accept_until(&mut self, stop: impl Future<Output = ()>) {
        let mut stop = std::pin::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return,
                Some(_) = self.connections.join_next(), if !self.connections.is_empty() => {}
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _peer)) => self.spawn_connection(stream),
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    }
                },
            }
        }
    }

    fn spawn_connection(&mut self, stream: tokio::net::TcpStream) {
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

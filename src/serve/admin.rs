//! The admin port: liveness and readiness for orchestrators, `/metrics` for Prometheus, and the
//! operator's purge of a stored run (`DELETE /cache/runs/{runId}`, `DELETE
//! /cache/not-found/{runId}`, see [`super::purge`]).
//!
//! It listens apart from the public port so probes and scrapes never compete with client traffic
//! and operators can keep it off the public network (the public port answers 404 on these paths). `/healthz` answers 200 while the process can
//! answer at all; `/readyz` answers 200 only between "listeners bound" and "shutdown started", so a
//! load balancer stops sending traffic while in-flight requests drain. Anyone who can reach the
//! port can purge: purging exposes nothing and costs upstream calls only, but keep the port
//! private all the same.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};

use crate::cache::RunStore;
use crate::edge::error::error_body;
use crate::edge::response::{Body, NO_STORE, json};
use crate::ops::metrics::{self, Metrics};
use crate::serve::purge;
use crate::upstream::budget::Budget;
use crate::upstream::pool::PoolOccupancy;
use crate::watch::Watches;

/// Whether the gateway should receive traffic. Shared by the server (writer) and `/readyz`.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    pub readiness: Readiness,
    pub metrics: Metrics,
    /// Read at scrape time for the occupancy gauges.
    pub store: RunStore,
    /// Read at scrape time for the cooldown gauge.
    pub budget: Budget,
    /// Read at scrape time for the upstream connection gauges.
    pub upstream_connections: PoolOccupancy,
    /// Purges go through the held clients' side, which owns the replicas' channel.
    pub watches: Watches,
}

/// Answers one admin request.
pub async fn handle<B>(request: Request<B>, state: AdminState) -> Result<Response<Body>, Infallible> {
    if let Some((scope, raw_id)) = purge::target(request.uri().path()) {
        return Ok(purge::handle(request.method(), scope, raw_id, &state.watches).await);
    }
    let known = matches!(request.uri().path(), "/healthz" | "/metrics" | "/readyz");
    if known && request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = json(
            StatusCode::METHOD_NOT_ALLOWED,
            error_body(
                "METHOD_NOT_ALLOWED",
                "admin endpoints answer GET and HEAD (purges: DELETE /cache/runs/{runId}, DELETE /cache/not-found/{runId})",
                None,
                false,
            ),
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(response);
    }
    let response = match request.uri().path() {
        "/healthz" => json(StatusCode::OK, Bytes::from_static(b"{\"status\":\"ok\"}")),
        "/metrics" => scrape(&state).await,
        "/readyz" if state.readiness.is_ready() => {
            json(StatusCode::OK, Bytes::from_static(b"{\"status\":\"ready\"}"))
        }
        "/readyz" => json(
            StatusCode::SERVICE_UNAVAILABLE,
            Bytes::from_static(b"{\"status\":\"not ready\"}"),
        ),
        _ => json(
            StatusCode::NOT_FOUND,
            error_body(
                "NOT_FOUND",
                "admin endpoints: /healthz, /readyz, /metrics, /cache/runs/{runId}, /cache/not-found/{runId}",
                None,
                false,
            ),
        ),
    };
    Ok(response)
}

/// The Prometheus text exposition, with the cache and cooldown gauges brought up to date first.
async fn scrape(state: &AdminState) -> Response<Body> {
    let (entries, bytes) = state.store.occupancy().await;
    state.metrics.cache.set_occupancy(entries, bytes);
    state
        .metrics
        .budget
        .set_cooldown(state.budget.cooldown_remaining());
    state
        .metrics
        .upstream
        .set_connections(state.upstream_connections.now());
    let mut response = Response::new(Body::new(Bytes::from(state.metrics.render()), None));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(metrics::CONTENT_TYPE));
    headers.insert(CACHE_CONTROL, NO_STORE);
    response
}

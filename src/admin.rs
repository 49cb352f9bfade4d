//! The admin port: liveness and readiness for orchestrators (and `/metrics`, in a later change).
//!
//! It listens apart from the public port so probes and scrapes never compete with client traffic
//! and operators can keep it off the public network. `/healthz` answers 200 while the process can
//! answer at all; `/readyz` answers 200 only between "listeners bound" and "shutdown started", so a
//! load balancer stops sending traffic while in-flight requests drain.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};

use crate::error::error_body;
use crate::response::{Body, json};

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

/// Answers one admin request.
pub async fn handle<B>(
    request: Request<B>,
    readiness: Readiness,
) -> Result<Response<Body>, Infallible> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return Ok(json(
            StatusCode::METHOD_NOT_ALLOWED,
            error_body(
                "METHOD_NOT_ALLOWED",
                "admin endpoints answer GET and HEAD",
                None,
                false,
            ),
        ));
    }
    let response = match request.uri().path() {
        "/healthz" => json(StatusCode::OK, Bytes::from_static(b"{\"status\":\"ok\"}")),
        "/readyz" if readiness.is_ready() => json(
            StatusCode::OK,
            Bytes::from_static(b"{\"status\":\"ready\"}"),
        ),
        "/readyz" => json(
            StatusCode::SERVICE_UNAVAILABLE,
            Bytes::from_static(b"{\"status\":\"not ready\"}"),
        ),
        _ => json(
            StatusCode::NOT_FOUND,
            error_body(
                "NOT_FOUND",
                "admin endpoints: /healthz, /readyz",
                None,
                false,
            ),
        ),
    };
    Ok(response)
}

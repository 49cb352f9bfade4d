//! The demo's webhook deliveries: when a simulated run ends, a signed `workflow.run.completed` or
//! `workflow.run.failed` event is posted to the gateway's own webhook listener, as Plextera would,
//! so `--demo` shows held clients answered by an event.
//!
//! Signed with [`DEMO_WEBHOOK_SECRET`] (not a secret) over plain HTTP/1.1 on loopback; a delivery
//! that fails is logged and not retried (the watchers' polls are the safety net, as in
//! production).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{Request, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpStream;

use crate::webhook::signature::{SIGNATURE_HEADER, sign};

/// The signing secret the demo's events carry and its webhook listener accepts; not a secret.
pub const DEMO_WEBHOOK_SECRET: &str = "demo-webhook-secret";
/// Longest a delivery may take.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the demo posts its events.
#[derive(Debug, Clone)]
pub struct EventTarget {
    pub addr: SocketAddr,
    pub path: String,
}

/// Posts the event saying run `id` ended with `status` (`COMPLETED` or `FAILED`).
pub(super) async fn deliver(target: Arc<EventTarget>, id: String, status: &'static str) {
    let event_type = match status {
        "FAILED" => "workflow.run.failed",
        _ => "workflow.run.completed",
    };
    let event_id = format!("evt_{}", uuid::Uuid::new_v4().simple());
    let body = Bytes::from(
        json!({
            "eventId": event_id,
            "eventType": event_type,
            "occurredAt": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            "apiVersion": "v1",
            "data": { "runId": id, "status": status }
        })
        .to_string(),
    );
    match tokio::time::timeout(DELIVERY_TIMEOUT, post(&target, &event_id, event_type, body)).await {
        Ok(Ok(status)) => {
            tracing::info!(run_id = id, event_type, %status, "demo: run ended, event delivered")
        }
        Ok(Err(error)) => tracing::warn!(run_id = id, event_type, %error, "demo: event not delivered"),
        Err(_) => tracing::warn!(run_id = id, event_type, "demo: event delivery timed out"),
    }
}

async fn post(
    target: &EventTarget,
    event_id: &str,
    event_type: &str,
    body: Bytes,
) -> Result<StatusCode, Box<dyn std::error::Error + Send + Sync>> {
    let stream = TcpStream::connect(target.addr).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let signature = sign(DEMO_WEBHOOK_SECRET.as_bytes(), &body, SystemTime::now());
    let request = Request::post(target.path.as_str())
        .header(HOST, target.addr.to_string())
        .header(CONTENT_TYPE, "application/json")
        .header(SIGNATURE_HEADER, signature)
        .header("x-plextera-event-id", event_id)
        .header("x-plextera-event-type", event_type)
        .body(Full::new(body))?;
    Ok(sender.send_request(request).await?.status())
}

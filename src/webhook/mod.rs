//! Webhook ingest: Plextera's signed run events, received on a port of their own.
//!
//! One route, `POST webhook.path`, and nothing else on that port, so the only thing facing the
//! internet is a handler that refuses a request without a well-formed signature header before
//! reading its body, reads at most `webhook.max_body_size` bytes, checks the signature
//! ([`signature`]) before anything parses the body, and answers at once: the work an event asks
//! for runs after the answer, in a task of its own. A delivery is answered
//!
//! - `202` `{"status":"accepted"}`: a verified run event seen for the first time; a confirming call
//!   follows ([`crate::watch::Watches::confirm`]): the event's own body is never served as a run;
//! - `200` `{"status":"duplicate"}`: an event id seen before ([`seen`]): nothing done;
//! - `200` `{"status":"ignored"}`: a verified event of a type the gateway does not act on, or a
//!   run event that names no usable run id;
//! - `401` `INVALID_SIGNATURE` or `STALE_TIMESTAMP`, `413` `PAYLOAD_TOO_LARGE`, `400`
//!   `INVALID_EVENT` (verified, but not an event), `404` another path, `405` another method,
//!   `503` `WEBHOOK_BUSY` (too many bodies being read or confirming calls in flight; the event is
//!   not marked seen, so Plextera's redelivery is acted on).
//!
//! Bodies are read by at most [`MAX_BODIES_AT_ONCE`] requests at once, each within
//! [`BODY_READ_TIMEOUT`], so unsigned posts can pin at most that many `webhook.max_body_size`
//! buffers. Every verified run event (duplicates included) tells the watchers that events flow
//! ([`crate::watch::events`]).
//!
//! The signing secrets are swapped whole when `webhook.secrets_file` is rotated
//! ([`Webhooks::replace_secrets`]): each delivery is checked against one set, old or new.

pub mod event;
pub mod metrics;
pub mod seen;
pub mod signature;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{ALLOW, CONTENT_LENGTH, HeaderValue, RETRY_AFTER};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::sync::Semaphore;
use tracing::Instrument;

use self::event::EventType;
use self::metrics::{EventOutcome, WebhookMetrics};
use self::seen::SeenEvents;
use self::signature::{Refusal, SIGNATURE_HEADER, Signature, Verifier};
use crate::config::WebhookConfig;
use crate::edge::error::error_body;
use crate::edge::response::{Body, json};
use crate::watch::Watches;

/// The (unsigned) header naming the event's type, read only to label refusals.
const EVENT_TYPE_HEADER: &str = "x-plextera-event-type";
/// Longest wait for a body to arrive once its head has (Plextera's are a few KB).
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests reading their body at once; others wait up to 1 s for a turn, then get 503.
pub const MAX_BODIES_AT_ONCE: usize = 64;
/// How long a request waits for a body-reading slot.
const BODY_SLOT_WAIT: Duration = Duration::from_secs(1);
/// Confirming calls in flight at once; past it, deliveries get 503 and are delivered again.
pub const MAX_CONFIRMING: usize = 1024;
/// `Retry-After` on 503 `WEBHOOK_BUSY`, in seconds.
const BUSY_RETRY_AFTER_SECS: u64 = 5;

/// The webhook route's state. Cheap to clone.
#[derive(Clone)]
pub struct Webhooks {
    inner: Arc<Inner>,
}

struct Inner {
    path: String,
    max_body_size: usize,
    /// Replaced whole when the secrets are rotated.
    verifier: ArcSwap<Verifier>,
    tolerance: Duration,
    seen: SeenEvents,
    watches: Watches,
    /// Slots for reading a body: bounds the memory unsigned posts can hold.
    reading: Semaphore,
    confirming: Arc<Semaphore>,
    metrics: WebhookMetrics,
}

impl Webhooks {
    /// `secrets`: the signing secrets in force (from `webhook.secrets_env`).
    pub fn new<S: AsRef<[u8]>>(
        config: &WebhookConfig,
        secrets: &[S],
        watches: Watches,
        metrics: WebhookMetrics,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                path: config.path.clone(),
                max_body_size: usize::try_from(config.max_body_size.as_u64()).unwrap_or(usize::MAX),
                verifier: ArcSwap::from_pointee(Verifier::new(secrets, config.tolerance)),
                tolerance: config.tolerance,
                seen: SeenEvents::default(),
                watches,
                reading: Semaphore::new(MAX_BODIES_AT_ONCE),
                confirming: Arc::new(Semaphore::new(MAX_CONFIRMING)),
                metrics,
            }),
        }
    }

    /// Verifies deliveries with `secrets` instead of the current ones, from the next one on.
    pub fn replace_secrets<S: AsRef<[u8]>>(&self, secrets: &[S]) {
        let verifier = Verifier::new(secrets, self.inner.tolerance);
        self.inner.verifier.store(Arc::new(verifier));
    }

    /// Answers one delivery (see the module documentation).
    pub async fn handle<B>(self, request: Request<B>) -> Result<Response<Body>, Infallible>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        Ok(self.inner.handle(request).await)
    }
}

impl Inner {
    async fn handle<B>(&self, request: Request<B>) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        if request.uri().path() != self.path {
            return refusal(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                "no such path on the webhook port",
            );
        }
        if request.method() != Method::POST {
            let mut response = refusal(
                StatusCode::METHOD_NOT_ALLOWED,
                "METHOD_NOT_ALLOWED",
                "events are delivered with POST",
            );
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("POST"));
            return response;
        }
        let (parts, body) = request.into_parts();
        // Until the signature is verified, the type is only a (bounded) label.
        let claimed = parts
            .headers
            .get(EVENT_TYPE_HEADER)
            .and_then(|value| value.to_str().ok())
            .map_or(EventType::Other, EventType::read);
        let declared_too_large = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok()?.parse::<u64>().ok())
            .is_some_and(|length| length > self.max_body_size as u64);
        if declared_too_large {
            return self.too_large(claimed);
        }
        // A request with no signature at all is refused before its body is read.
        let signature = match Signature::read(parts.headers.get(SIGNATURE_HEADER).map(HeaderValue::as_bytes))
        {
            Ok(signature) => signature,
            Err(refused) => return self.refused(claimed, refused),
        };
        let Ok(Ok(_reading)) = tokio::time::timeout(BODY_SLOT_WAIT, self.reading.acquire()).await else {
            return self.busy(claimed, "too many deliveries being read; deliver it again later");
        };
        let body = match tokio::time::timeout(
            BODY_READ_TIMEOUT,
            Limited::new(body, self.max_body_size).collect(),
        )
        .await
        {
            Ok(Ok(body)) => body.to_bytes(),
            Ok(Err(error)) if error.is::<LengthLimitError>() => return self.too_large(claimed),
            Ok(Err(_)) | Err(_) => {
                self.metrics.event(claimed, EventOutcome::BadRequest);
                return refusal(
                    StatusCode::BAD_REQUEST,
                    "INVALID_EVENT",
                    "the body did not arrive whole",
                );
            }
        };
        if let Err(refused) = self
            .verifier
            .load()
            .verify_signature(&signature, &body, SystemTime::now())
        {
            return self.refused(claimed, refused);
        }
        let Ok(event) = event::read(&body) else {
            self.metrics.event(claimed, EventOutcome::BadRequest);
            return refusal(
                StatusCode::BAD_REQUEST,
                "INVALID_EVENT",
                "signed, but not an event: a JSON object with eventId, eventType and, for run events, data.runId",
            );
        };
        if event.kind != EventType::Other {
            self.watches.event_arrived();
        }
        let Some(run) = event.run.clone() else {
            if event.kind != EventType::Other {
                tracing::warn!(
                    event_id = event.id.as_str(),
                    event_type = event.kind.name(),
                    "a signed run event names no usable run id (data.runId): acknowledged, nothing done"
                );
            }
            // Not acted on: remembered by this replica only (no key in the shared tier for it).
            let outcome = if self.seen.first_time(&event.id).await {
                EventOutcome::Ignored
            } else {
                EventOutcome::Duplicate
            };
            return self.acknowledged(&event, outcome);
        };
        // A slot first, so an event refused for now is not marked seen and its redelivery counts.
        let Ok(slot) = Arc::clone(&self.confirming).try_acquire_owned() else {
            return self.busy(
                event.kind,
                "too many run events being confirmed; deliver it again later",
            );
        };
        if !self.first_time(&event.id).await {
            return self.acknowledged(&event, EventOutcome::Duplicate);
        }
        let watches = self.watches.clone();
        let metrics = self.metrics.clone();
        let span = tracing::info_span!(
            "webhook",
            event_id = event.id.as_str(),
            event_type = event.kind.name(),
            run_id = run.as_str()
        );
        tokio::spawn(
            async move {
                let _slot = slot;
                let (confirmation, call) = watches.confirm(run).await;
                metrics.confirmed(confirmation, call);
                tracing::info!(
                    result = confirmation.label(),
                    call = call.label(),
                    "run event confirmed"
                );
            }
            .instrument(span),
        );
        self.acknowledged(&event, EventOutcome::Accepted)
    }

    /// Whether event `id` is seen for the first time: here, and (with a shared Redis tier) in the
    /// whole fleet, so a redelivery that lands on another replica does nothing either.
    async fn first_time(&self, id: &str) -> bool {
        self.seen.first_time(id).await
            && self
                .watches
                .first_event_in_fleet(seen::key(id), seen::KEPT_FOR)
                .await
    }

    fn acknowledged(&self, event: &event::Event, outcome: EventOutcome) -> Response<Body> {
        self.metrics.event(event.kind, outcome);
        let (status, body) = match outcome {
            EventOutcome::Accepted => (StatusCode::ACCEPTED, &b"{\"status\":\"accepted\"}"[..]),
            EventOutcome::Duplicate => (StatusCode::OK, &b"{\"status\":\"duplicate\"}"[..]),
            _ => (StatusCode::OK, &b"{\"status\":\"ignored\"}"[..]),
        };
        json(status, Bytes::from_static(body))
    }

    fn refused(&self, claimed: EventType, refused: Refusal) -> Response<Body> {
        let (outcome, code, message) = match refused {
            Refusal::InvalidSignature => (
                EventOutcome::InvalidSignature,
                "INVALID_SIGNATURE",
                "X-Plextera-Signature is missing, malformed, or matches no signing secret for this body",
            ),
            Refusal::StaleTimestamp => (
                EventOutcome::Stale,
                "STALE_TIMESTAMP",
                "the signature's timestamp is too far from now (webhook.tolerance)",
            ),
        };
        self.metrics.event(claimed, outcome);
        refusal(StatusCode::UNAUTHORIZED, code, message)
    }

    fn busy(&self, kind: EventType, message: &str) -> Response<Body> {
        self.metrics.event(kind, EventOutcome::Busy);
        let mut response = refusal(StatusCode::SERVICE_UNAVAILABLE, "WEBHOOK_BUSY", message);
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(BUSY_RETRY_AFTER_SECS));
        response
    }

    fn too_large(&self, claimed: EventType) -> Response<Body> {
        self.metrics.event(claimed, EventOutcome::TooLarge);
        refusal(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            "the body is larger than webhook.max_body_size",
        )
    }
}

fn refusal(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json(status, error_body(code, message, None, false))
}

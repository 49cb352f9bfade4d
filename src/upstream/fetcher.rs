//! One fetch of a run from upstream, within the budget, read into one typed answer.
//!
//! The budget admits the call first (or refuses it: 429 `GATEWAY_RATE_LIMITED` when it is spent,
//! 429 `UPSTREAM_RATE_LIMITED` while upstream's 429 pause runs). Then upstream's status is given its
//! meaning for the gateway: 401/403 say the gateway's own key is wrong, not the client's request,
//! so they become 502 `UPSTREAM_AUTH`, logged at ERROR; 1xx/3xx become 502
//! `UPSTREAM_BAD_RESPONSE`, and so does a body sent with a `Content-Encoding` the gateway never
//! asked for (it could not be read for its status or an echoed key, nor forwarded as the JSON it
//! is labelled); a 429 is forwarded and starts the budget's shared cooldown. What is left is an
//! answer worth forwarding, and perhaps storing.

use http::StatusCode;

use super::budget::{self, Budget, Refusal};
use super::budget_metrics::{BudgetMetrics, RefusalReason};
use super::{Upstream, UpstreamError, UpstreamResponse};
use crate::edge::error::GatewayError;
use crate::ops::trace_context::CallIds;
use crate::run::id::RunId;

/// The upstream client behind its budget. Cheap to clone.
#[derive(Clone)]
pub struct Fetcher {
    upstream: Upstream,
    budget: Budget,
    metrics: BudgetMetrics,
}

impl Fetcher {
    pub fn new(upstream: Upstream, budget: Budget, metrics: BudgetMetrics) -> Self {
        Self {
            upstream,
            budget,
            metrics,
        }
    }

    /// Fetches `id` once: an answer to forward (2xx, 4xx other than 401/403, 5xx), or the error a
    /// client gets instead.
    pub async fn fetch(&self, id: &RunId, ids: &CallIds) -> Result<UpstreamResponse, GatewayError> {
        let admission = self
            .budget
            .admit()
            .await
            .map_err(|refusal| self.refused(refusal))?;
        let answer = self.upstream.fetch(id, ids).await;
        drop(admission);
        // A failure is logged by the upstream client, with the upstream's origin and the cause.
        let answer = answer.map_err(upstream_failure)?;
        tracing::Span::current().record("plextera.upstream.duration", answer.elapsed.as_secs_f64());
        self.read_status(answer)
    }

    /// What upstream's status means for the gateway.
    fn read_status(&self, answer: UpstreamResponse) -> Result<UpstreamResponse, GatewayError> {
        if answer.encoded {
            tracing::warn!(
                upstream_status = answer.status.as_u16(),
                "upstream sent an encoded (compressed) body the gateway did not ask for: not forwarded"
            );
            return Err(GatewayError::UpstreamBadResponse);
        }
        match answer.status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                tracing::error!(
                    upstream_status = answer.status.as_u16(),
                    "upstream refused the gateway's API key: check upstream.api_key_env / api_key_file"
                );
                Err(GatewayError::UpstreamAuth)
            }
            StatusCode::TOO_MANY_REQUESTS => {
                let pause = answer
                    .retry_after
                    .as_ref()
                    .and_then(budget::parse_retry_after)
                    .unwrap_or(budget::DEFAULT_COOLDOWN);
                tracing::warn!(?pause, "upstream rate limit reached: holding upstream calls");
                self.budget.cool_down(pause);
                Ok(answer)
            }
            status if status.is_informational() || status.is_redirection() => {
                tracing::warn!(upstream_status = status.as_u16(), "unexpected upstream status");
                Err(GatewayError::UpstreamBadResponse)
            }
            _ => Ok(answer),
        }
    }

    fn refused(&self, refusal: Refusal) -> GatewayError {
        match refusal {
            Refusal::Exhausted { retry_after } => {
                self.metrics.refused(RefusalReason::Exhausted);
                tracing::warn!(?retry_after, "upstream budget spent: refusing");
                GatewayError::RateLimited {
                    retry_after_secs: budget::retry_after_secs(retry_after),
                }
            }
            Refusal::CoolingDown { retry_after } => {
                self.metrics.refused(RefusalReason::Cooldown);
                GatewayError::UpstreamCoolingDown {
                    retry_after_secs: budget::retry_after_secs(retry_after),
                }
            }
        }
    }
}

fn upstream_failure(error: UpstreamError) -> GatewayError {
    match error {
        UpstreamError::Timeout => GatewayError::UpstreamTimeout,
        UpstreamError::Connect | UpstreamError::Broken => GatewayError::UpstreamUnavailable,
        UpstreamError::BodyTooLarge => GatewayError::UpstreamBodyTooLarge,
    }
}

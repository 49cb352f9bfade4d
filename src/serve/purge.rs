//! The admin port's purge endpoints: `DELETE /cache/runs/{runId}` drops a run's stored answer
//! (an ended run, in memory and in Redis, or a remembered 404), `DELETE /cache/not-found/{runId}`
//! only a remembered 404; with `[cache.shared]`, every other replica is told to drop its memory
//! copy too ([`crate::watch::Watches::purge`]).
//!
//! For the day Plextera corrects a run the gateway already keeps as ended. Redis is purged before
//! the other replicas are told and once more after, so a replica writing the run at that moment
//! does not leave the old copy there (docs/operations.md, "Purging a run", has the bounds).
//!
//! The answer says what was removed: 200 when everything the purge should reach was reached, 503
//! `SHARED_CACHE_UNAVAILABLE` when Redis could not be asked (this replica's memory is purged all
//! the same, and the purge can simply be sent again). The run id is read as on the public port:
//! one that is not valid is 400 `INVALID_RUN_ID`. One log line per purge says what went.

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use serde::Serialize;

use crate::cache::purge::{Scope, Shared};
use crate::edge::error::{Allowed, GatewayError};
use crate::edge::response::{Body, json};
use crate::run::id::RunId;
use crate::watch::{PurgeReport, Watches};

/// The prefixes of the purge paths, and what each purges.
const PATHS: [(&str, Scope); 2] = [
    ("/cache/runs/", Scope::Run),
    ("/cache/not-found/", Scope::NotFound),
];

/// What a purge path asks for: its scope and the raw run id; `None` for any other path.
pub fn target(path: &str) -> Option<(Scope, &str)> {
    PATHS
        .iter()
        .find_map(|(prefix, scope)| path.strip_prefix(prefix).map(|raw_id| (*scope, raw_id)))
}

/// Answers a request on a purge path.
pub async fn handle(method: &Method, scope: Scope, raw_id: &str, watches: &Watches) -> Response<Body> {
    if method != Method::DELETE {
        let allowed = Allowed::Delete;
        return GatewayError::MethodNotAllowed { allowed }.into_response(None);
    }
    let Ok(id) = RunId::parse(raw_id) else {
        return GatewayError::InvalidRunId.into_response(None);
    };
    let report = watches.purge(&id, scope).await;
    let answer = Answer::of(&id, scope, &report);
    let shared = match report.purged.shared {
        Some(Shared::Removed) => "removed",
        Some(Shared::Absent) => "absent",
        Some(Shared::Unavailable) => "unavailable",
        None => "not_asked",
    };
    let replicas = match report.replicas_told {
        Some(true) => "told",
        Some(false) => "not_told",
        None => "no_shared_tier",
    };
    if answer.error.is_some() {
        tracing::warn!(
            run_id = id.as_str(),
            scope = scope.as_str(),
            memory = report.purged.memory,
            shared,
            replicas,
            "purged this replica's memory only: Redis could not be reached"
        );
    } else {
        tracing::info!(
            run_id = id.as_str(),
            scope = scope.as_str(),
            memory = report.purged.memory,
            shared,
            replicas,
            "purged"
        );
    }
    let status = if answer.error.is_some() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let body = serde_json::to_vec(&answer).expect("a purge answer of strings and booleans serializes");
    json(status, Bytes::from(body))
}

/// The purge answer's body (docs/operations.md, "Purging a run").
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Answer<'a> {
    /// Present on a 503, in the gateway's error shape.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorDetail>,
    run_id: &'a str,
    scope: &'static str,
    removed: Removed,
    /// Whether the other replicas were told; `null` without `[cache.shared]`.
    replicas_told: Option<bool>,
}

#[derive(Serialize)]
struct Removed {
    /// This replica's memory held an answer in scope, now removed.
    memory: bool,
    /// Redis held the run, now deleted; `null` when Redis was not asked (no `[cache.shared]`, or
    /// a 404 purge: 404s are never written there).
    shared: Option<bool>,
}

#[derive(Serialize)]
struct ErrorDetail {
    code: &'static str,
    message: &'static str,
    retryable: bool,
}

impl<'a> Answer<'a> {
    fn of(id: &'a RunId, scope: Scope, report: &PurgeReport) -> Self {
        let unreachable =
            report.purged.shared == Some(Shared::Unavailable) || report.replicas_told == Some(false);
        Self {
            error: unreachable.then_some(ErrorDetail {
                code: "SHARED_CACHE_UNAVAILABLE",
                message: "removed from this replica's memory only: Redis could not be reached, so Redis and the other replicas may still hold the run; send the purge again",
                retryable: true,
            }),
            run_id: id.as_str(),
            scope: scope.as_str(),
            removed: Removed {
                memory: report.purged.memory,
                shared: report
                    .purged
                    .shared
                    .map(|shared| shared == Shared::Removed),
            },
            replicas_told: report.replicas_told,
        }
    }
}

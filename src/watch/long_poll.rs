//! A long-poll: a request with a wait and the `If-None-Match` of the version it holds, held until
//! the run has a new version, ends, or the wait runs out.
//!
//! Answered at once when there is nothing to wait for: no `If-None-Match` (with the run's
//! watcher's state when it has a watcher, as a plain request otherwise), an ended run (from memory or upstream), a version the client does not hold, a
//! run that is not there (404), or an upstream failure before the hold began. Once held, the
//! client gets the first new state its run's watcher publishes (200 with the new version or the
//! ended run; a 404 or `UPSTREAM_AUTH` that stopped the watch), or, at its deadline (up to
//! wait/16 early, never late) or on shutdown, a 304 with the version it holds; so does a client
//! whose wait runs out while the run's first call (no watcher yet) is still under way. Transient upstream
//! failures publish nothing, so they never end a wait.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, ETAG};
use http::{HeaderValue, Response, StatusCode};
use tokio::time::Instant;
use tower::Service;

use super::metrics::{HeldKind, HeldOutcome};
use super::snapshot::State;
use super::{Fresh, Hub, NotNow, jittered_deadline, render, shared};
use crate::cache::CacheOutcome;
use crate::edge::error::GatewayError;
use crate::edge::response::{APPLICATION_JSON, Body, NO_STORE, run_response};
use crate::edge::routes::RunRequest;

/// Answers `request`, holding it up to `wait` (already capped at `watch.max_wait`, non-zero).
pub(super) async fn serve(hub: Arc<Hub>, request: RunRequest, wait: Duration) -> Response<Body> {
    let deadline = Instant::now() + jittered_deadline(wait);
    let Some(if_none_match) = request.if_none_match.clone() else {
        // Nothing to compare with: answered at once, with the run's watcher's state when it has
        // one (a client's first long-poll on a run others watch costs no call), else as a plain
        // request.
        if let Some(current) = hub.current(&request.id) {
            return render(&hub, &current, Fresh::FromWatcher, &request);
        }
        let mut runs = hub.runs.clone();
        return match runs.call(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
    };
    if let Some(entry) = hub.runs.hit(&request.id).await {
        return hub.runs.render_hit(&entry, &request);
    }
    // The first call for a run nobody waits on yet may be slow; the answer never is late.
    let current = hub.current_or_fetch(&request, Some(&if_none_match));
    let (current, fresh) = match tokio::time::timeout_at(deadline, current).await {
        Ok(Ok(current)) => current,
        Ok(Err(NotNow::Full)) => return too_many(&request),
        Ok(Err(NotNow::Failed(response))) => return response,
        Err(_) => {
            hub.metrics.answered(HeldOutcome::Timeout);
            return unchanged(&if_none_match);
        }
    };
    if !current.is_held_by(&if_none_match) || hub.is_shutting_down() {
        return render(&hub, &current, fresh, &request);
    }
    let held = match hub.hold(&request.id, HeldKind::LongPoll, &current) {
        Ok(held) => held,
        Err(_) => return too_many(&request),
    };
    let mut updates = held.updates();
    let mut shutdown = held.shutdown();
    let (snapshot, outcome) = loop {
        let latest = updates.borrow_and_update().clone();
        if !latest.is_held_by(&if_none_match) {
            let outcome = held_outcome(&latest.state);
            break (latest, outcome);
        }
        let ended_by = tokio::select! {
            biased;
            _ = shutdown.wait_for(|draining| *draining) => HeldOutcome::Shutdown,
            () = tokio::time::sleep_until(deadline) => HeldOutcome::Timeout,
            changed = updates.changed() => match changed {
                Ok(()) => continue,
                // The watch is gone (cannot happen while held): answer with what there is.
                Err(_) => HeldOutcome::Timeout,
            },
        };
        // A change that landed with the deadline is still a change.
        let latest = updates.borrow().clone();
        let outcome = if latest.is_held_by(&if_none_match) {
            ended_by
        } else {
            held_outcome(&latest.state)
        };
        break (latest, outcome);
    };
    held.metrics().answered(outcome);
    drop(held);
    shared(render(&hub, &snapshot, Fresh::FromWatcher, &request), true)
}

/// 503 `TOO_MANY_WAITERS`: `watch.max_held` clients are held already.
fn too_many(request: &RunRequest) -> Response<Body> {
    GatewayError::TooManyWaiters {
        retry_after_secs: super::FULL_RETRY_AFTER_SECS,
    }
    .into_response(Some(&request.ids))
}

/// 304 when the wait ran out before the run's version was known: nothing is known to have
/// changed. Its `ETag` is the client's own when it named one tag.
fn unchanged(if_none_match: &HeaderValue) -> Response<Body> {
    let mut response = run_response(
        StatusCode::NOT_MODIFIED,
        APPLICATION_JSON,
        NO_STORE,
        CacheOutcome::Coalesced,
        Bytes::new(),
    );
    response.headers_mut().remove(CONTENT_TYPE);
    let single = if_none_match
        .to_str()
        .is_ok_and(|tags| !tags.contains(',') && tags.trim() != "*");
    if single {
        response.headers_mut().insert(ETAG, if_none_match.clone());
    }
    response.body_mut().set_held();
    response
}

/// How a state that differs from the client's answers its wait.
fn held_outcome(state: &State) -> HeldOutcome {
    match state {
        State::Going(_) => HeldOutcome::Changed,
        State::Ended(_) => HeldOutcome::Ended,
        State::Stopped => HeldOutcome::Error,
    }
}

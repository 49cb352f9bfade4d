//! A long-poll: a request with a wait and the `If-None-Match` of the version it holds, held until
//! the run has a new version, ends, or the wait runs out.
//!
//! Answered at once (as a plain request would be) when there is nothing to wait for: no
//! `If-None-Match`, an ended run (from memory or upstream), a version the client does not hold, a
//! run that is not there (404), or an upstream failure before the hold began. Once held, the
//! client gets the first new state its run's watcher publishes (200 with the new version or the
//! ended run; a 404 or `UPSTREAM_AUTH` that stopped the watch), or, at its deadline (up to
//! wait/16 early, never late) or on shutdown, a 304 with the version it holds. Transient upstream
//! failures publish nothing, so they never end a wait.

use std::sync::Arc;
use std::time::Duration;

use http::Response;
use tokio::time::Instant;

use super::metrics::{HeldKind, HeldOutcome};
use super::snapshot::State;
use super::{Fresh, Hub, jittered_deadline, render, shared};
use crate::edge::response::Body;
use crate::edge::routes::RunRequest;

/// Answers `request`, holding it up to `wait` (already capped at `watch.max_wait`, non-zero).
pub(super) async fn serve(hub: Arc<Hub>, request: RunRequest, wait: Duration) -> Response<Body> {
    let deadline = Instant::now() + jittered_deadline(wait);
    let Some(if_none_match) = request.if_none_match.clone() else {
        // Nothing to compare with: answered as a plain request.
        let (answer, role) = hub.runs.answer(&request).await;
        return hub.runs.render(answer, role, &request);
    };
    if let Some(entry) = hub.runs.hit(&request.id).await {
        return hub.runs.render_hit(&entry, &request);
    }
    let (current, fresh) = match hub.current_or_fetch(&request).await {
        Ok(current) => current,
        Err(response) => return response,
    };
    if !current.is_held_by(&if_none_match) || hub.is_shutting_down() {
        return render(&hub, &current, fresh, &request);
    }
    let held = match hub.hold(&request.id, HeldKind::LongPoll, &current) {
        Ok(held) => held,
        Err(refused) => return refused.into_response(Some(&request.request_id)),
    };
    let mut updates = held.updates();
    let mut shutdown = held.shutdown();
    let outcome = loop {
        let latest = updates.borrow_and_update().clone();
        if let Some(snapshot) = latest
            && !snapshot.is_held_by(&if_none_match)
        {
            let outcome = held_outcome(&snapshot.state);
            break (snapshot, outcome);
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
        let latest = updates.borrow().clone().unwrap_or(current);
        break (latest, ended_by);
    };
    let (snapshot, outcome) = outcome;
    held.metrics().answered(outcome);
    drop(held);
    shared(render(&hub, &snapshot, Fresh::FromWatcher, &request), true)
}

/// How a state that differs from the client's answers its wait.
fn held_outcome(state: &State) -> HeldOutcome {
    match state {
        State::Going(_) => HeldOutcome::Changed,
        State::Ended(_) => HeldOutcome::Ended,
        State::Stopped => HeldOutcome::Error,
    }
}

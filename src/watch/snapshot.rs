//! A run as its watcher last saw it, and what one upstream answer means for the clients held on it.
//!
//! Every answer a watcher (or a client) gets for a run is read into a [`State`]: the run is going
//! (with its version), it ended, the watch must stop with this answer (404, other 4xx, the
//! gateway's key refused), or the answer says nothing about the run (5xx, timeouts, 429 and the
//! budget's refusals: transient, not a state at all). Only states are published to held clients,
//! so a transient failure never wakes anyone.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::{HeaderValue, StatusCode};

use crate::cache::etag;
use crate::edge::error::GatewayError;
use crate::proxy::Answer;
use crate::run::status::RunStatuses;

/// What an answer says about a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Still going, at this version (weak: a ticking `computedDurationMs` is not a change).
    Going(HeaderValue),
    /// Ended: this answer is final (its strong version, when it has one).
    Ended(Option<HeaderValue>),
    /// Not a run to wait on: a 404, another 4xx, or the gateway's key refused upstream.
    Stopped,
}

/// A run's latest answer and what it says.
#[derive(Clone)]
pub struct Snapshot {
    pub answer: Answer,
    pub state: State,
    /// The event-stream frame of this state, built by the first stream that sends it and shared
    /// by every other: a change reaching ten thousand streams is framed once.
    frame: Arc<OnceLock<Bytes>>,
}

impl Snapshot {
    /// The snapshot `answer` makes, or `None` when it is transient (says nothing about the run).
    pub fn of(answer: Answer, statuses: &RunStatuses) -> Option<Self> {
        let state = match &answer {
            Answer::Cached { entry, .. } if entry.is_terminal() => State::Ended(entry.etag()),
            // A remembered 404.
            Answer::Cached { .. } => State::Stopped,
            Answer::Uncached(uncached) => {
                let status = uncached.response.status;
                match (status, uncached.run_status, &uncached.etag) {
                    (StatusCode::OK, Some(run_status), Some(version)) => {
                        if statuses.is_terminal(run_status) {
                            State::Ended(Some(version.clone()))
                        } else {
                            State::Going(version.clone())
                        }
                    }
                    (StatusCode::TOO_MANY_REQUESTS, ..) => return None,
                    _ if status.is_server_error() || status.is_success() => return None,
                    _ => State::Stopped,
                }
            }
            Answer::Failed(GatewayError::UpstreamAuth) => State::Stopped,
            Answer::Failed(_) => return None,
        };
        Some(Self::new(answer, state))
    }

    pub fn new(answer: Answer, state: State) -> Self {
        Self {
            answer,
            state,
            frame: Arc::default(),
        }
    }

    /// This state's event-stream frame, built once by `build`.
    pub fn frame(&self, build: impl FnOnce() -> Bytes) -> Bytes {
        self.frame.get_or_init(build).clone()
    }

    /// Whether nothing more will come: the run ended or the watch stopped.
    pub fn is_final(&self) -> bool {
        !matches!(self.state, State::Going(_))
    }

    /// The run's version, when it has one.
    pub fn version(&self) -> Option<&HeaderValue> {
        match &self.state {
            State::Going(version) => Some(version),
            State::Ended(version) => version.as_ref(),
            State::Stopped => None,
        }
    }

    /// Whether a client holding `if_none_match` already has this state: the run is going, at a
    /// version the header names (so the client waits for the next one).
    pub fn is_held_by(&self, if_none_match: &HeaderValue) -> bool {
        matches!(&self.state, State::Going(version) if etag::names(if_none_match, version))
    }
}

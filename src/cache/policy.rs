//! Cacheability: may this upstream answer be stored? A pure function of the answer and the config.
//!
//! Only one thing is ever stored: a 200 whose body is a JSON object with the requested `id` and a
//! top-level `status` that the config lists as terminal. Everything else is passed through, and
//! the reason is kept so logs say why.

use http::StatusCode;

use super::sniff::sniff_run;
use crate::run_id::RunId;

/// The run statuses that mean "ended, will never change". Matching is exact and case-sensitive,
/// as Plextera's enum is; an unknown status is never terminal.
#[derive(Debug, Clone)]
pub struct TerminalStatuses(Vec<Box<str>>);

impl TerminalStatuses {
    pub fn new<S: AsRef<str>>(statuses: &[S]) -> Self {
        Self(
            statuses
                .iter()
                .map(|status| status.as_ref().into())
                .collect(),
        )
    }

    pub fn contains(&self, status: &str) -> bool {
        self.0.iter().any(|terminal| &**terminal == status)
    }
}

/// The verdict on one upstream answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// A terminal run: store it and serve it from memory until its ttl.
    Store,
    /// Forward it, never store it.
    Pass(PassReason),
}

/// Why an answer is not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassReason {
    /// Not a 200.
    NotOk,
    /// Not a JSON object with string `id`/`status` (or a key repeated).
    NotARun,
    /// The object has no `status`.
    NoStatus,
    /// The run has a status that is not terminal (PROCESSING, QUEUED, anything unknown).
    NotTerminal,
    /// The body is a different run from the one asked for.
    IdMismatch,
}

impl PassReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotOk => "not_ok",
            Self::NotARun => "not_a_run",
            Self::NoStatus => "no_status",
            Self::NotTerminal => "not_terminal",
            Self::IdMismatch => "id_mismatch",
        }
    }
}

/// Decides whether the upstream answer `(status, body)` to a request for `requested` may be stored.
pub fn decide(
    status: StatusCode,
    body: &[u8],
    requested: &RunId,
    terminal: &TerminalStatuses,
) -> Decision {
    if status != StatusCode::OK {
        return Decision::Pass(PassReason::NotOk);
    }
    let Ok(run) = sniff_run(body) else {
        return Decision::Pass(PassReason::NotARun);
    };
    let Some(run_status) = run.status else {
        return Decision::Pass(PassReason::NoStatus);
    };
    if run.id.as_deref() != Some(requested.as_str()) {
        return Decision::Pass(PassReason::IdMismatch);
    }
    if !terminal.contains(&run_status) {
        return Decision::Pass(PassReason::NotTerminal);
    }
    Decision::Store
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decide_for(status: StatusCode, body: &str) -> Decision {
        let terminal = TerminalStatuses::new(&["COMPLETED", "FAILED", "CLOSED"]);
        let requested = RunId::parse("run_1").expect("valid id");
        decide(status, body.as_bytes(), &requested, &terminal)
    }

    fn run(status: &str) -> String {
        format!(r#"{{"id":"run_1","status":"{status}","steps":[]}}"#)
    }

    #[test]
    fn terminal_runs_are_stored() {
        for status in ["COMPLETED", "FAILED", "CLOSED"] {
            assert_eq!(
                decide_for(StatusCode::OK, &run(status)),
                Decision::Store,
                "{status}"
            );
        }
    }

    #[test]
    fn runs_still_going_or_unknown_are_passed() {
        for status in [
            "QUEUED",
            "PROCESSING",
            "REJECTED",
            "completed",
            "COMPLETED ",
            "",
        ] {
            assert_eq!(
                decide_for(StatusCode::OK, &run(status)),
                Decision::Pass(PassReason::NotTerminal),
                "{status:?}"
            );
        }
    }

    #[test]
    fn non_200_is_never_stored_even_with_a_terminal_body() {
        for code in [
            StatusCode::CREATED,
            StatusCode::NOT_FOUND,
            StatusCode::INTERNAL_SERVER_ERROR,
        ] {
            assert_eq!(
                decide_for(code, &run("COMPLETED")),
                Decision::Pass(PassReason::NotOk)
            );
        }
    }

    #[test]
    fn malformed_or_foreign_bodies_are_passed_with_their_reason() {
        assert_eq!(
            decide_for(StatusCode::OK, "not json"),
            Decision::Pass(PassReason::NotARun)
        );
        assert_eq!(
            decide_for(StatusCode::OK, r#"{"id":"run_1","status":3}"#),
            Decision::Pass(PassReason::NotARun)
        );
        assert_eq!(
            decide_for(StatusCode::OK, r#"{"id":"run_1"}"#),
            Decision::Pass(PassReason::NoStatus)
        );
        assert_eq!(
            decide_for(StatusCode::OK, r#"{"id":"run_2","status":"COMPLETED"}"#),
            Decision::Pass(PassReason::IdMismatch)
        );
        assert_eq!(
            decide_for(StatusCode::OK, r#"{"status":"COMPLETED"}"#),
            Decision::Pass(PassReason::IdMismatch)
        );
    }
}

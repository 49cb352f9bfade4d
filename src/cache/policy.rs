//! Cacheability: may this upstream answer be stored? A pure function of the answer and the config.
//!
//! A run is stored only as a 200 whose body is a JSON object with the requested `id` and a
//! top-level `status` that the config lists as terminal, checked by a validating parse. A 404 is
//! remembered too when `cache.not_found_ttl` is set ([`Policy`]). Everything else is passed
//! through, and the reason is kept so logs say why. Most answers are runs still going: a quick
//! scan of the top level recognises those without the full parse.

use std::time::Duration;

use http::StatusCode;

use super::scan::{Scan, scan_status};
use super::sniff::sniff_run;
use crate::run::id::RunId;
use crate::run::status::{RunStatus, RunStatuses};

/// The verdict on one upstream answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// A terminal run (in this status): store it and serve it from memory until its ttl.
    Store(RunStatus),
    /// A 404: remember it for `cache.not_found_ttl`.
    RememberNotFound,
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

/// What the policy read from an answer and what it concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    /// The run's status, when the answer is a 200 run object that has one.
    pub status: Option<RunStatus>,
}

/// The store rule with its settings. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Policy {
    statuses: RunStatuses,
    /// `cache.not_found_ttl` is not zero.
    remember_not_found: bool,
}

impl Policy {
    pub fn new(statuses: RunStatuses, not_found_ttl: Duration) -> Self {
        Self {
            statuses,
            remember_not_found: !not_found_ttl.is_zero(),
        }
    }

    /// The status table the rule reads statuses with.
    pub fn statuses(&self) -> &RunStatuses {
        &self.statuses
    }

    /// [`decide`], plus the 404 rule.
    pub fn decide(&self, status: StatusCode, body: &[u8], requested: &RunId) -> Verdict {
        if status == StatusCode::NOT_FOUND && self.remember_not_found {
            return Verdict {
                decision: Decision::RememberNotFound,
                status: None,
            };
        }
        decide(status, body, requested, &self.statuses)
    }
}

/// Decides whether the upstream answer `(status, body)` to a request for `requested` may be stored.
pub fn decide(status: StatusCode, body: &[u8], requested: &RunId, statuses: &RunStatuses) -> Verdict {
    let pass = |reason, status| Verdict {
        decision: Decision::Pass(reason),
        status,
    };
    if status != StatusCode::OK {
        return pass(PassReason::NotOk, None);
    }
    // The quick scan settles every answer that is passed through anyway; a terminal status (or
    // anything it is unsure of) goes on to the validating parse, which decides what is stored.
    match scan_status(body) {
        Scan::NotAnObject => return pass(PassReason::NotARun, None),
        Scan::Status(None) => return pass(PassReason::NoStatus, None),
        Scan::Status(Some(text)) if !statuses.is_terminal(statuses.classify(text)) => {
            return pass(PassReason::NotTerminal, Some(statuses.classify(text)));
        }
        Scan::Status(Some(_)) | Scan::Unsure => {}
    }
    let Ok(run) = sniff_run(body) else {
        return pass(PassReason::NotARun, None);
    };
    let Some(run_status) = run.status.map(|text| statuses.classify(&text)) else {
        return pass(PassReason::NoStatus, None);
    };
    if run.id.as_deref() != Some(requested.as_str()) {
        return pass(PassReason::IdMismatch, Some(run_status));
    }
    if !statuses.is_terminal(run_status) {
        return pass(PassReason::NotTerminal, Some(run_status));
    }
    Verdict {
        decision: Decision::Store(run_status),
        status: Some(run_status),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statuses() -> RunStatuses {
        RunStatuses::new(&["COMPLETED", "FAILED", "CLOSED"])
    }

    fn verdict_for(status: StatusCode, body: &str) -> Verdict {
        let requested = RunId::parse("run_1").expect("valid id");
        decide(status, body.as_bytes(), &requested, &statuses())
    }

    fn decide_for(status: StatusCode, body: &str) -> Decision {
        verdict_for(status, body).decision
    }

    fn run(status: &str) -> String {
        format!(r#"{{"id":"run_1","status":"{status}","steps":[]}}"#)
    }

    #[test]
    fn terminal_runs_are_stored() {
        for status in ["COMPLETED", "FAILED", "CLOSED"] {
            assert_eq!(
                decide_for(StatusCode::OK, &run(status)),
                Decision::Store(statuses().classify(status)),
                "{status}"
            );
        }
    }

    #[test]
    fn the_verdict_carries_the_classified_status() {
        let table = statuses();
        assert_eq!(
            verdict_for(StatusCode::OK, &run("FAILED")).status,
            Some(table.classify("FAILED"))
        );
        assert_eq!(
            verdict_for(StatusCode::OK, &run("QUEUED")).status,
            Some(table.classify("QUEUED"))
        );
        assert_eq!(
            verdict_for(StatusCode::OK, &run("WEIRD")).status,
            Some(table.other())
        );
        assert_eq!(verdict_for(StatusCode::OK, r#"{"id":"run_1"}"#).status, None);
        assert_eq!(verdict_for(StatusCode::NOT_FOUND, &run("FAILED")).status, None);
    }

    #[test]
    fn runs_still_going_or_unknown_are_passed() {
        for status in ["QUEUED", "PROCESSING", "REJECTED", "completed", "COMPLETED ", ""] {
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
    fn a_404_is_remembered_only_when_not_found_ttl_is_set() {
        let requested = RunId::parse("run_1").expect("valid id");
        let remembering = Policy::new(statuses(), Duration::from_secs(5));
        let forgetting = Policy::new(statuses(), Duration::ZERO);
        let body = br#"{"error":"not found"}"#;
        assert_eq!(
            remembering
                .decide(StatusCode::NOT_FOUND, body, &requested)
                .decision,
            Decision::RememberNotFound
        );
        assert_eq!(
            forgetting
                .decide(StatusCode::NOT_FOUND, body, &requested)
                .decision,
            Decision::Pass(PassReason::NotOk)
        );
        assert_eq!(
            remembering
                .decide(StatusCode::OK, run("FAILED").as_bytes(), &requested)
                .decision,
            Decision::Store(statuses().classify("FAILED"))
        );
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

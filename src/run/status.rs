//! `RunStatus`: the bounded set of run statuses the gateway tells apart.
//!
//! Upstream's `status` is free text as far as the gateway can trust it, so it is mapped once, on the
//! way in, onto a small fixed table: the configured terminal statuses, then `QUEUED` and
//! `PROCESSING` (the documented states of a run still going), then `other` for anything else. The
//! table decides cacheability (only terminal entries are) and names the metric label, so an
//! upstream bug that invents statuses can neither get a run cached nor grow the label set.

use std::sync::Arc;

/// Statuses of a run still going, always told apart (unless configured as terminal).
pub const RUNNING_STATUSES: [&str; 2] = ["QUEUED", "PROCESSING"];
/// The label for every status the table does not know.
pub const OTHER_STATUS: &str = "other";
/// Most terminal statuses the table holds (the config refuses more).
pub const MAX_TERMINAL_STATUSES: usize = 64;

/// A position in a [`RunStatuses`] table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RunStatus(u8);

impl RunStatus {
    /// Index into the table, for per-status arrays such as metric handles.
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

/// The table: terminal statuses first, then the running ones, then `other`.
#[derive(Debug, Clone)]
pub struct RunStatuses {
    labels: Arc<[Box<str>]>,
    terminal_count: usize,
}

impl RunStatuses {
    /// Builds the table from the configured terminal statuses (exact, case-sensitive matching).
    pub fn new<S: AsRef<str>>(terminal: &[S]) -> Self {
        let mut labels: Vec<Box<str>> = Vec::new();
        for status in terminal.iter().take(MAX_TERMINAL_STATUSES) {
            if !labels.iter().any(|known| **known == *status.as_ref()) {
                labels.push(status.as_ref().into());
            }
        }
        let terminal_count = labels.len();
        for status in RUNNING_STATUSES {
            if !labels.iter().any(|known| &**known == status) {
                labels.push(status.into());
            }
        }
        labels.push(OTHER_STATUS.into());
        Self {
            labels: labels.into(),
            terminal_count,
        }
    }

    /// Maps an upstream status onto the table; unknown statuses (and the literal "other") are `other`.
    pub fn classify(&self, status: &str) -> RunStatus {
        let known = &self.labels[..self.labels.len() - 1];
        known
            .iter()
            .position(|label| &**label == status)
            .map_or(self.other(), position_status)
    }

    /// The `other` entry.
    pub fn other(&self) -> RunStatus {
        position_status(self.labels.len() - 1)
    }

    /// Whether a run in this status has ended for good.
    pub fn is_terminal(&self, status: RunStatus) -> bool {
        status.index() < self.terminal_count
    }

    /// The metric label of a status.
    pub fn label(&self, status: RunStatus) -> &str {
        &self.labels[status.index()]
    }

    /// Every entry in table order.
    pub fn all(&self) -> impl Iterator<Item = RunStatus> + '_ {
        (0..self.labels.len()).map(position_status)
    }
}

/// The table holds at most `MAX_TERMINAL_STATUSES` + 3 entries, so a position fits in a byte.
fn position_status(position: usize) -> RunStatus {
    RunStatus(u8::try_from(position).expect("the status table has fewer than 256 entries"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RunStatuses {
        RunStatuses::new(&["COMPLETED", "FAILED", "CLOSED"])
    }

    #[test]
    fn table_lists_terminal_then_running_then_other() {
        let statuses = table();
        let labels: Vec<&str> = statuses.all().map(|status| statuses.label(status)).collect();
        assert_eq!(
            labels,
            ["COMPLETED", "FAILED", "CLOSED", "QUEUED", "PROCESSING", "other"]
        );
    }

    #[test]
    fn only_configured_statuses_are_terminal() {
        let statuses = table();
        for status in ["COMPLETED", "FAILED", "CLOSED"] {
            assert!(statuses.is_terminal(statuses.classify(status)), "{status}");
        }
        for status in ["QUEUED", "PROCESSING", "REJECTED", "completed", "", "other"] {
            assert!(!statuses.is_terminal(statuses.classify(status)), "{status}");
        }
    }

    #[test]
    fn unknown_statuses_all_collapse_to_other() {
        let statuses = table();
        for status in ["REJECTED", "completed", "", "other", "x".repeat(1000).as_str()] {
            assert_eq!(statuses.classify(status), statuses.other(), "{status}");
        }
        assert_eq!(statuses.label(statuses.other()), "other");
    }

    #[test]
    fn a_running_status_configured_as_terminal_is_listed_once() {
        let statuses = RunStatuses::new(&["COMPLETED", "PROCESSING", "COMPLETED"]);
        let labels: Vec<&str> = statuses.all().map(|status| statuses.label(status)).collect();
        assert_eq!(labels, ["COMPLETED", "PROCESSING", "QUEUED", "other"]);
        assert!(statuses.is_terminal(statuses.classify("PROCESSING")));
    }
}

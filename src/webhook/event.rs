//! An event's envelope, read after its signature is verified: `{"eventId", "eventType",
//! "occurredAt", "apiVersion", "data": {"runId", …}}` (see the reference's "Events").
//!
//! Only what the gateway acts on is read: the id (to deduplicate), the type (bounded into
//! [`EventType`], so a metric label cannot grow) and, for run events, the run id. The event's own
//! body is never served as a run: a confirming call fetches the run.

use serde::Deserialize;

use crate::run::id::RunId;

/// The event types the gateway knows; any other is `Other` (acknowledged and counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    RunCompleted,
    RunFailed,
    Other,
}

impl EventType {
    /// The type `name` names (`Other` for any type the gateway does not act on).
    pub fn read(name: &str) -> Self {
        match name {
            "workflow.run.completed" => Self::RunCompleted,
            "workflow.run.failed" => Self::RunFailed,
            _ => Self::Other,
        }
    }

    /// Plextera's name for the type (`other` for every other type): the metric label.
    pub fn name(self) -> &'static str {
        match self {
            Self::RunCompleted => "workflow.run.completed",
            Self::RunFailed => "workflow.run.failed",
            Self::Other => "other",
        }
    }
}

/// What an event asks of the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: String,
    pub kind: EventType,
    /// The run a run event is about; `None` for other events, and for a run event whose
    /// `data.runId` is missing or not a run id (acknowledged, nothing to act on).
    pub run: Option<RunId>,
}

/// The body is not an event: not JSON, or no usable `eventId` or `eventType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotAnEvent;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    event_id: String,
    event_type: String,
    /// Read only for run events: other types' data may have any shape.
    #[serde(default)]
    data: Option<serde_json::Value>,
}

/// Reads a verified body.
pub fn read(body: &[u8]) -> Result<Event, NotAnEvent> {
    let envelope: Envelope = serde_json::from_slice(body).map_err(|_| NotAnEvent)?;
    if envelope.event_id.is_empty() || envelope.event_id.len() > 256 {
        return Err(NotAnEvent);
    }
    let kind = EventType::read(&envelope.event_type);
    let run = match kind {
        EventType::Other => None,
        EventType::RunCompleted | EventType::RunFailed => envelope
            .data
            .as_ref()
            .and_then(|data| data.get("runId")?.as_str())
            // A run id as it is, not percent-decoded as a path segment would be.
            .filter(|run_id| !run_id.contains('%'))
            .and_then(|run_id| RunId::parse(run_id).ok()),
    };
    Ok(Event {
        id: envelope.event_id,
        kind,
        run,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_events_name_their_run() {
        let event = read(
            br#"{"eventId":"evt_1","eventType":"workflow.run.failed","occurredAt":"2026-01-01T00:00:00Z","apiVersion":"v1","data":{"runId":"run_7","status":"FAILED"}}"#,
        )
        .expect("an event");
        assert_eq!(event.id, "evt_1");
        assert_eq!(event.kind, EventType::RunFailed);
        assert_eq!(event.run.as_ref().map(RunId::as_str), Some("run_7"));
    }

    #[test]
    fn other_types_are_read_and_bounded() {
        let event =
            read(br#"{"eventId":"evt_2","eventType":"document-insights.extraction.completed","data":{}}"#)
                .expect("an event");
        assert_eq!((event.kind, event.run), (EventType::Other, None));
        assert_eq!(event.kind.name(), "other");
    }

    #[test]
    fn what_is_not_an_event_is_refused() {
        for body in [
            &b"not json"[..],
            br#"{"eventType":"workflow.run.completed"}"#,
            br#"{"eventId":"","eventType":"workflow.run.completed","data":{"runId":"r"}}"#,
            br#"{"eventId":"e"}"#,
        ] {
            assert_eq!(read(body), Err(NotAnEvent), "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn a_run_event_without_a_usable_run_id_names_no_run() {
        for body in [
            &br#"{"eventId":"e","eventType":"workflow.run.completed","data":{}}"#[..],
            br#"{"eventId":"e","eventType":"workflow.run.completed","data":{"runId":"../admin"}}"#,
            br#"{"eventId":"e","eventType":"workflow.run.failed","data":{"runId":7}}"#,
            br#"{"eventId":"e","eventType":"workflow.run.failed","data":"run"}"#,
            br#"{"eventId":"e","eventType":"workflow.run.failed","data":{"runId":"%41bc"}}"#,
        ] {
            let event = read(body).expect("an event");
            assert_eq!(event.run, None, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn other_types_may_carry_data_of_any_shape() {
        for body in [
            &br#"{"eventId":"e","eventType":"document-insights.extraction.completed","data":[1,2]}"#[..],
            br#"{"eventId":"e","eventType":"document-insights.extraction.completed","data":{"runId":7}}"#,
            br#"{"eventId":"e","eventType":"x","data":null}"#,
        ] {
            assert_eq!(read(body).map(|event| event.kind), Ok(EventType::Other));
        }
    }
}

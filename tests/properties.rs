//! Properties over arbitrary input (proptest; `cargo fuzz` needs a nightly toolchain these
//! machines do not have): the parsers never panic, accept only what they should, and the quick
//! status scan agrees with a full serde_json parse on every valid JSON document.

use http::StatusCode;
use plextera_gateway::cache::policy;
use plextera_gateway::cache::scan::{Scan, scan_status};
use plextera_gateway::cache::sniff::sniff_run;
use plextera_gateway::cache::version::weak_etag;
use plextera_gateway::run::id::{MAX_RUN_ID_LEN, RunId};
use plextera_gateway::run::status::RunStatuses;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use serde_json::{Map, Value};

/// Arbitrary JSON values, nested a few levels, with keys that often collide with `id`/`status`.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |x| x.is_finite())
            .prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("COMPLETED"),
            Just("PROCESSING"),
            Just("QUEUED"),
            Just("FAILED"),
            Just("r1"),
            Just("computedDurationMs"),
            Just("\\\"computedDurationMs\\\":")
        ]
        .prop_map(|status| Value::String(status.to_owned())),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((json_key(), inner), 0..6)
                .prop_map(|members| Value::Object(members.into_iter().collect())),
        ]
    })
}

fn json_key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("id".to_owned()),
        Just("status".to_owned()),
        Just("steps".to_owned()),
        Just("computedDurationMs".to_owned()),
        ".{0,8}"
    ]
}

/// Top-level objects, serialized compactly or pretty: half arbitrary, half shaped like runs (an
/// `id` that is often the requested one, a `status` that is often terminal, in any position).
fn json_object_text() -> impl Strategy<Value = (Map<String, Value>, String)> {
    let arbitrary = prop::collection::vec((json_key(), json_value()), 0..8);
    let run_like = (
        prop::collection::vec((json_key(), json_value()), 0..5),
        prop_oneof![Just(Value::from("r1")), Just(Value::from("r2")), json_value()],
        prop_oneof![
            Just(Value::from("COMPLETED")),
            Just(Value::from("CLOSED")),
            Just(Value::from("PROCESSING")),
            json_value()
        ],
        any::<prop::sample::Index>(),
    )
        .prop_map(|(mut members, id, status, position)| {
            let at = position.index(members.len() + 1);
            members.insert(at, ("id".to_owned(), id));
            members.push(("status".to_owned(), status));
            members
        });
    (prop_oneof![arbitrary, run_like], any::<bool>()).prop_map(|(members, pretty)| {
        let object: Map<String, Value> = members.into_iter().collect();
        let text = if pretty {
            serde_json::to_string_pretty(&object)
        } else {
            serde_json::to_string(&object)
        }
        .expect("serializes");
        (object, text)
    })
}

/// `value` with every `computedDurationMs`, at any depth, set to `duration`.
fn with_duration(value: &Value, duration: i64) -> Value {
    match value {
        Value::Object(members) => Value::Object(
            members
                .iter()
                .map(|(key, member)| {
                    let member = if key == "computedDurationMs" {
                        Value::from(duration)
                    } else {
                        with_duration(member, duration)
                    };
                    (key.clone(), member)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(|item| with_duration(item, duration)).collect()),
        other => other.clone(),
    }
}

/// `value` with every `computedDurationMs` taken out, for comparing what the version covers.
fn without_duration(value: &Value) -> Value {
    match value {
        Value::Object(members) => Value::Object(
            members
                .iter()
                .filter(|(key, _)| *key != "computedDurationMs")
                .map(|(key, member)| (key.clone(), without_duration(member)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_duration).collect()),
        other => other.clone(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn run_id_parsing_never_panics_and_accepts_only_the_alphabet(raw in ".{0,200}") {
        if let Ok(id) = RunId::parse(&raw) {
            let id = id.as_str();
            prop_assert!(!id.is_empty() && id.len() <= MAX_RUN_ID_LEN);
            prop_assert!(id.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-'));
        }
    }

    #[test]
    fn percent_escapes_of_hostile_bytes_are_refused(bytes in prop::collection::vec(any::<u8>(), 1..40)) {
        let escaped: String = bytes.iter().map(|byte| format!("%{byte:02X}")).collect();
        let allowed = bytes.iter().all(|byte| byte.is_ascii_alphanumeric() || *byte == b'_' || *byte == b'-');
        prop_assert_eq!(RunId::parse(&escaped).is_ok(), allowed);
    }

    #[test]
    fn valid_ids_round_trip(id in "[A-Za-z0-9_-]{1,128}") {
        let parsed = RunId::parse(&id).expect("valid");
        prop_assert_eq!(parsed.as_str(), id.as_str());
    }

    #[test]
    fn sniffing_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = sniff_run(&bytes);
        let _ = scan_status(&bytes);
        let requested = RunId::parse("r1").expect("id");
        let _ = policy::decide(StatusCode::OK, &bytes, &requested, &RunStatuses::new(&["COMPLETED"]));
    }

    #[test]
    fn sniffing_agrees_with_serde_json_on_valid_json((object, text) in json_object_text()) {
        let sniffed = sniff_run(text.as_bytes());
        let expected_status = object.get("status");
        let expected_id = object.get("id");
        let strings = expected_status.is_none_or(Value::is_string) && expected_id.is_none_or(Value::is_string);
        match sniffed {
            Ok(head) => {
                prop_assert!(strings, "accepted {text}");
                prop_assert_eq!(head.status.as_deref(), expected_status.and_then(Value::as_str));
                prop_assert_eq!(head.id.as_deref(), expected_id.and_then(Value::as_str));
            }
            Err(_) => prop_assert!(!strings, "refused {text}"),
        }
        match scan_status(text.as_bytes()) {
            Scan::Status(status) => prop_assert_eq!(status, expected_status.and_then(Value::as_str), "{}", text),
            Scan::NotAnObject => prop_assert!(false, "an object was not recognised: {}", text),
            Scan::Unsure => {}
        }
    }

    #[test]
    fn only_a_terminal_run_with_the_requested_id_is_stored((object, text) in json_object_text()) {
        let requested = RunId::parse("r1").expect("id");
        let statuses = RunStatuses::new(&["COMPLETED", "FAILED", "CLOSED"]);
        let verdict = policy::decide(StatusCode::OK, text.as_bytes(), &requested, &statuses);
        let should_store = object.get("id").and_then(Value::as_str) == Some("r1")
            && object.get("status").and_then(Value::as_str).is_some_and(|status| ["COMPLETED", "FAILED", "CLOSED"].contains(&status));
        prop_assert_eq!(matches!(verdict.decision, policy::Decision::Store(_)), should_store, "{}", text);
    }
}

#[test]
fn the_object_strategy_produces_storable_runs_often_enough_to_matter() {
    // The last property is only as good as its inputs: they must often be storable runs.
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = json_object_text();
    let requested = RunId::parse("r1").expect("id");
    let statuses = RunStatuses::new(&["COMPLETED", "FAILED", "CLOSED"]);
    let stored = (0..2000)
        .filter(|_| {
            let (_, text) = strategy.new_tree(&mut runner).expect("value").current();
            matches!(
                policy::decide(StatusCode::OK, text.as_bytes(), &requested, &statuses).decision,
                policy::Decision::Store(_)
            )
        })
        .count();
    assert!(
        stored >= 20,
        "only {stored} of 2000 generated objects are storable runs"
    );
}

#[test]
fn two_bodies_are_the_same_version_exactly_when_they_differ_only_in_the_duration() {
    let mut runner = proptest::test_runner::TestRunner::default();
    let inputs = (json_value(), json_value(), any::<i64>(), any::<i64>());
    runner
        .run(&inputs, |(first, second, early_tick, late_tick)| {
            // The same document with the duration ticking: one version, in any layout serde writes.
            let (early, late) = (
                with_duration(&first, early_tick),
                with_duration(&first, late_tick),
            );
            prop_assert_eq!(
                weak_etag(early.to_string().as_bytes()),
                weak_etag(late.to_string().as_bytes())
            );
            prop_assert_eq!(
                weak_etag(serde_json::to_string_pretty(&early).expect("json").as_bytes()),
                weak_etag(serde_json::to_string_pretty(&late).expect("json").as_bytes())
            );
            // Two documents that differ in anything else: two versions.
            let other = with_duration(&second, early_tick);
            if without_duration(&early) != without_duration(&other) {
                prop_assert_ne!(
                    weak_etag(early.to_string().as_bytes()),
                    weak_etag(other.to_string().as_bytes()),
                    "{} vs {}",
                    early,
                    other
                );
            }
            Ok(())
        })
        .unwrap_or_else(|failure| panic!("{failure}"));
}

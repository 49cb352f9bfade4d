//! Status sniffing: the run's top-level `id` and `status`, read from a body without building a tree.
//!
//! The whole body is still validated as JSON (UTF-8 throughout, then serde_json walks it, skipping
//! values it does not keep), so "not JSON" is never mistaken for a run. Only a top-level object counts; a repeated
//! `id` or `status` key is refused, because parsers disagree on which copy wins and the gateway
//! must not cache a run on a guess. Strings without escapes are borrowed from the body.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};

/// The two fields the cache decision needs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RunHead<'a> {
    pub id: Option<Cow<'a, str>>,
    pub status: Option<Cow<'a, str>>,
}

/// The body is not a JSON object whose `id` and `status`, where present, are single strings.
#[derive(Debug, thiserror::Error)]
#[error("not a run object: {0}")]
pub struct NotARun(#[from] serde_json::Error);

/// Reads `id` and `status` from the top level of a JSON object.
pub fn sniff_run(body: &[u8]) -> Result<RunHead<'_>, NotARun> {
    // serde_json skips the strings it does not keep without checking their UTF-8, so the whole
    // body is checked first: JSON text is UTF-8, and what is stored must be JSON.
    let text = std::str::from_utf8(body).map_err(|error| {
        NotARun(de::Error::custom(format_args!(
            "not UTF-8 at byte {}",
            error.valid_up_to()
        )))
    })?;
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let head = deserializer.deserialize_map(RunHeadVisitor)?;
    deserializer.end()?;
    Ok(head)
}

struct RunHeadVisitor;

impl<'de> Visitor<'de> for RunHeadVisitor {
    type Value = RunHead<'de>;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut head = RunHead::default();
        while let Some(key) = map.next_key::<JsonStr<'de>>()? {
            let slot = match key.0.as_ref() {
                "id" => &mut head.id,
                "status" => &mut head.status,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            if slot.is_some() {
                return Err(de::Error::custom(format_args!("duplicate key {:?}", key.0)));
            }
            *slot = Some(map.next_value::<JsonStr<'de>>()?.0);
        }
        Ok(head)
    }
}

/// A JSON string, borrowed from the input when it has no escapes.
struct JsonStr<'a>(Cow<'a, str>);

impl<'de> de::Deserialize<'de> for JsonStr<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StrVisitor;
        impl<'de> Visitor<'de> for StrVisitor {
            type Value = JsonStr<'de>;

            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("a string")
            }

            fn visit_borrowed_str<E: de::Error>(self, value: &'de str) -> Result<Self::Value, E> {
                Ok(JsonStr(Cow::Borrowed(value)))
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<Self::Value, E> {
                Ok(JsonStr(Cow::Owned(value.to_owned())))
            }
        }
        deserializer.deserialize_str(StrVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(body: &str) -> RunHead<'_> {
        sniff_run(body.as_bytes()).expect("a run object")
    }

    #[test]
    fn reads_top_level_id_and_status_only() {
        let body = r#"{"id":"r1","steps":[{"id":"s","status":"QUEUED"}],"status":"COMPLETED",
                       "error":{"status":"x"},"progress":{"stepsCompleted":1}}"#;
        let run = head(body);
        assert_eq!(run.id.as_deref(), Some("r1"));
        assert_eq!(run.status.as_deref(), Some("COMPLETED"));
    }

    #[test]
    fn plain_strings_are_borrowed_and_escaped_ones_decoded() {
        let run = head(r#"{"id":"r1","status":"COMP\u004cETED"}"#);
        assert!(matches!(run.id, Some(Cow::Borrowed("r1"))));
        assert_eq!(run.status.as_deref(), Some("COMPLETED"));
    }

    #[test]
    fn missing_fields_are_none() {
        assert_eq!(head("{}"), RunHead::default());
        assert_eq!(head(r#"{"id":"r1"}"#).status, None);
    }

    #[test]
    fn everything_but_a_well_formed_object_is_refused() {
        let cases = [
            "",
            "null",
            "[\"r1\",\"COMPLETED\"]",
            "\"COMPLETED\"",
            "{\"id\":\"r1\",\"status\":\"COMPLETED\"",
            "{\"id\":\"r1\",\"status\":\"COMPLETED\"} trailing",
            "{\"status\":1}",
            "{\"status\":null}",
            "{\"status\":[\"COMPLETED\"]}",
            "{\"id\":7,\"status\":\"COMPLETED\"}",
            "{\"status\":\"PROCESSING\",\"status\":\"COMPLETED\"}",
            "{\"id\":\"a\",\"id\":\"b\",\"status\":\"COMPLETED\"}",
            "<html>502 Bad Gateway</html>",
        ];
        for body in cases {
            assert!(sniff_run(body.as_bytes()).is_err(), "{body:?} should be refused");
        }
    }

    #[test]
    fn invalid_utf8_is_refused_wherever_it_is() {
        assert!(sniff_run(b"{\"id\":\"r\xff\",\"status\":\"COMPLETED\"}").is_err());
        // In a string the sniffer skips, too.
        assert!(sniff_run(b"{\"id\":\"r\",\"status\":\"COMPLETED\",\"note\":\"\xc3\x28\"}").is_err());
        assert!(sniff_run("{\"id\":\"r\",\"status\":\"COMPLETED\",\"note\":\"é\"}".as_bytes()).is_ok());
    }
}

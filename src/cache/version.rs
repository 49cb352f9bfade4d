//! A run's version: what changes when the run changes, and only then.
//!
//! Plextera computes `computedDurationMs` when it answers, so two polls of a run that has not
//! moved differ in that field alone. The version is a 128-bit hash (xxh3) of the body with the
//! value of every `computedDurationMs` key, at any depth, left out; clients see it as a weak
//! `ETag`, `W/"<32 hex digits>"` (weak: the bytes may differ, the run does not). It detects
//! change, it does not authenticate: a collision would cost a client one 304 for a new version of
//! one run, with odds of 2^-128, and the bytes come from Plextera, not from a client. xxh3 hashes
//! a 1 KB run some twenty times faster than SHA-256 (`cargo bench --bench hot_path -- weak_etag`),
//! and this runs on every 200 passed through; it is fixed-seeded, so every replica agrees.
//!
//! Hand-written for speed, as [`super::scan`] is: it runs on every 200 passed through. It looks
//! for the quoted name with `memmem` (SIMD) rather than walking every string: in JSON a quote
//! inside a string is escaped, so `"computedDurationMs"` preceded by an even number of
//! backslashes is the string token itself, never part of another string, and it is a key when `:`
//! follows. The value after it is left out of the hash. Any other body, JSON or not, is hashed as
//! it is, so the version is always a function of the bytes.

use http::HeaderValue;
use memchr::memmem;
use xxhash_rust::xxh3::Xxh3;

use super::scan::Cursor;

/// The key whose value is left out, with its quotes.
const TICKING: &[u8] = b"\"computedDurationMs\"";

/// `W/"<32 hex digits>"`: the version of `body`.
pub fn weak_etag(body: &[u8]) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut hasher = Xxh3::new();
    let mut hashed = 0;
    for start in memmem::find_iter(body, TICKING) {
        let escapes = body[..start]
            .iter()
            .rev()
            .take_while(|byte| **byte == b'\\')
            .count();
        if start < hashed || escapes % 2 == 1 {
            continue; // inside a value already left out, or inside a string
        }
        let mut cursor = Cursor {
            bytes: body,
            at: start + TICKING.len(),
        };
        cursor.skip_blanks();
        if !cursor.eat(b':') {
            continue; // the word as a value, not a key
        }
        cursor.skip_blanks();
        let value_start = cursor.at;
        if !cursor.skip_value() {
            break;
        }
        hasher.update(&body[hashed..value_start]);
        hashed = cursor.at;
    }
    hasher.update(&body[hashed..]);
    let digest = hasher.digest128().to_be_bytes();
    let mut tag = *b"W/\"00000000000000000000000000000000\"";
    for (index, byte) in digest.iter().enumerate() {
        tag[3 + 2 * index] = HEX[usize::from(byte >> 4)];
        tag[4 + 2 * index] = HEX[usize::from(byte & 0x0f)];
    }
    HeaderValue::from_bytes(&tag).expect("W/ and hex digits in quotes make a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(duration: &str, progress: u32) -> String {
        format!(
            r#"{{"id":"r1","status":"PROCESSING","computedDurationMs":{duration},"steps":[{{"name":"ocr","progress":{progress},"computedDurationMs": {duration} }}]}}"#
        )
    }

    #[test]
    fn a_ticking_duration_at_any_depth_is_the_same_version() {
        assert_eq!(
            weak_etag(run("120", 3).as_bytes()),
            weak_etag(run("98765", 3).as_bytes())
        );
        assert_eq!(
            weak_etag(run("1.5e3", 3).as_bytes()),
            weak_etag(run("null", 3).as_bytes())
        );
    }

    #[test]
    fn any_other_change_is_a_new_version() {
        let base = weak_etag(run("120", 3).as_bytes());
        assert_ne!(base, weak_etag(run("120", 4).as_bytes()));
        assert_ne!(
            base,
            weak_etag(run("120", 3).replace("PROCESSING", "QUEUED").as_bytes())
        );
        // The key's name, or the same word as a value or inside a string, is not the key.
        let as_value = r#"{"id":"r1","note":"computedDurationMs","x":1}"#;
        let as_value_changed = r#"{"id":"r1","note":"computedDurationMs","x":2}"#;
        assert_ne!(
            weak_etag(as_value.as_bytes()),
            weak_etag(as_value_changed.as_bytes())
        );
        // A key that merely ends in the name (after an escaped quote) is another key.
        let longer_key = r#"{"x\"computedDurationMs":1}"#;
        let longer_key_changed = r#"{"x\"computedDurationMs":2}"#;
        assert_ne!(
            weak_etag(longer_key.as_bytes()),
            weak_etag(longer_key_changed.as_bytes())
        );
        // After an escaped backslash the quote is real: that is the key.
        let after_backslash = r#"{"note":"a\\","computedDurationMs":1}"#;
        let after_backslash_ticked = r#"{"note":"a\\","computedDurationMs":2}"#;
        assert_eq!(
            weak_etag(after_backslash.as_bytes()),
            weak_etag(after_backslash_ticked.as_bytes())
        );
        let escaped = r#"{"id":"r1","note":"\"computedDurationMs\":1"}"#;
        let escaped_changed = r#"{"id":"r1","note":"\"computedDurationMs\":2"}"#;
        assert_ne!(
            weak_etag(escaped.as_bytes()),
            weak_etag(escaped_changed.as_bytes())
        );
    }

    #[test]
    fn the_tag_is_a_weak_validator_of_fixed_shape() {
        let tag = weak_etag(b"not json at all");
        let text = tag.to_str().expect("ascii");
        assert!(text.starts_with("W/\"") && text.ends_with('"'), "{text}");
        assert_eq!(text.len(), 36);
        assert_eq!(tag, weak_etag(b"not json at all"));
        assert_ne!(tag, weak_etag(b"not json at all!"));
    }
}

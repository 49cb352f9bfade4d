//! A quick look at a run's top-level `status`, for answers that will be passed through anyway.
//!
//! Deciding that a body is *not* a terminal run needs no validation: such a body is forwarded byte
//! for byte, whatever it holds. So the common case, a run still going, is decided by this scanner:
//! it walks only the top level of the object, skips nested values by counting brackets outside
//! strings and jumps over strings with `memchr`, a few hundred instructions for a 1 KB run where a
//! validating parse takes thousands. When it sees a terminal status, the policy runs the
//! validating parse ([`super::sniff`]), which has the last word before anything is stored.
//!
//! The scanner stops at the first top-level `status` it reads (Plextera sends it second, right
//! after `id`), so a run still going costs a few dozen bytes of scanning however large its body.
//! A second `status` later in the body would make the validating parse refuse the body, which
//! also means "pass it through": the decision is the same either way. Whatever the scanner cannot
//! read with certainty (an escape in a key or in the status, a status that is not a string) is
//! `Unsure`, and the validating parse decides. On valid JSON without repeated keys the two always
//! agree on the status; otherwise the scanner's answer only ever names the metric label of a body
//! that is passed through.

use memchr::memchr2;

/// What the scanner saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan<'a> {
    /// A top-level object whose `status` is this string, or has no `status`.
    Status(Option<&'a str>),
    /// Not an object at all (the first non-blank byte is not `{`).
    NotAnObject,
    /// Ask the validating parse.
    Unsure,
}

/// Finds the first top-level `status` of a JSON object without validating the rest.
pub fn scan_status(body: &[u8]) -> Scan<'_> {
    let mut cursor = Cursor { bytes: body, at: 0 };
    cursor.skip_blanks();
    if !cursor.eat(b'{') {
        return Scan::NotAnObject;
    }
    cursor.skip_blanks();
    if cursor.eat(b'}') {
        return Scan::Status(None);
    }
    loop {
        cursor.skip_blanks();
        let Some(key) = cursor.plain_string() else {
            return Scan::Unsure;
        };
        cursor.skip_blanks();
        if !cursor.eat(b':') {
            return Scan::Unsure;
        }
        cursor.skip_blanks();
        if key == b"status" {
            return match cursor.plain_string().map(std::str::from_utf8) {
                Some(Ok(status)) => Scan::Status(Some(status)),
                _ => Scan::Unsure, // not a plain string, or not UTF-8
            };
        }
        if !cursor.skip_value() {
            return Scan::Unsure;
        }
        cursor.skip_blanks();
        match cursor.next() {
            Some(b',') => continue,
            Some(b'}') => return Scan::Status(None),
            _ => return Scan::Unsure,
        }
    }
}

/// A position in a body, with the few moves the scanners need.
pub(super) struct Cursor<'a> {
    pub(super) bytes: &'a [u8],
    pub(super) at: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.at += 1;
        Some(byte)
    }

    pub(super) fn eat(&mut self, expected: u8) -> bool {
        let matched = self.peek() == Some(expected);
        self.at += usize::from(matched);
        matched
    }

    pub(super) fn skip_blanks(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    /// A string without escapes, returned without its quotes; `None` for anything else.
    fn plain_string(&mut self) -> Option<&'a [u8]> {
        if !self.eat(b'"') {
            return None;
        }
        let rest = &self.bytes[self.at..];
        let end = memchr2(b'"', b'\\', rest)?;
        if rest[end] == b'\\' {
            return None;
        }
        self.at += end + 1;
        Some(&rest[..end])
    }

    /// Moves past one string whose opening quote has been consumed; false if it never ends.
    fn skip_string_body(&mut self) -> bool {
        loop {
            let Some(found) = memchr2(b'"', b'\\', &self.bytes[self.at..]) else {
                return false;
            };
            self.at += found + 1;
            if self.bytes[self.at - 1] == b'"' {
                return true;
            }
            self.at += 1; // the escaped byte
        }
    }

    /// Moves past one value of any kind; false if the body ends first.
    pub(super) fn skip_value(&mut self) -> bool {
        match self.next() {
            Some(b'"') => self.skip_string_body(),
            Some(b'{' | b'[') => {
                let mut depth = 1usize;
                while depth > 0 {
                    match self.next() {
                        Some(b'"') => {
                            if !self.skip_string_body() {
                                return false;
                            }
                        }
                        Some(b'{' | b'[') => depth += 1,
                        Some(b'}' | b']') => depth -= 1,
                        Some(_) => {}
                        None => return false,
                    }
                }
                true
            }
            Some(_) => {
                // A number or a literal: up to the next delimiter.
                while !matches!(
                    self.peek(),
                    None | Some(b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
                ) {
                    self.at += 1;
                }
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::sniff::sniff_run;

    #[test]
    fn finds_the_top_level_status_past_nested_values() {
        let body = br#" { "id" : "r1", "steps": [{"status":"QUEUED","x":{"status":"no"}}, "a\"b]"],
                        "n": -1.5e3, "t": true, "z": null, "e": {}, "a": [], "status" : "PROCESSING", "w": 1 } "#;
        assert_eq!(scan_status(body), Scan::Status(Some("PROCESSING")));
    }

    #[test]
    fn stops_at_the_first_status() {
        assert_eq!(
            scan_status(br#"{"id":"r","status":"QUEUED","rest":[[[[unparsed"#),
            Scan::Status(Some("QUEUED"))
        );
        assert_eq!(
            scan_status(br#"{"status":"A","status":"B"}"#),
            Scan::Status(Some("A"))
        );
    }

    #[test]
    fn reports_a_missing_status_and_non_objects() {
        assert_eq!(scan_status(b"{}"), Scan::Status(None));
        assert_eq!(scan_status(br#"{"id":"r1","steps":[]}"#), Scan::Status(None));
        assert_eq!(scan_status(b"[1]"), Scan::NotAnObject);
        assert_eq!(scan_status(b""), Scan::NotAnObject);
        assert_eq!(scan_status(b"<html>"), Scan::NotAnObject);
    }

    #[test]
    fn hands_anything_doubtful_to_the_validating_parse() {
        for body in [
            r#"{"status":1}"#,
            r#"{"status":null}"#,
            r#"{"st\u0061tus":"COMPLETED"}"#,
            r#"{"status":"COMP\u004cETED"}"#,
            r#"{"id":"r1" "status":"A"}"#,
            r#"{"steps":[1,2"#,
            r#"{"id":"unterminated"#,
            r#"{"id" "x"}"#,
        ] {
            assert_eq!(scan_status(body.as_bytes()), Scan::Unsure, "{body}");
        }
    }

    /// On valid JSON, the scanner and the validating parse agree whenever the scanner is sure.
    #[test]
    fn agrees_with_the_validating_parse_on_valid_json() {
        let values = [
            r#""x""#,
            r#""with \"quotes\" and ] } brackets""#,
            "12",
            "-0.5e-3",
            "true",
            "null",
            "[]",
            r#"[{"status":"NESTED"},[["]"]]]"#,
            r#"{"a":{"b":{"status":"DEEP"}}}"#,
        ];
        for first in values {
            for status in [None, Some("PROCESSING"), Some("COMPLETED"), Some("")] {
                let status_member = status
                    .map(|status| format!(r#","status":"{status}""#))
                    .unwrap_or_default();
                for body in [
                    format!(r#"{{"id":"r1","steps":{first}{status_member}}}"#),
                    format!("{{\n  \"first\" : {first} {status_member}, \"last\": {first}\n}}"),
                ] {
                    let parsed = sniff_run(body.as_bytes()).expect("valid JSON run");
                    match scan_status(body.as_bytes()) {
                        Scan::Status(scanned) => assert_eq!(scanned, parsed.status.as_deref(), "{body}"),
                        other => panic!("{body}: {other:?}"),
                    }
                }
            }
        }
    }
}

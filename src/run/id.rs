//! `RunId`: a run identifier that is safe to put in an upstream URL and to use as a cache key.
//!
//! Plextera does not document the id format, so the gateway accepts a conservative alphabet,
//! `[A-Za-z0-9_-]{1,128}`, checked after percent-decoding exactly once. Anything else (`..`, `/`,
//! NUL, a second layer of escapes, any non-ASCII byte such as an overlong UTF-8 sequence or a
//! homoglyph) is refused here and never reaches upstream. Because the alphabet is all unreserved
//! characters, the decoded id is also its own canonical URL form: `%41bc` and `Abc` are one run.

use std::borrow::{Borrow, Cow};
use std::fmt;
use std::sync::Arc;

use percent_encoding::percent_decode_str;

/// Longest id accepted, in bytes after decoding.
pub const MAX_RUN_ID_LEN: usize = 128;

/// A validated run id. Cheap to clone (shared), hashes and compares as its string.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunId(Arc<str>);

/// The path segment is not a run id the gateway will forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a run id is 1 to {MAX_RUN_ID_LEN} characters of A-Z, a-z, 0-9, '_' and '-'")]
pub struct InvalidRunId;

impl RunId {
    /// Percent-decodes `raw` once and validates the result.
    pub fn parse(raw: &str) -> Result<Self, InvalidRunId> {
        let decoded: Cow<'_, [u8]> = percent_decode_str(raw).into();
        if decoded.is_empty()
            || decoded.len() > MAX_RUN_ID_LEN
            || !decoded.iter().copied().all(is_run_id_byte)
        {
            return Err(InvalidRunId);
        }
        let id = std::str::from_utf8(&decoded).map_err(|_| InvalidRunId)?;
        Ok(Self(Arc::from(id)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_run_id_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-'
}

impl Borrow<str> for RunId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

impl fmt::Debug for RunId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, formatter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_ids_are_accepted_as_they_are() {
        for id in ["run_123", "a", "ABC-def_09", &"x".repeat(MAX_RUN_ID_LEN)] {
            assert_eq!(RunId::parse(id).expect("valid").as_str(), id);
        }
    }

    #[test]
    fn escapes_of_allowed_characters_decode_to_the_canonical_id() {
        assert_eq!(RunId::parse("%41bc").expect("valid").as_str(), "Abc");
        assert_eq!(RunId::parse("run%5F1").expect("valid").as_str(), "run_1");
    }

    #[test]
    fn hostile_ids_are_refused() {
        let too_long = "x".repeat(MAX_RUN_ID_LEN + 1);
        let cases = [
            "",
            "..",
            "%2e%2e",
            "a%2Fb",
            "a/b",
            "%00",
            "a%00b",
            "%252e",
            "%c0%ae",    // overlong UTF-8 for '.'
            "%C0%AF",    // overlong UTF-8 for '/'
            "r%D0%B0n",  // Cyrillic 'а' in place of Latin 'a'
            "%EF%BC%A1", // fullwidth 'Ａ'
            "run id",
            "run%20id",
            "run.json",
            "%",
            "%zz",
            &too_long,
        ];
        for raw in cases {
            assert_eq!(RunId::parse(raw), Err(InvalidRunId), "{raw:?}");
        }
    }

    #[test]
    fn length_is_counted_after_decoding() {
        let escaped = "%41".repeat(MAX_RUN_ID_LEN);
        assert_eq!(
            RunId::parse(&escaped).expect("valid").as_str().len(),
            MAX_RUN_ID_LEN
        );
    }
}

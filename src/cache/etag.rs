//! Validators for stored runs: the strong `ETag` and `If-None-Match` matching.
//!
//! The tag is the first 128 bits of the body's SHA-256, in hex: computed once when a run is
//! stored, the same on every replica and across restarts for the same bytes, so a browser that
//! revalidates against any replica gets its 304.

use http::HeaderValue;

/// Length of a strong tag: 32 hex digits in quotes.
pub const STRONG_ETAG_LEN: usize = 34;

/// `"<32 hex digits>"` for `body`, as the bytes of a header value.
pub fn strong_etag(body: &[u8]) -> [u8; STRONG_ETAG_LEN] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = ring::digest::digest(&ring::digest::SHA256, body);
    let mut tag = [b'"'; STRONG_ETAG_LEN];
    for (index, byte) in digest.as_ref()[..16].iter().enumerate() {
        tag[1 + 2 * index] = HEX[usize::from(byte >> 4)];
        tag[2 + 2 * index] = HEX[usize::from(byte & 0x0f)];
    }
    tag
}

/// Whether `If-None-Match` matches `etag` (weak comparison, as RFC 9110 §13.1.2 prescribes):
/// `*`, or any listed tag equal to it once a `W/` prefix is ignored.
pub fn none_match(if_none_match: &HeaderValue, etag: &HeaderValue) -> bool {
    if_none_match.as_bytes().trim_ascii() == b"*" || names(if_none_match, etag)
}

/// Whether `If-None-Match` lists `etag` itself (weak comparison; a `W/` prefix on either side is
/// ignored). `*` does not name a version: for a run still going, only the version the client holds
/// earns a 304.
pub fn names(if_none_match: &HeaderValue, etag: &HeaderValue) -> bool {
    let Ok(list) = if_none_match.to_str() else {
        return false;
    };
    let etag = etag.as_bytes();
    let etag = etag.strip_prefix(b"W/").unwrap_or(etag);
    list.split(',').map(str::trim).any(|candidate| {
        candidate != "*" && candidate.strip_prefix("W/").unwrap_or(candidate).as_bytes() == etag
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tag_is_stable_and_depends_on_every_byte() {
        let tag = strong_etag(b"{\"id\":\"r1\"}");
        assert_eq!(tag, strong_etag(b"{\"id\":\"r1\"}"));
        assert_ne!(tag, strong_etag(b"{\"id\":\"r2\"}"));
        assert_eq!(tag.len(), 34);
        // SHA-256 of the empty string starts e3b0c442 98fc1c14 9afbf4c8 996fb924.
        assert_eq!(&strong_etag(b""), b"\"e3b0c44298fc1c149afbf4c8996fb924\"");
    }

    #[test]
    fn if_none_match_uses_weak_comparison_over_a_list() {
        let etag = HeaderValue::from_static("\"abc\"");
        for header in [
            "\"abc\"",
            "W/\"abc\"",
            "\"x\", \"abc\"",
            " \"x\" ,W/\"abc\" ",
            "*",
        ] {
            assert!(
                none_match(&HeaderValue::from_str(header).expect("header"), &etag),
                "{header}"
            );
        }
        for header in ["\"abd\"", "abc", "\"ABC\"", "", "W/\"x\""] {
            assert!(
                !none_match(&HeaderValue::from_str(header).expect("header"), &etag),
                "{header}"
            );
        }
    }

    #[test]
    fn names_matches_listed_versions_weak_or_not_but_not_the_wildcard() {
        let weak = HeaderValue::from_static("W/\"abc\"");
        for header in ["W/\"abc\"", "\"abc\"", "\"x\", W/\"abc\""] {
            assert!(
                names(&HeaderValue::from_str(header).expect("header"), &weak),
                "{header}"
            );
        }
        for header in ["*", "W/\"abd\"", ""] {
            assert!(
                !names(&HeaderValue::from_str(header).expect("header"), &weak),
                "{header}"
            );
        }
        assert!(none_match(&HeaderValue::from_static(" * "), &weak));
    }
}

//! The value format in Redis, versioned so a later release can change it:
//!
//! ```text
//! "PXGW" | version: u8 = 1 | stored_at: u64 ms since the epoch, big-endian
//!        | SHA-256 of the body: 32 bytes
//!        | status: u8 length + bytes | content type: u16 length (big-endian) + bytes | body
//! ```
//!
//! A value with another magic or version, a short value, or a body whose hash does not match is
//! refused, as is a status this replica does not consider terminal.

use std::time::{SystemTime, UNIX_EPOCH};

use http::HeaderValue;
use ring::digest::{SHA256, digest};

use crate::cache::CachedRun;
use crate::run::status::RunStatuses;

const MAGIC: &[u8; 4] = b"PXGW";
const VERSION: u8 = 1;

pub fn encode(run: &CachedRun, status_label: &str) -> Vec<u8> {
    let content_type = run.content_type();
    let status = &status_label.as_bytes()[..status_label.len().min(255)];
    let content_type = &content_type.as_bytes()[..content_type.len().min(u16::MAX as usize)];
    let stored_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX));
    let body = run.body();
    let mut value = Vec::with_capacity(64 + status.len() + content_type.len() + body.len());
    value.extend_from_slice(MAGIC);
    value.push(VERSION);
    value.extend_from_slice(&stored_at.to_be_bytes());
    value.extend_from_slice(digest(&SHA256, &body).as_ref());
    value.push(status.len() as u8);
    value.extend_from_slice(status);
    value.extend_from_slice(&(content_type.len() as u16).to_be_bytes());
    value.extend_from_slice(content_type);
    value.extend_from_slice(&body);
    value
}

pub fn decode(value: &[u8], statuses: &RunStatuses) -> Option<CachedRun> {
    let rest = value.strip_prefix(MAGIC)?;
    let (&version, rest) = rest.split_first()?;
    if version != VERSION {
        return None;
    }
    let (_stored_at, rest) = rest.split_at_checked(8)?;
    let (hash, rest) = rest.split_at_checked(32)?;
    let (&status_len, rest) = rest.split_first()?;
    let (status, rest) = rest.split_at_checked(usize::from(status_len))?;
    let (content_type_len, rest) = rest.split_at_checked(2)?;
    let content_type_len = usize::from(u16::from_be_bytes([content_type_len[0], content_type_len[1]]));
    let (content_type, body) = rest.split_at_checked(content_type_len)?;
    if digest(&SHA256, body).as_ref() != hash {
        return None;
    }
    let status = statuses.classify(std::str::from_utf8(status).ok()?);
    if !statuses.is_terminal(status) {
        return None;
    }
    let content_type = HeaderValue::from_bytes(content_type).ok()?;
    Some(CachedRun::terminal(body, content_type, status))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::response::APPLICATION_JSON;

    fn statuses() -> RunStatuses {
        RunStatuses::new(&["COMPLETED", "FAILED", "CLOSED"])
    }

    fn run() -> CachedRun {
        CachedRun::terminal(
            br#"{"id":"r1","status":"FAILED"}"#,
            APPLICATION_JSON,
            statuses().classify("FAILED"),
        )
    }

    #[test]
    fn a_run_survives_the_round_trip() {
        let decoded = decode(&encode(&run(), "FAILED"), &statuses()).expect("decodes");
        assert_eq!(decoded.body(), run().body());
        assert_eq!(decoded.etag(), run().etag());
        assert_eq!(decoded.content_type(), APPLICATION_JSON);
        assert_eq!(decoded.run_status(), Some(statuses().classify("FAILED")));
    }

    #[test]
    fn damaged_or_foreign_values_are_refused() {
        let good = encode(&run(), "FAILED");
        let mut flipped = good.clone();
        *flipped.last_mut().expect("body") ^= 1;
        let mut newer = good.clone();
        newer[4] = 2;
        for bad in [
            &b""[..],
            b"PXGW",
            &good[..good.len() / 2],
            &flipped,
            &newer,
            b"{\"id\":\"r1\",\"status\":\"FAILED\"}",
        ] {
            assert!(decode(bad, &statuses()).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn a_status_this_replica_does_not_call_terminal_is_refused() {
        let value = encode(&run(), "FAILED");
        assert!(decode(&value, &RunStatuses::new(&["COMPLETED"])).is_none());
    }
}

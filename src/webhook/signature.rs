//! Verifies `X-Plextera-Signature: t=<unix>,v1=<hex>`: HMAC-SHA256 with the subscription's signing
//! secret over `"<t>.<raw body>"`, as Plextera signs its events (Stripe's and Standard Webhooks'
//! scheme).
//!
//! The raw body as received is what is signed: it is verified before anything parses it. Every
//! `v1=` value is tried against every configured secret (several secrets let one be rotated with no
//! event refused; several `v1=` values let the sender do the same): the MAC is computed once per
//! secret (streamed over `t`, `.` and the body, no copy), so a header packed with `v1=` values
//! costs no more than one, and each value is compared with it in constant time (`subtle`). A value that is not 64 hex digits is no signature at all, so an empty
//! or short `v1=` is never accepted. `t` must be within the tolerance of now in both directions, so
//! a captured event cannot be replayed later, nor one stamped in the future kept for later.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::hmac;
use subtle::ConstantTimeEq;

/// The header that carries the signature.
pub const SIGNATURE_HEADER: &str = "x-plextera-signature";
/// Longest signature header read; anything longer is refused unread.
const MAX_HEADER_LEN: usize = 2048;
/// Length of a SHA-256 MAC in hex.
const MAC_HEX_LEN: usize = 64;

/// Why an event was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No signature header, a malformed one, or no `v1=` that matches any secret.
    InvalidSignature,
    /// Signed, but `t` is further from now than the tolerance.
    StaleTimestamp,
}

/// The signing secrets in force, ready to verify with.
pub struct Verifier {
    keys: Vec<hmac::Key>,
    tolerance: Duration,
}

impl Verifier {
    /// `secrets`: every secret in force (old and new while one is rotated); none may be empty.
    pub fn new<S: AsRef<[u8]>>(secrets: &[S], tolerance: Duration) -> Self {
        Self {
            keys: secrets
                .iter()
                .map(|secret| hmac::Key::new(hmac::HMAC_SHA256, secret.as_ref()))
                .collect(),
            tolerance,
        }
    }

    /// Checks `header` (the signature header's value) against `body` at `now`.
    pub fn verify(&self, header: Option<&[u8]>, body: &[u8], now: SystemTime) -> Result<(), Refusal> {
        self.verify_signature(&Signature::read(header)?, body, now)
    }

    /// Checks a signature read beforehand ([`Signature::read`]) against `body` at `now`.
    pub fn verify_signature(
        &self,
        signature: &Signature<'_>,
        body: &[u8],
        now: SystemTime,
    ) -> Result<(), Refusal> {
        let parsed = &signature.0;
        let mut matches = subtle::Choice::from(0);
        for key in &self.keys {
            let mut context = hmac::Context::with_key(key);
            context.update(parsed.timestamp.as_bytes());
            context.update(b".");
            context.update(body);
            let expected = context.sign();
            for mac in &parsed.macs {
                matches |= expected.as_ref().ct_eq(mac);
            }
        }
        if !bool::from(matches) {
            return Err(Refusal::InvalidSignature);
        }
        // Checked after the MAC, so an unsigned request learns nothing about the clock.
        // A `t` beyond what the clock can hold is as stale as can be (and must not panic).
        let signed_at = UNIX_EPOCH
            .checked_add(Duration::from_secs(parsed.seconds))
            .ok_or(Refusal::StaleTimestamp)?;
        let skew = match now.duration_since(signed_at) {
            Ok(age) => age,
            Err(ahead) => ahead.duration(),
        };
        if skew > self.tolerance {
            return Err(Refusal::StaleTimestamp);
        }
        Ok(())
    }
}

/// A signature header that reads as one (`t=` and at least one well-formed `v1=`), not verified
/// yet: read before the body, so a request without one is refused before its body is read.
pub struct Signature<'a>(Parsed<'a>);

impl<'a> Signature<'a> {
    /// Reads the header's value (`None`: no header); not one, or over 2 KiB: `InvalidSignature`.
    pub fn read(header: Option<&'a [u8]>) -> Result<Self, Refusal> {
        let header = header
            .filter(|header| header.len() <= MAX_HEADER_LEN)
            .and_then(|header| std::str::from_utf8(header).ok())
            .ok_or(Refusal::InvalidSignature)?;
        parse(header).map(Self).ok_or(Refusal::InvalidSignature)
    }
}

/// `t=` and the `v1=` values of a signature header.
struct Parsed<'a> {
    timestamp: &'a str,
    seconds: u64,
    macs: Vec<[u8; MAC_HEX_LEN / 2]>,
}

/// Reads `t=<digits>` (exactly one) and every well-formed `v1=<64 hex>`; other schemes are skipped.
fn parse(header: &str) -> Option<Parsed<'_>> {
    let mut timestamp = None;
    let mut macs = Vec::new();
    for part in header.split(',') {
        let (name, value) = part.trim().split_once('=')?;
        match name {
            "t" => {
                if timestamp.is_some() || value.is_empty() || !value.bytes().all(|byte| byte.is_ascii_digit())
                {
                    return None;
                }
                timestamp = Some(value);
            }
            "v1" => {
                if let Some(mac) = hex_mac(value) {
                    macs.push(mac);
                }
            }
            _ => {}
        }
    }
    let timestamp = timestamp?;
    let seconds = timestamp.parse().ok()?;
    (!macs.is_empty()).then_some(Parsed {
        timestamp,
        seconds,
        macs,
    })
}

/// 64 hex digits (either case) as 32 bytes.
fn hex_mac(value: &str) -> Option<[u8; MAC_HEX_LEN / 2]> {
    if value.len() != MAC_HEX_LEN {
        return None;
    }
    let mut mac = [0; MAC_HEX_LEN / 2];
    for (byte, pair) in mac.iter_mut().zip(value.as_bytes().chunks(2)) {
        let digits = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(digits, 16).ok()?;
    }
    Some(mac)
}

/// `t=<now>,v1=<hex>` for `body` with `secret`: what Plextera sends (for `sign-webhook` and tests).
pub fn sign(secret: &[u8], body: &[u8], at: SystemTime) -> String {
    let seconds = at.duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs());
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut signed = format!("{seconds}.").into_bytes();
    signed.extend_from_slice(body);
    let tag = hmac::sign(&key, &signed);
    let hex: String = tag.as_ref().iter().map(|byte| format!("{byte:02x}")).collect();
    format!("t={seconds},v1={hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOLERANCE: Duration = Duration::from_secs(300);

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn verifier(secrets: &[&str]) -> Verifier {
        Verifier::new(secrets, TOLERANCE)
    }

    #[test]
    fn a_signature_made_with_a_secret_in_force_is_accepted() {
        let body = br#"{"eventId":"evt_1"}"#;
        let header = sign(b"whsec_new", body, now());
        assert_eq!(
            verifier(&["whsec_old", "whsec_new"]).verify(Some(header.as_bytes()), body, now()),
            Ok(())
        );
    }

    #[test]
    fn a_signature_over_another_body_or_with_another_secret_is_refused() {
        let header = sign(b"whsec_1", b"{}", now());
        let refused = Err(Refusal::InvalidSignature);
        assert_eq!(
            verifier(&["whsec_1"]).verify(Some(header.as_bytes()), b"{ }", now()),
            refused
        );
        assert_eq!(
            verifier(&["whsec_2"]).verify(Some(header.as_bytes()), b"{}", now()),
            refused
        );
        assert_eq!(verifier(&["whsec_1"]).verify(None, b"{}", now()), refused);
    }

    #[test]
    fn empty_short_or_malformed_signatures_are_never_accepted() {
        let valid = sign(b"s", b"{}", now());
        let (t, mac) = valid.split_once(",v1=").expect("t and v1");
        for header in [
            String::new(),
            format!("{t},v1="),
            format!("{t},v1={}", &mac[..32]),
            format!("{t},v1={mac}0"),
            format!("v1={mac}"),
            format!("{t},{t},v1={mac}"),
            format!("t=,v1={mac}"),
            format!("t=-5,v1={mac}"),
            format!("{t},v0={mac}"),
            t.to_owned(),
            "garbage".to_owned(),
        ] {
            assert_eq!(
                verifier(&["s"]).verify(Some(header.as_bytes()), b"{}", now()),
                Err(Refusal::InvalidSignature),
                "{header:?}"
            );
        }
    }

    #[test]
    fn one_valid_v1_among_several_is_enough() {
        let valid = sign(b"s", b"{}", now());
        let (t, mac) = valid.split_once(",v1=").expect("t and v1");
        let header = format!("{t},v1={},v1={mac}", "0".repeat(64));
        assert_eq!(
            verifier(&["s"]).verify(Some(header.as_bytes()), b"{}", now()),
            Ok(())
        );
        let upper = format!("{t},v1={}", mac.to_ascii_uppercase());
        assert_eq!(
            verifier(&["s"]).verify(Some(upper.as_bytes()), b"{}", now()),
            Ok(())
        );
    }

    #[test]
    fn timestamps_beyond_the_tolerance_either_way_are_stale() {
        let verifier = verifier(&["s"]);
        for (offset, ahead, expected) in [
            (299, false, Ok(())),
            (299, true, Ok(())),
            (301, false, Err(Refusal::StaleTimestamp)),
            (301, true, Err(Refusal::StaleTimestamp)),
        ] {
            let signed_at = if ahead {
                now() + Duration::from_secs(offset)
            } else {
                now() - Duration::from_secs(offset)
            };
            let header = sign(b"s", b"{}", signed_at);
            assert_eq!(
                verifier.verify(Some(header.as_bytes()), b"{}", now()),
                expected,
                "{offset} {ahead}"
            );
        }
    }

    #[test]
    fn a_timestamp_beyond_the_clock_is_stale_not_a_panic() {
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"s");
        let t = u64::MAX;
        let tag = hmac::sign(&key, format!("{t}.{{}}").as_bytes());
        let hex: String = tag.as_ref().iter().map(|byte| format!("{byte:02x}")).collect();
        let header = format!("t={t},v1={hex}");
        assert_eq!(
            verifier(&["s"]).verify(Some(header.as_bytes()), b"{}", now()),
            Err(Refusal::StaleTimestamp)
        );
    }

    #[test]
    fn an_oversized_header_is_refused_unread() {
        let valid = sign(b"s", b"{}", now());
        let header = format!("{valid},x={}", "a".repeat(MAX_HEADER_LEN));
        assert_eq!(
            verifier(&["s"]).verify(Some(header.as_bytes()), b"{}", now()),
            Err(Refusal::InvalidSignature)
        );
    }
}

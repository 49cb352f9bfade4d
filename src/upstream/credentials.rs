//! The upstream API key, in a wrapper that cannot be printed by accident, and the credentials the
//! client sends and scrubs from what comes back, swapped whole when the key is rotated.
//!
//! `Debug` and `Display` both print `[redacted]`, so a key that slips into a log macro, an error or a
//! panic message shows nothing. The only way to the bytes is [`ApiKey::authorization`], which builds
//! the header value marked sensitive (hyper then never indexes it in HPACK and its own `Debug`
//! hides it), and [`ApiKey::expose`], kept for tests and scrubbing.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::HeaderValue;
use secrecy::{ExposeSecret, SecretString};

use super::key_echo::EchoFinder;

/// The server-side Plextera key. Cloning shares nothing mutable; dropping zeroes the memory.
#[derive(Clone)]
pub struct ApiKey(SecretString);

impl ApiKey {
    /// Accepts a key that can be sent in a header: non-empty, visible ASCII only.
    pub fn new(value: &str) -> Option<Self> {
        let usable = !value.is_empty() && value.bytes().all(|byte| byte.is_ascii_graphic());
        usable.then(|| Self(SecretString::from(value.to_owned())))
    }

    /// `Authorization: api-key <key>`, marked sensitive.
    pub fn authorization(&self) -> HeaderValue {
        let mut value = HeaderValue::from_str(&format!("api-key {}", self.0.expose_secret()))
            .expect("ApiKey::new admits visible ASCII only, which is always a valid header value");
        value.set_sensitive(true);
        value
    }

    /// The key itself. Call sites are few and reviewed: tests, and scrubbing echoed keys.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("[redacted]")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("[redacted]")
    }
}

/// Replaces the upstream key at run time (SIGHUP re-reads `api_key_file`).
#[derive(Clone)]
pub struct KeyRotation(pub(super) Arc<ArcSwap<Credentials>>);

impl KeyRotation {
    /// `text` with every echo of the key (current or, during a rotation, previous) replaced by
    /// `[redacted]`; `None` when it holds none. For log lines (see `telemetry::redact_with`).
    pub fn redact(&self, text: &[u8]) -> Option<Vec<u8>> {
        let credentials = self.0.load();
        credentials
            .appears_in(text)
            .then(|| credentials.replace_echoes(text))
    }

    /// Whether `key` is the one being sent (for tests).
    #[cfg(test)]
    pub(crate) fn sends(&self, key: &ApiKey) -> bool {
        self.0.load().authorization == key.authorization()
    }

    /// Starts sending `key` instead of the current one. Requests already sent finish with the
    /// old key; bodies that echo either key are still scrubbed.
    pub fn replace(&self, key: &ApiKey) {
        let previous = self.0.load();
        self.0
            .store(Arc::new(Credentials::new(key, Some(&previous.current))));
    }
}

/// The key as sent, and as searched for in what comes back. Deliberately not `Debug`.
pub(super) struct Credentials {
    pub(super) authorization: HeaderValue,
    /// Finds the current key in upstream bytes, in any spelling ([`EchoFinder`]).
    current: EchoFinder,
    /// Finds the key it replaced (requests in flight during a rotation still carry it).
    previous: Option<EchoFinder>,
}

impl Credentials {
    pub(super) fn new(key: &ApiKey, previous: Option<&EchoFinder>) -> Self {
        Self {
            authorization: key.authorization(),
            current: EchoFinder::new(key.expose().as_bytes()),
            previous: previous.cloned(),
        }
    }

    fn finders(&self) -> impl Iterator<Item = &EchoFinder> {
        std::iter::once(&self.current).chain(self.previous.as_ref())
    }

    pub(super) fn appears_in(&self, bytes: &[u8]) -> bool {
        self.finders().any(|finder| finder.find(bytes).is_some())
    }

    /// `body` with every echo of the key, in any spelling, replaced by `[redacted]`; untouched (and
    /// not copied) when there is none, which is always, unless upstream echoes credentials back.
    pub(super) fn scrub(&self, body: Bytes) -> Bytes {
        if !self.appears_in(&body) {
            return body;
        }
        tracing::warn!("upstream echoed the API key in a response body: scrubbed before forwarding");
        Bytes::from(self.replace_echoes(&body))
    }

    /// `text` with every echo of either key replaced by `[redacted]`.
    pub(super) fn replace_echoes(&self, text: &[u8]) -> Vec<u8> {
        let mut scrubbed = text.to_vec();
        for finder in self.finders() {
            scrubbed = replace_all(&scrubbed, finder, b"[redacted]");
        }
        scrubbed
    }
}

fn replace_all(haystack: &[u8], finder: &EchoFinder, replacement: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len());
    let mut copied = 0;
    for echo in finder.echoes(haystack) {
        out.extend_from_slice(&haystack[copied..echo.start]);
        out.extend_from_slice(replacement);
        copied = echo.end;
    }
    out.extend_from_slice(&haystack[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printing_never_shows_the_key() {
        let key = ApiKey::new("pk_live_0123456789").expect("valid key");
        assert_eq!(format!("{key}"), "[redacted]");
        assert_eq!(format!("{key:?}"), "[redacted]");
        assert_eq!(format!("{:?}", key.authorization()), "Sensitive");
    }

    #[test]
    fn authorization_uses_the_api_key_scheme() {
        let key = ApiKey::new("abc").expect("valid key");
        assert_eq!(key.authorization(), "api-key abc");
        assert!(key.authorization().is_sensitive());
    }

    #[test]
    fn unusable_keys_are_refused() {
        assert!(ApiKey::new("").is_none());
        assert!(ApiKey::new("has space").is_none());
        assert!(ApiKey::new("line\nbreak").is_none());
        assert!(ApiKey::new("é").is_none());
    }

    #[test]
    fn echoed_keys_are_scrubbed_and_clean_bodies_untouched() {
        let old = ApiKey::new("old-key-123").expect("key");
        let new = ApiKey::new("new-key-456").expect("key");
        let first = Credentials::new(&old, None);
        let rotated = Credentials::new(&new, Some(&first.current));

        let clean = Bytes::from_static(b"{\"id\":\"r1\"}");
        assert_eq!(
            rotated.scrub(clean.clone()).as_ptr(),
            clean.as_ptr(),
            "not copied"
        );

        let echo = Bytes::from_static(b"bad key new-key-456 / old-key-123 / new-key-456!");
        assert_eq!(
            rotated.scrub(echo),
            Bytes::from_static(b"bad key [redacted] / [redacted] / [redacted]!")
        );
        assert!(rotated.appears_in(b"api-key old-key-123"));
        assert!(!first.appears_in(b"new-key-456"));
    }
}

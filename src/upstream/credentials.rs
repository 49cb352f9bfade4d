//! The upstream API key, in a wrapper that cannot be printed by accident.
//!
//! `Debug` and `Display` both print `[redacted]`, so a key that slips into a log macro, an error or a
//! panic message shows nothing. The only way to the bytes is [`ApiKey::authorization`], which builds
//! the header value marked sensitive (hyper then never indexes it in HPACK and its own `Debug`
//! hides it), and [`ApiKey::expose`], kept for tests and scrubbing.

use std::fmt;

use http::HeaderValue;
use secrecy::{ExposeSecret, SecretString};

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
}

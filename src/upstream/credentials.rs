//! The upstream API key, in a wrapper that cannot be printed by accident, and the other secrets
//! read at start-up.
//!
//! `Debug` and `Display` both print `[redacted]`, so a key that slips into a log macro, an error or a
//! panic message shows nothing. The only way to the bytes is [`ApiKey::authorization`], which builds
//! the header value marked sensitive (hyper then never indexes it in HPACK and its own `Debug`
//! hides it), and [`ApiKey::expose`], kept for tests and scrubbing.

use std::fmt;

use http::HeaderValue;
use secrecy::{ExposeSecret, SecretString};

use crate::config::{Config, ConfigError};
use crate::edge::client_auth::ClientTokens;

/// Everything start-up reads from the environment rather than the config file.
#[derive(Debug, Clone)]
pub struct Secrets {
    pub api_key: ApiKey,
    /// `Some` when `[server] client_tokens_env` turns client authentication on.
    pub client_tokens: Option<ClientTokens>,
    /// The Redis password, when `[cache.shared] password_env` names one.
    pub redis_password: Option<SecretString>,
}

impl Secrets {
    /// Reads the key (from `api_key_env` or `api_key_file`), the client tokens (from
    /// `client_tokens_env`) and the Redis password (from `password_env`). `env` looks up an
    /// environment variable.
    pub fn load(config: &Config, env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let api_key = config.upstream.load_api_key(&env)?;
        let client_tokens = config
            .server
            .load_client_tokens(&env)?
            .map(|tokens| ClientTokens::new(&tokens));
        let redis_password = match &config.cache.shared {
            Some(shared) => shared.load_password(&env)?.map(SecretString::from),
            None => None,
        };
        Ok(Self {
            api_key,
            client_tokens,
            redis_password,
        })
    }

    /// Just a key, no client authentication.
    pub fn key_only(api_key: ApiKey) -> Self {
        Self {
            api_key,
            client_tokens: None,
            redis_password: None,
        }
    }
}

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

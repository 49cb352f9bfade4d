//! The checks start-up makes on a config beyond [`Config::validate`] and reading the secrets:
//! whatever the parts built from it would refuse later. `--check-config` and start-up both call
//! [`preflight`], so a config the check passes is one start-up takes, and the two cannot drift.
//!
//! It builds what can be built without a socket, exactly as the parts do: the upstream client's
//! TLS set-up with `upstream.ca_file` (read and parsed), the Redis connection settings from
//! `cache.shared.url` and the password, and the OTLP traces URL from `telemetry.otlp_endpoint`
//! with the collector's TLS set-up (`telemetry.ca_file`).
//! It must not connect, bind or spawn anything: a config is checked where no Redis or collector
//! is reachable.

use secrecy::ExposeSecret;

use crate::config::secrets::Secrets;
use crate::config::{Config, ConfigError, report};

/// Every check start-up makes that [`Config::validate`] and [`Secrets::load`] do not, each
/// failing with one line naming the config key.
pub fn preflight(config: &Config, secrets: &Secrets) -> Result<(), ConfigError> {
    crate::upstream::tls::tls_config(config.upstream.ca_file.as_deref())?;
    if let Some(shared) = &config.cache.shared {
        redis_client(
            &shared.url,
            secrets
                .redis_password
                .as_ref()
                .map(|password| password.expose_secret()),
        )?;
    }
    if let Some(endpoint) = &config.telemetry.otlp_endpoint {
        otlp_traces_url(endpoint)?;
        crate::upstream::tls::tls_config_for("telemetry.ca_file", config.telemetry.ca_file.as_deref())?;
    }
    Ok(())
}

/// The Redis client `url` and `password` make, as the Redis tier opens it (no connection made).
fn redis_client(url: &str, password: Option<&str>) -> Result<redis::Client, ConfigError> {
    let invalid = |error: redis::RedisError| {
        ConfigError::Invalid(report::about(
            "cache.shared.url",
            format_args!("cannot be used ({:?})", error.kind()),
        ))
    };
    crate::cache::redis::client_for(url, password).map_err(invalid)
}

/// The URL spans are exported to, as the OTLP exporter parses it.
fn otlp_traces_url(endpoint: &str) -> Result<http::Uri, ConfigError> {
    crate::ops::spans::traces_url(endpoint)
        .parse::<http::Uri>()
        .map_err(|error| {
            ConfigError::Invalid(report::about(
                "telemetry.otlp_endpoint",
                format_args!("cannot be used to export spans ({error})"),
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_garbage_ca_file_is_refused_naming_the_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        let secrets = Secrets::key_only(crate::ApiKey::new("k").expect("key"));
        let mut config = Config::default();
        assert!(preflight(&config, &secrets).is_ok());
        config.upstream.ca_file = Some(dir.path().join("absent.pem"));
        let missing = preflight(&config, &secrets).expect_err("missing").to_string();
        assert!(missing.contains("upstream.ca_file"), "{missing}");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").expect("write");
        config.upstream.ca_file = Some(garbage);
        let garbage = preflight(&config, &secrets).expect_err("garbage").to_string();
        assert!(garbage.contains("upstream.ca_file"), "{garbage}");
    }

    #[test]
    fn a_collector_ca_file_that_cannot_be_read_is_refused_naming_its_key() {
        let secrets = Secrets::key_only(crate::ApiKey::new("k").expect("key"));
        let mut config = Config::default();
        config.telemetry.otlp_endpoint = Some("https://otel:4318".to_owned());
        assert!(preflight(&config, &secrets).is_ok());
        config.telemetry.ca_file = Some("/nonexistent/collector-ca.pem".into());
        let refused = preflight(&config, &secrets).expect_err("unreadable").to_string();
        assert!(refused.contains("telemetry.ca_file"), "{refused}");
    }

    #[test]
    fn redis_settings_and_the_traces_url_are_built_without_connecting() {
        assert!(redis_client("redis://127.0.0.1:1/0", Some("pw")).is_ok());
        let refused = redis_client("memcached://x", None)
            .expect_err("not redis")
            .to_string();
        assert!(refused.contains("cache.shared.url"), "{refused}");
        assert_eq!(
            otlp_traces_url("http://otel:4318/").expect("url").to_string(),
            "http://otel:4318/v1/traces"
        );
    }
}

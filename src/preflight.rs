//! The checks start-up makes on a config beyond [`Config::validate`] and reading the secrets:
//! whatever the parts built from it would refuse later. `--check-config` and start-up both call
//! [`preflight`], so a config the check passes is one start-up takes, and the two cannot drift.
//!
//! It builds what can be built without a socket, exactly as the parts do: the upstream client's
//! TLS set-up with `upstream.ca_file` (read and parsed), the Redis connection settings from
//! `cache.shared.url` and the password, and the OTLP traces URL from `telemetry.otlp_endpoint`.
//! It must not connect, bind or spawn anything: a config is checked where no Redis or collector
//! is reachable.

use redis::IntoConnectionInfo;
use secrecy::ExposeSecret;

use crate::config::secrets::Secrets;
use crate::config::{Config, ConfigError, report};

/// Where OTLP/HTTP traces are sent under the collector's base URL (`ops::spans` adds the same).
const OTLP_TRACES_PATH: &str = "/v1/traces";

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
    let mut info = url.into_connection_info().map_err(invalid)?;
    if let Some(password) = password {
        let settings = info.redis_settings().clone().set_password(password);
        info = info.set_redis_settings(settings);
    }
    redis::Client::open(info).map_err(invalid)
}

/// The URL spans are exported to, as the OTLP exporter parses it.
fn otlp_traces_url(endpoint: &str) -> Result<http::Uri, ConfigError> {
    format!("{}{OTLP_TRACES_PATH}", endpoint.trim_end_matches('/'))
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

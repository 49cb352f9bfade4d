//! The client's TLS set-up: rustls with the ring provider, the webpki roots and, if configured,
//! the CAs in `upstream.ca_file` (or, for the span exporter, `telemetry.ca_file`).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::config::ConfigError;

/// rustls with the ring provider, the webpki roots and, if configured, the CAs in `ca_file`.
pub fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, ConfigError> {
    tls_config_for("upstream.ca_file", ca_file)
}

/// As [`tls_config`], a bad `ca_file` reported under `key`.
pub fn tls_config_for(key: &str, ca_file: Option<&Path>) -> Result<rustls::ClientConfig, ConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let invalid = |why: String| {
            ConfigError::Invalid(format!(
                "{key} {}: {why}",
                crate::config::report::shown(&path.display().to_string())
            ))
        };
        let certificates = CertificateDer::pem_file_iter(path)
            .map_err(|error| invalid(error.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| invalid(error.to_string()))?;
        if certificates.is_empty() {
            return Err(invalid("holds no PEM certificate".to_owned()));
        }
        for certificate in certificates {
            roots
                .add(certificate)
                .map_err(|error| invalid(error.to_string()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| ConfigError::Invalid(format!("TLS setup: {error}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

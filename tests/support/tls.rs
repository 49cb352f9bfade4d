//! A TLS identity for `localhost`, for the HTTPS upstreams tests stand up: a fresh self-signed
//! certificate, whose PEM the gateway is given as its `ca_file`.

use std::sync::Arc;

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

/// An acceptor offering `alpn` (e.g. `h2`, `http/1.1`), and its certificate as PEM.
pub fn localhost_acceptor(alpn: &[&[u8]]) -> (TlsAcceptor, String) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der()));
    let mut tls =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![certified.cert.der().clone()], key)
            .expect("server certificate");
    tls.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    (TlsAcceptor::from(Arc::new(tls)), certified.cert.pem())
}

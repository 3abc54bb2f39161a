//! The TLS server certificate, replaceable while serving (the webhook and the hub use it).
//!
//! rustls asks the [`CertResolver`] for a certificate on every handshake, so
//! [`CertResolver::set_pem`] takes effect for the next handshake without closing anything:
//! connections already open keep the certificate they negotiated (still valid — rotation
//! happens long before expiry), new ones get the new one. No handshake ever fails for lack of
//! a certificate, which is what "zero failed admissions during rotation" needs.

use std::io;
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls::crypto::ring;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no certificate found in the PEM data")]
    NoCertificate,
    #[error("no private key found in the PEM data")]
    NoPrivateKey,
    #[error("unreadable PEM: {0}")]
    Pem(#[from] io::Error),
    #[error("unusable private key: {0}")]
    Key(#[from] rustls::Error),
    #[error("unusable CA certificate: {0}")]
    Ca(rustls::Error),
}

/// The serving certificate, swappable at runtime.
#[derive(Debug)]
pub struct CertResolver {
    // A lock, not an atomic swap crate: reads are one Arc clone per handshake and writes
    // happen once per rotation, so contention is negligible.
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertResolver {
    pub fn from_pem(cert_chain_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        Ok(Self {
            current: RwLock::new(Arc::new(certified_key(cert_chain_pem, key_pem)?)),
        })
    }

    /// Replace the certificate for subsequent handshakes. On error the old one stays.
    pub fn set_pem(&self, cert_chain_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        let key = Arc::new(certified_key(cert_chain_pem, key_pem)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = key;
        Ok(())
    }

    /// DER of the leaf certificate currently served.
    pub fn current_leaf(&self) -> CertificateDer<'static> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).cert[0].clone()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

fn certified_key(cert_chain_pem: &str, key_pem: &str) -> Result<CertifiedKey, TlsError> {
    let certs: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut cert_chain_pem.as_bytes()).collect::<Result<_, _>>()?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    let key: PrivateKeyDer<'static> =
        rustls_pemfile::private_key(&mut key_pem.as_bytes())?.ok_or(TlsError::NoPrivateKey)?;
    let signing_key = ring::sign::any_supported_type(&key)?;
    Ok(CertifiedKey::new(certs, signing_key))
}

/// A rustls client config (ring, TLS 1.2/1.3) that trusts only the certificates in `ca_pem`:
/// how a client of the webhook or the hub (the benches, the tests) trusts the operator's CA.
pub fn client_config(ca_pem: &str) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(cert?).map_err(TlsError::Ca)?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    Ok(
        rustls::ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Ca)?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A rustls server config (ring, TLS 1.2/1.3, HTTP/1.1) that takes its certificate from
/// `resolver`.
pub fn tls_config(resolver: Arc<CertResolver>) -> Arc<ServerConfig> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_trusts_the_ca_it_is_given_and_needs_one() {
        let day = std::time::Duration::from_secs(86_400);
        let bundle =
            crate::tls::generate_bundle(&["localhost".to_string()], 1_700_000_000, day, day)
                .unwrap();
        assert!(client_config(&bundle.ca_cert_pem).is_ok());
        assert!(matches!(client_config(""), Err(TlsError::NoCertificate)));
        let garbage = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n";
        assert!(matches!(client_config(garbage), Err(TlsError::Ca(_))));
    }
}

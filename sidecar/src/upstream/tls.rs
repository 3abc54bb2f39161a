//! How the agent trusts the platform: the rustls client configuration every upstream uses
//! (`http` through reqwest, `socketio` through tokio-rustls, `nats` when it skips
//! verification). Public web roots plus `upstream_ca`, the client certificate for mTLS, and
//! `upstream_insecure_skip_verify`, which accepts any certificate. Also the configuration that
//! trusts one CA only (the hub's).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::config::Config;

/// The TLS client configuration towards the platform (ALPN `h2`, `http/1.1`; transports that
/// speak something else replace it).
pub(crate) fn client_config(config: &Config) -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    // Read even when unused, so a broken CA mount is an error either way.
    let roots = roots(config)?;
    let builder = if config.upstream_insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
    } else {
        builder.with_root_certificates(roots)
    };
    let mut tls = match (&config.upstream_client_cert, &config.upstream_client_key) {
        (Some(cert), Some(key)) => {
            let pem = std::fs::read(cert)
                .with_context(|| format!("upstream_client_cert: cannot read {}", cert.display()))?;
            let chain = rustls_pemfile::certs(&mut pem.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| {
                    format!("upstream_client_cert: {} is not valid PEM", cert.display())
                })?;
            let pem = std::fs::read(key)
                .with_context(|| format!("upstream_client_key: cannot read {}", key.display()))?;
            let key = rustls_pemfile::private_key(&mut pem.as_slice())
                .ok()
                .flatten()
                .with_context(|| {
                    format!("upstream_client_key: no private key in {}", key.display())
                })?;
            builder
                .with_client_auth_cert(chain, key)
                .context("upstream_client_cert/key")?
        }
        _ => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tls)
}

/// A client configuration (no ALPN) that trusts only the certificates in `ca_file`, the file
/// of option `option` (the hub's CA).
pub fn trusting_only(option: &str, ca_file: &Path) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    add_pem_file(&mut roots, option, ca_file)?;
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

/// Public web roots plus the CAs of `upstream_ca`.
fn roots(config: &Config) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = &config.upstream_ca {
        add_pem_file(&mut roots, "upstream_ca", ca)?;
    }
    Ok(roots)
}

/// Adds the certificates of the PEM file `path` (of option `option`, named in the errors): at
/// least one.
fn add_pem_file(
    roots: &mut rustls::RootCertStore,
    option: &str,
    path: &Path,
) -> anyhow::Result<()> {
    let pem =
        std::fs::read(path).with_context(|| format!("{option}: cannot read {}", path.display()))?;
    let mut n = 0;
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert =
            cert.with_context(|| format!("{option}: {} is not valid PEM", path.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("{option}: bad certificate in {}", path.display()))?;
        n += 1;
    }
    anyhow::ensure!(
        n > 0,
        "{option}: no certificate found in {}",
        path.display()
    );
    Ok(())
}

/// `upstream_insecure_skip_verify`: any certificate for any name is accepted, so the
/// connection is encrypted but not authenticated (anyone on the path can read and change it).
/// The handshake's signatures are still checked, which only proves the peer holds the key of
/// the certificate it sent.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The server side of a test's TLS peer (a platform, a hub): an acceptor with a fresh
/// self-signed certificate for `name`, and that certificate as PEM (the CA a client trusts).
#[cfg(test)]
pub(crate) fn self_signed_acceptor(name: &str) -> (tokio_rustls::TlsAcceptor, String) {
    let c = rcgen::generate_simple_self_signed(vec![name.into()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(c.key_pair.serialize_der().into());
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![c.cert.der().clone()], key)
    .unwrap();
    (
        tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        c.cert.pem(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A TLS server whose certificate (for `platform.test`) no root vouches for; it writes
    /// `hello` to each client that completes the handshake.
    async fn untrusted_platform() -> std::net::SocketAddr {
        let (acceptor, _) = self_signed_acceptor("platform.test");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let _ = tls.write_all(b"hello").await;
                    let _ = tls.shutdown().await;
                }
            }
        });
        addr
    }

    async fn handshake(flags: &[&str], addr: std::net::SocketAddr) -> Result<String, String> {
        let config = Config::load_from(["nano-agent"].iter().chain(flags)).unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(&config).unwrap()));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("platform.test").unwrap();
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let mut got = String::new();
        tls.read_to_string(&mut got)
            .await
            .map_err(|e| e.to_string())?;
        Ok(got)
    }

    #[tokio::test]
    async fn an_unknown_certificate_is_refused_unless_verification_is_skipped() {
        let addr = untrusted_platform().await;
        let refused = handshake(&[], addr).await.unwrap_err();
        assert!(refused.contains("UnknownIssuer"), "{refused}");
        let accepted = handshake(&["--upstream-insecure-skip-verify=true"], addr).await;
        assert_eq!(accepted.as_deref(), Ok("hello"));
    }
}

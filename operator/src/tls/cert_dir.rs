//! A serving certificate mounted from a `kubernetes.io/tls` Secret (`--webhook-cert-dir`),
//! re-read as the kubelet updates the files in place.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tracing::{info, warn};

use super::CertResolver;
use crate::shutdown::Shutdown;

/// A certificate issued into a directory (a mounted `kubernetes.io/tls` Secret with `ca.crt`).
#[derive(Debug, PartialEq)]
pub struct CertFiles {
    /// `tls.crt`
    pub cert: String,
    /// `tls.key`
    pub key: String,
    /// `ca.crt`
    pub ca: String,
}

impl CertFiles {
    pub fn read(dir: &std::path::Path) -> anyhow::Result<Self> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name)).with_context(|| {
                format!(
                    "reading {} (--webhook-cert-dir expects tls.crt, tls.key and ca.crt)",
                    dir.join(name).display()
                )
            })
        };
        Ok(Self {
            cert: read("tls.crt")?,
            key: read("tls.key")?,
            ca: read("ca.crt")?,
        })
    }
}

/// Swaps in a renewed certificate from `dir` (the kubelet updates mounted Secrets in place).
pub async fn follow_cert_dir(
    dir: std::path::PathBuf,
    mut current: CertFiles,
    resolver: Arc<CertResolver>,
    mut shutdown: Shutdown,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            _ = shutdown.wait() => return,
        }
        match CertFiles::read(&dir) {
            Ok(files) if files != current => match resolver.set_pem(&files.cert, &files.key) {
                Ok(()) => {
                    info!(dir = %dir.display(), "serving certificate reloaded");
                    current = files;
                }
                Err(error) => warn!(%error, "new certificate unusable; keeping the old one"),
            },
            Ok(_) => {}
            Err(error) => warn!(error = %format!("{error:#}"), "certificate directory unreadable"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cert_dir_is_read_and_served_or_named_when_incomplete() {
        let dir = std::env::temp_dir().join(format!("nanogate-cert-dir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(vec!["nanogate-webhook.nanogate-system.svc".to_string()])
                .unwrap()
                .self_signed(&key)
                .unwrap();
        std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
        std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
        let missing = CertFiles::read(&dir).unwrap_err();
        assert!(format!("{missing:#}").contains("ca.crt"), "{missing:#}");
        std::fs::write(dir.join("ca.crt"), cert.pem()).unwrap();
        let files = CertFiles::read(&dir).unwrap();
        assert!(CertResolver::from_pem(&files.cert, &files.key).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! Issuing the self-made CA and the webhook's serving certificate, storing them in a Secret,
//! and the JSON patch that sets `caBundle`. Pure: no API calls.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use serde_json::json;

use crate::names::{
    ANNOTATION_CA_NOT_AFTER, ANNOTATION_CERT_NOT_AFTER, ANNOTATION_CERT_NOT_BEFORE,
    ANNOTATION_CERT_SANS, MANAGED_BY, MANAGED_BY_LABEL,
};

/// The CA's common name.
pub const CA_COMMON_NAME: &str = "nanogate-webhook-ca";
/// Clock-skew allowance: certificates are valid from a little before they are made.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("Kubernetes API error on {what}: {source}")]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("the generated certificate could not be loaded: {0}")]
    Tls(#[from] super::TlsError),
    #[error("gave up after repeated conflicts on Secret {0}")]
    Contended(String),
    #[error(
        "{0} exists but was not created by nanogate-operator (no label {MANAGED_BY_LABEL}={MANAGED_BY}); delete it to let the operator create its certificates, or use another Secret name"
    )]
    Foreign(String),
}

impl CertError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            CertError::Generate(_) => "generate",
            CertError::Kube { .. } => "kube",
            CertError::Tls(_) => "tls",
            CertError::Contended(_) => "contended",
            CertError::Foreign(_) => "foreign_secret",
        }
    }
}

pub type Result<T, E = CertError> = std::result::Result<T, E>;

/// Where the certificates live and what they are for.
#[derive(Clone, Debug)]
pub struct CertConfig {
    /// Namespace of the Secret and of the webhook Service (the operator's namespace).
    pub namespace: String,
    pub secret_name: String,
    /// Name of the webhook Service; its DNS names become the serving certificate's SANs.
    pub service_name: String,
    /// Extra SANs, e.g. `localhost` and `127.0.0.1` when the webhook is registered by URL.
    pub extra_dns: Vec<String>,
    pub extra_ips: Vec<IpAddr>,
    /// Webhook configurations whose every `clientConfig.caBundle` is kept current.
    pub mutating_webhooks: Vec<String>,
    pub validating_webhooks: Vec<String>,
    pub ca_validity: Duration,
    pub cert_validity: Duration,
    /// How often the rotation loop re-reads the Secret and re-checks `caBundle`.
    pub check_interval: Duration,
    /// Owner of the certificate Secret (the MutatingWebhookConfiguration), so uninstalling the
    /// webhook garbage-collects the Secret the operator made at runtime.
    pub owner: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>,
}

impl CertConfig {
    /// Defaults: CA 10 years, serving certificate 90 days (renewed after 60), checked every
    /// 10 minutes.
    pub fn new(namespace: &str, service_name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            secret_name: format!("{service_name}-certs"),
            service_name: service_name.into(),
            extra_dns: Vec::new(),
            extra_ips: Vec::new(),
            mutating_webhooks: Vec::new(),
            validating_webhooks: Vec::new(),
            ca_validity: Duration::from_secs(10 * 365 * 24 * 3600),
            cert_validity: Duration::from_secs(90 * 24 * 3600),
            check_interval: Duration::from_secs(600),
            owner: None,
        }
    }

    /// The SANs of the serving certificate: the Service's DNS names, then the extras.
    pub fn sans(&self) -> Vec<String> {
        let (svc, ns) = (&self.service_name, &self.namespace);
        let mut sans = vec![
            svc.clone(),
            format!("{svc}.{ns}"),
            format!("{svc}.{ns}.svc"),
            format!("{svc}.{ns}.svc.cluster.local"),
        ];
        sans.extend(self.extra_dns.iter().cloned());
        sans.extend(self.extra_ips.iter().map(IpAddr::to_string));
        sans
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The CA and serving certificate, as stored in the Secret.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertBundle {
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_not_after: u64,
    pub cert_not_before: u64,
    pub cert_not_after: u64,
    pub sans: Vec<String>,
}

/// Why the serving certificate must be (re)issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Renewal {
    /// Two thirds of its validity have passed (or it has expired).
    Due,
    /// The wanted SANs differ from the certificate's.
    SansChanged,
    /// The CA itself has expired (it lives 10 years by default and is not rotated with
    /// overlap): everything is regenerated and `caBundle` re-patched.
    CaExpired,
}

impl CertBundle {
    /// The instant (unix seconds) at which the serving certificate should be renewed: two
    /// thirds of the way through its validity.
    pub fn renew_at(&self) -> u64 {
        let span = self.cert_not_after.saturating_sub(self.cert_not_before);
        self.cert_not_before + span * 2 / 3
    }

    pub fn needs_renewal(&self, now: u64, wanted_sans: &[String]) -> Option<Renewal> {
        if now >= self.ca_not_after {
            Some(Renewal::CaExpired)
        } else if now >= self.renew_at() {
            Some(Renewal::Due)
        } else if self.sans != wanted_sans {
            Some(Renewal::SansChanged)
        } else {
            None
        }
    }
}

/// Set the validity of `params` from unix seconds (rcgen takes `time::OffsetDateTime`).
fn set_validity(params: &mut CertificateParams, not_before: u64, not_after: u64) {
    let at = |secs: u64| rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(secs);
    params.not_before = at(not_before);
    params.not_after = at(not_after);
}

/// The CA's parameters. Deterministic apart from validity, so the CA can be rebuilt from its
/// stored key: certificates signed by the rebuilt CA carry the same issuer name and key
/// identifier and verify against the CA certificate already in `caBundle`.
fn ca_params(not_before: u64, not_after: u64) -> CertificateParams {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, CA_COMMON_NAME);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "nanogate");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, not_before, not_after);
    params
}

/// `bundle` with a new serving certificate for `sans` (DNS names or IP addresses), signed by
/// its CA, whose key is `ca_key`; the CA is kept.
fn with_serving(
    bundle: CertBundle,
    ca_key: &KeyPair,
    sans: &[String],
    now: u64,
    validity: Duration,
) -> Result<CertBundle> {
    // The CA rebuilt from its key signs with its name and key identifier; its validity (its
    // not-before is not recorded) does not go into what it signs.
    let issuer = ca_params(0, bundle.ca_not_after).self_signed(ca_key)?;
    let mut params = CertificateParams::new(sans.to_vec())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        DnType::CommonName,
        sans.first().map_or("nanogate-webhook", String::as_str),
    );
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let not_before = now.saturating_sub(BACKDATE.as_secs());
    // Never outlive the CA.
    let not_after = (now + validity.as_secs()).min(bundle.ca_not_after);
    set_validity(&mut params, not_before, not_after);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer, ca_key)?;
    Ok(CertBundle {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        cert_not_before: not_before,
        cert_not_after: not_after,
        sans: sans.to_vec(),
        ..bundle
    })
}

/// A new CA and a serving certificate for `sans`.
pub fn generate_bundle(
    sans: &[String],
    now: u64,
    ca_validity: Duration,
    cert_validity: Duration,
) -> Result<CertBundle> {
    let ca_key = KeyPair::generate()?;
    let ca_not_before = now.saturating_sub(BACKDATE.as_secs());
    let ca_not_after = now + ca_validity.as_secs();
    let ca_cert = ca_params(ca_not_before, ca_not_after).self_signed(&ca_key)?;
    let ca = CertBundle {
        ca_cert_pem: ca_cert.pem(),
        ca_key_pem: ca_key.serialize_pem(),
        ca_not_after,
        ..CertBundle::default()
    };
    with_serving(ca, &ca_key, sans, now, cert_validity)
}

/// A new serving certificate for `sans` from the bundle's CA (the CA is kept).
pub fn renew_serving(
    bundle: &CertBundle,
    sans: &[String],
    now: u64,
    cert_validity: Duration,
) -> Result<CertBundle> {
    let ca_key = KeyPair::from_pem(&bundle.ca_key_pem)?;
    with_serving(bundle.clone(), &ca_key, sans, now, cert_validity)
}

/// The Secret holding `bundle` (type `kubernetes.io/tls`, plus `ca.crt`/`ca.key`).
pub fn bundle_to_secret(
    cfg: &CertConfig,
    bundle: &CertBundle,
    resource_version: Option<String>,
) -> Secret {
    let data = BTreeMap::from([
        (
            "tls.crt".to_string(),
            ByteString(bundle.cert_pem.clone().into_bytes()),
        ),
        (
            "tls.key".to_string(),
            ByteString(bundle.key_pem.clone().into_bytes()),
        ),
        (
            "ca.crt".to_string(),
            ByteString(bundle.ca_cert_pem.clone().into_bytes()),
        ),
        (
            "ca.key".to_string(),
            ByteString(bundle.ca_key_pem.clone().into_bytes()),
        ),
    ]);
    let annotations = BTreeMap::from([
        (
            ANNOTATION_CA_NOT_AFTER.to_string(),
            bundle.ca_not_after.to_string(),
        ),
        (
            ANNOTATION_CERT_NOT_BEFORE.to_string(),
            bundle.cert_not_before.to_string(),
        ),
        (
            ANNOTATION_CERT_NOT_AFTER.to_string(),
            bundle.cert_not_after.to_string(),
        ),
        (ANNOTATION_CERT_SANS.to_string(), bundle.sans.join(",")),
    ]);
    Secret {
        metadata: ObjectMeta {
            owner_references: cfg.owner.clone().map(|owner| vec![owner]),
            name: Some(cfg.secret_name.clone()),
            namespace: Some(cfg.namespace.clone()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_string(),
                MANAGED_BY.to_string(),
            )])),
            annotations: Some(annotations),
            resource_version,
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Default::default()
    }
}

/// Read a bundle back; `None` when anything is missing or malformed (then it is regenerated).
pub fn bundle_from_secret(secret: &Secret) -> Option<CertBundle> {
    let data = secret.data.as_ref()?;
    let text = |k: &str| {
        data.get(k)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .filter(|s| !s.is_empty())
    };
    let annotations = secret.metadata.annotations.as_ref()?;
    let secs = |k: &str| annotations.get(k).and_then(|v| v.parse::<u64>().ok());
    let sans = annotations.get(ANNOTATION_CERT_SANS)?;
    Some(CertBundle {
        ca_cert_pem: text("ca.crt")?,
        ca_key_pem: text("ca.key")?,
        cert_pem: text("tls.crt")?,
        key_pem: text("tls.key")?,
        ca_not_after: secs(ANNOTATION_CA_NOT_AFTER)?,
        cert_not_before: secs(ANNOTATION_CERT_NOT_BEFORE)?,
        cert_not_after: secs(ANNOTATION_CERT_NOT_AFTER)?,
        sans: sans
            .split(',')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
    })
}

/// A JSON patch setting `caBundle` on every webhook of a configuration whose bundle differs;
/// `None` when all are current. `webhooks` are (name, current caBundle) in order; each
/// change is guarded by a `test` of the webhook's name, so a concurrent reorder makes the
/// patch fail instead of writing the wrong entry.
pub fn ca_bundle_patch(
    webhooks: &[(String, Option<Vec<u8>>)],
    ca_pem: &str,
) -> Option<json_patch::Patch> {
    let mut ops = Vec::new();
    for (i, (name, current)) in webhooks.iter().enumerate() {
        if current.as_deref() == Some(ca_pem.as_bytes()) {
            continue;
        }
        ops.push(json!({"op": "test", "path": format!("/webhooks/{i}/name"), "value": name}));
        ops.push(json!({
            "op": "add",
            "path": format!("/webhooks/{i}/clientConfig/caBundle"),
            // ByteString fields are base64 in JSON.
            "value": ByteString(ca_pem.as_bytes().to_vec()),
        }));
    }
    if ops.is_empty() {
        return None;
    }
    Some(
        serde_json::from_value(serde_json::Value::Array(ops))
            .expect("well-formed patch operations"),
    )
}

/// How long to sleep before the next check: the check interval, or less when renewal is due
/// sooner.
pub fn next_check(bundle: &CertBundle, now: u64, check_interval: Duration) -> Duration {
    let until_renewal = Duration::from_secs(bundle.renew_at().saturating_sub(now));
    check_interval
        .min(until_renewal)
        .max(Duration::from_secs(1))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::tls::CertResolver;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use std::sync::Arc;

    /// The configuration the tests of this module and of `rotation` issue for.
    pub(crate) fn cfg() -> CertConfig {
        let mut cfg = CertConfig::new("nanogate-system", "nanogate-webhook");
        cfg.extra_dns = vec!["localhost".into()];
        cfg.extra_ips = vec!["127.0.0.1".parse().unwrap()];
        cfg
    }

    fn der(pem: &str) -> Vec<CertificateDer<'static>> {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// Verify `leaf_pem` for `name` against `ca_pem` at `now`, as a TLS client would.
    fn verify(ca_pem: &str, leaf_pem: &str, name: &str, now: u64) -> Result<(), rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        for c in der(ca_pem) {
            roots.add(c).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
        let leaf = der(leaf_pem).remove(0);
        verifier
            .verify_server_cert(
                &leaf,
                &[],
                &ServerName::try_from(name.to_string()).unwrap(),
                &[],
                UnixTime::since_unix_epoch(Duration::from_secs(now)),
            )
            .map(|_| ())
    }

    #[test]
    fn sans_cover_service_dns_and_extras() {
        assert_eq!(
            cfg().sans(),
            [
                "nanogate-webhook",
                "nanogate-webhook.nanogate-system",
                "nanogate-webhook.nanogate-system.svc",
                "nanogate-webhook.nanogate-system.svc.cluster.local",
                "localhost",
                "127.0.0.1"
            ]
        );
    }

    #[test]
    fn generated_certificate_verifies_for_every_san() {
        let now = unix_now();
        let c = cfg();
        let b = generate_bundle(&c.sans(), now, c.ca_validity, c.cert_validity).unwrap();
        for name in [
            "nanogate-webhook.nanogate-system.svc",
            "nanogate-webhook.nanogate-system.svc.cluster.local",
            "localhost",
            "127.0.0.1",
        ] {
            verify(&b.ca_cert_pem, &b.cert_pem, name, now)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert!(verify(&b.ca_cert_pem, &b.cert_pem, "evil.example.com", now).is_err());
        // Expired after its validity.
        assert!(
            verify(
                &b.ca_cert_pem,
                &b.cert_pem,
                "localhost",
                b.cert_not_after + 10
            )
            .is_err()
        );
        assert_eq!(
            b.cert_not_after - b.cert_not_before,
            c.cert_validity.as_secs() + BACKDATE.as_secs()
        );
        // The resolver accepts it.
        CertResolver::from_pem(&b.cert_pem, &b.key_pem).unwrap();
    }

    #[test]
    fn renewed_certificate_verifies_against_the_original_ca() {
        let now = unix_now();
        let c = cfg();
        let b = generate_bundle(&c.sans(), now, c.ca_validity, c.cert_validity).unwrap();
        let later = b.renew_at() + 1;
        let r = renew_serving(&b, &c.sans(), later, c.cert_validity).unwrap();
        assert_eq!(
            r.ca_cert_pem, b.ca_cert_pem,
            "CA unchanged, caBundle stays valid"
        );
        assert_ne!(r.cert_pem, b.cert_pem);
        assert_ne!(r.key_pem, b.key_pem);
        verify(
            &b.ca_cert_pem,
            &r.cert_pem,
            "nanogate-webhook.nanogate-system.svc",
            later,
        )
        .unwrap();
        assert!(r.needs_renewal(later, &c.sans()).is_none());
    }

    #[test]
    fn renewal_at_two_thirds_or_on_san_change() {
        let b = CertBundle {
            ca_cert_pem: String::new(),
            ca_key_pem: String::new(),
            cert_pem: String::new(),
            key_pem: String::new(),
            ca_not_after: 10_000,
            cert_not_before: 300,
            cert_not_after: 1_200,
            sans: vec!["a".into()],
        };
        let sans = vec!["a".to_string()];
        assert_eq!(b.renew_at(), 900);
        assert_eq!(b.needs_renewal(899, &sans), None);
        assert_eq!(b.needs_renewal(900, &sans), Some(Renewal::Due));
        assert_eq!(b.needs_renewal(5_000, &sans), Some(Renewal::Due));
        assert_eq!(b.needs_renewal(10_000, &sans), Some(Renewal::CaExpired));
        assert_eq!(
            b.needs_renewal(400, &["a".into(), "b".into()]),
            Some(Renewal::SansChanged)
        );
        assert_eq!(
            next_check(&b, 400, Duration::from_secs(600)),
            Duration::from_secs(500)
        );
        assert_eq!(
            next_check(&b, 100, Duration::from_secs(60)),
            Duration::from_secs(60)
        );
        assert_eq!(
            next_check(&b, 2_000, Duration::from_secs(60)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn secret_round_trip() {
        let c = cfg();
        let b = generate_bundle(&c.sans(), unix_now(), c.ca_validity, c.cert_validity).unwrap();
        let s = bundle_to_secret(&c, &b, Some("42".into()));
        assert_eq!(s.type_.as_deref(), Some("kubernetes.io/tls"));
        assert_eq!(s.metadata.resource_version.as_deref(), Some("42"));
        assert_eq!(s.metadata.name.as_deref(), Some("nanogate-webhook-certs"));
        let json = serde_json::to_value(&s).unwrap();
        let back: Secret = serde_json::from_value(json).unwrap();
        assert_eq!(bundle_from_secret(&back), Some(b));
        let mut broken = back.clone();
        broken.data.as_mut().unwrap().remove("ca.key");
        assert_eq!(bundle_from_secret(&broken), None);
    }

    #[test]
    fn ca_bundle_patch_body() {
        let ca = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let webhooks = vec![
            ("inject.nanogate.io".to_string(), None),
            (
                "current.nanogate.io".to_string(),
                Some(ca.as_bytes().to_vec()),
            ),
            ("stale.nanogate.io".to_string(), Some(b"old".to_vec())),
        ];
        let patch = ca_bundle_patch(&webhooks, ca).unwrap();
        let b64 = serde_json::to_value(ByteString(ca.as_bytes().to_vec())).unwrap();
        assert_eq!(
            serde_json::to_value(&patch).unwrap(),
            json!([
                {"op": "test", "path": "/webhooks/0/name", "value": "inject.nanogate.io"},
                {"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": b64},
                {"op": "test", "path": "/webhooks/2/name", "value": "stale.nanogate.io"},
                {"op": "add", "path": "/webhooks/2/clientConfig/caBundle", "value": b64},
            ])
        );
        // Applied to a configuration, it sets every bundle.
        let mut doc = json!({"webhooks": [
            {"name": "inject.nanogate.io", "clientConfig": {"url": "https://127.0.0.1:9443/mutate"}},
            {"name": "current.nanogate.io", "clientConfig": {"caBundle": b64}},
            {"name": "stale.nanogate.io", "clientConfig": {"caBundle": "b2xk"}},
        ]});
        json_patch::patch(&mut doc, &patch).unwrap();
        for w in doc["webhooks"].as_array().unwrap() {
            assert_eq!(w["clientConfig"]["caBundle"], b64);
        }
        let current: Vec<_> = webhooks
            .iter()
            .map(|(n, _)| (n.clone(), Some(ca.as_bytes().to_vec())))
            .collect();
        assert!(ca_bundle_patch(&current, ca).is_none());
    }
}

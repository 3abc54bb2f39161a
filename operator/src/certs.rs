//! Webhook certificates without cert-manager.
//!
//! At start the operator calls [`ensure_certificates`]: it loads the CA and serving certificate
//! from one Secret, or creates them (self-signed CA, serving certificate for the webhook
//! Service's DNS names). It then patches `caBundle` into the named webhook configurations
//! ([`patch_ca_bundles`]) and serves with [`crate::webhook::CertResolver`]. [`run_rotation`]
//! renews the serving certificate at two thirds of its validity (or when the wanted SANs
//! change), swaps it into the live resolver, and keeps `caBundle` current (a Helm upgrade that
//! resets it is repaired within one check interval). Nothing generated lives in the Helm
//! release, so GitOps tools see no drift.
//!
//! Several replicas cooperate through the Secret: creation races end in `409 AlreadyExists`
//! and renewal races in `409 Conflict`; the loser reloads the winner's Secret. Every serving
//! certificate is signed by the same CA, so whichever one a replica serves is trusted.
//!
//! Validity dates are recorded in Secret annotations (unix seconds) because we issue the
//! certificates ourselves and need no X.509 parser to read them back.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use serde_json::json;

use crate::webhook::CertResolver;

pub const CA_COMMON_NAME: &str = "nanogate-webhook-ca";
/// The label marking the Secret as ours ([`MANAGED_BY_LABEL`]=[`MANAGED_BY`]): only such a
/// Secret is ever overwritten.
use crate::names::{
    ANNOTATION_CA_NOT_AFTER, ANNOTATION_CERT_NOT_AFTER, ANNOTATION_CERT_NOT_BEFORE,
    ANNOTATION_CERT_SANS, MANAGED_BY, MANAGED_BY_LABEL,
};
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
    Tls(#[from] crate::webhook::server::TlsError),
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
#[derive(Clone, Debug, PartialEq, Eq)]
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

/// Issue a serving certificate for `sans` (DNS names or IP addresses) signed by the CA.
fn issue_serving(
    ca_cert_pem_key: (&str, u64, u64),
    ca_key: &KeyPair,
    sans: &[String],
    now: u64,
    validity: Duration,
) -> Result<(String, String, u64, u64)> {
    let (_ca_pem, ca_not_before, ca_not_after) = ca_cert_pem_key;
    let issuer = ca_params(ca_not_before, ca_not_after).self_signed(ca_key)?;
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
    let not_after = (now + validity.as_secs()).min(ca_not_after);
    set_validity(&mut params, not_before, not_after);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer, ca_key)?;
    Ok((cert.pem(), key.serialize_pem(), not_before, not_after))
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
    let ca_cert_pem = ca_cert.pem();
    let (cert_pem, key_pem, cert_not_before, cert_not_after) = issue_serving(
        (&ca_cert_pem, ca_not_before, ca_not_after),
        &ca_key,
        sans,
        now,
        cert_validity,
    )?;
    Ok(CertBundle {
        ca_cert_pem,
        ca_key_pem: ca_key.serialize_pem(),
        cert_pem,
        key_pem,
        ca_not_after,
        cert_not_before,
        cert_not_after,
        sans: sans.to_vec(),
    })
}

/// A new serving certificate for `sans` from the bundle's CA (the CA is kept).
pub fn renew_serving(
    bundle: &CertBundle,
    sans: &[String],
    now: u64,
    cert_validity: Duration,
) -> Result<CertBundle> {
    let ca_key = KeyPair::from_pem(&bundle.ca_key_pem)?;
    // The CA's own not-before is not recorded and does not matter for signing.
    let (cert_pem, key_pem, cert_not_before, cert_not_after) = issue_serving(
        (
            &bundle.ca_cert_pem,
            bundle.cert_not_before.min(now),
            bundle.ca_not_after,
        ),
        &ca_key,
        sans,
        now,
        cert_validity,
    )?;
    Ok(CertBundle {
        cert_pem,
        key_pem,
        cert_not_before,
        cert_not_after,
        sans: sans.to_vec(),
        ..bundle.clone()
    })
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

fn kube_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> CertError {
    let what = what.into();
    move |source| CertError::Kube { what, source }
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// Load the bundle from the Secret, creating or renewing it as needed. Returns the bundle in
/// force (possibly written by another replica).
pub async fn ensure_certificates(client: kube::Client, cfg: &CertConfig) -> Result<CertBundle> {
    let secrets: Api<Secret> = Api::namespaced(client, &cfg.namespace);
    let wanted = cfg.sans();
    let what = format!("Secret {}/{}", cfg.namespace, cfg.secret_name);
    for _attempt in 0..5 {
        let now = unix_now();
        let existing = secrets
            .get_opt(&cfg.secret_name)
            .await
            .map_err(kube_err(&what))?;
        let Some(secret) = existing else {
            let bundle = generate_bundle(&wanted, now, cfg.ca_validity, cfg.cert_validity)?;
            match secrets
                .create(
                    &PostParams::default(),
                    &bundle_to_secret(cfg, &bundle, None),
                )
                .await
            {
                Ok(_) => {
                    tracing::info!(secret = %what, not_after = bundle.cert_not_after, "created webhook CA and serving certificate");
                    return Ok(bundle);
                }
                Err(e) if is_status(&e, 409) => continue, // another replica won; load theirs
                Err(e) => return Err(kube_err(&what)(e)),
            }
        };
        let rv = secret.metadata.resource_version.clone();
        let renewed = match bundle_from_secret(&secret) {
            None if secret.labels().get(MANAGED_BY_LABEL).map(String::as_str)
                != Some(MANAGED_BY) =>
            {
                return Err(CertError::Foreign(what));
            }
            None => {
                tracing::warn!(secret = %what, "webhook certificate Secret unreadable; generating a new CA");
                generate_bundle(&wanted, now, cfg.ca_validity, cfg.cert_validity)?
            }
            Some(bundle) => match bundle.needs_renewal(now, &wanted) {
                None => return Ok(bundle),
                Some(Renewal::CaExpired) => {
                    tracing::error!(secret = %what, "webhook CA expired; generating a new CA and serving certificate");
                    generate_bundle(&wanted, now, cfg.ca_validity, cfg.cert_validity)?
                }
                Some(reason) => {
                    if bundle.ca_not_after.saturating_sub(now) < 365 * 24 * 3600 {
                        tracing::warn!(secret = %what, ca_not_after = bundle.ca_not_after, "webhook CA expires within a year; delete the Secret during a maintenance window to get a new one");
                    }
                    tracing::info!(secret = %what, ?reason, "renewing webhook serving certificate");
                    renew_serving(&bundle, &wanted, now, cfg.cert_validity)?
                }
            },
        };
        // resourceVersion makes this a compare-and-swap: a concurrent renewal gets 409.
        match secrets
            .replace(
                &cfg.secret_name,
                &PostParams::default(),
                &bundle_to_secret(cfg, &renewed, rv),
            )
            .await
        {
            Ok(_) => return Ok(renewed),
            Err(e) if is_status(&e, 409) => continue,
            Err(e) => return Err(kube_err(&what)(e)),
        }
    }
    Err(CertError::Contended(what))
}

/// Set `caBundle` on every webhook of the configured Mutating/ValidatingWebhookConfigurations.
/// A configuration that does not exist is skipped with a warning (e.g. a local run that
/// registers webhooks itself).
pub async fn patch_ca_bundles(client: kube::Client, cfg: &CertConfig, ca_pem: &str) -> Result<()> {
    let mutating: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    patch_ca_bundles_of(&mutating, &cfg.mutating_webhooks, ca_pem, |c| {
        c.webhooks
            .iter()
            .flatten()
            .map(|w| {
                (
                    w.name.clone(),
                    w.client_config.ca_bundle.as_ref().map(|b| b.0.clone()),
                )
            })
            .collect()
    })
    .await?;
    let validating: Api<ValidatingWebhookConfiguration> = Api::all(client);
    patch_ca_bundles_of(&validating, &cfg.validating_webhooks, ca_pem, |c| {
        c.webhooks
            .iter()
            .flatten()
            .map(|w| {
                (
                    w.name.clone(),
                    w.client_config.ca_bundle.as_ref().map(|b| b.0.clone()),
                )
            })
            .collect()
    })
    .await
}

/// [`patch_ca_bundles`] for one kind of webhook configuration; `webhooks` lists each webhook's
/// name and current `caBundle` (the two kinds hold them in different types).
async fn patch_ca_bundles_of<K>(
    api: &Api<K>,
    names: &[String],
    ca_pem: &str,
    webhooks: impl Fn(&K) -> Vec<(String, Option<Vec<u8>>)>,
) -> Result<()>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
    K::DynamicType: Default,
{
    let kind = K::kind(&K::DynamicType::default()).to_string();
    for name in names {
        let what = format!("{kind} {name}");
        let Some(current) = api.get_opt(name).await.map_err(kube_err(&what))? else {
            tracing::warn!(%name, "{kind} not found; caBundle not set");
            continue;
        };
        if let Some(patch) = ca_bundle_patch(&webhooks(&current), ca_pem) {
            api.patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
                .await
                .map_err(kube_err(&what))?;
            tracing::info!(%name, "caBundle updated");
        }
    }
    Ok(())
}

/// Start-up: ensure the certificates, patch `caBundle`, and build the live resolver.
pub async fn bootstrap(
    client: kube::Client,
    cfg: &CertConfig,
) -> Result<(CertBundle, Arc<CertResolver>)> {
    let bundle = ensure_certificates(client.clone(), cfg).await?;
    patch_ca_bundles(client, cfg, &bundle.ca_cert_pem).await?;
    let resolver = Arc::new(CertResolver::from_pem(&bundle.cert_pem, &bundle.key_pem)?);
    Ok((bundle, resolver))
}

/// How long to sleep before the next check: the check interval, or less when renewal is due
/// sooner.
pub fn next_check(bundle: &CertBundle, now: u64, check_interval: Duration) -> Duration {
    let until_renewal = Duration::from_secs(bundle.renew_at().saturating_sub(now));
    check_interval
        .min(until_renewal)
        .max(Duration::from_secs(1))
}

/// Keep the certificate fresh until `shutdown`: renew at 2/3 of validity, pick up another
/// replica's renewal from the Secret, swap the live resolver, and keep `caBundle` current.
/// Errors are logged and retried at the next check; the served certificate stays valid for
/// the remaining third of its life meanwhile.
pub async fn run_rotation(
    client: kube::Client,
    cfg: CertConfig,
    mut current: CertBundle,
    resolver: Arc<CertResolver>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let wait = next_check(&current, unix_now(), cfg.check_interval);
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match ensure_certificates(client.clone(), &cfg).await {
            Ok(bundle) => {
                // caBundle first: when the CA changed, the API server must trust it before
                // this replica presents a certificate signed by it.
                if let Err(error) =
                    patch_ca_bundles(client.clone(), &cfg, &bundle.ca_cert_pem).await
                {
                    tracing::warn!(%error, "caBundle check failed; retrying at the next check");
                }
                if bundle.cert_pem != current.cert_pem {
                    match resolver.set_pem(&bundle.cert_pem, &bundle.key_pem) {
                        Ok(()) => tracing::info!(
                            not_after = bundle.cert_not_after,
                            "serving certificate rotated"
                        ),
                        Err(error) => {
                            tracing::error!(%error, "new serving certificate unusable; keeping the old one");
                            continue;
                        }
                    }
                }
                current = bundle;
            }
            Err(error) => {
                tracing::warn!(%error, reason = error.metric_label(), "certificate check failed; retrying at the next check");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    fn cfg() -> CertConfig {
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

    /// Kubernetes API interactions against a mocked API server (`tower_test`): each step
    /// asserts method, path and body, then answers as the API server would.
    mod api {
        use super::*;
        use http::{Request, Response, StatusCode};
        use kube::client::Body;

        type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

        fn client() -> (kube::Client, Handle) {
            let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
            (kube::Client::new(service, "default"), handle)
        }

        fn status(code: u16, reason: &str) -> Response<Body> {
            let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "reason": reason, "code": code, "message": reason});
            Response::builder()
                .status(StatusCode::from_u16(code).unwrap())
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap()
        }

        fn ok(value: &impl serde::Serialize) -> Response<Body> {
            Response::builder()
                .body(Body::from(serde_json::to_vec(value).unwrap()))
                .unwrap()
        }

        /// Next request: asserts method and path, returns the body as JSON (Null if empty).
        async fn expect(
            handle: &mut Handle,
            method: &str,
            path: &str,
        ) -> (
            serde_json::Value,
            tower_test::mock::SendResponse<Response<Body>>,
            Request<()>,
        ) {
            let (request, send) =
                tokio::time::timeout(Duration::from_secs(5), handle.next_request())
                    .await
                    .expect("request within 5 s")
                    .expect("a request");
            assert_eq!(request.method().as_str(), method);
            assert_eq!(request.uri().path(), path);
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap();
            let json = if bytes.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            };
            (json, send, Request::from_parts(parts, ()))
        }

        const SECRET_PATH: &str =
            "/api/v1/namespaces/nanogate-system/secrets/nanogate-webhook-certs";
        const SECRETS_PATH: &str = "/api/v1/namespaces/nanogate-system/secrets";

        #[tokio::test]
        async fn creates_the_secret_when_missing() {
            let (client, mut handle) = client();
            let c = cfg();
            let task = tokio::spawn({
                let c = c.clone();
                async move { ensure_certificates(client, &c).await }
            });
            let (_, send, _) = expect(&mut handle, "GET", SECRET_PATH).await;
            send.send_response(status(404, "NotFound"));
            let (body, send, _) = expect(&mut handle, "POST", SECRETS_PATH).await;
            assert_eq!(body["type"], "kubernetes.io/tls");
            assert_eq!(
                body["metadata"]["annotations"][ANNOTATION_CERT_SANS],
                c.sans().join(",")
            );
            for key in ["tls.crt", "tls.key", "ca.crt", "ca.key"] {
                assert!(body["data"][key].is_string(), "{key}");
            }
            send.send_response(ok(&body));
            let bundle = task.await.unwrap().unwrap();
            let stored: Secret = serde_json::from_value(body).unwrap();
            assert_eq!(bundle_from_secret(&stored), Some(bundle));
        }

        #[tokio::test]
        async fn losing_the_creation_race_loads_the_winners_secret() {
            let (client, mut handle) = client();
            let c = cfg();
            let winner =
                generate_bundle(&c.sans(), unix_now(), c.ca_validity, c.cert_validity).unwrap();
            let task = tokio::spawn({
                let c = c.clone();
                async move { ensure_certificates(client, &c).await }
            });
            let (_, send, _) = expect(&mut handle, "GET", SECRET_PATH).await;
            send.send_response(status(404, "NotFound"));
            let (_, send, _) = expect(&mut handle, "POST", SECRETS_PATH).await;
            send.send_response(status(409, "AlreadyExists"));
            let (_, send, _) = expect(&mut handle, "GET", SECRET_PATH).await;
            send.send_response(ok(&bundle_to_secret(&c, &winner, Some("7".into()))));
            assert_eq!(task.await.unwrap().unwrap(), winner);
        }

        #[tokio::test]
        async fn renews_a_due_certificate_with_compare_and_swap() {
            let (client, mut handle) = client();
            let c = cfg();
            let long_ago = unix_now() - c.cert_validity.as_secs(); // past 2/3 of its life
            let old = generate_bundle(&c.sans(), long_ago, c.ca_validity, c.cert_validity).unwrap();
            let task = tokio::spawn({
                let c = c.clone();
                async move { ensure_certificates(client, &c).await }
            });
            let (_, send, _) = expect(&mut handle, "GET", SECRET_PATH).await;
            send.send_response(ok(&bundle_to_secret(&c, &old, Some("41".into()))));
            let (body, send, _) = expect(&mut handle, "PUT", SECRET_PATH).await;
            assert_eq!(
                body["metadata"]["resourceVersion"], "41",
                "replace is conditional"
            );
            send.send_response(ok(&body));
            let renewed = task.await.unwrap().unwrap();
            assert_eq!(renewed.ca_cert_pem, old.ca_cert_pem);
            assert_ne!(renewed.cert_pem, old.cert_pem);
            assert!(renewed.needs_renewal(unix_now(), &c.sans()).is_none());
        }

        #[tokio::test]
        async fn never_overwrites_a_secret_it_did_not_create() {
            let (client, mut handle) = client();
            let c = cfg();
            let task = tokio::spawn({
                let c = c.clone();
                async move { ensure_certificates(client, &c).await }
            });
            let (_, send, _) = expect(&mut handle, "GET", SECRET_PATH).await;
            send.send_response(ok(&json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "nanogate-webhook-certs", "namespace": "nanogate-system", "resourceVersion": "3"},
                "type": "kubernetes.io/tls",
                "data": {"tls.crt": "Zm9v", "tls.key": "YmFy"},
            })));
            let err = task.await.unwrap().unwrap_err();
            assert_eq!(err.metric_label(), "foreign_secret");
            assert!(
                err.to_string().contains("not created by nanogate-operator"),
                "{err}"
            );
        }

        #[tokio::test]
        async fn patches_ca_bundles_and_skips_missing_configurations() {
            let (client, mut handle) = client();
            let mut c = cfg();
            c.mutating_webhooks = vec!["nanogate-injector".into()];
            c.validating_webhooks = vec!["nanogate-validator".into()];
            let ca = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
            let task = tokio::spawn({
                let c = c.clone();
                async move { patch_ca_bundles(client, &c, ca).await }
            });
            let path = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/nanogate-injector";
            let (_, send, _) = expect(&mut handle, "GET", path).await;
            send.send_response(ok(&json!({
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "MutatingWebhookConfiguration",
                "metadata": {"name": "nanogate-injector"},
                "webhooks": [{"name": "inject.nanogate.io", "admissionReviewVersions": ["v1"],
                    "sideEffects": "None", "clientConfig": {"service": {"name": "nanogate-webhook", "namespace": "nanogate-system"}}}],
            })));
            let (body, send, req) = expect(&mut handle, "PATCH", path).await;
            assert_eq!(req.headers()["content-type"], "application/json-patch+json");
            let b64 = serde_json::to_value(ByteString(ca.as_bytes().to_vec())).unwrap();
            assert_eq!(
                body,
                json!([
                    {"op": "test", "path": "/webhooks/0/name", "value": "inject.nanogate.io"},
                    {"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": b64},
                ])
            );
            send.send_response(ok(&json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration", "metadata": {"name": "nanogate-injector"}})));
            let path = "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/nanogate-validator";
            let (_, send, _) = expect(&mut handle, "GET", path).await;
            send.send_response(status(404, "NotFound"));
            task.await.unwrap().unwrap();
        }
    }
}

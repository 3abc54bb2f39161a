//! Certificates against the API server: load or create the Secret at start-up, patch
//! `caBundle` into the webhook configurations, and renew before expiry.

use std::future::Future;
use std::sync::Arc;

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};

use super::CertResolver;
use super::bundle::*;
use crate::names::{MANAGED_BY, MANAGED_BY_LABEL};

#[cfg(test)]
use crate::names::ANNOTATION_CERT_SANS;

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

/// Each webhook's name and current `caBundle` in a webhook configuration. A macro: the two kinds
/// hold their webhooks in different types with the same fields.
macro_rules! webhook_bundles {
    ($config:expr) => {
        $config
            .webhooks
            .iter()
            .flatten()
            .map(|w| {
                (
                    w.name.clone(),
                    w.client_config.ca_bundle.as_ref().map(|b| b.0.clone()),
                )
            })
            .collect()
    };
}

/// Set `caBundle` on every webhook of the configured Mutating/ValidatingWebhookConfigurations.
/// A configuration that does not exist is skipped with a warning (e.g. a local run that
/// registers webhooks itself).
pub async fn patch_ca_bundles(client: kube::Client, cfg: &CertConfig, ca_pem: &str) -> Result<()> {
    let mutating: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    patch_ca_bundles_of(&mutating, &cfg.mutating_webhooks, ca_pem, |c| {
        webhook_bundles!(c)
    })
    .await?;
    let validating: Api<ValidatingWebhookConfiguration> = Api::all(client);
    patch_ca_bundles_of(&validating, &cfg.validating_webhooks, ca_pem, |c| {
        webhook_bundles!(c)
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
    use crate::tls::bundle::tests::cfg;
    use k8s_openapi::ByteString;
    use serde_json::json;
    use std::time::Duration;

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

        /// `ensure_certificates` for `c` in the background against a mocked API server.
        fn ensure_in_background(
            c: &CertConfig,
        ) -> (tokio::task::JoinHandle<Result<CertBundle>>, Handle) {
            let (client, handle) = client();
            let c = c.clone();
            let task = tokio::spawn(async move { ensure_certificates(client, &c).await });
            (task, handle)
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
            let c = cfg();
            let (task, mut handle) = ensure_in_background(&c);
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
            let c = cfg();
            let winner =
                generate_bundle(&c.sans(), unix_now(), c.ca_validity, c.cert_validity).unwrap();
            let (task, mut handle) = ensure_in_background(&c);
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
            let c = cfg();
            let long_ago = unix_now() - c.cert_validity.as_secs(); // past 2/3 of its life
            let old = generate_bundle(&c.sans(), long_ago, c.ca_validity, c.cert_validity).unwrap();
            let (task, mut handle) = ensure_in_background(&c);
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
            let c = cfg();
            let (task, mut handle) = ensure_in_background(&c);
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

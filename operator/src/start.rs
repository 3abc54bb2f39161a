//! Start-up of the operator's servers beside the controller: certificates (self-made CA,
//! rotation, `caBundle`), the admission webhook and the control-channel hub with its status
//! writer.
//! Every replica serves webhooks; the hub's status writer runs only on the leader (the hub
//! Service selects the leader, so agents connect there).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Namespace;
use kube::{Api, Client};
use prometheus::{IntCounter, Registry};
use tracing::{info, warn};

use crate::cli::ServerOptions;
use crate::crd::AgentGateway;
use crate::gateway::ValidatedGateway;
use crate::hub::{self, Bounded, Hub, TokenReviewAuthenticator};
use crate::pods::PodWatch;
use crate::shutdown::Shutdown;
use crate::tls::{self, CertConfig, CertFiles, follow_cert_dir};
use crate::watch;
use crate::webhook::inject::InjectorSettings;
use crate::webhook::{self, WebhookState, cluster};

/// What [`start`] left running.
pub struct Servers {
    pub hub: Option<Arc<Hub>>,
    pub webhook_addr: Option<SocketAddr>,
    pub hub_addr: Option<SocketAddr>,
    /// The CA that signed the webhook and hub certificates (PEM).
    pub ca_pem: String,
    /// Status patches written by the hub's status writer.
    pub status_writes: IntCounter,
    /// Whether the webhook's caches have had their first list (already synced without a
    /// webhook); `/readyz` waits for it.
    pub webhook_synced: cluster::CacheSync,
    /// The MutatingWebhookConfiguration, as owner of what the operator creates at runtime in
    /// its namespace (certificate Secret, Lease): uninstalling it cleans them up.
    pub owner: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>,
}

/// Starts certificates, webhook and hub; they stop when `shutdown` flips to true. `scope`
/// (`--namespace`) restricts the hub's status writer to that namespace; the hub follows pods
/// through `pods`.
pub async fn start(
    client: Client,
    opts: &ServerOptions,
    scope: Option<&str>,
    pods: &PodWatch,
    registry: &Registry,
    leader: prometheus::IntGauge,
    shutdown: Shutdown,
) -> anyhow::Result<Servers> {
    let native_supported = match opts.native_sidecars {
        Some(forced) => forced,
        None => cluster::detect_native_sidecars(&client).await,
    };
    let mut cert_cfg = CertConfig::new(&opts.operator_namespace, &opts.webhook_service);
    cert_cfg.cert_validity = opts.webhook_cert_validity;
    cert_cfg.check_interval = cert_cfg.check_interval.min(opts.webhook_cert_validity / 10);
    // An empty list flag (`--validating-webhook-configs=`) means none.
    let names = |list: &[String]| list.iter().filter(|n| !n.is_empty()).cloned().collect();
    cert_cfg.mutating_webhooks = names(&opts.mutating_webhook_configs);
    cert_cfg.validating_webhooks = names(&opts.validating_webhook_configs);
    let owner = webhook_owner(&client, &cert_cfg.mutating_webhooks).await;
    cert_cfg.owner = owner.clone();
    // The hub is reached through its own Service; the same certificate serves both.
    let hub_host = opts
        .hub_advertise
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(&opts.hub_advertise);
    for san in opts.extra_sans.iter().map(String::as_str).chain([hub_host]) {
        match san.parse::<IpAddr>() {
            Ok(ip) => cert_cfg.extra_ips.push(ip),
            Err(_) => cert_cfg.extra_dns.push(san.to_string()),
        }
    }
    let (resolver, ca_pem) = match &opts.webhook_cert_dir {
        // cert-manager (or any issuer) owns the certificate and caBundle; follow its Secret.
        Some(dir) => {
            let files = CertFiles::read(dir)?;
            let resolver = Arc::new(tls::CertResolver::from_pem(&files.cert, &files.key)?);
            tokio::spawn(follow_cert_dir(
                dir.clone(),
                files,
                resolver.clone(),
                shutdown.clone(),
            ));
            let ca = CertFiles::read(dir)?.ca;
            (resolver, ca)
        }
        None => {
            let (bundle, resolver) = tls::bootstrap(client.clone(), &cert_cfg)
                .await
                .context("setting up the webhook and hub certificates")?;
            let ca_pem = bundle.ca_cert_pem.clone();
            tokio::spawn(tls::run_rotation(
                client.clone(),
                cert_cfg,
                bundle,
                resolver.clone(),
                shutdown.clone().fired(),
            ));
            (resolver, ca_pem)
        }
    };
    let tls = tls::tls_config(resolver);

    let images = opts.sidecar_images()?;
    let mut webhook_addr = None;
    let mut webhook_synced = cluster::CacheSync::synced();
    if let Some(addr) = opts.webhook_addr {
        // The webhook serves until the process ends: its watches do too.
        let (namespaces, watch) = watch::store(
            Api::<Namespace>::all(client.clone()),
            Default::default(),
            "namespaces",
        );
        watch.detach();
        let (gateways, watch) = watch::store(
            Api::<AgentGateway>::all(client.clone()),
            Default::default(),
            "gateways",
        );
        watch.detach();
        // Per-gateway sidecar counts from the same store, read at scrape time.
        let _ = registry.register(Box::new(crate::metrics::GatewaySidecars::new(
            gateways.clone(),
        )));
        webhook_synced = cluster::CacheSync::follow(&namespaces, &gateways);
        let lookup = cluster::StoreLookup {
            namespaces,
            gateways,
            hub_advertise: opts.hub_advertise.clone(),
            native_supported,
            images: images.clone(),
        };
        let policy = images.clone();
        let validator = move |object: &serde_json::Value| -> Result<(), Vec<String>> {
            let gateway: AgentGateway = serde_json::from_value(object.clone())
                .map_err(|e| vec![format!("not an AgentGateway: {e}")])?;
            // The same check as the reconciler's and the injector's, image policy included.
            ValidatedGateway::checked(&gateway, &policy)
                .map(drop)
                .map_err(|errors| errors.iter().map(|e| e.to_string()).collect())
        };
        let state = WebhookState::new(
            Arc::new(lookup),
            Arc::new(validator),
            InjectorSettings::new(&opts.operator_namespace),
            registry,
        )?
        .with_observer(Arc::new(webhook::events::admission_events(client.clone())));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the webhook on {addr}"))?;
        let bound = listener.local_addr()?;
        info!(addr = %bound, "admission webhook listening");
        let stop = shutdown.clone().fired();
        let tls = tls.clone();
        let router = webhook::router(state).layer(axum::middleware::from_fn_with_state(
            webhook_synced.clone(),
            cluster::wait_for_caches,
        ));
        let limits = webhook::server::Limits {
            max_connections: opts.webhook_max_connections,
            ..Default::default()
        };
        tokio::spawn(async move {
            let served = webhook::server::serve_with(listener, router, tls, limits, stop).await;
            if let Err(error) = served {
                warn!(%error, "webhook server stopped");
            }
        });
        webhook_addr = Some(bound);
    }

    let status_writes = IntCounter::new(
        "nanogate_hub_status_writes_total",
        "AgentGateway status patches written by the hub",
    )
    .expect("valid metric");
    let _ = registry.register(Box::new(status_writes.clone()));
    let (mut hub_state, mut hub_addr) = (None, None);
    if let Some(addr) = opts.hub_addr {
        let hub = Hub::new(opts.hub_config(), registry);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the hub on {addr}"))?;
        let bound = listener.local_addr()?;
        info!(addr = %bound, "control-channel hub listening");
        let auth = Arc::new(Bounded::new(
            TokenReviewAuthenticator::new(client.clone()),
            opts.auth_limits(),
        ));
        tokio::spawn(hub::serve(
            listener,
            tokio_rustls::TlsAcceptor::from(tls),
            hub.clone(),
            auth,
            shutdown.clone(),
        ));
        tokio::spawn(hub::jobs::run(
            client.clone(),
            pods.clone(),
            hub.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(hub::status::run(
            client.clone(),
            scope.map(str::to_string),
            images.clone(),
            hub.clone(),
            opts.status_interval,
            status_writes.clone(),
            leader,
            shutdown.clone(),
        ));
        hub_state = Some(hub);
        hub_addr = Some(bound);
    }
    Ok(Servers {
        webhook_synced,
        owner,
        hub: hub_state,
        webhook_addr,
        hub_addr,
        ca_pem,
        status_writes,
    })
}

/// The first existing MutatingWebhookConfiguration of `names`, as an owner reference.
async fn webhook_owner(
    client: &Client,
    names: &[String],
) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference> {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    for name in names {
        if let Ok(Some(config)) = api.get_opt(name).await {
            return Some(
                k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                    api_version: "admissionregistration.k8s.io/v1".into(),
                    kind: "MutatingWebhookConfiguration".into(),
                    name: name.clone(),
                    uid: config.metadata.uid?,
                    ..Default::default()
                },
            );
        }
    }
    None
}

//! The operator's network servers beside the controller: certificates (self-made CA, rotation,
//! `caBundle`), the admission webhook and the control-channel hub with its status writer.
//! Every replica serves webhooks; the hub's status writer runs only on the leader (the hub
//! Service selects the leader, so agents connect there).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use prometheus::{IntCounter, Registry};
use tracing::{info, warn};

use crate::crd::{AgentGateway, LogLevel, NativeSidecar};
use crate::gateway::InjectionSettings;
use crate::gateway::refs::SidecarUse;
use crate::hub::{self, Hub, HubConfig, TokenReviewAuthenticator};
use crate::shutdown::Shutdown;
use crate::tls::{self, CertConfig, CertFiles, follow_cert_dir};
use crate::webhook::inject::{
    HubCaSource, InjectionConfig, InjectorSettings, KeyRef, NativeSidecarMode, SecretMount,
    SidecarResources, supports_native_sidecars,
};
use crate::webhook::{self, GatewayLookup, WebhookState};

use crate::names::HUB_CA_KEY;

/// Flags of the webhook, hub and certificates (`nanogate-operator run`).
#[derive(Clone, Debug, clap::Args)]
pub struct ServerOptions {
    /// Namespace the operator runs in: holds the certificate Secret; never injected.
    #[arg(
        long,
        env = "POD_NAMESPACE",
        default_value = "nanogate-system",
        id = "operator-namespace"
    )]
    pub operator_namespace: String,
    /// Admission webhook listen address (the chart sets 0.0.0.0:9443); off when not set.
    #[arg(long, env = "NANOGATE_WEBHOOK_ADDR")]
    pub webhook_addr: Option<SocketAddr>,
    /// Service in front of the webhook; its DNS names go into the serving certificate.
    #[arg(long, default_value = "nanogate-webhook")]
    pub webhook_service: String,
    /// MutatingWebhookConfigurations whose `caBundle` the operator keeps current.
    #[arg(long, value_delimiter = ',', default_value = "nanogate-injector")]
    pub mutating_webhook_configs: Vec<String>,
    /// ValidatingWebhookConfigurations whose `caBundle` the operator keeps current.
    #[arg(long, value_delimiter = ',', default_value = "nanogate-validator")]
    pub validating_webhook_configs: Vec<String>,
    /// Extra names for the serving certificate (DNS names or IPs, e.g. 127.0.0.1 when the
    /// webhook is registered by URL).
    #[arg(long, value_delimiter = ',')]
    pub extra_sans: Vec<String>,
    /// Control-channel hub listen address (the chart sets 0.0.0.0:7051); off when not set.
    #[arg(long, env = "NANOGATE_HUB_ADDR")]
    pub hub_addr: Option<SocketAddr>,
    /// `host:port` injected sidecars dial to reach the hub.
    #[arg(
        long,
        env = "NANOGATE_HUB_ADVERTISE",
        default_value = "nanogate-hub.nanogate-system.svc:7051"
    )]
    pub hub_advertise: String,
    /// How often the hub writes fleet health into gateway statuses.
    #[arg(long, default_value = "5s", value_parser = parse_duration_flag)]
    pub status_interval: Duration,
    /// Lifetime of the serving certificate the operator issues itself; it is renewed two
    /// thirds of the way through (counted from its 5-minute backdated start). Default 90 days.
    #[arg(long, default_value = "2160h", value_parser = parse_duration_flag)]
    pub webhook_cert_validity: Duration,
    /// Serve the certificate in this directory (`tls.crt`, `tls.key`, `ca.crt`: a cert-manager
    /// Secret) instead of making one; it is re-read every minute. The issuer keeps `caBundle`.
    #[arg(long)]
    pub webhook_cert_dir: Option<std::path::PathBuf>,
    /// Whether the cluster runs native sidecars (default: detected from the server version,
    /// ≥ 1.29).
    #[arg(long)]
    pub native_sidecars: Option<bool>,
}

impl Default for ServerOptions {
    /// Everything off; the same defaults as the flags otherwise.
    fn default() -> Self {
        Self {
            operator_namespace: "nanogate-system".into(),
            webhook_addr: None,
            webhook_service: "nanogate-webhook".into(),
            mutating_webhook_configs: vec!["nanogate-injector".into()],
            validating_webhook_configs: vec!["nanogate-validator".into()],
            extra_sans: Vec::new(),
            hub_addr: None,
            hub_advertise: "nanogate-hub.nanogate-system.svc:7051".into(),
            status_interval: Duration::from_secs(5),
            native_sidecars: None,
            webhook_cert_dir: None,
            webhook_cert_validity: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

impl ServerOptions {
    /// Whether the webhook or the hub (and so the certificates) are wanted.
    pub fn enabled(&self) -> bool {
        self.webhook_addr.is_some() || self.hub_addr.is_some()
    }
}

fn parse_duration_flag(s: &str) -> Result<Duration, String> {
    crate::crd::parse_duration(s)
}

/// `InjectionSettings` (from the gateway) + cluster facts → what `inject()` needs.
pub fn injection_config(
    settings: &InjectionSettings,
    hub_advertise: &str,
    native_supported: bool,
) -> InjectionConfig {
    let resources = SidecarResources::from_requirements(&settings.resources);
    // The gateway's Secrets the sidecar reads as files (the others come as environment).
    let secret_mounts = settings
        .secret_refs
        .iter()
        .filter_map(|r| match r.sidecar {
            SidecarUse::Mount { volume, dir } => Some(SecretMount {
                volume_name: volume.into(),
                secret_name: r.name.clone(),
                mount_path: dir.into(),
                items: Vec::new(),
            }),
            SidecarUse::Env(_) => None,
        })
        .collect();
    let mut cfg = InjectionConfig::with_defaults(
        &settings.gateway,
        &settings.image,
        KeyRef {
            name: settings.api_key_secret.name.clone(),
            key: settings.api_key_secret.key.clone(),
        },
    );
    cfg.config_generation = settings.generation.unwrap_or(1);
    cfg.config_hash = Some(settings.config_hash.clone());
    cfg.config_map_name = settings.config_map_name.clone();
    cfg.config_key = settings.config_key.to_string();
    cfg.resources = resources;
    cfg.log_level = match settings.log_level {
        LogLevel::Error => "error",
        LogLevel::Warn => "warn",
        LogLevel::Info => "info",
        LogLevel::Debug => "debug",
        LogLevel::Trace => "trace",
    }
    .into();
    cfg.native_sidecar = match settings.native_sidecar {
        NativeSidecar::Auto => NativeSidecarMode::Auto,
        NativeSidecar::Always => NativeSidecarMode::Always,
        NativeSidecar::Never => NativeSidecarMode::Never,
    };
    cfg.cluster_supports_native_sidecars = native_supported;
    cfg.socket_path = settings.socket_path.clone();
    cfg.hub_addr = hub_advertise.to_string();
    cfg.hub_ca = Some(HubCaSource::ConfigMap(KeyRef {
        name: settings.config_map_name.clone(),
        key: HUB_CA_KEY.into(),
    }));
    cfg.secret_mounts = secret_mounts;
    if let Some(tcp) = &settings.tcp_listener {
        cfg.tcp_port = u16::try_from(tcp.port).ok();
        cfg.tcp_token_secret = Some(KeyRef {
            name: tcp.token_secret_ref.name.clone(),
            key: tcp.token_secret_ref.key.clone(),
        });
    }
    cfg
}

/// `/mutate`'s view of the cluster, from reflector stores (no API call on the admission path).
struct StoreLookup {
    namespaces: Store<Namespace>,
    gateways: Store<AgentGateway>,
    hub_advertise: String,
    native_supported: bool,
}

impl GatewayLookup for StoreLookup {
    fn namespace_labels(&self, namespace: &str) -> Option<BTreeMap<String, String>> {
        self.namespaces
            .get(&reflector::ObjectRef::new(namespace))
            .map(|ns| ns.labels().clone())
    }

    fn gateways(&self, namespace: &str) -> Vec<InjectionConfig> {
        self.gateways
            .state()
            .iter()
            .filter(|gw| gw.namespace().as_deref() == Some(namespace))
            // An invalid gateway injects nothing; its status says why.
            .filter_map(|gw| gw.injection_settings().ok())
            .map(|settings| injection_config(&settings, &self.hub_advertise, self.native_supported))
            .collect()
    }
}

/// Cluster ≥ 1.29 runs native sidecars (init containers with `restartPolicy: Always`).
pub async fn detect_native_sidecars(client: &Client) -> bool {
    match client.apiserver_version().await {
        Ok(info) => supports_native_sidecars(&info),
        Err(error) => {
            warn!(%error, "server version unknown; assuming no native sidecars");
            false
        }
    }
}

/// What [`start`] left running.
pub struct Servers {
    pub hub: Option<Arc<Hub>>,
    pub webhook_addr: Option<SocketAddr>,
    pub hub_addr: Option<SocketAddr>,
    /// The CA that signed the webhook and hub certificates (PEM).
    pub ca_pem: String,
    /// Status patches written by the hub's status writer.
    pub status_writes: IntCounter,
    /// The MutatingWebhookConfiguration, as owner of what the operator creates at runtime in
    /// its namespace (certificate Secret, Lease): uninstalling it cleans them up.
    pub owner: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>,
}

/// Starts certificates, webhook and hub; they stop when `shutdown` flips to true.
pub async fn start(
    client: Client,
    opts: &ServerOptions,
    registry: &Registry,
    leader: prometheus::IntGauge,
    shutdown: Shutdown,
) -> anyhow::Result<Servers> {
    let native_supported = match opts.native_sidecars {
        Some(forced) => forced,
        None => detect_native_sidecars(&client).await,
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

    let mut webhook_addr = None;
    if let Some(addr) = opts.webhook_addr {
        let namespaces = watch_store(Api::<Namespace>::all(client.clone()));
        let gateways = watch_store(Api::<AgentGateway>::all(client.clone()));
        let lookup = StoreLookup {
            namespaces,
            gateways,
            hub_advertise: opts.hub_advertise.clone(),
            native_supported,
        };
        let validator = |object: &serde_json::Value| -> Result<(), Vec<String>> {
            let gateway: AgentGateway = serde_json::from_value(object.clone())
                .map_err(|e| vec![format!("not an AgentGateway: {e}")])?;
            crate::crd::validate(&gateway.spec)
                .map_err(|errors| errors.iter().map(|e| e.to_string()).collect())
        };
        let state = WebhookState::new(
            Arc::new(lookup),
            Arc::new(validator),
            InjectorSettings::new(&opts.operator_namespace),
            registry,
        )?
        .with_observer(Arc::new(admission_events(client.clone())));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the webhook on {addr}"))?;
        let bound = listener.local_addr()?;
        info!(addr = %bound, "admission webhook listening");
        let stop = shutdown.clone().fired();
        let tls = tls.clone();
        tokio::spawn(async move {
            let served = webhook::serve(listener, webhook::router(state), tls, stop).await;
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
        let hub = Hub::new(HubConfig::default(), registry);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the hub on {addr}"))?;
        let bound = listener.local_addr()?;
        info!(addr = %bound, "control-channel hub listening");
        let auth = Arc::new(TokenReviewAuthenticator::new(client.clone()));
        tokio::spawn(hub::serve(
            listener,
            tokio_rustls::TlsAcceptor::from(tls),
            hub.clone(),
            auth,
            shutdown.clone(),
        ));
        tokio::spawn(hub::jobs::run(
            client.clone(),
            hub.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(hub::status::run(
            client.clone(),
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

/// `Injected` and `InjectionSkipped` (for skips worth a user's attention) events on the pod's
/// owner — the ReplicaSet or Job the user can find — or on the pod itself. Best effort, off the
/// admission path; dry runs record nothing.
fn admission_events(client: Client) -> impl Fn(&webhook::InjectionOutcome) + Send + Sync + 'static {
    use k8s_openapi::api::core::v1::ObjectReference;
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let reporter = Reporter {
        controller: "nanogate-webhook".into(),
        instance: None,
    };
    let recorder = Recorder::new(client, reporter);
    move |outcome: &webhook::InjectionOutcome| {
        if outcome.dry_run {
            return;
        }
        let (type_, reason, note) = match &outcome.result {
            Ok(done) => (
                EventType::Normal,
                "Injected",
                format!(
                    "nano-agent injected for gateway {} (configuration generation {}, {} sidecar)",
                    done.gateway,
                    done.config_generation,
                    if done.native { "native" } else { "legacy" }
                ),
            ),
            Err(skip) if skip.is_notable() => {
                (EventType::Warning, "InjectionSkipped", skip.to_string())
            }
            Err(_) => return,
        };
        let reference = match &outcome.owner {
            Some(owner) => ObjectReference {
                api_version: Some(owner.api_version.clone()),
                kind: Some(owner.kind.clone()),
                name: Some(owner.name.clone()),
                namespace: Some(outcome.namespace.clone()),
                uid: Some(owner.uid.clone()),
                ..Default::default()
            },
            None => ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(outcome.pod_name.clone()),
                namespace: Some(outcome.namespace.clone()),
                ..Default::default()
            },
        };
        let recorder = recorder.clone();
        tokio::spawn(async move {
            let event = Event {
                type_,
                reason: reason.into(),
                note: Some(note),
                action: "Admit".into(),
                secondary: None,
            };
            if let Err(error) = recorder.publish(&event, &reference).await {
                warn!(%error, reason, "publishing admission event failed");
            }
        });
    }
}

/// A reflector store fed by a watch that restarts on errors (with the watcher's backoff).
fn watch_store<K>(api: Api<K>) -> Store<K>
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Err(error) = event {
                warn!(%error, "watch error; retrying");
            }
        }
    });
    reader
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_settings_become_an_injection_config_with_the_hub_ca() {
        let gw: AgentGateway = serde_yaml::from_str(
            "apiVersion: nanogate.io/v1alpha1\nkind: AgentGateway\nmetadata: {name: shop, namespace: apps, generation: 3}\nspec:\n  upstream: {kind: http, url: 'https://platform.example/api', apiKeySecretRef: {name: key}}\n",
        )
        .unwrap();
        let settings = gw.injection_settings().unwrap();
        let cfg = injection_config(&settings, "127.0.0.1:7051", false);
        assert_eq!(cfg.config_generation, 3);
        assert_eq!(cfg.hub_addr, "127.0.0.1:7051");
        assert_eq!(
            cfg.hub_ca,
            Some(HubCaSource::ConfigMap(KeyRef {
                name: "shop-agent-config".into(),
                key: HUB_CA_KEY.into()
            }))
        );
        assert!(!cfg.cluster_supports_native_sidecars);
    }

    #[test]
    fn tcp_listener_gets_its_port_token_and_tls_where_the_config_points() {
        use crate::webhook::inject::{Decision, InjectorSettings, inject};
        let gw: AgentGateway = serde_yaml::from_str(
            "apiVersion: nanogate.io/v1alpha1\nkind: AgentGateway\nmetadata: {name: shop, namespace: apps}\nspec:\n  upstream: {kind: http, url: 'https://platform.example/api', apiKeySecretRef: {name: key}}\n  tcpListener: {port: 7443, tokenSecretRef: {name: tcp-auth, key: token}, tlsSecretRef: {name: tcp-tls}}\n",
        )
        .unwrap();
        let cfg = injection_config(&gw.injection_settings().unwrap(), "127.0.0.1:7051", false);
        let file = crate::controller::build::sidecar_config(&gw.spec)
            .unwrap()
            .tcp
            .expect("tcp section in the sidecar file");
        assert_eq!(file.listen, "0.0.0.0:7443");
        assert_eq!(
            (file.keepalive_interval_ms, file.keepalive_timeout_ms),
            (10_000, 30_000)
        );
        let mount = cfg
            .secret_mounts
            .iter()
            .find(|m| m.secret_name == "tcp-tls")
            .expect("TLS Secret mounted");
        assert_eq!(file.tls_cert_file, format!("{}/tls.crt", mount.mount_path));

        // The injected container: the port declared, the token from the Secret, the mount.
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "annotations": {"nanogate.io/inject": "true"}},
            "spec": {"containers": [{"name": "app", "image": "app"}]}
        }))
        .unwrap();
        let Decision::Inject(injection) = inject(
            &pod,
            "apps",
            &BTreeMap::new(),
            std::slice::from_ref(&cfg),
            &InjectorSettings::new("nanogate-system"),
        ) else {
            panic!("not injected");
        };
        let mut doc = serde_json::to_value(&pod).unwrap();
        json_patch::patch(&mut doc, &injection.patch).unwrap();
        let sidecar = doc["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "nano-agent")
            .unwrap()
            .clone();
        let token = sidecar["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "NANOGATE_TCP_TOKEN")
            .expect("token env");
        assert_eq!(
            token["valueFrom"]["secretKeyRef"],
            serde_json::json!({"name": "tcp-auth", "key": "token"})
        );
        assert!(
            sidecar["ports"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "nanogate-tcp" && p["containerPort"] == 7443)
        );
        assert!(
            sidecar["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["mountPath"] == crate::names::TCP_TLS_DIR)
        );
    }

    #[test]
    fn tcp_keepalive_timeout_must_exceed_the_interval() {
        let gw: AgentGateway = serde_yaml::from_str(
            "apiVersion: nanogate.io/v1alpha1\nkind: AgentGateway\nmetadata: {name: shop, namespace: apps}\nspec:\n  upstream: {kind: http, url: 'https://platform.example/api', apiKeySecretRef: {name: key}}\n  tcpListener: {keepaliveInterval: 30s, keepaliveTimeout: 10s, tokenSecretRef: {name: a}, tlsSecretRef: {name: b}}\n",
        )
        .unwrap();
        let errors = crate::crd::validate(&gw.spec).unwrap_err();
        assert!(
            errors
                .iter()
                .any(|e| e.field == "spec.tcpListener.keepaliveTimeout"),
            "{errors:?}"
        );
    }

    #[test]
    fn nats_credentials_secret_is_mounted_where_the_config_points() {
        let gw: AgentGateway = serde_yaml::from_str(
            "apiVersion: nanogate.io/v1alpha1\nkind: AgentGateway\nmetadata: {name: shop, namespace: apps}\nspec:\n  upstream: {kind: nats, url: 'tls://nats:4222', apiKeySecretRef: {name: key}, nats: {credentialsSecretRef: {name: nats-user, key: user.creds}}}\n",
        )
        .unwrap();
        let cfg = injection_config(&gw.injection_settings().unwrap(), "127.0.0.1:7051", false);
        let mount = cfg
            .secret_mounts
            .iter()
            .find(|m| m.secret_name == "nats-user")
            .expect("credentials Secret mounted");
        let file = crate::controller::build::sidecar_config(&gw.spec)
            .unwrap()
            .upstream
            .nats_creds_file
            .unwrap();
        assert_eq!(file, format!("{}/user.creds", mount.mount_path));
    }
}

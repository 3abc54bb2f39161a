//! `/mutate`'s view of the cluster: namespaces and gateways from reflector stores (no API
//! call on the admission path), each valid gateway turned into the [`InjectionConfig`] the
//! pure injector takes.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::reflector::{self, Store};
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use tracing::{info, warn};

use super::GatewayLookup;
use super::inject::{
    HubCaSource, InjectionConfig, KeyRef, KeyToPath, NativeSidecarMode, SecretMount,
    SidecarResources, supports_native_sidecars,
};
use crate::crd::{AgentGateway, NativeSidecar};
use crate::gateway::refs::SidecarUse;
use crate::gateway::{InjectionSettings, SidecarImages};
use crate::names::HUB_CA_KEY;

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
            SidecarUse::MountKey { volume, dir, file } => Some(SecretMount {
                volume_name: volume.into(),
                secret_name: r.name.clone(),
                mount_path: dir.into(),
                items: r
                    .keys
                    .iter()
                    .map(|key| KeyToPath {
                        key: key.clone(),
                        path: file.into(),
                    })
                    .collect(),
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
    cfg.pod_hash = Some(settings.pod_hash());
    cfg.config_map_name = settings.config_map_name.clone();
    cfg.config_key = settings.config_key.to_string();
    cfg.resources = resources;
    cfg.log_level = settings.log_level.as_str().into();
    cfg.admin_port = settings.admin_port;
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
pub struct StoreLookup {
    pub namespaces: Store<Namespace>,
    pub gateways: Store<AgentGateway>,
    pub hub_advertise: String,
    pub native_supported: bool,
    /// The operator's sidecar image policy: a gateway asking for another image injects nothing.
    pub images: SidecarImages,
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
            .filter_map(|gw| gw.injection_settings(&self.images).ok())
            .map(|settings| injection_config(&settings, &self.hub_advertise, self.native_supported))
            .collect()
    }

    fn invalid_gateways(&self, namespace: &str) -> Vec<(String, String)> {
        self.gateways
            .state()
            .iter()
            .filter(|gw| gw.namespace().as_deref() == Some(namespace))
            .filter_map(|gw| {
                let errors = gw.injection_settings(&self.images).err()?;
                Some((gw.name_any(), crate::crd::join_errors(&errors)))
            })
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

/// Whether the webhook's stores (namespaces and gateways) have had their first list: before
/// that, `/mutate` would see no gateway and admit opted-in pods without a sidecar.
#[derive(Clone)]
pub struct CacheSync(watch::Receiver<bool>);

/// How long `/mutate` waits for the first list before it answers 503; under the chart's 5 s
/// webhook timeout, so the API server hears the 503 and applies the failurePolicy.
pub const SYNC_WAIT: Duration = Duration::from_secs(3);

impl CacheSync {
    /// Follows the first list of both stores.
    pub fn follow(namespaces: &Store<Namespace>, gateways: &Store<AgentGateway>) -> Self {
        let (synced, rx) = watch::channel(false);
        let (namespaces, gateways) = (namespaces.clone(), gateways.clone());
        tokio::spawn(async move {
            // Err: the store's writer is gone (the watch task ended); never synced then.
            if namespaces.wait_until_ready().await.is_ok()
                && gateways.wait_until_ready().await.is_ok()
            {
                info!("webhook caches synced");
                let _ = synced.send(true);
            }
        });
        Self(rx)
    }

    /// Already synced (for tests and servers without a watch: `CacheSync::synced()`).
    pub fn synced() -> Self {
        Self(watch::channel(true).1)
    }

    pub fn is_synced(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once both stores have had their first list (never, if their watch ended).
    pub async fn ready(&self) {
        let mut rx = self.0.clone();
        if rx.wait_for(|s| *s).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Waits up to `limit` for the first list; whether it came.
    pub async fn wait(&self, limit: Duration) -> bool {
        tokio::time::timeout(limit, self.ready()).await.is_ok()
    }
}

/// Middleware in front of the webhook router: `/mutate` waits up to [`SYNC_WAIT`] for the
/// caches, then answers 503 (the API server applies the webhook's failurePolicy: `Fail`
/// refuses the pod, `Ignore` admits it without a sidecar and the reconciler reports it). A
/// wrong "no gateway here" answer is never given.
pub async fn wait_for_caches(State(sync): State<CacheSync>, req: Request, next: Next) -> Response {
    if req.uri().path() == "/mutate" && !sync.is_synced() && !sync.wait(SYNC_WAIT).await {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the webhook has not listed namespaces and gateways yet; retry",
        )
            .into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves `sync` in front of a `/mutate` that answers; POST /mutate gives its status line.
    async fn guarded(sync: CacheSync) -> std::net::SocketAddr {
        let router = axum::Router::new()
            .route("/mutate", axum::routing::post(|| async { "answered" }))
            .layer(axum::middleware::from_fn_with_state(sync, wait_for_caches));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        addr
    }

    async fn mutate_status(addr: std::net::SocketAddr) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            b"POST /mutate HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out.lines().next().unwrap_or_default().to_string()
    }

    #[tokio::test]
    async fn mutate_waits_for_the_first_list_then_fails_with_503() {
        let (synced, rx) = watch::channel(false);
        let addr = guarded(CacheSync(rx)).await;
        // Never synced: 503 after the wait, never a "no gateway here" answer.
        let started = std::time::Instant::now();
        assert_eq!(
            mutate_status(addr).await,
            "HTTP/1.1 503 Service Unavailable"
        );
        assert!(started.elapsed() >= SYNC_WAIT);
        // Synced while a request waits: it is answered.
        let waiting = tokio::spawn(mutate_status(addr));
        tokio::time::sleep(Duration::from_millis(300)).await;
        synced.send(true).unwrap();
        assert_eq!(waiting.await.unwrap(), "HTTP/1.1 200 OK");
        let addr = guarded(CacheSync::synced()).await;
        assert_eq!(mutate_status(addr).await, "HTTP/1.1 200 OK");
    }

    const HTTP_UPSTREAM: &str = "  upstream: {kind: http, url: 'https://platform.example/api', apiKeySecretRef: {name: key}}\n";

    /// The gateway `shop` in `apps` with `spec` (the YAML lines under `spec:`).
    fn gateway(spec: &str) -> AgentGateway {
        let head = "apiVersion: nanogate.io/v1alpha1\nkind: AgentGateway\nmetadata: {name: shop, namespace: apps}\nspec:\n";
        serde_yaml::from_str(&format!("{head}{spec}")).unwrap()
    }

    /// What the injector gets for `gw`, with the hub at 127.0.0.1:7051 and no native sidecars.
    fn config_of(gw: &AgentGateway) -> InjectionConfig {
        let settings = gw.injection_settings(&SidecarImages::default()).unwrap();
        injection_config(&settings, "127.0.0.1:7051", false)
    }

    #[test]
    fn gateway_settings_become_an_injection_config_with_the_hub_ca() {
        let gw: AgentGateway = serde_yaml::from_str(
            "apiVersion: nanogate.io/v1alpha1\nkind: AgentGateway\nmetadata: {name: shop, namespace: apps, generation: 3}\nspec:\n  upstream: {kind: http, url: 'https://platform.example/api', apiKeySecretRef: {name: key}}\n",
        )
        .unwrap();
        let cfg = config_of(&gw);
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
        assert_eq!((cfg.admin_port, cfg.log_level.as_str()), (9091, "info"));
    }

    /// `spec.sidecar.adminPort` and `logLevel` reach the injector.
    #[test]
    fn the_gateway_chooses_the_admin_port_and_log_level() {
        let gw = gateway(
            &[
                HTTP_UPSTREAM,
                "  sidecar: {adminPort: 9191, logLevel: debug}\n",
            ]
            .concat(),
        );
        let cfg = config_of(&gw);
        assert_eq!((cfg.admin_port, cfg.log_level.as_str()), (9191, "debug"));
    }

    #[test]
    fn tcp_listener_gets_its_port_token_and_tls_where_the_config_points() {
        use crate::webhook::inject::{Decision, InjectorSettings, inject};
        let gw = gateway(&[HTTP_UPSTREAM, "  tcpListener: {port: 7443, tokenSecretRef: {name: tcp-auth, key: token}, tlsSecretRef: {name: tcp-tls}}\n"].concat());
        let cfg = config_of(&gw);
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
        let gw = gateway(&[HTTP_UPSTREAM, "  tcpListener: {keepaliveInterval: 30s, keepaliveTimeout: 10s, tokenSecretRef: {name: a}, tlsSecretRef: {name: b}}\n"].concat());
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
        let gw = gateway(
            "  upstream: {kind: nats, url: 'tls://nats:4222', apiKeySecretRef: {name: key}, nats: {credentialsSecretRef: {name: nats-user, key: user.creds}}}\n",
        );
        let cfg = config_of(&gw);
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

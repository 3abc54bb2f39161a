//! The injection decision and the pod mutation, as one pure function.
//!
//! [`inject`] reads a pod, its namespace's labels and the gateways of that namespace, and
//! answers either [`Decision::Inject`] with a JSON patch (RFC 6902) for the admission
//! response, or [`Decision::Skip`] with a named reason. Nothing here talks to the API server,
//! so every rule is covered by the golden files in `operator/tests/golden/`.
//!
//! The patch only *adds* things (array inserts, new keys) and never rewrites the user's
//! containers wholesale: fields this crate's `k8s-openapi` does not know about survive.
//!
//! # Contract with the injected `nano-agent`
//!
//! - Environment: `TENDRL_KEY` (API key, from the gateway's Secret; only in the sidecar),
//!   `TENDRL_KEY_FILE` (the same key as a file of the read-only Secret volume
//!   `nanogate-api-key` at `/etc/nanogate/api-key`, refreshed by the kubelet: re-read it, it
//!   wins over `TENDRL_KEY`, so a rotated Secret is used without a restart),
//!   `NANOGATE_POD_NAME` / `NANOGATE_POD_NAMESPACE` / `NANOGATE_POD_UID` (downward API),
//!   `NANOGATE_GATEWAY`, `NANOGATE_CONFIG_FILE`, `NANOGATE_HUB_ADDR`,
//!   `NANOGATE_HUB_TOKEN_FILE` (projected token, audience `nanogate-hub`, 1 h, refreshed by
//!   the kubelet: re-read it on every hub connection), `NANOGATE_HUB_CA_FILE` (when a hub CA
//!   is configured), `TENDRL_SOCKET_PATH`, `NANOGATE_SPOOL_DIR` (on the shared `emptyDir`),
//!   `NANOGATE_ADMIN_PORT` (listen on `0.0.0.0:<port>`; the probes and the `nanogate-admin`
//!   container port use the same number), `NANOGATE_LOG_LEVEL` (both the gateway's, or the
//!   pod's `nanogate.io/sidecar-admin-port` / `nanogate.io/sidecar-log-level` annotations when
//!   valid); with a TCP listener in the gateway,
//!   `NANOGATE_TCP_TOKEN` (from its Secret) and the TLS Secret at `/etc/nanogate/tcp-tls`.
//! - The socket must accept every app container, whatever its uid and gid: the agent creates it
//!   with mode 0666 on the pod's own `emptyDir` (the boundary), so the injector adds no
//!   `fsGroup` or `supplementalGroups` and leaves the pod's `securityContext` alone.
//! - `/readyz` on the admin port must mean "the app socket accepts connections" (not "the
//!   upstream is reachable"): in native mode it is also the startup probe that holds the app
//!   containers, so an upstream outage must not keep pods from starting.
//! - Legacy mode (no native sidecars): the sidecar is the first regular container and its
//!   `postStart` hook runs `nano-agent wait-ready --timeout 120s`, which must exit 0 once the
//!   socket accepts connections (non-zero after the timeout). The kubelet starts the next
//!   container only after the hook returns, so apps find the socket ready. Init containers
//!   run before any regular container, so in legacy mode they get the env and mount but no
//!   agent to talk to.
//! - Shutdown: the kubelet kills the agent when the pod's `terminationGracePeriodSeconds` (30 s
//!   by default) has passed since SIGTERM, and the agent must have reported what it leaves
//!   behind by then (the `left_behind` request, `hub/left_behind.rs`). Its default `--shutdown-deadline` (20 s) fits a
//!   grace period of [`AGENT_SHUTDOWN_DEADLINE_SECONDS`] + [`SHUTDOWN_REPORT_SECONDS`] or more;
//!   for a shorter one the injector sets `NANOGATE_SHUTDOWN_DEADLINE` to the grace period minus
//!   [`SHUTDOWN_REPORT_SECONDS`] (at least 0 s: report at once). Seen on a real node: a pod with
//!   a 10 s grace period lost its agent to SIGKILL with nothing reported
//!   (`e2e/tests/real_pods.rs`).
//! - Legacy mode in a run-to-completion pod (owned by a Job, or `restartPolicy` `Never` /
//!   `OnFailure`): `NANOGATE_EXIT_WHEN_APPS_DONE=true` and `NANOGATE_APP_CONTAINERS=a,b,…`.
//!   The agent must then flush and exit 0 once every listed container has terminated, so the
//!   Job completes. It learns that from the hub (the operator watches pods and can send
//!   `drain`) or from its own pod's status; either way it must not keep the pod alive. Native
//!   sidecars need none of this: the kubelet stops them after the app containers.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod};
use serde_json::{Value, json};

use crate::crd::parse_quantity;
use crate::gateway::membership::{self, InjectedRecord, NoGateway};
use crate::names::{
    ADMIN_PORT_ANNOTATION, ADMIN_PORT_ENV, ADMIN_PORT_NAME, API_KEY_ENV, API_KEY_FILE,
    API_KEY_FILE_ENV, API_KEY_VOLUME, APP_CONTAINERS_ENV, CONFIG_DIR, CONFIG_FILE_ENV, CONFIG_KEY,
    CONFIG_VOLUME, CPU_LIMIT_ANNOTATION, CPU_REQUEST_ANNOTATION, DEFAULT_SOCKET_PATH,
    EXIT_WHEN_APPS_DONE_ENV, GATEWAY_ANNOTATION, GATEWAY_ENV, HUB_ADDR_ENV, HUB_CA_DIR,
    HUB_CA_FILE, HUB_CA_FILE_ENV, HUB_CA_VOLUME, HUB_TOKEN_AUDIENCE, HUB_TOKEN_EXPIRATION_SECONDS,
    HUB_TOKEN_FILE_ENV, INJECT_ANNOTATION, INJECTED_ANNOTATION, INJECTED_GATEWAY_LABEL,
    INJECTION_SKIPPED_ANNOTATION, LOG_LEVEL_ANNOTATION, LOG_LEVEL_ENV, MEMORY_LIMIT_ANNOTATION,
    MEMORY_REQUEST_ANNOTATION, NAMESPACE_INJECTION_LABEL, POD_NAME_ENV, POD_NAMESPACE_ENV,
    POD_UID_ENV, SHUTDOWN_DEADLINE_ENV, SIDECAR_ADMIN_PORT, SIDECAR_NAME, SOCKET_PATH_ENV,
    SOCKET_VOLUME, SPOOL_DIR_ENV, TCP_PORT_NAME, TCP_TOKEN_ENV, TOKEN_DIR, TOKEN_FILE,
    TOKEN_VOLUME, config_map_name,
};

/// The agent's default shutdown deadline, in seconds.
pub const AGENT_SHUTDOWN_DEADLINE_SECONDS: i64 = 20;
/// What the agent needs after its deadline, within the pod's grace period: the `left_behind`
/// request (up to 2 s for the hub's answer), its `Bye` and the hub's close (up to 1.5 s), the
/// final spool fsync and the exit.
pub const SHUTDOWN_REPORT_SECONDS: i64 = 5;
/// Kubernetes' default `terminationGracePeriodSeconds`.
const DEFAULT_GRACE_SECONDS: i64 = 30;

/// The non-root UID/GID the sidecar runs as (the distroless `nonroot` user).
pub const SIDECAR_UID: i64 = 65532;

/// When the sidecar is a native sidecar (an init container with `restartPolicy: Always`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum NativeSidecarMode {
    /// Native when the cluster supports it (Kubernetes ≥ 1.29).
    #[default]
    Auto,
    /// Always native (the apiserver rejects the pod if it cannot run native sidecars).
    Always,
    /// Never native: a regular container placed first, with a start-up hook.
    Never,
}

/// A reference to one key of a Secret or ConfigMap in the pod's namespace.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyRef {
    pub name: String,
    pub key: String,
}

/// Where the hub's CA certificate comes from (mounted at [`HUB_CA_DIR`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum HubCaSource {
    ConfigMap(KeyRef),
    Secret(KeyRef),
}

/// A Secret mounted read-only into the sidecar only (e.g. the upstream CA or client
/// certificate). `items` (key → file name) limits and renames the keys; empty mounts all.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretMount {
    /// Volume name; must be unique in the pod (prefix it with `nanogate-`).
    pub volume_name: String,
    pub secret_name: String,
    pub mount_path: String,
    #[serde(default)]
    pub items: Vec<KeyToPath>,
}

/// One Secret key projected as a file name.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyToPath {
    pub key: String,
    pub path: String,
}

/// Sidecar resources as Kubernetes quantities; `None` leaves the field unset.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SidecarResources {
    pub cpu_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_request: Option<String>,
    pub memory_limit: Option<String>,
}

impl SidecarResources {
    /// Defaults from the AgentGateway issue: 10m / 16Mi requests, 64Mi memory limit.
    pub fn defaults() -> Self {
        Self {
            cpu_request: Some("10m".into()),
            cpu_limit: None,
            memory_request: Some("16Mi".into()),
            memory_limit: Some("64Mi".into()),
        }
    }

    /// From a `ResourceRequirements` (the gateway's `spec.sidecar.resources`).
    pub fn from_requirements(r: &k8s_openapi::api::core::v1::ResourceRequirements) -> Self {
        let get =
            |m: &Option<
                BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
            >,
             k: &str| m.as_ref().and_then(|m| m.get(k)).map(|q| q.0.clone());
        Self {
            cpu_request: get(&r.requests, "cpu"),
            cpu_limit: get(&r.limits, "cpu"),
            memory_request: get(&r.requests, "memory"),
            memory_limit: get(&r.limits, "memory"),
        }
    }
}

/// Whether the API server runs native sidecars (Kubernetes ≥ 1.29, where the
/// `SidecarContainers` feature is on by default), from `Client::apiserver_version()`.
/// `minor` may carry a suffix such as `"29+"`.
pub fn supports_native_sidecars(version: &k8s_openapi::apimachinery::pkg::version::Info) -> bool {
    let num = |s: &str| {
        s.trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse::<u32>()
            .ok()
    };
    match (num(&version.major), num(&version.minor)) {
        (Some(major), Some(minor)) => major > 1 || (major == 1 && minor >= 29),
        _ => false,
    }
}

/// Everything needed to inject the sidecar of one gateway. The reconciler maps an
/// `AgentGateway` (and the operator's own settings) into one of these.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InjectionConfig {
    /// Name of the `AgentGateway` (same namespace as the pod).
    pub gateway_name: String,
    /// `metadata.generation` of the gateway whose configuration is injected; recorded in the
    /// `nanogate.io/injected` annotation.
    pub config_generation: i64,
    /// Content hash of the derived sidecar configuration, recorded in the annotation too.
    pub config_hash: Option<String>,
    /// Hash of the gateway's pod settings (`InjectionSettings::pod_hash`), recorded in the
    /// annotation so the reconciler can tell sidecars injected before they changed.
    #[serde(default)]
    pub pod_hash: Option<String>,
    /// ConfigMap (owned by the gateway, in the pod's namespace) holding the sidecar config.
    pub config_map_name: String,
    /// Key of that ConfigMap holding the config file.
    pub config_key: String,
    /// Where the ConfigMap is mounted; the sidecar reads `<config_dir>/<config_key>`.
    pub config_dir: String,
    pub image: String,
    /// `Always` | `IfNotPresent` | `Never`; `None` lets Kubernetes choose.
    pub image_pull_policy: Option<String>,
    pub resources: SidecarResources,
    pub log_level: String,
    pub native_sidecar: NativeSidecarMode,
    /// Whether the cluster runs native sidecars (server version ≥ 1.29); decides `Auto`.
    pub cluster_supports_native_sidecars: bool,
    /// Full path of the app socket; its directory becomes the shared `emptyDir` mount.
    pub socket_path: String,
    /// Port of the sidecar's `/metrics`, `/healthz`, `/readyz`.
    pub admin_port: u16,
    /// `host:port` of the operator's control-channel hub.
    pub hub_addr: String,
    pub hub_ca: Option<HubCaSource>,
    /// Secret key holding the upstream API key (exposed as `TENDRL_KEY` to the sidecar only).
    pub api_key_secret: KeyRef,
    /// Further Secrets for the sidecar (upstream CA, client certificate).
    #[serde(default)]
    pub secret_mounts: Vec<SecretMount>,
    /// Port of the optional TCP listener (declared on the container as `nanogate-tcp`).
    #[serde(default)]
    pub tcp_port: Option<u16>,
    /// Secret key with the TCP listener's token (`NANOGATE_TCP_TOKEN`, sidecar only).
    #[serde(default)]
    pub tcp_token_secret: Option<KeyRef>,
}

impl InjectionConfig {
    /// A config with the documented defaults for everything but the gateway-specific names.
    pub fn with_defaults(gateway_name: &str, image: &str, api_key_secret: KeyRef) -> Self {
        Self {
            gateway_name: gateway_name.to_string(),
            config_generation: 1,
            config_hash: None,
            pod_hash: None,
            config_map_name: config_map_name(gateway_name),
            config_key: CONFIG_KEY.into(),
            config_dir: CONFIG_DIR.into(),
            image: image.to_string(),
            image_pull_policy: None,
            resources: SidecarResources::defaults(),
            log_level: "info".into(),
            native_sidecar: NativeSidecarMode::Auto,
            cluster_supports_native_sidecars: true,
            socket_path: DEFAULT_SOCKET_PATH.into(),
            admin_port: SIDECAR_ADMIN_PORT,
            hub_addr: "nanogate-hub.nanogate-system.svc:7051".into(),
            hub_ca: None,
            api_key_secret,
            secret_mounts: Vec::new(),
            tcp_port: None,
            tcp_token_secret: None,
        }
    }

    fn native(&self) -> bool {
        match self.native_sidecar {
            NativeSidecarMode::Always => true,
            NativeSidecarMode::Never => false,
            NativeSidecarMode::Auto => self.cluster_supports_native_sidecars,
        }
    }

    /// Directory of the socket (the mount point of the shared volume).
    pub fn socket_dir(&self) -> &str {
        match self.socket_path.rsplit_once('/') {
            Some(("", _)) | None => "/",
            Some((dir, _)) => dir,
        }
    }
}

/// Operator-wide injection settings that are not per gateway.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InjectorSettings {
    /// Namespaces never injected: always `kube-system` and the operator's own namespace.
    pub protected_namespaces: Vec<String>,
}

impl InjectorSettings {
    pub fn new(operator_namespace: &str) -> Self {
        Self {
            protected_namespaces: vec!["kube-system".into(), operator_namespace.into()],
        }
    }
}

/// What the webhook decided for a pod.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    Inject(Injection),
    Skip(SkipReason),
}

/// A successful injection.
#[derive(Clone, Debug, PartialEq)]
pub struct Injection {
    /// The JSON patch for the admission response (applies to the pod as received).
    pub patch: json_patch::Patch,
    pub gateway: String,
    pub config_generation: i64,
    pub native: bool,
    /// Non-fatal problems (e.g. an unparseable resource override that was ignored); returned
    /// to the user as admission warnings.
    pub warnings: Vec<String>,
}

/// Why a pod was not injected. Each has a stable metric label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// Carries our container or the `nanogate.io/injected` annotation already.
    AlreadyInjected,
    /// Uses the host network: the sidecar's admin port would collide on the node.
    HostNetwork,
    /// `nanogate.io/inject: "false"` (or `no`, `disabled`, `off`).
    OptedOut,
    /// `nanogate.io/inject` carries a value that is neither a yes nor a no.
    InvalidInjectValue { value: String },
    /// Neither the pod annotation nor the namespace label asks for injection.
    NotOptedIn,
    /// No gateway in the namespace, or the one named by `nanogate.io/gateway` does not exist.
    NoGateway { requested: Option<String> },
    /// The gateway exists but its spec is invalid (`reason`: the validation messages), so it
    /// injects nothing. The webhook refines a `NoGateway` into this (see `webhook::mutate`).
    InvalidGateway { name: String, reason: String },
    /// Several gateways in the namespace and the pod names none of them.
    AmbiguousGateway { candidates: Vec<String> },
    /// `kube-system` or the operator's own namespace.
    ProtectedNamespace,
    /// A container of the pod declares the port the sidecar's admin server would listen on
    /// (the gateway's `spec.sidecar.adminPort`, or the pod's annotation): the sidecar could not
    /// bind it. `free` is a port the pod does not use, to suggest.
    AdminPortConflict {
        container: String,
        port: u16,
        from_annotation: bool,
        gateway: String,
        free: u16,
    },
}

impl SkipReason {
    /// Stable, low-cardinality label for metrics and event reasons.
    pub fn metric_label(&self) -> &'static str {
        match self {
            SkipReason::AlreadyInjected => "already_injected",
            SkipReason::HostNetwork => "host_network",
            SkipReason::OptedOut => "opted_out",
            SkipReason::InvalidInjectValue { .. } => "invalid_inject_value",
            SkipReason::NotOptedIn => "not_opted_in",
            SkipReason::NoGateway { .. } => "no_gateway",
            SkipReason::InvalidGateway { .. } => "invalid_gateway",
            SkipReason::AmbiguousGateway { .. } => "ambiguous_gateway",
            SkipReason::ProtectedNamespace => "protected_namespace",
            SkipReason::AdminPortConflict { .. } => "admin_port_conflict",
        }
    }

    /// Whether a user asked for injection and did not get it (worth an `InjectionSkipped`
    /// event, an admission warning and the `nanogate.io/injection-skipped` annotation);
    /// `NotOptedIn`, `OptedOut`, `AlreadyInjected` and `ProtectedNamespace` are routine.
    pub fn is_notable(&self) -> bool {
        matches!(
            self,
            SkipReason::HostNetwork
                | SkipReason::InvalidInjectValue { .. }
                | SkipReason::NoGateway { .. }
                | SkipReason::InvalidGateway { .. }
                | SkipReason::AmbiguousGateway { .. }
                | SkipReason::AdminPortConflict { .. }
        )
    }
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SkipReason::AlreadyInjected => {
                f.write_str("the pod already carries the nano-agent sidecar")
            }
            SkipReason::HostNetwork => f.write_str(
                "the pod uses hostNetwork; the sidecar is not injected into host-network pods",
            ),
            SkipReason::OptedOut => write!(
                f,
                "the pod opted out with the {INJECT_ANNOTATION} annotation or label"
            ),
            SkipReason::InvalidInjectValue { value } => write!(
                f,
                "{INJECT_ANNOTATION}: {value:?} is not understood, so the sidecar is not injected; use true/false, yes/no, enabled/disabled or on/off"
            ),
            SkipReason::InvalidGateway { name, reason } => write!(
                f,
                "the AgentGateway {name:?} is invalid ({reason}); fix it, then recreate the pod"
            ),
            SkipReason::NotOptedIn => write!(
                f,
                "injection not requested (annotate or label the pod {INJECT_ANNOTATION}: \"true\", or label the namespace {NAMESPACE_INJECTION_LABEL}=enabled)"
            ),
            SkipReason::NoGateway {
                requested: Some(name),
            } => write!(
                f,
                "the AgentGateway {name:?} named by {GATEWAY_ANNOTATION} does not exist in the pod's namespace"
            ),
            SkipReason::NoGateway { requested: None } => f.write_str(
                "no AgentGateway exists in the pod's namespace; create one to inject sidecars",
            ),
            SkipReason::AmbiguousGateway { candidates } => write!(
                f,
                "the namespace has several AgentGateways ({}); choose one with the {GATEWAY_ANNOTATION} annotation",
                candidates.join(", ")
            ),
            SkipReason::ProtectedNamespace => {
                f.write_str("pods in this namespace are never injected")
            }
            SkipReason::AdminPortConflict {
                container,
                port,
                from_annotation,
                gateway,
                free,
            } => {
                let source = if *from_annotation {
                    format!("set by the pod's {ADMIN_PORT_ANNOTATION} annotation")
                } else {
                    format!("spec.sidecar.adminPort of the AgentGateway {gateway:?}")
                };
                write!(
                    f,
                    "container {container:?} declares port {port}, the sidecar's admin port ({source}); give the sidecar a port the pod does not use with the annotation {ADMIN_PORT_ANNOTATION}: \"{free}\" (or set spec.sidecar.adminPort of the gateway), then recreate the pod"
                )
            }
        }
    }
}

/// Decide whether to inject `pod` (in namespace `namespace`, whose labels are `ns_labels`),
/// choosing among the namespace's `gateways`, and build the patch.
pub fn inject(
    pod: &Pod,
    namespace: &str,
    ns_labels: &BTreeMap<String, String>,
    gateways: &[InjectionConfig],
    settings: &InjectorSettings,
) -> Decision {
    let gateway = match decide(pod, namespace, ns_labels, gateways, settings) {
        Ok(gateway) => gateway,
        Err(reason) => return Decision::Skip(reason),
    };
    let mut warnings = Vec::new();
    let cfg = with_pod_overrides(pod, gateway, &mut warnings);
    if let Some(conflict) = admin_port_conflict(pod, &cfg, gateway.admin_port) {
        return Decision::Skip(conflict);
    }
    Decision::Inject(build(pod, &cfg, warnings))
}

/// `cfg` with the pod's valid `nanogate.io/sidecar-admin-port` and
/// `nanogate.io/sidecar-log-level` annotations applied. An invalid value is ignored with a
/// warning, as an invalid resource annotation is: the gateway's value stays.
fn with_pod_overrides(
    pod: &Pod,
    cfg: &InjectionConfig,
    warnings: &mut Vec<String>,
) -> InjectionConfig {
    let mut cfg = cfg.clone();
    let annotation = |name: &str| {
        pod.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(name))
            .map(|v| v.trim())
    };
    if let Some(v) = annotation(ADMIN_PORT_ANNOTATION) {
        match v.parse::<u16>() {
            Ok(port) if port < 1024 => warnings.push(format!(
                "nanogate: ignored {ADMIN_PORT_ANNOTATION}: {v:?} is below 1024 (the sidecar runs without privileges); use a port between 1024 and 65535; the sidecar keeps port {}",
                cfg.admin_port
            )),
            Ok(port) if Some(port) == cfg.tcp_port => warnings.push(format!(
                "nanogate: ignored {ADMIN_PORT_ANNOTATION}: {v:?} is the port of the gateway's TCP listener; choose another; the sidecar keeps port {}",
                cfg.admin_port
            )),
            Ok(port) => cfg.admin_port = port,
            Err(_) => warnings.push(format!(
                "nanogate: ignored {ADMIN_PORT_ANNOTATION}: {v:?} is not a port between 1024 and 65535 (e.g. \"9095\"); the sidecar keeps port {}",
                cfg.admin_port
            )),
        }
    }
    if let Some(v) = annotation(LOG_LEVEL_ANNOTATION) {
        let level = v.to_ascii_lowercase();
        if LOG_LEVELS.contains(&level.as_str()) {
            cfg.log_level = level;
        } else {
            warnings.push(format!(
                "nanogate: ignored {LOG_LEVEL_ANNOTATION}: {v:?} is not one of {}; the sidecar logs at {}",
                LOG_LEVELS.join(", "),
                cfg.log_level
            ));
        }
    }
    cfg
}

/// The values of `nanogate.io/sidecar-log-level` (those of `spec.sidecar.logLevel`).
const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

/// A container of `pod` that declares (TCP) the sidecar's admin port `cfg.admin_port`, as a
/// skip reason; `gateway_port` is the gateway's own choice (to tell where the port came from).
fn admin_port_conflict(pod: &Pod, cfg: &InjectionConfig, gateway_port: u16) -> Option<SkipReason> {
    let spec = pod.spec.as_ref()?;
    let declared = || {
        spec.containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .flat_map(|c| c.ports.iter().flatten().map(move |p| (c, p)))
            .filter(|(_, p)| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
    };
    let (container, _) = declared().find(|(_, p)| p.container_port == i32::from(cfg.admin_port))?;
    let used = |port: u16| {
        Some(port) == cfg.tcp_port || declared().any(|(_, p)| p.container_port == i32::from(port))
    };
    let free = (SIDECAR_ADMIN_PORT + 1..=u16::MAX)
        .find(|&port| !used(port))
        .unwrap_or(SIDECAR_ADMIN_PORT);
    Some(SkipReason::AdminPortConflict {
        container: container.name.clone(),
        port: cfg.admin_port,
        from_annotation: cfg.admin_port != gateway_port,
        gateway: cfg.gateway_name.clone(),
        free,
    })
}

fn decide<'g>(
    pod: &Pod,
    namespace: &str,
    ns_labels: &BTreeMap<String, String>,
    gateways: &'g [InjectionConfig],
    settings: &InjectorSettings,
) -> Result<&'g InjectionConfig, SkipReason> {
    if settings.protected_namespaces.iter().any(|p| p == namespace) {
        return Err(SkipReason::ProtectedNamespace);
    }
    if is_injected(pod) {
        return Err(SkipReason::AlreadyInjected);
    }
    let annotations = pod.metadata.annotations.as_ref();
    if let Some(value) = membership::unrecognised_inject_value(&pod.metadata) {
        return Err(SkipReason::InvalidInjectValue {
            value: value.to_string(),
        });
    }
    if membership::pod_opt_in(&pod.metadata) == Some(false) {
        return Err(SkipReason::OptedOut);
    }
    if !membership::opts_in(
        &pod.metadata,
        membership::namespace_opted_in(Some(ns_labels)),
    ) {
        return Err(SkipReason::NotOptedIn);
    }
    if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
        return Err(SkipReason::HostNetwork);
    }
    membership::choose(membership::requested_gateway(annotations), gateways, |g| {
        g.gateway_name.as_str()
    })
    .map_err(|no| match no {
        NoGateway::Missing(requested) => SkipReason::NoGateway { requested },
        NoGateway::Ambiguous(candidates) => SkipReason::AmbiguousGateway { candidates },
    })
}

/// The patch for a pod that asked for a sidecar and is skipped: the reason in the
/// `nanogate.io/injection-skipped` annotation, so `kubectl describe pod` shows it and the
/// reconciler knows the webhook saw the pod.
pub fn skip_patch(pod: &Pod, reason: &SkipReason) -> json_patch::Patch {
    let mut ops = Ops::default();
    let text = reason.to_string();
    if pod.metadata.annotations.is_some() {
        ops.add(
            format!(
                "/metadata/annotations/{}",
                pointer_key(INJECTION_SKIPPED_ANNOTATION)
            ),
            Value::String(text),
        );
    } else {
        ops.add(
            "/metadata/annotations".into(),
            json!({ INJECTION_SKIPPED_ANNOTATION: text }),
        );
    }
    ops.into_patch()
}

/// Whether the pod already carries our annotation or our container.
pub fn is_injected(pod: &Pod) -> bool {
    let annotated = membership::is_injected(pod.metadata.annotations.as_ref());
    let has_container = pod.spec.as_ref().is_some_and(|s| {
        s.containers
            .iter()
            .chain(s.init_containers.iter().flatten())
            .any(|c| c.name == SIDECAR_NAME)
    });
    annotated || has_container
}

/// Whether the pod runs to completion, so a legacy (non-native) sidecar must exit by itself:
/// owned by a Job (CronJobs create Jobs), or with `restartPolicy` `Never`/`OnFailure`.
fn runs_to_completion(pod: &Pod) -> bool {
    let job_owned = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "Job" && o.api_version.starts_with("batch/"));
    let restart = pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref());
    job_owned || matches!(restart, Some("Never" | "OnFailure"))
}

/// Escape a map key for a JSON pointer (RFC 6901).
fn pointer_key(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// Collects RFC 6902 operations.
#[derive(Default)]
struct Ops(Vec<Value>);

impl Ops {
    fn add(&mut self, path: String, value: Value) {
        self.0
            .push(json!({"op": "add", "path": path, "value": value}));
    }

    /// Append `items` to the array at `path`, creating it when `exists` is false.
    fn append(&mut self, path: &str, exists: bool, items: Vec<Value>) {
        if items.is_empty() {
            return;
        }
        if exists {
            for item in items {
                self.add(format!("{path}/-"), item);
            }
        } else {
            self.add(path.to_string(), Value::Array(items));
        }
    }

    fn into_patch(self) -> json_patch::Patch {
        serde_json::from_value(Value::Array(self.0))
            .expect("only well-formed add operations are built")
    }
}

fn build(pod: &Pod, cfg: &InjectionConfig, mut warnings: Vec<String>) -> Injection {
    let native = cfg.native();
    let spec = pod.spec.clone().unwrap_or_default();
    let mut ops = Ops::default();
    if native && !cfg.cluster_supports_native_sidecars {
        // Before 1.29 the API server drops `restartPolicy` from init containers, and the
        // sidecar would block the pod as a never-ending init container.
        warnings.push(format!(
            "nanogate: AgentGateway {:?} forces nativeSidecar: always, but the API server does not report native sidecar support (Kubernetes >= 1.29); the pod may never start",
            cfg.gateway_name
        ));
    }

    // Volumes.
    let mut volumes = vec![
        json!({"name": SOCKET_VOLUME, "emptyDir": {}}),
        json!({"name": CONFIG_VOLUME, "configMap": {"name": cfg.config_map_name}}),
        json!({"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": {
            "audience": HUB_TOKEN_AUDIENCE,
            "expirationSeconds": HUB_TOKEN_EXPIRATION_SECONDS,
            "path": TOKEN_FILE,
        }}]}}),
    ];
    match &cfg.hub_ca {
        Some(HubCaSource::ConfigMap(r)) => {
            volumes.push(json!({"name": HUB_CA_VOLUME, "configMap": {
                "name": r.name, "items": [{"key": r.key, "path": HUB_CA_FILE}],
            }}))
        }
        Some(HubCaSource::Secret(r)) => volumes.push(json!({"name": HUB_CA_VOLUME, "secret": {
            "secretName": r.name, "items": [{"key": r.key, "path": HUB_CA_FILE}],
        }})),
        None => {}
    }
    for m in &cfg.secret_mounts {
        let mut secret = json!({"secretName": m.secret_name});
        if !m.items.is_empty() {
            let items: Vec<Value> = m
                .items
                .iter()
                .map(|i| json!({"key": i.key, "path": i.path}))
                .collect();
            secret["items"] = Value::Array(items);
        }
        volumes.push(json!({"name": m.volume_name, "secret": secret}));
    }
    ops.append("/spec/volumes", spec.volumes.is_some(), volumes);

    // Socket mount + env in every app container and init container. Indexes refer to the pod
    // as received: these ops come before the sidecar insert that shifts them.
    for (field, containers) in [
        ("containers", Some(&spec.containers)),
        ("initContainers", spec.init_containers.as_ref()),
    ] {
        for (i, c) in containers.into_iter().flatten().enumerate() {
            add_socket_to_app(
                &mut ops,
                &format!("/spec/{field}/{i}"),
                c,
                cfg,
                &mut warnings,
            );
        }
    }

    // The sidecar, first in its list.
    let app_names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    let exit_when_done = !native && runs_to_completion(pod);
    let sidecar = sidecar_container(
        pod,
        cfg,
        native,
        exit_when_done.then_some(&app_names[..]),
        &mut warnings,
    );
    let field = if native {
        "initContainers"
    } else {
        "containers"
    };
    let list_exists = if native {
        spec.init_containers.is_some()
    } else {
        true
    };
    if list_exists {
        ops.add(format!("/spec/{field}/0"), sidecar);
    } else {
        ops.add(format!("/spec/{field}"), json!([sidecar]));
    }

    // Record the injection.
    let record = InjectedRecord {
        gateway: cfg.gateway_name.clone(),
        generation: cfg.config_generation,
        config_hash: cfg.config_hash.clone(),
        mode: if native { "native" } else { "legacy" }.into(),
        awaits_apps: Some(exit_when_done),
        image: Some(cfg.image.clone()),
        pod_hash: cfg.pod_hash.clone(),
    };
    let record = serde_json::to_string(&record).expect("record serialises");
    for (path, map, key, value) in [
        (
            "/metadata/annotations",
            &pod.metadata.annotations,
            INJECTED_ANNOTATION,
            record,
        ),
        (
            "/metadata/labels",
            &pod.metadata.labels,
            INJECTED_GATEWAY_LABEL,
            cfg.gateway_name.clone(),
        ),
    ] {
        if map.is_some() {
            ops.add(format!("{path}/{}", pointer_key(key)), Value::String(value));
        } else {
            ops.add(path.to_string(), json!({ key: value }));
        }
    }

    Injection {
        patch: ops.into_patch(),
        gateway: cfg.gateway_name.clone(),
        config_generation: cfg.config_generation,
        native,
        warnings,
    }
}

fn add_socket_to_app(
    ops: &mut Ops,
    base: &str,
    c: &Container,
    cfg: &InjectionConfig,
    warnings: &mut Vec<String>,
) {
    let socket_dir = cfg.socket_dir();
    // A container that already mounts something at the socket directory keeps its mount (two
    // mounts at one path would make the apiserver reject the pod); a user-set
    // TENDRL_SOCKET_PATH is the user's choice and is kept too.
    let mounts = c.volume_mounts.as_ref();
    let existing = mounts
        .into_iter()
        .flatten()
        .find(|m| m.mount_path.trim_end_matches('/') == socket_dir || m.name == SOCKET_VOLUME);
    if let Some(m) = existing.filter(|m| m.name != SOCKET_VOLUME) {
        warnings.push(format!(
            "nanogate: container {:?} already mounts volume {:?} at {socket_dir}; it will not see the nano-agent socket",
            c.name, m.name
        ));
    }
    if existing.is_none() {
        ops.append(
            &format!("{base}/volumeMounts"),
            mounts.is_some(),
            vec![json!({"name": SOCKET_VOLUME, "mountPath": socket_dir})],
        );
    }
    let env = c.env.as_ref();
    if !env.into_iter().flatten().any(|e| e.name == SOCKET_PATH_ENV) {
        ops.append(
            &format!("{base}/env"),
            env.is_some(),
            vec![json!({"name": SOCKET_PATH_ENV, "value": cfg.socket_path})],
        );
    }
}

fn sidecar_container(
    pod: &Pod,
    cfg: &InjectionConfig,
    native: bool,
    exit_when_done: Option<&[&str]>,
    warnings: &mut Vec<String>,
) -> Value {
    let field_env = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}});
    let mut env = vec![json!({"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {
        "name": cfg.api_key_secret.name, "key": cfg.api_key_secret.key,
    }}})];
    // The mounted key file, re-read by the sidecar (rotation without a restart); TENDRL_KEY
    // above stays for sidecar images that predate it.
    if let Some(m) = cfg
        .secret_mounts
        .iter()
        .find(|m| m.volume_name == API_KEY_VOLUME)
    {
        env.push(json!({"name": API_KEY_FILE_ENV,
            "value": format!("{}/{API_KEY_FILE}", m.mount_path.trim_end_matches('/'))}));
    }
    env.extend([
        field_env(POD_NAME_ENV, "metadata.name"),
        field_env(POD_NAMESPACE_ENV, "metadata.namespace"),
        field_env(POD_UID_ENV, "metadata.uid"),
        json!({"name": GATEWAY_ENV, "value": cfg.gateway_name}),
        json!({"name": CONFIG_FILE_ENV, "value": format!("{}/{}", cfg.config_dir.trim_end_matches('/'), cfg.config_key)}),
        json!({"name": HUB_ADDR_ENV, "value": cfg.hub_addr}),
        json!({"name": HUB_TOKEN_FILE_ENV, "value": format!("{TOKEN_DIR}/{TOKEN_FILE}")}),
    ]);
    if cfg.hub_ca.is_some() {
        env.push(json!({"name": HUB_CA_FILE_ENV, "value": format!("{HUB_CA_DIR}/{HUB_CA_FILE}")}));
    }
    env.extend([
        json!({"name": SOCKET_PATH_ENV, "value": cfg.socket_path}),
        json!({"name": SPOOL_DIR_ENV, "value": format!("{}/spool", cfg.socket_dir().trim_end_matches('/'))}),
        json!({"name": ADMIN_PORT_ENV, "value": cfg.admin_port.to_string()}),
        json!({"name": LOG_LEVEL_ENV, "value": cfg.log_level}),
    ]);
    if let Some(seconds) = shutdown_deadline_seconds(pod) {
        env.push(json!({"name": SHUTDOWN_DEADLINE_ENV, "value": format!("{seconds}s")}));
        if seconds == 0 {
            warnings.push(format!(
                "nanogate: terminationGracePeriodSeconds is shorter than {SHUTDOWN_REPORT_SECONDS}s: the sidecar gets no time to deliver what it holds at shutdown, and may not report what it leaves behind"
            ));
        }
    }
    if let Some(token) = &cfg.tcp_token_secret {
        env.push(
            json!({"name": TCP_TOKEN_ENV, "valueFrom": {"secretKeyRef": {
                "name": token.name, "key": token.key,
            }}}),
        );
    }
    if let Some(apps) = exit_when_done {
        env.push(json!({"name": EXIT_WHEN_APPS_DONE_ENV, "value": "true"}));
        env.push(json!({"name": APP_CONTAINERS_ENV, "value": apps.join(",")}));
    }

    let mut mounts = vec![
        json!({"name": SOCKET_VOLUME, "mountPath": cfg.socket_dir()}),
        json!({"name": CONFIG_VOLUME, "mountPath": cfg.config_dir, "readOnly": true}),
        json!({"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true}),
    ];
    if cfg.hub_ca.is_some() {
        mounts.push(json!({"name": HUB_CA_VOLUME, "mountPath": HUB_CA_DIR, "readOnly": true}));
    }
    for m in &cfg.secret_mounts {
        mounts.push(json!({"name": m.volume_name, "mountPath": m.mount_path, "readOnly": true}));
    }

    let probe = |path: &str, period: i32, failures: i32| {
        json!({
            "httpGet": {"path": path, "port": cfg.admin_port},
            "periodSeconds": period,
            "failureThreshold": failures,
            "timeoutSeconds": 1,
        })
    };

    let mut ports =
        vec![json!({"name": ADMIN_PORT_NAME, "containerPort": cfg.admin_port, "protocol": "TCP"})];
    if let Some(port) = cfg.tcp_port {
        ports.push(json!({"name": TCP_PORT_NAME, "containerPort": port, "protocol": "TCP"}));
    }
    let mut c = json!({
        "name": SIDECAR_NAME,
        "image": cfg.image,
        "env": env,
        "ports": ports,
        "volumeMounts": mounts,
        "readinessProbe": probe("/readyz", 5, 3),
        "livenessProbe": probe("/healthz", 10, 3),
        "resources": resources(pod, &cfg.resources, warnings),
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": SIDECAR_UID,
            "runAsGroup": SIDECAR_UID,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    });
    let obj = c.as_object_mut().expect("object");
    if let Some(policy) = &cfg.image_pull_policy {
        obj.insert("imagePullPolicy".into(), json!(policy));
    }
    if native {
        // The kubelet starts app containers only once a native sidecar's startup probe passes,
        // which holds apps until the socket is served.
        obj.insert("restartPolicy".into(), json!("Always"));
        obj.insert("startupProbe".into(), probe("/readyz", 1, 120));
    } else {
        // The kubelet runs a container's postStart hook to completion before it starts the next
        // container, so this hook (the agent waiting for its own readiness) holds the app
        // containers placed after the sidecar.
        obj.insert(
            "lifecycle".into(),
            json!({"postStart": {"exec": {"command": [
                "nano-agent", "wait-ready", "--timeout", "120s",
            ]}}}),
        );
    }
    c
}

/// The shutdown deadline (seconds) the sidecar of `pod` needs when the agent's default does not
/// fit in the pod's grace period (see the contract at the top); `None` when it fits.
fn shutdown_deadline_seconds(pod: &Pod) -> Option<i64> {
    let grace = pod
        .spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .unwrap_or(DEFAULT_GRACE_SECONDS);
    let fits = grace.saturating_sub(SHUTDOWN_REPORT_SECONDS).max(0);
    (fits < AGENT_SHUTDOWN_DEADLINE_SECONDS).then_some(fits)
}

fn resources(pod: &Pod, defaults: &SidecarResources, warnings: &mut Vec<String>) -> Value {
    let annotations = pod.metadata.annotations.as_ref();
    let mut pick = |annotation: &str, default: &Option<String>| -> Option<String> {
        match annotations
            .and_then(|a| a.get(annotation))
            .map(|v| v.trim())
        {
            Some(v) if parse_quantity(v).is_ok_and(|q| q >= 0.0) => Some(v.to_string()),
            Some(v) => {
                warnings.push(format!(
                    "nanogate: ignored {annotation}: {v:?} is not a Kubernetes quantity (e.g. \"50m\", \"64Mi\")"
                ));
                default.clone()
            }
            None => default.clone(),
        }
    };
    let cpu_lim = pick(CPU_LIMIT_ANNOTATION, &defaults.cpu_limit);
    let mem_lim = pick(MEMORY_LIMIT_ANNOTATION, &defaults.memory_limit);
    let cpu_req = pick(CPU_REQUEST_ANNOTATION, &defaults.cpu_request);
    let mem_req = pick(MEMORY_REQUEST_ANNOTATION, &defaults.memory_request);
    // The API server refuses a container whose request exceeds its limit; an override may
    // produce one (a lower limit, a higher request), so the request comes down to the limit.
    let mut at_most_limit = |resource: &str, request: Option<String>, limit: &Option<String>| {
        let value = |q: &Option<String>| q.as_deref().and_then(|q| parse_quantity(q).ok());
        match (value(&request), value(limit)) {
            (Some(r), Some(l)) if r > l => {
                warnings.push(format!(
                    "nanogate: the sidecar's {resource} request ({}) exceeds its limit ({}); the request is set to the limit",
                    request.as_deref().unwrap_or_default(),
                    limit.as_deref().unwrap_or_default()
                ));
                limit.clone()
            }
            _ => request,
        }
    };
    let cpu_req = at_most_limit("cpu", cpu_req, &cpu_lim);
    let mem_req = at_most_limit("memory", mem_req, &mem_lim);
    let section = |cpu: Option<String>, mem: Option<String>| {
        let mut m = serde_json::Map::new();
        if let Some(cpu) = cpu {
            m.insert("cpu".into(), Value::String(cpu));
        }
        if let Some(mem) = mem {
            m.insert("memory".into(), Value::String(mem));
        }
        m
    };
    let mut out = serde_json::Map::new();
    let requests = section(cpu_req, mem_req);
    let limits = section(cpu_lim, mem_lim);
    if !requests.is_empty() {
        out.insert("requests".into(), Value::Object(requests));
    }
    if !limits.is_empty() {
        out.insert("limits".into(), Value::Object(limits));
    }
    Value::Object(out)
}

/// Whether `s` is a Kubernetes quantity (see [`parse_quantity`]).
pub fn is_quantity(s: &str) -> bool {
    parse_quantity(s).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        for ok in ["10m", "1", "0.5", "64Mi", "1Gi", "1e3", "100k", "2E-2"] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in ["", "m", "lots", "10 m", "1.2.3", "64MB", "1e"] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }

    #[test]
    fn an_override_never_leaves_a_request_above_its_limit() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"annotations": {
                "nanogate.io/sidecar-memory-limit": "8Mi",
                "nanogate.io/sidecar-cpu-request": "banana",
            }},
            "spec": {"containers": []}
        }))
        .unwrap();
        let mut warnings = Vec::new();
        let out = resources(&pod, &SidecarResources::defaults(), &mut warnings);
        assert_eq!(
            out,
            json!({"requests": {"cpu": "10m", "memory": "8Mi"}, "limits": {"memory": "8Mi"}})
        );
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[1].contains("memory request (16Mi) exceeds its limit (8Mi)"),
            "{warnings:?}"
        );
    }

    #[test]
    fn socket_dir() {
        let mut cfg = InjectionConfig::with_defaults(
            "gw",
            "img",
            KeyRef {
                name: "s".into(),
                key: "k".into(),
            },
        );
        assert_eq!(cfg.socket_dir(), "/var/lib/tendrl");
        cfg.socket_path = "/agent.sock".into();
        assert_eq!(cfg.socket_dir(), "/");
    }

    /// A pod labelled `nanogate.io/inject: "true"` without the annotation (what the chart's
    /// label-only `objectSelector` lets through) is injected; the label's opt-out wins.
    #[test]
    fn the_inject_label_alone_opts_a_pod_in_and_its_opt_out_wins() {
        let gateways = [InjectionConfig::with_defaults(
            "gw",
            "img",
            KeyRef {
                name: "s".into(),
                key: "k".into(),
            },
        )];
        let settings = InjectorSettings::new("nanogate-system");
        let decide = |labels: Value, annotations: Value, ns_opted_in: bool| {
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": "p", "labels": labels, "annotations": annotations},
                "spec": {"containers": [{"name": "app", "image": "app"}]}
            }))
            .unwrap();
            let mut ns_labels = BTreeMap::new();
            if ns_opted_in {
                ns_labels.insert(NAMESPACE_INJECTION_LABEL.to_string(), "enabled".to_string());
            }
            inject(&pod, "apps", &ns_labels, &gateways, &settings)
        };
        let labelled = json!({INJECT_ANNOTATION: "true"});
        match decide(labelled.clone(), json!({}), false) {
            Decision::Inject(injection) => assert_eq!(injection.gateway, "gw"),
            other => panic!("labelled pod not injected: {other:?}"),
        }
        assert_eq!(
            decide(json!({}), json!({}), false),
            Decision::Skip(SkipReason::NotOptedIn)
        );
        assert_eq!(
            decide(labelled, json!({INJECT_ANNOTATION: "false"}), true),
            Decision::Skip(SkipReason::OptedOut)
        );
        assert_eq!(
            decide(json!({INJECT_ANNOTATION: "false"}), json!({}), true),
            Decision::Skip(SkipReason::OptedOut)
        );
    }

    fn gateway_cfg() -> InjectionConfig {
        InjectionConfig::with_defaults(
            "gw",
            "img",
            KeyRef {
                name: "s".into(),
                key: "k".into(),
            },
        )
    }

    fn pod_with(annotations: Value, containers: Value) -> Pod {
        let mut annotations = annotations;
        annotations[INJECT_ANNOTATION] = json!("true");
        serde_json::from_value(json!({
            "metadata": {"name": "p", "annotations": annotations},
            "spec": {"containers": containers}
        }))
        .unwrap()
    }

    fn decide_for(pod: &Pod, cfg: InjectionConfig) -> Decision {
        inject(
            pod,
            "apps",
            &BTreeMap::new(),
            &[cfg],
            &InjectorSettings::new("nanogate-system"),
        )
    }

    /// The injected sidecar's admin port (container port, every probe, env) and log level
    /// (env), each asserted to be one number / one level; and the warnings.
    fn admin_of(pod: &Pod, cfg: InjectionConfig) -> (u16, String, Vec<String>) {
        let Decision::Inject(injection) = decide_for(pod, cfg) else {
            panic!("not injected")
        };
        let mut doc = serde_json::to_value(pod).unwrap();
        json_patch::patch(&mut doc, &injection.patch).unwrap();
        let sidecar = doc["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == SIDECAR_NAME)
            .unwrap()
            .clone();
        let env = |name: &str| {
            sidecar["env"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == name)
                .unwrap_or_else(|| panic!("no {name}"))["value"]
                .as_str()
                .unwrap()
                .to_string()
        };
        let port: u16 = env(ADMIN_PORT_ENV).parse().unwrap();
        assert_eq!(
            sidecar["ports"][0],
            json!({"name": ADMIN_PORT_NAME, "containerPort": port, "protocol": "TCP"})
        );
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
            assert_eq!(sidecar[probe]["httpGet"]["port"], json!(port), "{probe}");
        }
        (port, env(LOG_LEVEL_ENV), injection.warnings)
    }

    #[test]
    fn the_admin_port_and_log_level_default_to_the_gateways() {
        let app = json!([{"name": "app", "image": "app", "ports": [{"containerPort": 8080}]}]);
        let (port, level, warnings) = admin_of(&pod_with(json!({}), app.clone()), gateway_cfg());
        assert_eq!((port, level.as_str()), (9091, "info"));
        assert!(warnings.is_empty(), "{warnings:?}");

        let mut cfg = gateway_cfg();
        cfg.admin_port = 9191;
        cfg.log_level = "warn".into();
        let (port, level, warnings) = admin_of(&pod_with(json!({}), app), cfg);
        assert_eq!((port, level.as_str()), (9191, "warn"));
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn pod_annotations_override_the_admin_port_and_log_level() {
        let pod = pod_with(
            json!({ADMIN_PORT_ANNOTATION: " 9095 ", LOG_LEVEL_ANNOTATION: "Debug"}),
            json!([{"name": "app", "image": "app", "ports": [{"containerPort": 9091}]}]),
        );
        let (port, level, warnings) = admin_of(&pod, gateway_cfg());
        assert_eq!((port, level.as_str()), (9095, "debug"));
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn invalid_admin_port_and_log_level_annotations_are_ignored_with_a_warning() {
        let app = json!([{"name": "app", "image": "app"}]);
        let mut cfg = gateway_cfg();
        cfg.tcp_port = Some(7070);
        for (bad_port, why) in [
            ("80", "below 1024"),
            ("70000", "not a port between 1024 and 65535"),
            ("nine", "not a port between 1024 and 65535"),
            ("7070", "TCP listener"),
        ] {
            let pod = pod_with(
                json!({ADMIN_PORT_ANNOTATION: bad_port, LOG_LEVEL_ANNOTATION: "verbose"}),
                app.clone(),
            );
            let (port, level, warnings) = admin_of(&pod, cfg.clone());
            assert_eq!((port, level.as_str()), (9091, "info"), "{bad_port}");
            assert_eq!(warnings.len(), 2, "{warnings:?}");
            assert!(
                warnings[0].contains(ADMIN_PORT_ANNOTATION)
                    && warnings[0].contains(why)
                    && warnings[0].contains("keeps port 9091"),
                "{warnings:?}"
            );
            assert!(
                warnings[1].contains(LOG_LEVEL_ANNOTATION)
                    && warnings[1]
                        .contains("\"verbose\" is not one of error, warn, info, debug, trace"),
                "{warnings:?}"
            );
        }
    }

    #[test]
    fn an_app_port_on_the_admin_port_is_refused_with_what_to_do() {
        let apps = json!([
            {"name": "web", "image": "web", "ports": [{"containerPort": 9092}]},
            {"name": "metrics", "image": "m", "ports": [{"containerPort": 9091, "protocol": "TCP"}]},
        ]);
        let reason = match decide_for(&pod_with(json!({}), apps.clone()), gateway_cfg()) {
            Decision::Skip(reason) => reason,
            other => panic!("injected: {other:?}"),
        };
        assert_eq!(reason.metric_label(), "admin_port_conflict");
        assert!(reason.is_notable());
        assert_eq!(
            reason.to_string(),
            "container \"metrics\" declares port 9091, the sidecar's admin port (spec.sidecar.adminPort of the AgentGateway \"gw\"); give the sidecar a port the pod does not use with the annotation nanogate.io/sidecar-admin-port: \"9093\" (or set spec.sidecar.adminPort of the gateway), then recreate the pod"
        );
        // The annotation's port is checked too.
        let pod = pod_with(json!({ADMIN_PORT_ANNOTATION: "9092"}), apps.clone());
        let Decision::Skip(reason) = decide_for(&pod, gateway_cfg()) else {
            panic!("injected")
        };
        assert!(
            reason.to_string().starts_with(
                "container \"web\" declares port 9092, the sidecar's admin port (set by the pod's nanogate.io/sidecar-admin-port annotation)"
            ),
            "{reason}"
        );
        // A UDP port of the same number does not collide; an init container's port does.
        let udp = json!([{"name": "dns", "image": "d", "ports": [{"containerPort": 9091, "protocol": "UDP"}]}]);
        admin_of(&pod_with(json!({}), udp), gateway_cfg());
        let mut pod = pod_with(json!({}), json!([{"name": "app", "image": "app"}]));
        pod.spec.as_mut().unwrap().init_containers = Some(vec![
            serde_json::from_value(
                json!({"name": "proxy", "image": "p", "ports": [{"containerPort": 9091}]}),
            )
            .unwrap(),
        ]);
        assert!(matches!(
            decide_for(&pod, gateway_cfg()),
            Decision::Skip(SkipReason::AdminPortConflict { .. })
        ));
    }

    #[test]
    fn metric_labels_are_stable() {
        let labels: Vec<_> = [
            SkipReason::AlreadyInjected,
            SkipReason::HostNetwork,
            SkipReason::OptedOut,
            SkipReason::InvalidInjectValue { value: "x".into() },
            SkipReason::NotOptedIn,
            SkipReason::NoGateway { requested: None },
            SkipReason::InvalidGateway {
                name: "g".into(),
                reason: "r".into(),
            },
            SkipReason::AmbiguousGateway { candidates: vec![] },
            SkipReason::ProtectedNamespace,
            SkipReason::AdminPortConflict {
                container: "c".into(),
                port: 9091,
                from_annotation: false,
                gateway: "g".into(),
                free: 9092,
            },
        ]
        .iter()
        .map(SkipReason::metric_label)
        .collect();
        assert_eq!(
            labels,
            [
                "already_injected",
                "host_network",
                "opted_out",
                "invalid_inject_value",
                "not_opted_in",
                "no_gateway",
                "invalid_gateway",
                "ambiguous_gateway",
                "protected_namespace",
                "admin_port_conflict"
            ]
        );
    }

    #[test]
    fn shutdown_deadline_fits_the_grace_period() {
        let pod = |grace: Option<i64>| -> Pod {
            serde_json::from_value(json!({
                "spec": {"terminationGracePeriodSeconds": grace, "containers": []}
            }))
            .unwrap()
        };
        assert_eq!(shutdown_deadline_seconds(&pod(None)), None, "30 s default");
        assert_eq!(shutdown_deadline_seconds(&pod(Some(25))), None);
        assert_eq!(shutdown_deadline_seconds(&pod(Some(120))), None);
        assert_eq!(shutdown_deadline_seconds(&pod(Some(24))), Some(19));
        assert_eq!(shutdown_deadline_seconds(&pod(Some(10))), Some(5));
        assert_eq!(shutdown_deadline_seconds(&pod(Some(3))), Some(0));
        assert_eq!(shutdown_deadline_seconds(&pod(Some(0))), Some(0));
    }

    #[test]
    fn native_sidecar_detection() {
        let info = |major: &str, minor: &str| k8s_openapi::apimachinery::pkg::version::Info {
            major: major.into(),
            minor: minor.into(),
            ..Default::default()
        };
        assert!(!supports_native_sidecars(&info("1", "20")));
        assert!(!supports_native_sidecars(&info("1", "28")));
        assert!(supports_native_sidecars(&info("1", "29")));
        assert!(supports_native_sidecars(&info("1", "33+")));
        assert!(supports_native_sidecars(&info("2", "0")));
        assert!(!supports_native_sidecars(&info("", "")));
    }

    #[test]
    fn pointer_keys_are_escaped() {
        assert_eq!(pointer_key("nanogate.io/injected"), "nanogate.io~1injected");
        assert_eq!(pointer_key("a~b"), "a~0b");
    }
}

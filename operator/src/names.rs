//! Every name the operator shares with something outside its code: annotations and labels
//! (users, pods, its own objects), the injected sidecar's environment variables, volumes and
//! mount paths (the `nano-agent` reads them), and the gateway's ConfigMap with its keys. A name
//! that appears in a pod, an object or the sidecar's environment is defined here, once.

// ---------------------------------------------------------------------------------------------
// Annotations and labels
// ---------------------------------------------------------------------------------------------

/// API group of our resources.
pub const GROUP: &str = "nanogate.io";

/// Pod annotation that opts a pod in (`true`, `yes`, `enabled`, `on`) or out (`false`, `no`,
/// `disabled`, `off`, which always win), any case; another value is warned about and not
/// injected (`gateway::membership::parse_inject_value`).
pub const INJECT_ANNOTATION: &str = "nanogate.io/inject";
/// Annotation the webhook writes on a pod that asked for a sidecar and did not get one: why.
/// The reconciler tells these pods apart from pods that never met the webhook.
pub const INJECTION_SKIPPED_ANNOTATION: &str = "nanogate.io/injection-skipped";
/// Namespace label that opts every pod of the namespace in (value
/// [`NAMESPACE_INJECTION_ENABLED`]).
pub const NAMESPACE_INJECTION_LABEL: &str = "nanogate.io/injection";
/// The value of [`NAMESPACE_INJECTION_LABEL`] that opts a namespace in.
pub const NAMESPACE_INJECTION_ENABLED: &str = "enabled";
/// Pod annotation naming the gateway (an `AgentGateway` in the pod's namespace); also the label
/// on the objects the operator creates for a gateway.
pub const GATEWAY_ANNOTATION: &str = "nanogate.io/gateway";
/// Annotation written on injected pods; its value records the gateway and configuration
/// (`webhook::inject::InjectedRecord` as JSON).
pub const INJECTED_ANNOTATION: &str = "nanogate.io/injected";
/// Label written on injected pods with the gateway name, so a gateway's pods can be selected.
pub const INJECTED_GATEWAY_LABEL: &str = "nanogate.io/injected-gateway";
/// Per-pod resource overrides for the sidecar.
pub const CPU_REQUEST_ANNOTATION: &str = "nanogate.io/sidecar-cpu-request";
pub const CPU_LIMIT_ANNOTATION: &str = "nanogate.io/sidecar-cpu-limit";
pub const MEMORY_REQUEST_ANNOTATION: &str = "nanogate.io/sidecar-memory-request";
pub const MEMORY_LIMIT_ANNOTATION: &str = "nanogate.io/sidecar-memory-limit";
/// Per-pod override of the sidecar's admin port (`spec.sidecar.adminPort`): 1024–65535.
pub const ADMIN_PORT_ANNOTATION: &str = "nanogate.io/sidecar-admin-port";
/// Per-pod override of the sidecar's log level (`spec.sidecar.logLevel`): `error`, `warn`,
/// `info`, `debug` or `trace`.
pub const LOG_LEVEL_ANNOTATION: &str = "nanogate.io/sidecar-log-level";
/// Gateway annotation that opts into automatic repair; the only value is `rollout`.
pub const REPAIR_ANNOTATION: &str = "nanogate.io/repair";
/// Pod-template annotation the repair sets (the time of the restart, RFC 3339).
pub const RESTARTED_AT_ANNOTATION: &str = "nanogate.io/restartedAt";
/// Annotation on the gateway's ConfigMap with the content hash of the configuration.
pub const CONFIG_HASH_ANNOTATION: &str = "nanogate.io/config-hash";
/// Label on the leader's pod (value `true`), which the hub Service selects.
pub const LEADER_LABEL: &str = "nanogate.io/hub-leader";
/// Label on everything the operator creates, with value [`MANAGED_BY`].
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// The value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "nanogate-operator";
/// Field manager of every write of the operator but the hub's status writes; also the
/// reporting controller of its events.
pub const FIELD_MANAGER: &str = "nanogate-operator";
/// Field manager of the hub's status writes.
pub const HUB_FIELD_MANAGER: &str = "nanogate-hub";
/// Annotations on the webhook's certificate Secret.
pub const ANNOTATION_CA_NOT_AFTER: &str = "nanogate.io/ca-not-after";
pub const ANNOTATION_CERT_NOT_BEFORE: &str = "nanogate.io/cert-not-before";
pub const ANNOTATION_CERT_NOT_AFTER: &str = "nanogate.io/cert-not-after";
pub const ANNOTATION_CERT_SANS: &str = "nanogate.io/cert-sans";

// ---------------------------------------------------------------------------------------------
// The gateway's ConfigMap
// ---------------------------------------------------------------------------------------------

/// Name of the ConfigMap derived from gateway `gateway`.
pub fn config_map_name(gateway: &str) -> String {
    format!("{gateway}-agent-config")
}
/// Key of the sidecar configuration in the ConfigMap. The value is JSON (therefore also YAML).
pub const CONFIG_KEY: &str = "config.json";
/// Key of the hub's CA certificate (PEM) in the ConfigMap.
pub const HUB_CA_KEY: &str = "hub-ca.crt";

// ---------------------------------------------------------------------------------------------
// The injected sidecar: container, volumes, mount paths
// ---------------------------------------------------------------------------------------------

/// Name of the injected container.
pub const SIDECAR_NAME: &str = "nano-agent";
/// Volume names added to the pod.
pub const SOCKET_VOLUME: &str = "nanogate-socket";
pub const CONFIG_VOLUME: &str = "nanogate-config";
pub const TOKEN_VOLUME: &str = "nanogate-hub-token";
pub const HUB_CA_VOLUME: &str = "nanogate-hub-ca";
pub const UPSTREAM_CA_VOLUME: &str = "nanogate-upstream-ca";
pub const UPSTREAM_CLIENT_CERT_VOLUME: &str = "nanogate-upstream-client";
pub const NATS_CREDENTIALS_VOLUME: &str = "nanogate-nats-credentials";
pub const TCP_TLS_VOLUME: &str = "nanogate-tcp-tls";
pub const API_KEY_VOLUME: &str = "nanogate-api-key";
/// Default socket path (the Tendrl agent's `SocketPath`); its directory is the shared volume.
pub const DEFAULT_SOCKET_PATH: &str = "/var/lib/tendrl/tendrl_agent.sock";
/// Where the injector mounts the ConfigMap; the sidecar reads `<dir>/config.json`.
pub const CONFIG_DIR: &str = "/etc/nanogate/agent";
/// Where the sidecar finds its hub token.
pub const TOKEN_DIR: &str = "/var/run/secrets/nanogate-hub";
pub const TOKEN_FILE: &str = "token";
/// Where the sidecar finds the hub's CA.
pub const HUB_CA_DIR: &str = "/etc/nanogate/hub-ca";
pub const HUB_CA_FILE: &str = "ca.crt";
/// Where the injector mounts `spec.upstream.tls.caSecretRef` (file name = the Secret key).
pub const UPSTREAM_CA_DIR: &str = "/etc/nanogate/upstream-ca";
/// Where the injector mounts `spec.upstream.tls.clientCertSecretRef` (`tls.crt`, `tls.key`).
pub const UPSTREAM_CLIENT_CERT_DIR: &str = "/etc/nanogate/upstream-client";
/// Where the injector mounts `spec.upstream.nats.credentialsSecretRef` (file name = the key).
pub const NATS_CREDENTIALS_DIR: &str = "/etc/nanogate/nats-credentials";
/// Where the injector mounts the API key Secret's one key (`spec.upstream.apiKeySecretRef`),
/// as file [`API_KEY_FILE`]: the kubelet refreshes it when the Secret changes, and the sidecar
/// re-reads it, so a rotated key is used without a restart.
pub const API_KEY_DIR: &str = "/etc/nanogate/api-key";
pub const API_KEY_FILE: &str = "api-key";
/// Where the TCP listener's TLS Secret is mounted in the sidecar.
pub const TCP_TLS_DIR: &str = "/etc/nanogate/tcp-tls";
/// Audience and lifetime of the projected service-account token presented to the hub.
pub const HUB_TOKEN_AUDIENCE: &str = "nanogate-hub";
pub const HUB_TOKEN_EXPIRATION_SECONDS: i64 = 3600;
/// The sidecar's default admin port (`/metrics`, `/healthz`, `/readyz`); a gateway chooses
/// another with `spec.sidecar.adminPort`, a pod with [`ADMIN_PORT_ANNOTATION`].
pub const SIDECAR_ADMIN_PORT: u16 = 9091;
/// Names of the sidecar's container ports.
pub const ADMIN_PORT_NAME: &str = "nanogate-admin";
pub const TCP_PORT_NAME: &str = "nanogate-tcp";

// ---------------------------------------------------------------------------------------------
// Environment variables (the injected containers')
// ---------------------------------------------------------------------------------------------

/// The API key, in the sidecar only (the Tendrl agent's `TENDRL_KEY`). Still set next to
/// [`API_KEY_FILE_ENV`]: a sidecar image older than the key file reads only this one (it does
/// not follow a rotation); a current one uses it until the file can be read.
pub const API_KEY_ENV: &str = "TENDRL_KEY";
/// Path of the mounted API key file (`API_KEY_DIR/API_KEY_FILE`), in the sidecar only.
pub const API_KEY_FILE_ENV: &str = "TENDRL_KEY_FILE";
/// The socket path, in every container.
pub const SOCKET_PATH_ENV: &str = "TENDRL_SOCKET_PATH";
/// The TCP listener's token, in the sidecar only.
pub const TCP_TOKEN_ENV: &str = "NANOGATE_TCP_TOKEN";
/// The pod's identity (downward API).
pub const POD_NAME_ENV: &str = "NANOGATE_POD_NAME";
pub const POD_NAMESPACE_ENV: &str = "NANOGATE_POD_NAMESPACE";
pub const POD_UID_ENV: &str = "NANOGATE_POD_UID";
/// The gateway's name.
pub const GATEWAY_ENV: &str = "NANOGATE_GATEWAY";
/// The configuration file (`<CONFIG_DIR>/<CONFIG_KEY>`).
pub const CONFIG_FILE_ENV: &str = "NANOGATE_CONFIG_FILE";
/// The hub's address, token file and CA file.
pub const HUB_ADDR_ENV: &str = "NANOGATE_HUB_ADDR";
pub const HUB_TOKEN_FILE_ENV: &str = "NANOGATE_HUB_TOKEN_FILE";
pub const HUB_CA_FILE_ENV: &str = "NANOGATE_HUB_CA_FILE";
/// The spool directory (on the shared volume).
pub const SPOOL_DIR_ENV: &str = "NANOGATE_SPOOL_DIR";
/// The sidecar's admin port and log level.
pub const ADMIN_PORT_ENV: &str = "NANOGATE_ADMIN_PORT";
pub const LOG_LEVEL_ENV: &str = "NANOGATE_LOG_LEVEL";
/// Tells a legacy-mode sidecar in a run-to-completion pod to exit (after flushing) once every
/// app container has terminated; [`APP_CONTAINERS_ENV`] lists them.
pub const EXIT_WHEN_APPS_DONE_ENV: &str = "NANOGATE_EXIT_WHEN_APPS_DONE";
pub const APP_CONTAINERS_ENV: &str = "NANOGATE_APP_CONTAINERS";
/// The agent's shutdown deadline (`nano-agent --shutdown-deadline`), set when the pod's grace
/// period is too short for the agent's default.
pub const SHUTDOWN_DEADLINE_ENV: &str = "NANOGATE_SHUTDOWN_DEADLINE";

//! The injector's view of a gateway ([`InjectionSettings`]): image, resources, socket, the
//! ConfigMap and hash of its configuration, the Secrets the sidecar gets. Derived once per
//! gateway by [`ValidatedGateway::new`]; the webhook maps it onto its `InjectionConfig`. Pure.

use k8s_openapi::api::core::v1::ResourceRequirements;

use super::image::SidecarImages;
use super::refs::{SecretRef, secret_refs};
use super::sidecar_config::SidecarConfig;
use super::validated::ValidatedGateway;
use crate::crd::{
    AgentGateway, FieldError, LogLevel, NativeSidecar, SecretKeySelector, TcpListenerSpec,
};

/// Everything the sidecar injector needs from a gateway, resolved with defaults. Build it with
/// [`AgentGateway::injection_settings`]; the webhook maps it onto its own `InjectionConfig`.
#[derive(Clone, Debug, PartialEq)]
pub struct InjectionSettings {
    /// Gateway name (same namespace as the pod).
    pub gateway: String,
    /// nano-agent image (resolved by [`ValidatedGateway::checked`] against the operator's
    /// [`SidecarImages`]).
    pub image: String,
    /// Sidecar resources (before per-pod annotation overrides).
    pub resources: ResourceRequirements,
    /// Sidecar log level (`info`, …).
    pub log_level: LogLevel,
    /// Port of the sidecar's admin server (`spec.sidecar.adminPort`, before the per-pod
    /// annotation override); validated, so within 1024–65535.
    pub admin_port: u16,
    /// Native sidecar mode.
    pub native_sidecar: NativeSidecar,
    /// Socket path in every container (`TENDRL_SOCKET_PATH`).
    pub socket_path: String,
    /// Directory of the socket: mount point of the shared `emptyDir`.
    pub socket_dir: String,
    /// ConfigMap holding the derived sidecar configuration.
    pub config_map_name: String,
    /// Key in that ConfigMap.
    pub config_key: &'static str,
    /// Content hash of the derived configuration ("config generation" for the annotation).
    pub config_hash: String,
    /// Secret and key with the API key (env of the sidecar only).
    pub api_key_secret: SecretKeySelector,
    /// Every Secret the gateway references, and how each reaches the sidecar.
    pub secret_refs: Vec<SecretRef>,
    /// The optional TCP listener (token and TLS Secrets, port).
    pub tcp_listener: Option<TcpListenerSpec>,
    /// `metadata.generation` of the gateway, if known.
    pub generation: Option<i64>,
}

impl InjectionSettings {
    /// A content hash of the gateway's settings the injector writes into a pod's spec (all but
    /// the image, compared on its own, and the configuration file, which reaches running
    /// sidecars without a restart): a pod injected with another one is outdated. Built from
    /// named fields, so it stays the same across operator versions that inject alike.
    pub fn pod_hash(&self) -> String {
        let secrets: Vec<_> = self
            .secret_refs
            .iter()
            .map(|r| serde_json::json!({"field": r.field, "name": r.name, "keys": r.keys}))
            .collect();
        let settings = serde_json::json!({
            "resources": self.resources,
            "logLevel": self.log_level.as_str(),
            "adminPort": self.admin_port,
            "nativeSidecar": self.native_sidecar,
            "socketPath": self.socket_path,
            "apiKeySecret": self.api_key_secret,
            "secrets": secrets,
            "tcpListener": self.tcp_listener,
        });
        format!("{:08x}", crc32fast::hash(settings.to_string().as_bytes()))
    }
}

impl AgentGateway {
    /// Everything the injector needs (see [`ValidatedGateway::checked`]); fails with the same
    /// field errors as [`crate::crd::validate`] when the spec is invalid, or when its image is
    /// not one `images` allows (do not inject then).
    pub fn injection_settings(
        &self,
        images: &SidecarImages,
    ) -> Result<InjectionSettings, Vec<FieldError>> {
        ValidatedGateway::checked(self, images).map(|v| v.injection)
    }
}

/// The injector's view of a gateway whose spec is valid and whose configuration file is
/// `config` (its hash is the one the reconciler writes to the ConfigMap and the status).
pub(super) fn injection_settings(gw: &AgentGateway, config: &SidecarConfig) -> InjectionSettings {
    {
        let name = gw.metadata.name.clone().unwrap_or_default();
        let spec = &gw.spec;
        let socket_dir = spec
            .socket
            .path
            .rsplit_once('/')
            .map(|(d, _)| if d.is_empty() { "/" } else { d })
            .unwrap_or("/")
            .to_string();
        InjectionSettings {
            config_map_name: crate::names::config_map_name(&name),
            gateway: name,
            image: spec
                .sidecar
                .image
                .clone()
                .unwrap_or_else(|| crate::crd::DEFAULT_SIDECAR_IMAGE.into()),
            resources: spec.sidecar.resources.clone(),
            log_level: spec.sidecar.log_level,
            admin_port: u16::try_from(spec.sidecar.admin_port)
                .unwrap_or(crate::names::SIDECAR_ADMIN_PORT),
            native_sidecar: spec.sidecar.native_sidecar,
            socket_path: spec.socket.path.clone(),
            socket_dir,
            config_key: crate::names::CONFIG_KEY,
            config_hash: config.hash(),
            api_key_secret: spec.upstream.api_key_secret_ref.clone(),
            secret_refs: secret_refs(spec),
            tcp_listener: spec.tcp_listener.clone(),
            generation: gw.metadata.generation,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_hash(yaml_spec: &str) -> String {
        let gateway: AgentGateway = serde_yaml::from_str(&format!(
            "apiVersion: nanogate.io/v1alpha1\nkind: AgentGateway\nmetadata: {{name: shop}}\nspec:\n  upstream: {{url: 'https://p.example/api', apiKeySecretRef: {{name: key}}}}\n{yaml_spec}"
        ))
        .expect("test gateway parses");
        match ValidatedGateway::new(&gateway) {
            Ok(valid) => valid.injection.pod_hash(),
            Err(errors) => panic!("{yaml_spec}: {errors:?}"),
        }
    }

    /// What lands in the pod's spec changes the hash (a restart is needed); what reaches
    /// running sidecars through the configuration file, and the image (compared on its own),
    /// do not.
    #[test]
    fn the_pod_hash_follows_the_pod_settings_only() {
        let base = pod_hash("");
        assert_eq!(base, pod_hash(""), "stable");
        for pod_setting in [
            "  sidecar: {adminPort: 9191}\n",
            "  sidecar: {logLevel: debug}\n",
            "  sidecar: {resources: {limits: {memory: 96Mi}}}\n",
            "  sidecar: {nativeSidecar: never}\n",
            "  socket: {path: /run/nanogate/other.sock}\n",
        ] {
            assert_ne!(pod_hash(pod_setting), base, "{pod_setting}");
        }
        for live_setting in [
            "  batching: {maxBatchSize: 50}\n",
            "  heartbeatInterval: 10s\n",
            "  sidecar: {image: 'ghcr.io/nanogate/nano-agent:9.9.9'}\n",
        ] {
            assert_eq!(pod_hash(live_setting), base, "{live_setting}");
        }
    }
}

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

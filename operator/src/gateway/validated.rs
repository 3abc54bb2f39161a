//! The one input of everything downstream of validation: [`ValidatedGateway::new`] checks a
//! gateway's spec ([`crate::crd::validate`]) and derives from it, once, what the reconciler's
//! build (the sidecar configuration for the ConfigMap), the injector ([`InjectionSettings`])
//! and the hub's status writer (configuration hash, heartbeat interval) need. None of them
//! reads the raw spec again. Pure: the reconciler dereferences the [`SecretRef`]s before it
//! builds.

use std::time::Duration;

use super::injection::{InjectionSettings, injection_settings};
use super::refs::{SecretRef, secret_refs};
use super::sidecar_config::{SidecarConfig, sidecar_config};
use crate::crd::{AgentGateway, FieldError};

/// A gateway whose spec passed validation, with everything derived from it.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidatedGateway {
    /// The sidecar's configuration file (written to the ConfigMap, pushed on `reload`).
    pub sidecar_config: SidecarConfig,
    /// Its content hash (`status.configHash`, the ConfigMap annotation, the injected record).
    pub config_hash: String,
    /// The Secrets the spec references (checked by the reconciler, mounted by the injector).
    pub secret_refs: Vec<SecretRef>,
    /// How often each sidecar reports (`spec.heartbeatInterval`).
    pub heartbeat_interval: Duration,
    /// The injector's view.
    pub injection: InjectionSettings,
}

impl ValidatedGateway {
    /// Validates `gateway` and derives its parts; the field errors when the spec is invalid.
    pub fn new(gateway: &AgentGateway) -> Result<Self, Vec<FieldError>> {
        // The name goes into every injected pod too; the spec is checked by `sidecar_config`.
        crate::crd::validate_gateway(gateway)?;
        let config = sidecar_config(&gateway.spec)?;
        Ok(Self {
            config_hash: config.hash(),
            secret_refs: secret_refs(&gateway.spec),
            heartbeat_interval: Duration::from_millis(config.heartbeat_interval_ms),
            injection: injection_settings(gateway, &config),
            sidecar_config: config,
        })
    }
}

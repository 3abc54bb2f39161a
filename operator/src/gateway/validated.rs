//! The one input of everything downstream of validation: [`ValidatedGateway::new`] checks a
//! gateway's spec ([`crate::crd::validate`]) and derives from it, once, what the reconciler's
//! build (the sidecar configuration for the ConfigMap), the injector ([`InjectionSettings`])
//! and the hub's status writer (configuration hash, heartbeat interval) need. None of them
//! reads the raw spec again. Pure: the reconciler dereferences the [`SecretRef`]s before it
//! builds.

use std::time::Duration;

use super::image::SidecarImages;
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
    /// [`Self::new`] and the operator's image policy: the image to inject is resolved
    /// (`spec.sidecar.image` absent → the operator's image), one the operator does not allow is
    /// a field error like any other. The webhook (validating and injecting) and the reconciler
    /// call this; only what never reaches a pod (the hub's configuration pushes) uses `new`.
    pub fn checked(
        gateway: &AgentGateway,
        images: &SidecarImages,
    ) -> Result<Self, Vec<FieldError>> {
        let image = images.resolve(gateway.spec.sidecar.image.as_deref());
        match (Self::new(gateway), image) {
            (Ok(mut valid), Ok(image)) => {
                valid.injection.image = image;
                Ok(valid)
            }
            (Ok(_), Err(error)) => Err(vec![error]),
            (Err(errors), Ok(_)) => Err(errors),
            (Err(mut errors), Err(error)) => {
                errors.push(error);
                Err(errors)
            }
        }
    }

    /// Validates `gateway` and derives its parts; the field errors when the spec is invalid.
    /// The image is not checked against the operator's policy here: `injection.image` is the
    /// spec's, or this release's default, until [`Self::checked`] resolves it.
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

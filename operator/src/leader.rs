//! Leader election on a `coordination.k8s.io/v1` Lease.
//!
//! The holder renews every `lease_duration / 3`; others poll more often and take the lease
//! once its `renewTime + leaseDurationSeconds` has passed (or it was released). Every write
//! is a `replace` carrying the `resourceVersion` that was read, so two candidates can never
//! both win: the API server rejects the slower one with a conflict. A leader that cannot
//! renew for 2/3 of the lease duration stops leading before anyone else may start.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::PostParams;
use kube::{Api, Client};
use tracing::{debug, info, warn};

/// Lease settings.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Lease name.
    pub name: String,
    /// Lease namespace.
    pub namespace: String,
    /// This replica's identity (pod name).
    pub identity: String,
    /// How long a lease is valid without renewal.
    pub lease_duration: Duration,
    /// Owner of the Lease (the MutatingWebhookConfiguration when the webhook is on), so an
    /// uninstall garbage-collects it.
    pub owner: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>,
}

impl LeaseConfig {
    /// Interval between renewals by the holder.
    pub fn renew_interval(&self) -> Duration {
        self.lease_duration / 3
    }

    /// Interval between attempts by a non-holder.
    pub fn retry_interval(&self) -> Duration {
        (self.lease_duration / 7).clamp(Duration::from_millis(200), Duration::from_secs(2))
    }

    /// A leader that has not renewed for this long steps down.
    pub fn renew_deadline(&self) -> Duration {
        self.lease_duration * 2 / 3
    }
}

/// Outcome of one election round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Round {
    /// We hold the lease (acquired or renewed).
    Leading,
    /// Someone else holds a valid lease.
    Following(Option<String>),
}

/// Acquires, renews and releases the lease.
pub struct LeaderElector {
    api: Api<Lease>,
    cfg: LeaseConfig,
    last_renew: Option<Instant>,
}

impl LeaderElector {
    /// Elector for `cfg` using `client`.
    pub fn new(client: Client, cfg: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
            last_renew: None,
        }
    }

    /// Settings.
    pub fn config(&self) -> &LeaseConfig {
        &self.cfg
    }

    /// When we last renewed successfully.
    pub fn last_renew(&self) -> Option<Instant> {
        self.last_renew
    }

    fn duration_secs(&self) -> i32 {
        i32::try_from(self.cfg.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// One round: create, renew or take over the lease if we may.
    pub async fn try_acquire_or_renew(&mut self) -> Result<Round, kube::Error> {
        let now = Timestamp::now();
        let me = self.cfg.identity.clone();
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    owner_references: self.cfg.owner.clone().map(|owner| vec![owner]),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.clone()),
                    lease_duration_seconds: Some(self.duration_secs()),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => {
                    info!(identity = %me, lease = %self.cfg.name, "created lease; now leading");
                    self.last_renew = Some(Instant::now());
                    Ok(Round::Leading)
                }
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Round::Following(None)),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        if holder.as_deref() == Some(me.as_str()) {
            spec.renew_time = Some(MicroTime(now));
            spec.lease_duration_seconds = Some(self.duration_secs());
        } else {
            let duration = spec
                .lease_duration_seconds
                .map(|s| SignedDuration::from_secs(i64::from(s)))
                .unwrap_or_else(|| {
                    SignedDuration::from_secs(self.cfg.lease_duration.as_secs() as i64)
                });
            let expired = match (&holder, &spec.renew_time) {
                (None, _) | (_, None) => true,
                (Some(_), Some(MicroTime(renewed))) => renewed
                    .checked_add(duration)
                    .map(|end| end < now)
                    .unwrap_or(true),
            };
            if !expired {
                return Ok(Round::Following(holder));
            }
            spec.holder_identity = Some(me.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.renew_time = Some(MicroTime(now));
            spec.lease_duration_seconds = Some(self.duration_secs());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            info!(identity = %me, previous = ?holder, lease = %self.cfg.name, "taking over expired lease");
        }
        // `replace` sends the resourceVersion we read: a concurrent writer makes this fail
        // with 409 instead of both of us believing we lead.
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                self.last_renew = Some(Instant::now());
                debug!(identity = %me, "lease renewed");
                Ok(Round::Leading)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Round::Following(None)),
            Err(e) => Err(e),
        }
    }

    /// Give the lease up (on shutdown) so another replica takes over at once.
    pub async fn release(&mut self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.cfg.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        spec.acquire_time = None;
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => info!(identity = %self.cfg.identity, "lease released"),
            Err(error) => warn!(%error, "releasing lease failed"),
        }
        self.last_renew = None;
    }
}

/// The label the leader puts on its own pod; the chart's hub Service selects it, so sidecars
/// always reach the replica whose index feeds gateway status.
pub use crate::names::LEADER_LABEL;

/// Keeps [`LEADER_LABEL`] on the leader's pod only.
pub struct LeaderPodLabel {
    pods: Api<k8s_openapi::api::core::v1::Pod>,
    /// This replica's pod name (`POD_NAME`).
    pod: String,
    /// What the label currently says for our pod, as far as we know (`None`: unknown, or a
    /// write failed and is retried on the next round).
    applied: Option<bool>,
}

impl LeaderPodLabel {
    pub fn new(client: Client, namespace: &str, pod: &str) -> Self {
        Self {
            pods: Api::namespaced(client, namespace),
            pod: pod.to_string(),
            applied: None,
        }
    }

    /// Brings the label in line with `leading`; cheap when nothing changed. Errors are logged
    /// and retried on the next call.
    pub async fn sync(&mut self, leading: bool) {
        if self.applied == Some(leading) {
            return;
        }
        match self.write(leading).await {
            Ok(()) => {
                info!(pod = %self.pod, leading, "hub leader label updated");
                self.applied = Some(leading);
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {
                // Outside a pod (a local run): there is nothing to label.
                debug!(pod = %self.pod, "no pod of this name; leader label skipped");
                self.applied = Some(leading);
            }
            Err(error) => {
                warn!(%error, pod = %self.pod, leading, "updating the hub leader label failed")
            }
        }
    }

    async fn write(&self, leading: bool) -> Result<(), kube::Error> {
        use kube::api::{ListParams, Patch, PatchParams};
        let set = |value: Option<&str>| serde_json::json!({"metadata": {"labels": {LEADER_LABEL: value}}});
        let params = PatchParams {
            field_manager: Some(crate::FIELD_MANAGER.into()),
            ..Default::default()
        };
        if leading {
            // A former leader that died could not take its label off; do it for it.
            let labelled = self
                .pods
                .list_metadata(&ListParams::default().labels(&format!("{LEADER_LABEL}=true")))
                .await?;
            for other in labelled.items {
                let name = other.metadata.name.unwrap_or_default();
                if name != self.pod {
                    self.pods
                        .patch(&name, &params, &Patch::Merge(set(None)))
                        .await?;
                    info!(pod = %name, "removed the hub leader label from a former leader");
                }
            }
            self.pods
                .patch(&self.pod, &params, &Patch::Merge(set(Some("true"))))
                .await?;
        } else {
            self.pods
                .patch(&self.pod, &params, &Patch::Merge(set(None)))
                .await?;
        }
        Ok(())
    }
}

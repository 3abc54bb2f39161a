//! Leader election on a `coordination.k8s.io/v1` Lease.
//!
//! The holder renews every retry interval (as client-go's `retryPeriod`: ~2 s for a 15 s lease),
//! and retries a failed round at once, so one hung call still leaves time for others before
//! the renew deadline — stepping down drops every sidecar's session. Others poll as often and
//! take the lease
//! once they have seen it unchanged (same holder, `renewTime` and `resourceVersion`) for
//! `leaseDurationSeconds` by their own clock, or it was released. Another replica's
//! `renewTime` is never compared with the local clock: clocks of two nodes may disagree by
//! more than a lease. Every write is a `replace` carrying the `resourceVersion` that was read,
//! so two candidates can never both win: the API server rejects the slower one with a
//! conflict. Every round is bounded by a timeout that ends before the renew deadline, so a
//! leader that cannot renew for 2/3 of the lease duration stops leading, even when the API
//! server stops answering, before anyone else may start.

use std::time::Duration;

use tokio::time::Instant;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
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
    /// Interval between renewals by the holder, and between attempts by a non-holder.
    pub fn retry_interval(&self) -> Duration {
        (self.lease_duration / 7).clamp(Duration::from_millis(200), Duration::from_secs(2))
    }

    /// A leader that has not renewed for this long steps down.
    pub fn renew_deadline(&self) -> Duration {
        self.lease_duration * 2 / 3
    }

    /// One round (read, then write) gets at most this long: a renewal that starts on time
    /// (`retry_interval`) and a retry at once after it failed both end before the
    /// `renew_deadline`.
    pub fn round_timeout(&self) -> Duration {
        self.lease_duration / 5
    }
}

/// Why a round failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("lease request failed: {0}")]
    Api(#[from] kube::Error),
    #[error("no answer from the API server within {0:?}")]
    Timeout(Duration),
    #[error("not renewed within the renew deadline; stepping down")]
    DeadlinePassed,
}

/// Another replica's lease as this replica last saw it, and since when (local clock).
#[derive(Debug)]
struct Observed {
    key: (Option<String>, Option<MicroTime>, Option<String>),
    since: Instant,
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
    observed: Option<Observed>,
}

impl LeaderElector {
    /// Elector for `cfg` using `client`.
    pub fn new(client: Client, cfg: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
            last_renew: None,
            observed: None,
        }
    }

    /// Settings.
    pub fn config(&self) -> &LeaseConfig {
        &self.cfg
    }

    /// When we last renewed successfully (`None` when we do not hold the lease).
    pub fn last_renew(&self) -> Option<Instant> {
        self.last_renew
    }

    /// How long a leader still leads without renewing: until `renew_deadline` after its last
    /// renewal (`None` when it does not lead).
    pub fn time_left(&self) -> Option<Duration> {
        self.last_renew
            .map(|t| self.cfg.renew_deadline().saturating_sub(t.elapsed()))
    }

    /// One round: create, renew or take over the lease if we may; never longer than
    /// [`LeaseConfig::round_timeout`], and for a leader never past its renew deadline.
    pub async fn try_acquire_or_renew(&mut self) -> Result<Round, LeaseError> {
        let budget = match self.time_left() {
            Some(left) if left.is_zero() => {
                // Too late to renew first: step down now, try again as a candidate next time.
                self.last_renew = None;
                return Err(LeaseError::DeadlinePassed);
            }
            Some(left) => self.cfg.round_timeout().min(left),
            None => self.cfg.round_timeout(),
        };
        let round = tokio::time::timeout(budget, self.round()).await;
        let round = match round {
            Ok(round) => round.map_err(LeaseError::Api),
            Err(_) => Err(LeaseError::Timeout(budget)),
        };
        if let Ok(Round::Following(_)) = round {
            self.last_renew = None;
        }
        round
    }

    /// Whether another replica's lease has expired, judged only by how long this replica has
    /// seen it unchanged.
    fn expired(&mut self, lease: &Lease, holder: &Option<String>, duration: Duration) -> bool {
        let spec = lease.spec.as_ref();
        let renewed = spec.and_then(|s| s.renew_time.clone());
        if holder.is_none() || renewed.is_none() {
            // Released (or never held).
            return true;
        }
        let key = (
            holder.clone(),
            renewed,
            lease.metadata.resource_version.clone(),
        );
        let now = Instant::now();
        match &self.observed {
            Some(seen) if seen.key == key => now.duration_since(seen.since) >= duration,
            _ => {
                self.observed = Some(Observed { key, since: now });
                false
            }
        }
    }

    fn duration_secs(&self) -> i32 {
        i32::try_from(self.cfg.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    async fn round(&mut self) -> Result<Round, kube::Error> {
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
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs)
                .unwrap_or(self.cfg.lease_duration);
            if !self.expired(&lease, &holder, duration) {
                return Ok(Round::Following(holder));
            }
            let spec = lease.spec.get_or_insert_with(Default::default);
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

    /// Give the lease up (on shutdown) so another replica takes over at once; bounded by the
    /// round timeout (an unanswered release only means the others wait for expiry).
    pub async fn release(&mut self) {
        let budget = self.cfg.round_timeout();
        if tokio::time::timeout(budget, self.give_up()).await.is_err() {
            warn!(timeout = ?budget, "releasing the lease timed out");
        }
        self.last_renew = None;
    }

    async fn give_up(&mut self) {
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

    /// Brings the label in line with `leading`, waiting at most `timeout`; cheap when nothing
    /// changed. Errors are logged and retried on the next call.
    pub async fn sync(&mut self, leading: bool, timeout: Duration) {
        if self.applied == Some(leading) {
            return;
        }
        let written = tokio::time::timeout(timeout, self.write(leading))
            .await
            .unwrap_or_else(|_| {
                Err(kube::Error::Service(
                    format!("no answer within {timeout:?}").into(),
                ))
            });
        match written {
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

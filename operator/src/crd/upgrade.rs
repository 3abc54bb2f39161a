//! The operator keeps the stored `AgentGateway` CRD current (`--manage-crd`, on in the chart).
//! Helm installs a chart's `crds/` once and never upgrades them, and the apiserver prunes
//! fields its stored schema does not know: after `helm upgrade` a field the new version added
//! would silently vanish from every gateway. At start the operator replaces the stored CRD's
//! spec with its own when the stored one carries an older [`SCHEMA_REVISION`] (none: older
//! still) — never a newer one, so the old replicas of a rolling upgrade cannot undo it.
//!
//! It needs `get` and `update` on this one CRD (the chart's ClusterRole names it); it never
//! creates it: a missing CRD is installed by the chart or `kubectl apply -f crds/`.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::PostParams;
use kube::{Api, Client};

/// Bumped with every change of the CRD's schema (the test below says when); stored in the
/// CRD's [`REVISION_ANNOTATION`].
pub const SCHEMA_REVISION: u32 = 2;
/// crc32 of the CRD's spec at [`SCHEMA_REVISION`] (what the test compares).
#[cfg(test)]
const SCHEMA_FINGERPRINT: u32 = 4_115_688_363;
/// Annotation on the CRD naming the schema revision it was written from.
pub const REVISION_ANNOTATION: &str = "nanogate.io/schema-revision";
/// The CRD's name.
pub const CRD_NAME: &str = "agentgateways.nanogate.io";

/// What [`upgrade`] found and did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The stored CRD was of revision `from` (0: older than revisions) and now is ours.
    Upgraded { from: u32 },
    /// Already ours.
    Current,
    /// A newer operator wrote it; left alone.
    Newer(u32),
    /// Not installed.
    Missing,
}

/// The revision a stored CRD was written from (0: before revisions, or unreadable).
fn stored_revision(crd: &CustomResourceDefinition) -> u32 {
    crd.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REVISION_ANNOTATION))
        .and_then(|r| r.trim().parse().ok())
        .unwrap_or(0)
}

/// Replaces the stored CRD's spec with this operator's when it is older (see the module docs).
pub async fn upgrade(client: &Client) -> kube::Result<Outcome> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let Some(mut stored) = api.get_opt(CRD_NAME).await? else {
        return Ok(Outcome::Missing);
    };
    let from = stored_revision(&stored);
    if from > SCHEMA_REVISION {
        return Ok(Outcome::Newer(from));
    }
    let ours = super::crd();
    if from == SCHEMA_REVISION && stored.spec == ours.spec {
        return Ok(Outcome::Current);
    }
    // A replace carrying the stored resourceVersion: a concurrent writer makes it fail (and
    // the next start try again) instead of being overwritten.
    stored.spec = ours.spec;
    stored
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(REVISION_ANNOTATION.into(), SCHEMA_REVISION.to_string());
    stored.status = None;
    api.replace(CRD_NAME, &PostParams::default(), &stored)
        .await?;
    Ok(Outcome::Upgraded { from })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_revision_is_bumped_with_the_schema() {
        let spec = serde_json::to_vec(&super::super::crd().spec).unwrap();
        let fingerprint = crc32fast::hash(&spec);
        assert_eq!(
            fingerprint,
            SCHEMA_FINGERPRINT,
            "the CRD's schema changed: set SCHEMA_REVISION to {} and SCHEMA_FINGERPRINT to {fingerprint} in operator/src/crd/upgrade.rs, so running operators upgrade the stored CRD",
            SCHEMA_REVISION + 1
        );
    }

    #[test]
    fn the_stored_revision_is_read_from_the_annotation() {
        let mut crd = super::super::crd();
        assert_eq!(stored_revision(&crd), SCHEMA_REVISION);
        crd.metadata.annotations = None;
        assert_eq!(stored_revision(&crd), 0, "a CRD from before revisions");
    }
}

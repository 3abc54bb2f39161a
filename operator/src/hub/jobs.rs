//! Run-to-completion pods in legacy mode (no native sidecars): the sidecar is a regular
//! container, so the pod — and its Job — would run forever after the apps finished. The
//! webhook marks such sidecars (`NANOGATE_EXIT_WHEN_APPS_DONE=true`, the app containers in
//! `NANOGATE_APP_CONTAINERS`); this task watches pods and, once every listed app container has
//! terminated, sends the pod's agent `drain`: it stops accepting, delivers what it holds and
//! exits 0, and the Job completes. A deleted pod's session is ended here too.
//!
//! Pods come from the operator's one pod watch ([`crate::pods`], metadata only); only the pods
//! whose injection record says their sidecar awaits its apps are read whole.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Api, Client};
use tracing::{info, warn};

use super::Hub;
use crate::gateway::membership::InjectedRecord;
use crate::names::{APP_CONTAINERS_ENV, EXIT_WHEN_APPS_DONE_ENV, SIDECAR_NAME};
use crate::pods::{PodEvent, PodWatch};
use crate::shutdown::Shutdown;

/// A drain is re-sent at most this often per pod (the agent may be reconnecting).
const RESEND: Duration = Duration::from_secs(10);

/// The app containers whose end the pod's sidecar waits for, when the webhook asked for it.
fn awaited_apps(pod: &Pod) -> Option<Vec<String>> {
    let spec = pod.spec.as_ref()?;
    let sidecar = spec.containers.iter().find(|c| c.name == SIDECAR_NAME)?;
    let env = sidecar.env.as_ref()?;
    let value = |name: &str| {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    };
    if value(EXIT_WHEN_APPS_DONE_ENV).as_deref() != Some("true") {
        return None;
    }
    let apps = value(APP_CONTAINERS_ENV)?;
    Some(
        apps.split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect(),
    )
}

/// Whether `pod`'s sidecar should leave now: it waits for apps, and every one has terminated.
pub fn apps_done(pod: &Pod) -> bool {
    let Some(apps) = awaited_apps(pod) else {
        return false;
    };
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref());
    let terminated = |name: &str| {
        statuses.is_some_and(|all| {
            all.iter()
                .any(|c| c.name == name && c.state.as_ref().is_some_and(|s| s.terminated.is_some()))
        })
    };
    !apps.is_empty() && apps.iter().all(|a| terminated(a))
}

/// Whether a pod's metadata says its sidecar may wait for its apps: injected in legacy mode,
/// and the injection record says so (or is from an operator that did not say).
fn may_await_apps(pod: &ObjectMeta) -> bool {
    InjectedRecord::of(pod.annotations.as_ref())
        .is_some_and(|record| record.mode == "legacy" && record.awaits_apps != Some(false))
}

/// Follows the operator's pod watch until `shutdown`: ends the sessions of deleted pods, and
/// drains the sidecars whose apps are done (leader only: the agents are connected to it). Only
/// pods that [`may_await_apps`] are fetched whole, to read their containers' states.
pub async fn run(client: Client, pods: PodWatch, hub: Arc<Hub>, mut shutdown: Shutdown) {
    let mut sent: HashMap<String, Instant> = HashMap::new();
    let mut events = pods.subscribe();
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            _ = shutdown.wait() => return,
        };
        let meta = match event {
            Some(PodEvent::Applied(pod)) => pod,
            // A deleted pod's session ends (its sidecar normally left already; one that did not,
            // e.g. on a node cut off from the API server, must not report for it).
            Some(PodEvent::Deleted(pod)) => {
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    hub.send_away(uid, "pod deleted");
                }
                continue;
            }
            None => return,
        };
        if !hub.is_leading() || !may_await_apps(&meta.metadata) {
            continue;
        }
        let (Some(agent), Some(ns), Some(name)) = (
            meta.metadata.uid.clone(),
            meta.metadata.namespace.as_deref(),
            meta.metadata.name.clone(),
        ) else {
            continue;
        };
        let now = Instant::now();
        if sent
            .get(&agent)
            .is_some_and(|at| now.duration_since(*at) < RESEND)
        {
            continue;
        }
        let pod = match Api::<Pod>::namespaced(client.clone(), ns)
            .get_opt(&name)
            .await
        {
            Ok(Some(pod)) => pod,
            Ok(None) => continue,
            Err(error) => {
                warn!(pod = %name, %error, "cannot read a run-to-completion pod; its next change retries");
                continue;
            }
        };
        if !apps_done(&pod) {
            continue;
        }
        sent.insert(agent.clone(), now);
        sent.retain(|_, at| now.duration_since(*at) < RESEND * 6);
        let hub = hub.clone();
        tokio::spawn(async move {
            match hub
                .request(&agent, "drain", Vec::new(), Duration::from_secs(10))
                .await
            {
                Ok(_) => info!(pod = %name, "app containers finished; sidecar draining"),
                Err(error) => warn!(pod = %name, %error, "drain after the apps finished failed"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::INJECTED_ANNOTATION;
    use serde_json::json;

    fn pod(exit_when_done: bool, states: &[(&str, &str)]) -> Pod {
        let env = if exit_when_done {
            json!([{"name": EXIT_WHEN_APPS_DONE_ENV, "value": "true"},
                   {"name": APP_CONTAINERS_ENV, "value": "main,helper"}])
        } else {
            json!([])
        };
        let statuses: Vec<_> = states
            .iter()
            .map(|(name, state)| json!({"name": name, "ready": false, "restartCount": 0,
                "image": "x", "imageID": "", "state": {*state: if *state == "terminated" {json!({"exitCode": 0})} else {json!({})}}}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": "job-pod", "uid": "u1"},
            "spec": {"containers": [
                {"name": SIDECAR_NAME, "env": env},
                {"name": "main"}, {"name": "helper"}]},
            "status": {"containerStatuses": statuses}
        }))
        .unwrap()
    }

    #[test]
    fn drains_only_when_every_awaited_app_terminated() {
        assert!(!apps_done(&pod(true, &[])), "no status yet");
        assert!(!apps_done(&pod(
            true,
            &[("main", "terminated"), ("helper", "running")]
        )));
        assert!(apps_done(&pod(
            true,
            &[
                ("main", "terminated"),
                ("helper", "terminated"),
                (SIDECAR_NAME, "running")
            ]
        )));
        assert!(
            !apps_done(&pod(
                false,
                &[("main", "terminated"), ("helper", "terminated")]
            )),
            "a long-running pod's sidecar is never drained"
        );
    }

    #[test]
    fn only_legacy_pods_whose_record_may_await_apps_are_read_whole() {
        let meta = |record: Option<&str>| ObjectMeta {
            annotations: record.map(|r| [(INJECTED_ANNOTATION.to_string(), r.to_string())].into()),
            ..ObjectMeta::default()
        };
        let awaits = r#"{"gateway":"g","generation":1,"mode":"legacy","awaitsApps":true}"#;
        let long_running = r#"{"gateway":"g","generation":1,"mode":"legacy","awaitsApps":false}"#;
        let older = r#"{"gateway":"g","generation":1,"mode":"legacy"}"#;
        let native = r#"{"gateway":"g","generation":1,"mode":"native"}"#;
        assert!(may_await_apps(&meta(Some(awaits))));
        assert!(
            may_await_apps(&meta(Some(older))),
            "an older operator's record does not say"
        );
        assert!(!may_await_apps(&meta(Some(long_running))));
        assert!(
            !may_await_apps(&meta(Some(native))),
            "the kubelet ends native sidecars"
        );
        assert!(!may_await_apps(&meta(None)), "not injected");
    }
}

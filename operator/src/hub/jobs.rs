//! Run-to-completion pods in legacy mode (no native sidecars): the sidecar is a regular
//! container, so the pod — and its Job — would run forever after the apps finished. The
//! webhook marks such sidecars (`NANOGATE_EXIT_WHEN_APPS_DONE=true`, the app containers in
//! `NANOGATE_APP_CONTAINERS`); this task watches pods and, once every listed app container has
//! terminated, sends the pod's agent `drain`: it stops accepting, delivers what it holds and
//! exits 0, and the Job completes. A deleted pod's session is ended here too.
//!
//! Only injected pods are watched (label `nanogate.io/injected-gateway`, selected by the API
//! server): the only ones with a sidecar to drain or a session to end (the hub admits an agent
//! only from a pod carrying that label), so the watch grows with our pods, not the cluster's.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;
use kube::{Api, Client};
use tracing::{info, warn};

use super::Hub;
use crate::names::{
    APP_CONTAINERS_ENV, EXIT_WHEN_APPS_DONE_ENV, INJECTED_GATEWAY_LABEL, SIDECAR_NAME,
};
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

/// Watches injected pods until `shutdown`; drains the sidecars whose apps are done (leader only: the
/// agents are connected to it).
pub async fn run(client: Client, hub: Arc<Hub>, mut shutdown: Shutdown) {
    let mut sent: HashMap<String, Instant> = HashMap::new();
    let pods = watcher(
        Api::<Pod>::all(client),
        watcher::Config::default().labels(INJECTED_GATEWAY_LABEL),
    );
    let mut pods = std::pin::pin!(pods);
    loop {
        let event = tokio::select! {
            event = pods.next() => event,
            _ = shutdown.wait() => return,
        };
        let pod = match event {
            Some(Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod))) => pod,
            // A deleted pod's session ends (its sidecar normally left already; one that did not,
            // e.g. on a node cut off from the API server, must not report for it).
            Some(Ok(watcher::Event::Delete(pod))) => {
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    hub.send_away(uid, "pod deleted");
                }
                continue;
            }
            Some(Ok(_)) => continue,
            Some(Err(error)) => {
                warn!(%error, "pod watch for run-to-completion sidecars failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            None => return,
        };
        if !hub.is_leading() || !apps_done(&pod) {
            continue;
        }
        let Some(agent) = pod.metadata.uid.clone() else {
            continue;
        };
        let now = Instant::now();
        if sent
            .get(&agent)
            .is_some_and(|at| now.duration_since(*at) < RESEND)
        {
            continue;
        }
        sent.insert(agent.clone(), now);
        sent.retain(|_, at| now.duration_since(*at) < RESEND * 6);
        let (hub, name) = (hub.clone(), pod.metadata.name.clone().unwrap_or_default());
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
}

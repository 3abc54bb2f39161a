//! Admission decisions as Kubernetes events, recorded off the admission path.

use kube::Client;
use tracing::warn;

use super::InjectionOutcome;

/// `Injected` and `InjectionSkipped` (for skips worth a user's attention) events on the pod's
/// owner — the ReplicaSet or Job the user can find — or on the pod itself. Best effort, off the
/// admission path; dry runs record nothing.
pub fn admission_events(client: Client) -> impl Fn(&InjectionOutcome) + Send + Sync + 'static {
    use k8s_openapi::api::core::v1::ObjectReference;
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let reporter = Reporter {
        controller: "nanogate-webhook".into(),
        instance: None,
    };
    let recorder = Recorder::new(client, reporter);
    move |outcome: &InjectionOutcome| {
        if outcome.dry_run {
            return;
        }
        let (type_, reason, note) = match &outcome.result {
            Ok(done) => (
                EventType::Normal,
                "Injected",
                format!(
                    "nano-agent injected for gateway {} (configuration generation {}, {} sidecar)",
                    done.gateway,
                    done.config_generation,
                    if done.native { "native" } else { "legacy" }
                ),
            ),
            Err(skip) if skip.is_notable() => {
                (EventType::Warning, "InjectionSkipped", skip.to_string())
            }
            Err(_) => return,
        };
        let reference = match &outcome.owner {
            Some(owner) => ObjectReference {
                api_version: Some(owner.api_version.clone()),
                kind: Some(owner.kind.clone()),
                name: Some(owner.name.clone()),
                namespace: Some(outcome.namespace.clone()),
                uid: Some(owner.uid.clone()),
                ..Default::default()
            },
            None => ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(outcome.pod_name.clone()),
                namespace: Some(outcome.namespace.clone()),
                ..Default::default()
            },
        };
        let recorder = recorder.clone();
        tokio::spawn(async move {
            let event = Event {
                type_,
                reason: reason.into(),
                note: Some(note),
                action: "Admit".into(),
                secondary: None,
            };
            if let Err(error) = recorder.publish(&event, &reference).await {
                warn!(%error, reason, "publishing admission event failed");
            }
        });
    }
}

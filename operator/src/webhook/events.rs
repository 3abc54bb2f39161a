//! Admission decisions as Kubernetes events, recorded off the admission path.
//!
//! At admission a pod is not stored yet: it has no UID, and a pod created by a controller has
//! no name either (the API server generates both after admission), and the API server may still
//! refuse it. So an event about a pod is recorded only once the pod exists, with its UID —
//! `kubectl describe pod` matches events on name, namespace and UID — and an `Injected` event
//! means a stored pod carries the sidecar. A pod without a name at admission cannot be found
//! afterwards; its decision goes to its owner (the ReplicaSet or Job) as `InjectionDecided`,
//! worded as what will happen, or `InjectionSkipped`.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::{Api, Client};
use tracing::{debug, warn};

use super::InjectionOutcome;
use crate::names::{INJECTED_ANNOTATION, INJECTION_SKIPPED_ANNOTATION};

/// How long the webhook looks for an admitted pod before concluding it was refused.
const AWAIT_POD: Duration = Duration::from_secs(15);
const AWAIT_POD_STEP: Duration = Duration::from_millis(250);

/// Where an admission event goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subject {
    /// The stored pod itself.
    Pod,
    /// The pod's owner, for a pod that had no name at admission.
    Owner,
}

/// The event (type, reason, note) for `outcome` on `subject`; `None` for routine skips.
pub fn admission_event(
    outcome: &InjectionOutcome,
    subject: Subject,
) -> Option<(EventType, &'static str, String)> {
    let mode = |native: bool| if native { "native" } else { "legacy" };
    match (&outcome.result, subject) {
        (Ok(done), Subject::Pod) => Some((
            EventType::Normal,
            "Injected",
            format!(
                "nano-agent injected for gateway {} (configuration generation {}, {} sidecar)",
                done.gateway,
                done.config_generation,
                mode(done.native)
            ),
        )),
        (Ok(done), Subject::Owner) => Some((
            EventType::Normal,
            "InjectionDecided",
            format!(
                "a new pod ({}…) will be injected with nano-agent for gateway {} (configuration generation {}, {} sidecar) if the API server admits it",
                outcome.pod_name,
                done.gateway,
                done.config_generation,
                mode(done.native)
            ),
        )),
        (Err(skip), Subject::Pod) if skip.is_notable() => Some((
            EventType::Warning,
            "InjectionSkipped",
            format!("nano-agent not injected: {skip}"),
        )),
        (Err(skip), Subject::Owner) if skip.is_notable() => Some((
            EventType::Warning,
            "InjectionSkipped",
            format!(
                "a new pod ({}…) gets no nano-agent: {skip}",
                outcome.pod_name
            ),
        )),
        (Err(_), _) => None,
    }
}

/// Records the admission decisions: on the pod once it is stored (see the module comment),
/// else on its owner. Best effort, off the admission path; dry runs record nothing.
pub fn admission_events(client: Client) -> impl Fn(&InjectionOutcome) + Send + Sync + 'static {
    let reporter = Reporter {
        controller: "nanogate-webhook".into(),
        instance: None,
    };
    let recorder = Recorder::new(client.clone(), reporter);
    move |outcome: &InjectionOutcome| {
        if outcome.dry_run {
            return;
        }
        let subject = if outcome.generated_name {
            Subject::Owner
        } else {
            Subject::Pod
        };
        let Some((type_, reason, note)) = admission_event(outcome, subject) else {
            return;
        };
        let event = crate::events::event(type_, reason, "Admit", note);
        let recorder = recorder.clone();
        let outcome = outcome.clone();
        let pods: Api<Pod> = Api::namespaced(client.clone(), &outcome.namespace);
        tokio::spawn(async move {
            let reference = match subject {
                Subject::Pod => match admitted_pod(&pods, &outcome).await {
                    Some(reference) => reference,
                    None => {
                        debug!(namespace = %outcome.namespace, pod = %outcome.pod_name, reason, "pod not stored after admission (refused?); no event");
                        return;
                    }
                },
                Subject::Owner => match &outcome.owner {
                    Some(owner) => ObjectReference {
                        api_version: Some(owner.api_version.clone()),
                        kind: Some(owner.kind.clone()),
                        name: Some(owner.name.clone()),
                        namespace: Some(outcome.namespace.clone()),
                        uid: Some(owner.uid.clone()),
                        ..Default::default()
                    },
                    None => return,
                },
            };
            if let Err(error) = recorder.publish(&event, &reference).await {
                warn!(%error, reason, "publishing admission event failed");
            }
        });
    }
}

/// The pod admitted in `outcome`, once the API server has stored it: created since the
/// decision and carrying the webhook's mark (the injected record, or the skip reason). `None`
/// when no such pod appears in time (the API server refused it).
async fn admitted_pod(pods: &Api<Pod>, outcome: &InjectionOutcome) -> Option<ObjectReference> {
    let mark = if outcome.result.is_ok() {
        INJECTED_ANNOTATION
    } else {
        INJECTION_SKIPPED_ANNOTATION
    };
    // Creation timestamps have whole seconds.
    let decided = Timestamp::now() - SignedDuration::from_secs(2);
    let deadline = tokio::time::Instant::now() + AWAIT_POD;
    while tokio::time::Instant::now() < deadline {
        if let Ok(Some(pod)) = pods.get_opt(&outcome.pod_name).await {
            let meta = &pod.metadata;
            let fresh = meta
                .creation_timestamp
                .as_ref()
                .is_some_and(|t| t.0 >= decided);
            let marked = meta
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(mark));
            if !(fresh && marked) {
                return None;
            }
            return Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: meta.name.clone(),
                namespace: meta.namespace.clone(),
                uid: meta.uid.clone(),
                ..Default::default()
            });
        }
        tokio::time::sleep(AWAIT_POD_STEP).await;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::{InjectedSummary, SkipReason};

    fn outcome(result: Result<InjectedSummary, SkipReason>) -> InjectionOutcome {
        InjectionOutcome {
            namespace: "apps".into(),
            pod_name: "shop-7d9f-".into(),
            generated_name: true,
            owner: None,
            dry_run: false,
            result,
        }
    }

    #[test]
    fn only_a_stored_pod_is_said_to_be_injected() {
        let done = outcome(Ok(InjectedSummary {
            gateway: "shop".into(),
            config_generation: 2,
            native: false,
        }));
        let (_, reason, note) = admission_event(&done, Subject::Owner).unwrap();
        assert_eq!(reason, "InjectionDecided");
        assert!(note.contains("will be injected"), "{note}");
        let (_, reason, _) = admission_event(&done, Subject::Pod).unwrap();
        assert_eq!(reason, "Injected");
    }

    #[test]
    fn routine_skips_record_nothing_and_notable_ones_say_why() {
        assert!(admission_event(&outcome(Err(SkipReason::OptedOut)), Subject::Pod).is_none());
        let invalid = outcome(Err(SkipReason::InvalidGateway {
            name: "shop".into(),
            reason: "spec.batching.flushInterval (0.1ms) rounds to 0ms".into(),
        }));
        let (type_, reason, note) = admission_event(&invalid, Subject::Pod).unwrap();
        assert_eq!((type_, reason), (EventType::Warning, "InjectionSkipped"));
        assert!(
            note.contains("is invalid (spec.batching.flushInterval"),
            "{note}"
        );
    }
}

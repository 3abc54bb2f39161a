//! The operator's one pod watch, shared by everything that follows pods: the controller (which
//! gateway a pod belongs to, `sidecars.notInjected`) and the hub (ends a deleted pod's session,
//! drains run-to-completion sidecars). A second watch would make the apiserver send every pod
//! event of the cluster twice.
//!
//! Pods are watched metadata only (labels, annotations and owners are all the operator reads
//! from a pod event; a full pod is several times the bytes to receive and decode) and without a
//! store, so a pod costs memory only while its event is handed on. Whoever needs more of a pod
//! fetches that one pod. Every subscriber gets every event in order; one that stops reading
//! is dropped.

use std::sync::{Arc, Mutex, OnceLock};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::core::PartialObjectMeta;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::mpsc;
use tracing::warn;

use crate::watch::TaskGuard;

/// What the watch says of a pod: its metadata (managed fields removed).
pub type PodMeta = PartialObjectMeta<Pod>;

/// One pod event.
#[derive(Clone, Debug)]
pub enum PodEvent {
    /// Created or changed (also every pod listed again after the watch restarted).
    Applied(Arc<PodMeta>),
    /// Deleted. A pod deleted while the watch was restarting is not reported.
    Deleted(Arc<PodMeta>),
}

impl PodEvent {
    /// The pod the event is about.
    pub fn pod(&self) -> &Arc<PodMeta> {
        match self {
            PodEvent::Applied(pod) | PodEvent::Deleted(pod) => pod,
        }
    }
}

type Subscribers = Arc<Mutex<Vec<mpsc::UnboundedSender<PodEvent>>>>;

/// The watch, started by its first subscriber; cheap to clone. It stops when the last clone is
/// dropped.
#[derive(Clone)]
pub struct PodWatch(Arc<Inner>);

struct Inner {
    api: Api<PodMeta>,
    subscribers: Subscribers,
    task: OnceLock<TaskGuard>,
}

impl PodWatch {
    /// The pods of `namespace` (`None`: of the whole cluster); nothing is watched until
    /// someone subscribes.
    pub fn new(client: Client, namespace: Option<&str>) -> Self {
        let api = match namespace {
            Some(ns) => Api::namespaced(client, ns),
            None => Api::all(client),
        };
        Self(Arc::new(Inner {
            api,
            subscribers: Subscribers::default(),
            task: OnceLock::new(),
        }))
    }

    /// Every event from now on, in order (the first subscriber starts the watch, whose initial
    /// list then reaches it as `Applied` events).
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<PodEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.0
            .subscribers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(tx);
        self.0.task.get_or_init(|| {
            // `Api<PartialObjectMeta<_>>`: kube asks the API server for metadata only.
            let events = watcher::watcher(
                self.0.api.clone(),
                watcher::Config::default().any_semantic(),
            )
            .default_backoff()
            .modify(|pod| pod.metadata.managed_fields = None);
            TaskGuard::new(tokio::spawn(forward(events, self.0.subscribers.clone())))
        });
        rx
    }
}

/// Hands every event of `events` to every subscriber until the watch ends.
async fn forward(
    events: impl futures::Stream<Item = Result<watcher::Event<PodMeta>, watcher::Error>>,
    subscribers: Subscribers,
) {
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                PodEvent::Applied(Arc::new(pod))
            }
            Ok(watcher::Event::Delete(pod)) => PodEvent::Deleted(Arc::new(pod)),
            Ok(watcher::Event::Init | watcher::Event::InitDone) => continue,
            Err(error) => {
                warn!(%error, "pod watch failed; retrying");
                continue;
            }
        };
        subscribers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .retain(|subscriber| subscriber.send(event.clone()).is_ok());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> PodMeta {
        let mut pod = PodMeta::default();
        pod.metadata.name = Some(name.into());
        pod
    }

    #[tokio::test]
    async fn every_subscriber_gets_every_event_in_order_and_a_gone_one_is_dropped() {
        let subscribers = Subscribers::default();
        let (tx, mut first) = mpsc::unbounded_channel();
        let (tx2, second) = mpsc::unbounded_channel();
        subscribers.lock().unwrap().extend([tx, tx2]);
        drop(second);
        let events = futures::stream::iter([
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(pod("a"))),
            Ok(watcher::Event::InitDone),
            Err(watcher::Error::NoResourceVersion),
            Ok(watcher::Event::Apply(pod("b"))),
            Ok(watcher::Event::Delete(pod("a"))),
        ]);
        forward(events, subscribers.clone()).await;
        let mut seen = Vec::new();
        while let Ok(event) = first.try_recv() {
            let kind = match event {
                PodEvent::Applied(_) => "applied",
                PodEvent::Deleted(_) => "deleted",
            };
            seen.push(format!(
                "{kind} {}",
                event.pod().metadata.name.as_deref().unwrap_or("")
            ));
        }
        assert_eq!(seen, ["applied a", "applied b", "deleted a"]);
        assert_eq!(
            subscribers.lock().unwrap().len(),
            1,
            "the closed subscriber is dropped"
        );
    }
}

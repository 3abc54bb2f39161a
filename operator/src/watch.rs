//! Reflector stores fed by a watch that restarts on errors (with the watcher's backoff): the
//! webhook's gateways and namespaces, the controller's opted-in namespaces, the status
//! writer's gateways.

use futures::StreamExt;
use kube::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tracing::warn;

/// A store of what `api` and `config` select, kept current by a background task that stops
/// when the returned guard is dropped (or runs for the process's life after
/// [`TaskGuard::detach`]). `what` names the watch in its error logs.
pub fn store<K>(api: Api<K>, config: watcher::Config, what: &'static str) -> (Store<K>, TaskGuard)
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, config)
        .default_backoff()
        .reflect(writer)
        .applied_objects();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Err(error) = event {
                warn!(%error, what, "watch failed; retrying");
            }
        }
    });
    (reader, TaskGuard::new(task))
}

/// Aborts a background task when dropped, unless detached.
pub struct TaskGuard(Option<tokio::task::JoinHandle<()>>);

impl TaskGuard {
    /// Aborts `task` when the guard is dropped.
    pub fn new(task: tokio::task::JoinHandle<()>) -> Self {
        Self(Some(task))
    }

    /// Lets the task run for as long as the process does.
    pub fn detach(mut self) {
        self.0 = None;
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

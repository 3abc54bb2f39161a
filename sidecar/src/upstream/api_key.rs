//! The platform API key, one handle for every transport, kept current while the agent runs.
//!
//! The injector mounts the gateway's API key Secret as a volume and points `TENDRL_KEY_FILE`
//! (`--api-key-file`) at the key's file. The kubelet refreshes a Secret volume in place when
//! the Secret changes (a new directory, then one rename of the `..data` symlink), so the file's
//! *content* is compared, never its mtime or inode. [`ApiKey::watch`] re-reads it every
//! `--api-key-reload-interval` and at once after the platform refused the key (401/403,
//! [`ApiKey::recheck_soon`]): a rotated Secret is used within that interval plus the kubelet's
//! own refresh delay, without a restart. `http` reads the key per request; `nats` and
//! `socketio` at each (re)connect, and reconnect when it changes ([`ApiKey::changed`]).
//!
//! `TENDRL_KEY` (the key as an environment variable, what pods injected before this file
//! existed carry) is the key until the file can be read; a file that cannot be read or is
//! empty keeps the last good key, with a warning: a Secret being edited must not take the key
//! away from running agents. The key itself is never logged.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

/// One key and its generation (counted from 0, +1 per reload). `Debug` hides the key.
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    pub secret: Arc<str>,
    pub generation: u64,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("generation", &self.generation)
            .field("empty", &self.secret.is_empty())
            .finish_non_exhaustive()
    }
}

/// What one look at the file found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// No file configured, or the same key as before.
    Unchanged,
    /// A new key, in use from now on.
    Reloaded,
    /// The file cannot be read or is empty: the last good key stays (the reason, no key).
    Kept(String),
}

/// The shared API key handle.
pub struct ApiKey {
    file: Option<PathBuf>,
    tx: watch::Sender<Key>,
    recheck: Notify,
    metrics: Option<Arc<Metrics>>,
    /// The last problem warned about, so a file that stays broken is warned about once.
    last_problem: Mutex<Option<String>>,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKey")
            .field("file", &self.file)
            .field("key", &*self.tx.borrow())
            .finish_non_exhaustive()
    }
}

impl ApiKey {
    /// A key that never changes (no file): tests, and agents run without a key file.
    pub fn fixed(secret: &str) -> Arc<Self> {
        Self::build(None, secret, None)
    }

    /// The agent's key: `api_key_file` when it is readable and not empty, else `api_key`
    /// (`TENDRL_KEY`). The first read is where the key comes from, not a reload.
    pub fn from_config(config: &Config, metrics: Arc<Metrics>) -> Arc<Self> {
        let mut initial = config.api_key.clone();
        if let Some(file) = &config.api_key_file {
            match read_key(file) {
                Ok(key) => {
                    tracing::info!(file = %file.display(), "API key read from its file");
                    initial = key;
                }
                Err(reason) => tracing::warn!(%reason,
                    "API key file unusable; using TENDRL_KEY until it can be read"),
            }
        }
        Self::build(config.api_key_file.clone(), &initial, Some(metrics))
    }

    fn build(file: Option<PathBuf>, secret: &str, metrics: Option<Arc<Metrics>>) -> Arc<Self> {
        let (tx, _) = watch::channel(Key {
            secret: Arc::from(secret),
            generation: 0,
        });
        Arc::new(Self {
            file,
            tx,
            recheck: Notify::new(),
            metrics,
            last_problem: Mutex::new(None),
        })
    }

    /// The key to send now.
    pub fn current(&self) -> Key {
        self.tx.borrow().clone()
    }

    /// The key's generation now.
    pub fn generation(&self) -> u64 {
        self.tx.borrow().generation
    }

    /// Resolves once the key's generation is no longer `since` (at once if it already is).
    pub async fn changed(&self, since: u64) {
        let mut rx = self.tx.subscribe();
        // The sender lives as long as `self`: this cannot fail while it is borrowed.
        let _ = rx.wait_for(|k| k.generation != since).await;
    }

    /// Asks [`ApiKey::watch`] to look at the file now (the platform refused the key: it may
    /// have been rotated).
    pub fn recheck_soon(&self) {
        self.recheck.notify_one();
    }

    /// Reads the file once; a different non-empty content becomes the key.
    pub fn reload(&self) -> Reload {
        let Some(file) = &self.file else {
            return Reload::Unchanged;
        };
        let outcome = match read_key(file) {
            Ok(text) => {
                let changed = self.tx.send_if_modified(|k| {
                    if *k.secret == *text {
                        return false;
                    }
                    k.secret = Arc::from(text.as_str());
                    k.generation += 1;
                    true
                });
                if changed {
                    Reload::Reloaded
                } else {
                    Reload::Unchanged
                }
            }
            Err(reason) => Reload::Kept(reason),
        };
        let mut last = self
            .last_problem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &outcome {
            Reload::Kept(reason) => {
                if last.as_ref() != Some(reason) {
                    tracing::warn!(%reason, generation = self.generation(),
                        "API key file unusable; keeping the last good key (TENDRL_KEY before any was read)");
                    *last = Some(reason.clone());
                }
            }
            Reload::Reloaded => {
                *last = None;
                tracing::info!(file = %file.display(), generation = self.generation(), "API key reloaded");
                if let Some(m) = &self.metrics {
                    m.api_key_reloads.inc();
                }
            }
            Reload::Unchanged => *last = None,
        }
        outcome
    }

    /// Re-reads the file every `every` and when [`ApiKey::recheck_soon`] asks, until `stop`.
    /// Without a file there is nothing to watch and it returns at once.
    pub async fn watch(self: Arc<Self>, every: Duration, stop: Shutdown) {
        if self.file.is_none() {
            return;
        }
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.recheck.notified() => {}
                _ = stop.triggered() => return,
            }
            let key = self.clone();
            // A small file on a tmpfs, but still a blocking read: off the async workers.
            if let Err(e) = tokio::task::spawn_blocking(move || key.reload()).await {
                tracing::error!(error = %e, "API key reload task failed");
            }
        }
    }
}

/// The key in `file`, without surrounding whitespace; an error (no key in it) when it cannot
/// be read, is not UTF-8 or holds only whitespace.
fn read_key(file: &std::path::Path) -> Result<String, String> {
    let bytes = std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let text = String::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8", file.display()))?;
    match text.trim() {
        "" => Err(format!("{} is empty", file.display())),
        key => Ok(key.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::path::Path;

    /// A Secret volume as the kubelet writes it: `..<n>/apiKey`, `..data -> ..<n>`,
    /// `apiKey -> ..data/apiKey`; a later call swaps `..data` in one rename.
    fn kubelet_write(dir: &Path, generation: u32, key: &str) {
        let name = format!("..gen_{generation}");
        std::fs::create_dir_all(dir.join(&name)).unwrap();
        std::fs::write(dir.join(&name).join("apiKey"), key).unwrap();
        let _ = std::fs::remove_file(dir.join("..data_tmp"));
        symlink(&name, dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        if std::fs::symlink_metadata(dir.join("apiKey")).is_err() {
            symlink("..data/apiKey", dir.join("apiKey")).unwrap();
        }
        if generation > 0 {
            std::fs::remove_dir_all(dir.join(format!("..gen_{}", generation - 1))).unwrap();
        }
    }

    /// A key file written the kubelet's way holding `first`, and the key read from it once:
    /// the directory, the key, its metrics and its generation after that read.
    fn read_once(first: &str) -> (tempfile::TempDir, Arc<ApiKey>, Arc<Metrics>, u64) {
        let dir = tempfile::tempdir().unwrap();
        kubelet_write(dir.path(), 0, first);
        let (key, metrics) = with_file(dir.path(), "");
        key.reload();
        let since = key.generation();
        (dir, key, metrics, since)
    }

    fn with_file(dir: &Path, env_key: &str) -> (Arc<ApiKey>, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let key = ApiKey::build(Some(dir.join("apiKey")), env_key, Some(metrics.clone()));
        (key, metrics)
    }

    #[test]
    fn a_symlink_swap_is_a_reload_and_the_same_content_is_not() {
        let dir = tempfile::tempdir().unwrap();
        kubelet_write(dir.path(), 0, "first\n");
        let (key, metrics) = with_file(dir.path(), "from-env");
        assert_eq!(
            key.reload(),
            Reload::Reloaded,
            "the file wins over TENDRL_KEY"
        );
        assert_eq!(
            &*key.current().secret,
            "first",
            "the trailing newline is not the key"
        );
        let generation = key.generation();

        // The kubelet re-writes the volume with the same content (new directory, new inode).
        kubelet_write(dir.path(), 1, "first");
        assert_eq!(key.reload(), Reload::Unchanged);
        assert_eq!(key.generation(), generation, "same content, no reload");

        kubelet_write(dir.path(), 2, "second");
        assert_eq!(key.reload(), Reload::Reloaded);
        assert_eq!(&*key.current().secret, "second");
        assert_eq!(key.generation(), generation + 1);
        assert_eq!(key.reload(), Reload::Unchanged, "read again: nothing new");
        assert_eq!(metrics.api_key_reloads.get(), 2);
    }

    #[test]
    fn an_emptied_or_removed_file_keeps_the_last_good_key() {
        let dir = tempfile::tempdir().unwrap();
        kubelet_write(dir.path(), 0, "good");
        let (key, metrics) = with_file(dir.path(), "");
        assert_eq!(key.reload(), Reload::Reloaded);

        kubelet_write(dir.path(), 1, " \n");
        assert!(matches!(key.reload(), Reload::Kept(r) if r.contains("empty")));
        assert_eq!(&*key.current().secret, "good");

        // The Secret's key gone from the volume: a dangling symlink.
        let data = std::fs::read_link(dir.path().join("..data")).unwrap();
        std::fs::remove_file(dir.path().join(data).join("apiKey")).unwrap();
        assert!(matches!(key.reload(), Reload::Kept(r) if r.contains("cannot read")));
        // Not UTF-8.
        kubelet_write(dir.path(), 2, "");
        let data = std::fs::read_link(dir.path().join("..data")).unwrap();
        std::fs::write(dir.path().join(data).join("apiKey"), [0xff, 0xfe]).unwrap();
        assert!(matches!(key.reload(), Reload::Kept(r) if r.contains("UTF-8")));
        assert_eq!(&*key.current().secret, "good");
        assert_eq!(metrics.api_key_reloads.get(), 1);

        // Fixed again: the new key is used.
        kubelet_write(dir.path(), 3, "better");
        assert_eq!(key.reload(), Reload::Reloaded);
        assert_eq!(&*key.current().secret, "better");
    }

    #[test]
    fn without_a_readable_file_at_start_the_environment_key_is_used() {
        let dir = tempfile::tempdir().unwrap();
        let (key, _) = with_file(dir.path(), "from-env");
        assert!(matches!(key.reload(), Reload::Kept(_)));
        assert_eq!(&*key.current().secret, "from-env");
        assert_eq!(key.generation(), 0);
        // No file configured at all: nothing to read, ever.
        let fixed = ApiKey::fixed("k");
        assert_eq!(fixed.reload(), Reload::Unchanged);
        assert!(!format!("{fixed:?}").contains("\"k\""), "{fixed:?}");
    }

    #[tokio::test]
    async fn the_watcher_picks_up_a_swap_on_its_own_tick() {
        let (dir, key, metrics, since) = read_once("one");
        let (stop_tx, stop) = crate::shutdown::channel();
        tokio::spawn(key.clone().watch(Duration::from_millis(100), stop));
        // Unchanged content over several ticks: no reload.
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(key.generation(), since);
        kubelet_write(dir.path(), 1, "two");
        tokio::time::timeout(Duration::from_secs(5), key.changed(since))
            .await
            .expect("the periodic re-read saw the new key");
        assert_eq!(&*key.current().secret, "two");
        // Counted just after the new key is published (the re-read may run on another
        // thread): give it a moment.
        for _ in 0..100 {
            if metrics.api_key_reloads.get() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            metrics.api_key_reloads.get(),
            2,
            "the first read and the swap"
        );
        stop_tx.trigger();
    }

    #[tokio::test]
    async fn the_watcher_rereads_on_its_tick_and_on_request() {
        let (dir, key, _, since) = read_once("one");
        let (stop_tx, stop) = crate::shutdown::channel();
        // A long interval: only the request makes it look again.
        let task = tokio::spawn(key.clone().watch(Duration::from_secs(3600), stop));
        tokio::time::sleep(Duration::from_millis(50)).await;
        kubelet_write(dir.path(), 1, "two");
        key.recheck_soon();
        tokio::time::timeout(Duration::from_secs(5), key.changed(since))
            .await
            .expect("the requested re-read saw the new key");
        assert_eq!(&*key.current().secret, "two");
        stop_tx.trigger();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }
}

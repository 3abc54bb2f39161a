//! The agent's one shutdown signal: a [`ShutdownTrigger`] fires it and every [`Shutdown`] made
//! from it sees it — the listeners and their connections, delivery's drain, the control
//! channel, the socketio connection and the background timers. `lib.rs` decides the order in
//! which the agent's signals fire; this file only carries them.

use tokio::sync::watch;

/// Fires the [`Shutdown`]s of its [`channel`]: on [`ShutdownTrigger::trigger`], or when every
/// clone of it is dropped, so a task cannot outlive the part that started it.
#[derive(Debug, Clone)]
pub struct ShutdownTrigger(watch::Sender<bool>);

/// Whether, and when, its trigger fired. Cheap to clone: each task that must stop holds one.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A trigger and the signal it fires, not fired yet.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    /// Fires the signal; firing it again changes nothing.
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }

    /// Another [`Shutdown`] of this trigger.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }
}

impl Shutdown {
    /// Whether the signal fired (or every trigger is gone).
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow() || self.0.has_changed().is_err()
    }

    /// Resolves once the signal fired (or every trigger is gone); at once if it already did.
    /// Cancel-safe, and holds no watch guard across an await, so the futures that `select!`
    /// on it stay `Send`.
    pub async fn triggered(&self) {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(|fired| *fired).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn every_clone_sees_the_trigger() {
        let (trigger, shutdown) = channel();
        let later = trigger.subscribe();
        assert!(!shutdown.is_triggered());
        let waiting = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { shutdown.triggered().await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiting.is_finished());
        trigger.trigger();
        waiting.await.unwrap();
        assert!(shutdown.is_triggered() && later.is_triggered());
        // Already fired: resolves at once, as often as asked.
        shutdown.triggered().await;
        later.triggered().await;
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_every_trigger_fires_it() {
        let (trigger, shutdown) = channel();
        let other = trigger.clone();
        drop(trigger);
        assert!(!shutdown.is_triggered(), "one trigger is still held");
        drop(other);
        assert!(shutdown.is_triggered());
        shutdown.triggered().await;
    }
}

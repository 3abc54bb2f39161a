//! The operator's one way to stop a task: every long-running part takes a [`Shutdown`] and
//! returns once it fires; its owner keeps the [`Trigger`]. Dropping the trigger fires it
//! too, so a task never outlives the code that started it.

use tokio::sync::watch;

/// Fires the [`Shutdown`]s made with it.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// Handed to a task; clone it for each task it starts.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<bool>);

/// A new trigger and the shutdown it fires.
pub fn channel() -> (Trigger, Shutdown) {
    let (fire, fired) = watch::channel(false);
    (Trigger(fire), Shutdown(fired))
}

impl Trigger {
    /// Tell every holder of the shutdown to stop.
    pub fn fire(&self) {
        let _ = self.0.send(true);
    }
}

impl Shutdown {
    /// Resolves once fired (or once the trigger is gone). Returns nothing, so no watch guard
    /// ends up inside a `select!` of a spawned task (it is not `Send`).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|fired| *fired).await;
    }

    /// [`Shutdown::wait`] as an owned future, for APIs that take one (servers, the controller).
    pub async fn fired(mut self) {
        self.wait().await
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn fires_every_clone_and_on_drop() {
        let (trigger, shutdown) = channel();
        let mut a = shutdown.clone();
        let waiting = tokio::spawn(async move { a.wait().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "nothing fired yet");
        trigger.fire();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();

        let (trigger, shutdown) = channel();
        drop(trigger);
        tokio::time::timeout(Duration::from_secs(5), shutdown.fired())
            .await
            .unwrap();
    }
}

//! Limits on connections before they are authenticated: a cap on all connections, and a cap on
//! handshakes in progress (TLS, AgentHello, TokenReview). When the handshake cap is reached the
//! oldest handshake is dropped to make room, so a flood of silent or slow peers cannot keep a
//! real agent, whose handshake takes milliseconds, from getting through.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::time::Instant;

use super::connection::Closed;

/// The hub's connection and handshake caps.
pub struct Admission {
    connections: Arc<Semaphore>,
    max_handshakes: usize,
    handshake_timeout: Duration,
    pending: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    next: u64,
    /// Handshakes in progress, oldest first; dropping a sender evicts that handshake.
    waiting: BTreeMap<u64, oneshot::Sender<()>>,
}

impl Admission {
    pub fn new(
        max_connections: usize,
        max_handshakes: usize,
        handshake_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            connections: Arc::new(Semaphore::new(
                max_connections.clamp(1, Semaphore::MAX_PERMITS),
            )),
            max_handshakes: max_handshakes.max(1),
            handshake_timeout,
            pending: Mutex::new(Pending::default()),
        })
    }

    /// A place for one more connection, or `None` when the connection cap is reached. The
    /// connection holds it until it closes.
    pub fn connection(&self) -> Option<OwnedSemaphorePermit> {
        self.connections.clone().try_acquire_owned().ok()
    }

    /// Starts a handshake, which must finish by its [`Handshake::deadline`]; the oldest one
    /// is dropped when the cap is reached.
    pub fn handshake(self: &Arc<Self>) -> Handshake {
        let (evict, evicted) = oneshot::channel();
        let mut pending = self.lock();
        if pending.waiting.len() >= self.max_handshakes {
            // Dropping the sender wakes that handshake's `interrupted()`.
            pending.waiting.pop_first();
        }
        let id = pending.next;
        pending.next += 1;
        pending.waiting.insert(id, evict);
        drop(pending);
        Handshake {
            id,
            admission: self.clone(),
            evicted,
            deadline: Instant::now() + self.handshake_timeout,
        }
    }

    /// Handshakes in progress.
    pub fn handshakes(&self) -> usize {
        self.lock().waiting.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One handshake in progress; it leaves the count when dropped (finished or failed).
pub struct Handshake {
    id: u64,
    admission: Arc<Admission>,
    evicted: oneshot::Receiver<()>,
    deadline: Instant,
}

impl Handshake {
    /// When the whole handshake (TLS, AgentHello, authentication) must be done.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Resolves when this handshake was dropped to make room for a newer one, or its
    /// deadline passed; says which.
    pub async fn interrupted(&mut self) -> Closed {
        tokio::select! {
            // The sender is never used to send: only its drop (eviction) ends the wait.
            _ = &mut self.evicted => Closed::Evicted,
            () = tokio::time::sleep_until(self.deadline) => Closed::HandshakeTimeout,
        }
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        self.admission.lock().waiting.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_handshake_makes_room_and_finished_ones_leave() {
        let admission = Admission::new(10, 2, Duration::from_secs(10));
        let mut first = admission.handshake();
        let second = admission.handshake();
        assert_eq!(admission.handshakes(), 2);
        let _third = admission.handshake();
        assert_eq!(admission.handshakes(), 2, "the cap of 2 holds");
        // The first one was told.
        assert_eq!(
            first.evicted.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        );
        drop(second);
        assert_eq!(admission.handshakes(), 1);
        drop(first);
        assert_eq!(admission.handshakes(), 1);
    }

    #[test]
    fn connections_are_capped() {
        let admission = Admission::new(2, 2, Duration::from_secs(10));
        let a = admission.connection();
        let b = admission.connection();
        assert!(a.is_some() && b.is_some());
        assert!(admission.connection().is_none());
        drop(a);
        assert!(admission.connection().is_some());
    }
}

//! Where messages enter the agent: the app socket ([`unix`], the Tendrl socket protocol) and
//! the optional TCP listener ([`tcp`], newline-delimited JSON frames). Both validate with the
//! same limits, stamp the same `source` and append to the spool in one write per read — the
//! moment a message is accepted — before they answer.

pub mod empty_check;
pub mod socket_file;
pub mod tcp;
pub mod unix;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A connection slot under `limit` (further peers wait in the kernel's accept backlog instead
/// of costing memory here), or `None` once `stopping` resolves and the listener stops
/// accepting.
async fn connection_slot(
    limit: &Arc<Semaphore>,
    stopping: Pin<&mut impl Future<Output = ()>>,
) -> Option<OwnedSemaphorePermit> {
    tokio::select! {
        permit = limit.clone().acquire_owned() => permit.ok(),
        _ = stopping => None,
    }
}

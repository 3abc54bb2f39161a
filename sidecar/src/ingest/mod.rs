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

use nanogate_protocol::app::Stamp;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What stamping adds to the messages of one read (made once per read, not per message): now
/// (RFC 3339, milliseconds) and `source`.
fn stamp(source: &str) -> Stamp {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    Stamp::new(&now, source)
}

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

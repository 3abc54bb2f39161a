//! Durable on-disk write-ahead queue.
//!
//! A message is accepted only once its record has been written to the current segment file
//! (so a crash of the process cannot lose it: it is in the kernel's page cache; `fsync` every
//! `sync_interval` bounds what a machine crash can lose). It leaves the spool only when the
//! platform acknowledged the batch that carried it: the reader's position is persisted in the
//! `ack` file after every delivered batch (in order: delivery acks a batch only once every
//! earlier one is done, however many are in flight), and segments wholly before it are deleted.
//!
//! Layout of `<dir>`:
//! - `seg-<20-digit seq>.log`: `NGSPOOL1` magic, then records `[len u32 LE][crc32 u32 LE][payload]`.
//!   A payload is never empty: a zero length marks corruption (a zeroed region, such as a hole
//!   or a preallocated tail, would otherwise read as endless valid empty records, since the
//!   crc32 of nothing is 0).
//! - `ack`: `[seq u64 LE][offset u64 LE][crc32 u32 LE]`, replaced atomically (write + rename).
//! - `id`: a random identifier of this spool, made when the directory is first used.
//!
//! Every record has a stable id, `<spool id>-<segment seq>-<offset>`: records are never moved
//! or rewritten, segment numbers are never reused, so a message keeps its id across retries
//! and restarts (transports that de-duplicate, like NATS `Nats-Msg-Id`, rely on it), and a new
//! spool directory (a new pod) cannot collide with an old one.
//!
//! The spool never writes a hole: an append is written at the writer's known end with a
//! positional write (no file cursor that a short write could leave past it), and an append
//! that fails (ENOSPC, EDQUOT, any error part-way) is cut back off the file before the writer
//! goes on, so a segment is always its magic followed by whole, accepted records. (Should the
//! cut fail as well, the failed append's first header is zeroed, which recovery treats as
//! corruption, and the next append retries the cut before it writes anything.)
//!
//! Segments are fsync'ed by the periodic sync, not when the writer moves on to a new one, so
//! an append never waits for a whole segment to reach the disk (that wait cost ingest a quarter
//! of its throughput); a machine crash can therefore tear the tails of every segment written
//! during the last `sync_interval`, not only the current one.
//!
//! When the spool is full, an append is refused (`AppendError::Full`: the sender is told
//! "queue full") — or, with [`Overflow::DropOldest`], the oldest records nobody has read yet
//! are dropped to make room: the spool's floor moves past them, wholly dropped segments are
//! deleted, and the hook set with [`Spool::on_drop`] counts them. Records the reader holds
//! (the batches being delivered) are never dropped. The ack after a drop persists the floor, so a
//! restart does not bring dropped records back (one before that ack may: they are delivered
//! after all).
//!
//! Recovery scans the unacknowledged segments, truncates each at its first torn or corrupt
//! record (a process crash mid-write leaves at most one torn record at the tail) and starts a
//! fresh segment for new writes. Duplicates after a crash come only from the batches in flight:
//! delivered (some of them) but not yet acknowledged.
//!
//! Files, by what they own: `format.rs` (segment, record, `ack` and `id` file formats),
//! `writer.rs` (appends, rotation, fsync), `overflow.rs` (a full spool: reject or drop the
//! oldest), `reader.rs` (batches and acks), `recovery.rs` (start-up), `model_tests.rs` (the
//! model-based test of all of them). This file holds the [`Spool`] they share.

// Nothing read from a file or handed in by a caller may panic the agent.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

mod format;
#[cfg(test)]
mod model_tests;
mod overflow;
mod reader;
mod recovery;
#[cfg(test)]
mod test_support;
mod writer;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

pub use format::RecordBuf;
pub use overflow::{Dropped, Overflow};
pub use reader::{PendingBatch, RecordRef, SpoolReader};
pub use recovery::RecoveryReport;

/// Mode of a spool directory the agent creates: the agent's alone. In a pod the spool shares
/// the socket's volume with the app containers, and the socket is open to all of them
/// (`SOCKET_MODE` of the ingest); what the spool holds (every app's accepted messages,
/// dead letters) is not theirs to read or change.
pub const SPOOL_DIR_MODE: u32 = 0o700;

/// A place in the spool: segment sequence number and byte offset within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub seq: u64,
    pub offset: u64,
}

/// Locks `m`; a panic elsewhere while it was held does not take the spool down with it (the
/// writer's state only changes after the I/O it describes succeeded).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Takes `n` from a pending counter, never below zero.
fn release(counter: &AtomicU64, n: u64) {
    let _ = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
        Some(v.saturating_sub(n))
    });
}

#[derive(Debug, Clone)]
pub struct SpoolOptions {
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub segment_bytes: u64,
    /// Zero: fsync on every append.
    pub sync_interval: Duration,
    /// What an append does when the spool is full.
    pub overflow: Overflow,
}

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("spool full")]
    Full,
    #[error("spool write failed: {0}")]
    Io(#[from] io::Error),
}

/// Where the unread records begin.
#[derive(Debug, Clone, Copy)]
struct Head {
    /// Records before it were dropped ([`Overflow::DropOldest`]); readers skip to it.
    floor: Position,
    /// How far readers have read: the records before it are theirs (in flight or acked).
    read: Position,
    /// Segments below it that drops deleted (or found deleted): not looked at again.
    swept: u64,
}

pub struct Spool {
    opts: SpoolOptions,
    /// Held while a reader reads and while an append drops: a drop never takes records a
    /// reader is taking at the same time. Taken before `writer`, never after.
    head: Mutex<Head>,
    /// Records dropped since the spool was opened.
    dropped_msgs: AtomicU64,
    on_drop: std::sync::OnceLock<Box<dyn Fn(Dropped) + Send + Sync>>,
    /// One writer for all connections: appends are short (one `write` of a prepared buffer),
    /// so a plain mutex is cheaper than routing every message through a channel and a task.
    writer: Mutex<writer::Writer>,
    oldest_seq: Mutex<u64>,
    pending_bytes: AtomicU64,
    pending_msgs: AtomicU64,
    /// Wakes the single reader (the delivery loop) after an append; `notify_one` stores a
    /// permit when the reader is busy, so no wake-up is lost.
    notify: Notify,
    start: Position,
    report: RecoveryReport,
    id: String,
    /// I/O failures to inject (tests only: the hot path has no hook outside tests).
    #[cfg(test)]
    faults: Mutex<Faults>,
}

/// Failures the tests make the spool's I/O report, each taken by the next operation it names.
#[cfg(test)]
#[derive(Debug, Default)]
struct Faults {
    /// The next record write stores only this many bytes of its buffer, then fails with
    /// ENOSPC (a short `write`, then no space for the rest).
    short_write: Option<usize>,
    /// How many of the next truncations of a segment fail.
    set_len: u32,
    /// How many of the next fsyncs of an append (`sync_interval` zero) fail.
    sync: u32,
    /// How many of the next acks fail to persist.
    ack: u32,
}

/// Takes one of `count` pending injected failures.
#[cfg(test)]
fn take_fault(count: &mut u32) -> bool {
    let fail = *count > 0;
    *count = count.saturating_sub(1);
    fail
}

impl Spool {
    pub fn pending_msgs(&self) -> u64 {
        self.pending_msgs.load(Ordering::Relaxed)
    }

    pub fn pending_bytes(&self) -> u64 {
        self.pending_bytes.load(Ordering::Relaxed)
    }

    pub fn dir(&self) -> &Path {
        &self.opts.dir
    }

    /// This spool's random id, the first part of every record's stable id.
    pub fn id(&self) -> &str {
        &self.id
    }
}

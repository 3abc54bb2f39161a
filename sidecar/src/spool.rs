//! Durable on-disk write-ahead queue.
//!
//! A message is accepted only once its record has been written to the current segment file
//! (so a crash of the process cannot lose it: it is in the kernel's page cache; `fsync` every
//! `sync_interval` bounds what a machine crash can lose). It leaves the spool only when the
//! platform acknowledged the batch that carried it: the reader's position is persisted in the
//! `ack` file after every delivered batch, and segments wholly before it are deleted.
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
//! (the batch being delivered) are never dropped. The ack after a drop persists the floor, so a
//! restart does not bring dropped records back (one before that ack may: they are delivered
//! after all).
//!
//! Recovery scans the unacknowledged segments, truncates each at its first torn or corrupt
//! record (a process crash mid-write leaves at most one torn record at the tail) and starts a
//! fresh segment for new writes. Duplicates after a crash come only from the batch in flight: it was
//! delivered but its ack not yet written.

// Nothing read from a file or handed in by a caller may panic the agent.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt as _, FileExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

/// Mode of a spool directory the agent creates: the agent's alone. In a pod the spool shares
/// the socket's volume with the app containers, and the socket is open to all of them
/// (`SOCKET_MODE` of the ingest); what the spool holds (every app's accepted messages,
/// dead letters) is not theirs to read or change.
pub const SPOOL_DIR_MODE: u32 = 0o700;

const MAGIC: &[u8; 8] = b"NGSPOOL1";
const SEG_HEADER: u64 = MAGIC.len() as u64;
const REC_HEADER: usize = 8;
/// How much the reader pulls from a segment per read call.
const READ_CHUNK: u64 = 256 * 1024;

/// A place in the spool: segment sequence number and byte offset within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub seq: u64,
    pub offset: u64,
}

/// A record header: the payload's length and crc32.
fn encode_header(len: u32, crc: u32) -> [u8; REC_HEADER] {
    (u64::from(len) | (u64::from(crc) << 32)).to_le_bytes()
}

/// The header at the start of `b` as (length, crc32), if `b` holds a whole one.
fn decode_header(b: &[u8]) -> Option<(usize, u32)> {
    let h = u64::from_le_bytes(b.get(..REC_HEADER)?.try_into().ok()?);
    Some(((h & 0xffff_ffff) as usize, (h >> 32) as u32))
}

/// What lies at the start of some bytes of a segment.
enum Parsed<'a> {
    /// A whole, valid record with this payload.
    Record(&'a [u8]),
    /// The bytes end before the record does.
    Incomplete,
    /// Not a record: an empty payload or a checksum mismatch.
    Corrupt,
}

fn parse(b: &[u8]) -> Parsed<'_> {
    let Some((len, crc)) = decode_header(b) else {
        return Parsed::Incomplete;
    };
    if len == 0 {
        return Parsed::Corrupt;
    }
    let Some(payload) = b.get(REC_HEADER..REC_HEADER + len) else {
        return Parsed::Incomplete;
    };
    if crc32fast::hash(payload) != crc {
        return Parsed::Corrupt;
    }
    Parsed::Record(payload)
}

/// Locks `m`; a panic elsewhere while it was held does not take the spool down with it (the
/// writer's state only changes after the I/O it describes succeeded).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Records framed for the spool, built by a connection and appended in one write.
#[derive(Debug, Default)]
pub struct RecordBuf {
    buf: Vec<u8>,
    count: u64,
}

impl RecordBuf {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one record whose payload `write` produces. An empty payload (or one of 4 GiB
    /// or more) is refused: nothing is framed and `false` is returned.
    pub fn push_with(&mut self, write: impl FnOnce(&mut Vec<u8>)) -> bool {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; REC_HEADER]);
        write(&mut self.buf);
        let header = self
            .buf
            .get(start + REC_HEADER..)
            .and_then(|payload| {
                let len = u32::try_from(payload.len()).ok().filter(|&len| len > 0)?;
                Some(encode_header(len, crc32fast::hash(payload)))
            })
            .zip(self.buf.get_mut(start..start + REC_HEADER));
        match header {
            Some((header, at)) => {
                at.copy_from_slice(&header);
                self.count += 1;
                true
            }
            None => {
                self.buf.truncate(start);
                false
            }
        }
    }

    /// Appends one record; `false` (and nothing framed) for an empty payload.
    pub fn push(&mut self, payload: &[u8]) -> bool {
        self.push_with(|b| b.extend_from_slice(payload))
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn bytes(&self) -> u64 {
        self.buf.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.count = 0;
    }

    /// The current end, for [`RecordBuf::truncate`] (the socket's group commit collects
    /// many connections' records in one buffer and drops those of a connection it hands on).
    pub fn mark(&self) -> (usize, u64) {
        (self.buf.len(), self.count)
    }

    /// Drops every record pushed after `mark` was taken.
    pub fn truncate(&mut self, mark: (usize, u64)) {
        self.buf.truncate(mark.0);
        self.count = mark.1;
    }
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

/// What [`Spool::append`] does when the records do not fit under `max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Refuse the append ([`AppendError::Full`]); nothing accepted is ever dropped.
    #[default]
    Reject,
    /// Drop the oldest unread records until the append fits (never the reader's).
    DropOldest,
}

/// Records dropped by one [`Overflow::DropOldest`] append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    pub messages: u64,
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("spool full")]
    Full,
    #[error("spool write failed: {0}")]
    Io(#[from] io::Error),
}

/// What recovery found at start.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    pub messages: u64,
    pub bytes: u64,
    pub torn_bytes: u64,
    pub segments: usize,
}

struct Writer {
    seq: u64,
    file: File,
    /// End of the last accepted record: where the next append is written.
    len: u64,
    /// A failed append could not be cut back off the file: bytes of it may lie past `len`.
    /// The next append cuts them first (and fails if it cannot), so they are never followed
    /// by accepted records nor sealed into a segment the reader reads to its end.
    untrimmed: bool,
    dirty: bool,
    /// Segments closed since the last sync whose tail may not be on disk yet. The periodic
    /// sync takes them, so rotating never makes an append wait for a whole segment's fsync.
    retired: Vec<File>,
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
    writer: Mutex<Writer>,
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

fn seg_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("seg-{seq:020}.log"))
}

fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut seqs = vec![];
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = name
            .strip_prefix("seg-")
            .and_then(|n| n.strip_suffix(".log"))
            && let Ok(seq) = n.parse::<u64>()
        {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    Ok(seqs)
}

fn read_ack(dir: &Path) -> Option<Position> {
    let b = fs::read(dir.join("ack")).ok()?;
    let (pos, crc) = (b.get(..16)?, b.get(16..)?);
    if crc != crc32fast::hash(pos).to_le_bytes() {
        return None;
    }
    Some(Position {
        seq: u64::from_le_bytes(pos.get(..8)?.try_into().ok()?),
        offset: u64::from_le_bytes(pos.get(8..)?.try_into().ok()?),
    })
}

/// Reads the spool's id, or makes and persists a new random one.
fn spool_id(dir: &Path) -> io::Result<String> {
    let path = dir.join("id");
    if let Ok(id) = fs::read_to_string(&path) {
        let id = id.trim();
        if id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(id.to_string());
        }
    }
    let id = format!("{:016x}", rand::random::<u64>());
    let tmp = dir.join("id.tmp");
    fs::write(&tmp, &id)?;
    File::open(&tmp)?.sync_all()?;
    fs::rename(&tmp, &path)?;
    Ok(id)
}

fn new_segment(dir: &Path, seq: u64) -> io::Result<File> {
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(seg_path(dir, seq))?;
    f.write_all(MAGIC)?;
    Ok(f)
}

/// Scans records of `data` starting at `from`; returns (end of the last good record, count).
/// A torn record, a checksum mismatch and a zero length all end the scan.
fn scan(data: &[u8], from: usize) -> (usize, u64) {
    let (mut at, mut count) = (from, 0);
    while let Some(rest) = data.get(at..)
        && let Parsed::Record(payload) = parse(rest)
    {
        at += REC_HEADER + payload.len();
        count += 1;
    }
    (at, count)
}

impl Spool {
    /// Opens (creating if needed, mode 0700: see [`SPOOL_DIR_MODE`]) and recovers the spool
    /// in `opts.dir`.
    pub fn open(opts: SpoolOptions) -> io::Result<Arc<Spool>> {
        let dir = opts.dir.clone();
        if !dir.exists() {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                fs::create_dir_all(parent)?;
            }
            match fs::DirBuilder::new().mode(SPOOL_DIR_MODE).create(&dir) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
        }
        let _ = fs::remove_file(dir.join("ack.tmp"));
        let id = spool_id(&dir)?;
        let seqs = list_segments(&dir)?;
        let start = read_ack(&dir).unwrap_or(Position {
            seq: seqs.first().copied().unwrap_or(1),
            offset: SEG_HEADER,
        });
        let mut report = RecoveryReport::default();
        let mut oldest = start.seq;
        for &seq in &seqs {
            let path = seg_path(&dir, seq);
            if seq < start.seq {
                fs::remove_file(&path)?;
                continue;
            }
            let mut data = Vec::new();
            File::open(&path)?.read_to_end(&mut data)?;
            if data.get(..MAGIC.len()) != Some(MAGIC.as_slice()) {
                tracing::warn!(segment = %path.display(), "spool segment without header; discarding");
                report.torn_bytes += data.len() as u64;
                fs::remove_file(&path)?;
                continue;
            }
            let from = if seq == start.seq {
                usize::try_from(start.offset).unwrap_or(usize::MAX)
            } else {
                MAGIC.len()
            };
            let from = from.clamp(MAGIC.len(), data.len());
            let (end, count) = scan(&data, from);
            if end < data.len() {
                let torn = (data.len() - end) as u64;
                tracing::warn!(segment = %path.display(), offset = end, torn_bytes = torn,
                    "spool segment ends in a torn or corrupt record; truncating");
                report.torn_bytes += torn;
                OpenOptions::new()
                    .write(true)
                    .open(&path)?
                    .set_len(end as u64)?;
            }
            report.messages += count;
            report.bytes += (end - from) as u64;
            report.segments += 1;
            oldest = oldest.min(seq);
        }
        let next = seqs.last().map_or(start.seq, |s| (s + 1).max(start.seq));
        let file = new_segment(&dir, next)?;
        // Make the new segment's directory entry durable before anything relies on it.
        File::open(&dir)?.sync_all()?;
        let start = if seqs.iter().any(|&s| s >= start.seq) {
            start
        } else {
            Position {
                seq: next,
                offset: SEG_HEADER,
            }
        };
        Ok(Arc::new(Spool {
            writer: Mutex::new(Writer {
                seq: next,
                file,
                len: SEG_HEADER,
                untrimmed: false,
                dirty: false,
                retired: Vec::new(),
            }),
            head: Mutex::new(Head {
                floor: start,
                read: start,
                swept: 0,
            }),
            dropped_msgs: AtomicU64::new(0),
            on_drop: std::sync::OnceLock::new(),
            oldest_seq: Mutex::new(oldest.min(next)),
            pending_bytes: AtomicU64::new(report.bytes),
            pending_msgs: AtomicU64::new(report.messages),
            notify: Notify::new(),
            start,
            report,
            opts,
            id,
            #[cfg(test)]
            faults: Mutex::default(),
        }))
    }

    pub fn recovery(&self) -> &RecoveryReport {
        &self.report
    }

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

    /// Appends every record of `recs` in one write, or none of them: after an error nothing
    /// of `recs` is visible to the reader, and the next append goes where this one would have.
    pub fn append(&self, recs: &RecordBuf) -> Result<(), AppendError> {
        if recs.is_empty() {
            return Ok(());
        }
        let n = recs.bytes();
        self.reserve(n)?;
        let res = self.write(recs);
        match res {
            Ok(()) => {
                self.pending_msgs.fetch_add(recs.count(), Ordering::AcqRel);
                self.notify.notify_one();
                Ok(())
            }
            Err(e) => {
                self.pending_bytes.fetch_sub(n, Ordering::AcqRel);
                Err(e.into())
            }
        }
    }

    /// Reserves `n` bytes under the cap, first, so concurrent appenders cannot overshoot it
    /// together. A full spool refuses, or with [`Overflow::DropOldest`] drops the oldest
    /// unread records to make room (a few rounds: concurrent appenders may take the room).
    fn reserve(&self, n: u64) -> Result<(), AppendError> {
        let max = self.opts.max_bytes;
        for _ in 0..4 {
            let before = self.pending_bytes.fetch_add(n, Ordering::AcqRel);
            if before + n <= max {
                return Ok(());
            }
            self.pending_bytes.fetch_sub(n, Ordering::AcqRel);
            if self.opts.overflow == Overflow::Reject || n > max {
                return Err(AppendError::Full);
            }
            if self.drop_oldest((before + n).saturating_sub(max)).is_none() {
                // Nothing unread is left to drop: all that is pending is the reader's.
                return Err(AppendError::Full);
            }
        }
        Err(AppendError::Full)
    }

    /// Drops the oldest unread records until at least `need` bytes are freed (or none is
    /// left); `None` when nothing could be dropped. A record that looks corrupt ends the
    /// drop: the reader reports and skips it.
    fn drop_oldest(&self, need: u64) -> Option<Dropped> {
        let mut head = lock(&self.head);
        let from = head.floor.max(head.read);
        let committed = self.committed();
        let mut pos = from;
        let (mut messages, mut bytes) = (0u64, 0u64);
        let mut file: Option<(u64, File)> = None;
        while bytes < need && pos < committed {
            let sealed = pos.seq < committed.seq;
            if !matches!(&file, Some((s, _)) if *s == pos.seq) {
                match File::open(seg_path(&self.opts.dir, pos.seq)) {
                    Ok(f) => file = Some((pos.seq, f)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound && sealed => {
                        pos = Position {
                            seq: pos.seq + 1,
                            offset: SEG_HEADER,
                        };
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, seq = pos.seq, "spool: cannot open a segment to drop from");
                        break;
                    }
                }
            }
            let Some((_, f)) = &file else { break };
            let limit = if sealed {
                match f.metadata() {
                    Ok(m) => m.len(),
                    Err(_) => break,
                }
            } else {
                committed.offset
            };
            if pos.offset >= limit {
                if !sealed {
                    break;
                }
                pos = Position {
                    seq: pos.seq + 1,
                    offset: SEG_HEADER,
                };
                continue;
            }
            let mut header = [0u8; REC_HEADER];
            if f.read_exact_at(&mut header, pos.offset).is_err() {
                break;
            }
            let Some((len, _)) = decode_header(&header) else {
                break;
            };
            let rec = (REC_HEADER + len) as u64;
            if len == 0 || pos.offset + rec > limit {
                break;
            }
            pos.offset += rec;
            messages += 1;
            bytes += rec;
        }
        if messages == 0 {
            return None;
        }
        head.floor = pos;
        let release = |counter: &AtomicU64, n: u64| {
            let _ = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_sub(n))
            });
        };
        release(&self.pending_msgs, messages);
        release(&self.pending_bytes, bytes);
        // Segments wholly dropped go now: those after the reader's (its records lie before
        // `read`) and before the new floor. The rest of a partly dropped one goes with the
        // ack that passes it.
        let readers = if head.read.offset <= SEG_HEADER {
            head.read.seq
        } else {
            head.read.seq + 1
        };
        let first = readers.max(head.swept);
        head.swept = head.swept.max(pos.seq);
        for seq in first..pos.seq {
            match fs::remove_file(seg_path(&self.opts.dir, seq)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::error!(error = %e, seq, "spool: cannot delete a dropped segment")
                }
            }
        }
        drop(head);
        self.dropped_msgs.fetch_add(messages, Ordering::Relaxed);
        let dropped = Dropped { messages, bytes };
        if let Some(hook) = self.on_drop.get() {
            hook(dropped);
        }
        Some(dropped)
    }

    /// Sets what is told of every [`Overflow::DropOldest`] drop (metrics, log); once.
    pub fn on_drop(&self, hook: impl Fn(Dropped) + Send + Sync + 'static) {
        let _ = self.on_drop.set(Box::new(hook));
    }

    /// Records dropped since the spool was opened.
    pub fn dropped_msgs(&self) -> u64 {
        self.dropped_msgs.load(Ordering::Relaxed)
    }

    fn write(&self, recs: &RecordBuf) -> io::Result<()> {
        let mut guard = lock(&self.writer);
        let w = &mut *guard;
        if w.untrimmed {
            self.set_len(&w.file, w.len)?;
            w.untrimmed = false;
        }
        if w.len > SEG_HEADER && w.len + recs.bytes() > self.opts.segment_bytes {
            let seq = w.seq + 1;
            let old = std::mem::replace(&mut w.file, new_segment(&self.opts.dir, seq)?);
            // With `sync_interval` 0 every append was synced already (`dirty` stays false).
            if std::mem::take(&mut w.dirty) {
                w.retired.push(old);
            }
            w.seq = seq;
            w.len = SEG_HEADER;
        }
        // Positional: a short write cannot move where the next append goes.
        let at = w.len;
        let mut res = self.write_at(&w.file, &recs.buf, at);
        if res.is_ok() && self.opts.sync_interval.is_zero() {
            res = self.sync_data(&w.file);
        }
        if let Err(e) = res {
            // Reject the append whole: cut what reached the file back off, so the segment ends
            // with its last accepted record. Should that fail too, zero the first header (a
            // zero length is corruption to recovery, which cuts there) so no whole record of
            // this append outlives a crash, and leave the cut to the next append.
            if self.set_len(&w.file, at).is_err() {
                w.untrimmed = true;
                let _ = w.file.write_all_at(&[0; REC_HEADER], at);
            }
            return Err(e);
        }
        w.len += recs.bytes();
        if !self.opts.sync_interval.is_zero() {
            w.dirty = true;
        }
        Ok(())
    }

    fn write_at(&self, file: &File, buf: &[u8], at: u64) -> io::Result<()> {
        #[cfg(test)]
        if let Some(keep) = lock(&self.faults).short_write.take() {
            file.write_all_at(buf.get(..keep).unwrap_or(buf), at)?;
            return Err(io::Error::from(io::ErrorKind::StorageFull));
        }
        file.write_all_at(buf, at)
    }

    fn set_len(&self, file: &File, len: u64) -> io::Result<()> {
        #[cfg(test)]
        if take_fault(&mut lock(&self.faults).set_len) {
            return Err(io::Error::other("injected truncation failure"));
        }
        file.set_len(len)
    }

    fn sync_data(&self, file: &File) -> io::Result<()> {
        #[cfg(test)]
        if take_fault(&mut lock(&self.faults).sync) {
            return Err(io::Error::other("injected fsync failure"));
        }
        file.sync_data()
    }

    /// fsyncs what was appended since the last sync: segments retired since then, oldest
    /// first, and the current one.
    pub fn sync(&self) -> io::Result<()> {
        let (retired, current) = {
            let mut w = lock(&self.writer);
            let current = if w.dirty {
                let file = w.file.try_clone()?;
                w.dirty = false;
                Some(file)
            } else {
                None
            };
            (std::mem::take(&mut w.retired), current)
        };
        // Outside the lock: an fsync can take milliseconds and must not stall appends.
        for file in retired.iter().chain(&current) {
            file.sync_data()?;
        }
        Ok(())
    }

    fn committed(&self) -> Position {
        let w = lock(&self.writer);
        Position {
            seq: w.seq,
            offset: w.len,
        }
    }

    /// Waits until something may have been appended since the last call.
    pub async fn appended(&self) {
        self.notify.notified().await;
    }

    /// The reader, positioned at the oldest unacknowledged record. There is one reader per
    /// spool: the delivery loop.
    pub fn reader(self: &Arc<Self>) -> SpoolReader {
        SpoolReader {
            spool: self.clone(),
            pos: self.start,
            file: None,
            buf: Vec::new(),
        }
    }

    /// Marks everything before `upto` delivered: persists it, then deletes whole segments.
    ///
    /// The `msgs` and `bytes` of the batch leave the pending accounting even when persisting
    /// fails: the reader is past them and nothing in this process delivers them again, so
    /// keeping them counted would take their capacity for good. They are redelivered only
    /// after a restart, whose recovery counts them again from the older ack on disk; and the
    /// next ack that persists covers them too (an ack is a position), which also deletes the
    /// segments this one could not. Until then their segments stay on disk, uncounted.
    pub fn ack(&self, upto: Position, msgs: u64, bytes: u64) -> io::Result<()> {
        let release = |counter: &AtomicU64, n: u64| {
            let _ = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_sub(n))
            });
        };
        release(&self.pending_msgs, msgs);
        release(&self.pending_bytes, bytes);
        // With everything read acknowledged, records dropped after it are done too.
        let upto = {
            let head = lock(&self.head);
            if upto == head.read {
                upto.max(head.floor)
            } else {
                upto
            }
        };
        let mut b = Vec::with_capacity(20);
        b.extend_from_slice(&upto.seq.to_le_bytes());
        b.extend_from_slice(&upto.offset.to_le_bytes());
        b.extend_from_slice(&crc32fast::hash(&b).to_le_bytes());
        #[cfg(test)]
        if take_fault(&mut lock(&self.faults).ack) {
            return Err(io::Error::from(io::ErrorKind::StorageFull));
        }
        let tmp = self.opts.dir.join("ack.tmp");
        fs::write(&tmp, &b)?;
        fs::rename(&tmp, self.opts.dir.join("ack"))?;
        let mut oldest = lock(&self.oldest_seq);
        while *oldest < upto.seq {
            match fs::remove_file(seg_path(&self.opts.dir, *oldest)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            *oldest += 1;
        }
        Ok(())
    }
}

/// Takes one of `count` pending injected failures.
#[cfg(test)]
fn take_fault(count: &mut u32) -> bool {
    let fail = *count > 0;
    *count = count.saturating_sub(1);
    fail
}

/// A batch read from the spool: payloads joined with commas (ready to become a JSON array).
#[derive(Debug, Default)]
pub struct PendingBatch {
    pub body: Vec<u8>,
    pub count: u64,
    /// Spool bytes (headers included) of the records, for accounting on ack.
    pub bytes: u64,
    /// Position just after the last record.
    pub end: Option<Position>,
    /// Where each record starts in the spool and where its payload is in `body`.
    pub records: Vec<RecordRef>,
}

/// One record of a [`PendingBatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef {
    /// Position of the record in the spool: with the spool id, its stable id.
    pub at: Position,
    /// Byte range of the payload in [`PendingBatch::body`].
    pub start: usize,
    pub len: usize,
}

impl PendingBatch {
    pub fn clear(&mut self) {
        self.body.clear();
        self.count = 0;
        self.bytes = 0;
        self.end = None;
        self.records.clear();
    }

    /// The batch as a JSON array.
    pub fn json_array(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.body.len() + 2);
        out.push(b'[');
        out.extend_from_slice(&self.body);
        out.push(b']');
        out
    }
}

pub struct SpoolReader {
    spool: Arc<Spool>,
    pos: Position,
    file: Option<(u64, File)>,
    buf: Vec<u8>,
}

impl SpoolReader {
    /// Reads up to `max` more records into `batch`; returns how many were added. Only reads
    /// what the writer has completely written.
    pub fn read_into(&mut self, batch: &mut PendingBatch, max: u64) -> io::Result<u64> {
        self.read_bounded(batch, max, usize::MAX)
    }

    /// Like [`SpoolReader::read_into`], and stops before the batch's JSON array would pass
    /// `max_bytes` — except that an empty batch always takes one record, whatever its size, so
    /// a large message still goes out (alone). This bounds delivery's memory by bytes, not only
    /// by the number of messages.
    pub fn read_bounded(
        &mut self,
        batch: &mut PendingBatch,
        max: u64,
        max_bytes: usize,
    ) -> io::Result<u64> {
        let spool = self.spool.clone();
        let mut head = lock(&spool.head);
        if self.pos < head.floor {
            // Dropped while nobody read them.
            self.pos = head.floor;
        }
        let res = self.read_unlocked(batch, max, max_bytes);
        if batch.count > 0 {
            // What lies between the batch's last record and here was dropped: acking the
            // batch acks it too.
            batch.end = Some(self.pos);
        }
        head.read = head.read.max(self.pos);
        res
    }

    /// [`Self::read_bounded`] with the head locked.
    fn read_unlocked(
        &mut self,
        batch: &mut PendingBatch,
        max: u64,
        max_bytes: usize,
    ) -> io::Result<u64> {
        let mut added = 0;
        while added < max {
            let committed = self.spool.committed();
            let sealed = self.pos.seq < committed.seq;
            if !matches!(&self.file, Some((s, _)) if *s == self.pos.seq) {
                match File::open(seg_path(&self.spool.opts.dir, self.pos.seq)) {
                    Ok(f) => self.file = Some((self.pos.seq, f)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound && sealed => {
                        self.next_segment();
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            let Some((_, file)) = &self.file else {
                return Err(io::Error::other("spool segment not open"));
            };
            let limit = if sealed {
                file.metadata()?.len()
            } else {
                committed.offset
            };
            if self.pos.offset >= limit {
                if sealed {
                    self.next_segment();
                    continue;
                }
                break;
            }
            let mut want = (limit - self.pos.offset).min(READ_CHUNK);
            loop {
                self.buf
                    .resize(usize::try_from(want).unwrap_or(usize::MAX), 0);
                file.read_exact_at(&mut self.buf, self.pos.offset)?;
                let len = decode_header(&self.buf).map_or(0, |(len, _)| len as u64);
                let need = REC_HEADER as u64 + len;
                if need <= want || need > limit - self.pos.offset {
                    break;
                }
                want = need; // one record larger than a chunk
            }
            let mut at = 0usize;
            while added < max
                && let Some(rest) = self.buf.get(at..)
                && !rest.is_empty()
            {
                let payload = match parse(rest) {
                    Parsed::Record(payload) => payload,
                    // The rest of this record comes with the next chunk.
                    Parsed::Incomplete if at > 0 => break,
                    // A record claims to extend past what was written (the chunk holds a
                    // whole record whenever one fits), or is empty, or fails its checksum:
                    // only corruption does that. Skip the rest of the segment rather than
                    // stall forever or deliver garbage.
                    Parsed::Incomplete | Parsed::Corrupt => {
                        tracing::error!(
                            seq = self.pos.seq,
                            offset = self.pos.offset,
                            "corrupt spool record; skipping rest of segment"
                        );
                        self.pos.offset = limit;
                        break;
                    }
                };
                let len = payload.len();
                if batch.count > 0 && batch.body.len() + 1 + len + 2 > max_bytes {
                    // Full by bytes: this record starts the next batch.
                    batch.end = Some(self.pos);
                    return Ok(added);
                }
                if batch.count > 0 {
                    batch.body.push(b',');
                }
                batch.records.push(RecordRef {
                    at: self.pos,
                    start: batch.body.len(),
                    len,
                });
                batch.body.extend_from_slice(payload);
                batch.count += 1;
                batch.bytes += (REC_HEADER + len) as u64;
                at += REC_HEADER + len;
                self.pos.offset += (REC_HEADER + len) as u64;
                added += 1;
            }
            batch.end = Some(self.pos);
        }
        Ok(added)
    }

    fn next_segment(&mut self) {
        self.pos = Position {
            seq: self.pos.seq + 1,
            offset: SEG_HEADER,
        };
        self.file = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(dir: &Path) -> SpoolOptions {
        SpoolOptions {
            dir: dir.to_owned(),
            max_bytes: 1 << 20,
            segment_bytes: 4096,
            sync_interval: Duration::from_secs(1),
            overflow: Overflow::Reject,
        }
    }

    fn append_n(spool: &Spool, from: usize, n: usize) {
        let mut r = RecordBuf::new();
        for i in from..from + n {
            r.push(format!("{{\"i\":{i}}}").as_bytes());
        }
        spool.append(&r).unwrap();
    }

    fn read_all(reader: &mut SpoolReader, max: u64) -> PendingBatch {
        let mut b = PendingBatch::default();
        reader.read_into(&mut b, max).unwrap();
        b
    }

    #[test]
    fn a_byte_budget_bounds_the_batch_but_never_starves_a_large_record() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(opts(dir.path())).unwrap();
        append_n(&spool, 0, 10); // {"i":0} … {"i":9}: 7 bytes each
        let mut reader = spool.reader();
        let mut b = PendingBatch::default();
        // "[" + 3 × 7 + 2 commas + "]" = 25 bytes: a fourth record would make 33.
        assert_eq!(reader.read_bounded(&mut b, 100, 30).unwrap(), 3);
        assert_eq!(ids(&b), [0, 1, 2]);
        assert!(b.json_array().len() <= 30);
        // The next batch starts where this one stopped; a budget smaller than one record
        // still takes one.
        let mut b = PendingBatch::default();
        assert_eq!(reader.read_bounded(&mut b, 100, 1).unwrap(), 1);
        assert_eq!(ids(&b), [3]);
        let mut b = PendingBatch::default();
        assert_eq!(reader.read_bounded(&mut b, 100, usize::MAX).unwrap(), 6);
        assert_eq!(ids(&b), [4, 5, 6, 7, 8, 9]);
    }

    fn ids(b: &PendingBatch) -> Vec<u64> {
        let v: Vec<serde_json::Value> = serde_json::from_slice(&b.json_array()).unwrap();
        v.iter().map(|x| x["i"].as_u64().unwrap()).collect()
    }

    #[test]
    fn append_read_ack_across_segments_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(opts(dir.path())).unwrap();
        for k in 0..50 {
            append_n(&spool, k * 10, 10); // ~100 bytes per append, many segments
        }
        assert_eq!(spool.pending_msgs(), 500);
        let mut reader = spool.reader();
        let b = read_all(&mut reader, 120);
        assert_eq!(ids(&b), (0..120).collect::<Vec<_>>());
        spool.ack(b.end.unwrap(), b.count, b.bytes).unwrap();
        let b2 = read_all(&mut reader, 30);
        assert_eq!(ids(&b2), (120..150).collect::<Vec<_>>());
        // Crash before acking b2: a restart resends it.
        drop(reader);
        drop(spool);
        let spool = Spool::open(opts(dir.path())).unwrap();
        assert_eq!(spool.recovery().messages, 380);
        let mut reader = spool.reader();
        append_n(&spool, 500, 5);
        let b = read_all(&mut reader, 1000);
        assert_eq!(ids(&b), (120..505).collect::<Vec<_>>());
        spool.ack(b.end.unwrap(), b.count, b.bytes).unwrap();
        assert_eq!(spool.pending_msgs(), 0);
        assert_eq!(spool.pending_bytes(), 0);
        assert!(list_segments(dir.path()).unwrap().len() <= 2);
    }

    #[test]
    fn record_ids_survive_restarts_and_new_spools_differ() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(opts(dir.path())).unwrap();
        let id = spool.id().to_string();
        for k in 0..20 {
            append_n(&spool, k * 10, 10);
        }
        let first = read_all(&mut spool.reader(), 1000);
        assert_eq!(first.records.len(), 200);
        // Payload ranges point at each message in the body.
        let r = first.records[7];
        assert_eq!(&first.body[r.start..r.start + r.len], b"{\"i\":7}");
        // Not acknowledged, then a restart: the same records at the same positions.
        drop(spool);
        let spool = Spool::open(opts(dir.path())).unwrap();
        assert_eq!(spool.id(), id);
        let again = read_all(&mut spool.reader(), 1000);
        assert_eq!(again.records, first.records);
        // Records appended after the restart never reuse a position.
        append_n(&spool, 200, 5);
        let all = read_all(&mut spool.reader(), 1000);
        assert_eq!(all.records.len(), 205);
        assert!(all.records.windows(2).all(|w| w[0].at < w[1].at));
        // Another directory (a new pod) has another id.
        let other = tempfile::tempdir().unwrap();
        assert_ne!(Spool::open(opts(other.path())).unwrap().id(), id);
    }

    #[test]
    fn rotation_leaves_the_fsync_to_the_periodic_sync() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(opts(dir.path())).unwrap();
        // 4 KiB segments: 200 appends of ~20-byte records rotate several times.
        for i in 0..200 {
            append_n(&spool, i * 10, 10);
        }
        let retired = spool.writer.lock().unwrap().retired.len();
        assert!(
            retired >= 3,
            "rotations retired {retired} unsynced segments"
        );
        spool.sync().unwrap();
        let w = spool.writer.lock().unwrap();
        assert!(w.retired.is_empty() && !w.dirty, "sync took every segment");
        drop(w);
        drop(spool);
        // Nothing is lost across the rotations.
        let spool = Spool::open(opts(dir.path())).unwrap();
        assert_eq!(spool.recovery().messages, 2000);

        // With fsync on every append there is nothing left for the periodic sync.
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(SpoolOptions {
            sync_interval: Duration::ZERO,
            ..opts(dir.path())
        })
        .unwrap();
        for i in 0..50 {
            append_n(&spool, i * 10, 10);
        }
        assert!(spool.writer.lock().unwrap().retired.is_empty());
    }

    #[test]
    fn torn_tail_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(opts(dir.path())).unwrap();
        append_n(&spool, 0, 3);
        drop(spool);
        let seg = seg_path(dir.path(), list_segments(dir.path()).unwrap()[0]);
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[40, 0, 0, 0, 1, 2, 3, 4, b'{']).unwrap(); // half a record
        drop(f);
        let spool = Spool::open(opts(dir.path())).unwrap();
        assert_eq!(spool.recovery().messages, 3);
        assert_eq!(spool.recovery().torn_bytes, 9);
        append_n(&spool, 3, 2);
        let b = read_all(&mut spool.reader(), 100);
        assert_eq!(ids(&b), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn corrupt_record_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(opts(dir.path())).unwrap();
        append_n(&spool, 0, 3);
        drop(spool);
        let seg = seg_path(dir.path(), list_segments(dir.path()).unwrap()[0]);
        let mut data = fs::read(&seg).unwrap();
        let n = data.len();
        data[n - 2] ^= 0xff; // flip a byte in the last record
        fs::write(&seg, data).unwrap();
        let spool = Spool::open(opts(dir.path())).unwrap();
        assert_eq!(ids(&read_all(&mut spool.reader(), 100)), vec![0, 1]);
    }

    #[test]
    fn cap_rejects_whole_append() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(SpoolOptions {
            max_bytes: 100,
            ..opts(dir.path())
        })
        .unwrap();
        append_n(&spool, 0, 5); // 5 × (8 + 8) = 80 bytes
        let mut r = RecordBuf::new();
        r.push(b"{\"i\":99}");
        r.push(b"{\"i\":98}");
        assert!(matches!(spool.append(&r), Err(AppendError::Full)));
        assert_eq!(spool.pending_msgs(), 5);
    }

    fn seg_file(dir: &Path, seq: u64) -> u64 {
        fs::metadata(seg_path(dir, seq)).unwrap().len()
    }

    #[test]
    fn short_write_leaves_no_hole_and_later_appends_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(opts(dir.path())).unwrap();
        append_n(&spool, 0, 3);
        let (msgs, bytes) = (spool.pending_msgs(), spool.pending_bytes());
        // ENOSPC after 5 bytes of the next append (part of its first record's header).
        spool.faults.lock().unwrap().short_write = Some(5);
        let mut r = RecordBuf::new();
        r.push(b"{\"i\":100}");
        r.push(b"{\"i\":101}");
        assert!(matches!(spool.append(&r), Err(AppendError::Io(_))));
        assert_eq!((spool.pending_msgs(), spool.pending_bytes()), (msgs, bytes));
        let mut reader = spool.reader();
        assert_eq!(ids(&read_all(&mut reader, 100)), vec![0, 1, 2]);
        // Space is back: the next append lands right after the last good record.
        append_n(&spool, 3, 2);
        let end = spool.committed();
        assert_eq!(
            seg_file(dir.path(), end.seq),
            end.offset,
            "no hole, no tail"
        );
        assert_eq!(ids(&read_all(&mut reader, 100)), vec![3, 4]);
        drop(reader);
        drop(spool);
        let spool = Spool::open(opts(dir.path())).unwrap();
        assert_eq!(spool.recovery().messages, 5);
        assert_eq!(spool.recovery().torn_bytes, 0);
        assert_eq!(
            ids(&read_all(&mut spool.reader(), 100)),
            vec![0, 1, 2, 3, 4]
        );
    }

    #[test]
    fn failed_append_stays_invisible_when_the_truncation_fails_too() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(opts(dir.path())).unwrap();
        append_n(&spool, 0, 3);
        // The first record of the failed append reaches the file whole, the second does not,
        // and cutting it back fails as well.
        let mut r = RecordBuf::new();
        r.push(b"{\"i\":100}");
        r.push(b"{\"i\":101}");
        spool.faults.lock().unwrap().short_write = Some(REC_HEADER + 9 + 3);
        spool.faults.lock().unwrap().set_len = 1;
        assert!(matches!(spool.append(&r), Err(AppendError::Io(_))));
        assert_eq!(spool.pending_msgs(), 3);
        // A crash now: recovery must not take the failed append's whole first record.
        drop(spool);
        let spool = Spool::open(opts(dir.path())).unwrap();
        assert_eq!(spool.recovery().messages, 3);
        assert_eq!(ids(&read_all(&mut spool.reader(), 100)), vec![0, 1, 2]);

        // Without a crash, the next append cuts the leftovers first and lands after the good
        // records; the segment it leaves behind ends at its last good record.
        let mut r = RecordBuf::new();
        r.push(b"{\"i\":100}");
        r.push(b"{\"i\":101}");
        spool.faults.lock().unwrap().short_write = Some(REC_HEADER + 9 + 3);
        spool.faults.lock().unwrap().set_len = 1;
        assert!(matches!(spool.append(&r), Err(AppendError::Io(_))));
        append_n(&spool, 3, 1);
        let end = spool.committed();
        assert_eq!(seg_file(dir.path(), end.seq), end.offset);
        assert_eq!(ids(&read_all(&mut spool.reader(), 100)), vec![0, 1, 2, 3]);
    }

    #[test]
    fn failed_fsync_rejects_the_append_whole() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(SpoolOptions {
            sync_interval: Duration::ZERO,
            ..opts(dir.path())
        })
        .unwrap();
        append_n(&spool, 0, 3);
        let (msgs, bytes) = (spool.pending_msgs(), spool.pending_bytes());
        spool.faults.lock().unwrap().sync = 1;
        let mut r = RecordBuf::new();
        r.push(b"{\"i\":100}");
        assert!(matches!(spool.append(&r), Err(AppendError::Io(_))));
        assert_eq!((spool.pending_msgs(), spool.pending_bytes()), (msgs, bytes));
        append_n(&spool, 3, 1);
        let mut reader = spool.reader();
        let b = read_all(&mut reader, 100);
        assert_eq!(ids(&b), vec![0, 1, 2, 3]);
        spool.ack(b.end.unwrap(), b.count, b.bytes).unwrap();
        assert_eq!((spool.pending_msgs(), spool.pending_bytes()), (0, 0));
    }

    #[test]
    fn empty_records_are_refused() {
        let mut r = RecordBuf::new();
        assert!(!r.push(b""));
        assert!(!r.push_with(|_| {}));
        assert!(r.is_empty());
        assert_eq!((r.count(), r.bytes()), (0, 0));
        assert!(r.push(b"x"));
        assert!(!r.push(b""));
        assert_eq!((r.count(), r.bytes()), (1, REC_HEADER as u64 + 1));
    }

    #[test]
    fn zeroed_region_is_corruption_for_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(opts(dir.path())).unwrap();
        append_n(&spool, 0, 3);
        drop(spool);
        // A preallocated or hole-filled tail reads as zeros: [len 0][crc32("") = 0]...
        let seg = seg_path(dir.path(), list_segments(dir.path()).unwrap()[0]);
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[0; 64]).unwrap();
        drop(f);
        let spool = Spool::open(opts(dir.path())).unwrap();
        assert_eq!(spool.recovery().messages, 3);
        assert_eq!(spool.recovery().torn_bytes, 64);
        assert_eq!(ids(&read_all(&mut spool.reader(), 100)), vec![0, 1, 2]);
    }

    #[test]
    fn zeroed_header_is_corruption_for_the_reader() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(opts(dir.path())).unwrap();
        append_n(&spool, 0, 3);
        let at = spool.committed();
        append_n(&spool, 3, 2);
        // The fourth record's header turns to zeros under the reader.
        let f = OpenOptions::new()
            .write(true)
            .open(seg_path(dir.path(), at.seq))
            .unwrap();
        f.write_all_at(&[0; REC_HEADER], at.offset).unwrap();
        let mut reader = spool.reader();
        let b = read_all(&mut reader, 100);
        assert!(b.records.iter().all(|r| r.len > 0), "{:?}", b.records);
        assert_eq!(ids(&b), vec![0, 1, 2]);
        // Records after the corrupt rest of the segment are read again.
        append_n(&spool, 5, 1);
        assert_eq!(ids(&read_all(&mut reader, 100)), vec![5]);
    }

    /// A spool of `max_bytes` that drops its oldest records when full; each drop is recorded.
    fn dropping(dir: &Path, max_bytes: u64) -> (Arc<Spool>, Arc<Mutex<Vec<Dropped>>>) {
        let spool = Spool::open(SpoolOptions {
            max_bytes,
            segment_bytes: 256,
            overflow: Overflow::DropOldest,
            ..opts(dir)
        })
        .unwrap();
        let drops = Arc::new(Mutex::new(Vec::new()));
        let seen = drops.clone();
        spool.on_drop(move |d| seen.lock().unwrap().push(d));
        (spool, drops)
    }

    /// Appends `{"i":<id>}` records one by one: 8 + 8 bytes each for ids 10..99.
    fn append_ids(spool: &Spool, ids: std::ops::Range<usize>) {
        for i in ids {
            let mut r = RecordBuf::new();
            r.push(format!("{{\"i\":{i}}}").as_bytes());
            spool.append(&r).unwrap();
        }
    }

    #[test]
    fn drop_oldest_makes_room_for_the_newest_and_counts_what_it_dropped() {
        let dir = tempfile::tempdir().unwrap();
        // Room for 10 records of 16 bytes; 256-byte segments hold 15 records each.
        let (spool, drops) = dropping(dir.path(), 160);
        append_ids(&spool, 10..60); // 50 appends: the first 40 are dropped, one by one
        assert_eq!(spool.pending_msgs(), 10);
        assert_eq!(spool.pending_bytes(), 160);
        assert_eq!(spool.dropped_msgs(), 40);
        let drops = drops.lock().unwrap();
        assert_eq!(drops.len(), 40);
        assert!(drops.iter().all(|d| *d
            == Dropped {
                messages: 1,
                bytes: 16
            }));
        // Wholly dropped segments are gone: the kept records span at most two.
        assert!(list_segments(dir.path()).unwrap().len() <= 2);
        // The reader gets the newest ten, in order.
        let mut reader = spool.reader();
        let b = read_all(&mut reader, 100);
        assert_eq!(ids(&b), (50..60).collect::<Vec<_>>());
        spool.ack(b.end.unwrap(), b.count, b.bytes).unwrap();
        assert_eq!((spool.pending_msgs(), spool.pending_bytes()), (0, 0));
    }

    #[test]
    fn the_batch_being_delivered_is_never_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = dropping(dir.path(), 160);
        append_ids(&spool, 10..14);
        let mut reader = spool.reader();
        let in_flight = read_all(&mut reader, 4); // 10..13, read and not acked
        append_ids(&spool, 14..40);
        // The four in flight and the newest six fit; 14..33 were dropped.
        assert_eq!(spool.pending_msgs(), 10);
        assert_eq!(spool.dropped_msgs(), 20);
        assert_eq!(ids(&in_flight), [10, 11, 12, 13]);
        spool
            .ack(in_flight.end.unwrap(), in_flight.count, in_flight.bytes)
            .unwrap();
        let next = read_all(&mut reader, 100);
        assert_eq!(ids(&next), (34..40).collect::<Vec<_>>());
        spool
            .ack(next.end.unwrap(), next.count, next.bytes)
            .unwrap();
        assert_eq!((spool.pending_msgs(), spool.pending_bytes()), (0, 0));

        // Only the reader's records left: nothing to drop, the append is refused.
        append_ids(&spool, 40..50);
        let all = read_all(&mut reader, 100);
        assert_eq!(all.count, 10);
        let mut r = RecordBuf::new();
        r.push(b"{\"i\":99}");
        assert!(matches!(spool.append(&r), Err(AppendError::Full)));
        // A single append larger than the spool never fits.
        let mut big = RecordBuf::new();
        big.push(&[b'x'; 200]);
        assert!(matches!(spool.append(&big), Err(AppendError::Full)));
    }

    #[test]
    fn a_restart_after_the_ack_does_not_bring_dropped_records_back() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = dropping(dir.path(), 160);
        append_ids(&spool, 10..14);
        let mut reader = spool.reader();
        let in_flight = read_all(&mut reader, 4);
        append_ids(&spool, 14..40); // drops 14..33 behind the batch in flight
        spool
            .ack(in_flight.end.unwrap(), in_flight.count, in_flight.bytes)
            .unwrap();
        drop(reader);
        drop(spool);
        let spool = Spool::open(opts(dir.path())).unwrap();
        assert_eq!(spool.recovery().messages, 6);
        let b = read_all(&mut spool.reader(), 100);
        assert_eq!(ids(&b), (34..40).collect::<Vec<_>>());
    }

    #[test]
    fn failed_ack_releases_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(SpoolOptions {
            max_bytes: 100,
            ..opts(dir.path())
        })
        .unwrap();
        append_n(&spool, 0, 5); // 80 of 100 bytes
        let mut reader = spool.reader();
        let b = read_all(&mut reader, 100);
        spool.faults.lock().unwrap().ack = 1;
        assert!(spool.ack(b.end.unwrap(), b.count, b.bytes).is_err());
        // The reader is past these records and nothing re-delivers them in this process:
        // they no longer count against the cap.
        assert_eq!((spool.pending_msgs(), spool.pending_bytes()), (0, 0));
        append_n(&spool, 5, 5);
        assert_eq!(spool.pending_msgs(), 5);
        // Unpersisted, the ack is lost on a restart: its records come again.
        drop(reader);
        drop(spool);
        let spool = Spool::open(SpoolOptions {
            max_bytes: 1000,
            ..opts(dir.path())
        })
        .unwrap();
        assert_eq!(spool.pending_msgs(), 10);
        let mut reader = spool.reader();
        let b = read_all(&mut reader, 7);
        assert_eq!(ids(&b), (0..7).collect::<Vec<_>>());
        spool.faults.lock().unwrap().ack = 1;
        assert!(spool.ack(b.end.unwrap(), b.count, b.bytes).is_err());
        // The next ack covers the failed one (acks are positions).
        let b = read_all(&mut reader, 100);
        assert_eq!(ids(&b), (7..10).collect::<Vec<_>>());
        spool.ack(b.end.unwrap(), b.count, b.bytes).unwrap();
        assert_eq!((spool.pending_msgs(), spool.pending_bytes()), (0, 0));
        drop(reader);
        drop(spool);
        let spool = Spool::open(opts(dir.path())).unwrap();
        assert_eq!(spool.recovery().messages, 0);
    }

    /// Model-based test of the spool against a queue of accepted, unacknowledged payloads.
    ///
    /// What the model allows:
    /// - An append that reports success is accepted: it is delivered, in order, until an ack
    ///   that persisted covers it. An append that reports failure (injected short write, failed
    ///   truncation, failed fsync) or `Full` is never delivered, and later appends succeed.
    /// - A reader delivers exactly the accepted records after the previous read, up to `max`.
    /// - An ack that fails to persist releases its records from the accounting (nothing in this
    ///   process delivers them again) but a restart redelivers everything after the last
    ///   persisted ack: records in flight or acked without persisting repeat, exactly those.
    /// - A restart may come with a torn tail, a machine crash: the newest segment is cut at a
    ///   random point at or after what the last successful `sync()` (or, with `sync_interval`
    ///   zero, append) covered. Exactly the records that do not lie wholly before the cut are
    ///   lost, and those are a suffix of the queue appended after that sync.
    /// - The pending message and byte counts equal the model's after every step.
    mod model {
        use std::collections::VecDeque;

        use proptest::prelude::*;

        use super::super::*;
        use super::seg_file;

        #[derive(Debug, Clone)]
        enum Fault {
            /// The write stores part of the append, then fails: `keep` (modulo the append's
            /// size) bytes, or with `whole` some of its records whole and part of the next
            /// one. With `trim_fails`, cutting the partial append back fails as well.
            Short {
                keep: u64,
                whole: bool,
                trim_fails: bool,
            },
            /// The fsync of the append fails (only with `sync_interval` zero).
            Sync,
        }

        #[derive(Debug, Clone)]
        enum Op {
            Append {
                sizes: Vec<usize>,
                fault: Option<Fault>,
            },
            Read {
                max: u64,
            },
            /// Acks the oldest batch read and not acked yet, if any.
            Ack {
                fail: bool,
            },
            Sync,
            /// Drops the spool and opens it again; with `tear`, first cuts the newest segment
            /// as a machine crash may (`tear` picks the point in the allowed range).
            Restart {
                tear: Option<u64>,
            },
        }

        fn size() -> impl Strategy<Value = usize> {
            prop_oneof![
                1 => Just(0usize),
                // Records of one size line up: whole records a failed append leaves behind
                // would then follow a later, shorter append exactly.
                4 => Just(16usize),
                10 => 1usize..200,
                3 => 200usize..6000,
                1 => 200_000usize..400_000, // over READ_CHUNK and over a segment
            ]
        }

        fn sizes() -> impl Strategy<Value = Vec<usize>> {
            prop_oneof![
                prop::collection::vec(size(), 1..5),
                (1usize..5, size()).prop_map(|(n, size)| vec![size; n]),
            ]
        }

        fn fault() -> impl Strategy<Value = Option<Fault>> {
            prop_oneof![
                6 => Just(None),
                2 => (any::<u64>(), any::<bool>(), any::<bool>()).prop_map(
                    |(keep, whole, trim_fails)| Some(Fault::Short { keep, whole, trim_fails })
                ),
                1 => Just(Some(Fault::Sync)),
            ]
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                8 => (sizes(), fault()).prop_map(|(sizes, fault)| Op::Append { sizes, fault }),
                5 => (1u64..40).prop_map(|max| Op::Read { max }),
                4 => any::<bool>().prop_map(|f| Op::Ack { fail: f }),
                1 => Just(Op::Sync),
                2 => prop::option::of(any::<u64>()).prop_map(|tear| Op::Restart { tear }),
            ]
        }

        fn payload(id: u64, size: usize) -> Vec<u8> {
            // The id first, so that a misplaced record shows which one it is.
            let mut p = vec![(id as u8) ^ 0x5a; size];
            let n = size.min(8);
            p[..n].copy_from_slice(&id.to_le_bytes()[..n]);
            p
        }

        struct Model {
            /// Accepted records from the last persisted ack on, with their positions.
            recs: VecDeque<(Position, Vec<u8>)>,
            /// How many at the front were acked without the ack persisting.
            acked: usize,
            /// How many at the front the current reader delivered.
            delivered: usize,
            /// Batches read and not acked: (records, end, spool bytes).
            in_flight: VecDeque<(u64, Position, u64)>,
            /// Everything before this is on disk.
            synced: Position,
            /// A failed append could not be cut back off the writer's segment.
            untrimmed: bool,
        }

        impl Model {
            fn pending(&self) -> (u64, u64) {
                let rest = self.recs.iter().skip(self.acked);
                let bytes = rest.map(|(_, p)| (REC_HEADER + p.len()) as u64).sum();
                ((self.recs.len() - self.acked) as u64, bytes)
            }
        }

        fn run(ops: Vec<Op>, segment_bytes: u64, fsync_each: bool) -> Result<(), TestCaseError> {
            // In memory where there is a tmpfs: fsyncs on a busy disk would take most of the
            // time of the test.
            let shm = Path::new("/dev/shm");
            let dir = if shm.is_dir() {
                tempfile::tempdir_in(shm)
            } else {
                tempfile::tempdir()
            }
            .unwrap();
            let opts = SpoolOptions {
                dir: dir.path().to_owned(),
                max_bytes: 2 << 20,
                segment_bytes,
                sync_interval: if fsync_each {
                    Duration::ZERO
                } else {
                    Duration::from_secs(1)
                },
                overflow: Overflow::Reject,
            };
            let mut spool = Spool::open(opts.clone()).unwrap();
            let mut reader = spool.reader();
            let mut m = Model {
                recs: VecDeque::new(),
                acked: 0,
                delivered: 0,
                in_flight: VecDeque::new(),
                synced: Position { seq: 0, offset: 0 },
                untrimmed: false,
            };
            let mut next_id = 0u64;
            for op in ops {
                match op {
                    Op::Append { sizes, fault } => {
                        let mut r = RecordBuf::new();
                        let mut added = vec![];
                        for size in sizes {
                            let p = payload(next_id, size);
                            next_id += 1;
                            prop_assert_eq!(r.push(&p), size > 0, "only non-empty records");
                            if size > 0 {
                                added.push(p);
                            }
                        }
                        let full = m.pending().1 + r.bytes() > opts.max_bytes;
                        let fails = !r.is_empty()
                            && !full
                            && match &fault {
                                Some(Fault::Short {
                                    keep,
                                    whole,
                                    trim_fails,
                                }) => {
                                    let keep = if *whole {
                                        let k = (keep % added.len() as u64) as usize;
                                        let part =
                                            (keep >> 32) % (REC_HEADER + added[k].len()) as u64;
                                        let before: usize =
                                            added[..k].iter().map(|p| REC_HEADER + p.len()).sum();
                                        before as u64 + part
                                    } else {
                                        keep % r.bytes()
                                    };
                                    let mut f = spool.faults.lock().unwrap();
                                    f.short_write = Some(keep as usize);
                                    f.set_len = u32::from(*trim_fails);
                                    true
                                }
                                Some(Fault::Sync) => {
                                    spool.faults.lock().unwrap().sync = 1;
                                    fsync_each
                                }
                                None => false,
                            };
                        let res = spool.append(&r);
                        *spool.faults.lock().unwrap() = Faults::default();
                        if r.is_empty() {
                            prop_assert!(res.is_ok());
                        } else if full {
                            prop_assert!(matches!(res, Err(AppendError::Full)), "{res:?}");
                        } else if fails {
                            prop_assert!(matches!(res, Err(AppendError::Io(_))), "{res:?}");
                        } else {
                            prop_assert!(res.is_ok(), "{res:?}");
                            // One batch, one segment: its records end where the writer is.
                            let end = spool.committed();
                            let mut at = end.offset - r.bytes();
                            for p in added {
                                let len = (REC_HEADER + p.len()) as u64;
                                m.recs.push_back((
                                    Position {
                                        seq: end.seq,
                                        offset: at,
                                    },
                                    p,
                                ));
                                at += len;
                            }
                            if fsync_each {
                                m.synced = end;
                            }
                        }
                        // The writer's segment ends with its last accepted record; only when
                        // cutting a failed append back failed may something follow, and nothing
                        // there reads as a record (recovery after a crash would take it).
                        let end = spool.committed();
                        let data = fs::read(seg_path(dir.path(), end.seq)).unwrap();
                        if !r.is_empty() && !full {
                            m.untrimmed = fails
                                && matches!(
                                    fault,
                                    Some(Fault::Short {
                                        trim_fails: true,
                                        ..
                                    })
                                );
                        }
                        if !m.untrimmed {
                            prop_assert_eq!(data.len() as u64, end.offset, "segment length");
                        }
                        prop_assert_eq!(
                            scan(&data, end.offset as usize).1,
                            0,
                            "records past the end"
                        );
                    }
                    Op::Read { max } => {
                        let mut b = PendingBatch::default();
                        let n = reader.read_into(&mut b, max).unwrap();
                        let want = max.min((m.recs.len() - m.delivered) as u64);
                        prop_assert_eq!(n, want);
                        prop_assert_eq!(b.count, want);
                        prop_assert_eq!(b.records.len() as u64, want);
                        let mut bytes = 0;
                        for (i, r) in b.records.iter().enumerate() {
                            let (at, p) = &m.recs[m.delivered + i];
                            prop_assert_eq!(r.at, *at);
                            prop_assert!(
                                b.body[r.start..r.start + r.len] == p[..],
                                "payload of {:?}",
                                r.at
                            );
                            bytes += (REC_HEADER + p.len()) as u64;
                        }
                        prop_assert_eq!(b.bytes, bytes);
                        if n > 0 {
                            m.in_flight.push_back((n, b.end.unwrap(), b.bytes));
                            m.delivered += n as usize;
                        }
                    }
                    Op::Ack { fail } => {
                        if let Some((n, end, bytes)) = m.in_flight.pop_front() {
                            spool.faults.lock().unwrap().ack = u32::from(fail);
                            let res = spool.ack(end, n, bytes);
                            prop_assert_eq!(res.is_err(), fail, "{:?}", res);
                            m.acked += n as usize;
                            if !fail {
                                // Persisted: covers the earlier acks that were not.
                                m.recs.drain(..m.acked);
                                m.delivered -= m.acked;
                                m.acked = 0;
                            }
                        }
                    }
                    Op::Sync => {
                        let at = spool.committed();
                        spool.sync().unwrap();
                        m.synced = at;
                    }
                    Op::Restart { tear } => {
                        drop(reader);
                        drop(spool);
                        if let Some(tear) = tear {
                            let last = *list_segments(dir.path()).unwrap().last().unwrap();
                            let len = seg_file(dir.path(), last);
                            let from = if last == m.synced.seq {
                                m.synced.offset
                            } else {
                                0
                            };
                            prop_assert!(last >= m.synced.seq && from <= len);
                            let cut = from + tear % (len - from + 1);
                            OpenOptions::new()
                                .write(true)
                                .open(seg_path(dir.path(), last))
                                .unwrap()
                                .set_len(cut)
                                .unwrap();
                            while let Some((at, p)) = m.recs.back()
                                && at.seq == last
                                && at.offset + (REC_HEADER + p.len()) as u64 > cut
                            {
                                prop_assert!(*at >= m.synced, "only unsynced records are lost");
                                m.recs.pop_back();
                            }
                        }
                        spool = Spool::open(opts.clone()).unwrap();
                        reader = spool.reader();
                        m.acked = 0;
                        m.delivered = 0;
                        m.untrimmed = false;
                        m.in_flight.clear();
                        let (msgs, bytes) = m.pending();
                        prop_assert_eq!(spool.recovery().messages, msgs);
                        prop_assert_eq!(spool.recovery().bytes, bytes);
                    }
                }
                prop_assert_eq!(
                    (spool.pending_msgs(), spool.pending_bytes()),
                    m.pending(),
                    "pending (msgs, bytes)"
                );
            }
            // Nothing accepted and unacknowledged is missing at the end, after a restart too.
            drop(reader);
            drop(spool);
            let spool = Spool::open(opts).unwrap();
            let mut b = PendingBatch::default();
            spool.reader().read_into(&mut b, u64::MAX).unwrap();
            prop_assert_eq!(b.records.len(), m.recs.len());
            for (r, (at, p)) in b.records.iter().zip(&m.recs) {
                prop_assert_eq!(r.at, *at);
                prop_assert!(
                    b.body[r.start..r.start + r.len] == p[..],
                    "payload of {:?}",
                    r.at
                );
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig {
                cases: 96,
                failure_persistence: None,
                ..ProptestConfig::default()
            })]

            #[test]
            fn spool_matches_its_model(
                ops in prop::collection::vec(op(), 1..60),
                segment_bytes in prop_oneof![Just(512u64), Just(4096), Just(64 << 10)],
                fsync_each in prop::bool::weighted(0.2),
            ) {
                run(ops, segment_bytes, fsync_each)?;
            }
        }
    }
}

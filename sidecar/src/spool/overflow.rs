//! The overflow policy: what an append does when the records do not fit under `max_bytes` —
//! refuse it ([`Overflow::Reject`]) or drop the oldest records nobody has read yet
//! ([`Overflow::DropOldest`]), deleting wholly dropped segments and telling the `on_drop` hook.
//! Records the reader holds are never dropped.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

use super::format::{REC_HEADER, SEG_HEADER, decode_header, seg_path};
use super::{AppendError, Position, Spool, lock, release};

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

impl Spool {
    /// Reserves `n` bytes under the cap, first, so concurrent appenders cannot overshoot it
    /// together. A full spool refuses, or with [`Overflow::DropOldest`] drops the oldest
    /// unread records to make room (a few rounds: concurrent appenders may take the room).
    pub(super) fn reserve(&self, n: u64) -> Result<(), AppendError> {
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
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::super::SpoolOptions;
    use super::super::format::{RecordBuf, list_segments};
    use super::super::test_support::*;
    use super::*;
    use std::path::Path;

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
}

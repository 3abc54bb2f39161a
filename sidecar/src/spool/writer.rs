//! The writer: one current segment for every connection's appends, each written whole at the
//! writer's known end or cut back off the file (never a hole); rotation to a new segment; the
//! periodic fsync; the fault injection the tests drive it with.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

use super::format::{REC_HEADER, RecordBuf, SEG_HEADER, new_segment};
#[cfg(test)]
use super::take_fault;
use super::{AppendError, Position, Spool, lock};

pub(super) struct Writer {
    pub(super) seq: u64,
    pub(super) file: File,
    /// End of the last accepted record: where the next append is written.
    pub(super) len: u64,
    /// A failed append could not be cut back off the file: bytes of it may lie past `len`.
    /// The next append cuts them first (and fails if it cannot), so they are never followed
    /// by accepted records nor sealed into a segment the reader reads to its end.
    pub(super) untrimmed: bool,
    pub(super) dirty: bool,
    /// Segments closed since the last sync whose tail may not be on disk yet. The periodic
    /// sync takes them, so rotating never makes an append wait for a whole segment's fsync.
    pub(super) retired: Vec<File>,
}

impl Spool {
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

    pub(super) fn committed(&self) -> Position {
        let w = lock(&self.writer);
        Position {
            seq: w.seq,
            offset: w.len,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::test_support::*;
    use super::super::{Faults, SpoolOptions, format::REC_HEADER};
    use super::*;

    /// Appends `n` records (`{"i":100}`, …) with only `faults` set: the append fails.
    fn append_failing(spool: &Spool, n: usize, faults: Faults) {
        *spool.faults.lock().unwrap() = faults;
        assert!(matches!(
            spool.append(&records(100, n)),
            Err(AppendError::Io(_))
        ));
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
    fn short_write_leaves_no_hole_and_later_appends_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(opts(dir.path())).unwrap();
        append_n(&spool, 0, 3);
        let (msgs, bytes) = (spool.pending_msgs(), spool.pending_bytes());
        // ENOSPC after 5 bytes of the next append (part of its first record's header).
        let enospc = Faults {
            short_write: Some(5),
            ..Faults::default()
        };
        append_failing(&spool, 2, enospc);
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
        let torn = || Faults {
            short_write: Some(REC_HEADER + 9 + 3),
            set_len: 1,
            ..Faults::default()
        };
        append_failing(&spool, 2, torn());
        assert_eq!(spool.pending_msgs(), 3);
        // A crash now: recovery must not take the failed append's whole first record.
        drop(spool);
        let spool = Spool::open(opts(dir.path())).unwrap();
        assert_eq!(spool.recovery().messages, 3);
        assert_eq!(ids(&read_all(&mut spool.reader(), 100)), vec![0, 1, 2]);

        // Without a crash, the next append cuts the leftovers first and lands after the good
        // records; the segment it leaves behind ends at its last good record.
        append_failing(&spool, 2, torn());
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
        let fsync_fails = Faults {
            sync: 1,
            ..Faults::default()
        };
        append_failing(&spool, 1, fsync_fails);
        assert_eq!((spool.pending_msgs(), spool.pending_bytes()), (msgs, bytes));
        append_n(&spool, 3, 1);
        let mut reader = spool.reader();
        let b = read_all(&mut reader, 100);
        assert_eq!(ids(&b), vec![0, 1, 2, 3]);
        spool.ack(b.end.unwrap(), b.count, b.bytes).unwrap();
        assert_eq!((spool.pending_msgs(), spool.pending_bytes()), (0, 0));
    }
}

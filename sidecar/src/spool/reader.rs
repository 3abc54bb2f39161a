//! Reading and acknowledgement: the one reader (the delivery loop) takes batches of whole,
//! committed records ([`PendingBatch`]); an ack persists its position in the `ack` file and
//! deletes the segments wholly before it.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::format::{Parsed, REC_HEADER, SEG_HEADER, decode_header, encode_ack, parse, seg_path};
#[cfg(test)]
use super::take_fault;
use super::{Position, Spool, lock, release};

/// How much the reader pulls from a segment per read call.
const READ_CHUNK: u64 = 256 * 1024;

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

impl Spool {
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
        let b = encode_ack(upto);
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

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;

    use super::super::SpoolOptions;
    use super::super::format::list_segments;
    use super::super::test_support::*;
    use super::*;

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
}

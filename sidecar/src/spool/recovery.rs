//! Recovery at start-up: [`Spool::open`] creates or reopens the spool directory, deletes
//! acknowledged segments, cuts each unacknowledged one at its first torn or corrupt record,
//! counts what is left ([`RecoveryReport`]) and starts a fresh segment for new writes.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::DirBuilderExt as _;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::format::{
    MAGIC, SEG_HEADER, list_segments, new_segment, read_ack, scan, seg_path, spool_id,
};
use super::writer::Writer;
use super::{Head, Position, SPOOL_DIR_MODE, Spool, SpoolOptions};

/// What recovery found at start.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    pub messages: u64,
    pub bytes: u64,
    pub torn_bytes: u64,
    pub segments: usize,
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
}

#[cfg(test)]
mod tests {
    use std::fs::{self, OpenOptions};
    use std::io::Write;

    use super::super::test_support::*;
    use super::*;

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
    fn torn_tail_is_skipped() {
        let (dir, seg) = three_records_closed();
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
        let (dir, seg) = three_records_closed();
        let mut data = fs::read(&seg).unwrap();
        let n = data.len();
        data[n - 2] ^= 0xff; // flip a byte in the last record
        fs::write(&seg, data).unwrap();
        let spool = Spool::open(opts(dir.path())).unwrap();
        assert_eq!(ids(&read_all(&mut spool.reader(), 100)), vec![0, 1]);
    }

    #[test]
    fn zeroed_region_is_corruption_for_recovery() {
        let (dir, seg) = three_records_closed();
        // A preallocated or hole-filled tail reads as zeros: [len 0][crc32("") = 0]...
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[0; 64]).unwrap();
        drop(f);
        let spool = Spool::open(opts(dir.path())).unwrap();
        assert_eq!(spool.recovery().messages, 3);
        assert_eq!(spool.recovery().torn_bytes, 64);
        assert_eq!(ids(&read_all(&mut spool.reader(), 100)), vec![0, 1, 2]);
    }
}

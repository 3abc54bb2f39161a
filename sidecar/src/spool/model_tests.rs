//! Model-based test of the spool against a queue of accepted, unacknowledged payloads.
//!
//! What the model allows:
//! - An append that reports success is accepted: it is delivered, in order, until an ack
//!   that persisted covers it. An append that reports failure (injected short write, failed
//!   truncation, failed fsync) or `Full` is never delivered, and later appends succeed.
//! - A reader delivers exactly the accepted records after the previous read, up to `max`.
//! - An ack that fails to persist releases its records from the accounting (nothing in this
//!   process delivers them again) but a restart redelivers everything after the last
//!   persisted ack: records in flight or acked without persisting repeat, exactly those.
//! - A restart may come with a torn tail, a machine crash: the newest segment is cut at a
//!   random point at or after what the last successful `sync()` (or, with `sync_interval`
//!   zero, append) covered. Exactly the records that do not lie wholly before the cut are
//!   lost, and those are a suffix of the queue appended after that sync.
//! - The pending message and byte counts equal the model's after every step.

use std::collections::VecDeque;

use proptest::prelude::*;

use std::fs::{self, OpenOptions};
use std::path::Path;
use std::time::Duration;

use super::format::{REC_HEADER, list_segments, scan, seg_path};
use super::test_support::seg_file;
use super::*;

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
                                let part = (keep >> 32) % (REC_HEADER + added[k].len()) as u64;
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

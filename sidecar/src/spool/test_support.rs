//! Helpers the spool's tests share: options for a spool in a temporary directory, appending
//! and reading numbered records.

use std::fs;
use std::path::Path;
use std::time::Duration;

use super::format::{list_segments, seg_path};
use super::{Overflow, PendingBatch, RecordBuf, Spool, SpoolOptions, SpoolReader};

pub(super) fn opts(dir: &Path) -> SpoolOptions {
    SpoolOptions {
        dir: dir.to_owned(),
        max_bytes: 1 << 20,
        segment_bytes: 4096,
        sync_interval: Duration::from_secs(1),
        overflow: Overflow::Reject,
    }
}

/// Records `{"i":from}` to `{"i":from + n - 1}`.
pub(super) fn records(from: usize, n: usize) -> RecordBuf {
    let mut r = RecordBuf::new();
    for i in from..from + n {
        r.push(format!("{{\"i\":{i}}}").as_bytes());
    }
    r
}

pub(super) fn append_n(spool: &Spool, from: usize, n: usize) {
    spool.append(&records(from, n)).unwrap();
}

pub(super) fn read_all(reader: &mut SpoolReader, max: u64) -> PendingBatch {
    let mut b = PendingBatch::default();
    reader.read_into(&mut b, max).unwrap();
    b
}

pub(super) fn ids(b: &PendingBatch) -> Vec<u64> {
    let v: Vec<serde_json::Value> = serde_json::from_slice(&b.json_array()).unwrap();
    v.iter().map(|x| x["i"].as_u64().unwrap()).collect()
}

pub(super) fn seg_file(dir: &Path, seq: u64) -> u64 {
    fs::metadata(seg_path(dir, seq)).unwrap().len()
}

/// A spool in a new directory holding records 0..3, closed; and its one segment's path.
pub(super) fn three_records_closed() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(opts(dir.path())).unwrap();
    append_n(&spool, 0, 3);
    drop(spool);
    let seg = seg_path(dir.path(), list_segments(dir.path()).unwrap()[0]);
    (dir, seg)
}

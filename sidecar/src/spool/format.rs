//! The spool's on-disk format: segment files (`seg-<seq>.log`, the `NGSPOOL1` magic, records
//! `[len u32 LE][crc32 u32 LE][payload]`), the framing connections build records in
//! ([`RecordBuf`]), the `ack` file and the spool's `id` file. Parsing and encoding only: what
//! the writer, the reader and recovery do with them is in their own files.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::Position;

pub(super) const MAGIC: &[u8; 8] = b"NGSPOOL1";
pub(super) const SEG_HEADER: u64 = MAGIC.len() as u64;
pub(super) const REC_HEADER: usize = 8;

/// A record header: the payload's length and crc32.
fn encode_header(len: u32, crc: u32) -> [u8; REC_HEADER] {
    (u64::from(len) | (u64::from(crc) << 32)).to_le_bytes()
}

/// The header at the start of `b` as (length, crc32), if `b` holds a whole one.
pub(super) fn decode_header(b: &[u8]) -> Option<(usize, u32)> {
    let h = u64::from_le_bytes(b.get(..REC_HEADER)?.try_into().ok()?);
    Some(((h & 0xffff_ffff) as usize, (h >> 32) as u32))
}

/// What lies at the start of some bytes of a segment.
pub(super) enum Parsed<'a> {
    /// A whole, valid record with this payload.
    Record(&'a [u8]),
    /// The bytes end before the record does.
    Incomplete,
    /// Not a record: an empty payload or a checksum mismatch.
    Corrupt,
}

pub(super) fn parse(b: &[u8]) -> Parsed<'_> {
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

/// Records framed for the spool, built by a connection and appended in one write.
#[derive(Debug, Default)]
pub struct RecordBuf {
    pub(super) buf: Vec<u8>,
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

pub(super) fn seg_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("seg-{seq:020}.log"))
}

pub(super) fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
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

pub(super) fn read_ack(dir: &Path) -> Option<Position> {
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

/// The `ack` file's bytes for `upto` (what [`read_ack`] reads back).
pub(super) fn encode_ack(upto: Position) -> Vec<u8> {
    let mut b = Vec::with_capacity(20);
    b.extend_from_slice(&upto.seq.to_le_bytes());
    b.extend_from_slice(&upto.offset.to_le_bytes());
    b.extend_from_slice(&crc32fast::hash(&b).to_le_bytes());
    b
}

/// Reads the spool's id, or makes and persists a new random one.
pub(super) fn spool_id(dir: &Path) -> io::Result<String> {
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

pub(super) fn new_segment(dir: &Path, seq: u64) -> io::Result<File> {
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
pub(super) fn scan(data: &[u8], from: usize) -> (usize, u64) {
    let (mut at, mut count) = (from, 0);
    while let Some(rest) = data.get(at..)
        && let Parsed::Record(payload) = parse(rest)
    {
        at += REC_HEADER + payload.len();
        count += 1;
    }
    (at, count)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}

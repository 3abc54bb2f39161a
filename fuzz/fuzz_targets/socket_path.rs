//! Fuzzes the app socket's whole ingest path, as `sidecar/src/ingest/unix.rs` runs it: bytes
//! arrive in reads (cut where the input's first byte says) → the stream decoder validates them
//! → every publish is stamped (the upstream envelope: `timestamp`, `source`) → a `wait:false`
//! publish is framed as a spool record (`RecordBuf::push_with`), a `wait:true` one is sent
//! upstream as its envelope.
//!
//! Properties: nothing panics; every envelope is one JSON object with exactly one `source` key
//! (ours) and exactly one `timestamp` key (the app's own string, else ours); the record buffer
//! holds one record per accepted publish, each the record header plus the envelope's bytes.
#![no_main]

use std::fmt;

use libfuzzer_sys::fuzz_target;
use nanogate_protocol::app::{Decoded, Limits, Publish, Request, Stamp, StreamDecoder};
use nanogate_protocol::testing::decode_reads;
use nanogate_sidecar::spool::RecordBuf;
use serde::Deserialize as _;
use serde::de::{self, IgnoredAny, MapAccess, Visitor};

/// Small enough that oversized messages are reached often.
const LIMITS: Limits = Limits {
    max_message_bytes: 4096,
    max_tags: 10,
};
const NOW: &str = "2026-01-01T00:00:00.000Z";
const SOURCE: &str = "ns/pod";
/// `[len u32 LE][crc32 u32 LE]` before each record's payload (sidecar/src/spool.rs).
const RECORD_HEADER: u64 = 8;

/// The stamping step, in one place, as the agent runs it: the entries encoded once
/// (`Stamp`), copied into every envelope (`write_stamped`).
fn stamp(publish: &Publish<'_>, out: &mut Vec<u8>) {
    publish.write_stamped(out, &Stamp::new(NOW, SOURCE));
}

/// The top-level keys `source` and `timestamp` of an object: how often each appears (a JSON
/// parser into a map would hide a duplicate) and their last values.
#[derive(Default)]
struct Stamped {
    sources: Vec<serde_json::Value>,
    timestamps: Vec<serde_json::Value>,
}

impl<'de> serde::Deserialize<'de> for Stamped {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Stamped;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Stamped, A::Error> {
                let mut out = Stamped::default();
                // Keys decoded (escapes resolved): `"sourc\u0065"` is `source`.
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "source" => out.sources.push(map.next_value()?),
                        "timestamp" => out.timestamps.push(map.next_value()?),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
}

/// Checks one envelope against the message it was stamped from.
fn check_envelope(publish: &Publish<'_>, envelope: &[u8]) {
    let mut de = serde_json::Deserializer::from_slice(envelope);
    let stamped = match Stamped::deserialize(&mut de) {
        Ok(s) => s,
        Err(e) => panic!(
            "envelope is not one JSON object ({e}): {}",
            String::from_utf8_lossy(envelope)
        ),
    };
    if let Err(e) = de.end() {
        panic!(
            "trailing bytes after the envelope ({e}): {}",
            String::from_utf8_lossy(envelope)
        );
    }
    let text = || String::from_utf8_lossy(envelope).into_owned();
    assert_eq!(stamped.sources, [SOURCE], "one source, ours: {}", text());
    // The app's own timestamp string is kept; an absent or null one is ours. (Read with the
    // same key counter: a JSON number too large for an f64 is valid JSON the agent forwards
    // as it is, so the app's message is not parsed into a `Value`.)
    let app = match Stamped::deserialize(&mut serde_json::Deserializer::from_slice(publish.raw)) {
        Ok(a) => a,
        Err(e) => panic!(
            "accepted message is not one JSON object ({e}): {}",
            String::from_utf8_lossy(publish.raw)
        ),
    };
    let want = match app.timestamps.first() {
        Some(serde_json::Value::String(ts)) if publish.has_timestamp => ts.clone(),
        _ => NOW.to_owned(),
    };
    assert_eq!(stamped.timestamps, [want], "one timestamp: {}", text());
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the read size (1 to 256 bytes), like a socket's partial reads.
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    let read_size = usize::from(first) + 1;
    let reads: Vec<&[u8]> = input.chunks(read_size).collect();
    let mut records = RecordBuf::new();
    let (mut accepted, mut record_bytes) = (0u64, 0u64);
    let mut envelope = Vec::new();
    decode_reads(&mut StreamDecoder::new(LIMITS), &reads, |step| {
        if let Decoded::Request(Request::Publish(publish)) = step {
            envelope.clear();
            stamp(&publish, &mut envelope);
            check_envelope(&publish, &envelope);
            if !publish.wait {
                records.push_with(|buf| stamp(&publish, buf));
                accepted += 1;
                record_bytes += RECORD_HEADER + envelope.len() as u64;
            }
        }
    });
    assert_eq!(records.count(), accepted, "one record per accepted publish");
    assert_eq!(records.bytes(), record_bytes, "records hold the envelopes");
});

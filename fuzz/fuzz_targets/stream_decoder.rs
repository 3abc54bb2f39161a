//! Fuzzes the app-socket stream decoder: arbitrary bytes, fed whole and split at a point
//! chosen by the input, must never panic, must never buffer more than one message limit plus
//! one read, and must decode the same sequence either way.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nanogate_protocol::app::{Decoded, Limits, Request, StreamDecoder};
use nanogate_protocol::testing::decode_reads;

const LIMITS: Limits = Limits {
    max_message_bytes: 4096,
    max_tags: 10,
};

/// What the decoder made of `chunks`; the buffer bound (one message limit plus one read) is
/// checked after every value.
fn run(chunks: &[&[u8]]) -> Vec<String> {
    decode_reads(&mut StreamDecoder::new(LIMITS), chunks, |step| match step {
        Decoded::NeedMore => unreachable!("the driver stops at NeedMore"),
        Decoded::Request(Request::Publish(p)) => {
            let env = p.to_envelope("2026-01-01T00:00:00Z", "ns/pod");
            // The envelope we write upstream is always valid JSON.
            let v: serde_json::Value = serde_json::from_slice(&env).expect("envelope is JSON");
            drop(v);
            format!("publish {}", String::from_utf8_lossy(&env))
        }
        Decoded::Request(Request::MsgCheck { limit }) => format!("check {limit}"),
        Decoded::Rejected(e) => format!("rejected {}", e.reason()),
        // A fatal error, or the end of the stream inside a value.
        Decoded::Fatal(e) => format!("fatal {}", e.reason()),
    })
}

fuzz_target!(|data: &[u8]| {
    let whole = run(&[data]);
    if let Some((&split, rest)) = data.split_first() {
        let at = split as usize % (rest.len() + 1);
        let parts = run(&[&data[..1], &rest[..at], &rest[at..]]);
        let whole_again = run(&[data]);
        assert_eq!(whole, whole_again);
        // Fatal errors may be detected at different places when bytes arrive later (a value
        // too large is only fatal once enough is buffered), so compare up to the first one.
        let cut = |v: &Vec<String>| {
            v.iter()
                .take_while(|s| !s.starts_with("fatal"))
                .cloned()
                .collect::<Vec<_>>()
        };
        let (a, b) = (cut(&whole), cut(&parts));
        let n = a.len().min(b.len());
        assert_eq!(a[..n], b[..n]);
    }
});

//! Fuzzes the TCP listener's frame decoder (SecureAgentMessaging frames, newline-delimited JSON): arbitrary
//! bytes, fed whole, split at a point chosen by the input, and one byte at a time, must never
//! panic and must decode the same frames either way; every accepted `data` payload must stamp
//! into a JSON object, and every reply built for a frame must be one JSON line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nanogate_protocol::app::Limits;
use nanogate_protocol::tcp::{self, Decoded, FrameDecoder, FrameKind};
use nanogate_protocol::testing::{decode_reads, same_when_split};

/// A small limit so oversized lines are reached often.
const LIMITS: Limits = Limits {
    max_message_bytes: 256,
    max_tags: 10,
};

fn run(chunks: &[&[u8]]) -> Vec<String> {
    decode_reads(&mut FrameDecoder::new(LIMITS), chunks, |step| {
        let mut reply = Vec::new();
        let summary = match step {
            Decoded::NeedMore => unreachable!("the driver stops at NeedMore"),
            Decoded::Frame(frame) => {
                let kind = match frame.kind {
                    FrameKind::Data(publish) => {
                        let env = publish.to_envelope("2026-01-01T00:00:00.000Z", "ns/pod");
                        let v: serde_json::Value =
                            serde_json::from_slice(&env).expect("envelope is JSON");
                        assert!(v.is_object(), "envelope is an object");
                        tcp::write_ack(&mut reply, frame.id, 1);
                        format!("data {}", String::from_utf8_lossy(&env))
                    }
                    FrameKind::Ping => {
                        tcp::write_pong(&mut reply, frame.id, 1);
                        "ping".into()
                    }
                    FrameKind::Close => {
                        tcp::write_close(&mut reply, frame.id, "bye", 1);
                        "close".into()
                    }
                    other => format!("{other:?}"),
                };
                format!("{kind} {:?}", frame.id)
            }
            Decoded::Rejected { id, error } => {
                tcp::write_error(&mut reply, id, &error.to_string(), 1);
                format!("rejected {error} {id:?}")
            }
            Decoded::Fatal(error) => {
                tcp::write_error(&mut reply, None, &error.to_string(), 1);
                format!("fatal {error}")
            }
        };
        if !reply.is_empty() {
            assert_eq!(reply.last(), Some(&b'\n'));
            assert_eq!(reply.iter().filter(|&&b| b == b'\n').count(), 1);
            serde_json::from_slice::<serde_json::Value>(&reply).expect("reply is JSON");
        }
        summary
    })
}

fuzz_target!(|data: &[u8]| {
    let whole = same_when_split(data, run);
    if data.len() <= 512 {
        let bytes: Vec<&[u8]> = data.chunks(1).collect();
        assert_eq!(whole, run(&bytes), "byte-at-a-time decoding differs");
    }
});

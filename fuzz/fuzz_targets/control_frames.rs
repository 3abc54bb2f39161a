//! Fuzzes the control-channel frame decoder (hub ↔ nano-agent): arbitrary bytes, fed whole and
//! split at a point chosen by the input, must never panic, must decode the same messages either
//! way, and every decoded message must re-encode to a frame that decodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nanogate_protocol::control::{FrameDecoder, Message, decode_body, encode};
use nanogate_protocol::testing::{decode_reads, same_when_split};

/// Decoded frames as their re-encoded bytes (floats may be NaN, so compare bytes, not values),
/// up to the first error: a bad frame ends the connection in the hub and the agent.
fn run(chunks: &[&[u8]]) -> Vec<Result<Vec<u8>, String>> {
    decode_reads(&mut FrameDecoder::new(), chunks, |item| {
        item.map(|message| encode(&message))
            .map_err(|error| error.to_string())
    })
}

fuzz_target!(|data: &[u8]| {
    let whole = same_when_split(data, run);
    for frame in whole.into_iter().flatten() {
        let again: Message = decode_body(&frame[4..]).expect("our own encoding decodes");
        assert_eq!(encode(&again), frame, "re-encoding round-trips");
    }
});

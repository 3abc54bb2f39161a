//! Fuzzes the control-channel frame decoder (hub ↔ nano-agent): arbitrary bytes, fed whole and
//! split at a point chosen by the input, must never panic, must decode the same messages either
//! way, and every decoded message must re-encode to a frame that decodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nanogate_protocol::control::{FrameDecoder, Message, decode_body, encode};

/// Decoded frames as their re-encoded bytes (floats may be NaN, so compare bytes, not values).
fn run(chunks: &[&[u8]]) -> Vec<Result<Vec<u8>, String>> {
    let mut decoder = FrameDecoder::new();
    let mut out = Vec::new();
    for chunk in chunks {
        decoder.extend(chunk);
        loop {
            match decoder.next_message() {
                Ok(Some(message)) => out.push(Ok(encode(&message))),
                Ok(None) => break,
                // A bad frame ends the connection in the hub and the agent.
                Err(error) => {
                    out.push(Err(error.to_string()));
                    return out;
                }
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |b| *b as usize % (data.len() + 1));
    let whole = run(&[data]);
    let (a, b) = data.split_at(split);
    assert_eq!(
        whole,
        run(&[a, b]),
        "decoding depends on how the bytes arrive"
    );
    for frame in whole.into_iter().flatten() {
        let again: Message = decode_body(&frame[4..]).expect("our own encoding decodes");
        assert_eq!(encode(&again), frame, "re-encoding round-trips");
    }
});

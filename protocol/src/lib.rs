//! Wire types and codecs shared by `nano-agent` and `nanogate-operator`: the app socket
//! ([`app`]), the TCP listener's frames ([`tcp`]), the control channel ([`control`]), command
//! contracts ([`contract`]) and the sidecar's configuration file ([`sidecar_config`]).
//!
//! Nothing in this crate performs I/O: it turns bytes into typed messages and back, and
//! validates them, so both binaries (and the fuzz targets) agree on one definition.
//!
//! Everything here reads bytes from apps, peers or the hub: nothing may panic on them, so
//! `unwrap`, `expect` and indexing that can panic are refused outside tests.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod control;

pub mod app;
pub mod contract;
pub mod sidecar_config;
pub mod tcp;

/// Helpers of the codecs' property tests.
#[cfg(test)]
pub(crate) mod testing {
    use proptest::sample::Index;

    /// Cuts `input` at the given points (taken modulo its length, sorted): the reads a stream
    /// might arrive in.
    pub fn chunks<'a>(input: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
        let mut at: Vec<usize> = cuts.iter().map(|i| i.index(input.len() + 1)).collect();
        at.sort_unstable();
        let mut out = Vec::with_capacity(at.len() + 1);
        let mut from = 0;
        for to in at {
            out.push(&input[from..to]);
            from = to;
        }
        out.push(&input[from..]);
        out
    }
}

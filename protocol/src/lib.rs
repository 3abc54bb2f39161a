//! Wire types and codecs shared by `nano-agent` and `nanogate-operator`: the app socket
//! ([`app`]), the TCP listener's frames ([`tcp`]), the control channel ([`control`]), command
//! contracts ([`contract`]) and the sidecar's configuration file ([`sidecar_config`]).
//!
//! Nothing in this crate performs I/O: it turns bytes into typed messages and back, and
//! validates them, so both binaries (and the fuzz targets) agree on one definition. The
//! decoders' tests and the fuzz targets drive the decoders through the hidden `testing`.
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
pub mod read_buffer;
pub mod sidecar_config;
pub mod tcp;

#[doc(hidden)]
pub mod testing;

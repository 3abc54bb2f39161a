//! Wire types and codecs shared by `nano-agent` and `nanogate-operator`.
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
pub mod tcp;

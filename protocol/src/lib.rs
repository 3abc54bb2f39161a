//! Wire types and codecs shared by `nano-agent` and `nanogate-operator`.
//!
//! Nothing in this crate performs I/O: it turns bytes into typed messages and back, and
//! validates them, so both binaries (and the fuzz targets) agree on one definition.

pub mod control;

pub mod app;
pub mod contract;
pub mod tcp;

//! The nanogate operator library; `main.rs` only parses flags and calls into it.
pub mod certs;
pub mod webhook;

//! Support code for the cross-crate integration tests in `tests/tests/` (and the sidecar's
//! own integration tests, which use it as a dev-dependency).
//!
//! - [`platform::PlatformServer`]: a real HTTP server implementing the Tendrl platform API the
//!   sidecar's `http` upstream talks to, with fault injection.
//! - [`agent::Agent`]: runs the real `nano-agent` binary as a child process.
//! - [`nats::NatsServer`]: a real `nats-server -js` the sidecar's `nats` upstream talks to.
//! - [`http::http_get`]: a plain GET for admin and monitoring endpoints.
//! - [`cgroup::MemoryCgroup`]: a memory limit like a container's, for the agent's process.

pub mod agent;
pub mod cgroup;
pub mod http;
pub mod nats;
pub mod platform;

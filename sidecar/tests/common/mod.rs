//! Helpers shared by the sidecar's integration tests (real binary, real sockets, real HTTP).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use nanogate_tests::agent::{Agent, AgentConfig};
use nanogate_tests::platform::PlatformServer;

/// Starts the real nano-agent in `dir`, delivering to `platform`.
pub fn start_agent(platform: &PlatformServer, dir: &Path, extra: &[&str]) -> Agent {
    Agent::start(AgentConfig {
        bin: env!("CARGO_BIN_EXE_nano-agent").into(),
        dir: dir.to_owned(),
        upstream_url: platform.url(),
        api_key: platform.api_key().to_owned(),
        extra_args: extra.iter().map(|s| s.to_string()).collect(),
    })
    .expect("starting nano-agent")
}

/// Stateless use: one connection, write, half-close, read everything until the agent closes.
pub fn oneshot(socket: &Path, bytes: &[u8]) -> Vec<u8> {
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// A publish message with a numeric id.
pub fn publish(id: u64) -> String {
    format!(
        r#"{{"msg_type":"publish","data":{{"id":{id},"payload":"the quick brown fox jumps over the lazy dog"}},"context":{{"tags":["load","test"]}}}}"#
    )
}

/// Ids (`data.id`) of received messages.
pub fn ids(msgs: &[serde_json::Value]) -> Vec<u64> {
    msgs.iter()
        .filter_map(|m| m["data"]["id"].as_u64())
        .collect()
}

pub fn python3_available() -> bool {
    std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

pub fn socat_available() -> bool {
    std::process::Command::new("socat")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
}

//! `nanogate-node-reaper <node run directory>`: started by `nanogate_e2e::Node::start` in its
//! own session, it waits for the test process that owns the node to exit — normally (the shared
//! node is never dropped) or by `kill -9` — and then tears the node down from the record in its
//! run directory: containers and shims, mounts, cgroups, bridge, sysctls, log directories (see
//! `nanogate_e2e::node`). Exits at once if the owner dropped the node itself.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: nanogate-node-reaper <node run directory>");
        return ExitCode::from(2);
    };
    match nanogate_e2e::node::reap(&dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("[reaper] {}: {error:#}", dir.display());
            ExitCode::FAILURE
        }
    }
}

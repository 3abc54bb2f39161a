//! `nano-agent`: parses flags and runs the library (see `lib.rs`).
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

use std::process::ExitCode;
use std::time::{Duration, Instant};

use nanogate_sidecar::config::Config;

/// `nano-agent wait-ready [--timeout 120s]`: exits 0 once the app socket accepts connections
/// (the injector's postStart hook in clusters without native sidecars, so app containers start
/// only after the agent is ready), non-zero after the timeout.
fn wait_ready(args: &[String]) -> ExitCode {
    let mut timeout = Duration::from_secs(120);
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let value = match arg.as_str() {
            "--timeout" => iter.next().cloned(),
            other => other.strip_prefix("--timeout=").map(str::to_string),
        };
        match value.map(|v| humantime::parse_duration(&v)) {
            Some(Ok(t)) => timeout = t,
            _ => {
                eprintln!(
                    "usage: nano-agent wait-ready [--timeout 120s] (socket from TENDRL_SOCKET_PATH)"
                );
                return ExitCode::from(2);
            }
        }
    }
    let socket = std::env::var_os("TENDRL_SOCKET_PATH")
        .or_else(|| std::env::var_os("TENDRL_SOCKET"))
        .unwrap_or_else(|| "/var/lib/tendrl/tendrl_agent.sock".into());
    let deadline = Instant::now() + timeout;
    loop {
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            return ExitCode::SUCCESS;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "nano-agent wait-ready: {} not accepting after {timeout:?}",
                socket.to_string_lossy()
            );
            return ExitCode::FAILURE;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("wait-ready") {
        return wait_ready(args.get(2..).unwrap_or_default());
    }
    let config = match Config::load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nano-agent: {e:#}");
            return ExitCode::from(2);
        }
    };
    nanogate_sidecar::init_tracing(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nano-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // On the heap: `block_on` keeps the future it is given on this thread's stack, and the
    // agent's whole state machine there (moved by value on the way) dirtied stack pages that
    // stay in the RSS for the process's life.
    match runtime.block_on(Box::pin(nanogate_sidecar::run(config))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("nano-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

//! Minimal nanogate app-socket client: the standard library and `serde_json`.
//!
//! Copy `send`, `publish` and `check` into your app. Run this program to see all of them work:
//!
//! ```sh
//! TENDRL_SOCKET_PATH=/var/lib/tendrl/tendrl_agent.sock cargo run -p nanogate-example-client
//! ```
//!
//! The protocol (docs/architecture.md "App socket", sidecar/README.md): write one JSON message; replies have no
//! delimiter, so this client uses one connection per request, half-closes its side after
//! writing and reads the reply until the agent closes. An empty reply means "accepted".

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{Value, json};

/// Where the injected nano-agent listens.
fn socket_path() -> PathBuf {
    std::env::var_os("TENDRL_SOCKET_PATH")
        .or_else(|| std::env::var_os("TENDRL_SOCKET"))
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/lib/tendrl/tendrl_agent.sock".into())
}

#[derive(Debug)]
enum Error {
    /// The agent answered `{"status":"error","message":…}`.
    Agent(String),
    /// The agent could not be reached, or answered something unreadable.
    Io(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Agent(message) | Error::Io(message) => f.write_str(message),
        }
    }
}

/// Sends one message; returns the agent's reply, or `None` when it sent none.
fn send(message: &Value) -> Result<Option<Value>, Error> {
    let path = socket_path();
    let io = |e: std::io::Error| {
        Error::Io(format!(
            "cannot talk to nano-agent at {}: {e}",
            path.display()
        ))
    };
    let mut stream = UnixStream::connect(&path).map_err(io)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    stream
        .write_all(message.to_string().as_bytes())
        .map_err(io)?;
    // "That was all": the agent answers, then closes.
    stream.shutdown(Shutdown::Write).map_err(io)?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).map_err(io)?;
    if reply.is_empty() {
        return Ok(None);
    }
    let value: Value =
        serde_json::from_slice(&reply).map_err(|e| Error::Io(format!("unreadable reply: {e}")))?;
    if value["status"] == "error" {
        let message = value["message"].as_str().unwrap_or("unknown error");
        return Err(Error::Agent(message.to_string()));
    }
    Ok(Some(value))
}

/// Publishes `data` (an object or a string). `wait == false`: returns once the agent queued it.
/// `wait == true`: sent at once; returns the platform's reply.
fn publish(data: Value, tags: &[&str], wait: bool) -> Result<Option<Value>, Error> {
    let mut message = json!({"msg_type": "publish", "data": data});
    if !tags.is_empty() || wait {
        message["context"] = json!({"tags": tags, "wait": wait});
    }
    send(&message)
}

/// Messages waiting for this app on the platform (at most `limit`, max 100).
fn check(limit: u32) -> Result<Vec<Value>, Error> {
    match send(&json!({"msg_type": "msg_check", "context": {"limit": limit}}))? {
        Some(Value::Array(messages)) => Ok(messages),
        _ => Ok(Vec::new()), // 204: nothing waiting
    }
}

fn run() -> Result<(), Error> {
    let lang = "rust";
    publish(
        json!({"example": lang, "step": "publish"}),
        &["example", lang],
        false,
    )?;
    println!("publish: accepted");
    let reply = publish(json!({"example": lang, "step": "wait"}), &["example"], true)?;
    println!("publish with wait: {}", reply.unwrap_or(Value::Null));
    println!("msg_check: {}", Value::Array(check(5)?));

    let names: Vec<String> = (0..11).map(|i| format!("t{i}")).collect();
    let tags: Vec<&str> = names.iter().map(String::as_str).collect();
    match publish(json!({"example": lang, "step": "rejected"}), &tags, false) {
        Err(Error::Agent(message)) => println!("error: {message}"),
        other => return Err(Error::Io(format!("expected an error reply, got {other:?}"))),
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("nanogate: {error}");
            ExitCode::FAILURE
        }
    }
}

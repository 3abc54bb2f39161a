//! A plain HTTP/1.0 GET for endpoints on loopback (the agent's `/readyz` and `/metrics`,
//! Prometheus' query API): no client library, no chunked encoding; the server closes the
//! connection after the body.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::Context as _;

/// `GET path` on `addr`: the status code and the body. Connecting may take 2 s, the response
/// `read_timeout`.
pub fn http_get(
    addr: SocketAddr,
    path: &str,
    read_timeout: Duration,
) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(read_timeout))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("HTTP response without a header end")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("HTTP status line")?;
    Ok((code, body.to_string()))
}

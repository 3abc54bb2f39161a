//! The TCP listener (SecureAgentMessaging frames) against the real binary on real sockets: framing that
//! survives split and coalesced writes, data reaching the platform, ping/pong, keep-alive and
//! dead-peer timing, close, oversized frames, bad JSON, token and TLS on a non-loopback
//! address.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nanogate_tests::agent::Agent;
use nanogate_tests::platform::PlatformServer;
use serde_json::{Value, json};

/// Asserts that the frame's `payload.message` starts with `prefix`.
fn assert_message_starts(frame: &Value, prefix: &str) {
    let message = frame["payload"]["message"].as_str().unwrap_or_default();
    assert!(message.starts_with(prefix), "{frame}");
}

/// Starts the agent with the TCP listener on `listen` plus `extra` flags.
fn start_tcp_agent(platform: &PlatformServer, dir: &Path, listen: &str, extra: &[&str]) -> Agent {
    let mut args = vec!["--tcp-listen", listen, "--flush-interval", "20ms"];
    args.extend_from_slice(extra);
    start_agent(platform, dir, &args)
}

/// A peer speaking newline-delimited JSON frames over any stream.
struct Peer<S: Read + Write> {
    r: BufReader<S>,
}

impl Peer<TcpStream> {
    fn connect(addr: SocketAddr) -> Self {
        let s = TcpStream::connect(addr).expect("connect to the TCP listener");
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Peer {
            r: BufReader::new(s),
        }
    }
}

impl<S: Read + Write> Peer<S> {
    fn send(&mut self, bytes: &[u8]) {
        let s = self.r.get_mut();
        s.write_all(bytes).expect("write");
        s.flush().expect("flush");
    }

    fn send_json(&mut self, v: Value) {
        let mut line = serde_json::to_vec(&v).unwrap();
        line.push(b'\n');
        self.send(&line);
    }

    /// The next frame, `None` at EOF (or a reset after the agent closed).
    fn frame(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.r.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => {
                assert!(line.ends_with('\n'), "frame without newline: {line:?}");
                Some(serde_json::from_str(&line).expect("frames from the agent are JSON"))
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("reading a frame: {e}"),
        }
    }

    /// The next frame that is not one of the agent's periodic keep-alives.
    fn reply(&mut self) -> Value {
        loop {
            let f = self.frame().expect("a reply, not EOF");
            if f["type"] != "keepalive" {
                return f;
            }
        }
    }

    /// Reads until EOF; returns the frames seen (keep-alives excluded).
    fn until_eof(&mut self) -> Vec<Value> {
        let mut out = vec![];
        while let Some(f) = self.frame() {
            if f["type"] != "keepalive" {
                out.push(f);
            }
        }
        out
    }
}

fn data_frame(id: u64) -> String {
    format!(
        "{{\"type\":\"data\",\"id\":\"m{id}\",\"timestamp\":1700000000000,\"payload\":{}}}\n",
        publish(id)
    )
}

fn assert_ack(f: &Value, id: &str) {
    assert_eq!(f["type"], "ack", "{f}");
    assert_eq!(f["id"], id, "{f}");
    assert!(f["timestamp"].as_u64().unwrap() > 1_700_000_000_000, "{f}");
}

fn tcp_addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_and_coalesced_frames_reach_the_platform() {
    let platform = PlatformServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut agent = start_tcp_agent(&platform, dir.path(), &format!("127.0.0.1:{port}"), &[]);
    let mut peer = Peer::connect(tcp_addr(port));

    // One data frame split at every byte boundary: two writes with a pause between them so
    // they arrive as two reads.
    let line = data_frame(0);
    let mut sent = 0u64;
    for split in 0..=line.len() {
        let line = data_frame(sent);
        let (a, b) = line.as_bytes().split_at(split);
        peer.send(a);
        std::thread::sleep(Duration::from_millis(2));
        peer.send(b);
        assert_ack(&peer.reply(), &format!("m{sent}"));
        sent += 1;
    }
    // A frame one byte per write.
    let line = data_frame(sent);
    for b in line.as_bytes() {
        peer.send(std::slice::from_ref(b));
    }
    assert_ack(&peer.reply(), &format!("m{sent}"));
    sent += 1;

    // Many frames coalesced in one write, mixed types and a blank line and CRLF: answered in
    // order.
    let mut batch = String::new();
    let first = sent;
    for i in 0..50 {
        batch.push_str(&data_frame(sent));
        sent += 1;
        if i == 10 {
            batch.push_str("{\"type\":\"ping\",\"id\":42}\r\n\n");
        }
        if i == 20 {
            batch.push_str("{\"type\":\"keepalive\"}\n");
        }
    }
    peer.send(batch.as_bytes());
    for i in first..sent {
        assert_ack(&peer.reply(), &format!("m{i}"));
        if i == first + 10 {
            let pong = peer.reply();
            assert_eq!(pong["type"], "pong", "{pong}");
            assert_eq!(pong["id"], 42);
        }
    }

    assert!(
        platform
            .wait_for(sent as usize, Duration::from_secs(10))
            .await,
        "platform got {} of {sent}",
        platform.received_count()
    );
    let got = platform.received();
    let mut ids = ids(&got);
    ids.sort();
    assert_eq!(
        ids,
        (0..sent).collect::<Vec<_>>(),
        "each message exactly once"
    );
    // Stamped exactly like socket messages.
    assert_eq!(got[0]["source"], "test-ns/test-pod");
    assert_eq!(got[0]["msg_type"], "publish");
    assert!(chrono::DateTime::parse_from_rfc3339(got[0]["timestamp"].as_str().unwrap()).is_ok());
    assert_eq!(
        agent.metric("nanogate_sidecar_tcp_received_total"),
        Some(sent as f64)
    );
    assert_eq!(
        agent.metric("nanogate_sidecar_received_total"),
        Some(sent as f64)
    );

    // SIGTERM: the open connection is told `close` ("shutting down"), the listener stops
    // accepting, the agent exits cleanly.
    let status = agent.terminate().unwrap();
    let rest = peer.until_eof();
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert_eq!(rest[0]["type"], "close");
    assert_eq!(rest[0]["payload"]["reason"], "shutting down");
    assert!(status.success(), "{status}");
    assert!(
        TcpStream::connect(tcp_addr(port)).is_err(),
        "no longer listening"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_keepalive_close_and_errors() {
    let platform = PlatformServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let agent = start_tcp_agent(
        &platform,
        dir.path(),
        &format!("127.0.0.1:{port}"),
        &[
            "--max-message-bytes",
            "1KiB",
            "--spool-max-bytes",
            "1MiB",
            "--tcp-keepalive-interval",
            "300ms",
            "--tcp-keepalive-timeout",
            "5s",
        ],
    );
    let mut peer = Peer::connect(tcp_addr(port));

    // ping → pong with the same id (string ids too).
    peer.send(b"{\"type\":\"ping\",\"id\":\"p-1\",\"payload\":{\"message\":\"ping\"}}\n");
    let pong = peer.reply();
    assert_eq!(pong["type"], "pong");
    assert_eq!(pong["id"], "p-1");

    // The agent's keep-alives arrive every interval.
    let t = Instant::now();
    let mut at = vec![];
    while at.len() < 3 {
        let f = peer.frame().unwrap();
        assert_eq!(f["type"], "keepalive", "{f}");
        at.push(t.elapsed());
    }
    let gap = at[2] - at[1];
    assert!(
        gap >= Duration::from_millis(250) && gap <= Duration::from_millis(600),
        "keep-alive every 300 ms, saw {at:?}"
    );

    // A keepalive or pong from the peer has no reply: the next reply is the ping's pong.
    peer.send(
        b"{\"type\":\"keepalive\",\"id\":1}\n{\"type\":\"pong\"}\n{\"type\":\"ping\",\"id\":2}\n",
    );
    assert_eq!(peer.reply()["id"], 2);

    // Bad JSON: an error frame, and the connection goes on (newlines resynchronise).
    peer.send(b"{not json\n");
    let e = peer.reply();
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["payload"]["status"], "error");
    assert_message_starts(&e, "invalid JSON");
    // Unknown type, a data frame whose payload is not a valid message (the socket's own error
    // text), msg_check (not served here), a payload over max_message_bytes: each answered
    // with its id, connection still open.
    peer.send(b"{\"type\":\"shout\",\"id\":3}\n");
    let e = peer.reply();
    assert_eq!(
        (e["type"].as_str(), e["id"].as_u64()),
        (Some("error"), Some(3))
    );
    assert_eq!(e["payload"]["message"], "unknown frame type: shout");
    peer.send(b"{\"type\":\"data\",\"id\":4,\"payload\":{\"data\":{}}}\n");
    let e = peer.reply();
    assert_eq!(e["id"], 4);
    assert_eq!(
        e["payload"],
        json!({"status": "error", "message": "missing msg_type"})
    );
    peer.send(b"{\"type\":\"data\",\"id\":5,\"payload\":{\"msg_type\":\"publish\",\"context\":{\"tags\":[\"1\",\"2\",\"3\",\"4\",\"5\",\"6\",\"7\",\"8\",\"9\",\"10\",\"11\"]}}}\n");
    assert_eq!(
        peer.reply()["payload"]["message"],
        "too many tags provided; maximum is 10"
    );
    peer.send(b"{\"type\":\"data\",\"id\":6,\"payload\":{\"msg_type\":\"msg_check\"}}\n");
    assert_eq!(peer.reply()["id"], 6);
    let big = format!(
        "{{\"type\":\"data\",\"id\":7,\"payload\":{{\"msg_type\":\"publish\",\"data\":\"{}\"}}}}\n",
        "x".repeat(2000)
    );
    peer.send(big.as_bytes());
    let e = peer.reply();
    assert_eq!(e["id"], 7);
    assert_message_starts(&e, "message too large");
    // Still usable.
    peer.send(data_frame(1).as_bytes());
    assert_ack(&peer.reply(), "m1");

    // close → answered with the same id, then EOF.
    peer.send(b"{\"type\":\"close\",\"id\":\"bye\",\"payload\":{\"reason\":\"done\"}}\n");
    let rest = peer.until_eof();
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert_eq!(rest[0]["type"], "close");
    assert_eq!(rest[0]["id"], "bye");

    // A frame over the frame limit (max_message_bytes + 4 KiB) without a newline: an error
    // frame, then the connection is closed.
    let mut peer = Peer::connect(tcp_addr(port));
    peer.send(data_frame(2).as_bytes());
    assert_ack(&peer.reply(), "m2");
    let huge = vec![b'x'; 8 * 1024];
    peer.send(b"{\"type\":\"data\",\"payload\":\"");
    let _ = peer.r.get_mut().write_all(&huge);
    let rest = peer.until_eof();
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert_eq!(rest[0]["type"], "error");
    assert_message_starts(&rest[0], "frame too large");

    assert!(platform.wait_for(2, Duration::from_secs(10)).await);
    assert_eq!(
        agent.metric("nanogate_sidecar_rejected_total{reason=\"unknown_frame_type\"}"),
        Some(1.0)
    );
    assert_eq!(
        agent.metric("nanogate_sidecar_tcp_disconnects_total{reason=\"peer_close\"}"),
        Some(1.0)
    );
    assert_eq!(
        agent.metric("nanogate_sidecar_tcp_disconnects_total{reason=\"frame_too_large\"}"),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peer_is_dropped_after_the_timeout_and_a_talking_one_is_not() {
    let platform = PlatformServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (interval, timeout) = (Duration::from_millis(400), Duration::from_millis(1500));
    let agent = start_tcp_agent(
        &platform,
        dir.path(),
        &format!("127.0.0.1:{port}"),
        &[
            "--tcp-keepalive-interval",
            "400ms",
            "--tcp-keepalive-timeout",
            "1500ms",
        ],
    );

    // A peer that keeps sending keepalives (and never anything else) stays for 3 timeouts.
    let talker = std::thread::spawn(move || {
        let mut peer = Peer::connect(tcp_addr(port));
        let start = Instant::now();
        while start.elapsed() < 3 * timeout {
            peer.send(b"{\"type\":\"keepalive\"}\n");
            std::thread::sleep(Duration::from_millis(500));
        }
        peer.send(b"{\"type\":\"ping\",\"id\":\"still-here\"}\n");
        peer.reply()
    });

    // A peer that sends one frame, then only reads: the agent's own keep-alives keep arriving
    // but do not keep it alive; it is closed `timeout` after its last frame.
    let mut peer = Peer::connect(tcp_addr(port));
    peer.send(b"{\"type\":\"ping\",\"id\":0}\n");
    let last_sent = Instant::now();
    assert_eq!(peer.reply()["type"], "pong");
    let mut keepalives = 0;
    let mut close = None;
    while let Some(f) = peer.frame() {
        match f["type"].as_str() {
            Some("keepalive") => keepalives += 1,
            Some("close") => close = Some(f),
            _ => panic!("unexpected {f}"),
        }
    }
    let dropped_after = last_sent.elapsed();
    let close = close.expect("a close frame before EOF");
    assert!(
        close["payload"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("keep-alive timeout"),
        "{close}"
    );
    eprintln!(
        "silent peer dropped {dropped_after:?} after its last frame (timeout {timeout:?}, interval {interval:?}); {keepalives} keep-alives received meanwhile"
    );
    assert!(
        dropped_after >= timeout - Duration::from_millis(20) && dropped_after <= timeout + interval,
        "dropped after {dropped_after:?}; window [{timeout:?}, {:?}]",
        timeout + interval
    );
    assert!(
        keepalives >= 3,
        "the agent's keep-alives were sent: {keepalives}"
    );

    let pong = talker.join().unwrap();
    assert_eq!(pong["id"], "still-here");
    assert_eq!(
        agent.metric("nanogate_sidecar_tcp_disconnects_total{reason=\"keepalive_timeout\"}"),
        Some(1.0)
    );
}

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn tls_connect(addr: SocketAddr, ca: &Path) -> Peer<TlsStream> {
    let config = nanogate_sidecar::upstream::tls::trusting_only("test CA", ca).unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_nodelay(true).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    Peer {
        r: BufReader::new(rustls::StreamOwned::new(conn, tcp)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_loopback_listener_needs_tls_and_the_token() {
    let platform = PlatformServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let TestPki {
        ca,
        server_cert: cert,
        server_key: key,
        ..
    } = test_pki(dir.path(), "nanogate tcp test CA", "unused client");
    let token = "tcp-token-7f3a9c";

    // "Non-loopback" is about the listen address: 0.0.0.0 accepts connections from every
    // interface. Without a token the agent refuses to start and names the option.
    let port = free_port();
    let listen = format!("0.0.0.0:{port}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nano-agent"))
        .args(["--tcp-listen", &listen, "--socket-path"])
        .arg(dir.path().join("x.sock"))
        .env_remove("NANOGATE_TCP_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tcp_token") && stderr.contains("--tcp-token"),
        "{stderr}"
    );

    let agent = start_agent(
        &platform,
        &dir.path().join("agent"),
        &[
            "--tcp-listen",
            &listen,
            "--tcp-token",
            token,
            "--tcp-tls-cert",
            cert.to_str().unwrap(),
            "--tcp-tls-key",
            key.to_str().unwrap(),
            "--flush-interval",
            "20ms",
        ],
    );
    let addr = tcp_addr(port);

    // Plain TCP to the TLS listener: no frames come back, the connection just ends.
    let mut plain = Peer::connect(addr);
    plain.send(b"{\"type\":\"auth\",\"token\":\"tcp-token-7f3a9c\"}\n");
    let mut junk = Vec::new();
    let _ = plain.r.read_to_end(&mut junk);
    assert!(
        !junk.contains(&b'{'),
        "no frame over plain TCP: {:?}",
        String::from_utf8_lossy(&junk)
    );

    // TLS but no auth frame: the first frame is refused and the connection closed.
    let mut peer = tls_connect(addr, &ca);
    peer.send(data_frame(1).as_bytes());
    let rest = peer.until_eof();
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert_eq!(rest[0]["type"], "error");
    assert_eq!(rest[0]["id"], "m1");
    assert_message_starts(&rest[0], "unauthorized");

    // Wrong token: refused and closed.
    let mut peer = tls_connect(addr, &ca);
    peer.send(b"{\"type\":\"auth\",\"id\":\"a\",\"token\":\"tcp-token-7f3a9d\"}\n");
    let rest = peer.until_eof();
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert_eq!(
        (rest[0]["type"].as_str(), rest[0]["id"].as_str()),
        (Some("error"), Some("a"))
    );

    // Right token: `auth` ok, then data is acknowledged and delivered.
    let mut peer = tls_connect(addr, &ca);
    peer.send_json(json!({"type": "auth", "id": "a", "token": token}));
    let ok = peer.reply();
    assert_eq!(ok["type"], "auth", "{ok}");
    assert_eq!(ok["payload"]["status"], "ok");
    let mut batch = String::new();
    for i in 10..20 {
        batch.push_str(&data_frame(i));
    }
    peer.send(batch.as_bytes());
    for i in 10..20 {
        assert_ack(&peer.reply(), &format!("m{i}"));
    }
    peer.send(b"{\"type\":\"ping\",\"id\":9}\n");
    assert_eq!(peer.reply()["type"], "pong");
    assert!(platform.wait_for(10, Duration::from_secs(10)).await);
    let mut got = ids(&platform.received());
    got.sort();
    assert_eq!(
        got,
        (10..20).collect::<Vec<_>>(),
        "only the authenticated peer's data"
    );

    assert_eq!(
        agent.metric("nanogate_sidecar_tcp_disconnects_total{reason=\"unauthorized\"}"),
        Some(2.0)
    );
    assert!(
        agent.metric("nanogate_sidecar_tcp_disconnects_total{reason=\"tls_handshake\"}")
            >= Some(1.0)
    );
    let log = agent.log_text();
    assert!(log.contains("TCP listener bound"), "{log}");
    assert!(
        !log.contains(token),
        "the token must never be logged:\n{log}"
    );
}

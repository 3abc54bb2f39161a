//! nano-agent benchmark: runs the real release binary against the local platform test server
//! and prints figures side by side with baselines measured in the same run on the same kind of
//! socket (machines are noisy; ratios matter more than absolute numbers).
//!
//! Run: `cargo bench -p nanogate-sidecar --bench agent` (optionally `-- --secs 5`).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nanogate_protocol::app::{Decoded, Limits, StreamDecoder};
use nanogate_tests::agent::{Agent, AgentConfig};
use nanogate_tests::platform::PlatformServer;

/// A ~180-byte publish, as in the issue's ingest benchmark.
fn message(i: u64) -> String {
    let m = format!(
        r#"{{"msg_type":"publish","data":{{"sensor":"temp-{:04}","value":21.5,"unit":"C","seq":{i},"ok":true}},"context":{{"tags":["bench","ingest"],"wait":false}}}}"#,
        i % 10_000
    );
    // Pad to exactly 180 bytes with a string field so every message has the same size.
    let pad = 180usize.saturating_sub(m.len() + 7);
    m.replacen(
        "\"ok\":true",
        &format!("\"ok\":true,\"p\":\"{}\"", "x".repeat(pad)),
        1,
    )
}

/// One buffer of back-to-back messages, written repeatedly by the clients.
fn batch_buffer() -> (Vec<u8>, u64) {
    let mut buf = Vec::new();
    let n = 1000;
    for i in 0..n {
        buf.extend_from_slice(message(i).as_bytes());
    }
    (buf, n)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Writes `buf` over one connection for `secs`; returns messages written.
fn write_for(stream: &mut UnixStream, buf: &[u8], per_buf: u64, secs: Duration) -> u64 {
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < secs {
        stream.write_all(buf).expect("write");
        n += per_buf;
    }
    n
}

/// The app-socket decoder alone, in memory, next to serde_json's own stream deserializer over
/// the same bytes (the floor of any decoder built on it), for whole buffers and for reads of
/// 4,093 bytes (boundaries land inside numbers and strings).
fn decoder_in_memory(buf: &[u8], per: u64, secs: Duration) {
    let rate = |f: &mut dyn FnMut() -> u64| {
        let t = Instant::now();
        let mut n = 0u64;
        while t.elapsed() < secs {
            n += f();
        }
        n as f64 / t.elapsed().as_secs_f64()
    };
    let serde_stream = rate(&mut || {
        serde_json::Deserializer::from_slice(buf)
            .into_iter::<&serde_json::value::RawValue>()
            .map(|v| v.map(|_| 1).unwrap_or(0))
            .sum()
    });
    let decoded = |chunk: usize| {
        rate(&mut || {
            let mut dec = StreamDecoder::new(Limits::default());
            let mut n = 0;
            for part in buf.chunks(chunk) {
                dec.feed(part);
                while let Decoded::Request(_) = dec.next() {
                    n += 1;
                }
            }
            assert_eq!(n, per);
            n
        })
    };
    let (whole, split) = (decoded(buf.len()), decoded(4093));
    println!("app-socket decoder in memory, {per} messages a pass:");
    println!("  serde_json stream, raw values (no validation): {serde_stream:>12.0} msgs/s");
    println!(
        "  StreamDecoder, whole buffer:                   {whole:>12.0} msgs/s  ({:.0}% of serde_json)",
        whole * 100.0 / serde_stream
    );
    println!(
        "  StreamDecoder, 4,093-byte reads:               {split:>12.0} msgs/s  ({:.0}% of serde_json)",
        split * 100.0 / serde_stream
    );
}

/// Baseline server: `mode` "discard" reads and drops bytes; "parse" runs the agent's decoder.
fn baseline(dir: &Path, mode: &'static str, secs: Duration) -> f64 {
    let path = dir.join(format!("{mode}.sock"));
    let listener = UnixListener::bind(&path).unwrap();
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut count = 0u64;
        let mut bytes = 0u64;
        let start = Instant::now();
        if mode == "discard" {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                bytes += n as u64;
            }
        } else {
            let mut dec = StreamDecoder::new(Limits::default());
            loop {
                let b = dec.read_buf(64 * 1024);
                let len = b.len();
                b.resize(b.capacity(), 0);
                let n = s.read(&mut b[len..]).unwrap();
                b.truncate(len + n);
                if n == 0 {
                    break;
                }
                loop {
                    match dec.next() {
                        Decoded::NeedMore => break,
                        Decoded::Request(_) => count += 1,
                        other => panic!("{other:?}"),
                    }
                }
            }
        }
        (count, bytes, start.elapsed())
    });
    let (buf, per) = batch_buffer();
    let mut c = UnixStream::connect(&path).unwrap();
    let sent = write_for(&mut c, &buf, per, secs);
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let (count, bytes, took) = server.join().unwrap();
    let msgs = if mode == "discard" {
        bytes / (buf.len() as u64 / per)
    } else {
        count
    };
    assert_eq!(msgs, sent);
    msgs as f64 / took.as_secs_f64()
}

/// Extra agent flags from `NANOGATE_BENCH_AGENT_ARGS` (whitespace-separated), to compare
/// settings such as `--worker-threads 1` without rebuilding.
fn env_args() -> Vec<String> {
    std::env::var("NANOGATE_BENCH_AGENT_ARGS")
        .map(|s| s.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

fn start_agent(platform: &PlatformServer, dir: &Path, extra: &[&str]) -> Agent {
    let mut args: Vec<String> = ["--spool-max-bytes", "8GiB", "--log-level", "warn"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(env_args());
    Agent::start(AgentConfig {
        bin: agent_bin(),
        dir: dir.to_owned(),
        upstream_url: platform.url(),
        api_key: platform.api_key().to_owned(),
        extra_args: args,
    })
    .expect("starting nano-agent")
}

/// The binary under test: `$NANO_AGENT_BIN` (e.g. the shipped one, which the shipping test
/// copies out of the nano-agent image to `~/.cache/nanogate/image-bin/nano-agent`), else this
/// profile's build.
fn agent_bin() -> std::path::PathBuf {
    std::env::var_os("NANO_AGENT_BIN")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_nano-agent").into())
}

/// A minimal Socket.IO v5 peer for the `socketio` delivery line: plain `ws://` on loopback,
/// acknowledges every event at once and counts the messages of `messages` batches, so the
/// figure is the agent's cost rather than a Python server's.
async fn socketio_peer(listener: tokio::net::TcpListener, count: Arc<AtomicU64>) {
    use futures::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    while let Ok((tcp, _)) = listener.accept().await {
        let count = count.clone();
        tokio::spawn(async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                return;
            };
            let open = r#"0{"sid":"bench","upgrades":[],"pingInterval":25000,"pingTimeout":20000,"maxPayload":100000000}"#;
            let _ = ws.send(Message::text(open)).await;
            while let Some(Ok(msg)) = ws.next().await {
                let Message::Text(text) = msg else { continue };
                let text = text.as_str();
                let reply = if text.starts_with("40") {
                    r#"40{"sid":"bench-ns"}"#.to_owned()
                } else if let Some(rest) = text.strip_prefix("42") {
                    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
                    if digits == 0 {
                        continue; // heartbeat: no acknowledgement asked
                    }
                    let args: serde_json::Value =
                        serde_json::from_str(&rest[digits..]).unwrap_or_default();
                    if args[0] == "messages" {
                        let n = args[1].as_array().map_or(0, Vec::len);
                        count.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    format!("43{}[]", &rest[..digits])
                } else {
                    continue;
                };
                if ws.send(Message::text(reply)).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// `socketio` upstream: `n` messages written at full speed over one connection; delivered
/// msgs/s = n / time until the peer has counted all of them (acknowledged batches).
fn socketio_delivery(rt: &tokio::runtime::Runtime, dir: &Path, n: u64) {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(AtomicU64::new(0));
    rt.spawn(socketio_peer(listener, count.clone()));
    let mut args: Vec<String> = [
        "--upstream-kind",
        "socketio",
        "--spool-max-bytes",
        "8GiB",
        "--log-level",
        "warn",
        "--max-batch-size",
        "1000",
        "--min-batch-size",
        "100",
        "--batch-size",
        "500",
        "--min-batch-interval",
        "0s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(env_args());
    let agent = Agent::start(AgentConfig {
        bin: agent_bin(),
        dir: dir.to_owned(),
        upstream_url: format!("ws://127.0.0.1:{port}"),
        api_key: String::new(),
        extra_args: args,
    })
    .expect("starting nano-agent (socketio)");
    // Connected: the peer answered the namespace CONNECT.
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.metric("nanogate_sidecar_upstream_connection_state") != Some(2.0) {
        assert!(
            Instant::now() < deadline,
            "agent did not connect to the peer"
        );
        thread::sleep(Duration::from_millis(20));
    }
    let (buf, per) = batch_buffer();
    let t = Instant::now();
    let mut c = UnixStream::connect(&agent.socket).unwrap();
    for _ in 0..n / per {
        c.write_all(&buf).unwrap();
    }
    while count.load(Ordering::Relaxed) < n {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "socketio delivery stalled"
        );
        thread::sleep(Duration::from_millis(2));
    }
    let took = t.elapsed().as_secs_f64();
    println!(
        "delivery, socketio upstream to a local Socket.IO peer (ws://, tuned knobs as above): {:.0} msgs/s ({n} msgs in {took:.2} s)",
        n as f64 / took
    );
}

/// `nats` upstream: `n` messages written at full speed over one connection to an agent
/// publishing to a local `nats-server -js`; delivered msgs/s = n / time until JetStream has
/// acknowledged all of them (the agent's delivered counter). Skipped without nats-server.
fn nats_delivery(dir: &Path, n: u64) {
    use nanogate_tests::nats::{NatsServer, nats_server_bin};
    if nats_server_bin().is_none() {
        println!(
            "delivery, nats upstream: SKIPPED (nats-server not installed: apt-get install -y nats-server)"
        );
        return;
    }
    let nats = NatsServer::start(&dir.join("nats")).expect("starting nats-server");
    let mut args: Vec<String> = [
        "--upstream-kind",
        "nats",
        "--gateway",
        "bench",
        "--spool-max-bytes",
        "8GiB",
        "--log-level",
        "warn",
        "--max-batch-size",
        "1000",
        "--min-batch-size",
        "100",
        "--batch-size",
        "500",
        "--min-batch-interval",
        "0s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(env_args());
    let agent = Agent::start(AgentConfig {
        bin: env!("CARGO_BIN_EXE_nano-agent").into(),
        dir: dir.join("agent"),
        upstream_url: nats.url(),
        api_key: String::new(),
        extra_args: args,
    })
    .expect("starting nano-agent (nats)");
    // A msg_check answered 204 means connected, stream and consumer in place.
    let mut c = UnixStream::connect(&agent.socket).unwrap();
    c.write_all(br#"{"msg_type":"msg_check"}"#).unwrap();
    let mut reply = [0u8; 1024];
    let got = c.read(&mut reply).unwrap();
    assert_eq!(&reply[..got], b"204", "agent not connected to nats-server");
    let (buf, per) = batch_buffer();
    let delivered = || {
        agent
            .metric("nanogate_sidecar_delivered_total")
            .unwrap_or(0.0) as u64
    };
    let t = Instant::now();
    for _ in 0..n / per {
        c.write_all(&buf).unwrap();
    }
    while delivered() < n {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "nats delivery stalled"
        );
        thread::sleep(Duration::from_millis(5));
    }
    let took = t.elapsed().as_secs_f64();
    println!(
        "delivery, nats upstream to a local nats-server -js (JetStream ack per message, Nats-Msg-Id; tuned knobs as above): {:.0} msgs/s ({n} msgs in {took:.2} s)",
        n as f64 / took
    );
}

/// TCP listener (SecureAgentMessaging frames): the same messages as data frames, written over one TCP
/// connection for `secs` while a reader thread counts the agent's acks (an ack means appended
/// to the spool). Run twice: with the platform down, acknowledged frames/s is ingest alone
/// (comparable with the socket line above); with the platform up, delivered frames/s runs until
/// the local platform has every frame (tuned delivery knobs, delivery concurrent with ingest).
fn tcp_listener_ingest(platform: &PlatformServer, dir: &Path, secs: Duration) {
    use std::io::BufRead as _;
    let mut buf = Vec::new();
    let per = 1000u64;
    for i in 0..per {
        buf.extend_from_slice(
            format!(
                "{{\"type\":\"data\",\"id\":{i},\"payload\":{}}}\n",
                message(i)
            )
            .as_bytes(),
        );
    }
    for platform_up in [false, true] {
        platform.faults().set_down(!platform_up);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listen = format!("127.0.0.1:{port}");
        let agent = start_agent(
            platform,
            &dir.join(if platform_up { "up" } else { "down" }),
            &[
                "--tcp-listen",
                &listen,
                "--max-batch-size",
                "1000",
                "--min-batch-size",
                "100",
                "--batch-size",
                "500",
                "--min-batch-interval",
                "0s",
                "--backoff-max",
                "100ms",
                "--backoff-initial",
                "10ms",
            ],
        );
        let base = platform.received_count();
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        conn.set_nodelay(true).unwrap();
        let acks = Arc::new(AtomicU64::new(0));
        let reader = {
            let (acks, stream) = (acks.clone(), conn.try_clone().unwrap());
            thread::spawn(move || {
                let mut r = std::io::BufReader::with_capacity(256 * 1024, stream);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    if r.read_until(b'\n', &mut line).unwrap() == 0 {
                        return;
                    }
                    if line.starts_with(b"{\"type\":\"ack\"") {
                        acks.fetch_add(1, Ordering::Relaxed);
                    } else if line.starts_with(b"{\"type\":\"close\"") {
                        return; // the agent's answer to our half-close
                    } else if !line.starts_with(b"{\"type\":\"keepalive\"") {
                        panic!("unexpected frame {}", String::from_utf8_lossy(&line));
                    }
                }
            })
        };
        let t = Instant::now();
        let mut sent = 0;
        while t.elapsed() < secs {
            conn.write_all(&buf).unwrap();
            sent += per;
        }
        while acks.load(Ordering::Relaxed) < sent {
            assert!(t.elapsed() < secs + Duration::from_secs(60), "acks stalled");
            thread::sleep(Duration::from_millis(1));
        }
        let acked = t.elapsed().as_secs_f64();
        // Done sending: waiting silently for delivery would end in the agent's keep-alive
        // timeout (30 s) once delivery takes that long.
        conn.shutdown(std::net::Shutdown::Write).unwrap();
        if !platform_up {
            println!(
                "  nano-agent TCP listener:   {:>12.0} data frames/s acknowledged (same messages as data frames, one TCP connection, an ack per frame; {sent} frames)",
                sent as f64 / acked
            );
        } else {
            while platform.received_count() < base + sent as usize {
                assert!(
                    t.elapsed() < secs + Duration::from_secs(120),
                    "TCP delivery stalled"
                );
                thread::sleep(Duration::from_millis(2));
            }
            let delivered = t.elapsed().as_secs_f64();
            println!(
                "delivery, TCP listener end to end (data frames written for {} s, platform up, tuned knobs): {:.0} frames/s delivered to the local platform ({:.0} frames/s acknowledged meanwhile; {sent} frames in {delivered:.2} s)",
                secs.as_secs(),
                sent as f64 / delivered,
                sent as f64 / acked
            );
        }
        reader.join().unwrap();
        drop(agent);
    }
}

/// Client threads and connections each keeps in flight for the connections line: enough
/// concurrency that the client is not what is measured (the bare baseline below uses the
/// same client and shows its ceiling).
const CONN_CLIENT_THREADS: usize = 2;
const CONN_IN_FLIGHT: usize = 16;

/// One publish per connection (the Tendrl SDKs' stateless pattern: connect, write, shutdown(WR),
/// read to EOF) from `CONN_CLIENT_THREADS` threads with `CONN_IN_FLIGHT` connections in
/// flight each, for `secs`. Counts only connections answered with EOF and nothing else
/// (accepted); any other answer fails the bench. Returns (connections/s, accepted count).
fn connections_per_sec(path: &Path, secs: Duration) -> (f64, u64) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let stop = Arc::new(AtomicBool::new(false));
    let conns = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..CONN_CLIENT_THREADS)
        .map(|_| {
            let (stop, conns, path) = (stop.clone(), conns.clone(), path.to_owned());
            thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let tasks: Vec<_> = (0..CONN_IN_FLIGHT)
                        .map(|_| {
                            let (stop, conns, path) = (stop.clone(), conns.clone(), path.clone());
                            tokio::spawn(async move {
                                let msg = message(7);
                                let mut out = Vec::new();
                                while !stop.load(Ordering::Relaxed) {
                                    let mut c =
                                        tokio::net::UnixStream::connect(&path).await.unwrap();
                                    c.write_all(msg.as_bytes()).await.unwrap();
                                    c.shutdown().await.unwrap();
                                    out.clear();
                                    c.read_to_end(&mut out).await.unwrap();
                                    assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
                                    conns.fetch_add(1, Ordering::Relaxed);
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.unwrap();
                    }
                });
            })
        })
        .collect();
    thread::sleep(secs);
    stop.store(true, Ordering::Relaxed);
    workers.into_iter().for_each(|w| w.join().unwrap());
    let n = conns.load(Ordering::Relaxed);
    (n as f64 / start.elapsed().as_secs_f64(), n)
}

/// Baseline for connections/s: a bare server thread that accepts, reads to EOF and closes.
fn bare_connections_per_sec(dir: &Path, secs: Duration) -> f64 {
    let path = dir.join("bare.sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    listener.set_nonblocking(false).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let server = {
        let done = done.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            for s in listener.incoming() {
                if done.load(Ordering::Relaxed) {
                    break;
                }
                let mut s = s.unwrap();
                while s.read(&mut buf).unwrap_or(0) > 0 {}
            }
        })
    };
    let (cps, _) = connections_per_sec(&path, secs);
    done.store(true, Ordering::Relaxed);
    let _ = UnixStream::connect(&path);
    server.join().unwrap();
    cps
}

/// The connections line: the agent and the bare baseline, alternated `rounds` times in the
/// same run (the machine is shared; alternating spreads the noise over both). Every
/// connection counted must be in the agent's `received_total`.
fn connections_line(agent: &Agent, dir: &Path, secs: Duration, rounds: usize) {
    let base = agent
        .metric("nanogate_sidecar_received_total")
        .unwrap_or(0.0) as u64;
    let (mut agent_cps, mut bare_cps, mut total) = (vec![], vec![], 0);
    for _ in 0..rounds {
        let (cps, n) = connections_per_sec(&agent.socket, secs);
        agent_cps.push(cps);
        total += n;
        bare_cps.push(bare_connections_per_sec(dir, secs));
    }
    let received = agent
        .metric("nanogate_sidecar_received_total")
        .unwrap_or(0.0) as u64;
    assert_eq!(
        received - base,
        total,
        "every connection counted was accepted (received_total)"
    );
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mid = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "connections (one publish per connection, {CONN_CLIENT_THREADS} client threads x {CONN_IN_FLIGHT} in flight, {rounds} alternated rounds of {} s):",
        secs.as_secs()
    );
    println!(
        "  nano-agent:                    {}/s  (median {:.0}; {total} connections, all in received_total)",
        fmt(&agent_cps),
        mid(&mut agent_cps.clone())
    );
    println!(
        "  bare accept-read-close thread: {}/s  (median {:.0})",
        fmt(&bare_cps),
        mid(&mut bare_cps.clone())
    );
    println!(
        "  ratio of medians: {:.0}%",
        mid(&mut agent_cps) * 100.0 / mid(&mut bare_cps)
    );
}

/// Round trips of `request` over one persistent connection: `rounds` rounds of 10,000 after
/// 1,000 of warm-up; every reply must satisfy `reply_ok`.
fn round_trips(
    stream: &mut (impl Read + Write),
    request: &[u8],
    reply_ok: impl Fn(&[u8]) -> bool,
    rounds: usize,
) -> Vec<Duration> {
    let mut buf = [0u8; 1024];
    let mut lat = Vec::with_capacity(rounds * 10_000);
    for i in 0..(rounds * 10_000 + 1000) {
        let t = Instant::now();
        stream.write_all(request).unwrap();
        let n = stream.read(&mut buf).unwrap();
        if i >= 1000 {
            lat.push(t.elapsed());
        }
        assert!(
            reply_ok(&buf[..n]),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    lat.sort();
    lat
}

/// [`round_trips`] of `msg_check` over a new connection to `socket`, expecting `204`.
fn msg_check_round_trips(socket: &Path, rounds: usize) -> Vec<Duration> {
    let mut s = UnixStream::connect(socket).unwrap();
    round_trips(
        &mut s,
        br#"{"msg_type":"msg_check"}"#,
        |r| r == b"204",
        rounds,
    )
}

/// `msg_check` round trips on an idle agent (empty platform queue) with the default
/// `--msg-check-cache` (polls answered from the platform's last empty answer), next to the
/// same agent setup asking the platform on every poll (`--msg-check-cache 0s`) and to the
/// bare HTTP round trip from this process to the same platform endpoint over one kept-alive
/// TCP connection (the platform's and loopback's share of the uncached figure).
fn msg_check_latency(agent: &Agent, uncached: &Agent, platform: &PlatformServer, rounds: usize) {
    let cached = msg_check_round_trips(&agent.socket, rounds);
    let uncached_lat = msg_check_round_trips(&uncached.socket, rounds);
    let mut http =
        std::net::TcpStream::connect(platform.url().trim_start_matches("http://")).unwrap();
    http.set_nodelay(true).unwrap();
    let get = format!(
        "GET /entities/check_messages?limit=1 HTTP/1.1\r\nhost: bench\r\nauthorization: Bearer {}\r\n\r\n",
        platform.api_key()
    );
    let direct = round_trips(
        &mut http,
        get.as_bytes(),
        |r| r.starts_with(b"HTTP/1.1 204"),
        rounds,
    );
    // A bare echo thread answering `204` on its own Unix socket: the floor of any
    // request/reply between two processes' threads on this machine.
    let echo_path = agent.socket.with_file_name("echo.sock");
    let echo = UnixListener::bind(&echo_path).unwrap();
    thread::spawn(move || {
        let (mut c, _) = echo.accept().unwrap();
        let mut b = [0u8; 1024];
        while let Ok(n) = c.read(&mut b) {
            if n == 0 || c.write_all(b"204").is_err() {
                break;
            }
        }
    });
    let echo_lat = msg_check_round_trips(&echo_path, rounds);
    let line = |lat: &[Duration]| {
        format!(
            "p50 {:>9.1?}  p90 {:>9.1?}  p99 {:>9.1?}  p99.9 {:>9.1?}  max {:>9.1?}",
            percentile(lat, 0.5),
            percentile(lat, 0.9),
            percentile(lat, 0.99),
            percentile(lat, 0.999),
            lat[lat.len() - 1]
        )
    };
    println!(
        "msg_check round trip on an idle agent, one persistent connection (n={} each):",
        cached.len()
    );
    println!(
        "  nano-agent (default --msg-check-cache 100ms): {}",
        line(&cached)
    );
    println!(
        "  nano-agent --msg-check-cache 0s (HTTP each): {}",
        line(&uncached_lat)
    );
    println!(
        "  baseline: the GET alone, bench → platform:   {}",
        line(&direct)
    );
    println!(
        "  baseline: bare echo thread, same socket kind: {}",
        line(&echo_lat)
    );
    println!(
        "  platform requests for the cached polls: about one per 100 ms (nanogate_sidecar_msg_check_cached_total {} of {})",
        agent
            .metric("nanogate_sidecar_msg_check_cached_total")
            .unwrap_or(0.0),
        agent
            .metric("nanogate_sidecar_msg_check_total")
            .unwrap_or(0.0)
    );
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs = args
        .iter()
        .position(|a| a == "--secs")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(5u64);
    let secs = Duration::from_secs(secs);
    // `--only latency,connections,ingest,tcp,delivery` runs a subset (default: all).
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.split(',').map(str::to_owned).collect());
    let want = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == name));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let platform = rt.block_on(PlatformServer::start()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let bin = agent_bin();
    println!(
        "nano-agent bench ({} s per throughput run, message size {} bytes)\n  binary: {} ({:.1} MiB; set NANO_AGENT_BIN to bench another build)",
        secs.as_secs(),
        message(1).len(),
        bin.display(),
        std::fs::metadata(&bin).map_or(0, |m| m.len()) as f64 / (1024.0 * 1024.0)
    );

    // ---- idle memory and msg_check latency on a fresh agent ----
    let agent = start_agent(&platform, &tmp.path().join("a1"), &[]);
    if want("latency") {
        let pid = agent.pid().unwrap();
        thread::sleep(Duration::from_millis(1500));
        let rss_idle = rss_kib(pid);
        let uncached = start_agent(
            &platform,
            &tmp.path().join("a1-uncached"),
            &["--msg-check-cache", "0s"],
        );
        msg_check_latency(&agent, &uncached, &platform, 3);
        println!("RSS idle: {:.1} MiB", rss_idle as f64 / 1024.0);
    }

    // ---- connections per second (one message per connection) ----
    if want("connections") {
        // Ingest alone, as for the ingest line: the local platform server shares this
        // process and the 2 cores with the clients, so delivery (measured below) is paused.
        platform.faults().set_down(true);
        connections_line(&agent, tmp.path(), secs, 3);
        platform.faults().set_down(false);
    }
    drop(agent);
    if !(want("ingest") || want("tcp") || want("delivery")) {
        return;
    }

    // ---- ingest: baselines and agent over one persistent connection ----
    let (buf, per) = batch_buffer();
    if want("ingest") {
        decoder_in_memory(&buf, per, secs);
        let discard = baseline(tmp.path(), "discard", secs);
        let parse = baseline(tmp.path(), "parse", secs);
        platform.faults().set_down(true); // measure ingest alone; delivery is measured below
        let agent = start_agent(&platform, &tmp.path().join("a2"), &[]);
        let pid = agent.pid().unwrap();
        let peak = Arc::new(AtomicU64::new(0));
        let sampling = Arc::new(AtomicBool::new(true));
        let sampler = {
            let (peak, sampling) = (peak.clone(), sampling.clone());
            thread::spawn(move || {
                while sampling.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                    thread::sleep(Duration::from_millis(50));
                }
            })
        };
        let mut c = UnixStream::connect(&agent.socket).unwrap();
        let t = Instant::now();
        let sent = write_for(&mut c, &buf, per, secs);
        // The reply to a request written after the publishes proves they were all processed
        // (appended to the spool); with the platform down it is an upstream error.
        c.write_all(br#"{"msg_type":"msg_check"}"#).unwrap();
        let n = c.read(&mut [0u8; 1024]).unwrap();
        let took = t.elapsed();
        assert!(n > 0);
        sampling.store(false, Ordering::Relaxed);
        sampler.join().unwrap();
        let ingest = sent as f64 / took.as_secs_f64();
        let received = agent
            .metric("nanogate_sidecar_received_total")
            .unwrap_or(0.0) as u64;
        assert_eq!(received, sent, "every message accepted");
        println!("ingest, one persistent connection, publish wait=false, spool on:");
        println!("  read-and-discard baseline: {discard:>12.0} msgs/s");
        println!("  parse-only baseline:       {parse:>12.0} msgs/s");
        println!(
            "  nano-agent:                {ingest:>12.0} msgs/s  ({:.0}% of parse-only, {:.0}% of discard; {sent} msgs, spool {:.0} MiB)",
            ingest * 100.0 / parse,
            ingest * 100.0 / discard,
            agent.metric("nanogate_sidecar_spool_bytes").unwrap_or(0.0) / 1048576.0
        );
        println!(
            "RSS during ingest (peak): {:.1} MiB",
            peak.load(Ordering::Relaxed) as f64 / 1024.0
        );
        drop(c);
        drop(agent);
    }
    if want("tcp") {
        tcp_listener_ingest(&platform, &tmp.path().join("tcp"), secs);
    }
    if !want("delivery") {
        return;
    }

    // ---- delivery: preload the spool with the platform down, then time the drain ----
    for (label, extra, n) in [
        (
            "default knobs (max_batch_size 200, min_batch_interval 100ms)",
            vec![],
            10_000u64,
        ),
        (
            "tuned (--max-batch-size 1000 --min-batch-size 100 --batch-size 500 --min-batch-interval 0s)",
            vec![
                "--max-batch-size",
                "1000",
                "--min-batch-size",
                "100",
                "--batch-size",
                "500",
                "--min-batch-interval",
                "0s",
            ],
            200_000,
        ),
    ] {
        platform.faults().set_down(true);
        let dir = tmp.path().join(format!("d{n}"));
        let mut extra = extra;
        extra.extend_from_slice(&["--backoff-max", "100ms", "--backoff-initial", "10ms"]);
        let agent = start_agent(&platform, &dir, &extra);
        let mut c = UnixStream::connect(&agent.socket).unwrap();
        for chunk in 0..n / per {
            let _ = chunk;
            c.write_all(&buf).unwrap();
        }
        c.write_all(br#"{"msg_type":"msg_check"}"#).unwrap();
        let _ = c.read(&mut [0u8; 1024]).unwrap();
        let (base_msgs, base_batches) = (platform.received_count(), platform.batches());
        let t = Instant::now();
        platform.faults().set_down(false);
        let target = base_msgs + n as usize;
        while platform.received_count() < target {
            thread::sleep(Duration::from_millis(5));
        }
        let took = t.elapsed().as_secs_f64();
        let batches = platform.batches() - base_batches;
        println!(
            "delivery, {label}: {:.0} msgs/s, {:.0} batches/s ({n} msgs in {took:.2} s)",
            n as f64 / took,
            batches as f64 / took
        );
    }
    socketio_delivery(&rt, &tmp.path().join("sio"), 200_000);
    nats_delivery(&tmp.path().join("nats"), 200_000);
    drop(rt);
}

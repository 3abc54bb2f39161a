//! nano-agent benchmark: runs the real release binary against the local platform test server
//! and prints figures side by side with baselines measured in the same run on the same kind of
//! socket (machines are noisy; ratios matter more than absolute numbers).
//!
//! Run: `cargo bench -p nanogate-sidecar --bench agent` (optionally `-- --secs 5`,
//! `-- --only ingest`, `-- --shipped` for the image's musl build).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nanogate_protocol::app::{Decoded, Limits, Request, Stamp, StreamDecoder};
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
                dec.input.feed(part);
                while let Decoded::Request(_) = dec.next() {
                    n += 1;
                }
            }
            assert_eq!(n, per);
            n
        })
    };
    let serde_value = rate(&mut || {
        serde_json::Deserializer::from_slice(buf)
            .into_iter::<serde_json::Value>()
            .map(|v| v.map(|_| 1).unwrap_or(0))
            .sum()
    });
    // What the agent does to a read besides I/O: decode, stamp, frame as spool records.
    let mut recs = nanogate_sidecar::spool::RecordBuf::new();
    let stamped = rate(&mut || {
        let mut dec = StreamDecoder::new(Limits::default());
        dec.input.feed(buf);
        recs.clear();
        // Once per read, as the agent does.
        let stamp = Stamp::new("2026-12-04T13:00:00.000Z", "ns/pod");
        while let Decoded::Request(Request::Publish(p)) = dec.next() {
            recs.push_with(|b| p.write_stamped(b, &stamp));
        }
        assert_eq!(recs.count(), per);
        per
    });
    let (whole, split) = (decoded(buf.len()), decoded(4093));
    println!("app-socket decoder in memory, {per} messages a pass:");
    println!("  serde_json stream, raw values (no validation): {serde_stream:>12.0} msgs/s");
    println!("  serde_json stream, serde_json::Value:           {serde_value:>12.0} msgs/s");
    println!(
        "  StreamDecoder + stamping + spool framing:       {stamped:>12.0} msgs/s  ({:.0}% of serde_json::Value)",
        stamped * 100.0 / serde_value
    );
    println!(
        "  StreamDecoder, whole buffer:                   {whole:>12.0} msgs/s  ({:.0}% of serde_json)",
        whole * 100.0 / serde_stream
    );
    println!(
        "  StreamDecoder, 4,093-byte reads:               {split:>12.0} msgs/s  ({:.0}% of serde_json)",
        split * 100.0 / serde_stream
    );
}

/// Baseline server over the same kind of socket: `mode` "discard" reads and drops bytes;
/// "value" parses each message naively into a `serde_json::Value` (the issue's parse-only
/// baseline: what a server that only parses would cost); "decoder" runs the agent's own
/// decoder (validation included) with no stamping and no spool.
fn baseline(dir: &Path, mode: &'static str, secs: Duration) -> f64 {
    let path = dir.join(format!("{mode}.sock"));
    let _ = std::fs::remove_file(&path); // an earlier round's
    let listener = UnixListener::bind(&path).unwrap();
    let server = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut count = 0u64;
        let mut bytes = 0u64;
        let start = Instant::now();
        let mut dec = StreamDecoder::new(Limits::default());
        loop {
            let b = dec.input.read_buf(64 * 1024);
            let len = b.len();
            b.resize(b.capacity(), 0);
            let n = s.read(&mut b[len..]).unwrap();
            b.truncate(len + n);
            if n == 0 {
                break;
            }
            match mode {
                "discard" => {
                    bytes += n as u64;
                    b.clear();
                }
                "value" => {
                    let mut values =
                        serde_json::Deserializer::from_slice(b).into_iter::<serde_json::Value>();
                    let mut used = 0;
                    loop {
                        match values.next() {
                            Some(Ok(_)) => {
                                count += 1;
                                used = values.byte_offset();
                            }
                            Some(Err(e)) if e.is_eof() => break,
                            Some(Err(e)) => panic!("{e}"),
                            None => break,
                        }
                    }
                    b.drain(..used);
                }
                _ => loop {
                    match dec.next() {
                        Decoded::NeedMore => break,
                        Decoded::Request(_) => count += 1,
                        other => panic!("{other:?}"),
                    }
                },
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

/// The socket ingest line: one persistent connection, publish wait:false, spool on, platform
/// down (ingest alone). The agent and the two parsing baselines are alternated `rounds` times
/// in the same run (the machine is shared: alternating spreads the noise over all three);
/// medians are compared. Every message written must be in the agent's `received_total`.
fn ingest_line(
    platform: &PlatformServer,
    dir: &Path,
    buf: &[u8],
    per: u64,
    secs: Duration,
    rounds: usize,
) {
    let discard = baseline(dir, "discard", secs);
    platform.faults().set_down(true); // delivery is measured below
    let agent = start_agent(platform, &dir.join("a2"), &[]);
    let rss = PeakRss::start(agent.pid().unwrap());
    let mut c = UnixStream::connect(&agent.socket).unwrap();
    let (mut value, mut decoder, mut ingest, mut sent) = (vec![], vec![], vec![], 0);
    for _ in 0..rounds {
        value.push(baseline(dir, "value", secs));
        decoder.push(baseline(dir, "decoder", secs));
        let t = Instant::now();
        let n = write_for(&mut c, buf, per, secs);
        // The reply to a request written after the publishes proves they were all processed
        // (appended to the spool); with the platform down it is an upstream error.
        c.write_all(br#"{"msg_type":"msg_check"}"#).unwrap();
        assert!(c.read(&mut [0u8; 1024]).unwrap() > 0);
        ingest.push(n as f64 / t.elapsed().as_secs_f64());
        sent += n;
    }
    let peak = rss.stop();
    let received = agent
        .metric("nanogate_sidecar_received_total")
        .unwrap_or(0.0) as u64;
    assert_eq!(received, sent, "every message accepted");
    let (v, d, i) = (median(&value), median(&decoder), median(&ingest));
    println!(
        "ingest, one persistent connection, publish wait=false, spool on ({rounds} alternated rounds of {} s; medians):",
        secs.as_secs()
    );
    println!("  read-and-discard baseline:                 {discard:>10.0} msgs/s");
    println!(
        "  parse-only baseline (serde_json::Value):   {v:>10.0} msgs/s  ({})",
        list(&value)
    );
    println!(
        "  the agent's decoder alone (no stamp/spool): {d:>9.0} msgs/s  ({})",
        list(&decoder)
    );
    println!(
        "  nano-agent:                                {i:>10.0} msgs/s  ({}; {sent} msgs, spool {:.0} MiB)",
        list(&ingest),
        agent.metric("nanogate_sidecar_spool_bytes").unwrap_or(0.0) / 1048576.0
    );
    println!(
        "  ratio of medians: {:.0}% of parse-only (target >= 100%), {:.0}% of its decoder alone, {:.1}% of discard",
        i * 100.0 / v,
        i * 100.0 / d,
        i * 100.0 / discard
    );
    println!("RSS during ingest (peak): {peak:.1} MiB");
}

/// The median of `v` (the upper one of an even count).
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// `v` as a comma-separated list of whole numbers.
fn list(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Extra agent flags from `NANOGATE_BENCH_AGENT_ARGS` (whitespace-separated), to compare
/// settings such as `--worker-threads 1` without rebuilding.
fn env_args() -> Vec<String> {
    std::env::var("NANOGATE_BENCH_AGENT_ARGS")
        .map(|s| s.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// The tuned delivery knobs of the delivery, socketio, nats and TCP lines.
const TUNED: [&str; 8] = [
    "--max-batch-size",
    "1000",
    "--min-batch-size",
    "100",
    "--batch-size",
    "500",
    "--min-batch-interval",
    "0s",
];

/// Starts the agent under test against `upstream_url` with the bench's common flags (a spool
/// that never fills, warnings only), then `extra`, then `NANOGATE_BENCH_AGENT_ARGS`.
fn start_agent_to(dir: &Path, upstream_url: String, api_key: &str, extra: &[&str]) -> Agent {
    let mut args: Vec<String> = ["--spool-max-bytes", "8GiB", "--log-level", "warn"]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
    args.extend(env_args());
    Agent::start(AgentConfig {
        bin: agent_bin(),
        dir: dir.to_owned(),
        upstream_url,
        api_key: api_key.to_owned(),
        extra_args: args,
    })
    .expect("starting nano-agent")
}

fn start_agent(platform: &PlatformServer, dir: &Path, extra: &[&str]) -> Agent {
    start_agent_to(dir, platform.url(), platform.api_key(), extra)
}

/// Peak RSS of a process, sampled every 50 ms by a thread until [`PeakRss::stop`].
struct PeakRss {
    peak: Arc<AtomicU64>,
    sampling: Arc<AtomicBool>,
    sampler: thread::JoinHandle<()>,
}

impl PeakRss {
    fn start(pid: u32) -> Self {
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
        Self {
            peak,
            sampling,
            sampler,
        }
    }

    /// Stops sampling; the peak in MiB.
    fn stop(self) -> f64 {
        self.sampling.store(false, Ordering::Relaxed);
        self.sampler.join().unwrap();
        self.peak.load(Ordering::Relaxed) as f64 / 1024.0
    }
}

/// CPU time (user + system) the process has used so far, from `/proc/<pid>/stat`.
fn cpu_secs(pid: u32) -> f64 {
    // Clock ticks per second: 100 on every Linux the agent ships for (USER_HZ).
    const TICKS: f64 = 100.0;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) as f64 / TICKS
}

/// End-to-end pipelined delivery: one persistent connection writes as fast as delivery drains
/// (at most `BACKLOG` messages ahead of the platform, so the spool stays small), the agent
/// delivers to the local platform with `latency` added to every request; returns msgs/s
/// delivered and the agent's CPU seconds per million messages delivered, measured after a
/// warm-up of a third of `secs`, and the mean number of batch requests outstanding at the
/// platform (sampled every 10 ms there: scraping the agent would cost it CPU), and the agent's
/// peak RSS over the whole row (ingest and delivery at once).
fn pipeline_row(
    platform: &PlatformServer,
    dir: &Path,
    extra: &[&str],
    latency: Duration,
    secs: Duration,
) -> (f64, f64, f64, f64) {
    const BACKLOG: usize = 400_000;
    platform.faults().set_delay(latency);
    let agent = start_agent(platform, dir, extra);
    let pid = agent.pid().unwrap();
    let rss = PeakRss::start(pid);
    let (buf, per) = batch_buffer();
    let base = platform.received_count();
    let warmup = secs / 3;
    let stop = AtomicBool::new(false);
    let result = thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut c = UnixStream::connect(&agent.socket).unwrap();
            let mut sent = 0usize;
            while !stop.load(Ordering::Relaxed) {
                if sent.saturating_sub(platform.received_count() - base) < BACKLOG {
                    c.write_all(&buf).unwrap();
                    sent += per as usize;
                } else {
                    thread::sleep(Duration::from_millis(1));
                }
            }
        });
        thread::sleep(warmup);
        let (t0, d0, c0) = (Instant::now(), platform.received_count(), cpu_secs(pid));
        let (mut sum, mut samples) = (0.0, 0u32);
        while t0.elapsed() < secs {
            thread::sleep(Duration::from_millis(10));
            sum += platform.batches_in_flight() as f64;
            samples += 1;
        }
        let (t1, d1, c1) = (Instant::now(), platform.received_count(), cpu_secs(pid));
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        let delivered = (d1 - d0) as f64;
        let rate = delivered / (t1 - t0).as_secs_f64();
        let cpu_per_million = if delivered > 0.0 {
            (c1 - c0) / (delivered / 1e6)
        } else {
            f64::NAN
        };
        (rate, cpu_per_million, sum / f64::from(samples.max(1)))
    });
    let peak = rss.stop();
    drop(agent);
    platform.faults().set_delay(Duration::ZERO);
    let _ = std::fs::remove_dir_all(dir);
    (result.0, result.1, result.2, peak)
}

/// The pipelined-delivery rows: default and tuned knobs, each with `--max-in-flight 1` (one
/// batch at a time: the baseline) next to pipelining (the default window of 4, and 16 for tuned
/// knobs), against 0, 20 and 100 ms of platform latency.
fn pipeline_rows(platform: &PlatformServer, dir: &Path, secs: Duration) {
    let tuned = [
        "--max-batch-size",
        "5000",
        "--min-batch-size",
        "500",
        "--batch-size",
        "2000",
        "--max-queue-size",
        "100000",
        "--min-batch-interval",
        "0s",
    ];
    let rows: [(&str, Vec<&str>); 5] = [
        (
            "default knobs, max-in-flight 1 (baseline)",
            vec!["--max-in-flight", "1"],
        ),
        ("default knobs, max-in-flight 4 (default)", vec![]),
        (
            "tuned, max-in-flight 1 (baseline)",
            [&tuned[..], &["--max-in-flight", "1"]].concat(),
        ),
        // The default window with tuned batches: what the 16 MiB memory goal is judged on
        // (16 batches of 5,000 held at once cost about twice as much).
        ("tuned, max-in-flight 4 (default)", tuned.to_vec()),
        (
            "tuned, max-in-flight 16",
            [&tuned[..], &["--max-in-flight", "16"]].concat(),
        ),
    ];
    platform.set_discard(true);
    println!(
        "pipelined delivery, end to end (one connection → spool → HTTP platform with added latency; \
         tuned = {}):",
        tuned.join(" ")
    );
    // Peak RSS of the rows within the default window (max-in-flight ≤ 4), and of wider ones.
    let (mut peak_default, mut peak_wide) = (0f64, 0f64);
    for latency_ms in [0u64, 20, 100] {
        for (i, (label, extra)) in rows.iter().enumerate() {
            let latency = Duration::from_millis(latency_ms);
            let (rate, cpu, in_flight, rss) = pipeline_row(
                platform,
                &dir.join(format!("pipe-{latency_ms}-{i}")),
                extra,
                latency,
                secs,
            );
            println!(
                "  {latency_ms:>3} ms, {label:<42} {rate:>10.0} msgs/s delivered, {cpu:>6.2} cpu-s per million, {in_flight:>5.1} batches in flight (mean), RSS peak {rss:.1} MiB"
            );
            // Wider than the default window: the row passes `--max-in-flight` above 4.
            let wide = extra
                .windows(2)
                .any(|w| w[0] == "--max-in-flight" && w[1].parse::<u32>().is_ok_and(|n| n > 4));
            let peak = if wide {
                &mut peak_wide
            } else {
                &mut peak_default
            };
            *peak = peak.max(rss);
        }
    }
    println!(
        "RSS under full ingest and delivery, peak: {peak_default:.1} MiB with max-in-flight ≤ 4 \
         (default), {peak_wide:.1} MiB with 16 batches of up to 5,000 in flight"
    );
    platform.set_discard(false);
}

/// The binary under test, chosen once: the build `--shipped` made, else `$NANO_AGENT_BIN`
/// (e.g. the shipped one, which the shipping test copies out of the nano-agent image to
/// `~/.cache/nanogate/image-bin/nano-agent`), else this profile's build.
static AGENT_BIN: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

fn agent_bin() -> std::path::PathBuf {
    AGENT_BIN
        .get_or_init(|| {
            std::env::var_os("NANO_AGENT_BIN")
                .map(Into::into)
                .unwrap_or_else(|| env!("CARGO_BIN_EXE_nano-agent").into())
        })
        .clone()
}

/// `--shipped`: builds nano-agent the way build/Dockerfile builds the image's binary (its
/// `CARGO_PROFILE_RELEASE_*` settings and `--target`, read from the Dockerfile so the two
/// cannot drift: musl, static, size-optimised, fat LTO) and returns its path.
fn build_shipped() -> std::path::PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dockerfile = std::fs::read_to_string(root.join("build/Dockerfile")).unwrap();
    let profile: Vec<(&str, &str)> = dockerfile
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter(|(k, _)| k.starts_with("CARGO_PROFILE_RELEASE_"))
        .collect();
    // The `--target` of the `cargo build` line (the header's `docker build` names stages).
    let target = dockerfile
        .lines()
        .filter(|l| l.contains("cargo build"))
        .flat_map(|l| l.split_whitespace().skip_while(|w| *w != "--target").nth(1))
        .next()
        .expect("build/Dockerfile's cargo build names its --target");
    let target_dir =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), Into::into);
    println!("building the shipped binary: {profile:?} --target {target}");
    let status = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()))
        .args(["build", "--release", "--locked", "--target", target])
        .args(["-p", "nanogate-sidecar", "--bin", "nano-agent"])
        .envs(profile)
        .env("CARGO_TARGET_DIR", &target_dir)
        .current_dir(&root)
        .status()
        .expect("running cargo");
    assert!(status.success(), "building the shipped binary failed");
    target_dir.join(target).join("release/nano-agent")
}

/// "static" when the ELF file has no program interpreter (PT_INTERP), else "dynamic".
fn linkage(bin: &Path) -> &'static str {
    let Ok(elf) = std::fs::read(bin) else {
        return "unreadable";
    };
    let num = |at: usize, len: usize| {
        elf.get(at..at + len).map_or(0, |b| {
            b.iter()
                .rev()
                .fold(0usize, |n, &x| (n << 8) | usize::from(x))
        })
    };
    let (phoff, phsize, phnum) = (num(0x20, 8), num(0x36, 2), num(0x38, 2));
    let interp = (0..phnum).any(|i| num(phoff + i * phsize, 4) == 3);
    if interp { "dynamic" } else { "static" }
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

/// Writes `n` messages (copies of `buf`, `per` a copy) over `c`, then waits until
/// `delivered()` reaches `n`; returns the seconds since `t`.
fn deliver_all(
    c: &mut UnixStream,
    (buf, per): (&[u8], u64),
    n: u64,
    t: Instant,
    what: &str,
    delivered: impl Fn() -> u64,
) -> f64 {
    for _ in 0..n / per {
        c.write_all(buf).unwrap();
    }
    while delivered() < n {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "{what} delivery stalled"
        );
        thread::sleep(Duration::from_millis(2));
    }
    t.elapsed().as_secs_f64()
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
    let agent = start_agent_to(
        dir,
        format!("ws://127.0.0.1:{port}"),
        "",
        &[&["--upstream-kind", "socketio"][..], &TUNED].concat(),
    );
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
    let took = deliver_all(&mut c, (&buf, per), n, t, "socketio", || {
        count.load(Ordering::Relaxed)
    });
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
    let agent = start_agent_to(
        &dir.join("agent"),
        nats.url(),
        "",
        &[
            &["--upstream-kind", "nats", "--gateway", "bench"][..],
            &TUNED,
        ]
        .concat(),
    );
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
    let took = deliver_all(&mut c, (&buf, per), n, t, "nats", delivered);
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
                &["--tcp-listen", &listen][..],
                &TUNED,
                &["--backoff-max", "100ms", "--backoff-initial", "10ms"],
            ]
            .concat(),
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
    println!(
        "connections (one publish per connection, {CONN_CLIENT_THREADS} client threads x {CONN_IN_FLIGHT} in flight, {rounds} alternated rounds of {} s):",
        secs.as_secs()
    );
    println!(
        "  nano-agent:                    {}/s  (median {:.0}; {total} connections, all in received_total)",
        list(&agent_cps),
        median(&agent_cps)
    );
    println!(
        "  bare accept-read-close thread: {}/s  (median {:.0})",
        list(&bare_cps),
        median(&bare_cps)
    );
    println!(
        "  ratio of medians: {:.0}%",
        median(&agent_cps) * 100.0 / median(&bare_cps)
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

const USAGE: &str =
    "cargo bench -p nanogate-sidecar --bench agent -- [--secs N] [--only ROWS] [--shipped]
  --secs N     length of each throughput run (default 5)
  --only ROWS  comma-separated subset of latency,connections,pipeline,ingest,tcp,delivery
               (RSS idle is always printed; ingest prints the RSS peak while ingesting,
               pipeline the peak under ingest and delivery)
  --shipped    build nano-agent as build/Dockerfile does (musl, static) and bench that
  NANO_AGENT_BIN=path benches another binary; NANOGATE_BENCH_AGENT_ARGS adds agent flags";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return;
    }
    let secs = args
        .iter()
        .position(|a| a == "--secs")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(5u64);
    let secs = Duration::from_secs(secs);
    // `--only latency,connections,ingest,tcp,delivery,pipeline` runs a subset (default: all).
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
    if args.iter().any(|a| a == "--shipped") {
        AGENT_BIN.set(build_shipped()).unwrap();
    }
    let bin = agent_bin();
    println!(
        "nano-agent bench ({} s per throughput run, message size {} bytes)\n  binary: {} ({:.1} MiB, {}; `-- --shipped` builds and benches the image's build, NANO_AGENT_BIN another one)",
        secs.as_secs(),
        message(1).len(),
        bin.display(),
        std::fs::metadata(&bin).map_or(0, |m| m.len()) as f64 / (1024.0 * 1024.0),
        linkage(&bin)
    );

    // ---- idle memory and msg_check latency on a fresh agent ----
    let agent = start_agent(&platform, &tmp.path().join("a1"), &[]);
    thread::sleep(Duration::from_millis(1500));
    let rss_idle = rss_kib(agent.pid().unwrap());
    println!(
        "RSS idle (1.5 s after start): {:.1} MiB",
        rss_idle as f64 / 1024.0
    );
    if want("latency") {
        let uncached = start_agent(
            &platform,
            &tmp.path().join("a1-uncached"),
            &["--msg-check-cache", "0s"],
        );
        msg_check_latency(&agent, &uncached, &platform, 3);
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
    if want("pipeline") {
        pipeline_rows(&platform, tmp.path(), secs);
    }
    if !(want("ingest") || want("tcp") || want("delivery")) {
        return;
    }

    // ---- ingest: baselines and agent over one persistent connection ----
    let (buf, per) = batch_buffer();
    if want("ingest") {
        decoder_in_memory(&buf, per, secs);
        ingest_line(&platform, tmp.path(), &buf, per, secs, 3);
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
            "default knobs (max_batch_size 200, min_batch_interval 100ms)".to_owned(),
            vec![],
            10_000u64,
        ),
        (
            format!("tuned ({})", TUNED.join(" ")),
            TUNED.to_vec(),
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

//! Helpers shared by the sidecar's integration tests (real binary, real sockets, real HTTP).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nanogate_tests::agent::{Agent, AgentConfig};
use nanogate_tests::platform::PlatformServer;

/// Starts the real nano-agent in `dir`, delivering to `platform`.
pub fn start_agent(platform: &PlatformServer, dir: &Path, extra: &[&str]) -> Agent {
    let bin = env!("CARGO_BIN_EXE_nano-agent").into();
    Agent::start(AgentConfig::for_platform(bin, dir, platform, extra)).expect("starting nano-agent")
}

/// Waits until `cond` holds, looking every 50 ms; panics with `what`, the agent's metrics and
/// its log on timeout.
pub async fn wait_until(agent: &Agent, timeout: Duration, what: &str, cond: impl FnMut() -> bool) {
    wait_until_every(agent, timeout, Duration::from_millis(50), what, cond).await
}

/// [`wait_until`], looking every `poll` (short where the test must act right after `cond`).
pub async fn wait_until_every(
    agent: &Agent,
    timeout: Duration,
    poll: Duration,
    what: &str,
    mut cond: impl FnMut() -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\nmetrics:\n{}\nlog:\n{}",
            agent.metrics(),
            agent.log_text()
        );
        tokio::time::sleep(poll).await;
    }
}

/// The agent's count of messages refused for `reason`.
pub fn rejected(agent: &Agent, reason: &str) -> Option<f64> {
    agent.metric(&format!(
        r#"nanogate_sidecar_rejected_total{{reason="{reason}"}}"#
    ))
}

/// `/healthz` as JSON.
pub fn healthz(agent: &Agent) -> serde_json::Value {
    let (status, body) = agent.http_get("/healthz").unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// A free TCP port on loopback (free when asked; a test binds it soon after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh platform and an agent delivering to it with `args` (flags and values separated by
/// spaces); the temporary directory must outlive the agent.
pub async fn setup(args: &str) -> (PlatformServer, tempfile::TempDir, Agent) {
    let platform = PlatformServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let args: Vec<&str> = args.split_whitespace().collect();
    let agent = start_agent(&platform, dir.path(), &args);
    (platform, dir, agent)
}

/// Runs `cmd` with `input` on its stdin (then closed) and its output captured.
pub fn feed(mut cmd: std::process::Command, input: &[u8]) -> std::process::Output {
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
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

/// PEM files of a throw-away PKI (see [`test_pki`]).
pub struct TestPki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// A CA named `ca_cn`, a server certificate for localhost and 127.0.0.1 and a client
/// certificate named `client_cn`, written as PEM files into `dir`.
pub fn test_pki(dir: &Path, ca_cn: &str, client_cn: &str) -> TestPki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name.push(DnType::CommonName, ca_cn);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf = |sans: Vec<String>, cn: &str, eku: ExtendedKeyUsagePurpose| {
        let mut p = CertificateParams::new(sans).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![eku];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_pem, server_key) = leaf(
        vec!["localhost".into(), "127.0.0.1".into()],
        "localhost",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_pem, client_key) = leaf(vec![], client_cn, ExtendedKeyUsagePurpose::ClientAuth);
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    TestPki {
        ca: write("ca.pem", &ca.pem()),
        server_cert: write("server.pem", &server_pem),
        server_key: write("server.key", &server_key),
        client_cert: write("client.pem", &client_pem),
        client_key: write("client.key", &client_key),
    }
}

//! Runs the real `nano-agent` binary for tests: socket, spool and log in one directory, the
//! API key passed through `TENDRL_KEY` as in a pod, admin on a free loopback port.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::platform::PlatformServer;

/// Waits until `ready()` holds for the process `child` (called `name`, logging to `log`); an
/// error with its log if it exits first or `timeout` passes.
pub(crate) fn wait_ready(
    name: &str,
    child: &mut Option<Child>,
    log: &Path,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let log_text = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            bail!(
                "{name} exited with {status} before becoming ready; log:\n{}",
                log_text()
            );
        }
        if ready() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{name} not ready after {timeout:?}; log:\n{}", log_text());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Path of the `nano-agent` binary: `$NANO_AGENT_BIN` when set; otherwise
/// `<target>/<profile>/nano-agent` next to the running test executable, brought up to date
/// once per test process with `cargo build -p nanogate-sidecar --bin nano-agent` (a no-op when
/// fresh; cargo releases its build lock before running tests, so this does not deadlock).
/// Tests inside the sidecar crate pass `env!("CARGO_BIN_EXE_nano-agent")` instead.
pub fn agent_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("NANO_AGENT_BIN") {
            return PathBuf::from(p);
        }
        build_beside_tests(
            &["-p", "nanogate-sidecar", "--bin", "nano-agent"],
            "nano-agent",
        )
    })
    .clone()
}

/// Runs `cargo build <args>` into the running test executable's target directory and profile,
/// and returns the path of the binary `bin` built there. Callers build once per process.
pub fn build_beside_tests(args: &[&str], bin: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/<bin>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target layout")
        .to_owned();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build").args(args);
    if let Some(target) = profile_dir.parent() {
        cmd.arg("--target-dir").arg(target);
    }
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("running cargo build");
    assert!(status.success(), "building {bin} failed");
    profile_dir.join(bin)
}

/// How to start an agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub bin: PathBuf,
    /// Holds `agent.sock`, `spool/` and `agent.log`.
    pub dir: PathBuf,
    pub upstream_url: String,
    pub api_key: String,
    /// More flags, e.g. `["--flush-interval", "50ms"]`.
    pub extra_args: Vec<String>,
}

impl AgentConfig {
    /// An agent of `bin` in `dir` delivering to `platform` with its key, plus `extra` flags.
    pub fn for_platform(
        bin: PathBuf,
        dir: &Path,
        platform: &PlatformServer,
        extra: &[&str],
    ) -> Self {
        AgentConfig {
            bin,
            dir: dir.to_owned(),
            upstream_url: platform.url(),
            api_key: platform.api_key().to_owned(),
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// A running `nano-agent` child process; killed on drop.
pub struct Agent {
    cfg: AgentConfig,
    child: Option<Child>,
    pub socket: PathBuf,
    pub spool: PathBuf,
    pub log: PathBuf,
    pub admin: SocketAddr,
}

fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr")
}

impl Agent {
    /// Starts the agent and waits until `/readyz` answers 200.
    pub fn start(cfg: AgentConfig) -> anyhow::Result<Agent> {
        std::fs::create_dir_all(&cfg.dir)?;
        let mut agent = Agent {
            socket: cfg.dir.join("agent.sock"),
            spool: cfg.dir.join("spool"),
            log: cfg.dir.join("agent.log"),
            admin: free_port(),
            cfg,
            child: None,
        };
        agent.spawn()?;
        Ok(agent)
    }

    fn spawn_once(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new(&self.cfg.bin);
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("TENDRL_") || k.starts_with("NANOGATE_") {
                cmd.env_remove(&*k);
            }
        }
        cmd.env("TENDRL_KEY", &self.cfg.api_key)
            .arg("--socket-path")
            .arg(&self.socket)
            .arg("--spool-dir")
            .arg(&self.spool)
            .arg("--app-url")
            .arg(&self.cfg.upstream_url)
            .arg("--admin-listen")
            .arg(self.admin.to_string())
            // Environment, not flags, so `extra_args` can override them.
            .env("NANOGATE_POD_NAMESPACE", "test-ns")
            .env("NANOGATE_POD_NAME", "test-pod")
            .env("NANOGATE_LOG_LEVEL", "info")
            .args(&self.cfg.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(
            cmd.spawn()
                .with_context(|| format!("starting {}", self.cfg.bin.display()))?,
        );
        self.wait_ready(Duration::from_secs(30))
    }

    /// Starts the process; if the free admin port was taken meanwhile by someone else (ports
    /// are found by binding and releasing them), tries again on another one.
    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut attempt = 0;
        loop {
            let before = std::fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
            match self.spawn_once() {
                Ok(()) => return Ok(()),
                Err(e) if attempt < 3 => {
                    let log = std::fs::read(&self.log).unwrap_or_default();
                    let new = String::from_utf8_lossy(log.get(before as usize..).unwrap_or(&[]));
                    if !new.contains("admin_listen") {
                        return Err(e);
                    }
                    attempt += 1;
                    self.admin = free_port();
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits for `/readyz` 200.
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let (socket, admin) = (self.socket.clone(), self.admin);
        wait_ready("nano-agent", &mut self.child, &self.log, timeout, || {
            // The socket file proves the answer came from this agent, not from another test's
            // agent that took the same (released, then reused) admin port.
            socket.exists()
                && crate::http::http_get(admin, "/readyz", Duration::from_secs(5))
                    .is_ok_and(|(code, _)| code == 200)
        })
    }

    /// The process has not exited (a panic with `panic = "abort"` ends it at once).
    pub fn child_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for exit.
    pub fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        let mut c = self.child.take().context("agent not running")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        Ok(c.wait()?)
    }

    /// Waits up to `timeout` for the agent to exit by itself (e.g. after a `drain`).
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        let child = self.child.as_mut().context("agent not running")?;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "agent still running after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the agent again with the same directory, flags and admin port.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A plain HTTP/1.0 GET against the admin port: (status, body).
    pub fn http_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        crate::http::http_get(self.admin, path, Duration::from_secs(5))
    }

    /// Prometheus text from `/metrics`.
    pub fn metrics(&self) -> String {
        self.http_get("/metrics").map(|r| r.1).unwrap_or_default()
    }

    /// Value of one sample, e.g. `nanogate_sidecar_received_total` or
    /// `nanogate_sidecar_rejected_total{reason="queue_full"}`.
    pub fn metric(&self, sample: &str) -> Option<f64> {
        self.metrics().lines().find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == sample).then(|| value.parse().ok()).flatten()
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

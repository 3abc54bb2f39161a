//! Runs a real `nats-server -js` (Debian package `nats-server`) for tests and benchmarks: a
//! loopback port, a JetStream store directory that survives [`NatsServer::kill9`] +
//! [`NatsServer::restart`], optional user/password, and the kernel's parent-death signal so
//! a crashed test never leaves a server behind.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::Context as _;

/// Path of `nats-server`, if installed (`$NATS_SERVER_BIN` wins).
pub fn nats_server_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN") {
        return Some(PathBuf::from(p));
    }
    ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .or_else(|| {
            let out = Command::new("sh")
                .args(["-c", "command -v nats-server"])
                .output()
                .ok()?;
            let p = String::from_utf8(out.stdout).ok()?.trim().to_string();
            (!p.is_empty()).then(|| PathBuf::from(p))
        })
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// The parent-death signal fires when the *thread* that forked the child exits; test
/// harnesses run every test on a short-lived thread, so spawns go through one thread that
/// lives as long as the process.
fn spawn(command: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("nats-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("spawning the nats spawner thread");
        tx
    });
    let (reply, rx) = mpsc::channel();
    tx.send((command, reply))
        .map_err(|_| std::io::Error::other("spawner thread gone"))?;
    rx.recv()
        .map_err(|_| std::io::Error::other("spawner thread dropped the request"))?
}

/// A running `nats-server -js`; killed on drop.
pub struct NatsServer {
    bin: PathBuf,
    pub addr: SocketAddr,
    /// JetStream store directory (kept across restarts).
    pub store: PathBuf,
    pub log: PathBuf,
    auth: Option<(String, String)>,
    /// Extra configuration-file text (e.g. `authorization { … }`), when started with one.
    config: Option<String>,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a server with JetStream storing under `dir/store`, logging to `dir/nats.log`.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        Self::start_with_auth(dir, None)
    }

    /// [`NatsServer::start`] requiring `user`/`password` from every client.
    pub fn start_with_auth(dir: &Path, auth: Option<(&str, &str)>) -> anyhow::Result<Self> {
        Self::start_inner(dir, auth, None)
    }

    /// [`NatsServer::start`] with `config` appended to a configuration file that sets the
    /// port and the JetStream store (for `authorization { users = [ … permissions … ] }`).
    pub fn start_with_config(dir: &Path, config: &str) -> anyhow::Result<Self> {
        Self::start_inner(dir, None, Some(config))
    }

    fn start_inner(
        dir: &Path,
        auth: Option<(&str, &str)>,
        config: Option<&str>,
    ) -> anyhow::Result<Self> {
        let bin =
            nats_server_bin().context("nats-server not found: apt-get install -y nats-server")?;
        std::fs::create_dir_all(dir)?;
        let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let mut s = Self {
            bin,
            addr,
            store: dir.join("store"),
            log: dir.join("nats.log"),
            auth: auth.map(|(u, p)| (u.to_string(), p.to_string())),
            config: config.map(str::to_string),
            child: None,
        };
        s.spawn()?;
        Ok(s)
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new("setpriv");
        cmd.args(["--pdeathsig", "KILL", "--"]).arg(&self.bin);
        if let Some(extra) = &self.config {
            let file = self.log.with_file_name("nats.conf");
            std::fs::write(
                &file,
                format!(
                    "listen: \"{}\"\njetstream {{ store_dir: {:?} }}\n{extra}\n",
                    self.addr,
                    self.store.display().to_string()
                ),
            )?;
            cmd.arg("-c").arg(file);
        } else {
            cmd.args(["-js", "-a", "127.0.0.1", "-p"])
                .arg(self.addr.port().to_string())
                .arg("-sd")
                .arg(&self.store);
        }
        if let Some((user, pass)) = &self.auth {
            cmd.args(["--user", user, "--pass", pass]);
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child =
            Some(spawn(cmd).context("starting nats-server (setpriv from util-linux is required)")?);
        self.wait_ready(Duration::from_secs(20))
    }

    /// Waits until the server accepts TCP connections and logs that it is ready.
    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let (addr, log) = (self.addr, self.log.clone());
        crate::agent::wait_ready("nats-server", &mut self.child, &self.log, timeout, || {
            let up = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok();
            // Ready since its last start: as many "ready" lines as starts.
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let starts = text.matches("Starting nats-server").count().max(1);
            up && text.matches("Server is ready").count() >= starts
        })
    }

    /// SIGKILL: no flush, no goodbye to clients.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port with the same store.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

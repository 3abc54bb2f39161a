//! Spawning control-plane processes so that they never outlive the test process.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the process.
/// Test harnesses run each test on its own short-lived thread, so all spawns go through this one
/// thread, which lives until the process exits.
static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();

fn spawner() -> &'static mpsc::Sender<SpawnRequest> {
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("e2e-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("spawning the e2e spawner thread");
        tx
    })
}

/// A process started by the harness; killed (and reaped) on drop.
pub struct Process {
    pub name: &'static str,
    child: Child,
    pub log: PathBuf,
}

impl Process {
    /// Starts `program args` with the kernel's parent-death signal set to KILL, stdout and stderr
    /// to `<run_dir>/<name>.log`, and its pid recorded in `<run_dir>/pids` for stale clean-up.
    pub fn spawn(
        name: &'static str,
        program: &Path,
        args: &[String],
        run_dir: &Path,
    ) -> Result<Self> {
        Self::spawn_with_env(name, program, args, &[], run_dir)
    }

    /// [`Process::spawn`] with extra environment variables.
    pub fn spawn_with_env(
        name: &'static str,
        program: &Path,
        args: &[String],
        env: &[(&str, String)],
        run_dir: &Path,
    ) -> Result<Self> {
        // Several processes of one name share a run directory (parallel tests): each gets its
        // own log, `<name>.log`, `<name>-2.log`, …
        let (log, out) = (1..1000)
            .map(|n| match n {
                1 => run_dir.join(format!("{name}.log")),
                n => run_dir.join(format!("{name}-{n}.log")),
            })
            .find_map(|path| {
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .ok()
                    .map(|file| (path, file))
            })
            .with_context(|| format!("creating a log file for {name} in {}", run_dir.display()))?;
        let err = out.try_clone()?;
        let mut command = Command::new("setpriv");
        command
            .args(["--pdeathsig", "KILL", "--"])
            .arg(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let (tx, rx) = mpsc::channel();
        spawner()
            .send((command, tx))
            .map_err(|_| anyhow::anyhow!("e2e spawner thread is gone"))?;
        let child = rx
            .recv()
            .context("e2e spawner thread dropped the request")?
            .with_context(|| {
                format!(
                    "starting {} (setpriv from util-linux is required)",
                    program.display()
                )
            })?;
        let mut pids = OpenOptions::new()
            .create(true)
            .append(true)
            .open(run_dir.join("pids"))?;
        writeln!(pids, "{}", child.id())?;
        Ok(Self { name, child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` if the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for the process to exit by itself; the error carries its log tail.
    pub async fn wait_exit(
        &mut self,
        timeout: std::time::Duration,
    ) -> Result<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Ok(status);
            }
            if std::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "{} still running after {timeout:?}\n{}",
                    self.name,
                    self.log_tail(10)
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// The last `lines` lines of the process log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn stop(&mut self) {
        // SIGTERM first so etcd and the apiserver close their files; then make sure.
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        for _ in 0..50 {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

/// True if a process with `pid` exists and its command line mentions `marker`
/// (guards against killing an unrelated process that reused the pid).
pub fn running_with_marker(pid: i32, marker: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmdline| String::from_utf8_lossy(&cmdline).contains(marker))
        .unwrap_or(false)
}

/// True if process `pid` exists and is not a zombie (a killed test process stays a zombie until
/// its parent reaps it, but it owns nothing any more).
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // `pid (comm) S …`: the state follows the last ')' (comm may contain one).
        Ok(stat) => stat
            .rsplit_once(')')
            .is_none_or(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

pub fn kill_pid(pid: i32) {
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
}

/// Fails naming the first of `processes` that has exited, with the tail of its log: a
/// start-up wait stops at once instead of timing out.
pub(crate) fn fail_if_any_exited(processes: &mut [Process]) -> anyhow::Result<()> {
    for process in processes.iter_mut() {
        if let Some(status) = process.exited() {
            anyhow::bail!(
                "{} exited early ({status}):\n{}",
                process.name,
                process.log_tail(20)
            );
        }
    }
    Ok(())
}

/// `error` with `what` failed and the tail of every process's log as context.
pub(crate) fn with_logs(processes: &[Process], what: &str, error: anyhow::Error) -> anyhow::Error {
    let logs: Vec<String> = processes
        .iter()
        .map(|p| format!("--- {} ({}):\n{}", p.name, p.log.display(), p.log_tail(15)))
        .collect();
    error.context(format!("{what}\n{}", logs.join("\n")))
}

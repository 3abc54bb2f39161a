//! Who can use the app socket (issue 16): the real nano-agent runs as the sidecar's 65532:65532
//! on a directory laid out as the pod's socket volume (an `emptyDir`: mode 0777), and clients
//! run as the identities app containers have, each a separate process with its own uid, gid and
//! groups (`setpriv`): `runAsUser: 10001` without `fsGroup` (examples/k8s/deployment.yaml),
//! with `runAsGroup`, with `supplementalGroups`, and an OpenShift-style arbitrary uid with gid
//! 0; and all of them again in a pod with an `fsGroup` (the volume group-owned and setgid, the
//! agent and the apps in that group, as the kubelet does it). Every one of them publishes
//! through the socket and the platform receives it; the spool next to the socket stays closed
//! to them.
//!
//! The process ids need root (`setpriv --reuid`): as another user these tests say loudly that
//! they skip.

mod common;

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nanogate_tests::platform::PlatformServer;
use serde_json::json;

/// The injected sidecar's user and group (`SIDECAR_UID` of the injector, distroless' nonroot).
const AGENT_ID: u32 = 65532;

/// An app container's identity: uid, gid, supplementary groups, and where it comes from.
struct Identity {
    uid: u32,
    gid: u32,
    groups: &'static [u32],
    what: &'static str,
}

const APPS: [Identity; 4] = [
    Identity {
        uid: 10001,
        gid: 10001,
        groups: &[],
        what: "runAsUser 10001, no fsGroup (examples/k8s/deployment.yaml)",
    },
    Identity {
        uid: 10001,
        gid: 3000,
        groups: &[],
        what: "runAsUser 10001, runAsGroup 3000",
    },
    Identity {
        uid: 10001,
        gid: 10001,
        groups: &[2000],
        what: "runAsUser 10001, supplementalGroups [2000]",
    },
    Identity {
        uid: 1_000_680_000,
        gid: 0,
        groups: &[],
        what: "an OpenShift restricted uid with gid 0",
    },
];

/// Whether these tests can run here: root (to switch ids), setpriv and socat.
fn can_switch_ids(test: &str) -> bool {
    let runs = |program: &str, arg: &str| {
        Command::new(program)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root || !runs("setpriv", "--version") || !runs("socat", "-V") {
        eprintln!(
            "!!!!! SKIPPING {test}: needs root, setpriv (util-linux) and socat, to run the agent \
             and its clients as other users !!!!!"
        );
        return false;
    }
    true
}

/// setpriv's flag for supplementary `groups`.
fn groups_flag(groups: &[u32]) -> String {
    if groups.is_empty() {
        "--clear-groups".into()
    } else {
        let groups: Vec<String> = groups.iter().map(u32::to_string).collect();
        format!("--groups={}", groups.join(","))
    }
}

/// The supplementary groups of `id` in `pod`: its own, and the pod's fsGroup (the kubelet adds
/// it to every container).
fn groups_in(pod: &Pod, id: &Identity) -> Vec<u32> {
    id.groups.iter().copied().chain(pod.fs_group).collect()
}

/// `setpriv` switching to `id` in `pod` (real and effective ids, groups replaced), then
/// `program`.
fn as_identity(pod: &Pod, id: &Identity, program: &str) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={}", id.uid))
        .arg(format!("--regid={}", id.gid))
        .arg(groups_flag(&groups_in(pod, id)))
        .arg(program);
    cmd
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
    .trim()
    .to_string()
}

/// A test directory: the agent binary where 65532 can run it, and `vol`, the socket volume as
/// the kubelet makes an `emptyDir` (0777; with an fsGroup, group-owned by it and setgid).
struct Pod {
    _root: tempfile::TempDir,
    bin: PathBuf,
    vol: PathBuf,
    log: PathBuf,
    fs_group: Option<u32>,
}

impl Pod {
    fn new() -> Pod {
        Pod::with_fs_group(None)
    }

    fn with_fs_group(fs_group: Option<u32>) -> Pod {
        let root = tempfile::tempdir().unwrap();
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        // The test binary's target directory may be under a home directory only root can enter.
        let bin = root.path().join("nano-agent");
        let built = Path::new(env!("CARGO_BIN_EXE_nano-agent"));
        if std::fs::hard_link(built, &bin).is_err() {
            std::fs::copy(built, &bin).unwrap();
        }
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let vol = root.path().join("vol");
        std::fs::create_dir(&vol).unwrap();
        std::fs::set_permissions(&vol, std::fs::Permissions::from_mode(0o777)).unwrap();
        if let Some(group) = fs_group {
            // The kubelet's volume ownership for an fsGroup: group, group rw, setgid.
            std::os::unix::fs::chown(&vol, None, Some(group)).unwrap();
            std::fs::set_permissions(&vol, std::fs::Permissions::from_mode(0o2777)).unwrap();
        }
        Pod {
            log: root.path().join("agent.log"),
            bin,
            vol,
            _root: root,
            fs_group,
        }
    }
}

/// The real nano-agent as 65532:65532 under `umask`; killed on drop.
struct RunningAgent {
    child: Child,
    log: PathBuf,
}

impl RunningAgent {
    fn start(
        pod: &Pod,
        platform: &PlatformServer,
        socket: &Path,
        spool: &Path,
        umask: &str,
    ) -> RunningAgent {
        let admin = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let log = std::fs::File::create(&pod.log).unwrap();
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "umask \"$1\"; id=$2; groups=$3; shift 3; \
             exec setpriv --reuid=\"$id\" --regid=\"$id\" \"$groups\" \"$@\"",
            "sh",
            umask,
            &AGENT_ID.to_string(),
            &groups_flag(&pod.fs_group.into_iter().collect::<Vec<_>>()),
        ]);
        cmd.arg(&pod.bin)
            .arg("--socket-path")
            .arg(socket)
            .arg("--spool-dir")
            .arg(spool)
            .arg("--app-url")
            .arg(platform.url())
            .arg("--admin-listen")
            .arg(admin.to_string())
            .args(["--flush-interval", "50ms"]);
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("TENDRL_") || k.starts_with("NANOGATE_") {
                cmd.env_remove(&*k);
            }
        }
        cmd.env("TENDRL_KEY", platform.api_key())
            .env("NANOGATE_POD_NAMESPACE", "shop")
            .env("NANOGATE_POD_NAME", "orders-0")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let mut agent = RunningAgent {
            child: cmd.spawn().expect("starting nano-agent through setpriv"),
            log: pod.log.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = agent.child.try_wait().unwrap() {
                panic!("nano-agent exited with {status}:\n{}", agent.log_text());
            }
            if nanogate_tests::http::http_get(admin, "/readyz", Duration::from_secs(2))
                .is_ok_and(|(code, _)| code == 200)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "nano-agent not ready after 30 s:\n{}",
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        agent
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `id` publishes `{"id": n, …}` through `socket` with socat: its reply (empty = accepted), or
/// what socat said when it failed.
fn publish_as(pod: &Pod, id: &Identity, socket: &Path, n: u64) -> Result<String, String> {
    let message = json!({
        "msg_type": "publish",
        "data": {"id": n, "uid": id.uid, "gid": id.gid},
        "context": {"tags": ["socket-access"]},
    });
    let mut socat = as_identity(pod, id, "socat");
    socat
        .args(["-t", "10", "-"])
        .arg(format!("UNIX-CONNECT:{}", socket.display()));
    let out = common::feed(socat, message.to_string().as_bytes());
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(text(&out))
    }
}

/// The ids `id` really runs with, as `id` prints them: (uid, gid, groups).
fn kernel_ids(pod: &Pod, id: &Identity) -> String {
    let out = as_identity(pod, id, "sh")
        .args(["-c", "echo \"$(id -u) $(id -g) $(id -G)\""])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Every identity publishes through `socket`; the platform receives each message.
async fn every_identity_publishes(
    pod: &Pod,
    platform: &PlatformServer,
    agent: &RunningAgent,
    socket: &Path,
) {
    let mut failures = Vec::new();
    for (n, id) in (1u64..).zip(APPS.iter()) {
        let mut expected = vec![id.uid.to_string(), id.gid.to_string(), id.gid.to_string()];
        expected.extend(groups_in(pod, id).iter().map(u32::to_string));
        assert_eq!(
            kernel_ids(pod, id),
            expected.join(" "),
            "setpriv did not switch to {}",
            id.what
        );
        match publish_as(pod, id, socket, n) {
            Ok(reply) if reply.is_empty() => {}
            Ok(reply) => failures.push(format!("{}: the agent answered {reply:?}", id.what)),
            Err(e) => failures.push(format!("{}: {e}", id.what)),
        }
    }
    let md = std::fs::metadata(socket).unwrap();
    assert!(
        failures.is_empty(),
        "apps could not publish through {} (mode {:o}, owner {}:{}):\n  {}\nagent log:\n{}",
        socket.display(),
        md.permissions().mode() & 0o7777,
        md.uid(),
        md.gid(),
        failures.join("\n  "),
        agent.log_text()
    );
    assert!(
        platform.wait_for(APPS.len(), Duration::from_secs(20)).await,
        "the platform received {} of {} messages",
        platform.received_count(),
        APPS.len()
    );
    let mut got: Vec<(u64, u64)> = platform
        .received()
        .iter()
        .map(|m| {
            (
                m["data"]["id"].as_u64().unwrap(),
                m["data"]["uid"].as_u64().unwrap(),
            )
        })
        .collect();
    got.sort_unstable();
    let expected: Vec<(u64, u64)> = (1u64..).zip(APPS.iter().map(|a| a.uid.into())).collect();
    assert_eq!(got, expected);
    assert!(
        platform
            .received()
            .iter()
            .all(|m| m["source"] == "shop/orders-0")
    );
}

/// The injector's layout (`/var/lib/tendrl/tendrl_agent.sock`, the spool in `spool/` next to
/// it, on the emptyDir) and containerd's umask 022: apps of any uid and gid publish, in a pod
/// without an fsGroup and in one with (the socket then belongs to the fsGroup).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_of_any_uid_and_gid_publish_through_the_socket() {
    if !can_switch_ids("apps_of_any_uid_and_gid_publish_through_the_socket") {
        return;
    }
    for fs_group in [None, Some(4000)] {
        let pod = Pod::with_fs_group(fs_group);
        let platform = PlatformServer::start().await.unwrap();
        let socket = pod.vol.join("tendrl_agent.sock");
        let agent = RunningAgent::start(&pod, &platform, &socket, &pod.vol.join("spool"), "022");
        let md = std::fs::symlink_metadata(&socket).unwrap();
        assert_eq!(
            (md.uid(), md.gid()),
            (AGENT_ID, fs_group.unwrap_or(AGENT_ID)),
            "the socket's owner (fsGroup {fs_group:?})"
        );
        every_identity_publishes(&pod, &platform, &agent, &socket).await;
    }
}

/// The socket is open to every identity in the pod; the spool next to it (every app's queued
/// messages, on the same volume) is not: an app can neither list nor read nor write it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spool_stays_closed_to_apps() {
    if !can_switch_ids("the_spool_stays_closed_to_apps") {
        return;
    }
    let pod = Pod::new();
    let platform = PlatformServer::start().await.unwrap();
    // Held until the test ends: the spool keeps what the platform has not acknowledged.
    platform.faults().set_down(true);
    let socket = pod.vol.join("tendrl_agent.sock");
    let spool = pod.vol.join("spool");
    let agent = RunningAgent::start(&pod, &platform, &socket, &spool, "022");
    let app = &APPS[0];
    assert_eq!(publish_as(&pod, app, &socket, 1), Ok(String::new()));

    let segments: Vec<PathBuf> = std::fs::read_dir(&spool)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    assert!(!segments.is_empty(), "nothing in the spool");
    let mode = std::fs::metadata(&spool).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode & 0o077,
        0,
        "the spool directory is mode {mode:o}: open to others in the pod"
    );
    for (what, script) in [
        ("list the spool", "ls \"$0\"".to_string()),
        (
            "read a spool file",
            format!("cat '{}' >/dev/null", segments[0].display()),
        ),
        (
            "write into the spool",
            "echo x > \"$0/intruder\"".to_string(),
        ),
    ] {
        let out = as_identity(&pod, app, "sh")
            .args(["-c", &script])
            .arg(&spool)
            .output()
            .unwrap();
        assert!(
            !out.status.success() && text(&out).contains("Permission denied"),
            "an app ({}) could {what}: {}\nagent log:\n{}",
            app.what,
            text(&out),
            agent.log_text()
        );
    }
}

/// A socket path in directories the agent creates, under the strictest umask (077): they are
/// made traversable (0755, not writable by apps), so nothing on the way blocks an app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directories_the_agent_creates_for_its_socket_let_apps_through() {
    if !can_switch_ids("directories_the_agent_creates_for_its_socket_let_apps_through") {
        return;
    }
    let pod = Pod::new();
    let platform = PlatformServer::start().await.unwrap();
    let socket = pod.vol.join("run/nanogate/agent.sock");
    let agent = RunningAgent::start(&pod, &platform, &socket, &pod.vol.join("spool"), "077");
    for dir in [pod.vol.join("run"), pod.vol.join("run/nanogate")] {
        let md = std::fs::metadata(&dir).unwrap();
        assert_eq!(
            (format!("{:o}", md.permissions().mode() & 0o7777), md.uid()),
            ("755".to_string(), AGENT_ID),
            "mode and owner of {} as the agent created it",
            dir.display()
        );
    }
    every_identity_publishes(&pod, &platform, &agent, &socket).await;
    let out = as_identity(&pod, &APPS[0], "touch")
        .arg(pod.vol.join("run/nanogate/intruder"))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "an app could create files in the socket's directory"
    );
}

//! A real node leaves nothing behind: not when it is dropped, not when its test process is
//! killed with SIGKILL (its reaper cleans up at once; with the reaper killed too, the next node's
//! start does). "Nothing" is `nanogate_e2e::node::leftovers`: mounts under the run directory,
//! processes started from it (containerd, kubelet, scheduler, kube-proxy, dnsmasq, shims), the
//! bridge, `kubepods` cgroups, sysctls other than before, new `/var/log/pods` entries, stale shim
//! sockets, kube-proxy's `KUBE-*` iptables chains. Each
//! test first sees those leftovers while the node runs, so an empty list afterwards means
//! something.
//!
//! A separate binary from `node.rs`: only one node runs per machine, and that binary's shared
//! node lives until it exits. The tests here take turns (`SERIAL`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use nanogate_e2e::node::{BUSYBOX_IMAGE, HostSnapshot, leftovers};
use nanogate_e2e::{ControlPlane, Node, TestNamespace, apply_yaml, wait_for};

/// The pods' process: `sleep <SLEEP>`, easy to find among this machine's processes.
const SLEEP: &str = "99999";

/// Processes running the test pods' `sleep` (the containers' own, not the shims).
fn pod_processes() -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline"))
            && cmdline == format!("sleep\0{SLEEP}\0").as_bytes()
        {
            found.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    found
}

/// The tests look at machine-wide state: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Set for the child process of `node_of_a_killed_test_process_is_cleaned_up`: where
/// `hold_a_node_until_killed` writes its node's run directory and reaper pid.
const HOLD_ENV: &str = "NANOGATE_E2E_HOLD_NODE";

/// A pod with an emptyDir, a projected service-account token (a tmpfs mount) and a running
/// container, so a node has shims, mounts, cgroups and log directories to clean up.
async fn run_a_pod(cp: &ControlPlane, node: &Node, ns: &str) -> Result<()> {
    node.import_image(BUSYBOX_IMAGE)?;
    apply_yaml(
        cp.kubeconfig_path(),
        &format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: sleeper, namespace: {ns}}}
spec:
  terminationGracePeriodSeconds: 30
  volumes: [{{name: scratch, emptyDir: {{}}}}]
  containers:
  - name: sleeper
    image: {BUSYBOX_IMAGE}
    imagePullPolicy: Never
    command: ["/bin/sh", "-c", "echo started > /scratch/log; exec sleep {SLEEP}"]
    volumeMounts: [{{name: scratch, mountPath: /scratch}}]
"#
        ),
    )?;
    let pods: Api<Pod> = Api::namespaced(cp.client().await?, ns);
    wait_for("pod sleeper Running", Duration::from_secs(120), || async {
        let pod = pods.get("sleeper").await?;
        let running = pod.status.and_then(|s| s.phase).as_deref() == Some("Running");
        Ok(running.then_some(()))
    })
    .await
}

/// `leftovers` for a node that is still running (or just killed): must find its traces.
fn assert_traces(dir: &Path, snapshot: &HostSnapshot) -> Vec<String> {
    let found = leftovers(dir, snapshot);
    for trace in [
        "mount ", "process ", "bridge ", "cgroup ", "sysctl ", "chain ",
    ] {
        assert!(
            found.iter().any(|f| f.starts_with(trace)),
            "no {trace:?} trace of the running node in {found:?}"
        );
    }
    found
}

#[tokio::test]
async fn dropping_a_node_leaves_nothing() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let cp = ControlPlane::shared().await?;
    let client = cp.client().await?;
    let started = Instant::now();
    let node = Node::start(cp).await?;
    let ns = TestNamespace::create(&client, "node-drop").await?;
    run_a_pod(cp, &node, ns.name()).await?;
    nanogate_e2e::progress!(
        "[node] node Ready and a pod Running in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let (dir, snapshot) = (node.dir().to_path_buf(), node.host_snapshot().clone());
    let traces = assert_traces(&dir, &snapshot);
    assert_eq!(pod_processes().len(), 1);
    let log_dirs = std::fs::read_dir("/var/log/pods")?.count();
    assert!(log_dirs > 0, "the kubelet wrote no /var/log/pods entry");

    let dropped = Instant::now();
    drop(node);
    nanogate_e2e::progress!(
        "[node] dropped in {:.1}s ({} traces before)",
        dropped.elapsed().as_secs_f64(),
        traces.len()
    );
    assert_eq!(leftovers(&dir, &snapshot), Vec::<String>::new());
    assert!(!dir.exists(), "{} is still there", dir.display());
    assert_eq!(pod_processes(), Vec::<String>::new());
    // The pod was deleted through the kubelet while it still ran.
    let pods: Api<Pod> = Api::namespaced(client, ns.name());
    assert!(pods.get_opt("sleeper").await?.is_none());
    Ok(())
}

/// Run only as the child of `node_of_a_killed_test_process_is_cleaned_up`: starts a control
/// plane and a node with a pod, says where, and waits to be killed.
#[tokio::test]
#[ignore = "the child process of node_of_a_killed_test_process_is_cleaned_up"]
async fn hold_a_node_until_killed() -> Result<()> {
    let Some(out) = std::env::var_os(HOLD_ENV) else {
        return Ok(());
    };
    let cp = ControlPlane::start().await?;
    let node = Node::start(&cp).await?;
    let client = cp.client().await?;
    let ns = TestNamespace::create(&client, "node-held").await?;
    run_a_pod(&cp, &node, ns.name()).await?;
    let reaper = node.reaper_pid().context("the node has no reaper")?;
    std::fs::write(
        PathBuf::from(&out),
        format!("{}\n{reaper}\n", node.dir().display()),
    )?;
    tokio::time::sleep(Duration::from_secs(3600)).await;
    bail!("not killed within an hour")
}

/// The child test process holding a node, and what it wrote.
struct Held {
    child: Child,
    dir: PathBuf,
    reaper: i32,
    snapshot: HostSnapshot,
}

async fn start_holder() -> Result<Held> {
    let out = std::env::temp_dir().join(format!(
        "nanogate-hold-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let mut child = Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "hold_a_node_until_killed",
            "--ignored",
            "--nocapture",
        ])
        .env(HOLD_ENV, &out)
        .stdout(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(300);
    let text = loop {
        if let Ok(text) = std::fs::read_to_string(&out)
            && text.lines().count() == 2
        {
            break text;
        }
        if let Some(status) = child.try_wait()? {
            bail!("the node holder exited ({status}) before its node was up");
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the node holder did not start a node within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = std::fs::remove_file(&out);
    let mut lines = text.lines();
    let dir = PathBuf::from(lines.next().context("dir")?);
    let reaper = lines.next().context("reaper")?.trim().parse()?;
    let snapshot = HostSnapshot::from_run_dir(&dir).context("the node's record")?;
    Ok(Held {
        child,
        dir,
        reaper,
        snapshot,
    })
}

fn kill_9(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

#[tokio::test]
async fn node_of_a_killed_test_process_is_cleaned_up() -> Result<()> {
    let _serial = SERIAL.lock().await;

    // 1. kill -9 of the test process: its reaper tears the node down.
    let mut held = start_holder().await?;
    assert_traces(&held.dir, &held.snapshot);
    held.child.kill()?;
    held.child.wait()?;
    let killed = Instant::now();
    wait_for(
        "the reaper to clean up after kill -9",
        Duration::from_secs(60),
        || async {
            let left = leftovers(&held.dir, &held.snapshot);
            Ok((left.is_empty() && !held.dir.exists()).then_some(()))
        },
    )
    .await
    .with_context(|| format!("left: {:?}", leftovers(&held.dir, &held.snapshot)))?;
    assert_eq!(pod_processes(), Vec::<String>::new());
    nanogate_e2e::progress!(
        "[node] reaper cleaned up {:.1}s after kill -9",
        killed.elapsed().as_secs_f64()
    );

    // 2. kill -9 of the reaper and then of the test process: the containers' shims, mounts,
    //    cgroups, bridge and sysctls stay until the next node's start cleans them up.
    let mut held = start_holder().await?;
    kill_9(held.reaper);
    held.child.kill()?;
    held.child.wait()?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stale = leftovers(&held.dir, &held.snapshot);
    ensure!(
        stale.iter().any(|f| f.contains("containerd-shim")),
        "expected the killed node's shims to survive it: {stale:?}"
    );
    assert!(held.dir.exists());

    assert_eq!(
        pod_processes().len(),
        1,
        "the killed node's pod is not running"
    );
    let cp = ControlPlane::shared().await?;
    let node = Node::start(cp).await?;
    // The new node's own bridge, cgroups and sysctls are its own; what must be gone is
    // everything of the old run directory (mounts, processes, the directory) and the old pod.
    let marker = held.dir.display().to_string();
    let old: Vec<String> = leftovers(&held.dir, &held.snapshot)
        .into_iter()
        .filter(|f| f.contains(&marker))
        .collect();
    assert!(old.is_empty(), "the next start left {old:?}");
    assert!(!held.dir.exists(), "{} is still there", held.dir.display());
    assert_eq!(pod_processes(), Vec::<String>::new());

    let (dir, snapshot) = (node.dir().to_path_buf(), node.host_snapshot().clone());
    drop(node);
    assert_eq!(leftovers(&dir, &snapshot), Vec::<String>::new());
    // And the host is as before the killed node started.
    assert_eq!(leftovers(&held.dir, &held.snapshot), Vec::<String>::new());
    Ok(())
}

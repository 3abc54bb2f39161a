//! A real node attached to a [`ControlPlane`]: kubelet 1.20 + kube-scheduler + a private
//! containerd (CRI plugin, runc, cgroupfs) + the CNI `bridge` and `host-local` plugins on a bridge
//! of its own, and Services: kube-proxy 1.20 (iptables), cluster DNS (dnsmasq) and the
//! `kubernetes` Service (see [`crate::service_network`]). Pods scheduled on it really run:
//! container statuses, `kubectl logs`/`exec`, probes, Jobs, pod IPs and Service routing are the
//! kubelet's and kube-proxy's, not the harness's.
//!
//! ```no_run
//! # async fn t() -> anyhow::Result<()> {
//! let node = nanogate_e2e::Node::shared().await?; // starts ControlPlane::shared() too
//! node.import_image(nanogate_e2e::node::BUSYBOX_IMAGE)?;
//! # Ok(()) }
//! ```
//!
//! Everything the node creates lives in its own run directory (`<tmp>/nanogate-e2e/node-<owner
//! pid>-<random>`: containerd's root, state and socket, runc's state, the kubelet's root and
//! certificates, the CNI config and IPAM state, logs) except what the kubelet, containerd and
//! the CNI plugins put on the host: mounts (under the run directory), the `kubepods` cgroups,
//! the bridge [`BRIDGE`] (and the route to the Service range on it), kube-proxy's `KUBE-*`
//! iptables chains, the sysctls the kubelet and kube-proxy set, `/var/log/pods` and
//! `/var/log/containers`, the kubelet's device-plugin socket in `/var/lib/kubelet` (hard-coded
//! in 1.20), the CNI result cache in `/var/lib/cni` and shim sockets in `/run/containerd/s`. Before touching any of that the node records a [`HostSnapshot`] in its
//! run directory, and teardown undoes it in the order a node needs (pods first while the
//! kubelet runs, then kubelet and scheduler, containerd's tasks, containerd, the shims — which
//! daemonize, so the parent-death signal never reaches them — mounts deepest first, cgroups,
//! iptables chains, bridge, sysctls, log directories). Teardown runs:
//! - when a [`Node`] is dropped;
//! - in `nanogate-node-reaper`, a small process each node starts in its own session that waits
//!   for the owning test process to exit (normally — [`Node::shared`] is never dropped — or by
//!   `kill -9`) and then tears the node down from its record (its log:
//!   `<tmp>/nanogate-e2e/reaper.log`);
//! - in the next run's stale clean-up (`ControlPlane::start`, `Node::start`), for a node whose
//!   owner is gone and whose reaper did not finish (killed too, or never built).
//!
//! **One node per machine.** The kubelet's port 10250, `/var/log/pods`, the `kubepods` cgroups
//! and the bridge are machine-wide, so a node holds an exclusive `flock` on [`LOCK_FILE`] for
//! its lifetime (released by the kernel when the holder dies). A second starter — another test
//! binary, another checkout — **waits** for the lock (printing who holds it) for up to
//! `NANOGATE_E2E_NODE_WAIT` seconds (default 900), then fails naming the holder. Waiting rather
//! than failing lets `cargo test` runs of several test binaries, or two people on one machine,
//! share the node in turn. Within one test process use [`Node::shared`]: a second
//! [`Node::start`] there waits for the first node to be dropped. Requires root (network,
//! mounts, cgroups), no other kubelet on the machine, and `e2e/scripts/setup.sh`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::Node as NodeObject;
use kube::Api;
use serde_json::{Value, json};
use tokio::sync::OnceCell;

use crate::process::{Process, kill_pid, pid_alive, running_with_marker};
use crate::service_network::{self, NodeHelpers};
use crate::{ControlPlane, workspace_root};

/// The node's name in the apiserver.
pub const NODE_NAME: &str = "nanogate-e2e-node";
/// The Linux bridge pods attach to; the host has [`HOST_IP`] on it.
pub const BRIDGE: &str = "nanogate0";
/// The host's address on the pod network: the node's InternalIP (the kubelet listens here) and
/// the address pods reach this machine at. Pods get no default route: they reach this machine
/// only.
pub const HOST_IP: &str = "10.244.0.1";
/// The pod network (host-local IPAM).
pub const POD_SUBNET: &str = "10.244.0.0/24";
/// The sandbox image, built by `e2e/scripts/node-images.sh` into nanogate's podman store.
pub const PAUSE_IMAGE: &str = "localhost/nanogate-e2e/pause:3.2";
/// A tiny workload image (busybox-static with its applets, and `usock`, a Unix-socket client
/// and server), built by `e2e/scripts/node-images.sh`. Import it with [`Node::import_image`].
pub const BUSYBOX_IMAGE: &str = "localhost/nanogate-e2e/busybox:1";
/// Held (`flock`, exclusive) by the one node running on this machine.
pub const LOCK_FILE: &str = "/run/nanogate-e2e-node.lock";
/// Name of the node's reaper binary (`e2e/src/bin/node_reaper.rs`).
pub const REAPER_BINARY: &str = "nanogate-node-reaper";

const CNI_NETWORK: &str = "nanogate-e2e";
/// The host snapshot in the run directory; also what marks a run directory as a node's.
const RECORD: &str = "node.json";
/// The sysctls the kubelet (protect-kernel-defaults) and the bridge plugin may change.
const SYSCTLS: [&str; 9] = [
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "net.ipv4.ip_forward",
    // kube-proxy sets it (iptables mode, localhost NodePorts).
    "net.ipv4.conf.all.route_localnet",
    // The node sets it: bridged pod traffic passes iptables (crate::service_network).
    "net.bridge.bridge-nf-call-iptables",
];
/// Host directories the kubelet writes pod logs to, whatever its root directory.
const LOG_DIRS: [&str; 2] = ["/var/log/pods", "/var/log/containers"];
const CNI_CACHE: &str = "/var/lib/cni";
const SHIM_SOCKETS: &str = "/run/containerd/s";
/// Host directories the node's programs create whatever their configuration: the kubelet's
/// device-plugin socket (`/var/lib/kubelet/device-plugins`, hard-coded in 1.20), the CNI
/// result cache of containerd's CNI library, and the shims' sockets (`/run/containerd/s`).
/// Removed by teardown if they did not exist before; otherwise only the node's entries go.
const HOST_DIRS: [&str; 3] = ["/var/lib/kubelet", CNI_CACHE, "/run/containerd"];
/// CNI result cache entries of the node's pods (`<network>-<container id>-<interface>`): its
/// own network and containerd's loopback network.
const CNI_CACHE_PREFIXES: [&str; 2] = ["nanogate-e2e-", "cni-loopback-"];
/// How long the node may take to become Ready (≈ 25 s on an idle 2-core machine).
const READY_TIMEOUT: Duration = Duration::from_secs(180);

static SHARED: OnceCell<Node> = OnceCell::const_new();

/// A real node: see the [module documentation](self).
pub struct Node {
    dir: PathBuf,
    kubeconfig: PathBuf,
    socket: PathBuf,
    snapshot: HostSnapshot,
    /// containerd, kube-proxy, dnsmasq, kube-scheduler, kubelet (start order).
    processes: Mutex<Vec<Process>>,
    /// Reference → podman image id of what [`Node::import_image`] imported.
    imported: Mutex<BTreeMap<String, String>>,
    reaper: Mutex<Option<Child>>,
    /// The apiserver forwarder and the cluster DNS feeder (`crate::service_network`).
    helpers: Mutex<Option<NodeHelpers>>,
    /// Released last, after teardown.
    lock: Mutex<Option<NodeLock>>,
}

impl Node {
    /// One node per test process on [`ControlPlane::shared`], started on first use. Never
    /// dropped: its reaper tears it down when the test process exits.
    pub async fn shared() -> Result<&'static Node> {
        SHARED
            .get_or_try_init(|| async {
                let cp = ControlPlane::shared().await?;
                Node::start(cp).await
            })
            .await
    }

    /// Starts a node attached to `cp` and waits until it is Ready. Waits for [`LOCK_FILE`] if
    /// another node runs on this machine (see the [module documentation](self)). Drop the node
    /// before its control plane, so that its pods are deleted through the kubelet.
    pub async fn start(cp: &ControlPlane) -> Result<Node> {
        let started = Instant::now();
        ensure!(
            nix::unistd::geteuid().is_root(),
            "a real node needs root (bridge, mounts, cgroups); run the tests as root"
        );
        let assets = crate::k8s_assets()?;
        for binary in ["kubelet", "kube-scheduler", "kube-proxy", "pause"] {
            ensure!(
                assets.join(binary).exists(),
                "{} has no {binary}: run `bash e2e/scripts/setup.sh` (it builds the node's \
                 binaries into the cache) or point NANOGATE_K8S_ASSETS at a complete directory",
                assets.display()
            );
        }
        ensure_images(&assets)?;
        ensure!(
            Command::new("dnsmasq")
                .arg("--version")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            "no dnsmasq (the node's cluster DNS): run `bash e2e/scripts/setup.sh` (installs \
             Debian's dnsmasq-base)"
        );
        service_network::check_bridge_netfilter()?;
        let api_port: u16 = cp
            .server()
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse().ok())
            .context("the apiserver's port")?;

        let wait = std::env::var("NANOGATE_E2E_NODE_WAIT")
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(900));
        let mut lock = tokio::task::spawn_blocking(move || NodeLock::acquire(wait)).await??;
        let waited = started.elapsed();
        // Under the lock: whatever a dead node left (its reaper killed or never built).
        crate::cluster::clean_stale_runs(Some(&lock));
        if let Some(previous) = lock.previous_dir.clone().filter(|d| d.exists())
            && !owner_alive(&previous)
        {
            teardown_stale(&previous);
        }

        let dir = crate::cluster::runs_root().join(format!(
            "node-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("owner"), std::process::id().to_string())?;
        let snapshot = HostSnapshot::take();
        // Before anything touches the host: what teardown restores, even after `kill -9`.
        std::fs::write(
            dir.join(RECORD),
            serde_json::to_vec_pretty(&snapshot.to_json())?,
        )?;
        lock.record(&dir)?;
        let kubeconfig = dir.join("kubeconfig");
        std::fs::copy(cp.kubeconfig_path(), &kubeconfig)?;
        let node = Node {
            socket: dir.join("containerd/containerd.sock"),
            dir,
            kubeconfig,
            snapshot,
            processes: Mutex::new(Vec::new()),
            imported: Mutex::new(BTreeMap::new()),
            reaper: Mutex::new(None),
            helpers: Mutex::new(None),
            lock: Mutex::new(Some(lock)),
        };
        // From here on, dropping `node` (an error below) undoes what was done.
        node.spawn_reaper();
        node.start_containerd().await?;
        let containerd_up = started.elapsed();
        node.import_image(PAUSE_IMAGE)?;
        node.create_bridge()?;
        node.start_services(&assets, api_port)?;
        node.spawn(
            "kube-scheduler",
            &assets.join("kube-scheduler"),
            vec![
                format!("--kubeconfig={}", node.kubeconfig.display()),
                "--leader-elect=false".into(),
                "--port=0".into(),
                "--secure-port=0".into(),
                "--v=1".into(),
            ],
        )?;
        node.spawn("kubelet", &assets.join("kubelet"), node.kubelet_args())?;
        node.wait_ready(cp).await?;
        let ready = started.elapsed();
        node.wait_services().await?;
        crate::progress!(
            "[e2e] real node {NODE_NAME} Ready in {:.1}s, Services and DNS at {:.1}s (waited \
             {:.1}s for the node lock, containerd up at {:.1}s; dir {})",
            ready.as_secs_f64(),
            started.elapsed().as_secs_f64(),
            waited.as_secs_f64(),
            containerd_up.as_secs_f64(),
            node.dir.display()
        );
        Ok(node)
    }

    /// The node's name in the apiserver (`spec.nodeName` of its pods).
    pub fn node_name(&self) -> &str {
        NODE_NAME
    }

    /// The node's run directory (logs: `containerd.log`, `kubelet.log`, `kube-scheduler.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The private containerd's socket (for `ctr -a <socket> -n k8s.io …`).
    pub fn containerd_socket(&self) -> &Path {
        &self.socket
    }

    /// What the host looked like before the node started (restored by teardown).
    pub fn host_snapshot(&self) -> &HostSnapshot {
        &self.snapshot
    }

    /// pid of the node's reaper (for tests that kill it).
    pub fn reaper_pid(&self) -> Option<u32> {
        let reaper = self.reaper.lock().unwrap_or_else(|e| e.into_inner());
        reaper.as_ref().map(Child::id)
    }

    /// `ctr -n k8s.io <args>` on the node's containerd; its stdout.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        ctr(&self.socket, args)
    }

    /// Moves `reference` from nanogate's podman store (`e2e/scripts/podman.sh`) into the node's
    /// containerd (`podman save --format docker-archive` → `ctr images import`), so pods can
    /// use it with `imagePullPolicy: Never` (or `IfNotPresent`). A no-op when the same image
    /// was imported already.
    pub fn import_image(&self, reference: &str) -> Result<()> {
        let id = crate::podman::podman_ok(&["image", "inspect", "--format", "{{.Id}}", reference])
            .with_context(|| {
                format!(
                    "{reference} is not in nanogate's podman store (bash e2e/scripts/podman.sh \
                     images); e2e/scripts/setup.sh builds the node's own images"
                )
            })?
            .trim()
            .to_string();
        let mut imported = self.imported.lock().unwrap_or_else(|e| e.into_inner());
        if imported.get(reference) == Some(&id) {
            return Ok(());
        }
        let started = Instant::now();
        let archive = self
            .dir
            .join(format!("image-{:08x}.tar", rand::random::<u32>()));
        let archive_arg = archive.display().to_string();
        let saved = crate::podman::podman_ok(&[
            "save",
            "--format",
            "docker-archive",
            "-o",
            &archive_arg,
            reference,
        ]);
        let result = saved.and_then(|_| self.ctr(&["images", "import", &archive_arg]));
        let _ = std::fs::remove_file(&archive);
        result.with_context(|| format!("importing {reference} into the node's containerd"))?;
        crate::progress!(
            "[e2e] imported {reference} into the node in {:.1}s",
            started.elapsed().as_secs_f64()
        );
        imported.insert(reference.to_string(), id);
        Ok(())
    }

    fn kubelet_args(&self) -> Vec<String> {
        let d = |name: &str| self.dir.join(name).display().to_string();
        let endpoint = format!("unix://{}", self.socket.display());
        vec![
            format!("--kubeconfig={}", self.kubeconfig.display()),
            "--container-runtime=remote".into(),
            format!("--container-runtime-endpoint={endpoint}"),
            format!("--image-service-endpoint={endpoint}"),
            "--runtime-request-timeout=2m".into(),
            "--cgroup-driver=cgroupfs".into(),
            "--fail-swap-on=false".into(),
            format!("--root-dir={}", d("kubelet")),
            format!("--cert-dir={}", d("kubelet-pki")),
            format!("--volume-plugin-dir={}", d("volume-plugins")),
            format!("--pod-infra-container-image={PAUSE_IMAGE}"),
            format!("--hostname-override={NODE_NAME}"),
            format!("--node-ip={HOST_IP}"),
            format!("--address={HOST_IP}"),
            "--port=10250".into(),
            "--read-only-port=0".into(),
            "--healthz-bind-address=127.0.0.1".into(),
            "--healthz-port=10248".into(),
            "--make-iptables-util-chains=false".into(),
            "--register-node=true".into(),
            // One argument, no shell: the `<` need no quoting here.
            "--eviction-hard=memory.available<50Mi,nodefs.available<1%,imagefs.available<1%".into(),
            "--image-gc-high-threshold=100".into(),
            "--serialize-image-pulls=false".into(),
            // The first status says NotReady (runtime not checked yet); the default 10 s
            // until the next one is most of the time to Ready.
            "--node-status-update-frequency=2s".into(),
            // Cluster DNS (crate::service_network); none of this machine's resolvers.
            format!("--cluster-dns={}", service_network::DNS_IP),
            format!("--cluster-domain={}", service_network::CLUSTER_DOMAIN),
            "--resolv-conf=".into(),
            "--v=1".into(),
        ]
    }

    /// Services on the node (`crate::service_network`): the route to the Service range, the
    /// apiserver forwarder and the `kubernetes` Endpoints, kube-proxy, dnsmasq and its feeder.
    fn start_services(&self, assets: &Path, api_port: u16) -> Result<()> {
        service_network::route_services_to_bridge()?;
        // Pods reach Services through this machine (bridge → DNAT → bridge), and the replies
        // of a pod on the same bridge pass iptables to be un-NATed.
        for name in ["net.ipv4.ip_forward", "net.bridge.bridge-nf-call-iptables"] {
            if read_sysctl(name).as_deref() != Some("1") {
                std::fs::write(sysctl_path(name), "1")
                    .with_context(|| format!("setting {name}"))?;
            }
        }
        let helpers = NodeHelpers::start(
            (HOST_IP.parse::<std::net::Ipv4Addr>()?, api_port).into(),
            (std::net::Ipv4Addr::LOCALHOST, api_port).into(),
            &self.kubeconfig,
            &service_network::hosts_dir(&self.dir),
        )?;
        *self.helpers.lock().unwrap_or_else(|e| e.into_inner()) = Some(helpers);
        crate::apply_yaml(
            &self.kubeconfig,
            &service_network::kubernetes_endpoints_yaml(api_port),
        )?;
        self.spawn(
            "kube-proxy",
            &assets.join("kube-proxy"),
            service_network::kube_proxy_args(&self.dir),
        )?;
        self.spawn(
            "dnsmasq",
            Path::new("dnsmasq"),
            service_network::dnsmasq_args(&self.dir),
        )?;
        Ok(())
    }

    /// Waits until kube-proxy routes the `kubernetes` Service and cluster DNS answers its name.
    async fn wait_services(&self) -> Result<()> {
        let name = format!("kubernetes.default.svc.{}", service_network::CLUSTER_DOMAIN);
        let result = crate::wait_for(
            "kube-proxy and cluster DNS (the kubernetes Service)",
            Duration::from_secs(60),
            || async {
                self.fail_if_exited()?;
                ensure!(
                    service_network::kubernetes_service_programmed(),
                    "kube-proxy has not programmed the kubernetes Service's endpoint"
                );
                let resolved = service_network::resolve(&name)?;
                ensure!(
                    resolved == Some(service_network::KUBERNETES_SERVICE_IP.parse()?),
                    "cluster DNS answers {resolved:?} for {name}"
                );
                Ok(Some(()))
            },
        )
        .await;
        result.map_err(|e| self.with_logs(e))
    }

    async fn start_containerd(&self) -> Result<()> {
        let d = |name: &str| self.dir.join(name).display().to_string();
        std::fs::create_dir_all(self.dir.join("cni/net.d"))?;
        std::fs::write(
            self.dir.join("cni/net.d/10-nanogate-e2e.conflist"),
            serde_json::to_vec_pretty(&cni_conflist(&d("cni/ipam")))?,
        )?;
        let config = self.dir.join("containerd.toml");
        std::fs::write(&config, containerd_config(&self.dir, &self.socket))?;
        self.spawn(
            "containerd",
            Path::new("containerd"),
            vec!["--config".into(), config.display().to_string()],
        )?;
        let result = crate::wait_for("containerd", Duration::from_secs(30), || async {
            self.fail_if_exited()?;
            Ok((self.socket.exists() && self.ctr(&["version"]).is_ok()).then_some(()))
        })
        .await;
        result.map_err(|e| self.with_logs(e))
    }

    fn create_bridge(&self) -> Result<()> {
        // Under the lock a bridge of this name is a leftover of an unrecorded run.
        if Path::new(&format!("/sys/class/net/{BRIDGE}")).exists() {
            run("ip", &["link", "del", BRIDGE])?;
        }
        run("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
        run(
            "ip",
            &["addr", "replace", &format!("{HOST_IP}/24"), "dev", BRIDGE],
        )?;
        run("ip", &["link", "set", BRIDGE, "up"])?;
        Ok(())
    }

    fn spawn(&self, name: &'static str, program: &Path, args: Vec<String>) -> Result<()> {
        let process = Process::spawn(name, program, &args, &self.dir)?;
        self.processes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(process);
        Ok(())
    }

    /// Starts `nanogate-node-reaper <dir>` in its own session (no parent-death signal: it must
    /// outlive us). Without the binary, the next run's stale clean-up is the only safety net.
    fn spawn_reaper(&self) {
        let Some(binary) = reaper_binary() else {
            crate::progress!(
                "[e2e] warning: no {REAPER_BINARY} binary (cargo build -p nanogate-e2e --bins); \
                 if this test process dies without dropping the node, the next run cleans up"
            );
            return;
        };
        let log_path = crate::cluster::runs_root().join("reaper.log");
        let log = OpenOptions::new().create(true).append(true).open(&log_path);
        let Ok((out, err)) = log.and_then(|out| Ok((out.try_clone()?, out))) else {
            crate::progress!("[e2e] warning: cannot open {}", log_path.display());
            return;
        };
        let spawned = Command::new("setsid")
            .arg(&binary)
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn();
        match spawned {
            Ok(child) => {
                let _ = std::fs::write(self.dir.join("reaper.pid"), child.id().to_string());
                *self.reaper.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
            }
            Err(error) => crate::progress!("[e2e] warning: starting {}: {error}", binary.display()),
        }
    }

    async fn wait_ready(&self, cp: &ControlPlane) -> Result<()> {
        let nodes: Api<NodeObject> = Api::all(cp.client().await?);
        let result = crate::wait_for("the node to become Ready", READY_TIMEOUT, || {
            let nodes = nodes.clone();
            async move {
                self.fail_if_exited()?;
                let ready = nodes.get_opt(NODE_NAME).await?.is_some_and(|node| {
                    node.status
                        .and_then(|s| s.conditions)
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                });
                Ok(ready.then_some(()))
            }
        })
        .await;
        result.map_err(|e| self.with_logs(e))
    }

    fn fail_if_exited(&self) -> Result<()> {
        crate::process::fail_if_any_exited(
            &mut self.processes.lock().unwrap_or_else(|e| e.into_inner()),
        )
    }

    fn with_logs(&self, error: anyhow::Error) -> anyhow::Error {
        crate::process::with_logs(
            &self.processes.lock().unwrap_or_else(|e| e.into_inner()),
            "the real node did not start",
            error,
        )
    }

    fn kubelet_running(&self) -> bool {
        let mut processes = self.processes.lock().unwrap_or_else(|e| e.into_inner());
        processes
            .iter_mut()
            .any(|p| p.name == "kubelet" && p.exited().is_none())
    }

    /// Lets the kubelet stop this node's pods (containers, CNI DEL, sandboxes, volume unmounts)
    /// while it still runs. The node is cordoned first so that controllers' replacements stay
    /// Pending. Waits (up to 20 s) for what the host sees — no task left in containerd, no
    /// volume mounted — rather than for the API objects, which the kubelet deletes only after
    /// its next housekeeping (several seconds more).
    fn drain(&self) {
        if !self.kubelet_running() {
            return;
        }
        self.kubectl_quietly(&["cordon", NODE_NAME]);
        self.delete_pods(&["--grace-period=1"]);
        let pods_dir = self.dir.join("kubelet/pods");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline && self.kubelet_running() {
            let tasks = self.ctr(&["tasks", "ls", "-q"]).unwrap_or_default();
            if tasks.trim().is_empty() && mounts_under(&pods_dir).is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Deletes this node's pods, with `grace` (kubectl's flags), without waiting.
    fn delete_pods(&self, grace: &[&str]) {
        let selector = format!("--field-selector=spec.nodeName={NODE_NAME}");
        let mut args = vec![
            "delete",
            "pods",
            "--all-namespaces",
            &selector,
            "--wait=false",
        ];
        args.extend(grace);
        self.kubectl_quietly(&args);
    }

    fn kubectl_quietly(&self, args: &[&str]) {
        let _ = crate::kubectl_command(&self.kubeconfig)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// The whole teardown (see the [module documentation](self)); what it could not undo, and
    /// how long each phase took.
    fn teardown(&mut self) -> (Vec<String>, Vec<(&'static str, Duration)>) {
        let mut phases = Vec::new();
        let mut phase_started = Instant::now();
        let mut phase = |name: &'static str| {
            phases.push((name, phase_started.elapsed()));
            phase_started = Instant::now();
        };
        self.drain();
        phase("pods");
        let processes = self.processes.get_mut().unwrap_or_else(|e| e.into_inner());
        // kubelet and kube-scheduler; containerd stays up to kill what is left.
        let mut containerd = None;
        while let Some(mut process) = processes.pop() {
            if process.name == "containerd" {
                containerd = Some(process);
            } else {
                process.stop();
            }
        }
        // The forwarder and the DNS feeder; the kubelet, kube-proxy and dnsmasq are stopped.
        drop(
            self.helpers
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        phase("kubelet");
        // The kubelet is gone: pods it did not finish deleting, and the node itself, go
        // from the apiserver now (the control plane may outlive the node).
        self.delete_pods(&["--grace-period=0", "--force"]);
        self.kubectl_quietly(&[
            "delete",
            "node",
            NODE_NAME,
            "--wait=false",
            "--ignore-not-found",
        ]);
        // The `kubernetes` Endpoints pointed at this node's forwarder.
        self.kubectl_quietly(&[
            "delete",
            "endpoints",
            "-n",
            "default",
            "-l",
            &format!("nanogate.io/e2e-node={NODE_NAME}"),
            "--wait=false",
        ]);
        phase("api");
        if let Some(mut containerd) = containerd {
            if containerd.exited().is_none() {
                kill_containerd_tasks(&self.socket);
            }
            containerd.stop();
        }
        phase("containerd");
        let mut problems = teardown_host(&self.dir, Some(&self.snapshot));
        phase("host");
        problems.extend(leftovers(&self.dir, &self.snapshot));
        if let Some(mut reaper) = self
            .reaper
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = reaper.kill();
            let _ = reaper.wait();
        }
        (problems, phases)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let started = Instant::now();
        let (problems, phases) = self.teardown();
        let phases: Vec<String> = phases
            .iter()
            .map(|(name, took)| format!("{name} {:.1}s", took.as_secs_f64()))
            .collect();
        if std::env::var_os("NANOGATE_E2E_KEEP").is_some() {
            crate::progress!(
                "[e2e] keeping {} (NANOGATE_E2E_KEEP is set; the next run removes it)",
                self.dir.display()
            );
        } else {
            remove_run_dir(&self.dir);
        }
        let left = if problems.is_empty() {
            String::new()
        } else {
            format!(", but left: {}", problems.join("; "))
        };
        crate::progress!(
            "[e2e] real node torn down in {:.1}s ({}){left}",
            started.elapsed().as_secs_f64(),
            phases.join(", ")
        );
        // Last: the next node may start now.
        drop(
            self.lock
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
    }
}

/// The host state a node may change, as it was before the node started.
#[derive(Clone, Debug, PartialEq)]
pub struct HostSnapshot {
    /// sysctl name → value.
    pub sysctls: BTreeMap<String, String>,
    /// Entries of each of [`LOG_DIRS`] (`None`: the directory did not exist).
    log_entries: BTreeMap<String, Option<BTreeSet<String>>>,
    /// Which of [`HOST_DIRS`] existed.
    host_dirs: BTreeMap<String, bool>,
    /// The `KUBE-*` iptables chains there were ([`service_network::kube_chains`]; normally none).
    kube_chains: BTreeSet<String>,
}

impl HostSnapshot {
    pub fn take() -> Self {
        let sysctls = SYSCTLS
            .iter()
            .filter_map(|name| read_sysctl(name).map(|value| (name.to_string(), value)))
            .collect();
        let log_entries = LOG_DIRS
            .iter()
            .map(|dir| (dir.to_string(), dir_entries(Path::new(dir))))
            .collect();
        Self {
            sysctls,
            log_entries,
            host_dirs: HOST_DIRS
                .iter()
                .map(|dir| (dir.to_string(), Path::new(dir).exists()))
                .collect(),
            kube_chains: service_network::kube_chains(),
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "sysctls": self.sysctls,
            "logEntries": self.log_entries,
            "hostDirs": self.host_dirs,
            "kubeChains": self.kube_chains,
        })
    }

    /// The snapshot a node recorded in its run directory `dir`.
    pub fn from_run_dir(dir: &Path) -> Option<Self> {
        let value: Value = serde_json::from_slice(&std::fs::read(dir.join(RECORD)).ok()?).ok()?;
        let sysctls = value["sysctls"]
            .as_object()?
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
            .collect();
        let log_entries = value["logEntries"]
            .as_object()?
            .iter()
            .map(|(dir, entries)| {
                let entries = entries.as_array().map(|names| {
                    names
                        .iter()
                        .filter_map(|n| n.as_str().map(str::to_string))
                        .collect()
                });
                (dir.clone(), entries)
            })
            .collect();
        Some(Self {
            sysctls,
            log_entries,
            host_dirs: value["hostDirs"]
                .as_object()?
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_bool()?)))
                .collect(),
            // Absent from the records of older harnesses: no chains then.
            kube_chains: value["kubeChains"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c.as_str().map(str::to_string))
                .collect(),
        })
    }
}

/// What a node with run directory `dir` left on the host compared with `snapshot`: mounts
/// under `dir`, processes started from it (containerd, kubelet, scheduler, kube-proxy, dnsmasq,
/// shims), the bridge, `kubepods` cgroups, changed sysctls, new `/var/log/pods` entries, stale
/// shim sockets, `KUBE-*` iptables chains. Empty after a complete teardown.
pub fn leftovers(dir: &Path, snapshot: &HostSnapshot) -> Vec<String> {
    let mut found = Vec::new();
    for mount in mounts_under(dir) {
        found.push(format!("mount {}", mount.display()));
    }
    let marker = dir.display().to_string();
    let me = std::process::id() as i32;
    for (pid, _, cmdline) in processes() {
        if pid != me && cmdline.contains(&marker) && !cmdline.contains(REAPER_BINARY) {
            found.push(format!("process {pid} ({})", shorten(&cmdline)));
        }
    }
    if Path::new(&format!("/sys/class/net/{BRIDGE}")).exists() {
        found.push(format!("bridge {BRIDGE}"));
    }
    for cgroup in kubepods_cgroups() {
        found.push(format!("cgroup {}", cgroup.display()));
    }
    for (name, before) in &snapshot.sysctls {
        let now = read_sysctl(name).unwrap_or_default();
        if &now != before {
            found.push(format!("sysctl {name} = {now} (was {before})"));
        }
    }
    for (log_dir, before) in &snapshot.log_entries {
        let now = dir_entries(Path::new(log_dir));
        match (before, now) {
            (None, Some(_)) => found.push(format!("directory {log_dir}")),
            (Some(before), Some(now)) => {
                for entry in now.difference(before) {
                    found.push(format!("{log_dir}/{entry}"));
                }
            }
            _ => {}
        }
    }
    for socket in stale_shim_sockets() {
        found.push(format!("socket {}", socket.display()));
    }
    for (host_dir, existed) in &snapshot.host_dirs {
        if !existed && Path::new(host_dir).exists() {
            found.push(format!("directory {host_dir}"));
        }
    }
    for chain in service_network::kube_chains().difference(&snapshot.kube_chains) {
        found.push(format!("chain {chain}"));
    }
    found
}

/// Waits for the owner of node run directory `dir` to exit, then tears the node down from its
/// record (under the node lock). What `nanogate-node-reaper` runs.
pub fn reap(dir: &Path) -> Result<()> {
    let owner = std::fs::read_to_string(dir.join("owner"))
        .with_context(|| format!("{} has no owner file", dir.display()))?;
    let owner: i32 = owner.trim().parse().context("owner pid")?;
    while pid_alive(owner) {
        if !dir.exists() {
            return Ok(()); // dropped and removed by its owner
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let _lock = NodeLock::acquire(Duration::from_secs(900))?;
    if dir.exists() {
        crate::progress!(
            "[reaper] owner {owner} of {} is gone; tearing the node down",
            dir.display()
        );
        teardown_stale(dir);
    }
    Ok(())
}

/// True if `dir` is a node's run directory (rather than a control plane's).
pub(crate) fn is_node_dir(dir: &Path) -> bool {
    dir.join(RECORD).exists()
        || dir
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("node-"))
}

/// Stale clean-up of node run directory `dir` whose owner is gone: only under the node lock
/// (`held`, or taken here without waiting). False if another live node holds the lock — it
/// cleaned up what was stale when it started.
pub(crate) fn clean_stale_dir(dir: &Path, held: Option<&NodeLock>) -> bool {
    let _taken;
    if held.is_none() {
        match NodeLock::try_acquire() {
            Ok(Some(lock)) => _taken = lock,
            _ => return false,
        }
    }
    teardown_stale(dir);
    true
}

fn owner_alive(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("owner"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .is_some_and(pid_alive)
}

/// Teardown of a node whose owner died: its kubelet, scheduler and containerd died with it
/// (parent-death signal) or are killed here; the rest as [`teardown_host`].
fn teardown_stale(dir: &Path) {
    let started = Instant::now();
    let marker = dir.display().to_string();
    let pids = std::fs::read_to_string(dir.join("pids")).unwrap_or_default();
    for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        if running_with_marker(pid, &marker) {
            kill_pid(pid);
        }
    }
    let snapshot = HostSnapshot::from_run_dir(dir);
    let mut problems = teardown_host(dir, snapshot.as_ref());
    if let Some(snapshot) = &snapshot {
        problems.extend(leftovers(dir, snapshot));
    }
    remove_run_dir(dir);
    crate::progress!(
        "[e2e] removed stale node run {} in {:.1}s{}",
        dir.display(),
        started.elapsed().as_secs_f64(),
        if problems.is_empty() {
            String::new()
        } else {
            format!("; left: {}", problems.join("; "))
        }
    );
}

/// Undoes on the host what a node with run directory `dir` did, once its kubelet and
/// containerd are stopped: containers and shims, mounts, cgroups, and — with the node's
/// record — bridge, sysctls, log directories, CNI cache, shim sockets. Idempotent. Returns
/// what it could not undo.
fn teardown_host(dir: &Path, snapshot: Option<&HostSnapshot>) -> Vec<String> {
    let mut problems = Vec::new();
    kill_containers(dir);
    problems.extend(unmount_under(dir));
    problems.extend(remove_kubepods_cgroups());
    let Some(snapshot) = snapshot else {
        return problems;
    };
    // kube-proxy is stopped: its chains and the jumps into them go.
    problems.extend(service_network::remove_kube_chains(&snapshot.kube_chains));
    if Path::new(&format!("/sys/class/net/{BRIDGE}")).exists()
        && let Err(error) = run("ip", &["link", "del", BRIDGE])
    {
        problems.push(format!("{error:#}"));
    }
    for (name, value) in &snapshot.sysctls {
        if read_sysctl(name).as_ref() != Some(value) {
            let path = sysctl_path(name);
            if let Err(error) = std::fs::write(&path, value) {
                problems.push(format!("restoring {name} = {value}: {error}"));
            }
        }
    }
    for (log_dir, before) in &snapshot.log_entries {
        let log_dir = Path::new(log_dir);
        let now = dir_entries(log_dir).unwrap_or_default();
        for entry in now.difference(&before.clone().unwrap_or_default()) {
            let path = log_dir.join(entry);
            let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
        }
        if before.is_none() {
            let _ = std::fs::remove_dir(log_dir);
        }
    }
    let results = Path::new(CNI_CACHE).join("results");
    for entry in dir_entries(&results).unwrap_or_default() {
        if CNI_CACHE_PREFIXES.iter().any(|p| entry.starts_with(p)) {
            let _ = std::fs::remove_file(results.join(entry));
        }
    }
    for socket in stale_shim_sockets() {
        let _ = std::fs::remove_file(socket);
    }
    for (dir, existed) in &snapshot.host_dirs {
        let dir = Path::new(dir);
        // Never through a mount, nor a socket someone still listens on.
        let busy = !mounts_under(dir).is_empty() || !bound_sockets_under(dir).is_empty();
        if !existed
            && dir.exists()
            && !busy
            && let Err(error) = std::fs::remove_dir_all(dir)
        {
            problems.push(format!("removing {}: {error}", dir.display()));
        }
    }
    problems
}

/// Kills every container of the node and the shims that ran them. A shim (`containerd-shim-
/// runc-v2 … -address <dir>/containerd/containerd.sock`) daemonizes, so it outlives containerd
/// and the test process; its children are the containers' first processes (each the init of
/// its own pid namespace, so killing it ends the container). Whatever is still in a `kubepods`
/// cgroup afterwards (one node per machine: it is ours) is killed too.
fn kill_containers(dir: &Path) {
    let marker = dir.display().to_string();
    let all = processes();
    let shims: Vec<i32> = all
        .iter()
        .filter(|(_, _, cmdline)| cmdline.contains("containerd-shim") && cmdline.contains(&marker))
        .map(|(pid, _, _)| *pid)
        .collect();
    for (pid, ppid, _) in &all {
        if shims.contains(ppid) {
            kill_pid(*pid);
        }
    }
    for pid in &shims {
        kill_pid(*pid);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut alive: Vec<i32> = shims.iter().copied().filter(|p| pid_alive(*p)).collect();
        for cgroup in kubepods_cgroups() {
            let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
            alive.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        if alive.is_empty() || Instant::now() >= deadline {
            return;
        }
        for pid in alive {
            kill_pid(pid);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// While containerd still runs: SIGKILL every task, then delete tasks and containers.
fn kill_containerd_tasks(socket: &Path) {
    let ids = |kind: &str| -> Vec<String> {
        ctr(socket, &[kind, "ls", "-q"])
            .map(|out| out.lines().map(str::to_string).collect())
            .unwrap_or_default()
    };
    let tasks = ids("tasks");
    for task in &tasks {
        let _ = ctr(socket, &["tasks", "kill", "-s", "SIGKILL", task]);
    }
    for task in &tasks {
        let _ = ctr(socket, &["tasks", "delete", "-f", task]);
    }
    for container in ids("containers") {
        let _ = ctr(socket, &["containers", "delete", &container]);
    }
}

/// Unmounts everything mounted at or under `dir`, most recent (so deepest and topmost) first;
/// lazily if a mount stays busy. Returns the mounts it could not remove.
fn unmount_under(dir: &Path) -> Vec<String> {
    for _ in 0..5 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            return Vec::new();
        }
        for mount in mounts.iter().rev() {
            let ok = Command::new("umount")
                .arg(mount)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(mount)
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
    mounts_under(dir)
        .into_iter()
        .map(|m| format!("could not unmount {}", m.display()))
        .collect()
}

/// Mount points at or under `dir`, in mount order (`/proc/self/mountinfo`).
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mount_path(field)))
        .filter(|path| path.starts_with(dir))
        .collect()
}

/// `/proc/self/mountinfo` writes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            let text = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every `kubepods` cgroup directory in every hierarchy, deepest first.
fn kubepods_cgroups() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&entry.path(), out);
                }
            }
        }
        out.push(dir.to_path_buf());
    }
    let mut found = Vec::new();
    if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
        for hierarchy in hierarchies.flatten() {
            let top = hierarchy.path().join("kubepods");
            if top.is_dir() {
                walk(&top, &mut found);
            }
        }
    }
    found
}

fn remove_kubepods_cgroups() -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let cgroups = kubepods_cgroups();
        for cgroup in &cgroups {
            let _ = std::fs::remove_dir(cgroup);
        }
        let left = kubepods_cgroups();
        if left.is_empty() {
            return Vec::new();
        }
        if Instant::now() >= deadline {
            return left
                .iter()
                .map(|c| format!("could not remove cgroup {}", c.display()))
                .collect();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Paths of the Unix sockets some process has bound (`/proc/net/unix`).
fn bound_sockets() -> BTreeSet<PathBuf> {
    std::fs::read_to_string("/proc/net/unix")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().nth(7).map(PathBuf::from))
        .collect()
}

fn bound_sockets_under(dir: &Path) -> Vec<PathBuf> {
    bound_sockets()
        .into_iter()
        .filter(|socket| socket.starts_with(dir))
        .collect()
}

/// Shim sockets in `/run/containerd/s` no process has bound any more.
fn stale_shim_sockets() -> Vec<PathBuf> {
    let bound = bound_sockets();
    dir_entries(Path::new(SHIM_SOCKETS))
        .unwrap_or_default()
        .into_iter()
        .map(|name| Path::new(SHIM_SOCKETS).join(name))
        .filter(|path| !bound.contains(path))
        .collect()
}

/// (pid, parent pid, command line with spaces) of every process.
fn processes() -> Vec<(i32, i32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let (_, rest) = stat.rsplit_once(')')?;
            let ppid: i32 = rest.split_whitespace().nth(1)?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            Some((pid, ppid, cmdline))
        })
        .collect()
}

fn shorten(text: &str) -> String {
    let text = text.trim();
    match text.char_indices().nth(100) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}

fn sysctl_path(name: &str) -> PathBuf {
    Path::new("/proc/sys").join(name.replace('.', "/"))
}

fn read_sysctl(name: &str) -> Option<String> {
    std::fs::read_to_string(sysctl_path(name))
        .ok()
        .map(|v| v.trim().to_string())
}

/// Names in `dir`, or `None` if it does not exist.
fn dir_entries(dir: &Path) -> Option<BTreeSet<String>> {
    let entries = std::fs::read_dir(dir).ok()?;
    Some(
        entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
    )
}

/// Removes a run directory unless something is still mounted under it (removing through a
/// mount would delete what the mount shows: a pod's volume, a bind-mounted host path).
fn remove_run_dir(dir: &Path) {
    let mounts = mounts_under(dir);
    if mounts.is_empty() {
        let _ = std::fs::remove_dir_all(dir);
    } else {
        crate::progress!(
            "[e2e] not removing {}: {} mounts remain under it",
            dir.display(),
            mounts.len()
        );
    }
}

pub(crate) fn run(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    ensure!(
        output.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn ctr(socket: &Path, args: &[&str]) -> Result<String> {
    let address = socket.display().to_string();
    let mut full = vec![
        "--address",
        &address,
        "--namespace",
        "k8s.io",
        "--connect-timeout",
        "5s",
    ];
    full.extend_from_slice(args);
    run("ctr", &full)
}

fn reaper_binary() -> Option<PathBuf> {
    // Test binaries live in target/debug/deps, the demo in target/debug: look beside and above.
    let exe = std::env::current_exe().ok()?;
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(REAPER_BINARY))
        .find(|path| path.is_file())
        .or_else(|| crate::workspace_binary(REAPER_BINARY).ok())
}

/// Builds the pause and busybox images once per process (`e2e/scripts/node-images.sh`, a no-op
/// when they are in the store).
fn ensure_images(assets: &Path) -> Result<()> {
    static BUILT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    let result = BUILT.get_or_init(|| {
        let script = workspace_root().join("e2e/scripts/node-images.sh");
        let status = Command::new("bash")
            .arg(&script)
            .arg(assets)
            .stdout(Stdio::null())
            .status();
        match status {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => Err(format!("{} failed ({status})", script.display())),
            Err(error) => Err(format!("running {}: {error}", script.display())),
        }
    });
    result.clone().map_err(anyhow::Error::msg)
}

fn containerd_config(dir: &Path, socket: &Path) -> String {
    let d = |name: &str| dir.join(name).display().to_string();
    format!(
        r#"# Written by nanogate-e2e (e2e/src/node.rs): a private containerd for the real node.
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.internal.v1.opt", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{socket}"

[ttrpc]
  address = ""

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  # The sandbox lacks CAP_SYS_RESOURCE: without this runc fails with "can't get final child's
  # PID from pipe: EOF".
  restrict_oom_score_adj = true
  # Network namespaces under the state directory (not /run/netns): torn down with it.
  netns_mounts_under_state_dir = true
  max_container_log_line_size = 16384
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/bin/runc"
        # runc's state beside containerd's (not /run/containerd/runc).
        Root = "{runc}"
        SystemdCgroup = false
"#,
        root = d("containerd/root"),
        state = d("containerd/state"),
        socket = socket.display(),
        cni = d("cni/net.d"),
        runc = d("runc"),
    )
}

fn cni_conflist(ipam_dir: &str) -> Value {
    json!({
        "cniVersion": "0.4.0",
        "name": CNI_NETWORK,
        "plugins": [{
            "type": "bridge",
            "bridge": BRIDGE,
            // The harness gives the bridge HOST_IP; pods get no default route.
            "isGateway": false,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": POD_SUBNET, "gateway": HOST_IP}]],
                // Services through this machine (kube-proxy); still no default route.
                "routes": [{"dst": service_network::SERVICE_CIDR, "gw": HOST_IP}],
                "dataDir": ipam_dir,
            }
        }]
    })
}

/// The machine-wide node lock: an exclusive `flock` on [`LOCK_FILE`], released when dropped or
/// when the holding process dies. The file names the holder (pid and run directory).
pub(crate) struct NodeLock {
    file: File,
    /// The run directory the previous holder recorded.
    previous_dir: Option<PathBuf>,
}

impl NodeLock {
    fn open() -> Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(LOCK_FILE)
            .with_context(|| format!("opening {LOCK_FILE}"))
    }

    fn try_acquire() -> Result<Option<NodeLock>> {
        let mut file = Self::open()?;
        match file.try_lock() {
            Ok(()) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let previous_dir = text.lines().nth(1).map(PathBuf::from);
                Ok(Some(NodeLock { file, previous_dir }))
            }
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(error)) => {
                Err(error).with_context(|| format!("locking {LOCK_FILE}"))
            }
        }
    }

    /// Waits up to `wait` for the lock, saying who holds it.
    fn acquire(wait: Duration) -> Result<NodeLock> {
        let started = Instant::now();
        let mut next_note = started;
        loop {
            if let Some(lock) = Self::try_acquire()? {
                return Ok(lock);
            }
            let holder = Self::holder();
            if started.elapsed() >= wait {
                bail!(
                    "another real node runs on this machine ({holder}) and still held {LOCK_FILE} \
                     after {wait:?}. One node per machine: the kubelet's port 10250, \
                     /var/log/pods, the kubepods cgroups and the bridge {BRIDGE} are \
                     machine-wide. Wait for it, or set NANOGATE_E2E_NODE_WAIT (seconds)."
                );
            }
            if Instant::now() >= next_note {
                crate::progress!(
                    "[e2e] waiting for the real node lock {LOCK_FILE}: held by {holder} \
                     (one node per machine; up to {}s)",
                    wait.saturating_sub(started.elapsed()).as_secs()
                );
                next_note = Instant::now() + Duration::from_secs(60);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn holder() -> String {
        let text = std::fs::read_to_string(LOCK_FILE).unwrap_or_default();
        let mut lines = text.lines();
        match (lines.next(), lines.next()) {
            (Some(pid), Some(dir)) => {
                let command = std::fs::read(format!("/proc/{}/cmdline", pid.trim()))
                    .map(|c| shorten(&String::from_utf8_lossy(&c).replace('\0', " ")))
                    .unwrap_or_else(|_| "exited; its reaper is cleaning up".into());
                format!("pid {} ({command}), node {dir}", pid.trim())
            }
            _ => "a process cleaning up a stale node".into(),
        }
    }

    /// Names this process and `dir` in the lock file.
    fn record(&mut self, dir: &Path) -> Result<()> {
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        writeln!(self.file, "{}\n{}", std::process::id(), dir.display())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape_mount_path(r"/x\134y"), r"/x\y");
        assert_eq!(unescape_mount_path(r"/plain"), "/plain");
        assert_eq!(unescape_mount_path(r"/trailing\"), r"/trailing\");
    }

    #[test]
    fn snapshot_survives_its_record() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("nanogate-snapshot-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let snapshot = HostSnapshot::take();
        std::fs::write(dir.join(RECORD), serde_json::to_vec(&snapshot.to_json())?)?;
        let loaded = HostSnapshot::from_run_dir(&dir);
        std::fs::remove_dir_all(&dir)?;
        assert_eq!(loaded, Some(snapshot));
        Ok(())
    }
}

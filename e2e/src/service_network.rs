//! Services on the real node ([`crate::Node`]): ClusterIPs route, `<svc>.<ns>.svc` names resolve
//! and pods reach the apiserver through the `kubernetes` Service — with the parts a real node
//! uses, started and torn down by the node like its kubelet:
//!
//! - **kube-proxy 1.20.2 in iptables mode**, built from the same Debian source as the apiserver
//!   (`e2e/scripts/k8s-assets.sh`), programs every Service into this machine's iptables (the
//!   nft backend here): `KUBE-SERVICES` in `nat` PREROUTING for pods, in `nat` OUTPUT for
//!   processes of this machine — the apiserver among them. NodePorts only on [`HOST_IP`]
//!   (`--nodeport-addresses`); conntrack limits and timeouts and the OOM score are left as they
//!   are (`--conntrack-*=0`, `--oom-score-adj=0`: no CAP_SYS_RESOURCE here).
//! - **Routes.** Pods get a route to [`SERVICE_CIDR`] through the bridge address (CNI
//!   `host-local` `routes`), and still no default route. The host routes [`SERVICE_CIDR`] onto the
//!   bridge ([`BRIDGE`]), so a ClusterIP that no rule rewrites goes nowhere rather than out
//!   through the default route: nothing a pod sends leaves this machine. Pod → ClusterIP → pod on
//!   the same bridge needs the bridge's traffic to pass iptables (`br_netfilter` loaded, as on any
//!   node, checked at start; the node sets `net.bridge.bridge-nf-call-iptables=1` and
//!   `net.ipv4.ip_forward=1` and restores them on teardown); a pod reaching
//!   itself through a Service is masqueraded by kube-proxy (`--cluster-cidr`, hairpin mode).
//! - **The `kubernetes` Service.** The control plane knows no node: its apiserver listens on
//!   loopback only and runs with `--endpoint-reconciler-type=none`. A node forwards
//!   `HOST_IP:<apiserver port>` to it ([`NodeHelpers`], a thread of the test process) and writes
//!   that address as the `kubernetes` Service's Endpoints (mirrored into an EndpointSlice by the
//!   controller-manager, which kube-proxy 1.20 reads); it deletes them again on teardown. In-cluster
//!   clients use `KUBERNETES_SERVICE_HOST` = 10.0.0.1, a SAN of the apiserver's serving
//!   certificate (as are `kubernetes.default.svc[.cluster.local]`).
//! - **Cluster DNS: dnsmasq** (Debian's `dnsmasq-base`, no service of its own) on
//!   [`HOST_IP`]`:53` answers `<svc>.<ns>.svc.cluster.local` with the Service's ClusterIP, from a
//!   hosts file the node rewrites on every Service change ([`NodeHelpers`]: a watch on Services;
//!   dnsmasq rereads the file through inotify). The kubelet's `--cluster-dns`/`--cluster-domain`
//!   give pods the usual `resolv.conf` (search `<ns>.svc.cluster.local svc.cluster.local
//!   cluster.local`, `ndots:5`; `--resolv-conf=` adds none of this machine's). Not served:
//!   headless Services, pod records, SRV records. Names outside `cluster.local` are refused.
//!
//! **How the apiserver reaches webhooks.** A webhook's `clientConfig.service` is resolved by the
//! apiserver 1.20 either to the Service's ClusterIP (the default) or, with
//! `--enable-aggregator-routing`, to an endpoint it picks itself. The node uses the default,
//! through kube-proxy: pods need kube-proxy anyway (sidecars reach the hub through its Service,
//! the operator the apiserver through `kubernetes`), so ClusterIP routing costs no extra apiserver
//! flag — the shared control plane stays as it is with or without a node — and the apiserver's
//! calls then take the same path as every other client's: the Service's port → targetPort
//! mapping and the ready endpoints as kube-proxy programs them.
//!
//! **Teardown** removes every `KUBE-*` chain this node's kube-proxy (or kubelet) created, and the
//! jumps into them, in the `filter`, `nat` and `mangle` tables for IPv4 and IPv6
//! ([`remove_kube_chains`]; chains that existed before the node are kept), on drop, by the reaper
//! and by the next run's stale clean-up; the routes go with the bridge, `route_localnet` (set by
//! kube-proxy) is restored with the other sysctls, and dnsmasq and kube-proxy are processes of
//! the run directory like the kubelet.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use futures::TryStreamExt as _;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::runtime::{WatchStreamExt as _, reflector, watcher};

use crate::node::{BRIDGE, HOST_IP, NODE_NAME, POD_SUBNET};

/// The apiserver's `--service-cluster-ip-range` (`crate::ControlPlane`).
pub const SERVICE_CIDR: &str = "10.0.0.0/24";
/// ClusterIP of the `kubernetes` Service (the first address of [`SERVICE_CIDR`]).
pub const KUBERNETES_SERVICE_IP: &str = "10.0.0.1";
/// The cluster domain (kubelet `--cluster-domain`).
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// Where cluster DNS listens (kubelet `--cluster-dns`): the host's bridge address.
pub const DNS_IP: &str = HOST_IP;
/// `net.bridge.bridge-nf-call-iptables`: bridged pod traffic passes iptables.
const BRIDGE_NF: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

/// Flags of kube-proxy for the node with run directory `dir` (see the module documentation).
pub(crate) fn kube_proxy_args(dir: &Path) -> Vec<String> {
    vec![
        format!("--kubeconfig={}", dir.join("kubeconfig").display()),
        format!("--hostname-override={NODE_NAME}"),
        "--proxy-mode=iptables".into(),
        // Also the node IP kube-proxy would otherwise look up on the Node object.
        format!("--bind-address={HOST_IP}"),
        format!("--cluster-cidr={POD_SUBNET}"),
        format!("--nodeport-addresses={HOST_IP}/32"),
        "--healthz-bind-address=127.0.0.1:10256".into(),
        "--metrics-bind-address=127.0.0.1:10249".into(),
        // Leave conntrack's limits and timeouts and our OOM score as they are.
        "--conntrack-max-per-core=0".into(),
        "--conntrack-tcp-timeout-established=0".into(),
        "--conntrack-tcp-timeout-close-wait=0".into(),
        "--oom-score-adj=0".into(),
        // Service changes show within a second (the default minimum is 1 s).
        "--iptables-min-sync-period=250ms".into(),
        "--v=1".into(),
    ]
}

/// Flags of dnsmasq for the node with run directory `dir`: only [`DNS_IP`]:53, only the hosts
/// files in `<dir>/dns/hosts` (reread on change), nothing forwarded anywhere.
pub(crate) fn dnsmasq_args(dir: &Path) -> Vec<String> {
    vec![
        "--keep-in-foreground".into(),
        "--conf-file=/dev/null".into(),
        format!("--pid-file={}", dir.join("dnsmasq.pid").display()),
        "--log-facility=-".into(),
        format!("--listen-address={DNS_IP}"),
        "--bind-interfaces".into(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        "--no-poll".into(),
        format!("--hostsdir={}", hosts_dir(dir).display()),
        format!("--local=/{CLUSTER_DOMAIN}/"),
        "--user=root".into(),
    ]
}

/// The directory dnsmasq reads its hosts files from.
pub(crate) fn hosts_dir(dir: &Path) -> PathBuf {
    dir.join("dns/hosts")
}

/// Fails with what to do when the bridge's traffic cannot pass iptables (no `br_netfilter`).
pub(crate) fn check_bridge_netfilter() -> Result<()> {
    ensure!(
        Path::new(BRIDGE_NF).exists(),
        "{BRIDGE_NF} is missing: a pod reaching another pod through a Service needs the \
         bridge's traffic to pass iptables (`modprobe br_netfilter`, as on any Kubernetes node)"
    );
    Ok(())
}

/// Routes [`SERVICE_CIDR`] onto the bridge (see the module documentation); removed with it.
pub(crate) fn route_services_to_bridge() -> Result<()> {
    crate::node::run("ip", &["route", "replace", SERVICE_CIDR, "dev", BRIDGE])?;
    Ok(())
}

/// The `kubernetes` Service's Endpoints: the node's forwarder to the apiserver on `port`.
pub(crate) fn kubernetes_endpoints_yaml(port: u16) -> String {
    format!(
        r#"apiVersion: v1
kind: Endpoints
metadata:
  name: kubernetes
  namespace: default
  labels: {{nanogate.io/e2e-node: "{NODE_NAME}"}}
subsets:
- addresses: [{{ip: "{HOST_IP}"}}]
  ports: [{{name: https, port: {port}, protocol: TCP}}]
"#
    )
}

/// True once kube-proxy has programmed the `kubernetes` Service with its endpoint.
pub(crate) fn kubernetes_service_programmed() -> bool {
    let Ok(rules) = crate::node::run("iptables", &["-w", "-t", "nat", "-S"]) else {
        return false;
    };
    rules.lines().any(|rule| {
        rule.starts_with("-A KUBE-SEP-")
            && rule.contains("default/kubernetes:https")
            && rule.contains("DNAT")
    })
}

/// Forwards TCP connections to `listen` (the node's [`HOST_IP`]) to the apiserver on loopback,
/// and keeps the cluster DNS hosts file in step with the Services, on
/// one thread of the test process with its own Tokio runtime (each `#[tokio::test]` has its own
/// runtime, and a shared node outlives them all). Stopped on drop; dies with the test process.
pub struct NodeHelpers {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl NodeHelpers {
    /// Binds `listen` now (so a busy address fails the node's start), then forwards it to
    /// `apiserver` and writes `<hosts_dir>/services` from a watch on Services through
    /// `kubeconfig`.
    pub(crate) fn start(
        listen: SocketAddr,
        apiserver: SocketAddr,
        kubeconfig: &Path,
        hosts_dir: &Path,
    ) -> Result<Self> {
        let listener = std::net::TcpListener::bind(listen)
            .with_context(|| format!("binding the apiserver forwarder to {listen}"))?;
        listener.set_nonblocking(true)?;
        std::fs::create_dir_all(hosts_dir)?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (kubeconfig, hosts_dir) = (kubeconfig.to_path_buf(), hosts_dir.to_path_buf());
        let thread = std::thread::Builder::new()
            .name("e2e-node-net".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        crate::progress!("[e2e] node helpers: no runtime: {error}");
                        return;
                    }
                };
                runtime.block_on(async move {
                    tokio::select! {
                        _ = stopped => {}
                        result = forward(listener, apiserver) => {
                            crate::progress!("[e2e] apiserver forwarder stopped: {result:?}");
                        }
                        result = feed_dns(&kubeconfig, &hosts_dir) => {
                            crate::progress!("[e2e] cluster DNS feeder stopped: {result:?}");
                        }
                    }
                });
            })?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for NodeHelpers {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn forward(listener: std::net::TcpListener, apiserver: SocketAddr) -> Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    loop {
        let (mut client, _) = listener.accept().await?;
        tokio::spawn(async move {
            if let Ok(mut server) = tokio::net::TcpStream::connect(apiserver).await {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            }
        });
    }
}

/// Rewrites `<hosts_dir>/services` (`<ClusterIP> <svc>.<ns>.svc.cluster.local` lines) whenever
/// the Services change; written beside and renamed in, so dnsmasq never reads half a file.
async fn feed_dns(kubeconfig: &Path, hosts_dir: &Path) -> Result<()> {
    let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    let client = kube::Client::try_from(config)?;
    let (store, writer) = reflector::store();
    let stream = reflector(
        writer,
        watcher(Api::<Service>::all(client), watcher::Config::default()),
    )
    .default_backoff();
    futures::pin_mut!(stream);
    let file = hosts_dir.join("services");
    let staging = hosts_dir
        .parent()
        .context("hosts dir has a parent")?
        .join("services.tmp");
    let mut written = None;
    while let Some(event) = stream.try_next().await? {
        // The store takes a (re)list in at its end.
        if matches!(event, watcher::Event::Init | watcher::Event::InitApply(_)) {
            continue;
        }
        let hosts = hosts_file(store.state().iter().map(|s| s.as_ref()));
        if written.as_ref() != Some(&hosts) {
            std::fs::write(&staging, &hosts)?;
            std::fs::rename(&staging, &file)?;
            written = Some(hosts);
        }
    }
    bail!("the Service watch ended")
}

/// The hosts file of `services`: one `<ClusterIP> <name>.<namespace>.svc.cluster.local` line per
/// Service with a ClusterIP, sorted.
pub(crate) fn hosts_file<'a>(services: impl Iterator<Item = &'a Service>) -> String {
    let mut lines = BTreeMap::new();
    for service in services {
        let (Some(name), Some(ns)) = (&service.metadata.name, &service.metadata.namespace) else {
            continue;
        };
        let ip = service
            .spec
            .as_ref()
            .and_then(|s| s.cluster_ip.as_deref())
            .filter(|ip| ip.parse::<Ipv4Addr>().is_ok());
        if let Some(ip) = ip {
            lines.insert(format!("{name}.{ns}.svc.{CLUSTER_DOMAIN}"), ip.to_string());
        }
    }
    lines
        .iter()
        .map(|(name, ip)| format!("{ip} {name}\n"))
        .collect()
}

/// Asks the cluster DNS ([`DNS_IP`]:53) for the A record of `name` (fully qualified, e.g.
/// `kubernetes.default.svc.cluster.local`): `Ok(None)` for NXDOMAIN or no address.
pub fn resolve(name: &str) -> Result<Option<Ipv4Addr>> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    let id: u16 = rand::random();
    let mut query = Vec::with_capacity(64);
    query.extend_from_slice(&id.to_be_bytes());
    query.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; one question
    for label in name.trim_end_matches('.').split('.') {
        ensure!(!label.is_empty() && label.len() < 64, "bad name {name:?}");
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]); // root; type A; class IN
    socket.send_to(&query, (DNS_IP, 53))?;
    let mut buf = [0u8; 1500];
    let n = socket.recv(&mut buf)?;
    parse_a_answer(&buf[..n], id)
}

/// The first A record of a DNS response to query `id`.
fn parse_a_answer(msg: &[u8], id: u16) -> Result<Option<Ipv4Addr>> {
    let byte = |i: usize| msg.get(i).copied().context("short DNS answer");
    let word =
        |i: usize| -> Result<usize> { Ok(usize::from(byte(i)?) << 8 | usize::from(byte(i + 1)?)) };
    ensure!(word(0)? == usize::from(id), "DNS answer to another query");
    match byte(3)? & 0x0f {
        0 => {}
        3 => return Ok(None), // NXDOMAIN
        rcode => bail!("DNS error rcode {rcode}"),
    }
    let (questions, answers) = (word(4)?, word(6)?);
    // Skips a (possibly compressed) name at `i`; returns the index after it.
    let skip_name = |mut i: usize| -> Result<usize> {
        loop {
            let len = byte(i)?;
            if len == 0 {
                return Ok(i + 1);
            }
            if len & 0xc0 == 0xc0 {
                return Ok(i + 2);
            }
            i += 1 + usize::from(len);
        }
    };
    let mut i = 12;
    for _ in 0..questions {
        i = skip_name(i)? + 4;
    }
    for _ in 0..answers {
        i = skip_name(i)?;
        let (kind, len) = (word(i)?, word(i + 8)?);
        i += 10;
        if kind == 1 && len == 4 {
            return Ok(Some(Ipv4Addr::new(
                byte(i)?,
                byte(i + 1)?,
                byte(i + 2)?,
                byte(i + 3)?,
            )));
        }
        i += len;
    }
    Ok(None)
}

/// iptables families: (save, restore, name in reports).
const IPTABLES: [(&str, &str, &str); 2] = [
    ("iptables-save", "iptables-restore", "iptables"),
    ("ip6tables-save", "ip6tables-restore", "ip6tables"),
];

/// Every `KUBE-*` chain on this machine, as `<family> <table> <chain>` (e.g.
/// `iptables nat KUBE-SERVICES`).
pub fn kube_chains() -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (save, _, family) in IPTABLES {
        for (table, chains) in parse_save(&iptables_save(save)) {
            for chain in chains.declared {
                if chain.starts_with("KUBE-") {
                    found.insert(format!("{family} {table} {chain}"));
                }
            }
        }
    }
    found
}

fn iptables_save(save: &str) -> String {
    Command::new(save)
        .stderr(Stdio::null())
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default()
}

#[derive(Default)]
struct Table {
    declared: Vec<String>,
    /// `-A <chain> …` lines.
    rules: Vec<String>,
}

fn parse_save(text: &str) -> BTreeMap<String, Table> {
    let mut tables: BTreeMap<String, Table> = BTreeMap::new();
    let mut current = None;
    for line in text.lines() {
        if let Some(table) = line.strip_prefix('*') {
            current = Some(table.trim().to_string());
        } else if let Some(table) = current
            .as_ref()
            .map(|t| tables.entry(t.clone()).or_default())
        {
            if let Some(decl) = line.strip_prefix(':') {
                if let Some(chain) = decl.split_whitespace().next() {
                    table.declared.push(chain.to_string());
                }
            } else if line.starts_with("-A ") {
                table.rules.push(line.to_string());
            }
        }
    }
    tables
}

/// The chain a rule (`-A <chain> … -j|-g <target> …`) jumps or goes to.
fn rule_target(rule: &str) -> Option<&str> {
    let mut words = rule.split_whitespace();
    while let Some(word) = words.next() {
        if word == "-j" || word == "-g" || word == "--jump" || word == "--goto" {
            return words.next();
        }
    }
    None
}

/// Removes every `KUBE-*` chain not in `keep` (as [`kube_chains`] names them) and every rule
/// jumping into one, with one `iptables-restore --noflush` per family and table. Returns what
/// it could not remove.
pub(crate) fn remove_kube_chains(keep: &BTreeSet<String>) -> Vec<String> {
    let mut problems = Vec::new();
    for (save, restore, family) in IPTABLES {
        for (table, chains) in parse_save(&iptables_save(save)) {
            let doomed: BTreeSet<&str> = chains
                .declared
                .iter()
                .map(String::as_str)
                .filter(|c| {
                    c.starts_with("KUBE-") && !keep.contains(&format!("{family} {table} {c}"))
                })
                .collect();
            if doomed.is_empty() {
                continue;
            }
            let mut script = format!("*{table}\n");
            // Declaring a chain flushes it: no rule of a doomed chain is left to refer to another.
            for chain in &doomed {
                script.push_str(&format!(":{chain} - [0:0]\n"));
            }
            for rule in &chains.rules {
                let chain = rule.split_whitespace().nth(1).unwrap_or_default();
                if !doomed.contains(chain) && rule_target(rule).is_some_and(|t| doomed.contains(t))
                {
                    script.push_str(&format!("-D{}\n", &rule[2..]));
                }
            }
            for chain in &doomed {
                script.push_str(&format!("-X {chain}\n"));
            }
            script.push_str("COMMIT\n");
            if let Err(error) = run_restore(restore, &script) {
                problems.push(format!(
                    "removing {family} {table} KUBE-* chains: {error:#}"
                ));
            }
        }
    }
    problems
}

fn run_restore(restore: &str, script: &str) -> Result<()> {
    let mut child = Command::new(restore)
        .args(["--noflush", "--wait"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {restore}"))?;
    child
        .stdin
        .take()
        .context("restore stdin")?
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "{restore} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_file_lists_services_with_a_cluster_ip() {
        let service = |ns: &str, name: &str, ip: &str| -> Service {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": ns},
                "spec": {"clusterIP": ip}
            }))
            .expect("service")
        };
        let services = [
            service("default", "kubernetes", "10.0.0.1"),
            service("a", "headless", "None"),
            service("a", "hub", "10.0.0.7"),
        ];
        assert_eq!(
            hosts_file(services.iter()),
            "10.0.0.7 hub.a.svc.cluster.local\n10.0.0.1 kubernetes.default.svc.cluster.local\n"
        );
    }

    #[test]
    fn dns_answers_parse() {
        // Answer to id 0x1234 for a.b: one question, one A record (name compressed).
        let msg = [
            0x12, 0x34, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0, 1, b'a', 1, b'b', 0, 0, 1, 0, 1, 0xc0,
            12, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4, 10, 0, 0, 9,
        ];
        assert_eq!(
            parse_a_answer(&msg, 0x1234).expect("parsed"),
            Some(Ipv4Addr::new(10, 0, 0, 9))
        );
        let mut nx = msg[..12].to_vec();
        nx[3] = 0x83;
        assert_eq!(parse_a_answer(&nx, 0x1234).expect("parsed"), None);
    }

    #[test]
    fn rule_targets() {
        assert_eq!(
            rule_target(
                r#"-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#
            ),
            Some("KUBE-SERVICES")
        );
        assert_eq!(
            rule_target("-A FORWARD -g KUBE-FORWARD"),
            Some("KUBE-FORWARD")
        );
        assert_eq!(rule_target("-A INPUT -p tcp"), None);
    }
}

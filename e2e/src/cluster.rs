//! One real control plane: etcd + kube-apiserver + kube-controller-manager on loopback.

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use tokio::sync::OnceCell;

use crate::process::{Process, kill_pid, pid_alive, running_with_marker};

/// Where run directories live; each is named `run-<owner pid>-<random>` (a control plane) or
/// `node-<owner pid>-<random>` (a real node, [`crate::Node`]).
pub(crate) fn runs_root() -> PathBuf {
    std::env::temp_dir().join("nanogate-e2e")
}

/// How long the apiserver may take to report ready (about 3 s on an idle 2-core machine).
const READY_TIMEOUT: Duration = Duration::from_secs(90);

static SHARED: OnceCell<ControlPlane> = OnceCell::const_new();

pub struct ControlPlane {
    dir: PathBuf,
    kubeconfig: PathBuf,
    server: String,
    ca_pem: String,
    /// Kept for tests that need to mint their own certificates or tokens.
    admin_token: String,
    /// Stopped in reverse start order on drop.
    processes: Mutex<Vec<Process>>,
}

impl ControlPlane {
    /// One control plane per test process, started on first use. Cheaper than one per test;
    /// each test isolates itself in a [`crate::TestNamespace`]. Its processes die with the test
    /// process (parent-death signal) and its directory is removed by the next run.
    pub async fn shared() -> Result<&'static ControlPlane> {
        SHARED.get_or_try_init(Self::start).await
    }

    /// The shared control plane if [`ControlPlane::shared`] already started it.
    pub fn shared_if_started() -> Option<&'static ControlPlane> {
        SHARED.get()
    }

    /// Starts a fresh control plane and waits until it is ready, including the
    /// controller-manager (the `default` ServiceAccount appears).
    pub async fn start() -> Result<ControlPlane> {
        Self::start_with(&[]).await
    }

    /// [`ControlPlane::start`] with extra kube-apiserver flags (e.g. admission plugins).
    pub async fn start_with(extra_apiserver_args: &[&str]) -> Result<ControlPlane> {
        let started = Instant::now();
        clean_stale_runs(None);
        let assets = crate::k8s_assets()?;
        let dir = runs_root().join(format!(
            "run-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("owner"), std::process::id().to_string())?;

        let pki = Pki::generate()?;
        pki.write(&dir)?;
        let admin_token = format!("{:032x}", rand::random::<u128>());
        std::fs::write(
            dir.join("tokens.csv"),
            format!("{admin_token},nanogate-e2e-admin,nanogate-e2e-admin,\"system:masters\"\n"),
        )?;

        let etcd_port = free_port()?;
        let etcd_peer_port = free_port()?;
        let api_port = free_port()?;
        let server = format!("https://127.0.0.1:{api_port}");
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            kubeconfig_yaml(&server, &pki.ca_pem, &admin_token),
        )?;

        let mut cp = ControlPlane {
            dir: dir.clone(),
            kubeconfig,
            server,
            ca_pem: pki.ca_pem.clone(),
            admin_token,
            processes: Mutex::new(Vec::new()),
        };
        let d = |name: &str| dir.join(name).display().to_string();

        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer_port}");
        cp.spawn(
            "etcd",
            &assets.join("etcd"),
            vec![
                format!("--data-dir={}", d("etcd")),
                "--name=e2e".into(),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=e2e={peer_url}"),
                "--log-level=warn".into(),
            ],
        )?;
        cp.spawn(
            "kube-apiserver",
            &assets.join("kube-apiserver"),
            vec![
                format!("--etcd-servers={etcd_url}"),
                format!("--secure-port={api_port}"),
                "--insecure-port=0".into(),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--cert-dir={}", d("apiserver-certs")),
                format!("--tls-cert-file={}", d("serving.crt")),
                format!("--tls-private-key-file={}", d("serving.key")),
                format!("--client-ca-file={}", d("ca.crt")),
                format!("--token-auth-file={}", d("tokens.csv")),
                "--authorization-mode=RBAC".into(),
                "--service-account-issuer=https://kubernetes.default.svc".into(),
                format!("--service-account-key-file={}", d("sa.pub")),
                format!("--service-account-signing-key-file={}", d("sa.key")),
                "--api-audiences=https://kubernetes.default.svc".into(),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                // The ServiceAccount admission plugin stays on, as in any real cluster: it
                // sets `serviceAccountName` before webhooks run. TestNamespace waits for the
                // default ServiceAccount's token so pods can be created right away.
                "--endpoint-reconciler-type=none".into(),
                "--allow-privileged=true".into(),
                // `kubectl logs/exec` through a real node's kubelet (crate::Node): by its
                // InternalIP, as the node's name resolves nowhere. No effect without a node.
                "--kubelet-preferred-address-types=InternalIP".into(),
                "--v=1".into(),
            ]
            .into_iter()
            .chain(extra_apiserver_args.iter().map(|a| a.to_string()))
            .collect(),
        )?;
        cp.wait_apiserver_ready().await?;
        cp.spawn(
            "kube-controller-manager",
            &assets.join("kube-controller-manager"),
            vec![
                format!("--kubeconfig={}", cp.kubeconfig.display()),
                format!("--service-account-private-key-file={}", d("sa.key")),
                format!("--root-ca-file={}", d("ca.crt")),
                "--leader-elect=false".into(),
                "--port=0".into(),
                "--secure-port=0".into(),
                "--controllers=*".into(),
                "--concurrent-deployment-syncs=10".into(),
                "--v=1".into(),
            ],
        )?;
        let client = cp.client().await?;
        let accounts: Api<ServiceAccount> = Api::namespaced(client, "default");
        crate::wait_for(
            "kube-controller-manager (default ServiceAccount)",
            READY_TIMEOUT,
            || {
                let accounts = accounts.clone();
                async move { Ok(accounts.get_opt("default").await?.map(|_| ())) }
            },
        )
        .await
        .map_err(|e| cp.with_logs(e))?;
        crate::progress!(
            "[e2e] control plane ready at {} in {:.1}s (dir {})",
            cp.server,
            started.elapsed().as_secs_f64(),
            cp.dir.display()
        );
        Ok(cp)
    }

    /// Path of an admin kubeconfig for this control plane (for kubectl, Helm and operators).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:<port>`.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// PEM of the CA that signed the apiserver's serving certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Bearer token of the `system:masters` user.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// The run directory (logs of each process are `<name>.log` here).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A new client. Create one per test: a kube client is bound to the Tokio runtime it was
    /// first used on, and every `#[tokio::test]` has its own runtime.
    pub async fn client(&self) -> Result<Client> {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)?;
        let config =
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(Client::try_from(config)?)
    }

    /// `kubectl` pointed at this control plane.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        crate::run_kubectl(&self.kubeconfig, args)
    }

    fn spawn(&mut self, name: &'static str, program: &Path, args: Vec<String>) -> Result<()> {
        let process = Process::spawn(name, program, &args, &self.dir)?;
        self.processes
            .lock()
            .expect("process list lock")
            .push(process);
        Ok(())
    }

    async fn wait_apiserver_ready(&self) -> Result<()> {
        let client = self.client().await?;
        let result = crate::wait_for("kube-apiserver /readyz", READY_TIMEOUT, || {
            let client = client.clone();
            async move {
                self.fail_if_exited()?;
                let request = http::Request::get("/readyz").body(Vec::new())?;
                Ok(client
                    .request_text(request)
                    .await
                    .ok()
                    .filter(|body| body == "ok"))
            }
        })
        .await;
        result.map(|_| ()).map_err(|e| self.with_logs(e))
    }

    fn fail_if_exited(&self) -> Result<()> {
        crate::process::fail_if_any_exited(&mut self.processes.lock().expect("process list lock"))
    }

    fn with_logs(&self, error: anyhow::Error) -> anyhow::Error {
        crate::process::with_logs(
            &self.processes.lock().expect("process list lock"),
            "control plane did not become ready",
            error,
        )
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let mut processes = self.processes.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(mut process) = processes.pop() {
            process.stop();
        }
        if std::env::var_os("NANOGATE_E2E_KEEP").is_some() {
            crate::progress!(
                "[e2e] keeping {} (NANOGATE_E2E_KEEP is set)",
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Removes run directories whose owning test process is gone, killing anything still running
/// from them (a run killed with SIGKILL before its parent-death signal could act, or started by
/// an older harness). A real node's directory gets the node's whole teardown
/// (`crate::node`), only under the machine-wide node lock: `node_lock` if the caller holds it,
/// else taken here if free (if another live node holds it, that node cleaned up at its start).
pub(crate) fn clean_stale_runs(node_lock: Option<&crate::node::NodeLock>) {
    let Ok(entries) = std::fs::read_dir(runs_root()) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue; // the node reapers' log
        }
        let owner = std::fs::read_to_string(dir.join("owner"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        if owner.is_some_and(pid_alive) {
            continue;
        }
        if crate::node::is_node_dir(&dir) {
            crate::node::clean_stale_dir(&dir, node_lock);
            continue;
        }
        let marker = dir.display().to_string();
        let pids = std::fs::read_to_string(dir.join("pids")).unwrap_or_default();
        let mut killed = 0;
        for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // Processes are started as `setpriv … program args`; their args name the run dir.
            if running_with_marker(pid, &marker) {
                kill_pid(pid);
                killed += 1;
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        crate::progress!(
            "[e2e] removed stale run {} (killed {killed} leftover processes)",
            dir.display()
        );
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// The control plane's own CA, the apiserver serving certificate and the service-account key.
struct Pki {
    ca_pem: String,
    serving_pem: String,
    serving_key: String,
    sa_key: String,
    sa_pub: String,
}

impl Pki {
    fn generate() -> Result<Self> {
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "nanogate-e2e-ca");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key)?;

        let serving_key = KeyPair::generate()?;
        let mut serving = CertificateParams::new(vec![
            "localhost".to_string(),
            "kubernetes".to_string(),
            "kubernetes.default".to_string(),
            "kubernetes.default.svc".to_string(),
            // What in-cluster clients on a real node (crate::Node) may dial.
            "kubernetes.default.svc.cluster.local".to_string(),
        ])?;
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        serving
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))));
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_cert = serving.signed_by(&serving_key, &ca_cert, &ca_key)?;

        let sa = KeyPair::generate()?;
        Ok(Self {
            ca_pem: ca_cert.pem(),
            serving_pem: serving_cert.pem(),
            serving_key: serving_key.serialize_pem(),
            sa_key: sa.serialize_pem(),
            sa_pub: sa.public_key_pem(),
        })
    }

    fn write(&self, dir: &Path) -> Result<()> {
        for (name, contents) in [
            ("ca.crt", &self.ca_pem),
            ("serving.crt", &self.serving_pem),
            ("serving.key", &self.serving_key),
            ("sa.key", &self.sa_key),
            ("sa.pub", &self.sa_pub),
        ] {
            std::fs::write(dir.join(name), contents)?;
        }
        Ok(())
    }
}

fn kubeconfig_yaml(server: &str, ca_pem: &str, token: &str) -> String {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: nanogate-e2e\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: admin\n  user:\n    token: {token}\ncontexts:\n- name: nanogate-e2e\n  context:\n    cluster: nanogate-e2e\n    user: admin\n    namespace: default\ncurrent-context: nanogate-e2e\n"
    )
}

//! A stand-in for the kubelet, for the one container this project ships: it runs the injected
//! `nano-agent` container of a pod stored in the apiserver as a local process, resolving what a
//! kubelet would — env values, Secret and downward-API references, ConfigMap and projected
//! service-account-token volumes, `emptyDir` — into a local directory.
//!
//! Secret volumes are written as the kubelet writes them (its `AtomicWriter`): the files in a
//! timestamped directory, a `..data` symlink to it, and each key a symlink through `..data`;
//! [`LocalSidecar::resync_secrets`] re-reads the Secrets and swaps `..data` in one rename, as
//! the kubelet does on its periodic sync (`--sync-frequency`, a minute by default). Here it
//! happens when a test calls it: this is a stand-in, not the kubelet's timing.
//!
//! Paths inside the container (mount points) are mapped to directories under `workdir`, and env
//! values that point into a mount point are rewritten accordingly, so the agent runs exactly
//! the configuration the webhook injected.
//!
//! Pods really run on the real node ([`crate::Node`]: `make demo`, `tests/real_pods.rs`,
//! `tests/in_cluster.rs`). This stand-in stays only where a test needs the agent as a process
//! of its own, which a container does not give: `hub.rs` runs many agents of one gateway
//! against a host-process operator and forges and re-signs their tokens; `failover.rs` kills
//! and restarts a specific agent while the hub leader moves, reading its admin port on
//! loopback; `chart.rs` needs the workspace's debug binary scraped by a host Prometheus for
//! every dashboard series. None of them checks what only a kubelet does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Container, KeyToPath, Pod, Secret, ServiceAccount};
use kube::api::PostParams;
use kube::{Api, Client};

use crate::Process;

/// What [`run_sidecar`] started.
pub struct LocalSidecar {
    pub process: Process,
    /// The app socket on this machine (where the pod's apps would find it).
    pub socket: PathBuf,
    /// The agent's admin address (`/metrics`, `/healthz`, `/readyz`).
    pub admin_addr: String,
    /// The container as injected (for assertions).
    pub container: Container,
    /// The pod's namespace and its Secret volumes as written here.
    namespace: String,
    secret_volumes: Vec<SecretVolume>,
}

/// A Secret volume of the sidecar, as written under the work directory.
struct SecretVolume {
    secret: String,
    items: Option<Vec<KeyToPath>>,
    dir: PathBuf,
}

impl LocalSidecar {
    /// Re-reads every Secret the sidecar mounts and swaps its volume's content atomically
    /// (what the kubelet's periodic sync does after a Secret changed).
    pub async fn resync_secrets(&self, client: &Client) -> Result<()> {
        for volume in &self.secret_volumes {
            let files = secret_files(client, &self.namespace, volume).await?;
            write_atomically(&volume.dir, &files)?;
        }
        Ok(())
    }
}

/// The files of a Secret volume: (path in the volume, content).
async fn secret_files(
    client: &Client,
    namespace: &str,
    volume: &SecretVolume,
) -> Result<Vec<(String, Vec<u8>)>> {
    let secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get(&volume.secret)
        .await?;
    Ok(secret
        .data
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(key, value)| item_path(&volume.items, &key).map(|path| (path, value.0)))
        .collect())
}

/// Writes `files` into `dir` the kubelet's way: a fresh `..<n>` directory, `..data` renamed
/// over to point at it (one atomic step), each file a symlink `name -> ..data/name`, the
/// previous directory removed.
fn write_atomically(dir: &Path, files: &[(String, Vec<u8>)]) -> Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static GENERATION: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "..{}_{}",
        std::process::id(),
        GENERATION.fetch_add(1, Ordering::Relaxed)
    );
    let fresh = dir.join(&name);
    std::fs::create_dir_all(&fresh)?;
    for (path, content) in files {
        std::fs::write(fresh.join(path), content)?;
    }
    let data = dir.join("..data");
    let previous = std::fs::read_link(&data).ok();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&name, &tmp)?;
    std::fs::rename(&tmp, &data)?;
    for (path, _) in files {
        let link = dir.join(path);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(path), &link)?;
        }
    }
    if let Some(previous) = previous.filter(|p| p.as_os_str() != name.as_str()) {
        std::fs::remove_dir_all(dir.join(previous))?;
    }
    Ok(())
}

/// The injected `nano-agent` container of `pod`, if any.
pub fn sidecar_container(pod: &Pod) -> Option<&Container> {
    let spec = pod.spec.as_ref()?;
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == "nano-agent")
}

/// Runs the injected sidecar of `pod` with `binary`. Files go under `workdir`; the admin port
/// is replaced by a free one so several pods can run side by side.
pub async fn run_sidecar(
    client: &Client,
    pod: &Pod,
    binary: &Path,
    workdir: &Path,
) -> Result<LocalSidecar> {
    run_sidecar_with_env(client, pod, binary, workdir, &[]).await
}

/// [`run_sidecar`], with `extra` environment variables set on top of the container's (a test's
/// knob the gateway does not set, e.g. `NANOGATE_BACKLOG_WINDOW`).
pub async fn run_sidecar_with_env(
    client: &Client,
    pod: &Pod,
    binary: &Path,
    workdir: &Path,
    extra: &[(&str, &str)],
) -> Result<LocalSidecar> {
    let container = sidecar_container(pod)
        .context("the pod has no injected nano-agent container")?
        .clone();
    let namespace = pod.metadata.namespace.clone().context("pod namespace")?;
    let spec = pod.spec.as_ref().context("pod spec")?;
    std::fs::create_dir_all(workdir)?;

    // Volumes → local directories, filled as the kubelet would.
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    let mut config_files: Vec<PathBuf> = Vec::new();
    let mut secret_mounts: Vec<(String, PathBuf)> = Vec::new();
    let mut secret_volumes: Vec<SecretVolume> = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        let volume = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .with_context(|| format!("volume {} of mount {}", mount.name, mount.mount_path))?;
        let local = workdir.join(&volume.name);
        std::fs::create_dir_all(&local)?;
        if let Some(source) = &volume.config_map {
            let map = Api::<ConfigMap>::namespaced(client.clone(), &namespace)
                .get(&source.name)
                .await?;
            for (key, value) in map.data.unwrap_or_default() {
                if let Some(path) = item_path(&source.items, &key) {
                    std::fs::write(local.join(&path), value)?;
                    config_files.push(local.join(path));
                }
            }
        } else if let Some(source) = &volume.secret {
            let volume = SecretVolume {
                secret: source
                    .secret_name
                    .clone()
                    .context("secret volume without a name")?,
                items: source.items.clone(),
                dir: local.clone(),
            };
            write_atomically(&local, &secret_files(client, &namespace, &volume).await?)?;
            secret_volumes.push(volume);
            secret_mounts.push((mount.mount_path.clone(), local.clone()));
        } else if let Some(projected) = &volume.projected {
            for source in projected.sources.iter().flatten() {
                if let Some(token) = &source.service_account_token {
                    let jwt = token_for_pod(
                        client,
                        pod,
                        token.audience.as_deref(),
                        token.expiration_seconds,
                    )
                    .await?;
                    std::fs::write(local.join(&token.path), jwt)?;
                }
            }
        } else if volume.empty_dir.is_none() {
            bail!(
                "volume {} has a type this stand-in kubelet does not run",
                volume.name
            );
        }
        mounts.push((mount.mount_path.clone(), local));
    }
    // Longest mount path first, so nested mounts map to the right directory.
    mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
    // Paths to Secret files inside configuration files (e.g. the TCP listener's certificate
    // in the gateway's config file) point into mount points too. Only those are rewritten (the
    // socket path is overridden by env already): a file without any stays byte-identical, so
    // its content hash, the config generation the hub compares, is unchanged.
    for file in &config_files {
        let mut text = std::fs::read_to_string(file)?;
        for (path, local) in &secret_mounts {
            text = text.replace(&format!("\"{path}/"), &format!("\"{}/", local.display()));
        }
        std::fs::write(file, text)?;
    }
    let remap = |value: &str| -> String {
        for (path, local) in &mounts {
            if let Some(rest) = value.strip_prefix(path.as_str()) {
                return format!("{}{rest}", local.display());
            }
        }
        value.to_string()
    };

    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(value), _) => remap(value),
            (None, Some(from)) => {
                if let Some(key_ref) = &from.secret_key_ref {
                    let secret = Api::<Secret>::namespaced(client.clone(), &namespace)
                        .get(&key_ref.name)
                        .await?;
                    let bytes = secret
                        .data
                        .unwrap_or_default()
                        .remove(&key_ref.key)
                        .with_context(|| {
                            format!("Secret {} has no key {}", key_ref.name, key_ref.key)
                        })?;
                    String::from_utf8(bytes.0)?
                } else if let Some(field) = &from.field_ref {
                    match field.field_path.as_str() {
                        "metadata.name" => pod.metadata.name.clone().unwrap_or_default(),
                        "metadata.namespace" => namespace.clone(),
                        "metadata.uid" => pod.metadata.uid.clone().unwrap_or_default(),
                        other => bail!("fieldRef {other} is not supported by the stand-in kubelet"),
                    }
                } else {
                    bail!(
                        "env {} has a valueFrom this stand-in kubelet does not resolve",
                        var.name
                    );
                }
            }
            (None, None) => String::new(),
        };
        env.insert(var.name.clone(), value);
    }
    // The agent binds its admin port on all interfaces in a pod; here, a free loopback port.
    env.insert("NANOGATE_ADMIN_PORT".into(), admin_port.to_string());
    env.insert(
        "NANOGATE_ADMIN_LISTEN".into(),
        format!("127.0.0.1:{admin_port}"),
    );
    let socket = PathBuf::from(
        env.get("TENDRL_SOCKET_PATH")
            .cloned()
            .context("TENDRL_SOCKET_PATH in the sidecar env")?,
    );

    for (name, value) in extra {
        env.insert((*name).to_string(), (*value).to_string());
    }
    let env_pairs: Vec<(&str, String)> = env.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let args: Vec<String> = container.args.clone().unwrap_or_default();
    let process = Process::spawn_with_env("nano-agent", binary, &args, &env_pairs, workdir)?;
    Ok(LocalSidecar {
        process,
        socket,
        admin_addr: format!("127.0.0.1:{admin_port}"),
        container,
        namespace,
        secret_volumes,
    })
}

/// Where a ConfigMap/Secret key lands in its volume: every key under its own name, or only the
/// listed `items` under their `path`.
fn item_path(items: &Option<Vec<KeyToPath>>, key: &str) -> Option<String> {
    match items {
        None => Some(key.to_string()),
        Some(items) => items.iter().find(|i| i.key == key).map(|i| i.path.clone()),
    }
}

/// A TokenRequest for the pod's service account, bound to the pod (what the kubelet puts in a
/// projected `serviceAccountToken` volume).
pub async fn token_for_pod(
    client: &Client,
    pod: &Pod,
    audience: Option<&str>,
    expiration: Option<i64>,
) -> Result<String> {
    let namespace = pod.metadata.namespace.clone().context("pod namespace")?;
    let account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audience.map(|a| vec![a.to_string()]).unwrap_or_default(),
            expiration_seconds: expiration,
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let issued = Api::<ServiceAccount>::namespaced(client.clone(), &namespace)
        .create_token_request(&account, &PostParams::default(), &request)
        .await
        .with_context(|| format!("TokenRequest for {namespace}/{account}"))?;
    Ok(issued.status.context("TokenRequest without status")?.token)
}

/// Re-signs the service-account token `token` with the control plane's own signing key
/// (`sa.key` in `cp_dir`) after `edit` changed its claims — e.g. an `exp` in the past, which
/// a TokenRequest cannot produce (it refuses lifetimes under 10 minutes). Re-signing with no
/// change yields a token the apiserver accepts, which is how a test shows the signing is right.
pub fn resign_token(
    cp_dir: &Path,
    token: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> Result<String> {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    let mut parts = token.split('.');
    let (Some(header), Some(claims)) = (parts.next(), parts.next()) else {
        bail!("not a JWT");
    };
    let mut claims: serde_json::Value = serde_json::from_slice(&B64.decode(claims)?)?;
    edit(&mut claims);
    let signing_input = format!("{header}.{}", B64.encode(serde_json::to_vec(&claims)?));
    let pem = std::fs::read(cp_dir.join("sa.key"))?;
    let key = rustls_pemfile::private_key(&mut pem.as_slice())?.context("no key in sa.key")?;
    let rng = ring::rand::SystemRandom::new();
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        key.secret_der(),
        &rng,
    )
    .map_err(|e| anyhow::anyhow!("sa.key is not a P-256 PKCS#8 key: {e}"))?;
    let signature = pair
        .sign(&rng, signing_input.as_bytes())
        .map_err(|e| anyhow::anyhow!("signing failed: {e}"))?;
    Ok(format!(
        "{signing_input}.{}",
        B64.encode(signature.as_ref())
    ))
}

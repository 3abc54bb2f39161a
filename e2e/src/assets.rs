//! Where the control-plane binaries come from: `e2e/scripts/k8s-assets.sh` decides (environment,
//! cache, or a build from Debian's source package) and this module just asks it once.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{Context, Result, bail};

static ASSETS: OnceLock<PathBuf> = OnceLock::new();

/// Directory holding `etcd`, `kube-apiserver` and `kube-controller-manager`.
///
/// The first call runs the assets script (which may build for ~5 minutes on a cold machine);
/// its progress lines go to stderr so a long wait is never silent.
pub fn k8s_assets() -> Result<PathBuf> {
    if let Some(dir) = ASSETS.get() {
        return Ok(dir.clone());
    }
    let script = crate::workspace_root().join("e2e/scripts/k8s-assets.sh");
    let started = Instant::now();
    let output = std::process::Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !output.status.success() {
        bail!(
            "{} failed ({}); see its output above. Set NANOGATE_K8S_ASSETS to a directory with \
             etcd, kube-apiserver and kube-controller-manager to skip the build.",
            script.display(),
            output.status
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let dir = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    if !dir.join("kube-apiserver").exists() {
        bail!(
            "{} printed no usable directory (got {dir:?})",
            script.display()
        );
    }
    crate::progress!(
        "[e2e] control-plane binaries: {} (resolved in {:.1}s)",
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(ASSETS.get_or_init(|| dir).clone())
}

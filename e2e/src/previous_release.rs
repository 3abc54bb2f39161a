//! The previous release, for the upgrade test (`e2e/tests/upgrade.rs`): its chart and its two
//! images, built from its commit exactly as that release's `build/Dockerfile` builds them.
//!
//! Release 0.1.0 is [`COMMIT`], the last commit whose CHANGELOG had nothing under
//! "Unreleased". No registry is reachable from the test machines, so its images are built here
//! once (every crate compiled: 243 s on a quiet 2-core machine, 2026-12-05) and kept in
//! nanogate's podman store under tags naming the commit; later runs find them and build
//! nothing. Its sources are `git archive` of the commit, kept under
//! `~/.cache/nanogate/previous-release/` (a shallow clone fetches the commit from `origin`
//! first).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, ensure};

use crate::images::{BINARIES, DOCKERFILE, cache_dir, podman_build};
use crate::podman::podman;
use crate::workspace_root;

/// Release 0.1.0 (CHANGELOG "First version").
pub const COMMIT: &str = "f1a0b3df4583d81c10a190f6954ab5a63850a081";
pub const VERSION: &str = "0.1.0";
/// The repository of its images here: not `ghcr.io/nanogate/…`, where this tree's images of the
/// same version stand.
const REPOSITORY: &str = "localhost/nanogate-previous";
/// The sidecar image release 0.1.0's CRD defaulted every gateway's `spec.sidecar.image` to.
pub const DEFAULT_AGENT_IMAGE: &str = "ghcr.io/nanogate/nano-agent:0.1.0";

/// The previous release as built here.
pub struct PreviousRelease {
    /// Its source tree (`charts/nanogate` in it is its chart).
    pub dir: PathBuf,
    pub operator_image: String,
    pub agent_image: String,
}

impl PreviousRelease {
    pub fn chart(&self) -> PathBuf {
        self.dir.join("charts/nanogate")
    }
}

/// The previous release's sources and images, built on first use.
pub fn previous_release() -> Result<PreviousRelease> {
    let dir = sources()?;
    let short = &COMMIT[..7];
    let reference = |binary: &str| format!("{REPOSITORY}/{binary}:{VERSION}-{short}");
    let [operator_image, agent_image] = BINARIES.map(reference);
    let missing: Vec<&str> = BINARIES
        .into_iter()
        .zip([&operator_image, &agent_image])
        .filter(|(_, image)| !matches!(podman(&["image", "exists", image]), Ok((true, ..))))
        .map(|(binary, _)| binary)
        .collect();
    if !missing.is_empty() {
        let started = Instant::now();
        progress!(
            "[previous-release] building release {VERSION}'s images {missing:?} from commit \
             {short} (once per machine: every crate is compiled, about 4 minutes on 2 cores)"
        );
        let file = dir.join(DOCKERFILE);
        let file = file.to_str().context("Dockerfile path")?;
        let context = dir.to_str().context("source path")?;
        for binary in missing {
            podman_build(file, context, binary, &reference(binary))?;
        }
        progress!(
            "[previous-release] release {VERSION}'s images built in {:.0}s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(PreviousRelease {
        dir,
        operator_image,
        agent_image,
    })
}

/// `git <args>` in the workspace.
fn git_command(args: &[&str]) -> Command {
    let mut command = Command::new("git");
    command.arg("-C").arg(workspace_root()).args(args);
    command
}

/// `git` in the workspace, quietly: whether it succeeded.
fn git(args: &[&str]) -> bool {
    git_command(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A shallow clone lacks [`COMMIT`]: fetch it (or the whole history) from `origin`.
fn fetch_if_missing() {
    let have = || git(&["cat-file", "-e", &format!("{COMMIT}^{{commit}}")]);
    if have() {
        return;
    }
    progress!("[previous-release] commit {COMMIT} is not in this clone: fetching it from origin");
    if !git(&["fetch", "--quiet", "origin", COMMIT]) || !have() {
        git(&["fetch", "--quiet", "--unshallow", "origin"]);
    }
}

/// `git archive` of [`COMMIT`] into the cache, once (written aside, then renamed into place).
fn sources() -> Result<PathBuf> {
    let root = cache_dir().join("previous-release");
    let dir = root.join(COMMIT);
    if dir.join("Cargo.toml").is_file() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&root)?;
    fetch_if_missing();
    let partial = root.join(format!("{COMMIT}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial)?;
    let mut archive = git_command(&["archive", "--format=tar", COMMIT])
        .stdout(Stdio::piped())
        .spawn()
        .context("running git archive")?;
    let untar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(&partial)
        .stdin(archive.stdout.take().context("git archive's stdout")?)
        .status()
        .context("running tar")?;
    let archived = archive.wait()?;
    ensure!(
        archived.success() && untar.success(),
        "git archive {COMMIT} failed: the upgrade test builds release {VERSION} from its commit, \
         so the checkout needs that commit (git fetch --unshallow origin)"
    );
    std::fs::rename(&partial, &dir)
        .with_context(|| format!("moving the sources to {}", dir.display()))?;
    Ok(dir)
}

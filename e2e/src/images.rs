//! nanogate's container images, built with podman exactly as the shipping test checks them
//! (`e2e/tests/shipping.rs`), for every test and the demo that runs containers: a real node
//! runs these images, not others.
//!
//! - `build/Dockerfile`: `ghcr.io/nanogate/nano-agent` and `ghcr.io/nanogate/nanogate-operator`
//!   (static binaries on distroless/static, user 65532).
//! - `examples/Dockerfile`: `ghcr.io/nanogate/example-app`, a shell loop that publishes through
//!   the app socket with `examples/shell/nanogate.sh` every few seconds, as uid 10001 (not the
//!   sidecar's), with `sh` and the shell client for `kubectl exec`.
//!
//! [`images`] builds them once per process with `podman build --pull=never --network host` on
//! nanogate's image store (`e2e/scripts/podman.sh`); the base images are local stand-ins made by
//! `e2e/scripts/base-images.sh` (no registry is reachable from the test machines). Builds reuse
//! layers and cargo caches: with nothing changed, a few seconds per image.
//! `NANOGATE_SKIP_RELEASE_BUILD=1` takes the images already in the store, unbuilt (loudly).
//! [`save_docker_archive`] writes one image as a `docker-archive` tar, for
//! `ctr -n k8s.io images import` on a node.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail, ensure};

use crate::podman::{copy_out, entrypoint, podman, podman_command, podman_ok};
use crate::workspace_root;

/// The Dockerfile of nanogate's two images.
pub const DOCKERFILE: &str = "build/Dockerfile";
pub const OPERATOR_IMAGE: &str = "ghcr.io/nanogate/nanogate-operator";
pub const AGENT_IMAGE: &str = "ghcr.io/nanogate/nano-agent";
/// The two images of `build/Dockerfile`: Dockerfile target = binary name.
pub const BINARIES: [&str; 2] = ["nanogate-operator", "nano-agent"];

/// The example app's Dockerfile and build context.
pub const APP_DOCKERFILE: &str = "examples/Dockerfile";
pub const APP_CONTEXT: &str = "examples";
/// Its final stage.
pub const APP_TARGET: &str = "example-app";
pub const APP_IMAGE: &str = "ghcr.io/nanogate/example-app";
/// The example app's user and group: not root, not the sidecar's 65532.
pub const APP_UID: u32 = 10001;

/// Makes the stand-ins of the Dockerfiles' base images (setup.sh runs it).
pub const BASE_IMAGES_SCRIPT: &str = "e2e/scripts/base-images.sh";
/// The label the stand-in base images carry (what they stand in for).
pub const STAND_IN_LABEL: &str = "io.nanogate.stand-in";
/// Tags the build stage, so that pruning the previous builds' layers keeps its cache.
pub const BUILD_CACHE_TAG: &str = "localhost/nanogate/build-cache:latest";
/// Tags the example app's package stage (apt-get), for the same reason.
pub const APP_TOOLS_CACHE_TAG: &str = "localhost/nanogate/example-app-tools:latest";

/// A file of the workspace, as text.
pub fn read(rel: &str) -> Result<String> {
    std::fs::read_to_string(workspace_root().join(rel)).with_context(|| format!("reading {rel}"))
}

/// `[workspace.package] version` of the root Cargo.toml.
pub fn workspace_version() -> Result<String> {
    let manifest = read("Cargo.toml")?;
    let mut in_package = false;
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_package = line == "[workspace.package]";
        } else if in_package && let Some(v) = line.strip_prefix("version") {
            let v = v.trim_start().strip_prefix('=').context("version = …")?;
            return Ok(v.trim().trim_matches('"').to_string());
        }
    }
    bail!("no version in [workspace.package] of Cargo.toml")
}

/// `$NANOGATE_CACHE`, else `~/.cache/nanogate`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("NANOGATE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/nanogate")
        })
}

// ---------------------------------------------------------------------------------------------
// Dockerfile

/// One stage of a Dockerfile: `FROM <image> AS <name>` and its instructions.
#[derive(Debug, Default)]
pub struct Stage {
    pub from: String,
    pub name: String,
    /// (INSTRUCTION in upper case, arguments), continuation lines joined.
    pub instructions: Vec<(String, String)>,
}

impl Stage {
    pub fn all(&self, instruction: &str) -> Vec<&str> {
        self.instructions
            .iter()
            .filter(|(i, _)| i == instruction)
            .map(|(_, a)| a.as_str())
            .collect()
    }

    pub fn one(&self, instruction: &str) -> Result<&str> {
        let found = self.all(instruction);
        ensure!(
            found.len() == 1,
            "stage {:?} has {} {instruction} instructions, expected one",
            self.name,
            found.len()
        );
        Ok(found[0])
    }
}

pub struct Dockerfile {
    /// Where it was read from (relative to the workspace root), for messages.
    pub path: String,
    /// ARGs declared before the first FROM, with their defaults.
    pub global_args: Vec<(String, String)>,
    pub stages: Vec<Stage>,
}

impl Dockerfile {
    /// Reads and parses the Dockerfile at `rel` (relative to the workspace root).
    pub fn load(rel: &str) -> Result<Self> {
        let mut parsed = Self::parse(&read(rel)?).with_context(|| format!("parsing {rel}"))?;
        parsed.path = rel.to_string();
        Ok(parsed)
    }

    pub fn parse(text: &str) -> Result<Self> {
        // Logical lines: comments dropped (also inside continuations), `\` continuations joined.
        let mut logical = Vec::new();
        let mut current = String::new();
        for line in text.lines() {
            let trimmed = line.trim();
            if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
                continue;
            }
            if let Some(part) = trimmed.strip_suffix('\\') {
                current.push_str(part.trim());
                current.push(' ');
            } else {
                current.push_str(trimmed);
                logical.push(std::mem::take(&mut current));
            }
        }
        ensure!(current.is_empty(), "Dockerfile ends in a continuation");

        let mut global_args = Vec::new();
        let mut stages: Vec<Stage> = Vec::new();
        for line in logical {
            let (instruction, args) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
            let instruction = instruction.to_ascii_uppercase();
            let args = args.trim().to_string();
            if instruction == "FROM" {
                let words: Vec<&str> = args.split_whitespace().collect();
                let (from, name) = match words.as_slice() {
                    [image] => (image.to_string(), String::new()),
                    [image, as_, name] if as_.eq_ignore_ascii_case("as") => {
                        (image.to_string(), name.to_string())
                    }
                    _ => bail!("unexpected FROM {args}"),
                };
                stages.push(Stage {
                    from,
                    name,
                    instructions: Vec::new(),
                });
            } else if let Some(stage) = stages.last_mut() {
                stage.instructions.push((instruction, args));
            } else if instruction == "ARG" {
                let (k, v) = args.split_once('=').unwrap_or((&args, ""));
                global_args.push((k.to_string(), v.to_string()));
            }
        }
        Ok(Self {
            path: "Dockerfile".into(),
            global_args,
            stages,
        })
    }

    pub fn stage(&self, name: &str) -> Result<&Stage> {
        self.stages
            .iter()
            .find(|s| s.name == name)
            .with_context(|| format!("no stage named {name:?} in {}", self.path))
    }

    /// A stage's base image with the global ARG defaults substituted.
    pub fn base_image(&self, stage: &Stage) -> String {
        let mut image = stage.from.clone();
        for (k, v) in &self.global_args {
            image = image
                .replace(&format!("${{{k}}}"), v)
                .replace(&format!("${k}"), v);
        }
        image
    }

    /// The stage whose RUN builds with cargo, and that RUN split into its flags and commands.
    pub fn cargo_build_run(&self) -> Result<(&Stage, RunParts<'_>)> {
        let mut found = Vec::new();
        for stage in &self.stages {
            for run in stage.all("RUN") {
                let parts = RunParts::parse(run);
                if parts.commands.iter().any(|c| c.starts_with("cargo build")) {
                    found.push((stage, parts));
                }
            }
        }
        ensure!(
            found.len() == 1,
            "{} must build with exactly one `RUN … cargo build …` (found {})",
            self.path,
            found.len()
        );
        Ok(found.remove(0))
    }

    /// `ENV` variables of the stage that runs `cargo build` (`ENV K=V …` form).
    pub fn cargo_build_env(&self) -> Result<Vec<(String, String)>> {
        let (stage, _) = self.cargo_build_run()?;
        let mut vars = Vec::new();
        for env in stage.all("ENV") {
            for pair in env.split_whitespace() {
                let (k, v) = pair
                    .split_once('=')
                    .with_context(|| format!("ENV {env}: use the K=V form"))?;
                vars.push((k.to_string(), v.to_string()));
            }
        }
        Ok(vars)
    }

    /// The arguments of the `cargo build …` command (after `cargo`).
    pub fn cargo_build(&self) -> Result<Vec<String>> {
        let (_, run) = self.cargo_build_run()?;
        let command = run
            .commands
            .iter()
            .find(|c| c.starts_with("cargo build"))
            .context("cargo build")?;
        let words: Vec<String> = command.split_whitespace().map(str::to_string).collect();
        ensure!(
            !words
                .iter()
                .any(|w| w.contains(['&', '|', ';', '$', '"', '\''])),
            "the cargo build command must be one plain command (the test checks its flags): \
             {command}"
        );
        Ok(words[1..].to_vec())
    }
}

/// A shell-form RUN instruction: its leading flags (`--mount=…`) and its `&&`-joined commands.
pub struct RunParts<'a> {
    pub flags: Vec<&'a str>,
    pub commands: Vec<&'a str>,
}

impl<'a> RunParts<'a> {
    pub fn parse(run: &'a str) -> Self {
        let mut rest = run.trim_start();
        let mut flags = Vec::new();
        while rest.starts_with("--") {
            let (flag, tail) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            flags.push(flag);
            rest = tail.trim_start();
        }
        let commands = rest.split("&&").map(str::trim).collect();
        Self { flags, commands }
    }
}

/// `build/Dockerfile`, parsed.
pub fn dockerfile() -> Result<Dockerfile> {
    Dockerfile::load(DOCKERFILE)
}

/// `examples/Dockerfile`, parsed.
pub fn app_dockerfile() -> Result<Dockerfile> {
    Dockerfile::load(APP_DOCKERFILE)
}
// ---------------------------------------------------------------------------------------------
// Building

/// Where the binaries taken out of the images are kept: the sidecar benchmark measures the
/// shipped nano-agent (`NANO_AGENT_BIN=…/image-bin/nano-agent`).
pub fn image_bin_dir() -> PathBuf {
    cache_dir().join("image-bin")
}

/// The built images.
pub struct Images {
    /// `build/Dockerfile`'s two final stages: (target = binary name, image reference).
    pub images: Vec<(&'static str, String)>,
    /// The example app of `examples/Dockerfile`.
    pub app: String,
    pub version: String,
}

impl Images {
    /// The reference of `build/Dockerfile`'s image for binary `name`.
    pub fn reference(&self, name: &str) -> &str {
        self.images
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, r)| r.as_str())
            .expect("one image per binary")
    }

    /// Every image: nano-agent, nanogate-operator and the example app.
    pub fn all(&self) -> Vec<&str> {
        self.images
            .iter()
            .map(|(_, r)| r.as_str())
            .chain([self.app.as_str()])
            .collect()
    }

    /// Writes every image as a `docker-archive` tar into `dir` (one file per image, named after
    /// its reference); returns the files.
    pub fn save_docker_archives(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut files = Vec::new();
        for reference in self.all() {
            let name: String = reference
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '.' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            let file = dir.join(format!("{name}.tar"));
            save_docker_archive(reference, &file)?;
            files.push(file);
        }
        Ok(files)
    }
}

/// The images, built once per process (other callers wait for the first).
pub fn images() -> Result<&'static Images> {
    static IMAGES: OnceLock<Result<Images, String>> = OnceLock::new();
    IMAGES
        .get_or_init(|| build_images().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| {
            anyhow!("the images of {DOCKERFILE} and {APP_DOCKERFILE} are not available: {e}")
        })
}

/// Writes `reference` as a `docker-archive` tar at `path` (`podman save --format
/// docker-archive`): what `ctr -n k8s.io images import` and `docker load` read; the archive
/// names the image by `reference`, so a pod's `image:` finds it with `imagePullPolicy: Never`
/// or `IfNotPresent`. Creates `path`'s directory; writes a temporary file next to `path`, then
/// renames it.
pub fn save_docker_archive(reference: &str, path: &Path) -> Result<()> {
    let path = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()?.join(path)
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let mut partial = path.clone().into_os_string();
    partial.push(format!(".partial-{}", std::process::id()));
    let partial = PathBuf::from(partial);
    let _ = std::fs::remove_file(&partial);
    let started = Instant::now();
    let saved = podman_ok(&[
        "save",
        "--format",
        "docker-archive",
        "--output",
        &partial.display().to_string(),
        reference,
    ]);
    if let Err(e) = saved {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, &path)
        .with_context(|| format!("renaming {} to {}", partial.display(), path.display()))?;
    progress!(
        "[images] saved {reference} as {} ({} bytes, {:.1}s)",
        path.display(),
        std::fs::metadata(&path)?.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The base images of the Dockerfile's stages (ARG defaults applied, stages and scratch left
/// out).
pub fn base_images(docker: &Dockerfile) -> Vec<String> {
    let mut bases: Vec<String> = Vec::new();
    for stage in &docker.stages {
        let base = docker.base_image(stage);
        if base != "scratch"
            && !docker.stages.iter().any(|s| s.name == base)
            && !bases.contains(&base)
        {
            bases.push(base);
        }
    }
    bases
}

/// Fails, naming what to run, when podman or a base image of `dockerfiles` is missing.
pub fn check_podman_setup(dockerfiles: &[&Dockerfile]) -> Result<()> {
    let runtime = podman(&["info", "--format", "{{.Host.OCIRuntime.Path}}"]);
    ensure!(
        matches!(&runtime, Ok((true, ..))),
        "podman does not work here ({}): run `bash e2e/scripts/setup.sh` (installs podman, runc \
         and debootstrap; make test runs it)",
        match &runtime {
            Ok((_, out, err)) => format!("{out}{err}").trim().to_string(),
            Err(e) => format!("{e:#}"),
        }
    );
    let mut seen = Vec::new();
    for base in dockerfiles.iter().flat_map(|d| base_images(d)) {
        if seen.contains(&base) {
            continue;
        }
        let (exists, ..) = podman(&["image", "exists", &base])?;
        ensure!(
            exists,
            "the base image {base} is not in nanogate's image store: run `bash \
             {BASE_IMAGES_SCRIPT}` (setup.sh does). No registry is reachable from the test \
             machines; the script assembles a stand-in from Debian packages."
        );
        let label = podman_ok(&[
            "image",
            "inspect",
            "--format",
            &format!("{{{{index .Labels \"{STAND_IN_LABEL}\"}}}}"),
            &base,
        ])?;
        let label = label.trim();
        progress!(
            "[images] base image {base}: {}",
            if label.is_empty() || label == "<no value>" {
                "as pulled from its registry".to_string()
            } else {
                format!("local stand-in ({label})")
            }
        );
        seen.push(base);
    }
    Ok(())
}

/// This process's stderr as a child's stdout: podman build's output shows as progress.
fn stderr_for_child() -> Result<Stdio> {
    use std::os::fd::AsFd as _;
    Ok(Stdio::from(std::io::stderr().as_fd().try_clone_to_owned()?))
}

/// `podman build --pull=never --network host` of `target` in `file` with `context`, tagged
/// `reference`. RUN steps see this machine's CA bundle: where egress goes through a
/// TLS-inspecting proxy, rustup and cargo trust only the machine's store, which Debian's bundle
/// in the base image lacks. A RUN mount is not part of any layer.
pub(crate) fn podman_build(file: &str, context: &str, target: &str, reference: &str) -> Result<()> {
    let ca = std::env::var("SSL_CERT_FILE")
        .unwrap_or_else(|_| "/etc/ssl/certs/ca-certificates.crt".to_string());
    let ca_mount = format!("{ca}:/etc/ssl/certs/ca-certificates.crt:ro");
    let started = Instant::now();
    progress!("[images] podman build --file {file} --target {target} -t {reference} {context}");
    let mut args = vec!["build", "--pull=never", "--network", "host"];
    if Path::new(&ca).is_file() {
        args.extend(["--volume", &ca_mount]);
    }
    args.extend([
        "--file", file, "--target", target, "--tag", reference, context,
    ]);
    let status = podman_command(&args)
        .stdout(stderr_for_child()?)
        .status()
        .context("running podman build")?;
    ensure!(
        status.success(),
        "podman build --target {target} of {file} failed (output above)"
    );
    progress!(
        "[images] built {reference} in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn build_images() -> Result<Images> {
    let docker = dockerfile()?;
    let app_docker = app_dockerfile()?;
    check_podman_setup(&[&docker, &app_docker])?;
    let version = workspace_version()?;
    let images: Vec<(&'static str, String)> = BINARIES
        .iter()
        .map(|&name| {
            let repository = if name == "nano-agent" {
                AGENT_IMAGE
            } else {
                OPERATOR_IMAGE
            };
            (name, format!("{repository}:{version}"))
        })
        .collect();
    let app = format!("{APP_IMAGE}:{version}");
    if std::env::var_os("NANOGATE_SKIP_RELEASE_BUILD").is_some() {
        progress!(
            "\n*** NOT REBUILT: NANOGATE_SKIP_RELEASE_BUILD is set, so the images already in \
             nanogate's store are used as they are (they may be older than the sources). ***\n"
        );
        for reference in images.iter().map(|(_, r)| r).chain([&app]) {
            ensure!(
                podman(&["image", "exists", reference])?.0,
                "{reference} is not in nanogate's image store: unset NANOGATE_SKIP_RELEASE_BUILD"
            );
        }
        return Ok(Images {
            images,
            app,
            version,
        });
    }

    let (build_stage, _) = docker.cargo_build_run()?;
    let mut targets = vec![(build_stage.name.as_str(), BUILD_CACHE_TAG.to_string())];
    targets.extend(images.iter().map(|(n, r)| (*n, r.clone())));
    // Every `podman build` sends the context anew: sources edited meanwhile (a shared working
    // tree) would put two builds' binaries into the two images. Each image must hold what the
    // build stage built, or everything is built again.
    for attempt in 1..=3 {
        for (target, reference) in &targets {
            progress!(
                "[images] {target}: a first build compiles every crate (5 to 8 minutes on 2 \
                 cores); later ones reuse the layers and the cargo caches, and compile only what \
                 changed"
            );
            podman_build(DOCKERFILE, ".", target, reference)?;
        }
        let mut differing = Vec::new();
        for (name, reference) in &images {
            let copy = docker.stage(name)?.one("COPY")?;
            let built = copy
                .split_whitespace()
                .nth(1)
                .with_context(|| format!("COPY {copy}"))?;
            let from_build = copy_out(BUILD_CACHE_TAG, built)?;
            let shipped = copy_out(reference, &entrypoint(reference)?)?;
            if from_build != shipped {
                differing.push(*name);
            }
        }
        if differing.is_empty() {
            break;
        }
        ensure!(
            attempt < 3,
            "the images' binaries {differing:?} still differ from the build stage's after 3 \
             builds (are the sources being edited?)"
        );
        progress!(
            "[images] {differing:?} differ from the build stage's binaries: the sources \
             changed during the builds; building again"
        );
    }

    // The example app: its package stage (tagged, so that pruning keeps its apt-get layer),
    // then the image.
    let tools = app_docker
        .stages
        .first()
        .context("examples/Dockerfile has no stage")?;
    ensure!(
        tools.name != APP_TARGET,
        "{APP_DOCKERFILE}: expected a package stage before {APP_TARGET}"
    );
    podman_build(
        APP_DOCKERFILE,
        APP_CONTEXT,
        &tools.name,
        APP_TOOLS_CACHE_TAG,
    )?;
    podman_build(APP_DOCKERFILE, APP_CONTEXT, APP_TARGET, &app)?;

    // Each build after a change of the sources leaves the previous images' layers untagged;
    // without this the store would grow with every CI run. The current build's layers are
    // parents of tagged images (the build stages' too, through the cache tags) and stay.
    let pruned = podman_ok(&["image", "prune", "--force"])?;
    progress!(
        "[images] podman image prune: {} untagged images of earlier builds removed",
        pruned.lines().filter(|l| !l.trim().is_empty()).count()
    );
    Ok(Images {
        images,
        app,
        version,
    })
}

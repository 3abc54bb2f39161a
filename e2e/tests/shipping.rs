//! What ships (issue 9): the container images built from `build/Dockerfile`, one version
//! everywhere, and `deploy/nanogate.yaml`.
//!
//! - `build/Dockerfile` is really built and run, with podman on nanogate's own image store
//!   (`e2e/scripts/podman.sh`, under `~/.cache/nanogate/containers`). The test machines reach
//!   no container registry, so the two base images are local stand-ins assembled from Debian
//!   packages and tagged with the Dockerfile's references (`e2e/scripts/base-images.sh`, run by
//!   setup.sh; a missing one fails the test with the command to run). Both targets are built
//!   with `podman build --pull=never --network host`; the BuildKit cache mounts keep crates and
//!   the target directory between runs, so a rebuild compiles only what changed.
//!   - The binaries are taken out of the images (to `~/.cache/nanogate/image-bin/`, where the
//!     sidecar benchmark finds the shipped nano-agent): static (`file`, `ldd`), `--version` =
//!     the workspace version, built by the Dockerfile's one `cargo build` with CI's default
//!     features and only release-profile settings; each image adds just its binary to the base.
//!     Binary and image sizes (podman's, and `podman save | gzip -9`) are printed.
//!   - The images run: `--version`, config user 65532:65532, exec-form entrypoint, no shell
//!     (`--entrypoint /bin/sh` and `sh` fail, and the only executable in the file system is the
//!     binary). nano-agent runs as the injector runs it (read-only root, `--cap-drop ALL`,
//!     no-new-privileges, a bind-mounted /var/lib/tendrl): it serves its Unix socket on the bind
//!     mount as uid 65532, takes a publish from the host and delivers it to a local platform,
//!     and exits 0 on SIGTERM.
//!   - The Dockerfile is also parsed (final stages distroless/static or scratch, 65532, exec
//!     form) and linted by hadolint.
//!
//!   `NANOGATE_SKIP_RELEASE_BUILD=1` reuses the images already in the store instead of
//!   building (loudly), for quick local runs.
//! - One version: every crate, the chart's `version`/`appVersion`, the image references (the
//!   operator's in values.yaml, the sidecar's default in the operator and the CRD), the
//!   Dockerfile's tags, the CHANGELOG and `--version` of both binaries.
//! - `deploy/nanogate.yaml` is the chart rendered with default values by the real Helm engine
//!   (regenerate: `NANOGATE_UPDATE_DEPLOY=1 cargo test -p nanogate-e2e --test shipping`), and
//!   `kubectl apply --dry-run=server -f deploy/nanogate.yaml` is accepted by the real apiserver,
//!   as are the sample manifests of `examples/k8s/`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use nanogate_e2e::podman::{
    Container, compressed_size, copy_out, entrypoint, image_config, image_files, image_size,
    podman, podman_command, podman_ok,
};
use nanogate_e2e::{ControlPlane, TestNamespace, progress, run_kubectl, workspace_root};
use serde_json::Value;

const DOCKERFILE: &str = "build/Dockerfile";
const DEPLOY: &str = "deploy/nanogate.yaml";
const CHART: &str = "charts/nanogate";
/// Release name and namespace of `deploy/nanogate.yaml` (what the README's `helm install` uses).
const RELEASE: &str = "nanogate";
const NAMESPACE: &str = "nanogate-system";
const OPERATOR_IMAGE: &str = "ghcr.io/nanogate/nanogate-operator";
const AGENT_IMAGE: &str = "ghcr.io/nanogate/nano-agent";
/// The two images: Dockerfile target = binary name.
const BINARIES: [&str; 2] = ["nanogate-operator", "nano-agent"];

fn read(rel: &str) -> Result<String> {
    std::fs::read_to_string(workspace_root().join(rel)).with_context(|| format!("reading {rel}"))
}

/// `[workspace.package] version` of the root Cargo.toml.
fn workspace_version() -> Result<String> {
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

/// `members = [...]` of the root Cargo.toml.
fn workspace_members() -> Result<Vec<String>> {
    let manifest = read("Cargo.toml")?;
    let line = manifest
        .lines()
        .find(|l| l.trim_start().starts_with("members"))
        .context("members = [...] on one line")?;
    let list = line.split_once('=').context("members =")?.1;
    Ok(list
        .trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .map(|m| m.trim().trim_matches('"').to_string())
        .filter(|m| !m.is_empty())
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Dockerfile

/// One stage of a Dockerfile: `FROM <image> AS <name>` and its instructions.
#[derive(Debug, Default)]
struct Stage {
    from: String,
    name: String,
    /// (INSTRUCTION in upper case, arguments), continuation lines joined.
    instructions: Vec<(String, String)>,
}

impl Stage {
    fn all(&self, instruction: &str) -> Vec<&str> {
        self.instructions
            .iter()
            .filter(|(i, _)| i == instruction)
            .map(|(_, a)| a.as_str())
            .collect()
    }

    fn one(&self, instruction: &str) -> Result<&str> {
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

struct Dockerfile {
    /// ARGs declared before the first FROM, with their defaults.
    global_args: Vec<(String, String)>,
    stages: Vec<Stage>,
}

impl Dockerfile {
    fn parse(text: &str) -> Result<Self> {
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
            global_args,
            stages,
        })
    }

    fn stage(&self, name: &str) -> Result<&Stage> {
        self.stages
            .iter()
            .find(|s| s.name == name)
            .with_context(|| format!("no stage named {name:?} in {DOCKERFILE}"))
    }

    /// A stage's base image with the global ARG defaults substituted.
    fn base_image(&self, stage: &Stage) -> String {
        let mut image = stage.from.clone();
        for (k, v) in &self.global_args {
            image = image
                .replace(&format!("${{{k}}}"), v)
                .replace(&format!("${k}"), v);
        }
        image
    }

    /// The stage whose RUN builds with cargo, and that RUN split into its flags and commands.
    fn cargo_build_run(&self) -> Result<(&Stage, RunParts<'_>)> {
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
            "{DOCKERFILE} must build with exactly one `RUN … cargo build …` (found {})",
            found.len()
        );
        Ok(found.remove(0))
    }

    /// `ENV` variables of the stage that runs `cargo build` (`ENV K=V …` form).
    fn cargo_build_env(&self) -> Result<Vec<(String, String)>> {
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
    fn cargo_build(&self) -> Result<Vec<String>> {
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
struct RunParts<'a> {
    flags: Vec<&'a str>,
    commands: Vec<&'a str>,
}

impl<'a> RunParts<'a> {
    fn parse(run: &'a str) -> Self {
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

fn dockerfile() -> Result<Dockerfile> {
    Dockerfile::parse(&read(DOCKERFILE)?)
}

/// The value following `flag` in `args` (`--flag value` or `--flag=value`).
fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(i, a)| {
        if a == flag {
            args.get(i + 1).map(String::as_str)
        } else {
            a.strip_prefix(&format!("{flag}="))
        }
    })
}

fn all_flag_values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
    args.iter()
        .enumerate()
        .filter(|(_, a)| *a == flag)
        .filter_map(|(i, _)| args.get(i + 1).map(String::as_str))
        .collect()
}

fn cache_dir() -> PathBuf {
    std::env::var_os("NANOGATE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/nanogate")
        })
}

fn output(program: &str, args: &[&str]) -> Result<(bool, String)> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (Debian package: {program})"))?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

/// `<bin> --version` must print `<bin> <workspace version>`.
fn assert_version(bin: &Path, name: &str, version: &str) -> Result<()> {
    let (ok, out) = output(&bin.display().to_string(), &["--version"])?;
    ensure!(ok, "{} --version failed: {out}", bin.display());
    ensure!(
        out.trim() == format!("{name} {version}"),
        "{} --version printed {:?}, expected \"{name} {version}\"",
        bin.display(),
        out.trim()
    );
    Ok(())
}

/// hadolint (from the virtualenv of `e2e/scripts/setup.sh`) parses the Dockerfile with its own
/// grammar and lints it: a syntax error or a finding fails the test.
#[test]
fn dockerfile_passes_hadolint() -> Result<()> {
    let hadolint = nanogate_e2e::venv_python().with_file_name("hadolint");
    ensure!(
        hadolint.exists(),
        "{} is missing: run `bash e2e/scripts/setup.sh` (make test does)",
        hadolint.display()
    );
    let out = Command::new(&hadolint)
        .arg("--no-color")
        .arg(workspace_root().join(DOCKERFILE))
        .output()?;
    ensure!(
        out.status.success(),
        "hadolint {DOCKERFILE}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn final_stages_are_distroless_static_nonroot_exec_form() -> Result<()> {
    let docker = dockerfile()?;
    for name in BINARIES {
        let stage = docker.stage(name)?;
        let base = docker.base_image(stage);
        let repository = base.split([':', '@']).next().unwrap_or_default();
        // distroless/static has no shell and no package manager; its :debug tags add busybox.
        ensure!(
            base == "scratch"
                || (repository.starts_with("gcr.io/distroless/static") && !base.contains("debug")),
            "{name}: final stage FROM {base} must be distroless/static (not :debug) or scratch"
        );
        let user = stage.one("USER")?;
        ensure!(
            user == "65532" || user == "65532:65532",
            "{name}: USER {user}, expected 65532 (distroless nonroot)"
        );
        ensure!(
            stage.all("RUN").is_empty() && stage.all("SHELL").is_empty(),
            "{name}: the final stage can have no RUN or SHELL (there is no shell)"
        );
        let entrypoint: Value = serde_json::from_str(stage.one("ENTRYPOINT")?)
            .with_context(|| format!("{name}: ENTRYPOINT must be exec form (a JSON array)"))?;
        let program = entrypoint[0].as_str().context("ENTRYPOINT[0]")?;
        let copy = stage.one("COPY")?;
        ensure!(
            copy.starts_with("--from=") && copy.ends_with(&format!("/{name} {program}")),
            "{name}: COPY {copy} must put the built {name} where ENTRYPOINT {program} runs it"
        );
        ensure!(
            program.ends_with(&format!("/{name}")),
            "{name}: ENTRYPOINT runs {program}"
        );
        // The injected sidecar's legacy postStart hook runs `nano-agent wait-ready` by PATH.
        ensure!(
            name != "nano-agent" || program == "/usr/local/bin/nano-agent",
            "nano-agent must be on distroless' PATH (/usr/local/bin) for the postStart hook"
        );
    }
    // The injector and the chart run these images as the same user.
    ensure!(nanogate_operator::webhook::inject::SIDECAR_UID == 65532);
    ensure!(read("charts/nanogate/templates/deployment.yaml")?.contains("runAsUser: 65532"));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Images: build/Dockerfile built and run with podman

/// Makes the stand-ins of the Dockerfile's base images (setup.sh runs it).
const BASE_IMAGES_SCRIPT: &str = "e2e/scripts/base-images.sh";
/// The label the stand-in base images carry (what they stand in for).
const STAND_IN_LABEL: &str = "io.nanogate.stand-in";
/// Tags the build stage, so that pruning the previous builds' layers keeps its cache.
const BUILD_CACHE_TAG: &str = "localhost/nanogate/build-cache:latest";

/// Where the binaries taken out of the images are kept: the sidecar benchmark measures the
/// shipped nano-agent (`NANO_AGENT_BIN=…/image-bin/nano-agent`).
fn image_bin_dir() -> PathBuf {
    cache_dir().join("image-bin")
}

/// The built images of the Dockerfile's two final stages.
struct Images {
    /// (Dockerfile target = binary name, image reference).
    images: Vec<(&'static str, String)>,
    version: String,
}

impl Images {
    fn reference(&self, name: &str) -> &str {
        self.images
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, r)| r.as_str())
            .expect("one image per binary")
    }
}

/// The images, built once per test process (the other tests wait for the first).
fn images() -> Result<&'static Images> {
    static IMAGES: OnceLock<Result<Images, String>> = OnceLock::new();
    IMAGES
        .get_or_init(|| build_images().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("the images of {DOCKERFILE} are not available: {e}"))
}

/// The base images of the Dockerfile's stages (ARG defaults applied, stages and scratch left
/// out).
fn base_images(docker: &Dockerfile) -> Vec<String> {
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

/// Fails, naming what to run, when podman or a base image is missing.
fn check_podman_setup(docker: &Dockerfile) -> Result<()> {
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
    for base in base_images(docker) {
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
            "[shipping] base image {base}: {}",
            if label.is_empty() || label == "<no value>" {
                "as pulled from its registry".to_string()
            } else {
                format!("local stand-in ({label})")
            }
        );
    }
    Ok(())
}

/// This process's stderr as a child's stdout: podman build's output shows as progress.
fn stderr_for_child() -> Result<Stdio> {
    use std::os::fd::AsFd as _;
    Ok(Stdio::from(std::io::stderr().as_fd().try_clone_to_owned()?))
}

fn build_images() -> Result<Images> {
    let docker = dockerfile()?;
    check_podman_setup(&docker)?;
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
    if std::env::var_os("NANOGATE_SKIP_RELEASE_BUILD").is_some() {
        progress!(
            "\n*** NOT REBUILT: NANOGATE_SKIP_RELEASE_BUILD is set, so the images already in \
             nanogate's store are tested as they are (they may be older than the sources). ***\n"
        );
        for (_, reference) in &images {
            ensure!(
                podman(&["image", "exists", reference])?.0,
                "{reference} is not in nanogate's image store: unset NANOGATE_SKIP_RELEASE_BUILD"
            );
        }
        return Ok(Images { images, version });
    }

    let (build_stage, _) = docker.cargo_build_run()?;
    // RUN steps see this machine's CA bundle: where egress goes through a TLS-inspecting proxy,
    // rustup and cargo trust only the machine's store, which Debian's bundle in the base image
    // lacks. A RUN mount is not part of any layer.
    let ca = std::env::var("SSL_CERT_FILE")
        .unwrap_or_else(|_| "/etc/ssl/certs/ca-certificates.crt".to_string());
    let ca_mount = format!("{ca}:/etc/ssl/certs/ca-certificates.crt:ro");
    let mut targets = vec![(build_stage.name.as_str(), BUILD_CACHE_TAG.to_string())];
    targets.extend(images.iter().map(|(n, r)| (*n, r.clone())));
    // Every `podman build` sends the context anew: sources edited meanwhile (a shared working
    // tree) would put two builds' binaries into the two images. Each image must hold what the
    // build stage built, or everything is built again.
    for attempt in 1..=3 {
        for (target, reference) in &targets {
            let started = Instant::now();
            progress!(
                "[shipping] podman build --target {target} -t {reference} (a first build \
                 compiles every crate: 5 to 8 minutes on 2 cores; later ones reuse the layers \
                 and the cargo caches, and compile only what changed)"
            );
            let mut args = vec!["build", "--pull=never", "--network", "host"];
            if Path::new(&ca).is_file() {
                args.extend(["--volume", &ca_mount]);
            }
            args.extend([
                "--file", DOCKERFILE, "--target", target, "--tag", reference, ".",
            ]);
            let status = podman_command(&args)
                .stdout(stderr_for_child()?)
                .status()
                .context("running podman build")?;
            ensure!(
                status.success(),
                "podman build --target {target} of {DOCKERFILE} failed (output above)"
            );
            progress!(
                "[shipping] built {reference} in {:.0}s",
                started.elapsed().as_secs_f64()
            );
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
            "[shipping] {differing:?} differ from the build stage's binaries: the sources \
             changed during the builds; building again"
        );
    }
    // Each build after a change of the sources leaves the previous images' layers untagged;
    // without this the store would grow with every CI run. The current build's layers are
    // parents of tagged images (the build stage's too, through BUILD_CACHE_TAG) and stay.
    let pruned = podman_ok(&["image", "prune", "--force"])?;
    progress!(
        "[shipping] podman image prune: {} untagged images of earlier builds removed",
        pruned.lines().filter(|l| !l.trim().is_empty()).count()
    );
    Ok(Images { images, version })
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[test]
fn image_binaries_are_static_builds_of_the_workspace_version() -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let docker = dockerfile()?;
    let args = docker.cargo_build()?;
    // The same crates, with the same (default) features, as CI's `cargo build --workspace --bins`.
    for forbidden in [
        "--features",
        "--all-features",
        "--no-default-features",
        "-F",
    ] {
        ensure!(
            !args
                .iter()
                .any(|a| a == forbidden || a.starts_with(&format!("{forbidden}="))),
            "the image build must use the default features CI tests; drop {forbidden}"
        );
    }
    for required in ["--release", "--locked"] {
        ensure!(
            args.iter().any(|a| a == required),
            "{DOCKERFILE}: cargo build needs {required}"
        );
    }
    ensure!(
        flag_value(&args, "--target-dir").is_none(),
        "the Dockerfile's cargo build must use the default target directory"
    );
    let mut bins = all_flag_values(&args, "--bin");
    bins.sort_unstable();
    let mut expected = BINARIES.to_vec();
    expected.sort_unstable();
    ensure!(
        bins == expected,
        "the image build must build {expected:?}, builds {bins:?}"
    );
    flag_value(&args, "--target")
        .context("the Dockerfile's cargo build must name its --target (static: …-linux-musl)")?;
    // Nothing but release-profile settings and caches may differ from CI's build.
    for (k, _) in docker.cargo_build_env()? {
        ensure!(
            k.starts_with("CARGO_PROFILE_RELEASE_"),
            "{DOCKERFILE}: ENV {k} in the build stage; only release-profile settings are expected"
        );
    }
    let (_, run) = docker.cargo_build_run()?;
    for flag in &run.flags {
        ensure!(
            flag.starts_with("--mount=type=cache,"),
            "{DOCKERFILE}: RUN {flag} on the cargo build; only cache mounts are expected"
        );
    }

    let images = images()?;
    let dir = image_bin_dir();
    std::fs::create_dir_all(&dir)?;
    for (name, reference) in &images.images {
        // Out of the image: what ships, not a rebuild of it.
        let program = entrypoint(reference)?;
        let bin = dir.join(name);
        let partial = dir.join(format!(".{name}.{}", std::process::id()));
        std::fs::write(&partial, copy_out(reference, &program)?)?;
        std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&partial, &bin)?;

        let (_, file) = output("file", &["-b", &bin.display().to_string()])?;
        ensure!(
            file.contains("statically linked") || file.contains("static-pie linked"),
            "{name} is not static: file says {file:?}"
        );
        // ldd exits 1 on a static executable; what it prints is what matters.
        let (_, ldd) = output("ldd", &[&bin.display().to_string()])?;
        ensure!(
            ldd.contains("not a dynamic executable") || ldd.contains("statically linked"),
            "{name} has dynamic dependencies: ldd says {ldd:?}"
        );
        assert_version(&bin, name, &images.version)?;
        let size = std::fs::metadata(&bin)?.len();
        progress!(
            "[shipping] {name} ({program} of {reference}): {} ({size} bytes), {}",
            mib(size),
            file.trim()
        );

        // Sizes: the final stage adds its binary to the base and nothing else.
        let base = docker.base_image(docker.stage(name)?);
        let (image, base_size) = (image_size(reference)?, image_size(&base)?);
        let layer = image.saturating_sub(base_size);
        ensure!(
            layer >= size && layer <= size + 64 * 1024,
            "{reference} adds {layer} bytes to {base}, its binary has {size}: the final stage \
             should add the binary only"
        );
        let (gz_image, gz_base) = (compressed_size(reference)?, compressed_size(&base)?);
        progress!(
            "[shipping] {reference}: {} ({image} bytes) = base {} + our layer {}; podman save | \
             gzip -9: {} ({gz_image} bytes) = base {} + our layer {} (the base is a local \
             stand-in: its share is approximate, our layer is real)",
            mib(image),
            mib(base_size),
            mib(layer),
            mib(gz_image),
            mib(gz_base),
            mib(gz_image.saturating_sub(gz_base)),
        );
    }
    progress!(
        "[shipping] the images' binaries: {}/{{nano-agent,nanogate-operator}} (benchmark the \
         shipped agent: NANO_AGENT_BIN={}/nano-agent cargo bench -p nanogate-sidecar --bench \
         agent)",
        dir.display(),
        dir.display()
    );
    Ok(())
}

#[test]
fn images_run_as_65532_without_a_shell() -> Result<()> {
    let images = images()?;
    for (name, reference) in &images.images {
        let config = image_config(reference)?;
        ensure!(
            config["User"] == "65532:65532",
            "{reference} runs as user {}, expected 65532:65532",
            config["User"]
        );
        let program = format!("/usr/local/bin/{name}");
        ensure!(
            config["Entrypoint"] == serde_json::json!([program]),
            "{reference}: entrypoint {}, expected [{program:?}]",
            config["Entrypoint"]
        );
        let (ok, out, err) = podman(&["run", "--rm", reference, "--version"])?;
        ensure!(
            ok && out.trim() == format!("{name} {}", images.version),
            "podman run {reference} --version printed {:?} (expected \"{name} {}\")",
            format!("{out}{err}").trim(),
            images.version
        );
        // The same podman, flags and image, with a shell as the entrypoint: it must not start
        // for lack of the program (not for any other reason).
        for shell in ["/bin/sh", "sh", "/bin/bash", "busybox"] {
            let (ok, out, err) = podman(&[
                "run",
                "--rm",
                "--entrypoint",
                shell,
                reference,
                "-c",
                "echo a-shell-ran",
            ])?;
            let printed = format!("{out}{err}");
            ensure!(
                !ok && !printed.contains("a-shell-ran"),
                "{reference}: `podman run --entrypoint {shell}` ran a shell: {printed}"
            );
            ensure!(
                printed.contains("no such file or directory")
                    || printed.contains("executable file not found"),
                "{reference}: `podman run --entrypoint {shell}` failed, but not for lack of a \
                 shell: {printed}"
            );
        }
        // The file system: the binary is its only executable (no shell, no package manager).
        let files = image_files(reference, name)?;
        let executables: Vec<&str> = files
            .iter()
            .filter(|(mode, _)| mode.starts_with('-') && mode.contains('x'))
            .map(|(_, path)| path.as_str())
            .collect();
        ensure!(
            executables == [program.trim_start_matches('/')],
            "{reference}: executables in the image: {executables:?}, expected only {program}"
        );
        for needed in ["etc/passwd", "etc/ssl/certs/ca-certificates.crt", "tmp/"] {
            ensure!(
                files.iter().any(|(_, path)| path == needed),
                "{reference} lacks /{needed}"
            );
        }
        progress!(
            "[shipping] {reference}: user 65532:65532, `--version` ok, no /bin/sh, sh, bash or \
             busybox; {} entries, one executable ({program})",
            files.len()
        );
    }
    Ok(())
}

/// The container the injector adds to a pod (from the operator's own patch).
fn injected_sidecar(image: &str) -> Result<Value> {
    use k8s_openapi::api::core::v1::Pod;
    use nanogate_operator::webhook::inject;
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "shop-0",
            "namespace": "shipping",
            "annotations": {(inject::INJECT_ANNOTATION): "true"},
        },
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]},
    }))?;
    let gateway = inject::InjectionConfig::with_defaults(
        "shop",
        image,
        inject::KeyRef {
            name: "platform-key".into(),
            key: "api-key".into(),
        },
    );
    let inject::Decision::Inject(injection) = inject::inject(
        &pod,
        "shipping",
        &Default::default(),
        &[gateway],
        &inject::InjectorSettings::new(NAMESPACE),
    ) else {
        bail!("the injector did not inject the test pod");
    };
    fn find(v: &Value) -> Option<&Value> {
        match v {
            Value::Object(o) if o.get("name") == Some(&Value::from(inject::SIDECAR_NAME)) => {
                Some(v)
            }
            Value::Object(o) => o.values().find_map(find),
            Value::Array(a) => a.iter().find_map(find),
            _ => None,
        }
    }
    let patch = serde_json::to_value(&injection.patch)?;
    find(&patch).cloned().with_context(|| {
        format!(
            "no {} container in the patch: {patch}",
            inject::SIDECAR_NAME
        )
    })
}

/// `podman run` flags for the injected container's securityContext: every field translated,
/// or the test fails (so it follows the injector).
fn security_flags(context: &Value) -> Result<Vec<String>> {
    let mut flags = Vec::new();
    let (mut user, mut group) = (None, None);
    for (key, value) in context.as_object().context("securityContext")? {
        match (key.as_str(), value) {
            // Checked below: the process runs as 65532.
            ("runAsNonRoot", Value::Bool(true)) => {}
            ("runAsUser", v) => user = v.as_i64(),
            ("runAsGroup", v) => group = v.as_i64(),
            ("allowPrivilegeEscalation", Value::Bool(false)) => {
                flags.extend(["--security-opt".into(), "no-new-privileges".into()]);
            }
            ("privileged", Value::Bool(false)) => {}
            ("readOnlyRootFilesystem", Value::Bool(true)) => {
                // Kubernetes mounts no tmpfs on a read-only root; podman does unless told not.
                flags.extend(["--read-only".into(), "--read-only-tmpfs=false".into()]);
            }
            ("capabilities", caps) => {
                for cap in caps["drop"].as_array().into_iter().flatten() {
                    flags.extend(["--cap-drop".into(), cap.as_str().context("cap")?.into()]);
                }
                for cap in caps["add"].as_array().into_iter().flatten() {
                    flags.extend(["--cap-add".into(), cap.as_str().context("cap")?.into()]);
                }
            }
            // podman's default seccomp profile is the runtime's default.
            ("seccompProfile", p) if p["type"] == "RuntimeDefault" => {}
            _ => bail!("securityContext.{key}: {value} has no podman translation in this test"),
        }
    }
    let user = user.context("the injector sets runAsUser")?;
    flags.extend(["--user".into(), format!("{user}:{}", group.unwrap_or(user))]);
    Ok(flags)
}

/// `/proc/<pid>/status` fields, e.g. `Uid` → `65532 65532 65532 65532`.
fn proc_status(pid: &str) -> Result<Vec<(String, String)>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(status
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| {
            (
                k.to_string(),
                v.split_whitespace().collect::<Vec<_>>().join(" "),
            )
        })
        .collect())
}

/// Every entry under `dir`, recursively: (path, uid, gid).
fn owners(dir: &Path) -> Result<Vec<(PathBuf, u32, u32)>> {
    use std::os::unix::fs::MetadataExt as _;
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let meta = std::fs::symlink_metadata(&path)?;
        found.push((path.clone(), meta.uid(), meta.gid()));
        if meta.is_dir() {
            found.extend(owners(&path)?);
        }
    }
    Ok(found)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nano_agent_image_serves_its_socket_as_65532_as_the_injector_runs_it() -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let images = tokio::task::spawn_blocking(images).await??;
    let reference = images.reference("nano-agent");
    let sidecar = injected_sidecar(reference)?;
    ensure!(
        sidecar["image"] == reference,
        "the injector runs {}",
        sidecar["image"]
    );
    ensure!(
        sidecar.get("command").is_none() && sidecar.get("args").is_none(),
        "the injected container overrides the entrypoint; translate it: {sidecar}"
    );
    let platform = nanogate_tests::platform::PlatformServer::start_with_key("shipping-key").await?;
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();

    // The socket volume (an emptyDir, created 0777) becomes a bind-mounted host directory.
    let dir = std::env::temp_dir().join(format!("nanogate-shipping-agent-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
    let container = Container {
        name: format!("nanogate-shipping-agent-{}", std::process::id()),
        dir: Some(dir.clone()),
    };
    let mut run: Vec<String> = [
        "run",
        "--detach",
        "--name",
        &container.name,
        "--network",
        "host",
    ]
    .map(String::from)
    .to_vec();
    run.extend(security_flags(&sidecar["securityContext"])?);
    let mut socket_dir = None;
    for mount in sidecar["volumeMounts"].as_array().context("volumeMounts")? {
        // The config, hub token and hub CA volumes serve the hub, which this test does not run.
        if mount["name"] == nanogate_operator::webhook::inject::SOCKET_VOLUME {
            let path = mount["mountPath"].as_str().context("mountPath")?;
            run.extend(["--volume".into(), format!("{}:{path}", dir.display())]);
            socket_dir = Some(path.to_string());
        }
    }
    let socket_dir = socket_dir.context("the injected container mounts no socket volume")?;
    let mut socket_path = None;
    for var in sidecar["env"].as_array().context("env")? {
        let key = var["name"].as_str().context("env name")?;
        let value = match (key, &var["value"], &var["valueFrom"]) {
            // Standalone here: no hub, no config file (the upstream comes from TENDRL_APP_URL).
            (
                "NANOGATE_GATEWAY"
                | "NANOGATE_CONFIG_FILE"
                | "NANOGATE_HUB_ADDR"
                | "NANOGATE_HUB_TOKEN_FILE"
                | "NANOGATE_HUB_CA_FILE",
                ..,
            ) => continue,
            // The pod's port would be the node's with the host network.
            ("NANOGATE_ADMIN_PORT", ..) => admin_port.to_string(),
            (_, Value::String(v), _) => v.clone(),
            (_, _, from) if from["secretKeyRef"]["key"] == "api-key" => {
                platform.api_key().to_string()
            }
            (_, _, from) => match from["fieldRef"]["fieldPath"].as_str() {
                Some("metadata.name") => "shop-0".into(),
                Some("metadata.namespace") => "shipping".into(),
                Some("metadata.uid") => "00000000-0000-0000-0000-000000000009".into(),
                _ => bail!("env {key}: {var} has no translation in this test"),
            },
        };
        if key == "TENDRL_SOCKET_PATH" {
            socket_path = Some(value.clone());
        }
        run.extend(["--env".into(), format!("{key}={value}")]);
    }
    run.extend([
        "--env".into(),
        format!("TENDRL_APP_URL={}", platform.url()),
        reference.to_string(),
    ]);
    let socket_path = socket_path.context("the injector sets TENDRL_SOCKET_PATH")?;
    let socket_name = socket_path
        .strip_prefix(&format!("{socket_dir}/"))
        .with_context(|| format!("socket {socket_path} outside the socket volume {socket_dir}"))?;
    let host_socket = dir.join(socket_name);
    progress!("[shipping] podman {}", run.join(" "));
    let run: Vec<&str> = run.iter().map(String::as_str).collect();
    podman_ok(&run)?;

    let logs = || {
        podman(&["logs", &container.name])
            .map(|(_, out, err)| format!("{out}{err}"))
            .unwrap_or_default()
    };
    let state = |field: &str| -> Result<String> {
        Ok(podman_ok(&[
            "inspect",
            "--format",
            &format!("{{{{.State.{field}}}}}"),
            &container.name,
        ])?
        .trim()
        .to_string())
    };
    let started = Instant::now();
    let ready = nanogate_e2e::wait_for(
        "nano-agent in its container to serve its socket and /readyz",
        Duration::from_secs(60),
        || async {
            let status = state("Status")?;
            ensure!(status == "running", "the container is {status}");
            let readyz = || {
                let admin = std::net::SocketAddr::from(([127, 0, 0, 1], admin_port));
                nanogate_tests::http::http_get(admin, "/readyz", Duration::from_secs(5))
                    .ok()
                    .map(|(code, _)| code)
            };
            Ok((host_socket.exists() && readyz() == Some(200)).then_some(()))
        },
    )
    .await;
    if let Err(e) = ready {
        bail!("{e:#}\ncontainer log:\n{}", logs());
    }
    progress!(
        "[shipping] nano-agent ready in its container after {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // The process, as the kernel sees it.
    let pid = state("Pid")?;
    let status = proc_status(&pid)?;
    let field = |name: &str| {
        status
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_default()
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    let argv0 = String::from_utf8_lossy(cmdline.split(|b| *b == 0).next().unwrap_or_default());
    ensure!(
        argv0 == "/usr/local/bin/nano-agent",
        "pid {pid} runs {argv0}"
    );
    ensure!(
        field("Uid") == "65532 65532 65532 65532" && field("Gid") == "65532 65532 65532 65532",
        "nano-agent runs as uid {:?}, gid {:?}",
        field("Uid"),
        field("Gid")
    );
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        ensure!(
            field(caps) == "0000000000000000",
            "nano-agent has {caps} {}",
            field(caps)
        );
    }
    ensure!(
        field("NoNewPrivs") == "1",
        "no_new_privs is {:?}",
        field("NoNewPrivs")
    );
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
    let mount_options = |point: &str| {
        mountinfo
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .rfind(|f| f.len() > 5 && f[4] == point)
            .map(|f| f[5].split(',').map(str::to_string).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    ensure!(
        mount_options("/").iter().any(|o| o == "ro"),
        "the root file system is mounted {:?}",
        mount_options("/")
    );
    ensure!(
        mount_options(&socket_dir).iter().any(|o| o == "rw"),
        "{socket_dir} is mounted {:?}",
        mount_options(&socket_dir)
    );

    // A publish from the host, through the bind mount, delivered to the platform.
    let id = u64::from(rand::random::<u32>());
    let mut stream = tokio::net::UnixStream::connect(&host_socket)
        .await
        .with_context(|| format!("connecting to {}", host_socket.display()))?;
    stream
        .write_all(
            serde_json::json!({
                "msg_type": "publish",
                "data": {"id": id, "from": "shipping.rs"},
                "context": {"tags": ["shipping"]},
            })
            .to_string()
            .as_bytes(),
        )
        .await?;
    stream.shutdown().await?;
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut reply)).await??;
    ensure!(
        reply.is_empty(),
        "the agent answered the publish with {:?}",
        String::from_utf8_lossy(&reply)
    );
    let delivered = nanogate_e2e::wait_for(
        "the platform to receive the publish",
        Duration::from_secs(20),
        || async {
            Ok(platform
                .received()
                .into_iter()
                .find(|m| m["data"]["id"] == id))
        },
    )
    .await;
    let delivered = match delivered {
        Ok(m) => m,
        Err(e) => bail!("{e:#}\ncontainer log:\n{}", logs()),
    };
    ensure!(
        delivered["source"] == "shipping/shop-0",
        "the message's source is {} (expected the pod's namespace/name)",
        delivered["source"]
    );
    ensure!(
        platform.unauthorized() == 0,
        "the agent sent a wrong API key"
    );

    // What the agent made on the volume belongs to 65532.
    let made = owners(&dir)?;
    ensure!(
        made.iter().any(|(p, ..)| *p == host_socket),
        "no socket {} on the volume: {made:?}",
        host_socket.display()
    );
    ensure!(
        made.iter()
            .any(|(p, ..)| p.file_name().is_some_and(|n| n == "spool")),
        "no spool directory on the volume: {made:?}"
    );
    let foreign: Vec<_> = made
        .iter()
        .filter(|(_, uid, gid)| (*uid, *gid) != (65532, 65532))
        .collect();
    ensure!(
        foreign.is_empty(),
        "files on the volume not owned by 65532:65532: {foreign:?}"
    );

    // SIGTERM, as the kubelet stops a container: a clean exit.
    podman_ok(&["stop", "--time", "30", &container.name])?;
    let code = state("ExitCode")?;
    ensure!(
        code == "0",
        "nano-agent exited with {code} on SIGTERM; log:\n{}",
        logs()
    );
    progress!(
        "[shipping] {reference} as injected (read-only root, no capabilities, no-new-privileges, \
         uid 65532): socket and spool on the bind mount owned by 65532 ({} entries), a publish \
         from the host delivered with source {}, exit 0 on SIGTERM",
        made.len(),
        delivered["source"]
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// One version

#[test]
fn one_version_everywhere() -> Result<()> {
    let version = workspace_version()?;
    for member in workspace_members()? {
        let manifest = read(&format!("{member}/Cargo.toml"))?;
        ensure!(
            manifest
                .lines()
                .any(|l| l.trim() == "version.workspace = true"),
            "{member}/Cargo.toml must use version.workspace = true"
        );
    }
    let chart: Value = serde_yaml::from_str(&read(&format!("{CHART}/Chart.yaml"))?)?;
    ensure!(
        chart["version"] == version.as_str(),
        "Chart.yaml version {} ≠ {version}",
        chart["version"]
    );
    ensure!(
        chart["appVersion"] == version.as_str(),
        "Chart.yaml appVersion {} ≠ {version}",
        chart["appVersion"]
    );
    let values: Value = serde_yaml::from_str(&read(&format!("{CHART}/values.yaml"))?)?;
    ensure!(values["image"]["repository"] == OPERATOR_IMAGE);
    ensure!(
        values["image"]["tag"] == "" || values["image"]["tag"] == version.as_str(),
        "values.yaml image.tag must be empty (= appVersion) or {version}"
    );
    let agent_image = format!("{AGENT_IMAGE}:{version}");
    ensure!(
        nanogate_operator::crd::DEFAULT_SIDECAR_IMAGE == agent_image,
        "the operator injects {} by default, the release is {agent_image}",
        nanogate_operator::crd::DEFAULT_SIDECAR_IMAGE
    );
    for crd in [
        "crds/agentgateway.yaml",
        "charts/nanogate/crds/agentgateway.yaml",
    ] {
        ensure!(
            read(crd)?.contains(&format!("default: {agent_image}")),
            "{crd}: the sidecar image default must be {agent_image}"
        );
    }
    // The Dockerfile's documented build commands tag the images the chart and injector use.
    let dockerfile = read(DOCKERFILE)?;
    for (target, image) in [
        ("nanogate-operator", OPERATOR_IMAGE),
        ("nano-agent", AGENT_IMAGE),
    ] {
        let tag = format!("--target {target}");
        let line = dockerfile
            .lines()
            .find(|l| {
                l.contains("docker build")
                    && l.split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                        .contains(&tag)
            })
            .with_context(|| format!("{DOCKERFILE}: no `docker build … --target {target}` line"))?;
        ensure!(
            line.contains(&format!("-t {image}:{version} ")),
            "{DOCKERFILE}: {target} must be tagged {image}:{version}: {line}"
        );
    }
    ensure!(
        read("CHANGELOG.md")?.contains(&format!("## [{version}]")),
        "CHANGELOG.md has no `## [{version}]` section"
    );
    let deploy = read(DEPLOY)?;
    ensure!(
        deploy.contains(&format!("image: \"{OPERATOR_IMAGE}:{version}\"")),
        "{DEPLOY} must run {OPERATOR_IMAGE}:{version} (regenerate it)"
    );
    // What CI tests (debug builds of `cargo build --workspace --bins`); the release builds are
    // checked in the Dockerfile test.
    for name in BINARIES {
        assert_version(&nanogate_e2e::workspace_binary(name)?, name, &version)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// deploy/nanogate.yaml

/// `deploy/nanogate.yaml` as it should be: a header, the Namespace, and `helm template
/// --include-crds` of the chart with default values (the real Helm engine).
fn rendered_deploy() -> Result<String> {
    let chart = workspace_root().join(CHART);
    let chart = chart.to_str().context("utf-8 path")?;
    // Rendering is offline: no kubeconfig is read.
    let template = nanogate_e2e::helm(
        Path::new("/dev/null"),
        &["template", chart, RELEASE, NAMESPACE],
    )?;
    let template = template
        .as_str()
        .context("helm.py template prints a string")?;
    Ok(format!(
        "# nanogate {version}: the Helm chart charts/nanogate rendered with its default values
# (release {RELEASE:?}, namespace {NAMESPACE:?}) by the Helm engine, CRD included, for clusters
# without Helm:
#
#   kubectl apply --server-side -f deploy/nanogate.yaml
#
# Generated, do not edit: NANOGATE_UPDATE_DEPLOY=1 cargo test -p nanogate-e2e --test shipping
# (e2e/tests/shipping.rs fails when this file differs from the chart). Kubernetes >= 1.21
# (PodDisruptionBudget policy/v1); older clusters: install with Helm, which detects it.
---
apiVersion: v1
kind: Namespace
metadata:
  name: {NAMESPACE}
  labels:
    app.kubernetes.io/name: nanogate
    app.kubernetes.io/instance: {RELEASE}
{template}",
        version = workspace_version()?
    ))
}

#[test]
fn deploy_manifest_is_the_chart_rendered_with_defaults() -> Result<()> {
    let expected = rendered_deploy()?;
    let path = workspace_root().join(DEPLOY);
    let actual = std::fs::read_to_string(&path).unwrap_or_default();
    if actual == expected {
        return Ok(());
    }
    if std::env::var_os("NANOGATE_UPDATE_DEPLOY").is_some() {
        std::fs::create_dir_all(path.parent().context("deploy/")?)?;
        std::fs::write(&path, &expected)?;
        progress!("[shipping] wrote {DEPLOY} ({} bytes)", expected.len());
        return Ok(());
    }
    let first_difference = actual
        .lines()
        .zip(expected.lines())
        .enumerate()
        .find(|(_, (a, e))| a != e)
        .map(|(i, (a, e))| format!("line {}: file has {a:?}, chart renders {e:?}", i + 1))
        .unwrap_or_else(|| "one is a prefix of the other".into());
    bail!(
        "{DEPLOY} is not the chart rendered with default values ({first_difference}).\n\
         Regenerate it: NANOGATE_UPDATE_DEPLOY=1 cargo test -p nanogate-e2e --test shipping"
    )
}

/// The documents of a multi-document YAML text.
fn documents(text: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for doc in text.split("\n---\n") {
        let value: Value = serde_yaml::from_str(doc)?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

#[tokio::test]
async fn deploy_manifest_and_k8s_examples_pass_server_dry_run() -> Result<()> {
    let cp = ControlPlane::shared().await?;
    let kubeconfig = cp.kubeconfig_path();

    // deploy/nanogate.yaml. Its namespaced objects need their namespace to exist, and a dry run
    // creates nothing, so the Namespace is created for real first.
    let deploy = read(DEPLOY)?;
    let objects = documents(&deploy)?;
    if let Err(e) = run_kubectl(kubeconfig, &["create", "namespace", NAMESPACE])
        && !e.to_string().contains("AlreadyExists")
    {
        return Err(e);
    }
    let served = run_kubectl(kubeconfig, &["api-versions"])?;
    let mut file_to_apply = workspace_root().join(DEPLOY);
    let mut downgraded = None;
    if !served.lines().any(|l| l == "policy/v1") {
        // The test apiserver is 1.20, before policy/v1 (1.21); the PodDisruptionBudget spec is
        // the same in policy/v1beta1, which it serves.
        let copy =
            std::env::temp_dir().join(format!("nanogate-deploy-{}.yaml", std::process::id()));
        let replaced = deploy.replace(
            "apiVersion: policy/v1\nkind: PodDisruptionBudget",
            "apiVersion: policy/v1beta1\nkind: PodDisruptionBudget",
        );
        ensure!(
            replaced != deploy,
            "{DEPLOY}: expected a policy/v1 PodDisruptionBudget"
        );
        std::fs::write(&copy, replaced)?;
        progress!(
            "[shipping] this apiserver does not serve policy/v1 (Kubernetes 1.20): the dry run \
             sends the PodDisruptionBudget as policy/v1beta1"
        );
        file_to_apply = copy.clone();
        downgraded = Some(copy);
    }
    let out = run_kubectl(
        kubeconfig,
        &[
            "apply",
            "--dry-run=server",
            "--validate=strict",
            "-o",
            "name",
            "-f",
            file_to_apply.to_str().context("utf-8 path")?,
        ],
    );
    if let Some(copy) = downgraded {
        let _ = std::fs::remove_file(copy);
    }
    let out = out?;
    let accepted = out.lines().filter(|l| !l.trim().is_empty()).count();
    ensure!(
        accepted == objects.len(),
        "the apiserver accepted {accepted} of the {} objects of {DEPLOY}:\n{out}",
        objects.len()
    );
    progress!("[shipping] kubectl apply --dry-run=server -f {DEPLOY}: {accepted} objects accepted");

    // examples/k8s: the AgentGateway (and its Secret) for real, checked by the CRD's schema;
    // the Deployment by dry run (no webhook of this test matches it).
    nanogate_e2e::install_crd(cp)?;
    let client = cp.client().await?;
    let ns = TestNamespace::create(&client, "examples").await?;
    let gateway = workspace_root().join("examples/k8s/agentgateway.yaml");
    run_kubectl(
        kubeconfig,
        &[
            "apply",
            "-n",
            ns.name(),
            "--validate=strict",
            "-f",
            gateway.to_str().context("path")?,
        ],
    )?;
    let stored: Value = serde_json::from_str(&run_kubectl(
        kubeconfig,
        &["get", "agentgateway", "shop", "-n", ns.name(), "-o", "json"],
    )?)?;
    ensure!(stored["spec"]["upstream"]["url"] == "https://platform.example/api");
    ensure!(stored["spec"]["upstream"]["apiKeySecretRef"]["name"] == "platform-key");
    let deployment = workspace_root().join("examples/k8s/deployment.yaml");
    let out = run_kubectl(
        kubeconfig,
        &[
            "apply",
            "--dry-run=server",
            "--validate=strict",
            "-n",
            ns.name(),
            "-o",
            "json",
            "-f",
            deployment.to_str().context("path")?,
        ],
    )?;
    let dry: Value = serde_json::from_str(&out)?;
    ensure!(
        dry["spec"]["template"]["metadata"]["annotations"]["nanogate.io/inject"] == "true",
        "the sample Deployment asks for injection: {dry}"
    );
    Ok(())
}

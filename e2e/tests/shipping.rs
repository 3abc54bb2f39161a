//! What ships (issue 9): the images' Dockerfile, one version everywhere, and `deploy/nanogate.yaml`.
//!
//! - `build/Dockerfile`: its `RUN cargo build` line is run here verbatim (into
//!   `~/.cache/nanogate/target-static`, so CI pays the release build once per change of the
//!   sources); the release binaries must be static (`file`, `ldd`) and print the workspace
//!   version; the final stages must be distroless/static or scratch (no shell), run as 65532 and
//!   start the binary in exec form; hadolint must accept the file. The image build itself needs a Docker engine, which the
//!   test machines do not run. The release build costs minutes after every change of the
//!   sources; `NANOGATE_SKIP_RELEASE_BUILD=1` skips it (loudly) for quick local runs.
//! - One version: every crate, the chart's `version`/`appVersion`, the image references (the
//!   operator's in values.yaml, the sidecar's default in the operator and the CRD), the
//!   Dockerfile's tags, the CHANGELOG and `--version` of both binaries.
//! - `deploy/nanogate.yaml` is the chart rendered with default values by the real Helm engine
//!   (regenerate: `NANOGATE_UPDATE_DEPLOY=1 cargo test -p nanogate-e2e --test shipping`), and
//!   `kubectl apply --dry-run=server -f deploy/nanogate.yaml` is accepted by the real apiserver,
//!   as are the sample manifests of `examples/k8s/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
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

    /// `ENV` variables of the stage that runs `cargo build` (`ENV K=V …` form).
    fn cargo_build_env(&self) -> Result<Vec<(String, String)>> {
        let stage = self
            .stages
            .iter()
            .find(|s| s.all("RUN").iter().any(|r| r.starts_with("cargo build")))
            .context("no stage runs cargo build")?;
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

    /// The arguments of the single `RUN cargo build …` instruction (after `cargo`).
    fn cargo_build(&self) -> Result<Vec<String>> {
        let runs: Vec<&str> = self
            .stages
            .iter()
            .flat_map(|s| s.all("RUN"))
            .filter(|r| r.starts_with("cargo build"))
            .collect();
        ensure!(
            runs.len() == 1,
            "{DOCKERFILE} must build with exactly one `RUN cargo build …` (found {})",
            runs.len()
        );
        let words: Vec<String> = runs[0].split_whitespace().map(str::to_string).collect();
        ensure!(
            !words
                .iter()
                .any(|w| w.contains(['&', '|', ';', '$', '"', '\''])),
            "the cargo build line must be one plain command (the test runs it verbatim): {}",
            runs[0]
        );
        Ok(words[1..].to_vec())
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

#[test]
fn dockerfile_build_command_makes_static_binaries_of_the_workspace_version() -> Result<()> {
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
    let triple = flag_value(&args, "--target")
        .context("the Dockerfile's cargo build must name its --target (static: …-linux-musl)")?;

    if std::env::var_os("NANOGATE_SKIP_RELEASE_BUILD").is_some() {
        progress!(
            "\n*** SKIPPED: the Dockerfile's release build and the static-linking checks were NOT \
             run (NANOGATE_SKIP_RELEASE_BUILD is set). ***\n"
        );
        return Ok(());
    }
    let env = docker.cargo_build_env()?;
    for (k, _) in &env {
        ensure!(
            k.starts_with("CARGO_PROFILE_RELEASE_"),
            "{DOCKERFILE}: ENV {k} in the build stage; only release-profile settings are expected"
        );
    }
    let target_dir = cache_dir().join("target-static");
    let started = Instant::now();
    progress!(
        "[shipping] {} cargo {} --target-dir {} (the Dockerfile's build; cached after the first run)",
        env.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" "),
        args.join(" "),
        target_dir.display()
    );
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(&args)
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(workspace_root())
        .status()
        .context("running cargo")?;
    ensure!(
        status.success(),
        "the Dockerfile's cargo build failed (musl target: `rustup target add {triple}`, C \
         compiler for ring: `apt-get install musl-tools`; e2e/scripts/setup.sh does both)"
    );
    progress!(
        "[shipping] release build took {:.0}s",
        started.elapsed().as_secs_f64()
    );

    let version = workspace_version()?;
    for name in BINARIES {
        let bin = target_dir.join(triple).join("release").join(name);
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
        assert_version(&bin, name, &version)?;
        let size = std::fs::metadata(&bin)?.len();
        progress!(
            "[shipping] {name}: {:.1} MiB ({size} bytes), {}",
            size as f64 / (1024.0 * 1024.0),
            file.trim()
        );
    }
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

//! What ships (issue 9): the container images built from `build/Dockerfile`, the example app's
//! image built from `examples/Dockerfile`, one version everywhere, and `deploy/nanogate.yaml`.
//!
//! - The images are built by `nanogate_e2e::images` (e2e/src/images.rs), which other tests and
//!   the demo use too, so what a node runs is what this test checks.
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
//!     mount as uid 65532 (socket mode 0666, spool 0700), takes a publish from the host and
//!     delivers it to a local platform, and exits 0 on SIGTERM.
//!   - The Dockerfile is also parsed (final stages distroless/static or scratch, 65532, exec
//!     form) and linted by hadolint.
//! - `examples/Dockerfile` (on a `debian:bookworm-slim` stand-in from the same script): the
//!   example app runs as 10001:10001, has `sh`, OpenBSD nc and the shell client, no package
//!   manager, and stays small; without a socket it retries, SIGTERM ends it with 0. Next to the
//!   nano-agent image on a shared bind-mounted directory (no fsGroup; it also runs as an
//!   OpenShift-style uid with gid 0) its messages reach the platform, counters without gaps.
//!   hadolint lints it too.
//! - `save_docker_archive` writes a docker-archive tar whose manifest names the image by its
//!   reference (what a node imports).
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
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nanogate_e2e::images::{
    AGENT_IMAGE, APP_DOCKERFILE, APP_IMAGE, APP_TARGET, APP_UID, BINARIES, DOCKERFILE,
    OPERATOR_IMAGE, app_dockerfile, dockerfile, image_bin_dir, images, read, workspace_version,
};
use nanogate_e2e::podman::{
    Container, compressed_size, copy_out, entrypoint, image_config, image_files, image_size,
    podman, podman_ok,
};
use nanogate_e2e::{ControlPlane, TestNamespace, progress, run_kubectl, workspace_root};
use serde_json::Value;

const DEPLOY: &str = "deploy/nanogate.yaml";
const CHART: &str = "charts/nanogate";
/// Release name and namespace of `deploy/nanogate.yaml` (what the README's `helm install` uses).
const RELEASE: &str = "nanogate";
const NAMESPACE: &str = "nanogate-system";

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

/// hadolint (from the virtualenv of `e2e/scripts/setup.sh`) parses both Dockerfiles (nanogate's
/// and the example app's) with its own grammar and lints them: a syntax error or a finding
/// fails the test.
#[test]
fn dockerfiles_pass_hadolint() -> Result<()> {
    let hadolint = nanogate_e2e::venv_python().with_file_name("hadolint");
    ensure!(
        hadolint.exists(),
        "{} is missing: run `bash e2e/scripts/setup.sh` (make test does)",
        hadolint.display()
    );
    for file in [DOCKERFILE, APP_DOCKERFILE] {
        let out = Command::new(&hadolint)
            .arg("--no-color")
            .arg(workspace_root().join(file))
            .output()?;
        ensure!(
            out.status.success(),
            "hadolint {file}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
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

// Images: build/Dockerfile and examples/Dockerfile built (e2e/src/images.rs) and run with podman

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
    use nanogate_operator::names;
    use nanogate_operator::webhook::inject;
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "shop-0",
            "namespace": "shipping",
            "annotations": {(names::INJECT_ANNOTATION): "true"},
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
            Value::Object(o) if o.get("name") == Some(&Value::from(names::SIDECAR_NAME)) => Some(v),
            Value::Object(o) => o.values().find_map(find),
            Value::Array(a) => a.iter().find_map(find),
            _ => None,
        }
    }
    let patch = serde_json::to_value(&injection.patch)?;
    find(&patch)
        .cloned()
        .with_context(|| format!("no {} container in the patch: {patch}", names::SIDECAR_NAME))
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

/// The value of field `name` of a `/proc/<pid>/status` ([`proc_status`]); empty when absent.
fn proc_field<'a>(status: &'a [(String, String)], name: &str) -> &'a str {
    status
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_default()
}

/// A test container `nanogate-shipping-<kind>-<pid>`, removed (with `dir`) when dropped.
fn shipping_container(kind: &str, dir: Option<PathBuf>) -> Container {
    Container {
        name: format!("nanogate-shipping-{kind}-{}", std::process::id()),
        dir,
    }
}

/// Stops container `name` as the kubelet does (SIGTERM, 30 s grace): how long it took, its
/// exit code and its log.
fn stop_container(name: &str) -> Result<(Duration, String, String)> {
    let stop = Instant::now();
    podman_ok(&["stop", "--time", "30", name])?;
    let stopped_in = stop.elapsed();
    Ok((
        stopped_in,
        container_state(name, "ExitCode")?,
        container_logs(name),
    ))
}

/// `podman run --detach --name <name>` without network, on a read-only root, with no
/// capabilities and no privilege escalation; the caller adds the rest.
fn locked_down_run(name: &str) -> Vec<&str> {
    vec![
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        "none",
        "--read-only",
        "--read-only-tmpfs=false",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
    ]
}

/// How the injector's nano-agent container runs under podman: the `podman run` arguments and
/// where the socket is in the container.
struct AgentRun {
    args: Vec<String>,
    /// The socket volume's mount path.
    socket_dir: String,
    /// `TENDRL_SOCKET_PATH`, as the injector sets it in the sidecar and in every app container.
    socket_path: String,
}

impl AgentRun {
    /// The socket's path on the host, under `dir` (the bind-mounted socket volume).
    fn host_socket(&self, dir: &Path) -> Result<PathBuf> {
        let name = self
            .socket_path
            .strip_prefix(&format!("{}/", self.socket_dir))
            .with_context(|| {
                format!(
                    "socket {} outside the socket volume {}",
                    self.socket_path, self.socket_dir
                )
            })?;
        Ok(dir.join(name))
    }
}

/// `podman run --detach` arguments for the injected container `sidecar` (from the operator's
/// own patch) as container `name`: its securityContext as podman flags, its socket volume as a
/// bind mount of `dir`, its environment, standalone (no hub, no config file; the platform from
/// `TENDRL_APP_URL`), on the host network with the admin port `admin_port`.
fn injected_agent_run(
    sidecar: &Value,
    name: &str,
    dir: &Path,
    platform: &nanogate_tests::platform::PlatformServer,
    admin_port: u16,
) -> Result<AgentRun> {
    let reference = sidecar["image"].as_str().context("image")?;
    ensure!(
        sidecar.get("command").is_none() && sidecar.get("args").is_none(),
        "the injected container overrides the entrypoint; translate it: {sidecar}"
    );
    let mut run: Vec<String> = ["run", "--detach", "--name", name, "--network", "host"]
        .map(String::from)
        .to_vec();
    run.extend(security_flags(&sidecar["securityContext"])?);
    let mut socket_dir = None;
    for mount in sidecar["volumeMounts"].as_array().context("volumeMounts")? {
        // The config, hub token and hub CA volumes serve the hub, which this test does not run.
        if mount["name"] == nanogate_operator::names::SOCKET_VOLUME {
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
    Ok(AgentRun {
        args: run,
        socket_dir,
        socket_path: socket_path.context("the injector sets TENDRL_SOCKET_PATH")?,
    })
}

/// What container `name` printed (stdout and stderr).
fn container_logs(name: &str) -> String {
    podman(&["logs", name])
        .map(|(_, out, err)| format!("{out}{err}"))
        .unwrap_or_default()
}

/// A field of container `name`'s `.State` (`Status`, `Pid`, `ExitCode`, …).
fn container_state(name: &str, field: &str) -> Result<String> {
    Ok(podman_ok(&[
        "inspect",
        "--format",
        &format!("{{{{.State.{field}}}}}"),
        name,
    ])?
    .trim()
    .to_string())
}

/// Waits until nano-agent in container `name` serves `host_socket` and its `/readyz` on
/// `admin_port` answers 200; the seconds it took, or an error with the container's log.
async fn wait_until_agent_ready(name: &str, host_socket: &Path, admin_port: u16) -> Result<f64> {
    let started = Instant::now();
    let ready = nanogate_e2e::wait_for(
        "nano-agent in its container to serve its socket and /readyz",
        Duration::from_secs(60),
        || async {
            let status = container_state(name, "Status")?;
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
        bail!("{e:#}\ncontainer log:\n{}", container_logs(name));
    }
    Ok(started.elapsed().as_secs_f64())
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
    let platform = nanogate_tests::platform::PlatformServer::start_with_key("shipping-key").await?;
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();

    // The socket volume (an emptyDir, created 0777) becomes a bind-mounted host directory.
    let dir = std::env::temp_dir().join(format!("nanogate-shipping-agent-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
    let container = shipping_container("agent", Some(dir.clone()));
    let run = injected_agent_run(&sidecar, &container.name, &dir, &platform, admin_port)?;
    let socket_dir = run.socket_dir.clone();
    let host_socket = run.host_socket(&dir)?;
    progress!("[shipping] podman {}", run.args.join(" "));
    let args: Vec<&str> = run.args.iter().map(String::as_str).collect();
    podman_ok(&args)?;

    let logs = || container_logs(&container.name);
    let state = |field: &str| container_state(&container.name, field);
    let waited = wait_until_agent_ready(&container.name, &host_socket, admin_port).await?;
    progress!("[shipping] nano-agent ready in its container after {waited:.1}s");

    // The process, as the kernel sees it.
    let pid = state("Pid")?;
    let status = proc_status(&pid)?;
    let field = |name: &str| proc_field(&status, name);
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
    // Open to every app of the pod, whatever its uid: the socket; the spool: the agent's alone.
    let mode =
        |p: &Path| -> Result<u32> { Ok(std::fs::metadata(p)?.permissions().mode() & 0o7777) };
    let spool = made
        .iter()
        .find(|(p, ..)| p.file_name().is_some_and(|n| n == "spool"))
        .map(|(p, ..)| p.clone())
        .context("spool")?;
    ensure!(
        (mode(&host_socket)?, mode(&spool)?) == (0o666, 0o700),
        "socket mode {:o}, spool mode {:o}: expected 666 and 700",
        mode(&host_socket)?,
        mode(&spool)?
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
// The example app's image (examples/Dockerfile)

/// The example app's image: user 10001:10001 (not root, not the sidecar's 65532) in the
/// Dockerfile and in the running process, the loop as exec-form entrypoint on
/// distroless/static, `sh` and the shell client with OpenBSD nc (what `kubectl exec` needs),
/// no package manager; small. Without a socket it keeps retrying, and SIGTERM ends it with 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_app_image_runs_as_10001_with_sh_and_the_shell_client() -> Result<()> {
    let docker = app_dockerfile()?;
    let stage = docker.stage(APP_TARGET)?;
    let base = docker.base_image(stage);
    ensure!(
        base.starts_with("gcr.io/distroless/static") && !base.contains("debug"),
        "{APP_DOCKERFILE}: {APP_TARGET} FROM {base}, expected distroless/static"
    );
    ensure!(
        stage.one("USER")? == format!("{APP_UID}:{APP_UID}"),
        "{APP_DOCKERFILE}: USER {}",
        stage.one("USER")?
    );
    ensure!(
        stage.all("RUN").is_empty(),
        "{APP_DOCKERFILE}: the final stage has no RUN (nothing but copies on distroless)"
    );

    let images = tokio::task::spawn_blocking(images).await??;
    let reference = images.app.as_str();
    ensure!(reference == format!("{APP_IMAGE}:{}", images.version));
    let config = image_config(reference)?;
    ensure!(
        config["User"] == format!("{APP_UID}:{APP_UID}"),
        "{reference} runs as user {}",
        config["User"]
    );
    ensure!(
        config["Entrypoint"] == serde_json::json!(["/usr/local/bin/publish-loop.sh"]),
        "{reference}: entrypoint {}",
        config["Entrypoint"]
    );

    // What `kubectl exec … -- sh` finds.
    let (ok, out, err) = podman(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "sh",
        reference,
        "-c",
        "id -u; id -g; command -v nc; nc -h 2>&1 | head -n 1; \
         test -r /usr/local/bin/nanogate.sh && echo client; \
         sh /usr/local/bin/nanogate.sh publish '{\"by\":\"hand\"}'; echo \"exit $?\"",
    ])?;
    let lines: Vec<&str> = out.lines().collect();
    ensure!(ok && lines.len() == 6, "sh in {reference}: {out}{err}");
    ensure!(
        lines[0] == APP_UID.to_string() && lines[1] == APP_UID.to_string(),
        "sh in {reference} runs as uid {} gid {}",
        lines[0],
        lines[1]
    );
    ensure!(
        lines[2] == "/usr/bin/nc" && lines[3].starts_with("OpenBSD netcat"),
        "{reference}: nc is {} ({})",
        lines[2],
        lines[3]
    );
    ensure!(lines[4] == "client", "{reference} lacks the shell client");
    // No agent here: the shell client says so and exits 1 (its "unreachable").
    ensure!(
        lines[5] == "exit 1"
            && err.contains("cannot talk to nano-agent at /var/lib/tendrl/tendrl_agent.sock"),
        "the shell client without an agent: {out}{err}"
    );

    // The file system: no package manager, no second shell.
    let files = image_files(reference, "app")?;
    let executables: Vec<&str> = files
        .iter()
        .filter(|(mode, _)| mode.starts_with('-') && mode.contains('x'))
        .map(|(_, path)| path.as_str())
        .collect();
    for absent in [
        "usr/bin/apt",
        "usr/bin/dpkg",
        "bin/bash",
        "usr/bin/bash",
        "usr/bin/perl",
    ] {
        ensure!(
            !files.iter().any(|(_, p)| p == absent),
            "{reference} has /{absent}"
        );
    }

    // The loop without a socket: retries, as the kernel's uid 10001, and exits 0 on SIGTERM.
    let container = shipping_container("app-alone", None);
    let mut args = locked_down_run(&container.name);
    args.extend(["--env", "PUBLISH_INTERVAL=1", reference]);
    podman_ok(&args)?;
    nanogate_e2e::wait_for(
        "the app to retry without a socket",
        Duration::from_secs(30),
        || async {
            let log = container_logs(&container.name);
            Ok((log.matches("counter=1 not published, retrying").count() >= 2).then_some(()))
        },
    )
    .await
    .with_context(|| container_logs(&container.name))?;
    let pid = container_state(&container.name, "Pid")?;
    let status = proc_status(&pid)?;
    let field = |name: &str| proc_field(&status, name);
    let ids = format!("{APP_UID} {APP_UID} {APP_UID} {APP_UID}");
    ensure!(
        field("Uid") == ids && field("Gid") == ids,
        "the app runs as uid {:?} gid {:?}",
        field("Uid"),
        field("Gid")
    );
    let (stopped_in, code, log) = stop_container(&container.name)?;
    ensure!(
        code == "0" && log.contains("publish-loop: SIGTERM: 0 messages published, exiting"),
        "the app exited with {code} on SIGTERM; log:\n{log}"
    );
    ensure!(
        stopped_in < Duration::from_secs(10),
        "the app took {stopped_in:?} to stop on SIGTERM"
    );

    let size = image_size(reference)?;
    let base_size = image_size(&base)?;
    let gz = compressed_size(reference)?;
    let gz_base = compressed_size(&base)?;
    progress!(
        "[shipping] {reference}: uid {APP_UID}, sh + OpenBSD nc + the shell client, {} \
         executables; {} ({size} bytes) = base {} + our layers {}; podman save | gzip -9: {} \
         ({gz} bytes) = base {} + ours {}; retries without a socket, exit 0 on SIGTERM in \
         {:.1}s",
        executables.len(),
        mib(size),
        mib(base_size),
        mib(size.saturating_sub(base_size)),
        mib(gz),
        mib(gz_base),
        mib(gz.saturating_sub(gz_base)),
        stopped_in.as_secs_f64()
    );
    ensure!(
        size < 16 * 1024 * 1024,
        "{reference} is {}: the example app should stay small",
        mib(size)
    );
    Ok(())
}

/// The example app's image next to the nano-agent image, as in an injected pod without an
/// fsGroup: the socket volume a bind-mounted directory (0777, as an emptyDir), the agent as the
/// injector runs it (uid 65532), the apps with a restricted pod's settings (read-only root, no
/// capabilities, no-new-privileges, no network: the socket is all they use), one as the
/// image's 10001:10001 and one as an OpenShift-style uid with gid 0. The apps start first (no
/// socket yet: they retry), then the agent; the platform receives each app's counter 1, 2, 3, …
/// without a gap, `podman logs` shows what they published, and SIGTERM ends them with 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_app_image_publishes_through_the_nano_agent_image() -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;

    let images = tokio::task::spawn_blocking(images).await??;
    let app = images.app.as_str();
    let sidecar = injected_sidecar(images.reference("nano-agent"))?;
    let platform = nanogate_tests::platform::PlatformServer::start_with_key("shipping-key").await?;
    let admin_port = nanogate_e2e::free_port()?;
    let dir = std::env::temp_dir().join(format!("nanogate-shipping-app-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
    // Dropped last: removes the agent's container and the directory.
    let agent = shipping_container("app-agent", Some(dir.clone()));
    let run = injected_agent_run(&sidecar, &agent.name, &dir, &platform, admin_port)?;
    let host_socket = run.host_socket(&dir)?;

    // (container, --user, the uid it publishes as)
    let apps: Vec<(Container, Option<&str>, u64)> = vec![
        (shipping_container("app", None), None, APP_UID.into()),
        (
            shipping_container("app-openshift", None),
            Some("1000680000:0"),
            1_000_680_000,
        ),
    ];
    for (container, user, _) in &apps {
        let volume = format!("{}:{}", dir.display(), run.socket_dir);
        let socket_env = format!("TENDRL_SOCKET_PATH={}", run.socket_path);
        let mut args = locked_down_run(&container.name);
        args.extend([
            "--volume",
            &volume,
            "--env",
            &socket_env,
            "--env",
            "PUBLISH_INTERVAL=1",
        ]);
        if let Some(user) = user {
            args.extend(["--user", user]);
        }
        args.push(app);
        podman_ok(&args)?;
    }
    for (container, ..) in &apps {
        nanogate_e2e::wait_for(
            "the app to retry while there is no socket",
            Duration::from_secs(30),
            || async {
                Ok(container_logs(&container.name)
                    .contains("counter=1 not published, retrying")
                    .then_some(()))
            },
        )
        .await
        .with_context(|| container_logs(&container.name))?;
    }

    let args: Vec<&str> = run.args.iter().map(String::as_str).collect();
    podman_ok(&args)?;
    wait_until_agent_ready(&agent.name, &host_socket, admin_port).await?;

    let counters = |uid: u64| -> Vec<u64> {
        let mut found: Vec<u64> = platform
            .received()
            .iter()
            .filter(|m| m["data"]["app"] == "example-app" && m["data"]["uid"] == uid)
            .filter_map(|m| m["data"]["counter"].as_u64())
            .collect();
        found.sort_unstable();
        found
    };
    let delivered = nanogate_e2e::wait_for(
        "the platform to receive counters 1 to 3 of each app",
        Duration::from_secs(60),
        || async {
            Ok(apps
                .iter()
                .all(|(_, _, uid)| counters(*uid).len() >= 3)
                .then_some(()))
        },
    )
    .await;
    if let Err(e) = delivered {
        let logs: Vec<String> = apps
            .iter()
            .map(|(c, ..)| format!("{}:\n{}", c.name, container_logs(&c.name)))
            .collect();
        bail!(
            "{e:#}\nagent log:\n{}\n{}",
            container_logs(&agent.name),
            logs.join("\n")
        );
    }
    for (container, _, uid) in &apps {
        let got = counters(*uid);
        let expected: Vec<u64> = (1..=got.len() as u64).collect();
        ensure!(
            got == expected,
            "uid {uid}: the platform received counters {got:?} (gaps or repeats)"
        );
        let log = container_logs(&container.name);
        ensure!(
            log.contains("publish-loop: published counter=3 (accepted)"),
            "{}: no `published counter=3` line:\n{log}",
            container.name
        );
    }
    for message in platform.received() {
        ensure!(
            message["source"] == "shipping/shop-0"
                && message["context"]["tags"] == serde_json::json!(["example-app"]),
            "unexpected message {message}"
        );
    }
    ensure!(
        platform.unauthorized() == 0,
        "the agent sent a wrong API key"
    );

    let mut summary = Vec::new();
    for (container, _, uid) in &apps {
        let (stopped_in, code, log) = stop_container(&container.name)?;
        ensure!(
            code == "0" && log.contains("publish-loop: SIGTERM: "),
            "{} exited with {code} on SIGTERM; log:\n{log}",
            container.name
        );
        summary.push(format!(
            "uid {uid}: {} messages, stopped in {:.1}s",
            counters(*uid).len(),
            stopped_in.as_secs_f64()
        ));
    }
    podman_ok(&["stop", "--time", "30", &agent.name])?;
    progress!(
        "[shipping] {app} next to the nano-agent image, no fsGroup: retried until the socket \
         appeared, then published without gaps ({}); exit 0 on SIGTERM",
        summary.join("; ")
    );
    Ok(())
}

/// `save_docker_archive`, what a node imports (`ctr -n k8s.io images import`): a docker-archive
/// tar whose manifest names the image by its reference, so `image:` in a pod finds it.
#[test]
fn images_save_as_docker_archives_named_by_reference() -> Result<()> {
    let images = images()?;
    let dir =
        std::env::temp_dir().join(format!("nanogate-shipping-archive-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let file = dir.join("example-app.tar");
    nanogate_e2e::images::save_docker_archive(&images.app, &file)?;
    let out = Command::new("tar")
        .arg("-xOf")
        .arg(&file)
        .arg("manifest.json")
        .output()?;
    let _ = std::fs::remove_dir_all(&dir);
    ensure!(
        out.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        manifest[0]["RepoTags"] == serde_json::json!([images.app]),
        "the archive's manifest: {manifest}"
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
    // The chart's sidecar image is the release's too; the CRD has none (the operator decides).
    ensure!(values["sidecar"]["image"]["repository"] == AGENT_IMAGE);
    ensure!(
        values["sidecar"]["image"]["tag"] == ""
            || values["sidecar"]["image"]["tag"] == version.as_str(),
        "values.yaml sidecar.image.tag must be empty (= appVersion) or {version}"
    );
    for crd in [
        "crds/agentgateway.yaml",
        "charts/nanogate/crds/agentgateway.yaml",
    ] {
        ensure!(
            !read(crd)?.contains(&format!("default: {AGENT_IMAGE}")),
            "{crd}: spec.sidecar.image must have no default (absent = the operator's image)"
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
    // The example app's documented build command tags the image the tests build.
    let app_line = format!("docker build -f {APP_DOCKERFILE} -t {APP_IMAGE}:{version} examples");
    ensure!(
        read(APP_DOCKERFILE)?.lines().any(|l| l.contains(&app_line)),
        "{APP_DOCKERFILE}: no `{app_line}` line"
    );
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
    let out = nanogate_e2e::server_dry_run(kubeconfig, &file_to_apply);
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

//! podman for the tests that build and run nanogate's images (`e2e/tests/shipping.rs`): every
//! command goes through `e2e/scripts/podman.sh`, so tests, `e2e/scripts/base-images.sh` and a
//! person at the shell share one image store (`~/.cache/nanogate/containers`) and the runtime
//! and ulimits these machines need.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use crate::workspace_root;

/// podman on nanogate's own image store, with the runtime and ulimits these machines need.
pub const PODMAN_SCRIPT: &str = "e2e/scripts/podman.sh";

pub fn podman_command(args: &[&str]) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(workspace_root().join(PODMAN_SCRIPT))
        .args(args)
        .current_dir(workspace_root());
    cmd
}

/// Runs podman to completion: (success, stdout, stderr).
pub fn podman(args: &[&str]) -> Result<(bool, String, String)> {
    let out = podman_command(args)
        .output()
        .with_context(|| format!("running {PODMAN_SCRIPT}"))?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Runs podman; its stdout, or an error with what it printed.
pub fn podman_ok(args: &[&str]) -> Result<String> {
    let (ok, stdout, stderr) = podman(args)?;
    ensure!(
        ok,
        "podman {} failed: {}",
        args.join(" "),
        format!("{stdout}{stderr}").trim()
    );
    Ok(stdout)
}

/// `podman <args> | <filter>` through bash with pipefail: the filter's stdout.
pub fn podman_piped(args: &[&str], filter: &str) -> Result<String> {
    let script = format!("set -o pipefail; bash \"$0\" \"$@\" | {filter}");
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .arg(workspace_root().join(PODMAN_SCRIPT))
        .args(args)
        .current_dir(workspace_root())
        .output()
        .context("running bash")?;
    ensure!(
        out.status.success(),
        "podman {} | {filter} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `podman image inspect --format '{{json .Config}}'`.
pub fn image_config(reference: &str) -> Result<Value> {
    let config = podman_ok(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config}}",
        reference,
    ])?;
    serde_json::from_str(&config).with_context(|| format!("config of {reference}: {config}"))
}

/// The program an image's exec-form ENTRYPOINT starts.
pub fn entrypoint(reference: &str) -> Result<String> {
    let config = image_config(reference)?;
    Ok(config["Entrypoint"][0]
        .as_str()
        .with_context(|| format!("{reference} has no exec-form entrypoint: {config}"))?
        .to_string())
}

pub fn image_size(reference: &str) -> Result<u64> {
    let size = podman_ok(&["image", "inspect", "--format", "{{.Size}}", reference])?;
    size.trim()
        .parse()
        .with_context(|| format!("size of {reference}: {size:?}"))
}

/// Bytes of `podman save <image> | gzip -9`: about what a registry stores and a node pulls.
pub fn compressed_size(reference: &str) -> Result<u64> {
    let bytes = podman_piped(&["save", reference], "gzip -9 | wc -c")?;
    bytes
        .trim()
        .parse()
        .with_context(|| format!("gzip size of {reference}: {bytes:?}"))
}

/// A container removed (with its directory, if any) when dropped.
pub struct Container {
    pub name: String,
    pub dir: Option<PathBuf>,
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "--force", "--time", "0", &self.name]);
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The bytes of `path` in `image` (`podman create` + `podman cp`).
pub fn copy_out(image: &str, path: &str) -> Result<Vec<u8>> {
    let container = Container {
        name: format!(
            "nanogate-shipping-copy-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ),
        dir: None,
    };
    podman_ok(&["create", "--name", &container.name, image])?;
    let local = std::env::temp_dir().join(&container.name);
    podman_ok(&[
        "cp",
        &format!("{}:{path}", container.name),
        &local.display().to_string(),
    ])?;
    let bytes = std::fs::read(&local);
    let _ = std::fs::remove_file(&local);
    bytes.with_context(|| format!("{path} of {image}"))
}

/// The paths and modes of an image's file system (`podman export | tar -tv`).
pub fn image_files(reference: &str, name: &str) -> Result<Vec<(String, String)>> {
    let container = Container {
        name: format!("nanogate-shipping-files-{}-{name}", std::process::id()),
        dir: None,
    };
    podman_ok(&["create", "--name", &container.name, reference])?;
    let listing = podman_piped(&["export", &container.name], "tar -tv --numeric-owner")?;
    let mut files = Vec::new();
    for line in listing.lines() {
        // -rwxr-xr-x 0/0 6912345 2026-11-22 10:00 usr/local/bin/nano-agent
        let fields: Vec<&str> = line.split_whitespace().collect();
        ensure!(fields.len() >= 6, "unexpected tar listing line {line:?}");
        let path = fields[5..].join(" ");
        let path = path.split(" -> ").next().unwrap_or_default();
        files.push((
            fields[0].to_string(),
            path.trim_start_matches("./").to_string(),
        ));
    }
    Ok(files)
}

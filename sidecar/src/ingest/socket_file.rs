//! The app socket's file: created with its directories and modes, a stale one from a previous
//! run replaced, one a live agent serves refused, removed when the agent exits.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use tokio::net::UnixListener;

/// Socket file mode: any identity may connect. The boundary is the directory: the socket lives
/// on the pod's own volume, mounted only into that pod's containers (which share the pod's
/// loopback, where the optional TCP listener is, anyway). App containers run as any uid, often
/// without a group in common with the sidecar (restricted pods, `runAsUser` without
/// `fsGroup`), and the alternative, an `fsGroup` added by the injector, would re-own every volume
/// of the pod and is range-restricted by OpenShift-style policies.
pub const SOCKET_MODE: u32 = 0o666;

/// Mode of the directories [`bind`] creates on the way to the socket, whatever the umask: apps
/// must be able to reach the socket; only the agent may add or remove files there.
pub const SOCKET_DIR_MODE: u32 = 0o755;

/// Binds the socket at `path`: creates the missing directories (mode 0755), replaces a stale
/// socket left by a previous run, refuses to steal one a live agent still serves, sets mode
/// 0666 (see [`SOCKET_MODE`]).
pub fn bind(path: &Path) -> anyhow::Result<(UnixListener, SocketFile)> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        let missing: Vec<&Path> = parent
            .ancestors()
            .take_while(|dir| !dir.as_os_str().is_empty() && !dir.exists())
            .collect();
        fs::create_dir_all(parent).with_context(|| {
            format!("socket_path: cannot create directory {}", parent.display())
        })?;
        for dir in missing.iter().rev() {
            fs::set_permissions(dir, fs::Permissions::from_mode(SOCKET_DIR_MODE))
                .with_context(|| format!("socket_path: cannot chmod {}", dir.display()))?;
        }
    }
    match fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "socket_path {}: another agent is listening on it; stop it or choose another path",
                    path.display()
                );
            }
            fs::remove_file(path).with_context(|| {
                format!("socket_path: cannot remove stale socket {}", path.display())
            })?;
            tracing::info!(path = %path.display(), "replaced a stale socket from a previous run");
        }
        Ok(_) => bail!(
            "socket_path {} exists and is not a socket; remove it or choose another path",
            path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => bail!("socket_path {}: {e}", path.display()),
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("socket_path: cannot bind {}", path.display()))?;
    let file = SocketFile(path.to_owned());
    fs::set_permissions(path, fs::Permissions::from_mode(SOCKET_MODE))
        .with_context(|| format!("socket_path: cannot chmod {}", path.display()))?;
    Ok((listener, file))
}

/// Removes the socket file when dropped (on every exit path of the agent).
#[derive(Debug)]
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

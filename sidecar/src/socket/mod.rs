//! The app-facing Unix socket (ARCHITECTURE §3).

pub mod empty_check;
pub mod server;

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use tokio::net::UnixListener;

/// Socket file mode: apps in the pod share the volume; nobody else should write.
pub const SOCKET_MODE: u32 = 0o660;

/// Binds the socket at `path`: creates the directory, replaces a stale socket left by a
/// previous run, refuses to steal one a live agent still serves, sets mode 0660.
pub fn bind(path: &Path) -> anyhow::Result<(UnixListener, SocketFile)> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).with_context(|| {
            format!("socket_path: cannot create directory {}", parent.display())
        })?;
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

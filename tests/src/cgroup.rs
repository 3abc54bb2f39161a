//! A memory-limited cgroup (v1) for running a process under a container's memory limit, as a
//! pod's would be — without a container runtime. The group is made inside the test process's
//! own memory cgroup, so it never touches the rest of the machine.

use std::path::{Path, PathBuf};

/// A memory cgroup with a limit; removed on drop (after its processes have exited).
pub struct MemoryCgroup {
    dir: PathBuf,
}

impl MemoryCgroup {
    /// Makes a cgroup limited to `limit_bytes`, or says why it cannot (not root, no cgroup v1
    /// memory controller mounted).
    pub fn create(name: &str, limit_bytes: u64) -> Result<MemoryCgroup, String> {
        let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
        let path = own
            .lines()
            .find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                controllers
                    .split(',')
                    .any(|c| c == "memory")
                    .then_some(path)
            })
            .ok_or("no cgroup v1 memory controller in /proc/self/cgroup")?;
        let root = Path::new("/sys/fs/cgroup/memory");
        let dir = root
            .join(path.trim_start_matches('/'))
            .join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        let cg = MemoryCgroup { dir };
        cg.write("memory.limit_in_bytes", &limit_bytes.to_string())?;
        Ok(cg)
    }

    /// Moves process `pid` into the group.
    pub fn add(&self, pid: u32) -> Result<(), String> {
        self.write("cgroup.procs", &pid.to_string())
    }

    /// Highest memory use the group has seen, in bytes.
    pub fn peak_bytes(&self) -> Option<u64> {
        self.read_u64("memory.max_usage_in_bytes")
    }

    /// How many processes of the group the kernel's OOM killer killed (0 when the kernel does
    /// not report it).
    pub fn oom_kills(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("memory.oom_control"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
            .unwrap_or(0)
    }

    fn read_u64(&self, file: &str) -> Option<u64> {
        std::fs::read_to_string(self.dir.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn write(&self, file: &str, value: &str) -> Result<(), String> {
        std::fs::write(self.dir.join(file), value)
            .map_err(|e| format!("writing {value} to {}/{file}: {e}", self.dir.display()))
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

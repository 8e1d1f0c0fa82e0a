//! What machine a report was measured on.

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub hostname: String,
    pub kernel: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub memory_bytes: u64,
    /// File system of the benchmarked path (ext4, xfs, tmpfs...), if a path was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fs_type: Option<String>,
}

impl Machine {
    pub fn probe(path: Option<&std::path::Path>) -> Machine {
        let uname = nix::sys::utsname::uname().ok();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_bytes = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024);
        Machine {
            hostname: uname
                .as_ref()
                .map_or("unknown".into(), |u| u.nodename().to_string_lossy().into_owned()),
            kernel: uname
                .as_ref()
                .map_or("unknown".into(), |u| u.release().to_string_lossy().into_owned()),
            cpu_model,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_bytes,
            fs_type: path.and_then(fs_type),
        }
    }
}

/// The file system type of `path` (its directory if it does not exist yet).
fn fs_type(path: &std::path::Path) -> Option<String> {
    let probe = if path.exists() { path.to_path_buf() } else { path.parent()?.to_path_buf() };
    let probe = if probe.as_os_str().is_empty() { std::path::PathBuf::from(".") } else { probe };
    let canonical = std::fs::canonicalize(&probe).ok()?;
    // The longest mount point that prefixes the path names its file system.
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, mnt, fs) = (f.next()?, f.next()?, f.next()?);
            canonical.starts_with(mnt).then(|| (mnt.len(), fs.to_string()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, fs)| fs)
}

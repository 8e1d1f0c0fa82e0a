//! How a user names a device: a path (file or block device, opened with io_uring) or
//! `nvme://PCI-ADDRESS/NAMESPACE` (a controller driven from userspace over VFIO), and
//! the checks that say what is missing before a VFIO controller can be used.

use std::path::{Path, PathBuf};

/// A device as given on a command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// A regular file or a block device.
    Path(PathBuf),
    /// A namespace of an NVMe controller over VFIO.
    Nvme(NvmeSpec),
}

/// `nvme://0000:00:03.0/1`: PCI address (domain optional) and namespace id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmeSpec {
    /// Full PCI address with domain, e.g. `0000:00:03.0`.
    pub addr: String,
    pub nsid: u32,
}

impl std::fmt::Display for NvmeSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "nvme://{}/{}", self.addr, self.nsid)
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Path(p) => write!(f, "{}", p.display()),
            DeviceSpec::Nvme(n) => n.fmt(f),
        }
    }
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<DeviceSpec, String> {
        match s.strip_prefix("nvme://") {
            Some(rest) => rest.parse().map(DeviceSpec::Nvme),
            None if s.is_empty() => Err("empty device name".into()),
            None => Ok(DeviceSpec::Path(PathBuf::from(s))),
        }
    }
}

impl std::str::FromStr for NvmeSpec {
    type Err = String;
    /// Parses `ADDR/NSID` (the part after `nvme://`); `ADDR` is `[DDDD:]BB:SS.F` in hex.
    fn from_str(s: &str) -> Result<NvmeSpec, String> {
        let usage =
            || format!("nvme://{s}: expected nvme://DDDD:BB:SS.F/NSID, e.g. nvme://0000:00:03.0/1");
        let (addr, ns) = s.split_once('/').ok_or_else(usage)?;
        let nsid: u32 = ns.parse().map_err(|_| usage())?;
        if nsid == 0 || nsid == u32::MAX {
            return Err(format!("nvme://{s}: namespace ids start at 1"));
        }
        let parts: Vec<&str> = addr.split(':').collect();
        let (dom, bus, devfn) = match parts.as_slice() {
            [d, b, sf] => (*d, *b, *sf),
            [b, sf] => ("0000", *b, *sf),
            _ => return Err(usage()),
        };
        let (slot, func) = devfn.split_once('.').ok_or_else(usage)?;
        let hex = |x: &str, max: u32| {
            u32::from_str_radix(x, 16).ok().filter(|v| *v <= max && !x.is_empty())
        };
        let (Some(d), Some(b), Some(sl), Some(f)) =
            (hex(dom, 0xffff), hex(bus, 0xff), hex(slot, 0x1f), hex(func, 7))
        else {
            return Err(usage());
        };
        Ok(NvmeSpec { addr: format!("{d:04x}:{b:02x}:{sl:02x}.{f:x}"), nsid })
    }
}

/// Locked memory a non-root user needs at least (queues and the store's buffers).
const MIN_MEMLOCK_BYTES: u64 = 256 << 20;

/// What the checks found on a usable controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preflight {
    pub group: String,
}

/// Checks, before touching VFIO, that the controller can be used, and says what to do
/// when not. `hugepages`: the caller wants DMA memory from hugepages.
pub fn preflight(spec: &NvmeSpec, hugepages: bool) -> Result<Preflight, String> {
    preflight_at(Path::new("/"), spec, hugepages)
}

/// The last component of the symlink at `path` (a sysfs driver or group), if any.
fn link_name(path: &Path) -> Option<String> {
    let target = std::fs::read_link(path).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// [`preflight`] against a file system root (tests use a fake sysfs).
pub fn preflight_at(root: &Path, spec: &NvmeSpec, hugepages: bool) -> Result<Preflight, String> {
    let a = &spec.addr;
    let dev = root.join("sys/bus/pci/devices").join(a);
    if !dev.exists() {
        return Err(format!("{spec}: no PCI device {a} (see `lspci -D`)"));
    }
    let class = std::fs::read_to_string(dev.join("class")).unwrap_or_default();
    if class.trim() != "0x010802" {
        return Err(format!(
            "{spec}: {a} is not an NVMe controller (PCI class {}, want 0x010802)",
            class.trim()
        ));
    }
    let driver = link_name(&dev.join("driver"));
    let group = link_name(&dev.join("iommu_group"));
    let Some(group) = group else {
        return Err(format!(
            "{spec}: {a} has no IOMMU group: turn the IOMMU on (kernel command line \
             intel_iommu=on or amd_iommu=on, and iommu=pt), see docs/bare-metal.md"
        ));
    };
    if driver.as_deref() != Some("vfio-pci") {
        let now = driver.map_or("no driver".to_string(), |d| format!("the {d} driver"));
        return Err(format!(
            "{spec}: {a} is bound to {now}, not vfio-pci. Bind it (this detaches it from \
             the kernel; unmount anything on it first):\n  modprobe vfio-pci\n  \
             echo vfio-pci > /sys/bus/pci/devices/{a}/driver_override\n  \
             echo {a} > /sys/bus/pci/devices/{a}/driver/unbind\n  \
             echo {a} > /sys/bus/pci/drivers_probe"
        ));
    }
    let gdevs = root.join("sys/kernel/iommu_groups").join(&group).join("devices");
    if let Ok(rd) = std::fs::read_dir(&gdevs) {
        for e in rd.flatten() {
            let other = e.file_name().to_string_lossy().into_owned();
            if &other == a {
                continue;
            }
            let d = link_name(&e.path().join("driver"));
            if let Some(d) = d
                && d != "vfio-pci"
                && d != "pcieport"
            {
                return Err(format!(
                    "{spec}: IOMMU group {group} also holds {other} (bound to {d}): every \
                     device of a group must be bound to vfio-pci or to no driver"
                ));
            }
        }
    }
    for node in [root.join("dev/vfio/vfio"), root.join("dev/vfio").join(&group)] {
        if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(&node) {
            let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
                format!("run as root, or give this user the device: chown USER {}", node.display())
            } else {
                "is vfio-pci loaded and the device bound to it?".to_string()
            };
            return Err(format!("{spec}: cannot open {}: {e}; {hint}", node.display()));
        }
    }
    // The IOMMU pins what it maps, against the locked-memory limit (root has none).
    // SAFETY: geteuid has no preconditions and cannot fail.
    let is_root = unsafe { libc::geteuid() } == 0;
    if !is_root
        && let Ok((soft, _)) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK)
        && soft < MIN_MEMLOCK_BYTES
    {
        return Err(format!(
            "{spec}: the locked-memory limit is {} KiB; DMA mappings pin memory and need more: \
             `ulimit -l unlimited`, or LimitMEMLOCK=infinity in the systemd unit",
            soft / 1024
        ));
    }
    if hugepages {
        let meminfo = std::fs::read_to_string(root.join("proc/meminfo")).unwrap_or_default();
        let free = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("HugePages_Free:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if free == 0 {
            return Err(format!(
                "{spec}: no free 2 MiB hugepages for DMA memory: reserve some with \
                 `echo 512 > /proc/sys/vm/nr_hugepages` (or pass --no-hugepages)"
            ));
        }
    }
    Ok(Preflight { group })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn specs_parse() {
        let s: DeviceSpec = "nvme://0000:00:03.0/1".parse().unwrap();
        assert_eq!(s, DeviceSpec::Nvme(NvmeSpec { addr: "0000:00:03.0".into(), nsid: 1 }));
        let s: DeviceSpec = "nvme://5:0A:1f.7/2".parse().unwrap();
        assert_eq!(s.to_string(), "nvme://0005:0a:1f.7/2");
        assert_eq!(
            "/var/tmp/dev".parse::<DeviceSpec>().unwrap(),
            DeviceSpec::Path("/var/tmp/dev".into())
        );
        for bad in [
            "nvme://0000:00:03.0",
            "nvme://0000:00:03.0/0",
            "nvme://00:03/1",
            "nvme://0000:00:20.0/1",
            "nvme://0000:00:03.8/1",
            "nvme://x:00:03.0/1",
            "nvme:///1",
            "",
        ] {
            assert!(bad.parse::<DeviceSpec>().is_err(), "{bad} must not parse");
        }
    }

    fn fake(root: &Path, class: &str, driver: Option<&str>, group: Option<&str>) {
        let d = root.join("sys/bus/pci/devices/0000:00:03.0");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("class"), format!("{class}\n")).unwrap();
        if let Some(drv) = driver {
            let p = root.join("sys/bus/pci/drivers").join(drv);
            std::fs::create_dir_all(&p).unwrap();
            symlink(&p, d.join("driver")).unwrap();
        }
        if let Some(g) = group {
            let p = root.join("sys/kernel/iommu_groups").join(g);
            std::fs::create_dir_all(p.join("devices")).unwrap();
            symlink(&p, d.join("iommu_group")).unwrap();
            std::fs::create_dir_all(root.join("dev/vfio")).unwrap();
        }
    }

    #[test]
    fn preflight_says_what_is_missing() {
        let spec = NvmeSpec { addr: "0000:00:03.0".into(), nsid: 1 };
        let t = tempfile::tempdir().unwrap();
        let e = preflight_at(t.path(), &spec, false).unwrap_err();
        assert!(e.contains("no PCI device"), "{e}");

        let t = tempfile::tempdir().unwrap();
        fake(t.path(), "0x020000", None, None);
        let e = preflight_at(t.path(), &spec, false).unwrap_err();
        assert!(e.contains("not an NVMe controller"), "{e}");

        let t = tempfile::tempdir().unwrap();
        fake(t.path(), "0x010802", Some("nvme"), None);
        let e = preflight_at(t.path(), &spec, false).unwrap_err();
        assert!(e.contains("no IOMMU group") && e.contains("intel_iommu=on"), "{e}");

        let t = tempfile::tempdir().unwrap();
        fake(t.path(), "0x010802", Some("nvme"), Some("7"));
        let e = preflight_at(t.path(), &spec, false).unwrap_err();
        assert!(e.contains("bound to the nvme driver") && e.contains("driver_override"), "{e}");

        let t = tempfile::tempdir().unwrap();
        fake(t.path(), "0x010802", Some("vfio-pci"), Some("7"));
        let e = preflight_at(t.path(), &spec, false).unwrap_err();
        assert!(e.contains("/dev/vfio/vfio"), "{e}");

        std::fs::write(t.path().join("dev/vfio/vfio"), "").unwrap();
        std::fs::write(t.path().join("dev/vfio/7"), "").unwrap();
        assert_eq!(preflight_at(t.path(), &spec, false).unwrap().group, "7");
        std::fs::create_dir_all(t.path().join("proc")).unwrap();
        std::fs::write(t.path().join("proc/meminfo"), "HugePages_Total: 0\nHugePages_Free: 0\n")
            .unwrap();
        let e = preflight_at(t.path(), &spec, true).unwrap_err();
        assert!(e.contains("hugepages") && e.contains("nr_hugepages"), "{e}");
        std::fs::write(t.path().join("proc/meminfo"), "HugePages_Free:      12\n").unwrap();
        assert!(preflight_at(t.path(), &spec, true).is_ok());
    }
}

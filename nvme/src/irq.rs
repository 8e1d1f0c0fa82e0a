//! Which CPUs take a device's completion interrupts.
//!
//! A reactor polling a queue pair does best on the CPU that services that queue's
//! interrupt: the completion is posted on the CPU that will reap it, with no
//! cross-CPU wakeup. (Measured on the 2-CPU development VM: 4 KiB random writes at QD32
//! ran at ~85K IOPS with the reactor on the other CPU and ~100K on the interrupt's CPU;
//! see docs/benchmarks.md.) This module finds those CPUs from sysfs so tools can pin
//! reactors accordingly; bare-metal deployments set IRQ affinity instead.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// The CPUs that service the busiest interrupt of the PCI device behind `path` (a block
/// device or a file on one). `None` if that cannot be determined.
pub fn interrupt_cpus(path: &Path) -> Option<Vec<usize>> {
    let md = std::fs::metadata(path).ok()?;
    let dev = if md.file_type().is_block_device() { md.rdev() } else { md.dev() };
    let sys =
        std::fs::canonicalize(format!("/sys/dev/block/{}:{}", libc::major(dev), libc::minor(dev)))
            .ok()?;
    let pci = sys.ancestors().find(|p| p.join("msi_irqs").is_dir())?;
    let irqs = list_irqs(pci)?;
    let counts = interrupt_counts();
    let busiest = irqs
        .iter()
        .max_by_key(|irq| counts.iter().find(|(n, _)| n == *irq).map_or(0, |(_, c)| *c))?;
    let cpus =
        std::fs::read_to_string(format!("/proc/irq/{busiest}/effective_affinity_list")).ok()?;
    let cpus = parse_cpu_list(cpus.trim());
    (!cpus.is_empty()).then_some(cpus)
}

fn list_irqs(pci: &Path) -> Option<Vec<u32>> {
    let mut v: Vec<u32> = std::fs::read_dir(pci.join("msi_irqs"))
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    v.sort_unstable();
    Some(v)
}

/// (irq, total count over all CPUs) from /proc/interrupts.
fn interrupt_counts() -> Vec<(u32, u64)> {
    let text = std::fs::read_to_string("/proc/interrupts").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let irq: u32 = f.next()?.trim_end_matches(':').parse().ok()?;
            let total = f.map_while(|x| x.parse::<u64>().ok()).sum();
            Some((irq, total))
        })
        .collect()
}

/// Parses a kernel CPU list such as `0-3,8,10-11`.
pub fn parse_cpu_list(s: &str) -> Vec<usize> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.trim().parse::<usize>(), b.trim().parse::<usize>()) {
                    out.extend(a..=b);
                }
            }
            None => {
                if let Ok(a) = part.trim().parse() {
                    out.push(a);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_cpu_list("0-3,8,10-11"), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(parse_cpu_list("1"), vec![1]);
        assert_eq!(parse_cpu_list(""), Vec::<usize>::new());
        assert_eq!(parse_cpu_list("x,2"), vec![2]);
    }

    #[test]
    fn lookup_never_panics() {
        // On a machine without PCI-backed storage this may be None; it must not panic.
        let _ = interrupt_cpus(Path::new("/"));
        let _ = interrupt_cpus(Path::new("/nonexistent"));
    }
}

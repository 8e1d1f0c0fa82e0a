//! Opening whatever device the user named: a file or block device (io_uring) or an NVMe
//! namespace over VFIO, as one [`AnyDevice`] type the store and the tools can hold.

use std::fs::File;
use std::os::fd::BorrowedFd;
use std::sync::Arc;

use crate::command::IoCommand;
use crate::device::{BlockDevice, Completion, DeviceInfo};
use crate::dma::{DmaBuf, DmaPool};
use crate::error::{IoError, SubmitError};
use crate::pcie::{Controller, NvmeDevice};
use crate::spec::DeviceSpec;
use crate::uring::{UringDevice, UringOptions, open_file};

/// One queue pair of either backend. Static dispatch: a `match` per call.
// One per core for the life of the process: the size difference does not matter, a box
// would add an indirection to every call.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum AnyDevice {
    Uring(UringDevice),
    Nvme(NvmeDevice),
}

macro_rules! each {
    ($self:expr, $d:ident => $e:expr) => {
        match $self {
            AnyDevice::Uring($d) => $e,
            AnyDevice::Nvme($d) => $e,
        }
    };
}

impl BlockDevice for AnyDevice {
    fn info(&self) -> &DeviceInfo {
        each!(self, d => d.info())
    }
    fn submit(&mut self, cmd: IoCommand, buf: Option<DmaBuf>, tag: u64) -> Result<(), SubmitError> {
        each!(self, d => d.submit(cmd, buf, tag))
    }
    fn kick(&mut self) -> Result<(), IoError> {
        each!(self, d => d.kick())
    }
    fn poll(&mut self, max: usize, sink: &mut dyn FnMut(Completion)) -> usize {
        each!(self, d => d.poll(max, sink))
    }
    fn in_flight(&self) -> usize {
        each!(self, d => d.in_flight())
    }
    fn park_fd(&self) -> Option<BorrowedFd<'_>> {
        each!(self, d => d.park_fd())
    }
    fn prepare_park(&mut self) -> bool {
        each!(self, d => d.prepare_park())
    }
    fn after_park(&mut self) {
        each!(self, d => d.after_park())
    }
}

/// How to open queue pairs on a device.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// Files: O_DIRECT (the default). Ignored for NVMe (always direct).
    pub direct: bool,
    /// NVMe: DMA memory from 2 MiB hugepages (the default on bare metal).
    pub hugepages: bool,
    /// NVMe: queue pairs to ask the controller for.
    pub nvme_queues: u16,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions { direct: true, hugepages: true, nvme_queues: 8 }
    }
}

/// An opened device from which each core takes its own queue pair.
#[derive(Debug)]
pub enum Opener {
    File { file: Arc<File>, size: u64, name: String, direct: bool },
    Nvme { ctrl: Arc<Controller>, nsid: u32 },
}

impl Opener {
    /// Opens the device `spec` names. For NVMe this brings the controller up (once).
    pub fn open(spec: &DeviceSpec, opts: &DeviceOptions) -> Result<Opener, String> {
        match spec {
            DeviceSpec::Path(p) => {
                let (file, size) = open_file(p, opts.direct).map_err(|e| e.to_string())?;
                Ok(Opener::File {
                    file: Arc::new(file),
                    size,
                    name: p.display().to_string(),
                    direct: opts.direct,
                })
            }
            DeviceSpec::Nvme(n) => open_nvme(n, opts),
        }
    }

    /// A new queue pair of `depth` commands (NVMe: as far as the controller's MQES
    /// allows) whose buffers from `pools` need no per-command setup.
    pub fn queue_pair(&self, depth: usize, pools: Vec<DmaPool>) -> Result<AnyDevice, String> {
        match self {
            Opener::File { file, size, name, direct } => UringDevice::open_shared(
                Arc::clone(file),
                *size,
                name.clone(),
                UringOptions {
                    queue_depth: depth,
                    direct: *direct,
                    fixed_pools: pools,
                    ..Default::default()
                },
            )
            .map(AnyDevice::Uring)
            .map_err(|e| e.to_string()),
            Opener::Nvme { ctrl, nsid } => ctrl
                .queue_pair_with_depth(*nsid, depth, &pools)
                .map(AnyDevice::Nvme)
                .map_err(|e| format!("{}/{nsid}: {e}", ctrl.name())),
        }
    }

    /// Size of the device in bytes.
    pub fn size_bytes(&self) -> u64 {
        match self {
            Opener::File { size, .. } => *size,
            Opener::Nvme { ctrl, nsid } => ctrl
                .info()
                .namespaces
                .iter()
                .find(|n| n.nsid == *nsid)
                .map_or(0, |n| n.size_bytes()),
        }
    }
}

#[cfg(feature = "vfio")]
fn open_nvme(n: &crate::spec::NvmeSpec, opts: &DeviceOptions) -> Result<Opener, String> {
    let o = crate::pcie::Options {
        io_queues: opts.nvme_queues,
        hugepages: opts.hugepages,
        ..Default::default()
    };
    let ctrl = crate::vfio::open(n, o).map_err(|e| e.to_string())?;
    if !ctrl.info().namespaces.iter().any(|ns| ns.nsid == n.nsid) {
        let active: Vec<u32> = ctrl.info().namespaces.iter().map(|ns| ns.nsid).collect();
        return Err(format!("{n}: no namespace {} (active: {active:?})", n.nsid));
    }
    Ok(Opener::Nvme { ctrl, nsid: n.nsid })
}

#[cfg(not(feature = "vfio"))]
fn open_nvme(n: &crate::spec::NvmeSpec, _opts: &DeviceOptions) -> Result<Opener, String> {
    Err(format!("{n}: this build has no VFIO NVMe driver (build with the cargo feature `vfio`)"))
}

/// Opens one queue pair on `spec` (tools: mkfs, fsck, benchmarks).
pub fn open_device(
    spec: &DeviceSpec,
    depth: usize,
    opts: &DeviceOptions,
) -> Result<AnyDevice, String> {
    Opener::open(spec, opts)?.queue_pair(depth, Vec::new())
}

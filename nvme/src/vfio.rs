//! NVMe controllers over VFIO: the bare-metal device path (cargo feature `vfio`).
//!
//! [`open`] checks that the PCI function can be used (and says what is missing when it
//! cannot: no IOMMU group, not bound to vfio-pci, permissions, hugepages), opens the
//! VFIO container, group and device (rust-vmm `vfio-ioctls`), maps BAR0, enables bus
//! mastering and hands BAR0 ([`Bar0`], the one type that touches it) and the IOMMU
//! ([`VfioIommu`]) to the driver in [`crate::pcie`]. Each core then takes its own queue
//! pair with [`Controller::queue_pair`](crate::pcie::Controller::queue_pair):
//! a [`VfioNvmeDevice`].

#[cfg(not(target_arch = "x86_64"))]
compile_error!(
    "the VFIO NVMe driver orders DMA memory and doorbells with x86-64 semantics \
     (fences are not device barriers elsewhere)"
);

use std::path::PathBuf;
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    VFIO_BASE, VFIO_IOMMU_INFO_CAPS, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
    VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_TYPE,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps};

use crate::pcie::{Controller, DmaMapper, MapError, NvmeDevice, Options, Regs};
use crate::spec::{NvmeSpec, preflight};

/// A queue pair of an NVMe controller driven over VFIO.
pub type VfioNvmeDevice = NvmeDevice;

/// Why a VFIO controller could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{0}")]
    Preflight(String),
    #[error("{addr}: VFIO: {source}")]
    Vfio { addr: String, source: vfio_ioctls::VfioError },
    #[error("{addr}: {why}")]
    Device { addr: String, why: String },
    #[error("{addr}: {source}")]
    Init { addr: String, source: crate::pcie::InitError },
}

/// BAR0 of the controller, mapped into this process. Every register access of the
/// driver goes through here: 32-bit volatile loads and stores, bounds-checked.
pub struct Bar0 {
    ptr: *mut u8,
    len: usize,
    // Keeps the device (and with it the group and container) open while mapped; also
    // reaches its PCI configuration space.
    device: VfioDevice,
}

// SAFETY: MMIO registers may be accessed from any thread; each access is one volatile
// 32-bit operation, and the driver coordinates which thread writes which register.
unsafe impl Send for Bar0 {}
// SAFETY: as above.
unsafe impl Sync for Bar0 {}

impl std::fmt::Debug for Bar0 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bar0").field("len", &self.len).finish()
    }
}

impl Bar0 {
    fn at(&self, offset: usize) -> *mut u32 {
        assert!(
            offset.is_multiple_of(4) && offset + 4 <= self.len,
            "register access at {offset:#x} outside BAR0 ({:#x} bytes)",
            self.len
        );
        // SAFETY: offset + 4 <= len, inside the mapping.
        unsafe { self.ptr.add(offset).cast::<u32>() }
    }
}

impl Regs for Bar0 {
    fn bar_bytes(&self) -> usize {
        self.len
    }

    fn stop_dma(&self) -> bool {
        // Bus Master Enable off in the PCI command register: the function can no
        // longer start DMA, whatever its controller state.
        set_pci_command(&self.device, pci_command(&self.device) & !PCI_COMMAND_MASTER);
        pci_command(&self.device) & PCI_COMMAND_MASTER == 0
    }

    fn read32(&self, offset: usize) -> u32 {
        // SAFETY: an aligned address inside the mapped BAR.
        unsafe { std::ptr::read_volatile(self.at(offset)) }
    }

    fn write32(&self, offset: usize, value: u32) {
        // SAFETY: an aligned address inside the mapped BAR.
        unsafe { std::ptr::write_volatile(self.at(offset), value) }
    }
}

impl Drop for Bar0 {
    fn drop(&mut self) {
        // SAFETY: ptr/len are the mapping made in `open`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// PCI command register bits: memory space, bus master.
const PCI_COMMAND_MEMORY: u16 = 0x2;
const PCI_COMMAND_MASTER: u16 = 0x4;

/// The PCI command register (configuration space offset 4).
fn pci_command(device: &VfioDevice) -> u16 {
    let mut cmd = [0u8; 2];
    device.region_read(VFIO_PCI_CONFIG_REGION_INDEX, &mut cmd, 4);
    u16::from_le_bytes(cmd)
}

fn set_pci_command(device: &VfioDevice, value: u16) {
    device.region_write(VFIO_PCI_CONFIG_REGION_INDEX, &value.to_le_bytes(), 4);
}

/// The VFIO container's IOMMU (type1).
pub struct VfioIommu {
    container: Arc<VfioContainer>,
}

impl std::fmt::Debug for VfioIommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VfioIommu")
    }
}

impl DmaMapper for VfioIommu {
    unsafe fn map(&self, va: *mut u8, len: usize, iova: u64) -> Result<(), MapError> {
        // SAFETY: our caller upholds DmaMapper::map's contract, which is vfio_dma_map's.
        unsafe { self.container.vfio_dma_map(iova, len, va) }.map_err(|e| MapError {
            iova,
            len,
            why: e.to_string(),
        })
    }

    fn unmap(&self, iova: u64, len: usize) -> Result<(), MapError> {
        self.container.vfio_dma_unmap(iova, len).map_err(|e| MapError {
            iova,
            len,
            why: e.to_string(),
        })
    }

    fn iova_ranges(&self) -> Vec<(u64, u64)> {
        use std::os::fd::AsRawFd;
        match query_iova_ranges(self.container.as_raw_fd()) {
            Some(r) if !r.is_empty() => {
                log::info!(
                    "IOMMU usable IOVA ranges: {}",
                    r.iter()
                        .map(|(s, e)| format!("{s:#x}-{:#x}", e - 1))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                r
            }
            _ => {
                log::info!(
                    "the IOMMU reports no IOVA ranges; avoiding the x86 MSI window, below 2^39"
                );
                crate::pcie::iova::default_ranges()
            }
        }
    }
}

/// VFIO_IOMMU_GET_INFO's IOVA range capability: `[start, end)` ranges the IOMMU accepts
/// (reserved regions such as the MSI window excluded). `None` if the kernel has none.
fn query_iova_ranges(fd: std::os::fd::RawFd) -> Option<Vec<(u64, u64)>> {
    // _IO(VFIO_TYPE, VFIO_BASE + 12)
    const GET_INFO: libc::c_ulong =
        ((VFIO_TYPE as libc::c_ulong) << 8) | (VFIO_BASE + 12) as libc::c_ulong;
    const HEADER: usize = 24; // argsz, flags, iova_pgsizes, cap_offset, pad
    let call = |buf: &mut Vec<u64>, argsz: u32| -> Option<()> {
        buf.iter_mut().for_each(|w| *w = 0);
        buf[0] = u64::from(argsz);
        // SAFETY: buf holds argsz bytes (8-aligned) for the kernel to fill; GET_INFO reads
        // argsz and writes at most that many bytes.
        let r = unsafe { libc::ioctl(fd, GET_INFO, buf.as_mut_ptr()) };
        (r == 0).then_some(())
    };
    let mut buf = vec![0u64; HEADER / 8];
    call(&mut buf, HEADER as u32)?;
    let flags = (buf[0] >> 32) as u32;
    let want = buf[0] as u32 as usize;
    if flags & VFIO_IOMMU_INFO_CAPS == 0 || want <= HEADER || want > 1 << 20 {
        return None;
    }
    let mut buf = vec![0u64; want.div_ceil(8)];
    call(&mut buf, want as u32)?;
    let bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_le_bytes()).collect();
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
    let mut off = u32_at(16) as usize;
    let mut hops = 0;
    while off != 0 && off + 16 <= bytes.len() && hops < 64 {
        hops += 1;
        let (id, next) = (u16_at(off), u32_at(off + 4) as usize);
        if u32::from(id) == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE {
            let n = u32_at(off + 8) as usize;
            let mut out = Vec::new();
            for i in 0..n {
                let at = off + 16 + 16 * i;
                if at + 16 > bytes.len() {
                    break;
                }
                let (start, last) = (u64_at(at), u64_at(at + 8));
                if last > start {
                    out.push((start, last.saturating_add(1)));
                }
            }
            return Some(out);
        }
        off = next;
    }
    None
}

/// Opens the controller at `spec.addr` (after [`preflight`]) and brings it up.
pub fn open(spec: &NvmeSpec, opts: Options) -> Result<Arc<Controller>, OpenError> {
    let pre = preflight(spec, opts.hugepages).map_err(OpenError::Preflight)?;
    let addr = spec.addr.clone();
    let vfio = |source| OpenError::Vfio { addr: addr.clone(), source };
    let container = Arc::new(VfioContainer::new(None).map_err(vfio)?);
    let sysfs = PathBuf::from(format!("/sys/bus/pci/devices/{addr}"));
    let device =
        VfioDevice::new(&sysfs, Arc::clone(&container) as Arc<dyn VfioOps>, false).map_err(vfio)?;
    let dev_err = |why: String| OpenError::Device { addr: addr.clone(), why };
    let flags = device.get_region_flags(VFIO_PCI_BAR0_REGION_INDEX);
    let size = device.get_region_size(VFIO_PCI_BAR0_REGION_INDEX) as usize;
    let offset = device.get_region_offset(VFIO_PCI_BAR0_REGION_INDEX);
    if flags & VFIO_REGION_INFO_FLAG_MMAP == 0 || size < 0x2000 {
        return Err(dev_err(format!("BAR0 cannot be mapped (flags {flags:#x}, {size:#x} bytes)")));
    }
    use std::os::fd::AsRawFd;
    // SAFETY: mapping a device region of the VFIO device fd; checked for failure below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            device.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(dev_err(format!("mmap BAR0: {}", std::io::Error::last_os_error())));
    }
    // Memory space and bus master enable in the PCI command register.
    set_pci_command(&device, pci_command(&device) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
    let bar = Bar0 { ptr: ptr.cast(), len: size, device };
    log::info!(
        "{addr}: VFIO group {}, BAR0 {size:#x} bytes mapped, {}",
        pre.group,
        if opts.hugepages { "DMA memory from hugepages" } else { "DMA memory from 4 KiB pages" }
    );
    let iommu = VfioIommu { container };
    Controller::init(Box::new(bar), Box::new(iommu), format!("nvme://{addr}"), opts)
        .map_err(|source| OpenError::Init { addr, source })
}

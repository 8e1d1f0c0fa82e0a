//! NVMe over PCIe, driven from userspace: the controller and its queue pairs.
//!
//! This is the bare-metal device path (as in SPDK): the process owns the controller,
//! rings its doorbells and polls its completion queues, with no kernel block layer and
//! no system call per I/O. The driver is written against two small seams so the same
//! code runs on real hardware and on a model in plain memory:
//!
//! * [`Regs`]: the controller's register file (BAR0). On hardware, [`crate::vfio`]'s
//!   `Bar0` is the one type that touches the mapped BAR; in tests,
//!   [`model::ModelController`] implements the registers and reacts to doorbells.
//! * [`DmaMapper`]: the IOMMU. The driver gives every piece of memory the controller
//!   may reach an I/O virtual address (IOVA) and maps it; the model checks every DMA
//!   against those mappings, as an IOMMU would.
//!
//! ```text
//!   Controller (shared: Arc)                 NvmeDevice (one per core, BlockDevice)
//!   +-------------------------------+        +------------------------------------+
//!   | regs: CAP, CC, CSTS, AQA, ... |<-------| SQ ring | CQ ring | PRP list pages |
//!   | admin queue (mutex: setup,    |        | slots[cid]: tag, buf, deadline     |
//!   |   abort, reset only)          |        | doorbells: SQ tail at kick,        |
//!   | generation (bumped by reset)  |        |   CQ head after each poll          |
//!   +-------------------------------+        +------------------------------------+
//! ```
//!
//! The I/O path takes no lock: a queue pair touches only its own rings and doorbells.
//! The admin queue's mutex is taken to set up queues, to abort a command that timed out
//! and to reset a hung controller.

mod controller;
pub mod iova;
pub mod model;
pub mod prp;
mod queue;

pub use controller::{Controller, ControllerInfo, InitError, NamespaceInfo, Options};
pub use queue::NvmeDevice;

/// Controller register offsets (NVMe base specification, "Controller Registers").
pub mod reg {
    /// Controller Capabilities (64-bit).
    pub const CAP: usize = 0x00;
    /// Version.
    pub const VS: usize = 0x08;
    /// Interrupt Mask Set / Clear.
    pub const INTMS: usize = 0x0c;
    pub const INTMC: usize = 0x10;
    /// Controller Configuration.
    pub const CC: usize = 0x14;
    /// Controller Status.
    pub const CSTS: usize = 0x1c;
    /// Admin Queue Attributes.
    pub const AQA: usize = 0x24;
    /// Admin Submission / Completion Queue Base Address (64-bit).
    pub const ASQ: usize = 0x28;
    pub const ACQ: usize = 0x30;
    /// First doorbell; doorbell `n` is at `DOORBELLS + n * (4 << CAP.DSTRD)`.
    pub const DOORBELLS: usize = 0x1000;

    pub const CC_EN: u32 = 1;
    pub const CC_SHN_NORMAL: u32 = 1 << 14;
    pub const CC_SHN_MASK: u32 = 3 << 14;
    pub const CSTS_RDY: u32 = 1;
    pub const CSTS_CFS: u32 = 1 << 1;
    pub const CSTS_SHST_MASK: u32 = 3 << 2;
    pub const CSTS_SHST_COMPLETE: u32 = 2 << 2;
}

/// The fields of CAP the driver honours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap {
    /// Maximum queue entries supported (1-based here: MQES + 1).
    pub max_queue_entries: u32,
    /// Worst-case time to become ready or not ready, in milliseconds (CAP.TO x 500).
    pub timeout_ms: u64,
    /// Doorbell stride: doorbells are `4 << dstrd` bytes apart.
    pub dstrd: u8,
    /// Smallest memory page size, as a power of two (12 = 4 KiB).
    pub mps_min_shift: u8,
    pub mps_max_shift: u8,
    /// The NVM command set is supported (CAP.CSS bit 0).
    pub nvm_command_set: bool,
}

impl Cap {
    pub fn decode(cap: u64) -> Cap {
        Cap {
            max_queue_entries: (cap & 0xffff) as u32 + 1,
            timeout_ms: ((cap >> 24) & 0xff) * 500,
            dstrd: ((cap >> 32) & 0xf) as u8,
            mps_min_shift: 12 + ((cap >> 48) & 0xf) as u8,
            mps_max_shift: 12 + ((cap >> 52) & 0xf) as u8,
            nvm_command_set: (cap >> 37) & 1 == 1,
        }
    }

    pub fn encode(&self) -> u64 {
        u64::from(self.max_queue_entries - 1)
            | ((self.timeout_ms / 500).min(255) << 24)
            | (u64::from(self.dstrd) << 32)
            | (u64::from(self.nvm_command_set) << 37)
            | (u64::from(self.mps_min_shift - 12) << 48)
            | (u64::from(self.mps_max_shift - 12) << 52)
    }

    /// Byte offset of the SQ tail doorbell of queue `qid`.
    pub fn sq_doorbell(&self, qid: u16) -> usize {
        reg::DOORBELLS + (2 * qid as usize) * (4 << self.dstrd)
    }

    /// Byte offset of the CQ head doorbell of queue `qid`.
    pub fn cq_doorbell(&self, qid: u16) -> usize {
        reg::DOORBELLS + (2 * qid as usize + 1) * (4 << self.dstrd)
    }
}

/// The controller's register file. Accesses are 32-bit, as NVMe requires of every
/// register the driver writes; 64-bit registers are accessed as two halves, low first.
///
/// Implementations must make each access a single, non-elided, ordered access (MMIO).
pub trait Regs: Send + Sync {
    fn read32(&self, offset: usize) -> u32;
    fn write32(&self, offset: usize, value: u32);

    /// Bytes of register space (BAR0's size): doorbells must lie inside.
    fn bar_bytes(&self) -> usize;

    /// Stops the device's DMA for good, below the NVMe level (clears PCI bus
    /// mastering). For a controller that no longer answers CC.EN = 0: until its DMA is
    /// stopped, none of the memory it was given may be reused. Returns whether it was
    /// done.
    fn stop_dma(&self) -> bool {
        false
    }

    fn read64(&self, offset: usize) -> u64 {
        let lo = u64::from(self.read32(offset));
        let hi = u64::from(self.read32(offset + 4));
        lo | (hi << 32)
    }

    fn write64(&self, offset: usize, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }
}

/// Why memory could not be made reachable by the device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("IOMMU mapping of {len} bytes at IOVA {iova:#x} failed: {why}")]
pub struct MapError {
    pub iova: u64,
    pub len: usize,
    pub why: String,
}

/// The IOMMU: makes `len` bytes at `va` reachable by the device at `iova`.
///
/// # Safety (for implementors and callers)
/// After `map` the device may read and write that memory at any time until `unmap`
/// returns: callers keep it allocated until then and touch it only through raw
/// pointers.
pub trait DmaMapper: Send + Sync {
    /// Maps `[va, va + len)` at `iova`. `va`, `iova` and `len` are 4 KiB aligned.
    ///
    /// # Safety
    /// The memory must stay allocated until `unmap` returns, and be reached only through
    /// raw pointers meanwhile.
    unsafe fn map(&self, va: *mut u8, len: usize, iova: u64) -> Result<(), MapError>;
    /// Removes the mapping made at `iova` with this `len`.
    fn unmap(&self, iova: u64, len: usize) -> Result<(), MapError>;

    /// The IOVA ranges, `[start, end)`, the device may use.
    fn iova_ranges(&self) -> Vec<(u64, u64)> {
        iova::default_ranges()
    }
}

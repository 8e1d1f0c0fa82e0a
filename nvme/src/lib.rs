//! Block devices as NVMe-style queue pairs.
//!
//! The unit of I/O in Sluice is a **queue pair**: a core submits commands (read, write,
//! flush, write-zeroes, trim) with a DMA-able buffer and a tag, rings a doorbell once per
//! batch, and later polls for completions. One queue pair belongs to one reactor core;
//! there is no lock and no allocation per I/O in the production backends. Commands and
//! completions have NVMe's shapes ([`Sqe`], [`Cqe`], [`Status`]), so every backend speaks
//! the same language and reports the same typed [`IoError`]s.
//!
//! The durability contract is stated on [`BlockDevice`]: a completed write is durable only
//! once a flush submitted after its completion has completed, or if it was a FUA write.
//!
//! Backends:
//! * [`UringDevice`]: io_uring on a file or block device, O_DIRECT, batched submission,
//!   completions reaped from the CQ ring in userspace. The embedded default.
//! * [`RamDevice`]: memory; the reference behaviour.
//! * [`FaultyDevice`]: wraps any backend with a volatile write cache, power cuts that drop
//!   or tear unflushed writes, I/O errors by range or call count, and latency.
//! * [`pcie::NvmeDevice`]: a queue pair of an NVMe controller driven from userspace
//!   ([`pcie`]); over VFIO on bare metal (`vfio` module, cargo feature `vfio`), over the
//!   register-level [`pcie::model`] in tests.
//!
//! [`conformance`] holds the suite every backend must pass.
//!
//! Threads: a queue pair is `Send` (built anywhere, moved to its reactor) but used by one
//! thread at a time. Faults tolerated: the backends report errors; they never panic on
//! device failures. Panics here mean a caller broke a documented precondition.

pub mod any;
pub mod command;
pub mod conformance;
pub mod device;
pub mod dma;
pub mod error;
pub mod faulty;
pub mod irq;
pub mod pcie;
pub mod ram;
pub mod spec;
pub mod uring;
#[cfg(feature = "vfio")]
pub mod vfio;

pub use any::{AnyDevice, DeviceOptions, Opener, open_device};
pub use command::{Cqe, IoCommand, OpKind, Sqe, Status};
pub use device::{
    BlockDevice, Completion, DeviceInfo, flush_sync, read_sync, run_sync, write_sync,
};
pub use dma::{DmaBuf, DmaPool, PoolOptions};
pub use error::{IoError, RejectReason, SubmitError};
pub use faulty::{CutPolicy, CutReport, Fate, FaultHandle, FaultRule, FaultyDevice, OpSet};
pub use ram::{RamDevice, RamMedia};
pub use spec::{DeviceSpec, NvmeSpec};
pub use uring::{OpenError, TaskRun, UringDevice, UringOptions, create_device_file};

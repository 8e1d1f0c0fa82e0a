//! The queue-pair trait every backend implements.

use std::os::fd::BorrowedFd;

use sluice_vocab::limits::{BLOCK_SIZE_BYTES, MAX_TRANSFER_BYTES};
use sluice_vocab::{BlockCount, Lba};

use crate::command::IoCommand;
use crate::dma::DmaBuf;
use crate::error::{IoError, RejectReason, SubmitError};

/// What a queue pair tells its user about the device behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Human-readable name for messages: a path, `ram`, `nvme://0000:00:03.0/1`.
    pub name: String,
    /// Always [`BLOCK_SIZE_BYTES`]: the unit of every [`Lba`] and [`BlockCount`].
    pub block_size: usize,
    /// Size of the device in blocks.
    pub num_blocks: u64,
    /// Most commands in flight at once on this queue pair.
    pub queue_depth: usize,
    /// Largest data transfer of one command, in blocks.
    pub max_transfer_blocks: u64,
}

impl DeviceInfo {
    pub fn size_bytes(&self) -> u64 {
        self.num_blocks * self.block_size as u64
    }
}

/// A finished command: its tag, its result and the buffer it carried.
#[derive(Debug)]
pub struct Completion {
    pub tag: u64,
    pub result: Result<(), IoError>,
    pub buf: Option<DmaBuf>,
}

/// One submission/completion queue pair of a block device.
///
/// # Contract
///
/// * **Submission.** [`submit`](Self::submit) queues a command with its buffer and a
///   caller-chosen `tag`. It does not block and does not allocate. The command is
///   guaranteed to reach the device by the next [`kick`](Self::kick) (the doorbell), which
///   is where backends batch; a backend may start it earlier. A rejected command gives its
///   buffer back in the [`SubmitError`].
/// * **Completion.** [`poll`](Self::poll) reaps finished commands without blocking, in
///   any order, each exactly once, returning the buffer (for a read, filled) and the tag.
/// * **Ordering.** Commands in flight together are unordered, as on NVMe: a read that
///   overlaps an in-flight write may see either content. A command submitted after
///   another *completed* sees its effect.
/// * **Durability.** A completed write (or write-zeroes or trim) is in the device's
///   volatile cache: it survives power loss only once a [`IoCommand::Flush`] *submitted
///   after the write completed* has itself completed with `Ok`, or if it was written with
///   `fua: true` and completed with `Ok`. Nothing else is durable. The store builds every
///   acknowledgement on this rule; `FaultyDevice` enforces it in tests.
/// * **Errors.** A failed write leaves its range undefined (old data, new data, or a mix
///   per block) but never affects other blocks.
/// * **Parking.** A reactor that wants to sleep calls [`prepare_park`](Self::prepare_park);
///   if it returns `true`, the fd from [`park_fd`](Self::park_fd) (if any) becomes
///   readable when a completion arrives. [`after_park`](Self::after_park) undoes it.
pub trait BlockDevice: Send {
    fn info(&self) -> &DeviceInfo;

    /// Queues `cmd`. `buf` must be present exactly for reads and writes and hold exactly
    /// `blocks * block_size` bytes.
    fn submit(&mut self, cmd: IoCommand, buf: Option<DmaBuf>, tag: u64) -> Result<(), SubmitError>;

    /// Rings the doorbell for every command queued since the last kick.
    fn kick(&mut self) -> Result<(), IoError>;

    /// Hands up to `max` completions to `sink`; returns how many.
    fn poll(&mut self, max: usize, sink: &mut dyn FnMut(Completion)) -> usize;

    /// Commands accepted and not yet handed back by `poll`.
    fn in_flight(&self) -> usize;

    /// An fd that becomes readable when completions arrive while parked.
    fn park_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    /// Arms completion notification before the reactor sleeps. Returns `false` if work is
    /// already waiting (the reactor must not sleep) or this device cannot notify while
    /// commands are in flight.
    fn prepare_park(&mut self) -> bool {
        self.in_flight() == 0
    }

    /// Disarms notification after the reactor woke up.
    fn after_park(&mut self) {}
}

impl<D: BlockDevice + ?Sized> BlockDevice for Box<D> {
    fn info(&self) -> &DeviceInfo {
        (**self).info()
    }
    fn submit(&mut self, cmd: IoCommand, buf: Option<DmaBuf>, tag: u64) -> Result<(), SubmitError> {
        (**self).submit(cmd, buf, tag)
    }
    fn kick(&mut self) -> Result<(), IoError> {
        (**self).kick()
    }
    fn poll(&mut self, max: usize, sink: &mut dyn FnMut(Completion)) -> usize {
        (**self).poll(max, sink)
    }
    fn in_flight(&self) -> usize {
        (**self).in_flight()
    }
    fn park_fd(&self) -> Option<BorrowedFd<'_>> {
        (**self).park_fd()
    }
    fn prepare_park(&mut self) -> bool {
        (**self).prepare_park()
    }
    fn after_park(&mut self) {
        (**self).after_park()
    }
}

/// Checks a command against the device geometry; every backend calls this at submit so
/// they all reject the same things the same way.
pub fn validate(
    info: &DeviceInfo,
    cmd: &IoCommand,
    buf: Option<&DmaBuf>,
) -> Result<(), RejectReason> {
    if let Some((lba, blocks)) = cmd.range() {
        if blocks.0 == 0 {
            return Err(RejectReason::Invalid("zero-length command"));
        }
        let end = lba.checked_add(blocks).ok_or(RejectReason::Invalid("range overflows"))?;
        if end.0 > info.num_blocks {
            return Err(RejectReason::Invalid("range beyond the end of the device"));
        }
        if cmd.transfers_data() && blocks.0 > info.max_transfer_blocks {
            return Err(RejectReason::Invalid("transfer larger than the device maximum"));
        }
    }
    match (cmd.transfers_data(), buf) {
        (true, None) => return Err(RejectReason::Invalid("data command without a buffer")),
        (false, Some(_)) => return Err(RejectReason::Invalid("buffer on a command without data")),
        (true, Some(b)) => {
            let (_, blocks) = cmd.range().expect("data commands have a range");
            if b.len() as u64 != blocks.bytes() {
                return Err(RejectReason::Invalid("buffer length differs from the block count"));
            }
        }
        (false, None) => {}
    }
    Ok(())
}

/// Default geometry limits shared by the backends.
pub fn default_max_transfer_blocks() -> u64 {
    (MAX_TRANSFER_BYTES / BLOCK_SIZE_BYTES) as u64
}

/// Convenience for tests and tools: runs one command to completion, spinning on `poll`.
/// Not for reactors (it busy-waits).
pub fn run_sync<D: BlockDevice + ?Sized>(
    dev: &mut D,
    cmd: IoCommand,
    buf: Option<DmaBuf>,
) -> (Result<(), IoError>, Option<DmaBuf>) {
    const TAG: u64 = u64::MAX - 1;
    if let Err(e) = dev.submit(cmd, buf, TAG) {
        let err = match e.reason {
            RejectReason::DeviceGone => IoError::DeviceGone,
            RejectReason::Invalid(why) => IoError::Invalid(why),
            RejectReason::QueueFull => IoError::Invalid("queue full in run_sync"),
        };
        return (Err(err), e.buf);
    }
    if let Err(e) = dev.kick() {
        return (Err(e), None);
    }
    let mut out = None;
    let mut spins = 0u64;
    while out.is_none() {
        dev.poll(1, &mut |c| {
            assert_eq!(c.tag, TAG, "run_sync needs an otherwise idle queue pair");
            out = Some((c.result, c.buf));
        });
        spins += 1;
        if spins.is_multiple_of(1024) {
            std::thread::yield_now();
        }
    }
    out.expect("loop exits with a completion")
}

/// Reads `blocks` blocks at `lba` synchronously (tests and tools).
pub fn read_sync<D: BlockDevice + ?Sized>(
    dev: &mut D,
    lba: Lba,
    blocks: BlockCount,
) -> Result<DmaBuf, IoError> {
    let buf = DmaBuf::new(blocks.bytes() as usize);
    let (r, buf) = run_sync(dev, IoCommand::Read { lba, blocks }, Some(buf));
    r.map(|()| buf.expect("read returns its buffer"))
}

/// Writes `data` (a whole number of blocks) at `lba` synchronously (tests and tools).
pub fn write_sync<D: BlockDevice + ?Sized>(
    dev: &mut D,
    lba: Lba,
    data: &[u8],
    fua: bool,
) -> Result<(), IoError> {
    assert_eq!(data.len() % BLOCK_SIZE_BYTES, 0, "write_sync needs whole blocks");
    let blocks = BlockCount((data.len() / BLOCK_SIZE_BYTES) as u64);
    run_sync(dev, IoCommand::Write { lba, blocks, fua }, Some(DmaBuf::from_slice(data))).0
}

/// Flushes synchronously (tests and tools).
pub fn flush_sync<D: BlockDevice + ?Sized>(dev: &mut D) -> Result<(), IoError> {
    run_sync(dev, IoCommand::Flush, None).0
}

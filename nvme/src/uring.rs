//! `UringDevice`: a queue pair over io_uring on a regular file or a block device.
//!
//! * O_DIRECT by default, so data moves between our DMA buffers and the device with no
//!   page cache in between (and the durability contract is the device's).
//! * Submission is batched: `submit` only fills the SQ ring; `kick` makes one
//!   `io_uring_enter` for the batch (none at all with SQPOLL while its thread is awake).
//! * Completions are reaped by reading the CQ ring in userspace: no syscall per I/O.
//! * Flush is `fdatasync`; FUA writes use `RWF_DSYNC`; write-zeroes and trim are
//!   `fallocate(ZERO_RANGE)` and `fallocate(PUNCH_HOLE)`.
//! * Buffers from pools registered at open use READ_FIXED/WRITE_FIXED (no per-I/O page
//!   pinning). The file is a registered file (no per-I/O fd lookup).
//! * IOPOLL (`UringOptions::iopoll`) is an opt-in checked against the device's
//!   `queue/io_poll` at open. An IOPOLL ring accepts only reads and writes, so flushes
//!   and fallocates then go to a second, interrupt-driven ring (`aux`).
//!
//! One `UringDevice` is one queue pair and belongs to one reactor; several may share a
//! file through [`UringDevice::open_shared`].

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use io_uring::{IoUring, opcode, squeue, types};
use sluice_vocab::Lba;
use sluice_vocab::limits::{BLOCK_SIZE_BYTES, MAX_QUEUE_DEPTH};

use crate::command::IoCommand;
use crate::device::{BlockDevice, Completion, DeviceInfo, default_max_transfer_blocks, validate};
use crate::dma::{DmaBuf, DmaPool, PoolKeepalive};
use crate::error::{IoError, RejectReason, SubmitError};

/// How to open a [`UringDevice`].
#[derive(Debug, Clone)]
pub struct UringOptions {
    /// Most commands in flight on this queue pair.
    pub queue_depth: usize,
    /// Open with O_DIRECT (the default). Without it data goes through the page cache;
    /// durability still holds (flush is fdatasync) but performance figures are not the
    /// device's.
    pub direct: bool,
    /// Use a kernel submission-polling thread that idles after this many milliseconds.
    /// It costs a CPU while busy: use only with a core to spare.
    pub sqpoll_idle_ms: Option<u32>,
    /// Pin the SQPOLL thread to this CPU.
    pub sqpoll_cpu: Option<u32>,
    /// Poll the device for completions (IOPOLL) instead of interrupts. Needs a block
    /// device with `queue/io_poll` = 1.
    pub iopoll: bool,
    /// Pools whose buffers this queue pair should use as fixed (pre-registered) buffers.
    pub fixed_pools: Vec<DmaPool>,
    /// How the kernel delivers completions to this (polling) thread.
    pub taskrun: TaskRun,
}

/// How completion work reaches the thread that owns the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TaskRun {
    /// The kernel interrupts the polling thread (an IPI when it runs on another CPU) to
    /// post each completion. io_uring's default.
    Interrupt,
    /// COOP_TASKRUN + TASKRUN_FLAG: no IPI; the kernel raises a flag in the SQ ring and
    /// `poll` enters the kernel once to collect everything pending. A sleeping (parked)
    /// thread is still woken (the kernel sets TIF_NOTIFY_SIGNAL and wakes interruptible
    /// sleepers; only the IPI to a running thread is skipped). Cheaper for a thread that
    /// polls.
    #[default]
    Cooperative,
}

impl Default for UringOptions {
    fn default() -> Self {
        UringOptions {
            queue_depth: 128,
            direct: true,
            sqpoll_idle_ms: None,
            sqpoll_cpu: None,
            iopoll: false,
            fixed_pools: Vec::new(),
            taskrun: TaskRun::default(),
        }
    }
}

/// Why a device could not be opened; every variant names the path.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open {path}: {source}")]
    Open { path: String, source: std::io::Error },
    #[error(
        "{path}: the file system does not support O_DIRECT ({source}); put the device file \
         on a disk-backed file system (not tmpfs) or open it without direct I/O"
    )]
    NoDirectIo { path: String, source: std::io::Error },
    #[error("{path}: size {size_bytes} bytes is not a positive multiple of {BLOCK_SIZE_BYTES}")]
    BadSize { path: String, size_bytes: u64 },
    #[error("{path}: not a regular file or block device")]
    NotADevice { path: String },
    #[error("{path}: IOPOLL requested but {why}")]
    NoIopoll { path: String, why: String },
    #[error("{path}: io_uring setup failed: {source}")]
    Uring { path: String, source: std::io::Error },
    #[error("{path}: invalid option: {why}")]
    InvalidOption { path: String, why: String },
}

struct Slot {
    tag: u64,
    lba: Lba,
    want_bytes: u32,
    kind: SlotKind,
    buf: Option<DmaBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SlotKind {
    Free,
    Data,
    Other,
}

/// Fixed-buffer registrations: `(region start, region length, buffer index)`.
struct FixedRegion {
    start: usize,
    len: usize,
    index: u16,
}

/// `user_data` bit marking completions from the aux ring (IOPOLL mode).
const AUX_BIT: u64 = 1 << 63;
/// Largest single iovec io_uring accepts for a fixed buffer.
const MAX_FIXED_IOVEC_BYTES: usize = 1 << 30;

/// A queue pair over io_uring. See the module documentation.
pub struct UringDevice {
    ring: IoUring,
    aux: Option<IoUring>,
    _file: Arc<File>,
    info: DeviceInfo,
    slots: Box<[Slot]>,
    free: Vec<u32>,
    in_flight: usize,
    fixed: Vec<FixedRegion>,
    _keepalive: Vec<PoolKeepalive>,
}

impl std::fmt::Debug for UringDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringDevice")
            .field("info", &self.info)
            .field("in_flight", &self.in_flight)
            .field("iopoll", &self.aux.is_some())
            .finish()
    }
}

/// Opens `path` read-write (O_DIRECT unless disabled) and returns the file with its size.
pub fn open_file(path: &Path, direct: bool) -> Result<(File, u64), OpenError> {
    let name = path.display().to_string();
    let mut oo = std::fs::OpenOptions::new();
    oo.read(true).write(true);
    if direct {
        oo.custom_flags(libc::O_DIRECT);
    }
    let mut file = oo.open(path).map_err(|source| {
        if direct && source.raw_os_error() == Some(libc::EINVAL) {
            OpenError::NoDirectIo { path: name.clone(), source }
        } else {
            OpenError::Open { path: name.clone(), source }
        }
    })?;
    let md = file.metadata().map_err(|source| OpenError::Open { path: name.clone(), source })?;
    if !md.file_type().is_file() && !md.file_type().is_block_device() {
        return Err(OpenError::NotADevice { path: name });
    }
    let size_bytes = file
        .seek(SeekFrom::End(0))
        .map_err(|source| OpenError::Open { path: name.clone(), source })?;
    if size_bytes == 0 || size_bytes % BLOCK_SIZE_BYTES as u64 != 0 {
        return Err(OpenError::BadSize { path: name, size_bytes });
    }
    Ok((file, size_bytes))
}

/// Checks that the device behind `file` supports polled I/O.
fn check_iopoll(file: &File) -> Result<(), String> {
    let md = file.metadata().map_err(|e| format!("cannot stat: {e}"))?;
    let dev = if md.file_type().is_block_device() { md.rdev() } else { md.dev() };
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let base = format!("/sys/dev/block/{major}:{minor}");
    for candidate in [format!("{base}/queue/io_poll"), format!("{base}/../queue/io_poll")] {
        if let Ok(v) = std::fs::read_to_string(&candidate) {
            return if v.trim() == "1" {
                Ok(())
            } else {
                Err(format!(
                    "the device {major}:{minor} does not support polled I/O ({candidate} = {})",
                    v.trim()
                ))
            };
        }
    }
    Err(format!(
        "the device {major}:{minor} has no queue/io_poll attribute (not a polled block device)"
    ))
}

impl UringDevice {
    /// Opens one queue pair on `path`.
    pub fn open(path: &Path, opts: UringOptions) -> Result<UringDevice, OpenError> {
        let (file, size_bytes) = open_file(path, opts.direct)?;
        Self::open_shared(Arc::new(file), size_bytes, path.display().to_string(), opts)
    }

    /// Opens one more queue pair on an already opened file (one per core).
    pub fn open_shared(
        file: Arc<File>,
        size_bytes: u64,
        name: String,
        opts: UringOptions,
    ) -> Result<UringDevice, OpenError> {
        let depth = opts.queue_depth;
        if depth == 0 || depth > MAX_QUEUE_DEPTH {
            return Err(OpenError::InvalidOption {
                path: name,
                why: format!("queue depth {depth} is not between 1 and {MAX_QUEUE_DEPTH}"),
            });
        }
        let uring_err = |source| OpenError::Uring { path: name.clone(), source };
        if opts.iopoll {
            check_iopoll(&file).map_err(|why| OpenError::NoIopoll { path: name.clone(), why })?;
        }
        let entries = (depth as u32).next_power_of_two();
        let mut b = IoUring::builder();
        if let Some(idle) = opts.sqpoll_idle_ms {
            b.setup_sqpoll(idle);
            if let Some(cpu) = opts.sqpoll_cpu {
                b.setup_sqpoll_cpu(cpu);
            }
        }
        if opts.iopoll {
            b.setup_iopoll();
        }
        // With SQPOLL the kernel thread runs completion work itself; the kernel rejects
        // COOP_TASKRUN there.
        if opts.taskrun == TaskRun::Cooperative && opts.sqpoll_idle_ms.is_none() {
            b.setup_coop_taskrun().setup_taskrun_flag();
        }
        b.setup_cqsize(entries * 2);
        let ring = b.build(entries).map_err(uring_err)?;
        let aux = if opts.iopoll {
            Some(IoUring::builder().setup_cqsize(entries * 2).build(entries).map_err(uring_err)?)
        } else {
            None
        };
        for r in std::iter::once(&ring).chain(aux.as_ref()) {
            r.submitter().register_files(&[file.as_raw_fd()]).map_err(uring_err)?;
        }
        let mut fixed = Vec::new();
        let mut keepalive = Vec::new();
        let mut iovecs = Vec::new();
        for pool in &opts.fixed_pools {
            let (base, len) = pool.region();
            let mut off = 0;
            while off < len {
                let chunk = (len - off).min(MAX_FIXED_IOVEC_BYTES);
                let Ok(index) = u16::try_from(iovecs.len()) else {
                    return Err(OpenError::InvalidOption {
                        path: name,
                        why: "too many fixed buffer regions".into(),
                    });
                };
                fixed.push(FixedRegion { start: base as usize + off, len: chunk, index });
                iovecs
                    .push(libc::iovec { iov_base: base.wrapping_add(off).cast(), iov_len: chunk });
                off += chunk;
            }
            keepalive.push(pool.keepalive());
        }
        if !iovecs.is_empty() {
            // SAFETY: every iovec points into a pool mapping kept alive by `keepalive` for
            // as long as this ring exists.
            if let Err(e) = unsafe { ring.submitter().register_buffers(&iovecs) } {
                log::warn!(
                    "{name}: cannot register fixed buffers ({e}); using plain reads and writes"
                );
                fixed.clear();
                keepalive.clear();
            }
        }
        let slots = (0..depth)
            .map(|_| Slot { tag: 0, lba: Lba(0), want_bytes: 0, kind: SlotKind::Free, buf: None })
            .collect();
        Ok(UringDevice {
            ring,
            aux,
            _file: file,
            info: DeviceInfo {
                name,
                block_size: BLOCK_SIZE_BYTES,
                num_blocks: size_bytes / BLOCK_SIZE_BYTES as u64,
                queue_depth: depth,
                max_transfer_blocks: default_max_transfer_blocks(),
            },
            slots,
            free: (0..depth as u32).rev().collect(),
            in_flight: 0,
            fixed,
            _keepalive: keepalive,
        })
    }

    /// Whether the kernel has completion work waiting for us to enter the ring.
    fn taskrun_pending(&mut self) -> bool {
        // SAFETY: only the SQ flags word is read through the shared view.
        unsafe { self.ring.submission_shared() }.taskrun()
    }

    /// Whether `buf` would travel as a registered (fixed) buffer on this queue pair.
    pub fn is_fixed(&self, buf: &DmaBuf) -> bool {
        self.fixed_index(buf).is_some()
    }

    fn fixed_index(&self, buf: &DmaBuf) -> Option<u16> {
        let addr = buf.dma_addr() as usize;
        self.fixed
            .iter()
            .find(|r| addr >= r.start && addr + buf.len() <= r.start + r.len)
            .map(|r| r.index)
    }

    fn build_entry(&self, cmd: &IoCommand, buf: Option<&DmaBuf>) -> squeue::Entry {
        let fd = types::Fixed(0);
        match *cmd {
            IoCommand::Read { lba, .. } => {
                let b = buf.expect("validated");
                let (ptr, len) = (b.as_ptr().cast_mut(), b.len() as u32);
                match self.fixed_index(b) {
                    Some(i) => {
                        opcode::ReadFixed::new(fd, ptr, len, i).offset(lba.offset_bytes()).build()
                    }
                    None => opcode::Read::new(fd, ptr, len).offset(lba.offset_bytes()).build(),
                }
            }
            IoCommand::Write { lba, fua, .. } => {
                let b = buf.expect("validated");
                let (ptr, len) = (b.as_ptr(), b.len() as u32);
                let flags = if fua { libc::RWF_DSYNC } else { 0 };
                match self.fixed_index(b) {
                    Some(i) => opcode::WriteFixed::new(fd, ptr, len, i)
                        .offset(lba.offset_bytes())
                        .rw_flags(flags)
                        .build(),
                    None => opcode::Write::new(fd, ptr, len)
                        .offset(lba.offset_bytes())
                        .rw_flags(flags)
                        .build(),
                }
            }
            IoCommand::Flush => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
            IoCommand::WriteZeroes { lba, blocks } => opcode::Fallocate::new(fd, blocks.bytes())
                .offset(lba.offset_bytes())
                .mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            IoCommand::Trim { lba, blocks } => opcode::Fallocate::new(fd, blocks.bytes())
                .offset(lba.offset_bytes())
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
        }
    }

    /// Pushes one SQE, making room by submitting if the SQ ring is full (possible only
    /// with SQPOLL, whose kernel thread consumes entries asynchronously).
    fn push(ring: &mut IoUring, entry: &squeue::Entry) {
        loop {
            // SAFETY: the entry's buffer (if any) is owned by a slot until its completion is
            // reaped, so it outlives the kernel's use of it.
            if unsafe { ring.submission().push(entry) }.is_ok() {
                return;
            }
            if ring.params().is_setup_sqpoll() {
                let _ = ring.submitter().squeue_wait();
            }
            let _ = ring.submit();
        }
    }

    fn submit_ring(ring: &IoUring) -> Result<(), IoError> {
        match ring.submit() {
            Ok(_) => Ok(()),
            // The kernel could not take the batch right now; entries stay queued and the
            // next kick retries.
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY | libc::EINTR)) =>
            {
                Ok(())
            }
            Err(e) => Err(IoError::from_errno(e.raw_os_error().unwrap_or(libc::EIO), Lba(0))),
        }
    }
}

/// How long dropping a queue pair waits for in-flight commands before leaking their
/// buffers rather than freeing memory the kernel may still write.
const DRAIN_ON_DROP: std::time::Duration = std::time::Duration::from_secs(30);

impl Drop for UringDevice {
    /// Commands still in flight own DMA buffers the kernel may be reading or writing.
    /// Cancel them and wait for every completion before the buffers are freed; if that
    /// does not finish, leak the buffers (and the pool mappings) instead.
    fn drop(&mut self) {
        if self.in_flight == 0 {
            return;
        }
        for r in std::iter::once(&mut self.ring).chain(self.aux.as_mut()) {
            let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
                .build()
                .user_data(CANCEL_TAG);
            // SAFETY: a cancel request references no memory.
            let _ = unsafe { r.submission().push(&cancel) };
            let _ = r.submit();
        }
        let deadline = std::time::Instant::now() + DRAIN_ON_DROP;
        while self.in_flight > 0 && std::time::Instant::now() < deadline {
            let mut reaped = 0;
            let Self { ring, aux, slots, free, in_flight, .. } = self;
            for r in std::iter::once(&mut *ring).chain(aux.as_mut()) {
                let _ = r.submit_and_wait(if *in_flight > 0 { 1 } else { 0 });
                for cqe in r.completion() {
                    if cqe.user_data() == CANCEL_TAG {
                        continue;
                    }
                    let slot_no = (cqe.user_data() & !AUX_BIT) as u32;
                    let slot = &mut slots[slot_no as usize];
                    if slot.kind != SlotKind::Free {
                        slot.kind = SlotKind::Free;
                        slot.buf = None;
                        free.push(slot_no);
                        *in_flight -= 1;
                        reaped += 1;
                    }
                }
            }
            if reaped == 0 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        if self.in_flight > 0 {
            log::error!(
                "{}: {} commands still in flight at close; leaking their buffers",
                self.info.name,
                self.in_flight
            );
            for slot in self.slots.iter_mut() {
                if let Some(b) = slot.buf.take() {
                    std::mem::forget(b);
                }
            }
            std::mem::forget(std::mem::take(&mut self._keepalive));
        }
    }
}

/// `user_data` of the cancel requests issued at drop.
const CANCEL_TAG: u64 = u64::MAX;

trait RingExt {
    fn cq_nonempty(&self) -> bool;
}

impl RingExt for IoUring {
    fn cq_nonempty(&self) -> bool {
        // SAFETY: read-only use of the shared view; no entries are consumed through it.
        !unsafe { self.completion_shared() }.is_empty()
    }
}

impl BlockDevice for UringDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn submit(&mut self, cmd: IoCommand, buf: Option<DmaBuf>, tag: u64) -> Result<(), SubmitError> {
        if let Err(reason) = validate(&self.info, &cmd, buf.as_ref()) {
            return Err(SubmitError { reason, buf });
        }
        let Some(slot_no) = self.free.pop() else {
            return Err(SubmitError { reason: RejectReason::QueueFull, buf });
        };
        let on_aux = self.aux.is_some() && !cmd.transfers_data();
        let entry = self
            .build_entry(&cmd, buf.as_ref())
            .user_data(u64::from(slot_no) | if on_aux { AUX_BIT } else { 0 });
        let (lba, want_bytes) = match cmd.range() {
            Some((lba, blocks)) if cmd.transfers_data() => (lba, blocks.bytes() as u32),
            Some((lba, _)) => (lba, 0),
            None => (Lba(0), 0),
        };
        let slot = &mut self.slots[slot_no as usize];
        debug_assert!(slot.kind == SlotKind::Free);
        *slot = Slot {
            tag,
            lba,
            want_bytes,
            kind: if cmd.transfers_data() { SlotKind::Data } else { SlotKind::Other },
            buf,
        };
        if on_aux {
            Self::push(self.aux.as_mut().expect("aux ring"), &entry);
        } else {
            Self::push(&mut self.ring, &entry);
        }
        self.in_flight += 1;
        Ok(())
    }

    fn kick(&mut self) -> Result<(), IoError> {
        // The SQ ring itself says what is left: entries the kernel did not take (EAGAIN,
        // a partial submit) stay there and the next kick submits them.
        for r in std::iter::once(&mut self.ring).chain(self.aux.as_mut()) {
            if !r.submission().is_empty() {
                Self::submit_ring(r)?;
            }
        }
        Ok(())
    }

    fn poll(&mut self, max: usize, sink: &mut dyn FnMut(Completion)) -> usize {
        if self.in_flight == 0 {
            return 0;
        }
        if self.ring.params().is_setup_iopoll() || self.taskrun_pending() {
            // An IOPOLL ring completes only while someone polls the device from the kernel;
            // a cooperative ring posts completions when we enter it. One enter collects
            // everything pending (it also submits anything queued, which kick allows).
            let _ = self.ring.submit();
        }
        let mut n = 0;
        let Self { ring, aux, slots, free, in_flight, .. } = self;
        if max == 0 {
            return 0;
        }
        for r in std::iter::once(ring).chain(aux.as_mut()) {
            for cqe in r.completion() {
                let slot_no = (cqe.user_data() & !AUX_BIT) as u32;
                let slot = &mut slots[slot_no as usize];
                assert!(slot.kind != SlotKind::Free, "completion for free slot {slot_no}");
                let res = cqe.result();
                let result = if res < 0 {
                    Err(IoError::from_errno(-res, slot.lba))
                } else if slot.kind == SlotKind::Data && res as u32 != slot.want_bytes {
                    Err(IoError::ShortTransfer {
                        lba: slot.lba,
                        done_bytes: res as u32,
                        want_bytes: slot.want_bytes,
                    })
                } else {
                    Ok(())
                };
                slot.kind = SlotKind::Free;
                let c = Completion { tag: slot.tag, result, buf: slot.buf.take() };
                free.push(slot_no);
                *in_flight -= 1;
                n += 1;
                sink(c);
                if n >= max {
                    return n;
                }
            }
        }
        n
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The ring's own fd: it polls readable while completions wait in the CQ. The kernel
    /// checks the CQ after adding the sleeper to its poll waitqueue, so a completion can
    /// never slip between our last look and the sleep. (The earlier design, an eventfd
    /// switched on only while parked, relied on the enable flag and the CQ tail being
    /// ordered as a store/load pair on both sides, which we could not show the kernel
    /// guarantees; it also cost an extra fd.)
    fn park_fd(&self) -> Option<BorrowedFd<'_>> {
        // SAFETY: the ring fd lives as long as `self.ring`, which outlives the borrow.
        Some(unsafe { BorrowedFd::borrow_raw(self.ring.as_raw_fd()) })
    }

    fn prepare_park(&mut self) -> bool {
        if !self.ring.submission().is_empty()
            || self.aux.as_mut().is_some_and(|a| !a.submission().is_empty())
        {
            return false;
        }
        if self.ring.params().is_setup_iopoll() && self.in_flight > 0 {
            // Polled completions need someone to poll: never sleep with I/O in flight.
            // (The aux ring exists only with IOPOLL, so the main ring's fd covers
            // everything else.)
            return false;
        }
        // Completion work the kernel flagged but has not posted yet: collect it first.
        !(self.taskrun_pending()
            || self.ring.cq_nonempty()
            || self.aux.as_ref().is_some_and(|a| a.cq_nonempty()))
    }

    fn after_park(&mut self) {}
}

/// Creates (or extends) a regular file of `size_bytes` for use as a device. Existing
/// content is kept. Blocks never written read as zeroes.
pub fn create_device_file(path: &Path, size_bytes: u64) -> std::io::Result<()> {
    assert_eq!(size_bytes % BLOCK_SIZE_BYTES as u64, 0);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)?;
    if f.metadata()?.len() < size_bytes {
        f.set_len(size_bytes)?;
    }
    f.sync_all()
}

//! `NvmeDevice`: one I/O submission/completion queue pair of a userspace-driven
//! controller, as a [`BlockDevice`].
//!
//! * `submit` writes the SQE into the submission ring (no doorbell yet) and builds the
//!   command's PRPs in the slot's own list pages;
//! * `kick` rings the SQ tail doorbell once for the batch;
//! * `poll` reads completions by phase bit, hands them out and rings the CQ head
//!   doorbell once;
//! * a command older than `io_timeout` is aborted; if the abort does not bring it back
//!   within another `io_timeout`, the controller is reset and every queue pair fails
//!   what it had in flight (`Aborted`; the command that timed out: `Timeout`) and
//!   recreates its queues.
//!
//! Buffers from pools passed at creation are mapped once; any other buffer is mapped
//! into the IOMMU for the one command (at an IOVA reserved for its slot) and unmapped
//! at completion.
//!
//! A command larger than the controller's MDTS is split into several NVMe commands
//! (one per command identifier, each with its own PRPs) and completes when all of them
//! have, with the first error any of them reported: callers see transfers up to 1 MiB
//! whatever the controller's limit.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use sluice_vocab::limits::BLOCK_SIZE_BYTES;
use sluice_vocab::{BlockCount, Lba};

use crate::command::{Cqe, DsmRange, IoCommand, Sqe, status};
use crate::device::{BlockDevice, Completion, DeviceInfo, default_max_transfer_blocks, validate};
use crate::dma::{DmaBuf, DmaPool};
use crate::error::{IoError, RejectReason, SubmitError};
use crate::pcie::controller::{Controller, DmaRegion, InitError, Mapped, NamespaceInfo};
use crate::pcie::prp;

/// One caller command: the unit `submit` takes and `poll` hands back.
struct Req {
    busy: bool,
    tag: u64,
    buf: Option<DmaBuf>,
    /// `(iova, len)` of a mapping made for this command alone.
    own_map: Option<(u64, usize)>,
    /// NVMe commands of this request still at the controller.
    parts_left: u16,
    /// The first error a part reported.
    result: Result<(), IoError>,
}

/// PRP list pages per command identifier, at most (a 1 MiB part needs one).
const MAX_LIST_PAGES: usize = 4;

/// One NVMe command identifier.
struct Slot {
    busy: bool,
    req: u16,
    lba: Lba,
    deadline: Instant,
    /// The command exceeded `io_timeout` and was aborted.
    timed_out: bool,
    /// When an abort that did not bring the command back counts as a hung controller.
    abort_deadline: Option<Instant>,
}

/// One I/O queue pair. See the module documentation.
pub struct NvmeDevice {
    ctrl: Arc<Controller>,
    info: DeviceInfo,
    ns: NamespaceInfo,
    /// Device blocks per Sluice block (4096 / namespace block size).
    scale: u64,
    qid: u16,
    entries: u32,
    mem: DmaRegion,
    cq_off: usize,
    lists_off: usize,
    list_pages: usize,
    sq_tail: u32,
    sq_doorbell_at: u32,
    cq_head: u32,
    phase: bool,
    slots: Box<[Slot]>,
    free: Vec<u16>,
    reqs: Box<[Req]>,
    free_reqs: Vec<u16>,
    /// Largest NVMe data command (MDTS, and 65536 device blocks), in Sluice blocks.
    part_blocks: u64,
    /// Most NVMe commands one caller command may take (`depth` of them always fit).
    max_parts: usize,
    /// Requests accepted and not yet handed back.
    in_flight: usize,
    /// Completions made without the controller (trim on a device without DSM, failures
    /// after a reset).
    local: VecDeque<Completion>,
    pools: Vec<Mapped>,
    /// IOVA space for per-command mappings: one `window_stride` per request slot.
    window_iova: u64,
    window_stride: u64,
    generation: u64,
    dead: bool,
    polls: u64,
    sq_doorbell: usize,
    cq_doorbell: usize,
}

// SAFETY: the raw pointers inside (through DmaRegion) point into memory this queue pair
// owns; it is used by one thread at a time, as BlockDevice requires.
unsafe impl Send for NvmeDevice {}

impl std::fmt::Debug for NvmeDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmeDevice")
            .field("name", &self.info.name)
            .field("qid", &self.qid)
            .field("entries", &self.entries)
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl Controller {
    /// Creates an I/O queue pair on namespace `nsid` with queues of
    /// `Options::io_queue_entries`. Buffers of `pools` are mapped once, here; others are
    /// mapped per command.
    pub fn queue_pair(
        self: &Arc<Self>,
        nsid: u32,
        pools: &[DmaPool],
    ) -> Result<NvmeDevice, InitError> {
        self.queue_pair_sized(nsid, None, pools)
    }

    /// As [`queue_pair`](Self::queue_pair), with queues sized so that `depth` commands
    /// of the largest size fit (as far as CAP.MQES allows: check `info().queue_depth`).
    pub fn queue_pair_with_depth(
        self: &Arc<Self>,
        nsid: u32,
        depth: usize,
        pools: &[DmaPool],
    ) -> Result<NvmeDevice, InitError> {
        self.queue_pair_sized(nsid, Some(depth), pools)
    }

    fn queue_pair_sized(
        self: &Arc<Self>,
        nsid: u32,
        want_depth: Option<usize>,
        pools: &[DmaPool],
    ) -> Result<NvmeDevice, InitError> {
        if self.failed.load(Ordering::Acquire) {
            return Err(InitError::Failed);
        }
        let ns =
            self.info.namespaces.iter().find(|n| n.nsid == nsid).cloned().ok_or_else(|| {
                InitError::NoNamespace {
                    nsid,
                    active: self.info.namespaces.iter().map(|n| n.nsid).collect(),
                }
            })?;
        let mut part_bytes = default_max_transfer_blocks() as usize * BLOCK_SIZE_BYTES;
        if let Some(m) = self.info.max_transfer_bytes {
            part_bytes = part_bytes.min(m);
        }
        if part_bytes < BLOCK_SIZE_BYTES {
            return Err(InitError::Unsupported(format!(
                "the controller's largest transfer ({part_bytes} bytes) is below one block"
            )));
        }
        let scale = (BLOCK_SIZE_BYTES / ns.lba_bytes as usize) as u64;
        // NLB is 16 bits in device blocks.
        let part_blocks = (part_bytes / BLOCK_SIZE_BYTES).min((65536 / scale) as usize);
        let full_parts = (default_max_transfer_blocks() as usize).div_ceil(part_blocks);
        let entries = match want_depth {
            Some(d) => u32::try_from(d.max(1) * full_parts + 1).unwrap_or(u32::MAX),
            None => self.opts.io_queue_entries,
        }
        .clamp(2, self.info.cap.max_queue_entries);
        // The ring keeps one entry free: one command identifier per other entry.
        let cids = entries as usize - 1;
        // A caller command may take up to `max_parts` identifiers; `depth` such commands
        // always fit, so a command within the depth is never refused for want of room.
        let max_parts = full_parts.min(cids / 2).max(1);
        let depth = cids / max_parts;
        let max_blocks = (part_blocks * max_parts).min(default_max_transfer_blocks() as usize);
        let max_bytes = max_blocks * BLOCK_SIZE_BYTES;
        let list_pages =
            prp::list_pages_needed(prp::PAGE - 4, part_blocks * BLOCK_SIZE_BYTES).max(1);
        let sq_bytes = (entries as usize * 64).next_multiple_of(4096);
        let cq_bytes = (entries as usize * 16).next_multiple_of(4096);
        let lists_off = sq_bytes + cq_bytes;
        assert!(list_pages <= MAX_LIST_PAGES, "{list_pages} PRP list pages per command");
        let window_stride = (max_bytes as u64).next_multiple_of(4096);
        let window_bytes = window_stride * depth as u64;
        let qid = self.take_qid()?;
        let mem = match self.alloc_region(lists_off + cids * list_pages * 4096) {
            Ok(m) => m,
            Err(e) => {
                self.put_qid(qid);
                return Err(e);
            }
        };
        // Undo what was set up so far when a later step fails.
        let undo = |mem: &DmaRegion, window: Option<u64>| {
            self.free_region(mem);
            if let Some(w) = window {
                self.release_iova(w, window_bytes);
            }
            self.put_qid(qid);
        };
        let mapped = match pools.iter().map(|p| self.map_pool(p)).collect::<Result<Vec<_>, _>>() {
            Ok(m) => m,
            Err(e) => {
                undo(&mem, None);
                return Err(e);
            }
        };
        let window_iova = match self.reserve_iova(window_bytes) {
            Ok(w) => w,
            Err(e) => {
                undo(&mem, None);
                return Err(e);
            }
        };
        let generation =
            match self.create_io_queue(qid, entries, mem.iova, mem.iova + sq_bytes as u64) {
                Ok(g) => g,
                Err(e @ InitError::QueueStuck { .. }) => {
                    // The controller may still write there: keep the memory.
                    log::error!("{}: {e}; leaking the queue's memory", self.name);
                    std::mem::forget(mem);
                    return Err(e);
                }
                Err(e) => {
                    undo(&mem, Some(window_iova));
                    return Err(e);
                }
            };
        let cap = self.info.cap;
        let now = Instant::now();
        let info = DeviceInfo {
            name: format!("{}/{}", self.name, nsid),
            block_size: BLOCK_SIZE_BYTES,
            num_blocks: ns.size_bytes() / BLOCK_SIZE_BYTES as u64,
            queue_depth: depth,
            max_transfer_blocks: max_blocks as u64,
        };
        Ok(NvmeDevice {
            ctrl: Arc::clone(self),
            info,
            ns,
            scale,
            qid,
            entries,
            mem,
            cq_off: sq_bytes,
            lists_off,
            list_pages,
            sq_tail: 0,
            sq_doorbell_at: 0,
            cq_head: 0,
            phase: true,
            slots: (0..cids)
                .map(|_| Slot {
                    busy: false,
                    req: 0,
                    lba: Lba(0),
                    deadline: now,
                    timed_out: false,
                    abort_deadline: None,
                })
                .collect(),
            free: (0..cids as u16).rev().collect(),
            reqs: (0..depth)
                .map(|_| Req {
                    busy: false,
                    tag: 0,
                    buf: None,
                    own_map: None,
                    parts_left: 0,
                    result: Ok(()),
                })
                .collect(),
            free_reqs: (0..depth as u16).rev().collect(),
            part_blocks: part_blocks as u64,
            max_parts,
            in_flight: 0,
            local: VecDeque::new(),
            pools: mapped,
            window_iova,
            window_stride,
            generation,
            dead: false,
            polls: 0,
            sq_doorbell: cap.sq_doorbell(qid),
            cq_doorbell: cap.cq_doorbell(qid),
        })
    }
}

impl NvmeDevice {
    /// The controller this queue pair belongs to.
    pub fn controller(&self) -> &Arc<Controller> {
        &self.ctrl
    }

    /// The namespace behind this queue pair.
    pub fn namespace(&self) -> &NamespaceInfo {
        &self.ns
    }

    /// The I/O queue identifier at the controller.
    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// The IOVAs of command `cid`'s PRP list pages (the first `list_pages` entries).
    fn list_iovas(&self, cid: u16) -> [u64; MAX_LIST_PAGES] {
        let base = self.lists_off + cid as usize * self.list_pages * 4096;
        std::array::from_fn(|i| self.mem.iova + (base + i * 4096) as u64)
    }

    fn list_ptr(&self, cid: u16, page: usize, slot: usize) -> *mut u64 {
        let off = self.lists_off + (cid as usize * self.list_pages + page) * 4096 + slot * 8;
        self.mem.ptr(off).cast::<u64>()
    }

    /// The IOVA of `buf` and the mapping made for it, if it needed one.
    fn dma_address(&self, req: u16, buf: &DmaBuf) -> Result<(u64, Option<(u64, usize)>), ()> {
        let va = buf.as_ptr() as usize;
        if let Some(m) = self.pools.iter().find(|m| va >= m.va && va + buf.len() <= m.va + m.len) {
            return Ok((m.iova + (va - m.va) as u64, None));
        }
        let iova = self.window_iova + u64::from(req) * self.window_stride;
        // Buffers start page aligned; map the pages the transfer touches.
        let len = buf.len().max(1).next_multiple_of(4096);
        if len as u64 > self.window_stride {
            return Err(());
        }
        // SAFETY: the buffer moves into the slot with the command and comes back only at
        // completion, after release_mapping (or is leaked with the queue).
        match unsafe { self.ctrl.map(buf.as_ptr().cast_mut(), len, iova) } {
            Ok(()) => Ok((iova, Some((iova, len)))),
            Err(e) => {
                log::error!("{}: {e}", self.info.name);
                Err(())
            }
        }
    }

    fn release_mapping(&self, own: Option<(u64, usize)>) {
        if let Some((iova, len)) = own
            && let Err(e) = self.ctrl.unmap(iova, len)
        {
            log::error!("{}: {e}", self.info.name);
        }
    }

    /// Fails every command in flight (after a reset or when the controller is gone) and
    /// recreates the queues if the controller is back.
    fn recover(&mut self) {
        let dead = self.ctrl.failed.load(Ordering::Acquire);
        // A failed controller whose DMA could not be stopped may still write what it was
        // given: those buffers are kept (leaked), never handed back for reuse.
        let keep_buffers = dead && !self.ctrl.dma_stopped.load(Ordering::Acquire);
        let mut timed_out = vec![false; self.reqs.len()];
        for slot in self.slots.iter_mut() {
            if slot.busy && slot.timed_out {
                timed_out[slot.req as usize] = true;
            }
            slot.busy = false;
        }
        self.free = (0..self.slots.len() as u16).rev().collect();
        for (r, &timed_out) in timed_out.iter().enumerate() {
            if !self.reqs[r].busy {
                continue;
            }
            let own = self.reqs[r].own_map.take();
            // The controller was disabled: it no longer reaches this memory.
            self.release_mapping(own);
            let q = &mut self.reqs[r];
            q.busy = false;
            let result = Err(if timed_out {
                IoError::Timeout
            } else if dead {
                IoError::DeviceGone
            } else {
                IoError::Aborted
            });
            let mut buf = q.buf.take();
            if keep_buffers {
                std::mem::forget(buf.take());
            }
            self.local.push_back(Completion { tag: q.tag, result, buf });
            self.free_reqs.push(r as u16);
        }
        self.in_flight = 0;
        self.generation = self.ctrl.generation.load(Ordering::Acquire);
        self.sq_tail = 0;
        self.sq_doorbell_at = 0;
        self.cq_head = 0;
        self.phase = true;
        if dead {
            self.dead = true;
            return;
        }
        // The controller is disabled-and-enabled: our queues are gone there.
        self.mem.zero();
        let sq = self.mem.iova;
        let cq = self.mem.iova + self.cq_off as u64;
        match self.ctrl.create_io_queue(self.qid, self.entries, sq, cq) {
            Ok(generation) => self.generation = generation,
            Err(e) => {
                log::error!("{}: recreating queue {} after reset: {e}", self.info.name, self.qid);
                self.dead = true;
            }
        }
    }

    fn check_timeouts(&mut self, now: Instant) {
        if self.ctrl.generation.load(Ordering::Acquire) != self.generation {
            // Reset since we last looked: the next poll fails and recreates, no abort.
            return;
        }
        let timeout = self.ctrl.opts.io_timeout;
        let mut reset = None;
        for cid in 0..self.slots.len() {
            let s = &self.slots[cid];
            if !s.busy {
                continue;
            }
            if let Some(d) = s.abort_deadline {
                if now >= d {
                    reset =
                        Some(format!("command {cid} on queue {} not back after abort", self.qid));
                    break;
                }
                continue;
            }
            if now < s.deadline {
                continue;
            }
            log::warn!(
                "{}: command {cid} on queue {} at {} exceeded {timeout:?}; aborting it",
                self.info.name,
                self.qid,
                s.lba
            );
            self.slots[cid].timed_out = true;
            self.slots[cid].abort_deadline = Some(now + timeout);
            match self.ctrl.abort(self.qid, cid as u16) {
                Ok(true) => {}
                Ok(false) => log::warn!("{}: controller declined the abort", self.info.name),
                Err(e) => {
                    reset = Some(format!("abort failed: {e}"));
                    break;
                }
            }
        }
        if let Some(why) = reset {
            let _ = self.ctrl.reset(self.generation, &why);
        }
    }

    fn reap(&mut self, max: usize, sink: &mut dyn FnMut(Completion)) -> usize {
        let mut n = 0;
        let mut moved = false;
        while n < max {
            let at = self.mem.ptr(self.cq_off + self.cq_head as usize * 16).cast::<Cqe>();
            // SAFETY: inside our CQ; the controller writes it, we read volatile.
            let status_phase = unsafe { std::ptr::read_volatile(&raw const (*at).status_phase) };
            if (status_phase & 1 != 0) != self.phase {
                break;
            }
            std::sync::atomic::fence(Ordering::Acquire);
            // SAFETY: as above; the phase matched, so the entry is complete.
            let c = unsafe { std::ptr::read_volatile(at) };
            self.cq_head += 1;
            if self.cq_head == self.entries {
                self.cq_head = 0;
                self.phase = !self.phase;
            }
            moved = true;
            let cid = c.cid as usize;
            if c.sq_id != self.qid || cid >= self.slots.len() || !self.slots[cid].busy {
                log::error!(
                    "{}: completion for unknown command (sq {}, cid {cid}); ignored",
                    self.info.name,
                    c.sq_id
                );
                continue;
            }
            let s = &mut self.slots[cid];
            s.busy = false;
            let st = c.status();
            let result = match IoError::from_status(st, s.lba) {
                None => Ok(()),
                Some(IoError::Aborted) if s.timed_out => Err(IoError::Timeout),
                Some(e) => Err(e),
            };
            if st.sct == status::SCT_GENERIC && st.sc == status::SC_INVALID_FIELD {
                log::warn!("{}: controller rejected a command at {}", self.info.name, s.lba);
            }
            let r = s.req as usize;
            self.free.push(cid as u16);
            let q = &mut self.reqs[r];
            debug_assert!(q.busy && q.parts_left > 0);
            q.parts_left -= 1;
            if q.result.is_ok() {
                q.result = result;
            }
            if q.parts_left > 0 {
                continue;
            }
            q.busy = false;
            let (tag, result, buf, own) = (q.tag, q.result, q.buf.take(), q.own_map.take());
            self.release_mapping(own);
            self.free_reqs.push(r as u16);
            self.in_flight -= 1;
            sink(Completion { tag, result, buf });
            n += 1;
        }
        if moved {
            self.ctrl.regs.write32(self.cq_doorbell, self.cq_head);
        }
        n
    }

    fn build_sqe(
        &self,
        cid: u16,
        cmd: &IoCommand,
        data: Option<u64>,
        len: usize,
    ) -> Result<Sqe, RejectReason> {
        let nsid = self.ns.nsid;
        let scaled = match *cmd {
            IoCommand::Read { lba, blocks } => {
                IoCommand::Read { lba: Lba(lba.0 * self.scale), blocks: self.dev_blocks(blocks) }
            }
            IoCommand::Write { lba, blocks, fua } => IoCommand::Write {
                lba: Lba(lba.0 * self.scale),
                blocks: self.dev_blocks(blocks),
                fua,
            },
            IoCommand::WriteZeroes { lba, blocks } => {
                if blocks.0 * self.scale > 65536 {
                    return Err(RejectReason::Invalid(
                        "write-zeroes range beyond 65536 device blocks",
                    ));
                }
                IoCommand::WriteZeroes {
                    lba: Lba(lba.0 * self.scale),
                    blocks: self.dev_blocks(blocks),
                }
            }
            IoCommand::Trim { lba, blocks } => {
                let nlb = u32::try_from(blocks.0 * self.scale)
                    .map_err(|_| RejectReason::Invalid("trim range too long"))?;
                let range = DsmRange { context_attributes: 0, nlb, slba: lba.0 * self.scale };
                let bytes = range.to_bytes();
                let dst = self.list_ptr(cid, 0, 0).cast::<u8>();
                // SAFETY: the slot's first list page is ours until the command completes.
                unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, 16) };
                let iova = self.list_iovas(cid)[0];
                return Ok(cmd.to_sqe(cid, nsid, iova, 0));
            }
            IoCommand::Flush => IoCommand::Flush,
        };
        let (prp1, prp2) = match data {
            Some(iova) => {
                let lists = self.list_iovas(cid);
                prp::build(iova, len, &lists[..self.list_pages], &mut |page, slot, v| {
                    // SAFETY: the slot's list pages are ours until the command completes.
                    unsafe { std::ptr::write_volatile(self.list_ptr(cid, page, slot), v) }
                })
                .map_err(|e| {
                    log::error!("{}: PRP: {e}", self.info.name);
                    RejectReason::Invalid("data buffer cannot be described by PRPs")
                })?
            }
            None => (0, 0),
        };
        Ok(scaled.to_sqe(cid, nsid, prp1, prp2))
    }

    fn dev_blocks(&self, b: BlockCount) -> BlockCount {
        BlockCount(b.0 * self.scale)
    }
}

impl BlockDevice for NvmeDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn submit(&mut self, cmd: IoCommand, buf: Option<DmaBuf>, tag: u64) -> Result<(), SubmitError> {
        if let Err(reason) = validate(&self.info, &cmd, buf.as_ref()) {
            return Err(SubmitError { reason, buf });
        }
        if self.ctrl.generation.load(Ordering::Acquire) != self.generation {
            self.recover();
        }
        if self.dead {
            return Err(SubmitError { reason: RejectReason::DeviceGone, buf });
        }
        match cmd {
            IoCommand::WriteZeroes { .. } if !self.ctrl.info.supports_write_zeroes() => {
                return Err(SubmitError {
                    reason: RejectReason::Invalid("controller does not support write zeroes"),
                    buf,
                });
            }
            IoCommand::Trim { .. } if !self.ctrl.info.supports_dsm() => {
                // Trim is advisory: without DSM the blocks keep their data, which the
                // contract allows.
                self.local.push_back(Completion { tag, result: Ok(()), buf });
                return Ok(());
            }
            _ => {}
        }
        // Data commands above the controller's limit go as several NVMe commands.
        // Write zeroes moves no data, so MDTS does not limit it; NLB (16 bits) does.
        let part_blocks = match cmd {
            IoCommand::WriteZeroes { .. } => 65536 / self.scale,
            _ => self.part_blocks,
        };
        let parts = match cmd {
            IoCommand::Read { blocks, .. }
            | IoCommand::Write { blocks, .. }
            | IoCommand::WriteZeroes { blocks, .. } => blocks.0.div_ceil(part_blocks) as usize,
            _ => 1,
        };
        if parts > self.max_parts {
            return Err(SubmitError {
                reason: RejectReason::Invalid("write-zeroes range longer than this queue can take"),
                buf,
            });
        }
        if self.free.len() < parts || self.free_reqs.is_empty() {
            return Err(SubmitError { reason: RejectReason::QueueFull, buf });
        }
        let req = *self.free_reqs.last().expect("checked non-empty");
        let (data, own_map) = match &buf {
            Some(b) => match self.dma_address(req, b) {
                Ok((iova, own)) => (Some(iova), own),
                Err(()) => {
                    return Err(SubmitError {
                        reason: RejectReason::Invalid("buffer could not be mapped for DMA"),
                        buf,
                    });
                }
            },
            None => (None, None),
        };
        // Write every part's SQE past the tail first; the tail (and so what the
        // controller may fetch) moves only once all of them are built.
        let first_lba = cmd.range().map_or(Lba(0), |r| r.0);
        let n = self.free.len();
        for k in 0..parts {
            let cid = self.free[n - 1 - k];
            let (part, iova, len) = match cmd {
                IoCommand::Read { lba, blocks }
                | IoCommand::Write { lba, blocks, .. }
                | IoCommand::WriteZeroes { lba, blocks } => {
                    let off = k as u64 * part_blocks;
                    let nb = BlockCount(part_blocks.min(blocks.0 - off));
                    let plba = Lba(lba.0 + off);
                    let part = match cmd {
                        IoCommand::Write { fua, .. } => {
                            IoCommand::Write { lba: plba, blocks: nb, fua }
                        }
                        IoCommand::WriteZeroes { .. } => {
                            IoCommand::WriteZeroes { lba: plba, blocks: nb }
                        }
                        _ => IoCommand::Read { lba: plba, blocks: nb },
                    };
                    let iova = data.map(|d| d + off * BLOCK_SIZE_BYTES as u64);
                    (part, iova, if data.is_some() { nb.bytes() as usize } else { 0 })
                }
                other => (other, None, 0),
            };
            let sqe = match self.build_sqe(cid, &part, iova, len) {
                Ok(s) => s,
                Err(reason) => {
                    self.release_mapping(own_map);
                    return Err(SubmitError { reason, buf });
                }
            };
            let pos = (self.sq_tail as usize + k) % self.entries as usize;
            let at = self.mem.ptr(pos * 64).cast::<Sqe>();
            // SAFETY: inside our SQ; the entry is free (the ring has one more entry than
            // command identifiers, so the tail never reaches an unconsumed entry).
            unsafe { std::ptr::write_volatile(at, sqe) };
        }
        let deadline = Instant::now() + self.ctrl.opts.io_timeout;
        for k in 0..parts {
            let cid = self.free.pop().expect("counted above");
            let s = &mut self.slots[cid as usize];
            debug_assert!(!s.busy);
            let lba = Lba(first_lba.0 + k as u64 * part_blocks);
            *s = Slot { busy: true, req, lba, deadline, timed_out: false, abort_deadline: None };
        }
        self.sq_tail = (self.sq_tail + parts as u32) % self.entries;
        self.free_reqs.pop();
        let q = &mut self.reqs[req as usize];
        debug_assert!(!q.busy);
        *q = Req { busy: true, tag, buf, own_map, parts_left: parts as u16, result: Ok(()) };
        self.in_flight += 1;
        Ok(())
    }

    fn kick(&mut self) -> Result<(), IoError> {
        if self.dead {
            // Completions still to hand out (those of a reset) come from poll.
            return if self.in_flight() == 0 { Err(IoError::DeviceGone) } else { Ok(()) };
        }
        if self.sq_tail != self.sq_doorbell_at {
            // The SQEs (and PRP lists) must be visible before the doorbell.
            std::sync::atomic::fence(Ordering::SeqCst);
            self.ctrl.regs.write32(self.sq_doorbell, self.sq_tail);
            self.sq_doorbell_at = self.sq_tail;
        }
        Ok(())
    }

    fn poll(&mut self, max: usize, sink: &mut dyn FnMut(Completion)) -> usize {
        if self.ctrl.generation.load(Ordering::Acquire) != self.generation {
            self.recover();
        }
        let mut n = 0;
        while n < max {
            let Some(c) = self.local.pop_front() else { break };
            sink(c);
            n += 1;
        }
        if self.in_flight == 0 || n == max {
            return n;
        }
        n += self.reap(max - n, sink);
        self.polls += 1;
        if self.in_flight > 0 && self.polls.is_multiple_of(64) {
            self.check_timeouts(Instant::now());
        }
        n
    }

    fn in_flight(&self) -> usize {
        self.in_flight + self.local.len()
    }
}

impl Drop for NvmeDevice {
    fn drop(&mut self) {
        if self.ctrl.generation.load(Ordering::Acquire) != self.generation {
            self.recover();
        }
        let deadline = Instant::now() + self.ctrl.opts.io_timeout;
        while self.in_flight > 0 && !self.dead && Instant::now() < deadline {
            self.poll(usize::MAX, &mut |_| {});
            std::thread::yield_now();
        }
        // Once its submission and completion queues are deleted (or the controller is
        // disabled for good), the controller reaches none of this queue's memory.
        let quiet = if self.dead {
            self.ctrl.failed.load(Ordering::Acquire)
                && self.ctrl.dma_stopped.load(Ordering::Acquire)
        } else {
            match self.ctrl.delete_io_queue(self.qid) {
                Ok(()) => true,
                Err(e) => {
                    log::error!("{}: deleting queue {}: {e}", self.info.name, self.qid);
                    false
                }
            }
        };
        if quiet {
            for r in 0..self.reqs.len() {
                let own = self.reqs[r].own_map.take();
                self.release_mapping(own);
            }
            self.ctrl.put_qid(self.qid);
            self.ctrl.free_region(&self.mem);
            self.ctrl.release_iova(self.window_iova, self.window_stride * self.reqs.len() as u64);
            return;
        }
        // Commands may still be at the controller: leave their memory allocated and
        // mapped rather than let a device write freed pages.
        log::error!(
            "{}: queue {} dropped with {} command(s) in flight; leaking its memory",
            self.info.name,
            self.qid,
            self.in_flight
        );
        for q in self.reqs.iter_mut() {
            if let Some(b) = q.buf.take() {
                std::mem::forget(b);
            }
        }
        let mem = std::mem::replace(&mut self.mem, DmaRegion::empty());
        std::mem::forget(mem);
    }
}

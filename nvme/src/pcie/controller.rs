//! Controller bring-up, the admin queue, reset and shutdown.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::command::{Cqe, Sqe};
use crate::dma::{DmaBuf, DmaPool, PoolKeepalive, PoolOptions};
use crate::pcie::iova::IovaSpace;
use crate::pcie::{Cap, DmaMapper, MapError, Regs, prp, reg};

/// Admin command opcodes (NVMe base specification, "Admin Command Set").
pub mod admin_opcode {
    pub const DELETE_SQ: u8 = 0x00;
    pub const CREATE_SQ: u8 = 0x01;
    pub const DELETE_CQ: u8 = 0x04;
    pub const CREATE_CQ: u8 = 0x05;
    pub const IDENTIFY: u8 = 0x06;
    pub const ABORT: u8 = 0x08;
    pub const SET_FEATURES: u8 = 0x09;
}

/// Identify CNS values.
pub mod cns {
    pub const NAMESPACE: u32 = 0x00;
    pub const CONTROLLER: u32 = 0x01;
    pub const ACTIVE_NAMESPACES: u32 = 0x02;
}

/// Feature identifier: Number of Queues.
pub const FEATURE_NUM_QUEUES: u32 = 0x07;

/// How the driver sets the controller up.
#[derive(Debug, Clone)]
pub struct Options {
    /// Entries of each I/O submission and completion queue (the queue pair's depth is
    /// one less). Capped at CAP.MQES + 1.
    pub io_queue_entries: u32,
    /// I/O queue pairs to ask the controller for (one per core).
    pub io_queues: u16,
    /// A command not completed after this long is aborted; if the abort does not
    /// complete it within another such period, the controller is reset.
    pub io_timeout: Duration,
    /// How long an admin command may take before the controller counts as hung.
    pub admin_timeout: Duration,
    /// Queue memory and the driver's own buffers from 2 MiB hugepages.
    pub hugepages: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            io_queue_entries: 256,
            io_queues: 8,
            io_timeout: Duration::from_secs(10),
            admin_timeout: Duration::from_secs(5),
            hugepages: false,
        }
    }
}

/// Why the controller could not be brought up or a queue pair created.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{0}")]
    Unsupported(String),
    #[error("controller did not become {want} within {ms} ms (CAP.TO), CSTS={csts:#x}")]
    NotReady { want: &'static str, ms: u64, csts: u32 },
    #[error("controller reports a fatal status (CSTS.CFS)")]
    Fatal,
    #[error("admin command {opcode:#04x} failed: {why}")]
    Admin { opcode: u8, why: String },
    #[error("DMA memory: {0}")]
    Memory(std::io::Error),
    #[error(transparent)]
    Map(#[from] MapError),
    #[error("namespace {nsid} does not exist (active namespaces: {active:?})")]
    NoNamespace { nsid: u32, active: Vec<u32> },
    #[error("all {0} I/O queue pairs the controller granted are in use")]
    NoQueue(u16),
    #[error("controller failed and could not be reset")]
    Failed,
    #[error("the controller does not respond (registers read all ones: removed from the bus?)")]
    NotResponding,
    #[error("no I/O virtual address space left for {0} bytes")]
    NoIova(u64),
    /// Creating queue `qid` failed and its completion queue could not be deleted: the
    /// controller may still write the queue's memory, which must be kept.
    #[error("queue {qid}: {why}")]
    QueueStuck { qid: u16, why: String },
}

/// One namespace, from Identify Namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub nsid: u32,
    /// Bytes per logical block of the namespace's current format.
    pub lba_bytes: u32,
    /// Size in the namespace's logical blocks (NSZE).
    pub lbas: u64,
}

impl NamespaceInfo {
    pub fn size_bytes(&self) -> u64 {
        self.lbas * u64::from(self.lba_bytes)
    }
}

/// What Identify Controller said, and what the controller granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerInfo {
    pub vid: u16,
    pub serial: String,
    pub model: String,
    pub firmware: String,
    /// NVMe version (VS): major, minor, tertiary.
    pub version: (u16, u8, u8),
    /// Largest transfer per command in bytes (MDTS); `None`: no limit.
    pub max_transfer_bytes: Option<usize>,
    /// Volatile write cache present (flush matters).
    pub volatile_write_cache: bool,
    /// Optional NVM command support (ONCS): bit 2 DSM, bit 3 write zeroes.
    pub oncs: u16,
    pub namespaces: Vec<NamespaceInfo>,
    /// I/O queue pairs granted by Set Features (Number of Queues).
    pub io_queues: u16,
    pub cap: Cap,
    /// RTD3 entry latency (Identify Controller): how long a shutdown may take, in
    /// microseconds (0: not reported).
    pub rtd3e_us: u32,
}

impl ControllerInfo {
    pub fn supports_write_zeroes(&self) -> bool {
        self.oncs & (1 << 3) != 0
    }
    pub fn supports_dsm(&self) -> bool {
        self.oncs & (1 << 2) != 0
    }
}

/// Memory the controller reaches by DMA: one contiguous mapping at `iova`.
pub(crate) struct DmaRegion {
    buf: DmaBuf,
    pub(crate) iova: u64,
}

impl DmaRegion {
    /// A placeholder that maps nothing (for moving a region out to leak it).
    pub(crate) fn empty() -> DmaRegion {
        DmaRegion { buf: DmaBuf::new(0), iova: 0 }
    }

    pub(crate) fn len(&self) -> usize {
        self.buf.capacity()
    }

    /// A raw pointer `off` bytes in. The device may write this memory at any time:
    /// access it with volatile operations only.
    pub(crate) fn ptr(&self, off: usize) -> *mut u8 {
        assert!(off < self.len(), "DMA region access at {off} beyond {}", self.len());
        // SAFETY: off is within the region's allocation.
        unsafe { self.buf.as_ptr().cast_mut().add(off) }
    }

    pub(crate) fn zero(&self) {
        // SAFETY: the region is ours and the device is not using it (callers zero only
        // queues that are not created at the controller).
        unsafe { std::ptr::write_bytes(self.ptr(0), 0, self.len()) };
    }
}

struct AdminQueue {
    mem: DmaRegion,
    entries: u32,
    tail: u32,
    head: u32,
    phase: bool,
    next_cid: u16,
}

/// Offsets inside the admin region: SQ, CQ, one data page.
const ADMIN_ENTRIES: u32 = 32;
const ADMIN_SQ: usize = 0;
const ADMIN_CQ: usize = 4096;
const ADMIN_DATA: usize = 8192;
const ADMIN_REGION: usize = 12288;

/// Shutdown waits at least this long (CAP.TO covers enabling, not shutting down).
const MIN_SHUTDOWN_MS: u64 = 10_000;

/// A pool of the caller's mapped for DMA: `(pool id, region start, length, iova)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mapped {
    pub(crate) pool: u64,
    pub(crate) va: usize,
    pub(crate) len: usize,
    pub(crate) iova: u64,
}

/// A controller driven from userspace. Shared (`Arc`) by its queue pairs; shut down
/// (CC.SHN) when the last of them and the caller's handle are gone.
pub struct Controller {
    pub(crate) regs: Box<dyn Regs>,
    iommu: Box<dyn DmaMapper>,
    pub(crate) info: ControllerInfo,
    pub(crate) opts: Options,
    pub(crate) name: String,
    admin: Mutex<AdminQueue>,
    /// Bumped by every reset; queue pairs recreate their queues when it moves.
    pub(crate) generation: AtomicU64,
    pub(crate) failed: AtomicBool,
    /// A failed controller's DMA is known stopped (disabled, or bus mastering off):
    /// memory it was given may be reused.
    pub(crate) dma_stopped: AtomicBool,
    iova: Mutex<IovaSpace>,
    qids: Mutex<Vec<bool>>,
    pools: Mutex<Vec<(Mapped, PoolKeepalive)>>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("name", &self.name)
            .field("model", &self.info.model)
            .field("serial", &self.info.serial)
            .field("generation", &self.generation.load(Ordering::Relaxed))
            .finish()
    }
}

fn trimmed(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim_end_matches([' ', '\0']).to_string()
}

impl Controller {
    /// Resets and enables the controller behind `regs`, identifies it and its
    /// namespaces and asks for `opts.io_queues` I/O queue pairs.
    pub fn init(
        regs: Box<dyn Regs>,
        iommu: Box<dyn DmaMapper>,
        name: String,
        opts: Options,
    ) -> Result<Arc<Controller>, InitError> {
        let raw_cap = regs.read64(reg::CAP);
        if raw_cap == u64::MAX {
            return Err(InitError::NotResponding);
        }
        let cap = Cap::decode(raw_cap);
        if cap.max_queue_entries < 2 {
            return Err(InitError::Unsupported(format!(
                "CAP.MQES allows {} queue entries (at least 2 needed)",
                cap.max_queue_entries
            )));
        }
        if !cap.nvm_command_set {
            return Err(InitError::Unsupported("controller lacks the NVM command set".into()));
        }
        if !(cap.mps_min_shift..=cap.mps_max_shift).contains(&12) {
            return Err(InitError::Unsupported(format!(
                "controller page sizes 2^{}..2^{} exclude 4 KiB",
                cap.mps_min_shift, cap.mps_max_shift
            )));
        }
        let vs = regs.read32(reg::VS);
        let iova = Mutex::new(IovaSpace::new(&iommu.iova_ranges()));
        let mem = alloc_region(&*iommu, &iova, ADMIN_REGION, opts.hugepages)?;
        let admin =
            AdminQueue { mem, entries: ADMIN_ENTRIES, tail: 0, head: 0, phase: true, next_cid: 0 };
        let info = ControllerInfo {
            vid: 0,
            serial: String::new(),
            model: String::new(),
            firmware: String::new(),
            version: ((vs >> 16) as u16, (vs >> 8) as u8, vs as u8),
            max_transfer_bytes: None,
            volatile_write_cache: false,
            oncs: 0,
            namespaces: Vec::new(),
            io_queues: 0,
            cap,
            rtd3e_us: 0,
        };
        let ctrl = Controller {
            regs,
            iommu,
            info,
            opts,
            name,
            admin: Mutex::new(admin),
            generation: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            dma_stopped: AtomicBool::new(false),
            iova,
            qids: Mutex::new(Vec::new()),
            pools: Mutex::new(Vec::new()),
        };
        {
            let mut aq = ctrl.admin.lock().expect("admin lock");
            ctrl.enable(&mut aq)?;
        }
        let mut ctrl = ctrl;
        ctrl.identify()?;
        let granted = {
            let mut aq = ctrl.admin.lock().expect("admin lock");
            ctrl.set_num_queues(&mut aq)?
        };
        // Every doorbell of the granted queues must lie inside the register space.
        let last = cap.cq_doorbell(granted) + 4;
        if last > ctrl.regs.bar_bytes() {
            return Err(InitError::Unsupported(format!(
                "doorbells of {granted} queues at stride {} end at {last:#x}, beyond the {:#x}-byte BAR",
                4 << cap.dstrd,
                ctrl.regs.bar_bytes()
            )));
        }
        ctrl.info.io_queues = granted;
        *ctrl.qids.lock().expect("qid lock") = vec![false; granted as usize + 1];
        log::info!(
            "{}: {} (serial {}, firmware {}), NVMe {}.{}.{}, {} namespace(s), {} I/O queue pair(s), MQES {}, DSTRD {}, TO {} ms",
            ctrl.name,
            ctrl.info.model,
            ctrl.info.serial,
            ctrl.info.firmware,
            ctrl.info.version.0,
            ctrl.info.version.1,
            ctrl.info.version.2,
            ctrl.info.namespaces.len(),
            granted,
            cap.max_queue_entries,
            cap.dstrd,
            cap.timeout_ms
        );
        Ok(Arc::new(ctrl))
    }

    pub fn info(&self) -> &ControllerInfo {
        &self.info
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn cap(&self) -> Cap {
        self.info.cap
    }

    /// Disables the controller (CC.EN = 0) and waits for CSTS.RDY = 0.
    fn disable(&self) -> Result<(), InitError> {
        let cc = self.regs.read32(reg::CC);
        if cc == u32::MAX {
            return Err(InitError::NotResponding);
        }
        if cc & reg::CC_EN != 0 {
            // Clearing EN while an enable is still in progress (RDY not yet 1) is
            // undefined on some controllers: let it finish first (bounded; a controller
            // that never gets ready is disabled anyway).
            let _ = self.wait_csts(|c| c & (reg::CSTS_RDY | reg::CSTS_CFS) != 0, "ready", None);
            self.regs.write32(reg::CC, cc & !reg::CC_EN);
        }
        self.wait_csts(|c| c & reg::CSTS_RDY == 0, "not ready", None)
    }

    /// Waits until CSTS satisfies `ok`, for `ms` or CAP.TO.
    fn wait_csts(
        &self,
        ok: impl Fn(u32) -> bool,
        want: &'static str,
        ms: Option<u64>,
    ) -> Result<(), InitError> {
        // CAP.TO is the worst case; a controller reporting 0 still gets 500 ms.
        let ms = ms.unwrap_or(self.info.cap.timeout_ms).max(500);
        let deadline = Instant::now() + Duration::from_millis(ms);
        loop {
            let csts = self.regs.read32(reg::CSTS);
            if csts == u32::MAX {
                return Err(InitError::NotResponding);
            }
            if ok(csts) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(InitError::NotReady { want, ms, csts });
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Full bring-up of the admin queue: disable, program AQA/ASQ/ACQ, enable.
    fn enable(&self, aq: &mut AdminQueue) -> Result<(), InitError> {
        self.disable()?;
        aq.mem.zero();
        aq.tail = 0;
        aq.head = 0;
        aq.phase = true;
        let n = aq.entries - 1;
        self.regs.write32(reg::AQA, (n << 16) | n);
        self.regs.write64(reg::ASQ, aq.mem.iova + ADMIN_SQ as u64);
        self.regs.write64(reg::ACQ, aq.mem.iova + ADMIN_CQ as u64);
        // CSS = NVM (0), MPS = 4 KiB (0), AMS = round robin, IOSQES = 2^6, IOCQES = 2^4.
        let cc = (6 << 16) | (4 << 20) | reg::CC_EN;
        self.regs.write32(reg::CC, cc);
        self.wait_csts(|c| c & (reg::CSTS_RDY | reg::CSTS_CFS) != 0, "ready", None)?;
        if self.regs.read32(reg::CSTS) & reg::CSTS_CFS != 0 {
            return Err(InitError::Fatal);
        }
        Ok(())
    }

    /// Runs one admin command to completion (bounded by `admin_timeout`). `data` is
    /// copied into the admin data page first (for writes to the controller), and the
    /// page is returned in `out` (for identify).
    fn admin_cmd(
        &self,
        aq: &mut AdminQueue,
        mut sqe: Sqe,
        out: Option<&mut [u8; 4096]>,
    ) -> Result<Cqe, InitError> {
        let opcode = sqe.opcode();
        let cid = aq.next_cid;
        aq.next_cid = aq.next_cid.wrapping_add(1);
        sqe.set_opcode_cid(opcode, cid);
        if out.is_some() {
            sqe.prp1 = aq.mem.iova + ADMIN_DATA as u64;
        }
        let slot = aq.mem.ptr(ADMIN_SQ + aq.tail as usize * 64).cast::<Sqe>();
        // SAFETY: the slot is inside the admin SQ, which only the controller reads.
        unsafe { std::ptr::write_volatile(slot, sqe) };
        aq.tail = (aq.tail + 1) % aq.entries;
        std::sync::atomic::fence(Ordering::SeqCst);
        self.regs.write32(self.info.cap.sq_doorbell(0), aq.tail);
        let deadline = Instant::now() + self.opts.admin_timeout;
        let mut spins = 0u32;
        let cqe = loop {
            let at = aq.mem.ptr(ADMIN_CQ + aq.head as usize * 16).cast::<Cqe>();
            // SAFETY: inside the admin CQ; the controller writes it, we read volatile.
            let c = unsafe { std::ptr::read_volatile(at) };
            if c.phase() == aq.phase {
                std::sync::atomic::fence(Ordering::Acquire);
                // SAFETY: as above, re-read after the fence to see the whole entry.
                let c = unsafe { std::ptr::read_volatile(at) };
                aq.head = (aq.head + 1) % aq.entries;
                if aq.head == 0 {
                    aq.phase = !aq.phase;
                }
                self.regs.write32(self.info.cap.cq_doorbell(0), aq.head);
                if c.cid != cid {
                    log::warn!(
                        "{}: admin completion for cid {} while waiting for {cid}; ignored",
                        self.name,
                        c.cid
                    );
                    continue;
                }
                break c;
            }
            if Instant::now() >= deadline {
                return Err(InitError::Admin {
                    opcode,
                    why: format!("no completion within {:?}", self.opts.admin_timeout),
                });
            }
            spins += 1;
            if spins > 1000 {
                std::thread::sleep(Duration::from_micros(50));
            } else {
                std::hint::spin_loop();
            }
        };
        let st = cqe.status();
        if !st.is_success() {
            return Err(InitError::Admin {
                opcode,
                why: format!("status sct={:#x} sc={:#04x}", st.sct, st.sc),
            });
        }
        if let Some(out) = out {
            // SAFETY: the data page is inside the region; the command completed, so
            // the controller is done writing it.
            unsafe {
                std::ptr::copy_nonoverlapping(aq.mem.ptr(ADMIN_DATA), out.as_mut_ptr(), 4096)
            };
        }
        Ok(cqe)
    }

    fn admin(&self, sqe: Sqe, out: Option<&mut [u8; 4096]>) -> Result<Cqe, InitError> {
        let mut aq = self.admin.lock().expect("admin lock");
        self.admin_cmd(&mut aq, sqe, out)
    }

    fn identify_page(&self, cns: u32, nsid: u32) -> Result<Box<[u8; 4096]>, InitError> {
        let mut page = Box::new([0u8; 4096]);
        let mut sqe = Sqe::zeroed();
        sqe.set_opcode_cid(admin_opcode::IDENTIFY, 0);
        sqe.nsid = nsid;
        sqe.cdw10 = cns;
        self.admin(sqe, Some(&mut page))?;
        Ok(page)
    }

    fn identify(&mut self) -> Result<(), InitError> {
        let id = self.identify_page(cns::CONTROLLER, 0)?;
        self.info.vid = u16::from_le_bytes([id[0], id[1]]);
        self.info.serial = trimmed(&id[4..24]);
        self.info.model = trimmed(&id[24..64]);
        self.info.firmware = trimmed(&id[64..72]);
        let mdts = u32::from(id[77]);
        self.info.max_transfer_bytes = match mdts {
            0 => None,
            m => Some(
                1usize
                    .checked_shl(m + u32::from(self.info.cap.mps_min_shift))
                    .filter(|&b| b <= 1 << 40)
                    .ok_or_else(|| InitError::Unsupported(format!("MDTS {m} is out of range")))?,
            ),
        };
        self.info.rtd3e_us = u32::from_le_bytes([id[88], id[89], id[90], id[91]]);
        let (sqes, cqes) = (id[512], id[513]);
        if sqes & 0xf > 6 || cqes & 0xf > 4 {
            return Err(InitError::Unsupported(format!(
                "controller needs queue entries larger than 64/16 bytes (SQES {sqes:#x}, CQES {cqes:#x})"
            )));
        }
        self.info.oncs = u16::from_le_bytes([id[520], id[521]]);
        self.info.volatile_write_cache = id[525] & 1 != 0;
        let list = self.identify_page(cns::ACTIVE_NAMESPACES, 0)?;
        let mut nss = Vec::new();
        for w in list.chunks_exact(4) {
            let nsid = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
            if nsid == 0 {
                break;
            }
            let ns = self.identify_page(cns::NAMESPACE, nsid)?;
            let lbas = u64::from_le_bytes(ns[0..8].try_into().expect("8 bytes"));
            let flbas = (ns[26] & 0xf) as usize;
            let f = 128 + 4 * flbas;
            let ms = u16::from_le_bytes([ns[f], ns[f + 1]]);
            let lbads = ns[f + 2];
            if ms != 0 {
                log::warn!(
                    "{}: namespace {nsid} has {ms} bytes of metadata per block; skipped",
                    self.name
                );
                continue;
            }
            if !(9..=12).contains(&lbads) {
                log::warn!(
                    "{}: namespace {nsid} has 2^{lbads}-byte blocks (Sluice needs 512..4096); skipped",
                    self.name
                );
                continue;
            }
            if lbas.checked_mul(1 << lbads).is_none() {
                log::warn!("{}: namespace {nsid} reports {lbas} blocks; skipped", self.name);
                continue;
            }
            nss.push(NamespaceInfo { nsid, lba_bytes: 1 << lbads, lbas });
        }
        self.info.namespaces = nss;
        Ok(())
    }

    fn set_num_queues(&self, aq: &mut AdminQueue) -> Result<u16, InitError> {
        let want = u32::from(self.opts.io_queues.max(1)) - 1;
        let mut sqe = Sqe::zeroed();
        sqe.set_opcode_cid(admin_opcode::SET_FEATURES, 0);
        sqe.cdw10 = FEATURE_NUM_QUEUES;
        sqe.cdw11 = (want << 16) | want;
        let c = self.admin_cmd(aq, sqe, None)?;
        let nsq = (c.dw0 & 0xffff) + 1;
        let ncq = (c.dw0 >> 16) + 1;
        Ok(nsq.min(ncq).min(u32::from(self.opts.io_queues.max(1))) as u16)
    }

    pub(crate) fn alloc_region(&self, len: usize) -> Result<DmaRegion, InitError> {
        alloc_region(&*self.iommu, &self.iova, len, self.opts.hugepages)
    }

    /// Unmaps a region and gives its IOVA space back (the controller no longer reaches
    /// it). The memory is freed when the region drops.
    pub(crate) fn free_region(&self, region: &DmaRegion) {
        match self.iommu.unmap(region.iova, region.len()) {
            Ok(()) => self.iova.lock().expect("iova lock").free(region.iova, region.len() as u64),
            Err(e) => log::error!("{}: {e}", self.name),
        }
    }

    /// IOVA space (no memory) for a queue pair's per-command mappings.
    pub(crate) fn reserve_iova(&self, len: u64) -> Result<u64, InitError> {
        self.iova.lock().expect("iova lock").alloc(len).ok_or(InitError::NoIova(len))
    }

    /// Gives back space from `reserve_iova` (nothing may be mapped in it any more).
    pub(crate) fn release_iova(&self, start: u64, len: u64) {
        self.iova.lock().expect("iova lock").free(start, len);
    }

    /// # Safety
    /// As [`DmaMapper::map`].
    pub(crate) unsafe fn map(&self, va: *mut u8, len: usize, iova: u64) -> Result<(), MapError> {
        // SAFETY: our caller upholds the contract.
        unsafe { self.iommu.map(va, len, iova) }
    }

    pub(crate) fn unmap(&self, iova: u64, len: usize) -> Result<(), MapError> {
        self.iommu.unmap(iova, len)
    }

    /// Maps a pool of the caller's (once per pool) so its buffers need no mapping per
    /// command; returns its mapping.
    pub(crate) fn map_pool(&self, pool: &DmaPool) -> Result<Mapped, InitError> {
        let mut pools = self.pools.lock().expect("pool lock");
        if let Some((m, _)) = pools.iter().find(|(m, _)| m.pool == pool.id()) {
            return Ok(*m);
        }
        let (va, len) = pool.region();
        let len = len.next_multiple_of(4096);
        let iova = self.reserve_iova(len as u64)?;
        // SAFETY: the keepalive stored with the mapping keeps the pool's memory until the
        // controller unmaps it on drop; buffers reach it through raw pointers (DmaBuf).
        unsafe { self.iommu.map(va, len, iova) }?;
        let m = Mapped { pool: pool.id(), va: va as usize, len, iova };
        pools.push((m, pool.keepalive()));
        Ok(m)
    }

    pub(crate) fn take_qid(&self) -> Result<u16, InitError> {
        let mut q = self.qids.lock().expect("qid lock");
        let n = q.len().saturating_sub(1) as u16;
        let free = (1..q.len()).find(|&i| !q[i]).ok_or(InitError::NoQueue(n))?;
        q[free] = true;
        Ok(free as u16)
    }

    pub(crate) fn put_qid(&self, qid: u16) {
        let mut q = self.qids.lock().expect("qid lock");
        if let Some(s) = q.get_mut(qid as usize) {
            *s = false;
        }
    }

    /// Creates I/O completion queue `qid` then its submission queue, both of
    /// `entries` at the given IOVAs, polled (no interrupt).
    ///
    /// Runs under the admin lock, so no reset comes between; returns the controller
    /// generation the queues belong to.
    pub(crate) fn create_io_queue(
        &self,
        qid: u16,
        entries: u32,
        sq_iova: u64,
        cq_iova: u64,
    ) -> Result<u64, InitError> {
        let mut aq = self.admin.lock().expect("admin lock");
        let generation = self.generation.load(Ordering::Acquire);
        if self.failed.load(Ordering::Acquire) {
            return Err(InitError::Failed);
        }
        let mut cq = Sqe::zeroed();
        cq.set_opcode_cid(admin_opcode::CREATE_CQ, 0);
        cq.prp1 = cq_iova;
        cq.cdw10 = ((entries - 1) << 16) | u32::from(qid);
        cq.cdw11 = 1; // physically contiguous, interrupts off
        self.admin_cmd(&mut aq, cq, None)?;
        let mut sq = Sqe::zeroed();
        sq.set_opcode_cid(admin_opcode::CREATE_SQ, 0);
        sq.prp1 = sq_iova;
        sq.cdw10 = ((entries - 1) << 16) | u32::from(qid);
        sq.cdw11 = (u32::from(qid) << 16) | 1; // this CQ, contiguous
        if let Err(e) = self.admin_cmd(&mut aq, sq, None) {
            if let Err(d) = self.delete_queue_locked(&mut aq, admin_opcode::DELETE_CQ, qid) {
                return Err(InitError::QueueStuck {
                    qid,
                    why: format!("{e}; then deleting the completion queue: {d}"),
                });
            }
            return Err(e);
        }
        Ok(generation)
    }

    pub(crate) fn delete_io_queue(&self, qid: u16) -> Result<(), InitError> {
        self.delete_queue(admin_opcode::DELETE_SQ, qid)?;
        self.delete_queue(admin_opcode::DELETE_CQ, qid)
    }

    fn delete_queue(&self, opcode: u8, qid: u16) -> Result<(), InitError> {
        let mut aq = self.admin.lock().expect("admin lock");
        self.delete_queue_locked(&mut aq, opcode, qid)
    }

    fn delete_queue_locked(
        &self,
        aq: &mut AdminQueue,
        opcode: u8,
        qid: u16,
    ) -> Result<(), InitError> {
        let mut sqe = Sqe::zeroed();
        sqe.set_opcode_cid(opcode, 0);
        sqe.cdw10 = u32::from(qid);
        self.admin_cmd(aq, sqe, None).map(|_| ())
    }

    /// Asks the controller to abort command `cid` of submission queue `qid`. `Ok(true)`:
    /// it will complete (as aborted); `Ok(false)`: the controller declined.
    pub(crate) fn abort(&self, qid: u16, cid: u16) -> Result<bool, InitError> {
        let mut sqe = Sqe::zeroed();
        sqe.set_opcode_cid(admin_opcode::ABORT, 0);
        sqe.cdw10 = u32::from(qid) | (u32::from(cid) << 16);
        let c = self.admin(sqe, None)?;
        Ok(c.dw0 & 1 == 0)
    }

    /// Resets a hung controller: disable (which deletes every I/O queue at the
    /// controller and ends its DMA), enable again, ask for the same queues. Queue pairs
    /// notice the new generation, fail what they had in flight and recreate their
    /// queues. A controller that does not come back is marked failed: every queue pair
    /// then reports `DeviceGone`.
    pub fn reset(&self, seen_generation: u64, why: &str) -> Result<(), InitError> {
        let mut aq = self.admin.lock().expect("admin lock");
        if self.failed.load(Ordering::Acquire) {
            return Err(InitError::Failed);
        }
        if self.generation.load(Ordering::Acquire) != seen_generation {
            // Someone reset it since the caller looked: its trouble is already handled.
            return Ok(());
        }
        log::warn!("{}: resetting the controller: {why}", self.name);
        // Enable, number of queues and the new generation all under the admin lock: no
        // queue pair creates a queue in between.
        let r = self.enable(&mut aq).and_then(|()| {
            let granted = self.set_num_queues(&mut aq)?;
            if granted < self.info.io_queues {
                return Err(InitError::Unsupported(format!(
                    "after reset the controller grants {granted} I/O queues, had {}",
                    self.info.io_queues
                )));
            }
            Ok(())
        });
        match r {
            Ok(()) => {
                self.generation.fetch_add(1, Ordering::AcqRel);
                log::warn!("{}: controller reset done", self.name);
                Ok(())
            }
            Err(e) => {
                log::error!("{}: controller reset failed ({e}); the device is gone", self.name);
                let stopped = self.disable().is_ok() || self.regs.stop_dma();
                if !stopped {
                    log::error!(
                        "{}: its DMA could not be stopped: the memory it was given is kept, never reused",
                        self.name
                    );
                }
                self.dma_stopped.store(stopped, Ordering::Release);
                self.failed.store(true, Ordering::Release);
                self.generation.fetch_add(1, Ordering::AcqRel);
                Err(e)
            }
        }
    }

    /// Orderly shutdown (CC.SHN = normal), waiting for CSTS.SHST = complete within
    /// CAP.TO. Called on drop; safe to call twice.
    pub fn shutdown(&self) -> Result<(), InitError> {
        let cc = self.regs.read32(reg::CC);
        if cc & reg::CC_EN == 0 {
            return Ok(());
        }
        if self.regs.read32(reg::CSTS) & reg::CSTS_RDY == 0 {
            // Never became ready (or failed): there is nothing to shut down in order.
            return self.disable();
        }
        self.regs.write32(reg::CC, (cc & !reg::CC_SHN_MASK) | reg::CC_SHN_NORMAL);
        // The drive's own RTD3 entry latency, CAP.TO, or 10 s, whichever is longest.
        let ms = (u64::from(self.info.rtd3e_us) / 1000)
            .max(self.info.cap.timeout_ms)
            .max(MIN_SHUTDOWN_MS);
        self.wait_csts(
            |c| c & reg::CSTS_SHST_MASK == reg::CSTS_SHST_COMPLETE,
            "shut down",
            Some(ms),
        )
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let wedged =
            self.failed.load(Ordering::Acquire) && !self.dma_stopped.load(Ordering::Acquire);
        let clean = !wedged
            && match self.shutdown() {
                Ok(()) => true,
                Err(e) => {
                    log::warn!("{}: shutdown: {e}; disabling", self.name);
                    self.disable().is_ok() || self.regs.stop_dma()
                }
            };
        if !clean {
            // The controller may still reach our memory: keep it (leak) rather than
            // let the allocator reuse pages a device could write.
            let aq = self.admin.get_mut().expect("admin lock");
            let mem = std::mem::replace(&mut aq.mem.buf, DmaBuf::new(0));
            std::mem::forget(mem);
            let pools = std::mem::take(self.pools.get_mut().expect("pool lock"));
            std::mem::forget(pools);
            return;
        }
        let aq = self.admin.get_mut().expect("admin lock");
        let _ = self.iommu.unmap(aq.mem.iova, aq.mem.len());
        for (m, _) in self.pools.get_mut().expect("pool lock").iter() {
            let _ = self.iommu.unmap(m.iova, m.len);
        }
    }
}

fn alloc_region(
    iommu: &dyn DmaMapper,
    space: &Mutex<IovaSpace>,
    len: usize,
    hugepages: bool,
) -> Result<DmaRegion, InitError> {
    let len = len.next_multiple_of(prp::PAGE as usize);
    let pool = DmaPool::new(len, 1, PoolOptions { hugepages }).map_err(InitError::Memory)?;
    let buf = pool.alloc().expect("a fresh pool of one has one buffer");
    let cap = buf.capacity();
    let iova =
        space.lock().expect("iova lock").alloc(cap as u64).ok_or(InitError::NoIova(cap as u64))?;
    let region = DmaRegion { buf, iova };
    region.zero();
    // SAFETY: the region lives in the controller or a queue pair, which unmap it before
    // freeing it (or leak it when the controller may still reach it).
    if let Err(e) = unsafe { iommu.map(region.ptr(0), cap, iova) } {
        space.lock().expect("iova lock").free(iova, cap as u64);
        return Err(e.into());
    }
    Ok(region)
}

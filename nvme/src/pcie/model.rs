//! A register-level model of an NVMe controller in plain memory.
//!
//! [`ModelController`] implements [`Regs`]: the driver programs it exactly as it
//! programs hardware (CC, AQA/ASQ/ACQ, doorbells at the configured stride), and the
//! model answers through the driver's own queues in DMA memory: it fetches SQEs at the
//! submission queue's head, follows PRP entries and lists, moves data, and posts CQEs
//! with the phase tag, holding them back while the completion queue is full. Every
//! memory access goes through [`ModelIommu`], which refuses (as a data transfer error)
//! any address the driver did not map.
//!
//! Commands execute when their doorbell is written, in the writer's thread. Faults:
//! [`ModelController::fail_next`] completes the next command of an opcode with a given
//! status, [`ModelController::lose_next`] accepts I/O commands and never completes them
//! (until aborted or reset), [`ModelController::hang`] stops all processing until a
//! controller reset, and [`ModelController::kill`] makes the controller never become
//! ready again.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::command::{Cqe, DsmRange, Sqe, Status, opcode, status};
use crate::pcie::controller::{FEATURE_NUM_QUEUES, admin_opcode, cns};
use crate::pcie::{Cap, DmaMapper, MapError, Regs, prp, reg};

/// The model's shape.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Largest queue the controller accepts (CAP.MQES + 1).
    pub max_queue_entries: u32,
    /// CAP.DSTRD: doorbells are `4 << dstrd` bytes apart.
    pub dstrd: u8,
    /// CAP.TO in 500 ms units.
    pub timeout_units: u8,
    /// MDTS (0 = no limit), in units of 4 KiB pages as a power of two.
    pub mdts: u8,
    /// Namespaces: `(bytes per block, size in bytes)`, numbered from 1.
    pub namespaces: Vec<(u32, u64)>,
    /// I/O queue pairs the controller grants at most.
    pub max_io_queues: u16,
    /// ONCS: write zeroes and DSM supported.
    pub write_zeroes: bool,
    pub dsm: bool,
    /// CSTS reads before RDY follows CC.EN (a controller takes time to get ready).
    pub ready_delay_reads: u32,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            max_queue_entries: 64,
            dstrd: 0,
            timeout_units: 2,
            mdts: 5,
            namespaces: vec![(4096, 32 << 20)],
            max_io_queues: 4,
            write_zeroes: true,
            dsm: true,
            ready_delay_reads: 3,
        }
    }
}

/// The IOMMU the model checks every DMA against.
#[derive(Debug, Default)]
pub struct ModelIommu {
    maps: Mutex<Vec<(u64, usize, usize)>>,
}

impl ModelIommu {
    /// The host address of `[iova, iova + len)` if one mapping covers it.
    fn translate(&self, iova: u64, len: usize) -> Option<*mut u8> {
        let maps = self.maps.lock().expect("iommu lock");
        maps.iter().find_map(|&(base, va, n)| {
            (iova >= base && iova + len as u64 <= base + n as u64)
                .then(|| (va + (iova - base) as usize) as *mut u8)
        })
    }

    /// Mappings currently in place.
    pub fn mappings(&self) -> usize {
        self.maps.lock().expect("iommu lock").len()
    }
}

impl DmaMapper for Arc<ModelIommu> {
    unsafe fn map(&self, va: *mut u8, len: usize, iova: u64) -> Result<(), MapError> {
        // Like an x86 IOMMU: the MSI window is reserved, and addresses are 39 bits.
        if iova < MSI_END && iova + len as u64 > MSI_START || iova + len as u64 > 1 << 39 {
            return Err(MapError { iova, len, why: "reserved or beyond the address width".into() });
        }
        let mut maps = self.maps.lock().expect("iommu lock");
        if maps.iter().any(|&(b, _, n)| iova < b + n as u64 && b < iova + len as u64) {
            return Err(MapError { iova, len, why: "overlaps an existing mapping".into() });
        }
        maps.push((iova, va as usize, len));
        Ok(())
    }

    fn unmap(&self, iova: u64, len: usize) -> Result<(), MapError> {
        let mut maps = self.maps.lock().expect("iommu lock");
        let before = maps.len();
        maps.retain(|&(b, _, n)| !(b == iova && n == len));
        if maps.len() == before {
            return Err(MapError { iova, len, why: "no such mapping".into() });
        }
        Ok(())
    }
}

const MSI_START: u64 = 0xfee0_0000;
const MSI_END: u64 = 0xfef0_0000;

#[derive(Debug)]
struct Sq {
    base: u64,
    entries: u32,
    cqid: u16,
    head: u32,
    tail: u32,
}

#[derive(Debug)]
struct Cq {
    base: u64,
    entries: u32,
    tail: u32,
    /// Head as last written by the host.
    head: u32,
    phase: bool,
    pending: VecDeque<Cqe>,
}

/// Counters tests look at.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ModelStats {
    pub commands: u64,
    pub doorbell_writes: u64,
    /// Writes to an offset inside the doorbell area that is not a doorbell at the
    /// configured stride (a driver ignoring CAP.DSTRD).
    pub bad_doorbells: u64,
    /// Times a completion queue's tail wrapped (phase flipped).
    pub cq_wraps: u64,
    pub sq_wraps: u64,
    /// Completions held back because their completion queue was full.
    pub cq_full_stalls: u64,
    /// Commands that used a PRP list, and the most list pages one command used.
    pub prp_list_commands: u64,
    pub max_list_pages: usize,
    pub iommu_faults: u64,
    pub resets: u64,
    pub aborts: u64,
    pub shutdowns: u64,
    /// Bus mastering turned off (the driver stopping a dead controller's DMA).
    pub dma_stops: u64,
    /// Data commands longer than MDTS (refused with Invalid Field).
    pub over_mdts: u64,
}

#[derive(Debug)]
struct State {
    cfg: ModelConfig,
    cc: u32,
    csts: u32,
    aqa: u32,
    asq: u64,
    acq: u64,
    ready_countdown: u32,
    sqs: HashMap<u16, Sq>,
    cqs: HashMap<u16, Cq>,
    media: Vec<Vec<u8>>,
    granted_queues: u16,
    hung: bool,
    dead: bool,
    fail_next: Vec<(bool, u8, Status)>,
    lose_next: u32,
    lost: Vec<(u16, Sqe)>,
    dma_stoppable: bool,
    stats: ModelStats,
}

/// The model. Clone the `Arc` to keep a handle for fault injection and inspection
/// while the driver owns the register file.
#[derive(Debug)]
pub struct ModelController {
    state: Mutex<State>,
    iommu: Arc<ModelIommu>,
}

impl ModelController {
    pub fn new(cfg: ModelConfig) -> Arc<ModelController> {
        let media = cfg.namespaces.iter().map(|&(_, bytes)| vec![0u8; bytes as usize]).collect();
        Arc::new(ModelController {
            state: Mutex::new(State {
                cfg,
                cc: 0,
                csts: 0,
                aqa: 0,
                asq: 0,
                acq: 0,
                ready_countdown: 0,
                sqs: HashMap::new(),
                cqs: HashMap::new(),
                media,
                granted_queues: 0,
                hung: false,
                dead: false,
                fail_next: Vec::new(),
                lose_next: 0,
                lost: Vec::new(),
                dma_stoppable: true,
                stats: ModelStats::default(),
            }),
            iommu: Arc::new(ModelIommu::default()),
        })
    }

    /// The IOMMU to hand the driver.
    pub fn iommu(&self) -> Arc<ModelIommu> {
        Arc::clone(&self.iommu)
    }

    fn st(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("model lock")
    }

    pub fn stats(&self) -> ModelStats {
        self.st().stats.clone()
    }

    /// The next I/O (`admin = false`) or admin command with `opcode` completes with
    /// `status` without executing.
    pub fn fail_next(&self, admin: bool, opcode: u8, status: Status) {
        self.st().fail_next.push((admin, opcode, status));
    }

    /// The next `n` I/O commands are accepted and never completed (until an abort or a
    /// reset).
    pub fn lose_next(&self, n: u32) {
        self.st().lose_next = n;
    }

    /// Stops processing every queue, admin included, until the controller is reset.
    pub fn hang(&self) {
        self.st().hung = true;
    }

    /// Whether turning bus mastering off stops this controller (default true).
    pub fn set_dma_stoppable(&self, yes: bool) {
        self.st().dma_stoppable = yes;
    }

    /// Hangs for good: the controller stops answering, ignores CC.EN = 0 while ready
    /// (only turning bus mastering off stops it) and never becomes ready again.
    pub fn kill(&self) {
        let mut s = self.st();
        s.hung = true;
        s.dead = true;
    }

    /// A copy of `len` bytes of namespace `nsid` at byte `off` (behind the driver).
    pub fn media(&self, nsid: u32, off: usize, len: usize) -> Vec<u8> {
        self.st().media[nsid as usize - 1][off..off + len].to_vec()
    }

    /// I/O queue identifiers that exist at the controller.
    pub fn io_queues(&self) -> Vec<u16> {
        let mut q: Vec<u16> = self.st().sqs.keys().copied().filter(|&q| q != 0).collect();
        q.sort_unstable();
        q
    }

    fn cap(cfg: &ModelConfig) -> Cap {
        Cap {
            max_queue_entries: cfg.max_queue_entries,
            timeout_ms: u64::from(cfg.timeout_units) * 500,
            dstrd: cfg.dstrd,
            mps_min_shift: 12,
            mps_max_shift: 16,
            nvm_command_set: true,
        }
    }

    fn dma_read(&self, s: &mut State, iova: u64, out: &mut [u8]) -> bool {
        match self.iommu.translate(iova, out.len()) {
            // SAFETY: the driver mapped this range for the device; it stays allocated
            // until it is unmapped.
            Some(p) => unsafe {
                std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len());
                true
            },
            None => {
                s.stats.iommu_faults += 1;
                false
            }
        }
    }

    fn dma_write(&self, s: &mut State, iova: u64, data: &[u8]) -> bool {
        match self.iommu.translate(iova, data.len()) {
            // SAFETY: as in dma_read.
            Some(p) => unsafe {
                std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len());
                true
            },
            None => {
                s.stats.iommu_faults += 1;
                false
            }
        }
    }

    fn enable(&self, s: &mut State) {
        s.sqs.clear();
        s.cqs.clear();
        let entries_sq = (s.aqa & 0xfff) + 1;
        let entries_cq = ((s.aqa >> 16) & 0xfff) + 1;
        s.sqs.insert(0, Sq { base: s.asq, entries: entries_sq, cqid: 0, head: 0, tail: 0 });
        s.cqs.insert(
            0,
            Cq {
                base: s.acq,
                entries: entries_cq,
                tail: 0,
                head: 0,
                phase: true,
                pending: VecDeque::new(),
            },
        );
        s.ready_countdown = s.cfg.ready_delay_reads;
    }

    fn disable(&self, s: &mut State) {
        if s.dead && s.csts & reg::CSTS_RDY != 0 {
            // Wedged: ignores CC.EN = 0, keeps its queues and could still do DMA.
            return;
        }
        if !s.sqs.is_empty() {
            s.stats.resets += 1;
        }
        s.sqs.clear();
        s.cqs.clear();
        s.lost.clear();
        s.csts &= !(reg::CSTS_RDY | reg::CSTS_SHST_MASK);
        s.granted_queues = 0;
        if !s.dead {
            s.hung = false;
        }
    }

    fn doorbell(&self, s: &mut State, offset: usize, value: u32) {
        s.stats.doorbell_writes += 1;
        let stride = 4usize << s.cfg.dstrd;
        let rel = offset - reg::DOORBELLS;
        if !rel.is_multiple_of(stride) {
            s.stats.bad_doorbells += 1;
            return;
        }
        let idx = rel / stride;
        let qid = (idx / 2) as u16;
        let is_sq = idx.is_multiple_of(2);
        // The SQ tail or CQ head being written, if that queue exists and the value fits.
        let slot = if is_sq {
            s.sqs.get_mut(&qid).map(|q| (q.entries, &mut q.tail))
        } else {
            s.cqs.get_mut(&qid).map(|q| (q.entries, &mut q.head))
        };
        match slot {
            Some((entries, at)) if value < entries => *at = value,
            _ => {
                s.stats.bad_doorbells += 1;
                return;
            }
        }
        if !is_sq {
            self.flush_pending(s, qid);
        }
        if !s.hung && s.csts & reg::CSTS_RDY != 0 {
            self.process(s);
        }
    }

    /// Runs every submitted command of every queue.
    fn process(&self, s: &mut State) {
        loop {
            let mut did = false;
            let mut qids: Vec<u16> = s.sqs.keys().copied().collect();
            qids.sort_unstable();
            for qid in qids {
                let Some(sq) = s.sqs.get_mut(&qid) else { continue };
                if sq.head == sq.tail {
                    continue;
                }
                let at = sq.base + u64::from(sq.head) * 64;
                sq.head = (sq.head + 1) % sq.entries;
                if sq.head == 0 {
                    s.stats.sq_wraps += 1;
                }
                let (head, cqid) = (sq.head, sq.cqid);
                let mut raw = [0u8; 64];
                if !self.dma_read(s, at, &mut raw) {
                    continue;
                }
                // SAFETY: Sqe is repr(C), 64 bytes, every bit pattern valid.
                let sqe: Sqe = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) };
                s.stats.commands += 1;
                did = true;
                let out = if qid == 0 { self.admin(s, &sqe) } else { self.io(s, qid, &sqe) };
                if let Some((st, dw0)) = out {
                    self.complete(s, cqid, qid, head, sqe.cid(), st, dw0);
                }
                if s.hung {
                    return;
                }
            }
            if !did {
                return;
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn complete(
        &self,
        s: &mut State,
        cqid: u16,
        sqid: u16,
        sq_head: u32,
        cid: u16,
        st: Status,
        dw0: u32,
    ) {
        let Some(cq) = s.cqs.get_mut(&cqid) else { return };
        cq.pending.push_back(Cqe {
            dw0,
            dw1: 0,
            sq_head: sq_head as u16,
            sq_id: sqid,
            cid,
            status_phase: st.to_field() << 1,
        });
        self.flush_pending(s, cqid);
    }

    fn flush_pending(&self, s: &mut State, cqid: u16) {
        loop {
            let Some(cq) = s.cqs.get_mut(&cqid) else { return };
            if cq.pending.is_empty() {
                return;
            }
            if (cq.tail + 1) % cq.entries == cq.head {
                s.stats.cq_full_stalls += 1;
                return;
            }
            let mut c = cq.pending.pop_front().expect("non-empty");
            c.status_phase |= u16::from(cq.phase);
            let at = cq.base + u64::from(cq.tail) * 16;
            cq.tail = (cq.tail + 1) % cq.entries;
            if cq.tail == 0 {
                cq.phase = !cq.phase;
                s.stats.cq_wraps += 1;
            }
            // Write the entry with the phase word last, as hardware does.
            let mut bytes = [0u8; 16];
            // SAFETY: Cqe is repr(C) and 16 bytes.
            unsafe { std::ptr::write_unaligned(bytes.as_mut_ptr().cast(), c) };
            self.dma_write(s, at, &bytes[..14]);
            std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
            self.dma_write(s, at + 14, &bytes[14..]);
        }
    }

    fn take_fault(s: &mut State, admin: bool, op: u8) -> Option<Status> {
        let i = s.fail_next.iter().position(|&(a, o, _)| a == admin && o == op)?;
        Some(s.fail_next.remove(i).2)
    }

    fn admin(&self, s: &mut State, sqe: &Sqe) -> Option<(Status, u32)> {
        let ok = Some((Status::SUCCESS, 0));
        let invalid = Some((generic(status::SC_INVALID_FIELD), 0));
        if let Some(st) = Self::take_fault(s, true, sqe.opcode()) {
            return Some((st, 0));
        }
        match sqe.opcode() {
            admin_opcode::IDENTIFY => {
                let mut page = vec![0u8; 4096];
                match sqe.cdw10 & 0xff {
                    cns::CONTROLLER => {
                        page[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
                        page[4..24].copy_from_slice(b"SLUICEMODEL0        ");
                        page[24..64].copy_from_slice(&pad::<40>(b"Sluice NVMe register model"));
                        page[64..72].copy_from_slice(b"1.0     ");
                        page[77] = s.cfg.mdts;
                        page[512] = 0x66;
                        page[513] = 0x44;
                        page[516..520]
                            .copy_from_slice(&(s.cfg.namespaces.len() as u32).to_le_bytes());
                        let oncs =
                            (u16::from(s.cfg.dsm) << 2) | (u16::from(s.cfg.write_zeroes) << 3);
                        page[520..522].copy_from_slice(&oncs.to_le_bytes());
                        page[525] = 1;
                    }
                    cns::ACTIVE_NAMESPACES => {
                        for i in 0..s.cfg.namespaces.len() {
                            page[4 * i..4 * i + 4].copy_from_slice(&(i as u32 + 1).to_le_bytes());
                        }
                    }
                    cns::NAMESPACE => {
                        let Some(&(bs, bytes)) =
                            s.cfg.namespaces.get((sqe.nsid as usize).wrapping_sub(1))
                        else {
                            return Some((generic(status::SC_INVALID_NAMESPACE), 0));
                        };
                        let lbas = bytes / u64::from(bs);
                        page[0..8].copy_from_slice(&lbas.to_le_bytes());
                        page[8..16].copy_from_slice(&lbas.to_le_bytes());
                        page[16..24].copy_from_slice(&lbas.to_le_bytes());
                        page[25] = 0;
                        page[26] = 0;
                        page[130] = bs.trailing_zeros() as u8;
                    }
                    _ => return invalid,
                }
                if !self.dma_write(s, sqe.prp1, &page) {
                    return Some((generic(status::SC_DATA_TRANSFER_ERROR), 0));
                }
                ok
            }
            admin_opcode::SET_FEATURES if sqe.cdw10 & 0xff == FEATURE_NUM_QUEUES => {
                let want = (sqe.cdw11 & 0xffff) as u16 + 1;
                s.granted_queues = want.min(s.cfg.max_io_queues);
                let n = u32::from(s.granted_queues - 1);
                Some((Status::SUCCESS, (n << 16) | n))
            }
            admin_opcode::CREATE_CQ => {
                let qid = (sqe.cdw10 & 0xffff) as u16;
                let entries = (sqe.cdw10 >> 16) + 1;
                if qid == 0 || qid > s.granted_queues || s.cqs.contains_key(&qid) {
                    return Some((cmd_specific(0x01), 0)); // invalid queue identifier
                }
                if entries < 2 || entries > s.cfg.max_queue_entries {
                    return Some((cmd_specific(0x02), 0)); // invalid queue size
                }
                if sqe.cdw11 & 1 == 0 || !sqe.prp1.is_multiple_of(4096) {
                    return invalid;
                }
                s.cqs.insert(
                    qid,
                    Cq {
                        base: sqe.prp1,
                        entries,
                        tail: 0,
                        head: 0,
                        phase: true,
                        pending: VecDeque::new(),
                    },
                );
                ok
            }
            admin_opcode::CREATE_SQ => {
                let qid = (sqe.cdw10 & 0xffff) as u16;
                let entries = (sqe.cdw10 >> 16) + 1;
                let cqid = (sqe.cdw11 >> 16) as u16;
                if qid == 0 || qid > s.granted_queues || s.sqs.contains_key(&qid) {
                    return Some((cmd_specific(0x01), 0));
                }
                if !s.cqs.contains_key(&cqid) || cqid == 0 {
                    return Some((cmd_specific(0x00), 0)); // completion queue invalid
                }
                if entries < 2 || entries > s.cfg.max_queue_entries {
                    return Some((cmd_specific(0x02), 0));
                }
                s.sqs.insert(qid, Sq { base: sqe.prp1, entries, cqid, head: 0, tail: 0 });
                ok
            }
            admin_opcode::DELETE_SQ => {
                let qid = (sqe.cdw10 & 0xffff) as u16;
                if qid == 0 || s.sqs.remove(&qid).is_none() {
                    return Some((cmd_specific(0x01), 0));
                }
                // Commands of a deleted queue are aborted; their CQ goes next.
                let (gone, kept): (Vec<_>, Vec<_>) = s.lost.drain(..).partition(|(q, _)| *q == qid);
                s.lost = kept;
                for (q, l) in gone {
                    let st = generic(status::SC_ABORT_SQ_DELETED);
                    self.complete(s, q, q, 0, l.cid(), st, 0);
                }
                ok
            }
            admin_opcode::DELETE_CQ => {
                let qid = (sqe.cdw10 & 0xffff) as u16;
                if qid == 0 || s.sqs.values().any(|q| q.cqid == qid) {
                    return Some((cmd_specific(0x0c), 0)); // invalid queue deletion
                }
                if s.cqs.remove(&qid).is_none() {
                    return Some((cmd_specific(0x01), 0));
                }
                ok
            }
            admin_opcode::ABORT => {
                s.stats.aborts += 1;
                let sqid = (sqe.cdw10 & 0xffff) as u16;
                let cid = (sqe.cdw10 >> 16) as u16;
                match s.lost.iter().position(|(q, l)| *q == sqid && l.cid() == cid) {
                    Some(i) => {
                        let (q, l) = s.lost.remove(i);
                        let cqid = s.sqs.get(&q).map_or(q, |sq| sq.cqid);
                        let head = s.sqs.get(&q).map_or(0, |sq| sq.head);
                        self.complete(
                            s,
                            cqid,
                            q,
                            head,
                            l.cid(),
                            generic(status::SC_ABORT_REQUESTED),
                            0,
                        );
                        Some((Status::SUCCESS, 0))
                    }
                    // Not found (already completed): "not aborted".
                    None => Some((Status::SUCCESS, 1)),
                }
            }
            _ => Some((generic(status::SC_INVALID_OPCODE), 0)),
        }
    }

    fn io(&self, s: &mut State, qid: u16, sqe: &Sqe) -> Option<(Status, u32)> {
        if let Some(st) = Self::take_fault(s, false, sqe.opcode()) {
            return Some((st, 0));
        }
        if s.lose_next > 0 {
            s.lose_next -= 1;
            s.lost.push((qid, *sqe));
            return None;
        }
        let ns = sqe.nsid as usize;
        if ns == 0 || ns > s.media.len() {
            return Some((generic(status::SC_INVALID_NAMESPACE), 0));
        }
        let bs = s.cfg.namespaces[ns - 1].0 as u64;
        let slba = u64::from(sqe.cdw10) | (u64::from(sqe.cdw11) << 32);
        let nlb = u64::from(sqe.cdw12 & 0xffff) + 1;
        let in_range = |s: &State, lba: u64, n: u64| {
            lba.checked_add(n).is_some_and(|e| e * bs <= s.media[ns - 1].len() as u64)
        };
        match sqe.opcode() {
            opcode::FLUSH => Some((Status::SUCCESS, 0)),
            opcode::READ | opcode::WRITE => {
                if !in_range(s, slba, nlb) {
                    return Some((generic(status::SC_LBA_OUT_OF_RANGE), 0));
                }
                let len = (nlb * bs) as usize;
                if s.cfg.mdts != 0 && len > (4096usize << s.cfg.mdts) {
                    s.stats.over_mdts += 1;
                    return Some((generic(status::SC_INVALID_FIELD), 0));
                }
                let mut list_pages = std::collections::HashSet::new();
                let segs = {
                    let me = self;
                    let mut faults = 0u64;
                    let r = prp::walk(sqe.prp1, sqe.prp2, len, &mut |a| {
                        list_pages.insert(a / prp::PAGE);
                        let mut b = [0u8; 8];
                        match me.iommu.translate(a, 8) {
                            // SAFETY: mapped by the driver for the device.
                            Some(p) => unsafe {
                                std::ptr::copy_nonoverlapping(p, b.as_mut_ptr(), 8)
                            },
                            None => faults += 1,
                        }
                        u64::from_le_bytes(b)
                    });
                    s.stats.iommu_faults += faults;
                    match r {
                        Ok(segs) if faults == 0 => segs,
                        _ => return Some((generic(status::SC_DATA_TRANSFER_ERROR), 0)),
                    }
                };
                if !list_pages.is_empty() {
                    s.stats.prp_list_commands += 1;
                    s.stats.max_list_pages = s.stats.max_list_pages.max(list_pages.len());
                }
                let mut off = (slba * bs) as usize;
                for (a, n) in segs {
                    let ok = if sqe.opcode() == opcode::READ {
                        let data = s.media[ns - 1][off..off + n].to_vec();
                        self.dma_write(s, a, &data)
                    } else {
                        let mut data = vec![0u8; n];
                        let ok = self.dma_read(s, a, &mut data);
                        s.media[ns - 1][off..off + n].copy_from_slice(&data);
                        ok
                    };
                    if !ok {
                        return Some((generic(status::SC_DATA_TRANSFER_ERROR), 0));
                    }
                    off += n;
                }
                Some((Status::SUCCESS, 0))
            }
            opcode::WRITE_ZEROES if s.cfg.write_zeroes => {
                if !in_range(s, slba, nlb) {
                    return Some((generic(status::SC_LBA_OUT_OF_RANGE), 0));
                }
                let (a, b) = ((slba * bs) as usize, ((slba + nlb) * bs) as usize);
                s.media[ns - 1][a..b].fill(0);
                Some((Status::SUCCESS, 0))
            }
            opcode::DATASET_MANAGEMENT if s.cfg.dsm => {
                let mut raw = [0u8; 16];
                if !self.dma_read(s, sqe.prp1, &mut raw) {
                    return Some((generic(status::SC_DATA_TRANSFER_ERROR), 0));
                }
                let r = DsmRange::from_bytes(&raw);
                if !in_range(s, r.slba, u64::from(r.nlb)) {
                    return Some((generic(status::SC_LBA_OUT_OF_RANGE), 0));
                }
                let (a, b) = ((r.slba * bs) as usize, ((r.slba + u64::from(r.nlb)) * bs) as usize);
                s.media[ns - 1][a..b].fill(0);
                Some((Status::SUCCESS, 0))
            }
            _ => Some((generic(status::SC_INVALID_OPCODE), 0)),
        }
    }
}

fn generic(sc: u8) -> Status {
    Status { sct: status::SCT_GENERIC, sc, dnr: false }
}

fn cmd_specific(sc: u8) -> Status {
    Status { sct: status::SCT_COMMAND_SPECIFIC, sc, dnr: true }
}

fn pad<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut out = [b' '; N];
    out[..s.len()].copy_from_slice(s);
    out
}

impl Regs for Arc<ModelController> {
    fn bar_bytes(&self) -> usize {
        0x4000
    }

    fn stop_dma(&self) -> bool {
        let mut s = self.st();
        if !s.dma_stoppable {
            return false;
        }
        s.hung = true;
        s.dead = true;
        s.stats.dma_stops += 1;
        true
    }

    fn read32(&self, offset: usize) -> u32 {
        let mut s = self.st();
        let cap = ModelController::cap(&s.cfg).encode();
        match offset {
            o if o == reg::CAP => cap as u32,
            o if o == reg::CAP + 4 => (cap >> 32) as u32,
            o if o == reg::VS => 0x0001_0400,
            o if o == reg::CC => s.cc,
            o if o == reg::CSTS => {
                if s.cc & reg::CC_EN != 0 && s.csts & reg::CSTS_RDY == 0 && !s.dead {
                    if s.ready_countdown == 0 {
                        s.csts |= reg::CSTS_RDY;
                    } else {
                        s.ready_countdown -= 1;
                    }
                }
                s.csts
            }
            o if o == reg::AQA => s.aqa,
            o if o == reg::ASQ => s.asq as u32,
            o if o == reg::ASQ + 4 => (s.asq >> 32) as u32,
            o if o == reg::ACQ => s.acq as u32,
            o if o == reg::ACQ + 4 => (s.acq >> 32) as u32,
            _ => 0,
        }
    }

    fn write32(&self, offset: usize, value: u32) {
        let mut s = self.st();
        match offset {
            o if o == reg::CC => {
                let was = s.cc;
                s.cc = value;
                if was & reg::CC_EN == 0 && value & reg::CC_EN != 0 {
                    self.enable(&mut s);
                } else if was & reg::CC_EN != 0 && value & reg::CC_EN == 0 {
                    self.disable(&mut s);
                }
                if value & reg::CC_SHN_MASK != 0 && was & reg::CC_SHN_MASK == 0 && !s.hung {
                    s.stats.shutdowns += 1;
                    s.csts = (s.csts & !reg::CSTS_SHST_MASK) | reg::CSTS_SHST_COMPLETE;
                }
            }
            o if o == reg::AQA => s.aqa = value,
            o if o == reg::ASQ => s.asq = (s.asq & !0xffff_ffff) | u64::from(value),
            o if o == reg::ASQ + 4 => s.asq = (s.asq & 0xffff_ffff) | (u64::from(value) << 32),
            o if o == reg::ACQ => s.acq = (s.acq & !0xffff_ffff) | u64::from(value),
            o if o == reg::ACQ + 4 => s.acq = (s.acq & 0xffff_ffff) | (u64::from(value) << 32),
            o if o >= reg::DOORBELLS => self.doorbell(&mut s, o, value),
            _ => {}
        }
    }
}

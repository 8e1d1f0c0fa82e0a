//! `FaultyDevice<D>`: wraps any backend and injects the faults a storage engine must
//! survive. It is a test device: it allocates and takes an uncontended lock per call.
//!
//! # Fault model
//!
//! * **Volatile write cache.** Completed writes (and write-zeroes and trims) sit in a
//!   cache held by the wrapper; the inner device only ever holds durable data. A
//!   [`IoCommand::Flush`] covers exactly the writes whose completion `poll` had handed
//!   out when the flush was submitted (not writes merely executed, nor ones submitted
//!   with it); it writes those to the inner device, flushes the inner device, and only
//!   then completes and drops them. A FUA write is forwarded (serialized behind earlier flushes)
//!   with FUA and completes when the inner device made it durable. Reads see the newest
//!   cached data, else the inner device. This is exactly the durability contract of
//!   [`BlockDevice`]: nothing more survives than it promises.
//! * **Power cut** ([`FaultyDevice::power_cut`] or scheduled after N commands with
//!   [`FaultHandle::schedule_cut`]). Every cached write that is not durable gets a fate
//!   from a [`CutPolicy`]: dropped, kept, or torn (a random proper subset of its blocks
//!   kept). Writes whose forwarding to the inner device had already begun (a flush in
//!   progress) are reported as `Landed`: the medium may have got them, and here it did.
//!   Overlapping survivors apply in submission order. The resulting medium is written to
//!   the inner device and flushed; the [`CutReport`] lists every non-durable write and
//!   its fate, so tests can assert exactly what survived. After a cut every command fails
//!   with [`IoError::DeviceGone`] until [`FaultHandle::power_on`].
//! * **I/O errors** by LBA range, by operation kind and by call count ([`FaultRule`]): a
//!   matching command fails with the rule's error and has no effect.
//! * **Latency**: every completion is held back by a configurable delay measured on the
//!   injected [`Clock`].

mod cache;
mod rules;

pub use rules::{FaultRule, OpSet};

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sluice_vocab::limits::BLOCK_SIZE_BYTES;
use sluice_vocab::{BlockCount, Clock, Lba, MonoTime};

use crate::command::{IoCommand, OpKind};
use crate::device::{BlockDevice, Completion, DeviceInfo, validate};
use crate::dma::DmaBuf;
use crate::error::{IoError, RejectReason, SubmitError};
use cache::{Covered, Entry, WriteCache};

/// What happens to non-durable writes at a power cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutPolicy {
    /// Every non-durable write is lost (except those already landing, see module docs).
    DropAll,
    /// Every non-durable write survives whole.
    KeepAll,
    /// Each write independently: torn with `tear_percent`, kept with `keep_percent`,
    /// dropped otherwise; a seeded generator decides, so a seed replays exactly.
    Random { seed: u64, keep_percent: u8, tear_percent: u8 },
}

/// The fate of one non-durable write at a cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    Dropped,
    Kept,
    /// Forwarding to the medium had begun before the cut; it survives.
    Landed,
    /// `kept[i]` says whether block `lba + i` survived; at least one did and one did not.
    Torn {
        kept: Vec<bool>,
    },
}

/// One non-durable write and its fate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutWrite {
    pub tag: u64,
    pub kind: OpKind,
    pub lba: Lba,
    pub blocks: BlockCount,
    pub fate: Fate,
}

/// Everything a cut did, in submission order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CutReport {
    pub writes: Vec<CutWrite>,
}

#[derive(Debug, Default)]
struct Control {
    rules: Vec<FaultRule>,
    latency: Duration,
    cut_after_commands: Option<(u64, CutPolicy)>,
    commands_seen: u64,
    powered_off: bool,
    last_cut: Option<CutReport>,
}

/// A shared handle to steer a [`FaultyDevice`] while something else owns it.
#[derive(Debug, Clone, Default)]
pub struct FaultHandle(Arc<Mutex<Control>>);

impl FaultHandle {
    fn lock(&self) -> MutexGuard<'_, Control> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds an error rule; rules are checked in the order added.
    pub fn add_rule(&self, rule: FaultRule) {
        self.lock().rules.push(rule);
    }

    pub fn clear_rules(&self) {
        self.lock().rules.clear();
    }

    /// How many commands of each rule fired so far, in rule order.
    pub fn rule_hits(&self) -> Vec<u64> {
        self.lock().rules.iter().map(|r| r.hits()).collect()
    }

    /// Delay every completion by `d` (on the device's clock).
    pub fn set_latency(&self, d: Duration) {
        self.lock().latency = d;
    }

    /// Cut the power just before the `n`-th command from now (0 = at the next command)
    /// is accepted.
    pub fn schedule_cut(&self, n: u64, policy: CutPolicy) {
        let mut c = self.lock();
        let at = c.commands_seen + n;
        c.cut_after_commands = Some((at, policy));
    }

    /// Cancels a scheduled cut.
    pub fn cancel_cut(&self) {
        self.lock().cut_after_commands = None;
    }

    /// Commands submitted so far (accepted or failed).
    pub fn commands_seen(&self) -> u64 {
        self.lock().commands_seen
    }

    pub fn is_powered_off(&self) -> bool {
        self.lock().powered_off
    }

    /// The report of the most recent cut.
    pub fn take_cut_report(&self) -> Option<CutReport> {
        self.lock().last_cut.take()
    }

    /// Restores power after a cut; the device then behaves as freshly attached.
    pub fn power_on(&self) {
        self.lock().powered_off = false;
    }
}

/// An operation waiting for the inner device.
#[derive(Debug)]
enum Pending {
    /// A user read forwarded to the inner device, with the cached blocks to lay over it.
    Read { tag: u64, lba: Lba, overlay: Vec<(usize, Box<[u8]>)> },
}

/// A flush (user flush, or the internal one that makes a FUA write durable), processed
/// one at a time in submission order.
#[derive(Debug)]
struct FlushJob {
    /// User tag, and for a FUA write its buffer to hand back.
    tag: u64,
    fua_buf: Option<DmaBuf>,
    fua: bool,
    /// Cache entries this job makes durable.
    covered: Covered,
    stage: FlushStage,
    error: Option<IoError>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlushStage {
    /// Waiting behind earlier jobs.
    Queued,
    /// Forwarding cached data; this many inner writes outstanding.
    Writing(usize),
    /// The inner flush is outstanding.
    Flushing,
    Done,
}

/// Inner-device tags: kind in the top byte, an index below.
const T_READ: u64 = 1 << 56;
const T_FLUSH_DATA: u64 = 2 << 56;
const T_FLUSH_FLUSH: u64 = 3 << 56;
const T_CUT: u64 = 4 << 56;
const T_MASK: u64 = 0xff << 56;

/// A device wrapper that injects faults. See the module documentation.
pub struct FaultyDevice<D: BlockDevice> {
    inner: D,
    info: DeviceInfo,
    clock: Arc<dyn Clock>,
    ctl: FaultHandle,
    /// Submitted, waiting for kick; a flush carries what it covers.
    queued: VecDeque<(IoCommand, Option<DmaBuf>, u64, Option<Covered>)>,
    /// Finished, held back until their release time; cached writes name their entry so
    /// delivery can mark it.
    ready: Vec<(MonoTime, Completion, Option<u64>)>,
    pending: slab::Slab<Pending>,
    flushes: VecDeque<FlushJob>,
    /// Inner commands waiting for an inner slot.
    backlog: VecDeque<(IoCommand, Option<DmaBuf>, u64)>,
    cache: WriteCache,
    in_flight: usize,
}

impl<D: BlockDevice> std::fmt::Debug for FaultyDevice<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyDevice")
            .field("info", &self.info)
            .field("in_flight", &self.in_flight)
            .field("cached_writes", &self.cache.len())
            .finish()
    }
}

impl<D: BlockDevice> FaultyDevice<D> {
    pub fn new(inner: D, clock: Arc<dyn Clock>) -> Self {
        let mut info = inner.info().clone();
        info.name = format!("faulty({})", info.name);
        FaultyDevice {
            inner,
            info,
            clock,
            ctl: FaultHandle::default(),
            queued: VecDeque::new(),
            ready: Vec::new(),
            pending: slab::Slab::new(),
            flushes: VecDeque::new(),
            backlog: VecDeque::new(),
            cache: WriteCache::default(),
            in_flight: 0,
        }
    }

    /// The handle that steers this device (clone it before handing the device away).
    pub fn handle(&self) -> FaultHandle {
        self.ctl.clone()
    }

    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// Unwraps the device. Non-durable cached writes are lost, as at a power cut.
    pub fn into_inner(self) -> D {
        self.inner
    }

    /// Cuts the power now. See the module documentation for what survives.
    pub fn power_cut(&mut self, policy: CutPolicy) -> CutReport {
        let report = self.do_cut(policy);
        let mut c = self.ctl.lock();
        c.powered_off = true;
        c.last_cut = Some(report.clone());
        report
    }

    fn do_cut(&mut self, policy: CutPolicy) -> CutReport {
        // 1. Whatever reached the inner device lands: send the backlog and wait.
        while let Some((cmd, buf, tag)) = self.backlog.pop_front() {
            self.inner_submit_now(cmd, buf, tag);
        }
        let _ = self.inner.kick();
        while self.inner.in_flight() > 0 {
            self.inner.poll(usize::MAX, &mut |_| {});
            std::thread::yield_now();
        }
        // 2. Fates, in submission order.
        // A flush job that began forwarding (and perhaps failed) may have put its entries
        // on the medium: they are reported as landed.
        let mut rng = match policy {
            CutPolicy::Random { seed, .. } => Some(ChaCha8Rng::seed_from_u64(seed)),
            _ => None,
        };
        let mut report = CutReport::default();
        let mut survivors: Vec<(&Entry, Vec<bool>)> = Vec::new();
        for e in self.cache.entries() {
            let n = e.blocks as usize;
            let fate = if e.forwarded {
                Fate::Landed
            } else {
                match (policy, rng.as_mut()) {
                    (CutPolicy::DropAll, _) => Fate::Dropped,
                    (CutPolicy::KeepAll, _) => Fate::Kept,
                    (CutPolicy::Random { keep_percent, tear_percent, .. }, Some(rng)) => {
                        let roll: u8 = rng.gen_range(0..100);
                        if roll < tear_percent && n > 1 {
                            let mut kept: Vec<bool> = (0..n).map(|_| rng.r#gen()).collect();
                            // A tear keeps some blocks and loses some.
                            let i = rng.gen_range(0..n);
                            kept[i] = true;
                            let j = (i + 1 + rng.gen_range(0..n - 1)) % n;
                            kept[j] = false;
                            Fate::Torn { kept }
                        } else if roll < tear_percent.saturating_add(keep_percent) {
                            Fate::Kept
                        } else {
                            Fate::Dropped
                        }
                    }
                    (CutPolicy::Random { .. }, None) => unreachable!("rng exists for Random"),
                }
            };
            let mask = match &fate {
                Fate::Dropped => vec![false; n],
                Fate::Kept | Fate::Landed => vec![true; n],
                Fate::Torn { kept } => kept.clone(),
            };
            survivors.push((e, mask));
            report.writes.push(CutWrite {
                tag: e.tag,
                kind: e.kind,
                lba: Lba(e.lba),
                blocks: BlockCount(e.blocks),
                fate,
            });
        }
        // 3. The medium after the cut: per block, the newest surviving write, else what
        // the inner device holds (durable data plus landed writes).
        let mut touched: Vec<u64> =
            survivors.iter().flat_map(|(e, _)| e.lba..e.lba + e.blocks).collect();
        touched.sort_unstable();
        touched.dedup();
        let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
        for &b in &touched {
            let newest = survivors.iter().rev().find_map(|(e, mask)| {
                let i = e.block_index(b)?;
                (mask[i] && !e.dead[i]).then(|| e.block(i).to_vec())
            });
            if let Some(data) = newest {
                writes.push((b, data));
            }
        }
        drop(survivors);
        for (b, data) in writes {
            let buf = DmaBuf::from_slice(&data);
            self.inner_sync(
                IoCommand::Write { lba: Lba(b), blocks: BlockCount(1), fua: false },
                Some(buf),
            );
        }
        self.inner_sync(IoCommand::Flush, None);
        // 4. Everything volatile is gone; user commands in flight never complete.
        self.cache = WriteCache::default();
        self.queued.clear();
        self.ready.clear();
        self.pending.clear();
        self.flushes.clear();
        self.in_flight = 0;
        report
    }

    fn inner_sync(&mut self, cmd: IoCommand, buf: Option<DmaBuf>) {
        self.inner_submit_now(cmd, buf, T_CUT);
        let _ = self.inner.kick();
        while self.inner.in_flight() > 0 {
            self.inner.poll(usize::MAX, &mut |c| {
                if let Err(e) = c.result {
                    log::error!(
                        "FaultyDevice: applying a power cut failed on the inner device: {e}"
                    );
                }
            });
        }
    }

    fn inner_submit_now(&mut self, cmd: IoCommand, buf: Option<DmaBuf>, tag: u64) {
        let mut item = (cmd, buf, tag);
        loop {
            match self.inner.submit(item.0, item.1.take(), item.2) {
                Ok(()) => return,
                Err(e) if e.reason == RejectReason::QueueFull => {
                    item.1 = e.buf;
                    let _ = self.inner.kick();
                    self.inner.poll(usize::MAX, &mut |_| {});
                }
                Err(e) => {
                    log::error!("FaultyDevice: inner device rejected {cmd:?}: {e}");
                    return;
                }
            }
        }
    }

    /// Queues an inner command, keeping within the inner queue depth.
    fn inner_submit(&mut self, cmd: IoCommand, buf: Option<DmaBuf>, tag: u64) {
        self.backlog.push_back((cmd, buf, tag));
    }

    /// Submits queued inner commands while there is room. Returns whether a command
    /// completed synchronously (refused by the inner device).
    fn pump_backlog(&mut self) -> bool {
        let mut completed = false;
        while let Some((cmd, buf, tag)) = self.backlog.pop_front() {
            match self.inner.submit(cmd, buf, tag) {
                Ok(()) => {}
                Err(e) if e.reason == RejectReason::QueueFull => {
                    self.backlog.push_front((cmd, e.buf, tag));
                    break;
                }
                Err(e) => {
                    // The inner device refuses (gone): fail the command as the device would.
                    completed = true;
                    self.on_inner_completion(Completion {
                        tag,
                        result: Err(match e.reason {
                            RejectReason::DeviceGone => IoError::DeviceGone,
                            RejectReason::Invalid(w) => IoError::Invalid(w),
                            RejectReason::QueueFull => unreachable!(),
                        }),
                        buf: e.buf,
                    });
                }
            }
        }
        completed
    }

    fn release(&mut self, tag: u64, result: Result<(), IoError>, buf: Option<DmaBuf>) {
        self.release_entry(tag, result, buf, None);
    }

    fn release_entry(
        &mut self,
        tag: u64,
        result: Result<(), IoError>,
        buf: Option<DmaBuf>,
        entry: Option<u64>,
    ) {
        let latency = self.ctl.lock().latency;
        let at = self.clock.now().after(latency);
        self.ready.push((at, Completion { tag, result, buf }, entry));
    }

    /// Executes one user command at kick time.
    fn execute(&mut self, cmd: IoCommand, buf: Option<DmaBuf>, tag: u64, covered: Option<Covered>) {
        let failed = {
            let mut c = self.ctl.lock();
            c.commands_seen += 1;
            c.rules.iter_mut().find_map(|r| r.check(&cmd))
        };
        if let Some(err) = failed {
            self.release(tag, Err(err), buf);
            return;
        }
        match cmd {
            IoCommand::Read { lba, blocks } => {
                let mut buf = buf.expect("validated");
                let overlay = self.cache.overlay(lba.0, blocks.0);
                if overlay.len() as u64 == blocks.0 {
                    for (i, data) in overlay {
                        buf[i * BLOCK_SIZE_BYTES..(i + 1) * BLOCK_SIZE_BYTES]
                            .copy_from_slice(&data);
                    }
                    self.release(tag, Ok(()), Some(buf));
                } else {
                    let id = self.pending.insert(Pending::Read { tag, lba, overlay });
                    self.inner_submit(cmd, Some(buf), T_READ | id as u64);
                }
            }
            IoCommand::Write { lba, blocks, fua } => {
                let buf = buf.expect("validated");
                let seq =
                    self.cache.insert(tag, OpKind::Write, lba.0, blocks.0, Some(buf.to_vec()));
                if fua {
                    self.flushes.push_back(FlushJob::new(tag, Some(buf), true, Covered::One(seq)));
                } else {
                    self.release_entry(tag, Ok(()), Some(buf), Some(seq));
                }
            }
            IoCommand::WriteZeroes { lba, blocks } | IoCommand::Trim { lba, blocks } => {
                let seq = self.cache.insert(tag, cmd.kind(), lba.0, blocks.0, None);
                self.release_entry(tag, Ok(()), None, Some(seq));
            }
            IoCommand::Flush => {
                let covered = covered.expect("flushes carry their coverage from submit");
                self.flushes.push_back(FlushJob::new(tag, None, false, covered));
            }
        }
    }

    /// Moves the oldest flush job along; jobs run one at a time, in order. Returns
    /// whether anything changed.
    fn advance_flushes(&mut self) -> bool {
        let mut changed = false;
        while let Some(job) = self.flushes.front_mut() {
            match job.stage {
                FlushStage::Queued => {
                    changed = true;
                    self.cache.mark_forwarded(&job.covered);
                    let runs = self.cache.newest_runs(&job.covered);
                    let fua = job.fua;
                    job.stage = FlushStage::Writing(runs.len());
                    for (lba, data) in runs {
                        let blocks = BlockCount((data.len() / BLOCK_SIZE_BYTES) as u64);
                        self.inner_submit(
                            IoCommand::Write { lba: Lba(lba), blocks, fua },
                            Some(DmaBuf::from_slice(&data)),
                            T_FLUSH_DATA,
                        );
                    }
                }
                FlushStage::Writing(0) => {
                    changed = true;
                    if job.fua || job.error.is_some() {
                        job.stage = FlushStage::Done;
                    } else {
                        job.stage = FlushStage::Flushing;
                        self.inner_submit(IoCommand::Flush, None, T_FLUSH_FLUSH);
                        return changed;
                    }
                }
                FlushStage::Writing(_) | FlushStage::Flushing => return changed,
                FlushStage::Done => {
                    changed = true;
                    let job = self.flushes.pop_front().expect("front exists");
                    if job.error.is_none() {
                        self.cache.make_durable(&job.covered);
                    }
                    let result = job.error.map_or(Ok(()), Err);
                    self.release(job.tag, result, job.fua_buf);
                }
            }
        }
        changed
    }

    /// Runs flush jobs and the backlog until neither moves (a command the inner device
    /// refuses at once completes synchronously and may unblock the next step).
    fn progress(&mut self) {
        loop {
            let a = self.advance_flushes();
            let b = self.pump_backlog();
            if !a && !b {
                return;
            }
        }
    }

    fn on_inner_completion(&mut self, c: Completion) {
        match c.tag & T_MASK {
            T_READ => {
                let id = (c.tag & !T_MASK) as usize;
                let Some(Pending::Read { tag, lba, overlay }) = self.pending.try_remove(id) else {
                    panic!("inner read completion for unknown pending op {id}");
                };
                let mut buf = c.buf.expect("reads return their buffer");
                let result = c.result.map_err(|e| match e {
                    IoError::Media { .. } => IoError::Media { lba },
                    other => other,
                });
                if result.is_ok() {
                    for (i, data) in overlay {
                        buf[i * BLOCK_SIZE_BYTES..(i + 1) * BLOCK_SIZE_BYTES]
                            .copy_from_slice(&data);
                    }
                }
                self.release(tag, result, Some(buf));
            }
            T_FLUSH_DATA => {
                let job = self.flushes.front_mut().expect("flush data without a job");
                let FlushStage::Writing(n) = job.stage else {
                    panic!("flush data completion in stage {:?}", job.stage)
                };
                job.stage = FlushStage::Writing(n - 1);
                if let Err(e) = c.result {
                    job.error.get_or_insert(e);
                }
            }
            T_FLUSH_FLUSH => {
                let job = self.flushes.front_mut().expect("inner flush without a job");
                assert_eq!(job.stage, FlushStage::Flushing);
                job.stage = FlushStage::Done;
                if let Err(e) = c.result {
                    job.error.get_or_insert(e);
                }
            }
            other => panic!("unexpected inner tag kind {other:#x}"),
        }
    }

    /// Returns whether the device is off. With `accepting`, a command is about to be
    /// accepted, which is where a scheduled cut fires.
    fn check_power(&mut self, accepting: bool) -> bool {
        let cut = {
            let mut c = self.ctl.lock();
            if c.powered_off {
                return true;
            }
            match c.cut_after_commands {
                Some((at, policy)) if accepting && c.commands_seen >= at => {
                    c.cut_after_commands = None;
                    Some(policy)
                }
                _ => None,
            }
        };
        if let Some(policy) = cut {
            self.power_cut(policy);
            return true;
        }
        false
    }
}

impl FlushJob {
    fn new(tag: u64, fua_buf: Option<DmaBuf>, fua: bool, covered: Covered) -> Self {
        FlushJob { tag, fua_buf, fua, covered, stage: FlushStage::Queued, error: None }
    }
}

impl<D: BlockDevice> BlockDevice for FaultyDevice<D> {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn submit(&mut self, cmd: IoCommand, buf: Option<DmaBuf>, tag: u64) -> Result<(), SubmitError> {
        if self.check_power(true) {
            return Err(SubmitError { reason: RejectReason::DeviceGone, buf });
        }
        if let Err(reason) = validate(&self.info, &cmd, buf.as_ref()) {
            return Err(SubmitError { reason, buf });
        }
        if self.in_flight >= self.info.queue_depth {
            return Err(SubmitError { reason: RejectReason::QueueFull, buf });
        }
        let covered = matches!(cmd, IoCommand::Flush).then(|| self.cache.delivered());
        self.queued.push_back((cmd, buf, tag, covered));
        self.in_flight += 1;
        Ok(())
    }

    fn kick(&mut self) -> Result<(), IoError> {
        while let Some((cmd, buf, tag, covered)) = self.queued.pop_front() {
            if self.check_power(true) {
                return Err(IoError::DeviceGone);
            }
            self.execute(cmd, buf, tag, covered);
        }
        self.progress();
        self.inner.kick()
    }

    fn poll(&mut self, max: usize, sink: &mut dyn FnMut(Completion)) -> usize {
        if self.check_power(false) {
            return 0;
        }
        let mut inner_done = Vec::new();
        self.inner.poll(usize::MAX, &mut |c| inner_done.push(c));
        let progressed = !inner_done.is_empty();
        for c in inner_done {
            self.on_inner_completion(c);
        }
        self.progress();
        if progressed || !self.backlog.is_empty() {
            let _ = self.inner.kick();
        }
        let now = self.clock.now();
        let mut n = 0;
        let mut i = 0;
        while i < self.ready.len() && n < max {
            if self.ready[i].0 <= now {
                let (_, c, entry) = self.ready.remove(i);
                if let Some(seq) = entry {
                    self.cache.mark_delivered(seq);
                }
                self.in_flight -= 1;
                n += 1;
                sink(c);
            } else {
                i += 1;
            }
        }
        n
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn prepare_park(&mut self) -> bool {
        // Held-back completions and cache forwarding need polling; sleep only when idle.
        self.in_flight == 0
    }
}

#[cfg(test)]
mod tests;

//! The shard runtime: queues, group commit, device completions, checkpoints.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use sluice_nvme::{BlockDevice, Completion, DmaBuf, DmaPool, IoCommand, IoError, RejectReason};
use sluice_vocab::limits::{MAX_CHECKPOINT_PARTS, MAX_TRANSFER_BYTES};
use sluice_vocab::{BlockCount, Lba};

use super::checkpoint::{self, CheckpointHeader, Walk};
use super::cleaner::Cleaner;
use super::format::{
    self, BS, BatchFixed, CheckpointRef, PartRef, RecordDesc, ShardSuperblock, store_tag,
};
use super::index::{LiveTracker, Loc};
use super::mount::{self, MountError, MountOptions, ReplayInfo, ShardState};
use super::stage::{Queued, Rmw, Staged};
use super::{CollId, Query, StoreError, StoreEvent, Transaction};

/// The DMA memory a shard does its I/O with: read buffers and the chunks batches are
/// written from.
#[derive(Debug, Clone)]
pub struct StorePools {
    pub read: DmaPool,
    pub chunks: DmaPool,
}

impl StorePools {
    pub fn new(cfg: &StoreConfig) -> std::io::Result<StorePools> {
        Self::with_options(cfg, Default::default())
    }

    /// As [`new`](Self::new), mapped as `opts` says (hugepages for a VFIO device).
    pub fn with_options(
        cfg: &StoreConfig,
        opts: sluice_nvme::PoolOptions,
    ) -> std::io::Result<StorePools> {
        let chunks = (cfg.max_batch_bytes as usize)
            .max(sluice_vocab::limits::MAX_TXN_DATA_BYTES + (1 << 20))
            .div_ceil(MAX_TRANSFER_BYTES)
            + 1;
        Ok(StorePools {
            read: DmaPool::new(64 << 10, cfg.read_pool_bufs.max(1), opts)?,
            chunks: DmaPool::new(MAX_TRANSFER_BYTES, chunks, opts)?,
        })
    }

    /// Both pools, for `UringOptions::fixed_pools`.
    pub fn all(&self) -> Vec<DmaPool> {
        vec![self.read.clone(), self.chunks.clone()]
    }
}

/// Tunables of a shard.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Journal bytes since the last checkpoint that trigger the next one (capped at an
    /// eighth of the shard's capacity; space pressure triggers one earlier).
    pub checkpoint_interval_bytes: u64,
    /// Group commit packs transactions into one batch up to this size.
    pub max_batch_bytes: u64,
    /// Segments kept free for the cleaner, checkpoints and deletes.
    pub reserve_segments: u32,
    /// The cleaner works while fewer segments than this are reusable (default: an eighth
    /// of the shard, at least reserve + 2).
    pub clean_below_segments: Option<u32>,
    /// Most cleaner reads in flight: the cleaner's rate limit.
    pub cleaner_max_reads: usize,
    /// Pooled read buffers (reads up to 64 KiB use them).
    pub read_pool_bufs: usize,
    /// Device completions handled per `poll`. Completions arrive in bursts; handing them
    /// up a few at a time lets the first answers (and the I/O they trigger) go out
    /// before the whole burst is processed, so the queue does not move in lockstep.
    pub max_completions_per_poll: usize,
    /// Objects a checkpoint walk encodes per poll (bounds the pause it causes: 2048 is
    /// about a millisecond at 500k objects).
    pub checkpoint_walk_slice: usize,
    pub mount: MountOptions,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            checkpoint_interval_bytes: 256 << 20,
            max_batch_bytes: 2 << 20,
            reserve_segments: 2,
            clean_below_segments: None,
            cleaner_max_reads: 8,
            read_pool_bufs: 256,
            max_completions_per_poll: 8,
            checkpoint_walk_slice: 2048,
            mount: MountOptions::default(),
        }
    }
}

/// Counters a shard keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub txns_committed: u64,
    pub txns_failed: u64,
    pub batches: u64,
    pub batch_records_max: u64,
    pub bytes_written: u64,
    pub reads: u64,
    pub checkpoints: u64,
    pub checkpoint_failures: u64,
    pub segments_cleaned: u64,
    pub blocks_relocated: u64,
}

/// A shard that could not be opened, with its device.
pub struct OpenFailure<D> {
    pub error: MountError,
    pub device: D,
}

impl<D> std::fmt::Debug for OpenFailure<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenFailure").field("error", &self.error).finish()
    }
}

impl<D> std::fmt::Display for OpenFailure<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl<D> std::error::Error for OpenFailure<D> {}

/// Device command tags: kind in the top byte.
pub(super) const K_BATCH_WRITE: u64 = 1 << 56;
pub(super) const K_BATCH_FLUSH: u64 = 2 << 56;
pub(super) const K_READ: u64 = 3 << 56;
pub(super) const K_RMW: u64 = 4 << 56;
pub(super) const K_CLEAN: u64 = 5 << 56;
pub(super) const K_CP_VERIFY: u64 = 6 << 56;
pub(super) const K_SB_WRITE: u64 = 7 << 56;
pub(super) const K_SB_FLUSH: u64 = 8 << 56;
pub(super) const K_MASK: u64 = 0xff << 56;

/// Changes staged but not yet durable, per object and collection: queries touching them
/// wait, so reads only ever see committed state.
#[derive(Debug, Default)]
pub(super) struct Pending {
    /// Staged transactions per object, by collection (looked up by `&str`, no key to
    /// build per query).
    pub objects: HashMap<CollId, HashMap<String, u32>>,
    pub colls: HashMap<CollId, u32>,
    /// Staged transactions creating or removing collections.
    pub coll_set: u32,
    pub blocks: PendingBlocks,
}

/// Staged data blocks waiting for their batch to be durable, as runs of consecutive ids:
/// one run per write (its blocks are the write's buffer), so a 4 MiB write is one entry,
/// not a thousand. Batches commit in staging order, so runs leave from the front.
#[derive(Debug, Default)]
pub(super) struct PendingBlocks {
    runs: VecDeque<PendingRun>,
    next_id: u64,
}

#[derive(Debug)]
pub(super) struct PendingRun {
    pub first_id: u64,
    pub blocks: u64,
    /// The staged data: block `k` of the run is `data[k * BS..][..BS]`.
    pub data: Arc<Vec<u8>>,
    pub coll: CollId,
    pub name: Arc<str>,
    /// The object block of the run's first block.
    pub first_lblock: u64,
}

impl PendingBlocks {
    /// Adds `data` (whole blocks) as object blocks `first_lblock..`; returns the first
    /// block's id (the others follow).
    pub fn push(&mut self, coll: CollId, name: Arc<str>, first_lblock: u64, data: Vec<u8>) -> u64 {
        assert!(
            !data.is_empty() && data.len().is_multiple_of(BS),
            "a run of {} bytes is not whole blocks",
            data.len()
        );
        let blocks = (data.len() / BS) as u64;
        let first_id = self.next_id;
        self.next_id += blocks;
        let data = Arc::new(data);
        self.runs.push_back(PendingRun { first_id, blocks, data, coll, name, first_lblock });
        first_id
    }

    pub fn run_of(&self, id: u64) -> &PendingRun {
        let i = self.runs.partition_point(|r| r.first_id + r.blocks <= id);
        match self.runs.get(i) {
            Some(r) if r.first_id <= id => r,
            _ => panic!("pending block {id} is not staged"),
        }
    }

    pub fn bytes(&self, id: u64) -> &[u8] {
        let r = self.run_of(id);
        let at = (id - r.first_id) as usize * BS;
        &r.data[at..at + BS]
    }

    pub fn pop_front(&mut self) -> Option<PendingRun> {
        self.runs.pop_front()
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }
}

/// A checkpoint part waiting to be written by the batch pipeline.
#[derive(Debug)]
struct Special {
    seq: u64,
    index: u32,
    bytes: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BatchStage {
    Writing,
    Flushing,
}

/// The one batch in flight.
#[derive(Debug)]
struct Batch {
    txns: Vec<Staged>,
    special: Option<Special>,
    start: u64,
    meta_blocks: u64,
    blocks: u64,
    writes_left: usize,
    stage: BatchStage,
}

#[derive(Debug)]
enum CpJob {
    /// Waiting until nothing staged is pending, to snapshot exactly the durable state.
    Quiescing,
    /// Walking the index and writing parts as they fill, while transactions go on.
    Walking {
        walk: Walk,
        first_seq: u64,
        /// Per part created so far: where it landed, once durable.
        parts: Vec<Option<PartRef>>,
        /// Bytes of the entry stream so far.
        total_bytes: u64,
        /// Cut a part once this many bytes are waiting.
        target: usize,
    },
    /// Reading the parts back: per part, its chunks as they arrive.
    Verifying {
        cp: CheckpointRef,
        left: usize,
        bad: bool,
        got: Vec<Vec<Option<DmaBuf>>>,
    },
    SbWriting {
        cp: CheckpointRef,
        generation: u64,
    },
    SbFlushing {
        cp: CheckpointRef,
        generation: u64,
    },
}

/// One store shard. See the [module documentation](super).
pub struct Shard<D: BlockDevice> {
    pub(super) dev: D,
    pub(super) st: ShardState,
    pub(super) tag: u64,
    pub(super) cfg: StoreConfig,
    pub(super) pending: Pending,
    pub(super) queue: VecDeque<Queued>,
    pub(super) ready: VecDeque<Staged>,
    specials: VecDeque<Special>,
    batch: Option<Batch>,
    pub(super) rmw: Rmw,
    pub(super) reads: Vec<Option<super::query::ReadOp>>,
    pub(super) free_reads: Vec<usize>,
    pub(super) waiting: VecDeque<(u64, Query)>,
    pub(super) events: VecDeque<StoreEvent>,
    backlog: VecDeque<(IoCommand, Option<DmaBuf>, u64)>,
    cp_job: Option<CpJob>,
    pub(super) cleaner: Cleaner,
    pub(super) failed: Option<IoError>,
    pub(super) read_pool: DmaPool,
    chunk_pool: DmaPool,
    journal_bytes_since_cp: u64,
    last_cp_blocks: u64,
    /// The last checkpoint attempt found no room: the blocks it needed and the live
    /// blocks then (deletes shrink the index, so the checkpoint); none since the last
    /// checkpoint that completed.
    cp_no_room: Option<(u64, u64)>,
    /// Internal (cleaner) transactions committed, for the cleaner to count.
    pub(super) internal_committed: u64,
    /// A user transaction waits for space: the cleaner is urgent.
    pub(super) space_wait: bool,
    /// A transaction or query arrived since the last `poll`: the reactor must not sleep.
    new_work: bool,
    /// The data pieces of the batch being formed (kept for its capacity).
    batch_pieces: Vec<Arc<Vec<u8>>>,
    /// Completions of the current poll (kept for its capacity).
    done_scratch: Vec<Completion>,
    /// Size of the last checkpoint's encoding: the next one reserves room for it.
    last_cp_bytes: u64,
    /// Device completions handled (a cheap "space may have changed" generation).
    pub(super) completions: u64,
    pub(super) stats: StoreStats,
    replay: ReplayInfo,
}

impl<D: BlockDevice> std::fmt::Debug for Shard<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("device", &self.st.device)
            .field("shard", &self.st.shard)
            .field("next_seq", &self.st.next_seq)
            .field("queued", &self.queue.len())
            .field("ready", &self.ready.len())
            .finish()
    }
}

impl<D: BlockDevice> Shard<D> {
    /// Mounts shard `shard` of the store on `dev` (retrying per `cfg.mount`), then
    /// writes a recovery checkpoint so the new session starts on a clean log. On failure
    /// the device comes back with the error.
    pub fn open(dev: D, shard: u16, cfg: StoreConfig) -> Result<Shard<D>, OpenFailure<D>> {
        Self::open_with(dev, shard, cfg, None)
    }

    /// [`Self::open`] with DMA pools made beforehand by [`StorePools::new`], so that the
    /// device could register them (`UringOptions::fixed_pools`): the batch writes and
    /// reads then need no page pinning per I/O.
    pub fn open_with(
        mut dev: D,
        shard: u16,
        cfg: StoreConfig,
        pools: Option<StorePools>,
    ) -> Result<Shard<D>, OpenFailure<D>> {
        let r = (|| {
            let dsb = mount::with_retries(&cfg.mount, || mount::read_device_superblock(&mut dev))?;
            let (mut st, replay) =
                mount::with_retries(&cfg.mount, || mount::load_shard(&mut dev, &dsb, shard))?;
            if let Some((off, seq)) = replay.torn_tail {
                log::info!(
                    "{}: shard {shard}: torn journal tail at byte offset {off} (record {seq}) cut off",
                    st.device
                );
            }
            mount::write_checkpoint(&mut dev, &mut st)?;
            Ok((st, replay))
        })();
        match r {
            Ok((st, replay)) => Self::from_state(dev, st, cfg, replay, pools),
            Err(error) => Err(OpenFailure { error, device: dev }),
        }
    }

    fn from_state(
        dev: D,
        st: ShardState,
        cfg: StoreConfig,
        replay: ReplayInfo,
        pools: Option<StorePools>,
    ) -> Result<Shard<D>, OpenFailure<D>> {
        let io = |e: std::io::Error| MountError {
            device: st.device.clone(),
            structure: super::Structure::Journal(st.shard),
            offset_bytes: 0,
            kind: super::MountErrorKind::Io(IoError::Os {
                errno: e.raw_os_error().unwrap_or(libc::ENOMEM),
            }),
            attempts: 1,
        };
        let pools = match pools {
            Some(p) => Ok(p),
            None => StorePools::new(&cfg),
        };
        let StorePools { read: read_pool, chunks: chunk_pool } = match pools {
            Ok(p) => p,
            Err(e) => return Err(OpenFailure { error: io(e), device: dev }),
        };
        let last_cp_blocks =
            st.cp.as_ref().map_or(1, |c| c.parts.iter().map(|p| u64::from(p.blocks)).sum());
        Ok(Shard {
            tag: store_tag(&st.fsid),
            dev,
            st,
            cfg,
            pending: Pending::default(),
            queue: VecDeque::new(),
            ready: VecDeque::new(),
            specials: VecDeque::new(),
            batch: None,
            rmw: Rmw::default(),
            reads: Vec::new(),
            free_reads: Vec::new(),
            waiting: VecDeque::new(),
            events: VecDeque::new(),
            backlog: VecDeque::new(),
            cp_job: None,
            cleaner: Cleaner::default(),
            failed: None,
            read_pool,
            chunk_pool,
            journal_bytes_since_cp: 0,
            last_cp_blocks,
            cp_no_room: None,
            internal_committed: 0,
            space_wait: false,
            new_work: false,
            batch_pieces: Vec::new(),
            done_scratch: Vec::new(),
            last_cp_bytes: last_cp_blocks * BS as u64,
            completions: 0,
            stats: StoreStats::default(),
            replay,
        })
    }

    pub fn shard_id(&self) -> u16 {
        self.st.shard
    }

    pub fn stats(&self) -> StoreStats {
        self.stats
    }

    /// What the mount's replay found.
    pub fn replay_info(&self) -> &ReplayInfo {
        &self.replay
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.dev
    }

    /// Gives the device back (e.g. after a simulated power cut). Anything not durable is
    /// lost, as it would be on a crash. Commands already at the device are waited for
    /// (their results dropped), so the next user of the device sees none of them.
    pub fn into_device(mut self) -> D {
        let mut spins = 0u64;
        while self.dev.in_flight() > 0 {
            if self.dev.poll(usize::MAX, &mut |_| {}) == 0 {
                spins += 1;
                if spins.is_multiple_of(1024) {
                    std::thread::yield_now();
                }
            }
        }
        self.dev
    }

    /// For a clean stop (blocking: the reactor is done serving): lets the work under way
    /// finish, then writes a checkpoint of everything, so the next mount replays no
    /// journal. A block of the newest batch that rots while the OSD is stopped is then
    /// a corrupt block that reads report and scrub finds, not a torn tail that replay
    /// would cut off with every record after it. Events produced meanwhile go to
    /// `sink`. An error (the checkpoint failed, or found no room) is returned; the
    /// journal still holds everything then.
    pub fn checkpoint_for_stop(
        &mut self,
        sink: &mut dyn FnMut(StoreEvent),
    ) -> Result<(), StoreError> {
        let settle = |sh: &mut Self, sink: &mut dyn FnMut(StoreEvent)| {
            let mut idle = 0u64;
            while !sh.is_idle() && sh.failed.is_none() {
                if !sh.poll(sink) {
                    idle += 1;
                    if idle.is_multiple_of(1024) {
                        std::thread::yield_now();
                    }
                }
            }
        };
        settle(self, sink);
        if let Some(e) = self.failed {
            return Err(StoreError::Failed(e));
        }
        let before = self.stats.checkpoints;
        self.request_checkpoint();
        settle(self, sink);
        if let Some(e) = self.failed {
            return Err(StoreError::Failed(e));
        }
        if self.stats.checkpoints == before {
            return Err(StoreError::NoSpace);
        }
        Ok(())
    }

    /// Nothing queued, staged, in flight or waiting.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty()
            && self.ready.is_empty()
            && self.batch.is_none()
            && self.specials.is_empty()
            && self.waiting.is_empty()
            && self.reads.iter().all(Option::is_none)
            && self.backlog.is_empty()
            && self.dev.in_flight() == 0
            && self.cp_job.is_none()
            && self.cleaner.is_idle()
            && self.events.is_empty()
    }

    /// Space: (live blocks, capacity blocks, reusable segments, total segments).
    pub fn space_usage(&self) -> (u64, u64, u32, u32) {
        let sp = &self.st.space;
        (sp.live_total(), sp.geo.capacity_blocks(), sp.reusable_count(), sp.geo.seg_count)
    }

    /// Queues a transaction. Its result arrives as [`StoreEvent::Txn`] with `token`.
    /// Malformed transactions are refused here.
    pub fn submit(&mut self, txn: Transaction, token: u64) -> Result<(), StoreError> {
        if let Some(e) = self.failed {
            return Err(StoreError::Failed(e));
        }
        super::stage::check_shape(&txn, self.max_txn_blocks())?;
        self.queue.push_back(Queued::user(txn, token));
        self.new_work = true;
        Ok(())
    }

    /// Queues a query. Its answer arrives as [`StoreEvent::Query`] with `token`.
    pub fn query(&mut self, q: Query, token: u64) {
        self.waiting.push_back((token, q));
        self.new_work = true;
    }

    /// The largest transaction (in blocks of data and metadata) a batch can hold.
    pub(super) fn max_txn_blocks(&self) -> u64 {
        self.st.space.geo.seg_blocks - 2
    }

    /// Does whatever work is ready; hands finished results to `sink`. Returns whether
    /// anything happened.
    pub fn poll(&mut self, sink: &mut dyn FnMut(StoreEvent)) -> bool {
        let mut busy = std::mem::take(&mut self.new_work);
        // Reused from poll to poll: no allocation per pass.
        let mut done = std::mem::take(&mut self.done_scratch);
        self.dev.poll(self.cfg.max_completions_per_poll.max(1), &mut |c| done.push(c));
        busy |= !done.is_empty();
        for c in done.drain(..) {
            self.on_completion(c);
        }
        self.done_scratch = done;
        if self.failed.is_none() {
            busy |= self.stage();
            busy |= self.form_batch();
            busy |= self.advance_checkpoint();
            busy |= self.advance_cleaner();
        } else {
            self.fail_everything();
        }
        busy |= self.answer_queries();
        busy |= self.pump();
        while let Some(e) = self.events.pop_front() {
            busy = true;
            sink(e);
        }
        busy
    }

    /// Whether the reactor may sleep (nothing to do until a device completion).
    pub fn prepare_park(&mut self) -> bool {
        if self.new_work || !self.events.is_empty() || !self.backlog.is_empty() {
            return false;
        }
        // With nothing in flight no completion will come to wake us, so any queued work
        // must be finished by polling, not by sleeping.
        if self.dev.in_flight() == 0 && self.has_pending_work() {
            return false;
        }
        self.dev.prepare_park()
    }

    /// Device commands in flight (completions will come).
    pub fn device_in_flight(&self) -> usize {
        self.dev.in_flight()
    }

    /// Whether transactions, queries or internal jobs are still unfinished.
    fn has_pending_work(&self) -> bool {
        !self.queue.is_empty()
            || !self.ready.is_empty()
            || !self.specials.is_empty()
            || !self.waiting.is_empty()
            || self.batch.is_some()
            || self.cp_job.is_some()
            || self.rmw.busy()
    }

    pub fn after_park(&mut self) {
        self.dev.after_park();
    }

    pub fn park_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.dev.park_fd()
    }

    /// Queues a device command; it goes out at the next `pump`.
    pub(super) fn io(&mut self, cmd: IoCommand, buf: Option<DmaBuf>, tag: u64) {
        self.backlog.push_back((cmd, buf, tag));
    }

    /// Submits queued device commands while the queue pair has room; kicks once.
    fn pump(&mut self) -> bool {
        let mut sent = false;
        while let Some((cmd, buf, tag)) = self.backlog.pop_front() {
            let (cmd, buf, tag) = (cmd, buf, tag);
            let abs = match cmd.range() {
                Some((lba, blocks)) => {
                    let lba = Lba(self.st.base + lba.0);
                    match cmd {
                        IoCommand::Read { .. } => IoCommand::Read { lba, blocks },
                        IoCommand::Write { fua, .. } => IoCommand::Write { lba, blocks, fua },
                        IoCommand::WriteZeroes { .. } => IoCommand::WriteZeroes { lba, blocks },
                        IoCommand::Trim { .. } => IoCommand::Trim { lba, blocks },
                        IoCommand::Flush => unreachable!(),
                    }
                }
                None => cmd,
            };
            match self.dev.submit(abs, buf, tag) {
                Ok(()) => sent = true,
                Err(e) if e.reason == RejectReason::QueueFull => {
                    self.backlog.push_front((cmd, e.buf, tag));
                    break;
                }
                Err(e) => {
                    let err = match e.reason {
                        RejectReason::DeviceGone => IoError::DeviceGone,
                        RejectReason::Invalid(w) => IoError::Invalid(w),
                        RejectReason::QueueFull => unreachable!(),
                    };
                    self.on_completion(Completion { tag, result: Err(err), buf: e.buf });
                }
            }
        }
        if sent && let Err(e) = self.dev.kick() {
            self.fail(e);
        }
        sent
    }

    /// A write or flush failed: the durable state is unknown, so the shard stops.
    pub(super) fn fail(&mut self, e: IoError) {
        if self.failed.is_none() {
            log::error!(
                "{}: shard {}: device error {e}; the shard stops (restart to recover)",
                self.st.device,
                self.st.shard
            );
            self.failed = Some(e);
        }
    }

    fn fail_everything(&mut self) {
        let e = self.failed.expect("failed");
        for q in self.queue.drain(..) {
            if let Some(token) = q.token() {
                self.events
                    .push_back(StoreEvent::Txn { token, result: Err(StoreError::Failed(e)) });
            }
        }
        let staged: Vec<Staged> = self
            .ready
            .drain(..)
            .chain(self.batch.take().map(|b| b.txns).unwrap_or_default())
            .collect();
        for s in staged {
            if let Some(token) = s.token {
                self.events
                    .push_back(StoreEvent::Txn { token, result: Err(StoreError::Failed(e)) });
            }
        }
        self.specials.clear();
        self.cp_job = None;
    }

    fn on_completion(&mut self, c: Completion) {
        self.completions += 1;
        let id = c.tag & !K_MASK;
        match c.tag & K_MASK {
            K_BATCH_WRITE => {
                if let Err(e) = c.result {
                    self.fail(e);
                }
                if let Some(b) = self.batch.as_mut() {
                    b.writes_left -= 1;
                    if b.writes_left == 0 && self.failed.is_none() {
                        b.stage = BatchStage::Flushing;
                        self.io(IoCommand::Flush, None, K_BATCH_FLUSH);
                    }
                }
            }
            K_BATCH_FLUSH => match c.result {
                Ok(()) => self.commit_batch(),
                Err(e) => self.fail(e),
            },
            K_READ => self.on_read(id, c),
            K_RMW => self.on_rmw(id, c),
            K_CLEAN => self.on_clean(id, c),
            K_CP_VERIFY => self.on_cp_verify(id, c),
            K_SB_WRITE => match c.result {
                Ok(()) => {
                    if let Some(CpJob::SbWriting { cp, generation }) = self.cp_job.take() {
                        self.cp_job = Some(CpJob::SbFlushing { cp, generation });
                        self.io(IoCommand::Flush, None, K_SB_FLUSH);
                    }
                }
                Err(e) => self.fail(e),
            },
            K_SB_FLUSH => match c.result {
                Ok(()) => self.checkpoint_done(),
                Err(e) => self.fail(e),
            },
            other => panic!("completion with unknown tag kind {other:#x}"),
        }
    }

    /// Packs staged transactions (or a checkpoint part) into one batch and writes it.
    fn form_batch(&mut self) -> bool {
        if self.batch.is_some() {
            return false;
        }
        // Parts and transactions go to the log in sequence-number order.
        let special_first = match (self.specials.front(), self.ready.front()) {
            (Some(sp), Some(t)) => sp.seq < t.seq,
            (Some(_), None) => true,
            _ => false,
        };
        if special_first {
            let sp = self.specials.pop_front().expect("checked");
            let blocks = part_blocks(sp.bytes.len());
            self.st.space.reserved = self.st.space.reserved.saturating_sub(blocks);
            let Some((start, seg_seq)) = self.st.space.place(blocks, sp.seq) else {
                // The part has its sequence number: skipping it would leave a hole in the
                // log that replay must treat as its end. Stop instead (the reserve makes
                // this unreachable unless the accounting is wrong).
                log::error!(
                    "{}: shard {}: no room for checkpoint part {} (record {})",
                    self.st.device,
                    self.st.shard,
                    sp.index,
                    sp.seq
                );
                self.fail(IoError::NoSpace { lba: Lba(self.st.base) });
                return true;
            };
            let bytes = checkpoint::encode_part(
                self.st.shard,
                self.tag,
                seg_seq,
                sp.seq,
                sp.index,
                &sp.bytes,
            );
            self.write_batch(&[&bytes], start, 1, Vec::new(), Some(sp));
            return true;
        }
        if self.ready.is_empty() {
            return false;
        }
        // Take transactions while they fit the batch limit and one segment. If the first
        // fits in what is left of the open segment, fill that rather than leave it unused.
        let seg_blocks = self.st.space.geo.seg_blocks;
        let first = &self.ready[0];
        let first_blocks =
            (format::BATCH_FIXED_BYTES + format::RECORD_DESC_BYTES + first.deltas.len())
                .div_ceil(BS) as u64
                + first.data.len() as u64;
        let room = self.st.space.open_remaining();
        let limit = if first_blocks <= room { room } else { seg_blocks };
        let mut n = 0;
        let mut meta = format::BATCH_FIXED_BYTES;
        let mut data = 0u64;
        let next_special = self.specials.front().map(|sp| sp.seq);
        for s in &self.ready {
            if next_special.is_some_and(|sq| s.seq > sq) {
                break;
            }
            let m = meta + format::RECORD_DESC_BYTES + s.deltas.len();
            let d = data + s.data.len() as u64;
            let total = m.div_ceil(BS) as u64 + d;
            if n > 0 && ((total * BS as u64) > self.cfg.max_batch_bytes || total > limit) {
                break;
            }
            meta = m;
            data = d;
            n += 1;
        }
        let meta_blocks = meta.div_ceil(BS) as u64;
        let blocks = meta_blocks + data;
        let txns: Vec<Staged> = self.ready.drain(..n).collect();
        let last_seq = txns.last().expect("at least one").seq;
        let reserved: u64 = txns.iter().map(|t| t.reserved).sum();
        self.st.space.reserved = self.st.space.reserved.saturating_sub(reserved);
        let Some((start, seg_seq)) = self.st.space.place(blocks, last_seq) else {
            // Reservations make this impossible; if it happens, stop rather than lose data.
            panic!("shard {}: no room for a reserved batch of {blocks} blocks", self.st.shard);
        };
        let mut recs = Vec::with_capacity(txns.len());
        // The data goes from the staged buffers straight into the DMA chunks, one piece
        // per run (a run is its whole buffer).
        let mut pieces = std::mem::take(&mut self.batch_pieces);
        pieces.clear();
        for t in &txns {
            // Staging folded the blocks' crcs into the data's: no pass over the data.
            let crc =
                super::crc::append_blocks(crc32c::crc32c(&t.deltas), t.data_crc, t.data.len());
            debug_assert_eq!(
                crc,
                t.data.iter().fold(crc32c::crc32c(&t.deltas), |c, &id| {
                    crc32c::crc32c_append(c, self.pending.blocks.bytes(id))
                }),
                "record crc of transaction {}",
                t.seq
            );
            // A transaction's blocks are whole runs, in id order: one piece per run.
            let mut i = 0;
            while i < t.data.len() {
                let r = self.pending.blocks.run_of(t.data[i]);
                let n = r.blocks as usize;
                debug_assert!(
                    (0..n).all(|k| t.data[i + k] == r.first_id + k as u64),
                    "transactions hold whole runs"
                );
                pieces.push(Arc::clone(&r.data));
                i += n;
            }
            recs.push(RecordDesc {
                deltas_len: t.deltas.len() as u32,
                data_blocks: t.data.len() as u32,
                crc,
            });
        }
        let with: Vec<(RecordDesc, &[u8])> =
            recs.iter().zip(&txns).map(|(d, t)| (*d, t.deltas.as_slice())).collect();
        let first_seq = txns[0].seq;
        let meta_bytes = format::encode_batch_meta(
            0,
            self.st.shard,
            self.tag,
            seg_seq,
            first_seq,
            &with,
            data as u32,
        );
        debug_assert_eq!(meta_bytes.len() as u64, meta_blocks * BS as u64);
        drop(with);
        self.stats.batch_records_max = self.stats.batch_records_max.max(txns.len() as u64);
        let mut parts: Vec<&[u8]> = Vec::with_capacity(1 + pieces.len());
        parts.push(&meta_bytes);
        parts.extend(pieces.iter().map(|buf| buf.as_slice()));
        self.write_batch(&parts, start, meta_blocks, txns, None);
        drop(parts);
        pieces.clear();
        self.batch_pieces = pieces;
        true
    }

    /// Writes the concatenation of `parts` (block-aligned in total) at `start`, in DMA
    /// transfers of at most `MAX_TRANSFER_BYTES`.
    fn write_batch(
        &mut self,
        parts: &[&[u8]],
        start: u64,
        meta_blocks: u64,
        txns: Vec<Staged>,
        special: Option<Special>,
    ) {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        assert!(total > 0 && total.is_multiple_of(BS), "batch of {total} bytes");
        let blocks = (total / BS) as u64;
        let mut writes = 0;
        let mut src = parts.iter().copied().flat_map(|p| p.chunks(MAX_TRANSFER_BYTES)).peekable();
        let mut done = 0usize;
        while done < total {
            let len = MAX_TRANSFER_BYTES.min(total - done);
            let mut buf =
                self.chunk_pool.alloc().unwrap_or_else(|| DmaBuf::new(MAX_TRANSFER_BYTES));
            buf.set_len(len);
            let mut filled = 0;
            while filled < len {
                let piece = src.peek_mut().expect("parts cover the batch");
                let n = piece.len().min(len - filled);
                buf[filled..filled + n].copy_from_slice(&piece[..n]);
                filled += n;
                if n == piece.len() {
                    src.next();
                } else {
                    *piece = &piece[n..];
                }
            }
            let lba = Lba(start + (done / BS) as u64);
            self.io(
                IoCommand::Write { lba, blocks: BlockCount((len / BS) as u64), fua: false },
                Some(buf),
                K_BATCH_WRITE,
            );
            done += len;
            writes += 1;
        }
        self.stats.bytes_written += total as u64;
        self.journal_bytes_since_cp += total as u64;
        self.batch = Some(Batch {
            txns,
            special,
            start,
            meta_blocks,
            blocks,
            writes_left: writes,
            stage: BatchStage::Writing,
        });
    }

    /// The batch in flight is durable: point the index at its blocks and report.
    fn commit_batch(&mut self) {
        // After a failure `fail_everything` took the batch: a late flush completion has
        // nothing left to commit.
        let Some(b) = self.batch.take() else {
            debug_assert!(self.failed.is_some(), "a flush completed with no batch in flight");
            return;
        };
        debug_assert_eq!(b.stage, BatchStage::Flushing);
        self.stats.batches += 1;
        if let Some(sp) = b.special {
            // (A part of an abandoned checkpoint is still written: it holds a sequence
            // number. It is simply not referenced.)
            if let Some(CpJob::Walking { parts, first_seq, .. }) = self.cp_job.as_mut()
                && sp.seq >= *first_seq
            {
                parts[sp.index as usize] =
                    Some(PartRef { block: b.start, blocks: b.blocks as u32, seq: sp.seq });
            }
            return;
        }
        let mut addr = b.start + b.meta_blocks;
        for t in b.txns {
            // Its blocks are the runs at the front, whole and in order.
            let mut done = 0;
            while done < t.data.len() {
                let run = self.pending.blocks.pop_front().expect("pending run");
                assert_eq!(run.first_id, t.data[done], "runs commit in staging order");
                let st = &mut self.st;
                let mut object =
                    st.index.colls.get_mut(&run.coll).and_then(|c| c.objects.get_mut(&run.name));
                for k in 0..run.blocks {
                    // A block overwritten by a later staged write stays pending there.
                    if let Some(o) = object.as_mut()
                        && let Some(r) = o.blocks.get_mut(&(run.first_lblock + k))
                        && r.loc == Loc::Pending(run.first_id + k)
                    {
                        r.loc = Loc::Disk(addr);
                        st.space.mapped(addr);
                    }
                    addr += 1;
                }
                done += run.blocks as usize;
            }
            debug_assert_eq!(done, t.data.len());
            for &old in &t.freed {
                self.st.space.unmapped(old);
            }
            self.pending_done(&t);
            self.stats.txns_committed += 1;
            match t.token {
                Some(token) => self.events.push_back(StoreEvent::Txn { token, result: Ok(t.seq) }),
                None => self.internal_committed += 1,
            }
        }
    }

    pub(super) fn pending_done(&mut self, t: &Staged) {
        for (c, name) in &t.objects {
            if let Some(m) = self.pending.objects.get_mut(c) {
                if let Some(n) = m.get_mut(name.as_str()) {
                    *n -= 1;
                    if *n == 0 {
                        m.remove(name.as_str());
                    }
                }
                if m.is_empty() {
                    self.pending.objects.remove(c);
                }
            }
        }
        for c in &t.colls {
            if let Some(n) = self.pending.colls.get_mut(c) {
                *n -= 1;
                if *n == 0 {
                    self.pending.colls.remove(c);
                }
            }
        }
        if t.coll_set {
            self.pending.coll_set -= 1;
        }
    }

    /// Blocks held back from users: the reserve segments and room for two checkpoints.
    pub(super) fn reserve_blocks(&self) -> u64 {
        u64::from(self.cfg.reserve_segments) * self.st.space.geo.seg_blocks
            + 2 * self.last_cp_blocks
    }

    /// Whether staging must pause (a checkpoint wants a quiet index).
    pub(super) fn staging_paused(&self) -> bool {
        matches!(self.cp_job, Some(CpJob::Quiescing))
    }

    pub(super) fn checkpoint_running(&self) -> bool {
        self.cp_job.is_some()
    }

    /// Starts a checkpoint unless one is running.
    /// Starts a checkpoint unless one is running, or the last one found no room and
    /// no more room has been made since (retrying then would only fail again, on
    /// every poll).
    pub(super) fn request_checkpoint(&mut self) {
        if self.cp_job.is_none() && self.failed.is_none() && !self.checkpoint_blocked() {
            self.cp_job = Some(CpJob::Quiescing);
        }
    }

    /// Whether the last checkpoint attempt ran out of room and nothing changed that
    /// could let the next one fit: the log still has less room than it needed, and no
    /// data was deleted since.
    pub(super) fn checkpoint_blocked(&self) -> bool {
        self.cp_no_room.is_some_and(|(need, live)| {
            self.st.space.available() < need && self.st.space.live_total() >= live
        })
    }

    /// A checkpoint attempt found no room for its next part: give it up, and retry only
    /// once the log has room for the whole checkpoint (`need` blocks). Warns once per
    /// run of such failures.
    fn checkpoint_out_of_room(&mut self, part: usize, need: u64) {
        if self.cp_no_room.is_none() {
            log::warn!(
                "{}: shard {}: no room for checkpoint part {part} (needs about {need} blocks, \
                 {} available); checkpoint abandoned until the cleaner or deletes free space",
                self.st.device,
                self.st.shard,
                self.st.space.available()
            );
        } else {
            log::debug!(
                "{}: shard {}: still no room for checkpoint part {part}",
                self.st.device,
                self.st.shard
            );
        }
        self.cp_no_room = Some((need, self.st.space.live_total()));
        self.abandon_checkpoint();
    }

    fn advance_checkpoint(&mut self) -> bool {
        // A checkpoint costs time in proportion to the index (encoding stalls the shard,
        // ~0.3 us per object), so space them at least 64x their own size apart; never
        // more than an eighth of the shard (journal after the checkpoint cannot be
        // cleaned, and replay reads it all).
        let interval = self
            .cfg
            .checkpoint_interval_bytes
            .max(self.last_cp_bytes.saturating_mul(64))
            .min(self.st.space.geo.capacity_blocks() * BS as u64 / 8);
        if self.cp_job.is_none() && self.journal_bytes_since_cp >= interval {
            self.request_checkpoint();
        }
        match &mut self.cp_job {
            Some(CpJob::Quiescing) => {
                if !self.ready.is_empty() || self.batch.is_some() || self.rmw.busy() {
                    return false;
                }
                debug_assert!(self.pending.blocks.is_empty(), "quiet index has pending blocks");
                // The index is exactly the durable state up to S = next_seq - 1. Part 0,
                // the header, takes S + 1; the walk runs from here a slice per poll.
                let header = CheckpointHeader {
                    shard: self.st.shard,
                    last_seq: self.st.next_seq - 1,
                    next_segment_seq: self.st.space.next_segment_seq,
                    segs: self.st.space.segs.clone(),
                }
                .encode();
                let first_seq = self.st.next_seq;
                if !self.push_part(0, header) {
                    return true;
                }
                let cap = checkpoint::part_capacity(self.st.space.geo.seg_blocks);
                let target = ((self.last_cp_bytes / 48) as usize)
                    .clamp(MAX_TRANSFER_BYTES, cap.max(MAX_TRANSFER_BYTES))
                    .min(cap);
                self.journal_bytes_since_cp = 0;
                self.cp_job = Some(CpJob::Walking {
                    walk: Walk::new(&self.st.index),
                    first_seq,
                    parts: vec![None],
                    total_bytes: 0,
                    target,
                });
                true
            }
            Some(CpJob::Walking { walk, parts, total_bytes, target, first_seq }) => {
                let mut busy = false;
                if !walk.done() {
                    walk.step(&self.st.index, self.cfg.checkpoint_walk_slice.max(1));
                    busy = true;
                }
                let cap = checkpoint::part_capacity(self.st.space.geo.seg_blocks);
                if parts.len() + 1 >= MAX_CHECKPOINT_PARTS {
                    // Nearly out of part slots (the index grew since the last
                    // checkpoint): make the remaining parts as large as a segment allows.
                    *target = cap;
                }
                while walk.out.len() >= *target || (walk.done() && !walk.out.is_empty()) {
                    if parts.len() >= MAX_CHECKPOINT_PARTS {
                        log::error!(
                            "{}: shard {}: index too large to checkpoint (more than {} parts)",
                            self.st.device,
                            self.st.shard,
                            MAX_CHECKPOINT_PARTS
                        );
                        // Size the next attempt's parts for an index at least twice this.
                        self.last_cp_bytes =
                            self.last_cp_bytes.max(2 * (*total_bytes + walk.out.len() as u64));
                        self.stats.checkpoint_failures += 1;
                        self.cp_job = None;
                        return true;
                    }
                    let n = walk.out.len().min(cap);
                    let blocks = part_blocks(n);
                    if self.st.space.available() < blocks {
                        // Room for at least what was cut so far and this part, and for
                        // the last checkpoint's size (a retry that fails again raises it).
                        let done = parts.len() as u64 + (*total_bytes).div_ceil(BS as u64);
                        let need = (done + blocks).max(self.last_cp_blocks);
                        let part = parts.len();
                        self.checkpoint_out_of_room(part, need);
                        return true;
                    }
                    self.st.space.reserved += blocks;
                    let rest = walk.out.split_off(n);
                    let bytes = std::mem::replace(&mut walk.out, rest);
                    *total_bytes += bytes.len() as u64;
                    let index = parts.len() as u32;
                    parts.push(None);
                    let seq = self.st.next_seq;
                    self.st.next_seq += 1;
                    self.specials.push_back(Special { seq, index, bytes });
                    busy = true;
                }
                if !walk.done() || parts.iter().any(Option::is_none) {
                    return busy;
                }
                let cp = CheckpointRef {
                    first_seq: *first_seq,
                    parts: parts.iter().map(|p| p.expect("all written")).collect(),
                    total_bytes: *total_bytes,
                };
                self.last_cp_bytes = cp.total_bytes;
                // Read every part back, in transfers of at most 1 MiB.
                let chunk = (MAX_TRANSFER_BYTES / BS) as u64;
                let mut reads = Vec::new();
                let mut got = Vec::new();
                for (i, p) in cp.parts.iter().enumerate() {
                    let n = u64::from(p.blocks).div_ceil(chunk);
                    got.push((0..n).map(|_| None).collect::<Vec<Option<DmaBuf>>>());
                    for c in 0..n {
                        let blocks = chunk.min(u64::from(p.blocks) - c * chunk);
                        let lba = Lba(p.block + c * chunk);
                        reads.push((
                            IoCommand::Read { lba, blocks: BlockCount(blocks) },
                            K_CP_VERIFY | ((i as u64) << 32) | c,
                        ));
                    }
                }
                let left = reads.len();
                for (cmd, tag) in reads {
                    let (_, blocks) = cmd.range().expect("a read");
                    self.backlog.push_back((cmd, Some(DmaBuf::new(blocks.bytes() as usize)), tag));
                }
                self.cp_job = Some(CpJob::Verifying { cp, left, bad: false, got });
                true
            }
            _ => false,
        }
    }

    fn on_cp_verify(&mut self, id: u64, c: Completion) {
        let Some(CpJob::Verifying { cp, left, bad, got }) = self.cp_job.as_mut() else { return };
        *left -= 1;
        let (part, chunk) = ((id >> 32) as usize, (id & 0xffff_ffff) as usize);
        match (c.result, c.buf) {
            (Ok(()), Some(b)) => got[part][chunk] = Some(b),
            _ => *bad = true,
        }
        if *left > 0 {
            return;
        }
        if !*bad {
            for (i, chunks) in got.iter().enumerate() {
                let mut bytes = Vec::with_capacity(chunks.iter().flatten().map(|b| b.len()).sum());
                for b in chunks {
                    bytes.extend_from_slice(b.as_ref().expect("every chunk arrived"));
                }
                let ok = BatchFixed::decode(&bytes)
                    .ok()
                    .filter(|f| f.first_seq == cp.parts[i].seq)
                    .is_some_and(|f| checkpoint::decode_part(&f, &bytes).is_ok());
                *bad |= !ok;
            }
        }
        if *bad {
            log::error!(
                "{}: shard {}: checkpoint did not read back intact; keeping the previous one",
                self.st.device,
                self.st.shard
            );
            self.abandon_checkpoint();
            return;
        }
        let cp = cp.clone();
        let generation = self.st.sb_generation + 1;
        let sb = ShardSuperblock {
            shard: self.st.shard,
            fsid: self.st.fsid,
            generation,
            checkpoint: cp.clone(),
        };
        let slot = generation % 2;
        self.io(
            IoCommand::Write { lba: Lba(slot), blocks: BlockCount(1), fua: false },
            Some(DmaBuf::from_slice(&sb.encode())),
            K_SB_WRITE,
        );
        self.cp_job = Some(CpJob::SbWriting { cp, generation });
    }

    /// A running checkpoint walk keeps what `d` is about to change, as of its start.
    pub(super) fn checkpoint_before(&mut self, d: &super::delta::Delta) {
        if let Some(CpJob::Walking { walk, .. }) = self.cp_job.as_mut() {
            walk.before(&self.st.index, d);
        }
    }

    /// Queues checkpoint part `index` with the next sequence number.
    /// Returns false (and queues nothing, takes no sequence number) if the log has no
    /// room for it: parts reserve their space when cut, like staged transactions, so a
    /// transaction staged after a part can never take the room the part needs.
    fn push_part(&mut self, index: u32, bytes: Vec<u8>) -> bool {
        let blocks = part_blocks(bytes.len());
        if self.st.space.available() < blocks {
            let need = blocks.max(self.last_cp_blocks);
            self.checkpoint_out_of_room(index as usize, need);
            return false;
        }
        self.st.space.reserved += blocks;
        let seq = self.st.next_seq;
        self.st.next_seq += 1;
        self.specials.push_back(Special { seq, index, bytes });
        true
    }

    /// Gives up on the running checkpoint; the previous one stays the root. Parts already
    /// queued are still written (they hold sequence numbers; replay skips them).
    fn abandon_checkpoint(&mut self) {
        self.stats.checkpoint_failures += 1;
        self.cp_job = None;
    }

    /// The superblock points at the new checkpoint and is durable: release the old one.
    fn checkpoint_done(&mut self) {
        let Some(CpJob::SbFlushing { cp, generation }) = self.cp_job.take() else { return };
        let sp = &mut self.st.space;
        for &seg in &self.st.cp_segments {
            sp.pinned[seg as usize] = false;
        }
        self.st.cp_segments = cp.parts.iter().filter_map(|p| sp.geo.seg_of(p.block)).collect();
        for &seg in &self.st.cp_segments {
            sp.pinned[seg as usize] = true;
        }
        sp.cp_last_seq = cp.state_seq();
        self.cp_no_room = None;
        self.last_cp_blocks = cp.parts.iter().map(|p| u64::from(p.blocks)).sum();
        self.st.sb_generation = generation;
        self.st.cp = Some(cp);
        self.stats.checkpoints += 1;
    }
}

/// Blocks a checkpoint part of `bytes` bytes takes in the log (one metadata block).
fn part_blocks(bytes: usize) -> u64 {
    1 + bytes.div_ceil(BS) as u64
}

#[cfg(test)]
mod tests {
    use sluice_nvme::RamDevice;

    use super::*;
    use crate::store::blocking::{run_txn, settle};
    use crate::store::{MkfsOptions, TxOp, mkfs};

    fn shard() -> Shard<RamDevice> {
        let mut dev = RamDevice::new(16 << 20, 64);
        mkfs(&mut dev, &MkfsOptions::default()).unwrap();
        let mut s = Shard::open(dev, 0, StoreConfig::default()).unwrap();
        run_txn(&mut s, Transaction { ops: vec![TxOp::CreateCollection { coll: CollId(1) }] })
            .unwrap();
        s
    }

    /// A cleaner that wants a checkpoint which cannot be written (no room) does not keep
    /// the shard busy: the reactor parks.
    #[test]
    fn a_blocked_checkpoint_does_not_keep_the_shard_busy() {
        let mut dev = RamDevice::new(16 << 20, 64);
        mkfs(&mut dev, &MkfsOptions::default()).unwrap();
        let cfg = StoreConfig { clean_below_segments: Some(u32::MAX), ..StoreConfig::default() };
        let mut s = Shard::open(dev, 0, cfg).unwrap();
        run_txn(&mut s, Transaction { ops: vec![TxOp::CreateCollection { coll: CollId(1) }] })
            .unwrap();
        // Blocked for good; then a few segments of data wait for a checkpoint.
        s.cp_no_room = Some((u64::MAX, 0));
        for i in 0..24 {
            let op = TxOp::WriteFull {
                coll: CollId(1),
                name: format!("o{i}"),
                data: vec![i as u8; 128 << 10],
            };
            run_txn(&mut s, Transaction { ops: vec![op] }).unwrap();
        }
        assert!(s.st.space.awaiting_checkpoint() >= 2);
        let busy = (0..10_000).filter(|_| s.poll(&mut |_| {})).count();
        assert!(busy < 100, "{busy} of 10000 idle polls were busy");
        assert!(!s.checkpoint_running());
    }

    /// A clean stop's checkpoint leaves no journal to replay: the next mount reads the
    /// data from the checkpoint's index (so a block that rots meanwhile is a corrupt
    /// read, never a torn tail cut off). Without room it says so.
    #[test]
    fn a_checkpoint_for_stop_makes_a_rotten_newest_block_a_corrupt_read() {
        let mut s = shard();
        for i in 0..20 {
            let op =
                TxOp::WriteFull { coll: CollId(1), name: format!("o{i}"), data: vec![i; 9000] };
            s.submit(Transaction { ops: vec![op] }, u64::from(i)).unwrap();
        }
        let mut done = 0;
        s.checkpoint_for_stop(&mut |e| {
            if let StoreEvent::Txn { result, .. } = e {
                result.unwrap();
                done += 1;
            }
        })
        .unwrap();
        assert_eq!(done, 20, "the writes under way finished first");
        // The newest write's data rots while the store is stopped.
        let dev = s.into_device();
        let media = std::sync::Arc::clone(dev.media());
        let mut rotten = 0;
        let mut block = vec![0u8; BS];
        for lba in 0..(16u64 << 20) / BS as u64 {
            media.read(sluice_vocab::Lba(lba), &mut block);
            if block.iter().all(|b| *b == 19) {
                block[100] ^= 0xff;
                media.write(sluice_vocab::Lba(lba), &block);
                rotten += 1;
            }
        }
        assert!(rotten > 0);
        let mut s = Shard::open(dev, 0, StoreConfig::default()).unwrap();
        let read = |s: &mut Shard<RamDevice>, name: &str| {
            let q = crate::store::Query::Read {
                coll: CollId(1),
                name: name.into(),
                offset: 0,
                len: 9000,
            };
            crate::store::blocking::run_query(s, q)
        };
        match read(&mut s, "o7").unwrap() {
            crate::store::Answer::Data(d) => assert_eq!(d.data(), &[7u8; 9000][..]),
            other => panic!("{other:?}"),
        }
        // Not cut off with the journal's end: found, and reported corrupt.
        let r = read(&mut s, "o19");
        assert!(matches!(r, Err(StoreError::Corrupt { .. })), "{r:?}");
        // No room for a checkpoint: an error, and the journal keeps everything.
        let held = s.st.space.available();
        s.st.space.reserved += held;
        let op = TxOp::WriteFull { coll: CollId(1), name: "late".into(), data: vec![1; 10] };
        let r = s.checkpoint_for_stop(&mut |_| {});
        assert!(r.is_err(), "{r:?}");
        s.st.space.reserved -= held;
        run_txn(&mut s, Transaction { ops: vec![op] }).unwrap();
    }

    /// A checkpoint that finds no room gives up once, and is not retried on every poll
    /// while no room has been made (that spun a reactor and flooded the log); once room
    /// is back, the next request runs and completes.
    #[test]
    fn a_checkpoint_without_room_is_retried_only_once_room_is_made() {
        let mut s = shard();
        settle(&mut s);
        let before = s.stats();
        // Everything promised away: no room for even the header part.
        let held = s.st.space.available();
        s.st.space.reserved += held;
        for _ in 0..10_000 {
            s.request_checkpoint();
            s.poll(&mut |_| {});
        }
        let mid = s.stats();
        assert_eq!(mid.checkpoint_failures - before.checkpoint_failures, 1, "retried in a loop");
        assert_eq!(mid.checkpoints, before.checkpoints);
        assert!(s.checkpoint_blocked());
        assert!(!s.checkpoint_running());
        // Deleting data may shrink the next checkpoint enough: it is tried again.
        let (need, live) = s.cp_no_room.expect("blocked");
        s.cp_no_room = Some((need, live + 1));
        assert!(!s.checkpoint_blocked(), "retried after deletes");
        s.cp_no_room = Some((need, live));
        // Room again: the next request checkpoints.
        s.st.space.reserved -= held;
        assert!(!s.checkpoint_blocked());
        s.request_checkpoint();
        assert!(s.checkpoint_running());
        settle(&mut s);
        let after = s.stats();
        assert_eq!(after.checkpoints, mid.checkpoints + 1);
        assert_eq!(after.checkpoint_failures, mid.checkpoint_failures);
        assert_eq!(s.cp_no_room, None, "a completed checkpoint clears the back-off");
    }
}

//! Creating a store (`mkfs`) and bringing a shard back from the device (`mount`).
//!
//! Mount reads, in order: the device superblock (two copies), the shard superblock (two
//! slots; the valid one with the highest generation wins), the checkpoint it points to,
//! and the journal after it. It classifies what it finds:
//!
//! * a **torn tail** (the last batch incomplete) is normal: replay stops there;
//! * a blank device is "not a store" (mkfs is never automatic);
//! * an unreadable or corrupt superblock (both copies), checkpoint or journal record in
//!   the middle of the log (a later batch exists, which the writer only writes after the
//!   earlier one was durable) is an error. Mount retries with backoff a bounded number
//!   of times, then fails naming the device, the structure and the byte offset.
//!
//! Mount writes nothing until it has read everything. Then [`write_checkpoint`] records
//! the recovered state in fresh segments, so the next session never continues after a
//! torn tail; the old checkpoint stays the root until the new one is durable and read
//! back.

use std::time::Duration;

use sluice_nvme::{BlockDevice, DmaBuf, IoCommand, IoError, flush_sync, run_sync};
use sluice_vocab::limits::{
    MAX_CHECKPOINT_PARTS, MAX_SHARDS, MAX_TRANSFER_BYTES, MIN_SEGMENT_BYTES,
};
use sluice_vocab::{BlockCount, Lba};

use super::checkpoint::{self, CheckpointData, CheckpointHeader};
use super::delta;
use super::format::{
    self, BS, BatchFixed, CheckpointRef, DEVICE_HEADER_BLOCKS, DeviceSuperblock, FLAG_CHECKPOINT,
    PartRef, SHARD_HEADER_BLOCKS, ShardRegion, ShardSuperblock, store_tag,
};
use super::index::{Index, Loc};
use super::space::{Geometry, SegInfo, SegState, Space};

/// Which on-disk structure a mount error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Structure {
    DeviceSuperblock,
    ShardSuperblock(u16),
    Checkpoint(u16),
    Journal(u16),
}

impl std::fmt::Display for Structure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Structure::DeviceSuperblock => write!(f, "the device superblock"),
            Structure::ShardSuperblock(s) => write!(f, "the superblock of shard {s}"),
            Structure::Checkpoint(s) => write!(f, "the checkpoint of shard {s}"),
            Structure::Journal(s) => write!(f, "the journal of shard {s}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountErrorKind {
    /// No store on the device (blank, or something else).
    NotAStore(String),
    /// The device could not be read (or written, for the mount checkpoint).
    Io(IoError),
    /// Bytes that do not check out.
    Corrupt(String),
    /// No room left to write the recovery checkpoint.
    Full,
}

/// Why a shard could not be mounted. The device was not modified unless the error is
/// about writing the recovery checkpoint, which never touches the previous root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountError {
    pub device: String,
    pub structure: Structure,
    pub offset_bytes: u64,
    pub kind: MountErrorKind,
    pub attempts: u32,
}

impl MountError {
    fn new(device: &str, structure: Structure, lba: u64, kind: MountErrorKind) -> MountError {
        MountError {
            device: device.to_string(),
            structure,
            offset_bytes: lba * BS as u64,
            kind,
            attempts: 1,
        }
    }

    /// Whether trying again may help (I/O errors and corruption may be transient).
    pub fn retriable(&self) -> bool {
        matches!(self.kind, MountErrorKind::Io(_) | MountErrorKind::Corrupt(_))
    }
}

impl std::fmt::Display for MountError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} at byte offset {}: ", self.device, self.structure, self.offset_bytes)?;
        match &self.kind {
            MountErrorKind::NotAStore(what) => {
                return write!(
                    f,
                    "no Sluice store here ({what}); create one with `sluice-osd mkfs` (nothing was changed)"
                );
            }
            MountErrorKind::Io(e) => write!(f, "I/O error: {e}")?,
            MountErrorKind::Corrupt(why) => write!(f, "corrupt: {why}")?,
            MountErrorKind::Full => write!(f, "no free segment to write the recovery checkpoint")?,
        }
        if self.attempts > 1 {
            write!(f, " (after {} attempts)", self.attempts)?;
        }
        write!(
            f,
            "; the store was not started and its last good state was left untouched: fix or replace the \
             device and start again, or rebuild this OSD from its replicas"
        )
    }
}

impl std::error::Error for MountError {}

/// How hard mount tries before giving up.
#[derive(Debug, Clone, Copy)]
pub struct MountOptions {
    /// Retries after the first attempt.
    pub retries: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            retries: 5,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// Runs `attempt` until it succeeds, fails for good, or the retries are used up.
pub(super) fn with_retries<T>(
    opts: &MountOptions,
    mut attempt: impl FnMut() -> Result<T, MountError>,
) -> Result<T, MountError> {
    let mut backoff = opts.backoff_initial;
    let mut n = 0;
    loop {
        n += 1;
        match attempt() {
            Ok(v) => return Ok(v),
            Err(mut e) if e.retriable() && n <= opts.retries => {
                log::warn!("mount attempt {n} failed: {e}; retrying in {backoff:?}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(opts.backoff_max);
                e.attempts = n;
            }
            Err(mut e) => {
                e.attempts = n;
                return Err(e);
            }
        }
    }
}

/// Reads `blocks` blocks at device `lba`, in transfers of at most 1 MiB.
pub(super) fn read_blocks<D: BlockDevice + ?Sized>(
    dev: &mut D,
    lba: u64,
    blocks: u64,
) -> Result<Vec<u8>, IoError> {
    let mut out = Vec::with_capacity((blocks as usize) * BS);
    let max = (MAX_TRANSFER_BYTES / BS) as u64;
    let mut done = 0;
    while done < blocks {
        let n = (blocks - done).min(max);
        let buf = DmaBuf::new(n as usize * BS);
        let (r, buf) = run_sync(
            dev,
            IoCommand::Read { lba: Lba(lba + done), blocks: BlockCount(n) },
            Some(buf),
        );
        r?;
        out.extend_from_slice(&buf.expect("read returns its buffer"));
        done += n;
    }
    Ok(out)
}

/// Writes whole blocks at device `lba`, in transfers of at most 1 MiB.
pub(super) fn write_blocks<D: BlockDevice + ?Sized>(
    dev: &mut D,
    lba: u64,
    data: &[u8],
) -> Result<(), IoError> {
    assert_eq!(data.len() % BS, 0);
    for (i, chunk) in data.chunks(MAX_TRANSFER_BYTES).enumerate() {
        let at = lba + (i * MAX_TRANSFER_BYTES / BS) as u64;
        let cmd = IoCommand::Write {
            lba: Lba(at),
            blocks: BlockCount((chunk.len() / BS) as u64),
            fua: false,
        };
        run_sync(dev, cmd, Some(DmaBuf::from_slice(chunk))).0?;
    }
    Ok(())
}

/// Reads the device superblock: the valid copy with the highest generation.
pub fn read_device_superblock<D: BlockDevice + ?Sized>(
    dev: &mut D,
) -> Result<DeviceSuperblock, MountError> {
    let name = dev.info().name.clone();
    let n = dev.info().num_blocks;
    let mut errs = Vec::new();
    let mut best: Option<DeviceSuperblock> = None;
    let mut blank = true;
    for lba in DeviceSuperblock::copy_lbas(n) {
        match read_blocks(dev, lba, 1) {
            Err(e) => {
                return Err(MountError::new(
                    &name,
                    Structure::DeviceSuperblock,
                    lba,
                    MountErrorKind::Io(e),
                ));
            }
            Ok(b) => {
                blank &= b.iter().all(|&x| x == 0);
                match DeviceSuperblock::decode(&b) {
                    Ok(sb) if sb.device_blocks == n => {
                        if best.as_ref().is_none_or(|cur| sb.generation > cur.generation) {
                            best = Some(sb);
                        }
                    }
                    Ok(sb) => errs.push(format!(
                        "copy at block {lba} describes a device of {} blocks, this one has {n}",
                        sb.device_blocks
                    )),
                    Err(e) => errs.push(format!("copy at block {lba}: {e}")),
                }
            }
        }
    }
    match best {
        Some(sb) => {
            for e in &errs {
                log::warn!("{name}: one device superblock copy is bad ({e}); using the other");
            }
            Ok(sb)
        }
        None if blank => Err(MountError::new(
            &name,
            Structure::DeviceSuperblock,
            0,
            MountErrorKind::NotAStore("both superblock locations are zero: a blank device".into()),
        )),
        None if errs.iter().all(|e| e.contains("bad magic")) => Err(MountError::new(
            &name,
            Structure::DeviceSuperblock,
            0,
            MountErrorKind::NotAStore("no Sluice superblock at either location".into()),
        )),
        None => Err(MountError::new(
            &name,
            Structure::DeviceSuperblock,
            0,
            MountErrorKind::Corrupt(errs.join("; ")),
        )),
    }
}

/// What mkfs should build.
#[derive(Debug, Clone)]
pub struct MkfsOptions {
    pub shards: u16,
    /// Segment size; default: a 32nd of a shard, between 1 MiB and 64 MiB (the largest
    /// transaction must fit in a segment: 8 MiB segments hold 4 MiB objects).
    pub segment_bytes: Option<u64>,
    /// Overwrite whatever is on the device.
    pub force: bool,
    /// The store id; random if `None` (tests fix it for reproducibility).
    pub fsid: Option<[u8; 16]>,
}

impl Default for MkfsOptions {
    fn default() -> Self {
        MkfsOptions { shards: 1, segment_bytes: None, force: false, fsid: None }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MkfsError {
    #[error("{device} already holds {found}; pass --force to destroy it")]
    Exists { device: String, found: String },
    #[error("{device}: {why}")]
    Invalid { device: String, why: String },
    #[error("{device}: I/O error while creating the store: {source}")]
    Io { device: String, source: IoError },
}

/// Creates an empty store on `dev`. Refuses to overwrite a store or other data without
/// `force`, naming what it found.
pub fn mkfs<D: BlockDevice + ?Sized>(
    dev: &mut D,
    opts: &MkfsOptions,
) -> Result<DeviceSuperblock, MkfsError> {
    let device = dev.info().name.clone();
    let io = |source| MkfsError::Io { device: device.clone(), source };
    let invalid = |why: String| MkfsError::Invalid { device: device.clone(), why };
    let n = dev.info().num_blocks;
    if opts.shards == 0 || opts.shards as usize > MAX_SHARDS {
        return Err(invalid(format!("shard count must be 1..={MAX_SHARDS}")));
    }
    if !opts.force {
        match read_device_superblock(dev) {
            Ok(sb) => {
                return Err(MkfsError::Exists {
                    device,
                    found: format!(
                        "a Sluice store (fsid {}, {} shards, created at unix time {})",
                        hex(&sb.fsid),
                        sb.shards.len(),
                        sb.created_unix_s
                    ),
                });
            }
            Err(e) if matches!(e.kind, MountErrorKind::NotAStore(_)) => {
                let first = read_blocks(dev, 0, 1).map_err(io)?;
                if first.iter().any(|&b| b != 0) {
                    return Err(MkfsError::Exists {
                        device,
                        found: "data that is not a Sluice store (its first block is not zero)"
                            .into(),
                    });
                }
            }
            Err(e) => {
                return Err(MkfsError::Exists {
                    device,
                    found: format!("a damaged Sluice store ({e})"),
                });
            }
        }
    }
    if n < DEVICE_HEADER_BLOCKS + 1 {
        return Err(invalid("device too small".into()));
    }
    let usable = n - DEVICE_HEADER_BLOCKS - 1;
    let region_blocks = usable / u64::from(opts.shards);
    let seg_bytes = match opts.segment_bytes {
        Some(b) => b,
        None => (region_blocks * BS as u64 / 32).clamp(1 << 20, 64 << 20) / BS as u64 * BS as u64,
    };
    let seg_blocks = seg_bytes / BS as u64;
    if seg_bytes % BS as u64 != 0 || seg_bytes < MIN_SEGMENT_BYTES as u64 {
        return Err(invalid(format!(
            "segment size must be a multiple of 4k and at least {MIN_SEGMENT_BYTES} bytes"
        )));
    }
    if region_blocks < SHARD_HEADER_BLOCKS + 8 * seg_blocks {
        return Err(invalid(format!(
            "too small for {} shards of at least 8 segments of {} bytes (need {} bytes)",
            opts.shards,
            seg_bytes,
            (DEVICE_HEADER_BLOCKS
                + 1
                + u64::from(opts.shards) * (SHARD_HEADER_BLOCKS + 8 * seg_blocks))
                * BS as u64
        )));
    }
    // A checkpoint's header (part 0) carries the whole segment table and must fit one
    // part: at most ~24 bytes per segment against a segment's worth of data.
    let seg_count = Geometry::for_region(region_blocks, seg_blocks).seg_count as u64;
    if seg_count * 24 > checkpoint::part_capacity(seg_blocks) as u64 {
        return Err(invalid(format!(
            "{seg_count} segments of {seg_bytes} bytes per shard are too many for the \
             checkpoint header; use larger segments or more shards"
        )));
    }
    let fsid: [u8; 16] = opts.fsid.unwrap_or_else(rand::random);
    let shards: Vec<ShardRegion> = (0..u64::from(opts.shards))
        .map(|i| ShardRegion {
            start: DEVICE_HEADER_BLOCKS + i * region_blocks,
            blocks: region_blocks,
        })
        .collect();
    let created_unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let dsb = DeviceSuperblock {
        generation: 1,
        fsid,
        created_unix_s,
        device_blocks: n,
        segment_blocks: seg_blocks as u32,
        shards,
    };
    // Invalidate whatever was there first, so an interrupted mkfs leaves no half-old store.
    for lba in DeviceSuperblock::copy_lbas(n) {
        write_blocks(dev, lba, &[0u8; BS]).map_err(io)?;
    }
    flush_sync(dev).map_err(io)?;
    for (i, region) in dsb.shards.iter().enumerate() {
        write_blocks(dev, region.start, &[0u8; 2 * BS]).map_err(io)?;
        let geo = Geometry::for_region(region.blocks, seg_blocks);
        let mut st = ShardState {
            device: device.clone(),
            shard: i as u16,
            base: region.start,
            fsid,
            index: Index::default(),
            space: Space::fresh(geo),
            cp: None,
            cp_segments: Vec::new(),
            sb_generation: 0,
            next_seq: 1,
        };
        write_checkpoint(dev, &mut st).map_err(|e| invalid(e.to_string()))?;
    }
    let b = dsb.encode();
    for lba in DeviceSuperblock::copy_lbas(n) {
        write_blocks(dev, lba, &b).map_err(io)?;
    }
    flush_sync(dev).map_err(io)?;
    let back = read_device_superblock(dev)
        .map_err(|e| invalid(format!("reading back the new superblock: {e}")))?;
    assert_eq!(back, dsb);
    Ok(dsb)
}

pub(super) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A shard's state as mount rebuilt it.
#[derive(Debug)]
pub(super) struct ShardState {
    pub device: String,
    pub shard: u16,
    /// Device LBA of the shard region.
    pub base: u64,
    pub fsid: [u8; 16],
    pub index: Index,
    pub space: Space,
    /// The durable checkpoint (None only inside mkfs).
    pub cp: Option<CheckpointRef>,
    pub cp_segments: Vec<u32>,
    pub sb_generation: u64,
    pub next_seq: u64,
}

/// What replay found, for logs and fsck.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayInfo {
    pub records: u64,
    pub batches: u64,
    /// Byte offset and sequence number of a torn tail that was cut off.
    pub torn_tail: Option<(u64, u64)>,
}

/// Serializes the index into checkpoint parts in fresh log space, makes them durable,
/// reads them back, then moves the superblock (other slot, next generation) to them and
/// releases the previous checkpoint's segments. Synchronous: for mkfs and mount.
pub(super) fn write_checkpoint<D: BlockDevice + ?Sized>(
    dev: &mut D,
    st: &mut ShardState,
) -> Result<(), MountError> {
    let s = st.shard;
    let err = |lba: u64, kind| MountError::new(&st.device, Structure::Checkpoint(s), lba, kind);
    st.space.seal_open();
    let header = CheckpointHeader {
        shard: s,
        last_seq: st.next_seq - 1,
        next_segment_seq: st.space.next_segment_seq,
        segs: st.space.segs.clone(),
    }
    .encode();
    let stream = checkpoint::encode_stream(&st.index);
    let cap = checkpoint::part_capacity(st.space.geo.seg_blocks);
    let chunks: Vec<&[u8]> = std::iter::once(&header[..]).chain(stream.chunks(cap)).collect();
    if chunks.len() > MAX_CHECKPOINT_PARTS {
        return Err(err(
            st.base,
            MountErrorKind::Corrupt(format!(
                "index too large for a checkpoint ({} bytes)",
                stream.len()
            )),
        ));
    }
    let tag = store_tag(&st.fsid);
    let first_seq = st.next_seq;
    let mut parts = Vec::with_capacity(chunks.len());
    for (i, chunk) in chunks.iter().enumerate() {
        let seq = first_seq + i as u64;
        let blocks = 1 + chunk.len().div_ceil(BS) as u64;
        let Some((block, seg_seq)) = st.space.place(blocks, seq) else {
            return Err(err(st.base, MountErrorKind::Full));
        };
        let b = checkpoint::encode_part(s, tag, seg_seq, seq, i as u32, chunk);
        write_blocks(dev, st.base + block, &b)
            .map_err(|e| err(st.base + block, MountErrorKind::Io(e)))?;
        // Durable before the next record goes out, as for every batch: a power cut may
        // then lose only the newest part, which replay sees as a torn tail, never a hole
        // with valid records after it (that would read as mid-journal corruption).
        flush_sync(dev).map_err(|e| err(st.base + block, MountErrorKind::Io(e)))?;
        parts.push(PartRef { block, blocks: blocks as u32, seq });
    }
    st.next_seq = first_seq + parts.len() as u64;
    st.space.seal_open();
    for p in &parts {
        let b = read_blocks(dev, st.base + p.block, u64::from(p.blocks))
            .map_err(|e| err(st.base + p.block, MountErrorKind::Io(e)))?;
        let f = BatchFixed::decode(&b).map_err(|e| {
            err(st.base + p.block, MountErrorKind::Corrupt(format!("read back: {e}")))
        })?;
        checkpoint::decode_part(&f, &b).map_err(|e| {
            err(st.base + p.block, MountErrorKind::Corrupt(format!("read back: {e}")))
        })?;
    }
    let cp = CheckpointRef { first_seq, parts, total_bytes: stream.len() as u64 };
    let generation = st.sb_generation + 1;
    let sb = ShardSuperblock { shard: s, fsid: st.fsid, generation, checkpoint: cp.clone() };
    let slot = generation % 2;
    let sb_err = |e| {
        MountError::new(
            &st.device,
            Structure::ShardSuperblock(s),
            st.base + slot,
            MountErrorKind::Io(e),
        )
    };
    write_blocks(dev, st.base + slot, &sb.encode()).map_err(sb_err)?;
    flush_sync(dev).map_err(sb_err)?;
    // The new root is durable: the previous checkpoint's segments may go.
    for &seg in &st.cp_segments {
        st.space.pinned[seg as usize] = false;
    }
    st.cp_segments = cp.parts.iter().filter_map(|p| st.space.geo.seg_of(p.block)).collect();
    for &seg in &st.cp_segments {
        st.space.pinned[seg as usize] = true;
    }
    st.space.cp_last_seq = cp.state_seq();
    st.sb_generation = generation;
    st.cp = Some(cp);
    Ok(())
}

/// Mounts shard `shard` read-only: rebuilds its state from the device without writing.
pub(super) fn load_shard<D: BlockDevice + ?Sized>(
    dev: &mut D,
    dsb: &DeviceSuperblock,
    shard: u16,
) -> Result<(ShardState, ReplayInfo), MountError> {
    let device = dev.info().name.clone();
    let region = *dsb.shards.get(shard as usize).ok_or_else(|| {
        MountError::new(
            &device,
            Structure::ShardSuperblock(shard),
            0,
            MountErrorKind::Corrupt(format!("no shard {shard} on this device")),
        )
    })?;
    let base = region.start;
    let err = |st: Structure, lba: u64, kind| MountError::new(&device, st, lba, kind);
    let dev_name = device.as_str();
    let io = |st: Structure, lba: u64| {
        move |e| MountError::new(dev_name, st, lba, MountErrorKind::Io(e))
    };
    let geo = Geometry::for_region(region.blocks, u64::from(dsb.segment_blocks));
    let tag = store_tag(&dsb.fsid);

    // 1. Shard superblock: the valid slot with the highest generation.
    let mut best: Option<ShardSuperblock> = None;
    let mut errs = Vec::new();
    for slot in 0..SHARD_HEADER_BLOCKS {
        let b = read_blocks(dev, base + slot, 1)
            .map_err(io(Structure::ShardSuperblock(shard), base + slot))?;
        match ShardSuperblock::decode(&b) {
            Ok(sb) if sb.fsid == dsb.fsid && sb.shard == shard => {
                if best.as_ref().is_none_or(|c| sb.generation > c.generation) {
                    best = Some(sb);
                }
            }
            Ok(_) => errs.push(format!("slot {slot} belongs to another store or shard")),
            Err(e) => errs.push(format!("slot {slot}: {e}")),
        }
    }
    let sb = best.ok_or_else(|| {
        err(Structure::ShardSuperblock(shard), base, MountErrorKind::Corrupt(errs.join("; ")))
    })?;

    // 2. The checkpoint.
    let cpst = Structure::Checkpoint(shard);
    let mut header = Vec::new();
    let mut bytes = Vec::with_capacity(sb.checkpoint.total_bytes.min(1 << 30) as usize);
    let mut part_heads = Vec::new();
    for (i, p) in sb.checkpoint.parts.iter().enumerate() {
        let lba = base + p.block;
        if geo.seg_of(p.block).is_none()
            || geo.seg_of(p.block + u64::from(p.blocks) - 1) != geo.seg_of(p.block)
        {
            return Err(err(
                cpst,
                lba,
                MountErrorKind::Corrupt(format!("part {i} lies outside the segments")),
            ));
        }
        let b = read_blocks(dev, lba, u64::from(p.blocks)).map_err(io(cpst, lba))?;
        let corrupt =
            |why: String| err(cpst, lba, MountErrorKind::Corrupt(format!("part {i}: {why}")));
        let f = BatchFixed::decode(&b).map_err(|e| corrupt(e.to_string()))?;
        if f.shard != shard
            || f.store_tag != tag
            || f.first_seq != p.seq
            || f.total_blocks() != u64::from(p.blocks)
        {
            return Err(corrupt("header does not match the superblock".into()));
        }
        let part = checkpoint::decode_part(&f, &b).map_err(|e| corrupt(e.to_string()))?;
        if part.index as usize != i {
            return Err(corrupt("part numbering".into()));
        }
        if i == 0 {
            header = part.bytes.to_vec();
        } else {
            bytes.extend_from_slice(part.bytes);
        }
        part_heads.push(f);
    }
    let first_lba = base + sb.checkpoint.parts[0].block;
    if bytes.len() as u64 != sb.checkpoint.total_bytes {
        return Err(err(cpst, first_lba, MountErrorKind::Corrupt("checkpoint length".into())));
    }
    let data = CheckpointData::decode(&header, &bytes).map_err(|e| {
        err(cpst, first_lba, MountErrorKind::Corrupt(format!("cannot decode: {e}")))
    })?;
    if data.header.shard != shard
        || data.header.segs.len() != geo.seg_count as usize
        || data.header.last_seq != sb.checkpoint.state_seq()
    {
        return Err(err(
            cpst,
            first_lba,
            MountErrorKind::Corrupt("contents do not match the shard".into()),
        ));
    }
    // The segment open at S may have been sealed right after it (part 0 did not fit its
    // tail); replay never visits it again, so it must not stay `Open` (never reusable).
    let mut segs = data.header.segs;
    for s in &mut segs {
        if s.state == SegState::Open {
            s.state = SegState::Sealed;
        }
    }
    let mut space = Space::new(geo, segs, data.header.next_segment_seq, sb.checkpoint.state_seq());
    let mut bad_block = None;
    data.index.for_each_disk_block(|_, _, _, b, _| {
        if geo.seg_of(b).is_none() {
            bad_block = Some(b);
        }
    });
    if let Some(b) = bad_block {
        return Err(err(
            cpst,
            base,
            MountErrorKind::Corrupt(format!("index maps block {b} outside the segments")),
        ));
    }
    if data.index.colls.values().any(|c| {
        c.objects.values().any(|o| o.blocks.values().any(|r| matches!(r.loc, Loc::Pending(_))))
    }) {
        return Err(err(
            cpst,
            base,
            MountErrorKind::Corrupt("index holds non-durable blocks".into()),
        ));
    }
    data.index
        .for_each_disk_block(|_, _, _, b, _| super::index::LiveTracker::mapped(&mut space, b));
    let mut cp_segments = Vec::new();
    for (p, f) in sb.checkpoint.parts.iter().zip(&part_heads) {
        let seg = geo.seg_of(p.block).expect("checked above");
        let info = &mut space.segs[seg as usize];
        if info.seq != f.segment_seq {
            *info = SegInfo { seq: f.segment_seq, state: SegState::Sealed, max_record_seq: 0 };
        }
        info.state = SegState::Sealed;
        info.max_record_seq = info.max_record_seq.max(f.first_seq);
        space.pinned[seg as usize] = true;
        cp_segments.push(seg);
        space.next_segment_seq = space.next_segment_seq.max(f.segment_seq + 1);
    }

    let mut st = ShardState {
        device: device.clone(),
        shard,
        base,
        fsid: dsb.fsid,
        index: data.index,
        space,
        cp: Some(sb.checkpoint.clone()),
        cp_segments,
        sb_generation: sb.generation,
        next_seq: sb.checkpoint.first_seq,
    };

    // 3. The journal after S, from part 0 on (the parts themselves replay as no-ops;
    // newer transactions interleave with them).
    let info = replay(dev, &mut st, tag, sb.checkpoint.parts[0].block, part_heads[0].segment_seq)?;
    Ok((st, info))
}

/// One segment's first batch header, for finding where the log continues.
#[derive(Debug, Clone, Copy)]
struct Head {
    seg: u32,
    segment_seq: u64,
}

/// A fully read and checked batch.
struct ReadBatch {
    fixed: BatchFixed,
    bytes: Vec<u8>,
}

enum Probe {
    Batch(ReadBatch),
    /// Not a valid batch of this log at this place.
    Nothing,
}

#[allow(clippy::too_many_arguments)]
/// Reads and checks a batch at shard block `pos` of the segment with `segment_seq`,
/// expecting `first_seq` (`None`: any sequence number, for lookahead).
fn probe<D: BlockDevice + ?Sized>(
    dev: &mut D,
    st: &ShardState,
    tag: u64,
    pos: u64,
    seg_end: u64,
    segment_seq: u64,
    first_seq: Option<u64>,
    head_block: Option<&[u8]>,
) -> Result<Probe, IoError> {
    let first = match head_block {
        Some(b) => b.to_vec(),
        None => read_blocks(dev, st.base + pos, 1)?,
    };
    let Ok(f) = BatchFixed::decode(&first) else { return Ok(Probe::Nothing) };
    if f.shard != st.shard
        || f.store_tag != tag
        || f.segment_seq != segment_seq
        || first_seq.is_some_and(|s| s != f.first_seq)
    {
        return Ok(Probe::Nothing);
    }
    if pos + f.total_blocks() > seg_end {
        return Ok(Probe::Nothing);
    }
    let mut bytes = first;
    if f.total_blocks() > 1 {
        bytes.extend_from_slice(&read_blocks(dev, st.base + pos + 1, f.total_blocks() - 1)?);
    }
    if format::decode_batch_meta(&f, &bytes[..f.meta_blocks as usize * BS]).is_err() {
        return Ok(Probe::Nothing);
    }
    Ok(Probe::Batch(ReadBatch { fixed: f, bytes }))
}

/// Replays the journal from shard block `pos` (right after the checkpoint) in the
/// segment whose life is `segment_seq`.
fn replay<D: BlockDevice + ?Sized>(
    dev: &mut D,
    st: &mut ShardState,
    tag: u64,
    mut pos: u64,
    mut segment_seq: u64,
) -> Result<ReplayInfo, MountError> {
    let s = st.shard;
    let device = st.device.clone();
    let jerr = |lba: u64, kind| MountError::new(&device, Structure::Journal(s), lba, kind);
    let geo = st.space.geo;
    // Where every segment's current life starts, to follow the log across segments.
    let mut heads = Vec::new();
    for seg in 0..geo.seg_count {
        let lba = st.base + geo.seg_start(seg);
        let b = read_blocks(dev, lba, 1).map_err(|e| jerr(lba, MountErrorKind::Io(e)))?;
        if let Ok(f) = BatchFixed::decode(&b)
            && f.shard == s
            && f.store_tag == tag
        {
            heads.push(Head { seg, segment_seq: f.segment_seq });
        }
    }
    heads.sort_by_key(|h| h.segment_seq);
    let mut info = ReplayInfo::default();
    let mut seg = geo.seg_of(pos).expect("checkpoint part 0 lies in a segment");
    loop {
        let seg_end = geo.seg_start(seg) + geo.seg_blocks;
        let mut torn_at = None;
        if pos < seg_end {
            let probed = probe(dev, st, tag, pos, seg_end, segment_seq, Some(st.next_seq), None)
                .map_err(|e| jerr(st.base + pos, MountErrorKind::Io(e)))?;
            if let Probe::Batch(b) = probed {
                let applied = apply_batch(st, &b, pos)
                    .map_err(|why| jerr(st.base + pos, MountErrorKind::Corrupt(why)))?;
                info.records += applied;
                info.batches += 1;
                let info_seg = &mut st.space.segs[seg as usize];
                if info_seg.seq != segment_seq {
                    *info_seg =
                        SegInfo { seq: segment_seq, state: SegState::Sealed, max_record_seq: 0 };
                }
                info_seg.state = SegState::Sealed;
                info_seg.max_record_seq = info_seg.max_record_seq.max(st.next_seq - 1);
                if applied == u64::from(b.fixed.record_count) {
                    pos += b.fixed.total_blocks();
                    continue;
                }
                // A record of the batch did not check out: the batch was torn.
                torn_at = Some(pos);
            } else {
                torn_at = Some(pos);
            }
        }
        // The log does not go on here: the segment is full, or this is its end. A later
        // batch in this segment would mean a durable record was lost.
        if let Some(at) = torn_at
            && let Some((later_pos, later_seq)) =
                lookahead(dev, st, tag, at + 1, seg_end, segment_seq)
                    .map_err(|e| jerr(st.base + at, MountErrorKind::Io(e)))?
        {
            return Err(jerr(
                st.base + at,
                MountErrorKind::Corrupt(format!(
                    "record {} is unreadable but the journal goes on (record {later_seq} at byte offset {})",
                    st.next_seq,
                    (st.base + later_pos) * BS as u64
                )),
            ));
        }
        // Does the log continue in a later segment?
        let mut next = None;
        for h in heads.iter().filter(|h| h.segment_seq > segment_seq) {
            let start = geo.seg_start(h.seg);
            let probed =
                probe(dev, st, tag, start, start + geo.seg_blocks, h.segment_seq, None, None)
                    .map_err(|e| jerr(st.base + start, MountErrorKind::Io(e)))?;
            if let Probe::Batch(b) = probed {
                next = Some((*h, b.fixed.first_seq));
                break;
            }
        }
        match next {
            Some((h, first)) if first == st.next_seq => {
                seg = h.seg;
                segment_seq = h.segment_seq;
                pos = geo.seg_start(h.seg);
            }
            Some((h, first)) => {
                return Err(jerr(
                    st.base + geo.seg_start(h.seg),
                    MountErrorKind::Corrupt(format!(
                        "the journal continues with record {first} but record {} was expected: records are missing",
                        st.next_seq
                    )),
                ));
            }
            None => {
                if let Some(at) = torn_at
                    && (at != geo.seg_start(seg) || info.batches > 0)
                {
                    info.torn_tail = Some(((st.base + at) * BS as u64, st.next_seq));
                }
                break;
            }
        }
    }
    let max_head = heads.iter().map(|h| h.segment_seq).max().unwrap_or(0);
    st.space.next_segment_seq = st.space.next_segment_seq.max(max_head + 1).max(segment_seq + 1);
    st.space.open = None;
    Ok(info)
}

/// Looks for a valid batch of this segment's life between `from` and `end`; returns its
/// position and first sequence number.
fn lookahead<D: BlockDevice + ?Sized>(
    dev: &mut D,
    st: &ShardState,
    tag: u64,
    from: u64,
    end: u64,
    segment_seq: u64,
) -> Result<Option<(u64, u64)>, IoError> {
    const CHUNK: u64 = 256;
    let mut p = from;
    while p < end {
        let n = (end - p).min(CHUNK);
        let blocks = read_blocks(dev, st.base + p, n)?;
        for i in 0..n {
            let b = &blocks[i as usize * BS..(i as usize + 1) * BS];
            if let Ok(f) = BatchFixed::decode(b)
                && f.shard == st.shard
                && f.store_tag == tag
                && f.segment_seq == segment_seq
                && f.first_seq >= st.next_seq
                && let Probe::Batch(found) =
                    probe(dev, st, tag, p + i, end, segment_seq, None, Some(b))?
            {
                return Ok(Some((p + i, found.fixed.first_seq)));
            }
        }
        p += n;
    }
    Ok(None)
}

/// Applies the valid prefix of a batch's records; returns how many applied.
fn apply_batch(st: &mut ShardState, b: &ReadBatch, pos: u64) -> Result<u64, String> {
    let f = &b.fixed;
    let meta_len = f.meta_blocks as usize * BS;
    let recs = format::decode_batch_meta(f, &b.bytes[..meta_len]).map_err(|e| e.to_string())?;
    let mut data_off = 0usize;
    let mut applied = 0;
    for (i, (desc, deltas_bytes)) in recs.iter().enumerate() {
        let seq = f.first_seq + i as u64;
        let start = meta_len + data_off * BS;
        let data = &b.bytes[start..start + desc.data_blocks as usize * BS];
        if format::record_crc(deltas_bytes, data) != desc.crc {
            return Ok(applied);
        }
        if f.flags & FLAG_CHECKPOINT == 0 {
            let deltas = delta::decode(deltas_bytes)
                .map_err(|e| format!("record {seq}: undecodable deltas: {e}"))?;
            let used: u64 = deltas.iter().map(|d| d.data_blocks()).sum();
            if used != u64::from(desc.data_blocks) {
                return Err(format!(
                    "record {seq}: deltas use {used} data blocks, the record has {}",
                    desc.data_blocks
                ));
            }
            let first_data = pos + u64::from(f.meta_blocks) + data_off as u64;
            let mut next_data = 0u64;
            for d in &deltas {
                let base = next_data;
                let mut loc = |j: u64| Some(Loc::Disk(first_data + base + j));
                st.index
                    .apply(d, seq, &mut loc, &mut st.space)
                    .map_err(|e| format!("record {seq} does not apply: {e}"))?;
                next_data += d.data_blocks();
            }
        }
        data_off += desc.data_blocks as usize;
        st.next_seq = seq + 1;
        applied += 1;
    }
    Ok(applied)
}

//! The segment cleaner: empties the sealed segment with the fewest live blocks so it can
//! be reused.
//!
//! A victim is a sealed segment entirely behind the durable checkpoint (no replay reads
//! it) and not holding checkpoint parts. The cleaner reads the victim's batch headers
//! and deltas (metadata only) to learn which object block each data block was written
//! for, keeps those the index still maps there (live), reads them and queues relocation
//! transactions: conditional moves that a newer write of the same block simply
//! overrides. Once they are durable the segment has no live blocks and is reusable.
//!
//! Rate limit: it works only while reusable segments are scarce (or a writer waits for
//! space), one victim at a time, with at most `cleaner_max_reads` reads in flight.
//! Corrupt blocks are moved as they are, with their original checksum, so reads keep
//! reporting them.

use std::collections::HashMap;

use sluice_nvme::{BlockDevice, Completion, DmaBuf, IoCommand};
use sluice_vocab::{BlockCount, Lba};

use super::CollId;
use super::delta::{self, Delta};
use super::format::{self, BS, BatchFixed, FLAG_CHECKPOINT};
use super::index::Loc;
use super::shard::{K_CLEAN, Shard};
use super::space::SegState;
use super::stage::Queued;

/// Blocks per relocation transaction: small, so relocations pack into the tails of
/// segments that larger user batches could not use.
const RELOCATE_PER_TXN: usize = 16;

/// Cleaning rounds in a row that gain no space while a writer waits before that writer
/// is told there is no space (instead of waiting for ever).
pub(super) const MAX_STALLED_ROUNDS: u32 = 3;

/// A live block to move.
#[derive(Debug, Clone)]
struct Cand {
    coll: CollId,
    name: String,
    lblock: u64,
    addr: u64,
    crc: u32,
}

#[derive(Debug, Default)]
enum State {
    #[default]
    Idle,
    /// Walking the victim's batches; `reading` while a header or metadata read is out.
    Scanning { seg: u32, seg_seq: u64, pos: u64, cands: Vec<Cand>, reading: bool },
    Reading {
        seg: u32,
        seg_seq: u64,
        cands: Vec<Cand>,
        next: usize,
        inflight: HashMap<u64, (usize, usize)>,
        got: Vec<Option<Box<[u8]>>>,
    },
    /// Waiting until `committed` reaches `expect`. `seg_seq`: the victim's life when the
    /// round started (a freed victim may be reopened before the round ends).
    Committing { seg: u32, seg_seq: u64, expect: u64 },
}

impl State {
    fn running(&self) -> bool {
        !matches!(self, State::Idle)
    }
}

#[derive(Debug, Default)]
pub(super) struct Cleaner {
    state: State,
    /// Relocation transactions dropped for lack of room (counted as done).
    dropped: u64,
    /// Live blocks the current round moves.
    moving: u64,
    /// Rounds in a row that ended with no more space than they started with.
    pub stalled_rounds: u32,
    /// `Shard::completions` when an idle cleaner last found nothing to do. Space only
    /// changes on a device completion (or when a batch is placed, which a completion
    /// follows), so until the next one there is no need to count segments again.
    idle_checked_at: Option<u64>,
}

impl Cleaner {
    pub fn is_idle(&self) -> bool {
        !self.state.running()
    }

    pub fn relocation_dropped(&mut self) {
        self.dropped += 1;
    }
}

const ID_HEADER: u64 = 0;
const ID_META: u64 = 1;
const ID_DATA: u64 = 2;

impl<D: BlockDevice> Shard<D> {
    /// Whether cleaning (and the checkpoints it may need) could ever free `need` blocks.
    pub(super) fn cleaner_can_free(&self, need: u64) -> bool {
        // The same segments the cleaner would take (see `Space::cleaning_victim`), less
        // those that wait for a checkpoint when there is no room to write one.
        let sp = &self.st.space;
        let cp_blocked = self.checkpoint_blocked();
        let reclaimable: u64 = (0..sp.geo.seg_count)
            .filter(|&s| {
                let i = s as usize;
                sp.segs[i].state == SegState::Sealed
                    && !sp.pinned[i]
                    && !sp.reusable(s)
                    && (!cp_blocked || sp.segs[i].max_record_seq <= sp.cp_last_seq)
            })
            .map(|s| sp.clean_gain(sp.live[s as usize]))
            .sum();
        sp.available() + reclaimable >= need
    }

    pub(super) fn advance_cleaner(&mut self) -> bool {
        match &mut self.cleaner.state {
            State::Idle => {
                if !self.space_wait && self.cleaner.idle_checked_at == Some(self.completions) {
                    return false;
                }
                let sp = &self.st.space;
                let threshold = self
                    .cfg
                    .clean_below_segments
                    .unwrap_or_else(|| (self.cfg.reserve_segments + 2).max(sp.geo.seg_count / 8));
                if sp.reusable_count() >= threshold && !self.space_wait {
                    self.cleaner.idle_checked_at = Some(self.completions);
                    return false;
                }
                self.cleaner.idle_checked_at = None;
                // Segments written since the checkpoint cannot be cleaned. Under space
                // pressure, take a checkpoint early when there is nothing else to clean,
                // or when a quarter of the shard waits for one. (Every eighth of the
                // shard was too eager: at half full it doubled the checkpoints, ~15% of
                // the reactor's time, while good victims were still available.)
                let waiting = sp.awaiting_checkpoint();
                if waiting >= 2
                    && (sp.cleaning_victim().is_none() || waiting >= (sp.geo.seg_count / 4).max(2))
                    && !self.checkpoint_running()
                {
                    self.request_checkpoint();
                }
                let sp = &self.st.space;
                match sp.cleaning_victim() {
                    Some(seg) => {
                        let seg_seq = sp.segs[seg as usize].seq;
                        let pos = sp.geo.seg_start(seg);
                        self.cleaner.state = State::Scanning {
                            seg,
                            seg_seq,
                            pos,
                            cands: Vec::new(),
                            reading: false,
                        };
                        true
                    }
                    None => {
                        if sp.awaiting_checkpoint() > 0 && !self.checkpoint_running() {
                            self.request_checkpoint();
                            if self.checkpoint_running() {
                                return true;
                            }
                            // No room for one: nothing to do until something completes
                            // (else this spun the reactor).
                            self.cleaner.idle_checked_at = Some(self.completions);
                        }
                        false
                    }
                }
            }
            State::Scanning { seg, seg_seq, pos, reading, cands } => {
                if *reading {
                    return false;
                }
                let end = self.st.space.geo.seg_start(*seg) + self.st.space.geo.seg_blocks;
                if *pos >= end {
                    let cands = std::mem::take(cands);
                    let n = cands.len();
                    self.cleaner.state = State::Reading {
                        seg: *seg,
                        seg_seq: *seg_seq,
                        cands,
                        next: 0,
                        inflight: HashMap::new(),
                        got: vec![None; n],
                    };
                    return true;
                }
                *reading = true;
                let at = *pos;
                self.io(
                    IoCommand::Read { lba: Lba(at), blocks: BlockCount(1) },
                    Some(DmaBuf::new(BS)),
                    K_CLEAN | (ID_HEADER << 48),
                );
                true
            }
            State::Reading { seg, seg_seq, cands, next, inflight, got } => {
                let mut reads = Vec::new();
                while *next < cands.len() && inflight.len() < self.cfg.cleaner_max_reads.max(1) {
                    // Coalesce blocks that are adjacent on disk.
                    let start = *next;
                    let mut n = 1;
                    while start + n < cands.len()
                        && n < 64
                        && cands[start + n].addr == cands[start].addr + n as u64
                    {
                        n += 1;
                    }
                    *next += n;
                    let id = (ID_DATA << 48) | start as u64;
                    inflight.insert(id, (start, n));
                    reads.push((cands[start].addr, n as u64, K_CLEAN | id));
                }
                if !reads.is_empty() {
                    for (addr, n, tag) in reads {
                        self.backlog_read(addr, n, tag);
                    }
                    return true;
                }
                if *next == cands.len() && inflight.is_empty() {
                    let (seg, seg_seq) = (*seg, *seg_seq);
                    let cands = std::mem::take(cands);
                    let got = std::mem::take(got);
                    let mut txns = Vec::new();
                    for chunk in cands.iter().zip(got).collect::<Vec<_>>().chunks(RELOCATE_PER_TXN)
                    {
                        let mut deltas = Vec::with_capacity(chunk.len());
                        let mut data = Vec::with_capacity(chunk.len());
                        for (c, d) in chunk {
                            deltas.push(Delta::Relocate {
                                coll: c.coll,
                                name: c.name.clone(),
                                block: c.lblock,
                                from: c.addr,
                                crc: c.crc,
                            });
                            data.push(d.clone().expect("every candidate was read"));
                        }
                        txns.push(Queued::Relocation { deltas, data });
                    }
                    self.stats.blocks_relocated += cands.len() as u64;
                    self.cleaner.moving = cands.len() as u64;
                    let expect = self.internal_committed + self.cleaner.dropped + txns.len() as u64;
                    for t in txns.into_iter().rev() {
                        self.queue.push_front(t);
                    }
                    self.cleaner.state = State::Committing { seg, seg_seq, expect };
                    return true;
                }
                false
            }
            State::Committing { seg, seg_seq, expect } => {
                if self.internal_committed + self.cleaner.dropped < *expect {
                    return false;
                }
                let (seg, seg_seq) = (*seg, *seg_seq);
                // A round gains what the freed segment holds minus what it rewrote (and
                // a little metadata).
                let sp = &self.st.space;
                let freed = sp.reusable(seg) || sp.segs[seg as usize].seq != seg_seq;
                let gained = freed
                    && self.cleaner.moving + self.cleaner.moving.div_ceil(16) + 1
                        < sp.geo.seg_blocks;
                if gained {
                    self.cleaner.stalled_rounds = 0;
                } else if self.space_wait {
                    self.cleaner.stalled_rounds += 1;
                }
                if freed {
                    self.stats.segments_cleaned += 1;
                } else {
                    log::debug!(
                        "shard {}: segment {seg} still has {} live blocks after cleaning",
                        self.st.shard,
                        sp.live[seg as usize]
                    );
                }
                self.cleaner.state = State::Idle;
                true
            }
        }
    }

    fn backlog_read(&mut self, addr: u64, blocks: u64, tag: u64) {
        self.io(
            IoCommand::Read { lba: Lba(addr), blocks: BlockCount(blocks) },
            Some(DmaBuf::new(blocks as usize * BS)),
            tag,
        );
    }

    pub(super) fn on_clean(&mut self, id: u64, c: Completion) {
        let kind = id >> 48;
        if let Err(e) = c.result {
            // A failed read of the victim: give up on it for now; nothing was changed.
            log::warn!(
                "shard {}: cleaner read failed ({e}); skipping this segment for now",
                self.st.shard
            );
            self.cleaner.state = State::Idle;
            return;
        }
        let buf = c.buf.expect("read buffer");
        match kind {
            ID_HEADER | ID_META => self.scan_batch(kind, &buf),
            ID_DATA => {
                let State::Reading { inflight, got, .. } = &mut self.cleaner.state else { return };
                let Some((start, n)) = inflight.remove(&id) else { return };
                for j in 0..n {
                    got[start + j] = Some(buf[j * BS..(j + 1) * BS].to_vec().into_boxed_slice());
                }
            }
            _ => unreachable!("cleaner read kind"),
        }
    }

    /// Processes a victim batch header (and, once read, its metadata).
    fn scan_batch(&mut self, kind: u64, buf: &[u8]) {
        let tag = self.tag;
        let shard = self.st.shard;
        let State::Scanning { seg, seg_seq, pos, cands, reading } = &mut self.cleaner.state else {
            return;
        };
        *reading = false;
        let end = self.st.space.geo.seg_start(*seg) + self.st.space.geo.seg_blocks;
        let f = match BatchFixed::decode(buf) {
            Ok(f)
                if f.shard == shard
                    && f.store_tag == tag
                    && f.segment_seq == *seg_seq
                    && *pos + f.total_blocks() <= end =>
            {
                f
            }
            _ => {
                // The end of this segment's log.
                *pos = end;
                return;
            }
        };
        let meta_len = f.meta_blocks as usize * BS;
        if kind == ID_HEADER && f.meta_blocks > 1 {
            *reading = true;
            let at = *pos;
            self.backlog_read(at, u64::from(f.meta_blocks), K_CLEAN | (ID_META << 48));
            return;
        }
        let Ok(recs) = format::decode_batch_meta(&f, &buf[..meta_len.min(buf.len())]) else {
            *pos = end;
            return;
        };
        let mut data_addr = *pos + u64::from(f.meta_blocks);
        if f.flags & FLAG_CHECKPOINT == 0 {
            for (desc, deltas) in recs {
                let Ok(deltas) = delta::decode(deltas) else {
                    data_addr += u64::from(desc.data_blocks);
                    continue;
                };
                let mut a = data_addr;
                for d in deltas {
                    let blocks: Vec<(CollId, String, u64)> = match &d {
                        Delta::WriteBlocks { coll, name, first_block, crcs } => (0..crcs.len()
                            as u64)
                            .map(|j| (*coll, name.clone(), first_block + j))
                            .collect(),
                        Delta::Relocate { coll, name, block, .. } => {
                            vec![(*coll, name.clone(), *block)]
                        }
                        _ => Vec::new(),
                    };
                    for (coll, name, lblock) in blocks {
                        if let Some(r) =
                            self.st.index.object(coll, &name).and_then(|o| o.blocks.get(&lblock))
                            && r.loc == Loc::Disk(a)
                        {
                            cands.push(Cand { coll, name, lblock, addr: a, crc: r.crc });
                        }
                        a += 1;
                    }
                }
                data_addr += u64::from(desc.data_blocks);
            }
        }
        *pos += f.total_blocks();
    }
}

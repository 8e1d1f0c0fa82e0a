//! Staging: turning the oldest queued transaction into deltas and data blocks.
//!
//! Staging is serial and in order. For the transaction at the head of the queue it
//! 1. validates every operation against the latest state (including everything staged
//!    before it), simulating existence so a later operation sees earlier ones; any
//!    failure fails the whole transaction with no effect;
//! 2. reads the old content of partially written blocks that are on disk (checking
//!    their crc), and waits for those reads;
//! 3. reserves log space, or waits for the cleaner, or fails with `NoSpace`, still with
//!    no effect;
//! 4. generates the deltas and whole data blocks, applies the deltas to the index (data
//!    blocks point at memory until their batch is durable) and assigns the sequence
//!    number. Nothing can fail after the first delta is applied.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use sluice_nvme::{BlockDevice, Completion, DmaBuf, IoCommand};
use sluice_vocab::limits::{
    MAX_OBJECT_NAME_BYTES, MAX_PGLOG_ENTRY_BYTES, MAX_TXN_DATA_BYTES, MAX_TXN_OPS,
    MAX_XATTR_KEY_BYTES, MAX_XATTR_VALUE_BYTES,
};
use sluice_vocab::{BlockCount, Lba};

use super::delta::{self, Delta};
use super::format::BS;
use super::index::Loc;
use super::shard::{K_RMW, Shard};
use super::{CollId, Missing, StoreError, StoreEvent, Transaction, TxOp};

const BSU: u64 = BS as u64;

/// A transaction waiting to be staged.
#[derive(Debug)]
pub(super) enum Queued {
    User {
        token: u64,
        txn: Transaction,
    },
    /// The cleaner's relocation: conditional moves with their data.
    Relocation {
        deltas: Vec<Delta>,
        data: Vec<Box<[u8]>>,
    },
}

impl Queued {
    pub fn user(txn: Transaction, token: u64) -> Queued {
        Queued::User { token, txn }
    }

    pub fn token(&self) -> Option<u64> {
        match self {
            Queued::User { token, .. } => Some(*token),
            Queued::Relocation { .. } => None,
        }
    }
}

/// A transaction applied in memory, waiting for its batch.
#[derive(Debug)]
pub(super) struct Staged {
    pub token: Option<u64>,
    pub seq: u64,
    pub deltas: Vec<u8>,
    /// Pending block ids, in the order the deltas consume them.
    pub data: Vec<u64>,
    /// crc32c of those blocks' bytes, back to back (the record crc combines it with
    /// the deltas' instead of reading megabytes again at batch time).
    pub data_crc: u32,
    pub objects: Vec<(CollId, String)>,
    pub colls: Vec<CollId>,
    pub coll_set: bool,
    pub reserved: u64,
    /// Disk blocks it unmaps, released from the live counts once it is durable.
    pub freed: Vec<u64>,
}

/// Old block contents fetched for the head transaction's partial writes.
#[derive(Debug, Default)]
pub(super) struct Rmw {
    /// Disk block -> content, verified against its crc.
    pub fetched: HashMap<u64, Box<[u8]>>,
    /// Disk block -> (object, block index, crc) of reads in flight.
    pub inflight: HashMap<u64, (CollId, String, u64, u32)>,
    pub error: Option<StoreError>,
}

impl Rmw {
    pub fn busy(&self) -> bool {
        !self.inflight.is_empty()
    }

    fn clear(&mut self) {
        self.fetched.clear();
        self.error = None;
    }
}

fn invalid(why: &'static str) -> StoreError {
    StoreError::Invalid(why)
}

/// Refuses transactions that could never be valid, before queueing them.
pub(super) fn check_shape(txn: &Transaction, max_blocks: u64) -> Result<(), StoreError> {
    if txn.ops.is_empty() {
        return Err(invalid("empty transaction"));
    }
    if txn.ops.len() > MAX_TXN_OPS {
        return Err(invalid("too many operations in one transaction"));
    }
    let mut data = 0usize;
    for op in &txn.ops {
        if let Some((_, name)) = op_object(op)
            && (name.is_empty() || name.len() > MAX_OBJECT_NAME_BYTES)
        {
            return Err(invalid("object name empty or too long"));
        }
        match op {
            TxOp::WriteFull { data: d, .. } | TxOp::Write { data: d, .. } => data += d.len(),
            TxOp::SetXattr { key, value, .. }
                if (key.is_empty()
                    || key.len() > MAX_XATTR_KEY_BYTES
                    || value.len() > MAX_XATTR_VALUE_BYTES) =>
            {
                return Err(invalid("xattr key or value too long"));
            }
            TxOp::RmXattr { key, .. } if key.is_empty() || key.len() > MAX_XATTR_KEY_BYTES => {
                return Err(invalid("xattr key empty or too long"));
            }
            TxOp::PgLogAppend { entry, .. } if entry.len() > MAX_PGLOG_ENTRY_BYTES => {
                return Err(invalid("PG log entry too large"));
            }
            _ => {}
        }
        if let TxOp::Write { offset, data: d, .. } = op
            && offset.checked_add(d.len() as u64).is_none_or(|e| e > u64::MAX / 2)
        {
            return Err(invalid("write beyond the largest object size"));
        }
        if let TxOp::Truncate { size, .. } = op
            && *size > u64::MAX / 2
        {
            return Err(invalid("truncate beyond the largest object size"));
        }
    }
    if data > MAX_TXN_DATA_BYTES {
        return Err(invalid("transaction carries more than 8 MiB of data"));
    }
    if estimate(txn).0 + 2 > max_blocks {
        return Err(invalid("transaction too large for this store's segments"));
    }
    Ok(())
}

fn op_object(op: &TxOp) -> Option<(CollId, &str)> {
    match op {
        TxOp::Touch { coll, name }
        | TxOp::WriteFull { coll, name, .. }
        | TxOp::Write { coll, name, .. }
        | TxOp::Truncate { coll, name, .. }
        | TxOp::Zero { coll, name, .. }
        | TxOp::Delete { coll, name }
        | TxOp::SetXattr { coll, name, .. }
        | TxOp::RmXattr { coll, name, .. } => Some((*coll, name.as_str())),
        _ => None,
    }
}

fn op_coll(op: &TxOp) -> CollId {
    match op {
        TxOp::CreateCollection { coll }
        | TxOp::RemoveCollection { coll }
        | TxOp::PgLogAppend { coll, .. }
        | TxOp::PgLogTrim { coll, .. } => *coll,
        other => op_object(other).expect("object op").0,
    }
}

/// (blocks of data and metadata the transaction may need, data blocks alone).
fn estimate(txn: &Transaction) -> (u64, u64) {
    let mut data = 0u64;
    let mut meta = 0u64;
    for op in &txn.ops {
        let blocks = match op {
            TxOp::WriteFull { data: d, .. } => (d.len() as u64).div_ceil(BSU),
            TxOp::Write { offset, data: d, .. } if !d.is_empty() => {
                (offset + d.len() as u64 - 1) / BSU - offset / BSU + 1
            }
            TxOp::Truncate { .. } => 1,
            TxOp::Zero { .. } => 2,
            _ => 0,
        };
        data += blocks;
        meta += 64 + 4 * blocks;
        meta += match op {
            TxOp::SetXattr { key, value, .. } => (key.len() + value.len()) as u64,
            TxOp::RmXattr { key, .. } => key.len() as u64,
            TxOp::PgLogAppend { entry, .. } => entry.len() as u64,
            _ => 0,
        };
        meta += op_object(op).map_or(0, |(_, n)| n.len() as u64);
    }
    (data + meta.div_ceil(BSU) + 1, data)
}

/// A transaction's deltas and data blocks as staging builds them.
struct Build {
    seq: u64,
    deltas: Vec<Delta>,
    ids: Vec<u64>,
    /// crc32c of the blocks of `ids` back to back.
    data_crc: u32,
    /// Disk blocks this transaction unmaps: they count as live until it is durable.
    freed: Vec<u64>,
}

/// Live-count changes of a staged transaction: a block it unmaps stays live (its
/// segment cannot be reused) until the transaction is durable, since a crash before
/// that leaves the old mapping in force. Staging never maps a disk block (new data
/// points at memory until its batch lands).
struct Deferred<'a> {
    freed: &'a mut Vec<u64>,
}

impl super::index::LiveTracker for Deferred<'_> {
    fn mapped(&mut self, block: u64) {
        panic!("staging mapped disk block {block}");
    }

    fn unmapped(&mut self, block: u64) {
        self.freed.push(block);
    }
}

/// Existence as the transaction's earlier operations left it.
#[derive(Default)]
struct Sim {
    colls: HashMap<CollId, bool>,
    objects: HashMap<(CollId, String), bool>,
    /// Objects deleted earlier in this transaction: their old xattrs are gone.
    deleted: HashSet<(CollId, String)>,
    xattrs: HashMap<(CollId, String, String), bool>,
    count: HashMap<CollId, i64>,
}

impl<D: BlockDevice> Shard<D> {
    /// Stages queued transactions in order while possible. Returns whether it did work.
    pub(super) fn stage(&mut self) -> bool {
        let mut busy = false;
        while !self.staging_paused() && self.failed.is_none() {
            let Some(head) = self.queue.front() else { break };
            if self.rmw.busy() {
                break;
            }
            if matches!(head, Queued::Relocation { .. }) {
                let Some(Queued::Relocation { deltas, data }) = self.queue.pop_front() else {
                    unreachable!()
                };
                self.stage_relocation(deltas, data);
                busy = true;
                continue;
            }
            let Queued::User { token, txn } = head else { unreachable!() };
            let token = *token;
            if let Err(e) = self.validate(txn) {
                self.fail_head(token, e);
                busy = true;
                continue;
            }
            // Old contents of partially written blocks on disk.
            let needs = self.rmw_needs(txn);
            let missing: Vec<_> = needs
                .into_iter()
                .filter(|(addr, _)| !self.rmw.fetched.contains_key(addr))
                .collect();
            if let Some(e) = self.rmw.error.take() {
                self.fail_head(token, e);
                busy = true;
                continue;
            }
            if !missing.is_empty() {
                for (addr, owner) in missing {
                    let buf = DmaBuf::new(BS);
                    self.io(
                        IoCommand::Read { lba: Lba(addr), blocks: BlockCount(1) },
                        Some(buf),
                        K_RMW | addr,
                    );
                    self.rmw.inflight.insert(addr, owner);
                }
                busy = true;
                break;
            }
            // Space.
            let (need, data_blocks) = estimate(txn);
            let reserve = if data_blocks == 0 { 0 } else { self.reserve_blocks() };
            if self.st.space.available() < need + reserve {
                let stalled = self.cleaner.stalled_rounds >= super::cleaner::MAX_STALLED_ROUNDS;
                if !stalled && self.cleaner_can_free(need + reserve) {
                    self.space_wait = true;
                    break;
                }
                self.cleaner.stalled_rounds = 0;
                self.space_wait = false;
                self.fail_head(token, StoreError::NoSpace);
                busy = true;
                continue;
            }
            self.space_wait = false;
            let Some(Queued::User { token, txn }) = self.queue.pop_front() else { unreachable!() };
            self.apply_txn(token, txn, need);
            self.rmw.clear();
            busy = true;
        }
        busy
    }

    /// Drops the head of the queue, which failed before anything changed, and reports it.
    fn fail_head(&mut self, token: u64, e: StoreError) {
        self.queue.pop_front();
        self.rmw.clear();
        self.stats.txns_failed += 1;
        self.events.push_back(StoreEvent::Txn { token, result: Err(e) });
    }

    fn validate(&self, txn: &Transaction) -> Result<(), StoreError> {
        let mut sim = Sim::default();
        let ix = &self.st.index;
        let coll_exists = |sim: &Sim, c: CollId| {
            let simulated = if sim.colls.is_empty() { None } else { sim.colls.get(&c).copied() };
            simulated.unwrap_or_else(|| ix.colls.contains_key(&c))
        };
        let obj_exists = |sim: &Sim, c: CollId, n: &str| {
            // Most transactions touch one object: skip building a key for an empty map.
            let simulated = if sim.objects.is_empty() {
                None
            } else {
                sim.objects.get(&(c, n.to_string())).copied()
            };
            simulated.unwrap_or_else(|| ix.object(c, n).is_some())
        };
        for op in &txn.ops {
            match op {
                TxOp::CreateCollection { coll } => {
                    if coll_exists(&sim, *coll) {
                        return Err(StoreError::Exists(*coll));
                    }
                    sim.colls.insert(*coll, true);
                }
                TxOp::RemoveCollection { coll } => {
                    if !coll_exists(&sim, *coll) {
                        return Err(StoreError::NotFound(Missing::Collection(*coll)));
                    }
                    let base = ix.colls.get(coll).map_or(0, |c| c.objects.len() as i64);
                    if base + sim.count.get(coll).copied().unwrap_or(0) > 0 {
                        return Err(StoreError::NotEmpty(*coll));
                    }
                    sim.colls.insert(*coll, false);
                }
                TxOp::PgLogAppend { coll, .. } | TxOp::PgLogTrim { coll, .. } => {
                    if !coll_exists(&sim, *coll) {
                        return Err(StoreError::NotFound(Missing::Collection(*coll)));
                    }
                }
                TxOp::Delete { coll, name } => {
                    if !coll_exists(&sim, *coll) {
                        return Err(StoreError::NotFound(Missing::Collection(*coll)));
                    }
                    if !obj_exists(&sim, *coll, name) {
                        return Err(StoreError::NotFound(Missing::Object(*coll, name.clone())));
                    }
                    sim.objects.insert((*coll, name.clone()), false);
                    sim.deleted.insert((*coll, name.clone()));
                    sim.xattrs.retain(|(c, n, _), _| !(*c == *coll && n == name));
                    *sim.count.entry(*coll).or_default() -= 1;
                }
                TxOp::RmXattr { coll, name, key } => {
                    if !coll_exists(&sim, *coll) {
                        return Err(StoreError::NotFound(Missing::Collection(*coll)));
                    }
                    if !obj_exists(&sim, *coll, name) {
                        return Err(StoreError::NotFound(Missing::Object(*coll, name.clone())));
                    }
                    let k = (*coll, name.clone(), key.clone());
                    let exists = sim.xattrs.get(&k).copied().unwrap_or_else(|| {
                        !sim.deleted.contains(&(*coll, name.clone()))
                            && ix.object(*coll, name).is_some_and(|o| o.xattrs.contains_key(key))
                    });
                    if !exists {
                        return Err(StoreError::NotFound(Missing::Xattr(
                            *coll,
                            name.clone(),
                            key.clone(),
                        )));
                    }
                    sim.xattrs.insert(k, false);
                }
                other => {
                    let (coll, name) = op_object(other).expect("object op");
                    if !coll_exists(&sim, coll) {
                        return Err(StoreError::NotFound(Missing::Collection(coll)));
                    }
                    if !obj_exists(&sim, coll, name) {
                        sim.objects.insert((coll, name.to_string()), true);
                        *sim.count.entry(coll).or_default() += 1;
                    }
                    if let TxOp::SetXattr { key, .. } = other {
                        sim.xattrs.insert((coll, name.to_string(), key.clone()), true);
                    }
                }
            }
        }
        Ok(())
    }

    /// Disk blocks whose old content a partial write of `txn` may need, with their owner.
    fn rmw_needs(&self, txn: &Transaction) -> Vec<(u64, (CollId, String, u64, u32))> {
        let mut out = Vec::new();
        let mut edge = |coll: CollId, name: &str, block: u64| {
            if let Some(r) = self.st.index.object(coll, name).and_then(|o| o.blocks.get(&block))
                && let Loc::Disk(addr) = r.loc
            {
                out.push((addr, (coll, name.to_string(), block, r.crc)));
            }
        };
        for op in &txn.ops {
            match op {
                TxOp::Write { coll, name, offset, data } if !data.is_empty() => {
                    let end = offset + data.len() as u64;
                    if offset % BSU != 0 {
                        edge(*coll, name, offset / BSU);
                    }
                    if !end.is_multiple_of(BSU) {
                        edge(*coll, name, end / BSU);
                    }
                }
                TxOp::Truncate { coll, name, size } if size % BSU != 0 => {
                    edge(*coll, name, size / BSU)
                }
                TxOp::Zero { coll, name, offset, len } if *len > 0 => {
                    // The range is clipped to the object's size, so its last partial block
                    // may be the one holding the end of the object. (An earlier operation
                    // of the same transaction can only change the size to a block that is
                    // in memory or already listed as a truncate edge.)
                    let end = offset.saturating_add(*len);
                    if offset % BSU != 0 {
                        edge(*coll, name, offset / BSU);
                    }
                    if end % BSU != 0 {
                        edge(*coll, name, end / BSU);
                    }
                    if let Some(size) = self.st.index.object(*coll, name).map(|o| o.size)
                        && size % BSU != 0
                    {
                        edge(*coll, name, size / BSU);
                    }
                }
                _ => {}
            }
        }
        out.sort_by_key(|(a, _)| *a);
        out.dedup_by_key(|(a, _)| *a);
        out
    }

    pub(super) fn on_rmw(&mut self, addr: u64, c: Completion) {
        let Some((coll, name, block, crc)) = self.rmw.inflight.remove(&addr) else { return };
        match c.result {
            Ok(()) => {
                let buf = c.buf.expect("read buffer");
                if crc32c::crc32c(&buf) != crc {
                    self.rmw.error = Some(StoreError::Corrupt { coll, name, offset: block * BSU });
                } else {
                    self.rmw.fetched.insert(addr, buf.to_vec().into_boxed_slice());
                }
            }
            Err(e) => self.rmw.error = Some(StoreError::Io(e)),
        }
    }

    /// Content of an object's block as staged so far (holes are zeroes).
    fn block_content(&self, coll: CollId, name: &str, block: u64) -> &[u8] {
        const ZERO: [u8; BS] = [0; BS];
        match self.st.index.object(coll, name).and_then(|o| o.blocks.get(&block)) {
            None => &ZERO,
            Some(r) => match r.loc {
                Loc::Pending(id) => self.pending.blocks.bytes(id),
                Loc::Disk(addr) => {
                    self.rmw.fetched.get(&addr).expect("partial block fetched before staging")
                }
            },
        }
    }

    /// Applies one delta now, with `ids` as its data blocks.
    fn push_delta(&mut self, b: &mut Build, d: Delta, ids: &[u64]) {
        self.checkpoint_before(&d);
        let mut loc = |j: u64| ids.get(j as usize).map(|id| Loc::Pending(*id));
        self.st
            .index
            .apply(&d, b.seq, &mut loc, &mut Deferred { freed: &mut b.freed })
            .unwrap_or_else(|e| panic!("validated delta {d:?} failed to apply: {e}"));
        b.ids.extend_from_slice(ids);
        b.deltas.push(d);
    }

    /// Writes whole blocks `first..` of an object from `data` (a whole number of
    /// blocks), which its pending blocks then share: no copy and no allocation per block.
    fn write_blocks(&mut self, b: &mut Build, coll: CollId, name: &str, first: u64, data: Vec<u8>) {
        assert!(data.len().is_multiple_of(BS), "write_blocks takes whole blocks");
        if data.is_empty() {
            return;
        }
        let mut crcs = Vec::with_capacity(data.len() / BS);
        for block in data.chunks_exact(BS) {
            let crc = crc32c::crc32c(block);
            crcs.push(crc);
            // The record's crc over the data, from the blocks' (no second pass).
            b.data_crc = super::crc::append_block(b.data_crc, crc);
        }
        let n = crcs.len() as u64;
        let id = self.pending.blocks.push(coll, Arc::from(name), first, data);
        let new: Vec<u64> = (id..id + n).collect();
        self.push_delta(
            b,
            Delta::WriteBlocks { coll, name: name.to_string(), first_block: first, crcs },
            &new,
        );
    }

    fn size_of(&self, coll: CollId, name: &str) -> Option<u64> {
        self.st.index.object(coll, name).map(|o| o.size)
    }

    fn apply_txn(&mut self, token: u64, txn: Transaction, reserved: u64) {
        let seq = self.st.next_seq;
        self.st.next_seq += 1;
        let mut b =
            Build { seq, deltas: Vec::new(), ids: Vec::new(), data_crc: 0, freed: Vec::new() };
        let mut objects = Vec::new();
        let mut colls = Vec::new();
        let mut coll_set = false;
        for op in txn.ops {
            colls.push(op_coll(&op));
            if let Some((c, n)) = op_object(&op) {
                objects.push((c, n.to_string()));
            }
            match op {
                TxOp::CreateCollection { coll } => {
                    coll_set = true;
                    self.push_delta(&mut b, Delta::CreateCollection { coll }, &[]);
                }
                TxOp::RemoveCollection { coll } => {
                    coll_set = true;
                    self.push_delta(&mut b, Delta::RemoveCollection { coll }, &[]);
                }
                TxOp::Touch { coll, name } => {
                    self.push_delta(&mut b, Delta::Touch { coll, name }, &[])
                }
                TxOp::WriteFull { coll, name, mut data } => {
                    let old_blocks = self
                        .st
                        .index
                        .object(coll, &name)
                        .and_then(|o| o.blocks.last_key_value().map(|(k, _)| k + 1))
                        .unwrap_or(0);
                    let n = (data.len() as u64).div_ceil(BSU);
                    self.push_delta(&mut b, Delta::Touch { coll, name: name.clone() }, &[]);
                    let size = data.len() as u64;
                    // No copy when the buffer has room for the padding (`txn_data`).
                    data.resize(n as usize * BS, 0);
                    self.write_blocks(&mut b, coll, &name, 0, data);
                    if old_blocks > n {
                        self.push_delta(
                            &mut b,
                            Delta::UnmapBlocks {
                                coll,
                                name: name.clone(),
                                first_block: n,
                                count: old_blocks - n,
                            },
                            &[],
                        );
                    }
                    self.push_delta(&mut b, Delta::SetSize { coll, name, size }, &[]);
                }
                TxOp::Write { coll, name, offset, data } => {
                    self.push_delta(&mut b, Delta::Touch { coll, name: name.clone() }, &[]);
                    if data.is_empty() {
                        continue;
                    }
                    let end = offset + data.len() as u64;
                    let (fb, lb) = (offset / BSU, (end - 1) / BSU);
                    let mut blocks = vec![0u8; (lb - fb + 1) as usize * BS];
                    // Only the first and last blocks can be partial: they start from
                    // the object's current content.
                    for edge in [fb, lb] {
                        let bstart = edge * BSU;
                        if offset > bstart || end < bstart + BSU {
                            let at = ((edge - fb) * BSU) as usize;
                            blocks[at..at + BS]
                                .copy_from_slice(self.block_content(coll, &name, edge));
                        }
                    }
                    let at = (offset - fb * BSU) as usize;
                    blocks[at..at + data.len()].copy_from_slice(&data);
                    self.write_blocks(&mut b, coll, &name, fb, blocks);
                    let size = self.size_of(coll, &name).unwrap_or(0);
                    if end > size {
                        self.push_delta(&mut b, Delta::SetSize { coll, name, size: end }, &[]);
                    }
                }
                TxOp::Truncate { coll, name, size } => {
                    self.push_delta(&mut b, Delta::Touch { coll, name: name.clone() }, &[]);
                    let old = self.size_of(coll, &name).unwrap_or(0);
                    if size < old {
                        let keep = size.div_ceil(BSU);
                        let old_blocks = self
                            .st
                            .index
                            .object(coll, &name)
                            .and_then(|o| o.blocks.last_key_value().map(|(k, _)| k + 1))
                            .unwrap_or(0);
                        if old_blocks > keep {
                            self.push_delta(
                                &mut b,
                                Delta::UnmapBlocks {
                                    coll,
                                    name: name.clone(),
                                    first_block: keep,
                                    count: old_blocks - keep,
                                },
                                &[],
                            );
                        }
                        // Bytes past the new end of the last block must read as zeroes if
                        // the object grows again.
                        let last = size / BSU;
                        if size % BSU != 0
                            && self
                                .st
                                .index
                                .object(coll, &name)
                                .is_some_and(|o| o.blocks.contains_key(&last))
                        {
                            let mut content = self.block_content(coll, &name, last).to_vec();
                            content[(size % BSU) as usize..].fill(0);
                            self.write_blocks(&mut b, coll, &name, last, content);
                        }
                    }
                    self.push_delta(&mut b, Delta::SetSize { coll, name, size }, &[]);
                }
                TxOp::Zero { coll, name, offset, len } => {
                    self.push_delta(&mut b, Delta::Touch { coll, name: name.clone() }, &[]);
                    let size = self.size_of(coll, &name).unwrap_or(0);
                    let end = offset.saturating_add(len).min(size);
                    if offset >= end {
                        continue;
                    }
                    let (fb, lb) = (offset / BSU, (end - 1) / BSU);
                    let mut blk = fb;
                    while blk <= lb {
                        let bstart = blk * BSU;
                        let lo = offset.max(bstart);
                        let hi = end.min(bstart + BSU);
                        if lo == bstart && hi == bstart + BSU {
                            // A run of whole blocks: unmap them together.
                            let mut e = blk + 1;
                            while e <= lb && e * BSU + BSU <= end {
                                e += 1;
                            }
                            self.push_delta(
                                &mut b,
                                Delta::UnmapBlocks {
                                    coll,
                                    name: name.clone(),
                                    first_block: blk,
                                    count: e - blk,
                                },
                                &[],
                            );
                            blk = e;
                            continue;
                        }
                        if self
                            .st
                            .index
                            .object(coll, &name)
                            .is_some_and(|o| o.blocks.contains_key(&blk))
                        {
                            let mut content = self.block_content(coll, &name, blk).to_vec();
                            content[(lo - bstart) as usize..(hi - bstart) as usize].fill(0);
                            self.write_blocks(&mut b, coll, &name, blk, content);
                        }
                        blk += 1;
                    }
                }
                TxOp::Delete { coll, name } => {
                    self.push_delta(&mut b, Delta::Delete { coll, name }, &[])
                }
                TxOp::SetXattr { coll, name, key, value } => {
                    self.push_delta(&mut b, Delta::SetXattr { coll, name, key, value }, &[])
                }
                TxOp::RmXattr { coll, name, key } => {
                    self.push_delta(&mut b, Delta::RmXattr { coll, name, key }, &[])
                }
                TxOp::PgLogAppend { coll, key, entry } => {
                    self.push_delta(&mut b, Delta::PgLogAppend { coll, key, entry }, &[])
                }
                TxOp::PgLogTrim { coll, upto } => {
                    self.push_delta(&mut b, Delta::PgLogTrim { coll, upto }, &[])
                }
            }
        }
        self.finish_staging(Some(token), b, objects, colls, coll_set, reserved);
    }

    fn finish_staging(
        &mut self,
        token: Option<u64>,
        b: Build,
        mut objects: Vec<(CollId, String)>,
        mut colls: Vec<CollId>,
        coll_set: bool,
        reserved: u64,
    ) {
        objects.sort();
        objects.dedup();
        colls.sort();
        colls.dedup();
        for (c, name) in &objects {
            let m = self.pending.objects.entry(*c).or_default();
            match m.get_mut(name.as_str()) {
                Some(n) => *n += 1,
                None => {
                    m.insert(name.clone(), 1);
                }
            }
        }
        for c in &colls {
            *self.pending.colls.entry(*c).or_default() += 1;
        }
        if coll_set {
            self.pending.coll_set += 1;
        }
        let Build { seq, deltas, ids, data_crc, freed } = b;
        let bytes = delta::encode(&deltas);
        // The estimate reserved room for the record; it must hold.
        let actual = ids.len() as u64 + (bytes.len() as u64 + 64).div_ceil(BSU);
        debug_assert!(actual <= reserved + 1, "estimate {reserved} blocks, record needs {actual}");
        self.st.space.reserved += reserved;
        self.ready.push_back(Staged {
            token,
            seq,
            deltas: bytes,
            data: ids,
            data_crc,
            objects,
            colls,
            coll_set,
            reserved,
            freed,
        });
    }

    fn stage_relocation(&mut self, deltas: Vec<Delta>, data: Vec<Box<[u8]>>) {
        let need = data.len() as u64 + 1 + (deltas.len() as u64 * 64).div_ceil(BSU);
        if self.st.space.available() < need {
            log::warn!(
                "{}: shard {}: no room even for the cleaner's relocation",
                self.st.device,
                self.st.shard
            );
            self.cleaner.relocation_dropped();
            return;
        }
        let seq = self.st.next_seq;
        self.st.next_seq += 1;
        let mut b =
            Build { seq, deltas: Vec::new(), ids: Vec::new(), data_crc: 0, freed: Vec::new() };
        let mut objects = Vec::new();
        let mut colls = Vec::new();
        for (d, block) in deltas.into_iter().zip(data) {
            let Delta::Relocate { coll, name, block: lblock, .. } = &d else {
                unreachable!("relocations only")
            };
            let (coll, name, lblock) = (*coll, name.clone(), *lblock);
            assert_eq!(block.len(), BS, "relocations move single blocks");
            b.data_crc = super::crc::append_block(b.data_crc, crc32c::crc32c(&block));
            let id =
                self.pending.blocks.push(coll, Arc::from(name.as_str()), lblock, block.into_vec());
            self.push_delta(&mut b, d, &[id]);
            objects.push((coll, name));
            colls.push(coll);
        }
        self.finish_staging(None, b, objects, colls, false, need);
    }
}

//! Checkpoints: the index of a shard plus its segment table, written into the log as
//! checkpoint-part batches while the shard keeps serving. The shard superblock points at
//! the parts; replay starts at the first one.
//!
//! A checkpoint captures the state at sequence number S, the moment it starts (when no
//! staged transaction is waiting, so the index is exactly the durable state up to S).
//! Part 0, written first (sequence number S+1), carries the [`CheckpointHeader`]; the
//! other parts carry a stream of [`Entry`]s (collections, objects, an end marker)
//! produced by a [`Walk`] a slice per poll, so the shard never stalls for the whole
//! index. Transactions after S keep changing the index meanwhile: before a change touches
//! something the walk has not emitted yet, [`Walk::before`] emits its state as of S (a
//! copy-on-first-write), and the walk skips it later. Parts and newer transactions
//! interleave in the log; replay starts at part 0 and applies every record after S
//! (parts are no-ops there).
//!
//! Rules: the superblock moves to a checkpoint only after all its parts are durable and
//! read back intact; the previous checkpoint's segments are released only after that
//! superblock is durable.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sluice_vocab::codec::{Dec, Enc};

use super::CollId;
use super::delta::Delta;
use super::format::{self, BS, BatchFixed, FLAG_CHECKPOINT, FormatError, RecordDesc};
use super::index::{Index, Loc, Onode};
use super::space::SegInfo;

/// Part 0 of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct CheckpointHeader {
    pub shard: u16,
    /// Sequence number of the last record reflected in the checkpoint (S).
    pub last_seq: u64,
    pub next_segment_seq: u64,
    pub segs: Vec<SegInfo>,
}

impl CheckpointHeader {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("checkpoint header serializes")
    }
}

/// One element of the checkpoint stream, as written (borrowed from the index).
#[derive(Debug, Serialize)]
enum EntryRef<'a> {
    Coll { coll: CollId, pglog: &'a BTreeMap<u64, Vec<u8>> },
    Object { coll: CollId, name: &'a str, onode: &'a Onode },
    End { colls: u64, objects: u64 },
}

/// One element of the checkpoint stream, as read. Same encoding as [`EntryRef`].
#[derive(Debug, Deserialize)]
enum Entry {
    Coll { coll: CollId, pglog: BTreeMap<u64, Vec<u8>> },
    Object { coll: CollId, name: String, onode: Onode },
    End { colls: u64, objects: u64 },
}

fn put(out: &mut Vec<u8>, e: &EntryRef<'_>) {
    let buf = std::mem::take(out);
    *out = postcard::to_extend(e, buf).expect("checkpoint entry serializes");
}

/// A decoded checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct CheckpointData {
    pub header: CheckpointHeader,
    pub index: Index,
}

impl CheckpointData {
    /// Decodes part 0 (`header`) and the concatenated entry stream of the other parts.
    /// Every inconsistency (a duplicate, an object without its collection, counts that
    /// do not match the end marker, bytes after it) is an error: a checkpoint is all or
    /// nothing.
    pub fn decode(header: &[u8], stream: &[u8]) -> Result<CheckpointData, String> {
        let header: CheckpointHeader =
            postcard::from_bytes(header).map_err(|e| format!("header: {e}"))?;
        let mut index = Index::default();
        let mut objects = Vec::new();
        let mut rest = stream;
        let end = loop {
            if rest.is_empty() {
                return Err("the entry stream ends without its end marker".into());
            }
            let (e, r) = postcard::take_from_bytes::<Entry>(rest)
                .map_err(|e| format!("entry at byte {}: {e}", stream.len() - rest.len()))?;
            rest = r;
            match e {
                Entry::Coll { coll, pglog } => {
                    if index.colls.contains_key(&coll) {
                        return Err(format!("collection {coll} appears twice"));
                    }
                    index
                        .colls
                        .insert(coll, super::index::Coll { objects: Default::default(), pglog });
                }
                Entry::Object { coll, name, onode } => objects.push((coll, name, onode)),
                Entry::End { colls, objects } => break (colls, objects),
            }
        };
        if !rest.is_empty() {
            return Err(format!("{} bytes after the end marker", rest.len()));
        }
        if end != (index.colls.len() as u64, objects.len() as u64) {
            return Err(format!(
                "end marker counts {end:?}, stream holds ({}, {})",
                index.colls.len(),
                objects.len()
            ));
        }
        for (coll, name, onode) in objects {
            let c = index
                .colls
                .get_mut(&coll)
                .ok_or_else(|| format!("object {name:?} of missing collection {coll}"))?;
            if !c.objects.insert_new(name.clone(), onode) {
                return Err(format!("object {name:?} of collection {coll} appears twice"));
            }
        }
        Ok(CheckpointData { header, index })
    }
}

/// The whole entry stream of `index` at once (mount, mkfs): a walk nothing interrupts.
pub(super) fn encode_stream(index: &Index) -> Vec<u8> {
    let mut walk = Walk::new(index);
    walk.step(index, usize::MAX);
    debug_assert!(walk.done());
    walk.out
}

/// An incremental walk of the index as of S; see the module documentation.
#[derive(Debug)]
pub(super) struct Walk {
    /// Collections that existed at S, in order.
    colls: Vec<CollId>,
    /// The collection the walk is in (index into `colls`).
    at: usize,
    /// Last object of `colls[at]` the walk emitted or skipped.
    cursor: Option<Arc<str>>,
    /// Collections whose entry is out.
    colls_out: HashSet<CollId>,
    /// Objects the walk must skip: emitted early, or created after S.
    touched: HashMap<CollId, HashSet<Arc<str>>>,
    objects_out: u64,
    done: bool,
    /// Encoded entries not yet cut into parts.
    pub out: Vec<u8>,
}

impl Walk {
    pub fn new(index: &Index) -> Walk {
        Walk {
            colls: index.colls.keys().copied().collect(),
            at: 0,
            cursor: None,
            colls_out: HashSet::new(),
            touched: HashMap::new(),
            objects_out: 0,
            done: false,
            out: Vec::new(),
        }
    }

    pub fn done(&self) -> bool {
        self.done
    }

    fn existed_at_s(&self, c: CollId) -> Option<usize> {
        self.colls.binary_search(&c).ok()
    }

    fn walked_past(&self, pos: usize, name: &str) -> bool {
        pos < self.at || (pos == self.at && self.cursor.as_deref().is_some_and(|cur| name <= cur))
    }

    fn emit_coll(&mut self, index: &Index, c: CollId) {
        if self.colls_out.insert(c) {
            let coll = index.colls.get(&c).expect("collection existed at S and was not removed");
            put(&mut self.out, &EntryRef::Coll { coll: c, pglog: &coll.pglog });
        }
    }

    fn emit_object(&mut self, c: CollId, name: &str, onode: &Onode) {
        debug_assert!(
            onode.blocks.values().all(|r| matches!(r.loc, Loc::Disk(_))),
            "checkpoint of {c}/{name} would hold a non-durable block"
        );
        put(&mut self.out, &EntryRef::Object { coll: c, name, onode });
        self.objects_out += 1;
    }

    /// Called before `d` is applied to `index`: emits what it is about to change, as of S.
    pub fn before(&mut self, index: &Index, d: &Delta) {
        if self.done {
            return;
        }
        match d {
            Delta::CreateCollection { coll }
            | Delta::RemoveCollection { coll }
            | Delta::PgLogAppend { coll, .. }
            | Delta::PgLogTrim { coll, .. } => {
                // Created after S (even if it existed at S and was removed since, its
                // entry went out at the removal): nothing to keep.
                if self.existed_at_s(*coll).is_some() && index.colls.contains_key(coll) {
                    self.emit_coll(index, *coll);
                }
            }
            other => {
                let (coll, name) = other.object().expect("an object delta");
                let Some(pos) = self.existed_at_s(coll) else { return };
                if self.walked_past(pos, name) {
                    return;
                }
                let set = self.touched.entry(coll).or_default();
                if set.contains(name) {
                    return;
                }
                set.insert(Arc::from(name));
                if let Some(o) = index.object(coll, name) {
                    self.emit_object(coll, name, o);
                }
            }
        }
    }

    /// Walks on for up to `budget` objects.
    pub fn step(&mut self, index: &Index, mut budget: usize) {
        while !self.done && budget > 0 {
            let Some(&c) = self.colls.get(self.at) else {
                put(
                    &mut self.out,
                    &EntryRef::End {
                        colls: self.colls_out.len() as u64,
                        objects: self.objects_out,
                    },
                );
                self.done = true;
                self.touched.clear();
                return;
            };
            let Some(coll) = index.colls.get(&c) else {
                // Removed after S: its entry and its objects went out before the removal.
                debug_assert!(self.colls_out.contains(&c));
                self.at += 1;
                self.cursor = None;
                continue;
            };
            self.emit_coll(index, c);
            let mut last = None;
            let mut exhausted = true;
            // Looked up once per slice; most objects were not touched.
            let touched = self.touched.get(&c).filter(|t| !t.is_empty());
            for name in coll.objects.names_after(self.cursor.as_deref()) {
                if budget == 0 {
                    exhausted = false;
                    break;
                }
                budget -= 1;
                last = Some(name);
                if touched.is_some_and(|t| t.contains(name)) {
                    continue;
                }
                let o = coll.objects.get(name).expect("listed");
                debug_assert!(o.blocks.values().all(|r| matches!(r.loc, Loc::Disk(_))));
                put(&mut self.out, &EntryRef::Object { coll: c, name, onode: o });
                self.objects_out += 1;
            }
            if exhausted {
                self.at += 1;
                self.cursor = None;
            } else if let Some(n) = last {
                self.cursor = Some(Arc::from(n));
            }
        }
    }
}

/// Bytes of checkpoint data one part can carry in a segment of `seg_blocks` blocks.
pub(super) fn part_capacity(seg_blocks: u64) -> usize {
    // One metadata block, the rest data.
    (seg_blocks as usize - 1) * BS
}

/// Encodes part `index` holding `chunk`: a one-record batch whose deltas say which part
/// it is and whose data blocks carry the bytes.
pub(super) fn encode_part(
    shard: u16,
    store_tag: u64,
    segment_seq: u64,
    seq: u64,
    index: u32,
    chunk: &[u8],
) -> Vec<u8> {
    let mut d = Enc::with_capacity(16);
    // The second word is reserved (0): parts are cut while the walk runs, so their
    // number is only known to the superblock.
    d.u32(index).u32(0).u64(chunk.len() as u64);
    let deltas = d.buf;
    let data = format::pad_to_blocks(chunk.to_vec());
    let data_blocks = (data.len() / BS) as u32;
    let desc = RecordDesc {
        deltas_len: deltas.len() as u32,
        data_blocks,
        crc: format::record_crc(&deltas, &data),
    };
    let mut out = format::encode_batch_meta(
        FLAG_CHECKPOINT,
        shard,
        store_tag,
        segment_seq,
        seq,
        &[(desc, &deltas)],
        data_blocks,
    );
    out.extend_from_slice(&data);
    out
}

/// A decoded checkpoint part.
#[derive(Debug)]
pub(super) struct Part<'a> {
    pub index: u32,
    pub bytes: &'a [u8],
}

/// Checks a whole part batch (header crc and record crc) and returns its bytes.
pub(super) fn decode_part<'a>(
    fixed: &BatchFixed,
    batch: &'a [u8],
) -> Result<Part<'a>, FormatError> {
    if fixed.flags & FLAG_CHECKPOINT == 0 || fixed.record_count != 1 {
        return Err(FormatError::Invalid("not a checkpoint part"));
    }
    let meta_len = fixed.meta_blocks as usize * BS;
    if batch.len() < fixed.total_blocks() as usize * BS {
        return Err(FormatError::Truncated);
    }
    let recs = format::decode_batch_meta(fixed, &batch[..meta_len])?;
    let (desc, deltas) = recs[0];
    let data = &batch[meta_len..meta_len + desc.data_blocks as usize * BS];
    if format::record_crc(deltas, data) != desc.crc {
        return Err(FormatError::BadCrc);
    }
    let mut d = Dec::new(deltas);
    let (index, _reserved, len) = (d.u32()?, d.u32()?, d.u64()? as usize);
    if len > data.len() {
        return Err(FormatError::Invalid("checkpoint part sizes"));
    }
    Ok(Part { index, bytes: &data[..len] })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_round_trips_and_detects_damage() {
        let chunk: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let b = encode_part(2, 77, 5, 40, 1, &chunk);
        let f = BatchFixed::decode(&b[..BS]).unwrap();
        assert_eq!((f.first_seq, f.segment_seq, f.store_tag), (40, 5, 77));
        let p = decode_part(&f, &b).unwrap();
        assert_eq!((p.index, p.bytes), (1, chunk.as_slice()));
        let mut bad = b.clone();
        bad[BS + 5000] ^= 1;
        assert_eq!(decode_part(&f, &bad).unwrap_err(), FormatError::BadCrc);
    }

    use crate::store::index::{BlockRef, NoTracking};
    use crate::store::space::SegState;

    fn header() -> CheckpointHeader {
        CheckpointHeader {
            shard: 1,
            last_seq: 9,
            next_segment_seq: 5,
            segs: vec![SegInfo { seq: 4, state: SegState::Sealed, max_record_seq: 9 }],
        }
    }

    fn apply(ix: &mut Index, d: &Delta, seq: u64) -> bool {
        ix.apply(d, seq, &mut |j| Some(Loc::Disk(1000 + seq * 8 + j)), &mut NoTracking).is_ok()
    }

    /// A random delta against the index's current state, from `r` (any u64s).
    fn delta(ix: &Index, r: &[u64; 4]) -> Delta {
        let coll = CollId(1 + r[1] % 6);
        let name = format!("o{}", r[2] % 40);
        match r[0] % 9 {
            0 | 1 => Delta::WriteBlocks {
                coll,
                name,
                first_block: r[3] % 3,
                crcs: vec![r[3] as u32; 1 + (r[3] % 2) as usize],
            },
            2 => Delta::Delete { coll, name },
            3 => Delta::Touch { coll, name },
            4 => Delta::SetXattr {
                coll,
                name,
                key: format!("k{}", r[3] % 3),
                value: vec![r[3] as u8],
            },
            5 => Delta::PgLogAppend { coll, key: r[3] % 50, entry: vec![1, 2, r[3] as u8] },
            6 => Delta::PgLogTrim { coll, upto: r[3] % 50 },
            7 if ix.colls.contains_key(&coll) => Delta::RemoveCollection { coll },
            7 => Delta::CreateCollection { coll },
            _ => Delta::UnmapBlocks { coll, name, first_block: r[3] % 3, count: 1 },
        }
    }

    fn random_index(seeds: &[[u64; 4]]) -> Index {
        let mut ix = Index::default();
        for c in 1..=3 {
            apply(&mut ix, &Delta::CreateCollection { coll: CollId(c) }, 1);
        }
        for (i, r) in seeds.iter().enumerate() {
            let d = delta(&ix, r);
            apply(&mut ix, &d, 2 + i as u64);
        }
        ix
    }

    #[test]
    fn a_full_stream_decodes_to_the_index() {
        let seeds: Vec<[u64; 4]> =
            (0..300u64).map(|i| [i * 7 + 1, i * 13, i * 31 + 5, i * 3]).collect();
        let ix = random_index(&seeds);
        let h = header();
        let data = CheckpointData::decode(&h.encode(), &encode_stream(&ix)).unwrap();
        assert_eq!(data.header, h);
        assert_eq!(data.index, ix);
    }

    #[test]
    fn damaged_streams_are_refused_never_half_read() {
        let seeds: Vec<[u64; 4]> = (0..50u64).map(|i| [i, i * 5, i * 11, i]).collect();
        let ix = random_index(&seeds);
        let stream = encode_stream(&ix);
        let h = header().encode();
        assert!(CheckpointData::decode(&h, &stream[..stream.len() - 1]).is_err(), "truncated");
        let mut longer = stream.clone();
        longer.push(0);
        assert!(CheckpointData::decode(&h, &longer).is_err(), "trailing bytes");
        assert!(CheckpointData::decode(&h, &[]).is_err(), "empty");
        let mut doubled = stream[..stream.len() - 3].to_vec();
        doubled.extend_from_slice(&stream);
        assert!(CheckpointData::decode(&h, &doubled).is_err(), "duplicates");
        let _ = BlockRef { loc: Loc::Disk(0), crc: 0 };
    }

    proptest::proptest! {
        /// The walk, interleaved with arbitrary changes to the index in any order,
        /// produces exactly the index as it was when the walk started.
        #[test]
        fn the_walk_captures_the_index_as_of_its_start(
            before in proptest::collection::vec(proptest::array::uniform4(0u64..1000), 0..150),
            during in proptest::collection::vec(
                (0u8..3, 1usize..6, proptest::array::uniform4(0u64..1000)), 0..200),
        ) {
            let mut ix = random_index(&before);
            let at_start = ix.clone();
            let mut walk = Walk::new(&ix);
            for (i, (what, budget, r)) in during.into_iter().enumerate() {
                if what == 0 {
                    walk.step(&ix, budget);
                } else {
                    let d = delta(&ix, &r);
                    walk.before(&ix, &d);
                    apply(&mut ix, &d, 1000 + i as u64);
                }
            }
            while !walk.done() {
                walk.step(&ix, 7);
            }
            let data = CheckpointData::decode(&header().encode(), &walk.out).unwrap();
            proptest::prop_assert_eq!(data.index, at_start);
        }
    }
}

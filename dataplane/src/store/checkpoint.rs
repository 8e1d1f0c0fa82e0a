//! Checkpoints: the whole index of a shard plus its segment table, serialized and written
//! into the log as one or more checkpoint-part batches. The shard superblock points at
//! the parts; replay starts at them.
//!
//! Rules: a checkpoint is taken only when no staged transaction is waiting to become
//! durable (the index then holds exactly the durable state up to `last_seq`); the
//! superblock moves to it only after all its parts are durable and read back intact; the
//! previous checkpoint's segments are released only after that superblock is durable.

use serde::{Deserialize, Serialize};
use sluice_vocab::codec::{Dec, Enc};

use super::format::{self, BS, BatchFixed, FLAG_CHECKPOINT, FormatError, RecordDesc};
use super::index::Index;
use super::space::SegInfo;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct CheckpointData {
    pub shard: u16,
    /// Sequence number of the last record reflected in the index.
    pub last_seq: u64,
    pub next_segment_seq: u64,
    pub segs: Vec<SegInfo>,
    pub index: Index,
}

/// The same encoding as [`CheckpointData`], borrowed from the live shard, so taking a
/// checkpoint does not first copy the whole index.
#[derive(Debug, Serialize)]
pub(super) struct CheckpointView<'a> {
    pub shard: u16,
    pub last_seq: u64,
    pub next_segment_seq: u64,
    pub segs: &'a [SegInfo],
    pub index: &'a Index,
}

impl CheckpointView<'_> {
    #[cfg(test)]
    pub fn encode(&self) -> Vec<u8> {
        self.encode_into(Vec::new(), 0)
    }

    /// Encodes into `buf` (cleared first) with room for `expect` bytes reserved up front:
    /// growing a vector of tens of MiB by doubling copied it over and over.
    pub fn encode_into(&self, mut buf: Vec<u8>, expect: usize) -> Vec<u8> {
        buf.clear();
        buf.reserve(expect);
        postcard::to_extend(self, buf).expect("checkpoint serializes")
    }
}

impl CheckpointData {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("checkpoint serializes")
    }

    pub fn decode(bytes: &[u8]) -> Result<CheckpointData, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}

/// Bytes of checkpoint data one part can carry in a segment of `seg_blocks` blocks.
pub(super) fn part_capacity(seg_blocks: u64) -> usize {
    // One metadata block, the rest data.
    (seg_blocks as usize - 1) * BS
}

/// Encodes part `index` of `count` holding `chunk`: a one-record batch whose deltas say
/// which part it is and whose data blocks carry the bytes.
pub(super) fn encode_part(
    shard: u16,
    store_tag: u64,
    segment_seq: u64,
    seq: u64,
    index: u32,
    count: u32,
    chunk: &[u8],
) -> Vec<u8> {
    let mut d = Enc::with_capacity(16);
    d.u32(index).u32(count).u64(chunk.len() as u64);
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
    pub count: u32,
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
    let (index, count, len) = (d.u32()?, d.u32()?, d.u64()? as usize);
    if len > data.len() || index >= count {
        return Err(FormatError::Invalid("checkpoint part sizes"));
    }
    Ok(Part { index, count, bytes: &data[..len] })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_round_trips_and_detects_damage() {
        let chunk: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let b = encode_part(2, 77, 5, 40, 1, 3, &chunk);
        let f = BatchFixed::decode(&b[..BS]).unwrap();
        assert_eq!((f.first_seq, f.segment_seq, f.store_tag), (40, 5, 77));
        let p = decode_part(&f, &b).unwrap();
        assert_eq!((p.index, p.count, p.bytes), (1, 3, chunk.as_slice()));
        let mut bad = b.clone();
        bad[BS + 5000] ^= 1;
        assert_eq!(decode_part(&f, &bad).unwrap_err(), FormatError::BadCrc);
    }

    #[test]
    fn the_borrowed_view_decodes_as_the_owned_data() {
        use crate::store::delta::Delta;
        use crate::store::index::{Loc, NoTracking};
        use crate::store::space::SegState;
        let mut index = Index::default();
        let c = crate::store::CollId(3);
        index
            .apply(&Delta::CreateCollection { coll: c }, 1, &mut |_| None, &mut NoTracking)
            .unwrap();
        for (i, name) in ["b", "a", "zz", "m"].iter().enumerate() {
            let d = Delta::WriteBlocks {
                coll: c,
                name: name.to_string(),
                first_block: i as u64,
                crcs: vec![i as u32 + 7],
            };
            index
                .apply(&d, 2 + i as u64, &mut |_| Some(Loc::Disk(100 + i as u64)), &mut NoTracking)
                .unwrap();
        }
        let segs = vec![SegInfo { seq: 4, state: SegState::Sealed, max_record_seq: 9 }];
        let owned = CheckpointData {
            shard: 1,
            last_seq: 9,
            next_segment_seq: 5,
            segs: segs.clone(),
            index: index.clone(),
        };
        let view = CheckpointView {
            shard: 1,
            last_seq: 9,
            next_segment_seq: 5,
            segs: &segs,
            index: &index,
        };
        let bytes = view.encode();
        assert_eq!(bytes.len(), owned.encode().len());
        let back = CheckpointData::decode(&bytes).unwrap();
        assert_eq!(back, owned);
        let names: Vec<_> = back.index.colls[&c].objects.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(names, ["a", "b", "m", "zz"], "objects come back in name order");
    }
}

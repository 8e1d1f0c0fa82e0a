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
}

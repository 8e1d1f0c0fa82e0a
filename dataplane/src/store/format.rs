//! On-disk structures of the object store. Every structure carries a magic, a format
//! version and a crc32c; decoding checks all three and never panics on bad bytes.
//!
//! ```text
//! device: | dev sb A | reserved (7 blocks) | shard 0 region | shard 1 region | ... | dev sb B |
//! shard:  | shard sb slot 0 | shard sb slot 1 | segment 0 | segment 1 | ... | (unused tail) |
//! batch:  | header + record table + deltas (meta_blocks) | record 0 data | record 1 data | ...
//! ```
//!
//! A batch is what group commit writes with one device write and one flush. Its header
//! names the segment's sequence number (`segment_seq`, so stale batches from an earlier
//! life of a reused segment are recognised), the sequence number of its first record
//! (`first_seq`; record i has `first_seq + i`), and for every record the length of its
//! metadata deltas, its number of data blocks and a crc32c over both. The header crc
//! covers the header and the whole metadata area.

use sluice_vocab::codec::{CodecError, Dec, Enc};
use sluice_vocab::limits::{BLOCK_SIZE_BYTES, MAX_CHECKPOINT_PARTS, MAX_SHARDS};

pub const BS: usize = BLOCK_SIZE_BYTES;
pub const FORMAT_VERSION: u16 = 2;
pub const DEVICE_SB_MAGIC: u64 = u64::from_le_bytes(*b"SLUICEDV");
pub const SHARD_SB_MAGIC: u64 = u64::from_le_bytes(*b"SLUICESH");
pub const BATCH_MAGIC: u32 = u32::from_le_bytes(*b"SLBT");

/// Blocks before the first shard region (device superblock copy A and reserved space).
pub const DEVICE_HEADER_BLOCKS: u64 = 8;
/// Blocks at the start of every shard region for the two shard superblock slots.
pub const SHARD_HEADER_BLOCKS: u64 = 2;

/// Batch flag: the batch is one part of a checkpoint, not a transaction.
pub const FLAG_CHECKPOINT: u16 = 1;

/// Size of the fixed batch header before the record table.
pub const BATCH_FIXED_BYTES: usize = 4 + 2 + 2 + 2 + 2 + 8 + 8 + 8 + 4 + 4 + 4 + 4 + 4;

/// The tag every batch carries so that batches of an earlier store on the same device
/// (before `mkfs --force`) never pass for ours: the first 8 bytes of the fsid.
pub fn store_tag(fsid: &[u8; 16]) -> u64 {
    u64::from_le_bytes(fsid[..8].try_into().expect("8 bytes"))
}
/// Size of one record table entry.
pub const RECORD_DESC_BYTES: usize = 4 + 4 + 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("bad magic {found:#x}")]
    BadMagic { found: u64 },
    #[error("format version {found} is not supported (this build reads {FORMAT_VERSION})")]
    BadVersion { found: u16 },
    #[error("checksum mismatch")]
    BadCrc,
    #[error("truncated")]
    Truncated,
    #[error("invalid: {0}")]
    Invalid(&'static str),
}

impl From<CodecError> for FormatError {
    fn from(_: CodecError) -> Self {
        FormatError::Truncated
    }
}

/// Pads `bytes` with zeroes to a whole number of blocks.
pub fn pad_to_blocks(mut bytes: Vec<u8>) -> Vec<u8> {
    let len = bytes.len().max(1).next_multiple_of(BS);
    bytes.resize(len, 0);
    bytes
}

fn seal(mut e: Enc) -> Vec<u8> {
    let crc = crc32c::crc32c(&e.buf);
    e.u32(crc);
    e.buf
}

/// Checks the crc32c that `seal` appended after `len` bytes.
fn check_crc(block: &[u8], len: usize) -> Result<(), FormatError> {
    if block.len() < len + 4 {
        return Err(FormatError::Truncated);
    }
    let want = u32::from_le_bytes(block[len..len + 4].try_into().expect("4 bytes"));
    if crc32c::crc32c(&block[..len]) != want {
        return Err(FormatError::BadCrc);
    }
    Ok(())
}

/// A shard's place on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardRegion {
    /// First block of the region (device LBA).
    pub start: u64,
    pub blocks: u64,
}

/// The device superblock: what the device holds and how it is cut into shards.
/// Written at mkfs into the first and the last block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSuperblock {
    pub generation: u64,
    pub fsid: [u8; 16],
    pub created_unix_s: u64,
    pub device_blocks: u64,
    pub segment_blocks: u32,
    pub shards: Vec<ShardRegion>,
}

impl DeviceSuperblock {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::with_capacity(BS);
        e.u64(DEVICE_SB_MAGIC).u16(FORMAT_VERSION).u64(self.generation).bytes(&self.fsid);
        e.u64(self.created_unix_s).u64(self.device_blocks).u32(self.segment_blocks);
        e.u16(self.shards.len() as u16);
        for r in &self.shards {
            e.u64(r.start).u64(r.blocks);
        }
        let mut out = seal(e);
        assert!(out.len() <= BS);
        out.resize(BS, 0);
        out
    }

    pub fn decode(block: &[u8]) -> Result<DeviceSuperblock, FormatError> {
        let mut d = Dec::new(block);
        let magic = d.u64()?;
        if magic != DEVICE_SB_MAGIC {
            return Err(FormatError::BadMagic { found: magic });
        }
        let version = d.u16()?;
        if version != FORMAT_VERSION {
            return Err(FormatError::BadVersion { found: version });
        }
        let generation = d.u64()?;
        let fsid = d.array::<16>()?;
        let created_unix_s = d.u64()?;
        let device_blocks = d.u64()?;
        let segment_blocks = d.u32()?;
        let n = d.u16()? as usize;
        if n == 0 || n > MAX_SHARDS {
            return Err(FormatError::Invalid("shard count"));
        }
        let mut shards = Vec::with_capacity(n);
        for _ in 0..n {
            shards.push(ShardRegion { start: d.u64()?, blocks: d.u64()? });
        }
        check_crc(block, d.position())?;
        if segment_blocks == 0
            || shards
                .iter()
                .any(|r| r.start.checked_add(r.blocks).is_none_or(|e| e > device_blocks))
        {
            return Err(FormatError::Invalid("shard region outside the device"));
        }
        Ok(DeviceSuperblock {
            generation,
            fsid,
            created_unix_s,
            device_blocks,
            segment_blocks,
            shards,
        })
    }

    /// The device LBAs of copies A and B.
    pub fn copy_lbas(device_blocks: u64) -> [u64; 2] {
        [0, device_blocks - 1]
    }
}

/// Where one part of a checkpoint lies: the shard-relative block of its batch header,
/// its length and its sequence number (parts interleave with newer transactions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartRef {
    pub block: u64,
    pub blocks: u32,
    pub seq: u64,
}

/// The pointer to a shard's current checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointRef {
    /// Sequence number of part 0 (the header): S + 1, where S is the last record the
    /// checkpoint reflects. Replay starts at part 0.
    pub first_seq: u64,
    /// In log order; sequence numbers strictly increase, the first is `first_seq`.
    pub parts: Vec<PartRef>,
    /// Bytes of the entry stream (parts 1..).
    pub total_bytes: u64,
}

impl CheckpointRef {
    /// S: the last record the checkpoint reflects.
    pub fn state_seq(&self) -> u64 {
        self.first_seq - 1
    }
}

/// A shard superblock: the shard's root pointer. Two slots alternate; the valid slot
/// with the highest generation wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSuperblock {
    pub shard: u16,
    pub fsid: [u8; 16],
    pub generation: u64,
    pub checkpoint: CheckpointRef,
}

impl ShardSuperblock {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::with_capacity(BS);
        e.u64(SHARD_SB_MAGIC)
            .u16(FORMAT_VERSION)
            .u16(self.shard)
            .bytes(&self.fsid)
            .u64(self.generation);
        let cp = &self.checkpoint;
        e.u64(cp.first_seq).u64(cp.total_bytes).u32(cp.parts.len() as u32);
        for p in &cp.parts {
            e.u64(p.block).u32(p.blocks).u64(p.seq);
        }
        let mut out = seal(e);
        assert!(out.len() <= BS);
        out.resize(BS, 0);
        out
    }

    pub fn decode(block: &[u8]) -> Result<ShardSuperblock, FormatError> {
        let mut d = Dec::new(block);
        let magic = d.u64()?;
        if magic != SHARD_SB_MAGIC {
            return Err(FormatError::BadMagic { found: magic });
        }
        let version = d.u16()?;
        if version != FORMAT_VERSION {
            return Err(FormatError::BadVersion { found: version });
        }
        let shard = d.u16()?;
        let fsid = d.array::<16>()?;
        let generation = d.u64()?;
        let first_seq = d.u64()?;
        let total_bytes = d.u64()?;
        let n = d.u32()? as usize;
        if n == 0 || n > MAX_CHECKPOINT_PARTS {
            return Err(FormatError::Invalid("checkpoint part count"));
        }
        let mut parts: Vec<PartRef> = Vec::with_capacity(n);
        for _ in 0..n {
            let p = PartRef { block: d.u64()?, blocks: d.u32()?, seq: d.u64()? };
            if parts.last().is_some_and(|q| q.seq >= p.seq) || p.blocks == 0 {
                return Err(FormatError::Invalid("checkpoint parts out of order"));
            }
            parts.push(p);
        }
        check_crc(block, d.position())?;
        if first_seq == 0 || parts[0].seq != first_seq {
            return Err(FormatError::Invalid("checkpoint first part"));
        }
        Ok(ShardSuperblock {
            shard,
            fsid,
            generation,
            checkpoint: CheckpointRef { first_seq, parts, total_bytes },
        })
    }
}

/// One record's entry in a batch's record table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordDesc {
    pub deltas_len: u32,
    pub data_blocks: u32,
    /// crc32c over the record's delta bytes followed by its data blocks.
    pub crc: u32,
}

/// The fixed part of a batch header, decodable from the batch's first block alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchFixed {
    pub flags: u16,
    pub shard: u16,
    pub store_tag: u64,
    pub segment_seq: u64,
    pub first_seq: u64,
    pub record_count: u32,
    pub meta_blocks: u32,
    pub data_blocks: u32,
    pub meta_len: u32,
    pub header_crc: u32,
}

impl BatchFixed {
    pub fn total_blocks(&self) -> u64 {
        u64::from(self.meta_blocks) + u64::from(self.data_blocks)
    }

    /// Decodes the fixed header from a batch's first block. Checks magic and version
    /// only; the crc needs the whole metadata area (see [`decode_batch_meta`]).
    pub fn decode(block: &[u8]) -> Result<BatchFixed, FormatError> {
        let mut d = Dec::new(block);
        let magic = d.u32()?;
        if magic != BATCH_MAGIC {
            return Err(FormatError::BadMagic { found: u64::from(magic) });
        }
        let version = d.u16()?;
        if version != FORMAT_VERSION {
            return Err(FormatError::BadVersion { found: version });
        }
        let flags = d.u16()?;
        let shard = d.u16()?;
        let _pad = d.u16()?;
        let f = BatchFixed {
            flags,
            shard,
            store_tag: d.u64()?,
            segment_seq: d.u64()?,
            first_seq: d.u64()?,
            record_count: d.u32()?,
            meta_blocks: d.u32()?,
            data_blocks: d.u32()?,
            meta_len: d.u32()?,
            header_crc: d.u32()?,
        };
        debug_assert_eq!(d.position(), BATCH_FIXED_BYTES);
        if f.meta_blocks == 0
            || f.record_count == 0
            || (f.meta_len as usize)
                < BATCH_FIXED_BYTES + f.record_count as usize * RECORD_DESC_BYTES
            || (f.meta_len as usize).div_ceil(BS) != f.meta_blocks as usize
        {
            return Err(FormatError::Invalid("batch header sizes"));
        }
        Ok(f)
    }
}

/// Encodes a batch's metadata area: fixed header, record table, then every record's
/// deltas, padded to whole blocks.
#[allow(clippy::too_many_arguments)]
pub fn encode_batch_meta(
    flags: u16,
    shard: u16,
    store_tag: u64,
    segment_seq: u64,
    first_seq: u64,
    records: &[(RecordDesc, &[u8])],
    data_blocks: u32,
) -> Vec<u8> {
    let meta_len = BATCH_FIXED_BYTES
        + records.len() * RECORD_DESC_BYTES
        + records.iter().map(|(_, d)| d.len()).sum::<usize>();
    let meta_blocks = meta_len.div_ceil(BS) as u32;
    let mut e = Enc::with_capacity(meta_blocks as usize * BS);
    e.u32(BATCH_MAGIC).u16(FORMAT_VERSION).u16(flags).u16(shard).u16(0).u64(store_tag);
    e.u64(segment_seq).u64(first_seq).u32(records.len() as u32).u32(meta_blocks).u32(data_blocks);
    e.u32(meta_len as u32).u32(0);
    for (r, _) in records {
        e.u32(r.deltas_len).u32(r.data_blocks).u32(r.crc);
    }
    for (_, d) in records {
        e.bytes(d);
    }
    assert_eq!(e.len(), meta_len);
    let mut buf = e.buf;
    let crc = batch_crc(&buf);
    buf[BATCH_FIXED_BYTES - 4..BATCH_FIXED_BYTES].copy_from_slice(&crc.to_le_bytes());
    buf.resize(meta_blocks as usize * BS, 0);
    buf
}

/// crc32c over the metadata area with the crc field taken as zero.
fn batch_crc(meta: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&meta[..BATCH_FIXED_BYTES - 4]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, &meta[BATCH_FIXED_BYTES..])
}

/// Checks the header crc and decodes the record table and the deltas of a batch whose
/// whole metadata area (`meta_blocks` blocks) is in `meta`.
pub fn decode_batch_meta<'a>(
    fixed: &BatchFixed,
    meta: &'a [u8],
) -> Result<Vec<(RecordDesc, &'a [u8])>, FormatError> {
    let len = fixed.meta_len as usize;
    if meta.len() < len {
        return Err(FormatError::Truncated);
    }
    if batch_crc(&meta[..len]) != fixed.header_crc {
        return Err(FormatError::BadCrc);
    }
    let mut d = Dec::new(&meta[BATCH_FIXED_BYTES..len]);
    let mut descs = Vec::with_capacity(fixed.record_count as usize);
    let mut data_total = 0u64;
    for _ in 0..fixed.record_count {
        let r = RecordDesc { deltas_len: d.u32()?, data_blocks: d.u32()?, crc: d.u32()? };
        data_total += u64::from(r.data_blocks);
        descs.push(r);
    }
    if data_total != u64::from(fixed.data_blocks) {
        return Err(FormatError::Invalid("record data blocks do not add up"));
    }
    let mut out = Vec::with_capacity(descs.len());
    for r in descs {
        out.push((r, d.take(r.deltas_len as usize)?));
    }
    if d.remaining() != 0 {
        return Err(FormatError::Invalid("trailing bytes in batch metadata"));
    }
    Ok(out)
}

/// The crc of a record: its deltas then its data blocks.
pub fn record_crc(deltas: &[u8], data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(deltas), data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dsb() -> DeviceSuperblock {
        DeviceSuperblock {
            generation: 3,
            fsid: [7; 16],
            created_unix_s: 1_700_000_000,
            device_blocks: 10_000,
            segment_blocks: 256,
            shards: vec![
                ShardRegion { start: 8, blocks: 4000 },
                ShardRegion { start: 4008, blocks: 4000 },
            ],
        }
    }

    #[test]
    fn device_superblock_round_trips_and_detects_damage() {
        let b = dsb().encode();
        assert_eq!(b.len(), BS);
        assert_eq!(DeviceSuperblock::decode(&b).unwrap(), dsb());
        let mut bad = b.clone();
        bad[20] ^= 1;
        assert_eq!(DeviceSuperblock::decode(&bad), Err(FormatError::BadCrc));
        assert!(matches!(
            DeviceSuperblock::decode(&[0u8; BS]),
            Err(FormatError::BadMagic { found: 0 })
        ));
        let mut v2 = b.clone();
        v2[8] = 9;
        assert_eq!(DeviceSuperblock::decode(&v2), Err(FormatError::BadVersion { found: 9 }));
    }

    #[test]
    fn shard_superblock_round_trips() {
        let sb = ShardSuperblock {
            shard: 1,
            fsid: [1; 16],
            generation: 9,
            checkpoint: CheckpointRef {
                first_seq: 100,
                parts: vec![
                    PartRef { block: 2, blocks: 3, seq: 100 },
                    PartRef { block: 300, blocks: 1, seq: 107 },
                ],
                total_bytes: 9000,
            },
        };
        assert_eq!(ShardSuperblock::decode(&sb.encode()).unwrap(), sb);
        assert_eq!(sb.checkpoint.state_seq(), 99);
        let mut bad = sb.clone();
        bad.checkpoint.parts[1].seq = 100;
        assert!(ShardSuperblock::decode(&bad.encode()).is_err(), "parts out of order");
    }

    #[test]
    fn batch_meta_round_trips_and_detects_damage() {
        let d1 = vec![1u8; 100];
        let d2 = vec![2u8; 5000];
        let recs = [
            (RecordDesc { deltas_len: 100, data_blocks: 1, crc: 11 }, d1.as_slice()),
            (RecordDesc { deltas_len: 5000, data_blocks: 2, crc: 22 }, d2.as_slice()),
        ];
        let meta = encode_batch_meta(0, 3, 5, 44, 1000, &recs, 3);
        assert_eq!(meta.len() % BS, 0);
        let f = BatchFixed::decode(&meta[..BS]).unwrap();
        assert_eq!(
            (f.shard, f.store_tag, f.segment_seq, f.first_seq, f.record_count, f.data_blocks),
            (3, 5, 44, 1000, 2, 3)
        );
        assert_eq!(f.meta_blocks as usize * BS, meta.len());
        let got = decode_batch_meta(&f, &meta).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].1, d2.as_slice());
        let mut bad = meta.clone();
        bad[BS + 10] ^= 0x40;
        assert_eq!(decode_batch_meta(&f, &bad), Err(FormatError::BadCrc));
    }

    proptest! {
        #[test]
        fn decoders_never_panic_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..(2 * BS))) {
            let _ = DeviceSuperblock::decode(&bytes);
            let _ = ShardSuperblock::decode(&bytes);
            if let Ok(f) = BatchFixed::decode(&bytes) {
                let _ = decode_batch_meta(&f, &bytes);
            }
        }

        #[test]
        fn decoders_never_panic_on_corrupted_valid_headers(flip in 0usize..(BS * 8), which in 0u8..3) {
            let mut b = match which {
                0 => dsb().encode(),
                1 => ShardSuperblock { shard: 0, fsid: [0; 16], generation: 1,
                      checkpoint: CheckpointRef { first_seq: 1, parts: vec![PartRef { block: 2, blocks: 1, seq: 1 }], total_bytes: 10 } }.encode(),
                _ => encode_batch_meta(0, 0, 9, 1, 1, &[(RecordDesc { deltas_len: 3, data_blocks: 0, crc: 0 }, b"abc".as_slice())], 0),
            };
            b[flip / 8] ^= 1 << (flip % 8);
            let _ = DeviceSuperblock::decode(&b);
            let _ = ShardSuperblock::decode(&b);
            if let Ok(f) = BatchFixed::decode(&b) {
                let _ = decode_batch_meta(&f, &b);
            }
        }
    }
}

//! `fsck`: checks every structure of a store without writing anything.

use std::collections::HashMap;

use sluice_nvme::BlockDevice;

use super::format::{BS, DeviceSuperblock, ShardSuperblock};
use super::mount::{self, read_blocks};

/// What fsck found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FsckReport {
    /// Things that are wrong. Empty means clean.
    pub problems: Vec<String>,
    /// Things worth knowing that are not wrong (a torn journal tail after a crash).
    pub notes: Vec<String>,
    pub shards: Vec<ShardSummary>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardSummary {
    pub collections: usize,
    pub objects: usize,
    pub live_blocks: u64,
    pub replayed_records: u64,
    pub blocks_verified: u64,
}

impl FsckReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks the store on `dev`: both device superblock copies, each shard's superblock
/// slots, checkpoint and journal, the index (sizes, block mappings, no block mapped
/// twice, every block in a live segment). With `deep`, reads every mapped block and
/// checks its crc32c.
pub fn fsck<D: BlockDevice + ?Sized>(dev: &mut D, deep: bool) -> FsckReport {
    let mut r = FsckReport::default();
    let n = dev.info().num_blocks;
    let dsb = match mount::read_device_superblock(dev) {
        Ok(sb) => sb,
        Err(e) => {
            r.problems.push(e.to_string());
            return r;
        }
    };
    for lba in DeviceSuperblock::copy_lbas(n) {
        match read_blocks(dev, lba, 1).map(|b| DeviceSuperblock::decode(&b)) {
            Ok(Ok(sb)) if sb == dsb => {}
            Ok(Ok(_)) => r.problems.push(format!(
                "device superblock copy at byte offset {} differs from the other",
                lba * BS as u64
            )),
            Ok(Err(e)) => r.problems.push(format!(
                "device superblock copy at byte offset {} is bad: {e}",
                lba * BS as u64
            )),
            Err(e) => r.problems.push(format!(
                "device superblock copy at byte offset {}: I/O error {e}",
                lba * BS as u64
            )),
        }
    }
    for shard in 0..dsb.shards.len() as u16 {
        let base = dsb.shards[shard as usize].start;
        for slot in 0..2 {
            if let Ok(b) = read_blocks(dev, base + slot, 1)
                && b.iter().any(|&x| x != 0)
                && let Err(e) = ShardSuperblock::decode(&b)
            {
                r.notes.push(format!(
                            "shard {shard}: superblock slot {slot} (byte offset {}) does not decode ({e}); the other slot is used",
                            (base + slot) * BS as u64
                        ));
            }
        }
        let (st, replay) = match mount::load_shard(dev, &dsb, shard) {
            Ok(x) => x,
            Err(e) => {
                r.problems.push(e.to_string());
                continue;
            }
        };
        if let Some((off, seq)) = replay.torn_tail {
            r.notes.push(format!("shard {shard}: torn journal tail at byte offset {off} (record {seq}), as after a crash"));
        }
        if let Err(e) = st.index.check_invariants(true) {
            r.problems.push(format!("shard {shard}: {e}"));
        }
        let mut owner: HashMap<u64, String> = HashMap::new();
        let mut runs: Vec<(u64, u32, String, u64)> = Vec::new();
        st.index.for_each_disk_block(|c, name, lb, b, crc| {
            let who = format!("object {name:?} in {c} block {lb}");
            match st.space.geo.seg_of(b) {
                None => r
                    .problems
                    .push(format!("shard {shard}: {who} maps block {b} outside the segments")),
                Some(s) if st.space.segs[s as usize].state == super::space::SegState::Free => r
                    .problems
                    .push(format!("shard {shard}: {who} maps block {b} in free segment {s}")),
                _ => {}
            }
            if let Some(prev) = owner.insert(b, who.clone()) {
                r.problems
                    .push(format!("shard {shard}: block {b} is mapped twice ({prev} and {who})"));
            }
            runs.push((b, crc, format!("object {name:?} in {c}"), lb * BS as u64));
        });
        let mut summary = ShardSummary {
            collections: st.index.colls.len(),
            objects: st.index.colls.values().map(|c| c.objects.len()).sum(),
            live_blocks: st.space.live_total(),
            replayed_records: replay.records,
            blocks_verified: 0,
        };
        if deep {
            runs.sort_by_key(|x| x.0);
            for (b, crc, who, offset) in runs {
                match read_blocks(dev, base + b, 1) {
                    Ok(data) if crc32c::crc32c(&data) == crc => summary.blocks_verified += 1,
                    Ok(_) => r.problems.push(format!(
                        "shard {shard}: corrupt data: {who} at byte offset {offset} (device byte offset {})",
                        (base + b) * BS as u64
                    )),
                    Err(e) => r.problems.push(format!(
                        "shard {shard}: {who} at byte offset {offset}: I/O error {e} (device byte offset {})",
                        (base + b) * BS as u64
                    )),
                }
            }
        }
        r.shards.push(summary);
    }
    r
}

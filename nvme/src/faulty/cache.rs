//! The volatile write cache of `FaultyDevice`: completed, not yet durable writes in
//! submission order.

use sluice_vocab::limits::BLOCK_SIZE_BYTES;

use crate::command::OpKind;

/// Longest run forwarded to the inner device in one command, in blocks.
const MAX_RUN_BLOCKS: u64 = 256;

/// One completed, not yet durable write.
#[derive(Debug)]
pub(super) struct Entry {
    pub seq: u64,
    pub tag: u64,
    pub kind: OpKind,
    pub lba: u64,
    pub blocks: u64,
    data: Vec<u8>,
    /// `dead[i]`: block i was superseded by a newer write that is already durable, so
    /// this entry's copy must never be read or land again.
    pub dead: Vec<bool>,
}

impl Entry {
    pub fn block_index(&self, lba: u64) -> Option<usize> {
        (lba >= self.lba && lba < self.lba + self.blocks).then(|| (lba - self.lba) as usize)
    }

    pub fn block(&self, i: usize) -> &[u8] {
        &self.data[i * BLOCK_SIZE_BYTES..(i + 1) * BLOCK_SIZE_BYTES]
    }

    fn is_covered(&self, upto: u64, only: Option<u64>) -> bool {
        match only {
            Some(seq) => self.seq == seq,
            None => self.seq <= upto,
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct WriteCache {
    entries: Vec<Entry>,
    last_seq: u64,
}

impl WriteCache {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter()
    }

    pub fn insert(&mut self, tag: u64, kind: OpKind, lba: u64, blocks: u64, data: Vec<u8>) -> u64 {
        assert_eq!(data.len() as u64, blocks * BLOCK_SIZE_BYTES as u64);
        self.last_seq += 1;
        let dead = vec![false; blocks as usize];
        self.entries.push(Entry { seq: self.last_seq, tag, kind, lba, blocks, data, dead });
        self.last_seq
    }

    /// The newest live cached copy of a block.
    fn newest(&self, lba: u64, covered: Option<(u64, Option<u64>)>) -> Option<&[u8]> {
        self.entries.iter().rev().find_map(|e| {
            if let Some((upto, only)) = covered
                && !e.is_covered(upto, only)
            {
                return None;
            }
            let i = e.block_index(lba)?;
            (!e.dead[i]).then(|| e.block(i))
        })
    }

    /// Cached copies of the blocks of `lba..lba+blocks`, as (index in range, data).
    pub fn overlay(&self, lba: u64, blocks: u64) -> Vec<(usize, Box<[u8]>)> {
        (0..blocks)
            .filter_map(|i| self.newest(lba + i, None).map(|d| (i as usize, d.into())))
            .collect()
    }

    /// Sequence numbers of the entries a flush job covers.
    pub fn covered(&self, upto: u64, only: Option<u64>) -> impl Iterator<Item = u64> + '_ {
        self.entries.iter().filter(move |e| e.is_covered(upto, only)).map(|e| e.seq)
    }

    /// What a flush job must write: for every block of the covered entries, the newest
    /// covered live copy, coalesced into contiguous runs.
    pub fn newest_runs(&self, upto: u64, only: Option<u64>) -> Vec<(u64, Vec<u8>)> {
        let mut blocks: Vec<u64> = self
            .entries
            .iter()
            .filter(|e| e.is_covered(upto, only))
            .flat_map(|e| e.lba..e.lba + e.blocks)
            .collect();
        blocks.sort_unstable();
        blocks.dedup();
        let mut runs: Vec<(u64, Vec<u8>)> = Vec::new();
        for b in blocks {
            let Some(data) = self.newest(b, Some((upto, only))) else { continue };
            match runs.last_mut() {
                Some((start, buf))
                    if *start + (buf.len() / BLOCK_SIZE_BYTES) as u64 == b
                        && ((buf.len() / BLOCK_SIZE_BYTES) as u64) < MAX_RUN_BLOCKS =>
                {
                    buf.extend_from_slice(data)
                }
                _ => runs.push((b, data.to_vec())),
            }
        }
        runs
    }

    /// A flush job finished: its entries are durable and leave the cache. A FUA write
    /// (`only`) also supersedes older cached copies of its blocks.
    pub fn make_durable(&mut self, upto: u64, only: Option<u64>) {
        if let Some(seq) = only {
            let Some(pos) = self.entries.iter().position(|e| e.seq == seq) else { return };
            let done = self.entries.remove(pos);
            for e in self.entries.iter_mut().filter(|e| e.seq < seq) {
                for b in done.lba..done.lba + done.blocks {
                    if let Some(i) = e.block_index(b) {
                        e.dead[i] = true;
                    }
                }
            }
        } else {
            self.entries.retain(|e| e.seq > upto);
        }
    }
}

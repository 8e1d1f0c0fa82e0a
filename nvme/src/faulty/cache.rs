//! The volatile write cache of `FaultyDevice`: completed, not yet durable writes in
//! submission order.

use sluice_vocab::limits::BLOCK_SIZE_BYTES;

use crate::command::OpKind;

/// Longest run forwarded to the inner device in one command, in blocks.
const MAX_RUN_BLOCKS: u64 = 256;

static ZERO_BLOCK: [u8; BLOCK_SIZE_BYTES] = [0; BLOCK_SIZE_BYTES];

/// Which cache entries a flush job makes durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Covered {
    /// A flush: the entries whose completion had been delivered when it was submitted.
    Set(Vec<u64>),
    /// A FUA write: its own entry.
    One(u64),
}

impl Covered {
    fn contains(&self, seq: u64) -> bool {
        match self {
            Covered::Set(v) => v.binary_search(&seq).is_ok(),
            Covered::One(s) => *s == seq,
        }
    }
}

/// One completed, not yet durable write.
#[derive(Debug)]
pub(super) struct Entry {
    pub seq: u64,
    pub tag: u64,
    pub kind: OpKind,
    pub lba: u64,
    pub blocks: u64,
    /// `None`: zeroes (write-zeroes, trim), without a buffer.
    data: Option<Vec<u8>>,
    /// The user has seen this write complete; flushes submitted from now on cover it.
    pub delivered: bool,
    /// A flush job began writing this entry to the inner device: it may be there.
    pub forwarded: bool,
    /// `dead[i]`: block i was superseded by a newer write that is already durable, so
    /// this entry's copy must never be read or land again.
    pub dead: Vec<bool>,
}

impl Entry {
    pub fn block_index(&self, lba: u64) -> Option<usize> {
        (lba >= self.lba && lba < self.lba + self.blocks).then(|| (lba - self.lba) as usize)
    }

    pub fn block(&self, i: usize) -> &[u8] {
        match &self.data {
            Some(d) => &d[i * BLOCK_SIZE_BYTES..(i + 1) * BLOCK_SIZE_BYTES],
            None => &ZERO_BLOCK,
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

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter()
    }

    /// Adds a completed write; `data` is `None` for zeroes.
    pub fn insert(
        &mut self,
        tag: u64,
        kind: OpKind,
        lba: u64,
        blocks: u64,
        data: Option<Vec<u8>>,
    ) -> u64 {
        if let Some(d) = &data {
            assert_eq!(d.len() as u64, blocks * BLOCK_SIZE_BYTES as u64);
        }
        self.last_seq += 1;
        let dead = vec![false; blocks as usize];
        self.entries.push(Entry {
            seq: self.last_seq,
            tag,
            kind,
            lba,
            blocks,
            data,
            delivered: false,
            forwarded: false,
            dead,
        });
        self.last_seq
    }

    pub fn mark_delivered(&mut self, seq: u64) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.seq == seq) {
            e.delivered = true;
        }
    }

    /// What a flush submitted now covers.
    pub fn delivered(&self) -> Covered {
        Covered::Set(self.entries.iter().filter(|e| e.delivered).map(|e| e.seq).collect())
    }

    pub fn mark_forwarded(&mut self, covered: &Covered) {
        for e in self.entries.iter_mut().filter(|e| covered.contains(e.seq)) {
            e.forwarded = true;
        }
    }

    /// The newest live cached copy of a block (among `covered` entries, if given).
    fn newest(&self, lba: u64, covered: Option<&Covered>) -> Option<&[u8]> {
        self.entries.iter().rev().find_map(|e| {
            if covered.is_some_and(|c| !c.contains(e.seq)) {
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

    /// What a flush job must write: for every block of the covered entries, the newest
    /// covered live copy, coalesced into contiguous runs.
    pub fn newest_runs(&self, covered: &Covered) -> Vec<(u64, Vec<u8>)> {
        let mut blocks: Vec<u64> = self
            .entries
            .iter()
            .filter(|e| covered.contains(e.seq))
            .flat_map(|e| e.lba..e.lba + e.blocks)
            .collect();
        blocks.sort_unstable();
        blocks.dedup();
        let mut runs: Vec<(u64, Vec<u8>)> = Vec::new();
        for b in blocks {
            let Some(data) = self.newest(b, Some(covered)) else { continue };
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

    /// A flush job finished: its entries are durable and leave the cache, and older
    /// cached copies of their blocks are superseded by durable data.
    pub fn make_durable(&mut self, covered: &Covered) {
        let (done, kept): (Vec<Entry>, Vec<Entry>) =
            std::mem::take(&mut self.entries).into_iter().partition(|e| covered.contains(e.seq));
        self.entries = kept;
        for d in &done {
            for e in self.entries.iter_mut().filter(|e| e.seq < d.seq) {
                for b in d.lba.max(e.lba)..(d.lba + d.blocks).min(e.lba + e.blocks) {
                    let i = e.block_index(b).expect("overlap");
                    e.dead[i] = true;
                }
            }
        }
    }
}

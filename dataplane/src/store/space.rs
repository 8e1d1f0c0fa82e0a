//! Segments and space: which segments are free, open or sealed, how many live blocks
//! each holds, where the next batch goes, and how much room staged transactions have
//! reserved.
//!
//! A segment may be reused only when nothing needs it: no live block maps into it, it
//! holds no part of the current (or the not yet released previous) checkpoint, and all
//! its records are covered by the durable checkpoint (`max_record_seq <= cp_last_seq`),
//! so no future replay reads it.

use serde::{Deserialize, Serialize};

use super::index::LiveTracker;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SegState {
    Free,
    Open,
    Sealed,
}

/// What the checkpoint records about a segment (live counts are derived from the index).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegInfo {
    /// `segment_seq` of the segment's current life (0: never used).
    pub seq: u64,
    pub state: SegState,
    /// Highest record sequence number written into this life of the segment.
    pub max_record_seq: u64,
}

/// Where segments are inside the shard region (shard-relative blocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub area_start: u64,
    pub seg_blocks: u64,
    pub seg_count: u32,
}

impl Geometry {
    pub fn for_region(region_blocks: u64, seg_blocks: u64) -> Geometry {
        let area_start = super::format::SHARD_HEADER_BLOCKS;
        let seg_count = ((region_blocks - area_start) / seg_blocks) as u32;
        Geometry { area_start, seg_blocks, seg_count }
    }

    pub fn seg_of(&self, block: u64) -> Option<u32> {
        if block < self.area_start {
            return None;
        }
        let s = (block - self.area_start) / self.seg_blocks;
        (s < u64::from(self.seg_count)).then_some(s as u32)
    }

    pub fn seg_start(&self, seg: u32) -> u64 {
        self.area_start + u64::from(seg) * self.seg_blocks
    }

    pub fn capacity_blocks(&self) -> u64 {
        u64::from(self.seg_count) * self.seg_blocks
    }
}

#[derive(Debug, Clone)]
pub struct Space {
    pub geo: Geometry,
    pub segs: Vec<SegInfo>,
    pub live: Vec<u32>,
    /// Segments holding parts of the current or previous checkpoint.
    pub pinned: Vec<bool>,
    /// The segment being appended to and the next block in it (segment-relative).
    pub open: Option<(u32, u64)>,
    pub next_segment_seq: u64,
    /// Sequence number of the last record covered by the durable checkpoint.
    pub cp_last_seq: u64,
    /// Blocks promised to staged transactions not yet placed in a batch.
    pub reserved: u64,
}

impl LiveTracker for Space {
    fn mapped(&mut self, block: u64) {
        let s = self.geo.seg_of(block).expect("mapped block outside the segment area");
        self.live[s as usize] += 1;
        debug_assert!(u64::from(self.live[s as usize]) <= self.geo.seg_blocks);
    }

    fn unmapped(&mut self, block: u64) {
        let s = self.geo.seg_of(block).expect("unmapped block outside the segment area");
        let l = &mut self.live[s as usize];
        assert!(*l > 0, "live count of segment {s} would go negative");
        *l -= 1;
    }
}

impl Space {
    pub fn new(
        geo: Geometry,
        segs: Vec<SegInfo>,
        next_segment_seq: u64,
        cp_last_seq: u64,
    ) -> Space {
        assert_eq!(segs.len(), geo.seg_count as usize);
        let n = segs.len();
        Space {
            geo,
            segs,
            live: vec![0; n],
            pinned: vec![false; n],
            open: None,
            next_segment_seq,
            cp_last_seq,
            reserved: 0,
        }
    }

    pub fn fresh(geo: Geometry) -> Space {
        let segs = vec![
            SegInfo { seq: 0, state: SegState::Free, max_record_seq: 0 };
            geo.seg_count as usize
        ];
        Space::new(geo, segs, 1, 0)
    }

    /// Whether segment `s` may be (re)opened for writing.
    pub fn reusable(&self, s: u32) -> bool {
        let i = s as usize;
        if self.pinned[i] || self.open.is_some_and(|(o, _)| o == s) {
            return false;
        }
        match self.segs[i].state {
            SegState::Free => true,
            SegState::Sealed => {
                self.live[i] == 0 && self.segs[i].max_record_seq <= self.cp_last_seq
            }
            SegState::Open => false,
        }
    }

    pub fn reusable_count(&self) -> u32 {
        (0..self.geo.seg_count).filter(|&s| self.reusable(s)).count() as u32
    }

    /// Blocks left in the open segment.
    pub fn open_remaining(&self) -> u64 {
        self.open.map_or(0, |(_, ptr)| self.geo.seg_blocks - ptr)
    }

    /// Blocks that could still be written: reusable segments plus the open segment's
    /// tail, minus what staged transactions reserved.
    pub fn available(&self) -> u64 {
        (u64::from(self.reusable_count()) * self.geo.seg_blocks + self.open_remaining())
            .saturating_sub(self.reserved)
    }

    /// Places a batch of `blocks` blocks: returns its first shard-relative block and the
    /// segment_seq of the segment it lands in. Opens the next reusable segment when the
    /// open one lacks room. `None`: nowhere to put it.
    pub fn place(&mut self, blocks: u64, last_record_seq: u64) -> Option<(u64, u64)> {
        assert!(blocks > 0 && blocks <= self.geo.seg_blocks, "batch of {blocks} blocks");
        if self.open_remaining() < blocks {
            let next = self.pick_reusable()?;
            if let Some((s, _)) = self.open.take() {
                self.segs[s as usize].state = SegState::Sealed;
            }
            let seq = self.next_segment_seq;
            self.next_segment_seq += 1;
            self.segs[next as usize] = SegInfo { seq, state: SegState::Open, max_record_seq: 0 };
            debug_assert_eq!(self.live[next as usize], 0);
            self.open = Some((next, 0));
        }
        let (s, ptr) = self.open.expect("an open segment");
        self.open = Some((s, ptr + blocks));
        let info = &mut self.segs[s as usize];
        info.max_record_seq = info.max_record_seq.max(last_record_seq);
        Some((self.geo.seg_start(s) + ptr, info.seq))
    }

    /// Seals the open segment (the next batch opens a fresh one).
    pub fn seal_open(&mut self) {
        if let Some((s, _)) = self.open.take() {
            self.segs[s as usize].state = SegState::Sealed;
        }
    }

    fn pick_reusable(&self) -> Option<u32> {
        // Prefer the segment after the last one used, so wear spreads and the log reads
        // sequentially at replay.
        let start = self.open.map_or(0, |(s, _)| s + 1);
        (0..self.geo.seg_count)
            .map(|i| (start + i) % self.geo.seg_count)
            .find(|&s| self.reusable(s))
    }

    /// Segments the cleaner may empty: sealed, behind the checkpoint, not pinned, with
    /// something to gain. Returns the one with the fewest live blocks.
    pub fn cleaning_victim(&self) -> Option<u32> {
        (0..self.geo.seg_count)
            .filter(|&s| {
                let i = s as usize;
                self.segs[i].state == SegState::Sealed
                    && !self.pinned[i]
                    && self.segs[i].max_record_seq <= self.cp_last_seq
                    && self.live[i] > 0
                    && self.clean_gain(self.live[i]) > 0
            })
            .min_by_key(|&s| (self.live[s as usize], s))
    }

    /// Blocks cleaning a segment with `live` live blocks frees, net of rewriting them
    /// (with about one metadata block per 16 data blocks, and a batch header). Zero when
    /// cleaning it would not pay: a full store of nearly full segments once kept its
    /// cleaner (and the checkpoints its rewrites triggered) running for ever.
    pub fn clean_gain(&self, live: u32) -> u64 {
        let live = u64::from(live);
        self.geo.seg_blocks.saturating_sub(live + live.div_ceil(16) + 1)
    }

    /// Sealed segments whose records are newer than the checkpoint and that do not hold
    /// the checkpoint itself: what a new checkpoint would make cleanable, net of its own
    /// size. (Counting the checkpoint's own segments made a store whose checkpoint spans
    /// two segments checkpoint in a loop: each one freed the previous one's segments and
    /// filled as many.)
    pub fn awaiting_checkpoint(&self) -> u32 {
        (0..self.geo.seg_count)
            .filter(|&s| {
                let i = s as usize;
                self.segs[i].state == SegState::Sealed
                    && !self.pinned[i]
                    && self.segs[i].max_record_seq > self.cp_last_seq
            })
            .count() as u32
    }

    /// Live blocks in total.
    pub fn live_total(&self) -> u64 {
        self.live.iter().map(|&l| u64::from(l)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo() -> Geometry {
        Geometry::for_region(2 + 4 * 16, 16)
    }

    #[test]
    fn placement_opens_segments_in_turn_and_only_reusable_ones() {
        let mut sp = Space::fresh(geo());
        assert_eq!(sp.geo.seg_count, 4);
        let (b, seq) = sp.place(10, 1).unwrap();
        assert_eq!((b, seq), (2, 1));
        let (b, seq) = sp.place(10, 2).unwrap();
        assert_eq!((b, seq), (2 + 16, 2), "did not fit: next segment");
        assert_eq!(sp.segs[0].state, SegState::Sealed);
        // Segment 0 has no live blocks but its records are newer than the checkpoint.
        assert!(!sp.reusable(0));
        sp.cp_last_seq = 1;
        assert!(sp.reusable(0));
        sp.mapped(3);
        assert!(!sp.reusable(0), "live data keeps a segment");
        sp.unmapped(3);
        sp.pinned[0] = true;
        assert!(!sp.reusable(0), "checkpoint parts keep a segment");
    }

    #[test]
    fn victim_is_the_least_live_segment_behind_the_checkpoint() {
        let mut sp = Space::fresh(geo());
        for i in 0..4u64 {
            sp.place(16, i + 1).unwrap();
        }
        sp.seal_open();
        for (seg, live) in [(0u64, 10u64), (1, 3), (2, 16), (3, 5)] {
            for b in 0..live {
                sp.mapped(2 + seg * 16 + b);
            }
        }
        sp.cp_last_seq = 3;
        assert_eq!(
            sp.cleaning_victim(),
            Some(1),
            "segment 3 is newer than the checkpoint; 2 is full"
        );
        sp.cp_last_seq = 4;
        assert_eq!(sp.cleaning_victim(), Some(1));
        assert_eq!(sp.awaiting_checkpoint(), 0);
    }
}

//! I/O virtual address space: which IOVAs the driver hands out for DMA mappings.
//!
//! The IOMMU reports the ranges a device may use (VFIO_IOMMU_GET_INFO's IOVA range
//! capability); on x86 they exclude the MSI window at 0xFEE0_0000, and the top is the
//! IOMMU's address width. Allocation is first fit, in 2 MiB units, and freed space is
//! reused, so a long-running process that creates and drops queue pairs stays low in
//! the space.

/// Allocation granule (and alignment): 2 MiB.
pub const GRANULE: u64 = 2 << 20;

/// The ranges used when the IOMMU says nothing: above the first 2 MiB (a zero or
/// small pointer faults), below the x86 MSI window, and from its end to 2^39 (the
/// narrowest common IOMMU address width).
pub fn default_ranges() -> Vec<(u64, u64)> {
    vec![(GRANULE, 0xfee0_0000), (0xfef0_0000, 1 << 39)]
}

/// Free IOVA ranges, `[start, end)`, sorted and disjoint.
#[derive(Debug, Clone)]
pub struct IovaSpace {
    free: Vec<(u64, u64)>,
}

impl IovaSpace {
    /// A space over `ranges` (`[start, end)`), trimmed to whole granules above the first.
    pub fn new(ranges: &[(u64, u64)]) -> IovaSpace {
        let mut free: Vec<(u64, u64)> = ranges
            .iter()
            .map(|&(s, e)| (s.max(GRANULE).next_multiple_of(GRANULE), e / GRANULE * GRANULE))
            .filter(|&(s, e)| s < e)
            .collect();
        free.sort_unstable();
        IovaSpace { free }
    }

    /// `len` bytes (rounded up to granules), first fit; `None` when nothing fits.
    pub fn alloc(&mut self, len: u64) -> Option<u64> {
        let len = len.max(1).checked_next_multiple_of(GRANULE)?;
        let i = self.free.iter().position(|&(s, e)| e - s >= len)?;
        let start = self.free[i].0;
        self.free[i].0 += len;
        if self.free[i].0 == self.free[i].1 {
            self.free.remove(i);
        }
        Some(start)
    }

    /// Gives back what `alloc(len)` returned at `start`.
    pub fn free(&mut self, start: u64, len: u64) {
        let len = len.max(1).next_multiple_of(GRANULE);
        let end = start + len;
        let i = self.free.partition_point(|&(s, _)| s < start);
        assert!(
            (i == 0 || self.free[i - 1].1 <= start)
                && (i == self.free.len() || end <= self.free[i].0),
            "IOVA range {start:#x}+{len:#x} freed twice or never allocated"
        );
        self.free.insert(i, (start, end));
        // Merge with the neighbours.
        if i + 1 < self.free.len() && self.free[i].1 == self.free[i + 1].0 {
            self.free[i].1 = self.free[i + 1].1;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].1 == self.free[i].0 {
            self.free[i - 1].1 = self.free[i].1;
            self.free.remove(i);
        }
    }

    /// Bytes free.
    pub fn available(&self) -> u64 {
        self.free.iter().map(|&(s, e)| e - s).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn allocation_skips_holes_and_reuses_freed_space() {
        let mut sp = IovaSpace::new(&default_ranges());
        let a = sp.alloc(1).unwrap();
        assert_eq!(a, GRANULE, "nothing below 2 MiB");
        // Fill up to the MSI window: the next allocation jumps over it.
        let below = (0xfee0_0000 - 2 * GRANULE) / GRANULE;
        let mut got = Vec::new();
        for _ in 0..below {
            got.push(sp.alloc(GRANULE).unwrap());
        }
        let over = sp.alloc(GRANULE).unwrap();
        assert!(over >= 0xfef0_0000, "{over:#x} must be above the MSI window");
        sp.free(got[10], GRANULE);
        assert_eq!(sp.alloc(GRANULE), Some(got[10]), "freed space is reused first");
        assert_eq!(sp.alloc(1 << 40), None);
    }

    proptest! {
        /// Whatever the order of allocations and frees, live ranges never overlap each
        /// other or a hole, and freeing everything restores the whole space.
        #[test]
        fn live_ranges_stay_disjoint(ops in proptest::collection::vec((any::<bool>(), 1u64..64), 1..200)) {
            let ranges = [(0u64, 100 * GRANULE), (120 * GRANULE, 300 * GRANULE)];
            let mut sp = IovaSpace::new(&ranges);
            let total = sp.available();
            let mut live: Vec<(u64, u64)> = Vec::new();
            for (alloc, g) in ops {
                if alloc || live.is_empty() {
                    if let Some(s) = sp.alloc(g * GRANULE) {
                        let e = s + g * GRANULE;
                        prop_assert!(ranges.iter().any(|&(rs, re)| s >= rs.max(GRANULE) && e <= re));
                        prop_assert!(live.iter().all(|&(ls, le)| e <= ls || s >= le));
                        live.push((s, e));
                    }
                } else {
                    let (s, e) = live.remove(g as usize % live.len());
                    sp.free(s, e - s);
                }
            }
            for (s, e) in live.drain(..) {
                sp.free(s, e - s);
            }
            prop_assert_eq!(sp.available(), total);
        }
    }
}

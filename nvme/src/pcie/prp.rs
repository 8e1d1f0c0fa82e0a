//! Physical Region Page (PRP) entries: how a command tells the controller where its data
//! is (NVMe base specification, "Physical Region Page Entry and List").
//!
//! A transfer of `len` bytes starting at IOVA `a` touches pages `a / 4K ..`:
//!
//! ```text
//!   1 page:   PRP1 = a (may have an offset into the page)   PRP2 = 0
//!   2 pages:  PRP1 = a                                      PRP2 = second page
//!   more:     PRP1 = a                                      PRP2 = list page 0
//!             list page: 512 entries, one page base each; when more pages follow than
//!             fit, the last entry of a list page points to the next list page.
//! ```
//!
//! Only the first entry may carry an offset; every other entry is page aligned. The
//! builder and the walker (which the controller model uses to follow what the driver
//! built) are both here, and tested against hand-made layouts.

/// The memory page size the driver configures (CC.MPS = 0).
pub const PAGE: u64 = 4096;
/// PRP entries in one list page.
pub const ENTRIES_PER_PAGE: usize = (PAGE / 8) as usize;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrpError {
    #[error("zero-length transfer")]
    Empty,
    #[error("data pointer {0:#x} is not dword aligned")]
    Unaligned(u64),
    #[error("transfer needs {need} PRP list page(s), {have} available")]
    ListTooShort { need: usize, have: usize },
    #[error("PRP entry {0:#x} is not page aligned")]
    EntryUnaligned(u64),
    #[error("PRP list pointer {0:#x} is not aligned")]
    ListUnaligned(u64),
}

/// Pages a transfer of `len` bytes at `iova` touches.
pub fn pages_touched(iova: u64, len: usize) -> usize {
    if len == 0 {
        return 0;
    }
    let first = iova / PAGE;
    let last = (iova + len as u64 - 1) / PAGE;
    (last - first + 1) as usize
}

/// List pages a transfer needs (0 when PRP1 and PRP2 suffice).
pub fn list_pages_needed(iova: u64, len: usize) -> usize {
    let pages = pages_touched(iova, len);
    if pages <= 2 {
        return 0;
    }
    // Entries after the first page; every list page but the last gives one entry to
    // the chain pointer.
    let entries = pages - 1;
    if entries <= ENTRIES_PER_PAGE {
        1
    } else {
        1 + (entries - ENTRIES_PER_PAGE).div_ceil(ENTRIES_PER_PAGE - 1)
    }
}

/// Builds PRP1/PRP2 for a transfer that is contiguous in IOVA space, writing list
/// entries through `write(list_page, slot, value)`. `lists` are the IOVAs of the list
/// pages available (page aligned).
pub fn build(
    iova: u64,
    len: usize,
    lists: &[u64],
    write: &mut dyn FnMut(usize, usize, u64),
) -> Result<(u64, u64), PrpError> {
    if len == 0 {
        return Err(PrpError::Empty);
    }
    if !iova.is_multiple_of(4) {
        return Err(PrpError::Unaligned(iova));
    }
    let pages = pages_touched(iova, len);
    let base = iova & !(PAGE - 1);
    match pages {
        1 => return Ok((iova, 0)),
        2 => return Ok((iova, base + PAGE)),
        _ => {}
    }
    let need = list_pages_needed(iova, len);
    if need > lists.len() {
        return Err(PrpError::ListTooShort { need, have: lists.len() });
    }
    let mut page = 0;
    let mut slot = 0;
    for k in 1..pages {
        let remaining = pages - k;
        if slot == ENTRIES_PER_PAGE - 1 && remaining > 1 {
            write(page, slot, lists[page + 1]);
            page += 1;
            slot = 0;
        }
        write(page, slot, base + k as u64 * PAGE);
        slot += 1;
    }
    debug_assert_eq!(page + 1, need);
    Ok((iova, lists[0]))
}

/// Follows PRP1/PRP2 of a `len`-byte transfer as a controller does, reading list
/// entries through `read(iova)`; returns the `(iova, bytes)` segments in order.
pub fn walk(
    prp1: u64,
    prp2: u64,
    len: usize,
    read: &mut dyn FnMut(u64) -> u64,
) -> Result<Vec<(u64, usize)>, PrpError> {
    if len == 0 {
        return Err(PrpError::Empty);
    }
    if !prp1.is_multiple_of(4) {
        return Err(PrpError::Unaligned(prp1));
    }
    let mut segs = Vec::new();
    let first = ((PAGE - prp1 % PAGE) as usize).min(len);
    segs.push((prp1, first));
    let mut left = len - first;
    if left == 0 {
        return Ok(segs);
    }
    if left <= PAGE as usize {
        if !prp2.is_multiple_of(PAGE) {
            return Err(PrpError::EntryUnaligned(prp2));
        }
        segs.push((prp2, left));
        return Ok(segs);
    }
    if !prp2.is_multiple_of(8) {
        return Err(PrpError::ListUnaligned(prp2));
    }
    let mut list = prp2;
    loop {
        let slots_left_in_page = ENTRIES_PER_PAGE - ((list % PAGE) / 8) as usize;
        for i in 0..slots_left_in_page {
            let entry = read(list + 8 * i as u64);
            let pages_left = (left as u64).div_ceil(PAGE) as usize;
            if i == slots_left_in_page - 1 && pages_left > 1 {
                // The last slot chains to the next list page.
                if !entry.is_multiple_of(8) {
                    return Err(PrpError::ListUnaligned(entry));
                }
                list = entry;
                break;
            }
            if !entry.is_multiple_of(PAGE) {
                return Err(PrpError::EntryUnaligned(entry));
            }
            let n = left.min(PAGE as usize);
            segs.push((entry, n));
            left -= n;
            if left == 0 {
                return Ok(segs);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn build_into(iova: u64, len: usize, lists: &[u64]) -> (u64, u64, HashMap<u64, u64>) {
        let mut mem = HashMap::new();
        let (p1, p2) = build(iova, len, lists, &mut |page, slot, v| {
            assert!(slot < ENTRIES_PER_PAGE);
            mem.insert(lists[page] + 8 * slot as u64, v);
        })
        .unwrap();
        (p1, p2, mem)
    }

    #[test]
    fn one_and_two_pages_need_no_list() {
        assert_eq!(build(0x10_0000, 4096, &[], &mut |_, _, _| panic!()).unwrap(), (0x10_0000, 0));
        assert_eq!(build(0x10_0200, 512, &[], &mut |_, _, _| panic!()).unwrap(), (0x10_0200, 0));
        // Unaligned start crossing one boundary: two pages.
        assert_eq!(
            build(0x10_0200, 4096, &[], &mut |_, _, _| panic!()).unwrap(),
            (0x10_0200, 0x10_1000)
        );
        assert_eq!(
            build(0x10_0000, 8192, &[], &mut |_, _, _| panic!()).unwrap(),
            (0x10_0000, 0x10_1000)
        );
    }

    #[test]
    fn three_pages_use_a_list_with_page_bases() {
        let (p1, p2, mem) = build_into(0x20_0000, 3 * 4096, &[0x9000]);
        assert_eq!((p1, p2), (0x20_0000, 0x9000));
        assert_eq!(mem.len(), 2);
        assert_eq!(mem[&0x9000], 0x20_1000);
        assert_eq!(mem[&0x9008], 0x20_2000);
        // Not page-aligned at the start: 0x20_0800 + 12 KiB touches 4 pages.
        let (p1, _, mem) = build_into(0x20_0800, 3 * 4096, &[0x9000]);
        assert_eq!(p1, 0x20_0800);
        assert_eq!(mem.len(), 3);
        assert_eq!(mem[&0x9010], 0x20_3000);
    }

    #[test]
    fn long_transfers_chain_list_pages() {
        // 514 pages: 513 entries after PRP1. The first list page holds 511 of them and
        // a chain pointer, the second the last 2.
        let len = 514 * 4096;
        assert_eq!(list_pages_needed(0, len), 2);
        let (_, p2, mem) = build_into(0, len, &[0xa000, 0xb000]);
        assert_eq!(p2, 0xa000);
        assert_eq!(mem[&(0xa000 + 8 * 511)], 0xb000, "last slot chains");
        assert_eq!(mem[&(0xa000 + 8 * 510)], 511 * 4096);
        assert_eq!(mem[&0xb000], 512 * 4096);
        assert_eq!(mem[&0xb008], 513 * 4096);
        assert_eq!(mem.len(), 514);
        // Exactly 1 + 512 pages fit one list page: no chain.
        assert_eq!(list_pages_needed(0, 513 * 4096), 1);
        let (_, _, mem) = build_into(0, 513 * 4096, &[0xa000]);
        assert_eq!(mem[&(0xa000 + 8 * 511)], 512 * 4096);
    }

    #[test]
    fn too_few_list_pages_and_bad_pointers_are_errors() {
        assert_eq!(
            build(0, 600 * 4096, &[0xa000], &mut |_, _, _| {}),
            Err(PrpError::ListTooShort { need: 2, have: 1 })
        );
        assert_eq!(build(3, 4096, &[], &mut |_, _, _| {}), Err(PrpError::Unaligned(3)));
        assert_eq!(build(0, 0, &[], &mut |_, _, _| {}), Err(PrpError::Empty));
        assert_eq!(walk(0, 0x1234, 8192, &mut |_| 0), Err(PrpError::EntryUnaligned(0x1234)));
    }

    proptest! {
        /// Whatever the start offset and length, the walker recovers exactly the bytes
        /// of the contiguous range, in order.
        #[test]
        fn walk_recovers_what_build_made(start_page in 0u64..1000, off in 0u64..1024, len in 1usize..(3 << 20)) {
            let iova = start_page * PAGE + off * 4;
            let lists: Vec<u64> = (0..8).map(|i| 0x1_0000_0000 + i * PAGE).collect();
            let (p1, p2, mem) = build_into(iova, len, &lists);
            let segs = walk(p1, p2, len, &mut |a| *mem.get(&a).expect("walker read an entry the builder never wrote")).unwrap();
            let mut at = iova;
            let mut total = 0;
            for (a, n) in segs {
                prop_assert_eq!(a, at);
                at += n as u64;
                total += n;
            }
            prop_assert_eq!(total, len);
            prop_assert_eq!(pages_touched(iova, len) > 2, list_pages_needed(iova, len) > 0);
        }
    }
}

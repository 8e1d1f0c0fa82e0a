//! crc32c of data given as 4 KiB blocks whose own crcs are known: a record's crc covers
//! its deltas and then its data blocks, and staging already computes every block's crc
//! for the index. Appending a block to a running crc is `shift(running) ^ crc(block)`,
//! where `shift` is the linear map "append 4096 zero bits' worth of bytes" (the CRC is
//! affine; see zlib's `crc32_combine`). `shift` is a 32x32 matrix over GF(2) applied as
//! four table lookups; its 32 basis columns come from `crc32c::crc32c_combine` (the
//! crate's own, slow, combine), so no polynomial arithmetic is written here.

use std::sync::LazyLock;

use super::format::BS;

/// `SHIFT[k][b]` = the shift of byte value `b` placed at byte `k` of the register.
static SHIFT: LazyLock<[[u32; 256]; 4]> = LazyLock::new(|| {
    let basis: [u32; 32] = std::array::from_fn(|i| crc32c::crc32c_combine(1 << i, 0, BS));
    let mut t = [[0u32; 256]; 4];
    for (k, table) in t.iter_mut().enumerate() {
        for (b, v) in table.iter_mut().enumerate() {
            *v = (0..8).filter(|j| b >> j & 1 == 1).fold(0, |acc, j| acc ^ basis[8 * k + j]);
        }
    }
    t
});

/// `shift(crc) ^ crc32c(block)` is the crc of (bytes whose crc is `crc`) followed by
/// `block` (`BS` bytes).
#[inline]
fn shift(crc: u32) -> u32 {
    let t = &*SHIFT;
    t[0][(crc & 0xff) as usize]
        ^ t[1][(crc >> 8 & 0xff) as usize]
        ^ t[2][(crc >> 16 & 0xff) as usize]
        ^ t[3][(crc >> 24) as usize]
}

/// The crc of (bytes whose crc is `crc`) followed by a block whose crc is `block_crc`.
#[inline]
pub fn append_block(crc: u32, block_crc: u32) -> u32 {
    shift(crc) ^ block_crc
}

/// The crc of (bytes whose crc is `prefix`) followed by `blocks` blocks whose crc, back
/// to back, is `data_crc` (as [`append_block`] folds them from 0).
pub fn append_blocks(prefix: u32, data_crc: u32, blocks: usize) -> u32 {
    (0..blocks).fold(prefix, |c, _| shift(c)) ^ data_crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Folding block crcs gives the crc of the concatenation, after any prefix.
        #[test]
        fn block_crcs_fold_into_the_crc_of_the_whole(
            prefix in proptest::collection::vec(any::<u8>(), 0..300),
            seeds in proptest::collection::vec(any::<u64>(), 0..5),
        ) {
            let blocks: Vec<Vec<u8>> = seeds
                .iter()
                .map(|s| (0..BS).map(|i| (s.wrapping_mul(i as u64 + 1) >> 7) as u8).collect())
                .collect();
            let data_crc = blocks.iter().fold(0, |c, b| append_block(c, crc32c::crc32c(b)));
            let whole: Vec<u8> = blocks.concat();
            prop_assert_eq!(data_crc, crc32c::crc32c(&whole));
            let p = crc32c::crc32c(&prefix);
            prop_assert_eq!(
                append_blocks(p, data_crc, blocks.len()),
                crc32c::crc32c_append(p, &whole)
            );
        }
    }
}

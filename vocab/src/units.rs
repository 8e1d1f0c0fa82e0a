//! Units that cross crate boundaries, as newtypes so a block count is never mistaken for
//! a byte count.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

use crate::limits::BLOCK_SIZE_BYTES;

/// Logical block address, in units of [`BLOCK_SIZE_BYTES`].
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Lba(pub u64);

/// A number of blocks of [`BLOCK_SIZE_BYTES`].
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct BlockCount(pub u64);

impl Lba {
    /// Byte offset of this block on the device.
    pub fn offset_bytes(self) -> u64 {
        self.0 * BLOCK_SIZE_BYTES as u64
    }

    /// The block `count` blocks after this one; `None` on overflow.
    pub fn checked_add(self, count: BlockCount) -> Option<Lba> {
        self.0.checked_add(count.0).map(Lba)
    }
}

impl BlockCount {
    pub fn bytes(self) -> u64 {
        self.0 * BLOCK_SIZE_BYTES as u64
    }

    /// Blocks needed to hold `bytes` bytes (rounded up).
    pub fn for_bytes(bytes: u64) -> BlockCount {
        BlockCount(bytes.div_ceil(BLOCK_SIZE_BYTES as u64))
    }
}

impl fmt::Display for Lba {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "lba {}", self.0)
    }
}

impl fmt::Display for BlockCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} blocks", self.0)
    }
}

/// A size in bytes as operators write it: `4096`, `4k`, `4KiB`, `1M`, `4G`, `1.5G`.
/// Suffixes are binary (k = 1024) as in fio.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct ByteSize(pub u64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot parse {input:?} as {what}: {why}")]
pub struct ParseUnitError {
    pub input: String,
    pub what: &'static str,
    pub why: &'static str,
}

impl std::str::FromStr for ByteSize {
    type Err = ParseUnitError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |why| ParseUnitError { input: input.to_string(), what: "a size", why };
        let s = input.trim();
        let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
        let (num, suffix) = s.split_at(split);
        if num.is_empty() {
            return Err(err("expected a number such as 4k, 1M or 4G"));
        }
        let shift = match suffix.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kb" | "kib" => 10,
            "m" | "mb" | "mib" => 20,
            "g" | "gb" | "gib" => 30,
            "t" | "tb" | "tib" => 40,
            _ => return Err(err("unknown suffix (use k, M, G or T)")),
        };
        let bytes = if num.contains('.') {
            let v: f64 = num.parse().map_err(|_| err("not a number"))?;
            let b = v * (1u64 << shift) as f64;
            if !(0.0..1.8e19).contains(&b) || b.fract() != 0.0 {
                return Err(err("not a whole number of bytes"));
            }
            b as u64
        } else {
            let v: u64 = num.parse().map_err(|_| err("not a number"))?;
            v.checked_mul(1u64 << shift).ok_or_else(|| err("too large"))?
        };
        Ok(ByteSize(bytes))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u32); 4] = [("T", 40), ("G", 30), ("M", 20), ("k", 10)];
        for (name, shift) in UNITS {
            if self.0 >= (1u64 << shift) && self.0.is_multiple_of(1u64 << shift) {
                return write!(f, "{}{}", self.0 >> shift, name);
            }
        }
        write!(f, "{}", self.0)
    }
}

/// Parses a duration as operators write it: `10s`, `500ms`, `50us`, `2m`, `1h`; a bare
/// number is seconds.
pub fn parse_duration(input: &str) -> Result<Duration, ParseUnitError> {
    let err = |why| ParseUnitError { input: input.to_string(), what: "a duration", why };
    let s = input.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let v: f64 = num.parse().map_err(|_| err("expected a number such as 10s or 500ms"))?;
    let nanos_per_unit = match suffix.trim() {
        "" | "s" => 1e9,
        "ms" => 1e6,
        "us" => 1e3,
        "ns" => 1.0,
        "m" | "min" => 60e9,
        "h" => 3600e9,
        _ => return Err(err("unknown suffix (use ns, us, ms, s, m or h)")),
    };
    let nanos = v * nanos_per_unit;
    if !(0.0..1.8e19).contains(&nanos) {
        return Err(err("out of range"));
    }
    Ok(Duration::from_nanos(nanos as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes_parse_like_fio() {
        assert_eq!("4096".parse::<ByteSize>().unwrap(), ByteSize(4096));
        assert_eq!("4k".parse::<ByteSize>().unwrap(), ByteSize(4096));
        assert_eq!("4KiB".parse::<ByteSize>().unwrap(), ByteSize(4096));
        assert_eq!("1M".parse::<ByteSize>().unwrap(), ByteSize(1 << 20));
        assert_eq!("4G".parse::<ByteSize>().unwrap(), ByteSize(4 << 30));
        assert_eq!("1.5k".parse::<ByteSize>().unwrap(), ByteSize(1536));
        assert!("4q".parse::<ByteSize>().is_err());
        assert!("".parse::<ByteSize>().is_err());
        assert!("k".parse::<ByteSize>().is_err());
        assert!("99999999999T".parse::<ByteSize>().is_err());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("50us").unwrap(), Duration::from_micros(50));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5 fortnights").is_err());
    }

    proptest! {
        #[test]
        fn size_display_round_trips(v in 0u64..(1 << 50)) {
            let s = ByteSize(v).to_string();
            prop_assert_eq!(s.parse::<ByteSize>().unwrap(), ByteSize(v));
        }

        #[test]
        fn block_count_covers_bytes(b in 0u64..(1 << 40)) {
            let c = BlockCount::for_bytes(b);
            prop_assert!(c.bytes() >= b);
            prop_assert!(c.bytes() < b + BLOCK_SIZE_BYTES as u64);
        }
    }
}

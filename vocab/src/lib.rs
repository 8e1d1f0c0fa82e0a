//! Shared vocabulary of Sluice.
//!
//! Every crate of the workspace speaks in these types: block addresses and counts
//! ([`Lba`], [`BlockCount`]), sizes with units ([`ByteSize`]), monotonic time
//! ([`MonoTime`], [`Clock`]), core ids ([`CoreId`]) and the limits every other crate is
//! bounded by ([`limits`]). Nothing here does I/O or spawns threads; everything is plain
//! data that any thread may hold.
//!
//! Dependencies point one way: this crate depends on nothing of Sluice, and `nvme`,
//! `net`, `dataplane`, `control`, `client` and `bench` depend on it.

#![forbid(unsafe_code)]

pub mod codec;
pub mod limits;
pub mod time;
pub mod units;

pub use time::{Clock, ManualClock, MonoTime, SystemClock};
pub use units::{BlockCount, ByteSize, Lba, ParseUnitError, parse_duration};

use serde::{Deserialize, Serialize};

/// Index of a reactor core inside one process (0-based, dense). Not a CPU number: the
/// CPU a core is pinned to is configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CoreId(pub u16);

impl CoreId {
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

impl std::fmt::Display for CoreId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "core{}", self.0)
    }
}

//! Metadata deltas: what a journal record says happened. Staging turns a transaction's
//! operations into deltas; the same [`Index::apply`](super::index::Index::apply) applies
//! them live and at replay, so recovery cannot drift from normal operation.

use serde::{Deserialize, Serialize};

use super::CollId;

/// One metadata change. Data-carrying deltas consume the record's data blocks in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Delta {
    CreateCollection {
        coll: CollId,
    },
    RemoveCollection {
        coll: CollId,
    },
    /// Creates the object if absent.
    Touch {
        coll: CollId,
        name: String,
    },
    /// Maps `crcs.len()` blocks from `first_block` to the next data blocks of the record.
    WriteBlocks {
        coll: CollId,
        name: String,
        first_block: u64,
        crcs: Vec<u32>,
    },
    /// Unmaps blocks (they read as zeroes).
    UnmapBlocks {
        coll: CollId,
        name: String,
        first_block: u64,
        count: u64,
    },
    SetSize {
        coll: CollId,
        name: String,
        size: u64,
    },
    Delete {
        coll: CollId,
        name: String,
    },
    SetXattr {
        coll: CollId,
        name: String,
        key: String,
        value: Vec<u8>,
    },
    RmXattr {
        coll: CollId,
        name: String,
        key: String,
    },
    PgLogAppend {
        coll: CollId,
        key: u64,
        entry: Vec<u8>,
    },
    /// Removes PG log entries with keys up to and including `upto`.
    PgLogTrim {
        coll: CollId,
        upto: u64,
    },
    /// Moves one block to the next data block of the record, if it is still at `from`
    /// (the cleaner's relocation; a newer write wins).
    Relocate {
        coll: CollId,
        name: String,
        block: u64,
        from: u64,
        crc: u32,
    },
}

impl Delta {
    /// The object a per-object delta changes (`None` for collection-level deltas).
    pub fn object(&self) -> Option<(CollId, &str)> {
        match self {
            Delta::Touch { coll, name }
            | Delta::WriteBlocks { coll, name, .. }
            | Delta::UnmapBlocks { coll, name, .. }
            | Delta::SetSize { coll, name, .. }
            | Delta::Delete { coll, name }
            | Delta::SetXattr { coll, name, .. }
            | Delta::RmXattr { coll, name, .. }
            | Delta::Relocate { coll, name, .. } => Some((*coll, name)),
            Delta::CreateCollection { .. }
            | Delta::RemoveCollection { .. }
            | Delta::PgLogAppend { .. }
            | Delta::PgLogTrim { .. } => None,
        }
    }

    /// Data blocks this delta consumes from its record.
    pub fn data_blocks(&self) -> u64 {
        match self {
            Delta::WriteBlocks { crcs, .. } => crcs.len() as u64,
            Delta::Relocate { .. } => 1,
            _ => 0,
        }
    }
}

pub fn encode(deltas: &[Delta]) -> Vec<u8> {
    postcard::to_allocvec(deltas).expect("deltas serialize")
}

pub fn decode(bytes: &[u8]) -> Result<Vec<Delta>, postcard::Error> {
    postcard::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_round_trip() {
        let d = vec![
            Delta::CreateCollection { coll: CollId(7) },
            Delta::WriteBlocks {
                coll: CollId(7),
                name: "a".into(),
                first_block: 3,
                crcs: vec![1, 2],
            },
            Delta::Relocate { coll: CollId(7), name: "a".into(), block: 3, from: 99, crc: 1 },
        ];
        assert_eq!(decode(&encode(&d)).unwrap(), d);
        assert!(decode(&[0xff, 0xff, 0xff]).is_err());
    }
}

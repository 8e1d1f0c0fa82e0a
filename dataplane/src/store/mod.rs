//! The per-core object store: log-structured, checksummed, crash-safe, never starts
//! empty.
//!
//! One [`Shard`] per core owns a region of the device, its index and its queue pair; it
//! is driven by its reactor through [`Shard::poll`] and never blocks there.
//!
//! **Write path.** [`Shard::submit`] queues a [`Transaction`]. Staging takes the oldest
//! queued transaction, validates it against the latest state (all or nothing), reserves
//! log space for it (or fails it with `NoSpace` before anything changed), reads the old
//! content of partially written blocks, turns its operations into metadata
//! [`Delta`](delta::Delta)s plus whole data blocks with their crc32c, applies the deltas
//! to the in-memory index (blocks point at memory until durable) and assigns it the next
//! sequence number. Group commit packs the staged transactions into one batch (one
//! record per transaction: deltas, data blocks, crc32c), writes it with one device write
//! and one flush, and only then reports each transaction durable. At most one batch is in
//! flight, so on disk only the newest batch can ever be torn.
//!
//! **Reads** see committed state: a query that touches an object (or lists a collection)
//! with changes staged but not yet durable waits for them. Every block read is checked
//! against its crc32c; a mismatch is [`StoreError::Corrupt`] naming object and offset.
//!
//! **Recovery** ([`mount`]): superblock (two slots), checkpoint, then the journal after
//! it, stopping at a torn tail; corruption anywhere else stops the mount with the device,
//! structure and offset, after bounded retries. A mount never writes before it has read
//! everything; then it writes a new checkpoint so a torn tail is never continued. A
//! clean stop writes a checkpoint too ([`Shard::checkpoint_for_stop`]): the newest
//! batch, which on disk cannot be told from a torn one, is then behind the checkpoint,
//! so a block of it that rots while the store is stopped is a corrupt read (found by
//! scrub, repaired from a replica), not a tail cut off at the next mount with every
//! record after it. After a crash the newest batch stays ambiguous by nature.
//!
//! **Space.** The log fills segments; checkpoints of the index let the cleaner reclaim
//! segments entirely behind the checkpoint, choosing those with the least live data and
//! rewriting their live blocks. A reserve keeps room for the cleaner, checkpoints and
//! deletes.
//!
//! Threads: a shard belongs to one reactor thread. Faults tolerated: torn writes and lost
//! unflushed writes at power loss, read errors at mount (retried), corrupt blocks
//! (reported, never returned as data). A write or flush error stops the shard
//! ([`StoreError::Failed`]); restarting recovers from the device.

pub mod blocking;
mod checkpoint;
mod cleaner;
mod crc;
pub mod delta;
pub mod format;
mod fsck;
pub mod index;
mod mount;
mod query;
mod shard;
mod space;
mod stage;

pub use fsck::{FsckReport, ShardSummary, fsck};
pub use mount::{
    MkfsError, MkfsOptions, MountError, MountErrorKind, MountOptions, ReplayInfo, Structure, mkfs,
    read_device_superblock,
};
pub use shard::{OpenFailure, Shard, StoreConfig, StorePools, StoreStats};

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use sluice_nvme::{DmaBuf, IoError};

/// A collection: the objects of one placement group on this shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CollId(pub u64);

impl fmt::Display for CollId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "coll#{}", self.0)
    }
}

/// One mutation inside a transaction. Operations apply in order; later ones see earlier
/// ones' effects. Writes, `Touch`, `Truncate`, `Zero` and `SetXattr` create the object
/// if it does not exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxOp {
    CreateCollection {
        coll: CollId,
    },
    /// The collection must be empty.
    RemoveCollection {
        coll: CollId,
    },
    Touch {
        coll: CollId,
        name: String,
    },
    /// Replaces the whole content.
    WriteFull {
        coll: CollId,
        name: String,
        data: Vec<u8>,
    },
    /// Writes at `offset`, extending the object if needed (a gap reads as zeroes).
    Write {
        coll: CollId,
        name: String,
        offset: u64,
        data: Vec<u8>,
    },
    Truncate {
        coll: CollId,
        name: String,
        size: u64,
    },
    /// Zeroes a range inside the object (does not extend it).
    Zero {
        coll: CollId,
        name: String,
        offset: u64,
        len: u64,
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
    /// Drops log entries with keys up to and including `upto`.
    PgLogTrim {
        coll: CollId,
        upto: u64,
    },
}

/// A copy of `bytes` for a write op, with room to pad it to whole blocks: staging then
/// uses the buffer itself as the object's blocks (no copy per block, no reallocation).
pub fn txn_data(bytes: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(bytes.len().next_multiple_of(format::BS));
    v.extend_from_slice(bytes);
    v
}

/// Mutations applied atomically: after a crash either all of them are there or none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Transaction {
    pub ops: Vec<TxOp>,
}

impl Transaction {
    pub fn new() -> Transaction {
        Transaction::default()
    }

    pub fn push(mut self, op: TxOp) -> Transaction {
        self.ops.push(op);
        self
    }
}

/// A read-only request, answered with committed state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// Bytes `offset..offset+len`, clipped to the object's size.
    Read {
        coll: CollId,
        name: String,
        offset: u64,
        len: u64,
    },
    Stat {
        coll: CollId,
        name: String,
    },
    GetXattr {
        coll: CollId,
        name: String,
        key: String,
    },
    GetXattrs {
        coll: CollId,
        name: String,
    },
    /// Up to `max` object names after `after`, in name order.
    List {
        coll: CollId,
        after: Option<String>,
        max: usize,
    },
    ListCollections,
    /// PG log entries with keys greater than `after`.
    PgLog {
        coll: CollId,
        after: Option<u64>,
        max: usize,
    },
}

/// Size and version of an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectStat {
    pub size: u64,
    pub version: u64,
}

/// Bytes read from an object, in a DMA buffer (no copy from the device).
#[derive(Debug)]
pub struct ReadData {
    buf: DmaBuf,
    start: usize,
    len: usize,
}

impl ReadData {
    pub(crate) fn new(buf: DmaBuf, start: usize, len: usize) -> ReadData {
        assert!(start + len <= buf.len());
        ReadData { buf, start, len }
    }

    pub fn empty() -> ReadData {
        ReadData { buf: DmaBuf::new(0), start: 0, len: 0 }
    }

    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The answer to a [`Query`].
#[derive(Debug)]
pub enum Answer {
    Data(ReadData),
    Stat(ObjectStat),
    Xattr(Vec<u8>),
    Xattrs(BTreeMap<String, Vec<u8>>),
    List { names: Vec<String>, next: Option<String> },
    Collections(Vec<CollId>),
    PgLog(Vec<(u64, Vec<u8>)>),
}

/// What was not found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    Collection(CollId),
    Object(CollId, String),
    Xattr(CollId, String, String),
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Missing::Collection(c) => write!(f, "collection {c}"),
            Missing::Object(c, n) => write!(f, "object {n:?} in {c}"),
            Missing::Xattr(c, n, k) => write!(f, "xattr {k:?} of object {n:?} in {c}"),
        }
    }
}

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("not found: {0}")]
    NotFound(Missing),
    #[error("collection {0} already exists")]
    Exists(CollId),
    #[error("collection {0} is not empty")]
    NotEmpty(CollId),
    /// A block's content does not match its checksum.
    #[error("corrupt data: object {name:?} in {coll} at byte offset {offset}")]
    Corrupt { coll: CollId, name: String, offset: u64 },
    #[error("no space left in the store")]
    NoSpace,
    #[error("invalid request: {0}")]
    Invalid(&'static str),
    #[error("device error: {0}")]
    Io(IoError),
    /// The shard hit a device write or flush error and stopped; restart to recover.
    #[error("store shard failed after a device error ({0}); restart it to recover from disk")]
    Failed(IoError),
}

/// Something the shard finished.
#[derive(Debug)]
pub enum StoreEvent {
    /// A transaction is durable (`Ok(sequence number)`) or failed without effect.
    Txn {
        token: u64,
        result: Result<u64, StoreError>,
    },
    Query {
        token: u64,
        result: Result<Answer, StoreError>,
    },
}

//! Every fixed limit of Sluice, in one place, with the relations between them checked at
//! compile time.

/// Block size every Sluice device exposes. Backends whose media has smaller logical
/// blocks (512 B) are still driven in 4 KiB units; O_DIRECT and NVMe both accept that.
pub const BLOCK_SIZE_BYTES: usize = 4096;

/// Alignment of every DMA buffer: one block, which is also one x86 page (the PRP unit).
pub const DMA_ALIGN_BYTES: usize = 4096;

/// Largest single device command, in bytes. Bigger transfers are split by the caller.
pub const MAX_TRANSFER_BYTES: usize = 1 << 20;

/// Largest queue depth of one queue pair.
pub const MAX_QUEUE_DEPTH: usize = 4096;

/// Most reactor cores one process runs.
pub const MAX_CORES: usize = 256;

/// Longest object name.
pub const MAX_OBJECT_NAME_BYTES: usize = 1024;

/// Longest xattr key and value.
pub const MAX_XATTR_KEY_BYTES: usize = 256;
pub const MAX_XATTR_VALUE_BYTES: usize = 64 << 10;

/// Largest PG log entry the store accepts.
pub const MAX_PGLOG_ENTRY_BYTES: usize = 64 << 10;

/// Most data one transaction may write (a 4 MiB + 1 object fits with room to spare).
pub const MAX_TXN_DATA_BYTES: usize = 8 << 20;

/// Most operations in one transaction.
pub const MAX_TXN_OPS: usize = 1024;

/// Most store shards on one device.
pub const MAX_SHARDS: usize = 64;

/// Most parts one checkpoint may be split into (each fits in one segment).
pub const MAX_CHECKPOINT_PARTS: usize = 128;

/// Smallest segment (tests use small ones; a segment must hold a batch of the largest
/// transaction, which the store enforces per device).
pub const MIN_SEGMENT_BYTES: usize = 64 << 10;

const _: () = assert!(BLOCK_SIZE_BYTES.is_power_of_two());
const _: () = assert!(MIN_SEGMENT_BYTES.is_multiple_of(BLOCK_SIZE_BYTES));
const _: () = assert!(MAX_SHARDS <= MAX_CORES);
const _: () = assert!(DMA_ALIGN_BYTES >= BLOCK_SIZE_BYTES);
const _: () = assert!(DMA_ALIGN_BYTES.is_multiple_of(BLOCK_SIZE_BYTES));
const _: () = assert!(MAX_TRANSFER_BYTES.is_multiple_of(BLOCK_SIZE_BYTES));
// NVMe's command identifier is 16 bits: every in-flight command needs a distinct one.
const _: () = assert!(MAX_QUEUE_DEPTH <= u16::MAX as usize);
const _: () = assert!(MAX_CORES <= u16::MAX as usize);

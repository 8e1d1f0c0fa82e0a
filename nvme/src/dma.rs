//! DMA-able buffers: block-aligned memory that a device may read or write directly.
//!
//! A [`DmaBuf`] has one owner. It moves into a command at submit and comes back in the
//! completion, so a buffer can never be freed or reused while a device still writes it.
//! Buffers come from a [`DmaPool`] (one mapping made at startup, optionally from
//! hugepages, carved into equal slots; allocation pops a free-list entry, no lock) or,
//! off the hot path, from the heap ([`DmaBuf::new`]).
//!
//! ```text
//!   pool region (one mmap: one fixed buffer for io_uring, one IOMMU mapping for VFIO)
//!   +---------+---------+---------+---------+
//!   | slot 0  | slot 1  | slot 2  | slot 3  |   each slot: buf_size bytes, 4 KiB aligned
//!   +---------+---------+---------+---------+
//!   free list (lock-free queue of slot numbers): [2, 0, 3]   slot 1 is lent out
//! ```

use std::alloc::Layout;
use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_queue::ArrayQueue;
use sluice_vocab::limits::DMA_ALIGN_BYTES;

const HUGE_PAGE_BYTES: usize = 2 << 20;

/// An owned, 4 KiB-aligned buffer a device can transfer into or out of.
pub struct DmaBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    home: Home,
}

enum Home {
    Pool { pool: Arc<PoolInner>, slot: u32 },
    Heap { layout: Layout },
}

// SAFETY: a DmaBuf is the unique owner of its memory (a pool slot is handed to exactly one
// DmaBuf until it is dropped; a heap block belongs to its DmaBuf), so moving it to another
// thread moves that ownership; shared references only give out `&[u8]`.
unsafe impl Send for DmaBuf {}
// SAFETY: see above; `&DmaBuf` allows reads only.
unsafe impl Sync for DmaBuf {}

impl DmaBuf {
    /// A zeroed buffer of `len` bytes from the heap (capacity rounded up to 4 KiB).
    /// Use pools on hot paths.
    pub fn new(len: usize) -> DmaBuf {
        let cap = len.max(1).next_multiple_of(DMA_ALIGN_BYTES);
        let layout = Layout::from_size_align(cap, DMA_ALIGN_BYTES).expect("buffer layout");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { std::alloc::handle_alloc_error(layout) };
        DmaBuf { ptr, len, cap, home: Home::Heap { layout } }
    }

    /// A heap buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> DmaBuf {
        let mut b = DmaBuf::new(data.len());
        b.copy_from_slice(data);
        b
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Sets the length; new bytes (if growing) hold whatever the buffer held before.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "DmaBuf::set_len({len}) beyond capacity {}", self.cap);
        self.len = len;
    }

    /// The buffer's address in this process (what io_uring is given). A VFIO device
    /// reaches it at an IOVA its driver assigned (`pcie::NvmeDevice` translates).
    pub fn dma_addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The pool this buffer belongs to, if any: `(pool id, region start, region bytes)`.
    pub fn pool_region(&self) -> Option<(u64, *const u8, usize)> {
        match &self.home {
            Home::Pool { pool, .. } => Some((pool.id, pool.base.as_ptr(), pool.region_len)),
            Home::Heap { .. } => None,
        }
    }
}

impl std::ops::Deref for DmaBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len bytes and uniquely owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for DmaBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for cap >= len bytes and uniquely owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        match &self.home {
            Home::Pool { pool, slot } => {
                let pushed = pool.free.push(*slot);
                assert!(pushed.is_ok(), "DMA pool free list overflow: slot {slot} freed twice");
            }
            // SAFETY: allocated in `new` with exactly this layout.
            Home::Heap { layout } => unsafe { std::alloc::dealloc(self.ptr.as_ptr(), *layout) },
        }
    }
}

impl fmt::Debug for DmaBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaBuf")
            .field("addr", &format_args!("{:#x}", self.dma_addr()))
            .field("len", &self.len)
            .field("cap", &self.cap)
            .field("pooled", &matches!(self.home, Home::Pool { .. }))
            .finish()
    }
}

/// A fixed set of equal DMA buffers carved from one mapping. Cloning shares the pool.
#[derive(Clone)]
pub struct DmaPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    id: u64,
    base: NonNull<u8>,
    region_len: usize,
    buf_size: usize,
    count: usize,
    free: ArrayQueue<u32>,
    _map: memmap2::MmapMut,
}

// SAFETY: the region is only reached through DmaBufs, each owning one slot; the free list
// is a lock-free queue.
unsafe impl Send for PoolInner {}
// SAFETY: as above.
unsafe impl Sync for PoolInner {}

impl fmt::Debug for DmaPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaPool")
            .field("id", &self.inner.id)
            .field("buf_size", &self.inner.buf_size)
            .field("count", &self.inner.count)
            .field("free", &self.inner.free.len())
            .finish()
    }
}

/// How a pool's memory is mapped.
#[derive(Debug, Clone, Copy, Default)]
pub struct PoolOptions {
    /// Map 2 MiB hugepages (needs `vm.nr_hugepages`); required for VFIO DMA on bare metal.
    pub hugepages: bool,
}

static NEXT_POOL_ID: AtomicU64 = AtomicU64::new(1);

impl DmaPool {
    /// Maps `count` buffers of `buf_size` bytes (rounded up to 4 KiB).
    pub fn new(buf_size: usize, count: usize, opts: PoolOptions) -> std::io::Result<DmaPool> {
        if count == 0 || count > u32::MAX as usize {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("a pool of {count} buffers"),
            ));
        }
        let buf_size = buf_size.max(1).next_multiple_of(DMA_ALIGN_BYTES);
        let mut region_len = buf_size.checked_mul(count).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "pool size overflows")
        })?;
        let mut mo = memmap2::MmapOptions::new();
        if opts.hugepages {
            region_len = region_len.next_multiple_of(HUGE_PAGE_BYTES);
            mo.huge(Some(21));
        }
        mo.len(region_len);
        let mut map = mo.map_anon().map_err(|e| {
            if opts.hugepages {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot map {region_len} bytes of 2 MiB hugepages ({e}); \
                         reserve them with `echo N > /proc/sys/vm/nr_hugepages`"
                    ),
                )
            } else {
                e
            }
        })?;
        // A child of fork() must not share pages a device may be writing (copy-on-write
        // would leave the device writing the parent's old copy).
        let _ = map.advise(memmap2::Advice::DontFork);
        let base = NonNull::new(map.as_mut_ptr()).expect("mmap returned null");
        assert_eq!(base.as_ptr() as usize % DMA_ALIGN_BYTES, 0);
        let free = ArrayQueue::new(count);
        for slot in 0..count as u32 {
            free.push(slot).expect("fresh free list has room");
        }
        let id = NEXT_POOL_ID.fetch_add(1, Ordering::Relaxed);
        Ok(DmaPool {
            inner: Arc::new(PoolInner { id, base, region_len, buf_size, count, free, _map: map }),
        })
    }

    /// A free buffer with `len() == buf_size()`, or `None` when all are lent out (callers
    /// treat that as backpressure). Its contents are whatever the previous user left.
    pub fn alloc(&self) -> Option<DmaBuf> {
        let slot = self.inner.free.pop()?;
        let offset = slot as usize * self.inner.buf_size;
        // SAFETY: slot < count, so offset + buf_size <= region_len; the slot was on the
        // free list, so no other DmaBuf points into it.
        let ptr = unsafe { NonNull::new_unchecked(self.inner.base.as_ptr().add(offset)) };
        Some(DmaBuf {
            ptr,
            len: self.inner.buf_size,
            cap: self.inner.buf_size,
            home: Home::Pool { pool: Arc::clone(&self.inner), slot },
        })
    }

    pub fn buf_size(&self) -> usize {
        self.inner.buf_size
    }

    pub fn count(&self) -> usize {
        self.inner.count
    }

    pub fn available(&self) -> usize {
        self.inner.free.len()
    }

    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// The whole mapping, for registration with io_uring (fixed buffers) or an IOMMU.
    pub fn region(&self) -> (*mut u8, usize) {
        (self.inner.base.as_ptr(), self.inner.region_len)
    }

    /// Keeps the mapping alive for as long as the returned guard lives (a device that
    /// registered the region holds one).
    pub fn keepalive(&self) -> PoolKeepalive {
        PoolKeepalive { _inner: Arc::clone(&self.inner) }
    }
}

/// Holds a pool's mapping alive; see [`DmaPool::keepalive`].
pub struct PoolKeepalive {
    _inner: Arc<PoolInner>,
}

impl fmt::Debug for PoolKeepalive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PoolKeepalive")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_buffers_are_aligned_and_zeroed() {
        for len in [0, 1, 4095, 4096, 4097, 1 << 20] {
            let b = DmaBuf::new(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.dma_addr() % 4096, 0);
            assert!(b.capacity() >= len && b.capacity().is_multiple_of(4096));
            assert!(b.iter().all(|&x| x == 0));
        }
    }

    #[test]
    fn pool_lends_each_slot_once_and_takes_it_back() {
        let pool = DmaPool::new(8192, 4, PoolOptions::default()).unwrap();
        let mut bufs: Vec<_> = (0..4).map(|_| pool.alloc().unwrap()).collect();
        assert!(pool.alloc().is_none(), "exhausted pool must say so");
        let mut addrs: Vec<_> = bufs.iter().map(|b| b.dma_addr()).collect();
        addrs.sort();
        addrs.dedup();
        assert_eq!(addrs.len(), 4);
        for (i, b) in bufs.iter_mut().enumerate() {
            assert_eq!(b.len(), 8192);
            assert_eq!(b.dma_addr() % 4096, 0);
            b.fill(i as u8);
        }
        for (i, b) in bufs.iter().enumerate() {
            assert!(b.iter().all(|&x| x == i as u8), "slots must not overlap");
        }
        bufs.pop();
        assert_eq!(pool.available(), 1);
        assert!(pool.alloc().is_some());
    }

    #[test]
    fn pool_outlives_its_handle_while_buffers_live() {
        let pool = DmaPool::new(4096, 2, PoolOptions::default()).unwrap();
        let mut b = pool.alloc().unwrap();
        drop(pool);
        b.fill(7);
        assert_eq!(b[4095], 7);
    }

    #[test]
    fn buffers_cross_threads() {
        let pool = DmaPool::new(4096, 64, PoolOptions::default()).unwrap();
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let pool = pool.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u32 {
                        if let Some(mut b) = pool.alloc() {
                            b[0] = (t as u32 ^ i) as u8;
                            assert_eq!(b[0], (t as u32 ^ i) as u8);
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(pool.available(), 64);
    }
}

//! A bounded single-producer single-consumer ring: the only lock-free structure between
//! cores. Mailboxes are a mesh of these, one per (sender, receiver) pair, so no two
//! threads ever write the same index and order per sender is kept by construction.
//!
//! ```text
//!            head (consumer)          tail (producer)
//!               v                        v
//!   +---+---+---+---+---+---+---+---+---+---+---+---+
//!   |   |   |   | a | b | c | d | e |   |   |   |   |   capacity 12 (a power of two in
//!   +---+---+---+---+---+---+---+---+---+---+---+---+    practice), 5 messages queued
//! ```
//!
//! `head` and `tail` count forever (wrapping); a slot is `index & mask`. The producer
//! writes a slot, then publishes `tail` with Release; the consumer reads `tail` with
//! Acquire, takes the slot, then publishes `head` with Release so the producer may reuse
//! it. Each side caches the other's index and re-reads it only when it looks full/empty.

#![allow(unsafe_code)]

use std::mem::MaybeUninit;

use crate::sync::{Arc, AtomicUsize, Ordering, UnsafeCell};

#[repr(align(64))]
struct Padded(AtomicUsize);

struct Shared<T> {
    slots: Box<[UnsafeCell<MaybeUninit<T>>]>,
    mask: usize,
    head: Padded,
    tail: Padded,
}

// SAFETY: each slot is accessed by one side at a time, handed over by the Release/Acquire
// pairs on head and tail; T itself moves between threads, hence T: Send.
unsafe impl<T: Send> Sync for Shared<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for Shared<T> {}

impl<T> Drop for Shared<T> {
    fn drop(&mut self) {
        let head = self.head.0.load(Ordering::Relaxed);
        let tail = self.tail.0.load(Ordering::Relaxed);
        let mut i = head;
        while i != tail {
            // SAFETY: slots in head..tail were written by the producer and never taken.
            self.slots[i & self.mask].with_mut(|p| unsafe { (*p).assume_init_drop() });
            i = i.wrapping_add(1);
        }
    }
}

/// The sending end.
pub struct Producer<T> {
    shared: Arc<Shared<T>>,
    tail: usize,
    cached_head: usize,
}

/// The receiving end.
pub struct Consumer<T> {
    shared: Arc<Shared<T>>,
    head: usize,
    cached_tail: usize,
}

impl<T> std::fmt::Debug for Producer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer").field("tail", &self.tail).finish()
    }
}

impl<T> std::fmt::Debug for Consumer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer").field("head", &self.head).finish()
    }
}

/// A ring holding up to `capacity` messages (rounded up to a power of two).
pub fn ring<T: Send>(capacity: usize) -> (Producer<T>, Consumer<T>) {
    assert!(capacity > 0, "ring capacity must be positive");
    let cap = capacity.next_power_of_two();
    let slots = (0..cap).map(|_| UnsafeCell::new(MaybeUninit::uninit())).collect();
    let shared = Arc::new(Shared {
        slots,
        mask: cap - 1,
        head: Padded(AtomicUsize::new(0)),
        tail: Padded(AtomicUsize::new(0)),
    });
    (
        Producer { shared: Arc::clone(&shared), tail: 0, cached_head: 0 },
        Consumer { shared, head: 0, cached_tail: 0 },
    )
}

impl<T: Send> Producer<T> {
    pub fn capacity(&self) -> usize {
        self.shared.mask + 1
    }

    /// Appends `v`, or gives it back if the ring is full.
    pub fn push(&mut self, v: T) -> Result<(), T> {
        let cap = self.capacity();
        if self.tail.wrapping_sub(self.cached_head) == cap {
            self.cached_head = self.shared.head.0.load(Ordering::Acquire);
            if self.tail.wrapping_sub(self.cached_head) == cap {
                return Err(v);
            }
        }
        let slot = &self.shared.slots[self.tail & self.shared.mask];
        // SAFETY: the slot is outside head..tail, so the consumer does not touch it until
        // we publish the new tail below.
        slot.with_mut(|p| unsafe { (*p).write(v) });
        self.tail = self.tail.wrapping_add(1);
        self.shared.tail.0.store(self.tail, Ordering::Release);
        Ok(())
    }

    /// Free slots, as far as this side knows (may undercount).
    pub fn free_slots(&self) -> usize {
        self.capacity() - self.tail.wrapping_sub(self.cached_head)
    }
}

impl<T: Send> Consumer<T> {
    /// Takes the oldest message, if any.
    pub fn pop(&mut self) -> Option<T> {
        if self.head == self.cached_tail {
            self.cached_tail = self.shared.tail.0.load(Ordering::Acquire);
            if self.head == self.cached_tail {
                return None;
            }
        }
        let slot = &self.shared.slots[self.head & self.shared.mask];
        // SAFETY: the slot is inside head..tail: written and published by the producer,
        // not yet taken; we take it exactly once and then move head past it.
        let v = slot.with(|p| unsafe { (*p).assume_init_read() });
        self.head = self.head.wrapping_add(1);
        self.shared.head.0.store(self.head, Ordering::Release);
        Some(v)
    }

    /// Whether the ring looks empty (re-reads the producer's index).
    pub fn is_empty(&mut self) -> bool {
        if self.head != self.cached_tail {
            return false;
        }
        self.cached_tail = self.shared.tail.0.load(Ordering::Acquire);
        self.head == self.cached_tail
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn fifo_and_bounded() {
        let (mut p, mut c) = ring::<u32>(3);
        assert_eq!(p.capacity(), 4);
        for i in 0..4 {
            p.push(i).unwrap();
        }
        assert_eq!(p.push(9), Err(9));
        assert_eq!(c.pop(), Some(0));
        p.push(4).unwrap();
        assert_eq!((1..=4).map(|_| c.pop().unwrap()).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert_eq!(c.pop(), None);
        assert!(c.is_empty());
    }

    #[test]
    fn leftover_messages_are_dropped_with_the_ring() {
        let item = std::sync::Arc::new(());
        let (mut p, c) = ring(8);
        for _ in 0..5 {
            p.push(std::sync::Arc::clone(&item)).unwrap();
        }
        drop(p);
        drop(c);
        assert_eq!(std::sync::Arc::strong_count(&item), 1);
    }

    #[test]
    fn indexes_wrap_around_usize() {
        let (mut p, mut c) = ring::<usize>(4);
        // Start near the wrap point.
        p.tail = usize::MAX - 5;
        p.cached_head = usize::MAX - 5;
        c.head = usize::MAX - 5;
        c.cached_tail = usize::MAX - 5;
        p.shared.head.0.store(usize::MAX - 5, Ordering::Relaxed);
        p.shared.tail.0.store(usize::MAX - 5, Ordering::Relaxed);
        for i in 0..100 {
            p.push(i).unwrap();
            p.push(i + 1000).unwrap();
            assert_eq!(c.pop(), Some(i));
            assert_eq!(c.pop(), Some(i + 1000));
        }
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;

    #[test]
    fn loom_spsc_delivers_in_order_exactly_once() {
        loom::model(|| {
            let (mut p, mut c) = ring::<u32>(2);
            let t = loom::thread::spawn(move || {
                for i in 0..3 {
                    let mut v = i;
                    loop {
                        match p.push(v) {
                            Ok(()) => break,
                            Err(back) => {
                                v = back;
                                loom::thread::yield_now();
                            }
                        }
                    }
                }
            });
            let mut got = Vec::new();
            while got.len() < 3 {
                match c.pop() {
                    Some(v) => got.push(v),
                    None => loom::thread::yield_now(),
                }
            }
            t.join().unwrap();
            assert_eq!(got, vec![0, 1, 2]);
            assert!(c.pop().is_none());
        });
    }
}

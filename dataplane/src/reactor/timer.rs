//! One-shot timers owned by a reactor, delivered to the poller that set them.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};

use sluice_vocab::MonoTime;

/// Identifies a scheduled timer, for cancellation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TimerId(u64);

#[derive(Debug, Default)]
pub(crate) struct Timers {
    heap: BinaryHeap<Reverse<(MonoTime, u64, usize, u64)>>,
    cancelled: HashSet<u64>,
    next_id: u64,
}

impl Timers {
    pub(crate) fn schedule(&mut self, at: MonoTime, poller: usize, token: u64) -> TimerId {
        self.next_id += 1;
        self.heap.push(Reverse((at, self.next_id, poller, token)));
        TimerId(self.next_id)
    }

    pub(crate) fn cancel(&mut self, id: TimerId) {
        self.cancelled.insert(id.0);
    }

    /// The earliest pending deadline.
    pub(crate) fn next_deadline(&mut self) -> Option<MonoTime> {
        while let Some(Reverse((at, id, _, _))) = self.heap.peek() {
            if self.cancelled.remove(id) {
                self.heap.pop();
                continue;
            }
            return Some(*at);
        }
        None
    }

    /// Pops one timer due at `now`: `(poller, token)`.
    pub(crate) fn pop_due(&mut self, now: MonoTime) -> Option<(usize, u64)> {
        loop {
            let Reverse((at, id, poller, token)) = *self.heap.peek()?;
            if at > now {
                return None;
            }
            self.heap.pop();
            if !self.cancelled.remove(&id) {
                return Some((poller, token));
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.heap.len() - self.cancelled.len()
    }
}

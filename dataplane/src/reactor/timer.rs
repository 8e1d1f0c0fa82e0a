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
    /// Ids scheduled and neither fired nor cancelled. A heap entry whose id is not here
    /// is dead and skipped.
    live: HashSet<u64>,
    next_id: u64,
}

impl Timers {
    pub(crate) fn schedule(&mut self, at: MonoTime, poller: usize, token: u64) -> TimerId {
        self.next_id += 1;
        self.heap.push(Reverse((at, self.next_id, poller, token)));
        self.live.insert(self.next_id);
        TimerId(self.next_id)
    }

    /// Cancels a timer; a no-op if it already fired or was cancelled.
    pub(crate) fn cancel(&mut self, id: TimerId) {
        self.live.remove(&id.0);
    }

    /// The earliest pending deadline.
    pub(crate) fn next_deadline(&mut self) -> Option<MonoTime> {
        while let Some(Reverse((at, id, _, _))) = self.heap.peek() {
            if !self.live.contains(id) {
                self.heap.pop();
                continue;
            }
            return Some(*at);
        }
        None
    }

    /// Removes and returns every timer due at `now`, in deadline order. Timers the
    /// callbacks schedule meanwhile wait for the next pass, so a timer that reschedules
    /// itself at `now` cannot spin a pass forever.
    pub(crate) fn take_due(&mut self, now: MonoTime, out: &mut Vec<(usize, u64)>) {
        while let Some(Reverse((at, id, poller, token))) = self.heap.peek().copied() {
            if !self.live.contains(&id) {
                self.heap.pop();
                continue;
            }
            if at > now {
                return;
            }
            self.heap.pop();
            self.live.remove(&id);
            out.push((poller, token));
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.live.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_after_fire_is_harmless_and_len_is_exact() {
        let mut t = Timers::default();
        let a = t.schedule(MonoTime(10), 0, 1);
        let b = t.schedule(MonoTime(20), 0, 2);
        assert_eq!(t.len(), 2);
        let mut due = Vec::new();
        t.take_due(MonoTime(15), &mut due);
        assert_eq!(due, vec![(0, 1)]);
        t.cancel(a);
        t.cancel(a);
        assert_eq!(t.len(), 1);
        t.cancel(b);
        assert_eq!(t.len(), 0);
        assert_eq!(t.next_deadline(), None);
    }
}

//! Where a reactor's time goes. A polling core always looks 100% busy to `top`; these
//! counters say how much of it did work.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of one reactor's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReactorStats {
    /// Time in `run_once` passes that did work.
    pub busy_ns: u64,
    /// Time in passes that found nothing to do (spinning).
    pub idle_ns: u64,
    /// Time asleep in `epoll_wait`.
    pub parked_ns: u64,
    /// `run_once` passes.
    pub loops: u64,
    /// Times the reactor went to sleep.
    pub parks: u64,
}

impl ReactorStats {
    /// Share of awake time spent on work, in [0, 1].
    pub fn busy_share(&self) -> f64 {
        let awake = self.busy_ns + self.idle_ns;
        if awake == 0 { 0.0 } else { self.busy_ns as f64 / awake as f64 }
    }

    pub fn minus(&self, earlier: &ReactorStats) -> ReactorStats {
        ReactorStats {
            busy_ns: self.busy_ns - earlier.busy_ns,
            idle_ns: self.idle_ns - earlier.idle_ns,
            parked_ns: self.parked_ns - earlier.parked_ns,
            loops: self.loops - earlier.loops,
            parks: self.parks - earlier.parks,
        }
    }
}

/// Counters published by a reactor thread for other threads to read.
#[derive(Debug, Default)]
pub struct SharedStats {
    busy_ns: AtomicU64,
    idle_ns: AtomicU64,
    parked_ns: AtomicU64,
    loops: AtomicU64,
    parks: AtomicU64,
}

impl SharedStats {
    pub(crate) fn publish(&self, s: &ReactorStats) {
        self.busy_ns.store(s.busy_ns, Ordering::Relaxed);
        self.idle_ns.store(s.idle_ns, Ordering::Relaxed);
        self.parked_ns.store(s.parked_ns, Ordering::Relaxed);
        self.loops.store(s.loops, Ordering::Relaxed);
        self.parks.store(s.parks, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> ReactorStats {
        ReactorStats {
            busy_ns: self.busy_ns.load(Ordering::Relaxed),
            idle_ns: self.idle_ns.load(Ordering::Relaxed),
            parked_ns: self.parked_ns.load(Ordering::Relaxed),
            loops: self.loops.load(Ordering::Relaxed),
            parks: self.parks.load(Ordering::Relaxed),
        }
    }
}

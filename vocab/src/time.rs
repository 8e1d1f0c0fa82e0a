//! Monotonic time, as plain nanoseconds so tests can make it up.
//!
//! All nondeterminism enters Sluice through interfaces: reactors are driven by
//! `run_once(now)` and everything that needs the time takes a [`MonoTime`] or a
//! [`Clock`]. Production uses [`SystemClock`]; tests use [`ManualClock`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A point on a monotonic clock, in nanoseconds since that clock's origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MonoTime(pub u64);

impl MonoTime {
    pub const ZERO: MonoTime = MonoTime(0);

    pub fn as_nanos(self) -> u64 {
        self.0
    }

    pub fn saturating_sub(self, earlier: MonoTime) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    pub fn after(self, d: Duration) -> MonoTime {
        MonoTime(self.0.saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)))
    }
}

/// A source of monotonic time. Implementations are cheap to call from a poll loop.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> MonoTime;
}

/// The process's monotonic clock, origin at first use.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

fn origin() -> Instant {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

impl Clock for SystemClock {
    fn now(&self) -> MonoTime {
        MonoTime(u64::try_from(origin().elapsed().as_nanos()).unwrap_or(u64::MAX))
    }
}

/// A clock that moves only when told to. Clones share the same time.
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    pub fn new(start: MonoTime) -> Self {
        ManualClock(Arc::new(AtomicU64::new(start.0)))
    }

    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    pub fn set(&self, t: MonoTime) {
        let prev = self.0.swap(t.0, Ordering::SeqCst);
        assert!(prev <= t.0, "ManualClock must not go backwards ({prev} -> {})", t.0);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> MonoTime {
        MonoTime(self.0.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(MonoTime(5));
        assert_eq!(c.now(), MonoTime(5));
        let c2 = c.clone();
        c2.advance(Duration::from_nanos(10));
        assert_eq!(c.now(), MonoTime(15));
    }

    #[test]
    fn system_clock_is_monotonic() {
        let a = SystemClock.now();
        let b = SystemClock.now();
        assert!(b >= a);
    }
}

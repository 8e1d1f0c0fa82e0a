//! The reactor: one per core, a list of pollers driven by `run_once(now)`.
//!
//! Production runs a reactor in a pinned thread ([`spawn`]) that calls `run_once` in a
//! loop, spins for a configurable window after the last useful pass, then parks on
//! `epoll_wait` until an fd of a poller (device completions, sockets), its own eventfd
//! (mailbox messages, stop) or the next timer fires. [`PollMode::Dedicated`] never parks.
//! Tests call `run_once` directly with a fake clock, core by core in a chosen order.
//!
//! Pollers are not `Send`: they are built on the reactor's thread and reach other cores
//! only through mailboxes.

mod args;
mod stats;
mod thread;
mod timer;

pub use args::{CpuPlan, Placement, PollArgs, PollKind};
pub use stats::{ReactorStats, SharedStats};
pub use thread::{PollMode, ReactorConfig, ReactorHandle, spawn};
pub use timer::TimerId;

use std::os::fd::BorrowedFd;
use std::time::Duration;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use sluice_vocab::{CoreId, MonoTime};

use crate::park::{ParkState, Waker};
use crate::sync::Arc;
use timer::Timers;

/// What a poll pass achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollResult {
    /// Did something (reaped a completion, handled a message, sent bytes).
    Busy,
    /// Found nothing to do.
    Idle,
}

impl PollResult {
    pub fn or(self, other: PollResult) -> PollResult {
        if self == PollResult::Busy || other == PollResult::Busy {
            PollResult::Busy
        } else {
            PollResult::Idle
        }
    }

    pub fn busy_if(cond: bool) -> PollResult {
        if cond { PollResult::Busy } else { PollResult::Idle }
    }
}

/// One unit of work a reactor drives.
pub trait Poller {
    fn name(&self) -> &'static str;

    /// Does whatever work is ready, without blocking.
    fn poll(&mut self, cx: &mut Context<'_>) -> PollResult;

    /// A timer this poller scheduled with `token` fired.
    fn on_timer(&mut self, _token: u64, _cx: &mut Context<'_>) {}

    /// The reactor wants to sleep: arm notifications and return `true` if nothing is
    /// pending, else `false` (the reactor stays awake).
    ///
    /// A poller that owns an [`Inbox`](crate::Inbox), a device or any queue fed from
    /// elsewhere **must** override this and check it *after* the reactor announced
    /// parking (which is when this is called), or a message published in between is
    /// never noticed. The default suits pollers driven only by timers and their own fd.
    fn prepare_park(&mut self) -> bool {
        true
    }

    /// The reactor woke up: disarm notifications.
    fn after_park(&mut self) {}

    /// The reactor stops (its thread ends after this): finish what must not be lost
    /// or left ambiguous, blocking if need be.
    fn on_stop(&mut self) {}

    /// How many device commands this poller has in flight (completions will come). A
    /// parked reactor is woken through the kernel (tens of microseconds here), usually
    /// later than a device answers, so a reactor keeps polling for [`PollMode::Park`]'s
    /// `device_spin` while any of its pollers awaits the device, unless the queue is at
    /// least its `park_depth` deep.
    fn device_in_flight(&self) -> usize {
        0
    }

    /// An fd that becomes readable when this poller has work while the reactor sleeps.
    /// Asked once, when the poller is added.
    fn park_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

/// What a poller may use while it runs.
#[derive(Debug)]
pub struct Context<'a> {
    pub now: MonoTime,
    pub core: CoreId,
    timers: &'a mut Timers,
    poller: usize,
}

impl Context<'_> {
    /// Calls this poller's `on_timer(token)` at or after `at`.
    pub fn schedule_at(&mut self, at: MonoTime, token: u64) -> TimerId {
        self.timers.schedule(at, self.poller, token)
    }

    pub fn schedule_after(&mut self, d: Duration, token: u64) -> TimerId {
        self.schedule_at(self.now.after(d), token)
    }

    pub fn cancel(&mut self, id: TimerId) {
        self.timers.cancel(id);
    }
}

/// Identifies a poller within its reactor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollerId(pub usize);

/// A reactor. See the module documentation.
pub struct Reactor {
    core: CoreId,
    pollers: Vec<Box<dyn Poller>>,
    timers: Timers,
    /// Scratch list of timers due in this pass (kept to avoid allocating per pass).
    due: Vec<(usize, u64)>,
    park: Arc<ParkState>,
    epoll: Epoll,
    timerfd: TimerFd,
    stats: ReactorStats,
}

impl std::fmt::Debug for Reactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.pollers.iter().map(|p| p.name()).collect();
        f.debug_struct("Reactor").field("core", &self.core).field("pollers", &names).finish()
    }
}

const EV_WAKE: u64 = u64::MAX;
const EV_TIMER: u64 = u64::MAX - 1;

impl Reactor {
    /// A reactor for `core` that sleeps on `park` (create the park states first, so
    /// mailboxes can hold wakers for every core).
    pub fn new(core: CoreId, park: Arc<ParkState>) -> std::io::Result<Reactor> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let timerfd = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        epoll.add(park.fd(), EpollEvent::new(EpollFlags::EPOLLIN, EV_WAKE))?;
        epoll.add(&timerfd, EpollEvent::new(EpollFlags::EPOLLIN, EV_TIMER))?;
        Ok(Reactor {
            core,
            pollers: Vec::new(),
            timers: Timers::default(),
            due: Vec::new(),
            park,
            epoll,
            timerfd,
            stats: ReactorStats::default(),
        })
    }

    /// A reactor with its own park state (tests and single-core tools).
    pub fn standalone(core: CoreId) -> std::io::Result<Reactor> {
        Reactor::new(core, ParkState::new()?)
    }

    pub fn core(&self) -> CoreId {
        self.core
    }

    /// A handle that wakes this reactor from another thread.
    pub fn waker(&self) -> Waker {
        Waker::new(Arc::clone(&self.park))
    }

    pub fn add_poller(&mut self, p: Box<dyn Poller>) -> std::io::Result<PollerId> {
        let id = self.pollers.len();
        if let Some(fd) = p.park_fd() {
            // Pollers are never removed, so the registration lives as long as the fd.
            self.epoll.add(fd, EpollEvent::new(EpollFlags::EPOLLIN, id as u64))?;
        }
        self.pollers.push(p);
        Ok(PollerId(id))
    }

    /// Schedules a timer for poller `id` from outside a poll (setup code).
    pub fn schedule_at(&mut self, id: PollerId, at: MonoTime, token: u64) -> TimerId {
        self.timers.schedule(at, id.0, token)
    }

    /// One pass: fires due timers, then polls every poller once.
    pub fn run_once(&mut self, now: MonoTime) -> PollResult {
        let mut result = PollResult::Idle;
        let Reactor { core, pollers, timers, due, .. } = self;
        timers.take_due(now, due);
        for (poller, token) in due.drain(..) {
            let mut cx = Context { now, core: *core, timers, poller };
            pollers[poller].on_timer(token, &mut cx);
            result = PollResult::Busy;
        }
        for (i, p) in pollers.iter_mut().enumerate() {
            let mut cx = Context { now, core: *core, timers, poller: i };
            result = result.or(p.poll(&mut cx));
        }
        self.stats.loops += 1;
        result
    }

    /// The earliest timer deadline.
    pub fn next_deadline(&mut self) -> Option<MonoTime> {
        self.timers.next_deadline()
    }

    pub fn pending_timers(&self) -> usize {
        self.timers.len()
    }

    /// Device commands in flight over all pollers.
    pub fn device_in_flight(&self) -> usize {
        self.pollers.iter().map(|p| p.device_in_flight()).sum()
    }

    /// The reactor stops: every poller's [`Poller::on_stop`].
    pub fn stop_pollers(&mut self) {
        for p in &mut self.pollers {
            p.on_stop();
        }
    }

    /// Sleeps until a poller fd, the wake eventfd or the next timer fires, or `max_wait`
    /// passes. Returns `false` without sleeping if some poller has pending work.
    pub fn park(&mut self, now: MonoTime, max_wait: Option<Duration>) -> bool {
        self.park.flag().announce();
        let mut prepared = 0;
        let mut ok = true;
        for p in self.pollers.iter_mut() {
            prepared += 1;
            if !p.prepare_park() {
                ok = false;
                break;
            }
        }
        if ok {
            let until_timer = self.timers.next_deadline().map(|at| at.saturating_sub(now));
            let wait = match (until_timer, max_wait) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if wait == Some(Duration::ZERO) {
                ok = false;
            } else {
                self.sleep(wait);
            }
        }
        self.park.flag().clear();
        self.park.drain();
        for p in self.pollers.iter_mut().take(prepared) {
            p.after_park();
        }
        if ok {
            self.stats.parks += 1;
        }
        ok
    }

    fn sleep(&mut self, wait: Option<Duration>) {
        if let Some(d) = wait {
            let ts = TimeSpec::from_duration(d);
            if self.timerfd.set(Expiration::OneShot(ts), TimerSetTimeFlags::empty()).is_err() {
                return;
            }
        }
        let mut events = [EpollEvent::empty(); 8];
        // EINTR (io_uring task work, signals) is just an early wakeup.
        let _ = self.epoll.wait(&mut events, EpollTimeout::NONE);
        if wait.is_some() {
            let _ = self.timerfd.unset();
            let _ = self.timerfd.wait_nonblocking();
        }
    }

    pub(crate) fn stats_mut(&mut self) -> &mut ReactorStats {
        &mut self.stats
    }

    pub fn stats(&self) -> ReactorStats {
        self.stats
    }
}

trait TimerFdExt {
    fn wait_nonblocking(&self) -> nix::Result<()>;
}

impl TimerFdExt for TimerFd {
    fn wait_nonblocking(&self) -> nix::Result<()> {
        use std::os::fd::{AsFd, AsRawFd};
        // Reading a non-blocking timerfd consumes its expiration count (EAGAIN if none).
        let mut buf = [0u8; 8];
        nix::unistd::read(self.as_fd().as_raw_fd(), &mut buf).map(|_| ())
    }
}

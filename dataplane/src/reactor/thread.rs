//! Running a reactor on its own pinned thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use sluice_vocab::{Clock, CoreId, SystemClock};

use super::{PollResult, Reactor, ReactorStats, SharedStats};
use crate::park::{ParkState, Waker};
use crate::sync::Arc;

/// How a reactor thread behaves when it has nothing to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollMode {
    /// Keep polling for `spin` after the last useful pass (for `device_spin` while a
    /// poller waits for the device), then sleep until woken. The default: it gives the
    /// CPU back when idle and keeps latency low under load.
    ///
    /// With `park_depth` (> 0) or more device commands in flight an idle reactor sleeps
    /// at once: the device stays busy with the others and the next completion wakes it,
    /// so a spin buys no throughput and only takes the CPU from the clients and the
    /// kernel work (interrupts, loopback TCP) that share the machine.
    Park { spin: Duration, device_spin: Duration, park_depth: usize },
    /// Never sleep: for cores dedicated to Sluice (lowest latency, one CPU always busy).
    Dedicated,
}

impl PollMode {
    /// The default spin window. Measured with `sluice-bench reactor` (see
    /// docs/benchmarks.md): waking a parked reactor on the other CPU costs tens of
    /// microseconds here, so a window that covers typical gaps between requests (device
    /// completions, a client's next request) avoids most of those wakeups.
    pub const DEFAULT_SPIN: Duration = Duration::from_micros(200);

    /// The default spin window while device I/O is in flight. A write and its flush on a
    /// file-backed device take ~50-300 us here, and every park in that window adds a
    /// wakeup (~40-60 us) to the op's latency: measured with `sluice-bench objects
    /// --qd 1` (docs/benchmarks.md), QD1 write latency fell from ~330 us to ~210 us.
    /// Bounded, so a hung device does not keep a core busy.
    pub const DEFAULT_DEVICE_SPIN: Duration = Duration::from_millis(1);

    /// The default device queue depth at which an idle reactor stops spinning. Measured
    /// with `sluice-bench objects` against one OSD here (docs/benchmarks.md, session 5):
    /// 4 KiB QD32 random reads keep ~32 reads at the device, and parking between them
    /// instead of spinning cut OSD CPU per read from ~16 us to ~7 us at the same or
    /// higher IOPS; writes are batched (a few device commands in flight) and QD1 has
    /// one, so both still spin.
    pub const DEFAULT_PARK_DEPTH: usize = 8;

    /// Parking with the same window whether or not the device is busy.
    pub fn park(spin: Duration) -> PollMode {
        PollMode::Park { spin, device_spin: spin, park_depth: 0 }
    }
}

impl Default for PollMode {
    fn default() -> Self {
        PollMode::Park {
            spin: PollMode::DEFAULT_SPIN,
            device_spin: PollMode::DEFAULT_DEVICE_SPIN,
            park_depth: PollMode::DEFAULT_PARK_DEPTH,
        }
    }
}

/// Where and how to run a reactor thread.
#[derive(Debug, Clone)]
pub struct ReactorConfig {
    pub core: CoreId,
    /// The CPU to pin to; `None` leaves scheduling to the kernel.
    pub cpu: Option<usize>,
    pub mode: PollMode,
}

/// Controls a running reactor thread.
#[derive(Debug)]
pub struct ReactorHandle {
    waker: Waker,
    stop: Arc<AtomicBool>,
    stats: Arc<SharedStats>,
    join: Option<JoinHandle<std::io::Result<()>>>,
}

/// How often a running reactor publishes its counters.
const PUBLISH_EVERY_LOOPS: u64 = 1024;

/// Starts a reactor thread. `setup` runs on the new thread (pollers are built there,
/// since they are not `Send`) and adds pollers to the reactor. `park` is the reactor's
/// parking state, created beforehand so mailboxes can wake it.
pub fn spawn<F>(
    cfg: ReactorConfig,
    park: Arc<ParkState>,
    setup: F,
) -> std::io::Result<ReactorHandle>
where
    F: FnOnce(&mut Reactor) -> std::io::Result<()> + Send + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(SharedStats::default());
    let waker = Waker::new(Arc::clone(&park));
    let (stop2, stats2) = (Arc::clone(&stop), Arc::clone(&stats));
    let join =
        std::thread::Builder::new().name(format!("reactor-{}", cfg.core.0)).spawn(move || {
            if let Some(cpu) = cfg.cpu {
                pin_to_cpu(cpu)?;
            }
            let mut reactor = Reactor::new(cfg.core, park)?;
            setup(&mut reactor)?;
            run(&mut reactor, cfg.mode, &stop2, &stats2);
            Ok(())
        })?;
    Ok(ReactorHandle { waker, stop, stats, join: Some(join) })
}

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> std::io::Result<()> {
    use nix::sched::{CpuSet, sched_setaffinity};
    let mut set = CpuSet::new();
    set.set(cpu).map_err(|e| std::io::Error::other(format!("cpu {cpu}: {e}")))?;
    sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .map_err(|e| std::io::Error::other(format!("cannot pin to cpu {cpu}: {e}")))
}

fn run(reactor: &mut Reactor, mode: PollMode, stop: &AtomicBool, shared: &SharedStats) {
    let clock = SystemClock;
    let mut now = clock.now();
    let mut last_busy = now;
    while !stop.load(Ordering::Acquire) {
        let r = reactor.run_once(now);
        let after = clock.now();
        let spent = after.as_nanos() - now.as_nanos();
        let stats = reactor.stats_mut();
        match r {
            PollResult::Busy => {
                stats.busy_ns += spent;
                last_busy = after;
            }
            PollResult::Idle => stats.idle_ns += spent,
        }
        if stats.loops.is_multiple_of(PUBLISH_EVERY_LOOPS) {
            shared.publish(stats);
        }
        now = after;
        if r == PollResult::Busy {
            continue;
        }
        match mode {
            PollMode::Dedicated => std::hint::spin_loop(),
            PollMode::Park { spin, device_spin, park_depth } => {
                let idle = after.saturating_sub(last_busy);
                let in_flight = reactor.device_in_flight();
                let deep = park_depth > 0 && in_flight >= park_depth;
                if !deep && (idle < spin || (idle < device_spin && in_flight > 0)) {
                    std::hint::spin_loop();
                    continue;
                }
                shared.publish(reactor.stats_mut());
                if stop.load(Ordering::Acquire) {
                    break;
                }
                if reactor.park(now, None) {
                    let woke = clock.now();
                    reactor.stats_mut().parked_ns += woke.as_nanos() - now.as_nanos();
                    now = woke;
                    last_busy = woke;
                } else {
                    now = clock.now();
                }
            }
        }
    }
    reactor.stop_pollers();
    shared.publish(reactor.stats_mut());
}

impl ReactorHandle {
    pub fn waker(&self) -> &Waker {
        &self.waker
    }

    /// The reactor's counters as last published (every ~1000 passes and before parking).
    pub fn stats(&self) -> ReactorStats {
        self.stats.snapshot()
    }

    /// Asks the reactor to stop after its current pass.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.waker.wake_always();
    }

    /// Stops the reactor and waits for its thread; returns its setup error, if any.
    pub fn stop(mut self) -> std::io::Result<ReactorStats> {
        self.request_stop();
        self.join_inner()?;
        Ok(self.stats.snapshot())
    }

    fn join_inner(&mut self) -> std::io::Result<()> {
        match self.join.take() {
            Some(j) => j.join().map_err(|_| std::io::Error::other("reactor thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for ReactorHandle {
    fn drop(&mut self) {
        if self.join.is_some() {
            self.request_stop();
            let _ = self.join_inner();
        }
    }
}

//! Reactors driven deterministically (one thread, fake clock, chosen order) and on real
//! pinned threads (parking, waking, timers, device completions).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_dataplane::park::ParkState;
use sluice_dataplane::reactor::{self, PollMode, ReactorConfig};
use sluice_dataplane::{Context, Inbox, Outbox, PollResult, Poller, Reactor, mesh};
use sluice_nvme::{BlockDevice, DmaBuf, IoCommand, UringDevice, UringOptions};
use sluice_vocab::{BlockCount, CoreId, Lba, MonoTime};

/// A poller that forwards every message it gets to the next core until its hop count
/// runs out, and logs what it saw.
struct Relay {
    inbox: Inbox<(u32, u32)>,
    outbox: Outbox<(u32, u32)>,
    log: Rc<RefCell<Vec<(u16, u32, u32)>>>,
}

impl Poller for Relay {
    fn name(&self) -> &'static str {
        "relay"
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> PollResult {
        let mut got = Vec::new();
        self.inbox.drain(16, |m| got.push(m));
        for &(id, hops) in &got {
            self.log.borrow_mut().push((cx.core.0, id, hops));
            if hops > 0 {
                let next = CoreId(((cx.core.0 as usize + 1) % self.outbox.cores()) as u16);
                self.outbox.send(next, (id, hops - 1)).expect("room");
            }
        }
        PollResult::busy_if(!got.is_empty())
    }

    fn prepare_park(&mut self) -> bool {
        self.inbox.is_empty()
    }
}

#[test]
fn reactors_driven_in_a_chosen_order_are_deterministic() {
    let run = || {
        let parks: Vec<_> = (0..3).map(|_| ParkState::new().unwrap()).collect();
        let mut reactors: Vec<Reactor> = parks
            .iter()
            .enumerate()
            .map(|(i, p)| Reactor::new(CoreId(i as u16), Arc::clone(p)).unwrap())
            .collect();
        let wakers = reactors.iter().map(|r| r.waker()).collect();
        let (mut outs, ins) = mesh::<(u32, u32)>(wakers, 1, 64);
        let mut external = outs.pop().unwrap();
        let log = Rc::new(RefCell::new(Vec::new()));
        for ((r, inbox), outbox) in reactors.iter_mut().zip(ins).zip(outs) {
            r.add_poller(Box::new(Relay { inbox, outbox, log: Rc::clone(&log) })).unwrap();
        }
        for id in 0..5 {
            external.send(CoreId(id % 3), (u32::from(id), 4)).unwrap();
        }
        let mut now = MonoTime(0);
        // Drive core 2, then 0, then 1, repeatedly.
        for _ in 0..10 {
            for c in [2usize, 0, 1] {
                reactors[c].run_once(now);
                now = MonoTime(now.0 + 1000);
            }
        }

        log.borrow().clone()
    };
    let a = run();
    assert_eq!(a.len(), 25, "5 messages, each seen on 5 hops");
    assert_eq!(a, run(), "same order of calls, same history");
    // Core 2 runs first: it handles the external messages sent to it before anyone else.
    assert_eq!(a[0], (2, 2, 4));
}

struct TimerLog {
    fired: Rc<RefCell<Vec<(u64, MonoTime)>>>,
    schedule: Vec<(Duration, u64)>,
    cancel_token: Option<u64>,
}

impl Poller for TimerLog {
    fn name(&self) -> &'static str {
        "timers"
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> PollResult {
        let mut ids = HashMap::new();
        for (d, token) in self.schedule.drain(..) {
            ids.insert(token, cx.schedule_after(d, token));
        }
        if let Some(t) = self.cancel_token.take() {
            cx.cancel(ids[&t]);
        }
        PollResult::Idle
    }

    fn on_timer(&mut self, token: u64, cx: &mut Context<'_>) {
        self.fired.borrow_mut().push((token, cx.now));
    }
}

#[test]
fn timers_fire_in_deadline_order_on_the_fake_clock_and_can_be_cancelled() {
    let mut r = Reactor::standalone(CoreId(0)).unwrap();
    let fired = Rc::new(RefCell::new(Vec::new()));
    r.add_poller(Box::new(TimerLog {
        fired: Rc::clone(&fired),
        schedule: vec![
            (Duration::from_micros(30), 3),
            (Duration::from_micros(10), 1),
            (Duration::from_micros(20), 2),
        ],
        cancel_token: Some(2),
    }))
    .unwrap();
    r.run_once(MonoTime(0));
    assert_eq!(r.next_deadline(), Some(MonoTime(10_000)));
    assert_eq!(r.run_once(MonoTime(9_999)), PollResult::Idle);
    assert!(fired.borrow().is_empty());
    assert_eq!(r.run_once(MonoTime(25_000)), PollResult::Busy);
    assert_eq!(r.run_once(MonoTime(30_000)), PollResult::Busy);
    assert_eq!(*fired.borrow(), vec![(1, MonoTime(25_000)), (3, MonoTime(30_000))]);
    assert_eq!(r.pending_timers(), 0);
}

/// Counts messages per sender and checks their order.
struct Checker {
    inbox: Inbox<(u32, u64)>,
    next: Vec<u64>,
    total: Arc<AtomicU64>,
}

impl Poller for Checker {
    fn name(&self) -> &'static str {
        "checker"
    }

    fn poll(&mut self, _cx: &mut Context<'_>) -> PollResult {
        let mut n = 0;
        let next = &mut self.next;
        self.inbox.drain(256, |(sender, seq)| {
            let want = &mut next[sender as usize];
            assert_eq!(seq, *want, "sender {sender}: message lost, duplicated or reordered");
            *want += 1;
            n += 1;
        });
        self.total.fetch_add(n, Ordering::Relaxed);
        PollResult::busy_if(n > 0)
    }

    fn prepare_park(&mut self) -> bool {
        self.inbox.is_empty()
    }
}

/// Millions of messages from four threads to two parking reactors: none lost, none
/// duplicated, order kept per sender. Full rings push back; senders retry.
#[test]
fn mailboxes_under_contention_lose_and_reorder_nothing() {
    const PER_SENDER_PER_CORE: u64 = 500_000;
    const SENDERS: usize = 4;
    let parks: Vec<_> = (0..2).map(|_| ParkState::new().unwrap()).collect();
    let wakers = parks.iter().map(|p| sluice_dataplane::Waker::new(Arc::clone(p))).collect();
    let (outs, ins) = mesh::<(u32, u64)>(wakers, SENDERS - 2, 256);
    let totals: Vec<_> = (0..2).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let mut handles = Vec::new();
    for (i, (inbox, park)) in ins.into_iter().zip(parks).enumerate() {
        let total = Arc::clone(&totals[i]);
        let cfg = ReactorConfig {
            core: CoreId(i as u16),
            cpu: Some(i % 2),
            mode: PollMode::park(Duration::from_micros(20)),
        };
        handles.push(
            reactor::spawn(cfg, park, move |r| {
                r.add_poller(Box::new(Checker { inbox, next: vec![0; SENDERS], total }))?;
                Ok(())
            })
            .unwrap(),
        );
    }
    let senders: Vec<_> = outs
        .into_iter()
        .map(|mut out| {
            std::thread::spawn(move || {
                let id = out.sender_id() as u32;
                for seq in 0..PER_SENDER_PER_CORE {
                    for core in 0..2u16 {
                        let mut msg = (id, seq);
                        let mut spins = 0u32;
                        while let Err(sluice_dataplane::Full(back)) = out.send(CoreId(core), msg) {
                            msg = back;
                            spins += 1;
                            if spins.is_multiple_of(64) {
                                std::thread::yield_now();
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    let want = PER_SENDER_PER_CORE * SENDERS as u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while totals.iter().any(|t| t.load(Ordering::Relaxed) < want) {
        assert!(Instant::now() < deadline, "messages missing: {:?}", totals);
        std::thread::sleep(Duration::from_millis(5));
    }
    for h in handles {
        h.stop().unwrap();
    }
    for t in &totals {
        assert_eq!(t.load(Ordering::Relaxed), want);
    }
}

struct Inboxed {
    inbox: Inbox<u64>,
    got: Arc<Mutex<Vec<u64>>>,
}

impl Poller for Inboxed {
    fn name(&self) -> &'static str {
        "inboxed"
    }

    fn poll(&mut self, _cx: &mut Context<'_>) -> PollResult {
        let mut n = 0;
        let got = &self.got;
        self.inbox.drain(64, |m| {
            got.lock().unwrap().push(m);
            n += 1;
        });
        PollResult::busy_if(n > 0)
    }

    fn prepare_park(&mut self) -> bool {
        self.inbox.is_empty()
    }
}

#[test]
fn a_parked_reactor_wakes_for_every_message() {
    let park = ParkState::new().unwrap();
    let (mut outs, mut ins) =
        mesh::<u64>(vec![sluice_dataplane::Waker::new(Arc::clone(&park))], 1, 8);
    let got = Arc::new(Mutex::new(Vec::new()));
    let got2 = Arc::clone(&got);
    let inbox = ins.pop().unwrap();
    let cfg = ReactorConfig { core: CoreId(0), cpu: None, mode: PollMode::park(Duration::ZERO) };
    let h = reactor::spawn(cfg, park, move |r| {
        r.add_poller(Box::new(Inboxed { inbox, got: got2 }))?;
        Ok(())
    })
    .unwrap();
    let mut out = outs.pop().unwrap();
    for i in 0..50 {
        // Give the reactor time to fall asleep before each message.
        std::thread::sleep(Duration::from_millis(2));
        out.send(CoreId(0), i).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.lock().unwrap().len() <= i as usize {
            assert!(Instant::now() < deadline, "message {i} never handled: lost wakeup");
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    let stats = h.stop().unwrap();
    assert_eq!(*got.lock().unwrap(), (0..50).collect::<Vec<_>>());
    assert!(stats.parks >= 10, "the reactor should have slept between messages: {stats:?}");
    assert!(stats.parked_ns > 0);
}

#[test]
fn a_dedicated_reactor_never_parks() {
    let park = ParkState::new().unwrap();
    let (mut outs, mut ins) =
        mesh::<u64>(vec![sluice_dataplane::Waker::new(Arc::clone(&park))], 1, 8);
    let got = Arc::new(Mutex::new(Vec::new()));
    let got2 = Arc::clone(&got);
    let inbox = ins.pop().unwrap();
    let cfg = ReactorConfig { core: CoreId(0), cpu: None, mode: PollMode::Dedicated };
    let h = reactor::spawn(cfg, park, move |r| {
        r.add_poller(Box::new(Inboxed { inbox, got: got2 }))?;
        Ok(())
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    outs[0].send(CoreId(0), 7).unwrap();
    while got.lock().unwrap().is_empty() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let stats = h.stop().unwrap();
    assert_eq!(stats.parks, 0);
    assert!(stats.idle_ns > 0 && stats.loops > 100);
}

/// A device poller: keeps a flush in flight and counts completions. The flush
/// (fdatasync) takes long enough that a spin-less reactor parks while it runs, so the
/// io_uring eventfd must wake it.
struct Flusher {
    dev: UringDevice,
    done: Arc<AtomicU64>,
    left: u64,
}

impl Poller for Flusher {
    fn name(&self) -> &'static str {
        "flusher"
    }

    fn poll(&mut self, _cx: &mut Context<'_>) -> PollResult {
        let mut n = 0;
        self.dev.poll(8, &mut |c| {
            c.result.expect("flush");
            n += 1;
        });
        self.done.fetch_add(n, Ordering::Relaxed);
        if self.dev.in_flight() == 0 && self.left > 0 {
            self.left -= 1;
            // A write then a flush, so the flush has work to do.
            self.dev
                .submit(
                    IoCommand::Write { lba: Lba(self.left), blocks: BlockCount(1), fua: false },
                    Some(DmaBuf::new(4096)),
                    0,
                )
                .unwrap();
            self.dev.kick().unwrap();
            n += 1;
        } else if self.dev.in_flight() == 0 {
            return PollResult::busy_if(n > 0);
        }
        PollResult::busy_if(n > 0)
    }

    fn prepare_park(&mut self) -> bool {
        self.dev.prepare_park()
    }

    fn after_park(&mut self) {
        self.dev.after_park()
    }

    fn park_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.dev.park_fd()
    }
}

#[test]
fn a_parked_reactor_wakes_for_device_completions_and_timers() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("dev");
    sluice_nvme::create_device_file(&path, 1 << 20).unwrap();
    let dev =
        UringDevice::open(&path, UringOptions { queue_depth: 4, ..Default::default() }).unwrap();
    let done = Arc::new(AtomicU64::new(0));
    let done2 = Arc::clone(&done);
    let park = ParkState::new().unwrap();
    let cfg = ReactorConfig { core: CoreId(0), cpu: None, mode: PollMode::park(Duration::ZERO) };
    let h = reactor::spawn(cfg, park, move |r| {
        r.add_poller(Box::new(Flusher { dev, done: done2, left: 30 }))?;
        Ok(())
    })
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while done.load(Ordering::Relaxed) < 30 {
        assert!(
            Instant::now() < deadline,
            "device completions lost while parked: {}",
            done.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let stats = h.stop().unwrap();
    assert!(stats.parks > 0, "{stats:?}");

    // A timer alone wakes a parked reactor.
    let park = ParkState::new().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let hits2 = Arc::clone(&hits);
    let cfg = ReactorConfig { core: CoreId(0), cpu: None, mode: PollMode::park(Duration::ZERO) };
    let h = reactor::spawn(cfg, park, move |r| {
        struct Tick(Arc<AtomicU64>, bool);
        impl Poller for Tick {
            fn name(&self) -> &'static str {
                "tick"
            }
            fn poll(&mut self, cx: &mut Context<'_>) -> PollResult {
                if !self.1 {
                    self.1 = true;
                    cx.schedule_after(Duration::from_millis(5), 1);
                }
                PollResult::Idle
            }
            fn on_timer(&mut self, _t: u64, cx: &mut Context<'_>) {
                if self.0.fetch_add(1, Ordering::Relaxed) < 9 {
                    cx.schedule_after(Duration::from_millis(5), 1);
                }
            }
        }
        r.add_poller(Box::new(Tick(hits2, false)))?;
        Ok(())
    })
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while hits.load(Ordering::Relaxed) < 10 {
        assert!(Instant::now() < deadline, "timer never woke the reactor");
        std::thread::sleep(Duration::from_millis(2));
    }
    let stats = h.stop().unwrap();
    assert!(stats.parks >= 5, "{stats:?}");
}

#[test]
fn pinning_to_an_existing_cpu_works_and_a_missing_one_is_an_error() {
    let cfg = ReactorConfig { core: CoreId(0), cpu: Some(0), mode: PollMode::default() };
    let h = reactor::spawn(cfg, ParkState::new().unwrap(), |_| Ok(())).unwrap();
    h.stop().unwrap();
    let cfg = ReactorConfig { core: CoreId(0), cpu: Some(1000), mode: PollMode::default() };
    let h = reactor::spawn(cfg, ParkState::new().unwrap(), |_| Ok(())).unwrap();
    let e = h.stop().unwrap_err();
    assert!(e.to_string().contains("1000"), "{e}");
}

/// Finds nothing to do, but says how many device commands are in flight.
struct DeviceWaiter {
    in_flight: Arc<AtomicUsize>,
    polls: Arc<AtomicU64>,
}

impl Poller for DeviceWaiter {
    fn name(&self) -> &'static str {
        "device-waiter"
    }

    fn poll(&mut self, _cx: &mut Context<'_>) -> PollResult {
        self.polls.fetch_add(1, Ordering::Relaxed);
        PollResult::Idle
    }

    fn device_in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// A reactor with one [`DeviceWaiter`]: no spin when idle, an hour while the device is
/// busy, parking at once from `park_depth` commands in flight.
fn device_waiter(
    in_flight: usize,
    park_depth: usize,
) -> (reactor::ReactorHandle, Arc<AtomicUsize>, Arc<AtomicU64>) {
    let in_flight = Arc::new(AtomicUsize::new(in_flight));
    let polls = Arc::new(AtomicU64::new(0));
    let (a2, p2) = (Arc::clone(&in_flight), Arc::clone(&polls));
    let mode =
        PollMode::Park { spin: Duration::ZERO, device_spin: Duration::from_secs(3600), park_depth };
    let cfg = ReactorConfig { core: CoreId(0), cpu: None, mode };
    let h = reactor::spawn(cfg, ParkState::new().unwrap(), move |r| {
        r.add_poller(Box::new(DeviceWaiter { in_flight: a2, polls: p2 }))?;
        Ok(())
    })
    .unwrap();
    (h, in_flight, polls)
}

/// Waits until `polls` stops moving (the reactor parked: it counts the park only when
/// it wakes, so watch the polls).
fn wait_until_parked(polls: &AtomicU64, deadline: Instant) {
    let mut last = polls.load(Ordering::Relaxed);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = polls.load(Ordering::Relaxed);
        if now == last {
            return;
        }
        assert!(Instant::now() < deadline, "never parked");
        last = now;
    }
}

#[test]
fn a_reactor_keeps_polling_while_the_device_is_busy_and_parks_after() {
    // Below the park depth: nothing but the device spin can keep it polling (it has no
    // fd and no timer, so a parked reactor would sleep until stopped).
    let (h, in_flight, polls) = device_waiter(3, 4);
    let deadline = Instant::now() + Duration::from_secs(60);
    while polls.load(Ordering::Relaxed) < 200_000 {
        assert!(Instant::now() < deadline, "stopped polling with device I/O in flight");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(h.stats().parks, 0, "parked with device I/O in flight");
    in_flight.store(0, Ordering::Relaxed);
    // With no spin window it parks on its next idle pass and stops polling.
    wait_until_parked(&polls, deadline);
    let stats = h.stop().unwrap();
    assert_eq!(stats.parks, 1, "one park (woken only to stop): {stats:?}");
}

#[test]
fn a_reactor_parks_at_once_when_the_device_queue_is_deep() {
    // Four commands in flight with a park depth of four: it must sleep despite the
    // hour-long device spin (a completion would wake it).
    let (h, _in_flight, polls) = device_waiter(4, 4);
    wait_until_parked(&polls, Instant::now() + Duration::from_secs(60));
    let before = polls.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(polls.load(Ordering::Relaxed), before, "polled while parked");
    let stats = h.stop().unwrap();
    assert_eq!(stats.parks, 1, "one park (woken only to stop): {stats:?}");
    // A depth of 0 turns the rule off: the same queue keeps it spinning.
    let (h, _in_flight, polls) = device_waiter(4, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while polls.load(Ordering::Relaxed) < 200_000 {
        assert!(Instant::now() < deadline, "stopped polling with park depth 0");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(h.stop().unwrap().parks, 0, "parked with park depth 0");
}

//! Parking a reactor without losing wakeups.
//!
//! A reactor that found no work for a while sleeps in `epoll_wait`. Another core that
//! hands it a message must wake it, but only if it is asleep: an eventfd write costs a
//! syscall, and on these machines waking a sleeping thread on another CPU costs tens of
//! microseconds, so senders skip it whenever they can.
//!
//! The protocol (a Dekker-style handshake on two locations, the ring index and the flag):
//!
//! ```text
//!   receiver                              sender
//!   parked = true                         publish message (ring tail, Release)
//!   fence(SeqCst)                         fence(SeqCst)
//!   look at every ring again              if parked: parked = false, write eventfd
//!   empty? epoll_wait on the eventfd
//!   parked = false
//! ```
//!
//! With both fences, at least one side sees the other's write: either the receiver sees
//! the message and does not sleep, or the sender sees `parked` and writes the eventfd.
//! `loom_park_never_loses_a_wakeup` checks this exhaustively.

use nix::sys::eventfd::{EfdFlags, EventFd};
use std::os::fd::{AsFd, BorrowedFd};

use crate::sync::{Arc, AtomicBool, Ordering, fence};

/// The "I am about to sleep" flag.
#[derive(Debug, Default)]
pub struct ParkFlag {
    parked: AtomicBool,
}

impl ParkFlag {
    /// Receiver: announce the intent to sleep. Re-check for work afterwards; sleep only
    /// if there is none.
    pub fn announce(&self) {
        self.parked.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// Receiver: done sleeping (or decided not to).
    pub fn clear(&self) {
        self.parked.store(false, Ordering::Relaxed);
    }

    /// Sender, after publishing work: whether it must wake the receiver. Returns true at
    /// most once per announce, so concurrent senders do not all pay for the wakeup.
    pub fn take_wake(&self) -> bool {
        fence(Ordering::SeqCst);
        // The plain load keeps the common case (receiver awake) free of writes to the
        // shared line; the CAS elects one waker. (A CAS rather than a swap: loom models
        // swap racing with plain stores incorrectly, tokio-rs/loom#254.)
        self.parked.load(Ordering::Relaxed)
            && self
                .parked
                .compare_exchange(true, false, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }

    pub fn is_parked(&self) -> bool {
        self.parked.load(Ordering::Relaxed)
    }
}

/// A reactor's parking state: the flag and the eventfd it sleeps on.
#[derive(Debug)]
pub struct ParkState {
    flag: ParkFlag,
    eventfd: EventFd,
}

impl ParkState {
    pub fn new() -> std::io::Result<Arc<ParkState>> {
        let eventfd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)?;
        Ok(Arc::new(ParkState { flag: ParkFlag::default(), eventfd }))
    }

    pub fn flag(&self) -> &ParkFlag {
        &self.flag
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.eventfd.as_fd()
    }

    /// Consumes pending wake signals.
    pub fn drain(&self) {
        let _ = self.eventfd.read();
    }

    fn signal(&self) {
        // EAGAIN means the counter is saturated: a wakeup is pending anyway.
        let _ = self.eventfd.write(1);
    }
}

/// A handle that wakes one reactor. Cheap to clone; `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Waker {
    state: Arc<ParkState>,
}

impl Waker {
    pub fn new(state: Arc<ParkState>) -> Waker {
        Waker { state }
    }

    /// Call after publishing work for the reactor: wakes it if it is parked.
    pub fn wake(&self) {
        if self.state.flag.take_wake() {
            self.state.signal();
        }
    }

    /// Wakes the reactor whether or not it announced parking (stop requests).
    pub fn wake_always(&self) {
        self.state.signal();
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::ring::ring;
    use loom::sync::Notify;

    /// Two senders each publish one message and wake; the receiver sleeps whenever it
    /// sees no message. A lost wakeup would leave it waiting forever, which loom reports
    /// as a deadlock.
    #[test]
    fn loom_park_never_loses_a_wakeup() {
        loom::model(|| {
            let flag = Arc::new(ParkFlag::default());
            let notify = Arc::new(Notify::new());
            let (p1, mut c1) = ring::<u8>(2);
            let (p2, mut c2) = ring::<u8>(2);
            let spawn = |mut p: crate::ring::Producer<u8>, v: u8| {
                let flag = Arc::clone(&flag);
                let notify = Arc::clone(&notify);
                loom::thread::spawn(move || {
                    p.push(v).unwrap();
                    if flag.take_wake() {
                        notify.notify();
                    }
                })
            };
            let t1 = spawn(p1, 1);
            let t2 = spawn(p2, 2);
            let mut got = 0;
            while got < 2 {
                let mut found = false;
                for c in [&mut c1, &mut c2] {
                    if c.pop().is_some() {
                        got += 1;
                        found = true;
                    }
                }
                if found {
                    continue;
                }
                flag.announce();
                if !c1.is_empty() || !c2.is_empty() {
                    flag.clear();
                    continue;
                }
                notify.wait();
                flag.clear();
            }
            t1.join().unwrap();
            t2.join().unwrap();
        });
    }
}

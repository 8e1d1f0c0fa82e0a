//! Bounded lock-free mailboxes between cores.
//!
//! [`mesh`] builds one SPSC [`ring`](crate::ring) for every (sender, receiver) pair:
//! `n` core senders plus `extra` outside senders (control threads, tests), each with an
//! [`Outbox`]; every core has an [`Inbox`] draining its rings round-robin. Properties:
//! bounded (a full ring returns the message: backpressure, never loss), no lock, no
//! allocation per message, FIFO per sender, and a parked receiver is woken (see
//! [`park`](crate::park)).

use sluice_vocab::CoreId;

use crate::park::Waker;
use crate::ring::{Consumer, Producer, ring};

/// The sending side of one sender: a ring to every core.
#[derive(Debug)]
pub struct Outbox<T> {
    id: usize,
    to: Vec<Producer<T>>,
    wakers: Vec<Waker>,
}

/// The receiving side of one core: a ring from every sender.
#[derive(Debug)]
pub struct Inbox<T> {
    from: Vec<Consumer<T>>,
    next: usize,
}

/// A message that could not be sent because the receiver's ring from this sender is full.
#[derive(Debug, PartialEq, Eq)]
pub struct Full<T>(pub T);

/// Builds the mesh for `wakers.len()` cores and `extra` outside senders, each ring
/// holding `capacity` messages. Returns outboxes (cores first, then the extra senders)
/// and one inbox per core.
pub fn mesh<T: Send>(
    wakers: Vec<Waker>,
    extra: usize,
    capacity: usize,
) -> (Vec<Outbox<T>>, Vec<Inbox<T>>) {
    let cores = wakers.len();
    let senders = cores + extra;
    let mut outboxes: Vec<Outbox<T>> = (0..senders)
        .map(|id| Outbox { id, to: Vec::with_capacity(cores), wakers: wakers.clone() })
        .collect();
    let mut inboxes: Vec<Inbox<T>> =
        (0..cores).map(|_| Inbox { from: Vec::with_capacity(senders), next: 0 }).collect();
    for out in outboxes.iter_mut() {
        for inbox in inboxes.iter_mut() {
            let (p, c) = ring(capacity);
            out.to.push(p);
            inbox.from.push(c);
        }
    }
    (outboxes, inboxes)
}

impl<T: Send> Outbox<T> {
    /// This sender's index in the mesh (cores first).
    pub fn sender_id(&self) -> usize {
        self.id
    }

    pub fn cores(&self) -> usize {
        self.to.len()
    }

    /// Sends `msg` to core `to`, waking it if parked. A full ring gives the message back;
    /// the caller keeps it and retries later.
    pub fn send(&mut self, to: CoreId, msg: T) -> Result<(), Full<T>> {
        let i = to.index();
        self.to[i].push(msg).map_err(Full)?;
        self.wakers[i].wake();
        Ok(())
    }

    /// Room left in the ring to core `to`, as far as this sender knows.
    pub fn free_slots(&self, to: CoreId) -> usize {
        self.to[to.index()].free_slots()
    }
}

impl<T: Send> Inbox<T> {
    /// Takes one message, visiting senders round-robin so none starves.
    pub fn recv(&mut self) -> Option<T> {
        let n = self.from.len();
        for k in 0..n {
            let i = (self.next + k) % n;
            if let Some(m) = self.from[i].pop() {
                self.next = (i + 1) % n;
                return Some(m);
            }
        }
        None
    }

    /// Takes up to `max` messages; returns how many.
    pub fn drain(&mut self, max: usize, mut f: impl FnMut(T)) -> usize {
        let mut n = 0;
        while n < max {
            match self.recv() {
                Some(m) => {
                    f(m);
                    n += 1;
                }
                None => break,
            }
        }
        n
    }

    /// Whether every ring is empty (re-reads the senders' indexes).
    pub fn is_empty(&mut self) -> bool {
        self.from.iter_mut().all(|c| c.is_empty())
    }
}

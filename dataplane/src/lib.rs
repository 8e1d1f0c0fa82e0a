//! The Sluice OSD dataplane.
//!
//! One reactor thread per core, pinned, never blocking. A reactor is a list of pollers
//! driven by `run_once(now)`: device completions, network, cross-core mailboxes, timers,
//! background work. Each core owns its shards (store, PGs, connections, queue pair)
//! outright; cores talk only through bounded lock-free mailboxes, never locks.
//!
//! What lives here today:
//! * [`ring`]: the single-producer single-consumer ring under every mailbox;
//! * [`mailbox`]: the mesh of rings between cores, FIFO per sender, bounded;
//! * [`park`]: the spin-then-park protocol that never loses a wakeup;
//! * [`reactor`]: pollers, timers, `run_once`, pinned threads, busy/idle accounting;
//! * [`store`]: the per-core log-structured object store.
//!
//! Threads: a [`reactor::Reactor`] and its pollers belong to one thread. Mailbox ends and
//! wakers are the only things shared between threads. Faults tolerated: a full mailbox
//! pushes back (the sender keeps the message); nothing is dropped.

#![deny(unsafe_code)]

pub mod mailbox;
#[cfg(not(loom))]
pub mod osd;
pub mod park;
#[cfg(not(loom))]
pub mod peers;
pub mod reactor;
pub mod ring;
pub mod store;
mod sync;

pub use mailbox::{Full, Inbox, Outbox, mesh};
pub use park::{ParkState, Waker};
pub use reactor::{Context, PollMode, PollResult, Poller, Reactor, ReactorConfig, ReactorHandle};

//! Read leases (Ceph's `osd_internals/stale_read.rst`): a primary serves reads of a PG
//! only while every other acting member has granted it a lease, so a primary cut off
//! from its peers stops serving reads before a new primary may take writes.
//!
//! **Renewal.** Every quarter of the lease (`osd_read_lease_ratio` x
//! `osd_heartbeat_grace`, in the [`MapView`]), a core sends each member core one
//! [`Lease`] naming the PGs it leads there, and counts the [`LeaseAck`]s per PG. Once
//! every other acting member granted a round, the PG is readable until the round's send
//! time plus [`USABLE_PERCENT`] of the lease (monotonic clocks only; the rest absorbs
//! clock-rate differences and the time from checking the lease to reading the store). A
//! PG with fewer than `min_size` acting members gets no lease at all (it is `peered`).
//! A member grants unless it peered for a newer interval than the lease's epoch; it
//! then holds an upper bound of the primary's lease: when it received it plus the
//! duration (the clock read after receipt, so never early).
//!
//! **Laggy.** A read of a PG without a current lease is held (state `laggy`) and routed
//! again when a round completes, when the PG is next active, or when it moves away.
//! Writes are not held: a write needs every acting member anyway, and a newer
//! interval's members refuse an older primary's writes.
//!
//! **A new interval** waits out the leases of the previous primaries: every member's
//! answer to the peering query carries what is left of the last lease it granted and to
//! whom (a primary's own earlier leases are not waited for, its own reads stopped when
//! it began peering). A member asked by a new primary stops serving reads of the PG
//! itself, at once. The PG peers and recovers meanwhile, then waits (state `wait`)
//! until the last of those leases has run out, and only then goes active. Members of
//! prior intervals outside the acting set are not asked (see the peering module): a
//! new acting set that shares no member with the previous one waits for nothing.

use sluice_net::rep::{Lease, LeaseAck};
use sluice_vocab::{Clock, SystemClock};

use super::*;

/// The share of a lease's duration its primary serves reads for.
pub const USABLE_PERCENT: u32 = 90;

/// The lease when the map view says nothing else: 0.8 x the default heartbeat grace.
pub const DEFAULT_READ_LEASE: Duration = Duration::from_secs(16);

/// The clock read now, not the poll's: receipt times must never be early.
pub(super) fn clock() -> MonoTime {
    SystemClock.now()
}

/// One member core's share of a round: its address and the PGs.
type Batch = (peers::PeerAddr, Vec<(u32, u32)>);

fn usable(lease: Duration) -> Duration {
    lease * USABLE_PERCENT / 100
}

impl<D: BlockDevice> Core<D> {
    pub(super) fn read_lease(&self) -> Duration {
        self.view.as_ref().map_or(DEFAULT_READ_LEASE, |v| v.tuning.read_lease)
    }

    /// Whether this primary may serve a read of `pgid` now.
    pub(super) fn readable(&self, pgid: PgId) -> bool {
        self.pgs.get(&pgid).is_some_and(|pg| pg.readable_until > self.now)
    }

    /// When the next renewal round is due: a quarter lease after the last, by the lease
    /// of the current map view (a new one may shorten it).
    fn next_round(&self) -> MonoTime {
        self.last_lease_round.after(self.read_lease() / 4)
    }

    /// When the next renewal round or lease wait is due.
    pub(super) fn next_lease_event(&self) -> Option<MonoTime> {
        self.view.as_ref()?;
        let next = self.next_round();
        let wait = self.lease_waits.iter().map(|(t, ..)| *t).min();
        Some(wait.map_or(next, |w| w.min(next)))
    }

    /// Renews the leases of every PG this core leads, when due; ends the waits that ran
    /// out. True if anything happened.
    pub(super) fn lease_tick(&mut self) -> bool {
        let now = self.now;
        let mut busy = false;
        if self.lease_waits.iter().any(|(t, ..)| *t <= now) {
            busy = true;
            let (due, rest): (Vec<_>, Vec<_>) =
                std::mem::take(&mut self.lease_waits).into_iter().partition(|(t, ..)| *t <= now);
            self.lease_waits = rest;
            for (_, pgid, epoch) in due {
                let waiting = self
                    .pgs
                    .get(&pgid)
                    .and_then(|pg| pg.peering.as_ref())
                    .is_some_and(|p| p.epoch == epoch && p.waits_for_leases());
                if waiting {
                    self.activate(pgid);
                }
            }
        }
        if now < self.next_round() {
            return busy;
        }
        let Some(view) = self.view.clone() else { return busy };
        self.last_lease_round = now;
        let led: Vec<(PgId, Vec<OsdId>)> = self
            .core_pgs(&view.map)
            .into_iter()
            .filter(|(_, acting)| acting.first() == Some(&view.me))
            .collect();
        self.lease_round(led);
        true
    }

    /// Starts a renewal round for the active PGs among `pgs` (acting sets, primary
    /// first). A PG whose previous round is still young is left to finish it.
    pub(super) fn lease_round(&mut self, pgs: Vec<(PgId, Vec<OsdId>)>) {
        let Some(view) = self.view.clone() else { return };
        let now = self.now;
        let lease = self.read_lease();
        let round = self.lease_round + 1;
        let mut batches: HashMap<(OsdId, std::net::SocketAddr), Batch> = HashMap::new();
        let mut joined = false;
        let sent = &self.lease_sent;
        for (pgid, acting) in pgs {
            let Some(pool) = view.map.pools.get(&pgid.pool) else { continue };
            let Some(pg) = self.pgs.get_mut(&pgid) else { continue };
            if pg.active_with.is_none() || pg.peering.is_some() {
                continue;
            }
            if acting.len() < usize::from(pool.min_size) {
                pg.lease_waiting.clear();
                continue;
            }
            let young = sent
                .iter()
                .find(|(r, ..)| *r == pg.lease_round)
                .is_some_and(|(_, t, _)| now.saturating_sub(*t) < lease / 2);
            if !pg.lease_waiting.is_empty() && young {
                continue;
            }
            if acting.len() == 1 {
                // Nobody else could take over without this OSD's log: a pool of size 1
                // (or min_size 1 by choice).
                pg.readable_until = pg.readable_until.max(now.after(usable(lease)));
                pg.lease_waiting.clear();
                continue;
            }
            joined = true;
            pg.lease_round = round;
            pg.lease_waiting = acting[1..].to_vec();
            for osd in &acting[1..] {
                // A member without an address never grants: the lease lapses until a map
                // takes it out of the acting set.
                if let Some(addr) =
                    peers::core_addr(&view.map, *osd, |n| placement::pg_core(pgid, n))
                {
                    batches
                        .entry((*osd, addr.addr))
                        .or_insert_with(|| (addr, Vec::new()))
                        .1
                        .push((pgid.pool.0, pgid.pg));
                }
            }
        }
        if !joined {
            return;
        }
        self.lease_round = round;
        self.lease_sent.push_back((round, now, lease));
        while self.lease_sent.front().is_some_and(|(_, t, l)| now.saturating_sub(*t) > *l) {
            self.lease_sent.pop_front();
        }
        let me = view.me;
        let from_up_from = view.map.osd(me).map_or(0, |o| o.up_from);
        let duration_us = u64::try_from(lease.as_micros()).unwrap_or(u64::MAX);
        let mut b = Vec::new();
        for ((osd, _), (addr, pgs)) in batches {
            b.clear();
            let l =
                Lease { epoch: view.map.epoch, from: me.0, from_up_from, round, duration_us, pgs };
            l.encode(&mut b);
            if let Err(e) = self.peers.send(osd, addr, rep::MSG_LEASE, &[&b]) {
                tracing::warn!("read lease to {osd}: {e}");
            }
        }
    }

    /// A member's side: grants the lease for every PG of ours not peered past it.
    pub(super) fn on_lease(&mut self, cookie: u64, lease: Lease) {
        let now = clock();
        let until = now.after(Duration::from_micros(lease.duration_us));
        let by = (OsdId(lease.from), lease.from_up_from);
        let mut granted = Vec::with_capacity(lease.pgs.len());
        for (pool, pg) in lease.pgs {
            let pgid = PgId { pool: PoolId(pool), pg };
            if placement::pg_core(pgid, self.cores) as u16 != self.core {
                continue;
            }
            let p = self.pgs.entry(pgid).or_default();
            if lease.epoch < p.interval_epoch {
                continue; // a newer primary peered here: the older one gets no lease
            }
            if p.lease_ub <= now {
                p.lease_by = Some(by);
            } else if p.lease_by != Some(by) {
                p.lease_by = None; // two primaries' leases may both be running
            }
            p.lease_ub = p.lease_ub.max(until);
            granted.push((pool, pg));
        }
        LeaseAck { round: lease.round, pgs: granted }.encode(&mut self.reply_buf);
        self.replies.push((cookie, rep::MSG_LEASE_ACK, self.reply_buf.len()));
    }

    /// The primary's side: `from` granted a round for some PGs.
    pub(super) fn on_lease_ack(&mut self, from: OsdId, ack: LeaseAck) {
        let Some(&(_, sent, lease)) = self.lease_sent.iter().find(|(r, ..)| *r == ack.round) else {
            return; // a round too old to count
        };
        let until = sent.after(usable(lease));
        let now = self.now;
        let mut release = Vec::new();
        for (pool, pg) in ack.pgs {
            let pgid = PgId { pool: PoolId(pool), pg };
            let Some(p) = self.pgs.get_mut(&pgid) else { continue };
            if p.lease_round != ack.round || p.lease_waiting.is_empty() {
                continue;
            }
            p.lease_waiting.retain(|o| *o != from);
            if p.lease_waiting.is_empty() {
                if p.readable_until <= now {
                    self.pg_dirty = true;
                    if !p.held.is_empty() && p.peering.is_none() {
                        release.push(pgid);
                    }
                }
                p.readable_until = p.readable_until.max(until);
            }
        }
        for pgid in release {
            self.release_held(pgid);
        }
    }

    /// What a member tells a new primary about the leases it granted for `pgid`: what is
    /// left of the last one, and whose it is.
    pub(super) fn lease_info(&self, pgid: PgId) -> (u64, Option<(u32, u64)>) {
        let Some(pg) = self.pgs.get(&pgid) else { return (0, None) };
        let now = clock();
        let left = pg.lease_ub.saturating_sub(now);
        let by = pg.lease_by.map(|(o, u)| (o.0, u));
        (u64::try_from(left.as_micros()).unwrap_or(u64::MAX), by)
    }
}

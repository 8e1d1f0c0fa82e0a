//! Backfill of a replica alongside writes (Ceph's `last_backfill`, simplified).
//!
//! **Start** (peering, `peering.rs`): a replica whose last version is older than the
//! start of the primary's log (or new to the PG) is listed, as the primary is (shallow
//! scrub maps), and sent a [`BackfillStep::Begin`] push: it drops its whole log and from then
//! on applies the primary's writes without logging them, so its version stays 0 and a
//! backfill cut short (a restart, a new interval) starts over. The PG then goes active
//! with the replica as a *backfill target*: not a copy (not counted for `min_size`, its
//! acknowledgement does not make a write durable, not scrubbed), but sent writes.
//!
//! **Alongside writes.** The primary copies every object of either listing (one it lacks
//! as deleted), in name order, at most [`MAX_PUSHES_PER_PEER`] per target and within the
//! core's share of `osd_recovery_max_active`. A write to an object
//! - still to copy is not sent to the target: the copy, made later, carries it;
//! - being copied waits until the copy is acknowledged, then is sent;
//! - already copied, or new, is sent (the target has the object's state).
//!
//! An object with writes in flight is not copied until they are done (the copy must
//! read their result); new writes to it wait meanwhile, so a busy object is copied all
//! the same. Writes parked for want of copies are in the object already and do not
//! delay it. The target applies the writes in version order and takes an older version
//! for a resend (after a session reset), not a write.
//!
//! **Close.** With every object copied, new writes are held until those in flight are
//! done, then the primary sends its whole log (the closing log push,
//! [`BackfillStep::Close`]: the target sets its version to the primary's and logs writes
//! again) and lets the writes go; they reach the target after the log, in order, on the
//! same connection. Once the target acknowledges the log it is a copy: the PG is clean,
//! and parked writes are answered if that made enough copies. A target that restarted
//! since the start refuses the closing log (it may have lost writes sent to the earlier
//! process), and any new interval ends the backfills at once; either way it is
//! backfilled again from the start.
//!
//! `osd_nobackfill` (central config) holds backfills (`backfill_wait`): nothing is
//! copied while it is set, and no write waits for a copy.
//!
//! **On the target** the backfill also ends (it reports the version its log shows and
//! is backfilled again) when a primary of the current or a newer interval queries it,
//! when it leads the PG, and when a write the backfill sent fails to apply.

use std::collections::BTreeSet;

use sluice_net::rep::BackfillStep;

use super::peering::{MAX_PUSHES_PER_PEER, PushTo};
use super::*;

// An object's acknowledgement carries its name in the reply's message, whole.
const _: () = assert!(rep::MAX_MESSAGE_BYTES >= sluice_net::ops::MAX_NAME_BYTES);

/// A replica being backfilled, on the primary.
#[derive(Debug)]
pub(crate) struct Backfill {
    /// The peering (map epoch) that started it; its pushes carry it.
    pub epoch: u64,
    /// Objects still to copy, in name order.
    pub pending: BTreeSet<String>,
    /// Objects being copied (writes to them wait).
    pub in_flight: BTreeSet<String>,
    /// Objects whose copy waits for their writes in flight: new writes to them wait,
    /// so a busy object is copied all the same.
    pub blocked: BTreeSet<String>,
    pub stage: Stage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    Copying,
    /// Every object is copied: new writes wait until those in flight are done.
    Closing,
    /// The log went; a copy once it is acknowledged.
    LogSent,
}

/// What a write does about a backfill target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ForTarget {
    /// Sent: the target has the object's state.
    Send,
    /// Not sent: the object's copy is still to be made.
    Skip,
    /// Wait: the object is being copied (or the backfill is closing).
    Wait,
}

impl Backfill {
    pub(crate) fn new(epoch: u64, pending: BTreeSet<String>) -> Backfill {
        Backfill {
            epoch,
            pending,
            in_flight: BTreeSet::new(),
            blocked: BTreeSet::new(),
            stage: Stage::Copying,
        }
    }

    pub(crate) fn for_write(&self, object: &str) -> ForTarget {
        if self.stage == Stage::Closing
            || self.in_flight.contains(object)
            || self.blocked.contains(object)
        {
            ForTarget::Wait
        } else if self.pending.contains(object) {
            ForTarget::Skip
        } else {
            ForTarget::Send
        }
    }

    /// Objects left to copy (in flight included).
    pub(crate) fn left(&self) -> usize {
        self.pending.len() + self.in_flight.len()
    }
}

impl<D: BlockDevice> Core<D> {
    /// Copies more objects to the PG's backfill targets, closes those with every object
    /// copied (see the module documentation).
    pub(super) fn backfill_more(&mut self, pgid: PgId) {
        // Called after every write: nothing to look up for a PG without backfills.
        if self.pgs.get(&pgid).is_none_or(|pg| pg.backfills.is_empty()) {
            return;
        }
        let Some(view) = self.view.clone() else { return };
        let Some(pool) = view.map.pools.get(&pgid.pool) else { return };
        let acting = self.primaries.mapping(&view.map, pool, pgid).up.clone();
        let paused = view.tuning.nobackfill;
        let mut room = self.recovery_room();
        let Some(pg) = self.pgs.get_mut(&pgid) else { return };
        let current = pg
            .active_with
            .as_ref()
            .is_some_and(|i| super::peering::is_interval(i, &view.map, &acting));
        if pg.peering.is_some() || pg.backfills.is_empty() || !current {
            return; // a new interval ends them (`peer_all`)
        }
        let mut reads = Vec::new();
        let mut starved = false;
        let mut logs = Vec::new();
        let writes_in_flight = !pg.inflight.is_empty();
        let Pg { backfills, writing, parked, .. } = pg;
        // Writes parked (durable here, waiting for enough copies) are in the object:
        // only those in flight must finish before it is copied.
        let busy = |o: &str| {
            let n = writing.get(o).copied().unwrap_or(0) as usize;
            n > parked.iter().filter(|w| w.object == o).count()
        };
        let mut unblocked = false;
        for (osd, b) in backfills.iter_mut() {
            if paused && !b.blocked.is_empty() {
                // Held: nothing is copied, so writes must not wait for a copy.
                b.blocked.clear();
                unblocked = true;
            }
            if b.stage == Stage::Copying && !paused {
                let mut skipped = Vec::new();
                while b.in_flight.len() < MAX_PUSHES_PER_PEER && room > 0 {
                    let Some(o) = b.pending.pop_first() else { break };
                    if busy(&o) {
                        // Copied once its writes are done; new ones wait meanwhile.
                        b.blocked.insert(o.clone());
                        skipped.push(o);
                        continue;
                    }
                    room -= 1;
                    b.blocked.remove(&o);
                    b.in_flight.insert(o.clone());
                    reads.push((*osd, o, b.epoch));
                }
                starved |= !b.pending.is_empty() && room == 0;
                b.pending.extend(skipped);
                if b.pending.is_empty() && b.in_flight.is_empty() {
                    tracing::info!("PG {pgid}: every object copied to {osd}; closing its backfill");
                    b.stage = Stage::Closing;
                }
            }
            if b.stage == Stage::Closing && !writes_in_flight {
                b.stage = Stage::LogSent;
                logs.push((*osd, b.epoch));
            }
        }
        if starved && !self.recovery_queue.contains(&pgid) {
            self.recovery_queue.push_back(pgid);
        }
        if unblocked {
            self.release_backfill_held(pgid);
        }
        if !logs.is_empty() {
            let pg = self.pgs.get(&pgid).expect("checked above");
            let entries: Vec<(u64, Logged)> = pg.log.iter().map(|(v, l)| (*v, l.clone())).collect();
            let trim_upto = pg.log.keys().next().map_or(0, |f| f - 1);
            let version = pg.version;
            for (osd, epoch) in logs {
                let step = BackfillStep::Close;
                self.send_log(pgid, osd, epoch, entries.clone(), version, trim_upto, step);
                tracing::info!("PG {pgid}: backfill of {osd}: the log went (v{version})");
            }
            // Writes held while closing go now: after the log, on the same connection.
            self.release_held(pgid);
        }
        for (osd, object, epoch) in reads {
            self.recovery_read(pgid, object, PushTo::Backfill(osd), epoch);
        }
    }

    /// A backfill target acknowledged a copied object (named in the message) or the
    /// closing log (no name).
    pub(super) fn on_backfill_ack(&mut self, from: OsdId, r: RepReply<'_>) {
        let pgid = PgId { pool: PoolId(r.pool), pg: r.pg };
        let Some(pg) = self.pgs.get_mut(&pgid) else { return };
        let Some(b) = pg.backfills.get_mut(&from).filter(|b| b.epoch == r.version) else {
            return; // an earlier interval's
        };
        if r.status != Status::Ok {
            let why = format!("{:?}: {}", r.status, r.message);
            return self.backfill_failed(pgid, from, &why);
        }
        if r.message.is_empty() {
            if b.stage == Stage::LogSent {
                pg.backfills.remove(&from);
                self.pg_dirty = true;
                tracing::info!("PG {pgid}: {from} backfilled");
                // One more copy: writes parked for want of copies may be answered.
                // (Not while a re-peering is due: a replica refused one of them.)
                if !pg.parked.is_empty()
                    && !pg.want_peer
                    && self.copies(pgid) >= self.min_size(pgid)
                {
                    self.answer_parked(pgid, false);
                }
            }
            return;
        }
        if !b.in_flight.remove(r.message) {
            return;
        }
        // Writes that waited for this object's copy go on (to the target too).
        let object = r.message.to_string();
        let (go, keep): (Vec<_>, Vec<_>) =
            std::mem::take(&mut pg.backfill_held).into_iter().partition(|(o, ..)| *o == object);
        pg.backfill_held = keep;
        let now = self.now;
        for (_, origin, payload) in go {
            self.handle(origin, &payload, now, None);
        }
        self.backfill_more(pgid);
        self.kick_recovery();
    }

    /// Acting members that are copies (not left behind, not being backfilled).
    fn copies(&mut self, pgid: PgId) -> usize {
        let Some(view) = self.view.clone() else { return 0 };
        let Some(pool) = view.map.pools.get(&pgid.pool) else { return 0 };
        let acting = self.primaries.mapping(&view.map, pool, pgid).up.clone();
        let Some(pg) = self.pgs.get(&pgid) else { return 0 };
        acting.iter().filter(|o| !pg.behind.contains(o) && !pg.backfills.contains_key(o)).count()
    }

    fn min_size(&self, pgid: PgId) -> usize {
        self.view
            .as_ref()
            .and_then(|v| v.map.pools.get(&pgid.pool))
            .map_or(usize::MAX, |p| usize::from(p.min_size))
    }

    /// A backfill could not go on: the target stays behind (not a copy, not sent writes)
    /// until the next interval starts it again.
    pub(super) fn backfill_failed(&mut self, pgid: PgId, osd: OsdId, why: &str) {
        let Some(pg) = self.pgs.get_mut(&pgid) else { return };
        if pg.backfills.remove(&osd).is_none() {
            return;
        }
        tracing::error!("PG {pgid}: backfill of {osd} failed: {why}; it stays behind");
        pg.behind.push(osd);
        self.pg_dirty = true;
        self.release_backfill_held(pgid);
        self.backfill_more(pgid);
        self.kick_recovery();
    }

    /// Backfills with nothing in flight go on (`osd_nobackfill` cleared, a slot freed
    /// while they were not queued); every second.
    pub(super) fn resume_backfills(&mut self) {
        let idle: Vec<PgId> = self
            .pgs
            .iter()
            .filter(|(_, pg)| {
                pg.peering.is_none()
                    && pg
                        .backfills
                        .values()
                        .any(|b| b.in_flight.is_empty() && b.stage != Stage::LogSent)
            })
            .map(|(id, _)| *id)
            .collect();
        for pgid in idle {
            self.backfill_more(pgid);
        }
    }

    /// Routes the writes that waited for backfill copies again (the backfill ended).
    pub(super) fn release_backfill_held(&mut self, pgid: PgId) {
        let Some(pg) = self.pgs.get_mut(&pgid) else { return };
        let held = std::mem::take(&mut pg.backfill_held);
        let now = self.now;
        for (_, origin, payload) in held {
            self.handle(origin, &payload, now, None);
        }
    }

    /// Holds a write until the copy of its object to a backfill target is acknowledged
    /// (or, closing, until the log went).
    pub(super) fn hold_for_backfill(
        &mut self,
        pgid: PgId,
        origin: Origin,
        req: &Request<'_>,
        payload: &[u8],
    ) {
        let pg = self.pgs.entry(pgid).or_default();
        if pg.backfills.values().any(|b| b.stage == Stage::Closing) {
            return self.hold(pgid, origin, req.tid, payload);
        }
        if pg.backfill_held.len() >= MAX_HELD {
            let m = format!("PG {pgid}: {MAX_HELD} writes wait for backfill copies already");
            return self.error(origin, req.tid, Status::Again, &m);
        }
        pg.backfill_held.push((req.object.to_string(), origin, payload.to_vec()));
    }
}

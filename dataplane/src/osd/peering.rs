//! Peering and log-based recovery of the PGs a core leads.
//!
//! **When.** Every map in which this OSD is a PG's primary and the PG's acting set is
//! not the one it last went active with (an OSD left or came back, the primary moved,
//! the OSD just started) starts peering, once the PG's writes in flight are done.
//! Client ops for the PG are held meanwhile (never failed) and routed again when it is
//! active.
//!
//! **How.**
//! 1. The primary asks every other acting member for its PG log ([`PgQuery`]). A member
//!    answers once its own writes in flight for the PG are durable, and from then on
//!    refuses replicated writes from older intervals (a primary that was cut off).
//! 2. The authoritative log is the one whose newest entry is newest by (epoch, version)
//!    (ties go to the primary): a write is acknowledged only once every acting member
//!    has it, so every acknowledged write is in it.
//! 3. If the primary is not authoritative, it pulls every object the authoritative log
//!    names differently from its own ([`Pull`] -> [`Push`]), then writes the missing
//!    entries into its own log: its divergent entries (writes never acknowledged) are
//!    overwritten with the authoritative ones, or marked rolled back.
//! 4. It pushes to every member that lacks entries each object those entries name (at
//!    most [`MAX_PUSHES_PER_PEER`] in flight per member), then the entries themselves and
//!    the version ([`Push`] without an object): the member is then at the primary's
//!    version, and its divergent entries are rolled back.
//! 5. If a previous primary that is not a member now may still hold a read lease, the PG
//!    waits until it has run out (`wait`, the `lease` module).
//! 6. The PG goes active and the held ops run.
//!
//! A repair (the `scrub` module) runs the same steps with the copies a scrub found bad
//! added to what is pulled and pushed.
//!
//! **Backfill.** A member whose last version is older than the start of the
//! authoritative log (trimmed to `osd_pg_log_keep` entries), or new to the PG, cannot
//! be recovered from the log: the objects it lacks need not be named in it. The primary
//! lists the objects of that member and its own (a shallow scrub map each,
//! [`rep::Scrub`]); a replica is then sent [`rep::BackfillStep::Begin`] and copied alongside
//! writes once the PG is active (the `backfill` module). A primary that is itself behind
//! pulls every object of the member with the authoritative log and of its own list
//! here, with ops held, then that member's log with its own older entries trimmed.
//!
//! **Throttle.** A core copies at most its share of `osd_recovery_max_active` objects
//! at once over all its PGs (and [`MAX_PUSHES_PER_PEER`] per PG and member); PGs that
//! wait for a slot are `recovery_wait` / `backfill_wait`.
//!
//! **Not built yet** (issue 7): a temporary primary while a new primary is backfilled
//! (Ceph's `pg_temp`), members of prior intervals outside the acting set.

use std::collections::BTreeSet;

use sluice_net::rep::{ObjectState, PUSH_CHUNK_BYTES, PgInfo, PgQuery, Pull, Push};

use super::*;

/// A PG's acting members with the epoch each booted at.
pub(crate) type Interval = Vec<(OsdId, u64)>;

pub(crate) fn interval_of(map: &OsdMap, acting: &[OsdId]) -> Interval {
    acting.iter().map(|o| (*o, up_from(map, *o))).collect()
}

fn up_from(map: &OsdMap, o: OsdId) -> u64 {
    map.osd(o).map_or(0, |i| i.up_from)
}

/// Whether `interval` is `acting`'s in `map` (checked per op: no allocation).
pub(super) fn is_interval(interval: &Interval, map: &OsdMap, acting: &[OsdId]) -> bool {
    interval.len() == acting.len()
        && interval.iter().zip(acting).all(|((o, u), a)| o == a && *u == up_from(map, *a))
}

/// A peering that has not finished in this long is reported as stuck (a failed pull or
/// store error; it starts again with the next interval, e.g. `sluice osd down` of the
/// member it waits for). Not restarted on its own: messages of the earlier attempt
/// would carry the same epoch.
pub const PEERING_TIMEOUT: Duration = Duration::from_secs(30);

/// Most PG log entries one recovery transaction writes (a store transaction takes at most
/// `MAX_TXN_OPS` ops).
pub const LOG_PIECE: usize = 512;

/// Objects in flight per PG and member being recovered.
pub const MAX_PUSHES_PER_PEER: usize = 4;

/// Client ops held per PG while it peers (more are told to retry).
pub const MAX_HELD: usize = 4096;

/// A PG's peering on its primary.
#[derive(Debug)]
pub(crate) struct Peering {
    /// The map epoch of the interval.
    pub epoch: u64,
    /// Primary first.
    pub acting: Vec<OsdId>,
    /// The acting members with the epoch each booted at: a member that restarted is a
    /// new interval even with the same acting set (it may have lost what it had not
    /// made durable).
    pub interval: Interval,
    /// When it started (a peering that makes no progress is started again).
    started: MonoTime,
    infos: HashMap<OsdId, Info>,
    /// Members whose info has not arrived.
    waiting: Vec<OsdId>,
    phase: Phase,
    /// Members recovery could not bring up to date (a failure).
    behind: Vec<OsdId>,
    /// Members (this OSD included) this peering backfills: their logs do not reach the
    /// authoritative log's start, so every object is copied, not only those the log
    /// names.
    backfill: Vec<OsdId>,
    /// Replicas to backfill alongside writes once the PG is active, with the objects
    /// to copy (the `backfill` module).
    backfill_pending: BTreeMap<OsdId, BTreeSet<String>>,
    /// The read leases the members (this OSD included) granted, as their answers bound
    /// them, with their holders; and, once recovered, until when the PG must wait for
    /// them: the leases of members that answered (they stopped their reads when asked)
    /// and this OSD's own do not count (the `lease` module).
    prior_leases: Vec<(MonoTime, Option<(OsdId, u64)>)>,
    prior_readable: MonoTime,
}

impl Peering {
    /// Recovered, waiting out a previous primary's read lease.
    pub(super) fn waits_for_leases(&self) -> bool {
        matches!(self.phase, Phase::WaitLease)
    }
}

#[derive(Debug)]
struct Info {
    version: u64,
    log: BTreeMap<u64, Logged>,
}

#[derive(Debug)]
enum Phase {
    GetInfo,
    /// Listing the objects of the members to backfill and of the one that has them
    /// (scrub maps of scrub `id`), before pulling or pushing them all.
    List {
        id: u64,
        waiting: Vec<OsdId>,
        names: HashMap<OsdId, BTreeSet<String>>,
        /// This primary backfills from a member (its log is authoritative)...
        pull: Option<Pulling>,
        /// ...or pushes to these members (the backfilled ones get the listed objects).
        push: HashMap<OsdId, Target>,
        failed: Option<String>,
    },
    /// Pulling objects from the member with the authoritative log.
    Pull {
        from: OsdId,
        objects: VecDeque<String>,
        in_flight: usize,
        entries: Vec<(u64, Logged)>,
        version: u64,
        /// Own log entries up to this go (a backfill: nothing older than `from`'s log).
        trim_upto: u64,
        /// A piece failed to apply: the PG stays peering until the timeout starts it
        /// again.
        failed: bool,
    },
    /// The primary's own log catching up with the authoritative one (a transaction).
    OwnLog,
    Push(HashMap<OsdId, Target>),
    /// Recovered: waiting until `prior_readable` has passed.
    WaitLease,
}

/// A backfill of this primary, once the objects are listed.
#[derive(Debug)]
struct Pulling {
    from: OsdId,
    plan: Plan,
    version: u64,
    trim_upto: u64,
}

/// What one member needs.
#[derive(Debug)]
struct Target {
    objects: VecDeque<String>,
    in_flight: usize,
    entries: Vec<(u64, Logged)>,
    /// The member's log entries up to this go first (a backfill).
    trim_upto: u64,
    /// The log push is a backfill's start ([`rep::BackfillStep::Begin`]): the objects
    /// follow once the PG is active.
    begin: bool,
    log_sent: bool,
    done: bool,
}

/// A piece of a pushed object, owned.
#[derive(Debug)]
pub(crate) struct PushedPiece {
    name: String,
    exists: bool,
    offset: u64,
    data: Vec<u8>,
    xattrs: Vec<(String, Vec<u8>)>,
    last: bool,
}

/// Where a recovery read is (see [`Core::recovery_read`]).
#[derive(Debug)]
pub(crate) enum ReadStage {
    Stat {
        epoch: u64,
    },
    Xattrs {
        epoch: u64,
        size: u64,
    },
    /// Reading the piece at `offset`; the first piece carries the xattrs.
    Data {
        epoch: u64,
        size: u64,
        offset: u64,
        xattrs: Option<BTreeMap<String, Vec<u8>>>,
    },
}

impl ReadStage {
    /// The peering (or, answering a pull, the puller's peering) the read is for.
    fn epoch(&self) -> u64 {
        match self {
            ReadStage::Stat { epoch }
            | ReadStage::Xattrs { epoch, .. }
            | ReadStage::Data { epoch, .. } => *epoch,
        }
    }
}

/// Log entries in pieces of at most [`LOG_PIECE`] (at least one piece, maybe empty).
pub(super) fn log_pieces(entries: Vec<(u64, Logged)>) -> Vec<Vec<(u64, Logged)>> {
    if entries.is_empty() {
        return vec![Vec::new()];
    }
    let mut pieces = Vec::new();
    let mut it = entries.into_iter().peekable();
    while it.peek().is_some() {
        pieces.push(it.by_ref().take(LOG_PIECE).collect());
    }
    pieces
}

/// Where a recovery read's object goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PushTo {
    /// A member the primary recovers.
    Peer(OsdId),
    /// The primary that pulled it, on this server's session.
    Session(u64),
    /// A replica backfilled alongside writes (the `backfill` module).
    Backfill(OsdId),
}

/// The newest real entry (rolled-back markers do not count), as (epoch, version).
fn last_of(log: &BTreeMap<u64, Logged>) -> (u64, u64) {
    log.iter().rev().find(|(_, l)| !l.rolled_back()).map_or((0, 0), |(v, l)| (l.epoch, *v))
}

fn same(a: &Logged, b: &Logged) -> bool {
    a.reqid == b.reqid && a.epoch == b.epoch && a.op == b.op && a.object == b.object
}

/// Objects to copy and log entries to write.
type Plan = (BTreeSet<String>, Vec<(u64, Logged)>);

/// What a member with `log` needs to match the authoritative `auth`: the objects to copy
/// and the entries to write (authoritative ones, and rolled-back markers over its
/// divergent entries). An error when the authoritative log no longer reaches back to
/// the member's last version (only a backfill can help).
fn plan(
    auth: &BTreeMap<u64, Logged>,
    log: &BTreeMap<u64, Logged>,
    version: u64,
) -> Result<Plan, String> {
    if let Some(&f) = auth.keys().next()
        && version + 1 < f
    {
        return Err(format!(
            "at version {version}, before the start of the authoritative log ({f})"
        ));
    }
    Ok(log_plan(auth, log))
}

/// The entries a member with `log` lacks of `auth` (and markers over its divergent
/// ones), with the objects they name; a backfill copies every object besides.
fn log_plan(auth: &BTreeMap<u64, Logged>, log: &BTreeMap<u64, Logged>) -> Plan {
    let first = auth.keys().next().copied();
    let mut objects = BTreeSet::new();
    let mut entries = Vec::new();
    for (v, a) in auth {
        match log.get(v) {
            Some(m) if same(m, a) => {}
            other => {
                if !a.rolled_back() {
                    objects.insert(a.object.clone());
                }
                if let Some(m) = other
                    && !m.rolled_back()
                {
                    objects.insert(m.object.clone());
                }
                entries.push((*v, a.clone()));
            }
        }
    }
    for (v, m) in log.range(first.unwrap_or(0)..) {
        if !auth.contains_key(v) && !m.rolled_back() {
            objects.insert(m.object.clone());
            let marker = Logged {
                reqid: (0, 0),
                epoch: 0,
                op: LogEntry::ROLLED_BACK,
                object: String::new(),
            };
            entries.push((*v, marker));
        }
    }
    entries.sort_by_key(|(v, _)| *v);
    (objects, entries)
}

/// What a backfilled member's log keeps nothing of: everything before `auth`'s start.
fn trim_before(auth: &BTreeMap<u64, Logged>) -> u64 {
    auth.keys().next().map_or(0, |f| f - 1)
}

impl<D: BlockDevice> Core<D> {
    /// A new map: every PG this core leads whose acting set changed peers (see the
    /// module documentation); PGs it no longer leads stop peering and route their held
    /// ops again (to a redirect).
    pub(super) fn peer_all(&mut self) {
        let Some(view) = self.view.clone() else { return };
        // States may change with any map (undersized, a new pool).
        self.pg_dirty = true;
        let mut start = Vec::new();
        let mut ended = Vec::new();
        for (pgid, acting) in self.core_pgs(&view.map) {
            if acting.first() == Some(&view.me) {
                let interval = interval_of(&view.map, &acting);
                let pg = self.pgs.entry(pgid).or_default();
                if pg.active_with.as_ref() != Some(&interval) {
                    // Not active with this interval any more, even if it comes back; its
                    // backfills end at once (a target that restarted may have lost
                    // writes: it must not be sent the closing log before the peering).
                    pg.active_with = None;
                    if !pg.backfills.is_empty() {
                        pg.backfills.clear();
                        ended.push(pgid);
                    }
                }
                let same_peering = pg.peering.as_ref().is_some_and(|p| p.interval == interval);
                if pg.active_with.is_none() && !same_peering {
                    start.push((pgid, acting));
                }
            } else if let Some(pg) = self.pgs.get_mut(&pgid) {
                pg.active_with = None;
                pg.want_peer = false;
                pg.readable_until = MonoTime::ZERO;
                pg.lease_waiting.clear();
                pg.want_scrub = None;
                pg.scrub = None;
                pg.repair.clear();
                pg.backfills.clear();
                if pg.peering.take().is_some() {
                    tracing::info!("PG {pgid}: no longer its primary; peering stopped");
                }
                self.answer_parked(pgid, true);
                self.release_held(pgid);
                self.release_backfill_held(pgid);
            }
        }
        // PGs of pools that are gone.
        let gone: Vec<PgId> = self
            .pgs
            .iter()
            .filter(|(id, pg)| {
                !view.map.pools.contains_key(&id.pool)
                    && (pg.peering.is_some()
                        || !pg.held.is_empty()
                        || !pg.parked.is_empty()
                        || !pg.backfills.is_empty()
                        || !pg.backfill_held.is_empty())
            })
            .map(|(id, _)| *id)
            .collect();
        for pgid in gone {
            let pg = self.pgs.get_mut(&pgid).expect("listed");
            pg.peering = None;
            pg.active_with = None;
            pg.backfills.clear();
            self.answer_parked(pgid, true);
            self.release_held(pgid);
            self.release_backfill_held(pgid);
        }
        for (pgid, acting) in start {
            self.start_peering(pgid, acting, view.map.epoch);
        }
        for pgid in ended {
            self.release_backfill_held(pgid); // held again by the peering
        }
    }

    /// Every PG of `map` that this core owns, with its acting set (primary first).
    pub(super) fn core_pgs(&mut self, map: &OsdMap) -> Vec<(PgId, Vec<OsdId>)> {
        let mut out = Vec::new();
        for pool in map.pools.values() {
            for n in 0..pool.pg_num {
                let pgid = PgId { pool: pool.id, pg: n };
                if placement::pg_core(pgid, self.cores) as u16 == self.core {
                    out.push((pgid, self.primaries.mapping(map, pool, pgid).up.clone()));
                }
            }
        }
        out
    }

    /// Logs PGs whose peering has not finished within [`PEERING_TIMEOUT`] (once per
    /// timeout each), saying what they wait for.
    pub(super) fn report_stuck_peerings(&mut self) {
        let now = self.now;
        for (pgid, pg) in &mut self.pgs {
            let Some(p) = pg.peering.as_mut() else { continue };
            if now.saturating_sub(p.started) < PEERING_TIMEOUT {
                continue;
            }
            p.started = now;
            let what = match &p.phase {
                Phase::GetInfo => format!("the logs of {:?}", p.waiting),
                Phase::Pull { from, objects, in_flight, failed, .. } => format!(
                    "pulls from {from} ({} left, {in_flight} in flight{})",
                    objects.len(),
                    if *failed { ", one failed" } else { "" }
                ),
                Phase::OwnLog => "its own log".to_string(),
                Phase::List { waiting, failed: None, .. } => {
                    format!("the object listings of {waiting:?} (backfill)")
                }
                Phase::List { failed: Some(why), .. } => format!("a new interval ({why})"),
                Phase::WaitLease => "a previous primary's read lease".to_string(),
                Phase::Push(t) => {
                    let left: Vec<String> = t
                        .iter()
                        .filter(|(_, t)| !t.done)
                        .map(|(o, t)| {
                            format!("{o}: {} left, {} in flight", t.objects.len(), t.in_flight)
                        })
                        .collect();
                    format!("pushes ({})", left.join("; "))
                }
            };
            tracing::warn!("PG {pgid}: peering for epoch {} is stuck waiting for {what}", p.epoch);
        }
    }

    /// Whether ops for `pgid` must wait: this OSD leads it but it is not active with
    /// this acting set yet.
    pub(super) fn must_hold(&mut self, pgid: PgId, acting: &[OsdId]) -> bool {
        let Some(view) = self.view.clone() else { return true };
        let ready = |pg: &Pg| {
            pg.active_with.as_ref().is_some_and(|i| is_interval(i, &view.map, acting))
                && pg.peering.is_none()
                && !pg.want_peer
        };
        let pg = self.pgs.entry(pgid).or_default();
        if ready(pg) {
            return false;
        }
        if pg.peering.is_none() && !pg.want_peer {
            // A map change not seen through `peer_all` (cannot happen, but never hold
            // an op without peering under way).
            let epoch = self.epoch();
            self.start_peering(pgid, acting.to_vec(), epoch);
            return !ready(self.pgs.get(&pgid).expect("entered above"));
        }
        true
    }

    /// Holds a client op until the PG is active (or answers `Again` when too many wait).
    pub(super) fn hold(&mut self, pgid: PgId, origin: Origin, tid: u64, payload: &[u8]) {
        let pg = self.pgs.entry(pgid).or_default();
        if pg.held.len() >= MAX_HELD {
            let m = format!("PG {pgid} is peering and {MAX_HELD} ops wait for it already");
            return self.error(origin, tid, Status::Again, &m);
        }
        pg.held.push_back((origin, payload.to_vec()));
    }

    /// Routes a PG's held ops again (it went active, or is not ours any more, or its read
    /// lease was renewed).
    pub(super) fn release_held(&mut self, pgid: PgId) {
        let Some(pg) = self.pgs.get_mut(&pgid) else { return };
        let held = std::mem::take(&mut pg.held);
        let now = self.now;
        for (origin, payload) in held {
            // Their caps were checked when they arrived.
            self.handle(origin, &payload, now, None);
        }
    }

    pub(super) fn start_peering(&mut self, pgid: PgId, acting: Vec<OsdId>, epoch: u64) {
        self.stop_scrub(pgid);
        let pg = self.pgs.entry(pgid).or_default();
        if !pg.inflight.is_empty() {
            // Started when the writes in flight are done (`after_writes`).
            pg.want_peer = true;
            pg.peering = None;
            return;
        }
        pg.want_peer = false;
        // Leading it now: a backfill this OSD was receiving is over (it recovers itself).
        if pg.backfilling {
            pg.end_backfilling();
        }
        if !pg.backfills.is_empty() {
            // A new interval starts them again (the targets report version 0).
            tracing::info!(
                "PG {pgid}: backfills of {:?} stopped by a new interval",
                pg.backfills.keys()
            );
            pg.backfills.clear();
        }
        // Replicated writes of older intervals are refused from now on.
        pg.interval_epoch = pg.interval_epoch.max(epoch);
        let replicas: Vec<OsdId> = acting[1..].to_vec();
        tracing::debug!("PG {pgid}: peering at epoch {epoch} with acting set {acting:?}");
        let interval = match &self.view {
            Some(v) => interval_of(&v.map, &acting),
            None => return,
        };
        let now = self.now;
        let pg = self.pgs.get_mut(&pgid).expect("entered above");
        // A lease this OSD granted another primary as a member is waited out too.
        let prior_leases = vec![(pg.lease_ub, pg.lease_by)];
        pg.peering = Some(Box::new(Peering {
            epoch,
            acting: acting.clone(),
            interval,
            started: now,
            infos: HashMap::new(),
            waiting: replicas.clone(),
            phase: Phase::GetInfo,
            behind: Vec::new(),
            backfill: Vec::new(),
            backfill_pending: BTreeMap::new(),
            prior_leases,
            prior_readable: MonoTime::ZERO,
        }));
        self.pg_dirty = true;
        // Writes that waited for a backfill copy now wait for the peering.
        self.release_backfill_held(pgid);
        if replicas.is_empty() {
            return self.choose(pgid);
        }
        let mut b = Vec::new();
        PgQuery { epoch, pool: pgid.pool.0, pg: pgid.pg }.encode(&mut b);
        for osd in replicas {
            self.send_peer(pgid, osd, rep::MSG_PG_QUERY, &b);
        }
    }

    /// Sends to the core of `osd` that owns `pgid`; a member without an address is
    /// logged (the map that took it away starts peering again).
    pub(super) fn send_peer(&mut self, pgid: PgId, osd: OsdId, msg_type: u16, payload: &[u8]) {
        let Some(view) = &self.view else { return };
        let r = peers::core_addr(&view.map, osd, |n| placement::pg_core(pgid, n))
            .ok_or_else(|| format!("{osd} has no address at epoch {}", view.map.epoch))
            .and_then(|addr| self.peers.send(osd, addr, msg_type, &[payload]));
        if let Err(e) = r {
            tracing::warn!("PG {pgid}: to {osd}: {e}");
        }
    }

    /// The PG's writes in flight are done: peering that waited for them starts, and
    /// queries that waited for them are answered.
    pub(super) fn after_writes(&mut self, pgid: PgId) {
        let Some(pg) = self.pgs.get_mut(&pgid) else { return };
        if !pg.inflight.is_empty() {
            return;
        }
        for (cookie, q) in std::mem::take(&mut pg.queries) {
            self.answer_query(cookie, q);
        }
        self.maybe_start_scrub(pgid);
        // A backfill closing waits for no writes in flight.
        self.backfill_more(pgid);
        let Some(pg) = self.pgs.get_mut(&pgid) else { return };
        if pg.want_peer
            && let Some(view) = self.view.clone()
            && let Some(pool) = view.map.pools.get(&pgid.pool)
        {
            let acting = self.primaries.mapping(&view.map, pool, pgid).up.clone();
            if acting.first() == Some(&view.me) {
                self.start_peering(pgid, acting, view.map.epoch);
            } else if let Some(pg) = self.pgs.get_mut(&pgid) {
                pg.want_peer = false;
            }
        }
    }

    /// A member's side: a primary asks for this PG's log.
    pub(super) fn on_pg_query(&mut self, cookie: u64, q: PgQuery) {
        let pgid = PgId { pool: PoolId(q.pool), pg: q.pg };
        let pg = self.pgs.entry(pgid).or_default();
        if q.epoch >= pg.interval_epoch {
            // Another primary peers for a newer interval: reads stop here at once (it
            // waits out only the leases the members report).
            pg.readable_until = MonoTime::ZERO;
            pg.lease_waiting.clear();
        }
        if pg.backfilling && q.epoch >= pg.interval_epoch {
            // A new interval: its primary decides afresh, and sends a new start if it
            // backfills it; until then writes are checked and logged as usual.
            tracing::info!(
                "PG {pgid}: a backfill here ends with the interval of epoch {}",
                q.epoch
            );
            pg.end_backfilling();
        }
        pg.interval_epoch = pg.interval_epoch.max(q.epoch);
        if pg.inflight.is_empty() {
            self.answer_query(cookie, q);
        } else {
            pg.queries.push((cookie, q));
        }
    }

    fn answer_query(&mut self, cookie: u64, q: PgQuery) {
        let pgid = PgId { pool: PoolId(q.pool), pg: q.pg };
        let pg = self.pgs.entry(pgid).or_default();
        let encoded: Vec<(u64, Vec<u8>)> =
            pg.log.iter().map(|(v, l)| (*v, l.entry().encode())).collect();
        let last_version = pg.version;
        let (lease_remaining_us, lease_by) = self.lease_info(pgid);
        let info = PgInfo {
            epoch: q.epoch,
            pool: q.pool,
            pg: q.pg,
            last_version,
            entries: encoded.iter().map(|(v, e)| (*v, &e[..])).collect(),
            lease_remaining_us,
            lease_by,
        };
        info.encode(&mut self.reply_buf);
        self.replies.push((cookie, rep::MSG_PG_INFO, self.reply_buf.len()));
    }

    /// The primary's side: a member's log arrived.
    pub(super) fn on_pg_info(&mut self, from: OsdId, info: PgInfo<'_>) {
        let pgid = PgId { pool: PoolId(info.pool), pg: info.pg };
        let Some(p) = self.pgs.get_mut(&pgid).and_then(|pg| pg.peering.as_mut()) else {
            return;
        };
        if p.epoch != info.epoch || !matches!(p.phase, Phase::GetInfo) {
            return; // an earlier peering's answer
        }
        let Some(at) = p.waiting.iter().position(|o| *o == from) else { return };
        if info.lease_remaining_us > 0 {
            // Measured from now, after the answer travelled: later, never earlier.
            let until = lease::clock().after(Duration::from_micros(info.lease_remaining_us));
            p.prior_leases.push((until, info.lease_by.map(|(o, u)| (OsdId(o), u))));
        }
        let mut log = BTreeMap::new();
        for (v, e) in &info.entries {
            match LogEntry::decode(e).filter(|_| *v > 0) {
                Some(e) => {
                    log.insert(*v, Logged::from_entry(e));
                }
                None => {
                    tracing::error!("PG {pgid}: {from} sent an undecodable log entry {v}");
                    return;
                }
            }
        }
        p.waiting.swap_remove(at);
        p.infos.insert(from, Info { version: info.last_version, log });
        if p.waiting.is_empty() {
            self.choose(pgid);
        }
    }

    /// Every info is in: choose the authoritative log and recover.
    fn choose(&mut self, pgid: PgId) {
        let me = self.view.as_ref().expect("peering needs a map").me;
        let pg = self.pgs.get_mut(&pgid).expect("peering PG");
        let p = pg.peering.as_mut().expect("peering");
        let mine = last_of(&pg.log);
        let auth = p
            .infos
            .iter()
            .map(|(o, i)| (last_of(&i.log), *o))
            .filter(|(last, _)| *last > mine)
            .max()
            .map(|(_, o)| o);
        // Copies a scrub found bad here come from a member whose copies of them are good.
        let mine_bad = pg.repair.get(&me).cloned().unwrap_or_default();
        let good_for_me = |o: &OsdId| pg.repair.get(o).is_none_or(|b| b.is_disjoint(&mine_bad));
        let auth = auth.or_else(|| {
            (!mine_bad.is_empty())
                .then(|| p.infos.keys().copied().filter(good_for_me).min())
                .flatten()
        });
        let Some(from) = auth else {
            return self.start_push(pgid);
        };
        let info = &p.infos[&from];
        match plan(&info.log, &pg.log, pg.version) {
            Ok((mut objects, entries)) => {
                objects.extend(mine_bad);
                tracing::info!(
                    "PG {pgid}: {from} has the authoritative log (v{} against v{}): pulling {} object(s)",
                    info.version,
                    pg.version,
                    objects.len()
                );
                p.phase = Phase::Pull {
                    from,
                    objects: objects.into_iter().collect(),
                    in_flight: 0,
                    entries,
                    version: info.version.max(pg.version),
                    trim_upto: 0,
                    failed: false,
                };
                self.pull_more(pgid);
            }
            Err(why) => {
                // Every object of `from`, and every one here (those it lacks go).
                let version = info.version.max(pg.version);
                let mut plan = log_plan(&info.log, &pg.log);
                plan.0.extend(mine_bad);
                let trim = trim_before(&info.log);
                tracing::info!(
                    "PG {pgid}: this primary ({me}) is {why} of {from}: backfilling from it"
                );
                p.backfill = vec![me];
                self.next_scrub_id += 1;
                let id = self.next_scrub_id;
                let p =
                    self.pgs.get_mut(&pgid).and_then(|pg| pg.peering.as_mut()).expect("peering");
                p.phase = Phase::List {
                    id,
                    waiting: vec![from, me],
                    names: HashMap::new(),
                    pull: Some(Pulling { from, plan, version, trim_upto: trim }),
                    push: HashMap::new(),
                    failed: None,
                };
                self.list_objects(pgid, id, &[from, me]);
            }
        }
    }

    fn pull_more(&mut self, pgid: PgId) {
        let mut room = self.recovery_room();
        let Some(pg) = self.pgs.get_mut(&pgid) else { return };
        let mine = pg.version;
        let Some(p) = pg.peering.as_mut() else { return };
        let epoch = p.epoch;
        let Phase::Pull { from, objects, in_flight, entries, version, trim_upto, failed } =
            &mut p.phase
        else {
            return;
        };
        if *failed {
            return tracing::error!(
                "PG {pgid}: pulling from {from} failed; the PG stays peering until the next interval"
            );
        }
        let from = *from;
        let mut send = Vec::new();
        while *in_flight < MAX_PUSHES_PER_PEER
            && room > 0
            && let Some(o) = objects.pop_front()
        {
            *in_flight += 1;
            room -= 1;
            send.push(o);
        }
        if !objects.is_empty() && room == 0 && !self.recovery_queue.contains(&pgid) {
            self.recovery_queue.push_back(pgid); // a slot frees when an object is done
        }
        if send.is_empty() && *in_flight == 0 && objects.is_empty() {
            if entries.is_empty() && *version == mine && *trim_upto == 0 {
                // A repair's pulls only: the log is the same.
                return self.start_push(pgid);
            }
            // Every object is here: the log follows, a transaction per piece.
            let entries = std::mem::take(entries);
            let (version, trim) = (*version, *trim_upto);
            p.phase = Phase::OwnLog;
            let pieces = log_pieces(entries);
            let n = pieces.len();
            for (i, piece) in pieces.into_iter().enumerate() {
                let trim = if i == 0 { trim } else { 0 };
                let last = i + 1 == n;
                let set = last.then_some(version);
                self.apply_push(pgid, epoch, None, piece, last, set, trim, None);
            }
            return;
        }
        for object in send {
            let mut b = Vec::new();
            Pull { epoch, pool: pgid.pool.0, pg: pgid.pg, object: &object }.encode(&mut b);
            self.send_peer(pgid, from, rep::MSG_PULL, &b);
        }
    }

    /// The primary is authoritative: plan what each member needs and start pushing.
    fn start_push(&mut self, pgid: PgId) {
        let me = self.view.as_ref().expect("peering needs a map").me;
        let pg = self.pgs.get_mut(&pgid).expect("peering PG");
        let p = pg.peering.as_mut().expect("peering");
        let mut targets = HashMap::new();
        let mut backfill = Vec::new();
        for (osd, info) in &p.infos {
            let plan = plan(&pg.log, &info.log, info.version);
            let (plan, trim_upto) = match plan {
                Ok(plan) => (Ok(plan), 0),
                Err(why) => {
                    tracing::info!("PG {pgid}: {osd} is {why}: backfilling it");
                    backfill.push(*osd);
                    (Ok(log_plan(&pg.log, &info.log)), trim_before(&pg.log))
                }
            };
            let plan = plan.map(|(mut objects, entries): Plan| {
                // Copies a scrub found bad there.
                objects.extend(pg.repair.get(osd).into_iter().flatten().cloned());
                (objects, entries)
            });
            match plan {
                Ok((objects, entries))
                    if objects.is_empty() && entries.is_empty() && trim_upto == 0 => {}
                Ok((objects, entries)) => {
                    if trim_upto == 0 {
                        tracing::info!(
                            "PG {pgid}: recovering {osd} (v{} -> v{}): {} object(s), {} log entries",
                            info.version,
                            pg.version,
                            objects.len(),
                            entries.len()
                        );
                    }
                    targets.insert(
                        *osd,
                        Target {
                            objects: objects.into_iter().collect(),
                            in_flight: 0,
                            entries,
                            trim_upto,
                            begin: false,
                            log_sent: false,
                            done: false,
                        },
                    );
                }
                Err::<_, String>(why) => {
                    tracing::error!("PG {pgid}: {osd}: {why}; it stays behind");
                    p.behind.push(*osd);
                }
            }
        }
        if backfill.is_empty() {
            p.phase = Phase::Push(targets);
            return self.push_more(pgid);
        }
        // Every object here and there (those the primary lacks go) is pushed.
        backfill.sort();
        p.backfill = backfill.clone();
        self.next_scrub_id += 1;
        let id = self.next_scrub_id;
        let p = self.pgs.get_mut(&pgid).and_then(|pg| pg.peering.as_mut()).expect("peering");
        backfill.push(me);
        p.phase = Phase::List {
            id,
            waiting: backfill.clone(),
            names: HashMap::new(),
            pull: None,
            push: targets,
            failed: None,
        };
        self.list_objects(pgid, id, &backfill);
    }

    /// Asks `members` (this OSD among them) for the names of the PG's objects (a
    /// shallow scrub map, as a scrub's; see `listed`).
    fn list_objects(&mut self, pgid: PgId, id: u64, members: &[OsdId]) {
        let Some(view) = self.view.clone() else { return };
        let epoch = self.pgs.get(&pgid).and_then(|pg| pg.peering.as_ref()).map_or(0, |p| p.epoch);
        let mut b = Vec::new();
        rep::Scrub { epoch, pool: pgid.pool.0, pg: pgid.pg, id, deep: false }.encode(&mut b);
        for osd in members {
            if *osd == view.me {
                self.list_own(pgid, id, epoch);
            } else {
                self.send_peer(pgid, *osd, rep::MSG_SCRUB, &b);
            }
        }
    }

    /// A listing for a backfill arrived (`error`: the member could not make one).
    pub(super) fn listed(
        &mut self,
        pgid: PgId,
        from: OsdId,
        id: u64,
        error: Option<String>,
        names: BTreeSet<String>,
    ) {
        let Some(p) = self.pgs.get_mut(&pgid).and_then(|pg| pg.peering.as_mut()) else { return };
        let Phase::List { id: want, waiting, names: all, failed, .. } = &mut p.phase else {
            return;
        };
        let Some(at) = waiting.iter().position(|o| *o == from).filter(|_| *want == id) else {
            return; // an earlier peering's
        };
        waiting.swap_remove(at);
        if let Some(e) = error {
            *failed = Some(format!("listing the objects of {from}: {e}"));
        }
        all.insert(from, names);
        if !waiting.is_empty() {
            return;
        }
        let me = self.view.as_ref().expect("peering needs a map").me;
        let phase = std::mem::replace(&mut p.phase, Phase::GetInfo);
        let Phase::List { mut names, pull, mut push, failed, .. } = phase else {
            unreachable!("matched above")
        };
        if let Some(why) = failed {
            // Stays so: the next interval (or `sluice osd down` of the member) tries again.
            tracing::error!("PG {pgid}: backfill: {why}; the PG stays peering");
            p.phase = Phase::List {
                id: 0,
                waiting: Vec::new(),
                names: HashMap::new(),
                pull,
                push,
                failed: Some(why),
            };
            return;
        }
        let mine = names.remove(&me).unwrap_or_default();
        match pull {
            Some(Pulling { from, plan: (mut objects, entries), version, trim_upto }) => {
                objects.extend(mine);
                objects.extend(names.remove(&from).unwrap_or_default());
                tracing::info!(
                    "PG {pgid}: backfilling this primary from {from}: {} object(s)",
                    objects.len()
                );
                p.phase = Phase::Pull {
                    from,
                    objects: objects.into_iter().collect(),
                    in_flight: 0,
                    entries,
                    version,
                    trim_upto,
                    failed: false,
                };
                self.pull_more(pgid);
            }
            None => {
                // The replica starts over (its log goes) and gets every object of either
                // list, alongside writes, once the PG is active (the `backfill` module).
                for (osd, theirs) in names {
                    let t = push.get_mut(&osd).expect("a backfill target has a target");
                    let mut objects: BTreeSet<String> =
                        std::mem::take(&mut t.objects).into_iter().collect();
                    objects.extend(mine.iter().cloned());
                    objects.extend(theirs);
                    tracing::info!(
                        "PG {pgid}: backfilling {osd}: {} object(s), alongside writes",
                        objects.len()
                    );
                    t.entries.clear();
                    t.trim_upto = u64::MAX;
                    t.begin = true;
                    p.backfill_pending.insert(osd, objects);
                }
                p.phase = Phase::Push(push);
                self.push_more(pgid);
            }
        }
    }

    /// Starts reads for the next objects of every member being recovered, sends the log
    /// to members whose objects are all there, and activates when all are done.
    fn push_more(&mut self, pgid: PgId) {
        let mut room = self.recovery_room();
        let Some(pg) = self.pgs.get_mut(&pgid) else { return };
        let version = pg.version;
        let Some(p) = pg.peering.as_mut() else { return };
        let epoch = p.epoch;
        let Phase::Push(targets) = &mut p.phase else { return };
        let mut reads = Vec::new();
        let mut logs = Vec::new();
        let mut starved = false;
        for (osd, t) in targets.iter_mut() {
            if t.done {
                continue;
            }
            while t.in_flight < MAX_PUSHES_PER_PEER
                && room > 0
                && let Some(o) = t.objects.pop_front()
            {
                t.in_flight += 1;
                room -= 1;
                reads.push((*osd, o));
            }
            starved |= !t.objects.is_empty() && room == 0;
            if t.objects.is_empty() && t.in_flight == 0 && !t.log_sent {
                t.log_sent = true;
                logs.push((*osd, std::mem::take(&mut t.entries), t.trim_upto, t.begin));
            }
        }
        let all_done = targets.values().all(|t| t.done);
        if starved && !self.recovery_queue.contains(&pgid) {
            self.recovery_queue.push_back(pgid); // a slot frees when an object is done
        }
        for (osd, entries, trim_upto, begin) in logs {
            let (last_version, step) = match begin {
                true => (0, rep::BackfillStep::Begin),
                false => (version, rep::BackfillStep::None),
            };
            self.send_log(pgid, osd, epoch, entries, last_version, trim_upto, step);
        }
        for (osd, object) in reads {
            self.recovery_read(pgid, object, PushTo::Peer(osd), epoch);
        }
        if all_done {
            self.activate(pgid);
        }
    }

    /// Sends `entries` to `osd` as log pushes of at least one piece: the first trims the
    /// member's log up to `trim_upto`, the last sets its version to `last_version` and is
    /// acknowledged; every piece carries `step`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn send_log(
        &mut self,
        pgid: PgId,
        osd: OsdId,
        epoch: u64,
        entries: Vec<(u64, Logged)>,
        last_version: u64,
        trim_upto: u64,
        step: rep::BackfillStep,
    ) {
        let pieces = log_pieces(entries);
        let n = pieces.len();
        for (i, piece) in pieces.into_iter().enumerate() {
            let encoded: Vec<(u64, Vec<u8>)> =
                piece.iter().map(|(v, l)| (*v, l.entry().encode())).collect();
            let push = Push {
                epoch,
                pool: pgid.pool.0,
                pg: pgid.pg,
                object: None,
                entries: encoded.iter().map(|(v, e)| (*v, &e[..])).collect(),
                last: i + 1 == n,
                last_version,
                trim_upto: if i == 0 { trim_upto } else { 0 },
                backfill: step,
            };
            let mut b = Vec::new();
            push.encode(&mut b);
            self.send_peer(pgid, osd, rep::MSG_PUSH, &b);
        }
    }

    pub(super) fn activate(&mut self, pgid: PgId) {
        let pg = self.pgs.get_mut(&pgid).expect("peering PG");
        let p = pg.peering.as_mut().expect("peering");
        let now = lease::clock();
        if !p.waits_for_leases()
            && let Some(view) = &self.view
        {
            // Holders that answered this peering (the same boot) dropped their reads.
            let me = view.me;
            let void = |by: &Option<(OsdId, u64)>| {
                by.is_some_and(|(o, u)| {
                    (o == me || p.infos.contains_key(&o)) && u == up_from(&view.map, o)
                })
            };
            p.prior_readable = p
                .prior_leases
                .iter()
                .filter(|(_, by)| !void(by))
                .map(|(t, _)| *t)
                .max()
                .unwrap_or(MonoTime::ZERO);
        }
        if p.prior_readable > now {
            tracing::info!(
                "PG {pgid}: recovered at epoch {}; waiting {:?} for a previous primary's read \
                 lease to run out",
                p.epoch,
                p.prior_readable.saturating_sub(now)
            );
            p.phase = Phase::WaitLease;
            let (until, epoch) = (p.prior_readable, p.epoch);
            self.lease_waits.push((until, pgid, epoch));
            self.pg_dirty = true;
            return;
        }
        let p = pg.peering.take().expect("peering");
        let members: Vec<String> = p.acting.iter().map(|o| o.to_string()).collect();
        tracing::info!(
            "PG {pgid}: active at epoch {} with [{}] (v{})",
            p.epoch,
            members.join(", "),
            pg.version
        );
        let min_size = self
            .view
            .as_ref()
            .and_then(|v| v.map.pools.get(&pgid.pool))
            .map_or(usize::MAX, |pool| usize::from(pool.min_size));
        // Members left behind, and those being backfilled, are not copies.
        let pending = p.backfill_pending.keys().filter(|o| !p.behind.contains(o)).count();
        let copies = p.acting.len().saturating_sub(p.behind.len() + pending);
        let enough = copies >= min_size;
        pg.active_with = Some(p.interval);
        pg.behind = p.behind;
        for (osd, pending) in p.backfill_pending {
            if !pg.behind.contains(&osd) {
                pg.backfills.insert(osd, backfill::Backfill::new(p.epoch, pending));
            }
        }
        // Periodic scrubs count from when this OSD first leads the PG.
        let mono = self.now;
        if pg.scrub_stamp == MonoTime::ZERO {
            pg.scrub_stamp = mono;
            pg.deep_scrub_stamp = mono;
        }
        if !pg.repair.is_empty() {
            tracing::info!("PG {pgid}: repaired {} member(s)' copies", pg.repair.len());
            pg.repair.clear();
        }
        self.pg_dirty = true;
        if enough {
            self.answer_parked(pgid, false);
        }
        // Reads wait for the first lease round (writes go on meanwhile).
        self.lease_round(vec![(pgid, p.acting)]);
        self.release_held(pgid);
        self.backfill_more(pgid);
        // A scrub asked for meanwhile (or the one that checks a repair) holds new writes.
        self.maybe_start_scrub(pgid);
    }

    /// Answers the writes that waited for the PG: done if their entry is (still) in the
    /// log, else (rolled back by peering, or `gone`: this OSD no longer leads the PG)
    /// told to retry, which applies them once.
    pub(super) fn answer_parked(&mut self, pgid: PgId, gone: bool) {
        let Some(pg) = self.pgs.get_mut(&pgid) else { return };
        let parked = std::mem::take(&mut pg.parked);
        let epoch = self.epoch();
        let objects: Vec<String> = parked.iter().map(|w| w.object.clone()).collect();
        for w in parked {
            let pg = self.pgs.get_mut(&pgid).expect("checked above");
            let logged = pg.log.get(&w.version).is_some_and(|l| l.reqid == w.reqid);
            if logged && !gone {
                pg.done.insert(w.reqid, w.version);
                let reply = Reply {
                    tid: w.tid,
                    epoch,
                    status: Status::Ok,
                    version: w.version,
                    message: "",
                    body: Body::None,
                };
                self.reply(w.origin, &reply);
                for (o, tid) in w.dups {
                    self.reply(o, &Reply { tid, ..reply.clone() });
                }
            } else {
                let m = if gone {
                    format!("PG {pgid} moved to another primary; resend")
                } else {
                    format!("PG {pgid} v{} was rolled back by peering; resend", w.version)
                };
                self.error(w.origin, w.tid, Status::Again, &m);
                for (o, tid) in w.dups {
                    self.error(o, tid, Status::Again, &m);
                }
            }
        }
        self.done_writing(pgid, &objects);
    }

    /// A member's answer to a push: an object (or, once all were acknowledged, the log).
    pub(super) fn on_push_ack(&mut self, from: OsdId, r: RepReply<'_>) {
        let pgid = PgId { pool: PoolId(r.pool), pg: r.pg };
        let Some(p) = self.pgs.get_mut(&pgid).and_then(|pg| pg.peering.as_mut()) else {
            return self.on_backfill_ack(from, r);
        };
        if p.epoch != r.version {
            return; // an earlier peering's
        }
        let Phase::Push(targets) = &mut p.phase else { return };
        let Some(t) = targets.get_mut(&from) else { return };
        if r.status != Status::Ok {
            tracing::error!("PG {pgid}: recovering {from} failed: {}; it stays behind", r.message);
            t.done = true;
            p.behind.push(from);
        } else if t.done {
        } else if !r.message.is_empty() {
            // An object's (it names it); a log's names none. One of an earlier peering
            // at the same epoch (a repair) may arrive first: never taken for the log's.
            t.in_flight = t.in_flight.saturating_sub(1);
        } else if t.log_sent {
            tracing::info!("PG {pgid}: {from} recovered");
            t.done = true;
        }
        self.push_more(pgid);
        self.kick_recovery();
    }

    /// Objects recovery may start copying now on this core: its share of
    /// `osd_recovery_max_active` less those in flight over all its PGs.
    pub(super) fn recovery_room(&self) -> usize {
        let max = self.view.as_ref().map_or(8, |v| v.tuning.recovery_max_active);
        let cap = (max / self.cores.max(1)).max(1);
        let busy: usize = self
            .pgs
            .values()
            .map(|pg| {
                let backfills: usize = pg.backfills.values().map(|b| b.in_flight.len()).sum();
                backfills
                    + pg.peering.as_ref().map_or(0, |p| match &p.phase {
                        Phase::Pull { in_flight, .. } => *in_flight,
                        Phase::Push(t) => t.values().map(|t| t.in_flight).sum(),
                        _ => 0,
                    })
            })
            .sum();
        cap.saturating_sub(busy)
    }

    /// Recovery slots freed (or the tick): PGs that waited for one go on.
    pub(super) fn kick_recovery(&mut self) {
        while self.recovery_room() > 0
            && let Some(pgid) = self.recovery_queue.pop_front()
        {
            let Some(pg) = self.pgs.get(&pgid) else { continue };
            match pg.peering.as_ref().map(|p| &p.phase) {
                Some(Phase::Pull { .. }) => self.pull_more(pgid),
                Some(Phase::Push(_)) => self.push_more(pgid),
                None if !pg.backfills.is_empty() => self.backfill_more(pgid),
                _ => {}
            }
        }
    }

    /// Reads an object's state for a push: its size, its xattrs, then its data a
    /// [`PUSH_CHUNK_BYTES`] piece at a time, each piece pushed as it is read.
    pub(super) fn recovery_read(&mut self, pgid: PgId, object: String, to: PushTo, epoch: u64) {
        let coll = CollId(pgid.collection());
        let q = Query::Stat { coll, name: object.clone() };
        self.recovery_query(pgid, object, to, ReadStage::Stat { epoch }, q);
    }

    fn recovery_query(
        &mut self,
        pgid: PgId,
        object: String,
        to: PushTo,
        stage: ReadStage,
        q: Query,
    ) {
        let kind = Kind::RecoveryRead { pg: pgid, object, to, stage };
        let slot =
            self.ops.insert(Pending { origin: Origin::Local(0), tid: 0, kind, dups: Vec::new() });
        self.shard.query(q, slot as u64);
    }

    /// A recovery read finished: the next query, and a push when a piece is read.
    pub(super) fn recovery_read_done(
        &mut self,
        pgid: PgId,
        object: String,
        to: PushTo,
        stage: ReadStage,
        result: Result<Option<Answer>, StoreError>,
    ) {
        let coll = CollId(pgid.collection());
        let epoch = stage.epoch();
        if let PushTo::Peer(_) = to {
            // A read for an earlier peering (this PG peered again since): dropped.
            let current = self.pgs.get(&pgid).and_then(|pg| pg.peering.as_ref());
            if !current.is_some_and(|p| p.epoch == epoch && matches!(p.phase, Phase::Push(_))) {
                return tracing::debug!("PG {pgid}: a recovery read of an earlier peering");
            }
        }
        if let PushTo::Backfill(osd) = to
            && !self.pgs.get(&pgid).is_some_and(|pg| {
                pg.backfills
                    .get(&osd)
                    .is_some_and(|b| b.epoch == epoch && b.in_flight.contains(&object))
            })
        {
            return tracing::debug!("PG {pgid}: a backfill read of an earlier interval");
        }
        let chunk = |offset: u64, size: u64| (size - offset).min(PUSH_CHUNK_BYTES as u64);
        let (size, offset, data, xattrs) = match (stage, result) {
            // Gone (or never there): the member must not have it either.
            (_, Err(StoreError::NotFound(_))) => (None, 0, Vec::new(), BTreeMap::new()),
            (_, Err(e)) => return self.recovery_failed(pgid, &object, to, &e.to_string()),
            (ReadStage::Stat { .. }, Ok(Some(Answer::Stat(st)))) => {
                let q = Query::GetXattrs { coll, name: object.clone() };
                return self.recovery_query(
                    pgid,
                    object,
                    to,
                    ReadStage::Xattrs { epoch, size: st.size },
                    q,
                );
            }
            (ReadStage::Xattrs { size, .. }, Ok(Some(Answer::Xattrs(x)))) if size > 0 => {
                let q = Query::Read { coll, name: object.clone(), offset: 0, len: chunk(0, size) };
                let stage = ReadStage::Data { epoch, size, offset: 0, xattrs: Some(x) };
                return self.recovery_query(pgid, object, to, stage, q);
            }
            (ReadStage::Xattrs { size, .. }, Ok(Some(Answer::Xattrs(x)))) => {
                (Some(size), 0, Vec::new(), x)
            }
            (ReadStage::Data { size, offset, xattrs, .. }, Ok(Some(Answer::Data(d)))) => {
                let data = d.data().to_vec();
                if data.len() as u64 != chunk(offset, size) {
                    // Objects do not change while their PG recovers (ops are held).
                    let m = format!("read {} bytes at {offset} of {size}", data.len());
                    return self.recovery_failed(pgid, &object, to, &m);
                }
                let next = offset + data.len() as u64;
                if next < size {
                    let q = Query::Read {
                        coll,
                        name: object.clone(),
                        offset: next,
                        len: chunk(next, size),
                    };
                    let stage = ReadStage::Data { epoch, size, offset: next, xattrs: None };
                    self.recovery_query(pgid, object.clone(), to, stage, q);
                }
                (Some(size), offset, data, xattrs.unwrap_or_default())
            }
            (stage, Ok(a)) => panic!("recovery read {stage:?} answered {a:?}"),
        };
        let push = Push {
            epoch,
            pool: pgid.pool.0,
            pg: pgid.pg,
            object: Some(ObjectState {
                name: &object,
                exists: size.is_some(),
                size: size.unwrap_or(0),
                offset,
                data: &data,
                xattrs: xattrs.iter().map(|(k, v)| (k.as_str(), &v[..])).collect(),
            }),
            entries: Vec::new(),
            last: false,
            last_version: 0,
            trim_upto: 0,
            backfill: rep::BackfillStep::None,
        };
        match to {
            PushTo::Peer(osd) | PushTo::Backfill(osd) => {
                let mut b = Vec::with_capacity(data.len() + 256);
                push.encode(&mut b);
                self.send_peer(pgid, osd, rep::MSG_PUSH, &b);
            }
            PushTo::Session(cookie) => {
                push.encode(&mut self.reply_buf);
                self.replies.push((cookie, rep::MSG_PUSH, self.reply_buf.len()));
            }
        }
    }

    fn recovery_failed(&mut self, pgid: PgId, object: &str, to: PushTo, why: &str) {
        tracing::error!("PG {pgid}: reading {object} for recovery: {why}");
        match to {
            PushTo::Peer(osd) => {
                if let Some(p) = self.pgs.get_mut(&pgid).and_then(|pg| pg.peering.as_mut())
                    && let Phase::Push(t) = &mut p.phase
                    && let Some(t) = t.get_mut(&osd)
                {
                    t.in_flight = t.in_flight.saturating_sub(1);
                    t.done = true;
                    p.behind.push(osd);
                }
                self.push_more(pgid);
                self.kick_recovery();
            }
            PushTo::Backfill(osd) => {
                self.backfill_failed(pgid, osd, &format!("reading {object}: {why}"))
            }
            PushTo::Session(cookie) => {
                let m = format!("reading {object}: {why}");
                let r = RepReply {
                    pool: pgid.pool.0,
                    pg: pgid.pg,
                    version: 0,
                    status: Status::Io,
                    message: &m,
                };
                self.rep_reply_as(cookie, rep::MSG_PUSH_ACK, &r);
            }
        }
    }

    /// Refuses a push of the peering at `epoch` (the acknowledgement carries the epoch).
    fn push_refused(&mut self, cookie: u64, pgid: PgId, epoch: u64, status: Status, m: &str) {
        let r = RepReply { pool: pgid.pool.0, pg: pgid.pg, version: epoch, status, message: m };
        self.rep_reply_as(cookie, rep::MSG_PUSH_ACK, &r);
    }

    /// A member's side: the primary pulls an object.
    pub(super) fn on_pull(&mut self, cookie: u64, pull: Pull<'_>) {
        let pgid = PgId { pool: PoolId(pull.pool), pg: pull.pg };
        self.recovery_read(pgid, pull.object.to_string(), PushTo::Session(cookie), pull.epoch);
    }

    /// A pushed object (or the closing log) from the primary (`reply`: its session), or a
    /// pulled object on the primary (`reply` None).
    pub(super) fn on_push(&mut self, reply: Option<u64>, push: Push<'_>) {
        let pgid = PgId { pool: PoolId(push.pool), pg: push.pg };
        let mut entries = Vec::with_capacity(push.entries.len());
        for (v, e) in &push.entries {
            match LogEntry::decode(e) {
                Some(e) => entries.push((*v, Logged::from_entry(e))),
                None => {
                    let m = format!("undecodable log entry {v}");
                    tracing::error!("PG {pgid}: push: {m}");
                    if let Some(cookie) = reply {
                        self.push_refused(cookie, pgid, push.epoch, Status::Invalid, &m);
                    }
                    return;
                }
            }
        }
        let object = push.object.as_ref().map(|o| PushedPiece {
            name: o.name.to_string(),
            exists: o.exists,
            offset: o.offset,
            data: o.data.to_vec(),
            xattrs: o.xattrs.iter().map(|(k, v)| (k.to_string(), v.to_vec())).collect(),
            last: o.is_last(),
        });
        if let Some(cookie) = reply {
            let pg = self.pgs.entry(pgid).or_default();
            if push.epoch < pg.interval_epoch {
                // From a peering a newer primary has superseded.
                let m = format!("push of epoch {} < interval {}", push.epoch, pg.interval_epoch);
                return self.push_refused(cookie, pgid, push.epoch, Status::Again, &m);
            }
        }
        let (last, version, trim) = (push.last, push.last_version, push.trim_upto);
        let mut set_version = (object.is_none() && last).then_some(version);
        if let Some(cookie) = reply {
            let pg = self.pgs.entry(pgid).or_default();
            match push.backfill {
                rep::BackfillStep::Begin => {
                    // From now on the primary's writes are applied here without logging
                    // them, until the closing log push (the `backfill` module).
                    tracing::info!(
                        "PG {pgid}: backfilled by the primary from epoch {}",
                        push.epoch
                    );
                    pg.backfilling = true;
                    pg.backfill_applied = 0;
                    pg.version = 0;
                }
                rep::BackfillStep::Close if !pg.backfilling => {
                    // Restarted since the backfill began (writes sent to the earlier
                    // process may be lost): it must start over, not look complete.
                    let m = format!("PG {pgid}: not being backfilled here (restarted?)");
                    tracing::warn!("refused a closing backfill log: {m}");
                    return self.push_refused(cookie, pgid, push.epoch, Status::Again, &m);
                }
                rep::BackfillStep::Close if last => {
                    // The writes that follow it are logged again, at versions after
                    // this one (they may reach this core before the push is durable,
                    // so the version is set now, never set back).
                    pg.backfilling = false;
                    pg.version = version;
                    set_version = None;
                }
                rep::BackfillStep::Close => {} // an earlier piece: entries only
                rep::BackfillStep::None if set_version.is_some() => {
                    // A peering's closing log: whatever backfill ran here is over.
                    pg.backfilling = false;
                }
                rep::BackfillStep::None => {}
            }
        }
        self.apply_push(pgid, push.epoch, object, entries, last, set_version, trim, reply);
    }

    /// One transaction: a piece of an object's state and/or log entries (and the
    /// version). The first piece replaces the object; later ones write at their offset.
    #[allow(clippy::too_many_arguments)]
    fn apply_push(
        &mut self,
        pgid: PgId,
        epoch: u64,
        object: Option<PushedPiece>,
        entries: Vec<(u64, Logged)>,
        last: bool,
        set_version: Option<u64>,
        trim_upto: u64,
        reply: Option<u64>,
    ) {
        let coll = CollId(pgid.collection());
        let pg = self.pgs.entry(pgid).or_default();
        let mut txn = Transaction { ops: Vec::new() };
        let created = !pg.exists;
        if created {
            txn.ops.push(TxOp::CreateCollection { coll });
            pg.exists = true;
        }
        // Only the last piece of an object, or of the log, is answered (and a failure).
        let mut answer = last;
        let mut pushed = None;
        if let Some(p) = object {
            answer = p.last;
            let name = p.name;
            pushed = Some(name.clone());
            if p.offset == 0 {
                // Whatever was there goes: the pushed state is the whole object.
                txn.ops.push(TxOp::Touch { coll, name: name.clone() });
                txn.ops.push(TxOp::Delete { coll, name: name.clone() });
                if p.exists {
                    let data = txn_data(&p.data);
                    txn.ops.push(TxOp::WriteFull { coll, name: name.clone(), data });
                    for (key, value) in p.xattrs {
                        txn.ops.push(TxOp::SetXattr { coll, name: name.clone(), key, value });
                    }
                }
            } else {
                txn.ops.push(TxOp::Write { coll, name, offset: p.offset, data: p.data });
            }
        }
        if trim_upto > 0 {
            txn.ops.push(TxOp::PgLogTrim { coll, upto: trim_upto });
        }
        for (v, l) in &entries {
            txn.ops.push(TxOp::PgLogAppend { coll, key: *v, entry: l.entry().encode() });
        }
        let kind = Kind::PushApply {
            pg: pgid,
            epoch,
            object: pushed,
            entries,
            version: set_version,
            trim_upto,
            created,
            reply,
            answer,
        };
        if txn.ops.is_empty() {
            // A log push with nothing to write (a repair copied objects only).
            return self.push_applied(kind, Ok(()));
        }
        let slot =
            self.ops.insert(Pending { origin: Origin::Local(0), tid: 0, kind, dups: Vec::new() });
        if let Err(e) = self.shard.submit(txn, slot as u64) {
            let p = self.ops.remove(slot);
            self.push_applied(p.kind, Err(e));
        }
    }

    /// A push's transaction finished.
    pub(super) fn push_applied(&mut self, kind: Kind, result: Result<(), StoreError>) {
        let Kind::PushApply {
            pg: pgid,
            epoch,
            object,
            entries,
            version,
            trim_upto,
            created,
            reply,
            answer,
        } = kind
        else {
            unreachable!("push_applied takes pushes")
        };
        let pg = self.pgs.get_mut(&pgid).expect("entered at submit");
        match &result {
            Ok(()) => {
                if trim_upto > 0 {
                    pg.trim_log(trim_upto);
                }
                for (v, l) in entries {
                    pg.insert_log(v, l);
                }
                if let Some(v) = version {
                    pg.version = v;
                }
            }
            Err(e) => {
                if created || matches!(e, StoreError::NotFound(Missing::Collection(_))) {
                    pg.exists = false;
                }
                tracing::error!("PG {pgid}: applying a recovery push: {e}");
            }
        }
        match reply {
            Some(_) if !answer && result.is_ok() => {}
            Some(cookie) => {
                // An object's acknowledgement names it (a backfill's primary tracks
                // each object it copies alongside writes).
                let (status, m) = match &result {
                    Ok(()) => (Status::Ok, object.unwrap_or_default()),
                    Err(e) => (status_of(e), e.to_string()),
                };
                let r = RepReply {
                    pool: pgid.pool.0,
                    pg: pgid.pg,
                    version: epoch,
                    status,
                    message: &m,
                };
                self.rep_reply_as(cookie, rep::MSG_PUSH_ACK, &r);
            }
            None => {
                // The primary's own pull or log catching up, for the peering under way.
                let Some(p) = pg.peering.as_mut().filter(|p| p.epoch == epoch) else { return };
                if let Err(e) = result {
                    tracing::error!(
                        "PG {pgid}: recovery of this primary failed ({e}); the PG stays \
                         peering until the next interval"
                    );
                    if let Phase::Pull { failed, .. } = &mut p.phase {
                        *failed = true;
                    }
                    return;
                }
                if !answer {
                    return; // a piece of a pulled object before its last
                }
                match &mut p.phase {
                    Phase::Pull { in_flight, .. } => {
                        *in_flight = in_flight.saturating_sub(1);
                        self.pull_more(pgid);
                        self.kick_recovery();
                    }
                    Phase::OwnLog => self.start_push(pgid),
                    _ => {}
                }
            }
        }
    }

    /// The primary's side: a pulled object arrived, or the member could not read it.
    pub(super) fn on_pulled(&mut self, from: OsdId, push: Push<'_>) {
        let pgid = PgId { pool: PoolId(push.pool), pg: push.pg };
        let expected = self.pgs.get(&pgid).and_then(|pg| pg.peering.as_ref()).is_some_and(|p| {
            p.epoch == push.epoch
                && matches!(&p.phase, Phase::Pull { from: f, in_flight, .. } if *f == from && *in_flight > 0)
        });
        if !expected || push.object.is_none() {
            return tracing::debug!("PG {pgid}: unexpected pushed object from {from}");
        }
        self.on_push(None, push);
    }

    /// The primary's side: a pull failed at the member.
    pub(super) fn on_pull_failed(&mut self, from: OsdId, r: RepReply<'_>) {
        let pgid = PgId { pool: PoolId(r.pool), pg: r.pg };
        tracing::error!(
            "PG {pgid}: pulling from {from} failed: {}; the PG stays peering",
            r.message
        );
    }
}

impl<D: BlockDevice> Core<D> {
    /// The PGs this core leads, as the monitors show them (`sluice pg ls`).
    pub(super) fn pg_reports(&mut self) -> Vec<sluice_control::api::PgReport> {
        let Some(view) = self.view.clone() else { return Vec::new() };
        let mut out = Vec::new();
        for (pgid, acting) in self.core_pgs(&view.map) {
            if acting.first() != Some(&view.me) {
                continue;
            }
            let pool = &view.map.pools[&pgid.pool];
            let pg = self.pgs.get(&pgid);
            let interval = interval_of(&view.map, &acting);
            let active = pg
                .is_some_and(|p| p.active_with.as_ref() == Some(&interval) && p.peering.is_none());
            let behind_n = pg.map_or(0, |p| p.behind.len() + p.backfills.len());
            let behind = behind_n > 0;
            let mut state = Vec::new();
            let mut recovering = 0;
            match pg.and_then(|p| p.peering.as_ref()) {
                _ if active => {
                    // Below min_size a PG peers but takes no writes: Ceph's "peered".
                    let ok =
                        acting.len() - behind_n.min(acting.len()) >= usize::from(pool.min_size);
                    state.push(if ok { "active" } else { "peered" });
                    if ok && pg.is_some_and(|p| p.readable_until <= self.now) {
                        state.push("laggy"); // reads wait for a lease round
                    }
                    if let Some(p) = pg.filter(|p| !p.backfills.is_empty()) {
                        let copying = p.backfills.values().any(|b| !b.in_flight.is_empty());
                        state.push(if copying { "backfilling" } else { "backfill_wait" });
                        recovering = p.backfills.values().map(|b| b.left()).sum();
                    }
                }
                Some(p) => {
                    let copying = if p.backfill.is_empty() { "recovering" } else { "backfilling" };
                    let waiting =
                        if p.backfill.is_empty() { "recovery_wait" } else { "backfill_wait" };
                    match &p.phase {
                        Phase::GetInfo => state.push("peering"),
                        Phase::List { .. } => state.push(copying),
                        Phase::Pull { objects, in_flight, .. } => {
                            state.push(if *in_flight == 0 && !objects.is_empty() {
                                waiting
                            } else {
                                copying
                            });
                            recovering = objects.len() + in_flight;
                        }
                        Phase::OwnLog => state.push(copying),
                        Phase::WaitLease => state.push("wait"),
                        Phase::Push(t) => {
                            let in_flight: usize = t.values().map(|t| t.in_flight).sum();
                            recovering =
                                t.values().map(|t| t.objects.len()).sum::<usize>() + in_flight;
                            state.push(if in_flight == 0 && recovering > 0 {
                                waiting
                            } else {
                                copying
                            });
                        }
                    }
                }
                None => state.push("peering"),
            }
            let undersized = acting.len() < usize::from(pool.size);
            if undersized {
                state.push("undersized");
            }
            let copying =
                state.iter().any(|s| s.starts_with("backfill") || s.starts_with("recover"));
            if undersized || behind || recovering > 0 || copying {
                state.push("degraded");
            }
            if active && !undersized && !behind {
                state.push("clean");
            }
            if let Some(s) = pg.and_then(|p| p.scrub.as_ref()) {
                state.push("scrubbing");
                if s.is_deep() {
                    state.push("deep");
                }
            }
            let scrub_errors = pg.map_or(0, |p| p.scrub_errors);
            if scrub_errors > 0 {
                state.push("inconsistent");
            }
            let mut r = sluice_control::pgstats::report(pgid, view.map.epoch, &acting, state);
            r.version = pg.map_or(0, |p| p.version);
            r.recovering = recovering as u64;
            r.scrub_errors = scrub_errors;
            r.last_scrub_ms = pg.map_or(0, |p| p.last_scrub_ms);
            r.last_deep_scrub_ms = pg.map_or(0, |p| p.last_deep_scrub_ms);
            out.push(r);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(client: u64, epoch: u64, object: &str) -> Logged {
        Logged { reqid: (client, 1), epoch, op: 1, object: object.into() }
    }

    fn log(entries: &[(u64, Logged)]) -> BTreeMap<u64, Logged> {
        entries.iter().cloned().collect()
    }

    #[test]
    fn a_member_behind_gets_the_objects_and_entries_it_lacks() {
        let auth = log(&[(1, l(1, 5, "a")), (2, l(2, 5, "b")), (3, l(3, 5, "a"))]);
        let member = log(&[(1, l(1, 5, "a"))]);
        let (objects, entries) = plan(&auth, &member, 1).unwrap();
        assert_eq!(objects.into_iter().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(entries.iter().map(|(v, _)| *v).collect::<Vec<_>>(), [2, 3]);
    }

    #[test]
    fn divergent_entries_are_rolled_back_and_their_objects_copied() {
        // The member led at epoch 5 and logged v2, v3 nobody else saw; the new primary
        // logged its own v2 at epoch 7.
        let auth = log(&[(1, l(1, 5, "a")), (2, l(9, 7, "c"))]);
        let member = log(&[(1, l(1, 5, "a")), (2, l(2, 5, "b")), (3, l(3, 5, "d"))]);
        let (objects, entries) = plan(&auth, &member, 3).unwrap();
        assert_eq!(objects.into_iter().collect::<Vec<_>>(), ["b", "c", "d"]);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0], (2, l(9, 7, "c")));
        assert_eq!(entries[1].0, 3);
        assert!(entries[1].1.rolled_back());
        // Its newest real entry is older than the authoritative one's.
        assert!(last_of(&member) < last_of(&auth));
    }

    #[test]
    fn identical_logs_need_nothing_and_a_trimmed_past_needs_a_backfill() {
        let auth = log(&[(10, l(1, 5, "a")), (11, l(2, 5, "b"))]);
        assert_eq!(plan(&auth, &auth.clone(), 11).unwrap(), (BTreeSet::new(), Vec::new()));
        assert!(plan(&auth, &BTreeMap::new(), 8).is_err(), "v9 was trimmed");
        assert!(plan(&auth, &BTreeMap::new(), 9).is_ok(), "v10 onwards is all it needs");
    }

    #[test]
    fn a_backfill_gets_the_whole_log_and_loses_its_older_and_divergent_entries() {
        let auth = log(&[(10, l(1, 5, "a")), (11, l(2, 5, "b")), (12, l(3, 6, "c"))]);
        // Away since v3, with v11 written at an epoch the others never took.
        let stale = log(&[(2, l(7, 1, "x")), (3, l(8, 1, "y")), (11, l(9, 4, "z"))]);
        assert!(plan(&auth, &stale, 3).is_err());
        let (objects, entries) = log_plan(&auth, &stale);
        let want: BTreeSet<String> = ["a", "b", "c", "z"].iter().map(|s| s.to_string()).collect();
        assert_eq!(objects, want, "the log's objects and the divergent one");
        let versions: Vec<u64> = entries.iter().map(|(v, _)| *v).collect();
        assert_eq!(versions, [10, 11, 12]);
        assert_eq!(entries[1].1, auth[&11], "the divergent entry is overwritten");
        assert_eq!(trim_before(&auth), 9, "v2 and v3 go");
        assert_eq!(trim_before(&BTreeMap::new()), 0, "an empty log trims nothing");
    }

    #[test]
    fn rolled_back_markers_are_not_the_newest_entry() {
        let mut m = log(&[(1, l(1, 5, "a"))]);
        m.insert(
            2,
            Logged { reqid: (0, 0), epoch: 0, op: LogEntry::ROLLED_BACK, object: String::new() },
        );
        assert_eq!(last_of(&m), (5, 1));
    }
}

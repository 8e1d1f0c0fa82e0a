//! Scrub, deep scrub and repair of the PGs a core leads (Ceph's `osd_internals/scrub.rst`,
//! simplified: a whole PG at a time).
//!
//! **Start.** `sluice pg scrub|deep-scrub|repair PGID` reaches the primary's core as a
//! [`CoreCmd::Scrub`] (monitor -> cluster agent -> core). The PG must be active; its
//! writes are held from then on (reads go on), and the scrub starts once the writes in
//! flight are done, so every acting member is at the same version.
//!
//! **Maps.** The primary asks every acting member not left behind for a [`ScrubMap`]
//! ([`Scrub`]) and makes its own: each member lists the PG's objects and reads, one
//! object at a time, its size and xattrs (a crc32c over them) and, deep, its data in
//! [`PUSH_CHUNK_BYTES`] pieces (a crc32c), or notes why it could not (the store checks
//! every block's checksum: a corrupt block is a read error).
//!
//! **Compare.** Per object, the authoritative copy is the most common description among
//! the copies that could be read (ties go to the primary's); a member whose copy is
//! missing, unreadable or different is inconsistent for that object. The PG reports
//! `inconsistent` (health `PG_DAMAGED`) with the number of errors until a scrub finds
//! none. The held writes then run.
//!
//! **Repair** (`repair`, after a scrub that found errors): the PG peers again with the
//! bad copies marked as missing, so recovery copies them from a good one: objects bad
//! on a replica are pushed from the primary, objects bad on the primary are first
//! pulled from a member whose copies are good. A deep scrub then checks the result.

use std::collections::BTreeSet;

use sluice_net::rep::{PUSH_CHUNK_BYTES, Scrub, ScrubMap, ScrubObject};

use super::*;

/// Object names listed per store query.
const LIST_PAGE: usize = 1024;

/// A scrub whose maps have not all arrived in this long is given up (its writes run
/// again): a member that stopped answering must not hold a PG's writes for ever.
pub const SCRUB_TIMEOUT: Duration = Duration::from_secs(600);

/// A command from the cluster agent for one core.
#[derive(Debug, Clone)]
pub enum CoreCmd {
    /// Scrub a PG this OSD leads (deep: with data checksums), and repair what is found.
    Scrub { pg: PgId, deep: bool, repair: bool },
}

/// One copy of an object as a scrub saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Seen {
    size: u64,
    xattrs_crc: u32,
    data_crc: Option<u32>,
    error: Option<String>,
}

/// What must agree between copies: size, xattrs crc, data crc.
type Key = (u64, u32, Option<u32>);

impl Seen {
    /// What must agree between copies (errors never agree).
    fn key(&self) -> Option<Key> {
        self.error.is_none().then_some((self.size, self.xattrs_crc, self.data_crc))
    }
}

/// A scrub a member runs for a primary (or the primary for itself).
#[derive(Debug)]
pub(crate) struct Job {
    pg: PgId,
    id: u64,
    epoch: u64,
    deep: bool,
    /// The primary's session (`None`: this core is the primary).
    reply: Option<u64>,
    version: u64,
    names: VecDeque<String>,
    objects: Vec<(String, Seen)>,
    error: Option<String>,
}

/// Where a scrub read is.
#[derive(Debug)]
pub(crate) enum ScrubStage {
    List,
    Stat { name: String },
    Xattrs { name: String, size: u64 },
    Data { name: String, size: u64, xattrs_crc: u32, offset: u64, crc: u32 },
}

/// A scrub on the primary: the members' maps as they arrive.
#[derive(Debug)]
pub(crate) struct PgScrub {
    id: u64,
    deep: bool,
    repair: bool,
    waiting: Vec<OsdId>,
    maps: Vec<(OsdId, BTreeMap<String, Seen>)>,
    failed: Vec<String>,
    started: MonoTime,
}

impl PgScrub {
    pub(crate) fn is_deep(&self) -> bool {
        self.deep
    }
}

/// A scrub's finding: objects to copy per member, and what was wrong.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Findings {
    pub bad: BTreeMap<OsdId, BTreeSet<String>>,
    pub errors: Vec<String>,
}

/// Compares the members' maps (primary first).
pub(crate) fn compare(maps: &[(OsdId, BTreeMap<String, Seen>)]) -> Findings {
    let names: BTreeSet<&String> = maps.iter().flat_map(|(_, m)| m.keys()).collect();
    let mut f = Findings::default();
    for name in names {
        // The most common readable description (the first, the primary's, on ties);
        // a missing copy is a description too (the object may have been deleted).
        let mut counts: Vec<(Option<Key>, usize)> = Vec::new();
        for (_, m) in maps {
            let key = match m.get(name) {
                None => Some(None),
                Some(s) => s.key().map(Some),
            };
            if let Some(k) = key {
                match counts.iter_mut().find(|(c, _)| *c == k) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((k, 1)),
                }
            }
        }
        let best = counts.iter().map(|(_, n)| *n).max();
        let auth = counts.iter().find(|(_, n)| Some(*n) == best).map(|(k, _)| *k);
        for (osd, m) in maps {
            let copy = m.get(name);
            let why = match (copy, auth) {
                (Some(s), _) if s.error.is_some() => {
                    format!("unreadable: {}", s.error.as_deref().unwrap_or(""))
                }
                (_, None) => "no readable copy anywhere".to_string(),
                (None, Some(None)) => continue,
                (None, Some(Some(_))) => "missing".to_string(),
                (Some(_), Some(None)) => "present where the others deleted it".to_string(),
                (Some(s), Some(Some(k))) if s.key() == Some(k) => continue,
                (Some(s), Some(Some((size, x, d)))) => {
                    if s.size != size {
                        format!("size {} where the others have {size}", s.size)
                    } else if s.xattrs_crc != x {
                        "xattrs differ".to_string()
                    } else {
                        format!("data crc32c {:08x?} where the others have {d:08x?}", s.data_crc)
                    }
                }
            };
            f.errors.push(format!("{name} on {osd}: {why}"));
            if auth.is_some() {
                f.bad.entry(*osd).or_default().insert(name.clone());
            }
        }
    }
    f
}

fn xattrs_crc(x: &BTreeMap<String, Vec<u8>>) -> u32 {
    let mut crc = 0;
    for (k, v) in x {
        crc = crc32c::crc32c_append(crc, &(k.len() as u32).to_le_bytes());
        crc = crc32c::crc32c_append(crc, k.as_bytes());
        crc = crc32c::crc32c_append(crc, &(v.len() as u32).to_le_bytes());
        crc = crc32c::crc32c_append(crc, v);
    }
    crc
}

impl<D: BlockDevice> Core<D> {
    /// A command from the agent.
    pub(super) fn command(&mut self, cmd: CoreCmd) {
        match cmd {
            CoreCmd::Scrub { pg, deep, repair } => {
                if placement::pg_core(pg, self.cores) as u16 == self.core {
                    self.request_scrub(pg, deep, repair);
                }
            }
        }
    }

    /// Scrubs `pgid` once its writes in flight are done (see the module documentation).
    pub(super) fn request_scrub(&mut self, pgid: PgId, deep: bool, repair: bool) {
        let Some(view) = self.view.clone() else { return };
        let Some(pool) = view.map.pools.get(&pgid.pool) else { return };
        let acting = self.primaries.mapping(&view.map, pool, pgid).up.clone();
        if acting.first() != Some(&view.me) {
            return tracing::info!("PG {pgid}: scrub asked of {}, not its primary", view.me);
        }
        let pg = self.pgs.entry(pgid).or_default();
        if pg.scrub.is_some() {
            return tracing::info!("PG {pgid}: a scrub runs already");
        }
        tracing::info!("PG {pgid}: {} requested", if deep { "deep scrub" } else { "scrub" });
        pg.want_scrub = Some((deep, repair));
        self.pg_dirty = true;
        self.maybe_start_scrub(pgid);
    }

    /// Starts the wanted scrub if the PG is active with no writes in flight.
    pub(super) fn maybe_start_scrub(&mut self, pgid: PgId) {
        // Called after every write: most PGs want none.
        if self.pgs.get(&pgid).is_none_or(|pg| pg.want_scrub.is_none()) {
            return;
        }
        let Some(view) = self.view.clone() else { return };
        let Some(pg) = self.pgs.get_mut(&pgid) else { return };
        let Some((deep, repair)) = pg.want_scrub else { return };
        if !pg.inflight.is_empty() || pg.peering.is_some() || pg.active_with.is_none() {
            return; // after the writes (`after_writes`) or the peering (`activate`)
        }
        pg.want_scrub = None;
        let members: Vec<OsdId> = pg
            .active_with
            .as_ref()
            .expect("checked above")
            .iter()
            .map(|(o, _)| *o)
            .filter(|o| !pg.behind.contains(o) && !pg.backfills.contains_key(o))
            .collect();
        self.next_scrub_id += 1;
        let id = self.next_scrub_id;
        let others: Vec<OsdId> = members.iter().copied().filter(|o| *o != view.me).collect();
        pg.scrub = Some(Box::new(PgScrub {
            id,
            deep,
            repair,
            waiting: members.clone(),
            maps: Vec::new(),
            failed: Vec::new(),
            started: self.now,
        }));
        let epoch = view.map.epoch;
        let mut b = Vec::new();
        Scrub { epoch, pool: pgid.pool.0, pg: pgid.pg, id, deep }.encode(&mut b);
        for osd in others {
            self.send_peer(pgid, osd, rep::MSG_SCRUB, &b);
        }
        self.start_job(Job {
            pg: pgid,
            id,
            epoch,
            deep,
            reply: None,
            version: 0,
            names: VecDeque::new(),
            objects: Vec::new(),
            error: None,
        });
    }

    /// This OSD's own listing of a PG for a backfill (`Peering::listed`).
    pub(super) fn list_own(&mut self, pgid: PgId, id: u64, epoch: u64) {
        self.start_job(Job {
            pg: pgid,
            id,
            epoch,
            deep: false,
            reply: None,
            version: 0,
            names: VecDeque::new(),
            objects: Vec::new(),
            error: None,
        });
    }

    /// A member's side: a primary asks for its scrub map.
    pub(super) fn on_scrub(&mut self, cookie: u64, s: Scrub) {
        let pg = PgId { pool: PoolId(s.pool), pg: s.pg };
        let job = Job {
            pg,
            id: s.id,
            epoch: s.epoch,
            deep: s.deep,
            reply: Some(cookie),
            version: 0,
            names: VecDeque::new(),
            objects: Vec::new(),
            error: None,
        };
        if placement::pg_core(pg, self.cores) as u16 != self.core {
            let m = format!("PG {pg} belongs to another core of this OSD");
            return self.finish_job(Job { error: Some(m), ..job });
        }
        self.start_job(job);
    }

    fn start_job(&mut self, mut job: Job) {
        let Some(pg) = self.pgs.get(&job.pg) else {
            return self.finish_job(job); // no objects here
        };
        job.version = pg.version;
        if !pg.exists {
            return self.finish_job(job);
        }
        let q = Query::List { coll: CollId(job.pg.collection()), after: None, max: LIST_PAGE };
        self.scrub_query(job, ScrubStage::List, q);
    }

    fn scrub_query(&mut self, job: Job, stage: ScrubStage, q: Query) {
        let kind = Kind::ScrubRead { job: Box::new(job), stage };
        let slot =
            self.ops.insert(Pending { origin: Origin::Local(0), tid: 0, kind, dups: Vec::new() });
        self.shard.query(q, slot as u64);
    }

    /// The next object of a job, or its end.
    fn scrub_next(&mut self, mut job: Job) {
        match job.names.pop_front() {
            Some(name) => {
                let q = Query::Stat { coll: CollId(job.pg.collection()), name: name.clone() };
                self.scrub_query(job, ScrubStage::Stat { name }, q);
            }
            None => self.finish_job(job),
        }
    }

    /// A scrub read finished.
    pub(super) fn scrub_read_done(
        &mut self,
        mut job: Job,
        stage: ScrubStage,
        result: Result<Option<Answer>, StoreError>,
    ) {
        let coll = CollId(job.pg.collection());
        let chunk = |offset: u64, size: u64| (size - offset).min(PUSH_CHUNK_BYTES as u64);
        match (stage, result) {
            (ScrubStage::List, Ok(Some(Answer::List { names, next }))) => {
                if job.names.len() + job.objects.len() + names.len() > rep::MAX_SCRUB_OBJECTS {
                    job.error = Some(format!("more than {} objects", rep::MAX_SCRUB_OBJECTS));
                    return self.finish_job(job);
                }
                job.names.extend(names);
                match next {
                    Some(after) => {
                        let q = Query::List { coll, after: Some(after), max: LIST_PAGE };
                        self.scrub_query(job, ScrubStage::List, q);
                    }
                    None => self.scrub_next(job),
                }
            }
            (ScrubStage::List, Err(StoreError::NotFound(_))) => self.finish_job(job),
            (ScrubStage::List, r) => {
                job.error = Some(format!("listing the objects: {}", describe(r)));
                self.finish_job(job);
            }
            (ScrubStage::Stat { name }, Ok(Some(Answer::Stat(st)))) => {
                let q = Query::GetXattrs { coll, name: name.clone() };
                self.scrub_query(job, ScrubStage::Xattrs { name, size: st.size }, q);
            }
            (ScrubStage::Xattrs { name, size }, Ok(Some(Answer::Xattrs(x)))) => {
                let xattrs_crc = xattrs_crc(&x);
                if !job.deep {
                    let seen = Seen { size, xattrs_crc, data_crc: None, error: None };
                    job.objects.push((name, seen));
                    return self.scrub_next(job);
                }
                self.scrub_data(job, name, size, xattrs_crc, 0, 0);
            }
            (
                ScrubStage::Data { name, size, xattrs_crc, offset, crc },
                Ok(Some(Answer::Data(d))),
            ) => {
                let data = d.data();
                if data.len() as u64 != chunk(offset, size) {
                    let m = format!("read {} bytes at {offset} of {size}", data.len());
                    let seen = Seen { size, xattrs_crc, data_crc: None, error: Some(m) };
                    job.objects.push((name, seen));
                    return self.scrub_next(job);
                }
                let crc = crc32c::crc32c_append(crc, data);
                self.scrub_data(job, name, size, xattrs_crc, offset + data.len() as u64, crc);
            }
            (
                ScrubStage::Stat { name }
                | ScrubStage::Xattrs { name, .. }
                | ScrubStage::Data { name, .. },
                r,
            ) => {
                // Unreadable (a corrupt block, a device error): that is the finding.
                let m = describe(r);
                tracing::warn!("PG {}: scrub: {name}: {m}", job.pg);
                let seen = Seen { size: 0, xattrs_crc: 0, data_crc: None, error: Some(m) };
                job.objects.push((name, seen));
                self.scrub_next(job);
            }
        }
    }

    /// Reads the data from `offset` on (or, at the end, records the object).
    fn scrub_data(&mut self, mut job: Job, name: String, size: u64, x: u32, offset: u64, crc: u32) {
        if offset >= size {
            let seen = Seen { size, xattrs_crc: x, data_crc: Some(crc), error: None };
            job.objects.push((name, seen));
            return self.scrub_next(job);
        }
        let len = (size - offset).min(PUSH_CHUNK_BYTES as u64);
        let q = Query::Read { coll: CollId(job.pg.collection()), name: name.clone(), offset, len };
        let stage = ScrubStage::Data { name, size, xattrs_crc: x, offset, crc };
        self.scrub_query(job, stage, q);
    }

    /// A job is done: its map goes to the primary (or to this core's own scrub).
    fn finish_job(&mut self, job: Job) {
        let Some(cookie) = job.reply else {
            let me = self.view.as_ref().map_or(OsdId(u32::MAX), |v| v.me);
            let map = job.objects.into_iter().collect();
            return self.scrub_map_in(me, job.pg, job.id, job.error, map);
        };
        let map = ScrubMap {
            epoch: job.epoch,
            pool: job.pg.pool.0,
            pg: job.pg.pg,
            id: job.id,
            version: job.version,
            error: job.error.as_deref(),
            objects: job
                .objects
                .iter()
                .map(|(name, s)| ScrubObject {
                    name,
                    size: s.size,
                    xattrs_crc: s.xattrs_crc,
                    data_crc: s.data_crc,
                    error: s.error.as_deref(),
                })
                .collect(),
        };
        map.encode(&mut self.reply_buf);
        self.replies.push((cookie, rep::MSG_SCRUB_MAP, self.reply_buf.len()));
    }

    /// The primary's side: a member's map arrived.
    pub(super) fn on_scrub_map(&mut self, from: OsdId, m: ScrubMap<'_>) {
        let pg = PgId { pool: PoolId(m.pool), pg: m.pg };
        let map = m
            .objects
            .iter()
            .map(|o| {
                let seen = Seen {
                    size: o.size,
                    xattrs_crc: o.xattrs_crc,
                    data_crc: o.data_crc,
                    error: o.error.map(str::to_string),
                };
                (o.name.to_string(), seen)
            })
            .collect();
        self.scrub_map_in(from, pg, m.id, m.error.map(str::to_string), map);
    }

    fn scrub_map_in(
        &mut self,
        from: OsdId,
        pgid: PgId,
        id: u64,
        error: Option<String>,
        map: BTreeMap<String, Seen>,
    ) {
        let me = self.view.as_ref().map(|v| v.me);
        let Some(pg) = self.pgs.get_mut(&pgid) else { return };
        let Some(s) = pg.scrub.as_mut().filter(|s| s.id == id) else {
            // A backfill's listing, or a scrub that was stopped (a new interval).
            let names = map.into_keys().collect();
            return self.listed(pgid, from, id, error, names);
        };
        let Some(at) = s.waiting.iter().position(|o| *o == from) else { return };
        s.waiting.swap_remove(at);
        if let Some(e) = error {
            s.failed.push(format!("{from}: {e}"));
        }
        if Some(from) == me {
            s.maps.insert(0, (from, map));
        } else {
            s.maps.push((from, map));
        }
        if s.waiting.is_empty() {
            self.finish_scrub(pgid);
        }
    }

    fn finish_scrub(&mut self, pgid: PgId) {
        let mono = self.now;
        let pg = self.pgs.get_mut(&pgid).expect("scrubbing PG");
        let s = pg.scrub.take().expect("scrubbing");
        let what = if s.deep { "deep scrub" } else { "scrub" };
        self.pg_dirty = true;
        // A periodic scrub that failed is tried again an interval later, not at once.
        pg.scrub_stamp = mono;
        if s.deep {
            pg.deep_scrub_stamp = mono;
        }
        if !s.failed.is_empty() {
            tracing::error!("PG {pgid}: {what} could not finish: {}", s.failed.join("; "));
        } else {
            let f = compare(&s.maps);
            let objects: usize = s.maps.first().map_or(0, |(_, m)| m.len());
            if f.errors.is_empty() {
                tracing::info!("PG {pgid}: {what} ok ({objects} objects)");
            } else {
                tracing::error!(
                    "PG {pgid}: {what} found {} error(s): {}",
                    f.errors.len(),
                    f.errors.join("; ")
                );
            }
            pg.scrub_errors = f.errors.len() as u64;
            let now_ms = sluice_auth::wall_ms();
            pg.last_scrub_ms = now_ms;
            if s.deep {
                pg.last_deep_scrub_ms = now_ms;
            }
            if s.repair && !f.bad.is_empty() {
                pg.repair = f.bad;
                // The repair peers again with the bad copies as missing; a deep scrub
                // checks it afterwards.
                pg.active_with = None;
                pg.want_scrub = Some((true, false));
                let acting = match self.view.clone() {
                    Some(v) => self.acting_of(&v.map, pgid),
                    None => Vec::new(),
                };
                let epoch = self.epoch();
                self.start_peering(pgid, acting, epoch);
                return;
            }
        }
        self.release_held(pgid);
    }

    fn acting_of(&mut self, map: &OsdMap, pgid: PgId) -> Vec<OsdId> {
        match map.pools.get(&pgid.pool) {
            Some(pool) => self.primaries.mapping(map, pool, pgid).up.clone(),
            None => Vec::new(),
        }
    }

    /// Gives up scrubs older than [`SCRUB_TIMEOUT`] (checked now and then).
    pub(super) fn expire_scrubs(&mut self) {
        let now = self.now;
        let old: Vec<PgId> = self
            .pgs
            .iter()
            .filter(|(_, pg)| {
                pg.scrub.as_ref().is_some_and(|s| now.saturating_sub(s.started) > SCRUB_TIMEOUT)
            })
            .map(|(id, _)| *id)
            .collect();
        for pgid in old {
            let pg = self.pgs.get_mut(&pgid).expect("listed");
            let s = pg.scrub.take().expect("listed");
            tracing::error!(
                "PG {pgid}: scrub given up after {SCRUB_TIMEOUT:?}: no map from {:?}",
                s.waiting
            );
            self.pg_dirty = true;
            self.release_held(pgid);
        }
    }

    /// Periodic scrubs (`osd_scrub_interval`, `osd_deep_scrub_interval`): when no scrub
    /// runs on this core, the active PG it leads most overdue for one is scrubbed (deep
    /// if that is due too), one at a time.
    pub(super) fn periodic_scrubs(&mut self) {
        let Some(view) = self.view.clone() else { return };
        let (every, deep_every) = (view.tuning.scrub_interval, view.tuning.deep_scrub_interval);
        if every.is_zero() && deep_every.is_zero() {
            return;
        }
        if self.pgs.values().any(|pg| pg.scrub.is_some() || pg.want_scrub.is_some()) {
            return;
        }
        let now = self.now;
        let overdue = |stamp: MonoTime, interval: Duration| {
            let since = now.saturating_sub(stamp);
            (!interval.is_zero() && since >= interval).then(|| since - interval)
        };
        let mut due: Option<(Duration, PgId, bool)> = None;
        for (pgid, pg) in &self.pgs {
            if pg.active_with.is_none() || pg.peering.is_some() || !pg.exists {
                continue;
            }
            let deep = overdue(pg.deep_scrub_stamp, deep_every);
            let Some(late) = deep.or_else(|| overdue(pg.scrub_stamp, every)) else { continue };
            if due.is_none_or(|(l, ..)| late > l) {
                due = Some((late, *pgid, deep.is_some()));
            }
        }
        if let Some((_, pgid, deep)) = due {
            tracing::info!("PG {pgid}: periodic {}", if deep { "deep scrub" } else { "scrub" });
            self.request_scrub(pgid, deep, false);
        }
    }

    /// A new interval stops a scrub (its maps may be of different versions).
    pub(super) fn stop_scrub(&mut self, pgid: PgId) {
        if let Some(pg) = self.pgs.get_mut(&pgid)
            && pg.scrub.take().is_some()
        {
            tracing::info!("PG {pgid}: scrub stopped by a new interval; ask again");
        }
    }
}

fn describe(r: Result<Option<Answer>, StoreError>) -> String {
    match r {
        Err(e) => e.to_string(),
        Ok(a) => format!("unexpected answer {a:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(size: u64, crc: u32) -> Seen {
        Seen { size, xattrs_crc: 7, data_crc: Some(crc), error: None }
    }

    fn maps(copies: &[&[(&str, Seen)]]) -> Vec<(OsdId, BTreeMap<String, Seen>)> {
        copies
            .iter()
            .enumerate()
            .map(|(i, c)| {
                (OsdId(i as u32), c.iter().map(|(n, s)| (n.to_string(), s.clone())).collect())
            })
            .collect()
    }

    #[test]
    fn identical_copies_have_no_errors() {
        let a = [("a", seen(3, 1)), ("b", seen(0, 0))];
        assert_eq!(compare(&maps(&[&a, &a, &a])), Findings::default());
    }

    #[test]
    fn the_odd_copy_out_is_bad_whichever_member_holds_it() {
        let good = [("a", seen(3, 1))];
        let bad = [("a", seen(3, 2))];
        let f = compare(&maps(&[&bad, &good, &good]));
        assert_eq!(f.bad.keys().collect::<Vec<_>>(), [&OsdId(0)]);
        assert!(f.errors[0].contains("data crc32c"), "{f:?}");
        let unreadable =
            [("a", Seen { size: 0, xattrs_crc: 0, data_crc: None, error: Some("corrupt".into()) })];
        let f = compare(&maps(&[&good, &unreadable, &good]));
        assert_eq!(f.bad.keys().collect::<Vec<_>>(), [&OsdId(1)]);
        assert!(f.errors[0].contains("unreadable: corrupt"), "{f:?}");
    }

    #[test]
    fn missing_and_extra_copies_and_ties_to_the_primary() {
        let f = compare(&maps(&[&[("a", seen(3, 1))], &[], &[("a", seen(3, 1))]]));
        assert_eq!(f.bad[&OsdId(1)].iter().collect::<Vec<_>>(), ["a"]);
        assert!(f.errors[0].contains("missing"));
        let f = compare(&maps(&[&[], &[("z", seen(1, 1))], &[]]));
        assert!(f.errors[0].contains("present where the others deleted it"), "{f:?}");
        // Two copies that disagree: the primary's wins.
        let f = compare(&maps(&[&[("a", seen(3, 1))], &[("a", seen(4, 1))]]));
        assert_eq!(f.bad.keys().collect::<Vec<_>>(), [&OsdId(1)]);
        assert!(f.errors[0].contains("size 4 where the others have 3"), "{f:?}");
    }

    #[test]
    fn no_readable_copy_is_an_error_nothing_can_repair() {
        let e = Seen { size: 0, xattrs_crc: 0, data_crc: None, error: Some("eio".into()) };
        let f = compare(&maps(&[&[("a", e.clone())], &[("a", e)]]));
        assert!(f.bad.is_empty());
        assert_eq!(f.errors.len(), 2);
    }
}

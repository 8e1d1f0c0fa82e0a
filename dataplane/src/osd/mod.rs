//! Serving objects: the per-core poller that owns a store shard, a TCP listener (its port
//! is in the OSD map) and the PGs that hash to this core.
//!
//! **Routing.** A client computes object -> PG -> primary OSD -> core and connects to
//! that core's port. The core decodes the request and checks, in order: the map epoch
//! (a request from a newer epoch waits for that map), the pool, the PG (the client's
//! must match ours at our epoch), that this OSD is the PG's primary (else a `Redirect`
//! carrying our epoch), and that this core owns the PG (else the request is forwarded
//! through the mailbox to the owning core, which answers back through the mailbox:
//! never dropped).
//!
//! **Writes** become one store transaction: the mutation plus a PG log entry (the PG's
//! next version, the request id and the object), so the request id is durable with the
//! data. A request id seen before (a resend after a lost session, a map change or an OSD
//! restart) is answered from the log without applying it again; one still in flight is
//! answered when the original finishes. The log keeps the last `osd_pg_log_keep` (2000)
//! entries per PG; replication (peering, recovery) builds on the same log.
//!
//! **Replication.** The PG's acting set is its up set (placement minus down OSDs,
//! primary first). The primary takes a write only while the acting set has at least
//! the pool's `min_size` members (else `Again`: the client retries until its deadline),
//! assigns the version, submits the transaction to its own store and sends the same
//! request with its PG log entry (version, trim point) to every other acting member
//! ([`sluice_net::rep`], over [`crate::peers`] connections to the core that owns the PG
//! there). Each replica applies it as one store transaction with the same log entry and
//! answers once it is durable; the client is answered once the primary's copy and every
//! acting replica's are durable. A map that takes a replica out of the acting set (down,
//! or at a new address) stops the write waiting for it; if fewer than `min_size` copies
//! are then durable the client is told to retry (`Again`) and the write is not recorded
//! as done. A replica checks that the sender authenticated as an OSD, that versions
//! arrive in order (a gap means it missed writes: logged, counted, for recovery), and
//! recognises a version it already applied (a resend after a reconnect).
//!
//! **Reads** go to the store, which answers with committed data only, and only while the
//! primary holds a read lease from the PG's other acting members (the `lease` module):
//! a primary cut off from them stops serving reads before a new one may take writes.
//!
//! **Authentication** (with [`CoreAuth`]): the server runs the ticket handshake on every
//! connection, with the OSD service's rotating secrets the cluster agent fetched from the
//! monitors (and keeps fetching; no monitor is asked per client). Every request is
//! checked on the core it arrives on against the caps in its session's verified ticket:
//! `r` at the op's pool for reads, stat, getxattr and list, `w` for writes, deletes and
//! setxattr. A refused op gets `PermissionDenied` naming the missing cap; a session
//! whose ticket expired (or that has none) gets `Unauthenticated` for every op until
//! its client reconnects with a renewed ticket. Forwarded requests were checked already.
//!
//! Threads: an [`OsdCore`] lives on its reactor thread; maps arrive through a channel
//! (sent by the cluster agent, which wakes the reactor), other cores through the mailbox.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use sluice_auth::{AuthTicket, Caps, EntityKind, Perms, Service};
use sluice_control::maps::placement::{self, PgId, PrimaryCache};
use sluice_control::maps::{OsdId, OsdMap, PoolId};
pub use sluice_control::osd_agent::OsdTuning;
use sluice_control::osd_agent::{CorePgReport, DataplaneAuth, PgReportTx};
use sluice_net::ops::{self, Body, Op, Reply, Request, Status};
use sluice_net::rep::{self, RepOp, RepReply};
use sluice_net::tcp::{Server, ServerAuth, ServerEvent};
use sluice_nvme::BlockDevice;
use sluice_vocab::{CoreId, MonoTime};

use crate::peers::{self, Peers, Received};

mod backfill;
mod lease;
mod peering;
mod scrub;
use crate::store::{
    Answer, CollId, Missing, Query, Shard, StoreError, StoreEvent, Transaction, TxOp, blocking,
    txn_data,
};
use crate::{Context, Inbox, Outbox, PollResult, Poller};
pub use lease::{DEFAULT_READ_LEASE, USABLE_PERCENT};
pub use peering::{MAX_HELD, MAX_PUSHES_PER_PEER};
pub use scrub::CoreCmd;

/// How long a request from a newer map epoch waits for that map.
pub const MAP_WAIT: Duration = Duration::from_secs(10);
/// Payload bytes of requests waiting for a newer map, at most (more are told to retry).
pub const MAX_WAITING_BYTES: usize = 64 << 20;
/// PG reports go to the cluster agent at least this often, and at most every
/// [`PG_REPORT_MIN_GAP`] when PG states change.
pub const PG_REPORT_INTERVAL: Duration = Duration::from_secs(2);
pub const PG_REPORT_MIN_GAP: Duration = Duration::from_millis(100);
/// How long a server keeps the session of a client that went away.
pub const SESSION_IDLE: Duration = Duration::from_secs(300);

/// A map as a core sees it: the map and who this OSD is in it.
#[derive(Debug, Clone)]
pub struct MapView {
    pub map: Arc<OsdMap>,
    pub me: OsdId,
    /// What the central config sets: the read lease (the `lease` module), recovery's
    /// cap, the PG log's length, the scrub intervals.
    pub tuning: OsdTuning,
}

/// Authentication on a core's server: every connection must present a ticket for the
/// OSD service, sealed with one of the rotating secrets that arrive on `secrets` (the
/// first before the OSD boots; until then every op is refused as unauthenticated). The
/// same channel brings this OSD's own OSD ticket, which the core presents to peers.
#[derive(Debug)]
pub struct CoreAuth {
    /// Connections continue in secure mode (AEAD records) after the handshake.
    pub secure: bool,
    pub secrets: mpsc::Receiver<DataplaneAuth>,
}

/// Messages between the cores of one OSD.
#[derive(Debug)]
pub enum CoreMsg {
    /// A request that arrived on core `from` for a PG this core owns.
    Forward { from: u16, cookie: u64, payload: Vec<u8> },
    /// The reply to a forwarded request, for the session `cookie` of the receiving core.
    Reply { cookie: u64, payload: Vec<u8> },
}

/// Who is waiting for a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// A session of this core's server.
    Local(u64),
    /// A session of another core (the request was forwarded).
    Core(u16, u64),
}

/// A PG log entry: what the store keeps per write, with the request id and the map
/// epoch its primary assigned the version in. Entries compare by (epoch, version), as
/// Ceph's eversion: a primary cut off from the cluster may go on logging writes at old
/// epochs that the new primary's newer epochs override.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub client: u64,
    pub tid: u64,
    /// The op code ([`Op::code`]); [`LogEntry::ROLLED_BACK`] for an entry undone by
    /// peering (a write that never reached the authoritative log).
    pub op: u8,
    pub object: String,
    pub epoch: u64,
}

/// Format 1 had no epoch (read as epoch 0).
const LOG_ENTRY_VERSION: u8 = 2;

impl LogEntry {
    pub const ROLLED_BACK: u8 = 0;

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(26 + self.object.len());
        v.push(LOG_ENTRY_VERSION);
        v.push(self.op);
        v.extend_from_slice(&self.client.to_le_bytes());
        v.extend_from_slice(&self.tid.to_le_bytes());
        v.extend_from_slice(&self.epoch.to_le_bytes());
        v.extend_from_slice(self.object.as_bytes());
        v
    }

    pub fn decode(b: &[u8]) -> Option<LogEntry> {
        let (epoch, name_at) = match *b.first()? {
            1 if b.len() >= 18 => (0, 18),
            2 if b.len() >= 26 => (u64::from_le_bytes(b[18..26].try_into().ok()?), 26),
            _ => return None,
        };
        Some(LogEntry {
            op: b[1],
            client: u64::from_le_bytes(b[2..10].try_into().ok()?),
            tid: u64::from_le_bytes(b[10..18].try_into().ok()?),
            epoch,
            object: String::from_utf8(b[name_at..].to_vec()).ok()?,
        })
    }
}

/// A PG log entry as a core keeps it in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Logged {
    pub reqid: ReqId,
    pub epoch: u64,
    pub op: u8,
    pub object: String,
}

impl Logged {
    fn from_entry(e: LogEntry) -> Logged {
        Logged { reqid: (e.client, e.tid), epoch: e.epoch, op: e.op, object: e.object }
    }

    fn entry(&self) -> LogEntry {
        LogEntry {
            client: self.reqid.0,
            tid: self.reqid.1,
            op: self.op,
            object: self.object.clone(),
            epoch: self.epoch,
        }
    }

    fn rolled_back(&self) -> bool {
        self.op == LogEntry::ROLLED_BACK
    }
}

type ReqId = (u64, u64);

/// What this core knows of a PG it owns.
#[derive(Debug, Default)]
struct Pg {
    /// The store collection exists (or its creation is queued).
    exists: bool,
    /// The last version handed out.
    version: u64,
    /// The durable log, by version.
    log: BTreeMap<u64, Logged>,
    /// Request ids in the log -> the version they were applied at.
    done: HashMap<ReqId, u64>,
    /// Request ids being applied -> the op slot.
    inflight: HashMap<ReqId, usize>,
    /// As primary: peering (ops are held until it is active again).
    peering: Option<Box<peering::Peering>>,
    /// As primary: the acting set the PG last went active with.
    active_with: Option<peering::Interval>,
    /// As primary: peer once the writes in flight are done.
    want_peer: bool,
    /// Client requests held while the PG peers, to route again when it is active.
    held: VecDeque<(Origin, Vec<u8>)>,
    /// As primary: members the last recovery could not bring up to date.
    behind: Vec<OsdId>,
    /// As primary: writes durable here but on fewer than min_size members when replicas
    /// left; answered when the PG is active with min_size members again.
    parked: Vec<Parked>,
    /// As replica: the newest interval a primary peered for (older primaries' writes are
    /// refused), and queries to answer once the writes in flight are durable.
    interval_epoch: u64,
    queries: Vec<(u64, rep::PgQuery)>,
    /// As primary: reads are served until then (the `lease` module), and the renewal
    /// round in flight with the members yet to grant it.
    readable_until: MonoTime,
    lease_round: u64,
    lease_waiting: Vec<OsdId>,
    /// As member: an upper bound of the read lease of the primary that it last granted
    /// one (`None`: more than one primary may hold one).
    lease_ub: MonoTime,
    lease_by: Option<(OsdId, u64)>,
    /// As primary: the scrub running (its writes are held), one asked for (deep,
    /// repair), the errors the last one found, and copies to repair by recovery.
    scrub: Option<Box<scrub::PgScrub>>,
    want_scrub: Option<(bool, bool)>,
    scrub_errors: u64,
    repair: BTreeMap<OsdId, std::collections::BTreeSet<String>>,
    /// When the last scrub and deep scrub finished (Unix ms).
    last_scrub_ms: u64,
    last_deep_scrub_ms: u64,
    /// As primary: since when the PG is due no periodic scrub (deep scrub): its last
    /// one, or when this OSD first led it (`osd_scrub_interval`; not kept across
    /// restarts).
    scrub_stamp: MonoTime,
    deep_scrub_stamp: MonoTime,
    /// As primary: replicas being backfilled alongside writes, and writes waiting for
    /// an object being copied to one (the `backfill` module).
    backfills: BTreeMap<OsdId, backfill::Backfill>,
    backfill_held: Vec<(String, Origin, Vec<u8>)>,
    /// As member: backfilled by the primary (its writes are applied without logging
    /// them, the version stays 0, until the closing log push), and the newest version
    /// applied so (a resend of an older one is not applied again).
    backfilling: bool,
    backfill_applied: u64,
    /// As primary: objects with writes not yet committed on every acting member (in
    /// flight or parked), with how many; reads of them wait (never see a value that a
    /// failure could still roll back).
    writing: HashMap<String, u32>,
}

impl Pg {
    /// A backfill this member was receiving ends before its closing log (a new
    /// interval, a failed write): writes are checked and logged again, from the version
    /// its log shows (entries of closing-log pieces that arrived count; the objects they
    /// name were all copied before), and a new primary backfills it again if needed.
    fn end_backfilling(&mut self) {
        self.backfilling = false;
        self.version = self.log.iter().rev().find(|(_, l)| !l.rolled_back()).map_or(0, |(v, _)| *v);
    }

    /// Drops the log entries up to and including `upto` (and their request ids).
    fn trim_log(&mut self, upto: u64) {
        let kept = upto.checked_add(1).map_or_else(BTreeMap::new, |k| self.log.split_off(&k));
        for (v, l) in std::mem::replace(&mut self.log, kept) {
            if self.done.get(&l.reqid) == Some(&v) {
                self.done.remove(&l.reqid);
            }
        }
    }

    fn insert_log(&mut self, version: u64, l: Logged) {
        if let Some(old) = self.log.insert(version, l.clone())
            && self.done.get(&old.reqid) == Some(&version)
        {
            self.done.remove(&old.reqid);
        }
        if !l.rolled_back() {
            self.done.insert(l.reqid, version);
        }
    }
}

#[derive(Debug)]
enum Kind {
    /// A client's write on its primary.
    Write(Box<WriteState>),
    /// A primary's write applied on this replica, for the peer session `origin`.
    RepWrite {
        pg: PgId,
        version: u64,
        created: bool,
        logged: Logged,
        /// Logged (false: applied while this replica is backfilled).
        logged_here: bool,
    },
    /// Recovery reading an object to push (size, xattrs, then data piece by piece).
    RecoveryRead {
        pg: PgId,
        object: String,
        to: peering::PushTo,
        stage: peering::ReadStage,
    },
    /// Recovery applying a pushed object or log (`reply`: the pushing primary's session;
    /// None on the primary recovering itself). `version`: the PG's version afterwards.
    PushApply {
        pg: PgId,
        epoch: u64,
        /// The object pushed (`None`: log entries only).
        object: Option<String>,
        entries: Vec<(u64, Logged)>,
        version: Option<u64>,
        /// Log entries up to this went first (0: none).
        trim_upto: u64,
        created: bool,
        reply: Option<u64>,
        /// The last piece of an object, or a log push (the ones that are answered).
        answer: bool,
    },
    /// A scrub reading an object (or listing them).
    ScrubRead {
        job: Box<scrub::Job>,
        stage: scrub::ScrubStage,
    },
    Read,
    Stat,
    List,
    GetXattr,
}

/// A write whose reply waits for its PG (see [`Pg::parked`]).
#[derive(Debug)]
struct Parked {
    /// The object it wrote (reads of it wait until it is answered).
    object: String,
    origin: Origin,
    tid: u64,
    dups: Vec<(Origin, u64)>,
    version: u64,
    reqid: ReqId,
}

/// A write on its primary: the local copy and the replicas it waits for.
#[derive(Debug)]
struct WriteState {
    pg: PgId,
    reqid: ReqId,
    version: u64,
    /// Its log entry, logged in memory once durable.
    logged: Logged,
    created: bool,
    /// The local transaction's outcome, once known.
    local: Option<Result<(), StoreError>>,
    /// Acting replicas that have not answered yet.
    waiting: Vec<OsdId>,
    /// Replicas that made it durable.
    acked: usize,
    /// Replicas it was sent to.
    sent: usize,
    min_size: usize,
    /// A replica that did not take it (refused, failed, unreachable): the write waits
    /// for the PG to peer again, which copies it there.
    replica_error: Option<(Status, String)>,
    /// The map epoch it was sent at (a member that booted later lost it).
    sent_epoch: u64,
    /// Backfill targets it was sent to: their acknowledgement is not a copy.
    partial: Vec<OsdId>,
}

#[derive(Debug)]
struct Pending {
    origin: Origin,
    tid: u64,
    kind: Kind,
    /// Resends of the same write that arrived while it was in flight.
    dups: Vec<(Origin, u64)>,
}

/// Counters of one core, for logs and metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsdStats {
    pub requests: u64,
    pub writes: u64,
    pub reads: u64,
    pub forwarded: u64,
    pub redirects: u64,
    pub dedup_hits: u64,
    pub bad_requests: u64,
    /// Ops refused for their caps, and for having no valid ticket.
    pub denied: u64,
    pub unauthenticated: u64,
    /// Writes sent to replicas (one per replica), and applied here for a primary.
    pub rep_sent: u64,
    pub rep_applied: u64,
    /// Replicated writes whose version skipped some: this replica missed writes.
    pub rep_gaps: u64,
    /// Writes that waited for fewer than `min_size` acting members.
    pub below_min_size: u64,
}

/// A request from a newer epoch than ours, with the caps to check it against once the
/// map arrives (`None`: no check, see [`Core::handle`]).
#[derive(Debug)]
struct Waiting {
    origin: Origin,
    payload: Vec<u8>,
    since: MonoTime,
    caps: Option<Caps>,
}

/// Everything of a core but its server (so requests can be handled while the server
/// hands them out).
struct Core<D: BlockDevice> {
    core: u16,
    cores: usize,
    shard: Shard<D>,
    outbox: Outbox<CoreMsg>,
    view: Option<MapView>,
    pgs: HashMap<PgId, Pg>,
    primaries: PrimaryCache,
    /// Ops at the store, by token.
    ops: slab::Slab<Pending>,
    /// Requests from a newer epoch than ours: (origin, payload, since).
    waiting: VecDeque<Waiting>,
    /// Bytes of their payloads (bounded: [`MAX_WAITING_BYTES`]).
    waiting_bytes: usize,
    /// Replies for local sessions, encoded back to back: (cookie, message type, end).
    replies: Vec<(u64, u16, usize)>,
    reply_buf: Vec<u8>,
    /// Mailbox messages the receiver had no room for yet.
    stalled: VecDeque<(CoreId, CoreMsg)>,
    /// Sessions to drop for sending undecodable requests.
    kick: Vec<(u64, String)>,
    events: Vec<StoreEvent>,
    stats: OsdStats,
    /// Every request must come from a session with a valid ticket.
    auth_required: bool,
    /// Connections to peer OSDs' cores, and the writes waiting for their replies by
    /// (PG, version) -> op slot.
    peers: Peers,
    rep_waiting: HashMap<(PgId, u64), usize>,
    /// Messages the peers sent, handled after polling them.
    received: Vec<Received>,
    /// The clock of the current poll.
    now: MonoTime,
    /// Where PG reports go (the cluster agent), and whether a PG's state changed since
    /// the last one.
    pg_tx: Option<PgReportTx>,
    pg_dirty: bool,
    next_pg_report: MonoTime,
    last_pg_report: MonoTime,
    /// Read lease rounds: the last one started, the recent ones with when they were
    /// sent and for how long, when the last round for every PG went out, and PGs waiting out the leases of a
    /// previous interval before they go active: (until, PG, peering epoch).
    lease_round: u64,
    lease_sent: VecDeque<(u64, MonoTime, Duration)>,
    last_lease_round: MonoTime,
    lease_waits: Vec<(MonoTime, PgId, u64)>,
    next_scrub_id: u64,
    /// PGs whose recovery waits for a slot (`osd_recovery_max_active`).
    recovery_queue: VecDeque<PgId>,
}

/// The serving poller of one core. See the module documentation.
pub struct OsdCore<D: BlockDevice> {
    server: Server,
    c: Core<D>,
    inbox: Inbox<CoreMsg>,
    maps: mpsc::Receiver<MapView>,
    /// A map taken while preparing to park, for the next poll.
    new_view: Option<MapView>,
    auth: Option<CoreAuth>,
    /// Secrets taken while preparing to park, for the next poll.
    new_auth: Option<DataplaneAuth>,
    /// A timer is set to expire requests waiting for a map.
    wait_timer: bool,
    /// A timer is set to reconnect to peers after their backoff.
    peer_timer: bool,
    /// The clock of the last poll.
    last_now: MonoTime,
    /// A timer is set for the next PG report.
    pg_timer: bool,
    /// A timer is set for this lease event.
    lease_timer: Option<MonoTime>,
    /// Commands from the cluster agent (scrubs), and those taken while preparing to park.
    commands: Option<mpsc::Receiver<CoreCmd>>,
    new_commands: Vec<CoreCmd>,
    park: Epoll,
    /// When idle sessions were last expired (the reactor's clock: no clock read per pass).
    last_expire: MonoTime,
    /// When periodic scrubs were last looked for.
    last_scrub_check: MonoTime,
    last_stats_log: Instant,
}

impl<D: BlockDevice> std::fmt::Debug for OsdCore<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OsdCore").field("core", &self.c.core).field("server", &self.server).finish()
    }
}

/// Why a core could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("reading the PG logs of shard {shard}: {error}")]
    Store { shard: u16, error: StoreError },
    #[error("undecodable PG log entry {key} in {coll}")]
    BadLog { coll: CollId, key: u64 },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("epoll: {0}")]
    Epoll(#[from] nix::Error),
}

impl<D: BlockDevice> OsdCore<D> {
    /// Builds the core's server on `server`'s listener and loads the PG logs of its shard
    /// (blocking: call before the reactor serves). With `auth`, every op needs a ticket.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        mut shard: Shard<D>,
        server: Server,
        core: u16,
        cores: usize,
        outbox: Outbox<CoreMsg>,
        inbox: Inbox<CoreMsg>,
        maps: mpsc::Receiver<MapView>,
        auth: Option<CoreAuth>,
    ) -> Result<OsdCore<D>, OpenError> {
        let sid = shard.shard_id();
        let serr = |error| OpenError::Store { shard: sid, error };
        let mut pgs = HashMap::new();
        let colls = match blocking::run_query(&mut shard, Query::ListCollections).map_err(serr)? {
            Answer::Collections(c) => c,
            other => unreachable!("ListCollections answered {other:?}"),
        };
        for coll in colls {
            let mut pg = Pg { exists: true, ..Pg::default() };
            let mut after = None;
            loop {
                let q = Query::PgLog { coll, after, max: 4096 };
                let entries = match blocking::run_query(&mut shard, q).map_err(serr)? {
                    Answer::PgLog(e) => e,
                    other => unreachable!("PgLog answered {other:?}"),
                };
                let Some(&(last, _)) = entries.last() else { break };
                for (key, entry) in &entries {
                    let e = LogEntry::decode(entry).ok_or(OpenError::BadLog { coll, key: *key })?;
                    pg.insert_log(*key, Logged::from_entry(e));
                }
                after = Some(last);
            }
            // Entries rolled back past the last real one are overwritten by later writes.
            pg.version = pg.log.iter().rev().find(|(_, l)| !l.rolled_back()).map_or(0, |(v, _)| *v);
            pgs.insert(PgId::from_collection(coll.0), pg);
        }
        let park = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        park.add(server.fd(), EpollEvent::new(EpollFlags::EPOLLIN, 0))?;
        if let Some(fd) = shard.park_fd() {
            park.add(fd, EpollEvent::new(EpollFlags::EPOLLIN, 1))?;
        }
        Ok(OsdCore {
            server,
            c: Core {
                core,
                cores,
                shard,
                outbox,
                view: None,
                pgs,
                primaries: PrimaryCache::default(),
                ops: slab::Slab::new(),
                waiting: VecDeque::new(),
                waiting_bytes: 0,
                replies: Vec::new(),
                reply_buf: Vec::new(),
                stalled: VecDeque::new(),
                kick: Vec::new(),
                events: Vec::new(),
                stats: OsdStats::default(),
                auth_required: auth.is_some(),
                peers: Peers::new(auth.is_some()),
                rep_waiting: HashMap::new(),
                received: Vec::new(),
                now: MonoTime::ZERO,
                pg_tx: None,
                pg_dirty: true,
                next_pg_report: MonoTime::ZERO,
                last_pg_report: MonoTime::ZERO,
                lease_round: 0,
                lease_sent: VecDeque::new(),
                last_lease_round: MonoTime::ZERO,
                lease_waits: Vec::new(),
                next_scrub_id: 0,
                recovery_queue: VecDeque::new(),
            },
            inbox,
            maps,
            new_view: None,
            auth,
            new_auth: None,
            wait_timer: false,
            peer_timer: false,
            last_now: MonoTime::ZERO,
            pg_timer: false,
            lease_timer: None,
            commands: None,
            new_commands: Vec::new(),
            park,
            last_expire: MonoTime::ZERO,
            last_scrub_check: MonoTime::ZERO,
            last_stats_log: Instant::now(),
        })
    }

    /// Reports of the PGs this core leads go to `tx` (the cluster agent): soon after a
    /// change, and every [`PG_REPORT_INTERVAL`].
    pub fn report_pgs_to(&mut self, tx: PgReportTx) {
        self.c.pg_tx = Some(tx);
    }

    /// Commands for this core (scrubs) come from `rx` (the cluster agent).
    pub fn commands_from(&mut self, rx: mpsc::Receiver<CoreCmd>) {
        self.commands = Some(rx);
    }

    /// PGs with state on this core.
    pub fn pg_count(&self) -> usize {
        self.c.pgs.len()
    }

    pub fn stats(&self) -> OsdStats {
        self.c.stats
    }

    /// New rotating secrets: the first turn authentication on at the server, later ones
    /// replace the set (tickets under the previous, current and next are accepted).
    fn take_secrets(&mut self) -> bool {
        let Some(auth) = &self.auth else { return false };
        let mut newest = None;
        let mut got = false;
        for u in self
            .new_auth
            .take()
            .into_iter()
            .chain(std::iter::from_fn(|| auth.secrets.try_recv().ok()))
        {
            got = true;
            match u {
                DataplaneAuth::Secrets(s) => newest = Some(s),
                DataplaneAuth::Ticket(t) => self.c.peers.set_ticket(t),
            }
        }
        let Some(secrets) = newest else { return got };
        tracing::debug!(
            "core {}: OSD secrets up to id {}",
            self.c.core,
            secrets.entries().last().map_or(0, |e| e.id)
        );
        if self.server.has_auth() {
            self.server.update_secrets(secrets);
        } else {
            self.server.set_auth(Some(ServerAuth {
                service: Service::Osd,
                secrets,
                secure: auth.secure,
            }));
        }
        true
    }

    fn take_maps(&mut self, now: MonoTime) -> bool {
        let mut got = false;
        if let Some(v) = self.new_view.take() {
            got = true;
            self.c.view = Some(v);
        }
        while let Ok(v) = self.maps.try_recv() {
            got = true;
            self.c.view = Some(v);
        }
        if got {
            self.c.on_new_map();
            self.c.peer_all();
            self.c.retry_waiting(now);
        }
        got
    }

    /// Sends replies queued for local sessions.
    fn send_replies(&mut self) -> bool {
        if self.c.replies.is_empty() {
            return false;
        }
        let mut start = 0;
        for &(cookie, msg_type, end) in &self.c.replies {
            let payload = &self.c.reply_buf[start..end];
            if self.server.send(cookie, msg_type, payload).is_none() {
                tracing::debug!("reply for a session that is gone (cookie {cookie:#x})");
            }
            start = end;
        }
        self.c.replies.clear();
        self.c.reply_buf.clear();
        true
    }
}

impl<D: BlockDevice> Poller for OsdCore<D> {
    fn name(&self) -> &'static str {
        "osd-core"
    }

    /// A clean stop checkpoints the shard (see [`Shard::checkpoint_for_stop`]); what
    /// finishes meanwhile is not answered (clients resend to the next primary, and a
    /// write that became durable here is recognised by its request id).
    fn on_stop(&mut self) {
        let shard = self.c.shard.shard_id();
        match self.c.shard.checkpoint_for_stop(&mut |_| {}) {
            Ok(()) => tracing::info!("shard {shard}: checkpoint written for a clean stop"),
            Err(e) => tracing::warn!(
                "shard {shard}: no checkpoint at stop ({e}); the journal is replayed at the next start"
            ),
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> PollResult {
        let now = cx.now;
        self.last_now = now;
        self.c.now = now;
        let mut busy = self.take_secrets();
        busy |= self.take_maps(now);
        let mut cmds = std::mem::take(&mut self.new_commands);
        if let Some(rx) = &self.commands {
            cmds.extend(rx.try_iter());
        }
        for cmd in cmds {
            busy = true;
            self.c.command(cmd);
        }
        // Other cores: forwarded requests and replies to forwarded requests.
        while let Some(m) = self.inbox.recv() {
            busy = true;
            match m {
                CoreMsg::Forward { from, cookie, payload } => {
                    self.c.stats.requests += 1;
                    // Checked by the core it arrived on.
                    self.c.handle(Origin::Core(from, cookie), &payload, now, None);
                }
                CoreMsg::Reply { cookie, payload } => {
                    if self.server.send(cookie, ops::MSG_REPLY, &payload).is_none() {
                        tracing::debug!("forwarded reply for a session that is gone");
                    }
                }
            }
        }
        // The network.
        let c = &mut self.c;
        let now_ms = if c.auth_required { sluice_auth::wall_ms() } else { 0 };
        busy |= self.server.poll(|e| match e {
            ServerEvent::Message { cookie, msg_type, payload, peer, .. } => {
                if msg_type == ops::MSG_REQUEST {
                    c.stats.requests += 1;
                    let origin = Origin::Local(cookie);
                    match (c.auth_required, peer) {
                        (false, _) => c.handle(origin, payload, now, None),
                        (true, Some(t)) if now_ms < t.expires_ms => {
                            c.handle(origin, payload, now, Some(&t.caps))
                        }
                        (true, Some(t)) => {
                            let why = format!(
                                "the ticket of {} expired: renew it and reconnect",
                                t.entity
                            );
                            c.refuse(origin, payload, &why)
                        }
                        (true, None) => c.refuse(
                            origin,
                            payload,
                            "authentication required: this OSD serves only clients with a \
                             ticket (is auth = \"none\" in the client's configuration?)",
                        ),
                    }
                } else if matches!(
                    msg_type,
                    rep::MSG_REP_OP
                        | rep::MSG_PG_QUERY
                        | rep::MSG_PULL
                        | rep::MSG_PUSH
                        | rep::MSG_LEASE
                        | rep::MSG_SCRUB
                ) {
                    let allowed = peer_check(c.auth_required, peer, now_ms);
                    c.handle_peer_msg(cookie, msg_type, payload, allowed);
                } else {
                    c.stats.bad_requests += 1;
                    c.kick.push((cookie, format!("unexpected message type {msg_type:#x}")));
                }
            }
            ServerEvent::Closed { peer, reason } => {
                tracing::info!(
                    "core {}: connection from {} closed: {reason}",
                    c.core,
                    peer.map_or("?".into(), |p| p.to_string())
                );
            }
        });
        for (cookie, why) in self.c.kick.drain(..) {
            tracing::warn!("core {}: dropping session {cookie:#x}: {why}", self.c.core);
            self.server.kick(cookie);
        }
        // Peer OSDs: replies of replicas (and connections to make).
        busy |= self.c.peers.poll(now, &self.park, &mut self.c.received);
        busy |= self.c.handle_received();
        if self.c.peers.reconnect_pending() && !self.peer_timer {
            self.peer_timer = true;
            cx.schedule_after(peers::RECONNECT_BACKOFF, 1);
        }
        // The store.
        busy |= self.c.poll_store();
        busy |= self.c.expire_waiting(now);
        if !self.c.waiting.is_empty() && !self.wait_timer {
            self.wait_timer = true;
            cx.schedule_after(Duration::from_secs(1), 0);
        }
        busy |= self.c.flush_stalled();
        busy |= self.c.lease_tick();
        if let Some(due) = self.c.next_lease_event()
            && self.lease_timer.is_none_or(|t| due < t)
        {
            self.lease_timer = Some(due);
            cx.schedule_after(due.saturating_sub(now).max(Duration::from_millis(1)), 3);
        }
        busy |= self.c.maybe_report_pgs(now);
        if self.c.pg_tx.is_some() && !self.pg_timer {
            self.pg_timer = true;
            let due = if self.c.pg_dirty {
                self.c.last_pg_report.after(PG_REPORT_MIN_GAP)
            } else {
                self.c.next_pg_report
            };
            cx.schedule_after(due.saturating_sub(now).max(Duration::from_millis(1)), 2);
        }
        busy |= self.send_replies();
        busy |= self.server.flush();
        if now.saturating_sub(self.last_scrub_check) >= Duration::from_secs(1) {
            self.last_scrub_check = now;
            self.c.periodic_scrubs();
            self.c.resume_backfills();
        }
        if now.saturating_sub(self.last_expire) > Duration::from_secs(10) {
            self.last_expire = now;
            let now = Instant::now();
            self.c.report_stuck_peerings();
            self.c.kick_recovery();
            self.c.expire_scrubs();
            let n = self.server.expire_idle(now, SESSION_IDLE);
            if n > 0 {
                tracing::info!("core {}: forgot {n} idle session(s)", self.c.core);
            }
            if now.duration_since(self.last_stats_log) > Duration::from_secs(60) {
                self.last_stats_log = now;
                tracing::debug!("core {}: {:?}", self.c.core, self.c.stats);
            }
        }
        PollResult::busy_if(busy)
    }

    fn prepare_park(&mut self) -> bool {
        // Checked after the reactor announced parking: anything published since is seen
        // here or wakes the reactor.
        if !self.inbox.is_empty()
            || !self.c.stalled.is_empty()
            || !self.c.replies.is_empty()
            || !self.c.events.is_empty()
        {
            return false;
        }
        if let Ok(v) = self.maps.try_recv() {
            self.new_view = Some(v);
            return false; // taken (and waiting requests retried) by the next poll
        }
        if let Some(rx) = &self.commands
            && let Ok(c) = rx.try_recv()
        {
            self.new_commands.push(c);
            return false;
        }
        if let Some(a) = &self.auth
            && let Ok(s) = a.secrets.try_recv()
        {
            self.new_auth = Some(s);
            return false;
        }
        if self.c.peers.needs_poll(self.last_now) || !self.c.received.is_empty() {
            return false;
        }
        // Acks held back for a reply to carry them go out now: nothing else will.
        self.server.flush_acks();
        self.c.peers.flush_acks();
        self.c.shard.prepare_park()
    }

    fn on_timer(&mut self, token: u64, _cx: &mut Context<'_>) {
        // The poll that follows expires requests that waited too long for a map, or
        // reconnects to peers.
        match token {
            0 => self.wait_timer = false,
            1 => self.peer_timer = false,
            3 => self.lease_timer = None,
            _ => self.pg_timer = false,
        }
    }

    fn after_park(&mut self) {
        self.c.shard.after_park();
    }

    fn device_in_flight(&self) -> usize {
        self.c.shard.device_in_flight()
    }

    fn park_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.park.0.as_fd())
    }
}

/// Whether a session may send replicated writes: with authentication on, only an OSD
/// with a valid ticket.
fn peer_check(
    auth_required: bool,
    peer: Option<&AuthTicket>,
    now_ms: u64,
) -> Result<(), (Status, String)> {
    match (auth_required, peer) {
        (false, _) => Ok(()),
        (true, Some(t)) if now_ms >= t.expires_ms => Err((
            Status::Unauthenticated,
            format!("the ticket of {} expired: renew it and reconnect", t.entity),
        )),
        (true, Some(t)) if t.entity.kind() == EntityKind::Osd => Ok(()),
        (true, Some(t)) => Err((
            Status::PermissionDenied,
            format!("{} is not an OSD: only OSDs send replicated writes", t.entity),
        )),
        (true, None) => Err((Status::Unauthenticated, "authentication required".into())),
    }
}

/// What a write does to a PG's log besides appending its entry.
#[derive(Debug, Clone, Copy)]
enum Trim {
    /// Past `keep` entries by a step (an eighth of `keep`, 1 to 64), trim to the last
    /// `keep` (primary; `osd_pg_log_keep`, the window in which a resent write is
    /// recognised and a member that was away is recovered from the log).
    Auto { keep: u64 },
    /// As the primary said (0: none).
    Upto(u64),
}

/// The store transaction of a write at `version` (assigned at map `epoch`), with its PG
/// log entry (and a trim), applying the trim to the PG's log in memory; returns the
/// transaction, whether it creates the PG's collection, the trim point (0: none) and
/// the entry to log once durable.
fn write_txn(
    pg: &mut Pg,
    pgid: PgId,
    req: &Request<'_>,
    version: u64,
    epoch: u64,
    trim: Trim,
) -> (Transaction, bool, u64, Logged) {
    let coll = CollId(pgid.collection());
    let name = req.object.to_string();
    let mut txn = Transaction { ops: Vec::with_capacity(4) };
    let created = !pg.exists;
    if created {
        txn.ops.push(TxOp::CreateCollection { coll });
        pg.exists = true;
    }
    let op = match req.op {
        Op::WriteFull { data } => TxOp::WriteFull { coll, name, data: txn_data(data) },
        Op::Write { offset, data } => TxOp::Write { coll, name, offset, data: data.to_vec() },
        Op::Delete => TxOp::Delete { coll, name },
        Op::SetXattr { key, value } => {
            TxOp::SetXattr { coll, name, key: key.to_string(), value: value.to_vec() }
        }
        _ => unreachable!("not a write: {}", req.op.name()),
    };
    txn.ops.push(op);
    let logged = Logged {
        reqid: (req.client, req.tid),
        epoch,
        op: req.op.code(),
        object: req.object.into(),
    };
    txn.ops.push(TxOp::PgLogAppend { coll, key: version, entry: logged.entry().encode() });
    let upto = match trim {
        // Trim in steps of 64 so most writes carry no trim.
        Trim::Auto { keep } if pg.log.len() as u64 >= keep + (keep / 8).clamp(1, 64) => {
            let keep_from = pg.log.keys().nth(pg.log.len() - keep as usize);
            keep_from.expect("counted") - 1
        }
        Trim::Auto { .. } => 0,
        Trim::Upto(u) => u,
    };
    if upto > 0 {
        txn.ops.push(TxOp::PgLogTrim { coll, upto });
        pg.trim_log(upto);
    }
    (txn, created, upto, logged)
}

fn status_of(e: &StoreError) -> Status {
    match e {
        StoreError::NotFound(_) => Status::NotFound,
        StoreError::NoSpace => Status::NoSpace,
        StoreError::Corrupt { .. } => Status::Corrupt,
        StoreError::Io(_) | StoreError::Failed(_) => Status::Io,
        StoreError::Invalid(why) if why.contains("too large") || why.contains("MiB of data") => {
            Status::TooLarge
        }
        StoreError::Invalid(_) | StoreError::Exists(_) | StoreError::NotEmpty(_) => Status::Invalid,
    }
}

impl<D: BlockDevice> Core<D> {
    fn epoch(&self) -> u64 {
        self.view.as_ref().map_or(0, |v| v.map.epoch)
    }

    /// Queues a reply to `origin` (a read's data is copied once, from the store's
    /// buffer into the reply).
    fn reply(&mut self, origin: Origin, r: &Reply<'_>) {
        match origin {
            Origin::Local(cookie) => {
                r.encode(&mut self.reply_buf);
                self.replies.push((cookie, ops::MSG_REPLY, self.reply_buf.len()));
            }
            Origin::Core(core, cookie) => {
                let mut payload = Vec::new();
                r.encode(&mut payload);
                self.send_to_core(CoreId(core), CoreMsg::Reply { cookie, payload });
            }
        }
    }

    fn error(&mut self, origin: Origin, tid: u64, status: Status, message: &str) {
        let r = Reply { tid, epoch: self.epoch(), status, version: 0, message, body: Body::None };
        self.reply(origin, &r);
    }

    fn send_to_core(&mut self, to: CoreId, m: CoreMsg) {
        if !self.stalled.is_empty() {
            self.stalled.push_back((to, m)); // keep the order
            return;
        }
        if let Err(crate::Full(m)) = self.outbox.send(to, m) {
            self.stalled.push_back((to, m));
        }
    }

    fn flush_stalled(&mut self) -> bool {
        let mut busy = false;
        while let Some((to, m)) = self.stalled.pop_front() {
            match self.outbox.send(to, m) {
                Ok(()) => busy = true,
                Err(crate::Full(m)) => {
                    self.stalled.push_front((to, m));
                    break;
                }
            }
        }
        busy
    }

    /// Answers a request from a session without a valid ticket.
    fn refuse(&mut self, origin: Origin, payload: &[u8], why: &str) {
        self.stats.unauthenticated += 1;
        match Request::decode(payload) {
            Ok(r) => self.error(origin, r.tid, Status::Unauthenticated, why),
            Err(e) => {
                self.stats.bad_requests += 1;
                if let Origin::Local(cookie) = origin {
                    self.kick.push((cookie, format!("bad request: {e}")));
                }
            }
        }
    }

    /// Decodes and routes one request. `caps`: what the sender may do, checked once the
    /// pool is known; `None` when nothing is to be checked (authentication off, or the
    /// request was checked by the core it arrived on).
    fn handle(&mut self, origin: Origin, payload: &[u8], now: MonoTime, caps: Option<&Caps>) {
        let req = match Request::decode(payload) {
            Ok(r) => r,
            Err(e) => {
                self.stats.bad_requests += 1;
                match origin {
                    Origin::Local(cookie) => self.kick.push((cookie, format!("bad request: {e}"))),
                    Origin::Core(..) => tracing::warn!("forwarded request undecodable: {e}"),
                }
                return;
            }
        };
        if let (Some(_), Origin::Local(cookie)) = (caps, origin)
            && req.client != cookie
        {
            // Request ids are the session's: another entity cannot pre-empt (or be
            // answered from the log for) someone else's writes.
            let m = format!("request id of client {:#x} on the session of {cookie:#x}", req.client);
            return self.error(origin, req.tid, Status::Invalid, &m);
        }
        let Some(view) = self.view.clone().filter(|v| v.map.epoch >= req.epoch) else {
            if self.waiting.len() >= 65536 || self.waiting_bytes + payload.len() > MAX_WAITING_BYTES
            {
                return self.error(
                    origin,
                    req.tid,
                    Status::Again,
                    "too many requests wait for a map",
                );
            }
            self.waiting_bytes += payload.len();
            self.waiting.push_back(Waiting {
                origin,
                payload: payload.to_vec(),
                since: now,
                caps: caps.cloned(),
            });
            return;
        };
        let Some(pool) = view.map.pools.get(&PoolId(req.pool)) else {
            let m = format!("no pool {} at epoch {}", req.pool, view.map.epoch);
            return self.error(origin, req.tid, Status::NoPool, &m);
        };
        if let Some(caps) = caps {
            let need = if req.op.is_write() { Perms::W } else { Perms::R };
            if let Err(denied) = caps.check(need, Some(&pool.name)) {
                self.stats.denied += 1;
                let m = format!("{} on pool {}: {denied}", req.op.name(), pool.name);
                return self.error(origin, req.tid, Status::PermissionDenied, &m);
            }
        }
        let pg = match req.op {
            Op::List { .. } => {
                if req.pg >= pool.pg_num {
                    let m = format!("pool {} has {} PGs", pool.name, pool.pg_num);
                    return self.error(origin, req.tid, Status::Invalid, &m);
                }
                PgId { pool: pool.id, pg: req.pg }
            }
            _ => {
                if req.object.is_empty() {
                    return self.error(origin, req.tid, Status::Invalid, "empty object name");
                }
                placement::object_pg(pool, req.object)
            }
        };
        let primary = self.primaries.primary(&view.map, pool, pg);
        if pg.pg != req.pg || primary != Some(view.me) {
            self.stats.redirects += 1;
            let m = format!(
                "{} is not the primary of PG {pg} at epoch {} (the primary is {})",
                view.me,
                view.map.epoch,
                primary.map_or("none".into(), |p| p.to_string())
            );
            return self.error(origin, req.tid, Status::Redirect, &m);
        }
        let owner = placement::pg_core(pg, self.cores) as u16;
        if owner != self.core {
            let Origin::Local(cookie) = origin else {
                // Forwarded by a core that computed another owner: never loop.
                return self.error(origin, req.tid, Status::Again, "core routing disagrees");
            };
            self.stats.forwarded += 1;
            let m = CoreMsg::Forward { from: self.core, cookie, payload: payload.to_vec() };
            return self.send_to_core(CoreId(owner), m);
        }
        let acting = self.primaries.mapping(&view.map, pool, pg).up.clone();
        if self.must_hold(pg, &acting) {
            return self.hold(pg, origin, req.tid, payload);
        }
        if req.op.is_write() {
            if self.pgs.get(&pg).is_some_and(|p| p.scrub.is_some() || p.want_scrub.is_some()) {
                // Scrubbed at one version on every member: routed again when it is done.
                return self.hold(pg, origin, req.tid, payload);
            }
            return self.write(origin, &req, payload, pg, &view, &acting);
        }
        if !self.readable(pg) {
            // No current read lease (laggy): routed again once one is granted.
            if let Some(p) = self.pgs.get(&pg)
                && p.held.is_empty()
            {
                tracing::debug!(
                    "PG {pg}: laggy (no read lease; waiting for {:?} in round {})",
                    p.lease_waiting,
                    p.lease_round
                );
            }
            return self.hold(pg, origin, req.tid, payload);
        }
        if self.pgs.get(&pg).is_some_and(|p| p.writing.contains_key(req.object)) {
            // A write to it is not committed everywhere yet: read once it is.
            return self.hold(pg, origin, req.tid, payload);
        }
        self.execute(origin, &req, pg);
    }

    fn execute(&mut self, origin: Origin, req: &Request<'_>, pg: PgId) {
        let coll = CollId(pg.collection());
        let name = req.object;
        let tid = req.tid;
        self.stats.reads += 1;
        let exists = self.pgs.get(&pg).is_some_and(|p| p.exists);
        let (q, kind) = match req.op {
            Op::Read { offset, len } => {
                let len = if len == 0 { ops::MAX_READ_BYTES } else { len.min(ops::MAX_READ_BYTES) };
                (Query::Read { coll, name: name.to_string(), offset, len }, Kind::Read)
            }
            Op::Stat => (Query::Stat { coll, name: name.to_string() }, Kind::Stat),
            Op::GetXattr { key } => (
                Query::GetXattr { coll, name: name.to_string(), key: key.to_string() },
                Kind::GetXattr,
            ),
            Op::List { after, max } => {
                if !exists {
                    let r = Reply {
                        tid,
                        epoch: self.epoch(),
                        status: Status::Ok,
                        version: 0,
                        message: "",
                        body: Body::List { names: Vec::new(), next: None },
                    };
                    return self.reply(origin, &r);
                }
                let max = max.clamp(1, ops::MAX_LIST) as usize;
                (Query::List { coll, after: after.map(str::to_string), max }, Kind::List)
            }
            Op::WriteFull { .. } | Op::Write { .. } | Op::Delete | Op::SetXattr { .. } => {
                unreachable!("writes handled above")
            }
        };
        if !exists {
            return self.error(origin, tid, Status::NotFound, "no such object");
        }
        let slot = self.ops.insert(Pending { origin, tid, kind, dups: Vec::new() });
        self.shard.query(q, slot as u64);
    }

    /// A client's write on the primary: applied locally and sent to every other acting
    /// member; answered when all have it durable ([`Self::finish_write`]).
    fn write(
        &mut self,
        origin: Origin,
        req: &Request<'_>,
        payload: &[u8],
        pgid: PgId,
        view: &MapView,
        acting: &[OsdId],
    ) {
        self.stats.writes += 1;
        let keep = view.tuning.pg_log_keep.max(1);
        let min_size =
            view.map.pools.get(&pgid.pool).map_or(usize::MAX, |p| usize::from(p.min_size));
        let reqid = (req.client, req.tid);
        let epoch = self.epoch();
        let pg = self.pgs.entry(pgid).or_default();
        if let Some(&version) = pg.done.get(&reqid) {
            self.stats.dedup_hits += 1;
            let r = Reply {
                tid: req.tid,
                epoch,
                status: Status::Ok,
                version,
                message: "",
                body: Body::None,
            };
            return self.reply(origin, &r);
        }
        if let Some(&slot) = pg.inflight.get(&reqid) {
            self.stats.dedup_hits += 1;
            if let Some(p) = self.ops.get_mut(slot) {
                p.dups.push((origin, req.tid));
            }
            return;
        }
        if let Some(w) = pg.parked.iter_mut().find(|w| w.reqid == reqid) {
            // Durable here, waiting for enough members: answered with the original.
            self.stats.dedup_hits += 1;
            w.dups.push((origin, req.tid));
            return;
        }
        if matches!(req.op, Op::Delete) && !pg.exists {
            return self.error(origin, req.tid, Status::NotFound, "no such object");
        }
        debug_assert!(self.pgs[&pgid].peering.is_none(), "writes wait while a PG peers");
        // Members recovery could not bring up to date are not copies; members being
        // backfilled are not either, but get the writes to objects they have (the
        // `backfill` module).
        let pg = &self.pgs[&pgid];
        let mut partial = Vec::new();
        for (osd, b) in &pg.backfills {
            match b.for_write(req.object) {
                backfill::ForTarget::Send => partial.push(*osd),
                backfill::ForTarget::Skip => {}
                backfill::ForTarget::Wait => {
                    return self.hold_for_backfill(pgid, origin, req, payload);
                }
            }
        }
        let copies = acting
            .iter()
            .filter(|o| !pg.behind.contains(o) && !pg.backfills.contains_key(o))
            .count();
        let acting: Vec<OsdId> = acting
            .iter()
            .copied()
            .filter(|o| {
                !pg.behind.contains(o) && (!pg.backfills.contains_key(o) || partial.contains(o))
            })
            .collect();
        if copies < min_size {
            self.stats.below_min_size += 1;
            let m = format!(
                "PG {pgid} has {copies} of min_size {min_size} copies at epoch {}: writes wait",
                view.map.epoch
            );
            return self.error(origin, req.tid, Status::Again, &m);
        }
        debug_assert_eq!(acting.first(), Some(&view.me), "only the primary takes writes");
        let pg = self.pgs.get_mut(&pgid).expect("entered above");
        let version = pg.version + 1;
        let (txn, created, trim_upto, logged) =
            write_txn(pg, pgid, req, version, view.map.epoch, Trim::Auto { keep });
        pg.version = version;
        let replicas: Vec<OsdId> = acting.iter().copied().filter(|o| *o != view.me).collect();
        let state = WriteState {
            pg: pgid,
            reqid,
            version,
            logged,
            created,
            local: None,
            waiting: Vec::new(),
            acked: 0,
            sent: 0,
            min_size,
            replica_error: None,
            sent_epoch: view.map.epoch,
            partial,
        };
        let kind = Kind::Write(Box::new(state));
        let slot = self.ops.insert(Pending { origin, tid: req.tid, kind, dups: Vec::new() });
        if let Err(e) = self.shard.submit(txn, slot as u64) {
            // Refused before queueing: nothing happened here or anywhere.
            let p = self.ops.remove(slot);
            let pg = self.pgs.get_mut(&pgid).expect("entered above");
            pg.version -= 1;
            if created {
                pg.exists = false;
            }
            return self.error(p.origin, p.tid, status_of(&e), &e.to_string());
        }
        let pg = self.pgs.get_mut(&pgid).expect("entered above");
        pg.inflight.insert(reqid, slot);
        *pg.writing.entry(req.object.to_string()).or_default() += 1;
        if replicas.is_empty() {
            return;
        }
        let op = RepOp {
            epoch: view.map.epoch,
            pool: pgid.pool.0,
            pg: pgid.pg,
            version,
            trim_upto,
            request: payload,
        };
        let mut head = Vec::with_capacity(64);
        let tail = op.encode_head(&mut head);
        let mut waiting = Vec::with_capacity(replicas.len());
        let mut unsent = None;
        for osd in replicas {
            let sent = peers::core_addr(&view.map, osd, |n| placement::pg_core(pgid, n))
                .ok_or_else(|| format!("{osd} has no address at epoch {}", view.map.epoch))
                .and_then(|addr| self.peers.send(osd, addr, rep::MSG_REP_OP, &[&head, tail]));
            match sent {
                Ok(()) => {
                    self.stats.rep_sent += 1;
                    waiting.push(osd);
                }
                Err(e) => {
                    tracing::warn!("PG {pgid} v{version}: not sent to {osd}: {e}");
                    unsent = Some((Status::Again, format!("not sent to {osd}: {e}")));
                }
            }
        }
        let Kind::Write(w) = &mut self.ops[slot].kind else { unreachable!("inserted above") };
        w.sent = waiting.len();
        w.waiting = waiting;
        w.replica_error = unsent;
        self.rep_waiting.insert((pgid, version), slot);
    }

    /// Answers a client's write once its local copy is durable (or failed) and no acting
    /// replica is still to answer.
    fn finish_write(&mut self, slot: usize) {
        let ready = matches!(&self.ops[slot].kind, Kind::Write(w) if w.local.is_some() && w.waiting.is_empty());
        if !ready {
            return;
        }
        let p = self.ops.remove(slot);
        let Kind::Write(w) = p.kind else { unreachable!("checked above") };
        let object = w.logged.object.clone();
        self.rep_waiting.remove(&(w.pg, w.version));
        let epoch = self.epoch();
        let st = self.pgs.get_mut(&w.pg).expect("a PG with writes in flight stays");
        st.inflight.remove(&w.reqid);
        let failure = match w.local.expect("checked above") {
            Err(e) => {
                if w.created || matches!(e, StoreError::NotFound(Missing::Collection(_))) {
                    st.exists = false;
                }
                if w.sent == 0 && st.version == w.version {
                    // Nothing after it was handed a version and no replica saw it:
                    // reuse it, so the log stays dense when no failure overlaps another.
                    st.version -= 1;
                }
                if w.sent > 0 {
                    // Replicas may have it and this store does not: peering reconciles
                    // (the write may then become visible though the client heard of a
                    // failure, as when a device fails under any replicated store).
                    st.want_peer = true;
                }
                Some((status_of(&e), e.to_string()))
            }
            Ok(()) => {
                // In the log on disk, so in the log here (peering and trims follow it);
                // recorded as done only if every copy made it.
                st.log.insert(w.version, w.logged);
                if w.replica_error.is_some() || 1 + w.acked < w.min_size {
                    // A replica did not take it, or replicas left and fewer than min_size
                    // copies are durable: the write waits for the PG to peer again (which
                    // copies it to every member) and is answered from the log once the
                    // PG is active with min_size members. Never failed, never applied
                    // twice.
                    if let Some((_, why)) = &w.replica_error {
                        tracing::info!("PG {} v{}: {why}; the PG peers again", w.pg, w.version);
                        st.want_peer = true;
                    }
                    tracing::info!(
                        "PG {} v{}: {} of min_size {} copies; the reply waits for the PG",
                        w.pg,
                        w.version,
                        1 + w.acked,
                        w.min_size
                    );
                    st.parked.push(Parked {
                        object,
                        origin: p.origin,
                        tid: p.tid,
                        dups: p.dups,
                        version: w.version,
                        reqid: w.reqid,
                    });
                    let pgid = w.pg;
                    return self.after_writes(pgid);
                } else {
                    st.done.insert(w.reqid, w.version);
                    None
                }
            }
        };
        let pgid = w.pg;
        match failure {
            None => {
                let reply = Reply {
                    tid: p.tid,
                    epoch,
                    status: Status::Ok,
                    version: w.version,
                    message: "",
                    body: Body::None,
                };
                self.reply(p.origin, &reply);
                for (o, tid) in p.dups {
                    self.reply(o, &Reply { tid, ..reply.clone() });
                }
            }
            Some((status, m)) => {
                self.error(p.origin, p.tid, status, &m);
                for (o, tid) in p.dups {
                    self.error(o, tid, status, &m);
                }
            }
        }
        self.done_writing(pgid, &[object]);
        self.after_writes(pgid);
    }

    /// Writes of `objects` are answered: reads that waited for them run.
    pub(super) fn done_writing(&mut self, pgid: PgId, objects: &[String]) {
        let Some(pg) = self.pgs.get_mut(&pgid) else { return };
        let mut freed = false;
        for o in objects {
            if let Some(n) = pg.writing.get_mut(o) {
                *n -= 1;
                if *n == 0 {
                    pg.writing.remove(o);
                    freed = true;
                }
            }
        }
        let backfilling = !pg.backfills.is_empty();
        if freed && !pg.held.is_empty() {
            self.release_held(pgid);
        }
        if freed && backfilling {
            // Objects skipped for their writes may be copied now.
            self.backfill_more(pgid);
        }
    }

    /// A primary's write for a PG this core owns (a replica's side).
    fn handle_rep(&mut self, cookie: u64, payload: &[u8], allowed: Result<(), (Status, String)>) {
        let op = match RepOp::decode(payload) {
            Ok(op) => op,
            Err(e) => {
                self.stats.bad_requests += 1;
                self.kick.push((cookie, format!("bad replicated write: {e}")));
                return;
            }
        };
        let pgid = PgId { pool: PoolId(op.pool), pg: op.pg };
        let refuse = |c: &mut Self, status, m: &str| {
            let r = RepReply { pool: op.pool, pg: op.pg, version: op.version, status, message: m };
            c.rep_reply(cookie, &r);
        };
        if let Err((status, m)) = allowed {
            self.stats.denied += 1;
            return refuse(self, status, &m);
        }
        let req = match Request::decode(op.request) {
            Ok(r) if r.op.is_write() => r,
            Ok(r) => {
                return refuse(self, Status::Invalid, &format!("{} is not a write", r.op.name()));
            }
            Err(e) => return refuse(self, Status::Invalid, &format!("undecodable request: {e}")),
        };
        let owner = placement::pg_core(pgid, self.cores) as u16;
        if owner != self.core {
            let m = format!("PG {pgid} belongs to core {owner} of this OSD, not {}", self.core);
            return refuse(self, Status::Invalid, &m);
        }
        let reqid = (req.client, req.tid);
        let pg = self.pgs.entry(pgid).or_default();
        if op.epoch < pg.interval_epoch {
            // From a primary of an interval that a newer primary has peered past.
            let m = format!(
                "PG {pgid}: a write of epoch {} is older than the interval of epoch {}",
                op.epoch, pg.interval_epoch
            );
            return refuse(self, Status::Again, &m);
        }
        // Backfilled alongside writes (the `backfill` module): applied, not logged.
        let logged_here = !pg.backfilling;
        if !logged_here {
            // Versions arrive in order (gaps are writes to objects not copied yet): an
            // older one is a resend after a session reset.
            if let Some(&slot) = pg.inflight.get(&reqid) {
                self.stats.dedup_hits += 1;
                self.ops[slot].dups.push((Origin::Local(cookie), 0));
                return;
            }
            if op.version <= pg.backfill_applied {
                self.stats.dedup_hits += 1;
                return refuse(self, Status::Ok, "");
            }
            pg.backfill_applied = op.version;
        } else if op.version <= pg.version {
            // Seen before: a resend after the primary's session was reset.
            if pg.done.get(&reqid) == Some(&op.version) {
                self.stats.dedup_hits += 1;
                return refuse(self, Status::Ok, "");
            }
            if let Some(&slot) = pg.inflight.get(&reqid)
                && matches!(self.ops[slot].kind, Kind::RepWrite { .. })
            {
                self.stats.dedup_hits += 1;
                self.ops[slot].dups.push((Origin::Local(cookie), 0));
                return;
            }
            let m = format!(
                "version {} of PG {pgid} is taken by another write here (at {})",
                op.version, pg.version
            );
            tracing::error!("replicated write refused: {m}");
            return refuse(self, Status::Invalid, &m);
        } else if op.version > pg.version + 1 {
            // Writes this replica never saw: applying past them would make a log with a
            // hole. The primary parks the write and peers again (recovery fills it).
            self.stats.rep_gaps += 1;
            let m = format!(
                "PG {pgid}: v{} after v{}: this replica missed {} write(s)",
                op.version,
                pg.version,
                op.version - pg.version - 1
            );
            tracing::warn!("replicated write refused: {m}");
            return refuse(self, Status::Again, &m);
        }
        let trim = Trim::Upto(if logged_here { op.trim_upto } else { 0 });
        let (mut txn, created, _, logged) = write_txn(pg, pgid, &req, op.version, op.epoch, trim);
        if !logged_here {
            txn.ops.retain(|o| !matches!(o, TxOp::PgLogAppend { .. }));
        }
        let kind = Kind::RepWrite { pg: pgid, version: op.version, created, logged, logged_here };
        let slot = self.ops.insert(Pending {
            origin: Origin::Local(cookie),
            tid: 0,
            kind,
            dups: Vec::new(),
        });
        if let Err(e) = self.shard.submit(txn, slot as u64) {
            self.ops.remove(slot);
            if let Some(pg) = self.pgs.get_mut(&pgid) {
                pg.exists &= !created;
                if !logged_here {
                    // Not applied: the backfill cannot go on (it starts over).
                    pg.end_backfilling();
                }
            }
            return refuse(self, status_of(&e), &e.to_string());
        }
        let pg = self.pgs.get_mut(&pgid).expect("entered above");
        if logged_here {
            pg.version = op.version;
        }
        pg.inflight.insert(reqid, slot);
    }

    fn rep_reply(&mut self, cookie: u64, r: &RepReply<'_>) {
        self.rep_reply_as(cookie, rep::MSG_REP_REPLY, r)
    }

    fn rep_reply_as(&mut self, cookie: u64, msg_type: u16, r: &RepReply<'_>) {
        r.encode(&mut self.reply_buf);
        self.replies.push((cookie, msg_type, self.reply_buf.len()));
    }

    /// A message from a peer OSD on this core's server: replicated writes, and peering
    /// and recovery from a primary.
    fn handle_peer_msg(
        &mut self,
        cookie: u64,
        msg_type: u16,
        payload: &[u8],
        allowed: Result<(), (Status, String)>,
    ) {
        if msg_type == rep::MSG_REP_OP {
            return self.handle_rep(cookie, payload, allowed);
        }
        if let Err((_, why)) = &allowed {
            // Only OSDs peer: the session goes.
            self.stats.denied += 1;
            self.kick.push((cookie, format!("peering message refused: {why}")));
            return;
        }
        let r = match msg_type {
            rep::MSG_PG_QUERY => rep::PgQuery::decode(payload).map(|q| self.on_pg_query(cookie, q)),
            rep::MSG_PULL => rep::Pull::decode(payload).map(|p| self.on_pull(cookie, p)),
            rep::MSG_PUSH => rep::Push::decode(payload).map(|p| self.on_push(Some(cookie), p)),
            rep::MSG_LEASE => rep::Lease::decode(payload).map(|l| self.on_lease(cookie, l)),
            rep::MSG_SCRUB => rep::Scrub::decode(payload).map(|s| self.on_scrub(cookie, s)),
            _ => unreachable!("dispatched above"),
        };
        if let Err(e) = r {
            self.stats.bad_requests += 1;
            self.kick.push((cookie, format!("bad peering message {msg_type:#x}: {e}")));
        }
    }

    /// Replies of replicas.
    fn handle_received(&mut self) -> bool {
        if self.received.is_empty() {
            return false;
        }
        let mut received = std::mem::take(&mut self.received);
        for m in received.drain(..) {
            match m.msg_type {
                rep::MSG_REP_REPLY => {}
                rep::MSG_PG_INFO => {
                    match rep::PgInfo::decode(&m.payload) {
                        Ok(info) => self.on_pg_info(m.from, info),
                        Err(e) => tracing::warn!("{} sent an undecodable PG info: {e}", m.from),
                    }
                    continue;
                }
                rep::MSG_PUSH => {
                    match rep::Push::decode(&m.payload) {
                        Ok(p) => self.on_pulled(m.from, p),
                        Err(e) => tracing::warn!("{} sent an undecodable push: {e}", m.from),
                    }
                    continue;
                }
                rep::MSG_SCRUB_MAP => {
                    match rep::ScrubMap::decode(&m.payload) {
                        Ok(map) => self.on_scrub_map(m.from, map),
                        Err(e) => tracing::warn!("{} sent an undecodable scrub map: {e}", m.from),
                    }
                    continue;
                }
                rep::MSG_LEASE_ACK => {
                    match rep::LeaseAck::decode(&m.payload) {
                        Ok(a) => self.on_lease_ack(m.from, a),
                        Err(e) => tracing::warn!("{} sent an undecodable lease ack: {e}", m.from),
                    }
                    continue;
                }
                rep::MSG_PUSH_ACK => {
                    match RepReply::decode(&m.payload) {
                        Ok(r) if r.version == 0 => self.on_pull_failed(m.from, r),
                        Ok(r) => self.on_push_ack(m.from, r),
                        Err(e) => tracing::warn!("{} sent an undecodable push ack: {e}", m.from),
                    }
                    continue;
                }
                t => {
                    tracing::warn!("{} sent unexpected message type {t:#x}", m.from);
                    continue;
                }
            }
            let r = match RepReply::decode(&m.payload) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("{} sent an undecodable replica reply: {e}", m.from);
                    continue;
                }
            };
            let pgid = PgId { pool: PoolId(r.pool), pg: r.pg };
            let Some(&slot) = self.rep_waiting.get(&(pgid, r.version)) else {
                // The write stopped waiting for it (a map change).
                tracing::debug!("late reply from {} for PG {pgid} v{}", m.from, r.version);
                continue;
            };
            let Kind::Write(w) = &mut self.ops[slot].kind else {
                unreachable!("rep_waiting holds writes only")
            };
            let before = w.waiting.len();
            w.waiting.retain(|o| *o != m.from);
            if w.waiting.len() == before {
                continue;
            }
            if r.status == Status::Ok {
                if !w.partial.contains(&m.from) {
                    w.acked += 1;
                }
            } else {
                tracing::warn!("PG {pgid} v{}: {} refused it: {}", r.version, m.from, r.message);
                if w.replica_error.is_none() {
                    w.replica_error =
                        Some((r.status, format!("replica {}: {}", m.from, r.message)));
                }
            }
            self.finish_write(slot);
        }
        self.received = received;
        true
    }

    /// Sends the PG reports when due (see [`PG_REPORT_INTERVAL`]).
    fn maybe_report_pgs(&mut self, now: MonoTime) -> bool {
        let Some(tx) = &self.pg_tx else { return false };
        let due = now >= self.next_pg_report
            || (self.pg_dirty && now >= self.last_pg_report.after(PG_REPORT_MIN_GAP));
        if !due || self.view.is_none() {
            return false;
        }
        let tx = tx.clone();
        let pgs = self.pg_reports();
        self.pg_dirty = false;
        self.last_pg_report = now;
        self.next_pg_report = now.after(PG_REPORT_INTERVAL);
        // The agent gone means the OSD is stopping.
        let _ = tx.send(CorePgReport { core: self.core, pgs });
        true
    }

    /// A new map: writes stop waiting for replicas that left their PG's acting set (or
    /// whose connection went with their old address).
    fn on_new_map(&mut self) {
        let Some(view) = self.view.clone() else { return };
        let gone = self.peers.retain_map(&view.map);
        let slots: Vec<usize> = self.rep_waiting.values().copied().collect();
        for slot in slots {
            let Kind::Write(w) = &mut self.ops[slot].kind else {
                unreachable!("rep_waiting holds writes only")
            };
            let acting = match view.map.pools.get(&w.pg.pool) {
                Some(pool) => self.primaries.mapping(&view.map, pool, w.pg).up.clone(),
                None => Vec::new(),
            };
            let before = w.waiting.len();
            let sent_epoch = w.sent_epoch;
            let restarted = |o: &OsdId| view.map.osd(*o).is_none_or(|i| i.up_from > sent_epoch);
            w.waiting.retain(|o| acting.contains(o) && !gone.contains(o) && !restarted(o));
            if w.waiting.len() != before {
                tracing::info!(
                    "PG {} v{}: {} replica(s) left the acting set at epoch {}",
                    w.pg,
                    w.version,
                    before - w.waiting.len(),
                    view.map.epoch
                );
                self.finish_write(slot);
            }
        }
    }

    fn poll_store(&mut self) -> bool {
        let mut events = std::mem::take(&mut self.events);
        let busy = self.shard.poll(&mut |e| events.push(e));
        for e in events.drain(..) {
            self.complete(e);
        }
        self.events = events;
        busy
    }

    fn complete(&mut self, e: StoreEvent) {
        let (token, result) = match e {
            StoreEvent::Txn { token, result } => (token, result.map(|_| None)),
            StoreEvent::Query { token, result } => (token, result.map(Some)),
        };
        let slot = token as usize;
        let Some(p) = self.ops.get_mut(slot) else {
            panic!("store completed token {token} that is not in flight");
        };
        if let Kind::Write(w) = &mut p.kind {
            w.local = Some(result.map(|_| ()));
            return self.finish_write(slot);
        }
        let p = self.ops.remove(slot);
        let p = match p.kind {
            Kind::RecoveryRead { pg, object, to, stage } => {
                return self.recovery_read_done(pg, object, to, stage, result);
            }
            kind @ Kind::PushApply { .. } => return self.push_applied(kind, result.map(|_| ())),
            Kind::ScrubRead { job, stage } => return self.scrub_read_done(*job, stage, result),
            kind => Pending { kind, ..p },
        };
        let epoch = self.epoch();
        let ok = |version, body| Reply {
            tid: p.tid,
            epoch,
            status: Status::Ok,
            version,
            message: "",
            body,
        };
        match (p.kind, result) {
            (
                Kind::Write(_)
                | Kind::RecoveryRead { .. }
                | Kind::PushApply { .. }
                | Kind::ScrubRead { .. },
                _,
            ) => unreachable!("handled above"),
            (Kind::RepWrite { pg, version, created, logged, logged_here }, r) => {
                let st = self.pgs.get_mut(&pg).expect("a PG with writes in flight stays");
                st.inflight.remove(&logged.reqid);
                let (status, m) = match r {
                    Ok(_) => {
                        self.stats.rep_applied += 1;
                        if logged_here {
                            st.insert_log(version, logged);
                        }
                        (Status::Ok, String::new())
                    }
                    Err(e) => {
                        if created || matches!(e, StoreError::NotFound(Missing::Collection(_))) {
                            st.exists = false;
                        }
                        if !logged_here && st.backfilling {
                            // A write a backfill sent is not here: the backfill starts
                            // over (a resend must not be taken for applied, nor the
                            // closing log for complete).
                            st.end_backfilling();
                        }
                        if logged_here && st.version == version {
                            // Not in the log here: a resend of it may take the version.
                            st.version -= 1;
                        }
                        (status_of(&e), e.to_string())
                    }
                };
                let r = RepReply { pool: pg.pool.0, pg: pg.pg, version, status, message: &m };
                for o in std::iter::once(p.origin).chain(p.dups.into_iter().map(|(o, _)| o)) {
                    let Origin::Local(cookie) = o else { unreachable!("peers are local sessions") };
                    self.rep_reply(cookie, &r);
                }
                self.after_writes(pg);
            }
            (_, Err(e)) => {
                let m = e.to_string();
                self.error(p.origin, p.tid, status_of(&e), &m);
            }
            (Kind::Read, Ok(Some(Answer::Data(d)))) => {
                self.reply(p.origin, &ok(0, Body::Data(d.data())));
            }
            (Kind::Stat, Ok(Some(Answer::Stat(s)))) => {
                self.reply(p.origin, &ok(s.version, Body::Stat { size: s.size }));
            }
            (Kind::GetXattr, Ok(Some(Answer::Xattr(v)))) => {
                self.reply(p.origin, &ok(0, Body::Data(&v)));
            }
            (Kind::List, Ok(Some(Answer::List { names, next }))) => {
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                let body = Body::List { names, next: next.as_deref() };
                self.reply(p.origin, &ok(0, body));
            }
            (kind, Ok(a)) => panic!("store answered {kind:?} with {a:?}"),
        }
    }

    /// A new map: requests waiting for it go through routing again.
    fn retry_waiting(&mut self, now: MonoTime) {
        let epoch = self.epoch();
        let n = self.waiting.len();
        for _ in 0..n {
            let w = self.waiting.pop_front().expect("counted");
            match Request::decode(&w.payload) {
                Ok(r) if r.epoch <= epoch => {
                    self.waiting_bytes -= w.payload.len();
                    self.handle(w.origin, &w.payload, now, w.caps.as_ref())
                }
                _ => self.waiting.push_back(w),
            }
        }
    }

    /// Requests that waited too long for a map are told to try again.
    fn expire_waiting(&mut self, now: MonoTime) -> bool {
        let mut busy = false;
        while let Some(w) = self.waiting.front() {
            if now.saturating_sub(w.since) < MAP_WAIT {
                break;
            }
            let Waiting { origin, payload, .. } = self.waiting.pop_front().expect("peeked");
            self.waiting_bytes -= payload.len();
            let tid = Request::decode(&payload).map_or(0, |r| r.tid);
            let m = format!("waited {MAP_WAIT:?} for a newer map (have epoch {})", self.epoch());
            self.error(origin, tid, Status::Again, &m);
            busy = true;
        }
        busy
    }
}

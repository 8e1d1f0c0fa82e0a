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
//! answered when the original finishes. The log keeps the last [`LOG_KEEP`] entries per
//! PG; replication (peering, recovery) builds on the same log.
//!
//! **Reads** go to the store, which answers with committed data only.
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

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use sluice_auth::{Caps, Perms, RotatingSecrets, Service};
use sluice_control::maps::placement::{self, PgId, PrimaryCache};
use sluice_control::maps::{OsdId, OsdMap, PoolId};
use sluice_net::ops::{self, Body, Op, Reply, Request, Status};
use sluice_net::tcp::{Server, ServerAuth, ServerEvent};
use sluice_nvme::BlockDevice;
use sluice_vocab::{CoreId, MonoTime};

use crate::store::{
    Answer, CollId, Missing, Query, Shard, StoreError, StoreEvent, Transaction, TxOp, blocking,
    txn_data,
};
use crate::{Context, Inbox, Outbox, PollResult, Poller};

/// PG log entries kept per PG (the window in which a resent write is recognised).
pub const LOG_KEEP: u64 = 2000;
/// How long a request from a newer map epoch waits for that map.
pub const MAP_WAIT: Duration = Duration::from_secs(10);
/// Payload bytes of requests waiting for a newer map, at most (more are told to retry).
pub const MAX_WAITING_BYTES: usize = 64 << 20;
/// How long a server keeps the session of a client that went away.
pub const SESSION_IDLE: Duration = Duration::from_secs(300);

/// A map as a core sees it: the map and who this OSD is in it.
#[derive(Debug, Clone)]
pub struct MapView {
    pub map: Arc<OsdMap>,
    pub me: OsdId,
}

/// Authentication on a core's server: every connection must present a ticket for the
/// OSD service, sealed with one of the rotating secrets that arrive on `secrets` (the
/// first before the OSD boots; until then every op is refused as unauthenticated).
#[derive(Debug)]
pub struct CoreAuth {
    /// Connections continue in secure mode (AEAD records) after the handshake.
    pub secure: bool,
    pub secrets: mpsc::Receiver<RotatingSecrets>,
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

/// A PG log entry: what the store keeps per write, with the request id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub client: u64,
    pub tid: u64,
    pub op: u8,
    pub object: String,
}

const LOG_ENTRY_VERSION: u8 = 1;

impl LogEntry {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(18 + self.object.len());
        v.push(LOG_ENTRY_VERSION);
        v.push(self.op);
        v.extend_from_slice(&self.client.to_le_bytes());
        v.extend_from_slice(&self.tid.to_le_bytes());
        v.extend_from_slice(self.object.as_bytes());
        v
    }

    pub fn decode(b: &[u8]) -> Option<LogEntry> {
        if b.len() < 18 || b[0] != LOG_ENTRY_VERSION {
            return None;
        }
        Some(LogEntry {
            op: b[1],
            client: u64::from_le_bytes(b[2..10].try_into().ok()?),
            tid: u64::from_le_bytes(b[10..18].try_into().ok()?),
            object: String::from_utf8(b[18..].to_vec()).ok()?,
        })
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
    /// Versions in the log, oldest first, with their request ids.
    log: VecDeque<(u64, ReqId)>,
    /// Request ids in the log -> the version they were applied at.
    done: HashMap<ReqId, u64>,
    /// Request ids being applied -> the op slot.
    inflight: HashMap<ReqId, usize>,
}

#[derive(Debug)]
enum Kind {
    Write { pg: PgId, reqid: ReqId, version: u64, created: bool },
    Read,
    Stat,
    List,
    GetXattr,
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
    /// Replies for local sessions, encoded back to back: (cookie, end offset).
    replies: Vec<(u64, usize)>,
    reply_buf: Vec<u8>,
    /// Mailbox messages the receiver had no room for yet.
    stalled: VecDeque<(CoreId, CoreMsg)>,
    /// Sessions to drop for sending undecodable requests.
    kick: Vec<(u64, String)>,
    events: Vec<StoreEvent>,
    stats: OsdStats,
    /// Every request must come from a session with a valid ticket.
    auth_required: bool,
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
    new_secrets: Option<RotatingSecrets>,
    /// A timer is set to expire requests waiting for a map.
    wait_timer: bool,
    park: Epoll,
    /// When idle sessions were last expired (the reactor's clock: no clock read per pass).
    last_expire: MonoTime,
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
                    pg.log.push_back((*key, (e.client, e.tid)));
                    pg.done.insert((e.client, e.tid), *key);
                    pg.version = pg.version.max(*key);
                }
                after = Some(last);
            }
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
            },
            inbox,
            maps,
            new_view: None,
            auth,
            new_secrets: None,
            wait_timer: false,
            park,
            last_expire: MonoTime::ZERO,
            last_stats_log: Instant::now(),
        })
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
        let mut newest = self.new_secrets.take();
        while let Ok(s) = auth.secrets.try_recv() {
            newest = Some(s);
        }
        let Some(secrets) = newest else { return false };
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
        for &(cookie, end) in &self.c.replies {
            let payload = &self.c.reply_buf[start..end];
            if self.server.send(cookie, ops::MSG_REPLY, payload).is_none() {
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

    fn poll(&mut self, cx: &mut Context<'_>) -> PollResult {
        let now = cx.now;
        let mut busy = self.take_secrets();
        busy |= self.take_maps(now);
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
        // The store.
        busy |= self.c.poll_store();
        busy |= self.c.expire_waiting(now);
        if !self.c.waiting.is_empty() && !self.wait_timer {
            self.wait_timer = true;
            cx.schedule_after(Duration::from_secs(1), 0);
        }
        busy |= self.c.flush_stalled();
        busy |= self.send_replies();
        busy |= self.server.flush();
        if now.saturating_sub(self.last_expire) > Duration::from_secs(10) {
            self.last_expire = now;
            let now = Instant::now();
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
        if let Some(a) = &self.auth
            && let Ok(s) = a.secrets.try_recv()
        {
            self.new_secrets = Some(s);
            return false;
        }
        // Acks held back for a reply to carry them go out now: nothing else will.
        self.server.flush_acks();
        self.c.shard.prepare_park()
    }

    fn on_timer(&mut self, _token: u64, _cx: &mut Context<'_>) {
        // The poll that follows expires requests that waited too long for a map.
        self.wait_timer = false;
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
                self.replies.push((cookie, self.reply_buf.len()));
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
        self.execute(origin, &req, pg);
    }

    fn execute(&mut self, origin: Origin, req: &Request<'_>, pg: PgId) {
        let coll = CollId(pg.collection());
        let name = req.object;
        let tid = req.tid;
        if req.op.is_write() {
            return self.write(origin, req, pg);
        }
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

    fn write(&mut self, origin: Origin, req: &Request<'_>, pgid: PgId) {
        self.stats.writes += 1;
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
        let coll = CollId(pgid.collection());
        let name = req.object.to_string();
        if matches!(req.op, Op::Delete) && !pg.exists {
            return self.error(origin, req.tid, Status::NotFound, "no such object");
        }
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
        pg.version += 1;
        let version = pg.version;
        let entry = LogEntry {
            client: req.client,
            tid: req.tid,
            op: req.op.code(),
            object: req.object.into(),
        };
        txn.ops.push(TxOp::PgLogAppend { coll, key: version, entry: entry.encode() });
        if pg.log.len() as u64 >= LOG_KEEP + 64 {
            // Trim in steps of 64 so most writes carry no trim.
            let upto = pg.log[pg.log.len() - LOG_KEEP as usize].0 - 1;
            txn.ops.push(TxOp::PgLogTrim { coll, upto });
            while pg.log.front().is_some_and(|(v, _)| *v <= upto) {
                let (_, id) = pg.log.pop_front().expect("checked");
                pg.done.remove(&id);
            }
        }
        let kind = Kind::Write { pg: pgid, reqid, version, created };
        let slot = self.ops.insert(Pending { origin, tid: req.tid, kind, dups: Vec::new() });
        if let Err(e) = self.shard.submit(txn, slot as u64) {
            // Refused before queueing: nothing happened.
            let p = self.ops.remove(slot);
            if created && let Some(pg) = self.pgs.get_mut(&pgid) {
                pg.exists = false;
            }
            return self.error(p.origin, p.tid, status_of(&e), &e.to_string());
        }
        self.pgs.get_mut(&pgid).expect("entered above").inflight.insert(reqid, slot);
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
        let Some(p) = self.ops.try_remove(slot) else {
            panic!("store completed token {token} that is not in flight");
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
            (Kind::Write { pg, reqid, version, created }, r) => {
                let st = self.pgs.get_mut(&pg).expect("a PG with writes in flight stays");
                st.inflight.remove(&reqid);
                match r {
                    Ok(_) => {
                        st.log.push_back((version, reqid));
                        st.done.insert(reqid, version);
                        let reply = ok(version, Body::None);
                        self.reply(p.origin, &reply);
                        for (o, tid) in p.dups {
                            self.reply(o, &Reply { tid, ..reply.clone() });
                        }
                    }
                    Err(e) => {
                        if created || matches!(e, StoreError::NotFound(Missing::Collection(_))) {
                            st.exists = false;
                        }
                        if st.version == version {
                            // Nothing after it was handed a version: reuse it, so the
                            // log stays dense when no failure overlaps another write.
                            st.version -= 1;
                        }
                        let m = e.to_string();
                        self.error(p.origin, p.tid, status_of(&e), &m);
                        for (o, tid) in p.dups {
                            self.error(o, tid, status_of(&e), &m);
                        }
                    }
                }
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

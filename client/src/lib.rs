//! The Sluice client library: objects over the network.
//!
//! A [`Cluster`] connects from a configuration file (the monitors) and keeps the OSD
//! map current in the background. Each thread that does I/O takes an [`Io`] from it:
//! an `Io` maps every object to its PG, the PG's primary OSD and the core owning the PG,
//! keeps one session per OSD core, and has many ops in flight at once.
//!
//! Two ways to use an `Io`:
//! * **asynchronous, completion based**: [`Io::submit`] queues an op and returns its
//!   transaction id; [`Io::poll`] drives the network and hands back [`Completion`]s;
//! * **blocking**: [`Io::write_full`], [`Io::read`], [`Io::stat`], [`Io::remove`],
//!   [`Io::list`], [`Io::set_xattr`], [`Io::get_xattr`] submit and wait for one op.
//!
//! What it survives: a lost connection (the session resends what the OSD did not get,
//! exactly once), a map change or a redirect (the op is resent to the new primary, with
//! the same request id so a write is applied once), an OSD restart (the OSD remembers
//! request ids in its PG log). Every op has a deadline ([`Options::op_timeout`]).
//!
//! **Authentication.** With `auth = "cephx"` (the default) the client logs in to the
//! monitors as its entity ([`Options::name`], else the configuration's `name`, else
//! `client.admin`) with the key from its keyring ([`Options::keyring`], else the
//! configuration's) and presents the OSD service ticket on every OSD connection. It
//! renews the ticket halfway through its lifetime and moves its connections to the new
//! one (a reconnect: the sessions resend what was in flight, so no op fails); an OSD
//! that finds a ticket expired answers "unauthenticated" and the op is resent once the
//! renewed ticket is in use. Ops the ticket's caps do not allow fail with
//! [`Error::PermissionDenied`] naming the missing cap. Caps changed with `sluice auth
//! caps` apply from the next renewal: within half a ticket lifetime
//! (`auth_service_ticket_ttl`, one hour by default).
//!
//! ```no_run
//! use sluice_client::{Cluster, Options, Op, Output};
//! # fn main() -> Result<(), sluice_client::Error> {
//! let cluster = Cluster::connect_file("sluice.conf".as_ref(), Options::default())?;
//! let mut io = cluster.io();
//! // Blocking:
//! io.write_full("data", "greeting", b"hello".to_vec())?;
//! assert_eq!(io.read_all("data", "greeting")?, b"hello");
//! // Asynchronous: 32 writes in flight, then their completions.
//! let payload: std::sync::Arc<[u8]> = vec![7u8; 4096].into();
//! for i in 0..32 {
//!     io.submit("data", &format!("obj-{i}"), Op::WriteFull(payload.clone()))?;
//! }
//! let mut done = Vec::new();
//! while io.in_flight() > 0 {
//!     io.poll(std::time::Duration::from_secs(1), &mut done);
//! }
//! assert!(done.iter().all(|c| matches!(c.result, Ok(Output::Written { .. }))));
//! # Ok(())
//! # }
//! ```
//!
//! Threads: a `Cluster` is shared (clone it freely); an `Io` belongs to one thread.

#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use sluice_auth::kdc::ServiceTicket;
use sluice_auth::{EntityName, Service};
use sluice_control::api::{self, MapUpdate};
use sluice_control::client::MonClient;
use sluice_control::conf::Conf;
use sluice_control::maps::envelope::{self, Kind};
use sluice_control::maps::placement::{self, PgId, PrimaryCache};
use sluice_control::maps::{OsdId, OsdMap, PoolId};
use sluice_net::frame::Limits;
use sluice_net::ops::{self, Body, Reply, Request, Status};
use sluice_net::session::Event;
use sluice_net::tcp::ClientConn;

/// What can go wrong, typed so callers can act on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("no such object")]
    NotFound,
    /// No such pool in the client's (or the OSD's) map; says which.
    #[error("no pool {0}")]
    NoSuchPool(String),
    #[error("the OSD is out of space")]
    NoSpace,
    #[error("too large: {0}")]
    TooLarge(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("OSD device error: {0}")]
    Io(String),
    /// The op did not finish in time; `waiting` says what it was last waiting for.
    #[error("{op} of {object:?} timed out after {after:?} ({waiting})")]
    Timeout { op: &'static str, object: String, after: Duration, waiting: String },
    #[error("monitors: {0}")]
    Monitors(String),
    /// The monitors refused this client's key (wrong key, unknown entity).
    #[error("authentication failed: {0}")]
    Unauthenticated(String),
    /// The ticket's caps do not allow the op; the message names the cap it needs.
    #[error("{0}")]
    PermissionDenied(String),
    #[error("configuration: {0}")]
    Config(String),
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long an op may take, resends included, before it fails with `Timeout`.
    pub op_timeout: Duration,
    /// How long [`Cluster::connect`] waits for the first map.
    pub connect_timeout: Duration,
    /// Who this client is (default: the configuration's `name`, else `client.admin`).
    pub name: Option<String>,
    /// Its keyring (default: the configuration's).
    pub keyring: Option<std::path::PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            op_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(30),
            name: None,
            keyring: None,
        }
    }
}

/// The OSD ticket every connection presents, and its generation (bumped by renewals).
#[derive(Debug, Default)]
struct TicketSlot {
    ticket: Option<ServiceTicket>,
    generation: u64,
}

/// The map, shared between the follower thread and the `Io`s.
#[derive(Debug)]
struct Shared {
    map: Mutex<Arc<OsdMap>>,
    epoch: AtomicU64,
    changed: Condvar,
    stop: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// With authentication on.
    auth: Option<AuthShared>,
}

#[derive(Debug)]
struct AuthShared {
    entity: EntityName,
    slot: Mutex<TicketSlot>,
    generation: AtomicU64,
    /// An OSD said our ticket expired: renew now.
    renew_now: AtomicBool,
    /// A login failed for good (wrong key, unknown entity): why.
    refused: Mutex<Option<String>>,
}

/// A connection to a cluster: the monitors and the current OSD map.
#[derive(Debug, Clone)]
pub struct Cluster {
    shared: Arc<Shared>,
    opts: Options,
    fsid: [u8; 16],
    _stop: Arc<StopOnDrop>,
}

#[derive(Debug)]
struct StopOnDrop(Arc<Shared>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::Release);
    }
}

impl Cluster {
    /// Reads the configuration file (`sluice.conf`) and connects.
    pub fn connect_file(path: &Path, opts: Options) -> Result<Cluster, Error> {
        let conf = Conf::load(path).map_err(|e| Error::Config(e.to_string()))?;
        Cluster::connect(&conf, opts)
    }

    /// Connects to the monitors of `conf` and waits for the first OSD map (and, with
    /// authentication on, the first ticket).
    pub fn connect(conf: &Conf, opts: Options) -> Result<Cluster, Error> {
        let creds = match conf.auth {
            sluice_control::conf::Auth::None => None,
            sluice_control::conf::Auth::Cephx => {
                let name = opts
                    .name
                    .clone()
                    .or_else(|| conf.name.clone())
                    .unwrap_or_else(|| "client.admin".into());
                let entity: EntityName =
                    name.parse().map_err(|e| Error::Config(format!("name {name:?}: {e}")))?;
                let path = opts.keyring.clone().unwrap_or_else(|| conf.keyring_path());
                let key = sluice_auth::keyring::Keyring::load_key(&path, &entity)
                    .map_err(|e| Error::Config(e.to_string()))?;
                Some((entity, key))
            }
        };
        let shared = Arc::new(Shared {
            map: Mutex::new(Arc::new(OsdMap::new(conf.fsid))),
            epoch: AtomicU64::new(0),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            last_error: Mutex::new(None),
            auth: creds.as_ref().map(|(entity, _)| AuthShared {
                entity: entity.clone(),
                slot: Mutex::new(TicketSlot::default()),
                generation: AtomicU64::new(0),
                renew_now: AtomicBool::new(false),
                refused: Mutex::new(None),
            }),
        });
        let id: u64 = rand::random();
        let mon = MonClient::from_conf(conf, id);
        let follower = Arc::clone(&shared);
        let fsid = conf.fsid;
        std::thread::Builder::new()
            .name("sluice-client-maps".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        *follower.last_error.lock().expect("poisoned") = Some(e.to_string());
                        return;
                    }
                };
                if let Some((_, key)) = creds {
                    rt.spawn(keep_ticket(mon.clone(), key, Arc::clone(&follower)));
                }
                rt.block_on(follow_maps(mon, fsid, follower));
            })
            .map_err(|e| Error::Config(format!("cannot start the map thread: {e}")))?;
        let c = Cluster { _stop: Arc::new(StopOnDrop(Arc::clone(&shared))), shared, opts, fsid };
        if let Some(a) = &c.shared.auth {
            let end = Instant::now() + c.opts.connect_timeout;
            while a.generation.load(Ordering::Acquire) == 0 {
                if let Some(why) = a.refused.lock().expect("poisoned").clone() {
                    return Err(Error::Unauthenticated(why));
                }
                if Instant::now() >= end {
                    let why = c.shared.last_error.lock().expect("poisoned").clone();
                    return Err(Error::Monitors(format!(
                        "no ticket for {} within {:?}: {}",
                        a.entity,
                        c.opts.connect_timeout,
                        why.unwrap_or_else(|| "no answer".into())
                    )));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if !c.wait_for_epoch(1, c.opts.connect_timeout) {
            let why = c.shared.last_error.lock().expect("poisoned").clone();
            return Err(Error::Monitors(format!(
                "no OSD map within {:?}: {}",
                c.opts.connect_timeout,
                why.unwrap_or_else(|| "no answer".into())
            )));
        }
        Ok(c)
    }

    pub fn fsid(&self) -> [u8; 16] {
        self.fsid
    }

    /// The newest map this client has.
    pub fn map(&self) -> Arc<OsdMap> {
        Arc::clone(&self.shared.map.lock().expect("poisoned"))
    }

    pub fn epoch(&self) -> u64 {
        self.shared.epoch.load(Ordering::Acquire)
    }

    /// Waits until the map reaches `epoch`; false on timeout.
    pub fn wait_for_epoch(&self, epoch: u64, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        let mut g = self.shared.map.lock().expect("poisoned");
        while self.shared.epoch.load(Ordering::Acquire) < epoch {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            g = self.shared.changed.wait_timeout(g, left).expect("poisoned").0;
        }
        true
    }

    /// Who this client is to the OSDs (`None`: authentication is off).
    pub fn entity(&self) -> Option<&EntityName> {
        self.shared.auth.as_ref().map(|a| &a.entity)
    }

    /// The OSD service ticket in use (`None`: authentication is off), for tools that
    /// speak the protocol themselves (`sluice_net::tcp::ClientConn::set_ticket`). It
    /// holds the session key: keep it in this process.
    pub fn osd_ticket(&self) -> Option<ServiceTicket> {
        self.ticket().0
    }

    /// The OSD ticket in use and its generation.
    fn ticket(&self) -> (Option<ServiceTicket>, u64) {
        match &self.shared.auth {
            None => (None, 0),
            Some(a) => {
                let s = a.slot.lock().expect("poisoned");
                (s.ticket.clone(), s.generation)
            }
        }
    }

    /// A handle for one thread's I/O.
    pub fn io(&self) -> Io {
        let (ticket, ticket_gen) = self.ticket();
        Io {
            ticket,
            ticket_gen,
            cluster: self.clone(),
            id: rand::random::<u64>() | 1,
            map: self.map(),
            conns: HashMap::new(),
            primaries: PrimaryCache::default(),
            ops: Ops { authenticating: self.shared.auth.is_some(), ..Ops::default() },
            next_tid: 0,
            scratch: Vec::new(),
            expired: Vec::new(),
            held: Vec::new(),
        }
    }
}

/// Logs in and keeps the OSD ticket fresh until the cluster handle is dropped: renews
/// halfway through its lifetime (or at once when an OSD found it expired). A refusal of
/// the key itself is recorded for [`Cluster::connect`] and retried slowly (the operator
/// may fix the key database); other errors are retried soon.
async fn keep_ticket(mon: MonClient, key: sluice_auth::Secret, shared: Arc<Shared>) {
    let a = shared.auth.as_ref().expect("started with authentication on");
    let mut creds: Option<sluice_auth::kdc::Credentials> = None;
    // Forced renewals (an OSD refused the ticket) at most this often.
    const FORCED_EVERY: Duration = Duration::from_secs(5);
    let mut last_login = Instant::now();
    while !shared.stop.load(Ordering::Acquire) {
        let now = sluice_auth::wall_ms();
        let forced = a.renew_now.load(Ordering::Acquire) && last_login.elapsed() >= FORCED_EVERY;
        let due = creds.as_ref().is_none_or(|c| c.renewal_due(now)) || forced;
        if !due {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        a.renew_now.store(false, Ordering::Release);
        last_login = Instant::now();
        let old = creds.as_ref().map(|c| c.auth_ticket.clone());
        match mon.login(&a.entity, &key, old, &[Service::Osd]).await {
            Ok(c) => match c.ticket(Service::Osd) {
                Ok(t) => {
                    let mut slot = a.slot.lock().expect("poisoned");
                    slot.ticket = Some(t.clone());
                    slot.generation += 1;
                    a.generation.store(slot.generation, Ordering::Release);
                    drop(slot);
                    tracing::debug!("{}: OSD ticket renewed", a.entity);
                    // The map subscription is signed with it.
                    mon.set_credentials(Some(c.clone()));
                    creds = Some(c);
                }
                Err(e) => {
                    *a.refused.lock().expect("poisoned") = Some(e.to_string());
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
            Err(sluice_control::client::ClientError::Unauthenticated(why)) => {
                *a.refused.lock().expect("poisoned") = Some(format!("{}: {why}", a.entity));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                *shared.last_error.lock().expect("poisoned") = Some(format!("login: {e}"));
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
}

/// Follows the monitors' map subscription until the cluster handle is dropped.
async fn follow_maps(mon: MonClient, fsid: [u8; 16], shared: Arc<Shared>) {
    mon.start_background_check();
    let mut map = OsdMap::new(fsid);
    // 0 until the first answer: epoch 1 is the empty map every cluster starts from.
    let mut have = 0;
    while !shared.stop.load(Ordering::Acquire) {
        let wait = if have == 0 { 0 } else { 5000 };
        let path = format!("/v1/subscribe?have={have}&wait_ms={wait}");
        let bytes = match mon.get_bytes(&path, Duration::from_secs(10)).await {
            Ok(b) => b,
            Err(e) => {
                *shared.last_error.lock().expect("poisoned") = Some(e.to_string());
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
        };
        let u = match envelope::open::<MapUpdate>(Kind::MapUpdate, api::MAP_UPDATE_VERSION, &bytes)
        {
            Ok(u) => u,
            Err(e) => {
                *shared.last_error.lock().expect("poisoned") = Some(format!("map update: {e}"));
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(e) = api::apply_map_update(&mut map, fsid, &u) {
            *shared.last_error.lock().expect("poisoned") = Some(format!("map update: {e}"));
            have = 0;
            continue;
        }
        if map.epoch > have {
            have = map.epoch;
            *shared.map.lock().expect("poisoned") = Arc::new(map.clone());
            shared.epoch.store(map.epoch, Ordering::Release);
            shared.changed.notify_all();
        }
    }
}

/// An object operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Replace the whole object.
    WriteFull(Arc<[u8]>),
    /// Write at an offset (extends the object; a gap reads as zeroes).
    Write {
        offset: u64,
        data: Arc<[u8]>,
    },
    /// Bytes `offset..offset+len` (len 0: to the end, at most `ops::MAX_READ_BYTES`).
    Read {
        offset: u64,
        len: u64,
    },
    Stat,
    Delete,
    SetXattr {
        key: String,
        value: Vec<u8>,
    },
    GetXattr {
        key: String,
    },
    /// One page of the names of one PG (the object name is ignored).
    List {
        pg: u32,
        after: Option<String>,
        max: u32,
    },
}

impl Op {
    fn name(&self) -> &'static str {
        self.wire().name()
    }

    fn wire(&self) -> ops::Op<'_> {
        match self {
            Op::WriteFull(d) => ops::Op::WriteFull { data: d },
            Op::Write { offset, data } => ops::Op::Write { offset: *offset, data },
            Op::Read { offset, len } => ops::Op::Read { offset: *offset, len: *len },
            Op::Stat => ops::Op::Stat,
            Op::Delete => ops::Op::Delete,
            Op::SetXattr { key, value } => ops::Op::SetXattr { key, value },
            Op::GetXattr { key } => ops::Op::GetXattr { key },
            Op::List { after, max, .. } => ops::Op::List { after: after.as_deref(), max: *max },
        }
    }
}

/// Where a listing continues: (PG, the last name returned in it).
pub type ListCursor = (u32, Option<String>);

/// What a successful op returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A write, delete or setxattr is durable, at this PG version.
    Written {
        version: u64,
    },
    Data(Vec<u8>),
    Stat {
        size: u64,
        version: u64,
    },
    List {
        names: Vec<String>,
        next: Option<String>,
    },
}

/// A finished op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub tid: u64,
    pub result: Result<Output, Error>,
}

/// Where an op goes: an OSD's core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Target {
    osd: OsdId,
    addr: SocketAddr,
}

#[derive(Debug)]
struct InFlight {
    pool: PoolId,
    object: String,
    op: Op,
    deadline: Instant,
    started: Instant,
    /// Where it was last sent (None: not sent, waiting for a route).
    target: Option<Target>,
    /// Sent at least once (resends carry the RESENT flag).
    sent: bool,
    /// Hold until the map reaches this epoch (after a redirect).
    wait_epoch: u64,
    /// Hold until then (after an `Again`).
    not_before: Option<Instant>,
    /// Why it is not done yet, for a timeout's message.
    waiting: String,
}

#[derive(Debug)]
struct Conn {
    conn: ClientConn,
    next_connect: Instant,
    /// Why the last connect or connection failed (reported by timeouts of its ops).
    last_error: Option<String>,
}

/// One thread's I/O to the cluster. See the crate documentation.
#[derive(Debug)]
pub struct Io {
    cluster: Cluster,
    /// The OSD ticket this thread's connections present, and its generation.
    ticket: Option<ServiceTicket>,
    ticket_gen: u64,
    /// This client's id: the session cookie and half of every request id.
    id: u64,
    map: Arc<OsdMap>,
    conns: HashMap<SocketAddr, Conn>,
    primaries: PrimaryCache,
    ops: Ops,
    next_tid: u64,
    scratch: Vec<u8>,
    /// Reused per pass: ops timed out, ops held for a route.
    expired: Vec<u64>,
    held: Vec<u64>,
}

/// Ops in flight and finished ones not yet handed out.
#[derive(Debug, Default)]
struct Ops {
    inflight: HashMap<u64, InFlight>,
    done: VecDeque<Completion>,
    /// An OSD said our ticket is no good (or refused a connection): renew it.
    ticket_refused: bool,
    /// This client presents tickets (authentication on).
    authenticating: bool,
}

impl Ops {
    fn complete(&mut self, tid: u64, result: Result<Output, Error>) {
        if self.inflight.remove(&tid).is_some() {
            self.done.push_back(Completion { tid, result });
        }
    }

    /// Handles a reply at map epoch `epoch`.
    fn on_reply(&mut self, r: Reply<'_>, epoch: u64) {
        let Some(f) = self.inflight.get_mut(&r.tid) else {
            return; // a reply to an op already finished (a resend's twin)
        };
        match r.status {
            Status::Ok => {
                let out = match (&f.op, r.body) {
                    (Op::Read { .. } | Op::GetXattr { .. }, Body::Data(d)) => {
                        Output::Data(d.to_vec())
                    }
                    (Op::Stat, Body::Stat { size }) => Output::Stat { size, version: r.version },
                    (Op::List { .. }, Body::List { names, next }) => Output::List {
                        names: names.into_iter().map(str::to_string).collect(),
                        next: next.map(str::to_string),
                    },
                    (_, Body::None) => Output::Written { version: r.version },
                    (op, b) => {
                        let m = format!("{} answered with {b:?}", op.name());
                        return self.complete(r.tid, Err(Error::Invalid(m)));
                    }
                };
                self.complete(r.tid, Ok(out));
            }
            Status::Redirect => {
                // The OSD had epoch r.epoch: resend once we have a newer map than the
                // one that sent us there.
                f.wait_epoch = r.epoch.max(epoch + 1);
                f.target = None;
                f.waiting = format!("a map newer than epoch {}: {}", f.wait_epoch - 1, r.message);
            }
            Status::Again => {
                f.not_before = Some(Instant::now() + Duration::from_millis(100));
                f.target = None;
                f.waiting = format!("the OSD asked to retry: {}", r.message);
            }
            Status::Unauthenticated if !self.authenticating => {
                let m = format!("{} (this client runs with auth = \"none\")", r.message);
                self.complete(r.tid, Err(Error::Unauthenticated(m)));
            }
            Status::Unauthenticated => {
                // Resent once the renewed ticket is in use (or when the op times out).
                self.ticket_refused = true;
                f.not_before = Some(Instant::now() + Duration::from_millis(100));
                f.target = None;
                f.waiting = format!("a renewed ticket: {}", r.message);
            }
            s => {
                let e = error_of(s, r.message);
                self.complete(r.tid, Err(e));
            }
        }
    }
}

fn unexpected(o: Output) -> Error {
    Error::Invalid(format!("unexpected answer {o:?}"))
}

fn error_of(status: Status, message: &str) -> Error {
    match status {
        Status::NotFound => Error::NotFound,
        Status::NoSpace => Error::NoSpace,
        Status::TooLarge => Error::TooLarge(message.into()),
        Status::Corrupt => Error::Corrupt(message.into()),
        Status::Io => Error::Io(message.into()),
        Status::NoPool => Error::NoSuchPool(format!("on the OSD ({message})")),
        Status::PermissionDenied => Error::PermissionDenied(message.into()),
        Status::Unauthenticated => Error::Unauthenticated(message.into()),
        _ => Error::Invalid(message.into()),
    }
}

impl Io {
    /// This client's id (half of every request id).
    pub fn client_id(&self) -> u64 {
        self.id
    }

    pub fn in_flight(&self) -> usize {
        self.ops.inflight.len()
    }

    pub fn map(&self) -> &OsdMap {
        &self.map
    }

    /// The pool named `name` in the current map.
    pub fn pool(&mut self, name: &str) -> Result<PoolId, Error> {
        if let Some(p) = self.map.pool_by_name(name) {
            return Ok(p.id);
        }
        // Created a moment ago? Take the newest map before saying no.
        self.take_map();
        self.map.pool_by_name(name).map(|p| p.id).ok_or_else(|| {
            Error::NoSuchPool(format!("named {name:?} at map epoch {}", self.map.epoch))
        })
    }

    /// Queues an op on object `object` of pool `pool`; its result comes from
    /// [`Io::poll`] as a [`Completion`] with the returned id.
    pub fn submit(&mut self, pool: &str, object: &str, op: Op) -> Result<u64, Error> {
        let pool = self.pool(pool)?;
        self.submit_to(pool, object, op)
    }

    /// [`Io::submit`] by pool id.
    pub fn submit_to(&mut self, pool: PoolId, object: &str, op: Op) -> Result<u64, Error> {
        if object.len() > ops::MAX_NAME_BYTES {
            return Err(Error::Invalid(format!(
                "object name of {} bytes (at most {})",
                object.len(),
                ops::MAX_NAME_BYTES
            )));
        }
        if !matches!(op, Op::List { .. }) && object.is_empty() {
            return Err(Error::Invalid("empty object name".into()));
        }
        if let Op::WriteFull(d) | Op::Write { data: d, .. } = &op
            && d.len() > ops::MAX_WRITE_BYTES
        {
            return Err(Error::TooLarge(format!(
                "a write of {} bytes (at most {} per op)",
                d.len(),
                ops::MAX_WRITE_BYTES
            )));
        }
        self.next_tid += 1;
        let tid = self.next_tid;
        let now = Instant::now();
        self.ops.inflight.insert(
            tid,
            InFlight {
                pool,
                object: object.to_string(),
                op,
                deadline: now + self.cluster.opts.op_timeout,
                started: now,
                target: None,
                sent: false,
                wait_epoch: 0,
                not_before: None,
                waiting: "a route".into(),
            },
        );
        self.route(tid);
        Ok(tid)
    }

    /// Takes the newest map; ops whose primary moved are resent. Returns whether the
    /// map changed.
    fn take_map(&mut self) -> bool {
        if self.cluster.epoch() <= self.map.epoch {
            return false;
        }
        self.map = self.cluster.map();
        // Sessions to addresses no OSD has any more are dropped (with what they hold:
        // those ops are rerouted below).
        let live: std::collections::HashSet<SocketAddr> = self
            .map
            .osds
            .values()
            .filter_map(|o| o.addrs.as_ref())
            .flat_map(|a| a.core_ports.iter().map(|p| SocketAddr::new(a.public.ip(), *p)))
            .collect();
        self.conns.retain(|a, _| live.contains(a));
        let mut tids = std::mem::take(&mut self.held);
        tids.clear();
        tids.extend(self.ops.inflight.keys().copied());
        for &tid in &tids {
            self.route(tid);
        }
        self.held = tids;
        true
    }

    /// Where an op should go under the current map: its PG and, when the PG has an up
    /// primary with an address, that primary's core. `Err` ends the op.
    fn target_of(&mut self, f: &mut InFlight) -> Result<(PgId, Option<Target>), Error> {
        let Some(pool) = self.map.pools.get(&f.pool) else {
            let e = format!("with id {} at map epoch {} (deleted?)", f.pool.0, self.map.epoch);
            return Err(Error::NoSuchPool(e));
        };
        let pg = match &f.op {
            Op::List { pg, .. } => {
                if *pg >= pool.pg_num {
                    return Err(Error::Invalid(format!("PG {pg} of {} PGs", pool.pg_num)));
                }
                PgId { pool: pool.id, pg: *pg }
            }
            _ => placement::object_pg(pool, &f.object),
        };
        let Some(primary) = self.primaries.primary(&self.map, pool, pg) else {
            f.waiting = format!("an up primary for PG {pg} (none at map epoch {})", self.map.epoch);
            return Ok((pg, None));
        };
        let Some(addrs) = self.map.osd(primary).and_then(|o| o.addrs.as_ref()) else {
            f.waiting = format!("an address for {primary}, primary of PG {pg}");
            return Ok((pg, None));
        };
        if addrs.core_ports.is_empty() {
            f.waiting = format!("the ports of {primary}, primary of PG {pg}");
            return Ok((pg, None));
        }
        let port = addrs.core_ports[placement::pg_core(pg, addrs.core_ports.len())];
        let addr = SocketAddr::new(addrs.public.ip(), port);
        Ok((pg, Some(Target { osd: primary, addr })))
    }

    /// Sends (or resends) op `tid` if it is due and its target changed or it was never
    /// sent.
    fn route(&mut self, tid: u64) {
        // Out of the table while routing (target_of borrows the rest of self).
        let Some(mut f) = self.ops.inflight.remove(&tid) else { return };
        if f.wait_epoch > self.map.epoch || f.not_before.is_some_and(|t| Instant::now() < t) {
            self.ops.inflight.insert(tid, f);
            return;
        }
        let (pg, target) = match self.target_of(&mut f) {
            Ok(t) => t,
            Err(e) => {
                self.ops.done.push_back(Completion { tid, result: Err(e) });
                return;
            }
        };
        let moved = target.is_none() || f.target != target || f.wait_epoch != 0;
        f.target = target;
        f.wait_epoch = 0;
        let (Some(t), true) = (target, moved) else {
            self.ops.inflight.insert(tid, f);
            return;
        };
        let list = matches!(f.op, Op::List { .. });
        let req = Request {
            client: self.id,
            tid,
            epoch: self.map.epoch,
            flags: if f.sent { ops::flags::RESENT } else { 0 },
            pool: f.pool.0,
            pg: pg.pg,
            object: if list { "" } else { &f.object },
            op: f.op.wire(),
        };
        self.scratch.clear();
        let data = req.encode_head(&mut self.scratch);
        f.sent = true;
        f.waiting = format!("a reply from {} at {}", t.osd, t.addr);
        let id = self.id;
        let ticket = &self.ticket;
        let c = self.conns.entry(t.addr).or_insert_with(|| {
            let mut conn = ClientConn::new(t.addr, id, ops::FEATURES, Limits::DEFAULT);
            conn.set_ticket(ticket.clone());
            Conn { conn, next_connect: Instant::now(), last_error: None }
        });
        // Queued in the session while disconnected; sent when connected.
        match c.conn.send_parts(ops::MSG_REQUEST, &[&self.scratch, data]) {
            Ok(_) => {
                self.ops.inflight.insert(tid, f);
            }
            Err(e) => {
                let m = format!("{} of {:?}: {e}", f.op.name(), f.object);
                self.ops.done.push_back(Completion { tid, result: Err(Error::TooLarge(m)) });
            }
        }
    }

    /// Drives the network until at least one op completes or `timeout` passes; appends
    /// completions to `out`. Returns how many were appended.
    pub fn poll(&mut self, timeout: Duration, out: &mut Vec<Completion>) -> usize {
        let end = Instant::now() + timeout;
        loop {
            self.pass();
            if !self.ops.done.is_empty() {
                let n = self.ops.done.len();
                out.extend(self.ops.done.drain(..));
                return n;
            }
            let now = Instant::now();
            if now >= end || self.ops.inflight.is_empty() {
                return 0;
            }
            self.wait(end.min(now + Duration::from_millis(20)));
        }
    }

    /// A renewed ticket: every connection moves to it (a reconnect; the sessions resend
    /// what the OSDs did not get, so nothing in flight fails).
    fn take_ticket(&mut self) {
        if let Some(a) = &self.cluster.shared.auth {
            if std::mem::take(&mut self.ops.ticket_refused) {
                a.renew_now.store(true, Ordering::Release);
            }
            if a.generation.load(Ordering::Acquire) == self.ticket_gen {
                return;
            }
        } else {
            return;
        }
        (self.ticket, self.ticket_gen) = self.cluster.ticket();
        for c in self.conns.values_mut() {
            c.conn.set_ticket(self.ticket.clone());
            if c.conn.connected() {
                c.conn.cut();
                c.next_connect = Instant::now();
            }
        }
    }

    /// One pass: map, ticket, timeouts, held ops, connections.
    fn pass(&mut self) {
        self.take_map();
        self.take_ticket();
        let now = Instant::now();
        let (mut expired, mut held) =
            (std::mem::take(&mut self.expired), std::mem::take(&mut self.held));
        for (&tid, f) in &self.ops.inflight {
            if now >= f.deadline {
                expired.push(tid);
            } else if f.target.is_none() {
                held.push(tid);
            }
        }
        for tid in expired.drain(..) {
            let f = self.ops.inflight.remove(&tid).expect("listed");
            // Waiting on a connection that fails: say why it fails.
            let conn_error =
                f.target.and_then(|t| self.conns.get(&t.addr)).and_then(|c| c.last_error.as_ref());
            let waiting = match conn_error {
                Some(e) => format!("{}; last connection error: {e}", f.waiting),
                None => f.waiting,
            };
            let e = Error::Timeout {
                op: f.op.name(),
                object: f.object,
                after: now - f.started,
                waiting,
            };
            self.ops.done.push_back(Completion { tid, result: Err(e) });
        }
        for tid in held.drain(..) {
            self.route(tid);
        }
        (self.expired, self.held) = (expired, held);
        let Io { conns, ops, map, .. } = self;
        for (addr, c) in conns.iter_mut() {
            if !c.conn.connected() {
                // Needed while it has requests to deliver or replies to bring back (the
                // OSD's session holds replies for us across a cut).
                let needed = c.conn.session.unacked() > 0
                    || ops.inflight.values().any(|f| f.target.is_some_and(|t| t.addr == *addr));
                if !needed || now < c.next_connect {
                    continue;
                }
                if let Err(e) = c.conn.connect_timeout(Duration::from_secs(1)) {
                    c.last_error = Some(format!("connecting to {addr}: {e}"));
                    c.next_connect = now + Duration::from_millis(200);
                    continue;
                }
            }
            let r = c.conn.poll(|e| match e {
                Event::Message { msg_type, frame, .. } if msg_type == ops::MSG_REPLY => {
                    match Reply::decode(sluice_net::session::payload(&frame)) {
                        Ok(r) => ops.on_reply(r, map.epoch),
                        Err(e) => tracing::warn!("{addr}: undecodable reply: {e}"),
                    }
                }
                Event::Reset { resent } => {
                    tracing::debug!("{addr}: the OSD forgot our session; {resent} op(s) resent");
                }
                _ => {}
            });
            if let Err(e) = r {
                // Perhaps the OSD refused our ticket at the handshake (its secrets moved
                // on faster than we renewed): renew (rate-limited) before the next try.
                ops.ticket_refused |= ops.authenticating;
                tracing::debug!("connection to {addr} lost ({e}); reconnecting");
                c.last_error = Some(format!("connection to {addr}: {e}"));
                c.next_connect = now + Duration::from_millis(50);
            }
        }
    }

    /// Sleeps until a socket is ready or `until`.
    fn wait(&mut self, until: Instant) {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        // Acks held back for a request to carry them go out before we sleep.
        for c in self.conns.values_mut() {
            c.conn.flush_acks();
        }
        let mut fds = Vec::new();
        for c in self.conns.values() {
            if let Some(fd) = c.conn.fd() {
                let mut fl = PollFlags::POLLIN;
                if c.conn.wants_write() {
                    fl |= PollFlags::POLLOUT;
                }
                fds.push(PollFd::new(fd, fl));
            }
        }
        let left = until.saturating_duration_since(Instant::now());
        let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
        let _ = poll(&mut fds, PollTimeout::from(ms));
    }

    /// Breaks every connection, as a network failure would (failure injection for
    /// tests): sessions resend what the OSDs did not get.
    pub fn cut_connections(&mut self) {
        for c in self.conns.values_mut() {
            c.conn.cut();
        }
    }

    /// Submits one op and waits for it.
    pub fn call(&mut self, pool: &str, object: &str, op: Op) -> Result<Output, Error> {
        let tid = self.submit(pool, object, op)?;
        self.wait_for(tid)
    }

    /// Waits for op `tid` (other ops that finish meanwhile stay for [`Io::poll`]).
    pub fn wait_for(&mut self, tid: u64) -> Result<Output, Error> {
        loop {
            if let Some(i) = self.ops.done.iter().position(|c| c.tid == tid) {
                return self.ops.done.remove(i).expect("found").result;
            }
            if !self.ops.inflight.contains_key(&tid) {
                return Err(Error::Invalid(format!("no op {tid} in flight")));
            }
            self.pass();
            if !self.ops.done.iter().any(|c| c.tid == tid) {
                self.wait(Instant::now() + Duration::from_millis(20));
            }
        }
    }

    pub fn write_full(&mut self, pool: &str, object: &str, data: Vec<u8>) -> Result<u64, Error> {
        match self.call(pool, object, Op::WriteFull(data.into()))? {
            Output::Written { version } => Ok(version),
            o => Err(unexpected(o)),
        }
    }

    pub fn write(
        &mut self,
        pool: &str,
        object: &str,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<u64, Error> {
        match self.call(pool, object, Op::Write { offset, data: data.into() })? {
            Output::Written { version } => Ok(version),
            o => Err(unexpected(o)),
        }
    }

    /// Up to `len` bytes from `offset` (fewer at the end of the object).
    pub fn read(
        &mut self,
        pool: &str,
        object: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, Error> {
        match self.call(pool, object, Op::Read { offset, len })? {
            Output::Data(d) => Ok(d),
            o => Err(unexpected(o)),
        }
    }

    /// The whole object, however large (read in pieces of `ops::MAX_READ_BYTES`).
    pub fn read_all(&mut self, pool: &str, object: &str) -> Result<Vec<u8>, Error> {
        let mut all = Vec::new();
        loop {
            let d = self.read(pool, object, all.len() as u64, ops::MAX_READ_BYTES)?;
            let n = d.len() as u64;
            all.extend_from_slice(&d);
            if n < ops::MAX_READ_BYTES {
                return Ok(all);
            }
        }
    }

    /// (size, version).
    pub fn stat(&mut self, pool: &str, object: &str) -> Result<(u64, u64), Error> {
        match self.call(pool, object, Op::Stat)? {
            Output::Stat { size, version } => Ok((size, version)),
            o => Err(unexpected(o)),
        }
    }

    pub fn remove(&mut self, pool: &str, object: &str) -> Result<(), Error> {
        self.call(pool, object, Op::Delete).map(|_| ())
    }

    pub fn set_xattr(
        &mut self,
        pool: &str,
        object: &str,
        key: &str,
        value: Vec<u8>,
    ) -> Result<(), Error> {
        self.call(pool, object, Op::SetXattr { key: key.into(), value }).map(|_| ())
    }

    pub fn get_xattr(&mut self, pool: &str, object: &str, key: &str) -> Result<Vec<u8>, Error> {
        match self.call(pool, object, Op::GetXattr { key: key.into() })? {
            Output::Data(d) => Ok(d),
            o => Err(unexpected(o)),
        }
    }

    /// One page of a pool's object names, from `cursor` ((PG, name) where the previous
    /// page ended; `None` to start). Returns the names and the next cursor (`None`: done).
    pub fn list_page(
        &mut self,
        pool: &str,
        cursor: Option<ListCursor>,
        max: u32,
    ) -> Result<(Vec<String>, Option<ListCursor>), Error> {
        let id = self.pool(pool)?;
        let (mut pg, mut after) = cursor.unwrap_or((0, None));
        loop {
            let pg_num = self.map.pools.get(&id).map_or(0, |p| p.pg_num);
            if pg >= pg_num {
                return Ok((Vec::new(), None));
            }
            let tid = self.submit_to(id, "", Op::List { pg, after: after.clone(), max })?;
            match self.wait_for(tid)? {
                Output::List { names, next } => {
                    let cursor = match next {
                        Some(n) => Some((pg, Some(n))),
                        None if pg + 1 < pg_num => Some((pg + 1, None)),
                        None => None,
                    };
                    match cursor {
                        Some(c) if names.is_empty() => (pg, after) = c,
                        _ => return Ok((names, cursor)),
                    }
                }
                o => return Err(unexpected(o)),
            }
        }
    }

    /// Every object name of a pool (PG by PG, each in name order).
    pub fn list(&mut self, pool: &str) -> Result<Vec<String>, Error> {
        let mut all = Vec::new();
        let mut cursor = None;
        loop {
            let (names, next) = self.list_page(pool, cursor, 1000)?;
            all.extend(names);
            match next {
                Some(c) => cursor = Some(c),
                None => return Ok(all),
            }
        }
    }
}

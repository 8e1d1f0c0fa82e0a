//! The replication protocol between OSDs: a PG's primary sends each write to the other
//! members of the PG's acting set as a [`RepOp`], and each answers with a [`RepReply`]
//! once the write and its PG log entry are durable in its store.
//!
//! Peering and recovery use the same connections: the primary asks each acting member
//! for its PG info ([`PgQuery`] -> [`PgInfo`]: last version and log), pulls objects it
//! lacks from the member with the authoritative log ([`Pull`] -> [`Push`]), pushes
//! objects and log entries to members that lack them ([`Push`] -> a [`RepReply`] of type
//! [`MSG_PUSH_ACK`]).
//!
//! Read leases ([`Lease`] -> [`LeaseAck`]) bound how long a primary serves reads without
//! hearing from its PGs' members; members report the leases they granted in their
//! [`PgInfo`], so a new primary can wait them out (`osd_internals/stale_read.rst`).
//!
//! Scrub: the primary asks every acting member for a [`ScrubMap`] of a PG ([`Scrub`]):
//! each object's size and a crc32c of its xattrs, with deep scrub a crc32c of its data,
//! or why it could not be read. It compares them and repairs through recovery.
//!
//! A `RepOp` carries the PG log entry the primary assigned (the PG version, the
//! client's request id) and the client's request itself, encoded as the client sent it
//! ([`crate::ops::Request`]), so a replica applies exactly the op the primary applied,
//! in the order the primary assigned versions (a session delivers in order, exactly
//! once). Both are versioned message bodies ([`crate::message`]) and decode without
//! panicking on any input.

use sluice_vocab::codec::Dec;

use crate::message;
use crate::ops::{D, DecodeError, Status};

/// Session message types (the object protocol uses 0x01xx).
pub const MSG_REP_OP: u16 = 0x0200;
pub const MSG_REP_REPLY: u16 = 0x0201;
pub const MSG_PG_QUERY: u16 = 0x0202;
pub const MSG_PG_INFO: u16 = 0x0203;
pub const MSG_PULL: u16 = 0x0204;
pub const MSG_PUSH: u16 = 0x0205;
pub const MSG_PUSH_ACK: u16 = 0x0206;
pub const MSG_LEASE: u16 = 0x0207;
pub const MSG_LEASE_ACK: u16 = 0x0208;
pub const MSG_SCRUB: u16 = 0x0209;
pub const MSG_SCRUB_MAP: u16 = 0x020a;

/// Most PG log entries one [`PgInfo`] or [`Push`] carries.
pub const MAX_ENTRIES: usize = 65_536;
/// Most xattrs one pushed object carries.
pub const MAX_XATTRS: usize = 4096;
/// Most PGs one [`Lease`] or [`LeaseAck`] names.
pub const MAX_LEASE_PGS: usize = 65_536;
/// Most objects one [`ScrubMap`] describes (a PG with more is not scrubbed).
pub const MAX_SCRUB_OBJECTS: usize = 262_144;
/// Most object bytes one push carries.
pub const PUSH_CHUNK_BYTES: usize = 4 << 20;

/// Format version of both messages.
pub const VERSION: u16 = 1;

/// Longest message a replica's reply carries.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// A write for a replica to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepOp<'a> {
    /// The primary's map epoch when it assigned the version.
    pub epoch: u64,
    pub pool: u32,
    pub pg: u32,
    /// The PG version the primary assigned this write (its PG log key).
    pub version: u64,
    /// Trim the PG log up to this version in the same transaction (0: none).
    pub trim_upto: u64,
    /// The client's request, as the client encoded it.
    pub request: &'a [u8],
}

impl<'a> RepOp<'a> {
    /// Appends everything but the request bytes, which come last and are returned as
    /// the tail to send right after (so a large write is copied once, into the session).
    pub fn encode_head(&self, out: &mut Vec<u8>) -> &'a [u8] {
        let m = message::begin(out, VERSION, 1);
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.pool.to_le_bytes());
        out.extend_from_slice(&self.pg.to_le_bytes());
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.trim_upto.to_le_bytes());
        let n = u32::try_from(self.request.len()).expect("bounded by frame limits");
        out.extend_from_slice(&n.to_le_bytes());
        message::finish_with(out, m, self.request.len());
        self.request
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        let tail = self.encode_head(out);
        out.extend_from_slice(tail);
    }

    pub fn decode(buf: &'a [u8]) -> Result<RepOp<'a>, DecodeError> {
        let body = message::open(buf, VERSION)?.body;
        let mut d = Dec::new(body);
        let t = |_| DecodeError::Truncated("replicated op");
        let epoch = d.u64().map_err(t)?;
        let pool = d.u32().map_err(t)?;
        let pg = d.u32().map_err(t)?;
        let version = d.u64().map_err(t)?;
        let trim_upto = d.u64().map_err(t)?;
        let n = d.u32().map_err(t)? as usize;
        let request = d.take(n).map_err(t)?;
        if version == 0 {
            return Err(DecodeError::Unknown { what: "PG version", code: 0 });
        }
        Ok(RepOp { epoch, pool, pg, version, trim_upto, request })
    }
}

/// A replica's answer to a [`RepOp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepReply<'a> {
    pub pool: u32,
    pub pg: u32,
    pub version: u64,
    pub status: Status,
    /// Why it failed (empty when it did not).
    pub message: &'a str,
}

impl<'a> RepReply<'a> {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let m = message::begin(out, VERSION, 1);
        out.extend_from_slice(&self.pool.to_le_bytes());
        out.extend_from_slice(&self.pg.to_le_bytes());
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.status as u16).to_le_bytes());
        let msg = truncated(self.message, MAX_MESSAGE_BYTES);
        out.extend_from_slice(&(msg.len() as u32).to_le_bytes());
        out.extend_from_slice(msg.as_bytes());
        message::finish(out, m);
    }

    pub fn decode(buf: &'a [u8]) -> Result<RepReply<'a>, DecodeError> {
        let body = message::open(buf, VERSION)?.body;
        let mut d = Dec::new(body);
        let t = |_| DecodeError::Truncated("replica reply");
        let pool = d.u32().map_err(t)?;
        let pg = d.u32().map_err(t)?;
        let version = d.u64().map_err(t)?;
        let code = d.u16().map_err(t)?;
        let status = Status::from_u16(code)
            .ok_or(DecodeError::Unknown { what: "status", code: u32::from(code) })?;
        let n = d.u32().map_err(t)? as usize;
        if n > MAX_MESSAGE_BYTES {
            return Err(DecodeError::TooLong {
                what: "replica message",
                len: n,
                max: MAX_MESSAGE_BYTES,
            });
        }
        let b = d.take(n).map_err(t)?;
        let message =
            std::str::from_utf8(b).map_err(|_| DecodeError::NotUtf8("replica message"))?;
        Ok(RepReply { pool, pg, version, status, message })
    }
}

/// A primary's question to an acting member: its last version and log of a PG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgQuery {
    /// The map epoch of the interval the primary peers for.
    pub epoch: u64,
    pub pool: u32,
    pub pg: u32,
}

/// A member's answer to a [`PgQuery`]: its PG log (entries as the OSD encodes them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgInfo<'a> {
    /// The query's epoch.
    pub epoch: u64,
    pub pool: u32,
    pub pg: u32,
    pub last_version: u64,
    pub entries: Vec<(u64, &'a [u8])>,
    /// The read lease this member granted last for the PG: how long it has left when
    /// the answer is sent (0: none left), and the primary that holds it (OSD id and the
    /// epoch it booted at; `None`: more than one primary may).
    pub lease_remaining_us: u64,
    pub lease_by: Option<(u32, u64)>,
}

/// A primary's read lease for PGs it leads, sent to the core of a member that owns
/// them: "I serve reads of these PGs for at most `duration_us` from when I sent this".
/// A member grants it (answers with the PG in its [`LeaseAck`]) unless it peered for a
/// newer interval than `epoch`, and from then on holds an upper bound of the primary's
/// lease: the time it received it plus `duration_us`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The primary's map epoch.
    pub epoch: u64,
    /// The primary: its OSD id and the epoch it booted at.
    pub from: u32,
    pub from_up_from: u64,
    /// The primary's renewal round (echoed in the ack).
    pub round: u64,
    pub duration_us: u64,
    /// (pool, pg) pairs.
    pub pgs: Vec<(u32, u32)>,
}

/// A primary's request for a member's [`ScrubMap`] of a PG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scrub {
    pub epoch: u64,
    pub pool: u32,
    pub pg: u32,
    /// The primary's scrub (echoed in the map).
    pub id: u64,
    /// Read every object's data and checksum it (else metadata only).
    pub deep: bool,
}

/// One object in a [`ScrubMap`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrubObject<'a> {
    pub name: &'a str,
    pub size: u64,
    /// crc32c of the xattrs (names and values, in name order, each with its length).
    pub xattrs_crc: u32,
    /// crc32c of the data (deep scrub only).
    pub data_crc: Option<u32>,
    /// Why the object could not be read (then the checksums mean nothing).
    pub error: Option<&'a str>,
}

/// A member's description of every object of a PG, in name order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScrubMap<'a> {
    pub epoch: u64,
    pub pool: u32,
    pub pg: u32,
    pub id: u64,
    /// The member's PG version when it listed the objects.
    pub version: u64,
    /// Why no map could be made (then `objects` is empty).
    pub error: Option<&'a str>,
    pub objects: Vec<ScrubObject<'a>>,
}

/// A member's answer to a [`Lease`]: the PGs it granted the lease for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseAck {
    pub round: u64,
    pub pgs: Vec<(u32, u32)>,
}

/// A primary's request for an object's state, answered with a [`Push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pull<'a> {
    pub epoch: u64,
    pub pool: u32,
    pub pg: u32,
    pub object: &'a str,
}

/// An object's whole state, as recovery copies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectState<'a> {
    pub name: &'a str,
    /// False: the object must not exist.
    pub exists: bool,
    /// The object's size; `data` is its bytes from `offset` (an object larger than
    /// [`PUSH_CHUNK_BYTES`] travels in several pushes, in order; the first, at offset 0,
    /// replaces the object and carries the xattrs).
    pub size: u64,
    pub offset: u64,
    pub data: &'a [u8],
    pub xattrs: Vec<(&'a str, &'a [u8])>,
}

impl ObjectState<'_> {
    /// The last piece of the object.
    pub fn is_last(&self) -> bool {
        !self.exists || self.offset + self.data.len() as u64 >= self.size
    }
}

/// Recovery's copy: an object's state, or (with no object) the PG log entries and the
/// last version that complete a member's recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push<'a> {
    pub epoch: u64,
    pub pool: u32,
    pub pg: u32,
    pub object: Option<ObjectState<'a>>,
    pub entries: Vec<(u64, &'a [u8])>,
    /// The last log piece of a member's recovery (a log longer than one transaction
    /// travels in pieces): the PG's version is `last_version` once it is applied, and it
    /// is acknowledged.
    pub last: bool,
    pub last_version: u64,
    /// Log entries up to and including this version go first (0: none): a backfilled
    /// member keeps nothing older than the primary's log (a trailing field; absent in
    /// pushes of earlier builds).
    pub trim_upto: u64,
    /// Its part in a backfill alongside writes (a trailing field, like `trim_upto`).
    pub backfill: BackfillStep,
}

/// A push's part in a backfill alongside writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackfillStep {
    None,
    /// The start (no object, no entries): the member drops its whole log and, until the
    /// closing log push, applies the primary's writes without logging them, so it
    /// reports version 0 and is backfilled again if the backfill is cut short.
    Begin,
    /// A piece of the closing log push (no object; `last` on the last one): refused by
    /// a member that is not being backfilled (it restarted since, so it may lack
    /// writes the primary sent it).
    Close,
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    let n = u32::try_from(b.len()).expect("bounded by frame limits");
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(b);
}

fn put_entries(out: &mut Vec<u8>, entries: &[(u64, &[u8])]) {
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (v, e) in entries {
        out.extend_from_slice(&v.to_le_bytes());
        put_bytes(out, e);
    }
}

impl<'a> D<'a> {
    fn count(&mut self, what: &'static str, max: usize) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(DecodeError::TooLong { what, len: n, max });
        }
        Ok(n)
    }
    fn opt_str(&mut self, what: &'static str) -> Result<Option<&'a str>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.str(what, MAX_MESSAGE_BYTES)?)),
            c => Err(DecodeError::Unknown { what, code: u32::from(c) }),
        }
    }
    fn pgs(&mut self) -> Result<Vec<(u32, u32)>, DecodeError> {
        let n = self.count("leased PGs", MAX_LEASE_PGS)?;
        let mut v = Vec::with_capacity(n.min(self.0.remaining() / 8));
        for _ in 0..n {
            v.push((self.u32()?, self.u32()?));
        }
        Ok(v)
    }
    fn entries(&mut self) -> Result<Vec<(u64, &'a [u8])>, DecodeError> {
        let n = self.count("PG log entries", MAX_ENTRIES)?;
        // Each entry takes at least 12 bytes: no allocation beyond what arrived.
        let mut v = Vec::with_capacity(n.min(self.0.remaining() / 12));
        for _ in 0..n {
            v.push((self.u64()?, self.bytes()?));
        }
        Ok(v)
    }
}

impl PgQuery {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let m = message::begin(out, VERSION, 1);
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.pool.to_le_bytes());
        out.extend_from_slice(&self.pg.to_le_bytes());
        message::finish(out, m);
    }

    pub fn decode(buf: &[u8]) -> Result<PgQuery, DecodeError> {
        let mut d = D(Dec::new(message::open(buf, VERSION)?.body), "PG query");
        Ok(PgQuery { epoch: d.u64()?, pool: d.u32()?, pg: d.u32()? })
    }
}

impl<'a> PgInfo<'a> {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let m = message::begin(out, VERSION, 1);
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.pool.to_le_bytes());
        out.extend_from_slice(&self.pg.to_le_bytes());
        out.extend_from_slice(&self.last_version.to_le_bytes());
        put_entries(out, &self.entries);
        out.extend_from_slice(&self.lease_remaining_us.to_le_bytes());
        match self.lease_by {
            None => out.push(0),
            Some((osd, up_from)) => {
                out.push(1);
                out.extend_from_slice(&osd.to_le_bytes());
                out.extend_from_slice(&up_from.to_le_bytes());
            }
        }
        message::finish(out, m);
    }

    pub fn decode(buf: &'a [u8]) -> Result<PgInfo<'a>, DecodeError> {
        let mut d = D(Dec::new(message::open(buf, VERSION)?.body), "PG info");
        let (epoch, pool, pg, last_version) = (d.u64()?, d.u32()?, d.u32()?, d.u64()?);
        let entries = d.entries()?;
        let lease_remaining_us = d.u64()?;
        let lease_by = match d.u8()? {
            0 => None,
            1 => Some((d.u32()?, d.u64()?)),
            c => return Err(DecodeError::Unknown { what: "lease holder", code: u32::from(c) }),
        };
        Ok(PgInfo { epoch, pool, pg, last_version, entries, lease_remaining_us, lease_by })
    }
}

fn put_pgs(out: &mut Vec<u8>, pgs: &[(u32, u32)]) {
    out.extend_from_slice(&(pgs.len() as u32).to_le_bytes());
    for (pool, pg) in pgs {
        out.extend_from_slice(&pool.to_le_bytes());
        out.extend_from_slice(&pg.to_le_bytes());
    }
}

impl Lease {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let m = message::begin(out, VERSION, 1);
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.from.to_le_bytes());
        out.extend_from_slice(&self.from_up_from.to_le_bytes());
        out.extend_from_slice(&self.round.to_le_bytes());
        out.extend_from_slice(&self.duration_us.to_le_bytes());
        put_pgs(out, &self.pgs);
        message::finish(out, m);
    }

    pub fn decode(buf: &[u8]) -> Result<Lease, DecodeError> {
        let mut d = D(Dec::new(message::open(buf, VERSION)?.body), "lease");
        Ok(Lease {
            epoch: d.u64()?,
            from: d.u32()?,
            from_up_from: d.u64()?,
            round: d.u64()?,
            duration_us: d.u64()?,
            pgs: d.pgs()?,
        })
    }
}

fn put_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_bytes(out, truncated(s, MAX_MESSAGE_BYTES).as_bytes());
        }
    }
}

impl Scrub {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let m = message::begin(out, VERSION, 1);
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.pool.to_le_bytes());
        out.extend_from_slice(&self.pg.to_le_bytes());
        out.extend_from_slice(&self.id.to_le_bytes());
        out.push(u8::from(self.deep));
        message::finish(out, m);
    }

    pub fn decode(buf: &[u8]) -> Result<Scrub, DecodeError> {
        let mut d = D(Dec::new(message::open(buf, VERSION)?.body), "scrub");
        Ok(Scrub {
            epoch: d.u64()?,
            pool: d.u32()?,
            pg: d.u32()?,
            id: d.u64()?,
            deep: d.u8()? != 0,
        })
    }
}

impl<'a> ScrubMap<'a> {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let m = message::begin(out, VERSION, 1);
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.pool.to_le_bytes());
        out.extend_from_slice(&self.pg.to_le_bytes());
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.version.to_le_bytes());
        put_opt_str(out, self.error);
        out.extend_from_slice(&(self.objects.len() as u32).to_le_bytes());
        for o in &self.objects {
            put_bytes(out, o.name.as_bytes());
            out.extend_from_slice(&o.size.to_le_bytes());
            out.extend_from_slice(&o.xattrs_crc.to_le_bytes());
            match o.data_crc {
                None => out.push(0),
                Some(c) => {
                    out.push(1);
                    out.extend_from_slice(&c.to_le_bytes());
                }
            }
            put_opt_str(out, o.error);
        }
        message::finish(out, m);
    }

    pub fn decode(buf: &'a [u8]) -> Result<ScrubMap<'a>, DecodeError> {
        let mut d = D(Dec::new(message::open(buf, VERSION)?.body), "scrub map");
        let (epoch, pool, pg, id, version) = (d.u64()?, d.u32()?, d.u32()?, d.u64()?, d.u64()?);
        let error = d.opt_str("scrub error")?;
        let n = d.count("scrubbed objects", MAX_SCRUB_OBJECTS)?;
        let mut objects = Vec::with_capacity(n.min(d.0.remaining() / 18));
        for _ in 0..n {
            let name = d.str("object name", crate::ops::MAX_NAME_BYTES)?;
            let size = d.u64()?;
            let xattrs_crc = d.u32()?;
            let data_crc = match d.u8()? {
                0 => None,
                1 => Some(d.u32()?),
                c => {
                    return Err(DecodeError::Unknown { what: "data checksum", code: u32::from(c) });
                }
            };
            let error = d.opt_str("object error")?;
            objects.push(ScrubObject { name, size, xattrs_crc, data_crc, error });
        }
        Ok(ScrubMap { epoch, pool, pg, id, version, error, objects })
    }
}

impl LeaseAck {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let m = message::begin(out, VERSION, 1);
        out.extend_from_slice(&self.round.to_le_bytes());
        put_pgs(out, &self.pgs);
        message::finish(out, m);
    }

    pub fn decode(buf: &[u8]) -> Result<LeaseAck, DecodeError> {
        let mut d = D(Dec::new(message::open(buf, VERSION)?.body), "lease ack");
        Ok(LeaseAck { round: d.u64()?, pgs: d.pgs()? })
    }
}

impl<'a> Pull<'a> {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let m = message::begin(out, VERSION, 1);
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.pool.to_le_bytes());
        out.extend_from_slice(&self.pg.to_le_bytes());
        put_bytes(out, self.object.as_bytes());
        message::finish(out, m);
    }

    pub fn decode(buf: &'a [u8]) -> Result<Pull<'a>, DecodeError> {
        let mut d = D(Dec::new(message::open(buf, VERSION)?.body), "pull");
        Ok(Pull {
            epoch: d.u64()?,
            pool: d.u32()?,
            pg: d.u32()?,
            object: d.str("object name", crate::ops::MAX_NAME_BYTES)?,
        })
    }
}

impl<'a> Push<'a> {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let m = message::begin(out, VERSION, 1);
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.pool.to_le_bytes());
        out.extend_from_slice(&self.pg.to_le_bytes());
        match &self.object {
            None => out.push(0),
            Some(o) => {
                out.push(1);
                put_bytes(out, o.name.as_bytes());
                out.push(u8::from(o.exists));
                out.extend_from_slice(&o.size.to_le_bytes());
                out.extend_from_slice(&o.offset.to_le_bytes());
                put_bytes(out, o.data);
                out.extend_from_slice(&(o.xattrs.len() as u32).to_le_bytes());
                for (k, v) in &o.xattrs {
                    put_bytes(out, k.as_bytes());
                    put_bytes(out, v);
                }
            }
        }
        put_entries(out, &self.entries);
        out.push(u8::from(self.last));
        out.extend_from_slice(&self.last_version.to_le_bytes());
        out.extend_from_slice(&self.trim_upto.to_le_bytes());
        out.push(match self.backfill {
            BackfillStep::None => 0,
            BackfillStep::Begin => 1,
            BackfillStep::Close => 2,
        });
        message::finish(out, m);
    }

    pub fn decode(buf: &'a [u8]) -> Result<Push<'a>, DecodeError> {
        use crate::ops::{
            MAX_NAME_BYTES, MAX_WRITE_BYTES, MAX_XATTR_KEY_BYTES, MAX_XATTR_VALUE_BYTES,
        };
        let mut d = D(Dec::new(message::open(buf, VERSION)?.body), "push");
        let epoch = d.u64()?;
        let pool = d.u32()?;
        let pg = d.u32()?;
        let object = match d.u8()? {
            0 => None,
            1 => {
                let name = d.str("object name", MAX_NAME_BYTES)?;
                let exists = d.u8()? != 0;
                let size = d.u64()?;
                let offset = d.u64()?;
                let data = d.bytes()?;
                if data.len() > PUSH_CHUNK_BYTES.min(MAX_WRITE_BYTES) {
                    return Err(DecodeError::TooLong {
                        what: "pushed object piece",
                        len: data.len(),
                        max: PUSH_CHUNK_BYTES,
                    });
                }
                if offset.checked_add(data.len() as u64).is_none_or(|end| end > size) {
                    return Err(DecodeError::Unknown { what: "pushed piece beyond size", code: 0 });
                }
                let n = d.count("xattrs", MAX_XATTRS)?;
                let mut xattrs = Vec::with_capacity(n.min(d.0.remaining() / 8));
                for _ in 0..n {
                    let k = d.str("xattr key", MAX_XATTR_KEY_BYTES)?;
                    let v = d.bytes()?;
                    if v.len() > MAX_XATTR_VALUE_BYTES {
                        return Err(DecodeError::TooLong {
                            what: "xattr value",
                            len: v.len(),
                            max: MAX_XATTR_VALUE_BYTES,
                        });
                    }
                    xattrs.push((k, v));
                }
                Some(ObjectState { name, exists, size, offset, data, xattrs })
            }
            c => return Err(DecodeError::Unknown { what: "push kind", code: u32::from(c) }),
        };
        let entries = d.entries()?;
        if entries.iter().any(|(v, _)| *v == 0) {
            return Err(DecodeError::Unknown { what: "PG version", code: 0 });
        }
        let last = d.u8()? != 0;
        let last_version = d.u64()?;
        let trim_upto = if d.0.remaining() >= 8 { d.u64()? } else { 0 };
        let backfill = match if d.0.remaining() >= 1 { d.u8()? } else { 0 } {
            0 => BackfillStep::None,
            1 if object.is_none() && entries.is_empty() => BackfillStep::Begin,
            2 if object.is_none() => BackfillStep::Close,
            c => return Err(DecodeError::Unknown { what: "backfill step", code: u32::from(c) }),
        };
        Ok(Push { epoch, pool, pg, object, entries, last, last_version, trim_upto, backfill })
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncated(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn rep_ops_round_trip_and_every_prefix_is_refused(
            epoch: u64, pool: u32, pg: u32, version in 1u64.., trim: u64,
            request in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let op = RepOp { epoch, pool, pg, version, trim_upto: trim, request: &request };
            let mut b = Vec::new();
            op.encode(&mut b);
            prop_assert_eq!(RepOp::decode(&b).unwrap(), op);
            for n in 0..b.len() {
                prop_assert!(RepOp::decode(&b[..n]).is_err(), "prefix {} accepted", n);
            }
            // Sent as head + tail, it is the same message.
            let mut h = Vec::new();
            let tail = op.encode_head(&mut h);
            h.extend_from_slice(tail);
            prop_assert_eq!(h, b);
        }

        #[test]
        fn rep_replies_round_trip_and_every_prefix_is_refused(
            pool: u32, pg: u32, version: u64, code in 0u16..12, message in ".{0,40}",
        ) {
            let status = Status::from_u16(code).unwrap();
            let r = RepReply { pool, pg, version, status, message: &message };
            let mut b = Vec::new();
            r.encode(&mut b);
            prop_assert_eq!(RepReply::decode(&b).unwrap(), r);
            for n in 0..b.len() {
                prop_assert!(RepReply::decode(&b[..n]).is_err(), "prefix {} accepted", n);
            }
        }

        #[test]
        fn garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = RepOp::decode(&b);
            let _ = RepReply::decode(&b);
            let _ = PgQuery::decode(&b);
            let _ = PgInfo::decode(&b);
            let _ = Pull::decode(&b);
            let _ = Push::decode(&b);
            let _ = Lease::decode(&b);
            let _ = LeaseAck::decode(&b);
            let _ = Scrub::decode(&b);
            let _ = ScrubMap::decode(&b);
        }

        #[test]
        fn peering_messages_round_trip_and_every_prefix_is_refused(
            epoch: u64, pool: u32, pg: u32, last: u64, name in "[a-z0-9/._-]{1,40}",
            exists: bool,
            data in proptest::collection::vec(any::<u8>(), 0..300),
            keys in proptest::collection::vec("[a-z]{1,8}", 0..4),
            entries in proptest::collection::vec(
                (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..30)), 0..6),
            with_object: bool,
            lease_by in proptest::option::of((any::<u32>(), any::<u64>())),
            pgs in proptest::collection::vec((any::<u32>(), any::<u32>()), 0..5),
        ) {
            let entries: Vec<(u64, &[u8])> = entries.iter().map(|(v, e)| (*v, &e[..])).collect();
            let mut all: Vec<Vec<u8>> = Vec::new();
            let q = PgQuery { epoch, pool, pg };
            q.encode(all.push_get());
            prop_assert_eq!(PgQuery::decode(all.last().unwrap()).unwrap(), q);
            let info = PgInfo {
                epoch, pool, pg, last_version: last, entries: entries.clone(),
                lease_remaining_us: last / 3, lease_by,
            };
            info.encode(all.push_get());
            prop_assert_eq!(PgInfo::decode(all.last().unwrap()).unwrap(), info);
            let pull = Pull { epoch, pool, pg, object: &name };
            pull.encode(all.push_get());
            prop_assert_eq!(Pull::decode(all.last().unwrap()).unwrap(), pull);
            let object = with_object.then(|| ObjectState {
                name: &name,
                exists,
                size: data.len() as u64 + last % 7,
                offset: last % 7,
                data: &data,
                xattrs: keys.iter().map(|k| (k.as_str(), k.as_bytes())).collect(),
            });
            let entries: Vec<(u64, &[u8])> = entries.into_iter().map(|(v, e)| (v | 1, e)).collect();
            let push = Push {
                epoch, pool, pg, object, entries, last: exists, last_version: last, trim_upto: last / 3,
                backfill: if with_object { BackfillStep::None } else if exists { BackfillStep::Close } else { BackfillStep::None },
            };
            push.encode(all.push_get());
            prop_assert_eq!(Push::decode(all.last().unwrap()).unwrap(), push);
            let lease = Lease {
                epoch, from: pool, from_up_from: last, round: epoch ^ last,
                duration_us: last / 5, pgs: pgs.clone(),
            };
            lease.encode(all.push_get());
            prop_assert_eq!(Lease::decode(all.last().unwrap()).unwrap(), lease);
            let ack = LeaseAck { round: last, pgs };
            ack.encode(all.push_get());
            prop_assert_eq!(LeaseAck::decode(all.last().unwrap()).unwrap(), ack);
            let scrub = Scrub { epoch, pool, pg, id: last, deep: exists };
            scrub.encode(all.push_get());
            prop_assert_eq!(Scrub::decode(all.last().unwrap()).unwrap(), scrub);
            let map = ScrubMap {
                epoch, pool, pg, id: last, version: epoch ^ last,
                error: with_object.then_some("no store"),
                objects: keys.iter().enumerate().map(|(i, k)| ScrubObject {
                    name: k,
                    size: (i as u64).wrapping_mul(last),
                    xattrs_crc: pg ^ i as u32,
                    data_crc: exists.then_some(pool),
                    error: (i % 2 == 1).then_some(k.as_str()),
                }).collect(),
            };
            map.encode(all.push_get());
            prop_assert_eq!(ScrubMap::decode(all.last().unwrap()).unwrap(), map);
            for (i, b) in all.iter().enumerate() {
                for n in 0..b.len() {
                    let refused = match i {
                        0 => PgQuery::decode(&b[..n]).is_err(),
                        1 => PgInfo::decode(&b[..n]).is_err(),
                        2 => Pull::decode(&b[..n]).is_err(),
                        3 => Push::decode(&b[..n]).is_err(),
                        4 => Lease::decode(&b[..n]).is_err(),
                        5 => LeaseAck::decode(&b[..n]).is_err(),
                        6 => Scrub::decode(&b[..n]).is_err(),
                        _ => ScrubMap::decode(&b[..n]).is_err(),
                    };
                    prop_assert!(refused, "message {} prefix {} accepted", i, n);
                }
            }
        }
    }

    trait PushGet {
        fn push_get(&mut self) -> &mut Vec<u8>;
    }

    impl PushGet for Vec<Vec<u8>> {
        fn push_get(&mut self) -> &mut Vec<u8> {
            self.push(Vec::new());
            self.last_mut().unwrap()
        }
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let m = "é".repeat(MAX_MESSAGE_BYTES);
        let r = RepReply { pool: 1, pg: 2, version: 3, status: Status::Io, message: &m };
        let mut b = Vec::new();
        r.encode(&mut b);
        let d = RepReply::decode(&b).unwrap();
        assert!(d.message.len() <= MAX_MESSAGE_BYTES && d.message.len() >= MAX_MESSAGE_BYTES - 1);
        assert!(m.starts_with(d.message));
    }

    #[test]
    fn a_push_of_an_earlier_build_decodes_and_a_backfill_start_carries_nothing() {
        let push = Push {
            epoch: 3,
            pool: 1,
            pg: 2,
            object: None,
            entries: Vec::new(),
            last: true,
            last_version: 0,
            trim_upto: u64::MAX,
            backfill: BackfillStep::Begin,
        };
        let mut b = Vec::new();
        push.encode(&mut b);
        assert_eq!(Push::decode(&b).unwrap(), push);
        // Without the trailing fields (9 bytes), as an earlier build sent it.
        let mut old = b[..b.len() - 9].to_vec();
        let len = (old.len() - message::HEADER_BYTES) as u32;
        old[4..8].copy_from_slice(&len.to_le_bytes());
        let d = Push::decode(&old).unwrap();
        assert_eq!((d.trim_upto, d.backfill), (0, BackfillStep::None));
        // A backfill start with log entries is refused, and so is a closing log piece
        // with an object; a closing piece with entries is fine.
        let e = [0u8; 30];
        let bad = Push { entries: vec![(5, &e[..])], ..push.clone() };
        let mut b = Vec::new();
        bad.encode(&mut b);
        assert!(Push::decode(&b).is_err());
        let close =
            Push { entries: vec![(5, &e[..])], backfill: BackfillStep::Close, ..push.clone() };
        let mut b = Vec::new();
        close.encode(&mut b);
        assert_eq!(Push::decode(&b).unwrap(), close);
        let object = ObjectState {
            name: "x",
            exists: false,
            size: 0,
            offset: 0,
            data: &[],
            xattrs: Vec::new(),
        };
        let bad = Push { object: Some(object), backfill: BackfillStep::Close, ..push };
        let mut b = Vec::new();
        bad.encode(&mut b);
        assert!(Push::decode(&b).is_err());
    }

    #[test]
    fn version_zero_is_refused() {
        let op = RepOp { epoch: 1, pool: 1, pg: 1, version: 1, trim_upto: 0, request: b"x" };
        let mut b = Vec::new();
        op.encode(&mut b);
        // The version field sits after the header, epoch, pool and pg.
        let at = message::HEADER_BYTES + 16;
        b[at..at + 8].copy_from_slice(&0u64.to_le_bytes());
        assert!(RepOp::decode(&b).is_err());
    }
}

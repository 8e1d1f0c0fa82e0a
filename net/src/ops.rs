//! The object protocol between clients and OSDs: one request message per op, one reply
//! per request, matched by the client's transaction id.
//!
//! A request names its client (`client`, chosen at random when a client starts) and its
//! `tid`: together the request id an OSD uses to apply a resent write once. It carries
//! the client's map epoch (an OSD with an older map waits for that epoch before deciding
//! anything), the pool and PG the client computed, and the object name.
//!
//! Both messages are versioned bodies ([`crate::message`]): fields are only appended,
//! so older peers read newer messages. Decoding borrows from the frame (data and names
//! are not copied) and never panics on any input.

use sluice_vocab::codec::Dec;

use crate::message::{self, MessageError};

/// Session features of the object protocol: bit 0 is this protocol, version 1.
pub const FEATURES: crate::session::Features =
    crate::session::Features { supported: 1, required: 1 };

/// Session message types.
pub const MSG_REQUEST: u16 = 0x0100;
pub const MSG_REPLY: u16 = 0x0101;

/// Format version of requests and replies.
pub const VERSION: u16 = 1;

pub use sluice_vocab::limits::{
    MAX_OBJECT_NAME_BYTES as MAX_NAME_BYTES, MAX_TXN_DATA_BYTES as MAX_WRITE_BYTES,
    MAX_XATTR_KEY_BYTES, MAX_XATTR_VALUE_BYTES,
};
/// Most bytes one read returns (a longer read returns this much; read on from there).
pub const MAX_READ_BYTES: u64 = 16 << 20;
/// Most names one list request returns.
pub const MAX_LIST: u32 = 10_000;

/// Request flags.
pub mod flags {
    /// The client sent this request before (after a map change, a redirect or a lost
    /// session); the OSD checks its request ids.
    pub const RESENT: u32 = 1;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op<'a> {
    /// Replaces the object's whole content (creates it if needed).
    WriteFull {
        data: &'a [u8],
    },
    /// Writes at `offset`, extending the object if needed (creates it if needed).
    Write {
        offset: u64,
        data: &'a [u8],
    },
    /// Bytes `offset..offset+len`, clipped to the object's size (`len` 0: to the end).
    Read {
        offset: u64,
        len: u64,
    },
    Stat,
    Delete,
    /// Object names of this PG after `after`, in name order (the request's object name
    /// is empty).
    List {
        after: Option<&'a str>,
        max: u32,
    },
    SetXattr {
        key: &'a str,
        value: &'a [u8],
    },
    GetXattr {
        key: &'a str,
    },
}

impl Op<'_> {
    pub fn code(&self) -> u8 {
        match self {
            Op::WriteFull { .. } => 1,
            Op::Write { .. } => 2,
            Op::Read { .. } => 3,
            Op::Stat => 4,
            Op::Delete => 5,
            Op::List { .. } => 6,
            Op::SetXattr { .. } => 7,
            Op::GetXattr { .. } => 8,
        }
    }

    /// Whether the op changes state (and so is logged and deduplicated).
    pub fn is_write(&self) -> bool {
        matches!(self, Op::WriteFull { .. } | Op::Write { .. } | Op::Delete | Op::SetXattr { .. })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Op::WriteFull { .. } => "write_full",
            Op::Write { .. } => "write",
            Op::Read { .. } => "read",
            Op::Stat => "stat",
            Op::Delete => "delete",
            Op::List { .. } => "list",
            Op::SetXattr { .. } => "setxattr",
            Op::GetXattr { .. } => "getxattr",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    pub client: u64,
    pub tid: u64,
    pub epoch: u64,
    pub flags: u32,
    pub pool: u32,
    pub pg: u32,
    pub object: &'a str,
    pub op: Op<'a>,
}

/// Why a request could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error(transparent)]
    Message(#[from] MessageError),
    #[error("truncated {0}")]
    Truncated(&'static str),
    #[error("unknown {what} {code}")]
    Unknown { what: &'static str, code: u32 },
    #[error("{0} is not UTF-8")]
    NotUtf8(&'static str),
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    TooLong { what: &'static str, len: usize, max: usize },
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_u32(out, u32::try_from(b.len()).expect("bounded by frame limits"));
    out.extend_from_slice(b);
}

/// A body decoder naming what it decodes in its errors (shared with `rep`).
pub(crate) struct D<'a>(pub(crate) Dec<'a>, pub(crate) &'static str);

impl<'a> D<'a> {
    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        self.0.u8().map_err(|_| DecodeError::Truncated(self.1))
    }
    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        self.0.u16().map_err(|_| DecodeError::Truncated(self.1))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        self.0.u32().map_err(|_| DecodeError::Truncated(self.1))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        self.0.u64().map_err(|_| DecodeError::Truncated(self.1))
    }
    pub(crate) fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u32()? as usize;
        self.0.take(n).map_err(|_| DecodeError::Truncated(self.1))
    }
    pub(crate) fn str(&mut self, what: &'static str, max: usize) -> Result<&'a str, DecodeError> {
        let b = self.bytes()?;
        if b.len() > max {
            return Err(DecodeError::TooLong { what, len: b.len(), max });
        }
        std::str::from_utf8(b).map_err(|_| DecodeError::NotUtf8(what))
    }
}

impl<'a> Request<'a> {
    /// Appends the encoded request to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let tail = self.encode_head(out);
        out.extend_from_slice(tail);
    }

    /// Appends the encoded request to `out` except its bulk bytes (the data of a write,
    /// the value of an xattr), which come last and are returned: sent as the next piece
    /// of the same message (`ClientConn::send_parts`), they are copied once, into the
    /// session's buffer, instead of twice.
    pub fn encode_head(&self, out: &mut Vec<u8>) -> &'a [u8] {
        let m = message::begin(out, VERSION, 1);
        put_u64(out, self.client);
        put_u64(out, self.tid);
        put_u64(out, self.epoch);
        put_u32(out, self.flags);
        put_u32(out, self.pool);
        put_u32(out, self.pg);
        put_bytes(out, self.object.as_bytes());
        out.push(self.op.code());
        let len = |b: &[u8]| u32::try_from(b.len()).expect("bounded by frame limits");
        let tail: &'a [u8] = match self.op {
            Op::WriteFull { data } => {
                put_u32(out, len(data));
                data
            }
            Op::Write { offset, data } => {
                put_u64(out, offset);
                put_u32(out, len(data));
                data
            }
            Op::Read { offset, len } => {
                put_u64(out, offset);
                put_u64(out, len);
                &[]
            }
            Op::Stat | Op::Delete => &[],
            Op::List { after, max } => {
                out.push(u8::from(after.is_some()));
                put_bytes(out, after.unwrap_or("").as_bytes());
                put_u32(out, max);
                &[]
            }
            Op::SetXattr { key, value } => {
                put_bytes(out, key.as_bytes());
                put_u32(out, len(value));
                value
            }
            Op::GetXattr { key } => {
                put_bytes(out, key.as_bytes());
                &[]
            }
        };
        message::finish_with(out, m, tail.len());
        tail
    }

    pub fn decode(buf: &'a [u8]) -> Result<Request<'a>, DecodeError> {
        let body = message::open(buf, VERSION)?.body;
        let mut d = D(Dec::new(body), "request");
        let client = d.u64()?;
        let tid = d.u64()?;
        let epoch = d.u64()?;
        let flags = d.u32()?;
        let pool = d.u32()?;
        let pg = d.u32()?;
        let object = d.str("object name", MAX_NAME_BYTES)?;
        let op = match d.u8()? {
            1 => Op::WriteFull { data: d.bytes()? },
            2 => Op::Write { offset: d.u64()?, data: d.bytes()? },
            3 => Op::Read { offset: d.u64()?, len: d.u64()? },
            4 => Op::Stat,
            5 => Op::Delete,
            6 => {
                let some = d.u8()? != 0;
                let after = d.str("list cursor", MAX_NAME_BYTES)?;
                let max = d.u32()?;
                Op::List { after: some.then_some(after), max }
            }
            7 => Op::SetXattr {
                key: d.str("xattr key", MAX_XATTR_KEY_BYTES)?,
                value: {
                    let v = d.bytes()?;
                    if v.len() > MAX_XATTR_VALUE_BYTES {
                        return Err(DecodeError::TooLong {
                            what: "xattr value",
                            len: v.len(),
                            max: MAX_XATTR_VALUE_BYTES,
                        });
                    }
                    v
                },
            },
            8 => Op::GetXattr { key: d.str("xattr key", MAX_XATTR_KEY_BYTES)? },
            c => return Err(DecodeError::Unknown { what: "op", code: u32::from(c) }),
        };
        Ok(Request { client, tid, epoch, flags, pool, pg, object, op })
    }
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Status {
    Ok = 0,
    /// No such object (or xattr).
    NotFound = 1,
    /// This OSD is not the primary of the PG at its epoch (`Reply::epoch`): fetch that
    /// map (or newer) and resend.
    Redirect = 2,
    /// Try again later (the OSD is starting, or waited too long for a map).
    Again = 3,
    NoSpace = 4,
    /// The request is malformed or not allowed (see the message).
    Invalid = 5,
    /// Stored data failed its checksum.
    Corrupt = 6,
    /// A device error.
    Io = 7,
    /// The pool does not exist in the OSD's map.
    NoPool = 8,
    /// Larger than this store takes in one transaction.
    TooLarge = 9,
    /// The session has no valid ticket (none, or it expired): renew it, reconnect and
    /// resend.
    Unauthenticated = 10,
    /// The ticket's caps do not allow the op; the message names the missing cap.
    PermissionDenied = 11,
}

impl Status {
    pub fn from_u16(v: u16) -> Option<Status> {
        Some(match v {
            0 => Status::Ok,
            1 => Status::NotFound,
            2 => Status::Redirect,
            3 => Status::Again,
            4 => Status::NoSpace,
            5 => Status::Invalid,
            6 => Status::Corrupt,
            7 => Status::Io,
            8 => Status::NoPool,
            9 => Status::TooLarge,
            10 => Status::Unauthenticated,
            11 => Status::PermissionDenied,
            _ => return None,
        })
    }
}

/// What a successful request returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body<'a> {
    /// Writes, deletes: nothing but the version.
    None,
    /// Reads, getxattr.
    Data(&'a [u8]),
    Stat {
        size: u64,
    },
    /// A page of names; `next` is where the next page starts (`None`: this PG is done).
    List {
        names: Vec<&'a str>,
        next: Option<&'a str>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply<'a> {
    pub tid: u64,
    /// The OSD's map epoch when it answered.
    pub epoch: u64,
    pub status: Status,
    /// The PG version of a write; the object version of a read or stat.
    pub version: u64,
    /// Why, when not `Ok` (for people).
    pub message: &'a str,
    pub body: Body<'a>,
}

impl<'a> Reply<'a> {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let m = message::begin(out, VERSION, 1);
        put_u64(out, self.tid);
        put_u64(out, self.epoch);
        put_u16(out, self.status as u16);
        put_u64(out, self.version);
        put_bytes(out, self.message.as_bytes());
        match &self.body {
            Body::None => out.push(0),
            Body::Data(d) => {
                out.push(1);
                put_bytes(out, d);
            }
            Body::Stat { size } => {
                out.push(2);
                put_u64(out, *size);
            }
            Body::List { names, next } => {
                out.push(3);
                put_u32(out, names.len() as u32);
                for n in names {
                    put_bytes(out, n.as_bytes());
                }
                out.push(u8::from(next.is_some()));
                put_bytes(out, next.unwrap_or("").as_bytes());
            }
        }
        message::finish(out, m);
    }

    pub fn decode(buf: &'a [u8]) -> Result<Reply<'a>, DecodeError> {
        let body = message::open(buf, VERSION)?.body;
        let mut d = D(Dec::new(body), "reply");
        let tid = d.u64()?;
        let epoch = d.u64()?;
        let code = d.u16()?;
        let status = Status::from_u16(code)
            .ok_or(DecodeError::Unknown { what: "status", code: u32::from(code) })?;
        let version = d.u64()?;
        let message = d.str("message", 4096)?;
        let body = match d.u8()? {
            0 => Body::None,
            1 => Body::Data(d.bytes()?),
            2 => Body::Stat { size: d.u64()? },
            3 => {
                let n = d.u32()?;
                if n > MAX_LIST {
                    return Err(DecodeError::TooLong {
                        what: "list",
                        len: n as usize,
                        max: MAX_LIST as usize,
                    });
                }
                let mut names = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    names.push(d.str("object name", MAX_NAME_BYTES)?);
                }
                let some = d.u8()? != 0;
                let next = d.str("list cursor", MAX_NAME_BYTES)?;
                Body::List { names, next: some.then_some(next) }
            }
            c => return Err(DecodeError::Unknown { what: "reply body", code: u32::from(c) }),
        };
        Ok(Reply { tid, epoch, status, version, message, body })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn op_strategy() -> impl Strategy<Value = (u8, u64, u64, Vec<u8>, String, Option<String>)> {
        (
            1u8..=8,
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..300),
            "[a-z0-9/._-]{0,40}",
            proptest::option::of("[a-z]{0,20}"),
        )
    }

    fn make_op<'a>(
        code: u8,
        a: u64,
        b: u64,
        data: &'a [u8],
        s: &'a str,
        o: &'a Option<String>,
    ) -> Op<'a> {
        match code {
            1 => Op::WriteFull { data },
            2 => Op::Write { offset: a, data },
            3 => Op::Read { offset: a, len: b },
            4 => Op::Stat,
            5 => Op::Delete,
            6 => Op::List { after: o.as_deref(), max: b as u32 },
            7 => Op::SetXattr { key: s, value: data },
            _ => Op::GetXattr { key: s },
        }
    }

    proptest! {
        #[test]
        fn requests_round_trip(
            (code, a, b, data, s, o) in op_strategy(),
            client in any::<u64>(), tid in any::<u64>(), epoch in any::<u64>(),
            fl in any::<u32>(), pool in any::<u32>(), pg in any::<u32>(),
            object in ".{0,50}",
        ) {
            let op = make_op(code, a, b, &data, &s, &o);
            let r = Request { client, tid, epoch, flags: fl, pool, pg, object: &object, op };
            let mut buf = Vec::new();
            r.encode(&mut buf);
            prop_assert_eq!(Request::decode(&buf).unwrap(), r);
            // Every strict prefix is an error, never a panic or a different request.
            for cut in 0..buf.len() {
                prop_assert!(Request::decode(&buf[..cut]).is_err());
            }
        }

        #[test]
        fn replies_round_trip(
            tid in any::<u64>(), epoch in any::<u64>(), st in 0u16..10, version in any::<u64>(),
            msg in ".{0,30}", kind in 0u8..4, data in proptest::collection::vec(any::<u8>(), 0..300),
            names in proptest::collection::vec("[a-z]{0,12}", 0..20),
            next in proptest::option::of("[a-z]{1,12}"),
        ) {
            let body = match kind {
                0 => Body::None,
                1 => Body::Data(&data),
                2 => Body::Stat { size: version / 3 },
                _ => Body::List { names: names.iter().map(|s| s.as_str()).collect(), next: next.as_deref() },
            };
            let r = Reply { tid, epoch, status: Status::from_u16(st).unwrap(), version, message: &msg, body };
            let mut buf = Vec::new();
            r.encode(&mut buf);
            prop_assert_eq!(Reply::decode(&buf).unwrap(), r);
            for cut in 0..buf.len() {
                prop_assert!(Reply::decode(&buf[..cut]).is_err());
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Request::decode(&bytes);
            let _ = Reply::decode(&bytes);
        }
    }

    #[test]
    fn limits_are_enforced() {
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        let r = Request {
            client: 1,
            tid: 1,
            epoch: 1,
            flags: 0,
            pool: 1,
            pg: 0,
            object: &long,
            op: Op::Stat,
        };
        let mut buf = Vec::new();
        r.encode(&mut buf);
        assert!(matches!(Request::decode(&buf), Err(DecodeError::TooLong { .. })));
    }
}

//! The versioned, checksummed envelope every replicated structure travels and rests in.
//!
//! ```text
//! | magic u32 | kind u16 | version u16 | oldest compatible u16 | reserved u16 | len u32 | payload (postcard) | crc32c u32 |
//! ```
//!
//! The crc covers everything before it. A reader accepts a payload whose `version` it
//! knows, or a newer one whose `oldest compatible` version it knows (fields are only ever
//! appended, so an older reader decodes the prefix it understands). Decoding never panics
//! on bad bytes and bounds the payload length before allocating.

use serde::{Serialize, de::DeserializeOwned};
use sluice_vocab::codec::{Dec, Enc};

pub const MAGIC: u32 = u32::from_le_bytes(*b"SLMP");
const HEADER_BYTES: usize = 4 + 2 + 2 + 2 + 2 + 4;
/// Largest payload accepted (a map of a large cluster stays far below).
pub const MAX_PAYLOAD_BYTES: usize = 64 << 20;

/// What a sealed payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    OsdMap = 1,
    OsdMapIncremental = 2,
    MonMap = 3,
    /// The monitors' replicated state (a snapshot of [`crate::state::ClusterState`]).
    MonState = 4,
    /// Who a monitor is: cluster, name, initial members.
    MonIdentity = 5,
    /// One Raft log entry or vote record of the monitor store.
    MonLog = 6,
    /// A Raft message between monitors (request or reply).
    RaftRpc = 7,
    /// A monitor's state-machine snapshot (state, last applied entry, membership).
    MonSnapshot = 8,
    /// Map updates for a subscriber: incrementals or a full map, plus central config.
    MapUpdate = 9,
    /// An OSD-to-OSD heartbeat ping or reply.
    Heartbeat = 10,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("not a Sluice map (bad magic {0:#x})")]
    BadMagic(u32),
    #[error("expected a {expected:?}, found kind {found}")]
    WrongKind { expected: Kind, found: u16 },
    #[error(
        "version {found} is too new (this build reads {supported}, the writer needs at least {oldest})"
    )]
    TooNew { found: u16, oldest: u16, supported: u16 },
    #[error("payload of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("truncated")]
    Truncated,
    #[error("checksum mismatch")]
    BadCrc,
    #[error("undecodable payload: {0}")]
    Payload(String),
}

/// Seals `value` as `kind`, written by format `version`, readable by readers of at least
/// `oldest`.
pub fn seal<T: Serialize>(kind: Kind, version: u16, oldest: u16, value: &T) -> Vec<u8> {
    debug_assert!(oldest <= version);
    let payload = postcard::to_allocvec(value).expect("maps serialize");
    assert!(payload.len() <= MAX_PAYLOAD_BYTES, "a {kind:?} of {} bytes", payload.len());
    let mut e = Enc::with_capacity(HEADER_BYTES + payload.len() + 4);
    e.u32(MAGIC).u16(kind as u16).u16(version).u16(oldest).u16(0).u32(payload.len() as u32);
    e.bytes(&payload);
    let crc = crc32c::crc32c(&e.buf);
    e.u32(crc);
    e.buf
}

/// Opens an envelope of `kind` for a reader that understands up to `supported`.
pub fn open<T: DeserializeOwned>(
    kind: Kind,
    supported: u16,
    bytes: &[u8],
) -> Result<T, EnvelopeError> {
    open_versioned(kind, supported, bytes, |_, payload| {
        // A newer writer appends fields: decode the prefix this build knows.
        postcard::take_from_bytes::<T>(payload).map(|(v, _rest)| v)
    })
}

/// [`open`] for readers that still read older layouts: `decode` gets the payload's
/// version (at most `supported`, or newer but compatible) and its bytes.
pub fn open_versioned<T>(
    kind: Kind,
    supported: u16,
    bytes: &[u8],
    decode: impl FnOnce(u16, &[u8]) -> Result<T, postcard::Error>,
) -> Result<T, EnvelopeError> {
    let mut d = Dec::new(bytes);
    let t = |_| EnvelopeError::Truncated;
    let magic = d.u32().map_err(t)?;
    if magic != MAGIC {
        return Err(EnvelopeError::BadMagic(magic));
    }
    let found = d.u16().map_err(t)?;
    if found != kind as u16 {
        return Err(EnvelopeError::WrongKind { expected: kind, found });
    }
    let version = d.u16().map_err(t)?;
    let oldest = d.u16().map_err(t)?;
    let _reserved = d.u16().map_err(t)?;
    let len = d.u32().map_err(t)? as usize;
    if len > MAX_PAYLOAD_BYTES {
        return Err(EnvelopeError::TooLarge(len));
    }
    let payload = d.take(len).map_err(t)?;
    let body_end = d.position();
    let crc = d.u32().map_err(t)?;
    if crc32c::crc32c(&bytes[..body_end]) != crc {
        return Err(EnvelopeError::BadCrc);
    }
    if version > supported && oldest > supported {
        return Err(EnvelopeError::TooNew { found: version, oldest, supported });
    }
    decode(version, payload).map_err(|e| EnvelopeError::Payload(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct V1 {
        a: u32,
        b: String,
    }

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct V2 {
        a: u32,
        b: String,
        c: Vec<u64>,
    }

    #[test]
    fn round_trips_and_rejects_damage_kind_and_future_versions() {
        let v = V1 { a: 7, b: "x".into() };
        let b = seal(Kind::MonMap, 1, 1, &v);
        assert_eq!(open::<V1>(Kind::MonMap, 1, &b).unwrap(), v);
        assert!(matches!(open::<V1>(Kind::OsdMap, 1, &b), Err(EnvelopeError::WrongKind { .. })));
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 0x40;
            assert!(open::<V1>(Kind::MonMap, 1, &bad).is_err(), "flipped byte {i} accepted");
        }
        for n in 0..b.len() {
            assert!(open::<V1>(Kind::MonMap, 1, &b[..n]).is_err(), "truncated to {n} accepted");
        }
        // A newer writer that stays compatible with v1 readers: they read the prefix.
        let v2 = V2 { a: 9, b: "y".into(), c: vec![1, 2] };
        let b2 = seal(Kind::MonMap, 2, 1, &v2);
        assert_eq!(open::<V1>(Kind::MonMap, 1, &b2).unwrap(), V1 { a: 9, b: "y".into() });
        // One that is not.
        let b3 = seal(Kind::MonMap, 3, 3, &v2);
        assert!(matches!(open::<V1>(Kind::MonMap, 1, &b3), Err(EnvelopeError::TooNew { .. })));
    }

    proptest::proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = open::<V2>(Kind::OsdMap, 1, &bytes);
        }
    }
}

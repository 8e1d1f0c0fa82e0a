//! Secure mode: a connection's byte stream (the same frames as in crc mode) cut into
//! records sealed with AES-128-GCM, for clusters that want confidentiality and
//! authenticity on the wire and not only integrity against bit errors.
//!
//! ```text
//! record := | plaintext length u32 (le) | ciphertext | 16-byte tag |
//! ```
//!
//! * **Keys** come from the connection secret the authentication handshake gives both
//!   ends (a fresh random secret per connection, `sluice_auth::handshake`): HKDF-SHA256
//!   derives one key and one 4-byte nonce prefix per direction, so the two directions
//!   never share a nonce.
//! * **Nonces** are the prefix and a 64-bit counter (NIST SP 800-38D's deterministic
//!   construction), one per record and per direction, never reused: a direction that
//!   reaches its limit refuses to seal ([`SecureError::NonceExhausted`]) and the
//!   connection must be replaced (its session replays what was not acked, under the new
//!   connection's keys).
//! * **Authenticity first.** The length is authenticated as associated data; a
//!   receiver bounds it before waiting for the record and uses no plaintext before the
//!   tag verifies. Because the counter is implied, a record replayed, dropped,
//!   reordered or moved to another connection fails its tag like a tampered one.
//!
//! The frames inside keep their crc32c: secure mode wraps the stream, it does not change
//! the framing, so the session layer (and its replay buffer, which holds plaintext
//! frames to resend on a new connection under new keys) is the same in both modes.

use ring::aead::{AES_128_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

/// Bytes before a record's ciphertext.
pub const RECORD_HEADER_BYTES: usize = 4;
pub const TAG_BYTES: usize = 16;
/// Largest plaintext one record carries (a sender cuts longer output into several).
pub const MAX_RECORD_PLAINTEXT: usize = 256 << 10;

/// Which end of the connection this is (each seals with its own direction's key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecureError {
    #[error(
        "secure mode: record {record} failed authentication (tampered, replayed, \
         reordered or sealed with another key)"
    )]
    Unauthentic { record: u64 },
    #[error("secure mode: record of {len} bytes exceeds the limit of {MAX_RECORD_PLAINTEXT}")]
    TooLarge { len: usize },
    #[error("secure mode: this connection sealed its last allowed record; reconnect")]
    NonceExhausted,
}

impl From<SecureError> for std::io::Error {
    fn from(e: SecureError) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }
}

#[derive(Debug)]
struct Direction {
    key: LessSafeKey,
    prefix: [u8; 4],
    /// The next record's number.
    counter: u64,
    /// Records this direction may seal or open (the last counter value is `limit - 1`).
    limit: u64,
}

impl Direction {
    fn new(secret: &[u8; 32], label: &[u8], limit: u64) -> Direction {
        let mut okm = [0u8; 16 + 4];
        sluice_auth::crypto::derive_bytes(secret, b"sluice-secure-mode-1", label, &mut okm);
        let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &okm[..16]).expect("16-byte key"));
        let prefix = okm[16..].try_into().expect("4 bytes");
        Direction { key, prefix, counter: 0, limit }
    }

    /// The nonce of the next record, and moves past it.
    fn next_nonce(&mut self) -> Result<Nonce, SecureError> {
        if self.counter >= self.limit {
            return Err(SecureError::NonceExhausted);
        }
        let mut n = [0u8; NONCE_LEN];
        n[..4].copy_from_slice(&self.prefix);
        n[4..].copy_from_slice(&self.counter.to_be_bytes());
        self.counter += 1;
        Ok(Nonce::assume_unique_for_key(n))
    }
}

/// Both directions of one connection's secure mode.
#[derive(Debug)]
pub struct SecureChannel {
    tx: Direction,
    rx: Direction,
}

impl SecureChannel {
    /// Keys for `role`'s end of the connection whose handshake gave `secret`. The secret
    /// must be this connection's alone (the handshake makes a new one per connection):
    /// the counters start at zero for every channel.
    pub fn new(secret: &[u8; 32], role: Role) -> SecureChannel {
        SecureChannel::with_limit(secret, role, u64::MAX)
    }

    /// [`Self::new`] allowing only `limit` records per direction (tests of exhaustion).
    pub fn with_limit(secret: &[u8; 32], role: Role, limit: u64) -> SecureChannel {
        let c2s = Direction::new(secret, b"client-to-server", limit);
        let s2c = Direction::new(secret, b"server-to-client", limit);
        match role {
            Role::Client => SecureChannel { tx: c2s, rx: s2c },
            Role::Server => SecureChannel { tx: s2c, rx: c2s },
        }
    }

    /// Appends `plain` to `out` as sealed records (several if it is long).
    pub fn seal(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), SecureError> {
        for chunk in plain.chunks(MAX_RECORD_PLAINTEXT) {
            let nonce = self.tx.next_nonce()?;
            let len = (chunk.len() as u32).to_le_bytes();
            out.extend_from_slice(&len);
            let at = out.len();
            out.extend_from_slice(chunk);
            let tag = self
                .tx
                .key
                .seal_in_place_separate_tag(nonce, Aad::from(len), &mut out[at..])
                .expect("sealing a bounded record cannot fail");
            out.extend_from_slice(tag.as_ref());
        }
        Ok(())
    }

    /// Opens the complete records at the start of `input`, appending their plaintext to
    /// `out`; returns the bytes of `input` used (a partial record waits for more). On an
    /// error the connection is over: nothing after the bad record is believed.
    pub fn open(&mut self, input: &mut [u8], out: &mut Vec<u8>) -> Result<usize, SecureError> {
        let mut at = 0;
        loop {
            let rest = &mut input[at..];
            if rest.len() < RECORD_HEADER_BYTES {
                return Ok(at);
            }
            let len_bytes: [u8; 4] = rest[..4].try_into().expect("4 bytes");
            let len = u32::from_le_bytes(len_bytes) as usize;
            if len > MAX_RECORD_PLAINTEXT {
                return Err(SecureError::TooLarge { len });
            }
            let total = RECORD_HEADER_BYTES + len + TAG_BYTES;
            if rest.len() < total {
                return Ok(at);
            }
            let record = self.rx.counter;
            let nonce = self.rx.next_nonce().map_err(|_| SecureError::Unauthentic { record })?;
            let body = &mut rest[RECORD_HEADER_BYTES..total];
            let plain = self
                .rx
                .key
                .open_in_place(nonce, Aad::from(len_bytes), body)
                .map_err(|_| SecureError::Unauthentic { record })?;
            out.extend_from_slice(plain);
            at += total;
        }
    }

    /// Bytes sealing `n` plaintext bytes adds.
    pub fn overhead(n: usize) -> usize {
        n.div_ceil(MAX_RECORD_PLAINTEXT).max(1) * (RECORD_HEADER_BYTES + TAG_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any sequence of writes, cut anywhere on the way, arrives whole and in order.
        #[test]
        fn streams_survive_any_cutting(
            writes in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..3000), 1..8),
            cuts in proptest::collection::vec(1usize..5000, 1..20),
        ) {
            let (mut c, mut s) = pair();
            let mut wire = Vec::new();
            for w in &writes {
                c.seal(w, &mut wire).unwrap();
            }
            let (mut buf, mut got, mut at) = (Vec::new(), Vec::new(), 0);
            for cut in cuts.iter().cycle() {
                if at == wire.len() {
                    break;
                }
                let end = (at + cut).min(wire.len());
                buf.extend_from_slice(&wire[at..end]);
                at = end;
                let used = s.open(&mut buf, &mut got).unwrap();
                buf.drain(..used);
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(got, writes.concat());
        }

        #[test]
        fn opening_garbage_never_panics(mut b in proptest::collection::vec(any::<u8>(), 0..600)) {
            let (_, mut s) = pair();
            let _ = s.open(&mut b, &mut Vec::new());
        }
    }

    fn pair() -> (SecureChannel, SecureChannel) {
        let secret = [7u8; 32];
        (SecureChannel::new(&secret, Role::Client), SecureChannel::new(&secret, Role::Server))
    }

    #[test]
    fn both_directions_round_trip_with_distinct_keys() {
        let (mut c, mut s) = pair();
        let mut wire = Vec::new();
        c.seal(b"hello", &mut wire).unwrap();
        assert_eq!(wire.len(), 5 + SecureChannel::overhead(5));
        assert!(!wire.windows(5).any(|w| w == b"hello"), "plaintext on the wire");
        let mut got = Vec::new();
        assert_eq!(s.open(&mut wire.clone(), &mut got).unwrap(), wire.len());
        assert_eq!(got, b"hello");
        // The same bytes the other way are a different ciphertext (own key and nonce).
        let mut back = Vec::new();
        s.seal(b"hello", &mut back).unwrap();
        assert_ne!(back, wire);
        // A client cannot open its own records (they are for the server's rx key).
        let mut c2 = SecureChannel::new(&[7u8; 32], Role::Client);
        assert!(c2.open(&mut wire.clone(), &mut Vec::new()).is_err());
    }

    #[test]
    fn tampered_replayed_and_reordered_records_fail() {
        let mut c = SecureChannel::new(&[7u8; 32], Role::Client);
        let mut r1 = Vec::new();
        c.seal(b"first", &mut r1).unwrap();
        let mut r2 = Vec::new();
        c.seal(b"second", &mut r2).unwrap();
        for i in 0..r1.len() {
            let mut t = r1.clone();
            t[i] ^= 0x01;
            let mut s = SecureChannel::new(&[7u8; 32], Role::Server);
            let r = s.open(&mut t, &mut Vec::new());
            // A flipped length bit either makes the record look incomplete (it waits:
            // the tag check comes when the bytes arrive) or fails.
            assert!(matches!(r, Err(_) | Ok(0)), "flip at {i} accepted: {r:?}");
        }
        let mut s = SecureChannel::new(&[7u8; 32], Role::Server);
        assert_eq!(
            s.open(&mut r2.clone(), &mut Vec::new()),
            Err(SecureError::Unauthentic { record: 0 })
        );
        let mut s = SecureChannel::new(&[7u8; 32], Role::Server);
        let mut out = Vec::new();
        s.open(&mut r1.clone(), &mut out).unwrap();
        assert_eq!(
            s.open(&mut r1.clone(), &mut out),
            Err(SecureError::Unauthentic { record: 1 }),
            "replay"
        );
        // Another connection's secret.
        let mut other = SecureChannel::new(&[8u8; 32], Role::Server);
        assert!(other.open(&mut r1.clone(), &mut Vec::new()).is_err());
    }

    #[test]
    fn long_output_is_cut_and_lengths_are_bounded() {
        let (mut c, mut s) = pair();
        let big: Vec<u8> = (0..(MAX_RECORD_PLAINTEXT * 2 + 17)).map(|i| i as u8).collect();
        let mut wire = Vec::new();
        c.seal(&big, &mut wire).unwrap();
        assert_eq!(wire.len(), big.len() + 3 * (RECORD_HEADER_BYTES + TAG_BYTES));
        // Arriving a few bytes at a time.
        let mut got = Vec::new();
        let mut buf = Vec::new();
        for piece in wire.chunks(7919) {
            buf.extend_from_slice(piece);
            let used = s.open(&mut buf, &mut got).unwrap();
            buf.drain(..used);
        }
        assert!(buf.is_empty());
        assert_eq!(got, big);
        let mut huge = ((MAX_RECORD_PLAINTEXT + 1) as u32).to_le_bytes().to_vec();
        huge.extend_from_slice(&[0; 8]);
        assert_eq!(
            s.open(&mut huge, &mut got),
            Err(SecureError::TooLarge { len: MAX_RECORD_PLAINTEXT + 1 })
        );
    }

    #[test]
    fn a_direction_stops_at_its_nonce_limit() {
        let mut c = SecureChannel::with_limit(&[1u8; 32], Role::Client, 2);
        let mut s = SecureChannel::with_limit(&[1u8; 32], Role::Server, 2);
        let mut wire = Vec::new();
        c.seal(b"a", &mut wire).unwrap();
        c.seal(b"b", &mut wire).unwrap();
        assert_eq!(c.seal(b"c", &mut wire), Err(SecureError::NonceExhausted));
        let mut out = Vec::new();
        assert_eq!(s.open(&mut wire, &mut out).unwrap(), wire.len());
        assert_eq!(out, b"ab");
    }
}

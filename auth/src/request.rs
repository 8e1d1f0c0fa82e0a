//! Requests to the monitors' management API signed with an auth ticket: the monitor
//! learns who asks (and their caps at the monitors) from the ticket, and that the
//! request is this very one, recent and not seen before, from a stamp sealed under the
//! ticket's session key.
//!
//! The stamp binds the method, the path and a SHA-256 of the body, so a signature cannot
//! be moved to another request; it carries the time and a nonce, so a monitor refuses
//! it outside a window around its clock and twice within it ([`ReplayCache`]; HTTP has
//! no connection to hang a challenge on).

use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::digest;
use serde::{Deserialize, Serialize};

use crate::caps::Service;
use crate::crypto;
use crate::kdc::Credentials;
use crate::secret::{Secret, random_u64};
use crate::ticket::{AuthTicket, MON_SECRET_ID, TicketBlob, open_ticket_with};
use crate::{AuthError, malformed};

/// The HTTP header carrying a signature.
pub const HEADER: &str = "x-sluice-auth";
/// How far a stamp's time may be from the monitor's clock.
pub const WINDOW_MS: u64 = 60_000;
const STAMP_VERSION: u16 = 1;
const AAD: &[u8] = b"sluice-request-1";
/// Longest header accepted (a ticket with long caps stays far below).
pub const MAX_HEADER_BYTES: usize = 16 << 10;

#[derive(Serialize, Deserialize)]
struct Signed {
    ticket: TicketBlob,
    sealed: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct Stamp {
    version: u16,
    global_id: u64,
    nonce: u64,
    at_ms: u64,
    method: String,
    path: String,
    body_sha256: [u8; 32],
}

fn sha256(b: &[u8]) -> [u8; 32] {
    digest::digest(&digest::SHA256, b).as_ref().try_into().expect("32 bytes")
}

/// The header value signing `method path` with `body` as `creds` at `now_ms`.
pub fn sign(creds: &Credentials, method: &str, path: &str, body: &[u8], now_ms: u64) -> String {
    let stamp = Stamp {
        version: STAMP_VERSION,
        global_id: creds.global_id,
        nonce: random_u64(),
        at_ms: now_ms,
        method: method.to_string(),
        path: path.to_string(),
        body_sha256: sha256(body),
    };
    let plain = postcard::to_allocvec(&stamp).expect("stamps serialize");
    let sealed = crypto::seal(&creds.session_key, AAD, &plain);
    let signed = Signed { ticket: creds.auth_ticket.clone(), sealed };
    STANDARD.encode(postcard::to_allocvec(&signed).expect("serializes"))
}

/// Checks a signature made by [`sign`] for `method path` with `body`, with the
/// monitors' key, at `now_ms`; `replays` remembers the stamps seen. Returns the
/// caller's ticket (identity and caps at the monitors) and its session key (to seal a
/// reply with, [`seal_reply`]).
pub fn verify(
    header: &str,
    mon_key: &Secret,
    method: &str,
    path: &str,
    body: &[u8],
    now_ms: u64,
    replays: Option<&mut ReplayCache>,
) -> Result<(AuthTicket, Secret), AuthError> {
    // `replays: None` for requests whose replay does no harm (reads): they then take no
    // room in the cache, which a flood of them could otherwise fill.
    const WHAT: &str = "request signature";
    if header.len() > MAX_HEADER_BYTES {
        return Err(malformed(WHAT, "too long"));
    }
    let raw = STANDARD.decode(header.trim()).map_err(|_| malformed(WHAT, "not base64"))?;
    let signed: Signed = postcard::from_bytes(&raw).map_err(|e| malformed(WHAT, e))?;
    if signed.ticket.secret_id != MON_SECRET_ID {
        return Err(malformed(WHAT, "not an auth ticket"));
    }
    let (ticket, sk) = open_ticket_with(&signed.ticket, Service::Mon, mon_key, now_ms)?;
    let plain = crypto::open(&sk, AAD, &signed.sealed, "request stamp")?;
    let stamp: Stamp = postcard::from_bytes(&plain).map_err(|e| malformed(WHAT, e))?;
    if stamp.version != STAMP_VERSION {
        return Err(malformed(WHAT, format!("stamp version {} is unknown", stamp.version)));
    }
    if stamp.global_id != ticket.global_id {
        return Err(malformed(WHAT, "global id differs from the ticket's"));
    }
    if stamp.method != method || stamp.path != path || stamp.body_sha256 != sha256(body) {
        return Err(AuthError::Replay);
    }
    if now_ms.abs_diff(stamp.at_ms) > WINDOW_MS {
        return Err(AuthError::StaleRequest {
            skew_ms: (i128::from(now_ms) - i128::from(stamp.at_ms))
                .clamp(i64::MIN.into(), i64::MAX.into()) as i64,
        });
    }
    if let Some(replays) = replays
        && !replays.first_sight(stamp.global_id, stamp.nonce, stamp.at_ms + WINDOW_MS, now_ms)?
    {
        return Err(AuthError::Replay);
    }
    Ok((ticket, sk))
}

/// The stamps seen within their window, to refuse a replayed request. Bounded, and
/// failing closed: when it is full of live stamps, new requests are refused (retry
/// later) rather than live stamps forgotten (which would let a flood reopen the door to
/// replays).
#[derive(Debug, Default)]
pub struct ReplayCache {
    seen: HashMap<(u64, u64), u64>,
}

/// Stamps a cache remembers at most.
pub const REPLAY_CACHE_ENTRIES: usize = 1 << 16;

impl ReplayCache {
    /// Records (global id, nonce) until `until_ms`: `Ok(false)` if it was seen already,
    /// an error if the cache is full of live stamps.
    pub fn first_sight(
        &mut self,
        global_id: u64,
        nonce: u64,
        until_ms: u64,
        now_ms: u64,
    ) -> Result<bool, AuthError> {
        if self.seen.len() >= REPLAY_CACHE_ENTRIES {
            self.seen.retain(|_, until| *until > now_ms);
            if self.seen.len() >= REPLAY_CACHE_ENTRIES
                && !self.seen.contains_key(&(global_id, nonce))
            {
                return Err(AuthError::Busy);
            }
        }
        Ok(self.seen.insert((global_id, nonce), until_ms).is_none())
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// Seals a reply for the caller of a verified request (under its ticket's session
/// key; `what` names the reply).
pub fn seal_reply<T: Serialize>(session_key: &Secret, what: &[u8], value: &T) -> Vec<u8> {
    let plain = zeroize::Zeroizing::new(postcard::to_allocvec(value).expect("serializes"));
    crypto::seal(session_key, &[b"sluice-reply-1".as_slice(), what].concat(), &plain)
}

/// Opens a reply sealed by [`seal_reply`] with the caller's session key.
pub fn open_reply<T: serde::de::DeserializeOwned>(
    session_key: &Secret,
    what: &[u8],
    sealed: &[u8],
) -> Result<T, AuthError> {
    let aad = [b"sluice-reply-1".as_slice(), what].concat();
    let plain = zeroize::Zeroizing::new(crypto::open(session_key, &aad, sealed, "reply")?);
    postcard::from_bytes(&plain).map_err(|e| malformed("reply", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kdc::tests::Kdc;

    #[test]
    fn a_signed_request_verifies_once_and_only_as_itself() {
        let mut kdc = Kdc::new();
        let (alice, key) = kdc.add("client.alice", "allow r");
        let creds = kdc.login(&alice, &key, 1_000);
        let mut cache = ReplayCache::default();
        let h = sign(&creds, "POST", "/v1/command", b"{}", 2_000);
        let (t, sk) =
            verify(&h, &kdc.mon_key, "POST", "/v1/command", b"{}", 2_500, Some(&mut cache))
                .unwrap();
        assert_eq!(sk, creds.session_key);
        assert_eq!(t.entity, alice);
        assert_eq!(t.caps.to_string(), "allow r");
        // The same signature again, or for another request.
        assert_eq!(
            verify(&h, &kdc.mon_key, "POST", "/v1/command", b"{}", 2_600, Some(&mut cache)),
            Err(AuthError::Replay)
        );
        let mut fresh = ReplayCache::default();
        for (m, p, b) in [
            ("GET", "/v1/command", &b"{}"[..]),
            ("POST", "/v1/other", b"{}"),
            ("POST", "/v1/command", b"{ }"),
        ] {
            assert_eq!(
                verify(&h, &kdc.mon_key, m, p, b, 2_600, Some(&mut fresh)),
                Err(AuthError::Replay),
                "{m} {p}"
            );
        }
        // Outside the window.
        let h = sign(&creds, "GET", "/x", b"", 2_000);
        assert!(matches!(
            verify(&h, &kdc.mon_key, "GET", "/x", b"", 2_000 + WINDOW_MS + 1, Some(&mut fresh)),
            Err(AuthError::StaleRequest { .. })
        ));
        // Another cluster's monitors, damage, garbage.
        let h = sign(&creds, "GET", "/x", b"", 2_000);
        assert!(
            verify(&h, &Secret::generate(), "GET", "/x", b"", 2_000, Some(&mut fresh)).is_err()
        );
        let mut bad = h.into_bytes();
        let n = bad.len();
        bad[n / 2] = if bad[n / 2] == b'A' { b'B' } else { b'A' };
        assert!(
            verify(
                &String::from_utf8(bad).unwrap(),
                &kdc.mon_key,
                "GET",
                "/x",
                b"",
                2_000,
                Some(&mut fresh)
            )
            .is_err()
        );
        assert!(verify("%%%", &kdc.mon_key, "GET", "/x", b"", 2_000, Some(&mut fresh)).is_err());
        // Without a cache (reads), the same stamp verifies twice and nothing is kept.
        let read = sign(&creds, "GET", "/v1/status", b"", 2_000);
        let before = fresh.len();
        assert!(verify(&read, &kdc.mon_key, "GET", "/v1/status", b"", 2_000, None).is_ok());
        assert!(verify(&read, &kdc.mon_key, "GET", "/v1/status", b"", 2_000, None).is_ok());
        assert_eq!(fresh.len(), before);
        // A service ticket is not an auth ticket.
        let mut svc = creds.clone();
        svc.auth_ticket = creds.ticket(Service::Osd).unwrap().blob.clone();
        let h = sign(&svc, "GET", "/x", b"", 2_000);
        assert!(verify(&h, &kdc.mon_key, "GET", "/x", b"", 2_000, Some(&mut fresh)).is_err());
    }

    #[test]
    fn the_replay_cache_stays_bounded_and_fails_closed() {
        let mut c = ReplayCache::default();
        for i in 0..REPLAY_CACHE_ENTRIES as u64 {
            assert_eq!(c.first_sight(1, i, 1_000 + i, 0), Ok(true));
        }
        // Full of live stamps: refused, and nothing live forgotten.
        assert_eq!(c.first_sight(1, u64::MAX, 5_000, 0), Err(AuthError::Busy));
        assert_eq!(c.first_sight(1, 7, 5_000, 0), Ok(false), "still remembered");
        // Once some expire there is room again.
        assert_eq!(c.first_sight(1, u64::MAX, 5_000, 1_500), Ok(true));
        assert!(c.len() <= REPLAY_CACHE_ENTRIES);
    }

    #[test]
    fn sealed_replies_open_only_with_the_session_key_and_label() {
        let k = Secret::generate();
        let b = seal_reply(&k, b"rotating", &42u64);
        assert_eq!(open_reply::<u64>(&k, b"rotating", &b).unwrap(), 42);
        assert!(open_reply::<u64>(&k, b"other", &b).is_err());
        assert!(open_reply::<u64>(&Secret::generate(), b"rotating", &b).is_err());
    }
}

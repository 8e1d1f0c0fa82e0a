//! Sluice's cephx-style authentication: who a peer is and what it may do, proven with
//! shared secrets and tickets, no public-key infrastructure (DESIGN.md section 6;
//! SEED-DIGEST section 3.1).
//!
//! * [`entity`]: names (`mon.`, `osd.3`, `client.admin`).
//! * [`secret`]: 256-bit secrets, their text form (with a version and a crc32c, so a
//!   mistyped key is caught as such) and zeroing on drop.
//! * [`keyring`]: keyring files (mode 0600, written atomically).
//! * [`caps`]: the capability grammar (`allow rw pool=x`, `profile osd`) and the check
//!   every op passes.
//! * [`crypto`]: sealing (AES-256-GCM), key derivation (HKDF-SHA256) and proofs
//!   (HMAC-SHA256), all from `ring`: nothing here is home-made cryptography.
//! * [`ticket`]: tickets sealed with a service's rotating secrets, which a service
//!   verifies without asking a monitor; the rotation rule (current and previous
//!   accepted).
//! * [`kdc`]: the monitor's side and the client's side of getting a session key and
//!   service tickets (challenge, proof, sealed replies).
//! * [`request`]: management API requests signed with an auth ticket (method, path and
//!   body bound, a time window and a replay cache).
//! * [`handshake`]: a client proving itself to a service (an OSD) with a ticket, the
//!   service's challenge (+1 against replay) and the service proving itself back.
//!
//! Everything is sans-IO: the owner moves the messages (HTTP to the monitors, session
//! frames to the OSDs), so each protocol path is tested without sockets. Clocks come in
//! as arguments (wall-clock milliseconds: tickets expire by wall time, so the cluster
//! needs synchronised clocks, and the check allows no skew beyond what the caller
//! passes).

pub mod caps;
pub mod crypto;
pub mod entity;
pub mod handshake;
pub mod kdc;
pub mod keyring;
pub mod request;
pub mod secret;
pub mod ticket;

pub use caps::{Caps, Denied, Perms, Service};
pub use entity::{EntityKind, EntityName};
pub use secret::Secret;
pub use ticket::{AuthTicket, RotatingSecrets, TicketBlob};

/// Why authentication failed. Each names what failed and nothing secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("unknown entity {0}")]
    UnknownEntity(String),
    #[error("wrong key for {0} (the proof does not match the key the monitors hold)")]
    WrongKey(String),
    #[error("the {0} could not be opened: wrong key, or it was tampered with")]
    Unsealable(&'static str),
    #[error("ticket of {entity} expired {ago_ms} ms ago")]
    Expired { entity: String, ago_ms: u64 },
    #[error("ticket is for the {got} service, not {want}")]
    WrongService { want: Service, got: Service },
    #[error(
        "ticket sealed with {service} secret {secret_id}, which is not accepted any more \
         (current {current}; only the current and the previous one are)"
    )]
    StaleSecret { service: Service, secret_id: u64, current: u64 },
    #[error(
        "ticket sealed with {service} secret {secret_id}, newer than this service's \
         current {current} (it fetches new secrets from the monitors)"
    )]
    FutureSecret { service: Service, secret_id: u64, current: u64 },
    #[error("challenge is stale or was not issued by this monitor")]
    BadChallenge,
    #[error("replayed or forged authorizer (the challenge response does not match)")]
    Replay,
    #[error("request signed {skew_ms} ms away from this monitor's clock (check the clocks)")]
    StaleRequest { skew_ms: i64 },
    #[error("too many signed requests within the replay window; retry in a minute")]
    Busy,
    #[error("the server failed to prove itself (its reply does not answer our nonce)")]
    ServerNotAuthentic,
    #[error("malformed {what}: {why}")]
    Malformed { what: &'static str, why: String },
    #[error("unexpected {what} in state {state}")]
    Unexpected { what: &'static str, state: &'static str },
    #[error("no ticket for the {0} service: the monitors did not grant one")]
    NoTicket(Service),
}

/// Wall-clock milliseconds since the Unix epoch: the clock tickets expire by (so the
/// cluster's clocks must agree).
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn malformed(what: &'static str, why: impl std::fmt::Display) -> AuthError {
    AuthError::Malformed { what, why: why.to_string() }
}

//! Tickets: what a service learns about a peer without asking a monitor.
//!
//! A monitor seals `{session key, AuthTicket}` under a service's current rotating secret
//! ([`seal_ticket`]); the holder cannot read or change it, the service opens it with the
//! secret the blob names ([`open_ticket`]). Monitors rotate each service's secret every
//! ticket lifetime; services accept the current and the previous secret (and the next,
//! published ahead), so a ticket stays valid until it expires (it was sealed while its
//! secret was current, and expires one lifetime later, before that secret is dropped)
//! while a leaked secret stops working two lifetimes after it was replaced.

use serde::{Deserialize, Serialize};

use crate::caps::{Caps, Service};
use crate::crypto;
use crate::entity::EntityName;
use crate::secret::Secret;
use crate::{AuthError, malformed};

const TICKET_VERSION: u16 = 1;

/// The `secret_id` of tickets sealed with the monitors' own key (`mon.`), not a
/// rotating secret: the auth ticket a client shows to renew.
pub const MON_SECRET_ID: u64 = 0;

/// What a ticket says about its holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthTicket {
    pub entity: EntityName,
    /// Unique per authenticated entity instance; kept across renewals.
    pub global_id: u64,
    /// The service this ticket is for.
    pub service: Service,
    pub created_ms: u64,
    /// The holder should get a new ticket after this.
    pub renew_after_ms: u64,
    pub expires_ms: u64,
    /// The holder's caps at `service`.
    pub caps: Caps,
}

#[derive(Serialize, Deserialize)]
struct TicketBody {
    version: u16,
    session_key: Secret,
    ticket: AuthTicket,
}

/// A sealed ticket: opaque to its holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketBlob {
    pub service: Service,
    pub secret_id: u64,
    pub sealed: Vec<u8>,
}

fn ticket_aad(service: Service, secret_id: u64) -> [u8; 24] {
    let mut a = [0u8; 24];
    a[..15].copy_from_slice(b"sluice-ticket-1");
    a[15] = service as u8;
    a[16..].copy_from_slice(&secret_id.to_le_bytes());
    a
}

/// Seals `ticket` and its session key under `secret` (named `secret_id`).
pub fn seal_ticket(
    secret_id: u64,
    secret: &Secret,
    ticket: &AuthTicket,
    session_key: &Secret,
) -> TicketBlob {
    let body = TicketBody {
        version: TICKET_VERSION,
        session_key: session_key.clone(),
        ticket: ticket.clone(),
    };
    let plain = zeroize::Zeroizing::new(postcard::to_allocvec(&body).expect("tickets serialize"));
    let sealed = crypto::seal(secret, &ticket_aad(ticket.service, secret_id), &plain);
    TicketBlob { service: ticket.service, secret_id, sealed }
}

/// Opens `blob` with `secret` and checks it is a live ticket for `want`.
pub fn open_ticket_with(
    blob: &TicketBlob,
    want: Service,
    secret: &Secret,
    now_ms: u64,
) -> Result<(AuthTicket, Secret), AuthError> {
    if blob.service != want {
        return Err(AuthError::WrongService { want, got: blob.service });
    }
    let plain = zeroize::Zeroizing::new(crypto::open(
        secret,
        &ticket_aad(blob.service, blob.secret_id),
        &blob.sealed,
        "ticket",
    )?);
    let body: TicketBody = postcard::from_bytes(&plain).map_err(|e| malformed("ticket", e))?;
    if body.version != TICKET_VERSION {
        return Err(malformed("ticket", format!("version {} is unknown", body.version)));
    }
    let t = body.ticket;
    // Sealed with the service in the associated data, so this holds for any ticket a
    // monitor made; a mismatch means a monitor bug, not an attack.
    assert_eq!(t.service, blob.service, "ticket service differs from its blob's");
    if now_ms >= t.expires_ms {
        return Err(AuthError::Expired {
            entity: t.entity.to_string(),
            ago_ms: now_ms - t.expires_ms,
        });
    }
    Ok((t, body.session_key))
}

/// Opens a service ticket with the rotating secret it names.
pub fn open_ticket(
    blob: &TicketBlob,
    want: Service,
    secrets: &RotatingSecrets,
    now_ms: u64,
) -> Result<(AuthTicket, Secret), AuthError> {
    if blob.service != want {
        return Err(AuthError::WrongService { want, got: blob.service });
    }
    if secrets.service != want {
        return Err(AuthError::WrongService { want, got: secrets.service });
    }
    open_ticket_with(blob, want, secrets.accepting(blob.secret_id)?, now_ms)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotatingSecret {
    pub id: u64,
    pub secret: Secret,
    pub created_ms: u64,
}

/// A service's rotating secrets: the previous, the current and the next one.
///
/// Monitors seal tickets with the current secret. The next one exists ahead of time, so
/// services that fetched it (they fetch every few minutes) already hold it when it
/// becomes current; a service accepts every secret it holds, so it accepts the
/// previous, current and next secret of its own view, and rejects anything older.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawRotatingSecrets")]
pub struct RotatingSecrets {
    pub service: Service,
    /// Consecutive ids, oldest first; the last is the next secret, the one before it
    /// the current one. Two or three entries.
    entries: Vec<RotatingSecret>,
}

/// What a [`RotatingSecrets`] decodes from, checked before use (a decoded value must
/// hold the invariants `current()` relies on).
#[derive(Deserialize)]
struct RawRotatingSecrets {
    service: Service,
    entries: Vec<RotatingSecret>,
}

impl TryFrom<RawRotatingSecrets> for RotatingSecrets {
    type Error = AuthError;
    fn try_from(r: RawRotatingSecrets) -> Result<RotatingSecrets, AuthError> {
        RotatingSecrets::from_entries(r.service, r.entries)
    }
}

impl RotatingSecrets {
    /// The first secrets of `service` (current id 1, next id 2).
    pub fn new(service: Service, now_ms: u64) -> RotatingSecrets {
        let mk = |id| RotatingSecret { id, secret: Secret::generate(), created_ms: now_ms };
        RotatingSecrets { service, entries: vec![mk(1), mk(2)] }
    }

    /// The first secrets of `service` derived from `key` (the monitors' own): every
    /// monitor's mkfs founds its replica alone, and they must all hold the same secrets.
    /// Later secrets are random, made by the leader and replicated.
    pub fn derived(service: Service, key: &Secret, now_ms: u64) -> RotatingSecrets {
        let mk = |id: u64| RotatingSecret {
            id,
            secret: crate::crypto::derive(
                key,
                b"sluice-first-rotating-secrets",
                &[&[service as u8][..], &id.to_le_bytes()].concat(),
            ),
            created_ms: now_ms,
        };
        RotatingSecrets { service, entries: vec![mk(1), mk(2)] }
    }

    /// Rebuilds from entries a monitor sent (oldest first, consecutive ids).
    pub fn from_entries(
        service: Service,
        entries: Vec<RotatingSecret>,
    ) -> Result<RotatingSecrets, AuthError> {
        let ok = (2..=3).contains(&entries.len())
            && entries.windows(2).all(|w| w[1].id == w[0].id + 1)
            && entries[0].id > MON_SECRET_ID;
        if !ok {
            return Err(malformed("rotating secrets", "expected two or three consecutive secrets"));
        }
        Ok(RotatingSecrets { service, entries })
    }

    pub fn entries(&self) -> &[RotatingSecret] {
        &self.entries
    }

    /// The secret new tickets are sealed with.
    pub fn current(&self) -> &RotatingSecret {
        &self.entries[self.entries.len() - 2]
    }

    /// Makes the next secret current and a new next one; the old previous is forgotten.
    /// Returns the new current id.
    pub fn rotate(&mut self, now_ms: u64) -> u64 {
        let id = self.entries.last().expect("never empty").id + 1;
        self.advance(RotatingSecret { id, secret: Secret::generate(), created_ms: now_ms })
            .expect("the id follows the last one")
    }

    /// [`Self::rotate`] with the new next secret given (replicated state applies the
    /// secret the leader made, so every monitor holds the same). Returns the new
    /// current id.
    pub fn advance(&mut self, next: RotatingSecret) -> Result<u64, AuthError> {
        let last = self.entries.last().expect("never empty").id;
        if next.id != last + 1 {
            return Err(malformed(
                "rotating secret",
                format!("id {} does not follow the last one ({last})", next.id),
            ));
        }
        let now_ms = next.created_ms;
        self.entries.push(next);
        if self.entries.len() > 3 {
            self.entries.remove(0);
        }
        // The next secret was made earlier, so its age counts from becoming current.
        let n = self.entries.len();
        self.entries[n - 2].created_ms = now_ms;
        debug_assert!(self.entries.windows(2).all(|w| w[1].id == w[0].id + 1));
        Ok(self.current().id)
    }

    /// Whether the current secret has been current for at least `interval_ms`.
    pub fn rotation_due(&self, now_ms: u64, interval_ms: u64) -> bool {
        now_ms.saturating_sub(self.current().created_ms) >= interval_ms
    }

    /// The secret `id` if this holder still accepts it.
    pub fn accepting(&self, id: u64) -> Result<&Secret, AuthError> {
        let current = self.current().id;
        if let Some(e) = self.entries.iter().find(|e| e.id == id) {
            return Ok(&e.secret);
        }
        if id > current {
            return Err(AuthError::FutureSecret { service: self.service, secret_id: id, current });
        }
        Err(AuthError::StaleSecret { service: self.service, secret_id: id, current })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn ticket(service: Service, caps: &str, expires_ms: u64) -> AuthTicket {
        AuthTicket {
            entity: "client.alice".parse().unwrap(),
            global_id: 42,
            service,
            created_ms: 0,
            renew_after_ms: expires_ms / 2,
            expires_ms,
            caps: Caps::parse(service, caps).unwrap(),
        }
    }

    #[test]
    fn a_service_opens_its_tickets_and_nothing_else() {
        let mut osd = RotatingSecrets::new(Service::Osd, 0);
        let mon = RotatingSecrets::new(Service::Mon, 0);
        let sk = Secret::generate();
        let t = ticket(Service::Osd, "allow r", 1000);
        let cur = osd.current().clone();
        let blob = seal_ticket(cur.id, &cur.secret, &t, &sk);
        let (got, key) = open_ticket(&blob, Service::Osd, &osd, 10).unwrap();
        assert_eq!((got, key), (t.clone(), sk.clone()));
        // Expired.
        assert_eq!(
            open_ticket(&blob, Service::Osd, &osd, 1500),
            Err(AuthError::Expired { entity: "client.alice".into(), ago_ms: 500 })
        );
        // A ticket for the OSDs is useless at the monitors, even relabelled.
        assert_eq!(
            open_ticket(&blob, Service::Mon, &mon, 10),
            Err(AuthError::WrongService { want: Service::Mon, got: Service::Osd })
        );
        let relabelled = TicketBlob { service: Service::Mon, ..blob.clone() };
        assert!(open_ticket(&relabelled, Service::Mon, &mon, 10).is_err());
        // Tampered.
        let mut bad = blob.clone();
        let n = bad.sealed.len();
        bad.sealed[n / 2] ^= 1;
        assert_eq!(open_ticket(&bad, Service::Osd, &osd, 10), Err(AuthError::Unsealable("ticket")));
        // Previous secret accepted, two generations old rejected.
        assert_eq!(osd.rotate(100), 2);
        assert!(open_ticket(&blob, Service::Osd, &osd, 10).is_ok(), "previous secret refused");
        assert_eq!(osd.rotate(200), 3);
        assert_eq!(
            open_ticket(&blob, Service::Osd, &osd, 10),
            Err(AuthError::StaleSecret { service: Service::Osd, secret_id: 1, current: 3 })
        );
        assert_eq!(osd.entries().len(), 3);
        // A ticket sealed with the next secret (a monitor that rotated before this
        // service refreshed) is accepted; one beyond it is not known yet.
        let next = osd.entries()[2].clone();
        let early = seal_ticket(next.id, &next.secret, &t, &sk);
        assert!(open_ticket(&early, Service::Osd, &osd, 10).is_ok());
        let newer = TicketBlob { secret_id: 5, ..blob };
        assert!(matches!(
            open_ticket(&newer, Service::Osd, &osd, 10),
            Err(AuthError::FutureSecret { secret_id: 5, current: 3, .. })
        ));
    }

    #[test]
    fn first_secrets_derived_from_one_key_agree() {
        let k = Secret::generate();
        let (a, b) = (
            RotatingSecrets::derived(Service::Osd, &k, 1),
            RotatingSecrets::derived(Service::Osd, &k, 2),
        );
        assert_eq!(a.entries()[0].secret, b.entries()[0].secret);
        assert_eq!(a.entries()[1].secret, b.entries()[1].secret);
        assert_ne!(a.entries()[0].secret, a.entries()[1].secret);
        assert_ne!(
            a.entries()[0].secret,
            RotatingSecrets::derived(Service::Mon, &k, 1).entries()[0].secret
        );
        assert_ne!(
            a.entries()[0].secret,
            RotatingSecrets::derived(Service::Osd, &Secret::generate(), 1).entries()[0].secret
        );
    }

    #[test]
    fn rotation_schedule_and_rebuilding() {
        let mut s = RotatingSecrets::new(Service::Osd, 1000);
        assert!(!s.rotation_due(1500, 1000));
        assert!(s.rotation_due(2000, 1000));
        s.rotate(2000);
        assert!(!s.rotation_due(2500, 1000), "the new current secret's age starts now");
        let bad = RotatingSecret { id: 9, secret: Secret::generate(), created_ms: 3000 };
        assert!(s.clone().advance(bad).is_err(), "a gap in the ids");
        let copy = RotatingSecrets::from_entries(Service::Osd, s.entries().to_vec()).unwrap();
        assert_eq!(copy, s);
        assert!(RotatingSecrets::from_entries(Service::Osd, vec![]).is_err());
        // Decoding checks the same (a bad value cannot reach `current()`).
        let bin = postcard::to_allocvec(&s).unwrap();
        assert_eq!(postcard::from_bytes::<RotatingSecrets>(&bin).unwrap(), s);
        #[derive(serde::Serialize)]
        struct Raw {
            service: Service,
            entries: Vec<RotatingSecret>,
        }
        let one = postcard::to_allocvec(&Raw {
            service: Service::Osd,
            entries: s.entries()[..1].to_vec(),
        })
        .unwrap();
        assert!(postcard::from_bytes::<RotatingSecrets>(&one).is_err());
        assert!(RotatingSecrets::from_entries(Service::Osd, s.entries()[..1].to_vec()).is_err());
        let mut gap = s.entries().to_vec();
        gap[1].id += 1;
        assert!(RotatingSecrets::from_entries(Service::Osd, gap).is_err());
    }
}

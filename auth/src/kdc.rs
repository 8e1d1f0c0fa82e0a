//! Getting a session key and service tickets from the monitors (cephx phase I and II in
//! one exchange).
//!
//! 1. The monitor hands out a [`ServerChallenge`]. It keeps no state: the challenge
//!    carries a MAC under a key derived from the monitors' secret and an issue time, and
//!    is accepted for [`CHALLENGE_TTL_MS`].
//! 2. The client answers with a [`SessionKeyRequest`]: its own random challenge and a
//!    proof, a MAC under its secret over both challenges and its name, so the secret
//!    never travels and a recorded proof is worth nothing against a later challenge.
//! 3. The monitor checks the proof against its copy of the key ([`issue`]) and returns
//!    a fresh session key sealed under the client's secret (bound to the client's
//!    challenge, so only a holder of that key, a real monitor, could have made it: the
//!    client knows the monitor is genuine), the auth ticket sealed under the monitors'
//!    key (shown again to renew and keep the global id), and one service ticket per
//!    service asked for, each with its own session key sealed under the session key.
//!
//! Session keys are fresh on every issue, also on renewal.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::caps::{Caps, Service};
use crate::crypto;
use crate::entity::EntityName;
use crate::secret::{Secret, random_u64};
use crate::ticket::{
    AuthTicket, MON_SECRET_ID, RotatingSecrets, TicketBlob, open_ticket_with, seal_ticket,
};
use crate::{AuthError, malformed};

/// How long a monitor's challenge may be answered.
pub const CHALLENGE_TTL_MS: u64 = 60_000;
const KEY_INFO_VERSION: u16 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerChallenge {
    pub nonce: u64,
    pub issued_ms: u64,
    pub mac: [u8; 32],
}

fn challenge_key(mon_key: &Secret) -> Secret {
    crypto::derive(mon_key, b"sluice-challenge", b"")
}

/// A fresh challenge from a monitor holding `mon_key`.
pub fn make_challenge(mon_key: &Secret, now_ms: u64) -> ServerChallenge {
    let nonce = random_u64();
    let mac = crypto::mac(&challenge_key(mon_key), &[&nonce.to_le_bytes(), &now_ms.to_le_bytes()]);
    ServerChallenge { nonce, issued_ms: now_ms, mac }
}

fn check_challenge(mon_key: &Secret, c: &ServerChallenge, now_ms: u64) -> Result<(), AuthError> {
    let ours = crypto::verify_mac(
        &challenge_key(mon_key),
        &[&c.nonce.to_le_bytes(), &c.issued_ms.to_le_bytes()],
        &c.mac,
    );
    // A little slack for monitors whose clocks differ slightly (any monitor may answer).
    let fresh = c.issued_ms <= now_ms.saturating_add(5_000)
        && now_ms.saturating_sub(c.issued_ms) <= CHALLENGE_TTL_MS;
    if ours && fresh { Ok(()) } else { Err(AuthError::BadChallenge) }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionKeyRequest {
    pub entity: EntityName,
    pub server: ServerChallenge,
    pub client_challenge: u64,
    pub proof: [u8; 32],
    /// The auth ticket of an earlier session, to keep its global id.
    pub old_ticket: Option<TicketBlob>,
    /// The services to get tickets for.
    pub want: Vec<Service>,
}

fn proof_parts<'a>(entity: &'a str, server: &'a [u8; 8], client: &'a [u8; 8]) -> [&'a [u8]; 4] {
    [b"sluice-proof-1", entity.as_bytes(), server, client]
}

/// The client's answer to `server`.
pub fn request_session_key(
    entity: &EntityName,
    secret: &Secret,
    server: ServerChallenge,
    old_ticket: Option<TicketBlob>,
    want: &[Service],
) -> SessionKeyRequest {
    let client_challenge = random_u64();
    let name = entity.to_string();
    let proof = crypto::mac(
        secret,
        &proof_parts(&name, &server.nonce.to_le_bytes(), &client_challenge.to_le_bytes()),
    );
    SessionKeyRequest {
        entity: entity.clone(),
        server,
        client_challenge,
        proof,
        old_ticket,
        want: want.to_vec(),
    }
}

/// What the monitors hold about an entity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntityRecord {
    pub key: Secret,
    /// Caps per service; a service not listed grants nothing.
    pub caps: BTreeMap<Service, Caps>,
}

impl EntityRecord {
    pub fn caps_at(&self, s: Service) -> Caps {
        self.caps.get(&s).cloned().unwrap_or_else(|| Caps::none(s))
    }
}

/// A key and its validity, sealed for its holder.
#[derive(Serialize, Deserialize)]
struct KeyInfo {
    version: u16,
    key: Secret,
    global_id: u64,
    created_ms: u64,
    renew_after_ms: u64,
    expires_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantedTicket {
    pub service: Service,
    /// The ticket's session key and validity, sealed under the auth session key.
    pub sealed_key: Vec<u8>,
    pub blob: TicketBlob,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionKeyReply {
    pub global_id: u64,
    /// The auth session key and its validity, sealed under the entity's secret.
    pub sealed_session: Vec<u8>,
    /// For the monitors (renewal); sealed under their key.
    pub auth_ticket: TicketBlob,
    pub tickets: Vec<GrantedTicket>,
}

/// How long what a monitor issues lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IssuePolicy {
    /// Lifetime of session keys and tickets; also the rotation interval of service
    /// secrets (never rotate faster, or live tickets would lose their secret).
    pub ticket_ttl_ms: u64,
}

impl IssuePolicy {
    /// Holders renew at half the lifetime: a monitor outage of up to half a lifetime
    /// costs nothing.
    pub fn renew_after(&self, now_ms: u64) -> u64 {
        now_ms.saturating_add(self.ticket_ttl_ms / 2)
    }
}

fn session_aad(entity: &str, client_challenge: u64) -> Vec<u8> {
    [b"sluice-session-1".as_slice(), entity.as_bytes(), &client_challenge.to_le_bytes()].concat()
}

fn service_key_aad(service: Service, global_id: u64) -> Vec<u8> {
    [b"sluice-svc-key-1".as_slice(), &[service as u8], &global_id.to_le_bytes()].concat()
}

fn seal_key_info(key: &Secret, aad: &[u8], info: &KeyInfo) -> Vec<u8> {
    let plain = zeroize::Zeroizing::new(postcard::to_allocvec(info).expect("key info serializes"));
    crypto::seal(key, aad, &plain)
}

fn open_key_info(
    key: &Secret,
    aad: &[u8],
    sealed: &[u8],
    what: &'static str,
) -> Result<KeyInfo, AuthError> {
    let plain = zeroize::Zeroizing::new(crypto::open(key, aad, sealed, what)?);
    let info: KeyInfo = postcard::from_bytes(&plain).map_err(|e| malformed(what, e))?;
    if info.version != KEY_INFO_VERSION {
        return Err(malformed(what, format!("version {} is unknown", info.version)));
    }
    Ok(info)
}

/// The monitor's side: checks `req` and issues the session key and tickets.
/// `rotating` holds each service's secrets; `new_global_id` assigns an id to an entity
/// that does not renew.
pub fn issue(
    req: &SessionKeyRequest,
    mon_key: &Secret,
    lookup: impl FnOnce(&EntityName) -> Option<EntityRecord>,
    rotating: &BTreeMap<Service, RotatingSecrets>,
    new_global_id: impl FnOnce() -> u64,
    policy: IssuePolicy,
    now_ms: u64,
) -> Result<SessionKeyReply, AuthError> {
    check_challenge(mon_key, &req.server, now_ms)?;
    let name = req.entity.to_string();
    let rec = lookup(&req.entity).ok_or_else(|| AuthError::UnknownEntity(name.clone()))?;
    let (server_nonce, client_nonce) =
        (req.server.nonce.to_le_bytes(), req.client_challenge.to_le_bytes());
    let parts = proof_parts(&name, &server_nonce, &client_nonce);
    if !crypto::verify_mac(&rec.key, &parts, &req.proof) {
        return Err(AuthError::WrongKey(name));
    }
    // Renewal keeps the global id if the old ticket is genuinely this entity's (even if
    // it expired meanwhile); anything else gets a new one.
    let renewed = req.old_ticket.as_ref().and_then(|b| {
        if b.secret_id != MON_SECRET_ID {
            return None;
        }
        let (t, _) = open_ticket_with(b, Service::Mon, mon_key, 0).ok()?;
        (t.entity == req.entity).then_some(t.global_id)
    });
    let global_id = renewed.unwrap_or_else(new_global_id);
    let expires_ms = now_ms.saturating_add(policy.ticket_ttl_ms);
    let renew_after_ms = policy.renew_after(now_ms);
    let ticket_for = |service| AuthTicket {
        entity: req.entity.clone(),
        global_id,
        service,
        created_ms: now_ms,
        renew_after_ms,
        expires_ms,
        caps: rec.caps_at(service),
    };
    let info = |key: &Secret| KeyInfo {
        version: KEY_INFO_VERSION,
        key: key.clone(),
        global_id,
        created_ms: now_ms,
        renew_after_ms,
        expires_ms,
    };
    let session_key = Secret::generate();
    let sealed_session =
        seal_key_info(&rec.key, &session_aad(&name, req.client_challenge), &info(&session_key));
    let auth_ticket = seal_ticket(MON_SECRET_ID, mon_key, &ticket_for(Service::Mon), &session_key);
    let mut tickets = Vec::new();
    let mut want = req.want.clone();
    want.sort();
    want.dedup();
    for service in want {
        let Some(secrets) = rotating.get(&service) else { continue };
        let key = Secret::generate();
        let cur = secrets.current();
        tickets.push(GrantedTicket {
            service,
            sealed_key: seal_key_info(
                &session_key,
                &service_key_aad(service, global_id),
                &info(&key),
            ),
            blob: seal_ticket(cur.id, &cur.secret, &ticket_for(service), &key),
        });
    }
    Ok(SessionKeyReply { global_id, sealed_session, auth_ticket, tickets })
}

/// A ticket for one service and the session key that goes with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceTicket {
    pub service: Service,
    pub global_id: u64,
    pub blob: TicketBlob,
    pub session_key: Secret,
    pub renew_after_ms: u64,
    pub expires_ms: u64,
}

/// What a client holds after authenticating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub entity: EntityName,
    pub global_id: u64,
    pub session_key: Secret,
    pub auth_ticket: TicketBlob,
    pub renew_after_ms: u64,
    pub expires_ms: u64,
    pub tickets: BTreeMap<Service, ServiceTicket>,
}

impl Credentials {
    pub fn ticket(&self, s: Service) -> Result<&ServiceTicket, AuthError> {
        self.tickets.get(&s).ok_or(AuthError::NoTicket(s))
    }

    /// Whether it is time to renew (half the lifetime has passed).
    pub fn renewal_due(&self, now_ms: u64) -> bool {
        now_ms >= self.renew_after_ms
    }
}

/// The client's side: opens the monitor's reply to `req` with the entity's secret. An
/// error here means the reply did not come from a holder of our key (or was damaged).
pub fn open_reply(
    secret: &Secret,
    req: &SessionKeyRequest,
    reply: &SessionKeyReply,
) -> Result<Credentials, AuthError> {
    let name = req.entity.to_string();
    let s = open_key_info(
        secret,
        &session_aad(&name, req.client_challenge),
        &reply.sealed_session,
        "session key",
    )?;
    if s.global_id != reply.global_id {
        return Err(malformed("session key", "global id differs from the reply's"));
    }
    let mut tickets = BTreeMap::new();
    for g in &reply.tickets {
        let k = open_key_info(
            &s.key,
            &service_key_aad(g.service, s.global_id),
            &g.sealed_key,
            "service key",
        )?;
        if g.blob.service != g.service {
            return Err(malformed("service ticket", "blob is for another service"));
        }
        tickets.insert(
            g.service,
            ServiceTicket {
                service: g.service,
                global_id: s.global_id,
                blob: g.blob.clone(),
                session_key: k.key,
                renew_after_ms: k.renew_after_ms,
                expires_ms: k.expires_ms,
            },
        );
    }
    Ok(Credentials {
        entity: req.entity.clone(),
        global_id: s.global_id,
        session_key: s.key,
        auth_ticket: reply.auth_ticket.clone(),
        renew_after_ms: s.renew_after_ms,
        expires_ms: s.expires_ms,
        tickets,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ticket::open_ticket;

    pub(crate) struct Kdc {
        pub mon_key: Secret,
        pub db: BTreeMap<EntityName, EntityRecord>,
        pub rotating: BTreeMap<Service, RotatingSecrets>,
        pub next_gid: u64,
        pub policy: IssuePolicy,
    }

    impl Kdc {
        pub(crate) fn new() -> Kdc {
            let rotating =
                Service::ALL.into_iter().map(|s| (s, RotatingSecrets::new(s, 0))).collect();
            Kdc {
                mon_key: Secret::generate(),
                db: BTreeMap::new(),
                rotating,
                next_gid: 100,
                policy: IssuePolicy { ticket_ttl_ms: 3_600_000 },
            }
        }

        pub(crate) fn add(&mut self, name: &str, osd_caps: &str) -> (EntityName, Secret) {
            let e: EntityName = name.parse().unwrap();
            let key = Secret::generate();
            let caps = [
                (Service::Mon, Caps::parse(Service::Mon, "allow r").unwrap()),
                (Service::Osd, Caps::parse(Service::Osd, osd_caps).unwrap()),
            ]
            .into_iter()
            .collect();
            self.db.insert(e.clone(), EntityRecord { key: key.clone(), caps });
            (e, key)
        }

        pub(crate) fn issue(
            &mut self,
            req: &SessionKeyRequest,
            now_ms: u64,
        ) -> Result<SessionKeyReply, AuthError> {
            let gid = &mut self.next_gid;
            issue(
                req,
                &self.mon_key,
                |e| self.db.get(e).cloned(),
                &self.rotating,
                || {
                    *gid += 1;
                    *gid
                },
                self.policy,
                now_ms,
            )
        }

        /// A full login at `now_ms` for the OSD service.
        pub(crate) fn login(&mut self, e: &EntityName, key: &Secret, now_ms: u64) -> Credentials {
            let c = make_challenge(&self.mon_key, now_ms);
            let req = request_session_key(e, key, c, None, &[Service::Osd]);
            let reply = self.issue(&req, now_ms).unwrap();
            open_reply(key, &req, &reply).unwrap()
        }
    }

    #[test]
    fn a_client_logs_in_and_an_osd_reads_its_ticket() {
        let mut kdc = Kdc::new();
        let (alice, key) = kdc.add("client.alice", "allow r pool=a");
        let creds = kdc.login(&alice, &key, 1000);
        assert_eq!(creds.global_id, 101);
        let t = creds.ticket(Service::Osd).unwrap();
        let (ticket, sk) =
            open_ticket(&t.blob, Service::Osd, &kdc.rotating[&Service::Osd], 2000).unwrap();
        assert_eq!(sk, t.session_key);
        assert_eq!(ticket.entity, alice);
        assert_eq!(ticket.caps.to_string(), "allow r pool=a");
        assert_eq!(ticket.expires_ms, 1000 + 3_600_000);
        assert!(!creds.renewal_due(1000 + 1_799_999));
        assert!(creds.renewal_due(1000 + 1_800_000));
        assert_eq!(creds.ticket(Service::Mon), Err(AuthError::NoTicket(Service::Mon)));
    }

    #[test]
    fn wrong_key_unknown_entity_and_stale_challenges_are_refused() {
        let mut kdc = Kdc::new();
        let (alice, _key) = kdc.add("client.alice", "allow r");
        let c = make_challenge(&kdc.mon_key, 0);
        let req =
            request_session_key(&alice, &Secret::generate(), c.clone(), None, &[Service::Osd]);
        assert_eq!(kdc.issue(&req, 0), Err(AuthError::WrongKey("client.alice".into())));
        let bob: EntityName = "client.bob".parse().unwrap();
        let req = request_session_key(&bob, &Secret::generate(), c.clone(), None, &[]);
        assert_eq!(kdc.issue(&req, 0), Err(AuthError::UnknownEntity("client.bob".into())));
        // A challenge another monitor cluster made, or an old one.
        let (alice, key) = kdc.add("client.alice", "allow r");
        let foreign = make_challenge(&Secret::generate(), 0);
        let req = request_session_key(&alice, &key, foreign, None, &[]);
        assert_eq!(kdc.issue(&req, 0), Err(AuthError::BadChallenge));
        let req = request_session_key(&alice, &key, c.clone(), None, &[]);
        assert_eq!(kdc.issue(&req, CHALLENGE_TTL_MS + 1), Err(AuthError::BadChallenge));
        let mut forged = c;
        forged.issued_ms += 1;
        let req = request_session_key(&alice, &key, forged, None, &[]);
        assert_eq!(kdc.issue(&req, 0), Err(AuthError::BadChallenge));
    }

    #[test]
    fn renewal_keeps_the_global_id_with_fresh_keys() {
        let mut kdc = Kdc::new();
        let (alice, key) = kdc.add("client.alice", "allow rw");
        let first = kdc.login(&alice, &key, 0);
        let c = make_challenge(&kdc.mon_key, 10);
        let req =
            request_session_key(&alice, &key, c, Some(first.auth_ticket.clone()), &[Service::Osd]);
        let second = open_reply(&key, &req, &kdc.issue(&req, 10).unwrap()).unwrap();
        assert_eq!(second.global_id, first.global_id);
        assert_ne!(second.session_key, first.session_key);
        assert_ne!(
            second.ticket(Service::Osd).unwrap().session_key,
            first.ticket(Service::Osd).unwrap().session_key
        );
        // Another entity's old ticket does not hand over its global id.
        let (bob, bkey) = kdc.add("client.bob", "allow r");
        let c = make_challenge(&kdc.mon_key, 20);
        let req = request_session_key(&bob, &bkey, c, Some(first.auth_ticket), &[]);
        assert_ne!(kdc.issue(&req, 20).unwrap().global_id, first.global_id);
    }

    #[test]
    fn a_client_rejects_a_reply_not_made_with_its_key() {
        let mut kdc = Kdc::new();
        let (alice, key) = kdc.add("client.alice", "allow r");
        let c = make_challenge(&kdc.mon_key, 0);
        let req = request_session_key(&alice, &key, c, None, &[Service::Osd]);
        let reply = kdc.issue(&req, 0).unwrap();
        assert!(open_reply(&Secret::generate(), &req, &reply).is_err());
        // A reply to another request (replayed by an impostor) does not open either.
        let c = make_challenge(&kdc.mon_key, 0);
        let other = request_session_key(&alice, &key, c, None, &[Service::Osd]);
        assert_eq!(open_reply(&key, &other, &reply), Err(AuthError::Unsealable("session key")));
        let mut tampered = reply.clone();
        tampered.tickets[0].sealed_key[20] ^= 1;
        assert_eq!(open_reply(&key, &req, &tampered), Err(AuthError::Unsealable("service key")));
    }
}

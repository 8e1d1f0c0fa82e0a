//! The monitors' side of authentication (DESIGN.md section 6): the key database and the
//! services' rotating secrets, replicated with the maps, and the key center's exchange
//! (`sluice_auth::kdc`) served by every monitor from its replica.
//!
//! * **Bootstrap.** `sluice-mon mkfs --keyring FILE` founds the database from a keyring
//!   holding the monitors' own key (`mon.`) and, usually, `client.admin` with its caps;
//!   it creates that keyring (mode 0600) when FILE does not exist yet, so the first
//!   monitor's mkfs makes it and the others are given the same file.
//! * **Rotation.** The leader replaces each service's secret every ticket lifetime
//!   (`auth_service_ticket_ttl`, seconds, central config; default one hour) through a
//!   replicated command carrying the new secret, so every monitor seals with the same
//!   one; services accept the previous, current and next (`sluice_auth::ticket`).
//! * **Logins** read the replica only (no Raft write): the challenge is stateless, a
//!   global id is random.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sluice_auth::caps::{Caps, Service};
use sluice_auth::kdc::{EntityRecord, IssuePolicy};
use sluice_auth::keyring::{Keyring, KeyringEntry, KeyringError};
use sluice_auth::ticket::RotatingSecret;
use sluice_auth::{EntityName, RotatingSecrets, Secret};

/// Central config key of the ticket lifetime and rotation interval, in seconds.
pub const TTL_KEY: &str = "auth_service_ticket_ttl";
pub const DEFAULT_TTL_S: f64 = 3600.0;
/// The shortest lifetime accepted (tests use a few seconds; production, hours).
pub const MIN_TTL_S: f64 = 2.0;
/// The longest (a leaked secret works up to two lifetimes).
pub const MAX_TTL_S: f64 = 30.0 * 86400.0;

/// The replicated key database.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AuthState {
    pub entities: BTreeMap<EntityName, EntityRecord>,
    pub rotating: BTreeMap<Service, RotatingSecrets>,
}

impl AuthState {
    /// The database founded by a bootstrap keyring, which must hold `mon.`.
    pub fn bootstrap(keyring: &Keyring, now_ms: u64) -> Result<AuthState, String> {
        let Some(mon) = keyring.get(&EntityName::mon()) else {
            return Err("the bootstrap keyring has no key for mon. (the monitors' own)".into());
        };
        let entities = keyring
            .iter()
            .map(|(n, e)| (n.clone(), EntityRecord { key: e.key.clone(), caps: e.caps.clone() }))
            .collect();
        // Every monitor's mkfs runs alone: the first secrets come from the shared key.
        let rotating = Service::ALL
            .into_iter()
            .map(|s| (s, RotatingSecrets::derived(s, &mon.key, now_ms)))
            .collect();
        Ok(AuthState { entities, rotating })
    }

    /// The monitors' own key, which seals auth tickets and challenges (`None`: a cluster
    /// made without a keyring, which can only run with `auth = "none"`).
    pub fn mon_key(&self) -> Option<&Secret> {
        self.entities.get(&EntityName::mon()).map(|r| &r.key)
    }

    /// Applies a rotation the leader proposed.
    pub fn rotate(&mut self, service: Service, next: RotatingSecret) -> Result<u64, String> {
        let r = self.rotating.get_mut(&service).ok_or_else(|| format!("no {service} secrets"))?;
        r.advance(next).map_err(|e| e.to_string())
    }

    /// The rotations due at `now_ms` with lifetime `ttl_ms`, each with its new secret.
    pub fn rotations_due(&self, now_ms: u64, ttl_ms: u64) -> Vec<(Service, RotatingSecret)> {
        self.rotating
            .iter()
            .filter(|(_, r)| r.rotation_due(now_ms, ttl_ms))
            .map(|(s, r)| {
                let id = r.entries().last().expect("never empty").id + 1;
                (*s, RotatingSecret { id, secret: Secret::generate(), created_ms: now_ms })
            })
            .collect()
    }
}

/// A request to the key database (`POST /v1/auth/command`, signed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthOp {
    /// A new entity with a new key; refused if it exists.
    Add {
        entity: EntityName,
        caps: BTreeMap<Service, String>,
    },
    /// The entity as it is, or a new one like `Add`.
    GetOrCreate {
        entity: EntityName,
        caps: BTreeMap<Service, String>,
    },
    Get {
        entity: EntityName,
    },
    /// Entities and caps, no keys.
    Ls,
    Rm {
        entity: EntityName,
    },
    /// Replaces the caps (in effect at the entity's next ticket renewal).
    Caps {
        entity: EntityName,
        caps: BTreeMap<Service, String>,
    },
}

/// The answer, sealed under the caller's session key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthAnswer {
    Entity { entity: EntityName, key: Secret, caps: BTreeMap<Service, String>, created: bool },
    List(Vec<(EntityName, BTreeMap<Service, String>)>),
    Done,
}

impl AuthAnswer {
    pub fn entity(entity: EntityName, r: &EntityRecord, created: bool) -> AuthAnswer {
        AuthAnswer::Entity { entity, key: r.key.clone(), caps: caps_text(&r.caps), created }
    }
}

/// Caps as text, per service.
pub fn caps_text(caps: &BTreeMap<Service, Caps>) -> BTreeMap<Service, String> {
    caps.iter().map(|(s, c)| (*s, c.to_string())).collect()
}

/// Parses caps given as text; a malformed one is refused (before anything is stored).
pub fn parse_caps(caps: &BTreeMap<Service, String>) -> Result<BTreeMap<Service, Caps>, String> {
    caps.iter()
        .map(|(s, t)| Caps::parse(*s, t).map(|c| (*s, c)).map_err(|e| e.to_string()))
        .collect()
}

/// The ticket lifetime from the central config.
pub fn policy(config: &BTreeMap<String, String>) -> IssuePolicy {
    let s = crate::api::config_secs(config, TTL_KEY, DEFAULT_TTL_S).clamp(MIN_TTL_S, MAX_TTL_S);
    IssuePolicy { ticket_ttl_ms: (s * 1000.0) as u64 }
}

/// The bootstrap keyring at `path`: loaded if it exists, else created (`mon.` and
/// `client.admin` with all caps) with mode 0600. Returns it and whether it was created.
pub fn bootstrap_keyring(path: &Path) -> Result<(Keyring, bool), KeyringError> {
    if path.exists() {
        return Ok((Keyring::load(path)?, false));
    }
    let mut k = Keyring::new();
    k.insert(EntityName::mon(), KeyringEntry::new(Secret::generate()));
    let mut admin = KeyringEntry::new(Secret::generate());
    for s in Service::ALL {
        admin.caps.insert(s, Caps::parse(s, "allow *").expect("valid caps"));
    }
    k.insert(EntityName::client("admin").expect("valid name"), admin);
    k.save(path)?;
    Ok((k, true))
}

pub use sluice_auth::wall_ms;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bootstrap_keyring_is_made_once_and_founds_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bootstrap.keyring");
        let (k, created) = bootstrap_keyring(&path).unwrap();
        assert!(created);
        let (again, created) = bootstrap_keyring(&path).unwrap();
        assert!(!created);
        assert_eq!(again, k, "the second monitor gets the same keys");
        // ... and, founding its replica alone, the same rotating secrets.
        let (one, two) =
            (AuthState::bootstrap(&k, 1).unwrap(), AuthState::bootstrap(&again, 2).unwrap());
        for s in Service::ALL {
            let ids = |st: &AuthState| {
                st.rotating[&s].entries().iter().map(|e| e.secret.clone()).collect::<Vec<_>>()
            };
            assert_eq!(ids(&one), ids(&two), "{s}");
        }
        let st = AuthState::bootstrap(&k, 1000).unwrap();
        assert_eq!(st.mon_key(), Some(&k.get(&EntityName::mon()).unwrap().key));
        let admin = &st.entities[&EntityName::client("admin").unwrap()];
        assert!(admin.caps_at(Service::Osd).allows(sluice_auth::Perms::ALL, Some("any")));
        assert_eq!(st.rotating.len(), 2);
        let mut no_mon = Keyring::new();
        no_mon.insert(EntityName::client("x").unwrap(), KeyringEntry::new(Secret::generate()));
        assert!(AuthState::bootstrap(&no_mon, 0).unwrap_err().contains("mon."));
    }

    #[test]
    fn rotations_come_due_once_per_lifetime_and_apply_in_order() {
        let k = bootstrap_keyring(&tempfile::tempdir().unwrap().path().join("k")).unwrap().0;
        let mut st = AuthState::bootstrap(&k, 0).unwrap();
        assert!(st.rotations_due(500, 1000).is_empty());
        let due = st.rotations_due(1000, 1000);
        assert_eq!(due.len(), 2);
        for (s, next) in due.clone() {
            assert_eq!(st.rotate(s, next).unwrap(), 2);
        }
        assert!(st.rotations_due(1500, 1000).is_empty());
        // The same proposal applied twice (a retried command) is refused, not doubled.
        let (s, next) = due[0].clone();
        assert!(st.rotate(s, next).is_err());
        let p = policy(&BTreeMap::from([(TTL_KEY.to_string(), "0.1".to_string())]));
        assert_eq!(p.ticket_ttl_ms, 2000, "lifetimes are clamped to the minimum");
        let p = policy(&BTreeMap::from([(TTL_KEY.to_string(), "1e300".to_string())]));
        assert_eq!(p.ticket_ttl_ms, (MAX_TTL_S * 1000.0) as u64, "and to the maximum");
    }
}

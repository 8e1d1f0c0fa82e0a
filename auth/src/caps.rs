//! Capabilities: what an entity may do at each service, checked on every op against the
//! caps inside its verified ticket (never against anything the peer claims).
//!
//! ```text
//! caps    := "" | grant ((","|";") grant)*
//! grant   := "allow" perms [pool] | ["allow"] "profile" NAME [pool]
//! perms   := "*" | one or more of r, w, x (e.g. r, rw, rwx)
//! pool    := "pool=" NAME
//! ```
//!
//! At an OSD: `r` reads (read, stat, getxattr, list), `w` writes (write, write_full,
//! setxattr, delete), `x` runs object class methods, `*` is everything including
//! maintenance (scrub, repair). At a monitor: `r` reads maps, status and health, `w`
//! changes maps (pools, OSD state), `x` is what daemons do (boot, beacons, failure
//! reports, fetching rotating secrets), `*` is everything including the key database.
//! A grant with `pool=NAME` applies only to ops on that pool.
//!
//! Profiles: `profile admin` is `allow *`; `profile read-only` is `allow r`; `profile
//! osd` is `allow rwx` at an OSD (replication between OSDs) and `allow rx` at a monitor;
//! `profile bootstrap-osd` (at a monitor) may register new OSDs and grants nothing else.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A service type: what a ticket is for and whose caps apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Service {
    Mon,
    Osd,
}

impl Service {
    pub const ALL: [Service; 2] = [Service::Mon, Service::Osd];

    pub fn as_str(self) -> &'static str {
        match self {
            Service::Mon => "mon",
            Service::Osd => "osd",
        }
    }

    pub fn parse(s: &str) -> Option<Service> {
        Service::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Perms(u8);

impl Perms {
    pub const NONE: Perms = Perms(0);
    pub const R: Perms = Perms(1);
    pub const W: Perms = Perms(2);
    pub const X: Perms = Perms(4);
    /// What only `*` grants (maintenance at an OSD, the key database at a monitor).
    pub const ADMIN: Perms = Perms(8);
    pub const RW: Perms = Perms(3);
    pub const ALL: Perms = Perms(15);

    pub fn union(self, o: Perms) -> Perms {
        Perms(self.0 | o.0)
    }

    pub fn contains(self, o: Perms) -> bool {
        self.0 & o.0 == o.0
    }

    pub fn without(self, o: Perms) -> Perms {
        Perms(self.0 & !o.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for Perms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.contains(Perms::ADMIN) {
            return f.write_str("*");
        }
        for (p, c) in [(Perms::R, 'r'), (Perms::W, 'w'), (Perms::X, 'x')] {
            if self.contains(p) {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Profile {
    Admin,
    ReadOnly,
    Osd,
    /// Registers new OSDs (and nothing else): what `sluice-osd`'s first run uses.
    BootstrapOsd,
}

impl Profile {
    fn parse(s: &str) -> Option<Profile> {
        match s {
            "admin" => Some(Profile::Admin),
            "read-only" => Some(Profile::ReadOnly),
            "osd" => Some(Profile::Osd),
            "bootstrap-osd" => Some(Profile::BootstrapOsd),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Profile::Admin => "admin",
            Profile::ReadOnly => "read-only",
            Profile::Osd => "osd",
            Profile::BootstrapOsd => "bootstrap-osd",
        }
    }

    /// What the profile grants at `service` (see the module documentation).
    pub fn perms(self, service: Service) -> Perms {
        match (self, service) {
            (Profile::Admin, _) => Perms::ALL,
            (Profile::ReadOnly, _) => Perms::R,
            (Profile::Osd, Service::Osd) => Perms::R.union(Perms::W).union(Perms::X),
            (Profile::Osd, Service::Mon) => Perms::R.union(Perms::X),
            // Checked by name where OSDs are registered; grants nothing else.
            (Profile::BootstrapOsd, _) => Perms::NONE,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Grant {
    Allow { perms: Perms, pool: Option<String> },
    Profile { profile: Profile, pool: Option<String> },
}

impl Grant {
    fn pool(&self) -> Option<&str> {
        match self {
            Grant::Allow { pool, .. } | Grant::Profile { pool, .. } => pool.as_deref(),
        }
    }

    fn perms(&self, service: Service) -> Perms {
        match self {
            Grant::Allow { perms, .. } => *perms,
            Grant::Profile { profile, .. } => profile.perms(service),
        }
    }
}

/// An entity's caps at one service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Caps {
    service: Service,
    grants: Vec<Grant>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad {service} caps {text:?}: {why}")]
pub struct BadCaps {
    pub service: Service,
    pub text: String,
    pub why: String,
}

/// An op needed more than the caps grant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("permission denied: needs {service} 'allow {need}{}' (has {service} '{have}')",
    pool.as_ref().map(|p| format!(" pool={p}")).unwrap_or_default())]
pub struct Denied {
    pub service: Service,
    /// The permissions that were missing.
    pub need: Perms,
    pub pool: Option<String>,
    /// The caps held, as text.
    pub have: String,
}

/// Longest caps text accepted.
pub const MAX_CAPS_BYTES: usize = 4096;

fn valid_pool_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

impl Caps {
    /// No permissions at `service`.
    pub fn none(service: Service) -> Caps {
        Caps { service, grants: Vec::new() }
    }

    pub fn service(&self) -> Service {
        self.service
    }

    pub fn grants(&self) -> &[Grant] {
        &self.grants
    }

    pub fn parse(service: Service, text: &str) -> Result<Caps, BadCaps> {
        let bad = |why: String| BadCaps { service, text: text.to_string(), why };
        if text.len() > MAX_CAPS_BYTES {
            return Err(bad(format!("longer than {MAX_CAPS_BYTES} bytes")));
        }
        let mut grants = Vec::new();
        for part in text.split([',', ';']) {
            let words: Vec<&str> = part.split_whitespace().collect();
            if words.is_empty() {
                if text.trim().is_empty() {
                    break;
                }
                return Err(bad("an empty grant (two separators in a row?)".into()));
            }
            let mut w = words.as_slice();
            let allow = w.first() == Some(&"allow");
            if allow {
                w = &w[1..];
            }
            enum Head {
                Profile(Profile),
                Perms(Perms),
            }
            let (head, rest) = match w {
                ["profile", name, rest @ ..] => {
                    let p = Profile::parse(name).ok_or_else(|| {
                        bad(format!(
                            "unknown profile {name:?} (known: admin, read-only, osd, bootstrap-osd)"
                        ))
                    })?;
                    (Head::Profile(p), rest)
                }
                ["profile"] => return Err(bad("'profile' needs a name".into())),
                [perms, rest @ ..] if allow => {
                    let p = parse_perms(perms).ok_or_else(|| {
                        bad(format!(
                            "{perms:?} is not a permission (expected r, w, x, rw, rwx or *)"
                        ))
                    })?;
                    (Head::Perms(p), rest)
                }
                [] if allow => return Err(bad("'allow' needs permissions, e.g. allow r".into())),
                [first, ..] => {
                    return Err(bad(format!(
                        "a grant starts with 'allow' or 'profile', not {first:?}"
                    )));
                }
                [] => unreachable!("words is not empty"),
            };
            let pool = match rest {
                [] => None,
                [p] => match p.strip_prefix("pool=") {
                    Some(name) if valid_pool_name(name) => Some(name.to_string()),
                    Some(name) => return Err(bad(format!("{name:?} is not a pool name"))),
                    None => {
                        return Err(bad(format!("unexpected {p:?} (only pool=NAME may follow)")));
                    }
                },
                [_, extra, ..] => {
                    return Err(bad(format!("unexpected {extra:?} at the end of a grant")));
                }
            };
            grants.push(match head {
                Head::Profile(profile) => Grant::Profile { profile, pool },
                Head::Perms(perms) => Grant::Allow { perms, pool },
            });
        }
        Ok(Caps { service, grants })
    }

    /// What the caps grant for an op on `pool` (`None`: an op on no particular pool,
    /// which only grants without a pool restriction cover).
    pub fn perms_for(&self, pool: Option<&str>) -> Perms {
        self.grants
            .iter()
            .filter(|g| g.pool().is_none() || (pool.is_some() && g.pool() == pool))
            .fold(Perms::NONE, |acc, g| acc.union(g.perms(self.service)))
    }

    /// Whether a grant is `profile NAME` (on any pool).
    pub fn has_profile(&self, profile: Profile) -> bool {
        self.grants.iter().any(|g| matches!(g, Grant::Profile { profile: p, .. } if *p == profile))
    }

    pub fn allows(&self, need: Perms, pool: Option<&str>) -> bool {
        self.perms_for(pool).contains(need)
    }

    /// `Ok` if the caps grant `need` on `pool`, else which permissions are missing.
    pub fn check(&self, need: Perms, pool: Option<&str>) -> Result<(), Denied> {
        let have = self.perms_for(pool);
        if have.contains(need) {
            return Ok(());
        }
        Err(Denied {
            service: self.service,
            need: need.without(have),
            pool: pool.map(str::to_string),
            have: self.to_string(),
        })
    }
}

fn parse_perms(s: &str) -> Option<Perms> {
    if s == "*" {
        return Some(Perms::ALL);
    }
    let mut p = Perms::NONE;
    for c in s.chars() {
        let bit = match c {
            'r' => Perms::R,
            'w' => Perms::W,
            'x' => Perms::X,
            _ => return None,
        };
        if p.contains(bit) {
            return None;
        }
        p = p.union(bit);
    }
    (!p.is_empty()).then_some(p)
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Grant::Allow { perms, .. } => write!(f, "allow {perms}")?,
            Grant::Profile { profile, .. } => write!(f, "profile {}", profile.as_str())?,
        }
        if let Some(p) = self.pool() {
            write!(f, " pool={p}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Caps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, g) in self.grants.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{g}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn osd(t: &str) -> Caps {
        Caps::parse(Service::Osd, t).unwrap()
    }

    #[test]
    fn grants_and_pools() {
        let c = osd("allow r, allow rw pool=a");
        assert!(c.allows(Perms::R, Some("b")));
        assert!(c.allows(Perms::RW, Some("a")));
        assert!(!c.allows(Perms::W, Some("b")));
        assert!(c.allows(Perms::R, None));
        assert!(!c.allows(Perms::W, None), "a pool grant does not cover pool-less ops");
        let e = c.check(Perms::RW, Some("b")).unwrap_err();
        assert_eq!(e.need, Perms::W);
        assert_eq!(
            e.to_string(),
            "permission denied: needs osd 'allow w pool=b' (has osd 'allow r, allow rw pool=a')"
        );
        assert!(osd("").check(Perms::R, Some("a")).is_err());
        assert!(osd("allow *").allows(Perms::ALL, Some("x")));
        assert!(!osd("allow rwx").allows(Perms::ADMIN, Some("x")), "only * grants admin");
    }

    #[test]
    fn profiles_expand_to_their_documented_sets() {
        assert_eq!(osd("profile admin").perms_for(None), Perms::ALL);
        assert_eq!(osd("allow profile read-only").perms_for(None), Perms::R);
        assert_eq!(osd("profile osd").perms_for(None), Perms::R.union(Perms::W).union(Perms::X));
        let boot = Caps::parse(Service::Mon, "profile bootstrap-osd").unwrap();
        assert_eq!(boot.perms_for(None), Perms::NONE);
        assert!(boot.has_profile(Profile::BootstrapOsd));
        assert!(!Caps::parse(Service::Mon, "allow *").unwrap().has_profile(Profile::BootstrapOsd));
        let mon = Caps::parse(Service::Mon, "profile osd").unwrap();
        assert_eq!(mon.perms_for(None), Perms::R.union(Perms::X));
        assert_eq!(osd("profile read-only pool=a").perms_for(Some("b")), Perms::NONE);
    }

    #[test]
    fn malformed_caps_are_rejected_with_the_reason() {
        for (t, why) in [
            ("allow", "needs permissions"),
            ("allow q", "not a permission"),
            ("allow rr", "not a permission"),
            ("permit r", "starts with 'allow'"),
            ("allow r pool", "only pool=NAME"),
            ("allow r pool=", "not a pool name"),
            ("allow r pool=a b", "at the end"),
            ("allow r,, allow w", "empty grant"),
            ("profile", "needs a name"),
            ("profile root", "unknown profile"),
        ] {
            let e = Caps::parse(Service::Osd, t).unwrap_err();
            assert!(e.to_string().contains(why), "{t:?}: {e}");
        }
    }

    fn grant() -> impl Strategy<Value = Grant> {
        let pool = proptest::option::of("[a-z0-9_.-]{1,12}");
        prop_oneof![
            (1u8..16, pool.clone()).prop_map(|(b, pool)| {
                let perms = if b & 8 != 0 { Perms::ALL } else { Perms(b & 7).union(Perms::R) };
                Grant::Allow { perms, pool }
            }),
            (0..4usize, pool).prop_map(|(i, pool)| {
                let profile =
                    [Profile::Admin, Profile::ReadOnly, Profile::Osd, Profile::BootstrapOsd][i];
                Grant::Profile { profile, pool }
            }),
        ]
    }

    proptest! {
        #[test]
        fn caps_print_and_parse_back(grants in proptest::collection::vec(grant(), 0..5)) {
            let c = Caps { service: Service::Osd, grants };
            prop_assert_eq!(Caps::parse(Service::Osd, &c.to_string()).unwrap(), c);
        }

        #[test]
        fn parsing_anything_never_panics(t in ".{0,60}") {
            if let Ok(c) = Caps::parse(Service::Mon, &t) {
                // What parses prints as something that parses to the same caps.
                prop_assert_eq!(Caps::parse(Service::Mon, &c.to_string()).unwrap(), c);
            }
        }
    }
}

//! Entity names: `mon.` (the monitors' shared key), `mon.NAME`, `osd.N`, `client.NAME`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest name part after the type.
pub const MAX_ID_BYTES: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum EntityKind {
    Mon,
    Osd,
    Client,
}

impl EntityKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntityKind::Mon => "mon",
            EntityKind::Osd => "osd",
            EntityKind::Client => "client",
        }
    }
}

/// Who holds a key. Compared and ordered as its text form.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EntityName {
    kind: EntityKind,
    id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad entity name {name:?}: {why}")]
pub struct BadEntityName {
    pub name: String,
    pub why: &'static str,
}

impl EntityName {
    /// The monitors' shared entity (`mon.`), whose key seals auth tickets.
    pub fn mon() -> EntityName {
        EntityName { kind: EntityKind::Mon, id: String::new() }
    }

    pub fn osd(id: u32) -> EntityName {
        EntityName { kind: EntityKind::Osd, id: id.to_string() }
    }

    pub fn client(name: &str) -> Result<EntityName, BadEntityName> {
        format!("client.{name}").parse()
    }

    pub fn kind(&self) -> EntityKind {
        self.kind
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The OSD number of `osd.N`.
    pub fn osd_id(&self) -> Option<u32> {
        (self.kind == EntityKind::Osd).then(|| self.id.parse().ok()).flatten()
    }
}

impl FromStr for EntityName {
    type Err = BadEntityName;
    fn from_str(s: &str) -> Result<EntityName, BadEntityName> {
        let bad = |why| BadEntityName { name: s.to_string(), why };
        let (kind, id) =
            s.split_once('.').ok_or_else(|| bad("expected TYPE.ID, e.g. client.admin"))?;
        let kind = match kind {
            "mon" => EntityKind::Mon,
            "osd" => EntityKind::Osd,
            "client" => EntityKind::Client,
            _ => return Err(bad("the type must be mon, osd or client")),
        };
        if id.len() > MAX_ID_BYTES {
            return Err(bad("the id is longer than 64 bytes"));
        }
        if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
            return Err(bad("the id may hold only letters, digits, '-', '_' and '.'"));
        }
        match kind {
            EntityKind::Mon => {}
            EntityKind::Osd => {
                let n: u32 = id.parse().map_err(|_| bad("an OSD id is a number, e.g. osd.3"))?;
                if n.to_string() != id {
                    return Err(bad("an OSD id is written without leading zeros"));
                }
            }
            EntityKind::Client if id.is_empty() => return Err(bad("a client needs a name")),
            EntityKind::Client => {}
        }
        Ok(EntityName { kind, id: id.to_string() })
    }
}

impl TryFrom<String> for EntityName {
    type Error = BadEntityName;
    fn try_from(s: String) -> Result<EntityName, BadEntityName> {
        s.parse()
    }
}

impl From<EntityName> for String {
    fn from(e: EntityName) -> String {
        e.to_string()
    }
}

impl fmt::Display for EntityName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.kind.as_str(), self.id)
    }
}

impl fmt::Debug for EntityName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print_back() {
        for s in ["mon.", "mon.a", "osd.0", "osd.12", "client.admin", "client.rgw.gw-1"] {
            let e: EntityName = s.parse().unwrap();
            assert_eq!(e.to_string(), s);
        }
        assert_eq!("osd.7".parse::<EntityName>().unwrap().osd_id(), Some(7));
        assert_eq!(EntityName::mon().to_string(), "mon.");
        assert_eq!(EntityName::client("admin").unwrap().to_string(), "client.admin");
    }

    #[test]
    fn bad_names_say_why() {
        for (s, why) in [
            ("admin", "TYPE.ID"),
            ("user.x", "mon, osd or client"),
            ("osd.x", "number"),
            ("osd.01", "leading zeros"),
            ("osd.", "number"),
            ("client.", "needs a name"),
            ("client.a b", "letters"),
        ] {
            let e = s.parse::<EntityName>().unwrap_err();
            assert!(e.to_string().contains(why), "{s}: {e}");
        }
    }
}

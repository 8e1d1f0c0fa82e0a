//! Keyring files: entities' keys (and, in the monitors' bootstrap keyring, their caps)
//! in the text form operators know from Ceph:
//!
//! ```text
//! # comments start with '#' or ';'
//! [client.admin]
//!     key = <the key's text form>
//!     caps mon = "allow *"
//!     caps osd = "allow *"
//! ```
//!
//! Written atomically (temporary file, fsync, rename, fsync of the directory) with mode
//! 0600. Loading refuses a file that its group or others may read or write: a key
//! that others could read is a key that others have.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::caps::{Caps, Service};
use crate::entity::EntityName;
use crate::secret::Secret;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyringEntry {
    pub key: Secret,
    pub caps: BTreeMap<Service, Caps>,
}

impl KeyringEntry {
    pub fn new(key: Secret) -> KeyringEntry {
        KeyringEntry { key, caps: BTreeMap::new() }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Keyring {
    entries: BTreeMap<EntityName, KeyringEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("keyring {path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("keyring {path}, line {line}: {why}")]
    Parse { path: PathBuf, line: usize, why: String },
    #[error(
        "keyring {path} may be read or written by others (mode {mode:o}): run chmod 600 {path}"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("keyring {path} has no key for {entity}")]
    NoEntry { path: PathBuf, entity: String },
}

impl Keyring {
    pub fn new() -> Keyring {
        Keyring::default()
    }

    pub fn insert(&mut self, name: EntityName, entry: KeyringEntry) {
        self.entries.insert(name, entry);
    }

    pub fn get(&self, name: &EntityName) -> Option<&KeyringEntry> {
        self.entries.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&EntityName, &KeyringEntry)> {
        self.entries.iter()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Parses keyring text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Keyring, KeyringError> {
        let mut entries = BTreeMap::new();
        let mut current: Option<Section> = None;
        let err =
            |line: usize, why: String| KeyringError::Parse { path: path.to_path_buf(), line, why };
        let finish = |c: Option<Section>, entries: &mut BTreeMap<EntityName, KeyringEntry>| {
            let Some(Section { name, key, caps, line }) = c else { return Ok(()) };
            let key = key.ok_or_else(|| err(line, format!("[{name}] has no key")))?;
            if entries.insert(name.clone(), KeyringEntry { key, caps }).is_some() {
                return Err(err(line, format!("[{name}] appears twice")));
            }
            Ok(())
        };
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                finish(current.take(), &mut entries)?;
                let name: EntityName = name.trim().parse().map_err(|e| err(n, format!("{e}")))?;
                current = Some(Section { name, key: None, caps: BTreeMap::new(), line: n });
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                // The line is not echoed: it may be a key pasted on its own.
                return Err(err(
                    n,
                    "expected [ENTITY], key = ... or caps SERVICE = \"...\"".into(),
                ));
            };
            let (k, v) = (k.trim(), v.trim());
            let Some(Section { key, caps, .. }) = current.as_mut() else {
                return Err(err(n, format!("{k:?} before any [ENTITY] section")));
            };
            let words: Vec<&str> = k.split_whitespace().collect();
            match words.as_slice() {
                ["key"] => {
                    if key.is_some() {
                        return Err(err(n, "a second key in one section".into()));
                    }
                    *key = Some(Secret::decode(v).map_err(|e| err(n, format!("bad key: {e}")))?);
                }
                ["caps", service] => {
                    let s = Service::parse(service).ok_or_else(|| {
                        err(n, format!("unknown service {service:?} (mon or osd)"))
                    })?;
                    let text = unquote(v).ok_or_else(|| err(n, "unbalanced quotes".into()))?;
                    let c = Caps::parse(s, text).map_err(|e| err(n, e.to_string()))?;
                    if caps.insert(s, c).is_some() {
                        return Err(err(n, format!("caps {s} given twice")));
                    }
                }
                _ => {
                    // Named only if it looks like a setting name, not like a pasted key.
                    let plain = k.len() <= 16
                        && k.chars().all(|c| c.is_ascii_alphanumeric() || " _-".contains(c));
                    let name = if plain { format!(" {k:?}") } else { String::new() };
                    return Err(err(n, format!("unknown setting{name} (key, caps mon, caps osd)")));
                }
            }
        }
        finish(current.take(), &mut entries)?;
        Ok(Keyring { entries })
    }

    pub fn render(&self) -> String {
        let mut s = String::from("# Sluice keyring: keep it private (mode 0600)\n");
        for (name, e) in &self.entries {
            let _ = writeln!(s, "[{name}]\n\tkey = {}", e.key.encode());
            for (svc, c) in &e.caps {
                let _ = writeln!(s, "\tcaps {svc} = \"{c}\"");
            }
        }
        s
    }

    /// Reads and parses `path`, refusing a file others may read or write.
    pub fn load(path: &Path) -> Result<Keyring, KeyringError> {
        let io = |err| KeyringError::Io { path: path.to_path_buf(), err };
        let meta = std::fs::metadata(path).map_err(io)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyringError::Permissions { path: path.to_path_buf(), mode });
        }
        let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(io)?);
        Keyring::parse(&text, path)
    }

    /// The key of `entity` in the keyring at `path`.
    pub fn load_key(path: &Path, entity: &EntityName) -> Result<Secret, KeyringError> {
        let k = Keyring::load(path)?;
        k.get(entity).map(|e| e.key.clone()).ok_or_else(|| KeyringError::NoEntry {
            path: path.to_path_buf(),
            entity: entity.to_string(),
        })
    }

    /// Writes the keyring to `path` atomically with mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), KeyringError> {
        let io = |err| KeyringError::Io { path: path.to_path_buf(), err };
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = path.file_name().ok_or_else(|| io(std::io::Error::other("not a file name")))?;
        let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
        let _ = std::fs::remove_file(&tmp);
        let text = zeroize::Zeroizing::new(self.render());
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(text.as_bytes()).and_then(|_| f.sync_all()).map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io)?;
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        Ok(())
    }
}

/// A `[ENTITY]` section being read.
struct Section {
    name: EntityName,
    key: Option<Secret>,
    caps: BTreeMap<Service, Caps>,
    /// Where it starts (for errors).
    line: usize,
}

fn unquote(v: &str) -> Option<&str> {
    match (v.starts_with('"'), v.ends_with('"') && v.len() >= 2) {
        (true, true) => Some(&v[1..v.len() - 1]),
        (false, _) if !v.contains('"') => Some(v),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Keyring {
        let mut k = Keyring::new();
        let mut admin = KeyringEntry::new(Secret::generate());
        admin.caps.insert(Service::Mon, Caps::parse(Service::Mon, "allow *").unwrap());
        admin.caps.insert(Service::Osd, Caps::parse(Service::Osd, "allow *").unwrap());
        k.insert("client.admin".parse().unwrap(), admin);
        k.insert("osd.0".parse().unwrap(), KeyringEntry::new(Secret::generate()));
        k
    }

    #[test]
    fn keyrings_round_trip_through_files_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring");
        let k = sample();
        k.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(Keyring::load(&path).unwrap(), k);
        // Saving again replaces it.
        let mut k2 = k.clone();
        k2.insert("client.bob".parse().unwrap(), KeyringEntry::new(Secret::generate()));
        k2.save(&path).unwrap();
        assert_eq!(Keyring::load(&path).unwrap().len(), 3);
        let osd0 = "osd.0".parse().unwrap();
        assert_eq!(Keyring::load_key(&path, &osd0).unwrap(), k.get(&osd0).unwrap().key);
        let e = Keyring::load_key(&path, &"osd.9".parse().unwrap()).unwrap_err();
        assert!(e.to_string().contains("no key for osd.9"), "{e}");
    }

    #[test]
    fn a_keyring_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring");
        sample().save(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Keyring::load(&path).unwrap_err();
        assert!(matches!(e, KeyringError::Permissions { mode: 0o644, .. }), "{e}");
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }

    #[test]
    fn parse_errors_name_the_line() {
        let key = Secret::generate().encode();
        let p = Path::new("k");
        let ok = format!(
            "# c\n[client.a]\n key = {key}\n caps osd = \"allow r pool=x\"\n; c\n[osd.1]\nkey={key}\n"
        );
        let k = Keyring::parse(&ok, p).unwrap();
        assert_eq!(
            k.get(&"client.a".parse().unwrap()).unwrap().caps[&Service::Osd].to_string(),
            "allow r pool=x"
        );
        for (text, line, why) in [
            (format!("key = {key}"), 1, "before any"),
            ("[client.a]\n".to_string(), 1, "has no key"),
            ("[nobody]\n".to_string(), 1, "bad entity"),
            (format!("[client.a]\nkey = {key}\nkey = {key}"), 3, "second key"),
            ("[client.a]\nkey = abc".to_string(), 2, "bad key"),
            (format!("[client.a]\nkey = {key}\ncaps mds = \"allow\""), 3, "unknown service"),
            (format!("[client.a]\nkey = {key}\ncaps osd = \"allow q\""), 3, "not a permission"),
            (format!("[client.a]\nkey = {key}\ncaps osd = \"allow r"), 3, "unbalanced"),
            (format!("[client.a]\nkey = {key}\nuser = x"), 3, "unknown setting"),
            (format!("[client.a]\nkey = {key}\n{key}"), 3, "unknown setting (key"),
            (format!("[client.a]\nkey = {key}\njunk"), 3, "expected [ENTITY]"),
            (format!("[client.a]\nkey = {key}\n[client.a]\nkey = {key}"), 3, "twice"),
        ] {
            match Keyring::parse(&text, p) {
                Err(KeyringError::Parse { line: l, why: w, .. }) => {
                    assert_eq!(l, line, "{text:?}: {w}");
                    assert!(w.contains(why), "{text:?}: {w}");
                    assert!(!w.contains(&key[..20]), "a key in an error: {w}");
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }
}

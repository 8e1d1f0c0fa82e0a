//! `sluice.conf`: what every Sluice program needs to find the cluster.
//!
//! TOML, found in this order: the `-c/--conf` option, the `SLUICE_CONF` environment
//! variable, `./sluice.conf`. A missing or bad file is an error that names the file and
//! the problem; there is no built-in default cluster.
//!
//! ```toml
//! fsid = "8f0c6e6a-51c4-4b0f-9a57-3c8d7f3e2a10"
//! mon_hosts = ["127.0.0.1:3300", "127.0.0.1:3301", "127.0.0.1:3302"]
//! # optional
//! mon_selection = "static"        # static | roundrobin | shuffle
//! mon_check_interval_s = 30       # re-check the preferred monitor (0: never)
//! auth = "cephx"                  # or "none"
//! ms_mode = "crc"                 # OSD connections: "crc" (checksummed) or "secure"
//!                                 # (encrypted and authenticated; needs auth = "cephx")
//! name = "client.admin"           # who this program is (the -n/--name default)
//! keyring = "/etc/sluice/keyring" # its keys (default: `keyring` beside this file)
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::monclient::Policy;

pub const ENV: &str = "SLUICE_CONF";
pub const FILE_NAME: &str = "sluice.conf";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conf {
    pub path: PathBuf,
    pub fsid: [u8; 16],
    pub mon_hosts: Vec<String>,
    pub mon_selection: Policy,
    pub mon_check_interval: Duration,
    pub auth: Auth,
    /// Whether the OSDs' connections continue in secure mode after the handshake.
    pub secure: bool,
    /// Who programs using this file are, unless told otherwise.
    pub name: Option<String>,
    /// Where their keys are, unless told otherwise.
    pub keyring: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    Cephx,
    None,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfError {
    #[error(
        "no configuration: pass -c FILE, set {ENV}, or put {FILE_NAME} in the current directory"
    )]
    NotFound,
    #[error("{path}: {detail}")]
    Bad { path: PathBuf, detail: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    fsid: String,
    mon_hosts: Vec<String>,
    mon_selection: Option<String>,
    mon_check_interval_s: Option<u64>,
    auth: Option<String>,
    ms_mode: Option<String>,
    name: Option<String>,
    keyring: Option<PathBuf>,
}

/// Parses a UUID written as 32 hex digits with optional dashes.
pub fn parse_fsid(s: &str) -> Result<[u8; 16], String> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("fsid {s:?} is not a UUID"));
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("checked hex");
    }
    Ok(out)
}

/// Formats an fsid as a UUID.
pub fn format_fsid(f: &[u8; 16]) -> String {
    let h: String = f.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

impl Conf {
    /// Finds and loads the configuration (`explicit` is the -c option).
    pub fn find(explicit: Option<&Path>) -> Result<Conf, ConfError> {
        if let Some(p) = explicit {
            return Conf::load(p);
        }
        if let Some(p) = std::env::var_os(ENV) {
            return Conf::load(Path::new(&p));
        }
        let here = Path::new(FILE_NAME);
        if here.exists() {
            return Conf::load(here);
        }
        Err(ConfError::NotFound)
    }

    pub fn load(path: &Path) -> Result<Conf, ConfError> {
        let bad = |detail: String| ConfError::Bad { path: path.to_path_buf(), detail };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        Conf::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Conf, ConfError> {
        let bad = |detail: String| ConfError::Bad { path: path.to_path_buf(), detail };
        let raw: Raw = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        let fsid = parse_fsid(&raw.fsid).map_err(bad)?;
        if raw.mon_hosts.is_empty() {
            return Err(bad("mon_hosts is empty: list at least one monitor".into()));
        }
        for h in &raw.mon_hosts {
            if h.rsplit_once(':')
                .and_then(|(host, port)| {
                    (!host.is_empty()).then(|| port.parse::<u16>().ok()).flatten()
                })
                .is_none()
            {
                return Err(bad(format!("mon_hosts: {h:?} is not HOST:PORT")));
            }
        }
        let mon_selection = match raw.mon_selection.as_deref() {
            None => Policy::Static,
            Some(s) => s.parse().map_err(bad)?,
        };
        let auth = match raw.auth.as_deref() {
            None | Some("cephx") => Auth::Cephx,
            Some("none") => Auth::None,
            Some(other) => return Err(bad(format!("auth {other:?}: \"cephx\" or \"none\""))),
        };
        let secure = match raw.ms_mode.as_deref() {
            None | Some("crc") => false,
            Some("secure") if auth == Auth::None => {
                return Err(bad("ms_mode \"secure\" needs auth = \"cephx\" (its keys come from \
                                the tickets)"
                    .into()));
            }
            Some("secure") => true,
            Some(other) => {
                return Err(bad(format!("ms_mode {other:?}: \"crc\" or \"secure\"")));
            }
        };
        Ok(Conf {
            path: path.to_path_buf(),
            fsid,
            mon_hosts: raw.mon_hosts,
            mon_selection,
            mon_check_interval: Duration::from_secs(raw.mon_check_interval_s.unwrap_or(30)),
            auth,
            secure,
            name: raw.name,
            keyring: raw.keyring,
        })
    }

    /// The keyring programs using this file read: `keyring` if set (relative to this
    /// file's folder), else `keyring` beside this file.
    pub fn keyring_path(&self) -> PathBuf {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        match &self.keyring {
            Some(k) => dir.join(k),
            None => dir.join("keyring"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
fsid = "8f0c6e6a-51c4-4b0f-9a57-3c8d7f3e2a10"
mon_hosts = ["127.0.0.1:3300", "mon-b.example:3300"]
mon_selection = "roundrobin"
"#;

    #[test]
    fn parses_with_defaults_and_round_trips_the_fsid() {
        let c = Conf::parse(Path::new("x.conf"), GOOD).unwrap();
        assert_eq!(format_fsid(&c.fsid), "8f0c6e6a-51c4-4b0f-9a57-3c8d7f3e2a10");
        assert_eq!(c.mon_hosts.len(), 2);
        assert_eq!(c.mon_selection, Policy::RoundRobin);
        assert_eq!(c.mon_check_interval, Duration::from_secs(30));
        assert_eq!(c.auth, Auth::Cephx, "auth is on unless configured off");
        assert!(!c.secure, "crc mode unless configured");
        let c = Conf::parse(Path::new("x.conf"), &format!("{GOOD}ms_mode = \"secure\"")).unwrap();
        assert!(c.secure);
    }

    #[test]
    fn bad_files_name_the_file_and_the_problem() {
        let p = Path::new("/etc/sluice/sluice.conf");
        for (text, needle) in [
            ("fsid = \"nope\"\nmon_hosts = [\"a:1\"]", "not a UUID"),
            ("fsid = \"8f0c6e6a51c44b0f9a573c8d7f3e2a10\"\nmon_hosts = []", "empty"),
            ("fsid = \"8f0c6e6a51c44b0f9a573c8d7f3e2a10\"\nmon_hosts = [\"a\"]", "HOST:PORT"),
            (
                "fsid = \"8f0c6e6a51c44b0f9a573c8d7f3e2a10\"\nmon_hosts = [\"a:1\"]\nmon_selection = \"best\"",
                "unknown monitor selection",
            ),
            (
                "fsid = \"8f0c6e6a51c44b0f9a573c8d7f3e2a10\"\nmon_hosts = [\"a:1\"]\nauth = \"maybe\"",
                "auth",
            ),
            (
                "fsid = \"8f0c6e6a51c44b0f9a573c8d7f3e2a10\"\nmon_hosts = [\"a:1\"]\nms_mode = \"fast\"",
                "ms_mode \"fast\"",
            ),
            (
                "fsid = \"8f0c6e6a51c44b0f9a573c8d7f3e2a10\"\nmon_hosts = [\"a:1\"]\nauth = \"none\"\nms_mode = \"secure\"",
                "needs auth",
            ),
            (
                "fsid = \"8f0c6e6a51c44b0f9a573c8d7f3e2a10\"\nmon_hosts = [\"a:1\"]\ncolour = 1",
                "colour",
            ),
            ("mon_hosts = [", "TOML"),
        ] {
            let e = Conf::parse(p, text).unwrap_err().to_string();
            assert!(e.starts_with("/etc/sluice/sluice.conf: "), "{e}");
            assert!(e.contains(needle) || (needle == "TOML" && e.len() > 30), "{needle}: {e}");
        }
    }

    #[test]
    fn found_by_option_then_environment() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.conf");
        std::fs::write(&p, GOOD).unwrap();
        assert_eq!(Conf::find(Some(&p)).unwrap().path, p);
        let missing = dir.path().join("missing.conf");
        let e = Conf::find(Some(&missing)).unwrap_err().to_string();
        assert!(e.contains("missing.conf"), "{e}");
    }
}

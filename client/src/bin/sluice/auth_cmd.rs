//! `sluice auth ...`: the key database, through signed requests (mon cap `*`); keys come
//! back sealed for the caller and are printed as keyring entries or written to a
//! keyring file (mode 0600).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use sluice_auth::keyring::{Keyring, KeyringEntry};
use sluice_auth::{EntityName, Service};
use sluice_control::auth::{AuthAnswer, AuthOp, parse_caps};
use sluice_control::client::MonClient;
use sluice_control::conf::Conf;

use crate::Fail;

#[derive(Subcommand)]
pub enum AuthCmd {
    /// Add ENTITY (e.g. client.backup) with a new key and caps given as SERVICE 'CAPS'
    /// pairs, e.g. `mon 'allow r' osd 'allow rw pool=backups'`; refused if it exists.
    /// Prints its keyring entry, or adds it to the keyring FILE given with -o.
    Add {
        entity: String,
        caps: Vec<String>,
        #[arg(short = 'o', long = "out")]
        out: Option<PathBuf>,
    },
    /// Like add, but an existing ENTITY is returned as it is (its caps unchanged).
    GetOrCreate {
        entity: String,
        caps: Vec<String>,
        #[arg(short = 'o', long = "out")]
        out: Option<PathBuf>,
    },
    /// ENTITY's keyring entry (key and caps).
    Get {
        entity: String,
        #[arg(short = 'o', long = "out")]
        out: Option<PathBuf>,
    },
    /// Entities and their caps (no keys).
    Ls,
    /// Remove ENTITY: it can no longer log in (tickets it holds work until they expire).
    Rm { entity: String },
    /// Replace ENTITY's caps (SERVICE 'CAPS' pairs; none: no caps). They take effect
    /// when its tickets are renewed, within half a ticket lifetime
    /// (`auth_service_ticket_ttl`, default 1 h).
    Caps { entity: String, caps: Vec<String> },
    /// ENTITY's key alone.
    PrintKey { entity: String },
}

fn entity(s: &str) -> Result<EntityName, Fail> {
    s.parse().map_err(|e| Fail(2, format!("{e}")))
}

/// `mon 'allow r' osd 'allow rw'` as caps per service, checked here for a clear usage
/// error (the monitors check again before storing).
fn caps(pairs: &[String]) -> Result<BTreeMap<Service, String>, Fail> {
    if !pairs.len().is_multiple_of(2) {
        return Err(Fail(2, "caps come in pairs: SERVICE 'CAPS' (e.g. osd 'allow r')".into()));
    }
    let mut out = BTreeMap::new();
    for p in pairs.chunks(2) {
        let s = Service::parse(&p[0])
            .ok_or_else(|| Fail(2, format!("unknown service {:?} (mon or osd)", p[0])))?;
        out.insert(s, p[1].clone());
    }
    parse_caps(&out).map_err(|e| Fail(2, e))?;
    Ok(out)
}

/// Who this CLI is and its key: --name (default: the configuration's `name`, else
/// client.admin) from --keyring (default: the configuration's keyring).
pub async fn login(
    mc: &MonClient,
    name: Option<&str>,
    keyring: Option<&Path>,
    conf: Option<&Conf>,
) -> Result<sluice_auth::kdc::Credentials, Fail> {
    let name = name.or(conf.and_then(|c| c.name.as_deref())).unwrap_or("client.admin");
    let who = entity(name)?;
    let path = match (keyring, conf) {
        (Some(k), _) => k.to_path_buf(),
        (None, Some(c)) => c.keyring_path(),
        (None, None) => return Err(Fail(4, "no keyring: pass --keyring FILE or -c CONF".into())),
    };
    let key = Keyring::load_key(&path, &who).map_err(|e| Fail(4, e.to_string()))?;
    Ok(mc.login(&who, &key, None, &[]).await?)
}

fn show(
    entity: &EntityName,
    key: &sluice_auth::Secret,
    caps: &BTreeMap<Service, String>,
    out: Option<&Path>,
) -> Result<(), Fail> {
    let mut e = KeyringEntry::new(key.clone());
    e.caps = parse_caps(caps).map_err(|m| Fail(1, m))?;
    match out {
        None => {
            let mut k = Keyring::new();
            k.insert(entity.clone(), e);
            print!("{}", k.render());
        }
        Some(path) => {
            // Added to the file if it exists (its other entries stay).
            let mut k = if path.exists() {
                Keyring::load(path).map_err(|e| Fail(1, e.to_string()))?
            } else {
                Keyring::new()
            };
            k.insert(entity.clone(), e);
            k.save(path).map_err(|e| Fail(1, e.to_string()))?;
            println!("wrote {entity} to {}", path.display());
        }
    }
    Ok(())
}

pub async fn run(
    cmd: &AuthCmd,
    mc: &MonClient,
    creds: &sluice_auth::kdc::Credentials,
    json: bool,
) -> Result<(), Fail> {
    let op = match cmd {
        AuthCmd::Add { entity: e, caps: c, .. } => {
            AuthOp::Add { entity: entity(e)?, caps: caps(c)? }
        }
        AuthCmd::GetOrCreate { entity: e, caps: c, .. } => {
            AuthOp::GetOrCreate { entity: entity(e)?, caps: caps(c)? }
        }
        AuthCmd::Get { entity: e, .. } | AuthCmd::PrintKey { entity: e } => {
            AuthOp::Get { entity: entity(e)? }
        }
        AuthCmd::Ls => AuthOp::Ls,
        AuthCmd::Rm { entity: e } => AuthOp::Rm { entity: entity(e)? },
        AuthCmd::Caps { entity: e, caps: c } => AuthOp::Caps { entity: entity(e)?, caps: caps(c)? },
    };
    let out = match cmd {
        AuthCmd::Add { out, .. } | AuthCmd::GetOrCreate { out, .. } | AuthCmd::Get { out, .. } => {
            out.as_deref()
        }
        _ => None,
    };
    match (mc.auth_command(creds, &op).await?, cmd) {
        (AuthAnswer::Entity { key, .. }, AuthCmd::PrintKey { .. }) => println!("{}", key.encode()),
        (AuthAnswer::Entity { entity, caps, .. }, AuthCmd::Caps { .. }) => {
            let c: Vec<String> = caps.iter().map(|(s, c)| format!("{s} '{c}'")).collect();
            println!("{entity}: {}", if c.is_empty() { "no caps".into() } else { c.join(" ") });
        }
        (AuthAnswer::Entity { entity, key, caps, .. }, _) => show(&entity, &key, &caps, out)?,
        (AuthAnswer::List(list), _) if json => {
            let v: Vec<_> = list
                .iter()
                .map(|(e, c)| serde_json::json!({"entity": e.to_string(), "caps": c}))
                .collect();
            println!("{}", serde_json::to_string_pretty(&v).expect("serializes"));
        }
        (AuthAnswer::List(list), _) => {
            for (e, c) in list {
                println!("{e}");
                for (s, c) in c {
                    println!("\tcaps {s} = \"{c}\"");
                }
            }
        }
        (AuthAnswer::Done, _) => println!("done"),
    }
    Ok(())
}

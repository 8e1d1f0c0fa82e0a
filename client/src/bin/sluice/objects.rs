//! Object commands: `sluice put|get|rm|stat|ls`, through the client library.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;
use sluice_client::{Cluster, Error, Options};
use sluice_control::conf::Conf;

use crate::Fail;

#[derive(Subcommand)]
pub enum ObjCmd {
    /// Store FILE (or standard input with `-`) as object OBJ of pool POOL, replacing it.
    Put { pool: String, object: String, file: PathBuf },
    /// Write object OBJ of pool POOL to FILE (or standard output with `-`).
    Get { pool: String, object: String, file: PathBuf },
    /// Delete an object.
    Rm { pool: String, object: String },
    /// An object's size and version.
    Stat { pool: String, object: String },
    /// The names of a pool's objects (PG by PG).
    Ls { pool: String },
}

fn fail(e: Error) -> Fail {
    let code = match e {
        Error::Monitors(_) => 3,
        Error::Config(_) => 4,
        Error::Unauthenticated(_) | Error::PermissionDenied(_) => 5,
        _ => 1,
    };
    Fail(code, e.to_string())
}

/// Who the object commands authenticate as (the global -n/--name and --keyring).
pub struct Identity<'a> {
    pub name: Option<&'a str>,
    pub keyring: Option<&'a Path>,
}

pub fn run(
    cmd: &ObjCmd,
    conf: Option<&Path>,
    who: Identity<'_>,
    timeout: u64,
    json: bool,
) -> Result<(), Fail> {
    let conf = Conf::find(conf).map_err(|e| Fail(4, e.to_string()))?;
    let opts = Options {
        op_timeout: Duration::from_secs(timeout.max(1)),
        connect_timeout: Duration::from_secs(timeout.max(1)),
        name: who.name.map(str::to_string),
        keyring: who.keyring.map(Path::to_path_buf),
    };
    let cluster = Cluster::connect(&conf, opts).map_err(fail)?;
    let mut io = cluster.io();
    match cmd {
        ObjCmd::Put { pool, object, file } => {
            let data = if file.as_os_str() == "-" {
                let mut v = Vec::new();
                std::io::stdin().read_to_end(&mut v).map_err(|e| Fail(1, format!("stdin: {e}")))?;
                v
            } else {
                std::fs::read(file).map_err(|e| Fail(1, format!("{}: {e}", file.display())))?
            };
            let n = data.len();
            let v = io.write_full(pool, object, data).map_err(fail)?;
            if json {
                crate::print_json(&serde_json::json!({"object": object, "size": n, "version": v}));
            } else {
                println!("wrote {object} ({n} bytes) to {pool}, version {v}");
            }
        }
        ObjCmd::Get { pool, object, file } => {
            let data = io.read_all(pool, object).map_err(fail)?;
            if file.as_os_str() == "-" {
                let mut out = std::io::stdout().lock();
                out.write_all(&data)
                    .and_then(|_| out.flush())
                    .map_err(|e| Fail(1, e.to_string()))?;
            } else {
                std::fs::write(file, &data)
                    .map_err(|e| Fail(1, format!("{}: {e}", file.display())))?;
            }
        }
        ObjCmd::Rm { pool, object } => {
            io.remove(pool, object).map_err(fail)?;
            if !json {
                println!("removed {object} from {pool}");
            }
        }
        ObjCmd::Stat { pool, object } => {
            let (size, version) = io.stat(pool, object).map_err(fail)?;
            if json {
                crate::print_json(
                    &serde_json::json!({"object": object, "size": size, "version": version}),
                );
            } else {
                println!("{pool}/{object}: size {size}, version {version}");
            }
        }
        ObjCmd::Ls { pool } => {
            let names = io.list(pool).map_err(fail)?;
            if json {
                crate::print_json(&names);
            } else {
                for n in names {
                    println!("{n}");
                }
            }
        }
    }
    Ok(())
}

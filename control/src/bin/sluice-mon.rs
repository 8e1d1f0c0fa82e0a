//! `sluice-mon`: a Sluice monitor: `mkfs` creates its store, `run` serves it as one
//! member of the Raft quorum, `show` prints what the store holds.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice_control::auth::AuthState;
use sluice_control::conf::{format_fsid, parse_fsid};
use sluice_control::state::ClusterState;
use sluice_control::store::{Identity, MonStore, OpenOptions};

#[derive(Parser)]
#[command(
    name = "sluice-mon",
    about = "A Sluice monitor: one member of the Raft quorum holding the cluster maps"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create this monitor's store. Refuses if DIR already holds one.
    Mkfs {
        /// This monitor's name; must be one of --initial-members.
        #[arg(long)]
        id: String,
        /// The cluster's fsid (a UUID); every monitor of the cluster gets the same one.
        #[arg(long)]
        fsid: String,
        /// The founding members, NAME=HOST:PORT,... (1, 3 or 5), the same list on every
        /// monitor. A monitor outside this list never forms a quorum on its own.
        #[arg(long, value_delimiter = ',')]
        initial_members: Vec<String>,
        /// Directory for the store (created if missing).
        #[arg(long)]
        data: PathBuf,
        /// The bootstrap keyring: the monitors' own key (`mon.`) and the first entities
        /// (`client.admin`, ...) with their caps. Created with mode 0600 if missing (a
        /// new `mon.` key and `client.admin` with all caps), so the first monitor's mkfs
        /// makes it: give the same file to every monitor of the cluster. Without it the
        /// cluster holds no keys and runs only with auth = "none".
        #[arg(long)]
        keyring: Option<PathBuf>,
    },
    /// Run the monitor: join the quorum and serve the management API (HTTP+JSON) and
    /// the Raft messages on this monitor's address. Stops cleanly on SIGTERM or Ctrl-C.
    /// A store that cannot be read is retried, then reported (exit 1); the monitor never
    /// starts empty in its place.
    Run {
        #[arg(long)]
        data: PathBuf,
        /// Listen here instead of this monitor's address in the initial members (e.g.
        /// 0.0.0.0:PORT); peers still reach it at the listed address.
        #[arg(long)]
        bind: Option<String>,
        /// Open retries after the first attempt when the store cannot be read.
        #[arg(long, default_value_t = 5)]
        open_retries: u32,
    },
    /// Print what the store holds (identity, map epoch, OSDs, pools, config) without
    /// changing it. Exit 0, or 1 when the store cannot be read (the reason is printed).
    Show {
        #[arg(long)]
        data: PathBuf,
    },
}

fn main() -> ExitCode {
    sluice_control::init_logging("info,openraft=warn");
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-mon: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn members(list: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = Vec::new();
    for m in list {
        let Some((name, addr)) = m.split_once('=') else {
            anyhow::bail!("--initial-members: {m:?} is not NAME=HOST:PORT");
        };
        let ok_name = !name.is_empty()
            && name.len() <= 32
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok_name {
            anyhow::bail!("--initial-members: monitor name {name:?}: 1-32 of [A-Za-z0-9_-]");
        }
        if addr.rsplit_once(':').is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err()) {
            anyhow::bail!("--initial-members: {addr:?} is not HOST:PORT");
        }
        if out.iter().any(|(n, a)| n == name || a == addr) {
            anyhow::bail!("--initial-members: {name}={addr} repeats a name or an address");
        }
        out.push((name.to_string(), addr.to_string()));
    }
    if !matches!(out.len(), 1 | 3 | 5) {
        anyhow::bail!(
            "--initial-members: {} members; use 1, 3 or 5 (a quorum needs a majority)",
            out.len()
        );
    }
    Ok(out)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Mkfs { id, fsid, initial_members, data, keyring } => {
            let fsid = parse_fsid(&fsid).map_err(anyhow::Error::msg)?;
            let initial_members = members(&initial_members)?;
            if !initial_members.iter().any(|(n, _)| *n == id) {
                anyhow::bail!("--id {id} is not one of --initial-members");
            }
            let identity = Identity { fsid, name: id, initial_members };
            let state = match &keyring {
                Some(path) => {
                    let (k, created) = sluice_control::auth::bootstrap_keyring(path)?;
                    if created {
                        println!("created keyring {} (mon. and client.admin)", path.display());
                    }
                    let auth = AuthState::bootstrap(&k, sluice_control::auth::wall_ms())
                        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                    ClusterState::with_auth(fsid, auth)
                }
                None => {
                    println!(
                        "no --keyring: this cluster holds no keys and runs only with auth = \"none\""
                    );
                    ClusterState::new(fsid)
                }
            };
            let store = MonStore::create(&data, &identity, &state)?;
            println!(
                "created monitor {} of cluster {} in {}",
                identity.name,
                format_fsid(&fsid),
                store.path().display()
            );
            Ok(())
        }
        Cmd::Run { data, bind, open_retries } => {
            let store =
                MonStore::open(&data, OpenOptions { retries: open_retries, ..Default::default() })?;
            let id = store.identity().clone();
            let Some((_, addr)) = id.initial_members.iter().find(|(n, _)| *n == id.name) else {
                anyhow::bail!("mon.{} is not in its own initial members", id.name);
            };
            let bind = bind.unwrap_or_else(|| addr.clone());
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(&bind)
                    .await
                    .map_err(|e| anyhow::anyhow!("listening on {bind}: {e}"))?;
                let mon = sluice_control::mon::Monitor::start(std::sync::Arc::new(store)).await?;
                tracing::info!(
                    "mon.{} of cluster {} starting ({} members)",
                    id.name,
                    format_fsid(&id.fsid),
                    id.initial_members.len()
                );
                sluice_control::mon::serve(mon, listener, async {
                    let mut term =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                            .expect("signal handler");
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                    tracing::info!("stopping");
                })
                .await
            })
        }
        Cmd::Show { data } => {
            let store = MonStore::open(&data, OpenOptions::default())?;
            let id = store.identity();
            let st = store.load_state()?;
            println!("monitor {} of cluster {}", id.name, format_fsid(&id.fsid));
            let members: Vec<String> =
                id.initial_members.iter().map(|(n, a)| format!("{n}={a}")).collect();
            println!("initial members: {}", members.join(","));
            let m = &st.osdmap;
            let up = m.osds.values().filter(|o| o.up).count();
            let inn = m.osds.values().filter(|o| o.is_in).count();
            println!(
                "osdmap epoch {}: {} osds, {up} up, {inn} in; {} pools",
                m.epoch,
                m.osds.len(),
                m.pools.len()
            );
            for p in m.pools.values() {
                println!(
                    "  pool {} {:?} size {} min_size {} pg_num {}",
                    p.id.0, p.name, p.size, p.min_size, p.pg_num
                );
            }
            for (k, v) in &st.config {
                println!("  config {k} = {v}");
            }
            println!(
                "auth: {} entities{}",
                st.auth.entities.len(),
                if st.auth.mon_key().is_none() { " (no keys: auth = \"none\" only)" } else { "" }
            );
            for (e, r) in &st.auth.entities {
                let caps: Vec<String> = r.caps.iter().map(|(s, c)| format!("{s} '{c}'")).collect();
                println!("  {e} {}", caps.join(" "));
            }
            for (s, r) in &st.auth.rotating {
                println!(
                    "  {s} secret {} (ids {:?})",
                    r.current().id,
                    r.entries().iter().map(|e| e.id).collect::<Vec<_>>()
                );
            }
            Ok(())
        }
    }
}

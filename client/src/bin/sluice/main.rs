//! `sluice`: the operator's CLI. Talks to the monitors' management API (any monitor;
//! writes reach the leader) and runs local development clusters (`sluice dev`).
//!
//! Exit codes: 0 done; 1 the cluster refused the command (or a local `dev` operation
//! failed); 2 usage error; 3 no monitor reachable or no quorum; 4 configuration problem
//! (no or bad sluice.conf, wrong fsid); 5 authentication failed or permission denied.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use sluice_control::api::{self, MapView};
use sluice_control::client::{ClientError, MonClient};
use sluice_control::conf::Conf;
use sluice_control::maps::{Flag, Location, OsdId, osdmap::ONE};
use sluice_control::monclient::Policy;
use sluice_control::state::{Command, Response};

mod auth_cmd;
mod dev;
mod objects;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Operate a Sluice cluster: status, OSDs, pools, config, objects; and local dev clusters.",
    after_help = "Exit codes: 0 done; 1 refused by the cluster (or a dev operation failed); \
                  2 usage; 3 no monitor reachable or no quorum; 4 configuration problem \
                  (no sluice.conf, wrong fsid); 5 authentication failed or permission denied.\n\
                  The configuration is found via -c, then $SLUICE_CONF, then ./sluice.conf."
)]
struct Cli {
    /// Cluster configuration file (sluice.conf).
    #[arg(short = 'c', long = "conf", global = true)]
    conf: Option<PathBuf>,
    /// Monitor addresses HOST:PORT,..., instead of those in the configuration.
    #[arg(short = 'm', long = "mon", global = true, value_delimiter = ',')]
    mon: Vec<String>,
    /// Output format of read commands.
    #[arg(long, global = true, value_enum, default_value_t = Format::Plain)]
    format: Format,
    /// Give up after this many seconds without an answer from a monitor with quorum.
    #[arg(long, global = true, default_value_t = 15)]
    timeout: u64,
    /// Who to authenticate as (default: the configuration's `name`, else client.admin).
    // Its own id: subcommands have positional `name`s (pool create NAME).
    #[arg(short = 'n', long = "name", global = true, value_name = "ENTITY")]
    auth_name: Option<String>,
    /// The keyring holding that entity's key (default: the configuration's `keyring`,
    /// else `keyring` beside sluice.conf).
    #[arg(long = "keyring", global = true)]
    keyring: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Plain,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Cluster summary: health, monitors, OSDs, pools.
    Status,
    /// Overall health (HEALTH_OK / HEALTH_WARN / HEALTH_ERR); `detail` lists each check.
    Health {
        #[arg(value_parser = ["detail"])]
        detail: Option<String>,
    },
    /// Monitors.
    Mon {
        #[command(subcommand)]
        cmd: MonCmd,
    },
    /// OSDs.
    Osd {
        #[command(subcommand)]
        cmd: OsdCmd,
    },
    /// Pools.
    Pool {
        #[command(subcommand)]
        cmd: PoolCmd,
    },
    /// Placement groups: their states as their primaries report them.
    Pg {
        #[command(subcommand)]
        cmd: PgCmd,
    },
    /// Keys and caps (the monitors' key database; needs mon cap '*').
    Auth {
        #[command(subcommand)]
        cmd: auth_cmd::AuthCmd,
    },
    /// Central configuration (key/value, replicated by the monitors).
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    #[command(flatten)]
    Object(objects::ObjCmd),
    /// A local cluster on loopback with file-backed devices, for development and tests.
    Dev {
        #[command(subcommand)]
        cmd: dev::DevCmd,
    },
}

#[derive(Subcommand)]
enum PgCmd {
    /// Every PG: state, up and acting sets, primary, version, objects left to recover.
    /// States: active, clean, peering, recovering, degraded, undersized, peered (fewer
    /// than min_size members: no writes), down (no OSD up), unknown (not reported yet),
    /// stale (its primary stopped reporting).
    Ls {
        /// Only this pool's PGs.
        pool: Option<String>,
        /// Only PGs whose state includes this one (e.g. degraded).
        #[arg(long)]
        state: Option<String>,
    },
    /// How many PGs are in each state.
    Stat,
    /// One PG, e.g. 1.1f (POOL.PG, the PG in hex, as `sluice osd map` prints it).
    Query { pgid: String },
    /// Compare every acting member's copies of a PG's objects: sizes and xattrs. The
    /// PG's writes wait meanwhile; differences show as `inconsistent` and in health
    /// (`PG_DAMAGED`). Asked of the PG's primary with its next PG report (seconds).
    Scrub { pgid: String },
    /// Scrub with data checksums: every object's data is read on every member (a
    /// corrupt block is an error).
    DeepScrub { pgid: String },
    /// Deep-scrub, then copy a good copy over every inconsistent one (from the copy most
    /// members agree on; the primary's on a tie), then deep-scrub again.
    Repair { pgid: String },
}

#[derive(Subcommand)]
enum MonCmd {
    /// The monitors, which are reachable, the leader and the Raft term.
    Stat,
}

#[derive(Subcommand)]
enum OsdCmd {
    /// OSDs in the rack/host hierarchy with status and weights.
    Tree,
    /// OSD ids.
    Ls,
    /// The whole OSD map.
    Dump,
    /// Mark OSDs in (they take data).
    In { ids: Vec<String> },
    /// Mark OSDs out (their data moves elsewhere).
    Out { ids: Vec<String> },
    /// Mark OSDs down (a running OSD boots again).
    Down { ids: Vec<String> },
    /// Move an OSD in the hierarchy.
    SetLocation {
        id: String,
        #[arg(long)]
        rack: String,
        #[arg(long)]
        host: String,
    },
    /// How willing an OSD is to be primary, 0.0..=1.0.
    PrimaryAffinity { id: String, value: f64 },
    /// Where an object lives: its PG, the PG's OSDs (placement), the up set and the
    /// primary, at the current map epoch. The object need not exist.
    Map { pool: String, object: String },
    /// Set a cluster flag.
    Set { flag: FlagArg },
    /// Clear a cluster flag.
    Unset { flag: FlagArg },
}

#[derive(Clone, Copy, ValueEnum)]
enum FlagArg {
    /// Down OSDs are not marked out.
    Noout,
    /// Booting OSDs stay down.
    Noup,
    /// The failure detector marks no OSD down.
    Nodown,
    /// Client I/O is paused.
    Pause,
}

#[derive(Subcommand)]
enum PoolCmd {
    Ls,
    Create(PoolCreate),
    /// Delete a pool and all its objects.
    Rm {
        name: String,
        /// Required: deleting a pool cannot be undone.
        #[arg(long)]
        yes_i_really_mean_it: bool,
    },
    /// Change size, min_size or pg_num.
    Set {
        name: String,
        #[arg(value_parser = ["size", "min_size", "pg_num"])]
        key: String,
        value: u32,
    },
    /// Show a pool's settings (all, or one).
    Get {
        name: String,
        key: Option<String>,
    },
}

#[derive(Args)]
struct PoolCreate {
    name: String,
    /// Copies of each object.
    #[arg(long, default_value_t = 3)]
    size: u8,
    /// Copies that must be written before a write is acknowledged (default: size - size/2).
    #[arg(long)]
    min_size: Option<u8>,
    /// Placement groups.
    #[arg(long, default_value_t = 32)]
    pg_num: u32,
}

#[derive(Subcommand)]
enum ConfigCmd {
    Set { key: String, value: String },
    Get { key: String },
    Rm { key: String },
    Dump,
}

/// A failure with its exit code.
pub(crate) struct Fail(pub(crate) u8, pub(crate) String);

impl From<ClientError> for Fail {
    fn from(e: ClientError) -> Fail {
        let code = match &e {
            ClientError::Rejected(_) | ClientError::Other(_) => 1,
            ClientError::Unreachable { .. } | ClientError::NoQuorum(_) => 3,
            ClientError::WrongFsid(_) => 4,
            ClientError::Unauthenticated(_) | ClientError::PermissionDenied(_) => 5,
        };
        let msg = match e {
            ClientError::NoQuorum(m) => format!("no quorum: {m}"),
            e => e.to_string(),
        };
        Fail(code, msg)
    }
}

fn main() -> ExitCode {
    // Output piped into `head` and the like: end quietly when the reader goes away, as
    // command-line tools do, instead of a panic at the next print.
    // SAFETY: restoring the default action of one signal, before any other thread exists.
    let _ = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        )
    };
    sluice_control::init_logging("warn");
    let cli = Cli::parse();
    if let Cmd::Object(cmd) = &cli.cmd {
        // Blocking client library (its own map thread): no runtime here.
        let who =
            objects::Identity { name: cli.auth_name.as_deref(), keyring: cli.keyring.as_deref() };
        let json = cli.format == Format::Json;
        return match objects::run(cmd, cli.conf.as_deref(), who, cli.timeout, json) {
            Ok(()) => ExitCode::SUCCESS,
            Err(Fail(code, msg)) => {
                eprintln!("sluice: {msg}");
                ExitCode::from(code)
            }
        };
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(code, msg)) => {
            eprintln!("sluice: {msg}");
            ExitCode::from(code)
        }
    }
}

/// A monitor client for the command line's cluster, logged in (its requests signed) when
/// the configuration says `auth = "cephx"`, or when `--name`/`--keyring` are given with
/// explicit monitors and no configuration.
async fn client(cli: &Cli) -> Result<MonClient, Fail> {
    let (mut c, conf) = if cli.mon.is_empty() {
        let conf = Conf::find(cli.conf.as_deref()).map_err(|e| Fail(4, e.to_string()))?;
        (MonClient::from_conf(&conf, std::process::id().into()), Some(conf))
    } else {
        // Explicit monitors: the fsid is still checked when a configuration is given.
        let conf = match &cli.conf {
            Some(p) => Some(Conf::load(p).map_err(|e| Fail(4, e.to_string()))?),
            None => None,
        };
        let fsid = conf.as_ref().map(|c| c.fsid);
        (MonClient::new(cli.mon.clone(), Policy::Static, Duration::from_secs(5), 0, fsid), conf)
    };
    c.deadline = Duration::from_secs(cli.timeout.max(1));
    c.attempt_timeout = Duration::from_secs(cli.timeout.clamp(1, 8));
    let sign = match &conf {
        Some(conf) => conf.auth == sluice_control::conf::Auth::Cephx,
        None => cli.auth_name.is_some() || cli.keyring.is_some(),
    };
    if sign {
        let creds =
            auth_cmd::login(&c, cli.auth_name.as_deref(), cli.keyring.as_deref(), conf.as_ref())
                .await?;
        c.set_credentials(Some(creds));
    }
    Ok(c)
}

/// Percent-encodes a query value (everything but RFC 3986's unreserved characters).
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializes"));
}

fn osd_id(s: &str) -> Result<OsdId, Fail> {
    s.strip_prefix("osd.")
        .unwrap_or(s)
        .parse::<u32>()
        .map(OsdId)
        .map_err(|_| Fail(2, format!("{s:?} is not an OSD id (N or osd.N)")))
}

fn osd_ids(v: &[String]) -> Result<Vec<OsdId>, Fail> {
    if v.is_empty() {
        return Err(Fail(2, "name at least one OSD".into()));
    }
    v.iter().map(|s| osd_id(s)).collect()
}

async fn command(c: &MonClient, cmd: Command) -> Result<Response, Fail> {
    Ok(c.post::<_, Response>("/v1/command", &cmd).await?)
}

fn done(r: &Response, what: &str) {
    match r {
        Response::Done { epoch } => println!("{what} (osdmap epoch {epoch})"),
        Response::Registered { id, epoch } => println!("{what}: {id} (osdmap epoch {epoch})"),
        Response::BootDeferred { epoch } => println!("{what}: deferred (epoch {epoch})"),
        Response::AuthEntity { .. } => println!("{what}"),
    }
}

async fn run(cli: Cli) -> Result<(), Fail> {
    let json = cli.format == Format::Json;
    match &cli.cmd {
        Cmd::Dev { cmd } => return dev::run(cmd, cli.format == Format::Json).await,
        Cmd::Object(_) => unreachable!("object commands run before the runtime starts"),
        Cmd::Status => {
            let s: api::Status = client(&cli).await?.get("/v1/status").await?;
            if json {
                print_json(&s);
            } else {
                println!("cluster {}", s.fsid);
                println!("  health: {}", s.health.status.as_str());
                for c in &s.health.checks {
                    println!("    {}: {}", c.name, c.summary);
                }
                let reach = s.mon.members.iter().filter(|m| m.reachable).count();
                let names: Vec<&str> = s.mon.members.iter().map(|m| m.name.as_str()).collect();
                println!(
                    "  mon: {} monitors ({}), {reach} reachable from mon.{}, leader {}, term {}",
                    s.mon.members.len(),
                    names.join(","),
                    s.mon.name,
                    s.mon.leader.as_deref().unwrap_or("NONE"),
                    s.mon.term
                );
                println!(
                    "  osd: {} osds: {} up, {} in; epoch {}{}",
                    s.osdmap.osds,
                    s.osdmap.up,
                    s.osdmap.is_in,
                    s.osdmap.epoch,
                    if s.osdmap.flags.is_empty() {
                        String::new()
                    } else {
                        format!("; flags {}", s.osdmap.flags.join(","))
                    }
                );
                println!("  pools: {}", s.pools);
                if let Ok(t) = client(&cli).await?.get::<api::PgTable>("/v1/pg/stats").await {
                    println!("  pgs: {}", pg_summary(&t));
                    let copying: Vec<&api::PgRow> = t
                        .pgs
                        .iter()
                        .filter(|r| {
                            r.recovering > 0
                                || r.state.contains("backfill")
                                || r.state.contains("recover")
                        })
                        .collect();
                    if !copying.is_empty() {
                        let objects: u64 = copying.iter().map(|r| r.recovering).sum();
                        let backfill =
                            copying.iter().filter(|r| r.state.contains("backfill")).count();
                        println!(
                            "  recovery: {objects} object(s) left to copy in {} PG(s) ({backfill} backfilling)",
                            copying.len()
                        );
                    }
                }
                // The mode is the configuration's (every program of the cluster reads it).
                let conf = match (&cli.conf, cli.mon.is_empty()) {
                    (Some(p), _) => Conf::load(p).ok(),
                    (None, true) => Conf::find(None).ok(),
                    (None, false) => None,
                };
                match conf {
                    Some(c) if c.auth == sluice_control::conf::Auth::None => println!(
                        "  auth: WARNING: none (auth = \"none\" in {}): identities and caps are not checked",
                        c.path.display()
                    ),
                    Some(c) => println!(
                        "  auth: cephx, {} mode (tickets and caps checked on every OSD op and \
                         management request)",
                        if c.secure { "secure" } else { "crc" }
                    ),
                    None => {}
                }
            }
        }
        Cmd::Health { detail } => {
            let h: api::Health = client(&cli).await?.get("/health").await?;
            if json {
                print_json(&h);
            } else {
                println!("{}", h.status.as_str());
                for c in &h.checks {
                    println!("[{}] {}: {}", c.severity.as_str(), c.name, c.summary);
                    if detail.is_some() {
                        for d in &c.detail {
                            println!("    {d}");
                        }
                    }
                }
            }
        }
        Cmd::Mon { cmd: MonCmd::Stat } => {
            let m: api::MonStatus = client(&cli).await?.get("/v1/mon").await?;
            if json {
                print_json(&m);
            } else {
                println!(
                    "{} monitors, leader {}, term {}, last applied {} (answered by mon.{})",
                    m.members.len(),
                    m.leader.as_deref().unwrap_or("NONE (no quorum)"),
                    m.term,
                    m.last_applied,
                    m.name
                );
                for mm in &m.members {
                    println!(
                        "  mon.{} {} {}",
                        mm.name,
                        mm.addr,
                        if mm.reachable { "reachable" } else { "UNREACHABLE" }
                    );
                }
            }
        }
        Cmd::Osd { cmd } => osd(&cli, cmd, json).await?,
        Cmd::Pool { cmd } => pool(&cli, cmd, json).await?,
        Cmd::Pg { cmd } => pg(&cli, cmd, json).await?,
        Cmd::Auth { cmd } => {
            let mc = client(&cli).await?;
            let conf = match &cli.conf {
                Some(p) => Conf::load(p).ok(),
                None => Conf::find(None).ok(),
            };
            let creds = auth_cmd::login(
                &mc,
                cli.auth_name.as_deref(),
                cli.keyring.as_deref(),
                conf.as_ref(),
            )
            .await?;
            auth_cmd::run(cmd, &mc, &creds, json).await?;
        }
        Cmd::Config { cmd } => {
            let c = client(&cli).await?;
            match cmd {
                ConfigCmd::Set { key, value } => {
                    let r =
                        command(&c, Command::ConfigSet { key: key.clone(), value: value.clone() })
                            .await?;
                    done(&r, &format!("set {key}"));
                }
                ConfigCmd::Rm { key } => {
                    let r = command(&c, Command::ConfigRm { key: key.clone() }).await?;
                    done(&r, &format!("removed {key}"));
                }
                ConfigCmd::Get { key } => {
                    let all: std::collections::BTreeMap<String, String> =
                        c.get("/v1/config").await?;
                    let Some(v) = all.get(key) else {
                        return Err(Fail(1, format!("config key {key:?} is not set")));
                    };
                    if json {
                        print_json(&serde_json::json!({ key: v }));
                    } else {
                        println!("{v}");
                    }
                }
                ConfigCmd::Dump => {
                    let all: std::collections::BTreeMap<String, String> =
                        c.get("/v1/config").await?;
                    if json {
                        print_json(&all);
                    } else {
                        for (k, v) in all {
                            println!("{k} = {v}");
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

fn tree(m: &MapView) {
    println!(
        "{:<6} {:<6} {:<16} {:<8} {:>7} {:>9}",
        "ID", "TYPE", "NAME", "STATUS", "WEIGHT", "AFFINITY"
    );
    let mut racks: std::collections::BTreeMap<
        &str,
        std::collections::BTreeMap<&str, Vec<&api::OsdView>>,
    > = Default::default();
    for o in &m.osds {
        racks.entry(&o.rack).or_default().entry(&o.host).or_default().push(o);
    }
    for (rack, hosts) in racks {
        println!("{:<6} {:<6} {:<16}", "-", "rack", rack);
        for (host, osds) in hosts {
            println!("{:<6} {:<6}   {:<14}", "-", "host", host);
            for o in osds {
                println!(
                    "{:<6} {:<6}     {:<12} {:<8} {:>7.3} {:>9.3}",
                    o.id,
                    "osd",
                    format!("osd.{}", o.id),
                    format!(
                        "{}/{}",
                        if o.up { "up" } else { "down" },
                        if o.is_in { "in" } else { "out" }
                    ),
                    o.weight,
                    o.primary_affinity
                );
            }
        }
    }
}

async fn osd(cli: &Cli, cmd: &OsdCmd, json: bool) -> Result<(), Fail> {
    let c = client(cli).await?;
    let map = async || -> Result<MapView, Fail> { Ok(c.get::<MapView>("/v1/osdmap").await?) };
    match cmd {
        OsdCmd::Tree => {
            let m = map().await?;
            if json {
                print_json(&m.osds);
            } else {
                tree(&m);
            }
        }
        OsdCmd::Ls => {
            let m = map().await?;
            if json {
                print_json(&m.osds.iter().map(|o| o.id).collect::<Vec<_>>());
            } else {
                for o in &m.osds {
                    println!("{}", o.id);
                }
            }
        }
        OsdCmd::Dump => {
            let m = map().await?;
            if json {
                print_json(&m);
            } else {
                println!("epoch {}\nfsid {}\nflags {}", m.epoch, m.fsid, m.flags.join(","));
                for p in &m.pools {
                    println!(
                        "pool {} {:?} size {} min_size {} pg_num {} failure_domain {}",
                        p.id, p.name, p.size, p.min_size, p.pg_num, p.failure_domain
                    );
                }
                for o in &m.osds {
                    println!(
                        "osd.{} {} {} weight {:.3} affinity {:.3} {}/{} {} up_from {} down_at {} uuid {}{}",
                        o.id,
                        if o.up { "up" } else { "down" },
                        if o.is_in { "in" } else { "out" },
                        o.weight,
                        o.primary_affinity,
                        o.rack,
                        o.host,
                        o.maintenance,
                        o.up_from,
                        o.down_at,
                        o.uuid,
                        o.addrs.as_ref().map_or(String::new(), |a| format!(" addr {}", a.public))
                    );
                }
            }
        }
        OsdCmd::In { ids } | OsdCmd::Out { ids } => {
            let is_in = matches!(cmd, OsdCmd::In { .. });
            let r = command(&c, Command::SetIn { ids: osd_ids(ids)?, is_in }).await?;
            done(&r, &format!("marked {} {}", ids.join(","), if is_in { "in" } else { "out" }));
        }
        OsdCmd::Down { ids } => {
            let r =
                command(&c, Command::MarkDown { ids: osd_ids(ids)?, by_operator: true }).await?;
            done(&r, &format!("marked {} down", ids.join(",")));
        }
        OsdCmd::SetLocation { id, rack, host } => {
            let location = Location { rack: rack.clone(), host: host.clone() };
            let r = command(&c, Command::SetLocation { id: osd_id(id)?, location }).await?;
            done(&r, &format!("moved {id} to {rack}/{host}"));
        }
        OsdCmd::Map { pool, object } => {
            let path =
                format!("/v1/osd/map?pool={}&object={}", query_escape(pool), query_escape(object));
            let v: api::ObjectMapView = c.get(&path).await?;
            if json {
                print_json(&v);
            } else {
                let list = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
                println!(
                    "osdmap e{} pool '{}' ({}) object '{}' -> pg {} -> up [{}] primary {} (placement [{}])",
                    v.epoch,
                    v.pool,
                    v.pool_id,
                    v.object,
                    v.pg,
                    list(&v.up),
                    v.primary.map_or("none".to_string(), |p| format!("osd.{p}")),
                    list(&v.placement)
                );
            }
        }
        OsdCmd::PrimaryAffinity { id, value } => {
            if !(0.0..=1.0).contains(value) {
                return Err(Fail(2, format!("primary affinity {value}: use 0.0..=1.0")));
            }
            let affinity = (value * f64::from(ONE)).round() as u32;
            let r = command(&c, Command::SetPrimaryAffinity { id: osd_id(id)?, affinity }).await?;
            done(&r, &format!("set {id} primary affinity to {value}"));
        }
        OsdCmd::Set { flag } | OsdCmd::Unset { flag } => {
            let on = matches!(cmd, OsdCmd::Set { .. });
            let (f, name) = match flag {
                FlagArg::Noout => (Flag::NoOut, "noout"),
                FlagArg::Noup => (Flag::NoUp, "noup"),
                FlagArg::Nodown => (Flag::NoDown, "nodown"),
                FlagArg::Pause => (Flag::Pause, "pause"),
            };
            let r = command(&c, Command::SetFlag { flag: f, on }).await?;
            done(&r, &format!("{name} is {}", if on { "set" } else { "unset" }));
        }
    }
    Ok(())
}

/// "24 pgs: 20 active+clean, 4 peering".
fn pg_summary(t: &api::PgTable) -> String {
    let mut by: Vec<(&String, &usize)> = t.summary.iter().collect();
    by.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let parts: Vec<String> = by.iter().map(|(s, n)| format!("{n} {s}")).collect();
    let total: usize = t.summary.values().sum();
    if parts.is_empty() {
        format!("{total} pgs")
    } else {
        format!("{total} pgs: {}", parts.join(", "))
    }
}

async fn pg(cli: &Cli, cmd: &PgCmd, json: bool) -> Result<(), Fail> {
    let c = client(cli).await?;
    let scrub = match cmd {
        PgCmd::Scrub { pgid } => Some((pgid, false, false)),
        PgCmd::DeepScrub { pgid } => Some((pgid, true, false)),
        PgCmd::Repair { pgid } => Some((pgid, true, true)),
        _ => None,
    };
    if let Some((pgid, deep, repair)) = scrub {
        let r = api::ScrubRequest { pgid: pgid.clone(), pool: 0, pg: 0, deep, repair };
        let r: api::ScrubRequest = c.post("/v1/pg/scrub", &r).await?;
        if json {
            print_json(&r);
        } else {
            let what = if repair {
                "repair"
            } else if deep {
                "deep scrub"
            } else {
                "scrub"
            };
            println!(
                "{what} of PG {} asked of its primary; `sluice pg query {}` shows the result",
                r.pgid, r.pgid
            );
        }
        return Ok(());
    }
    let t: api::PgTable = c.get("/v1/pg/stats").await?;
    let list = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    match cmd {
        PgCmd::Stat => {
            if json {
                print_json(&t.summary);
            } else {
                println!("{} (osdmap e{})", pg_summary(&t), t.epoch);
            }
        }
        PgCmd::Ls { pool, state } => {
            let pool_id = match pool {
                Some(name) => {
                    let m: api::MapView = c.get("/v1/osdmap").await?;
                    match m.pools.iter().find(|p| &p.name == name) {
                        Some(p) => Some(p.id),
                        None => return Err(Fail(1, format!("no pool {name:?}"))),
                    }
                }
                None => None,
            };
            let rows: Vec<&api::PgRow> = t
                .pgs
                .iter()
                .filter(|r| pool_id.is_none_or(|p| r.pool == p))
                .filter(|r| state.as_ref().is_none_or(|s| r.state.split('+').any(|x| x == s)))
                .collect();
            if json {
                print_json(&rows);
            } else {
                println!(
                    "{:<8} {:<32} {:<12} {:<12} {:>8} {:>10}",
                    "PG", "STATE", "UP", "ACTING", "VERSION", "RECOVERING"
                );
                for r in rows {
                    println!(
                        "{:<8} {:<32} {:<12} {:<12} {:>8} {:>10}",
                        r.pgid,
                        r.state,
                        format!("[{}]", list(&r.up)),
                        format!("[{}]", list(&r.acting)),
                        r.version,
                        r.recovering
                    );
                }
            }
        }
        PgCmd::Scrub { .. } | PgCmd::DeepScrub { .. } | PgCmd::Repair { .. } => {
            unreachable!("answered above")
        }
        PgCmd::Query { pgid } => {
            let Some(r) = t.pgs.iter().find(|r| &r.pgid == pgid) else {
                return Err(Fail(1, format!("no PG {pgid} at osdmap e{}", t.epoch)));
            };
            if json {
                print_json(r);
            } else {
                println!("pg {} (osdmap e{})", r.pgid, t.epoch);
                println!("  state: {}", r.state);
                println!("  up: [{}]  acting: [{}]", list(&r.up), list(&r.acting));
                println!(
                    "  primary: {}",
                    r.primary.map_or("none".to_string(), |p| format!("osd.{p}"))
                );
                println!("  version: {}  objects to recover: {}", r.version, r.recovering);
                let ago = |ms: u64| {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64);
                    if ms == 0 {
                        "never (since its primary leads it)".to_string()
                    } else {
                        format!("{:.0} s ago", now.saturating_sub(ms) as f64 / 1000.0)
                    }
                };
                println!(
                    "  last scrub: {}  last deep scrub: {}",
                    ago(r.last_scrub_ms),
                    ago(r.last_deep_scrub_ms)
                );
                if r.scrub_errors > 0 {
                    println!(
                        "  scrub errors: {} (`sluice pg repair {}`; the OSD's log names them)",
                        r.scrub_errors, r.pgid
                    );
                }
                match r.reported_secs_ago {
                    Some(a) => println!(
                        "  reported by its primary {a:.1} s ago, at osdmap e{}",
                        r.reported_epoch
                    ),
                    None => println!("  not reported by its primary"),
                }
            }
        }
    }
    Ok(())
}

async fn pool(cli: &Cli, cmd: &PoolCmd, json: bool) -> Result<(), Fail> {
    let c = client(cli).await?;
    match cmd {
        PoolCmd::Ls => {
            let m: MapView = c.get("/v1/osdmap").await?;
            if json {
                print_json(&m.pools);
            } else {
                for p in &m.pools {
                    println!("{}", p.name);
                }
            }
        }
        PoolCmd::Create(p) => {
            let min_size = p.min_size.unwrap_or(p.size - p.size / 2);
            let cmd = Command::CreatePool {
                name: p.name.clone(),
                size: p.size,
                min_size,
                pg_num: p.pg_num,
            };
            let r = command(&c, cmd).await?;
            done(&r, &format!("pool {:?} created", p.name));
        }
        PoolCmd::Rm { name, yes_i_really_mean_it } => {
            if !yes_i_really_mean_it {
                return Err(Fail(
                    2,
                    format!("deleting pool {name:?} destroys its data: add --yes-i-really-mean-it"),
                ));
            }
            let r = command(&c, Command::RemovePool { name: name.clone() }).await?;
            done(&r, &format!("pool {name:?} removed"));
        }
        PoolCmd::Set { name, key, value } => {
            let cmd = Command::SetPool { name: name.clone(), key: key.clone(), value: *value };
            let r = command(&c, cmd).await?;
            done(&r, &format!("pool {name:?} {key} = {value}"));
        }
        PoolCmd::Get { name, key } => {
            let m: MapView = c.get("/v1/osdmap").await?;
            let Some(p) = m.pools.iter().find(|p| &p.name == name) else {
                return Err(Fail(1, format!("pool {name:?} does not exist")));
            };
            let all = serde_json::to_value(p).expect("serializes");
            let v = match key {
                None => all,
                Some(k) => match all.get(k) {
                    Some(v) => serde_json::json!({ k.as_str(): v }),
                    None => return Err(Fail(2, format!("unknown pool setting {k:?}"))),
                },
            };
            if json {
                print_json(&v);
            } else if let serde_json::Value::Object(o) = v {
                for (k, v) in o {
                    println!("{k}: {v}");
                }
            }
        }
    }
    Ok(())
}

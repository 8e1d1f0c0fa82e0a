//! `sluice-osd`: the object storage daemon and its store tools.
//!
//! * `mkfs` creates a store on a device file or block device;
//! * `fsck` checks it without writing;
//! * `dump` prints every PG's objects (size, crc32c, xattrs) and log, to compare replicas;
//! * `run` opens every shard on its own reactor, exactly as `fsck` reads it, and serves.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use sluice_control::maps::placement::PgId;
use sluice_control::maps::{OsdId, OsdMap, PoolId};
use sluice_control::osd_agent::{AgentAuth, DataplaneAuth, MapSink, ScrubSink, SecretsSink};
use sluice_dataplane::osd::{CoreAuth, CoreCmd, CoreMsg, MapView, OsdCore};
use sluice_dataplane::park::ParkState;
use sluice_dataplane::reactor::{self, CpuPlan, PollArgs, PollMode, ReactorConfig};
use sluice_dataplane::store::{
    self, MkfsError, MkfsOptions, MountOptions, Shard, StoreConfig, StorePools,
};
use sluice_dataplane::{Context, PollResult, Poller, Waker, mesh};
use sluice_net::frame::Limits;
use sluice_net::ops;
use sluice_net::tcp::Server;
use sluice_nvme::PoolOptions;
use sluice_nvme::{AnyDevice, DeviceOptions, DeviceSpec, Opener};
use sluice_vocab::{ByteSize, CoreId};

#[derive(Debug, Parser)]
#[command(
    name = "sluice-osd",
    version,
    about = "The Sluice object storage daemon and its store tools."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once per process: the size difference of the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create an empty store on a device. Refuses to overwrite a store or other data
    /// unless --force is given, and says what it found.
    Mkfs {
        #[command(flatten)]
        dev: DevArgs,
        /// Size of the device file to create; for a block device, defaults to its size.
        #[arg(long)]
        size: Option<ByteSize>,
        /// Store shards: one per reactor core.
        #[arg(long, default_value_t = 1)]
        shards: u16,
        /// Log segment size (default: a 32nd of a shard, 1M..64M). The largest
        /// transaction must fit in one segment.
        #[arg(long)]
        segment_size: Option<ByteSize>,
        /// Destroy whatever is on the device.
        #[arg(long)]
        force: bool,
    },
    /// Check every structure of a store without writing anything. Exit code 0: clean,
    /// 1: problems (listed), 2: the check could not run.
    Fsck {
        #[command(flatten)]
        dev: DevArgs,
        /// Also read every data block and verify its checksum.
        #[arg(long)]
        deep: bool,
    },
    /// Print every PG's objects (size, crc32c of the data, xattrs) and PG log (without
    /// entries peering rolled back), in PG and name order, one line each: the same PG on two OSDs prints the same lines when the
    /// replicas are identical (`diff` them). The OSD must be stopped; the store is
    /// opened as `run` opens it (which writes a fresh checkpoint, as every mount does).
    Dump {
        #[command(flatten)]
        dev: DevArgs,
        /// Only this PG, as `sluice osd map` prints it (POOL.PG, the PG in hex: 1.1f).
        #[arg(long)]
        pg: Option<String>,
        /// Leave out the PG log entries.
        #[arg(long)]
        no_log: bool,
    },
    /// Open the store and serve. Each shard runs on its own reactor thread.
    Run {
        #[command(flatten)]
        dev: DevArgs,
        /// Where the reactors run: `auto` pins them to distinct CPUs, shard 0 on the one
        /// that takes the device's interrupts (its completions then need no cross-CPU
        /// wakeup; measured 2x the 4 KiB write rate of the other CPU here); `none` leaves
        /// them to the scheduler (several OSDs sharing a host's CPUs); or one CPU per
        /// shard, e.g. `0,1`.
        #[arg(long, default_value = "auto")]
        cpus: CpuPlan,
        #[command(flatten)]
        poll: PollArgs,
        /// Mount retries after the first attempt when the device fails to read.
        #[arg(long, default_value_t = 5)]
        mount_retries: u32,
        /// Open the device without O_DIRECT (through the page cache; flushes still make
        /// writes durable on the file). For benchmarks that take the device out of the
        /// measurement with a file on tmpfs, which has no O_DIRECT.
        #[arg(long)]
        buffered: bool,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
}

/// The device holding the store.
#[derive(Debug, Clone, clap::Args)]
struct DevArgs {
    /// The device: a file (mkfs creates it with --size), a block device, or an NVMe
    /// namespace driven from userspace over VFIO, `nvme://PCI-ADDRESS/NSID` such as
    /// `nvme://0000:00:04.0/1` (the controller must be bound to vfio-pci; see
    /// docs/bare-metal.md).
    #[arg(long)]
    dev: DeviceSpec,
    /// NVMe over VFIO: take DMA memory from 4 KiB pages instead of 2 MiB hugepages.
    #[arg(long)]
    no_hugepages: bool,
}

impl DevArgs {
    fn options(&self, direct: bool) -> DeviceOptions {
        DeviceOptions { direct, hugepages: !self.no_hugepages, ..DeviceOptions::default() }
    }

    fn is_nvme(&self) -> bool {
        matches!(self.dev, DeviceSpec::Nvme(_))
    }

    /// A path-like name for messages and CPU placement.
    fn name(&self) -> String {
        self.dev.to_string()
    }
}

/// How the OSD joins its cluster. Without a configuration it runs standalone (store only).
#[derive(Debug, clap::Args)]
struct ClusterArgs {
    /// Cluster configuration (sluice.conf: fsid, monitors). Also $SLUICE_CONF. Without
    /// one, the OSD serves its store but joins no cluster.
    #[arg(long = "conf", short = 'c')]
    conf: Option<PathBuf>,
    /// Rack in the placement hierarchy (used when the OSD first registers).
    #[arg(long, default_value = "default-rack")]
    rack: String,
    /// Host in the placement hierarchy (default: this machine's hostname).
    #[arg(long)]
    host: Option<String>,
    /// Placement weight (1.0 = a reference device).
    #[arg(long, default_value_t = 1.0)]
    weight: f64,
    /// Address the monitors and peer OSDs reach this OSD on.
    #[arg(long, default_value = "127.0.0.1")]
    public_ip: std::net::IpAddr,
    /// This OSD's own keyring (with auth = "cephx"): holds its osd.N key, written (mode
    /// 0600) when the OSD first registers. Default: the device path + ".keyring".
    #[arg(long)]
    keyring: Option<PathBuf>,
    /// Who registers this OSD the first time, when its keyring does not exist yet: an
    /// entity with mon 'profile bootstrap-osd' or 'allow *' (default: the configuration's `name`, else
    /// client.admin).
    #[arg(long)]
    bootstrap_name: Option<String>,
    /// The bootstrap entity's keyring (default: the configuration's keyring).
    #[arg(long)]
    bootstrap_keyring: Option<PathBuf>,
}

fn main() {
    sluice_control::init_logging("info");
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Mkfs { dev, size, shards, segment_size, force } => {
            report(mkfs(&dev, size, shards, segment_size, force))
        }
        Cmd::Fsck { dev, deep } => match fsck(&dev, deep) {
            Ok(clean) => {
                if clean {
                    0
                } else {
                    1
                }
            }
            Err(e) => {
                eprintln!("sluice-osd fsck: {e:#}");
                2
            }
        },
        Cmd::Dump { dev, pg, no_log } => report(dump(&dev, pg.as_deref(), !no_log)),
        Cmd::Run { dev, cpus, poll, mount_retries, buffered, cluster } => {
            report(run(&dev, &cpus, poll.mode(), mount_retries, buffered, &cluster))
        }
    };
    std::process::exit(code);
}

fn report(r: anyhow::Result<()>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("sluice-osd: {e:#}");
            1
        }
    }
}

fn open_dev(dev: &DevArgs) -> anyhow::Result<AnyDevice> {
    sluice_nvme::open_device(&dev.dev, 64, &dev.options(true)).map_err(anyhow::Error::msg)
}

fn mkfs(
    dev: &DevArgs,
    size: Option<ByteSize>,
    shards: u16,
    segment: Option<ByteSize>,
    force: bool,
) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let file = match &dev.dev {
        DeviceSpec::Path(p) => Some(p.as_path()),
        DeviceSpec::Nvme(_) => None,
    };
    if size.is_some() && file.is_none() {
        bail!("--size applies to device files; an NVMe namespace has its own size");
    }
    if let Some(path) = file
        && !std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
    {
        let Some(size) = size else {
            bail!("--size is needed to create the device file {}", path.display());
        };
        let bytes = size.0 / 4096 * 4096;
        let existing = std::fs::metadata(path).map_or(0, |m| m.len());
        if existing > 0 && existing != bytes && !force {
            bail!(
                "{} exists with {} bytes, not the {} asked for; pass --force to resize and overwrite it",
                path.display(),
                existing,
                bytes
            );
        }
        if existing != bytes {
            let f =
                std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path)?;
            f.set_len(bytes).with_context(|| format!("sizing {}", path.display()))?;
        }
    }
    let path = dev.name();
    let mut dev = open_dev(dev)?;
    let opts = MkfsOptions { shards, segment_bytes: segment.map(|s| s.0), force, fsid: None };
    match store::mkfs(&mut dev, &opts) {
        Ok(sb) => {
            let region = sb.shards[0].blocks * 4096;
            println!(
                "created a Sluice store on {path}: fsid {}, {} shard(s) of {}, segments of {}",
                sb.fsid.iter().map(|b| format!("{b:02x}")).collect::<String>(),
                sb.shards.len(),
                ByteSize(region),
                ByteSize(u64::from(sb.segment_blocks) * 4096)
            );
            Ok(())
        }
        Err(e @ MkfsError::Exists { .. }) => Err(e.into()),
        Err(e) => Err(e.into()),
    }
}

fn fsck(dev: &DevArgs, deep: bool) -> anyhow::Result<bool> {
    let path = dev.name();
    let mut dev = open_dev(dev)?;
    let r = store::fsck(&mut dev, deep);
    for (i, s) in r.shards.iter().enumerate() {
        println!(
            "shard {i}: {} collections, {} objects, {} live blocks, {} journal records replayed{}",
            s.collections,
            s.objects,
            s.live_blocks,
            s.replayed_records,
            if deep { format!(", {} blocks verified", s.blocks_verified) } else { String::new() }
        );
    }
    for n in &r.notes {
        println!("note: {n}");
    }
    for p in &r.problems {
        println!("PROBLEM: {p}");
    }
    if r.is_clean() {
        println!("{path}: clean");
    } else {
        println!("{path}: {} problem(s)", r.problems.len());
    }
    Ok(r.is_clean())
}

fn dump(dev: &DevArgs, only: Option<&str>, with_log: bool) -> anyhow::Result<()> {
    use sluice_control::maps::placement::PgId;
    use sluice_dataplane::osd::LogEntry;
    use sluice_dataplane::store::{Answer, CollId, Query, blocking};
    use std::io::Write as _;
    let mut probe = open_dev(dev)?;
    let dsb = store::read_device_superblock(&mut probe).map_err(anyhow::Error::new)?;
    drop(probe);
    let mut lines: Vec<(PgId, String)> = Vec::new();
    let name = dev.name();
    for shard in 0..dsb.shards.len() as u16 {
        let d = open_dev(dev)?;
        let mut s = Shard::open(d, shard, StoreConfig::default())
            .map_err(|f| anyhow::anyhow!("{name}: shard {shard}: {}", f.error))?;
        let mut q = |q: Query| {
            blocking::run_query(&mut s, q)
                .map_err(|e| anyhow::anyhow!("{name}: shard {shard}: {e}"))
        };
        let Answer::Collections(colls) = q(Query::ListCollections)? else {
            bail!("ListCollections answered something else")
        };
        for coll in colls {
            let pg = PgId::from_collection(coll.0);
            if only.is_some_and(|o| o != pg.to_string()) {
                continue;
            }
            let mut after = None;
            loop {
                let Answer::List { names, next } =
                    q(Query::List { coll: CollId(coll.0), after: after.clone(), max: 1024 })?
                else {
                    bail!("List answered something else")
                };
                for obj in &names {
                    let Answer::Data(d) =
                        q(Query::Read { coll, name: obj.clone(), offset: 0, len: u64::MAX })?
                    else {
                        bail!("Read answered something else")
                    };
                    let Answer::Xattrs(x) = q(Query::GetXattrs { coll, name: obj.clone() })? else {
                        bail!("GetXattrs answered something else")
                    };
                    let xattrs: Vec<String> = x
                        .iter()
                        .map(|(k, v)| format!("{}={:08x}", escape(k), crc32c::crc32c(v)))
                        .collect();
                    lines.push((
                        pg,
                        format!(
                            "pg {pg} object {} size {} crc32c {:08x} xattrs [{}]",
                            escape(obj),
                            d.data().len(),
                            crc32c::crc32c(d.data()),
                            xattrs.join(" ")
                        ),
                    ));
                }
                match next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
            if with_log {
                let mut after = None;
                loop {
                    let Answer::PgLog(entries) = q(Query::PgLog { coll, after, max: 4096 })? else {
                        bail!("PgLog answered something else")
                    };
                    let Some(&(last, _)) = entries.last() else { break };
                    for (v, e) in &entries {
                        let line = match LogEntry::decode(e) {
                            // Undone by peering: as if absent (later writes reuse the key).
                            Some(e) if e.op == LogEntry::ROLLED_BACK => continue,
                            Some(e) => format!(
                                "pg {pg} log {v} client {:016x} tid {} op {} object {}",
                                e.client,
                                e.tid,
                                e.op,
                                escape(&e.object)
                            ),
                            None => format!("pg {pg} log {v} UNDECODABLE {} bytes", e.len()),
                        };
                        lines.push((pg, line));
                    }
                    after = Some(last);
                }
            }
        }
    }
    // PG order, then the lines of each PG as they came (objects by name, then the log).
    lines.sort_by_key(|(pg, _)| (pg.pool.0, pg.pg));
    let mut out = std::io::stdout().lock();
    for (_, l) in lines {
        writeln!(out, "{l}")?;
    }
    Ok(())
}

/// Object names and keys may hold anything: spaces, newlines and `%` are escaped.
fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '%' || c.is_whitespace() || c.is_control() {
            for b in c.to_string().bytes() {
                o.push_str(&format!("%{b:02x}"));
            }
        } else {
            o.push(c);
        }
    }
    o
}

/// The per-core poller that owns a shard. It gains the network side with the serving path.
struct ShardPoller {
    shard: Shard<AnyDevice>,
}

impl Poller for ShardPoller {
    fn on_stop(&mut self) {
        let shard = self.shard.shard_id();
        if let Err(e) = self.shard.checkpoint_for_stop(&mut |_| {}) {
            tracing::warn!(
                "shard {shard}: no checkpoint at stop ({e}); the journal is replayed at the next start"
            );
        }
    }

    fn name(&self) -> &'static str {
        "store-shard"
    }

    fn poll(&mut self, _cx: &mut Context<'_>) -> PollResult {
        PollResult::busy_if(self.shard.poll(&mut |e| tracing::debug!("store event: {e:?}")))
    }

    fn prepare_park(&mut self) -> bool {
        self.shard.prepare_park()
    }

    fn after_park(&mut self) {
        self.shard.after_park()
    }

    fn device_in_flight(&self) -> usize {
        self.shard.device_in_flight()
    }

    fn park_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.shard.park_fd()
    }
}

fn run(
    dev: &DevArgs,
    cpus: &CpuPlan,
    mode: PollMode,
    mount_retries: u32,
    buffered: bool,
    cluster: &ClusterArgs,
) -> anyhow::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    // SIGINT and SIGTERM are taken by the main thread only: block them before any
    // thread starts so the reactors inherit the mask.
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGINT);
    sigs.add(Signal::SIGTERM);
    sigs.thread_block()?;

    if buffered && dev.is_nvme() {
        bail!("--buffered applies to device files; an NVMe namespace is always direct");
    }
    let path_name = dev.name();
    let path = Path::new(&path_name);
    let opener =
        Arc::new(Opener::open(&dev.dev, &dev.options(!buffered)).map_err(anyhow::Error::msg)?);
    let mut probe = opener.queue_pair(64, Vec::new()).map_err(anyhow::Error::msg)?;
    let mount = MountOptions { retries: mount_retries, ..Default::default() };
    let dsb = store::read_device_superblock(&mut probe).map_err(anyhow::Error::new)?;
    drop(probe);
    let shards = dsb.shards.len();
    let conf_path = cluster
        .conf
        .clone()
        .or_else(|| std::env::var_os(sluice_control::conf::ENV).map(PathBuf::from));
    let conf = match &conf_path {
        Some(p) => Some(sluice_control::conf::Conf::load(p)?),
        None => None,
    };
    let placement = cpus.place(path, shards).map_err(|_| {
        anyhow::anyhow!(
            "the store has {shards} shard(s): give one CPU per shard (--cpus), or auto, or none"
        )
    })?;
    if let Some(why) = &placement.why {
        tracing::info!("{why}");
    }
    let cpus = placement.cpus;
    // One dataplane port per core, bound before the reactors start so they can be
    // published in the map; each core serves its own.
    let mut listeners = Vec::new();
    if conf.is_some() {
        for _ in 0..shards {
            listeners.push(Some(std::net::TcpListener::bind((cluster.public_ip, 0))?));
        }
    }
    let core_ports = listeners
        .iter()
        .flatten()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<Vec<_>, _>>()?;
    let parks = (0..shards).map(|_| ParkState::new()).collect::<Result<Vec<_>, _>>()?;
    let wakers: Vec<Waker> = parks.iter().map(|p| Waker::new(Arc::clone(p))).collect();
    let (outboxes, inboxes) = mesh::<CoreMsg>(wakers.clone(), 0, 4096);
    let mut map_txs = Vec::new();
    let mut cmd_txs = Vec::new();
    let auth_on = conf.as_ref().is_some_and(|c| c.auth == sluice_control::conf::Auth::Cephx);
    let secure = conf.as_ref().is_some_and(|c| c.secure);
    let mut secret_txs = Vec::new();
    let (pg_tx, pg_rx) = sluice_control::osd_agent::PgReportRx::channel();
    let (tx, rx) = mpsc::channel::<(u16, Result<String, String>)>();
    let mut handles = Vec::new();
    for ((shard, (outbox, inbox)), park) in
        (0..shards as u16).zip(outboxes.into_iter().zip(inboxes)).zip(parks)
    {
        let cfg = ReactorConfig { core: CoreId(shard), cpu: cpus[shard as usize], mode };
        let opener = Arc::clone(&opener);
        let hugepages = dev.is_nvme() && !dev.no_hugepages;
        let name = path_name.clone();
        let tx = tx.clone();
        let (map_tx, map_rx) = mpsc::channel::<MapView>();
        map_txs.push(map_tx);
        let (cmd_tx, cmd_rx) = mpsc::channel::<CoreCmd>();
        cmd_txs.push(cmd_tx);
        let core_auth = auth_on.then(|| {
            let (tx, rx) = mpsc::channel();
            secret_txs.push(tx);
            CoreAuth { secure, secrets: rx }
        });
        let listener = listeners.get_mut(shard as usize).and_then(Option::take);
        let pg_tx = pg_tx.clone();
        let h = reactor::spawn(cfg, park, move |r| {
            let store_cfg = StoreConfig { mount, ..Default::default() };
            // Made before the queue pair so it can register them as fixed buffers.
            let opened = StorePools::with_options(&store_cfg, PoolOptions { hugepages })
                .map_err(|e| format!("{name}: DMA memory for shard {shard}: {e}"))
                .and_then(|pools| opener.queue_pair(128, pools.all()).map(|dev| (dev, pools)))
                .and_then(|(dev, pools)| {
                    Shard::open_with(dev, shard, store_cfg, Some(pools))
                        .map_err(|f| f.error.to_string())
                });
            let opened = opened.and_then(|s| {
                let info = s.replay_info().clone();
                let msg = format!(
                    "{} journal records replayed{}",
                    info.records,
                    info.torn_tail.map_or(String::new(), |(off, seq)| format!(
                        ", torn tail at byte offset {off} (record {seq}) cut off"
                    ))
                );
                let poller: Box<dyn Poller> = match listener {
                    Some(l) => {
                        let server = Server::from_listener(l, ops::FEATURES, Limits::DEFAULT)
                            .map_err(|e| e.to_string())?;
                        let mut core = OsdCore::open(
                            s, server, shard, shards, outbox, inbox, map_rx, core_auth,
                        )
                        .map_err(|e| e.to_string())?;
                        core.report_pgs_to(pg_tx);
                        core.commands_from(cmd_rx);
                        let msg = format!("{msg}, {} PG(s)", core.pg_count());
                        return Ok((msg, Box::new(core) as Box<dyn Poller>));
                    }
                    None => Box::new(ShardPoller { shard: s }),
                };
                Ok((msg, poller))
            });
            match opened {
                Ok((msg, poller)) => {
                    let _ = tx.send((shard, Ok(msg)));
                    r.add_poller(poller)?;
                    Ok(())
                }
                Err(e) => {
                    let _ = tx.send((shard, Err(e.clone())));
                    Err(std::io::Error::other(e))
                }
            }
        })?;
        handles.push(h);
    }
    drop(tx);
    let mut failed = Vec::new();
    for _ in 0..shards {
        match rx.recv() {
            Ok((s, Ok(msg))) => tracing::info!("shard {s} open: {msg}"),
            Ok((s, Err(e))) => failed.push(format!("shard {s}: {e}")),
            Err(_) => failed.push("a reactor thread died while opening its shard".into()),
        }
    }
    if !failed.is_empty() {
        for h in handles {
            let _ = h.stop();
        }
        bail!("the store could not be opened; nothing was changed:\n  {}", failed.join("\n  "));
    }
    let agent = match conf {
        Some(conf) => {
            tracing::info!(
                "store on {} open on {shards} reactor(s), serving on ports {core_ports:?}; stop with Ctrl-C",
                path.display()
            );
            let map_wakers = wakers.clone();
            let cmd_wakers = wakers.clone();
            let scrubs = ScrubSink(Arc::new(move |s: sluice_control::api::ScrubRequest| {
                let pg = PgId { pool: PoolId(s.pool), pg: s.pg };
                let cmd = CoreCmd::Scrub { pg, deep: s.deep || s.repair, repair: s.repair };
                // Every core is told; the one that owns the PG scrubs it.
                for (tx, w) in cmd_txs.iter().zip(&cmd_wakers) {
                    let _ = tx.send(cmd.clone());
                    w.wake();
                }
            }));
            let sink = MapSink(Arc::new(move |map: Arc<OsdMap>, me: OsdId, tuning| {
                for (tx, w) in map_txs.iter().zip(&map_wakers) {
                    let _ = tx.send(MapView { map: Arc::clone(&map), me, tuning });
                    w.wake();
                }
            }));
            let secrets = SecretsSink(Arc::new(move |s: DataplaneAuth| {
                for (tx, w) in secret_txs.iter().zip(&wakers) {
                    let _ = tx.send(s.clone());
                    w.wake();
                }
            }));
            let auth = if auth_on {
                Some(agent_auth(&conf, dev, secrets, cluster)?)
            } else {
                tracing::warn!(
                    "auth = \"none\" in {}: this OSD serves anyone who can reach it",
                    conf.path.display()
                );
                None
            };
            Some(start_agent(conf, dsb.fsid, core_ports, (sink, scrubs), auth, pg_rx, cluster)?)
        }
        None => {
            tracing::info!(
                "store on {} open on {shards} reactor(s); no cluster configuration (--conf, $SLUICE_CONF): running standalone, serving no clients; stop with Ctrl-C",
                path.display()
            );
            None
        }
    };
    let sig = sigs.wait()?;
    tracing::info!("{sig:?}: stopping");
    if let Some((stop, thread)) = agent {
        let _ = stop.send(true);
        match thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("cluster agent: {e:#}"),
            Err(_) => tracing::warn!("cluster agent panicked"),
        }
    }
    for h in handles {
        h.stop()?;
    }
    Ok(())
}

type Agent = (tokio::sync::watch::Sender<bool>, std::thread::JoinHandle<anyhow::Result<()>>);

/// Where this OSD's key is and who registers it the first time (see `ClusterArgs`).
fn agent_auth(
    conf: &sluice_control::conf::Conf,
    dev: &DevArgs,
    on_secrets: SecretsSink,
    cluster: &ClusterArgs,
) -> anyhow::Result<AgentAuth> {
    let keyring = match (&cluster.keyring, &dev.dev) {
        (Some(k), _) => k.clone(),
        (None, DeviceSpec::Path(p)) => {
            let mut p = p.as_os_str().to_owned();
            p.push(".keyring");
            PathBuf::from(p)
        }
        (None, DeviceSpec::Nvme(_)) => bail!(
            "--keyring is needed with an NVMe device: the file where this OSD keeps its osd.N key"
        ),
    };
    let name = cluster
        .bootstrap_name
        .clone()
        .or_else(|| conf.name.clone())
        .unwrap_or_else(|| "client.admin".into());
    let name: sluice_auth::EntityName =
        name.parse().map_err(|e| anyhow::anyhow!("--bootstrap-name {name}: {e}"))?;
    let bootstrap_keyring =
        cluster.bootstrap_keyring.clone().unwrap_or_else(|| conf.keyring_path());
    if keyring.exists() {
        tracing::info!("authenticating with the key in {}", keyring.display());
    } else {
        tracing::info!(
            "no keyring {} yet: registering with {name}'s key from {}",
            keyring.display(),
            bootstrap_keyring.display()
        );
    }
    Ok(AgentAuth { keyring, bootstrap: Some((name, bootstrap_keyring)), on_secrets })
}

/// Starts the cluster agent (boot, map subscription, beacons, heartbeats) on its own
/// thread with a small tokio runtime: never on a dataplane core.
fn start_agent(
    conf: sluice_control::conf::Conf,
    uuid: [u8; 16],
    core_ports: Vec<u16>,
    (on_map, on_scrub): (MapSink, ScrubSink),
    auth: Option<AgentAuth>,
    pg_reports: sluice_control::osd_agent::PgReportRx,
    cluster: &ClusterArgs,
) -> anyhow::Result<Agent> {
    use sluice_control::maps::{Location, osdmap::ONE};
    if !(0.0..=1000.0).contains(&cluster.weight) {
        bail!("--weight {}: use 0..=1000", cluster.weight);
    }
    let host = match &cluster.host {
        Some(h) => h.clone(),
        None => nix::unistd::gethostname()?.to_string_lossy().into_owned(),
    };
    let cfg = sluice_control::osd_agent::AgentConfig {
        conf,
        uuid,
        location: Location { rack: cluster.rack.clone(), host },
        weight: (cluster.weight * f64::from(ONE)).round() as u32,
        public_ip: cluster.public_ip,
        core_ports,
        on_map: Some(on_map),
        auth,
        pg_reports: Some(pg_reports),
        on_scrub: Some(on_scrub),
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let thread = std::thread::Builder::new().name("cluster-agent".into()).spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(sluice_control::osd_agent::run(cfg, stop_rx))
    })?;
    Ok((stop_tx, thread))
}

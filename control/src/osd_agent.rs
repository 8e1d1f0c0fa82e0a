//! The OSD's side of the lifecycle, run by `sluice-osd` on a control thread (never on a
//! dataplane core): boot against the monitors (an id is assigned on first boot, by uuid),
//! follow every map epoch in order through a subscription, send beacons, heartbeat the
//! peer OSDs over UDP and report the ones that stop answering, boot again when the map
//! says this OSD is down while it is alive, and mark itself down when stopped.
//!
//! With authentication on ([`AgentAuth`]), before the first boot it makes sure the OSD
//! has its own key: read from the OSD's keyring, or, the first time, obtained by
//! registering the OSD (`/v1/osd/new`, signed by a bootstrap entity with mon 'profile
//! bootstrap-osd' or 'allow *', carrying the key the OSD made, sealed) and saved to that
//! keyring (mode 0600). It logs in as `osd.N`, fetches the OSD
//! service's rotating secrets for the dataplane before booting (so no client can reach
//! a core that cannot check tickets), refetches them every quarter of the ticket
//! lifetime (the monitors rotate once per lifetime and services accept the previous,
//! current and next secret, so a missed fetch or two never locks clients out), and
//! renews its own ticket halfway through its lifetime. A keyring that exists but cannot
//! be read is an error to retry and report, never a reason to register again.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use crate::api::{self, BootReply, BootRequest, MapUpdate};
use crate::client::MonClient;
use crate::conf::Conf;
use crate::maps::envelope::{self, Kind};
use crate::maps::{Location, OsdAddrs, OsdId, OsdMap};
use crate::monclient::Policy;
use crate::state::Command;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub conf: Conf,
    pub uuid: [u8; 16],
    pub location: Location,
    /// 16.16 fixed point.
    pub weight: u32,
    /// The address peers and monitors reach this OSD's control side on.
    pub public_ip: IpAddr,
    /// One dataplane port per core.
    pub core_ports: Vec<u16>,
    /// Told every new map epoch, with this OSD's id (the dataplane cores serve by it).
    pub on_map: Option<MapSink>,
    /// Authentication (`None`: the cluster runs with `auth = "none"`).
    pub auth: Option<AgentAuth>,
    /// The dataplane cores' PG reports, forwarded to every monitor.
    pub pg_reports: Option<PgReportRx>,
    /// Where scrubs the monitors ask for go (the dataplane cores).
    pub on_scrub: Option<ScrubSink>,
}

/// Where the agent hands scrub requests (`sluice pg scrub|deep-scrub|repair`).
#[derive(Clone)]
pub struct ScrubSink(pub std::sync::Arc<dyn Fn(api::ScrubRequest) + Send + Sync>);

impl std::fmt::Debug for ScrubSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScrubSink")
    }
}

/// One core's report of the PGs it leads (its whole list, replacing the last one).
#[derive(Debug, Clone)]
pub struct CorePgReport {
    pub core: u16,
    pub pgs: Vec<api::PgReport>,
}

/// How a core sends its reports (never blocks).
pub type PgReportTx = mpsc::UnboundedSender<CorePgReport>;

/// The agent's end, taken once by [`run`].
#[derive(Debug, Clone)]
pub struct PgReportRx(
    pub std::sync::Arc<std::sync::Mutex<Option<mpsc::UnboundedReceiver<CorePgReport>>>>,
);

impl PgReportRx {
    pub fn channel() -> (PgReportTx, PgReportRx) {
        let (tx, rx) = mpsc::unbounded_channel();
        (tx, PgReportRx(std::sync::Arc::new(std::sync::Mutex::new(Some(rx)))))
    }
}

/// Reports go out at most this often when they change (and every
/// `osd_pg_stats_interval`, default 2 s, when they do not).
const PG_REPORT_MIN_GAP: Duration = Duration::from_millis(200);

/// How the OSD authenticates (see the module documentation).
#[derive(Debug, Clone)]
pub struct AgentAuth {
    /// The OSD's own keyring: holds `osd.N` once registered.
    pub keyring: std::path::PathBuf,
    /// Who registers this OSD when its keyring has no key yet, and that entity's keyring.
    pub bootstrap: Option<(sluice_auth::EntityName, std::path::PathBuf)>,
    /// Where the OSD service's rotating secrets and this OSD's own OSD service ticket go
    /// (the dataplane cores: they check clients' tickets with the first and present the
    /// second to peer OSDs).
    pub on_secrets: SecretsSink,
}

/// What the agent hands the dataplane for authentication.
#[derive(Debug, Clone)]
pub enum DataplaneAuth {
    /// The OSD service's rotating secrets (to check the tickets of clients and peers).
    Secrets(sluice_auth::RotatingSecrets),
    /// This OSD's own ticket for the OSD service, after every login or renewal (to
    /// present to peer OSDs).
    Ticket(sluice_auth::kdc::ServiceTicket),
}

/// Where the agent hands [`DataplaneAuth`] updates.
#[derive(Clone)]
pub struct SecretsSink(pub std::sync::Arc<dyn Fn(DataplaneAuth) + Send + Sync>);

impl std::fmt::Debug for SecretsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretsSink")
    }
}

/// The agent's authentication state.
struct AuthRun {
    cfg: AgentAuth,
    /// This OSD's entity and key, once known.
    key: Option<(sluice_auth::EntityName, sluice_auth::Secret)>,
    creds: Option<sluice_auth::kdc::Credentials>,
    /// When the secrets were last fetched, and what was handed to the cores.
    fetched: Option<Instant>,
    sent: Option<sluice_auth::RotatingSecrets>,
    /// Last error, so a failure that repeats is logged once.
    last_error: Option<String>,
}

/// Where the agent hands each new map (the dataplane's cores), with this OSD's id and the
/// settings of the central config the cores follow ([`OsdTuning::of`]).
#[derive(Clone)]
#[allow(clippy::type_complexity)]
pub struct MapSink(
    pub std::sync::Arc<dyn Fn(std::sync::Arc<OsdMap>, OsdId, OsdTuning) + Send + Sync>,
);

/// What the dataplane's cores take from the central config (`sluice config set`), handed
/// to them with every map and whenever it changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OsdTuning {
    /// The read lease a primary asks its PGs' members for ([`read_lease`]).
    pub read_lease: Duration,
    /// `osd_recovery_max_active` (default 8): objects this OSD copies at once for
    /// recovery and backfill, over all its PGs (shared between its cores, at least one
    /// each).
    pub recovery_max_active: usize,
    /// `osd_pg_log_keep` (default 2000, at least 16): PG log entries a primary keeps per
    /// PG. A member whose last version is older than the log's start is backfilled.
    pub pg_log_keep: u64,
    /// `osd_scrub_interval` (default 86400 s) and `osd_deep_scrub_interval` (default
    /// 604800 s): a primary scrubs (deep-scrubs) each of its PGs once at least this long
    /// has passed since its last one, one PG per core at a time; 0 turns it off.
    pub scrub_interval: Duration,
    pub deep_scrub_interval: Duration,
    /// `osd_nobackfill` (`true`/`1`; default off): backfills alongside writes copy
    /// nothing while set (their PGs show `backfill_wait`; writes go on), for
    /// maintenance. A primary that must be backfilled itself is not held.
    pub nobackfill: bool,
}

impl Default for OsdTuning {
    fn default() -> OsdTuning {
        OsdTuning::of(&BTreeMap::new())
    }
}

impl OsdTuning {
    pub fn of(config: &BTreeMap<String, String>) -> OsdTuning {
        let int = |key: &str, default: u64, min: u64| {
            config.get(key).and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(default).max(min)
        };
        let interval = |key: &str, default: f64| {
            let s = api::config_secs(config, key, default);
            if s <= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(s.max(0.05)) }
        };
        OsdTuning {
            read_lease: read_lease(config),
            recovery_max_active: int("osd_recovery_max_active", 8, 1) as usize,
            pg_log_keep: int("osd_pg_log_keep", 2000, 16),
            scrub_interval: interval("osd_scrub_interval", 86400.0),
            deep_scrub_interval: interval("osd_deep_scrub_interval", 604800.0),
            nobackfill: config
                .get("osd_nobackfill")
                .is_some_and(|v| matches!(v.trim(), "true" | "1" | "yes" | "on")),
        }
    }
}

fn scrub_name(s: &api::ScrubRequest) -> &'static str {
    match (s.repair, s.deep) {
        (true, _) => "repair",
        (false, true) => "deep scrub",
        (false, false) => "scrub",
    }
}

/// The read lease a primary asks its PGs' members for: `osd_read_lease_ratio` (0.8) x
/// `osd_heartbeat_grace` (20 s), as Ceph's `osd_pool_default_read_lease_ratio`: it has
/// generally run out by the time peers have reported a failed OSD and it is marked down,
/// so a new primary seldom waits for it.
pub fn read_lease(config: &BTreeMap<String, String>) -> Duration {
    let ratio = config
        .get("osd_read_lease_ratio")
        .and_then(|r| r.parse::<f64>().ok())
        .filter(|r| r.is_finite() && *r > 0.0)
        .unwrap_or(0.8);
    secs(config, "osd_heartbeat_grace", 20.0).mul_f64(ratio.min(10.0))
}

impl std::fmt::Debug for MapSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MapSink")
    }
}

const HB_VERSION: u16 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct Heartbeat {
    fsid: [u8; 16],
    from: OsdId,
    seq: u64,
    reply: bool,
}

#[derive(Debug)]
struct Peer {
    addr: SocketAddr,
    up_from: u64,
    /// When we started expecting answers (it came up in our map).
    since: Instant,
    last_reply: Option<Instant>,
    reported: bool,
}

fn secs(cfg: &BTreeMap<String, String>, key: &str, default: f64) -> Duration {
    Duration::from_secs_f64(api::config_secs(cfg, key, default).max(0.05))
}

/// Runs until `shutdown` turns true. Errors talking to the monitors are retried (the
/// monitor client fails over); only a local failure (no socket) ends the agent early.
pub async fn run(cfg: AgentConfig, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let sock = UdpSocket::bind((cfg.public_ip, 0)).await?;
    let addrs = OsdAddrs { public: sock.local_addr()?, core_ports: cfg.core_ports.clone() };
    let client_id = u64::from_le_bytes(cfg.uuid[..8].try_into().expect("8 bytes"));
    let mon = MonClient::from_conf(&cfg.conf, client_id);
    mon.start_background_check();
    let boot_req =
        BootRequest { uuid: cfg.uuid, location: cfg.location.clone(), weight: cfg.weight, addrs };
    let (mut updates, have) = subscribe(mon.clone());
    let mut reports = cfg.pg_reports.as_ref().and_then(|r| r.0.lock().expect("lock").take());
    // PG reports go to every monitor (each answers `sluice pg` and health from its own).
    let per_mon =
        cfg.conf.mon_hosts.iter().map(|h| mon.pinned(h, Duration::from_secs(2))).collect();
    let mut a = Agent {
        map: OsdMap::new(cfg.conf.fsid),
        cfg,
        mon,
        sock,
        config: BTreeMap::new(),
        published: None,
        me: None,
        need_boot: true,
        boot_epoch: u64::MAX,
        peers: BTreeMap::new(),
        seq: 0,
        next_beacon: Instant::now(),
        next_ping: Instant::now(),
        auth: None,
        per_mon,
        pg_reports: BTreeMap::new(),
        pg_dirty: false,
        next_pg_report: Instant::now(),
        last_pg_report: Instant::now(),
    };
    a.auth = a.cfg.auth.clone().map(|cfg| AuthRun {
        cfg,
        key: None,
        creds: None,
        fetched: None,
        sent: None,
        last_error: None,
    });
    let mut buf = vec![0u8; 512];
    while !*shutdown.borrow() {
        if a.need_boot && !a.authenticate().await {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => {}
            }
            continue;
        }
        if a.need_boot && !a.boot(&boot_req).await {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => {}
            }
            continue;
        }
        let wake = a.next_beacon.min(a.next_ping).min(a.pg_report_due());
        tokio::select! {
            _ = shutdown.changed() => {}
            _ = tokio::time::sleep_until(wake.into()) => {}
            Some(r) = async { match reports.as_mut() { Some(rx) => rx.recv().await, None => None } } => {
                a.pg_reports.insert(r.core, r.pgs);
                a.pg_dirty = true;
            }
            Some(u) = updates.recv() => {
                a.apply_update(u);
                let _ = have.send(a.map.epoch);
            }
            r = a.sock.recv_from(&mut buf) => {
                if let Ok((n, from)) = r {
                    a.on_datagram(&buf[..n], from).await;
                }
            }
        }
        a.timers().await;
    }
    a.mark_down().await;
    Ok(())
}

/// The map subscription: a long poll in its own task, feeding updates through a channel;
/// the agent tells it (through the watch) the epoch it has after each one.
fn subscribe(mon: MonClient) -> (mpsc::Receiver<MapUpdate>, watch::Sender<u64>) {
    let (upd_tx, upd_rx) = mpsc::channel::<MapUpdate>(4);
    let (have_tx, have_rx) = watch::channel(0u64);
    tokio::spawn(async move {
        loop {
            let have = *have_rx.borrow();
            let path = format!("/v1/subscribe?have={have}&wait_ms=10000");
            let bytes = match mon.get_bytes(&path, Duration::from_secs(10)).await {
                Ok(b) => b,
                Err(e) => {
                    // Before the agent's first login a cluster with keys refuses us: expected.
                    if matches!(e, crate::client::ClientError::Unauthenticated(_))
                        && !mon.has_credentials()
                    {
                        tracing::debug!("subscription: {e} (not logged in yet)");
                    } else {
                        tracing::warn!("subscription: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            match envelope::open::<MapUpdate>(Kind::MapUpdate, api::MAP_UPDATE_VERSION, &bytes) {
                Ok(u) => {
                    if upd_tx.send(u).await.is_err() {
                        return;
                    }
                    // Wait until the agent has taken it in before asking again.
                    let mut rx = have_rx.clone();
                    let _ =
                        tokio::time::timeout(Duration::from_secs(1), rx.wait_for(|h| *h != have))
                            .await;
                }
                Err(e) => {
                    tracing::warn!("map update undecodable: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
    (upd_rx, have_tx)
}

struct Agent {
    cfg: AgentConfig,
    mon: MonClient,
    sock: UdpSocket,
    map: OsdMap,
    config: BTreeMap<String, String>,
    /// The read lease last handed to the dataplane with a map.
    /// What the cores were last handed.
    published: Option<OsdTuning>,
    me: Option<OsdId>,
    need_boot: bool,
    /// The epoch of our last boot: only a later map saying we are down means it.
    boot_epoch: u64,
    peers: BTreeMap<OsdId, Peer>,
    seq: u64,
    next_beacon: Instant,
    next_ping: Instant,
    auth: Option<AuthRun>,
    /// One client per monitor, for PG reports; each core's latest PG list.
    per_mon: Vec<MonClient>,
    pg_reports: BTreeMap<u16, Vec<api::PgReport>>,
    pg_dirty: bool,
    next_pg_report: Instant,
    last_pg_report: Instant,
}

impl Agent {
    /// With authentication on: the OSD's key (registering it the first time), a valid
    /// ticket, and fresh rotating secrets at the cores. True when all are in place (or
    /// authentication is off); false to retry (the error was logged).
    async fn authenticate(&mut self) -> bool {
        let ttl = crate::auth::policy(&self.config).ticket_ttl_ms;
        let Some(run) = &mut self.auth else { return true };
        match auth_step(run, &self.mon, &self.cfg, ttl).await {
            Ok(()) => {
                if run.last_error.take().is_some() {
                    tracing::info!("authentication works again");
                }
                true
            }
            Err(e) => {
                if run.last_error.as_ref() != Some(&e) {
                    tracing::warn!("authentication: {e}; retrying");
                } else {
                    tracing::debug!("authentication: {e}; retrying");
                }
                run.last_error = Some(e);
                false
            }
        }
    }

    fn fsid(&self) -> [u8; 16] {
        self.cfg.conf.fsid
    }

    /// Registers and boots; false when the monitors could not be reached (retry).
    async fn boot(&mut self, req: &BootRequest) -> bool {
        match self.mon.post::<_, BootReply>("/v1/osd/boot", req).await {
            Ok(r) => {
                if r.deferred {
                    // Booted again when noup clears (seen in a map update).
                    tracing::info!("{}: boot deferred (noup is set)", r.id);
                } else {
                    tracing::info!("booted as {} at epoch {}", r.id, r.epoch);
                    self.next_beacon = Instant::now() + self.secs("osd_beacon_interval", 5.0);
                }
                self.me = Some(r.id);
                if self.map.epoch > 0 {
                    self.publish();
                }
                self.need_boot = false;
                self.boot_epoch = r.epoch;
                true
            }
            Err(e) => {
                tracing::warn!("boot: {e}; retrying");
                false
            }
        }
    }

    fn secs(&self, key: &str, default: f64) -> Duration {
        secs(&self.config, key, default)
    }

    /// Hands the current map to the dataplane (once we know who we are).
    fn publish(&mut self) {
        if let (Some(sink), Some(me)) = (&self.cfg.on_map, self.me) {
            let tuning = OsdTuning::of(&self.config);
            self.published = Some(tuning);
            (sink.0)(std::sync::Arc::new(self.map.clone()), me, tuning);
        }
    }

    fn apply_update(&mut self, u: MapUpdate) {
        let before = self.map.epoch;
        let fsid = self.fsid();
        if let Err(e) = api::apply_map_update(&mut self.map, fsid, &u) {
            // Out of order or damaged: start again from a full map.
            tracing::warn!("map update: {e}; refetching the full map");
        }
        self.config = u.config;
        if let Some(p) =
            self.config.get("mon_client_selection").and_then(|p| p.parse::<Policy>().ok())
        {
            let default = self.cfg.conf.mon_check_interval.as_secs_f64();
            self.mon.reconfigure(p, self.secs("mon_client_check_interval", default));
        }
        if self.map.epoch != before {
            tracing::debug!("map epoch {} -> {}", before, self.map.epoch);
            self.publish();
        } else if self.map.epoch > 0 && Some(OsdTuning::of(&self.config)) != self.published {
            self.publish();
        }
        if let Some(id) = self.me
            && let Some(o) = self.map.osd(id)
            && !o.up
            && o.uuid == self.cfg.uuid
            && !self.map.flags.noup
            && self.map.epoch > self.boot_epoch
        {
            tracing::warn!(
                "map epoch {} says {id} is down (since epoch {}) while it is alive: booting again",
                self.map.epoch,
                o.down_at
            );
            self.need_boot = true;
        }
        // Peers: every up OSD but us; a new interval resets its clock.
        let now = Instant::now();
        let up: BTreeMap<OsdId, (SocketAddr, u64)> = self
            .map
            .osds
            .values()
            .filter(|o| o.up && Some(o.id) != self.me)
            .filter_map(|o| o.addrs.as_ref().map(|a| (o.id, (a.public, o.up_from))))
            .collect();
        self.peers.retain(|id, p| up.get(id).is_some_and(|(a, f)| *a == p.addr && *f == p.up_from));
        for (id, (addr, up_from)) in up {
            self.peers.entry(id).or_insert(Peer {
                addr,
                up_from,
                since: now,
                last_reply: None,
                reported: false,
            });
        }
    }

    /// A heartbeat ping (answered) or reply (recorded); anything else is ignored.
    async fn on_datagram(&mut self, bytes: &[u8], from: SocketAddr) {
        let Ok(hb) = envelope::open::<Heartbeat>(Kind::Heartbeat, HB_VERSION, bytes) else {
            tracing::debug!("garbage heartbeat from {from}");
            return;
        };
        if hb.fsid != self.fsid() {
            tracing::warn!("heartbeat from {from} of another cluster ignored");
            return;
        }
        if hb.reply {
            if let Some(p) = self.peers.get_mut(&hb.from) {
                p.last_reply = Some(Instant::now());
            }
        } else if let Some(id) = self.me {
            let pong = Heartbeat { fsid: self.fsid(), from: id, seq: hb.seq, reply: true };
            let sealed = envelope::seal(Kind::Heartbeat, HB_VERSION, HB_VERSION, &pong);
            let _ = self.sock.send_to(&sealed, from).await;
        }
    }

    /// When the PG report is due: soon after a change, else at the interval.
    fn pg_report_due(&self) -> Instant {
        if self.pg_dirty {
            self.next_pg_report.min(self.last_pg_report + PG_REPORT_MIN_GAP)
        } else {
            self.next_pg_report
        }
    }

    /// Sends the cores' PG reports to every monitor (without waiting for the answers: a
    /// monitor that is down must not delay heartbeats).
    fn send_pg_reports(&mut self, id: OsdId) {
        let now = Instant::now();
        self.next_pg_report = now + self.secs("osd_pg_stats_interval", 2.0);
        self.last_pg_report = now;
        self.pg_dirty = false;
        let r = api::PgStatsReport {
            id,
            uuid: self.cfg.uuid,
            epoch: self.map.epoch,
            pgs: self.pg_reports.values().flatten().cloned().collect(),
        };
        for m in &self.per_mon {
            let m = m.clone();
            let r = r.clone();
            let sink = self.cfg.on_scrub.clone();
            tokio::spawn(async move {
                match m.post::<_, api::PgStatsAck>("/v1/osd/pgstats", &r).await {
                    Ok(ack) => {
                        for s in ack.scrub {
                            tracing::info!("{} of PG {} asked for", scrub_name(&s), s.pgid);
                            if let Some(sink) = &sink {
                                (sink.0)(s);
                            }
                        }
                    }
                    Err(e) => tracing::debug!("PG report to {}: {e}", m.current()),
                }
            });
        }
    }

    /// Beacons and heartbeats that are due, and the failure reports they lead to.
    async fn timers(&mut self) {
        let Some(id) = self.me else { return };
        // Renewals and secret refreshes that are due (a failure is retried next time;
        // the cores keep the secrets they have).
        self.authenticate().await;
        let now = Instant::now();
        if now >= self.pg_report_due() && self.cfg.pg_reports.is_some() {
            self.send_pg_reports(id);
        }
        if now >= self.next_beacon {
            self.next_beacon = now + self.secs("osd_beacon_interval", 5.0);
            let b = api::Beacon { id, uuid: self.cfg.uuid, epoch: self.map.epoch };
            if let Err(e) = self.mon.post::<_, u64>("/v1/osd/beacon", &b).await {
                tracing::warn!("beacon: {e}");
            }
        }
        if now < self.next_ping {
            return;
        }
        self.next_ping = now + self.secs("osd_heartbeat_interval", 1.0);
        let grace = self.secs("osd_heartbeat_grace", 20.0);
        self.seq += 1;
        let ping = Heartbeat { fsid: self.fsid(), from: id, seq: self.seq, reply: false };
        let ping = envelope::seal(Kind::Heartbeat, HB_VERSION, HB_VERSION, &ping);
        let mut reports = Vec::new();
        for (pid, p) in self.peers.iter_mut() {
            let _ = self.sock.send_to(&ping, p.addr).await;
            let heard = p.last_reply.unwrap_or(p.since);
            if now.duration_since(heard) > grace {
                // Re-sent every interval: the monitor only counts recent reports.
                reports.push(api::FailureReport { reporter: id, target: *pid, failed: true });
                p.reported = true;
            } else if p.reported {
                reports.push(api::FailureReport { reporter: id, target: *pid, failed: false });
                p.reported = false;
            }
        }
        for r in reports {
            if r.failed {
                tracing::info!("{} does not answer heartbeats: reporting it", r.target);
            }
            if let Err(e) = self.mon.post::<_, bool>("/v1/osd/failure", &r).await {
                tracing::warn!("failure report: {e}");
            }
        }
    }

    /// Graceful stop: tell the monitors now rather than letting them find out.
    async fn mark_down(&self) {
        let Some(id) = self.me else { return };
        let mut quick = self.mon.clone();
        quick.deadline = Duration::from_secs(3);
        quick.attempt_timeout = Duration::from_secs(2);
        let cmd = Command::MarkDown { ids: vec![id], by_operator: true };
        match quick.post::<_, crate::state::Response>("/v1/command", &cmd).await {
            Ok(_) => tracing::info!("{id} marked itself down"),
            Err(e) => tracing::warn!("could not mark {id} down ({e}); the monitors will notice"),
        }
    }
}

/// One round of [`Agent::authenticate`].
async fn auth_step(
    run: &mut AuthRun,
    mon: &MonClient,
    cfg: &AgentConfig,
    ttl_ms: u64,
) -> Result<(), String> {
    use sluice_auth::Service;
    if run.key.is_none() {
        run.key = Some(osd_key(run, mon, cfg).await?);
    }
    let (entity, key) = run.key.clone().expect("just set");
    let now = crate::auth::wall_ms();
    if run.creds.as_ref().is_none_or(|c| c.renewal_due(now)) {
        let old = run.creds.as_ref().map(|c| c.auth_ticket.clone());
        let creds = mon
            .login(&entity, &key, old, &[Service::Osd])
            .await
            .map_err(|e| format!("login as {entity}: {e}"))?;
        tracing::debug!("logged in as {entity} (global id {})", creds.global_id);
        // Boots, beacons, reports and the map subscription are signed with it.
        mon.set_credentials(Some(creds.clone()));
        // The cores present its OSD ticket to peer OSDs (replication).
        let t = creds.ticket(Service::Osd).map_err(|e| format!("login as {entity}: {e}"))?;
        (run.cfg.on_secrets.0)(DataplaneAuth::Ticket(t.clone()));
        run.creds = Some(creds);
    }
    // A quarter of the lifetime, between a second and ten minutes.
    let every =
        Duration::from_millis(ttl_ms / 4).clamp(Duration::from_secs(1), Duration::from_secs(600));
    if run.fetched.is_none_or(|t| t.elapsed() >= every) {
        let creds = run.creds.as_ref().expect("logged in above");
        let secrets = mon
            .fetch_rotating(creds, Service::Osd)
            .await
            .map_err(|e| format!("fetching the OSD secrets as {entity}: {e}"))?;
        run.fetched = Some(Instant::now());
        if run.sent.as_ref() != Some(&secrets) {
            tracing::info!(
                "OSD secrets up to id {} handed to the dataplane",
                secrets.entries().last().map_or(0, |e| e.id)
            );
            (run.cfg.on_secrets.0)(DataplaneAuth::Secrets(secrets.clone()));
            run.sent = Some(secrets);
        }
    }
    Ok(())
}

/// The OSD's entity and key: from its keyring, or by registering it (once).
async fn osd_key(
    run: &AuthRun,
    mon: &MonClient,
    cfg: &AgentConfig,
) -> Result<(sluice_auth::EntityName, sluice_auth::Secret), String> {
    use sluice_auth::keyring::{Keyring, KeyringEntry};
    let path = &run.cfg.keyring;
    if path.exists() {
        // An unreadable keyring is reported and retried; registering again would give
        // this OSD's id a second key behind the operator's back.
        let k = Keyring::load(path).map_err(|e| e.to_string())?;
        let mut osds = k.iter().filter(|(n, _)| n.kind() == sluice_auth::EntityKind::Osd);
        return match (osds.next(), osds.next()) {
            (Some((n, e)), None) => Ok((n.clone(), e.key.clone())),
            (None, _) => Err(format!("keyring {} holds no osd.N key", path.display())),
            (Some(_), Some(_)) => Err(format!(
                "keyring {} holds keys of several OSDs: give this OSD its own",
                path.display()
            )),
        };
    }
    let Some((who, bootstrap)) = &run.cfg.bootstrap else {
        return Err(format!(
            "no keyring {} for this OSD and no bootstrap key to register it with \
             (--bootstrap-name, --bootstrap-keyring)",
            path.display()
        ));
    };
    let secret = Keyring::load_key(bootstrap, who).map_err(|e| e.to_string())?;
    let creds = mon
        .login(who, &secret, None, &[])
        .await
        .map_err(|e| format!("login as {who} to register this OSD: {e}"))?;
    // The OSD makes its own key; it travels sealed under the session key and is never
    // handed out by the monitors.
    let key = sluice_auth::Secret::generate();
    let req = crate::api::OsdNewRequest {
        uuid: cfg.uuid,
        location: cfg.location.clone(),
        weight: cfg.weight,
        key_sealed: sluice_auth::request::seal_reply(&creds.session_key, b"osd-new-key", &key),
    };
    let r = mon.osd_new(&creds, &req).await.map_err(|e| format!("registering as {who}: {e}"))?;
    let mut entry = KeyringEntry::new(key.clone());
    entry.caps = crate::auth::parse_caps(&r.caps)?;
    let mut k = Keyring::new();
    k.insert(r.entity.clone(), entry);
    k.save(path).map_err(|e| e.to_string())?;
    tracing::info!("registered as {} by {who}; its key is in {}", r.entity, path.display());
    Ok((r.entity, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_read_lease_follows_the_heartbeat_grace_and_refuses_nonsense() {
        let mut c = BTreeMap::new();
        assert_eq!(read_lease(&c), Duration::from_secs(16));
        c.insert("osd_heartbeat_grace".to_string(), "3".to_string());
        assert_eq!(read_lease(&c), Duration::from_millis(2400));
        c.insert("osd_read_lease_ratio".to_string(), "0.5".to_string());
        assert_eq!(read_lease(&c), Duration::from_millis(1500));
        for bad in ["-1", "0", "NaN", "inf", "x"] {
            c.insert("osd_read_lease_ratio".to_string(), bad.to_string());
            assert_eq!(read_lease(&c), Duration::from_millis(2400), "ratio {bad}");
        }
    }

    #[test]
    fn tuning_has_sane_defaults_floors_and_an_off_switch_for_scrubs() {
        let mut c = BTreeMap::new();
        let t = OsdTuning::of(&c);
        assert_eq!((t.recovery_max_active, t.pg_log_keep), (8, 2000));
        assert_eq!(t.scrub_interval, Duration::from_secs(86400));
        assert_eq!(t.deep_scrub_interval, Duration::from_secs(7 * 86400));
        for (k, v) in [
            ("osd_recovery_max_active", "0"),
            ("osd_pg_log_keep", "3"),
            ("osd_scrub_interval", "0"),
            ("osd_deep_scrub_interval", "2.5"),
        ] {
            c.insert(k.to_string(), v.to_string());
        }
        let t = OsdTuning::of(&c);
        assert_eq!((t.recovery_max_active, t.pg_log_keep), (1, 16));
        assert_eq!(t.scrub_interval, Duration::ZERO, "0 turns periodic scrubs off");
        assert_eq!(t.deep_scrub_interval, Duration::from_millis(2500));
        c.insert("osd_pg_log_keep".to_string(), "x".to_string());
        assert_eq!(OsdTuning::of(&c).pg_log_keep, 2000, "nonsense falls back to the default");
        assert!(!t.nobackfill);
        c.insert("osd_nobackfill".to_string(), "true".to_string());
        assert!(OsdTuning::of(&c).nobackfill);
        c.insert("osd_nobackfill".to_string(), "false".to_string());
        assert!(!OsdTuning::of(&c).nobackfill);
    }
}

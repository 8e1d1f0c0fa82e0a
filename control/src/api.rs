//! The monitors' management API: the JSON shapes shared by `sluice-mon`, the `sluice`
//! CLI, OSDs and the client library. Documented for operators in `docs/api.md`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::conf::format_fsid;
use crate::maps::{Incremental, Location, OsdAddrs, OsdId, OsdMap, osdmap::ONE};

/// Header carrying the caller's cluster fsid; a monitor of another cluster refuses.
pub const FSID_HEADER: &str = "x-sluice-fsid";
/// Set on a request a monitor forwarded to the leader (never forwarded again).
pub const FORWARDED_HEADER: &str = "x-sluice-forwarded";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// No leader, or the write did not commit in time: retry, or check the monitors.
    NoQuorum,
    /// The caller belongs to another cluster.
    WrongFsid,
    /// The cluster refused the command (no such pool, pool exists, ...).
    Rejected,
    BadRequest,
    Internal,
    /// Authentication failed (wrong key, unknown entity, stale challenge, ...), or this
    /// cluster has no keys.
    Unauthenticated,
    /// Authenticated, but the caps do not allow it (the message names the missing cap).
    PermissionDenied,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ping {
    pub name: String,
    pub fsid: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum HealthStatus {
    #[serde(rename = "HEALTH_OK")]
    Ok,
    #[serde(rename = "HEALTH_WARN")]
    Warn,
    #[serde(rename = "HEALTH_ERR")]
    Err,
}

impl HealthStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Ok => "HEALTH_OK",
            HealthStatus::Warn => "HEALTH_WARN",
            HealthStatus::Err => "HEALTH_ERR",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub severity: HealthStatus,
    pub summary: String,
    pub detail: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub status: HealthStatus,
    pub checks: Vec<Check>,
}

impl Health {
    pub fn from_checks(checks: Vec<Check>) -> Health {
        let status = checks.iter().map(|c| c.severity).max().unwrap_or(HealthStatus::Ok);
        Health { status, checks }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MonMember {
    pub name: String,
    pub addr: String,
    /// Answered this monitor's last probes (always true for itself).
    pub reachable: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MonStatus {
    /// The monitor that answered.
    pub name: String,
    pub members: Vec<MonMember>,
    pub leader: Option<String>,
    pub term: u64,
    pub last_applied: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OsdSummary {
    pub epoch: u64,
    pub osds: usize,
    pub up: usize,
    #[serde(rename = "in")]
    pub is_in: usize,
    pub flags: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub fsid: String,
    pub health: Health,
    pub mon: MonStatus,
    pub osdmap: OsdSummary,
    pub pools: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OsdView {
    pub id: u32,
    pub uuid: String,
    pub up: bool,
    #[serde(rename = "in")]
    pub is_in: bool,
    pub weight: f64,
    pub primary_affinity: f64,
    pub rack: String,
    pub host: String,
    pub addrs: Option<OsdAddrs>,
    pub maintenance: String,
    pub up_from: u64,
    pub down_at: u64,
}

/// `GET /v1/osd/map?pool=P&object=O`: where an object lives at the current epoch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ObjectMapView {
    pub epoch: u64,
    pub pool: String,
    pub pool_id: u32,
    pub object: String,
    /// `POOL.PG` with the PG in hex, as everywhere.
    pub pg: String,
    /// The OSDs the PG's replicas belong on, in replica order (up or not).
    pub placement: Vec<u32>,
    /// The up subset, primary first.
    pub up: Vec<u32>,
    pub primary: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolView {
    pub id: u32,
    pub name: String,
    pub size: u8,
    pub min_size: u8,
    pub pg_num: u32,
    pub failure_domain: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MapView {
    pub fsid: String,
    pub epoch: u64,
    pub flags: Vec<String>,
    pub osds: Vec<OsdView>,
    pub pools: Vec<PoolView>,
}

pub fn flag_names(m: &OsdMap) -> Vec<String> {
    let f = &m.flags;
    [("noout", f.noout), ("noup", f.noup), ("nodown", f.nodown), ("pause", f.pause)]
        .into_iter()
        .filter(|(_, on)| *on)
        .map(|(n, _)| n.to_string())
        .collect()
}

impl MapView {
    pub fn of(m: &OsdMap) -> MapView {
        MapView {
            fsid: format_fsid(&m.fsid),
            epoch: m.epoch,
            flags: flag_names(m),
            osds: m
                .osds
                .values()
                .map(|o| OsdView {
                    id: o.id.0,
                    uuid: format_fsid(&o.uuid),
                    up: o.up,
                    is_in: o.is_in,
                    weight: f64::from(o.weight) / f64::from(ONE),
                    primary_affinity: f64::from(o.primary_affinity) / f64::from(ONE),
                    rack: o.location.rack.clone(),
                    host: o.location.host.clone(),
                    addrs: o.addrs.clone(),
                    maintenance: format!("{:?}", o.maintenance).to_lowercase(),
                    up_from: o.up_from,
                    down_at: o.down_at,
                })
                .collect(),
            pools: m
                .pools
                .values()
                .map(|p| PoolView {
                    id: p.id.0,
                    name: p.name.clone(),
                    size: p.size,
                    min_size: p.min_size,
                    pg_num: p.pg_num,
                    failure_domain: format!("{:?}", p.failure_domain).to_lowercase(),
                })
                .collect(),
        }
    }
}

/// An OSD starting: registered by uuid if new (the id is assigned then), then marked up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BootRequest {
    pub uuid: [u8; 16],
    pub location: Location,
    /// 16.16 fixed point (1.0 = 65536).
    pub weight: u32,
    pub addrs: OsdAddrs,
}

/// A new OSD's registration with authentication on (`POST /v1/osd/new`, signed by an
/// entity with mon 'profile bootstrap-osd' or 'allow *'): the OSD made its own key and
/// sends it sealed under the caller's session key (`sluice_auth::request::seal_reply`,
/// label `osd-new-key`); it gets its id, and the monitors store the key as `osd.N` with
/// caps `profile osd` at monitors and OSDs. The same uuid and key again answer the same
/// id (a registration whose answer was lost); the same uuid with another key is refused.
/// Keys are never handed out here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OsdNewRequest {
    pub uuid: [u8; 16],
    pub location: Location,
    /// 16.16 fixed point.
    pub weight: u32,
    pub key_sealed: Vec<u8>,
}

/// The answer, sealed under the caller's session key (label `osd-new`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OsdNewReply {
    pub id: OsdId,
    pub entity: sluice_auth::EntityName,
    pub caps: BTreeMap<sluice_auth::Service, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BootReply {
    pub id: OsdId,
    pub epoch: u64,
    /// `noup` is set: the OSD stays down for now and boots again when it clears.
    pub deferred: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Beacon {
    pub id: OsdId,
    pub uuid: [u8; 16],
    pub epoch: u64,
}

/// One PG as its primary reports it (`POST /v1/osd/pgstats`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgReport {
    pub pool: u32,
    pub pg: u32,
    /// The map epoch the primary saw.
    pub epoch: u64,
    /// Primary first.
    pub acting: Vec<u32>,
    pub version: u64,
    /// Ceph's names: active, clean, peering, recovering, degraded, undersized, down.
    pub state: Vec<String>,
    /// Objects still to copy by recovery.
    pub recovering: u64,
    /// Inconsistent copies the last scrub found (0: none, or never scrubbed).
    #[serde(default)]
    pub scrub_errors: u64,
    /// When its last scrub and deep scrub by this primary finished (Unix ms; 0: none).
    #[serde(default)]
    pub last_scrub_ms: u64,
    #[serde(default)]
    pub last_deep_scrub_ms: u64,
}

/// An OSD's report of the PGs it leads, sent to every monitor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PgStatsReport {
    pub id: OsdId,
    pub uuid: [u8; 16],
    pub epoch: u64,
    pub pgs: Vec<PgReport>,
}

/// `POST /v1/pg/scrub`: scrub a PG (`sluice pg scrub|deep-scrub|repair`). The monitor
/// hands it to the PG's primary with the answer to its next PG report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubRequest {
    /// POOL.PG, the PG in hex (as `sluice pg ls` prints it).
    pub pgid: String,
    pub pool: u32,
    pub pg: u32,
    /// Data checksums too.
    pub deep: bool,
    /// Copy good copies over the inconsistent ones it finds.
    pub repair: bool,
}

/// The answer to an OSD's PG report: the map epoch, and scrubs for PGs it leads.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PgStatsAck {
    pub epoch: u64,
    pub scrub: Vec<ScrubRequest>,
}

/// One PG as a monitor sees it (`GET /v1/pg/stats`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PgRow {
    pub pgid: String,
    pub pool: u32,
    pub pg: u32,
    /// `+`-joined states, e.g. `active+clean`; `unknown`, `stale`, `down`, `peering`
    /// when the monitor has no current report (see `pgstats`).
    pub state: String,
    pub up: Vec<u32>,
    pub acting: Vec<u32>,
    pub primary: Option<u32>,
    pub version: u64,
    pub recovering: u64,
    /// Inconsistent copies its last scrub found, and when its primary last scrubbed and
    /// deep-scrubbed it (Unix ms; 0: not since it leads the PG).
    #[serde(default)]
    pub scrub_errors: u64,
    #[serde(default)]
    pub last_scrub_ms: u64,
    #[serde(default)]
    pub last_deep_scrub_ms: u64,
    pub reported_secs_ago: Option<f64>,
    pub reported_epoch: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PgTable {
    pub epoch: u64,
    pub pgs: Vec<PgRow>,
    /// PGs per state.
    pub summary: BTreeMap<String, usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailureReport {
    pub reporter: OsdId,
    pub target: OsdId,
    /// false: the target answers again (withdraws the report).
    pub failed: bool,
}

/// What a subscriber gets (sealed as `Kind::MapUpdate`): the incrementals after the epoch
/// it has, in order, or the full map when it is too far behind; and the central config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapUpdate {
    pub full: Option<OsdMap>,
    pub incrementals: Vec<Incremental>,
    pub config: BTreeMap<String, String>,
}

pub const MAP_UPDATE_VERSION: u16 = 1;

/// Applies a subscription update to `map` (a full map if there is one, then every
/// incremental past its epoch, in order). On an error the map is reset to epoch 0 of
/// `fsid`, so the next subscription asks for a full map.
pub fn apply_map_update(
    map: &mut crate::maps::OsdMap,
    fsid: [u8; 16],
    u: &MapUpdate,
) -> Result<(), crate::maps::MapError> {
    if let Some(full) = &u.full {
        *map = full.clone();
    }
    for inc in &u.incrementals {
        if inc.epoch <= map.epoch {
            continue;
        }
        if let Err(e) = map.apply(inc) {
            *map = crate::maps::OsdMap::new(fsid);
            return Err(e);
        }
    }
    Ok(())
}

/// A setting from central config in seconds (`20`, `0.5`), or `default`.
pub fn config_secs(config: &BTreeMap<String, String>, key: &str, default: f64) -> f64 {
    config
        .get(key)
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v >= 0.0)
        .unwrap_or(default)
}

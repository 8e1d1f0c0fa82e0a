//! The replicated state machine of the monitors: the OSD map with its recent history of
//! incrementals (for subscribers), and central config. Every replica applies the same
//! committed [`Command`]s in the same order, so this code must be deterministic: no
//! clocks, no randomness, no iteration over hash maps.
//!
//! Policy lives here (what a command may do given the flags); structure checks live in
//! [`OsdMap::apply`]. A command that changes the map produces exactly one incremental.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::auth::AuthState;

use crate::maps::{
    Change, FailureDomain, Flag, Incremental, Location, Maintenance, MapError, OsdAddrs, OsdId,
    OsdMap, PoolId,
};

/// Incrementals kept for subscribers that are behind; older ones must fetch the full map.
pub const HISTORY: usize = 500;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// First boot of an OSD: assigns an id. Idempotent: the same uuid gets the same id.
    RegisterOsd {
        uuid: [u8; 16],
        location: Location,
        weight: u32,
    },
    /// The OSD is running at these addresses. With `noup` it stays down.
    Boot {
        id: OsdId,
        uuid: [u8; 16],
        addrs: OsdAddrs,
    },
    /// Failure detection or an operator. With `nodown`, failure-detector marks are ignored.
    MarkDown {
        ids: Vec<OsdId>,
        by_operator: bool,
    },
    /// An operator marks OSDs in or out.
    SetIn {
        ids: Vec<OsdId>,
        is_in: bool,
    },
    /// The failure detector marks down OSDs out after the down-out interval (unless
    /// `noout`); such an OSD is marked in again when it boots.
    AutoOut {
        ids: Vec<OsdId>,
    },
    SetLocation {
        id: OsdId,
        location: Location,
    },
    SetPrimaryAffinity {
        id: OsdId,
        affinity: u32,
    },
    SetMaintenance {
        id: OsdId,
        state: Maintenance,
    },
    SetFlag {
        flag: Flag,
        on: bool,
    },
    CreatePool {
        name: String,
        size: u8,
        min_size: u8,
        pg_num: u32,
    },
    RemovePool {
        name: String,
    },
    /// `key` is one of `size`, `min_size`, `pg_num`.
    SetPool {
        name: String,
        key: String,
        value: u32,
    },
    ConfigSet {
        key: String,
        value: String,
    },
    ConfigRm {
        key: String,
    },
    /// The leader's rotation of a service's secret: `next` becomes the next secret (its
    /// id follows the last one, so a retried proposal is refused, not applied twice).
    AuthRotate {
        service: sluice_auth::Service,
        next: sluice_auth::ticket::RotatingSecret,
    },
    /// Adds an entity (its key made by the monitor that took the request). With
    /// `keep_existing`, an existing entity is kept as it is and returned (get-or-create);
    /// without, an existing one is refused.
    AuthPut {
        entity: sluice_auth::EntityName,
        record: sluice_auth::kdc::EntityRecord,
        keep_existing: bool,
    },
    AuthRm {
        entity: sluice_auth::EntityName,
    },
    /// Replaces an entity's caps (in effect at its next ticket renewal).
    AuthCaps {
        entity: sluice_auth::EntityName,
        caps: BTreeMap<sluice_auth::Service, sluice_auth::Caps>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Applied; the map is now at this epoch (unchanged if nothing changed).
    Done {
        epoch: u64,
    },
    Registered {
        id: OsdId,
        epoch: u64,
    },
    /// `noup` is set: the OSD stays down until it is cleared.
    BootDeferred {
        epoch: u64,
    },
    /// An entity of the key database, as it now is.
    AuthEntity {
        record: sluice_auth::kdc::EntityRecord,
        created: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum CommandError {
    #[error("{0} does not exist")]
    NoOsd(OsdId),
    #[error("{id} is registered with another uuid")]
    UuidMismatch { id: OsdId },
    #[error("pool {0:?} does not exist")]
    NoPool(String),
    #[error("pool {0:?} exists already")]
    PoolExists(String),
    #[error("unknown pool setting {0:?} (size, min_size, pg_num)")]
    UnknownPoolKey(String),
    #[error("config key {0:?}: 1..=128 bytes of [a-z0-9_.-]")]
    BadConfigKey(String),
    #[error("{0}")]
    Rejected(String),
}

impl From<MapError> for CommandError {
    fn from(e: MapError) -> Self {
        CommandError::Rejected(e.to_string())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub osdmap: OsdMap,
    /// The last [`HISTORY`] incrementals, oldest first.
    pub history: VecDeque<Incremental>,
    pub config: BTreeMap<String, String>,
    /// OSDs the failure detector marked out (not an operator): marked in at boot.
    pub auto_out: BTreeSet<OsdId>,
    /// Keys, caps and the services' rotating secrets (state format 2 and later).
    pub auth: AuthState,
}

/// The state format: 2 added [`ClusterState::auth`].
pub const STATE_VERSION: u16 = 2;

/// [`ClusterState`] as state format 1 wrote it (before auth).
#[derive(Deserialize)]
pub(crate) struct ClusterStateV1 {
    osdmap: OsdMap,
    history: VecDeque<Incremental>,
    config: BTreeMap<String, String>,
    auto_out: BTreeSet<OsdId>,
}

impl From<ClusterStateV1> for ClusterState {
    fn from(v: ClusterStateV1) -> ClusterState {
        // A cluster made before auth has no keys: it runs with auth = "none" until keys
        // are imported.
        ClusterState {
            osdmap: v.osdmap,
            history: v.history,
            config: v.config,
            auto_out: v.auto_out,
            auth: AuthState::default(),
        }
    }
}

/// Decodes a state payload of format `version` (1 or 2).
pub(crate) fn decode_state(version: u16, payload: &[u8]) -> Result<ClusterState, postcard::Error> {
    if version < 2 {
        return postcard::take_from_bytes::<ClusterStateV1>(payload).map(|(v, _)| v.into());
    }
    postcard::take_from_bytes::<ClusterState>(payload).map(|(v, _)| v)
}

/// What a subscriber at `have` must receive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Catchup<'a> {
    UpToDate,
    Incrementals(Vec<&'a Incremental>),
    /// Too far behind (or ahead, i.e. another cluster's epochs): send the full map.
    FullMap(&'a OsdMap),
}

impl ClusterState {
    pub fn new(fsid: [u8; 16]) -> ClusterState {
        ClusterState {
            osdmap: OsdMap::new(fsid),
            history: VecDeque::new(),
            config: BTreeMap::new(),
            auto_out: BTreeSet::new(),
            auth: AuthState::default(),
        }
    }

    /// A new cluster's state with the key database founded at mkfs.
    pub fn with_auth(fsid: [u8; 16], auth: AuthState) -> ClusterState {
        ClusterState { auth, ..ClusterState::new(fsid) }
    }

    /// Everything after epoch `have`, in order.
    pub fn catch_up(&self, have: u64) -> Catchup<'_> {
        let now = self.osdmap.epoch;
        if have == now {
            return Catchup::UpToDate;
        }
        match self.history.front() {
            Some(first) if have < now && have + 1 >= first.epoch => {
                Catchup::Incrementals(self.history.iter().filter(|i| i.epoch > have).collect())
            }
            _ => Catchup::FullMap(&self.osdmap),
        }
    }

    fn commit(&mut self, changes: Vec<Change>) -> Result<u64, CommandError> {
        if changes.is_empty() {
            return Ok(self.osdmap.epoch);
        }
        let inc = Incremental { fsid: self.osdmap.fsid, epoch: self.osdmap.epoch + 1, changes };
        self.osdmap.apply(&inc)?;
        self.history.push_back(inc);
        while self.history.len() > HISTORY {
            self.history.pop_front();
        }
        Ok(self.osdmap.epoch)
    }

    fn need_osd(&self, id: OsdId) -> Result<&crate::maps::OsdInfo, CommandError> {
        self.osdmap.osd(id).ok_or(CommandError::NoOsd(id))
    }

    fn pool_id(&self, name: &str) -> Result<PoolId, CommandError> {
        self.osdmap
            .pool_by_name(name)
            .map(|p| p.id)
            .ok_or_else(|| CommandError::NoPool(name.into()))
    }

    /// Applies a committed command. Deterministic; an error changes nothing.
    pub fn apply(&mut self, cmd: &Command) -> Result<Response, CommandError> {
        let m = &self.osdmap;
        match cmd {
            Command::RegisterOsd { uuid, location, weight } => {
                if let Some(o) = m.osds.values().find(|o| o.uuid == *uuid) {
                    return Ok(Response::Registered { id: o.id, epoch: m.epoch });
                }
                let id = OsdId(m.next_osd);
                let epoch = self.commit(vec![Change::NewOsd {
                    id,
                    uuid: *uuid,
                    location: location.clone(),
                    weight: *weight,
                }])?;
                Ok(Response::Registered { id, epoch })
            }
            Command::Boot { id, uuid, addrs } => {
                let o = self.need_osd(*id)?;
                if o.uuid != *uuid {
                    return Err(CommandError::UuidMismatch { id: *id });
                }
                if m.flags.noup {
                    return Ok(Response::BootDeferred { epoch: m.epoch });
                }
                // An OSD that restarts while marked up is first marked down, so peers see
                // a new interval.
                let mut changes = Vec::new();
                if o.up {
                    changes.push(Change::MarkDown { id: *id });
                }
                changes.push(Change::Boot { id: *id, addrs: addrs.clone() });
                let auto_in = self.auto_out.contains(id) && !o.is_in;
                if auto_in {
                    changes.push(Change::SetIn { id: *id, is_in: true });
                }
                let epoch = self.commit(changes)?;
                self.auto_out.remove(id);
                Ok(Response::Done { epoch })
            }
            Command::MarkDown { ids, by_operator } => {
                if m.flags.nodown && !by_operator {
                    return Ok(Response::Done { epoch: m.epoch });
                }
                let mut changes = Vec::new();
                for id in ids {
                    if self.need_osd(*id)?.up {
                        changes.push(Change::MarkDown { id: *id });
                    }
                }
                Ok(Response::Done { epoch: self.commit(changes)? })
            }
            Command::SetIn { ids, is_in } => {
                let mut changes = Vec::new();
                for id in ids {
                    if self.need_osd(*id)?.is_in != *is_in {
                        changes.push(Change::SetIn { id: *id, is_in: *is_in });
                    }
                }
                let epoch = self.commit(changes)?;
                for id in ids {
                    self.auto_out.remove(id);
                }
                Ok(Response::Done { epoch })
            }
            Command::AutoOut { ids } => {
                // Re-checked against the committed map: only down OSDs that are in, and
                // never under noout (the flag may have been set since the proposal).
                let mut changes = Vec::new();
                if !m.flags.noout {
                    for id in ids {
                        let o = self.need_osd(*id)?;
                        if !o.up && o.is_in {
                            changes.push(Change::SetIn { id: *id, is_in: false });
                        }
                    }
                }
                let marked: Vec<OsdId> = changes
                    .iter()
                    .filter_map(|c| match c {
                        Change::SetIn { id, .. } => Some(*id),
                        _ => None,
                    })
                    .collect();
                let epoch = self.commit(changes)?;
                self.auto_out.extend(marked);
                Ok(Response::Done { epoch })
            }
            Command::SetLocation { id, location } => {
                self.need_osd(*id)?;
                let c = Change::SetLocation { id: *id, location: location.clone() };
                Ok(Response::Done { epoch: self.commit(vec![c])? })
            }
            Command::SetPrimaryAffinity { id, affinity } => {
                self.need_osd(*id)?;
                let c = Change::SetPrimaryAffinity { id: *id, affinity: *affinity };
                Ok(Response::Done { epoch: self.commit(vec![c])? })
            }
            Command::SetMaintenance { id, state } => {
                self.need_osd(*id)?;
                let c = Change::SetMaintenance { id: *id, state: *state };
                Ok(Response::Done { epoch: self.commit(vec![c])? })
            }
            Command::SetFlag { flag, on } => {
                let changes = if m.flags.get(*flag) == *on {
                    Vec::new()
                } else {
                    vec![Change::SetFlag { flag: *flag, on: *on }]
                };
                Ok(Response::Done { epoch: self.commit(changes)? })
            }
            Command::CreatePool { name, size, min_size, pg_num } => {
                if m.pool_by_name(name).is_some() {
                    return Err(CommandError::PoolExists(name.clone()));
                }
                let c = Change::CreatePool {
                    id: PoolId(m.next_pool),
                    name: name.clone(),
                    size: *size,
                    min_size: *min_size,
                    pg_num: *pg_num,
                    failure_domain: FailureDomain::Host,
                };
                Ok(Response::Done { epoch: self.commit(vec![c])? })
            }
            Command::RemovePool { name } => {
                let id = self.pool_id(name)?;
                Ok(Response::Done { epoch: self.commit(vec![Change::RemovePool { id }])? })
            }
            Command::SetPool { name, key, value } => {
                let id = self.pool_id(name)?;
                let p = &self.osdmap.pools[&id];
                let (mut size, mut min_size, mut pg_num) = (p.size, p.min_size, p.pg_num);
                let small = |v: u32| {
                    u8::try_from(v)
                        .map_err(|_| CommandError::Rejected(format!("{key} {v} is too large")))
                };
                match key.as_str() {
                    "size" => size = small(*value)?,
                    "min_size" => min_size = small(*value)?,
                    "pg_num" => pg_num = *value,
                    _ => return Err(CommandError::UnknownPoolKey(key.clone())),
                }
                let c = Change::SetPool { id, size, min_size, pg_num };
                Ok(Response::Done { epoch: self.commit(vec![c])? })
            }
            Command::ConfigSet { key, value } => {
                check_key(key)?;
                self.config.insert(key.clone(), value.clone());
                Ok(Response::Done { epoch: self.osdmap.epoch })
            }
            Command::ConfigRm { key } => {
                check_key(key)?;
                self.config.remove(key);
                Ok(Response::Done { epoch: self.osdmap.epoch })
            }
            Command::AuthRotate { service, next } => {
                self.auth.rotate(*service, next.clone()).map_err(CommandError::Rejected)?;
                Ok(Response::Done { epoch: self.osdmap.epoch })
            }
            Command::AuthPut { entity, record, keep_existing } => {
                not_mon(entity)?;
                if let Some(r) = self.auth.entities.get(entity) {
                    if *keep_existing {
                        return Ok(Response::AuthEntity { record: r.clone(), created: false });
                    }
                    return Err(CommandError::Rejected(format!("{entity} exists already")));
                }
                self.auth.entities.insert(entity.clone(), record.clone());
                Ok(Response::AuthEntity { record: record.clone(), created: true })
            }
            Command::AuthRm { entity } => {
                not_mon(entity)?;
                self.auth
                    .entities
                    .remove(entity)
                    .ok_or_else(|| CommandError::Rejected(format!("{entity} does not exist")))?;
                Ok(Response::Done { epoch: self.osdmap.epoch })
            }
            Command::AuthCaps { entity, caps } => {
                not_mon(entity)?;
                let r =
                    self.auth.entities.get_mut(entity).ok_or_else(|| {
                        CommandError::Rejected(format!("{entity} does not exist"))
                    })?;
                r.caps = caps.clone();
                Ok(Response::AuthEntity { record: r.clone(), created: false })
            }
        }
    }
}

/// The monitors' own key is not managed by commands.
fn not_mon(e: &sluice_auth::EntityName) -> Result<(), CommandError> {
    if *e == sluice_auth::EntityName::mon() {
        return Err(CommandError::Rejected("mon. is the monitors' own key".into()));
    }
    Ok(())
}

fn check_key(k: &str) -> Result<(), CommandError> {
    let ok = !k.is_empty()
        && k.len() <= 128
        && k.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
    if ok { Ok(()) } else { Err(CommandError::BadConfigKey(k.into())) }
}

/// Failure detection on the leader (not replicated: its decisions are, as commands).
///
/// An OSD is marked down when `min_reporters` distinct up OSDs reported it failed within
/// the last `grace`, or when it sent no beacon for `beacon_grace`; a down OSD is marked
/// out after `down_out_interval` unless `noout` is set. Times are nanoseconds on the
/// leader's monotonic clock; a new leader starts with a clean slate (and waits a full
/// beacon grace before judging anyone).
#[derive(Debug, Clone)]
pub struct FailureDetector {
    pub grace_ns: u64,
    pub min_reporters: usize,
    pub beacon_grace_ns: u64,
    pub down_out_interval_ns: u64,
    started: u64,
    /// target -> reporter -> time of its latest report.
    reports: BTreeMap<OsdId, BTreeMap<OsdId, u64>>,
    beacons: BTreeMap<OsdId, u64>,
    /// When we first saw each OSD down.
    down_since: BTreeMap<OsdId, u64>,
}

impl FailureDetector {
    pub fn new(
        now: u64,
        grace_ns: u64,
        min_reporters: usize,
        beacon_grace_ns: u64,
        down_out_interval_ns: u64,
    ) -> Self {
        FailureDetector {
            grace_ns,
            min_reporters: min_reporters.max(1),
            beacon_grace_ns,
            down_out_interval_ns,
            started: now,
            reports: BTreeMap::new(),
            beacons: BTreeMap::new(),
            down_since: BTreeMap::new(),
        }
    }

    pub fn report_failure(&mut self, reporter: OsdId, target: OsdId, now: u64) {
        if reporter != target {
            self.reports.entry(target).or_default().insert(reporter, now);
        }
    }

    /// A peer says `target` is alive again: its reports are withdrawn.
    pub fn report_alive(&mut self, reporter: OsdId, target: OsdId) {
        if let Some(r) = self.reports.get_mut(&target) {
            r.remove(&reporter);
        }
    }

    pub fn beacon(&mut self, id: OsdId, now: u64) {
        self.beacons.insert(id, now);
        self.reports.remove(&id);
    }

    /// The commands the leader should propose now.
    pub fn tick(&mut self, map: &OsdMap, now: u64) -> Vec<Command> {
        let mut down = Vec::new();
        let mut out = Vec::new();
        for o in map.osds.values() {
            if o.up {
                self.down_since.remove(&o.id);
                let reporters = self.reports.get(&o.id).map_or(0, |r| {
                    r.iter()
                        .filter(|(rep, at)| {
                            now.saturating_sub(**at) <= self.grace_ns
                                && map.osd(**rep).is_some_and(|ro| ro.up)
                        })
                        .count()
                });
                let last_beacon = self.beacons.get(&o.id).copied().unwrap_or(self.started);
                if reporters >= self.min_reporters
                    || now.saturating_sub(last_beacon) > self.beacon_grace_ns
                {
                    down.push(o.id);
                }
            } else {
                let since = *self.down_since.entry(o.id).or_insert(now);
                if o.is_in
                    && !map.flags.noout
                    && now.saturating_sub(since) >= self.down_out_interval_ns
                {
                    out.push(o.id);
                }
            }
        }
        // Old reports age out.
        for r in self.reports.values_mut() {
            r.retain(|_, at| now.saturating_sub(*at) <= self.grace_ns);
        }
        let mut cmds = Vec::new();
        if !down.is_empty() {
            cmds.push(Command::MarkDown { ids: down, by_operator: false });
        }
        if !out.is_empty() {
            cmds.push(Command::AutoOut { ids: out });
        }
        cmds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store written before auth (state format 1) opens with an empty key database;
    /// the current format keeps the keys. Format 1 is pinned as a struct here, field by
    /// field, so a change to [`ClusterState`] cannot silently change what old stores mean.
    #[test]
    fn states_of_format_1_open_without_keys_and_format_2_keeps_them() {
        use crate::maps::envelope::{self, Kind};
        #[derive(Serialize)]
        struct V1<'a> {
            osdmap: &'a OsdMap,
            history: &'a VecDeque<Incremental>,
            config: &'a BTreeMap<String, String>,
            auto_out: &'a BTreeSet<OsdId>,
        }
        let mut st = cluster(2);
        st.config.insert("k".into(), "v".into());
        let v1 = V1 {
            osdmap: &st.osdmap,
            history: &st.history,
            config: &st.config,
            auto_out: &st.auto_out,
        };
        let old = envelope::seal(Kind::MonState, 1, 1, &v1);
        let back =
            envelope::open_versioned(Kind::MonState, STATE_VERSION, &old, decode_state).unwrap();
        assert_eq!(back, st, "format 1 decodes to the same state, no keys");
        assert!(back.auth.mon_key().is_none());

        let dir = tempfile::tempdir().unwrap();
        let (k, _) = crate::auth::bootstrap_keyring(&dir.path().join("k")).unwrap();
        let mut st =
            ClusterState::with_auth([1; 16], crate::auth::AuthState::bootstrap(&k, 0).unwrap());
        let next = st.auth.rotations_due(10_000, 1000).remove(0);
        st.apply(&Command::AuthRotate { service: next.0, next: next.1.clone() }).unwrap();
        // A retried proposal changes nothing.
        assert!(st.apply(&Command::AuthRotate { service: next.0, next: next.1 }).is_err());
        let new = envelope::seal(Kind::MonState, STATE_VERSION, STATE_VERSION, &st);
        let back =
            envelope::open_versioned(Kind::MonState, STATE_VERSION, &new, decode_state).unwrap();
        assert_eq!(back, st);
        assert_eq!(back.auth.rotating[&next.0].current().id, 2);
    }

    const S: u64 = 1_000_000_000;

    fn loc(h: u8) -> Location {
        Location { rack: "rack0".into(), host: format!("host{h}") }
    }

    fn addrs(p: u16) -> OsdAddrs {
        OsdAddrs {
            public: format!("127.0.0.1:{p}").parse().unwrap(),
            core_ports: vec![p + 1, p + 2],
        }
    }

    fn cluster(n: u8) -> ClusterState {
        let mut st = ClusterState::new([1; 16]);
        for i in 0..n {
            let r = st
                .apply(&Command::RegisterOsd { uuid: [i; 16], location: loc(i), weight: 0x1_0000 })
                .unwrap();
            let Response::Registered { id, .. } = r else { panic!("{r:?}") };
            assert_eq!(id, OsdId(u32::from(i)));
            st.apply(&Command::Boot { id, uuid: [i; 16], addrs: addrs(6800 + 10 * u16::from(i)) })
                .unwrap();
        }
        st
    }

    #[test]
    fn registration_is_idempotent_and_boot_checks_the_uuid() {
        let mut st = cluster(2);
        let e = st.osdmap.epoch;
        let r =
            st.apply(&Command::RegisterOsd { uuid: [1; 16], location: loc(9), weight: 1 }).unwrap();
        assert_eq!(
            r,
            Response::Registered { id: OsdId(1), epoch: e },
            "same uuid, same id, no new epoch"
        );
        assert_eq!(
            st.apply(&Command::Boot { id: OsdId(1), uuid: [9; 16], addrs: addrs(1) }),
            Err(CommandError::UuidMismatch { id: OsdId(1) })
        );
        assert_eq!(st.osdmap.epoch, e);
    }

    #[test]
    fn auto_out_osds_come_back_in_at_boot_but_operator_outs_stay_out() {
        let mut st = cluster(3);
        let down = Command::MarkDown { ids: vec![OsdId(0), OsdId(1)], by_operator: false };
        st.apply(&down).unwrap();
        st.apply(&Command::SetFlag { flag: Flag::NoOut, on: true }).unwrap();
        st.apply(&Command::AutoOut { ids: vec![OsdId(0)] }).unwrap();
        assert!(st.osdmap.osd(OsdId(0)).unwrap().is_in, "noout is re-checked at apply");
        st.apply(&Command::SetFlag { flag: Flag::NoOut, on: false }).unwrap();
        st.apply(&Command::AutoOut { ids: vec![OsdId(0), OsdId(2)] }).unwrap();
        assert!(!st.osdmap.osd(OsdId(0)).unwrap().is_in);
        assert!(st.osdmap.osd(OsdId(2)).unwrap().is_in, "an up OSD is never auto-out");
        st.apply(&Command::SetIn { ids: vec![OsdId(1)], is_in: false }).unwrap();
        for i in 0..2u8 {
            let id = OsdId(u32::from(i));
            st.apply(&Command::Boot { id, uuid: [i; 16], addrs: addrs(7000) }).unwrap();
        }
        assert!(st.osdmap.osd(OsdId(0)).unwrap().is_in, "auto-out OSD is in again after boot");
        assert!(!st.osdmap.osd(OsdId(1)).unwrap().is_in, "operator's out is kept");
        assert!(st.auto_out.is_empty());
    }

    #[test]
    fn flags_shape_boot_and_failure_marks() {
        let mut st = cluster(3);
        st.apply(&Command::SetFlag { flag: Flag::NoDown, on: true }).unwrap();
        st.apply(&Command::MarkDown { ids: vec![OsdId(0)], by_operator: false }).unwrap();
        assert!(st.osdmap.osd(OsdId(0)).unwrap().up, "nodown ignores the failure detector");
        st.apply(&Command::MarkDown { ids: vec![OsdId(0)], by_operator: true }).unwrap();
        assert!(!st.osdmap.osd(OsdId(0)).unwrap().up, "an operator can still mark down");
        st.apply(&Command::SetFlag { flag: Flag::NoUp, on: true }).unwrap();
        let r = st.apply(&Command::Boot { id: OsdId(0), uuid: [0; 16], addrs: addrs(1) }).unwrap();
        assert!(matches!(r, Response::BootDeferred { .. }));
        assert!(!st.osdmap.osd(OsdId(0)).unwrap().up);
        st.apply(&Command::SetFlag { flag: Flag::NoUp, on: false }).unwrap();
        st.apply(&Command::Boot { id: OsdId(0), uuid: [0; 16], addrs: addrs(1) }).unwrap();
        assert!(st.osdmap.osd(OsdId(0)).unwrap().up);
    }

    #[test]
    fn a_restarted_osd_still_marked_up_gets_a_new_interval() {
        let mut st = cluster(1);
        let before = st.osdmap.osd(OsdId(0)).unwrap().up_from;
        st.apply(&Command::Boot { id: OsdId(0), uuid: [0; 16], addrs: addrs(7000) }).unwrap();
        let o = st.osdmap.osd(OsdId(0)).unwrap();
        assert!(o.up && o.up_from > before && o.down_at > 0);
    }

    #[test]
    fn subscribers_catch_up_by_incrementals_or_the_full_map() {
        let mut st = cluster(2);
        let now = st.osdmap.epoch;
        assert_eq!(st.catch_up(now), Catchup::UpToDate);
        let Catchup::Incrementals(incs) = st.catch_up(1) else { panic!() };
        let mut sub = OsdMap::new([1; 16]);
        for i in incs {
            sub.apply(i).unwrap();
        }
        assert_eq!(sub, st.osdmap);
        for i in 0..(HISTORY as u32 + 5) {
            st.apply(&Command::SetPrimaryAffinity { id: OsdId(0), affinity: i % 2 }).unwrap();
        }
        assert!(matches!(st.catch_up(1), Catchup::FullMap(_)), "too far behind");
        assert!(
            matches!(st.catch_up(st.osdmap.epoch + 3), Catchup::FullMap(_)),
            "ahead: another history"
        );
        assert_eq!(st.history.len(), HISTORY);
    }

    #[test]
    fn pools_are_managed_by_name_with_checked_settings() {
        let mut st = cluster(1);
        st.apply(&Command::CreatePool { name: "rbd".into(), size: 3, min_size: 2, pg_num: 64 })
            .unwrap();
        assert_eq!(
            st.apply(&Command::CreatePool { name: "rbd".into(), size: 3, min_size: 2, pg_num: 64 }),
            Err(CommandError::PoolExists("rbd".into()))
        );
        st.apply(&Command::SetPool { name: "rbd".into(), key: "size".into(), value: 2 }).unwrap();
        assert!(matches!(
            st.apply(&Command::SetPool { name: "rbd".into(), key: "min_size".into(), value: 3 }),
            Err(CommandError::Rejected(_))
        ));
        assert!(matches!(
            st.apply(&Command::SetPool { name: "rbd".into(), key: "colour".into(), value: 3 }),
            Err(CommandError::UnknownPoolKey(_))
        ));
        assert_eq!(st.osdmap.pool_by_name("rbd").unwrap().size, 2);
        st.apply(&Command::RemovePool { name: "rbd".into() }).unwrap();
        assert!(st.osdmap.pool_by_name("rbd").is_none());
        assert!(matches!(
            st.apply(&Command::ConfigSet { key: "Bad Key".into(), value: "x".into() }),
            Err(CommandError::BadConfigKey(_))
        ));
        st.apply(&Command::ConfigSet { key: "osd.heartbeat_grace".into(), value: "20".into() })
            .unwrap();
        assert_eq!(st.config["osd.heartbeat_grace"], "20");
    }

    #[test]
    fn failure_detection_marks_down_with_enough_reporters_then_out_unless_noout() {
        let mut st = cluster(4);
        let mut fd = FailureDetector::new(0, 20 * S, 2, 60 * S, 600 * S);
        for i in 0..4 {
            fd.beacon(OsdId(i), 0);
        }
        fd.report_failure(OsdId(1), OsdId(0), S);
        assert!(fd.tick(&st.osdmap, S).is_empty(), "one reporter is not enough");
        fd.report_failure(OsdId(1), OsdId(0), 2 * S);
        assert!(fd.tick(&st.osdmap, 2 * S).is_empty(), "the same reporter twice is still one");
        fd.report_failure(OsdId(2), OsdId(0), 3 * S);
        let cmds = fd.tick(&st.osdmap, 3 * S);
        assert_eq!(cmds, vec![Command::MarkDown { ids: vec![OsdId(0)], by_operator: false }]);
        for c in &cmds {
            st.apply(c).unwrap();
        }
        assert!(fd.tick(&st.osdmap, 4 * S).is_empty(), "down, not yet out");
        for i in 1..4 {
            fd.beacon(OsdId(i), 500 * S);
        }
        assert!(fd.tick(&st.osdmap, 500 * S).is_empty(), "down for 496 s: not yet out");
        st.apply(&Command::SetFlag { flag: Flag::NoOut, on: true }).unwrap();
        for i in 1..4 {
            fd.beacon(OsdId(i), 650 * S);
        }
        assert!(fd.tick(&st.osdmap, 650 * S).is_empty(), "down for 646 s, but noout");
        st.apply(&Command::SetFlag { flag: Flag::NoOut, on: false }).unwrap();
        for i in 1..4 {
            fd.beacon(OsdId(i), 700 * S);
        }
        let cmds = fd.tick(&st.osdmap, 700 * S);
        assert_eq!(cmds, vec![Command::AutoOut { ids: vec![OsdId(0)] }]);
    }

    #[test]
    fn stale_reports_and_silent_osds() {
        let st = cluster(3);
        let mut fd = FailureDetector::new(0, 20 * S, 2, 60 * S, 600 * S);
        for i in 0..3 {
            fd.beacon(OsdId(i), 0);
        }
        fd.report_failure(OsdId(1), OsdId(0), S);
        fd.report_failure(OsdId(2), OsdId(0), 30 * S);
        for i in 0..3 {
            fd.beacon(OsdId(i), 30 * S);
        }
        assert!(fd.tick(&st.osdmap, 31 * S).is_empty(), "a beacon withdraws earlier reports");
        fd.report_failure(OsdId(1), OsdId(0), 32 * S);
        fd.report_alive(OsdId(1), OsdId(0));
        fd.report_failure(OsdId(2), OsdId(0), 33 * S);
        assert!(fd.tick(&st.osdmap, 33 * S).is_empty(), "a withdrawn report does not count");
        fd.beacon(OsdId(0), 40 * S);
        fd.beacon(OsdId(1), 40 * S);
        let cmds = fd.tick(&st.osdmap, 95 * S);
        assert_eq!(
            cmds,
            vec![Command::MarkDown { ids: vec![OsdId(2)], by_operator: false }],
            "no beacon for 60 s"
        );
    }
}

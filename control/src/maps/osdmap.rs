//! The OSD map: every OSD (identity, addresses, location, weight, state), the pools, and
//! the cluster flags, at an epoch. It changes only through [`Incremental`]s, each taking
//! it from epoch N to N+1; subscribers receive every incremental in order, so every
//! holder of epoch N has the same map.
//!
//! [`OsdMap::apply`] checks structure (ids exist, names are unique, sizes make sense)
//! and is all or nothing. Policy (the `noup` flag, who may mark what) belongs to the
//! monitor that builds incrementals, not here.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::envelope::{self, EnvelopeError, Kind};

/// Format version of the map and of incrementals (fields are only ever appended).
pub const VERSION: u16 = 1;

/// 16.16 fixed point: `ONE` is 1.0 (weights, primary affinity).
pub const ONE: u32 = 0x1_0000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OsdId(pub u32);

impl fmt::Display for OsdId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "osd.{}", self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PoolId(pub u32);

/// Where an OSD sits in the failure-domain hierarchy.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Location {
    pub rack: String,
    pub host: String,
}

/// An OSD's addresses: its control address and one dataplane port per core.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsdAddrs {
    pub public: SocketAddr,
    pub core_ports: Vec<u16>,
}

/// Graceful maintenance (lesson 1): a draining OSD takes no new primaries and hands its
/// primaries away; a drained one may be stopped without failing a client op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Maintenance {
    #[default]
    None,
    Draining,
    Drained,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsdInfo {
    pub id: OsdId,
    pub uuid: [u8; 16],
    /// Set at boot; `None` for an OSD registered but never booted.
    pub addrs: Option<OsdAddrs>,
    pub location: Location,
    /// CRUSH weight, 16.16 fixed point (usually the capacity in TiB).
    pub weight: u32,
    pub up: bool,
    pub is_in: bool,
    /// 16.16, 0..=ONE: how willing it is to be primary.
    pub primary_affinity: u32,
    pub maintenance: Maintenance,
    /// Epoch of the last boot (0: never).
    pub up_from: u64,
    /// Epoch it was last marked down (0: never).
    pub down_at: u64,
}

/// The failure domain a pool's replicas are spread across.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureDomain {
    Osd,
    Host,
    Rack,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub id: PoolId,
    pub name: String,
    pub size: u8,
    pub min_size: u8,
    pub pg_num: u32,
    pub failure_domain: FailureDomain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Flags {
    /// Down OSDs are not marked out.
    pub noout: bool,
    /// Booting OSDs are not marked up.
    pub noup: bool,
    /// Failure reports do not mark OSDs down.
    pub nodown: bool,
    /// Clients stop sending I/O.
    pub pause: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Flag {
    NoOut,
    NoUp,
    NoDown,
    Pause,
}

impl Flags {
    fn get_mut(&mut self, f: Flag) -> &mut bool {
        match f {
            Flag::NoOut => &mut self.noout,
            Flag::NoUp => &mut self.noup,
            Flag::NoDown => &mut self.nodown,
            Flag::Pause => &mut self.pause,
        }
    }

    pub fn get(&self, f: Flag) -> bool {
        let mut c = *self;
        *c.get_mut(f)
    }
}

pub const MAX_POOL_SIZE: u8 = 10;
pub const MAX_PG_NUM: u32 = 1 << 16;
pub const MAX_NAME_BYTES: usize = 128;

/// One change inside an incremental.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// Registers a new OSD: `id` must be the map's next id; it starts down and in.
    NewOsd {
        id: OsdId,
        uuid: [u8; 16],
        location: Location,
        weight: u32,
    },
    /// The OSD booted at these addresses: up.
    Boot {
        id: OsdId,
        addrs: OsdAddrs,
    },
    MarkDown {
        id: OsdId,
    },
    SetIn {
        id: OsdId,
        is_in: bool,
    },
    SetWeight {
        id: OsdId,
        weight: u32,
    },
    SetPrimaryAffinity {
        id: OsdId,
        affinity: u32,
    },
    SetLocation {
        id: OsdId,
        location: Location,
    },
    SetMaintenance {
        id: OsdId,
        state: Maintenance,
    },
    /// Only a down, out OSD can be removed.
    RemoveOsd {
        id: OsdId,
    },
    /// `id` must be the map's next pool id.
    CreatePool {
        id: PoolId,
        name: String,
        size: u8,
        min_size: u8,
        pg_num: u32,
        failure_domain: FailureDomain,
    },
    RemovePool {
        id: PoolId,
    },
    /// Changes size, min_size and pg_num (pg_num never shrinks).
    SetPool {
        id: PoolId,
        size: u8,
        min_size: u8,
        pg_num: u32,
    },
    SetFlag {
        flag: Flag,
        on: bool,
    },
}

/// The changes from epoch `epoch - 1` to `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incremental {
    pub fsid: [u8; 16],
    pub epoch: u64,
    pub changes: Vec<Change>,
}

impl Incremental {
    pub fn encode(&self) -> Vec<u8> {
        envelope::seal(Kind::OsdMapIncremental, VERSION, VERSION, self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Incremental, EnvelopeError> {
        envelope::open(Kind::OsdMapIncremental, VERSION, bytes)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error("incremental for cluster {found} applied to cluster {expected}")]
    WrongCluster { expected: String, found: String },
    #[error("incremental for epoch {found} applied to epoch {have} (needs {})", have + 1)]
    WrongEpoch { have: u64, found: u64 },
    #[error("{0} does not exist")]
    NoOsd(OsdId),
    #[error("new OSD must be {expected}, got {found}")]
    OsdIdOutOfOrder { expected: OsdId, found: OsdId },
    #[error("an OSD with uuid {0} exists already")]
    DuplicateUuid(String),
    #[error("{0} must be down and out to be removed")]
    OsdActive(OsdId),
    #[error("pool {0:?} does not exist")]
    NoPool(PoolId),
    #[error("new pool must be id {expected}, got {found}")]
    PoolIdOutOfOrder { expected: u32, found: u32 },
    #[error("a pool named {0:?} exists already")]
    DuplicatePoolName(String),
    #[error("invalid: {0}")]
    Invalid(String),
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsdMap {
    pub fsid: [u8; 16],
    pub epoch: u64,
    pub flags: Flags,
    pub osds: BTreeMap<OsdId, OsdInfo>,
    pub pools: BTreeMap<PoolId, Pool>,
    pub next_osd: u32,
    pub next_pool: u32,
}

impl OsdMap {
    /// The empty map of a new cluster (epoch 1).
    pub fn new(fsid: [u8; 16]) -> OsdMap {
        OsdMap {
            fsid,
            epoch: 1,
            flags: Flags::default(),
            osds: BTreeMap::new(),
            pools: BTreeMap::new(),
            next_osd: 0,
            next_pool: 1,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        envelope::seal(Kind::OsdMap, VERSION, VERSION, self)
    }

    pub fn decode(bytes: &[u8]) -> Result<OsdMap, EnvelopeError> {
        envelope::open(Kind::OsdMap, VERSION, bytes)
    }

    pub fn osd(&self, id: OsdId) -> Option<&OsdInfo> {
        self.osds.get(&id)
    }

    pub fn pool_by_name(&self, name: &str) -> Option<&Pool> {
        self.pools.values().find(|p| p.name == name)
    }

    /// Racks, their hosts and the hosts' OSDs, all in order.
    pub fn hierarchy(&self) -> BTreeMap<&str, BTreeMap<&str, Vec<OsdId>>> {
        let mut h: BTreeMap<&str, BTreeMap<&str, Vec<OsdId>>> = BTreeMap::new();
        for o in self.osds.values() {
            h.entry(&o.location.rack).or_default().entry(&o.location.host).or_default().push(o.id);
        }
        h
    }

    /// Applies `inc`, all or nothing.
    pub fn apply(&mut self, inc: &Incremental) -> Result<(), MapError> {
        if inc.fsid != self.fsid {
            return Err(MapError::WrongCluster {
                expected: hex(&self.fsid),
                found: hex(&inc.fsid),
            });
        }
        if inc.epoch != self.epoch + 1 {
            return Err(MapError::WrongEpoch { have: self.epoch, found: inc.epoch });
        }
        let mut next = self.clone();
        next.epoch = inc.epoch;
        for c in &inc.changes {
            next.change(c)?;
        }
        *self = next;
        Ok(())
    }

    fn osd_mut(&mut self, id: OsdId) -> Result<&mut OsdInfo, MapError> {
        self.osds.get_mut(&id).ok_or(MapError::NoOsd(id))
    }

    fn change(&mut self, c: &Change) -> Result<(), MapError> {
        let epoch = self.epoch;
        match c {
            Change::NewOsd { id, uuid, location, weight } => {
                if id.0 != self.next_osd {
                    return Err(MapError::OsdIdOutOfOrder {
                        expected: OsdId(self.next_osd),
                        found: *id,
                    });
                }
                if self.osds.values().any(|o| o.uuid == *uuid) {
                    return Err(MapError::DuplicateUuid(hex(uuid)));
                }
                check_location(location)?;
                self.osds.insert(
                    *id,
                    OsdInfo {
                        id: *id,
                        uuid: *uuid,
                        addrs: None,
                        location: location.clone(),
                        weight: *weight,
                        up: false,
                        is_in: true,
                        primary_affinity: ONE,
                        maintenance: Maintenance::None,
                        up_from: 0,
                        down_at: 0,
                    },
                );
                self.next_osd += 1;
            }
            Change::Boot { id, addrs } => {
                if addrs.core_ports.is_empty() || addrs.core_ports.len() > 1024 {
                    return Err(MapError::Invalid(format!(
                        "{id} booted with {} core ports",
                        addrs.core_ports.len()
                    )));
                }
                let o = self.osd_mut(*id)?;
                o.addrs = Some(addrs.clone());
                o.up = true;
                o.up_from = epoch;
            }
            Change::MarkDown { id } => {
                let o = self.osd_mut(*id)?;
                if o.up {
                    o.up = false;
                    o.down_at = epoch;
                }
            }
            Change::SetIn { id, is_in } => self.osd_mut(*id)?.is_in = *is_in,
            Change::SetWeight { id, weight } => self.osd_mut(*id)?.weight = *weight,
            Change::SetPrimaryAffinity { id, affinity } => {
                if *affinity > ONE {
                    return Err(MapError::Invalid(format!(
                        "primary affinity {affinity} above 1.0"
                    )));
                }
                self.osd_mut(*id)?.primary_affinity = *affinity;
            }
            Change::SetLocation { id, location } => {
                check_location(location)?;
                self.osd_mut(*id)?.location = location.clone();
            }
            Change::SetMaintenance { id, state } => self.osd_mut(*id)?.maintenance = *state,
            Change::RemoveOsd { id } => {
                let o = self.osds.get(id).ok_or(MapError::NoOsd(*id))?;
                if o.up || o.is_in {
                    return Err(MapError::OsdActive(*id));
                }
                self.osds.remove(id);
            }
            Change::CreatePool { id, name, size, min_size, pg_num, failure_domain } => {
                if id.0 != self.next_pool {
                    return Err(MapError::PoolIdOutOfOrder {
                        expected: self.next_pool,
                        found: id.0,
                    });
                }
                if name.is_empty()
                    || name.len() > MAX_NAME_BYTES
                    || name.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    return Err(MapError::Invalid(format!(
                        "pool name {name:?}: 1..={MAX_NAME_BYTES} bytes, no spaces"
                    )));
                }
                if self.pool_by_name(name).is_some() {
                    return Err(MapError::DuplicatePoolName(name.clone()));
                }
                check_pool(*size, *min_size, *pg_num)?;
                self.pools.insert(
                    *id,
                    Pool {
                        id: *id,
                        name: name.clone(),
                        size: *size,
                        min_size: *min_size,
                        pg_num: *pg_num,
                        failure_domain: *failure_domain,
                    },
                );
                self.next_pool += 1;
            }
            Change::RemovePool { id } => {
                self.pools.remove(id).ok_or(MapError::NoPool(*id))?;
            }
            Change::SetPool { id, size, min_size, pg_num } => {
                check_pool(*size, *min_size, *pg_num)?;
                let p = self.pools.get_mut(id).ok_or(MapError::NoPool(*id))?;
                if *pg_num < p.pg_num {
                    return Err(MapError::Invalid(format!(
                        "pg_num cannot shrink ({} -> {pg_num})",
                        p.pg_num
                    )));
                }
                p.size = *size;
                p.min_size = *min_size;
                p.pg_num = *pg_num;
            }
            Change::SetFlag { flag, on } => *self.flags.get_mut(*flag) = *on,
        }
        Ok(())
    }
}

fn check_location(l: &Location) -> Result<(), MapError> {
    for (what, v) in [("rack", &l.rack), ("host", &l.host)] {
        if v.is_empty() || v.len() > MAX_NAME_BYTES {
            return Err(MapError::Invalid(format!(
                "{what} name {v:?}: 1..={MAX_NAME_BYTES} bytes"
            )));
        }
    }
    Ok(())
}

fn check_pool(size: u8, min_size: u8, pg_num: u32) -> Result<(), MapError> {
    if size == 0 || size > MAX_POOL_SIZE {
        return Err(MapError::Invalid(format!("size {size}: 1..={MAX_POOL_SIZE}")));
    }
    if min_size == 0 || min_size > size {
        return Err(MapError::Invalid(format!("min_size {min_size}: 1..=size ({size})")));
    }
    if pg_num == 0 || pg_num > MAX_PG_NUM {
        return Err(MapError::Invalid(format!("pg_num {pg_num}: 1..={MAX_PG_NUM}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const FSID: [u8; 16] = [7; 16];

    fn loc(r: u8, h: u8) -> Location {
        Location { rack: format!("rack{r}"), host: format!("host{h}") }
    }

    fn change_strategy() -> impl Strategy<Value = Change> {
        let id = (0u32..6).prop_map(OsdId);
        let pool = (1u32..4).prop_map(PoolId);
        prop_oneof![
            (0u32..6, any::<u8>(), 0u8..2, 0u8..3, 0u32..4).prop_map(|(i, u, r, h, w)| {
                Change::NewOsd { id: OsdId(i), uuid: [u; 16], location: loc(r, h), weight: w * ONE }
            }),
            (id.clone(), 1usize..3).prop_map(|(id, n)| Change::Boot {
                id,
                addrs: OsdAddrs {
                    public: "127.0.0.1:6800".parse().unwrap(),
                    core_ports: (0..n as u16).map(|p| 6801 + p).collect()
                }
            }),
            id.clone().prop_map(|id| Change::MarkDown { id }),
            (id.clone(), any::<bool>()).prop_map(|(id, is_in)| Change::SetIn { id, is_in }),
            (id.clone(), 0u32..(2 * ONE))
                .prop_map(|(id, affinity)| Change::SetPrimaryAffinity { id, affinity }),
            (id.clone(), 0u8..2, 0u8..3)
                .prop_map(|(id, r, h)| Change::SetLocation { id, location: loc(r, h) }),
            id.clone().prop_map(|id| Change::RemoveOsd { id }),
            (1u32..4, 0u8..3, 0u8..4, 0u8..4, 0u32..70).prop_map(|(i, n, s, m, pg)| {
                Change::CreatePool {
                    id: PoolId(i),
                    name: format!("p{n}"),
                    size: s,
                    min_size: m,
                    pg_num: pg,
                    failure_domain: FailureDomain::Host,
                }
            }),
            pool.clone().prop_map(|id| Change::RemovePool { id }),
            (pool, 0u8..4, 0u8..4, 0u32..70).prop_map(|(id, s, m, pg)| Change::SetPool {
                id,
                size: s,
                min_size: m,
                pg_num: pg
            }),
            (
                prop_oneof![
                    Just(Flag::NoOut),
                    Just(Flag::NoUp),
                    Just(Flag::NoDown),
                    Just(Flag::Pause)
                ],
                any::<bool>()
            )
                .prop_map(|(flag, on)| Change::SetFlag { flag, on }),
        ]
    }

    proptest! {
        /// A subscriber that receives every incremental (as bytes) ends with the same
        /// map as the monitor; refused incrementals change nothing; the map and every
        /// incremental survive encoding; invariants hold after every epoch.
        #[test]
        fn incrementals_replayed_in_order_rebuild_the_map(
            batches in proptest::collection::vec(proptest::collection::vec(change_strategy(), 1..4), 1..40)
        ) {
            let mut mon = OsdMap::new(FSID);
            let mut sub = mon.clone();
            let mut applied = 0;
            for mut changes in batches {
                // Mostly valid new ids (the generator cannot know the next one), some not.
                let (mut nid, mut pid) = (mon.next_osd, mon.next_pool);
                for c in &mut changes {
                    match c {
                        Change::NewOsd { id, .. } if id.0 % 3 != 0 => {
                            *id = OsdId(nid);
                            nid += 1;
                        }
                        Change::CreatePool { id, .. } if id.0 % 3 != 0 => {
                            *id = PoolId(pid);
                            pid += 1;
                        }
                        _ => {}
                    }
                }
                let inc = Incremental { fsid: FSID, epoch: mon.epoch + 1, changes };
                let before = mon.clone();
                match mon.apply(&inc) {
                    Ok(()) => {
                        let wire = Incremental::decode(&inc.encode()).unwrap();
                        sub.apply(&wire).unwrap();
                        prop_assert_eq!(&sub, &mon);
                        // Epochs only move forward by one.
                        prop_assert!(sub.apply(&wire).is_err());
                        applied += 1;
                    }
                    Err(_) => prop_assert_eq!(&mon, &before, "a refused incremental changed the map"),
                }
                // Invariants.
                for p in mon.pools.values() {
                    prop_assert!(p.min_size >= 1 && p.min_size <= p.size && p.size <= MAX_POOL_SIZE);
                }
                let names: std::collections::BTreeSet<_> = mon.pools.values().map(|p| &p.name).collect();
                prop_assert_eq!(names.len(), mon.pools.len());
                prop_assert!(mon.osds.keys().all(|id| id.0 < mon.next_osd));
                prop_assert!(mon.osds.values().all(|o| o.primary_affinity <= ONE));
            }
            prop_assert_eq!(&OsdMap::decode(&mon.encode()).unwrap(), &mon);
            prop_assert_eq!(mon.epoch, 1 + applied);
        }
    }

    #[test]
    fn the_generator_mostly_produces_applicable_incrementals() {
        use proptest::strategy::ValueTree;
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let (mut ok, mut total) = (0, 0);
        let mut m = OsdMap::new(FSID);
        for _ in 0..2000 {
            let mut c = change_strategy().new_tree(&mut runner).unwrap().current();
            if let Change::NewOsd { id, .. } = &mut c {
                *id = OsdId(m.next_osd);
            }
            if let Change::CreatePool { id, .. } = &mut c {
                *id = PoolId(m.next_pool);
            }
            total += 1;
            ok += usize::from(
                m.apply(&Incremental { fsid: FSID, epoch: m.epoch + 1, changes: vec![c] }).is_ok(),
            );
        }
        assert!(
            ok * 5 > total,
            "only {ok} of {total} changes applied: the property test would test little"
        );
    }

    #[test]
    fn wrong_cluster_and_skipped_epochs_are_refused() {
        let mut m = OsdMap::new(FSID);
        let inc = |fsid, epoch| Incremental {
            fsid,
            epoch,
            changes: vec![Change::SetFlag { flag: Flag::NoOut, on: true }],
        };
        assert!(matches!(m.apply(&inc([8; 16], 2)), Err(MapError::WrongCluster { .. })));
        assert_eq!(m.apply(&inc(FSID, 3)), Err(MapError::WrongEpoch { have: 1, found: 3 }));
        m.apply(&inc(FSID, 2)).unwrap();
        assert!(m.flags.noout);
        assert_eq!(m.epoch, 2);
    }

    #[test]
    fn the_hierarchy_groups_osds_by_rack_and_host() {
        let mut m = OsdMap::new(FSID);
        let changes = vec![
            Change::NewOsd { id: OsdId(0), uuid: [1; 16], location: loc(1, 1), weight: ONE },
            Change::NewOsd { id: OsdId(1), uuid: [2; 16], location: loc(0, 2), weight: ONE },
            Change::NewOsd { id: OsdId(2), uuid: [3; 16], location: loc(1, 1), weight: ONE },
        ];
        m.apply(&Incremental { fsid: FSID, epoch: 2, changes }).unwrap();
        let h = m.hierarchy();
        assert_eq!(h["rack1"]["host1"], vec![OsdId(0), OsdId(2)]);
        assert_eq!(h["rack0"]["host2"], vec![OsdId(1)]);
        let dup = Change::NewOsd { id: OsdId(3), uuid: [2; 16], location: loc(0, 0), weight: ONE };
        assert!(matches!(
            m.apply(&Incremental { fsid: FSID, epoch: 3, changes: vec![dup] }),
            Err(MapError::DuplicateUuid(_))
        ));
    }
}

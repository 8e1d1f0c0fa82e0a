//! Placement: object -> placement group -> OSDs -> owning core, computed the same way
//! by every client and OSD from the OSD map alone (no lookups).
//!
//! * **Object to PG**: a 64-bit hash of the name, reduced by a *stable modulo* over the
//!   pool's `pg_num` (Ceph's `ceph_stable_mod`): growing `pg_num` only splits PGs, so
//!   objects move only into the new PGs.
//! * **PG to OSDs**: weighted rendezvous hashing (straw2 draws) over every OSD, with
//!   the host/rack hierarchy as a constraint. Every OSD draws `log2(u) / weight` with `u`
//!   a hash of (pool, pg, OSD); in descending order of draws, replicas go to OSDs whose
//!   failure domain (the pool's `failure_domain`) holds none yet. Changing one OSD's
//!   weight moves data only to or from that OSD, and the result depends on nothing but
//!   the map. OSDs that are out (or weigh 0) take no data.
//! * **Up set and primary**: the placement minus OSDs that are down. The primary is the
//!   first up OSD that accepts by its *primary affinity* (1.0 always, 0.0 never unless
//!   no other can, in between: a hash of (pg, osd) decides, so that fraction of the PGs
//!   it would lead stays with it); it moves to the front of the up set. A PG with no up
//!   OSD has no primary (its I/O waits for a map change).
//! * **PG to core**: a hash of (pool, pg) modulo the OSD's core count, so a client sends an
//!   op straight to the core that owns the PG.
//!
//! All arithmetic is integer (the logarithm too), so every platform and build computes
//! the same placement: it is part of the on-disk and on-wire contract.

use super::osdmap::{FailureDomain, ONE, OsdId, OsdInfo, OsdMap, Pool, PoolId};

/// A placement group: a pool and the PG number within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PgId {
    pub pool: PoolId,
    pub pg: u32,
}

impl std::fmt::Display for PgId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{:x}", self.pool.0, self.pg)
    }
}

impl PgId {
    /// The store collection of this PG: pool in the high half, PG in the low half.
    pub fn collection(self) -> u64 {
        (u64::from(self.pool.0) << 32) | u64::from(self.pg)
    }

    pub fn from_collection(c: u64) -> PgId {
        PgId { pool: PoolId((c >> 32) as u32), pg: c as u32 }
    }
}

/// FNV-1a over the bytes, then the splitmix64 finalizer (FNV alone mixes its low bits
/// poorly). Stable forever: it decides where data lives.
pub fn hash_name(name: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in name {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// splitmix64's finalizer.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn hash4(a: u64, b: u64, c: u64, d: u64) -> u64 {
    mix(mix(mix(mix(a) ^ b) ^ c) ^ d)
}

/// `x mod b` such that growing `b` from one power of two to the next only moves values
/// into the new buckets (Ceph's `ceph_stable_mod`; `mask` is the next power of two - 1).
pub fn stable_mod(x: u64, b: u32) -> u32 {
    assert!(b > 0, "pg_num is at least 1");
    let mask = u64::from(b.next_power_of_two() - 1);
    if (x & mask) < u64::from(b) { (x & mask) as u32 } else { (x & (mask >> 1)) as u32 }
}

/// The PG an object name belongs to.
pub fn object_pg(pool: &Pool, name: &str) -> PgId {
    PgId { pool: pool.id, pg: stable_mod(hash_name(name.as_bytes()), pool.pg_num) }
}

/// The core (of `cores`) that owns a PG on every OSD holding it.
pub fn pg_core(pg: PgId, cores: usize) -> usize {
    assert!(cores > 0, "an OSD has at least one core");
    (hash4(0x5c0e, u64::from(pg.pool.0), u64::from(pg.pg), 0) % cores as u64) as usize
}

/// log2(x) in 32.32 fixed point for x >= 1, by repeated squaring: exact integer
/// arithmetic, so every machine computes the same bits.
fn log2_fixed(x: u64) -> i64 {
    assert!(x > 0);
    let int = 63 - i64::from(x.leading_zeros());
    // y in [1, 2) as Q1.62.
    let mut y: u128 = (u128::from(x) << 62) >> int;
    let mut frac: i64 = 0;
    for bit in (0..32).rev() {
        y = (y * y) >> 62;
        if y >= (2u128 << 62) {
            y >>= 1;
            frac |= 1 << bit;
        }
    }
    (int << 32) | frac
}

/// The straw2 draw of a candidate of `weight` (16.16) for hash `h`: larger wins;
/// `i128::MIN` for weight 0 (never chosen).
fn draw(h: u64, weight: u64) -> i128 {
    if weight == 0 {
        return i128::MIN;
    }
    // u in 1..=2^24; log2(u / 2^24) <= 0, scaled by 1/weight.
    let u = (h & 0xff_ffff) + 1;
    let l = i128::from(log2_fixed(u) - (24i64 << 32));
    (l << 16) / i128::from(weight)
}

/// An OSD that can take data: in, with a weight.
fn eligible(o: &OsdInfo) -> bool {
    o.is_in && o.weight > 0
}

/// Salt of the OSD draws.
const SALT_OSD: u64 = 3;

/// The OSDs a PG is placed on (up to `pool.size`, fewer if the map has too few failure
/// domains), in replica order, whether up or not.
///
/// Weighted rendezvous hashing over every eligible OSD, with the pool's failure domain
/// as a constraint: each OSD draws `log2(u) / weight` for the PG (`u` a hash of pool,
/// PG and OSD); in descending order of draws, an OSD is taken unless its host (or rack)
/// already holds a replica. A draw is `-Exp(weight)`, and the best of a host's OSDs is
/// distributed as one draw of their summed weight, so hosts and racks get replicas in
/// proportion to their weights as in a hierarchical straw2. Unlike the hierarchy,
/// adding an OSD moves replicas only to it, and removing one only from it: no other
/// OSD's draw changes, and the greedy choice over the others keeps its order.
pub fn pg_placement(map: &OsdMap, pool: &Pool, pg: PgId) -> Vec<OsdId> {
    let x = hash4(0x9e37, u64::from(pg.pool.0), u64::from(pg.pg), 0);
    let mut cands: Vec<(i128, &OsdInfo)> = map
        .osds
        .values()
        .filter(|o| eligible(o))
        .map(|o| (draw(hash4(x, u64::from(o.id.0), 0, SALT_OSD), u64::from(o.weight)), o))
        .collect();
    let size = usize::from(pool.size);
    let mut out: Vec<OsdId> = Vec::with_capacity(size);
    let mut used: Vec<&OsdInfo> = Vec::with_capacity(size);
    while out.len() < size && !cands.is_empty() {
        // The best remaining draw (ties: the lower id, so every platform agrees).
        let best = (0..cands.len())
            .max_by(|&i, &j| {
                cands[i].0.cmp(&cands[j].0).then_with(|| cands[j].1.id.cmp(&cands[i].1.id))
            })
            .expect("non-empty");
        let (_, o) = cands.swap_remove(best);
        let clash = used.iter().any(|u| match pool.failure_domain {
            FailureDomain::Rack => u.location.rack == o.location.rack,
            FailureDomain::Host => {
                u.location.rack == o.location.rack && u.location.host == o.location.host
            }
            FailureDomain::Osd => false,
        });
        if !clash {
            out.push(o.id);
            used.push(o);
        }
    }
    out
}

/// Where a PG lives now: its placement and the up subset (primary first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgMapping {
    pub pg: PgId,
    pub placement: Vec<OsdId>,
    pub up: Vec<OsdId>,
}

impl PgMapping {
    pub fn primary(&self) -> Option<OsdId> {
        self.up.first().copied()
    }
}

pub fn pg_mapping(map: &OsdMap, pool: &Pool, pg: PgId) -> PgMapping {
    let placement = pg_placement(map, pool, pg);
    let mut up: Vec<OsdId> =
        placement.iter().copied().filter(|id| map.osd(*id).is_some_and(|o| o.up)).collect();
    let p = choose_primary(map, pg, &up);
    if p > 0 {
        let primary = up.remove(p);
        up.insert(0, primary);
    }
    PgMapping { pg, placement, up }
}

const SALT_PRIMARY: u64 = 4;

/// Index in `up` of the primary by primary affinity (16.16, `ONE` = always): the first
/// OSD whose hash of (pg, osd) falls under its affinity; failing that, the first with a
/// non-zero affinity; failing that, the first.
fn choose_primary(map: &OsdMap, pg: PgId, up: &[OsdId]) -> usize {
    let x = hash4(0x9e37, u64::from(pg.pool.0), u64::from(pg.pg), 0);
    let mut nonzero = None;
    for (i, id) in up.iter().enumerate() {
        let a = map.osd(*id).map_or(ONE, |o| o.primary_affinity);
        if a >= ONE {
            return i;
        }
        if a > 0 {
            if (hash4(x, u64::from(id.0), 0, SALT_PRIMARY) & 0xffff) < u64::from(a) {
                return i;
            }
            nonzero.get_or_insert(i);
        }
    }
    nonzero.unwrap_or(0)
}

/// Mappings (up set, primary first) of PGs at one map epoch, each computed once
/// (placement draws for every OSD of the map; a request should not). A map is
/// identified by its epoch: maps change only through incrementals, so two maps of one
/// epoch are the same map.
#[derive(Debug, Default)]
pub struct PrimaryCache {
    epoch: u64,
    pgs: std::collections::HashMap<PgId, PgMapping>,
}

impl PrimaryCache {
    pub fn mapping(&mut self, map: &OsdMap, pool: &Pool, pg: PgId) -> &PgMapping {
        if self.epoch != map.epoch {
            self.pgs.clear();
            self.epoch = map.epoch;
        }
        self.pgs.entry(pg).or_insert_with(|| pg_mapping(map, pool, pg))
    }

    pub fn primary(&mut self, map: &OsdMap, pool: &Pool, pg: PgId) -> Option<OsdId> {
        self.mapping(map, pool, pg).primary()
    }
}

/// The primary of the PG of object `name` in `pool`, if any.
pub fn object_primary(map: &OsdMap, pool: PoolId, name: &str) -> Option<(PgId, OsdId)> {
    let p = map.pools.get(&pool)?;
    let pg = object_pg(p, name);
    pg_mapping(map, p, pg).primary().map(|o| (pg, o))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::osdmap::{Location, Maintenance};
    use proptest::prelude::*;

    fn map_with(osds: &[(u32, &str, &str, u32)]) -> OsdMap {
        let mut m = OsdMap::new([7; 16]);
        for &(id, rack, host, w) in osds {
            m.osds.insert(
                OsdId(id),
                OsdInfo {
                    id: OsdId(id),
                    uuid: [id as u8; 16],
                    addrs: None,
                    location: Location { rack: rack.into(), host: host.into() },
                    weight: w,
                    up: true,
                    is_in: true,
                    primary_affinity: ONE,
                    maintenance: Maintenance::None,
                    up_from: 1,
                    down_at: 0,
                },
            );
        }
        m
    }

    fn pool(size: u8, pg_num: u32, fd: FailureDomain) -> Pool {
        Pool { id: PoolId(1), name: "p".into(), size, min_size: 1, pg_num, failure_domain: fd }
    }

    #[test]
    fn log2_is_exact_on_powers_and_monotonic() {
        for k in 0..40 {
            assert_eq!(log2_fixed(1 << k), (k as i64) << 32);
        }
        let mut last = i64::MIN;
        for x in 1..5000u64 {
            let l = log2_fixed(x);
            assert!(l > last);
            last = l;
        }
        // log2(3) = 1.58496...
        let l3 = log2_fixed(3) as f64 / (1u64 << 32) as f64;
        assert!((l3 - 3f64.log2()).abs() < 1e-8, "{l3}");
    }

    #[test]
    fn stable_mod_only_splits() {
        for x in 0..10_000u64 {
            for b in 1..64u32 {
                let a = stable_mod(x, b);
                assert!(a < b);
                let c = stable_mod(x, b + 1);
                // Growing by one moves a value only into the new bucket.
                assert!(c == a || c == b, "x={x} b={b}: {a} -> {c}");
            }
        }
    }

    const PIN_HASH: u64 = 0x16fe_05a1_c75b_cd0f;
    const PIN_PG: u32 = 7;
    // Changed once, before any release, from hierarchical straw2 to rendezvous hashing
    // with failure-domain filtering (issue 7: adding an OSD moved 1.3x the minimum).
    const PIN_PLACEMENT: [[u32; 2]; 8] =
        [[2, 0], [0, 1], [0, 1], [1, 2], [2, 1], [0, 1], [1, 0], [1, 2]];

    #[test]
    fn known_values_never_change() {
        // Placement is a contract between versions: these must not move.
        let m = map_with(&[(0, "r1", "h1", ONE), (1, "r1", "h2", ONE), (2, "r2", "h3", ONE)]);
        let p = pool(2, 8, FailureDomain::Host);
        let got: Vec<[u32; 2]> = (0..8)
            .map(|pg| {
                let v = pg_placement(&m, &p, PgId { pool: PoolId(1), pg });
                [v[0].0, v[1].0]
            })
            .collect();
        assert_eq!(hash_name(b"hello"), PIN_HASH);
        assert_eq!(object_pg(&p, "hello").pg, PIN_PG);
        assert_eq!(got, PIN_PLACEMENT.to_vec());
    }

    #[test]
    fn weights_shape_the_distribution() {
        let m = map_with(&[
            (0, "r", "h0", ONE),
            (1, "r", "h1", ONE),
            (2, "r", "h2", 2 * ONE),
            (3, "r", "h3", 0),
        ]);
        let p = pool(1, 4096, FailureDomain::Host);
        let mut count = [0usize; 4];
        for pg in 0..4096 {
            let pl = pg_placement(&m, &p, PgId { pool: PoolId(1), pg });
            count[pl[0].0 as usize] += 1;
        }
        assert_eq!(count[3], 0, "weight 0 takes nothing");
        // Expect 1024, 1024, 2048 within 10%.
        for (i, want) in [(0, 1024.0), (1, 1024.0), (2, 2048.0)] {
            let got = count[i] as f64;
            assert!((got - want).abs() < want * 0.1, "osd {i}: {got} vs {want}: {count:?}");
        }
    }

    #[test]
    fn replicas_respect_failure_domains() {
        let m = map_with(&[
            (0, "r1", "h1", ONE),
            (1, "r1", "h1", ONE),
            (2, "r1", "h2", ONE),
            (3, "r2", "h3", ONE),
            (4, "r2", "h4", ONE),
        ]);
        for pg in 0..512 {
            let id = PgId { pool: PoolId(1), pg };
            let by_host = pg_placement(&m, &pool(3, 512, FailureDomain::Host), id);
            assert_eq!(by_host.len(), 3);
            let hosts: std::collections::BTreeSet<_> =
                by_host.iter().map(|o| m.osd(*o).unwrap().location.host.clone()).collect();
            assert_eq!(hosts.len(), 3, "{by_host:?}");
            let by_rack = pg_placement(&m, &pool(3, 512, FailureDomain::Rack), id);
            assert_eq!(by_rack.len(), 2, "only two racks: {by_rack:?}");
            let racks: std::collections::BTreeSet<_> =
                by_rack.iter().map(|o| m.osd(*o).unwrap().location.rack.clone()).collect();
            assert_eq!(racks.len(), 2);
        }
    }

    #[test]
    fn the_primary_cache_follows_the_epoch() {
        let mut m = map_with(&[(0, "r", "h0", ONE), (1, "r", "h1", ONE)]);
        let p = pool(1, 16, FailureDomain::Host);
        let id = PgId { pool: PoolId(1), pg: 3 };
        let mut cache = PrimaryCache::default();
        let first = cache.primary(&m, &p, id).unwrap();
        assert_eq!(Some(first), pg_mapping(&m, &p, id).primary());
        m.osds.get_mut(&first).unwrap().up = false;
        m.epoch += 1;
        let now = cache.primary(&m, &p, id);
        assert_eq!(now, pg_mapping(&m, &p, id).primary());
        assert_ne!(now, Some(first));
    }

    #[test]
    fn down_osds_leave_the_up_set_and_out_osds_the_placement() {
        let mut m = map_with(&[(0, "r", "h0", ONE), (1, "r", "h1", ONE), (2, "r", "h2", ONE)]);
        let p = pool(3, 16, FailureDomain::Host);
        m.pools.insert(p.id, p.clone());
        let id = PgId { pool: PoolId(1), pg: 5 };
        let before = pg_mapping(&m, &p, id);
        assert_eq!(before.up.len(), 3);
        let first = before.up[0];
        m.osds.get_mut(&first).unwrap().up = false;
        let after = pg_mapping(&m, &p, id);
        assert_eq!(after.placement, before.placement, "down is not out: no data moves");
        assert!(!after.up.contains(&first));
        assert_eq!(after.primary(), Some(before.up[1]));
        m.osds.get_mut(&first).unwrap().is_in = false;
        let out = pg_mapping(&m, &p, id);
        assert_eq!(out.placement.len(), 2, "only two hosts left in");
        assert!(!out.placement.contains(&first));
    }

    #[test]
    fn primary_affinity_shifts_primaries_and_only_them() {
        let mut m = map_with(&[(0, "r", "h0", ONE), (1, "r", "h1", ONE), (2, "r", "h2", ONE)]);
        let p = pool(3, 3000, FailureDomain::Host);
        let primaries = |m: &OsdMap| {
            let mut n = [0usize; 3];
            for pg in 0..3000 {
                let map = pg_mapping(m, &p, PgId { pool: PoolId(1), pg });
                n[map.primary().unwrap().0 as usize] += 1;
            }
            n
        };
        let before = primaries(&m);
        assert!(before.iter().all(|&n| (900..1100).contains(&n)), "{before:?}");
        // Affinity 0: never primary while another up OSD can be.
        m.osds.get_mut(&OsdId(0)).unwrap().primary_affinity = 0;
        let none = primaries(&m);
        assert_eq!(none[0], 0, "{none:?}");
        // Affinity 0.5: about half the PGs it would lead.
        m.osds.get_mut(&OsdId(0)).unwrap().primary_affinity = ONE / 2;
        let half = primaries(&m);
        assert!((400..600).contains(&half[0]), "{half:?}");
        for pg in 0..300 {
            let id = PgId { pool: PoolId(1), pg };
            let a = pg_mapping(&m, &p, id);
            // The placement (where data lives) never depends on affinity; the up set is
            // the same OSDs with the primary in front.
            assert_eq!(a.placement, pg_placement(&m, &p, id));
            let mut x = a.up.clone();
            let mut y = a.placement.clone();
            x.sort();
            y.sort();
            assert_eq!(x, y);
        }
        // With every OSD at 0 a primary is still chosen: the first up.
        for o in m.osds.values_mut() {
            o.primary_affinity = 0;
        }
        let id = PgId { pool: PoolId(1), pg: 9 };
        assert_eq!(pg_mapping(&m, &p, id).primary(), Some(pg_placement(&m, &p, id)[0]));
    }

    /// Replicas (PG, OSD) that are in `b` but were not in `a`, over all PGs.
    fn moved(a: &OsdMap, b: &OsdMap, p: &Pool) -> usize {
        (0..p.pg_num)
            .map(|pg| {
                let id = PgId { pool: p.id, pg };
                let old = pg_placement(a, p, id);
                pg_placement(b, p, id).iter().filter(|o| !old.contains(o)).count()
            })
            .sum()
    }

    /// Replicas `osd` holds over all PGs.
    fn held(m: &OsdMap, p: &Pool, osd: OsdId) -> usize {
        (0..p.pg_num)
            .filter(|&pg| pg_placement(m, p, PgId { pool: p.id, pg }).contains(&osd))
            .count()
    }

    fn random_map(hosts: &[(u8, u8, u32)]) -> OsdMap {
        // (rack, OSDs on the host, weight in 1/4 units)
        let mut spec = Vec::new();
        let mut id = 0;
        for (h, &(rack, n, w)) in hosts.iter().enumerate() {
            for _ in 0..n.max(1) {
                spec.push((id, format!("r{rack}"), format!("h{h}"), w.max(1) * ONE / 4));
                id += 1;
            }
        }
        let spec: Vec<(u32, &str, &str, u32)> =
            spec.iter().map(|(i, r, h, w)| (*i, r.as_str(), h.as_str(), *w)).collect();
        map_with(&spec)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// Adding or removing an OSD moves close to the minimum, for size-3 pools with
        /// host failure domains over random maps. The minimum is what must change hands:
        /// the replicas the added OSD holds afterwards, or those the removed one held.
        /// (Not its weight share: a host heavier than a third of the cluster can hold
        /// only one replica of each PG, so the others hold more than their weight.)
        /// The replicas that change OSD must be at most 1.2x that; a hierarchical
        /// straw2 failed this (1.33x when an OSD joined an existing host).
        #[test]
        fn adding_or_removing_an_osd_moves_close_to_the_minimum(
            hosts in proptest::collection::vec((0u8..3, 1u8..4, 2u32..8), 6..14),
            new_host in 0usize..20,
            new_weight in 2u32..8,
            remove_pick in 0usize..1000,
        ) {
            let p = pool(3, 2048, FailureDomain::Host);
            let replicas = (p.pg_num as usize * 3) as f64;
            let base = random_map(&hosts);
            // Add one OSD, on an existing host or a new one.
            let mut grown = base.clone();
            let id = OsdId(base.osds.len() as u32);
            let host = if new_host < hosts.len() { format!("h{new_host}") } else { "hnew".into() };
            let rack = if new_host < hosts.len() { format!("r{}", hosts[new_host].0) } else { "r0".into() };
            let mut o = base.osds.values().next().unwrap().clone();
            o.id = id;
            o.uuid = [0xee; 16];
            o.location = Location { rack, host };
            o.weight = new_weight * ONE / 4;
            grown.osds.insert(id, o);
            let share = held(&grown, &p, id) as f64 / replicas;
            let got = moved(&base, &grown, &p) as f64 / replicas;
            prop_assert!(got <= 1.2 * share, "add: moved {got:.4}, minimum {share:.4}");
            // Remove one (mark it out).
            let victim = OsdId((remove_pick % base.osds.len()) as u32);
            let mut shrunk = base.clone();
            shrunk.osds.get_mut(&victim).unwrap().is_in = false;
            let share = held(&base, &p, victim) as f64 / replicas;
            let got = moved(&base, &shrunk, &p) as f64 / replicas;
            prop_assert!(got <= 1.2 * share, "remove: moved {got:.4}, minimum {share:.4}");
        }

        #[test]
        fn adding_an_osd_moves_data_only_to_it(n in 2u32..8, seed in 0u64..1000) {
            let osds: Vec<(u32, String)> = (0..n).map(|i| (i, format!("h{i}"))).collect();
            let spec: Vec<(u32, &str, &str, u32)> =
                osds.iter().map(|(i, h)| (*i, "r", h.as_str(), ONE)).collect();
            let m = map_with(&spec);
            let mut spec2 = spec.clone();
            spec2.push((n, "r", "hnew", ONE));
            let m2 = map_with(&spec2);
            let p = pool(1, 256, FailureDomain::Host);
            for pg in 0..256u32 {
                let id = PgId { pool: PoolId(1), pg: pg ^ (seed as u32 & 0xff) };
                let a = pg_placement(&m, &p, id);
                let b = pg_placement(&m2, &p, id);
                prop_assert!(a == b || b == vec![OsdId(n)], "{a:?} -> {b:?}");
            }
        }

        #[test]
        fn object_pg_is_in_range(name in ".{0,40}", pg_num in 1u32..5000) {
            let p = pool(1, pg_num, FailureDomain::Osd);
            let pg = object_pg(&p, &name);
            prop_assert!(pg.pg < pg_num);
            prop_assert_eq!(PgId::from_collection(pg.collection()), pg);
            prop_assert!(pg_core(pg, 3) < 3);
        }
    }
}

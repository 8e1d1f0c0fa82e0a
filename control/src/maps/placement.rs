//! Placement: object -> placement group -> OSDs -> owning core, computed the same way
//! by every client and OSD from the OSD map alone (no lookups).
//!
//! * **Object to PG**: a 64-bit hash of the name, reduced by a *stable modulo* over the
//!   pool's `pg_num` (Ceph's `ceph_stable_mod`): growing `pg_num` only splits PGs, so
//!   objects move only into the new PGs.
//! * **PG to OSDs**: *straw2* over the host/rack hierarchy. Every candidate draws
//!   `log2(u) / weight` with `u` a hash of (pool, pg, replica, candidate); the largest draw
//!   wins. Changing one candidate's weight moves data only to or from that candidate, and
//!   the result depends on nothing but the map. Replicas go to distinct failure domains
//!   (the pool's `failure_domain`); OSDs that are out (or weigh 0) take no data.
//! * **Up set and primary**: the placement minus OSDs that are down; the first is the
//!   primary. A PG with no up OSD has no primary (its I/O waits for a map change).
//! * **PG to core**: a hash of (pool, pg) modulo the OSD's core count, so a client sends an
//!   op straight to the core that owns the PG.
//!
//! All arithmetic is integer (the logarithm too), so every platform and build computes
//! the same placement: it is part of the on-disk and on-wire contract.

use super::osdmap::{FailureDomain, OsdId, OsdInfo, OsdMap, Pool, PoolId};

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

/// The hierarchy of eligible OSDs: racks -> hosts -> OSDs, each level with its summed
/// weight, in a fixed (name) order.
struct Tree<'a> {
    racks: Vec<Bucket<'a, Bucket<'a, (OsdId, u64)>>>,
}

/// A named bucket: (name, summed weight, children).
type Bucket<'a, T> = (&'a str, u64, Vec<T>);

impl<'a> Tree<'a> {
    fn new(map: &'a OsdMap) -> Tree<'a> {
        let mut racks: Vec<Bucket<'_, Bucket<'_, (OsdId, u64)>>> = Vec::new();
        for (rack, hosts) in map.hierarchy() {
            let mut hs = Vec::new();
            for (host, ids) in hosts {
                let osds: Vec<(OsdId, u64)> = ids
                    .iter()
                    .filter_map(|id| map.osd(*id))
                    .filter(|o| eligible(o))
                    .map(|o| (o.id, u64::from(o.weight)))
                    .collect();
                let w = osds.iter().map(|o| o.1).sum();
                if w > 0 {
                    hs.push((host, w, osds));
                }
            }
            let w = hs.iter().map(|h| h.1).sum();
            if w > 0 {
                racks.push((rack, w, hs));
            }
        }
        Tree { racks }
    }
}

/// Salts per level so a rack and an OSD with the same index draw differently.
const SALT_RACK: u64 = 1;
const SALT_HOST: u64 = 2;
const SALT_OSD: u64 = 3;

fn name_key(s: &str) -> u64 {
    hash_name(s.as_bytes())
}

fn pick<T>(items: &[T], key: impl Fn(&T) -> (u64, u64), x: u64, r: u64, salt: u64) -> usize {
    let mut best = 0;
    let mut best_draw = i128::MIN;
    for (i, it) in items.iter().enumerate() {
        let (id, w) = key(it);
        let d = draw(hash4(x, r, id, salt), w);
        if i == 0 || d > best_draw {
            best = i;
            best_draw = d;
        }
    }
    best
}

/// Attempts per replica before giving up on finding a distinct failure domain.
const TRIES: u64 = 50;

/// The OSDs a PG is placed on (up to `pool.size`, fewer if the hierarchy has too few
/// failure domains), in replica order, whether up or not.
pub fn pg_placement(map: &OsdMap, pool: &Pool, pg: PgId) -> Vec<OsdId> {
    let tree = Tree::new(map);
    let x = hash4(0x9e37, u64::from(pg.pool.0), u64::from(pg.pg), 0);
    let mut out: Vec<OsdId> = Vec::with_capacity(usize::from(pool.size));
    let mut domains: Vec<(usize, usize)> = Vec::new();
    if tree.racks.is_empty() {
        return out;
    }
    for rep in 0..u64::from(pool.size) {
        for attempt in 0..TRIES {
            let r = rep + attempt * u64::from(pool.size);
            let ri = pick(&tree.racks, |r| (name_key(r.0), r.1), x, r, SALT_RACK);
            let hosts = &tree.racks[ri].2;
            let hi = pick(hosts, |h| (name_key(h.0), h.1), x, r, SALT_HOST);
            let osds = &hosts[hi].2;
            let oi = pick(osds, |o| (u64::from(o.0.0), o.1), x, r, SALT_OSD);
            let osd = osds[oi].0;
            let clash = match pool.failure_domain {
                FailureDomain::Rack => domains.iter().any(|d| d.0 == ri),
                FailureDomain::Host => domains.contains(&(ri, hi)),
                FailureDomain::Osd => out.contains(&osd),
            };
            if !clash && !out.contains(&osd) {
                out.push(osd);
                domains.push((ri, hi));
                break;
            }
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
    let up = placement.iter().copied().filter(|id| map.osd(*id).is_some_and(|o| o.up)).collect();
    PgMapping { pg, placement, up }
}

/// Primaries of PGs at one map epoch, each computed once (placement walks the whole
/// hierarchy; a request should not). A map is identified by its epoch: maps change only
/// through incrementals, so two maps of one epoch are the same map.
#[derive(Debug, Default)]
pub struct PrimaryCache {
    epoch: u64,
    pgs: std::collections::HashMap<PgId, Option<OsdId>>,
}

impl PrimaryCache {
    pub fn primary(&mut self, map: &OsdMap, pool: &Pool, pg: PgId) -> Option<OsdId> {
        if self.epoch != map.epoch {
            self.pgs.clear();
            self.epoch = map.epoch;
        }
        *self.pgs.entry(pg).or_insert_with(|| pg_mapping(map, pool, pg).primary())
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
    use crate::maps::osdmap::{Location, Maintenance, ONE};
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
    const PIN_PLACEMENT: [[u32; 2]; 8] =
        [[1, 0], [1, 0], [1, 2], [0, 1], [0, 2], [0, 2], [2, 0], [2, 1]];

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

    proptest! {
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

//! The in-memory index of one shard: collections, their objects (size, version, xattrs,
//! block map with a crc32c per block) and PG logs. Rebuilt at mount from the checkpoint
//! plus the journal; every change goes through [`Index::apply`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::CollId;
use super::delta::Delta;

/// Where a block's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Loc {
    /// On the device, at this shard-relative block.
    Disk(u64),
    /// Staged in memory, not yet durable (never in a checkpoint).
    Pending(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRef {
    pub loc: Loc,
    pub crc: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Onode {
    pub size: u64,
    /// Sequence number of the last record that changed the object.
    pub version: u64,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    pub blocks: BlockMap,
}

/// An object's block map: block index within the object -> where the block is and its
/// crc32c. Most objects are small, so up to [`BlockMap::SMALL_MAX`] entries live in one
/// sorted vector (one small allocation; a B-tree node is ~300 bytes even for one entry,
/// and at 500k objects those nodes made every index update a cache miss). Larger maps
/// are a B-tree. Encoded exactly like a `BTreeMap<u64, BlockRef>`.
#[derive(Debug, Clone)]
pub enum BlockMap {
    Small(Vec<(u64, BlockRef)>),
    Big(BTreeMap<u64, BlockRef>),
}

impl Default for BlockMap {
    fn default() -> Self {
        BlockMap::Small(Vec::new())
    }
}

impl BlockMap {
    pub const SMALL_MAX: usize = 32;

    pub fn get(&self, k: &u64) -> Option<&BlockRef> {
        match self {
            BlockMap::Small(v) => v.binary_search_by_key(k, |e| e.0).ok().map(|i| &v[i].1),
            BlockMap::Big(m) => m.get(k),
        }
    }

    pub fn get_mut(&mut self, k: &u64) -> Option<&mut BlockRef> {
        match self {
            BlockMap::Small(v) => match v.binary_search_by_key(k, |e| e.0) {
                Ok(i) => Some(&mut v[i].1),
                Err(_) => None,
            },
            BlockMap::Big(m) => m.get_mut(k),
        }
    }

    pub fn contains_key(&self, k: &u64) -> bool {
        self.get(k).is_some()
    }

    /// Inserts or replaces; returns the old entry.
    pub fn insert(&mut self, k: u64, r: BlockRef) -> Option<BlockRef> {
        match self {
            BlockMap::Small(v) => match v.binary_search_by_key(&k, |e| e.0) {
                Ok(i) => Some(std::mem::replace(&mut v[i].1, r)),
                Err(i) if v.len() < Self::SMALL_MAX => {
                    v.insert(i, (k, r));
                    None
                }
                Err(_) => {
                    let mut m: BTreeMap<u64, BlockRef> = v.drain(..).collect();
                    m.insert(k, r);
                    *self = BlockMap::Big(m);
                    None
                }
            },
            BlockMap::Big(m) => m.insert(k, r),
        }
    }

    pub fn remove(&mut self, k: &u64) -> Option<BlockRef> {
        match self {
            BlockMap::Small(v) => match v.binary_search_by_key(k, |e| e.0) {
                Ok(i) => Some(v.remove(i).1),
                Err(_) => None,
            },
            BlockMap::Big(m) => m.remove(k),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            BlockMap::Small(v) => v.len(),
            BlockMap::Big(m) => m.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entries in block order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &BlockRef)> + '_ {
        let (small, big) = match self {
            BlockMap::Small(v) => (Some(v.iter().map(|(k, r)| (*k, r))), None),
            BlockMap::Big(m) => (None, Some(m.iter().map(|(k, r)| (*k, r)))),
        };
        small.into_iter().flatten().chain(big.into_iter().flatten())
    }

    pub fn values(&self) -> impl Iterator<Item = &BlockRef> + '_ {
        self.iter().map(|(_, r)| r)
    }

    /// The highest mapped block.
    pub fn last_key_value(&self) -> Option<(u64, &BlockRef)> {
        match self {
            BlockMap::Small(v) => v.last().map(|(k, r)| (*k, r)),
            BlockMap::Big(m) => m.last_key_value().map(|(k, r)| (*k, r)),
        }
    }

    /// Mapped blocks in `[from, to)`, in order.
    pub fn keys_in(&self, from: u64, to: u64) -> Vec<u64> {
        if from >= to {
            return Vec::new();
        }
        match self {
            BlockMap::Small(v) => {
                v.iter().map(|e| e.0).filter(|k| (from..to).contains(k)).collect()
            }
            BlockMap::Big(m) => m.range(from..to).map(|(k, _)| *k).collect(),
        }
    }
}

impl std::ops::Index<&u64> for BlockMap {
    type Output = BlockRef;
    fn index(&self, k: &u64) -> &BlockRef {
        self.get(k).expect("block mapped")
    }
}

impl PartialEq for BlockMap {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for BlockMap {}

impl Serialize for BlockMap {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        // The length up front: postcard cannot encode a map of unknown length.
        let mut m = s.serialize_map(Some(self.len()))?;
        for (k, r) in self.iter() {
            m.serialize_entry(&k, r)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for BlockMap {
    fn deserialize<De: serde::Deserializer<'de>>(d: De) -> Result<Self, De::Error> {
        let m = BTreeMap::<u64, BlockRef>::deserialize(d)?;
        Ok(if m.len() <= Self::SMALL_MAX {
            BlockMap::Small(m.into_iter().collect())
        } else {
            BlockMap::Big(m)
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Coll {
    pub objects: ObjectMap,
    pub pglog: BTreeMap<u64, Vec<u8>>,
}

/// The objects of one collection: a hash map for point lookups (one or two cache misses
/// instead of a string comparison per B-tree level, which dominated the read path at
/// 100k objects) plus the sorted names for listing with a cursor and for the checkpoint
/// walk. (Checkpoints encode objects one by one, see `checkpoint.rs`.)
#[derive(Debug, Clone, Default)]
pub struct ObjectMap {
    /// Names are shared between the two maps (one allocation per object).
    by_name: HashMap<Arc<str>, Onode>,
    names: BTreeSet<Arc<str>>,
}

impl ObjectMap {
    pub fn get(&self, name: &str) -> Option<&Onode> {
        self.by_name.get(name)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Onode> {
        self.by_name.get_mut(name)
    }

    /// The object, created empty if missing.
    pub fn get_or_create(&mut self, name: &str) -> &mut Onode {
        if !self.by_name.contains_key(name) {
            let key: Arc<str> = Arc::from(name);
            self.names.insert(Arc::clone(&key));
            self.by_name.insert(key, Onode::default());
        }
        self.by_name.get_mut(name).expect("just inserted")
    }

    /// Inserts an object that must not exist yet; false (and no change) if it does.
    pub fn insert_new(&mut self, name: String, o: Onode) -> bool {
        if self.by_name.contains_key(name.as_str()) {
            return false;
        }
        let key: Arc<str> = Arc::from(name);
        self.names.insert(Arc::clone(&key));
        self.by_name.insert(key, o);
        true
    }

    pub fn remove(&mut self, name: &str) -> Option<Onode> {
        let o = self.by_name.remove(name)?;
        let had = self.names.remove(name);
        debug_assert!(had, "object map name set out of step");
        Some(o)
    }

    pub fn len(&self) -> usize {
        debug_assert_eq!(self.by_name.len(), self.names.len());
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Objects in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Onode)> {
        self.names.iter().map(|n| (&**n, &self.by_name[n]))
    }

    /// Objects in no particular order (cheaper than [`iter`](Self::iter)).
    pub fn values(&self) -> impl Iterator<Item = &Onode> {
        self.by_name.values()
    }

    /// Names after `after` (all when `None`), in order.
    pub fn names_after<'a>(&'a self, after: Option<&str>) -> impl Iterator<Item = &'a str> + 'a {
        use std::ops::Bound;
        let lower = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        self.names.range::<str, _>((lower, Bound::Unbounded)).map(|n| &**n)
    }
}

impl PartialEq for ObjectMap {
    fn eq(&self, other: &Self) -> bool {
        self.by_name == other.by_name
    }
}

impl Eq for ObjectMap {}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Index {
    pub colls: BTreeMap<CollId, Coll>,
}

/// A delta that cannot apply: at replay this means the journal contradicts itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("collection {0} does not exist")]
    NoCollection(CollId),
    #[error("collection {0} already exists")]
    CollectionExists(CollId),
    #[error("collection {0} is not empty")]
    CollectionNotEmpty(CollId),
    #[error("object {1:?} in collection {0} does not exist")]
    NoObject(CollId, String),
    #[error("record has fewer data blocks than its deltas use")]
    DataShort,
}

/// Told about every disk mapping that appears or disappears, to keep segment live
/// counts exact.
pub trait LiveTracker {
    fn mapped(&mut self, block: u64);
    fn unmapped(&mut self, block: u64);
}

/// For callers that do not track liveness.
#[derive(Debug)]
pub struct NoTracking;

impl LiveTracker for NoTracking {
    fn mapped(&mut self, _: u64) {}
    fn unmapped(&mut self, _: u64) {}
}

fn unmap(tr: &mut dyn LiveTracker, r: &BlockRef) {
    if let Loc::Disk(b) = r.loc {
        tr.unmapped(b);
    }
}

impl Index {
    pub fn object(&self, coll: CollId, name: &str) -> Option<&Onode> {
        self.colls.get(&coll)?.objects.get(name)
    }

    /// Applies one delta. `data(i)` gives the location of the record's i-th data block
    /// counted from `data_base` (the index of this delta's first data block in the
    /// record). `seq` is the record's sequence number.
    pub fn apply(
        &mut self,
        delta: &Delta,
        seq: u64,
        data: &mut dyn FnMut(u64) -> Option<Loc>,
        tr: &mut dyn LiveTracker,
    ) -> Result<(), ApplyError> {
        fn coll_mut(
            colls: &mut BTreeMap<CollId, Coll>,
            c: CollId,
        ) -> Result<&mut Coll, ApplyError> {
            colls.get_mut(&c).ok_or(ApplyError::NoCollection(c))
        }
        match delta {
            Delta::CreateCollection { coll } => {
                if self.colls.contains_key(coll) {
                    return Err(ApplyError::CollectionExists(*coll));
                }
                self.colls.insert(*coll, Coll::default());
            }
            Delta::RemoveCollection { coll } => {
                let c = self.colls.get(coll).ok_or(ApplyError::NoCollection(*coll))?;
                if !c.objects.is_empty() {
                    return Err(ApplyError::CollectionNotEmpty(*coll));
                }
                self.colls.remove(coll);
            }
            Delta::Touch { coll, name } => {
                let c = coll_mut(&mut self.colls, *coll)?;
                c.objects.get_or_create(name).version = seq;
            }
            Delta::WriteBlocks { coll, name, first_block, crcs } => {
                let c = coll_mut(&mut self.colls, *coll)?;
                let o = c.objects.get_or_create(name);
                o.version = seq;
                for (i, crc) in crcs.iter().enumerate() {
                    let loc = data(i as u64).ok_or(ApplyError::DataShort)?;
                    if let Loc::Disk(b) = loc {
                        tr.mapped(b);
                    }
                    if let Some(old) =
                        o.blocks.insert(first_block + i as u64, BlockRef { loc, crc: *crc })
                    {
                        unmap(tr, &old);
                    }
                }
            }
            Delta::UnmapBlocks { coll, name, first_block, count } => {
                let o = coll_mut(&mut self.colls, *coll)?
                    .objects
                    .get_mut(name)
                    .ok_or_else(|| ApplyError::NoObject(*coll, name.clone()))?;
                o.version = seq;
                let end = first_block.saturating_add(*count);
                let doomed = o.blocks.keys_in(*first_block, end);
                for k in doomed {
                    if let Some(old) = o.blocks.remove(&k) {
                        unmap(tr, &old);
                    }
                }
            }
            Delta::SetSize { coll, name, size } => {
                let o = coll_mut(&mut self.colls, *coll)?
                    .objects
                    .get_mut(name)
                    .ok_or_else(|| ApplyError::NoObject(*coll, name.clone()))?;
                o.size = *size;
                o.version = seq;
            }
            Delta::Delete { coll, name } => {
                let o = coll_mut(&mut self.colls, *coll)?
                    .objects
                    .remove(name)
                    .ok_or_else(|| ApplyError::NoObject(*coll, name.clone()))?;
                for r in o.blocks.values() {
                    unmap(tr, r);
                }
            }
            Delta::SetXattr { coll, name, key, value } => {
                let o = coll_mut(&mut self.colls, *coll)?.objects.get_or_create(name);
                o.xattrs.insert(key.clone(), value.clone());
                o.version = seq;
            }
            Delta::RmXattr { coll, name, key } => {
                let o = coll_mut(&mut self.colls, *coll)?
                    .objects
                    .get_mut(name)
                    .ok_or_else(|| ApplyError::NoObject(*coll, name.clone()))?;
                o.xattrs.remove(key);
                o.version = seq;
            }
            Delta::PgLogAppend { coll, key, entry } => {
                coll_mut(&mut self.colls, *coll)?.pglog.insert(*key, entry.clone());
            }
            Delta::PgLogTrim { coll, upto } => {
                let c = coll_mut(&mut self.colls, *coll)?;
                c.pglog = c.pglog.split_off(&upto.saturating_add(1));
            }
            Delta::Relocate { coll, name, block, from, crc } => {
                let loc = data(0).ok_or(ApplyError::DataShort)?;
                let Some(o) = self.colls.get_mut(coll).and_then(|c| c.objects.get_mut(name)) else {
                    return Ok(());
                };
                if let Some(r) = o.blocks.get_mut(block)
                    && r.loc == Loc::Disk(*from)
                    && r.crc == *crc
                {
                    tr.unmapped(*from);
                    if let Loc::Disk(b) = loc {
                        tr.mapped(b);
                    }
                    r.loc = loc;
                }
            }
        }
        Ok(())
    }

    /// Every disk block the index maps, with its owner; for live counts and fsck.
    pub fn for_each_disk_block(&self, mut f: impl FnMut(CollId, &str, u64, u64, u32)) {
        for (c, coll) in &self.colls {
            for (name, o) in coll.objects.iter() {
                for (lb, r) in o.blocks.iter() {
                    if let Loc::Disk(b) = r.loc {
                        f(*c, name, lb, b, r.crc);
                    }
                }
            }
        }
    }

    /// Structural invariants (cheap enough for tests and fsck): no block beyond the
    /// object's size, no pending location when `durable_only`.
    pub fn check_invariants(&self, durable_only: bool) -> Result<(), String> {
        for (c, coll) in &self.colls {
            for (name, o) in coll.objects.iter() {
                let blocks_for_size = o.size.div_ceil(super::format::BS as u64);
                if let Some((last, _)) = o.blocks.last_key_value()
                    && last >= blocks_for_size
                {
                    return Err(format!("{c}/{name}: block {last} mapped beyond size {}", o.size));
                }
                if durable_only && o.blocks.values().any(|r| matches!(r.loc, Loc::Pending(_))) {
                    return Err(format!("{c}/{name}: pending block in a durable index"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Count(std::collections::HashMap<u64, i64>);
    impl LiveTracker for Count {
        fn mapped(&mut self, b: u64) {
            *self.0.entry(b).or_default() += 1;
        }
        fn unmapped(&mut self, b: u64) {
            *self.0.entry(b).or_default() -= 1;
        }
    }

    #[test]
    fn apply_tracks_liveness_and_relocation_is_conditional() {
        let mut ix = Index::default();
        let mut live = Count::default();
        let c = CollId(1);
        let mut none = |_| None;
        ix.apply(&Delta::CreateCollection { coll: c }, 1, &mut none, &mut live).unwrap();
        let at = |base: u64| move |i: u64| Some(Loc::Disk(base + i));
        ix.apply(
            &Delta::WriteBlocks { coll: c, name: "o".into(), first_block: 0, crcs: vec![1, 2] },
            2,
            &mut at(100),
            &mut live,
        )
        .unwrap();
        ix.apply(
            &Delta::SetSize { coll: c, name: "o".into(), size: 8192 },
            2,
            &mut none,
            &mut live,
        )
        .unwrap();
        // Overwrite block 1: 101 dies.
        ix.apply(
            &Delta::WriteBlocks { coll: c, name: "o".into(), first_block: 1, crcs: vec![3] },
            3,
            &mut at(200),
            &mut live,
        )
        .unwrap();
        assert_eq!(live.0[&101], 0);
        // Relocating block 1 from its old place does nothing; from its current place moves it.
        ix.apply(
            &Delta::Relocate { coll: c, name: "o".into(), block: 1, from: 101, crc: 2 },
            4,
            &mut at(300),
            &mut live,
        )
        .unwrap();
        assert_eq!(ix.object(c, "o").unwrap().blocks[&1].loc, Loc::Disk(200));
        ix.apply(
            &Delta::Relocate { coll: c, name: "o".into(), block: 1, from: 200, crc: 3 },
            5,
            &mut at(300),
            &mut live,
        )
        .unwrap();
        assert_eq!(ix.object(c, "o").unwrap().blocks[&1].loc, Loc::Disk(300));
        assert_eq!((live.0[&200], live.0[&300]), (0, 1));
        assert_eq!(ix.object(c, "o").unwrap().version, 3, "relocation is not a new version");
        ix.apply(&Delta::Delete { coll: c, name: "o".into() }, 6, &mut none, &mut live).unwrap();
        assert!(live.0.values().all(|&v| v == 0), "{:?}", live.0);
        assert_eq!(
            ix.apply(
                &Delta::SetSize { coll: c, name: "o".into(), size: 1 },
                7,
                &mut none,
                &mut live
            ),
            Err(ApplyError::NoObject(c, "o".into()))
        );
        ix.apply(&Delta::RemoveCollection { coll: c }, 8, &mut none, &mut live).unwrap();
        assert!(ix.colls.is_empty());
    }

    #[test]
    fn pglog_append_and_trim() {
        let mut ix = Index::default();
        let c = CollId(2);
        let mut none = |_| None;
        ix.apply(&Delta::CreateCollection { coll: c }, 1, &mut none, &mut NoTracking).unwrap();
        for k in 1..=5 {
            ix.apply(
                &Delta::PgLogAppend { coll: c, key: k, entry: vec![k as u8] },
                1 + k,
                &mut none,
                &mut NoTracking,
            )
            .unwrap();
        }
        ix.apply(&Delta::PgLogTrim { coll: c, upto: 3 }, 9, &mut none, &mut NoTracking).unwrap();
        assert_eq!(ix.colls[&c].pglog.keys().copied().collect::<Vec<_>>(), vec![4, 5]);
    }

    proptest::proptest! {
        /// The block map behaves exactly like a B-tree map through every operation,
        /// across the switch from small to big, and encodes the same.
        #[test]
        fn block_map_matches_a_btree_map(
            ops in proptest::collection::vec((0u8..4, 0u64..80, 0u64..80), 0..200)
        ) {
            let mut m = BlockMap::default();
            let mut model = BTreeMap::new();
            for (i, (op, a, b)) in ops.into_iter().enumerate() {
                let r = BlockRef { loc: Loc::Disk(i as u64), crc: i as u32 };
                match op {
                    0 | 1 => proptest::prop_assert_eq!(m.insert(a, r), model.insert(a, r)),
                    2 => proptest::prop_assert_eq!(m.remove(&a), model.remove(&a)),
                    _ => {
                        let want: Vec<u64> = if a < b {
                            model.range(a..b).map(|(k, _)| *k).collect()
                        } else {
                            Vec::new()
                        };
                        proptest::prop_assert_eq!(m.keys_in(a, b), want);
                    }
                }
                proptest::prop_assert_eq!(m.len(), model.len());
                proptest::prop_assert_eq!(m.get(&a), model.get(&a));
                proptest::prop_assert_eq!(
                    m.last_key_value(),
                    model.last_key_value().map(|(k, r)| (*k, r))
                );
            }
            let pairs: Vec<(u64, BlockRef)> = m.iter().map(|(k, r)| (k, *r)).collect();
            let want: Vec<(u64, BlockRef)> = model.iter().map(|(k, r)| (*k, *r)).collect();
            proptest::prop_assert_eq!(pairs, want);
            let bytes = postcard::to_allocvec(&m).unwrap();
            proptest::prop_assert_eq!(&bytes, &postcard::to_allocvec(&model).unwrap());
            let back: BlockMap = postcard::from_bytes(&bytes).unwrap();
            proptest::prop_assert_eq!(back, m);
        }
    }
}

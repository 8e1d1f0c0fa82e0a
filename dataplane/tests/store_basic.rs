//! The store's operations, end to end on a RAM device.

use sluice_dataplane::store::blocking::{run_query, run_txn, settle};
use sluice_dataplane::store::{
    Answer, CollId, Missing, MkfsOptions, Query, Shard, StoreConfig, StoreError, Transaction, TxOp,
    mkfs,
};
use sluice_nvme::RamDevice;

const C: CollId = CollId(1);

fn new_store(size: u64) -> Shard<RamDevice> {
    let mut dev = RamDevice::new(size, 64);
    mkfs(
        &mut dev,
        &MkfsOptions { shards: 1, segment_bytes: Some(256 << 10), ..Default::default() },
    )
    .unwrap();
    Shard::open(dev, 0, StoreConfig::default()).map_err(|f| f.error).unwrap()
}

fn tx(ops: Vec<TxOp>) -> Transaction {
    Transaction { ops }
}

fn read<D: sluice_nvme::BlockDevice>(
    s: &mut Shard<D>,
    name: &str,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, StoreError> {
    match run_query(s, Query::Read { coll: C, name: name.into(), offset, len })? {
        Answer::Data(d) => Ok(d.data().to_vec()),
        other => panic!("unexpected answer {other:?}"),
    }
}

fn stat(s: &mut Shard<RamDevice>, name: &str) -> Result<(u64, u64), StoreError> {
    match run_query(s, Query::Stat { coll: C, name: name.into() })? {
        Answer::Stat(st) => Ok((st.size, st.version)),
        other => panic!("unexpected answer {other:?}"),
    }
}

#[test]
fn writes_reads_and_metadata_round_trip() {
    let mut s = new_store(16 << 20);
    run_txn(&mut s, tx(vec![TxOp::CreateCollection { coll: C }])).unwrap();
    assert_eq!(
        run_txn(&mut s, tx(vec![TxOp::CreateCollection { coll: C }])),
        Err(StoreError::Exists(C))
    );
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
    let v = run_txn(
        &mut s,
        tx(vec![TxOp::WriteFull { coll: C, name: "a".into(), data: data.clone() }]),
    )
    .unwrap();
    assert_eq!(read(&mut s, "a", 0, u64::MAX).unwrap(), data);
    assert_eq!(read(&mut s, "a", 4000, 200).unwrap(), data[4000..4200]);
    assert_eq!(read(&mut s, "a", 9_990, 100).unwrap(), data[9_990..]);
    assert!(read(&mut s, "a", 20_000, 10).unwrap().is_empty());
    assert_eq!(stat(&mut s, "a").unwrap(), (10_000, v));
    // Unaligned overwrite across a block boundary, and an extension with a gap.
    run_txn(
        &mut s,
        tx(vec![TxOp::Write { coll: C, name: "a".into(), offset: 4090, data: vec![0xee; 20] }]),
    )
    .unwrap();
    run_txn(
        &mut s,
        tx(vec![TxOp::Write { coll: C, name: "a".into(), offset: 20_000, data: vec![1, 2, 3] }]),
    )
    .unwrap();
    let mut want = data.clone();
    want[4090..4110].fill(0xee);
    want.resize(20_000, 0);
    want.extend_from_slice(&[1, 2, 3]);
    assert_eq!(read(&mut s, "a", 0, u64::MAX).unwrap(), want);
    // Truncate down into a block, then extend again: the cut-off bytes read as zeroes.
    run_txn(&mut s, tx(vec![TxOp::Truncate { coll: C, name: "a".into(), size: 5000 }])).unwrap();
    run_txn(&mut s, tx(vec![TxOp::Truncate { coll: C, name: "a".into(), size: 9000 }])).unwrap();
    want.truncate(5000);
    want.resize(9000, 0);
    assert_eq!(read(&mut s, "a", 0, u64::MAX).unwrap(), want);
    // Zero a range inside.
    run_txn(&mut s, tx(vec![TxOp::Zero { coll: C, name: "a".into(), offset: 100, len: 8000 }]))
        .unwrap();
    want[100..8100].fill(0);
    assert_eq!(read(&mut s, "a", 0, u64::MAX).unwrap(), want);
    // Xattrs.
    run_txn(
        &mut s,
        tx(vec![TxOp::SetXattr {
            coll: C,
            name: "a".into(),
            key: "k".into(),
            value: b"v".to_vec(),
        }]),
    )
    .unwrap();
    assert!(
        matches!(run_query(&mut s, Query::GetXattr { coll: C, name: "a".into(), key: "k".into() }).unwrap(), Answer::Xattr(v) if v == b"v")
    );
    run_txn(&mut s, tx(vec![TxOp::RmXattr { coll: C, name: "a".into(), key: "k".into() }]))
        .unwrap();
    assert_eq!(
        run_txn(&mut s, tx(vec![TxOp::RmXattr { coll: C, name: "a".into(), key: "k".into() }])),
        Err(StoreError::NotFound(Missing::Xattr(C, "a".into(), "k".into())))
    );
    // Delete.
    run_txn(&mut s, tx(vec![TxOp::Delete { coll: C, name: "a".into() }])).unwrap();
    assert_eq!(read(&mut s, "a", 0, 1), Err(StoreError::NotFound(Missing::Object(C, "a".into()))));
    assert_eq!(
        run_txn(&mut s, tx(vec![TxOp::Delete { coll: C, name: "a".into() }])),
        Err(StoreError::NotFound(Missing::Object(C, "a".into())))
    );
}

#[test]
fn transactions_are_all_or_nothing() {
    let mut s = new_store(16 << 20);
    run_txn(&mut s, tx(vec![TxOp::CreateCollection { coll: C }])).unwrap();
    let r = run_txn(
        &mut s,
        tx(vec![
            TxOp::WriteFull { coll: C, name: "x".into(), data: vec![1; 100] },
            TxOp::Delete { coll: C, name: "missing".into() },
        ]),
    );
    assert_eq!(r, Err(StoreError::NotFound(Missing::Object(C, "missing".into()))));
    assert!(
        matches!(read(&mut s, "x", 0, 10), Err(StoreError::NotFound(_))),
        "the first op must not have happened"
    );
    // Later ops see earlier ones: create, write, xattr, delete, recreate.
    run_txn(
        &mut s,
        tx(vec![
            TxOp::WriteFull { coll: C, name: "y".into(), data: vec![2; 10] },
            TxOp::SetXattr { coll: C, name: "y".into(), key: "a".into(), value: vec![1] },
            TxOp::Delete { coll: C, name: "y".into() },
            TxOp::Write { coll: C, name: "y".into(), offset: 5, data: vec![3; 5] },
        ]),
    )
    .unwrap();
    assert_eq!(read(&mut s, "y", 0, 100).unwrap(), [vec![0; 5], vec![3; 5]].concat());
    assert!(
        matches!(run_query(&mut s, Query::GetXattrs { coll: C, name: "y".into() }).unwrap(), Answer::Xattrs(x) if x.is_empty())
    );
}

#[test]
fn listing_is_ordered_and_paged_and_collections_have_pg_logs() {
    let mut s = new_store(16 << 20);
    run_txn(
        &mut s,
        tx(vec![TxOp::CreateCollection { coll: C }, TxOp::CreateCollection { coll: CollId(2) }]),
    )
    .unwrap();
    let mut ops = Vec::new();
    for i in (0..25).rev() {
        ops.push(TxOp::Touch { coll: C, name: format!("obj{i:02}") });
    }
    run_txn(&mut s, tx(ops)).unwrap();
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let Answer::List { names, next } =
            run_query(&mut s, Query::List { coll: C, after: after.clone(), max: 10 }).unwrap()
        else {
            panic!()
        };
        all.extend(names);
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(all, (0..25).map(|i| format!("obj{i:02}")).collect::<Vec<_>>());
    assert!(
        matches!(run_query(&mut s, Query::ListCollections).unwrap(), Answer::Collections(c) if c == vec![C, CollId(2)])
    );
    assert_eq!(
        run_txn(&mut s, tx(vec![TxOp::RemoveCollection { coll: C }])),
        Err(StoreError::NotEmpty(C))
    );
    run_txn(&mut s, tx(vec![TxOp::RemoveCollection { coll: CollId(2) }])).unwrap();
    for k in 1..=5u64 {
        run_txn(&mut s, tx(vec![TxOp::PgLogAppend { coll: C, key: k, entry: vec![k as u8] }]))
            .unwrap();
    }
    run_txn(&mut s, tx(vec![TxOp::PgLogTrim { coll: C, upto: 2 }])).unwrap();
    let Answer::PgLog(entries) =
        run_query(&mut s, Query::PgLog { coll: C, after: Some(3), max: 10 }).unwrap()
    else {
        panic!()
    };
    assert_eq!(entries, vec![(4, vec![4]), (5, vec![5])]);
}

#[test]
fn state_survives_close_and_reopen() {
    let mut s = new_store(16 << 20);
    run_txn(&mut s, tx(vec![TxOp::CreateCollection { coll: C }])).unwrap();
    for i in 0..50u32 {
        run_txn(
            &mut s,
            tx(vec![TxOp::WriteFull {
                coll: C,
                name: format!("o{i}"),
                data: vec![i as u8; 5000 + i as usize],
            }]),
        )
        .unwrap();
    }
    settle(&mut s);
    let dev = s.into_device();
    let mut s = Shard::open(dev, 0, StoreConfig::default()).map_err(|f| f.error).unwrap();
    for i in 0..50u32 {
        assert_eq!(
            read(&mut s, &format!("o{i}"), 0, u64::MAX).unwrap(),
            vec![i as u8; 5000 + i as usize]
        );
    }
    // And again, after more writes on top of the recovery checkpoint.
    run_txn(&mut s, tx(vec![TxOp::WriteFull { coll: C, name: "o0".into(), data: vec![9; 3] }]))
        .unwrap();
    let dev = s.into_device();
    let mut s = Shard::open(dev, 0, StoreConfig::default()).map_err(|f| f.error).unwrap();
    assert_eq!(read(&mut s, "o0", 0, u64::MAX).unwrap(), vec![9; 3]);
    assert_eq!(read(&mut s, "o49", 0, u64::MAX).unwrap(), vec![49; 5049]);
}

/// A reactor may sleep only when a device completion will wake it: never with work that
/// arrived since the last poll, never with queued work and nothing in flight.
#[test]
fn the_shard_refuses_to_park_while_work_can_progress() {
    let mut s = new_store(16 << 20);
    assert!(s.prepare_park(), "an idle shard may park");
    s.after_park();
    s.submit(tx(vec![TxOp::CreateCollection { coll: C }]), 1).unwrap();
    assert!(!s.prepare_park(), "a transaction submitted after the last poll must be polled");
    s.query(Query::Stat { coll: C, name: "x".into() }, 2);
    assert!(!s.prepare_park(), "a query submitted after the last poll must be polled");
    let mut done = Vec::new();
    let mut rounds = 0;
    while done.len() < 2 {
        s.poll(&mut |e| done.push(e));
        rounds += 1;
        assert!(rounds < 10_000, "the shard never finished two operations");
    }
    settle(&mut s);
    assert!(s.prepare_park(), "a shard with nothing to do may park again");
    s.after_park();
}

/// The checkpoint header carries the segment table in one part: mkfs refuses a geometry
/// where it would not fit, instead of a store that cannot checkpoint.
#[test]
fn mkfs_refuses_more_segments_than_a_checkpoint_header_can_hold() {
    let mut dev = RamDevice::new(192 << 20, 8);
    let e = mkfs(
        &mut dev,
        &MkfsOptions { shards: 1, segment_bytes: Some(64 << 10), ..Default::default() },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("too many for the checkpoint header"), "{e}");
    mkfs(&mut dev, &MkfsOptions { shards: 1, segment_bytes: Some(1 << 20), ..Default::default() })
        .unwrap();
}

#[derive(Debug, Clone)]
enum ModelOp {
    WriteFull(usize, Vec<u8>),
    Write(usize, u64, Vec<u8>),
    Truncate(usize, u64),
    Zero(usize, u64, u64),
}

fn model_op() -> impl proptest::strategy::Strategy<Value = ModelOp> {
    use proptest::prelude::*;
    let data =
        |max| (0usize..max, any::<u8>()).prop_map(|(n, b)| (0..n).map(|i| b ^ (i as u8)).collect());
    prop_oneof![
        (0usize..3, data(20_000)).prop_map(|(o, d)| ModelOp::WriteFull(o, d)),
        (0usize..3, 0u64..30_000, data(12_000)).prop_map(|(o, at, d)| ModelOp::Write(o, at, d)),
        (0usize..3, 0u64..30_000).prop_map(|(o, n)| ModelOp::Truncate(o, n)),
        (0usize..3, 0u64..30_000, 0u64..12_000).prop_map(|(o, at, n)| ModelOp::Zero(o, at, n)),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 48, ..Default::default() })]

    /// Writes of every shape (whole, at offsets with partial first and last blocks,
    /// truncates, zeroes), several staged at once so later ones build on blocks that are
    /// not durable yet, read back equal to a model, before and after a reopen.
    #[test]
    fn partial_writes_match_a_model(
        groups in proptest::collection::vec(proptest::collection::vec(model_op(), 1..6), 1..8),
    ) {
        let mut s = new_store(32 << 20);
        run_txn(&mut s, tx(vec![TxOp::CreateCollection { coll: C }])).unwrap();
        let names = ["a", "b", "c"];
        let mut model: Vec<Option<Vec<u8>>> = vec![None; 3];
        let mut token = 0;
        for group in &groups {
            for op in group {
                let (o, txop) = match op.clone() {
                    ModelOp::WriteFull(o, d) => {
                        model[o] = Some(d.clone());
                        (o, TxOp::WriteFull { coll: C, name: names[o].into(), data: d })
                    }
                    ModelOp::Write(o, at, d) => {
                        let m = model[o].get_or_insert_with(Vec::new);
                        // An empty write changes nothing (not even the size).
                        let end = at as usize + d.len();
                        if !d.is_empty() {
                            if m.len() < end {
                                m.resize(end, 0);
                            }
                            m[at as usize..end].copy_from_slice(&d);
                        }
                        (o, TxOp::Write { coll: C, name: names[o].into(), offset: at, data: d })
                    }
                    ModelOp::Truncate(o, n) => {
                        model[o].get_or_insert_with(Vec::new).resize(n as usize, 0);
                        (o, TxOp::Truncate { coll: C, name: names[o].into(), size: n })
                    }
                    ModelOp::Zero(o, at, n) => {
                        let m = model[o].get_or_insert_with(Vec::new);
                        let end = (at + n).min(m.len() as u64) as usize;
                        if (at as usize) < end {
                            m[at as usize..end].fill(0);
                        }
                        (o, TxOp::Zero { coll: C, name: names[o].into(), offset: at, len: n })
                    }
                };
                let _ = o;
                token += 1;
                s.submit(tx(vec![txop]), token).unwrap();
            }
            let mut failed = Vec::new();
            while !s.is_idle() {
                s.poll(&mut |e| {
                    if let sluice_dataplane::store::StoreEvent::Txn { result: Err(e), token } = e {
                        failed.push((token, e));
                    }
                });
            }
            proptest::prop_assert!(failed.is_empty(), "failed: {:?}", failed);
            for (i, m) in model.iter().enumerate() {
                if let Some(m) = m {
                    proptest::prop_assert_eq!(&read(&mut s, names[i], 0, u64::MAX).unwrap(), m);
                }
            }
        }
        let dev = s.into_device();
        let mut s = Shard::open(dev, 0, StoreConfig::default()).map_err(|f| f.error).unwrap();
        for (i, m) in model.iter().enumerate() {
            if let Some(m) = m {
                proptest::prop_assert_eq!(&read(&mut s, names[i], 0, u64::MAX).unwrap(), m);
            }
        }
    }
}

/// A shard on io_uring with its DMA pools registered as fixed buffers (as `sluice-osd`
/// opens it): the pools really are registered, and objects up to the largest write
/// round-trip, also after a reopen.
#[test]
fn a_shard_on_registered_pools_round_trips_large_objects() {
    use sluice_dataplane::store::StorePools;
    use sluice_nvme::{UringDevice, UringOptions};
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("dev");
    std::fs::File::create(&path).unwrap().set_len(256 << 20).unwrap();
    let open = |path: &std::path::Path| {
        let cfg = StoreConfig::default();
        let pools = StorePools::new(&cfg).unwrap();
        let opts = UringOptions { fixed_pools: pools.all(), ..Default::default() };
        let dev = UringDevice::open(path, opts).unwrap();
        let probe = pools.chunks.alloc().unwrap();
        assert!(dev.is_fixed(&probe), "the chunk pool is registered with the ring");
        drop(probe);
        (dev, cfg, pools)
    };
    let (mut dev, _, _) = open(&path);
    mkfs(&mut dev, &MkfsOptions { shards: 1, ..Default::default() }).unwrap();
    drop(dev);
    let (dev, cfg, pools) = open(&path);
    let mut s = Shard::open_with(dev, 0, cfg, Some(pools)).map_err(|f| f.error).unwrap();
    run_txn(&mut s, tx(vec![TxOp::CreateCollection { coll: C }])).unwrap();
    let sizes = [1usize, 4095, 4096, 4097, 1 << 20, (4 << 20) + 1];
    let data = |n: usize| -> Vec<u8> { (0..n).map(|i| (i * 13 + n) as u8).collect() };
    for (i, &n) in sizes.iter().enumerate() {
        run_txn(
            &mut s,
            tx(vec![TxOp::WriteFull { coll: C, name: format!("o{i}"), data: data(n) }]),
        )
        .unwrap();
    }
    for (i, &n) in sizes.iter().enumerate() {
        assert_eq!(read(&mut s, &format!("o{i}"), 0, u64::MAX).unwrap(), data(n), "size {n}");
    }
    settle(&mut s);
    drop(s);
    let (dev, cfg, pools) = open(&path);
    let mut s = Shard::open_with(dev, 0, cfg, Some(pools)).map_err(|f| f.error).unwrap();
    for (i, &n) in sizes.iter().enumerate() {
        assert_eq!(read(&mut s, &format!("o{i}"), 0, u64::MAX).unwrap(), data(n), "size {n}");
    }
}

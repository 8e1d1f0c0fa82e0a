//! The cleaner keeps a busy store writable: overwriting the same objects until the
//! device was written five times over, with live data at about two thirds of capacity,
//! never runs out of space, and reclaims segments.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sluice_dataplane::store::blocking::{run_query, run_txn, settle};
use sluice_dataplane::store::{
    Answer, CollId, MkfsOptions, Query, Shard, StoreConfig, StoreEvent, Transaction, TxOp, fsck,
    mkfs,
};
use sluice_nvme::RamDevice;

const C: CollId = CollId(9);
const OBJ: usize = 128 << 10;

#[test]
fn overwriting_five_times_the_device_size_at_two_thirds_full_never_runs_out_of_space() {
    let size = 32u64 << 20;
    let mut dev = RamDevice::new(size, 64);
    mkfs(&mut dev, &MkfsOptions::default()).unwrap();
    let mut s = Shard::open(dev, 0, StoreConfig::default()).unwrap();
    let (_, capacity_blocks, _, _) = s.space_usage();
    let capacity = capacity_blocks * 4096;
    let objects = (capacity * 67 / 100) as usize / OBJ;
    run_txn(&mut s, Transaction { ops: vec![TxOp::CreateCollection { coll: C }] }).unwrap();
    let mut content: Vec<Vec<u8>> = Vec::with_capacity(objects);
    for i in 0..objects {
        let data = vec![(i % 251) as u8; OBJ];
        run_txn(
            &mut s,
            Transaction {
                ops: vec![TxOp::WriteFull { coll: C, name: format!("o{i}"), data: data.clone() }],
            },
        )
        .unwrap();
        content.push(data);
    }
    let (live, _, _, _) = s.space_usage();
    let live_share = live as f64 / capacity_blocks as f64;
    assert!((0.6..0.7).contains(&live_share), "live share {live_share}");

    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut written = 0u64;
    let mut inflight = 0;
    let mut version = 0u8;
    let mut token = 0u64;
    while written < 5 * size || inflight > 0 {
        while inflight < 8 && written < 5 * size {
            let i = rng.gen_range(0..objects);
            version = version.wrapping_add(1);
            let op = if rng.gen_bool(0.5) {
                content[i] = vec![version; OBJ];
                written += OBJ as u64;
                TxOp::WriteFull { coll: C, name: format!("o{i}"), data: content[i].clone() }
            } else {
                let off = rng.gen_range(0..OBJ / 4096) * 4096;
                let len = 4096 * rng.gen_range(1..=8).min((OBJ - off) / 4096);
                content[i][off..off + len].fill(version);
                written += len as u64;
                TxOp::Write {
                    coll: C,
                    name: format!("o{i}"),
                    offset: off as u64,
                    data: vec![version; len],
                }
            };
            s.submit(Transaction { ops: vec![op] }, token).unwrap();
            token += 1;
            inflight += 1;
        }
        s.poll(&mut |e| match e {
            StoreEvent::Txn { result, .. } => {
                result.unwrap_or_else(|e| panic!("write failed at {written} bytes written: {e}"));
                inflight -= 1;
            }
            StoreEvent::Query { .. } => unreachable!(),
        });
    }
    settle(&mut s);
    let stats = s.stats();
    assert!(stats.segments_cleaned > 0 && stats.blocks_relocated > 0, "{stats:?}");
    assert!(stats.bytes_written >= 5 * size, "{stats:?}");
    let (live_after, _, reusable, segs) = s.space_usage();
    assert!(reusable >= 2, "space was reclaimed: {reusable} of {segs} segments reusable");
    assert!(live_after <= capacity_blocks * 7 / 10);
    for (i, want) in content.iter().enumerate() {
        let Answer::Data(d) = run_query(
            &mut s,
            Query::Read { coll: C, name: format!("o{i}"), offset: 0, len: u64::MAX },
        )
        .unwrap() else {
            panic!()
        };
        assert!(d.data() == want.as_slice(), "object o{i} lost its last write");
    }
    let mut dev = s.into_device();
    let r = fsck(&mut dev, true);
    assert!(r.is_clean(), "{:?}", r.problems);
    eprintln!(
        "wrote {} MiB to a {} MiB store at {:.0}% live: {} segments cleaned, {} blocks relocated, {} checkpoints",
        stats.bytes_written >> 20,
        size >> 20,
        live_share * 100.0,
        stats.segments_cleaned,
        stats.blocks_relocated,
        stats.checkpoints
    );
}

#[test]
fn a_full_store_says_no_space_and_deletes_still_succeed() {
    let mut dev = RamDevice::new(16 << 20, 64);
    mkfs(&mut dev, &MkfsOptions::default()).unwrap();
    let mut s = Shard::open(dev, 0, StoreConfig::default()).unwrap();
    run_txn(&mut s, Transaction { ops: vec![TxOp::CreateCollection { coll: C }] }).unwrap();
    let mut n = 0;
    let err = loop {
        match run_txn(
            &mut s,
            Transaction {
                ops: vec![TxOp::WriteFull {
                    coll: C,
                    name: format!("f{n}"),
                    data: vec![n as u8; 64 << 10],
                }],
            },
        ) {
            Ok(_) => n += 1,
            Err(e) => break e,
        }
        assert!(n < 1000, "a 16 MiB store accepted more than 64 MiB of live data");
    };
    assert_eq!(err, sluice_dataplane::store::StoreError::NoSpace);
    let (live, cap, _, _) = s.space_usage();
    assert!(live as f64 / cap as f64 > 0.7, "no space came too early: {live} of {cap} blocks live");
    // Deletes go through even now, and free room for writes again.
    for i in 0..n / 2 {
        run_txn(&mut s, Transaction { ops: vec![TxOp::Delete { coll: C, name: format!("f{i}") }] })
            .unwrap();
    }
    run_txn(
        &mut s,
        Transaction {
            ops: vec![TxOp::WriteFull { coll: C, name: "again".into(), data: vec![1; 64 << 10] }],
        },
    )
    .unwrap();
    for i in n / 2..n {
        let Answer::Data(d) = run_query(
            &mut s,
            Query::Read { coll: C, name: format!("f{i}"), offset: 0, len: u64::MAX },
        )
        .unwrap() else {
            panic!()
        };
        assert!(d.data().iter().all(|&b| b == i as u8));
    }
}

/// A store filled with small objects (a large index, so a large checkpoint) until it says
/// "no space" must not retry a checkpoint that cannot fit on every poll: that spun a
/// reactor and flooded the log. Attempts stay bounded while nothing changes, and once
/// deletes free room, checkpoints and writes work again.
#[test]
fn a_store_full_of_small_objects_does_not_retry_checkpoints_in_a_loop() {
    let mut dev = RamDevice::new(16 << 20, 64);
    mkfs(&mut dev, &MkfsOptions::default()).unwrap();
    let mut s = Shard::open(dev, 0, StoreConfig::default()).unwrap();
    run_txn(&mut s, Transaction { ops: vec![TxOp::CreateCollection { coll: C }] }).unwrap();
    let mut n = 0;
    loop {
        let name = format!("small-object-with-a-longish-name-{n:08}");
        match run_txn(
            &mut s,
            Transaction { ops: vec![TxOp::WriteFull { coll: C, name, data: vec![n as u8; 4096] }] },
        ) {
            Ok(_) => n += 1,
            Err(e) => {
                assert_eq!(e, sluice_dataplane::store::StoreError::NoSpace);
                break;
            }
        }
        assert!(n < 10_000, "a 16 MiB store accepted more than 40 MiB of live data");
    }
    let before = s.stats();
    let mut busy_polls = 0;
    for _ in 0..200_000 {
        if s.poll(&mut |_| {}) {
            busy_polls += 1;
        }
    }
    let after = s.stats();
    eprintln!(
        "{n} objects; checkpoints {} -> {}, failures {} -> {}, busy polls {busy_polls}",
        before.checkpoints,
        after.checkpoints,
        before.checkpoint_failures,
        after.checkpoint_failures
    );
    assert!(
        after.checkpoint_failures - before.checkpoint_failures <= 2,
        "an idle full store kept retrying checkpoints"
    );
    assert!(busy_polls < 10_000, "an idle full store stayed busy: {busy_polls} busy polls");
}

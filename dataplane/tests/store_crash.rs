//! Deterministic crash testing of the store.
//!
//! Fault model: `FaultyDevice` over a RAM device. A seeded workload of random
//! transactions runs until a power cut at a random command; unflushed writes are dropped,
//! kept or torn (per block) by a seeded policy. Some seeds cut the power again while the
//! store recovers. Then the store is opened and must hold exactly the state after some
//! prefix of the submitted transactions that includes every acknowledged one, read back
//! through the store's own read path, and `fsck --deep` must be clean.
//!
//! `SLUICE_CRASH_SEEDS=N` runs N seeds (default 2000); `SLUICE_CRASH_SEED=S` runs one.
//! A failing seed prints itself.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sluice_dataplane::store::blocking::run_query;
use sluice_dataplane::store::{
    Answer, CollId, MkfsOptions, MountOptions, Query, Shard, StoreConfig, StoreError, StoreEvent,
    Transaction, TxOp, fsck, mkfs,
};
use sluice_nvme::{CutPolicy, FaultyDevice, RamDevice};
use sluice_vocab::{ManualClock, MonoTime};

type Dev = FaultyDevice<RamDevice>;

/// What the seeds exercised, summed; the test insists each mechanism was hit.
#[derive(Debug, Default)]
struct Coverage {
    checkpoints: AtomicU64,
    segments_cleaned: AtomicU64,
    torn_tails: AtomicU64,
    cuts_in_recovery: AtomicU64,
    replayed_records: AtomicU64,
    acked: AtomicU64,
}

static COVERAGE: Coverage = Coverage {
    checkpoints: AtomicU64::new(0),
    segments_cleaned: AtomicU64::new(0),
    torn_tails: AtomicU64::new(0),
    cuts_in_recovery: AtomicU64::new(0),
    replayed_records: AtomicU64::new(0),
    acked: AtomicU64::new(0),
};

fn count(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct MObj {
    data: Vec<u8>,
    xattrs: BTreeMap<String, Vec<u8>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct MColl {
    objects: BTreeMap<String, MObj>,
    pglog: BTreeMap<u64, Vec<u8>>,
}

/// What the store should hold: the same semantics, written the simple way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Model {
    colls: BTreeMap<u64, MColl>,
}

impl Model {
    /// Applies a transaction all or nothing; returns whether it succeeded.
    fn apply(&mut self, ops: &[TxOp]) -> bool {
        let mut m = self.clone();
        for op in ops {
            if !m.op(op) {
                return false;
            }
        }
        *self = m;
        true
    }

    fn op(&mut self, op: &TxOp) -> bool {
        let obj = |m: &mut Model, c: CollId, n: &str, create: bool| -> Option<*mut MObj> {
            let coll = m.colls.get_mut(&c.0)?;
            if create {
                Some(coll.objects.entry(n.to_string()).or_default() as *mut MObj)
            } else {
                coll.objects.get_mut(n).map(|o| o as *mut MObj)
            }
        };
        // SAFETY: each arm uses the pointer while holding no other reference into `self`.
        unsafe {
            match op {
                TxOp::CreateCollection { coll } => {
                    self.colls.insert(coll.0, MColl::default()).is_none()
                }
                TxOp::RemoveCollection { coll } => match self.colls.get(&coll.0) {
                    Some(c) if c.objects.is_empty() => {
                        self.colls.remove(&coll.0);
                        true
                    }
                    _ => false,
                },
                TxOp::Touch { coll, name } => obj(self, *coll, name, true).is_some(),
                TxOp::WriteFull { coll, name, data } => match obj(self, *coll, name, true) {
                    Some(o) => {
                        (*o).data = data.clone();
                        true
                    }
                    None => false,
                },
                TxOp::Write { coll, name, offset, data } => match obj(self, *coll, name, true) {
                    Some(o) => {
                        let o = &mut *o;
                        if !data.is_empty() {
                            let end = *offset as usize + data.len();
                            if o.data.len() < end {
                                o.data.resize(end, 0);
                            }
                            o.data[*offset as usize..end].copy_from_slice(data);
                        }
                        true
                    }
                    None => false,
                },
                TxOp::Truncate { coll, name, size } => match obj(self, *coll, name, true) {
                    Some(o) => {
                        (*o).data.resize(*size as usize, 0);
                        true
                    }
                    None => false,
                },
                TxOp::Zero { coll, name, offset, len } => match obj(self, *coll, name, true) {
                    Some(o) => {
                        let o = &mut *o;
                        let end = (*offset + *len).min(o.data.len() as u64) as usize;
                        if (*offset as usize) < end {
                            o.data[*offset as usize..end].fill(0);
                        }
                        true
                    }
                    None => false,
                },
                TxOp::Delete { coll, name } => {
                    self.colls.get_mut(&coll.0).is_some_and(|c| c.objects.remove(name).is_some())
                }
                TxOp::SetXattr { coll, name, key, value } => match obj(self, *coll, name, true) {
                    Some(o) => {
                        (*o).xattrs.insert(key.clone(), value.clone());
                        true
                    }
                    None => false,
                },
                TxOp::RmXattr { coll, name, key } => match obj(self, *coll, name, false) {
                    Some(o) => (*o).xattrs.remove(key).is_some(),
                    None => false,
                },
                TxOp::PgLogAppend { coll, key, entry } => match self.colls.get_mut(&coll.0) {
                    Some(c) => {
                        c.pglog.insert(*key, entry.clone());
                        true
                    }
                    None => false,
                },
                TxOp::PgLogTrim { coll, upto } => match self.colls.get_mut(&coll.0) {
                    Some(c) => {
                        c.pglog = c.pglog.split_off(&(upto + 1));
                        true
                    }
                    None => false,
                },
            }
        }
    }
}

fn random_op(rng: &mut ChaCha8Rng, pglog_key: &mut u64) -> TxOp {
    let coll = CollId(rng.gen_range(1..=2));
    let name = format!("o{}", rng.gen_range(0..6));
    let data = |rng: &mut ChaCha8Rng, max: usize| {
        let n = rng.gen_range(0..max);
        let b: u8 = rng.r#gen();
        (0..n).map(|i| b.wrapping_add(i as u8)).collect::<Vec<u8>>()
    };
    match rng.gen_range(0..100) {
        0..=3 => TxOp::CreateCollection { coll },
        4 => TxOp::RemoveCollection { coll },
        5..=24 => TxOp::WriteFull { coll, name, data: data(rng, 12_000) },
        25..=49 => {
            let offset = rng.gen_range(0..16_000);
            let mut d = data(rng, 9_000);
            if d.is_empty() {
                d.push(7);
            }
            TxOp::Write { coll, name, offset, data: d }
        }
        50..=56 => TxOp::Truncate { coll, name, size: rng.gen_range(0..16_000) },
        57..=62 => TxOp::Zero {
            coll,
            name,
            offset: rng.gen_range(0..12_000),
            len: rng.gen_range(0..9_000),
        },
        63..=70 => TxOp::Delete { coll, name },
        71..=78 => TxOp::SetXattr {
            coll,
            name,
            key: format!("k{}", rng.gen_range(0..3)),
            value: data(rng, 100),
        },
        79..=82 => TxOp::RmXattr { coll, name, key: format!("k{}", rng.gen_range(0..3)) },
        83..=85 => TxOp::Touch { coll, name },
        86..=95 => {
            *pglog_key += 1;
            TxOp::PgLogAppend { coll, key: *pglog_key, entry: data(rng, 200) }
        }
        _ => TxOp::PgLogTrim { coll, upto: pglog_key.saturating_sub(rng.gen_range(0..5)) },
    }
}

fn config() -> StoreConfig {
    StoreConfig {
        checkpoint_interval_bytes: 96 << 10,
        max_batch_bytes: 64 << 10,
        reserve_segments: 2,
        clean_below_segments: None,
        cleaner_max_reads: 4,
        read_pool_bufs: 8,
        max_completions_per_poll: 2,
        // Tiny slices: checkpoint walks span many polls, with transactions in between.
        checkpoint_walk_slice: 3,
        mount: MountOptions { retries: 0, ..Default::default() },
    }
}

fn policy(rng: &mut ChaCha8Rng, seed: u64) -> CutPolicy {
    match rng.gen_range(0..4) {
        0 => CutPolicy::DropAll,
        1 => CutPolicy::KeepAll,
        _ => CutPolicy::Random { seed, keep_percent: 40, tear_percent: 40 },
    }
}

/// Reads everything the store holds into a model.
fn snapshot(s: &mut Shard<Dev>) -> Model {
    let mut m = Model::default();
    let Answer::Collections(colls) =
        run_query(s, Query::ListCollections).expect("list collections")
    else {
        panic!()
    };
    for c in colls {
        let mut mc = MColl::default();
        let Answer::List { names, next } =
            run_query(s, Query::List { coll: c, after: None, max: 1000 }).expect("list")
        else {
            panic!()
        };
        assert!(next.is_none());
        for n in names {
            let Answer::Data(d) =
                run_query(s, Query::Read { coll: c, name: n.clone(), offset: 0, len: u64::MAX })
                    .unwrap_or_else(|e| panic!("read {n}: {e}"))
            else {
                panic!()
            };
            let Answer::Xattrs(x) =
                run_query(s, Query::GetXattrs { coll: c, name: n.clone() }).expect("xattrs")
            else {
                panic!()
            };
            mc.objects.insert(n, MObj { data: d.data().to_vec(), xattrs: x });
        }
        let Answer::PgLog(entries) =
            run_query(s, Query::PgLog { coll: c, after: None, max: usize::MAX }).expect("pglog")
        else {
            panic!()
        };
        mc.pglog = entries.into_iter().collect();
        m.colls.insert(c.0, mc);
    }
    m
}

fn open_after_crash(dev: Dev, rng: &mut ChaCha8Rng, seed: u64) -> Shard<Dev> {
    let h = dev.handle();
    h.power_on();
    // Sometimes the power goes again during recovery.
    let dev = if rng.gen_range(0..4) == 0 {
        let n = rng.gen_range(0..40);
        h.schedule_cut(n, policy(rng, seed ^ 0xdead));
        let r = Shard::open(dev, 0, config());
        h.cancel_cut();
        if h.is_powered_off() {
            count(&COVERAGE.cuts_in_recovery, 1);
        }
        match r {
            Ok(s) if !h.is_powered_off() => return s,
            Ok(s) => s.into_device(),
            Err(f) => {
                assert!(
                    h.is_powered_off(),
                    "seed {seed}: mount failed without a power cut: {}",
                    f.error
                );
                f.device
            }
        }
    } else {
        dev
    };
    h.power_on();
    Shard::open(dev, 0, config())
        .unwrap_or_else(|f| panic!("seed {seed}: recovery failed: {}", f.error))
}

fn run_seed(seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let clock = ManualClock::new(MonoTime(0));
    let mut dev = FaultyDevice::new(RamDevice::new(1 << 20, 16), Arc::new(clock));
    let mut fsid = [0u8; 16];
    fsid[..8].copy_from_slice(&seed.to_le_bytes());
    fsid[8] = 1;
    mkfs(
        &mut dev,
        &MkfsOptions { shards: 1, segment_bytes: Some(64 << 10), force: false, fsid: Some(fsid) },
    )
    .unwrap();
    let h = dev.handle();
    let mut s = Shard::open(dev, 0, config()).unwrap();
    let cut_at = rng.gen_range(0..1500);
    let cut_policy = policy(&mut rng, seed);
    h.schedule_cut(cut_at, cut_policy);
    let qd = rng.gen_range(1..=8);
    let total = rng.gen_range(1..400);
    let mut submitted: Vec<Vec<TxOp>> = Vec::new();
    let mut results: Vec<Option<Result<u64, StoreError>>> = Vec::new();
    let mut model = Model::default();
    let mut pglog_key = 0;
    let mut outstanding = 0;
    let mut idle = 0;
    while !h.is_powered_off() && (submitted.len() < total || outstanding > 0) {
        while outstanding < qd && submitted.len() < total {
            let n = rng.gen_range(1..=3);
            let ops: Vec<TxOp> = (0..n).map(|_| random_op(&mut rng, &mut pglog_key)).collect();
            let token = submitted.len() as u64;
            match s.submit(Transaction { ops: ops.clone() }, token) {
                Ok(()) => {}
                // Too big for these tiny segments: refused up front, never queued.
                Err(StoreError::Invalid(_)) => continue,
                Err(e) => panic!("seed {seed}: submit refused: {e}"),
            }
            submitted.push(ops);
            results.push(None);
            outstanding += 1;
        }
        let mut evs = Vec::new();
        if !s.poll(&mut |e| evs.push(e)) {
            idle += 1;
            assert!(idle < 1_000_000, "seed {seed}: store stopped making progress");
        }
        for e in evs {
            let StoreEvent::Txn { token, result } = e else { panic!("no queries were made") };
            results[token as usize] = Some(result);
            outstanding -= 1;
        }
    }
    h.cancel_cut();
    if !h.is_powered_off() {
        s.device_mut().power_cut(cut_policy);
    }
    count(&COVERAGE.checkpoints, s.stats().checkpoints);
    count(&COVERAGE.segments_cleaned, s.stats().segments_cleaned);
    // Results arrive in submission order for successes; check the model agrees on which
    // transactions were valid, and find the last acknowledged one.
    let mut last_acked = None;
    let mut check = Model::default();
    for (i, ops) in submitted.iter().enumerate() {
        let ok = check.apply(ops);
        match &results[i] {
            Some(Ok(_)) => {
                assert!(
                    ok,
                    "seed {seed}: txn {i} succeeded in the store but the model rejects it: {ops:?}"
                );
                last_acked = Some(i);
            }
            Some(Err(StoreError::Failed(_))) | None => {}
            Some(Err(e)) => assert!(
                !ok,
                "seed {seed}: txn {i} failed with {e} but the model accepts it: {ops:?}"
            ),
        }
    }
    let dev = s.into_device();
    let mut s = open_after_crash(dev, &mut rng, seed);
    count(&COVERAGE.torn_tails, u64::from(s.replay_info().torn_tail.is_some()));
    count(&COVERAGE.replayed_records, s.replay_info().records);
    count(&COVERAGE.acked, last_acked.map_or(0, |i| i as u64 + 1));
    let got = snapshot(&mut s);
    let first = last_acked.map_or(0, |i| i + 1);
    for ops in &submitted[..first] {
        model.apply(ops);
    }
    let mut matched = got == model;
    for ops in &submitted[first..] {
        if matched {
            break;
        }
        model.apply(ops);
        matched = got == model;
    }
    assert!(
        matched,
        "seed {seed}: recovered state is not any prefix of the submitted transactions that includes all {first} acknowledged ones\nrecovered: {got:?}"
    );
    let mut dev = s.into_device();
    let report = fsck(&mut dev, true);
    assert!(report.is_clean(), "seed {seed}: fsck after recovery: {:?}", report.problems);
}

#[test]
fn crash_at_any_point_loses_no_acknowledged_transaction() {
    if let Ok(one) = std::env::var("SLUICE_CRASH_SEED") {
        run_seed(one.parse().expect("SLUICE_CRASH_SEED is a number"));
        return;
    }
    let n: u64 =
        std::env::var("SLUICE_CRASH_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    for seed in 0..n {
        let r = std::panic::catch_unwind(|| run_seed(seed));
        if r.is_err() {
            panic!(
                "crash test failed for seed {seed}; rerun it alone with SLUICE_CRASH_SEED={seed}"
            );
        }
    }
    let c = &COVERAGE;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    eprintln!(
        "{n} seeds: {} acknowledged txns, {} checkpoints, {} segments cleaned, {} torn tails cut off, \
         {} records replayed, {} power cuts during recovery",
        get(&c.acked),
        get(&c.checkpoints),
        get(&c.segments_cleaned),
        get(&c.torn_tails),
        get(&c.replayed_records),
        get(&c.cuts_in_recovery)
    );
    if n >= 200 {
        for (what, v) in [
            ("checkpoints", get(&c.checkpoints)),
            ("segments cleaned", get(&c.segments_cleaned)),
            ("torn tails", get(&c.torn_tails)),
            ("replayed records", get(&c.replayed_records)),
            ("cuts during recovery", get(&c.cuts_in_recovery)),
        ] {
            assert!(v > 0, "the seeds never exercised {what}: the workload needs adjusting");
        }
    }
}

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sluice_vocab::limits::BLOCK_SIZE_BYTES;
use sluice_vocab::{BlockCount, Lba, ManualClock, MonoTime, SystemClock};

use super::*;
use crate::conformance::pattern;
use crate::device::{flush_sync, read_sync, run_sync, write_sync};
use crate::ram::RamDevice;

const BS: usize = BLOCK_SIZE_BYTES;

fn dev() -> FaultyDevice<RamDevice> {
    FaultyDevice::new(RamDevice::new(4 << 20, 16), Arc::new(SystemClock))
}

fn blocks(lba: u64, n: u64, version: u64) -> Vec<u8> {
    let mut v = vec![0u8; n as usize * BS];
    for i in 0..n as usize {
        pattern(lba + i as u64, version, &mut v[i * BS..(i + 1) * BS]);
    }
    v
}

fn medium(dev: &FaultyDevice<RamDevice>, lba: u64, n: u64) -> Vec<u8> {
    let mut v = vec![0u8; n as usize * BS];
    dev.inner().media().read(Lba(lba), &mut v);
    v
}

#[test]
fn flushed_writes_survive_and_unflushed_ones_are_dropped() {
    let mut d = dev();
    write_sync(&mut d, Lba(0), &blocks(0, 4, 1), false).unwrap();
    flush_sync(&mut d).unwrap();
    write_sync(&mut d, Lba(4), &blocks(4, 4, 2), false).unwrap();
    write_sync(&mut d, Lba(2), &blocks(2, 2, 3), false).unwrap();
    // Before the cut, reads see the newest data.
    assert_eq!(read_sync(&mut d, Lba(2), BlockCount(2)).unwrap().to_vec(), blocks(2, 2, 3));
    let report = d.power_cut(CutPolicy::DropAll);
    assert_eq!(report.writes.len(), 2);
    assert!(report.writes.iter().all(|w| w.fate == Fate::Dropped));
    assert_eq!(
        medium(&d, 0, 4),
        blocks(0, 4, 1),
        "flushed write must survive, later overwrite must not"
    );
    assert!(medium(&d, 4, 4).iter().all(|&b| b == 0), "unflushed write must be gone");
}

#[test]
fn keep_all_keeps_every_completed_write() {
    let mut d = dev();
    write_sync(&mut d, Lba(10), &blocks(10, 2, 1), false).unwrap();
    write_sync(&mut d, Lba(11), &blocks(11, 2, 2), false).unwrap();
    let report = d.power_cut(CutPolicy::KeepAll);
    assert!(report.writes.iter().all(|w| w.fate == Fate::Kept));
    assert_eq!(medium(&d, 10, 1), blocks(10, 1, 1));
    assert_eq!(medium(&d, 11, 2), blocks(11, 2, 2), "overlapping survivors apply in order");
}

#[test]
fn a_flush_covers_only_writes_completed_before_it() {
    let mut d = dev();
    write_sync(&mut d, Lba(0), &blocks(0, 1, 1), false).unwrap();
    d.submit(IoCommand::Flush, None, 1).unwrap();
    // Write submitted after the flush: not covered by it.
    d.submit(
        IoCommand::Write { lba: Lba(1), blocks: BlockCount(1), fua: false },
        Some(DmaBuf::from_slice(&blocks(1, 1, 1))),
        2,
    )
    .unwrap();
    d.kick().unwrap();
    let mut done = Vec::new();
    while done.len() < 2 {
        d.poll(8, &mut |c| done.push(c.tag));
    }
    let report = d.power_cut(CutPolicy::DropAll);
    assert_eq!(report.writes.len(), 1);
    assert_eq!(report.writes[0].tag, 2);
    assert_eq!(medium(&d, 0, 1), blocks(0, 1, 1));
    assert!(medium(&d, 1, 1).iter().all(|&b| b == 0));
}

#[test]
fn a_flush_does_not_cover_writes_whose_completion_was_not_yet_delivered() {
    let mut d = dev();
    d.submit(
        IoCommand::Write { lba: Lba(7), blocks: BlockCount(1), fua: false },
        Some(DmaBuf::from_slice(&blocks(7, 1, 1))),
        1,
    )
    .unwrap();
    d.kick().unwrap();
    // The write has executed, but its completion is still in the device: not "completed"
    // for the contract, so a flush submitted now does not cover it.
    d.submit(IoCommand::Flush, None, 2).unwrap();
    d.kick().unwrap();
    let mut done = Vec::new();
    while done.len() < 2 {
        d.poll(8, &mut |c| done.push(c.tag));
    }
    let report = d.power_cut(CutPolicy::DropAll);
    assert_eq!(report.writes.len(), 1, "{report:?}");
    assert_eq!(report.writes[0].fate, Fate::Dropped);
    assert!(medium(&d, 7, 1).iter().all(|&b| b == 0));
}

#[test]
fn fua_write_is_durable_on_completion_and_supersedes_older_cached_data() {
    let mut d = dev();
    write_sync(&mut d, Lba(5), &blocks(5, 2, 1), false).unwrap();
    write_sync(&mut d, Lba(6), &blocks(6, 1, 2), true).unwrap();
    assert_eq!(
        read_sync(&mut d, Lba(5), BlockCount(2)).unwrap().to_vec(),
        [blocks(5, 1, 1), blocks(6, 1, 2)].concat()
    );
    let report = d.power_cut(CutPolicy::KeepAll);
    assert_eq!(report.writes.len(), 1, "the FUA write is durable, only the first is not");
    assert_eq!(medium(&d, 5, 1), blocks(5, 1, 1));
    assert_eq!(
        medium(&d, 6, 1),
        blocks(6, 1, 2),
        "older cached copy must not land over the FUA data"
    );
}

#[test]
fn torn_writes_keep_a_proper_subset_of_blocks() {
    let mut d = dev();
    for i in 0..20u64 {
        write_sync(&mut d, Lba(i * 8), &blocks(i * 8, 8, 7), false).unwrap();
    }
    let report = d.power_cut(CutPolicy::Random { seed: 42, keep_percent: 0, tear_percent: 100 });
    for w in &report.writes {
        let Fate::Torn { kept } = &w.fate else { panic!("expected a tear: {w:?}") };
        assert!(kept.iter().any(|&k| k) && kept.iter().any(|&k| !k), "a tear is a proper subset");
        for (i, &k) in kept.iter().enumerate() {
            let b = w.lba.0 + i as u64;
            let got = medium(&d, b, 1);
            if k {
                assert_eq!(got, blocks(b, 1, 7));
            } else {
                assert!(got.iter().all(|&x| x == 0));
            }
        }
    }
}

#[test]
fn device_is_gone_after_a_cut_until_power_on() {
    let mut d = dev();
    let h = d.handle();
    write_sync(&mut d, Lba(0), &blocks(0, 1, 1), false).unwrap();
    d.power_cut(CutPolicy::DropAll);
    let err = d.submit(IoCommand::Flush, None, 1).unwrap_err();
    assert_eq!(err.reason, RejectReason::DeviceGone);
    assert!(h.is_powered_off());
    h.power_on();
    assert!(read_sync(&mut d, Lba(0), BlockCount(1)).unwrap().iter().all(|&b| b == 0));
    write_sync(&mut d, Lba(0), &blocks(0, 1, 2), false).unwrap();
    flush_sync(&mut d).unwrap();
    assert_eq!(medium(&d, 0, 1), blocks(0, 1, 2));
}

#[test]
fn scheduled_cut_fires_at_the_chosen_command() {
    let mut d = dev();
    let h = d.handle();
    h.schedule_cut(3, CutPolicy::DropAll);
    write_sync(&mut d, Lba(0), &blocks(0, 1, 1), false).unwrap();
    flush_sync(&mut d).unwrap();
    write_sync(&mut d, Lba(1), &blocks(1, 1, 1), false).unwrap();
    let (r, buf) = run_sync(
        &mut d,
        IoCommand::Write { lba: Lba(2), blocks: BlockCount(1), fua: false },
        Some(DmaBuf::new(BS)),
    );
    assert_eq!(r, Err(IoError::DeviceGone));
    assert!(buf.is_some(), "rejected buffer comes back");
    let report = h.take_cut_report().expect("a cut happened");
    assert_eq!(report.writes.len(), 1);
    assert_eq!(medium(&d, 0, 1), blocks(0, 1, 1));
    assert!(medium(&d, 1, 1).iter().all(|&b| b == 0));
}

#[test]
fn error_rules_by_range_and_call_count() {
    let mut d = dev();
    let h = d.handle();
    write_sync(&mut d, Lba(100), &blocks(100, 4, 1), false).unwrap();
    h.add_rule(
        FaultRule::new(OpSet::READS, IoError::Media { lba: Lba(0) })
            .in_range(Lba(102), BlockCount(1))
            .times(2),
    );
    // Reads not touching the range pass.
    assert!(read_sync(&mut d, Lba(100), BlockCount(2)).is_ok());
    // Two failures naming the failing block, then success.
    assert_eq!(
        read_sync(&mut d, Lba(101), BlockCount(3)).unwrap_err(),
        IoError::Media { lba: Lba(102) }
    );
    assert_eq!(
        read_sync(&mut d, Lba(102), BlockCount(1)).unwrap_err(),
        IoError::Media { lba: Lba(102) }
    );
    assert_eq!(read_sync(&mut d, Lba(102), BlockCount(1)).unwrap().to_vec(), blocks(102, 1, 1));
    assert_eq!(h.rule_hits(), vec![2]);
    h.clear_rules();
    // Call count: the first two writes pass, the third fails, forever.
    h.add_rule(FaultRule::new(OpSet::WRITES, IoError::NoSpace { lba: Lba(0) }).after(2));
    write_sync(&mut d, Lba(0), &blocks(0, 1, 1), false).unwrap();
    write_sync(&mut d, Lba(1), &blocks(1, 1, 1), false).unwrap();
    for _ in 0..3 {
        assert_eq!(
            write_sync(&mut d, Lba(2), &blocks(2, 1, 1), false),
            Err(IoError::NoSpace { lba: Lba(0) })
        );
    }
    // A failed write has no effect.
    assert!(read_sync(&mut d, Lba(2), BlockCount(1)).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn a_failed_flush_makes_nothing_durable() {
    let mut d = dev();
    let h = d.handle();
    write_sync(&mut d, Lba(0), &blocks(0, 1, 1), false).unwrap();
    h.add_rule(FaultRule::new(OpSet::FLUSHES, IoError::Media { lba: Lba(0) }).times(1));
    assert!(flush_sync(&mut d).is_err());
    let report = d.power_cut(CutPolicy::DropAll);
    assert_eq!(report.writes.len(), 1);
    assert!(medium(&d, 0, 1).iter().all(|&b| b == 0));
}

#[test]
fn latency_holds_completions_on_the_injected_clock() {
    let clock = ManualClock::new(MonoTime(1_000));
    let mut d = FaultyDevice::new(RamDevice::new(1 << 20, 4), Arc::new(clock.clone()));
    d.handle().set_latency(Duration::from_micros(50));
    d.submit(IoCommand::Read { lba: Lba(0), blocks: BlockCount(1) }, Some(DmaBuf::new(BS)), 7)
        .unwrap();
    d.kick().unwrap();
    let mut got = 0;
    d.poll(8, &mut |_| got += 1);
    assert_eq!(got, 0);
    clock.advance(Duration::from_micros(49));
    d.poll(8, &mut |_| got += 1);
    assert_eq!(got, 0);
    clock.advance(Duration::from_micros(1));
    d.poll(8, &mut |_| got += 1);
    assert_eq!(got, 1);
}

/// The precise check: random workloads, a cut at a random step, then every block of the
/// medium must be what the report and the durability contract say, and nothing else.
#[test]
fn cut_report_describes_the_medium_exactly() {
    for seed in 0..300u64 {
        check_seed(seed);
    }
}

#[derive(Debug, Clone)]
struct W {
    lba: u64,
    n: u64,
    version: Option<u64>, // None = zeroes
}

fn check_seed(seed: u64) {
    const SPAN: u64 = 64;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut d = FaultyDevice::new(RamDevice::new(1 << 20, 8), Arc::new(SystemClock));
    let mut writes: Vec<W> = Vec::new(); // by tag
    let mut completed: Vec<bool> = Vec::new();
    // Contract: writes completed before a flush was submitted are durable once it completes.
    let mut durable_by_contract: Vec<bool> = Vec::new();
    let mut flush_covers: HashMap<u64, Vec<usize>> = HashMap::new();
    let mut tag_to_index: HashMap<u64, usize> = HashMap::new();
    let mut index_to_tag: Vec<u64> = Vec::new();
    let steps = rng.gen_range(1..60);
    let mut tag = 0u64;
    for _ in 0..steps {
        let burst = rng.gen_range(1..4);
        for _ in 0..burst {
            if d.in_flight() >= 8 {
                break;
            }
            let roll = rng.gen_range(0..100);
            tag += 1;
            if roll < 70 {
                let n = rng.gen_range(1..6);
                let lba = rng.gen_range(0..SPAN - n);
                let fua = roll < 10;
                let (cmd, buf, version) = if roll < 60 {
                    let cmd = IoCommand::Write { lba: Lba(lba), blocks: BlockCount(n), fua };
                    (cmd, Some(DmaBuf::from_slice(&blocks(lba, n, tag))), Some(tag))
                } else {
                    (IoCommand::WriteZeroes { lba: Lba(lba), blocks: BlockCount(n) }, None, None)
                };
                d.submit(cmd, buf, tag).unwrap();
                let idx = writes.len();
                writes.push(W { lba, n, version });
                completed.push(false);
                durable_by_contract.push(false);
                tag_to_index.insert(tag, idx);
                index_to_tag.push(tag);
                if fua {
                    flush_covers.insert(tag, vec![idx]);
                }
            } else {
                let covered =
                    completed.iter().enumerate().filter(|(_, c)| **c).map(|(i, _)| i).collect();
                flush_covers.insert(tag, covered);
                d.submit(IoCommand::Flush, None, tag).unwrap();
            }
        }
        d.kick().unwrap();
        // Sometimes leave completions unreaped, so later flushes are submitted while
        // executed writes are not yet delivered (a flush must not cover those).
        if rng.gen_range(0..3) == 0 && d.in_flight() < 8 {
            continue;
        }
        let mut done = Vec::new();
        d.poll(usize::MAX, &mut |c| done.push((c.tag, c.result)));
        for (t, r) in done {
            r.unwrap();
            if let Some(&idx) = tag_to_index.get(&t) {
                completed[idx] = true;
            }
            for &i in flush_covers.get(&t).map(|v| v.as_slice()).unwrap_or(&[]) {
                durable_by_contract[i] = true;
            }
        }
    }
    let policy = match rng.gen_range(0..3) {
        0 => CutPolicy::DropAll,
        1 => CutPolicy::KeepAll,
        _ => CutPolicy::Random { seed, keep_percent: 40, tear_percent: 30 },
    };
    let report = d.power_cut(policy);
    // Index the report by tag.
    let mut fate_of: HashMap<u64, &Fate> = HashMap::new();
    for w in &report.writes {
        fate_of.insert(w.tag, &w.fate);
    }
    for (i, durable) in durable_by_contract.iter().enumerate() {
        if *durable {
            assert!(
                !fate_of.contains_key(&index_to_tag[i]),
                "seed {seed}: durable write {i} in cut report"
            );
        }
    }
    if policy == CutPolicy::DropAll {
        for w in &report.writes {
            assert!(
                matches!(w.fate, Fate::Dropped | Fate::Landed),
                "seed {seed}: DropAll kept {w:?}"
            );
        }
    }
    for b in 0..SPAN {
        // Newest write covering b that is durable (not in the report) or survived.
        let mut expect: Option<Option<u64>> = None;
        for (i, w) in writes.iter().enumerate().rev() {
            if b < w.lba || b >= w.lba + w.n {
                continue;
            }
            let survived = match fate_of.get(&index_to_tag[i]) {
                None => true,
                Some(Fate::Dropped) => false,
                Some(Fate::Kept) | Some(Fate::Landed) => true,
                Some(Fate::Torn { kept }) => kept[(b - w.lba) as usize],
            };
            if survived {
                expect = Some(w.version);
                break;
            }
        }
        let got = medium(&d, b, 1);
        match expect.flatten() {
            Some(v) => {
                assert_eq!(got, blocks(b, 1, v), "seed {seed}: block {b} should hold version {v}")
            }
            None => assert!(got.iter().all(|&x| x == 0), "seed {seed}: block {b} should be zeroes"),
        }
    }
}

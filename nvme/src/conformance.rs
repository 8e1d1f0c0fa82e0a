//! The conformance suite every [`BlockDevice`] backend must pass.
//!
//! Each case takes a fresh device of at least [`MIN_DEVICE_BYTES`] and panics with a
//! message on failure. [`conformance_tests!`](crate::conformance_tests) turns the list
//! into `#[test]`s for one backend; [`CASES`] lets a non-test binary (the VFIO guest test)
//! run the same cases and print PASS/FAIL lines.

use std::collections::{HashMap, HashSet};
use std::os::fd::BorrowedFd;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sluice_vocab::limits::BLOCK_SIZE_BYTES;
use sluice_vocab::{BlockCount, Lba};

use crate::command::IoCommand;
use crate::device::{BlockDevice, Completion, flush_sync, read_sync, run_sync, write_sync};
use crate::dma::DmaBuf;
use crate::error::RejectReason;

/// Devices under test must be at least this big.
pub const MIN_DEVICE_BYTES: u64 = 16 << 20;

/// A case: name and body.
pub type Case = (&'static str, fn(&mut dyn BlockDevice));

/// Every case, in a stable order.
pub const CASES: &[Case] = &[
    ("info_is_sane", info_is_sane),
    ("write_then_read_returns_the_data", write_then_read_returns_the_data),
    ("tags_and_buffers_come_back_once", tags_and_buffers_come_back_once),
    ("full_queue_rejects_and_returns_the_buffer", full_queue_rejects_and_returns_the_buffer),
    ("malformed_commands_are_rejected", malformed_commands_are_rejected),
    ("write_zeroes_reads_back_zeroes", write_zeroes_reads_back_zeroes),
    ("trim_reads_back_old_data_or_zeroes", trim_reads_back_old_data_or_zeroes),
    ("fua_write_reads_back", fua_write_reads_back),
    ("flush_completes", flush_completes),
    ("poll_respects_max", poll_respects_max),
    ("random_workload_matches_a_model", random_workload_matches_a_model),
    ("parked_reactor_is_woken_by_a_completion", parked_reactor_is_woken_by_a_completion),
];

/// Expands to one `#[test]` per conformance case for the device built by `$make`.
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::conformance_tests!(@cases $make;
            info_is_sane,
            write_then_read_returns_the_data,
            tags_and_buffers_come_back_once,
            full_queue_rejects_and_returns_the_buffer,
            malformed_commands_are_rejected,
            write_zeroes_reads_back_zeroes,
            trim_reads_back_old_data_or_zeroes,
            fua_write_reads_back,
            flush_completes,
            poll_respects_max,
            random_workload_matches_a_model,
            parked_reactor_is_woken_by_a_completion);
    };
    (@cases $make:expr; $($case:ident),*) => {
        $(
            #[test]
            fn $case() {
                let mut dev = ($make)();
                $crate::conformance::$case(&mut dev);
            }
        )*
    };
}

/// Deterministic content for block `lba` at `version`: every 8 bytes hold
/// `(lba << 20 | version) ^ word index`, so a misplaced or stale block is recognisable.
pub fn pattern(lba: u64, version: u64, out: &mut [u8]) {
    assert_eq!(out.len(), BLOCK_SIZE_BYTES);
    let seed = (lba << 20) | (version & 0xfffff);
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&(seed ^ i as u64).to_le_bytes());
    }
}

fn pattern_buf(lba: u64, blocks: u64, version: u64) -> DmaBuf {
    let mut b = DmaBuf::new((blocks as usize) * BLOCK_SIZE_BYTES);
    for i in 0..blocks {
        let s = i as usize * BLOCK_SIZE_BYTES;
        pattern(lba + i, version, &mut b[s..s + BLOCK_SIZE_BYTES]);
    }
    b
}

fn assert_pattern(data: &[u8], lba: u64, version: u64, what: &str) {
    let mut want = vec![0u8; BLOCK_SIZE_BYTES];
    for (i, got) in data.chunks_exact(BLOCK_SIZE_BYTES).enumerate() {
        pattern(lba + i as u64, version, &mut want);
        assert!(
            got == want.as_slice(),
            "{what}: block {} does not hold version {version}",
            lba + i as u64
        );
    }
}

/// Spins until `n` completions were reaped, yielding now and then.
fn reap(dev: &mut dyn BlockDevice, n: usize) -> Vec<Completion> {
    let mut out = Vec::with_capacity(n);
    let mut spins = 0u64;
    while out.len() < n {
        dev.poll(n - out.len(), &mut |c| out.push(c));
        spins += 1;
        if spins.is_multiple_of(256) {
            std::thread::yield_now();
        }
        assert!(spins < 2_000_000_000, "device never completed {n} commands");
    }
    out
}

pub fn info_is_sane(dev: &mut dyn BlockDevice) {
    let info = dev.info().clone();
    assert_eq!(info.block_size, BLOCK_SIZE_BYTES);
    assert!(info.size_bytes() >= MIN_DEVICE_BYTES, "device under test too small: {info:?}");
    assert!(info.queue_depth >= 2);
    assert!(info.max_transfer_blocks >= 8);
    assert!(!info.name.is_empty());
    assert_eq!(dev.in_flight(), 0);
}

pub fn write_then_read_returns_the_data(dev: &mut dyn BlockDevice) {
    let n = dev.info().num_blocks;
    let max = dev.info().max_transfer_blocks.min(64);
    for (lba, blocks) in [(0, 1), (1, 2), (n / 2, max), (n - 1, 1), (n - max, max)] {
        let b = pattern_buf(lba, blocks, 3);
        let data = b.to_vec();
        write_sync(dev, Lba(lba), &data, false).expect("write");
        let got = read_sync(dev, Lba(lba), BlockCount(blocks)).expect("read");
        assert_pattern(&got, lba, 3, "read after write");
    }
}

pub fn tags_and_buffers_come_back_once(dev: &mut dyn BlockDevice) {
    let depth = dev.info().queue_depth.min(16);
    let mut want = HashMap::new();
    for i in 0..depth as u64 {
        let tag = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let buf = pattern_buf(i, 1, 1);
        want.insert(tag, buf.dma_addr());
        dev.submit(
            IoCommand::Write { lba: Lba(i), blocks: BlockCount(1), fua: false },
            Some(buf),
            tag,
        )
        .expect("submit");
    }
    dev.kick().expect("kick");
    for c in reap(dev, depth) {
        c.result.expect("write");
        let addr = want.remove(&c.tag).expect("unknown or duplicate tag");
        assert_eq!(
            c.buf.expect("buffer returned").dma_addr(),
            addr,
            "a different buffer came back"
        );
    }
    assert!(want.is_empty());
    let mut extra = Vec::new();
    dev.poll(usize::MAX, &mut |c| extra.push(c));
    assert!(extra.is_empty(), "completions delivered twice");
    assert_eq!(dev.in_flight(), 0);
}

pub fn full_queue_rejects_and_returns_the_buffer(dev: &mut dyn BlockDevice) {
    let depth = dev.info().queue_depth;
    for i in 0..depth as u64 {
        let buf = DmaBuf::new(BLOCK_SIZE_BYTES);
        dev.submit(IoCommand::Read { lba: Lba(i % 64), blocks: BlockCount(1) }, Some(buf), i)
            .expect("submit within depth");
    }
    assert_eq!(dev.in_flight(), depth);
    let extra = DmaBuf::new(BLOCK_SIZE_BYTES);
    let addr = extra.dma_addr();
    let err = dev
        .submit(IoCommand::Read { lba: Lba(0), blocks: BlockCount(1) }, Some(extra), 999_999)
        .expect_err("a full queue must reject");
    assert_eq!(err.reason, RejectReason::QueueFull);
    assert_eq!(err.buf.expect("buffer back").dma_addr(), addr);
    dev.kick().expect("kick");
    for c in reap(dev, depth) {
        c.result.expect("read");
    }
    assert_eq!(dev.in_flight(), 0);
}

pub fn malformed_commands_are_rejected(dev: &mut dyn BlockDevice) {
    let n = dev.info().num_blocks;
    let max = dev.info().max_transfer_blocks;
    let one = || Some(DmaBuf::new(BLOCK_SIZE_BYTES));
    let cases: Vec<(IoCommand, Option<DmaBuf>)> = vec![
        (IoCommand::Read { lba: Lba(0), blocks: BlockCount(0) }, Some(DmaBuf::new(0))),
        (IoCommand::Read { lba: Lba(n), blocks: BlockCount(1) }, one()),
        (
            IoCommand::Write { lba: Lba(n - 1), blocks: BlockCount(2), fua: false },
            Some(DmaBuf::new(8192)),
        ),
        (IoCommand::Write { lba: Lba(u64::MAX), blocks: BlockCount(1), fua: false }, one()),
        (IoCommand::Read { lba: Lba(0), blocks: BlockCount(2) }, one()),
        (IoCommand::Read { lba: Lba(0), blocks: BlockCount(1) }, None),
        (IoCommand::Flush, one()),
        (IoCommand::WriteZeroes { lba: Lba(n - 1), blocks: BlockCount(5) }, None),
        (
            IoCommand::Read { lba: Lba(0), blocks: BlockCount(max + 1) },
            Some(DmaBuf::new((max as usize + 1) * BLOCK_SIZE_BYTES)),
        ),
    ];
    for (cmd, buf) in cases {
        let had_buf = buf.is_some();
        let err = dev.submit(cmd, buf, 1).expect_err(&format!("{cmd:?} must be rejected"));
        assert!(matches!(err.reason, RejectReason::Invalid(_)), "{cmd:?}: {:?}", err.reason);
        assert_eq!(err.buf.is_some(), had_buf, "{cmd:?}: buffer must come back");
    }
    assert_eq!(dev.in_flight(), 0);
}

pub fn write_zeroes_reads_back_zeroes(dev: &mut dyn BlockDevice) {
    let data = pattern_buf(100, 8, 1).to_vec();
    write_sync(dev, Lba(100), &data, false).expect("write");
    let (r, _) =
        run_sync(dev, IoCommand::WriteZeroes { lba: Lba(102), blocks: BlockCount(4) }, None);
    r.expect("write zeroes");
    let got = read_sync(dev, Lba(100), BlockCount(8)).expect("read");
    assert_pattern(&got[..2 * BLOCK_SIZE_BYTES], 100, 1, "before the zeroed range");
    assert!(
        got[2 * BLOCK_SIZE_BYTES..6 * BLOCK_SIZE_BYTES].iter().all(|&b| b == 0),
        "zeroed range"
    );
    assert_pattern(&got[6 * BLOCK_SIZE_BYTES..], 106, 1, "after the zeroed range");
}

pub fn trim_reads_back_old_data_or_zeroes(dev: &mut dyn BlockDevice) {
    let data = pattern_buf(200, 4, 2).to_vec();
    write_sync(dev, Lba(200), &data, false).expect("write");
    let (r, _) = run_sync(dev, IoCommand::Trim { lba: Lba(200), blocks: BlockCount(4) }, None);
    r.expect("trim");
    let got = read_sync(dev, Lba(200), BlockCount(4)).expect("read");
    let mut want = vec![0u8; BLOCK_SIZE_BYTES];
    for (i, blk) in got.chunks_exact(BLOCK_SIZE_BYTES).enumerate() {
        pattern(200 + i as u64, 2, &mut want);
        assert!(
            blk == want.as_slice() || blk.iter().all(|&b| b == 0),
            "trimmed block {i} is garbage"
        );
    }
    let data = pattern_buf(200, 4, 3).to_vec();
    write_sync(dev, Lba(200), &data, false).expect("write after trim");
    assert_pattern(&read_sync(dev, Lba(200), BlockCount(4)).expect("read"), 200, 3, "after trim");
}

pub fn fua_write_reads_back(dev: &mut dyn BlockDevice) {
    let data = pattern_buf(300, 3, 4).to_vec();
    write_sync(dev, Lba(300), &data, true).expect("fua write");
    assert_pattern(
        &read_sync(dev, Lba(300), BlockCount(3)).expect("read"),
        300,
        4,
        "after FUA write",
    );
}

pub fn flush_completes(dev: &mut dyn BlockDevice) {
    flush_sync(dev).expect("flush with nothing written");
    let data = pattern_buf(400, 2, 5).to_vec();
    write_sync(dev, Lba(400), &data, false).expect("write");
    flush_sync(dev).expect("flush after a write");
    assert_pattern(&read_sync(dev, Lba(400), BlockCount(2)).expect("read"), 400, 5, "after flush");
}

pub fn poll_respects_max(dev: &mut dyn BlockDevice) {
    let n = dev.info().queue_depth.min(8);
    for i in 0..n as u64 {
        dev.submit(
            IoCommand::Read { lba: Lba(i), blocks: BlockCount(1) },
            Some(DmaBuf::new(4096)),
            i,
        )
        .expect("submit");
    }
    dev.kick().expect("kick");
    let mut got = 0;
    let mut spins = 0u64;
    while got < n {
        let mut this = 0;
        let k = dev.poll(1, &mut |_| this += 1);
        assert!(k <= 1 && this == k, "poll(1) delivered {this}, returned {k}");
        got += k;
        spins += 1;
        if spins.is_multiple_of(256) {
            std::thread::yield_now();
        }
    }
}

/// A seeded random mix of reads, writes, write-zeroes, FUA writes and flushes at full
/// queue depth, checked against a model. In-flight commands never overlap, so every
/// read's expected content is known at submission.
pub fn random_workload_matches_a_model(dev: &mut dyn BlockDevice) {
    const SPAN_BLOCKS: u64 = 2048;
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed);
    let depth = dev.info().queue_depth.min(32);
    let max_blocks = dev.info().max_transfer_blocks.min(16);
    // model: block -> Some(version) written, or None = zeroes / never written
    let mut model: HashMap<u64, u64> = HashMap::new();
    let mut busy: HashSet<u64> = HashSet::new();
    // tag -> (cmd, expected versions for reads)
    let mut inflight: HashMap<u64, (IoCommand, Vec<Option<u64>>)> = HashMap::new();
    let mut next_tag = 0u64;
    let mut version = 10u64;
    let mut done = 0;
    // Zero the span first so "never written" has a known content on every backend.
    for chunk in 0..SPAN_BLOCKS / 256 {
        let (r, _) = run_sync(
            dev,
            IoCommand::WriteZeroes { lba: Lba(chunk * 256), blocks: BlockCount(256) },
            None,
        );
        r.expect("initial zeroing");
    }
    while done < 3000 {
        while inflight.len() < depth {
            let blocks = rng.gen_range(1..=max_blocks);
            let lba = rng.gen_range(0..SPAN_BLOCKS - blocks);
            if (lba..lba + blocks).any(|b| busy.contains(&b)) {
                break;
            }
            let roll = rng.gen_range(0..100);
            let tag = next_tag;
            next_tag += 1;
            let (cmd, buf, expect) = if roll < 45 {
                let expect = (lba..lba + blocks).map(|b| model.get(&b).copied()).collect();
                let cmd = IoCommand::Read { lba: Lba(lba), blocks: BlockCount(blocks) };
                (cmd, Some(DmaBuf::new(blocks as usize * BLOCK_SIZE_BYTES)), expect)
            } else if roll < 85 {
                version += 1;
                let cmd =
                    IoCommand::Write { lba: Lba(lba), blocks: BlockCount(blocks), fua: roll >= 80 };
                (cmd, Some(pattern_buf(lba, blocks, version)), vec![Some(version)])
            } else if roll < 95 {
                (
                    IoCommand::WriteZeroes { lba: Lba(lba), blocks: BlockCount(blocks) },
                    None,
                    vec![None],
                )
            } else {
                (IoCommand::Flush, None, vec![])
            };
            if let Some((l, n)) = cmd.range() {
                busy.extend(l.0..l.0 + n.0);
            }
            dev.submit(cmd, buf, tag).expect("submit");
            inflight.insert(tag, (cmd, expect));
        }
        dev.kick().expect("kick");
        let mut completions = Vec::new();
        dev.poll(usize::MAX, &mut |c| completions.push(c));
        for c in completions {
            let (cmd, expect) = inflight.remove(&c.tag).expect("known tag");
            c.result.unwrap_or_else(|e| panic!("{cmd:?} failed: {e}"));
            if let Some((lba, blocks)) = cmd.range() {
                for b in lba.0..lba.0 + blocks.0 {
                    busy.remove(&b);
                }
            }
            match cmd {
                IoCommand::Read { lba, .. } => {
                    let data = c.buf.expect("read buffer");
                    let mut want = vec![0u8; BLOCK_SIZE_BYTES];
                    for (i, v) in expect.iter().enumerate() {
                        let got = &data[i * BLOCK_SIZE_BYTES..(i + 1) * BLOCK_SIZE_BYTES];
                        match v {
                            Some(v) => pattern(lba.0 + i as u64, *v, &mut want),
                            None => want.fill(0),
                        }
                        assert!(
                            got == want.as_slice(),
                            "block {} read wrong content (want {v:?})",
                            lba.0 + i as u64
                        );
                    }
                }
                IoCommand::Write { lba, blocks, .. } => {
                    for b in lba.0..lba.0 + blocks.0 {
                        model.insert(b, expect[0].expect("write version"));
                    }
                }
                IoCommand::WriteZeroes { lba, blocks } => {
                    for b in lba.0..lba.0 + blocks.0 {
                        model.remove(&b);
                    }
                }
                _ => {}
            }
            done += 1;
        }
        std::thread::yield_now();
    }
    while !inflight.is_empty() {
        for c in reap(dev, 1) {
            inflight.remove(&c.tag).expect("known tag");
            c.result.expect("drain");
        }
    }
}

pub fn parked_reactor_is_woken_by_a_completion(dev: &mut dyn BlockDevice) {
    assert!(dev.prepare_park(), "an idle device must allow parking");
    dev.after_park();
    // Reads complete from the block layer's interrupt; writes to a file may be punted to
    // a kernel worker; flushes always are (io_uring runs fsync in io-wq). Each path must
    // wake a parked reactor.
    for round in 0..30u64 {
        let (cmd, buf) = match round % 3 {
            0 => (
                IoCommand::Read { lba: Lba(round), blocks: BlockCount(1) },
                Some(DmaBuf::new(4096)),
            ),
            1 => {
                let mut b = DmaBuf::new(4096);
                b.fill(round as u8);
                (IoCommand::Write { lba: Lba(round), blocks: BlockCount(1), fua: false }, Some(b))
            }
            _ => (IoCommand::Flush, None),
        };
        dev.submit(cmd, buf, round).expect("submit");
        assert!(!dev.prepare_park(), "a device with unsubmitted commands must not allow parking");
        dev.after_park();
        dev.kick().expect("kick");
        let mut got = None;
        let mut waits = 0;
        while got.is_none() {
            dev.poll(1, &mut |c| got = Some(c));
            if got.is_some() {
                break;
            }
            if dev.prepare_park() {
                let fd = dev
                    .park_fd()
                    .expect("a device that allows parking with I/O in flight has a park fd");
                assert!(
                    wait_readable(fd, 10_000),
                    "parked for 10 s: completion never signalled the park fd"
                );
                dev.after_park();
                waits += 1;
            } else {
                std::thread::yield_now();
            }
        }
        let c = got.expect("completion");
        assert_eq!(c.tag, round);
        c.result.expect("read, write or flush");
        assert!(waits <= 1_000_000);
    }
}

/// Waits until `fd` is readable or `timeout_ms` passed; true if readable.
fn wait_readable(fd: BorrowedFd<'_>, timeout_ms: u16) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::from(timeout_ms)), Ok(n) if n > 0)
}

/// Runs every case on devices from `make`, printing `PASS name` / `FAIL name: why`.
/// Returns the number of failures. For binaries that cannot use the test harness.
pub fn run_all(make: &mut dyn FnMut() -> Box<dyn BlockDevice>) -> usize {
    let mut failures = 0;
    for (name, case) in CASES {
        let mut dev = make();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(&mut *dev)));
        match r {
            Ok(()) => println!("PASS conformance::{name}"),
            Err(e) => {
                failures += 1;
                let why = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                println!("FAIL conformance::{name}: {why}");
            }
        }
    }
    failures
}

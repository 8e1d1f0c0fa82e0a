//! The userspace NVMe driver against the register-level controller model: the same
//! conformance suite as every backend, plus what only a controller has (queue
//! wrap-around and phase flips, doorbell stride, PRP lists, error statuses, timeouts,
//! abort, reset of a hung controller, shutdown).

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_nvme::command::{Status, opcode, status};
use sluice_nvme::pcie::model::{ModelConfig, ModelController};
use sluice_nvme::pcie::{Controller, InitError, NvmeDevice, Options};
use sluice_nvme::{
    BlockDevice, DmaPool, IoCommand, IoError, PoolOptions, RejectReason, read_sync, write_sync,
};
use sluice_vocab::{BlockCount, Lba};

fn controller(cfg: ModelConfig, opts: Options) -> (Arc<ModelController>, Arc<Controller>) {
    let model = ModelController::new(cfg);
    let ctrl = Controller::init(
        Box::new(Arc::clone(&model)),
        Box::new(model.iommu()),
        "model".into(),
        opts,
    )
    .expect("controller init");
    (model, ctrl)
}

fn device(cfg: ModelConfig, opts: Options) -> (Arc<ModelController>, NvmeDevice) {
    let (model, ctrl) = controller(cfg, opts);
    let dev = ctrl.queue_pair(1, &[]).expect("queue pair");
    (model, dev)
}

fn fast_timeouts() -> Options {
    Options {
        io_timeout: Duration::from_millis(150),
        admin_timeout: Duration::from_millis(150),
        ..Options::default()
    }
}

mod model_4k {
    use super::*;
    sluice_nvme::conformance_tests!(|| device(ModelConfig::default(), Options::default()).1);
}

mod model_512b_stride_small_queues {
    use super::*;
    // 512-byte blocks (8 device blocks per Sluice block), doorbells 16 bytes apart,
    // 8-entry queues (they wrap every 8 commands), 32 KiB transfers.
    sluice_nvme::conformance_tests!(|| device(
        ModelConfig {
            namespaces: vec![(512, 24 << 20)],
            dstrd: 2,
            max_queue_entries: 8,
            mdts: 3,
            ..ModelConfig::default()
        },
        Options::default()
    )
    .1);
}

mod model_no_dsm_no_mdts {
    use super::*;
    sluice_nvme::conformance_tests!(|| device(
        ModelConfig { dsm: false, mdts: 0, ..ModelConfig::default() },
        Options { io_queue_entries: 32, ..Options::default() }
    )
    .1);
}

fn pattern(seed: u64, blocks: usize) -> Vec<u8> {
    let mut v = vec![0u8; blocks * 4096];
    for (i, w) in v.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64).to_le_bytes());
    }
    v
}

fn reap_one(dev: &mut NvmeDevice) -> sluice_nvme::Completion {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut got = None;
        dev.poll(1, &mut |c| got = Some(c));
        if let Some(c) = got {
            return c;
        }
        assert!(Instant::now() < deadline, "no completion within 20 s");
        std::thread::yield_now();
    }
}

#[test]
fn queues_wrap_and_phase_flips_with_every_doorbell_stride() {
    for dstrd in [0u8, 1, 3] {
        let (model, mut dev) = device(
            ModelConfig { max_queue_entries: 4, dstrd, ..ModelConfig::default() },
            Options::default(),
        );
        assert_eq!(dev.info().queue_depth, 3, "4 entries hold 3 one-part commands");
        // Batches of 1..=3 commands, 600 commands in all: the rings wrap many times
        // at every offset.
        let mut next = 0u64;
        for round in 0..300u64 {
            let n = 1 + (round % 3) as usize;
            for i in 0..n as u64 {
                let lba = (next + i) % 512;
                let data = pattern(next + i, 1);
                dev.submit(
                    IoCommand::Write { lba: Lba(lba), blocks: BlockCount(1), fua: false },
                    Some(sluice_nvme::DmaBuf::from_slice(&data)),
                    next + i,
                )
                .unwrap();
            }
            dev.kick().unwrap();
            for _ in 0..n {
                reap_one(&mut dev).result.unwrap();
            }
            next += n as u64;
        }
        // The last 512 writes are what the media holds, at the right places.
        for seq in next - 512..next {
            let lba = seq % 512;
            assert_eq!(model.media(1, lba as usize * 4096, 4096), pattern(seq, 1), "lba {lba}");
            let got = read_sync(&mut dev, Lba(lba), BlockCount(1)).unwrap();
            assert_eq!(&got[..], &pattern(seq, 1)[..]);
        }
        let st = model.stats();
        assert!(st.cq_wraps >= 150 && st.sq_wraps >= 150, "dstrd {dstrd}: {st:?}");
        assert_eq!(st.bad_doorbells, 0, "dstrd {dstrd}: a doorbell missed the stride");
        assert_eq!(st.iommu_faults, 0);
    }
}

#[test]
fn prp_lists_place_data_exactly() {
    // 128 KiB transfers (MDTS 5): 1 page (PRP1 only), 2 (PRP2 = page), 3..32 (a list).
    let (model, mut dev) = device(ModelConfig::default(), Options::default());
    assert_eq!(dev.info().max_transfer_blocks, 256);
    let pool = DmaPool::new(32 * 4096, 2, PoolOptions::default()).unwrap();
    let (model2, ctrl2) = controller(ModelConfig::default(), Options::default());
    let mut pooled = ctrl2.queue_pair(1, std::slice::from_ref(&pool)).unwrap();
    let mut lba = 0u64;
    for blocks in [1usize, 2, 3, 17, 31, 32] {
        let data = pattern(blocks as u64, blocks);
        write_sync(&mut dev, Lba(lba), &data, false).unwrap();
        assert_eq!(model.media(1, lba as usize * 4096, data.len()), data, "{blocks} blocks");
        let got = read_sync(&mut dev, Lba(lba), BlockCount(blocks as u64)).unwrap();
        assert_eq!(&got[..], &data[..]);
        // The same through a mapped pool's buffer (no per-command mapping).
        let mut b = pool.alloc().unwrap();
        b.set_len(data.len());
        b.copy_from_slice(&data);
        let (r, _) = sluice_nvme::run_sync(
            &mut pooled,
            IoCommand::Write { lba: Lba(lba), blocks: BlockCount(blocks as u64), fua: true },
            Some(b),
        );
        r.unwrap();
        assert_eq!(model2.media(1, lba as usize * 4096, data.len()), data);
        lba += blocks as u64 + 5;
    }
    let st = model.stats();
    // 3, 17, 31 and 32 blocks written and read back need a list.
    assert_eq!(st.prp_list_commands, 8, "{st:?}");
    assert_eq!(st.max_list_pages, 1);
    assert_eq!(st.iommu_faults, 0);
    let before = model2.iommu().mappings();
    drop(pooled);
    assert!(model2.iommu().mappings() < before, "the queue's memory is unmapped");
}

#[test]
fn transfers_over_mdts_are_split_and_complete_once() {
    // MDTS 1: 8 KiB per NVMe command; callers still see 1 MiB transfers.
    let (model, mut dev) = device(
        ModelConfig { mdts: 1, max_queue_entries: 1024, ..ModelConfig::default() },
        Options { io_queue_entries: 1024, ..Options::default() },
    );
    // 128 parts of 2 blocks per 1 MiB command: 1023 identifiers hold 7 such commands.
    assert_eq!((dev.info().max_transfer_blocks, dev.info().queue_depth), (256, 7));
    let before = model.stats().commands;
    let data = pattern(3, 5);
    write_sync(&mut dev, Lba(10), &data, false).unwrap();
    assert_eq!(model.stats().commands - before, 3, "5 blocks in 2 + 2 + 1");
    assert_eq!(model.media(1, 10 * 4096, data.len()), data);
    let big = pattern(4, 256);
    write_sync(&mut dev, Lba(1000), &big, true).unwrap();
    assert_eq!(&read_sync(&mut dev, Lba(1000), BlockCount(256)).unwrap()[..], &big[..]);
    // A part that fails fails the whole command, once, after every part is back.
    model.fail_next(false, opcode::READ, Status { sct: status::SCT_MEDIA, sc: 0x81, dnr: true });
    let e = read_sync(&mut dev, Lba(10), BlockCount(5)).unwrap_err();
    assert_eq!(e, IoError::Media { lba: Lba(10) });
    assert_eq!(dev.in_flight(), 0);
    // A tiny queue: 7 identifiers, commands of at most 3 parts, 2 commands at once,
    // both at the largest size.
    let (m2, mut small) = device(
        ModelConfig { mdts: 1, max_queue_entries: 8, ..ModelConfig::default() },
        Options::default(),
    );
    assert_eq!((small.info().queue_depth, small.info().max_transfer_blocks), (2, 6));
    for i in 0..2u64 {
        small
            .submit(
                IoCommand::Write { lba: Lba(6 * i), blocks: BlockCount(6), fua: false },
                Some(sluice_nvme::DmaBuf::from_slice(&pattern(i, 6))),
                i,
            )
            .unwrap();
    }
    small.kick().unwrap();
    for _ in 0..2 {
        reap_one(&mut small).result.unwrap();
    }
    assert_eq!(m2.media(1, 6 * 4096, 6 * 4096), pattern(1, 6));
}

#[test]
fn error_statuses_map_to_typed_errors_and_spare_other_commands() {
    let (model, mut dev) = device(ModelConfig::default(), Options::default());
    let media = |sc| Status { sct: status::SCT_MEDIA, sc, dnr: true };
    let cases = [
        (opcode::WRITE, media(status::SC_WRITE_FAULT), IoError::Media { lba: Lba(7) }),
        (opcode::READ, media(status::SC_UNRECOVERED_READ_ERROR), IoError::Media { lba: Lba(7) }),
        (
            opcode::READ,
            Status { sct: 0, sc: status::SC_LBA_OUT_OF_RANGE, dnr: true },
            IoError::OutOfRange { lba: Lba(7) },
        ),
        (
            opcode::FLUSH,
            Status { sct: 0, sc: status::SC_INTERNAL_ERROR, dnr: false },
            IoError::Nvme { sct: 0, sc: status::SC_INTERNAL_ERROR },
        ),
        (
            opcode::WRITE,
            Status { sct: 3, sc: 0x71, dnr: false },
            IoError::Nvme { sct: 3, sc: 0x71 },
        ),
    ];
    for (op, st, want) in cases {
        model.fail_next(false, op, st);
        // The failing command and a good one in the same batch.
        let failing = match op {
            opcode::WRITE => (
                IoCommand::Write { lba: Lba(7), blocks: BlockCount(1), fua: false },
                Some(sluice_nvme::DmaBuf::new(4096)),
            ),
            opcode::READ => (
                IoCommand::Read { lba: Lba(7), blocks: BlockCount(1) },
                Some(sluice_nvme::DmaBuf::new(4096)),
            ),
            _ => (IoCommand::Flush, None),
        };
        dev.submit(failing.0, failing.1, 1).unwrap();
        let good = pattern(9, 1);
        dev.submit(
            IoCommand::Write { lba: Lba(100), blocks: BlockCount(1), fua: false },
            Some(sluice_nvme::DmaBuf::from_slice(&good)),
            2,
        )
        .unwrap();
        dev.kick().unwrap();
        let mut seen = 0;
        while seen < 2 {
            let c = reap_one(&mut dev);
            match c.tag {
                1 => {
                    assert_eq!(c.result, Err(want), "{op:#x} {st:?}");
                }
                2 => c.result.unwrap(),
                t => panic!("unknown tag {t}"),
            }
            seen += 1;
        }
        assert_eq!(model.media(1, 100 * 4096, 4096), good);
    }
}

#[test]
fn a_lost_command_times_out_and_is_aborted_without_a_reset() {
    let (model, mut dev) = device(ModelConfig::default(), fast_timeouts());
    model.lose_next(1);
    let data = pattern(1, 1);
    dev.submit(
        IoCommand::Write { lba: Lba(3), blocks: BlockCount(1), fua: false },
        Some(sluice_nvme::DmaBuf::from_slice(&data)),
        77,
    )
    .unwrap();
    dev.kick().unwrap();
    let c = reap_one(&mut dev);
    assert_eq!(c.tag, 77);
    assert_eq!(c.result, Err(IoError::Timeout));
    assert!(c.buf.is_some(), "the buffer comes back");
    let st = model.stats();
    assert_eq!(st.aborts, 1);
    assert_eq!(st.resets, 0, "an abort that works needs no reset");
    write_sync(&mut dev, Lba(3), &data, false).unwrap();
    assert_eq!(model.media(1, 3 * 4096, 4096), data);
}

#[test]
fn a_hung_controller_is_reset_and_serves_again() {
    let (model, ctrl) = controller(ModelConfig::default(), fast_timeouts());
    let mut a = ctrl.queue_pair(1, &[]).unwrap();
    let mut b = ctrl.queue_pair(1, &[]).unwrap();
    assert_ne!(a.qid(), b.qid());
    write_sync(&mut b, Lba(50), &pattern(50, 1), false).unwrap();
    model.hang();
    for i in 0..3u64 {
        a.submit(
            IoCommand::Read { lba: Lba(i), blocks: BlockCount(1) },
            Some(sluice_nvme::DmaBuf::new(4096)),
            i,
        )
        .unwrap();
    }
    a.kick().unwrap();
    b.submit(IoCommand::Flush, None, 9).unwrap();
    b.kick().unwrap();
    // The oldest command times out, its abort times out (the admin queue is hung too),
    // the controller is reset: everything in flight fails, nothing is lost track of.
    let mut results = Vec::new();
    while results.len() < 3 {
        let c = reap_one(&mut a);
        results.push(c.result);
    }
    assert!(results.contains(&Err(IoError::Timeout)), "{results:?}");
    assert!(results.iter().all(|r| matches!(r, Err(IoError::Timeout | IoError::Aborted))));
    let c = reap_one(&mut b);
    assert_eq!((c.tag, c.result), (9, Err(IoError::Aborted)), "other queues fail theirs too");
    assert_eq!(model.stats().resets, 1);
    // Both queues were recreated and work.
    let data = pattern(5, 2);
    write_sync(&mut a, Lba(10), &data, false).unwrap();
    assert_eq!(&read_sync(&mut b, Lba(10), BlockCount(2)).unwrap()[..], &data[..]);
    assert_eq!(&read_sync(&mut a, Lba(50), BlockCount(1)).unwrap()[..], &pattern(50, 1)[..]);
    assert_eq!(model.io_queues(), vec![a.qid().min(b.qid()), a.qid().max(b.qid())]);
}

/// Reads block 1 and waits for the completion.
fn read_one_block(dev: &mut NvmeDevice) -> sluice_nvme::Completion {
    dev.submit(
        IoCommand::Read { lba: Lba(1), blocks: BlockCount(1) },
        Some(sluice_nvme::DmaBuf::new(4096)),
        1,
    )
    .unwrap();
    dev.kick().unwrap();
    reap_one(dev)
}

#[test]
fn a_dead_controller_reports_device_gone_and_its_dma_is_stopped() {
    let (model, mut dev) = device(ModelConfig::default(), fast_timeouts());
    model.kill();
    let c = read_one_block(&mut dev);
    assert_eq!(c.result, Err(IoError::Timeout));
    // It ignored CC.EN = 0; bus mastering off stopped it, so the buffer may be reused.
    assert_eq!(model.stats().dma_stops, 1);
    assert!(c.buf.is_some());
    let e = dev.submit(IoCommand::Flush, None, 2).unwrap_err();
    assert_eq!(e.reason, RejectReason::DeviceGone);
    assert!(matches!(dev.controller().queue_pair(1, &[]), Err(InitError::Failed)));
}

#[test]
fn memory_a_wedged_controller_may_still_write_is_never_handed_back() {
    let (model, mut dev) = device(ModelConfig::default(), fast_timeouts());
    model.set_dma_stoppable(false);
    model.kill();
    let c = read_one_block(&mut dev);
    assert_eq!(c.result, Err(IoError::Timeout));
    assert!(c.buf.is_none(), "the controller may still DMA into it: kept, not returned");
    let mappings = model.iommu().mappings();
    drop(dev);
    assert_eq!(model.iommu().mappings(), mappings, "nothing unmapped while it may write");
}

#[test]
fn iovas_skip_the_msi_window_and_are_reused() {
    // 63-command queues of 1 MiB commands: 63 MiB of IOVA window each, so 70 queue pairs
    // reach past 4 GiB, across the x86 MSI window the model's IOMMU refuses.
    let (model, ctrl) = controller(
        ModelConfig { mdts: 0, max_io_queues: 80, ..ModelConfig::default() },
        Options { io_queues: 80, ..Options::default() },
    );
    let data = pattern(7, 1);
    let mut devs = Vec::new();
    for i in 0..70u64 {
        let mut d = ctrl.queue_pair(1, &[]).unwrap();
        assert_eq!(d.info().queue_depth, 63);
        // Command slot 62's window is the highest of this queue pair: fill the queue.
        for t in 0..63u64 {
            d.submit(
                IoCommand::Write { lba: Lba(i * 64 + t), blocks: BlockCount(1), fua: false },
                Some(sluice_nvme::DmaBuf::from_slice(&data)),
                t,
            )
            .unwrap_or_else(|e| panic!("queue pair {i}, command {t}: {e}"));
        }
        d.kick().unwrap();
        for _ in 0..63 {
            reap_one(&mut d).result.unwrap();
        }
        devs.push(d);
    }
    assert_eq!(model.stats().iommu_faults, 0);
    let base = {
        drop(devs);
        model.iommu().mappings()
    };
    // Freed space is reused: creating and dropping many more never runs out.
    for _ in 0..200 {
        let mut d = ctrl.queue_pair(1, &[]).unwrap();
        write_sync(&mut d, Lba(0), &data, false).unwrap();
    }
    assert_eq!(model.iommu().mappings(), base);
}

#[test]
fn init_honours_cap_to_and_reports_a_controller_that_never_gets_ready() {
    let model = ModelController::new(ModelConfig {
        timeout_units: 1,
        ready_delay_reads: 20,
        ..ModelConfig::default()
    });
    Controller::init(
        Box::new(Arc::clone(&model)),
        Box::new(model.iommu()),
        "m".into(),
        Options::default(),
    )
    .expect("a controller that takes a while to get ready is waited for");
    let model = ModelController::new(ModelConfig { timeout_units: 1, ..ModelConfig::default() });
    model.kill();
    let t = Instant::now();
    let e = Controller::init(
        Box::new(Arc::clone(&model)),
        Box::new(model.iommu()),
        "m".into(),
        Options::default(),
    )
    .unwrap_err();
    assert!(matches!(e, InitError::NotReady { want: "ready", ms: 500, .. }), "{e}");
    assert!(t.elapsed() >= Duration::from_millis(500), "waited CAP.TO");
}

#[test]
fn queues_are_capped_by_mqes_and_by_the_granted_count() {
    let (_m, ctrl) = controller(
        ModelConfig { max_queue_entries: 16, max_io_queues: 2, mdts: 0, ..ModelConfig::default() },
        Options { io_queue_entries: 1024, io_queues: 8, ..Options::default() },
    );
    assert_eq!(ctrl.info().io_queues, 2);
    let a = ctrl.queue_pair(1, &[]).unwrap();
    assert_eq!(a.info().queue_depth, 15);
    let _b = ctrl.queue_pair(1, &[]).unwrap();
    assert!(matches!(ctrl.queue_pair(1, &[]), Err(InitError::NoQueue(2))));
    drop(a);
    ctrl.queue_pair(1, &[]).expect("a dropped queue's id is reused");
    assert!(matches!(ctrl.queue_pair(3, &[]), Err(InitError::NoNamespace { nsid: 3, .. })));
}

#[test]
fn a_queue_sized_by_depth_holds_that_many_largest_commands() {
    // MDTS 5: 32 blocks per NVMe command, 8 per 1 MiB command.
    let (_m, ctrl) = controller(
        ModelConfig { max_queue_entries: 2048, ..ModelConfig::default() },
        Options::default(),
    );
    let d = ctrl.queue_pair_with_depth(1, 100, &[]).unwrap();
    assert_eq!((d.info().queue_depth, d.info().max_transfer_blocks), (100, 256));
    // Capped by MQES: 63 identifiers, 7 commands of 8 parts.
    let (_m, ctrl) = controller(ModelConfig::default(), Options::default());
    let d = ctrl.queue_pair_with_depth(1, 100, &[]).unwrap();
    assert_eq!((d.info().queue_depth, d.info().max_transfer_blocks), (7, 256));
}

#[test]
fn identify_reports_namespaces_and_limits() {
    let (_m, ctrl) = controller(
        ModelConfig {
            namespaces: vec![(4096, 16 << 20), (512, 20 << 20)],
            ..ModelConfig::default()
        },
        Options::default(),
    );
    let i = ctrl.info();
    assert_eq!(i.model, "Sluice NVMe register model");
    assert_eq!(i.max_transfer_bytes, Some(128 << 10));
    assert_eq!(i.namespaces.len(), 2);
    assert_eq!((i.namespaces[1].lba_bytes, i.namespaces[1].lbas), (512, 40960));
    let ns2 = ctrl.queue_pair(2, &[]).unwrap();
    assert_eq!(ns2.info().num_blocks, 5120);
    assert_eq!(ns2.info().name, "model/2");
}

#[test]
fn queues_on_two_threads_and_an_orderly_shutdown() {
    let (model, ctrl) = controller(ModelConfig::default(), Options::default());
    let handles: Vec<_> = (0..2u64)
        .map(|t| {
            let mut dev = ctrl.queue_pair(1, &[]).unwrap();
            std::thread::spawn(move || {
                for i in 0..200u64 {
                    let lba = t * 1000 + i;
                    let data = pattern(lba, 1);
                    write_sync(&mut dev, Lba(lba), &data, false).unwrap();
                    assert_eq!(
                        &read_sync(&mut dev, Lba(lba), BlockCount(1)).unwrap()[..],
                        &data[..]
                    );
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(model.io_queues(), Vec::<u16>::new(), "dropped queue pairs delete their queues");
    drop(ctrl);
    let st = model.stats();
    assert_eq!(st.shutdowns, 1, "CC.SHN on the last drop");
    assert_eq!(model.iommu().mappings(), 0, "everything mapped was unmapped");
    assert_eq!(st.iommu_faults, 0);
}

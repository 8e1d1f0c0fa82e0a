//! io_uring backend specifics: fixed buffers, SQPOLL, IOPOLL refusal, open errors,
//! shared files, durability across reopen.

use std::path::PathBuf;
use std::sync::Arc;

use sluice_nvme::uring::open_file;
use sluice_nvme::{
    BlockDevice, DmaPool, IoCommand, OpenError, UringDevice, UringOptions, create_device_file,
    flush_sync, read_sync, write_sync,
};
use sluice_vocab::{BlockCount, Lba};

fn scratch() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("dev");
    create_device_file(&path, 8 << 20).unwrap();
    (dir, path)
}

fn block(v: u8) -> Vec<u8> {
    vec![v; 4096]
}

#[test]
fn pool_buffers_travel_as_fixed_buffers() {
    let (_d, path) = scratch();
    let pool = DmaPool::new(4096, 8, Default::default()).unwrap();
    let mut dev = UringDevice::open(
        &path,
        UringOptions { queue_depth: 8, fixed_pools: vec![pool.clone()], ..Default::default() },
    )
    .unwrap();
    let mut buf = pool.alloc().unwrap();
    assert!(dev.is_fixed(&buf));
    assert!(!dev.is_fixed(&sluice_nvme::DmaBuf::new(4096)));
    buf.fill(0xab);
    dev.submit(IoCommand::Write { lba: Lba(3), blocks: BlockCount(1), fua: false }, Some(buf), 1)
        .unwrap();
    dev.kick().unwrap();
    let mut back = None;
    while back.is_none() {
        dev.poll(1, &mut |c| back = Some(c));
    }
    let c = back.unwrap();
    c.result.unwrap();
    let mut buf = c.buf.unwrap();
    buf.fill(0);
    dev.submit(IoCommand::Read { lba: Lba(3), blocks: BlockCount(1) }, Some(buf), 2).unwrap();
    dev.kick().unwrap();
    let mut back = None;
    while back.is_none() {
        dev.poll(1, &mut |c| back = Some(c));
    }
    let c = back.unwrap();
    c.result.unwrap();
    assert!(c.buf.unwrap().iter().all(|&b| b == 0xab));
    assert_eq!(pool.available(), 8, "every pool buffer came back");
}

#[test]
fn sqpoll_queue_pair_round_trips() {
    let (_d, path) = scratch();
    let mut dev = UringDevice::open(
        &path,
        UringOptions { queue_depth: 16, sqpoll_idle_ms: Some(5), ..Default::default() },
    )
    .unwrap();
    for i in 0..64u64 {
        write_sync(&mut dev, Lba(i), &block(i as u8), i % 2 == 0).unwrap();
    }
    flush_sync(&mut dev).unwrap();
    for i in 0..64u64 {
        assert_eq!(read_sync(&mut dev, Lba(i), BlockCount(1)).unwrap().to_vec(), block(i as u8));
    }
}

#[test]
fn iopoll_on_a_device_without_polling_is_refused_with_the_reason() {
    let (_d, path) = scratch();
    match UringDevice::open(&path, UringOptions { iopoll: true, ..Default::default() }) {
        Err(OpenError::NoIopoll { path: p, why }) => {
            assert!(p.contains("dev"));
            assert!(why.contains("poll"), "{why}");
        }
        // A machine whose disk supports polled I/O may open it; then it must work.
        Ok(mut dev) => {
            write_sync(&mut dev, Lba(0), &block(1), false).unwrap();
            flush_sync(&mut dev).unwrap();
            assert_eq!(read_sync(&mut dev, Lba(0), BlockCount(1)).unwrap().to_vec(), block(1));
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[test]
fn open_errors_name_the_path_and_the_problem() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let missing = dir.path().join("missing");
    let e = UringDevice::open(&missing, UringOptions::default()).unwrap_err();
    assert!(matches!(e, OpenError::Open { .. }) && e.to_string().contains("missing"), "{e}");
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    let e = UringDevice::open(&empty, UringOptions::default()).unwrap_err();
    assert!(matches!(e, OpenError::BadSize { size_bytes: 0, .. }), "{e}");
    let odd = dir.path().join("odd");
    std::fs::write(&odd, vec![0u8; 5000]).unwrap();
    let e = UringDevice::open(&odd, UringOptions::default()).unwrap_err();
    assert!(matches!(e, OpenError::BadSize { size_bytes: 5000, .. }), "{e}");
    let e = UringDevice::open(dir.path(), UringOptions::default()).unwrap_err();
    assert!(e.to_string().contains(&dir.path().display().to_string()), "{e}");
}

#[test]
fn queue_pairs_sharing_a_file_see_each_others_completed_writes() {
    let (_d, path) = scratch();
    let (file, size) = open_file(&path, true).unwrap();
    let file = Arc::new(file);
    let mut a =
        UringDevice::open_shared(Arc::clone(&file), size, "a".into(), UringOptions::default())
            .unwrap();
    let mut b = UringDevice::open_shared(file, size, "b".into(), UringOptions::default()).unwrap();
    write_sync(&mut a, Lba(9), &block(9), false).unwrap();
    assert_eq!(read_sync(&mut b, Lba(9), BlockCount(1)).unwrap().to_vec(), block(9));
}

#[test]
fn flushed_data_survives_reopen() {
    let (_d, path) = scratch();
    {
        let mut dev = UringDevice::open(&path, UringOptions::default()).unwrap();
        write_sync(&mut dev, Lba(100), &block(0x5a), false).unwrap();
        flush_sync(&mut dev).unwrap();
    }
    let mut dev = UringDevice::open(&path, UringOptions::default()).unwrap();
    assert_eq!(read_sync(&mut dev, Lba(100), BlockCount(1)).unwrap().to_vec(), block(0x5a));
}

#[test]
fn dropping_a_queue_pair_with_io_in_flight_returns_every_buffer_after_the_kernel_is_done() {
    let (_d, path) = scratch();
    let pool = DmaPool::new(4096, 16, Default::default()).unwrap();
    {
        let mut dev = UringDevice::open(
            &path,
            UringOptions { queue_depth: 16, fixed_pools: vec![pool.clone()], ..Default::default() },
        )
        .unwrap();
        for i in 0..8u64 {
            let buf = pool.alloc().unwrap();
            dev.submit(IoCommand::Read { lba: Lba(i), blocks: BlockCount(1) }, Some(buf), i)
                .unwrap();
        }
        for i in 8..16u64 {
            let mut buf = pool.alloc().unwrap();
            buf.fill(i as u8);
            dev.submit(
                IoCommand::Write { lba: Lba(100 + i), blocks: BlockCount(1), fua: false },
                Some(buf),
                i,
            )
            .unwrap();
        }
        dev.kick().unwrap();
        assert_eq!(pool.available(), 0);
        // Dropped with everything in flight (some commands may not even have been reaped).
    }
    assert_eq!(pool.available(), 16, "drop must wait for the kernel, then return the buffers");
}

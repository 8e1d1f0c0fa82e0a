//! The conformance suite on every backend that runs without hardware.

use std::sync::Arc;

use sluice_nvme::{FaultyDevice, RamDevice, UringDevice, UringOptions};
use sluice_vocab::SystemClock;

const SIZE: u64 = 32 << 20;

mod ram {
    use super::*;
    sluice_nvme::conformance_tests!(|| RamDevice::new(SIZE, 32));
}

/// A device file on the target directory's file system (disk-backed, so O_DIRECT works).
fn uring_device(opts: UringOptions) -> UringDevice {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let path = dir.path().join("dev");
    sluice_nvme::create_device_file(&path, SIZE).expect("create device file");
    let dev = UringDevice::open(&path, opts).expect("open");
    // The open file keeps the data alive; the directory can go.
    drop(dir);
    dev
}

mod uring {
    use super::*;
    sluice_nvme::conformance_tests!(|| uring_device(UringOptions {
        queue_depth: 64,
        ..Default::default()
    }));
}

mod uring_interrupt_taskrun {
    use super::*;
    sluice_nvme::conformance_tests!(|| uring_device(UringOptions {
        queue_depth: 32,
        taskrun: sluice_nvme::TaskRun::Interrupt,
        ..Default::default()
    }));
}

mod uring_sqpoll {
    use super::*;
    sluice_nvme::conformance_tests!(|| uring_device(UringOptions {
        queue_depth: 32,
        sqpoll_idle_ms: Some(2),
        ..Default::default()
    }));
}

mod uring_fixed_buffers {
    use super::*;
    // Buffers in the suite come from the heap, so this checks that non-pool buffers still
    // work on a ring with registered pools; pool buffers are covered in uring.rs.
    sluice_nvme::conformance_tests!(|| {
        let pool = sluice_nvme::DmaPool::new(4096, 16, Default::default()).unwrap();
        uring_device(UringOptions {
            queue_depth: 16,
            fixed_pools: vec![pool],
            ..Default::default()
        })
    });
}

mod faulty_ram {
    use super::*;
    sluice_nvme::conformance_tests!(|| FaultyDevice::new(
        RamDevice::new(SIZE, 8),
        Arc::new(SystemClock)
    ));
}

mod faulty_uring {
    use super::*;
    sluice_nvme::conformance_tests!(|| FaultyDevice::new(
        uring_device(UringOptions { queue_depth: 4, ..Default::default() }),
        Arc::new(SystemClock)
    ));
}

//! `sluice-vm-test`: runs inside the QEMU guest of `scripts/vm-test` against emulated
//! NVMe controllers bound to vfio-pci, through the userspace driver.
//!
//! * `conformance nvme://ADDR/NSID`: the queue-pair conformance suite every backend
//!   passes, on small queues so they wrap; prints `PASS conformance::CASE` or
//!   `FAIL conformance::CASE: why` per case.
//! * `powercut-write nvme://ADDR/NSID`: opens the store (made by `sluice-osd mkfs`) and
//!   writes numbered objects forever, 8 transactions in flight, printing `ACK n` once
//!   objects `0..=n` are all durable. The host kills the guest at some point.
//! * `powercut-verify nvme://ADDR/NSID N`: after the next boot, checks that every
//!   object `0..=N` is there with its exact content.
//!
//! Output lines starting with PASS or FAIL decide the VM test's result.

#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::io::Write as _;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use sluice_dataplane::store::blocking::{run_query, run_txn};
use sluice_dataplane::store::{
    Answer, CollId, Query, Shard, StoreConfig, StoreError, StoreEvent, StorePools, Transaction,
    TxOp,
};
use sluice_nvme::pcie::{Controller, Options};
use sluice_nvme::{BlockDevice, DeviceSpec, NvmeSpec, PoolOptions};

#[derive(Debug, Parser)]
#[command(name = "sluice-vm-test", about = "Bare-metal path tests over VFIO (run in the VM).")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Runs the queue-pair conformance suite on a namespace.
    Conformance {
        dev: DeviceSpec,
        /// Entries per I/O queue (small, so the rings wrap).
        #[arg(long, default_value_t = 16)]
        queue_entries: u32,
    },
    /// Writes numbered objects through the store until killed.
    PowercutWrite { dev: DeviceSpec },
    /// Checks that objects 0..=ACKED survived.
    PowercutVerify { dev: DeviceSpec, acked: u64 },
}

const COLL: CollId = CollId(7);

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let (what, r) = match cli.cmd {
        Cmd::Conformance { dev, queue_entries } => {
            ("conformance", conformance(&dev, queue_entries))
        }
        Cmd::PowercutWrite { dev } => ("powercut-write", powercut_write(&dev)),
        Cmd::PowercutVerify { dev, acked } => ("powercut-verify", powercut_verify(&dev, acked)),
    };
    match r {
        Ok(()) => {}
        Err(e) => {
            println!("FAIL {what}: {e:#}");
            std::process::exit(1);
        }
    }
}

fn nvme(dev: &DeviceSpec) -> anyhow::Result<&NvmeSpec> {
    match dev {
        DeviceSpec::Nvme(n) => Ok(n),
        DeviceSpec::Path(p) => bail!("{}: give an NVMe device, nvme://ADDR/NSID", p.display()),
    }
}

fn controller(n: &NvmeSpec, queue_entries: u32) -> anyhow::Result<Arc<Controller>> {
    let opts = Options {
        io_queue_entries: queue_entries,
        io_queues: 2,
        hugepages: true,
        ..Options::default()
    };
    let ctrl = sluice_nvme::vfio::open(n, opts)?;
    let i = ctrl.info();
    println!(
        "INFO {}: {} serial {} fw {} NVMe {}.{}.{}, MQES {}, DSTRD {}, TO {} ms, MDTS {:?}, VWC {}, namespaces {:?}",
        n,
        i.model,
        i.serial,
        i.firmware,
        i.version.0,
        i.version.1,
        i.version.2,
        i.cap.max_queue_entries,
        i.cap.dstrd,
        i.cap.timeout_ms,
        i.max_transfer_bytes,
        i.volatile_write_cache,
        i.namespaces.iter().map(|ns| (ns.nsid, ns.lba_bytes, ns.size_bytes())).collect::<Vec<_>>()
    );
    Ok(ctrl)
}

fn conformance(dev: &DeviceSpec, queue_entries: u32) -> anyhow::Result<()> {
    let n = nvme(dev)?;
    let ctrl = controller(n, queue_entries)?;
    let nsid = n.nsid;
    let mut failed_open = None;
    let failures = sluice_nvme::conformance::run_all(&mut || match ctrl.queue_pair(nsid, &[]) {
        Ok(d) => Box::new(d) as Box<dyn BlockDevice>,
        Err(e) => {
            failed_open = Some(e.to_string());
            panic!("queue pair: {e}");
        }
    });
    if let Some(e) = failed_open {
        bail!("creating a queue pair: {e}");
    }
    if failures > 0 {
        bail!("{failures} conformance case(s) failed on {n}");
    }
    println!("PASS conformance on {n}: every case");
    Ok(())
}

/// Object `i`: 1..16 blocks plus a tail, content derived from `i` and the offset.
fn object(i: u64) -> Vec<u8> {
    let len = 4096 * (1 + (i % 16) as usize) + (i % 7) as usize * 123;
    let mut seed = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

fn name(i: u64) -> String {
    format!("obj-{i:08}")
}

fn open_shard(n: &NvmeSpec) -> anyhow::Result<Shard<sluice_nvme::pcie::NvmeDevice>> {
    let ctrl = controller(n, 64)?;
    let cfg = StoreConfig::default();
    let pools = StorePools::with_options(&cfg, PoolOptions { hugepages: true })
        .context("DMA memory for the store")?;
    let dev = ctrl.queue_pair(n.nsid, &pools.all())?;
    let shard = Shard::open_with(dev, 0, cfg, Some(pools)).map_err(|f| f.error)?;
    let info = shard.replay_info();
    println!(
        "INFO store open: {} journal records replayed, torn tail {:?}",
        info.records, info.torn_tail
    );
    Ok(shard)
}

fn powercut_write(dev: &DeviceSpec) -> anyhow::Result<()> {
    let n = nvme(dev)?;
    let mut shard = open_shard(n)?;
    run_txn(&mut shard, Transaction { ops: vec![TxOp::CreateCollection { coll: COLL }] })
        .context("creating the collection (was the store made with sluice-osd mkfs?)")?;
    println!("INFO writing objects; ACK n means objects 0..=n are durable");
    const IN_FLIGHT: u64 = 8;
    let mut next = 0u64;
    let mut done: BTreeSet<u64> = BTreeSet::new();
    let mut acked: Option<u64> = None;
    let mut out = std::io::stdout().lock();
    loop {
        let floor = acked.map_or(0, |a| a + 1);
        while next < floor + IN_FLIGHT {
            let txn = Transaction {
                ops: vec![TxOp::WriteFull { coll: COLL, name: name(next), data: object(next) }],
            };
            shard.submit(txn, next)?;
            next += 1;
        }
        let mut err = None;
        let busy = shard.poll(&mut |e| match e {
            StoreEvent::Txn { token, result: Ok(_) } => {
                done.insert(token);
            }
            StoreEvent::Txn { token, result: Err(e) } => err = Some((token, e)),
            StoreEvent::Query { .. } => {}
        });
        if let Some((t, e)) = err {
            bail!("writing object {t}: {e}");
        }
        let mut moved = false;
        while done.remove(&acked.map_or(0, |a| a + 1)) {
            acked = Some(acked.map_or(0, |a| a + 1));
            moved = true;
        }
        if moved {
            writeln!(out, "ACK {}", acked.expect("moved"))?;
            out.flush()?;
        }
        if !busy {
            std::thread::yield_now();
        }
    }
}

/// Object `i`'s content, `None` if the store has no such object.
fn read_object(
    shard: &mut Shard<sluice_nvme::pcie::NvmeDevice>,
    i: u64,
) -> anyhow::Result<Option<Vec<u8>>> {
    match run_query(shard, Query::Read { coll: COLL, name: name(i), offset: 0, len: u64::MAX }) {
        Ok(Answer::Data(d)) => Ok(Some(d.data().to_vec())),
        Err(StoreError::NotFound(_)) => Ok(None),
        Ok(other) => bail!("object {i}: unexpected answer {other:?}"),
        Err(e) => bail!("object {i}: {e}"),
    }
}

fn powercut_verify(dev: &DeviceSpec, acked: u64) -> anyhow::Result<()> {
    let n = nvme(dev)?;
    let mut shard = open_shard(n)?;
    for i in 0..=acked {
        let Some(got) = read_object(&mut shard, i)? else {
            bail!("object {i} was acknowledged before the power cut and is lost");
        };
        if got != object(i) {
            bail!("object {i}: content differs ({} bytes, want {})", got.len(), object(i).len());
        }
    }
    // Writes in flight at the cut may or may not have made it; those that did are whole.
    let mut extra = 0;
    for i in acked + 1..acked + 1 + 64 {
        if let Some(got) = read_object(&mut shard, i)? {
            if got != object(i) {
                bail!("object {i} (in flight at the cut) is there but torn");
            }
            extra += 1;
        }
    }
    println!(
        "PASS powercut-verify: all {} acknowledged objects intact ({extra} more from writes in flight at the cut)",
        acked + 1
    );
    Ok(())
}

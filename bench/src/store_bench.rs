//! `sluice-bench store`: object transactions and reads through one store shard on its
//! reactor, in process (no network). Writes are durable: each is acknowledged after the
//! group-commit flush that covers it. Compare with `sluice-bench device` on the same file
//! system.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use serde_json::json;
use sluice_dataplane::park::ParkState;
use sluice_dataplane::reactor::{self, ReactorConfig};
use sluice_dataplane::store::{
    self, CollId, MkfsOptions, Query, Shard, StoreConfig, StoreEvent, StorePools, Transaction, TxOp,
};
use sluice_dataplane::{Context, PollResult, Poller};
use sluice_nvme::{BlockDevice, UringDevice, UringOptions};
use sluice_vocab::{ByteSize, Clock, CoreId, MonoTime, SystemClock, parse_duration};

use crate::common::ReactorArgs;
use crate::progress::Progress;
use crate::report::{Report, Results, new_histogram, process_cpu_time, unix_now_s};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreRw {
    /// Create new objects.
    Write,
    /// Read the prefilled objects in order.
    Read,
    Randread,
    /// Overwrite random prefilled objects.
    Randwrite,
    /// Random reads and overwrites (--rwmix-read).
    Mixed,
}

#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// Device file for the store (created and filled first if missing or sparse). Its
    /// content is destroyed: the benchmark makes a fresh store.
    #[arg(long)]
    pub path: PathBuf,
    #[arg(long, default_value = "4G")]
    pub dev_size: ByteSize,
    #[arg(long, value_enum)]
    pub rw: StoreRw,
    /// Object size.
    #[arg(long, default_value = "4k")]
    pub size: ByteSize,
    /// Operations kept in flight.
    #[arg(long, default_value_t = 32)]
    pub qd: usize,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub runtime: Duration,
    /// Objects written before a read or overwrite run (default: enough for half the
    /// store, at most a million).
    #[arg(long)]
    pub objects: Option<u64>,
    /// Percentage of reads for --rw mixed.
    #[arg(long, default_value_t = 50)]
    pub rwmix_read: u8,
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub reactor: ReactorArgs,
}

const COLL: CollId = CollId(1);

pub fn run(args: StoreArgs) -> anyhow::Result<()> {
    let size = args.size.0 as usize;
    if size == 0 || size > sluice_vocab::limits::MAX_TXN_DATA_BYTES {
        bail!("--size must be between 1 byte and 8M");
    }
    if args.qd == 0 || args.qd > 4096 {
        bail!("--qd must be between 1 and 4096");
    }
    crate::common::prepare_file(&args.path, args.dev_size, true)?;
    let mut dev =
        UringDevice::open(&args.path, UringOptions { queue_depth: 256, ..Default::default() })?;
    store::mkfs(&mut dev, &MkfsOptions { force: true, ..Default::default() })
        .with_context(|| format!("creating a store on {}", args.path.display()))?;
    let capacity = dev.info().size_bytes();
    drop(dev);
    let objects =
        args.objects.unwrap_or_else(|| (capacity / 2 / size.max(4096) as u64).clamp(1, 1_000_000));
    let cpu = args.reactor.pin(&args.path)?;
    let config = json!({
        "path": args.path, "dev_size_bytes": capacity, "rw": args.rw, "size_bytes": size, "qd": args.qd,
        "runtime_s": args.runtime.as_secs_f64(), "objects": objects, "rwmix_read": args.rwmix_read,
        "shards": 1, "cpu": cpu, "poll": format!("{:?}", args.reactor.mode()),
    });
    let shared = Arc::new(Shared::default());
    let started_at_unix_s = unix_now_s();
    let (path, rw, qd, runtime, mix, shared2) =
        (args.path.clone(), args.rw, args.qd, args.runtime, args.rwmix_read, Arc::clone(&shared));
    let handle = reactor::spawn(
        ReactorConfig { core: CoreId(0), cpu, mode: args.reactor.mode() },
        ParkState::new()?,
        move |r| {
            // The shard's DMA pools registered with the ring, as sluice-osd does.
            let cfg = StoreConfig::default();
            let pools = StorePools::new(&cfg)?;
            let opts =
                UringOptions { queue_depth: 256, fixed_pools: pools.all(), ..Default::default() };
            let dev = UringDevice::open(&path, opts).map_err(std::io::Error::other)?;
            let shard = Shard::open_with(dev, 0, cfg, Some(pools))
                .map_err(|f| std::io::Error::other(f.error.to_string()))?;
            r.add_poller(Box::new(Load::new(shard, rw, size, qd, objects, runtime, mix, shared2)))?;
            Ok(())
        },
    )?;
    let mut progress = None;
    while !shared.done.load(Ordering::Acquire) {
        if shared.measuring.load(Ordering::Acquire) && progress.is_none() && !args.quiet {
            progress = Some(Progress::start("store", Arc::clone(&shared.ios), size as u64));
        }
        if shared.failed.load(Ordering::Acquire) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(progress);
    let stats = handle.stop()?;
    let c = shared
        .collected
        .lock()
        .expect("lock")
        .take()
        .context("the store benchmark failed; see the messages above")?;
    let results = Results::from_histograms(
        &c.all,
        &c.read,
        &c.write,
        c.elapsed,
        c.cpu,
        stats.busy_share(),
        c.errors,
        size as u64,
    );
    let report = Report::new("store", &args.path, started_at_unix_s, config, results);
    report.print_table();
    println!("store: {}", c.store_stats);
    report.finish(args.json.as_deref(), "operations failed")?;
    Ok(())
}

#[derive(Default)]
struct Shared {
    ios: Arc<AtomicU64>,
    measuring: AtomicBool,
    done: AtomicBool,
    failed: AtomicBool,
    collected: Mutex<Option<Collected>>,
}

struct Collected {
    all: Histogram<u64>,
    read: Histogram<u64>,
    write: Histogram<u64>,
    elapsed: Duration,
    cpu: Duration,
    errors: u64,
    store_stats: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Setup,
    Prefill,
    Running,
    Draining,
    Done,
}

struct Load {
    shard: Shard<UringDevice>,
    rw: StoreRw,
    size: usize,
    qd: usize,
    objects: u64,
    runtime: Duration,
    rwmix_read: u8,
    phase: Phase,
    next_obj: u64,
    prefilled: u64,
    inflight: usize,
    /// Per token: (start ns, is_read).
    started: Vec<(u64, bool)>,
    free: Vec<u64>,
    payload: Vec<u8>,
    hist: [Histogram<u64>; 3],
    errors: u64,
    rng: u64,
    start: MonoTime,
    cpu_start: Duration,
    shared: Arc<Shared>,
    clock: SystemClock,
    /// Events of the current poll (kept for its capacity).
    events: Vec<StoreEvent>,
}

impl Load {
    #[allow(clippy::too_many_arguments)]
    fn new(
        shard: Shard<UringDevice>,
        rw: StoreRw,
        size: usize,
        qd: usize,
        objects: u64,
        runtime: Duration,
        rwmix_read: u8,
        shared: Arc<Shared>,
    ) -> Load {
        let slots = qd.max(128);
        Load {
            shard,
            rw,
            size,
            qd,
            objects,
            runtime,
            rwmix_read,
            phase: Phase::Setup,
            next_obj: 0,
            prefilled: 0,
            inflight: 0,
            started: vec![(0, false); slots],
            free: (0..slots as u64).rev().collect(),
            payload: (0..size).map(|i| (i * 31) as u8).collect(),
            hist: std::array::from_fn(|_| new_histogram()),
            errors: 0,
            rng: 0x9e37_79b9_7f4a_7c15,
            start: MonoTime::ZERO,
            cpu_start: Duration::ZERO,
            shared,
            clock: SystemClock,
            events: Vec::new(),
        }
    }

    fn random(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn write(&mut self, obj: u64, now: u64) {
        let token = self.free.pop().expect("slot");
        self.started[token as usize] = (now, false);
        let txn = Transaction {
            ops: vec![TxOp::WriteFull {
                coll: COLL,
                name: format!("o{obj}"),
                data: self.payload.clone(),
            }],
        };
        if let Err(e) = self.shard.submit(txn, token) {
            eprintln!("store refused a write: {e}");
            self.errors += 1;
            self.free.push(token);
            return;
        }
        self.inflight += 1;
    }

    fn read(&mut self, obj: u64, now: u64) {
        let token = self.free.pop().expect("slot");
        self.started[token as usize] = (now, true);
        self.shard.query(
            Query::Read { coll: COLL, name: format!("o{obj}"), offset: 0, len: self.size as u64 },
            token,
        );
        self.inflight += 1;
    }

    fn issue(&mut self, now: u64) {
        let (limit, prefill) = match self.phase {
            Phase::Prefill => (self.qd.max(64), true),
            Phase::Running => (self.qd, false),
            _ => return,
        };
        while self.inflight < limit {
            if prefill {
                if self.next_obj >= self.objects {
                    return;
                }
                let o = self.next_obj;
                self.next_obj += 1;
                self.write(o, now);
                continue;
            }
            match self.rw {
                StoreRw::Write => {
                    let o = self.next_obj;
                    self.next_obj += 1;
                    self.write(o, now);
                }
                StoreRw::Read => {
                    let o = self.next_obj % self.objects;
                    self.next_obj += 1;
                    self.read(o, now);
                }
                StoreRw::Randread => {
                    let o = self.random() % self.objects;
                    self.read(o, now);
                }
                StoreRw::Randwrite => {
                    let o = self.random() % self.objects;
                    self.write(o, now);
                }
                StoreRw::Mixed => {
                    let r = self.random();
                    let o = (r / 100) % self.objects;
                    if r % 100 < u64::from(self.rwmix_read) {
                        self.read(o, now)
                    } else {
                        self.write(o, now)
                    }
                }
            }
        }
    }

    fn finish(&mut self, now: MonoTime) {
        let [all, read, write] =
            std::mem::replace(&mut self.hist, std::array::from_fn(|_| new_histogram()));
        *self.shared.collected.lock().expect("lock") = Some(Collected {
            all,
            read,
            write,
            elapsed: now.saturating_sub(self.start),
            cpu: process_cpu_time() - self.cpu_start,
            errors: self.errors,
            store_stats: format!("{:?}", self.shard.stats()),
        });
        self.phase = Phase::Done;
        self.shared.done.store(true, Ordering::Release);
    }
}

impl Poller for Load {
    fn name(&self) -> &'static str {
        "store-load"
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> PollResult {
        if self.phase == Phase::Setup {
            let r = sluice_dataplane::store::blocking::run_txn(
                &mut self.shard,
                Transaction { ops: vec![TxOp::CreateCollection { coll: COLL }] },
            );
            if let Err(e) = r {
                eprintln!("cannot create the benchmark collection: {e}");
                self.shared.failed.store(true, Ordering::Release);
                self.phase = Phase::Done;
                return PollResult::Idle;
            }
            let needs_prefill = self.rw != StoreRw::Write;
            self.phase = if needs_prefill { Phase::Prefill } else { Phase::Running };
            if needs_prefill {
                eprintln!("prefill: writing {} objects of {} bytes", self.objects, self.size);
            } else {
                self.start = self.clock.now();
                self.cpu_start = process_cpu_time();
                self.shared.measuring.store(true, Ordering::Release);
            }
        }
        // The reactor reads the clock once per pass; the rare phase changes above and
        // below read it themselves.
        let now = cx.now;
        let mut events = std::mem::take(&mut self.events);
        let mut busy = self.shard.poll(&mut |e| events.push(e));
        for e in events.drain(..) {
            let (token, ok, is_read) = match e {
                StoreEvent::Txn { token, result } => {
                    if let Err(e) = &result {
                        eprintln!("write failed: {e}");
                    }
                    (token, result.is_ok(), false)
                }
                StoreEvent::Query { token, result } => {
                    if let Err(e) = &result {
                        eprintln!("read failed: {e}");
                    }
                    (token, result.is_ok(), true)
                }
            };
            self.inflight -= 1;
            self.free.push(token);
            if !ok {
                self.errors += 1;
            }
            match self.phase {
                Phase::Prefill => self.prefilled += 1,
                Phase::Running | Phase::Draining => {
                    let lat = now.as_nanos().saturating_sub(self.started[token as usize].0).max(1);
                    let _ = self.hist[0].record(lat);
                    let _ = self.hist[if is_read { 1 } else { 2 }].record(lat);
                    self.shared.ios.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        self.events = events;
        if self.phase == Phase::Prefill && self.prefilled == self.objects {
            self.phase = Phase::Running;
            self.next_obj = if self.rw == StoreRw::Write { self.objects } else { 0 };
            self.start = self.clock.now();
            self.cpu_start = process_cpu_time();
            self.shared.measuring.store(true, Ordering::Release);
        }
        if self.phase == Phase::Running && now.saturating_sub(self.start) >= self.runtime {
            self.phase = Phase::Draining;
        }
        let before = self.inflight;
        self.issue(now.as_nanos());
        busy |= self.inflight != before;
        if self.phase == Phase::Draining && self.inflight == 0 {
            self.finish(self.clock.now());
        }
        PollResult::busy_if(busy)
    }

    fn prepare_park(&mut self) -> bool {
        self.shard.prepare_park()
    }

    fn after_park(&mut self) {
        self.shard.after_park()
    }

    fn device_in_flight(&self) -> usize {
        self.shard.device_in_flight()
    }

    fn park_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.shard.park_fd()
    }
}

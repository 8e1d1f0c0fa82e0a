//! `sluice-bench device`: drives one `UringDevice` queue pair from one reactor, the way
//! the OSD will, and reports what the raw device does. Every other benchmark is divided
//! by this one.

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
use sluice_dataplane::{Context, PollResult, Poller};
use sluice_nvme::{
    AnyDevice, BlockDevice, DeviceOptions, DeviceSpec, DmaPool, IoCommand, OpKind, Opener,
    PoolOptions, TaskRun, UringDevice, UringOptions,
};
use sluice_vocab::limits::BLOCK_SIZE_BYTES;
use sluice_vocab::{BlockCount, ByteSize, CoreId, Lba, MonoTime, parse_duration};

use crate::common::ReactorArgs;
use crate::progress::Progress;
use crate::report::{OpResults, Report, Results, new_histogram, process_cpu_time, unix_now_s};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rw {
    Read,
    Write,
    Randread,
    Randwrite,
    Randrw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TaskRunArg {
    /// COOP_TASKRUN: the reactor collects completions when it polls (no IPIs).
    Cooperative,
    /// io_uring's default: the kernel interrupts the reactor for every completion.
    Interrupt,
}

#[derive(Debug, Clone, Args)]
pub struct DeviceArgs {
    /// The device: a file or block device (a missing or sparse file is created and
    /// filled first), or an NVMe namespace over VFIO, `nvme://PCI-ADDRESS/NSID` (see
    /// docs/bare-metal.md).
    #[arg(long = "dev", visible_alias = "path")]
    pub dev: DeviceSpec,
    /// Size of the device file to create (ignored for existing files and block devices).
    #[arg(long, default_value = "4G")]
    pub dev_size: ByteSize,
    /// Access pattern.
    #[arg(long, value_enum)]
    pub rw: Rw,
    /// Bytes per I/O (a multiple of 4k).
    #[arg(long, default_value = "4k")]
    pub bs: ByteSize,
    /// I/Os kept in flight.
    #[arg(long, default_value_t = 32)]
    pub qd: usize,
    /// How long to measure.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub runtime: Duration,
    /// Flush after every N writes (like fio --fsync=N): stop issuing, drain, flush.
    #[arg(long, default_value_t = 0)]
    pub flush_every: u64,
    /// Percentage of reads for --rw randrw.
    #[arg(long, default_value_t = 50)]
    pub rwmix_read: u8,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Use the kernel SQ polling thread (costs a CPU).
    #[arg(long)]
    pub sqpoll: bool,
    /// Use polled completions (needs a block device with io_poll).
    #[arg(long)]
    pub iopoll: bool,
    /// Go through the page cache instead of O_DIRECT.
    #[arg(long)]
    pub no_direct: bool,
    /// How the kernel hands completions to the polling reactor.
    #[arg(long, value_enum, default_value = "cooperative")]
    pub taskrun: TaskRunArg,
    /// Seed for random offsets.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// NVMe over VFIO: DMA memory from 4 KiB pages instead of 2 MiB hugepages.
    #[arg(long)]
    pub no_hugepages: bool,
    /// No live progress line.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub reactor: ReactorArgs,
}

/// A queue pair over io_uring on a file (prepared first) or block device.
fn open_file_device(
    path: &std::path::Path,
    args: &DeviceArgs,
    bs: usize,
) -> anyhow::Result<(AnyDevice, DmaPool)> {
    crate::common::prepare_file(path, args.dev_size, !args.no_direct)?;
    let pool = DmaPool::new(bs, args.qd, Default::default()).context("allocating DMA buffers")?;
    let opts = UringOptions {
        queue_depth: args.qd.max(2),
        direct: !args.no_direct,
        sqpoll_idle_ms: args.sqpoll.then_some(50),
        iopoll: args.iopoll,
        fixed_pools: vec![pool.clone()],
        taskrun: match args.taskrun {
            TaskRunArg::Cooperative => TaskRun::Cooperative,
            TaskRunArg::Interrupt => TaskRun::Interrupt,
        },
        ..Default::default()
    };
    Ok((AnyDevice::Uring(UringDevice::open(path, opts)?), pool))
}

pub fn run(args: DeviceArgs) -> anyhow::Result<()> {
    let bs = args.bs.0 as usize;
    if bs == 0
        || !bs.is_multiple_of(BLOCK_SIZE_BYTES)
        || bs > sluice_vocab::limits::MAX_TRANSFER_BYTES
    {
        bail!("--bs must be a multiple of 4k up to 1M (got {})", args.bs);
    }
    if args.qd == 0 || args.qd > 1024 {
        bail!("--qd must be between 1 and 1024 (got {})", args.qd);
    }
    if args.rwmix_read > 100 {
        bail!("--rwmix-read is a percentage (got {})", args.rwmix_read);
    }
    let name = args.dev.to_string();
    let path = std::path::Path::new(&name);
    let (dev, pool) = match &args.dev {
        DeviceSpec::Path(p) => open_file_device(p, &args, bs)?,
        DeviceSpec::Nvme(_) => {
            if args.sqpoll || args.iopoll || args.no_direct {
                bail!("--sqpoll, --iopoll and --no-direct apply to io_uring devices, not {name}");
            }
            let opts = DeviceOptions {
                hugepages: !args.no_hugepages,
                nvme_queues: 1,
                ..DeviceOptions::default()
            };
            let opener = Opener::open(&args.dev, &opts).map_err(anyhow::Error::msg)?;
            let pool = DmaPool::new(bs, args.qd, PoolOptions { hugepages: !args.no_hugepages })
                .context("allocating DMA buffers")?;
            let dev = opener.queue_pair(args.qd, vec![pool.clone()]).map_err(anyhow::Error::msg)?;
            if dev.info().queue_depth < args.qd {
                bail!(
                    "{name}: the controller's queues hold {} commands, fewer than --qd {}",
                    dev.info().queue_depth,
                    args.qd
                );
            }
            (dev, pool)
        }
    };
    let span = dev.info().num_blocks / (bs / BLOCK_SIZE_BYTES) as u64;
    if span == 0 {
        bail!("{name} is smaller than one {bs}-byte I/O");
    }
    let cpu = args.reactor.pin(path)?;
    let config = json!({
        "path": name,
        "dev_size_bytes": dev.info().size_bytes(),
        "rw": args.rw,
        "bs_bytes": bs,
        "qd": args.qd,
        "runtime_s": args.runtime.as_secs_f64(),
        "flush_every": args.flush_every,
        "rwmix_read": args.rwmix_read,
        "direct": !args.no_direct,
        "sqpoll": args.sqpoll,
        "iopoll": args.iopoll,
        "taskrun": format!("{:?}", args.taskrun),
        "cpu": cpu,
        "poll": format!("{:?}", args.reactor.mode()),
        "seed": args.seed,
    });
    let shared = Arc::new(Shared::default());
    let load = Load::new(dev, pool, &args, span, Arc::clone(&shared));
    let cfg = ReactorConfig { core: CoreId(0), cpu, mode: args.reactor.mode() };
    let started_at_unix_s = unix_now_s();
    let handle = reactor::spawn(cfg, ParkState::new()?, move |r| {
        r.add_poller(Box::new(load))?;
        Ok(())
    })?;
    let progress =
        (!args.quiet).then(|| Progress::start("device", Arc::clone(&shared.ios), bs as u64));
    while !shared.done.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(progress);
    let stats = handle.stop()?;
    let c = shared
        .collected
        .lock()
        .expect("results lock")
        .take()
        .context("benchmark produced no results")?;
    let mut results = Results::from_histograms(
        &c.all,
        &c.read,
        &c.write,
        c.elapsed,
        c.cpu,
        stats.busy_share(),
        c.errors,
        bs as u64,
    );
    let ops = |h: &Histogram<u64>| {
        (!h.is_empty()).then(|| OpResults::from_histogram(h, c.elapsed, bs as u64))
    };
    results.flush = ops(&c.flush).map(|mut o| {
        o.bytes_per_sec = 0.0;
        o
    });
    results.durable_write = ops(&c.durable);
    let report = Report::new("device", path, started_at_unix_s, config, results);
    report.print_table();
    report.finish(args.json.as_deref(), "I/O errors")?;
    Ok(())
}

#[derive(Default)]
struct Shared {
    ios: Arc<AtomicU64>,
    done: AtomicBool,
    collected: Mutex<Option<Collected>>,
}

struct Collected {
    all: Histogram<u64>,
    read: Histogram<u64>,
    write: Histogram<u64>,
    flush: Histogram<u64>,
    durable: Histogram<u64>,
    elapsed: Duration,
    cpu: Duration,
    errors: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Starting,
    Running,
    Draining,
    Done,
}

/// The load generator: keeps `qd` I/Os in flight until the deadline.
struct Load {
    dev: AnyDevice,
    pool: DmaPool,
    rw: Rw,
    rwmix_read: u8,
    bs_blocks: u64,
    span: u64,
    qd: usize,
    flush_every: u64,
    runtime: Duration,
    rng: u64,
    seq_next: u64,
    /// Per tag: submission time and kind.
    submitted_ns: Vec<u64>,
    kind: Vec<OpKind>,
    free_tags: Vec<u64>,
    writes_since_flush: u64,
    writes_in_flight: u64,
    flush_in_flight: bool,
    /// Submission times of completed writes not yet covered by a flush.
    unflushed: Vec<u64>,
    /// Those covered by the flush in flight.
    covered: Vec<u64>,
    hist: [Histogram<u64>; 5],
    errors: u64,
    phase: Phase,
    start: MonoTime,
    cpu_start: Duration,
    shared: Arc<Shared>,
}

const H_ALL: usize = 0;
const H_READ: usize = 1;
const H_WRITE: usize = 2;
const H_FLUSH: usize = 3;
const H_DURABLE: usize = 4;
const FLUSH_TAG_BIT: u64 = 1 << 63;

impl Load {
    fn new(
        dev: AnyDevice,
        pool: DmaPool,
        args: &DeviceArgs,
        span: u64,
        shared: Arc<Shared>,
    ) -> Load {
        let qd = args.qd;
        Load {
            dev,
            pool,
            rw: args.rw,
            rwmix_read: args.rwmix_read,
            bs_blocks: args.bs.0 / BLOCK_SIZE_BYTES as u64,
            span,
            qd,
            flush_every: args.flush_every,
            runtime: args.runtime,
            rng: args.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            seq_next: 0,
            submitted_ns: vec![0; qd],
            kind: vec![OpKind::Read; qd],
            free_tags: (0..qd as u64).rev().collect(),
            writes_since_flush: 0,
            writes_in_flight: 0,
            flush_in_flight: false,
            unflushed: Vec::with_capacity(1024),
            covered: Vec::with_capacity(1024),
            hist: std::array::from_fn(|_| new_histogram()),
            errors: 0,
            phase: Phase::Starting,
            start: MonoTime::ZERO,
            cpu_start: Duration::ZERO,
            shared,
        }
    }

    /// xorshift64*: fast, and reproducible from the seed.
    fn next_random(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn next_io(&mut self) -> (OpKind, Lba) {
        let (kind, unit) = match self.rw {
            Rw::Read | Rw::Write => {
                let u = self.seq_next;
                self.seq_next = (self.seq_next + 1) % self.span;
                (if self.rw == Rw::Read { OpKind::Read } else { OpKind::Write }, u)
            }
            Rw::Randread => (OpKind::Read, self.next_random() % self.span),
            Rw::Randwrite => (OpKind::Write, self.next_random() % self.span),
            Rw::Randrw => {
                let r = self.next_random();
                let kind = if (r % 100) < u64::from(self.rwmix_read) {
                    OpKind::Read
                } else {
                    OpKind::Write
                };
                (kind, (r / 100) % self.span)
            }
        };
        (kind, Lba(unit * self.bs_blocks))
    }

    fn reap(&mut self, now_ns: u64) -> u64 {
        let Load {
            dev,
            submitted_ns,
            kind,
            free_tags,
            hist,
            errors,
            unflushed,
            covered,
            flush_in_flight,
            writes_since_flush,
            writes_in_flight,
            flush_every,
            ..
        } = self;
        let mut n = 0;
        dev.poll(usize::MAX, &mut |c| {
            if c.result.is_err() {
                *errors += 1;
            }
            if c.tag & FLUSH_TAG_BIT != 0 {
                let lat = now_ns - (c.tag & !FLUSH_TAG_BIT);
                let _ = hist[H_FLUSH].record(lat.max(1));
                for start in covered.drain(..) {
                    let _ = hist[H_DURABLE].record((now_ns - start).max(1));
                }
                *flush_in_flight = false;
                return;
            }
            let tag = c.tag as usize;
            let lat = (now_ns - submitted_ns[tag]).max(1);
            let _ = hist[H_ALL].record(lat);
            match kind[tag] {
                OpKind::Write => {
                    let _ = hist[H_WRITE].record(lat);
                    *writes_in_flight -= 1;
                    if *flush_every > 0 {
                        unflushed.push(submitted_ns[tag]);
                        *writes_since_flush += 1;
                    }
                }
                _ => {
                    let _ = hist[H_READ].record(lat);
                }
            }
            // The buffer goes back to the pool when `c` drops at the end of this closure.
            free_tags.push(c.tag);
            n += 1;
        });
        n
    }

    fn submit_more(&mut self, now_ns: u64) {
        let flushing = self.flush_every > 0
            && self.writes_since_flush + self.writes_in_flight >= self.flush_every;
        if flushing {
            // Like fio --fsync: stop, let in-flight I/O finish, flush, go on.
            if !self.flush_in_flight && self.dev.in_flight() == 0 {
                self.covered.append(&mut self.unflushed);
                self.writes_since_flush = 0;
                self.flush_in_flight = true;
                self.dev
                    .submit(IoCommand::Flush, None, FLUSH_TAG_BIT | now_ns)
                    .expect("flush submit");
            }
            return;
        }
        while self.dev.in_flight() < self.qd {
            let Some(tag) = self.free_tags.pop() else { break };
            let (kind, lba) = self.next_io();
            let buf = self.pool.alloc().expect("one buffer per tag");
            let blocks = BlockCount(self.bs_blocks);
            let cmd = match kind {
                OpKind::Read => IoCommand::Read { lba, blocks },
                _ => IoCommand::Write { lba, blocks, fua: false },
            };
            self.submitted_ns[tag as usize] = now_ns;
            self.kind[tag as usize] = kind;
            self.dev.submit(cmd, Some(buf), tag).expect("submit within queue depth");
            if kind == OpKind::Write {
                self.writes_in_flight += 1;
                if self.flush_every > 0
                    && self.writes_since_flush + self.writes_in_flight >= self.flush_every
                {
                    // The flush budget is used up: no more I/O until the flush.
                    break;
                }
            }
        }
    }

    fn finish(&mut self, now: MonoTime) {
        let elapsed = now.saturating_sub(self.start);
        let [all, read, write, flush, durable] =
            std::mem::replace(&mut self.hist, std::array::from_fn(|_| new_histogram()));
        let c = Collected {
            all,
            read,
            write,
            flush,
            durable,
            elapsed,
            cpu: process_cpu_time() - self.cpu_start,
            errors: self.errors,
        };
        *self.shared.collected.lock().expect("results lock") = Some(c);
        self.phase = Phase::Done;
        self.shared.done.store(true, Ordering::Release);
    }
}

impl Poller for Load {
    fn name(&self) -> &'static str {
        "device-load"
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> PollResult {
        // The reactor reads the clock once per pass.
        let now = cx.now;
        match self.phase {
            Phase::Done => return PollResult::Idle,
            Phase::Starting => {
                self.start = now;
                self.cpu_start = process_cpu_time();
                self.phase = Phase::Running;
            }
            _ => {}
        }
        let reaped = self.reap(now.as_nanos());
        if reaped > 0 {
            self.shared.ios.fetch_add(reaped, Ordering::Relaxed);
        }
        if self.phase == Phase::Running && now.saturating_sub(self.start) >= self.runtime {
            self.phase = Phase::Draining;
        }
        let before = self.dev.in_flight();
        if self.phase == Phase::Running {
            self.submit_more(now.as_nanos());
        }
        let submitted = self.dev.in_flight() > before;
        if submitted && let Err(e) = self.dev.kick() {
            eprintln!("device error: {e}");
            self.errors += 1;
        }
        if self.phase == Phase::Draining && self.dev.in_flight() == 0 {
            self.finish(now);
        }
        PollResult::busy_if(reaped > 0 || submitted)
    }

    fn prepare_park(&mut self) -> bool {
        self.dev.prepare_park()
    }

    fn after_park(&mut self) {
        self.dev.after_park()
    }

    fn device_in_flight(&self) -> usize {
        self.dev.in_flight()
    }

    fn park_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.dev.park_fd()
    }
}

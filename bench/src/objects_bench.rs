//! `sluice-bench objects`: object I/O against a running cluster through the client
//! library, `--threads` threads each keeping `--qd` ops in flight. Reports the same
//! schema as `device` and `store`, plus the OSDs' CPU time per I/O when the OSDs run on
//! this machine (read from /proc for every `sluice-osd` process).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use rand::Rng;
use serde_json::json;
use sluice_client::{Cluster, Completion, Op, Options, Output};
use sluice_vocab::{ByteSize, parse_duration};

use crate::progress::Progress;
use crate::report::{Report, Results, new_histogram, process_cpu_time, unix_now_s};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjRw {
    /// Overwrite the objects in order, round and round.
    Write,
    /// Read the prefilled objects in order.
    Read,
    Randread,
    /// Overwrite random objects.
    Randwrite,
    /// Random reads and overwrites (--rwmix-read).
    Mixed,
}

#[derive(Debug, Args)]
pub struct ObjectsArgs {
    /// Cluster configuration (sluice.conf).
    #[arg(short = 'c', long = "conf")]
    pub conf: PathBuf,
    /// Who to authenticate as (default: the configuration's `name`, else client.admin).
    #[arg(short = 'n', long = "name")]
    pub name: Option<String>,
    /// That entity's keyring (default: the configuration's).
    #[arg(long)]
    pub keyring: Option<PathBuf>,
    /// Pool to use (it must exist).
    #[arg(long)]
    pub pool: String,
    #[arg(long, value_enum)]
    pub rw: ObjRw,
    /// Object size (each op writes or reads a whole object).
    #[arg(long, default_value = "4k")]
    pub size: ByteSize,
    /// Ops in flight per thread.
    #[arg(long, default_value_t = 32)]
    pub qd: usize,
    /// Client threads, each with its own sessions.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Objects per thread (written first, unmeasured, for reads).
    #[arg(long, default_value_t = 1024)]
    pub objects: u64,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub runtime: Duration,
    /// Percentage of reads for --rw mixed.
    #[arg(long, default_value_t = 50)]
    pub rwmix_read: u8,
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
}

/// CPU time (user + system) of every live `sluice-osd` process on this machine, by pid
/// (a zombie, e.g. an OSD just killed and not yet reaped, is skipped: its time would
/// vanish mid-run).
fn osd_cpu() -> Option<std::collections::BTreeMap<u32, Duration>> {
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??.max(1) as u64;
    let mut out = std::collections::BTreeMap::new();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let p = e.path();
        if std::fs::read_to_string(p.join("comm")).is_ok_and(|c| c.trim() == "sluice-osd")
            && let Ok(stat) = std::fs::read_to_string(p.join("stat"))
        {
            // Fields after the ")" that ends the command name: the state is the 3rd field
            // of the line, utime the 14th, stime the 15th.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<&str> = rest.split_whitespace().collect();
            if let (Some(state), Some(u), Some(s)) = (f.first(), f.get(11), f.get(12))
                && *state != "Z"
            {
                let t = u.parse::<u64>().unwrap_or(0) + s.parse::<u64>().unwrap_or(0);
                out.insert(pid, Duration::from_nanos(t * 1_000_000_000 / tick));
            }
        }
    }
    (!out.is_empty()).then_some(out)
}

/// CPU the OSDs used between two samples (processes in both), and how many there were.
fn osd_cpu_delta(
    a: &std::collections::BTreeMap<u32, Duration>,
    b: &std::collections::BTreeMap<u32, Duration>,
) -> (Duration, usize) {
    let both: Vec<_> =
        a.iter().filter_map(|(pid, t0)| Some(b.get(pid)?.saturating_sub(*t0))).collect();
    (both.iter().sum(), both.len())
}

struct ThreadResult {
    all: Histogram<u64>,
    read: Histogram<u64>,
    write: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
}

pub fn run(args: ObjectsArgs) -> anyhow::Result<()> {
    let size = args.size.0 as usize;
    if size > sluice_net::ops::MAX_WRITE_BYTES {
        bail!(
            "--size must be at most {} (one op)",
            ByteSize(sluice_net::ops::MAX_WRITE_BYTES as u64)
        );
    }
    if args.qd == 0 || args.qd > 4096 || args.threads == 0 || args.threads > 256 {
        bail!("--qd must be 1..=4096 and --threads 1..=256");
    }
    if args.objects == 0 {
        bail!("--objects must be at least 1");
    }
    let opts = Options {
        op_timeout: Duration::from_secs(60),
        name: args.name.clone(),
        keyring: args.keyring.clone(),
        ..Options::default()
    };
    let cluster = Cluster::connect_file(&args.conf, opts)?;
    if cluster.map().pool_by_name(&args.pool).is_none() {
        bail!("no pool {:?} (create it with `sluice pool create`)", args.pool);
    }
    let config = json!({
        "conf": args.conf, "auth": cluster.entity().map(|e| e.to_string()), "pool": args.pool, "rw": args.rw, "size_bytes": size, "qd": args.qd,
        "threads": args.threads, "objects_per_thread": args.objects,
        "runtime_s": args.runtime.as_secs_f64(), "rwmix_read": args.rwmix_read,
        "osds": cluster.map().osds.len(), "epoch": cluster.map().epoch,
    });
    let data: Arc<[u8]> = (0..size).map(|i| (i * 7 + 1) as u8).collect::<Vec<u8>>().into();
    // Prefill (unmeasured) when the run reads.
    if args.rw != ObjRw::Write && args.rw != ObjRw::Randwrite {
        if !args.quiet {
            eprintln!("prefilling {} objects of {}", args.objects * args.threads as u64, args.size);
        }
        std::thread::scope(|s| -> anyhow::Result<()> {
            let hs: Vec<_> = (0..args.threads)
                .map(|t| {
                    let (cluster, data, pool) = (cluster.clone(), Arc::clone(&data), &args.pool);
                    let (n, qd) = (args.objects, args.qd);
                    s.spawn(move || -> anyhow::Result<()> {
                        let mut io = cluster.io();
                        let mut done = Vec::new();
                        let mut next = 0;
                        while next < n || io.in_flight() > 0 {
                            while next < n && io.in_flight() < qd {
                                io.submit(pool, &name(t, next), Op::WriteFull(Arc::clone(&data)))?;
                                next += 1;
                            }
                            done.clear();
                            io.poll(Duration::from_secs(1), &mut done);
                            if let Some(Completion { result: Err(e), .. }) =
                                done.iter().find(|c| c.result.is_err())
                            {
                                bail!("prefill: {e}");
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in hs {
                h.join().expect("prefill thread")?;
            }
            Ok(())
        })?;
    }
    let ios = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let progress = (!args.quiet).then(|| Progress::start("objects", Arc::clone(&ios), size as u64));
    let started_at_unix_s = unix_now_s();
    let cpu0 = process_cpu_time();
    let osd0 = osd_cpu();
    let t0 = Instant::now();
    let results: Vec<ThreadResult> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..args.threads)
            .map(|t| {
                let (cluster, data, pool) = (cluster.clone(), Arc::clone(&data), &args.pool);
                let (ios, stop) = (Arc::clone(&ios), Arc::clone(&stop));
                let (n, qd, rw, mix) = (args.objects, args.qd, args.rw, args.rwmix_read);
                s.spawn(move || worker(cluster, data, pool, t, n, qd, rw, mix, ios, stop))
            })
            .collect();
        std::thread::sleep(args.runtime);
        stop.store(true, Ordering::Release);
        hs.into_iter().map(|h| h.join().expect("worker thread")).collect()
    });
    let elapsed = t0.elapsed();
    let cpu = process_cpu_time().saturating_sub(cpu0);
    let osd1 = osd_cpu();
    drop(progress);
    let (mut all, mut read, mut write) = (new_histogram(), new_histogram(), new_histogram());
    let mut errors = 0;
    for r in &results {
        all.add(&r.all).expect("same bounds");
        read.add(&r.read).expect("same bounds");
        write.add(&r.write).expect("same bounds");
        errors += r.errors;
        if let Some(e) = &r.first_error {
            eprintln!("first error: {e}");
        }
    }
    let mut results =
        Results::from_histograms(&all, &read, &write, elapsed, cpu, 0.0, errors, size as u64);
    if let (Some(a), Some(b)) = (&osd0, &osd1)
        && !all.is_empty()
    {
        let (used, n) = osd_cpu_delta(a, b);
        let per = used.as_secs_f64() * 1e6 / all.len() as f64;
        results.osd_cpu_us_per_io = Some(per);
        results.osd_processes = Some(n);
    }
    let report = Report::new("objects", &args.conf, started_at_unix_s, config, results);
    report.print_table();
    if let Some(c) = report.results.osd_cpu_us_per_io {
        println!(
            "OSD CPU per I/O: {c:.1} us ({} sluice-osd process(es) on this machine; /proc ticks of 10 ms)",
            report.results.osd_processes.unwrap_or(0)
        );
    }
    report.finish(args.json.as_deref(), "operations failed")
}

fn name(thread: usize, i: u64) -> String {
    format!("bench-{thread}-{i}")
}

#[allow(clippy::too_many_arguments)]
fn worker(
    cluster: Cluster,
    data: Arc<[u8]>,
    pool: &str,
    t: usize,
    n: u64,
    qd: usize,
    rw: ObjRw,
    mix: u8,
    ios: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> ThreadResult {
    let mut io = cluster.io();
    let mut rng = rand::thread_rng();
    let mut res = ThreadResult {
        all: new_histogram(),
        read: new_histogram(),
        write: new_histogram(),
        errors: 0,
        first_error: None,
    };
    // tid -> (start, is_read)
    let mut started: std::collections::HashMap<u64, (Instant, bool)> = Default::default();
    let mut seq = 0u64;
    let mut done = Vec::new();
    let size = data.len() as u64;
    loop {
        let stopping = stop.load(Ordering::Acquire);
        while !stopping && io.in_flight() < qd {
            let (i, is_read) = match rw {
                ObjRw::Write => (seq % n, false),
                ObjRw::Read => (seq % n, true),
                ObjRw::Randread => (rng.gen_range(0..n), true),
                ObjRw::Randwrite => (rng.gen_range(0..n), false),
                ObjRw::Mixed => (rng.gen_range(0..n), rng.gen_range(0..100) < mix),
            };
            seq += 1;
            let op = if is_read {
                Op::Read { offset: 0, len: size.max(1) }
            } else {
                Op::WriteFull(Arc::clone(&data))
            };
            match io.submit(pool, &name(t, i), op) {
                Ok(tid) => {
                    started.insert(tid, (Instant::now(), is_read));
                }
                Err(e) => {
                    res.errors += 1;
                    res.first_error.get_or_insert(e.to_string());
                    break;
                }
            }
        }
        if stopping && io.in_flight() == 0 {
            return res;
        }
        done.clear();
        io.poll(Duration::from_millis(100), &mut done);
        let now = Instant::now();
        for c in &done {
            let Some((t0, is_read)) = started.remove(&c.tid) else { continue };
            match &c.result {
                Ok(Output::Written { .. }) | Ok(Output::Data(_)) => {
                    if stopping {
                        continue; // finished after the runtime: not counted
                    }
                    let ns = now.duration_since(t0).as_nanos() as u64;
                    res.all.saturating_record(ns);
                    if is_read { &mut res.read } else { &mut res.write }.saturating_record(ns);
                    ios.fetch_add(1, Ordering::Relaxed);
                }
                r => {
                    res.errors += 1;
                    res.first_error.get_or_insert(format!("{r:?}"));
                }
            }
        }
    }
}

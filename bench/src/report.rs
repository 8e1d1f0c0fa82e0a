//! The report every Sluice benchmark prints and writes as JSON (`docs/benchmarks.md`
//! documents the schema). `device`, `store` and `objects` all fill the same shape, so
//! their figures can be divided by each other.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::machine::Machine;

pub const SCHEMA: &str = "sluice-bench/1";

/// Latency and throughput of one class of operation.
#[derive(Debug, Clone, Serialize)]
pub struct OpResults {
    pub ios: u64,
    pub iops: f64,
    pub bytes_per_sec: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl OpResults {
    /// From a histogram of nanoseconds over `elapsed`, `bytes_per_io` each.
    pub fn from_histogram(h: &Histogram<u64>, elapsed: Duration, bytes_per_io: u64) -> OpResults {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let ios = h.len();
        let q = |p: f64| if ios == 0 { 0.0 } else { h.value_at_quantile(p) as f64 / 1e3 };
        OpResults {
            ios,
            iops: ios as f64 / secs,
            bytes_per_sec: (ios * bytes_per_io) as f64 / secs,
            mean_us: if ios == 0 { 0.0 } else { h.mean() / 1e3 },
            p50_us: q(0.50),
            p90_us: q(0.90),
            p99_us: q(0.99),
            p999_us: q(0.999),
            max_us: if ios == 0 { 0.0 } else { h.max() as f64 / 1e3 },
        }
    }
}

/// The headline results: all data operations together, plus breakdowns.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub runtime_s: f64,
    pub ios: u64,
    pub iops: f64,
    pub bytes_per_sec: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// Process CPU time (user + system, all threads) per I/O.
    pub cpu_us_per_io: f64,
    /// Share of the reactors' awake time spent doing work (0..1).
    pub busy_share: f64,
    pub errors: u64,
    /// CPU time of the OSD processes on this machine per I/O (`objects` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub osd_cpu_us_per_io: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub osd_processes: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read: Option<OpResults>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write: Option<OpResults>,
    /// Flush commands, when the workload issues them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flush: Option<OpResults>,
    /// Time from a write's submission to the completion of the flush that made it
    /// durable, when the workload flushes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub durable_write: Option<OpResults>,
}

impl Results {
    /// Results from the histograms of all I/Os and of reads and writes (each kind
    /// appears only if it happened); `bytes_per_io` sizes the MB/s figures.
    #[allow(clippy::too_many_arguments)]
    pub fn from_histograms(
        all: &Histogram<u64>,
        read: &Histogram<u64>,
        write: &Histogram<u64>,
        elapsed: Duration,
        cpu: Duration,
        busy_share: f64,
        errors: u64,
        bytes_per_io: u64,
    ) -> Results {
        let ops = |h: &Histogram<u64>| {
            (!h.is_empty()).then(|| OpResults::from_histogram(h, elapsed, bytes_per_io))
        };
        let all = OpResults::from_histogram(all, elapsed, bytes_per_io);
        let mut r = Results::new(&all, elapsed, cpu, busy_share, errors);
        r.read = ops(read);
        r.write = ops(write);
        r
    }

    pub fn new(
        all: &OpResults,
        elapsed: Duration,
        cpu: Duration,
        busy_share: f64,
        errors: u64,
    ) -> Results {
        Results {
            runtime_s: elapsed.as_secs_f64(),
            ios: all.ios,
            iops: all.iops,
            bytes_per_sec: all.bytes_per_sec,
            mean_us: all.mean_us,
            p50_us: all.p50_us,
            p90_us: all.p90_us,
            p99_us: all.p99_us,
            p999_us: all.p999_us,
            max_us: all.max_us,
            cpu_us_per_io: if all.ios == 0 {
                0.0
            } else {
                cpu.as_secs_f64() * 1e6 / all.ios as f64
            },
            busy_share,
            errors,
            osd_cpu_us_per_io: None,
            osd_processes: None,
            read: None,
            write: None,
            flush: None,
            durable_write: None,
        }
    }
}

/// One benchmark run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: &'static str,
    /// `device`, `store`, `objects`, `reactor`.
    pub kind: &'static str,
    pub commit: &'static str,
    /// Seconds since the Unix epoch at the start.
    pub started_at_unix_s: u64,
    pub machine: Machine,
    pub config: serde_json::Value,
    pub results: Results,
}

impl Report {
    /// A report of `kind` for a run on `path` that started at `started_at_unix_s`.
    pub fn new(
        kind: &'static str,
        path: &std::path::Path,
        started_at_unix_s: u64,
        config: serde_json::Value,
        results: Results,
    ) -> Report {
        Report {
            schema: SCHEMA,
            kind,
            commit: env!("SLUICE_COMMIT"),
            started_at_unix_s,
            machine: Machine::probe(Some(path)),
            config,
            results,
        }
    }

    /// Writes the JSON report if asked, then fails if any operation failed (saying
    /// `what` failed).
    pub fn finish(&self, json: Option<&std::path::Path>, what: &str) -> anyhow::Result<()> {
        if let Some(p) = json {
            self.write_json(p)?;
            println!("report written to {}", p.display());
        }
        if self.results.errors > 0 {
            anyhow::bail!("{} {what} during the run", self.results.errors);
        }
        Ok(())
    }

    /// Prints the human-readable table.
    pub fn print_table(&self) {
        let r = &self.results;
        println!();
        println!("{} benchmark, {:.1} s, commit {}", self.kind, r.runtime_s, short(self.commit));
        println!(
            "{:<14} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "op", "IOPS", "MB/s", "mean us", "p50 us", "p90 us", "p99 us", "p99.9 us", "max us"
        );
        let row = |name: &str, o: &OpResults| {
            println!(
                "{:<14} {:>10.0} {:>10.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
                name,
                o.iops,
                o.bytes_per_sec / 1e6,
                o.mean_us,
                o.p50_us,
                o.p90_us,
                o.p99_us,
                o.p999_us,
                o.max_us
            )
        };
        let all = OpResults {
            ios: r.ios,
            iops: r.iops,
            bytes_per_sec: r.bytes_per_sec,
            mean_us: r.mean_us,
            p50_us: r.p50_us,
            p90_us: r.p90_us,
            p99_us: r.p99_us,
            p999_us: r.p999_us,
            max_us: r.max_us,
        };
        row("all", &all);
        for (name, o) in [
            ("read", &r.read),
            ("write", &r.write),
            ("flush", &r.flush),
            ("durable write", &r.durable_write),
        ] {
            if let Some(o) = o {
                row(name, o);
            }
        }
        println!(
            "cpu {:.2} us/io   reactor busy {:.0}%   errors {}",
            r.cpu_us_per_io,
            r.busy_share * 100.0,
            r.errors
        );
    }

    pub fn write_json(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n")
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
    }
}

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}

/// Seconds since the Unix epoch, for `started_at_unix_s`.
pub fn unix_now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A latency histogram in nanoseconds from 100 ns to 100 s, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(100, 100_000_000_000, 3).expect("histogram bounds are valid")
}

/// Process CPU time (user + system, every thread) so far.
pub fn process_cpu_time() -> Duration {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .expect("getrusage");
    let tv =
        |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
    tv(usage.user_time()) + tv(usage.system_time())
}

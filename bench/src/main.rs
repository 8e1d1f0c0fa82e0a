//! `sluice-bench`: measures Sluice against baselines taken in the same run.
//!
//! Every report has the same schema (see `docs/benchmarks.md`): IOPS, bytes per second,
//! latency percentiles from an HDR histogram, CPU time per I/O and reactor busy share,
//! with the commit, the machine and the full configuration.

#![forbid(unsafe_code)]

mod common;
mod device;
mod machine;
mod net_bench;
mod objects_bench;
mod progress;
mod reactor_bench;
mod report;
mod store_bench;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "sluice-bench",
    version,
    about = "Benchmarks for Sluice: devices, reactors, the store and objects."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Drive a file or block device through io_uring from one reactor: the raw-device
    /// baseline every other benchmark is compared with.
    Device(device::DeviceArgs),
    /// Durable object writes and verified reads through one store shard on its reactor,
    /// in process: compare with `device` on the same file system.
    Store(store_bench::StoreArgs),
    /// Object I/O against a running cluster through the client library (e.g. one local
    /// OSD made by `sluice dev up`): compare with `device` on the same file system.
    Objects(objects_bench::ObjectsArgs),
    /// Measure round trips between two reactors for several spin windows and gaps:
    /// what parking costs and what spinning buys.
    Reactor(reactor_bench::ReactorBenchArgs),
    /// The null network: requests over one loopback TCP connection to an in-process
    /// server that only answers. The round trip and bandwidth any network path here pays.
    Net(net_bench::NetArgs),
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Device(a) => device::run(a),
        Cmd::Reactor(a) => reactor_bench::run(a),
        Cmd::Store(a) => store_bench::run(a),
        Cmd::Objects(a) => objects_bench::run(a),
        Cmd::Net(a) => net_bench::run(a),
    };
    if let Err(e) = r {
        eprintln!("sluice-bench: error: {e:#}");
        std::process::exit(1);
    }
}

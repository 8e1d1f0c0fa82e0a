//! `sluice-bench reactor`: what the spin window buys.
//!
//! Two reactors on two CPUs. The pinger (never parks, so it measures cleanly) sends a
//! message to the ponger, which answers at once; the pinger records the round trip,
//! waits `gap`, and sends the next. The ponger runs with each spin window in turn: when
//! the gap is longer than its window it has parked and must be woken (eventfd write,
//! IPI, scheduler), which is the cost parking adds; a window longer than the gap keeps
//! it spinning, paying CPU instead.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use hdrhistogram::Histogram;
use serde_json::json;
use sluice_dataplane::park::ParkState;
use sluice_dataplane::reactor::{self, PollMode, ReactorConfig};
use sluice_dataplane::{Context, Inbox, Outbox, PollResult, Poller, Waker, mesh};
use sluice_vocab::{Clock, CoreId, MonoTime, SystemClock, parse_duration};

use crate::report::{new_histogram, process_cpu_time};

#[derive(Debug, Clone, Args)]
pub struct ReactorBenchArgs {
    /// Spin windows to try for the answering reactor (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "0us,20us,50us,200us,1ms", value_parser = parse_duration)]
    pub spin: Vec<Duration>,
    /// Gaps between requests to try (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "0us,10us,100us,1ms", value_parser = parse_duration)]
    pub gap: Vec<Duration>,
    /// Round trips per combination.
    #[arg(long, default_value_t = 5000)]
    pub round_trips: u64,
    /// Also try a ponger that never parks.
    #[arg(long, default_value_t = true)]
    pub with_dedicated: bool,
    /// Write results as JSON here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

struct Pinger {
    inbox: Inbox<u64>,
    out: Outbox<u64>,
    gap: Duration,
    left: u64,
    waiting_since: Option<MonoTime>,
    next_send: MonoTime,
    hist: Histogram<u64>,
    done: Arc<(AtomicBool, Mutex<Option<Histogram<u64>>>)>,
    clock: SystemClock,
}

impl Poller for Pinger {
    fn name(&self) -> &'static str {
        "pinger"
    }

    fn poll(&mut self, _cx: &mut Context<'_>) -> PollResult {
        let now = self.clock.now();
        if let Some(sent) = self.waiting_since {
            if self.inbox.recv().is_some() {
                let _ = self.hist.record(now.as_nanos().saturating_sub(sent.as_nanos()).max(1));
                self.waiting_since = None;
                self.left -= 1;
                self.next_send = now.after(self.gap);
                if self.left == 0 {
                    *self.done.1.lock().expect("lock") = Some(self.hist.clone());
                    self.done.0.store(true, Ordering::Release);
                }
                return PollResult::Busy;
            }
            return PollResult::Idle;
        }
        if self.left > 0 && now >= self.next_send {
            let now = self.clock.now();
            if self.out.send(CoreId(1), now.as_nanos()).is_ok() {
                self.waiting_since = Some(now);
            }
            return PollResult::Busy;
        }
        PollResult::Idle
    }
}

struct Ponger {
    inbox: Inbox<u64>,
    out: Outbox<u64>,
}

impl Poller for Ponger {
    fn name(&self) -> &'static str {
        "ponger"
    }

    fn poll(&mut self, _cx: &mut Context<'_>) -> PollResult {
        let mut n = 0;
        while let Some(m) = self.inbox.recv() {
            let mut m = m;
            while let Err(sluice_dataplane::Full(back)) = self.out.send(CoreId(0), m) {
                m = back;
            }
            n += 1;
        }
        PollResult::busy_if(n > 0)
    }

    fn prepare_park(&mut self) -> bool {
        self.inbox.is_empty()
    }
}

struct Row {
    mode: String,
    gap: Duration,
    hist: Histogram<u64>,
    cpu_us_per_rt: f64,
    parks: u64,
}

fn one(mode: PollMode, gap: Duration, round_trips: u64) -> anyhow::Result<Row> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let parks: Vec<_> = (0..2).map(|_| ParkState::new()).collect::<Result<_, _>>()?;
    let wakers = parks.iter().map(|p| Waker::new(Arc::clone(p))).collect();
    let (mut outs, mut ins) = mesh::<u64>(wakers, 0, 4);
    let (ping_in, pong_in) = {
        let b = ins.pop().expect("two inboxes");
        (ins.pop().expect("two inboxes"), b)
    };
    let (ping_out, pong_out) = {
        let b = outs.pop().expect("two outboxes");
        (outs.pop().expect("two outboxes"), b)
    };
    let done = Arc::new((AtomicBool::new(false), Mutex::new(None)));
    let [ping_park, pong_park]: [_; 2] = parks.try_into().expect("two park states");
    let cpu0 = process_cpu_time();
    let pong = reactor::spawn(
        ReactorConfig { core: CoreId(1), cpu: Some(1 % cpus), mode },
        pong_park,
        move |r| {
            r.add_poller(Box::new(Ponger { inbox: pong_in, out: pong_out }))?;
            Ok(())
        },
    )?;
    let done2 = Arc::clone(&done);
    let ping_cfg = ReactorConfig { core: CoreId(0), cpu: Some(0), mode: PollMode::Dedicated };
    let ping = reactor::spawn(ping_cfg, ping_park, move |r| {
        r.add_poller(Box::new(Pinger {
            inbox: ping_in,
            out: ping_out,
            gap,
            left: round_trips,
            waiting_since: None,
            next_send: MonoTime::ZERO,
            hist: new_histogram(),
            done: done2,
            clock: SystemClock,
        }))?;
        Ok(())
    })?;
    while !done.0.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(5));
    }
    ping.stop()?;
    let stats = pong.stop()?;
    let cpu = process_cpu_time() - cpu0;
    let hist = done.1.lock().expect("lock").take().context("no histogram")?;
    let mode = match mode {
        PollMode::Dedicated => "dedicated".to_string(),
        PollMode::Park { spin, .. } => format!("spin {}us", spin.as_micros()),
    };
    Ok(Row {
        mode,
        gap,
        hist,
        cpu_us_per_rt: cpu.as_secs_f64() * 1e6 / round_trips as f64,
        parks: stats.parks,
    })
}

pub fn run(args: ReactorBenchArgs) -> anyhow::Result<()> {
    let mut modes: Vec<PollMode> = args.spin.iter().map(|&spin| PollMode::park(spin)).collect();
    if args.with_dedicated {
        modes.push(PollMode::Dedicated);
    }
    println!(
        "{:<14} {:>8} {:>10} {:>10} {:>10} {:>12} {:>8}",
        "ponger", "gap us", "p50 us", "p99 us", "max us", "cpu us/rt", "parks"
    );
    let mut rows = Vec::new();
    for &gap in &args.gap {
        for &mode in &modes {
            let r = one(mode, gap, args.round_trips)?;
            let q = |p| r.hist.value_at_quantile(p) as f64 / 1e3;
            println!(
                "{:<14} {:>8} {:>10.1} {:>10.1} {:>10.1} {:>12.1} {:>8}",
                r.mode,
                r.gap.as_micros(),
                q(0.5),
                q(0.99),
                r.hist.max() as f64 / 1e3,
                r.cpu_us_per_rt,
                r.parks
            );
            rows.push(json!({
                "ponger": r.mode, "gap_us": r.gap.as_micros() as u64,
                "p50_us": q(0.5), "p99_us": q(0.99), "max_us": r.hist.max() as f64 / 1e3,
                "cpu_us_per_round_trip": r.cpu_us_per_rt, "parks": r.parks,
            }));
        }
    }
    println!("cpu us/rt includes the pinger, which spins for the whole run (gap included).");
    if let Some(p) = &args.json {
        let report = json!({
            "schema": crate::report::SCHEMA, "kind": "reactor", "commit": env!("SLUICE_COMMIT"),
            "machine": crate::machine::Machine::probe(None), "round_trips": args.round_trips, "rows": rows,
        });
        std::fs::write(p, serde_json::to_string_pretty(&report)? + "\n")?;
    }
    Ok(())
}

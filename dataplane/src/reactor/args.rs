//! The command-line options every program that runs reactors shares (`sluice-osd run`,
//! `sluice-bench`), so they spell and mean the same everywhere.

use std::time::Duration;

use sluice_vocab::parse_duration;

use super::PollMode;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PollKind {
    /// Spin for --spin after the last work, then sleep until woken.
    Park,
    /// Never sleep (for cores given wholly to Sluice).
    Dedicated,
}

/// `--poll park|dedicated` and `--spin DURATION`.
#[derive(Debug, Clone, clap::Args)]
pub struct PollArgs {
    /// What an idle reactor does.
    #[arg(long, value_enum, default_value = "park")]
    pub poll: PollKind,
    /// How long an idle reactor keeps polling before it sleeps (with --poll park).
    #[arg(long, default_value = "200us", value_parser = parse_duration)]
    pub spin: Duration,
    /// How long an idle reactor keeps polling while device I/O is in flight (with
    /// --poll park): a completion usually comes sooner than a sleeping reactor wakes.
    /// Never shorter than --spin.
    #[arg(long, default_value = "1ms", value_parser = parse_duration)]
    pub device_spin: Duration,
    /// With at least this many device commands in flight an idle reactor sleeps at once
    /// instead of spinning (with --poll park): the device stays busy with the others and
    /// a completion wakes the reactor, so the spin would only take CPU from clients and
    /// the kernel. 0: always spin the windows above.
    #[arg(long, default_value_t = PollMode::DEFAULT_PARK_DEPTH)]
    pub park_depth: usize,
}

impl PollArgs {
    pub fn mode(&self) -> PollMode {
        match self.poll {
            PollKind::Park => PollMode::Park {
                spin: self.spin,
                device_spin: self.device_spin.max(self.spin),
                park_depth: self.park_depth,
            },
            PollKind::Dedicated => PollMode::Dedicated,
        }
    }
}

/// Where reactors run (`--cpus` of `sluice-osd run`, `--cpu` of the benchmarks): `auto`
/// pins them to distinct CPUs, the first on the one that takes the device's interrupts
/// (its completions then need no cross-CPU wakeup); `none` leaves them to the scheduler;
/// or one CPU per reactor, e.g. `0,1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpuPlan {
    Auto,
    None,
    List(Vec<usize>),
}

impl std::str::FromStr for CpuPlan {
    type Err = String;
    fn from_str(s: &str) -> Result<CpuPlan, String> {
        match s {
            "auto" => Ok(CpuPlan::Auto),
            "none" => Ok(CpuPlan::None),
            _ => s
                .split(',')
                .map(|c| c.trim().parse::<usize>().map_err(|_| format!("not a CPU number: {c:?}")))
                .collect::<Result<Vec<_>, _>>()
                .map(CpuPlan::List)
                .map_err(|e| format!("{e} (expected auto, none or a list like 0,1)")),
        }
    }
}

/// What a [`CpuPlan`] chose for a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The CPU of each reactor (`None`: not pinned).
    pub cpus: Vec<Option<usize>>,
    /// What `auto` chose and why, for the log (`None` for explicit plans).
    pub why: Option<String>,
}

impl CpuPlan {
    /// Places `reactors` reactors driving the device at `path`. The one error: a list
    /// with another number of CPUs than reactors.
    pub fn place(&self, path: &std::path::Path, reactors: usize) -> Result<Placement, String> {
        let unpinned = |why: String| Placement { cpus: vec![None; reactors], why: Some(why) };
        match self {
            CpuPlan::None => Ok(Placement { cpus: vec![None; reactors], why: None }),
            CpuPlan::List(cpus) if cpus.len() != reactors => {
                Err(format!("{reactors} reactor(s) need one CPU each, {} given", cpus.len()))
            }
            CpuPlan::List(cpus) => {
                Ok(Placement { cpus: cpus.iter().copied().map(Some).collect(), why: None })
            }
            CpuPlan::Auto => {
                let allowed = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
                    .map(|set| {
                        (0..nix::sched::CpuSet::count())
                            .filter(|&c| set.is_set(c).unwrap_or(false))
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default();
                let irq = sluice_nvme::irq::interrupt_cpus(path).and_then(|c| c.first().copied());
                let Some(first) = irq.filter(|c| allowed.contains(c)) else {
                    return Ok(unpinned(format!(
                        "reactors not pinned: cannot tell which CPU takes the interrupts of {}",
                        path.display()
                    )));
                };
                if reactors > allowed.len() {
                    return Ok(unpinned(format!(
                        "reactors not pinned: {reactors} reactors, {} CPUs",
                        allowed.len()
                    )));
                }
                let order: Vec<usize> = std::iter::once(first)
                    .chain(allowed.iter().copied().filter(|&c| c != first))
                    .take(reactors)
                    .collect();
                let why = format!(
                    "reactors pinned to CPUs {order:?} (CPU {first} takes the interrupts of {})",
                    path.display()
                );
                Ok(Placement { cpus: order.into_iter().map(Some).collect(), why: Some(why) })
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn cpu_plans_parse_and_place_one_cpu_per_reactor() {
        assert_eq!("auto".parse::<CpuPlan>(), Ok(CpuPlan::Auto));
        assert_eq!("none".parse::<CpuPlan>(), Ok(CpuPlan::None));
        assert_eq!("0, 1".parse::<CpuPlan>(), Ok(CpuPlan::List(vec![0, 1])));
        assert!("x".parse::<CpuPlan>().unwrap_err().contains("expected auto, none or a list"));
        let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        assert_eq!(CpuPlan::None.place(here, 2).unwrap().cpus, vec![None, None]);
        assert_eq!(CpuPlan::List(vec![1]).place(here, 1).unwrap().cpus, vec![Some(1)]);
        assert!(CpuPlan::List(vec![1]).place(here, 2).is_err());
        // Auto: pinned to distinct CPUs, or not at all.
        assert_eq!(CpuPlan::Auto.place(here, 1).unwrap().cpus.len(), 1);
        if let [Some(a), Some(b)] = CpuPlan::Auto.place(here, 2).unwrap().cpus[..] {
            assert_ne!(a, b, "auto pins reactors to distinct CPUs");
        }
        assert_eq!(CpuPlan::Auto.place(here, 4096).unwrap().cpus, vec![None; 4096]);
    }
}

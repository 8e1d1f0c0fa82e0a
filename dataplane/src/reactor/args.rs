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
}

impl PollArgs {
    pub fn mode(&self) -> PollMode {
        match self.poll {
            PollKind::Park => {
                PollMode::Park { spin: self.spin, device_spin: self.device_spin.max(self.spin) }
            }
            PollKind::Dedicated => PollMode::Dedicated,
        }
    }
}

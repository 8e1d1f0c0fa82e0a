//! Error injection rules for `FaultyDevice`.

use sluice_vocab::{BlockCount, Lba};

use crate::command::{IoCommand, OpKind};
use crate::error::IoError;

/// A set of operation kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpSet(u8);

impl OpSet {
    pub const ALL: OpSet = OpSet(0x1f);
    pub const READS: OpSet = OpSet(1 << 0);
    pub const WRITES: OpSet = OpSet(1 << 1);
    pub const FLUSHES: OpSet = OpSet(1 << 2);

    pub fn of(kinds: &[OpKind]) -> OpSet {
        OpSet(kinds.iter().fold(0, |m, k| m | Self::bit(*k)))
    }

    fn bit(k: OpKind) -> u8 {
        match k {
            OpKind::Read => 1 << 0,
            OpKind::Write => 1 << 1,
            OpKind::Flush => 1 << 2,
            OpKind::WriteZeroes => 1 << 3,
            OpKind::Trim => 1 << 4,
        }
    }

    pub fn contains(self, k: OpKind) -> bool {
        self.0 & Self::bit(k) != 0
    }
}

/// Fails matching commands with an error.
///
/// A command matches if its kind is in `ops` and (when `range` is set) it touches the
/// range. The first `skip` matching commands pass; the next `times` fail (all of them if
/// `times` is `None`).
#[derive(Debug, Clone)]
pub struct FaultRule {
    pub ops: OpSet,
    pub range: Option<(Lba, BlockCount)>,
    pub skip: u64,
    pub times: Option<u64>,
    pub error: IoError,
    seen: u64,
    hits: u64,
}

impl FaultRule {
    /// Fails every matching command of `ops` with `error`.
    pub fn new(ops: OpSet, error: IoError) -> FaultRule {
        FaultRule { ops, range: None, skip: 0, times: None, error, seen: 0, hits: 0 }
    }

    /// Only commands touching `lba..lba+blocks`.
    pub fn in_range(mut self, lba: Lba, blocks: BlockCount) -> FaultRule {
        self.range = Some((lba, blocks));
        self
    }

    /// Let the first `n` matching commands through.
    pub fn after(mut self, n: u64) -> FaultRule {
        self.skip = n;
        self
    }

    /// Fail only `n` commands, then stop.
    pub fn times(mut self, n: u64) -> FaultRule {
        self.times = Some(n);
        self
    }

    /// How many commands this rule failed.
    pub fn hits(&self) -> u64 {
        self.hits
    }

    /// Returns the error to fail `cmd` with, counting the match.
    pub(super) fn check(&mut self, cmd: &IoCommand) -> Option<IoError> {
        if !self.ops.contains(cmd.kind()) {
            return None;
        }
        if let Some((start, len)) = self.range {
            let (lba, blocks) = cmd.range()?;
            let overlaps =
                lba.0 < start.0.saturating_add(len.0) && start.0 < lba.0.saturating_add(blocks.0);
            if !overlaps {
                return None;
            }
        }
        self.seen += 1;
        if self.seen <= self.skip {
            return None;
        }
        if self.times.is_some_and(|t| self.hits >= t) {
            return None;
        }
        self.hits += 1;
        // Media errors name the first failing block of the command inside the range.
        Some(match (self.error, cmd.range(), self.range) {
            (IoError::Media { .. }, Some((lba, _)), Some((start, _))) => {
                IoError::Media { lba: Lba(lba.0.max(start.0)) }
            }
            (IoError::Media { .. }, Some((lba, _)), None) => IoError::Media { lba },
            (e, _, _) => e,
        })
    }
}

//! `RamDevice`: a device in memory. Every completed write is also durable (there is no
//! cache to lose), which makes it the reference behaviour in the conformance suite and
//! the medium under `FaultyDevice` in tests.
//!
//! Several queue pairs may share one medium ([`RamDevice::queue_pair`]); the medium is
//! an array of atomic words, so concurrent queue pairs need no lock and conflicting
//! writes from two cores are merely unordered, as on a real device.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sluice_vocab::limits::BLOCK_SIZE_BYTES;
use sluice_vocab::{BlockCount, Lba};

use crate::command::IoCommand;
use crate::device::{BlockDevice, Completion, DeviceInfo, default_max_transfer_blocks, validate};
use crate::dma::DmaBuf;
use crate::error::{IoError, RejectReason, SubmitError};

/// The shared medium: `size / 8` atomic words.
#[derive(Debug)]
pub struct RamMedia {
    words: Box<[AtomicU64]>,
}

impl RamMedia {
    fn new(size_bytes: u64) -> RamMedia {
        let n = usize::try_from(size_bytes / 8).expect("RAM device too large");
        RamMedia { words: (0..n).map(|_| AtomicU64::new(0)).collect() }
    }

    fn word_range(lba: Lba, blocks: BlockCount) -> std::ops::Range<usize> {
        let start = (lba.offset_bytes() / 8) as usize;
        start..start + (blocks.bytes() / 8) as usize
    }

    /// Copies blocks out of the medium.
    pub fn read(&self, lba: Lba, out: &mut [u8]) {
        let blocks = BlockCount((out.len() / BLOCK_SIZE_BYTES) as u64);
        let words = &self.words[Self::word_range(lba, blocks)];
        for (w, chunk) in words.iter().zip(out.chunks_exact_mut(8)) {
            chunk.copy_from_slice(&w.load(Ordering::Relaxed).to_ne_bytes());
        }
    }

    /// Copies blocks into the medium.
    pub fn write(&self, lba: Lba, data: &[u8]) {
        let blocks = BlockCount((data.len() / BLOCK_SIZE_BYTES) as u64);
        let words = &self.words[Self::word_range(lba, blocks)];
        for (w, chunk) in words.iter().zip(data.chunks_exact(8)) {
            w.store(u64::from_ne_bytes(chunk.try_into().expect("8-byte chunk")), Ordering::Relaxed);
        }
    }

    fn zero(&self, lba: Lba, blocks: BlockCount) {
        for w in &self.words[Self::word_range(lba, blocks)] {
            w.store(0, Ordering::Relaxed);
        }
    }
}

/// A queue pair over a [`RamMedia`]. Commands execute at [`kick`](BlockDevice::kick).
#[derive(Debug)]
pub struct RamDevice {
    media: Arc<RamMedia>,
    info: DeviceInfo,
    queued: VecDeque<(IoCommand, Option<DmaBuf>, u64)>,
    done: VecDeque<Completion>,
}

impl RamDevice {
    /// A zeroed device of `size_bytes` (rounded down to whole blocks).
    pub fn new(size_bytes: u64, queue_depth: usize) -> RamDevice {
        assert!(queue_depth > 0);
        let num_blocks = size_bytes / BLOCK_SIZE_BYTES as u64;
        let media = Arc::new(RamMedia::new(num_blocks * BLOCK_SIZE_BYTES as u64));
        Self::with_media(media, num_blocks, queue_depth)
    }

    fn with_media(media: Arc<RamMedia>, num_blocks: u64, queue_depth: usize) -> RamDevice {
        RamDevice {
            media,
            info: DeviceInfo {
                name: "ram".to_string(),
                block_size: BLOCK_SIZE_BYTES,
                num_blocks,
                queue_depth,
                max_transfer_blocks: default_max_transfer_blocks(),
            },
            queued: VecDeque::with_capacity(queue_depth),
            done: VecDeque::with_capacity(queue_depth),
        }
    }

    /// Another queue pair on the same medium.
    pub fn queue_pair(&self) -> RamDevice {
        Self::with_media(Arc::clone(&self.media), self.info.num_blocks, self.info.queue_depth)
    }

    /// The medium, for tests that inspect or corrupt bytes behind the device's back.
    pub fn media(&self) -> &Arc<RamMedia> {
        &self.media
    }

    fn execute(&self, cmd: IoCommand, buf: &mut Option<DmaBuf>) -> Result<(), IoError> {
        match cmd {
            IoCommand::Read { lba, .. } => {
                self.media.read(lba, buf.as_mut().expect("validated"));
            }
            IoCommand::Write { lba, .. } => {
                self.media.write(lba, buf.as_ref().expect("validated"));
            }
            IoCommand::Flush => {}
            IoCommand::WriteZeroes { lba, blocks } | IoCommand::Trim { lba, blocks } => {
                self.media.zero(lba, blocks);
            }
        }
        Ok(())
    }
}

impl BlockDevice for RamDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn submit(&mut self, cmd: IoCommand, buf: Option<DmaBuf>, tag: u64) -> Result<(), SubmitError> {
        if let Err(reason) = validate(&self.info, &cmd, buf.as_ref()) {
            return Err(SubmitError { reason, buf });
        }
        if self.in_flight() >= self.info.queue_depth {
            return Err(SubmitError { reason: RejectReason::QueueFull, buf });
        }
        self.queued.push_back((cmd, buf, tag));
        Ok(())
    }

    fn kick(&mut self) -> Result<(), IoError> {
        while let Some((cmd, mut buf, tag)) = self.queued.pop_front() {
            let result = self.execute(cmd, &mut buf);
            self.done.push_back(Completion { tag, result, buf });
        }
        Ok(())
    }

    fn poll(&mut self, max: usize, sink: &mut dyn FnMut(Completion)) -> usize {
        let mut n = 0;
        while n < max {
            let Some(c) = self.done.pop_front() else { break };
            sink(c);
            n += 1;
        }
        n
    }

    fn in_flight(&self) -> usize {
        self.queued.len() + self.done.len()
    }

    fn prepare_park(&mut self) -> bool {
        // Completions appear only at kick, which the reactor itself calls: with nothing
        // waiting to be reaped there is nothing to wake for.
        self.done.is_empty() && self.queued.is_empty()
    }
}

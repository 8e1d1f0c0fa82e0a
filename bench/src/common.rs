//! Pieces the benchmarks share: device-file preparation and reactor options.

use std::path::Path;

use anyhow::{Context as _, bail};
use clap::Args;
use sluice_dataplane::reactor::{CpuPlan, PollArgs, PollMode};
use sluice_nvme::{BlockDevice, IoCommand, UringDevice, UringOptions};
use sluice_vocab::limits::BLOCK_SIZE_BYTES;
use sluice_vocab::{BlockCount, ByteSize, Lba};

/// Options shared by benchmarks that run reactors.
#[derive(Debug, Clone, Args)]
pub struct ReactorArgs {
    /// Pin the reactor: `auto` (the CPU taking the device's interrupts), `none`, or a CPU.
    #[arg(long, default_value = "auto")]
    pub cpu: CpuPlan,
    #[command(flatten)]
    pub poll: PollArgs,
}

impl ReactorArgs {
    /// The reactor's CPU for the device at `path`, saying what `auto` chose.
    pub fn pin(&self, path: &Path) -> anyhow::Result<Option<usize>> {
        let p = self.cpu.place(path, 1).map_err(|e| anyhow::anyhow!("--cpu: {e}"))?;
        if let Some(why) = p.why {
            eprintln!("{why}");
        }
        Ok(p.cpus[0])
    }

    pub fn mode(&self) -> PollMode {
        self.poll.mode()
    }
}

/// Creates the device file if needed and makes sure every block was written, so reads
/// hit the medium rather than holes.
pub fn prepare_file(path: &Path, dev_size: ByteSize, direct: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let size = dev_size.0 / BLOCK_SIZE_BYTES as u64 * BLOCK_SIZE_BYTES as u64;
    match std::fs::metadata(path) {
        Ok(md) if md.file_type().is_block_device() => return Ok(()),
        Ok(md) if md.len() >= size && md.blocks() * 512 >= md.len() => return Ok(()),
        Ok(md) if md.len() > 0 && md.len() < size && !md.file_type().is_file() => {
            bail!("{} is not a regular file or block device", path.display())
        }
        _ => {}
    }
    let len = std::fs::metadata(path).map_or(0, |m| m.len()).max(size);
    sluice_nvme::create_device_file(path, len)
        .with_context(|| format!("creating {}", path.display()))?;
    eprintln!(
        "preparing {}: writing all {} so reads hit the medium",
        path.display(),
        ByteSize(len)
    );
    let mut dev =
        UringDevice::open(path, UringOptions { queue_depth: 8, direct, ..Default::default() })?;
    let chunk = BlockCount(256);
    let total = dev.info().num_blocks;
    let mut next = 0u64;
    let mut pending = 0usize;
    let mut bufs: Vec<_> =
        (0..8).map(|_| sluice_nvme::DmaBuf::new(chunk.bytes() as usize)).collect();
    for (i, b) in bufs.iter_mut().enumerate() {
        b.fill(0x5a ^ i as u8);
    }
    while next < total || pending > 0 {
        while next < total {
            let Some(buf) = bufs.pop() else { break };
            let n = BlockCount(chunk.0.min(total - next));
            let mut buf = buf;
            buf.set_len(n.bytes() as usize);
            dev.submit(IoCommand::Write { lba: Lba(next), blocks: n, fua: false }, Some(buf), next)
                .map_err(|e| anyhow::anyhow!("prefill: {e}"))?;
            next += n.0;
            pending += 1;
        }
        dev.kick()?;
        let mut err = None;
        dev.poll(usize::MAX, &mut |c| {
            if let Err(e) = c.result {
                err = Some(e);
            }
            let mut b = c.buf.expect("write buffer");
            b.set_len(b.capacity());
            bufs.push(b);
            pending -= 1;
        });
        if let Some(e) = err {
            bail!("prefill of {} failed: {e}", path.display());
        }
    }
    sluice_nvme::flush_sync(&mut dev)?;
    Ok(())
}

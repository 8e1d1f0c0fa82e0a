//! NVMe-shaped commands and completions.
//!
//! Every backend accepts the same [`IoCommand`]s and answers with the same typed
//! [`IoError`](crate::IoError)s. [`Sqe`] and [`Cqe`] are the exact 64- and 16-byte NVMe
//! layouts: the userspace driver puts them on real queues, and [`IoCommand::to_sqe`] /
//! [`IoCommand::from_sqe`] are the one place that encodes NVM command set fields.

use sluice_vocab::{BlockCount, Lba};

/// NVM command set opcodes (NVMe base spec, figure "Opcodes for NVM Commands").
pub mod opcode {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DATASET_MANAGEMENT: u8 = 0x09;
}

/// One I/O command. Data transfer commands carry a [`DmaBuf`](crate::DmaBuf) of exactly
/// `blocks * BLOCK_SIZE_BYTES` bytes; the others carry none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoCommand {
    Read {
        lba: Lba,
        blocks: BlockCount,
    },
    /// `fua`: the write is durable when it completes (Force Unit Access).
    Write {
        lba: Lba,
        blocks: BlockCount,
        fua: bool,
    },
    /// Makes every write that completed before this flush was submitted durable.
    Flush,
    /// Sets the range to zeroes. Like a write, durable only once flushed.
    WriteZeroes {
        lba: Lba,
        blocks: BlockCount,
    },
    /// Deallocates the range: afterwards reads return either the old data or zeroes, and
    /// the next write of a block behaves as usual. Like a write, durable once flushed.
    Trim {
        lba: Lba,
        blocks: BlockCount,
    },
}

/// What kind of command, for statistics, fault rules and error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    Read,
    Write,
    Flush,
    WriteZeroes,
    Trim,
}

impl OpKind {
    pub const ALL: [OpKind; 5] =
        [OpKind::Read, OpKind::Write, OpKind::Flush, OpKind::WriteZeroes, OpKind::Trim];

    pub fn name(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Flush => "flush",
            OpKind::WriteZeroes => "write-zeroes",
            OpKind::Trim => "trim",
        }
    }
}

impl IoCommand {
    pub fn kind(&self) -> OpKind {
        match self {
            IoCommand::Read { .. } => OpKind::Read,
            IoCommand::Write { .. } => OpKind::Write,
            IoCommand::Flush => OpKind::Flush,
            IoCommand::WriteZeroes { .. } => OpKind::WriteZeroes,
            IoCommand::Trim { .. } => OpKind::Trim,
        }
    }

    /// The block range the command touches, if any.
    pub fn range(&self) -> Option<(Lba, BlockCount)> {
        match *self {
            IoCommand::Read { lba, blocks }
            | IoCommand::Write { lba, blocks, .. }
            | IoCommand::WriteZeroes { lba, blocks }
            | IoCommand::Trim { lba, blocks } => Some((lba, blocks)),
            IoCommand::Flush => None,
        }
    }

    /// Whether the command moves data through a buffer.
    pub fn transfers_data(&self) -> bool {
        matches!(self, IoCommand::Read { .. } | IoCommand::Write { .. })
    }

    /// Whether the command changes the medium's content.
    pub fn mutates(&self) -> bool {
        matches!(
            self,
            IoCommand::Write { .. } | IoCommand::WriteZeroes { .. } | IoCommand::Trim { .. }
        )
    }

    /// Encodes the command as an NVMe submission queue entry.
    ///
    /// `prp1`/`prp2` are the data pointer (for a trim: a pointer to one 16-byte DSM range
    /// descriptor, see [`DsmRange`]). NLB fields are 0-based as the spec says.
    pub fn to_sqe(&self, cid: u16, nsid: u32, prp1: u64, prp2: u64) -> Sqe {
        let mut sqe = Sqe::zeroed();
        sqe.nsid = nsid;
        sqe.prp1 = prp1;
        sqe.prp2 = prp2;
        let (op, cdw12) = match *self {
            IoCommand::Read { blocks, .. } => (opcode::READ, nlb_field(blocks)),
            IoCommand::Write { blocks, fua, .. } => {
                (opcode::WRITE, nlb_field(blocks) | if fua { 1 << 30 } else { 0 })
            }
            IoCommand::Flush => (opcode::FLUSH, 0),
            IoCommand::WriteZeroes { blocks, .. } => (opcode::WRITE_ZEROES, nlb_field(blocks)),
            IoCommand::Trim { .. } => {
                // NR = 0 (one range), AD (deallocate) = bit 2 of CDW11.
                sqe.cdw11 = 1 << 2;
                (opcode::DATASET_MANAGEMENT, 0)
            }
        };
        sqe.set_opcode_cid(op, cid);
        if let Some((lba, _)) = self.range()
            && !matches!(self, IoCommand::Trim { .. })
        {
            sqe.cdw10 = lba.0 as u32;
            sqe.cdw11 = (lba.0 >> 32) as u32;
            sqe.cdw12 = cdw12;
        }
        sqe
    }

    /// Decodes an NVMe submission queue entry. A dataset-management entry needs its range
    /// descriptor, which lives in host memory: pass it as `dsm_range`.
    pub fn from_sqe(sqe: &Sqe, dsm_range: Option<DsmRange>) -> Result<IoCommand, DecodeError> {
        let slba = Lba(u64::from(sqe.cdw10) | (u64::from(sqe.cdw11) << 32));
        let blocks = BlockCount(u64::from(sqe.cdw12 & 0xffff) + 1);
        match sqe.opcode() {
            opcode::READ => Ok(IoCommand::Read { lba: slba, blocks }),
            opcode::WRITE => {
                Ok(IoCommand::Write { lba: slba, blocks, fua: sqe.cdw12 & (1 << 30) != 0 })
            }
            opcode::FLUSH => Ok(IoCommand::Flush),
            opcode::WRITE_ZEROES => Ok(IoCommand::WriteZeroes { lba: slba, blocks }),
            opcode::DATASET_MANAGEMENT => {
                if sqe.cdw10 & 0xff != 0 {
                    return Err(DecodeError::Unsupported("more than one DSM range"));
                }
                if sqe.cdw11 & (1 << 2) == 0 {
                    return Err(DecodeError::Unsupported("DSM without deallocate"));
                }
                let r = dsm_range.ok_or(DecodeError::Unsupported("DSM range missing"))?;
                Ok(IoCommand::Trim { lba: Lba(r.slba), blocks: BlockCount(u64::from(r.nlb)) })
            }
            other => Err(DecodeError::UnknownOpcode(other)),
        }
    }
}

fn nlb_field(blocks: BlockCount) -> u32 {
    assert!(blocks.0 >= 1 && blocks.0 <= 1 << 16, "NLB out of range: {}", blocks.0);
    (blocks.0 - 1) as u32
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown NVM opcode {0:#04x}")]
    UnknownOpcode(u8),
    #[error("unsupported command: {0}")]
    Unsupported(&'static str),
}

/// One dataset management range descriptor (16 bytes in host memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DsmRange {
    pub context_attributes: u32,
    /// Length in logical blocks (1-based, unlike the NLB field of read/write).
    pub nlb: u32,
    pub slba: u64,
}

impl DsmRange {
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.context_attributes.to_le_bytes());
        b[4..8].copy_from_slice(&self.nlb.to_le_bytes());
        b[8..16].copy_from_slice(&self.slba.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; 16]) -> DsmRange {
        DsmRange {
            context_attributes: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            nlb: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            slba: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        }
    }
}

/// NVMe submission queue entry: 64 bytes, little-endian on the wire (x86 hosts only).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sqe {
    /// Opcode (bits 0-7), fused (8-9), PSDT (14-15), command identifier (16-31).
    pub cdw0: u32,
    pub nsid: u32,
    pub cdw2: u32,
    pub cdw3: u32,
    pub mptr: u64,
    pub prp1: u64,
    pub prp2: u64,
    pub cdw10: u32,
    pub cdw11: u32,
    pub cdw12: u32,
    pub cdw13: u32,
    pub cdw14: u32,
    pub cdw15: u32,
}

const _: () = assert!(std::mem::size_of::<Sqe>() == 64);

impl Sqe {
    pub fn zeroed() -> Sqe {
        Sqe::default()
    }

    pub fn opcode(&self) -> u8 {
        (self.cdw0 & 0xff) as u8
    }

    pub fn cid(&self) -> u16 {
        (self.cdw0 >> 16) as u16
    }

    pub fn set_opcode_cid(&mut self, opcode: u8, cid: u16) {
        self.cdw0 = u32::from(opcode) | (u32::from(cid) << 16);
    }
}

/// NVMe completion queue entry: 16 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cqe {
    /// Command specific result.
    pub dw0: u32,
    pub dw1: u32,
    /// How far the controller has consumed the submission queue.
    pub sq_head: u16,
    pub sq_id: u16,
    pub cid: u16,
    /// Phase tag (bit 0) and status field (bits 1-15).
    pub status_phase: u16,
}

const _: () = assert!(std::mem::size_of::<Cqe>() == 16);

impl Cqe {
    pub fn phase(&self) -> bool {
        self.status_phase & 1 != 0
    }

    pub fn status(&self) -> Status {
        Status::from_field(self.status_phase >> 1)
    }
}

/// The NVMe status field of a completion: status code type, status code and the
/// do-not-retry bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Status {
    pub sct: u8,
    pub sc: u8,
    pub dnr: bool,
}

/// Status code types and the codes Sluice interprets.
pub mod status {
    pub const SCT_GENERIC: u8 = 0;
    pub const SCT_COMMAND_SPECIFIC: u8 = 1;
    pub const SCT_MEDIA: u8 = 2;
    pub const SCT_PATH: u8 = 3;

    pub const SC_SUCCESS: u8 = 0x00;
    pub const SC_INVALID_OPCODE: u8 = 0x01;
    pub const SC_INVALID_FIELD: u8 = 0x02;
    pub const SC_DATA_TRANSFER_ERROR: u8 = 0x04;
    pub const SC_INTERNAL_ERROR: u8 = 0x06;
    pub const SC_ABORT_REQUESTED: u8 = 0x07;
    pub const SC_ABORT_SQ_DELETED: u8 = 0x08;
    pub const SC_INVALID_NAMESPACE: u8 = 0x0b;
    pub const SC_LBA_OUT_OF_RANGE: u8 = 0x80;
    pub const SC_CAPACITY_EXCEEDED: u8 = 0x81;
    pub const SC_NAMESPACE_NOT_READY: u8 = 0x82;

    pub const SC_WRITE_FAULT: u8 = 0x80;
    pub const SC_UNRECOVERED_READ_ERROR: u8 = 0x81;
}

impl Status {
    pub const SUCCESS: Status = Status { sct: 0, sc: 0, dnr: false };

    /// Decodes the 15-bit status field (the CQE's bits 17-31, already shifted down).
    pub fn from_field(field: u16) -> Status {
        Status {
            sc: (field & 0xff) as u8,
            sct: ((field >> 8) & 0x7) as u8,
            dnr: field & (1 << 14) != 0,
        }
    }

    pub fn to_field(self) -> u16 {
        u16::from(self.sc) | (u16::from(self.sct & 0x7) << 8) | if self.dnr { 1 << 14 } else { 0 }
    }

    pub fn is_success(self) -> bool {
        self.sct == status::SCT_GENERIC && self.sc == status::SC_SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_cmd() -> impl Strategy<Value = IoCommand> {
        let lba = any::<u64>().prop_map(Lba);
        let blocks = (1u64..=65536).prop_map(BlockCount);
        prop_oneof![
            (lba.clone(), blocks.clone()).prop_map(|(lba, blocks)| IoCommand::Read { lba, blocks }),
            (lba.clone(), blocks.clone(), any::<bool>())
                .prop_map(|(lba, blocks, fua)| IoCommand::Write { lba, blocks, fua }),
            Just(IoCommand::Flush),
            (lba.clone(), blocks.clone())
                .prop_map(|(lba, blocks)| IoCommand::WriteZeroes { lba, blocks }),
            (lba, 1u64..=u64::from(u32::MAX))
                .prop_map(|(lba, n)| IoCommand::Trim { lba, blocks: BlockCount(n) }),
        ]
    }

    proptest! {
        #[test]
        fn sqe_round_trips(cmd in any_cmd(), cid in any::<u16>(), nsid in 1u32.., p1 in any::<u64>(), p2 in any::<u64>()) {
            let sqe = cmd.to_sqe(cid, nsid, p1, p2);
            prop_assert_eq!(sqe.cid(), cid);
            prop_assert_eq!(sqe.nsid, nsid);
            let range = match cmd {
                IoCommand::Trim { lba, blocks } => Some(DsmRange { context_attributes: 0, nlb: blocks.0 as u32, slba: lba.0 }),
                _ => None,
            };
            let range = range.map(|r| DsmRange::from_bytes(&r.to_bytes()));
            prop_assert_eq!(IoCommand::from_sqe(&sqe, range).unwrap(), cmd);
        }

        #[test]
        fn status_field_round_trips(sct in 0u8..8, sc in any::<u8>(), dnr in any::<bool>()) {
            let s = Status { sct, sc, dnr };
            prop_assert_eq!(Status::from_field(s.to_field()), s);
        }

        #[test]
        fn decoding_garbage_never_panics(words in proptest::array::uniform16(any::<u32>())) {
            let sqe = Sqe {
                cdw0: words[0], nsid: words[1], cdw2: words[2], cdw3: words[3],
                mptr: u64::from(words[4]), prp1: u64::from(words[5]), prp2: u64::from(words[6]),
                cdw10: words[7], cdw11: words[8], cdw12: words[9], cdw13: words[10],
                cdw14: words[11], cdw15: words[12],
            };
            let _ = IoCommand::from_sqe(&sqe, None);
        }
    }

    #[test]
    fn write_fua_sets_bit_30_and_nlb_is_zero_based() {
        let sqe = IoCommand::Write { lba: Lba(0x1_0000_0002), blocks: BlockCount(8), fua: true }
            .to_sqe(7, 1, 0x1000, 0);
        assert_eq!(sqe.opcode(), opcode::WRITE);
        assert_eq!(sqe.cdw10, 2);
        assert_eq!(sqe.cdw11, 1);
        assert_eq!(sqe.cdw12, 7 | (1 << 30));
    }
}

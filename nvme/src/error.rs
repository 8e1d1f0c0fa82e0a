//! The typed errors every backend reports.
//!
//! Errors are small and `Copy` so a completion can carry one without allocating. A backend
//! maps its native failure (an errno from io_uring, an NVMe status from a controller, an
//! injected fault) onto these, so the store above handles one vocabulary.

use crate::DmaBuf;
use crate::command::{Status, status};
use sluice_vocab::Lba;

/// Why a command failed after it was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    /// The medium could not read or write the range starting at `lba` (unrecovered read
    /// error, write fault, EIO).
    #[error("media error at {lba}")]
    Media { lba: Lba },
    /// The range lies (partly) outside the device.
    #[error("range out of bounds at {lba}")]
    OutOfRange { lba: Lba },
    /// The backing store has no room (a sparse file on a full file system).
    #[error("backing store full at {lba}")]
    NoSpace { lba: Lba },
    /// Fewer bytes moved than asked for.
    #[error("short transfer at {lba}: {done_bytes} of {want_bytes} bytes")]
    ShortTransfer { lba: Lba, done_bytes: u32, want_bytes: u32 },
    /// The device is gone: powered off (fault injection), removed, or its controller failed.
    #[error("device gone")]
    DeviceGone,
    /// The command was aborted (by a reset or an abort command).
    #[error("command aborted")]
    Aborted,
    /// No completion arrived within the command timeout.
    #[error("command timed out")]
    Timeout,
    /// The device refused the command as malformed or unsupported.
    #[error("invalid command: {0}")]
    Invalid(&'static str),
    /// An operating system error with no better mapping.
    #[error("os error {errno} ({})", std::io::Error::from_raw_os_error(*.errno))]
    Os { errno: i32 },
    /// An NVMe status with no better mapping.
    #[error("nvme status sct={sct:#x} sc={sc:#04x}")]
    Nvme { sct: u8, sc: u8 },
}

impl IoError {
    /// Maps an errno from a file or block device operation on the range at `lba`.
    pub fn from_errno(errno: i32, lba: Lba) -> IoError {
        match errno {
            libc::EIO | libc::EILSEQ | libc::EBADMSG => IoError::Media { lba },
            libc::ENOSPC | libc::EDQUOT => IoError::NoSpace { lba },
            libc::ENXIO | libc::ENODEV | libc::ESHUTDOWN => IoError::DeviceGone,
            libc::ECANCELED | libc::EINTR => IoError::Aborted,
            libc::ETIMEDOUT => IoError::Timeout,
            libc::EINVAL => IoError::Invalid("rejected by the kernel (EINVAL)"),
            libc::EOPNOTSUPP => IoError::Invalid("not supported by this device (EOPNOTSUPP)"),
            _ => IoError::Os { errno },
        }
    }

    /// Maps an NVMe completion status of a command on the range at `lba`.
    /// Returns `None` for success.
    pub fn from_status(st: Status, lba: Lba) -> Option<IoError> {
        use status::*;
        if st.is_success() {
            return None;
        }
        Some(match (st.sct, st.sc) {
            (SCT_MEDIA, _) => IoError::Media { lba },
            (SCT_GENERIC, SC_DATA_TRANSFER_ERROR) => IoError::Media { lba },
            (SCT_GENERIC, SC_LBA_OUT_OF_RANGE) => IoError::OutOfRange { lba },
            (SCT_GENERIC, SC_CAPACITY_EXCEEDED) => IoError::NoSpace { lba },
            (SCT_GENERIC, SC_ABORT_REQUESTED | SC_ABORT_SQ_DELETED) => IoError::Aborted,
            (SCT_GENERIC, SC_NAMESPACE_NOT_READY) => IoError::DeviceGone,
            (SCT_GENERIC, SC_INVALID_OPCODE) => IoError::Invalid("invalid opcode"),
            (SCT_GENERIC, SC_INVALID_FIELD) => IoError::Invalid("invalid field in command"),
            (SCT_GENERIC, SC_INVALID_NAMESPACE) => IoError::Invalid("invalid namespace"),
            (sct, sc) => IoError::Nvme { sct, sc },
        })
    }

    /// The NVMe status a controller would report for this error (used by models and by
    /// backends that present NVMe completions).
    pub fn to_status(self) -> Status {
        use status::*;
        let (sct, sc) = match self {
            IoError::Media { .. } => (SCT_MEDIA, SC_UNRECOVERED_READ_ERROR),
            IoError::OutOfRange { .. } => (SCT_GENERIC, SC_LBA_OUT_OF_RANGE),
            IoError::NoSpace { .. } => (SCT_GENERIC, SC_CAPACITY_EXCEEDED),
            IoError::ShortTransfer { .. } => (SCT_GENERIC, SC_DATA_TRANSFER_ERROR),
            IoError::DeviceGone => (SCT_GENERIC, SC_NAMESPACE_NOT_READY),
            IoError::Aborted => (SCT_GENERIC, SC_ABORT_REQUESTED),
            IoError::Timeout => (SCT_GENERIC, SC_ABORT_REQUESTED),
            IoError::Invalid(_) => (SCT_GENERIC, SC_INVALID_FIELD),
            IoError::Os { .. } => (SCT_GENERIC, SC_INTERNAL_ERROR),
            IoError::Nvme { sct, sc } => (sct, sc),
        };
        Status { sct, sc, dnr: false }
    }
}

/// Why a command was not accepted. The buffer comes back so nothing leaks.
#[derive(Debug)]
pub struct SubmitError {
    pub reason: RejectReason,
    pub buf: Option<DmaBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    /// Every slot of the queue pair holds an in-flight command: poll, then resubmit.
    #[error("queue full")]
    QueueFull,
    /// The command is malformed (range, buffer size or alignment); a caller bug.
    #[error("invalid command: {0}")]
    Invalid(&'static str),
    /// The device is gone; nothing will be accepted again.
    #[error("device gone")]
    DeviceGone,
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "command rejected: {}", self.reason)
    }
}

impl std::error::Error for SubmitError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_mapping_round_trips_for_mapped_errors() {
        let lba = Lba(9);
        for e in [
            IoError::Media { lba },
            IoError::OutOfRange { lba },
            IoError::NoSpace { lba },
            IoError::DeviceGone,
            IoError::Aborted,
            IoError::Nvme { sct: 3, sc: 0x71 },
        ] {
            assert_eq!(IoError::from_status(e.to_status(), lba), Some(e));
        }
        assert_eq!(IoError::from_status(Status::SUCCESS, lba), None);
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(IoError::from_errno(libc::EIO, Lba(3)), IoError::Media { lba: Lba(3) });
        assert_eq!(IoError::from_errno(libc::ENOSPC, Lba(3)), IoError::NoSpace { lba: Lba(3) });
        assert_eq!(IoError::from_errno(libc::EPERM, Lba(3)), IoError::Os { errno: libc::EPERM });
        assert!(IoError::Os { errno: libc::EPERM }.to_string().contains("not permitted"));
    }
}

//! Versioned message bodies, so peers of different versions interoperate.
//!
//! ```text
//! | version u16 | oldest compatible u16 | length u32 | body (length bytes) |
//! ```
//!
//! Fields are only ever appended to a message. A reader that knows version `v` accepts a
//! message whose `oldest compatible` is at most `v`, decodes the fields it knows from the
//! front of the body and skips the rest, because the length says where the message ends.
//! A message older than the reader's fields simply ends early: the reader's decoder sees
//! the end of the body and uses defaults for what is missing (its choice, per field).

use sluice_vocab::codec::Dec;

pub const HEADER_BYTES: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("truncated message header")]
    Truncated,
    #[error("message body of {len} bytes overruns its segment ({available} available)")]
    Overrun { len: u32, available: usize },
    #[error(
        "message version {version} needs a reader of at least version {oldest} (this one reads {supported})"
    )]
    TooNew { version: u16, oldest: u16, supported: u16 },
    #[error("message header claims oldest compatible {oldest} > version {version}")]
    Inconsistent { version: u16, oldest: u16 },
}

/// Where [`begin`] put a header, for [`finish`] to fill in the length.
#[derive(Debug, Clone, Copy)]
#[must_use = "finish() writes the message length"]
pub struct Mark(usize);

/// Starts a message of format `version`, readable by readers of at least `oldest`.
pub fn begin(out: &mut Vec<u8>, version: u16, oldest: u16) -> Mark {
    let at = out.len();
    out.extend_from_slice(&header(version, oldest, 0));
    Mark(at)
}

/// The header of a message of format `version`, readable by readers of at least
/// `oldest`, with a body of `len` bytes (for bodies built elsewhere than after [`begin`]).
pub fn header(version: u16, oldest: u16, len: u32) -> [u8; HEADER_BYTES] {
    assert!(oldest <= version, "oldest compatible {oldest} > version {version}");
    let mut h = [0u8; HEADER_BYTES];
    h[0..2].copy_from_slice(&version.to_le_bytes());
    h[2..4].copy_from_slice(&oldest.to_le_bytes());
    h[4..8].copy_from_slice(&len.to_le_bytes());
    h
}

/// Completes the message begun at `mark` (everything appended since is its body).
pub fn finish(out: &mut [u8], mark: Mark) {
    finish_with(out, mark, 0)
}

/// [`finish`] for a message whose last `tail` bytes the caller sends separately, right
/// after `out` (see `frame::encode_parts`).
pub fn finish_with(out: &mut [u8], mark: Mark, tail: usize) {
    let len = out.len() + tail - mark.0 - HEADER_BYTES;
    let len = u32::try_from(len).expect("message bodies are bounded by frame limits");
    out[mark.0 + 4..mark.0 + 8].copy_from_slice(&len.to_le_bytes());
}

/// An opened message: its version and body (to decode from the front, ignoring the tail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened<'a> {
    pub version: u16,
    pub body: &'a [u8],
    /// The bytes after this message in the segment.
    pub rest: &'a [u8],
}

/// Opens the message at the start of `buf` for a reader of version `supported`.
pub fn open(buf: &[u8], supported: u16) -> Result<Opened<'_>, MessageError> {
    let mut d = Dec::new(buf);
    let t = |_| MessageError::Truncated;
    let version = d.u16().map_err(t)?;
    let oldest = d.u16().map_err(t)?;
    let len = d.u32().map_err(t)?;
    if oldest > version {
        return Err(MessageError::Inconsistent { version, oldest });
    }
    if oldest > supported {
        return Err(MessageError::TooNew { version, oldest, supported });
    }
    let available = d.remaining();
    if len as usize > available {
        return Err(MessageError::Overrun { len, available });
    }
    let body = d.take(len as usize).map_err(t)?;
    Ok(Opened { version, body, rest: &buf[HEADER_BYTES + len as usize..] })
}

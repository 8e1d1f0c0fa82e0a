//! Frames: the unit everything between Sluice processes travels in.
//!
//! ```text
//! preamble (32 bytes)
//! | magic u16 "SF" | version u8 | tag u8 | flags u8 | segments u8 | reserved u16 |
//! | segment lengths [u32; 4] | reserved u32 | crc32c u32 of the 28 bytes before it |
//! then, for each of the `segments` segments: its bytes, then a crc32c u32 of them
//! ```
//!
//! The decoder works on whatever bytes have arrived: it checks the preamble's crc before
//! it believes any length in it, refuses lengths over its [`Limits`] before waiting for
//! (or allocating for) the bytes they announce, and checks every segment's crc before
//! handing the segment out. It borrows the segments from the input (no copy, no
//! allocation) and never panics on any input. Encoding appends to a caller's buffer, so a
//! connection reuses one buffer for all its frames.

use sluice_vocab::codec::Dec;

pub const MAGIC: u16 = u16::from_le_bytes(*b"SF");
/// The frame layout version this build writes and reads.
pub const VERSION: u8 = 1;
pub const PREAMBLE_BYTES: usize = 32;
pub const MAX_SEGMENTS: usize = 4;
/// Bytes after each segment (its crc32c).
pub const SEGMENT_TRAILER_BYTES: usize = 4;

/// Hard size limits a decoder enforces before it waits for a frame's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_segment_bytes: u32,
    /// All segments of one frame together.
    pub max_frame_bytes: u32,
}

impl Limits {
    /// Room for the largest object write (64 MiB of data) plus its header.
    pub const DEFAULT: Limits =
        Limits { max_segment_bytes: 64 << 20, max_frame_bytes: (64 << 20) + (64 << 10) };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("not a Sluice frame (magic {0:#06x})")]
    BadMagic(u16),
    #[error("frame layout version {0} is not supported (this build reads {VERSION})")]
    UnsupportedVersion(u8),
    #[error("preamble checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadPreambleCrc { stored: u32, computed: u32 },
    #[error("bad preamble: {0}")]
    BadPreamble(&'static str),
    #[error("segment {segment} of {len} bytes exceeds the limit of {limit}")]
    SegmentTooLarge { segment: usize, len: u32, limit: u32 },
    #[error("frame of {len} bytes exceeds the limit of {limit}")]
    FrameTooLarge { len: u64, limit: u32 },
    #[error(
        "segment {segment} checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
    )]
    BadSegmentCrc { segment: usize, stored: u32, computed: u32 },
}

/// A decoded frame, borrowing its segments from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub tag: u8,
    pub flags: u8,
    segments: [&'a [u8]; MAX_SEGMENTS],
    count: usize,
}

impl<'a> Frame<'a> {
    pub fn segments(&self) -> &[&'a [u8]] {
        &self.segments[..self.count]
    }

    /// Segment `i`, or an empty slice when the frame has fewer.
    pub fn segment(&self, i: usize) -> &'a [u8] {
        if i < self.count { self.segments[i] } else { &[] }
    }
}

/// What the decoder made of the bytes so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole frame, which took the first `len` bytes of the input.
    Frame { frame: Frame<'a>, len: usize },
    /// Not enough bytes yet: the frame needs at least `total` bytes in all.
    NeedMore { total: usize },
}

/// The parsed, checked preamble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preamble {
    pub tag: u8,
    pub flags: u8,
    pub count: usize,
    pub lens: [u32; MAX_SEGMENTS],
}

impl Preamble {
    /// Bytes of the whole frame, preamble included.
    pub fn frame_len(&self) -> usize {
        PREAMBLE_BYTES
            + self.lens[..self.count]
                .iter()
                .map(|&l| l as usize + SEGMENT_TRAILER_BYTES)
                .sum::<usize>()
    }
}

/// Parses and checks a preamble (`buf` holds at least [`PREAMBLE_BYTES`]).
pub fn preamble(buf: &[u8], limits: &Limits) -> Result<Preamble, FrameError> {
    let Some(p) = buf.get(..PREAMBLE_BYTES) else {
        return Err(FrameError::BadPreamble("short"));
    };
    let mut d = Dec::new(p);
    let t = |_| FrameError::BadPreamble("short");
    let magic = d.u16().map_err(t)?;
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    // The checksum first: no other field is believed before it holds.
    let stored = u32::from_le_bytes(p[28..32].try_into().expect("4 bytes"));
    let computed = crc32c::crc32c(&p[..28]);
    if stored != computed {
        return Err(FrameError::BadPreambleCrc { stored, computed });
    }
    let version = d.u8().map_err(t)?;
    if version != VERSION {
        return Err(FrameError::UnsupportedVersion(version));
    }
    let tag = d.u8().map_err(t)?;
    let flags = d.u8().map_err(t)?;
    let count = usize::from(d.u8().map_err(t)?);
    if d.u16().map_err(t)? != 0 {
        return Err(FrameError::BadPreamble("reserved bits set"));
    }
    if count > MAX_SEGMENTS {
        return Err(FrameError::BadPreamble("more than 4 segments"));
    }
    let mut lens = [0u32; MAX_SEGMENTS];
    for l in &mut lens {
        *l = d.u32().map_err(t)?;
    }
    if d.u32().map_err(t)? != 0 {
        return Err(FrameError::BadPreamble("reserved bits set"));
    }
    let mut total = 0u64;
    for (i, &l) in lens.iter().enumerate() {
        if i >= count && l != 0 {
            return Err(FrameError::BadPreamble("length given for an absent segment"));
        }
        if l > limits.max_segment_bytes {
            return Err(FrameError::SegmentTooLarge {
                segment: i,
                len: l,
                limit: limits.max_segment_bytes,
            });
        }
        total += u64::from(l);
    }
    if total > u64::from(limits.max_frame_bytes) {
        return Err(FrameError::FrameTooLarge { len: total, limit: limits.max_frame_bytes });
    }
    Ok(Preamble { tag, flags, count, lens })
}

/// Decodes the frame at the start of `buf`.
pub fn decode<'a>(buf: &'a [u8], limits: &Limits) -> Result<Decoded<'a>, FrameError> {
    if buf.len() < 2 {
        return Ok(Decoded::NeedMore { total: PREAMBLE_BYTES });
    }
    // A wrong magic is refused at once rather than after 32 bytes of garbage.
    let magic = u16::from_le_bytes([buf[0], buf[1]]);
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    if buf.len() < PREAMBLE_BYTES {
        return Ok(Decoded::NeedMore { total: PREAMBLE_BYTES });
    }
    let p = preamble(buf, limits)?;
    let total = p.frame_len();
    if buf.len() < total {
        return Ok(Decoded::NeedMore { total });
    }
    let mut segments: [&[u8]; MAX_SEGMENTS] = [&[]; MAX_SEGMENTS];
    let mut at = PREAMBLE_BYTES;
    for (i, seg) in segments.iter_mut().enumerate().take(p.count) {
        let len = p.lens[i] as usize;
        let bytes = &buf[at..at + len];
        let stored = u32::from_le_bytes(buf[at + len..at + len + 4].try_into().expect("4 bytes"));
        let computed = crc32c::crc32c(bytes);
        if stored != computed {
            return Err(FrameError::BadSegmentCrc { segment: i, stored, computed });
        }
        *seg = bytes;
        at += len + SEGMENT_TRAILER_BYTES;
    }
    debug_assert_eq!(at, total);
    Ok(Decoded::Frame {
        frame: Frame { tag: p.tag, flags: p.flags, segments, count: p.count },
        len: total,
    })
}

/// Bytes [`encode`] appends for these segment lengths.
pub fn encoded_len(segment_lens: &[usize]) -> usize {
    PREAMBLE_BYTES + segment_lens.iter().map(|l| l + SEGMENT_TRAILER_BYTES).sum::<usize>()
}

/// Appends one frame to `out`. Refuses (appending nothing) what a peer with the same
/// limits would refuse.
pub fn encode(
    out: &mut Vec<u8>,
    tag: u8,
    flags: u8,
    segments: &[&[u8]],
    limits: &Limits,
) -> Result<usize, FrameError> {
    // Each segment as one piece (`encode_parts` refuses more than MAX_SEGMENTS).
    let mut parts: [&[&[u8]]; MAX_SEGMENTS + 1] = [&[]; MAX_SEGMENTS + 1];
    let n = segments.len().min(MAX_SEGMENTS + 1);
    for (p, s) in parts.iter_mut().zip(segments) {
        *p = std::slice::from_ref(s);
    }
    encode_parts(out, tag, flags, &parts[..n], limits)
}

/// [`encode`] with each segment given as pieces laid back to back (a header and the
/// caller's data, say), so nobody copies them together first.
pub fn encode_parts(
    out: &mut Vec<u8>,
    tag: u8,
    flags: u8,
    segments: &[&[&[u8]]],
    limits: &Limits,
) -> Result<usize, FrameError> {
    if segments.len() > MAX_SEGMENTS {
        return Err(FrameError::BadPreamble("more than 4 segments"));
    }
    let seg_len = |s: &[&[u8]]| s.iter().map(|p| p.len() as u64).sum::<u64>();
    let mut total = 0u64;
    for (i, s) in segments.iter().enumerate() {
        let len = seg_len(s);
        if len > u64::from(limits.max_segment_bytes) {
            return Err(FrameError::SegmentTooLarge {
                segment: i,
                len: u32::try_from(len).unwrap_or(u32::MAX),
                limit: limits.max_segment_bytes,
            });
        }
        total += len;
    }
    if total > u64::from(limits.max_frame_bytes) {
        return Err(FrameError::FrameTooLarge { len: total, limit: limits.max_frame_bytes });
    }
    let start = out.len();
    out.reserve(PREAMBLE_BYTES + total as usize + SEGMENT_TRAILER_BYTES * segments.len());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&[VERSION, tag, flags, segments.len() as u8, 0, 0]);
    for i in 0..MAX_SEGMENTS {
        let l = segments.get(i).map_or(0, |s| seg_len(s) as u32);
        out.extend_from_slice(&l.to_le_bytes());
    }
    out.extend_from_slice(&0u32.to_le_bytes());
    let crc = crc32c::crc32c(&out[start..start + 28]);
    out.extend_from_slice(&crc.to_le_bytes());
    for s in segments {
        let at = out.len();
        for p in *s {
            out.extend_from_slice(p);
        }
        // Over the copy just made: it is in cache.
        let crc = crc32c::crc32c(&out[at..]);
        out.extend_from_slice(&crc.to_le_bytes());
    }
    debug_assert_eq!(out.len() - start, PREAMBLE_BYTES + total as usize + 4 * segments.len());
    Ok(out.len() - start)
}

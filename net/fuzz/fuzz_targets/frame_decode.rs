//! Feeds arbitrary bytes to the frame decoder as a stream, and every decoded segment to
//! the message decoder: nothing may panic, and what is accepted must be consistent.
//!
//! Random bytes almost never carry a valid crc32c, so the first input byte can ask for
//! the checksums to be fixed up first (bit 0: the preamble's, bit 1: the segments' as
//! the preamble announces them): that lets the fuzzer explore the length, limit and
//! segment logic behind the checksums.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_net::frame::{self, Decoded, Limits, PREAMBLE_BYTES};
use sluice_net::message;

fn fix_crcs(buf: &mut [u8], segments: bool) {
    if buf.len() < PREAMBLE_BYTES {
        return;
    }
    let crc = crc32c::crc32c(&buf[..28]);
    buf[28..32].copy_from_slice(&crc.to_le_bytes());
    if !segments {
        return;
    }
    let n = usize::from(buf[5]).min(4);
    let mut at = PREAMBLE_BYTES;
    for i in 0..n {
        let len = u32::from_le_bytes(buf[8 + 4 * i..12 + 4 * i].try_into().unwrap()) as usize;
        if at + len + 4 > buf.len() {
            return;
        }
        let crc = crc32c::crc32c(&buf[at..at + len]);
        buf[at + len..at + len + 4].copy_from_slice(&crc.to_le_bytes());
        at += len + 4;
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut owned = rest.to_vec();
    if mode & 1 != 0 {
        fix_crcs(&mut owned, mode & 2 != 0);
    }
    let limits = Limits { max_segment_bytes: 1 << 16, max_frame_bytes: 1 << 17 };
    let mut buf: &[u8] = &owned;
    loop {
        match frame::decode(buf, &limits) {
            Ok(Decoded::Frame { frame, len }) => {
                assert!(len >= PREAMBLE_BYTES && len <= buf.len());
                for s in frame.segments() {
                    let mut rest: &[u8] = s;
                    while let Ok(m) = message::open(rest, u16::MAX) {
                        assert!(m.rest.len() < rest.len());
                        rest = m.rest;
                    }
                }
                buf = &buf[len..];
            }
            Ok(Decoded::NeedMore { total }) => {
                assert!(total > buf.len());
                break;
            }
            Err(_) => break,
        }
    }
});

//! Property tests of the frame and message codecs (the decoder is also fuzzed:
//! `net/fuzz`, see docs/ARCHITECTURE.md).

use proptest::prelude::*;
use sluice_net::frame::{self, Decoded, FrameError, Limits, PREAMBLE_BYTES};
use sluice_net::message;

fn segments() -> impl Strategy<Value = Vec<Vec<u8>>> {
    proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..=4)
}

fn enc(tag: u8, flags: u8, segs: &[Vec<u8>]) -> Vec<u8> {
    let refs: Vec<&[u8]> = segs.iter().map(|s| s.as_slice()).collect();
    let mut out = Vec::new();
    let n = frame::encode(&mut out, tag, flags, &refs, &Limits::DEFAULT).unwrap();
    assert_eq!(n, out.len());
    assert_eq!(n, frame::encoded_len(&segs.iter().map(Vec::len).collect::<Vec<_>>()));
    out
}

fn check_same(bytes: &[u8], tag: u8, flags: u8, segs: &[Vec<u8>]) -> usize {
    match frame::decode(bytes, &Limits::DEFAULT).unwrap() {
        Decoded::Frame { frame, len } => {
            assert_eq!((frame.tag, frame.flags), (tag, flags));
            assert_eq!(frame.segments().len(), segs.len());
            for (a, b) in frame.segments().iter().zip(segs) {
                assert_eq!(*a, b.as_slice());
            }
            len
        }
        other => panic!("expected a frame, got {other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn frames_round_trip(tag in any::<u8>(), flags in any::<u8>(), segs in segments()) {
        let bytes = enc(tag, flags, &segs);
        prop_assert_eq!(check_same(&bytes, tag, flags, &segs), bytes.len());
    }

    /// Every proper prefix asks for more (never a frame, never an error: the bytes so far
    /// are all valid), and says how many bytes the frame needs once the preamble is in.
    #[test]
    fn segments_in_pieces_encode_like_whole_ones(
        tag in any::<u8>(), segs in segments(), cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..4),
    ) {
        let whole = enc(tag, 0, &segs);
        // Each segment split at up to `cuts.len()` points.
        let pieces: Vec<Vec<&[u8]>> = segs
            .iter()
            .map(|s| {
                let mut at: Vec<usize> = cuts.iter().map(|c| c.index(s.len() + 1)).collect();
                at.sort_unstable();
                let mut v = Vec::new();
                let mut from = 0;
                for a in at {
                    v.push(&s[from..a]);
                    from = a;
                }
                v.push(&s[from..]);
                v
            })
            .collect();
        let refs: Vec<&[&[u8]]> = pieces.iter().map(|p| p.as_slice()).collect();
        let mut out = Vec::new();
        frame::encode_parts(&mut out, tag, 0, &refs, &Limits::DEFAULT).unwrap();
        prop_assert_eq!(out, whole);
    }

    #[test]
    fn prefixes_need_more(segs in segments()) {
        let bytes = enc(1, 0, &segs);
        for cut in 0..bytes.len() {
            match frame::decode(&bytes[..cut], &Limits::DEFAULT).unwrap() {
                Decoded::NeedMore { total } => {
                    if cut >= PREAMBLE_BYTES {
                        prop_assert_eq!(total, bytes.len());
                    }
                    prop_assert!(total > cut);
                }
                Decoded::Frame { .. } => prop_assert!(false, "a frame from a {}-byte prefix", cut),
            }
        }
    }

    /// Any single damaged byte is detected (every byte is under a crc32c, which catches
    /// every burst of up to 32 bits).
    #[test]
    fn any_damaged_byte_is_refused(segs in segments(), at in any::<prop::sample::Index>(), x in 1u8..=255) {
        let mut bytes = enc(7, 3, &segs);
        let i = at.index(bytes.len());
        bytes[i] ^= x;
        prop_assert!(frame::decode(&bytes, &Limits::DEFAULT).is_err(), "damage at byte {} accepted", i);
    }

    /// Garbage never panics; whatever the decoder accepts is self-consistent.
    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400), magic in any::<bool>()) {
        let mut bytes = bytes;
        if magic && bytes.len() >= 2 {
            bytes[..2].copy_from_slice(&frame::MAGIC.to_le_bytes());
        }
        if let Ok(Decoded::Frame { len, frame }) = frame::decode(&bytes, &Limits::DEFAULT) {
            prop_assert!(len <= bytes.len());
            prop_assert!(frame.segments().len() <= 4);
        }
    }

    /// A stream of frames cut into arbitrary chunks decodes to the same frames.
    #[test]
    fn streams_decode_across_any_chunking(
        frames in proptest::collection::vec((any::<u8>(), segments()), 1..8),
        chunks in proptest::collection::vec(1usize..200, 1..50),
    ) {
        let mut wire = Vec::new();
        for (tag, segs) in &frames {
            wire.extend(enc(*tag, 0, segs));
        }
        let mut buf: Vec<u8> = Vec::new();
        let mut fed = 0;
        let mut got = 0;
        let mut ci = 0;
        while got < frames.len() {
            match frame::decode(&buf, &Limits::DEFAULT).unwrap() {
                Decoded::Frame { len, .. } => {
                    let (tag, segs) = &frames[got];
                    check_same(&buf[..len], *tag, 0, segs);
                    buf.drain(..len);
                    got += 1;
                }
                Decoded::NeedMore { .. } => {
                    prop_assert!(fed < wire.len(), "decoder wants more than was sent");
                    let n = chunks[ci % chunks.len()].min(wire.len() - fed);
                    ci += 1;
                    buf.extend_from_slice(&wire[fed..fed + n]);
                    fed += n;
                }
            }
        }
        prop_assert!(buf.is_empty() && fed == wire.len());
    }

    /// Messages: a newer writer's extra fields are skipped by an older reader, and a
    /// message needing a newer reader is refused.
    #[test]
    fn messages_skip_unknown_tails(a in any::<u64>(), b in any::<u64>(), tail in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut out = Vec::new();
        let m = message::begin(&mut out, 3, 1);
        out.extend_from_slice(&a.to_le_bytes());
        out.extend_from_slice(&b.to_le_bytes());
        out.extend_from_slice(&tail);
        message::finish(&mut out, m);
        out.extend_from_slice(b"next");
        let o = message::open(&out, 1).unwrap();
        prop_assert_eq!(o.version, 3);
        prop_assert_eq!(u64::from_le_bytes(o.body[..8].try_into().unwrap()), a);
        prop_assert_eq!(o.rest, b"next");
        let mut strict = Vec::new();
        let m = message::begin(&mut strict, 4, 4);
        message::finish(&mut strict, m);
        let refused = matches!(message::open(&strict, 3), Err(message::MessageError::TooNew { .. }));
        prop_assert!(refused, "a message needing version 4 was opened by a version 3 reader");
    }

    #[test]
    fn message_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        if let Ok(o) = message::open(&bytes, u16::MAX) {
            prop_assert!(o.body.len() + o.rest.len() + message::HEADER_BYTES == bytes.len());
        }
    }
}

/// A preamble announcing more than the limits allow is refused at once, before the
/// decoder waits for (or anyone allocates) the bytes it announces.
#[test]
fn oversized_frames_are_refused_from_the_preamble() {
    let small = Limits { max_segment_bytes: 1000, max_frame_bytes: 1500 };
    let mut out = Vec::new();
    frame::encode(&mut out, 1, 0, &[&[0u8; 1001]], &Limits::DEFAULT).unwrap();
    let e = frame::decode(&out[..PREAMBLE_BYTES], &small).unwrap_err();
    assert!(matches!(e, FrameError::SegmentTooLarge { segment: 0, len: 1001, limit: 1000 }), "{e}");
    let mut out = Vec::new();
    frame::encode(&mut out, 1, 0, &[&[0u8; 900], &[0u8; 900]], &Limits::DEFAULT).unwrap();
    let e = frame::decode(&out[..PREAMBLE_BYTES], &small).unwrap_err();
    assert!(matches!(e, FrameError::FrameTooLarge { len: 1800, .. }), "{e}");
    // The encoder refuses the same, appending nothing.
    let mut buf = vec![9u8];
    assert!(frame::encode(&mut buf, 1, 0, &[&[0u8; 1001]], &small).is_err());
    assert_eq!(buf, vec![9u8]);
    // A wrong magic is refused from the first two bytes.
    assert!(matches!(frame::decode(b"GET / HTTP/1.1", &small), Err(FrameError::BadMagic(_))));
}

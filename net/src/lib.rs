//! Frames, sessions and transports between Sluice processes.
//!
//! Empty until the serving path lands: this crate will hold the frame codec (preamble and
//! segments with crc32c, versioned messages, hard size limits), sessions (banner,
//! features, sequence numbers, replay after reconnect) and the kernel TCP transport
//! polled by the owning reactor. See `docs/ARCHITECTURE.md` for what exists today.

#![forbid(unsafe_code)]

//! Frames, sessions and transports between Sluice processes.
//!
//! Built so far: the frame codec ([`frame`]: preamble and segments each with a crc32c,
//! hard size limits checked before any length is trusted, zero-copy decoding that never
//! panics) and versioned message bodies ([`message`]: version, oldest compatible version,
//! length, so an older peer skips fields it does not know). Sessions (banner, features,
//! sequence numbers, replay after reconnect) and the kernel TCP transport polled by the
//! owning reactor come next; see `docs/ARCHITECTURE.md`.

#![forbid(unsafe_code)]

pub mod frame;
pub mod message;
pub mod session;

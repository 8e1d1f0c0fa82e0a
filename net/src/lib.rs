//! Frames, sessions and transports between Sluice processes.
//!
//! Built so far: the frame codec ([`frame`]: preamble and segments each with a crc32c,
//! hard size limits checked before any length is trusted, zero-copy decoding that never
//! panics) and versioned message bodies ([`message`]: version, oldest compatible version,
//! length, so an older peer skips fields it does not know), sessions ([`session`]: banner
//! and features, sequence numbers and acks, exactly-once replay after a reconnect,
//! keepalives; sans-IO) and the kernel TCP transport ([`tcp`]: non-blocking sockets
//! polled by their owner, each server with its own epoll set to park on), and the object
//! protocol between clients and OSDs ([`ops`]), the replication protocol between OSDs
//! ([`rep`]), and secure mode ([`secure`]: the byte
//! stream of a connection sealed with AES-128-GCM under per-connection keys); see
//! `docs/ARCHITECTURE.md`.

#![forbid(unsafe_code)]

pub mod auth_phase;
pub mod frame;
pub mod message;
pub mod ops;
pub mod rep;
pub mod secure;
pub mod session;
pub mod tcp;
